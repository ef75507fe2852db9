//! A service's end of its descriptor store ([`crate::fd_store`]): keep a descriptor across
//! the service's own restarts, forget it when its connection ends.
//!
//! Sends only, never waits for an answer (there is none): a message the microkernel refuses
//! (past the manifest's bound, a descriptor it does not keep) is simply not kept, so a
//! service keeps at most [`FdStore::max`] descriptors and only sockets and pipes. A send
//! waits for room at most the send timeout the microkernel set on the socket.

use std::io;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;

use super::sys;
use crate::fd_store::KeptRecord;
use crate::fd_store::StoreMessage;
use crate::fd_store::MAX_MESSAGE;

/// The store capability.
pub struct FdStore {
    socket: OwnedFd,
    max: usize,
}

impl FdStore {
    /// The store on `socket` (the capability's descriptor), which keeps at most `max`.
    pub fn new(socket: OwnedFd, max: usize) -> FdStore {
        FdStore { socket, max }
    }

    /// Most descriptors the microkernel keeps for this service (its manifest's bound).
    pub fn max(&self) -> usize {
        self.max
    }

    /// Asks the microkernel to keep `fd` under `record` (replacing what `record.id` kept).
    /// Once this returns, a restart of the service hands `fd` back (unless refused).
    pub fn keep(&self, record: &KeptRecord, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.send(&StoreMessage::Keep(record.clone()), Some(fd))
    }

    /// Asks the microkernel to drop what it keeps under `id`.
    pub fn forget(&self, id: u32) -> io::Result<()> {
        self.send(&StoreMessage::Forget { id }, None)
    }

    fn send(&self, message: &StoreMessage, fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let mut buf = [0u8; MAX_MESSAGE];
        let bytes = message
            .encode(&mut buf)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "record too large"))?;
        sys::send_with_fd(&self.socket, bytes, fd)
    }

    /// The socket itself (for a test service that sends what no well-behaved one would).
    pub fn socket(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.socket.as_fd()
    }
}
