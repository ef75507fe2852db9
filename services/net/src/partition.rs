//! The virtio-net function on our own guest partition: a modern virtio PCI function
//! (`pv_devices::virtio::pci`: common configuration, ISR, device configuration and notify
//! areas in BAR 0, INTx only) in front of the same model and back end the vhost-user NIC uses
//! (`pv_devices::virtio::net::VirtioNet` over a [`Link`]).
//!
//! Where it sits, as the storage service's NVMe function does: intercept's host bridge
//! forwards its configuration accesses; BAR 0 is fixed at the manifest's `mmio` range and
//! its accesses come on the partition's channel; its interrupt is the line the manifest
//! gives the service (an eventfd the microkernel wired as a KVM irqfd), raised with the ISR's
//! queue bit; its queues and buffers may lie only in the guest memory the manifest grants
//! (`guest-memory = "shared-window"`), and anything else is a typed error, never followed.
//!
//! **Kicks without exits.** With a `doorbells` grant over the notify area (each queue's
//! notify register at its own address, [`pv_devices::virtio::pci::NOTIFY_MULTIPLIER`] apart),
//! every answer once the driver set DRIVER_OK asks the partition to arm them
//! ([`Next::Doorbells`]): a notify write then only signals the service's eventfd and the vCPU
//! goes on. The value written is lost on that path, which costs nothing here: a virtio
//! notification carries no data the device needs (the queue index is the address, and the
//! service looks at both queues on every signal anyway).
//!
//! **Restarts.** What the driver configured (the transport's state, the PCI command register,
//! each vCPU's last access and its answer) is checkpointed before an access is answered, in a
//! region the microkernel keeps across restarts. The queues' positions are not: between two
//! calls the model has every chain it took on the used ring (its "ring discipline"), so a
//! restarted process resumes each queue at the used index in guest memory. What a killed
//! process loses is what the back end held for the guest (a frame waiting for buffers, the
//! responder's unsent replies): frames a network may lose, which the guest's protocols resend.
//! A frame the killed process sent but had not yet returned to the used ring is sent again.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;

use ipc_defs::hosted::checkpoint::CheckpointArea;
use ipc_defs::hosted::checkpoint::CheckpointMemory;
use ipc_defs::services::guest::mask;
use ipc_defs::services::guest::Access;
use ipc_defs::services::guest::Next;
use ipc_defs::services::guest::Reply;
use ipc_defs::services::guest::Space;
use pv_devices::pci_function::FunctionState;
use pv_devices::pci_function::PciFunction;
use pv_devices::virtio::net::Counters;
use pv_devices::virtio::net::NetError;
use pv_devices::virtio::net::RxProgress;
use pv_devices::virtio::net::TxProgress;
use pv_devices::virtio::net::VirtioNet;
use pv_devices::virtio::net::QUEUES;
use pv_devices::virtio::net::RX_QUEUE;
use pv_devices::virtio::net::TX_QUEUE;
use pv_devices::virtio::pci::Event;
use pv_devices::virtio::pci::TransportState;
use pv_devices::virtio::pci::VirtioPci;
use pv_devices::virtio::pci::BAR_SIZE;
use pv_devices::virtio::pci::FEATURES_OK;
use pv_devices::virtio::VIRTIO_RING_F_EVENT_IDX;
use pv_devices::virtio::VIRTIO_RING_F_INDIRECT_DESC;
use serde::Deserialize;
use serde::Serialize;
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use crate::device::Link;

/// The largest ring the driver may set up for each queue (it may choose a smaller power of
/// two): 256 entries, QEMU's default for virtio-net.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio device type of a network card.
const VIRTIO_NET_DEVICE: u16 = 1;
/// PCI class 02:00:00: network controller, Ethernet.
const CLASS_ETHERNET: u32 = 0x02_00_00;

/// What went wrong with the guest's set-up or rings (for the log; the guest sees a queue that
/// is not served until it resets the device, never a crashed service).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PciNetError {
    #[error("the function cannot be made: {0}")]
    Setup(String),
    /// DRIVER_OK with a queue whose rings are not inside the guest memory the device may
    /// reach (or misaligned, or of a size the transport refused).
    #[error("{queue} queue not served: its rings (descriptors {desc:#x}, driver {driver:#x}, device {device:#x}, {size} entries) are outside the guest memory this device may reach")]
    RingsOutside {
        queue: &'static str,
        desc: u64,
        driver: u64,
        device: u64,
        size: u16,
    },
    /// The model stopped a queue (its ring is unusable) until the driver resets the device.
    #[error(transparent)]
    Ring(#[from] NetError),
    /// DRIVER_OK without FEATURES_OK kept: the driver never had its features accepted (or
    /// offered ones refused), so the device cannot know what header or buffers it uses.
    #[error("DRIVER_OK with device status {status:#x}, without FEATURES_OK: the queues are not served until the driver resets the device and negotiates")]
    FeaturesNotAccepted { status: u8 },
    /// The used index could not be read back on resuming after a restart.
    #[error("{queue} queue not resumed: its used index is unreadable: {why}")]
    Resume { queue: &'static str, why: String },
}

/// A vCPU's last access and what it was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct LastAccess {
    seq: u64,
    address: u64,
    write: bool,
    value: u64,
}

