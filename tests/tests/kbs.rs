//! The key broker (`paravisor kbs serve`) releases the tenant key only to evidence that
//! verifies, and refuses everything else with its reason. The happy path goes through the
//! real client (`paravisor kbs fetch`); the attacks speak the wire protocol directly, with
//! reports from the simulated platform (`paravisor platform report`), whose REPORT_DATA is
//! the 64-byte nonce given when it is exactly 64 bytes.

mod common;

use std::io::Read;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;
use std::time::Instant;

use common::*;
use sha2::Digest;

/// The measurement the test policy allows.
fn allowed() -> String {
    "ab".repeat(48)
}

/// Two valid P-384 transfer keys (SEC1 uncompressed): the generator G and 2G.
const G: &str = "04aa87ca22be8b05378eb1c71ef320ad746e1d3b628ba79b9859f741e082542a385502f25dbf55296c3a545e3872760ab73617de4a96262c6f5d9e98bf9292dc29f8f41dbd289a147ce9da3113b5f0b8c00a60b1ce1d7e819d7a431d7c90ea0e5f";
const G2: &str = "0408d999057ba3d2d969260045c55b97f089025959a6f434d651d207d19fb96e9e4fe0e86ebe0e64f85b96a9c75295df618e80f1fa5b1b3cedb7bfe8dffd6dba74b275d875bc6cc43e904e505f256ab4255ffd43e94d39e22d61501e700a940e80";

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The protocol's binding, computed independently: SHA-512("pv-kbs-v1" ‖ nonce ‖ key).
fn binding(nonce_hex: &str, key_hex: &str) -> String {
    let mut h = sha2::Sha512::new();
    h.update(b"pv-kbs-v1");
    h.update(unhex(nonce_hex));
    h.update(unhex(key_hex));
    hex(&h.finalize())
}

/// Two provisioned platforms, made once for all tests of this binary (provisioning makes
/// two RSA-4096 keys each): `a` is the one the policy trusts, `b` another machine.
struct Platforms {
    a: PathBuf,
    b: PathBuf,
    a_certs: PathBuf,
    a_fingerprint: String,
}

fn platforms() -> &'static Platforms {
    static P: OnceLock<Platforms> = OnceLock::new();
    P.get_or_init(|| {
        // Under cargo's per-target scratch directory: statics are never dropped, so leftovers
        // of earlier runs (whose process is gone) are removed here instead.
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        if let Ok(entries) = std::fs::read_dir(tmp) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if let Some(pid) = name.strip_prefix("kbs-platforms-") {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        let root = tmp.join(format!("kbs-platforms-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let (a, b) = (root.join("a"), root.join("b"));
        let init_b = {
            let b = b.clone();
            std::thread::spawn(move || {
                pv_result(&["platform", "init", "--platform-dir", b.to_str().unwrap()])
            })
        };
        let (ok, out) = pv_result(&["platform", "init", "--platform-dir", a.to_str().unwrap()]);
        assert!(ok, "{out}");
        let (ok, out) = init_b.join().unwrap();
        assert!(ok, "{out}");
        let a_certs = root.join("a-certs");
        let (ok, out) = pv_result(&[
            "attest",
            "certs",
            "--platform-dir",
            a.to_str().unwrap(),
            "--out",
            a_certs.to_str().unwrap(),
        ]);
        assert!(ok, "{out}");
        let (ok, fp) = pv_result(&[
            "attest",
            "fingerprint",
            "--certs",
            a_certs.to_str().unwrap(),
        ]);
        assert!(ok, "{fp}");
        Platforms {
            a,
            b,
            a_certs,
            a_fingerprint: fp.trim().to_string(),
        }
    })
}

/// A running broker with its own key and policy; killed on drop.
struct Broker {
    dir: PathBuf,
    key: PathBuf,
    port: u16,
    child: Child,
}

/// Writes a policy trusting platform `a` and allowing [`allowed`], with a new tenant key.
fn setup(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let p = platforms();
    let dir = scratch_dir(tag);
    let key = dir.join("tenant.key");
    let (ok, out) = pv_result(&["kbs", "init-key", key.to_str().unwrap()]);
    assert!(ok, "{out}");
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "key-file = \"tenant.key\"\ncerts = \"{}\"\nark-fingerprint = \"{}\"\n\
             allowed-measurements = [\"{}\"]\nmax-nonce-age = 30\n\
             [guest-policy]\nallow-debug = false\n\
             [minimum-tcb]\nbootloader = 3\ntee = 0\nsnp = 8\nmicrocode = 115\n",
            p.a_certs.display(),
            p.a_fingerprint,
            allowed()
        ),
    )
    .unwrap();
    (dir, key, policy)
}

