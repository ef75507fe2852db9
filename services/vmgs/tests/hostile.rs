//! The host controls the VMGS file. Tampering with an encrypted file is detected, never
//! returned as data; malformed files are typed errors, never panics or huge allocations.

use pv_vmgs::error::ContainerError;
use pv_vmgs::error::Error;
use pv_vmgs::error::HeaderProblem;
use pv_vmgs::format::Header;
use pv_vmgs::FileId;
use pv_vmgs::Key;
use pv_vmgs::MemStorage;
use pv_vmgs::Vmgs;
use zerocopy::FromBytes;
use zerocopy::IntoBytes;

fn key() -> Key {
    Key::from_bytes([0x5a; 32])
}

const SECRET_LEN: usize = 3000;

fn secret() -> Vec<u8> {
    (0..SECRET_LEN).map(|i| (i * 7) as u8).collect()
}

/// An encrypted file holding TPM_NVRAM = secret(); also its active header slot.
fn encrypted_image() -> (Vec<u8>, usize) {
    let mut v = Vmgs::create(MemStorage::default(), 128 << 10, Some(&key())).unwrap();
    v.write_file(FileId::TPM_NVRAM, &secret()).unwrap();
    let slot = v.active_slot();
    (v.into_storage().bytes, slot)
}

fn locate(image: &[u8], slot: usize, id: usize) -> (usize, usize) {
    let h = Header::read_from_bytes(&image[slot * 512..slot * 512 + 168]).unwrap();
    let ft = h.file_table_offset.get() as usize * 4096;
    let e = &image[ft + id * 64..ft + id * 64 + 64];
    let off = u32::from_le_bytes(e[0..4].try_into().unwrap()) as usize * 4096;
    (ft + id * 64, off)
}

/// Opening and reading TPM_NVRAM either fails or returns exactly the secret.
fn never_returns_tampered_data(image: Vec<u8>, what: &str) -> Option<Error> {
    match Vmgs::open(MemStorage::new(image), Some(&key())) {
        Err(e) => Some(e),
        Ok(mut v) => match v.read_file(FileId::TPM_NVRAM) {
            Ok(data) => {
                assert_eq!(data, secret(), "{what}: tampered data returned");
                None
            }
            Err(e) => Some(e),
        },
    }
}

fn fix_checksum(image: &mut [u8], slot: usize) {
    let at = slot * 512;
    let mut h = Header::read_from_bytes(&image[at..at + 168]).unwrap();
    h.checksum.set(h.compute_checksum());
    image[at..at + 168].copy_from_slice(h.as_bytes());
}

#[test]
fn flipping_any_byte_of_encrypted_data_is_an_authentication_error() {
    let (image, slot) = encrypted_image();
    let (_, data_at) = locate(&image, slot, FileId::TPM_NVRAM.index());
    for i in 0..SECRET_LEN {
        let mut bad = image.clone();
        bad[data_at + i] ^= 0x01;
        let err = never_returns_tampered_data(bad, "data").expect("detected");
        assert!(
            matches!(err, Error::Authentication(id) if id == FileId::TPM_NVRAM),
            "byte {i}: {err}"
        );
        assert!(err.to_string().contains("TPM_NVRAM"));
    }
}

#[test]
fn flipping_any_byte_of_the_table_entry_never_yields_tampered_data() {
    let (image, slot) = encrypted_image();
    let (entry_at, _) = locate(&image, slot, FileId::TPM_NVRAM.index());
    let mut detected = 0;
    for i in 0..64 {
        for bit in [0x01u8, 0x80] {
            let mut bad = image.clone();
            bad[entry_at + i] ^= bit;
            if never_returns_tampered_data(bad, &format!("entry byte {i}")).is_some() {
                detected += 1;
            }
        }
    }
    // Offset, size, nonce and tag are all covered; only allocation slack and reserved bytes
    // may change without consequence.
    assert!(detected >= 2 * (4 + 8 + 12 + 16), "detected {detected}");
}

