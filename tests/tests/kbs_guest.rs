//! A guest attests itself through its vTPM and gets the tenant's disk secret: the guest
//! client `tools/guest/pv-attest.sh`, run by busybox sh with busybox's applets (as in the
//! guest) and Debian's tpm2-tools on pv-vtpm's mssim front end, against `paravisor kbs serve`
//! with a `[guest]` policy. No VM: the TPM and the broker are the real ones, only the
//! transport to the TPM differs from the guest's /dev/tpmrm0.
//!
//! The secret comes back byte for byte; forged, replayed or unpinned evidence is refused by
//! the check it fails (exit 3, the check's name on stderr, no secret file); a broker that
//! cannot be reached is retryable (exit 75).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Output;
use std::sync::OnceLock;

use common::*;

/// The shipped manifest's services.
const SHIPPED_SERVICES: usize = 7;
/// A restricted signing key the test makes in the guest's TPM, bound to nothing (pv-vtpm's
/// AK, the one the claims name, is at 0x81000003).
const NOT_THE_AK: &str = "0x81000004";
/// The tpm2-tools the client uses.
const TPM2_TOOLS: [&str; 10] = [
    "tpm2_nvread",
    "tpm2_createprimary",
    "tpm2_create",
    "tpm2_load",
    "tpm2_certifycreation",
    "tpm2_quote",
    "tpm2_rsadecrypt",
    "tpm2_flushcontext",
    "tpm2_getcap",
    "tpm2_evictcontrol",
];

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/guest/pv-attest.sh")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// A directory of busybox applets (`busybox --install -s`): Debian's busybox-static, as the
/// guest image holds it, from the Linux harness's package cache; else the host's busybox.
/// None (with the reason) if neither is there.
fn busybox_bin() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        // Statics are never dropped: earlier runs' directories (their process gone) go here.
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        for e in std::fs::read_dir(tmp).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(pid) = name.strip_prefix("kbs-guest-busybox-") {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let root = tmp.join(format!("kbs-guest-busybox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let bin = root.join("applets");
        std::fs::create_dir_all(&bin).map_err(|e| e.to_string())?;
        let cache = std::env::var_os("PV_LINUX_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/pv-linux")))
            .unwrap_or_default()
            .join("debs");
        let deb = std::fs::read_dir(&cache).ok().and_then(|d| {
            d.flatten()
                .map(|e| e.path())
                .find(|p| p.to_string_lossy().contains("busybox-static_"))
        });
        let busybox = match deb {
            Some(deb) => {
                let out = Command::new("dpkg-deb")
                    .arg("-x")
                    .arg(&deb)
                    .arg(root.join("deb"))
                    .output()
                    .map_err(|e| format!("dpkg-deb: {e}"))?;
                if !out.status.success() {
                    return Err(format!("dpkg-deb -x {}: {}", deb.display(), text(&out)));
                }
                root.join("deb/bin/busybox")
            }
            None => {
                let host = Command::new("sh")
                    .args(["-c", "command -v busybox"])
                    .output()
                    .map_err(|e| e.to_string())?;
                let path = String::from_utf8_lossy(&host.stdout).trim().to_string();
                if path.is_empty() {
                    return Err(format!(
                        "no busybox: neither {}/busybox-static_*.deb (tests/linux/build-image.sh \
                         fetches it) nor busybox on the PATH",
                        cache.display()
                    ));
                }
                PathBuf::from(path)
            }
        };
        let out = Command::new(&busybox)
            .arg("--install")
            .arg("-s")
            .arg(&bin)
            .output()
            .map_err(|e| format!("{}: {e}", busybox.display()))?;
        if !out.status.success() || !bin.join("nc").exists() {
            return Err(format!(
                "{} --install -s made no nc applet: {}",
                busybox.display(),
                text(&out)
            ));
        }
        Ok(bin)
    })
    .clone()
}

/// Whether this machine can run the test; says why not, loudly.
fn available(test: &str) -> Option<PathBuf> {
    if !sandbox_available(test) {
        return None;
    }
    let missing: Vec<&str> = TPM2_TOOLS
        .into_iter()
        .filter(|t| Command::new(t).arg("--version").output().is_err())
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "SKIPPED: {test}: needs tpm2-tools ({} missing; apt-get install tpm2-tools)",
            missing.join(", ")
        );
        return None;
    }
    match busybox_bin() {
        Ok(bin) => Some(bin),
        Err(why) => {
            eprintln!("SKIPPED: {test}: {why}");
            None
        }
    }
}

