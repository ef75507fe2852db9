//! QEMU uses our vTPM in place of swtpm (`-tpmdev emulator` on the paravisor's Unix control
//! socket): its default firmware (SeaBIOS) measures the boot into our PCRs 0-7.

mod common;

use std::process::Command;
use std::time::Duration;
use std::time::Instant;

/// Whether `program` runs (the test says SKIPPED loudly if not).
fn installed(test: &str, program: &str, package: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: {test}: {program} is not installed (apt-get install {package})");
    }
    ok
}

/// QEMU, killed when the test ends however it ends.
struct Qemu(std::process::Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The README's QEMU example: QEMU's default firmware (SeaBIOS' bios-256k.bin) on our vTPM
/// through the Unix front end (`tpm-crb` on q35) measures PCRs 0-7; tpm2-tools read them
/// through the mssim front end while QEMU runs. (Debian's 128 KiB `bios.bin` has no TPM
/// support and measures nothing: the example does not pass `-bios`.)
#[test]
fn qemus_default_firmware_measures_pcrs_0_to_7_into_our_tpm() {
    let test = "qemus_default_firmware_measures_pcrs_0_to_7_into_our_tpm";
    if !common::sandbox_available(test)
        || !installed(test, "tpm2_pcrread", "tpm2-tools")
        || !installed(test, "qemu-system-x86_64", "qemu-system-x86")
    {
        return;
    }
    use sha2::Digest;
    let manifest = common::shipped_text();
    let inst = common::Instance::start_with(
        "qemu-firmware",
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
    let sock = inst.dir.join("state/tpm/swtpm-sock");
    let console = inst.dir.join("console.txt");
    let mut qemu = Qemu(
        Command::new("qemu-system-x86_64")
            .args(["-machine", "q35", "-m", "128", "-nographic", "-nodefaults"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-chardev")
            .arg(format!("socket,id=chrtpm,path={}", sock.display()))
            .args(["-tpmdev", "emulator,id=tpm0,chardev=chrtpm"])
            .args(["-device", "tpm-crb,tpmdev=tpm0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64"),
    );
    // The firmware has measured everything once it gives up looking for a boot disk.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("No bootable device")
    {
        if let Some(status) = qemu.0.try_wait().unwrap() {
            panic!(
                "qemu ended ({status}) before its firmware was done:\n{}",
                inst.log()
            );
        }
        assert!(Instant::now() < deadline, "SeaBIOS hangs:\n{}", inst.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let tcti = format!(
        "mssim:host=127.0.0.1,port={}",
        common::port(&manifest, "mssim-command")
    );
    let out = Command::new("tpm2_pcrread")
        .args(["-T", &tcti, "sha256:0,1,2,3,4,5,6,7,8,9", "-o"])
        .arg(inst.dir.join("pcrs.bin"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    drop(qemu);
    assert_eq!(inst.row("vtpm")["restarts"], 0, "{}", inst.log());
    let bytes = std::fs::read(inst.dir.join("pcrs.bin")).unwrap();
    assert_eq!(bytes.len(), 10 * 32, "ten SHA-256 PCRs");
    let pcr = |i: usize| &bytes[i * 32..(i + 1) * 32];
    for i in 0..8 {
        assert_ne!(pcr(i), &[0u8; 32], "PCR {i} was not measured");
    }
    for i in 8..10 {
        assert_eq!(pcr(i), &[0u8; 32], "PCR {i} was measured");
    }
    // PCR 7 holds the separator alone: its value is one extend of the separator event's
    // digest, so the TPM measured what the firmware sent, byte for byte.
    let separator = |data: [u8; 4]| -> Vec<u8> {
        let mut h = sha2::Sha256::new();
        h.update([0u8; 32]);
        h.update(sha2::Sha256::digest(data));
        h.finalize().to_vec()
    };
    assert!(
        pcr(7) == separator([0xff; 4]).as_slice() || pcr(7) == separator([0; 4]).as_slice(),
        "PCR 7 is not one separator extend: {:02x?}",
        pcr(7)
    );
}
