//! Descriptor stores (`fd-store = { max = N }`): a killed service gets back what it kept.
//! The TPM gateway keeps its connections, so that its clients (QEMU on the swtpm socket,
//! tpm2-tools on mssim) never see it die: the same connection answers after every restart,
//! each command runs exactly once (a PCR is the hash chain of every extend sent, none lost
//! or doubled). A compromised holder gets nothing past its bound, nothing but sockets and
//! pipes; a service without the grant has no store at all.

mod common;

use std::io::Read;
use std::io::Write;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use common::sandbox_available;
use common::service;
use common::text;
use common::Instance;
use sha2::Digest;

/// How many times the tests kill the gateway: within its restart policy (5 per minute).
const KILLS: usize = 4;
/// Between two kills: long enough for commands to flow between them.
const KILL_EVERY: Duration = Duration::from_millis(1500);

// ---- TPM 2.0 commands (no sessions but the password one an extend needs) ----

fn startup_clear() -> Vec<u8> {
    vec![0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0]
}

fn pcr_extend(pcr: u32, digest: &[u8; 32]) -> Vec<u8> {
    let mut body = pcr.to_be_bytes().to_vec();
    // Authorization area: TPM_RS_PW, empty nonce, continueSession, empty password.
    let auth = [0x40, 0, 0, 0x09, 0, 0, 0x01, 0, 0];
    body.extend_from_slice(&(auth.len() as u32).to_be_bytes());
    body.extend_from_slice(&auth);
    body.extend_from_slice(&1u32.to_be_bytes());
    body.extend_from_slice(&0x000bu16.to_be_bytes());
    body.extend_from_slice(digest);
    command(0x8002, 0x182, &body)
}

fn pcr_read(pcr: u32) -> Vec<u8> {
    let mut select = [0u8; 3];
    select[(pcr / 8) as usize] = 1 << (pcr % 8);
    let mut body = 1u32.to_be_bytes().to_vec();
    body.extend_from_slice(&0x000bu16.to_be_bytes());
    body.push(3);
    body.extend_from_slice(&select);
    command(0x8001, 0x17e, &body)
}

fn get_random(n: u16) -> Vec<u8> {
    command(0x8001, 0x17b, &n.to_be_bytes())
}

fn command(tag: u16, code: u32, body: &[u8]) -> Vec<u8> {
    let mut c = tag.to_be_bytes().to_vec();
    c.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
    c.extend_from_slice(&code.to_be_bytes());
    c.extend_from_slice(body);
    c
}

fn rc(response: &[u8]) -> u32 {
    u32::from_be_bytes(response[6..10].try_into().unwrap())
}

/// The one SHA-256 value of a PCR_Read response.
fn pcr_value(response: &[u8]) -> [u8; 32] {
    assert_eq!(rc(response), 0, "PCR_Read: {response:02x?}");
    // Header, update counter, selection (count, hash, size, 3 bytes), digest count, size.
    let at = 10 + 4 + 4 + 2 + 1 + 3 + 4 + 2;
    response[at..at + 32].try_into().unwrap()
}

