//! Virtio device models over rust-vmm's split virtqueues (`virtio-queue`, guest memory through
//! `vm-memory`): what the storage and network services serve, on whichever transport (a
//! vhost-user front end's memory, or our partition's guest memory window). The transport
//! hands a model its queue and the memory the queue lives in; the model takes requests off
//! the queue, answers them in the guest's buffers and puts them on the used ring.
//!
//! - [`blk`]: virtio-blk over a [`crate::block::Disk`].
//! - [`scsi`]: virtio-scsi with one LUN, a [`crate::scsi::ScsiDisk`].
//! - [`net`]: virtio-net, one receive and one transmit queue, over a [`net::FrameIo`] that
//!   carries Ethernet frames (the service's TAP device).

use virtio_queue::DescriptorChain;
use virtio_queue::QueueT;
use vm_memory::GuestMemory;

pub mod blk;
pub mod net;
pub mod pci;
pub mod scsi;

/// VIRTIO_F_VERSION_1 (feature bit 32): a modern (1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_INDIRECT_DESC (bit 28): descriptor tables in guest memory (virtio-queue
/// follows them). Offered by the transport for every model.
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
/// VIRTIO_RING_F_EVENT_IDX (bit 29): the driver and device say when they want to be notified.
/// Offered by the transport; a model reads the queue's `event_idx_enabled` where it matters.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// What one request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// An error status went back to the guest, for this reason (for the service's log).
    Failed(String),
    /// The chain could not carry a status at all (no writable byte, or memory outside the
    /// guest's): it is returned with nothing written.
    Malformed(String),
}

/// Takes every chain available on `queue`, answers it with `answer` (the bytes it wrote into
/// the chain's buffers, and the outcome) and puts it on the used ring; the outcomes, in
/// order. Whether the driver wants an interrupt is the transport's to ask
/// (`QueueT::needs_notification`).
pub fn drain<'m, M: GuestMemory, Q: QueueT>(
    mem: &'m M,
    queue: &mut Q,
    mut answer: impl FnMut(DescriptorChain<&'m M>) -> (u32, Outcome),
) -> Vec<Outcome> {
    let mut outcomes = Vec::new();
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let (written, outcome) = answer(chain);
        if queue.add_used(mem, head, written).is_err() {
            outcomes.push(Outcome::Malformed(format!(
                "request {head}: the used ring is outside guest memory"
            )));
            break;
        }
        outcomes.push(outcome);
    }
    outcomes
}

/// The dirty-page bitmap slice a guest memory's buffers carry.
type Slice<'a, M> = <<M as GuestMemory>::Bitmap as vm_memory::bitmap::WithBitmapSlice<'a>>::S;

/// A chain's reader (what the driver gave) and writer (where the device answers).
type Parts<'a, M> = (
    virtio_queue::Reader<'a, Slice<'a, M>>,
    virtio_queue::Writer<'a, Slice<'a, M>>,
);

/// The device-readable and device-writable parts of `chain` (every buffer checked against
/// `mem`), or why the chain has none usable.
pub(crate) fn parts<'a, M: GuestMemory>(
    mem: &'a M,
    chain: DescriptorChain<&'a M>,
) -> Result<Parts<'a, M>, Outcome> {
    let reader = chain
        .clone()
        .reader(mem)
        .map_err(|e| Outcome::Malformed(format!("readable part: {e}")))?;
    let writer = chain
        .writer(mem)
        .map_err(|e| Outcome::Malformed(format!("writable part: {e}")))?;
    Ok((reader, writer))
}

/// Guest memory and descriptors for the models' tests.
#[cfg(test)]
pub(crate) mod testing {
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::GuestAddress;
    use vm_memory::GuestMemoryMmap;

    pub const NEXT: u16 = 1;
    pub const WRITE: u16 = 2;

    /// 4 MiB of guest memory; the mock queue sits at 0, buffers from 1 MiB.
    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }
}
