//! The gateway's sockets: its listeners (TCP on loopback or Unix), and connections of
//! either kind, read with MSG_PEEK (a request stays queued until the journal holds it) and
//! taken once recorded.

use std::io::Read;
use std::io::Write;
use std::net::TcpListener;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ipc_defs::hosted::sys;

/// How long a reply may wait for a client that does not read: a client that stalls longer
/// is dropped rather than stalling everyone else.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A listening socket: TCP on loopback, or a Unix socket in the state directory.
pub(crate) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Tells the two kinds apart by the socket's own address family.
    pub(crate) fn from_fd(fd: OwnedFd) -> Listener {
        let unix = UnixListener::from(fd);
        if unix.local_addr().is_ok() {
            Listener::Unix(unix)
        } else {
            Listener::Tcp(TcpListener::from(OwnedFd::from(unix)))
        }
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }

    pub(crate) fn accept(&self) -> Option<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().ok().map(|(s, _)| Stream::Tcp(s)),
            Listener::Unix(l) => l.accept().ok().map(|(s, _)| Stream::Unix(s)),
        }
    }
}

/// A connection of either kind.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    /// A connection the store handed back (or QEMU handed over): its kind from its own
    /// address family, set up as an accepted one is.
    pub(crate) fn from_fd(fd: OwnedFd) -> Stream {
        let unix = UnixStream::from(fd);
        let stream = if unix.local_addr().is_ok() {
            Stream::Unix(unix)
        } else {
            Stream::Tcp(TcpStream::from(OwnedFd::from(unix)))
        };
        stream.set_up();
        stream
    }

    pub(crate) fn set_up(&self) {
        match self {
            Stream::Tcp(s) => {
                let _ = s.set_nodelay(true);
                let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
                // A predecessor killed while it waited for the rest of a request left the
                // socket's low-water mark raised: a shorter request would never wake poll.
                let _ = sys::set_receive_low_water(s.as_fd(), 1);
            }
            Stream::Unix(s) => {
                let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
            }
        }
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }

    /// Copies what is queued into `buf` without taking it (with copies of the descriptors
    /// passed with it, if `with_fds`); 0 bytes is end of file.
    pub(crate) fn peek(
        &self,
        buf: &mut [u8],
        with_fds: bool,
    ) -> std::io::Result<(usize, Vec<OwnedFd>)> {
        match self {
            Stream::Unix(s) if with_fds => {
                sys::peek_stream_with_fds(s, buf).map(|(p, fds)| (p.len, fds))
            }
            Stream::Unix(s) => sys::peek_stream(s, buf).map(|p| (p.len, Vec::new())),
            Stream::Tcp(s) => sys::peek_stream(s, buf).map(|p| (p.len, Vec::new())),
        }
    }

    /// Takes `n` bytes that are queued (descriptors passed with them are closed).
    pub(crate) fn take(&mut self, mut n: usize) -> std::io::Result<()> {
        let mut buf = [0u8; 4096];
        while n > 0 {
            let want = n.min(buf.len());
            let got = match self {
                Stream::Tcp(s) => {
                    let got = s.read(&mut buf[..want])?;
                    let _ = sys::tcp_quickack(s);
                    got
                }
                Stream::Unix(s) => sys::recv_with_fds(s, &mut buf[..want])?.0,
            };
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            n -= got;
        }
        Ok(())
    }

    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(bytes),
            Stream::Unix(s) => s.write_all(bytes),
        }
    }

    /// The socket's inode (one connection, however many descriptors name it).
    pub(crate) fn inode(&self) -> u64 {
        self.as_fd()
            .try_clone_to_owned()
            .map(std::fs::File::from)
            .and_then(|f| f.metadata())
            .map_or(0, |m| m.ino())
    }
}
