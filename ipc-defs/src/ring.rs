//! The single-producer single-consumer frame ring, on memory shared with an untrusted peer.
//!
//! This module is the only place that touches ring memory. It never forms a Rust reference
//! to shared bytes (the peer may change them at any time); it reads and writes through raw
//! pointers and atomics, and it treats every value it reads as hostile: indices that cannot
//! be right, frames longer than the ring and frames larger than the caller's buffer are typed
//! errors ([`RingError`]), never a panic, an out-of-bounds access or a hang. (A frame's length
//! is checked against the ring, not against the producer's tail: the consumer does not read
//! the tail on its fast path, and a producer that lies about a length garbles only the frames
//! it sends itself.)
//!
//! Waking a sleeping peer needs an OS primitive (a futex on Linux), so the functions here
//! only *report* that a wake-up is due; the hosted layer performs it.

use core::marker::PhantomData;
use core::mem::offset_of;
use core::ptr::NonNull;
use core::sync::atomic::AtomicU32;
use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering;

use crate::layout::frame_footprint;
use crate::layout::ChannelHeader;
use crate::layout::ChannelLayout;
use crate::layout::ConsumerLine;
use crate::layout::Direction;
use crate::layout::Epoch;
use crate::layout::ProducerLine;
use crate::layout::RingHeader;
use crate::layout::RingInfo;
use crate::layout::ServerState;
use crate::layout::SleepLine;
use crate::layout::CHANNEL_MAGIC;
use crate::layout::FRAME_ALIGN;
use crate::layout::FRAME_HEADER_SIZE;
use crate::layout::LAYOUT_VERSION;
use crate::layout::RING_MAGIC;

/// What can go wrong moving a frame through a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The frame can never fit: `len` payload bytes need more than the ring's `capacity`.
    FrameTooLarge { len: usize, capacity: usize },
    /// No room right now; the consumer has not caught up.
    Full,
    /// The indices in shared memory are impossible (the peer wrote garbage or is not
    /// speaking this protocol). The ring is unusable until the supervisor resets it.
    Corrupt { head: u64, tail: u64 },
    /// A frame header claims `len` payload bytes, more than a ring of `available` bytes holds.
    BadLength { len: u32, available: u64 },
    /// The caller's buffer is smaller than the frame; the frame was skipped.
    BufferTooSmall { len: usize, buffer: usize },
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RingError::FrameTooLarge { len, capacity } => write!(
                f,
                "frame of {len} bytes can never fit a ring of {capacity} bytes; send bulk data through a shared region"
            ),
            RingError::Full => write!(f, "ring is full"),
            RingError::Corrupt { head, tail } => {
                write!(f, "ring indices are impossible (head {head}, tail {tail}): peer corrupted the ring")
            }
            RingError::BadLength { len, available } => write!(
                f,
                "frame header claims {len} bytes but the ring holds only {available}"
            ),
            RingError::BufferTooSmall { len, buffer } => {
                write!(f, "frame of {len} bytes does not fit a {buffer}-byte buffer")
            }
        }
    }
}

/// A received frame: where its payload went and which epoch its producer saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Received {
    pub len: usize,
    pub epoch: Epoch,
}

/// Whether an operation left a peer asleep that must now be woken (by the hosted layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Wake {
    None,
    /// Bump-and-wake was done on this futex word; the OS layer must wake its sleepers.
    Peer,
}

/// One ring of a channel, seen through a raw mapping that lives at least for `'a`.
#[derive(Clone, Copy, Debug)]
pub struct Ring<'a> {
    header: NonNull<u8>,
    data: NonNull<u8>,
    capacity: usize,
    _mapping: PhantomData<&'a [u8]>,
}

// SAFETY: a Ring is a pair of pointers into a shared mapping that outlives it (the lifetime,
// from the contract of `Channel::from_raw`); all accesses through it are atomic or raw-pointer
// copies of plain bytes, so moving it to another thread is as safe as the mapping itself.
unsafe impl Send for Ring<'_> {}

