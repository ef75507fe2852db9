//! The runtime every service process starts in: it reads the bootstrap record, enters the
//! service's own seccomp profile, maps the granted channels, and runs the server loop.
//!
//! A service's `main` is one call to [`run`] with its interface and a request handler. The
//! runtime answers the control interface (ping, stats, shutdown, probe) and the common
//! endpoint ping itself, so every service speaks them identically.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::sync::atomic::AtomicU32;
use std::time::Duration;
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::channel::ChannelMemory;
use super::channel::ClientEnd;
use super::channel::Incoming;
use super::channel::ServeError;
use super::channel::ServerEnd;
use super::channel::WaitPolicy;
use super::shm::SharedMemory;
use super::sys;
use crate::bootstrap::Bootstrap;
use crate::bootstrap::BOOTSTRAP_SLOT;
use crate::bootstrap::MAX_RECORD;
use crate::capability::CapabilityKind;
use crate::capability::Grant;
use crate::capability::Interface;
use crate::control;
use crate::endpoint;
use crate::endpoint::ErrorCode;

/// How long a reply may wait for a client that does not drain its ring.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a probe waits for the probed endpoint.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests taken from one channel before the server looks at the next.
const BATCH: usize = 64;
/// Refusals logged one by one per client; after that, every thousandth.
const REFUSALS_LOGGED: u64 = 20;
/// How long an idle server sleeps before looking around on its own.
const IDLE_RECHECK: Duration = Duration::from_secs(5);

/// A calling end as the runtime hands it out (typed for pings; see `ClientEnd::call_with`).
pub type PlainClient = ClientEnd<endpoint::Request<()>, endpoint::Response<()>>;
/// The calls a service may make: one client end per endpoint the manifest grants.
pub type Clients = BTreeMap<Interface, PlainClient>;
/// A calling end shared between the service's own client code and the runtime (which pings
/// through it for `paravisor probe`). The service is single-threaded: never borrowed twice.
pub type SharedClient = std::rc::Rc<std::cell::RefCell<PlainClient>>;

/// What a service handler gets besides the request.
pub struct Context {
    /// The service's name, from the bootstrap record.
    pub service: String,
    /// Calling ends, by endpoint.
    pub clients: Clients,
    /// Calling ends the service took with [`Context::share_client`].
    pub shared: BTreeMap<Interface, SharedClient>,
    /// Shared regions granted by the manifest, by name.
    pub regions: BTreeMap<String, SharedMemory>,
    /// Files opened by the microkernel for this service, by name.
    pub files: BTreeMap<String, OwnedFd>,
    /// Secrets handed over by the microkernel (sealed memfds), by name.
    pub keys: BTreeMap<String, OwnedFd>,
    /// Listening sockets bound by the microkernel, by name.
    pub listeners: BTreeMap<String, OwnedFd>,
    /// What each listener's connections may do (e.g. the TPM localities), by name.
    pub listener_grants: BTreeMap<String, Grant>,
    /// Eventfds wired to guest interrupts (intercept only), by interrupt.
    pub interrupts: BTreeMap<crate::services::intercept::Interrupt, OwnedFd>,
    /// The calling end to the secure processor (attest only).
    pub platform:
        Option<ClientEnd<crate::services::platform::Request, crate::services::platform::Response>>,
    /// What answers the microkernel's guest-state requests (`pv-vmgs --broker` only).
    pub guest_state: Option<GuestStateHandler>,
    /// Guest memory a device service may reach (its `guest-memory` grant).
    pub guest_memory: Option<GuestMemory>,
    /// A device's doorbell eventfd and the doorbells it covers (its `doorbells` grant).
    pub doorbells: Option<Doorbells>,
    /// TAP devices the host attached (a NIC's back end: frames only, see
    /// [`crate::capability::CapabilityKind::Tap`]), by the manifest's name. A TAP the
    /// manifest declares but the host did not name (`paravisor run --tap NAME=IFNAME`) is
    /// simply absent: the service then has no back end for it.
    pub taps: BTreeMap<String, OwnedFd>,
    /// The service's descriptor store, if the manifest grants one (`fd-store`).
    pub fd_store: Option<super::fd_store::FdStore>,
    /// What the store kept across the service's last restart: each descriptor with the
    /// record the service gave it (empty at a first start). The service takes them.
    pub kept: Vec<(crate::fd_store::KeptRecord, OwnedFd)>,
}

