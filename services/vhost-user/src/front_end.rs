//! The vhost-user front ends of a service's devices: one listener per device, at most one
//! connected front end on each, and one poll loop over them (their sockets, the rings' kicks
//! and the devices' own descriptors) that no front end can stop.
//!
//! rust-vmm's handler ([`BackendReqHandler::handle_request`]) reads a message with blocking
//! reads and writes its reply with blocking writes, and it retries both when a read or write
//! times out (it takes EAGAIN for a passing signal). On the service's one thread, a front end
//! that sent half a message, or that stopped reading our replies, would then hold every other
//! device of the service with it (storage's other disks and the partition's NVMe function). So a front end's message goes to the
//! handler only when [`Gate`] has seen the whole of it queued on the socket (looked at, not
//! taken) and room for the reply; until then the loop serves everything else. A message that
//! stays incomplete or unanswerable for [`STALL_LIMIT`] drops its front end, and a header
//! announcing more than the protocol allows drops it at once, each with a log line that says
//! why. The sockets' timeouts ([`SOCKET_TIMEOUT`]) are only a backstop behind the gate.
//!
//! The gate looks with a peek rather than asking the kernel how many bytes are queued
//! (FIONREAD): a service's seccomp profile allows a syscall whole or not at all, and `ioctl`
//! whole is far more than this needs. A peek stops at the end of a write that carried
//! descriptors, so a message must come in one write with its descriptors, as QEMU, DPDK and
//! rust-vmm's front end send it; a front end that splits one is told so and dropped.

use std::fmt;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use ipc_defs::hosted::sys;
use vhost::vhost_user::message::MAX_MSG_SIZE;
use vhost::vhost_user::BackendReqHandler;

use crate::backend::Backend;
use crate::device::VirtioDevice;

/// Bytes of a vhost-user message header: request, flags and body size, u32 little-endian
/// each.
pub const HEADER_LEN: usize = 12;
/// How long a front end may leave a message incomplete, or leave no room for its reply,
/// before it is dropped. QEMU writes a message whole and reads each reply as soon as it is
/// sent, so a second is far beyond any wait of a working front end; and the loop keeps
/// serving everything else meanwhile, so it costs nobody else anything.
pub const STALL_LIMIT: Duration = Duration::from_secs(1);
/// Read and write timeout of a front end's socket: a read or write that [`Gate`] did not
/// foresee fails after this instead of waiting for ever (the handler turns a failed read of
/// a body into an error, which drops the front end).
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(1);
/// While a front end's message is partly in, how often its socket is looked at again: the
/// socket stays readable, so poll cannot wait for the rest.
const RECHECK: Duration = Duration::from_millis(10);

/// A vhost-user message header as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub request: u32,
    pub flags: u32,
    /// Bytes of body that follow the header.
    pub size: u32,
}

impl Header {
    /// The header at the start of `bytes`, if a whole one is there.
    pub fn parse(bytes: &[u8]) -> Option<Header> {
        let (header, _) = bytes.split_first_chunk::<HEADER_LEN>()?;
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        Some(Header {
            request: word(0),
            flags: word(4),
            size: word(8),
        })
    }
}

/// What a front end has not yet given for its next message to be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Part of a header came.
    Header { have: usize },
    /// The header came, and part of the body it announces.
    Body {
        request: u32,
        have: usize,
        size: u32,
    },
    /// The message is whole, but the front end has left our replies unread until our side
    /// of the socket is full: the answer would wait.
    ReplyRoom { request: u32 },
}

impl fmt::Display for Missing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Missing::Header { have } => {
                write!(f, "only {have} of a message header's {HEADER_LEN} bytes came")
            }
            Missing::Body {
                request,
                have,
                size,
            } => write!(
                f,
                "request {request}: only {have} of the {size} body bytes its header announces came"
            ),
            Missing::ReplyRoom { request } => write!(
                f,
                "request {request} is whole, but the front end does not read our replies, so its answer would wait"
            ),
        }
    }
}

/// Why a front end was dropped before the handler saw its message.
#[derive(Debug, thiserror::Error)]
pub enum FrontEndError {
    #[error("request {request}: its header announces a body of {size} bytes, more than the protocol's {MAX_MSG_SIZE}")]
    Oversized { request: u32, size: u32 },
    #[error("descriptors came with only {have} bytes of a message of at least {needed}: a message must be sent whole, in one write with its descriptors")]
    SplitAtDescriptors { have: usize, needed: usize },
    #[error("{missing}, for {STALL_LIMIT:?}")]
    Stalled { missing: Missing },
    #[error("looking at its socket: {0}")]
    Socket(#[source] io::Error),
}

/// What the bytes queued on a socket hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queued {
    /// A whole message, with this header.
    Whole(Header),
    /// Part of one.
    Partial(Missing),
}

