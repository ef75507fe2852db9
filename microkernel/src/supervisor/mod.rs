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
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use heapless::String as HString;
use ipc_defs::bootstrap;
use ipc_defs::bootstrap::Bootstrap;
use ipc_defs::bootstrap::Capability;
use ipc_defs::capability::FileAccess;
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
use crate::plan::CapabilityPlan;
use crate::plan::Run;
use crate::profiles;
use crate::sandbox;
use crate::sandbox::Exit;
use crate::sandbox::Namespaces;
use crate::sandbox::SpawnPlan;

mod broker;
mod capabilities;
mod control;
mod guest;
mod kept;
mod restart;
mod sealing;
mod setup;
mod shutdown;
mod start;
mod vmm;
mod worker;

pub use control::check_process;
pub use control::parse_signal;
pub use control::signal_name;
pub use control::ExpectedProcess;
pub use sealing::default_platform_dir;

use capabilities::init_status;
use capabilities::write_all_at;
use capabilities::Grants;
use control::sandbox_problem;
use sealing::open_or_init_platform;
use setup::create_err;
pub use setup::lock_state_dir;
use setup::second_mapping;

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
    /// The TAPs the host named (`--tap`); none are attached otherwise.
    pub taps: crate::taps::TapRequest,
    /// `run --vmm qemu`: what QEMU boots (then `guest` is `None`).
    pub qemu: Option<crate::host_vmm::QemuConfig>,
}