/// A device's doorbell eventfd (see [`crate::capability::CapabilityKind::Doorbells`]).
pub struct Doorbells {
    pub fd: OwnedFd,
    pub base: u64,
    pub size: u64,
}

/// Guest memory granted to a device: a memfd whose byte 0 is guest-physical `base`.
pub struct GuestMemory {
    pub fd: OwnedFd,
    pub base: u64,
    pub size: u64,
}

/// The guest partition's channel to a device service (taken with
/// [`Started::take_guest_link`]): the guest's accesses to the device's ranges, answered on
/// a thread of the service's own so that a vCPU never waits behind the service's other work.
pub struct GuestLink {
    served: Served,
    /// Accesses answered.
    pub accesses: u64,
    /// Requests that were not guest accesses (refused), and malformed ones.
    pub refused: u64,
}

impl GuestLink {
    /// Waits up to `wait` for the partition's requests and answers those there are with
    /// `answer`; whether any came. Pings are answered; anything but a guest access is refused.
    pub fn serve(
        &mut self,
        wait: Duration,
        mut answer: impl FnMut(crate::services::guest::Access) -> crate::services::guest::Reply,
    ) -> bool {
        let mut any = false;
        for _ in 0..BATCH {
            if !self.served.usable() {
                break;
            }
            let incoming = match self.served.end.try_next() {
                Ok(Some(i)) => i,
                Ok(None) => break,
                Err(ServeError::Ring(e)) => {
                    tracing::warn!("the partition corrupted its request ring ({e}); ignoring it until it restarts");
                    self.served.broken_in = Some(self.served.end.memory().channel().epoch());
                    break;
                }
                Err(_) => {
                    self.refused += 1;
                    continue;
                }
            };
            any = true;
            let reply: endpoint::Response<()> =
                match self.served.end.decode::<endpoint::Request<()>>(&incoming) {
                    Some(endpoint::Request::Guest(access)) => {
                        self.accesses += 1;
                        endpoint::Response::Guest(answer(access))
                    }
                    Some(endpoint::Request::Ping { nonce }) => endpoint::Response::Pong { nonce },
                    _ => {
                        self.refused += 1;
                        endpoint::Response::Error(ErrorCode::Unsupported)
                    }
                };
            // The vCPU waits for this answer: it is never dropped for want of room.
            if let Err(e) = self.served.end.reply(&incoming, &reply, REPLY_TIMEOUT) {
                tracing::warn!("answer to the partition not delivered: {e}");
            }
        }
        if !any {
            super::channel::wait_any(
                &[self.served.end.request_ring()],
                WaitPolicy::default(),
                wait,
            );
        }
        any
    }
}

/// Answers [`control::Request::GuestState`].
pub type GuestStateHandler =
    Box<dyn FnMut(crate::services::vmgs::BrokerRequest) -> crate::services::vmgs::BrokerResponse>;

impl Context {
    /// Takes the calling end for `endpoint` for the service's own client code, leaving the
    /// runtime a share of it (so that probes through the capability keep working).
    pub fn share_client(&mut self, endpoint: Interface) -> Option<SharedClient> {
        let end = self.clients.remove(&endpoint)?;
        let shared = std::rc::Rc::new(std::cell::RefCell::new(end));
        self.shared.insert(endpoint, shared.clone());
        Some(shared)
    }
}

/// Who sent a request: the client at the other end of the channel it arrived on, as the
/// microkernel named it in the bootstrap record. Never taken from the message itself.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The client service's name.
    pub name: String,
    /// What the manifest lets this client reach through this channel.
    pub grant: Grant,
    /// Requests refused as not permitted (summed into the service's stats).
    pub refused: u64,
}

impl Caller {
    /// Counts a refused request and logs it (without its contents).
    pub fn refuse(&mut self, what: impl std::fmt::Display) {
        self.refused += 1;
        // The count is exact; the log is not flooded by a client that keeps trying.
        if self.refused <= REFUSALS_LOGGED || self.refused.is_multiple_of(1000) {
            tracing::warn!(client = %self.name, refused = self.refused, "refused: {what}");
        }
    }
}

