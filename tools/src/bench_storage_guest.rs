//! `paravisor bench storage`, in the guest: the harness's Linux (docs/linux-harness.md)
//! boots once under QEMU with three vhost-user-blk disks of 256 MiB (the shipped manifest's
//! size), each in its own PCI slot: pv-storage on a raw image, pv-storage on the encrypted
//! image (the shipped setting) and qemu-storage-daemon on a raw image file.
//!
//! The guest writes each disk whole first (so no read finds a never-written block: our
//! encrypted disk answers those with zeros without decrypting), the host writes the dirty
//! images back, then fio runs its jobs on each disk in turn, job by job, for several rounds
//! whose disk order rotates, so that the load of the rest of the machine falls on every side
//! alike. One fio process per round (a job file of stonewalled jobs: fio loads its 60
//! libraries once, not per job); its terse lines come back on the console.
//!
//! Each job also says on the console when it starts and ends, with its disk's request counts
//! (`/sys/block/X/stat`, from fio's `exec_prerun`/`exec_postrun`): the host reads the back
//! end's CPU time (`/proc/PID/stat`, every thread) at both and reports CPU per request, which
//! the others' load on a shared machine barely moves (it changes rates by up to 2x).

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use crate::bench_storage::blk_device;
use crate::bench_storage::boot;
use crate::bench_storage::err;
use crate::bench_storage::fio_terse;
use crate::bench_storage::median;
use crate::bench_storage::median_ratio;
use crate::bench_storage::storage_daemon;
use crate::bench_storage::Effort;
use crate::bench_storage::FioResult;
use crate::bench_storage::Instance;
use crate::bench_storage::DISK_BYTES;
use crate::bench_storage::GUEST_MEMORY_MIB;
use crate::bench_storage::PROGRESS;
use crate::linux_guest;
use crate::linux_guest::GuestFile;
use crate::linux_guest::Image;

/// What a row's number counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Unit {
    #[serde(rename = "IOPS")]
    Iops,
    #[serde(rename = "MiB/s")]
    MibPerSecond,
}

/// One fio job of the comparison.
struct Job {
    key: &'static str,
    what: &'static str,
    /// fio options after the common ones.
    options: &'static str,
    write: bool,
    unit: Unit,
}

const JOBS: [Job; 6] = [
    Job {
        key: "randread-qd1",
        what: "4 KiB random read, iodepth 1",
        options: "rw=randread\nbs=4k\niodepth=1",
        write: false,
        unit: Unit::Iops,
    },
    Job {
        key: "randread-qd16",
        what: "4 KiB random read, iodepth 16",
        options: "rw=randread\nbs=4k\niodepth=16",
        write: false,
        unit: Unit::Iops,
    },
    Job {
        key: "randwrite-qd1",
        what: "4 KiB random write, iodepth 1",
        options: "rw=randwrite\nbs=4k\niodepth=1",
        write: true,
        unit: Unit::Iops,
    },
    Job {
        key: "randwrite-qd16",
        what: "4 KiB random write, iodepth 16",
        options: "rw=randwrite\nbs=4k\niodepth=16",
        write: true,
        unit: Unit::Iops,
    },
    Job {
        key: "read-128k",
        what: "128 KiB sequential read, iodepth 16",
        options: "rw=read\nbs=128k\niodepth=16",
        write: false,
        unit: Unit::MibPerSecond,
    },
    Job {
        key: "write-128k",
        what: "128 KiB sequential write, iodepth 16",
        options: "rw=write\nbs=128k\niodepth=16",
        write: true,
        unit: Unit::MibPerSecond,
    },
];

/// The three disks: (name, PCI slot in the guest).
const SIDES: [(&str, u8); 3] = [("raw", 4), ("encrypted", 5), ("qsd", 6)];

/// The target: ours (raw) at least this share of qsd's rate.
pub const TARGET_VS_QSD: f64 = 0.95;

