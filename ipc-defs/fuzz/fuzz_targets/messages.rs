//! Every message a process decodes from a peer: the bootstrap record, control requests and
//! responses, endpoint envelopes. Decoding arbitrary bytes must fail cleanly, and whatever
//! decodes must encode again.
#![no_main]

use ipc_defs::bootstrap::Bootstrap;
use ipc_defs::control;
use ipc_defs::endpoint;
use ipc_defs::services::vmgs;
use libfuzzer_sys::fuzz_target;

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(v) = postcard::from_bytes::<T>(data) {
        let again = postcard::to_allocvec(&v).expect("a decoded value encodes");
        assert_eq!(postcard::from_bytes::<T>(&again).ok(), Some(v));
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = Bootstrap::decode(data);
    round_trip::<endpoint::Envelope<control::Request>>(data);
    round_trip::<endpoint::Envelope<control::Response>>(data);
    round_trip::<endpoint::Envelope<endpoint::Request<vmgs::Request>>>(data);
    round_trip::<endpoint::Envelope<endpoint::Response<vmgs::Response>>>(data);
    let _ = postcard::take_from_bytes::<u32>(data);
});
