//! Arbitrary frames from a client of the store: decoding and serving them against a small
//! encrypted store must give responses or typed errors, never a panic or a grant bypass.
#![no_main]

use ipc_defs::services::vmgs::FileId;
use ipc_defs::services::vmgs::FileIdSet;
use ipc_defs::services::vmgs::Request;
use ipc_defs::services::vmgs::Response;
use ipc_defs::services::vmgs::VmgsError;
use libfuzzer_sys::fuzz_target;
use pv_vmgs::server::Server;
use pv_vmgs::Key;
use pv_vmgs::MemStorage;
use pv_vmgs::Vmgs;

fuzz_target!(|data: &[u8]| {
    let key = Key::from_bytes([0x11; 32]);
    let mut v = Vmgs::create(MemStorage::default(), 64 << 10, Some(&key)).expect("create");
    v.write_file(FileId::ATTEST, b"not yours").expect("write");
    let image = v.into_storage().bytes;
    let mut server = Server::open(MemStorage::new(image), Some(key)).expect("open");
    let granted = FileIdSet::EMPTY.with(FileId::TPM_NVRAM).with(FileId::TPM_PPI);
    let mut rest = data;
    while let Ok((request, tail)) = postcard::take_from_bytes::<Request>(rest) {
        rest = tail;
        match server.handle("fuzz", granted, request) {
            Response::Data { data, .. } => assert_ne!(data.as_slice(), b"not yours"),
            Response::Files(files) => assert!(files.iter().all(|f| granted.contains(f.file))),
            Response::Error(VmgsError::NotFound(id)) | Response::Error(VmgsError::Authentication(id)) => {
                assert!(granted.contains(id))
            }
            _ => {}
        }
    }
});
