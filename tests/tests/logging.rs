//! How `paravisor run` logs (issue 13, item 4): no ANSI escapes when the log is not a
//! terminal, from the microkernel or a service; `--log-format json` makes every line of the
//! log a JSON object; `--log-file` appends to a private file of ours and refuses a link or
//! another user's file.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use std::time::Instant;

use common::pv;
use common::sandbox_available;
use common::scratch_dir;
use common::service;
use common::text;
use common::Instance;
use common::RESTART_ALWAYS;
use common::VMGS_BODY;

fn manifest() -> String {
    service("vmgs", "pv-vmgs", &format!("{VMGS_BODY}\n{RESTART_ALWAYS}"))
}

/// Kills vmgs and waits for its restart: the log then holds a warning of the microkernel
/// (its death) and the service's own lines of two starts.
fn kill_and_wait_for_restart(inst: &Instance) {
    let out = inst.pv(&["kill", "vmgs"]);
    assert!(out.status.success(), "{}", text(&out));
    inst.wait_until(Duration::from_secs(120), |rows| {
        rows.iter()
            .any(|r| r["name"] == "vmgs" && r["restarts"] == 1 && r["state"] == "running")
    });
}

#[test]
fn without_a_terminal_neither_the_microkernel_nor_a_service_writes_ansi_escapes() {
    if !sandbox_available(
        "without_a_terminal_neither_the_microkernel_nor_a_service_writes_ansi_escapes",
    ) {
        return;
    }
    // stderr is a file (Instance): not a terminal.
    let mut inst = Instance::start("log-plain", &manifest(), 1);
    kill_and_wait_for_restart(&inst);
    assert_eq!(inst.stop().code(), Some(0));
    let log = inst.log();
    // The microkernel's own lines (with their levels, which a terminal gets coloured)...
    assert!(log.contains(" WARN "), "{log}");
    // ...and the service's own tracing lines, tagged.
    assert!(
        log.lines()
            .any(|l| l.starts_with("vmgs | ") && l.contains(" INFO ")),
        "{log}"
    );
    assert!(!log.contains('\u{1b}'), "a raw escape in the log:\n{log:?}");
    // A service that coloured its lines would show as escaped escapes.
    assert!(
        !log.contains("\\x1b["),
        "a service coloured its lines:\n{log}"
    );
}

#[test]
fn json_log_format_makes_every_log_line_a_json_object_the_services_lines_too() {
    if !sandbox_available(
        "json_log_format_makes_every_log_line_a_json_object_the_services_lines_too",
    ) {
        return;
    }
    let mut inst = Instance::start_with("log-json", &manifest(), 1, &["--log-format", "json"]);
    kill_and_wait_for_restart(&inst);
    assert_eq!(inst.stop().code(), Some(0));
    let log = inst.log();
    let rows: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}\n{log}")))
        .collect();
    // The microkernel's events: a level and a message...
    let own = rows
        .iter()
        .find(|r| r["level"] == "WARN" && r["message"].is_string())
        .unwrap_or_else(|| panic!("no warning of the microkernel:\n{log}"));
    assert!(own["timestamp"].is_string(), "{own}");
    // ...and the service's lines, named by service and stream, their text in `message`.
    let theirs: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["service"] == "vmgs" && r["stream"] == "stderr")
        .collect();
    assert!(!theirs.is_empty(), "no line of the service:\n{log}");
    assert!(theirs
        .iter()
        .all(|r| r["message"].is_string() && r["timestamp"].is_string()));
    assert!(!log.contains('\u{1b}'), "{log:?}");
}

#[test]
fn a_log_file_is_appended_private_and_refused_through_a_link_or_when_another_user_owns_it() {
    if !sandbox_available(
        "a_log_file_is_appended_private_and_refused_through_a_link_or_when_another_user_owns_it",
    ) {
        return;
    }
    let files = scratch_dir("log-file");
    let path = files.join("paravisor.log");
    let file = path.to_str().unwrap();
    // The second run has it from a host file (`run --host`), as an installation sets it.
    let host = files.join("host.toml");
    std::fs::write(&host, format!("log-file = \"{file}\"\n")).unwrap();
    let host = host.to_str().unwrap();
    for (run, args) in [["--log-file", file], ["--host", host]].iter().enumerate() {
        let mut inst = Instance::start_with(&format!("log-file-{run}"), &manifest(), 1, args);
        assert_eq!(inst.stop().code(), Some(0));
        // The log went to the file, not to stderr.
        assert!(!inst.log().contains("launch measurement"), "{}", inst.log());
    }
    let log = std::fs::read_to_string(&path).unwrap();
    // Both runs' lines, the first run's kept: appended.
    assert_eq!(log.matches("launch measurement").count(), 2, "{log}");
    assert!(log.lines().any(|l| l.starts_with("vmgs | ")), "{log}");
    assert!(!log.contains('\u{1b}'), "{log:?}");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    // A link to it is refused before anything starts, and the file is left alone.
    let link = files.join("link.log");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let refused = |log_file: &std::path::Path, needle: &str| {
        let dir = scratch_dir("log-refused");
        std::fs::write(dir.join("manifest.toml"), manifest()).unwrap();
        let started = Instant::now();
        let out = pv(&[
            "run",
            "--no-guest",
            dir.join("manifest.toml").to_str().unwrap(),
            "--state-dir",
            dir.join("state").to_str().unwrap(),
            "--log-file",
            log_file.to_str().unwrap(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(text(&out).contains(needle), "{}", text(&out));
        // It stopped at the log file: no service was started, no state made.
        assert!(!dir.join("state").exists(), "{:?}", started.elapsed());
        let _ = std::fs::remove_dir_all(dir);
    };
    refused(&link, "is a symbolic link");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), log);
    // Another user's file (root is running the tests: nobody's file here).
    let theirs = files.join("theirs.log");
    std::fs::write(&theirs, "their log\n").unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    refused(&theirs, "belongs to uid 65534");
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), "their log\n");
    let _ = std::fs::remove_dir_all(files);
}
