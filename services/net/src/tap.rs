//! The host side of the NIC as a descriptor: a TAP device the microkernel opened for the
//! service (the service never opens one itself), or anything else that carries one Ethernet
//! frame per read and per write (a `SOCK_SEQPACKET` socket stands in for it in the tests).
//!
//! The descriptor is looked at before each read or write (a zero-timeout poll), so a read
//! never waits for a frame and a write never waits for room, whether the microkernel handed it
//! over non-blocking or not; a refused write leaves the guest's frame on its ring
//! ([`BackendError::Busy`]). A frame longer than the buffer the model passes is cut by the
//! kernel and then dropped by the model as oversized.

use std::fs::File;
use std::io::ErrorKind;
use std::io::Read;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;
use std::time::Duration;

use ipc_defs::hosted::sys;
use pv_devices::virtio::net::BackendError;
use pv_devices::virtio::net::FrameIo;

/// A frame link over a descriptor.
#[derive(Debug)]
pub struct TapLink {
    file: File,
    /// The other side is gone (a read returned end of file): nothing more will come.
    closed: bool,
}

impl TapLink {
    pub fn new(fd: OwnedFd) -> TapLink {
        TapLink {
            file: File::from(fd),
            closed: false,
        }
    }

    /// The descriptor to poll for frames.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

fn failed(what: &str, e: std::io::Error) -> BackendError {
    BackendError::Failed(format!("{what} the TAP: {e}"))
}

impl FrameIo for TapLink {
    fn send(&mut self, frame: &[u8]) -> Result<(), BackendError> {
        if !sys::writable_now(self.file.as_fd()).map_err(|e| failed("polling", e))? {
            return Err(BackendError::Busy);
        }
        match self.file.write(frame) {
            Ok(n) if n == frame.len() => Ok(()),
            Ok(n) => Err(BackendError::Failed(format!(
                "the TAP took {n} of a frame's {} bytes",
                frame.len()
            ))),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Err(BackendError::Busy),
            Err(e) => Err(failed("writing to", e)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, BackendError> {
        if self.closed {
            return Err(BackendError::Failed("the TAP's other side closed".into()));
        }
        let ready = sys::poll_readable(&[self.file.as_fd()], Duration::ZERO)
            .map_err(|e| failed("polling", e))?;
        if ready.first() != Some(&true) {
            return Ok(None);
        }
        match self.file.read(buf) {
            Ok(0) => {
                self.closed = true;
                Err(BackendError::Failed("the TAP's other side closed".into()))
            }
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(failed("reading from", e)),
        }
    }
}
