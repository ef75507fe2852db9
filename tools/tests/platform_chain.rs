//! A provisioned SIMULATED platform: its chain verifies with AMD's own code (the sev
//! crate), a second provisioning refuses, its reports verify against the chain (AMD's code
//! and ours), and derived keys follow what they are bound to.

use std::path::Path;

use ipc_defs::services::platform::FieldSelect;
use microkernel::platform::Platform;
use microkernel::platform::PlatformError;
use microkernel::platform::TCB;
use microkernel::snp::LaunchFacts;
use microkernel::snp::ReportRequest;
use microkernel::snp::ARK_PEM;
use microkernel::snp::ASK_PEM;
use microkernel::snp::POLICY;
use microkernel::snp::SIGNED_LEN;
use microkernel::snp::VCEK_PEM;
use sev::certs::snp::ca;
use sev::certs::snp::Certificate;
use sev::certs::snp::Chain;
use sev::certs::snp::Verifiable;

/// The report request both tests sign.
fn request() -> ReportRequest {
    ReportRequest {
        report_data: [0x5a; 64],
        measurement: [0x11; 48],
        host_data: [0; 32],
        vmpl: 0,
        policy: POLICY,
        report_id: [7; 32],
    }
}

fn cert(dir: &Path, file: &str) -> Certificate {
    Certificate::from_pem(&std::fs::read(dir.join(file)).unwrap()).unwrap()
}

#[test]
fn a_new_platform_has_a_chain_the_sev_crate_verifies() {
    let dir = std::env::temp_dir().join(format!("pv-platform-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let platform = pv_tools::provision::init(&dir).expect("init");
    let chain = Chain {
        ca: ca::Chain {
            ark: cert(&dir, ARK_PEM),
            ask: cert(&dir, ASK_PEM),
        },
        vek: cert(&dir, VCEK_PEM),
    };
    (&chain).verify().expect("the chain verifies");
    // A second init refuses; opening gives the same chip.
    assert!(matches!(
        pv_tools::provision::init(&dir),
        Err(PlatformError::Exists(_))
    ));
    let again = Platform::open(&dir).unwrap();
    assert_eq!(again.chip_id(), platform.chip_id());
    // The VCEK certificate carries the key the chip derives.
    let vcek_pub = again.vcek_key(TCB).unwrap();
    let sec1 = vcek_pub.verifying_key().to_encoded_point(false);
    assert_eq!(chain.vek.public_key_sec1(), sec1.as_bytes());
    // A chain whose ASK another ARK signed does not verify.
    let other = dir.join("other");
    pv_tools::provision::init(&other).unwrap();
    let mixed = Chain {
        ca: ca::Chain {
            ark: cert(&other, ARK_PEM),
            ask: cert(&dir, ASK_PEM),
        },
        vek: cert(&dir, VCEK_PEM),
    };
    assert!((&mixed).verify().is_err());

    // A report: the sev crate parses it and verifies it against the chain.
    let req = request();
    let raw = platform.report(&req).unwrap();
    let report =
        <sev::firmware::guest::AttestationReport as sev::parser::ByteParser<()>>::from_bytes(&raw)
            .expect("parses");
    assert_eq!(report.report_data, [0x5a; 64]);
    assert_eq!(report.measurement, [0x11; 48]);
    assert_eq!(report.chip_id, platform.chip_id());
    (&chain, &report).verify().expect("the report verifies");
    // Any flipped bit of the signed part breaks it.
    for at in [0x00usize, 0x50, 0x90, 0x1A0, 0x29F] {
        let mut bad = raw;
        bad[at] ^= 1;
        let ok =
            <sev::firmware::guest::AttestationReport as sev::parser::ByteParser<()>>::from_bytes(
                &bad,
            )
            .map(|r| (&chain, &r).verify().is_ok())
            .unwrap_or(false);
        assert!(!ok, "a flip at {at:#x} went unnoticed");
    }
    // Another platform's report does not verify with this chain.
    let foreign = Platform::open(&other).unwrap().report(&req).unwrap();
    let foreign =
        <sev::firmware::guest::AttestationReport as sev::parser::ByteParser<()>>::from_bytes(
            &foreign,
        )
        .unwrap();
    assert!((&chain, &foreign).verify().is_err());
    // Derived keys: bound to the measurement only when it is selected.
    let facts = LaunchFacts {
        measurement: [1; 48],
        policy: POLICY,
        guest_svn: 0,
    };
    let changed = LaunchFacts {
        measurement: [2; 48],
        ..facts
    };
    let by_m = FieldSelect {
        measurement: true,
        ..Default::default()
    };
    let k = platform.derived_key(by_m, &facts, b"VMGSKEY");
    assert_eq!(k, again.derived_key(by_m, &facts, b"VMGSKEY"));
    assert_ne!(k, platform.derived_key(by_m, &changed, b"VMGSKEY"));
    assert_ne!(k, platform.derived_key(by_m, &facts, b"ISOHWKEY"));
    let chip_only = FieldSelect::default();
    assert_eq!(
        platform.derived_key(chip_only, &facts, b"VMGSKEY"),
        platform.derived_key(chip_only, &changed, b"VMGSKEY")
    );
    let foreign = Platform::open(&other).unwrap();
    assert_ne!(k, foreign.derived_key(by_m, &facts, b"VMGSKEY"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Our verifier against the simulated platform: a report it makes verifies, and every change
/// to the signed part, a set reserved byte, or a claim the VCEK does not certify is refused
/// for its reason.
#[test]
fn the_verifier_refuses_every_change_to_a_simulated_report() {
    let dir = std::env::temp_dir().join(format!("pv-tools-platform-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let platform = pv_tools::provision::init(&dir).expect("init");
    let req = request();
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