impl Broker {
    fn start(tag: &str) -> Broker {
        let (dir, key, policy) = setup(tag);
        let (child, port) = serve_kbs(&dir, &policy);
        Broker {
            dir,
            key,
            port,
            child,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kbs.log")).unwrap_or_default()
    }

    /// One request line, one reply line.
    fn exchange(&self, line: &str) -> serde_json::Value {
        let mut s = TcpStream::connect(self.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        serde_json::from_str(reply.trim()).unwrap_or_else(|e| panic!("{e}: {reply:?}"))
    }

    fn challenge(&self) -> String {
        let r = self.exchange(r#"{"request":"challenge"}"#);
        r["nonce"]
            .as_str()
            .unwrap_or_else(|| panic!("{r}"))
            .to_string()
    }

    fn key_request(&self, nonce: &str, transfer_key: &str, report: &[u8]) -> serde_json::Value {
        self.exchange(
            &serde_json::json!({
                "request": "key",
                "nonce": nonce,
                "transfer_key": transfer_key,
                "report": hex(report),
            })
            .to_string(),
        )
    }

    /// `paravisor kbs fetch` with a report of platform A for `measurement`, into
    /// `name` in the broker's directory: (success, output, the key file).
    fn fetch(&self, measurement: &str, name: &str) -> (bool, String, PathBuf) {
        let out = self.dir.join(name);
        let (ok, text) = pv_result(&[
            "kbs",
            "fetch",
            "--kbs",
            &self.addr(),
            "--platform-dir",
            platforms().a.to_str().unwrap(),
            "--measurement",
            measurement,
            "-o",
            out.to_str().unwrap(),
        ]);
        (ok, text, out)
    }

    /// The reason of a refusal.
    fn refused(&self, reply: &serde_json::Value) -> String {
        reply["error"]
            .as_str()
            .unwrap_or_else(|| panic!("not refused: {reply}"))
            .to_string()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A report from `platform` whose REPORT_DATA is `data` (64 bytes, hex).
fn report(platform: &Path, data: &str, measurement: &str, out: &Path) -> Vec<u8> {
    platform_report(platform, data, measurement, out)
}

#[test]
fn the_key_is_released_to_a_verified_report_and_equals_the_tenant_key() {
    let broker = Broker::start("kbs-ok");
    let (ok, text, out) = broker.fetch(&allowed(), "fetched.key");
    assert!(ok, "{text}\n{}", broker.log());
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(&broker.key).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(broker.log().contains("key RELEASED"), "{}", broker.log());
}

#[test]
fn a_measurement_outside_the_policy_is_refused_by_name() {
    let broker = Broker::start("kbs-meas");
    let other = "cd".repeat(48);
    let (ok, text, out) = broker.fetch(&other, "fetched.key");
    assert!(!ok, "{text}");
    assert!(
        text.contains(&format!(
            "measurement {other} is not in the policy's allowed list"
        )),
        "{text}"
    );
    assert!(!out.exists(), "no key file on refusal");
    assert!(
        broker.log().contains("refused: measurement"),
        "{}",
        broker.log()
    );
}

#[test]
fn a_report_from_another_platform_is_refused() {
    let broker = Broker::start("kbs-foreign");
    let nonce = broker.challenge();
    let r = report(
        &platforms().b,
        &binding(&nonce, G),
        &allowed(),
        &broker.dir.join("r.bin"),
    );
    let why = broker.refused(&broker.key_request(&nonce, G, &r));
    assert!(why.contains("signature does not verify"), "{why}");
}

#[test]
fn a_report_with_a_flipped_bit_is_refused() {
    let broker = Broker::start("kbs-flip");
    for at in [0x08usize, 0x50, 0x90, 0x180, 0x2A0] {
        let nonce = broker.challenge();
        let mut r = report(
            &platforms().a,
            &binding(&nonce, G),
            &allowed(),
            &broker.dir.join("r.bin"),
        );
        r[at] ^= 0x01;
        let why = broker.refused(&broker.key_request(&nonce, G, &r));
        assert!(
            why.contains("signature does not verify"),
            "flip at {at:#x}: {why}"
        );
    }
}

#[test]
fn a_replayed_nonce_and_report_are_refused_as_replay() {
    let broker = Broker::start("kbs-replay");
    let nonce = broker.challenge();
    let r = report(
        &platforms().a,
        &binding(&nonce, G),
        &allowed(),
        &broker.dir.join("r.bin"),
    );
    // The first use is released (to G: nobody here can unwrap it, which does not matter).
    let first = broker.key_request(&nonce, G, &r);
    assert!(first["wrapped_key"].is_string(), "{first}");
    // The captured exchange, sent again.
    let why = broker.refused(&broker.key_request(&nonce, G, &r));
    assert_eq!(why, "nonce already used (replay)");
    // A nonce the broker never issued.
    let why = broker.refused(&broker.key_request(&"00".repeat(32), G, &r));
    assert!(why.contains("nonce unknown or expired"), "{why}");
    assert!(broker.log().contains("replay"), "{}", broker.log());
}

#[test]
fn a_report_bound_to_another_transfer_key_is_refused() {
    let broker = Broker::start("kbs-substitute");
    // The genuine party's report binds G; an attacker sends it with its own key 2G.
    let nonce = broker.challenge();
    let r = report(
        &platforms().a,
        &binding(&nonce, G),
        &allowed(),
        &broker.dir.join("r.bin"),
    );
    let why = broker.refused(&broker.key_request(&nonce, G2, &r));
    assert!(
        why.contains("does not bind this nonce and transfer key"),
        "{why}"
    );
    // A report that binds another exchange's nonce is refused the same way.
    let (n1, n2) = (broker.challenge(), broker.challenge());
    let r = report(
        &platforms().a,
        &binding(&n1, G),
        &allowed(),
        &broker.dir.join("r1.bin"),
    );
    let why = broker.refused(&broker.key_request(&n2, G, &r));
    assert!(why.contains("does not bind"), "{why}");
}

/// The broker listens where it is told, loopback by default; never on every interface at
/// once. Guests reach it over their TAP: `ip netns exec NS paravisor kbs serve --listen
/// 10.0.2.2:8700` listens there, saying that the listener is reachable from that network.
#[test]
fn the_broker_listens_on_loopback_or_one_named_address_never_on_every_interface() {
    let (dir, _key, policy) = setup("kbs-listen");
    for addr in ["0.0.0.0:8700", "[::]:8700"] {
        let (ok, text) = pv_result(&[
            "kbs",
            "serve",
            "--policy",
            policy.to_str().unwrap(),
            "--listen",
            addr,
        ]);
        assert!(!ok, "{addr}: {text}");
        assert!(text.contains("is every interface"), "{text}");
    }
    let test = "the_broker_listens_on_loopback_or_one_named_address_never_on_every_interface";
    if !sandbox_available(test) {
        let _ = std::fs::remove_dir_all(dir);
        return;
    }
    // The host's end of the guests' network, in a namespace of the test's own.
    let ns = netns::Netns::new("kbs");
    ns.ip_ok(&["addr", "add", "10.0.2.2/32", "dev", "lo"]);
    ns.ip_ok(&["link", "set", "lo", "up"]);
    let log_path = dir.join("kbs-net.log");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(paravisor())
        .args(["kbs", "serve", "--policy"])
        .arg(&policy)
        .args(["--listen", "10.0.2.2:8700"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("ip netns exec paravisor kbs serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("key broker listening on 10.0.2.2:8700") {
            break log;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            let _ = child.kill();
            panic!("kbs serve did not listen on 10.0.2.2:8700:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        log.contains("not loopback") && log.contains("anyone on that network can reach"),
        "{log}"
    );
    // A client on that network gets a challenge.
    let reply = ns.bash(
        "exec 3<>/dev/tcp/10.0.2.2/8700; echo '{\"request\":\"challenge\"}' >&3; head -n 1 <&3",
    );
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        String::from_utf8_lossy(&reply.stdout).contains("\"nonce\""),
        "{}",
        text(&reply)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_key_file_others_can_read_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, key, policy) = setup("kbs-mode");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, text) = pv_result(&[
        "kbs",
        "serve",
        "--policy",
        policy.to_str().unwrap(),
        "--listen",
        &format!("127.0.0.1:{}", free_port()),
    ]);
    assert!(!ok && text.contains("mode 644"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn garbage_oversize_and_silent_clients_are_dropped_and_the_broker_keeps_serving() {
    let broker = Broker::start("kbs-garbage");
    // A silent client holds a connection open throughout; it must not block the others.
    let silent = TcpStream::connect(broker.addr()).unwrap();
    // Not JSON.
    let why = broker.refused(&broker.exchange("hello"));
    assert!(why.contains("the request is not valid"), "{why}");
    // An unknown request, and a valid one with a field too many.
    let why = broker.refused(&broker.exchange(r#"{"request":"give-me-the-key"}"#));
    assert!(why.contains("unknown variant"), "{why}");
    let why = broker.refused(&broker.exchange(r#"{"request":"challenge","x":1}"#));
    assert!(why.contains("unknown field"), "{why}");
    // A line longer than the limit: refused, then closed.
    let mut s = TcpStream::connect(broker.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&vec![b'x'; 70 * 1024]);
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.contains("longer than 65536 bytes"), "{reply:?}");
    // Still serving.
    assert_eq!(broker.challenge().len(), 64);
    // The silent client is dropped after the request deadline (5 s).
    let mut silent = silent;
    silent
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    let mut reply = String::new();
    let _ = silent.read_to_string(&mut reply);
    assert!(started.elapsed() < Duration::from_secs(14), "not dropped");
    assert!(reply.contains("no complete line"), "{reply:?}");
    assert_eq!(broker.challenge().len(), 64);
}

/// A local client that floods challenges, or holds more idle connections than the broker
/// serves at once, must not lock a genuine client out (both did, for the nonce lifetime and
/// for as long as the connections were held).
#[test]
fn a_flood_of_challenges_or_idle_connections_does_not_lock_out_a_genuine_client() {
    let broker = Broker::start("kbs-flood");
    let fetch = |name: &str| {
        let (ok, text, _) = broker.fetch(&allowed(), name);
        (ok, text)
    };
    // More challenges than the table holds (4096), each on its own connection.
    let first = broker.challenge();
    for _ in 0..4200 {
        broker.challenge();
    }
    let (ok, text) = fetch("after-flood.key");
    assert!(ok, "{text}\n{}", broker.log());
    // The first challenge made room for later ones: refused as unknown, never accepted.
    let why = broker.refused(&broker.key_request(&first, G, &[0; 0x4A0]));
    assert!(why.contains("unknown or expired"), "{why}");
    // Twice as many idle connections as the broker serves at once (16), held open.
    let idle: Vec<TcpStream> = (0..32)
        .map(|_| TcpStream::connect(broker.addr()).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let (ok, text) = fetch("among-idle.key");
    assert!(ok, "{text}\n{}", broker.log());
    assert!(
        broker.log().contains("closed the connection idle longest"),
        "{}",
        broker.log()
    );
    drop(idle);
    assert_eq!(broker.challenge().len(), 64);
}
