//! The state and platform directories (issue 12 item 4): another local user cannot choose
//! the chip secret, plant files the paravisor writes through or hangs on, or own a directory
//! the paravisor trusts. Each test performs the attack (as root, planting files that belong to
//! `nobody`, uid 65534) and checks the refusal or the safe outcome.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use common::*;

/// The user who plants things.
const NOBODY: u32 = 65534;

/// A sealed guest-state file and an attest service that holds the platform and is granted
/// the launch log and the chain: every file of the state directory this issue is about.
fn manifest(dir: &Path, platform_dir: Option<&Path>) -> PathBuf {
    let mut m =
        String::from("[paravisor]\nstate-dir = \"state\"\n\n[attest]\nsealing = \"measurement\"\n");
    if let Some(p) = platform_dir {
        m += &format!("platform-dir = \"{}\"\n", p.display());
    }
    m += "\n";
    m += &service(
        "vmgs",
        "pv-vmgs",
        &format!(
            "serves = [\"vmgs\"]\nfiles = [{{ name = \"guest-state\", path = \"guest.vmgs\", access = \"read-write\", missing = \"create-vmgs\", key = \"datastore\", size = \"1M\" }}]\n\
             keys = [{{ name = \"datastore\", sealed = true }}]\nsyscalls = [\"pwrite64\", \"fdatasync\", \"fsync\"]\n{RESTART_NEVER}"
        ),
    );
    m += &service(
        "attest",
        "pv-attest",
        &format!(
            "serves = [\"attest\"]\nplatform = true\nfiles = [\n  {{ name = \"launch-log\", path = \"launch-log.json\", access = \"read-only\" }},\n  \
             {{ name = \"platform-certs\", path = \"platform-certs.pem\", access = \"read-only\" }},\n]\n{RESTART_NEVER}"
        ),
    );
    let path = dir.join("manifest.toml");
    std::fs::write(&path, m).unwrap();
    path
}

