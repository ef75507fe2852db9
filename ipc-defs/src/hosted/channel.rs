//! Channel ends: a client that makes calls and a server that answers them, over the two rings
//! of one shared region, with spin-then-futex waiting and epoch checks.

use std::io;
use std::marker::PhantomData;
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicU32;
use std::time::Duration;
use std::time::Instant;

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::shm::SharedMemory;
use super::sys;
use crate::endpoint::Envelope;
use crate::layout::frame_footprint;
use crate::layout::ChannelLayout;
use crate::layout::Direction;
use crate::layout::Epoch;
use crate::layout::LayoutError;
use crate::layout::ServerState;
use crate::ring::Channel;
use crate::ring::Ring;
use crate::ring::RingError;
use crate::ring::Wake;

/// How long a waiter spins before it sleeps in the kernel.
///
/// A spinning cross-core hand-off costs ~120 ns on our machines while any blocking wake-up
/// costs ~47 us; spinning for about one blocking wake-up's worth bounds the loss of either
/// choice to 2x (the classic ski-rental argument), and answers from a busy peer never pay the
/// 47 us.
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);

/// Longest a waiter sleeps before it re-checks the channel state on its own (a safety net: the
/// supervisor wakes every sleeper when an epoch changes).
pub const RECHECK_INTERVAL: Duration = Duration::from_millis(100);

/// A deadline that reads the clock only once someone has to wait: the fast path of a call
/// (reply already there after a few polls) never pays for a clock read.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    timeout: Duration,
    at: Option<Instant>,
}

impl Deadline {
    fn new(timeout: Duration) -> Deadline {
        Deadline { timeout, at: None }
    }

    /// Time left (starting the clock on first use).
    fn remaining(&mut self) -> Duration {
        let now = Instant::now();
        let at = *self.at.get_or_insert_with(|| {
            now.checked_add(self.timeout)
                .unwrap_or(now + Duration::from_secs(86_400 * 365))
        });
        at.saturating_duration_since(now)
    }
}

/// Old-epoch frames a server drops in one `try_next` before it turns to other work.
const MAX_STALE_PER_POLL: usize = 64;

/// How a channel end waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitPolicy {
    /// Spin this long before sleeping; zero sleeps at once.
    pub spin: Duration,
    /// Never sleep (burn the core; for latency benchmarks).
    pub spin_only: bool,
}

impl Default for WaitPolicy {
    /// Spin-then-sleep where a peer can run on another CPU at the same time; sleep at once
    /// on a machine with one CPU (spinning there only delays the peer it waits for; a spinner
    /// also yields, see [`spin_yield`], for peers that happen to share its CPU). The CPU count
    /// is read once per process (a service reads it before it enters its sandbox).
    fn default() -> Self {
        static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        if *CPUS.get_or_init(sys::online_cpus) > 1 {
            WaitPolicy {
                spin: DEFAULT_SPIN,
                spin_only: false,
            }
        } else {
            WaitPolicy::BLOCKING
        }
    }
}

impl WaitPolicy {
    pub const BLOCKING: WaitPolicy = WaitPolicy {
        spin: Duration::ZERO,
        spin_only: false,
    };
    pub const SPINNING: WaitPolicy = WaitPolicy {
        spin: Duration::MAX,
        spin_only: true,
    };
}

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("descriptor is not a mappable shared region: {0}")]
    Map(#[from] io::Error),
    #[error("shared region is not a channel of this version: {0:?}")]
    Layout(LayoutError),
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("server restarted (request sent in epoch {sent_in}, channel now in epoch {now}); the request may or may not have been carried out")]
    PeerRestarted { sent_in: Epoch, now: Epoch },
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
    #[error("ring: {0}")]
    Ring(RingError),
    #[error("request could not be encoded (too large for the ring or not encodable)")]
    Encode,
    #[error("server sent a reply that is not valid postcard for this interface")]
    MalformedReply,
}

/// A channel region mapped into this process.
#[derive(Debug)]
pub struct ChannelMemory {
    shm: SharedMemory,
    layout: ChannelLayout,
}

