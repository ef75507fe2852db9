//! The ring's specification as tests: frames in order across the wrap point, the exactly full
//! ring, a hostile peer's indices and lengths, the sleep handshakes of both sides, and recovery
//! after a producer's death.
//!
//! The rings live in a heap buffer standing in for the shared mapping, followed by guard bytes
//! that stand for whatever the mapping borders on: a test can then check that the ring never
//! writes outside its own header and data area.

use std::string::ToString;
use std::time::Duration;
use std::time::Instant;
use std::vec;
use std::vec::Vec;

use zerocopy::FromBytes;
use zerocopy::IntoBytes;

use super::*;
use crate::layout::RING_MAGIC;

const CAPACITY: u32 = 4096;

/// What the guard bytes past the region hold: a value no ring write produces by accident.
const GUARD_BYTE: u8 = 0xa5;

/// Where the producer's and the consumer's indices sit in a ring header (what a hostile peer
/// overwrites).
const TAIL: usize = offset_of!(RingHeader, producer) + offset_of!(ProducerLine, tail);
const CACHED_HEAD: usize = offset_of!(RingHeader, producer) + offset_of!(ProducerLine, cached_head);
const HEAD: usize = offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, head);
const READ: usize = offset_of!(RingHeader, consumer) + offset_of!(ConsumerLine, read);
const PRODUCER_SLEEPING: usize =
    offset_of!(RingHeader, sleep) + offset_of!(SleepLine, producer_sleeping);

/// How long a test waits for an event another thread causes at once: long enough for any
/// scheduling delay, short enough that a missing event fails the test rather than hangs it.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A heap buffer standing in for shared memory: a channel region, 64-aligned, then guard bytes
/// (two ring capacities, so that even a write a whole lap past the last data area lands in
/// them).
struct Region {
    _mem: Vec<u64>,
    base: NonNull<u8>,
    layout: ChannelLayout,
}

impl Region {
    fn new(capacity: u32) -> Region {
        let layout = ChannelLayout::new(capacity).unwrap();
        let len = layout.region_size() + 2 * capacity as usize;
        // Over-allocate so that we can align to 64.
        let mut mem = vec![0u64; len / 8 + 8];
        let start = mem.as_mut_ptr().cast::<u8>();
        // SAFETY: the aligned start is less than 64 bytes into the allocation, which holds
        // `len + 64` bytes; moving the Vec into the Region below does not move its buffer.
        let base = NonNull::new(unsafe { start.add(start.align_offset(64)) }).unwrap();
        // SAFETY: `len` bytes from `base` lie inside the allocation, and nothing else refers
        // to them while this slice lives.
        let bytes = unsafe { core::slice::from_raw_parts_mut(base.as_ptr(), len) };
        layout
            .initialise(&mut bytes[..layout.region_size()])
            .unwrap();
        bytes[layout.region_size()..].fill(GUARD_BYTE);
        Region {
            _mem: mem,
            base,
            layout,
        }
    }

    /// Bytes of the region and its guard.
    fn len(&self) -> usize {
        self.layout.region_size() + 2 * self.layout.ring_capacity as usize
    }

    fn capacity(&self) -> usize {
        self.layout.ring_capacity as usize
    }

