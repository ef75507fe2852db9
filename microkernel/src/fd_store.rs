//! Descriptor stores: what the microkernel keeps for a service across its restarts
//! (`fd-store = { max = N }` in the manifest; the message format is
//! [`ipc_defs::fd_store`]).
//!
//! A store is a `SOCK_SEQPACKET` socket pair made for the run: the service's end is a
//! capability of each of its starts, the supervisor's end is read by the supervisor's loop,
//! never written. Every packet is hostile input (the service may be compromised):
//! - at most [`PACKETS_PER_LOOK`] packets are taken per look, without waiting, so a flood
//!   costs the loop a bounded amount of work per turn;
//! - a packet must be one [`StoreMessage`] (at most `MAX_MESSAGE` bytes, nothing
//!   truncated), a Keep with exactly one descriptor, a Forget with none;
//! - a kept descriptor must be a socket or a pipe ([`Keepable`]): not a listening socket (a
//!   store keeps connections; listeners are capabilities already) and not the store itself;
//! - at most the manifest's `max` are kept; a Keep under a new id beyond it is refused.
//!
//! A refused packet's descriptors are closed at once; the refusal is counted and logged by
//! the caller. The supervisor never reads from or writes to a kept descriptor: it holds it,
//! and hands it back to the service's next start, nothing more. So a compromised service
//! gains nothing it did not hold already: it can make the microkernel hold at most `max` of
//! its own sockets or pipes (and the kernel memory they pin) until the service is given up
//! or the paravisor stops.
//!
//! [`KeptTable`] is the pure half (generic over the descriptor type, for tests and the fuzz
//! target); [`Store`] adds the socket.

use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use ipc_defs::fd_store::KeptRecord;
use ipc_defs::fd_store::StoreError;
use ipc_defs::fd_store::StoreMessage;
use ipc_defs::fd_store::MAX_MESSAGE;
use ipc_defs::hosted::sys;

/// Most packets taken from one store per look of the supervisor's loop: a service that
/// floods its store slows only its own store down (the rest waits for the next turn), and a
/// look costs at most this many small reads.
pub const PACKETS_PER_LOOK: usize = 32;
/// Most packets taken after a service died, before its next start: everything it sent
/// before it died must be applied first, and a dead process sends no more, so this only
/// bounds the work (a socket's queue holds far fewer).
pub const PACKETS_AFTER_DEATH: usize = 100_000;
/// How long the service's sends may wait for room in the store's socket: the supervisor
/// takes packets every turn of its loop, so a full queue means a flood, and the flooder's
/// send fails rather than blocking it for ever.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a packet was refused (its descriptors are closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a store message.
    Malformed(StoreError),
    /// Longer than any message: cut by the kernel.
    Truncated,
    /// More descriptors than a message may carry: the kernel closed those that did not fit.
    DescriptorsDropped,
    /// A Keep without a descriptor, or with more than one.
    DescriptorCount { carried: usize },
    /// A Forget (or anything but a Keep) with descriptors.
    UnexpectedDescriptor,
    /// A descriptor the store does not keep (what it is).
    NotKeepable(String),
    /// A Keep under a new id while `max` are kept already.
    Full { max: usize },
    /// A Forget of an id nothing is kept under.
    UnknownId(u32),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Malformed(e) => write!(f, "{e}"),
            Refusal::Truncated => write!(f, "a message longer than {MAX_MESSAGE} bytes"),
            Refusal::DescriptorsDropped => {
                write!(
                    f,
                    "a message with more descriptors than fit (the rest closed)"
                )
            }
            Refusal::DescriptorCount { carried } => {
                write!(f, "a keep with {carried} descriptors (exactly one)")
            }
            Refusal::UnexpectedDescriptor => write!(f, "a forget that carries descriptors"),
            Refusal::NotKeepable(what) => write!(f, "a descriptor it does not keep: {what}"),
            Refusal::Full { max } => write!(f, "a keep past its bound ({max} kept already)"),
            Refusal::UnknownId(id) => write!(f, "a forget of id {id}, which nothing is kept under"),
        }
    }
}

/// What an accepted packet did; `F` is a descriptor the table let go (the caller drops it,
/// which closes it).
#[derive(Debug, PartialEq, Eq)]
pub enum Applied<F> {
    /// Kept under a new id, or in place of what that id kept (returned).
    Kept { id: u32, replaced: Option<F> },
    /// Forgotten: what the id kept.
    Forgot { id: u32, fd: F },
}

/// The records and descriptors a store keeps, at most `max`, one per id (in the order first
/// kept, which is the order they come back in).
#[derive(Debug)]
pub struct KeptTable<F> {
    max: usize,
    entries: Vec<(KeptRecord, F)>,
}