impl ChannelMemory {
    /// Creates a fresh channel region (microkernel).
    pub fn create(name: &str, ring_capacity: u32) -> Result<ChannelMemory, OpenError> {
        let layout = ChannelLayout::new(ring_capacity).map_err(OpenError::Layout)?;
        let shm = SharedMemory::create(name, layout.region_size())?;
        let mut header = vec![0u8; layout.region_size()];
        layout.initialise(&mut header).map_err(OpenError::Layout)?;
        shm.write(0, &header)?;
        Ok(ChannelMemory { shm, layout })
    }

    /// Maps a channel received as a capability, checking its header.
    pub fn open(fd: OwnedFd) -> Result<ChannelMemory, OpenError> {
        let shm = SharedMemory::map(fd, true)?;
        // The layout comes from the region's size, which the microkernel sealed, not from the
        // header, which the peer can write: a peer that scribbles over the header cannot stop
        // the other end from (re)attaching.
        let layout = ChannelLayout::for_region_size(shm.len()).map_err(OpenError::Layout)?;
        Ok(ChannelMemory { shm, layout })
    }

    /// Supervisor: rewrites the header's static fields (magic, version, capacities), which a
    /// peer may have scribbled over; the epoch and server state are left as they are.
    pub fn repair_header(&self) {
        self.channel().repair_header();
    }

    /// The channel, for as long as this mapping is borrowed.
    pub fn channel(&self) -> Channel<'_> {
        // SAFETY: the mapping is page-aligned and at least `layout.region_size()` long
        // (checked in `create`/`open`), and it lives in `self.shm`, which the returned
        // channel's lifetime borrows.
        unsafe { Channel::from_raw(self.shm.as_ptr(), self.layout) }
    }

    pub fn shm(&self) -> &SharedMemory {
        &self.shm
    }

    /// Supervisor: one end of the channel died. Repair the rings it used (drop what it left
    /// unread on the ring it consumed; point the ring it produced at the slot its peer waits
    /// at), move the channel to a new epoch, and wake everyone so that survivors notice.
    pub fn restart_epoch(&self, consumed: Direction) -> Epoch {
        let next = self.channel().restart_epoch(consumed);
        self.wake_all();
        next
    }

    /// Supervisor: records whether the server runs, and wakes everyone.
    pub fn set_server_state(&self, state: ServerState) {
        self.channel().set_server_state(state);
        self.wake_all();
    }

    fn wake_all(&self) {
        for dir in [Direction::Requests, Direction::Responses] {
            let ring = self.channel().ring(dir);
            ring.bump_all();
            sys::futex_wake(ring.data_seq(), i32::MAX);
            sys::futex_wake(ring.space_seq(), i32::MAX);
        }
    }
}

fn wake(ring: &Ring<'_>, wake: Wake) {
    if wake == Wake::Peer {
        sys::futex_wake(ring.data_seq(), 1);
    }
}

fn wake_space(ring: &Ring<'_>, wake: Wake) {
    if wake == Wake::Peer {
        sys::futex_wake(ring.space_seq(), 1);
    }
}

/// Polls between two looks at the clock: reading it costs about as much as a cross-core
/// hand-off, so a spinning waiter reads it only every 64 polls; a blocking one looks at once.
fn polls_between_clock_reads(policy: WaitPolicy) -> u32 {
    if policy.spin.is_zero() && !policy.spin_only {
        1
    } else {
        64
    }
}

/// Between polls of a spin: lets another runnable task of this CPU go first. The peer a
/// spinner waits for may have been placed on the spinner's own CPU; without the yield it
/// would run only when the spin ends (50 us per hand-off, twice per call). With nothing
/// else runnable here the yield returns at once. Pure spinners (benchmarks) do not yield.
fn spin_yield(policy: WaitPolicy) {
    if !policy.spin_only {
        std::thread::yield_now();
    }
}

/// Waits until `ring` has data, `stop()` says to give up, or `deadline` passes. Returns
/// whether data is there.
fn wait_for_data(
    ring: &Ring<'_>,
    policy: WaitPolicy,
    deadline: &mut Deadline,
    mut stop: impl FnMut() -> bool,
) -> bool {
    let mut spin_until: Option<Instant> = None;
    let polls = polls_between_clock_reads(policy);
    let mut i = 0u32;
    loop {
        if ring.has_data() {
            return true;
        }
        std::hint::spin_loop();
        i = i.wrapping_add(1);
        if !i.is_multiple_of(polls) {
            continue;
        }
        if stop() {
            return false;
        }
        let left = deadline.remaining();
        if left.is_zero() {
            return false;
        }
        let now = Instant::now();
        let spin_end =
            *spin_until.get_or_insert_with(|| now.checked_add(policy.spin).unwrap_or(now + left));
        if policy.spin_only || now < spin_end {
            spin_yield(policy);
            continue;
        }
        wake_space(ring, ring.release());
        if let Some(seq) = ring.prepare_sleep() {
            sys::futex_wait(ring.data_seq(), seq, Some(left.min(RECHECK_INTERVAL)));
            ring.finish_sleep();
        }
    }
}

