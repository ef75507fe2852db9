//! Attestation evidence and key protectors from a hostile source (the network, the host's
//! disk): report, certificate and key-protector parsing return a typed error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// The VCEK (DER) and report of tests/fixtures/amd-milan.
fn milan() -> &'static (Vec<u8>, Vec<u8>) {
    static EVIDENCE: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    EVIDENCE.get_or_init(|| {
        let pem = include_bytes!("../../../tests/fixtures/amd-milan/vcek.pem");
        let der = pv_tools::verify::parse_certificate(pem, "vcek.pem")
            .and_then(|c| c.to_der().map_err(|e| panic!("{e}")))
            .expect("fixture VCEK");
        let report = include_bytes!("../../../tests/fixtures/amd-milan/report.bin").to_vec();
        pv_tools::verify::check_raw_signature(&der, &report).expect("genuine evidence");
        (der, report)
    })
}

fuzz_target!(|data: &[u8]| {
    // As a report: as given, and padded/cut to the report size with valid reserved bytes.
    let _ = pv_tools::verify::parse_report(data);
    let mut report = [0u8; microkernel::platform::REPORT_LEN];
    let n = data.len().min(report.len());
    report[..n].copy_from_slice(&data[..n]);
    let _ = pv_tools::verify::parse_report(&report);
    // As a report whose signature is checked with a genuine VCEK (AMD's Milan test
    // evidence), and as a VCEK (DER) checking that evidence's report.
    let _ = pv_tools::verify::check_raw_signature(&milan().0, &report);
    let _ = pv_tools::verify::check_raw_signature(data, &milan().1);
    // As a certificate, PEM or DER.
    let _ = pv_tools::verify::parse_certificate(data, "fuzz");
    let mut pem = b"-----BEGIN CERTIFICATE-----\n".to_vec();
    pem.extend_from_slice(data);
    pem.extend_from_slice(b"\n-----END CERTIFICATE-----\n");
    let _ = pv_tools::verify::parse_certificate(&pem, "fuzz");
    // As the key protectors stored in a guest-state file.
    if let Ok(w) = microkernel::key_protector::TenantWrapped::parse(data) {
        assert_eq!(w.to_bytes().as_slice(), data);
        let _ = w.unwrap(&[0; 32]);
    }
    if let Ok(k) = microkernel::key_protector::SealedKey::parse(data) {
        assert_eq!(k.to_bytes().as_slice(), data);
    }
});
