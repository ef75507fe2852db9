//! Files we write are laid out as the reference tool expects: checked by an independent,
//! minimal reader written here from the format notes (its own CRC, its own structure
//! offsets, the cipher used directly), not with the library's parser.

use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use pv_vmgs::FileId;
use pv_vmgs::Key;
use pv_vmgs::MemStorage;
use pv_vmgs::Vmgs;

/// Bitwise CRC-32 (IEEE, reflected 0xEDB88320), independent of crc32fast.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn gcm_open(key: &[u8], nonce: &[u8], tag: &[u8], data: &mut [u8]) -> bool {
    let cipher = Aes256Gcm::new_from_slice(key).unwrap();
    let nonce: [u8; 12] = nonce.try_into().unwrap();
    let tag: [u8; 16] = tag.try_into().unwrap();
    cipher
        .decrypt_inout_detached(&nonce.into(), &[], data.into(), &tag.into())
        .is_ok()
}

/// What the minimal reader found.
struct Parsed {
    image: usize,
    active_header: usize,
    sequence: u32,
    encrypted: bool,
    metadata_key: Option<Vec<u8>>,
    ext_nonce: Vec<u8>,
    /// The extended file table in the clear (as stored, for a plain file).
    ext_table: Vec<u8>,
    files: Vec<(u32, Vec<u8>)>,
}

/// Reads a whole VMGS file the way the format notes describe it, asserting every rule.
fn minimal_read(file: &[u8], datastore_key: Option<&[u8]>) -> Parsed {
    // Container: fixed VHD footer.
    assert!(file.len() > 512 && file.len().is_multiple_of(512));
    let footer = &file[file.len() - 512..];
    assert_eq!(&footer[0..8], b"conectix");
    assert_eq!(be32(footer, 8), 2, "features");
    assert_eq!(be32(footer, 12), 0x0001_0000, "format version");
    assert_eq!(be64(footer, 16), u64::MAX, "data offset of a fixed disk");
    let image = be64(footer, 48) as usize;
    assert_eq!(be64(footer, 40) as usize, image, "original size");
    assert_eq!(image, file.len() - 512);
    assert_eq!(be32(footer, 60), 2, "fixed disk");
    let sum: u32 = footer
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |s, (_, b)| s.wrapping_add(u32::from(*b)));
    assert_eq!(be32(footer, 64), !sum, "footer checksum");

    // Headers at 0 and 512.
    let valid = |h: &[u8]| {
        let mut z = h[..168].to_vec();
        z[12..16].fill(0);
        &h[0..8] == b"GUESTRTS"
            && le32(h, 8) == 0x0003_0000
            && le32(h, 20) == 168
            && le32(h, 28) == 1
            && le32(h, 24) >= 2
            && le32(h, 12) == crc32(&z)
    };
    let (h1, h2) = (&file[0..168], &file[512..680]);
    assert!(
        file[168..512].iter().all(|b| *b == 0),
        "rest of sector 0 is zero"
    );
    let active = match (valid(h1), valid(h2)) {
        (true, true) => {
            let (s1, s2) = (le32(h1, 16), le32(h2, 16));
            if s1 == s2.wrapping_add(1) {
                0
            } else {
                assert_eq!(s2, s1.wrapping_add(1), "consecutive sequences");
                1
            }
        }
        (true, false) => 0,
        (false, true) => 1,
        _ => panic!("no valid header"),
    };
    let h = if active == 0 { h1 } else { h2 };
    let encrypted = match u16::from_le_bytes([h[32], h[33]]) {
        0 => false,
        1 => true,
        other => panic!("algorithm {other}"),
    };

    // File table.
    let ft_block = le32(h, 24) as usize;
    let ft = &file[ft_block * 4096..ft_block * 4096 + 4096];
    let entry = |i: usize| &ft[i * 64..i * 64 + 64];
    assert_eq!(
        le32(entry(0), 0) as usize,
        ft_block,
        "entry 0 is the table itself"
    );
    assert_eq!(le32(entry(0), 4), 1);
    assert_eq!(le64(entry(0), 8), 4096);
    let ext = entry(63);
    assert!(
        le32(ext, 4) >= 1,
        "the extended file table is always allocated"
    );
    assert_eq!(le64(ext, 8), 4096);

    // Extents inside the image and disjoint.
    let mut extents: Vec<(usize, usize)> = (0..64)
        .map(entry)
        .filter(|e| le32(e, 4) != 0)
        .map(|e| (le32(e, 0) as usize, le32(e, 4) as usize))
        .collect();
    extents.sort();
    for (off, len) in &extents {
        assert!(
            *off >= 2 && (off + len) * 4096 <= image,
            "extent {off}+{len}"
        );
    }
    for w in extents.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "overlapping extents {w:?}");
    }

    // Keys: metadata key from a slot, extended table with it.
    let mut metadata_key = None;
    let mut ext_table = vec![0u8; 4096];
    let eo = le32(ext, 0) as usize * 4096;
    ext_table.copy_from_slice(&file[eo..eo + 4096]);
    if encrypted {
        let ds = datastore_key.expect("encrypted file needs the key");
        for slot in 0..2 {
            let s = &h[36 + slot * 64..36 + slot * 64 + 64];
            let mut wrapped = s[32..64].to_vec();
            if gcm_open(ds, &s[0..12], &s[16..32], &mut wrapped) {
                metadata_key = Some(wrapped);
                break;
            }
        }
        let mk = metadata_key.clone().expect("datastore key opens a slot");
        assert_eq!(
            le32(ext, 44) & 3,
            3,
            "extended table entry marked encrypted"
        );
        assert!(gcm_open(&mk, &ext[16..28], &ext[28..44], &mut ext_table));
    }

    let mut files = Vec::new();
    for i in 1..63 {
        let e = entry(i);
        if le32(e, 4) == 0 {
            continue;
        }
        let (off, size) = (le32(e, 0) as usize * 4096, le64(e, 8) as usize);
        assert!(size <= le32(e, 4) as usize * 4096);
        let mut data = file[off..off + size].to_vec();
        let attrs = le32(e, 44);
        if encrypted {
            assert_eq!(attrs & 3, 3, "file {i} marked encrypted in the table");
            let x = &ext_table[i * 64..i * 64 + 64];
            assert_eq!(
                le32(x, 0) & 3,
                3,
                "file {i} marked encrypted in the extended table"
            );
            assert!(
                gcm_open(&x[4..36], &e[16..28], &e[28..44], &mut data),
                "file {i}"
            );
        } else {
            assert_eq!(attrs, 0);
        }
        files.push((i as u32, data));
    }
    Parsed {
        image,
        active_header: active,
        sequence: le32(h, 16),
        encrypted,
        metadata_key,
        ext_nonce: ext[16..28].to_vec(),
        ext_table,
        files,
    }
}

