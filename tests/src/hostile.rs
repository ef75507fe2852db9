//! `pv-hostile`: a deliberately misbehaving service, for the integration tests only.
//!
//! It starts like every service (bootstrap record, sandbox, capabilities) and then does what
//! its first argument (from the test manifest's `args`) says, to prove that the microkernel
//! and its peers contain it:
//!
//! | action              | what it does                                   | expected outcome               |
//! |---------------------|------------------------------------------------|--------------------------------|
//! | `open-file`         | opens `/etc/hostname`                          | killed, reported as `openat`   |
//! | `socket`            | creates a UDP socket                           | killed, reported as `socket`   |
//! | `forge-slot N`      | maps descriptor N as if it were a channel      | typed error (exit 0)           |
//! | `torn-frame EP`     | publishes half a frame to EP, then aborts      | EP's server survives           |
//! | `garbage EP`        | sends bad postcard and an oversized frame to EP| typed errors (exit 0)          |
//! | `crash`             | exits with status 3 at once                    | restarted, then `failed`       |
//! | `hang`              | answers the start ping, then spins forever     | killed by the watchdog         |
//! | `scribble EP`       | overwrites EP's channel header, then serves    | EP's server still restarts     |
//! | `vmgs-writer F S`   | writes 1, 2, ... to VMGS file F for S seconds, reading each back | every acknowledged write stays |
//! | `vmgs-access F`     | writes, reads and lists VMGS file F            | refused unless F is granted    |
//! | `raise-interrupt L..`| asks intercept to raise each IOAPIC line L     | raised if granted, else refused|
//! | `silent-start`      | never answers its first ping (sleeps)          | killed at the start deadline; the supervisor serves meanwhile |
//! | `read-terminal`     | reads descriptors 0, 1 and 2                    | nothing to read (status 16 if it read anything) |
//! | `deface-output`     | writes terminal escapes and a forged tag, then seeks descriptors 1 and 2 to 0 and writes | tagged, escaped, appended |
//! | `flood N`           | writes N lines to stderr as fast as it can (0: forever), then serves | rate-limited, drops counted |
//! | `long-line N`       | writes N bytes without a newline, then exits   | cut; the supervisor's memory bounded |
//! | `platform-grab`     | as the attest service: asks the platform for a VMPL 0 report and the datastore key's wrapping key, then a VMPL 1 report | the first two refused, the last signed |
//! | `vtpm-requests [L]` | a TPM command (at locality L, default 0), a platform power-off and a register read to vtpm | each refused unless granted |
//! | `vtpm-seize S`      | for S seconds seizes the TPM's registers (locality 4) and writes its FIFO, as vCPU 0 | refused: the guest's session goes on |
//! | `vtpm-vcpu-flood N` | N register writes to vtpm under invented vCPU ids 1000.. | refused; the checkpoint stays small |
//! | `privileges`        | reads /proc/1/environ, then tries setuid(0), setresuid, setresgid, setgroups, capset, chown, chmod, a raw socket, raising a limit, sethostname, settimeofday (its manifest grants these syscalls, so the kernel answers, not seccomp); last init_module | each refused; killed at init_module |
//! | `tap-responder NAME IP MAC` | on its TAP NAME, answers ARP and ICMP echo for IP as MAC and logs UDP to IP (see `tap_responder`); logs "no TAP" if the host named none | frames cross both ways with read/write/poll only |
//! | `tap-ioctl NAME`    | sets its TAP NAME's offloads (TUNSETOFFLOAD, the one ioctl a TAP's holder has), then asks whether it is a terminal (TCGETS) | the first allowed, then killed, reported as `ioctl` |
//! | `fd-store-abuse L`  | accepts one connection on listener L, keeps it, then sends its fd store its listener, a memfd, /dev/null, the store itself, wrong descriptor counts, garbage, an oversized packet, unknown forgets and 1000 more keeps; started again, logs what it got back | the connection kept (up to the bound), the rest refused and logged; the supervisor serves on |
//! | `fd-store-unsent`   | without a store, sends on the slot a store would have | killed, reported as `sendmsg` |
//! | `serve`             | serves normally                                | runs                           |
//!
//! Exit status 0 means "every hostile attempt got the typed error it should"; 10 and up
//! name an attempt that unexpectedly worked.
#![forbid(unsafe_code)]

