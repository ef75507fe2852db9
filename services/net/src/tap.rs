//! The host side of the NIC as a descriptor: a TAP device the microkernel opened for the
//! service (the service never opens one itself), or anything else that carries one Ethernet
//! frame per read and per write (a `SOCK_SEQPACKET` socket stands in for it in the tests).
//!
//! The microkernel attaches a TAP with a 12-byte virtio-net header in front of each frame
//! (`IFF_VNET_HDR`): the guest's header goes to the host's stack as it is (a partial checksum,
//! a 64 KiB TCP segment), and the host's comes back with each frame once the service has
//! told the TAP which offloads the guest's driver takes (`TUNSETOFFLOAD`, the one ioctl its
//! seccomp filter allows). The model checks every header either way.
//!
//! The descriptor is made non-blocking (the microkernel hands a TAP over so already), so a
//! read never waits for a frame and a write never waits for room, with one system call per
//! frame; a refused write leaves the guest's frame on its ring ([`BackendError::Busy`]). A frame longer than the buffer the model passes is cut by the
//! kernel and then dropped by the model as oversized.

use std::fs::File;
use std::io::ErrorKind;
use std::io::IoSlice;
use std::io::IoSliceMut;
use std::io::Read;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;

use ipc_defs::hosted::sys;
use pv_devices::virtio::net::BackendError;
use pv_devices::virtio::net::FrameIo;
use pv_devices::virtio::net::GuestOffloads;
use pv_devices::virtio::net::NetHeader;
use pv_devices::virtio::net::HEADER_LEN;

/// A frame link over a descriptor.
#[derive(Debug)]
pub struct TapLink {
    file: File,
    /// Each frame goes with a virtio-net header ([`HEADER_LEN`] bytes) both ways: a TAP the
    /// microkernel attached. Without: bare frames (a test's socket).
    headers: bool,
    /// The other side is gone (a read returned end of file): nothing more will come.
    closed: bool,
}

impl TapLink {
    /// A link over `fd` (made non-blocking); `headers`: the descriptor carries a virtio-net
    /// header with each frame (a TAP from the microkernel).
    pub fn new(fd: OwnedFd, headers: bool) -> std::io::Result<TapLink> {
        sys::set_nonblocking(fd.as_fd())?;
        Ok(TapLink {
            file: File::from(fd),
            headers,
            closed: false,
        })
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
    fn carries_headers(&self) -> bool {
        self.headers
    }

    fn accept_offloads(&mut self, offloads: GuestOffloads) -> Result<(), BackendError> {
        if !self.headers {
            return Ok(());
        }
        let flags = [
            (offloads.csum, sys::TAP_CSUM),
            (offloads.tso4, sys::TAP_TSO4),
            (offloads.tso6, sys::TAP_TSO6),
            (offloads.ecn, sys::TAP_TSO_ECN),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |all, (_, flag)| all | flag);
        sys::tap_set_offloads(self.file.as_fd(), flags)
            .map_err(|e| failed(&format!("setting offloads {flags:#x} on"), e))
    }

    fn send(&mut self, header: &NetHeader, frame: &[u8]) -> Result<(), BackendError> {
        let header = header.to_bytes();
        let header: &[u8] = if self.headers { &header } else { &[] };
        // One write: a TAP takes a frame (and its header) per call.
        let written = self
            .file
            .write_vectored(&[IoSlice::new(header), IoSlice::new(frame)]);
        match written {
            Ok(n) if n == header.len() + frame.len() => Ok(()),
            Ok(n) => Err(BackendError::Failed(format!(
                "the TAP took {n} of a frame's {} bytes",
                header.len() + frame.len()
            ))),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Err(BackendError::Busy),
            Err(e) => Err(failed("writing to", e)),
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(NetHeader, usize)>, BackendError> {
        if self.closed {
            return Err(BackendError::Failed("the TAP's other side closed".into()));
        }
        let mut header = [0u8; HEADER_LEN];
        let header_len = if self.headers { HEADER_LEN } else { 0 };
        let read = self.file.read_vectored(&mut [
            IoSliceMut::new(&mut header[..header_len]),
            IoSliceMut::new(buf),
        ]);
        match read {
            Ok(0) => {
                self.closed = true;
                Err(BackendError::Failed("the TAP's other side closed".into()))
            }
            Ok(n) if n < header_len => Err(BackendError::Failed(format!(
                "the TAP gave {n} bytes, shorter than the {header_len}-byte header"
            ))),
            Ok(n) => Ok(Some((NetHeader::from_bytes(&header), n - header_len))),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(failed("reading from", e)),
        }
    }
}
