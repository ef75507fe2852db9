//! Storage's devices on the shared vhost-user transport (`pv_vhost_user`): virtio-blk and
//! virtio-scsi over a disk, each request answered on its own and kept in the in-flight record
//! while it is, so that a restarted service answers exactly the requests its predecessor left
//! unanswered (block reads and writes may be replayed; the record makes sure they are, once).

use pv_devices::block::Disk;
use pv_devices::virtio::blk::VirtioBlk;
use pv_devices::virtio::scsi::VirtioScsi;
use pv_vhost_user::Ring;
use pv_vhost_user::VirtioDevice;

/// Request queues a virtio-blk front end may use (QEMU uses one per vCPU by default).
pub const BLK_QUEUES: u16 = 8;
/// Request queues of virtio-scsi (after its control and event queues).
pub const SCSI_REQUEST_QUEUES: u16 = 8;

/// A disk's device model behind a vhost-user socket.
pub enum Device {
    Blk(VirtioBlk<Box<dyn Disk + Send>>),
    Scsi(VirtioScsi<Box<dyn Disk + Send>>),
}

impl VirtioDevice for Device {
    fn features(&self) -> u64 {
        match self {
            Device::Blk(d) => d.features(),
            Device::Scsi(d) => d.features(),
        }
    }

    fn config(&self) -> Vec<u8> {
        match self {
            Device::Blk(d) => d.config().to_vec(),
            Device::Scsi(d) => d.config().to_vec(),
        }
    }

    fn queues(&self) -> u16 {
        match self {
            Device::Blk(_) => BLK_QUEUES,
            Device::Scsi(_) => 2 + SCSI_REQUEST_QUEUES,
        }
    }

    fn wants_inflight_record(&self) -> bool {
        true
    }

    /// virtio-scsi's event queue holds buffers for events the device would send: it has none
    /// to send.
    fn answers(&self, queue: usize) -> bool {
        !matches!(self, Device::Scsi(_) if queue == 1)
    }

    fn serve(&mut self, ring: &mut Ring<'_>) -> Result<bool, String> {
        let queue = ring.index();
        match self {
            Device::Blk(d) => ring.answer_each(|mem, chain| d.answer(mem, chain)),
            Device::Scsi(_) if queue == 0 => {
                ring.answer_each(pv_devices::virtio::scsi::answer_control)
            }
            Device::Scsi(d) => ring.answer_each(|mem, chain| d.answer_request(mem, chain)),
        }
    }
}
