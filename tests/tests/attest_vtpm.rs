//! The vTPM's attestation binding end to end, as a guest and a remote verifier use it: the
//! report read from NV index 0x01400001 verifies against the platform's chain (and this
//! launch's log), the claims from 0x01400002 hash to its report data, the AK in the claims
//! is the key at 0x81000003, and quotes signed by that key check out with the verifier's
//! nonce and only with it. All through `tpm2-tools` on the mssim front end.

mod common;

use std::path::Path;
use std::process::Command;
use std::process::Output;
use std::process::Stdio;
use std::time::Duration;

use common::port;
use common::sandbox_available;
use common::scratch_dir;
use common::text;
use common::Instance;
use sha2::Digest;

/// Where an SNP report carries its REPORT_DATA.
const REPORT_DATA: usize = 0x50;
const REPORT_LEN: usize = 0x4A0;

fn tools_available(test: &str) -> bool {
    let ok = Command::new("tpm2_nvread")
        .arg("--version")
        .output()
        .is_ok()
        && Command::new("openssl").arg("version").output().is_ok();
    if !ok {
        eprintln!(
            "SKIPPED: {test}: needs tpm2-tools and openssl (apt-get install tpm2-tools openssl)"
        );
    }
    ok
}

/// A tpm2-tools command against our TPM, in `dir`.
fn tool(tcti: &str, dir: &Path, args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]))
}

