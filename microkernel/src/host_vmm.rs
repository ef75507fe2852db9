//! `paravisor run --vmm qemu`: an unmodified guest under QEMU, the host's VMM, with the
//! paravisor's services as its devices (the vTPM on QEMU's swtpm socket, disks and NIC on
//! vhost-user sockets).
//!
//! QEMU stands where the untrusted host VMM stands (ARCHITECTURE.md §6): it is not measured
//! with the paravisor and gets nothing but the sockets named here, which the microkernel
//! bound in the state directory (0700) before QEMU starts; no secret passes through it. The
//! launch log records how it was started ([`HostVmmRecord`], outside the measurement).
//!
//! The guest boots through UEFI (Debian's OVMF by default), which measures the firmware,
//! the kernel and, through the kernel's EFI stub, the command line and initrd into the
//! vTPM's PCRs (0-7 and 9): the measured boot a guest attests with.
//!
//! QEMU is spawned before the supervisor confines its threads (its seccomp filter would be
//! inherited through exec): its devices wait on the sockets' backlog until the services
//! answer. It dies with the paravisor (parent-death signal); a paravisor that stops stops it
//! first; a QEMU that ends ends the run. Its console (the guest's first serial port) is
//! copied to the paravisor's stdout (and reads the paravisor's stdin when that is a
//! terminal); a console line `PV-EXIT <status>` sets the run's exit
//! status (the convention of the guest image's /init).

use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use crate::listeners::Enabled;
use crate::manifest::ListenAddress;

/// The QEMU that runs unless `--qemu` names another (found in PATH).
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
/// Debian's OVMF (package `ovmf`): UEFI with TPM 2.0 measured boot, no secure-boot SMM.
pub const DEFAULT_FIRMWARE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Guest RAM unless `--memory` says otherwise.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// The kernel command line unless `--cmdline` says otherwise.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 panic=-1";
/// The listener QEMU's TPM connects to (the swtpm protocol on a Unix socket).
pub const TPM_LISTENER: &str = "swtpm-control-unix";
/// The console line that carries the guest's exit status.
pub const EXIT_MARKER: &str = "PV-EXIT ";
/// How long QEMU gets to exit after SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// Longest console line kept for the exit marker (the rest of a longer line is still
/// copied, only not looked at).
const MAX_LINE: usize = 4096;

/// How QEMU runs the guest's code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM where it boots a stock kernel (not KVM on PVM), else TCG.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// A device QEMU attaches on one of the paravisor's vhost-user listeners.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Attached {
    /// The listener (the manifest's name).
    pub listener: String,
    pub kind: DeviceKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceKind {
    /// virtio-blk (`vhost-user-blk-pci`), reconnecting when storage restarts.
    Blk,
    /// virtio-scsi (`vhost-user-scsi-pci`): QEMU 7.2 cannot reconnect it.
    Scsi,
    /// virtio-net (`vhost-user` netdev), reconnecting when net restarts.
    Net,
}

impl DeviceKind {
    /// The kind a listener's name says (`vhost-user-blk*`, `vhost-user-scsi*`,
    /// `vhost-user-net*`), if any.
    pub fn of_listener(name: &str) -> Option<DeviceKind> {
        if name.starts_with("vhost-user-blk") {
            Some(DeviceKind::Blk)
        } else if name.starts_with("vhost-user-scsi") {
            Some(DeviceKind::Scsi)
        } else if name.starts_with("vhost-user-net") {
            Some(DeviceKind::Net)
        } else {
            None
        }
    }
}

/// What `run --vmm qemu` boots, as the command line gives it.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    pub accel: Accel,
    /// UEFI code (pflash, read-only); `None`: QEMU's own default firmware (SeaBIOS).
    pub firmware: Option<PathBuf>,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    /// The vhost-user listeners of its disks; `None`: every vhost-user-blk listener the
    /// manifest declares.
    pub disks: Option<Vec<String>>,
    /// The vhost-user listeners of its NICs; `None`: every vhost-user-net listener.
    pub nics: Option<Vec<String>>,
    /// More QEMU arguments, after ours.
    pub extra: Vec<String>,
}

