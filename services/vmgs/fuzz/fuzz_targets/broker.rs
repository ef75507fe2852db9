//! An arbitrary file as the guest-state file the microkernel's broker (`pv-vmgs --broker`)
//! is given during sealing: reading both key protectors without the key, writing one and
//! rotating the key with it must end in answers or typed failures, never a panic; a rotation
//! that succeeds must leave a file only the new key opens, with the new protector.
//! Seeds: `services/vmgs/fuzz/seeds` (small plain and encrypted images under key 0x11...).
#![no_main]

use ipc_defs::services::vmgs::BrokerRequest;
use ipc_defs::services::vmgs::BrokerResponse;
use ipc_defs::services::vmgs::KeyBytes;
use ipc_defs::services::vmgs::ProtectorBytes;
use ipc_defs::services::vmgs::Protectors;
use libfuzzer_sys::fuzz_target;
use pv_vmgs::broker::answer;
use pv_vmgs::FileId;
use pv_vmgs::Key;
use pv_vmgs::MemStorage;
use pv_vmgs::Vmgs;

fuzz_target!(|data: &[u8]| {
    let (old, new) = ([0x11u8; 32], [0x22u8; 32]);
    let mut file = Some(MemStorage::new(data.to_vec()));
    for id in [FileId::HW_KEY_PROTECTOR, FileId::KEY_PROTECTOR] {
        if let BrokerResponse::Plain(Some(p)) = answer(&mut file, BrokerRequest::ReadPlain { file: id }) {
            assert!(p.len() <= ipc_defs::services::vmgs::MAX_PROTECTOR);
        }
    }
    let _ = answer(
        &mut file,
        BrokerRequest::WritePlain {
            key: KeyBytes::new(&old).unwrap(),
            file: FileId::KEY_PROTECTOR,
            data: ProtectorBytes::new(b"wrapped").unwrap(),
        },
    );
    let mut protectors = Protectors::new();
    let _ = protectors.push((FileId::HW_KEY_PROTECTOR, ProtectorBytes::new(b"sealed").unwrap()));
    let rotated = answer(
        &mut file,
        BrokerRequest::Rotate {
            old: KeyBytes::new(&old).unwrap(),
            new: KeyBytes::new(&new).unwrap(),
            protectors,
        },
    );
    if rotated == BrokerResponse::Done {
        let image = file.take().expect("kept after success").bytes;
        let mut v = Vmgs::open(MemStorage::new(image.clone()), Some(&Key::from_bytes(new)))
            .expect("the new key opens the rotated file");
        assert_eq!(v.read_unauthenticated(FileId::HW_KEY_PROTECTOR).unwrap(), b"sealed");
        assert!(Vmgs::open(MemStorage::new(image), Some(&Key::from_bytes(old))).is_err());
    }
});