#[test]
fn flipping_any_byte_of_the_extended_file_table_is_detected() {
    let (image, slot) = encrypted_image();
    let (_, ext_at) = locate(&image, slot, FileId::EXTENDED_FILE_TABLE.index());
    for i in (0..4096).step_by(7).chain([0, 4095]) {
        let mut bad = image.clone();
        bad[ext_at + i] ^= 0x10;
        let err = never_returns_tampered_data(bad, "extended table").expect("detected");
        assert!(
            matches!(err, Error::Authentication(id) if id == FileId::EXTENDED_FILE_TABLE),
            "byte {i}: {err}"
        );
    }
}

#[test]
fn flipping_any_byte_of_a_key_slot_is_detected() {
    let (image, slot) = encrypted_image();
    let slot_at = slot * 512 + 36;
    for i in 0..64 {
        // The nonce's reserved word (bytes 12..16) is not part of the cipher input.
        if (12..16).contains(&i) {
            continue;
        }
        // With the checksum fixed up, as a deliberate attacker would.
        let mut bad = image.clone();
        bad[slot_at + i] ^= 0x04;
        fix_checksum(&mut bad, slot);
        let err = never_returns_tampered_data(bad, "key slot").expect("detected");
        assert!(matches!(err, Error::WrongKey), "byte {i}: {err}");
    }
    // Without the fix-up the header is invalid and the older header is used: older data or
    // an error, never tampered data.
    let mut bad = image.clone();
    bad[slot_at + 40] ^= 0x04;
    never_returns_tampered_data(bad, "key slot without checksum");
}

/// A key slot is empty only when all of it is zero: its reserved word is no part of the
/// wrapped key, so a slot whose reserved word is set (and whose other bytes happen to hold no
/// zero) still opens.
#[test]
fn a_key_slot_with_its_reserved_word_set_still_opens() {
    // Nonce, tag and wrapped key are random: find a file where none of their 60 bytes is zero
    // (about four files in five).
    let (mut image, slot) = (0..64)
        .map(|_| encrypted_image())
        .find(|(image, slot)| {
            let at = slot * 512 + 36;
            image[at..at + 12]
                .iter()
                .chain(&image[at + 16..at + 64])
                .all(|b| *b != 0)
        })
        .expect("a key slot without zero bytes");
    let at = slot * 512 + 36;
    image[at + 12..at + 16].copy_from_slice(&[0xff; 4]);
    fix_checksum(&mut image, slot);
    assert_eq!(
        never_returns_tampered_data(image, "reserved word").map(|e| e.to_string()),
        None
    );
}

fn open_plain(image: Vec<u8>) -> Result<Vmgs<MemStorage>, Error> {
    Vmgs::open(MemStorage::new(image), None)
}

fn plain_image() -> Vec<u8> {
    let mut v = Vmgs::create(MemStorage::default(), 64 << 10, None).unwrap();
    v.write_file(FileId::TPM_PPI, b"ppi").unwrap();
    v.into_storage().bytes
}

#[test]
fn zero_length_and_truncated_files_are_typed_errors() {
    assert!(matches!(open_plain(Vec::new()), Err(Error::Empty)));
    let image = plain_image();
    for len in [1, 511, 512, 4096, 16896, image.len() - 512, image.len() - 1] {
        let err = open_plain(image[..len].to_vec()).unwrap_err();
        assert!(matches!(err, Error::Container(_)), "{len}: {err}");
    }
    // Zeros where a file was: no header written.
    assert!(matches!(
        Vmgs::open(MemStorage::new(vec![0; 64 << 10]), None),
        Err(Error::Container(ContainerError::NoFooter))
    ));
}

/// The container is whole 512-byte sectors: a valid footer after a length that is not is
/// still refused. The smallest image the format allows (16 KiB) is made and opens.
#[test]
fn the_container_is_whole_sectors_from_the_smallest_image_up() {
    let image = plain_image();
    let (data, footer) = image.split_at(image.len() - 512);
    let mut odd = data.to_vec();
    odd.push(0);
    odd.extend_from_slice(footer);
    let err = open_plain(odd.clone()).unwrap_err();
    assert!(
        matches!(err, Error::Container(ContainerError::BadLength(n)) if n == odd.len() as u64),
        "{err}"
    );

    let smallest = Vmgs::create(MemStorage::default(), 16 << 10, None).unwrap();
    let bytes = smallest.into_storage().bytes;
    assert_eq!(bytes.len(), (16 << 10) + 512);
    let v = open_plain(bytes).unwrap();
    assert_eq!(v.image_size(), 16 << 10);
}

