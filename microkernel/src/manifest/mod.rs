//! `manifest.toml`: the complete statement of what every service may do.
//!
//! Parsing is strict (unknown keys are errors) and validation collects every problem at once.
//! Each [`Diagnostic`] names the file, line and column, says what is wrong and what would be
//! right. A manifest that passes [`Manifest::load`] is internally consistent: every endpoint
//! exists and is served exactly once, every call has a server, limits are sane, device ranges
//! do not overlap and syscall fragments cannot undo the sandbox.
//!
//! This file holds the validated model ([`Manifest`], [`ServiceSpec`] and its grants), its
//! bounds, loading, and the measured configuration. The steps that produce the model are
//! split by what they do:
//! - `schema`: the TOML as written (the `Raw*` tables, with spans), checked only for shape;
//! - `validate`: the `Validator`, whose passes turn the schema into the model, one file per
//!   subject (processes, endpoints, grants, guest devices, `[attest]`);
//! - `values`: how values are written (sizes, durations, names, addresses) and where a byte of
//!   the text is.
//!
//! Every public item is reached as `crate::manifest::X`, wherever it is defined.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use ipc_defs::capability::FileAccess;
use ipc_defs::capability::Grant;
use ipc_defs::services::intercept::Interrupt;
use ipc_defs::services::intercept::InterruptSet;
use ipc_defs::services::vtpm::Localities;
use ipc_defs::Interface;
use serde::Deserialize;
use serde::Serialize;
use toml::Spanned;

use crate::privilege::UserSpec;
use schema::parse_help;
use schema::RawManifest;
use validate::Validator;

#[cfg(test)]
mod metal_tests;
mod schema;
#[cfg(test)]
mod tests;
mod validate;
mod values;

pub use values::format_duration;
pub use values::format_size;
pub use values::line_col;
pub use values::parse_duration;
pub use values::parse_key_release;
pub use values::parse_size;

/// The manifest every command uses unless told otherwise.
pub const DEFAULT_MANIFEST: &str = "manifest.toml";
/// Default state directory, relative to the current directory.
pub const DEFAULT_STATE_DIR: &str = "state";
/// Smallest ring a vmgs channel works with: a full content chunk plus framing.
pub const MIN_VMGS_RING: u32 = 32 << 10;
/// Default bytes per ring of each channel.
pub const DEFAULT_RING_CAPACITY: u32 = 64 << 10;
/// Smallest memory limit that a Rust service can start in (binary, libc, stacks, rings).
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest memory limit we accept for one service; beyond it a limit is no limit.
pub const MAX_MEMORY: u64 = 64 << 30;
/// Largest open-files limit we accept.
pub const MAX_OPEN_FILES: u64 = 1 << 16;
/// Descriptors every service needs besides its capabilities: stdio, the bootstrap record and
/// slack for the runtime.
pub const BASE_DESCRIPTORS: u64 = 8;
/// Most restarts a policy may allow per window.
pub const MAX_RESTARTS: u32 = 1000;
/// Shortest restart back-off: restart no faster than 1 kHz, so that a crash loop cannot starve
/// the guest of CPU.
pub const MIN_BACKOFF: Duration = Duration::from_millis(1);
/// Longest restart back-off and window we accept.
pub const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// Default ceiling of the doubling back-off (`max-backoff`): a service that keeps dying is
/// back within a second of its last death, so that its clients, who wait for it rather than
/// fail, wait at most about that long; `max` per `window` still ends a crash loop.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_WINDOW: Duration = Duration::from_secs(86_400);

/// Default watchdog: long enough for a slow request (an RSA key generation), short enough
/// that a hung device is noticed while the guest still waits for it.
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(10);
/// Shortest and longest watchdog we accept.
pub const MIN_WATCHDOG: Duration = Duration::from_secs(1);
pub const MAX_WATCHDOG: Duration = Duration::from_secs(3600);
/// Most services a manifest may describe: far fewer than the 4336 ids of the dynamic-user
/// range, so that a service's derived uid is free within a few attempts.
pub const MAX_SERVICES: usize = 256;

