//! `paravisor bench ipc`: what our channels cost, against baselines measured in the same run
//! between the same two processes on two different CPUs.
//!
//! Baselines: a raw shared-memory cache-line ping-pong (the physical floor), eventfd
//! ping-pong and Unix-socket ping-pong (what one would use instead). Every latency is the
//! median of several samples, each the mean of a batch of round trips, and is printed with
//! its ratio to the floor. Throughput: one-way small messages per second, and bulk data
//! passed by reference through a shared region (4 KiB and 1 MiB) against copying the same
//! bytes through a Unix socket. Finally, the CPU an idle server burns.

use std::io::Read;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use ipc_defs::endpoint;
use ipc_defs::hosted::channel::ChannelMemory;
use ipc_defs::hosted::channel::ServerEnd;
use ipc_defs::hosted::sys;
use ipc_defs::hosted::ClientEnd;
use ipc_defs::hosted::SharedMemory;
use ipc_defs::hosted::WaitPolicy;
use ipc_defs::layout::Direction;
use ipc_defs::layout::Epoch;
use serde::Deserialize;
use serde::Serialize;

/// Hidden subcommand that runs the peer side of a measurement.
pub const PEER_COMMAND: &str = "__bench-peer";

/// Ring capacity used by the benchmark channels (the manifest default; 4 KiB and 1 MiB
/// measured the same within noise).
const BENCH_RING: u32 = 64 << 10;
/// Size of the shared region for by-reference transfers.
const REGION: usize = 8 << 20;
/// Payload slots in flight in the by-reference test.
const SLOTS: usize = 4;

/// A reference to bulk data in the shared region.
#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
struct Chunk {
    offset: u64,
    len: u64,
    seq: u64,
}

/// Result of one latency measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub what: String,
    pub median_ns: f64,
    pub p10_ns: f64,
    pub p90_ns: f64,
}

/// Result of one throughput measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub what: String,
    pub per_second: f64,
    pub unit: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub cpus: (usize, usize),
    pub latencies: Vec<Latency>,
    pub throughputs: Vec<Throughput>,
    pub idle_server_cpu_percent: f64,
    pub idle_seconds: f64,
}

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    pub samples: usize,
    /// Round trips per sample for the fast (spinning) paths.
    pub fast_batch: usize,
    /// Round trips per sample for the blocking paths.
    pub slow_batch: usize,
    pub idle: Duration,
}

impl Default for Effort {
    fn default() -> Self {
        Effort {
            samples: 31,
            fast_batch: 2000,
            slow_batch: 200,
            idle: Duration::from_secs(3),
        }
    }
}

/// Median, 10th and 90th percentile of per-round-trip times over `samples` batches.
fn measure(what: &str, samples: usize, batch: usize, mut round_trip: impl FnMut()) -> Latency {
    for _ in 0..batch.min(1000) {
        round_trip();
    }
    let mut per_rt: Vec<f64> = (0..samples)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..batch {
                round_trip();
            }
            start.elapsed().as_nanos() as f64 / batch as f64
        })
        .collect();
    per_rt.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| per_rt[((per_rt.len() - 1) as f64 * q).round() as usize];
    Latency {
        what: what.to_string(),
        median_ns: at(0.5),
        p10_ns: at(0.1),
        p90_ns: at(0.9),
    }
}

pub(crate) struct Peer {
    child: Child,
    _fds: Vec<OwnedFd>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn spawn_peer(kind: &str, cpu: usize, fds: Vec<OwnedFd>) -> std::io::Result<Peer> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg(PEER_COMMAND).arg(kind).arg(cpu.to_string());
    for fd in &fds {
        cmd.arg(fd.as_raw_fd().to_string());
    }
    let child = cmd.stdin(Stdio::null()).spawn()?;
    Ok(Peer { child, _fds: fds })
}

/// Starts a peer that finds its counterpart by name instead of by descriptor.
#[cfg(feature = "iceoryx2")]
fn spawn_peer_named(kind: &str, cpu: usize, name: &str) -> std::io::Result<Peer> {
    let exe = std::env::current_exe()?;
    let child = Command::new(exe)
        .arg(PEER_COMMAND)
        .arg(kind)
        .arg(cpu.to_string())
        .env("PV_BENCH_SERVICE", name)
        .stdin(Stdio::null())
        .spawn()?;
    Ok(Peer {
        child,
        _fds: Vec::new(),
    })
}

