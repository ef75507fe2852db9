//! Cross-process tests of the running system: sandboxing, capabilities, restarts, hostile
//! peers, shutdown. Modelled on Hubris's test_restart / test_fault_* / test_recv_reply_fault
//! and Firecracker's test_seccomp_*.

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

const SERVICES: [&str; 7] = [
    "intercept",
    "vmgs",
    "attest",
    "vtpm",
    "tpm-gateway",
    "storage",
    "net",
];

fn shipped() -> String {
    common::shipped_text()
}

/// vmgs served to a hostile client and to an honest one (attest).
fn with_hostile(args: &str, restart: &str) -> String {
    let mut m = String::new();
    m += &service("vmgs", "pv-vmgs", &format!("{VMGS_BODY}\n{RESTART_ALWAYS}"));
    m += &service(
        "attest",
        "pv-attest",
        &format!("serves = [\"attest\"]\ncalls = [{{ endpoint = \"vmgs\", file-ids = [\"ATTEST\"] }}]\n{RESTART_ALWAYS}"),
    );
    m += &service(
        "hostile",
        "pv-hostile",
        &format!("calls = [{{ endpoint = \"vmgs\", file-ids = [\"TPM_NVRAM\"] }}]\nargs = [{args}]\n{restart}"),
    );
    m
}

#[test]
fn shipped_manifest_runs_all_six_sandboxed_and_live_audit_passes() {
    if !sandbox_available("shipped_manifest_runs_all_six_sandboxed_and_live_audit_passes") {
        return;
    }
    let inst = Instance::start("six", &shipped(), SERVICES.len());
    let rows = inst.ps().unwrap();
    for name in SERVICES {
        let row = rows.iter().find(|r| r["name"] == name).expect("row");
        assert_eq!(row["state"], "running", "{row}");
        assert_eq!(
            row["namespaces"],
            serde_json::json!(["mnt", "pid", "net", "ipc", "uts"]),
            "{name} lacks namespaces"
        );
    }
    let out = inst.pv(&["audit", "--live"]);
    assert!(
        out.status.success(),
        "live audit failed on a fresh instance:\n{}",
        text(&out)
    );
    // Each service's root is empty of host files and its environment is clean.
    let pid = inst.pid("vmgs");
    assert!(
        std::fs::read_dir(format!("/proc/{pid}/root/etc")).is_err(),
        "service sees /etc"
    );
    assert!(
        std::fs::read_dir(format!("/proc/{pid}/root/proc")).is_err(),
        "service sees /proc"
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        environ.is_empty(),
        "service environment is not clean: {environ:?}"
    );
}

/// "device inode" of the file process `pid` maps at `path`.
fn mapped_file(pid: i32, path: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .ok()?
        .lines()
        .find(|l| l.ends_with(path))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            format!("{} {}", f[3], f[4])
        })
}