/// What a restarted process takes up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Checkpoint {
    transport: TransportState,
    pci: FunctionState,
    last: BTreeMap<u32, LastAccess>,
}

/// What the function did, for the service's log and the tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FunctionCounters {
    /// Notify writes that came as accesses (exits), not as doorbell signals.
    pub notify_exits: u64,
    /// Times the queues were looked at after a doorbell signal or a notify.
    pub kicks: u64,
    /// Accesses answered from the record (sent again after a restart).
    pub repeats: u64,
    /// Interrupts raised.
    pub interrupts: u64,
}

fn queue_name(n: u16) -> &'static str {
    if n == RX_QUEUE {
        "receive"
    } else {
        "transmit"
    }
}

/// The virtio-net function.
pub struct PciNet<M: CheckpointMemory, L: Link> {
    transport: VirtioPci,
    pci: PciFunction,
    net: VirtioNet<L>,
    memory: GuestMemoryMmap,
    /// The queues the driver enabled, from DRIVER_OK to its next reset (`None`: not set up,
    /// or stopped by an error until the reset).
    queues: [Option<Queue>; QUEUES as usize],
    irq: Option<File>,
    area: CheckpointArea<M>,
    last: BTreeMap<u32, LastAccess>,
    /// The service holds the doorbell eventfd: notify writes may come as its signals.
    doorbells: bool,
    /// The model may read the host side: the receive queue was served and no frame waits.
    reading: bool,
    /// The back end refused a frame; the transmit queue is tried again soon.
    tx_blocked: bool,
    /// The last receive failure logged (each different one once).
    last_rx_failure: Option<String>,
    counters: FunctionCounters,
    errors: Vec<PciNetError>,
    /// A process resumed from the checkpoint interrupts the driver once, whatever the
    /// queues' notification state says: its predecessor may have been killed between
    /// publishing used entries and raising the line, leaving a driver that waits for an
    /// interrupt that would otherwise never come (the entries are already past its
    /// `used_event`). A spurious interrupt costs the driver one look at its rings.
    owe_interrupt: bool,
}

impl<M: CheckpointMemory, L: Link> PciNet<M, L> {
    /// The function with BAR 0 at `bar`, reaching `memory` only, raising `irq` (its line
    /// and eventfd), resumed from `checkpoint` if an earlier process left one there.
    pub fn new(
        net: VirtioNet<L>,
        bar: u64,
        memory: GuestMemoryMmap,
        irq: Option<(u8, File)>,
        checkpoint: M,
        doorbells: bool,
    ) -> Result<PciNet<M, L>, PciNetError> {
        let offered = net.features() | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;
        let transport = VirtioPci::new(offered, &[QUEUE_SIZE; QUEUES as usize]);
        let capabilities =
            pv_devices::virtio::pci::capabilities(pv_devices::virtio::net::CONFIG_LEN as u32);
        let (line, irq) = match irq {
            Some((line, file)) => (line, Some(file)),
            None => (0xff, None),
        };
        let identity = pv_devices::virtio::pci::identity(VIRTIO_NET_DEVICE, CLASS_ETHERNET);
        let pci = PciFunction::new(identity, bar, BAR_SIZE, line, capabilities)
            .map_err(PciNetError::Setup)?;
        let mut function = PciNet {
            transport,
            pci,
            net,
            memory,
            queues: [None, None],
            irq,
            area: CheckpointArea::new(checkpoint),
            last: BTreeMap::new(),
            doorbells,
            reading: false,
            tx_blocked: false,
            last_rx_failure: None,
            counters: FunctionCounters::default(),
            errors: Vec::new(),
            owe_interrupt: false,
        };
        if let Some(c) = function.area.load::<Checkpoint>() {
            match function.transport.restore(c.transport) {
                Ok(()) => {
                    function.pci.restore(c.pci);
                    function.last = c.last;
                    if function.transport.driver_ok() {
                        function.start_queues(true);
                        function.owe_interrupt = true;
                    }
                    tracing::info!(
                        driver_ok = function.transport.driver_ok(),
                        "virtio-net function resumed from its checkpoint"
                    );
                }
                Err(e) => tracing::warn!(
                    "virtio-net checkpoint not taken up ({e}): the function starts reset"
                ),
            }
        }
        Ok(function)
    }