#[test]
fn version_1_files_are_refused_by_name() {
    let mut image = plain_image();
    image[512..520].copy_from_slice(b"EFI PART");
    let err = open_plain(image.clone()).unwrap_err();
    assert!(matches!(err, Error::V1Format));
    assert!(err.to_string().contains("version 1"));
    // Also as a raw disk without the VHD footer.
    let raw = image[..image.len() - 512].to_vec();
    assert!(matches!(open_plain(raw), Err(Error::V1Format)));
}

#[test]
fn both_headers_corrupt_is_a_typed_error() {
    let mut image = plain_image();
    image[3] ^= 1;
    image[512 + 20] ^= 1;
    let err = open_plain(image).unwrap_err();
    assert!(matches!(err, Error::NoValidHeader { .. }), "{err}");
}

/// A header slot never written (all zero) is not a problem: a new file has one, opens, and
/// warns of nothing. A corrupt header is one, even when the other slot is blank (the file is
/// then corrupt, not empty); only two blank slots make an empty file.
#[test]
fn a_blank_header_slot_is_not_corruption_but_a_corrupt_one_is() {
    let new = Vmgs::create(MemStorage::default(), 64 << 10, None)
        .unwrap()
        .into_storage()
        .bytes;
    assert!(
        new[512..1024].iter().all(|b| *b == 0),
        "slot 2 never written"
    );
    let v = open_plain(new.clone()).unwrap();
    assert!(v.warnings().is_empty(), "{:?}", v.warnings());

    let mut corrupt = new.clone();
    corrupt[3] ^= 1;
    let err = open_plain(corrupt).unwrap_err();
    assert!(
        matches!(
            &err,
            Error::NoValidHeader {
                header1: HeaderProblem::Signature,
                header2: HeaderProblem::Empty
            }
        ),
        "{err}"
    );

    let mut blank = new;
    blank[..512].fill(0);
    assert!(matches!(open_plain(blank), Err(Error::Empty)));
}

#[test]
fn equal_sequence_numbers_are_corruption() {
    let mut image = plain_image();
    let mut h = Header::read_from_bytes(&image[0..168]).unwrap();
    let other = Header::read_from_bytes(&image[512..680]).unwrap();
    h.sequence = other.sequence;
    h.checksum.set(h.compute_checksum());
    image[0..168].copy_from_slice(h.as_bytes());
    assert!(matches!(
        open_plain(image),
        Err(Error::SequenceMismatch { .. })
    ));
}

/// Writes an entry field of the active table (with `f`) and returns the result of opening.
fn with_entry(id: usize, f: impl Fn(&mut [u8])) -> Result<Vmgs<MemStorage>, Error> {
    let mut image = plain_image();
    let slot = Vmgs::open(MemStorage::new(image.clone()), None)
        .unwrap()
        .active_slot();
    let (entry_at, _) = locate(&image, slot, id);
    f(&mut image[entry_at..entry_at + 64]);
    open_plain(image)
}

#[test]
fn entries_pointing_outside_the_image_or_overlapping_are_refused() {
    let set32 =
        |at: usize, v: u32| move |e: &mut [u8]| e[at..at + 4].copy_from_slice(&v.to_le_bytes());
    // Offset beyond the image, into the headers, allocation running past the end.
    for (what, r) in [
        ("offset past end", with_entry(2, set32(0, 1000))),
        ("offset in headers", with_entry(2, set32(0, 1))),
        ("offset u32::MAX", with_entry(2, set32(0, u32::MAX))),
        ("huge allocation", with_entry(2, set32(4, u32::MAX))),
    ] {
        let err = r.unwrap_err();
        assert!(
            matches!(&err, Error::CorruptEntry { file, .. } if *file == FileId::TPM_PPI),
            "{what}: {err}"
        );
    }
    // Absurd valid size.
    let err = with_entry(2, |e| e[8..16].copy_from_slice(&u64::MAX.to_le_bytes())).unwrap_err();
    assert!(matches!(err, Error::CorruptEntry { .. }), "{err}");
    // Overlap with the file table.
    let image = plain_image();
    let slot = Vmgs::open(MemStorage::new(image.clone()), None)
        .unwrap()
        .active_slot();
    let ft = Header::read_from_bytes(&image[slot * 512..slot * 512 + 168])
        .unwrap()
        .file_table_offset
        .get();
    let err = with_entry(2, set32(0, ft)).unwrap_err();
    assert!(matches!(err, Error::Overlap { .. }), "{err}");
}

