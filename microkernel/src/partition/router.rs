//! The exit router: which service answers a guest access, built from the manifest.
//!
//! A port or MMIO range a service lists (`pio` / `mmio`) goes to that service's channel (the
//! partition is its client `guest`) in the service's own message type; everything else, and
//! every MSR access, hypercall and vCPU event, goes to `intercept`. A call that fails because
//! the service restarted is sent again with the same access number (the device answers a
//! repeat from its record), so the vCPU simply waits out a restart. A device service that
//! stays unreachable past [`GIVE_UP`], or answers nonsense, gets the unowned behaviour (reads
//! all ones, writes dropped), counted and logged, rather than a hung or ended guest; without
//! intercept (its policy) the partition cannot go on and the run ends.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use ipc_defs::endpoint;
use ipc_defs::hosted::CallError;
use ipc_defs::hosted::ClientEnd;
use ipc_defs::layout::ServerState;
use ipc_defs::services::guest::mask;
use ipc_defs::services::guest::Access;
use ipc_defs::services::guest::Next;
use ipc_defs::services::guest::Reply;
use ipc_defs::services::guest::Space;
use ipc_defs::services::intercept;
use ipc_defs::services::vtpm;
use ipc_defs::Interface;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Answered in the vCPU thread itself, without IPC: the baseline of the exit benchmark
/// (reads 0, writes dropped). Not a device: nothing else may be placed here.
pub const IN_THREAD_PORT: u16 = 0xf5;

/// How long the vCPU waits for a service (a device answers in microseconds, a TPM command
/// run at `go` in up to seconds; a restarting service within its back-off) before the
/// access is treated as unowned. A call is sent again only after the service restarted
/// (its old request is then gone), never after a mere timeout (it could still be applied).
pub const GIVE_UP: Duration = Duration::from_secs(60);

type End<Q, R> = ClientEnd<endpoint::Request<Q>, endpoint::Response<R>>;

/// A channel to a service that handles guest accesses.
pub enum DeviceEnd {
    /// Intercept: guest accesses nobody else owns, and the partition's policy questions.
    Intercept(End<intercept::Request, intercept::Response>),
    /// The vTPM takes its register accesses in its own interface (with its crash record).
    Vtpm(End<vtpm::Request, vtpm::Response>),
    /// Any other device service: the generic guest access of every endpoint
    /// (`endpoint::Request::Guest`), whatever its interface.
    Device(End<(), ()>),
}

impl DeviceEnd {
    /// The end for a service serving `interface`.
    pub fn for_interface(
        interface: Interface,
        end: ClientEnd<endpoint::Request<()>, endpoint::Response<()>>,
    ) -> DeviceEnd {
        match interface {
            Interface::Intercept => DeviceEnd::Intercept(end.into_typed()),
            Interface::Vtpm => DeviceEnd::Vtpm(end.into_typed()),
            _ => DeviceEnd::Device(end),
        }
    }
}

pub struct Device {
    pub service: String,
    pub end: DeviceEnd,
    /// Exits this service answered (read by `paravisor ps`).
    pub exits: Arc<AtomicU64>,
    /// Its doorbells, when the manifest gives it some.
    pub doorbells: Option<super::DoorbellSwitch>,
}

#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub space: Space,
    pub base: u64,
    pub size: u64,
    pub device: usize,
}

/// Why the router could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("service \"{service}\" unreachable for {waited:?}: {reason}")]
    Unreachable {
        service: String,
        waited: Duration,
        reason: String,
    },
    #[error("service \"{service}\" answered {answer}")]
    BadAnswer { service: String, answer: String },
    #[error("no intercept service: {what} has nowhere to go")]
    NoIntercept { what: String },
    /// The partition is stopping: the access is left unanswered and the vCPU ends.
    #[error("service \"{service}\" not asked: the partition is stopping")]
    Stopping { service: String },
}

pub struct Router {
    pub devices: Vec<Device>,
    routes: Vec<Route>,
    intercept: Option<usize>,
    /// Which device answers the configuration space of PCI device 00:n.
    pci_owners: Vec<(u8, usize)>,
    /// Set when the partition stops: calls waiting for a restarting service give up.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// Accesses a device could not answer (answered as unowned instead).
    pub unanswered: Arc<AtomicU64>,
    /// PCI configuration accesses forwarded to the owning device service.
    pub config_forwards: Arc<AtomicU64>,
}