pub(crate) fn cpus() -> (usize, usize) {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    (0, if n > 1 { 1 } else { 0 })
}

/// Runs every measurement and returns the report.
pub fn run(effort: Effort) -> std::io::Result<Report> {
    let (mine, theirs) = cpus();
    sys::pin_to_cpu(mine)?;
    let mut latencies = Vec::new();
    let mut throughputs = Vec::new();

    // 1. The floor: one shared cache line bounced between the two CPUs.
    {
        let line = SharedMemory::create("pv-bench-line", 4096)?;
        let word = line.atomic_u32(0)?;
        let peer = spawn_peer("line", theirs, vec![sys::dup_inheritable(&line)?])?;
        wait_ready(word, 1)?;
        let mut v = 1u32;
        latencies.push(measure(
            "shared cache line ping-pong (floor)",
            effort.samples,
            effort.fast_batch,
            || {
                v = v.wrapping_add(1);
                word.store(v, Ordering::Release);
                let want = v.wrapping_add(1);
                while word.load(Ordering::Acquire) != want {
                    std::hint::spin_loop();
                }
                v = want;
            },
        ));
        drop(peer);
    }

    // 2a. Our ring alone: raw 8-byte frames, no encoding, both sides spinning.
    {
        let mem =
            ChannelMemory::create("pv-bench-raw", BENCH_RING).map_err(std::io::Error::other)?;
        let peer = spawn_peer("raw", theirs, vec![sys::dup_inheritable(mem.shm())?])?;
        let requests = mem.channel().ring(Direction::Requests);
        let responses = mem.channel().ring(Direction::Responses);
        let mut buf = [0u8; 64];
        let mut n = 0u64;
        latencies.push(measure(
            "ring alone, raw 8-byte frames, spinning",
            effort.samples,
            effort.fast_batch,
            || {
                n += 1;
                let _ = responses.release();
                let _ = requests.try_send(Epoch(1), &n.to_ne_bytes());
                while !matches!(responses.try_recv(&mut buf), Ok(Some(_))) {
                    std::hint::spin_loop();
                }
            },
        ));
        drop(peer);
    }

    // 2b. Our ring with postcard messages through the channel ends, in each wait mode.
    for (label, kind, policy, batch) in [
        (
            "ring + postcard request/response, spinning",
            "ring-spin",
            WaitPolicy::SPINNING,
            effort.fast_batch,
        ),
        (
            "ring + postcard request/response, default (spin 50us, then futex)",
            "ring-default",
            WaitPolicy::default(),
            effort.fast_batch,
        ),
        (
            "ring + postcard request/response, blocking (futex)",
            "ring-block",
            WaitPolicy::BLOCKING,
            effort.slow_batch,
        ),
    ] {
        let mem =
            ChannelMemory::create("pv-bench-ring", BENCH_RING).map_err(std::io::Error::other)?;
        let fd = sys::dup_inheritable(mem.shm())?;
        let peer = spawn_peer(kind, theirs, vec![fd])?;
        let mut client: ClientEnd<endpoint::Request<u64>, endpoint::Response<u64>> =
            ClientEnd::new(mem, policy);
        wait_for_server(&mut client)?;
        let mut n = 0u64;
        latencies.push(measure(label, effort.samples, batch, || {
            n += 1;
            let _ = client.call(&endpoint::Request::Service(n), Duration::from_secs(5));
        }));
        drop(peer);
    }

    // 2c. iceoryx2 request-response between the same two cores (optional build feature).
    #[cfg(feature = "iceoryx2")]
    {
        use iceoryx2::prelude::*;
        let name = format!("pv-bench-{}", std::process::id());
        let peer = spawn_peer_named("iceoryx2", theirs, &name)?;
        let node = NodeBuilder::new()
            .create::<ipc::Service>()
            .map_err(std::io::Error::other)?;
        let service_name: ServiceName = name.as_str().try_into().map_err(std::io::Error::other)?;
        let service = node
            .service_builder(&service_name)
            .request_response::<u64, u64>()
            .open_or_create()
            .map_err(std::io::Error::other)?;
        let client = service
            .client_builder()
            .create()
            .map_err(std::io::Error::other)?;
        // Requests sent before the server connects are lost: retry until one is answered.
        let deadline = Instant::now() + Duration::from_secs(10);
        'connect: loop {
            let pending = client.send_copy(0).map_err(std::io::Error::other)?;
            let until = Instant::now() + Duration::from_millis(20);
            while Instant::now() < until {
                if let Ok(Some(_)) = pending.receive() {
                    break 'connect;
                }
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "iceoryx2 server did not answer",
                ));
            }
        }
        let mut n = 0u64;
        latencies.push(measure(
            "iceoryx2 0.10 request/response, spinning",
            effort.samples,
            effort.fast_batch,
            || {
                n += 1;
                if let Ok(pending) = client.send_copy(n) {
                    loop {
                        match pending.receive() {
                            Ok(Some(_)) => break,
                            Ok(None) => std::hint::spin_loop(),
                            Err(_) => break,
                        }
                    }
                }
            },
        ));
        drop(peer);
    }

    // 3. eventfd ping-pong.
    {
        let ping = sys::eventfd()?;
        let pong = sys::eventfd()?;
        let peer = spawn_peer(
            "eventfd",
            theirs,
            vec![sys::dup_inheritable(&ping)?, sys::dup_inheritable(&pong)?],
        )?;
        sys::eventfd_signal(&ping)?;
        sys::eventfd_wait(&pong)?;
        latencies.push(measure(
            "eventfd ping-pong",
            effort.samples,
            effort.slow_batch,
            || {
                let _ = sys::eventfd_signal(&ping);
                let _ = sys::eventfd_wait(&pong);
            },
        ));
        drop(peer);
    }

    // 4. Unix socket ping-pong.
    {
        let (mut a, b) = UnixStream::pair()?;
        let peer = spawn_peer("unix", theirs, vec![sys::dup_inheritable(&b)?])?;
        drop(b);
        let mut buf = [0u8; 8];
        latencies.push(measure(
            "unix socket ping-pong",
            effort.samples,
            effort.slow_batch,
            || {
                let _ = a.write_all(&buf);
                let _ = a.read_exact(&mut buf);
            },
        ));
        drop(peer);
    }

    // 5. One-way small messages per second through the ring.
    {
        let mem =
            ChannelMemory::create("pv-bench-stream", BENCH_RING).map_err(std::io::Error::other)?;
        let peer = spawn_peer("stream", theirs, vec![sys::dup_inheritable(mem.shm())?])?;
        let ring = mem.channel().ring(Direction::Requests);
        let replies = mem.channel().ring(Direction::Responses);
        let count: u64 = (effort.fast_batch * effort.samples * 10) as u64;
        let mut frame = [0u8; 32];
        let start = Instant::now();
        for seq in 0..=count {
            let msg = if seq == count { u64::MAX } else { seq };
            let len = postcard::to_slice(&endpoint::Envelope { tag: 0, body: msg }, &mut frame)
                .map_err(std::io::Error::other)?
                .len();
            while ring.try_send(Epoch(1), &frame[..len]).is_err() {
                std::hint::spin_loop();
            }
        }
        let mut ack = [0u8; 64];
        while !matches!(replies.try_recv(&mut ack), Ok(Some(_))) {
            std::hint::spin_loop();
        }
        let secs = start.elapsed().as_secs_f64();
        throughputs.push(Throughput {
            what: "ring, one-way small postcard messages".into(),
            per_second: count as f64 / secs,
            unit: "msg/s".into(),
        });
        drop(peer);
    }

    // 6. Bulk data by reference through a shared region, against copying through a socket.
    for size in [4usize << 10, 1 << 20] {
        let mem =
            ChannelMemory::create("pv-bench-bulk", BENCH_RING).map_err(std::io::Error::other)?;
        let region = SharedMemory::create("pv-bench-region", REGION)?;
        let peer = spawn_peer(
            "byref",
            theirs,
            vec![
                sys::dup_inheritable(mem.shm())?,
                sys::dup_inheritable(&region)?,
            ],
        )?;
        let mut client: ClientEnd<endpoint::Request<Chunk>, endpoint::Response<u64>> =
            ClientEnd::new(mem, WaitPolicy::SPINNING);
        let fill = vec![0x5au8; size];
        for slot in 0..SLOTS {
            region.write(slot * size, &fill)?;
        }
        let total_bytes: usize = (256 << 20).max(size * 64);
        let messages = total_bytes / size;
        let start = Instant::now();
        for seq in 0..messages {
            let offset = (seq % SLOTS) * size;
            region.write(offset, &(seq as u64).to_ne_bytes())?;
            let chunk = Chunk {
                offset: offset as u64,
                len: size as u64,
                seq: seq as u64,
            };
            let _ = client.call(&endpoint::Request::Service(chunk), Duration::from_secs(5));
        }
        let secs = start.elapsed().as_secs_f64();
        throughputs.push(Throughput {
            what: format!("by reference through a shared region, {} payloads (reader sums every byte in place)", human(size)),
            per_second: (messages * size) as f64 / secs / 1e9,
            unit: "GB/s".into(),
        });
        drop(peer);

        let (mut a, b) = UnixStream::pair()?;
        let peer = spawn_peer("sink", theirs, vec![sys::dup_inheritable(&b)?])?;
        drop(b);
        let start = Instant::now();
        for _ in 0..messages {
            a.write_all(&fill)?;
        }
        a.shutdown(std::net::Shutdown::Write)?;
        let mut done = [0u8; 8];
        a.read_exact(&mut done)?;
        let secs = start.elapsed().as_secs_f64();
        throughputs.push(Throughput {
            what: format!(
                "copied through a unix socket, {} writes (reader reads every byte)",
                human(size)
            ),
            per_second: (messages * size) as f64 / secs / 1e9,
            unit: "GB/s".into(),
        });
        drop(peer);
    }

    // 7. An idle server (default wait policy) must not burn CPU.
    let idle_server_cpu_percent = {
        let mem = ChannelMemory::create("pv-bench-idle", 4096).map_err(std::io::Error::other)?;
        let peer = spawn_peer(
            "ring-default",
            theirs,
            vec![sys::dup_inheritable(mem.shm())?],
        )?;
        let mut client: ClientEnd<endpoint::Request<u64>, endpoint::Response<u64>> =
            ClientEnd::new(mem, WaitPolicy::default());
        wait_for_server(&mut client)?;
        let pid = peer.child.id();
        std::thread::sleep(Duration::from_millis(200));
        let before = sys::cpu_ticks(pid)?;
        std::thread::sleep(effort.idle);
        let after = sys::cpu_ticks(pid)?;
        drop(peer);
        (after - before) as f64 / sys::clock_ticks_per_second() as f64 / effort.idle.as_secs_f64()
            * 100.0
    };

    Ok(Report {
        cpus: (mine, theirs),
        latencies,
        throughputs,
        idle_server_cpu_percent,
        idle_seconds: effort.idle.as_secs_f64(),
    })
}

