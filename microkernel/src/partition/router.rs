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

/// A channel to a service that handles guest accesses, in that service's message type.
pub enum DeviceEnd {
    Intercept(End<intercept::Request, intercept::Response>),
    Vtpm(End<vtpm::Request, vtpm::Response>),
}

impl DeviceEnd {
    /// The end for a service serving `interface`, if that interface takes guest accesses.
    pub fn for_interface(
        interface: Interface,
        end: ClientEnd<endpoint::Request<()>, endpoint::Response<()>>,
    ) -> Option<DeviceEnd> {
        match interface {
            Interface::Intercept => Some(DeviceEnd::Intercept(end.into_typed())),
            Interface::Vtpm => Some(DeviceEnd::Vtpm(end.into_typed())),
            _ => None,
        }
    }
}

/// The interfaces whose services can own guest address ranges.
pub fn takes_guest_accesses(interface: Interface) -> bool {
    matches!(interface, Interface::Intercept | Interface::Vtpm)
}

pub struct Device {
    pub service: String,
    pub end: DeviceEnd,
    /// Exits this service answered (read by `paravisor ps`).
    pub exits: Arc<AtomicU64>,
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

/// One call, sent again (same request) while the service restarts.
fn call<Q: Serialize, R: DeserializeOwned>(
    end: &mut End<Q, R>,
    service: &str,
    request: Q,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<R, RouteError> {
    let started = Instant::now();
    let request = endpoint::Request::Service(request);
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(RouteError::Unreachable {
                service: service.into(),
                waited: started.elapsed(),
                reason: "the partition is stopping".into(),
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
        let reason = match end.call(&request, left) {
            Ok(endpoint::Response::Service(r)) => return Ok(r),
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
        let mut result = self.call_device(device, access);
        if let Ok(Reply {
            next: Next::ForwardPciConfig { address },
            ..
        }) = result
        {
            result = if is_intercept {
                self.forward_config(access, address)
            } else {
                Err(RouteError::BadAnswer {
                    service: self.devices[device].service.clone(),
                    answer: "a forward (only intercept's host bridge forwards)".into(),
                })
            };
        }
        match result {
            Err(e) if !is_intercept => {
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
                match call(end, &d.service, intercept::Request::Io(access), &self.stop)? {
                    intercept::Response::Io(reply) => Ok(reply),
                    other => Err(RouteError::BadAnswer {
                        service: d.service.clone(),
                        answer: format!("{other:?}"),
                    }),
                }
            }
            DeviceEnd::Vtpm(end) => {
                match call(end, &d.service, vtpm::Request::Mmio(access), &self.stop)? {
                    vtpm::Response::Register(value) => Ok(Reply::read(value & mask(access.size))),
                    vtpm::Response::Done => Ok(Reply::WRITTEN),
                    other => Err(RouteError::BadAnswer {
                        service: d.service.clone(),
                        answer: format!("{other:?}"),
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
        call(end, &d.service, request, &self.stop)
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