fn extended(pcr: [u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    let mut h = sha2::Sha256::new();
    h.update(pcr);
    h.update(digest);
    h.finalize().into()
}

fn digest_of(n: u64) -> [u8; 32] {
    sha2::Sha256::digest(n.to_be_bytes()).into()
}

// ---- The two protocols, as their clients speak them ----

/// QEMU's side of the swtpm protocol: a control connection on the Unix socket, and a data
/// channel (one end of a socket pair) handed over with CMD_SET_DATAFD.
struct Swtpm {
    control: UnixStream,
    data: UnixStream,
}

impl Swtpm {
    fn connect(path: &std::path::Path) -> Swtpm {
        let mut control = UnixStream::connect(path).expect("the swtpm socket");
        control
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        // CMD_GET_CAPABILITY: result and capabilities.
        control.write_all(&1u32.to_be_bytes()).unwrap();
        let mut caps = [0u8; 8];
        control.read_exact(&mut caps).unwrap();
        assert_ne!(u64::from_be_bytes(caps) & (1 << 12), 0, "no SET_DATAFD");
        // CMD_SET_DATAFD with our end's peer.
        let (data, theirs) = UnixStream::pair().unwrap();
        ipc_defs::hosted::sys::send_with_fd(&control, &16u32.to_be_bytes(), Some(theirs.as_fd()))
            .unwrap();
        drop(theirs);
        let mut result = [0u8; 4];
        control.read_exact(&mut result).unwrap();
        assert_eq!(result, [0; 4], "SET_DATAFD refused");
        data.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut s = Swtpm { control, data };
        // CMD_INIT (a machine reset), then the firmware's TPM2_Startup.
        s.control_request(2, &[0, 0, 0, 0]);
        assert_eq!(rc(&s.command(&startup_clear())), 0);
        s
    }

    fn control_request(&mut self, code: u32, payload: &[u8]) {
        let mut m = code.to_be_bytes().to_vec();
        m.extend_from_slice(payload);
        self.control.write_all(&m).unwrap();
        let mut result = [0u8; 4];
        self.control.read_exact(&mut result).unwrap();
        assert_eq!(result, [0; 4], "control command {code} failed");
    }

    /// One command on the data channel; its whole response.
    fn command(&mut self, c: &[u8]) -> Vec<u8> {
        self.data.write_all(c).unwrap();
        let mut header = [0u8; 10];
        self.data
            .read_exact(&mut header)
            .expect("a response on the data channel");
        let size = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
        let mut response = header.to_vec();
        response.resize(size, 0);
        self.data.read_exact(&mut response[10..]).unwrap();
        response
    }
}

/// tpm2-tools' side of mssim: TPM_SEND_COMMAND on one long-lived TCP connection.
struct Mssim(TcpStream);

impl Mssim {
    fn connect(port: u16) -> Mssim {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("the mssim port");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Mssim(s)
    }

    fn command(&mut self, c: &[u8]) -> Vec<u8> {
        let mut frame = 8u32.to_be_bytes().to_vec();
        frame.push(0);
        frame.extend_from_slice(&(c.len() as u32).to_be_bytes());
        frame.extend_from_slice(c);
        self.0.write_all(&frame).unwrap();
        let mut size = [0u8; 4];
        self.0.read_exact(&mut size).expect("a response on mssim");
        let mut response = vec![0u8; u32::from_be_bytes(size) as usize];
        self.0.read_exact(&mut response).unwrap();
        let mut trailer = [0u8; 4];
        self.0.read_exact(&mut trailer).unwrap();
        response
    }
}

/// Extends `pcr` through `send` until `stop`, checking each answer; the PCR's value is then
/// the hash chain of what was sent: (extends, expected value).
fn extend_until(
    pcr: u32,
    stop: &AtomicBool,
    mut send: impl FnMut(&[u8]) -> Vec<u8>,
) -> (u64, [u8; 32]) {
    let mut expected = pcr_value(&send(&pcr_read(pcr)));
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let digest = digest_of(n + u64::from(pcr) * 1_000_000_000);
        let r = send(&pcr_extend(pcr, &digest));
        assert_eq!(rc(&r), 0, "extend {n} of PCR {pcr}: {r:02x?}");
        expected = extended(expected, &digest);
        n += 1;
        if n.is_multiple_of(50) {
            let r = send(&get_random(16));
            assert_eq!((rc(&r), r.len()), (0, 10 + 2 + 16), "GetRandom");
        }
    }
    (n, expected)
}

