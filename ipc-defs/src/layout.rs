//! Byte layout of a channel region: what both ends map and what the supervisor inspects.
//!
//! ```text
//! offset 0                      ChannelHeader   (one cache line: magic, version, epoch, state)
//! offset 64                     RingHeader      requests  (4 cache lines)
//! offset 320                    request data    (capacity bytes)
//! offset 320 + capacity         RingHeader      responses (4 cache lines)
//! offset 576 + capacity         response data   (capacity bytes)
//! ```
//!
//! A ring carries *frames*: a 16-byte [`FrameHeader`] followed by the postcard payload,
//! padded to a multiple of 16. Frames are written contiguously and may wrap around the end of the data
//! area (the reader copies the two pieces). Indices are free-running `u64` byte counters, so
//! `tail - head` is the number of bytes in flight and never ambiguous.
//!
//! The producer index, the consumer index and the sleep flags sit on separate cache lines so
//! that the two sides never write the same line; the header's static fields sit on a fourth.

use zerocopy::FromBytes;
use zerocopy::FromZeros;
use zerocopy::Immutable;
use zerocopy::IntoBytes;
use zerocopy::KnownLayout;

/// Cache line size of every x86_64 part we run on.
pub const CACHE_LINE: usize = 64;

/// `"PVCH"`: marks memory that was laid out as a channel by the microkernel.
pub const CHANNEL_MAGIC: u32 = 0x4843_5650;
/// `"PVRG"`: marks a ring header.
pub const RING_MAGIC: u32 = 0x4752_5650;
/// Layout version; bumped on any incompatible change to this module.
pub const LAYOUT_VERSION: u32 = 1;

/// Smallest ring data area: room for a control message and its header, with slack.
pub const MIN_RING_CAPACITY: u32 = 4096;
/// Largest ring data area. Bulk data travels through shared regions, never through rings, so
/// rings beyond this size would only hide a design mistake.
pub const MAX_RING_CAPACITY: u32 = 16 << 20;

/// Size of a [`FrameHeader`].
pub const FRAME_HEADER_SIZE: usize = 16;
/// Frames start on 16-byte boundaries, so a header never straddles the wrap point. (Measured:
/// 32-byte alignment is no faster, and cache-line alignment is ~30% slower for small
/// messages, since every frame then needs a line of its own.)
pub const FRAME_ALIGN: usize = 16;

/// Generation of a channel. It changes whenever either end of the channel is restarted, so a
/// survivor can tell that replies it waits for will never come.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Epoch(pub u32);

impl Epoch {
    /// The epoch after a restart of either end.
    pub fn next(self) -> Epoch {
        Epoch(self.0.wrapping_add(1))
    }
}

impl core::fmt::Display for Epoch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Whether the serving end of a channel is running (written by the supervisor only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum ServerState {
    /// No process serves the channel right now; requests queue until one does.
    Down = 0,
    /// A server process is running.
    Up = 1,
    /// The supervisor gave up on the server (crash loop, or a policy that does not restart
    /// it): no process will serve the channel again in this run, so waiting is pointless.
    Gone = 2,
    /// A server process runs but missed the supervisor's last watchdog ping while nothing it
    /// calls was down (stopped with SIGSTOP, wedged, or busy with one long request): a request
    /// it has not taken may wait until its watchdog kills it. Back to `Up` when it answers.
    Unresponsive = 3,
}

/// First cache line of a channel region.
///
/// `epoch` and `server_state` are written only by the supervisor (the microkernel), which maps
/// every channel; both ends read them.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct ChannelHeader {
    pub magic: u32,
    pub version: u32,
    /// Current [`Epoch`]; accessed atomically.
    pub epoch: u32,
    /// A [`ServerState`]; accessed atomically.
    pub server_state: u32,
    /// Data bytes in each of the two rings.
    pub ring_capacity: u32,
    pub _reserved: [u32; 11],
}