/// Judges the bytes at the head of a front end's queue (`ends_at_descriptors`: the look
/// stopped at a write that carried descriptors, see [`sys::Peeked`]).
pub fn assess(queued: &[u8], ends_at_descriptors: bool) -> Result<Queued, FrontEndError> {
    let split = |needed| FrontEndError::SplitAtDescriptors {
        have: queued.len(),
        needed,
    };
    let Some(header) = Header::parse(queued) else {
        if ends_at_descriptors {
            return Err(split(HEADER_LEN));
        }
        return Ok(Queued::Partial(Missing::Header { have: queued.len() }));
    };
    let size = usize::try_from(header.size).unwrap_or(usize::MAX);
    if size > MAX_MSG_SIZE {
        return Err(FrontEndError::Oversized {
            request: header.request,
            size: header.size,
        });
    }
    let len = HEADER_LEN + size;
    if queued.len() >= len {
        Ok(Queued::Whole(header))
    } else if ends_at_descriptors {
        Err(split(len))
    } else {
        Ok(Queued::Partial(Missing::Body {
            request: header.request,
            have: queued.len() - HEADER_LEN,
            size: header.size,
        }))
    }
}

/// What a front end's socket allows now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// A whole message, with this header, and room for its reply: the handler takes it
    /// without waiting.
    Ready(Header),
    /// Part of a message, for less than [`STALL_LIMIT`] so far.
    Waiting(Missing),
    /// Nothing queued.
    Idle,
    /// The front end closed its side.
    Closed,
}

/// Lets a front end's messages through to the handler only whole (see the module's header).
#[derive(Debug, Default)]
pub struct Gate {
    /// Since when the message at the head of the queue has been incomplete or unanswerable.
    stalled_since: Option<Instant>,
}

impl Gate {
    /// Whether a message is waiting for more (its socket is then looked at every pass
    /// rather than polled, see [`RECHECK`]).
    pub fn is_waiting(&self) -> bool {
        self.stalled_since.is_some()
    }

    /// Looks at what `socket` holds, at `now`.
    pub fn check(&mut self, socket: &UnixStream, now: Instant) -> Result<Next, FrontEndError> {
        let mut buf = [0u8; HEADER_LEN + MAX_MSG_SIZE];
        let peeked = match sys::peek_stream(socket, &mut buf) {
            Ok(p) if p.len == 0 => return Ok(Next::Closed),
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.stalled_since = None;
                return Ok(Next::Idle);
            }
            Err(e) => return Err(FrontEndError::Socket(e)),
        };
        let missing = match assess(&buf[..peeked.len], peeked.ends_at_descriptors)? {
            Queued::Whole(header) => {
                let room = sys::writable_now(socket.as_fd()).map_err(FrontEndError::Socket)?;
                if room {
                    self.stalled_since = None;
                    return Ok(Next::Ready(header));
                }
                Missing::ReplyRoom {
                    request: header.request,
                }
            }
            Queued::Partial(missing) => missing,
        };
        let since = *self.stalled_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= STALL_LIMIT {
            return Err(FrontEndError::Stalled { missing });
        }
        Ok(Next::Waiting(missing))
    }
}

/// A connected front end: the handler on its socket, a second descriptor of that socket to
/// poll and look at, and the gate between them.
pub struct FrontEnd<D: VirtioDevice> {
    handler: BackendReqHandler<Mutex<Backend<D>>>,
    socket: UnixStream,
    gate: Gate,
}

/// One device on one listener, and its front end when connected.
pub struct Export<D: VirtioDevice> {
    pub name: String,
    pub listener: UnixListener,
    pub backend: Arc<Mutex<Backend<D>>>,
    pub front_end: Option<FrontEnd<D>>,
}

impl<D: VirtioDevice> Export<D> {
    /// `device` on `listener`, no front end connected yet.
    pub fn new(name: &str, listener: UnixListener, device: D) -> Export<D> {
        Export {
            name: name.to_string(),
            listener,
            backend: Arc::new(Mutex::new(Backend::new(name, device))),
            front_end: None,
        }
    }
}

/// What one poll-set entry is.
enum Source {
    Listener(usize),
    FrontEnd(usize),
    Kick(usize, usize),
    Device,
}