    fn channel(&self) -> Channel<'_> {
        // SAFETY: the buffer holds region_size bytes from the aligned `base`, and the
        // returned Channel borrows `self`.
        unsafe { Channel::from_raw(self.base, self.layout) }
    }

    fn ring(&self, dir: Direction) -> Ring<'_> {
        self.channel().ring(dir)
    }

    /// Writes bytes as a hostile peer would, behind the ring's back.
    fn poke(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.layout.region_size());
        // SAFETY: in bounds (asserted); no other thread touches the region while a test
        // pokes, and the ring code only ever reads this memory through raw pointers and
        // atomics.
        unsafe {
            core::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base.as_ptr().add(offset),
                data.len(),
            )
        };
    }

    /// Overwrites the u64 at `field` of the header of the ring for `dir`, as a hostile peer
    /// would.
    fn poke_index(&self, dir: Direction, field: usize, value: u64) {
        self.poke(self.layout.ring_header(dir) + field, &value.to_ne_bytes());
    }

    /// A copy of `len` bytes from `offset` (while no other thread writes them).
    fn peek(&self, offset: usize, len: usize) -> Vec<u8> {
        assert!(offset + len <= self.len());
        let mut out = vec![0u8; len];
        // SAFETY: in bounds (asserted); `out` is our own memory.
        unsafe {
            core::ptr::copy_nonoverlapping(self.base.as_ptr().add(offset), out.as_mut_ptr(), len)
        };
        out
    }

    /// The header of the ring for `dir`, as a peer reads it at the layout's offsets.
    fn header(&self, dir: Direction) -> RingHeader {
        let bytes = self.peek(
            self.layout.ring_header(dir),
            core::mem::size_of::<RingHeader>(),
        );
        RingHeader::read_from_bytes(&bytes).unwrap()
    }

    /// The data area of the ring for `dir`.
    fn data(&self, dir: Direction) -> Vec<u8> {
        self.peek(self.layout.ring_data(dir), self.capacity())
    }

    /// Every byte the ring for `dir` must leave alone: all but its own header and data area,
    /// the guard bytes included.
    fn outside(&self, dir: Direction) -> Vec<u8> {
        let mut bytes = self.peek(0, self.layout.ring_header(dir));
        let end = self.layout.ring_data(dir) + self.capacity();
        bytes.extend(self.peek(end, self.len() - end));
        bytes
    }

    /// A u32 of the header of the ring for `dir`, to watch a flag that another thread sets.
    fn header_word(&self, dir: Direction, field: usize) -> &AtomicU32 {
        let offset = self.layout.ring_header(dir) + field;
        assert!(offset.is_multiple_of(4) && offset + 4 <= self.layout.region_size());
        // SAFETY: a 4-aligned word inside the region, which lives as long as `self`; the
        // threads of a test access it only atomically.
        unsafe { AtomicU32::from_ptr(self.base.as_ptr().add(offset).cast::<u32>()) }
    }
}

/// `len` bytes that differ from frame to frame (`seed`) and from byte to byte.
fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u8).wrapping_mul(7) ^ seed.wrapping_mul(31)) | 1)
        .collect()
}

/// Moves a fresh ring's positions to `to` (a multiple of 16) with frames sent, received and
/// released, leaving it empty.
fn advance_fresh(ring: &Ring<'_>, to: u64) {
    let mut buf = [0u8; 1024];
    let mut pos = 0u64;
    while pos < to {
        let footprint = (to - pos).min(1024) as usize;
        let sent = payload(footprint - FRAME_HEADER_SIZE, pos as u8);
        let _ = ring.try_send(Epoch(1), &sent).unwrap();
        let got = ring.try_recv(&mut buf).unwrap().unwrap();
        assert_eq!(&buf[..got.len], &sent[..]);
        let _ = ring.release();
        pos += footprint as u64;
    }
}

/// Receives one frame and checks that it is `expected`.
fn expect_frame(ring: &Ring<'_>, expected: &[u8]) {
    let mut buf = vec![0u8; expected.len()];
    let got = ring.try_recv(&mut buf).unwrap().expect("a frame");
    assert_eq!(&buf[..got.len], expected);
}

/// Spins until `event` happens; panics (naming it) if it does not within [`EVENT_TIMEOUT`].
fn wait_for(what: &str, mut event: impl FnMut() -> bool) {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    while !event() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::yield_now();
    }
}

#[test]
fn frames_arrive_in_order_across_the_wrap_point() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Requests);
    let mut buf = vec![0u8; 4096];
    for i in 0..2000u32 {
        let payload: Vec<u8> = (0..(i % 300)).map(|b| (b as u8) ^ (i as u8)).collect();
        let _ = ring.try_send(Epoch(7), &payload).unwrap();
        let got = ring.try_recv(&mut buf).unwrap().unwrap();
        let _ = ring.release();
        assert_eq!(got.epoch, Epoch(7));
        assert_eq!(&buf[..got.len], &payload[..]);
    }
    assert_eq!(ring.try_recv(&mut buf), Ok(None));
}

