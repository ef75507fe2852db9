//! `paravisor metal run`: boots a metal image, shows its log decoded as it comes, and ends
//! with the kernel's exit status.
//!
//! - QEMU (TCG, PVH `-kernel`, `-cpu max` for RDRAND): the portable way; COM1 is QEMU's
//!   standard output, and the kernel's status comes back through `isa-debug-exit` as
//!   `2 * status + 1`.
//! - our own partition (`paravisor run --guest IMAGE`, KVM): the kernel enters at its ELF
//!   entry with `mem=` MiB of RAM; the console's lines carry the partition's prefix, and the
//!   run's exit status is the kernel's.

use std::io::BufReader;
use std::io::Read;
use std::io::Write;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use super::log::LogDecoder;
use super::log::LogError;

/// The QEMU that boots images.
pub const QEMU: &str = "qemu-system-x86_64";
/// The debug-exit port the kernel writes its status to (as QEMU's `isa-debug-exit`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// RAM of a QEMU run unless told: what the kernel's tests boot with.
pub const DEFAULT_QEMU_MIB: u32 = 128;
/// RAM of a partition run unless told: the partition's default for a test guest.
pub const DEFAULT_PARTITION_MIB: u32 = 64;

/// What runs the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Vmm {
    /// QEMU, TCG, PVH boot.
    Qemu,
    /// Our own partition (`paravisor run --guest`; needs /dev/kvm).
    Partition,
}

#[derive(Debug)]
pub struct RunOptions {
    pub image: PathBuf,
    pub vmm: Vmm,
    /// RAM in MiB (default per [`Vmm`]).
    pub memory: Option<u32>,
    /// More of the kernel's command line.
    pub cmdline: String,
    /// For the partition: the manifest `paravisor run` reads (default: manifest.toml here).
    pub manifest: Option<PathBuf>,
    /// Show the frames as they are instead of decoding them.
    pub raw: bool,
    /// Give up (and stop the VM) after this long.
    pub timeout: Option<Duration>,
}

/// Why the run gave no status.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("no image at {0}: build one with `paravisor metal build`, or pass --image")]
    NoImage(String),
    #[error("{0}")]
    Log(#[from] LogError),
    #[error("cannot start {what}: {source}{hint}")]
    Start {
        what: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{QEMU} failed ({status}): {stderr}")]
    Qemu { status: String, stderr: String },
    #[error("the VM ended without the kernel's status ({how}): a reset or a triple fault")]
    NoStatus { how: String },
    #[error("the kernel did not end within {0} s; the VM was stopped")]
    TimedOut(u64),
    #[error("cannot wait for the VM: {0}")]
    Wait(std::io::Error),
}

/// Boots the image; its console, decoded, goes to `out`. The kernel's exit status.
pub fn run(opts: &RunOptions, out: impl Write + Send + 'static) -> Result<u8, RunError> {
    if !opts.image.is_file() {
        return Err(RunError::NoImage(opts.image.display().to_string()));
    }
    let decoder = match opts.raw {
        true => None,
        false => Some(LogDecoder::open(&opts.image)?),
    };
    let mut child = match opts.vmm {
        Vmm::Qemu => qemu(opts)?,
        Vmm::Partition => partition(opts)?,
    };
    let console = child.stdout.take();
    let errors = child.stderr.take();
    let shown = std::thread::spawn(move || show(console, decoder, out));
    // QEMU's own complaints, kept to explain a failure; the partition's log passes through.
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut e) = errors {
            let _ = e.read_to_string(&mut text);
        }
        text
    });
    let status = wait(&mut child, opts.timeout)?;
    let _ = shown.join();
    let stderr = stderr.join().unwrap_or_default();
    match opts.vmm {
        Vmm::Qemu => qemu_status(status, &stderr),
        Vmm::Partition => match status.code() {
            Some(code) => Ok(u8::try_from(code).unwrap_or(u8::MAX)),
            None => Err(RunError::NoStatus {
                how: status.to_string(),
            }),
        },
    }
}

/// The kernel's status from QEMU's: `isa-debug-exit` makes it `2 * status + 1`; QEMU's own
/// failures exit 1 too, and say so on standard error.
fn qemu_status(status: std::process::ExitStatus, stderr: &str) -> Result<u8, RunError> {
    match status.code() {
        Some(code) if code % 2 == 1 && !stderr.contains(&format!("{QEMU}:")) => {
            Ok(u8::try_from(code / 2).unwrap_or(u8::MAX))
        }
        Some(0) => Err(RunError::NoStatus {
            how: "QEMU exited 0".into(),
        }),
        _ => Err(RunError::Qemu {
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        }),
    }
}

fn qemu(opts: &RunOptions) -> Result<Child, RunError> {
    let memory = opts.memory.unwrap_or(DEFAULT_QEMU_MIB);
    Command::new(QEMU)
        // `max`: the CPU TCG emulates best, with RDRAND (the VMGS task's random source).
        .args(["-machine", "q35", "-accel", "tcg", "-cpu", "max", "-m"])
        .arg(memory.to_string())
        .args(["-nodefaults", "-no-reboot", "-display", "none", "-kernel"])
        .arg(&opts.image)
        .arg("-append")
        .arg(&opts.cmdline)
        .args(["-serial", "stdio", "-device"])
        .arg(format!(
            "isa-debug-exit,iobase={DEBUG_EXIT_PORT:#x},iosize=4"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RunError::Start {
            what: QEMU.into(),
            source,
            hint: " (install it: apt-get install qemu-system-x86)",
        })
}

fn partition(opts: &RunOptions) -> Result<Child, RunError> {
    let memory = opts.memory.unwrap_or(DEFAULT_PARTITION_MIB);
    let paravisor = microkernel::cli::paravisor();
    let mut cmd = Command::new(&paravisor);
    cmd.arg("run");
    if let Some(m) = &opts.manifest {
        cmd.arg(m);
    }
    let cmdline = format!("mem={memory} {}", opts.cmdline);
    cmd.arg("--guest")
        .arg(&opts.image)
        .arg("--cmdline")
        .arg(cmdline.trim())
        .arg("--memory")
        .arg(memory.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| RunError::Start {
            what: paravisor.display().to_string(),
            source,
            hint: " (it ships next to pv-tools)",
        })
}

/// Copies the console to `out`, each line decoded (or raw).
fn show(console: Option<impl Read>, decoder: Option<LogDecoder>, mut out: impl Write) {
    let Some(console) = console else {
        return;
    };
    let console = BufReader::new(console);
    match decoder {
        Some(d) => {
            let _ = d.stream(console, out);
        }
        None => {
            let mut console = console;
            let _ = std::io::copy(&mut console, &mut out);
        }
    }
}

/// Waits for the VM, stopping it after `timeout`.
fn wait(
    child: &mut Child,
    timeout: Option<Duration>,
) -> Result<std::process::ExitStatus, RunError> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(RunError::Wait)? {
            return Ok(status);
        }
        if let Some(limit) = timeout {
            if started.elapsed() >= limit {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunError::TimedOut(limit.as_secs()));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