    pub fn counters(&self) -> &FunctionCounters {
        &self.counters
    }

    /// The model's counters (frames and drops each way).
    pub fn net_counters(&self) -> &Counters {
        self.net.counters()
    }

    pub fn link(&mut self) -> &mut L {
        self.net.backend()
    }

    pub fn last_problem(&self) -> Option<&str> {
        self.net.last_problem()
    }

    /// The errors met since the last look, for the log.
    pub fn take_errors(&mut self) -> Vec<PciNetError> {
        std::mem::take(&mut self.errors)
    }

    /// The host side's descriptor, while frames from it may be delivered (the loop waits on
    /// it then, and not while a frame waits for the guest's buffers).
    pub fn host_fd(&self) -> Option<BorrowedFd<'_>> {
        if self.reading {
            self.net.backend_ref().readable_fd()
        } else {
            None
        }
    }

    /// The back end refused a transmitted frame: call [`Self::serve_queues`] again soon.
    pub fn tx_blocked(&self) -> bool {
        self.tx_blocked
    }

    /// What the vCPU does after an access: resume, and (with doorbells) whether notify
    /// writes should come as signals: from DRIVER_OK until the reset.
    fn next(&self) -> Next {
        if self.doorbells {
            Next::Doorbells {
                armed: self.transport.driver_ok(),
            }
        } else {
            Next::Resume
        }
    }

    fn checkpoint(&mut self) {
        let checkpoint = Checkpoint {
            transport: self.transport.state(),
            pci: self.pci.state(),
            last: self.last.clone(),
        };
        if let Err(e) = self.area.store(&checkpoint) {
            tracing::error!("virtio-net checkpoint not written: {e}");
        }
    }

    /// Answers one access of the partition (recorded and checkpointed before the answer
    /// leaves). A notify write only marks the queues for [`Self::serve_queues`].
    pub fn access(&mut self, a: Access) -> Reply {
        let write = a.write.is_some();
        if let Some(l) = self.last.get(&a.vcpu) {
            if l.seq == a.seq && l.address == a.address && l.write == write {
                self.counters.repeats += 1;
                tracing::info!(
                    vcpu = a.vcpu,
                    seq = a.seq,
                    "access answered from the record (sent again after a restart)"
                );
                return Reply {
                    value: l.value,
                    next: self.next(),
                };
            }
        }
        let value = match (a.space, a.written()) {
            _ if !a.size_is_valid() => mask(a.size),
            (Space::PciConfig, None) => self.pci.read(a.address & 0xff, a.size),
            (Space::PciConfig, Some(v)) => {
                self.pci.write(a.address & 0xff, a.size, v);
                0
            }
            (Space::Mmio, None) => match self.pci.bar_offset(a.address) {
                Some(offset) => self.transport.read(offset, a.size, &self.net.config()),
                None => mask(a.size),
            },
            (Space::Mmio, Some(v)) => {
                if let Some(offset) = self.pci.bar_offset(a.address) {
                    let event = self.transport.write(offset, a.size, v);
                    self.apply(event);
                }
                0
            }
            // Ports: the function has none.
            (Space::Port, None) => mask(a.size),
            (Space::Port, Some(_)) => 0,
        };
        self.last.insert(
            a.vcpu,
            LastAccess {
                seq: a.seq,
                address: a.address,
                write,
                value,
            },
        );
        self.checkpoint();
        Reply {
            value,
            next: self.next(),
        }
    }

    /// What a write to BAR 0 asks of the device.
    fn apply(&mut self, event: Event) {
        match event {
            Event::Notify(_) => self.counters.notify_exits += 1,
            Event::Reset => {
                self.net.reset();
                self.queues = [None, None];
                self.reading = false;
                self.tx_blocked = false;
            }
            Event::DriverOk => self.start_queues(false),
            // virtio-net's configuration is read-only for a modern driver.
            Event::DeviceConfig { .. } | Event::None => {}
        }
    }

    /// Makes the queues the driver enabled, with the features it accepted; `resume`: at the
    /// used index in guest memory (a restarted process), else at 0.
    fn start_queues(&mut self, resume: bool) {
        self.queues = [None, None];
        self.reading = false;
        let status = self.transport.status();
        if status & FEATURES_OK == 0 {
            // The features written were never checked against the offered ones: none is
            // taken up.
            self.errors
                .push(PciNetError::FeaturesNotAccepted { status });
            return;
        }
        self.net
            .set_acked_features(self.transport.driver_features());
        for n in [RX_QUEUE, TX_QUEUE] {
            let slot = usize::from(n);
            self.queues[slot] = None;
            let Some(config) = self.transport.queue_config(n) else {
                continue;
            };
            let Some(mut queue) = self.transport.queue(n, &self.memory) else {
                self.errors.push(PciNetError::RingsOutside {
                    queue: queue_name(n),
                    desc: config.desc,
                    driver: config.driver,
                    device: config.device,
                    size: config.size,
                });
                continue;
            };
            if resume {
                match queue.used_idx(&self.memory, Ordering::Acquire) {
                    Ok(used) => {
                        queue.set_next_avail(used.0);
                        queue.set_next_used(used.0);
                    }
                    Err(e) => {
                        self.errors.push(PciNetError::Resume {
                            queue: queue_name(n),
                            why: e.to_string(),
                        });
                        continue;
                    }
                }
            }
            self.queues[slot] = Some(queue);
        }
        self.reading = self.queues[usize::from(RX_QUEUE)].is_some();
    }

    /// Serves both queues: sends what the driver posted, delivers what the host side has for
    /// the guest, and raises the interrupt if the driver wants one. True when more work
    /// waits (call again before waiting).
    pub fn serve_queues(&mut self) -> bool {
        if !self.transport.driver_ok() || !self.pci.bus_master() {
            return false;
        }
        self.counters.kicks += 1;
        let mut notify = false;
        let mut more = false;
        let sent_before = self.net.counters().tx_frames;
        self.tx_blocked = false;
        if let Some(queue) = self.queues[usize::from(TX_QUEUE)].as_mut() {
            let stopped = loop {
                match self.net.process_tx(&self.memory, queue) {
                    Ok(report) => {
                        notify |= report.notify;
                        match report.progress {
                            TxProgress::More => {
                                more = true;
                                break None;
                            }
                            TxProgress::Blocked => {
                                self.tx_blocked = true;
                                break None;
                            }
                            // Asks for the next kick (with EVENT_IDX at the next chain); what
                            // the driver posted meanwhile is served now.
                            TxProgress::Idle => match queue.enable_notification(&self.memory) {
                                Ok(true) => continue,
                                Ok(false) => break None,
                                Err(e) => {
                                    break Some(PciNetError::Ring(NetError::Ring {
                                        queue: "transmit",
                                        why: format!("arming notifications: {e}"),
                                    }))
                                }
                            },
                        }
                    }
                    Err(e) => break Some(PciNetError::Ring(e)),
                }
            };
            if let Some(e) = stopped {
                self.errors.push(e);
                self.queues[usize::from(TX_QUEUE)] = None;
            }
        }
        if let Some(queue) = self.queues[usize::from(RX_QUEUE)].as_mut() {
            match self.net.process_rx(&self.memory, queue) {
                Ok(report) => {
                    notify |= report.notify;
                    self.reading = matches!(report.progress, RxProgress::Idle | RxProgress::More);
                    match report.progress {
                        RxProgress::More => more = true,
                        RxProgress::BackendFailed(why) => {
                            if self.last_rx_failure.as_deref() != Some(why.as_str()) {
                                tracing::warn!("receiving from the host side stopped: {why}");
                                self.last_rx_failure = Some(why);
                            }
                        }
                        RxProgress::Idle | RxProgress::WaitingForBuffers => {}
                    }
                }
                Err(e) => {
                    self.errors.push(PciNetError::Ring(e));
                    self.queues[usize::from(RX_QUEUE)] = None;
                    self.reading = false;
                }
            }
        }
        if notify || std::mem::take(&mut self.owe_interrupt) {
            self.interrupt();
        }
        // What the guest sent may have been answered in this process: serve again at once.
        let answered =
            self.net.counters().tx_frames != sent_before && self.net.backend_ref().has_frames();
        more || answered
    }

    /// Sets the ISR's queue bit (checkpointed: a restarted process still answers the INTx
    /// handler's read) and pulses the line, unless the driver masked INTx.
    fn interrupt(&mut self) {
        self.transport.raise(false);
        self.checkpoint();
        if self.pci.interrupt_disabled() {
            return;
        }
        if let Some(irq) = self.irq.as_mut() {
            let _ = irq.write_all(&1u64.to_ne_bytes());
            self.counters.interrupts += 1;
        }
    }
}

#[cfg(test)]
mod tests;
