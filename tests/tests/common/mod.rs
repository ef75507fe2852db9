//! Helpers shared by the cross-process tests: find the binaries, run an instance in a
//! private state directory, talk to it through the `paravisor` command line; [`linux`]: a
//! Linux guest under QEMU.
#![allow(dead_code)]

pub mod linux;
pub mod netns;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Output;
use std::process::Stdio;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use toml_edit::DocumentMut;
use toml_edit::Item;
use toml_edit::TableLike;
use toml_edit::Value;

/// The directory holding `paravisor` and the service binaries (`target/<profile>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .expect("deps dir")
        .parent()
        .expect("profile dir");
    dir.to_path_buf()
}

pub fn paravisor() -> PathBuf {
    let p = bin_dir().join("paravisor");
    assert!(
        p.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        p.display()
    );
    p
}

/// The shipped manifest.
pub fn shipped_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifest.toml")
}

/// Ports for the tests' listeners. A port chosen by binding port 0 and releasing it lies in
/// the kernel's ephemeral range, where any outgoing connection (a tpm2-tools client, a
/// health check, another test) may take it as its source port before the paravisor binds
/// it; CI saw exactly that ("Address already in use"). So ports come from below that range,
/// and each is handed out at most once per test binary (tests of one binary run side by
/// side in one process).
fn reserve_ports(count: u16) -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let (lo, hi) = listener_port_range();
    let span = u32::from(hi - lo - count);
    let mut handed = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut seed = port_seed();
    for _ in 0..100_000 {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let p = lo + ((seed >> 8) % span) as u16;
        let ports = p..p + count;
        if ports.clone().any(|q| handed.contains(&q)) {
            continue;
        }
        if ports
            .clone()
            .all(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok())
        {
            handed.extend(ports);
            return p;
        }
    }
    panic!("no {count} adjacent free loopback ports in {lo}..{hi}");
}

/// `[lo, hi)`: below the kernel's ephemeral port range when there is room there, else the
/// range above it.
fn listener_port_range() -> (u16, u16) {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999));
    if ephemeral.0 >= 12_000 {
        (10_000, ephemeral.0)
    } else if ephemeral.1 <= 63_000 {
        (ephemeral.1 + 1, 65_535)
    } else {
        panic!(
            "the ephemeral port range {}-{} leaves no room for test listeners",
            ephemeral.0, ephemeral.1
        )
    }
}

/// A loopback port nothing listens on now, not in the ephemeral range, and not handed to
/// another test of this binary.
pub fn free_port() -> u16 {
    reserve_ports(1)
}

/// `paravisor kbs serve --policy POLICY` on a free loopback port, its stderr in
/// `dir/kbs.log`, once it accepts connections: the child and its port.
pub fn serve_kbs(dir: &Path, policy: &Path) -> (Child, u16) {
    let port = free_port();
    let log = std::fs::File::create(dir.join("kbs.log")).unwrap();
    let mut child = Command::new(paravisor())
        .args(["kbs", "serve", "--policy"])
        .arg(policy)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn kbs serve");
    // Only catches a hang: a loaded machine may take seconds to start it.
    let deadline = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "kbs serve exited ({status}):\n{}",
                std::fs::read_to_string(dir.join("kbs.log")).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "kbs serve did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, port)
}

/// A different starting point for every port search.
fn port_seed() -> u32 {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(40_503))
        ^ nanos
}

/// Two adjacent free loopback ports (P, P+1), as the mssim and swtpm clients expect.
pub fn adjacent_ports() -> (u16, u16) {
    let p = reserve_ports(2);
    (p, p + 1)
}

