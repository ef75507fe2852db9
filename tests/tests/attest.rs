//! Attestation evidence from the simulated platform, checked as a remote verifier checks it:
//! `paravisor attest verify` (sev crate) and, independently, `openssl verify` for the chain.

mod common;

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;

use common::*;

/// A provisioned platform, its chain in `certs`, and the pinned ARK fingerprint.
struct Platform {
    dir: PathBuf,
    certs: PathBuf,
    fingerprint: String,
}

fn platform(root: &Path, name: &str) -> Platform {
    let dir = root.join(name);
    let certs = root.join(format!("{name}-certs"));
    let (ok, out) = pv_result(&["platform", "init", "--platform-dir", dir.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("SIMULATED"), "{out}");
    let (ok, out) = pv_result(&[
        "attest",
        "certs",
        "--platform-dir",
        dir.to_str().unwrap(),
        "--out",
        certs.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, fingerprint) =
        pv_result(&["attest", "fingerprint", "--certs", certs.to_str().unwrap()]);
    assert!(ok, "{fingerprint}");
    Platform {
        dir,
        certs,
        fingerprint: fingerprint.trim().to_string(),
    }
}

fn report(p: &Platform, nonce: &str, measurement: &str, out: &Path) {
    platform_report(&p.dir, nonce, measurement, out);
}

fn verify(report: &Path, certs: &Path, fingerprint: &str, extra: &[&str]) -> (bool, String) {
    pv_result(&verify_args(report, certs, fingerprint, extra))
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

/// `--json` on stdout as a value, and whether the command succeeded.
fn verify_json(report: &Path, p: &Platform, extra: &[&str]) -> (bool, serde_json::Value) {
    let mut args = vec![
        "attest",
        "verify",
        report.to_str().unwrap(),
        "--certs",
        p.certs.to_str().unwrap(),
        "--ark-fingerprint",
        &p.fingerprint,
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = pv(&args);
    let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    (out.status.success(), doc)
}

fn check_names(doc: &serde_json::Value) -> Vec<(String, bool)> {
    doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert!(c["detail"].as_str().is_some_and(|d| !d.is_empty()), "{c}");
            (
                c["name"].as_str().unwrap().to_string(),
                c["ok"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// The checks of a genuine report, in the order they are made.
const ALL_CHECKS: [&str; 13] = [
    "ark-fingerprint",
    "certificates",
    "ark-self-signed",
    "ask-signed-by-ark",
    "vcek-signed-by-ask",
    "chain",
    "report-size",
    "signature",
    "reserved-bytes",
    "report-format",
    "signature-sev",
    "vcek-tcb-and-chip",
    "measurement",
];

#[test]
fn verify_json_lists_every_check_made_and_its_result() {
    let root = scratch_dir("attest-json");
    let a = platform(&root, "a");
    let m = "ab".repeat(48);
    let r = root.join("r.bin");
    report(&a, "c0ffee", &m, &r);

    let (ok, doc) = verify_json(&r, &a, &["--expected-measurement", &m, "--nonce", "c0ffee"]);
    assert!(ok, "{doc:#}");
    assert_eq!(doc["verified"], true, "{doc:#}");
    let mut expected: Vec<(String, bool)> =
        ALL_CHECKS.iter().map(|n| (n.to_string(), true)).collect();
    expected.push(("report-data".into(), true));
    assert_eq!(check_names(&doc), expected);
    assert_eq!(doc["not_checked"], serde_json::json!([]));
    assert_eq!(doc["error"], serde_json::Value::Null);
    assert_eq!(doc["claims"]["measurement"], m);
    // 64-bit fields are hex strings: the report's own bytes.
    let bytes = std::fs::read(&r).unwrap();
    let tcb = u64::from_le_bytes(bytes[0x180..0x188].try_into().unwrap());
    assert_eq!(doc["claims"]["reported_tcb"], format!("{tcb:#018x}"));
    let policy = u64::from_le_bytes(bytes[0x08..0x10].try_into().unwrap());
    assert_eq!(doc["claims"]["policy"], format!("{policy:#018x}"));
    assert!(doc["claims"]["vmpl"].is_u64(), "{doc:#}");

    // Refused: the JSON still says what was checked, up to the check that failed.
    let (ok, doc) = verify_json(&r, &a, &["--expected-measurement", &"ac".repeat(48)]);
    assert!(!ok);
    assert_eq!(doc["verified"], false);
    let names = check_names(&doc);
    assert_eq!(names.last().unwrap(), &("measurement".to_string(), false));
    assert!(
        names[..names.len() - 1].iter().all(|(_, ok)| *ok),
        "{names:?}"
    );
    assert_eq!(doc["claims"], serde_json::Value::Null);
    assert!(
        doc["error"]
            .as_str()
            .unwrap()
            .contains("measurement mismatch"),
        "{doc:#}"
    );
    let pinned_elsewhere = Platform {
        fingerprint: "00".repeat(32),
        dir: a.dir.clone(),
        certs: a.certs.clone(),
    };
    let (ok, doc) = verify_json(&r, &pinned_elsewhere, &[]);
    assert!(!ok);
    assert_eq!(check_names(&doc), [("ark-fingerprint".to_string(), false)]);

    // Not strict: what was not checked is listed, and the report is accepted.
    let (ok, doc) = verify_json(&r, &a, &[]);
    assert!(ok, "{doc:#}");
    assert_eq!(doc["verified"], true);
    let not: Vec<&str> = doc["not_checked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(not, ["measurement", "nonce"]);
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn strict_verification_refuses_a_report_checked_without_measurement_or_nonce() {
    let root = scratch_dir("attest-strict");
    let a = platform(&root, "a");
    let m = "cd".repeat(48);
    let r = root.join("r.bin");
    report(&a, "0badcafe", &m, &r);
    let both = ["--expected-measurement", m.as_str(), "--nonce", "0badcafe"];
    let (ok, out) = verify(
        &r,
        &a.certs,
        &a.fingerprint,
        &[&both[..], &["--strict"]].concat(),
    );
    assert!(ok, "{out}");
    for (extra, missing) in [
        (vec!["--nonce", "0badcafe"], "measurement"),
        (vec!["--expected-measurement", m.as_str()], "nonce"),
        (vec![], "measurement"),
    ] {
        // Accepted with a warning without --strict, refused with it.
        let (ok, out) = verify(&r, &a.certs, &a.fingerprint, &extra);
        assert!(ok && out.contains("WARNING"), "{extra:?}: {out}");
        let mut strict = extra.clone();
        strict.push("--strict");
        let (ok, out) = verify(&r, &a.certs, &a.fingerprint, &strict);
        assert!(
            !ok && out.contains("REFUSED (--strict)"),
            "{strict:?}: {out}"
        );
        let (ok, doc) = verify_json(&r, &a, &strict);
        assert!(!ok);
        assert_eq!(doc["verified"], false);
        assert!(
            check_names(&doc).contains(&(missing.to_string(), false)),
            "{strict:?}: {doc:#}"
        );
        assert!(doc["claims"].is_object(), "the report itself is genuine");
    }
    // An empty nonce proves no freshness: refused under --strict although report_data
    // matches it.
    let empty = root.join("empty.bin");
    report(&a, "", &m, &empty);
    let (ok, out) = verify(
        &empty,
        &a.certs,
        &a.fingerprint,
        &["--expected-measurement", &m, "--nonce", ""],
    );
    assert!(ok, "{out}");
    let (ok, out) = verify(
        &empty,
        &a.certs,
        &a.fingerprint,
        &["--expected-measurement", &m, "--nonce", "", "--strict"],
    );
    assert!(!ok && out.contains("empty"), "{out}");
    let _ = std::fs::remove_dir_all(root);
}

#[test]
fn the_measurement_a_verifier_recomputes_from_the_manifest_matches_the_launch() {
    let root = scratch_dir("attest-measure");
    let a = platform(&root, "a");
    // What `paravisor run` would measure for the shipped manifest and the test guest.
    let (ok, json) = pv_result(&["measure", shipped_manifest().to_str().unwrap(), "--json"]);
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
    let (ok, fp) = pv_result(&["attest", "fingerprint", "--certs", certs]);
    assert!(ok, "{fp}");
    assert_eq!(
        fp.trim(),
        "69d063b45344d26a2e94e1f4210de49ef555308287d4c174445c95639a540bcd",
        "AMD's Milan ARK"
    );
    let report = dir.join("report.bin");
    let (ok, out) = pv_result(&[
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
    // Its REPORTED_TCB (microcode SPL 0x73 in the top byte) is above 2^53: a JSON number
    // would lose its low bits, the hex string keeps them.
    let out = pv(&[
        "attest",
        "verify",
        report.to_str().unwrap(),
        "--certs",
        certs,
        "--ark-fingerprint",
        fp.trim(),
        "--json",
    ]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        doc["claims"]["reported_tcb"], "0x7308000000000003",
        "{doc:#}"
    );
    let scratch = scratch_dir("amd");
    let mut bad = std::fs::read(&report).unwrap();
    bad[0x90] ^= 1;
    let bad_path = scratch.join("bad.bin");
    std::fs::write(&bad_path, &bad).unwrap();
    let (ok, out) = pv_result(&[
        "attest",
        "verify",
        bad_path.to_str().unwrap(),
        "--certs",
        certs,
        "--ark-fingerprint",
        fp.trim(),
    ]);
    assert!(!ok && out.contains("signature"), "{out}");
    let (ok, out) = pv_result(&[
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