/// Waits until any ring in `rings` has data or `timeout` passes (a server's idle wait).
pub fn wait_any(rings: &[Ring<'_>], policy: WaitPolicy, timeout: Duration) {
    // The clock is first read after 64 polls: a request that arrives at once costs none.
    let mut started: Option<Instant> = None;
    let polls = polls_between_clock_reads(policy);
    let mut i = 0u32;
    loop {
        if rings.iter().any(Ring::has_data) {
            return;
        }
        std::hint::spin_loop();
        i = i.wrapping_add(1);
        if !i.is_multiple_of(polls) {
            continue;
        }
        let now = Instant::now();
        let start = *started.get_or_insert(now);
        let waited = now.duration_since(start);
        if waited >= timeout {
            return;
        }
        if policy.spin_only || waited < policy.spin {
            spin_yield(policy);
            continue;
        }
        let mut words: Vec<(&AtomicU32, u32)> = Vec::with_capacity(rings.len());
        let mut ready = false;
        for ring in rings {
            wake_space(ring, ring.release());
            match ring.prepare_sleep() {
                Some(seq) => words.push((ring.data_seq(), seq)),
                None => {
                    ready = true;
                    break;
                }
            }
        }
        if !ready {
            match words.as_slice() {
                // One ring: the plain futex wait is the cheaper kernel path.
                [(word, seq)] => sys::futex_wait(word, *seq, Some(timeout - waited)),
                _ => {
                    let _ = sys::futex_wait_any(&words, Some(timeout - waited));
                }
            }
        }
        for ring in rings {
            ring.finish_sleep();
        }
        return;
    }
}

/// A request sent with [`ClientEnd::send`] or [`ClientEnd::start`], whose reply
/// [`ClientEnd::try_reply`] or [`ClientEnd::wait_reply`] looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    epoch: Epoch,
    tag: u32,
    /// The request ring's byte position just past the frame: the server has taken the
    /// request once its read position reaches it.
    end: u64,
}

impl Sent {
    /// The epoch it was sent in.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }
}

/// The calling end of a channel, for requests of type `Q` answered by `R`.
#[derive(Debug)]
pub struct ClientEnd<Q, R> {
    mem: ChannelMemory,
    next_tag: u32,
    tx: Vec<u8>,
    rx: Vec<u8>,
    policy: WaitPolicy,
    _types: PhantomData<fn(Q) -> R>,
}

impl<Q: Serialize, R: DeserializeOwned> ClientEnd<Q, R> {
    pub fn new(mem: ChannelMemory, policy: WaitPolicy) -> ClientEnd<Q, R> {
        let capacity = mem.channel().layout().ring_capacity as usize;
        ClientEnd {
            mem,
            next_tag: 1,
            tx: vec![0; capacity],
            rx: vec![0; capacity],
            policy,
            _types: PhantomData,
        }
    }

    pub fn memory(&self) -> &ChannelMemory {
        &self.mem
    }

    /// The same channel, speaking the interface's own message types (the runtime hands out
    /// calling ends typed for the common ping only).
    pub fn into_typed<Q2: Serialize, R2: DeserializeOwned>(self) -> ClientEnd<Q2, R2> {
        ClientEnd {
            mem: self.mem,
            next_tag: self.next_tag,
            tx: self.tx,
            rx: self.rx,
            policy: self.policy,
            _types: PhantomData,
        }
    }

    pub fn epoch(&self) -> Epoch {
        self.mem.channel().epoch()
    }

    pub fn set_policy(&mut self, policy: WaitPolicy) {
        self.policy = policy;
    }