/// QEMU's TPM (swtpm protocol, a data channel handed over) and a tpm2-tools-like mssim
/// client each extend a PCR as fast as they can while the gateway is killed again and again:
/// each connection answers on, and each PCR is exactly the chain of its extends.
///
/// `PV_GATEWAY_SOAK_SECS=N` makes it issue 18's soak instead: a kill every 2-5 s (at
/// random) for N seconds, under a restart policy that allows that many restarts.
#[test]
fn a_killed_gateway_keeps_its_connections_and_runs_each_command_exactly_once() {
    let test = "a_killed_gateway_keeps_its_connections_and_runs_each_command_exactly_once";
    if !sandbox_available(test) {
        return;
    }
    let soak = std::env::var("PV_GATEWAY_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut manifest = common::shipped_text();
    if soak.is_some() {
        manifest = common::edited(&manifest, |doc| {
            common::set(
                doc,
                "service.tpm-gateway.restart",
                r#"{ policy = "always", max = 1000, window = "60s", backoff = "10ms", max-backoff = "100ms" }"#,
            )
        });
    }
    let inst = Instance::start_with(
        "fdstore-gw",
        &manifest,
        7,
        &[
            "--listen",
            "swtpm-control-unix",
            "--listen",
            "mssim-command",
            "--listen",
            "mssim-platform",
        ],
    );
    let mut swtpm = Swtpm::connect(&inst.dir.join("state/tpm/swtpm-sock"));
    let mut mssim = Mssim::connect(common::port(&manifest, "mssim-command"));
    // Both connections (and the data channel) are in the store with the reply pipe.
    inst.wait_until(Duration::from_secs(10), |rows| {
        rows.iter()
            .any(|r| r["name"] == "tpm-gateway" && r["fd_store"]["kept"] == 5)
    });
    let stop = Arc::new(AtomicBool::new(false));
    let swtpm_stop = stop.clone();
    let swtpm_thread = std::thread::spawn(move || {
        let (n, expected) = extend_until(16, &swtpm_stop, |c| swtpm.command(c));
        (n, expected, pcr_value(&swtpm.command(&pcr_read(16))))
    });
    let mssim_stop = stop.clone();
    let mssim_thread = std::thread::spawn(move || {
        let (n, expected) = extend_until(23, &mssim_stop, |c| mssim.command(c));
        (n, expected, pcr_value(&mssim.command(&pcr_read(23))))
    });
    let started = Instant::now();
    let mut seed = u64::from(std::process::id()) | 1;
    let mut pause = || match soak {
        // 2 to 5 s, at random.
        Some(_) => {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            Duration::from_millis(2000 + (seed >> 33) % 3001)
        }
        None => KILL_EVERY,
    };
    let mut pids = vec![inst.pid("tpm-gateway")];
    let mut kills = 0;
    while match soak {
        Some(total) => started.elapsed() < total,
        None => kills < KILLS,
    } {
        std::thread::sleep(pause());
        let out = inst.pv(&["kill", "tpm-gateway"]);
        assert!(out.status.success(), "kill {kills}: {}", text(&out));
        kills += 1;
        inst.wait_until(Duration::from_secs(20), |rows| {
            rows.iter().any(|r| {
                r["name"] == "tpm-gateway"
                    && r["state"] == "running"
                    && r["restarts"] == kills as u64
            })
        });
        pids.push(inst.pid("tpm-gateway"));
    }
    std::thread::sleep(KILL_EVERY);
    stop.store(true, Ordering::Relaxed);
    let (swtpm_n, swtpm_expected, swtpm_pcr) = swtpm_thread.join().expect("swtpm client");
    let (mssim_n, mssim_expected, mssim_pcr) = mssim_thread.join().expect("mssim client");
    let resumed = inst.log().matches("resuming the request in flight").count()
        + inst.log().matches("sending the rest of a reply").count();
    eprintln!(
        "{kills} kills in {:.0?}: {swtpm_n} extends on the swtpm data channel, {mssim_n} on mssim; {resumed} requests in flight finished by a successor",
        started.elapsed()
    );
    assert!(swtpm_n > 0 && mssim_n > 0);
    assert_eq!(
        swtpm_pcr, swtpm_expected,
        "PCR 16: an extend lost or doubled"
    );
    assert_eq!(
        mssim_pcr, mssim_expected,
        "PCR 23: an extend lost or doubled"
    );
    let mut distinct = pids.clone();
    distinct.dedup();
    assert_eq!(distinct.len(), kills + 1, "every kill killed: {pids:?}");
    // The TPM never restarted: the gateway's successors alone carried the connections.
    assert_eq!(inst.row("vtpm")["restarts"], 0, "{}", inst.log());
    assert!(
        inst.log().contains("connection taken back"),
        "{}",
        inst.log()
    );
    // The live audit explains every connection the gateway holds (its store keeps them).
    let out = inst.pv(&["audit", "--live"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("fd-store kept"),
        "the audit checks the store:\n{}",
        text(&out)
    );
}

/// A compromised holder of a store (`pv-hostile fd-store-abuse`): its one honest packet is
/// kept; its listener, a memfd, /dev/null, the store itself, wrong descriptor counts,
/// garbage, oversized packets, unknown forgets and keeps past its bound are refused, logged
/// (a bounded number of lines) and their descriptors closed; the supervisor and every other
/// service serve on; its next start gets back what was kept, no more than its bound.
#[test]
fn a_hostile_store_holder_gets_nothing_past_its_bound_and_the_supervisor_serves_on() {
    let test = "a_hostile_store_holder_gets_nothing_past_its_bound_and_the_supervisor_serves_on";
    if !sandbox_available(test) {
        return;
    }
    let mut m = service(
        "vmgs",
        "pv-vmgs",
        &format!("{}\n{}", common::VMGS_BODY, common::RESTART_ALWAYS),
    );
    m += &service(
        "hostile",
        "pv-hostile",
        &format!(
            "calls = [{{ endpoint = \"vmgs\", file-ids = [\"TPM_NVRAM\"] }}]\n\
             args = [\"fd-store-abuse\", \"probe\"]\n\
             fd-store = {{ max = 4 }}\n\
             listen = [{{ name = \"probe\", path = \"hostile/probe.sock\" }}]\n\
             syscalls = [\"accept4\"]\n{}",
            common::RESTART_ALWAYS
        ),
    );
    let inst = Instance::start_with("fdstore-hostile", &m, 2, &["--listen", "probe"]);
    let audit = common::pv(&["audit", inst.manifest.to_str().unwrap()]);
    let audit = text(&audit);
    assert!(
        audit.contains("fd-store: slot") && audit.contains("keeps up to 4 descriptors"),
        "{audit}"
    );
    assert!(
        audit.contains("sendmsg (descriptor"),
        "the store's syscall is printed:\n{audit}"
    );
    let _client = UnixStream::connect(inst.dir.join("state/hostile/probe.sock")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !inst.log().contains("fd-store-abuse: sent 1014 packets") {
        assert!(Instant::now() < deadline, "{}", inst.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every packet taken (the last ones may still be on their way).
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter().any(|r| {
            r["name"] == "hostile" && r["fd_store"]["kept"] == 4 && r["fd_store"]["refused"] == 1010
        })
    });
    let row = inst.row("hostile");
    assert_eq!(row["fd_store"]["max"], 4, "{row}");
    assert_eq!(inst.row("vmgs")["state"], "running");
    assert_eq!(row["state"], "running", "{row}");
    let log = inst.log();
    for why in [
        "a listening socket",
        "a regular file",
        "a character device",
        "the store's own socket",
        "a keep with 0 descriptors",
        "a keep with 3 descriptors",
        "more descriptors than fit",
        "a forget that carries descriptors",
        "which nothing is kept under",
        "not a store message",
        &format!("longer than {} bytes", ipc_defs::fd_store::MAX_MESSAGE),
        "past its bound (4 kept already)",
    ] {
        assert!(log.contains(why), "no refusal of {why:?}:\n{log}");
    }
    // Logged one by one only at first: 1000 refusals are not 1000 lines.
    let lines = log
        .lines()
        .filter(|l| l.contains("fd store: refused"))
        .count();
    assert!(lines <= 21, "{lines} refusal lines");
    // The supervisor answers at once, and the live audit finds the kept connection
    // explained and the bound held.
    let out = inst.pv(&["audit", "--live"]);
    assert!(out.status.success(), "{}", text(&out));

    // Killed: its successor gets back exactly what was kept.
    let out = inst.pv(&["kill", "hostile"]);
    assert!(out.status.success(), "{}", text(&out));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !inst.log().contains("fd-store-abuse: got back") {
        assert!(Instant::now() < deadline, "{}", inst.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = inst.log();
    let line = log
        .lines()
        .find(|l| l.contains("fd-store-abuse: got back"))
        .unwrap();
    assert!(
        line.contains("got back 4: 1 connection socket=true, 100 connection socket=true"),
        "{line}"
    );
    // Stopped cleanly: what it kept is closed (its peer sees the end).
    let mut client = _client;
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    drop(inst);
    let mut buf = [0u8; 1];
    assert_eq!(
        client.read(&mut buf).unwrap_or(0),
        0,
        "the kept connection outlived the paravisor"
    );
}

/// Without `fd-store` a service has no store: no slot, nothing in `ps`, and a send where a
/// store would be is a policy violation.
#[test]
fn a_service_without_the_grant_has_no_store_and_cannot_send() {
    let test = "a_service_without_the_grant_has_no_store_and_cannot_send";
    if !sandbox_available(test) {
        return;
    }
    let mut m = service(
        "vmgs",
        "pv-vmgs",
        &format!("{}\n{}", common::VMGS_BODY, common::RESTART_ALWAYS),
    );
    m += &service(
        "hostile",
        "pv-hostile",
        &format!(
            "calls = [{{ endpoint = \"vmgs\", file-ids = [\"TPM_NVRAM\"] }}]\nargs = [\"fd-store-unsent\"]\n{}",
            common::RESTART_NEVER
        ),
    );
    let inst = Instance::start("fdstore-none", &m, 1);
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter()
            .any(|r| r["name"] == "hostile" && r["state"] == "failed")
    });
    let row = inst.row("hostile");
    assert!(row["fd_store"].is_null(), "{row}");
    let exit = row["last_exit"].to_string();
    assert!(
        exit.contains("policy violation") && exit.contains("sendmsg"),
        "{exit}\n{}",
        inst.log()
    );
    let audit = text(&common::pv(&["audit", inst.manifest.to_str().unwrap()]));
    assert!(!audit.contains("fd-store:"), "{audit}");
}

/// A request half sent when the gateway dies is answered whole by its successor (the first
/// half was only looked at, never taken), and what follows it on the same connection too:
/// on TCP a 4-byte mssim request after a longer one (the successor must not inherit the
/// "wait for more" mark its predecessor set on the socket), on the swtpm data channel the
/// next command.
#[test]
fn a_request_half_sent_when_the_gateway_dies_is_answered_whole_after_it_restarts() {
    let test = "a_request_half_sent_when_the_gateway_dies_is_answered_whole_after_it_restarts";
    if !sandbox_available(test) {
        return;
    }
    let manifest = common::shipped_text();
    let inst = Instance::start_with(
        "fdstore-half",
        &manifest,
        7,
        &[
            "--listen",
            "swtpm-control-unix",
            "--listen",
            "mssim-command",
        ],
    );
    let mut swtpm = Swtpm::connect(&inst.dir.join("state/tpm/swtpm-sock"));
    let mut mssim = Mssim::connect(common::port(&manifest, "mssim-command"));
    let before16 = pcr_value(&swtpm.command(&pcr_read(16)));
    let before23 = pcr_value(&mssim.command(&pcr_read(23)));
    let digest = digest_of(7);
    // Half of an extend on each connection.
    let extend16 = pcr_extend(16, &digest);
    let extend23 = pcr_extend(23, &digest);
    let mut frame23 = 8u32.to_be_bytes().to_vec();
    frame23.push(0);
    frame23.extend_from_slice(&(extend23.len() as u32).to_be_bytes());
    frame23.extend_from_slice(&extend23);
    let (head16, tail16) = extend16.split_at(20);
    let (head23, tail23) = frame23.split_at(30);
    swtpm.data.write_all(head16).unwrap();
    mssim.0.write_all(head23).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = inst.pv(&["kill", "tpm-gateway"]);
    assert!(out.status.success(), "{}", text(&out));
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter()
            .any(|r| r["name"] == "tpm-gateway" && r["state"] == "running" && r["restarts"] == 1)
    });
    // The rest; each answered once, whole.
    swtpm.data.write_all(tail16).unwrap();
    mssim.0.write_all(tail23).unwrap();
    let mut header = [0u8; 10];
    swtpm.data.read_exact(&mut header).unwrap();
    let mut rest = vec![0u8; u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize - 10];
    swtpm.data.read_exact(&mut rest).unwrap();
    assert_eq!(rc(&header), 0);
    let mut size = [0u8; 4];
    mssim.0.read_exact(&mut size).unwrap();
    let mut response = vec![0u8; u32::from_be_bytes(size) as usize + 4];
    mssim.0.read_exact(&mut response).unwrap();
    assert_eq!(rc(&response), 0);
    // What follows: a 4-byte request (mssim NV_ON, answered with 4 zero bytes), commands.
    mssim.0.write_all(&11u32.to_be_bytes()).unwrap();
    let mut answer = [0xffu8; 4];
    mssim
        .0
        .read_exact(&mut answer)
        .expect("the short request after the half-sent one is answered");
    assert_eq!(answer, [0; 4]);
    assert_eq!(
        pcr_value(&swtpm.command(&pcr_read(16))),
        extended(before16, &digest)
    );
    assert_eq!(
        pcr_value(&mssim.command(&pcr_read(23))),
        extended(before23, &digest)
    );
}
