//! The fuzz seeds in `fuzz/seeds` are the images this writer makes today (so the fuzzer
//! starts from valid files); this test fails if they drift from what the library writes.

use pv_vmgs::FileId;
use pv_vmgs::Key;
use pv_vmgs::MemStorage;
use pv_vmgs::Vmgs;

fn seed_images() -> Vec<(&'static str, Vec<u8>)> {
    let key = Key::from_bytes([0x11; 32]);
    let mut plain = Vmgs::create(MemStorage::default(), 32 << 10, None).unwrap();
    plain.write_file(FileId::TPM_PPI, b"ppi").unwrap();
    let mut enc = Vmgs::create(MemStorage::default(), 32 << 10, Some(&key)).unwrap();
    enc.write_file(FileId::TPM_NVRAM, b"nvram").unwrap();
    vec![
        ("plain.vmgs", plain.into_storage().bytes),
        ("encrypted.vmgs", enc.into_storage().bytes),
    ]
}

#[test]
fn fuzz_seeds_open_as_valid_images() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    for (name, image) in seed_images() {
        let path = dir.join(name);
        if std::env::var_os("PV_WRITE_SEEDS").is_some() {
            std::fs::write(&path, &image).unwrap();
        }
        let seed = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (PV_WRITE_SEEDS=1 makes it)", path.display()));
        let key = Key::from_bytes([0x11; 32]);
        let k = name.starts_with("encrypted").then_some(&key);
        let v = Vmgs::open(MemStorage::new(seed), k).unwrap();
        assert!(v.files().len() >= 3, "{name}");
    }
}