#[test]
fn full_ring_refuses_then_accepts_after_consumption() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Responses);
    // 990 bytes take 1008 with header and padding: four fit, and the 64 bytes left do not
    // hold a fifth.
    let payload = [0xabu8; 990];
    let mut sent = 0;
    while ring.try_send(Epoch(1), &payload).is_ok() {
        sent += 1;
    }
    assert_eq!(sent, 4);
    assert_eq!(ring.try_send(Epoch(1), &payload), Err(RingError::Full));
    let mut buf = [0u8; 990];
    let _ = ring.try_recv(&mut buf).unwrap().unwrap();
    assert_eq!(
        ring.try_send(Epoch(1), &payload),
        Err(RingError::Full),
        "not released yet"
    );
    let _ = ring.release();
    assert!(ring.try_send(Epoch(1), &payload).is_ok());
}

#[test]
fn an_exactly_full_ring_accepts_the_last_frame_that_fits_and_refuses_one_more_byte() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Requests);
    // 1008 payload bytes take 1024 with the header: four of them fill the ring exactly.
    let frames: Vec<Vec<u8>> = (0..4).map(|i| payload(1008, i)).collect();
    for frame in &frames[..3] {
        let _ = ring.try_send(Epoch(1), frame).unwrap();
    }
    assert_eq!(
        ring.try_send(Epoch(1), &payload(1009, 9)),
        Err(RingError::Full),
        "one byte more than the room left"
    );
    let _ = ring.try_send(Epoch(1), &frames[3]).unwrap();
    assert_eq!(
        ring.try_send(Epoch(1), &[]),
        Err(RingError::Full),
        "an exactly full ring is full, not corrupt"
    );
    for frame in &frames {
        expect_frame(&ring, frame);
    }
    assert_eq!(ring.try_recv(&mut [0u8; 16]), Ok(None));
    let _ = ring.release();
    let _ = ring.try_send(Epoch(1), &frames[0]).unwrap();
}

#[test]
fn the_largest_frame_fills_the_ring_wherever_it_starts_and_arrives_intact() {
    for start in [0, 2048] {
        let r = Region::new(CAPACITY);
        let ring = r.ring(Direction::Requests);
        assert_eq!(ring.capacity(), 4096);
        assert_eq!(ring.max_payload(), 4096 - FRAME_HEADER_SIZE);
        assert_eq!(
            ring.try_send(Epoch(1), &payload(ring.max_payload() + 1, 0)),
            Err(RingError::FrameTooLarge {
                len: 4081,
                capacity: 4096
            })
        );
        advance_fresh(&ring, start);
        let largest = payload(ring.max_payload(), 5);
        let _ = ring.try_send(Epoch(4), &largest).unwrap();
        assert_eq!(ring.try_send(Epoch(4), &[]), Err(RingError::Full));
        let mut buf = vec![0u8; largest.len()];
        assert_eq!(
            ring.try_recv(&mut buf),
            Ok(Some(Received {
                len: largest.len(),
                epoch: Epoch(4)
            })),
            "starting at {start}"
        );
        assert_eq!(buf, largest, "starting at {start}");
    }
}

#[test]
fn frame_larger_than_the_ring_is_a_typed_error() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Requests);
    let big = vec![0u8; 4096];
    assert_eq!(
        ring.try_send(Epoch(1), &big),
        Err(RingError::FrameTooLarge {
            len: 4096,
            capacity: 4096
        })
    );
    assert!(ring.try_send(Epoch(1), &big[..4096 - 16]).is_ok());
}

#[test]
fn a_frame_larger_than_the_callers_buffer_is_skipped_with_a_typed_error() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Requests);
    let _ = ring.try_send(Epoch(1), &payload(100, 1)).unwrap();
    let _ = ring.try_send(Epoch(1), &payload(50, 2)).unwrap();
    let mut buf = [0u8; 50];
    assert_eq!(
        ring.try_recv(&mut buf),
        Err(RingError::BufferTooSmall {
            len: 100,
            buffer: 50
        })
    );
    expect_frame(&ring, &payload(50, 2));
}

#[test]
fn a_received_frame_fills_the_buffer_up_to_its_length_and_not_a_byte_beyond() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Requests);
    let sent = payload(20, 1);
    let _ = ring.try_send(Epoch(1), &sent).unwrap();
    let mut buf = [0xeeu8; 64];
    let got = ring.try_recv(&mut buf).unwrap().unwrap();
    assert_eq!(&buf[..got.len], &sent[..]);
    assert!(buf[got.len..].iter().all(|&b| b == 0xee), "{buf:?}");
}

