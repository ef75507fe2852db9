//! The vmgs service in the running system: the guest-state file made on the first run, each
//! client held to its own file ids, acknowledged writes surviving `kill -9` of the store.

mod common;

use std::time::Duration;
use std::time::Instant;

use common::pv;
use common::sandbox_available;
use common::service;
use common::text;
use common::Instance;
use common::RESTART_ALWAYS;
use common::RESTART_NEVER;
use common::VMGS_BODY;

fn store() -> String {
    service("vmgs", "pv-vmgs", &format!("{VMGS_BODY}\n{RESTART_ALWAYS}"))
}

fn client(name: &str, file_ids: &str, args: &str) -> String {
    service(
        name,
        "pv-hostile",
        &format!(
            "calls = [{{ endpoint = \"vmgs\", file-ids = [{file_ids}] }}]\nargs = [{args}]\nwatchdog = \"60s\"\n{RESTART_NEVER}"
        ),
    )
}

/// Waits until the log contains `needle`.
fn wait_for_log(inst: &Instance, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !inst.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} within {timeout:?}; log:\n{}",
            inst.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_is_refused_every_file_id_it_was_not_granted() {
    if !sandbox_available("a_client_is_refused_every_file_id_it_was_not_granted") {
        return;
    }
    let manifest = format!(
        "{}{}{}",
        store(),
        client("snoop", "\"TPM_NVRAM\"", "\"vmgs-access\", \"ATTEST\""),
        client("owner", "\"ATTEST\"", "\"vmgs-access\", \"ATTEST\""),
    );
    let inst = Instance::start("vmgs-grant", &manifest, 3);
    wait_for_log(&inst, "hostile: vmgs list", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    let log = inst.log();
    for line in [
        "vmgs write ATTEST (5): vmgs: ATTEST (5): not granted to this caller",
        "vmgs read ATTEST (5): vmgs: ATTEST (5): not granted to this caller",
        "vmgs write ATTEST (5): ok",
        "vmgs read ATTEST (5): 23 bytes",
    ] {
        assert!(log.contains(line), "missing {line:?} in\n{log}");
    }
    // The refusals are logged by the store, with the client's name, and counted.
    assert!(log.contains("client=snoop"), "{log}");
    let refused = inst.row("vmgs")["refused"].as_u64().unwrap();
    assert!(refused >= 2, "vmgs counted {refused} refusals");
    // The audit names each client's file ids.
    let out = pv(&["audit", inst.manifest.to_str().unwrap()]);
    assert!(
        text(&out).contains("snoop on vmgs: file-ids [TPM_NVRAM]"),
        "{}",
        text(&out)
    );
}

/// What the writer client writes as its n-th value (see `pv-hostile vmgs-writer`).
fn writer_contents(n: u32) -> Vec<u8> {
    (0..40_000u32)
        .map(|i| (i.wrapping_mul(n) >> 3) as u8 ^ n as u8)
        .collect()
}

#[test]
fn kill_9_of_the_store_during_writes_loses_no_acknowledged_write() {
    if !sandbox_available("kill_9_of_the_store_during_writes_loses_no_acknowledged_write") {
        return;
    }
    let manifest = format!(
        "{}{}",
        store(),
        client(
            "writer",
            "\"TPM_NVRAM\"",
            "\"vmgs-writer\", \"TPM_NVRAM\", \"6\""
        ),
    );
    let mut inst = Instance::start("vmgs-kill", &manifest, 2);
    let state = inst.dir.join("state");

    // First run: an encrypted guest-state file and its key (mode 0600) were made.
    let log = inst.log();
    assert!(log.contains("made a new random datastore key"), "{log}");
    assert!(log.contains("created encrypted guest-state file"), "{log}");
    let key = state.join("guest.vmgs.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // Kill the store three times while the writer streams, each time once it runs again.
    let mut kills = 0;
    wait_for_log(&inst, "vmgs acked 10\n", Duration::from_secs(60));
    while kills < 3 && !inst.log().contains("vmgs writer done") {
        let pid = inst.pid("vmgs");
        let out = inst.pv(&["kill", "vmgs", "--signal", "KILL"]);
        assert!(out.status.success(), "{}", text(&out));
        kills += 1;
        inst.wait_until(Duration::from_secs(20), |rows| {
            rows.iter().any(|r| {
                r["name"] == "vmgs"
                    && r["state"] == "running"
                    && r["pid"].as_i64() != Some(pid as i64)
            })
        });
    }
    wait_for_log(&inst, "vmgs writer done", Duration::from_secs(120));
    assert_eq!(
        kills, 3,
        "the writer finished before the store was killed three times"
    );
    let log = inst.log();
    let done = log
        .lines()
        .find(|l| l.contains("vmgs writer done"))
        .unwrap();
    let count: u32 = done
        .split("done: ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("count in {done:?}"));
    // At least one kill landed while a request was in flight (and was retried).
    assert!(!done.contains(", 0 store restarts seen"), "{done}");
    assert!(!log.contains("LOST"), "{log}");
    assert!(!log.contains("failed"), "{log}");
    assert!(inst.row("vmgs")["restarts"].as_u64().unwrap() >= kills);
    assert_eq!(inst.stop().code(), Some(0));

    // The file on disk holds the last acknowledged write, readable with the tool.
    let vmgs = state.join("guest.vmgs");
    let out_file = inst.dir.join("nvram.out");
    let out = pv(&[
        "vmgs",
        "dump",
        "-f",
        vmgs.to_str().unwrap(),
        "-k",
        key.to_str().unwrap(),
        "-i",
        "TPM_NVRAM",
        "-d",
        out_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&out_file).unwrap(), writer_contents(count));
    // And without the key it is not readable as plaintext.
    let out = pv(&["vmgs", "query-encryption", "-f", vmgs.to_str().unwrap()]);
    assert!(
        text(&out).contains("is encrypted with AES GCM"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_later_run_reuses_the_guest_state_and_its_key() {
    if !sandbox_available("a_later_run_reuses_the_guest_state_and_its_key") {
        return;
    }
    let manifest = format!(
        "{}{}",
        store(),
        client(
            "writer",
            "\"TPM_NVRAM\"",
            "\"vmgs-writer\", \"TPM_NVRAM\", \"1\""
        ),
    );
    let mut first = Instance::start("vmgs-reuse", &manifest, 2);
    wait_for_log(&first, "vmgs writer done", Duration::from_secs(30));
    assert_eq!(first.stop().code(), Some(0));
    let state = first.dir.join("state");
    let key_before = std::fs::read(state.join("guest.vmgs.key")).unwrap();

    // A second run on the same state directory: nothing is made anew, the store opens the
    // file the first run left and serves its contents (the writer reads each value back).
    let manifest_path = first.manifest.clone();
    let log_path = first.dir.join("second.log");
    let mut child = std::process::Command::new(common::paravisor())
        .arg("run")
        .arg(&manifest_path)
        .arg("--state-dir")
        .arg(&state)
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("vmgs writer done") {
            assert!(!log.contains("made a new random"), "{log}");
            assert!(!log.contains("created encrypted"), "{log}");
            assert!(log.contains("guest-state file open"), "{log}");
            break;
        }
        assert!(Instant::now() < deadline, "second run:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(
        std::fs::read(state.join("guest.vmgs.key")).unwrap(),
        key_before
    );
}

#[test]
fn a_missing_key_for_an_existing_guest_state_file_stops_the_start() {
    let dir = common::scratch_dir("vmgs-nokey");
    let manifest = dir.join("manifest.toml");
    std::fs::write(
        &manifest,
        format!("{}{}", store(), client("c", "\"TPM_NVRAM\"", "\"serve\"")),
    )
    .unwrap();
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let out = pv(&[
        "vmgs",
        "create",
        "-f",
        state.join("guest.vmgs").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let out = std::process::Command::new(common::paravisor())
        .arg("run")
        .arg(&manifest)
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("exists but its key"), "{}", text(&out));
    assert!(!state.join("guest.vmgs.key").exists(), "no key was made");
    let _ = std::fs::remove_dir_all(dir);
}
