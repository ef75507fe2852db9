//! `paravisor bench chaos`: the confidential VM of [`crate::cvm`] under random `kill -9`s of
//! its services. While the guest repeats, for the whole run, a round of (1) guest-conducted
//! attestation to the broker over our NIC (retried on the client's "retryable" exit), (2)
//! disk I/O on its LUKS data disk over our storage (1 MiB written, synced, caches dropped,
//! read back and compared), and (3) a TPM extend of PCR 16 checked against the hash chain the
//! guest keeps (an extend never lost, never doubled, PCRs never reset), the host kills a
//! random service every 2-5 s. The manifest's restart limits are raised for the run, so no
//! restart may be refused.
//!
//! Reported: kills per service, rounds, attestation retries, the longest round (the longest
//! stall the guest saw), I/O errors and PCR violations (both must be zero), the kernel's I/O
//! error lines, and whether the run's invariants held (exit 1 if not).

use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use crate::bench_storage::err;
use crate::cvm;
use crate::linux_guest;
use crate::linux_guest::GuestFile;
use crate::linux_guest::Running;

/// Lines for the person watching (the guest's start with it too).
pub const PROGRESS: &str = "chaos:";
/// The services killed at random (the tpm-gateway too when it keeps its connections
/// across restarts: see [`gateway_survives`]).
const VICTIMS: &[&str] = &["vtpm", "vmgs", "attest", "storage", "net"];
/// Restart limits for the run: the shipped ones allow 5 a minute, the chaos makes ~20.
const RESTART_POLICY: &str =
    "{ policy = \"always\", max = 1000, window = \"60s\", backoff = \"50ms\" }";
/// Every kill waits this long at least, at most [`KILL_MAX`].
const KILL_MIN: Duration = Duration::from_secs(2);
const KILL_MAX: Duration = Duration::from_secs(5);
/// A guest that prints nothing for this long is declared hung.
const QUIET: Duration = Duration::from_secs(300);

#[derive(Debug, Serialize, Default)]
pub struct Report {
    pub seconds: u64,
    pub kills: Vec<(String, u32)>,
    pub rounds: u64,
    pub attest_retries: u64,
    pub longest_round_secs: u64,
    pub io_errors: u64,
    pub pcr_violations: u64,
    pub kernel_io_errors: Vec<String>,
    /// Restarts as `ps` counted them at the end, per service.
    pub restarts: Vec<(String, u64)>,
    pub failed_services: Vec<String>,
    pub held: bool,
}

/// Whether the manifest lets the tpm-gateway keep QEMU's connection across its restarts.
fn gateway_survives(manifest_text: &str) -> bool {
    let Some(at) = manifest_text.find("name = \"tpm-gateway\"") else {
        return false;
    };
    let section = &manifest_text[at..];
    let section = &section[..section.find("\n[[").unwrap_or(section.len())];
    section.contains("fd-store")
}