fn ok(what: &str, o: Output) -> String {
    assert!(o.status.success(), "{what} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// base64url without padding (RFC 4648 section 5), as JWKs carry integers.
fn base64url_decode(s: &str) -> Vec<u8> {
    let value = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'-' => 62,
            b'_' => 63,
            _ => panic!("{:?} is not base64url", c as char),
        }
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        acc = (acc << 6) | value(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The modulus of a PEM public key (hex, lower case), as openssl reads it.
fn pem_modulus(dir: &Path, pem: &str) -> String {
    let out = ok(
        "openssl rsa -modulus",
        Command::new("openssl")
            .args(["rsa", "-pubin", "-in", pem, "-noout", "-modulus"])
            .current_dir(dir)
            .output()
            .expect("openssl"),
    );
    out.trim()
        .strip_prefix("Modulus=")
        .expect("Modulus=")
        .to_lowercase()
}

/// `paravisor run` of the shipped manifest (free ports) on a fresh state directory, with
/// its simulated platform in `platform/` of the instance's directory (created on first use).
/// Everything the test writes goes under that directory, removed when the instance drops.
fn run_with_platform(tag: &str) -> (Instance, String) {
    let manifest_text = common::shipped_text();
    let dir = scratch_dir(tag);
    let platform = dir.join("platform");
    let manifest = dir.join("manifest.toml");
    std::fs::write(&manifest, &manifest_text).expect("manifest");
    let log = std::fs::File::create(dir.join("paravisor.log")).expect("log");
    let child = Command::new(common::paravisor())
        .arg("run")
        .arg("--no-guest")
        .arg(&manifest)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--platform-dir")
        .arg(&platform)
        // tpm2-tools' mssim TCTI connects to the platform port too.
        .args(["--listen", "mssim-command", "--listen", "mssim-platform"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn paravisor run");
    let inst = Instance {
        dir,
        manifest,
        child: Some(child),
    };
    inst.wait_until(Duration::from_secs(30), |rows| {
        !rows.is_empty() && rows.iter().all(|r| r["state"] == "running")
    });
    (inst, manifest_text)
}

#[test]
fn the_vtpm_ak_is_bound_to_a_platform_report_and_its_quotes_verify() {
    let test = "the_vtpm_ak_is_bound_to_a_platform_report_and_its_quotes_verify";
    if !sandbox_available(test) || !tools_available(test) {
        return;
    }
    let (inst, manifest) = run_with_platform("attest-vtpm");
    let platform = inst.dir.join("platform");
    let work = inst.dir.join("work");
    std::fs::create_dir_all(&work).unwrap();
    inst.wait_for_vtpm_binding();
    let tcti = format!(
        "mssim:host=127.0.0.1,port={}",
        port(&manifest, "mssim-command")
    );
    let state = inst.state_dir();

    // The guest's view: the report and the claims, exactly as long as they are.
    ok(
        "tpm2_nvread 0x01400001",
        tool(
            &tcti,
            &work,
            &["tpm2_nvread", "0x01400001", "-o", "report.bin"],
        ),
    );
    let report = std::fs::read(work.join("report.bin")).unwrap();
    assert_eq!(report.len(), REPORT_LEN, "the raw report and nothing else");
    ok(
        "tpm2_nvread 0x01400002",
        tool(
            &tcti,
            &work,
            &["tpm2_nvread", "0x01400002", "-o", "claims.json"],
        ),
    );
    let claims = std::fs::read(work.join("claims.json")).unwrap();
    let hash = sha2::Sha256::digest(&claims);
    assert_eq!(
        &report[REPORT_DATA..REPORT_DATA + 32],
        hash.as_slice(),
        "the report's data is the claims' SHA-256"
    );
    assert_eq!(&report[REPORT_DATA + 32..REPORT_DATA + 64], &[0u8; 32]);

    // The verifier's view: the platform's chain, its pinned root, this launch's measurement
    // (recomputed from the launch log), and the report data.
    let certs = work.join("certs");
    let out = common::pv(&[
        "attest",
        "certs",
        "--platform-dir",
        platform.to_str().unwrap(),
        "--out",
        certs.to_str().unwrap(),
    ]);
    ok("paravisor attest certs", out);
    let fingerprint = ok(
        "paravisor attest fingerprint",
        common::pv(&["attest", "fingerprint", "--certs", certs.to_str().unwrap()]),
    );
    let launch_log = Path::new(&state).join("launch-log.json");
    let verify = |report: &Path, nonce: &str| {
        common::pv(&[
            "attest",
            "verify",
            report.to_str().unwrap(),
            "--certs",
            certs.to_str().unwrap(),
            "--ark-fingerprint",
            fingerprint.trim(),
            "--launch-log",
            launch_log.to_str().unwrap(),
            "--nonce",
            nonce,
        ])
    };
    let verified = ok(
        "paravisor attest verify",
        verify(&work.join("report.bin"), &hex(&hash)),
    );
    assert!(verified.contains("report verified"), "{verified}");
    // Claims that are not the ones reported are caught by the same check.
    let other = sha2::Sha256::digest(b"other claims");
    assert!(!verify(&work.join("report.bin"), &hex(&other))
        .status
        .success());

    // The claims name the AK and EK that the TPM holds.
    let json: serde_json::Value = serde_json::from_slice(&claims).expect("claims are JSON");
    let key = |kid: &str| {
        json["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .find(|k| k["kid"] == kid)
            .unwrap_or_else(|| panic!("no {kid} in {json}"))
            .clone()
    };
    let (ak, ek) = (key("HCLAkPub"), key("HCLEkPub"));
    assert_eq!(ak["kty"], "RSA");
    assert_eq!(ak["e"], "AQAB");
    assert_eq!(ak["key_ops"], serde_json::json!(["sign"]));
    assert_eq!(json["vm-configuration"]["tpm-enabled"], true);
    ok(
        "tpm2_readpublic 0x81000003",
        tool(
            &tcti,
            &work,
            &[
                "tpm2_readpublic",
                "-c",
                "0x81000003",
                "-o",
                "ak.pem",
                "-f",
                "pem",
            ],
        ),
    );
    // The EK is not persisted (its usual handle stays the guest's): `tpm2_createek`
    // derives the same key from the endorsement seed.
    ok(
        "tpm2_createek",
        tool(
            &tcti,
            &work,
            &["tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
        ),
    );
    ok(
        "tpm2_readpublic ek.ctx",
        tool(
            &tcti,
            &work,
            &[
                "tpm2_readpublic",
                "-c",
                "ek.ctx",
                "-o",
                "ek.pem",
                "-f",
                "pem",
            ],
        ),
    );
    ok(
        "tpm2_flushcontext -t",
        tool(&tcti, &work, &["tpm2_flushcontext", "-t"]),
    );
    assert_eq!(
        hex(&base64url_decode(ak["n"].as_str().expect("n"))),
        pem_modulus(&work, "ak.pem"),
        "the AK in the claims is the TPM's key at 0x81000003"
    );
    assert_eq!(
        hex(&base64url_decode(ek["n"].as_str().expect("n"))),
        pem_modulus(&work, "ek.pem"),
        "the EK in the claims is the one tpm2_createek derives"
    );

    // A quote over the verifier's nonce, signed by the bound AK, checks out with that nonce
    // and with no other.
    let nonce = "5eed0f1a7e5700d1";
    ok(
        "tpm2_quote",
        tool(
            &tcti,
            &work,
            &[
                "tpm2_quote",
                "-c",
                "0x81000003",
                "-l",
                "sha256:0,1,2,16",
                "-q",
                nonce,
                "-m",
                "quote.msg",
                "-s",
                "quote.sig",
                "-o",
                "quote.pcrs",
                "-g",
                "sha256",
            ],
        ),
    );
    let checkquote = |nonce: &str| {
        Command::new("tpm2_checkquote")
            .args([
                "-u",
                "ak.pem",
                "-m",
                "quote.msg",
                "-s",
                "quote.sig",
                "-f",
                "quote.pcrs",
                "-g",
                "sha256",
                "-q",
                nonce,
            ])
            .current_dir(&work)
            .output()
            .expect("tpm2_checkquote")
    };
    ok("tpm2_checkquote", checkquote(nonce));
    let replayed = checkquote("5eed0f1a7e5700d2");
    assert!(
        !replayed.status.success(),
        "a quote passed with another nonce:\n{}",
        text(&replayed)
    );
}
