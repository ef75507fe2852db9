//! The vTPM against the real tools: `tpm2-tools` through our mssim and swtpm front ends,
//! side by side with `swtpm` itself; state that survives a full stop and start; no state in
//! clear on disk; exactly-once extends across `kill -9` of pv-vtpm; hostile clients.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use std::time::Instant;

use common::port;
use common::sandbox_available;
use common::scratch_dir;
use common::Instance;

/// The front ends these tests use: every one the manifest declares (off unless asked for).
const FRONT_ENDS: &[&str] = &["--listen", "all"];

/// Whether tpm2-tools are installed (the tests say so loudly if not).
fn tools_available(test: &str) -> bool {
    let ok = Command::new("tpm2_startup")
        .arg("--version")
        .output()
        .is_ok();
    if !ok {
        eprintln!("SKIPPED: {test}: tpm2-tools are not installed (apt-get install tpm2-tools)");
    }
    ok
}

fn script() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/tpm2_compat.sh"
    ))
}

/// Runs the compatibility script with `tcti`; step name -> result line.
fn run_script(tcti: &str, dir: &Path) -> BTreeMap<String, String> {
    std::fs::create_dir_all(dir).unwrap();
    let out = Command::new("bash")
        .arg(script())
        .arg(dir)
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .expect("bash");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (verdict, rest) = l.split_once(' ')?;
            let name = rest.split(':').next()?.to_string();
            let detail = rest.strip_prefix(name.as_str()).unwrap_or("").to_string();
            Some((name, format!("{verdict}{detail}")))
        })
        .collect()
}

/// Sends one mssim platform signal and reads its acknowledgement.
fn platform_signal(port: u16, code: u32) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("platform port");
    s.write_all(&code.to_be_bytes()).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    s.write_all(&20u32.to_be_bytes()).unwrap(); // session end
}