/// Why a service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no bootstrap record at descriptor {BOOTSTRAP_SLOT}: {0} (services are started by `paravisor run`, not by hand)")]
    NoBootstrap(io::Error),
    #[error("bootstrap record: {0}")]
    Bootstrap(crate::bootstrap::BootstrapError),
    #[error("capability {name} at slot {slot}: {reason}")]
    Capability {
        name: String,
        slot: i32,
        reason: String,
    },
    #[error("cannot enter the seccomp profile: {0}")]
    Seccomp(io::Error),
    #[error("cannot install the runtime's signal handlers: {0}")]
    Signals(io::Error),
    #[error("cannot make the process non-dumpable: {0}")]
    Dumpable(io::Error),
    #[error("the bootstrap record grants no control channel")]
    NoControl,
}

fn read_bootstrap() -> Result<Bootstrap, StartError> {
    let fd = sys::take_fd(BOOTSTRAP_SLOT).map_err(StartError::NoBootstrap)?;
    let mut buf = vec![0u8; MAX_RECORD];
    let mut len = 0;
    while len < buf.len() {
        let n = sys::pread(&fd, &mut buf[len..], len as u64).map_err(StartError::NoBootstrap)?;
        if n == 0 {
            break;
        }
        len += n;
    }
    Bootstrap::decode(&buf[..len]).map_err(StartError::Bootstrap)
}

fn cap_error(cap: &crate::bootstrap::Capability, reason: impl std::fmt::Display) -> StartError {
    StartError::Capability {
        name: cap.name.to_string(),
        slot: cap.slot,
        reason: reason.to_string(),
    }
}

struct Served {
    interface: Option<Interface>,
    caller: Caller,
    end: ServerEnd,
    /// The epoch in which the client corrupted this channel's ring: the server ignores the
    /// channel until the supervisor moves it to a new epoch (the client restarted).
    broken_in: Option<crate::layout::Epoch>,
}

impl Served {
    fn usable(&self) -> bool {
        self.broken_in != Some(self.end.memory().channel().epoch())
    }
}

/// A service that has entered its sandbox and mapped its capabilities, ready to serve.
pub struct Started {
    pub context: Context,
    served: Vec<Served>,
    stats: control::Stats,
    /// Refusals the service counted itself ([`Started::refuse`]), outside a served channel.
    own_refusals: u64,
    _span: tracing::span::EnteredSpan,
}

/// Reads the bootstrap record, sets up logging, enters the service's seccomp profile and maps
/// every capability. Nothing of the service's own runs before this returns.
pub fn enter() -> Result<Started, StartError> {
    let record = read_bootstrap()?;
    init_logging(&record);
    let span = tracing::info_span!("service", name = %record.service).entered();
    let (context, served) = start(&record)?;
    tracing::info!(
        clients = served.len() - 1,
        calls = context.clients.len(),
        "sandboxed and serving"
    );
    Ok(Started {
        context,
        served,
        stats: control::Stats::default(),
        own_refusals: 0,
        _span: span,
    })
}

impl Started {
    /// Serves until the microkernel asks for shutdown: `handler` answers the interface's own
    /// requests (`Q` -> `R`); the runtime answers control and ping.
    pub fn serve<Q, R>(
        mut self,
        interface: Interface,
        mut handler: impl FnMut(&mut Context, &mut Caller, Q) -> endpoint::Response<R>,
    ) -> ExitCode
    where
        Q: DeserializeOwned,
        R: Serialize,
    {
        let _ = interface;
        serve(
            &mut self.context,
            &mut self.served,
            &mut self.stats,
            self.own_refusals,
            &mut handler,
        );
        tracing::info!("shut down on request");
        ExitCode::SUCCESS
    }
}

impl Started {
    /// The clients of the served channels and what each one's channel grants, as the
    /// bootstrap record names them (for a service that sizes or checks its state by them).
    pub fn clients(&self) -> impl Iterator<Item = (&str, Grant)> {
        self.served
            .iter()
            .filter(|s| s.interface.is_some())
            .map(|s| (s.caller.name.as_str(), s.caller.grant))
    }

    /// Counts a refusal the service made outside a served channel (e.g. a network client of
    /// a front end), shown with the others in `paravisor ps`, and logs it with `who` (the
    /// log is not flooded by a client that keeps trying).
    pub fn refuse(&mut self, who: impl std::fmt::Display, what: impl std::fmt::Display) {
        self.own_refusals += 1;
        let n = self.own_refusals;
        if n <= REFUSALS_LOGGED || n.is_multiple_of(1000) {
            tracing::warn!(client = %who, refused = n, "refused: {what}");
        }
    }

