//! A guest's evidence from a hostile network peer, as the key broker reads it: the guest-key
//! request line, each TPM structure, the claims, and the whole TPM half of the checks return
//! a typed refusal, never panic. Real evidence from pv-vtpm (tools/tests/fixtures/guest-kbs)
//! is what the input mutates: the first byte picks a field and whether the rest replaces it
//! or is XORed into it, so the fuzzer reaches every check past the parsers. Oracle: a signed
//! or hashed field that differs from the genuine one is never accepted.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_tools::kbs_guest;
use pv_tools::kbs_guest::TpmEvidence;
use pv_tools::tpm_evidence as tpm;
use sha2::Digest;

macro_rules! fixture {
    ($name:literal) => {
        include_bytes!(concat!("../../../tools/tests/fixtures/guest-kbs/", $name))
    };
}

/// The captured exchange: nonce, report_data, evidence.
fn real() -> &'static ([u8; 32], [u8; 64], TpmEvidence) {
    static REAL: std::sync::OnceLock<([u8; 32], [u8; 64], TpmEvidence)> =
        std::sync::OnceLock::new();
    REAL.get_or_init(|| {
        let nonce_hex = std::str::from_utf8(fixture!("nonce.hex")).expect("nonce.hex");
        let nonce: [u8; 32] = microkernel::util::parse_hex(nonce_hex)
            .and_then(|n| n.try_into().ok())
            .expect("a 32-byte nonce");
        let report = fixture!("report.bin");
        let report_data: [u8; 64] = report[0x50..0x90].try_into().expect("report_data");
        let evidence = TpmEvidence {
            claims: fixture!("claims.json").to_vec(),
            quote: fixture!("quote.msg").to_vec(),
            quote_signature: fixture!("quote.sig").to_vec(),
            pcrs: fixture!("quote.pcrs").to_vec(),
            transfer_key: fixture!("transfer.pub").to_vec(),
            certify: fixture!("certify.attest").to_vec(),
            certify_signature: fixture!("certify.sig").to_vec(),
        };
        let none = kbs_guest::PcrPolicy::new();
        kbs_guest::check_tpm_evidence(&nonce, &report_data, &evidence, &none, |_| {})
            .expect("the genuine evidence passes");
        (nonce, report_data, evidence)
    })
}

fn field(e: &mut TpmEvidence, which: u8) -> &mut Vec<u8> {
    match which % 7 {
        0 => &mut e.claims,
        1 => &mut e.quote,
        2 => &mut e.quote_signature,
        3 => &mut e.pcrs,
        4 => &mut e.transfer_key,
        5 => &mut e.certify,
        _ => &mut e.certify_signature,
    }
}

fuzz_target!(|data: &[u8]| {
    // As a request line, and as each structure on its own.
    let _ = kbs_guest::parse_guest_request(data);
    let _ = tpm::parse_attest(data);
    let _ = tpm::parse_signature(data);
    let _ = tpm::parse_rsa_public(data);
    let mut report_data = [0u8; 64];
    report_data[..32].copy_from_slice(&sha2::Sha256::digest(data));
    let _ = kbs_guest::claims_ak(&report_data, data);

    // As a change to one field of the genuine evidence.
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let (nonce, genuine_data, genuine) = real();
    let mut evidence = genuine.clone();
    let target = field(&mut evidence, selector);
    if selector & 0x80 == 0 {
        *target = rest.to_vec();
    } else {
        for (b, x) in target.iter_mut().zip(rest) {
            *b ^= x;
        }
    }
    let which = selector % 7;
    // The claims are bound by the report, which the harness takes as made over them.
    let report_data = if which == 0 {
        let mut d = [0u8; 64];
        d[..32].copy_from_slice(&sha2::Sha256::digest(&evidence.claims));
        d
    } else {
        *genuine_data
    };
    // A policy the genuine quote satisfies, so that changes reach the transfer-key check.
    let pinned = |i: usize| -> [u8; 32] {
        genuine.pcrs[i * 32..(i + 1) * 32]
            .try_into()
            .expect("sha256 PCR")
    };
    let policy: kbs_guest::PcrPolicy = [(0, vec![pinned(0)]), (7, vec![pinned(7)])].into();
    let changed = *field(&mut evidence, selector) != *field(&mut genuine.clone(), selector);
    let outcome = kbs_guest::check_tpm_evidence(nonce, &report_data, &evidence, &policy, |_| {});
    if which != 0 && changed {
        assert!(
            outcome.is_err(),
            "field {which} changed and the evidence was still accepted"
        );
    }
});
