//! Attestation evidence and key protectors from a hostile source (the network, the host's
//! disk): report, certificate and key-protector parsing return a typed error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As a report: as given, and padded/cut to the report size with valid reserved bytes.
    let _ = microkernel::verify::parse_report(data);
    let mut report = [0u8; microkernel::platform::REPORT_LEN];
    let n = data.len().min(report.len());
    report[..n].copy_from_slice(&data[..n]);
    let _ = microkernel::verify::parse_report(&report);
    // As a certificate, PEM or DER.
    let _ = microkernel::verify::parse_certificate(data, "fuzz");
    let mut pem = b"-----BEGIN CERTIFICATE-----\n".to_vec();
    pem.extend_from_slice(data);
    pem.extend_from_slice(b"\n-----END CERTIFICATE-----\n");
    let _ = microkernel::verify::parse_certificate(&pem, "fuzz");
    // As the key protectors stored in a guest-state file.
    if let Ok(w) = microkernel::key_protector::TenantWrapped::parse(data) {
        assert_eq!(w.to_bytes().as_slice(), data);
        let _ = w.unwrap(&[0; 32]);
    }
    if let Ok(k) = ipc_defs::services::attest::SealedKey::parse(data) {
        assert_eq!(k.to_bytes().as_slice(), data);
    }
});