/// Static fields of a ring, on their own cache line.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct RingInfo {
    pub magic: u32,
    pub capacity: u32,
    pub _reserved: [u32; 14],
}

/// The producer's cache line: only the producer writes it. The consumer reads it only on its
/// way to sleep, so in a busy ring the line stays in the producer's cache.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct ProducerLine {
    /// Bytes ever published; accessed atomically with release/acquire.
    pub tail: u64,
    /// The producer's last reading of the consumer's `head` (so that it need not read the
    /// consumer's line on every send).
    pub cached_head: u64,
    /// Futex word the consumer sleeps on; the producer bumps it to wake the consumer.
    pub wake_seq: u32,
    pub _reserved: [u32; 11],
}

/// The consumer's cache line: only the consumer writes it (and the supervisor, after the
/// consumer died, to discard what the dead consumer left unread).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct ConsumerLine {
    /// Bytes ever released to the producer (read, and zeroed); accessed atomically with
    /// release/acquire. Everything before `head` may be overwritten by the producer.
    pub head: u64,
    /// Bytes ever read. `[head, read)` has been read but not yet zeroed and released: the
    /// consumer releases it lazily, off the round trip's critical path.
    pub read: u64,
    /// Futex word the producer sleeps on when the ring is full; the consumer bumps it.
    pub space_seq: u32,
    pub _reserved: [u32; 11],
}

/// Sleep announcements, on a line of their own: written only when a side goes to sleep, so
/// checking them on every frame costs no cache-line transfer in a busy ring.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct SleepLine {
    /// Non-zero while the consumer is (about to be) asleep on `wake_seq`.
    pub consumer_sleeping: u32,
    /// Non-zero while the producer is asleep on `space_seq`, waiting for room.
    pub producer_sleeping: u32,
    pub _reserved: [u32; 14],
}

/// Header of one ring: four cache lines, so that no line is written by both sides.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug)]
#[repr(C)]
pub struct RingHeader {
    pub info: RingInfo,
    pub producer: ProducerLine,
    pub consumer: ConsumerLine,
    pub sleep: SleepLine,
}

/// Header of one frame slot in a ring's data area.
///
/// The consumer learns that a frame is there from its `stamp`, which the producer writes last:
/// it equals the frame's ring position plus one, a value that no earlier lap can have left
/// there (positions never repeat, and consumed bytes are zeroed). So the consumer polls the
/// very cache line the frame arrives in, and a small message costs one line transfer each way.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct FrameHeader {
    /// Ring position of this frame + 1; accessed atomically.
    pub stamp: u64,
    /// Payload bytes that follow (before padding).
    pub len: u32,
    /// Epoch the producer saw when it wrote the frame; frames of an older epoch are stale.
    pub epoch: u32,
}

const _: () = assert!(core::mem::size_of::<ChannelHeader>() == CACHE_LINE);
const _: () = assert!(core::mem::size_of::<RingInfo>() == CACHE_LINE);
const _: () = assert!(core::mem::size_of::<ProducerLine>() == CACHE_LINE);
const _: () = assert!(core::mem::size_of::<ConsumerLine>() == CACHE_LINE);
const _: () = assert!(core::mem::size_of::<SleepLine>() == CACHE_LINE);
const _: () = assert!(core::mem::size_of::<RingHeader>() == 4 * CACHE_LINE);
const _: () = assert!(core::mem::size_of::<FrameHeader>() == FRAME_HEADER_SIZE);

/// Which of a channel's two rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to server.
    Requests,
    /// Server to client.
    Responses,
}

/// Where things are in a channel region of a given ring capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelLayout {
    pub ring_capacity: u32,
}

/// Why a ring capacity cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// Not a power of two, or outside [`MIN_RING_CAPACITY`]..=[`MAX_RING_CAPACITY`].
    BadCapacity(u32),
    /// The mapping is smaller than the layout needs.
    RegionTooSmall { needed: usize, got: usize },
    /// The memory does not start with a channel header of our version.
    BadHeader,
}