fn human(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    }
}

fn wait_ready(word: &std::sync::atomic::AtomicU32, value: u32) -> std::io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while word.load(Ordering::Acquire) != value {
        if Instant::now() > deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "benchmark peer did not start",
            ));
        }
        std::hint::spin_loop();
    }
    Ok(())
}

pub(crate) fn wait_for_server<Q: Serialize, R: serde::de::DeserializeOwned + std::fmt::Debug>(
    client: &mut ClientEnd<endpoint::Request<Q>, endpoint::Response<R>>,
) -> std::io::Result<()> {
    match client.call(
        &endpoint::Request::Ping { nonce: 1 },
        Duration::from_secs(10),
    ) {
        Ok(endpoint::Response::Pong { nonce: 1 }) => Ok(()),
        other => Err(std::io::Error::other(format!("benchmark peer: {other:?}"))),
    }
}

/// The human-readable report.
pub fn text(r: &Report) -> String {
    let mut out = format!(
        "IPC between two processes on CPUs {} and {} (median of samples; ratio = median / floor)\n\n",
        r.cpus.0, r.cpus.1
    );
    let floor = r.latencies.first().map_or(1.0, |l| l.median_ns);
    out += &format!(
        "{:<68} {:>12} {:>12} {:>12} {:>8}\n",
        "round trip", "median", "p10", "p90", "ratio"
    );
    for l in &r.latencies {
        out += &format!(
            "{:<68} {:>12} {:>12} {:>12} {:>7.2}x\n",
            l.what,
            ns(l.median_ns),
            ns(l.p10_ns),
            ns(l.p90_ns),
            l.median_ns / floor
        );
    }
    out += "\nthroughput\n";
    for t in &r.throughputs {
        let v = if t.unit == "msg/s" {
            format!("{:.2} M{}", t.per_second / 1e6, t.unit)
        } else {
            format!("{:.2} {}", t.per_second, t.unit)
        };
        out += &format!("{:<90} {:>14}\n", t.what, v);
    }
    out += &format!(
        "\nidle server CPU over {:.0} s: {:.2} %\n",
        r.idle_seconds, r.idle_server_cpu_percent
    );
    let get = |needle: &str| {
        r.latencies
            .iter()
            .find(|l| l.what.contains(needle))
            .map(|l| l.median_ns)
    };
    if let (Some(spin), Some(block), Some(efd)) = (
        get("postcard request/response, spinning"),
        get("blocking"),
        get("eventfd"),
    ) {
        out += &format!(
            "\ntargets: spin round trip {:.2}x floor (target <= 2x): {}; blocking {:.2}x eventfd (target <= 1x): {}\n",
            spin / floor,
            if spin <= 2.0 * floor { "met" } else { "NOT met" },
            block / efd,
            if block <= efd { "met" } else { "NOT met" }
        );
    }
    out
}