/// The shipped manifest's text with every listen address moved to a free port, so that
/// tests can run instances side by side (and next to a paravisor a developer runs). Ports
/// that follow each other stay adjacent (the mssim and swtpm clients find the platform and
/// control ports at the data port + 1).
pub fn shipped_text() -> String {
    let text = std::fs::read_to_string(shipped_manifest()).expect("shipped manifest");
    let mut out = String::new();
    let mut rest = text.as_str();
    // (old port, its new port, whether new + 1 is reserved and still unused)
    let mut last: Option<(u16, u16, bool)> = None;
    while let Some(at) = rest.find("\"127.0.0.1:") {
        let (head, tail) = rest.split_at(at);
        out.push_str(head);
        let end = tail[1..].find('"').expect("closing quote") + 2;
        let old: u16 = tail[12..end - 1].parse().expect("a port");
        // Ports are reserved in pairs, so a port that follows its predecessor in the
        // shipped manifest can stay adjacent to it.
        let (new, spare) = match last {
            Some((o, n, true)) if o.checked_add(1) == Some(old) => (n + 1, false),
            _ => (adjacent_ports().0, true),
        };
        out.push_str(&format!("\"127.0.0.1:{new}\""));
        last = Some((old, new, spare));
        rest = &tail[end..];
    }
    out.push_str(rest);
    // One simulated platform for all tests (provisioning one takes seconds of RSA-4096 key
    // generation); `run` provisions it atomically, so concurrent first uses are safe.
    out.replace(
        "# platform-dir = \"platform\"",
        &format!("platform-dir = \"{}\"", test_platform_dir().display()),
    )
}

/// The simulated platform the tests' instances share.
pub fn test_platform_dir() -> PathBuf {
    std::env::temp_dir().join("pv-test-platform")
}