impl QemuConfig {
    /// The devices to attach, resolved against the manifest's listeners.
    pub fn attached(&self, m: &crate::manifest::Manifest) -> Result<Vec<Attached>, String> {
        let declared: Vec<&str> = m
            .services
            .iter()
            .flat_map(|s| s.listen.iter().map(|l| l.name.as_str()))
            .collect();
        let mut out = Vec::new();
        for (chosen, flag, kinds) in [
            (
                &self.disks,
                "--disk",
                &[DeviceKind::Blk, DeviceKind::Scsi][..],
            ),
            (&self.nics, "--nic", &[DeviceKind::Net][..]),
        ] {
            let names: Vec<String> = match chosen {
                // The default: every blk (not scsi: QEMU 7.2 cannot reconnect it) or net
                // listener.
                None => declared
                    .iter()
                    .filter(|n| DeviceKind::of_listener(n) == Some(kinds[0]))
                    .map(|n| n.to_string())
                    .collect(),
                Some(names) => names.clone(),
            };
            for name in names {
                if !declared.contains(&name.as_str()) {
                    return Err(format!(
                        "{flag} {name}: the manifest declares no listener of that name (it \
                         declares: {})",
                        declared.join(", ")
                    ));
                }
                match DeviceKind::of_listener(&name) {
                    Some(kind) if kinds.contains(&kind) => out.push(Attached {
                        listener: name,
                        kind,
                    }),
                    _ => {
                        return Err(format!(
                            "{flag} {name}: not a {} listener (vhost-user-{}...)",
                            if flag == "--nic" { "NIC" } else { "disk" },
                            if flag == "--nic" {
                                "net"
                            } else {
                                "blk or vhost-user-scsi"
                            }
                        ))
                    }
                }
            }
        }
        Ok(out)
    }

    /// The listeners the run must bind for QEMU: the TPM's and the devices'.
    pub fn listeners(&self, m: &crate::manifest::Manifest) -> Result<Vec<String>, String> {
        let mut names = vec![TPM_LISTENER.to_string()];
        names.extend(self.attached(m)?.into_iter().map(|a| a.listener));
        Ok(names)
    }

    /// The accelerator this machine gets for `Auto`.
    pub fn resolved_accel(&self) -> Accel {
        match self.accel {
            Accel::Auto if kvm_boots_linux() => Accel::Kvm,
            Accel::Auto => Accel::Tcg,
            a => a,
        }
    }
}

/// Whether QEMU's KVM can boot a stock kernel here: /dev/kvm is usable and is not KVM on
/// PVM (whose instruction emulator fails in a stock kernel's early boot).
fn kvm_boots_linux() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
        && !crate::partition::is_pvm()
}

/// How QEMU was started, for the launch log (not measured: QEMU is the host's).
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct HostVmmRecord {
    pub program: String,
    pub accel: String,
    pub args: Vec<String>,
}