#[test]
fn lying_length_is_reported_and_the_reader_resynchronises() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Requests);
    let _ = ring.try_send(Epoch(1), &[1, 2, 3]).unwrap();
    // The hostile producer rewrites the published frame's length.
    r.poke(
        r.layout.ring_data(Direction::Requests) + 8,
        &5000u32.to_ne_bytes(),
    );
    let mut buf = [0u8; 64];
    assert!(matches!(
        ring.try_recv(&mut buf),
        Err(RingError::BadLength { len: 5000, .. })
    ));
    assert_eq!(ring.try_recv(&mut buf), Ok(None));
    let _ = ring.try_send(Epoch(1), &[9]).unwrap();
    let got = ring.try_recv(&mut buf).unwrap().unwrap();
    assert_eq!(&buf[..got.len], &[9]);
}

#[test]
fn stale_bytes_never_pass_for_a_frame() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Requests);
    let mut buf = [0u8; 4096];
    // Payloads full of what later stamps could be (position + 1 at every 16-byte offset
    // of the next laps), sent with varying sizes so that frame boundaries move around.
    // The payload starts after the frame header: its byte k * 16 is at ring position
    // tail + FRAME_HEADER_SIZE + k * 16, and a stamp there one to three laps on would
    // read that position + 1.
    for i in 0..500u64 {
        let (tail, _) = ring.counters();
        let mut payload = std::vec::Vec::new();
        for k in 0..(i % 50 + 1) {
            let future = tail + FRAME_HEADER_SIZE as u64 + 4096 * (1 + k % 3) + k * 16 + 1;
            payload.extend_from_slice(&future.to_ne_bytes());
            payload.extend_from_slice(&[0u8; 8]);
        }
        let _ = ring.try_send(Epoch(1), &payload).unwrap();
        let got = ring.try_recv(&mut buf).unwrap().unwrap();
        let _ = ring.release();
        assert_eq!(&buf[..got.len], &payload[..]);
        assert_eq!(
            ring.try_recv(&mut buf),
            Ok(None),
            "phantom frame after {i} frames"
        );
    }
}

#[test]
fn a_frame_across_the_end_is_zeroed_on_release_and_nothing_past_the_data_area_is_touched() {
    // The requests ring borders on the responses ring's header, the responses ring on the
    // end of the mapping (the guard bytes).
    for dir in [Direction::Requests, Direction::Responses] {
        let r = Region::new(CAPACITY);
        let ring = r.ring(dir);
        let outside = r.outside(dir);
        advance_fresh(&ring, 4048);
        // 100 payload bytes take 128: 48 before the end of the data area, 80 after its
        // start. A second frame waits right behind.
        let across = payload(100, 1);
        let behind = payload(40, 2);
        let _ = ring.try_send(Epoch(1), &across).unwrap();
        let _ = ring.try_send(Epoch(1), &behind).unwrap();
        expect_frame(&ring, &across);
        let _ = ring.release();
        let data = r.data(dir);
        assert!(
            data[4048..].iter().chain(&data[..80]).all(|&b| b == 0),
            "{dir:?}: the released frame is zeroed on both sides of the end"
        );
        assert_eq!(
            r.outside(dir),
            outside,
            "{dir:?}: written past the data area"
        );
        expect_frame(&ring, &behind);
        let _ = ring.release();
        assert!(
            r.data(dir).iter().all(|&b| b == 0),
            "{dir:?}: an empty ring is all zeroes"
        );
        assert_eq!(
            r.outside(dir),
            outside,
            "{dir:?}: written past the data area"
        );
    }
}

#[test]
fn releasing_a_frame_that_ends_at_the_end_of_the_data_area_spares_the_frame_at_its_start() {
    for dir in [Direction::Requests, Direction::Responses] {
        let r = Region::new(CAPACITY);
        let ring = r.ring(dir);
        let outside = r.outside(dir);
        advance_fresh(&ring, 3072);
        let last = payload(1008, 1);
        let first = payload(20, 2);
        let _ = ring.try_send(Epoch(1), &last).unwrap();
        let _ = ring.try_send(Epoch(1), &first).unwrap();
        expect_frame(&ring, &last);
        let _ = ring.release();
        assert!(
            r.data(dir)[3072..].iter().all(|&b| b == 0),
            "{dir:?}: the released frame is zeroed"
        );
        expect_frame(&ring, &first);
        assert_eq!(
            r.outside(dir),
            outside,
            "{dir:?}: written past the data area"
        );
    }
}