fn key(byte: u8) -> Key {
    Key::from_bytes([byte; 32])
}

fn contents(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn our_plain_files_read_back_with_an_independent_reader() {
    let mut v = Vmgs::create(MemStorage::default(), 4 << 20, None).unwrap();
    v.write_file(FileId::TPM_PPI, b"hello-vmgs-interop\n")
        .unwrap();
    v.write_file(FileId::TPM_NVRAM, &contents(20000, 1))
        .unwrap();
    let file = v.into_storage().bytes;
    assert_eq!(file.len(), (4 << 20) + 512);
    let p = minimal_read(&file, None);
    assert!(!p.encrypted);
    assert_eq!(p.image, 4 << 20);
    assert_eq!(
        p.files,
        vec![
            (2, b"hello-vmgs-interop\n".to_vec()),
            (3, contents(20000, 1))
        ]
    );
    assert_eq!((p.sequence, p.active_header), (3, 0));
}

#[test]
fn our_encrypted_files_read_back_with_an_independent_reader() {
    let k = key(0x42);
    let mut v = Vmgs::create(MemStorage::default(), 1 << 20, Some(&k)).unwrap();
    v.write_file(FileId::TPM_PPI, b"small").unwrap();
    v.write_file(FileId::TPM_NVRAM, &contents(70000, 2))
        .unwrap();
    v.write_file(FileId::TPM_PPI, b"replaced").unwrap();
    v.delete_file(FileId::TPM_PPI).unwrap();
    v.write_file(FileId::ATTEST, b"").unwrap();
    let file = v.into_storage().bytes;
    let p = minimal_read(&file, Some(k.as_bytes()));
    assert!(p.encrypted);
    assert_eq!(p.files, vec![(3, contents(70000, 2)), (5, Vec::new())]);
    // As the reference writer: the extended table's own entry (63) is marked encrypted and
    // authenticated, with no key; entry 0 (the file table) is empty.
    let own = &p.ext_table[63 * 64..64 * 64];
    assert_eq!(le32(own, 0), 3, "attributes of the table's own entry");
    assert!(
        own[4..].iter().all(|b| *b == 0),
        "no key for the table itself"
    );
    assert!(p.ext_table[..64].iter().all(|b| *b == 0));
}

#[test]
fn metadata_key_is_random_and_never_zero() {
    let k = key(7);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let mut v = Vmgs::create(MemStorage::default(), 64 << 10, Some(&k)).unwrap();
        let p = minimal_read(&v.storage_image(), Some(k.as_bytes()));
        seen.push(p.metadata_key.clone().unwrap());
        v.write_file(FileId::TPM_NVRAM, b"x").unwrap();
        let p = minimal_read(&v.storage_image(), Some(k.as_bytes()));
        let mk = p.metadata_key.unwrap();
        assert_ne!(mk, vec![0u8; 32], "metadata key must not be zero");
        assert_ne!(
            p.ext_nonce,
            vec![0u8; 12],
            "extended table nonce must not be zero"
        );
        seen.push(mk);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 6, "every metadata key is fresh");
}

