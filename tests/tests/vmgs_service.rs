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

/// The last value the writer logged as acknowledged.
fn last_acked(log: &str) -> u32 {
    log.lines()
        .rev()
        .filter_map(|l| l.split("vmgs acked ").nth(1))
        .find_map(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn kill_9_of_the_store_during_writes_loses_no_acknowledged_write() {
    if !sandbox_available("kill_9_of_the_store_during_writes_loses_no_acknowledged_write") {
        return;
    }
    // The writer writes 1, 2, 3, ... (reading each back) until it is killed itself.
    let manifest = format!(
        "{}{}",
        store(),
        client(
            "writer",
            "\"TPM_NVRAM\"",
            "\"vmgs-writer\", \"TPM_NVRAM\", \"600\""
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

    // Kill the store three times in the middle of the stream; after each restart the writer
    // must go on (and each value it reads back must be the one it was told was written).
    wait_for_log(&inst, "vmgs acked 10\n", Duration::from_secs(60));
    for round in 0..3 {
        let pid = inst.pid("vmgs");
        let out = inst.pv(&["kill", "vmgs", "--signal", "KILL"]);
        assert!(out.status.success(), "{}", text(&out));
        inst.wait_until(Duration::from_secs(30), |rows| {
            rows.iter().any(|r| {
                r["name"] == "vmgs"
                    && r["state"] == "running"
                    && r["pid"].as_i64() != Some(pid as i64)
            })
        });
        let after = last_acked(&inst.log());
        let deadline = Instant::now() + Duration::from_secs(60);
        while last_acked(&inst.log()) < after + 10 {
            assert!(
                Instant::now() < deadline,
                "round {round}: the writer stalled:\n{}",
                inst.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let out = inst.pv(&["kill", "writer", "--signal", "KILL"]);
    assert!(out.status.success(), "{}", text(&out));
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter()
            .any(|r| r["name"] == "writer" && r["state"] != "running")
    });
    let log = inst.log();
    assert!(!log.contains("LOST"), "{log}");
    assert!(
        !log.contains("pv-hostile: vmgs write "),
        "a write failed:\n{log}"
    );
    assert!(!log.contains("read-back"), "a read-back failed:\n{log}");
    assert!(
        log.contains("retried"),
        "no kill landed during a call:\n{log}"
    );
    assert!(inst.row("vmgs")["restarts"].as_u64().unwrap() >= 3);
    let acked = last_acked(&log);
    assert_eq!(inst.stop().code(), Some(0));

    // The file on disk holds the last acknowledged write (or the one after it, if the writer
    // died between the commit and its log line), readable with the tool.
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
    let on_disk = std::fs::read(&out_file).unwrap();
    assert!(
        on_disk == writer_contents(acked) || on_disk == writer_contents(acked + 1),
        "the file does not hold acknowledged write {acked}"
    );
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
        .arg("--no-guest")
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
        .arg("--no-guest")
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
