//! Lines from a hostile network peer, as the key broker and its client read them: request
//! and reply parsing return a typed error, never panic, and what parses is what was sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_tools::kbs;

fuzz_target!(|data: &[u8]| {
    match kbs::parse_request(data) {
        Ok(kbs::Request::Key(k)) => {
            // The binding covers exactly the transfer key's bytes, which are one valid point.
            let (_, again) = kbs::parse_transfer_key(&k.transfer_bytes).expect("reparses");
            assert_eq!(again, k.transfer_bytes);
            let _ = kbs::binding(&k.nonce, &k.transfer_bytes);
        }
        Ok(kbs::Request::Challenge) | Err(_) => {}
    }
    let _ = kbs::parse_reply(data);
    let _ = kbs::parse_transfer_key(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kbs::Policy::parse(text, std::path::Path::new("."), "fuzz.toml");
    }
});
