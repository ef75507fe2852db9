//! `paravisor run`: builds the capability table from the manifest, starts every service in its
//! sandbox, watches them through pidfds, restarts them by policy, and answers the control
//! socket. Single-threaded: one `poll` over the signalfd, the control socket, every pidfd and
//! every service's output pipes ([`crate::output`]). A start is a state of that loop
//! (`starting`, with a deadline for the first ping), never a wait.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use heapless::String as HString;
use ipc_defs::bootstrap;
use ipc_defs::bootstrap::Bootstrap;
use ipc_defs::bootstrap::Capability;
use ipc_defs::capability::CapabilityKind;
use ipc_defs::capability::FileAccess;
use ipc_defs::capability::Grant;
use ipc_defs::control as ctl;
use ipc_defs::hosted::channel::ChannelMemory;
use ipc_defs::hosted::ClientEnd;
use ipc_defs::hosted::Sent;
use ipc_defs::hosted::SharedMemory;
use ipc_defs::hosted::WaitPolicy;
use ipc_defs::layout::Direction;
use ipc_defs::layout::ServerState;
use ipc_defs::layout::StatusPage;
use ipc_defs::layout::NO_VIOLATION;
use ipc_defs::layout::STATUS_MAGIC;
use ipc_defs::layout::VIOLATION_EXIT_STATUS;
use ipc_defs::services::attest;
use ipc_defs::services::bytes::Bytes;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::Interface;

use crate::key_protector::read_plain;
use crate::key_protector::write_plain;
use crate::key_protector::SealedKey;
use crate::key_protector::TenantWrapped;
use crate::owned_dir::Open;
use crate::owned_dir::OwnedDir;
use crate::state_files::KeyBytes;

use crate::control::Command;
use crate::control::Finding;
use crate::control::Reply;
use crate::control::ServiceRow;
use crate::manifest::Manifest;
use crate::manifest::Missing;
use crate::manifest::RestartPolicy;
use crate::manifest::ServiceSpec;
use crate::output::ServiceOutput;
use crate::output::Stream;
use crate::profiles;
use crate::sandbox;
use crate::sandbox::Exit;
use crate::sandbox::Namespaces;
use crate::sandbox::SpawnPlan;

/// How long a new service has to answer its first ping.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest pause between two looks for a starting service's first answer: a start that is
/// noticed this late costs the service's clients nothing (their requests queue meanwhile),
/// and the loop sleeps in between.
const START_LOOK_INTERVAL: Duration = Duration::from_millis(20);
/// Largest certificate chain the microkernel takes from attest.
const MAX_CHAIN: usize = 64 * 1024;
/// How long a call to the attest service may take (a report is a P-384 signature).
const ATTEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a control request to a running service may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long `ps` waits for one service's counters before it shows the last ones it has: a
/// busy or hung service must not hold up the supervisor's loop (a service blocked writing its
/// output, waiting for that loop to read it, would never answer).
const STATS_TIMEOUT: Duration = Duration::from_millis(50);
/// How long services get to exit after a shutdown request before they are killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How often the supervisor pings running services (the watchdog's tick).
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// How long one health ping may take.
const HEALTH_TIMEOUT: Duration = Duration::from_millis(100);
/// Most text one `paravisor logs` reply carries (escaped, so its JSON is at most a few times
/// that): far below a Unix socket's send buffer, so that writing the reply never waits for
/// the client, however slowly it reads; a follower asks again for the rest.
const LOGS_REPLY_BYTES: usize = 32 << 10;

/// Options of `paravisor run`.
pub struct Options {
    pub manifest: Manifest,
    pub state_dir: PathBuf,
    /// The state directory, opened and checked ([`OwnedDir`]): every state file goes
    /// through it.
    pub state: OwnedDir,
    /// Where the service executables are (next to `paravisor`).
    pub bin_dir: PathBuf,
    /// `tracing` filter handed to services.
    pub log_filter: String,
    /// The guest to run, if any (`None`: the services alone, `paravisor run --no-guest`).
    pub guest: Option<crate::partition::GuestConfig>,
    /// Keep the services up after the guest's run ends (until stopped).
    pub keep_running: bool,
    /// The simulated platform's directory (made on first use if a service holds the platform).
    pub platform_dir: PathBuf,
    /// The launch log: its measurement is what the platform puts in every report; its
    /// paravisor measurement is what sealed keys are bound to. Written to the state
    /// directory only once the start is not refused.
    pub launch_log: crate::measure::LaunchLog,
    /// The measured files as sealed memfds: each service's binary (manifest order), executed
    /// instead of the file (none: the files themselves), and the guest's files (which the
    /// guest config already points at; kept open here while the partition loads them).
    pub sealed: crate::measure::Sealed,
    /// The state directory's lock, if the caller took it already ([`lock_state_dir`]).
    pub lock: Option<std::fs::File>,
    /// The front ends the host asked for (`--listen`); none are bound otherwise.
    pub listen: crate::listeners::ListenRequest,
}

/// How `paravisor run` ended.
#[derive(Debug, Default)]
pub struct RunSummary {
    /// The guest's run, if there was a guest.
    pub guest: Option<crate::partition::vcpu::Outcome>,
}

