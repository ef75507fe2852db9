//! Who may drive the vTPM (issue 12, items 2, 6 and 7), each attack performed for real:
//! a client without the register grant drives the guest's TIS registers; register accesses
//! under invented vCPU ids try to fill the checkpoint region; a client not granted commands
//! or platform signals sends them; network clients use localities 2 and 4 for the guest's
//! DRTM PCRs; front ends reachable without being asked for, a Unix socket others can reach;
//! a power-off through the platform port while the guest uses its TPM.

mod common;

use std::io::Read;
use std::io::Write;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::ExitStatus;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use common::*;

/// All seven services of the shipped manifest.
const SHIPPED_SERVICES: usize = 7;

fn kvm_available(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: no /dev/kvm (or no access to it): {test} needs KVM");
    }
    ok && sandbox_available(test)
}

/// The port the manifest text gives a listener.
fn port(manifest: &str, listener: &str) -> u16 {
    let at = manifest
        .find(&format!("name = \"{listener}\""))
        .expect("listener in the manifest");
    let rest = &manifest[at..];
    let addr = rest.split("address = \"").nth(1).expect("address");
    addr[..addr.find('"').expect("quote")]
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

/// A hostile vtpm client (pv-hostile) with a plain `calls = [{ endpoint = "vtpm" }]`.
fn hostile_vtpm_client(name: &str, args: &str) -> String {
    service(
        name,
        "pv-hostile",
        &format!(
            "calls = [{{ endpoint = \"vtpm\" }}]\nargs = [{args}]\nwatchdog = \"60s\"\n{RESTART_NEVER}"
        ),
    )
}

/// Waits until `log()` contains `needle`.
fn wait_for(log: impl Fn() -> String, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = log();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} within {timeout:?}; log:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One mssim TPM_SEND_COMMAND at `locality`; the TPM's response (or an empty vector if the
/// connection was closed).
fn mssim_command(port: u16, locality: u8, command: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("mssim command port");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut frame = 8u32.to_be_bytes().to_vec();
    frame.push(locality);
    frame.extend_from_slice(&(command.len() as u32).to_be_bytes());
    frame.extend_from_slice(command);
    s.write_all(&frame).unwrap();
    let mut size = [0u8; 4];
    if s.read_exact(&mut size).is_err() {
        return Vec::new();
    }
    let mut response = vec![0u8; u32::from_be_bytes(size) as usize];
    s.read_exact(&mut response).unwrap();
    let mut trailer = [0u8; 4];
    s.read_exact(&mut trailer).unwrap();
    let _ = s.write_all(&20u32.to_be_bytes()); // session end
    response
}

/// The response code of a TPM response.
fn rc(response: &[u8]) -> u32 {
    assert!(response.len() >= 10, "not a TPM response: {response:?}");
    u32::from_be_bytes(response[6..10].try_into().unwrap())
}

const GET_RANDOM_8: [u8; 12] = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 8];
/// TPM_RC_LOCALITY.
const RC_LOCALITY: u32 = 0x907;

/// TPM2_PCR_Read of one SHA-256 PCR.
fn pcr_read(pcr: u8) -> Vec<u8> {
    let mut select = [0u8; 3];
    select[usize::from(pcr / 8)] = 1 << (pcr % 8);
    let mut c = vec![0x80, 1, 0, 0, 0, 20, 0, 0, 1, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3];
    c.extend_from_slice(&select);
    c
}

/// The SHA-256 value in a PCR_Read response.
fn pcr_value(response: &[u8]) -> Vec<u8> {
    assert_eq!(rc(response), 0, "PCR_Read failed: {response:02x?}");
    response[response.len() - 32..].to_vec()
}

/// A command with one handle and a password session (empty auth): PCR_Reset(pcr), or
/// PCR_Extend(pcr, SHA-256 of `digest`).
fn pcr_command(code: u32, pcr: u8, digest: Option<[u8; 32]>) -> Vec<u8> {
    let mut c = vec![0x80, 2, 0, 0, 0, 0];
    c.extend_from_slice(&code.to_be_bytes());
    c.extend_from_slice(&u32::from(pcr).to_be_bytes());
    // Authorization area: TPM_RS_PW, empty nonce, attributes 0, empty auth.
    c.extend_from_slice(&9u32.to_be_bytes());
    c.extend_from_slice(&0x4000_0009u32.to_be_bytes());
    c.extend_from_slice(&[0, 0, 0, 0, 0]);
    if let Some(d) = digest {
        c.extend_from_slice(&1u32.to_be_bytes()); // one digest
        c.extend_from_slice(&0x000bu16.to_be_bytes());
        c.extend_from_slice(&d);
    }
    let len = c.len() as u32;
    c[2..6].copy_from_slice(&len.to_be_bytes());
    c
}

const PCR_RESET: u32 = 0x13d;
const PCR_EXTEND: u32 = 0x182;

/// A `paravisor run` with the test guest: console and log in files; killed on drop.
struct GuestRun {
    dir: PathBuf,
    child: Child,
}

impl GuestRun {
    fn start(tag: &str, manifest_text: &str, args: &[&str]) -> GuestRun {
        let dir = scratch_dir(tag);
        let manifest = dir.join("manifest.toml");
        std::fs::write(&manifest, manifest_text).unwrap();
        let child = Command::new(paravisor())
            .arg("run")
            .arg(&manifest)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(args)
            .stdout(std::fs::File::create(dir.join("console.txt")).unwrap())
            .stderr(std::fs::File::create(dir.join("paravisor.log")).unwrap())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn paravisor run");
        GuestRun { dir, child }
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.txt")).unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("paravisor.log")).unwrap_or_default()
    }

