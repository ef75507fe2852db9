//! `paravisor bench guest`: the cost of a guest exit handled by a device service (a port read
//! of COM1's scratch register, answered by intercept in its own process) against the same exit
//! answered in the microkernel's vCPU thread without IPC (the partition's in-thread port),
//! both timed by the guest itself with `rdtsc` in the same run; the time from starting
//! `paravisor run` to the guest's first console line; and the storage service's NVMe function
//! under the guest's write-flush-verify passes, its I/O doorbells as exits (plain doorbells,
//! the baseline) against ioeventfd signals (shadow doorbells), cycles per pass timed by the
//! guest.
//!
//! Every run uses the same platform and state in the benchmark's directory: a first run, not
//! counted, provisions them (the simulated platform's RSA-4096 keys take seconds; the sealed
//! datastore key and the guest-state file), so the timed runs start as an installed
//! paravisor does.

use std::io::BufRead;
use std::io::BufReader;
use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Report {
    pub runs: usize,
    pub exits_per_path: u64,
    /// Median over the runs, in guest TSC cycles per exit.
    pub service_cycles: u64,
    pub in_thread_cycles: u64,
    /// Median of the per-run ratios (service / in-thread).
    pub ratio: f64,
    /// Median time from `paravisor run` to the guest's first console line, in milliseconds.
    pub first_line_ms: f64,
    /// Median time from `paravisor run` to its exit, in milliseconds.
    pub whole_run_ms: f64,
    /// The first, uncounted run's time to its first console line (it provisioned the
    /// platform and the state), in milliseconds.
    pub provisioning_run_first_line_ms: f64,
    /// NVMe passes per run (each writes, flushes and reads back every block of the disk).
    pub nvme_passes: u64,
    /// Median guest cycles per pass with plain doorbells (each an exit storage answers).
    pub nvme_plain_cycles_per_pass: u64,
    /// The same with shadow doorbells (I/O doorbells as ioeventfd signals).
    pub nvme_shadow_cycles_per_pass: u64,
    /// Median of the per-pair ratios (shadow / plain).
    pub nvme_ratio: f64,
}

