//! `paravisor bench storage`: our storage service (pv-storage, vhost-user-blk) against
//! QEMU's own vhost-user-blk server, `qemu-storage-daemon`, in the same run, under a Linux
//! guest's fio ([`crate::bench_storage_guest`]); the same requests without a guest
//! ([`crate::bench_storage_host`]); and what a `kill -9` of pv-storage costs a running guest
//! ([`crate::bench_storage_restart`]). This module holds what they share: the bench's
//! manifests (the shipped one with its blk disk raw or encrypted, and a restart policy for
//! the kills), the paravisor instances and qemu-storage-daemon, booting the guest, parsing
//! fio's terse lines.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use crate::bench_storage_guest::GuestReport;
use crate::bench_storage_host::HostReport;
use crate::bench_storage_restart::RestartReport;
use crate::bench_vtpm::Guard;
use crate::linux_guest;
use crate::linux_guest::GuestFile;
use crate::linux_guest::Image;

/// Bytes of every disk compared: the shipped manifest's blk disk (`size=256M`).
pub const DISK_BYTES: u64 = 256 << 20;
/// The shipped manifest's blk `--device`, and the listener the bench asks for.
const SHIPPED_BLK_DEVICE: &str =
    "vhost-user-blk,listen=vhost-user-blk,file=blk-image,encrypted,size=256M";
const BLK_LISTENER: &str = "vhost-user-blk";
/// Guest RAM: the harness's default (fio and the 90 MB initramfs fit with room).
pub(crate) const GUEST_MEMORY_MIB: u64 = 512;
/// How long a paravisor may take to have its storage service running (a first start makes
/// the simulated platform's keys: seconds on a busy machine).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines the guest prints for the person watching (echoed to stderr).
pub const PROGRESS: &str = "bench storage:";

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    /// Rounds of every fio job on every disk (and of the host comparison).
    pub rounds: usize,
    /// fio's `ramp_time` and `runtime` per job in the guest.
    pub guest_ramp: Duration,
    pub guest_run: Duration,
    /// The same for each sample without a guest.
    pub host_ramp: Duration,
    pub host_run: Duration,
    /// `kill -9`s of pv-storage under the guest's steady I/O.
    pub kills: usize,
}

impl Effort {
    /// The default: under 5 minutes on a 2-core machine (5 rounds of 6 jobs on 3 disks,
    /// 0.5 s ramp and 1.5 s each: 3 minutes of fio; 10 kills 2.5 s apart). Many short
    /// samples rather than a few long ones: on a shared machine the others' load changes
    /// within seconds, and the median of five side-by-side ratios shrugs off two bad ones.
    pub const FULL: Effort = Effort {
        rounds: 5,
        guest_ramp: Duration::from_millis(500),
        guest_run: Duration::from_millis(1500),
        host_ramp: Duration::from_millis(200),
        host_run: Duration::from_millis(500),
        kills: 10,
    };
    /// A smoke run (`--quick`): one short round, two kills.
    pub const QUICK: Effort = Effort {
        rounds: 1,
        guest_ramp: Duration::from_millis(300),
        guest_run: Duration::from_millis(700),
        host_ramp: Duration::from_millis(100),
        host_run: Duration::from_millis(300),
        kills: 2,
    };
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub in_guest: Option<GuestReport>,
    /// Why the in-guest comparison and the restart did not run, if they did not.
    pub guest_skipped: Option<String>,
    pub host: HostReport,
    pub restart: Option<RestartReport>,
}

pub(crate) fn err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The median (the upper one of an even count); 0 for none.
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The median of the pairwise ratios `a[i] / b[i]` (samples taken side by side).
pub(crate) fn median_ratio(a: &[f64], b: &[f64]) -> f64 {
    median(a.iter().zip(b).map(|(x, y)| x / y).collect())
}

/// The fields of one fio terse (version 3) line that the bench reads.
#[derive(Debug, Clone, PartialEq)]
pub struct FioResult {
    pub job: String,
    pub read_iops: f64,
    pub read_kib_per_second: f64,
    pub write_iops: f64,
    pub write_kib_per_second: f64,
}

