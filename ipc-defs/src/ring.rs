//! The single-producer single-consumer frame ring, on memory shared with an untrusted peer.
//!
//! This module is the only place that touches ring memory. It never forms a Rust reference
//! to shared bytes (the peer may change them at any time); it reads and writes through raw
//! pointers and atomics, and it treats every value it reads as hostile: indices that cannot
//! be right, frame lengths that point past what was published, and frames larger than the
//! ring are typed errors ([`RingError`]), never a panic, an out-of-bounds access or a hang.
//!
//! Waking a sleeping peer needs an OS primitive (a futex on Linux), so the functions here
//! only *report* that a wake-up is due; the hosted layer performs it.

use core::mem::offset_of;
use core::ptr::NonNull;
use core::sync::atomic::fence;
use core::sync::atomic::AtomicU32;
use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering;

use crate::layout::frame_footprint;
use crate::layout::ChannelHeader;
use crate::layout::ChannelLayout;
use crate::layout::ConsumerLine;
use crate::layout::Direction;
use crate::layout::Epoch;
use crate::layout::FrameHeader;
use crate::layout::ProducerLine;
use crate::layout::RingHeader;
use crate::layout::ServerState;
use crate::layout::FRAME_ALIGN;
use crate::layout::FRAME_HEADER_SIZE;

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
    /// A frame header claims `len` payload bytes but only `available` were published.
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
                "frame header claims {len} bytes but only {available} were published"
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

/// One ring of a channel, seen through a raw mapping.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    header: NonNull<u8>,
    data: NonNull<u8>,
    capacity: usize,
}

// SAFETY: a Ring is a pair of pointers into a shared mapping that outlives it (the contract
// of `Channel::from_raw`); all accesses through it are atomic or raw-pointer copies of plain
// bytes, so moving it to another thread is as safe as the mapping itself.
unsafe impl Send for Ring {}

/// A whole channel region: its header and its two rings.
#[derive(Clone, Copy, Debug)]
pub struct Channel {
    base: NonNull<u8>,
    layout: ChannelLayout,
}

// SAFETY: as for `Ring`: only atomics and raw copies go through the pointer.
unsafe impl Send for Channel {}

impl Channel {
    /// Views an initialised channel region.
    ///
    /// # Safety
    /// `base` must point to a mapping of at least `layout.region_size()` bytes, aligned to 64,
    /// that stays mapped for as long as this value or any [`Ring`] taken from it is used.
    /// The contents may be changed concurrently by other processes.
    pub unsafe fn from_raw(base: NonNull<u8>, layout: ChannelLayout) -> Channel {
        Channel { base, layout }
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
            _ => ServerState::Down,
        }
    }

    /// Records whether a server runs (supervisor only).
    pub fn set_server_state(&self, state: ServerState) {
        self.header_u32(offset_of!(ChannelHeader, server_state))
            .store(state as u32, Ordering::Release);
    }

    /// The ring for `dir`.
    pub fn ring(&self, dir: Direction) -> Ring {
        // SAFETY: both offsets are inside the region (ChannelLayout computes them from the
        // same capacity that sized the region, per `from_raw`'s contract).
        unsafe {
            Ring {
                header: self.base.add(self.layout.ring_header(dir)),
                data: self.base.add(self.layout.ring_data(dir)),
                capacity: self.layout.ring_capacity as usize,
            }
        }
    }
}

impl Ring {
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

