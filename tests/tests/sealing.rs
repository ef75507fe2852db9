//! The sealed VMGS datastore key and reports through the running paravisor: `run` makes a
//! key that exists only sealed in the guest-state file; a changed service binary cannot
//! unseal it under `sealing = "measurement"` (and the refusal says what changed), but can
//! under `platform`; `paravisor attest report` gives evidence that `attest verify` accepts.

mod common;

use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use common::*;

/// A `paravisor run` of a test, killed if the test fails before stopping it (its services
/// die with it).
struct Running(Child);

impl std::ops::Deref for Running {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A copy of the built binaries (so that one can be changed) and a manifest for them.
struct Release {
    dir: PathBuf,
    bin: PathBuf,
    manifest: PathBuf,
}

fn release(tag: &str, sealing: &str) -> Release {
    let dir = scratch_dir(tag);
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for entry in std::fs::read_dir(bin_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if (name == "paravisor" || name.starts_with("pv-")) && !name.ends_with(".d") {
            std::fs::copy(&path, bin.join(&name)).unwrap();
        }
    }
    let text = edited(&shipped_text(), |m| {
        set(m, "attest.sealing", &format!("\"{sealing}\""))
    });
    let manifest = dir.join("manifest.toml");
    std::fs::write(&manifest, text).unwrap();
    Release { dir, bin, manifest }
}

impl Release {
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn pv(&self, args: &[&str]) -> std::process::Output {
        output_of(Command::new(self.bin.join("paravisor")).args(args))
    }

    /// `run --no-guest` in the background, logging to `log`.
    fn start(&self, log: &str) -> Running {
        self.start_in(log, &self.state(), &[])
    }