/// One fio job's results on the three disks.
#[derive(Debug, Clone, Serialize)]
pub struct GuestRow {
    pub job: String,
    pub unit: Unit,
    /// Medians over the rounds.
    pub ours_raw: f64,
    pub ours_encrypted: f64,
    pub qsd: f64,
    /// Medians of the per-round ratios, and their smallest and largest.
    pub raw_vs_qsd: f64,
    pub raw_vs_qsd_range: (f64, f64),
    pub encrypted_vs_raw: f64,
    /// The back end's CPU time per request the guest's disk completed, over all rounds
    /// (microseconds; every thread of the process).
    pub cpu_us_per_request: CpuPerRequest,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CpuPerRequest {
    pub ours_raw: f64,
    pub ours_encrypted: f64,
    pub qsd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GuestReport {
    pub rounds: usize,
    pub ramp_seconds: f64,
    pub run_seconds: f64,
    /// The guest's kernel and QEMU's acceleration.
    pub guest: String,
    pub rows: Vec<GuestRow>,
    /// Writing each disk whole first (1 MiB sequential writes, iodepth 4), MiB/s.
    pub fill_mib_per_second: Vec<(String, f64)>,
}

/// The guest's script: find the three disks by PCI slot, fill them, wait for the host to
/// write the images back, run the rounds' job files; fio's terse lines after `PVB-FIO`.
fn guest_script(rounds: usize) -> String {
    let mut s = String::from(
        r#"set -e
disk() { for b in /sys/bus/pci/devices/0000:00:$1.0/virtio*/block/*; do [ -e "$b" ] && echo "${b##*/}"; done; return 0; }
"#,
    );
    for (side, slot) in SIDES {
        s.push_str(&format!(
            "n=0; while [ -z \"$(disk {slot:02x})\" ] && [ $n -lt 300 ]; do usleep 100000; n=$((n+1)); done\n\
             {side}_dev=$(disk {slot:02x}); [ -n \"${side}_dev\" ] || {{ echo 'no disk in PCI slot {slot}'; exit 3; }}\n\
             {side}=/dev/${side}_dev; export {side} {side}_dev\n"
        ));
    }
    s.push_str(&format!(
        "echo \"{PROGRESS} guest up; disks: raw=$raw encrypted=$encrypted qsd=$qsd; writing each whole\"\n\
         run() {{ fio --output-format=terse --terse-version=3 --output=/tmp/out \"$1\" || {{ cat /tmp/out; exit 1; }}; sed 's/^/PVB-FIO /' /tmp/out; }}\n\
         run /pv/fill.fio\n\
         echo PVB-FILLED; read -t 300 go\n"
    ));
    for round in 1..=rounds {
        s.push_str(&format!(
            "echo \"{PROGRESS} guest round {round} of {rounds}\"\nrun /pv/round{round}.fio\n"
        ));
    }
    s.push_str("echo PVB-DONE\n");
    s
}

/// fio's job files: `fill.fio` writes each disk whole; `roundN.fio` runs every job on every
/// disk, the disks' order rotated by the round, each job announcing its start and end with
/// its disk's counters.
fn job_files(effort: &Effort) -> Vec<GuestFile> {
    let file = |name: String, text: String| GuestFile {
        path: format!("pv/{name}"),
        contents: text.into_bytes(),
        mode: 0o644,
    };
    let mut fill =
        String::from("[global]\nioengine=libaio\ndirect=1\nrw=write\nbs=1M\niodepth=4\n");
    for (side, _) in SIDES {
        fill.push_str(&format!("[fill-{side}]\nstonewall\nfilename=${{{side}}}\n"));
    }
    let mut files = vec![file("fill.fio".into(), fill)];
    for round in 1..=effort.rounds {
        let mut text = format!(
            "[global]\nioengine=libaio\ndirect=1\ntime_based\nnorandommap\nramp_time={}ms\nruntime={}ms\n",
            effort.guest_ramp.as_millis(),
            effort.guest_run.as_millis()
        );
        for job in &JOBS {
            for k in 0..SIDES.len() {
                let (side, _) = SIDES[(k + round) % SIDES.len()];
                let name = format!("r{round}-{}-{side}", job.key);
                // fio sends the commands' own output to a file: they write to the console.
                let mark = |what: &str| {
                    format!(
                        "sh -c 'echo PVB-{what} {name} $(cat /sys/block/${{{side}_dev}}/stat) > /dev/console'"
                    )
                };
                text.push_str(&format!(
                    "[{name}]\nstonewall\nfilename=${{{side}}}\n{}\nexec_prerun={}\nexec_postrun={}\n",
                    job.options,
                    mark("START"),
                    mark("END")
                ));
            }
        }
        files.push(file(format!("round{round}.fio"), text));
    }
    files
}

/// Requests a disk completed by its counters (`/sys/block/X/stat`: reads and writes
/// completed are its first and fifth numbers).
fn requests(stat: &[&str]) -> Option<u64> {
    Some(stat.first()?.parse::<u64>().ok()? + stat.get(4)?.parse::<u64>().ok()?)
}

/// Each job's back-end CPU time and requests, from its start and end lines.
#[derive(Default)]
struct CpuLedger {
    /// Job name -> (CPU ticks, requests) at its start.
    started: HashMap<String, (u64, u64)>,
    /// Job name -> (CPU ticks, requests) it took.
    taken: HashMap<String, (u64, u64)>,
}

impl CpuLedger {
    /// A `PVB-START` or `PVB-END` line's text after the marker: the job's name and its disk's
    /// counters; `pid` is the back end of the job's side.
    fn mark(&mut self, end: bool, text: &str, pids: &[(&str, i32)]) -> Result<(), String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let (Some(name), Some(done)) = (words.first(), requests(words.get(1..).unwrap_or(&[])))
        else {
            return Err(format!("a malformed job mark: {text:?}"));
        };
        let side = name.rsplit('-').next().unwrap_or("");
        let pid = pids
            .iter()
            .find(|(s, _)| *s == side)
            .map(|(_, p)| *p)
            .ok_or(format!("no back end for the job {name}"))?;
        let ticks = ipc_defs::hosted::sys::cpu_ticks(pid as u32)
            .map_err(|e| format!("CPU time of {side}'s back end (pid {pid}): {e}"))?;
        if !end {
            self.started.insert(name.to_string(), (ticks, done));
            return Ok(());
        }
        let (t0, r0) = self
            .started
            .get(*name)
            .ok_or(format!("the job {name} ended without starting"))?;
        self.taken.insert(
            name.to_string(),
            (ticks.saturating_sub(*t0), done.saturating_sub(*r0)),
        );
        Ok(())
    }

    /// CPU microseconds per request of `job` on `side` over all rounds.
    fn per_request(&self, job: &Job, side: &str, rounds: usize) -> f64 {
        let (ticks, requests) = (1..=rounds)
            .filter_map(|round| self.taken.get(&format!("r{round}-{}-{side}", job.key)))
            .fold((0, 0), |(t, r), (dt, dr)| (t + dt, r + dr));
        let tick_us = 1e6 / ipc_defs::hosted::sys::clock_ticks_per_second() as f64;
        ticks as f64 * tick_us / requests.max(1) as f64
    }
}

/// The rows from the guest's `PVB-FIO` lines and the CPU ledger.
fn guest_rows(console: &[String], rounds: usize, cpu: &CpuLedger) -> Result<Vec<GuestRow>, String> {
    let results: Vec<FioResult> = terse_lines(console)?;
    let value = |job: &Job, r: &FioResult| {
        let (iops, kib) = if job.write {
            (r.write_iops, r.write_kib_per_second)
        } else {
            (r.read_iops, r.read_kib_per_second)
        };
        match job.unit {
            Unit::Iops => iops,
            Unit::MibPerSecond => kib / 1024.0,
        }
    };
    let mut rows = Vec::new();
    for job in &JOBS {
        let samples = |side: &str| -> Result<Vec<f64>, String> {
            (1..=rounds)
                .map(|round| {
                    let name = format!("r{round}-{}-{side}", job.key);
                    results
                        .iter()
                        .find(|r| r.job == name)
                        .map(|r| value(job, r))
                        .ok_or(format!("the guest printed no result for fio job {name}"))
                })
                .collect()
        };
        let (raw, enc, qsd) = (samples("raw")?, samples("encrypted")?, samples("qsd")?);
        let ratios: Vec<f64> = raw.iter().zip(&qsd).map(|(a, b)| a / b).collect();
        let lowest = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let highest = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        rows.push(GuestRow {
            job: job.what.into(),
            unit: job.unit,
            raw_vs_qsd: median(ratios),
            raw_vs_qsd_range: (lowest, highest),
            encrypted_vs_raw: median_ratio(&enc, &raw),
            ours_raw: median(raw),
            ours_encrypted: median(enc),
            qsd: median(qsd),
            cpu_us_per_request: CpuPerRequest {
                ours_raw: cpu.per_request(job, "raw", rounds),
                ours_encrypted: cpu.per_request(job, "encrypted", rounds),
                qsd: cpu.per_request(job, "qsd", rounds),
            },
        });
    }
    Ok(rows)
}

/// fio's results from the console (fio also prints other lines into its output, e.g. where
/// it saved a job's pre-run output: only terse lines count).
fn terse_lines(console: &[String]) -> Result<Vec<FioResult>, String> {
    console
        .iter()
        .filter_map(|l| l.split_once("PVB-FIO ").map(|(_, t)| t))
        .filter(|t| t.starts_with("3;"))
        .map(fio_terse)
        .collect()
}

/// Writes back the images' dirty pages (what the guest's fill left) before the rounds.
fn sync_images(images: &[std::path::PathBuf]) -> std::io::Result<()> {
    for image in images {
        std::fs::File::open(image)
            .and_then(|f| f.sync_all())
            .map_err(|e| err(format!("{}: {e}", image.display())))?;
    }
    Ok(())
}

/// The comparison: a guest on the three disks (qemu-storage-daemon started here).
pub fn run(
    image: &Image,
    dir: &Path,
    raw: &mut Instance,
    encrypted: &mut Instance,
    effort: &Effort,
) -> std::io::Result<GuestReport> {
    let qsd_image = dir.join("qsd.img");
    std::fs::File::create(&qsd_image)?.set_len(DISK_BYTES)?;
    let qsd = storage_daemon(&qsd_image, &dir.join("qsd.sock"), &dir.join("qsd.log"))?;
    let soon = || Instant::now() + Duration::from_secs(10);
    let pids = [
        ("raw", raw.storage_pid(None, soon())?),
        ("encrypted", encrypted.storage_pid(None, soon())?),
        ("qsd", qsd.pid()),
    ];
    let mut devices = Vec::new();
    for ((side, slot), socket) in
        SIDES
            .iter()
            .zip([raw.socket(), encrypted.socket(), dir.join("qsd.sock")])
    {
        devices.extend(blk_device(side, &socket, *slot));
    }
    let mut files = job_files(effort);
    files.push(GuestFile::script(&guest_script(effort.rounds)));
    let per_job = effort.guest_ramp + effort.guest_run + Duration::from_secs(1);
    let budget =
        per_job * (JOBS.len() * SIDES.len() * effort.rounds) as u32 * 3 + Duration::from_secs(300);
    let deadline = Instant::now() + budget;
    let mut guest = boot(image, dir, "fio", &devices, &files)?;
    let mut cpu = CpuLedger::default();
    loop {
        let line = guest
            .next_line(deadline)
            .map_err(|why| guest.failure(&format!("{why} before the guest's PVB-DONE")))?;
        if line.contains("PVB-FILLED") {
            sync_images(&[
                raw.state.join("storage-blk.img"),
                encrypted.state.join("storage-blk.img"),
                qsd_image.clone(),
            ])?;
            guest.send_line("go")?;
        } else if let Some((_, text)) = line.split_once("PVB-START ") {
            cpu.mark(false, text, &pids)
                .map_err(|e| guest.failure(&e))?;
        } else if let Some((_, text)) = line.split_once("PVB-END ") {
            cpu.mark(true, text, &pids).map_err(|e| guest.failure(&e))?;
        } else if line.contains("PVB-DONE") {
            break;
        }
    }
    let status = guest.exit_status(deadline)?;
    if status != 0 {
        return Err(guest.failure(&format!("the guest's script exited with {status}")));
    }
    let rows = guest_rows(guest.console(), effort.rounds, &cpu).map_err(|e| guest.failure(&e))?;
    let fills = terse_lines(guest.console()).map_err(|e| guest.failure(&e))?;
    let fill_mib_per_second = SIDES
        .iter()
        .filter_map(|(side, _)| {
            let r = fills.iter().find(|r| r.job == format!("fill-{side}"))?;
            Some((side.to_string(), r.write_kib_per_second / 1024.0))
        })
        .collect();
    Ok(GuestReport {
        rounds: effort.rounds,
        ramp_seconds: effort.guest_ramp.as_secs_f64(),
        run_seconds: effort.guest_run.as_secs_f64(),
        guest: format!(
            "{} under QEMU ({:?}), 1 vCPU, {GUEST_MEMORY_MIB} MiB",
            image.kernel.display(),
            linux_guest::Accel::from_env().map_err(err)?
        ),
        rows,
        fill_mib_per_second,
    })
}

fn number(x: f64, unit: Unit) -> String {
    match unit {
        Unit::Iops => format!("{x:.0}"),
        Unit::MibPerSecond => format!("{x:.1}"),
    }
}

pub fn text(g: &GuestReport) -> String {
    let mut out = format!(
        "Storage in a Linux guest: fio (libaio, direct=1) on vhost-user-blk disks of 256 MiB, \
         written whole first\n  guest: {}\n  {} rounds, each job {:.1} s after a {:.1} s ramp, \
         the disks' order rotating; medians; ratios = medians of the per-round ratios (raw/qsd: \
         their range too)\n",
        g.guest, g.rounds, g.run_seconds, g.ramp_seconds
    );
    out.push_str(&format!(
        "  {:<38} {:>6} {:>9} {:>9} {:>9} {:>8} {:>12} {:>8}\n",
        "job", "unit", "ours raw", "ours enc", "qsd", "raw/qsd", "(range)", "enc/raw"
    ));
    for row in &g.rows {
        let unit = match row.unit {
            Unit::Iops => "IOPS",
            Unit::MibPerSecond => "MiB/s",
        };
        out.push_str(&format!(
            "  {:<38} {:>6} {:>9} {:>9} {:>9} {:>7.2}x {:>12} {:>7.2}x\n",
            row.job,
            unit,
            number(row.ours_raw, row.unit),
            number(row.ours_encrypted, row.unit),
            number(row.qsd, row.unit),
            row.raw_vs_qsd,
            format!(
                "{:.2}-{:.2}",
                row.raw_vs_qsd_range.0, row.raw_vs_qsd_range.1
            ),
            row.encrypted_vs_raw
        ));
    }
    let below: Vec<&str> = g
        .rows
        .iter()
        .filter(|row| row.raw_vs_qsd < TARGET_VS_QSD)
        .map(|row| row.job.as_str())
        .collect();
    out.push_str(&format!(
        "  target: ours raw >= {TARGET_VS_QSD:.2}x qsd on every row: {}\n",
        if below.is_empty() {
            "met".to_string()
        } else {
            format!("NOT met ({})", below.join("; "))
        }
    ));
    out.push_str(&format!(
        "  back end's CPU per request (us, all rounds; /proc/PID/stat, 10 ms ticks)\n  {:<38} {:>9} {:>9} {:>9} {:>8}\n",
        "job", "ours raw", "ours enc", "qsd", "raw/qsd"
    ));
    for row in &g.rows {
        let c = row.cpu_us_per_request;
        out.push_str(&format!(
            "  {:<38} {:>9.1} {:>9.1} {:>9.1} {:>7.2}x\n",
            row.job,
            c.ours_raw,
            c.ours_encrypted,
            c.qsd,
            c.ours_raw / c.qsd
        ));
    }
    let fill: Vec<String> = g
        .fill_mib_per_second
        .iter()
        .map(|(side, v)| format!("{side} {v:.0} MiB/s"))
        .collect();
    out.push_str(&format!(
        "  writing each disk whole first (1 MiB writes, iodepth 4): {}\n",
        fill.join(", ")
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_round_runs_every_job_on_every_disk_in_a_rotated_order() {
        let files = job_files(&Effort::FULL);
        assert_eq!(files.len(), 1 + Effort::FULL.rounds);
        let round = |n: usize| String::from_utf8(files[n].contents.clone()).unwrap();
        for n in 1..=Effort::FULL.rounds {
            let text = round(n);
            assert_eq!(text.matches("stonewall").count(), JOBS.len() * SIDES.len());
            for job in &JOBS {
                for (side, _) in SIDES {
                    let name = format!("r{n}-{}-{side}", job.key);
                    assert!(text.contains(&format!("[{name}]")));
                    assert!(text.contains(&format!(
                        "PVB-START {name} $(cat /sys/block/${{{side}_dev}}/stat)"
                    )));
                }
            }
        }
        let first = |text: &str| {
            text.find("filename=")
                .map(|at| text[at..].lines().next().unwrap().to_string())
        };
        assert_ne!(first(&round(1)), first(&round(2)));
        let fill = String::from_utf8(files[0].contents.clone()).unwrap();
        assert_eq!(fill.matches("filename=${").count(), 3);
    }

    #[test]
    fn a_job_costs_the_cpu_and_the_requests_between_its_marks() {
        let mut ledger = CpuLedger::default();
        let me = std::process::id() as i32;
        let pids = [("raw", me), ("qsd", me)];
        ledger
            .mark(false, "r1-randread-qd1-raw 100 0 800 5 7 0 56 1", &pids)
            .unwrap();
        // Burn some CPU so that the tick counter moves.
        let until = Instant::now() + Duration::from_millis(50);
        let mut x = 0u64;
        while Instant::now() < until {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        assert_ne!(x, 1);
        ledger
            .mark(true, "r1-randread-qd1-raw 1100 0 8800 5 17 0 136 1", &pids)
            .unwrap();
        let (ticks, requests) = ledger.taken["r1-randread-qd1-raw"];
        assert_eq!(requests, 1000 + 10);
        assert!(ticks <= 10, "{ticks}");
        assert!(ledger.per_request(&JOBS[0], "raw", 1) >= 0.0);
        assert!(ledger
            .mark(true, "r2-randread-qd1-qsd 1 2 3 4 5", &pids)
            .is_err());
        assert!(ledger.mark(false, "r1-x-nobody 1 2 3 4 5", &pids).is_err());
        assert!(ledger.mark(false, "r1-x-raw 1 2", &pids).is_err());
    }
}