    fn head(&self) -> &AtomicU64 {
        self.u64_at(offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, head))
    }

    /// The futex word a sleeping consumer waits on.
    pub fn data_seq(&self) -> &AtomicU32 {
        self.u32_at(offset_of!(RingHeader, producer) + offset_of!(ProducerLine, wake_seq))
    }

    fn consumer_sleeping(&self) -> &AtomicU32 {
        self.u32_at(offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, sleeping))
    }

    /// The futex word a producer waiting for space sleeps on.
    pub fn space_seq(&self) -> &AtomicU32 {
        self.u32_at(offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, space_seq))
    }

    fn producer_sleeping(&self) -> &AtomicU32 {
        self.u32_at(offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, producer_sleeping))
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
            || head % FRAME_ALIGN as u64 != 0
            || tail % FRAME_ALIGN as u64 != 0
        {
            return Err(RingError::Corrupt { head, tail });
        }
        Ok(used)
    }

    /// Whether a frame is waiting (cheap; for spinning). Corrupt indices count as "something
    /// to look at", so that the reader goes and reports them.
    pub fn has_data(&self) -> bool {
        self.tail().load(Ordering::Acquire) != self.head().load(Ordering::Relaxed)
    }

    /// Copies `len` bytes from `src` into the data area starting at byte position `pos`,
    /// wrapping at the end.
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
        let head = self.head().load(Ordering::Acquire);
        let used = self.in_flight(head, tail)?;
        if self.capacity as u64 - used < footprint as u64 {
            return Err(RingError::Full);
        }
        let header = FrameHeader {
            len: payload.len() as u32,
            epoch: epoch.0,
        };
        self.write_wrapped(tail, zerocopy::IntoBytes::as_bytes(&header));
        self.write_wrapped(tail + FRAME_HEADER_SIZE as u64, payload);
        self.tail()
            .store(tail + footprint as u64, Ordering::Release);
        // Pairs with the fence in `prepare_sleep`: either the consumer sees our tail, or we
        // see its sleeping flag.
        fence(Ordering::SeqCst);
        if self.consumer_sleeping().load(Ordering::Relaxed) != 0 {
            self.data_seq().fetch_add(1, Ordering::Release);
            return Ok(Wake::Peer);
        }
        Ok(Wake::None)
    }

    /// Consumer side: takes one frame into `buf` if one is there.
    ///
    /// A malformed frame is consumed (skipped) together with everything after it, so that the
    /// reader resynchronises instead of failing forever; the error says what was wrong.
    pub fn try_recv(&self, buf: &mut [u8]) -> Result<Option<(Received, Wake)>, RingError> {
        let head = self.head().load(Ordering::Relaxed);
        let tail = self.tail().load(Ordering::Acquire);
        if head == tail {
            return Ok(None);
        }
        let available = match self.in_flight(head, tail) {
            Ok(n) => n,
            Err(e) => {
                let _ = self.discard_to(tail);
                return Err(e);
            }
        };
        let mut raw = [0u8; FRAME_HEADER_SIZE];
        self.read_wrapped(head, &mut raw);
        let header: FrameHeader = zerocopy::transmute!(raw);
        let FrameHeader { len, epoch } = header;
        let footprint = frame_footprint(len as usize) as u64;
        if footprint > available {
            let _ = self.discard_to(tail);
            return Err(RingError::BadLength { len, available });
        }
        if len as usize > buf.len() {
            let _ = self.discard_to(head + footprint);
            return Err(RingError::BufferTooSmall {
                len: len as usize,
                buffer: buf.len(),
            });
        }
        self.read_wrapped(head + FRAME_HEADER_SIZE as u64, &mut buf[..len as usize]);
        let wake = self.discard_to(head + footprint);
        Ok(Some((
            Received {
                len: len as usize,
                epoch: Epoch(epoch),
            },
            wake,
        )))
    }

    /// Consumer side: marks everything up to byte position `to` as consumed.
    fn discard_to(&self, to: u64) -> Wake {
        self.head().store(to, Ordering::Release);
        fence(Ordering::SeqCst);
        if self.producer_sleeping().load(Ordering::Relaxed) != 0 {
            self.space_seq().fetch_add(1, Ordering::Release);
            return Wake::Peer;
        }
        Wake::None
    }

    /// Drops everything published so far. Used by the supervisor after the consumer died
    /// (nobody else consumes then), so that the next consumer starts clean.
    pub fn discard_all(&self) -> Wake {
        let tail = self.tail().load(Ordering::Acquire);
        self.discard_to(tail)
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
        self.consumer_sleeping().store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let seq = self.data_seq().load(Ordering::Acquire);
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
        self.producer_sleeping().store(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let seq = self.space_seq().load(Ordering::Acquire);
        let tail = self.tail().load(Ordering::Relaxed);
        let head = self.head().load(Ordering::Acquire);
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
mod tests {
    use std::vec;
    use std::vec::Vec;

    use super::*;

    /// A heap buffer standing in for shared memory, 64-aligned.
    struct Region {
        mem: Vec<u64>,
        layout: ChannelLayout,
    }

    impl Region {
        fn new(capacity: u32) -> Region {
            let layout = ChannelLayout::new(capacity).unwrap();
            // Over-allocate so that we can align to 64.
            let mut mem = vec![0u64; layout.region_size() / 8 + 8];
            let bytes = zerocopy::IntoBytes::as_mut_bytes(&mut mem[..]);
            let off = bytes.as_ptr().align_offset(64);
            layout.initialise(&mut bytes[off..]).unwrap();
            Region { mem, layout }
        }

        fn channel(&mut self) -> Channel {
            let p = self.mem.as_mut_ptr().cast::<u8>();
            let off = p.align_offset(64);
            // SAFETY: the Vec holds region_size bytes after the aligned offset and outlives
            // the returned Channel within each test.
            unsafe { Channel::from_raw(NonNull::new(p.add(off)).unwrap(), self.layout) }
        }

        fn bytes(&mut self) -> &mut [u8] {
            let p = self.mem.as_mut_ptr().cast::<u8>();
            let off = p.align_offset(64);
            &mut zerocopy::IntoBytes::as_mut_bytes(&mut self.mem[..])[off..]
        }
    }

    #[test]
    fn frames_arrive_in_order_across_the_wrap_point() {
        let mut r = Region::new(4096);
        let ch = r.channel();
        let ring = ch.ring(Direction::Requests);
        let mut buf = vec![0u8; 4096];
        for i in 0..2000u32 {
            let payload: Vec<u8> = (0..(i % 300)).map(|b| (b as u8) ^ (i as u8)).collect();
            let _ = ring.try_send(Epoch(7), &payload).unwrap();
            let (got, _) = ring.try_recv(&mut buf).unwrap().unwrap();
            assert_eq!(got.epoch, Epoch(7));
            assert_eq!(&buf[..got.len], &payload[..]);
        }
        assert_eq!(ring.try_recv(&mut buf), Ok(None));
    }

    #[test]
    fn full_ring_refuses_then_accepts_after_consumption() {
        let mut r = Region::new(4096);
        let ring = r.channel().ring(Direction::Responses);
        let payload = [0xabu8; 1000];
        let mut sent = 0;
        while ring.try_send(Epoch(1), &payload).is_ok() {
            sent += 1;
        }
        assert_eq!(sent, 4);
        assert_eq!(ring.try_send(Epoch(1), &payload), Err(RingError::Full));
        let mut buf = [0u8; 1000];
        ring.try_recv(&mut buf).unwrap().unwrap();
        assert!(ring.try_send(Epoch(1), &payload).is_ok());
    }

    #[test]
    fn frame_larger_than_the_ring_is_a_typed_error() {
        let mut r = Region::new(4096);
        let ring = r.channel().ring(Direction::Requests);
        let big = vec![0u8; 4096];
        assert_eq!(
            ring.try_send(Epoch(1), &big),
            Err(RingError::FrameTooLarge {
                len: 4096,
                capacity: 4096
            })
        );
        assert!(ring.try_send(Epoch(1), &big[..4088]).is_ok());
    }

    #[test]
    fn lying_length_is_reported_and_the_reader_resynchronises() {
        let mut r = Region::new(4096);
        let layout = r.layout;
        let ch = r.channel();
        let ring = ch.ring(Direction::Requests);
        let _ = ring.try_send(Epoch(1), &[1, 2, 3]).unwrap();
        // The hostile producer rewrites the published frame's length.
        let data = layout.ring_data(Direction::Requests);
        r.bytes()[data..data + 4].copy_from_slice(&5000u32.to_le_bytes());
        let mut buf = [0u8; 64];
        assert!(matches!(
            ring.try_recv(&mut buf),
            Err(RingError::BadLength { len: 5000, .. })
        ));
        assert_eq!(ring.try_recv(&mut buf), Ok(None));
        let _ = ring.try_send(Epoch(1), &[9]).unwrap();
        let (got, _) = ring.try_recv(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..got.len], &[9]);
    }

    #[test]
    fn impossible_indices_are_corruption_not_a_crash() {
        let mut r = Region::new(4096);
        let layout = r.layout;
        let ch = r.channel();
        let ring = ch.ring(Direction::Requests);
        let tail_at = layout.ring_header(Direction::Requests) + 64;
        r.bytes()[tail_at..tail_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let mut buf = [0u8; 64];
        assert!(matches!(
            ring.try_recv(&mut buf),
            Err(RingError::Corrupt { .. })
        ));
        // The producer side notices the same when it next sends.
        r.bytes()[tail_at..tail_at + 8].copy_from_slice(&3u64.to_le_bytes());
        assert!(matches!(
            ring.try_send(Epoch(1), &[1]),
            Err(RingError::Corrupt { .. })
        ));
    }

    #[test]
    fn sleeping_consumer_is_reported_for_wakeup() {
        let mut r = Region::new(4096);
        let ring = r.channel().ring(Direction::Requests);
        let seq = ring
            .prepare_sleep()
            .expect("empty ring lets the consumer sleep");
        assert_eq!(ring.try_send(Epoch(1), &[1]), Ok(Wake::Peer));
        assert_ne!(ring.data_seq().load(Ordering::Relaxed), seq);
        ring.finish_sleep();
        assert_eq!(ring.prepare_sleep(), None, "data is waiting, so no sleep");
    }
}
