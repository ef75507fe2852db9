//! The `paravisor` command line: every command's arguments (clap), shared by the core
//! binary (`paravisor`, which runs the commands of the trusted core) and the tools binary
//! (`pv-tools`, which `paravisor` hands the tools' commands to: verifier, key broker, vmgs
//! tool, benchmarks), so that both parse a command line the same way and a usage error is
//! the same whoever reports it.

use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use clap::Subcommand;

use crate::control;
use crate::control::Command;
use crate::control::Reply;
use crate::manifest::Manifest;
use crate::manifest::DEFAULT_MANIFEST;

/// The tools binary, next to `paravisor`: it runs the commands [`Cmd::is_tool`] names.
pub const TOOLS_BINARY: &str = "pv-tools";

/// What `paravisor --help` says first (the tools' part of the command line says the same).
pub const ABOUT: &str =
    "A microkernel paravisor: every function in its own capability-restricted, supervised process.";

/// A microkernel paravisor: every function in its own capability-restricted process.
#[derive(Parser)]
#[command(name = "paravisor", version, about = ABOUT)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Validate a manifest; exit 0 if it is valid, 1 with diagnostics if not.
    Check {
        /// The manifest [default: manifest.toml]
        manifest: Option<PathBuf>,
    },
    /// Print the privilege matrix: what each service serves, calls, holds and may do.
    Audit {
        /// The manifest [default: manifest.toml]
        manifest: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Check the running instance against the manifest instead; exit 1 on any difference.
        #[arg(long)]
        live: bool,
        /// State directory of the running instance (for --live).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Print the task table a metal kernel image carries instead (its .pv_tasks section,
        /// as `paravisor metal build` wrote it), checked as the kernel checks it.
        #[arg(long, value_name = "IMAGE", conflicts_with_all = ["manifest", "live", "state_dir"])]
        metal: Option<PathBuf>,
    },
    /// Run the paravisor in the foreground: start and supervise every service.
    Run {
        /// The manifest [default: manifest.toml]
        manifest: Option<PathBuf>,
        /// Directory for the control socket and state files [default: the manifest's state-dir, "state"]
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// The simulated platform, provisioned on first use [default: the manifest's
        /// `[attest] platform-dir`, else "platform" next to the state directory]
        #[arg(long)]
        platform_dir: Option<PathBuf>,
        /// Bind this front end (a listener the manifest declares, e.g. mssim-command or
        /// swtpm-control-unix), at its declared address or at ADDRESS (loopback) or PATH (a
        /// Unix socket, relative to the state directory unless absolute; its directory is
        /// made 0700); repeatable; `all` binds every declared one. Without it nothing
        /// listens. A TCP front end is reachable by every local user.
        #[arg(long, value_name = "NAME[=ADDRESS|PATH]|all")]
        listen: Vec<String>,
        /// Attach TAP NAME (one the manifest declares, e.g. net0) to host interface IFNAME:
        /// the TAP of that name (a persistent one, `ip tuntap add`), or a new one that lives
        /// as long as this run; with @NETNS, in the network namespace /run/netns/NETNS (`ip
        /// netns add`). Repeatable. Without it no TAP is attached and the service holding it
        /// has no back end. The interface's state and addresses are the host's (`ip link set
        /// IFNAME up`).
        #[arg(long, value_name = "NAME=IFNAME[@NETNS]")]
        tap: Vec<String>,
        /// The host configuration: state-dir, platform-dir, key-release, listen, taps,
        /// log-format, log-file (TOML; not measured: see `paravisor audit`). The flags above
        /// override it; it overrides the manifest's defaults.
        #[arg(long, value_name = "FILE")]
        host: Option<PathBuf>,
        #[command(flatten)]
        log: LogArgs,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// List the services of the running instance.
    Ps {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Print again every --interval until the instance stops (or --count times).
        #[arg(long)]
        watch: bool,
        /// With --watch: stop after this many listings.
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        /// With --watch: seconds between listings.
        #[arg(long, value_name = "SECONDS", default_value_t = 1.0)]
        interval: f64,
        /// The manifest (only to find the default state directory) [default: manifest.toml]
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Send a signal to a service of the running instance (fault injection).
    Kill {
        /// The service's name, as in the manifest.
        service: String,
        /// Signal name or number.
        #[arg(long, default_value = "KILL")]
        signal: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Start a service of the running instance again: a running one is killed and started at
    /// once, a failed one (crash loop) is revived with a fresh restart count; waits until it
    /// runs.
    Restart {
        /// The service's name, as in the manifest.
        service: String,
        /// Return once the restart is under way, without waiting for the service to run.
        #[arg(long)]
        no_wait: bool,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Print a service's recent output (kept by the running instance, with its notes about
    /// the service: started, exited, restarting in ...).
    Logs {
        /// The service's name, as in the manifest.
        service: String,
        /// Keep printing new lines until the instance stops.
        #[arg(long, short = 'f')]
        follow: bool,
        /// How many of the last lines to print first.
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: usize,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Ask SERVICE to ping ENDPOINT through its own capability (checks granted connectivity).
    Probe {
        service: String,
        endpoint: String,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// The simulated platform (stands in for the AMD secure processor).
    Platform {
        #[command(subcommand)]
        action: PlatformCmd,
    },
    /// Attestation evidence: the certificate chain, and verifying a report as a remote
    /// verifier does.
    Attest {
        #[command(subcommand)]
        action: AttestCmd,
    },
    /// Print the launch log and the launch measurement (SNP launch digest) `run` would
    /// produce for this manifest, binaries and guest, without running anything: a verifier's
    /// reference value.
    Measure {
        /// The manifest [default: manifest.toml]
        manifest: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Measure against baselines in the same run: `ipc` (our rings against the shared-memory
    /// floor, eventfd and Unix sockets), `vmgs` (the guest-state store against plain file
    /// I/O), `vtpm` (a running paravisor's TPM against swtpm), `guest` (a guest exit
    /// answered by a device service against one answered in the vCPU thread), `memory` (an
    /// idle instance's footprint against Firecracker's), `storage` (our vhost-user disks
    /// under a Linux guest's fio against qemu-storage-daemon) or `net` (a Linux guest's TCP
    /// throughput and ping on our vhost-user NIC against QEMU's own `-netdev tap`, and pv-net's
    /// restart; needs root), `boot` (`run --vmm qemu` to Linux's first user-space line
    /// against QEMU with its own devices and swtpm) or `chaos` (the confidential VM attesting,
    /// writing its disk and extending a PCR while its services are killed at random every
    /// 2-5 s; needs root; exit 1 if an invariant broke). Warns when other processes kept the
    /// machine busy meanwhile.
    Bench(ToolArgs),
    /// (internal) The peer side of a benchmark.
    #[command(name = "__bench-peer", hide = true)]
    BenchPeer(ToolArgs),
    /// VMGS guest-state file tools (the reference vmgstool's commands, options and exit codes).
    Vmgs {
        #[command(subcommand)]
        command: VmgsTop,
    },
    /// Key broker (KBS), run by the tenant outside the paravisor's trust boundary: releases
    /// the tenant key, wrapped, only to attestation evidence that verifies.
    Kbs(ToolArgs),
    /// The metal platform (work in progress): build the kernel image with the manifest's
    /// [[metal.task]] tasks (`metal build`), decode its defmt log (`metal log`), boot it
    /// under QEMU or our own partition (`metal run`).
    Metal(ToolArgs),
    /// Stop the running instance (like SIGTERM).
    Stop {
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
}

pub fn load(path: Option<&Path>) -> Result<Manifest, ExitCode> {
    let path = path.unwrap_or(Path::new(DEFAULT_MANIFEST));
    Manifest::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::FAILURE
    })
}

/// The core binary, `paravisor`, in [`bin_dir`] (what the tools start for `run`, `kill`,
/// `stop`).
pub fn paravisor() -> PathBuf {
    bin_dir().join("paravisor")
}

/// Where `paravisor` and the service executables are.
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The state directory for client commands: the flag, else the manifest's if one is there,
/// else the default.
pub fn client_state_dir(
    flag: Option<PathBuf>,
    manifest: Option<&Path>,
) -> Result<PathBuf, ExitCode> {
    if let Some(dir) = flag {
        return Ok(dir);
    }
    match manifest {
        // A manifest named on the command line must load: its state directory is meant.
        Some(path) => Manifest::load(path).map(|m| m.state_dir).map_err(|e| {
            eprintln!("paravisor: {e}");
            ExitCode::FAILURE
        }),
        None => Ok(match Manifest::load(Path::new(DEFAULT_MANIFEST)) {
            Ok(m) => m.state_dir,
            Err(_) => PathBuf::from(crate::manifest::DEFAULT_STATE_DIR),
        }),
    }
}

pub fn send(state_dir: &Path, command: &Command) -> Result<Reply, ExitCode> {
    control::send(state_dir, command).map_err(|e| {
        eprintln!("paravisor: {e}");
        ExitCode::FAILURE
    })
}

/// Where `run` logs and how (`crate::logging`).
#[derive(clap::Args, Debug, Default)]
pub struct LogArgs {
    /// How the log looks: text (coloured only on a terminal) or json (one object per line,
    /// the services' lines and the console included) [default: the host file's, else text]
    #[arg(long, value_enum)]
    pub log_format: Option<crate::logging::LogFormat>,
    /// Append the log (the microkernel's and the services' stderr lines) to this file instead
    /// of stderr: created 0600 if missing, refused if it is a link or another user's
    /// [default: the host file's]
    #[arg(long)]
    pub log_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum PlatformCmd {
    /// Provision a platform identity once: chip secret (insecure file) and ARK/ASK/VCEK.
    Init(ToolArgs),
    /// SIMULATED hardware call: a report signed by this platform's VCEK, as its secure
    /// processor would return one (for tests and demonstrations; a running paravisor's
    /// reports come through its attest service).
    Report {
        #[arg(long, default_value = DEFAULT_PLATFORM_DIR)]
        platform_dir: PathBuf,
        /// Report data: the nonce itself, zero-padded, up to 64 bytes; its SHA-512 if longer.
        #[arg(long)]
        nonce: String,
        /// The measurement to report (hex) [default: what `paravisor measure` gives].
        #[arg(long)]
        measurement: Option<String>,
        #[arg(short, long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum AttestCmd {
    /// Write the platform's chain as ark.pem, ask.pem, vcek.pem (the AMD tools' names).
    Certs {
        /// The platform's directory [default: the one `run` uses for the state directory:
        /// the manifest's `[attest] platform-dir`, else "platform" next to it]
        #[arg(long)]
        platform_dir: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        manifest: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Ask the running paravisor's attest service for a report: writes the raw 0x4A0-byte
    /// SEV-SNP report.
    Report {
        /// Report data: the nonce itself, zero-padded, up to 64 bytes; its SHA-512 if longer.
        #[arg(long)]
        nonce: String,
        #[arg(short, long)]
        out: PathBuf,
        /// Also write the chain that verifies it (ark.pem, ask.pem, vcek.pem) into this
        /// directory.
        #[arg(long)]
        certs: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        manifest: Option<PathBuf>,
    },
    /// Print the SHA-256 fingerprint of the ARK in DIR (what a verifier pins).
    Fingerprint(ToolArgs),
    /// Verify a report: pinned ARK, chain and signature (sev crate), zero reserved bytes,
    /// the measurement (given, or recomputed from a manifest) and the nonce.
    Verify(ToolArgs),
}

/// The simulated platform's default directory (next to `state`, never inside it).
pub const DEFAULT_PLATFORM_DIR: &str = "platform";

/// `paravisor vmgs`: the reference tool's commands, and `reseal`.
// Parsed once per command line: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum VmgsTop {
    /// Unseal the guest-state file's datastore key under this launch and stop: with
    /// `[attest] key-release`, a key sealed to another measurement is released by the key
    /// broker and re-sealed to this one (how a state moves to a new release). Takes the
    /// same arguments as `run` (the measurement must be the one `run` will have).
    #[command(alias = "rotate")]
    Reseal {
        /// The manifest [default: manifest.toml]
        manifest: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        platform_dir: Option<PathBuf>,
        /// The host configuration `run` uses (its listeners are never bound and its TAPs
        /// never attached here: reseal is offline).
        #[arg(long, value_name = "FILE")]
        host: Option<PathBuf>,
        #[command(flatten)]
        guest: GuestArgs,
    },
    /// Create a new VMGS file (a 4 MiB image by default), optionally encrypted.
    Create(ToolArgs),
    /// Write a file id's contents from a data file.
    Write(ToolArgs),
    /// Print a file id's contents as hex, or write them to a file (-d) or raw to stdout.
    Dump(ToolArgs),
    /// Print both headers, check them and say which is active.
    DumpHeaders(ToolArgs),
    /// Print the file table.
    DumpFileTable(ToolArgs),
    /// Print the size of a file id's contents (the number alone on stdout).
    QuerySize(ToolArgs),
    /// Say whether the file is encrypted (exit 2 if not).
    QueryEncryption(ToolArgs),
    /// Replace the datastore key of an encrypted file.
    UpdateKey(ToolArgs),
    /// Encrypt an unencrypted file (every existing file id is re-encrypted).
    Encrypt(ToolArgs),
    /// Remove a file id (no key needed, as with the reference tool: on an encrypted file
    /// without -k only the file table changes).
    Delete(ToolArgs),
    /// Give a file id's contents another id.
    Move(ToolArgs),
}

/// The subcommands of `paravisor vmgs` that are the vmgs file tool's (all but `reseal`).
pub const VMGS_TOOL_COMMANDS: &[&str] = &[
    "create",
    "write",
    "dump",
    "dump-headers",
    "dump-file-table",
    "query-size",
    "query-encryption",
    "update-key",
    "encrypt",
    "delete",
    "move",
];

/// `paravisor vmgs`'s exit code for a usage error (sysexits' EX_USAGE): 2 means "not
/// encrypted" to scripts written for the reference vmgstool.
pub const VMGS_USAGE: u8 = 64;

/// A tool's command line, for `paravisor --help` to list: `paravisor` hands the command to
/// the tools binary before parsing it ([`is_tool_command`]), which defines and checks its
/// arguments (and prints its `--help`).
#[derive(clap::Args, Debug)]
#[command(disable_help_flag = true)]
pub struct ToolArgs {
    #[arg(num_args = 0.., trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<std::ffi::OsString>,
}

/// Whether `args` (the command line without the program name) is a tool's command, or
/// `help` for one: the verifier (`attest verify`, `attest fingerprint`), provisioning a
/// simulated platform (`platform init`), the key broker, the vmgs file tool, the
/// benchmarks and the metal image's tools. `paravisor` runs them through [`TOOLS_BINARY`] with the command line as given.
pub fn is_tool_command(args: &[std::ffi::OsString]) -> bool {
    let words: Vec<&str> = args.iter().map(|a| a.to_str().unwrap_or("")).collect();
    let words = match words.split_first() {
        Some((&"help", rest)) => rest,
        _ => &words[..],
    };
    // `paravisor GROUP help COMMAND` is the help of `GROUP COMMAND`.
    let (group, rest) = match words {
        [group, "help", rest @ ..] => (Some(*group), rest),
        [group, rest @ ..] => (Some(*group), rest),
        [] => (None, &[][..]),
    };
    match (group, rest) {
        (Some("bench" | "__bench-peer" | "kbs" | "metal"), _) => true,
        (Some("attest"), ["verify" | "fingerprint", ..]) => true,
        (Some("platform"), ["init", ..]) => true,
        (Some("vmgs"), [command, ..]) => VMGS_TOOL_COMMANDS.contains(command),
        _ => false,
    }
}

/// What guest a run starts (shared by `run` and `measure`). Under `measure`, `attest
/// verify`, `vmgs reseal`, they describe the run whose launch is meant.
#[derive(clap::Args, Debug, Default)]
#[command(
    next_help_heading = "Guest options (for measure, attest verify and vmgs reseal: those of the run meant)"
)]
pub struct GuestArgs {
    /// Run the services without a guest, until stopped (Ctrl-C or `paravisor stop`).
    #[arg(long, conflicts_with_all = ["kernel", "guest", "keep_running"])]
    pub no_guest: bool,
    /// Keep the services running after the guest's run ends.
    #[arg(long)]
    pub keep_running: bool,
    /// Boot this Linux bzImage instead of the test guest (64-bit boot protocol; needs
    /// hardware KVM: a stock kernel does not boot on KVM-on-PVM).
    #[arg(long, conflicts_with = "guest")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Command line: the kernel's with --kernel [default: "console=ttyS0 panic=-1"], else
    /// the test guest's (e.g. "extends=8 bench=0 interrupt=1 tpm=1").
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Run this ELF image instead of the embedded test guest.
    #[arg(long)]
    pub guest: Option<PathBuf>,
    /// Guest RAM in MiB [default: 64 for the test guest, 512 for Linux].
    #[arg(long)]
    pub memory: Option<u64>,
    /// vCPUs (Linux only; the test guest uses one).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// End the run with a register report when the guest makes no exit for this many
    /// seconds (0: never) [default: 30 for the test guest; for Linux 20 on KVM-on-PVM,
    /// else never].
    #[arg(long)]
    pub guest_watchdog: Option<u64>,
    /// Who runs the guest: our own KVM partition, or QEMU (the host's VMM, started by the
    /// paravisor, with the vTPM, disks and NIC of the services; needs --kernel).
    #[arg(long, value_enum, default_value_t = Vmm::Partition, requires_ifs = [("qemu", "kernel")])]
    pub vmm: Vmm,
    /// With --vmm qemu: QEMU's accelerator (auto: KVM where it boots a stock kernel, else TCG).
    #[arg(long, value_enum, default_value_t = crate::host_vmm::Accel::Auto)]
    pub accel: crate::host_vmm::Accel,
    /// With --vmm qemu: the QEMU binary [default: qemu-system-x86_64].
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// With --vmm qemu: UEFI firmware code, whose measured boot fills PCRs 0-7 and 9
    /// [default: /usr/share/OVMF/OVMF_CODE_4M.fd, Debian's ovmf]; `seabios`: QEMU's own BIOS.
    #[arg(long, value_name = "PATH|seabios")]
    pub firmware: Option<PathBuf>,
    /// With --vmm qemu: a disk on this vhost-user listener of the manifest (repeatable; `none`
    /// for no disk) [default: every vhost-user-blk listener].
    #[arg(long, value_name = "LISTENER")]
    pub disk: Vec<String>,
    /// With --vmm qemu: a NIC on this vhost-user listener of the manifest (repeatable; `none`
    /// for no NIC) [default: every vhost-user-net listener].
    #[arg(long, value_name = "LISTENER")]
    pub nic: Vec<String>,
    /// With --vmm qemu: one more QEMU argument, after the paravisor's (repeatable).
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    pub qemu_arg: Vec<String>,
}

/// Who runs the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Vmm {
    /// The paravisor's own KVM partition.
    #[default]
    Partition,
    /// QEMU, the host's VMM, as a child of the paravisor.
    Qemu,
}

impl GuestArgs {
    /// The guest to run, or `None` with --no-guest.
    /// Whether no guest option was given (the default: the embedded test guest).
    pub fn is_default(&self) -> bool {
        !self.no_guest
            && self.kernel.is_none()
            && self.initrd.is_none()
            && self.cmdline.is_none()
            && self.guest.is_none()
            && self.memory.is_none()
            && self.vcpus <= 1
            && self.guest_watchdog.is_none()
            && self.vmm == Vmm::Partition
    }

    /// With `--vmm qemu`: what QEMU boots (the partition then runs no guest).
    pub fn qemu_config(&self) -> Result<Option<crate::host_vmm::QemuConfig>, ExitCode> {
        use crate::host_vmm;
        if self.vmm != Vmm::Qemu {
            for (given, flag) in [
                (self.qemu.is_some(), "--qemu"),
                (self.firmware.is_some(), "--firmware"),
                (!self.disk.is_empty(), "--disk"),
                (!self.nic.is_empty(), "--nic"),
                (!self.qemu_arg.is_empty(), "--qemu-arg"),
                (self.accel != host_vmm::Accel::Auto, "--accel"),
            ] {
                if given {
                    eprintln!("paravisor: {flag} is for --vmm qemu");
                    return Err(ExitCode::from(2));
                }
            }
            return Ok(None);
        }
        let usage = |why: &str| {
            eprintln!("paravisor: --vmm qemu: {why}");
            ExitCode::from(2)
        };
        if self.no_guest || self.guest.is_some() || self.guest_watchdog.is_some() {
            return Err(usage(
                "--no-guest, --guest and --guest-watchdog are for our own partition",
            ));
        }
        let Some(kernel) = self.kernel.clone() else {
            return Err(usage("--kernel is required"));
        };
        let firmware = match &self.firmware {
            Some(p) if p.as_os_str() == "seabios" => None,
            Some(p) => Some(p.clone()),
            None => Some(PathBuf::from(host_vmm::DEFAULT_FIRMWARE)),
        };
        if let Some(f) = &firmware {
            if !f.is_file() {
                return Err(usage(&format!(
                    "no firmware at {} (apt-get install ovmf, or --firmware PATH|seabios)",
                    f.display()
                )));
            }
        }
        // Each class: None (not given) is its default; `none` alone is no device.
        let chosen = |names: &Vec<String>| {
            (!names.is_empty()).then(|| names.iter().filter(|n| *n != "none").cloned().collect())
        };
        Ok(Some(host_vmm::QemuConfig {
            qemu: self
                .qemu
                .clone()
                .unwrap_or_else(|| PathBuf::from(host_vmm::DEFAULT_QEMU)),
            accel: self.accel,
            firmware,
            kernel,
            initrd: self.initrd.clone(),
            cmdline: self
                .cmdline
                .clone()
                .unwrap_or_else(|| host_vmm::DEFAULT_CMDLINE.into()),
            memory_mib: self.memory.unwrap_or(host_vmm::DEFAULT_MEMORY_MIB),
            vcpus: self.vcpus.max(1),
            disks: chosen(&self.disk),
            nics: chosen(&self.nic),
            extra: self.qemu_arg.clone(),
        }))
    }

    pub fn config(&self) -> Result<Option<crate::partition::GuestConfig>, ExitCode> {
        use crate::partition;
        let guest = if self.no_guest || self.vmm == Vmm::Qemu {
            None
        } else {
            let cmdline = self.cmdline.clone();
            let image = match self.kernel.clone() {
                Some(kernel) => partition::Image::Linux {
                    kernel,
                    initrd: self.initrd.clone(),
                    command_line: cmdline.unwrap_or_else(|| "console=ttyS0 panic=-1".into()),
                },
                None => partition::Image::TestGuest {
                    path: self.guest.clone(),
                    command_line: cmdline.unwrap_or_default(),
                },
            };
            let default_memory = match image {
                partition::Image::Linux { .. } => partition::LINUX_MEMORY,
                partition::Image::TestGuest { .. } => partition::TEST_GUEST_MEMORY,
            };
            let vcpus = match image {
                partition::Image::Linux { .. } => self.vcpus.max(1),
                partition::Image::TestGuest { .. } if self.vcpus > 1 => {
                    eprintln!(
                        "paravisor: the test guest runs on one vCPU (--vcpus is for --kernel)"
                    );
                    return Err(ExitCode::from(2));
                }
                partition::Image::TestGuest { .. } => 1,
            };
            let memory = match self.memory.map(|m| m.checked_mul(1 << 20)) {
                None => default_memory,
                Some(Some(bytes)) => bytes,
                Some(None) => {
                    eprintln!("paravisor: --memory is in MiB; that many does not fit");
                    return Err(ExitCode::from(2));
                }
            };
            let watchdog = match (self.guest_watchdog, &image) {
                (Some(0), _) => None,
                (Some(s), _) => Some(std::time::Duration::from_secs(s)),
                (None, partition::Image::TestGuest { .. }) => Some(partition::TEST_GUEST_WATCHDOG),
                (None, partition::Image::Linux { .. }) => {
                    partition::is_pvm().then_some(partition::PVM_LINUX_WATCHDOG)
                }
            };
            Some(partition::GuestConfig {
                image,
                memory,
                vcpus,
                watchdog,
            })
        };
        Ok(guest)
    }
}

/// Says why a command failed; its exit code.
pub fn failed(e: impl std::fmt::Display) -> ExitCode {
    eprintln!("paravisor: {e}");
    ExitCode::FAILURE
}

/// Prints a command-line error (or the help) and gives clap's exit code, except under
/// `vmgs`: there 2 means "not encrypted" to scripts written for the reference tool, so a
/// usage error is [`VMGS_USAGE`].
pub fn usage_error(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    let under_vmgs = std::env::args_os().nth(1).is_some_and(|a| a == "vmgs");
    match e.exit_code() {
        0 => ExitCode::SUCCESS,
        _ if under_vmgs => ExitCode::from(VMGS_USAGE),
        code => ExitCode::from(u8::try_from(code).unwrap_or(2)),
    }
}

impl Cmd {
    /// The commands that are not the trusted core's (see [`is_tool_command`], which
    /// `paravisor` asks first; this is its fallback for a command line clap rewrote).
    pub fn is_tool(&self) -> bool {
        match self {
            Cmd::Attest { action } => {
                matches!(action, AttestCmd::Fingerprint(_) | AttestCmd::Verify(_))
            }
            Cmd::Platform { action } => matches!(action, PlatformCmd::Init(_)),
            Cmd::Bench(_) | Cmd::BenchPeer(_) | Cmd::Kbs(_) | Cmd::Metal(_) => true,
            Cmd::Vmgs { command } => !matches!(command, VmgsTop::Reseal { .. }),
            _ => false,
        }
    }
}