/// As root, the services' libraries are one read-only copy (the spawner's library store)
/// that every root binds from, not one copy per service; the host never sees the store.
#[test]
fn services_share_one_read_only_copy_of_their_libraries() {
    let test = "services_share_one_read_only_copy_of_their_libraries";
    // (Root, as the store needs: unprivileged runs copy.)
    if !sandbox_available(test) {
        return;
    }
    let inst = Instance::start("store", &shipped(), SERVICES.len());
    let libc_path = "/lib/x86_64-linux-gnu/libc.so.6";
    let files: Vec<String> = SERVICES
        .iter()
        .map(|s| mapped_file(inst.pid(s), libc_path).unwrap_or_else(|| panic!("{s} maps no libc")))
        .collect();
    assert!(
        files.iter().all(|f| f == &files[0]),
        "one libc for all: {files:?}"
    );
    // Read-only, in the service's view, and bound from the store.
    let pid = inst.pid("vtpm");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let libc_mount = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some(libc_path))
        .unwrap_or_else(|| panic!("libc is not a mount of its own:\n{mountinfo}"));
    assert!(
        libc_mount.contains(" ro,") && libc_mount.contains("pv-library-store"),
        "{libc_mount}"
    );
    // Nothing of it on the host.
    let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !host.contains("pv-library-store"),
        "the store is visible on the host"
    );
    let out = inst.pv(&["audit", "--live"]);
    assert!(out.status.success(), "{}", text(&out));
    // A restarted service binds the same copy.
    let before = mapped_file(inst.pid("vmgs"), libc_path);
    let out = inst.pv(&["restart", "vmgs"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(mapped_file(inst.pid("vmgs"), libc_path), before);
}

#[test]
fn live_audit_fails_when_a_service_differs_from_the_manifest() {
    if !sandbox_available("live_audit_fails_when_a_service_differs_from_the_manifest") {
        return;
    }
    let inst = Instance::start("drift", &shipped(), SERVICES.len());
    let pid = inst.pid("storage");
    // As the service's own uid: changing another user's limits takes CAP_SYS_RESOURCE,
    // which root may lack (a container's bounding set), and the service is not root.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let id = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .unwrap()
            .to_string()
    };
    let status = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            &id("Uid:"),
            "--regid",
            &id("Gid:"),
            "--clear-groups",
        ])
        .args(["prlimit", "--pid", &pid.to_string(), "--nofile=20:20"])
        .status()
        .expect("setpriv and prlimit (util-linux) are installed");
    assert!(status.success());
    let out = inst.pv(&["audit", "--live"]);
    assert!(
        !out.status.success(),
        "live audit missed a changed limit:\n{}",
        text(&out)
    );
    assert!(
        text(&out).contains("storage: Max open files is 20"),
        "{}",
        text(&out)
    );
}

#[test]
fn service_without_capability_cannot_reach_an_endpoint() {
    if !sandbox_available("service_without_capability_cannot_reach_an_endpoint") {
        return;
    }
    let inst = Instance::start("caps", &shipped(), SERVICES.len());
    let out = inst.pv(&["probe", "vtpm", "vmgs"]);
    assert!(text(&out).contains("reached"), "{}", text(&out));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    for (svc, ep) in [
        ("attest", "vtpm"),
        ("storage", "vmgs"),
        ("net", "vtpm"),
        ("vmgs", "vtpm"),
    ] {
        let out = inst.pv(&["probe", svc, ep]);
        assert!(
            text(&out).contains("no capability"),
            "{svc} -> {ep}: {}",
            text(&out)
        );
        // A script tells "not granted" by the exit status alone.
        assert_eq!(out.status.code(), Some(3), "{svc} -> {ep}: {}", text(&out));
    }
    // Could not probe at all: 1.
    let out = inst.pv(&["probe", "nobody", "vmgs"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[test]
fn a_probe_of_an_endpoint_that_never_answers_times_out_with_exit_4() {
    if !sandbox_available("a_probe_of_an_endpoint_that_never_answers_times_out_with_exit_4") {
        return;
    }
    let mut m = service(
        "deaf",
        "pv-hostile",
        &format!("serves = [\"storage\"]\nargs = [\"deaf\"]\nwatchdog = \"1h\"\n{RESTART_NEVER}"),
    );
    m += &service(
        "caller",
        "pv-hostile",
        &format!("calls = [{{ endpoint = \"storage\" }}]\nargs = [\"serve\"]\n{RESTART_NEVER}"),
    );
    let inst = Instance::start("deaf", &m, 2);
    let out = inst.pv(&["probe", "caller", "storage"]);
    assert!(text(&out).contains("timed out"), "{}", text(&out));
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
}

#[test]
fn forged_slot_number_gets_an_error() {
    if !sandbox_available("forged_slot_number_gets_an_error") {
        return;
    }
    // Slot 40 is not open in the service; slot 4 is its status page, not a channel.
    for slot in ["40", "4"] {
        let inst = Instance::start(
            "forge",
            &with_hostile(&format!("\"forge-slot\", \"{slot}\""), RESTART_NEVER),
            2,
        );
        inst.wait_until(Duration::from_secs(20), |rows| {
            rows.iter()
                .any(|r| r["name"] == "hostile" && r["state"] != "starting")
        });
        let row = inst.row("hostile");
        assert!(
            row["last_exit"].to_string().contains("exited cleanly"),
            "slot {slot}: {row}\n{}",
            inst.log()
        );
        assert!(
            inst.log().contains(&format!("forged slot {slot} refused")),
            "{}",
            inst.log()
        );
    }
}

#[test]
fn opening_a_file_kills_the_service_and_is_reported() {
    if !sandbox_available("opening_a_file_kills_the_service_and_is_reported") {
        return;
    }
    let inst = Instance::start("openf", &with_hostile("\"open-file\"", RESTART_NEVER), 2);
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter()
            .any(|r| r["name"] == "hostile" && r["state"] == "failed")
    });
    let exit = inst.row("hostile")["last_exit"].to_string();
    assert!(
        exit.contains("policy violation") && exit.contains("openat"),
        "{exit}"
    );
    assert_eq!(inst.row("vmgs")["state"], "running");
}

#[test]
fn opening_a_socket_kills_the_service_and_is_reported() {
    if !sandbox_available("opening_a_socket_kills_the_service_and_is_reported") {
        return;
    }
    let inst = Instance::start("sock", &with_hostile("\"socket\"", RESTART_NEVER), 2);
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter()
            .any(|r| r["name"] == "hostile" && r["state"] == "failed")
    });
    let exit = inst.row("hostile")["last_exit"].to_string();
    assert!(
        exit.contains("policy violation") && exit.contains("socket"),
        "{exit}"
    );
}