fn err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// The last lines of a log, for an error message (the benchmark's directory, and the log
/// with it, is removed when the benchmark ends).
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// One `paravisor run` of the test guest in benchmark mode, its state and platform in `dir`:
/// (service, in-thread cycles, first line, whole run).
fn one_run(
    run_manifest: &Path,
    dir: &Path,
    exits: u64,
) -> std::io::Result<(u64, u64, Duration, Duration)> {
    // No TPM front ends: without `--listen` the run binds no port.
    let log = dir.join("paravisor.log");
    let started = Instant::now();
    let mut child = Command::new(microkernel::cli::paravisor())
        .arg("run")
        .arg(run_manifest)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--platform-dir")
        .arg(dir.join("platform"))
        .arg("--cmdline")
        .arg(format!("bench={exits} tpm=0 interrupt=0 unowned=0 nvme=0"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| err("no stdout"))?;
    let mut first_line = None;
    let mut bench_line = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        // The console reaches stdout as intercept's output, tagged "intercept | ".
        let line = match line.split_once(" | ") {
            Some((_, text)) => text.to_string(),
            None => line,
        };
        if first_line.is_none() && line.starts_with("guest:") {
            first_line = Some(started.elapsed());
        }
        if line.starts_with("guest: bench") {
            bench_line = Some(line);
        }
    }
    let status = child.wait()?;
    let whole = started.elapsed();
    if !status.success() {
        return Err(err(format!(
            "paravisor run exited with {status}; its log ends:\n{}",
            log_tail(&log)
        )));
    }
    let line = bench_line.ok_or_else(|| err("the guest printed no bench line"))?;
    // "guest: bench N port reads each: service (intercept) S cycles/exit, in-thread T cycles/exit, ratio R"
    let number_after = |key: &str| -> Option<u64> {
        let rest = &line[line.find(key)? + key.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    let service = number_after("service (intercept) ").ok_or_else(|| err(&line))?;
    let in_thread = number_after("in-thread ").ok_or_else(|| err(&line))?;
    Ok((service, in_thread, first_line.unwrap_or(whole), whole))
}

/// One run of the NVMe passes (`nvme-dbbuf=shadow`): the guest's cycles per pass.
fn nvme_run(run_manifest: &Path, dir: &Path, passes: u64, shadow: bool) -> std::io::Result<u64> {
    let log = dir.join("paravisor-nvme.log");
    let out = Command::new(microkernel::cli::paravisor())
        .arg("run")
        .arg(run_manifest)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--platform-dir")
        .arg(dir.join("platform"))
        .arg("--cmdline")
        .arg(format!(
            "tpm=0 interrupt=0 unowned=0 nvme=1 nvme-passes={passes} nvme-dbbuf={}",
            u8::from(shadow)
        ))
        .stderr(std::fs::File::create(&log)?)
        .output()?;
    let console = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || console.contains("FAIL") {
        return Err(err(format!(
            "the NVMe run failed ({}); its log ends:\n{}",
            out.status,
            log_tail(&log)
        )));
    }
    // "guest: nvme: N passes in C cycles, P cycles/pass"
    let shadowed = console.contains("nvme: shadow doorbells at");
    if shadowed != shadow {
        return Err(err(format!(
            "asked for {} doorbells, the guest used the other kind",
            if shadow { "shadow" } else { "plain" }
        )));
    }
    console
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once(" cycles, ")?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .ok_or_else(|| err("the guest printed no cycles per pass"))
}

/// Runs the benchmark in `dir` (a fresh directory of its own).
pub fn run(manifest: &Path, dir: &Path, quick: bool) -> std::io::Result<Report> {
    let (runs, exits) = if quick { (1, 400) } else { (5, 4000) };
    let run_manifest = dir.join("manifest.toml");
    std::fs::write(&run_manifest, std::fs::read_to_string(manifest)?)?;
    let (_, _, provisioning, _) = one_run(&run_manifest, dir, exits)?;
    let mut service = Vec::new();
    let mut in_thread = Vec::new();
    let mut ratios = Vec::new();
    let mut first = Vec::new();
    let mut whole = Vec::new();
    for _ in 0..runs {
        let (s, t, f, w) = one_run(&run_manifest, dir, exits)?;
        service.push(s);
        in_thread.push(t);
        ratios.push(s as f64 / t.max(1) as f64);
        first.push(f.as_secs_f64() * 1e3);
        whole.push(w.as_secs_f64() * 1e3);
    }
    // Plain and shadow runs in turn, so that a busy spell hits both alike.
    let nvme_passes = if quick { 2 } else { 20 };
    let (mut plain, mut shadow, mut nvme_ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let p = nvme_run(&run_manifest, dir, nvme_passes, false)?;
        let s = nvme_run(&run_manifest, dir, nvme_passes, true)?;
        plain.push(p);
        shadow.push(s);
        nvme_ratios.push(s as f64 / p.max(1) as f64);
    }
    Ok(Report {
        runs,
        exits_per_path: exits,
        service_cycles: median(service),
        in_thread_cycles: median(in_thread),
        ratio: median(ratios),
        first_line_ms: median(first),
        whole_run_ms: median(whole),
        provisioning_run_first_line_ms: provisioning.as_secs_f64() * 1e3,
        nvme_passes,
        nvme_plain_cycles_per_pass: median(plain),
        nvme_shadow_cycles_per_pass: median(shadow),
        nvme_ratio: median(nvme_ratios),
    })
}

pub fn text(r: &Report) -> String {
    format!(
        "guest port-I/O exit round trip, timed by the guest (rdtsc), median of {} runs of {} exits per path\n\
         \x20 answered by a device service (intercept, its own process): {:>8} cycles/exit\n\
         \x20 answered in the vCPU thread (no IPC, baseline):          {:>8} cycles/exit\n\
         \x20 ratio service / in-thread: {:.2}x (target <= 1.5x: {})\n\
         `paravisor run` to the guest's first console line: {:.0} ms (whole run {:.0} ms; \
         platform and state provisioned before, by a first run not counted: {:.0} ms)\n\
         NVMe function (storage), {} write-flush-verify passes per run, cycles/pass timed by the guest, median of {} runs\n\
         \x20 plain doorbells (each an exit storage answers, baseline): {:>12}\n\
         \x20 shadow doorbells (I/O doorbells as ioeventfd signals):    {:>12}\n\
         \x20 ratio shadow / plain: {:.2}x\n",
        r.runs,
        r.exits_per_path,
        r.service_cycles,
        r.in_thread_cycles,
        r.ratio,
        if r.ratio <= 1.5 { "met" } else { "NOT met" },
        r.first_line_ms,
        r.whole_run_ms,
        r.provisioning_run_first_line_ms,
        r.nvme_passes,
        r.runs,
        r.nvme_plain_cycles_per_pass,
        r.nvme_shadow_cycles_per_pass,
        r.nvme_ratio
    )
}