#[test]
fn a_misaligned_or_out_of_range_index_from_the_peer_is_corruption_and_writes_nothing() {
    // (head, tail) as a hostile peer leaves them, the producer's cached head included.
    let cases = [
        // A misaligned tail 12 bytes ahead of the head: its stamp would be an unaligned
        // atomic reaching 4 bytes past the data area.
        (4080, 4092),
        // A misaligned head.
        (4084, 4096),
        // More in flight than the ring holds.
        (0, 4096 + 16),
        // The head ahead of the tail.
        (16, 0),
    ];
    for dir in [Direction::Requests, Direction::Responses] {
        for (head, tail) in cases {
            let r = Region::new(CAPACITY);
            let ring = r.ring(dir);
            r.poke_index(dir, HEAD, head);
            r.poke_index(dir, READ, head);
            r.poke_index(dir, CACHED_HEAD, head);
            r.poke_index(dir, TAIL, tail);
            let outside = r.outside(dir);
            assert_eq!(
                ring.try_send(Epoch(1), &[7]),
                Err(RingError::Corrupt { head, tail }),
                "{dir:?}"
            );
            assert!(
                r.data(dir).iter().all(|&b| b == 0),
                "{dir:?}, head {head}, tail {tail}: nothing written"
            );
            assert_eq!(r.outside(dir), outside, "{dir:?}, head {head}, tail {tail}");
        }
    }
}

#[test]
fn impossible_indices_are_corruption_not_a_crash() {
    let r = Region::new(CAPACITY);
    let dir = Direction::Requests;
    let ring = r.ring(dir);
    r.poke_index(dir, READ, 3);
    assert!(
        ring.has_data(),
        "a misaligned read position is looked at, not slept on"
    );
    let mut buf = [0u8; 64];
    assert!(matches!(
        ring.try_recv(&mut buf),
        Err(RingError::Corrupt { .. })
    ));
    // A producer that finds an impossible head says so.
    r.poke_index(dir, HEAD, 1 << 40);
    let big = [0u8; 4000];
    let _ = ring.try_send(Epoch(1), &big);
    assert!(matches!(
        ring.try_send(Epoch(1), &big),
        Err(RingError::Corrupt { .. })
    ));
}

#[test]
fn ring_state_lives_at_the_offsets_of_the_layout() {
    // The peer is another process (another build, maybe another language): it finds each
    // index and flag at the offset `layout` gives, and nowhere else.
    let r = Region::new(CAPACITY);
    let dir = Direction::Requests;
    let ring = r.ring(dir);
    let info = r.header(dir).info;
    assert_eq!((info.magic, info.capacity), (RING_MAGIC, CAPACITY));
    // A first lap leaves head = read = tail = 1024; filling the ring then makes the producer
    // look up the head (1024), and the consumer reads one frame of the next four.
    advance_fresh(&ring, 1024);
    let frame = payload(1008, 3);
    for _ in 0..4 {
        let _ = ring.try_send(Epoch(1), &frame).unwrap();
    }
    expect_frame(&ring, &frame);
    let h = r.header(dir);
    assert_eq!(
        (
            h.producer.tail,
            h.producer.cached_head,
            h.consumer.head,
            h.consumer.read
        ),
        (5120, 1024, 1024, 2048)
    );
    // The producer announces its sleep where the consumer looks; the consumer bumps the
    // space sequence the producer sleeps on.
    let space = ring.prepare_space_sleep(1024).expect("the ring is full");
    assert_eq!(r.header(dir).sleep.producer_sleeping, 1);
    assert_eq!(r.header(dir).consumer.space_seq, space);
    assert_eq!(ring.release(), Wake::Peer);
    let h = r.header(dir);
    assert_eq!((h.consumer.head, h.consumer.space_seq), (2048, space + 1));
    ring.finish_space_sleep();
    assert_eq!(r.header(dir).sleep.producer_sleeping, 0);
    // And the other way round for a consumer waiting for data.
    for _ in 0..3 {
        expect_frame(&ring, &frame);
    }
    let _ = ring.release();
    let data = ring.prepare_sleep().expect("the ring is empty");
    assert_eq!(r.header(dir).sleep.consumer_sleeping, 1);
    assert_eq!(r.header(dir).producer.wake_seq, data);
    assert_eq!(ring.try_send(Epoch(1), &frame), Ok(Wake::Peer));
    assert_eq!(r.header(dir).producer.wake_seq, data + 1);
    ring.finish_sleep();
    let h = r.header(dir);
    assert_eq!(h.sleep.consumer_sleeping, 0);
    // Nothing else in the header moved.
    assert_eq!(h.info.as_bytes(), info.as_bytes());
    assert_eq!(h.producer._reserved, [0; 11]);
    assert_eq!(h.consumer._reserved, [0; 11]);
    assert_eq!(h.sleep._reserved, [0; 14]);
}