#[test]
fn kill_9_of_any_service_restarts_it_with_a_new_epoch_and_requests_succeed() {
    if !sandbox_available("kill_9_of_any_service_restarts_it_with_a_new_epoch_and_requests_succeed")
    {
        return;
    }
    let inst = Instance::start("kill9", &shipped(), SERVICES.len());
    for name in SERVICES {
        let before = inst.row(name);
        let old_pid = before["pid"].as_i64().unwrap();
        let old_epochs = before["epochs"].clone();
        let out = inst.pv(&["kill", name, "--signal", "KILL"]);
        assert!(out.status.success(), "{}", text(&out));
        inst.wait_until(Duration::from_secs(20), |rows| {
            rows.iter().any(|r| {
                r["name"] == name && r["state"] == "running" && r["pid"].as_i64() != Some(old_pid)
            })
        });
        let after = inst.row(name);
        assert_eq!(after["restarts"], before["restarts"].as_u64().unwrap() + 1);
        assert!(
            after["last_exit"].to_string().contains("SIGKILL"),
            "{after}"
        );
        // Every channel it serves moved to a later epoch.
        for (old, new) in old_epochs
            .as_array()
            .unwrap()
            .iter()
            .zip(after["epochs"].as_array().unwrap())
        {
            assert!(
                new[1].as_u64() > old[1].as_u64(),
                "{name}: epoch {old} -> {new}"
            );
        }
    }
    // Requests across the restarted services succeed.
    for (svc, ep) in [
        ("vtpm", "vmgs"),
        ("attest", "vmgs"),
        ("intercept", "vtpm"),
        ("intercept", "storage"),
        ("intercept", "net"),
    ] {
        let out = inst.pv(&["probe", svc, ep]);
        assert!(
            text(&out).contains("reached"),
            "{svc} -> {ep}: {}",
            text(&out)
        );
    }
    let out = inst.pv(&["audit", "--live"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn crash_loop_ends_in_failed_while_the_others_keep_serving() {
    if !sandbox_available("crash_loop_ends_in_failed_while_the_others_keep_serving") {
        return;
    }
    let restart =
        "restart = { policy = \"on-failure\", max = 3, window = \"60s\", backoff = \"5ms\" }";
    let inst = Instance::start("loop", &with_hostile("\"crash\"", restart), 2);
    inst.wait_until(Duration::from_secs(30), |rows| {
        rows.iter()
            .any(|r| r["name"] == "hostile" && r["state"] == "failed")
    });
    let row = inst.row("hostile");
    assert_eq!(row["restarts"], 3, "{row}");
    assert!(row["last_exit"].to_string().contains("crash loop"), "{row}");
    let out = inst.pv(&["probe", "attest", "vmgs"]);
    assert!(text(&out).contains("reached"), "{}", text(&out));
}

#[test]
fn peer_dying_mid_frame_does_not_hang_or_crash_the_survivor() {
    if !sandbox_available("peer_dying_mid_frame_does_not_hang_or_crash_the_survivor") {
        return;
    }
    let inst = Instance::start(
        "torn",
        &with_hostile("\"torn-frame\", \"vmgs\"", RESTART_NEVER),
        2,
    );
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter()
            .any(|r| r["name"] == "hostile" && r["state"] == "failed")
    });
    let exit = inst.row("hostile")["last_exit"].to_string();
    assert!(exit.contains("SIGABRT"), "{exit}");
    let vmgs = inst.row("vmgs");
    assert_eq!(vmgs["state"], "running");
    assert_eq!(vmgs["restarts"], 0, "vmgs crashed: {vmgs}");
    let out = inst.pv(&["probe", "attest", "vmgs"]);
    assert!(text(&out).contains("reached"), "{}", text(&out));
}

#[test]
fn malformed_and_oversized_frames_get_typed_errors() {
    if !sandbox_available("malformed_and_oversized_frames_get_typed_errors") {
        return;
    }
    let inst = Instance::start(
        "garbage",
        &with_hostile("\"garbage\", \"vmgs\"", RESTART_NEVER),
        2,
    );
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter()
            .any(|r| r["name"] == "hostile" && r["state"] != "running" && r["state"] != "starting")
    });
    let row = inst.row("hostile");
    assert!(
        row["last_exit"].to_string().contains("exited cleanly"),
        "{row}\n{}",
        inst.log()
    );
    assert_eq!(inst.row("vmgs")["restarts"], 0);
}