/// The file table's own entry (id 0) must say what the header says: one block at the
/// header's table offset. Where a table has no entry 0, its block still counts as used, and
/// an entry over it is an overlap.
#[test]
fn the_file_tables_own_entry_must_agree_with_the_header() {
    let set32 =
        |at: usize, v: u32| move |e: &mut [u8]| e[at..at + 4].copy_from_slice(&v.to_le_bytes());
    // Block 10 is free in the plain image; 1 block there, or 2 blocks at the right place.
    for (what, r) in [
        ("elsewhere", with_entry(0, set32(0, 10))),
        ("two blocks", with_entry(0, set32(4, 2))),
    ] {
        let err = r.unwrap_err();
        assert!(
            matches!(&err, Error::CorruptEntry { file, .. } if *file == FileId::FILE_TABLE),
            "{what}: {err}"
        );
    }
    // Without entry 0, TPM_PPI moved onto the table's block.
    let image = plain_image();
    let slot = open_plain(image.clone()).unwrap().active_slot();
    let ft = Header::read_from_bytes(&image[slot * 512..slot * 512 + 168])
        .unwrap()
        .file_table_offset
        .get();
    let mut bad = image.clone();
    let (own, _) = locate(&image, slot, 0);
    bad[own..own + 64].fill(0);
    assert!(
        open_plain(bad.clone()).is_ok(),
        "a table without entry 0 opens"
    );
    let (ppi, _) = locate(&image, slot, FileId::TPM_PPI.index());
    bad[ppi..ppi + 4].copy_from_slice(&ft.to_le_bytes());
    let err = open_plain(bad).unwrap_err();
    assert!(matches!(err, Error::Overlap { .. }), "{err}");
}

#[test]
fn an_absurd_footer_size_is_refused_without_allocating_it() {
    let mut image = plain_image();
    let n = image.len();
    // 4 GiB claimed in a 64 KiB file.
    image[n - 512 + 48..n - 512 + 56].copy_from_slice(&(4u64 << 30).to_be_bytes());
    let err = open_plain(image).unwrap_err();
    assert!(matches!(err, Error::Container(_)), "{err}");
}

#[test]
fn garbage_everywhere_is_an_error_not_a_panic() {
    let image = plain_image();
    let mut seed = 0x1234_5678u32;
    for _ in 0..300 {
        let mut bad = image.clone();
        for _ in 0..8 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let at = (seed as usize >> 3) % (3 * 4096);
            bad[at] = (seed >> 24) as u8;
        }
        if let Ok(mut v) = open_plain(bad) {
            for f in v.files() {
                let _ = v.read_file(f.id);
            }
        }
    }
}

#[test]
fn a_plaintext_entry_injected_into_an_encrypted_file_is_not_returned() {
    let (mut image, slot) = encrypted_image();
    // The host adds an ATTEST entry pointing at blocks it wrote itself, unencrypted.
    let (nvram_entry, _) = locate(&image, slot, FileId::TPM_NVRAM.index());
    let (attest_entry, _) = locate(&image, slot, FileId::ATTEST.index());
    let free_block = 30u32;
    image[free_block as usize * 4096..][..8].copy_from_slice(b"INJECTED");
    let mut e = image[nvram_entry..nvram_entry + 64].to_vec();
    e[0..4].copy_from_slice(&free_block.to_le_bytes());
    e[4..8].copy_from_slice(&1u32.to_le_bytes());
    e[8..16].copy_from_slice(&8u64.to_le_bytes());
    e[16..64].fill(0);
    image[attest_entry..attest_entry + 64].copy_from_slice(&e);
    let mut v = Vmgs::open(MemStorage::new(image), Some(&key())).unwrap();
    let err = v.read_file(FileId::ATTEST).unwrap_err();
    assert!(
        matches!(err, Error::Unauthenticated(id) if id == FileId::ATTEST),
        "{err}"
    );
    assert_eq!(v.read_file(FileId::TPM_NVRAM).unwrap(), secret());
}

