//! `paravisor bench boot`: how long an unmodified Linux takes to its first line from user
//! space under `paravisor run --vmm qemu` (QEMU on our vTPM, disk and NIC) against plain QEMU
//! with its built-in devices and swtpm (virtio-blk on a raw file, user-mode virtio-net, swtpm
//! on a Unix socket), in the same run: the same firmware (UEFI, measured boot into each TPM),
//! kernel, initrd, command line, memory and accelerator, each side from a fresh state (a new
//! TPM, a new variable store), alternating ours and theirs round by round.
//!
//! The time is from starting the side's processes (the paravisor; swtpm and QEMU) to the
//! console line the guest's test script prints first (after /init mounted its file systems
//! and loaded its modules); the report holds each round, the medians and their ratio.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use crate::bench_storage::err;
use crate::bench_storage::median;
use crate::bench_vtpm::Guard;
use crate::linux_guest;
use crate::linux_guest::GuestFile;
use crate::linux_guest::Running;
use microkernel::host_vmm;

/// Lines for the person watching.
pub const PROGRESS: &str = "bench boot:";
/// The guest script's first line: the end of the measured boot.
const MARK: &str = "pv-bench-boot: user space";
/// The kernel's command line on both sides.
const CMDLINE: &str = "console=ttyS0 quiet loglevel=4 panic=-1";
/// Longest a boot may take before it is declared hung (OVMF under TCG hashes the initrd for
/// ~15 s on this kind of machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// The baseline's disk (the paravisor's is the shipped manifest's 256 MiB).
const DISK_MIB: u64 = 256;

#[derive(Debug, Serialize)]
pub struct Report {
    pub accel: String,
    pub firmware: String,
    pub initrd_bytes: u64,
    /// Seconds to the first user-space line, per round.
    pub ours_secs: Vec<f64>,
    pub qemu_secs: Vec<f64>,
    pub ours_median: f64,
    pub qemu_median: f64,
    /// ours / QEMU's.
    pub ratio: f64,
}

/// One side's boot, from `started` to the mark.
fn time_to_mark(mut running: Running, started: Instant, side: &str) -> std::io::Result<f64> {
    running.line_with(MARK, started + BOOT_TIMEOUT)?;
    let secs = started.elapsed().as_secs_f64();
    let status = running.exit_status(Instant::now() + BOOT_TIMEOUT)?;
    if status != 0 {
        return Err(err(format!(
            "{side}: the guest's script ended with {status}"
        )));
    }
    eprintln!("{PROGRESS} {side}: {secs:.2} s to the first user-space line");
    Ok(secs)
}

fn config(image: &linux_guest::Image, initrd: &Path) -> host_vmm::QemuConfig {
    host_vmm::QemuConfig {
        qemu: PathBuf::from(host_vmm::DEFAULT_QEMU),
        accel: host_vmm::Accel::Auto,
        firmware: Some(PathBuf::from(host_vmm::DEFAULT_FIRMWARE)),
        kernel: image.kernel.clone(),
        initrd: Some(initrd.to_path_buf()),
        cmdline: CMDLINE.into(),
        memory_mib: host_vmm::DEFAULT_MEMORY_MIB,
        vcpus: 1,
        disks: None,
        nics: None,
        extra: Vec::new(),
    }
}

/// `paravisor run --vmm qemu` in `dir` (a fresh state directory).
fn ours(
    paravisor: &Path,
    manifest: &Path,
    platform: &Path,
    c: &host_vmm::QemuConfig,
    dir: &Path,
) -> std::io::Result<f64> {
    std::fs::create_dir_all(dir)?;
    let mut cmd = Command::new(paravisor);
    cmd.arg("run")
        .arg(manifest)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--platform-dir")
        .arg(platform)
        .args(["--vmm", "qemu", "--kernel"])
        .arg(&c.kernel)
        .arg("--initrd")
        .arg(c.initrd.as_deref().unwrap_or(Path::new("")))
        .args(["--cmdline", &c.cmdline])
        .env("RUST_LOG", "warn");
    let started = Instant::now();
    time_to_mark(
        Running::spawn(cmd, &dir.join("paravisor.log"), PROGRESS)?,
        started,
        "ours",
    )
}

