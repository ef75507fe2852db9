//! QEMU uses our vTPM in place of swtpm (`-tpmdev emulator` on the paravisor's Unix control
//! socket): its firmware (SeaBIOS) measures the boot into our PCRs.

mod common;

use std::io::Write;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use common::sandbox_available;
use common::Instance;

#[test]
fn qemu_firmware_measures_into_our_vtpm() {
    if !sandbox_available("qemu_firmware_measures_into_our_vtpm") {
        return;
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: qemu_firmware_measures_into_our_vtpm: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)");
        return;
    }
    let manifest = common::shipped_text();
    let inst = Instance::start_with(
        "qemu",
        &manifest,
        7,
        // QEMU's socket, and the mssim ports tpm2-tools read the PCRs through (its TCTI
        // connects to the platform port too).
        &[
            "--listen",
            "swtpm-control-unix",
            "--listen",
            "mssim-command",
            "--listen",
            "mssim-platform",
        ],
    );
    let socket = inst.dir.join("state/tpm/swtpm-sock");
    assert!(socket.exists(), "{}", inst.log());
    let mssim = manifest
        .split("name = \"mssim-command\", address = \"127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("mssim port")
        .to_string();
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-nographic",
            "-machine",
            "q35",
            "-m",
            "128",
            "-display",
            "none",
            "-serial",
            "none",
        ])
        .arg("-chardev")
        .arg(format!("socket,id=chrtpm,path={}", socket.display()))
        .args([
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
        ])
        .args(["-monitor", "stdio"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu");
    // The firmware runs without a boot disk: it measures itself and the configuration
    // into PCRs 0-7, then finds nothing to boot.
    let tcti = format!("mssim:host=127.0.0.1,port={mssim}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let pcr0 = loop {
        let out = Command::new("tpm2_pcrread")
            .args(["sha256:0"])
            .env("TPM2TOOLS_TCTI", &tcti)
            .output();
        let text = out
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        if let Some(v) = text.split("0 : 0x").nth(1) {
            let v = v.trim().to_string();
            if v.chars().any(|c| c != '0') {
                break v;
            }
        }
        assert!(
            Instant::now() < deadline,
            "PCR 0 never extended: {text}\n{}",
            inst.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = qemu.stdin.as_mut().map(|s| s.write_all(b"quit\n"));
    let out = qemu.wait_with_output().expect("qemu exits");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("tpm-emulator"),
        "QEMU complained about the TPM: {stderr}"
    );
    assert_eq!(pcr0.len(), 64, "{pcr0}");
    assert_eq!(inst.row("vtpm")["restarts"], 0, "{}", inst.log());
}