    /// Answers whatever control requests are pending (ping, stats, probe), without waiting:
    /// for a service busy with work of its own between requests. Returns `false` if the
    /// microkernel asked for shutdown (already acknowledged).
    pub fn answer_control(&mut self) -> bool {
        let callers: u64 = self.served.iter().map(|s| s.caller.refused).sum();
        let (control, _) = self.served.split_at_mut(1);
        let control = &mut control[0];
        let stats = &mut self.stats;
        for _ in 0..BATCH {
            let incoming = match control.end.try_next() {
                Ok(Some(i)) => i,
                Ok(None) => return true,
                Err(_) => continue,
            };
            let stale = served_stale(control);
            stats.requests_in += 1;
            stats.refused = self.own_refusals + callers;
            let (reply, shutdown) =
                control_reply(&control.end, &incoming, &mut self.context, stats, stale);
            if control.end.reply(&incoming, &reply, REPLY_TIMEOUT).is_ok() {
                stats.responses_out += 1;
            }
            if shutdown {
                return false;
            }
        }
        true
    }

    /// The guest partition's channel, for a device service that answers the guest's
    /// accesses on a thread of its own; `None` without a guest partition.
    pub fn take_guest_link(&mut self) -> Option<GuestLink> {
        let at = self
            .served
            .iter()
            .position(|s| s.interface.is_some() && s.caller.grant == Grant::GuestPartition)?;
        Some(GuestLink {
            served: self.served.remove(at),
            accesses: 0,
            refused: 0,
        })
    }

    /// Answers whatever requests are pending on the served channels (pings; the interface's
    /// own requests with `handler`), without waiting: for a service with a loop of its own.
    pub fn answer_served<Q, R>(
        &mut self,
        mut handler: impl FnMut(&mut Context, &mut Caller, Q) -> endpoint::Response<R>,
    ) where
        Q: DeserializeOwned,
        R: Serialize,
    {
        for s in self.served.iter_mut().skip(1) {
            for _ in 0..BATCH {
                if !s.usable() {
                    break;
                }
                let incoming = match s.end.try_next() {
                    Ok(Some(i)) => i,
                    Ok(None) => break,
                    Err(ServeError::Ring(_)) => {
                        s.broken_in = Some(s.end.memory().channel().epoch());
                        break;
                    }
                    Err(_) => continue,
                };
                self.stats.requests_in += 1;
                let reply = answer_endpoint(
                    s,
                    &incoming,
                    &mut self.context,
                    &mut self.stats,
                    &mut handler,
                );
                if s.end.reply(&incoming, &reply, Duration::ZERO).is_ok() {
                    self.stats.responses_out += 1;
                }
            }
        }
    }

    /// Answers control requests until the first ping (the supervisor's start handshake), and
    /// nothing else. For test services that must be seen running before they misbehave.
    pub fn answer_first_ping(&mut self) {
        let control = &mut self.served[0].end;
        loop {
            match control.try_next() {
                Ok(Some(incoming)) => {
                    if let Some(control::Request::Ping { nonce }) =
                        control.decode::<control::Request>(&incoming)
                    {
                        let _ = control.reply(
                            &incoming,
                            &control::Response::Pong { nonce },
                            REPLY_TIMEOUT,
                        );
                        return;
                    }
                }
                Ok(None) => super::channel::wait_any(
                    &[control.request_ring()],
                    WaitPolicy::default(),
                    IDLE_RECHECK,
                ),
                Err(_) => {}
            }
        }
    }
}