/// Removing an id's table entry leaves its key in the extended table, as the reference
/// tool's keyless `delete` does: the file opens, the id is gone, and the leftover key is never
/// used, even when the host later puts an entry for that id back by hand.
#[test]
fn a_removed_table_entry_is_a_deletion_whose_leftover_key_is_never_used() {
    let (mut image, slot) = encrypted_image();
    let (entry, data_at) = locate(&image, slot, FileId::TPM_NVRAM.index());
    let original = image[entry..entry + 64].to_vec();
    let ciphertext = image[data_at..data_at + SECRET_LEN].to_vec();
    image[entry..entry + 64].fill(0);
    let mut v = Vmgs::open(MemStorage::new(image.clone()), Some(&key())).unwrap();
    assert!(matches!(
        v.read_file(FileId::TPM_NVRAM),
        Err(Error::NotFound(FileId::TPM_NVRAM))
    ));
    assert!(
        v.warnings().iter().any(|w| w.contains("TPM_NVRAM")),
        "{:?}",
        v.warnings()
    );
    // A later change does not carry the leftover key: the entry put back afterwards (the
    // old ciphertext, in a free block, with its old nonce, tag and attributes) no longer
    // decrypts.
    v.write_file(FileId::ATTEST, b"report").unwrap();
    let slot = v.active_slot();
    let mut image = v.into_storage().bytes;
    let (entry, _) = locate(&image, slot, FileId::TPM_NVRAM.index());
    let free_block = 31usize;
    image[free_block * 4096..][..SECRET_LEN].copy_from_slice(&ciphertext);
    image[entry..entry + 64].copy_from_slice(&original);
    image[entry..entry + 4].copy_from_slice(&(free_block as u32).to_le_bytes());
    let mut v = Vmgs::open(MemStorage::new(image), Some(&key())).unwrap();
    assert_eq!(v.read_file(FileId::ATTEST).unwrap(), b"report");
    assert!(v.warnings().is_empty(), "{:?}", v.warnings());
    assert!(
        matches!(
            v.read_file(FileId::TPM_NVRAM),
            Err(Error::Unauthenticated(FileId::TPM_NVRAM))
        ),
        "the dropped key was used"
    );
}

/// The host marks an entry it made "encrypted" in the (unauthenticated) file table, with
/// contents sealed under the all-zero key, for an id the extended table holds no key for: it
/// is refused as unauthenticated, never opened with the zero key.
#[test]
fn an_entry_the_host_marks_encrypted_without_a_key_is_not_opened_with_the_zero_key() {
    use aes_gcm::aead::AeadInOut;
    use aes_gcm::aead::KeyInit;
    let (mut image, slot) = encrypted_image();
    let (nvram_entry, _) = locate(&image, slot, FileId::TPM_NVRAM.index());
    let (attest_entry, _) = locate(&image, slot, FileId::ATTEST.index());
    let free_block = 30usize;
    let mut forged = *b"FORGED!!";
    let nonce = [9u8; 12];
    let tag = aes_gcm::Aes256Gcm::new_from_slice(&[0; 32])
        .unwrap()
        .encrypt_inout_detached(&nonce.into(), &[], forged.as_mut_slice().into())
        .unwrap();
    image[free_block * 4096..][..8].copy_from_slice(&forged);
    let mut e = image[nvram_entry..nvram_entry + 64].to_vec();
    e[0..4].copy_from_slice(&(free_block as u32).to_le_bytes());
    e[4..8].copy_from_slice(&1u32.to_le_bytes());
    e[8..16].copy_from_slice(&8u64.to_le_bytes());
    e[16..28].copy_from_slice(&nonce);
    e[28..44].copy_from_slice(&tag);
    e[44..48].copy_from_slice(&3u32.to_le_bytes());
    image[attest_entry..attest_entry + 64].copy_from_slice(&e);
    let mut v = Vmgs::open(MemStorage::new(image), Some(&key())).unwrap();
    let err = v.read_file(FileId::ATTEST).unwrap_err();
    assert!(
        matches!(err, Error::Unauthenticated(FileId::ATTEST)),
        "{err}"
    );
    assert_eq!(v.read_file(FileId::TPM_NVRAM).unwrap(), secret());
}

