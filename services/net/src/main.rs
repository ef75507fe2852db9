//! `pv-net`: the guest's NIC, served to a vhost-user front end (QEMU's
//! `-netdev vhost-user,chardev=...` with `-device virtio-net-pci,netdev=...,vectors=0`).
//!
//! Capabilities expected (from the bootstrap record): its control channel; the serving end of
//! one `net` channel per client the manifest allows (pings only: the interface has no
//! requests yet); the listener `--listen` names (a Unix socket the microkernel bound, only
//! when the host asked for it with `paravisor run --listen`); TAP `net0` when the host named
//! an interface for it (`paravisor run --tap net0=IFNAME[@NETNS]`): its frames go there
//! (`pv_net::tap::TapLink`), else to the in-service responder for `--address` (see
//! `host_link`). Nothing else: it cannot
//! open a file, make a socket or reach the TPM, VMGS or the disks.
//!
//! With `--device virtio-net-pci,bar=ADDR` and a guest partition, it also serves a virtio-net
//! PCI function there (`pv_net::partition`), with what the manifest grants for it: the
//! partition's channel (BAR and configuration accesses), guest memory (the shared window),
//! its interrupt line, the checkpoint region [`CHECKPOINT_REGION`] and the doorbell eventfd.
//! There is one TAP: the partition's function takes it when it is served, and a vhost-user
//! NIC served at the same time answers with an in-service responder of its own.
//!
//! One thread, one poll loop over the listener, the front end's socket, the rings' kicks and
//! the TAP, and the control channel between two waits (`pv_vhost_user::front_end`). A front
//! end that disconnects is dropped with everything it set up; the device's counters stay and
//! are logged when they change, at most every [`COUNTERS_EVERY`]. The partition's function
//! waits in poll() on its doorbell eventfd (signalled by KVM for a kick and by the partition
//! after each access it sends) and the TAP; between two such waits the vhost-user sockets are
//! looked at without waiting, so a stalled front end never stops the partition's NIC.
#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::time::Duration;
use std::time::Instant;

use ipc_defs::hosted::runtime;
use ipc_defs::hosted::sys;
use ipc_defs::hosted::SharedMemory;
use ipc_defs::services::net;
use pv_devices::virtio::net::Counters;
use pv_devices::virtio::net::VirtioNet;
use pv_net::config::Config;
use pv_net::device::HostLink;
use pv_net::device::NetDevice;
use pv_net::device::BLOCKED_RETRY;
use pv_net::partition::PciNet;
use pv_net::responder::Responder;
use pv_net::tap::TapLink;
use pv_vhost_user::front_end::serve_once;
use pv_vhost_user::front_end::Export;

/// How long the loop waits before it looks at the control channel again (the supervisor
/// pings every second and gives the answer 100 ms).
const POLL: Duration = Duration::from_millis(20);
/// Counters are logged when they changed, at most this often (a ping a second must not make
/// a log line a second).
const COUNTERS_EVERY: Duration = Duration::from_secs(10);
/// With a vhost-user front end connected too: how long the partition's function is waited
/// on before the sockets are looked at again (a vhost-user kick then waits at most this).
const PARTITION_SLICE: Duration = Duration::from_millis(1);
/// Where the partition's function keeps its checkpoint (a `regions` grant).
const CHECKPOINT_REGION: &str = "net-checkpoint";

