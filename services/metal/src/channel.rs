//! Channel ends over the `ipc-defs` rings the kernel maps into a task, with the same framing
//! and recovery rules as the hosted runtime: postcard [`Envelope`]s of
//! [`endpoint::Request`]/[`endpoint::Response`], tags to match replies, epochs to notice a
//! restarted peer. Waiting is the kernel's: `wait` on the slot's notification bit, and the
//! other end is woken with `notify` after every send and release.

use alloc::vec;
use alloc::vec::Vec;
use core::marker::PhantomData;
use core::ptr::NonNull;

use ipc_defs::capability::Grant;
use ipc_defs::endpoint;
use ipc_defs::endpoint::Envelope;
use ipc_defs::endpoint::ErrorCode;
use ipc_defs::layout::ChannelLayout;
use ipc_defs::layout::Direction;
use ipc_defs::layout::Epoch;
use ipc_defs::layout::ServerState;
use ipc_defs::metal::BootGrant;
use ipc_defs::metal::TaskBoot;
use ipc_defs::ring::Channel;
use ipc_defs::ring::RingError;
use ipc_defs::Interface;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::sys;

/// Why a call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The server restarted (or the channel was reset) while the call was in flight; the
    /// request may or may not have been carried out.
    PeerRestarted,
    /// The server is gone for good (its restart policy gave up).
    Gone,
    /// No reply within the deadline.
    Timeout,
    /// The request does not fit the ring, or could not be encoded.
    TooLarge,
    /// The reply could not be decoded.
    Malformed,
    /// The ring's indices are impossible (the peer wrote garbage).
    Ring,
    /// The server answered with an error.
    Refused(ErrorCode),
}

/// The channel in a boot record slot.
fn open(boot: &TaskBoot, slot: usize) -> Option<Channel<'static>> {
    let s = boot.slots.get(slot)?;
    let layout = ChannelLayout::for_region_size(s.size as usize).ok()?;
    // SAFETY: the kernel maps the channel's pages at `address`, `size` bytes, for the task's
    // whole life (its slots never change while it runs); the peer changes them concurrently,
    // which the ring expects.
    Some(unsafe { Channel::from_raw(NonNull::new(s.address as *mut u8)?, layout) })
}

/// The calling end of a channel, speaking `Q` and `R`.
pub struct Client<Q, R> {
    slot: usize,
    channel: Channel<'static>,
    tag: u32,
    buffer: Vec<u8>,
    _types: PhantomData<(Q, R)>,
}

impl<Q: Serialize, R: DeserializeOwned> Client<Q, R> {
    /// The first slot calling `interface` whose peer is `server` (any peer if `None`).
    pub fn find(boot: &TaskBoot, interface: Interface, server: Option<&str>) -> Option<Self> {
        let slot = boot.slots.iter().position(|s| {
            s.grant == BootGrant::Client(interface) && server.is_none_or(|n| n == s.name)
        })?;
        Self::at(boot, slot)
    }

    /// The calling end in slot `slot` (`None` if the slot holds no channel).
    pub fn at(boot: &TaskBoot, slot: usize) -> Option<Self> {
        let channel = open(boot, slot)?;
        Some(Client {
            slot,
            channel,
            tag: 0,
            buffer: vec![0; channel.layout().ring_capacity as usize],
            _types: PhantomData,
        })
    }

    /// The channel's current epoch (it changes when either end restarts).
    pub fn epoch(&self) -> Epoch {
        self.channel.epoch()
    }

    /// Sends `request` and waits until `deadline_ns` (since boot) for its reply.
    pub fn call(&mut self, request: Q, deadline_ns: u64) -> Result<R, CallError> {
        let response: endpoint::Response<R> =
            self.exchange(endpoint::Request::Service(request), deadline_ns)?;
        match response {
            endpoint::Response::Service(r) => Ok(r),
            endpoint::Response::Error(code) => Err(CallError::Refused(code)),
            _ => Err(CallError::Malformed),
        }
    }

    /// A ping through the channel (answered by the server's runtime).
    pub fn ping(&mut self, nonce: u64, deadline_ns: u64) -> Result<(), CallError> {
        match self.exchange::<endpoint::Response<R>>(
            endpoint::Request::<Q>::Ping { nonce },
            deadline_ns,
        )? {
            endpoint::Response::Pong { nonce: n } if n == nonce => Ok(()),
            _ => Err(CallError::Malformed),
        }
    }