/// Syscalls that no per-service fragment may grant: each one would let a service leave or
/// weaken its sandbox (new code, new namespaces, other processes' memory, kernel modules).
pub const FORBIDDEN_SYSCALLS: &[&str] = &[
    "execve",
    "execveat",
    "fork",
    "vfork",
    "clone",
    "clone3",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "setns",
    "unshare",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "bpf",
    "perf_event_open",
    "seccomp",
    "prctl",
    "open_by_handle_at",
    "name_to_handle_at",
    "keyctl",
    "add_key",
    "request_key",
    "userfaultfd",
    "reboot",
    "swapon",
    "swapoff",
    "iopl",
    "ioperm",
];

/// Names the paravisor uses for its own clients and records; no service may have them.
pub const RESERVED_NAMES: &[&str] = &[
    "platform",
    "guest-tis",
    "microkernel",
    "guest",
    // The microkernel's own client name on its channel to attest (it alone may seal).
    ipc_defs::services::attest::PARAVISOR_CLIENT,
];

/// One problem in a manifest, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub help: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error: {}",
            self.file, self.line, self.column, self.message
        )?;
        if !self.help.is_empty() {
            write!(f, "\n  help: {}", self.help)?;
        }
        Ok(())
    }
}

/// Why a manifest cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source} (pass the manifest's path, or run from the directory that holds manifest.toml)")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

impl ManifestError {
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ManifestError::Invalid(d) => d,
            ManifestError::Read { .. } => &[],
        }
    }
}

/// When a service is restarted after it exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// After any exit, clean or not.
    Always,
    /// After a crash, a kill or a non-zero exit; a clean exit stays stopped.
    OnFailure,
    /// Never; the service stays down.
    Never,
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Restart {
    pub policy: RestartPolicy,
    /// Most restarts within `window`; one more marks the service failed.
    pub max: u32,
    #[serde(serialize_with = "ser_duration")]
    pub window: Duration,
    /// Delay before the second restart inside the window (the first is immediate); doubles
    /// with each further one...
    #[serde(serialize_with = "ser_duration")]
    pub backoff: Duration,
    /// ...up to this ceiling (`max-backoff`, default [`DEFAULT_MAX_BACKOFF`] or `backoff` if
    /// that is longer).
    #[serde(serialize_with = "ser_duration")]
    pub max_backoff: Duration,
}

impl Restart {
    /// The delay before restart number `n` inside the window (0: the first, which is
    /// immediate): `backoff` doubling from the second on, never above `max_backoff`.
    pub fn delay(&self, n: u32) -> Duration {
        match n {
            0 => Duration::ZERO,
            n => self
                .backoff
                .saturating_mul(1 << (n - 1).min(30))
                .min(self.max_backoff),
        }
    }
}

fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_duration(*d))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Address-space limit in bytes (RLIMIT_AS).
    pub memory: u64,
    /// Descriptor limit (RLIMIT_NOFILE).
    pub open_files: u64,
}

/// What guest memory a device service may reach (`guest-memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestMemoryAccess {
    /// The partition's shared window only: what a guest of a confidential VM shares with
    /// devices (its private memory stays out of the device's reach).
    SharedWindow,
    /// All of guest RAM (a device of a guest that is not confidential).
    All,
}

impl GuestMemoryAccess {
    pub fn name(self) -> &'static str {
        match self {
            GuestMemoryAccess::SharedWindow => "shared-window",
            GuestMemoryAccess::All => "all",
        }
    }
}

/// What a missing granted file means.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Missing {
    /// Refuse to start the service.
    Error,
    /// Create it empty (mode 0600).
    Create,
    /// Create a VMGS file (mode 0600) when the paravisor starts, encrypted with the key of
    /// this service named `key`.
    CreateVmgs { key: String, size: u64 },
}

