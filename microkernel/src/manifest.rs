//! `manifest.toml`: the complete statement of what every service may do.
//!
//! Parsing is strict (unknown keys are errors) and validation collects every problem at once.
//! Each [`Diagnostic`] names the file, line and column, says what is wrong and what would be
//! right. A manifest that passes [`Manifest::load`] is internally consistent: every endpoint
//! exists and is served exactly once, every call has a server, limits are sane, device ranges
//! do not overlap and syscall fragments cannot undo the sandbox.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use ipc_defs::bootstrap::MAX_CAPABILITIES;
use ipc_defs::bootstrap::MAX_NAME;
use ipc_defs::capability::FileAccess;
use ipc_defs::capability::Grant;
use ipc_defs::layout::MAX_RING_CAPACITY;
use ipc_defs::layout::MIN_RING_CAPACITY;
use ipc_defs::services::intercept::Interrupt;
use ipc_defs::services::intercept::InterruptSet;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::services::vmgs::FileIdSet;
use ipc_defs::services::vtpm::Localities;
use ipc_defs::services::vtpm::VtpmGrant;
use ipc_defs::Interface;
use serde::Deserialize;
use serde::Serialize;
use toml::Spanned;

use crate::plan::CapabilityPlan;
use crate::plan::Run;
use crate::privilege::UserSpec;

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