    /// Sends `request` and waits up to `timeout` for its reply.
    ///
    /// If the server restarts meanwhile the call fails with [`CallError::PeerRestarted`]; the
    /// caller decides whether the request is idempotent and may be retried.
    pub fn call(&mut self, request: &Q, timeout: Duration) -> Result<R, CallError> {
        self.call_with(request, timeout)
    }

    /// [`ClientEnd::call`], running `notify` once the request is on the ring (the partition
    /// signals a device's doorbell eventfd there: a device that waits on that descriptor,
    /// not on the ring, is woken by it).
    pub fn call_notifying(
        &mut self,
        request: &Q,
        timeout: Duration,
        notify: impl FnOnce(),
    ) -> Result<R, CallError> {
        let mut deadline = Deadline::new(timeout);
        let epoch = self.mem.channel().epoch();
        let (tag, encoded) = self.encode(request)?;
        self.send_frame(epoch, encoded, &mut deadline, timeout)?;
        notify();
        self.await_reply(epoch, tag, &mut deadline, timeout)
    }

    /// [`ClientEnd::call`] with message types of the caller's choosing: for a channel that a
    /// runtime handed out typed for pings, used by a service for its interface's messages.
    pub fn call_with<Q2: Serialize, R2: DeserializeOwned>(
        &mut self,
        request: &Q2,
        timeout: Duration,
    ) -> Result<R2, CallError> {
        let mut deadline = Deadline::new(timeout);
        let epoch = self.mem.channel().epoch();
        let (tag, encoded) = self.encode(request)?;
        self.send_frame(epoch, encoded, &mut deadline, timeout)?;
        self.await_reply(epoch, tag, &mut deadline, timeout)
    }

    /// Sends `request` without waiting, neither for its reply nor for room in the ring (a
    /// full ring is `CallError::Ring(RingError::Full)`); [`ClientEnd::try_reply`] looks for
    /// the reply. For a caller that must not block, such as the supervisor's loop.
    pub fn send(&mut self, request: &Q) -> Result<Sent, CallError> {
        let epoch = self.mem.channel().epoch();
        let (tag, encoded) = self.encode(request)?;
        let ring = self.mem.channel().ring(Direction::Requests);
        let woken = ring
            .try_send(epoch, &self.tx[..encoded])
            .map_err(CallError::Ring)?;
        wake(&ring, woken);
        Ok(Sent {
            epoch,
            tag,
            end: ring.counters().0,
        })
    }

    /// Sends `request`, waiting up to `timeout` for room in the ring but not for the reply,
    /// which [`ClientEnd::wait_reply`] waits for: for a caller with other work between looks
    /// (answering its own control channel, say).
    pub fn start(&mut self, request: &Q, timeout: Duration) -> Result<Sent, CallError> {
        let mut deadline = Deadline::new(timeout);
        let epoch = self.mem.channel().epoch();
        let (tag, encoded) = self.encode(request)?;
        self.send_frame(epoch, encoded, &mut deadline, timeout)?;
        Ok(Sent {
            epoch,
            tag,
            end: self.mem.channel().ring(Direction::Requests).counters().0,
        })
    }

    /// Waits up to `timeout` for the reply to `sent`: `None` if it has not come yet (ask
    /// again), [`CallError::PeerRestarted`] if the server restarted since it was sent.
    pub fn wait_reply(&mut self, sent: Sent, timeout: Duration) -> Result<Option<R>, CallError> {
        let mut deadline = Deadline::new(timeout);
        self.reply_within(sent.epoch, sent.tag, &mut deadline)
    }

    /// Whether the server has taken `sent` off the ring (it may not have answered yet). Only
    /// meaningful while the epoch is `sent`'s: a restart discards what was not taken.
    pub fn taken(&self, sent: Sent) -> bool {
        let read = self.mem.channel().ring(Direction::Requests).read_position();
        // Positions only grow (wrapping after 2^64 bytes): `read` is at or past `end` when
        // the distance from `end` to it is "small".
        read.wrapping_sub(sent.end) < 1 << 63
    }

    /// What the supervisor says of the server: up, down (restarting) or gone for good.
    pub fn server_state(&self) -> ServerState {
        self.mem.channel().server_state()
    }