#[test]
fn sleeping_consumer_is_reported_for_wakeup_and_an_awake_one_is_not() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Requests);
    let seq = ring
        .prepare_sleep()
        .expect("empty ring lets the consumer sleep");
    assert_eq!(ring.try_send(Epoch(1), &[1]), Ok(Wake::Peer));
    assert_ne!(ring.data_seq().load(Ordering::Relaxed), seq);
    ring.finish_sleep();
    assert_eq!(
        ring.try_send(Epoch(1), &[2]),
        Ok(Wake::None),
        "consumer is awake"
    );
    assert_eq!(ring.prepare_sleep(), None, "data is waiting, so no sleep");
}

#[test]
fn the_producer_sleeps_only_on_a_full_ring_and_on_the_current_space_sequence() {
    let r = Region::new(CAPACITY);
    let dir = Direction::Requests;
    let ring = r.ring(dir);
    let frame = payload(1008, 4);
    assert_eq!(ring.prepare_space_sleep(1024), None, "the ring has room");
    assert_eq!(
        r.header(dir).sleep.producer_sleeping,
        0,
        "no sleep announced"
    );
    for _ in 0..4 {
        let _ = ring.try_send(Epoch(1), &frame).unwrap();
    }
    for round in 0..2 {
        let seq = ring
            .prepare_space_sleep(16)
            .expect("a full ring lets the producer sleep");
        assert_eq!(seq, round, "the sequence the next release moves on from");
        expect_frame(&ring, &frame);
        assert_eq!(ring.release(), Wake::Peer, "the sleeping producer is woken");
        assert_ne!(ring.space_seq().load(Ordering::Relaxed), seq);
        ring.finish_space_sleep();
        let _ = ring.try_send(Epoch(1), &frame).unwrap();
    }
    expect_frame(&ring, &frame);
    assert_eq!(ring.release(), Wake::None, "an awake producer is not woken");
    assert_eq!(
        ring.prepare_space_sleep(1024),
        None,
        "exactly the room asked for is there"
    );
    assert_eq!(ring.prepare_space_sleep(1040), Some(2), "16 bytes short");
}

#[test]
fn a_producer_blocked_on_a_full_ring_is_woken_by_the_release_that_makes_room() {
    let r = Region::new(CAPACITY);
    let dir = Direction::Requests;
    let ring = r.ring(dir);
    let frame = payload(1008, 5);
    for _ in 0..4 {
        let _ = ring.try_send(Epoch(1), &frame).unwrap();
    }
    let last = payload(1008, 6);
    let sleeping = r.header_word(dir, PRODUCER_SLEEPING);
    std::thread::scope(|s| {
        let producer = s.spawn({
            let last = last.clone();
            move || {
                // A producer's blocking send, with a spin standing in for the futex.
                let deadline = Instant::now() + EVENT_TIMEOUT;
                let mut sleeps = 0;
                loop {
                    match ring.try_send(Epoch(1), &last) {
                        Ok(_) => return sleeps,
                        Err(RingError::Full) => {}
                        Err(e) => panic!("{e}"),
                    }
                    assert!(Instant::now() < deadline, "never got room");
                    if let Some(seq) = ring.prepare_space_sleep(frame_footprint(last.len())) {
                        sleeps += 1;
                        wait_for("a bump of the space sequence", || {
                            ring.space_seq().load(Ordering::Acquire) != seq
                        });
                        ring.finish_space_sleep();
                    }
                }
            }
        });
        // The consumer learns of the sleeper through the flag at the layout's offset.
        wait_for("the producer's sleep announcement", || {
            sleeping.load(Ordering::Acquire) != 0
        });
        expect_frame(&ring, &frame);
        assert_eq!(ring.release(), Wake::Peer);
        assert_eq!(producer.join().unwrap(), 1, "slept once, until woken");
    });
    for _ in 0..3 {
        expect_frame(&ring, &frame);
    }
    expect_frame(&ring, &last);
    assert_eq!(ring.release(), Wake::None, "the producer is awake again");
}