impl ChannelLayout {
    pub fn new(ring_capacity: u32) -> Result<Self, LayoutError> {
        if !ring_capacity.is_power_of_two()
            || !(MIN_RING_CAPACITY..=MAX_RING_CAPACITY).contains(&ring_capacity)
        {
            return Err(LayoutError::BadCapacity(ring_capacity));
        }
        Ok(ChannelLayout { ring_capacity })
    }

    /// The layout of a region of exactly `size` bytes.
    pub fn for_region_size(size: usize) -> Result<Self, LayoutError> {
        let fixed = core::mem::size_of::<ChannelHeader>() + 2 * core::mem::size_of::<RingHeader>();
        let capacity = size.checked_sub(fixed).map(|rest| rest / 2).unwrap_or(0);
        let layout = ChannelLayout::new(u32::try_from(capacity).unwrap_or(0))?;
        if layout.region_size() != size {
            return Err(LayoutError::RegionTooSmall {
                needed: layout.region_size(),
                got: size,
            });
        }
        Ok(layout)
    }

    /// Offset of the header of the ring for `dir`.
    pub fn ring_header(&self, dir: Direction) -> usize {
        let first = core::mem::size_of::<ChannelHeader>();
        match dir {
            Direction::Requests => first,
            Direction::Responses => {
                first + core::mem::size_of::<RingHeader>() + self.ring_capacity as usize
            }
        }
    }

    /// Offset of the data area of the ring for `dir`.
    pub fn ring_data(&self, dir: Direction) -> usize {
        self.ring_header(dir) + core::mem::size_of::<RingHeader>()
    }

    /// Total bytes of a channel region.
    pub fn region_size(&self) -> usize {
        self.ring_data(Direction::Responses) + self.ring_capacity as usize
    }

    /// Reads and checks the header at the start of `mem` (a snapshot; atomics are read by
    /// [`crate::ring`]).
    pub fn from_region(mem: &[u8]) -> Result<Self, LayoutError> {
        let (header, _) =
            ChannelHeader::read_from_prefix(mem).map_err(|_| LayoutError::BadHeader)?;
        if header.magic != CHANNEL_MAGIC || header.version != LAYOUT_VERSION {
            return Err(LayoutError::BadHeader);
        }
        let layout = ChannelLayout::new(header.ring_capacity)?;
        if mem.len() < layout.region_size() {
            return Err(LayoutError::RegionTooSmall {
                needed: layout.region_size(),
                got: mem.len(),
            });
        }
        Ok(layout)
    }

    /// Writes a fresh channel into zeroed memory `mem`.
    pub fn initialise(&self, mem: &mut [u8]) -> Result<(), LayoutError> {
        if mem.len() < self.region_size() {
            return Err(LayoutError::RegionTooSmall {
                needed: self.region_size(),
                got: mem.len(),
            });
        }
        let header = ChannelHeader {
            magic: CHANNEL_MAGIC,
            version: LAYOUT_VERSION,
            epoch: 1,
            server_state: ServerState::Down as u32,
            ring_capacity: self.ring_capacity,
            _reserved: [0; 11],
        };
        header
            .write_to_prefix(mem)
            .map_err(|_| LayoutError::BadHeader)?;
        for dir in [Direction::Requests, Direction::Responses] {
            let ring = RingHeader {
                info: RingInfo {
                    magic: RING_MAGIC,
                    capacity: self.ring_capacity,
                    _reserved: [0; 14],
                },
                producer: ProducerLine::new_zeroed(),
                consumer: ConsumerLine::new_zeroed(),
                sleep: SleepLine::new_zeroed(),
            };
            ring.write_to_prefix(&mut mem[self.ring_header(dir)..])
                .map_err(|_| LayoutError::BadHeader)?;
        }
        Ok(())
    }
}