/// QEMU's command line for `config`, with the listeners the supervisor bound in
/// `state_dir` (`enabled`) and the firmware's variable store at `vars`.
pub fn command_line(
    config: &QemuConfig,
    attached: &[Attached],
    enabled: &[Enabled],
    state_dir: &Path,
    vars: Option<&Path>,
) -> Result<Vec<String>, String> {
    let socket = |name: &str| -> Result<String, String> {
        let l = enabled
            .iter()
            .find(|l| l.name == name)
            .ok_or_else(|| format!("listener {name} is not bound"))?;
        match &l.address {
            ListenAddress::Unix(p) if p.is_absolute() => Ok(p.display().to_string()),
            ListenAddress::Unix(p) => Ok(absolute(&state_dir.join(p)).display().to_string()),
            ListenAddress::Tcp(a) => Err(format!(
                "listener {name} is TCP ({a}); QEMU is given Unix sockets only"
            )),
        }
    };
    let mut a = base_args(config, vars)?;
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    // The vTPM, as swtpm's protocol on the Unix front end; CRB on q35.
    let tpm = socket(TPM_LISTENER)?;
    push(&[
        "-chardev",
        &format!("socket,id=tpm,path={tpm}"),
        "-tpmdev",
        "emulator,id=tpm0,chardev=tpm",
        "-device",
        "tpm-crb,tpmdev=tpm0",
    ]);
    for (n, d) in attached.iter().enumerate() {
        let path = socket(&d.listener)?;
        match d.kind {
            DeviceKind::Blk => push(&[
                "-chardev",
                &format!("socket,id=disk{n},path={path},reconnect=1"),
                "-device",
                &format!("vhost-user-blk-pci,chardev=disk{n}"),
            ]),
            // QEMU 7.2 refuses reconnect= on vhost-user-scsi.
            DeviceKind::Scsi => push(&[
                "-chardev",
                &format!("socket,id=disk{n},path={path}"),
                "-device",
                &format!("vhost-user-scsi-pci,chardev=disk{n}"),
            ]),
            // vectors=0: QEMU 7.2's vhost-user-net crashes with MSI-X. status=off: no carrier
            // flap for the guest while pv-net restarts. romfile=: no iPXE option ROM (it
            // would only slow the firmware and be measured into PCR 2).
            DeviceKind::Net => push(&[
                "-chardev",
                &format!("socket,id=nic{n},path={path},reconnect=1"),
                "-netdev",
                &format!("vhost-user,id=net{n},chardev=nic{n}"),
                "-device",
                &format!("virtio-net-pci,netdev=net{n},vectors=0,status=off,romfile="),
            ]),
        }
    }
    a.extend(config.extra.iter().cloned());
    Ok(a)
}

/// The part of QEMU's command line that is not the paravisor's devices: machine, memory,
/// accelerator, firmware (with its variable store `vars`), kernel, initrd, command line and
/// the console on stdout. A baseline QEMU (`bench boot`) starts the same way.
pub fn base_args(config: &QemuConfig, vars: Option<&Path>) -> Result<Vec<String>, String> {
    let mib = config.memory_mib;
    let accel = match config.resolved_accel() {
        Accel::Kvm => "kvm",
        _ => "tcg",
    };
    let mut a: Vec<String> = Vec::new();
    let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // A reset ends the run, as in our own partition: a panicking guest (panic=-1) is not
    // booted again behind the caller's back.
    push(&["-no-reboot"]);
    // QEMU's own seccomp filter: no new processes, no privilege changes.
    push(&[
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
    ]);
    push(&["-accel", accel]);
    // vhost-user back ends map guest RAM: it must be a shared memfd.
    push(&[
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mib}M,share=on"),
        "-machine",
        "q35,memory-backend=mem",
        "-m",
        &format!("{mib}M"),
        "-smp",
        &config.vcpus.to_string(),
    ]);
    if let Some(code) = &config.firmware {
        let vars = vars.ok_or("UEFI firmware without a variable store")?;
        push(&[
            "-drive",
            &format!(
                "if=pflash,format=raw,unit=0,readonly=on,file={}",
                code.display()
            ),
            "-drive",
            &format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
        ]);
    }
    push(&["-kernel", &config.kernel.display().to_string()]);
    if let Some(initrd) = &config.initrd {
        push(&["-initrd", &initrd.display().to_string()]);
    }
    push(&["-append", &config.cmdline]);
    // The console: the first serial port, on QEMU's stdout (a pipe to the paravisor).
    push(&[
        "-chardev",
        "stdio,id=console,signal=off",
        "-serial",
        "chardev:console",
    ]);
    Ok(a)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The UEFI variable store that goes with `code` (Debian's naming: `..._CODE_4M.fd` ->
/// `..._VARS_4M.fd`), if there is one.
pub fn vars_template(code: &Path) -> Option<PathBuf> {
    let name = code.file_name()?.to_str()?;
    let vars = name.replace("_CODE", "_VARS");
    (vars != name).then(|| code.with_file_name(vars))
}

/// How QEMU's run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmmOutcome {
    /// The guest printed `PV-EXIT <status>` and QEMU ended.
    Status(u8),
    /// QEMU ended with this exit code without a status line (0: the guest powered off).
    Exited(i32),
    /// QEMU was killed by this signal.
    Signalled(i32),
    /// The paravisor stopped it.
    Stopped,
}