#[test]
fn sigterm_and_sigint_stop_everything_cleanly() {
    if !sandbox_available("sigterm_and_sigint_stop_everything_cleanly") {
        return;
    }
    for signal in ["-TERM", "-INT"] {
        let mut inst = Instance::start("stop", &shipped(), SERVICES.len());
        let pids: Vec<i32> = SERVICES.iter().map(|s| inst.pid(s)).collect();
        let child = inst.child.as_ref().unwrap().id();
        std::process::Command::new("kill")
            .args([signal, &child.to_string()])
            .status()
            .unwrap();
        let status = {
            let c = inst.child.as_mut().unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(s) = c.try_wait().unwrap() {
                    break s;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "did not stop on {signal}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        inst.child = None;
        assert_eq!(status.code(), Some(0), "{signal}: {}", inst.log());
        for pid in pids {
            assert!(
                !alive(pid),
                "{signal}: service pid {pid} outlived the paravisor"
            );
        }
    }
}

#[test]
fn hung_service_is_killed_by_the_watchdog_and_reported() {
    if !sandbox_available("hung_service_is_killed_by_the_watchdog_and_reported") {
        return;
    }
    let m = with_hostile("\"hang\"", &format!("{RESTART_NEVER}\nwatchdog = \"2s\""));
    let inst = Instance::start("hang", &m, 3);
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter()
            .any(|r| r["name"] == "hostile" && r["state"] == "failed")
    });
    let exit = inst.row("hostile")["last_exit"].to_string();
    assert!(
        exit.contains("unresponsive") && exit.contains("watchdog 2s"),
        "{exit}"
    );
    let out = inst.pv(&["probe", "attest", "vmgs"]);
    assert!(text(&out).contains("reached"), "{}", text(&out));
}