/// What a missing key file means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissingKey {
    /// Refuse to start.
    Error,
    /// Make 32 random bytes (mode 0600) when the paravisor starts.
    Create,
}

/// A secret the microkernel hands to the service as a sealed memfd: the service gets the
/// key, never where it is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyGrant {
    pub name: String,
    /// The key file, relative to the state directory; `None` for a sealed key, which is kept
    /// only in the guest-state file the key encrypts (VMGS id HW_KEY_PROTECTOR), wrapped by
    /// the microkernel under a key the platform derives (see [`AttestSettings`]).
    pub path: Option<PathBuf>,
    pub missing: MissingKey,
}

impl KeyGrant {
    pub fn is_sealed(&self) -> bool {
        self.path.is_none()
    }
}

/// What the launch facts a sealed key is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sealing {
    /// The chip and its TCB: survives rebuilds and upgrades of the paravisor (development).
    Platform,
    /// Also the launch measurement: a paravisor with any other measurement cannot unseal
    /// (production).
    Measurement,
}

impl Sealing {
    pub fn name(self) -> &'static str {
        match self {
            Sealing::Platform => "platform",
            Sealing::Measurement => "measurement",
        }
    }
}

/// The manifest's `[attest]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttestSettings {
    pub sealing: Sealing,
    /// A key broker (loopback) that releases the datastore key's wrapping key to a report
    /// that satisfies its policy.
    pub key_release: Option<std::net::SocketAddr>,
    /// The tenant key's id the broker must release (`paravisor kbs init-key` prints it).
    pub key_release_id: Option<String>,
    /// The simulated platform's directory (`None`: `platform` next to the state directory).
    pub platform_dir: Option<PathBuf>,
}

impl Default for AttestSettings {
    fn default() -> AttestSettings {
        AttestSettings {
            sealing: Sealing::Platform,
            key_release: None,
            key_release_id: None,
            platform_dir: None,
        }
    }
}

/// Bytes of a key.
pub const KEY_BYTES: usize = 32;

/// A socket the microkernel binds and hands to the service as a listener capability: only
/// when the host configuration asks for it (`paravisor run --listen NAME`); declared here
/// with its default address and what its connections may do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ListenGrant {
    pub name: String,
    pub address: ListenAddress,
    /// The TPM localities its connections' commands may use (locality 0 unless granted more).
    #[serde(serialize_with = "ser_localities")]
    pub localities: Localities,
}

fn ser_localities<S: serde::Serializer>(l: &Localities, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(l.iter())
}

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenAddress {
    /// A loopback TCP address: nothing else is accepted.
    Tcp(std::net::SocketAddr),
    /// A Unix socket (mode 0600), relative to the state directory.
    Unix(PathBuf),
}

impl fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddress::Tcp(a) => write!(f, "{a}"),
            ListenAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileGrant {
    pub name: String,
    /// Relative to the state directory.
    pub path: PathBuf,
    #[serde(serialize_with = "ser_access")]
    pub access: FileAccess,
    pub missing: Missing,
}

fn ser_access<S: serde::Serializer>(a: &FileAccess, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match a {
        FileAccess::ReadOnly => "read-only",
        FileAccess::ReadWrite => "read-write",
    })
}

/// A TAP device the service may be handed (`taps = [{ name = "net0" }]`): a NIC's back end,
/// frames only. The manifest names the capability; the host configuration says which host
/// interface it is (`paravisor run --tap net0=IFNAME[@NETNS]`, host file `taps`), and a TAP
/// the host names nothing for is not attached at all ([`crate::taps`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TapGrant {
    pub name: String,
}

/// Most TAPs one service may hold: one per guest NIC it serves. Eight is more NICs than any
/// guest here has, and each is a descriptor, a capability slot and a poll source.
pub const MAX_TAPS: usize = 8;

