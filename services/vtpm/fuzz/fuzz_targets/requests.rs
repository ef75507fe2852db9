//! Arbitrary vtpm requests from a client service (postcard frames: TPM commands of any
//! shape, platform signals, guest register accesses) against the real engine: responses or
//! typed errors, never a panic. One TPM for the whole run (libtpms is one per process).
#![no_main]

use std::cell::RefCell;

use ipc_defs::services::vtpm::Localities;
use ipc_defs::services::vtpm::Request;
use ipc_defs::services::vtpm::VtpmGrant;
use libfuzzer_sys::fuzz_target;
use pv_vtpm::libtpms::Engine;
use pv_vtpm::server::Clients;
use pv_vtpm::server::Tpm;
use pv_vtpm::state::MemPermanent;
use pv_vtpm::state::MemRegion;
use pv_vtpm::state::SharedNv;

thread_local! {
    static TPM: RefCell<Tpm<MemPermanent, MemRegion>> = RefCell::new({
        let nv = SharedNv::default();
        let engine = Engine::take(Box::new(nv.clone())).expect("free").expect("TPM 2.0");
        let clients = Clients {
            commands: vec!["fuzz".into()],
            vcpus: 2,
        };
        Tpm::start(engine, nv, MemPermanent::default(), MemRegion::new(256 << 10), clients)
            .expect("start")
    });
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the caller: a client granted everything a service can be, the
    // guest partition (two vCPUs), or one granted nothing.
    let Some((&who, mut rest)) = data.split_first() else { return };
    let (client, grant) = match who % 3 {
        0 => (
            "fuzz",
            VtpmGrant {
                commands: Localities::ALL,
                platform: true,
                registers: 0,
            },
        ),
        1 => (
            "guest",
            VtpmGrant {
                registers: 2,
                ..VtpmGrant::NONE
            },
        ),
        _ => ("nobody", VtpmGrant::NONE),
    };
    TPM.with(|tpm| {
        let mut tpm = tpm.borrow_mut();
        while let Ok((request, tail)) = postcard::take_from_bytes::<Request>(rest) {
            rest = tail;
            let _ = tpm.handle(client, &grant, request);
            assert!(tpm.fatal.is_none(), "{:?}", tpm.fatal);
        }
    });
});