    /// The reply to `sent` if it has arrived, never waiting. Replies to other requests (late
    /// ones to calls that gave up) are dropped on the way, a bounded number per look.
    pub fn try_reply(&mut self, sent: Sent) -> Result<Option<R>, CallError> {
        let ring = self.mem.channel().ring(Direction::Responses);
        for _ in 0..MAX_STALE_PER_POLL {
            wake_space(&ring, ring.release());
            match ring.try_recv(&mut self.rx) {
                Ok(Some(frame)) if frame.epoch == sent.epoch => {
                    let reply: Envelope<R> = postcard::from_bytes(&self.rx[..frame.len])
                        .map_err(|_| CallError::MalformedReply)?;
                    if reply.tag == sent.tag {
                        return Ok(Some(reply.body));
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => return Err(CallError::Ring(e)),
            }
        }
        let now = self.mem.channel().epoch();
        if now != sent.epoch {
            return Err(CallError::PeerRestarted {
                sent_in: sent.epoch,
                now,
            });
        }
        Ok(None)
    }

    /// Encodes `request` with the next tag into the send buffer: (tag, length).
    fn encode<Q2: Serialize>(&mut self, request: &Q2) -> Result<(u32, usize), CallError> {
        let tag = self.next_tag;
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        let envelope = Envelope { tag, body: request };
        let max = self.mem.channel().ring(Direction::Requests).max_payload();
        match postcard::to_slice(&envelope, &mut self.tx[..max]) {
            Ok(b) => Ok((tag, b.len())),
            Err(postcard::Error::SerializeBufferFull) => {
                let len = postcard::to_allocvec(&envelope).map_or(usize::MAX, |v| v.len());
                Err(CallError::Ring(RingError::FrameTooLarge {
                    len,
                    capacity: max + crate::layout::FRAME_HEADER_SIZE,
                }))
            }
            Err(_) => Err(CallError::Encode),
        }
    }

    fn send_frame(
        &mut self,
        epoch: Epoch,
        len: usize,
        deadline: &mut Deadline,
        timeout: Duration,
    ) -> Result<(), CallError> {
        let ring = self.mem.channel().ring(Direction::Requests);
        loop {
            match ring.try_send(epoch, &self.tx[..len]) {
                Ok(w) => {
                    wake(&ring, w);
                    return Ok(());
                }
                Err(RingError::Full) => {}
                Err(e) => return Err(CallError::Ring(e)),
            }
            let now_epoch = self.mem.channel().epoch();
            if now_epoch != epoch {
                return Err(CallError::PeerRestarted {
                    sent_in: epoch,
                    now: now_epoch,
                });
            }
            let left = deadline.remaining();
            if left.is_zero() {
                return Err(CallError::TimedOut(timeout));
            }
            if let Some(seq) = ring.prepare_space_sleep(frame_footprint(len)) {
                sys::futex_wait(ring.space_seq(), seq, Some(left.min(RECHECK_INTERVAL)));
                ring.finish_space_sleep();
            }
        }
    }

    fn await_reply<R2: DeserializeOwned>(
        &mut self,
        epoch: Epoch,
        tag: u32,
        deadline: &mut Deadline,
        timeout: Duration,
    ) -> Result<R2, CallError> {
        self.reply_within(epoch, tag, deadline)?
            .ok_or(CallError::TimedOut(timeout))
    }

    /// The reply tagged `tag` of `epoch`, if it comes before `deadline` (`None` if not).
    fn reply_within<R2: DeserializeOwned>(
        &mut self,
        epoch: Epoch,
        tag: u32,
        deadline: &mut Deadline,
    ) -> Result<Option<R2>, CallError> {
        let ring = self.mem.channel().ring(Direction::Responses);
        loop {
            // Hand back the previous reply's bytes while the server works on this request.
            wake_space(&ring, ring.release());
            match ring.try_recv(&mut self.rx) {
                Ok(Some(frame)) => {
                    if frame.epoch == epoch {
                        let reply: Envelope<R2> = postcard::from_bytes(&self.rx[..frame.len])
                            .map_err(|_| CallError::MalformedReply)?;
                        if reply.tag == tag {
                            return Ok(Some(reply.body));
                        }
                    }
                    // A reply from before a restart, or a late one to a call that gave up.
                    // A peer that floods such frames must not keep us here past the deadline.
                    if deadline.remaining().is_zero() {
                        return Ok(None);
                    }
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(CallError::Ring(e)),
            }
            let channel = self.mem.channel();
            let waited = wait_for_data(&ring, self.policy, deadline, || channel.epoch() != epoch);
            if !waited {
                let now_epoch = channel.epoch();
                if now_epoch != epoch {
                    return Err(CallError::PeerRestarted {
                        sent_in: epoch,
                        now: now_epoch,
                    });
                }
                if deadline.remaining().is_zero() {
                    return Ok(None);
                }
            }
        }
    }
}

/// A request taken off a server's ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Incoming {
    pub tag: u32,
    pub epoch: Epoch,
    pub len: usize,
}

/// What went wrong receiving a request; the server counts it and carries on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    #[error("ring: {0}")]
    Ring(RingError),
    #[error("request frame of {len} bytes has no decodable tag")]
    NoTag { len: usize },
    #[error("reply could not be encoded into the ring")]
    ReplyTooLarge,
}

/// The serving end of a channel.
#[derive(Debug)]
pub struct ServerEnd {
    mem: ChannelMemory,
    rx: Vec<u8>,
    tx: Vec<u8>,
    /// Frames of an earlier epoch dropped so far.
    pub stale_dropped: u64,
}

impl ServerEnd {
    pub fn new(mem: ChannelMemory) -> ServerEnd {
        let capacity = mem.channel().layout().ring_capacity as usize;
        ServerEnd {
            mem,
            rx: vec![0; capacity],
            tx: vec![0; capacity],
            stale_dropped: 0,
        }
    }

