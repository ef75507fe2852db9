//! `pv-tools` is reached through `paravisor`: the same command line, the same exit codes.
//! (Its commands themselves are tested through `paravisor` in pv-tests.)

use std::path::PathBuf;
use std::process::Command;

fn bin(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().unwrap();
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

#[test]
fn paravisor_hands_the_tools_commands_to_pv_tools() {
    let tools = bin("pv-tools");
    assert!(tools.is_file(), "{} is not built", tools.display());
    // A tool's usage error under `vmgs` is the vmgs tool's 64, whoever reports it.
    let out = Command::new(&tools)
        .args(["vmgs", "dump-headers"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    // A core command is refused by pv-tools itself (2), never run there.
    let out = Command::new(&tools).args(["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("run it as `paravisor`"), "{text}");
    // `attest fingerprint` through paravisor reaches the verifier (an empty directory has
    // no ARK to fingerprint: a failure that names it).
    let paravisor = bin("paravisor");
    if paravisor.is_file() {
        let empty = std::env::temp_dir().join(format!("pv-tools-empty-{}", std::process::id()));
        std::fs::create_dir_all(&empty).unwrap();
        let out = Command::new(&paravisor)
            .args(["attest", "fingerprint", "--certs"])
            .arg(&empty)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("ark.pem"), "{text}");
        let _ = std::fs::remove_dir_all(&empty);
    }
}