fn main() -> ExitCode {
    let mut started = match runtime::enter() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("net: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match Config::from_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // The partition's function first: it takes the TAP when there is one.
    let mut partition = match partition_device(&config, &mut started) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut exports = match setup(&config, &mut started.context) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut more = false;
    let mut partition_more = false;
    let mut logged = (Counters::default(), Instant::now());
    loop {
        if !started.answer_control() {
            log_counters(&exports);
            if let Some(p) = partition.as_mut() {
                p.log_counters();
            }
            tracing::info!("shut down on request");
            return ExitCode::SUCCESS;
        }
        started.answer_served::<net::Request, net::Response>(|_, _, request| match request {});
        // The partition's function waits on its own descriptors; the sockets are then looked
        // at without waiting (at once while a front end is connected, else after POLL).
        let socket_wait = match partition.as_mut() {
            Some(p) => {
                let connected = exports.iter().any(|e| e.front_end.is_some());
                let wait = if more || partition_more {
                    Duration::ZERO
                } else if connected {
                    PARTITION_SLICE
                } else {
                    POLL
                };
                partition_more = p.serve(wait);
                Duration::ZERO
            }
            None if more => Duration::ZERO,
            None => POLL,
        };
        if exports.is_empty() {
            if partition.is_none() {
                std::thread::sleep(POLL);
            }
        } else {
            more = match serve_once(&mut exports, socket_wait) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!("{e}");
                    return ExitCode::FAILURE;
                }
            };
        }
        if logged.1.elapsed() >= COUNTERS_EVERY {
            let now = counters(&exports, partition.as_ref());
            if now != logged.0 {
                log_counters(&exports);
                if let Some(p) = partition.as_mut() {
                    p.log_counters();
                }
            }
            logged = (now, Instant::now());
        }
    }
}

/// The partition's virtio-net function, with what it waits on.
struct PartitionDevice {
    link: runtime::GuestLink,
    net: PciNet<SharedMemory, HostLink>,
    /// The doorbell eventfd (a `doorbells` grant): KVM signals it for each armed notify write,
    /// the partition after each access it sends. Without it, the wait is on the ring.
    doorbells: Option<std::fs::File>,
}

impl PartitionDevice {
    /// Waits up to `wait` for an access, a kick or a frame from the host side, answers the
    /// accesses and serves the queues. True when more work waits.
    fn serve(&mut self, wait: Duration) -> bool {
        let wait = if self.net.tx_blocked() {
            wait.min(BLOCKED_RETRY)
        } else {
            wait
        };
        let net = &mut self.net;
        match self.doorbells.as_mut() {
            Some(doorbells) => {
                let signalled = {
                    let mut fds = vec![doorbells.as_fd()];
                    fds.extend(net.host_fd());
                    sys::poll_readable(&fds, wait).is_ok_and(|ready| ready.first() == Some(&true))
                };
                if signalled {
                    // Drained before the ring and the queues are looked at: a signal after
                    // this look stays.
                    let mut count = [0u8; 8];
                    let _ = std::io::Read::read(doorbells, &mut count);
                }
                self.link.serve(Duration::ZERO, |access| net.access(access));
            }
            // Without the grant the partition's ring is all there is to wait on: the TAP is
            // looked at after each wait (a frame from the host waits at most `wait`).
            None => {
                self.link.serve(wait, |access| net.access(access));
            }
        }
        let more = self.net.serve_queues();
        for e in self.net.take_errors() {
            tracing::warn!(device = "virtio-net-pci", "{e}");
        }
        more
    }

    fn log_counters(&mut self) {
        let c = *self.net.net_counters();
        let f = *self.net.counters();
        let responder = match self.net.link() {
            HostLink::Responder(r) => Some(*r.counters()),
            HostLink::Tap(_) => None,
        };
        tracing::info!(
            device = "virtio-net-pci",
            tx_frames = c.tx_frames,
            rx_frames = c.rx_frames,
            tx_dropped = c.tx_dropped.total(),
            rx_dropped = c.rx_dropped.total(),
            rx_malformed_chains = c.rx_malformed_chains,
            notify_exits = f.notify_exits,
            kicks = f.kicks,
            interrupts = f.interrupts,
            repeats = f.repeats,
            accesses = self.link.accesses,
            responder = ?responder,
            last_problem = self.net.last_problem().unwrap_or("none"),
            "counters"
        );
    }
}

/// The partition's function the arguments ask for, when there is a guest partition.
fn partition_device(
    config: &Config,
    started: &mut runtime::Started,
) -> Result<Option<PartitionDevice>, String> {
    let Some(function) = config.partition else {
        return Ok(None);
    };
    let Some(link) = started.take_guest_link() else {
        tracing::info!("no guest partition: the virtio-net PCI function is not served");
        return Ok(None);
    };
    let context = &mut started.context;
    let grants = pv_vhost_user::function::take_grants(
        context,
        "the virtio-net function",
        CHECKPOINT_REGION,
    )?;
    let doorbells = grants.doorbells;
    let link_to_host = host_link(config, context)?;
    let what = describe(config, &link_to_host);
    let model =
        VirtioNet::new(link_to_host, config.device_mac, config.mtu).map_err(|e| e.to_string())?;
    let net = PciNet::new(
        model,
        function.bar,
        grants.memory,
        grants.irq,
        grants.checkpoint,
        doorbells.is_some(),
    )
    .map_err(|e| e.to_string())?;
    tracing::info!(
        bar = format_args!("{:#x}", function.bar),
        mac = %config.device_mac,
        doorbells = doorbells.is_some(),
        "virtio-net PCI function ready on {what}"
    );
    Ok(Some(PartitionDevice {
        link,
        net,
        doorbells,
    }))
}

