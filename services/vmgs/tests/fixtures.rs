//! The reference tool's files (copied from `shared/fixtures/vmgs`, see the README there) read
//! back exactly their documented contents.

use std::path::PathBuf;

use pv_vmgs::error::Error;
use pv_vmgs::FileId;
use pv_vmgs::Key;
use pv_vmgs::MemStorage;
use pv_vmgs::Vmgs;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn datastore_key() -> Key {
    Key::from_slice(&fixture("datastore.key")).expect("32-byte key")
}

#[test]
fn plain_reference_file_reads_back_its_contents() {
    let mut vmgs = Vmgs::open(MemStorage::new(fixture("plain.vmgs")), None).unwrap();
    assert!(!vmgs.is_encrypted());
    assert_eq!(
        vmgs.read_file(FileId::TPM_PPI).unwrap(),
        fixture("small.bin")
    );
    assert_eq!(
        vmgs.read_file(FileId::TPM_NVRAM).unwrap(),
        fixture("nvram.bin")
    );
    assert!(matches!(
        vmgs.read_file(FileId::ATTEST),
        Err(Error::NotFound(_))
    ));
}

#[test]
fn encrypted_reference_file_reads_back_its_contents_with_its_key() {
    let mut vmgs = Vmgs::open(
        MemStorage::new(fixture("encrypted.vmgs")),
        Some(&datastore_key()),
    )
    .unwrap();
    assert!(vmgs.is_encrypted());
    assert_eq!(
        vmgs.read_file(FileId::TPM_PPI).unwrap(),
        fixture("small.bin")
    );
    assert_eq!(
        vmgs.read_file(FileId::TPM_NVRAM).unwrap(),
        fixture("nvram.bin")
    );
}

#[test]
fn encrypted_reference_file_refuses_a_wrong_key() {
    let mut wrong = fixture("datastore.key");
    wrong[0] ^= 1;
    let err = Vmgs::open(
        MemStorage::new(fixture("encrypted.vmgs")),
        Some(&Key::from_slice(&wrong).unwrap()),
    )
    .unwrap_err();
    assert!(matches!(err, Error::WrongKey), "{err}");
    assert!(err.to_string().contains("wrong key"));
}

#[test]
fn encrypted_reference_file_without_key_gives_no_plaintext() {
    let mut vmgs = Vmgs::open(MemStorage::new(fixture("encrypted.vmgs")), None).unwrap();
    assert!(matches!(
        vmgs.read_file(FileId::TPM_NVRAM),
        Err(Error::NeedsKey)
    ));
    assert_ne!(
        vmgs.read_raw(FileId::TPM_NVRAM).unwrap(),
        fixture("nvram.bin")
    );
}