    pub fn request_ring(&self) -> Ring<'_> {
        self.mem.channel().ring(Direction::Requests)
    }

    pub fn memory(&self) -> &ChannelMemory {
        &self.mem
    }

    /// Takes the next current-epoch request, if any. The payload (tag and body, postcard) is
    /// in [`ServerEnd::payload`] until the next call.
    pub fn try_next(&mut self) -> Result<Option<Incoming>, ServeError> {
        let ring = self.mem.channel().ring(Direction::Requests);
        // Stale frames dropped per call: a client flooding old-epoch frames gets a bounded
        // share of the server, like any other client.
        for _ in 0..MAX_STALE_PER_POLL {
            // The previous request has been answered: hand its bytes back now.
            wake_space(&ring, ring.release());
            let Some(frame) = ring.try_recv(&mut self.rx).map_err(ServeError::Ring)? else {
                return Ok(None);
            };
            if frame.epoch != self.mem.channel().epoch() {
                self.stale_dropped += 1;
                continue;
            }
            let (tag, _) = postcard::take_from_bytes::<u32>(&self.rx[..frame.len])
                .map_err(|_| ServeError::NoTag { len: frame.len })?;
            return Ok(Some(Incoming {
                tag,
                epoch: frame.epoch,
                len: frame.len,
            }));
        }
        Ok(None)
    }

    /// The payload of the last request [`ServerEnd::try_next`] returned.
    pub fn payload(&self, incoming: &Incoming) -> &[u8] {
        &self.rx[..incoming.len.min(self.rx.len())]
    }

    /// Decodes the last request as an `Envelope<B>`.
    pub fn decode<B: DeserializeOwned>(&self, incoming: &Incoming) -> Option<B> {
        postcard::from_bytes::<Envelope<B>>(self.payload(incoming))
            .ok()
            .map(|e| e.body)
    }

