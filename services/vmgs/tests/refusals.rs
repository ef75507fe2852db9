//! Changes the store refuses, each with its typed error, and the proof that a refused change
//! leaves the file byte for byte as it was: no write through a handle without the key, none
//! to the store's own tables, no silent overwrite by a move, no rotation to the same key.

use pv_vmgs::error::Error;
use pv_vmgs::FileId;
use pv_vmgs::Key;
use pv_vmgs::MemStorage;
use pv_vmgs::Vmgs;

fn key(byte: u8) -> Key {
    Key::from_bytes([byte; 32])
}

/// A file holding TPM_NVRAM and TPM_PPI, encrypted with `key` if one is given.
fn two_files(key: Option<&Key>) -> Vec<u8> {
    let mut v = Vmgs::create(MemStorage::default(), 64 << 10, key).unwrap();
    v.write_file(FileId::TPM_NVRAM, b"nvram").unwrap();
    v.write_file(FileId::TPM_PPI, b"ppi").unwrap();
    v.into_storage().bytes
}

/// One change to try, by name.
type Change<'a> = (
    &'a str,
    &'a dyn Fn(&mut Vmgs<MemStorage>) -> Result<(), Error>,
);

/// Runs each change on a fresh handle opened from `image` with `key`; each must fail as
/// `expected` says and leave the image unchanged.
fn refused(image: &[u8], key: Option<&Key>, changes: &[Change], expected: impl Fn(&Error) -> bool) {
    for (what, change) in changes {
        let mut v = Vmgs::open(MemStorage::new(image.to_vec()), key).unwrap();
        let err = change(&mut v).expect_err(what);
        assert!(expected(&err), "{what}: {err}");
        assert!(
            v.into_storage().bytes == image,
            "{what}: the refused change wrote to the file"
        );
    }
}

/// Without its key an encrypted file cannot be written, moved or re-keyed: the commit would
/// have to rewrite the encrypted extended table, and a write would otherwise land in
/// plaintext. (Deleting is allowed, as the reference tool's keyless `delete`.)
#[test]
fn a_locked_encrypted_file_refuses_every_change_that_needs_its_key() {
    let k = key(1);
    let image = two_files(Some(&k));
    refused(
        &image,
        None,
        &[
            ("write_file", &|v| v.write_file(FileId::ATTEST, b"plain")),
            ("overwrite", &|v| v.write_file(FileId::TPM_NVRAM, b"plain")),
            ("write_file_unencrypted", &|v| {
                v.write_file_unencrypted(FileId::KEY_PROTECTOR, b"kp")
            }),
            ("write_files_unencrypted", &|v| {
                v.write_files_unencrypted(&[(FileId::KEY_PROTECTOR, b"kp")])
            }),
            ("move_file", &|v| {
                v.move_file(FileId::TPM_NVRAM, FileId::TPM_NVRAM_BACKUP, false)
            }),
            ("add_key", &|v| v.add_key(&key(2))),
            ("update_key", &|v| v.update_key(&key(2))),
            ("drop_other_key", &|v| v.drop_other_key()),
        ],
        |e| matches!(e, Error::NeedsKey),
    );
    // The same file with its key takes those changes.
    let mut v = Vmgs::open(MemStorage::new(image), Some(&k)).unwrap();
    v.write_file(FileId::ATTEST, b"sealed").unwrap();
    v.move_file(FileId::TPM_NVRAM, FileId::TPM_NVRAM_BACKUP, false)
        .unwrap();
    assert_eq!(v.read_file(FileId::ATTEST).unwrap(), b"sealed");
}