/// Parses a terse v3 line: field 3 the job's name, 5 its error, 7 and 8 the read bandwidth
/// (KiB/s) and IOPS, 48 and 49 the write bandwidth and IOPS (fio's HOWTO, "Terse output").
pub fn fio_terse(line: &str) -> Result<FioResult, String> {
    let f: Vec<&str> = line.split(';').collect();
    if f.first() != Some(&"3") || f.len() < 50 {
        return Err(format!("not a terse v3 line of fio: {line:?}"));
    }
    let num = |i: usize| -> Result<f64, String> {
        f[i - 1]
            .parse()
            .map_err(|_| format!("field {i} of fio's terse line is {:?}: {line:?}", f[i - 1]))
    };
    if f[4] != "0" {
        return Err(format!("fio job {} failed with error {}", f[2], f[4]));
    }
    Ok(FioResult {
        job: f[2].to_string(),
        read_kib_per_second: num(7)?,
        read_iops: num(8)?,
        write_kib_per_second: num(48)?,
        write_iops: num(49)?,
    })
}

/// The shipped manifest's text for the bench: its blk disk raw (`encrypted` dropped) or as
/// shipped, and pv-storage's restart policy `restart` (the restart row kills it ten times).
pub fn storage_manifest(shipped: &str, encrypted: bool, restart: &str) -> Result<String, String> {
    if shipped.matches(SHIPPED_BLK_DEVICE).count() != 1 {
        return Err(format!(
            "the manifest has no storage device \"{SHIPPED_BLK_DEVICE}\": the bench compares \
             disks of that size and listener (update bench_storage.rs with the manifest)"
        ));
    }
    let device = if encrypted {
        SHIPPED_BLK_DEVICE.to_string()
    } else {
        SHIPPED_BLK_DEVICE.replace(",encrypted", "")
    };
    let text = shipped.replace(SHIPPED_BLK_DEVICE, &device);
    with_restart_policy(&text, "storage", restart)
}

/// `text` (a manifest) with the `restart = ` line of service `service` replaced by `restart`
/// (the restart rows kill the service ten times: more than the shipped policy allows).
pub(crate) fn with_restart_policy(
    text: &str,
    service: &str,
    restart: &str,
) -> Result<String, String> {
    // The service's section: from its name to the next table (a service or a metal task).
    let start = text
        .find(&format!("name = \"{service}\""))
        .ok_or(format!("the manifest has no service named \"{service}\""))?;
    let end = text[start..].find("\n[[").map_or(text.len(), |e| start + e);
    let section = &text[start..end];
    let line_at = section
        .find("\nrestart = ")
        .ok_or(format!("the {service} service has no `restart = ` line"))?
        + 1;
    let line_end = section[line_at..]
        .find('\n')
        .map_or(section.len(), |e| line_at + e);
    Ok(format!(
        "{}restart = {restart}{}",
        &text[..start + line_at],
        &text[start + line_end..]
    ))
}

/// A paravisor running the storage service on `listen` only.
pub struct Instance {
    pub guard: Guard,
    pub state: PathBuf,
    pub dir: PathBuf,
}

impl Instance {
    /// `paravisor run --no-guest` of `text` in `dir` (made here), serving pv-storage's blk
    /// disk; returns once pv-storage runs.
    pub fn start(text: &str, dir: &Path) -> std::io::Result<Instance> {
        let (guard, state) = crate::bench_vtpm::start_instance(text, dir, &[BLK_LISTENER])?;
        let mut instance = Instance {
            guard,
            state,
            dir: dir.to_path_buf(),
        };
        instance.storage_pid(None, Instant::now() + START_TIMEOUT)?;
        Ok(instance)
    }

    /// The socket QEMU connects to (the microkernel binds it for `--listen vhost-user-blk`).
    pub fn socket(&self) -> PathBuf {
        self.state.join("storage/vhost-user-blk.sock")
    }