/// The guest's loop for `seconds`.
fn script(seconds: u64) -> String {
    r#"
grep -q '^mounted' /run/pv/disk || { echo "chaos: FAIL no data disk: $(cat /run/pv/disk)"; exit 4; }
KBS="$(sed -n 's/.*pv\.kbs=\([^ ]*\).*/\1/p' /proc/cmdline)"
end=$(( $(date +%s) + SECONDS_ ))
round=0 retries=0 ioerr=0 pcrbad=0 longest=0
expect=$(cat /sys/class/tpm/tpm0/pcr-sha256/16 | tr A-F a-f)
first=$(cat /sys/class/tpm/tpm0/pcr-sha256/0)
while [ "$(date +%s)" -lt "$end" ]; do
    round=$((round + 1)); t0=$(date +%s)
    # 1. Attestation: retried while the client says retryable.
    while :; do
        pv-attest --kbs "$KBS" --secret-out /tmp/secret 2>/tmp/err
        rc=$?
        [ $rc -eq 0 ] && break
        if [ $rc -eq 75 ]; then
            retries=$((retries + 1)); echo "chaos: retry: $(tail -n 1 /tmp/err)"; sleep 1; continue
        fi
        echo "chaos: FAIL attestation exit $rc: $(cat /tmp/err)"; exit 5
    done
    rm -f /tmp/secret
    # 2. Disk: 1 MiB through the LUKS disk and our storage, read back from the device.
    dd if=/dev/urandom of=/tmp/blob bs=64k count=16 2>/dev/null
    want=$(sha256sum </tmp/blob)
    f=/mnt/data/blob.$((round % 4))
    if ! cp /tmp/blob "$f" || ! sync; then ioerr=$((ioerr + 1)); echo "chaos: IO write error"; fi
    echo 3 >/proc/sys/vm/drop_caches
    got=$(sha256sum <"$f") || got=unreadable
    [ "$got" = "$want" ] || { ioerr=$((ioerr + 1)); echo "chaos: IO read back differs"; }
    # 3. PCR 16 extended once per round; the value must be the chain of our extends.
    d=$(printf 'round %s' "$round" | sha256sum | cut -d' ' -f1)
    next=$(printf '%s%s' "$expect" "$d" | xxd -r -p | sha256sum | cut -d' ' -f1)
    n=0
    while :; do
        tpm2_pcrextend "16:sha256=$d" 2>/tmp/err
        now=$(cat /sys/class/tpm/tpm0/pcr-sha256/16 | tr A-F a-f)
        [ "$now" = "$next" ] && break
        if [ "$now" != "$expect" ] || [ $n -ge 30 ]; then
            pcrbad=$((pcrbad + 1)); echo "chaos: PCR16 is $now, want $next (before: $expect)"; next=$now; break
        fi
        n=$((n + 1)); retries=$((retries + 1)); echo "chaos: retry: extend: $(tail -n 1 /tmp/err)"; sleep 1
    done
    expect=$next
    [ "$(cat /sys/class/tpm/tpm0/pcr-sha256/0)" = "$first" ] || { pcrbad=$((pcrbad + 1)); echo "chaos: PCR0 changed"; }
    secs=$(( $(date +%s) - t0 )); [ $secs -gt $longest ] && longest=$secs
    echo "chaos: round $round ok in ${secs}s"
done
dmesg | grep -iE 'I/O error|blk_update_request|Buffer I/O|EXT4-fs error|tpm_transmit' | sed 's/^/chaos: kernel: /'
echo "chaos: done rounds=$round retries=$retries ioerrors=$ioerr pcrviolations=$pcrbad longest=$longest"
exit 0
"#
    .replace("SECONDS_", &seconds.to_string())
}