#[test]
fn defective_reference_file_is_rekeyed_on_its_first_change() {
    // The fixture was written by a reference tool with the zero-metadata-key defect.
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let file = std::fs::read(dir.join("encrypted.vmgs")).unwrap();
    let ds = std::fs::read(dir.join("datastore.key")).unwrap();
    assert_eq!(
        minimal_read(&file, Some(&ds)).metadata_key,
        Some(vec![0; 32])
    );
    let k = Key::from_slice(&ds).unwrap();
    let mut v = Vmgs::open(MemStorage::new(file), Some(&k)).unwrap();
    assert!(v.warnings().iter().any(|w| w.contains("all zero")));
    v.write_file(FileId::ATTEST, b"report").unwrap();
    let p = minimal_read(&v.storage_image(), Some(&ds));
    assert_ne!(p.metadata_key, Some(vec![0; 32]));
    assert_eq!(p.files.len(), 3);

    let file = std::fs::read(dir.join("encrypted.vmgs")).unwrap();
    let mut v = Vmgs::open(MemStorage::new(file), Some(&k)).unwrap();
    v.update_key(&key(9)).unwrap();
    let p = minimal_read(&v.storage_image(), Some(key(9).as_bytes()));
    assert_ne!(
        p.metadata_key,
        Some(vec![0; 32]),
        "rotation does not wrap the zero key"
    );
}

/// Key protectors are stored in the clear in an encrypted file (they protect themselves and
/// must be read before the file can be unlocked): one alone or several in one commit. The
/// store reads them without the key; with the key, only as unauthenticated data; the other
/// files stay encrypted.
#[test]
fn key_protectors_are_stored_in_the_clear_and_read_before_unlocking() {
    let k = key(0x37);
    let mut v = Vmgs::create(MemStorage::default(), 256 << 10, Some(&k)).unwrap();
    v.write_file(FileId::TPM_NVRAM, b"sealed-nvram").unwrap();
    v.write_file_unencrypted(FileId::VM_UNIQUE_ID, b"unique-id")
        .unwrap();
    v.write_files_unencrypted(&[
        (FileId::KEY_PROTECTOR, b"protector-2"),
        (FileId::HW_KEY_PROTECTOR, b"hw-protector"),
    ])
    .unwrap();
    let file = v.storage_image();
    assert!(!file.windows(12).any(|w| w == b"sealed-nvram"));

    let mut locked = Vmgs::open(MemStorage::new(file.clone()), None).unwrap();
    for (id, clear) in [
        (FileId::VM_UNIQUE_ID, &b"unique-id"[..]),
        (FileId::KEY_PROTECTOR, b"protector-2"),
        (FileId::HW_KEY_PROTECTOR, b"hw-protector"),
    ] {
        assert_eq!(locked.read_unauthenticated(id).unwrap(), clear);
        let info = locked.file_info(id).unwrap();
        let at = info.offset as usize * 4096;
        assert_eq!(&file[at..at + clear.len()], clear, "{id} as stored");
    }
    let mut unlocked = Vmgs::open(MemStorage::new(file), Some(&k)).unwrap();
    assert!(matches!(
        unlocked.read_file(FileId::KEY_PROTECTOR),
        Err(pv_vmgs::Error::Unauthenticated(FileId::KEY_PROTECTOR))
    ));
    assert_eq!(
        unlocked
            .read_unauthenticated(FileId::KEY_PROTECTOR)
            .unwrap(),
        b"protector-2"
    );
    assert_eq!(
        unlocked.read_file(FileId::TPM_NVRAM).unwrap(),
        b"sealed-nvram"
    );
}