/// A fresh, short directory (control sockets have a 108-byte path limit).
pub fn scratch_dir(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "pvt-{}-{}-{tag}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Whether this machine lets us run the sandbox for real (root, for the namespaces and the
/// mounts). Tests that need it print a loud SKIPPED line and return when it does not.
pub fn sandbox_available(test: &str) -> bool {
    // SAFETY-free check: euid via /proc, to keep this crate free of unsafe.
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    if !root {
        eprintln!("SKIPPED: {test}: needs root for mount/pid namespaces and pivot_root");
    }
    root
}

/// Runs `cmd`, retrying while the kernel says its executable is busy: a test that has just
/// copied an executable can see ETXTBSY when another test thread forked while the copy's
/// descriptor was open (the child holds it until its exec).
pub fn output_of(cmd: &mut Command) -> Output {
    spawn_retrying(cmd, |c| c.output())
}

/// [`output_of`] for a child that keeps running.
pub fn spawn_of(cmd: &mut Command) -> Child {
    spawn_retrying(cmd, |c| c.spawn())
}

fn spawn_retrying<T>(cmd: &mut Command, run: impl Fn(&mut Command) -> std::io::Result<T>) -> T {
    let mut tries = 0;
    loop {
        match run(cmd) {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 500 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other.unwrap_or_else(|e| panic!("{cmd:?}: {e}")),
        }
    }
}

/// `paravisor ARGS...`
pub fn pv(args: &[&str]) -> Output {
    Command::new(paravisor())
        .args(args)
        .output()
        .expect("run paravisor")
}

/// `paravisor ARGS...`: whether it succeeded, and what it printed (stdout, then stderr).
pub fn pv_result(args: &[&str]) -> (bool, String) {
    let out = pv(args);
    (out.status.success(), text(&out))
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A running `paravisor run` in its own state directory; stopped on drop.
pub struct Instance {
    pub dir: PathBuf,
    pub manifest: PathBuf,
    pub child: Option<Child>,
}

impl Instance {
    /// Starts an instance of `manifest_text` and waits until `expect_running` services run.
    pub fn start(tag: &str, manifest_text: &str, expect_running: usize) -> Instance {
        Instance::start_with(tag, manifest_text, expect_running, &[])
    }

    /// [`Instance::start`] with more `paravisor run` arguments (e.g. `--listen all`).
    pub fn start_with(
        tag: &str,
        manifest_text: &str,
        expect_running: usize,
        args: &[&str],
    ) -> Instance {
        let dir = scratch_dir(tag);
        let manifest = dir.join("manifest.toml");
        std::fs::write(&manifest, manifest_text).expect("write manifest");
        let mut inst = Instance {
            dir,
            manifest,
            child: None,
        };
        inst.launch(expect_running, args);
        inst
    }

    /// Starts `paravisor run --no-guest` on the instance's manifest and state directory
    /// (appending to its log) and waits for `expect_running` services.
    fn launch(&mut self, expect_running: usize, args: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("paravisor.log"))
            .expect("log");
        // Its own process group, as in a terminal, so that a test can send "Ctrl-C" to the
        // whole group without hitting the test harness.
        let child = Command::new(paravisor())
            .process_group(0)
            .arg("run")
            .arg("--no-guest")
            .arg(&self.manifest)
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn paravisor run");
        self.child = Some(child);
        self.wait_until(Duration::from_secs(30), |rows| {
            rows.iter().filter(|r| r["state"] == "running").count() >= expect_running
        });
    }

    /// Stops the paravisor cleanly and starts it again on the same state directory.
    pub fn restart(&mut self, expect_running: usize, args: &[&str]) {
        let status = self.stop();
        assert!(
            status.success(),
            "paravisor stopped with {status}:\n{}",
            self.log()
        );
        self.launch(expect_running, args);
    }

    pub fn state_dir(&self) -> String {
        self.dir.join("state").display().to_string()
    }

    /// `paravisor ARGS... --state-dir DIR`
    pub fn pv(&self, args: &[&str]) -> Output {
        let dir = self.state_dir();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--state-dir", dir.as_str()]);
        pv(&all)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("paravisor.log")).unwrap_or_default()
    }

    /// Waits for pv-vtpm to say its attestation binding is in place (the report and the
    /// claims in NV, the AK persistent); panics, with the log, if it has none or says
    /// nothing of it in 60 s.
    pub fn wait_for_vtpm_binding(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let log = self.log();
            if log.contains("attestation binding:") {
                return;
            }
            assert!(
                !log.contains("no attestation binding"),
                "the vTPM has no binding:\n{log}"
            );
            assert!(
                Instant::now() < deadline,
                "the vTPM said nothing of its binding in 60 s:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `paravisor ps --json`, or None while the instance is not answering yet.
    pub fn ps(&self) -> Option<Vec<serde_json::Value>> {
        let out = self.pv(&["ps", "--json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn row(&self, service: &str) -> serde_json::Value {
        self.ps()
            .expect("ps answers")
            .into_iter()
            .find(|r| r["name"] == service)
            .unwrap_or_else(|| panic!("no row for {service}"))
    }

    /// Polls `ps` until `cond` holds; panics with the log after `timeout`.
    pub fn wait_until(&self, timeout: Duration, cond: impl Fn(&[serde_json::Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(rows) = self.ps() {
                if cond(&rows) {
                    return;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "condition not reached in {timeout:?}; ps: {:?}\nlog:\n{}",
                    self.ps(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self, service: &str) -> i32 {
        self.row(service)["pid"]
            .as_i64()
            .expect("running service has a pid") as i32
    }

    /// Sends SIGTERM to `paravisor run` and returns its exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("paravisor did not stop on SIGTERM; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether a process exists.
pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// A service entry for test manifests.
pub fn service(name: &str, binary: &str, body: &str) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nbinary = \"{binary}\"\n{body}\nlimits = {{ memory = \"128M\", open-files = 32 }}\n"
    )
}

pub const RESTART_NEVER: &str =
    "restart = { policy = \"never\", max = 0, window = \"10s\", backoff = \"10ms\" }";
pub const RESTART_ALWAYS: &str =
    "restart = { policy = \"always\", max = 5, window = \"60s\", backoff = \"10ms\" }";

/// The body of a vmgs service entry: its encrypted guest-state file and key, created on the
/// first run as in the shipped manifest.
pub const VMGS_BODY: &str = r#"serves = ["vmgs"]
files = [{ name = "guest-state", path = "guest.vmgs", access = "read-write", missing = "create-vmgs", key = "datastore", size = "1M" }]
keys = [{ name = "datastore", path = "guest.vmgs.key", missing = "create" }]
syscalls = ["pwrite64", "fdatasync", "fsync"]"#;

/// Whether `/dev/kvm` can be opened (and the sandbox runs): tests of the guest partition say
/// SKIPPED and return otherwise.
pub fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: no /dev/kvm (or no access to it): {test} needs KVM");
    }
    ok && sandbox_available(test)
}

/// The longest a guest run may take in all, however busy the machine (a backstop: runs are
/// judged hung by their silence, see [`GuestRun::wait`]).
pub const GUEST_RUN_LIMIT: Duration = Duration::from_secs(1800);

/// A `paravisor run` with a guest: console (stdout) and log (stderr) in files; killed on
/// drop, its directory removed unless the test failed.
pub struct GuestRun {
    pub dir: PathBuf,
    pub child: Child,
}

impl GuestRun {
    pub fn start(tag: &str, manifest_text: &str, args: &[&str]) -> GuestRun {
        let dir = scratch_dir(tag);
        let manifest = dir.join("manifest.toml");
        std::fs::write(&manifest, manifest_text).unwrap();
        let child = Command::new(paravisor())
            .arg("run")
            .arg(&manifest)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(args)
            .stdout(std::fs::File::create(dir.join("console.txt")).unwrap())
            .stderr(std::fs::File::create(dir.join("paravisor.log")).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn paravisor run");
        GuestRun { dir, child }
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.txt")).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("paravisor.log")).unwrap_or_default()
    }

    /// Console and log, for a failure message.
    pub fn both(&self) -> String {
        format!("{}\n--- log ---\n{}", self.console(), self.log())
    }

    pub fn state_dir(&self) -> String {
        self.dir.join("state").display().to_string()
    }

    pub fn wait_for_console(&self, text: &str, timeout: Duration) {
        let until = Instant::now() + timeout;
        while !self.console().contains(text) {
            assert!(
                Instant::now() < until,
                "no {text:?} on the console after {timeout:?}:\n{}",
                self.both()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the run to end. It is killed as hung when its console stays silent for
    /// `quiet` (the test guest prints each step, and its long loops their progress: a run
    /// that is only slow, on a busy machine, keeps printing), or after [`GUEST_RUN_LIMIT`].
    pub fn wait(&mut self, quiet: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        let console = self.dir.join("console.txt");
        let (mut printed, mut last_output) = (0, Instant::now());
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            let now = std::fs::metadata(&console).map_or(0, |m| m.len());
            if now != printed {
                (printed, last_output) = (now, Instant::now());
            }
            if last_output.elapsed() > quiet || started.elapsed() > GUEST_RUN_LIMIT {
                let _ = self.child.kill();
                panic!(
                    "the run printed nothing for {:?} ({:?} in all):\n{}",
                    last_output.elapsed(),
                    started.elapsed(),
                    self.both()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GuestRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The port the manifest text gives a listener.
pub fn port(manifest: &str, listener: &str) -> u16 {
    let at = manifest
        .find(&format!("name = \"{listener}\""))
        .expect("listener in the manifest");
    let addr = manifest[at..]
        .split("address = \"")
        .nth(1)
        .expect("address");
    addr[..addr.find('"').expect("quote")]
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

// ---- Manifests edited as TOML ----

/// `manifest` after `edit` has changed it as TOML, with [`set`], [`add`], [`remove`] and
/// [`push`]: a test names the key it changes, and an edit of a key that is not there panics,
/// where a text replacement that matched nothing would leave the manifest as it was and let
/// the test pass for the wrong reason. What the edit does not touch keeps its text, and so
/// its line.
///
/// A key's path is keys joined by dots; in an array of tables, the next key picks the table
/// with that `name` (`service.tpm-gateway.listen.mssim-command.address`), or a number the
/// table at that index (`service.vtpm.calls.0.file-ids`).
pub fn edited(manifest: &str, edit: impl FnOnce(&mut DocumentMut)) -> String {
    let mut doc: DocumentMut = manifest.parse().expect("the manifest to edit is TOML");
    edit(&mut doc);
    doc.to_string()
}

/// Sets the key at `path`, which must be there, to `value` (TOML, as the manifest would
/// write it), on the key's line.
pub fn set(doc: &mut DocumentMut, path: &str, value: &str) {
    let (table, key, _) = holder(doc, path);
    let old = table
        .get_mut(key)
        .and_then(Item::as_value_mut)
        .unwrap_or_else(|| panic!("no {path} to set"));
    let mut new = toml_value(value);
    *new.decor_mut() = old.decor().clone();
    *old = new;
}

/// Adds the key at `path`, which must not be there yet, with `value` (TOML): a table's new
/// key goes on a line of its own after the table's last key; an inline table's, last
/// between its braces.
pub fn add(doc: &mut DocumentMut, path: &str, value: &str) {
    let (table, key, inline) = holder(doc, path);
    assert!(!table.contains_key(key), "{path} is there already");
    table.insert(key, Item::Value(toml_value(value)));
    if inline {
        table.fmt();
    }
}

/// Removes the key at `path`, which must be there.
pub fn remove(doc: &mut DocumentMut, path: &str) {
    let (table, key, inline) = holder(doc, path);
    assert!(table.remove(key).is_some(), "no {path} to remove");
    if inline {
        table.fmt();
    }
}

/// Appends `value` (TOML) to the array at `path`, which must be there.
pub fn push(doc: &mut DocumentMut, path: &str, value: &str) {
    let (table, key, _) = holder(doc, path);
    table
        .get_mut(key)
        .and_then(Item::as_array_mut)
        .unwrap_or_else(|| panic!("no array {path} to push to"))
        .push(toml_value(value));
}

/// The table that holds the last key of `path`, that key, and whether the table is inline
/// (`{ ... }`: kept on one line, as `{ a = 1, b = 2 }`).
fn holder<'d, 'p>(
    doc: &'d mut DocumentMut,
    path: &'p str,
) -> (&'d mut dyn TableLike, &'p str, bool) {
    let (parents, key) = path.rsplit_once('.').unwrap_or(("", path));
    let mut table: &mut dyn TableLike = doc.as_table_mut();
    let mut inline = false;
    let mut steps = parents.split('.').filter(|s| !s.is_empty());
    while let Some(step) = steps.next() {
        let item = table
            .get_mut(step)
            .unwrap_or_else(|| panic!("{path}: there is no {step}"));
        inline = item.is_inline_table() || item.is_array();
        let mut which = || {
            steps
                .next()
                .unwrap_or_else(|| panic!("{path}: which {step}?"))
        };
        table = match item {
            Item::Table(t) => t,
            Item::Value(Value::InlineTable(t)) => t,
            Item::ArrayOfTables(tables) => pick(tables.iter_mut(), step, which(), path),
            Item::Value(Value::Array(values)) => pick(
                values.iter_mut().filter_map(Value::as_inline_table_mut),
                step,
                which(),
                path,
            ),
            _ => panic!("{path}: {step} is not a table"),
        };
    }
    (table, key, inline)
}

/// The table of `tables` (the `step` of `path`) at index `which`, or the one whose `name`
/// is `which`.
fn pick<'t, T: TableLike + 't>(
    mut tables: impl Iterator<Item = &'t mut T>,
    step: &str,
    which: &str,
    path: &str,
) -> &'t mut T {
    match which.parse::<usize>() {
        Ok(index) => tables.nth(index),
        Err(_) => tables.find(|t| t.get("name").and_then(Item::as_str) == Some(which)),
    }
    .unwrap_or_else(|| panic!("{path}: there is no {step} {which}"))
}

fn toml_value(text: &str) -> Value {
    text.parse()
        .unwrap_or_else(|e| panic!("{text:?} is not a TOML value: {e}"))
}

/// `paravisor platform report`: a report from the platform in `platform_dir` over `nonce`
/// (hex) claiming `measurement` (hex), written to `out`; its bytes.
pub fn platform_report(platform_dir: &Path, nonce: &str, measurement: &str, out: &Path) -> Vec<u8> {
    let (ok, text) = pv_result(&[
        "platform",
        "report",
        "--platform-dir",
        platform_dir.to_str().unwrap(),
        "--nonce",
        nonce,
        "--measurement",
        measurement,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    std::fs::read(out).unwrap()
}

/// The arguments of `paravisor attest verify REPORT --certs CERTS --ark-fingerprint FP`,
/// then `extra`.
pub fn verify_args<'a>(
    report: &'a Path,
    certs: &'a Path,
    fingerprint: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "attest",
        "verify",
        report.to_str().unwrap(),
        "--certs",
        certs.to_str().unwrap(),
        "--ark-fingerprint",
        fingerprint,
    ];
    args.extend_from_slice(extra);
    args
}