/// A small random number from the kernel (no generator state to seed or keep).
fn random_below(n: u64) -> u64 {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    u64::from_le_bytes(b) % n.max(1)
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

pub fn run(
    manifest: &Path,
    bin_dir: &Path,
    dir: &Path,
    image_script: &Path,
    seconds: u64,
) -> std::io::Result<Report> {
    let shipped = std::fs::read_to_string(manifest)?;
    let with_gateway = gateway_survives(&shipped);
    let mut victims: Vec<&str> = VICTIMS.to_vec();
    if with_gateway {
        victims.push("tpm-gateway");
    } else {
        eprintln!(
            "{PROGRESS} the manifest's tpm-gateway keeps no connections across restarts \
             (no fd-store): it is not killed (QEMU's TPM would be gone)"
        );
    }
    let mut text = shipped.clone();
    for s in VICTIMS.iter().chain(["tpm-gateway"].iter()) {
        text = crate::bench_storage::with_restart_policy(&text, s, RESTART_POLICY).map_err(err)?;
    }
    let manifest = dir.join("manifest.toml");
    std::fs::write(&manifest, &text)?;
    let paravisor = bin_dir.join("paravisor");
    let image = linux_guest::build_image(image_script).map_err(err)?;
    let platform = dir.join("platform");
    crate::provision::init(&platform).map_err(err)?;
    let network = cvm::Network::new("chaos")?;
    let mut broker = cvm::Broker::prepare(&paravisor, &dir.join("tenant"), &platform)?;
    let cmdline = cvm::guest_cmdline(true);
    let initrd = dir.join("initrd.img");
    linux_guest::initrd_with(
        &image.initrd,
        &[GuestFile::script(&script(seconds))],
        &initrd,
    )?;
    let pcr9 = cvm::expected_pcr9(&cmdline, &std::fs::read(&initrd)?);
    let measurement = cvm::measurement(&paravisor, &manifest, &image.kernel)?;
    broker.serve(
        &paravisor,
        &network,
        &cvm::Policy {
            measurements: vec![measurement],
            pcrs: vec![(9, vec![pcr9])],
            max_nonce_age: 60,
        },
    )?;
    let state = dir.join("state");
    let cmd = cvm::run_command(
        &paravisor,
        &manifest,
        &state,
        &platform,
        &image.kernel,
        &initrd,
        &cmdline,
        &network,
    );
    let mut guest = Running::spawn(cmd, &dir.join("paravisor.log"), PROGRESS)?;
    // The loop starts once /init has attested and mounted the disk: the first round's line.
    guest.line_with("chaos: round 1 ", Instant::now() + QUIET)?;
    eprintln!("{PROGRESS} the guest's loop runs; killing a random service every 2-5 s");
    let mut report = Report {
        seconds,
        ..Report::default()
    };
    let mut kills: Vec<(String, u32)> = victims.iter().map(|v| (v.to_string(), 0)).collect();
    let mut next_kill = Instant::now() + KILL_MIN;
    let done_line;
    loop {
        match guest.next_line(Instant::now() + Duration::from_millis(100)) {
            Ok(line) if line.starts_with("chaos: done") => {
                done_line = line;
                break;
            }
            Ok(line) if line.starts_with("chaos: FAIL") => {
                return Err(guest.failure(&format!("the guest failed: {line}")));
            }
            Ok(line) if line.starts_with("chaos: kernel: ") => {
                report
                    .kernel_io_errors
                    .push(line["chaos: kernel: ".len()..].to_string());
            }
            Ok(_) => {}
            Err("timed out") => {}
            Err(why) => return Err(guest.failure(&format!("{why} before its last round"))),
        }
        if Instant::now() >= next_kill {
            let k = random_below(victims.len() as u64) as usize;
            let out = std::process::Command::new(&paravisor)
                .args(["kill", victims[k], "--state-dir"])
                .arg(&state)
                .output()?;
            if out.status.success() {
                kills[k].1 += 1;
            } else {
                eprintln!(
                    "{PROGRESS} kill {} failed: {}",
                    victims[k],
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            let spread = (KILL_MAX - KILL_MIN).as_millis() as u64;
            next_kill = Instant::now() + KILL_MIN + Duration::from_millis(random_below(spread));
        }
    }
    report.rounds = field(&done_line, "rounds");
    report.attest_retries = field(&done_line, "retries");
    report.io_errors = field(&done_line, "ioerrors");
    report.pcr_violations = field(&done_line, "pcrviolations");
    report.longest_round_secs = field(&done_line, "longest");
    report.kills = kills;
    // The services as `ps` sees them before the run ends.
    let ps = std::process::Command::new(&paravisor)
        .args(["ps", "--json", "--state-dir"])
        .arg(&state)
        .output()?;
    if let Ok(rows) = serde_json::from_slice::<serde_json::Value>(&ps.stdout) {
        for row in rows.as_array().into_iter().flatten() {
            let name = row["name"].as_str().unwrap_or("?").to_string();
            report
                .restarts
                .push((name.clone(), row["restarts"].as_u64().unwrap_or(0)));
            if row["state"].as_str() == Some("failed") {
                report.failed_services.push(name);
            }
        }
    }
    let status = guest.exit_status(Instant::now() + QUIET)?;
    report.held = status == 0
        && report.io_errors == 0
        && report.pcr_violations == 0
        && report.kernel_io_errors.is_empty()
        && report.failed_services.is_empty()
        && report.rounds > 0;
    broker.stop();
    Ok(report)
}

pub fn text(r: &Report) -> String {
    let kills: u32 = r.kills.iter().map(|(_, n)| n).sum();
    let per: Vec<String> = r.kills.iter().map(|(s, n)| format!("{s} {n}")).collect();
    let restarts: Vec<String> = r
        .restarts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    format!(
        "chaos for {} s: {kills} kills ({})\n\
         \x20 guest rounds (attest + 1 MiB disk + PCR extend)  {}\n\
         \x20 attestation/TPM retries                          {}\n\
         \x20 longest round (longest stall)                    {} s\n\
         \x20 I/O errors / PCR violations / kernel errors      {} / {} / {}\n\
         \x20 restarts (ps)                                    {}\n\
         \x20 failed services                                  {}\n\
         invariants {}\n",
        r.seconds,
        per.join(", "),
        r.rounds,
        r.attest_retries,
        r.longest_round_secs,
        r.io_errors,
        r.pcr_violations,
        r.kernel_io_errors.len(),
        restarts.join(", "),
        if r.failed_services.is_empty() {
            "none".to_string()
        } else {
            r.failed_services.join(", ")
        },
        if r.held { "HELD" } else { "BROKEN" }
    )
}