/// A `paravisor run --no-guest`, killed if the test ends before it does.
struct Run {
    child: Child,
    log: PathBuf,
    /// The state directory its control commands name (`None`: the manifest's, from `cwd`).
    state: PathBuf,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// How a start ended.
#[derive(Debug)]
enum Outcome {
    /// Every service runs.
    Up,
    /// It exited (refused) with this output.
    Refused(String),
}

impl Run {
    /// `paravisor run --no-guest MANIFEST ARGS...` in `cwd`; `state` is where it keeps its
    /// state (as `ARGS` or the manifest say).
    fn start(cwd: &Path, manifest: &Path, state: &Path, args: &[&str]) -> Run {
        let log = cwd.join(format!("run-{}.log", std::process::id()));
        let child = Command::new(paravisor())
            .current_dir(cwd)
            .arg("run")
            .arg("--no-guest")
            .arg(manifest)
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Run {
            child,
            log,
            state: state.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until every service runs or the run exits; a run that does neither (hangs on
    /// something planted) fails the test.
    fn outcome(&mut self) -> Outcome {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    !status.success(),
                    "ended without being stopped:\n{}",
                    self.log()
                );
                return Outcome::Refused(self.log());
            }
            let out = pv(&["ps", "--json", "--state-dir", self.state.to_str().unwrap()]);
            if out.status.success() {
                let rows: Vec<serde_json::Value> =
                    serde_json::from_slice(&out.stdout).unwrap_or_default();
                if !rows.is_empty() && rows.iter().all(|r| r["state"] == "running") {
                    return Outcome::Up;
                }
            }
            assert!(
                Instant::now() < deadline,
                "neither started nor refused (hung?):\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops a run that is up.
    fn stop(mut self) -> String {
        let out = pv(&["stop", "--state-dir", self.state.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(self.child.wait().unwrap().success(), "{}", self.log());
        self.log()
    }

    fn up(mut self) -> String {
        match self.outcome() {
            Outcome::Up => self.stop(),
            Outcome::Refused(log) => panic!("refused:\n{log}"),
        }
    }

    fn refused(mut self) -> String {
        match self.outcome() {
            Outcome::Refused(log) => log,
            Outcome::Up => {
                let log = self.stop();
                panic!("started:\n{log}")
            }
        }
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

/// A platform directory as someone else would plant it: their chip secret, a chain, theirs.
fn plant_platform(dir: &Path, owner: u32, secret_mode: u32) {
    std::fs::create_dir(dir).unwrap();
    chmod(dir, 0o700);
    std::fs::write(dir.join("chip-secret.INSECURE"), [0x42; 64]).unwrap();
    chmod(&dir.join("chip-secret.INSECURE"), secret_mode);
    for cert in ["ark.pem", "ask.pem", "vcek.pem"] {
        std::fs::write(
            dir.join(cert),
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
    }
    for entry in std::fs::read_dir(dir).unwrap() {
        std::os::unix::fs::lchown(entry.unwrap().path(), Some(owner), Some(owner)).unwrap();
    }
    std::os::unix::fs::chown(dir, Some(owner), Some(owner)).unwrap();
}

#[test]
fn a_default_platform_dir_in_a_shared_parent_is_refused_and_a_planted_chip_secret_signs_nothing() {
    if !sandbox_available("default platform dir in a shared parent") {
        return;
    }
    let root = scratch_dir("shared");
    // A directory like /tmp: anyone may make a name in it.
    let shared = root.join("tmp");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o1777);
    // Another user was there first with "platform", their chip secret in it.
    plant_platform(&shared.join("platform"), NOBODY, 0o600);
    let state = shared.join("state");
    let m = manifest(&root, None);
    let out = Run::start(&root, &m, &state, &["--state-dir", state.to_str().unwrap()]).refused();
    for needle in [
        "others may write to",
        "--platform-dir",
        "[attest] platform-dir",
    ] {
        assert!(out.contains(needle), "refusal lacks \"{needle}\":\n{out}");
    }
    // Nothing signed with the planted secret: no service ran, its chain reached nothing.
    assert!(!out.contains("running service"), "{out}");
    assert!(!state.join("platform-certs.pem").exists());
    let report = pv(&[
        "attest",
        "report",
        "--nonce",
        "00",
        "-o",
        root.join("r.bin").to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(!report.status.success(), "{}", text(&report));
    assert!(!root.join("r.bin").exists());
    // Naming a platform directory of one's own, as the refusal says, starts (a state
    // directory below a sticky shared directory is fine: nobody else can rename it).
    let platform = test_platform_dir();
    let log = Run::start(
        &root,
        &m,
        &state,
        &[
            "--state-dir",
            state.to_str().unwrap(),
            "--platform-dir",
            platform.to_str().unwrap(),
        ],
    )
    .up();
    assert!(log.contains("sealed (policy measurement)"), "{log}");
    assert_eq!(mode(&state), 0o700);
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn files_planted_as_links_in_the_state_dir_are_replaced_and_their_targets_untouched() {
    if !sandbox_available("links planted in the state dir") {
        return;
    }
    let root = scratch_dir("links");
    let state = root.join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    let victim = root.join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let names = [
        "launch-log.json",
        "platform-certs.pem",
        "sealed-launch-log.json",
    ];
    for name in names {
        let link = state.join(name);
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let m = manifest(&root, Some(&test_platform_dir()));
    let log = Run::start(&root, &m, &state, &["--state-dir", state.to_str().unwrap()]).up();
    assert_eq!(
        std::fs::read_to_string(&victim).unwrap(),
        "precious",
        "{log}"
    );
    for name in names {
        let meta = std::fs::symlink_metadata(state.join(name)).unwrap();
        assert!(meta.is_file(), "{name} is not a file of its own now");
        assert_eq!(meta.uid(), 0, "{name}");
        assert!(
            log.contains(&format!(
                "{name} was a symbolic link, not a file of ours: replaced"
            )),
            "{name}:\n{log}"
        );
    }
    // A file the paravisor only reads (the guest-state file) planted as a link is refused
    // by name instead.
    let vmgs = state.join("guest.vmgs");
    std::fs::rename(&vmgs, root.join("guest.vmgs")).unwrap();
    std::os::unix::fs::symlink(root.join("guest.vmgs"), &vmgs).unwrap();
    let out = Run::start(&root, &m, &state, &["--state-dir", state.to_str().unwrap()]).refused();
    assert!(out.contains("guest.vmgs is a symbolic link"), "{out}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_planted_fifo_does_not_hang_the_start() {
    if !sandbox_available("FIFOs planted in the state dir") {
        return;
    }
    let root = scratch_dir("fifo");
    let state = root.join("state");
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o700);
    // Where the paravisor writes: replaced.
    for name in ["launch-log.json", "platform-certs.pem"] {
        mkfifo(&state.join(name));
    }
    let m = manifest(&root, Some(&test_platform_dir()));
    let log = Run::start(&root, &m, &state, &["--state-dir", state.to_str().unwrap()]).up();
    assert!(
        log.contains("launch-log.json was a FIFO, not a file of ours: replaced"),
        "{log}"
    );
    // Where it reads: refused by name, at once.
    let vmgs = state.join("guest.vmgs");
    std::fs::remove_file(&vmgs).unwrap();
    mkfifo(&vmgs);
    let out = Run::start(&root, &m, &state, &["--state-dir", state.to_str().unwrap()]).refused();
    assert!(out.contains("guest.vmgs is a FIFO"), "{out}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_state_dir_another_user_can_change_is_refused_before_anything_is_written() {
    if !sandbox_available("state dirs others can change") {
        return;
    }
    let root = scratch_dir("foreign");
    let m = manifest(&root, Some(&test_platform_dir()));
    let state = root.join("state");
    let start = |state: &Path| {
        Run::start(&root, &m, state, &["--state-dir", state.to_str().unwrap()]).refused()
    };
    // Group-writable.
    std::fs::create_dir(&state).unwrap();
    chmod(&state, 0o770);
    let out = start(&state);
    assert!(
        out.contains("is writable by group or others (mode 0770)") && out.contains("chmod go-w"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "nothing written"
    );
    // Another user's.
    chmod(&state, 0o700);
    std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
    let out = start(&state);
    assert!(out.contains("belongs to uid 65534"), "{out}");
    assert_eq!(
        std::fs::read_dir(&state).unwrap().count(),
        0,
        "nothing written"
    );
    // Ours, but below a directory anyone may write to (no sticky bit): anyone could rename
    // it away and put their own in its place.
    let open = root.join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let below = open.join("state");
    std::fs::create_dir(&below).unwrap();
    chmod(&below, 0o700);
    let out = start(&below);
    assert!(
        out.contains("(mode 0777) and not sticky") && out.contains(open.to_str().unwrap()),
        "{out}"
    );
    assert_eq!(
        std::fs::read_dir(&below).unwrap().count(),
        0,
        "nothing written"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_chip_secret_others_can_read_or_another_user_owns_is_refused() {
    if !sandbox_available("chip secrets others can read") {
        return;
    }
    let root = scratch_dir("secret");
    let platform = root.join("platform");
    // Ours, but readable by everyone.
    plant_platform(&platform, 0, 0o644);
    let m = manifest(&root, Some(&platform));
    let state = root.join("state");
    let start =
        || Run::start(&root, &m, &state, &["--state-dir", state.to_str().unwrap()]).refused();
    let out = start();
    assert!(
        out.contains("chip-secret.INSECURE is accessible to group or others (mode 0644)")
            && out.contains("chmod 600"),
        "{out}"
    );
    // 0600, but another user's.
    chmod(&platform.join("chip-secret.INSECURE"), 0o600);
    std::os::unix::fs::chown(platform.join("chip-secret.INSECURE"), Some(NOBODY), None).unwrap();
    let out = start();
    assert!(
        out.contains("chip-secret.INSECURE belongs to uid 65534"),
        "{out}"
    );
    // The platform directory itself another user's.
    std::os::unix::fs::chown(platform.join("chip-secret.INSECURE"), Some(0), None).unwrap();
    std::os::unix::fs::chown(&platform, Some(NOBODY), None).unwrap();
    let out = start();
    assert!(
        out.contains(&format!(
            "platform directory {} belongs to uid 65534",
            platform.display()
        )),
        "{out}"
    );
    // No guest-state file was made under a key from a platform that is not ours.
    assert!(!state.join("guest.vmgs").exists());
    assert!(!state.join("platform-certs.pem").exists());
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_fresh_run_makes_private_directories_and_files_of_the_intended_modes() {
    if !sandbox_available("modes of a fresh run") {
        return;
    }
    // As the README's first command: the manifest's `state` in the current directory, the
    // platform made next to it on first use.
    let root = scratch_dir("fresh");
    let m = manifest(&root, None);
    let state = root.join("state");
    let platform = root.join("platform");
    let mut run = Run::start(&root, &m, &state, &[]);
    assert!(matches!(run.outcome(), Outcome::Up), "{}", run.log());
    assert_eq!(mode(&state.join("control.sock")), 0o600);
    let log = run.stop();
    assert!(log.contains("provisioning a SIMULATED one"), "{log}");
    for (path, expected) in [
        (state.clone(), 0o700),
        (state.join(".lock"), 0o600),
        (state.join("guest.vmgs"), 0o600),
        (state.join("launch-log.json"), 0o644),
        (state.join("platform-certs.pem"), 0o644),
        (state.join("sealed-launch-log.json"), 0o644),
        (platform.clone(), 0o700),
        (platform.join("chip-secret.INSECURE"), 0o600),
        (platform.join("ark.pem"), 0o644),
        (platform.join("ask.pem"), 0o644),
        (platform.join("vcek.pem"), 0o644),
    ] {
        assert_eq!(mode(&path), expected, "{}", path.display());
    }
    // Missing directories above a state directory are made private too.
    let deep = root.join("a/b/state");
    Run::start(
        &root,
        &m,
        &deep,
        &[
            "--state-dir",
            deep.to_str().unwrap(),
            "--platform-dir",
            platform.to_str().unwrap(),
        ],
    )
    .up();
    for d in [root.join("a"), root.join("a/b"), deep] {
        assert_eq!(mode(&d), 0o700, "{}", d.display());
    }
    let _ = std::fs::remove_dir_all(&root);
}
