//! The split ring work the model does itself, beyond virtio-queue's `Queue`: walking a chain
//! to its end, publishing several used entries with one index store, arming the receive
//! queue at the index the device saw, and the interrupt decision over all of them.

use std::sync::atomic::fence;
use std::sync::atomic::Ordering;

use virtio_queue::DescriptorChain;
use virtio_queue::QueueT;
use vm_memory::Address;
use vm_memory::Bytes;
use vm_memory::GuestAddress;
use vm_memory::GuestMemory;

use super::ring;
use super::Direction;
use super::NetError;
use super::Writer;
use super::RX;

/// A chain's bytes by direction, once walked to its end.
#[derive(Default)]
pub(super) struct Shape {
    pub(super) readable: u64,
    pub(super) writable: u64,
}

/// Walks `chain` (virtio-queue stops a walk silently at a loop, a `next` past the table, an
/// unreadable descriptor or a second level of indirection): a chain whose last descriptor
/// still says NEXT did not end, and is malformed.
pub(super) fn shape<M: GuestMemory>(chain: &DescriptorChain<&M>) -> Result<Shape, String> {
    let mut shape = Shape::default();
    let mut continues = None;
    for desc in chain.clone() {
        let len = u64::from(desc.len());
        if desc.is_write_only() {
            shape.writable += len;
        } else {
            shape.readable += len;
        }
        continues = Some(desc.has_next());
    }
    match continues {
        None => Err(format!(
            "chain {}: no descriptor (its table is outside guest memory or misformed)",
            chain.head_index()
        )),
        Some(true) => Err(format!(
            "chain {}: does not end (a loop, a next index past its table, or a bad indirect table)",
            chain.head_index()
        )),
        Some(false) => Ok(shape),
    }
}

/// A receive chain's writer: every byte device-writable, room for the header at least (5.1.6.3:
/// with MRG_RXBUF each buffer holds a header).
pub(super) fn receive_buffer<'a, M: GuestMemory>(
    mem: &'a M,
    chain: DescriptorChain<&'a M>,
    header_len: usize,
) -> Result<Writer<'a, M>, String> {
    let shape = shape(&chain)?;
    if shape.readable != 0 {
        return Err(format!(
            "{} device-readable bytes in a receive buffer",
            shape.readable
        ));
    }
    if shape.writable < header_len as u64 {
        return Err(format!(
            "{} bytes, less than the {header_len}-byte header",
            shape.writable
        ));
    }
    chain
        .writer(mem)
        .map_err(|e| format!("a buffer outside guest memory: {e}"))
}

/// The available index, and how many chains wait behind `next_avail` (at most the queue's size).
pub(super) fn available<M: GuestMemory, Q: QueueT>(
    mem: &M,
    queue: &Q,
    direction: Direction,
) -> Result<(u16, u16), NetError> {
    if !queue.ready() {
        return Err(ring(direction, "the queue is not ready".into()));
    }
    let idx = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| ring(direction, format!("available index: {e}")))?
        .0;
    let waiting = idx.wrapping_sub(queue.next_avail());
    if waiting > queue.size() {
        return Err(ring(
            direction,
            format!(
                "the driver says {waiting} chains wait on a ring of {}",
                queue.size()
            ),
        ));
    }
    Ok((idx, waiting))
}

/// The next chain, which `available` announced; its head is inside the ring (so it can be
/// returned).
pub(super) fn pop<'m, M: GuestMemory, Q: QueueT>(
    mem: &'m M,
    queue: &mut Q,
    direction: Direction,
) -> Result<DescriptorChain<&'m M>, NetError> {
    let chain = queue.pop_descriptor_chain(mem).ok_or_else(|| {
        ring(
            direction,
            "a chain the available index announced is not there".into(),
        )
    })?;
    if chain.head_index() >= queue.size() {
        return Err(ring(
            direction,
            format!(
                "chain head {} is past the ring of {}",
                chain.head_index(),
                queue.size()
            ),
        ));
    }
    Ok(chain)
}