/// How `paravisor run` ended.
#[derive(Debug, Default)]
pub struct RunSummary {
    /// The guest's run, if there was a guest.
    pub guest: Option<crate::partition::vcpu::Outcome>,
    /// QEMU's run, under `--vmm qemu`.
    pub vmm: Option<crate::host_vmm::VmmOutcome>,
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
    /// As [`CapabilityPlan::guest_links`] lists them.
    links: Vec<GuestLink>,
    /// Readable once the guest's run has ended.
    ended: vmm_sys_util::eventfd::EventFd,
    /// The eventfds wired to guest interrupts, handed to intercept.
    interrupts: Vec<(ipc_defs::services::intercept::Interrupt, i32)>,
    /// Guest memory a device may be given (the shared window, all of RAM): memfds.
    memory: Vec<(crate::manifest::GuestMemoryAccess, i32)>,
    /// Each device service's doorbell eventfd, by service name.
    doorbells: Vec<(String, i32)>,
    keep_running: bool,
    outcome: Option<crate::partition::vcpu::Outcome>,
    description: String,
    watchdog: Option<Duration>,
    /// Exits seen by the watchdog, and since when.
    progress: Option<(u64, Instant)>,
    declared_hung: bool,
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
    /// Its control channel: the loop's pings and stats, and the control worker's probes.
    control: Arc<Mutex<ControlEnd>>,
    /// The channel itself (the client end maps it a second time), for what needs no lock:
    /// its epoch, handing it to a new start.
    control_mem: ChannelMemory,
    status: SharedMemory,
    regions: Vec<(String, SharedMemory)>,
    /// Sockets bound for the service (those the host asked for), kept across its restarts.
    listeners: Vec<crate::listeners::Bound>,
    /// TAPs attached for the service (those the host named), kept across its restarts: the
    /// host's side of the link stays up while the service restarts.
    taps: Vec<crate::taps::Attached>,
    /// Its descriptor store (`fd-store`), kept for the whole run: what it holds goes back to
    /// each restart.
    store: Option<crate::fd_store::Store>,
    /// What its grants add to its seccomp filters (the loader's is compiled again for a start
    /// that hands back kept descriptors: its binary's slot moves).
    grant_rules: profiles::GrantRules,
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
    /// `(slot, /proc link)` of what the last start opened for it that the plan cannot know:
    /// its output pipes (1 and 2), its files' resolved paths, its bound sockets.
    opened: Vec<(i32, String)>,
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

/// A descriptor the loop watches for service `service`.
struct Watched {
    service: usize,
    what: WatchedKind,
    fd: i32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WatchedKind {
    /// Its process (a pidfd: readable once it ended).
    Process,
    /// One of its output pipes.
    Output(Stream),
    /// Its descriptor store: packets wait.
    Store,
}

/// The microkernel's own channel to the attest service (client name `paravisor`): reports for
/// `paravisor attest report`, the attest benchmark (both on the control worker).
struct AttestLink {
    server: usize,
    client: Arc<Mutex<AttestEnd>>,
    /// The channel itself (the client end maps it a second time), for its epoch and server
    /// state without the lock, and the attest service's grant.
    mem: ChannelMemory,
}

type ControlEnd = ClientEnd<ctl::Request, ctl::Response>;
type AttestEnd = ClientEnd<
    ipc_defs::endpoint::Request<attest::Request>,
    ipc_defs::endpoint::Response<attest::Response>,
>;

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
    /// Every service's capability slots and every channel, for this run.
    plan: CapabilityPlan,
    /// The channels between services, as [`CapabilityPlan::links`] lists them.
    links: Vec<Link>,
    ring_capacity: u32,
    guest: Option<Guest>,
    /// `run --vmm qemu`: what QEMU boots, until it is started ([`Supervisor::start_vmm`]).
    qemu: Option<crate::host_vmm::QemuConfig>,
    /// QEMU, once started.
    vmm: Option<crate::host_vmm::HostVmm>,
    keep_running: bool,
    /// The nonce of the next first ping.
    ping_nonce: u64,
    /// The microkernel's own threads' seccomp filters, compiled at start.
    filters: crate::thread_filters::ThreadFilters,
    /// The thread that clones services (started with the platform's, before the supervisor
    /// confines itself).
    spawner: Option<crate::spawner::Spawner>,
    /// The thread that runs the control commands that wait on a service (started with the
    /// spawner's).
    worker: Option<worker::ControlWorker>,
}

impl Supervisor {
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
        // Before the threads are confined: QEMU would inherit the supervisor's filter.
        if let Err(e) = self.start_vmm() {
            let _ = std::fs::remove_file(&socket);
            return Err(e);
        }
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
            if !initial_done && self.next_initial_start(&mut initial, &mut initial_start) {
                initial_done = true;
                if let Err(e) = self.services_started(&socket) {
                    self.shutdown();
                    let _ = std::fs::remove_file(&socket);
                    return Err(e);
                }
            }
            let mut fds = vec![signals.as_raw_fd(), listener.as_raw_fd()];
            let guest_fd = self.guest.as_ref().map(|g| g.ended.as_raw_fd());
            // What each descriptor after the first two is.
            let watched = self.watched();
            fds.extend(watched.iter().map(|w| w.fd));
            let timeout = self.poll_timeout(next_health);
            let vmm_at = fds.len();
            let (vmm_process, vmm_console) = match self.vmm.as_ref() {
                Some(v) if v.outcome.is_none() => {
                    let (process, console) = v.fds();
                    fds.push(process);
                    fds.extend(console);
                    (true, console.is_some())
                }
                _ => (false, false),
            };
            if let Some(fd) = guest_fd {
                fds.push(fd);
            }
            let ready = sandbox::poll_readable(&fds, timeout)?;
            if guest_fd.is_some() && ready.last() == Some(&true) && self.guest_ended() {
                stop = true;
            }
            if vmm_console && ready[vmm_at + 1] {
                if let Some(v) = self.vmm.as_mut() {
                    v.pump_console();
                }
            }
            if vmm_process && ready[vmm_at] && self.vmm_ended() {
                stop = true;
            }
            self.check_guest_progress();
            if ready[0] {
                if let Some(sig) = sandbox::read_signal(&signals) {
                    tracing::info!("received signal {sig}; shutting down");
                    stop = true;
                }
            }
            // Output and stores first: a death drains what is left before it is reported.
            for (k, w) in watched.iter().enumerate() {
                match (ready[2 + k], w.what) {
                    (true, WatchedKind::Output(stream)) => self.pump_output(w.service, stream),
                    (true, WatchedKind::Store) => {
                        self.take_kept(w.service, crate::fd_store::PACKETS_PER_LOOK)
                    }
                    _ => {}
                }
            }
            for (k, w) in watched.iter().enumerate() {
                if ready[2 + k] && w.what == WatchedKind::Process {
                    self.reap(w.service);
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
            if ready[1] && self.answer_control(&listener) {
                stop = true;
            }
        }
        self.stop_guest();
        self.stop_vmm();
        self.shutdown();
        let _ = std::fs::remove_file(&socket);
        Ok(RunSummary {
            guest: self.guest.as_ref().and_then(|g| g.outcome.clone()),
            vmm: self.vmm.as_ref().and_then(|v| v.outcome.clone()),
        })
    }

