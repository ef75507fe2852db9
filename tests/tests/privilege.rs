//! Least privilege (issue 12 item 8): every service runs under a uid and gid of its own with
//! no capability in any set and locked securebits; no service can become root again, use a
//! capability or load a module; the microkernel's own threads run under seccomp filters of
//! their own; `audit` prints all of it and `audit --live` checks it, listing each check.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;
use std::time::Instant;

use common::alive;
use common::sandbox_available;
use common::service;
use common::text;
use common::Instance;
use common::RESTART_NEVER;

const SERVICES: [&str; 7] = [
    "intercept",
    "vmgs",
    "attest",
    "vtpm",
    "tpm-gateway",
    "storage",
    "net",
];

/// The value of `name` in `/proc/PID/status`, its whitespace collapsed.
fn status_field(pid: i32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

#[test]
fn every_service_runs_under_a_uid_of_its_own_with_no_capability_and_the_live_audit_lists_each_check(
) {
    if !sandbox_available("every_service_runs_under_a_uid_of_its_own_with_no_capability") {
        return;
    }
    let inst = Instance::start("ids", &common::shipped_text(), SERVICES.len());
    // What `paravisor audit --json` plans (the same plan `run` applied).
    let out = common::pv(&["audit", "--json", inst.manifest.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut uids = BTreeSet::new();
    let mut gids = BTreeSet::new();
    for name in SERVICES {
        let pid = inst.pid(name);
        let uid: Vec<u32> = status_field(pid, "Uid")
            .split(' ')
            .map(|n| n.parse().unwrap())
            .collect();
        let gid: Vec<u32> = status_field(pid, "Gid")
            .split(' ')
            .map(|n| n.parse().unwrap())
            .collect();
        // Real, effective, saved and file-system ids: one, not root's.
        assert!(
            uid.iter().all(|u| *u == uid[0] && *u != 0),
            "{name}: Uid {uid:?}"
        );
        assert!(
            gid.iter().all(|g| *g == gid[0] && *g != 0),
            "{name}: Gid {gid:?}"
        );
        assert_eq!(status_field(pid, "Groups"), "", "{name} has groups");
        for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
            assert_eq!(status_field(pid, set), "0000000000000000", "{name}: {set}");
        }
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "Seccomp"), "2");
        assert_eq!(status_field(pid, "Seccomp_filters"), "3", "{name}");
        // Not dumpable: no process of its uid may trace it or read its memory.
        let owner = std::fs::metadata(format!("/proc/{pid}/status"))
            .unwrap()
            .uid();
        assert_eq!(owner, 0, "{name} is dumpable");
        uids.insert(uid[0]);
        gids.insert(gid[0]);
        let row = audit["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["service"] == name)
            .unwrap();
        assert_eq!(row["uid"], uid[0], "{name}: audit plans {row}");
        assert_eq!(row["gid"], gid[0], "{name}: audit plans {row}");
        assert_eq!(row["ids"], "derived", "{row}");
        assert_eq!(row["groups"], serde_json::json!([]));
        assert_eq!(row["securebits"].as_array().unwrap().len(), 6, "{row}");
    }
    assert_eq!(uids.len(), SERVICES.len(), "uids shared: {uids:?}");
    assert_eq!(gids.len(), SERVICES.len(), "gids shared: {gids:?}");
    // The static audit prints the microkernel's thread filters too.
    let threads: Vec<&str> = audit["threads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["thread"].as_str().unwrap())
        .collect();
    assert_eq!(
        threads,
        ["spawner", "platform", "control", "supervisor", "vcpu"]
    );

    // The live audit passes and says what it compared, per service and per thread.
    let out = inst.pv(&["audit", "--live", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let live: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let checks = live["checks"].as_array().unwrap();
    for name in SERVICES {
        for what in [
            "Uid",
            "Gid",
            "Groups",
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Seccomp",
            "Seccomp_filters",
            "Dumpable",
        ] {
            let c = checks
                .iter()
                .find(|c| c["service"] == name && c["what"] == what)
                .unwrap_or_else(|| panic!("no {what} check of {name}: {live}"));
            assert_eq!(c["ok"], true, "{c}");
        }
    }
    for what in [
        "supervisor Seccomp_filters",
        "pv-spawner Seccomp_filters",
        "platform Seccomp_filters",
        "control Seccomp_filters",
    ] {
        let c = checks
            .iter()
            .find(|c| c["service"] == "paravisor" && c["what"] == what)
            .unwrap_or_else(|| panic!("no {what} check: {live}"));
        assert_eq!(c["ok"], true, "{c}");
    }
    let out = inst.pv(&["audit", "--live"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("vmgs:\n  ok    Uid = "), "{t}");
    assert!(t.contains("  ok    CapBnd = 0000000000000000"), "{t}");
    assert!(t.contains("  ok    supervisor Seccomp = 2"), "{t}");
    // And the microkernel's threads really are in filter mode.
    let paravisor = inst.child.as_ref().unwrap().id();
    for task in std::fs::read_dir(format!("/proc/{paravisor}/task")).unwrap() {
        let task = task.unwrap().path();
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        let status = std::fs::read_to_string(task.join("status")).unwrap();
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "thread {comm} has no filter:\n{status}"
        );
    }
}

#[test]
fn a_service_cannot_become_root_again_use_a_capability_or_load_a_module() {
    if !sandbox_available("a_service_cannot_become_root_again_use_a_capability_or_load_a_module") {
        return;
    }
    // The syscalls are granted, so that the kernel answers each attempt, not seccomp;
    // init_module no manifest can grant (the service is killed there).
    let m = service(
        "hostile",
        "pv-hostile",
        &format!(
            "serves = [\"storage\"]\nargs = [\"privileges\"]\nsyscalls = [\"setuid\", \"setresuid\", \"setresgid\", \"setgroups\", \"capset\", \"fchown\", \"fchmod\", \"socket\", \"prlimit64\", \"sethostname\", \"settimeofday\", \"openat\"]\n{RESTART_NEVER}"
        ),
    );
    let inst = Instance::start("privileges", &m, 0);
    inst.wait_until(Duration::from_secs(30), |rows| {
        rows.iter()
            .any(|r| r["name"] == "hostile" && r["state"] == "failed")
    });
    let log = inst.log();
    assert!(!log.contains("SUCCEEDED"), "{log}");
    assert!(
        log.contains("pv-hostile: read /proc/1/environ: refused (No such file or directory"),
        "{log}"
    );
    for op in [
        "SetUidRoot",
        "SetResUidRoot",
        "SetResGidRoot",
        "JoinGroupRoot",
        "RaiseAllCapabilities",
        "ChownNotOwned",
        "ChmodNotOwned",
        "RawSocket",
        "RaiseOpenFiles",
        "SetHostname",
        "SetClock",
    ] {
        assert!(
            log.contains(&format!(
                "pv-hostile: privilege {op}: refused (Operation not permitted"
            )),
            "{op} was not refused for want of privilege:\n{log}"
        );
    }
    let exit = inst.row("hostile")["last_exit"].to_string();
    assert!(
        exit.contains("policy violation") && exit.contains("init_module"),
        "{exit}\n{log}"
    );
}

#[test]
fn a_manifest_user_is_what_the_service_runs_as() {
    if !sandbox_available("a_manifest_user_is_what_the_service_runs_as") {
        return;
    }
    let m = format!(
        "{}{}",
        service(
            "storage",
            "pv-storage",
            &format!(
                "serves = [\"storage\"]\nuser = {{ uid = 61999, gid = 61998 }}\n{RESTART_NEVER}"
            )
        ),
        service(
            "net",
            "pv-net",
            &format!("serves = [\"net\"]\n{RESTART_NEVER}")
        )
    );
    let inst = Instance::start("user", &m, 2);
    let pid = inst.pid("storage");
    assert_eq!(status_field(pid, "Uid"), "61999 61999 61999 61999");
    assert_eq!(status_field(pid, "Gid"), "61998 61998 61998 61998");
    let net = inst.pid("net");
    let net_uid = status_field(net, "Uid");
    assert!(!net_uid.starts_with("61999 "), "{net_uid}");
    let out = common::pv(&["audit", inst.manifest.to_str().unwrap()]);
    assert!(
        text(&out).contains("runs as: uid 61999 gid 61998 (the manifest's `user`)"),
        "{}",
        text(&out)
    );
    let out = inst.pv(&["audit", "--live"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn services_die_with_the_microkernel_although_their_identity_changed() {
    if !sandbox_available("services_die_with_the_microkernel_although_their_identity_changed") {
        return;
    }
    // A change of uid clears the parent-death signal; the sandbox arms it again.
    let mut inst = Instance::start("orphans", &common::shipped_text(), SERVICES.len());
    let pids: Vec<i32> = SERVICES.iter().map(|s| inst.pid(s)).collect();
    let mut child = inst.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|p| alive(*p)) {
        assert!(
            Instant::now() < deadline,
            "services outlived a killed paravisor: {:?}",
            pids.iter().filter(|p| alive(**p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The measured library copies in a service's root are made by the sandbox child as root, and
/// read by the service under its own uid: an operator's restrictive umask must not make them
/// unreadable (every dynamically linked service would then fail at exec).
#[test]
fn services_start_under_a_restrictive_umask() {
    let test = "services_start_under_a_restrictive_umask";
    if !common::kvm_available(test) {
        return;
    }
    let dir = common::scratch_dir("umask");
    let manifest = dir.join("manifest.toml");
    std::fs::write(&manifest, common::shipped_text()).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("umask 077 && exec \"$@\"")
        .arg("sh")
        .arg(common::paravisor())
        .arg("run")
        .arg(&manifest)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--cmdline", "extends=0 interrupt=0 unowned=0"])
        .output()
        .unwrap();
    // The guest's TPM session needs vtpm, vmgs and attest up: exit status 0.
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("all checks passed"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(dir);
}

/// `audit --json` is data a script reads without parsing display strings: sizes, limits and
/// durations are numbers, ranges are `{base, size}`, grants and interrupts are structured.
#[test]
fn static_audit_json_gives_numbers_and_structured_ranges() {
    let out = common::pv(&[
        "audit",
        "--json",
        common::shipped_manifest().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |name: &str| {
        audit["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["service"] == name)
            .unwrap_or_else(|| panic!("no row for {name}"))
            .clone()
    };
    let vtpm = row("vtpm");
    assert_eq!(
        vtpm["mmio"],
        serde_json::json!([{ "base": 0xfed4_0000u64, "size": 0x5000 }])
    );
    assert_eq!(
        vtpm["regions"],
        serde_json::json!([{ "name": "vtpm-checkpoint", "size": 256 * 1024 }])
    );
    assert_eq!(vtpm["memory_bytes"], 128 << 20);
    assert_eq!(vtpm["open_files"], 32);
    assert_eq!(
        vtpm["restart"],
        serde_json::json!({ "policy": "always", "max": 5, "window_ms": 60_000, "backoff_ms": 50, "max_backoff_ms": 1_000 })
    );
    assert_eq!(vtpm["watchdog_ms"], 10_000);
    assert_eq!(
        vtpm["call_grants"][0],
        serde_json::json!({ "endpoint": "vmgs", "grant": { "kind": "file-ids", "file_ids": ["TPM_PPI", "TPM_NVRAM"] } })
    );
    assert!(vtpm["callers"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!({ "service": "intercept", "endpoint": "vtpm" })));
    let intercept = row("intercept");
    assert_eq!(
        intercept["pio"][0],
        serde_json::json!({ "base": 0x3f8, "size": 8 })
    );
    assert_eq!(intercept["interrupts"], serde_json::json!([{ "line": 4 }]));
    let gateway = row("tpm-gateway");
    assert_eq!(
        gateway["call_grants"][0]["grant"],
        serde_json::json!({ "kind": "vtpm", "command_localities": [0], "platform": true, "register_vcpus": 0 })
    );
    let vmgs = row("vmgs");
    assert_eq!(vmgs["files"][0]["access"], "read-write");
    assert_eq!(vmgs["keys"][0]["sealed"], true);
    assert_eq!(
        vmgs["capabilities"]["CapEff"],
        serde_json::json!([]),
        "{vmgs}"
    );
    // The text matrix is rendered from the same rows.
    let out = common::pv(&["audit", common::shipped_manifest().to_str().unwrap()]);
    let matrix = text(&out);
    assert!(matrix.contains("mmio:    0xfed40000+0x5000"), "{matrix}");
    assert!(
        matrix.contains("always (max 5 per 1m, back-off 50ms up to 1s)"),
        "{matrix}"
    );
    assert!(matrix.contains("vtpm-checkpoint (256K)"), "{matrix}");
}
