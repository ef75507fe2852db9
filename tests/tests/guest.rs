//! The guest partition end to end: `paravisor run` boots the test guest (tests/guest) under
//! KVM; its exits reach intercept and vtpm in their own processes; its status becomes the
//! run's exit status.

mod common;

use std::time::Duration;
use std::time::Instant;

use common::*;

fn assert_lines(console: &str, log: &str, lines: &[&str]) {
    for line in lines {
        assert!(
            console.contains(line),
            "missing {line:?} on the console:\n{console}\n--- log ---\n{log}"
        );
    }
}

#[test]
fn test_guest_boots_runs_its_tpm_session_and_exits_zero() {
    if !kvm_available("test_guest_boots_runs_its_tpm_session_and_exits_zero") {
        return;
    }
    let started = Instant::now();
    let mut run = GuestRun::start("guest-boot", &shipped_text(), &[]);
    let status = run.wait(Duration::from_secs(120));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n--- log ---\n{log}");
    assert_lines(
        &console,
        &log,
        &[
            "guest: hello from ring 3",
            "guest: string I/O (rep outsb) reaches the console",
            "guest: pci 00:00.0 1b36:0008 class 060000",
            "guest: ok   TPM2_Startup(CLEAR)",
            "guest: ok   TPM2_GetRandom(16)",
            "guest: ok   TPM2_PCR_Extend(16)",
            "guest: ok   PCR16 = SHA-256(old || digest)",
            "guest: ok   extend loop: PCR16 equals the hash chain",
            "guest: ok   COM1 interrupt (line 4 -> IOAPIC -> vector 0x24) taken",
            "guest: all checks passed",
        ],
    );
    assert!(!console.contains("FAIL"), "{console}");
    eprintln!("guest run: {:?}", started.elapsed());
}

#[test]
fn unowned_accesses_and_msrs_reach_intercept_which_applies_its_policy() {
    if !kvm_available("unowned_accesses_and_msrs_reach_intercept_which_applies_its_policy") {
        return;
    }
    let mut run = GuestRun::start(
        "guest-unowned",
        &shipped_text(),
        &["--cmdline", "tpm=0 interrupt=0 unowned=1"],
    );
    let status = run.wait(Duration::from_secs(60));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n{log}");
    assert_lines(
        &console,
        &log,
        &[
            "guest: ok   unowned port 0x2ff reads 0xff, a write there is dropped",
            "guest: ok   unowned MMIO 0xfeb00000 reads all ones, a write there is dropped",
            "guest: ok   rdmsr of an unknown MSR is denied with #GP",
        ],
    );
    // The MSR went to intercept, which denied and logged it.
    assert!(
        log.contains("MSR denied") && log.contains("msr=0x400000ff"),
        "{log}"
    );
    // Intercept logged them and counted both kinds (its summary at shutdown).
    assert!(log.contains("address=0x2ff"), "{log}");
    assert!(log.contains("address=0xfeb00000"), "{log}");
    assert!(
        log.contains("unclaimed: port 2 reads 1 writes, mmio 2 reads 1 writes"),
        "{log}"
    );
}

#[test]
fn guest_that_triple_faults_ends_the_run_with_a_register_report() {
    if !kvm_available("guest_that_triple_faults_ends_the_run_with_a_register_report") {
        return;
    }
    let mut run = GuestRun::start(
        "guest-crash",
        &shipped_text(),
        &["--cmdline", "triple-fault=1"],
    );
    let status = run.wait(Duration::from_secs(60));
    let log = run.log();
    // intercept's status for a triple fault.
    assert_eq!(status.code(), Some(0x7d), "{log}");
    assert!(log.contains("guest stopped"), "{log}");
    assert!(
        log.contains("rip 0x") && log.contains("cr3 0x9000"),
        "{log}"
    );
    assert!(log.contains("triple-faulted"), "{log}");
}