    fn exchange<T: DeserializeOwned>(
        &mut self,
        request: endpoint::Request<Q>,
        deadline_ns: u64,
    ) -> Result<T, CallError> {
        let bit = 1u32 << self.slot;
        // Wait out a server that is restarting; a gone one never answers.
        loop {
            match self.channel.server_state() {
                ServerState::Gone => return Err(CallError::Gone),
                ServerState::Up | ServerState::Unresponsive => break,
                ServerState::Down => {
                    if sys::wait(bit, deadline_ns) == 0 && sys::now_ns() >= deadline_ns {
                        return Err(CallError::Timeout);
                    }
                }
            }
        }
        let epoch = self.channel.epoch();
        self.tag = self.tag.wrapping_add(1);
        let tag = self.tag;
        let envelope = Envelope { tag, body: request };
        let len = postcard::to_slice(&envelope, &mut self.buffer)
            .map_err(|_| CallError::TooLarge)?
            .len();
        let requests = self.channel.ring(Direction::Requests);
        loop {
            match requests.try_send(epoch, &self.buffer[..len]) {
                Ok(_) => break,
                Err(RingError::Full) => {
                    sys::notify(self.slot);
                    if sys::wait(bit, deadline_ns) == 0 && sys::now_ns() >= deadline_ns {
                        return Err(CallError::Timeout);
                    }
                    if self.channel.epoch() != epoch {
                        return Err(CallError::PeerRestarted);
                    }
                }
                Err(RingError::FrameTooLarge { .. }) => return Err(CallError::TooLarge),
                Err(_) => return Err(CallError::Ring),
            }
        }
        sys::notify(self.slot);
        let responses = self.channel.ring(Direction::Responses);
        loop {
            if self.channel.epoch() != epoch {
                return Err(CallError::PeerRestarted);
            }
            match responses.try_recv(&mut self.buffer) {
                Ok(Some(frame)) => {
                    let reply = postcard::from_bytes::<Envelope<T>>(&self.buffer[..frame.len]);
                    let _ = responses.release();
                    sys::notify(self.slot);
                    match reply {
                        Ok(r) if frame.epoch == epoch && r.tag == tag => return Ok(r.body),
                        // A late reply to an earlier call, or one from an older epoch.
                        Ok(_) => continue,
                        Err(_) if frame.epoch == epoch => return Err(CallError::Malformed),
                        Err(_) => continue,
                    }
                }
                Ok(None) => {
                    if sys::wait(bit, deadline_ns) == 0 && sys::now_ns() >= deadline_ns {
                        return Err(CallError::Timeout);
                    }
                }
                Err(RingError::BufferTooSmall { .. }) | Err(RingError::BadLength { .. }) => {
                    return Err(CallError::Malformed)
                }
                Err(_) => return Err(CallError::Ring),
            }
        }
    }
}

/// Who made the request being handled.
pub struct Caller<'a> {
    /// The client task's name.
    pub name: &'a str,
    /// What its channel grants (from the manifest's `calls` entry).
    pub grant: Grant,
}

/// Serves every channel of `interface` this task holds, for ever: `handler` answers the
/// interface's requests, the runtime answers pings and refuses what it cannot decode.
pub fn serve<Q, R>(
    boot: &TaskBoot,
    interface: Interface,
    mut handler: impl FnMut(&Caller, Q) -> endpoint::Response<R>,
) -> !
where
    Q: DeserializeOwned,
    R: Serialize,
{
    let mut ends: Vec<(usize, Channel<'static>, Grant)> = Vec::new();
    for (slot, s) in boot.slots.iter().enumerate() {
        if let BootGrant::Server(i, grant) = s.grant {
            if i == interface {
                if let Some(channel) = open(boot, slot) {
                    ends.push((slot, channel, grant));
                }
            }
        }
    }
    let mask = ends.iter().fold(0u32, |m, (slot, _, _)| m | 1 << slot);
    let capacity = ends
        .iter()
        .map(|(_, c, _)| c.layout().ring_capacity as usize)
        .max()
        .unwrap_or(0);
    let mut incoming = vec![0u8; capacity];
    let mut outgoing = vec![0u8; capacity];
    loop {
        let mut idle = true;
        for (slot, channel, grant) in &ends {
            let requests = channel.ring(Direction::Requests);
            let responses = channel.ring(Direction::Responses);
            let frame = match requests.try_recv(&mut incoming) {
                Ok(Some(frame)) => frame,
                Ok(None) => continue,
                // A malformed frame was skipped by the ring (with what followed it).
                Err(_) => {
                    let _ = requests.release();
                    sys::notify(*slot);
                    continue;
                }
            };
            idle = false;
            let caller = Caller {
                name: boot.slots[*slot].name,
                grant: *grant,
            };
            let (tag, reply) = match postcard::from_bytes::<Envelope<endpoint::Request<Q>>>(
                &incoming[..frame.len],
            ) {
                Ok(Envelope { tag, body }) => (
                    tag,
                    match body {
                        endpoint::Request::Ping { nonce } => endpoint::Response::Pong { nonce },
                        endpoint::Request::Service(q) => handler(&caller, q),
                        endpoint::Request::Guest(_) => {
                            endpoint::Response::Error(ErrorCode::Unsupported)
                        }
                    },
                ),
                Err(_) => (0, endpoint::Response::Error(ErrorCode::Malformed)),
            };
            let _ = requests.release();
            let envelope = Envelope { tag, body: reply };
            let len = match postcard::to_slice(&envelope, &mut outgoing) {
                Ok(bytes) => bytes.len(),
                Err(_) => {
                    let error = Envelope {
                        tag,
                        body: endpoint::Response::<R>::Error(ErrorCode::TooLarge),
                    };
                    match postcard::to_slice(&error, &mut outgoing) {
                        Ok(bytes) => bytes.len(),
                        Err(_) => continue,
                    }
                }
            };
            // A reply waits for room (its client takes replies as it gets them); one to an
            // older epoch, or to a client that vanished, is dropped.
            loop {
                if channel.epoch() != frame.epoch {
                    break;
                }
                match responses.try_send(frame.epoch, &outgoing[..len]) {
                    Err(RingError::Full) => {
                        sys::notify(*slot);
                        sys::wait(1 << slot, u64::MAX);
                    }
                    _ => break,
                }
            }
            sys::notify(*slot);
        }
        if idle {
            sys::wait(mask, u64::MAX);
        }
    }
}
