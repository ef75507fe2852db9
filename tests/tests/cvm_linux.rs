//! The confidential VM image of issue 18 (the Linux test guest, docs/linux-harness.md) on our
//! services, without the key broker: the guest's stock TPM driver and Debian's tpm2-tools on
//! our vTPM (the binding's report and claims, quotes by its AK, a transfer key that
//! decrypts), and /init's command-line flow (`pv.ip`, `pv.kbs`, `pv.disk`, `pv.provision`):
//! the NIC, each outcome of the attestation client, and a LUKS2 data disk on our storage
//! service that is provisioned, opened again, and left locked by a wrong key.
//!
//! Where the broker would answer, a stand-in `pv-attest` with the real client's interface
//! (exit 0 with the secret written, 3 refused, 75 retryable, 1 error) is added to the
//! initramfs over the image's own.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::linux;
use sha2::Digest;

/// Where an SNP report carries its REPORT_DATA, and how long the raw report is.
const REPORT_DATA: usize = 0x50;
const REPORT_LEN: usize = 0x4A0;

/// The kernel command line of a guest that attests to a broker at 10.0.2.2 (pv-net's
/// responder address; the stand-ins do not connect to it).
const KBS: &str = "pv.kbs=10.0.2.2:8080";

/// How many times /init runs a pv-attest that keeps answering "retryable": `ATTEST_ATTEMPTS`
/// of the cvm-init.sh the image is built from.
fn attest_attempts() -> usize {
    include_str!("../linux/cvm-init.sh")
        .lines()
        .find_map(|l| l.strip_prefix("ATTEST_ATTEMPTS="))
        .and_then(|n| n.trim().parse().ok())
        .expect("cvm-init.sh sets ATTEST_ATTEMPTS to a number")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd hex {text:?}");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap_or_else(|e| panic!("{text}: {e}")))
        .collect()
}

/// The rest of the console line starting with `tag ` (its last one); panics with the console
/// if there is none.
fn field<'a>(console: &'a str, tag: &str) -> &'a str {
    let prefix = format!("{tag} ");
    console
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {tag} line:\n{console}"))
        .trim_end()
}