/// Runs a service: enters the sandbox, then serves (see [`enter`] and [`Started::serve`]).
pub fn run<Q, R>(
    interface: Interface,
    handler: impl FnMut(&mut Context, &mut Caller, Q) -> endpoint::Response<R>,
) -> ExitCode
where
    Q: DeserializeOwned,
    R: Serialize,
{
    match enter() {
        Ok(started) => started.serve(interface, handler),
        Err(e) => {
            // Logging may not be up yet (no record): stderr is always there.
            eprintln!("{interface}: cannot start: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(record: &Bootstrap) {
    let filter = tracing_subscriber::EnvFilter::try_new(record.log_filter.as_str())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(false)
        .with_target(false)
        .try_init();
}

/// Enters the sandbox profile and maps every capability.
fn start(record: &Bootstrap) -> Result<(Context, Vec<Served>), StartError> {
    // Before the service's profile (which has no prctl); the supervisor checks it.
    sys::set_not_dumpable().map_err(StartError::Dumpable)?;
    sys::exit_on_signals().map_err(StartError::Signals)?;
    // Decided while the system call is still allowed.
    let _ = crate::hosted::channel::WaitPolicy::default();
    // The status page first, so that a violation from here on is named.
    for cap in record.find(CapabilityKind::Status) {
        let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
        let page = SharedMemory::map(fd, true).map_err(|e| cap_error(cap, e))?;
        let page: &'static SharedMemory = Box::leak(Box::new(page));
        let note: &'static AtomicU32 = page
            .atomic_u32(core::mem::offset_of!(
                crate::layout::StatusPage,
                violation_syscall
            ))
            .map_err(|e| cap_error(cap, e))?;
        sys::report_violations_to(note).map_err(|e| cap_error(cap, e))?;
    }
    for cap in record.find(CapabilityKind::SeccompProgram) {
        let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
        let len = sys::file_size(&fd).map_err(|e| cap_error(cap, e))? as usize;
        if len == 0 || !len.is_multiple_of(8) || len > 8 * u16::MAX as usize {
            return Err(cap_error(cap, format!("seccomp program of {len} bytes")));
        }
        let mut bytes = vec![0u8; len];
        let n = sys::pread(&fd, &mut bytes, 0).map_err(|e| cap_error(cap, e))?;
        if n != len {
            return Err(cap_error(cap, "short read of the seccomp program"));
        }
        let program: Vec<sys::SockFilter> = bytes
            .chunks_exact(8)
            .map(|c| sys::SockFilter {
                code: u16::from_ne_bytes([c[0], c[1]]),
                jt: c[2],
                jf: c[3],
                k: u32::from_ne_bytes([c[4], c[5], c[6], c[7]]),
            })
            .collect();
        drop(fd);
        sys::install_seccomp(&program).map_err(StartError::Seccomp)?;
    }

    let mut context = Context {
        service: record.service.to_string(),
        clients: BTreeMap::new(),
        shared: BTreeMap::new(),
        regions: BTreeMap::new(),
        files: BTreeMap::new(),
        keys: BTreeMap::new(),
        listeners: BTreeMap::new(),
        listener_grants: BTreeMap::new(),
        interrupts: BTreeMap::new(),
        platform: None,
        guest_state: None,
        guest_memory: None,
        doorbells: None,
        taps: BTreeMap::new(),
        fd_store: None,
        kept: Vec::new(),
    };
    let mut control = None;
    let mut served = Vec::new();
    for cap in record.capabilities.iter() {
        let open_channel = || -> Result<ChannelMemory, StartError> {
            let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
            ChannelMemory::open(fd).map_err(|e| cap_error(cap, e))
        };
        match cap.kind {
            CapabilityKind::Control => control = Some(ServerEnd::new(open_channel()?)),
            CapabilityKind::Serve(i) => served.push(Served {
                interface: Some(i),
                caller: Caller {
                    name: cap.name.to_string(),
                    grant: cap.grant,
                    refused: 0,
                },
                end: ServerEnd::new(open_channel()?),
                broken_in: None,
            }),
            CapabilityKind::Call(i) => {
                context
                    .clients
                    .insert(i, ClientEnd::new(open_channel()?, WaitPolicy::default()));
            }
            CapabilityKind::Region => {
                let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
                let shm = SharedMemory::map(fd, true).map_err(|e| cap_error(cap, e))?;
                context.regions.insert(cap.name.to_string(), shm);
            }
            CapabilityKind::File(_) => {
                let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
                context.files.insert(cap.name.to_string(), fd);
            }
            CapabilityKind::Key => {
                let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
                context.keys.insert(cap.name.to_string(), fd);
            }
            CapabilityKind::Listener => {
                let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
                context.listeners.insert(cap.name.to_string(), fd);
                context
                    .listener_grants
                    .insert(cap.name.to_string(), cap.grant);
            }
            CapabilityKind::Interrupt(irq) => {
                let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
                context.interrupts.insert(irq, fd);
            }
            CapabilityKind::Platform => {
                context.platform = Some(ClientEnd::new(open_channel()?, WaitPolicy::default()));
            }
            CapabilityKind::GuestMemory => {
                let Grant::GuestMemory { base, size } = cap.grant else {
                    return Err(cap_error(cap, "guest memory without its range"));
                };
                let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
                context.guest_memory = Some(GuestMemory { fd, base, size });
            }
            CapabilityKind::Doorbells => {
                let Grant::Doorbells { base, size } = cap.grant else {
                    return Err(cap_error(cap, "doorbells without their range"));
                };
                let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
                context.doorbells = Some(Doorbells { fd, base, size });
            }
            CapabilityKind::Tap => {
                let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
                context.taps.insert(cap.name.to_string(), fd);
            }
            CapabilityKind::FdStore => {
                let Grant::FdStore { max } = cap.grant else {
                    return Err(cap_error(cap, "a descriptor store without its bound"));
                };
                let fd = sys::take_fd(cap.slot).map_err(|e| cap_error(cap, e))?;
                context.fd_store = Some(super::fd_store::FdStore::new(fd, max as usize));
            }
            CapabilityKind::Status | CapabilityKind::SeccompProgram => {}
        }
    }
    for kept in record.kept.iter() {
        let fd = sys::take_fd(kept.slot).map_err(|e| StartError::Capability {
            name: kept.record.name.to_string(),
            slot: kept.slot,
            reason: format!("kept descriptor: {e}"),
        })?;
        context.kept.push((kept.record.clone(), fd));
    }
    let control = control.ok_or(StartError::NoControl)?;
    served.insert(
        0,
        Served {
            interface: None,
            caller: Caller {
                name: "microkernel".into(),
                grant: Grant::Interface,
                refused: 0,
            },
            end: control,
            broken_in: None,
        },
    );
    Ok((context, served))
}

/// The server loop: answers every served channel until told to shut down.
fn serve<Q, R>(
    context: &mut Context,
    served: &mut [Served],
    stats: &mut control::Stats,
    own_refusals: u64,
    handler: &mut impl FnMut(&mut Context, &mut Caller, Q) -> endpoint::Response<R>,
) where
    Q: DeserializeOwned,
    R: Serialize,
{
    let policy = WaitPolicy::default();
    loop {
        let mut did_work = false;
        let refused = own_refusals + served.iter().map(|s| s.caller.refused).sum::<u64>();
        for s in served.iter_mut() {
            if !s.usable() {
                continue;
            }
            // A bounded batch per channel, so that one flooding client cannot starve the rest.
            for _ in 0..BATCH {
                let incoming = match s.end.try_next() {
                    Ok(Some(i)) => i,
                    Ok(None) => break,
                    Err(ServeError::Ring(e)) => {
                        stats.malformed += 1;
                        let epoch = s.end.memory().channel().epoch();
                        tracing::warn!(
                            endpoint = ?s.interface,
                            %epoch,
                            "client corrupted its request ring ({e}); ignoring the channel until the client restarts"
                        );
                        s.broken_in = Some(epoch);
                        break;
                    }
                    Err(e) => {
                        stats.malformed += 1;
                        tracing::warn!(endpoint = ?s.interface, "dropped a bad request: {e}");
                        continue;
                    }
                };
                did_work = true;
                stats.requests_in += 1;
                let outcome = match s.interface {
                    None => {
                        stats.refused = refused;
                        let (reply, shutdown) =
                            control_reply(&s.end, &incoming, context, stats, served_stale(s));
                        let sent = s.end.reply(&incoming, &reply, REPLY_TIMEOUT);
                        if shutdown {
                            return;
                        }
                        sent
                    }
                    Some(_) => {
                        let reply = answer_endpoint(s, &incoming, context, stats, handler);
                        // A client that does not drain its replies loses them rather than
                        // stalling the server for every other client.
                        s.end.reply(&incoming, &reply, Duration::ZERO)
                    }
                };
                match outcome {
                    Ok(()) => stats.responses_out += 1,
                    Err(e) => tracing::warn!("reply not delivered: {e}"),
                }
            }
        }
        if !did_work {
            let rings: Vec<_> = served
                .iter()
                .filter(|s| s.usable())
                .map(|s| s.end.request_ring())
                .collect();
            super::channel::wait_any(&rings, policy, IDLE_RECHECK);
        }
    }
}

/// The answer to one request on a served channel (not the control channel).
fn answer_endpoint<Q, R>(
    s: &mut Served,
    incoming: &Incoming,
    context: &mut Context,
    stats: &mut control::Stats,
    handler: &mut impl FnMut(&mut Context, &mut Caller, Q) -> endpoint::Response<R>,
) -> endpoint::Response<R>
where
    Q: DeserializeOwned,
    R: Serialize,
{
    match s.end.decode::<endpoint::Request<Q>>(incoming) {
        Some(endpoint::Request::Ping { nonce }) => endpoint::Response::Pong { nonce },
        Some(endpoint::Request::Service(q)) => handler(context, &mut s.caller, q),
        Some(endpoint::Request::Guest(_)) => {
            // Guest accesses are answered on the link the service took for them.
            s.caller
                .refuse("a guest access on a channel that does not carry them");
            endpoint::Response::Error(ErrorCode::NotPermitted)
        }
        None => {
            stats.malformed += 1;
            tracing::warn!(endpoint = ?s.interface, "malformed request (tag {})", incoming.tag);
            endpoint::Response::Error(ErrorCode::Malformed)
        }
    }
}

fn served_stale(s: &Served) -> u64 {
    s.end.stale_dropped
}

fn control_reply(
    end: &ServerEnd,
    incoming: &Incoming,
    context: &mut Context,
    stats: &mut control::Stats,
    stale: u64,
) -> (control::Response, bool) {
    let Some(request) = end.decode::<control::Request>(incoming) else {
        stats.malformed += 1;
        return (control::Response::Error(ErrorCode::Malformed), false);
    };
    match request {
        control::Request::Ping { nonce } => (control::Response::Pong { nonce }, false),
        control::Request::Stats => {
            let mut s = *stats;
            s.stale_dropped = stale;
            (control::Response::Stats(s), false)
        }
        control::Request::Shutdown => (control::Response::ShuttingDown, true),
        control::Request::Probe { endpoint } => {
            stats.calls_out += 1;
            (control::Response::Probe(probe(context, endpoint)), false)
        }
        control::Request::GuestState(request) => match context.guest_state.as_mut() {
            Some(answer) => (control::Response::GuestState(answer(request)), false),
            None => (control::Response::Error(ErrorCode::Unsupported), false),
        },
    }
}

/// Pings `endpoint` through this service's own capability.
pub fn probe(context: &mut Context, endpoint: Interface) -> control::ProbeOutcome {
    let shared = context.shared.get(&endpoint).cloned();
    let mut borrowed;
    let client = match (context.clients.get_mut(&endpoint), &shared) {
        (Some(c), _) => c,
        (None, Some(s)) => match s.try_borrow_mut() {
            Ok(b) => {
                borrowed = b;
                &mut *borrowed
            }
            Err(_) => return control::ProbeOutcome::TimedOut,
        },
        (None, None) => return control::ProbeOutcome::NoCapability,
    };
    static NEXT_NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let nonce = NEXT_NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let start = Instant::now();
    match client.call(&endpoint::Request::Ping { nonce }, PROBE_TIMEOUT) {
        Ok(endpoint::Response::Pong { nonce: n }) if n == nonce => control::ProbeOutcome::Reached {
            epoch: client.epoch(),
            round_trip_ns: start.elapsed().as_nanos() as u64,
        },
        Ok(endpoint::Response::Error(code)) => control::ProbeOutcome::Failed(code),
        Ok(_) => control::ProbeOutcome::Failed(ErrorCode::Malformed),
        Err(super::channel::CallError::PeerRestarted { sent_in, now }) => {
            control::ProbeOutcome::PeerRestarted { sent_in, now }
        }
        Err(super::channel::CallError::TimedOut(_)) => control::ProbeOutcome::TimedOut,
        Err(super::channel::CallError::Ring(_)) | Err(super::channel::CallError::Encode) => {
            control::ProbeOutcome::Failed(ErrorCode::TooLarge)
        }
        Err(super::channel::CallError::MalformedReply) => {
            control::ProbeOutcome::Failed(ErrorCode::Malformed)
        }
    }
}
