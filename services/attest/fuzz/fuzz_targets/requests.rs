//! Requests from any client of the attest service, as the service decodes them (postcard),
//! with any caller name, against a platform that answers, fails or answers garbage: every
//! request gets a response, never a panic; only `paravisor` seals; sealed blobs (hostile:
//! they come from the host's disk) either unseal to what was sealed or are refused.
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
            (_, platform::Request::Report { report_data, .. }) => {
                let mut r = [0u8; platform::REPORT_LEN];
                r[0x50..0x90].copy_from_slice(report_data.as_slice());
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
        let sealing = matches!(request, attest::Request::Seal { .. } | attest::Request::Unseal { .. });
        let response = service.handle(&mut platform, caller, request);
        if sealing && caller != attest::PARAVISOR_CLIENT {
            assert_eq!(response, attest::Response::Error(attest::AttestError::NotPermitted));
        }
    }
    // The bytes as a stored sealed key: refused, or opened under a working platform.
    let _ = attest::SealedKey::parse(rest);
    if let Some(sealed) = Bytes::new(rest) {
        let _ = service.handle(&mut Fake(3), attest::PARAVISOR_CLIENT, attest::Request::Unseal { sealed });
    }
    // A seal always opens again on the same platform.
    if mode % 4 == 3 && rest.len() >= 32 {
        let key = Bytes::new(&rest[..32]).unwrap();
        let select = attest::FieldSelect { policy: true, measurement: rest[0] & 1 == 1, guest_svn: false, tcb: true };
        if let attest::Response::Sealed(s) =
            service.handle(&mut platform, attest::PARAVISOR_CLIENT, attest::Request::Seal { key: key.clone(), select })
        {
            assert_eq!(
                service.handle(&mut platform, attest::PARAVISOR_CLIENT, attest::Request::Unseal { sealed: s }),
                attest::Response::Key(key)
            );
        }
    }
});