#[test]
fn counters_count_bytes_published_and_released() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Requests);
    let _ = ring.try_send(Epoch(1), &[1; 20]).unwrap();
    let _ = ring.try_send(Epoch(1), &[2; 1]).unwrap();
    assert_eq!(ring.counters(), (48 + 32, 0));
    expect_frame(&ring, &[1; 20]);
    assert_eq!(ring.read_position(), 48);
    expect_frame(&ring, &[2; 1]);
    assert_eq!(ring.counters(), (80, 0), "read is not yet released");
    let _ = ring.release();
    assert_eq!(ring.counters(), (80, 80));
}

#[test]
fn the_supervisors_bump_moves_both_sequences_a_sleeper_waits_on() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Responses);
    let data = ring.data_seq().load(Ordering::Relaxed);
    let space = ring.space_seq().load(Ordering::Relaxed);
    ring.bump_all();
    assert_ne!(ring.data_seq().load(Ordering::Relaxed), data);
    assert_ne!(ring.space_seq().load(Ordering::Relaxed), space);
}

#[test]
fn epoch_and_server_state_read_back_what_the_supervisor_recorded() {
    let r = Region::new(CAPACITY);
    let ch = r.channel();
    assert_eq!(ch.layout(), r.layout);
    ch.set_epoch(Epoch(41));
    assert_eq!(ch.epoch(), Epoch(41));
    for state in [
        ServerState::Up,
        ServerState::Gone,
        ServerState::Unresponsive,
        ServerState::Down,
    ] {
        ch.set_server_state(state);
        assert_eq!(ch.server_state(), state);
    }
    // A value no supervisor writes reads as no server.
    r.poke(
        offset_of!(ChannelHeader, server_state),
        &77u32.to_ne_bytes(),
    );
    assert_eq!(ch.server_state(), ServerState::Down);
}

#[test]
fn error_messages_name_the_values_that_were_wrong() {
    let cases = [
        (
            RingError::FrameTooLarge {
                len: 5000,
                capacity: 4096,
            },
            &["5000", "4096"][..],
        ),
        (RingError::Full, &["full"][..]),
        (RingError::Corrupt { head: 17, tail: 3 }, &["17", "3"][..]),
        (
            RingError::BadLength {
                len: 700,
                available: 64,
            },
            &["700", "64"][..],
        ),
        (
            RingError::BufferTooSmall {
                len: 300,
                buffer: 128,
            },
            &["300", "128"][..],
        ),
    ];
    for (error, values) in cases {
        let message = error.to_string();
        for value in values {
            assert!(message.contains(value), "{message:?} lacks {value}");
        }
    }
}

#[test]
fn recovery_after_producer_death_points_the_next_producer_at_the_waiting_consumer() {
    let r = Region::new(CAPACITY);
    let dir = Direction::Requests;
    let ring = r.ring(dir);
    let mut buf = [0u8; 64];
    let _ = ring.try_send(Epoch(1), &[1; 20]).unwrap();
    let _ = ring.try_send(Epoch(1), &[2; 20]).unwrap();
    assert!(ring.try_recv(&mut buf).unwrap().is_some());
    // The producer dies after publishing its tail for a third frame it never stamped.
    let (tail, _) = ring.counters();
    r.poke_index(dir, TAIL, tail + 48);
    let recovered = ring.recover_producer();
    assert_eq!(
        recovered, tail,
        "tail moved back to the first unstamped slot"
    );
    // The consumer still gets the second frame, then the new producer's frame.
    assert!(ring.try_recv(&mut buf).unwrap().is_some());
    let _ = ring.release();
    let _ = ring.try_send(Epoch(2), &[3; 5]).unwrap();
    let got = ring.try_recv(&mut buf).unwrap().unwrap();
    assert_eq!((got.epoch, &buf[..got.len]), (Epoch(2), &[3u8; 5][..]));
}