/// Waits up to `timeout` for a connection, a message, a kick or a device's own descriptor, and
/// handles what came; whether some ring has more work than one batch.
pub fn serve_once<D: VirtioDevice>(
    exports: &mut [Export<D>],
    timeout: Duration,
) -> Result<bool, String> {
    let mut timeout = timeout;
    let mut waiting = Vec::new();
    let ready = {
        let backends: Vec<_> = exports
            .iter()
            .map(|e| e.backend.lock().expect("one thread"))
            .collect();
        let mut sources = Vec::new();
        let mut fds = Vec::new();
        for (i, e) in exports.iter().enumerate() {
            sources.push(Source::Listener(i));
            fds.push(e.listener.as_fd());
            if let Some(fe) = &e.front_end {
                if fe.gate.is_waiting() {
                    waiting.push(i);
                } else {
                    sources.push(Source::FrontEnd(i));
                    fds.push(fe.socket.as_fd());
                }
                for (ring, kick) in backends[i].kicks() {
                    sources.push(Source::Kick(i, ring));
                    fds.push(kick);
                }
                // The device's own (a back end with frames for the guest): whatever came is
                // served below with every ring.
                for fd in backends[i].device_ref().wake_fds() {
                    sources.push(Source::Device);
                    fds.push(fd);
                }
                if let Some(limit) = backends[i].device_ref().wait_limit() {
                    timeout = timeout.min(limit);
                }
            }
        }
        let timeout = if waiting.is_empty() {
            timeout
        } else {
            timeout.min(RECHECK)
        };
        let ready = sys::poll_readable(&fds, timeout).map_err(|e| format!("poll: {e}"))?;
        sources
            .into_iter()
            .zip(ready)
            .filter(|(_, r)| *r)
            .map(|(s, _)| s)
            .collect::<Vec<_>>()
    };
    let now = Instant::now();
    for i in waiting {
        take_message(&mut exports[i], now);
    }
    for source in ready {
        match source {
            Source::Listener(i) => accept(&mut exports[i]),
            Source::FrontEnd(i) => take_message(&mut exports[i], now),
            Source::Kick(i, ring) => exports[i]
                .backend
                .lock()
                .expect("one thread")
                .take_kick(ring),
            Source::Device => {}
        }
    }
    let mut more = false;
    for e in exports.iter() {
        more |= e.backend.lock().expect("one thread").serve_ready();
    }
    Ok(more)
}

/// Hands the front end's next message to the handler if the gate lets it through; drops the
/// front end (with everything it set up) when the gate or the handler refuses it.
fn take_message<D: VirtioDevice>(e: &mut Export<D>, now: Instant) {
    let Some(fe) = e.front_end.as_mut() else {
        return;
    };
    match fe.gate.check(&fe.socket, now) {
        Ok(Next::Ready(header))
            if header.request == SET_VRING_ENABLE
                && !e
                    .backend
                    .lock()
                    .expect("one thread")
                    .protocol_features_acked() =>
        {
            match enable_before_features(&fe.socket, header, &e.backend) {
                Ok(()) => return,
                Err(why) => tracing::warn!(device = %e.name, "front end dropped: {why}"),
            }
        }
        Ok(Next::Ready(_)) => match fe.handler.handle_request() {
            Ok(()) => return,
            Err(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            ) => {
                tracing::info!(device = %e.name, "front end disconnected")
            }
            Err(other) => tracing::warn!(device = %e.name, "front end dropped: {other}"),
        },
        Ok(Next::Waiting(_) | Next::Idle) => return,
        Ok(Next::Closed) => tracing::info!(device = %e.name, "front end disconnected"),
        Err(err) => tracing::warn!(device = %e.name, "front end dropped: {err}"),
    }
    e.front_end = None;
    e.backend.lock().expect("one thread").disconnected();
}

/// VHOST_USER_SET_VRING_ENABLE.
const SET_VRING_ENABLE: u32 = 18;
/// A message header's flags: the protocol's version (1), a reply, a reply asked for.
const VERSION_1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;