    fn both(&self) -> String {
        format!("{}\n--- log ---\n{}", self.console(), self.log())
    }

    fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let until = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("the run did not end within {timeout:?}:\n{}", self.both());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for GuestRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_client_without_the_register_grant_cannot_take_the_guests_tpm_away() {
    let test = "a_client_without_the_register_grant_cannot_take_the_guests_tpm_away";
    if !kvm_available(test) {
        return;
    }
    // While the guest runs a loop of extends through the TIS registers, a hostile client of
    // vtpm seizes the TPM at locality 4 and writes its FIFO, as vCPU 0, over and over.
    let manifest = format!(
        "{}\n{}",
        shipped_text(),
        hostile_vtpm_client("hostile", "\"vtpm-seize\", \"30\"")
    );
    let mut run = GuestRun::start(
        "grant-seize",
        &manifest,
        &["--cmdline", "extends=1500 interrupt=0 unowned=0"],
    );
    let status = run.wait(Duration::from_secs(240));
    let all = run.both();
    assert_eq!(status.code(), Some(0), "the guest's session failed:\n{all}");
    for line in [
        "guest: ok   every extend of the loop answered",
        "guest: ok   extend loop: PCR16 equals the hash chain",
    ] {
        assert!(all.contains(line), "missing {line:?}:\n{all}");
    }
    // Refused, logged by vtpm with the caller's name.
    assert!(
        all.contains("client=hostile") && all.contains("register access"),
        "{all}"
    );
}

#[test]
fn register_accesses_under_invented_vcpu_ids_cannot_fill_the_checkpoint() {
    let test = "register_accesses_under_invented_vcpu_ids_cannot_fill_the_checkpoint";
    if !sandbox_available(test) {
        return;
    }
    let manifest = format!(
        "{}\n{}",
        shipped_text(),
        hostile_vtpm_client("hostile", "\"vtpm-vcpu-flood\", \"30000\"")
    );
    let inst = Instance::start_with(
        "grant-flood",
        &manifest,
        SHIPPED_SERVICES + 1,
        &["--listen", "mssim-command"],
    );
    let log = wait_for(
        || inst.log(),
        "vtpm vcpu flood done",
        Duration::from_secs(300),
    );
    assert!(
        log.contains("vtpm vcpu flood done: 0 accepted, 30000 refused"),
        "{log}"
    );
    // The checkpoint region survives restarts: a restart from it must succeed.
    let before = inst.row("vtpm")["restarts"].as_u64().unwrap();
    assert_eq!(before, 0, "{log}");
    let out = inst.pv(&["kill", "vtpm", "--signal", "KILL"]);
    assert!(out.status.success(), "{}", text(&out));
    inst.wait_until(Duration::from_secs(30), |rows| {
        rows.iter()
            .any(|r| r["name"] == "vtpm" && r["state"] == "running" && r["restarts"] == 1)
    });
    wait_for(
        || inst.log(),
        "resumed from its checkpoint",
        Duration::from_secs(30),
    );
    let mssim = port(&manifest, "mssim-command");
    let response = mssim_command(mssim, 0, &GET_RANDOM_8);
    assert_eq!(rc(&response), 0, "{}", inst.log());
    std::thread::sleep(Duration::from_secs(1));
    let row = inst.row("vtpm");
    assert_eq!(row["state"], "running", "{}", inst.log());
    assert_eq!(row["restarts"], 1, "{}", inst.log());
    // Every refusal counted.
    assert!(row["refused"].as_u64().unwrap() >= 30000, "{row}");
}

#[test]
fn a_client_not_granted_commands_or_platform_signals_is_refused_them() {
    let test = "a_client_not_granted_commands_or_platform_signals_is_refused_them";
    if !sandbox_available(test) {
        return;
    }
    let manifest = format!(
        "{}\n{}",
        shipped_text(),
        hostile_vtpm_client("hostile", "\"vtpm-requests\"")
    );
    let inst = Instance::start_with(
        "grant-requests",
        &manifest,
        SHIPPED_SERVICES + 1,
        &["--listen", "mssim-command"],
    );
    let log = wait_for(
        || inst.log(),
        "pv-hostile: vtpm register read",
        Duration::from_secs(30),
    );
    for line in [
        "pv-hostile: vtpm command: Ok(Error(NotGranted(Commands)))",
        "pv-hostile: vtpm platform power-off: Ok(Error(NotGranted(Platform)))",
        "pv-hostile: vtpm register read: Ok(Error(NotGranted(Registers)))",
    ] {
        assert!(log.contains(line), "missing {line:?}:\n{log}");
    }
    // The TPM was not powered off: the gateway's command (granted) still runs.
    let response = mssim_command(port(&manifest, "mssim-command"), 0, &GET_RANDOM_8);
    assert_eq!(rc(&response), 0, "{}", inst.log());
    assert!(inst.row("vtpm")["refused"].as_u64().unwrap() >= 3);
    assert!(inst.log().contains("client=hostile"), "{}", inst.log());
    // `audit` names what each client of vtpm may do, and where the guest's grant comes from.
    let out = pv(&["audit", inst.manifest.to_str().unwrap()]);
    let audit = text(&out);
    for needle in [
        "tpm-gateway on vtpm: TPM commands at localities [0], platform signals",
        "hostile on vtpm: nothing beyond ping",
        "register access",
    ] {
        assert!(audit.contains(needle), "missing {needle:?} in\n{audit}");
    }
}
