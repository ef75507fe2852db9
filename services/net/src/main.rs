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
//! One thread, one poll loop over the listener, the front end's socket, the rings' kicks and
//! the TAP, and the control channel between two waits (`pv_vhost_user::front_end`). A front
//! end that disconnects is dropped with everything it set up; the device's counters stay and
//! are logged when they change, at most every [`COUNTERS_EVERY`].
#![forbid(unsafe_code)]

use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::time::Duration;
use std::time::Instant;

use ipc_defs::hosted::runtime;
use ipc_defs::services::net;
use pv_devices::virtio::net::Counters;
use pv_devices::virtio::net::VirtioNet;
use pv_net::config::Config;
use pv_net::device::HostLink;
use pv_net::device::NetDevice;
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

fn main() -> ExitCode {
    let mut started = match runtime::enter() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("net: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    let mut exports = match setup(&mut started.context) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut more = false;
    let mut logged = (Counters::default(), Instant::now());
    loop {
        if !started.answer_control() {
            log_counters(&exports);
            tracing::info!("shut down on request");
            return ExitCode::SUCCESS;
        }
        started.answer_served::<net::Request, net::Response>(|_, _, request| match request {});
        if exports.is_empty() {
            std::thread::sleep(POLL);
            continue;
        }
        more = match serve_once(&mut exports, if more { Duration::ZERO } else { POLL }) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
        if logged.1.elapsed() >= COUNTERS_EVERY {
            let now = counters(&exports);
            if now != logged.0 {
                log_counters(&exports);
            }
            logged = (now, Instant::now());
        }
    }
}

type Device = NetDevice<HostLink>;

/// The NIC on the listener the arguments name, if the host asked for it.
fn setup(context: &mut runtime::Context) -> Result<Vec<Export<Device>>, String> {
    let config = Config::from_args(std::env::args().skip(1)).map_err(|e| e.to_string())?;
    let Some(name) = config.listen.clone() else {
        tracing::info!("no --listen NAME in the service's arguments: no NIC is served");
        return Ok(Vec::new());
    };
    let Some(listener) = context.listeners.remove(&name) else {
        tracing::info!(listener = %name, "not serving the NIC: the host did not ask for its listener (paravisor run --listen)");
        return Ok(Vec::new());
    };
    let link = host_link(&config, context)?;
    let what = match &link {
        HostLink::Tap(_) => format!("TAP {TAP}"),
        HostLink::Responder(_) => format!(
            "the in-service responder at {} ({})",
            config.address.map_or("?".into(), |a| a.to_string()),
            config.responder_mac
        ),
    };
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
        "no TAP attached (paravisor run --tap {TAP}=IFNAME): the in-service responder answers"
    );
    let address = config.address.ok_or(
        "no TAP device is granted and no --address for the in-service responder: give one of them",
    )?;
    Ok(HostLink::Responder(Responder::new(
        config.responder_mac,
        address,
    )))
}

fn counters(exports: &[Export<Device>]) -> Counters {
    exports
        .first()
        .map(|e| *e.backend.lock().expect("one thread").device().counters())
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
