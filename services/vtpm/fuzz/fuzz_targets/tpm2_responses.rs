//! Arbitrary bytes as the responses to the commands the service sends its own TPM (the
//! attestation binding reads public areas a guest can choose, by persisting its own keys and
//! indices): every parser answers or refuses, never panics, never reads past the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_vtpm::tpm2;

fuzz_target!(|data: &[u8]| {
    let _ = tpm2::parse_read_public(data);
    let _ = tpm2::parse_create_primary(data);
    let _ = tpm2::parse_nv_read_public(data);
    let _ = tpm2::parse_nv_read(data);
    let _ = tpm2::parse_tpm_property(data, tpm2::PT_STARTUP_CLEAR);
    let _ = tpm2::parse_done(data);
    // The same bytes behind a header that is consistent with them, so that the fuzzer
    // reaches the bodies without having to find the size field first.
    for tag in [tpm2::ST_NO_SESSIONS, tpm2::ST_SESSIONS] {
        let mut r = Vec::with_capacity(data.len() + 10);
        r.extend_from_slice(&tag.to_be_bytes());
        r.extend_from_slice(&((data.len() + 10) as u32).to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0]);
        r.extend_from_slice(data);
        let _ = tpm2::parse_read_public(&r);
        let _ = tpm2::parse_create_primary(&r);
        let _ = tpm2::parse_nv_read_public(&r);
        let _ = tpm2::parse_nv_read(&r);
        let _ = tpm2::parse_tpm_property(&r, tpm2::PT_NV_BUFFER_MAX);
    }
});