/// A descriptor store (`fd-store = { max = N }`): the service may hand the microkernel up to
/// `max` descriptors (connected sockets, pipes) to keep across its restarts; its next start
/// gets them back ([`ipc_defs::fd_store`]). A clean shutdown, or a service given up
/// (failed, stopped), drops them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FdStoreGrant {
    pub max: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionGrant {
    pub name: String,
    pub size: u64,
}

/// Heap of a metal task that does not say (`heap`): room for a service's tables and a few
/// requests in flight; a task that keeps more says so.
pub const DEFAULT_TASK_HEAP: u64 = 256 << 10;
/// Stack of a metal task that does not say (`stack`): the tasks are event loops without
/// recursion.
pub const DEFAULT_TASK_STACK: u64 = 64 << 10;
/// Largest heap: the task's heap window (`HEAP_BASE..SLOT_BASE`).
pub const MAX_TASK_HEAP: u64 = ipc_defs::metal::SLOT_BASE - ipc_defs::metal::HEAP_BASE;
/// Largest stack: far more than an event loop needs; what is left of the slot window below
/// the stack holds the task's channels and regions.
pub const MAX_TASK_STACK: u64 = 16 << 20;
/// Longest `args` of a metal task: it travels in the task's one-page boot record with its
/// slots' names.
pub const MAX_TASK_ARGS: usize = 1024;

/// One task of the metal image (`[[metal.task]]`) with what it is granted there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetalTask {
    pub name: String,
    /// Its program: a bin of the task package (`services/metal`).
    pub program: String,
    /// Its command line (boot record).
    pub args: String,
    /// Heap and stack bytes, whole pages.
    pub heap: u64,
    pub stack: u64,
    /// Whether it is the `[[service]]` of its name (its endpoints, regions, RAM disks and
    /// restart policy are that service's), or states its own.
    pub from_service: bool,
    #[serde(serialize_with = "ser_interfaces")]
    pub serves: Vec<Interface>,
    #[serde(serialize_with = "ser_interfaces")]
    pub calls: Vec<Interface>,
    /// What each call may reach beyond the interface (as a service's `grants`).
    #[serde(serialize_with = "ser_grants")]
    pub grants: BTreeMap<Interface, Grant>,
    /// Its regions (kept across its restarts), whole pages.
    pub regions: Vec<RegionGrant>,
    /// Its service's files that have a size (a guest-state file), each a RAM disk region of
    /// the file's name and size, after `regions`.
    pub ram_disks: Vec<RegionGrant>,
    pub restart: Restart,
    /// What its service holds on the hosted platform that has no counterpart on metal, and
    /// so is left out of the image.
    pub hosted_only: Vec<HostedOnly>,
}

/// A grant of a service that the metal image leaves out: the key as the manifest writes it,
/// and what it names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostedOnly {
    pub key: &'static str,
    pub what: String,
}

/// A guest-physical MMIO range or an I/O-port range a service handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceRange {
    pub base: u64,
    pub size: u64,
}

