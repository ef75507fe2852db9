//! The confidential VM on this machine: `paravisor run --vmm qemu` starts QEMU (the host's
//! VMM) on the services' vTPM, disk and NIC, boots an unmodified Debian kernel through UEFI
//! measured boot, and ends with the guest's status; stopping either side stops the other.

mod common;

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use common::linux;
use pv_tools::linux_guest::GuestFile;

/// The guest's kernel command line (quiet: the console carries the test's lines).
const CMDLINE: &str = "console=ttyS0 quiet loglevel=4 panic=-1";
/// A run ends within this after its last console line, or it is declared hung (OVMF under
/// TCG is silent for ~15 s while it hashes the initrd).
const QUIET: Duration = Duration::from_secs(300);

/// The image, QEMU and UEFI, or a SKIPPED line.
fn ready(test: &str) -> Option<linux::Image> {
    if !common::sandbox_available(test) {
        return None;
    }
    linux::uefi_image(test, &[])
}

/// The image's initrd with `script` as the test script, in `dir`.
fn initrd(image: &linux::Image, dir: &Path, script: &str) -> PathBuf {
    let path = dir.join("initrd.img");
    pv_tools::linux_guest::initrd_with(&image.initrd, &[GuestFile::script(script)], &path)
        .expect("initrd with the test script");
    path
}

/// A `paravisor run --vmm qemu` and the directory of its initrd (removed with it).
struct CvmRun {
    run: common::GuestRun,
    scratch: PathBuf,
}

impl std::ops::Deref for CvmRun {
    type Target = common::GuestRun;
    fn deref(&self) -> &common::GuestRun {
        &self.run
    }
}

impl std::ops::DerefMut for CvmRun {
    fn deref_mut(&mut self) -> &mut common::GuestRun {
        &mut self.run
    }
}

impl Drop for CvmRun {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// `paravisor run --vmm qemu` of `image` with `script`.
fn run(tag: &str, image: &linux::Image, script: &str, more: &[&str]) -> CvmRun {
    let dir = common::scratch_dir(tag);
    let initrd = initrd(image, &dir, script);
    let platform = common::test_platform_dir();
    let mut args = vec![
        "--platform-dir",
        platform.to_str().unwrap(),
        "--vmm",
        "qemu",
        "--kernel",
        image.kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--cmdline",
        CMDLINE,
    ];
    args.extend_from_slice(more);
    let run = common::GuestRun::start(tag, &common::shipped_text(), &args);
    CvmRun { run, scratch: dir }
}

/// QEMU's pid, from the run's log.
fn qemu_pid(run: &CvmRun) -> i32 {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let log = run.log();
        if let Some(line) = log.lines().find(|l| l.contains("QEMU started")) {
            let pid = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("pid="))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("no pid in {line}"));
            return pid;
        }
        assert!(
            Instant::now() < until,
            "QEMU did not start:\n{}",
            run.both()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn run_vmm_qemu_boots_linux_on_our_tpm_disk_and_nic_and_ends_with_its_status() {
    let test = "run_vmm_qemu_boots_linux_on_our_tpm_disk_and_nic_and_ends_with_its_status";
    let Some(image) = ready(test) else { return };
    // PCR 9 holds the kernel's measurement of the initrd (UEFI measured boot); PCR 0 the
    // firmware's. The disk is pv-storage's vhost-user-blk, the NIC pv-net's.
    let script = r#"
        for i in 0 9; do echo "PCR$i=$(cat /sys/class/tpm/tpm0/pcr-sha256/$i)"; done
        test -b /dev/vda && echo "DISK=vda"
        ip link show eth0 >/dev/null && echo "NIC=eth0"
        exit 7
    "#;
    let mut run = run("vmm-qemu", &image, script, &[]);
    let status = run.wait(QUIET);
    let console = run.console();
    assert_eq!(status.code(), Some(7), "{}", run.both());
    for want in ["DISK=vda", "NIC=eth0", "PV-EXIT 7"] {
        assert!(console.contains(want), "{want}:\n{}", run.both());
    }
    let zero = "0".repeat(64);
    for pcr in ["PCR0=", "PCR9="] {
        let value = console
            .lines()
            .find_map(|l| l.trim().strip_prefix(pcr))
            .unwrap_or_else(|| panic!("no {pcr}:\n{}", run.both()));
        assert_eq!(value.len(), 64, "{pcr}{value}");
        assert_ne!(value, zero, "{pcr} was never extended:\n{}", run.both());
    }
    // QEMU is recorded, not measured: the report's measurement is the paravisor's alone,
    // what `measure` says without a guest.
    let log: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&run.state_dir()).join("launch-log.json")).unwrap(),
    )
    .unwrap();
    let vmm = &log["host_vmm"];
    assert_eq!(vmm["program"], "qemu-system-x86_64", "{log:#}");
    let args: Vec<&str> = vmm["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(args.contains(&"tpm-crb,tpmdev=tpm0"), "{args:?}");
    assert!(
        args.iter().any(|a| a.starts_with("vhost-user-blk-pci")),
        "{args:?}"
    );
    let manifest = run.dir.join("manifest.toml");
    let measure = common::pv(&[
        "measure",
        manifest.to_str().unwrap(),
        "--vmm",
        "qemu",
        "--kernel",
        image.kernel.to_str().unwrap(),
        "--json",
    ]);
    let reference: serde_json::Value = serde_json::from_slice(&measure.stdout).unwrap();
    assert_eq!(
        log["measurement"],
        reference["measurement"],
        "{}",
        common::text(&measure)
    );
}

