//! virtio-net on the shared vhost-user transport: the model (`pv_devices::virtio::net`)
//! serves its two queues whole ([`pv_vhost_user::Ring::parts`]) and says itself when the
//! driver wants an interrupt (its reports' `notify`; virtio-queue's own count cannot see a
//! frame's buffers published together). It keeps nothing in flight between calls, so the
//! in-flight record is not asked for: a restarted service resumes both queues at their used
//! index.
//!
//! The transmit queue is re-armed here when it runs dry (with EVENT_IDX, `avail_event` at the
//! next chain) and served again if the driver posted meanwhile; the receive queue's
//! notifications are the model's (it arms the queue only while a frame waits for buffers).
//! The host side ([`Link`]) is polled only while the model may read it: not while a frame
//! waits for the guest's buffers (the guest's kick wakes the loop then), so a busy TAP cannot
//! spin the service.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use pv_devices::virtio::net::BackendError;
use pv_devices::virtio::net::Counters;
use pv_devices::virtio::net::FrameIo;
use pv_devices::virtio::net::GuestOffloads;
use pv_devices::virtio::net::NetHeader;
use pv_devices::virtio::net::RxProgress;
use pv_devices::virtio::net::TxProgress;
use pv_devices::virtio::net::VirtioNet;
use pv_devices::virtio::net::QUEUES;
use pv_devices::virtio::net::RX_QUEUE;
use pv_devices::virtio::net::TX_QUEUE;
use pv_vhost_user::Ring;
use pv_vhost_user::VirtioDevice;

use crate::responder::Responder;
use crate::tap::TapLink;

/// How soon a transmit the back end refused is tried again (a TAP's queue frees as the host
/// reads it; there is no readiness to wait on that every back end has).
pub const BLOCKED_RETRY: Duration = Duration::from_millis(1);

/// The host side of the NIC, as the loop sees it.
pub trait Link: FrameIo {
    /// The descriptor that polls readable when frames wait for the guest, if there is one.
    fn readable_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Whether frames for the guest are known to wait without looking at a descriptor (a
    /// back end in this process that answered what the guest sent).
    fn has_frames(&self) -> bool;
}

/// The back ends the service has: a TAP the microkernel granted, or the in-service
/// responder when it granted none.
#[derive(Debug)]
pub enum HostLink {
    Tap(TapLink),
    Responder(Responder),
}

impl FrameIo for HostLink {
    fn carries_headers(&self) -> bool {
        match self {
            HostLink::Tap(t) => t.carries_headers(),
            HostLink::Responder(r) => r.carries_headers(),
        }
    }

    fn accept_offloads(&mut self, offloads: GuestOffloads) -> Result<(), BackendError> {
        match self {
            HostLink::Tap(t) => t.accept_offloads(offloads),
            HostLink::Responder(r) => r.accept_offloads(offloads),
        }
    }

    fn send(&mut self, header: &NetHeader, frame: &[u8]) -> Result<(), BackendError> {
        match self {
            HostLink::Tap(t) => t.send(header, frame),
            HostLink::Responder(r) => r.send(header, frame),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(NetHeader, usize)>, BackendError> {
        match self {
            HostLink::Tap(t) => t.recv(buf),
            HostLink::Responder(r) => r.recv(buf),
        }
    }
}

impl Link for HostLink {
    fn readable_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            HostLink::Tap(t) => Some(t.fd()),
            HostLink::Responder(_) => None,
        }
    }

    fn has_frames(&self) -> bool {
        match self {
            HostLink::Tap(_) => false,
            HostLink::Responder(r) => r.has_frames(),
        }
    }
}

/// The virtio-net device of one vhost-user listener.
pub struct NetDevice<L: Link> {
    net: VirtioNet<L>,
    /// The model may read the host side: the receive queue was served and no frame waits for
    /// buffers.
    reading: bool,
    /// The back end refused a transmitted frame; it is tried again after [`BLOCKED_RETRY`].
    tx_blocked: bool,
    /// The last receive failure logged (each different one once).
    last_rx_failure: Option<String>,
}

impl<L: Link> NetDevice<L> {
    pub fn new(net: VirtioNet<L>) -> NetDevice<L> {
        NetDevice {
            net,
            reading: false,
            tx_blocked: false,
            last_rx_failure: None,
        }
    }