/// A paravisor started by a test, stopped when the test ends however it ends.
struct StopOnDrop(Option<std::process::Child>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct Swtpm(std::process::Child);

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// swtpm on two free loopback ports, if installed.
fn start_swtpm(dir: &Path) -> Option<(Swtpm, u16)> {
    let (data, ctrl) = common::adjacent_ports();
    std::fs::create_dir_all(dir).unwrap();
    let child = Command::new("swtpm")
        .args(["socket", "--tpm2", "--flags", "not-need-init"])
        .arg("--server")
        .arg(format!("type=tcp,port={data},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
        .arg("--tpmstate")
        .arg(format!("dir={}", dir.display()))
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", data)).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((Swtpm(child), data))
}

#[test]
fn tpm2_tools_work_against_our_vtpm_as_against_swtpm() {
    if !sandbox_available("tpm2_tools_work_against_our_vtpm_as_against_swtpm")
        || !tools_available("tpm2_tools_work_against_our_vtpm_as_against_swtpm")
    {
        return;
    }
    let manifest = common::shipped_text();
    let inst = Instance::start_with("tools", &manifest, 7, FRONT_ENDS);
    let (mssim, platform, swtpm_data) = (
        port(&manifest, "mssim-command"),
        port(&manifest, "mssim-platform"),
        port(&manifest, "swtpm-data"),
    );
    // The shipped TPM starts itself (--startup-clear); the script starts it, so begin with a
    // power cycle, as a machine's boot would.
    platform_signal(platform, 17);
    let ours_mssim = run_script(
        &format!("mssim:host=127.0.0.1,port={mssim}"),
        &inst.dir.join("mssim"),
    );
    // A power cycle, then the same list through the swtpm front end.
    platform_signal(platform, 17);
    let ours_swtpm = run_script(
        &format!("swtpm:host=127.0.0.1,port={swtpm_data}"),
        &inst.dir.join("swtpm-fe"),
    );
    let reference = match start_swtpm(&inst.dir.join("swtpm-state")) {
        Some((_swtpm, port)) => Some(run_script(
            &format!("swtpm:host=127.0.0.1,port={port}"),
            &inst.dir.join("swtpm-ref"),
        )),
        None => {
            eprintln!("NOTE: swtpm is not installed; comparing against our own results only");
            None
        }
    };
    println!(
        "{:<28} {:<8} {:<8} {:<8}",
        "tpm2-tools step", "ours/ms", "ours/sw", "swtpm"
    );
    let mut failures = Vec::new();
    for (step, ours) in &ours_mssim {
        let other = ours_swtpm.get(step).map_or("-", |s| &s[..4]);
        let reference = reference
            .as_ref()
            .and_then(|r| r.get(step))
            .map_or("-", |s| &s[..4]);
        println!("{step:<28} {:<8} {other:<8} {reference:<8}", &ours[..4]);
        if !ours.starts_with("PASS") {
            failures.push(format!("{step} (mssim): {ours}"));
        }
        if other != "PASS" {
            failures.push(format!(
                "{step} (swtpm front end): {:?}",
                ours_swtpm.get(step)
            ));
        }
    }
    assert!(
        ours_mssim.len() >= 49,
        "script ran {} steps",
        ours_mssim.len()
    );
    assert!(
        failures.is_empty(),
        "failing steps:\n{}\nlog:\n{}",
        failures.join("\n"),
        inst.log()
    );
}

fn tools(tcti: &str, dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .current_dir(dir)
        .env("TPM2TOOLS_TCTI", tcti)
        .output()
        .expect("tool")
}

fn ok(o: &std::process::Output) -> String {
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn persistent_objects_and_nv_indices_survive_a_full_restart_and_are_not_on_disk_in_clear() {
    if !sandbox_available("persistent_objects_survive_a_full_restart")
        || !tools_available("persistent_objects_survive_a_full_restart")
    {
        return;
    }
    let manifest = common::shipped_text();
    let mut inst = Instance::start_with("tpm-persist", &manifest, 7, FRONT_ENDS);
    let tcti = format!(
        "mssim:host=127.0.0.1,port={}",
        port(&manifest, "mssim-command")
    );
    let work = scratch_dir("tpm-persist-work");
    let secret = "NV-SECRET-4fd2c1a9e07b";
    std::fs::write(work.join("nv.bin"), secret).unwrap();
    platform_signal(port(&manifest, "mssim-platform"), 17);
    ok(&tools(&tcti, &work, &["tpm2_startup", "-c"]));
    ok(&tools(
        &tcti,
        &work,
        &["tpm2_createprimary", "-C", "o", "-c", "p.ctx"],
    ));
    ok(&tools(
        &tcti,
        &work,
        &["tpm2_evictcontrol", "-C", "o", "-c", "p.ctx", "0x81000100"],
    ));
    ok(&tools(
        &tcti,
        &work,
        &[
            "tpm2_nvdefine",
            "0x1500020",
            "-C",
            "o",
            "-s",
            "32",
            "-a",
            "ownerread|ownerwrite",
        ],
    ));
    ok(&tools(
        &tcti,
        &work,
        &["tpm2_nvwrite", "0x1500020", "-C", "o", "-i", "nv.bin"],
    ));
    assert_eq!(inst.stop().code(), Some(0));

    // On disk: the guest-state file is encrypted; the NV contents appear nowhere in it.
    let vmgs = std::fs::read(inst.dir.join("state/guest.vmgs")).unwrap();
    assert!(!vmgs.windows(secret.len()).any(|w| w == secret.as_bytes()));

    // A new paravisor on the same state directory: a fresh boot of the same TPM.
    let log = inst.dir.join("second.log");
    let child = Command::new(common::paravisor())
        .arg("run")
        .arg("--no-guest")
        .arg(&inst.manifest)
        .arg("--state-dir")
        .arg(inst.dir.join("state"))
        .args(FRONT_ENDS)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Stopped even if an assertion below fails.
    let mut child = StopOnDrop(Some(child));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("TPM front ends ready")
    {
        assert!(
            Instant::now() < deadline,
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(200));
    // The TPM started itself on this boot (--startup-clear): no tpm2_startup needed.
    let handles = ok(&tools(&tcti, &work, &["tpm2_getcap", "handles-persistent"]));
    assert!(handles.contains("0x81000100"), "{handles}");
    let nv = ok(&tools(
        &tcti,
        &work,
        &[
            "tpm2_nvread",
            "0x1500020",
            "-C",
            "o",
            "-s",
            &secret.len().to_string(),
        ],
    ));
    assert_eq!(nv, secret);
    let mut child = child.0.take().expect("running");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let _ = std::fs::remove_dir_all(work);
}

#[test]
fn kill_9_of_the_vtpm_during_pcr_extends_loses_and_duplicates_none() {
    if !sandbox_available("kill_9_of_the_vtpm_during_pcr_extends")
        || !tools_available("kill_9_of_the_vtpm_during_pcr_extends")
    {
        return;
    }
    use sha2::Digest;
    let manifest = common::shipped_text();
    let inst = Instance::start_with("tpm-kill", &manifest, 7, FRONT_ENDS);
    let tcti = format!(
        "mssim:host=127.0.0.1,port={}",
        port(&manifest, "mssim-command")
    );
    let work = scratch_dir("tpm-kill-work");
    let mut expected = [0u8; 32];
    let mut kills = 0;
    for i in 0..60u32 {
        let digest: [u8; 32] = sha2::Sha256::digest(i.to_be_bytes()).into();
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        // Between commands, and (in a thread) while one is in flight; four kills in all,
        // within the shipped restart policy (5 per minute).
        let killer = (i == 20 || i == 50).then(|| {
            let dir = inst.state_dir();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(2));
                common::pv(&["kill", "vtpm", "--signal", "KILL", "--state-dir", &dir])
            })
        });
        if i == 5 || i == 35 {
            let _ = inst.pv(&["kill", "vtpm", "--signal", "KILL"]);
            kills += 1;
        }
        ok(&tools(
            &tcti,
            &work,
            &["tpm2_pcrextend", &format!("16:sha256={hex}")],
        ));
        if let Some(k) = killer {
            let _ = k.join();
            kills += 1;
        }
        expected = sha2::Sha256::new()
            .chain_update(expected)
            .chain_update(digest)
            .finalize()
            .into();
    }
    let out = ok(&tools(
        &tcti,
        &work,
        &["tpm2_pcrread", "sha256:16", "-o", "pcr.bin"],
    ));
    let got = std::fs::read(work.join("pcr.bin")).unwrap();
    assert_eq!(
        got, expected,
        "PCR 16 is not the hash chain of the 60 extends\n{out}"
    );
    assert!(
        inst.row("vtpm")["restarts"].as_u64().unwrap() >= kills / 2,
        "{}",
        inst.log()
    );
    let _ = std::fs::remove_dir_all(work);
}

#[test]
fn hostile_clients_get_errors_or_closed_connections_never_a_dead_tpm() {
    if !sandbox_available("hostile_clients_get_errors_or_closed_connections") {
        return;
    }
    let manifest = common::shipped_text();
    let inst = Instance::start_with("tpm-hostile", &manifest, 7, FRONT_ENDS);
    let (mssim, swtpm) = (
        port(&manifest, "mssim-command"),
        port(&manifest, "swtpm-data"),
    );
    let exchange = |port: u16, bytes: &[u8]| -> Vec<u8> {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = s.write_all(bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    };
    // mssim: size field beyond the buffer; unknown code; bad locality; 1 MiB of garbage.
    let mut big = 8u32.to_be_bytes().to_vec();
    big.push(0);
    big.extend_from_slice(&0x7fff_ffffu32.to_be_bytes());
    assert!(exchange(mssim, &big).is_empty(), "closed without an answer");
    assert!(exchange(mssim, &0xdead_beefu32.to_be_bytes()).is_empty());
    let getrandom = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 8];
    let mut bad_loc = 8u32.to_be_bytes().to_vec();
    bad_loc.push(9);
    bad_loc.extend_from_slice(&(getrandom.len() as u32).to_be_bytes());
    bad_loc.extend_from_slice(&getrandom);
    let reply = exchange(mssim, &bad_loc);
    assert_eq!(
        &reply[4..6],
        &[0x80, 0x01],
        "a TPM error response: {reply:?}"
    );
    assert_ne!(&reply[10..14], &[0, 0, 0, 0]);
    let garbage: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let _ = exchange(mssim, &garbage);
    // swtpm data: truncated header, size larger than the data, then garbage.
    let _ = exchange(swtpm, &[0x80, 0x01, 0x00]);
    let _ = exchange(swtpm, &[0x80, 0x01, 0, 0, 0x10, 0, 0, 0, 1, 0x7b, 0, 8]);
    let _ = exchange(swtpm, &garbage);
    // The TPM still answers a well-formed command, and nothing restarted.
    let reply = exchange(swtpm, &getrandom);
    assert_eq!(reply.len(), 10 + 2 + 8, "8 random bytes: {reply:?}");
    assert_eq!(&reply[6..10], &[0, 0, 0, 0]);
    for service in ["vtpm", "tpm-gateway"] {
        assert_eq!(
            inst.row(service)["restarts"],
            0,
            "{service}: {}",
            inst.log()
        );
    }
}