impl DeviceRange {
    fn end(&self) -> u64 {
        self.base + self.size
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceSpec {
    pub name: String,
    pub binary: String,
    pub args: Vec<String>,
    #[serde(serialize_with = "ser_interfaces")]
    pub serves: Vec<Interface>,
    #[serde(serialize_with = "ser_interfaces")]
    pub calls: Vec<Interface>,
    pub files: Vec<FileGrant>,
    pub keys: Vec<KeyGrant>,
    pub listen: Vec<ListenGrant>,
    /// TAP devices (a NIC's back end), attached only when the host names them.
    pub taps: Vec<TapGrant>,
    /// Its descriptor store, if it has one.
    pub fd_store: Option<FdStoreGrant>,
    /// What each call may reach beyond the interface itself (e.g. the vmgs file ids), for
    /// the calls that are limited.
    #[serde(serialize_with = "ser_grants")]
    pub grants: BTreeMap<Interface, Grant>,
    pub regions: Vec<RegionGrant>,
    pub mmio: Vec<DeviceRange>,
    pub pio: Vec<DeviceRange>,
    /// Interrupt lines its own devices raise (intercept, or a device service: it holds their eventfds).
    #[serde(serialize_with = "ser_interrupts")]
    pub interrupts: InterruptSet,
    /// The PCI device (bus 0) it owns: intercept's host bridge forwards that device's
    /// configuration accesses to it.
    pub pci_device: Option<u8>,
    /// The guest memory the device may reach for DMA (`guest-memory`); `None`: none.
    pub guest_memory: Option<GuestMemoryAccess>,
    /// Its doorbells (`doorbells`): 4-byte registers inside its own `mmio`, which the
    /// partition delivers as signals of an eventfd while the device has them armed.
    pub doorbells: Option<DeviceRange>,
    pub limits: Limits,
    pub restart: Restart,
    /// The per-service syscall fragment (added to the common base).
    pub syscalls: Vec<String>,
    /// How long the service may leave the supervisor's pings unanswered before it is
    /// killed as hung (and restarted by its policy).
    #[serde(serialize_with = "ser_duration")]
    pub watchdog: Duration,
    /// Holds the calling end of the secure processor (only the service that serves attest).
    pub platform: bool,
    /// The uid and gid it runs as when the microkernel is root (`None`: derived from its
    /// name; see [`crate::privilege`]).
    pub user: Option<UserSpec>,
}

fn ser_grants<S: serde::Serializer>(
    g: &BTreeMap<Interface, Grant>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(g.iter().map(|(i, g)| (i.name(), grant_text(g))))
}

/// A grant as the manifest and the audit write it.
pub fn grant_text(g: &Grant) -> String {
    match g {
        Grant::Interface => "whole interface".into(),
        Grant::VmgsFiles(set) => format!("file-ids [{set}]"),
        Grant::PciDevices(mask) => format!(
            "PCI devices [{}]",
            (0..32)
                .filter(|d| mask & (1 << d) != 0)
                .map(|d| format!("00:{d:02x}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Grant::Interrupts(set) => format!(
            "interrupts [{}]",
            set.iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Grant::Vtpm(g) => g.to_string(),
        Grant::Localities(l) => format!("TPM commands at localities {l}"),
        Grant::GuestPartition => "the guest's accesses to its ranges".into(),
        Grant::GuestMemory { base, size } => {
            format!("guest memory {base:#x}+{size:#x}")
        }
        Grant::Doorbells { base, size } => {
            format!("{} doorbells at {base:#x}+{size:#x}", size / 4)
        }
        Grant::FdStore { max } => format!("keeps up to {max} descriptors across restarts"),
    }
}

fn ser_interrupts<S: serde::Serializer>(set: &InterruptSet, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(set.iter().map(|i| i.to_string()))
}

fn ser_interfaces<S: serde::Serializer>(v: &[Interface], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|i| i.name()))
}

/// A validated manifest.
#[derive(Debug, Clone, Serialize)]
pub struct Manifest {
    /// Where it was read from.
    pub path: PathBuf,
    /// The state directory as written (relative paths are relative to the current directory).
    pub state_dir: PathBuf,
    pub ring_capacity: u32,
    pub services: Vec<ServiceSpec>,
    pub attest: AttestSettings,
    /// The metal platform's tasks (`[[metal.task]]`, in the order written: their task
    /// indices). Not measured: the hosted platform runs none of them, and a metal image
    /// carries its own task table (`paravisor audit --metal`).
    #[serde(skip)]
    pub metal: Vec<MetalTask>,
    /// The text that was validated (what the launch measurement hashes: never read again).
    #[serde(skip)]
    pub source: String,
}

impl Manifest {
    /// Reads, parses and validates the manifest at `path`.
    pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
        let source = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Manifest::parse(path, &source)
    }

    /// Parses and validates manifest text; `path` names it in diagnostics.
    pub fn parse(path: &Path, source: &str) -> Result<Manifest, ManifestError> {
        let mut v = Validator {
            file: path.display().to_string(),
            source,
            diagnostics: Vec::new(),
        };
        let raw: RawManifest = match toml::from_str(source) {
            Ok(raw) => raw,
            Err(e) => {
                let span = e.span().unwrap_or(0..0);
                let message = e.message().trim().to_string();
                let help = parse_help(&message);
                v.error(span, message, help);
                return Err(ManifestError::Invalid(v.diagnostics));
            }
        };
        let manifest = v.validate(path, raw);
        if v.diagnostics.is_empty() {
            Ok(manifest)
        } else {
            Err(ManifestError::Invalid(v.diagnostics))
        }
    }

    pub fn service(&self, name: &str) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The service that serves `interface` (validation guarantees exactly one, if any).
    pub fn server_of(&self, interface: Interface) -> Option<&ServiceSpec> {
        self.services.iter().find(|s| s.serves.contains(&interface))
    }

    /// The services whose executable is not an executable file in `bin_dir` (where `run`
    /// finds them), each pointing at its `binary` line.
    pub fn missing_binaries(&self, bin_dir: &Path) -> Vec<Diagnostic> {
        use std::os::unix::fs::PermissionsExt;
        /// Only where each `binary` is (the text was validated already).
        #[derive(Deserialize)]
        struct Binaries {
            #[serde(default)]
            service: Vec<BinaryAt>,
        }
        #[derive(Deserialize)]
        struct BinaryAt {
            binary: Spanned<String>,
        }
        let spans: Vec<Range<usize>> = toml::from_str::<Binaries>(&self.source)
            .map(|b| b.service.iter().map(|s| s.binary.span()).collect())
            .unwrap_or_default();
        let mut v = Validator {
            file: self.path.display().to_string(),
            source: &self.source,
            diagnostics: Vec::new(),
        };
        for (i, s) in self.services.iter().enumerate() {
            let path = bin_dir.join(&s.binary);
            let problem = match std::fs::metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist",
                Err(_) => "cannot be read",
                Ok(m) if !m.is_file() => "is not a file",
                Ok(m) if m.permissions().mode() & 0o111 == 0 => "is not executable",
                Ok(_) => continue,
            };
            v.error(
                spans.get(i).cloned().unwrap_or(0..0),
                format!(
                    "binary \"{}\" of service \"{}\": {} {problem}",
                    s.binary,
                    s.name,
                    path.display()
                ),
                format!(
                    "services run the executables next to paravisor ({}): build them (cargo build --release) or fix the name",
                    bin_dir.display()
                ),
            );
        }
        v.diagnostics
    }

    /// The metal tasks whose `program` is not one of `programs` (the task package's bins,
    /// which `paravisor metal build` reads), each pointing at its `program` line.
    pub fn unknown_programs(&self, programs: &[String], package: &str) -> Vec<Diagnostic> {
        /// Only where each `program` is (the text was validated already).
        #[derive(Deserialize)]
        struct Programs {
            #[serde(default)]
            metal: Option<MetalPrograms>,
        }
        #[derive(Deserialize)]
        struct MetalPrograms {
            #[serde(default)]
            task: Vec<ProgramAt>,
        }
        #[derive(Deserialize)]
        struct ProgramAt {
            program: Spanned<String>,
        }
        let spans: Vec<Range<usize>> = toml::from_str::<Programs>(&self.source)
            .ok()
            .and_then(|p| p.metal)
            .map(|m| m.task.iter().map(|t| t.program.span()).collect())
            .unwrap_or_default();
        let mut v = Validator {
            file: self.path.display().to_string(),
            source: &self.source,
            diagnostics: Vec::new(),
        };
        for (i, t) in self.metal.iter().enumerate() {
            if programs.contains(&t.program) {
                continue;
            }
            v.error(
                spans.get(i).cloned().unwrap_or(0..0),
                format!(
                    "program \"{}\" of task \"{}\" is not a program of {package}",
                    t.program, t.name
                ),
                format!(
                    "its programs are {}; add a [[bin]] to its Cargo.toml, or fix the name",
                    programs.join(", ")
                ),
            );
        }
        v.diagnostics
    }

    /// The measured configuration: everything in the manifest that decides what runs and
    /// what it may do (services, binaries, grants, syscalls, limits, restart policy, the
    /// sealing policy, the tenant key's id), in the validated form with every default
    /// spelled out. Host settings ([`HOST_SETTINGS`]) are left out: where files live, which
    /// front ends listen where and where the key broker is are the host's choice, not the
    /// paravisor's identity.
    pub fn measured_config(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(top) = v.as_object_mut() {
            top.remove("path");
            top.remove("state_dir");
            if let Some(a) = top.get_mut("attest").and_then(|a| a.as_object_mut()) {
                a.remove("platform_dir");
                a.remove("key_release");
            }
            if let Some(services) = top.get_mut("services").and_then(|s| s.as_array_mut()) {
                for l in services
                    .iter_mut()
                    .filter_map(|s| s.get_mut("listen").and_then(|l| l.as_array_mut()))
                    .flatten()
                    .filter_map(|l| l.as_object_mut())
                {
                    l.remove("address");
                }
            }
            top.insert(
                "format".into(),
                serde_json::Value::String(MEASURED_CONFIG_FORMAT.into()),
            );
        }
        v
    }

    /// [`Manifest::measured_config`] in its canonical bytes (what the launch measures):
    /// compact JSON, object keys sorted, so comments, whitespace, key order and the
    /// spelling of numbers and sizes in `manifest.toml` do not change it.
    pub fn measured_bytes(&self) -> Vec<u8> {
        canonical_json(&self.measured_config())
    }
}

/// Names the canonical form of the measured configuration (changes if the form does).
pub const MEASURED_CONFIG_FORMAT: &str = "pv-measured-config-1";

/// What the host chooses, never measured (the manifest may name a default for some): (key
/// as written in the manifest or the host file, what it is).
pub const HOST_SETTINGS: &[(&str, &str)] = &[
    ("state-dir", "the state directory"),
    ("platform-dir", "the simulated secure processor's directory"),
    ("key-release", "the key broker's loopback address (the tenant key's id is measured)"),
    ("listen", "which front ends are bound, and their addresses and socket paths (a listener's name and localities are measured)"),
    ("taps", "which host interface (and network namespace) each declared TAP is; none is attached unless named (a TAP's name and holder are measured)"),
    ("log-format", "text or json"),
    ("log-file", "a file the log is appended to"),
];

/// JSON with object keys sorted and no whitespace: one byte string per value.
pub fn canonical_json(v: &serde_json::Value) -> Vec<u8> {
    fn sorted(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let ordered: BTreeMap<&String, serde_json::Value> =
                    m.iter().map(|(k, v)| (k, sorted(v))).collect();
                serde_json::Value::Object(
                    ordered.into_iter().map(|(k, v)| (k.clone(), v)).collect(),
                )
            }
            serde_json::Value::Array(a) => serde_json::Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    // Keys are sorted whether or not serde_json keeps insertion order: the map is rebuilt
    // from a sorted one either way.
    serde_json::to_vec(&sorted(v)).unwrap_or_default()
}

/// Every interrupt the microkernel wires for a guest: intercept's own lines and every line a
/// call to intercept grants.
pub fn guest_interrupts(services: &[ServiceSpec]) -> Vec<Interrupt> {
    let mut set = InterruptSet::EMPTY;
    for s in services {
        for i in s.interrupts.iter() {
            set.insert(i);
        }
        if let Some(Grant::Interrupts(g)) = s.grants.get(&Interface::Intercept) {
            for i in g.iter() {
                set.insert(i);
            }
        }
    }
    set.iter().collect()
}