    /// `run --no-guest` with state directory `state` and more arguments.
    fn start_in(&self, log: &str, state: &Path, args: &[&str]) -> Running {
        let child = spawn_of(
            Command::new(self.bin.join("paravisor"))
                .arg("run")
                .arg("--no-guest")
                .arg(&self.manifest)
                .arg("--state-dir")
                .arg(state)
                .args(args)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.dir.join(log)).unwrap()),
        );
        Running(child)
    }

    fn log(&self, log: &str) -> String {
        std::fs::read_to_string(self.dir.join(log)).unwrap_or_default()
    }

    /// Starts, waits for every service, stops; the log.
    fn run_once(&self, log: &str) -> String {
        let mut child = self.start(log);
        self.wait_up(&mut child, log, &self.state());
        self.stop(child, log, &self.state())
    }

    /// Waits until every service of the run with state `state` is running.
    fn wait_up(&self, child: &mut Running, log: &str, state: &Path) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = self.pv(&["ps", "--json", "--state-dir", state.to_str().unwrap()]);
            if out.status.success() {
                let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
                if rows.iter().all(|r| r["state"] == "running") {
                    break;
                }
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("run ended early ({status}):\n{}", self.log(log));
            }
            assert!(Instant::now() < deadline, "not up:\n{}", self.log(log));
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the run with state `state`; its log.
    fn stop(&self, mut child: Running, log: &str, state: &Path) -> String {
        let stop = self.pv(&["stop", "--state-dir", state.to_str().unwrap()]);
        assert!(stop.status.success(), "{}", text(&stop));
        assert!(child.wait().unwrap().success(), "{}", self.log(log));
        self.log(log)
    }

    /// A run that must refuse to start: its exit status and output.
    fn refused(&self, log: &str) -> String {
        let mut child = self.start(log);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(!status.success(), "started:\n{}", self.log(log));
                return self.log(log);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("neither refused nor stopped:\n{}", self.log(log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `paravisor ARGS` that must fail (bounded by a hang timeout); its output.
    fn refused_with(&self, args: &[&str]) -> String {
        let mut child = spawn_of(
            Command::new(self.bin.join("paravisor"))
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("paravisor {args:?} neither failed nor stopped");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "paravisor {args:?} succeeded: {}",
            text(&out)
        );
        text(&out)
    }

    /// Changes the release's manifest as TOML (see `common::edited`).
    fn edit_manifest(&self, change: impl FnOnce(&mut toml_edit::DocumentMut)) {
        let text = std::fs::read_to_string(&self.manifest).unwrap();
        std::fs::write(&self.manifest, edited(&text, change)).unwrap();
    }

    /// Replaces every `from` by `to` in the release's manifest's text.
    fn edit_manifest_text(&self, from: &str, to: &str) {
        let text = std::fs::read_to_string(&self.manifest).unwrap();
        assert!(text.contains(from), "{from} not in the manifest");
        std::fs::write(&self.manifest, text.replace(from, to)).unwrap();
    }

    fn change_binary(&self, binary: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(self.bin.join(binary))
            .unwrap();
        f.write_all(b"\0changed").unwrap();
    }

    fn vmgs_size(&self, id: &str) -> String {
        let file = self.state().join("guest.vmgs");
        let out = self.pv(&["vmgs", "query-size", "-f", file.to_str().unwrap(), "-i", id]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

fn sandbox_ok(test: &str) -> bool {
    sandbox_available(test)
}

#[test]
fn the_datastore_key_exists_only_sealed_and_a_changed_binary_cannot_unseal_it() {
    if !sandbox_ok("sealing") {
        return;
    }
    let r = release("seal-m", "measurement");
    let log = r.run_once("first.log");
    assert!(
        log.contains("sealed (policy measurement) in its HW_KEY_PROTECTOR"),
        "{log}"
    );
    let vmgs = r.state().join("guest.vmgs");
    assert!(vmgs.exists());
    let keyfiles: Vec<_> = std::fs::read_dir(r.state())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("key"))
        .map(|e| e.file_name())
        .collect();
    assert!(
        keyfiles.is_empty(),
        "no key file in the state: {keyfiles:?}"
    );
    assert_eq!(r.vmgs_size("HW_KEY_PROTECTOR"), "118");
    // A second start unseals it.
    let log = r.run_once("second.log");
    assert!(
        log.contains("unsealed (sealed under policy measurement)"),
        "{log}"
    );

    let before = std::fs::read(&vmgs).unwrap();
    r.change_binary("pv-storage");
    let out = r.refused("third.log");
    for needle in [
        "refusing to start",
        "sealed under policy \"measurement\"",
        "storage (pv-storage) changed",
        "key-release",
        "move",
    ] {
        assert!(out.contains(needle), "refusal lacks \"{needle}\":\n{out}");
    }
    assert_eq!(
        std::fs::read(&vmgs).unwrap(),
        before,
        "the refused start wrote nothing"
    );
    let _ = std::fs::remove_dir_all(&r.dir);
}

/// The red team's attack: a `paravisor` with one added line printed the unsealed datastore
/// key, because the microkernel's own image was not measured. It is now the first launch-log
/// entry: a changed microkernel measures differently and the seal does not open.
#[test]
fn a_changed_microkernel_cannot_unseal_the_datastore_key() {
    if !sandbox_ok("sealing") {
        return;
    }
    let r = release("seal-mk", "measurement");
    r.run_once("first.log");
    let vmgs = r.state().join("guest.vmgs");
    let before = std::fs::read(&vmgs).unwrap();
    r.change_binary("paravisor");
    let out = r.refused("second.log");
    for needle in ["refusing to start", "microkernel paravisor changed"] {
        assert!(out.contains(needle), "refusal lacks \"{needle}\":\n{out}");
    }
    assert!(!out.contains("unsealed"), "{out}");
    assert_eq!(std::fs::read(&vmgs).unwrap(), before);
    let _ = std::fs::remove_dir_all(&r.dir);
}

#[test]
fn under_platform_sealing_a_rebuilt_paravisor_still_unseals() {
    if !sandbox_ok("sealing") {
        return;
    }
    let r = release("seal-p", "platform");
    let log = r.run_once("first.log");
    assert!(log.contains("sealed (policy platform)"), "{log}");
    r.change_binary("pv-net");
    let log = r.run_once("second.log");
    assert!(
        log.contains("unsealed (sealed under policy platform)"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&r.dir);
}

#[test]
fn moving_to_a_stronger_policy_rotates_the_key() {
    if !sandbox_ok("sealing") {
        return;
    }
    let r = release("seal-up", "platform");
    r.run_once("first.log");
    r.edit_manifest(|m| set(m, "attest.sealing", r#""measurement""#));
    let log = r.run_once("second.log");
    assert!(
        log.contains("rotating to a new key sealed under it"),
        "{log}"
    );
    let log = r.run_once("third.log");
    assert!(
        log.contains("unsealed (sealed under policy measurement)"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&r.dir);
}

#[test]
fn another_platform_cannot_unseal() {
    if !sandbox_ok("sealing") {
        return;
    }
    let r = release("seal-x", "platform");
    r.run_once("first.log");
    // The same release and state on another chip.
    let other = r.dir.join("other-platform");
    r.edit_manifest(|m| {
        set(
            m,
            "attest.platform-dir",
            &format!("\"{}\"", other.display()),
        )
    });
    let out = r.refused("second.log");
    assert!(
        out.contains("no platform in"),
        "provisioned on first use, saying so: {out}"
    );
    assert!(out.contains("does not unseal on this platform"), "{out}");
    let _ = std::fs::remove_dir_all(&r.dir);
}

fn verify(
    r: &Release,
    report: &Path,
    certs: &Path,
    fingerprint: &str,
    extra: &[&str],
) -> (bool, String) {
    let args = verify_args(report, certs, fingerprint, extra);
    let out = r.pv(&args);
    (out.status.success(), text(&out))
}

#[test]
fn a_report_from_the_running_paravisor_verifies_against_its_launch() {
    if !sandbox_ok("attest report") {
        return;
    }
    let r = release("report", "measurement");
    let mut child = r.start("run.log");
    let state = r.state();
    let state_s = state.to_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let report = r.dir.join("report.bin");
    let certs = r.dir.join("certs");
    let nonce = "5eed0000000000000000000000000000000000000000000000000000000000aa";
    loop {
        let out = r.pv(&[
            "attest",
            "report",
            "--nonce",
            nonce,
            "-o",
            report.to_str().unwrap(),
            "--certs",
            certs.to_str().unwrap(),
            "--state-dir",
            state_s,
        ]);
        if out.status.success() {
            assert!(text(&out).contains("zero-padded"), "{}", text(&out));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}\n{}",
            text(&out),
            r.log("run.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::metadata(&report).unwrap().len(), 0x4A0);
    // REPORT_ID (0x140..0x160) is the launch's, the same in every report, as on hardware.
    let second = r.dir.join("second.bin");
    let out = r.pv(&[
        "attest",
        "report",
        "--nonce",
        "01",
        "-o",
        second.to_str().unwrap(),
        "--state-dir",
        state_s,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let (a, b) = (
        std::fs::read(&report).unwrap(),
        std::fs::read(&second).unwrap(),
    );
    assert_eq!(a[0x140..0x160], b[0x140..0x160]);
    assert_ne!(a[0x140..0x160], [0; 32]);
    let fp = r.pv(&["attest", "fingerprint", "--certs", certs.to_str().unwrap()]);
    let fp = String::from_utf8_lossy(&fp.stdout).trim().to_string();
    let log = state.join("launch-log.json");
    let (ok, out) = verify(
        &r,
        &report,
        &certs,
        &fp,
        &["--launch-log", log.to_str().unwrap(), "--nonce", nonce],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("pv-attest"),
        "the launch log's entries are the claims: {out}"
    );
    // The reference value a verifier computes from the release alone.
    let (ok, out) = verify(
        &r,
        &report,
        &certs,
        &fp,
        &[
            "--manifest",
            r.manifest.to_str().unwrap(),
            "--no-guest",
            "--nonce",
            nonce,
        ],
    );
    assert!(ok, "{out}");
    // Another nonce (a replayed report) and another release are refused, naming why.
    let (ok, out) = verify(
        &r,
        &report,
        &certs,
        &fp,
        &["--launch-log", log.to_str().unwrap(), "--nonce", "00"],
    );
    assert!(!ok && out.contains("report_data mismatch"), "{out}");
    r.change_binary("pv-net");
    let (ok, out) = verify(
        &r,
        &report,
        &certs,
        &fp,
        &[
            "--manifest",
            r.manifest.to_str().unwrap(),
            "--no-guest",
            "--nonce",
            nonce,
        ],
    );
    assert!(!ok && out.contains("measurement"), "{out}");
    // The chain from `attest certs` (no platform dir given: the one the run uses).
    let certs2 = r.dir.join("certs2");
    let out = r.pv(&[
        "attest",
        "certs",
        "--out",
        certs2.to_str().unwrap(),
        "--manifest",
        r.manifest.to_str().unwrap(),
        "--state-dir",
        state_s,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(certs.join("vcek.pem")).unwrap(),
        std::fs::read(certs2.join("vcek.pem")).unwrap()
    );
    // One paravisor per state directory: a second one (here `vmgs reseal`) is refused before
    // it writes anything.
    let out = r.pv(&[
        "vmgs",
        "reseal",
        r.manifest.to_str().unwrap(),
        "--no-guest",
        "--state-dir",
        state_s,
    ]);
    assert!(
        !out.status.success() && text(&out).contains("already running"),
        "{}",
        text(&out)
    );
    // kill -9 of attest: the restarted service answers the next report (the platform
    // channel and the microkernel's channel move to a new epoch); kill -9 of vmgs: it comes
    // back with the unsealed key the microkernel holds.
    for service in ["attest", "vmgs"] {
        let out = r.pv(&["kill", service, "--state-dir", state_s]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let again = r.dir.join("again.bin");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = r.pv(&[
            "attest",
            "report",
            "--nonce",
            "0a",
            "-o",
            again.to_str().unwrap(),
            "--state-dir",
            state_s,
        ]);
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}\n{}",
            text(&out),
            r.log("run.log")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out) = verify(
        &r,
        &again,
        &certs,
        &fp,
        &["--launch-log", log.to_str().unwrap(), "--nonce", "0a"],
    );
    assert!(ok, "{out}");
    loop {
        let ps = r.pv(&["ps", "--json", "--state-dir", state_s]);
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&ps.stdout).unwrap_or_default();
        if rows
            .iter()
            .any(|row| row["name"] == "vmgs" && row["state"] == "running" && row["restarts"] == 1)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "vmgs did not come back:\n{}",
            r.log("run.log")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let stop = r.pv(&["stop", "--state-dir", state_s]);
    assert!(stop.status.success());
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&r.dir);
}

/// A key broker process for a release: its own tenant key, policy and port.
struct Broker {
    child: Child,
    key_id: String,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn measurement(r: &Release) -> String {
    let out = r.pv(&[
        "measure",
        r.manifest.to_str().unwrap(),
        "--no-guest",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["measurement"].as_str().unwrap().to_string()
}

/// Starts a broker in `dir` (a tenant key made on first use) releasing to `allowed`.
fn broker(r: &Release, dir: &str, allowed: &[String], port: u16) -> Broker {
    let dir = r.dir.join(dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("tenant.key");
    if !key.exists() {
        let out = r.pv(&["kbs", "init-key", key.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
    }
    let out = r.pv(&["kbs", "init-key", key.to_str().unwrap()]);
    assert!(!out.status.success(), "init-key never overwrites");
    let certs = dir.join("certs");
    let out = r.pv(&[
        "attest",
        "certs",
        "--platform-dir",
        test_platform_dir().to_str().unwrap(),
        "--out",
        certs.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let fp = r.pv(&["attest", "fingerprint", "--certs", certs.to_str().unwrap()]);
    let fp = String::from_utf8_lossy(&fp.stdout).trim().to_string();
    let list: Vec<String> = allowed.iter().map(|m| format!("\"{m}\"")).collect();
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "key-file = \"tenant.key\"\ncerts = \"certs\"\nark-fingerprint = \"{fp}\"\n\
             allowed-measurements = [{}]\n\n[minimum-tcb]\nbootloader = 3\ntee = 0\nsnp = 8\nmicrocode = 115\n",
            list.join(", ")
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("broker.log")).unwrap();
    let child = Command::new(r.bin.join("paravisor"))
        .args([
            "kbs",
            "serve",
            "--policy",
            policy.to_str().unwrap(),
            "--listen",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let key_id = loop {
        let text = std::fs::read_to_string(dir.join("broker.log")).unwrap_or_default();
        if let Some(at) = text.find("key id ") {
            break text[at + 7..at + 7 + 64].to_string();
        }
        assert!(Instant::now() < deadline, "broker did not start: {text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    Broker { child, key_id }
}

fn use_broker(r: &Release, port: u16, key_id: &str) {
    let text = std::fs::read_to_string(&r.manifest).unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with("key-release"))
        .map(str::to_string)
        .collect();
    let at = lines.iter().position(|l| l == "[attest]").unwrap() + 1;
    lines.insert(at, format!("key-release-id = \"{key_id}\""));
    lines.insert(at, format!("key-release = \"127.0.0.1:{port}\""));
    std::fs::write(&r.manifest, lines.join("\n") + "\n").unwrap();
}

#[test]
fn the_broker_moves_a_sealed_key_to_a_new_measurement_and_only_the_pinned_tenant_key_counts() {
    if !sandbox_ok("key release") {
        return;
    }
    let r = release("kbs-run", "measurement");
    // The broker's key id goes into the manifest, which changes the measurement: first the
    // broker with its key (releasing to nothing yet), then the manifest, then the policy.
    let port = free_port();
    let b = broker(&r, "tenant", &["00".repeat(48)], port);
    let pinned = b.key_id.clone();
    use_broker(&r, port, &pinned);
    let m1 = measurement(&r);
    drop(b);
    let b = broker(&r, "tenant", std::slice::from_ref(&m1), port);
    let log = r.run_once("first.log");
    assert!(
        log.contains("wrapped under the key broker's tenant key in its KEY_PROTECTOR"),
        "{log}"
    );
    assert_eq!(r.vmgs_size("KEY_PROTECTOR"), "100");

    // A new build: the seal does not open, and the broker's policy does not know it yet.
    r.change_binary("pv-storage");
    let m2 = measurement(&r);
    assert_ne!(m1, m2);
    let out = r.refused("second.log");
    assert!(out.contains("Key release failed too"), "{out}");
    assert!(
        out.contains(&m2) && out.contains("allowed"),
        "the broker names the measurement: {out}"
    );
    drop(b);

    // The tenant accepts the new build: `paravisor vmgs reseal` (the new release's) has the
    // broker release the key and seals it to the new measurement.
    let b = broker(&r, "tenant", &[m1.clone(), m2.clone()], port);
    let out = r.pv(&[
        "vmgs",
        "reseal",
        r.manifest.to_str().unwrap(),
        "--no-guest",
        "--state-dir",
        r.state().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = text(&out);
    assert!(
        out.contains("released by the key broker") && out.contains(&m2),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "sealed (policy measurement) to paravisor measurement {m2}"
        )),
        "{out}"
    );
    drop(b);
    // Sealed to the new measurement now: no broker needed.
    let log = r.run_once("fourth.log");
    assert!(
        log.contains("unsealed (sealed under policy measurement)"),
        "{log}"
    );

    // A broker with another tenant key (one the host could run) is not believed, on a first
    // start: no guest-state file is made under its key.
    let fake_port = free_port();
    let fake = broker(&r, "fake", std::slice::from_ref(&m2), fake_port);
    assert_ne!(fake.key_id, pinned);
    use_broker(&r, fake_port, &pinned);
    std::fs::remove_dir_all(r.state()).unwrap();
    let m3 = measurement(&r);
    drop(fake);
    let fake = broker(&r, "fake", &[m3], fake_port);
    let out = r.refused("fifth.log");
    assert!(out.contains("not the manifest's key-release-id"), "{out}");
    assert!(!r.state().join("guest.vmgs").exists());
    drop(fake);
    let _ = std::fs::remove_dir_all(&r.dir);
}

/// Every file under `dir` (recursively) and its contents, but the control socket.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let t = e.file_type().unwrap();
            let rel = e.path().strip_prefix(dir).unwrap().to_path_buf();
            if t.is_dir() {
                out.insert(rel, b"<dir>".to_vec());
                todo.push(e.path());
            } else if t.is_file() {
                out.insert(rel, std::fs::read(e.path()).unwrap());
            } else {
                out.insert(rel, b"<other>".to_vec());
            }
        }
    }
    out
}

/// A changed limit is a new paravisor: the refusal names the field that changed (not just
/// "the manifest"), says the three ways out, and writes nothing but `refused/`.
#[test]
fn a_refused_start_names_the_changed_field_writes_only_refused_and_gives_three_ways_out() {
    if !sandbox_ok("sealing") {
        return;
    }
    let r = release("seal-diff", "measurement");
    r.run_once("first.log");
    let before = snapshot(&r.state());
    // Every 128M limit doubled; intercept's, the first, is the one the refusal names.
    r.edit_manifest(|m| {
        for name in ["intercept", "vmgs", "attest", "vtpm", "storage", "net"] {
            set(m, &format!("service.{name}.limits.memory"), r#""256M""#);
        }
    });
    let out = r.refused("second.log");
    for needle in [
        "refusing to start",
        "the measured configuration changed: services[intercept].limits.memory: 134217728 -> 268435456",
        "Three ways out",
        "key release",
        "paravisor vmgs reseal",
        "--state-dir NEW",
        "refused",
    ] {
        assert!(out.contains(needle), "refusal lacks \"{needle}\":\n{out}");
    }
    assert!(!out.contains("service intercept"), "only the field: {out}");
    let mut after = snapshot(&r.state());
    let refused: Vec<PathBuf> = after
        .keys()
        .filter(|p| p.starts_with("refused"))
        .cloned()
        .collect();
    let record: std::collections::BTreeMap<_, _> = refused
        .iter()
        .map(|p| (p.clone(), after.remove(p).unwrap()))
        .collect();
    assert_eq!(
        after, before,
        "a refused start changed the state outside refused/"
    );
    let reason = String::from_utf8(record[Path::new("refused/reason.txt")].clone()).unwrap();
    assert!(
        reason.contains("services[intercept].limits.memory"),
        "{reason}"
    );
    let log: serde_json::Value =
        serde_json::from_slice(&record[Path::new("refused/launch-log.json")]).unwrap();
    let intercept = &log["config"]["services"][0];
    assert_eq!(intercept["name"], "intercept");
    assert_eq!(intercept["limits"]["memory"], 268435456u64);
    let _ = std::fs::remove_dir_all(&r.dir);
}

/// What the host chooses is not measured: comments, layout, a listener's address in the
/// manifest, `--listen`, `--host` leave the seal opening.
#[test]
fn comments_layout_and_host_settings_leave_the_seal_opening() {
    if !sandbox_ok("sealing") {
        return;
    }
    let r = release("seal-host", "measurement");
    r.run_once("first.log");
    r.edit_manifest(|m| {
        set(m, "paravisor.state-dir", r#""elsewhere""#);
        set(
            m,
            "service.tpm-gateway.listen.swtpm-control-unix.path",
            r#""tpm/other-sock""#,
        );
    });
    // Comments and layout are text, not TOML values: this edit stays a text replacement.
    r.edit_manifest_text(
        "restart = { policy = \"always\", max = 5, window = \"60s\", backoff = \"50ms\" }",
        "# a comment\nrestart   = { backoff = \"50ms\", window = \"60s\", max = 5, policy = \"always\" }",
    );
    let port = free_port();
    let host = r.dir.join("host.toml");
    std::fs::write(
        &host,
        format!(
            "listen = [\"swtpm-data=127.0.0.1:{port}\"]\nplatform-dir = \"{}\"\n",
            test_platform_dir().display()
        ),
    )
    .unwrap();
    let mut child = r.start_in(
        "second.log",
        &r.state(),
        &["--host", host.to_str().unwrap()],
    );
    r.wait_up(&mut child, "second.log", &r.state());
    // The host file's listener is bound.
    let random = swtpm_get_random(port);
    assert_eq!(&random[6..10], &[0, 0, 0, 0], "TPM_RC_SUCCESS: {random:?}");
    let log = r.stop(child, "second.log", &r.state());
    assert!(
        log.contains("unsealed (sealed under policy measurement)"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&r.dir);
}

/// TPM2_GetRandom(8) on a swtpm data port; the response.
fn swtpm_get_random(port: u16) -> Vec<u8> {
    use std::io::Read;
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("swtpm data port");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(&[0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8])
        .unwrap();
    let mut header = [0u8; 10];
    s.read_exact(&mut header).unwrap();
    let size = u32::from_be_bytes(header[2..6].try_into().unwrap()) as usize;
    let mut rest = vec![0u8; size.saturating_sub(10)];
    s.read_exact(&mut rest).unwrap();
    [header.to_vec(), rest].concat()
}

/// Two instances from one manifest, side by side: other state directories and ports (one
/// from a host file, one from flags), one measurement, each serving its own TPM.
#[test]
fn two_instances_run_side_by_side_from_one_manifest() {
    if !sandbox_ok("sealing") {
        return;
    }
    let r = release("two-instances", "measurement");
    let (a, b) = (r.dir.join("a"), r.dir.join("b"));
    let (pa, pb) = (free_port(), free_port());
    let host = r.dir.join("host-a.toml");
    std::fs::write(&host, format!("listen = [\"swtpm-data=127.0.0.1:{pa}\"]\n")).unwrap();
    let mut ca = r.start_in("a.log", &a, &["--host", host.to_str().unwrap()]);
    let listen_b = format!("swtpm-data=127.0.0.1:{pb}");
    let mut cb = r.start_in("b.log", &b, &["--listen", &listen_b]);
    r.wait_up(&mut ca, "a.log", &a);
    r.wait_up(&mut cb, "b.log", &b);
    for port in [pa, pb] {
        let random = swtpm_get_random(port);
        assert_eq!(&random[6..10], &[0, 0, 0, 0], "port {port}: {random:?}");
    }
    let measurement = |dir: &Path| -> String {
        let log: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("launch-log.json")).unwrap()).unwrap();
        log["measurement"].as_str().unwrap().to_string()
    };
    assert_eq!(
        measurement(&a),
        measurement(&b),
        "one release, one measurement"
    );
    let (pid_a, pid_b) = (
        serde_json::from_slice::<Vec<serde_json::Value>>(
            &r.pv(&["ps", "--json", "--state-dir", a.to_str().unwrap()])
                .stdout,
        )
        .unwrap()[0]["pid"]
            .clone(),
        serde_json::from_slice::<Vec<serde_json::Value>>(
            &r.pv(&["ps", "--json", "--state-dir", b.to_str().unwrap()])
                .stdout,
        )
        .unwrap()[0]["pid"]
            .clone(),
    );
    assert_ne!(pid_a, pid_b, "each instance has its own services");
    r.stop(ca, "a.log", &a);
    // b serves on after a stopped.
    let random = swtpm_get_random(pb);
    assert_eq!(&random[6..10], &[0, 0, 0, 0]);
    r.stop(cb, "b.log", &b);
    let _ = std::fs::remove_dir_all(&r.dir);
}

/// `vmgs reseal` is offline: a host file that makes `run` bind a port makes reseal bind
/// nothing (the port is held by the test: a bind would fail).
#[test]
fn vmgs_reseal_opens_no_listener() {
    if !sandbox_ok("sealing") {
        return;
    }
    let r = release("reseal-offline", "measurement");
    r.run_once("first.log");
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let host = r.dir.join("host.toml");
    std::fs::write(
        &host,
        format!("listen = [\"swtpm-data=127.0.0.1:{port}\"]\n"),
    )
    .unwrap();
    let state = r.state();
    let args = [
        r.manifest.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--host",
        host.to_str().unwrap(),
    ];
    let run = r.refused_with(&[&["run", "--no-guest"][..], &args[..]].concat());
    assert!(
        run.contains(&port.to_string()),
        "run binds the host file's port: {run}"
    );
    let out = r.pv(&[&["vmgs", "reseal", "--no-guest"][..], &args[..]].concat());
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("sealed (policy measurement) to paravisor measurement"),
        "{}",
        text(&out)
    );
    drop(held);
    let _ = std::fs::remove_dir_all(&r.dir);
}

/// The README's order: `paravisor run` (the test guest) and then `paravisor run --no-guest`
/// on the same state. The guest is not part of what the seal binds (it is in the report's
/// measurement and measures itself into the vTPM), so the second start unseals.
#[test]
fn run_with_the_guest_then_without_shares_the_sealed_state() {
    if !kvm_available("run_with_the_guest_then_without_shares_the_sealed_state") {
        return;
    }
    let r = release("readme-order", "measurement");
    let mut child = Running(spawn_of(
        Command::new(r.bin.join("paravisor"))
            .arg("run")
            .arg(&r.manifest)
            .arg("--state-dir")
            .arg(r.state())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(r.dir.join("guest.log")).unwrap()),
    ));
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the guest run hangs:\n{}",
            r.log("guest.log")
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let first = r.log("guest.log");
    assert!(
        status.success(),
        "the guest run failed ({status}):\n{first}"
    );
    assert!(
        first.contains("sealed (policy measurement) in its HW_KEY_PROTECTOR"),
        "{first}"
    );
    let second = r.run_once("no-guest.log");
    assert!(
        second.contains("unsealed (sealed under policy measurement)"),
        "{second}"
    );
    let _ = std::fs::remove_dir_all(&r.dir);
}

/// The host's guest-state file is hostile input: the microkernel never parses it. A file
/// whose headers the host overwrote is read by the broker (`pv-vmgs --broker`, in the vmgs
/// service's sandbox), whose typed error the refusal names; the paravisor itself does not
/// crash, and the file is left as the host made it.
#[test]
fn a_guest_state_file_the_host_mangled_is_parsed_by_the_broker_and_refused_by_name() {
    if !sandbox_ok("mangled guest state") {
        return;
    }
    let r = release("mangled", "measurement");
    r.run_once("first.log");
    let vmgs = r.state().join("guest.vmgs");
    let mut bytes = std::fs::read(&vmgs).unwrap();
    // Both VMGS headers (blocks 0 and 1, 4 KiB each) become noise.
    for (i, b) in bytes.iter_mut().take(8192).enumerate() {
        *b = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    std::fs::write(&vmgs, &bytes).unwrap();
    let out = r.refused("second.log");
    assert!(out.contains("broker:"), "the broker read the file: {out}");
    assert!(out.contains("guest-state file"), "{out}");
    assert!(!out.contains("panicked"), "{out}");
    assert_eq!(
        std::fs::read(&vmgs).unwrap(),
        bytes,
        "left as the host made it"
    );
    let _ = std::fs::remove_dir_all(&r.dir);
}