/// Rewrites the encrypted extended table of `image` (active header `slot`) with `change`
/// applied to its plaintext, as only a holder of the datastore key could.
fn rewrite_extended_table(image: &mut [u8], slot: usize, change: impl FnOnce(&mut [u8])) {
    use aes_gcm::aead::AeadInOut;
    use aes_gcm::aead::KeyInit;
    let gcm = |k: &[u8]| aes_gcm::Aes256Gcm::new_from_slice(k).unwrap();
    let h = Header::read_from_bytes(&image[slot * 512..slot * 512 + 168]).unwrap();
    let ks = h.key_slots.iter().find(|s| !s.is_empty()).unwrap();
    let mut metadata_key = ks.wrapped_key;
    gcm(key().as_bytes())
        .decrypt_inout_detached(
            &ks.nonce.into(),
            &[],
            metadata_key.as_mut_slice().into(),
            &ks.tag.into(),
        )
        .unwrap();
    let (entry, at) = locate(image, slot, FileId::EXTENDED_FILE_TABLE.index());
    let nonce: [u8; 12] = image[entry + 16..entry + 28].try_into().unwrap();
    let tag: [u8; 16] = image[entry + 28..entry + 44].try_into().unwrap();
    let table = &mut image[at..at + 4096];
    gcm(&metadata_key)
        .decrypt_inout_detached(&nonce.into(), &[], table.into(), &tag.into())
        .unwrap();
    change(table);
    let tag = gcm(&metadata_key)
        .encrypt_inout_detached(&nonce.into(), &[], table.into())
        .unwrap();
    image[entry + 28..entry + 44].copy_from_slice(&tag);
}

/// A leftover extended entry is accepted as the reference tool leaves it, and still refused
/// when it is not one a writer makes.
#[test]
fn a_leftover_extended_entry_is_accepted_only_when_well_formed() {
    let k = key();
    let mut v = Vmgs::create(MemStorage::default(), 128 << 10, Some(&k)).unwrap();
    v.write_file(FileId::TPM_NVRAM, &secret()).unwrap();
    v.write_file(FileId::ATTEST, b"a").unwrap();
    // Deleted without the key: the leftover entry is the one the writer made.
    let image = v.into_storage().bytes;
    let mut locked = Vmgs::open(MemStorage::new(image), None).unwrap();
    locked.delete_file(FileId::TPM_NVRAM).unwrap();
    let slot = locked.active_slot();
    let image = locked.into_storage().bytes;
    let mut v = Vmgs::open(MemStorage::new(image.clone()), Some(&k)).unwrap();
    assert_eq!(v.read_file(FileId::ATTEST).unwrap(), b"a");
    let at = FileId::TPM_NVRAM.index() * 64;
    for (what, change) in [
        (
            "unknown attribute",
            Box::new(|t: &mut [u8]| t[at] |= 4) as Box<dyn Fn(&mut [u8])>,
        ),
        ("reserved byte", Box::new(|t: &mut [u8]| t[at + 63] = 1)),
    ] {
        let mut bad = image.clone();
        rewrite_extended_table(&mut bad, slot, change);
        let err = Vmgs::open(MemStorage::new(bad), Some(&k)).unwrap_err();
        assert!(
            matches!(&err, Error::CorruptEntry { file, .. } if *file == FileId::TPM_NVRAM),
            "{what}: {err}"
        );
    }
    // An unchanged rewrite opens: the refusals above come from the changes, not the helper.
    let mut same = image.clone();
    rewrite_extended_table(&mut same, slot, |_| {});
    assert!(Vmgs::open(MemStorage::new(same), Some(&k)).is_ok());
}

