//! The simulated platform's SEV-SNP evidence, checked by AMD's own verifier `snpguest`
//! (virtee), which shares no code with `paravisor attest verify` but the sev crate's chain
//! check (and that with its OpenSSL backend, where we use the pure-Rust one).
//! The checks themselves are in `tests/scripts/snpguest_verify.sh`, runnable by hand.
//! Skipped, saying so, where snpguest is not installed (`tests/scripts/install-snpguest.sh`).

mod common;

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;

/// Where `install-snpguest.sh` puts it by default.
const DEFAULT_INSTALL: &str = "/work/tools/snpguest/bin/snpguest";

/// snpguest from `PV_SNPGUEST`, else the PATH, else the default install root.
fn find_snpguest() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PV_SNPGUEST") {
        return Some(PathBuf::from(p));
    }
    let in_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("snpguest"))
            .find(|p| p.is_file())
    });
    in_path.or_else(|| Some(PathBuf::from(DEFAULT_INSTALL)).filter(|p| p.is_file()))
}

fn script() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/snpguest_verify.sh"
    ))
}

#[test]
fn amds_snpguest_accepts_our_evidence_and_rejects_forged_or_foreign_reports() {
    let Some(snpguest) = find_snpguest() else {
        eprintln!("SKIPPED: snpguest not installed (run tests/scripts/install-snpguest.sh)");
        return;
    };
    let out = Command::new("bash")
        .arg(script())
        .arg(common::paravisor())
        .arg(&snpguest)
        .output()
        .expect("bash");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "snpguest ({}) did not judge our evidence as expected: the FAIL lines above say which check and why",
        snpguest.display()
    );
    assert!(
        stdout.contains(" passed, 0 failed") && !stdout.contains("FAIL "),
        "the script did not run to its summary line"
    );
}