/// Errors that stop `paravisor run`.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("state directory {0}: {1}")]
    StateDir(String, io::Error),
    #[error("another paravisor is already running with state directory {0} (it holds the directory's lock or answers on its control socket); stop it first or pass a different --state-dir")]
    AlreadyRunning(String),
    #[error("service \"{service}\": binary {path} not found ({source}); build with `cargo build --release` so that it sits next to `paravisor`")]
    Binary {
        service: String,
        path: String,
        source: io::Error,
    },
    #[error("service \"{service}\": file \"{file}\" at {path}: {source}")]
    File {
        service: String,
        file: String,
        path: String,
        source: io::Error,
    },
    #[error("cannot create {what}: {reason}")]
    Create { what: String, reason: String },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("guest partition: {0}")]
    Partition(#[from] crate::partition::PartitionError),
    #[error("platform: {0}")]
    Platform(#[from] crate::platform::PlatformError),
    #[error("{0}")]
    SealedKey(String),
    #[error("{0}")]
    Dir(#[from] crate::owned_dir::DirError),
}

/// The channel from the guest partition (client `guest`) to a service that answers guest
/// accesses: each service that owns ranges, and intercept.
struct GuestLink {
    server: usize,
    interface: Interface,
    mem: ChannelMemory,
    exits: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// The guest partition as the supervisor holds it.
struct Guest {
    /// Created with the supervisor, started once the services run.
    partition: Option<crate::partition::Partition>,
    running: Option<crate::partition::Running>,
    links: Vec<GuestLink>,
    /// Readable once the guest's run has ended.
    ended: vmm_sys_util::eventfd::EventFd,
    /// The eventfds wired to guest interrupts, handed to intercept.
    interrupts: Vec<(ipc_defs::services::intercept::Interrupt, i32)>,
    keep_running: bool,
    outcome: Option<crate::partition::vcpu::Outcome>,
    description: String,
    watchdog: Option<Duration>,
    /// Exits seen by the watchdog, and since when.
    progress: Option<(u64, Instant)>,
    declared_hung: bool,
    /// The partition's vCPUs (ids 0..vcpus): the register grant of its vtpm channel.
    vcpus: u32,
}

/// The channel between two services.
struct Link {
    client: usize,
    server: usize,
    interface: Interface,
    mem: ChannelMemory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not started yet: its turn in the initial start order has not come.
    Waiting,
    Starting,
    Running,
    /// Waiting to be restarted.
    Backoff,
    /// Gave up after a crash loop, or could not be started.
    Failed,
    /// Exited and not restarted (policy), or stopped at shutdown.
    Stopped,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Starting => "starting",
            State::Running => "running",
            State::Backoff => "backoff",
            State::Failed => "failed",
            State::Stopped => "stopped",
        }
    }
}

struct Process {
    pid: i32,
    pidfd: OwnedFd,
    namespaces: Namespaces,
    started: Instant,
}

/// A start under way: the first ping is sent, and the main loop looks for its answer until
/// the deadline.
struct PendingStart {
    ping: Sent,
    nonce: u64,
    deadline: Instant,
    /// When the loop looks for the answer next: soon after the spawn, then less often.
    next_look: Instant,
}

struct Service {
    spec: ServiceSpec,
    binary: PathBuf,
    /// Its loader and libraries exactly as measured: (sealed memfd, length, path inside its
    /// sandbox). The memfds are let go once the library store holds the libraries.
    code: Vec<(Option<OwnedFd>, u64, String)>,
    /// The binary exactly as measured (a sealed memfd), when the launch kept it.
    image: Option<OwnedFd>,
    control: ClientEnd<ctl::Request, ctl::Response>,
    status: SharedMemory,
    regions: Vec<(String, SharedMemory)>,
    /// Sockets bound for the service (those the host asked for), kept across its restarts.
    listeners: Vec<crate::listeners::Bound>,
    service_program: OwnedFd,
    loader_filter: Vec<seccompiler::sock_filter>,
    state: State,
    process: Option<Process>,
    restarts: u32,
    recent: VecDeque<Instant>,
    restart_at: Option<Instant>,
    /// The delay before the restart pending or last scheduled (its back-off).
    backoff: Option<Duration>,
    /// Killed by `paravisor restart`: started again at once when it is reaped, outside the
    /// restart policy.
    operator_restart: bool,
    last_exit: Option<String>,
    last_stats: ctl::Stats,
    /// `(slot, /proc link)` of every descriptor the last start granted and the service keeps.
    granted: Vec<(i32, String)>,
    /// When the service last answered a ping.
    last_answer: Instant,
    /// Since when its silence counts for the watchdog: its last answer, or the last health
    /// check at which it waited for a server that was not up (see
    /// [`Supervisor::health_check`]).
    silence_counted_from: Instant,
    /// It missed its last health ping while nothing it calls was down: its channels say
    /// `Unresponsive`.
    unresponsive: bool,
    /// Why the supervisor itself killed the service, if it did (reported instead of the
    /// bare signal).
    kill_reason: Option<String>,
    /// The start under way (state `starting`), until its first ping is answered.
    starting: Option<PendingStart>,
    /// Its stdout and stderr: the read ends of this start's pipes, and what is passed on.
    output: ServiceOutput,
    /// Who it runs as (uid, gid, no capabilities): applied at spawn, checked after.
    privilege: crate::privilege::ServicePrivilege,
}

/// The microkernel's own channel to the attest service (client name `paravisor`): reports for
/// `paravisor attest report`, the attest benchmark.
struct AttestLink {
    server: usize,
    client: ClientEnd<
        ipc_defs::endpoint::Request<attest::Request>,
        ipc_defs::endpoint::Response<attest::Response>,
    >,
}

/// The platform channel: the attest service calls, a thread of the microkernel answers.
struct PlatformLink {
    holder: usize,
    mem: ChannelMemory,
    /// The platform and this launch's facts: the serving thread answers the channel with
    /// them, and the microkernel's own sealing and VMPL 0 reports use them directly (a path
    /// no channel reaches).
    platform: std::sync::Arc<crate::platform::Platform>,
    launch: crate::platform_server::Launch,
    /// The serving thread's mapping of the channel, until `run` starts it (after the signal
    /// mask is set: a thread started before would take SIGTERM's default action for the
    /// whole process).
    pending: Option<ChannelMemory>,
    server: Option<crate::platform_server::PlatformServer>,
}

pub struct Supervisor {
    state_dir: PathBuf,
    /// The state directory's descriptor: every state file is opened through it.
    state: OwnedDir,
    /// The state directory's lock, held while this supervisor lives: one paravisor per state
    /// (two would write the same guest-state file).
    _lock: std::fs::File,
    attest_link: Option<AttestLink>,
    platform_link: Option<PlatformLink>,
    /// Sealed keys once unsealed, by (service, key name); handed over like key files.
    unsealed: std::collections::BTreeMap<(usize, String), KeyBytes>,
    sealing: crate::manifest::AttestSettings,
    /// What the state files are made from ([`Supervisor::write_state`]).
    manifest: Manifest,
    measurement: [u8; 48],
    /// What sealed keys are bound to: the paravisor's measurement, without the guest
    /// ([`crate::measure::LaunchLog::paravisor_measurement`]).
    sealing_measurement: [u8; 48],
    /// This launch's log, written to the state directory once the start is not refused.
    launch_log: crate::measure::LaunchLog,
    sandbox_root: PathBuf,
    log_filter: String,
    services: Vec<Service>,
    links: Vec<Link>,
    ring_capacity: u32,
    guest: Option<Guest>,
    /// The nonce of the next first ping.
    ping_nonce: u64,
    /// The microkernel's own threads' seccomp filters, compiled at start.
    filters: crate::thread_filters::ThreadFilters,
    /// The thread that clones services (started with the platform's, before the supervisor
    /// confines itself).
    spawner: Option<crate::spawner::Spawner>,
}

fn create_err(what: impl Into<String>) -> impl FnOnce(String) -> RunError {
    let what = what.into();
    move |reason| RunError::Create { what, reason }
}

impl Supervisor {
    /// Builds every channel, region and filter the manifest describes; starts nothing yet.
    pub fn new(opts: &Options) -> Result<Supervisor, RunError> {
        let m = &opts.manifest;
        let state = opts.state.try_clone()?;
        let lock = match &opts.lock {
            Some(l) => l.try_clone()?,
            None => lock_state_dir(&state)?,
        };
        // The platform before any state file is made: a platform that is refused (another
        // user's, a chip secret others can read) leaves the state untouched.
        let platform = match m.services.iter().any(|s| s.platform) {
            true => Some(open_or_init_platform(&opts.platform_dir)?),
            false => None,
        };
        let enabled =
            crate::listeners::enabled(m, &opts.listen).map_err(|e| create_err("front ends")(e))?;
        let mut services = Vec::new();
        let tag_width = m.services.iter().map(|s| s.name.len()).max().unwrap_or(0);
        // Who each service runs as: computed once, here, for spawn and the live audit.
        let mut privileges =
            crate::privilege::plan(m, &crate::privilege::Runner::current()).into_iter();
        let filters = crate::thread_filters::ThreadFilters::compile(m, std::process::id())
            .map_err(|e| create_err("the microkernel's thread filters")(e.to_string()))?;
        for spec in &m.services {
            let binary = opts.bin_dir.join(&spec.binary);
            std::fs::metadata(&binary).map_err(|source| RunError::Binary {
                service: spec.name.clone(),
                path: binary.display().to_string(),
                source,
            })?;
            let control_mem =
                ChannelMemory::create(&format!("pv-control-{}", spec.name), m.ring_capacity)
                    .map_err(|e| {
                        create_err(format!("control channel of {}", spec.name))(e.to_string())
                    })?;
            let status = SharedMemory::create(&format!("pv-status-{}", spec.name), 4096)?;
            init_status(&status)?;
            let mut regions = Vec::new();
            for r in &spec.regions {
                let shm = SharedMemory::create(
                    &format!("pv-region-{}-{}", spec.name, r.name),
                    r.size as usize,
                )?;
                regions.push((r.name.clone(), shm));
            }
            let mut listeners = Vec::new();
            for l in enabled.iter().filter(|l| l.service == spec.name) {
                let bound = crate::listeners::bind(l, &opts.state_dir).map_err(|e| {
                    create_err(format!(
                        "listener {} of {} on {}",
                        l.name, spec.name, l.address
                    ))(e)
                })?;
                listeners.push(bound);
            }
            let program = profiles::service_program(&spec.syscalls).map_err(|e| {
                create_err(format!("seccomp profile of {}", spec.name))(e.to_string())
            })?;
            let bytes = profiles::program_bytes(&program);
            let program_fd = ipc_defs::hosted::sys::memfd(
                &format!("pv-seccomp-{}", spec.name),
                bytes.len() as u64,
            )?;
            write_all_at(&program_fd, &bytes)?;
            ipc_defs::hosted::sys::seal_read_only(&program_fd)?;
            // Declared listeners the host did not ask for are not granted.
            let caps = capability_count(spec, m, opts.guest.is_some()) + listeners.len()
                - spec.listen.len();
            let loader_filter =
                profiles::loader_program(&spec.syscalls, SpawnPlan::binary_slot(caps)).map_err(
                    |e| create_err(format!("loader profile of {}", spec.name))(e.to_string()),
                )?;
            let image = match opts.sealed.services.get(services.len()) {
                Some(fd) => Some(fd.try_clone()?),
                None => None,
            };
            let code = opts
                .sealed
                .code_of(services.len())
                .into_iter()
                .map(|(fd, length, path)| Ok((Some(fd.try_clone()?), length, path.to_string())))
                .collect::<std::io::Result<Vec<_>>>()?;
            services.push(Service {
                spec: spec.clone(),
                binary,
                image,
                code,
                control: ClientEnd::new(control_mem, WaitPolicy::default()),
                status,
                regions,
                listeners,
                service_program: program_fd,
                loader_filter,
                state: State::Stopped,
                process: None,
                restarts: 0,
                recent: VecDeque::new(),
                restart_at: None,
                backoff: None,
                operator_restart: false,
                last_exit: None,
                last_stats: ctl::Stats::default(),
                granted: Vec::new(),
                last_answer: Instant::now(),
                silence_counted_from: Instant::now(),
                unresponsive: false,
                kill_reason: None,
                starting: None,
                output: ServiceOutput::new(&spec.name, tag_width)
                    .with_format(crate::logging::format()),
                privilege: privileges.next().ok_or_else(|| {
                    create_err(format!("identity of {}", spec.name))("no plan".into())
                })?,
            });
        }
        let mut links = Vec::new();
        for (client, spec) in m.services.iter().enumerate() {
            for interface in &spec.calls {
                let server = m
                    .services
                    .iter()
                    .position(|s| s.serves.contains(interface))
                    .ok_or_else(|| RunError::Create {
                        what: format!("channel {} -> {interface}", spec.name),
                        reason: "no server (manifest validation should have caught this)".into(),
                    })?;
                let mem = ChannelMemory::create(
                    &format!("pv-chan-{}-{interface}", spec.name),
                    m.ring_capacity,
                )
                .map_err(|e| {
                    create_err(format!("channel {} -> {interface}", spec.name))(e.to_string())
                })?;
                links.push(Link {
                    client,
                    server,
                    interface: *interface,
                    mem,
                });
            }
        }
        let guest = match &opts.guest {
            None => None,
            Some(config) => Some(Self::guest(config, m, opts.keep_running)?),
        };
        let attest_link = match m
            .services
            .iter()
            .position(|s| s.serves.contains(&Interface::Attest))
        {
            None => None,
            Some(server) => {
                let mem = ChannelMemory::create("pv-chan-paravisor-attest", m.ring_capacity)
                    .map_err(|e| create_err("channel paravisor -> attest")(e.to_string()))?;
                Some(AttestLink {
                    server,
                    client: ClientEnd::new(mem, WaitPolicy::default()),
                })
            }
        };
        let platform_link = match (m.services.iter().position(|s| s.platform), platform) {
            (Some(holder), Some(platform)) => {
                let mem = ChannelMemory::create("pv-chan-attest-platform", m.ring_capacity)
                    .map_err(|e| create_err("platform channel")(e.to_string()))?;
                let view = ipc_defs::hosted::sys::dup_inheritable(mem.shm())
                    .map_err(|e| create_err("platform channel")(e.to_string()))
                    .and_then(|fd| {
                        ChannelMemory::open(fd)
                            .map_err(|e| create_err("platform channel")(e.to_string()))
                    })?;
                let launch = crate::platform_server::Launch {
                    facts: crate::snp::LaunchFacts {
                        measurement: opts.launch_log.measurement,
                        policy: crate::snp::POLICY,
                        guest_svn: 0,
                    },
                    host_data: [0; 32],
                    report_id: crate::platform::new_report_id()?,
                };
                Some(PlatformLink {
                    holder,
                    mem,
                    platform: std::sync::Arc::new(platform),
                    launch,
                    pending: Some(view),
                    server: None,
                })
            }
            _ => None,
        };
        Ok(Supervisor {
            state,
            _lock: lock,
            attest_link,
            platform_link,
            unsealed: std::collections::BTreeMap::new(),
            sealing: m.attest.clone(),
            manifest: m.clone(),
            measurement: opts.launch_log.measurement,
            sealing_measurement: opts.launch_log.paravisor_measurement(),
            launch_log: opts.launch_log.clone(),
            sandbox_root: opts.state_dir.join(".sandbox-root"),
            state_dir: opts.state_dir.clone(),
            log_filter: opts.log_filter.clone(),
            services,
            links,
            ring_capacity: m.ring_capacity,
            guest,
            ping_nonce: 0,
            filters,
            spawner: None,
        })
    }

    /// Creates the VM (with the interrupts the manifest grants wired) and the partition's
    /// channels; the vCPUs start in [`Supervisor::run`], once the services are up.
    fn guest(
        config: &crate::partition::GuestConfig,
        m: &Manifest,
        keep_running: bool,
    ) -> Result<Guest, RunError> {
        use crate::partition::Image;
        if crate::partition::is_pvm() {
            if let Image::Linux { .. } = config.image {
                tracing::warn!(
                    "/dev/kvm is KVM on PVM (a software virtualiser): a stock Linux kernel does not \
                     boot on it (its instruction emulator fails on cmpxchg16b, xrstor and int3 in \
                     early boot); expect the run to end with an emulation failure. Use hardware KVM \
                     for Linux guests; the test guest runs here."
                );
            } else {
                tracing::info!(
                    "/dev/kvm is KVM on PVM: ring-0 guest code is emulated, ring 3 runs natively"
                );
            }
        }
        let interrupts = crate::manifest::guest_interrupts(&m.services);
        let partition = crate::partition::Partition::create(config.clone(), &interrupts)?;
        let mut links = Vec::new();
        for (server, spec) in m.services.iter().enumerate() {
            let owns_ranges =
                !spec.mmio.is_empty() || !spec.pio.is_empty() || spec.pci_device.is_some();
            let interface = if spec.serves.contains(&Interface::Intercept) {
                Some(Interface::Intercept)
            } else if owns_ranges {
                spec.serves
                    .iter()
                    .copied()
                    .find(|i| crate::partition::router::takes_guest_accesses(*i))
            } else {
                None
            };
            let Some(interface) = interface else { continue };
            let mem = ChannelMemory::create(&format!("pv-guest-{}", spec.name), m.ring_capacity)
                .map_err(|e| {
                    create_err(format!("channel guest -> {}", spec.name))(e.to_string())
                })?;
            links.push(GuestLink {
                server,
                interface,
                mem,
                exits: Default::default(),
            });
        }
        let description = match &config.image {
            Image::TestGuest {
                path: None,
                command_line,
            } => {
                format!("test guest (embedded) \"{command_line}\"")
            }
            Image::TestGuest {
                path: Some(p),
                command_line,
            } => {
                format!("ELF guest {} \"{command_line}\"", p.display())
            }
            Image::Linux {
                kernel,
                command_line,
                ..
            } => {
                format!("Linux {} \"{command_line}\"", kernel.display())
            }
        };
        Ok(Guest {
            interrupts: partition.interrupt_fds(),
            partition: Some(partition),
            running: None,
            links,
            ended: vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
            keep_running,
            outcome: None,
            watchdog: config.watchdog,
            progress: None,
            declared_hung: false,
            vcpus: config.vcpus,
            description: format!(
                "{description}, {} MiB, {} vCPU(s)",
                config.memory >> 20,
                config.vcpus
            ),
        })
    }

    fn guest_watchdog_armed(&self) -> bool {
        self.guest
            .as_ref()
            .is_some_and(|g| g.watchdog.is_some() && g.running.is_some() && g.outcome.is_none())
    }

    /// The partition's watchdog: a guest that made no exit for its period is declared hung
    /// (its vCPUs end with a register report).
    fn check_guest_progress(&mut self) {
        if !self.guest_watchdog_armed() {
            return;
        }
        let Some(guest) = self.guest.as_mut() else {
            return;
        };
        let (Some(period), Some(running)) = (guest.watchdog, guest.running.as_ref()) else {
            return;
        };
        let exits = running.exits();
        let now = Instant::now();
        if guest.declared_hung {
            // Kick again until the vCPUs have ended (a kick can land just before KVM_RUN).
            running.declare_hung();
            return;
        }
        match guest.progress {
            // Waiting for a service (e.g. one restarting) is not being stuck in the guest.
            Some((seen, at)) if seen == exits && !running.in_call() => {
                if now.duration_since(at) >= period {
                    tracing::error!("the guest made no exit for {period:?}: declaring it hung");
                    running.declare_hung();
                    guest.declared_hung = true;
                }
            }
            _ => guest.progress = Some((exits, now)),
        }
    }

    /// Starts the vCPUs, with a router over the partition's channels.
    fn start_guest(&mut self) -> Result<(), RunError> {
        use crate::partition::router;
        let Some(guest) = self.guest.as_mut() else {
            return Ok(());
        };
        let Some(partition) = guest.partition.take() else {
            return Ok(());
        };
        let mut devices = Vec::new();
        let mut routes = Vec::new();
        let mut intercept = None;
        let mut pci_owners = Vec::new();
        for link in &guest.links {
            let fd = link.mem.shm().as_fd().try_clone_to_owned()?;
            let mem = ChannelMemory::open(fd)
                .map_err(|e| create_err("partition channel")(e.to_string()))?;
            // The vCPU waits for the device's answer: spin (yielding) for a while first.
            let end = ClientEnd::new(
                mem,
                WaitPolicy {
                    spin: Duration::from_millis(2),
                    spin_only: false,
                },
            );
            let spec = &self.services[link.server].spec;
            let Some(end) = router::DeviceEnd::for_interface(link.interface, end) else {
                continue;
            };
            let index = devices.len();
            if link.interface == Interface::Intercept {
                intercept = Some(index);
            }
            for (space, ranges) in [
                (ipc_defs::services::guest::Space::Mmio, &spec.mmio),
                (ipc_defs::services::guest::Space::Port, &spec.pio),
            ] {
                for r in ranges {
                    routes.push(router::Route {
                        space,
                        base: r.base,
                        size: r.size,
                        device: index,
                    });
                }
            }
            if let Some(d) = spec.pci_device {
                pci_owners.push((d, index));
            }
            devices.push(router::Device {
                service: spec.name.clone(),
                end,
                exits: link.exits.clone(),
            });
        }
        let ended = guest.ended.try_clone()?;
        let running = partition.start(
            router::Router::new(devices, routes, intercept, pci_owners),
            ended,
            self.filters.vcpu.clone(),
        )?;
        tracing::info!("guest started: {}", guest.description);
        guest.running = Some(running);
        Ok(())
    }

    fn guest_row(&self) -> Option<crate::control::GuestRow> {
        use std::sync::atomic::Ordering;
        let guest = self.guest.as_ref()?;
        let vcpus = guest
            .running
            .as_ref()
            .map(|r| {
                r.stats
                    .iter()
                    .enumerate()
                    .map(|(id, s)| crate::control::VcpuRow {
                        id: id as u32,
                        state: match s.state.load(Ordering::Relaxed) {
                            crate::partition::vcpu::STATE_RUNNING => "running",
                            crate::partition::vcpu::STATE_ENDED => "ended",
                            _ => "created",
                        }
                        .into(),
                        exits: s.exits.load(Ordering::Relaxed),
                        in_thread: s.in_thread.load(Ordering::Relaxed),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(crate::control::GuestRow {
            image: guest.description.clone(),
            vcpus,
            exits_by_service: guest
                .links
                .iter()
                .map(|l| {
                    (
                        self.services[l.server].spec.name.clone(),
                        l.exits.load(Ordering::Relaxed),
                    )
                })
                .collect(),
            outcome: guest.outcome.as_ref().map(|o| format!("{o:?}")),
        })
    }

    /// Stops the vCPUs (before the services they wait for).
    fn stop_guest(&mut self) {
        if let Some(guest) = self.guest.as_mut() {
            if let Some(running) = guest.running.take() {
                let outcome = running.stop();
                if guest.outcome.is_none() {
                    guest.outcome = outcome;
                }
            }
        }
    }

    /// Runs until SIGINT/SIGTERM or a shutdown command; then stops every service.
    pub fn run(mut self) -> Result<RunSummary, RunError> {
        let signals = sandbox::signalfd(&[libc::SIGINT, libc::SIGTERM])?;
        let socket = crate::control::socket_path(&self.state_dir);
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            return Err(RunError::AlreadyRunning(
                self.state_dir.display().to_string(),
            ));
        }
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        self.confine()?;
        tracing::info!(
            services = self.services.len(),
            channels = self.links.len(),
            ring_capacity = self.ring_capacity,
            socket = %socket.display(),
            "starting"
        );
        if let Err(e) = self.unseal_keys().and_then(|()| self.write_state()) {
            if let RunError::SealedKey(why) = &e {
                self.record_refusal(why);
            }
            self.shutdown();
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
        // The first start of every service not started yet, in manifest order, each once the
        // one before has answered its first ping or failed (the order the services have
        // always started in), but as states of the loop below: `ps`, `kill`, `stop`, restarts
        // and the watchdog are served meanwhile. The guest starts after the last of them.
        let mut initial: VecDeque<usize> = (0..self.services.len())
            .filter(|i| self.services[*i].state == State::Stopped)
            .collect();
        for &i in &initial {
            self.services[i].state = State::Waiting;
        }
        let mut initial_start: Option<usize> = None;
        let mut initial_done = false;

        let mut stop = false;
        let mut next_health = Instant::now() + HEALTH_INTERVAL;
        while !stop {
            if !initial_done {
                if initial_start.is_some_and(|i| self.services[i].state != State::Starting) {
                    initial_start = None;
                }
                while initial_start.is_none() {
                    let Some(i) = initial.pop_front() else {
                        initial_done = true;
                        if let Err(e) = self.services_started(&socket) {
                            self.shutdown();
                            let _ = std::fs::remove_file(&socket);
                            return Err(e);
                        }
                        break;
                    };
                    self.start(i);
                    if self.services[i].state == State::Starting {
                        initial_start = Some(i);
                    }
                }
            }
            let mut fds = vec![signals.as_raw_fd(), listener.as_raw_fd()];
            let guest_fd = self.guest.as_ref().map(|g| g.ended.as_raw_fd());
            // What each descriptor after the first two is.
            let mut watched: Vec<(usize, Option<Stream>)> = Vec::new();
            for (i, s) in self.services.iter().enumerate() {
                if let Some(p) = &s.process {
                    fds.push(p.pidfd.as_raw_fd());
                    watched.push((i, None));
                }
                for (stream, fd) in s.output.fds() {
                    fds.push(fd);
                    watched.push((i, Some(stream)));
                }
            }
            let now = Instant::now();
            let next = self
                .services
                .iter()
                .filter_map(|s| s.restart_at)
                .chain(
                    self.services
                        .iter()
                        .filter_map(|s| s.starting.as_ref())
                        .map(|p| p.next_look.min(p.deadline)),
                )
                .chain([next_health])
                .min();
            // Rounded up: a poll that ends before the moment would only spin.
            let mut timeout = next.map_or(-1, |t| {
                t.saturating_duration_since(now)
                    .as_micros()
                    .div_ceil(1000)
                    .min(60_000) as i32
            });
            if self.guest_watchdog_armed() {
                timeout = if timeout < 0 { 1000 } else { timeout.min(1000) };
            }
            if let Some(fd) = guest_fd {
                fds.push(fd);
            }
            let ready = sandbox::poll_readable(&fds, timeout)?;
            if guest_fd.is_some() && ready.last() == Some(&true) && self.guest_ended() {
                stop = true;
            }
            self.check_guest_progress();
            if ready[0] {
                if let Some(sig) = sandbox::read_signal(&signals) {
                    tracing::info!("received signal {sig}; shutting down");
                    stop = true;
                }
            }
            // Output first: a death drains what is left before it is reported.
            for (k, (i, stream)) in watched.iter().enumerate() {
                if let (true, Some(stream)) = (ready[2 + k], stream) {
                    self.pump_output(*i, *stream);
                }
            }
            for (k, (i, stream)) in watched.iter().enumerate() {
                if ready[2 + k] && stream.is_none() {
                    self.reap(*i);
                }
            }
            self.check_starts();
            let now = Instant::now();
            if now >= next_health {
                self.health_check();
                for i in 0..self.services.len() {
                    self.report_dropped_output(i);
                }
                next_health = Instant::now() + HEALTH_INTERVAL;
            }
            for i in 0..self.services.len() {
                if self.services[i].restart_at.is_some_and(|t| t <= now) {
                    self.services[i].restart_at = None;
                    self.services[i].restarts += 1;
                    self.start(i);
                }
            }
            if ready[1] {
                while let Ok((stream, _)) = listener.accept() {
                    let _ = stream.set_nonblocking(false);
                    let reply = match crate::control::read_command(&stream) {
                        Ok(Command::Shutdown) => {
                            stop = true;
                            Reply::Done {
                                message: "shutting down".into(),
                            }
                        }
                        Ok(cmd) => self.command(cmd),
                        Err(e) => Reply::Error { message: e },
                    };
                    crate::control::write_reply(&stream, &reply);
                }
            }
        }
        self.stop_guest();
        self.shutdown();
        let _ = std::fs::remove_file(&socket);
        Ok(RunSummary {
            guest: self.guest.as_ref().and_then(|g| g.outcome.clone()),
        })
    }

    /// The initial starts have ended: says how many services run and starts the guest.
    fn services_started(&mut self, socket: &Path) -> Result<(), RunError> {
        let up = self
            .services
            .iter()
            .filter(|s| s.state == State::Running)
            .count();
        tracing::info!(
            "{up} of {} services running; control socket {}",
            self.services.len(),
            socket.display()
        );
        self.start_guest()
    }

    /// Starts the spawner and platform threads, each under its own seccomp filter, then
    /// confines this thread (see [`crate::thread_filters`] for the order). After the signal
    /// mask is set: the threads inherit it.
    fn confine(&mut self) -> Result<(), RunError> {
        if self.spawner.is_none() {
            // One copy of every service's libraries, for all of them (see LibraryStore).
            let mut libraries = Vec::new();
            for s in &self.services {
                for (fd, length, path) in &s.code {
                    if let Some(fd) = fd {
                        libraries.push((fd.try_clone()?, *length, path.clone()));
                    }
                }
            }
            let spawner = crate::spawner::Spawner::start(
                self.filters.spawner.clone(),
                Some((self.state_dir.join(".sandbox-store"), libraries)),
            )?;
            if spawner.has_store() {
                // The store is the measured copy every start binds from: the images are
                // not needed any more (their memory is the instance's largest share).
                for s in &mut self.services {
                    for (fd, _, _) in &mut s.code {
                        *fd = None;
                    }
                }
            }
            self.spawner = Some(spawner);
        }
        self.start_platform()?;
        crate::thread_filters::install(&self.filters.supervisor).map_err(|e| RunError::Create {
            what: "the supervisor's seccomp filter".into(),
            reason: e.to_string(),
        })?;
        tracing::info!(
            "microkernel threads confined: supervisor, spawner{}, vCPUs at start",
            if self.platform_link.is_some() {
                ", platform"
            } else {
                ""
            }
        );
        Ok(())
    }

    /// Starts the platform's serving thread (after the signal mask: see [`PlatformLink`]).
    fn start_platform(&mut self) -> Result<(), RunError> {
        if let Some(link) = self.platform_link.as_mut() {
            if let Some(view) = link.pending.take() {
                link.server = Some(crate::platform_server::PlatformServer::start(
                    view,
                    link.platform.clone(),
                    link.launch,
                    self.services[link.holder].spec.name.clone(),
                    self.filters.platform.clone(),
                )?);
                link.mem.set_server_state(ServerState::Up);
            }
        }
        Ok(())
    }

    /// `paravisor reseal`: unseals (re-sealing through the broker if needed) every sealed
    /// key under this launch, then stops the services it started. What happened, per key.
    pub fn reseal(mut self) -> Result<Vec<String>, RunError> {
        let _signals = sandbox::signalfd(&[libc::SIGINT, libc::SIGTERM])?;
        self.confine()?;
        let result = self.unseal_keys();
        if let Err(RunError::SealedKey(why)) = &result {
            self.record_refusal(why);
        }
        self.shutdown();
        result?;
        if self.unsealed.is_empty() {
            return Ok(vec![
                "the manifest declares no sealed key; nothing to do".into()
            ]);
        }
        Ok(self
            .unsealed
            .keys()
            .map(|(i, name)| {
                format!(
                    "key \"{name}\" of {}: sealed (policy {}) to paravisor measurement {}",
                    self.services[*i].spec.name,
                    self.sealing.sealing.name(),
                    crate::util::hex(&self.sealing_measurement)
                )
            })
            .collect())
    }

    /// The guest's run ended (its `ended` eventfd fired): reports it; whether the paravisor
    /// stops now.
    fn guest_ended(&mut self) -> bool {
        let Some(guest) = self.guest.as_mut() else {
            return false;
        };
        let _ = guest.ended.read();
        let Some(running) = guest.running.as_ref() else {
            return false;
        };
        let Some(outcome) = running.outcome() else {
            return false;
        };
        if guest.outcome.is_some() {
            return !guest.keep_running;
        }
        use crate::partition::vcpu::Outcome;
        match &outcome {
            Outcome::Exited(status) => tracing::info!("guest ended with status {status}"),
            Outcome::Reset => tracing::warn!(
                "guest asked for a reset; rebooting a guest is not supported, so the run ends"
            ),
            Outcome::Failed(why) => tracing::error!("guest partition failed: {why}"),
            Outcome::Stopped => {}
        }
        guest.outcome = Some(outcome);
        if guest.keep_running {
            tracing::info!(
                "--keep-running: the services stay up; stop with `paravisor stop` or Ctrl-C"
            );
        }
        !guest.keep_running
    }

    /// Starts service `i` (first start or restart): spawns it and sends its first ping; the
    /// main loop ([`Supervisor::check_starts`]) takes it from there.
    fn start(&mut self, i: usize) {
        self.services[i].state = State::Starting;
        if let Err(reason) = self.spawn(i) {
            self.start_failed(i, reason);
        }
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let Grants {
            record,
            mut fds,
            mut expected,
        } = self.capabilities(i)?;
        // Its stdout and stderr: pipes of this start, read by the supervisor.
        let (stdout, stdout_end) =
            sandbox::output_pipe().map_err(|e| format!("output pipe: {e}"))?;
        let (stderr, stderr_end) =
            sandbox::output_pipe().map_err(|e| format!("output pipe: {e}"))?;
        for (slot, pipe) in [(1, &stdout), (2, &stderr)] {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", pipe.as_raw_fd()))
                .map_err(|e| format!("output pipe: {e}"))?;
            expected.push((slot, link.display().to_string()));
        }
        self.services[i].granted = expected;
        let record_bytes =
            postcard::to_allocvec(&record).map_err(|e| format!("bootstrap record: {e}"))?;
        let record_fd = ipc_defs::hosted::sys::memfd(
            &format!("pv-bootstrap-{}", record.service),
            record_bytes.len() as u64,
        )
        .map_err(|e| e.to_string())?;
        write_all_at(&record_fd, &record_bytes).map_err(|e| e.to_string())?;
        ipc_defs::hosted::sys::seal_read_only(&record_fd).map_err(|e| e.to_string())?;
        let mut raw = vec![record_fd.as_raw_fd()];
        raw.extend(fds.iter().map(|f| f.as_raw()));
        let s = &self.services[i];
        let rlimits = vec![
            (libc::RLIMIT_AS, s.spec.limits.memory),
            (libc::RLIMIT_NOFILE, s.spec.limits.open_files),
            (libc::RLIMIT_CORE, 0),
        ];
        let mut plan = SpawnPlan::new(
            (&s.binary, s.image.as_ref()),
            &s.spec.args,
            &raw,
            &s.code
                .iter()
                .map(|(fd, length, path)| (fd.as_ref(), *length, path.as_str()))
                .collect::<Vec<_>>(),
            s.loader_filter.clone(),
            rlimits,
            &self.sandbox_root,
            &format!("pv-{}", s.spec.name),
        )
        .map_err(|e| e.to_string())?
        .run_as(sandbox::Identity::of(&s.privilege));
        plan.set_output(stdout_end, stderr_end);
        let spawner = self
            .spawner
            .as_ref()
            .ok_or("the spawner thread is not running")?;
        // The plan (with our copies of the pipes' write ends) is dropped on the spawner
        // thread after the spawn: the service holds the only ones, so its pipes end when it
        // does.
        let spawned = spawner
            .spawn(plan, Namespaces::all() - Namespaces::USER)
            .map_err(|e| e.to_string())?;
        fds.clear();
        self.services[i].output.attach(stdout, stderr);
        self.services[i].process = Some(Process {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            namespaces: spawned.namespaces,
            started: Instant::now(),
        });
        self.ping_nonce += 1;
        let nonce = self.ping_nonce;
        let ping = self.services[i]
            .control
            .send(&ctl::Request::Ping { nonce })
            .map_err(|e| format!("cannot send its first ping: {e}"))?;
        let now = Instant::now();
        self.services[i].starting = Some(PendingStart {
            ping,
            nonce,
            deadline: now + START_TIMEOUT,
            next_look: now + Duration::from_millis(1),
        });
        Ok(())
    }

    /// Looks for the first answer of every starting service, without waiting. The answer
    /// proves the service up and inside its own profile: it is then `running`. A start that
    /// misses its deadline, or gets another answer, fails.
    fn check_starts(&mut self) {
        for i in 0..self.services.len() {
            let Some(p) = &self.services[i].starting else {
                continue;
            };
            let (ping, nonce, deadline) = (p.ping, p.nonce, p.deadline);
            let now = Instant::now();
            match self.services[i].control.try_reply(ping) {
                Ok(Some(ctl::Response::Pong { nonce: n })) if n == nonce => self.started(i),
                Ok(Some(other)) => {
                    self.start_failed(i, format!("answered its first ping with {other:?}"))
                }
                Ok(None) if now >= deadline => self.start_failed(
                    i,
                    format!("did not answer its first ping within {START_TIMEOUT:?}"),
                ),
                Ok(None) => {
                    if let Some(p) = self.services[i]
                        .starting
                        .as_mut()
                        .filter(|p| now >= p.next_look)
                    {
                        // Often while a quick start is likely, then every interval.
                        let waited = now.saturating_duration_since(deadline - START_TIMEOUT);
                        p.next_look =
                            now + (waited / 8).clamp(Duration::from_millis(1), START_LOOK_INTERVAL);
                    }
                }
                Err(e) => self.start_failed(i, format!("did not answer its first ping: {e}")),
            }
        }
    }

    /// Service `i` answered its first ping: checks its sandbox, then it serves.
    fn started(&mut self, i: usize) {
        self.services[i].starting = None;
        let Some((pid, namespaces)) = self.services[i]
            .process
            .as_ref()
            .map(|p| (p.pid, p.namespaces))
        else {
            return;
        };
        if let Some(problem) = sandbox_problem(pid, &self.services[i].privilege) {
            return self.start_failed(i, format!("sandbox not in force: {problem}"));
        }
        for link in &self.links {
            if link.server == i {
                link.mem.set_server_state(ServerState::Up);
            }
        }
        if let Some(guest) = &self.guest {
            for link in guest.links.iter().filter(|l| l.server == i) {
                link.mem.set_server_state(ServerState::Up);
            }
        }
        if let Some(link) = self.attest_link.as_ref().filter(|l| l.server == i) {
            link.client.memory().set_server_state(ServerState::Up);
        }
        // Its clients, and theirs, may have waited for it: their silence counts from now,
        // so that each has its whole watchdog period to finish the call it was blocked in.
        let now = Instant::now();
        let mut waiting = vec![i];
        let mut seen = vec![false; self.services.len()];
        while let Some(server) = waiting.pop() {
            for l in self.links.iter().filter(|l| l.server == server) {
                if !std::mem::replace(&mut seen[l.client], true) {
                    let c = &mut self.services[l.client];
                    c.silence_counted_from = c.silence_counted_from.max(now);
                    waiting.push(l.client);
                }
            }
        }
        let s = &mut self.services[i];
        s.state = State::Running;
        s.last_answer = Instant::now();
        s.silence_counted_from = s.last_answer;
        s.unresponsive = false;
        s.kill_reason = None;
        s.output.note(format!("running (pid {pid})"));
        tracing::info!(service = %s.spec.name, pid, uid = s.privilege.uid, namespaces = ?namespaces.names(), "running");
    }

    /// The start of service `i` failed: a process that exists is killed, and its death
    /// (through its pidfd and [`Supervisor::reap`]) moves its channels on and applies the
    /// restart policy, never while it might still write to its rings; without a process that
    /// happens now.
    fn start_failed(&mut self, i: usize, reason: String) {
        let s = &mut self.services[i];
        s.starting = None;
        tracing::error!(service = %s.spec.name, "cannot start: {reason}");
        let reason = format!("start failed: {reason}");
        s.last_exit = Some(reason.clone());
        match &s.process {
            Some(p) => {
                s.kill_reason = Some(reason);
                let _ = sandbox::pidfd_signal(&p.pidfd, libc::SIGKILL);
            }
            None => {
                self.after_death(i);
                self.schedule_restart(i, true);
            }
        }
    }

    /// Passes on what service `i` wrote to `stream` (never waiting for more).
    fn pump_output(&mut self, i: usize, stream: Stream) {
        // A starting service that writes is about to answer (its runtime logs as it enters
        // its sandbox): look again soon.
        if let Some(p) = self.services[i].starting.as_mut() {
            p.next_look = p.next_look.min(Instant::now() + Duration::from_millis(1));
        }
        let output = &mut self.services[i].output;
        match stream {
            Stream::Stdout => output.pump(stream, &mut std::io::stdout().lock()),
            Stream::Stderr => output.pump(stream, &mut crate::logging::log_writer()),
        }
    }

    /// Service `i`'s process has ended: passes on everything left in its pipes, and says how
    /// much of its output was dropped.
    fn drain_output(&mut self, i: usize) {
        self.services[i].output.drain(
            &mut std::io::stdout().lock(),
            &mut crate::logging::log_writer(),
        );
        self.report_dropped_output(i);
    }

    /// The periodic notice of the lines of service `i`'s output the rate limit dropped.
    fn report_dropped_output(&mut self, i: usize) {
        let s = &mut self.services[i];
        let new = s.output.take_unreported();
        if new > 0 {
            tracing::warn!(
                service = %s.spec.name,
                "{new} lines of its output dropped (more than {} lines at once, or {} per {:?}); {} since the paravisor started",
                crate::output::BURST_LINES,
                crate::output::BURST_LINES,
                crate::output::REFILL_PERIOD,
                s.output.dropped()
            );
        }
    }

    /// Waits up to `timeout` for the process behind `pidfd` to exit, and reaps it; every
    /// service's output is passed on meanwhile (a stopping service must not block on a full
    /// pipe).
    fn wait_exit_forwarding(&mut self, pidfd: &OwnedFd, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(_)) = sandbox::pidfd_reap(pidfd) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut fds = vec![pidfd.as_raw_fd()];
            let mut outputs = Vec::new();
            for (i, s) in self.services.iter().enumerate() {
                for (stream, fd) in s.output.fds() {
                    fds.push(fd);
                    outputs.push((i, stream));
                }
            }
            let ready =
                sandbox::poll_readable(&fds, left.as_millis().max(1) as i32).unwrap_or_default();
            for (k, (i, stream)) in outputs.into_iter().enumerate() {
                if ready.get(1 + k) == Some(&true) {
                    self.pump_output(i, stream);
                }
            }
        }
    }

    /// The bootstrap record and the descriptors of service `i`, in slot order (slot 3 is the
    /// record itself, added by the caller).
    fn capabilities(&self, i: usize) -> Result<Grants, String> {
        let s = &self.services[i];
        let shm_cap = |kind, name: String, shm: &SharedMemory| {
            (
                kind,
                name,
                shm.len() as u64,
                Fd::Borrowed(shm.as_raw_fd()),
                Some(memfd_link(shm)),
                Grant::Interface,
            )
        };
        #[allow(clippy::type_complexity)]
        let mut caps: Vec<(CapabilityKind, String, u64, Fd, Option<String>, Grant)> = vec![
            shm_cap(CapabilityKind::Status, "status".into(), &s.status),
            // The runtime closes the seccomp program once it is installed.
            (
                CapabilityKind::SeccompProgram,
                "seccomp".into(),
                0,
                Fd::Borrowed(s.service_program.as_raw_fd()),
                None,
                Grant::Interface,
            ),
            shm_cap(
                CapabilityKind::Control,
                "control".into(),
                s.control.memory().shm(),
            ),
        ];
        for link in &self.links {
            if link.server == i {
                let client = &self.services[link.client].spec;
                let mut cap = shm_cap(
                    CapabilityKind::Serve(link.interface),
                    client.name.clone(),
                    link.mem.shm(),
                );
                cap.5 = client
                    .grants
                    .get(&link.interface)
                    .copied()
                    .unwrap_or(Grant::Interface);
                // A front end's commands: locality 0 and the localities of the listeners this
                // run bound (`--listen`), not of every listener the manifest declares.
                if let Grant::Vtpm(g) = &mut cap.5 {
                    if !g.commands.is_empty() {
                        let zero = ipc_defs::services::vtpm::Localities::ZERO;
                        g.commands = self.services[link.client].listeners.iter().fold(
                            zero,
                            |all, l| match l.grant {
                                Grant::Localities(these) => all.union(these),
                                _ => all,
                            },
                        );
                    }
                }
                caps.push(cap);
            }
        }
        if let Some(guest) = &self.guest {
            for link in guest.links.iter().filter(|l| l.server == i) {
                let mut cap = shm_cap(
                    CapabilityKind::Serve(link.interface),
                    "guest".into(),
                    link.mem.shm(),
                );
                if link.interface == Interface::Intercept {
                    // Which PCI devices the host bridge forwards instead of answering.
                    let owned = self
                        .services
                        .iter()
                        .filter_map(|s| s.spec.pci_device)
                        .fold(0u32, |m, d| m | 1 << d);
                    cap.5 = Grant::PciDevices(owned);
                }
                if link.interface == Interface::Vtpm {
                    // The partition alone drives the TPM's registers, for its own vCPUs.
                    cap.5 = Grant::Vtpm(ipc_defs::services::vtpm::VtpmGrant {
                        registers: guest.vcpus,
                        ..ipc_defs::services::vtpm::VtpmGrant::NONE
                    });
                }
                caps.push(cap);
                if link.interface == Interface::Intercept {
                    for (irq, fd) in &guest.interrupts {
                        caps.push((
                            CapabilityKind::Interrupt(*irq),
                            format!("irq-{irq}").replace(' ', "-"),
                            0,
                            Fd::Borrowed(*fd),
                            Some("anon_inode:[eventfd]".into()),
                            Grant::Interface,
                        ));
                    }
                }
            }
        }
        if let Some(link) = self.attest_link.as_ref().filter(|l| l.server == i) {
            caps.push(shm_cap(
                CapabilityKind::Serve(Interface::Attest),
                attest::PARAVISOR_CLIENT.into(),
                link.client.memory().shm(),
            ));
        }
        if let Some(link) = self.platform_link.as_ref().filter(|l| l.holder == i) {
            caps.push(shm_cap(
                CapabilityKind::Platform,
                "platform".into(),
                link.mem.shm(),
            ));
        }
        for link in &self.links {
            if link.client == i {
                caps.push(shm_cap(
                    CapabilityKind::Call(link.interface),
                    self.services[link.server].spec.name.clone(),
                    link.mem.shm(),
                ));
            }
        }
        for (name, shm) in &s.regions {
            caps.push(shm_cap(CapabilityKind::Region, name.clone(), shm));
        }
        for f in &s.spec.files {
            // Through the state directory's descriptor: never a link, a FIFO or another
            // user's file.
            let how = match (f.access, &f.missing) {
                (FileAccess::ReadWrite, Missing::Create) => Open::ReadWriteOrCreate(0o600),
                (FileAccess::ReadWrite, _) => Open::ReadWrite,
                (_, _) => Open::Read,
            };
            let file = self
                .state
                .open_file(&f.path, how)
                .map_err(|e| format!("file \"{}\": {e}", f.name))?;
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map(|p| p.display().to_string())
                .ok();
            caps.push((
                CapabilityKind::File(f.access),
                f.name.clone(),
                len,
                Fd::Owned(file.into()),
                link,
                Grant::Interface,
            ));
        }
        for k in &s.spec.keys {
            // The key travels as a sealed memfd: the service gets the bytes, not the file.
            let loaded;
            let key = match &k.path {
                Some(path) => {
                    loaded = crate::state_files::load_key(&self.state, path)?;
                    &loaded
                }
                None => self
                    .unsealed
                    .get(&(i, k.name.clone()))
                    .ok_or_else(|| format!("sealed key \"{}\" has not been unsealed", k.name))?,
            };
            let fd =
                ipc_defs::hosted::sys::memfd(&format!("pv-key-{}", k.name), key.0.len() as u64)
                    .map_err(|e| format!("key \"{}\": {e}", k.name))?;
            write_all_at(&fd, &key.0).map_err(|e| format!("key \"{}\": {e}", k.name))?;
            ipc_defs::hosted::sys::seal_read_only(&fd)
                .map_err(|e| format!("key \"{}\": {e}", k.name))?;
            // The service may close it once read, so the live audit does not expect it.
            caps.push((
                CapabilityKind::Key,
                k.name.clone(),
                key.0.len() as u64,
                Fd::Owned(fd),
                None,
                Grant::Interface,
            ));
        }
        for l in &s.listeners {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", l.socket.as_raw_fd()))
                .ok()
                .map(|p| p.display().to_string());
            caps.push((
                CapabilityKind::Listener,
                l.name.clone(),
                0,
                Fd::Borrowed(l.socket.as_raw_fd()),
                link,
                l.grant,
            ));
        }
        let mut record = Bootstrap {
            magic: bootstrap::BOOTSTRAP_MAGIC,
            service: name16(&s.spec.name),
            log_filter: HString::try_from(self.log_filter.as_str())
                .unwrap_or_else(|_| HString::try_from("info").unwrap_or_default()),
            capabilities: heapless::Vec::new(),
        };
        let mut fds = Vec::new();
        let mut expected = vec![(0, "/dev/null".to_string())];
        for (k, (kind, name, size, fd, link, grant)) in caps.into_iter().enumerate() {
            let slot = bootstrap::FIRST_CAPABILITY_SLOT + k as i32;
            record
                .capabilities
                .push(Capability {
                    slot,
                    kind,
                    name: name16(&name),
                    size,
                    grant,
                })
                .map_err(|_| "too many capabilities for the bootstrap record".to_string())?;
            fds.push(fd);
            if let Some(link) = link {
                expected.push((slot, link));
            }
        }
        Ok(Grants {
            record,
            fds,
            expected,
        })
    }

    /// The watchdog: pings every running service; one that has not answered for its
    /// manifest's `watchdog` is killed as hung (its death is then handled like any other).
    ///
    /// Silence is not counted while the service waits for a server that is not up: one it
    /// calls is starting, in its restart back-off or not started yet, or is itself silent for
    /// that reason. A service blocked in a call cannot answer a ping, and killing it would only
    /// spread one service's fault to its clients (and theirs): a vTPM killed four times while
    /// the store it writes to sat in a long back-off. Which call it is blocked in cannot be
    /// seen from here, so any server of its that is down explains its silence; once every
    /// server is up again it has its whole watchdog period to answer. A service silent while
    /// its servers are up is marked `Unresponsive` on the channels it serves (its clients may
    /// stop waiting for it, see `ServerState`) and killed after its period. Services silent
    /// in a cycle of calls with nothing down explain nothing: each is killed in turn.
    fn health_check(&mut self) {
        let now = Instant::now();
        let mut silent = vec![false; self.services.len()];
        for (i, s) in self.services.iter_mut().enumerate() {
            if s.state != State::Running || s.kill_reason.is_some() || s.process.is_none() {
                continue;
            }
            match s
                .control
                .call(&ctl::Request::Ping { nonce: 0 }, HEALTH_TIMEOUT)
            {
                Ok(ctl::Response::Pong { .. }) => {
                    s.last_answer = Instant::now();
                    s.silence_counted_from = s.last_answer;
                }
                _ => silent[i] = true,
            }
        }
        let waiting_for = self.waiting_for_down_servers(&silent);
        for i in 0..self.services.len() {
            // Not pinged: not running, or being killed already (its death decides).
            if self.services[i].state != State::Running || self.services[i].kill_reason.is_some() {
                continue;
            }
            let unresponsive = silent[i] && waiting_for[i].is_none();
            if unresponsive != self.services[i].unresponsive {
                self.services[i].unresponsive = unresponsive;
                let state = if unresponsive {
                    ServerState::Unresponsive
                } else {
                    ServerState::Up
                };
                for link in self.links.iter().filter(|l| l.server == i) {
                    link.mem.set_server_state(state);
                }
            }
            if !silent[i] {
                continue;
            }
            if let Some(j) = waiting_for[i] {
                let server = self.services[j].spec.name.clone();
                let s = &mut self.services[i];
                s.silence_counted_from = now;
                tracing::debug!(service = %s.spec.name, "silent while {server} is not up: not counted");
                continue;
            }
            let s = &mut self.services[i];
            let silent_for = now.saturating_duration_since(s.silence_counted_from);
            if silent_for >= s.spec.watchdog {
                let reason = format!(
                    "unresponsive for {:.1?} (watchdog {}); killed",
                    silent_for,
                    crate::manifest::format_duration(s.spec.watchdog)
                );
                tracing::error!(service = %s.spec.name, "{reason}");
                s.kill_reason = Some(reason);
                if let Some(p) = &s.process {
                    let _ = sandbox::pidfd_signal(&p.pidfd, libc::SIGKILL);
                }
            }
        }
    }

    /// For each service that is `silent`, the server that is not up (starting, in back-off,
    /// not started yet) that it waits for, directly or through servers silent for the same
    /// reason; `None` if its silence is its own.
    fn waiting_for_down_servers(&self, silent: &[bool]) -> Vec<Option<usize>> {
        let down = |j: usize| {
            matches!(
                self.services[j].state,
                State::Starting | State::Backoff | State::Waiting
            )
        };
        let mut cause: Vec<Option<usize>> = vec![None; self.services.len()];
        // Each round explains at least one more service, or ends: at most one round per
        // service.
        loop {
            let mut changed = false;
            for l in &self.links {
                let (i, j) = (l.client, l.server);
                if !silent[i] || cause[i].is_some() || i == j {
                    continue;
                }
                let why = if down(j) {
                    Some(j)
                } else if silent[j] {
                    cause[j]
                } else {
                    None
                };
                if why.is_some() {
                    cause[i] = why;
                    changed = true;
                }
            }
            if !changed {
                return cause;
            }
        }
    }

    /// Service `i`'s pidfd became readable: it died.
    fn reap(&mut self, i: usize) {
        let Some(p) = self.services[i].process.as_ref() else {
            return;
        };
        let exit = match sandbox::pidfd_reap(&p.pidfd) {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(service = %self.services[i].spec.name, "cannot reap: {e}");
                return;
            }
        };
        let uptime = p.started.elapsed();
        self.services[i].process = None;
        // Its last words before the report of its end.
        self.drain_output(i);
        // A service that dies before it answers its first ping failed to start, whatever its
        // exit status.
        let starting = self.services[i].state == State::Starting;
        self.services[i].starting = None;
        let reason = match self.services[i].kill_reason.take() {
            Some(why) => why,
            None if starting => format!(
                "start failed: died during start: {}",
                self.exit_reason(i, exit)
            ),
            None => self.exit_reason(i, exit),
        };
        let failure = starting || exit != Exit::Code(0);
        if failure {
            tracing::warn!(service = %self.services[i].spec.name, "{reason} after {uptime:.1?}");
        } else {
            tracing::info!(service = %self.services[i].spec.name, "{reason}");
        }
        self.services[i]
            .output
            .note(format!("{reason} after {uptime:.1?}"));
        self.services[i].last_exit = Some(reason);
        self.after_death(i);
        if std::mem::take(&mut self.services[i].operator_restart) {
            // `paravisor restart`: at once, outside the policy (and its crash-loop count).
            let s = &mut self.services[i];
            s.restart_at = Some(Instant::now());
            s.backoff = Some(Duration::ZERO);
            s.state = State::Backoff;
            return;
        }
        self.schedule_restart(i, failure);
    }

    fn exit_reason(&self, i: usize, exit: Exit) -> String {
        let note = self.services[i]
            .status
            .atomic_u32(core::mem::offset_of!(StatusPage, violation_syscall))
            .map(|a| a.swap(NO_VIOLATION, std::sync::atomic::Ordering::AcqRel))
            .unwrap_or(NO_VIOLATION);
        match exit {
            Exit::Code(VIOLATION_EXIT_STATUS) | Exit::Signal(libc::SIGSYS) => {
                let which = if note == NO_VIOLATION {
                    "a syscall outside its profile (before its runtime could name it)".to_string()
                } else {
                    format!(
                        "forbidden syscall {} (#{note})",
                        profiles::syscall_name(note)
                    )
                };
                format!("policy violation: {which}; killed by its seccomp filter")
            }
            Exit::Code(0) => "exited cleanly".into(),
            // The runtime turns signals that a PID-namespace init would ignore into this
            // exit status (see ipc_defs::hosted::sys::EXIT_SIGNALS).
            Exit::Code(c)
                if c > 128 && ipc_defs::hosted::sys::EXIT_SIGNALS.contains(&(c - 128)) =>
            {
                format!("killed by {}", signal_name(c - 128))
            }
            Exit::Code(c) => format!("exited with status {c}"),
            Exit::Signal(s) => format!("killed by {}", signal_name(s)),
        }
    }

    /// The process of service `i` is gone: move its channels to a new epoch so that peers
    /// stop waiting for it, and drop what it left unread.
    fn after_death(&mut self, i: usize) {
        // Its channels say `Down` now, whatever the watchdog said of it.
        self.services[i].unresponsive = false;
        let _ = self.services[i]
            .control
            .memory()
            .restart_epoch(Direction::Requests);
        for link in &self.links {
            if link.server == i {
                link.mem.channel().set_server_state(ServerState::Down);
                let epoch = link.mem.restart_epoch(Direction::Requests);
                tracing::info!(channel = %format!("{}->{}", self.services[link.client].spec.name, link.interface), %epoch, "server gone; new epoch");
            }
            if link.client == i {
                let _ = link.mem.restart_epoch(Direction::Responses);
            }
        }
        if let Some(link) = self.attest_link.as_ref().filter(|l| l.server == i) {
            link.client
                .memory()
                .channel()
                .set_server_state(ServerState::Down);
            let _ = link.client.memory().restart_epoch(Direction::Requests);
        }
        if let Some(link) = self.platform_link.as_ref().filter(|l| l.holder == i) {
            let _ = link.mem.restart_epoch(Direction::Responses);
        }
        if let Some(guest) = &self.guest {
            for link in guest.links.iter().filter(|l| l.server == i) {
                link.mem.channel().set_server_state(ServerState::Down);
                let epoch = link.mem.restart_epoch(Direction::Requests);
                tracing::info!(channel = %format!("guest->{}", link.interface), %epoch, "server gone; new epoch");
            }
        }
    }

    /// Applies the restart policy after an exit (or a failed start).
    fn schedule_restart(&mut self, i: usize, failure: bool) {
        self.decide_restart(i, failure);
        if matches!(self.services[i].state, State::Failed | State::Stopped) {
            // No process will serve its channels again: callers stop waiting for one (the new
            // epoch wakes any that sleep in a call).
            for link in self.links.iter().filter(|l| l.server == i) {
                link.mem.channel().set_server_state(ServerState::Gone);
                let _ = link.mem.restart_epoch(Direction::Requests);
            }
            if let Some(guest) = &self.guest {
                for link in guest.links.iter().filter(|l| l.server == i) {
                    link.mem.channel().set_server_state(ServerState::Gone);
                    let _ = link.mem.restart_epoch(Direction::Requests);
                }
            }
            if let Some(link) = self.attest_link.as_ref().filter(|l| l.server == i) {
                link.client
                    .memory()
                    .channel()
                    .set_server_state(ServerState::Gone);
                let _ = link.client.memory().restart_epoch(Direction::Requests);
            }
        }
    }

    fn decide_restart(&mut self, i: usize, failure: bool) {
        let s = &mut self.services[i];
        let restart = match s.spec.restart.policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failure,
            RestartPolicy::Never => false,
        };
        if !restart {
            s.state = if failure {
                State::Failed
            } else {
                State::Stopped
            };
            return;
        }
        let now = Instant::now();
        let window = s.spec.restart.window;
        while s
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            s.recent.pop_front();
        }
        if s.recent.len() as u32 >= s.spec.restart.max {
            s.state = State::Failed;
            let msg = format!(
                "crash loop: {} restarts within {}; marked failed (the other services keep running)",
                s.recent.len(),
                crate::manifest::format_duration(window)
            );
            tracing::error!(service = %s.spec.name, "{msg}");
            s.output.note(format!(
                "{msg}; `paravisor restart {}` revives it",
                s.spec.name
            ));
            s.last_exit = Some(format!(
                "{}; {msg}",
                s.last_exit.clone().unwrap_or_default()
            ));
            return;
        }
        // The first restart within the window is immediate (a single crash costs the
        // service's clients no wait); repeated ones back off from `backoff`, doubling up to
        // `max-backoff` (clients wait for a restarting server rather than fail, so the
        // ceiling bounds their wait).
        let delay = s.spec.restart.delay(s.recent.len() as u32);
        s.recent.push_back(now);
        s.restart_at = Some(now + delay);
        s.backoff = Some(delay);
        s.state = State::Backoff;
        s.output.note(format!(
            "restarting in {}",
            crate::manifest::format_duration(delay)
        ));
        tracing::info!(service = %s.spec.name, "restarting in {delay:?}");
    }

    /// `paravisor restart SERVICE`: a running service is killed and started again at once; one
    /// in its back-off starts now; a failed or stopped one is started again with a fresh
    /// crash-loop count (its clients wait for it again instead of failing at once). None of
    /// these counts against its restart policy.
    fn operator_restart(&mut self, service: &str) -> Reply {
        let Some(i) = self.services.iter().position(|s| s.spec.name == service) else {
            return Reply::Error {
                message: format!("no service named \"{service}\""),
            };
        };
        let s = &mut self.services[i];
        let was = s.state;
        let message = match was {
            State::Waiting => {
                return Reply::Error {
                    message: format!(
                        "service \"{service}\" has not been started yet (the first starts go in manifest order)"
                    ),
                }
            }
            State::Running | State::Starting => {
                let Some(p) = &s.process else {
                    return Reply::Error {
                        message: format!("service \"{service}\" has no process"),
                    };
                };
                if let Err(e) = sandbox::pidfd_signal(&p.pidfd, libc::SIGKILL) {
                    return Reply::Error {
                        message: format!("cannot stop {service}: {e}"),
                    };
                }
                // Its death (reaped as any other) starts it again.
                s.operator_restart = true;
                s.kill_reason = Some("restarted by the operator (`paravisor restart`)".into());
                format!("restarting {service} (pid {} killed)", p.pid)
            }
            State::Backoff => {
                s.restart_at = Some(Instant::now());
                format!("restarting {service} now (it was in its restart back-off)")
            }
            State::Failed | State::Stopped => {
                s.restart_at = Some(Instant::now());
                s.backoff = Some(Duration::ZERO);
                s.state = State::Backoff;
                // Its clients wait for it again (they stopped waiting when it was given up).
                for link in self.links.iter().filter(|l| l.server == i) {
                    link.mem.set_server_state(ServerState::Down);
                }
                if let Some(guest) = &self.guest {
                    for link in guest.links.iter().filter(|l| l.server == i) {
                        link.mem.set_server_state(ServerState::Down);
                    }
                }
                if let Some(link) = self.attest_link.as_ref().filter(|l| l.server == i) {
                    link.client.memory().set_server_state(ServerState::Down);
                }
                format!("restarting {service} (it was {})", was.name())
            }
        };
        let s = &mut self.services[i];
        // A fresh crash-loop count: the operator revived it.
        s.recent.clear();
        s.output.note(format!("{message}, asked by the operator"));
        tracing::info!(service = %service, "{message}, asked by the operator");
        Reply::Done { message }
    }

    /// `paravisor logs SERVICE`: its recent lines after `after`, or its last `tail`.
    fn logs(&self, service: &str, after: Option<u64>, tail: usize) -> Reply {
        let Some(s) = self.services.iter().find(|s| s.spec.name == service) else {
            return Reply::Error {
                message: format!("no service named \"{service}\""),
            };
        };
        let page = s.output.history(after, tail, LOGS_REPLY_BYTES);
        Reply::Logs {
            lines: page
                .lines
                .into_iter()
                .map(|l| crate::control::LogLine {
                    seq: l.seq,
                    source: l.source.name().into(),
                    text: l.text,
                })
                .collect(),
            missed: page.missed,
            last: page.last,
            state: s.state.name().into(),
        }
    }

    fn command(&mut self, cmd: Command) -> Reply {
        match cmd {
            Command::Ps => Reply::Ps {
                services: self.ps(),
                guest: self.guest_row(),
            },
            Command::Restart { service } => self.operator_restart(&service),
            Command::Logs {
                service,
                after,
                tail,
            } => self.logs(&service, after, tail),
            Command::Kill { service, signal } => {
                let Some(s) = self.services.iter().find(|s| s.spec.name == service) else {
                    return Reply::Error {
                        message: format!("no service named \"{service}\""),
                    };
                };
                let Some(p) = &s.process else {
                    return Reply::Error {
                        message: format!(
                            "service \"{service}\" is not running ({})",
                            s.state.name()
                        ),
                    };
                };
                match sandbox::pidfd_signal(&p.pidfd, signal) {
                    Ok(()) => Reply::Done {
                        message: format!(
                            "sent {} to {service} (pid {})",
                            signal_name(signal),
                            p.pid
                        ),
                    },
                    Err(e) => Reply::Error {
                        message: format!("cannot signal {service}: {e}"),
                    },
                }
            }
            Command::Probe { service, endpoint } => {
                let Some(i) = self.services.iter().position(|s| s.spec.name == service) else {
                    return Reply::Error {
                        message: format!("no service named \"{service}\""),
                    };
                };
                let Some(interface) = Interface::from_name(&endpoint) else {
                    return Reply::Error {
                        message: format!("unknown endpoint \"{endpoint}\""),
                    };
                };
                // Only a running service answers on its control channel (a starting one's
                // first answer belongs to its start).
                if self.services[i].state != State::Running {
                    return Reply::Error {
                        message: format!(
                            "service \"{service}\" is not running ({})",
                            self.services[i].state.name()
                        ),
                    };
                }
                match self.services[i].control.call(
                    &ctl::Request::Probe {
                        endpoint: interface,
                    },
                    CONTROL_TIMEOUT * 2,
                ) {
                    Ok(ctl::Response::Probe(outcome)) => Reply::Probe {
                        result: crate::control::ProbeResult::of(&outcome),
                        message: probe_text(&service, interface, outcome),
                    },
                    Ok(other) => Reply::Error {
                        message: format!("unexpected answer {other:?}"),
                    },
                    Err(e) => Reply::Error {
                        message: format!("{service} did not answer: {e}"),
                    },
                }
            }
            Command::LiveAudit => {
                let (checked, checks, findings) = self.live_audit();
                Reply::Audit {
                    checked,
                    checks,
                    findings,
                }
            }
            Command::AttestBench { samples } => match self.attest_bench(samples.clamp(1, 1_000)) {
                Ok(l) => Reply::AttestBench(l),
                Err(message) => Reply::Error { message },
            },
            Command::AttestReport { report_data } => {
                let Some(data) = crate::util::parse_hex(&report_data)
                    .filter(|d| d.len() == attest::REPORT_DATA_LEN)
                    .and_then(|d| Bytes::new(&d))
                else {
                    return Reply::Error {
                        message: "report data must be 64 bytes of hex".into(),
                    };
                };
                match self.attest_call(&attest::Request::GetExtendedReport {
                    report_data: data,
                    vmpl: attest::OUTSIDE_VMPL,
                }) {
                    Ok(attest::Response::ExtendedReport {
                        report,
                        chain_len,
                        chain,
                    }) => {
                        // A chain is a few KiB; attest is a service, its numbers are checked.
                        if chain_len as usize > MAX_CHAIN {
                            return Reply::Error {
                                message: format!("attest announced a {chain_len}-byte chain"),
                            };
                        }
                        let mut certs = chain.as_slice().to_vec();
                        while certs.len() < chain_len as usize {
                            match self.attest_call(&attest::Request::GetCertChain {
                                offset: certs.len() as u32,
                            }) {
                                Ok(attest::Response::Chunk { total, data })
                                    if !data.is_empty() && total == chain_len =>
                                {
                                    certs.extend_from_slice(data.as_slice())
                                }
                                other => {
                                    return Reply::Error {
                                        message: format!("certificate chain: {other:?}"),
                                    }
                                }
                            }
                        }
                        Reply::Report {
                            report: crate::util::hex(report.as_slice()),
                            certs: String::from_utf8_lossy(&certs).into_owned(),
                        }
                    }
                    Ok(attest::Response::Error(e)) => Reply::Error {
                        message: format!("attest refused: {e}"),
                    },
                    Ok(other) => Reply::Error {
                        message: format!("attest answered {other:?}"),
                    },
                    Err(e) => Reply::Error { message: e },
                }
            }
            Command::Shutdown => Reply::Done {
                message: "shutting down".into(),
            },
        }
    }

    /// One call to the attest service on the microkernel's own channel.
    fn attest_call(&mut self, request: &attest::Request) -> Result<attest::Response, String> {
        let link = self
            .attest_link
            .as_mut()
            .ok_or("the manifest has no attest service")?;
        let name = &self.services[link.server].spec.name;
        if self.services[link.server].state != State::Running {
            return Err(format!(
                "the attest service \"{name}\" is not running ({})",
                self.services[link.server].state.name()
            ));
        }
        match link.client.call(
            &ipc_defs::endpoint::Request::Service(request.clone()),
            ATTEST_TIMEOUT,
        ) {
            Ok(ipc_defs::endpoint::Response::Service(r)) => Ok(r),
            Ok(other) => Err(format!("attest service \"{name}\" answered {other:?}")),
            Err(e) => Err(format!("attest service \"{name}\": {e}")),
        }
    }

    /// The attest benchmark: each operation through the service, then on the platform
    /// directly (the microkernel's own handle), alternating.
    fn attest_bench(&mut self, samples: usize) -> Result<crate::control::Latencies, String> {
        use crate::control::median;
        let (platform, launch) = self.own_platform().map_err(|e| e.to_string())?;
        let facts = launch.facts;
        let select = crate::key_protector::sealing_select(crate::manifest::Sealing::Measurement);
        let (mut rs, mut rd, mut ks, mut kd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..samples {
            let mut data = [0u8; 64];
            data[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let t = Instant::now();
            // A service's VMPL: the platform channel signs no VMPL 0.
            match self.attest_call(&attest::Request::GetReport {
                report_data: Bytes::new(&data).expect("64 bytes"),
                vmpl: attest::SERVICE_VMPL,
            })? {
                attest::Response::Report(_) => rs.push(t.elapsed().as_secs_f64() * 1e6),
                other => return Err(describe(&other)),
            }
            let t = Instant::now();
            platform
                .report(&crate::snp::ReportRequest {
                    report_data: data,
                    measurement: self.measurement,
                    host_data: [0; 32],
                    vmpl: u32::from(attest::SERVICE_VMPL),
                    policy: crate::snp::POLICY,
                    report_id: [0; 32],
                })
                .map_err(|e| e.to_string())?;
            rd.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            match self.attest_call(&attest::Request::GetDerivedKey {
                select,
                context: Bytes::new(&data[..8]).expect("8 bytes"),
            })? {
                attest::Response::Key(_) => ks.push(t.elapsed().as_secs_f64() * 1e6),
                other => return Err(describe(&other)),
            }
            let t = Instant::now();
            std::hint::black_box(platform.derived_key(select, &facts, &data[..32]));
            kd.push(t.elapsed().as_secs_f64() * 1e6);
        }
        Ok(crate::control::Latencies {
            samples,
            report_service_us: median(rs),
            report_direct_us: median(rd),
            key_service_us: median(ks),
            key_direct_us: median(kd),
        })
    }

    /// Makes or unseals every sealed key before the services that hold them start: for each
    /// sealed key, either creates its guest-state file with a new random key sealed into
    /// HW_KEY_PROTECTOR, or unseals the stored one. With the platform in-process: no service
    /// takes part (nor could: the platform channel refuses the context of the wrapping key).
    fn unseal_keys(&mut self) -> Result<(), RunError> {
        let mut wanted = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            for k in s.spec.keys.iter().filter(|k| k.is_sealed()) {
                let file = s.spec.files.iter().find_map(|f| match &f.missing {
                    Missing::CreateVmgs { key, size } if key == &k.name => {
                        Some((f.path.clone(), *size))
                    }
                    _ => None,
                });
                let (path, size) = file.ok_or_else(|| {
                    RunError::SealedKey(format!(
                        "sealed key \"{}\" has no guest-state file",
                        k.name
                    ))
                })?;
                wanted.push((i, k.name.clone(), path, size));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        self.own_platform()?;
        let select = crate::key_protector::sealing_select(self.sealing.sealing);
        if self.sealing.sealing == crate::manifest::Sealing::Platform {
            tracing::warn!(
                "sealing policy \"platform\": any paravisor on this platform (any build, any manifest) can unseal the datastore key; for development only (production: `[attest] sealing = \"measurement\"`)"
            );
        }
        for (i, name, path, size) in wanted {
            let key = if self.state.exists(&path)? {
                self.open_sealed(&path, select)?
            } else {
                self.create_sealed(&path, size, select)?
            };
            self.unsealed.insert((i, name), key);
        }
        Ok(())
    }

    /// First start: a new random datastore key, sealed into HW_KEY_PROTECTOR (and, with key
    /// release, wrapped under the broker's tenant key into KEY_PROTECTOR) of a new
    /// guest-state file encrypted under it. The file appears only with its protectors.
    fn create_sealed(
        &mut self,
        path: &Path,
        size: u64,
        select: attest::FieldSelect,
    ) -> Result<KeyBytes, RunError> {
        let mut key = KeyBytes([0; crate::manifest::KEY_BYTES]);
        getrandom::getrandom(&mut key.0)
            .map_err(|e| RunError::SealedKey(format!("no randomness for a key: {e}")))?;
        let sealed = self.seal(&key, select)?;
        let mut protectors = vec![(FileId::HW_KEY_PROTECTOR, sealed)];
        if let Some(addr) = self.sealing.key_release {
            let tenant = self.release(addr)?;
            let wrapped = TenantWrapped::wrap(&tenant, &key.0).map_err(RunError::SealedKey)?;
            protectors.push((FileId::KEY_PROTECTOR, wrapped.to_bytes().to_vec()));
        }
        let plain: Vec<(FileId, &[u8])> = protectors
            .iter()
            .map(|(id, b)| (*id, b.as_slice()))
            .collect();
        crate::state_files::create_vmgs_in(
            &self.state,
            path,
            size,
            Some(&pv_vmgs::Key::from_bytes(key.0)),
            &plain,
        )
        .map_err(RunError::SealedKey)?;
        self.keep_sealing_log();
        tracing::info!(
            "created encrypted guest-state file {} under a new random datastore key, sealed (policy {}) in its HW_KEY_PROTECTOR{}",
            self.state.shown(path).display(),
            self.sealing.sealing.name(),
            if self.sealing.key_release.is_some() {
                " and wrapped under the key broker's tenant key in its KEY_PROTECTOR"
            } else {
                ""
            }
        );
        Ok(key)
    }

    /// Later starts: unseals HW_KEY_PROTECTOR. A key sealed under another policy than the
    /// manifest's is rotated to a new key sealed under the manifest's (an old blob of the
    /// weaker policy must not open the file any more). With key release, a KEY_PROTECTOR that
    /// is missing or made under another tenant key is re-made; and if the seal does not open
    /// (a new measurement), the broker releases the tenant key to this launch, which unwraps
    /// KEY_PROTECTOR and rotates to a new key sealed to itself: an old release's blob opens
    /// nothing afterwards, so the broker's policy can retire it.
    fn open_sealed(
        &mut self,
        path: &Path,
        select: attest::FieldSelect,
    ) -> Result<KeyBytes, RunError> {
        let shown = self.state.shown(path);
        let stored = read_plain(
            self.guest_state(path, false)?,
            &shown,
            FileId::HW_KEY_PROTECTOR,
        )
        .map_err(RunError::SealedKey)?;
        let (unsealed, refusal) = match &stored {
            None => (
                None,
                format!(
                    "guest-state file {} holds no sealed key (no HW_KEY_PROTECTOR): it was made under a key file or by another tool. \
                     Give the vmgs service its key file (`keys = [{{ name = ..., path = ... }}]`), or move the file away to start afresh",
                    shown.display()
                ),
            ),
            Some(bytes) => match self.unseal_stored(&shown, bytes)? {
                Ok(opened) => (Some(opened), String::new()),
                Err(why) => (None, why),
            },
        };
        let release = self.sealing.key_release;
        match (unsealed, release) {
            (Some((key, sealed_select)), _) if sealed_select != select => {
                tracing::warn!(
                    "the datastore key of {} is sealed under another policy than the manifest's ({}): rotating to a new key sealed under it",
                    shown.display(),
                    self.sealing.sealing.name()
                );
                let tenant = match release {
                    Some(addr) => Some(self.release(addr)?),
                    None => None,
                };
                self.rotate(path, &key, select, tenant.as_deref())
            }
            (Some((key, _)), None) => Ok(key),
            (Some((key, _)), Some(addr)) => {
                let pinned = self.sealing.key_release_id.clone().unwrap_or_default();
                let current = read_plain(
                    self.guest_state(path, false)?,
                    &shown,
                    FileId::KEY_PROTECTOR,
                )
                .map_err(RunError::SealedKey)?
                .and_then(|b| TenantWrapped::parse(&b).ok())
                .is_some_and(|w| w.key_id_hex() == pinned);
                if !current {
                    // Key release added to an existing state, or a protector made under
                    // another tenant key: wrap the key for the broker now, while it opens.
                    let tenant = self.release(addr)?;
                    let wrapped =
                        TenantWrapped::wrap(&tenant, &key.0).map_err(RunError::SealedKey)?;
                    write_plain(
                        self.guest_state(path, true)?,
                        &shown,
                        &key.0,
                        FileId::KEY_PROTECTOR,
                        &wrapped.to_bytes(),
                    )
                    .map_err(RunError::SealedKey)?;
                    tracing::info!(
                        "datastore key of {} wrapped under the key broker's tenant key (KEY_PROTECTOR)",
                        shown.display()
                    );
                }
                Ok(key)
            }
            (None, None) => Err(RunError::SealedKey(refusal)),
            (None, Some(addr)) => {
                let Some(kp) = read_plain(
                    self.guest_state(path, false)?,
                    &shown,
                    FileId::KEY_PROTECTOR,
                )
                .map_err(RunError::SealedKey)?
                else {
                    return Err(RunError::SealedKey(format!(
                        "{refusal} (key release is configured, but {} has no KEY_PROTECTOR: it was sealed before key release was, so the broker cannot help)",
                        shown.display()
                    )));
                };
                let kp = TenantWrapped::parse(&kp).map_err(|e| {
                    RunError::SealedKey(format!(
                        "guest-state file {}: KEY_PROTECTOR: {e}",
                        shown.display()
                    ))
                })?;
                tracing::info!(
                    "the sealed datastore key of {} does not unseal under this launch; asking the key broker at {addr}",
                    shown.display()
                );
                let tenant = self.release(addr).map_err(|e| {
                    RunError::SealedKey(format!("{refusal} Key release failed too: {e}"))
                })?;
                let key = kp.unwrap(&tenant).ok_or_else(|| {
                    RunError::SealedKey(format!(
                        "the key broker at {addr} released a key that does not open the KEY_PROTECTOR of {} (made under tenant key {}, not this one)",
                        shown.display(),
                        kp.key_id_hex()
                    ))
                })?;
                let key = self.rotate(path, &KeyBytes(*key), select, Some(&tenant))?;
                tracing::warn!(
                    "datastore key of {} released by the key broker at {addr}, rotated and re-sealed (policy {}) to paravisor measurement {}",
                    shown.display(),
                    self.sealing.sealing.name(),
                    crate::util::hex(&self.sealing_measurement)
                );
                Ok(key)
            }
        }
    }

    /// Replaces the datastore key `old` of the guest-state file at `path` by a new random
    /// one, sealed under `select` (and wrapped under `tenant`), in a crash-safe sequence
    /// ([`crate::key_protector::rotate`]).
    fn rotate(
        &mut self,
        path: &Path,
        old: &KeyBytes,
        select: attest::FieldSelect,
        tenant: Option<&[u8; 32]>,
    ) -> Result<KeyBytes, RunError> {
        let mut key = KeyBytes([0; crate::manifest::KEY_BYTES]);
        getrandom::getrandom(&mut key.0)
            .map_err(|e| RunError::SealedKey(format!("no randomness for a key: {e}")))?;
        let sealed = self.seal(&key, select)?;
        let mut protectors = vec![(FileId::HW_KEY_PROTECTOR, sealed)];
        if let Some(t) = tenant {
            let wrapped = TenantWrapped::wrap(t, &key.0).map_err(RunError::SealedKey)?;
            protectors.push((FileId::KEY_PROTECTOR, wrapped.to_bytes().to_vec()));
        }
        let plain: Vec<(FileId, &[u8])> = protectors
            .iter()
            .map(|(id, b)| (*id, b.as_slice()))
            .collect();
        crate::key_protector::rotate(
            self.guest_state(path, true)?,
            &self.state.shown(path),
            &old.0,
            &key.0,
            &plain,
        )
        .map_err(RunError::SealedKey)?;
        self.keep_sealing_log();
        Ok(key)
    }

    /// The tenant key from the broker at `addr`, for a report of this launch.
    fn release(
        &mut self,
        addr: std::net::SocketAddr,
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, RunError> {
        let pinned = self.sealing.key_release_id.clone().ok_or_else(|| {
            RunError::SealedKey(
                "key release needs `key-release-id` (manifest validation should have caught this)"
                    .into(),
            )
        })?;
        let (platform, launch) = self.own_platform()?;
        let key = crate::key_release::fetch_key(addr, |report_data| {
            // VMPL 0: the paravisor's own evidence, the only kind the broker accepts; signed
            // here, in-process (the platform channel refuses VMPL 0).
            platform
                .report(&crate::snp::ReportRequest {
                    report_data: *report_data,
                    measurement: launch.facts.measurement,
                    host_data: launch.host_data,
                    vmpl: u32::from(ipc_defs::services::platform::MICROKERNEL_VMPL),
                    policy: launch.facts.policy,
                    report_id: launch.report_id,
                })
                .map(|r| r.to_vec())
                .map_err(|e| e.to_string())
        })
        .map_err(|e| RunError::SealedKey(format!("key release by the broker at {addr}: {e}")))?;
        let id = crate::key_release::key_id(&key);
        if id != pinned {
            return Err(RunError::SealedKey(format!(
                "the broker at {addr} released a key with id {id}, not the manifest's key-release-id {pinned}: it is not the tenant's broker (or holds another tenant key); nothing was wrapped under it"
            )));
        }
        Ok(key)
    }

    /// The platform and this launch's facts, for the microkernel's own use.
    fn own_platform(
        &self,
    ) -> Result<
        (
            std::sync::Arc<crate::platform::Platform>,
            crate::platform_server::Launch,
        ),
        RunError,
    > {
        self.platform_link
            .as_ref()
            .map(|l| (l.platform.clone(), l.launch))
            .ok_or_else(|| {
                RunError::SealedKey(
                    "sealed keys and key release need the platform: give the attest service `platform = true` (manifest validation should have caught this)"
                        .into(),
                )
            })
    }

    /// The launch facts a key is sealed to: this launch's, with the paravisor's own
    /// measurement (the guest it boots is not part of what opens its state).
    fn sealing_facts(&self, launch: &crate::platform_server::Launch) -> crate::snp::LaunchFacts {
        crate::snp::LaunchFacts {
            measurement: self.sealing_measurement,
            ..launch.facts
        }
    }

    /// The guest-state file `rel` of the state directory, through its descriptor.
    fn guest_state(&self, rel: &Path, write: bool) -> Result<std::fs::File, RunError> {
        let how = if write { Open::ReadWrite } else { Open::Read };
        Ok(self.state.open_file(rel, how)?)
    }

    /// Seals `key` to this platform and launch (in-process); the stored bytes.
    fn seal(&mut self, key: &KeyBytes, select: attest::FieldSelect) -> Result<Vec<u8>, RunError> {
        let (platform, launch) = self.own_platform()?;
        let sealed = SealedKey::seal(&platform, &self.sealing_facts(&launch), &key.0, select)
            .map_err(|e| RunError::SealedKey(format!("sealing the datastore key: {e}")))?;
        Ok(sealed.to_bytes().to_vec())
    }

    /// Unseals `stored` (the HW_KEY_PROTECTOR of `path`): the key, or why it did not unseal
    /// (the refusal an operator reads).
    fn unseal_stored(
        &mut self,
        path: &Path,
        stored: &[u8],
    ) -> Result<Result<(KeyBytes, attest::FieldSelect), String>, RunError> {
        let sealed = match SealedKey::parse(stored) {
            Ok(s) => s,
            Err(e) => {
                return Ok(Err(format!(
                    "guest-state file {}: its HW_KEY_PROTECTOR is unusable: {e}",
                    path.display()
                )))
            }
        };
        let (platform, launch) = self.own_platform()?;
        match sealed.unseal(&platform, &self.sealing_facts(&launch)) {
            Some(k) => {
                let key = KeyBytes(*k);
                tracing::info!(
                    "datastore key of {} unsealed (sealed under policy {})",
                    path.display(),
                    if sealed.select.measurement {
                        "measurement"
                    } else {
                        "platform"
                    }
                );
                Ok(Ok((key, sealed.select)))
            }
            None => Ok(Err(self.unseal_refusal(path, &sealed))),
        }
    }

    /// Keeps the launch log of the run that sealed a key (`sealed-launch-log.json`), so that a
    /// later refusal can say what changed.
    fn keep_sealing_log(&self) {
        self.write_log(Path::new(SEALED_LAUNCH_LOG), &self.launch_log);
    }

    /// Writes a launch log into the state directory (public: 0644); a failure is logged.
    fn write_log(&self, to: &Path, log: &crate::measure::LaunchLog) {
        let kept = serde_json::to_vec_pretty(log)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                self.state
                    .replace(to, &bytes, 0o644)
                    .map_err(|e| e.to_string())
            });
        match kept {
            Ok(None) => {}
            Ok(Some(was)) => tracing::warn!(
                "{} was a {was}, not a file of ours: replaced",
                self.state.shown(to).display()
            ),
            Err(e) => tracing::warn!("{} not written: {e}", self.state.shown(to).display()),
        }
    }

    /// What differs between the launch log of the run that sealed (if kept and it matches
    /// `sealed_to`) and this run's paravisor.
    fn launch_changes(&self, sealed_to: &[u8; 48]) -> Option<Vec<String>> {
        // A file of the (untrusted) state directory: bounded, and only a hint for the operator.
        let bytes = self
            .state
            .read(Path::new(SEALED_LAUNCH_LOG), MAX_LAUNCH_LOG)
            .ok()??;
        let then: crate::measure::LaunchLog = serde_json::from_slice(&bytes).ok()?;
        if then.entries.len() > 4096 || &then.paravisor_measurement() != sealed_to {
            return None;
        }
        let changes = crate::measure::paravisor_changes(&then, &self.launch_log);
        (!changes.is_empty()).then_some(changes)
    }

    /// After a refused start: `refused/` of the state directory holds the refused launch's
    /// log and why (the only thing a refused start writes).
    fn record_refusal(&self, why: &str) {
        let dir = match self.state.subdir(Path::new(REFUSED_DIR), true) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("refusal not recorded in {REFUSED_DIR}/: {e}");
                return;
            }
        };
        let log = serde_json::to_vec_pretty(&self.launch_log).unwrap_or_default();
        for (name, bytes) in [
            (LAUNCH_LOG, log),
            ("reason.txt", format!("{why}\n").into_bytes()),
        ] {
            if let Err(e) = dir.replace(Path::new(name), &bytes, 0o644) {
                tracing::warn!("{} not written: {e}", dir.shown(Path::new(name)).display());
            }
        }
    }

    /// Once the start is not refused: the launch log (for the attest service and readers),
    /// the platform's chain, and the state files the manifest creates when missing.
    fn write_state(&mut self) -> Result<(), RunError> {
        self.write_log(Path::new(LAUNCH_LOG), &self.launch_log);
        if let Some(link) = &self.platform_link {
            // The chain, for the attest service (public: a verifier checks it anyway).
            let chain = crate::platform::chain_pem(&link.platform)?;
            let certs = Path::new(PLATFORM_CERTS);
            // Rewritten only when it differs; whatever is not a regular file of ours (a
            // link, a FIFO) is replaced, never written through.
            let same = matches!(
                self.state.read(certs, MAX_CHAIN as u64),
                Ok(Some(b)) if b == chain.as_bytes()
            );
            if !same {
                if let Some(was) = self.state.replace(certs, chain.as_bytes(), 0o644)? {
                    tracing::warn!(
                        "{} was a {was}, not a file of ours: replaced",
                        self.state.shown(certs).display()
                    );
                }
            }
        }
        for line in crate::state_files::prepare(&self.manifest, &self.state)
            .map_err(create_err("state files"))?
        {
            tracing::info!("{line}");
        }
        Ok(())
    }

    /// Why a stored key did not unseal, and what the operator can do.
    fn unseal_refusal(&self, path: &Path, sealed: &SealedKey) -> String {
        let file = path.display();
        let refused = self.state.shown(Path::new(REFUSED_DIR));
        if sealed.select.measurement && sealed.measurement != self.sealing_measurement {
            let what = match self.launch_changes(&sealed.measurement) {
                Some(changes) => format!(
                    "What changed since the sealing run ({SEALED_LAUNCH_LOG} vs this launch):\n{}",
                    changes.iter().map(|c| format!("  - {c}\n")).collect::<String>()
                ),
                None => "Something it measures changed since (the microkernel, a service binary or library, the measured configuration: compare `paravisor measure --json` with the launch log of the run that sealed it).\n".into(),
            };
            format!(
                "refusing to start: the datastore key of guest-state file {file} is sealed under policy \"measurement\" to paravisor measurement {} (as its header says), but this paravisor measures {}.\n{what}\
                 Three ways out:\n\
                 \x20 1. key release: a key broker whose policy accepts this launch (`paravisor kbs serve`), named by `[attest] key-release-id` (and its address, `key-release`): the start re-seals the key to this measurement;\n\
                 \x20 2. `paravisor vmgs reseal` (with key release configured): the same, offline, before starting;\n\
                 \x20 3. a new state directory (`--state-dir NEW`): a fresh start; {file} cannot be read without its key (move it away to start afresh here).\n\
                 Or start the build and configuration that sealed it. Nothing was written but {} (this launch's log and this message).",
                crate::util::hex(&sealed.measurement),
                crate::util::hex(&self.sealing_measurement),
                refused.display()
            )
        } else {
            format!(
                "refusing to start: the datastore key of guest-state file {file} does not unseal on this platform (sealed under policy \"{}\"{}): it was sealed by another platform (another --platform-dir or chip secret), or its HW_KEY_PROTECTOR was altered. \
                 Use the platform that sealed it, release the key through a key broker (`[attest] key-release-id`, `paravisor vmgs reseal`), or start afresh with a new state directory (`--state-dir NEW`, or move {file} away). Nothing was written but {}.",
                if sealed.select.measurement { "measurement" } else { "platform" },
                if sealed.select.measurement {
                    format!(", measurement {} = this one", &crate::util::hex(&sealed.measurement)[..16])
                } else {
                    String::new()
                },
                refused.display()
            )
        }
    }

    /// Platform requests of service `i` refused as reserved to the microkernel.
    fn platform_refusals(&self, i: usize) -> u64 {
        self.platform_link
            .as_ref()
            .filter(|l| l.holder == i)
            .and_then(|l| l.server.as_ref())
            .map_or(0, |s| {
                s.counters
                    .refused
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
    }

    fn ps(&mut self) -> Vec<ServiceRow> {
        let mut rows = Vec::new();
        for i in 0..self.services.len() {
            // A service that missed its last health pings shows the counters it last gave:
            // asking it again would hold up the loop (and every service's output, restarts
            // and the watchdog) for nothing.
            let answering =
                self.services[i].last_answer.elapsed() < HEALTH_INTERVAL * 2 + HEALTH_TIMEOUT;
            if self.services[i].state == State::Running && answering {
                if let Ok(ctl::Response::Stats(st)) = self.services[i]
                    .control
                    .call(&ctl::Request::Stats, STATS_TIMEOUT)
                {
                    self.services[i].last_stats = st;
                }
            }
            let s = &self.services[i];
            let epochs = self
                .links
                .iter()
                .filter(|l| l.server == i)
                .map(|l| {
                    (
                        self.services[l.client].spec.name.clone(),
                        l.mem.channel().epoch().0,
                    )
                })
                .collect();
            rows.push(ServiceRow {
                name: s.spec.name.clone(),
                pid: s.process.as_ref().map(|p| p.pid),
                state: s.state.name().into(),
                restarts: s.restarts,
                uptime_ms: s
                    .process
                    .as_ref()
                    .map(|p| p.started.elapsed().as_millis() as u64),
                messages_in: s.last_stats.requests_in,
                messages_out: s.last_stats.responses_out,
                refused: s.last_stats.refused + self.platform_refusals(i),
                output_dropped: s.output.dropped(),
                last_exit: s.last_exit.clone(),
                namespaces: s
                    .process
                    .as_ref()
                    .map(|p| p.namespaces.names().iter().map(|n| n.to_string()).collect())
                    .unwrap_or_default(),
                epochs,
                guest_exits: self.guest.as_ref().and_then(|g| {
                    g.links
                        .iter()
                        .find(|l| l.server == i)
                        .map(|l| l.exits.load(std::sync::atomic::Ordering::Relaxed))
                }),
                backoff_ms: s.backoff.map(|d| d.as_millis() as u64),
                restart_in_ms: s
                    .restart_at
                    .map(|t| t.saturating_duration_since(Instant::now()).as_millis() as u64),
                unresponsive: s.unresponsive,
            });
        }
        rows
    }

    /// Checks every running service against the manifest: identity, capabilities,
    /// no_new_privs, seccomp (each listed as a check made), descriptors, namespaces, limits;
    /// and the microkernel's own threads' filters.
    fn live_audit(&self) -> (Vec<String>, Vec<crate::control::Checked>, Vec<Finding>) {
        let mut checked = Vec::new();
        let mut checks = Vec::new();
        let mut findings = Vec::new();
        let record = |checks: &mut Vec<_>, findings: &mut Vec<_>, service: &str, c| {
            let c: crate::privilege::Check = c;
            if !c.ok {
                findings.push(Finding {
                    service: service.to_string(),
                    what: c.difference(),
                });
            }
            checks.push(crate::control::Checked {
                service: service.to_string(),
                check: c,
            });
        };
        for c in crate::thread_filters::check_threads(
            self.spawner.is_some(),
            self.platform_link
                .as_ref()
                .is_some_and(|l| l.server.is_some()),
        ) {
            record(&mut checks, &mut findings, "paravisor", c);
        }
        for s in &self.services {
            let Some(p) = &s.process else {
                if s.state != State::Stopped {
                    findings.push(Finding {
                        service: s.spec.name.clone(),
                        what: format!("not running ({})", s.state.name()),
                    });
                }
                continue;
            };
            if s.state == State::Starting {
                findings.push(Finding {
                    service: s.spec.name.clone(),
                    what: "starting: not checked before it answers its first ping".into(),
                });
                continue;
            }
            checked.push(s.spec.name.clone());
            for c in crate::privilege::check_pid(p.pid, &s.privilege) {
                record(&mut checks, &mut findings, &s.spec.name, c);
            }
            let mut expect = ExpectedProcess {
                namespaces: Namespaces::all() - Namespaces::USER,
                memory: s.spec.limits.memory,
                open_files: s.spec.limits.open_files,
                descriptors: Vec::new(),
                code: s.code.iter().map(|(_, _, path)| path.clone()).collect(),
                listening: s.listeners.iter().map(|b| b.listening()).collect(),
            };
            expect.descriptors = s.granted.clone();
            for what in check_process(p.pid, &expect)
                .into_iter()
                .chain(s.listeners.iter().flat_map(crate::listeners::check))
            {
                findings.push(Finding {
                    service: s.spec.name.clone(),
                    what,
                });
            }
        }
        (checked, checks, findings)
    }

    /// The services in waves that stop every client before the services it calls (a
    /// layering of the `calls` graph): a wave is every service none of whose clients is in
    /// a later wave. Services in a cycle of calls go one at a time, in reverse manifest order.
    fn stop_waves(&self) -> Vec<Vec<usize>> {
        let n = self.services.len();
        let mut stopped = vec![false; n];
        let mut waves = Vec::new();
        let mut left = n;
        while left > 0 {
            let mut wave: Vec<usize> = (0..n)
                .rev()
                .filter(|&i| {
                    !stopped[i]
                        && !self
                            .links
                            .iter()
                            .any(|l| l.server == i && l.client != i && !stopped[l.client])
                })
                .collect();
            if wave.is_empty() {
                wave.push((0..n).rev().find(|&i| !stopped[i]).expect("one left"));
            }
            for &i in &wave {
                stopped[i] = true;
            }
            left -= wave.len();
            waves.push(wave);
        }
        waves
    }

    /// Stops every service: a shutdown request, a grace period, then SIGKILL; wave by wave,
    /// so that a service has exited before the services it calls are asked to stop (a vTPM
    /// still writing its state reaches vmgs, a call in flight to attest gets its answer).
    fn shutdown(&mut self) {
        for wave in self.stop_waves() {
            for &i in &wave {
                let s = &mut self.services[i];
                s.restart_at = None;
                // Skip services that are already gone (their pidfd is readable).
                let alive = s.process.as_ref().is_some_and(|p| {
                    sandbox::poll_readable(&[p.pidfd.as_raw_fd()], 0).is_ok_and(|r| !r[0])
                });
                // A starting service gets the request after its first ping, and ends as
                // soon as it serves.
                if alive && matches!(s.state, State::Running | State::Starting) {
                    let _ = s
                        .control
                        .call(&ctl::Request::Shutdown, Duration::from_millis(500));
                }
            }
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            for &i in &wave {
                if let Some(p) = self.services[i].process.take() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if !self.wait_exit_forwarding(&p.pidfd, left) {
                        let name = &self.services[i].spec.name;
                        tracing::warn!(service = %name, "did not stop in time; killing");
                        let _ = sandbox::pidfd_signal(&p.pidfd, libc::SIGKILL);
                        self.wait_exit_forwarding(&p.pidfd, Duration::from_secs(5));
                    }
                    self.services[i].state = State::Stopped;
                    self.services[i].starting = None;
                }
                // Its last words before the services it calls are asked to stop.
                self.drain_output(i);
            }
        }
        tracing::info!("all services stopped");
    }
}

/// Takes the state directory's lock (`.lock`, an advisory exclusive lock released when the
/// process ends), or says that another paravisor holds it.
pub fn lock_state_dir(dir: &OwnedDir) -> Result<std::fs::File, RunError> {
    let path = dir.shown(Path::new(".lock"));
    let file = dir.open_file(Path::new(".lock"), Open::ReadWriteOrCreate(0o600))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(RunError::AlreadyRunning(dir.path().display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(RunError::StateDir(path.display().to_string(), e))
        }
    }
}

/// An attest response for an error message (never key bytes: `Bytes` does not print them).
fn describe(r: &attest::Response) -> String {
    match r {
        attest::Response::Error(e) => format!("error: {e}"),
        other => format!("{other:?}"),
    }
}

/// The platform's certificate chain (ARK, ASK, VCEK, PEM) in the state directory, for the
/// attest service.
pub const PLATFORM_CERTS: &str = "platform-certs.pem";
/// The launch log of the run that sealed the datastore key, in the state directory.
pub const SEALED_LAUNCH_LOG: &str = "sealed-launch-log.json";
/// This run's launch log, in the state directory.
pub const LAUNCH_LOG: &str = "launch-log.json";
/// Where a refused start leaves its launch log and reason (in the state directory).
pub const REFUSED_DIR: &str = "refused";
/// Largest launch log read back from the state directory.
const MAX_LAUNCH_LOG: u64 = 1 << 20;

/// Where `run` keeps the simulated platform unless told: `platform` next to the state
/// directory (never inside it: the platform outlives any one state). Never in a shared
/// directory (one others may write to, even sticky like `/tmp`): whoever made `platform`
/// there first would choose the chip secret, and so sign reports that verify as ours.
pub fn default_platform_dir(state_dir: &Path) -> Result<PathBuf, String> {
    let parent = match state_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match crate::owned_dir::shared_mode(&parent, "the directory of the state directory") {
        Ok(None) => Ok(parent.join("platform")),
        Ok(Some(mode)) => Err(format!(
            "the state directory {} is in {}, which others may write to (mode {mode:04o}), so its default platform directory (\"platform\" next to it) could have been made by another user. \
             Name a private platform directory with --platform-dir (or `[attest] platform-dir` in the manifest), or use a state directory whose parent is yours",
            state_dir.display(),
            if parent == Path::new(".") { "the current directory".to_string() } else { parent.display().to_string() },
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Opens the simulated platform in `dir`, provisioning one (and saying so) if there is none.
fn open_or_init_platform(dir: &Path) -> Result<crate::platform::Platform, RunError> {
    use crate::platform::Platform;
    use crate::platform::PlatformError;
    match Platform::open(dir) {
        Ok(p) => Ok(p),
        Err(PlatformError::Missing(_)) => {
            tracing::warn!(
                "no platform in {}: provisioning a SIMULATED one (chip secret in a plain file: development only; `paravisor platform init` makes one explicitly)",
                dir.display()
            );
            match Platform::init(dir) {
                Ok(p) => Ok(p),
                // Another paravisor provisioned it at the same moment.
                Err(PlatformError::Exists(_)) => Ok(Platform::open(dir)?),
                Err(e) => Err(e.into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// What one start of a service hands it.
struct Grants {
    record: Bootstrap,
    /// Descriptors in slot order, from slot 4 (the record itself goes to slot 3).
    fds: Vec<Fd>,
    /// `(slot, /proc link)` of each descriptor the service keeps, for the live audit.
    expected: Vec<(i32, String)>,
}

/// A descriptor in a capability list: one the supervisor keeps, or one opened for this start.
enum Fd {
    Borrowed(i32),
    Owned(OwnedFd),
}

/// What `/proc/PID/fd/N` shows for a memfd of this name.
fn memfd_link(shm: &SharedMemory) -> String {
    format!("/memfd:{} (deleted)", shm.name())
}

impl Fd {
    fn as_raw(&self) -> i32 {
        match self {
            Fd::Borrowed(fd) => *fd,
            Fd::Owned(fd) => fd.as_raw_fd(),
        }
    }
}

fn name16(s: &str) -> bootstrap::Name {
    let mut out = bootstrap::Name::new();
    for c in s.chars() {
        if out.push(c).is_err() {
            break;
        }
    }
    out
}

fn capability_count(spec: &ServiceSpec, m: &Manifest, guest: bool) -> usize {
    // The bootstrap record itself, then the slots it lists.
    1 + crate::manifest::capability_slots_with(spec, &m.services, guest)
}

fn init_status(status: &SharedMemory) -> io::Result<()> {
    let page = StatusPage {
        magic: STATUS_MAGIC,
        violation_syscall: NO_VIOLATION,
        _reserved: [0; 14],
    };
    status.write(0, zerocopy::IntoBytes::as_bytes(&page))
}

fn write_all_at(fd: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd.try_clone()?);
    file.write_all_at(bytes, 0)
}

pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSYS => "SIGSYS",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGCONT => "SIGCONT",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

/// Parses "KILL", "SIGKILL", "kill" or "9".
pub fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let up = s.to_ascii_uppercase();
    let up = up.strip_prefix("SIG").unwrap_or(&up).to_string();
    (1..=31).find(|n| signal_name(*n) == format!("SIG{up}"))
}

fn probe_text(service: &str, endpoint: Interface, outcome: ctl::ProbeOutcome) -> String {
    match outcome {
        ctl::ProbeOutcome::Reached {
            epoch,
            round_trip_ns,
        } => {
            format!(
                "{service} -> {endpoint}: reached (epoch {epoch}, round trip {round_trip_ns} ns)"
            )
        }
        ctl::ProbeOutcome::NoCapability => {
            format!("{service} -> {endpoint}: no capability (the manifest does not let {service} call {endpoint})")
        }
        ctl::ProbeOutcome::PeerRestarted { sent_in, now } => {
            format!("{service} -> {endpoint}: peer restarted (sent in epoch {sent_in}, now {now})")
        }
        ctl::ProbeOutcome::TimedOut => format!("{service} -> {endpoint}: timed out"),
        ctl::ProbeOutcome::Failed(code) => format!("{service} -> {endpoint}: failed: {code}"),
    }
}

/// What a service process must look like.
pub struct ExpectedProcess {
    pub namespaces: Namespaces,
    pub memory: u64,
    pub open_files: u64,
    /// `(descriptor, its /proc/PID/fd link)`, from 0: stdin is `/dev/null`, stdout and stderr
    /// the pipes of the service's output (never the microkernel's own), then the capabilities.
    pub descriptors: Vec<(i32, String)>,
    /// The files it may map besides memfds: the sandbox paths of its measured loader and
    /// libraries.
    pub code: Vec<String>,
    /// Its listeners: it may hold connections accepted from them too
    /// ([`crate::listeners::accepted_sockets`]).
    pub listening: Vec<crate::listeners::Listening>,
}

/// Why a freshly started service is not sandboxed as it must be, if it is not: the first of
/// its privilege checks that fails (identity, capabilities, no_new_privs, its seccomp
/// filters: a service that skipped its own profile has one filter too few).
fn sandbox_problem(pid: i32, plan: &crate::privilege::ServicePrivilege) -> Option<String> {
    crate::privilege::check_pid(pid, plan)
        .into_iter()
        .find(|c| !c.ok)
        .map(|c| c.difference())
}

/// Compares a live process with what the manifest says; one line per difference.
/// (Identity, capabilities and seccomp: [`crate::privilege::check_pid`].)
pub fn check_process(pid: i32, expect: &ExpectedProcess) -> Vec<String> {
    let mut out = Vec::new();
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let wanted = expect.namespaces.names().contains(&ns);
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
        let separate = mine.is_some() && theirs.is_some() && mine != theirs;
        if wanted && !separate {
            out.push(format!("shares the {ns} namespace with the microkernel"));
        }
    }
    if let Ok(limits) = std::fs::read_to_string(format!("/proc/{pid}/limits")) {
        for (label, want) in [
            ("Max address space", expect.memory),
            ("Max open files", expect.open_files),
        ] {
            let line = limits.lines().find(|l| l.starts_with(label));
            let soft = line.and_then(|l| {
                l[label.len()..]
                    .split_whitespace()
                    .next()
                    .map(str::to_string)
            });
            if soft.as_deref() != Some(&want.to_string()) {
                out.push(format!(
                    "{label} is {} but the manifest says {want}",
                    soft.unwrap_or_else(|| "unknown".into())
                ));
            }
        }
    } else {
        out.push("cannot read its limits".into());
    }
    match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(dir) => {
            // Read after its descriptors are listed: a connection it holds is in the tables.
            let mut accepted_sockets = None;
            for entry in dir.flatten() {
                let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let target = std::fs::read_link(entry.path())
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                let accepted = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|i| i.parse::<u64>().ok())
                    .is_some_and(|i| {
                        // Read again on a miss: it may have accepted since the last read.
                        let known = accepted_sockets
                            .as_ref()
                            .is_some_and(|s: &std::collections::BTreeSet<u64>| s.contains(&i));
                        known || {
                            let now = crate::listeners::accepted_sockets(&expect.listening);
                            let found = now.contains(&i);
                            accepted_sockets = Some(now);
                            found
                        }
                    });
                match expect.descriptors.iter().find(|(slot, _)| *slot == fd) {
                    Some((_, want)) if &target == want => {}
                    _ if accepted => {}
                    Some((_, want)) => out.push(format!(
                        "descriptor {fd} is {target}, but the manifest grants {want} there"
                    )),
                    None => out.push(format!(
                        "holds descriptor {fd} ({target}) that the manifest does not grant"
                    )),
                }
            }
        }
        Err(e) => out.push(format!("cannot list its descriptors: {e}")),
    }
    match crate::libraries::mapped_files(&pid.to_string()) {
        Ok(mapped) => out.extend(crate::libraries::unexpected_maps(&mapped, &expect.code)),
        Err(e) => out.push(format!("cannot read what it maps: {e}")),
    }
    out
}

/// Resolves the state directory: `--state-dir`, else the manifest's, relative to the current
/// directory.
pub fn state_dir(manifest: &Manifest, flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.state_dir.clone())
}