/// Ids 0 (the file table) and 63 (the extended file table) are the store's own: no caller
/// writes, deletes or moves them, in a plain file or an encrypted one.
#[test]
fn the_stores_own_tables_cannot_be_written_moved_or_deleted() {
    let k = key(3);
    for key in [None, Some(&k)] {
        let image = two_files(key);
        for table in [FileId::FILE_TABLE, FileId::EXTENDED_FILE_TABLE] {
            refused(
                &image,
                key,
                &[
                    ("write_file", &|v| v.write_file(table, &[0; 4096])),
                    ("write_file_unencrypted", &|v| {
                        v.write_file_unencrypted(table, &[0; 4096])
                    }),
                    ("delete_file", &|v| v.delete_file(table)),
                    ("move from", &|v| v.move_file(table, FileId::ATTEST, true)),
                    ("move onto", &|v| v.move_file(FileId::TPM_PPI, table, true)),
                ],
                |e| matches!(e, Error::Reserved(id) if *id == table),
            );
        }
    }
}

/// A move onto an existing file fails unless the caller allows the overwrite; allowed, the
/// destination holds the source's contents and the source is gone.
#[test]
fn moving_onto_an_existing_file_needs_allow_overwrite() {
    let k = key(4);
    for key in [None, Some(&k)] {
        let image = two_files(key);
        refused(
            &image,
            key,
            &[("move", &|v| {
                v.move_file(FileId::TPM_PPI, FileId::TPM_NVRAM, false)
            })],
            |e| matches!(e, Error::Exists(FileId::TPM_NVRAM)),
        );
        let mut v = Vmgs::open(MemStorage::new(image), key).unwrap();
        v.move_file(FileId::TPM_PPI, FileId::TPM_NVRAM, true)
            .unwrap();
        let mut v = Vmgs::open(MemStorage::new(v.into_storage().bytes), key).unwrap();
        assert_eq!(v.read_file(FileId::TPM_NVRAM).unwrap(), b"ppi");
        assert!(matches!(
            v.read_file(FileId::TPM_PPI),
            Err(Error::NotFound(FileId::TPM_PPI))
        ));
    }
}

/// A rotation must retire the old key: "rotating" to the key already in use would leave it
/// working, so it is refused, as is the all-zero key anywhere a datastore key is set.
#[test]
fn rotating_to_the_same_or_the_zero_key_is_refused() {
    let k = key(5);
    let image = two_files(Some(&k));
    refused(
        &image,
        Some(&k),
        &[
            ("add_key", &|v| v.add_key(&key(5))),
            ("update_key", &|v| v.update_key(&key(5))),
        ],
        |e| matches!(e, Error::SameKey),
    );
    let zero = Key::from_bytes([0; 32]);
    refused(
        &image,
        Some(&k),
        &[
            ("add_key", &|v| v.add_key(&zero)),
            ("update_key", &|v| v.update_key(&zero)),
        ],
        |e| matches!(e, Error::WrongKey),
    );
    refused(
        &two_files(None),
        None,
        &[("encrypt", &|v| v.encrypt(&zero))],
        |e| matches!(e, Error::WrongKey),
    );
    assert!(matches!(
        Vmgs::create(MemStorage::default(), 64 << 10, Some(&zero)),
        Err(Error::WrongKey)
    ));
    // Keys that differ in two bytes, by the same bit, are different keys (every byte is
    // compared, not a parity of the differences).
    let mut bytes = [5; 32];
    bytes[0] ^= 0x80;
    bytes[31] ^= 0x80;
    let mut v = Vmgs::open(MemStorage::new(image), Some(&k)).unwrap();
    v.update_key(&Key::from_bytes(bytes)).unwrap();
}

/// A write larger than the whole image is refused up front, naming the file and its size,
/// even in an image with no free block left (where the allocation would first fail on the
/// new file table).
#[test]
fn a_write_larger_than_the_image_is_refused_naming_the_file() {
    // The smallest image holds its two tables and nothing else.
    let image = Vmgs::create(MemStorage::default(), 16 << 10, None)
        .unwrap()
        .into_storage()
        .bytes;
    let big = vec![7u8; (16 << 10) + 1];
    refused(
        &image,
        None,
        &[("write_file", &|v| v.write_file(FileId::ATTEST, &big))],
        |e| matches!(e, Error::NoSpace { file: FileId::ATTEST, bytes } if *bytes == big.len() as u64),
    );
}