/// One call, sent again (same request) while the service restarts: the service's answer
/// (its interface's, or a guest access's).
/// `wake`: the device's doorbell eventfd, signalled once the request is on the ring.
fn call<Q: Serialize, R: DeserializeOwned>(
    end: &mut End<Q, R>,
    service: &str,
    request: endpoint::Request<Q>,
    stop: &std::sync::atomic::AtomicBool,
    wake: Option<&super::DoorbellSwitch>,
) -> Result<endpoint::Response<R>, RouteError> {
    let started = Instant::now();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(RouteError::Stopping {
                service: service.into(),
            });
        }
        if end.memory().channel().server_state() == ServerState::Gone {
            return Err(RouteError::Unreachable {
                service: service.into(),
                waited: started.elapsed(),
                reason: "the supervisor gave up on it (failed)".into(),
            });
        }
        let left = GIVE_UP
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(1));
        let sent = end.call_notifying(&request, left, || {
            if let Some(w) = wake {
                w.wake();
            }
        });
        let reason = match sent {
            Ok(endpoint::Response::Error(e)) => {
                return Err(RouteError::BadAnswer {
                    service: service.into(),
                    answer: format!("{e:?}"),
                })
            }
            Ok(endpoint::Response::Pong { .. }) => {
                return Err(RouteError::BadAnswer {
                    service: service.into(),
                    answer: "a pong".into(),
                })
            }
            Ok(answer) => return Ok(answer),
            Err(CallError::PeerRestarted { .. }) => "restarted".to_string(),
            Err(e) => {
                return Err(RouteError::Unreachable {
                    service: service.into(),
                    waited: started.elapsed(),
                    reason: e.to_string(),
                })
            }
        };
        if started.elapsed() >= GIVE_UP {
            return Err(RouteError::Unreachable {
                service: service.into(),
                waited: started.elapsed(),
                reason,
            });
        }
        // Restarting (or in its back-off): the new process gets the same request.
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A call in the service's own interface: its answer.
fn call_service<Q: Serialize, R: DeserializeOwned>(
    end: &mut End<Q, R>,
    service: &str,
    request: Q,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<R, RouteError> {
    match call(
        end,
        service,
        endpoint::Request::Service(request),
        stop,
        None,
    )? {
        endpoint::Response::Service(r) => Ok(r),
        _ => Err(RouteError::BadAnswer {
            service: service.into(),
            answer: "an answer of another kind".into(),
        }),
    }
}

impl Router {
    pub fn new(
        devices: Vec<Device>,
        routes: Vec<Route>,
        intercept: Option<usize>,
        pci_owners: Vec<(u8, usize)>,
    ) -> Router {
        Router {
            devices,
            routes,
            intercept,
            pci_owners,
            stop: Arc::default(),
            unanswered: Arc::default(),
            config_forwards: Arc::default(),
        }
    }

    fn route(&self, space: Space, address: u64) -> Option<usize> {
        self.routes
            .iter()
            .find(|r| r.space == space && address >= r.base && address - r.base < r.size)
            .map(|r| r.device)
    }

    /// The service that answers `access` (for diagnostics).
    pub fn owner(&self, space: Space, address: u64) -> Option<&str> {
        self.route(space, address)
            .or(self.intercept)
            .map(|d| self.devices[d].service.as_str())
    }

    /// Answers one guest access.
    pub fn access(&mut self, access: Access) -> Result<Reply, RouteError> {
        let device = match self.route(access.space, access.address).or(self.intercept) {
            Some(d) => d,
            None => {
                return Err(RouteError::NoIntercept {
                    what: format!("{:?} access at {:#x}", access.space, access.address),
                })
            }
        };
        let is_intercept = Some(device) == self.intercept;
        // Whether a failure to answer ends the run: only intercept's own (its policy is the
        // partition's); a device's, also when intercept handed it a configuration access,
        // gets the unowned behaviour.
        let mut fatal = is_intercept;
        let mut result = self.call_device(device, access);
        if let Ok(Reply {
            next: Next::ForwardPciConfig { address },
            ..
        }) = result
        {
            result = if is_intercept {
                fatal = false;
                self.forward_config(access, address)
            } else {
                Err(RouteError::BadAnswer {
                    service: self.devices[device].service.clone(),
                    answer: "a forward (only intercept's host bridge forwards)".into(),
                })
            };
        }
        match result {
            Err(e) if !fatal && !matches!(e, RouteError::Stopping { .. }) => {
                // A device that cannot answer (failed, or answering nonsense) gets the unowned
                // behaviour; the guest runs on. Without intercept's policy it cannot.
                let n = self.unanswered.fetch_add(1, Ordering::Relaxed) + 1;
                // Rate-limited: a guest polling a dead device makes thousands of these.
                if n <= 8 || n.is_power_of_two() {
                    tracing::error!(
                        unanswered = n,
                        "{e}: {:?} access at {:#x} answered as unowned",
                        access.space,
                        access.address
                    );
                }
                Ok(if access.write.is_some() {
                    Reply::WRITTEN
                } else {
                    Reply::read(mask(access.size))
                })
            }
            other => other,
        }
    }

    /// A configuration access intercept's host bridge hands over: to the owner of the device.
    fn forward_config(&mut self, access: Access, address: u32) -> Result<Reply, RouteError> {
        let device = ((address >> 11) & 0x1f) as u8;
        let Some(&(_, owner)) = self.pci_owners.iter().find(|(d, _)| *d == device) else {
            // Intercept named a device nobody owns: no device there.
            return Ok(if access.write.is_some() {
                Reply::WRITTEN
            } else {
                Reply::read(mask(access.size))
            });
        };
        let forwarded = Access {
            space: Space::PciConfig,
            address: u64::from(address),
            ..access
        };
        let n = self.config_forwards.fetch_add(1, Ordering::Relaxed) + 1;
        if n <= 4 || n.is_power_of_two() {
            tracing::info!(
                forwards = n,
                "PCI config access of 00:{device:02x}.{} offset {:#x} forwarded to {}",
                (address >> 8) & 7,
                address & 0xff,
                self.devices[owner].service
            );
        }
        match self.call_device(owner, forwarded) {
            // The owner's answer stands, except that it cannot forward again.
            Ok(Reply {
                next: Next::ForwardPciConfig { .. },
                ..
            }) => Err(RouteError::BadAnswer {
                service: self.devices[owner].service.clone(),
                answer: "a forward of a forward".into(),
            }),
            other => other,
        }
    }

    fn call_device(&mut self, device: usize, access: Access) -> Result<Reply, RouteError> {
        let d = &mut self.devices[device];
        d.exits.fetch_add(1, Ordering::Relaxed);
        match &mut d.end {
            DeviceEnd::Intercept(end) => {
                match call_service(end, &d.service, intercept::Request::Io(access), &self.stop)? {
                    intercept::Response::Io(reply) => Ok(reply),
                    other => Err(RouteError::BadAnswer {
                        service: d.service.clone(),
                        answer: format!("{other:?}"),
                    }),
                }
            }
            DeviceEnd::Vtpm(end) => {
                match call_service(end, &d.service, vtpm::Request::Mmio(access), &self.stop)? {
                    vtpm::Response::Register(value) => Ok(Reply::read(value & mask(access.size))),
                    vtpm::Response::Done => Ok(Reply::WRITTEN),
                    other => Err(RouteError::BadAnswer {
                        service: d.service.clone(),
                        answer: format!("{other:?}"),
                    }),
                }
            }
            DeviceEnd::Device(end) => {
                match call(
                    end,
                    &d.service,
                    endpoint::Request::Guest(access),
                    &self.stop,
                    d.doorbells.as_ref(),
                )? {
                    // A device answers its access; ending or resetting the run is intercept's.
                    endpoint::Response::Guest(reply) if reply.next == Next::Resume => Ok(Reply {
                        value: reply.value & mask(access.size),
                        next: Next::Resume,
                    }),
                    // A device with doorbells says in each answer whether they are armed.
                    endpoint::Response::Guest(Reply {
                        value,
                        next: Next::Doorbells { armed },
                    }) if d.doorbells.is_some() => {
                        if let Some(switch) = d.doorbells.as_mut() {
                            if switch.armed() != armed {
                                match switch.set(armed) {
                                    Ok(()) => tracing::info!(
                                        service = %d.service,
                                        "doorbells {}",
                                        if armed {
                                            "armed: the guest's writes to them signal the device's eventfd"
                                        } else {
                                            "disarmed: the guest's writes to them are exits again"
                                        }
                                    ),
                                    Err(e) => tracing::error!(
                                        service = %d.service,
                                        "doorbells not armed (they stay exits): {e}"
                                    ),
                                }
                            }
                        }
                        Ok(Reply {
                            value: value & mask(access.size),
                            next: Next::Resume,
                        })
                    }
                    _ => Err(RouteError::BadAnswer {
                        service: d.service.clone(),
                        answer: "an answer of another kind".into(),
                    }),
                }
            }
        }
    }

    fn intercept(
        &mut self,
        request: intercept::Request,
    ) -> Result<intercept::Response, RouteError> {
        let Some(i) = self.intercept else {
            return Err(RouteError::NoIntercept {
                what: format!("{request:?}"),
            });
        };
        let d = &mut self.devices[i];
        d.exits.fetch_add(1, Ordering::Relaxed);
        let DeviceEnd::Intercept(end) = &mut d.end else {
            unreachable!("the intercept device is an intercept end")
        };
        call_service(end, &d.service, request, &self.stop)
    }

    pub fn msr(
        &mut self,
        vcpu: u32,
        index: u32,
        write: Option<u64>,
    ) -> Result<intercept::MsrOutcome, RouteError> {
        match self.intercept(intercept::Request::Msr { vcpu, index, write })? {
            intercept::Response::Msr(outcome) => Ok(outcome),
            other => Err(RouteError::BadAnswer {
                service: "intercept".into(),
                answer: format!("{other:?}"),
            }),
        }
    }

    pub fn hypercall(
        &mut self,
        vcpu: u32,
        nr: u64,
        args: [u64; 6],
    ) -> Result<intercept::HypercallOutcome, RouteError> {
        match self.intercept(intercept::Request::Hypercall { vcpu, nr, args })? {
            intercept::Response::Hypercall(outcome) => Ok(outcome),
            other => Err(RouteError::BadAnswer {
                service: "intercept".into(),
                answer: format!("{other:?}"),
            }),
        }
    }

    pub fn event(&mut self, vcpu: u32, event: intercept::Event) -> Result<Next, RouteError> {
        match self.intercept(intercept::Request::Event { vcpu, event })? {
            intercept::Response::Next(next) => Ok(next),
            other => Err(RouteError::BadAnswer {
                service: "intercept".into(),
                answer: format!("{other:?}"),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The router against services played by threads on real channels: which service gets
    //! each access, what it receives, and what the guest sees when a service fails.

    use std::os::fd::AsFd;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    use ipc_defs::hosted::channel::wait_any;
    use ipc_defs::hosted::channel::ChannelMemory;
    use ipc_defs::hosted::channel::ServerEnd;
    use ipc_defs::hosted::channel::WaitPolicy;
    use ipc_defs::layout::Direction;
    use ipc_defs::services::intercept::Event;
    use ipc_defs::services::intercept::HypercallOutcome;
    use ipc_defs::services::intercept::InterceptError;
    use ipc_defs::services::intercept::MsrOutcome;
    use ipc_defs::services::vtpm::VtpmError;

    use super::*;

    /// A service played by a thread: answers each request with `answer`, and reports what it
    /// received. It stops when the test ends (`done`).
    struct Played<Q> {
        received: mpsc::Receiver<Q>,
        thread: Option<JoinHandle<()>>,
        done: Arc<AtomicBool>,
        /// A second mapping of the channel, as the supervisor holds.
        supervisor: ChannelMemory,
    }

    impl<Q> Drop for Played<Q> {
        fn drop(&mut self) {
            self.done.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn second_mapping(mem: &ChannelMemory) -> ChannelMemory {
        let fd = mem.shm().as_fd().try_clone_to_owned().unwrap();
        ChannelMemory::open(fd).unwrap()
    }

    fn play<Q, R>(
        answer: impl Fn(&Q) -> Option<endpoint::Response<R>> + Send + 'static,
    ) -> (End<Q, R>, Played<Q>)
    where
        Q: Serialize + DeserializeOwned + Send + 'static,
        R: Serialize + DeserializeOwned + Send + 'static,
    {
        let mem = ChannelMemory::create("test-router", 4096).unwrap();
        let server_mem = second_mapping(&mem);
        let supervisor = second_mapping(&mem);
        let (tx, received) = mpsc::channel();
        let done = Arc::new(AtomicBool::new(false));
        let stop = done.clone();
        let thread = std::thread::spawn(move || {
            let mut server = ServerEnd::new(server_mem);
            while !stop.load(Ordering::Relaxed) {
                match server.try_next() {
                    Ok(Some(incoming)) => {
                        let Some(endpoint::Request::Service(q)) =
                            server.decode::<endpoint::Request<Q>>(&incoming)
                        else {
                            continue;
                        };
                        let reply = answer(&q);
                        let _ = tx.send(q);
                        // `None`: the service dies with the request unanswered.
                        let Some(reply) = reply else { return };
                        let _ = server.reply(&incoming, &reply, Duration::from_secs(10));
                    }
                    Ok(None) => wait_any(
                        &[server.request_ring()],
                        WaitPolicy::default(),
                        Duration::from_millis(20),
                    ),
                    Err(_) => {}
                }
            }
        });
        let end = ClientEnd::new(mem, WaitPolicy::default());
        let played = Played {
            received,
            thread: Some(thread),
            done,
            supervisor,
        };
        (end, played)
    }

    type InterceptAnswer =
        Box<dyn Fn(&intercept::Request) -> Option<endpoint::Response<intercept::Response>> + Send>;

    /// Intercept answering port and MMIO accesses with `value`, except what `special` answers.
    fn intercept_answering(
        value: u64,
        special: impl Fn(&intercept::Request) -> Option<intercept::Response> + Send + 'static,
    ) -> InterceptAnswer {
        Box::new(move |q| {
            Some(endpoint::Response::Service(special(q).unwrap_or(match q {
                intercept::Request::Io(_) => intercept::Response::Io(Reply::read(value)),
                intercept::Request::Msr { .. } => intercept::Response::Msr(MsrOutcome::Fault),
                intercept::Request::Hypercall { .. } => {
                    intercept::Response::Hypercall(HypercallOutcome::Return(7))
                }
                intercept::Request::Event { .. } => intercept::Response::Next(Next::Exit(3)),
                intercept::Request::Raise(_) => intercept::Response::Raised,
            })))
        })
    }

    fn device(service: &str, end: DeviceEnd) -> Device {
        Device {
            service: service.into(),
            end,
            exits: Arc::default(),
            doorbells: None,
        }
    }

    fn access(space: Space, address: u64, size: u8, write: Option<u64>) -> Access {
        Access {
            vcpu: 0,
            seq: 1,
            space,
            address,
            size,
            write,
        }
    }

    const TPM_BASE: u64 = 0xfed4_0000;
    const TPM_SIZE: u64 = 0x5000;

    /// Intercept (device 0) and a vTPM (device 1) owning `TPM_BASE..+TPM_SIZE` and the PCI
    /// devices in `pci_owners`, on these ends.
    fn router_of(
        i_end: End<intercept::Request, intercept::Response>,
        t_end: End<vtpm::Request, vtpm::Response>,
        pci_owners: Vec<(u8, usize)>,
    ) -> Router {
        Router::new(
            vec![
                device("intercept", DeviceEnd::Intercept(i_end)),
                device("tpm", DeviceEnd::Vtpm(t_end)),
            ],
            vec![Route {
                space: Space::Mmio,
                base: TPM_BASE,
                size: TPM_SIZE,
                device: 1,
            }],
            Some(0),
            pci_owners,
        )
    }

    /// Intercept (device 0) and a vTPM (device 1) owning `TPM_BASE..+TPM_SIZE` and PCI 00:05.
    fn tpm_router(
        intercept_answer: InterceptAnswer,
        tpm_answer: impl Fn(&vtpm::Request) -> Option<endpoint::Response<vtpm::Response>>
            + Send
            + 'static,
    ) -> (Router, Played<intercept::Request>, Played<vtpm::Request>) {
        let (i_end, i) = play(intercept_answer);
        let (t_end, t) = play(tpm_answer);
        let router = router_of(i_end, t_end, vec![(5, 1)]);
        (router, i, t)
    }

    fn tpm_register(
        value: u64,
    ) -> impl Fn(&vtpm::Request) -> Option<endpoint::Response<vtpm::Response>> {
        move |q| {
            Some(endpoint::Response::Service(match q {
                vtpm::Request::Mmio(a) if a.write.is_some() => vtpm::Response::Done,
                _ => vtpm::Response::Register(value),
            }))
        }
    }

    fn received<Q>(p: &Played<Q>) -> Q {
        p.received
            .recv_timeout(Duration::from_secs(60))
            .expect("the service received the request")
    }

    #[test]
    fn an_access_goes_to_the_service_that_owns_its_range_and_everything_else_to_intercept() {
        let (mut r, i, t) = tpm_router(intercept_answering(0x11, |_| None), tpm_register(0x22));
        let owned = [TPM_BASE, TPM_BASE + 1, TPM_BASE + TPM_SIZE - 1];
        for address in owned {
            assert_eq!(r.owner(Space::Mmio, address), Some("tpm"));
            let reply = r.access(access(Space::Mmio, address, 4, None)).unwrap();
            assert_eq!(reply, Reply::read(0x22), "{address:#x}");
            let got = received(&t);
            assert_eq!(
                got,
                vtpm::Request::Mmio(access(Space::Mmio, address, 4, None))
            );
        }
        // Just outside the range, and the same address in another space: intercept's.
        for (space, address) in [
            (Space::Mmio, TPM_BASE - 1),
            (Space::Mmio, TPM_BASE + TPM_SIZE),
            (Space::Port, TPM_BASE),
            (Space::Port, 0x3f8),
        ] {
            assert_eq!(r.owner(space, address), Some("intercept"));
            let reply = r.access(access(space, address, 2, None)).unwrap();
            assert_eq!(reply, Reply::read(0x11), "{space:?} {address:#x}");
            let got = received(&i);
            assert_eq!(got, intercept::Request::Io(access(space, address, 2, None)));
        }
        assert_eq!(r.devices[0].exits.load(Ordering::Relaxed), 4);
        assert_eq!(r.devices[1].exits.load(Ordering::Relaxed), 3);
        assert_eq!(r.unanswered.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_register_value_is_cut_to_the_access_size_and_a_write_is_acknowledged() {
        let (mut r, _i, t) = tpm_router(
            intercept_answering(0, |_| None),
            tpm_register(0x8877_6655_4433_2211),
        );
        for (size, value) in [(1, 0x11), (2, 0x2211), (4, 0x4433_2211)] {
            let reply = r.access(access(Space::Mmio, TPM_BASE, size, None)).unwrap();
            assert_eq!(reply, Reply::read(value), "size {size}");
            received(&t);
        }
        let reply = r.access(access(Space::Mmio, TPM_BASE, 4, Some(5))).unwrap();
        assert_eq!(reply, Reply::WRITTEN);
        assert_eq!(
            received(&t),
            vtpm::Request::Mmio(access(Space::Mmio, TPM_BASE, 4, Some(5)))
        );
    }

    #[test]
    fn a_config_access_intercept_hands_over_reaches_the_owner_of_that_pci_device_only() {
        // 00:05.2 offset 0x10 (owned by tpm); 00:06.0 (nobody's).
        let owned = 5 << 11 | 2 << 8 | 0x10;
        let unowned = 6 << 11;
        let (mut r, i, t) = tpm_router(
            intercept_answering(0, move |q| match q {
                intercept::Request::Io(a) if a.address == 0xcfc => {
                    Some(intercept::Response::Io(Reply {
                        value: 0,
                        next: Next::ForwardPciConfig {
                            address: if a.vcpu == 0 { owned } else { unowned },
                        },
                    }))
                }
                _ => None,
            }),
            tpm_register(0xabcd),
        );
        let reply = r.access(access(Space::Port, 0xcfc, 2, None)).unwrap();
        assert_eq!(reply, Reply::read(0xabcd));
        received(&i);
        assert_eq!(
            received(&t),
            vtpm::Request::Mmio(access(Space::PciConfig, owned.into(), 2, None))
        );
        assert_eq!(r.config_forwards.load(Ordering::Relaxed), 1);
        // A write is handed over the same way.
        let reply = r.access(access(Space::Port, 0xcfc, 4, Some(9))).unwrap();
        assert_eq!(reply, Reply::WRITTEN);
        received(&i);
        assert_eq!(
            received(&t),
            vtpm::Request::Mmio(access(Space::PciConfig, owned.into(), 4, Some(9)))
        );
        // A device nobody owns: no function there (all ones, writes dropped), nobody asked.
        let mut read = access(Space::Port, 0xcfc, 2, None);
        read.vcpu = 1;
        assert_eq!(r.access(read).unwrap(), Reply::read(0xffff));
        let mut write = access(Space::Port, 0xcfc, 1, Some(1));
        write.vcpu = 1;
        assert_eq!(r.access(write).unwrap(), Reply::WRITTEN);
        received(&i);
        received(&i);
        assert!(
            t.received.try_recv().is_err(),
            "the owner of 00:05 was asked about 00:06"
        );
        assert_eq!(r.config_forwards.load(Ordering::Relaxed), 2);
        assert_eq!(r.unanswered.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn only_intercept_may_hand_an_access_over_and_never_twice() {
        // The owner of 00:05 answers a forwarded access with another forward: refused, and
        // the guest gets the unowned answer. A device answering an MMIO access with a forward
        // likewise.
        let (i_end, _i) = play(intercept_answering(0, |q| match q {
            intercept::Request::Io(a) if a.address == 0xcfc => {
                Some(intercept::Response::Io(Reply {
                    value: 0,
                    next: Next::ForwardPciConfig { address: 5 << 11 },
                }))
            }
            _ => None,
        }));
        let (d_end, d) = play(|_: &intercept::Request| {
            Some(endpoint::Response::Service(intercept::Response::Io(
                Reply {
                    value: 0x55,
                    next: Next::ForwardPciConfig { address: 5 << 11 },
                },
            )))
        });
        // A second intercept-typed service (as a device would be) owning 00:05 and a range.
        let mut r = Router::new(
            vec![
                device("intercept", DeviceEnd::Intercept(i_end)),
                device("nic", DeviceEnd::Intercept(d_end)),
            ],
            vec![Route {
                space: Space::Mmio,
                base: 0x1000,
                size: 0x1000,
                device: 1,
            }],
            Some(0),
            vec![(5, 1)],
        );
        assert_eq!(
            r.access(access(Space::Port, 0xcfc, 4, None)).unwrap(),
            Reply::read(0xffff_ffff)
        );
        received(&d);
        assert_eq!(r.unanswered.load(Ordering::Relaxed), 1);
        assert_eq!(
            r.access(access(Space::Mmio, 0x1800, 1, None)).unwrap(),
            Reply::read(0xff)
        );
        assert_eq!(
            received(&d),
            intercept::Request::Io(access(Space::Mmio, 0x1800, 1, None))
        );
        assert_eq!(r.unanswered.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_failing_device_reads_as_unowned_but_a_failing_intercept_ends_the_run() {
        let (mut r, _i, t) = tpm_router(
            Box::new(|_| {
                Some(endpoint::Response::Service(intercept::Response::Error(
                    InterceptError::BadAccess { size: 3 },
                )))
            }),
            |_| {
                Some(endpoint::Response::Service(vtpm::Response::Error(
                    VtpmError::PoweredOff,
                )))
            },
        );
        let reply = r.access(access(Space::Mmio, TPM_BASE, 4, None)).unwrap();
        assert_eq!(reply, Reply::read(0xffff_ffff));
        let reply = r.access(access(Space::Mmio, TPM_BASE, 2, Some(1))).unwrap();
        assert_eq!(reply, Reply::WRITTEN);
        received(&t);
        received(&t);
        assert_eq!(r.unanswered.load(Ordering::Relaxed), 2);
        let e = r.access(access(Space::Port, 0x80, 1, None)).unwrap_err();
        assert!(
            matches!(&e, RouteError::BadAnswer { service, .. } if service == "intercept"),
            "{e}"
        );
        assert_eq!(r.unanswered.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn msrs_hypercalls_and_events_go_to_intercept_and_a_wrong_answer_is_an_error() {
        let (mut r, i, _t) = tpm_router(intercept_answering(0, |_| None), tpm_register(0));
        assert_eq!(r.msr(1, 0x10, None).unwrap(), MsrOutcome::Fault);
        assert_eq!(
            received(&i),
            intercept::Request::Msr {
                vcpu: 1,
                index: 0x10,
                write: None
            }
        );
        assert_eq!(
            r.hypercall(2, 9, [1, 2, 3, 4, 5, 6]).unwrap(),
            HypercallOutcome::Return(7)
        );
        assert_eq!(
            received(&i),
            intercept::Request::Hypercall {
                vcpu: 2,
                nr: 9,
                args: [1, 2, 3, 4, 5, 6]
            }
        );
        assert_eq!(r.event(0, Event::Shutdown).unwrap(), Next::Exit(3));
        received(&i);
        assert_eq!(r.devices[0].exits.load(Ordering::Relaxed), 3);

        // An intercept that answers every request with the wrong kind of answer.
        let (mut r, _i, _t) = tpm_router(
            Box::new(|_| Some(endpoint::Response::Service(intercept::Response::Raised))),
            tpm_register(0),
        );
        assert!(matches!(
            r.msr(0, 1, None),
            Err(RouteError::BadAnswer { .. })
        ));
        assert!(matches!(
            r.hypercall(0, 1, [0; 6]),
            Err(RouteError::BadAnswer { .. })
        ));
        assert!(matches!(
            r.event(0, Event::Shutdown),
            Err(RouteError::BadAnswer { .. })
        ));
        assert!(matches!(
            r.access(access(Space::Port, 0x80, 1, None)),
            Err(RouteError::BadAnswer { .. })
        ));
    }

    #[test]
    fn without_intercept_an_unowned_access_or_an_msr_has_nowhere_to_go() {
        let (t_end, t) = play(tpm_register(0x7));
        let mut r = Router::new(
            vec![device("tpm", DeviceEnd::Vtpm(t_end))],
            vec![Route {
                space: Space::Mmio,
                base: TPM_BASE,
                size: TPM_SIZE,
                device: 0,
            }],
            None,
            vec![],
        );
        assert_eq!(r.owner(Space::Mmio, TPM_BASE - 1), None);
        assert_eq!(
            r.access(access(Space::Mmio, TPM_BASE, 1, None)).unwrap(),
            Reply::read(0x7)
        );
        received(&t);
        assert!(matches!(
            r.access(access(Space::Mmio, TPM_BASE - 1, 1, None)),
            Err(RouteError::NoIntercept { .. })
        ));
        assert!(matches!(
            r.msr(0, 1, None),
            Err(RouteError::NoIntercept { .. })
        ));
        assert!(matches!(
            r.hypercall(0, 1, [0; 6]),
            Err(RouteError::NoIntercept { .. })
        ));
        assert!(matches!(
            r.event(0, Event::Shutdown),
            Err(RouteError::NoIntercept { .. })
        ));
    }

    #[test]
    fn a_call_to_a_restarted_service_is_sent_again_and_a_given_up_service_is_not_waited_for() {
        // The first tpm dies holding the request; the supervisor moves the channel to a new
        // epoch (as after a restart) and a new tpm answers the same request.
        let (t_end, dying) = play(|_: &vtpm::Request| None);
        let supervisor = second_mapping(&dying.supervisor);
        let (i_end, _i) = play(intercept_answering(0, |_| None));
        let mut r = router_of(i_end, t_end, vec![]);
        let restarter = std::thread::spawn(move || {
            let first = received(&dying);
            drop(dying);
            supervisor.restart_epoch(Direction::Requests);
            // The restarted service, on the same channel.
            let mem = second_mapping(&supervisor);
            let mut server = ServerEnd::new(mem);
            loop {
                if let Ok(Some(incoming)) = server.try_next() {
                    let Some(endpoint::Request::Service(q)) =
                        server.decode::<endpoint::Request<vtpm::Request>>(&incoming)
                    else {
                        continue;
                    };
                    let reply: endpoint::Response<vtpm::Response> =
                        endpoint::Response::Service(vtpm::Response::Register(0x99));
                    server
                        .reply(&incoming, &reply, Duration::from_secs(10))
                        .unwrap();
                    return (first, q, supervisor);
                }
                wait_any(
                    &[server.request_ring()],
                    WaitPolicy::default(),
                    Duration::from_millis(20),
                );
            }
        });
        let reply = r.access(access(Space::Mmio, TPM_BASE, 4, None)).unwrap();
        assert_eq!(reply, Reply::read(0x99));
        let (first, again, supervisor) = restarter.join().unwrap();
        assert_eq!(first, again, "the restarted service got the same access");
        assert_eq!(r.unanswered.load(Ordering::Relaxed), 0);

        // The supervisor gave up on it: the access is answered as unowned at once.
        supervisor.set_server_state(ServerState::Gone);
        let reply = r.access(access(Space::Mmio, TPM_BASE, 2, None)).unwrap();
        assert_eq!(reply, Reply::read(0xffff));
        assert_eq!(r.unanswered.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_stopping_partition_does_not_wait_for_a_service() {
        // A tpm that never answers (it takes the request and dies), and a partition stopping.
        let (mut r, _i, _t) = tpm_router(intercept_answering(0, |_| None), |_| None);
        r.stop.store(true, Ordering::Relaxed);
        // Neither a device's access nor intercept's is answered: the vCPU ends as stopped.
        let e = r
            .access(access(Space::Mmio, TPM_BASE, 1, None))
            .unwrap_err();
        assert!(matches!(e, RouteError::Stopping { .. }), "{e}");
        assert_eq!(r.unanswered.load(Ordering::Relaxed), 0);
        let e = r.msr(0, 1, None).unwrap_err();
        assert!(matches!(e, RouteError::Stopping { .. }), "{e}");
    }

    #[test]
    fn each_interface_gets_its_kind_of_device_end() {
        for interface in [
            Interface::Intercept,
            Interface::Vtpm,
            Interface::Vmgs,
            Interface::Attest,
            Interface::Storage,
            Interface::Net,
        ] {
            let mem = ChannelMemory::create("test-router-end", 4096).unwrap();
            let end =
                DeviceEnd::for_interface(interface, ClientEnd::new(mem, WaitPolicy::default()));
            match (interface, end) {
                (Interface::Intercept, DeviceEnd::Intercept(_)) => {}
                (Interface::Vtpm, DeviceEnd::Vtpm(_)) => {}
                (Interface::Intercept | Interface::Vtpm, _) => {
                    panic!("{interface:?} got the wrong end")
                }
                (_, DeviceEnd::Device(_)) => {}
                (i, _) => panic!("{i:?} got the wrong end"),
            }
        }
    }
}