fn ns(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} us", v / 1000.0)
    } else {
        format!("{v:.0} ns")
    }
}

/// The peer side, in the child process.
pub fn peer(kind: &str, cpu: usize, fds: &[i32]) -> std::io::Result<()> {
    sys::pin_to_cpu(cpu)?;
    let take = |i: usize| -> std::io::Result<OwnedFd> {
        sys::take_fd(*fds.get(i).ok_or(std::io::ErrorKind::InvalidInput)?)
    };
    match kind {
        "vmgs-server" => crate::bench_vmgs::serve(take(0)?, take(1)?, take(2)?),
        "line" => {
            let line = SharedMemory::map(take(0)?, true)?;
            let word = line.atomic_u32(0)?;
            word.store(1, Ordering::Release);
            let mut seen = 1u32;
            loop {
                let v = word.load(Ordering::Acquire);
                if v != seen && v % 2 == 0 {
                    word.store(v.wrapping_add(1), Ordering::Release);
                    seen = v.wrapping_add(1);
                }
                std::hint::spin_loop();
            }
        }
        "ring-spin" | "ring-default" | "ring-block" => {
            let policy = match kind {
                "ring-spin" => WaitPolicy::SPINNING,
                "ring-block" => WaitPolicy::BLOCKING,
                _ => WaitPolicy::default(),
            };
            let mem = ChannelMemory::open(take(0)?).map_err(std::io::Error::other)?;
            let mut server = ServerEnd::new(mem);
            loop {
                match server.try_next() {
                    Ok(Some(incoming)) => {
                        let reply = match server.decode::<endpoint::Request<u64>>(&incoming) {
                            Some(endpoint::Request::Ping { nonce }) => {
                                endpoint::Response::Pong { nonce }
                            }
                            Some(endpoint::Request::Service(n)) => {
                                endpoint::Response::Service(n + 1)
                            }
                            Some(endpoint::Request::Guest(_)) | None => {
                                endpoint::Response::Error(endpoint::ErrorCode::Malformed)
                            }
                        };
                        let _ = server.reply(&incoming, &reply, Duration::from_secs(1));
                    }
                    Ok(None) => ipc_defs::hosted::channel::wait_any(
                        &[server.request_ring()],
                        policy,
                        Duration::from_secs(5),
                    ),
                    Err(_) => {}
                }
            }
        }
        "raw" => {
            let mem = ChannelMemory::open(take(0)?).map_err(std::io::Error::other)?;
            let requests = mem.channel().ring(Direction::Requests);
            let responses = mem.channel().ring(Direction::Responses);
            let mut buf = [0u8; 64];
            loop {
                if let Ok(Some(got)) = requests.try_recv(&mut buf) {
                    let _ = responses.try_send(Epoch(1), &buf[..got.len]);
                    let _ = requests.release();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        "eventfd" => {
            let ping = take(0)?;
            let pong = take(1)?;
            loop {
                sys::eventfd_wait(&ping)?;
                sys::eventfd_signal(&pong)?;
            }
        }
        "unix" => {
            let mut s = UnixStream::from(take(0)?);
            let mut buf = [0u8; 8];
            loop {
                s.read_exact(&mut buf)?;
                s.write_all(&buf)?;
            }
        }
        "sink" => {
            let mut s = UnixStream::from(take(0)?);
            let mut buf = vec![0u8; 1 << 20];
            let mut sum = 0u64;
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                sum = buf[..n].iter().fold(sum, |a, b| a.wrapping_add(*b as u64));
            }
            s.write_all(&sum.to_ne_bytes())?;
            Ok(())
        }
        "stream" => {
            let mem = ChannelMemory::open(take(0)?).map_err(std::io::Error::other)?;
            let ring = mem.channel().ring(Direction::Requests);
            let replies = mem.channel().ring(Direction::Responses);
            let mut buf = [0u8; 64];
            loop {
                if let Ok(Some(got)) = ring.try_recv(&mut buf) {
                    let _ = ring.release();
                    if let Ok(e) = postcard::from_bytes::<endpoint::Envelope<u64>>(&buf[..got.len])
                    {
                        if e.body == u64::MAX {
                            let _ = replies.try_send(Epoch(1), &[1]);
                            return Ok(());
                        }
                    }
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        "byref" => {
            let mem = ChannelMemory::open(take(0)?).map_err(std::io::Error::other)?;
            let region = SharedMemory::map(take(1)?, false)?;
            let mut server = ServerEnd::new(mem);
            loop {
                match server.try_next() {
                    Ok(Some(incoming)) => {
                        let reply = match server.decode::<endpoint::Request<Chunk>>(&incoming) {
                            Some(endpoint::Request::Service(c)) => {
                                match region.fold_words(
                                    c.offset as usize,
                                    c.len as usize,
                                    0,
                                    |a, w| a.wrapping_add(w),
                                ) {
                                    Ok(sum) => endpoint::Response::Service(sum),
                                    Err(_) => {
                                        endpoint::Response::Error(endpoint::ErrorCode::Malformed)
                                    }
                                }
                            }
                            Some(endpoint::Request::Ping { nonce }) => {
                                endpoint::Response::Pong { nonce }
                            }
                            Some(endpoint::Request::Guest(_)) | None => {
                                endpoint::Response::Error(endpoint::ErrorCode::Malformed)
                            }
                        };
                        let _ = server.reply(&incoming, &reply, Duration::from_secs(1));
                    }
                    Ok(None) => std::hint::spin_loop(),
                    Err(_) => {}
                }
            }
        }
        #[cfg(feature = "iceoryx2")]
        "iceoryx2" => {
            use iceoryx2::prelude::*;
            let name = std::env::var("PV_BENCH_SERVICE").map_err(std::io::Error::other)?;
            let node = NodeBuilder::new()
                .create::<ipc::Service>()
                .map_err(std::io::Error::other)?;
            let service_name: ServiceName =
                name.as_str().try_into().map_err(std::io::Error::other)?;
            let service = node
                .service_builder(&service_name)
                .request_response::<u64, u64>()
                .open_or_create()
                .map_err(std::io::Error::other)?;
            let server = service
                .server_builder()
                .create()
                .map_err(std::io::Error::other)?;
            loop {
                match server.receive() {
                    Ok(Some(request)) => {
                        let _ = request.send_copy(request.payload().wrapping_add(1));
                    }
                    _ => std::hint::spin_loop(),
                }
            }
        }
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("unknown peer kind {other}"),
        )),
    }
}