#[test]
fn killed_vtpm_during_a_guest_extend_loop_loses_and_repeats_no_extend() {
    if !kvm_available("killed_vtpm_during_a_guest_extend_loop_loses_and_repeats_no_extend") {
        return;
    }
    let mut run = GuestRun::start(
        "guest-kill-vtpm",
        &shipped_text(),
        &["--cmdline", "extends=2500 interrupt=0 unowned=0"],
    );
    run.wait_for_console("extend loop of 2500 started", Duration::from_secs(60));
    let mut kills = 0;
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(600));
        if run.console().contains("every extend of the loop answered") {
            break;
        }
        let out = pv(&[
            "kill",
            "vtpm",
            "--signal",
            "KILL",
            "--state-dir",
            &run.state_dir(),
        ]);
        if out.status.success() {
            kills += 1;
        }
    }
    let status = run.wait(Duration::from_secs(180));
    let (console, log) = (run.console(), run.log());
    assert!(kills >= 1, "no kill landed during the loop:\n{console}");
    assert_eq!(status.code(), Some(0), "{console}\n--- log ---\n{log}");
    assert_lines(
        &console,
        &log,
        &[
            "guest: ok   every extend of the loop answered",
            "guest: ok   extend loop: PCR16 equals the hash chain",
        ],
    );
    // The TPM really was restarted under the running guest, each time from its checkpoint.
    assert_eq!(
        log.matches("resumed from its checkpoint").count(),
        kills,
        "{log}"
    );
    eprintln!("vtpm killed {kills} times during the loop");
}