/// A whole channel region (its header and its two rings), mapped for at least `'a`.
#[derive(Clone, Copy, Debug)]
pub struct Channel<'a> {
    base: NonNull<u8>,
    layout: ChannelLayout,
    _mapping: PhantomData<&'a [u8]>,
}

// SAFETY: as for `Ring`: only atomics and raw copies go through the pointer.
unsafe impl Send for Channel<'_> {}

impl<'a> Channel<'a> {
    /// Views an initialised channel region.
    ///
    /// # Safety
    /// `base` must point to a mapping of at least `layout.region_size()` bytes, aligned to 64,
    /// that stays mapped for all of `'a` (the lifetime then bounds every [`Ring`] taken from
    /// it). The contents may be changed concurrently by other processes.
    pub unsafe fn from_raw(base: NonNull<u8>, layout: ChannelLayout) -> Channel<'a> {
        Channel {
            base,
            layout,
            _mapping: PhantomData,
        }
    }

    pub fn layout(&self) -> ChannelLayout {
        self.layout
    }

    fn header_u32(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: `offset` is a field offset inside ChannelHeader, which is at the start of a
        // live mapping (contract of `from_raw`), 4-aligned; AtomicU32 has u32's layout and
        // shared memory may only be accessed atomically, which is what this does.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast::<u32>()) }
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        Epoch(
            self.header_u32(offset_of!(ChannelHeader, epoch))
                .load(Ordering::Acquire),
        )
    }

    /// Sets a new epoch (supervisor only).
    pub fn set_epoch(&self, epoch: Epoch) {
        self.header_u32(offset_of!(ChannelHeader, epoch))
            .store(epoch.0, Ordering::Release);
    }

    /// Whether a server process is running (as recorded by the supervisor).
    pub fn server_state(&self) -> ServerState {
        match self
            .header_u32(offset_of!(ChannelHeader, server_state))
            .load(Ordering::Acquire)
        {
            1 => ServerState::Up,
            2 => ServerState::Gone,
            3 => ServerState::Unresponsive,
            _ => ServerState::Down,
        }
    }

    /// Records whether a server runs (supervisor only).
    pub fn set_server_state(&self, state: ServerState) {
        self.header_u32(offset_of!(ChannelHeader, server_state))
            .store(state as u32, Ordering::Release);
    }

    /// Supervisor: rewrites the header's static fields (magic, version, ring capacities),
    /// which a peer may have scribbled over, from the layout the supervisor sized the region
    /// with; the epoch and the server state are left as they are.
    pub fn repair_header(&self) {
        self.header_u32(offset_of!(ChannelHeader, magic))
            .store(CHANNEL_MAGIC, Ordering::Relaxed);
        self.header_u32(offset_of!(ChannelHeader, version))
            .store(LAYOUT_VERSION, Ordering::Relaxed);
        self.header_u32(offset_of!(ChannelHeader, ring_capacity))
            .store(self.layout.ring_capacity, Ordering::Relaxed);
        for dir in [Direction::Requests, Direction::Responses] {
            let ring = self.ring(dir);
            ring.u32_at(offset_of!(RingHeader, info) + offset_of!(RingInfo, magic))
                .store(RING_MAGIC, Ordering::Relaxed);
            ring.u32_at(offset_of!(RingHeader, info) + offset_of!(RingInfo, capacity))
                .store(self.layout.ring_capacity, Ordering::Release);
        }
    }

    /// Supervisor: one end of the channel died, the end that consumed `consumed`. Repairs the
    /// header, drops what it left unread on the ring it consumed, points the ring it produced
    /// at the slot its peer waits at, moves the channel to a new epoch and bumps every wake
    /// word (the caller then wakes the sleepers its platform has). Returns the new epoch.
    pub fn restart_epoch(&self, consumed: Direction) -> Epoch {
        let produced = match consumed {
            Direction::Requests => Direction::Responses,
            Direction::Responses => Direction::Requests,
        };
        self.repair_header();
        let _ = self.ring(consumed).discard_all();
        let _ = self.ring(produced).recover_producer();
        let next = self.epoch().next();
        self.set_epoch(next);
        for dir in [Direction::Requests, Direction::Responses] {
            self.ring(dir).bump_all();
        }
        next
    }

    /// The ring for `dir`.
    pub fn ring(&self, dir: Direction) -> Ring<'a> {
        // SAFETY: both offsets are inside the region (ChannelLayout computes them from the
        // same capacity that sized the region, per `from_raw`'s contract).
        unsafe {
            Ring {
                header: self.base.add(self.layout.ring_header(dir)),
                data: self.base.add(self.layout.ring_data(dir)),
                capacity: self.layout.ring_capacity as usize,
                _mapping: PhantomData,
            }
        }
    }
}

