//! `pv-netpeer`: the host side of a Linux guest's TCP transfers, for the net tests and
//! `paravisor bench net`. It runs inside the network namespace of the guest's TAP (`ip netns
//! exec NS pv-netpeer --listen 10.78.0.1:5001`), so it needs no privilege of its own and
//! no code of ours enters a namespace.
//!
//! One connection at a time; the client's first line says what it wants:
//! - `PUT`: the rest of the stream, to its end, is kept (in memory, replacing the previous
//!   upload); the answer is one line `stored BYTES SHA256`.
//! - `GET`: the kept bytes are sent back and the connection is closed.
//!
//! so that a guest can upload a file, download it again and compare both checksums with its
//! own, with busybox `nc` and `sha256sum` only. Each finished transfer prints one line on
//! stdout, `put|get BYTES SHA256 SECONDS` (seconds from the first byte to the end: for a
//! `get`, until the guest closed its side after reading everything), and while bytes move
//! `progress TOTAL` after every `progress_every` bytes, so that a test can act while a
//! transfer is under way.
//!
//! [`probe`] is the other mode (`--probe ADDR:PORT`), for `bench net`'s restart: it knocks
//! on a closed TCP port of the guest every few milliseconds, one knock at a time, and prints
//! each answer (the guest kernel's RST, or an accept) as `reply SENT RECEIVED`, both wall-clock
//! seconds: the bench finds the first packet through a restarted pv-net as the first reply to
//! a knock sent after its kill. TCP rather than ICMP because std opens no ICMP socket, and
//! rather than UDP because Linux rate-limits its port-unreachable answers to about one a
//! second, which a TCP RST is not.

use std::io::BufRead;
use std::io::BufReader;
use std::io::Read;
use std::io::Write;
use std::net::Shutdown;
use std::net::SocketAddr;
use std::net::TcpListener;
use std::net::TcpStream;
use std::time::Duration;
use std::time::Instant;

use sha2::Digest;
use sha2::Sha256;

/// The longest first line a client may send.
const MAX_REQUEST: u64 = 64;

/// The most a client may upload: more is refused (this is a test peer, not a store).
pub const MAX_UPLOAD: usize = 1 << 30;

/// A client silent for this long is dropped (a guest whose NIC went away for good).
const IDLE: Duration = Duration::from_secs(120);

/// Serves clients on `listen` until stdout goes away (the test or benchmark that started
/// it ended) or the listener fails.
pub fn serve(listen: SocketAddr, progress_every: u64) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen)?;
    let mut peer = Peer {
        kept: Vec::new(),
        moved: 0,
        progress_every: progress_every.max(1),
        next_progress: progress_every.max(1),
    };
    say(&format!("listening {}", listener.local_addr()?))?;
    for stream in listener.incoming() {
        let stream = stream?;
        if let Err(e) = peer.serve_one(stream) {
            // A client's failure is its own; the peer goes on with the next.
            say(&format!("error {e}"))?;
        }
    }
    Ok(())
}

/// What the peer keeps between connections.
struct Peer {
    kept: Vec<u8>,
    /// Bytes moved either way since the start.
    moved: u64,
    progress_every: u64,
    next_progress: u64,
}