#[test]
fn kill_with_term_is_reported_as_sigterm_despite_the_pid_namespace() {
    if !sandbox_available("kill_with_term_is_reported_as_sigterm_despite_the_pid_namespace") {
        return;
    }
    let inst = Instance::start("term", &shipped(), SERVICES.len());
    let old = inst.pid("net");
    let out = inst.pv(&["kill", "net", "--signal", "TERM"]);
    assert!(out.status.success(), "{}", text(&out));
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter()
            .any(|r| r["name"] == "net" && r["last_exit"].is_string())
    });
    let row = inst.row("net");
    assert!(row["last_exit"].to_string().contains("SIGTERM"), "{row}");
    // net restarts on failure only: a death by signal is a failure.
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter().any(|r| {
            r["name"] == "net" && r["state"] == "running" && r["pid"].as_i64() != Some(old as i64)
        })
    });
}

#[test]
fn a_client_scribbling_over_the_channel_header_cannot_stop_its_server_restarting() {
    if !sandbox_available(
        "a_client_scribbling_over_the_channel_header_cannot_stop_its_server_restarting",
    ) {
        return;
    }
    let inst = Instance::start(
        "scribble",
        &with_hostile("\"scribble\", \"vmgs\"", RESTART_NEVER),
        3,
    );
    let old = inst.pid("vmgs");
    let out = inst.pv(&["kill", "vmgs"]);
    assert!(out.status.success(), "{}", text(&out));
    inst.wait_until(Duration::from_secs(20), |rows| {
        rows.iter().any(|r| {
            r["name"] == "vmgs" && r["state"] == "running" && r["pid"].as_i64() != Some(old as i64)
        })
    });
    assert_eq!(inst.row("vmgs")["restarts"], 1, "{}", inst.log());
    let out = inst.pv(&["probe", "attest", "vmgs"]);
    assert!(text(&out).contains("reached"), "{}", text(&out));
    let out = inst.pv(&["probe", "hostile", "vmgs"]);
    assert!(text(&out).contains("reached"), "{}", text(&out));
}

#[test]
fn ctrl_c_to_the_whole_process_group_stops_the_services_in_order() {
    if !sandbox_available("ctrl_c_to_the_whole_process_group_stops_the_services_in_order") {
        return;
    }
    let mut inst = Instance::start("ctrlc", &shipped(), SERVICES.len());
    let group = inst.child.as_ref().unwrap().id();
    // What a terminal does on Ctrl-C: SIGINT to every process of the foreground group.
    std::process::Command::new("kill")
        .args(["-INT", "--", &format!("-{group}")])
        .status()
        .unwrap();
    let c = inst.child.as_mut().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = c.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "did not stop on Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    inst.child = None;
    assert_eq!(status.code(), Some(0));
    // The services are in sessions of their own: they were asked to stop, not interrupted.
    let log = inst.log();
    for name in SERVICES {
        assert!(
            log.contains(&format!("service{{name={name}}}: shut down on request")),
            "{name} was not shut down in order:\n{log}"
        );
    }
    // Clients have exited before the services they call are asked to stop (CI once caught
    // a vTPM, stopped during its attestation binding, left waiting on an attest service
    // that had been stopped under it, and killed).
    let at = |name: &str| {
        log.find(&format!("service{{name={name}}}: shut down on request"))
            .unwrap()
    };
    for (client, server) in [
        ("tpm-gateway", "vtpm"),
        ("intercept", "vtpm"),
        ("vtpm", "attest"),
        ("vtpm", "vmgs"),
        ("attest", "vmgs"),
    ] {
        assert!(
            at(client) < at(server),
            "{client} stopped after {server}, which it calls:\n{log}"
        );
    }
    assert!(!log.contains("did not stop in time"), "{log}");
}