/// The host side, for the log.
fn describe(config: &Config, link: &HostLink) -> String {
    match link {
        HostLink::Tap(_) => format!("TAP {TAP}"),
        HostLink::Responder(_) => format!(
            "the in-service responder at {} ({})",
            config.address.map_or("?".into(), |a| a.to_string()),
            config.responder_mac
        ),
    }
}

type Device = NetDevice<HostLink>;

/// The NIC on the listener the arguments name, if the host asked for it.
fn setup(config: &Config, context: &mut runtime::Context) -> Result<Vec<Export<Device>>, String> {
    let Some(name) = config.listen.clone() else {
        tracing::info!("no --listen NAME in the service's arguments: no NIC is served");
        return Ok(Vec::new());
    };
    let Some(listener) = context.listeners.remove(&name) else {
        tracing::info!(listener = %name, "not serving the NIC: the host did not ask for its listener (paravisor run --listen)");
        return Ok(Vec::new());
    };
    let link = host_link(config, context)?;
    let what = describe(config, &link);
    let net = VirtioNet::new(link, config.device_mac, config.mtu).map_err(|e| e.to_string())?;
    tracing::info!(listener = %name, mac = %config.device_mac, mtu = config.mtu, "serving a virtio-net device on {what}");
    Ok(vec![Export::new(
        &name,
        UnixListener::from(listener),
        NetDevice::new(net),
    )])
}

/// The TAP capability the NIC's frames go to (the manifest's `taps`, attached only when the
/// host names an interface for it).
const TAP: &str = "net0";

/// The host side: the granted TAP when the host named one, else the in-service responder.
fn host_link(config: &Config, context: &mut runtime::Context) -> Result<HostLink, String> {
    if let Some(fd) = context.taps.remove(TAP) {
        let link = TapLink::new(fd, true).map_err(|e| format!("TAP {TAP}: {e}"))?;
        return Ok(HostLink::Tap(link));
    }
    tracing::info!(
        tap = TAP,
        "no TAP for this NIC (none attached with paravisor run --tap {TAP}=IFNAME, or the partition's function has it): the in-service responder answers"
    );
    let address = config.address.ok_or(
        "no TAP device is granted and no --address for the in-service responder: give one of them",
    )?;
    Ok(HostLink::Responder(Responder::new(
        config.responder_mac,
        address,
    )))
}

/// The counters that decide whether a log line is due: the vhost-user NIC's, else the
/// partition function's.
fn counters(exports: &[Export<Device>], partition: Option<&PartitionDevice>) -> Counters {
    exports
        .first()
        .map(|e| *e.backend.lock().expect("one thread").device().counters())
        .or(partition.map(|p| *p.net.net_counters()))
        .unwrap_or_default()
}

fn log_counters(exports: &[Export<Device>]) {
    for e in exports {
        let mut backend = e.backend.lock().expect("one thread");
        let device = backend.device();
        let c = *device.counters();
        let responder = match device.link() {
            HostLink::Responder(r) => Some(*r.counters()),
            HostLink::Tap(_) => None,
        };
        tracing::info!(
            device = %e.name,
            tx_frames = c.tx_frames,
            tx_bytes = c.tx_bytes,
            rx_frames = c.rx_frames,
            rx_bytes = c.rx_bytes,
            tx_dropped = c.tx_dropped.total(),
            rx_dropped = c.rx_dropped.total(),
            rx_malformed_chains = c.rx_malformed_chains,
            rx_waits = c.rx_waits,
            responder = ?responder,
            last_problem = device.last_problem().unwrap_or("none"),
            "counters"
        );
    }
}