    /// Sends the reply to `incoming`. If the client does not drain its ring for `timeout`, the
    /// reply is dropped (a stuck client must not stall the server for everyone).
    pub fn reply<B: Serialize>(
        &mut self,
        incoming: &Incoming,
        body: &B,
        timeout: Duration,
    ) -> Result<(), ServeError> {
        let ring = self.mem.channel().ring(Direction::Responses);
        let envelope = Envelope {
            tag: incoming.tag,
            body,
        };
        let max = ring.max_payload();
        let len = postcard::to_slice(&envelope, &mut self.tx[..max])
            .map_err(|_| ServeError::ReplyTooLarge)?
            .len();
        let mut deadline = Deadline::new(timeout);
        loop {
            match ring.try_send(incoming.epoch, &self.tx[..len]) {
                Ok(w) => {
                    wake(&ring, w);
                    return Ok(());
                }
                Err(RingError::Full) => {}
                Err(e) => return Err(ServeError::Ring(e)),
            }
            let left = deadline.remaining();
            if left.is_zero() || self.mem.channel().epoch() != incoming.epoch {
                return Err(ServeError::Ring(RingError::Full));
            }
            if let Some(seq) = ring.prepare_space_sleep(frame_footprint(len)) {
                sys::futex_wait(ring.space_seq(), seq, Some(left.min(RECHECK_INTERVAL)));
                ring.finish_space_sleep();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;
    use crate::endpoint;

    type Client = ClientEnd<endpoint::Request<u32>, endpoint::Response<u32>>;

    /// Maps the same channel a second time, as another process would.
    fn second_mapping(mem: &ChannelMemory) -> ChannelMemory {
        let fd = mem.shm().as_fd().try_clone_to_owned().unwrap();
        ChannelMemory::open(fd).unwrap()
    }

    /// A server thread that answers `n` with `n + 1` until told to stop (or forever).
    fn serve(mem: ChannelMemory, answer: bool) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut server = ServerEnd::new(mem);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                match server.try_next() {
                    Ok(Some(incoming)) => {
                        let Some(request) = server.decode::<endpoint::Request<u32>>(&incoming)
                        else {
                            continue;
                        };
                        if !answer {
                            return; // dies with the request in flight
                        }
                        let reply = match request {
                            endpoint::Request::Service(n) => {
                                endpoint::Response::Service(n.wrapping_add(1))
                            }
                            endpoint::Request::Ping { nonce } => endpoint::Response::Pong { nonce },
                            endpoint::Request::Guest(_) => {
                                endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
                            }
                        };
                        if n_is_stop(&reply) {
                            let _ = server.reply(&incoming, &reply, Duration::from_secs(1));
                            return;
                        }
                        let _ = server.reply(&incoming, &reply, Duration::from_secs(1));
                    }
                    Ok(None) => wait_any(
                        &[server.request_ring()],
                        WaitPolicy::default(),
                        Duration::from_millis(50),
                    ),
                    Err(_) => {}
                }
            }
        })
    }

    fn n_is_stop(reply: &endpoint::Response<u32>) -> bool {
        matches!(reply, endpoint::Response::Service(0))
    }

    #[test]
    fn calls_round_trip_in_every_wait_mode() {
        for policy in [
            WaitPolicy::SPINNING,
            WaitPolicy::default(),
            WaitPolicy::BLOCKING,
        ] {
            let mem = ChannelMemory::create("test-modes", 4096).unwrap();
            let server = serve(second_mapping(&mem), true);
            let mut client: Client = ClientEnd::new(mem, policy);
            for n in 1..200u32 {
                let reply = client.call(&endpoint::Request::Service(n), Duration::from_secs(5));
                assert_eq!(reply, Ok(endpoint::Response::Service(n + 1)), "{policy:?}");
            }
            let _ = client.call(
                &endpoint::Request::Service(u32::MAX),
                Duration::from_secs(5),
            );
            drop(client);
            let _ = server.join();
        }
    }

    #[test]
    fn server_death_mid_call_is_a_typed_peer_restarted_and_the_retry_reaches_the_new_server() {
        let mem = ChannelMemory::create("test-restart", 4096).unwrap();
        let supervisor = second_mapping(&mem);
        let dying = serve(second_mapping(&mem), false);
        let mut client: Client = ClientEnd::new(mem, WaitPolicy::default());
        let before = client.epoch();
        // The "supervisor" notices the death and moves the channel to a new epoch.
        let watcher = std::thread::spawn(move || {
            dying.join().unwrap();
            let epoch = supervisor.restart_epoch(Direction::Requests);
            (supervisor, epoch)
        });
        let result = client.call(&endpoint::Request::Service(41), Duration::from_secs(5));
        let (supervisor, epoch) = watcher.join().unwrap();
        assert_eq!(
            result,
            Err(CallError::PeerRestarted {
                sent_in: before,
                now: epoch
            })
        );
        // The request was idempotent: retry against the restarted server.
        let restarted = serve(second_mapping(&supervisor), true);
        let reply = client.call(&endpoint::Request::Service(41), Duration::from_secs(5));
        assert_eq!(reply, Ok(endpoint::Response::Service(42)));
        let _ = client.call(
            &endpoint::Request::Service(u32::MAX),
            Duration::from_secs(5),
        );
        let _ = restarted.join();
    }

    #[test]
    fn a_sent_request_is_looked_for_without_waiting_and_other_replies_are_skipped() {
        let mem = ChannelMemory::create("test-send", 4096).unwrap();
        let supervisor = second_mapping(&mem);
        let mut server = ServerEnd::new(second_mapping(&mem));
        let mut client: Client = ClientEnd::new(mem, WaitPolicy::default());
        let first = client.send(&endpoint::Request::Service(1)).unwrap();
        // Nobody has answered: no reply, and no wait.
        assert_eq!(client.try_reply(first), Ok(None));
        let second = client.send(&endpoint::Request::Service(10)).unwrap();
        for _ in 0..2 {
            let incoming = server.try_next().unwrap().expect("a request");
            let Some(endpoint::Request::Service(n)) =
                server.decode::<endpoint::Request<u32>>(&incoming)
            else {
                panic!("not a service request");
            };
            server
                .reply(
                    &incoming,
                    &endpoint::Response::<u32>::Service(n + 1),
                    Duration::from_secs(1),
                )
                .unwrap();
        }
        // The reply to the first request (given up on) is skipped on the way to the second's.
        assert_eq!(
            client.try_reply(second),
            Ok(Some(endpoint::Response::Service(11)))
        );
        assert_eq!(client.try_reply(second), Ok(None));
        // A server that died meanwhile is a typed error, not an endless None.
        let third = client.send(&endpoint::Request::Service(5)).unwrap();
        let now = supervisor.restart_epoch(Direction::Requests);
        assert!(matches!(
            client.try_reply(third),
            Err(CallError::PeerRestarted { now: n, .. }) if n == now
        ));
    }

    #[test]
    fn a_started_request_is_known_untaken_until_the_server_takes_it_and_its_reply_awaited() {
        let mem = ChannelMemory::create("test-taken", 4096).unwrap();
        let supervisor = second_mapping(&mem);
        let mut server = ServerEnd::new(second_mapping(&mem));
        let mut client: Client = ClientEnd::new(mem, WaitPolicy::default());
        let first = client
            .start(&endpoint::Request::Service(1), Duration::from_secs(1))
            .unwrap();
        let second = client
            .start(&endpoint::Request::Service(2), Duration::from_secs(1))
            .unwrap();
        // Nobody took them: not taken, and no reply within a short wait.
        assert!(!client.taken(first) && !client.taken(second));
        assert_eq!(
            client.wait_reply(first, Duration::from_millis(20)),
            Ok(None)
        );
        // The server takes the first (and only the first).
        let incoming = server.try_next().unwrap().expect("a request");
        assert!(client.taken(first));
        assert!(!client.taken(second));
        server
            .reply(
                &incoming,
                &endpoint::Response::<u32>::Service(10),
                Duration::from_secs(1),
            )
            .unwrap();
        assert_eq!(
            client.wait_reply(first, Duration::from_secs(5)),
            Ok(Some(endpoint::Response::Service(10)))
        );
        // A restart discards what was not taken, and says so to whoever waits for it.
        let now = supervisor.restart_epoch(Direction::Requests);
        assert_eq!(second.epoch().next(), now);
        assert!(matches!(
            client.wait_reply(second, Duration::from_secs(5)),
            Err(CallError::PeerRestarted { now: n, .. }) if n == now
        ));
        assert_eq!(server.try_next(), Ok(None));
    }

    #[test]
    fn a_call_with_nobody_serving_times_out_instead_of_hanging() {
        let mem = ChannelMemory::create("test-timeout", 4096).unwrap();
        let mut client: Client = ClientEnd::new(mem, WaitPolicy::default());
        let start = Instant::now();
        let result = client.call(&endpoint::Request::Service(1), Duration::from_millis(200));
        assert_eq!(result, Err(CallError::TimedOut(Duration::from_millis(200))));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn oversized_request_is_a_typed_error() {
        let mem = ChannelMemory::create("test-big", 4096).unwrap();
        let mut client: ClientEnd<Vec<u8>, u32> = ClientEnd::new(mem, WaitPolicy::default());
        let result = client.call(&vec![0u8; 10_000], Duration::from_millis(100));
        assert!(
            matches!(
                result,
                Err(CallError::Ring(RingError::FrameTooLarge { .. }))
            ),
            "{result:?}"
        );
    }
}
