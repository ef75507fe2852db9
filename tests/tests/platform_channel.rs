//! The platform channel (issue 12 item 5): the line from the attest service to the secure
//! processor gives no VMPL 0 evidence and no key for a context the microkernel reserves, even
//! to a hostile process in attest's place. (The microkernel's own VMPL 0 reports and sealing
//! take a path no channel reaches: tests/tests/sealing.rs and kbs tests exercise them.)

mod common;

use std::time::Duration;
use std::time::Instant;

use common::*;

/// A manifest whose attest service is pv-hostile asking the platform for what only the
/// microkernel may have.
fn hostile_attest() -> String {
    let mut m = format!(
        "[attest]\nplatform-dir = \"{}\"\n\n",
        test_platform_dir().display()
    );
    m += &service(
        "attest",
        "pv-hostile",
        &format!(
            "serves = [\"attest\"]\nplatform = true\nargs = [\"platform-grab\"]\n{RESTART_NEVER}"
        ),
    );
    m
}

#[test]
fn a_hostile_attest_service_gets_no_vmpl_0_report_and_no_datastore_key() {
    if !sandbox_available("a_hostile_attest_service_gets_no_vmpl_0_report_and_no_datastore_key") {
        return;
    }
    let inst = Instance::start("grab", &hostile_attest(), 1);
    // Its three attempts end with the VMPL 1 report (the channel works for what it is for).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !inst.log().contains("pv-hostile: platform vmpl-1 report:") {
        assert!(
            Instant::now() < deadline,
            "no third attempt:\n{}",
            inst.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = inst.log();
    for line in [
        "pv-hostile: platform vmpl-0 report: refused: ReservedVmpl",
        "pv-hostile: platform datastore-key context: refused: ReservedContext",
        "pv-hostile: platform vmpl-1 report: signed at VMPL 1",
        // The microkernel's own account of both refusals, naming the client.
        "refused a VMPL 0 report",
        "refused a key for a reserved context",
    ] {
        assert!(log.contains(line), "\"{line}\" missing:\n{log}");
    }
    assert!(!log.contains("signed at VMPL 0"), "{log}");
    assert!(!log.contains("context: key derived"), "{log}");
    // Counted against the service that holds the platform.
    assert_eq!(inst.row("attest")["refused"], 2, "{log}");
}