mod fd_store_abuse;
mod tap_responder;

use std::io::Read;
use std::io::Seek;
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::process::ExitCode;
use std::time::Duration;
use std::time::Instant;

use ipc_defs::endpoint;
use ipc_defs::hosted::channel::ChannelMemory;
use ipc_defs::hosted::runtime;
use ipc_defs::hosted::sys;
use ipc_defs::hosted::vmgs_client::VmgsClient;
use ipc_defs::layout::frame_footprint;
use ipc_defs::layout::Direction;
use ipc_defs::layout::ProducerLine;
use ipc_defs::layout::RingHeader;
use ipc_defs::ring::RingError;
use ipc_defs::services::bytes::Bytes;
use ipc_defs::services::guest;
use ipc_defs::services::intercept;
use ipc_defs::services::platform;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::services::vtpm;
use ipc_defs::Interface;

/// The calling end the manifest grants this service for `ep`.
fn granted(
    context: &runtime::Context,
    ep: Interface,
) -> &ipc_defs::hosted::ClientEnd<endpoint::Request<()>, endpoint::Response<()>> {
    context
        .clients
        .get(&ep)
        .expect("the test manifest grants the call")
}

type VtpmEnd = ipc_defs::hosted::ClientEnd<
    endpoint::Request<vtpm::Request>,
    endpoint::Response<vtpm::Response>,
>;

/// Answers the start ping, then takes the vtpm capability.
fn vtpm_client(started: &mut runtime::Started) -> VtpmEnd {
    started.answer_first_ping();
    started
        .context
        .clients
        .remove(&Interface::Vtpm)
        .expect("the test manifest grants the call")
        .into_typed()
}

/// One request to vtpm; its answer as the log shows it.
fn vtpm_call(end: &mut VtpmEnd, request: vtpm::Request) -> Result<vtpm::Response, String> {
    match end.call(
        &endpoint::Request::Service(request),
        Duration::from_secs(10),
    ) {
        Ok(endpoint::Response::Service(r)) => Ok(r),
        other => Err(format!("{other:?}")),
    }
}

/// A register access of the TPM's TIS range, as vCPU `vcpu` would make it.
fn tis_access(vcpu: u32, seq: u64, offset: u64, write: Option<u64>) -> vtpm::Request {
    vtpm::Request::Mmio(guest::Access {
        vcpu,
        seq,
        space: guest::Space::Mmio,
        address: 0xfed4_0000 + offset,
        size: 1,
        write,
    })
}