/// Bytes a frame with `payload` bytes occupies in a ring, header and padding included.
pub fn frame_footprint(payload: usize) -> usize {
    (FRAME_HEADER_SIZE + payload).next_multiple_of(FRAME_ALIGN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_rejects_capacities_that_are_not_powers_of_two_or_out_of_range() {
        assert!(ChannelLayout::new(4096).is_ok());
        assert_eq!(
            ChannelLayout::new(5000),
            Err(LayoutError::BadCapacity(5000))
        );
        assert_eq!(
            ChannelLayout::new(1024),
            Err(LayoutError::BadCapacity(1024))
        );
        assert_eq!(
            ChannelLayout::new(1 << 30),
            Err(LayoutError::BadCapacity(1 << 30))
        );
    }

    #[test]
    fn rings_are_cache_line_aligned_and_do_not_overlap() {
        let l = ChannelLayout::new(8192).unwrap();
        assert_eq!(l.ring_header(Direction::Requests) % CACHE_LINE, 0);
        assert_eq!(l.ring_header(Direction::Responses) % CACHE_LINE, 0);
        assert!(l.ring_data(Direction::Requests) + 8192 <= l.ring_header(Direction::Responses));
        assert_eq!(l.region_size(), 64 + 2 * (256 + 8192));
    }

    #[test]
    fn layout_follows_from_the_region_size_alone() {
        let l = ChannelLayout::new(8192).unwrap();
        assert_eq!(ChannelLayout::for_region_size(l.region_size()), Ok(l));
        assert!(ChannelLayout::for_region_size(l.region_size() + 16).is_err());
        assert!(ChannelLayout::for_region_size(4096).is_err());
        assert!(ChannelLayout::for_region_size(0).is_err());
    }

    #[test]
    fn initialised_region_reads_back() {
        let l = ChannelLayout::new(4096).unwrap();
        let mut mem = std::vec![0u8; l.region_size()];
        l.initialise(&mut mem).unwrap();
        assert_eq!(ChannelLayout::from_region(&mem), Ok(l));
        mem[0] ^= 1;
        assert_eq!(
            ChannelLayout::from_region(&mem),
            Err(LayoutError::BadHeader)
        );
    }
}

/// `"PVST"`.
pub const STATUS_MAGIC: u32 = 0x5453_5650;
/// Value of [`StatusPage::violation_syscall`] when no violation happened.
pub const NO_VIOLATION: u32 = u32::MAX;

/// A page shared by one service and the supervisor: what the supervisor needs to know even
/// after the service died (which syscall its sandbox refused).
///
/// The service writes it, so the supervisor treats it as a claim, not a fact: the death
/// itself (by SIGSYS, or the runtime's violation exit status) is what proves the violation;
/// the page only names the syscall.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug)]
#[repr(C, align(64))]
pub struct StatusPage {
    pub magic: u32,
    /// Syscall number that the seccomp filter refused, or [`NO_VIOLATION`].
    pub violation_syscall: u32,
    pub _reserved: [u32; 14],
}

const _: () = assert!(core::mem::size_of::<StatusPage>() == CACHE_LINE);

/// Exit status the runtime uses after a seccomp violation (128 + SIGSYS, as a shell would
/// show a death by SIGSYS).
pub const VIOLATION_EXIT_STATUS: i32 = 128 + 31;

impl ChannelHeader {
    /// Checks magic and version at the start of `mem` and returns the ring capacity.
    pub fn read_header(mem: &[u8]) -> Result<u32, LayoutError> {
        let (header, _) =
            ChannelHeader::read_from_prefix(mem).map_err(|_| LayoutError::BadHeader)?;
        if header.magic != CHANNEL_MAGIC || header.version != LAYOUT_VERSION {
            return Err(LayoutError::BadHeader);
        }
        Ok(header.ring_capacity)
    }
}
