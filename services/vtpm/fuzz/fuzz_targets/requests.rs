//! Arbitrary vtpm requests from a client service (postcard frames: TPM commands of any
//! shape, platform signals, guest register accesses) against the real engine: responses or
//! typed errors, never a panic. One TPM for the whole run (libtpms is one per process).
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::Mutex;

use ipc_defs::services::vtpm::Request;
use libfuzzer_sys::fuzz_target;
use pv_vtpm::libtpms::Engine;
use pv_vtpm::server::Tpm;
use pv_vtpm::state::CheckpointMemory;
use pv_vtpm::state::PermanentStore;
use pv_vtpm::state::SharedNv;

#[derive(Clone, Default)]
struct Disk(Arc<Mutex<Option<Vec<u8>>>>);

impl PermanentStore for Disk {
    fn read(&mut self) -> Result<Option<Vec<u8>>, String> {
        Ok(self.0.lock().unwrap().clone())
    }
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        *self.0.lock().unwrap() = Some(bytes.to_vec());
        Ok(())
    }
}

struct Region(RefCell<Vec<u8>>);

impl CheckpointMemory for Region {
    fn size(&self) -> usize {
        self.0.borrow().len()
    }
    fn read(&self, offset: usize, buf: &mut [u8]) -> bool {
        let m = self.0.borrow();
        let Some(s) = m.get(offset..offset + buf.len()) else { return false };
        buf.copy_from_slice(s);
        true
    }
    fn write(&self, offset: usize, data: &[u8]) -> bool {
        let mut m = self.0.borrow_mut();
        let Some(s) = m.get_mut(offset..offset + data.len()) else { return false };
        s.copy_from_slice(data);
        true
    }
}

thread_local! {
    static TPM: RefCell<Tpm<Disk, Region>> = RefCell::new({
        let nv = SharedNv::default();
        let engine = Engine::take(Box::new(nv.clone())).expect("free").expect("TPM 2.0");
        Tpm::start(engine, nv, Disk::default(), Region(RefCell::new(vec![0; 256 << 10])))
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
