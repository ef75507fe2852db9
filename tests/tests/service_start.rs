//! A service that hangs before its first ping does not stall the supervisor: a start is a
//! state the main loop watches, with a deadline (issue 12, item 9). The events are compared
//! by their order (what `ps` shows while the service is still starting), never by time.

mod common;

use std::time::Duration;

use common::alive;
use common::sandbox_available;
use common::service;
use common::text;
use common::Instance;
use common::RESTART_ALWAYS;
use common::RESTART_NEVER;
use common::VMGS_BODY;

/// vmgs, attest (its client) and, last, a service that never answers its first ping.
fn with_silent_start() -> String {
    let mut m = service("vmgs", "pv-vmgs", &format!("{VMGS_BODY}\n{RESTART_ALWAYS}"));
    m += &service(
        "attest",
        "pv-attest",
        &format!("serves = [\"attest\"]\ncalls = [{{ endpoint = \"vmgs\", file-ids = [\"ATTEST\"] }}]\n{RESTART_ALWAYS}"),
    );
    m += &service(
        "silent",
        "pv-hostile",
        &format!("calls = [{{ endpoint = \"vmgs\", file-ids = [\"TPM_NVRAM\"] }}]\nargs = [\"silent-start\"]\n{RESTART_NEVER}"),
    );
    m
}

#[test]
fn a_service_silent_at_start_does_not_delay_ps_or_a_kill_of_another_service() {
    if !sandbox_available(
        "a_service_silent_at_start_does_not_delay_ps_or_a_kill_of_another_service",
    ) {
        return;
    }
    let inst = Instance::start("silent", &with_silent_start(), 2);
    // `ps` answers while the silent service is still starting. (Its start follows the
    // others': on a busy machine `ps` may first see it still waiting for its turn.)
    inst.wait_until(Duration::from_secs(60), |rows| {
        rows.iter()
            .any(|r| r["name"] == "silent" && r["state"] != "waiting")
    });
    let row = inst.row("silent");
    assert_eq!(
        row["state"],
        "starting",
        "ps was answered only after the start ended: {row}\n{}",
        inst.log()
    );
    let silent_pid = row["pid"].as_i64().expect("a starting service has a pid");
    // A kill of another service takes effect, and it is restarted, during that same start.
    let old = inst.pid("vmgs");
    let out = inst.pv(&["kill", "vmgs"]);
    assert!(out.status.success(), "{}", text(&out));
    inst.wait_until(Duration::from_secs(60), |rows| {
        rows.iter().any(|r| {
            r["name"] == "vmgs" && r["state"] == "running" && r["pid"].as_i64() != Some(old as i64)
        })
    });
    let row = inst.row("silent");
    assert_eq!(row["state"], "starting", "{row}\n{}", inst.log());
    assert_eq!(row["pid"].as_i64(), Some(silent_pid), "{row}");
    assert!(
        !inst.log().contains("did not answer its first ping"),
        "{}",
        inst.log()
    );
    // The deadline still holds: the silent service is killed, and its policy applies.
    inst.wait_until(Duration::from_secs(60), |rows| {
        rows.iter()
            .any(|r| r["name"] == "silent" && r["state"] == "failed")
    });
    let row = inst.row("silent");
    assert!(
        row["last_exit"]
            .to_string()
            .contains("did not answer its first ping within 10s"),
        "{row}"
    );
    assert!(
        !alive(silent_pid as i32),
        "the silent service outlived its start"
    );
    let out = inst.pv(&["probe", "attest", "vmgs"]);
    assert!(text(&out).contains("reached"), "{}", text(&out));
}

#[test]
fn stop_while_a_service_is_starting_stops_everything() {
    if !sandbox_available("stop_while_a_service_is_starting_stops_everything") {
        return;
    }
    let mut inst = Instance::start("silent-stop", &with_silent_start(), 2);
    let row = inst.row("silent");
    assert_eq!(row["state"], "starting", "{row}\n{}", inst.log());
    let pids: Vec<i32> = ["vmgs", "attest", "silent"]
        .iter()
        .map(|s| inst.pid(s))
        .collect();
    let out = inst.pv(&["stop"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("shutting down"), "{}", text(&out));
    assert_eq!(inst.stop().code(), Some(0), "{}", inst.log());
    for pid in pids {
        assert!(!alive(pid), "service pid {pid} outlived the paravisor");
    }
}