/// swtpm and QEMU with its own devices, in `dir`.
fn theirs(c: &host_vmm::QemuConfig, dir: &Path) -> std::io::Result<f64> {
    std::fs::create_dir_all(dir.join("tpm"))?;
    let code = c.firmware.as_deref().unwrap_or(Path::new(""));
    let template = host_vmm::vars_template(code)
        .ok_or_else(|| err(format!("no variable store next to {}", code.display())))?;
    let vars = dir.join("uefi-vars.fd");
    std::fs::copy(&template, &vars)?;
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)?.set_len(DISK_MIB << 20)?;
    let socket = dir.join("tpm/swtpm-sock");
    let started = Instant::now();
    let swtpm = Command::new("swtpm")
        .args(["socket", "--tpm2", "--tpmstate"])
        .arg(format!("dir={}", dir.join("tpm").display()))
        .arg("--ctrl")
        .arg(format!("type=unixio,path={}", socket.display()))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("swtpm.log"))?)
        .spawn()
        .map_err(|e| err(format!("swtpm: {e} (apt-get install swtpm)")))?;
    let _swtpm = Guard::process(swtpm);
    while !socket.exists() {
        if started.elapsed() > Duration::from_secs(30) {
            return Err(err("swtpm made no socket in 30 s"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut args = host_vmm::base_args(c, Some(&vars)).map_err(err)?;
    for a in [
        "-chardev".into(),
        format!("socket,id=tpm,path={}", socket.display()),
        "-tpmdev".into(),
        "emulator,id=tpm0,chardev=tpm".into(),
        "-device".into(),
        "tpm-crb,tpmdev=tpm0".into(),
        "-drive".into(),
        format!("if=none,id=disk0,format=raw,file={}", disk.display()),
        "-device".into(),
        "virtio-blk-pci,drive=disk0".into(),
        "-netdev".into(),
        "user,id=net0".into(),
        "-device".into(),
        "virtio-net-pci,netdev=net0,romfile=".into(),
    ] {
        args.push(a);
    }
    let mut cmd = Command::new(&c.qemu);
    cmd.args(&args);
    // The clock started before swtpm: its start is part of this side's boot, as the
    // paravisor's services are part of ours.
    let running = Running::spawn(cmd, &dir.join("qemu.log"), PROGRESS)?;
    time_to_mark(running, started, "QEMU")
}

pub fn run(
    manifest: &Path,
    bin_dir: &Path,
    dir: &Path,
    image_script: &Path,
    quick: bool,
) -> std::io::Result<Report> {
    let firmware = Path::new(host_vmm::DEFAULT_FIRMWARE);
    if !firmware.is_file() {
        return Err(err(format!(
            "no UEFI firmware at {} (apt-get install ovmf)",
            firmware.display()
        )));
    }
    let image = linux_guest::build_image(image_script).map_err(err)?;
    let initrd = dir.join("initrd.img");
    linux_guest::initrd_with(
        &image.initrd,
        &[GuestFile::script(&format!("echo '{MARK}'; exit 0"))],
        &initrd,
    )?;
    let c = config(&image, &initrd);
    let paravisor = bin_dir.join("paravisor");
    let platform = dir.join("platform");
    // The simulated platform is made once, outside the timed boots.
    crate::provision::init(&platform).map_err(err)?;
    let rounds = if quick { 1 } else { 3 };
    let (mut ours_secs, mut qemu_secs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        eprintln!("{PROGRESS} round {} of {rounds}", round + 1);
        ours_secs.push(ours(
            &paravisor,
            manifest,
            &platform,
            &c,
            &dir.join(format!("ours-{round}")),
        )?);
        qemu_secs.push(theirs(&c, &dir.join(format!("qemu-{round}")))?);
    }
    let (ours_median, qemu_median) = (median(ours_secs.clone()), median(qemu_secs.clone()));
    Ok(Report {
        accel: format!("{:?}", c.resolved_accel()).to_lowercase(),
        firmware: firmware.display().to_string(),
        initrd_bytes: std::fs::metadata(&initrd)?.len(),
        ours_secs,
        qemu_secs,
        ours_median,
        qemu_median,
        ratio: ours_median / qemu_median,
    })
}

pub fn text(r: &Report) -> String {
    let list = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "boot to the first user-space line ({}, {}, initrd {} MB), medians:\n\
         \x20 paravisor run --vmm qemu  {:>7.2} s   ({})\n\
         \x20 QEMU + swtpm              {:>7.2} s   ({})\n\
         \x20 ratio ours/QEMU           {:>7.2}x\n",
        r.accel,
        r.firmware,
        r.initrd_bytes / 1_000_000,
        r.ours_median,
        list(&r.ours_secs),
        r.qemu_median,
        list(&r.qemu_secs),
        r.ratio
    )
}