/// QEMU as the supervisor holds it.
pub struct HostVmm {
    child: std::process::Child,
    pidfd: OwnedFd,
    console: Option<std::process::ChildStdout>,
    line: Vec<u8>,
    status: Option<u8>,
    pub outcome: Option<VmmOutcome>,
    pub record: HostVmmRecord,
    started: Instant,
}

impl HostVmm {
    /// Starts QEMU with `args`; its console comes back through a pipe.
    pub fn spawn(program: &Path, args: &[String], accel: Accel) -> io::Result<HostVmm> {
        let mut command = std::process::Command::new(program);
        // An operator at a terminal types on the guest's console (QEMU puts the terminal in
        // raw mode: Ctrl-C goes to the guest, which powers off to end the run); anything else
        // gives the guest no input.
        let stdin = if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        };
        command
            .args(args)
            .stdin(stdin)
            .stdout(std::process::Stdio::piped())
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        crate::sandbox::die_with_parent(&mut command);
        let child = command.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot start {} ({e}); install it (apt-get install qemu-system-x86) or name \
                     another with --qemu",
                    program.display()
                ),
            )
        })?;
        let pidfd = crate::sandbox::pidfd_open(child.id())?;
        let mut child = child;
        let console = child.stdout.take();
        if let Some(c) = &console {
            ipc_defs::hosted::sys::set_nonblocking(c.as_fd())?;
        }
        Ok(HostVmm {
            child,
            pidfd,
            console,
            line: Vec::new(),
            status: None,
            outcome: None,
            record: HostVmmRecord {
                program: program.display().to_string(),
                accel: format!("{accel:?}").to_lowercase(),
                args: args.to_vec(),
            },
            started: Instant::now(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The descriptors the supervisor's loop watches: QEMU's process, its console.
    pub fn fds(&self) -> (i32, Option<i32>) {
        (
            self.pidfd.as_raw_fd(),
            self.console.as_ref().map(|c| c.as_raw_fd()),
        )
    }

    /// Copies what the console has to stdout, looking for the status line. Returns false
    /// once the console is closed.
    pub fn pump_console(&mut self) -> bool {
        use std::io::Read;
        use std::io::Write;
        let Some(console) = self.console.as_mut() else {
            return false;
        };
        let mut buf = [0u8; 16 * 1024];
        loop {
            match console.read(&mut buf) {
                Ok(0) => {
                    self.console = None;
                    return false;
                }
                Ok(n) => {
                    let mut out = std::io::stdout().lock();
                    let _ = out.write_all(&buf[..n]);
                    let _ = out.flush();
                    drop(out);
                    scan(&mut self.line, &mut self.status, &buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.console = None;
                    return false;
                }
            }
        }
    }

    /// Reaps QEMU if it ended; its outcome then.
    pub fn reap(&mut self) -> Option<VmmOutcome> {
        if self.outcome.is_some() {
            return self.outcome.clone();
        }
        let exit = crate::sandbox::pidfd_reap(&self.pidfd).ok()??;
        // What the console still holds (the status line may be in it).
        while self.pump_console() {}
        let outcome = match (exit, self.status) {
            (crate::sandbox::Exit::Code(0), Some(status)) => VmmOutcome::Status(status),
            (crate::sandbox::Exit::Code(code), _) => VmmOutcome::Exited(code),
            (crate::sandbox::Exit::Signal(sig), _) => VmmOutcome::Signalled(sig),
        };
        let secs = self.started.elapsed().as_secs_f64();
        match &outcome {
            VmmOutcome::Status(s) => {
                tracing::info!("QEMU ended after {secs:.1} s; the guest's status is {s}")
            }
            VmmOutcome::Exited(0) => tracing::info!(
                "QEMU ended after {secs:.1} s: the guest powered off (no PV-EXIT status line)"
            ),
            VmmOutcome::Exited(code) => {
                tracing::error!("QEMU ended after {secs:.1} s with exit code {code}")
            }
            VmmOutcome::Signalled(sig) => {
                tracing::error!("QEMU was killed by signal {sig} after {secs:.1} s")
            }
            VmmOutcome::Stopped => {}
        }
        self.outcome = Some(outcome.clone());
        Some(outcome)
    }

    /// Stops QEMU: SIGTERM (QEMU powers the machine off), then SIGKILL after a grace period.
    pub fn stop(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        let _ = crate::sandbox::pidfd_signal(&self.pidfd, libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        loop {
            if let Ok(Some(_)) = crate::sandbox::pidfd_reap(&self.pidfd) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = crate::sandbox::pidfd_signal(&self.pidfd, libc::SIGKILL);
                let _ = crate::sandbox::poll_readable(&[self.pidfd.as_raw_fd()], 1000);
                let _ = crate::sandbox::pidfd_reap(&self.pidfd);
                break;
            }
            let _ = crate::sandbox::poll_readable(&[self.pidfd.as_raw_fd()], 50);
        }
        while self.pump_console() {}
        tracing::info!("QEMU stopped");
        self.outcome = Some(VmmOutcome::Stopped);
    }
}

impl Drop for HostVmm {
    /// A run that ends without stopping QEMU (a start refused after it was spawned) still
    /// leaves no QEMU behind.
    fn drop(&mut self) {
        if self.outcome.is_none() {
            let _ = crate::sandbox::pidfd_signal(&self.pidfd, libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// Splits console bytes into lines (kept in `line` between calls), noting the status of
/// each `PV-EXIT` line.
fn scan(line: &mut Vec<u8>, status: &mut Option<u8>, bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            if let Some(s) = parse_status(&String::from_utf8_lossy(line)) {
                *status = Some(s);
            }
            line.clear();
        } else if line.len() < MAX_LINE {
            line.push(b);
        }
    }
}

/// The status of a `PV-EXIT <n>` console line (0-255).
pub fn parse_status(line: &str) -> Option<u8> {
    line.trim_start()
        .strip_prefix(EXIT_MARKER)?
        .trim()
        .parse::<u8>()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_found_and_others_ignored() {
        assert_eq!(parse_status("PV-EXIT 0"), Some(0));
        assert_eq!(parse_status("PV-EXIT 3\r"), Some(3));
        assert_eq!(parse_status("  PV-EXIT 42 "), Some(42));
        assert_eq!(parse_status("PV-EXIT 256"), None);
        assert_eq!(parse_status("echo PV-EXIT 1"), None);
        assert_eq!(parse_status("PV-EXIT"), None);
    }

    #[test]
    fn debians_vars_store_is_found_next_to_its_code() {
        assert_eq!(
            vars_template(Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd")),
            Some(PathBuf::from("/usr/share/OVMF/OVMF_VARS_4M.fd"))
        );
        assert_eq!(vars_template(Path::new("/x/firmware.fd")), None);
    }

    #[test]
    fn listener_names_say_their_device() {
        assert_eq!(
            DeviceKind::of_listener("vhost-user-blk"),
            Some(DeviceKind::Blk)
        );
        assert_eq!(
            DeviceKind::of_listener("vhost-user-net"),
            Some(DeviceKind::Net)
        );
        assert_eq!(DeviceKind::of_listener("mssim-command"), None);
    }
}