/// Answers the start ping, then takes the vmgs capability and the file id argument.
fn vmgs_client(started: &mut runtime::Started, args: &[String]) -> (FileId, VmgsClient) {
    let file = args.get(1).and_then(|f| FileId::parse(f)).expect("file id");
    started.answer_first_ping();
    let end = started
        .context
        .clients
        .remove(&Interface::Vmgs)
        .expect("granted");
    (file, VmgsClient::new(end))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut started = match runtime::enter() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("pv-hostile: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    let action = args.first().map(String::as_str).unwrap_or("serve");
    let endpoint = || {
        args.get(1)
            .and_then(|n| Interface::from_name(n))
            .expect("test manifest names an endpoint")
    };
    match action {
        "open-file" => {
            let r = std::fs::File::open("/etc/hostname");
            eprintln!("pv-hostile: open returned {r:?} (should have been killed)");
            ExitCode::from(10)
        }
        "tap-responder" => tap_responder::run(&mut started, &args),
        "fd-store-abuse" => fd_store_abuse::abuse(&mut started, &args),
        "fd-store-unsent" => fd_store_abuse::unsent(&mut started),
        "tap-ioctl" => {
            use std::io::IsTerminal;
            let name = args.get(1).map(String::as_str).unwrap_or("net0");
            started.answer_first_ping();
            let Some(tap) = started.context.taps.get(name) else {
                eprintln!("pv-hostile: no TAP {name} to probe");
                return ExitCode::from(22);
            };
            // The one ioctl a TAP's holder has: its offloads, within the set.
            use std::os::fd::AsFd;
            match sys::tap_set_offloads(tap.as_fd(), sys::TAP_OFFLOADS) {
                Ok(()) => eprintln!("pv-hostile: TUNSETOFFLOAD on TAP {name} allowed"),
                Err(e) => {
                    eprintln!("pv-hostile: TUNSETOFFLOAD on TAP {name} failed: {e}");
                    return ExitCode::from(24);
                }
            }
            let terminal = tap.is_terminal();
            eprintln!(
                "pv-hostile: ioctl on TAP {name} answered ({terminal}; should have been killed)"
            );
            ExitCode::from(23)
        }
        "socket" => {
            let r = std::net::UdpSocket::bind("127.0.0.1:0");
            eprintln!("pv-hostile: socket returned {r:?} (should have been killed)");
            ExitCode::from(11)
        }
        "forge-slot" => {
            let slot: i32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(40);
            let outcome = sys::take_fd(slot)
                .map_err(|e| e.to_string())
                .and_then(|fd| ChannelMemory::open(fd).map_err(|e| e.to_string()));
            match outcome {
                Ok(_) => {
                    eprintln!("pv-hostile: forged slot {slot} opened as a channel");
                    ExitCode::from(12)
                }
                Err(e) => {
                    eprintln!("pv-hostile: forged slot {slot} refused: {e}");
                    ExitCode::SUCCESS
                }
            }
        }
        "torn-frame" => {
            let ep = endpoint();
            let client = granted(&started.context, ep);
            let mem = client.memory();
            let layout = mem.channel().layout();
            let header = layout.ring_header(Direction::Requests);
            let data = layout.ring_data(Direction::Requests);
            let tail_at = header
                + core::mem::offset_of!(RingHeader, producer)
                + core::mem::offset_of!(ProducerLine, tail);
            let mut tail = [0u8; 8];
            mem.shm().read(tail_at, &mut tail).expect("in bounds");
            let tail = u64::from_ne_bytes(tail);
            let at = data + (tail % layout.ring_capacity as u64) as usize;
            // A frame header promising 1000 bytes and eight bytes of payload, the tail
            // published past it, and death before the stamp that would make it visible:
            // exactly a producer killed in the middle of writing a frame.
            let epoch = mem.channel().epoch().0;
            let mut frame = vec![0u8; 8]; // the stamp, never written
            frame.extend_from_slice(&1000u32.to_ne_bytes());
            frame.extend_from_slice(&epoch.to_ne_bytes());
            frame.extend_from_slice(&[0xee; 8]);
            let _ = mem.shm().write(at + 8, &frame[8..]);
            let published = tail + frame_footprint(1000) as u64;
            let _ = mem.shm().write(tail_at, &published.to_ne_bytes());
            sys::futex_wake(mem.channel().ring(Direction::Requests).data_seq(), 1);
            std::process::abort();
        }
        "garbage" => {
            let ep = endpoint();
            let client = granted(&started.context, ep);
            let channel = client.memory().channel();
            let requests = channel.ring(Direction::Requests);
            let responses = channel.ring(Direction::Responses);
            // 1. A frame whose tag decodes but whose body is not postcard for the interface.
            let garbage = [0x05u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f, 0x09];
            let _ = requests.try_send(channel.epoch(), &garbage);
            sys::futex_wake(requests.data_seq(), 1);
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut buf = vec![0u8; responses.capacity()];
            let reply = loop {
                if let Ok(Some(got)) = responses.try_recv(&mut buf) {
                    let _ = responses.release();
                    break postcard::from_bytes::<endpoint::Envelope<endpoint::Response<()>>>(
                        &buf[..got.len],
                    )
                    .ok();
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(1));
            };
            match reply {
                Some(endpoint::Envelope {
                    tag: 5,
                    body: endpoint::Response::Error(endpoint::ErrorCode::Malformed),
                }) => eprintln!("pv-hostile: garbage was refused as malformed"),
                other => {
                    eprintln!("pv-hostile: garbage got {other:?}");
                    return ExitCode::from(13);
                }
            }
            // 2. A frame larger than the ring.
            let big = vec![0u8; requests.capacity() + 1];
            match requests.try_send(channel.epoch(), &big) {
                Err(RingError::FrameTooLarge { .. }) => {
                    eprintln!("pv-hostile: oversized frame refused")
                }
                other => {
                    eprintln!("pv-hostile: oversized frame got {other:?}");
                    return ExitCode::from(14);
                }
            }
            // 3. The server still answers properly.
            let client = started.context.clients.get_mut(&ep).expect("granted");
            match client.call(
                &endpoint::Request::Ping { nonce: 77 },
                Duration::from_secs(5),
            ) {
                Ok(endpoint::Response::Pong { nonce: 77 }) => ExitCode::SUCCESS,
                other => {
                    eprintln!("pv-hostile: ping after garbage got {other:?}");
                    ExitCode::from(15)
                }
            }
        }
        "vmgs-writer" => {
            // Writes 1, 2, 3, ... into FILE for SECONDS (40 KiB each, so every write spans
            // chunks), reading each back: an acknowledged write must survive any restart of
            // the store.
            let seconds: u64 = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(1);
            let until = Instant::now() + Duration::from_secs(seconds);
            let (file, mut client) = vmgs_client(&mut started, &args);
            let contents = |n: u32| -> Vec<u8> {
                (0..40_000u32)
                    .map(|i| (i.wrapping_mul(n) >> 3) as u8 ^ n as u8)
                    .collect()
            };
            let mut count = 0;
            while Instant::now() < until {
                if !started.answer_control() {
                    return ExitCode::SUCCESS;
                }
                count += 1;
                let n = count;
                let restarts = client.restarts_seen;
                if let Err(e) = client.write(file, &contents(n)) {
                    eprintln!("pv-hostile: vmgs write {n} failed: {e}");
                    return ExitCode::from(20);
                }
                eprintln!("pv-hostile: vmgs acked {n}");
                match client.read(file) {
                    Ok(data) if data == contents(n) => {}
                    Ok(data) => {
                        eprintln!(
                            "pv-hostile: vmgs LOST acked write {n} ({} bytes back)",
                            data.len()
                        );
                        return ExitCode::from(21);
                    }
                    Err(e) => {
                        eprintln!("pv-hostile: vmgs read-back {n} failed: {e}");
                        return ExitCode::from(22);
                    }
                }
                if client.restarts_seen != restarts {
                    eprintln!("pv-hostile: vmgs store restarted during call {n}; retried");
                }
            }
            eprintln!(
                "pv-hostile: vmgs writer done: {count} writes, {} store restarts seen",
                client.restarts_seen
            );
            started.serve::<(), ()>(Interface::Intercept, |_, _, ()| {
                endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
            })
        }
        "vmgs-access" => {
            // Tries to read and write FILE and reports what the store said.
            let (file, mut client) = vmgs_client(&mut started, &args);
            match client.write(file, b"from the hostile client") {
                Ok(()) => eprintln!("pv-hostile: vmgs write {file}: ok"),
                Err(e) => eprintln!("pv-hostile: vmgs write {file}: {e}"),
            }
            match client.read(file) {
                Ok(d) => eprintln!("pv-hostile: vmgs read {file}: {} bytes", d.len()),
                Err(e) => eprintln!("pv-hostile: vmgs read {file}: {e}"),
            }
            match client.list() {
                Ok(files) => eprintln!("pv-hostile: vmgs list: {} files", files.len()),
                Err(e) => eprintln!("pv-hostile: vmgs list: {e}"),
            }
            started.serve::<(), ()>(Interface::Intercept, |_, _, ()| {
                endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
            })
        }
        "raise-interrupt" => {
            // Asks intercept for each line and reports its answer.
            started.answer_first_ping();
            let end = started
                .context
                .clients
                .remove(&Interface::Intercept)
                .expect("the test manifest grants the call");
            let mut end: ipc_defs::hosted::ClientEnd<
                endpoint::Request<intercept::Request>,
                endpoint::Response<intercept::Response>,
            > = end.into_typed();
            for line in args.iter().skip(1).filter_map(|l| l.parse::<u8>().ok()) {
                let request = endpoint::Request::Service(intercept::Request::Raise(
                    intercept::Interrupt::Line(line),
                ));
                match end.call(&request, Duration::from_secs(5)) {
                    Ok(endpoint::Response::Service(r)) => {
                        eprintln!("pv-hostile: raise line {line}: {r:?}")
                    }
                    other => eprintln!("pv-hostile: raise line {line}: {other:?}"),
                }
            }
            started.serve::<(), ()>(Interface::Intercept, |_, _, ()| {
                endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
            })
        }
        "platform-grab" => {
            // What a compromised attest service would try: evidence that speaks for the
            // paravisor itself, and the key that unwraps the guest-state file's key.
            started.answer_first_ping();
            let mut end = started
                .context
                .platform
                .take()
                .expect("the test manifest gives this service the platform");
            let report = |vmpl| platform::Request::Report {
                report_data: Bytes::new(&[0x66; platform::REPORT_DATA_LEN]).expect("64 bytes"),
                vmpl,
            };
            let attempts = [
                ("vmpl-0 report", report(0)),
                (
                    "datastore-key context",
                    platform::Request::DerivedKey {
                        select: platform::FieldSelect {
                            policy: true,
                            measurement: true,
                            guest_svn: false,
                            tcb: true,
                        },
                        context: Bytes::new(&platform::DATASTORE_KEY_CONTEXT).expect("32 bytes"),
                    },
                ),
                ("vmpl-1 report", report(1)),
            ];
            for (what, request) in attempts {
                match end.call(&request, Duration::from_secs(10)) {
                    Ok(platform::Response::Report(r)) => eprintln!(
                        "pv-hostile: platform {what}: signed at VMPL {}",
                        r.as_slice().get(0x30).copied().unwrap_or(0xff)
                    ),
                    Ok(platform::Response::Key(_)) => {
                        eprintln!("pv-hostile: platform {what}: key derived")
                    }
                    Ok(platform::Response::Error(e)) => {
                        eprintln!("pv-hostile: platform {what}: refused: {e:?}")
                    }
                    Err(e) => eprintln!("pv-hostile: platform {what}: no answer: {e}"),
                }
            }
            started.serve::<(), ()>(Interface::Attest, |_, _, ()| {
                endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
            })
        }
        "vtpm-requests" => {
            // What a front end or any other client could try beyond its grant.
            let mut end = vtpm_client(&mut started);
            let getrandom =
                vtpm::TpmBytes::new(&[0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 8]).expect("fits");
            let seq = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64);
            // At the locality the second argument names (default 0).
            let locality: u8 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            let r = vtpm_call(
                &mut end,
                vtpm::Request::Command {
                    seq,
                    locality,
                    command: getrandom,
                    start_by: None,
                },
            );
            eprintln!("pv-hostile: vtpm command: {r:?}");
            let r = vtpm_call(&mut end, vtpm::Request::platform(vtpm::Platform::PowerOff));
            eprintln!("pv-hostile: vtpm platform power-off: {r:?}");
            let r = vtpm_call(&mut end, tis_access(0, 1, 0, None));
            eprintln!("pv-hostile: vtpm register read: {r:?}");
            started.serve::<(), ()>(Interface::Intercept, |_, _, ()| {
                endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
            })
        }
        "vtpm-seize" => {
            // Takes the guest's TPM away from it: seize at locality 4, commandReady, FIFO
            // bytes, a FIFO read; as vCPU 0, numbered past anything the guest uses.
            let seconds: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1);
            let mut end = vtpm_client(&mut started);
            let until = Instant::now() + Duration::from_secs(seconds);
            let (mut accepted, mut refused, mut seq) = (0u64, 0u64, 1u64 << 40);
            while Instant::now() < until {
                if !started.answer_control() {
                    return ExitCode::SUCCESS;
                }
                for (offset, write) in [
                    (0x4000, Some(0x08)), // locality 4 ACCESS: seize
                    (0x0000, Some(0x02)), // locality 0 ACCESS: request use
                    (0x0018, Some(0x40)), // STS: commandReady
                    (0x0024, Some(0x80)), // FIFO
                    (0x0024, None),       // FIFO read
                ] {
                    seq += 1;
                    match vtpm_call(&mut end, tis_access(0, seq, offset, write)) {
                        Ok(vtpm::Response::Error(_)) | Err(_) => refused += 1,
                        Ok(_) => accepted += 1,
                    }
                }
            }
            eprintln!(
                "pv-hostile: vtpm seize done: {accepted} register accesses accepted, {refused} refused"
            );
            started.serve::<(), ()>(Interface::Intercept, |_, _, ()| {
                endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
            })
        }
        "vtpm-vcpu-flood" => {
            // Register writes under vCPU ids the partition does not have, each a new entry in
            // an unbounded per-vCPU table of the checkpoint (INT_ENABLE of locality 0: no
            // effect on the interface itself).
            let count: u32 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(1000);
            let mut end = vtpm_client(&mut started);
            let (mut accepted, mut refused, mut failed) = (0u64, 0u64, 0u64);
            for i in 0..count {
                if !started.answer_control() {
                    return ExitCode::SUCCESS;
                }
                match vtpm_call(&mut end, tis_access(1000 + i, 1, 0x08, Some(0))) {
                    Ok(vtpm::Response::Error(_)) => refused += 1,
                    Ok(_) => accepted += 1,
                    Err(_) => failed += 1,
                }
            }
            eprintln!(
                "pv-hostile: vtpm vcpu flood done: {accepted} accepted, {refused} refused, {failed} failed calls"
            );
            started.serve::<(), ()>(Interface::Intercept, |_, _, ()| {
                endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
            })
        }
        "privileges" => {
            started.answer_first_ping();
            match std::fs::read("/proc/1/environ") {
                Ok(b) => {
                    eprintln!(
                        "pv-hostile: read /proc/1/environ: SUCCEEDED ({} bytes)",
                        b.len()
                    );
                    return ExitCode::from(29);
                }
                Err(e) => eprintln!("pv-hostile: read /proc/1/environ: refused ({e})"),
            }
            let mut first_success = None;
            for (i, op) in sys::Privileged::ALL.iter().enumerate() {
                if *op == sys::Privileged::LoadModule {
                    continue;
                }
                match sys::attempt(*op) {
                    Ok(()) => {
                        eprintln!("pv-hostile: privilege {op:?}: SUCCEEDED");
                        first_success.get_or_insert(30 + i as u8);
                    }
                    Err(e) => eprintln!("pv-hostile: privilege {op:?}: refused ({e})"),
                }
            }
            if let Some(code) = first_success {
                return ExitCode::from(code);
            }
            // Outside every service profile: the service is killed here.
            eprintln!("pv-hostile: privilege LoadModule: attempting");
            let r = sys::attempt(sys::Privileged::LoadModule);
            eprintln!("pv-hostile: privilege LoadModule: returned {r:?} (should have been killed)");
            ExitCode::from(42)
        }
        "crash" => ExitCode::from(3),
        "scribble" => {
            let ep = endpoint();
            let client = granted(&started.context, ep);
            // Magic, version and ring capacity: garbage (the epoch word is left alone).
            let _ = client.memory().shm().write(0, &[0xff; 8]);
            let _ = client
                .memory()
                .shm()
                .write(16, &(16u32 << 20).to_ne_bytes());
            started.serve::<(), ()>(Interface::Intercept, |_, _, ()| {
                endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
            })
        }
        "hang" => {
            started.answer_first_ping();
            loop {
                std::hint::spin_loop();
            }
        }
        "deaf" => {
            // Serves its endpoint in name only: answers the start ping, then nothing, asleep
            // (its callers' requests time out).
            started.answer_first_ping();
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        "silent-start" => {
            // Hangs before its first ping: the supervisor must go on serving while it waits.
            eprintln!("pv-hostile: silent at start");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        "read-terminal" => {
            // Reads the descriptors a process inherits as its terminal: what the operator
            // types into the `paravisor run` terminal must not reach a service.
            started.answer_first_ping();
            let mut read_something = false;
            let mut kept = Vec::new();
            for fd in [0, 1, 2] {
                let outcome = sys::take_fd(fd).map(std::fs::File::from).and_then(|mut f| {
                    let mut buf = [0u8; 256];
                    let n = f.read(&mut buf);
                    kept.push(f);
                    n
                });
                match outcome {
                    Ok(0) => eprintln!("pv-hostile: descriptor {fd}: nothing to read"),
                    Ok(n) => {
                        eprintln!("pv-hostile: descriptor {fd}: READ {n} bytes");
                        read_something = true;
                        break;
                    }
                    Err(e) => eprintln!("pv-hostile: descriptor {fd}: refused: {e}"),
                }
            }
            // Descriptors 1 and 2 stay open (this process's output).
            kept.into_iter().for_each(|f| {
                let _ = f.into_raw_fd();
            });
            if read_something {
                ExitCode::from(16)
            } else {
                ExitCode::SUCCESS
            }
        }
        "deface-output" => {
            started.answer_first_ping();
            // Escape sequences: window title, clear screen, cursor home, an 8-bit CSI, a
            // bidi override, a carriage return that would put a forged tag at the start of
            // the line, bytes that are not UTF-8.
            let text = "DEFACE-1 \x1b]0;pv-hostile-title\x07\x1b[2J\x1b[HDEFACE-2\n\
                        DEFACE-3 \u{9b}31mred\u{202e}desrever\n\
                        DEFACE-4\rattest      | DEFACE-FORGED-TAG\n";
            let _ = std::io::stderr().write_all(text.as_bytes());
            let _ = std::io::stdout().write_all(text.as_bytes());
            let _ = std::io::stderr().write_all(b"DEFACE-5 \xff\xfe\n");
            let _ = std::io::stdout().flush();
            // Rewrite the start of the paravisor's log (its launch measurement) if the
            // descriptors are its own log file.
            for fd in [1, 2] {
                let Ok(mut f) = sys::take_fd(fd).map(std::fs::File::from) else {
                    continue;
                };
                let seek = f.seek(std::io::SeekFrom::Start(0));
                let _ = f.write_all(b"DEFACE-REWRITE launch measurement 00000000 forged\n");
                let _ = f.into_raw_fd();
                eprintln!("pv-hostile: seek of descriptor {fd}: {seek:?}");
            }
            eprintln!("pv-hostile: defaced");
            started.serve::<(), ()>(Interface::Intercept, |_, _, ()| {
                endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
            })
        }
        "flood" => {
            let lines: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            started.answer_first_ping();
            let mut err = std::io::stderr().lock();
            let mut i = 0u64;
            while lines == 0 || i < lines {
                let _ = writeln!(err, "pv-hostile: flood line {i}");
                i += 1;
                if i.is_multiple_of(256) && !started.answer_control() {
                    return ExitCode::SUCCESS;
                }
            }
            drop(err);
            started.serve::<(), ()>(Interface::Intercept, |_, _, ()| {
                endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
            })
        }
        "long-line" => {
            let bytes: u64 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(0);
            started.answer_first_ping();
            let chunk = [b'x'; 64 * 1024];
            let mut err = std::io::stderr().lock();
            let mut sent = 0u64;
            while sent < bytes {
                let n = chunk.len().min((bytes - sent) as usize);
                if err.write_all(&chunk[..n]).is_err() {
                    return ExitCode::from(17);
                }
                sent += n as u64;
                if !started.answer_control() {
                    return ExitCode::SUCCESS;
                }
            }
            let _ = writeln!(err, "\npv-hostile: long line of {bytes} bytes written");
            ExitCode::SUCCESS
        }
        _ => started.serve::<(), ()>(Interface::Intercept, |_, _, ()| {
            endpoint::Response::Error(endpoint::ErrorCode::Unsupported)
        }),
    }
}
