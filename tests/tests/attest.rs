//! Attestation evidence from the simulated platform, checked as a remote verifier checks it:
//! `paravisor attest verify` (sev crate) and, independently, `openssl verify` for the chain.

mod common;

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;

use common::*;

fn run(args: &[&str]) -> (bool, String) {
    let out = pv(args);
    (out.status.success(), text(&out))
}

/// A provisioned platform, its chain in `certs`, and the pinned ARK fingerprint.
struct Platform {
    dir: PathBuf,
    certs: PathBuf,
    fingerprint: String,
}

fn platform(root: &Path, name: &str) -> Platform {
    let dir = root.join(name);
    let certs = root.join(format!("{name}-certs"));
    let (ok, out) = run(&["platform", "init", "--platform-dir", dir.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("SIMULATED"), "{out}");
    let (ok, out) = run(&[
        "attest",
        "certs",
        "--platform-dir",
        dir.to_str().unwrap(),
        "--out",
        certs.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, fingerprint) = run(&["attest", "fingerprint", "--certs", certs.to_str().unwrap()]);
    assert!(ok, "{fingerprint}");
    Platform {
        dir,
        certs,
        fingerprint: fingerprint.trim().to_string(),
    }
}

fn report(p: &Platform, nonce: &str, measurement: &str, out: &Path) {
    let (ok, text) = run(&[
        "platform",
        "report",
        "--platform-dir",
        p.dir.to_str().unwrap(),
        "--nonce",
        nonce,
        "--measurement",
        measurement,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
}

fn verify(report: &Path, certs: &Path, fingerprint: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "attest",
        "verify",
        report.to_str().unwrap(),
        "--certs",
        certs.to_str().unwrap(),
        "--ark-fingerprint",
        fingerprint,
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn reports_verify_and_every_tampering_is_refused_with_its_reason() {
    let root = scratch_dir("attest");
    let a = platform(&root, "a");
    let b = platform(&root, "b");
    let m = "ab".repeat(48);
    let r = root.join("r.bin");
    report(&a, "c0ffee", &m, &r);
    assert_eq!(std::fs::metadata(&r).unwrap().len(), 0x4A0);

    // Good: pinned ARK, chain, signature, measurement, nonce.
    let (ok, out) = verify(
        &r,
        &a.certs,
        &a.fingerprint,
        &["--expected-measurement", &m, "--nonce", "c0ffee"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("report verified"), "{out}");

    // An independent verifier accepts the chain: OpenSSL, strict.
    if Command::new("openssl").arg("version").output().is_ok() {
        let out = Command::new("openssl")
            .args(["verify", "-x509_strict", "-CAfile"])
            .arg(a.certs.join("ark.pem"))
            .arg("-untrusted")
            .arg(a.certs.join("ask.pem"))
            .arg(a.certs.join("vcek.pem"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
    } else {
        eprintln!("SKIPPED: openssl not installed; the independent chain check did not run");
    }

    // A flipped bit anywhere in the signed part.
    let bytes = std::fs::read(&r).unwrap();
    for at in [0x08usize, 0x50, 0x90, 0xC0, 0x180, 0x1A0, 0x29F] {
        let bad = root.join(format!("flip-{at:x}.bin"));
        let mut v = bytes.clone();
        v[at] ^= 0x04;
        std::fs::write(&bad, v).unwrap();
        let (ok, out) = verify(&bad, &a.certs, &a.fingerprint, &[]);
        assert!(!ok, "flip at {at:#x} accepted");
        assert!(out.contains("REFUSED"), "{out}");
    }
    // A non-zero reserved byte (outside the signature's reach too).
    let mut v = bytes.clone();
    v[0x400] = 1;
    let bad = root.join("reserved.bin");
    std::fs::write(&bad, v).unwrap();
    let (ok, out) = verify(&bad, &a.certs, &a.fingerprint, &[]);
    assert!(!ok && out.contains("reserved bytes"), "{out}");
    // A report signed by another platform, checked against this chain.
    let rb = root.join("rb.bin");
    report(&b, "c0ffee", &m, &rb);
    let (ok, out) = verify(&rb, &a.certs, &a.fingerprint, &[]);
    assert!(!ok && out.contains("signature does not verify"), "{out}");
    // A chain with a different ARK, while the verifier pins ours.
    let (ok, out) = verify(&rb, &b.certs, &a.fingerprint, &[]);
    assert!(!ok && out.contains("fingerprint"), "{out}");
    // Our pinned ARK with another platform's ASK.
    let mixed = root.join("mixed");
    std::fs::create_dir_all(&mixed).unwrap();
    std::fs::copy(a.certs.join("ark.pem"), mixed.join("ark.pem")).unwrap();
    std::fs::copy(b.certs.join("ask.pem"), mixed.join("ask.pem")).unwrap();
    std::fs::copy(b.certs.join("vcek.pem"), mixed.join("vcek.pem")).unwrap();
    let (ok, out) = verify(&rb, &mixed, &a.fingerprint, &[]);
    assert!(!ok && out.contains("chain does not verify"), "{out}");
    // Another measurement (a changed binary) and an old nonce.
    let other = "ac".repeat(48);
    let (ok, out) = verify(
        &r,
        &a.certs,
        &a.fingerprint,
        &["--expected-measurement", &other],
    );
    assert!(!ok && out.contains("measurement mismatch"), "{out}");
    let (ok, out) = verify(&r, &a.certs, &a.fingerprint, &["--nonce", "c0ffef"]);
    assert!(!ok && out.contains("report_data mismatch"), "{out}");
    // Truncated.
    let short = root.join("short.bin");
    std::fs::write(&short, &bytes[..0x2A0]).unwrap();
    let (ok, out) = verify(&short, &a.certs, &a.fingerprint, &[]);
    assert!(!ok && out.contains("not 1184"), "{out}");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn the_measurement_a_verifier_recomputes_from_the_manifest_matches_the_launch() {
    let root = scratch_dir("attest-measure");
    let a = platform(&root, "a");
    // What `paravisor run` would measure for the shipped manifest and the test guest.
    let (ok, json) = run(&["measure", shipped_manifest().to_str().unwrap(), "--json"]);
    assert!(ok, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let m = v["measurement"].as_str().unwrap().to_string();
    let r = root.join("r.bin");
    report(&a, "01", &m, &r);
    let (ok, out) = verify(
        &r,
        &a.certs,
        &a.fingerprint,
        &["--manifest", shipped_manifest().to_str().unwrap()],
    );
    assert!(ok, "{out}");
    // A verifier holding only the launch log recomputes the measurement from it; a log that
    // lies about one length gives another measurement.
    let log = root.join("launch-log.json");
    std::fs::write(&log, &json).unwrap();
    let (ok, out) = verify(
        &r,
        &a.certs,
        &a.fingerprint,
        &["--launch-log", log.to_str().unwrap()],
    );
    assert!(ok, "{out}");
    assert!(out.contains("vcpu-state"), "{out}");
    let mut lie = v.clone();
    lie["entries"][1]["length"] =
        serde_json::json!(lie["entries"][1]["length"].as_u64().unwrap() + 1);
    let lie_path = root.join("lie.json");
    std::fs::write(&lie_path, serde_json::to_vec(&lie).unwrap()).unwrap();
    let (ok, out) = verify(
        &r,
        &a.certs,
        &a.fingerprint,
        &["--launch-log", lie_path.to_str().unwrap()],
    );
    assert!(!ok && out.contains("measurement mismatch"), "{out}");
    // The same report against another guest command line: a different launch.
    let (ok, out) = verify(
        &r,
        &a.certs,
        &a.fingerprint,
        &[
            "--manifest",
            shipped_manifest().to_str().unwrap(),
            "--cmdline",
            "extends=3",
        ],
    );
    assert!(!ok && out.contains("measurement mismatch"), "{out}");
    let _ = std::fs::remove_dir_all(root);
}

/// Genuine AMD evidence (tests/fixtures/amd-milan: AMD's Milan ARK/ASK, a VCEK from AMD's KDS
/// and a version 2 report it signed): our verifier accepts what real hardware produced, and
/// refuses it when a bit changes or when the pinned root is another.
#[test]
fn genuine_amd_milan_evidence_verifies() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/amd-milan");
    let certs = dir.to_str().unwrap();
    let (ok, fp) = run(&["attest", "fingerprint", "--certs", certs]);
    assert!(ok, "{fp}");
    assert_eq!(
        fp.trim(),
        "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        "AMD's Milan ARK"
    );
    let report = dir.join("report.bin");
    let (ok, out) = run(&[
        "attest",
        "verify",
        report.to_str().unwrap(),
        "--certs",
        certs,
        "--ark-fingerprint",
        fp.trim(),
    ]);
    assert!(ok, "{out}");
    assert!(out.contains("version 2"), "{out}");
    let scratch = scratch_dir("amd");
    let mut bad = std::fs::read(&report).unwrap();
    bad[0x90] ^= 1;
    let bad_path = scratch.join("bad.bin");
    std::fs::write(&bad_path, &bad).unwrap();
    let (ok, out) = run(&[
        "attest",
        "verify",
        bad_path.to_str().unwrap(),
        "--certs",
        certs,
        "--ark-fingerprint",
        fp.trim(),
    ]);
    assert!(!ok && out.contains("signature"), "{out}");
    let (ok, out) = run(&[
        "attest",
        "verify",
        report.to_str().unwrap(),
        "--certs",
        certs,
        "--ark-fingerprint",
        &"00".repeat(32),
    ]);
    assert!(!ok && out.contains("fingerprint"), "{out}");
    let _ = std::fs::remove_dir_all(scratch);
}
