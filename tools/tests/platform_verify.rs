//! Our verifier against the simulated platform: a report it makes verifies, and every
//! change to the signed part, a set reserved byte, or a claim the VCEK does not certify is
//! refused for its reason. (The platform's own tests check its chain with the sev crate.)

use microkernel::platform::TCB;
use microkernel::snp::ReportRequest;
use microkernel::snp::POLICY;
use microkernel::snp::SIGNED_LEN;

#[test]
fn the_verifier_refuses_every_change_to_a_simulated_report() {
    let dir = std::env::temp_dir().join(format!("pv-tools-platform-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let platform = pv_tools::provision::init(&dir).expect("init");
    let req = ReportRequest {
        report_data: [0x5a; 64],
        measurement: [0x11; 48],
        host_data: [0; 32],
        vmpl: 0,
        policy: POLICY,
        report_id: [7; 32],
    };
    let raw = platform.report(&req).unwrap();
    // The verifier checks what the VCEK certifies (TCB, chip), as AMD's tools do: a report
    // signed by the right key that claims another TCB or chip is refused.
    let pin = pv_tools::verify::ark_fingerprint(&dir).unwrap();
    pv_tools::verify::verify(&raw, &dir, &pin, None, None).expect("verifies");
    // Our verifier refuses a flip in every byte of the signed part (a different bit each
    // time), as a signature failure. The sev crate alone misses the reserved bytes inside
    // the TCB fields (0x3A.., 0x182.., 0x1E2.., 0x1F2..): it checks a re-encoding.
    for at in 0..SIGNED_LEN {
        let mut bad = raw;
        bad[at] ^= 1 << (at % 8);
        match pv_tools::verify::verify(&bad, &dir, &pin, None, None) {
            Err(pv_tools::verify::VerifyError::Signature(_))
            | Err(pv_tools::verify::VerifyError::SignatureAlgorithm(_)) => {}
            other => panic!("a flip at {at:#x} gave {other:?}"),
        }
    }
    // Signed by the right key but with a reserved TCB byte set: refused as reserved.
    let mut odd = raw;
    odd[0x1E3] = 1;
    platform.sign(&mut odd).unwrap();
    assert!(matches!(
        pv_tools::verify::verify(&odd, &dir, &pin, None, None),
        Err(pv_tools::verify::VerifyError::Reserved { start: 0x1E2, .. })
    ));
    let mut lie = raw;
    lie[0x180 + 6] = TCB.snp + 1;
    platform.sign(&mut lie).unwrap();
    let e = pv_tools::verify::verify(&lie, &dir, &pin, None, None).unwrap_err();
    assert!(e.to_string().contains("SNP SPL"), "{e}");
    let mut lie = raw;
    lie[0x1A0] ^= 1;
    platform.sign(&mut lie).unwrap();
    let e = pv_tools::verify::verify(&lie, &dir, &pin, None, None).unwrap_err();
    assert!(e.to_string().contains("another chip"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