/// A paravisor whose vTPM is bound and reachable over mssim, and what a tenant knows of it.
struct Guest {
    inst: Instance,
    tcti: String,
    busybox: PathBuf,
    /// The launch's measurement (hex), from its launch log.
    measurement: String,
    /// The platform's chain and its pin.
    certs: PathBuf,
    fingerprint: String,
}

impl Guest {
    fn start(tag: &str, busybox: PathBuf) -> Guest {
        let manifest = shipped_text();
        let inst = Instance::start_with(
            tag,
            &manifest,
            SHIPPED_SERVICES,
            &["--listen", "mssim-command", "--listen", "mssim-platform"],
        );
        inst.wait_for_vtpm_binding();
        let tcti = format!(
            "mssim:host=127.0.0.1,port={}",
            port(&manifest, "mssim-command")
        );
        let log: serde_json::Value = serde_json::from_slice(
            &std::fs::read(Path::new(&inst.state_dir()).join("launch-log.json")).unwrap(),
        )
        .unwrap();
        let measurement = log["measurement"].as_str().unwrap().to_string();
        let certs = inst.dir.join("certs");
        let (ok, out) = pv_result(&[
            "attest",
            "certs",
            "--platform-dir",
            test_platform_dir().to_str().unwrap(),
            "--out",
            certs.to_str().unwrap(),
        ]);
        assert!(ok, "{out}");
        let (ok, fingerprint) =
            pv_result(&["attest", "fingerprint", "--certs", certs.to_str().unwrap()]);
        assert!(ok, "{fingerprint}");
        Guest {
            inst,
            tcti,
            busybox,
            measurement,
            certs,
            fingerprint: fingerprint.trim().to_string(),
        }
    }

    /// A tpm2-tools command on the guest's TPM.
    fn tpm(&self, args: &[&str]) -> Output {
        let out = Command::new(args[0])
            .args(&args[1..])
            .current_dir(&self.inst.dir)
            .env("TPM2TOOLS_TCTI", &self.tcti)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
        assert!(out.status.success(), "{args:?}:\n{}", text(&out));
        out
    }