/// Bytes of the used ring's header (flags, idx), of one used element (id, len), of the avail
/// ring's header and of one of its entries.
const USED_HEADER: u64 = 4;
const USED_ELEMENT: u64 = 8;
const AVAIL_HEADER: u64 = 4;
const AVAIL_ENTRY: u64 = 2;

/// Puts `entries` (head, used length) on the used ring and makes them visible together, with
/// one store of the used index.
pub(super) fn publish<M: GuestMemory, Q: QueueT>(
    mem: &M,
    queue: &mut Q,
    entries: &[(u16, u32)],
) -> Result<(), NetError> {
    let used = GuestAddress(queue.used_ring());
    let size = queue.size();
    let base = queue.next_used();
    let outside = |e: String| ring(RX, format!("used ring: {e}"));
    for (i, (head, len)) in entries.iter().enumerate() {
        let slot = u64::from(base.wrapping_add(i as u16) % size);
        let addr = used
            .checked_add(USED_HEADER + USED_ELEMENT * slot)
            .ok_or_else(|| outside("past the end of the address space".into()))?;
        let mut element = [0u8; USED_ELEMENT as usize];
        element[..4].copy_from_slice(&u32::from(*head).to_le_bytes());
        element[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&element, addr)
            .map_err(|e| outside(e.to_string()))?;
    }
    // At most a ring's worth of entries, which fits the u16 index's arithmetic.
    let next = base.wrapping_add(entries.len() as u16);
    let idx = used
        .checked_add(2)
        .ok_or_else(|| outside("past the end of the address space".into()))?;
    mem.store(next.to_le(), idx, Ordering::Release)
        .map_err(|e| outside(e.to_string()))?;
    queue.set_next_used(next);
    Ok(())
}

/// Asks the driver to notify when it posts past `seen`: with EVENT_IDX, `avail_event` at the
/// available index the device saw (virtio-queue's `enable_notification` would put it at
/// `next_avail`, behind the chains put back, where the driver's next post would not kick);
/// without, the used ring's NO_NOTIFY flag cleared.
pub(super) fn arm<M: GuestMemory, Q: QueueT>(
    mem: &M,
    queue: &mut Q,
    seen: u16,
) -> Result<(), NetError> {
    let failed = |e: String| ring(RX, format!("arming notifications: {e}"));
    if queue.event_idx_enabled() {
        let addr = GuestAddress(queue.used_ring())
            .checked_add(USED_HEADER + USED_ELEMENT * u64::from(queue.size()))
            .ok_or_else(|| failed("past the end of the address space".into()))?;
        mem.store(seen.to_le(), addr, Ordering::Relaxed)
            .map_err(|e| failed(e.to_string()))?;
    } else {
        queue
            .enable_notification(mem)
            .map_err(|e| failed(e.to_string()))?;
    }
    // The driver's post and this store race: the caller reads the available index after it.
    fence(Ordering::SeqCst);
    Ok(())
}

/// Whether the driver wants an interrupt for the used entries from `since` to `next_used`:
/// any, without EVENT_IDX; with it, when `used_event` is among them (vring_need_event).
pub(super) fn notify_needed<M: GuestMemory, Q: QueueT>(
    mem: &M,
    queue: &Q,
    since: u16,
    direction: Direction,
) -> Result<bool, NetError> {
    let now = queue.next_used();
    if now == since {
        return Ok(false);
    }
    if !queue.event_idx_enabled() {
        return Ok(true);
    }
    // The used entries are written before `used_event` is read.
    fence(Ordering::SeqCst);
    let addr = GuestAddress(queue.avail_ring())
        .checked_add(AVAIL_HEADER + AVAIL_ENTRY * u64::from(queue.size()))
        .ok_or_else(|| {
            ring(
                direction,
                "used_event is past the end of the address space".into(),
            )
        })?;
    let used_event = u16::from_le(
        mem.load(addr, Ordering::Relaxed)
            .map_err(|e| ring(direction, format!("used_event: {e}")))?,
    );
    Ok(now.wrapping_sub(used_event).wrapping_sub(1) < now.wrapping_sub(since))
}