/// SET_VRING_ENABLE before the features that negotiate it, which QEMU sends for
/// vhost-user-net (its virtio-net device attaches and detaches queue pairs at reset, before
/// the driver has features: QEMU counts the protocol features as negotiated once the back end
/// offers them). rust-vmm's handler refuses the message then (the spec asks for
/// VHOST_USER_F_PROTOCOL_FEATURES acknowledged first) and the front end would be dropped; the
/// ring's enable flag is set here instead, with the reply REPLY_ACK asks for. The gate has
/// seen the whole message queued, so the reads do not wait.
fn enable_before_features<D: VirtioDevice>(
    socket: &UnixStream,
    header: Header,
    backend: &Mutex<Backend<D>>,
) -> Result<(), String> {
    use std::io::Write;

    use vhost::vhost_user::VhostUserBackendReqHandlerMut;

    if header.size != 8 {
        return Err(format!(
            "SET_VRING_ENABLE with a body of {} bytes, not 8",
            header.size
        ));
    }
    // With recvmsg, as the handler reads (a service's profile need not allow recvfrom).
    let mut message = [0u8; HEADER_LEN + 8];
    let mut have = 0;
    while have < message.len() {
        match sys::recv_with_fds(socket, &mut message[have..]) {
            Ok((0, _)) => return Err("the front end closed mid-message".into()),
            Ok((n, _)) => have += n,
            Err(e) => return Err(format!("reading SET_VRING_ENABLE: {e}")),
        }
    }
    let word = |at: usize| {
        u32::from_le_bytes([
            message[at],
            message[at + 1],
            message[at + 2],
            message[at + 3],
        ])
    };
    let (index, num) = (word(HEADER_LEN), word(HEADER_LEN + 4));
    let enable = match num {
        0 => false,
        1 => true,
        other => return Err(format!("SET_VRING_ENABLE of ring {index} with {other}")),
    };
    let mut backend = backend.lock().expect("one thread");
    let result = backend.set_vring_enable(index, enable);
    if header.flags & NEED_REPLY != 0 && backend.reply_ack_negotiated() {
        let mut reply = Vec::with_capacity(HEADER_LEN + 8);
        for w in [SET_VRING_ENABLE, VERSION_1 | REPLY, 8] {
            reply.extend_from_slice(&w.to_le_bytes());
        }
        reply.extend_from_slice(&u64::from(result.is_err()).to_le_bytes());
        (&*socket)
            .write_all(&reply)
            .map_err(|e| format!("answering SET_VRING_ENABLE: {e}"))?;
    }
    // Refused as the handler refuses a bad ring index: with a reply, the front end kept.
    if let Err(e) = result {
        tracing::warn!("SET_VRING_ENABLE of ring {index} refused: {e}");
    }
    Ok(())
}

/// Takes a front end's connection; a second one while the first is connected is refused.
fn accept<D: VirtioDevice>(e: &mut Export<D>) {
    let Ok((stream, _)) = e.listener.accept() else {
        return;
    };
    if e.front_end.is_some() {
        tracing::warn!(device = %e.name, "a second front end connected: refused (one per device)");
        return;
    }
    let socket = match stream
        .set_read_timeout(Some(SOCKET_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(SOCKET_TIMEOUT)))
        .and_then(|()| stream.try_clone())
    {
        Ok(s) => s,
        Err(err) => {
            tracing::warn!(device = %e.name, "front end refused: {err}");
            return;
        }
    };
    tracing::info!(device = %e.name, "front end connected");
    e.front_end = Some(FrontEnd {
        handler: BackendReqHandler::from_stream(stream, e.backend.clone()),
        socket,
        gate: Gate::default(),
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(request: u32, size: u32) -> Vec<u8> {
        [request, 1, size]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }

    #[test]
    fn a_header_announcing_more_than_the_protocol_allows_is_refused_before_its_body() {
        for size in [MAX_MSG_SIZE as u32 + 1, u32::MAX] {
            assert!(matches!(
                assess(&header(2, size), false),
                Err(FrontEndError::Oversized { request: 2, size: s }) if s == size
            ));
        }
        let most = header(5, MAX_MSG_SIZE as u32);
        assert_eq!(
            assess(&most, false).unwrap(),
            Queued::Partial(Missing::Body {
                request: 5,
                have: 0,
                size: MAX_MSG_SIZE as u32
            })
        );
    }

    #[test]
    fn a_message_is_whole_only_with_its_header_and_every_body_byte() {
        let mut bytes = header(2, 8);
        bytes.extend_from_slice(&[0; 8]);
        for have in 0..HEADER_LEN {
            assert_eq!(
                assess(&bytes[..have], false).unwrap(),
                Queued::Partial(Missing::Header { have })
            );
        }
        for have in HEADER_LEN..bytes.len() {
            assert_eq!(
                assess(&bytes[..have], false).unwrap(),
                Queued::Partial(Missing::Body {
                    request: 2,
                    have: have - HEADER_LEN,
                    size: 8
                })
            );
        }
        let whole = Queued::Whole(Header {
            request: 2,
            flags: 1,
            size: 8,
        });
        assert_eq!(assess(&bytes, false).unwrap(), whole);
        // The next message's bytes behind it change nothing.
        bytes.extend_from_slice(&header(1, 0)[..5]);
        assert_eq!(assess(&bytes, true).unwrap(), whole);
    }

    #[test]
    fn descriptors_with_part_of_a_message_are_refused_rather_than_waited_for() {
        let mut bytes = header(5, 40);
        bytes.extend_from_slice(&[0; 10]);
        assert!(matches!(
            assess(&bytes, true),
            Err(FrontEndError::SplitAtDescriptors {
                have: 22,
                needed: 52
            })
        ));
        assert!(matches!(
            assess(&bytes[..4], true),
            Err(FrontEndError::SplitAtDescriptors {
                have: 4,
                needed: HEADER_LEN
            })
        ));
    }
}
