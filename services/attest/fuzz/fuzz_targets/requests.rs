//! Requests from any client of the attest service, as the service decodes them (postcard),
//! with any caller name, against a platform that answers, fails or answers garbage: every
//! request gets a response, never a panic, and no report asked through the service is at
//! VMPL 0 (the microkernel's own evidence never goes through it).
#![no_main]

use ipc_defs::services::attest;
use ipc_defs::services::bytes::Bytes;
use ipc_defs::services::platform;
use libfuzzer_sys::fuzz_target;
use pv_attest::Attest;
use pv_attest::PlatformPort;

/// A platform whose behaviour the input picks.
struct Fake(u8);

impl PlatformPort for Fake {
    fn call(&mut self, request: &platform::Request) -> Result<platform::Response, String> {
        match (self.0 % 4, request) {
            (0, _) => Err("down".into()),
            (1, _) => Ok(platform::Response::Error(platform::PlatformError::Signing)),
            (2, _) => Ok(platform::Response::Key(Bytes::new(&[1, 2, 3]).unwrap())),
            (_, platform::Request::Report { report_data, vmpl }) => {
                let mut r = [0u8; platform::REPORT_LEN];
                r[0x50..0x90].copy_from_slice(report_data.as_slice());
                r[0x30] = *vmpl;
                Ok(platform::Response::Report(Bytes::new(&r).unwrap()))
            }
            (_, platform::Request::DerivedKey { select, context }) => {
                let mut k = [select.bits(); 32];
                for (i, b) in context.as_slice().iter().enumerate() {
                    k[i % 32] ^= b;
                }
                Ok(platform::Response::Key(Bytes::new(&k).unwrap()))
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut platform = Fake(mode);
    let mut service = Attest::new(Some(rest.to_vec()), Some(rest.to_vec()));
    let caller = if mode & 0x80 != 0 { attest::PARAVISOR_CLIENT } else { "vtpm" };
    if let Ok((request, _)) = postcard::take_from_bytes::<attest::Request>(rest) {
        if let attest::Response::Report(r) = service.handle(&mut platform, caller, request) {
            assert_ne!(r.as_slice()[0x30], 0, "a VMPL 0 report through attest");
        }
    }
});