/// The key slots of the active header as stored (nonce, reserved, tag, wrapped key) that
/// hold a key; the file is read whole by the minimal reader with `datastore_key` first.
fn active_key_slots(file: &[u8], datastore_key: &Key) -> Vec<Vec<u8>> {
    let active = minimal_read(file, Some(datastore_key.as_bytes())).active_header;
    let h = &file[active * 512..active * 512 + 168];
    (0..2)
        .map(|slot| h[36 + slot * 64..36 + slot * 64 + 64].to_vec())
        .filter(|s| s.iter().any(|b| *b != 0))
        .collect()
}

/// One datastore key wraps a metadata key at every commit of every file it protects: no two
/// of those wraps may share an AES-GCM nonce (a repeat under one key leaks the XOR of the
/// wrapped keys and the GHASH key). Checked over commits, a rotation to the key, an
/// encryption with it and several files.
#[test]
fn slot_nonces_never_repeat_across_commits_and_files() {
    let k = key(0x33);
    let mut wraps: Vec<Vec<u8>> = Vec::new();
    let mut record =
        |v: &mut Vmgs<MemStorage>| wraps.extend(active_key_slots(&v.storage_image(), &k));
    for file in 0..3u8 {
        let mut v = Vmgs::create(MemStorage::default(), 64 << 10, Some(&k)).unwrap();
        record(&mut v);
        for i in 0..4u8 {
            v.write_file(FileId::TPM_NVRAM, &[file, i]).unwrap();
            record(&mut v);
        }
    }
    let mut v = Vmgs::create(MemStorage::default(), 64 << 10, None).unwrap();
    v.write_file(FileId::TPM_NVRAM, b"plain").unwrap();
    v.encrypt(&k).unwrap();
    record(&mut v);
    v.write_file(FileId::TPM_NVRAM, b"again").unwrap();
    record(&mut v);
    let mut v = Vmgs::create(MemStorage::default(), 64 << 10, Some(&key(0x34))).unwrap();
    v.update_key(&k).unwrap();
    record(&mut v);
    v.write_file(FileId::TPM_NVRAM, b"rotated").unwrap();
    record(&mut v);

    // A header commit that re-wraps nothing shows the same slot again: count wraps once.
    wraps.sort();
    wraps.dedup();
    assert!(wraps.len() >= 3 * 5 + 4, "{} wraps", wraps.len());
    let mut nonces: Vec<&[u8]> = wraps.iter().map(|s| &s[0..12]).collect();
    nonces.sort();
    let total = nonces.len();
    nonces.dedup();
    assert_eq!(nonces.len(), total, "a slot nonce was used twice");
}

/// The first wrap into an empty slot (a new file, or the new slot of a rotation) has no
/// previous nonce to count on from, so all 96 bits of its nonce are random, not only the
/// 32-bit prefix of a re-wrap: files protected by one datastore key must not collide.
#[test]
fn a_fresh_key_slot_nonce_is_random_in_all_96_bits() {
    let k = key(0x35);
    let mut counters = Vec::new();
    for _ in 0..4 {
        let mut v = Vmgs::create(MemStorage::default(), 64 << 10, Some(&k)).unwrap();
        let slots = active_key_slots(&v.storage_image(), &k);
        assert_eq!(slots.len(), 1);
        counters.push(slots[0][4..12].to_vec());
        // The new key's slot after a rotation is a first wrap too.
        v.update_key(&key(0x36)).unwrap();
        let slots = active_key_slots(&v.storage_image(), &key(0x36));
        assert_eq!(slots.len(), 1);
        counters.push(slots[0][4..12].to_vec());
    }
    let total = counters.len();
    counters.sort();
    counters.dedup();
    assert_eq!(
        counters.len(),
        total,
        "the counter half of first nonces repeats: {counters:02x?}"
    );
}