#[test]
fn the_store_refuses_a_file_with_the_defective_zero_metadata_key_until_rekeyed() {
    use pv_vmgs::server::Server;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let file = std::fs::read(dir.join("encrypted.vmgs")).unwrap();
    let k = Key::from_slice(&std::fs::read(dir.join("datastore.key")).unwrap()).unwrap();
    let v = Vmgs::open(MemStorage::new(file.clone()), Some(&k)).unwrap();
    assert!(v.has_zero_metadata_key());
    let err = Server::open(MemStorage::new(file.clone()), Some(k.clone()))
        .err()
        .unwrap();
    assert!(matches!(err, Error::ZeroMetadataKey), "{err}");
    // `update-key` retires it.
    let mut v = Vmgs::open(MemStorage::new(file), Some(&k)).unwrap();
    let new = Key::from_bytes([3; 32]);
    v.update_key(&new).unwrap();
    assert!(!v.has_zero_metadata_key());
    assert!(Server::open(MemStorage::new(v.into_storage().bytes), Some(new)).is_ok());
}

#[test]
fn encrypting_a_plain_file_leaves_no_plaintext_anywhere() {
    let marker = b"PLAINTEXT-MARKER-0123456789";
    let mut v = Vmgs::create(MemStorage::default(), 128 << 10, None).unwrap();
    for i in 0..5u8 {
        // Overwrites leave older copies in free blocks.
        let mut data = marker.repeat(100);
        data.push(i);
        v.write_file(FileId::TPM_NVRAM, &data).unwrap();
        v.write_file(FileId::ATTEST, marker).unwrap();
    }
    v.encrypt(&key()).unwrap();
    assert!(v.warnings().is_empty(), "{:?}", v.warnings());
    let image = v.into_storage().bytes;
    assert!(
        !image.windows(marker.len()).any(|w| w == marker),
        "plaintext survived encryption"
    );
    let mut v = Vmgs::open(MemStorage::new(image), Some(&key())).unwrap();
    assert_eq!(v.read_file(FileId::ATTEST).unwrap(), marker);
}

/// Every block outside the encrypted state is zero after `encrypt`: the gaps between files
/// and the free tail after the last used block alike, wherever earlier writes, overwrites and
/// deletions left plaintext.
#[test]
fn encrypting_wipes_every_block_the_encrypted_state_does_not_use() {
    let mut v = Vmgs::create(MemStorage::default(), 512 << 10, None).unwrap();
    v.write_file(FileId::TPM_NVRAM, &[0xaa; 5000]).unwrap();
    v.write_file(FileId::ATTEST, &[0xbb; 9000]).unwrap();
    v.write_file(FileId::TPM_NVRAM, &[0xcc; 5000]).unwrap();
    // A large file near the end, then deleted: its plaintext lies in the free tail, which is
    // longer than one wiping write.
    v.write_file(FileId::GUEST_FIRMWARE, &[0xdd; 300_000])
        .unwrap();
    v.delete_file(FileId::GUEST_FIRMWARE).unwrap();
    let before = v.storage_mut().bytes.clone();
    v.encrypt(&key()).unwrap();
    assert!(v.warnings().is_empty(), "{:?}", v.warnings());

    let blocks = (v.image_size() / 4096) as usize;
    let mut used = vec![false; blocks];
    for f in v.files() {
        for b in f.offset..f.offset + f.blocks {
            used[b as usize] = true;
        }
    }
    let image = v.into_storage().bytes;
    let block = |img: &[u8], b: usize| img[b * 4096..(b + 1) * 4096].to_vec();
    let last_used = (0..blocks).rev().find(|b| used[*b]).unwrap();
    assert!(
        (last_used + 1..blocks).any(|b| block(&before, b) != [0; 4096]),
        "the test leaves no plaintext in the free tail (last used block {last_used})"
    );
    for b in (2..blocks).filter(|b| !used[*b]) {
        assert_eq!(block(&image, b), [0; 4096], "free block {b} not wiped");
    }
    let mut v = Vmgs::open(MemStorage::new(image), Some(&key())).unwrap();
    assert_eq!(v.read_file(FileId::TPM_NVRAM).unwrap(), [0xcc; 5000]);
    assert_eq!(v.read_file(FileId::ATTEST).unwrap(), [0xbb; 9000]);
}

