//! An arbitrary file as a VMGS image: opening (with and without the key), listing, reading
//! every file and then changing it must end in values or typed errors, never a panic, and a
//! change that succeeds must leave a file that opens again with the same contents.
//! Seeds: `services/vmgs/fuzz/seeds` (small plain and encrypted images under key 0x11...).
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_vmgs::FileId;
use pv_vmgs::Key;
use pv_vmgs::MemStorage;
use pv_vmgs::Vmgs;

fuzz_target!(|data: &[u8]| {
    let key = Key::from_bytes([0x11; 32]);
    for k in [None, Some(&key)] {
        let Ok(mut v) = Vmgs::open(MemStorage::new(data.to_vec()), k) else {
            continue;
        };
        let _ = v.warnings();
        for f in v.files() {
            let _ = v.read_file(f.id);
            let _ = v.read_raw(f.id);
        }
        // A change on top of whatever state was found.
        if v.write_file(FileId::ATTEST, b"fuzz").is_ok() {
            let image = v.into_storage().bytes;
            let mut again = Vmgs::open(MemStorage::new(image), k).expect("our commit reopens");
            assert_eq!(again.read_file(FileId::ATTEST).expect("just written"), b"fuzz");
        }
    }
});