    /// pv-storage's pid once it runs (and is not `not`), waiting until `deadline`.
    pub fn storage_pid(&mut self, not: Option<i32>, deadline: Instant) -> std::io::Result<i32> {
        use microkernel::control::Command as Control;
        use microkernel::control::Reply;
        loop {
            if let Ok(Reply::Ps { services, .. }) =
                microkernel::control::send(&self.state, &Control::Ps)
            {
                let storage = services.iter().find(|s| s.name == "storage");
                if let Some(pid) = storage
                    .filter(|s| s.state == "running")
                    .and_then(|s| s.pid)
                    .filter(|p| Some(*p) != not)
                {
                    if self.socket().exists() {
                        return Ok(pid);
                    }
                }
            }
            if let Some(status) = self.guard.exited() {
                return Err(err(format!(
                    "paravisor run exited with {status}; its log ends:\n{}",
                    crate::bench_guest::log_tail(&self.dir.join("paravisor.log"))
                )));
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "pv-storage was not running in time; the log ends:\n{}",
                    crate::bench_guest::log_tail(&self.dir.join("paravisor.log"))
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// `program` in a session of its own (`setsid`, which execs it: the pid is the program's).
///
/// With the scheduler's autogroups (on by default) CPU time is shared between sessions
/// before threads: every process the comparison times gets a session of its own, as
/// pv-storage has (the microkernel makes each service a session leader). Left in the
/// bench's session, qemu-storage-daemon shared QEMU's group and woke on the vCPU thread's
/// CPU at once: it did 6349 random reads a second at iodepth 16 against ours' 3426, and
/// 3420 against 3815 in a session of its own, in two runs side by side.
pub(crate) fn own_session(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new("setsid");
    cmd.arg(program);
    cmd
}

/// qemu-storage-daemon serving the raw file `image` as a writable vhost-user-blk disk on
/// `socket` (its defaults otherwise: the page cache, `aio=threads`, the main loop); returns
/// once the socket listens.
pub(crate) fn storage_daemon(image: &Path, socket: &Path, log: &Path) -> std::io::Result<Guard> {
    let log_file = std::fs::File::create(log)?;
    let child = own_session("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=file0,filename={}",
            image.display()
        ))
        .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .map_err(|e| err(format!("setsid qemu-storage-daemon: {e}")))?;
    let mut guard = Guard::process(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        let said = || std::fs::read_to_string(log).unwrap_or_default();
        if let Some(status) = guard.exited() {
            return Err(err(format!(
                "qemu-storage-daemon ended ({status}):\n{}",
                said()
            )));
        }
        if Instant::now() > deadline {
            return Err(err(format!(
                "qemu-storage-daemon made no {} in 30 s:\n{}",
                socket.display(),
                said()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(guard)
}

/// QEMU's arguments for a vhost-user-blk disk on `socket` in PCI slot `slot`, reconnecting
/// to a back end that died (`reconnect=1`: a second after the disconnection).
pub fn blk_device(id: &str, socket: &Path, slot: u8) -> [String; 4] {
    [
        "-chardev".into(),
        format!("socket,id={id},path={},reconnect=1", socket.display()),
        "-device".into(),
        format!("vhost-user-blk-pci,chardev={id},addr={slot:#x}"),
    ]
}

/// Boots the guest with `devices` and `files` (a script among them); its console followed.
pub fn boot(
    image: &Image,
    dir: &Path,
    name: &str,
    devices: &[String],
    files: &[GuestFile],
) -> std::io::Result<linux_guest::Running> {
    let initrd = dir.join(format!("{name}-initrd.img"));
    linux_guest::initrd_with(&image.initrd, files, &initrd)?;
    let qemu = linux_guest::qemu_command(&linux_guest::Machine {
        image,
        initrd: &initrd,
        memory_mib: GUEST_MEMORY_MIB,
        cpus: 1,
        accel: linux_guest::Accel::from_env().map_err(err)?,
        kernel_args: linux_guest::KERNEL_ARGS,
    });
    let mut cmd = own_session(qemu.get_program());
    cmd.args(qemu.get_args()).args(devices);
    linux_guest::Running::spawn(cmd, &dir.join(format!("{name}-qemu.log")), PROGRESS)
}

/// Everything `bench storage` measures, in `dir` (a fresh directory of its own): the host
/// comparison first (no guest needed), then the guest rows and the restart, which need the
/// image (`image_script` builds it) and QEMU.
pub fn run(
    manifest: &Path,
    dir: &Path,
    image_script: &Path,
    effort: Effort,
) -> std::io::Result<Report> {
    let shipped = std::fs::read_to_string(manifest)?;
    let restart = crate::bench_storage_restart::RESTART_POLICY;
    let raw_text = storage_manifest(&shipped, false, restart).map_err(err)?;
    let encrypted_text = storage_manifest(&shipped, true, restart).map_err(err)?;
    eprintln!("{PROGRESS} without a guest: pv-storage's back end in-process against fio");
    let host =
        crate::bench_storage_host::run(dir, effort.rounds, effort.host_ramp, effort.host_run)?;
    let image = match linux_guest::build_image(image_script) {
        Ok(image) => image,
        Err(linux_guest::ImageError::Unavailable(why)) => {
            return Ok(Report {
                in_guest: None,
                guest_skipped: Some(why),
                host,
                restart: None,
            })
        }
        Err(e) => return Err(err(e)),
    };
    if !linux_guest::runs("qemu-storage-daemon") {
        return Ok(Report {
            in_guest: None,
            guest_skipped: Some(
                "qemu-storage-daemon is not installed (apt-get install qemu-system-x86): no \
                 baseline for the guest rows"
                    .into(),
            ),
            host,
            restart: None,
        });
    }
    eprintln!("{PROGRESS} starting two paravisors (pv-storage raw, and encrypted)");
    // Short directory names: the sockets (DIR/raw/state/storage/vhost-user-blk.sock) must
    // stay under Unix sockets' 108 bytes with a `--dir` a few levels deep.
    let mut raw = Instance::start(&raw_text, &dir.join("raw"))?;
    let mut encrypted = Instance::start(&encrypted_text, &dir.join("enc"))?;
    eprintln!(
        "{PROGRESS} in the guest: fio on our raw, our encrypted and qemu-storage-daemon's disks"
    );
    let in_guest = crate::bench_storage_guest::run(&image, dir, &mut raw, &mut encrypted, &effort)?;
    drop(raw);
    eprintln!("{PROGRESS} restart: kill -9 of pv-storage under the guest's steady reads");
    let restart = crate::bench_storage_restart::run(&image, dir, &mut encrypted, effort.kills)?;
    Ok(Report {
        in_guest: Some(in_guest),
        guest_skipped: None,
        host,
        restart: Some(restart),
    })
}

pub fn text(r: &Report) -> String {
    let mut out = match (&r.in_guest, &r.guest_skipped) {
        (Some(g), _) => crate::bench_storage_guest::text(g),
        (None, why) => format!(
            "Storage in a Linux guest: SKIPPED: {}\n",
            why.as_deref().unwrap_or("not run")
        ),
    };
    out.push_str(&crate::bench_storage_host::text(&r.host));
    match &r.restart {
        Some(restart) => out.push_str(&crate::bench_storage_restart::text(restart)),
        None => out.push_str("Restart under a guest: SKIPPED (no guest, see above)\n"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terse_line_gives_its_job_and_rates_and_a_failed_job_is_an_error() {
        let mut fields = vec!["0"; 130];
        fields[0] = "3";
        fields[1] = "fio-3.33";
        fields[2] = "r1-randread-qd1-raw";
        fields[6] = "12000";
        fields[7] = "3000";
        fields[47] = "400";
        fields[48] = "100";
        let line = fields.join(";");
        let r = fio_terse(&line).unwrap();
        assert_eq!(r.job, "r1-randread-qd1-raw");
        assert_eq!((r.read_kib_per_second, r.read_iops), (12000.0, 3000.0));
        assert_eq!((r.write_kib_per_second, r.write_iops), (400.0, 100.0));
        fields[4] = "5";
        assert!(fio_terse(&fields.join(";"))
            .unwrap_err()
            .contains("error 5"));
        assert!(fio_terse("2;fio-3.33;x").is_err());
        assert!(fio_terse("3;fio;x;0;0;abc").is_err());
    }

    #[test]
    fn the_bench_manifests_differ_from_the_shipped_one_only_where_meant() {
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest.toml"))
                .unwrap();
        let policy = "{ policy = \"on-failure\", max = 100, window = \"1s\", backoff = \"50ms\" }";
        let raw = storage_manifest(&shipped, false, policy).unwrap();
        let enc = storage_manifest(&shipped, true, policy).unwrap();
        assert!(raw.contains("vhost-user-blk,listen=vhost-user-blk,file=blk-image,size=256M"));
        assert!(!raw.contains("file=blk-image,encrypted"));
        assert!(enc.contains(SHIPPED_BLK_DEVICE));
        // The SCSI disk, and every other service's restart policy, are untouched.
        assert!(raw.contains("file=scsi-image,encrypted,size=256M"));
        for text in [&raw, &enc] {
            assert_eq!(text.matches("max = 100").count(), 1, "{text}");
            assert_eq!(
                text.matches("restart = ").count(),
                shipped.matches("restart = ").count()
            );
            let storage = &text[text.find("name = \"storage\"").unwrap()..];
            let storage = &storage[..storage.find("\n[[").unwrap_or(storage.len())];
            assert!(
                storage.contains(&format!("restart = {policy}\n")),
                "{storage}"
            );
        }
        assert!(storage_manifest("name = \"storage\"\n", false, policy).is_err());
    }
}