#[test]
fn device_service_is_refused_an_interrupt_it_was_not_granted() {
    if !kvm_available("device_service_is_refused_an_interrupt_it_was_not_granted") {
        return;
    }
    let manifest = format!(
        "{}\n{}\n{RESTART_NEVER}\n",
        shipped_text(),
        service(
            "rogue",
            "pv-hostile",
            "args = [\"raise-interrupt\", \"5\", \"6\"]\ncalls = [{ endpoint = \"intercept\", interrupts = [5] }]"
        )
    );
    let mut run = GuestRun::start(
        "guest-irq-grant",
        &manifest,
        &["--keep-running", "--cmdline", "tpm=0 unowned=0"],
    );
    let until = Instant::now() + Duration::from_secs(60);
    while !run.log().contains("raise line 6") {
        assert!(Instant::now() < until, "{}", run.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = run.log();
    assert!(log.contains("pv-hostile: raise line 5: Raised"), "{log}");
    assert!(
        log.contains("pv-hostile: raise line 6: Error(NotGranted(Line(6)))"),
        "{log}"
    );
    // Intercept reported the refusal with the caller's name, and counted it.
    assert!(log.contains("rogue"), "{log}");
    let out = pv(&["ps", "--json", "--state-dir", &run.state_dir()]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("ps json");
    let intercept = rows.iter().find(|r| r["name"] == "intercept").unwrap();
    assert!(intercept["refused"].as_u64().unwrap() >= 1, "{intercept}");
    // ps shows the guest's vCPU and the exits each service answered.
    let out = pv(&["ps", "--state-dir", &run.state_dir()]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("vcpu0"), "{text}");
    assert!(
        intercept["guest_exits"].as_u64().unwrap() > 0,
        "{intercept}"
    );
    let _ = pv(&["stop", "--state-dir", &run.state_dir()]);
    let status = run.wait(Duration::from_secs(30));
    assert_eq!(status.code(), Some(0), "{}", run.both());
}

#[test]
fn a_failed_device_service_is_answered_as_unowned_and_the_guest_runs_on() {
    if !kvm_available("a_failed_device_service_is_answered_as_unowned_and_the_guest_runs_on") {
        return;
    }
    // intercept as shipped, and a "TPM" that dies at every start: after its restarts it is
    // marked failed, and its range must not hang the guest.
    let intercept = r#"[[service]]
name = "intercept"
binary = "pv-intercept"
serves = ["intercept"]
pio = [{ base = 0x3f8, size = 8 }, { base = 0xcf8, size = 8 }, { base = 0x60, size = 1 }, { base = 0x64, size = 1 }, { base = 0xf4, size = 1 }]
interrupts = [4]
limits = { memory = "128M", open-files = 32 }
restart = { policy = "always", max = 5, window = "60s", backoff = "50ms" }
"#;
    let manifest = format!(
        "{intercept}\n{}restart = {{ policy = \"on-failure\", max = 1, window = \"60s\", backoff = \"10ms\" }}\n",
        service(
            "broken-tpm",
            "pv-hostile",
            "args = [\"crash\"]\nserves = [\"vtpm\"]\nmmio = [{ base = 0xfed40000, size = 0x5000 }]"
        )
    );
    // The step after the TPM's (the COM1 interrupt) shows that the guest ran on.
    let mut run = GuestRun::start(
        "guest-failed-device",
        &manifest,
        &["--cmdline", "extends=0 interrupt=1 unowned=0"],
    );
    // Only catches a hang: the run's length depends on the machine's load.
    let status = run.wait(Duration::from_secs(600));
    let (console, log) = (run.console(), run.log());
    // The TPM check fails (the guest reads all ones), the guest ends on its own: status 1.
    assert_eq!(status.code(), Some(1), "{console}\n--- log ---\n{log}");
    assert!(log.contains("answered as unowned"), "{log}");
    assert!(log.contains("marked failed"), "{log}");
    // It saw no TPM at all and said so (rather than timing out in a session)...
    let no_tpm = console
        .find("guest: FAIL no TPM at 0xfed40000 (DID_VID 0xffffffff): TPM checks skipped")
        .unwrap_or_else(|| panic!("no 'no TPM' line:\n{console}"));
    assert!(!console.contains("FAIL Startup"), "{console}");
    // ...then ran its next step, and ended with exactly that one failure.
    let next = console
        .find("guest: ok   COM1 interrupt (line 4 -> IOAPIC -> vector 0x24) taken")
        .unwrap_or_else(|| panic!("the guest did not run on:\n{console}"));
    assert!(next > no_tpm, "{console}");
    assert!(console.contains("guest: 1 checks failed"), "{console}");
}

#[test]
fn config_accesses_of_a_pci_device_go_to_the_service_that_owns_it() {
    if !kvm_available("config_accesses_of_a_pci_device_go_to_the_service_that_owns_it") {
        return;
    }
    // vtpm owns device 00:03 (it has no config space: it answers all ones, so the guest
    // sees no device there); intercept's host bridge forwards instead of answering.
    // (The shipped storage's NVMe function is 00:03: it moves out of the way; net's virtio-net
    // function at 00:04 goes too, so that the one forwarded access is vtpm's.)
    let manifest = edited(&shipped_text(), |m| {
        remove(m, "service.storage.pci-device");
        remove(m, "service.net.pci-device");
        add(m, "service.vtpm.pci-device", "3");
    });
    assert!(manifest.contains("pci-device = 3"));
    let mut run = GuestRun::start(
        "guest-pci-forward",
        &manifest,
        &["--cmdline", "tpm=0 interrupt=0 unowned=0 nvme=0"],
    );
    let status = run.wait(Duration::from_secs(60));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n{log}");
    assert!(
        log.contains("PCI config access of 00:03.0 offset 0x0 forwarded to vtpm"),
        "{log}"
    );
    assert!(log.contains("(1 forwarded)"), "{log}");
    assert!(!console.contains("pci 00:03"), "{console}");
}

#[test]
fn the_vcpu_thread_reads_guest_exits_only_under_a_seccomp_filter_of_its_own() {
    if !kvm_available("the_vcpu_thread_reads_guest_exits_only_under_a_seccomp_filter_of_its_own") {
        return;
    }
    let mut run = GuestRun::start(
        "guest-vcpu-filter",
        &shipped_text(),
        &[
            "--keep-running",
            "--cmdline",
            "extends=100000 interrupt=0 unowned=0",
        ],
    );
    run.wait_for_console("extend loop of 100000 started", Duration::from_secs(60));
    let pid = run.child.id();
    let vcpu = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().path())
        .find(|t| std::fs::read_to_string(t.join("comm")).unwrap_or_default() == "vcpu0\n")
        .expect("a vcpu0 thread");
    let status = std::fs::read_to_string(vcpu.join("status")).unwrap();
    // Its own filter on top of the two it inherits from the supervisor.
    for line in ["NoNewPrivs:\t1", "Seccomp:\t2", "Seccomp_filters:\t3"] {
        assert!(status.lines().any(|l| l == line), "{line}:\n{status}");
    }
    let out = pv(&["audit", "--live", "--json", "--state-dir", &run.state_dir()]);
    let live: serde_json::Value = serde_json::from_slice(&out.stdout).expect("audit json");
    assert!(out.status.success(), "{live}");
    let check = live["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["service"] == "paravisor" && c["what"] == "vcpu0 Seccomp_filters")
        .unwrap_or_else(|| panic!("the live audit did not check the vCPU thread: {live}"));
    assert_eq!(check["ok"], true, "{check}");
    let _ = pv(&["stop", "--state-dir", &run.state_dir()]);
    assert_eq!(
        run.wait(Duration::from_secs(30)).code(),
        Some(0),
        "{}",
        run.log()
    );
}

/// The shipped storage service's NVMe function, as the test guest's driver uses it: every
/// block written, flushed and read back twice, queues and buffers in the shared window, the
/// completion interrupt on the line storage holds itself.
#[test]
fn the_test_guest_drives_storages_nvme_function_through_the_shared_window() {
    let test = "the_test_guest_drives_storages_nvme_function_through_the_shared_window";
    if !kvm_available(test) {
        return;
    }
    let mut run = GuestRun::start(
        "guest-nvme",
        &shipped_text(),
        &[
            "--cmdline",
            "tpm=0 unowned=0 interrupt=0 nvme=1 nvme-irq=1 nvme-passes=2",
        ],
    );
    let status = run.wait(Duration::from_secs(180));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n--- log ---\n{log}");
    assert_lines(
        &console,
        &log,
        &[
            "guest: nvme: pass 1: 256 blocks written, flushed, read back",
            "guest: nvme: pass 2: 256 blocks written, flushed, read back",
            "guest: all checks passed",
        ],
    );
    assert!(!console.contains("FAIL"), "{console}");
    // The image holds ciphertext: none of the guest's block markers ((pass << 48) | block in
    // each block's first word) is in it.
    let image = std::fs::read(run.dir.join("state/storage-nvme.img")).unwrap();
    let marker = ((2u64 << 48) | 7).to_le_bytes();
    assert!(
        !image.windows(8).any(|w| w == marker),
        "the image holds the guest's data in clear"
    );
}

/// The NVMe step with `nvme-dbbuf` as given, kept running: the guest's count of I/O doorbell
/// writes, and the accesses the partition sent storage (`ps`).
fn nvme_doorbells_and_exits(tag: &str, dbbuf: u8) -> (u64, u64, String) {
    let mut run = GuestRun::start(
        tag,
        &shipped_text(),
        &[
            "--keep-running",
            "--cmdline",
            &format!("tpm=0 unowned=0 interrupt=0 nvme=1 nvme-passes=2 nvme-dbbuf={dbbuf}"),
        ],
    );
    run.wait_for_console("guest: all checks passed", Duration::from_secs(180));
    let out = pv(&["ps", "--json", "--state-dir", &run.state_dir()]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("ps json");
    let storage = rows.iter().find(|r| r["name"] == "storage").unwrap();
    let exits = storage["guest_exits"].as_u64().unwrap();
    let _ = pv(&["stop", "--state-dir", &run.state_dir()]);
    let status = run.wait(Duration::from_secs(60));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n--- log ---\n{log}");
    assert!(!console.contains("FAIL"), "{console}");
    let line = console
        .lines()
        .find_map(|l| l.split_once("guest: nvme: I/O doorbells: "))
        .map(|(_, rest)| rest.to_string())
        .unwrap_or_else(|| panic!("no doorbell count:\n{console}"));
    let written: u64 = line.split_whitespace().next().unwrap().parse().unwrap();
    (written, exits, format!("{console}\n--- log ---\n{log}"))
}

/// With shadow doorbells the I/O queue's doorbell writes reach storage as ioeventfd
/// signals: none of them is an exit the partition sends the service, where each one is
/// with plain doorbells.
#[test]
fn nvme_io_doorbells_are_ioeventfd_signals_not_exits_once_the_driver_shadows_them() {
    let test = "nvme_io_doorbells_are_ioeventfd_signals_not_exits_once_the_driver_shadows_them";
    if !kvm_available(test) {
        return;
    }
    let (plain_writes, plain_exits, plain) = nvme_doorbells_and_exits("guest-nvme-mmio", 0);
    let (shadow_writes, shadow_exits, shadowed) = nvme_doorbells_and_exits("guest-nvme-dbbuf", 1);
    assert!(!plain.contains("doorbells armed"), "{plain}");
    assert!(shadowed.contains("doorbells armed"), "{shadowed}");
    assert!(
        shadowed.contains("guest: ok   nvme: shadow doorbells at"),
        "{shadowed}"
    );
    assert!(plain_writes > 0 && shadow_writes > 0);
    eprintln!(
        "plain doorbells: {plain_writes} I/O doorbell writes, {plain_exits} exits to storage; \
         shadow doorbells: {shadow_writes} I/O doorbell writes, {shadow_exits} exits to storage"
    );
    // The shadowed run makes the same register and admin accesses plus one admin command
    // (Doorbell Buffer Config: one doorbell and one completion-queue head write).
    assert!(
        shadow_exits + plain_writes <= plain_exits + 2,
        "shadowed doorbells still reached storage as exits:\n{shadowed}"
    );
}

/// kill -9 of storage ten times while the guest writes and verifies every block over and
/// over: the vCPU waits out each restart, the controller resumes from its checkpoint, and
/// every pass reads back what it wrote.
#[test]
fn killed_storage_during_nvme_passes_loses_and_repeats_nothing() {
    let test = "killed_storage_during_nvme_passes_loses_and_repeats_nothing";
    if !kvm_available(test) {
        return;
    }
    let manifest = edited(&shipped_text(), |m| {
        set(m, "service.storage.restart.max", "40")
    });
    let mut run = GuestRun::start(
        "guest-kill-storage",
        &manifest,
        &[
            "--cmdline",
            "tpm=0 unowned=0 interrupt=0 nvme=1 nvme-passes=60",
        ],
    );
    run.wait_for_console(
        "guest: nvme: I/O queue pair 1 created",
        Duration::from_secs(120),
    );
    // storage's state and pid, from `paravisor ps --json`.
    let storage = |run: &GuestRun| -> Option<(String, i64)> {
        let out = pv(&["ps", "--json", "--state-dir", &run.state_dir()]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let row = rows.as_array()?.iter().find(|r| r["name"] == "storage")?;
        Some((row["state"].as_str()?.to_string(), row["pid"].as_i64()?))
    };
    // A kill as each of the first ten passes ends (the guest is already in the next one):
    // paced by the guest, not by the clock, so a busy machine changes nothing.
    let mut kills = 0;
    for pass in 1..=10 {
        run.wait_for_console(
            &format!("guest: nvme: pass {pass}: "),
            Duration::from_secs(300),
        );
        let (_, before) = storage(&run).expect("storage is in ps");
        let out = pv(&[
            "kill",
            "storage",
            "--signal",
            "KILL",
            "--state-dir",
            &run.state_dir(),
        ]);
        assert!(out.status.success(), "{}", common::text(&out));
        kills += 1;
        // Until the new process runs, a second kill would only hit the back-off.
        let until = Instant::now() + Duration::from_secs(60);
        while !matches!(storage(&run), Some((state, pid)) if state == "running" && pid != before) {
            assert!(
                Instant::now() < until,
                "storage did not come back:\n{}",
                run.both()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let status = run.wait(Duration::from_secs(300));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n--- log ---\n{log}");
    assert_eq!(
        console
            .matches("guest: ok   nvme: every block of the pass reads back as written")
            .count(),
        60,
        "{console}"
    );
    assert!(!console.contains("FAIL"), "{console}");
    assert!(
        log.matches("NVMe controller resumed from its checkpoint")
            .count()
            >= 10,
        "{log}"
    );
    // The I/O doorbells came as ioeventfd signals all along (the kills hit that path).
    assert!(log.contains("doorbells armed"), "{log}");
    assert!(
        console.contains("guest: ok   nvme: shadow doorbells at"),
        "{console}"
    );
    eprintln!(
        "storage killed {kills} times; {} accesses answered from the record after a restart",
        log.matches("answered from the record").count()
    );
}

/// The confidential-VM model: a device given the shared window cannot reach the guest's
/// private memory. A driver that puts its queues in private RAM gets a fatally stopped
/// controller (no command read, nothing written), and storage names the address it could
/// not reach.
#[test]
fn a_device_given_the_shared_window_cannot_reach_private_memory() {
    let test = "a_device_given_the_shared_window_cannot_reach_private_memory";
    if !kvm_available(test) {
        return;
    }
    let mut run = GuestRun::start(
        "guest-nvme-private",
        &shipped_text(),
        &[
            "--cmdline",
            "tpm=0 unowned=0 interrupt=0 nvme=1 window=0x200000",
        ],
    );
    let status = run.wait(Duration::from_secs(180));
    let (console, log) = (run.console(), run.log());
    assert_ne!(status.code(), Some(0), "{console}");
    assert!(
        log.contains("entry at 0x200000 is outside the guest memory this device may reach"),
        "{log}"
    );
    assert!(console.contains("guest: FAIL"), "{console}");
}

/// One process serves both transports: a vhost-user front end that stalls on its socket,
/// again and again for as long as the guest runs, stops neither the partition's NVMe (the
/// guest's passes all verify) nor the service (never restarted, so never hung).
#[test]
fn a_stalling_vhost_user_front_end_does_not_stop_the_partitions_nvme() {
    use std::io::Read;
    use std::io::Write;
    let test = "a_stalling_vhost_user_front_end_does_not_stop_the_partitions_nvme";
    if !kvm_available(test) {
        return;
    }
    let mut run = GuestRun::start(
        "guest-nvme-stalling-front-end",
        &shipped_text(),
        &[
            "--keep-running",
            "--listen",
            "vhost-user-blk",
            "--cmdline",
            "tpm=0 unowned=0 interrupt=0 nvme=1 nvme-passes=40",
        ],
    );
    run.wait_for_console(
        "guest: nvme: I/O queue pair 1 created",
        Duration::from_secs(120),
    );
    let socket = run.dir.join("state/storage/vhost-user-blk.sock");
    let mut stalls = 0;
    while !run.console().contains("guest: all checks passed") {
        assert!(
            run.child.try_wait().unwrap().is_none(),
            "the run ended:\n{}",
            run.both()
        );
        // Half of a GET_FEATURES header, held until the service hangs up.
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("still connected: {e}\n{}", run.both()),
            }
        }
        stalls += 1;
    }
    let out = pv(&["ps", "--json", "--state-dir", &run.state_dir()]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("ps json");
    let storage = rows.iter().find(|r| r["name"] == "storage").unwrap();
    assert_eq!(storage["restarts"], 0, "{}", run.both());
    let _ = pv(&["stop", "--state-dir", &run.state_dir()]);
    let status = run.wait(Duration::from_secs(60));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n--- log ---\n{log}");
    assert_eq!(
        console
            .matches("guest: ok   nvme: every block of the pass reads back as written")
            .count(),
        40,
        "{console}"
    );
    assert!(!console.contains("FAIL"), "{console}");
    assert!(
        log.contains("only 6 of a message header's 12 bytes came"),
        "{log}"
    );
    eprintln!("{stalls} stalls while the guest ran its 40 passes");
}

/// The shipped net service's virtio-net function on our partition, as the test guest's
/// driver uses it: queues and frames in the shared window, an ARP request and echo requests
/// answered by the in-service responder, every reply checked byte for byte in the guest, and
/// the interrupt of a used ring on the line net holds itself.
#[test]
fn the_test_guest_pings_nets_responder_through_the_partitions_virtio_net_function() {
    let test = "the_test_guest_pings_nets_responder_through_the_partitions_virtio_net_function";
    if !kvm_available(test) {
        return;
    }
    let mut run = GuestRun::start(
        "guest-net",
        &shipped_text(),
        &[
            "--cmdline",
            "tpm=0 unowned=0 interrupt=0 nvme=0 net=1 net-irq=1 net-pings=16",
        ],
    );
    let status = run.wait(Duration::from_secs(180));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n--- log ---\n{log}");
    assert_lines(
        &console,
        &log,
        &[
            "guest: ok   net: FEATURES_OK kept (VERSION_1 and MAC accepted, nothing unknown)",
            "guest: ok   net: ARP 10.0.2.2 is 52:54:00:12:35:02",
            "guest: ok   net: a used ring interrupts (INTx -> IOAPIC -> vector 0x26) and the ISR says queue",
            "guest: ok   net: 16 echo replies checked",
            "guest: all checks passed",
        ],
    );
    assert!(!console.contains("FAIL"), "{console}");
    assert!(log.contains("virtio-net PCI function ready"), "{log}");
    for line in console
        .lines()
        .filter(|l| l.contains("guest: net: ") && !l.contains(" checked"))
    {
        eprintln!("{line}");
    }
}

/// The net step with the shipped manifest (`doorbells` over the notify registers) or without
/// that grant, kept running: the guest's count of notify writes, and the accesses the
/// partition sent net (`ps`).
fn net_notifies_and_exits(tag: &str, doorbells: bool) -> (u64, u64, String) {
    let manifest = if doorbells {
        shipped_text()
    } else {
        edited(&shipped_text(), |m| remove(m, "service.net.doorbells"))
    };
    let mut run = GuestRun::start(
        tag,
        &manifest,
        &[
            "--keep-running",
            "--cmdline",
            "tpm=0 unowned=0 interrupt=0 nvme=0 net=1 net-pings=32",
        ],
    );
    run.wait_for_console("guest: all checks passed", Duration::from_secs(180));
    let out = pv(&["ps", "--json", "--state-dir", &run.state_dir()]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("ps json");
    let net = rows.iter().find(|r| r["name"] == "net").unwrap();
    let exits = net["guest_exits"].as_u64().unwrap();
    let _ = pv(&["stop", "--state-dir", &run.state_dir()]);
    let status = run.wait(Duration::from_secs(60));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n--- log ---\n{log}");
    assert!(!console.contains("FAIL"), "{console}");
    let line = console
        .lines()
        .find_map(|l| l.split_once("guest: net: notify writes: "))
        .map(|(_, rest)| rest.trim().to_string())
        .unwrap_or_else(|| panic!("no notify count:\n{console}"));
    let notifies: u64 = line.parse().unwrap();
    (notifies, exits, format!("{console}\n--- log ---\n{log}"))
}

/// With the `doorbells` grant the function arms its notify registers at DRIVER_OK: every
/// queue kick of the guest reaches net as an ioeventfd signal, none as an exit the partition
/// sends the service, where without the grant each one is an exit.
#[test]
fn virtio_net_kicks_are_ioeventfd_signals_not_exits_once_the_driver_is_ok() {
    let test = "virtio_net_kicks_are_ioeventfd_signals_not_exits_once_the_driver_is_ok";
    if !kvm_available(test) {
        return;
    }
    let (plain_notifies, plain_exits, plain) = net_notifies_and_exits("guest-net-exits", false);
    let (armed_notifies, armed_exits, armed) = net_notifies_and_exits("guest-net-doorbells", true);
    assert!(!plain.contains("doorbells armed"), "{plain}");
    assert!(armed.contains("doorbells armed"), "{armed}");
    eprintln!(
        "without doorbells: {plain_notifies} notify writes, {plain_exits} exits to net; \
         with doorbells: {armed_notifies} notify writes, {armed_exits} exits to net"
    );
    assert!(plain_notifies > 64 && armed_notifies > 64);
    // The same set-up accesses either way; only the notifies differ.
    assert!(
        plain_exits >= plain_notifies,
        "notifies without doorbells must be exits:\n{plain}"
    );
    assert!(
        armed_exits + plain_notifies <= plain_exits + 2,
        "kicks reached net as exits despite the doorbells:\n{armed}"
    );
}

/// kill -9 of net five times while the guest pings over and over: the vCPU waits out each
/// restart, the function resumes its queues from its checkpoint, the guest sends again what
/// the killed process lost (the responder's reply), and every echo reply is checked byte for
/// byte; no corrupted frame is ever accepted.
#[test]
fn killed_net_during_guest_pings_loses_no_echo_and_corrupts_no_frame() {
    let test = "killed_net_during_guest_pings_loses_no_echo_and_corrupts_no_frame";
    if !kvm_available(test) {
        return;
    }
    let manifest = edited(&shipped_text(), |m| set(m, "service.net.restart.max", "40"));
    let mut run = GuestRun::start(
        "guest-kill-net",
        &manifest,
        &[
            "--cmdline",
            "tpm=0 unowned=0 interrupt=0 nvme=0 net=1 net-pings=2000",
        ],
    );
    let net = |run: &GuestRun| -> Option<(String, i64)> {
        let out = pv(&["ps", "--json", "--state-dir", &run.state_dir()]);
        let rows: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let row = rows.as_array()?.iter().find(|r| r["name"] == "net")?;
        Some((row["state"].as_str()?.to_string(), row["pid"].as_i64()?))
    };
    // A kill after every 100th echo is checked (of 2000: the guest outruns no kill): paced by the guest, not by the clock.
    let mut kills = 0;
    for k in 1..=5 {
        run.wait_for_console(
            &format!("guest: net: echo {} of 2000 checked", 100 * k),
            Duration::from_secs(300),
        );
        let (_, before) = net(&run).expect("net is in ps");
        let out = pv(&[
            "kill",
            "net",
            "--signal",
            "KILL",
            "--state-dir",
            &run.state_dir(),
        ]);
        assert!(out.status.success(), "{}", common::text(&out));
        kills += 1;
        let until = Instant::now() + Duration::from_secs(60);
        while !matches!(net(&run), Some((state, pid)) if state == "running" && pid != before) {
            assert!(
                Instant::now() < until,
                "net did not come back:\n{}",
                run.both()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let status = run.wait(Duration::from_secs(300));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n--- log ---\n{log}");
    assert!(
        console.contains("guest: ok   net: 2000 echo replies checked"),
        "{console}"
    );
    assert!(!console.contains("FAIL"), "{console}");
    assert_eq!(
        log.matches("virtio-net function resumed from its checkpoint")
            .count(),
        kills,
        "{log}"
    );
    assert!(log.contains("doorbells armed"), "{log}");
    let resent = console.matches("no reply yet, sent again").count();
    eprintln!(
        "net killed {kills} times; the guest sent {resent} echo requests again; {} accesses answered from the record after a restart",
        log.matches("answered from the record").count()
    );
    for line in console
        .lines()
        .filter(|l| l.contains("guest: net: ") && l.contains("frames sent"))
    {
        eprintln!("{line}");
    }
}

/// One net process serves both transports: a vhost-user front end that stalls on its
/// socket, again and again for as long as the guest pings, stops neither the partition's
/// virtio-net function (every echo checked) nor the service (never restarted).
#[test]
fn a_stalling_vhost_user_front_end_does_not_stop_the_partitions_virtio_net() {
    use std::io::Read;
    use std::io::Write;
    let test = "a_stalling_vhost_user_front_end_does_not_stop_the_partitions_virtio_net";
    if !kvm_available(test) {
        return;
    }
    let mut run = GuestRun::start(
        "guest-net-stalling-front-end",
        &shipped_text(),
        &[
            "--keep-running",
            "--listen",
            "vhost-user-net",
            "--cmdline",
            "tpm=0 unowned=0 interrupt=0 nvme=0 net=1 net-pings=3000",
        ],
    );
    run.wait_for_console("guest: ok   net: ARP 10.0.2.2 is", Duration::from_secs(120));
    let socket = run.dir.join("state/net/vhost-user-net.sock");
    let mut stalls = 0;
    while !run.console().contains("guest: all checks passed") {
        assert!(
            run.child.try_wait().unwrap().is_none(),
            "the run ended:\n{}",
            run.both()
        );
        // Half of a GET_FEATURES header, held until the service hangs up.
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(&[1, 0, 0, 0, 1, 0]).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("still connected: {e}\n{}", run.both()),
            }
        }
        stalls += 1;
    }
    let out = pv(&["ps", "--json", "--state-dir", &run.state_dir()]);
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("ps json");
    let net = rows.iter().find(|r| r["name"] == "net").unwrap();
    assert_eq!(net["restarts"], 0, "{}", run.both());
    let _ = pv(&["stop", "--state-dir", &run.state_dir()]);
    let status = run.wait(Duration::from_secs(60));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n--- log ---\n{log}");
    assert!(
        console.contains("guest: ok   net: 3000 echo replies checked"),
        "{console}"
    );
    assert!(!console.contains("FAIL"), "{console}");
    assert!(
        log.contains("only 6 of a message header's 12 bytes came"),
        "{log}"
    );
    eprintln!("{stalls} stalls while the guest sent its 3000 echo requests");
}

/// The partition's virtio-net function on a TAP the host attached: the guest's ARP request
/// and echo requests reach the host's kernel (the TAP's interface holds 10.0.2.2 in a
/// namespace the test makes), and the kernel's replies come back checked byte for byte.
#[test]
fn the_test_guest_pings_the_hosts_kernel_through_nets_tap() {
    let test = "the_test_guest_pings_the_hosts_kernel_through_nets_tap";
    if !kvm_available(test) || !common::netns::taps_available(test) {
        return;
    }
    // A persistent TAP, addressed and up before the guest starts: nothing races its pings.
    let ns = common::netns::Netns::new("pnet");
    ns.ip_ok(&["tuntap", "add", "dev", "pvtap2", "mode", "tap"]);
    ns.ip_ok(&["addr", "add", "10.0.2.2/24", "dev", "pvtap2"]);
    ns.ip_ok(&["link", "set", "pvtap2", "up"]);
    let link = ns.ip_ok(&["link", "show", "pvtap2"]);
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("the TAP's MAC")
        .to_string();
    let tap = format!("net0=pvtap2@{}", ns.name);
    let mut run = GuestRun::start(
        "guest-net-tap",
        &shipped_text(),
        &[
            "--tap",
            &tap,
            "--cmdline",
            "tpm=0 unowned=0 interrupt=0 nvme=0 net=1 net-pings=16",
        ],
    );
    let status = run.wait(Duration::from_secs(180));
    let (console, log) = (run.console(), run.log());
    assert_eq!(status.code(), Some(0), "{console}\n--- log ---\n{log}");
    assert_lines(
        &console,
        &log,
        &[
            &format!("guest: ok   net: ARP 10.0.2.2 is {mac}"),
            "guest: ok   net: 16 echo replies checked",
            "guest: all checks passed",
        ],
    );
    assert!(!console.contains("FAIL"), "{console}");
    assert!(
        log.contains("virtio-net PCI function ready on TAP net0"),
        "{log}"
    );
    // (The kernel's neighbour entry for the guest is gone with the run's carrier; the
    // replies, from the TAP's own MAC and checked byte for byte, are its answer.)
}