/// What the reference tool's `delete -f FILE -i ID` (no key) does to a file, done here from
/// the format notes alone: a copy of the active file table without `id`, written to a free
/// block, and a header with sequence + 1 (its CRC recomputed) in the inactive slot; the
/// encrypted extended file table, which needs the key, is left as it is.
fn reference_delete(file: &mut [u8], id: usize, datastore_key: &[u8]) {
    // (The key only lets the minimal reader check the whole file first.)
    let active = minimal_read(file, Some(datastore_key)).active_header;
    let h = file[active * 512..active * 512 + 168].to_vec();
    let ft = le32(&h, 24) as usize;
    let mut table = file[ft * 4096..ft * 4096 + 4096].to_vec();
    table[id * 64..id * 64 + 64].fill(0);
    // The lowest block no live extent (the old table included) uses.
    let used: Vec<(usize, usize)> = (0..64)
        .map(|i| &table[i * 64..i * 64 + 64])
        .filter(|e| le32(e, 4) != 0)
        .map(|e| (le32(e, 0) as usize, le32(e, 4) as usize))
        .chain([(ft, 1)])
        .collect();
    let free = (2..)
        .find(|b| used.iter().all(|(o, n)| !(o..&(o + n)).contains(&b)))
        .unwrap();
    table[0..4].copy_from_slice(&(free as u32).to_le_bytes());
    file[free * 4096..free * 4096 + 4096].copy_from_slice(&table);
    let mut header = h.clone();
    header[16..20].copy_from_slice(&le32(&h, 16).wrapping_add(1).to_le_bytes());
    header[24..28].copy_from_slice(&(free as u32).to_le_bytes());
    header[12..16].fill(0);
    let crc = crc32(&header);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    let inactive = 1 - active;
    file[inactive * 512..inactive * 512 + 168].copy_from_slice(&header);
}

/// The reference tool deletes from an encrypted file without its key and leaves the id's
/// key in the extended table; it reads such a file, and so must we: the id is not
/// allocated, the others read, and our next keyed change writes a clean extended table.
/// Our own keyless delete leaves the same state.
#[test]
fn the_state_the_reference_delete_leaves_is_read_and_cleaned_by_the_next_write() {
    let k = key(0x42);
    let mut v = Vmgs::create(MemStorage::default(), 1 << 20, Some(&k)).unwrap();
    v.write_file(FileId::TPM_PPI, b"small").unwrap();
    v.write_file(FileId::TPM_NVRAM, &contents(9000, 3)).unwrap();
    let before = v.storage_image();
    let nvram_key = minimal_read(&before, Some(k.as_bytes())).ext_table[3 * 64..4 * 64].to_vec();
    assert_ne!(nvram_key, vec![0u8; 64]);

    let mut deleted = before.clone();
    reference_delete(&mut deleted, FileId::TPM_NVRAM.index(), k.as_bytes());
    let p = minimal_read(&deleted, Some(k.as_bytes()));
    assert_eq!(p.files, vec![(2, b"small".to_vec())]);
    assert_eq!(
        p.ext_table[3 * 64..4 * 64],
        nvram_key[..],
        "the leftover key the reference leaves"
    );

    let mut v = Vmgs::open(MemStorage::new(deleted.clone()), Some(&k)).unwrap();
    assert!(matches!(
        v.file_info(FileId::TPM_NVRAM),
        Err(pv_vmgs::Error::NotFound(FileId::TPM_NVRAM))
    ));
    assert_eq!(v.read_file(FileId::TPM_PPI).unwrap(), b"small");
    v.write_file(FileId::ATTEST, b"report").unwrap();
    let p = minimal_read(&v.storage_image(), Some(k.as_bytes()));
    assert_eq!(
        p.files,
        vec![(2, b"small".to_vec()), (5, b"report".to_vec())]
    );
    assert_eq!(
        p.ext_table[3 * 64..4 * 64],
        [0u8; 64],
        "the next write drops the leftover key"
    );

    // Our keyless delete: the same tables as the reference's.
    let mut locked = Vmgs::open(MemStorage::new(before), None).unwrap();
    locked.delete_file(FileId::TPM_NVRAM).unwrap();
    let ours = minimal_read(&locked.storage_image(), Some(k.as_bytes()));
    let theirs = minimal_read(&deleted, Some(k.as_bytes()));
    assert_eq!(ours.files, theirs.files);
    assert_eq!(ours.ext_table, theirs.ext_table);
    assert_eq!(ours.sequence, theirs.sequence);
}

/// Test helper: the bytes of an in-memory store.
trait Image {
    fn storage_image(&mut self) -> Vec<u8>;
}

impl Image for Vmgs<MemStorage> {
    fn storage_image(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let len = pv_vmgs::Storage::size(self.storage_mut()).unwrap() as usize;
        out.resize(len, 0);
        pv_vmgs::Storage::read_at(self.storage_mut(), 0, &mut out).unwrap();
        out
    }
}