/// The host chooses a file's size (up to its allocation): a reader with a memory budget
/// sets a read limit, and a size over it is refused before anything is allocated or read.
/// A file of exactly the limit reads.
#[test]
fn a_file_size_over_the_read_limit_is_refused_before_reading() {
    // TPM_PPI claims 10 whole blocks (6..16, all inside the image).
    let mut v = with_entry(2, |e| {
        e[0..4].copy_from_slice(&6u32.to_le_bytes());
        e[4..8].copy_from_slice(&10u32.to_le_bytes());
        e[8..16].copy_from_slice(&40960u64.to_le_bytes());
    })
    .unwrap();
    v.set_read_limit(4096);
    let err = v.read_file(FileId::TPM_PPI).unwrap_err();
    assert!(
        matches!(
            err,
            Error::TooLarge {
                file: FileId::TPM_PPI,
                bytes: 40960,
                limit: 4096
            }
        ),
        "{err}"
    );
    v.set_read_limit(40959);
    assert!(matches!(
        v.read_raw(FileId::TPM_PPI),
        Err(Error::TooLarge { .. })
    ));
    v.set_read_limit(40960);
    assert_eq!(v.read_file(FileId::TPM_PPI).unwrap().len(), 40960);
}

/// An entry may end exactly at the image's last block; one block further is corruption.
#[test]
fn an_entry_ending_one_block_past_the_image_is_refused() {
    // The 64 KiB image has blocks 0..16; TPM_PPI gets two blocks at its end.
    let at = |offset: u32| {
        move |e: &mut [u8]| {
            e[0..4].copy_from_slice(&offset.to_le_bytes());
            e[4..8].copy_from_slice(&2u32.to_le_bytes());
        }
    };
    let mut v = with_entry(2, at(14)).unwrap();
    assert_eq!(v.read_file(FileId::TPM_PPI).unwrap(), [0; 3]);
    let err = with_entry(2, at(15)).unwrap_err();
    assert!(
        matches!(&err, Error::CorruptEntry { file, .. } if *file == FileId::TPM_PPI),
        "{err}"
    );
}

/// A header whose file table would lie in the header blocks (0 or 1), or span other than one
/// block, is not a valid header, even with a correct checksum: the older header is used.
#[test]
fn a_header_whose_file_table_overlaps_the_header_blocks_is_invalid() {
    let image = plain_image();
    let slot = open_plain(image.clone()).unwrap().active_slot();
    for (offset, size) in [(0u32, 1u32), (1, 1), (4, 2), (4, 0)] {
        let mut bad = image.clone();
        let at = slot * 512;
        let mut h = Header::read_from_bytes(&bad[at..at + 168]).unwrap();
        h.file_table_offset.set(offset);
        h.file_table_size.set(size);
        bad[at..at + 168].copy_from_slice(h.as_bytes());
        fix_checksum(&mut bad, slot);
        let report = pv_vmgs::store::inspect_headers(&mut MemStorage::new(bad.clone())).unwrap();
        assert_eq!(
            report.problems[slot],
            Some(HeaderProblem::FileTable { offset, size }),
            "table at block {offset}, {size} blocks"
        );
        assert_eq!(report.active, Ok(1 - slot));
        let mut v = open_plain(bad).unwrap();
        assert_eq!(v.active_slot(), 1 - slot);
        assert!(matches!(
            v.read_file(FileId::TPM_PPI),
            Err(Error::NotFound(_))
        ));
    }
}

/// An encrypted file's extended table is one whole 4096-byte table: an entry that says
/// otherwise (a valid size the host shortened, or no allocation) is corruption, even though
/// the table's ciphertext itself is intact and authenticates.
#[test]
fn an_extended_table_entry_that_is_not_one_whole_table_is_refused() {
    let (image, slot) = encrypted_image();
    let (entry, _) = locate(&image, slot, FileId::EXTENDED_FILE_TABLE.index());
    for (what, field, value) in [
        ("valid size 4095", 8..16, 4095u64.to_le_bytes().to_vec()),
        ("no allocation", 4..8, 0u32.to_le_bytes().to_vec()),
    ] {
        let mut bad = image.clone();
        bad[entry + field.start..entry + field.end].copy_from_slice(&value);
        let err = Vmgs::open(MemStorage::new(bad), Some(&key())).unwrap_err();
        assert!(
            matches!(&err, Error::CorruptEntry { file, .. } if *file == FileId::EXTENDED_FILE_TABLE),
            "{what}: {err}"
        );
    }
}