#[test]
fn recovery_during_a_release_keeps_the_frames_the_consumer_has_not_read() {
    let r = Region::new(CAPACITY);
    let dir = Direction::Requests;
    let ring = r.ring(dir);
    for seed in 0..3 {
        let _ = ring.try_send(Epoch(1), &payload(20, seed)).unwrap();
    }
    expect_frame(&ring, &payload(20, 0));
    expect_frame(&ring, &payload(20, 1));
    // The consumer is half-way through releasing the two: the first is zeroed already,
    // the head not yet moved. The walk must start where the consumer reads, not at the head.
    r.poke(r.layout.ring_data(dir), &[0; 48]);
    assert_eq!(ring.recover_producer(), 3 * 48);
    let _ = ring.release();
    expect_frame(&ring, &payload(20, 2));
}

#[test]
fn recovery_of_an_exactly_full_ring_read_to_its_end_leaves_the_tail_at_the_end() {
    let r = Region::new(CAPACITY);
    let dir = Direction::Requests;
    let ring = r.ring(dir);
    let frame = payload(1008, 7);
    for _ in 0..4 {
        let _ = ring.try_send(Epoch(1), &frame).unwrap();
    }
    for _ in 0..4 {
        expect_frame(&ring, &frame);
    }
    // Read a whole ring's worth ahead of the head, and half-way through releasing it.
    r.poke(r.layout.ring_data(dir), &[0; 1024]);
    assert_eq!(ring.recover_producer(), 4096);
    let _ = ring.release();
    let _ = ring.try_send(Epoch(2), &payload(30, 8)).unwrap();
    expect_frame(&ring, &payload(30, 8));
}

#[test]
fn recovery_keeps_an_unread_frame_of_the_largest_size() {
    let r = Region::new(CAPACITY);
    let ring = r.ring(Direction::Requests);
    let largest = payload(ring.max_payload(), 9);
    let _ = ring.try_send(Epoch(1), &largest).unwrap();
    assert_eq!(ring.recover_producer(), 4096);
    expect_frame(&ring, &largest);
}

#[test]
fn recovery_from_an_impossible_read_position_walks_from_the_head() {
    let dir = Direction::Requests;
    // The consumer's read position as a corrupted line leaves it, 1024 being its head.
    for read in [1024 + 8, 1024 + 4096 + 16, 1024 + 2 * 4096] {
        let r = Region::new(CAPACITY);
        let ring = r.ring(dir);
        advance_fresh(&ring, 1024);
        let _ = ring.try_send(Epoch(1), &payload(20, 1)).unwrap();
        let _ = ring.try_send(Epoch(1), &payload(20, 2)).unwrap();
        let data = r.data(dir);
        r.poke_index(dir, READ, read);
        assert_eq!(
            ring.recover_producer(),
            1024 + 2 * 48,
            "read position {read}"
        );
        assert_eq!(r.data(dir), data, "read position {read}: frames kept");
    }
}

#[test]
fn recovery_stops_at_a_stamped_frame_whose_length_cannot_fit() {
    let r = Region::new(CAPACITY);
    let dir = Direction::Requests;
    let ring = r.ring(dir);
    let _ = ring.try_send(Epoch(1), &payload(20, 1)).unwrap();
    let _ = ring.try_send(Epoch(1), &payload(20, 2)).unwrap();
    // The dying producer left a length no frame can have in the second frame.
    r.poke(r.layout.ring_data(dir) + 48 + 8, &5000u32.to_ne_bytes());
    assert_eq!(
        ring.recover_producer(),
        48,
        "the tail is the bad frame's slot"
    );
    expect_frame(&ring, &payload(20, 1));
    assert_eq!(
        ring.try_recv(&mut [0u8; 64]),
        Ok(None),
        "the bad frame is gone"
    );
    let _ = ring.try_send(Epoch(2), &payload(30, 3)).unwrap();
    expect_frame(&ring, &payload(30, 3));
}