impl<F> KeptTable<F> {
    pub fn new(max: usize) -> KeptTable<F> {
        KeptTable {
            max,
            entries: Vec::new(),
        }
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// What is kept, in the order it comes back.
    pub fn entries(&self) -> impl Iterator<Item = &(KeptRecord, F)> {
        self.entries.iter()
    }

    /// Drops everything kept; what was kept is returned (to be closed).
    pub fn clear(&mut self) -> Vec<(KeptRecord, F)> {
        std::mem::take(&mut self.entries)
    }

    /// Applies one packet: its bytes, whether the kernel cut them or dropped descriptors,
    /// the descriptors that came with it, and `keepable`, which says whether the store keeps
    /// a descriptor. On a refusal every descriptor of the packet is dropped (closed).
    pub fn apply(
        &mut self,
        bytes: &[u8],
        truncated: bool,
        descriptors_dropped: bool,
        mut fds: Vec<F>,
        keepable: impl Fn(&F) -> Result<(), String>,
    ) -> Result<Applied<F>, Refusal> {
        if truncated {
            return Err(Refusal::Truncated);
        }
        if descriptors_dropped {
            return Err(Refusal::DescriptorsDropped);
        }
        let message = StoreMessage::decode(bytes).map_err(Refusal::Malformed)?;
        match message {
            StoreMessage::Keep(record) => {
                if fds.len() != 1 {
                    return Err(Refusal::DescriptorCount { carried: fds.len() });
                }
                let fd = fds.remove(0);
                keepable(&fd).map_err(Refusal::NotKeepable)?;
                let id = record.id;
                match self.entries.iter().position(|(r, _)| r.id == id) {
                    Some(at) => {
                        let (_, old) = std::mem::replace(&mut self.entries[at], (record, fd));
                        Ok(Applied::Kept {
                            id,
                            replaced: Some(old),
                        })
                    }
                    None if self.entries.len() >= self.max => Err(Refusal::Full { max: self.max }),
                    None => {
                        self.entries.push((record, fd));
                        Ok(Applied::Kept { id, replaced: None })
                    }
                }
            }
            StoreMessage::Forget { id } => {
                if !fds.is_empty() {
                    return Err(Refusal::UnexpectedDescriptor);
                }
                let at = self
                    .entries
                    .iter()
                    .position(|(r, _)| r.id == id)
                    .ok_or(Refusal::UnknownId(id))?;
                let (_, fd) = self.entries.remove(at);
                Ok(Applied::Forgot { id, fd })
            }
        }
    }
}

/// Whether a descriptor is one a store keeps: a connected or unconnected socket that is not
/// listening and is not one of `store`'s own pair (dev, inode), or a pipe.
pub struct Keepable {
    store: [(u64, u64); 2],
}

impl Keepable {
    pub fn check(&self, fd: BorrowedFd<'_>) -> Result<(), String> {
        let file = std::fs::File::from(
            fd.try_clone_to_owned()
                .map_err(|e| format!("cannot inspect it: {e}"))?,
        );
        let meta = file
            .metadata()
            .map_err(|e| format!("cannot inspect it: {e}"))?;
        let kind = meta.file_type();
        if kind.is_fifo() {
            return Ok(());
        }
        if !kind.is_socket() {
            return Err(describe_kind(&meta));
        }
        if self.store.contains(&(meta.dev(), meta.ino())) {
            return Err("the store's own socket".into());
        }
        match sys::is_listening_socket(fd) {
            Ok(false) => Ok(()),
            Ok(true) => Err("a listening socket".into()),
            Err(e) => Err(format!("a socket whose state cannot be read: {e}")),
        }
    }
}

fn describe_kind(meta: &std::fs::Metadata) -> String {
    let kind = meta.file_type();
    let what = if kind.is_file() {
        "a regular file (a memfd?)"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_symlink() {
        "a link"
    } else {
        "neither a socket nor a pipe (an eventfd, epoll, pidfd or other anonymous inode)"
    };
    what.to_string()
}

/// A service's store as the supervisor holds it: the socket pair and what is kept.
pub struct Store {
    ours: OwnedFd,
    theirs: OwnedFd,
    keepable: Keepable,
    table: KeptTable<OwnedFd>,
    /// Packets refused since the run started.
    pub refused: u64,
    /// Packets applied since the run started.
    pub applied: u64,
}

/// One packet taken from a store, as the caller logs it.
pub enum Event {
    Applied(Applied<OwnedFd>),
    Refused(Refusal),
}

impl Store {
    /// A store of at most `max` descriptors: a new socket pair, the service's end with a send
    /// timeout ([`SEND_TIMEOUT`]), ours without waiting.
    pub fn new(max: usize) -> std::io::Result<Store> {
        let (ours, theirs) = sys::seqpacket_pair()?;
        sys::set_nonblocking(ours.as_fd())?;
        sys::set_send_timeout(theirs.as_fd(), SEND_TIMEOUT)?;
        let id = |fd: &OwnedFd| -> std::io::Result<(u64, u64)> {
            let meta = std::fs::File::from(fd.try_clone()?).metadata()?;
            Ok((meta.dev(), meta.ino()))
        };
        let keepable = Keepable {
            store: [id(&ours)?, id(&theirs)?],
        };
        Ok(Store {
            ours,
            theirs,
            keepable,
            table: KeptTable::new(max),
            refused: 0,
            applied: 0,
        })
    }

    /// The supervisor's end, for its poll.
    pub fn poll_fd(&self) -> i32 {
        self.ours.as_raw_fd()
    }

    /// The service's end, handed to each start.
    pub fn service_end(&self) -> BorrowedFd<'_> {
        self.theirs.as_fd()
    }

    /// What is kept, in the order it comes back.
    pub fn kept(&self) -> impl Iterator<Item = &(KeptRecord, OwnedFd)> {
        self.table.entries()
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn max(&self) -> usize {
        self.table.max()
    }

    /// The inodes of the sockets and pipes kept here (for the live audit: a service may
    /// hold what its store keeps; `/proc/PID/fd` shows them as `socket:[N]`, `pipe:[N]`).
    pub fn kept_inodes(&self) -> std::collections::BTreeSet<u64> {
        self.table
            .entries()
            .filter_map(|(_, fd)| {
                fd.try_clone()
                    .map(std::fs::File::from)
                    .and_then(|f| f.metadata())
                    .ok()
                    .map(|m| m.ino())
            })
            .collect()
    }

    /// Drops everything kept (the descriptors close); how many there were.
    pub fn clear(&mut self) -> usize {
        self.table.clear().len()
    }

    /// Takes up to `budget` packets that are waiting, without waiting for more, and applies
    /// each; what each did, for the caller's log.
    pub fn take(&mut self, budget: usize) -> Vec<Event> {
        let mut events = Vec::new();
        for _ in 0..budget {
            let mut buf = [0u8; MAX_MESSAGE + 1];
            let packet = match sys::recv_packet(&self.ours, &mut buf) {
                Ok(p) => p,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!("descriptor store: {e}");
                    break;
                }
            };
            let bytes = &buf[..packet.len];
            // A longer packet fills the buffer (MAX_MESSAGE + 1): refused as too long.
            let keepable = &self.keepable;
            let outcome = self.table.apply(
                bytes,
                packet.truncated,
                packet.descriptors_dropped,
                packet.fds,
                |fd| keepable.check(fd.as_fd()),
            );
            match outcome {
                Ok(applied) => {
                    self.applied += 1;
                    events.push(Event::Applied(applied));
                }
                Err(refusal) => {
                    self.refused += 1;
                    events.push(Event::Refused(refusal));
                }
            }
        }
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc_defs::fd_store::MAX_MESSAGE;

    fn keep(id: u32) -> Vec<u8> {
        let mut buf = [0u8; MAX_MESSAGE];
        StoreMessage::Keep(KeptRecord::new(id, "conn", &[1, 2]).unwrap())
            .encode(&mut buf)
            .unwrap()
            .to_vec()
    }

    fn forget(id: u32) -> Vec<u8> {
        let mut buf = [0u8; MAX_MESSAGE];
        StoreMessage::Forget { id }
            .encode(&mut buf)
            .unwrap()
            .to_vec()
    }

    fn any(_: &u32) -> Result<(), String> {
        Ok(())
    }

    #[test]
    fn a_table_keeps_at_most_its_bound_one_per_id() {
        let mut t = KeptTable::<u32>::new(2);
        assert_eq!(
            t.apply(&keep(1), false, false, vec![10], any),
            Ok(Applied::Kept {
                id: 1,
                replaced: None
            })
        );
        assert_eq!(
            t.apply(&keep(2), false, false, vec![20], any),
            Ok(Applied::Kept {
                id: 2,
                replaced: None
            })
        );
        assert_eq!(
            t.apply(&keep(3), false, false, vec![30], any),
            Err(Refusal::Full { max: 2 })
        );
        // The same id again replaces (its old descriptor is handed back to be closed).
        assert_eq!(
            t.apply(&keep(1), false, false, vec![11], any),
            Ok(Applied::Kept {
                id: 1,
                replaced: Some(10)
            })
        );
        assert_eq!(
            t.apply(&forget(2), false, false, vec![], any),
            Ok(Applied::Forgot { id: 2, fd: 20 })
        );
        assert_eq!(
            t.apply(&forget(2), false, false, vec![], any),
            Err(Refusal::UnknownId(2))
        );
        let left: Vec<(u32, u32)> = t.entries().map(|(r, f)| (r.id, *f)).collect();
        assert_eq!(left, [(1, 11)]);
    }

    #[test]
    fn a_table_refuses_what_a_hostile_service_sends() {
        /// (bytes, cut by the kernel, descriptors dropped, descriptors, the refusal)
        type Case = (Vec<u8>, bool, bool, Vec<u32>, Refusal);
        let mut t = KeptTable::<u32>::new(4);
        let cases: Vec<Case> = vec![
            (
                keep(1),
                false,
                false,
                vec![],
                Refusal::DescriptorCount { carried: 0 },
            ),
            (
                keep(1),
                false,
                false,
                vec![1, 2],
                Refusal::DescriptorCount { carried: 2 },
            ),
            (
                forget(1),
                false,
                false,
                vec![1],
                Refusal::UnexpectedDescriptor,
            ),
            (keep(1), true, false, vec![1], Refusal::Truncated),
            (keep(1), false, true, vec![1], Refusal::DescriptorsDropped),
            (
                vec![0xff; 7],
                false,
                false,
                vec![1],
                Refusal::Malformed(StoreError::Malformed),
            ),
        ];
        for (bytes, truncated, dropped, fds, refusal) in cases {
            assert_eq!(t.apply(&bytes, truncated, dropped, fds, any), Err(refusal));
        }
        assert_eq!(
            t.apply(&keep(1), false, false, vec![5], |_| Err("a memfd".into())),
            Err(Refusal::NotKeepable("a memfd".into()))
        );
        assert!(t.is_empty());
    }

    /// The supervisor's end of a real pair: only sockets and pipes are kept, never the store
    /// itself, a listener or a memfd; a flood is taken a bounded number of packets at a
    /// time; descriptors of refused packets are closed.
    #[test]
    fn a_store_keeps_sockets_and_pipes_and_closes_what_it_refuses() {
        let mut store = Store::new(3).unwrap();
        let theirs = store.theirs.try_clone().unwrap();
        let send = |id: u32, fd: BorrowedFd<'_>| {
            let mut buf = [0u8; MAX_MESSAGE];
            let m = StoreMessage::Keep(KeptRecord::new(id, "x", &[]).unwrap());
            sys::send_with_fd(&theirs, m.encode(&mut buf).unwrap(), Some(fd)).unwrap();
        };
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (pipe_r, _pipe_w) = sys::pipe().unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let memfd = sys::memfd("pv-test", 16).unwrap();
        send(1, a.as_fd());
        send(2, pipe_r.as_fd());
        send(3, listener.as_fd());
        send(4, memfd.as_fd());
        send(5, theirs.as_fd());
        let events = store.take(PACKETS_PER_LOOK);
        let outcomes: Vec<String> = events
            .iter()
            .map(|e| match e {
                Event::Applied(Applied::Kept { id, .. }) => format!("kept {id}"),
                Event::Applied(a) => format!("{a:?}"),
                Event::Refused(r) => format!("refused: {r}"),
            })
            .collect();
        assert_eq!(outcomes.len(), 5, "{outcomes:?}");
        assert_eq!(outcomes[0], "kept 1");
        assert_eq!(outcomes[1], "kept 2");
        assert!(outcomes[2].contains("listening socket"), "{outcomes:?}");
        assert!(outcomes[3].contains("regular file"), "{outcomes:?}");
        assert!(outcomes[4].contains("store's own socket"), "{outcomes:?}");
        assert_eq!((store.len(), store.refused, store.applied), (2, 3, 2));

        // A flood: one look takes PACKETS_PER_LOOK packets, the rest waits.
        for _ in 0..PACKETS_PER_LOOK + 5 {
            sys::send_with_fd(&theirs, &[0xff], None).unwrap();
        }
        assert_eq!(store.take(PACKETS_PER_LOOK).len(), PACKETS_PER_LOOK);
        assert_eq!(store.take(PACKETS_PER_LOOK).len(), 5);
        assert!(store.take(PACKETS_PER_LOOK).is_empty());
        // An oversized packet is refused as such, cut by the kernel or not.
        sys::send_with_fd(&theirs, &[0; MAX_MESSAGE + 40], None).unwrap();
        assert!(matches!(
            store.take(1).as_slice(),
            [Event::Refused(Refusal::Truncated)]
        ));
        sys::send_with_fd(&theirs, &[0; MAX_MESSAGE + 1], None).unwrap();
        assert!(matches!(
            store.take(1).as_slice(),
            [Event::Refused(Refusal::Malformed(StoreError::TooLong(_)))]
        ));
        assert_eq!(store.clear(), 2);
    }
}
