//! Arbitrary vtpm requests from a client service (postcard frames: TPM commands of any
//! shape, platform signals, guest register accesses) against the real engine: responses or
//! typed errors, never a panic. One TPM for the whole run (libtpms is one per process).
#![no_main]

use std::cell::RefCell;

use ipc_defs::services::vtpm::Request;
use libfuzzer_sys::fuzz_target;
use pv_vtpm::libtpms::Engine;
use pv_vtpm::server::Tpm;
use pv_vtpm::state::MemPermanent;
use pv_vtpm::state::MemRegion;
use pv_vtpm::state::SharedNv;

thread_local! {
    static TPM: RefCell<Tpm<MemPermanent, MemRegion>> = RefCell::new({
        let nv = SharedNv::default();
        let engine = Engine::take(Box::new(nv.clone())).expect("free").expect("TPM 2.0");
        Tpm::start(engine, nv, MemPermanent::default(), MemRegion::new(256 << 10))
            .expect("start")
    });
}

fuzz_target!(|data: &[u8]| {
    TPM.with(|tpm| {
        let mut tpm = tpm.borrow_mut();
        let mut rest = data;
        while let Ok((request, tail)) = postcard::take_from_bytes::<Request>(rest) {
            rest = tail;
            let _ = tpm.handle("fuzz", request);
            assert!(tpm.fatal.is_none(), "{:?}", tpm.fatal);
        }
    });
});