impl Ring<'_> {
    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: offset is a field offset inside RingHeader (8-aligned, since the header is
        // 64-aligned and the fields are u64 at 8-aligned offsets), within the live mapping.
        unsafe { AtomicU64::from_ptr(self.header.as_ptr().add(offset).cast::<u64>()) }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: as for `u64_at`, for u32 fields at 4-aligned offsets.
        unsafe { AtomicU32::from_ptr(self.header.as_ptr().add(offset).cast::<u32>()) }
    }

    fn tail(&self) -> &AtomicU64 {
        self.u64_at(offset_of!(RingHeader, producer) + offset_of!(ProducerLine, tail))
    }

    fn cached_head(&self) -> &AtomicU64 {
        self.u64_at(offset_of!(RingHeader, producer) + offset_of!(ProducerLine, cached_head))
    }

    fn head(&self) -> &AtomicU64 {
        self.u64_at(offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, head))
    }

    fn read_pos(&self) -> &AtomicU64 {
        self.u64_at(offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, read))
    }

    /// The futex word a sleeping consumer waits on.
    pub fn data_seq(&self) -> &AtomicU32 {
        self.u32_at(offset_of!(RingHeader, producer) + offset_of!(ProducerLine, wake_seq))
    }

    fn consumer_sleeping(&self) -> &AtomicU32 {
        self.u32_at(offset_of!(RingHeader, sleep) + offset_of!(SleepLine, consumer_sleeping))
    }

    /// The futex word a producer waiting for space sleeps on.
    pub fn space_seq(&self) -> &AtomicU32 {
        self.u32_at(offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, space_seq))
    }

    fn producer_sleeping(&self) -> &AtomicU32 {
        self.u32_at(offset_of!(RingHeader, sleep) + offset_of!(SleepLine, producer_sleeping))
    }

    /// The stamp word of the frame slot at ring position `pos` (16-aligned).
    fn stamp_at(&self, pos: u64) -> &AtomicU64 {
        let offset = (pos % self.capacity as u64) as usize;
        // SAFETY: `pos` is 16-aligned (callers check) and the capacity is a multiple of 16, so
        // `offset + 8 <= capacity` and the word is 8-aligned inside the data area.
        unsafe { AtomicU64::from_ptr(self.data.as_ptr().add(offset).cast::<u64>()) }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Largest payload a single frame can carry.
    pub fn max_payload(&self) -> usize {
        self.capacity - FRAME_HEADER_SIZE
    }

    /// Bytes published but not consumed, checked for sanity.
    fn in_flight(&self, head: u64, tail: u64) -> Result<u64, RingError> {
        let used = tail.wrapping_sub(head);
        if used > self.capacity as u64
            || !head.is_multiple_of(FRAME_ALIGN as u64)
            || !tail.is_multiple_of(FRAME_ALIGN as u64)
        {
            return Err(RingError::Corrupt { head, tail });
        }
        Ok(used)
    }

    /// Whether a frame is waiting (cheap; for spinning: it reads only the slot the next frame
    /// arrives in). A misaligned position counts as "something to look at", so that the
    /// reader goes and reports it.
    pub fn has_data(&self) -> bool {
        let read = self.read_pos().load(Ordering::Relaxed);
        if !read.is_multiple_of(FRAME_ALIGN as u64) {
            return true;
        }
        // SeqCst: this load is the second half of the sleep handshake in `prepare_sleep`
        // (a plain load on x86, like Acquire).
        self.stamp_at(read).load(Ordering::SeqCst) == read.wrapping_add(1)
    }

    /// Copies `src` into the data area starting at byte position `pos`, wrapping at the end.
    fn write_wrapped(&self, pos: u64, src: &[u8]) {
        let start = (pos % self.capacity as u64) as usize;
        let first = src.len().min(self.capacity - start);
        // SAFETY: `start + first <= capacity` and `src.len() - first <= capacity` (callers
        // only write frames no larger than the capacity), so both copies stay inside the data
        // area of the live mapping; `src` is our own memory and cannot overlap shared memory.
        unsafe {
            core::ptr::copy_nonoverlapping(src.as_ptr(), self.data.as_ptr().add(start), first);
            core::ptr::copy_nonoverlapping(
                src.as_ptr().add(first),
                self.data.as_ptr(),
                src.len() - first,
            );
        }
    }

    /// Zeroes `len` bytes of the data area from byte position `pos`, wrapping at the end.
    fn zero_wrapped(&self, pos: u64, len: usize) {
        let len = len.min(self.capacity);
        let start = (pos % self.capacity as u64) as usize;
        let first = len.min(self.capacity - start);
        // SAFETY: as in `write_wrapped`, both ranges lie inside the data area.
        unsafe {
            core::ptr::write_bytes(self.data.as_ptr().add(start), 0, first);
            core::ptr::write_bytes(self.data.as_ptr(), 0, len - first);
        }
    }

    /// Copies bytes out of the data area from byte position `pos`, wrapping at the end.
    fn read_wrapped(&self, pos: u64, dst: &mut [u8]) {
        let start = (pos % self.capacity as u64) as usize;
        let first = dst.len().min(self.capacity - start);
        // SAFETY: as in `write_wrapped`: `dst.len() <= capacity`, so both source ranges lie
        // in the data area. The peer may be writing these bytes concurrently; they are plain
        // bytes (any value is valid) and the caller validates them after the copy.
        unsafe {
            core::ptr::copy_nonoverlapping(self.data.as_ptr().add(start), dst.as_mut_ptr(), first);
            core::ptr::copy_nonoverlapping(
                self.data.as_ptr(),
                dst.as_mut_ptr().add(first),
                dst.len() - first,
            );
        }
    }

    /// Producer side: publishes one frame if it fits now.
    pub fn try_send(&self, epoch: Epoch, payload: &[u8]) -> Result<Wake, RingError> {
        let footprint = frame_footprint(payload.len());
        if footprint > self.capacity || payload.len() > u32::MAX as usize {
            return Err(RingError::FrameTooLarge {
                len: payload.len(),
                capacity: self.capacity,
            });
        }
        let tail = self.tail().load(Ordering::Relaxed);
        let cap = self.capacity as u64;
        let mut head = self.cached_head().load(Ordering::Relaxed);
        let fits = |head: u64| -> Result<bool, RingError> {
            let used = self.in_flight(head, tail)?;
            Ok(cap - used >= footprint as u64)
        };
        if !fits(head).unwrap_or(false) {
            // Only now look at the consumer's line.
            head = self.head().load(Ordering::Acquire);
            self.cached_head().store(head, Ordering::Relaxed);
            if !fits(head)? {
                return Err(RingError::Full);
            }
        }
        self.write_wrapped(tail.wrapping_add(FRAME_HEADER_SIZE as u64), payload);
        let mut rest = [0u8; 8];
        rest[..4].copy_from_slice(&(payload.len() as u32).to_ne_bytes());
        rest[4..].copy_from_slice(&epoch.0.to_ne_bytes());
        self.write_wrapped(tail.wrapping_add(8), &rest);
        self.tail()
            .store(tail.wrapping_add(footprint as u64), Ordering::Release);
        // The stamp goes last: it is what the consumer waits for. The swap is a full barrier
        // (a locked instruction on x86, cheaper than a fence) that pairs with the fence in
        // `prepare_sleep`: either the consumer sees our stamp, or we see its sleeping flag.
        self.stamp_at(tail)
            .swap(tail.wrapping_add(1), Ordering::SeqCst);
        if self.consumer_sleeping().load(Ordering::SeqCst) != 0 {
            self.data_seq().fetch_add(1, Ordering::Release);
            return Ok(Wake::Peer);
        }
        Ok(Wake::None)
    }

    /// Consumer side: takes one frame into `buf` if one is there.
    ///
    /// What it reads is not handed back to the producer until [`Ring::release`], which also
    /// zeroes it (so that no stale byte can ever pass for a later stamp). The caller releases
    /// after it has answered, so that this work is not on the path between a frame's arrival
    /// and its answer.
    ///
    /// A malformed frame is consumed (skipped) together with everything published after it,
    /// so that the reader resynchronises instead of failing forever; the error says what was
    /// wrong.
    pub fn try_recv(&self, buf: &mut [u8]) -> Result<Option<Received>, RingError> {
        let read = self.read_pos().load(Ordering::Relaxed);
        if !read.is_multiple_of(FRAME_ALIGN as u64) {
            let tail = self.tail().load(Ordering::Acquire);
            let _ = self.skip_to(tail);
            return Err(RingError::Corrupt { head: read, tail });
        }
        if self.stamp_at(read).load(Ordering::Acquire) != read.wrapping_add(1) {
            return Ok(None);
        }
        let mut rest = [0u8; 8];
        self.read_wrapped(read.wrapping_add(8), &mut rest);
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let epoch = u32::from_ne_bytes([rest[4], rest[5], rest[6], rest[7]]);
        let footprint = frame_footprint(len as usize);
        if footprint > self.capacity {
            let tail = self.tail().load(Ordering::Acquire);
            let _ = self.skip_to(tail);
            return Err(RingError::BadLength {
                len,
                available: self.capacity as u64,
            });
        }
        if len as usize > buf.len() {
            let _ = self.skip_to(read.wrapping_add(footprint as u64));
            return Err(RingError::BufferTooSmall {
                len: len as usize,
                buffer: buf.len(),
            });
        }
        self.read_wrapped(
            read.wrapping_add(FRAME_HEADER_SIZE as u64),
            &mut buf[..len as usize],
        );
        self.read_pos()
            .store(read.wrapping_add(footprint as u64), Ordering::Relaxed);
        Ok(Some(Received {
            len: len as usize,
            epoch: Epoch(epoch),
        }))
    }

    /// Consumer side: zeroes what was read since the last release and hands it back to the
    /// producer. Returns whether a producer waiting for space must be woken.
    pub fn release(&self) -> Wake {
        let head = self.head().load(Ordering::Relaxed);
        let read = self.read_pos().load(Ordering::Relaxed);
        if head == read {
            return Wake::None;
        }
        let span = read.wrapping_sub(head);
        if span <= self.capacity as u64 {
            self.zero_wrapped(head, span as usize);
        } else {
            // Impossible positions (a corrupted line): scrub the whole area.
            self.zero_wrapped(0, self.capacity);
        }
        // A locked swap is the full barrier the sleep handshake needs, and cheaper than a
        // fence after a store.
        self.head().swap(read, Ordering::SeqCst);
        if self.producer_sleeping().load(Ordering::SeqCst) != 0 {
            self.space_seq().fetch_add(1, Ordering::Release);
            return Wake::Peer;
        }
        Wake::None
    }

    /// Consumer side: marks everything up to byte position `to` as read and releases it.
    fn skip_to(&self, to: u64) -> Wake {
        self.read_pos().store(to, Ordering::Relaxed);
        self.release()
    }

    /// Drops everything published so far. Used by the supervisor after the consumer died
    /// (nobody else consumes then), so that the next consumer starts clean.
    pub fn discard_all(&self) -> Wake {
        let tail = self.tail().load(Ordering::Acquire);
        self.skip_to(tail)
    }

    /// Repairs the producer's side after the producer died (used by the supervisor; nobody
    /// else produces then, while the consumer may still be reading).
    ///
    /// A producer can die between publishing its tail and stamping its frame. The consumer
    /// then waits at the first slot without a stamp; this walks the stamped frames from the
    /// consumer's position to that slot, makes it the tail (so that the next producer writes
    /// exactly where the consumer waits) and zeroes the free space beyond it (so that the
    /// dead producer's half-written bytes cannot pass for later stamps). Returns the new tail.
    pub fn recover_producer(&self) -> u64 {
        let head = self.head().load(Ordering::Acquire);
        let mut pos = self.read_pos().load(Ordering::Acquire);
        if !pos.is_multiple_of(FRAME_ALIGN as u64) || pos.wrapping_sub(head) > self.capacity as u64
        {
            pos = head.wrapping_sub(head % FRAME_ALIGN as u64);
        }
        let start = pos;
        while pos.wrapping_sub(start) < self.capacity as u64
            && self.stamp_at(pos).load(Ordering::Acquire) == pos.wrapping_add(1)
        {
            let mut len = [0u8; 4];
            self.read_wrapped(pos.wrapping_add(8), &mut len);
            let footprint = frame_footprint(u32::from_ne_bytes(len) as usize) as u64;
            if footprint > self.capacity as u64 {
                break;
            }
            pos = pos.wrapping_add(footprint);
        }
        let free = (self.capacity as u64).saturating_sub(pos.wrapping_sub(head));
        self.zero_wrapped(pos, free as usize);
        self.tail().store(pos, Ordering::Release);
        self.cached_head().store(head, Ordering::Release);
        pos
    }

    /// How far the consumer has taken frames off the ring (a byte position, as the tail): a
    /// frame that ends at or before it has been taken. The producer's view of the consumer's
    /// progress (as trustworthy as the consumer).
    pub fn read_position(&self) -> u64 {
        self.read_pos().load(Ordering::Acquire)
    }

    /// Bytes ever published and ever consumed, for statistics.
    pub fn counters(&self) -> (u64, u64) {
        (
            self.tail().load(Ordering::Relaxed),
            self.head().load(Ordering::Relaxed),
        )
    }

    /// Consumer side, before blocking: announces the sleep and returns the futex value to
    /// wait on, or `None` if data arrived meanwhile (then do not sleep).
    pub fn prepare_sleep(&self) -> Option<u32> {
        self.consumer_sleeping().swap(1, Ordering::SeqCst);
        let seq = self.data_seq().load(Ordering::SeqCst);
        if self.has_data() {
            self.consumer_sleeping().store(0, Ordering::Relaxed);
            return None;
        }
        Some(seq)
    }

    /// Consumer side, after waking.
    pub fn finish_sleep(&self) {
        self.consumer_sleeping().store(0, Ordering::Relaxed);
    }

    /// Producer side, before blocking on a full ring: like [`Ring::prepare_sleep`].
    pub fn prepare_space_sleep(&self, footprint: usize) -> Option<u32> {
        self.producer_sleeping().swap(1, Ordering::SeqCst);
        let seq = self.space_seq().load(Ordering::SeqCst);
        let tail = self.tail().load(Ordering::Relaxed);
        let head = self.head().load(Ordering::SeqCst);
        let free = (self.capacity as u64).saturating_sub(tail.wrapping_sub(head));
        if free >= footprint as u64 {
            self.producer_sleeping().store(0, Ordering::Relaxed);
            return None;
        }
        Some(seq)
    }

    /// Producer side, after waking.
    pub fn finish_space_sleep(&self) {
        self.producer_sleeping().store(0, Ordering::Relaxed);
    }

    /// Supervisor: wakes anyone asleep on this ring (both futex words), e.g. after an epoch
    /// change, so that they re-check the channel state.
    pub fn bump_all(&self) {
        self.data_seq().fetch_add(1, Ordering::Release);
        self.space_seq().fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests;
