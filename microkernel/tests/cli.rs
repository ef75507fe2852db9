//! The command line: every subcommand has help, and client commands without a running
//! instance say so clearly.

use std::process::Command;

fn pv(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_paravisor"))
        .args(args)
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .unwrap()
}

#[test]
fn every_subcommand_has_help() {
    for sub in ["check", "audit", "run", "ps", "kill", "probe", "stop"] {
        let out = pv(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help failed");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{sub}"
        );
    }
}

#[test]
fn check_and_audit_default_to_the_shipped_manifest() {
    let out = pv(&["check"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pv(&["audit", "--json"]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = doc["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["service"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "intercept",
            "vmgs",
            "attest",
            "vtpm",
            "tpm-gateway",
            "storage",
            "net"
        ]
    );
    let vtpm = &doc["services"][3];
    assert_eq!(vtpm["calls"], serde_json::json!(["vmgs", "attest"]));
    assert_eq!(
        vtpm["regions"],
        serde_json::json!([{ "name": "vtpm-checkpoint", "size": 256 * 1024 }])
    );
}

#[test]
fn client_commands_without_an_instance_say_so() {
    let out = pv(&["ps", "--state-dir", "/nonexistent-pv-state"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no paravisor is running"), "{err}");
}