// ---- Raw schema (what the TOML says) ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawManifest {
    #[serde(default)]
    paravisor: Option<RawParavisor>,
    #[serde(default)]
    service: Vec<Spanned<RawService>>,
    #[serde(default)]
    attest: Option<RawAttest>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawAttest {
    sealing: Option<Spanned<String>>,
    key_release: Option<Spanned<String>>,
    key_release_id: Option<Spanned<String>>,
    platform_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawParavisor {
    state_dir: Option<Spanned<String>>,
    ring_capacity: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawService {
    name: Spanned<String>,
    binary: Spanned<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    serves: Vec<Spanned<String>>,
    #[serde(default)]
    calls: Vec<Spanned<RawCall>>,
    #[serde(default)]
    files: Vec<Spanned<RawFile>>,
    #[serde(default)]
    keys: Vec<Spanned<RawKey>>,
    #[serde(default)]
    listen: Vec<Spanned<RawListen>>,
    #[serde(default)]
    regions: Vec<Spanned<RawRegion>>,
    #[serde(default)]
    mmio: Vec<Spanned<RawRange>>,
    #[serde(default)]
    pio: Vec<Spanned<RawRange>>,
    /// IOAPIC lines the service's own devices raise (the intercept service only).
    #[serde(default)]
    interrupts: Vec<Spanned<i64>>,
    /// The PCI device (bus 0, 1..=31) whose configuration space the service answers.
    #[serde(default)]
    pci_device: Option<Spanned<i64>>,
    limits: Spanned<RawLimits>,
    restart: Spanned<RawRestart>,
    #[serde(default)]
    syscalls: Vec<Spanned<String>>,
    #[serde(default)]
    watchdog: Option<Spanned<String>>,
    /// Holds the calling end of the secure processor (the attest service only).
    #[serde(default)]
    platform: Option<Spanned<bool>>,
    /// The uid and gid it runs as (default: derived from its name).
    #[serde(default)]
    user: Option<Spanned<RawUser>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawUser {
    uid: Spanned<i64>,
    /// Default: the uid.
    #[serde(default)]
    gid: Option<Spanned<i64>>,
    /// Other services that say so too may share these ids.
    #[serde(default)]
    shared: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawCall {
    endpoint: Spanned<String>,
    #[serde(default)]
    file_ids: Option<Spanned<Vec<Spanned<String>>>>,
    /// For calls to intercept: the IOAPIC lines the caller may ask it to raise.
    #[serde(default)]
    interrupts: Option<Spanned<Vec<Spanned<i64>>>>,
    /// For calls to vtpm: what the caller may ask of the TPM ("commands", "platform").
    #[serde(default)]
    tpm: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawListen {
    name: Spanned<String>,
    #[serde(default)]
    address: Option<Spanned<String>>,
    /// A Unix socket, relative to the state directory.
    #[serde(default)]
    path: Option<Spanned<String>>,
    /// The TPM localities its connections' commands may use (default: 0 only).
    #[serde(default)]
    localities: Option<Spanned<Vec<Spanned<i64>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawKey {
    name: Spanned<String>,
    #[serde(default)]
    path: Option<Spanned<String>>,
    /// Kept sealed in the guest-state file instead of a key file.
    #[serde(default)]
    sealed: Option<Spanned<bool>>,
    #[serde(default)]
    missing: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawFile {
    name: Spanned<String>,
    path: Spanned<String>,
    access: Spanned<String>,
    #[serde(default)]
    missing: Option<Spanned<String>>,
    /// For `missing = "create-vmgs"`: the key (of this service) the new file is encrypted with.
    #[serde(default)]
    key: Option<Spanned<String>>,
    /// For `missing = "create-vmgs"`: the image size (default 4M).
    #[serde(default)]
    size: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRegion {
    name: Spanned<String>,
    size: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRange {
    base: Spanned<u64>,
    size: Spanned<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLimits {
    memory: Spanned<String>,
    open_files: Spanned<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRestart {
    policy: Spanned<String>,
    max: Spanned<i64>,
    window: Spanned<String>,
    backoff: Spanned<String>,
    #[serde(default)]
    max_backoff: Option<Spanned<String>>,
}

// ---- Validated model ----

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

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionGrant {
    pub name: String,
    pub size: u64,
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
    /// What each call may reach beyond the interface itself (e.g. the vmgs file ids), for
    /// the calls that are limited.
    #[serde(serialize_with = "ser_grants")]
    pub grants: BTreeMap<Interface, Grant>,
    pub regions: Vec<RegionGrant>,
    pub mmio: Vec<DeviceRange>,
    pub pio: Vec<DeviceRange>,
    /// Interrupt lines its own devices raise (intercept only).
    #[serde(serialize_with = "ser_interrupts")]
    pub interrupts: InterruptSet,
    /// The PCI device (bus 0) it owns: intercept's host bridge forwards that device's
    /// configuration accesses to it.
    pub pci_device: Option<u8>,
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

/// What the manifest may name as a default but the host chooses, never measured: (key as
/// written in the manifest or the host file, what it is).
pub const HOST_SETTINGS: &[(&str, &str)] = &[
    ("state-dir", "the state directory"),
    ("platform-dir", "the simulated secure processor's directory"),
    ("key-release", "the key broker's loopback address (the tenant key's id is measured)"),
    ("listen", "which front ends are bound, and their addresses and socket paths (a listener's name and localities are measured)"),
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

/// A key broker's address: loopback only.
pub fn parse_key_release(text: &str) -> Result<std::net::SocketAddr, (String, String)> {
    match text.parse::<std::net::SocketAddr>() {
        Ok(addr) if addr.ip().is_loopback() => Ok(addr),
        Ok(addr) => Err((
            format!("key-release address {addr} is not a loopback address"),
            "the key broker is reached on loopback only, e.g. \"127.0.0.1:8700\"".into(),
        )),
        Err(_) => Err((
            format!("key-release \"{text}\" is not an address"),
            "write host:port, e.g. \"127.0.0.1:8700\"".into(),
        )),
    }
}

fn parse_help(message: &str) -> String {
    if message.contains("unknown field") {
        "remove the key or fix its spelling; the accepted keys are listed in the message".into()
    } else if message.contains("missing field") {
        "add the key; every service needs name, binary, limits and restart".into()
    } else {
        "see the shipped manifest.toml for the expected shape".into()
    }
}

struct Validator<'a> {
    file: String,
    source: &'a str,
    diagnostics: Vec<Diagnostic>,
}

/// What the per-service passes record for the passes that span services: names, endpoints,
/// paths, addresses and device numbers already claimed (each later claim is checked against
/// them), and what can only be judged once every service is known.
#[derive(Default)]
struct Seen {
    /// Each service's name, where it is first defined.
    names: BTreeMap<String, Range<usize>>,
    /// Each served endpoint: its server and where it says so.
    servers: BTreeMap<Interface, (String, Range<usize>)>,
    /// Every call (client, endpoint, where), to check that some service serves it.
    pending_calls: Vec<(String, Interface, Range<usize>)>,
    /// Each service's last call that grants something: where a file-id clash points.
    call_spans: BTreeMap<String, Range<usize>>,
    /// Every granted file's path, and where.
    file_paths: Vec<(PathBuf, Range<usize>)>,
    /// Every key file's path, and where.
    key_paths: Vec<(PathBuf, Range<usize>)>,
    /// Every sealed key: (service, key, where).
    sealed_keys: Vec<(String, String, Range<usize>)>,
    /// The services that say `platform = true`, and where.
    platform_holders: Vec<(String, Range<usize>)>,
    /// TCP addresses listened on, and by which service.
    addresses: Vec<(String, std::net::SocketAddr)>,
    /// Listener names, and their service.
    listener_names: Vec<(String, String)>,
    /// Every service's valid mmio ranges, and where.
    mmio: Vec<(String, DeviceRange, Range<usize>)>,
    /// Every service's valid pio ranges, and where.
    pio: Vec<(String, DeviceRange, Range<usize>)>,
    /// PCI device numbers, and their owner.
    pci_owners: Vec<(String, u8)>,
    /// Each service's open-files limit and the service's span: the descriptors it needs
    /// depend on who calls it.
    pending_limits: Vec<(String, Spanned<i64>, Range<usize>)>,
    /// Services with `user = {...}`: their ids, and where.
    users: Vec<(String, UserSpec, Range<usize>)>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, message: impl Into<String>, help: impl Into<String>) {
        let (line, column) = line_col(self.source, span.start);
        self.diagnostics.push(Diagnostic {
            file: self.file.clone(),
            line,
            column,
            message: message.into(),
            help: help.into(),
        });
    }

    /// Checks `raw` pass by pass, collecting every problem, and builds the manifest it
    /// describes (meaningful only when no diagnostic was recorded). The passes run in this
    /// order, which is the order `paravisor check` prints diagnostics in: the `[paravisor]`
    /// table, each service on its own, the rules that span services, then `[attest]`.
    fn validate(&mut self, path: &Path, raw: RawManifest) -> Manifest {
        let (state_dir, ring_capacity, ring_span) = self.paravisor_settings(raw.paravisor);
        let mut seen = Seen::default();
        let services = self.services(raw.service, &mut seen);
        self.unserved_calls(seen.pending_calls, &seen.servers);
        self.open_files_and_capabilities(seen.pending_limits, &services);
        self.overlaps(&seen.mmio, "mmio");
        self.overlaps(&seen.pio, "pio");
        self.shared_ids(&seen.users);
        self.service_count(&services);
        self.state_paths(&seen.file_paths, &seen.key_paths, &services);
        self.vmgs_file_owners(&services, &seen.call_spans);
        self.vmgs_ring(ring_capacity, ring_span, &services);
        let attest = self.attest_settings(
            raw.attest,
            &services,
            &seen.sealed_keys,
            &seen.platform_holders,
        );
        Manifest {
            path: path.to_path_buf(),
            state_dir,
            ring_capacity,
            services,
            attest,
            source: self.source.to_string(),
        }
    }

    /// The `[paravisor]` table: a non-empty `state-dir`, and a `ring-capacity` that is a power
    /// of two within the ring layout's bounds. Returns the state directory, the ring capacity
    /// and where the capacity is written.
    fn paravisor_settings(
        &mut self,
        raw: Option<RawParavisor>,
    ) -> (PathBuf, u32, Option<Range<usize>>) {
        let mut state_dir = PathBuf::from(DEFAULT_STATE_DIR);
        let mut ring_capacity = DEFAULT_RING_CAPACITY;
        let mut ring_span: Option<Range<usize>> = None;
        if let Some(p) = raw {
            if let Some(dir) = p.state_dir {
                if dir.get_ref().is_empty() {
                    self.error(
                        dir.span(),
                        "state-dir is empty",
                        "name a directory, e.g. \"state\"",
                    );
                } else {
                    state_dir = PathBuf::from(dir.get_ref());
                }
            }
            if let Some(cap) = p.ring_capacity {
                ring_span = Some(cap.span());
                match parse_size(cap.get_ref()) {
                    Some(n)
                        if n.is_power_of_two()
                            && (MIN_RING_CAPACITY as u64..=MAX_RING_CAPACITY as u64)
                                .contains(&n) =>
                    {
                        ring_capacity = n as u32
                    }
                    _ => self.error(
                        cap.span(),
                        format!("ring-capacity \"{}\" is not usable", cap.get_ref()),
                        format!(
                            "use a power of two between {}K and {}M, e.g. \"64K\"",
                            MIN_RING_CAPACITY >> 10,
                            MAX_RING_CAPACITY >> 20
                        ),
                    ),
                }
            }
        }
        (state_dir, ring_capacity, ring_span)
    }

    /// Every `[[service]]` table, in the order written; a manifest needs at least one.
    fn services(&mut self, raw: Vec<Spanned<RawService>>, seen: &mut Seen) -> Vec<ServiceSpec> {
        if raw.is_empty() {
            self.error(
                0..0,
                "the manifest describes no service",
                "add [[service]] tables, one per service process",
            );
        }
        let mut services = Vec::new();
        for raw_service in raw {
            services.push(self.service(raw_service, seen));
        }
        services
    }

    /// One `[[service]]` table on its own: its name, binary, endpoints (it must serve or call
    /// something), grants, devices, limits, restart policy, syscalls, watchdog and user.
    /// What can only be judged against the other services is recorded in `seen`.
    fn service(&mut self, raw_service: Spanned<RawService>, seen: &mut Seen) -> ServiceSpec {
        let service_span = raw_service.span();
        let s = raw_service.into_inner();
        let name = s.name.get_ref().clone();
        self.service_name(&s.name, seen);
        let binary = self.binary(&s.binary);
        let serves = self.serves(&s.serves, &name, seen);
        let (calls, mut grants) = self.calls(&s.calls, &name, &serves, seen);
        if serves.is_empty() && calls.is_empty() {
            self.error(
                s.name.span(),
                format!("service \"{name}\" serves nothing and calls nothing"),
                "a disconnected service can do nothing useful; give it `serves` or `calls`, or remove it",
            );
        }
        let files = self.files(&s.files, &s.keys, seen);
        let keys = self.keys(&s.keys, &name, seen);
        let listen = self.listeners(&s.listen, &name, &grants, seen);
        let regions = self.regions(&s.regions);
        let (mmio, pio, pci_device) = self.guest_devices(&s, &name, &serves, &service_span, seen);
        let interrupts = self.own_interrupts(&s.interrupts, &name, &serves);
        let limits = self.limits(s.limits.get_ref(), &name, &service_span, seen);
        let restart = self.restart(s.restart.get_ref());
        let syscalls = self.syscalls(&s.syscalls);
        let watchdog = self.watchdog(s.watchdog.as_ref());

        // A front end's TPM commands may use the localities its listeners are granted.
        if let Some(Grant::Vtpm(g)) = grants.get_mut(&Interface::Vtpm) {
            if !g.commands.is_empty() {
                for l in &listen {
                    g.commands = g.commands.union(l.localities);
                }
            }
        }
        let user = s.user.as_ref().and_then(|u| self.user(u));
        if let (Some(spec), Some(raw)) = (user, &s.user) {
            seen.users.push((name.clone(), spec, raw.span()));
        }
        if let Some(p) = s.platform.as_ref().filter(|p| *p.get_ref()) {
            seen.platform_holders.push((name.clone(), p.span()));
        }
        ServiceSpec {
            user,
            name,
            watchdog,
            binary,
            args: s.args,
            serves,
            calls,
            files,
            keys,
            listen,
            grants,
            regions,
            mmio,
            pio,
            interrupts,
            pci_device,
            limits,
            restart,
            syscalls,
            platform: s.platform.as_ref().is_some_and(|p| *p.get_ref()),
        }
    }

    /// A service's name: valid, not reserved for the paravisor, and not another service's.
    fn service_name(&mut self, raw: &Spanned<String>, seen: &mut Seen) {
        let name = raw.get_ref();
        if !valid_name(name) {
            self.error(
                raw.span(),
                format!("service name \"{name}\" is not a valid name"),
                format!("use 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
            );
        } else if RESERVED_NAMES.contains(&name.as_str()) {
            self.error(
                raw.span(),
                format!("service name \"{name}\" is reserved"),
                format!(
                    "the paravisor itself uses {}; pick another name",
                    RESERVED_NAMES.join(", ")
                ),
            );
        }
        if let Some(first) = seen.names.get(name) {
            let (line, _) = line_col(self.source, first.start);
            self.error(
                raw.span(),
                format!("service \"{name}\" is defined twice (first at line {line})"),
                "give each service a unique name",
            );
        } else {
            seen.names.insert(name.clone(), raw.span());
        }
    }

    /// `binary`: a plain executable name (found next to the paravisor), not a path.
    fn binary(&mut self, raw: &Spanned<String>) -> String {
        let binary = raw.get_ref().clone();
        if binary.is_empty() || binary.contains('/') || binary.starts_with('.') {
            self.error(
                raw.span(),
                format!("binary \"{binary}\" must be a plain executable name"),
                "binaries are found next to the paravisor executable; write e.g. \"pv-vmgs\"",
            );
        }
        binary
    }

    /// `serves`: each endpoint known, and served by one service only.
    fn serves(&mut self, raw: &[Spanned<String>], name: &str, seen: &mut Seen) -> Vec<Interface> {
        let mut serves = Vec::new();
        for ep in raw {
            match Interface::from_name(ep.get_ref()) {
                Some(i) => {
                    if let Some((other, first)) = seen.servers.get(&i) {
                        let (line, _) = line_col(self.source, first.start);
                        self.error(
                            ep.span(),
                            format!(
                                "endpoint \"{i}\" is served twice: by \"{other}\" (line {line}) and by \"{name}\""
                            ),
                            "exactly one service may serve an endpoint; remove one of the two",
                        );
                    } else {
                        seen.servers.insert(i, (name.to_string(), ep.span()));
                    }
                    serves.push(i);
                }
                None => self.unknown_endpoint(ep),
            }
        }
        serves
    }

    /// `calls`: each endpoint known, listed once and not served by the caller itself, with
    /// what the call grants ([`Self::call_grant`]). That some service serves it is checked
    /// once every service is known ([`Self::unserved_calls`]).
    fn calls(
        &mut self,
        raw: &[Spanned<RawCall>],
        name: &str,
        serves: &[Interface],
        seen: &mut Seen,
    ) -> (Vec<Interface>, BTreeMap<Interface, Grant>) {
        let mut calls = Vec::new();
        let mut grants = BTreeMap::new();
        for call in raw {
            let ep = &call.get_ref().endpoint;
            match Interface::from_name(ep.get_ref()) {
                Some(i) if calls.contains(&i) => self.error(
                    ep.span(),
                    format!("service \"{name}\" lists a call to \"{i}\" twice"),
                    "list each endpoint once",
                ),
                Some(i) if serves.contains(&i) => self.error(
                    ep.span(),
                    format!("service \"{name}\" calls \"{i}\", which it serves itself"),
                    "a service handles its own endpoint internally; remove the call",
                ),
                Some(i) => {
                    calls.push(i);
                    seen.pending_calls.push((name.to_string(), i, ep.span()));
                    if let Some(g) = self.call_grant(i, call.get_ref(), call.span()) {
                        grants.insert(i, g);
                        seen.call_spans.insert(name.to_string(), call.span());
                    }
                }
                None => self.unknown_endpoint(ep),
            }
        }
        (calls, grants)
    }

    /// `files`: valid names, paths inside the state directory, a known access and `missing`
    /// mode (`key` and `size` only with "create-vmgs"), and no read-only file created when
    /// missing. Paths shared with other grants are checked in [`Self::state_paths`].
    fn files(
        &mut self,
        raw: &[Spanned<RawFile>],
        keys: &[Spanned<RawKey>],
        seen: &mut Seen,
    ) -> Vec<FileGrant> {
        let mut files = Vec::new();
        for f in raw {
            let f = f.get_ref();
            let fname = f.name.get_ref();
            if !valid_name(fname) {
                self.error(
                    f.name.span(),
                    format!("file name \"{fname}\" is not a valid name"),
                    format!("use 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
                );
            }
            let p = PathBuf::from(f.path.get_ref());
            self.check_state_path(&f.path, "file");
            seen.file_paths.push((p.clone(), f.path.span()));
            let access = match f.access.get_ref().as_str() {
                "read-only" => FileAccess::ReadOnly,
                "read-write" => FileAccess::ReadWrite,
                other => {
                    self.error(
                        f.access.span(),
                        format!("file access \"{other}\" is unknown"),
                        "use \"read-only\" or \"read-write\"",
                    );
                    FileAccess::ReadOnly
                }
            };
            let missing = match f.missing.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
                None | Some(("error", _)) => Missing::Error,
                Some(("create", _)) => Missing::Create,
                Some(("create-vmgs", span)) => self.create_vmgs(f, span, keys),
                Some((other, span)) => {
                    self.error(
                        span,
                        format!("missing = \"{other}\" is unknown"),
                        "use \"error\", \"create\" or \"create-vmgs\"",
                    );
                    Missing::Error
                }
            };
            if !matches!(missing, Missing::CreateVmgs { .. }) {
                for (what, field) in [("key", &f.key), ("size", &f.size)] {
                    if let Some(field) = field {
                        self.error(
                            field.span(),
                            format!("`{what}` applies only to missing = \"create-vmgs\""),
                            "remove it, or set missing = \"create-vmgs\"",
                        );
                    }
                }
            }
            if missing != Missing::Error && access == FileAccess::ReadOnly {
                self.error(
                    f.access.span(),
                    "a read-only file cannot be created when missing",
                    "use access = \"read-write\" or missing = \"error\"",
                );
            }
            files.push(FileGrant {
                name: fname.clone(),
                path: p,
                access,
                missing,
            });
        }
        files
    }

    /// `keys`: valid, unique names; each key either in a key file inside the state directory
    /// or sealed (not both), with a known `missing` mode.
    fn keys(&mut self, raw: &[Spanned<RawKey>], name: &str, seen: &mut Seen) -> Vec<KeyGrant> {
        let mut keys = Vec::new();
        for k in raw {
            let k = k.get_ref();
            let kname = k.name.get_ref();
            if !valid_name(kname) {
                self.error(
                    k.name.span(),
                    format!("key name \"{kname}\" is not a valid name"),
                    format!("use 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
                );
            }
            if keys.iter().any(|x: &KeyGrant| &x.name == kname) {
                self.error(
                    k.name.span(),
                    format!("key \"{kname}\" is listed twice"),
                    "give each key a unique name",
                );
            }
            let sealed = k.sealed.as_ref().is_some_and(|b| *b.get_ref());
            let path = match (&k.path, sealed) {
                (Some(p), false) => {
                    self.check_state_path(p, "key");
                    seen.key_paths.push((PathBuf::from(p.get_ref()), p.span()));
                    Some(PathBuf::from(p.get_ref()))
                }
                (None, true) => {
                    seen.sealed_keys
                        .push((name.to_string(), kname.clone(), k.name.span()));
                    None
                }
                _ => {
                    self.error(
                        k.name.span(),
                        format!("key \"{kname}\" needs either a `path` or `sealed = true`"),
                        "a key lives in a key file in the state directory (`path = \"...\"`) or sealed in its guest-state file (`sealed = true`), not both",
                    );
                    None
                }
            };
            let missing = match k.missing.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
                None | Some(("error", _)) => MissingKey::Error,
                Some(("create", _)) => MissingKey::Create,
                Some((other, span)) => {
                    self.error(
                        span,
                        format!("missing = \"{other}\" is unknown for a key"),
                        "use \"error\" or \"create\"",
                    );
                    MissingKey::Error
                }
            };
            keys.push(KeyGrant {
                name: kname.clone(),
                path,
                missing,
            });
        }
        keys
    }

    /// `listen`: names valid and unique across the manifest; each listener on exactly one of
    /// a loopback TCP address (no address listened on twice) or a Unix socket inside the
    /// state directory, with its TPM localities ([`Self::localities`]).
    fn listeners(
        &mut self,
        raw: &[Spanned<RawListen>],
        name: &str,
        grants: &BTreeMap<Interface, Grant>,
        seen: &mut Seen,
    ) -> Vec<ListenGrant> {
        let mut listen: Vec<ListenGrant> = Vec::new();
        for l in raw {
            let l = l.get_ref();
            let lname = l.name.get_ref();
            if !valid_name(lname) || listen.iter().any(|x| &x.name == lname) {
                self.error(
                    l.name.span(),
                    format!("listener name \"{lname}\" is invalid or listed twice"),
                    format!("use unique names of 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
                );
            } else if let Some((_, other)) = seen.listener_names.iter().find(|(n, _)| n == lname) {
                self.error(
                    l.name.span(),
                    format!("listener name \"{lname}\" is also a listener of \"{other}\""),
                    "`paravisor run --listen NAME` names a listener: give each one a name of its own",
                );
            }
            seen.listener_names.push((lname.clone(), name.to_string()));
            let localities = self.localities(l, name, grants);
            match (&l.address, &l.path) {
                (Some(address), None) => match address.get_ref().parse::<std::net::SocketAddr>() {
                    Ok(a) if a.ip().is_loopback() && a.port() != 0 => {
                        if let Some((other, _)) = seen.addresses.iter().find(|(_, x)| *x == a) {
                            self.error(
                                address.span(),
                                format!("address {a} is already listened on by \"{other}\""),
                                "give each listener its own port",
                            );
                        }
                        seen.addresses.push((name.to_string(), a));
                        listen.push(ListenGrant {
                            name: lname.clone(),
                            address: ListenAddress::Tcp(a),
                            localities,
                        });
                    }
                    Ok(a) => self.error(
                        address.span(),
                        format!("listen address {a} is not a loopback address with a port"),
                        "listen on 127.0.0.1:PORT or [::1]:PORT only: the TPM is never exposed to the network",
                    ),
                    Err(_) => self.error(
                        address.span(),
                        format!("\"{}\" is not an address", address.get_ref()),
                        "write e.g. \"127.0.0.1:2321\"",
                    ),
                },
                (None, Some(path)) => {
                    self.check_state_path(path, "listener");
                    listen.push(ListenGrant {
                        name: lname.clone(),
                        address: ListenAddress::Unix(PathBuf::from(path.get_ref())),
                        localities,
                    });
                }
                _ => self.error(
                    l.name.span(),
                    format!("listener \"{lname}\" needs exactly one of `address` (loopback TCP) and `path` (Unix socket)"),
                    "write address = \"127.0.0.1:PORT\" or path = \"tpm/swtpm.sock\"",
                ),
            }
        }
        listen
    }

    /// `regions`: valid, unique names, each with a size neither zero nor above MAX_MEMORY.
    fn regions(&mut self, raw: &[Spanned<RawRegion>]) -> Vec<RegionGrant> {
        let mut regions = Vec::new();
        for r in raw {
            let r = r.get_ref();
            let rname = r.name.get_ref();
            if !valid_name(rname) {
                self.error(
                    r.name.span(),
                    format!("region name \"{rname}\" is not a valid name"),
                    format!("use 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
                );
            }
            if regions.iter().any(|x: &RegionGrant| &x.name == rname) {
                self.error(
                    r.name.span(),
                    format!("region \"{rname}\" is listed twice"),
                    "give each region a unique name",
                );
            }
            match parse_size(r.size.get_ref()) {
                Some(n) if n > 0 && n <= MAX_MEMORY => regions.push(RegionGrant {
                    name: rname.clone(),
                    size: n,
                }),
                _ => self.error(
                    r.size.span(),
                    format!(
                        "region size \"{}\" is zero, absurd or unreadable",
                        r.size.get_ref()
                    ),
                    "write a size such as \"256K\" or \"4M\"",
                ),
            }
        }
        regions
    }

    /// What a service owns of the guest's address spaces: its `mmio` and `pio` ranges
    /// ([`Self::device_ranges`]) and its `pci-device`; a service that owns any of them serves
    /// exactly one interface that takes guest accesses. Overlaps between services are
    /// checked once every service is known ([`Self::overlaps`]).
    fn guest_devices(
        &mut self,
        s: &RawService,
        name: &str,
        serves: &[Interface],
        service_span: &Range<usize>,
        seen: &mut Seen,
    ) -> (Vec<DeviceRange>, Vec<DeviceRange>, Option<u8>) {
        let my_mmio = self.device_ranges(&s.mmio, "mmio");
        let my_pio = self.device_ranges(&s.pio, "pio");
        for (r, span) in &my_mmio {
            seen.mmio.push((name.to_string(), *r, span.clone()));
        }
        for (r, span) in &my_pio {
            seen.pio.push((name.to_string(), *r, span.clone()));
        }
        let pci_device = self.pci_device(s.pci_device.as_ref(), name, seen);
        if !my_mmio.is_empty() || !my_pio.is_empty() || pci_device.is_some() {
            let device_interfaces: Vec<Interface> = serves
                .iter()
                .copied()
                .filter(|i| crate::partition::router::takes_guest_accesses(*i))
                .collect();
            if device_interfaces.len() != 1 {
                let span = my_mmio
                    .first()
                    .or(my_pio.first())
                    .map(|(_, s)| s.clone())
                    .or(s.pci_device.as_ref().map(|d| d.span()))
                    .unwrap_or(service_span.clone());
                self.error(
                    span,
                    format!(
                        "service \"{name}\" owns guest address ranges or a PCI device but serves {} interface(s) that take guest accesses",
                        device_interfaces.len()
                    ),
                    "a range's accesses go to the one interface of its service that takes them (intercept or vtpm); serve exactly one",
                );
            }
        }
        (
            my_mmio.into_iter().map(|(r, _)| r).collect(),
            my_pio.into_iter().map(|(r, _)| r).collect(),
            pci_device,
        )
    }

    /// `mmio` or `pio` ranges (`what`): each non-empty, within its address space (2^52 or
    /// 2^16) and, for ports, clear of the port the partition answers itself. Returns the
    /// valid ones with where each is written.
    fn device_ranges(
        &mut self,
        list: &[Spanned<RawRange>],
        what: &str,
    ) -> Vec<(DeviceRange, Range<usize>)> {
        let mut out = Vec::new();
        for r in list {
            let range = DeviceRange {
                base: *r.get_ref().base.get_ref(),
                size: *r.get_ref().size.get_ref(),
            };
            let limit = if what == "pio" {
                1u64 << 16
            } else {
                1u64 << 52
            };
            if range.size == 0 {
                self.error(
                    r.span(),
                    format!("{what} range at {:#x} has size 0", range.base),
                    "give the range a non-zero size",
                );
            } else if range
                .base
                .checked_add(range.size)
                .is_none_or(|end| end > limit)
            {
                self.error(r.span(), format!("{what} range {:#x}+{:#x} runs past the end of the {what} space ({limit:#x})", range.base, range.size), "fix base or size");
            } else if what == "pio"
                && (range.base..range.base + range.size)
                    .contains(&u64::from(crate::partition::router::IN_THREAD_PORT))
            {
                self.error(
                    r.span(),
                    format!(
                        "pio range {:#x}+{:#x} covers port {:#x}, which the partition answers itself",
                        range.base,
                        range.size,
                        crate::partition::router::IN_THREAD_PORT
                    ),
                    "that port is the exit benchmark's in-thread baseline; move the range",
                );
            } else {
                out.push((range, r.span()));
            }
        }
        out
    }

    /// `pci-device`: a device number on bus 0 (1..=31), owned by one service only.
    fn pci_device(
        &mut self,
        raw: Option<&Spanned<i64>>,
        name: &str,
        seen: &mut Seen,
    ) -> Option<u8> {
        match raw {
            None => None,
            Some(d) => match u8::try_from(*d.get_ref()) {
                Ok(n) if (1..=31).contains(&n) => {
                    if let Some((other, _)) = seen.pci_owners.iter().find(|(_, x)| *x == n) {
                        self.error(
                            d.span(),
                            format!("PCI device {n} is already owned by \"{other}\""),
                            "give each device service its own device number",
                        );
                    }
                    seen.pci_owners.push((name.to_string(), n));
                    Some(n)
                }
                _ => {
                    self.error(
                        d.span(),
                        format!("PCI device {} does not exist on bus 0", d.get_ref()),
                        "use 1..=31 (00:00 is the host bridge)",
                    );
                    None
                }
            },
        }
    }

    /// `interrupts`: the lines the service's own devices raise ([`Self::interrupt_list`]);
    /// only the service that serves intercept holds interrupt lines.
    fn own_interrupts(
        &mut self,
        raw: &[Spanned<i64>],
        name: &str,
        serves: &[Interface],
    ) -> InterruptSet {
        let own_interrupts = self.interrupt_list(raw);
        if !own_interrupts.is_empty() && !serves.contains(&Interface::Intercept) {
            self.error(
                raw[0].span(),
                format!("service \"{name}\" lists interrupts but does not serve intercept"),
                "only intercept holds interrupt lines; a device asks it: put `interrupts = [..]` in the device's call to intercept",
            );
        }
        own_interrupts
    }

    /// `limits`: a memory limit between MIN_MEMORY and MAX_MEMORY. The open-files limit is
    /// checked once every service is known ([`Self::open_files_and_capabilities`]).
    fn limits(
        &mut self,
        limits: &RawLimits,
        name: &str,
        service_span: &Range<usize>,
        seen: &mut Seen,
    ) -> Limits {
        let memory = match parse_size(limits.memory.get_ref()) {
            Some(n) if (MIN_MEMORY..=MAX_MEMORY).contains(&n) => n,
            Some(0) => {
                self.error(
                    limits.memory.span(),
                    "memory limit is zero",
                    format!("give at least {}M", MIN_MEMORY >> 20),
                );
                0
            }
            Some(n) => {
                self.error(
                    limits.memory.span(),
                    format!("memory limit {} is absurd", format_size(n)),
                    format!(
                        "use between {}M and {}G",
                        MIN_MEMORY >> 20,
                        MAX_MEMORY >> 30
                    ),
                );
                0
            }
            None => {
                self.error(
                    limits.memory.span(),
                    format!("memory limit \"{}\" is not a size", limits.memory.get_ref()),
                    "write a size such as \"64M\"",
                );
                0
            }
        };
        // Checked once every service is known: the serving channels depend on who calls.
        seen.pending_limits.push((
            name.to_string(),
            limits.open_files.clone(),
            service_span.clone(),
        ));
        let open_files = *limits.open_files.get_ref();
        Limits {
            memory,
            open_files: open_files.max(0) as u64,
        }
    }

    /// `syscalls`: kernel syscall names, each once, none of the FORBIDDEN_SYSCALLS that would
    /// let a service leave its sandbox.
    fn syscalls(&mut self, raw: &[Spanned<String>]) -> Vec<String> {
        let mut syscalls = Vec::new();
        for sc in raw {
            let sname = sc.get_ref();
            if FORBIDDEN_SYSCALLS.contains(&sname.as_str()) {
                self.error(
                    sc.span(),
                    format!("syscall \"{sname}\" would let the service leave its sandbox"),
                    "no service may be granted it; do the work in the microkernel and pass a capability instead",
                );
            } else if sname.parse::<syscalls::Sysno>().is_err() {
                self.error(
                    sc.span(),
                    format!("\"{sname}\" is not an x86_64 syscall name"),
                    "use the kernel's name, e.g. \"pwrite64\" or \"fdatasync\"",
                );
            } else if syscalls.contains(sname) {
                self.error(
                    sc.span(),
                    format!("syscall \"{sname}\" is listed twice"),
                    "list it once",
                );
            } else {
                syscalls.push(sname.clone());
            }
        }
        syscalls
    }

    /// `watchdog`: a duration between MIN_WATCHDOG and MAX_WATCHDOG (DEFAULT_WATCHDOG when
    /// absent).
    fn watchdog(&mut self, raw: Option<&Spanned<String>>) -> Duration {
        match raw {
            None => DEFAULT_WATCHDOG,
            Some(w) => match parse_duration(w.get_ref()) {
                Some(d) if (MIN_WATCHDOG..=MAX_WATCHDOG).contains(&d) => d,
                _ => {
                    self.error(
                        w.span(),
                        format!("watchdog \"{}\" is not a duration between 1s and 1h", w.get_ref()),
                        "write e.g. \"10s\"; a hung service is killed after this long without answering",
                    );
                    DEFAULT_WATCHDOG
                }
            },
        }
    }

    /// Every call has a server (checked once every service is known).
    fn unserved_calls(
        &mut self,
        pending_calls: Vec<(String, Interface, Range<usize>)>,
        servers: &BTreeMap<Interface, (String, Range<usize>)>,
    ) {
        for (client, endpoint, span) in pending_calls {
            if !servers.contains_key(&endpoint) {
                self.error(
                    span,
                    format!("service \"{client}\" calls \"{endpoint}\", but no service serves it"),
                    format!("add \"{endpoint}\" to the `serves` of the service that implements it, or remove the call"),
                );
            }
        }
    }

    /// Each service's open-files limit is positive, at most MAX_OPEN_FILES and room for the
    /// descriptors it holds, and its capabilities fit the bootstrap record. Both depend on
    /// who calls it, so they are checked once every service is known.
    fn open_files_and_capabilities(
        &mut self,
        pending_limits: Vec<(String, Spanned<i64>, Range<usize>)>,
        services: &[ServiceSpec],
    ) {
        // The most a run hands each service: a guest partition, every declared listener.
        let plan = CapabilityPlan::new(services, Run::MOST);
        for (name, open_files_spanned, service_span) in pending_limits {
            let Some(i) = services.iter().position(|x| x.name == name) else {
                continue;
            };
            let capabilities = plan.slots(i).len();
            let open_files = *open_files_spanned.get_ref();
            let needed = BASE_DESCRIPTORS + capabilities as u64;
            if open_files <= 0 {
                self.error(
                    open_files_spanned.span(),
                    format!("open-files limit {open_files} is zero or negative"),
                    format!("this service needs at least {needed}"),
                );
            } else if open_files as u64 > MAX_OPEN_FILES {
                self.error(
                    open_files_spanned.span(),
                    format!("open-files limit {open_files} is absurd"),
                    format!("use at most {MAX_OPEN_FILES}"),
                );
            } else if (open_files as u64) < needed {
                self.error(
                    open_files_spanned.span(),
                    format!("open-files limit {open_files} is below the {needed} descriptors this service holds"),
                    format!("raise it to at least {needed}"),
                );
            }
            if capabilities > MAX_CAPABILITIES {
                self.error(
                    service_span,
                    format!("service \"{name}\" holds {capabilities} capabilities"),
                    format!("at most {MAX_CAPABILITIES} fit the bootstrap record; split the service or its clients"),
                );
            }
        }
    }

    /// At most MAX_SERVICES services.
    fn service_count(&mut self, services: &[ServiceSpec]) {
        if services.len() > MAX_SERVICES {
            self.error(
                0..0,
                format!("the manifest describes {} services", services.len()),
                format!("at most {MAX_SERVICES}: each runs under a uid of its own"),
            );
        }
    }

    /// Paths granted across services: a guest-state file is granted to one service only, a
    /// key file is never also granted as a file, and no key file is listed twice.
    fn state_paths(
        &mut self,
        file_paths: &[(PathBuf, Range<usize>)],
        key_paths: &[(PathBuf, Range<usize>)],
        services: &[ServiceSpec],
    ) {
        for (i, (path, span)) in file_paths.iter().enumerate() {
            if file_paths[..i].iter().any(|(p, _)| p == path)
                && services
                    .iter()
                    .flat_map(|s| &s.files)
                    .any(|f| &f.path == path && matches!(f.missing, Missing::CreateVmgs { .. }))
            {
                self.error(
                    span.clone(),
                    format!("\"{}\" is a guest-state file; it is granted to one service only", path.display()),
                    "other services reach the guest state through the vmgs endpoint and its file-ids",
                );
            }
            if key_paths.iter().any(|(k, _)| k == path) {
                self.error(
                    span.clone(),
                    format!(
                        "\"{}\" is a key file; it cannot also be granted as a file",
                        path.display()
                    ),
                    "keys reach services only as key capabilities; give the file another path",
                );
            }
        }
        for (i, (path, span)) in key_paths.iter().enumerate() {
            if key_paths[..i].iter().any(|(k, _)| k == path) {
                self.error(
                    span.clone(),
                    format!("key file \"{}\" is listed twice", path.display()),
                    "give each key its own file",
                );
            }
        }
    }

    /// Each VMGS file id belongs to one client: two clients writing the same id would
    /// overwrite each other (a retried write could even undo the other's newer one).
    fn vmgs_file_owners(
        &mut self,
        services: &[ServiceSpec],
        call_spans: &BTreeMap<String, Range<usize>>,
    ) {
        let mut owners: BTreeMap<FileId, String> = BTreeMap::new();
        for s in services {
            if let Some(Grant::VmgsFiles(set)) = s.grants.get(&Interface::Vmgs) {
                for id in set.iter() {
                    if let Some(other) = owners.insert(id, s.name.clone()) {
                        let span = call_spans.get(&s.name).cloned().unwrap_or(0..0);
                        self.error(
                            span,
                            format!(
                                "file id {id} is granted to both \"{other}\" and \"{}\"",
                                s.name
                            ),
                            "grant each VMGS file id to one client only",
                        );
                    }
                }
            }
        }
    }

    /// With a vmgs endpoint, the ring capacity holds a full chunk (MIN_VMGS_RING).
    fn vmgs_ring(
        &mut self,
        ring_capacity: u32,
        ring_span: Option<Range<usize>>,
        services: &[ServiceSpec],
    ) {
        if ring_capacity < MIN_VMGS_RING
            && services.iter().any(|s| s.serves.contains(&Interface::Vmgs))
        {
            self.error(
                ring_span.unwrap_or(0..0),
                format!(
                    "ring-capacity {} is too small for the vmgs endpoint (its chunks need {})",
                    format_size(ring_capacity.into()),
                    format_size(MIN_VMGS_RING.into())
                ),
                format!(
                    "set ring-capacity to at least \"{}\"",
                    format_size(MIN_VMGS_RING.into())
                ),
            );
        }
    }

    /// The `[attest]` table, and the rules of the platform capability and sealed keys.
    fn attest_settings(
        &mut self,
        raw: Option<RawAttest>,
        services: &[ServiceSpec],
        sealed_keys: &[(String, String, Range<usize>)],
        platform_holders: &[(String, Range<usize>)],
    ) -> AttestSettings {
        let mut settings = AttestSettings::default();
        for (holder, span) in platform_holders {
            let serves_attest = services
                .iter()
                .any(|s| &s.name == holder && s.serves.contains(&Interface::Attest));
            if !serves_attest {
                self.error(
                    span.clone(),
                    format!("service \"{holder}\" holds the platform but does not serve attest"),
                    "only the attestation service may reach the secure processor; remove `platform = true`",
                );
            }
        }
        if platform_holders.len() > 1 {
            self.error(
                platform_holders[1].1.clone(),
                "more than one service holds the platform",
                "`platform = true` belongs to the one service that serves attest",
            );
        }
        if sealed_keys.len() > 1 {
            self.error(
                sealed_keys[1].2.clone(),
                "more than one sealed key",
                "the paravisor seals one key, the guest-state file's datastore key",
            );
        }
        if !sealed_keys.is_empty() {
            // The microkernel writes the key protectors itself; a client holding one could
            // replace it and lose the key.
            for s in services {
                if let Some(Grant::VmgsFiles(set)) = s.grants.get(&Interface::Vmgs) {
                    for id in [FileId::HW_KEY_PROTECTOR, FileId::KEY_PROTECTOR] {
                        if set.contains(id) {
                            self.error(
                                sealed_keys[0].2.clone(),
                                format!("service \"{}\" is granted {id}, which holds the sealed datastore key", s.name),
                                "with a sealed key, HW_KEY_PROTECTOR and KEY_PROTECTOR belong to the microkernel: remove them from the service's file-ids",
                            );
                        }
                    }
                }
            }
        }
        for (service, key, span) in sealed_keys {
            let stored = services.iter().any(|s| {
                &s.name == service
                    && s.files.iter().any(
                        |f| matches!(&f.missing, Missing::CreateVmgs { key: k, .. } if k == key),
                    )
            });
            if !stored {
                self.error(
                    span.clone(),
                    format!("sealed key \"{key}\" is not the key of a guest-state file of \"{service}\""),
                    "a sealed key is kept in the guest-state file it encrypts: add `key = \"<this key>\"` to that file (missing = \"create-vmgs\")",
                );
            }
            if !services.iter().any(|s| s.platform) {
                self.error(
                    span.clone(),
                    format!("sealed key \"{key}\" needs the attest service to hold the platform"),
                    "add `platform = true` to the service that serves attest",
                );
            }
        }
        let Some(raw) = raw else {
            return settings;
        };
        if let Some(p) = raw.sealing {
            match p.get_ref().as_str() {
                "platform" => settings.sealing = Sealing::Platform,
                "measurement" => settings.sealing = Sealing::Measurement,
                other => self.error(
                    p.span(),
                    format!("sealing = \"{other}\" is unknown"),
                    "use \"platform\" (chip and TCB only: survives rebuilds) or \"measurement\" (also the launch measurement: production)",
                ),
            }
        }
        // Key release: the tenant key's id is measured (it decides which key may open the
        // state); the broker's address is a host setting (a default here, `--host` overrides).
        if let Some(a) = &raw.key_release {
            match parse_key_release(a.get_ref()) {
                Ok(addr) => settings.key_release = Some(addr),
                Err((message, help)) => self.error(a.span(), message, help),
            }
            if raw.key_release_id.is_none() {
                self.error(
                    a.span(),
                    "key-release without key-release-id",
                    "pin the tenant key's id (`paravisor kbs init-key` prints it): without it, a broker the host runs could hand over a key of its own",
                );
            }
        }
        if let Some(id) = &raw.key_release_id {
            if id.get_ref().len() == 64 && id.get_ref().bytes().all(|b| b.is_ascii_hexdigit()) {
                settings.key_release_id = Some(id.get_ref().to_ascii_lowercase());
            } else {
                self.error(
                    id.span(),
                    "key-release-id is not a key id",
                    "the 64 hex digits `paravisor kbs init-key` prints for the tenant key",
                );
            }
            if sealed_keys.is_empty() {
                self.error(
                    id.span(),
                    "key release without a sealed key",
                    "key release protects the sealed datastore key: declare it with `sealed = true`",
                );
            }
        }
        if let Some(d) = raw.platform_dir {
            if d.get_ref().is_empty() {
                self.error(
                    d.span(),
                    "platform-dir is empty",
                    "name a directory, e.g. \"platform\"",
                );
            } else {
                settings.platform_dir = Some(PathBuf::from(d.get_ref()));
            }
        }
        settings
    }

    /// `user = { uid = N, gid = N, shared = true }`: ids that are not root's, not the
    /// overflow id and not -1.
    fn user(&mut self, raw: &Spanned<RawUser>) -> Option<UserSpec> {
        let u = raw.get_ref();
        let mut id = |v: &Spanned<i64>, what: &str| -> Option<u32> {
            match u32::try_from(*v.get_ref()) {
                Ok(0) => {
                    self.error(
                        v.span(),
                        format!("{what} 0 is root's"),
                        "a service never runs as root: pick an unused id, or remove `user` to derive one from the service's name",
                    );
                    None
                }
                Ok(crate::privilege::OVERFLOW_ID) => {
                    self.error(
                        v.span(),
                        format!("{what} {} is the overflow id (nobody/nogroup), shared by unrelated daemons", crate::privilege::OVERFLOW_ID),
                        "pick an id of the service's own",
                    );
                    None
                }
                Ok(n) if n != u32::MAX => Some(n),
                _ => {
                    self.error(
                        v.span(),
                        format!("{what} {} is not a usable id", v.get_ref()),
                        format!(
                            "use 1 to {} (not {})",
                            u32::MAX - 1,
                            crate::privilege::OVERFLOW_ID
                        ),
                    );
                    None
                }
            }
        };
        let uid = id(&u.uid, "uid");
        let gid = match &u.gid {
            Some(g) => id(g, "gid"),
            None => uid,
        };
        Some(UserSpec {
            uid: uid?,
            gid: gid?,
            shared: u.shared.as_ref().is_some_and(|b| *b.get_ref()),
        })
    }

    /// Two services with the same uid or gid could signal and trace each other: an error
    /// unless both say `shared = true`.
    fn shared_ids(&mut self, users: &[(String, UserSpec, Range<usize>)]) {
        for (i, (name, spec, span)) in users.iter().enumerate() {
            for (other, o, first) in &users[..i] {
                for (what, mine, theirs) in [("uid", spec.uid, o.uid), ("gid", spec.gid, o.gid)] {
                    if mine == theirs && !(spec.shared && o.shared) {
                        let (line, _) = line_col(self.source, first.start);
                        self.error(
                            span.clone(),
                            format!("service \"{name}\" has {what} {mine}, as \"{other}\" (line {line}) has"),
                            "give each service ids of its own (or remove `user` to derive them), or write `shared = true` in both if they must share",
                        );
                    }
                }
            }
        }
    }

    /// A path that must name something inside the state directory.
    fn check_state_path(&mut self, path: &Spanned<String>, what: &str) {
        let p = Path::new(path.get_ref());
        if path.get_ref().is_empty()
            || p.is_absolute()
            || p.components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            self.error(
                path.span(),
                format!(
                    "{what} path \"{}\" must stay inside the state directory",
                    path.get_ref()
                ),
                "write a relative path without '..', e.g. \"guest.vmgs\"",
            );
        }
    }

    /// A list of IOAPIC lines (0..24), each once.
    fn interrupt_list(&mut self, lines: &[Spanned<i64>]) -> InterruptSet {
        let mut set = InterruptSet::EMPTY;
        for l in lines {
            let n = *l.get_ref();
            let irq = u8::try_from(n).ok().map(Interrupt::Line);
            match irq {
                Some(i) if set.contains(i) => self.error(
                    l.span(),
                    format!("interrupt line {n} is listed twice"),
                    "list each line once",
                ),
                Some(i) if set.insert(i) => {}
                _ => self.error(
                    l.span(),
                    format!("interrupt line {n} does not exist"),
                    format!(
                        "IOAPIC lines are 0..={}",
                        ipc_defs::services::intercept::IOAPIC_LINES - 1
                    ),
                ),
            }
        }
        set
    }

    /// What a call entry grants beyond the endpoint: `file-ids` for vmgs (required there),
    /// `interrupts` for intercept (optional), nothing for the other interfaces.
    fn call_grant(
        &mut self,
        endpoint: Interface,
        call: &RawCall,
        span: Range<usize>,
    ) -> Option<Grant> {
        if let Some(rights) = &call.tpm {
            if endpoint != Interface::Vtpm {
                self.error(
                    rights.span(),
                    format!("tpm applies to calls to \"vtpm\", not to \"{endpoint}\""),
                    "remove tpm from this call",
                );
                return None;
            }
        }
        if endpoint == Interface::Vtpm && call.file_ids.is_none() && call.interrupts.is_none() {
            return Some(Grant::Vtpm(self.tpm_rights(call.tpm.as_ref())));
        }
        if let Some(lines) = &call.interrupts {
            if endpoint != Interface::Intercept {
                self.error(
                    lines.span(),
                    format!("interrupts applies to calls to \"intercept\", not to \"{endpoint}\""),
                    "ask intercept for interrupts: move the list to the call to intercept",
                );
                return None;
            }
            if lines.get_ref().is_empty() {
                self.error(
                    lines.span(),
                    "interrupts is empty",
                    "list the IOAPIC lines the service raises, or remove the list",
                );
            }
            return Some(Grant::Interrupts(self.interrupt_list(lines.get_ref())));
        }
        match (endpoint, &call.file_ids) {
            (Interface::Vmgs, None) => {
                self.error(
                    span,
                    "a call to \"vmgs\" must say which file ids it may use",
                    "add file-ids = [\"TPM_NVRAM\", ...] (names or numbers of VMGS file ids)",
                );
                None
            }
            (Interface::Vmgs, Some(ids)) => {
                let mut set = FileIdSet::EMPTY;
                for id in ids.get_ref() {
                    match FileId::parse(id.get_ref()) {
                        Some(f) if !f.is_user_file() => self.error(
                            id.span(),
                            format!("file id {f} is the store's own table and cannot be granted"),
                            "grant the ids of the files the service keeps, e.g. TPM_NVRAM",
                        ),
                        Some(f) if set.contains(f) => self.error(
                            id.span(),
                            format!("file id {f} is listed twice"),
                            "list each file id once",
                        ),
                        Some(f) => set = set.with(f),
                        None => self.error(
                            id.span(),
                            format!("\"{}\" is not a VMGS file id", id.get_ref()),
                            format!(
                                "use a number 1..=62 or a name: {}",
                                FileId::NAMED
                                    .iter()
                                    .filter(|(f, _)| f.is_user_file())
                                    .map(|(_, n)| *n)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ),
                        ),
                    }
                }
                if ids.get_ref().is_empty() {
                    self.error(
                        ids.span(),
                        "file-ids is empty: the call could do nothing",
                        "list the file ids the service keeps, or remove the call",
                    );
                }
                Some(Grant::VmgsFiles(set))
            }
            (other, Some(ids)) => {
                self.error(
                    ids.span(),
                    format!("file-ids applies to calls to \"vmgs\", not to \"{other}\""),
                    "remove file-ids from this call",
                );
                None
            }
            (_, None) => None,
        }
    }

    /// `tpm = ["commands", "platform"]` of a call to vtpm: TPM commands (at locality 0, and
    /// at the localities the caller's listeners are granted) and platform signals. Nothing
    /// without it: a client of vtpm may only ping it. The register interface is the guest
    /// partition's and cannot be granted.
    fn tpm_rights(&mut self, rights: Option<&Spanned<Vec<Spanned<String>>>>) -> VtpmGrant {
        let mut grant = VtpmGrant::NONE;
        let Some(rights) = rights else {
            return grant;
        };
        if rights.get_ref().is_empty() {
            self.error(
                rights.span(),
                "tpm is empty: the call could do nothing but ping",
                "list what the service may ask of the TPM (\"commands\", \"platform\"), or remove tpm",
            );
        }
        let mut seen: Vec<&str> = Vec::new();
        for r in rights.get_ref() {
            let name = r.get_ref().as_str();
            if seen.contains(&name) {
                self.error(
                    r.span(),
                    format!("\"{name}\" is listed twice"),
                    "list it once",
                );
                continue;
            }
            seen.push(name);
            match name {
                "commands" => grant.commands = Localities::ZERO,
                "platform" => grant.platform = true,
                "registers" | "mmio" => self.error(
                    r.span(),
                    "the TPM's register interface cannot be granted to a service",
                    "only the guest partition (client `guest`) drives the registers; the microkernel grants them to its channel alone",
                ),
                other => self.error(
                    r.span(),
                    format!("\"{other}\" is not something a client may ask of the TPM"),
                    "use \"commands\" (TPM commands) and/or \"platform\" (power, NV, cancel, established flag)",
                ),
            }
        }
        grant
    }

    /// `localities = [...]` of a listener: 0..=4, each once; only for a TPM front end (a
    /// service whose call to vtpm grants commands). Locality 0 only when absent.
    fn localities(
        &mut self,
        listen: &RawListen,
        service: &str,
        grants: &BTreeMap<Interface, Grant>,
    ) -> Localities {
        let Some(list) = &listen.localities else {
            return Localities::ZERO;
        };
        let commands =
            matches!(grants.get(&Interface::Vtpm), Some(Grant::Vtpm(g)) if !g.commands.is_empty());
        if !commands {
            self.error(
                list.span(),
                format!("localities apply to TPM front ends, but \"{service}\" is granted no TPM commands"),
                "give the service calls = [{ endpoint = \"vtpm\", tpm = [\"commands\"] }], or remove localities",
            );
        }
        if list.get_ref().is_empty() {
            self.error(
                list.span(),
                "localities is empty: the listener's connections could send no command",
                "list at least locality 0, or remove localities (locality 0 only)",
            );
        }
        let mut set = Localities::NONE;
        for l in list.get_ref() {
            let n = *l.get_ref();
            match u8::try_from(n) {
                Ok(x) if set.contains(x) => self.error(
                    l.span(),
                    format!("locality {n} is listed twice"),
                    "list each locality once",
                ),
                Ok(x) if set.insert(x) => {}
                _ => self.error(
                    l.span(),
                    format!("locality {n} does not exist"),
                    "TPM localities are 0..=4 (1-4 are the platform's: 3 and 4 reset and extend the DRTM PCRs 17-22)",
                ),
            }
        }
        set
    }

    /// `missing = "create-vmgs"`: needs `key` naming a key of the same service; `size` is
    /// optional.
    fn create_vmgs(
        &mut self,
        f: &RawFile,
        span: Range<usize>,
        keys: &[Spanned<RawKey>],
    ) -> Missing {
        let size = match &f.size {
            None => pv_vmgs::vhd::DEFAULT_IMAGE,
            Some(text) => match parse_size(text.get_ref()) {
                Some(n) if pv_vmgs::vhd::check_image_size(n).is_ok() => n,
                _ => {
                    self.error(
                        text.span(),
                        format!("VMGS size \"{}\" is not usable", text.get_ref()),
                        "use a multiple of 512 bytes between 16K and 4G, e.g. \"4M\"",
                    );
                    pv_vmgs::vhd::DEFAULT_IMAGE
                }
            },
        };
        let Some(key) = &f.key else {
            self.error(
                span,
                "missing = \"create-vmgs\" needs `key`: the guest-state file is created encrypted",
                "add key = \"<name of a key in this service's `keys`>\"",
            );
            return Missing::Error;
        };
        if !keys
            .iter()
            .any(|k| k.get_ref().name.get_ref() == key.get_ref())
        {
            self.error(
                key.span(),
                format!(
                    "key \"{}\" is not one of this service's keys",
                    key.get_ref()
                ),
                "add it to `keys = [{ name = ..., path = ..., missing = \"create\" }]`",
            );
        }
        Missing::CreateVmgs {
            key: key.get_ref().clone(),
            size,
        }
    }

    fn unknown_endpoint(&mut self, ep: &Spanned<String>) {
        let known: Vec<&str> = Interface::ALL.iter().map(|i| i.name()).collect();
        self.error(
            ep.span(),
            format!("unknown endpoint \"{}\"", ep.get_ref()),
            format!(
                "endpoints are the interfaces ipc-defs defines: {}",
                known.join(", ")
            ),
        );
    }

    fn restart(&mut self, r: &RawRestart) -> Restart {
        let policy = match r.policy.get_ref().as_str() {
            "always" => RestartPolicy::Always,
            "on-failure" => RestartPolicy::OnFailure,
            "never" => RestartPolicy::Never,
            other => {
                self.error(
                    r.policy.span(),
                    format!("restart policy \"{other}\" is unknown"),
                    "use \"always\", \"on-failure\" or \"never\"",
                );
                RestartPolicy::Never
            }
        };
        let max = *r.max.get_ref();
        if !(0..=MAX_RESTARTS as i64).contains(&max) {
            self.error(
                r.max.span(),
                format!("restart max {max} is out of range"),
                format!("use 0 to {MAX_RESTARTS}"),
            );
        }
        if policy != RestartPolicy::Never && max == 0 {
            self.error(
                r.max.span(),
                format!("policy \"{policy}\" with max = 0 never restarts"),
                "use policy = \"never\", or allow at least one restart",
            );
        }
        let mut duration =
            |s: &Spanned<String>, what: &str, min: Duration, max: Duration| -> Duration {
                match parse_duration(s.get_ref()) {
                    Some(d) if d >= min && d <= max => d,
                    Some(d) => {
                        self.error(
                            s.span(),
                            format!("restart {what} {} is zero or absurd", format_duration(d)),
                            format!(
                                "use between {} and {}",
                                format_duration(min),
                                format_duration(max)
                            ),
                        );
                        min
                    }
                    None => {
                        self.error(
                            s.span(),
                            format!("restart {what} \"{}\" is not a duration", s.get_ref()),
                            "write e.g. \"100ms\", \"10s\" or \"5m\"",
                        );
                        min
                    }
                }
            };
        let window = duration(&r.window, "window", Duration::from_secs(1), MAX_WINDOW);
        let backoff = duration(&r.backoff, "backoff", MIN_BACKOFF, MAX_BACKOFF);
        let max_backoff = match &r.max_backoff {
            None => DEFAULT_MAX_BACKOFF.max(backoff),
            Some(m) => {
                let ceiling = duration(m, "max-backoff", MIN_BACKOFF, MAX_BACKOFF);
                if ceiling < backoff {
                    self.error(
                        m.span(),
                        format!(
                            "restart max-backoff {} is below backoff {}",
                            format_duration(ceiling),
                            format_duration(backoff)
                        ),
                        "the back-off doubles from `backoff` up to `max-backoff`: make it at least `backoff`",
                    );
                }
                ceiling.max(backoff)
            }
        };
        Restart {
            policy,
            max: max.clamp(0, MAX_RESTARTS as i64) as u32,
            window,
            backoff,
            max_backoff,
        }
    }

    fn overlaps(&mut self, ranges: &[(String, DeviceRange, Range<usize>)], what: &str) {
        for (i, (a_name, a, _)) in ranges.iter().enumerate() {
            for (b_name, b, b_span) in &ranges[i + 1..] {
                if a.base < b.end() && b.base < a.end() {
                    self.error(
                        b_span.clone(),
                        format!(
                            "{what} range {:#x}..{:#x} of \"{b_name}\" overlaps {:#x}..{:#x} of \"{a_name}\"",
                            b.base, b.end(), a.base, a.end()
                        ),
                        "an address can be handled by one service only; move or shrink one range",
                    );
                }
            }
        }
    }
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

/// Names the paravisor uses for its own clients and records; no service may have them.
pub const RESERVED_NAMES: &[&str] = &[
    "platform",
    "guest-tis",
    "microkernel",
    "guest",
    // The microkernel's own client name on its channel to attest (it alone may seal).
    ipc_defs::services::attest::PARAVISOR_CLIENT,
];

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// 1-based line and column of byte `offset` in `source`.
pub fn line_col(source: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(source.len());
    let before = &source[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Parses "64M", "256K", "1G", "4096" into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = digits.trim().parse().ok()?;
    n.checked_mul(1u64 << shift)
}

pub fn format_size(n: u64) -> String {
    if n >= 1 << 30 && n.is_multiple_of(1 << 30) {
        format!("{}G", n >> 30)
    } else if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{}M", n >> 20)
    } else if n >= 1 << 10 && n.is_multiple_of(1 << 10) {
        format!("{}K", n >> 10)
    } else {
        n.to_string()
    }
}

/// Parses "10ms", "5s", "2m", "1h".
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = s[..split].parse().ok()?;
    match &s[split..] {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) && ms > 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> String {
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest.toml")).unwrap()
    }

    fn measured(text: &str) -> Vec<u8> {
        Manifest::parse(Path::new("m.toml"), text)
            .unwrap()
            .measured_bytes()
    }

    /// Comments, layout, key order, number spelling and host settings leave the measured
    /// configuration as it is; anything the services may do changes it.
    #[test]
    fn the_measured_configuration_is_canonical_and_leaves_host_settings_out() {
        let text = shipped();
        let base = measured(&text);
        // Comments and blank lines gone, a comment added, whitespace changed.
        let stripped: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(measured(&stripped), base);
        assert_eq!(measured(&format!("# a note\n{text}\n\n# end\n")), base);
        let spaced = text.replace("restart = { policy", "restart   =   {   policy");
        assert_ne!(spaced, text);
        assert_eq!(measured(&spaced), base);
        // Key order inside a table; a size and a number spelt differently.
        let reordered = text.replace(
            "limits = { memory = \"128M\", open-files = 32 }",
            "limits = { open-files = 0x20, memory = \"131072K\" }",
        );
        assert_ne!(reordered, text);
        assert_eq!(measured(&reordered), base);
        // Host settings: state and platform directories, a listener's address.
        let host = text
            .replace("state-dir = \"state\"", "state-dir = \"/srv/elsewhere\"")
            .replace("# platform-dir = \"platform\"", "platform-dir = \"/srv/p\"")
            .replace("127.0.0.1:2321", "127.0.0.1:12321");
        assert_ne!(host, text);
        assert_eq!(measured(&host), base);
        // What a service may do is measured: a limit, a grant, the sealing policy.
        for (from, to) in [
            (
                "memory = \"128M\", open-files = 32 }",
                "memory = \"256M\", open-files = 32 }",
            ),
            ("sealing = \"measurement\"", "sealing = \"platform\""),
            ("backoff = \"50ms\"", "backoff = \"60ms\""),
        ] {
            assert!(text.contains(from), "{from}");
            assert_ne!(
                measured(&text.replacen(from, to, 1)),
                base,
                "{from} -> {to}"
            );
        }
        let json: serde_json::Value = serde_json::from_slice(&base).unwrap();
        assert_eq!(json["format"], MEASURED_CONFIG_FORMAT);
        assert!(json.get("state_dir").is_none() && json.get("path").is_none());
        assert!(json["attest"].get("platform_dir").is_none());
        assert!(json["attest"].get("key_release").is_none());
        let vtpm = json["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "vtpm")
            .unwrap();
        for l in vtpm["listen"].as_array().unwrap() {
            assert!(l.get("address").is_none() && l.get("name").is_some(), "{l}");
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[{"y":1,"x":2}],"c":null}}"#).unwrap();
        assert_eq!(
            String::from_utf8(canonical_json(&a)).unwrap(),
            r#"{"a":{"c":null,"d":[{"x":2,"y":1}]},"b":1}"#
        );
    }

    const GOOD: &str = r#"
[[service]]
name = "a"
binary = "pv-a"
serves = ["vmgs"]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }

[[service]]
name = "b"
binary = "pv-b"
calls = [{ endpoint = "vmgs", file-ids = ["TPM_NVRAM"] }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "on-failure", max = 3, window = "10s", backoff = "10ms" }
"#;

    fn errors(src: &str) -> Vec<Diagnostic> {
        match Manifest::parse(Path::new("m.toml"), src) {
            Ok(_) => panic!("manifest unexpectedly valid"),
            Err(e) => e.diagnostics().to_vec(),
        }
    }

    /// Asserts that `src` is refused with a diagnostic at `line` whose message holds `needle`.
    fn refused_at(src: &str, line: usize, needle: &str) {
        let d = errors(src);
        assert!(
            d.iter()
                .any(|d| d.line == line && d.message.contains(needle)),
            "no diagnostic at line {line} with {needle:?}: {d:?}\n{src}"
        );
    }

    fn accepted(src: &str) -> Manifest {
        Manifest::parse(Path::new("m.toml"), src)
            .unwrap_or_else(|e| panic!("refused: {:?}\n{src}", e.diagnostics()))
    }

    #[test]
    fn the_ring_capacity_is_a_power_of_two_within_the_layouts_bounds() {
        let with = |cap: &str| format!("[paravisor]\nring-capacity = \"{cap}\"\n{GOOD}");
        assert_eq!(accepted(&with("64K")).ring_capacity, 64 << 10);
        assert_eq!(
            accepted(&with("16M")).ring_capacity,
            ipc_defs::layout::MAX_RING_CAPACITY
        );
        // In range but not a power of two; a power of two above the range; unreadable.
        for bad in ["96K", "32M", "lots"] {
            refused_at(
                &with(bad),
                2,
                &format!("ring-capacity \"{bad}\" is not usable"),
            );
        }
    }

    #[test]
    fn a_binary_is_a_plain_name_next_to_the_paravisor() {
        for bad in ["", "bin/pv-a", "/usr/bin/pv-a", ".pv-a"] {
            let src = GOOD.replacen("binary = \"pv-a\"", &format!("binary = \"{bad}\""), 1);
            refused_at(&src, 4, "must be a plain executable name");
        }
        accepted(&GOOD.replacen("pv-a", "pv-a.v2", 1));
    }

    #[test]
    fn a_call_is_listed_once_and_never_to_the_callers_own_endpoint() {
        let twice = GOOD.replace(
            "calls = [{ endpoint = \"vmgs\", file-ids = [\"TPM_NVRAM\"] }]",
            "calls = [{ endpoint = \"vmgs\", file-ids = [\"TPM_NVRAM\"] }, { endpoint = \"vmgs\", file-ids = [\"TPM_PPI\"] }]",
        );
        refused_at(&twice, 12, "lists a call to \"vmgs\" twice");
        let own = GOOD.replace(
            "serves = [\"vmgs\"]",
            "serves = [\"vmgs\"]\ncalls = [{ endpoint = \"vmgs\", file-ids = [\"TPM_PPI\"] }]",
        );
        refused_at(&own, 6, "calls \"vmgs\", which it serves itself");
    }

    /// Keys, listeners and regions: distinct names pass, a repeated one is refused where it
    /// is repeated.
    #[test]
    fn names_within_a_service_are_unique() {
        let with = |line: &str| {
            GOOD.replacen(
                "serves = [\"vmgs\"]\n",
                &format!("serves = [\"vmgs\"]\n{line}\n"),
                1,
            )
        };
        let keys = |a: &str, b: &str| {
            with(&format!(
                "keys = [{{ name = \"{a}\", path = \"{a}.key\" }}, {{ name = \"{b}\", path = \"{b}2.key\" }}]"
            ))
        };
        let m = accepted(&keys("k1", "k2"));
        assert_eq!(m.services[0].keys.len(), 2);
        refused_at(&keys("k1", "k1"), 6, "key \"k1\" is listed twice");

        let listen = |a: &str, b: &str| {
            with(&format!(
                "listen = [{{ name = \"{a}\", address = \"127.0.0.1:1\" }}, {{ name = \"{b}\", address = \"127.0.0.1:2\" }}]"
            ))
        };
        let m = accepted(&listen("l1", "l2"));
        assert_eq!(m.services[0].listen.len(), 2);
        refused_at(
            &listen("l1", "l1"),
            6,
            "listener name \"l1\" is invalid or listed twice",
        );
        refused_at(
            &listen("l1", "L 2"),
            6,
            "listener name \"L 2\" is invalid or listed twice",
        );

        let regions = |a: &str, b: &str| {
            with(&format!(
                "regions = [{{ name = \"{a}\", size = \"4K\" }}, {{ name = \"{b}\", size = \"8K\" }}]"
            ))
        };
        let m = accepted(&regions("r1", "r2"));
        assert_eq!(m.services[0].regions.len(), 2);
        refused_at(&regions("r1", "r1"), 6, "region \"r1\" is listed twice");
    }

    #[test]
    fn a_region_is_neither_empty_nor_larger_than_any_memory_limit() {
        let with = |size: &str| {
            GOOD.replacen(
                "serves = [\"vmgs\"]\n",
                &format!(
                    "serves = [\"vmgs\"]\nregions = [{{ name = \"r\", size = \"{size}\" }}]\n"
                ),
                1,
            )
        };
        assert_eq!(
            accepted(&with("64G")).services[0].regions[0].size,
            MAX_MEMORY
        );
        assert_eq!(accepted(&with("1")).services[0].regions[0].size, 1);
        for bad in ["0", "65G", "big"] {
            refused_at(
                &with(bad),
                6,
                &format!("region size \"{bad}\" is zero, absurd or unreadable"),
            );
        }
    }

    /// The vTPM with a device range, and a TPM front end with one listener.
    const TPM: &str = r#"
[[service]]
name = "tpm"
binary = "pv-vtpm"
serves = ["vtpm"]
mmio = [{ base = 0xfed40000, size = 0x5000 }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }

[[service]]
name = "gw"
binary = "pv-tpm-gateway"
calls = [{ endpoint = "vtpm", tpm = ["commands"] }]
listen = [{ name = "mssim-command", address = "127.0.0.1:2321", localities = [0, 3] }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }
"#;

    fn tpm_grant(m: &Manifest) -> ipc_defs::services::vtpm::VtpmGrant {
        match m.service("gw").unwrap().grants.get(&Interface::Vtpm) {
            Some(Grant::Vtpm(g)) => *g,
            other => panic!("no vtpm grant: {other:?}"),
        }
    }

    #[test]
    fn a_front_end_gets_its_listeners_localities_only_if_it_may_send_commands() {
        let m = accepted(TPM);
        assert_eq!(
            tpm_grant(&m).commands,
            ipc_defs::services::vtpm::Localities::ZERO.with(3)
        );
        // Platform signals only: its listener's localities must not grant it commands.
        let m = accepted(&TPM.replace(
            "tpm = [\"commands\"] }]\nlisten = [{ name = \"mssim-command\", address = \"127.0.0.1:2321\", localities = [0, 3] }]",
            "tpm = [\"platform\"] }]\nlisten = [{ name = \"mssim-platform\", address = \"127.0.0.1:2322\" }]",
        ));
        let g = tpm_grant(&m);
        assert!(g.commands.is_empty(), "{g:?}");
        assert!(g.platform);
    }

    #[test]
    fn a_device_range_ends_within_its_address_space() {
        let with = |range: &str| TPM.replace("{ base = 0xfed40000, size = 0x5000 }", range);
        // Up to the last byte of each space, not one past it.
        let m = accepted(&with("{ base = 0xffffffffff000, size = 0x1000 }"));
        assert_eq!(m.service("tpm").unwrap().mmio[0].end(), 1 << 52);
        for bad in [
            "{ base = 0xffffffffff000, size = 0x1001 }",
            "{ base = 0xffffffffff000, size = 0x100000 }",
            "{ base = 0x10000000000000, size = 1 }",
        ] {
            refused_at(
                &with(bad),
                6,
                "runs past the end of the mmio space (0x10000000000000)",
            );
        }
        let pio = |range: &str| {
            TPM.replace(
                "mmio = [{ base = 0xfed40000, size = 0x5000 }]",
                &format!("pio = [{range}]"),
            )
        };
        accepted(&pio("{ base = 0xfff0, size = 0x10 }"));
        refused_at(
            &pio("{ base = 0xfff0, size = 0x11 }"),
            6,
            "runs past the end of the pio space (0x10000)",
        );
        // The partition's own port, whether the range starts at it, ends at it or spans it.
        let port = crate::partition::router::IN_THREAD_PORT as u64;
        for (base, size) in [(port, 1), (port - 1, 2), (port - 3, 4), (port, 0x10)] {
            refused_at(
                &pio(&format!("{{ base = {base:#x}, size = {size:#x} }}")),
                6,
                "which the partition answers itself",
            );
        }
        accepted(&pio(&format!("{{ base = {:#x}, size = 1 }}", port + 1)));
        accepted(&pio(&format!("{{ base = {:#x}, size = 1 }}", port - 1)));
    }

    #[test]
    fn a_watchdog_is_between_a_second_and_an_hour() {
        let with =
            |w: &str| TPM.replacen("limits = {", &format!("watchdog = \"{w}\"\nlimits = {{"), 1);
        for (w, d) in [("1s", 1), ("90s", 90), ("1h", 3600)] {
            assert_eq!(
                accepted(&with(w)).service("tpm").unwrap().watchdog,
                Duration::from_secs(d)
            );
        }
        assert_eq!(
            accepted(TPM).service("tpm").unwrap().watchdog,
            DEFAULT_WATCHDOG
        );
        for bad in ["0s", "999ms", "61m", "2h", "soon"] {
            refused_at(
                &with(bad),
                7,
                &format!("watchdog \"{bad}\" is not a duration between 1s and 1h"),
            );
        }
    }

    #[test]
    fn open_files_is_at_most_the_ceiling() {
        let with = |n: u64| TPM.replacen("open-files = 32", &format!("open-files = {n}"), 1);
        assert_eq!(
            accepted(&with(MAX_OPEN_FILES))
                .service("tpm")
                .unwrap()
                .limits
                .open_files,
            MAX_OPEN_FILES
        );
        for bad in [MAX_OPEN_FILES + 1, MAX_OPEN_FILES * 4] {
            refused_at(&with(bad), 7, &format!("open-files limit {bad} is absurd"));
        }
    }

    /// The 1-based line of the first line of `src` that holds `needle`.
    fn line_of(src: &str, needle: &str) -> usize {
        1 + src
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} is not in the manifest"))
    }

    /// The capability plan's slot count of `spec` with every declared listener, with or
    /// without a guest partition.
    fn capability_slots_with(spec: &ServiceSpec, services: &[ServiceSpec], guest: bool) -> usize {
        let i = services.iter().position(|s| std::ptr::eq(s, spec)).unwrap();
        let run = Run {
            guest_vcpus: guest.then_some(1),
            listening: None,
        };
        CapabilityPlan::new(services, run).slots(i).len()
    }

    /// [`capability_slots_with`] a guest partition: what the validator bounds.
    fn capability_slots(spec: &ServiceSpec, services: &[ServiceSpec]) -> usize {
        capability_slots_with(spec, services, true)
    }

    /// Each service's descriptor slots, counted by hand from the shipped manifest: 3 (status
    /// page, seccomp program, control channel) + one per client link it serves + the
    /// microkernel's attest and platform channels + the guest partition's channel (intercept,
    /// or a device with ranges) + intercept's interrupt eventfds + calls, regions, files, keys
    /// and listeners.
    #[test]
    fn capability_slots_count_every_descriptor_a_service_holds() {
        let m = accepted(&shipped());
        let slots = |name: &str, guest: bool| {
            capability_slots_with(m.service(name).unwrap(), &m.services, guest)
        };
        // (name, with a guest, without one)
        let expected = [
            ("intercept", 3 + 1 + 1 + 3, 3 + 3), // guest channel, interrupt 4, 3 calls
            ("vmgs", 3 + 2 + 1 + 1, 3 + 2 + 1 + 1), // served to attest and vtpm, a file, a key
            ("attest", 3 + 1 + 2 + 1 + 2, 3 + 1 + 2 + 1 + 2), // served to vtpm, microkernel and platform, a call, 2 files
            ("vtpm", 3 + 2 + 1 + 2 + 1, 3 + 2 + 2 + 1), // served to intercept and the gateway, mmio, 2 calls, a region
            ("tpm-gateway", 3 + 1 + 5, 3 + 1 + 5),      // a call, 5 listeners
            ("storage", 3 + 1, 3 + 1),                  // served to intercept
        ];
        for (name, with_guest, without) in expected {
            assert_eq!(slots(name, true), with_guest, "{name} with a guest");
            assert_eq!(slots(name, false), without, "{name} without a guest");
            assert_eq!(
                capability_slots(m.service(name).unwrap(), &m.services),
                with_guest
            );
        }
        // A device reached through port ranges only, or through its PCI function only, has
        // the guest partition's channel too.
        let pio = TPM.replace(
            "mmio = [{ base = 0xfed40000, size = 0x5000 }]",
            "pio = [{ base = 0x2f8, size = 8 }]",
        );
        let pci = TPM.replace(
            "mmio = [{ base = 0xfed40000, size = 0x5000 }]",
            "pci-device = 3",
        );
        for src in [TPM.to_string(), pio, pci] {
            let m = accepted(&src);
            let tpm = m.service("tpm").unwrap();
            assert_eq!(
                capability_slots_with(tpm, &m.services, true),
                3 + 1 + 1,
                "{src}"
            );
            assert_eq!(
                capability_slots_with(tpm, &m.services, false),
                3 + 1,
                "{src}"
            );
        }
    }

    #[test]
    fn guest_interrupts_are_intercepts_lines_and_those_its_callers_are_granted() {
        let m = accepted(&shipped());
        assert_eq!(guest_interrupts(&m.services), [Interrupt::Line(4)]);
        let src = shipped()
            .replacen(
                "serves = [\"storage\"]",
                "serves = [\"storage\"]\ncalls = [{ endpoint = \"intercept\", interrupts = [10, 5] }]",
                1,
            )
            .replacen(
                "serves = [\"net\"]",
                "serves = [\"net\"]\ncalls = [{ endpoint = \"intercept\", interrupts = [11] }]",
                1,
            );
        let m = accepted(&src);
        assert_eq!(
            guest_interrupts(&m.services),
            [4, 5, 10, 11].map(Interrupt::Line)
        );
    }

    #[test]
    fn descriptors_and_capabilities_have_their_bounds() {
        let needed = |src: &str| {
            let m = accepted(src);
            BASE_DESCRIPTORS as usize + capability_slots(m.service("tpm").unwrap(), &m.services)
        };
        let n = needed(TPM);
        let with = |n: usize| TPM.replacen("open-files = 32", &format!("open-files = {n}"), 1);
        accepted(&with(n));
        refused_at(
            &with(n - 1),
            7,
            &format!("is below the {n} descriptors this service holds"),
        );

        // Regions until the bootstrap record is exactly full, then one more.
        let regions = |count: usize| {
            let list: Vec<String> = (0..count)
                .map(|i| format!("{{ name = \"r{i}\", size = \"4K\" }}"))
                .collect();
            TPM.replacen(
                "serves = [\"vtpm\"]",
                &format!("serves = [\"vtpm\"]\nregions = [{}]", list.join(", ")),
                1,
            )
            .replacen("open-files = 32", "open-files = 1000", 1)
        };
        let base = {
            let m = accepted(TPM);
            capability_slots(m.service("tpm").unwrap(), &m.services)
        };
        let full = MAX_CAPABILITIES - base;
        let m = accepted(&regions(full));
        assert_eq!(
            capability_slots(m.service("tpm").unwrap(), &m.services),
            MAX_CAPABILITIES
        );
        for over in [full + 1, full + 5] {
            refused_at(
                &regions(over),
                2,
                &format!("holds {} capabilities", MAX_CAPABILITIES + over - full),
            );
        }
    }

    #[test]
    fn a_manifest_holds_at_most_max_services() {
        let with = |clients: usize| {
            let mut src = TPM.to_string();
            for i in 0..clients {
                src.push_str(&format!(
                    "\n[[service]]\nname = \"c{i}\"\nbinary = \"pv-c\"\ncalls = [{{ endpoint = \"vtpm\", tpm = [\"platform\"] }}]\nlimits = {{ memory = \"64M\", open-files = 32 }}\nrestart = {{ policy = \"never\", max = 0, window = \"10s\", backoff = \"10ms\" }}\n"
                ));
            }
            src
        };
        // TPM has two services; the vTPM serves one link per client, so its own bootstrap
        // record overflows long before MAX_SERVICES: only the count's diagnostic is looked at.
        let count = |src: &str| -> Vec<Diagnostic> {
            match Manifest::parse(Path::new("m.toml"), src) {
                Ok(_) => Vec::new(),
                Err(e) => e
                    .diagnostics()
                    .iter()
                    .filter(|d| d.message.contains("services"))
                    .cloned()
                    .collect(),
            }
        };
        assert!(count(&with(MAX_SERVICES - 2)).is_empty());
        for over in [MAX_SERVICES - 1, MAX_SERVICES + 3] {
            let d = count(&with(over));
            assert!(
                d.iter()
                    .any(|d| d.message == format!("the manifest describes {} services", over + 2)),
                "{d:?}"
            );
        }
    }

    #[test]
    fn files_other_than_guest_state_may_be_shared_and_paths_stay_inside_the_state_dir() {
        let shared = shipped().replace(
            "serves = [\"storage\"]",
            "serves = [\"storage\"]\nfiles = [{ name = \"certs\", path = \"platform-certs.pem\", access = \"read-only\" }]",
        );
        accepted(&shared);
        let with = |path: &str| {
            shipped().replace(
                "serves = [\"storage\"]",
                &format!("serves = [\"storage\"]\nfiles = [{{ name = \"f\", path = \"{path}\", access = \"read-only\" }}]"),
            )
        };
        for bad in ["", "/etc/shadow", "../x", "a/../../x", "./x"] {
            let src = with(bad);
            refused_at(&src, line_of(&src, "name = \"f\""), &format!("\"{bad}\""));
        }
        accepted(&with("sub/dir/x"));
    }

    #[test]
    fn a_vmgs_ring_needs_room_for_its_chunks() {
        let src = |cap: u32| {
            let s = shipped();
            s.replace(
                "ring-capacity = \"64K\"",
                &format!("ring-capacity = \"{}K\"", cap >> 10),
            )
        };
        assert_eq!(accepted(&src(MIN_VMGS_RING)).ring_capacity, MIN_VMGS_RING);
        let small = src(MIN_VMGS_RING / 2);
        refused_at(
            &small,
            line_of(&small, "ring-capacity"),
            "too small for the vmgs endpoint",
        );
    }

    #[test]
    fn a_sealed_key_is_the_key_of_its_own_guest_state_file() {
        let src = shipped().replace(
            "serves = [\"storage\"]",
            "serves = [\"storage\"]\nkeys = [{ name = \"datastore\", sealed = true }]",
        );
        refused_at(
            &src,
            line_of(&src, "serves = [\"storage\"]") + 1,
            "sealed key \"datastore\" is not the key of a guest-state file of \"storage\"",
        );
        let size = |size: &str| shipped().replace("size = \"4M\"", &format!("size = \"{size}\""));
        accepted(&size("16K"));
        for bad in ["1K", "8G", "4M1"] {
            let src = size(bad);
            refused_at(
                &src,
                line_of(&src, "guest.vmgs"),
                &format!("VMGS size \"{bad}\" is not usable"),
            );
        }
    }

    #[test]
    fn a_key_release_id_is_64_hex_digits() {
        let with = |id: &str| {
            shipped().replace(
                "sealing = \"measurement\"",
                &format!("sealing = \"measurement\"\nkey-release = \"127.0.0.1:8700\"\nkey-release-id = \"{id}\""),
            )
        };
        let good = "0123456789abcdefABCDEF0123456789abcdef0123456789abcdef0123456789";
        assert_eq!(
            accepted(&with(good)).attest.key_release_id.as_deref(),
            Some(good.to_ascii_lowercase().as_str())
        );
        for bad in [
            &good[1..],
            &format!("{good}0"),
            &good.replace('0', "g"),
            "0123",
        ] {
            let src = with(bad);
            refused_at(
                &src,
                line_of(&src, "key-release-id"),
                "key-release-id is not a key id",
            );
        }
    }

    #[test]
    fn a_shared_uid_needs_both_services_to_say_so() {
        let with = |a: &str, b: &str| {
            TPM.replacen(
                "serves = [\"vtpm\"]",
                &format!("serves = [\"vtpm\"]\nuser = {a}"),
                1,
            )
            .replacen("calls = [", &format!("user = {b}\ncalls = ["), 1)
        };
        accepted(&with(
            "{ uid = 61000, shared = true }",
            "{ uid = 61000, shared = true }",
        ));
        for (a, b) in [
            ("{ uid = 61000, shared = true }", "{ uid = 61000 }"),
            ("{ uid = 61000 }", "{ uid = 61000, shared = true }"),
            ("{ uid = 61000 }", "{ uid = 61000 }"),
        ] {
            refused_at(&with(a, b), 14, "has uid 61000, as \"tpm\" (line 6) has");
        }
    }

    #[test]
    fn restart_rules() {
        let with = |r: &str| {
            TPM.replacen(
                "restart = { policy = \"always\", max = 3, window = \"10s\", backoff = \"10ms\" }",
                &format!("restart = {{ {r} }}"),
                1,
            )
        };
        accepted(&with(
            "policy = \"never\", max = 0, window = \"10s\", backoff = \"10ms\"",
        ));
        for policy in ["always", "on-failure"] {
            refused_at(
                &with(&format!(
                    "policy = \"{policy}\", max = 0, window = \"10s\", backoff = \"10ms\""
                )),
                8,
                "with max = 0 never restarts",
            );
        }
        // A ceiling equal to the back-off is a constant back-off.
        let m = accepted(&with(
            "policy = \"always\", max = 3, window = \"10s\", backoff = \"20ms\", max-backoff = \"20ms\"",
        ));
        assert_eq!(
            m.service("tpm").unwrap().restart.delay(5),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn adjacent_device_ranges_do_not_overlap() {
        let with = |a: &str, b: &str| {
            TPM.replace(
                "mmio = [{ base = 0xfed40000, size = 0x5000 }]",
                &format!("mmio = [{a}, {b}]"),
            )
        };
        let low = "{ base = 0x1000, size = 0x1000 }";
        let high = "{ base = 0x2000, size = 0x1000 }";
        accepted(&with(low, high));
        accepted(&with(high, low));
        let across = "{ base = 0x1fff, size = 2 }";
        refused_at(&with(low, across), 6, "overlaps");
        refused_at(&with(across, low), 6, "overlaps");
        refused_at(&with(high, across), 6, "overlaps");
    }

    #[test]
    fn good_manifest_parses() {
        let m = Manifest::parse(Path::new("m.toml"), GOOD).unwrap();
        assert_eq!(m.services.len(), 2);
        assert_eq!(m.server_of(Interface::Vmgs).unwrap().name, "a");
        assert_eq!(m.services[1].restart.backoff, Duration::from_millis(10));
        assert_eq!(m.services[1].restart.max_backoff, DEFAULT_MAX_BACKOFF);
    }

    #[test]
    fn the_back_off_doubles_up_to_its_ceiling() {
        let src = GOOD.replacen(
            "backoff = \"10ms\" }",
            "backoff = \"10ms\", max-backoff = \"50ms\" }",
            1,
        );
        let m = Manifest::parse(Path::new("m.toml"), &src).unwrap();
        let r = &m.services[0].restart;
        let delays: Vec<u64> = (0..8).map(|n| r.delay(n).as_millis() as u64).collect();
        assert_eq!(delays, [0, 10, 20, 40, 50, 50, 50, 50]);
        // Without one, the ceiling is a second (or the back-off itself, if longer).
        let m = Manifest::parse(Path::new("m.toml"), GOOD).unwrap();
        assert_eq!(m.services[0].restart.delay(30), DEFAULT_MAX_BACKOFF);
        let slow = GOOD.replacen("backoff = \"10ms\"", "backoff = \"5s\"", 1);
        let m = Manifest::parse(Path::new("m.toml"), &slow).unwrap();
        assert_eq!(m.services[0].restart.max_backoff, Duration::from_secs(5));
    }

    #[test]
    fn a_ceiling_below_the_back_off_is_refused_where_it_is_written() {
        let src = GOOD.replacen(
            "backoff = \"10ms\" }",
            "backoff = \"10ms\", max-backoff = \"5ms\" }",
            1,
        );
        let d = errors(&src);
        assert!(
            d.iter().any(|d| d.line == 7
                && d.message.contains("max-backoff 5ms is below backoff 10ms")),
            "{d:?}"
        );
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_size("64M"), Some(64 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999999G"), None);
        assert_eq!(parse_duration("10ms"), Some(Duration::from_millis(10)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(format_duration(Duration::from_secs(60)), "1m");
        for (n, text) in [
            (3 << 30, "3G"),
            (1 << 30, "1G"),
            (5 << 20, "5M"),
            ((1 << 30) + (1 << 20), "1025M"),
            (7 << 10, "7K"),
            ((1 << 20) + (1 << 10), "1025K"),
            (1023, "1023"),
            (1025, "1025"),
            (0, "0"),
        ] {
            assert_eq!(format_size(n), text, "{n}");
        }
    }

    #[test]
    fn line_and_column_point_at_the_value() {
        let src = GOOD.replace("serves = [\"vmgs\"]", "serves = [\"vmgz\"]");
        let d = errors(&src);
        assert!(
            d.iter().any(|d| d.line == 5
                && d.column == 11
                && d.message.contains("unknown endpoint \"vmgz\"")),
            "{d:?}"
        );
    }
}