/// A stand-in for pv-attest: checks that it was called as the interface says, counts its
/// runs in /run/stub-runs (printed as `STUB-RUN <n>`), then runs `body` (busybox sh), which
/// ends it with the status to report; the secret goes to `$out`.
fn stub_attest(body: &str) -> String {
    format!(
        r#"#!/bin/sh
n=$(($(cat /run/stub-runs 2>/dev/null || echo 0) + 1))
echo "$n" > /run/stub-runs
echo "STUB-RUN $n: $*"
[ "$1" = --kbs ] && [ "$3" = --secret-out ] && [ $# -eq 4 ] || {{ echo "pv-attest: called as: $*" >&2; exit 1; }}
kbs=$2
out=$4
{body}
"#
    )
}

/// A guest with the stand-in `stub` as pv-attest.
fn with_stub(guest: linux::Guest, stub: &str) -> linux::Guest {
    guest.file("usr/sbin/pv-attest", stub.as_bytes(), 0o755)
}

/// A tpm2-tools command on the host against our TPM's mssim front end, run in `dir`; its
/// stdout, or a panic with what it said.
fn host_tool(tcti: &str, dir: &Path, args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", args[0]));
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        common::text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn host_tools_available(test: &str) -> bool {
    let ok = Command::new("tpm2_nvread")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: {test}: tpm2-tools are not installed on the host (apt-get install tpm2-tools)");
    }
    ok
}

/// The guest's side of the TPM test: prints each artefact as `TAG <hex>` for the host.
const TPM_SCRIPT: &str = r#"
set -e
hexof() { od -An -v -tx1 "$1" | tr -d ' \n'; }
pv_wait_dev /dev/tpmrm0 10
echo "TCTI $TPM2TOOLS_TCTI"
echo "RANDOM $(tpm2_getrandom 16 --hex)"
tpm2_nvread 0x01400001 -o /tmp/report.bin
echo "REPORT $(hexof /tmp/report.bin)"
tpm2_nvread 0x01400002 -o /tmp/claims.json
grep -q '"kid":"HCLAkPub"' /tmp/claims.json
echo "CLAIMS $(hexof /tmp/claims.json)"
tpm2_readpublic -c 0x81000003 -f pem -o /tmp/ak.pem >/dev/null
echo "AK $(hexof /tmp/ak.pem)"
tpm2_quote -c 0x81000003 -l sha256:0,1,2,3,4,5,6,7 -q "$NONCE" -g sha256 \
    -m /tmp/quote.msg -s /tmp/quote.sig -o /tmp/quote.pcrs >/dev/null
tpm2_checkquote -u /tmp/ak.pem -m /tmp/quote.msg -s /tmp/quote.sig -f /tmp/quote.pcrs \
    -g sha256 -q "$NONCE" >/dev/null
echo "QUOTE-MSG $(hexof /tmp/quote.msg)"
echo "QUOTE-SIG $(hexof /tmp/quote.sig)"
echo "QUOTE-PCRS $(hexof /tmp/quote.pcrs)"
# A transfer key as a broker client makes one: a primary decryption key of the owner
# hierarchy, never exported; a secret encrypted to it comes back only through the TPM.
tpm2_createprimary -C o -G rsa2048:null:null \
    -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|decrypt' -c /tmp/tk.ctx >/dev/null
head -c 32 /dev/urandom > /tmp/secret
tpm2_rsaencrypt -c /tmp/tk.ctx -s oaep -o /tmp/wrapped /tmp/secret
tpm2_rsadecrypt -c /tmp/tk.ctx -s oaep -o /tmp/unwrapped /tmp/wrapped
cmp /tmp/secret /tmp/unwrapped
echo TRANSFER-KEY-OK
"#;

/// The guest's own kernel driver and Debian's tpm2-tools on our vTPM (swtpm's control
/// protocol on a Unix socket, `-tpmdev emulator`, `tpm-crb`): the guest reads the binding's
/// report and claims exactly as the host reads them through mssim, reads the AK the host
/// reads, quotes with it (the host checks the quote with the AK, and only with the
/// verifier's nonce), and a transfer key it makes decrypts what was encrypted to it.
#[test]
fn the_guests_stock_tpm_driver_and_tpm2_tools_read_our_binding_quote_and_decrypt() {
    let test = "the_guests_stock_tpm_driver_and_tpm2_tools_read_our_binding_quote_and_decrypt";
    if !common::sandbox_available(test) || !host_tools_available(test) {
        return;
    }
    let Some(image) = linux::image(test) else {
        return;
    };
    let manifest = common::shipped_text();
    let inst = common::Instance::start_with(
        "cvm-tpm",
        &manifest,
        7,
        &[
            "--listen",
            "swtpm-control-unix",
            "--listen",
            "mssim-command",
            "--listen",
            "mssim-platform",
        ],
    );
    inst.wait_for_vtpm_binding();
    // The host's view through mssim, before the guest (once QEMU is done with the TPM it is
    // shut down).
    let tcti = format!(
        "mssim:host=127.0.0.1,port={}",
        common::port(&manifest, "mssim-command")
    );
    let work = inst.dir.join("host");
    std::fs::create_dir_all(&work).unwrap();
    host_tool(
        &tcti,
        &work,
        &["tpm2_nvread", "0x01400001", "-o", "report.bin"],
    );
    host_tool(
        &tcti,
        &work,
        &["tpm2_nvread", "0x01400002", "-o", "claims.json"],
    );
    host_tool(
        &tcti,
        &work,
        &[
            "tpm2_readpublic",
            "-c",
            "0x81000003",
            "-f",
            "pem",
            "-o",
            "ak.pem",
        ],
    );
    // The verifier's nonce: fresh for this run.
    let nonce = hex(&sha2::Sha256::digest(format!(
        "{:?} {}",
        std::time::SystemTime::now(),
        std::process::id()
    ))[..20]);
    let exit = linux::Guest::new(&image)
        .tpm_crb(&inst.dir.join("state/tpm/swtpm-sock"))
        .script(&format!("NONCE={nonce}\n{TPM_SCRIPT}"))
        .timeout(Duration::from_secs(300))
        .run();
    assert_eq!(
        exit.status,
        0,
        "guest failed:\n{}\n{}",
        exit.console,
        inst.log()
    );
    let console = &exit.console;
    assert_eq!(field(console, "TCTI"), "device:/dev/tpmrm0");
    assert_eq!(field(console, "RANDOM").len(), 32, "{console}");
    assert!(console.contains("TRANSFER-KEY-OK"), "{console}");

    let report = unhex(field(console, "REPORT"));
    let claims = unhex(field(console, "CLAIMS"));
    assert_eq!(report.len(), REPORT_LEN, "the raw report and nothing else");
    assert_eq!(report, std::fs::read(work.join("report.bin")).unwrap());
    assert_eq!(claims, std::fs::read(work.join("claims.json")).unwrap());
    assert_eq!(
        &report[REPORT_DATA..REPORT_DATA + 32],
        sha2::Sha256::digest(&claims).as_slice(),
        "the report's data is the claims' SHA-256"
    );
    assert_eq!(
        unhex(field(console, "AK")),
        std::fs::read(work.join("ak.pem")).unwrap(),
        "the guest's AK is the host's"
    );
    // The guest's quote checks out on the host with the AK, with the nonce and only with it.
    for (name, tag) in [
        ("quote.msg", "QUOTE-MSG"),
        ("quote.sig", "QUOTE-SIG"),
        ("quote.pcrs", "QUOTE-PCRS"),
    ] {
        std::fs::write(work.join(name), unhex(field(console, tag))).unwrap();
    }
    let checkquote = |nonce: &str| {
        Command::new("tpm2_checkquote")
            .args(["-u", "ak.pem", "-m", "quote.msg", "-s", "quote.sig"])
            .args(["-f", "quote.pcrs", "-g", "sha256", "-q", nonce])
            .current_dir(&work)
            .output()
            .expect("tpm2_checkquote")
    };
    let good = checkquote(&nonce);
    assert!(good.status.success(), "{}", common::text(&good));
    let other = format!("{}00", &nonce[..nonce.len() - 2]);
    let bad = checkquote(&other);
    assert!(!bad.status.success(), "a quote checked with another nonce");
    assert_eq!(inst.row("vtpm")["restarts"], 0, "{}", inst.log());
}

/// /init with `pv.ip`, `pv.gw` and `pv.kbs` on our NIC (pv-net's responder at 10.0.2.2): the
/// network is up before pv-attest runs (the stand-in pings the broker's host and checks the
/// default route), two "retryable" answers are tried again with a line each, and the
/// released secret is kept at /run/pv/disk.key (mode 0600) when no data disk uses it.
#[test]
fn init_brings_up_the_nic_retries_a_retryable_attestation_and_keeps_the_released_secret() {
    let test =
        "init_brings_up_the_nic_retries_a_retryable_attestation_and_keeps_the_released_secret";
    if !common::sandbox_available(test) {
        return;
    }
    let Some(image) = linux::image(test) else {
        return;
    };
    let inst = common::Instance::start_with(
        "cvm-net",
        &common::shipped_text(),
        7,
        &["--listen", "vhost-user-net"],
    );
    let stub = stub_attest(
        r#"
ip route | grep -q '^default via 10.0.2.2 dev eth0' || { echo "pv-attest: no default route" >&2; exit 1; }
ping -c 1 -W 5 "${kbs%:*}" >/dev/null || { echo "pv-attest: retryable: ${kbs%:*} does not answer" >&2; exit 75; }
if [ "$n" -le 2 ]; then echo "pv-attest: retryable: the broker is starting" >&2; exit 75; fi
printf 'the-released-secret' > "$out"
"#,
    );
    let script = r#"
set -e
echo "NET $(cat /run/pv/net)"
echo "ATTEST $(cat /run/pv/attest)"
echo "KEY $(stat -c %a /run/pv/disk.key) $(cat /run/pv/disk.key)"
[ ! -e /run/pv/disk ]
ip -4 addr show dev eth0 | grep -q 'inet 10.0.2.15/24'
"#;
    let exit = with_stub(linux::Guest::new(&image), &stub)
        .vhost_user_net(&inst.dir.join("state/net/vhost-user-net.sock"), false)
        .kernel_args(&format!("pv.ip=10.0.2.15/24 pv.gw=10.0.2.2 {KBS}"))
        .script(script)
        .timeout(Duration::from_secs(300))
        .run();
    let console = &exit.console;
    assert_eq!(exit.status, 0, "{console}\n{}", inst.log());
    assert_eq!(field(console, "NET"), "up eth0 10.0.2.15/24 via 10.0.2.2");
    assert_eq!(field(console, "ATTEST"), "released");
    assert_eq!(field(console, "KEY"), "600 the-released-secret");
    let at = |needle: &str| {
        console
            .find(needle)
            .unwrap_or_else(|| panic!("no {needle:?}:\n{console}"))
    };
    let up = at("pv-init: network: eth0 10.0.2.15/24 up, default route via 10.0.2.2");
    let attempts = attest_attempts();
    let first = at(&format!(
        "pv-init: attestation: retryable (attempt 1 of {attempts}): the broker is starting"
    ));
    let second = at(&format!(
        "pv-init: attestation: retryable (attempt 2 of {attempts}): the broker is starting"
    ));
    let released = at("pv-init: attestation: released");
    assert!(
        up < first && first < second && second < released,
        "{console}"
    );
    assert!(console.contains("STUB-RUN 3: --kbs 10.0.2.2:8080 --secret-out /run/pv/disk.key"));
    assert!(!console.contains("STUB-RUN 4"), "{console}");
}

/// A refusal (exit 3) and an error (exit 1) are not tried again: /init says which check
/// refused, or what failed, writes it to /run/pv/attest, and leaves the data disk locked
/// without touching it (there is not even a disk here: the flow never looks for it).
#[test]
fn a_refused_or_failed_attestation_is_not_retried_and_leaves_the_data_disk_locked() {
    let test = "a_refused_or_failed_attestation_is_not_retried_and_leaves_the_data_disk_locked";
    let Some(image) = linux::image(test) else {
        return;
    };
    let script = r#"
echo "ATTEST $(cat /run/pv/attest)"
echo "DISK $(cat /run/pv/disk)"
[ ! -e /run/pv/disk.key ] || { echo "a secret was left"; exit 1; }
! grep -q ' /mnt/data ' /proc/mounts
"#;
    let refused = stub_attest(
        r#"
echo "pv-attest: refused: measurement: 5f3a0c is not in the broker's policy" >&2
exit 3
"#,
    );
    let failed = stub_attest(
        r#"
printf 'half' > "$out"
echo "pv-attest: tpm2_nvread 0x01400001 failed" >&2
exit 1
"#,
    );
    for (stub, outcome, line) in [
        (
            &refused,
            "refused measurement: 5f3a0c is not in the broker's policy",
            "pv-init: attestation: refused: measurement: 5f3a0c is not in the broker's policy",
        ),
        (
            &failed,
            "error pv-attest exited 1: pv-attest: tpm2_nvread 0x01400001 failed",
            "pv-init: attestation: error: pv-attest exited 1: pv-attest: tpm2_nvread 0x01400001 failed",
        ),
    ] {
        let exit = with_stub(linux::Guest::new(&image), stub)
            .kernel_args(&format!("{KBS} pv.disk=/dev/vda pv.provision=1"))
            .script(script)
            .timeout(Duration::from_secs(300))
            .run();
        let console = &exit.console;
        assert_eq!(exit.status, 0, "{console}");
        assert_eq!(field(console, "ATTEST"), outcome);
        assert!(console.contains(line), "{console}");
        assert!(
            field(console, "DISK").starts_with("locked no secret (attestation: "),
            "{console}"
        );
        assert!(
            console.contains("pv-init: data disk: left locked: the broker released no secret"),
            "{console}"
        );
        assert!(console.contains("STUB-RUN 1"), "{console}");
        assert!(!console.contains("STUB-RUN 2"), "{console}");
    }
}

/// A broker that stays unreachable (exit 75 every time) is asked a bounded number of times,
/// each retry on a line of its own, and then /init goes on with the boot.
#[test]
fn an_attestation_that_stays_retryable_is_given_up_after_a_bounded_number_of_attempts() {
    let test = "an_attestation_that_stays_retryable_is_given_up_after_a_bounded_number_of_attempts";
    let Some(image) = linux::image(test) else {
        return;
    };
    let stub = stub_attest(
        r#"
echo "pv-attest: retryable: connect 10.0.2.2:8080: no route to host" >&2
exit 75
"#,
    );
    let exit = with_stub(linux::Guest::new(&image), &stub)
        .kernel_args(KBS)
        .script("echo \"ATTEST $(cat /run/pv/attest)\"\n[ ! -e /run/pv/disk.key ]\n")
        .timeout(Duration::from_secs(300))
        .run();
    let console = &exit.console;
    assert_eq!(exit.status, 0, "{console}");
    let attempts = attest_attempts();
    for attempt in 1..attempts {
        assert!(
            console.contains(&format!(
                "pv-init: attestation: retryable (attempt {attempt} of {attempts})"
            )),
            "{console}"
        );
    }
    assert!(console.contains(&format!("STUB-RUN {attempts}")));
    assert!(!console.contains(&format!("STUB-RUN {}", attempts + 1)));
    let gave_up = format!(
        "still retryable after {attempts} attempts: connect 10.0.2.2:8080: no route to host"
    );
    assert_eq!(field(console, "ATTEST"), format!("error {gave_up}"));
    assert!(console.contains(&format!("pv-init: attestation: error: {gave_up}")));
}

/// Without any `pv.*` parameter /init behaves as it did before the confidential-VM flow: it
/// runs no step (the stand-in pv-attest is never called), prints no `pv-init:` line and writes
/// no status, so every other Linux test boots as before.
#[test]
fn without_pv_parameters_init_runs_no_cvm_step_and_says_nothing() {
    let test = "without_pv_parameters_init_runs_no_cvm_step_and_says_nothing";
    let Some(image) = linux::image(test) else {
        return;
    };
    let stub = stub_attest("printf secret > \"$out\"");
    let exit = with_stub(linux::Guest::new(&image), &stub)
        .script("[ ! -e /run/pv ] && [ ! -e /mnt/data ] && echo NOTHING-RAN\n")
        .run();
    assert_eq!(exit.status, 0, "{}", exit.console);
    assert!(exit.console.contains("NOTHING-RAN"), "{}", exit.console);
    assert!(!exit.console.contains("pv-init:"), "{}", exit.console);
    assert!(!exit.console.contains("STUB-RUN"), "{}", exit.console);
}

/// The marker the guest writes into its encrypted file system, and looks for on the disk.
const MARKER: &str = "PV-LUKS-PLAINTEXT-MARKER";

/// A LUKS2 data disk on our storage service's vhost-user-blk disk, kept raw (not encrypted at
/// rest by the service) so that the guest's dm-crypt is all that stands between its files
/// and the host: boot 1, with `pv.provision=1` and the secret, formats it (LUKS2,
/// aes-xts-plain64, 512-bit key, PBKDF2) and the guest writes a file; boot 2, with the same
/// secret, opens it and reads the file back; boot 3, with another secret (and
/// `pv.provision=1` still), leaves it locked, neither mounted nor formatted again; boot 4
/// opens it by hand (`pv-cvm-init unlock`) with the right key file and the file is intact.
/// The host's image file starts with a LUKS2 header and never holds the marker.
#[test]
fn a_luks_data_disk_on_our_storage_is_provisioned_reopened_and_stays_locked_to_a_wrong_secret() {
    let test =
        "a_luks_data_disk_on_our_storage_is_provisioned_reopened_and_stays_locked_to_a_wrong_secret";
    if !common::sandbox_available(test) {
        return;
    }
    let Some(image) = linux::image(test) else {
        return;
    };
    let raw = common::shipped_text().replace(
        "listen=vhost-user-blk,file=blk-image,encrypted,",
        "listen=vhost-user-blk,file=blk-image,",
    );
    assert!(!raw.contains("file=blk-image,encrypted"));
    let inst = common::Instance::start_with("cvm-luks", &raw, 7, &["--listen", "vhost-user-blk"]);
    let socket = inst.dir.join("state/storage/vhost-user-blk.sock");
    let disk_image = inst.dir.join("state/storage-blk.img");
    let right: &[u8] = b"0123456789abcdef0123456789abcdef-the-right-secret";
    let wrong: &[u8] = b"0123456789abcdef0123456789abcdef-another-secret";
    // The stand-in releases whatever secret the test put at /pv/secret.
    let stub = stub_attest("cat /pv/secret > \"$out\"");
    let boot = |secret: &[u8], kernel_args: &str, script: &str| {
        let exit = with_stub(linux::Guest::new(&image), &stub)
            .file("pv/secret", secret, 0o600)
            .vhost_user_blk(&socket, false)
            .kernel_args(kernel_args)
            .script(script)
            .timeout(Duration::from_secs(300))
            .run();
        assert_eq!(exit.status, 0, "{}\n{}", exit.console, inst.log());
        exit.console
    };
    let flow = format!("{KBS} pv.disk=/dev/vda pv.provision=1");

    let first = boot(
        right,
        &flow,
        &format!(
            r#"
set -e
echo "DISK $(cat /run/pv/disk)"
[ ! -e /run/pv/disk.key ]
cryptsetup status pvdata | sed -n 's/^ *\(type\|cipher\|keysize\): */CRYPT \1 /p'
cryptsetup luksDump /dev/vda | sed -n 's/^[[:space:]]*\(PBKDF\|Iterations\):[[:space:]]*/KEYSLOT \1 /p'
yes {MARKER} | head -c 1048576 > /mnt/data/marker
echo "WROTE $(sha256sum /mnt/data/marker | cut -d' ' -f1)"
"#
        ),
    );
    assert_eq!(field(&first, "DISK"), "mounted provisioned");
    assert!(first.contains(
        "pv-init: data disk: /dev/vda holds no LUKS header: formatting it (pv.provision=1)"
    ));
    assert!(first.contains("pv-init: data disk: provisioned, unlocked and mounted at /mnt/data"));
    for line in [
        "CRYPT type LUKS2",
        "CRYPT cipher aes-xts-plain64",
        "CRYPT keysize 512 bits",
        "KEYSLOT PBKDF pbkdf2",
        "KEYSLOT Iterations 1000",
    ] {
        assert!(
            first.lines().any(|l| l.trim_end() == line),
            "no {line:?}:\n{first}"
        );
    }
    let wrote = field(&first, "WROTE").to_owned();

    let read_back = r#"
set -e
echo "DISK $(cat /run/pv/disk)"
echo "READ $(sha256sum /mnt/data/marker | cut -d' ' -f1)"
"#;
    let second = boot(right, &flow, read_back);
    assert_eq!(field(&second, "DISK"), "mounted");
    assert!(second.contains("pv-init: data disk: unlocked and mounted at /mnt/data"));
    assert_eq!(field(&second, "READ"), wrote, "{second}");

    let third = boot(
        wrong,
        &flow,
        &format!(
            r#"
echo "DISK $(cat /run/pv/disk)"
grep -q ' /mnt/data ' /proc/mounts && echo MOUNTED
[ -e /dev/mapper/pvdata ] && echo OPENED
[ -e /mnt/data/marker ] && echo READABLE
grep -c {MARKER} /dev/vda
cryptsetup isLuks /dev/vda && echo STILL-LUKS
exit 0
"#
        ),
    );
    assert_eq!(
        field(&third, "DISK"),
        "locked the secret does not open /dev/vda"
    );
    assert!(third.contains("pv-init: data disk: left locked: the secret does not open /dev/vda"));
    for not in ["MOUNTED", "OPENED", "READABLE", "formatting"] {
        assert!(!third.contains(not), "{not}:\n{third}");
    }
    assert!(
        third.lines().any(|l| l.trim() == "0"),
        "the marker on the raw disk:\n{third}"
    );
    assert!(third.contains("STILL-LUKS"), "{third}");

    // No pv.* parameters: the test script unlocks by hand with a key file of its own.
    let fourth = boot(
        right,
        "",
        r#"
set -e
[ ! -e /run/pv/disk ]
pv-cvm-init unlock /dev/vda /pv/secret
echo "DISK $(cat /run/pv/disk)"
[ -e /pv/secret ]
echo "READ $(sha256sum /mnt/data/marker | cut -d' ' -f1)"
"#,
    );
    assert!(!fourth.contains("STUB-RUN"), "{fourth}");
    assert_eq!(field(&fourth, "DISK"), "mounted");
    assert_eq!(field(&fourth, "READ"), wrote, "{fourth}");

    let bytes = std::fs::read(&disk_image).unwrap();
    assert_eq!(
        &bytes[..6],
        b"LUKS\xba\xbe",
        "a LUKS header at the start of the disk"
    );
    assert!(
        !bytes.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()),
        "the host's image holds the guest's plaintext"
    );
    assert_eq!(inst.row("storage")["restarts"], 0, "{}", inst.log());
}