impl Peer {
    fn serve_one(&mut self, stream: TcpStream) -> std::io::Result<()> {
        stream.set_read_timeout(Some(IDLE))?;
        stream.set_write_timeout(Some(IDLE))?;
        let mut reader = BufReader::with_capacity(1 << 16, stream.try_clone()?);
        let mut line = String::new();
        (&mut reader).take(MAX_REQUEST).read_line(&mut line)?;
        match line.trim_end() {
            "PUT" => self.put(reader, stream),
            "GET" => self.get(reader, stream),
            other => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown request {other:?} (PUT or GET)"),
            )),
        }
    }

    fn put(
        &mut self,
        mut reader: BufReader<TcpStream>,
        mut stream: TcpStream,
    ) -> std::io::Result<()> {
        let mut data = Vec::with_capacity(self.kept.capacity());
        let mut started = None;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = reader.read(&mut buf)?;
            if n == 0 {
                break;
            }
            started.get_or_insert_with(Instant::now);
            if data.len() + n > MAX_UPLOAD {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("an upload of more than {MAX_UPLOAD} bytes"),
                ));
            }
            data.extend_from_slice(&buf[..n]);
            self.moved(n)?;
        }
        let seconds = started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let sum = hex(&Sha256::digest(&data));
        stream.write_all(format!("stored {} {sum}\n", data.len()).as_bytes())?;
        stream.shutdown(Shutdown::Write)?;
        say(&format!("put {} {sum} {seconds:.6}", data.len()))?;
        self.kept = data;
        Ok(())
    }

    fn get(
        &mut self,
        mut reader: BufReader<TcpStream>,
        mut stream: TcpStream,
    ) -> std::io::Result<()> {
        let started = Instant::now();
        let kept = std::mem::take(&mut self.kept);
        let result = (|| {
            for piece in kept.chunks(1 << 16) {
                stream.write_all(piece)?;
                self.moved(piece.len())?;
            }
            stream.shutdown(Shutdown::Write)?;
            // The transfer ends when the guest has read everything and closed its side.
            std::io::copy(&mut reader, &mut std::io::sink())?;
            Ok::<(), std::io::Error>(())
        })();
        let seconds = started.elapsed().as_secs_f64();
        let sum = hex(&Sha256::digest(&kept));
        self.kept = kept;
        result?;
        say(&format!("get {} {sum} {seconds:.6}", self.kept.len()))
    }

    fn moved(&mut self, n: usize) -> std::io::Result<()> {
        self.moved += n as u64;
        if self.moved >= self.next_progress {
            self.next_progress = (self.moved / self.progress_every + 1) * self.progress_every;
            say(&format!("progress {}", self.moved))?;
        }
        Ok(())
    }
}

/// Knocks on `target` (a closed port: the guest's kernel answers with a RST) every `every`,
/// each knock in a thread of its own that waits at most `timeout` for its answer (so that a
/// slow answer delays no later knock), until stdout goes away; prints `probing TARGET` first
/// and `reply SENT RECEIVED` (seconds since the Unix epoch) for every answered knock.
pub fn probe(target: SocketAddr, every: Duration, timeout: Duration) -> std::io::Result<()> {
    use std::sync::atomic::AtomicBool;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    say(&format!("probing {target}"))?;
    let stdout_gone = Arc::new(AtomicBool::new(false));
    let mut next = Instant::now();
    while !stdout_gone.load(Ordering::Relaxed) {
        let stdout_gone = stdout_gone.clone();
        std::thread::spawn(move || {
            let sent = unix_seconds();
            let answered = match TcpStream::connect_timeout(&target, timeout) {
                // A RST (the port is closed) or an accept (someone listens): either way a
                // packet went to the guest and one came back.
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            };
            if answered && say(&format!("reply {sent:.6} {:.6}", unix_seconds())).is_err() {
                stdout_gone.store(true, Ordering::Relaxed);
            }
        });
        next += every;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    Ok(())
}

/// Wall-clock seconds since the Unix epoch (the bench compares them with its kills' times,
/// taken on the same host's clock).
pub fn unix_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One line on stdout, flushed: a test reads it as it comes.
fn say(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upload comes back byte for byte, and a bad request is refused without ending the
    /// peer: over loopback, as the guest does it over its NIC.
    #[test]
    fn put_then_get_returns_the_same_bytes() {
        let listener_addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listener = TcpListener::bind(listener_addr).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut peer = Peer {
            kept: Vec::new(),
            moved: 0,
            progress_every: 1 << 20,
            next_progress: 1 << 20,
        };
        let server = std::thread::spawn(move || {
            let mut errors = 0;
            for _ in 0..3 {
                let (stream, _) = listener.accept().unwrap();
                if peer.serve_one(stream).is_err() {
                    errors += 1;
                }
            }
            (peer.moved, errors)
        });
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sum = hex(&Sha256::digest(&data));

        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"BOGUS\n").unwrap();
        drop(c);

        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"PUT\n").unwrap();
        c.write_all(&data).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, format!("stored {} {sum}\n", data.len()));

        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(b"GET\n").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).unwrap();
        drop(c);
        assert!(back == data, "{} bytes back", back.len());
        let (moved, errors) = server.join().unwrap();
        assert_eq!((moved, errors), (2 * data.len() as u64, 1));
    }
}