    /// The descriptors the loop watches for each service: its process (pidfd: readable
    /// once it ended), its output pipes, and its descriptor store while it runs.
    fn watched(&self) -> Vec<Watched> {
        let mut watched = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            if let Some(p) = &s.process {
                watched.push(Watched {
                    service: i,
                    what: WatchedKind::Process,
                    fd: p.pidfd.as_raw_fd(),
                });
                if let Some(store) = &s.store {
                    watched.push(Watched {
                        service: i,
                        what: WatchedKind::Store,
                        fd: store.poll_fd(),
                    });
                }
            }
            for (stream, fd) in s.output.fds() {
                watched.push(Watched {
                    service: i,
                    what: WatchedKind::Output(stream),
                    fd,
                });
            }
        }
        watched
    }

    /// How long the loop may sleep (ms, -1: until a descriptor is ready): until the next
    /// restart, look at a start, health check or guest watchdog tick.
    fn poll_timeout(&self, next_health: Instant) -> i32 {
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
        timeout
    }

    /// Answers every connection waiting on the control socket: at once, or through the
    /// control thread for a command that waits on a service. True if one asked to shut down.
    fn answer_control(&mut self, listener: &UnixListener) -> bool {
        let mut stop = false;
        while let Ok((stream, _)) = listener.accept() {
            let _ = stream.set_nonblocking(false);
            let reply = match crate::control::read_command(&stream) {
                Ok(Command::Shutdown) => {
                    stop = true;
                    Reply::Done {
                        message: "shutting down".into(),
                    }
                }
                Ok(cmd) => match self.command(cmd) {
                    worker::Answer::Now(reply) => reply,
                    worker::Answer::Later(command, job) => {
                        match &self.worker {
                            Some(w) => w.submit(stream, command, job),
                            None => crate::control::write_reply(
                                &stream,
                                &Reply::Error {
                                    message: "the control thread is not running".into(),
                                },
                            ),
                        }
                        continue;
                    }
                },
                Err(e) => Reply::Error { message: e },
            };
            crate::control::write_reply(&stream, &reply);
        }
        stop
    }

    /// Moves the first starts on: once the service being started (`current`) answered or
    /// failed, starts the next of `initial`. True when none is left to start.
    fn next_initial_start(
        &mut self,
        initial: &mut VecDeque<usize>,
        current: &mut Option<usize>,
    ) -> bool {
        if current.is_some_and(|i| self.services[i].state != State::Starting) {
            *current = None;
        }
        while current.is_none() {
            let Some(i) = initial.pop_front() else {
                return true;
            };
            self.start(i);
            if self.services[i].state == State::Starting {
                *current = Some(i);
            }
        }
        false
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
/// Resolves the state directory: `--state-dir`, else the manifest's, relative to the current
/// directory.
pub fn state_dir(manifest: &Manifest, flag: Option<&Path>) -> PathBuf {
    flag.map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.state_dir.clone())
}