#[test]
fn a_qemu_that_dies_ends_the_run_and_a_stopped_paravisor_stops_its_qemu() {
    let test = "a_qemu_that_dies_ends_the_run_and_a_stopped_paravisor_stops_its_qemu";
    let Some(image) = ready(test) else { return };
    let script = "echo READY; sleep 3600";

    // QEMU killed: the run ends, with a failure, and takes the services down.
    let mut run = run("vmm-dies", &image, script, &[]);
    let pid = qemu_pid(&run);
    run.wait_for_console("READY", QUIET);
    assert!(common::alive(pid));
    // SAFETY-free kill: through the kill command.
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = run.wait(QUIET);
    assert_eq!(status.code(), Some(1), "{}", run.both());
    assert!(
        run.log().contains("QEMU was killed by signal 9"),
        "{}",
        run.both()
    );

    // The paravisor stopped: QEMU goes with it, and the run exits 0.
    let mut run2 = run_again(&image, script);
    let pid = qemu_pid(&run2);
    run2.wait_for_console("READY", QUIET);
    let stop = common::pv(&["stop", "--state-dir", &run2.state_dir()]);
    assert!(stop.status.success(), "{}", common::text(&stop));
    let status = run2.wait(QUIET);
    assert_eq!(status.code(), Some(0), "{}", run2.both());
    let until = Instant::now() + Duration::from_secs(30);
    while common::alive(pid) {
        assert!(Instant::now() < until, "QEMU {pid} outlived the paravisor");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(run2.log().contains("QEMU stopped"), "{}", run2.both());
}

fn run_again(image: &linux::Image, script: &str) -> CvmRun {
    run("vmm-stop", image, script, &[])
}

/// The guest keeps using its TPM (reads PCR 0 through sysfs, extends PCR 16 through
/// /dev/tpm0) while the TPM gateway between QEMU and the vTPM is killed again and again:
/// QEMU's connection survives each kill (the gateway's fd store), the guest sees no error,
/// PCR 0 never changes, and PCR 16 is exactly the chain of the extends the guest made.
#[test]
fn the_guest_uses_its_tpm_without_an_error_while_the_gateway_is_killed() {
    let test = "the_guest_uses_its_tpm_without_an_error_while_the_gateway_is_killed";
    let Some(image) = ready(test) else { return };
    // TPM2_PCR_Extend of PCR 16 with a SHA-256 digest of 32 bytes 0x01 (password session),
    // written whole (one write) to /dev/tpm0; its response read whole.
    let script = r#"
        printf '\200\002\000\000\000\101\000\000\001\202\000\000\000\020\000\000\000\011\100\000\000\011\000\000\001\000\000\000\000\000\001\000\013' > /tmp/extend
        i=0; while [ $i -lt 32 ]; do printf '\001' >> /tmp/extend; i=$((i+1)); done
        first=$(cat /sys/class/tpm/tpm0/pcr-sha256/0) || { echo "READ-FAILED first"; exit 3; }
        echo "PCR0=$first"
        exec 3<>/dev/tpm0 || { echo "NO-TPM0"; exit 3; }
        echo READY
        reads=0; extends=0
        end=$(( $(date +%s) + 30 ))
        while [ "$(date +%s)" -lt "$end" ]; do
            v=$(cat /sys/class/tpm/tpm0/pcr-sha256/0) || { echo "READ-FAILED $reads"; exit 4; }
            [ "$v" = "$first" ] || { echo "PCR0-CHANGED $reads $v"; exit 5; }
            reads=$((reads+1))
            dd if=/tmp/extend bs=4096 count=1 >&3 2>/dev/null || { echo "EXTEND-FAILED $extends"; exit 6; }
            r=$(dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1 | tr -d ' \n')
            case "$r" in 80020000001300000000*) ;; *) echo "EXTEND-ANSWER $extends $r"; exit 6;; esac
            extends=$((extends+1))
        done
        echo "READS=$reads EXTENDS=$extends"
        echo "PCR16=$(cat /sys/class/tpm/tpm0/pcr-sha256/16)"
        exit 7
    "#;
    let mut run = run("vmm-gw-kill", &image, script, &[]);
    run.wait_for_console("READY", QUIET);
    let mut killed = 0;
    for _ in 0..4 {
        std::thread::sleep(Duration::from_secs(4));
        if run.console().contains("READS=") {
            break;
        }
        let out = common::pv(&["kill", "tpm-gateway", "--state-dir", &run.state_dir()]);
        assert!(out.status.success(), "{}", common::text(&out));
        killed += 1;
    }
    let status = run.wait(QUIET);
    let console = run.console();
    assert_eq!(status.code(), Some(7), "{}", run.both());
    assert!(killed >= 3, "the guest was done after {killed} kills");
    for bad in ["tpm_transmit", "tpm_try_transmit", "tpm tpm0:"] {
        assert!(
            !console.contains(bad),
            "the guest saw {bad}:\n{}",
            run.both()
        );
    }
    let counts = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("READS="))
        .unwrap_or_else(|| panic!("no counts:\n{}", run.both()));
    let extends: usize = counts
        .split("EXTENDS=")
        .nth(1)
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{counts}"));
    assert!(extends > 0, "{counts}");
    use sha2::Digest;
    let mut pcr = [0u8; 32];
    for _ in 0..extends {
        let mut h = sha2::Sha256::new();
        h.update(pcr);
        h.update([1u8; 32]);
        pcr = h.finalize().into();
    }
    let expected: String = pcr.iter().map(|b| format!("{b:02X}")).collect();
    let got = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("PCR16="))
        .unwrap_or_else(|| panic!("no PCR16:\n{}", run.both()));
    assert_eq!(
        got.to_uppercase(),
        expected,
        "PCR 16 after {extends} extends ({counts}); {killed} kills:\n{}",
        run.log()
    );
    eprintln!("{killed} kills of tpm-gateway under the guest: {counts}");
    let restarts = run.log().matches("connection taken back").count();
    assert!(restarts >= killed, "{}", run.log());
}