/// Commands that wait on a service run on the control thread: while `attest report` waits
/// for a stopped attest service, the supervisor's loop still answers `ps` (which shows the
/// command under way), and the report completes once the service runs again.
#[test]
fn the_supervisor_answers_while_a_control_command_waits_on_a_stopped_service() {
    if !sandbox_available(
        "the_supervisor_answers_while_a_control_command_waits_on_a_stopped_service",
    ) {
        return;
    }
    let mut inst = Instance::start("waiting", &shipped(), SERVICES.len());
    let attest = inst.pid("attest");
    let stop = |sig: &str| {
        let out = std::process::Command::new("kill")
            .args([sig, &attest.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "kill {sig}: {}", text(&out));
    };
    stop("-STOP");
    let out_file = inst.dir.join("report.bin");
    let state_dir = inst.state_dir();
    let mut report = common::spawn_of(
        std::process::Command::new(common::paravisor())
            .args([
                "attest",
                "report",
                "--nonce",
                "00112233",
                "--out",
                out_file.to_str().unwrap(),
                "--state-dir",
                &state_dir,
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    // `ps` answers while the report waits, and names it. The report waits for the attest
    // service's answer (up to its timeout, or until the watchdog restarts the service), so
    // the loop polls without pausing.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let seen = loop {
        let out = inst.pv(&["ps"]);
        let t = text(&out);
        if t.contains("control thread: attest report (running") {
            break t;
        }
        assert!(
            report.try_wait().unwrap().is_none(),
            "the report ended before ps showed it under way: {}\n{t}",
            inst.log()
        );
        assert!(std::time::Instant::now() < deadline, "{t}\n{}", inst.log());
    };
    assert!(seen.contains("attest"), "{seen}");
    stop("-CONT");
    let status = report.wait().unwrap();
    // Once answered (or refused after a restart), the thread is free: `ps` says nothing
    // under way.
    let t = text(&inst.pv(&["ps"]));
    assert!(!t.contains("control thread:"), "{t}");
    if status.success() {
        assert_eq!(
            std::fs::metadata(&out_file).unwrap().len(),
            0x4A0,
            "a whole report"
        );
    }
    assert_eq!(inst.stop().code(), Some(0), "{}", inst.log());
}

/// pv-net holds frames only: no channel to the vTPM, VMGS, storage or attest (probes through
/// its own capabilities fail as "no capability"), and `audit` says so (no calls, a TAP with
/// no socket and no ioctl).
#[test]
fn net_can_reach_no_tpm_vmgs_storage_or_attest() {
    if !sandbox_available("net_can_reach_no_tpm_vmgs_storage_or_attest") {
        return;
    }
    let inst = Instance::start("net-isolation", &shipped(), SERVICES.len());
    for ep in ["vtpm", "vmgs", "storage", "attest"] {
        let out = inst.pv(&["probe", "net", ep]);
        assert_eq!(out.status.code(), Some(3), "net -> {ep}: {}", text(&out));
        assert!(
            text(&out).contains("no capability"),
            "net -> {ep}: {}",
            text(&out)
        );
    }
    let out = inst.pv(&["audit", "--json", inst.manifest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).expect("audit json");
    let rows = audit["services"]
        .as_array()
        .or(audit.as_array())
        .expect("rows");
    let net = rows
        .iter()
        .find(|r| r["service"] == "net")
        .expect("net's row");
    assert_eq!(net["calls"], serde_json::json!([]), "{net}");
    assert_eq!(
        net["taps"],
        serde_json::json!([{ "name": "net0" }]),
        "{net}"
    );
    let syscalls = net.to_string();
    assert!(
        !syscalls.contains("\"ioctl\"") && !syscalls.contains("\"socket\""),
        "{net}"
    );
    // Its partition function: its own PCI device, BAR, line and doorbells, DMA into the
    // shared window only, and one checkpoint region.
    assert_eq!(net["dma"]["kind"], "shared-window", "{net}");
    assert_eq!(
        net["interrupts"],
        serde_json::json!([{ "line": 11 }]),
        "{net}"
    );
    assert_eq!(
        net["mmio"],
        serde_json::json!([{ "base": 0xfe00_4000u64, "size": 0x4000 }]),
        "{net}"
    );
    assert_eq!(
        net["doorbells"],
        serde_json::json!({ "base": 0xfe00_7000u64, "size": 8 }),
        "{net}"
    );
    assert_eq!(
        net["regions"],
        serde_json::json!([{ "name": "net-checkpoint", "size": 65536 }]),
        "{net}"
    );
}