    pub fn counters(&self) -> &Counters {
        self.net.counters()
    }

    pub fn link(&mut self) -> &mut L {
        self.net.backend()
    }

    pub fn last_problem(&self) -> Option<&str> {
        self.net.last_problem()
    }

    /// Whether a frame from the host waits for the guest's receive buffers (the host side
    /// is then not read).
    pub fn has_waiting_frame(&self) -> bool {
        self.net.has_waiting_frame()
    }

    fn serve_rx(&mut self, ring: &mut Ring<'_>) -> Result<bool, String> {
        let (mem, queue) = ring.parts();
        let report = self.net.process_rx(mem, queue).map_err(|e| e.to_string())?;
        if report.notify {
            ring.notify();
        }
        self.reading = matches!(report.progress, RxProgress::Idle | RxProgress::More);
        match report.progress {
            RxProgress::More => Ok(true),
            RxProgress::BackendFailed(why) => {
                if self.last_rx_failure.as_deref() != Some(why.as_str()) {
                    tracing::warn!("receiving from the host side stopped: {why}");
                    self.last_rx_failure = Some(why);
                }
                Ok(false)
            }
            RxProgress::Idle | RxProgress::WaitingForBuffers => Ok(false),
        }
    }

    fn serve_tx(&mut self, ring: &mut Ring<'_>) -> Result<bool, String> {
        let sent_before = self.net.counters().tx_frames;
        self.tx_blocked = false;
        let more = loop {
            let (mem, queue) = ring.parts();
            let report = self.net.process_tx(mem, queue).map_err(|e| e.to_string())?;
            if report.notify {
                ring.notify();
            }
            match report.progress {
                TxProgress::More => break true,
                TxProgress::Blocked => {
                    self.tx_blocked = true;
                    break false;
                }
                TxProgress::Idle => {
                    if !ring.rearm()? {
                        break false;
                    }
                }
            }
        };
        // What the guest sent may have been answered in this process: serve the receive
        // queue again at once.
        let answered =
            self.net.counters().tx_frames != sent_before && self.net.backend().has_frames();
        Ok(more || answered)
    }
}

impl<L: Link> VirtioDevice for NetDevice<L> {
    fn features(&self) -> u64 {
        self.net.features()
    }

    fn acknowledge(&mut self, features: u64) {
        self.net.set_acked_features(features);
    }

    fn config(&self) -> Vec<u8> {
        self.net.config().to_vec()
    }

    fn queues(&self) -> u16 {
        QUEUES
    }

    fn wants_inflight_record(&self) -> bool {
        false
    }

    fn serve(&mut self, ring: &mut Ring<'_>) -> Result<bool, String> {
        match u16::try_from(ring.index()) {
            Ok(RX_QUEUE) => self.serve_rx(ring),
            Ok(TX_QUEUE) => self.serve_tx(ring),
            _ => Ok(false),
        }
    }

    fn stopped(&mut self, index: usize) {
        if index == usize::from(RX_QUEUE) {
            self.reading = false;
        } else if index == usize::from(TX_QUEUE) {
            self.tx_blocked = false;
        }
    }

    fn reset(&mut self) {
        self.net.reset();
        self.reading = false;
        self.tx_blocked = false;
    }

    fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        match (self.reading, self.net_link().readable_fd()) {
            (true, Some(fd)) => vec![fd],
            _ => Vec::new(),
        }
    }

    fn wait_limit(&self) -> Option<Duration> {
        self.tx_blocked.then_some(BLOCKED_RETRY)
    }
}

impl<L: Link> NetDevice<L> {
    fn net_link(&self) -> &L {
        self.net.backend_ref()
    }
}