    /// busybox sh running `body` with busybox's applets first on the PATH and the TPM's
    /// TCTI set, in the instance's directory.
    fn sh(&self, body: &str) -> Output {
        let path = format!(
            "{}:{}",
            self.busybox.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        Command::new(self.busybox.join("sh"))
            .args(["-c", body])
            .current_dir(&self.inst.dir)
            .env("PATH", path)
            .env("TPM2TOOLS_TCTI", &self.tcti)
            .output()
            .expect("busybox sh")
    }

    /// `pv-attest ARGS...`
    fn attest(&self, args: &[&str]) -> Output {
        let mut body = format!("exec sh {}", script().display());
        for a in args {
            body.push_str(&format!(" '{a}'"));
        }
        self.sh(&body)
    }

    /// The script's functions, sourced, then `steps`.
    fn attest_steps(&self, steps: &str) -> Output {
        self.sh(&format!(
            "PV_ATTEST_LIB=1 . {}\n{steps}",
            script().display()
        ))
    }

    /// The sha256 values of PCRs 0-7 now, hex.
    fn firmware_pcrs(&self) -> Vec<String> {
        let file = self.inst.dir.join("pcrs.bin");
        self.tpm(&[
            "tpm2_pcrread",
            "sha256:0,1,2,3,4,5,6,7",
            "-o",
            file.to_str().unwrap(),
        ]);
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(bytes.len(), 8 * 32);
        bytes.chunks(32).map(hex).collect()
    }

    /// The transient objects loaded in the TPM.
    fn transient_handles(&self) -> String {
        String::from_utf8_lossy(&self.tpm(&["tpm2_getcap", "handles-transient"]).stdout)
            .trim()
            .to_string()
    }
}

/// A running `kbs serve` with its own key, secret and policy; killed on drop.
struct Broker {
    dir: PathBuf,
    secret: Vec<u8>,
    port: u16,
    child: Child,
}

impl Broker {
    /// A broker trusting `certs` (pinned by `fingerprint`) and `measurements`, releasing a
    /// random secret under `[guest]` with `guest_lines`.
    fn start(
        g: &Guest,
        tag: &str,
        certs: &Path,
        fingerprint: &str,
        measurements: &[&str],
        guest_lines: &str,
    ) -> Broker {
        let dir = g.inst.dir.join(format!("broker-{tag}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (ok, out) = pv_result(&["kbs", "init-key", dir.join("tenant.key").to_str().unwrap()]);
        assert!(ok, "{out}");
        // Every byte value a shell could mangle: NUL, newline, quotes, high bytes.
        let mut secret: Vec<u8> = (0..=255u8).rev().step_by(2).collect();
        secret.extend_from_slice(b"\n\0\"'\\ end");
        secret.truncate(190);
        let secret_file = dir.join("disk.secret");
        std::fs::write(&secret_file, &secret).unwrap();
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let measurements: Vec<String> = measurements.iter().map(|m| format!("\"{m}\"")).collect();
        let policy = dir.join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "key-file = \"tenant.key\"\ncerts = \"{}\"\nark-fingerprint = \"{fingerprint}\"\n\
                 allowed-measurements = [{}]\nmax-nonce-age = 30\n\
                 [minimum-tcb]\nbootloader = 0\ntee = 0\nsnp = 0\nmicrocode = 0\n\
                 [guest]\nsecret-file = \"disk.secret\"\n{guest_lines}\n",
                certs.display(),
                measurements.join(", ")
            ),
        )
        .unwrap();
        let (child, port) = serve_kbs(&dir, &policy);
        Broker {
            dir,
            secret,
            port,
            child,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kbs.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts that a pv-attest run was refused by `check`: exit 3, the check named on stderr,
/// no secret written.
fn assert_refused(what: &str, out: &Output, check: &str, secret: &Path, broker: &Broker) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{what}: exit {:?}, expected 3 (refused):\n{}\nbroker:\n{}",
        out.status.code(),
        text(out),
        broker.log()
    );
    assert!(
        stderr.contains(&format!("pv-attest: refused: {check}: ")),
        "{what}: the refusal does not name {check}:\n{stderr}"
    );
    assert!(
        !secret.exists(),
        "{what}: a secret file was written on refusal"
    );
    assert!(
        broker.log().contains("guest-key refused: "),
        "{what}: the broker did not log the refusal:\n{}",
        broker.log()
    );
}

#[test]
fn a_guest_gets_its_disk_secret_byte_for_byte_from_fresh_evidence_of_its_vtpm() {
    let test = "a_guest_gets_its_disk_secret_byte_for_byte_from_fresh_evidence_of_its_vtpm";
    let Some(busybox) = available(test) else {
        return;
    };
    let g = Guest::start("kbs-guest-ok", busybox);
    // The tenant pins the firmware PCRs of a boot it trusts: this one.
    let pins: Vec<String> = g
        .firmware_pcrs()
        .iter()
        .enumerate()
        .map(|(i, v)| format!("\"{i}\" = \"{v}\""))
        .collect();
    let broker = Broker::start(
        &g,
        "ok",
        &g.certs,
        &g.fingerprint,
        &[&g.measurement],
        &format!("pcrs = {{ {} }}", pins.join(", ")),
    );
    let before = g.transient_handles();
    for round in 0..4 {
        let secret = g.inst.dir.join(format!("secret-{round}"));
        let out = g.attest(&[
            "--kbs",
            &broker.addr(),
            "--secret-out",
            secret.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "round {round}: pv-attest failed:\n{}\nbroker:\n{}\nparavisor:\n{}",
            text(&out),
            broker.log(),
            g.inst.log()
        );
        assert_eq!(
            std::fs::read(&secret).unwrap(),
            broker.secret,
            "round {round}: the secret, byte for byte"
        );
        assert_eq!(
            std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    // Every round flushed what it loaded: the TPM's few object slots stay free.
    assert_eq!(g.transient_handles(), before);
    let log = broker.log();
    assert_eq!(log.matches("guest secret RELEASED").count(), 4, "{log}");
    // Each quote's PCRs are in the broker's log, where a tenant reads them to pin.
    let pcr0 = format!("sha256:0={}", g.firmware_pcrs()[0]);
    assert!(log.contains(&pcr0), "{log}");
}

#[test]
fn forged_replayed_or_unpinned_guest_evidence_is_refused_by_the_check_it_fails() {
    let test = "forged_replayed_or_unpinned_guest_evidence_is_refused_by_the_check_it_fails";
    let Some(busybox) = available(test) else {
        return;
    };
    let g = Guest::start("kbs-guest-refusals", busybox);
    let good = Broker::start(&g, "good", &g.certs, &g.fingerprint, &[&g.measurement], "");
    let secret = g.inst.dir.join("secret");
    let secret_arg = secret.to_str().unwrap();
    let work = g.inst.dir.join("work-first");
    let work_arg = work.to_str().unwrap();

    // A genuine exchange, its evidence kept.
    let out = g.attest(&[
        "--kbs",
        &good.addr(),
        "--secret-out",
        secret_arg,
        "--work",
        work_arg,
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out), good.log());
    std::fs::remove_file(&secret).unwrap();

    // Its request line, captured and sent again: the nonce is spent.
    let out = g.attest_steps(&format!(
        "pv_args --kbs {} --secret-out {secret_arg} --work {work_arg}\n\
         pv_setup; pv_send; pv_reply; pv_unwrap",
        good.addr()
    ));
    assert_refused("replayed request", &out, "nonce", &secret, &good);

    // Its quote, with a fresh nonce and a fresh, certified transfer key around it.
    let again = g.inst.dir.join("work-again");
    let out = g.attest_steps(&format!(
        "pv_args --kbs {} --secret-out {secret_arg} --work {}\n\
         pv_setup; pv_challenge; pv_read_evidence; pv_transfer_key; pv_certify; pv_quote\n\
         cp {work_arg}/quote.msg {work_arg}/quote.sig {work_arg}/quote.pcrs \"$PV_WORK\"/\n\
         pv_request; pv_send; pv_reply; pv_unwrap",
        good.addr(),
        again.display()
    ));
    assert_refused(
        "old quote, fresh nonce",
        &out,
        "quote-nonce",
        &secret,
        &good,
    );

    // A quote (and certification) by a restricted signing key of the same TPM that is not
    // the bound AK.
    g.tpm(&[
        "tpm2_createprimary",
        "-Q",
        "-C",
        "o",
        "-G",
        "rsa2048:rsassa-sha256:null",
        "-a",
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign",
        "-c",
        "other-ak.ctx",
    ]);
    g.tpm(&[
        "tpm2_evictcontrol",
        "-Q",
        "-C",
        "o",
        "-c",
        "other-ak.ctx",
        NOT_THE_AK,
    ]);
    g.tpm(&["tpm2_flushcontext", "-t"]);
    let out = g.attest(&[
        "--kbs",
        &good.addr(),
        "--secret-out",
        secret_arg,
        "--ak",
        NOT_THE_AK,
    ]);
    assert_refused(
        "quote by another key",
        &out,
        "quote-signature",
        &secret,
        &good,
    );
    g.tpm(&["tpm2_evictcontrol", "-Q", "-C", "o", "-c", NOT_THE_AK]);

    // A PCR value the policy does not allow.
    let pinned = Broker::start(
        &g,
        "pcr",
        &g.certs,
        &g.fingerprint,
        &[&g.measurement],
        &format!("pcrs = {{ \"0\" = \"{}\" }}", "ff".repeat(32)),
    );
    let out = g.attest(&["--kbs", &pinned.addr(), "--secret-out", secret_arg]);
    assert_refused("PCR 0 not allowed", &out, "pcr-policy", &secret, &pinned);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains(&format!("the policy allows {}", "ff".repeat(32))),
        "{}",
        text(&out)
    );

    // A policy that does not allow this paravisor's measurement.
    let other = "ab".repeat(48);
    let unlisted = Broker::start(&g, "meas", &g.certs, &g.fingerprint, &[&other], "");
    let out = g.attest(&["--kbs", &unlisted.addr(), "--secret-out", secret_arg]);
    assert_refused(
        "measurement not allowed",
        &out,
        "measurement",
        &secret,
        &unlisted,
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&g.measurement),
        "{}",
        text(&out)
    );

    // A broker that trusts another platform (another ARK): this report's chain is not it.
    let platform = g.inst.dir.join("other-platform");
    let (ok, out) = pv_result(&[
        "platform",
        "init",
        "--platform-dir",
        platform.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let other_certs = g.inst.dir.join("other-certs");
    let (ok, out) = pv_result(&[
        "attest",
        "certs",
        "--platform-dir",
        platform.to_str().unwrap(),
        "--out",
        other_certs.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let (ok, other_fp) = pv_result(&[
        "attest",
        "fingerprint",
        "--certs",
        other_certs.to_str().unwrap(),
    ]);
    assert!(ok, "{other_fp}");
    let foreign = Broker::start(
        &g,
        "foreign",
        &other_certs,
        other_fp.trim(),
        &[&g.measurement],
        "",
    );
    let out = g.attest(&["--kbs", &foreign.addr(), "--secret-out", secret_arg]);
    assert_refused(
        "another platform's report",
        &out,
        "report",
        &secret,
        &foreign,
    );

    // No broker there: retryable, not refused.
    let out = g.attest(&[
        "--kbs",
        &format!("127.0.0.1:{}", free_port()),
        "--secret-out",
        secret_arg,
    ]);
    assert_eq!(out.status.code(), Some(75), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pv-attest: retryable: "),
        "{}",
        text(&out)
    );
    assert!(!secret.exists());

    // The genuine client still gets the secret after all of that.
    let out = g.attest(&["--kbs", &good.addr(), "--secret-out", secret_arg]);
    assert!(out.status.success(), "{}\n{}", text(&out), good.log());
    assert_eq!(std::fs::read(&secret).unwrap(), good.secret);
}
