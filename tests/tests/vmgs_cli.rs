//! `paravisor vmgs`: the reference tool's commands, options and exit codes, end to end on
//! real files (ours and the reference tool's fixtures).

mod common;

use std::path::Path;
use std::path::PathBuf;

use common::pv;
use common::scratch_dir;
use common::text;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/vmgs/tests/fixtures")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn vmgs(args: &[&str]) -> std::process::Output {
    let mut all = vec!["vmgs"];
    all.extend_from_slice(args);
    pv(&all)
}

fn code(o: &std::process::Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

#[test]
fn create_write_dump_round_trip_encrypted() {
    let dir = scratch_dir("vmgs-cli");
    let (file, key, data, out) = (
        dir.join("x.vmgs"),
        dir.join("key"),
        dir.join("data.bin"),
        dir.join("out.bin"),
    );
    std::fs::write(&key, [0x42u8; 32]).unwrap();
    let contents: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&data, &contents).unwrap();

    let o = vmgs(&["create", "-f", s(&file), "-k", s(&key), "-e", "AES_GCM"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), (4 << 20) + 512);
    let o = vmgs(&[
        "write",
        "-f",
        s(&file),
        "-d",
        s(&data),
        "-i",
        "TPM_NVRAM",
        "-k",
        s(&key),
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = vmgs(&[
        "dump",
        "-f",
        s(&file),
        "-i",
        "3",
        "-k",
        s(&key),
        "-d",
        s(&out),
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(std::fs::read(&out).unwrap(), contents);
    let o = vmgs(&[
        "dump",
        "-f",
        s(&file),
        "-i",
        "TPM_NVRAM",
        "-k",
        s(&key),
        "--raw-stdout",
    ]);
    assert_eq!(o.stdout, contents);
    let o = vmgs(&["query-size", "-f", s(&file), "-i", "TPM_NVRAM"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "50000\n");
    // Encrypted, with neither KEY_PROTECTOR nor VM_UNIQUE_ID: the reference's code 7.
    let o = vmgs(&["query-encryption", "-f", s(&file)]);
    assert_eq!(code(&o), 7, "{}", text(&o));
    assert!(
        text(&o).contains("is encrypted with AES GCM"),
        "{}",
        text(&o)
    );

    // Writing an existing id needs --allow-overwrite.
    let o = vmgs(&[
        "write",
        "-f",
        s(&file),
        "-d",
        s(&key),
        "-i",
        "TPM_NVRAM",
        "-k",
        s(&key),
    ]);
    assert_eq!(code(&o), 1);
    assert!(text(&o).contains("--allow-overwrite"), "{}", text(&o));

    // A wrong key is named as such; without a key no plaintext comes out.
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, [0x43u8; 32]).unwrap();
    let o = vmgs(&["dump", "-f", s(&file), "-i", "3", "-k", s(&wrong)]);
    assert_eq!(code(&o), 1);
    assert!(text(&o).contains("wrong key"), "{}", text(&o));
    let o = vmgs(&["dump", "-f", s(&file), "-i", "3", "--raw-stdout"]);
    assert_eq!(code(&o), 1, "{}", text(&o));
    assert!(o.stdout.is_empty(), "ciphertext dumped as contents");
    assert!(text(&o).contains("-k"), "{}", text(&o));

    // Key rotation: the new key opens it, the old one no longer does.
    let o = vmgs(&[
        "update-key",
        "-f",
        s(&file),
        "-k",
        s(&key),
        "-n",
        s(&wrong),
        "-e",
        "AES_GCM",
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = vmgs(&["dump", "-f", s(&file), "-i", "3", "-k", s(&key)]);
    assert!(text(&o).contains("wrong key"), "{}", text(&o));
    let o = vmgs(&[
        "dump",
        "-f",
        s(&file),
        "-i",
        "3",
        "-k",
        s(&wrong),
        "--raw-stdout",
    ]);
    assert_eq!(o.stdout, contents);

    // Move and delete.
    let o = vmgs(&[
        "move",
        "-f",
        s(&file),
        "--src",
        "3",
        "--dst",
        "TPM_NVRAM_BACKUP",
        "-k",
        s(&wrong),
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = vmgs(&["query-size", "-f", s(&file), "-i", "TPM_NVRAM"]);
    assert_eq!(code(&o), 4, "{}", text(&o));
    let o = vmgs(&[
        "delete",
        "-f",
        s(&file),
        "-i",
        "TPM_NVRAM_BACKUP",
        "-k",
        s(&wrong),
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = vmgs(&["dump-file-table", "-f", s(&file)]);
    assert!(!text(&o).contains("TPM_NVRAM_BACKUP"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn reference_fixtures_dump_their_documented_contents() {
    let f = fixtures();
    let dir = scratch_dir("vmgs-fix");
    let out = dir.join("out");
    for (file, key) in [
        ("plain.vmgs", None),
        ("encrypted.vmgs", Some("datastore.key")),
    ] {
        for (id, expected) in [("TPM_PPI", "small.bin"), ("TPM_NVRAM", "nvram.bin")] {
            let path = f.join(file);
            let mut args = vec!["dump", "-f", s(&path), "-i", id, "-d", s(&out)];
            let k = key.map(|k| f.join(k));
            if let Some(k) = &k {
                args.extend(["-k", s(k)]);
            }
            let o = vmgs(&args);
            assert_eq!(code(&o), 0, "{file} {id}: {}", text(&o));
            assert_eq!(
                std::fs::read(&out).unwrap(),
                std::fs::read(f.join(expected)).unwrap()
            );
        }
    }
    let o = vmgs(&["dump-headers", "-f", s(&f.join("encrypted.vmgs"))]);
    assert_eq!(code(&o), 0);
    assert!(text(&o).contains("Active header is 2"), "{}", text(&o));
    let o = vmgs(&["dump-file-table", "-f", s(&f.join("plain.vmgs"))]);
    assert!(
        text(&o).contains("TPM_NVRAM") && text(&o).contains("20000"),
        "{}",
        text(&o)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn exit_codes_follow_the_reference_tool() {
    let f = fixtures();
    let dir = scratch_dir("vmgs-codes");
    // 2: not encrypted (query-encryption, or a key for a plain file).
    let o = vmgs(&["query-encryption", "-f", s(&f.join("plain.vmgs"))]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    let o = vmgs(&[
        "dump",
        "-f",
        s(&f.join("plain.vmgs")),
        "-i",
        "3",
        "-k",
        s(&f.join("datastore.key")),
    ]);
    assert_eq!(code(&o), 2, "{}", text(&o));
    // 3: empty file.
    let empty = dir.join("empty.vmgs");
    std::fs::write(&empty, b"").unwrap();
    let o = vmgs(&["dump-headers", "-f", s(&empty)]);
    assert_eq!(code(&o), 3, "{}", text(&o));
    // 4: file id not allocated.
    let o = vmgs(&["query-size", "-f", s(&f.join("plain.vmgs")), "-i", "ATTEST"]);
    assert_eq!(code(&o), 4, "{}", text(&o));
    // 5: version 1.
    let mut v1 = std::fs::read(f.join("plain.vmgs")).unwrap();
    v1[512..520].copy_from_slice(b"EFI PART");
    let v1_path = dir.join("v1.vmgs");
    std::fs::write(&v1_path, v1).unwrap();
    let o = vmgs(&["dump-file-table", "-f", s(&v1_path)]);
    assert_eq!(code(&o), 5, "{}", text(&o));
    // 1: anything else, with the file named.
    let o = vmgs(&["dump-file-table", "-f", s(&dir.join("missing.vmgs"))]);
    assert_eq!(code(&o), 1);
    assert!(text(&o).contains("missing.vmgs"), "{}", text(&o));
    let o = vmgs(&["create", "-f", s(&f.join("plain.vmgs"))]);
    assert_eq!(code(&o), 1, "refuses to replace without --force-create");
    let _ = std::fs::remove_dir_all(dir);
}

/// A usage error under `vmgs` is 64, never 2: a script written for the reference tool reads
/// 2 as "not encrypted".
#[test]
fn vmgs_usage_errors_exit_64_not_the_references_not_encrypted() {
    let plain = fixtures().join("plain.vmgs");
    for args in [
        vec!["dump", "-f", s(&plain), "-i", "NOPE"],
        vec!["dump", "-f", s(&plain)],
        vec!["query-size", "-i", "3"],
        vec!["frobnicate"],
        vec!["query-encryption", "-f", s(&plain), "--bogus"],
        vec!["reseal", "--vcpus", "2"],
    ] {
        let o = vmgs(&args);
        assert_eq!(code(&o), 64, "{args:?}: {}", text(&o));
    }
    let o = vmgs(&["dump", "-f", s(&plain), "-i", "NOPE"]);
    assert!(text(&o).contains("not a file id"), "{}", text(&o));
    // Help is not an error; other commands keep clap's 2.
    assert_eq!(code(&vmgs(&["--help"])), 0);
    assert_eq!(code(&pv(&["frobnicate"])), 2);
}

/// `query-encryption` decides as the reference does, by which key protector is allocated:
/// 0 with KEY_PROTECTOR, 6 with only VM_UNIQUE_ID, 7 with neither, 2 for a plain file.
#[test]
fn query_encryption_gives_the_references_codes_6_and_7() {
    let f = fixtures();
    let dir = scratch_dir("vmgs-qe");
    let o = vmgs(&["query-encryption", "-f", s(&f.join("encrypted.vmgs"))]);
    assert_eq!(code(&o), 7, "{}", text(&o));
    assert!(
        text(&o).contains("unknown encryption scheme"),
        "{}",
        text(&o)
    );
    let o = vmgs(&["query-encryption", "-f", s(&f.join("plain.vmgs"))]);
    assert_eq!(code(&o), 2, "{}", text(&o));

    let (file, key, data) = (dir.join("x.vmgs"), dir.join("key"), dir.join("d"));
    std::fs::write(&key, [7u8; 32]).unwrap();
    std::fs::write(&data, b"id").unwrap();
    let o = vmgs(&["create", "-f", s(&file), "-k", s(&key), "-e", "AES_GCM"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let write = |id: &str| {
        let o = vmgs(&[
            "write",
            "-f",
            s(&file),
            "-d",
            s(&data),
            "-i",
            id,
            "-k",
            s(&key),
        ]);
        assert_eq!(code(&o), 0, "{}", text(&o));
    };
    write("VM_UNIQUE_ID");
    let o = vmgs(&["query-encryption", "-f", s(&file)]);
    assert_eq!(code(&o), 6, "{}", text(&o));
    assert!(text(&o).contains("GspById"), "{}", text(&o));
    write("KEY_PROTECTOR");
    let o = vmgs(&["query-encryption", "-f", s(&file)]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert!(text(&o).contains("GspKey"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(dir);
}

/// Bitwise CRC-32 (IEEE), for the VMGS header checksum.
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

/// Leaves `file` as the reference tool's keyless `delete -i ID` leaves an encrypted file
/// (VMGS-FORMAT.md): the active file table without the id, copied into a free block; a
/// header with sequence + 1 pointing at it, its CRC recomputed, in the other slot; the
/// encrypted extended file table untouched, so it still holds the id's key.
fn delete_as_the_reference_does(file: &Path, id: usize) {
    let mut v = std::fs::read(file).unwrap();
    let valid = |h: &[u8]| {
        let mut z = h[..168].to_vec();
        z[12..16].fill(0);
        &h[0..8] == b"GUESTRTS" && le32(h, 12) == crc32(&z)
    };
    let (h1, h2) = (v[0..168].to_vec(), v[512..680].to_vec());
    let active = match (valid(&h1), valid(&h2)) {
        (true, true) if le32(&h2, 16) == le32(&h1, 16).wrapping_add(1) => 1,
        (true, _) => 0,
        _ => 1,
    };
    let h = if active == 0 { h1 } else { h2 };
    let ft = le32(&h, 24) as usize;
    let mut table = v[ft * 4096..ft * 4096 + 4096].to_vec();
    assert_ne!(le32(&table, id * 64 + 4), 0, "id {id} is allocated");
    table[id * 64..id * 64 + 64].fill(0);
    let used: Vec<(usize, usize)> = (0..64)
        .map(|i| {
            (
                le32(&table, i * 64) as usize,
                le32(&table, i * 64 + 4) as usize,
            )
        })
        .filter(|(_, n)| *n != 0)
        .chain([(ft, 1)])
        .collect();
    let free = (2..)
        .find(|b| used.iter().all(|(o, n)| !(*o..o + n).contains(b)))
        .unwrap();
    table[0..4].copy_from_slice(&(free as u32).to_le_bytes());
    v[free * 4096..free * 4096 + 4096].copy_from_slice(&table);
    let mut header = h.clone();
    header[16..20].copy_from_slice(&le32(&h, 16).wrapping_add(1).to_le_bytes());
    header[24..28].copy_from_slice(&(free as u32).to_le_bytes());
    header[12..16].fill(0);
    let crc = crc32(&header);
    header[12..16].copy_from_slice(&crc.to_le_bytes());
    let slot = (1 - active) * 512;
    v[slot..slot + 168].copy_from_slice(&header);
    std::fs::write(file, v).unwrap();
}

/// After the reference tool deletes an id from an encrypted file, its extended file table
/// keeps the id's key. We read that file as the reference does: the id is not allocated
/// (exit 4), every other id reads with the key. And our own `delete` takes no key either.
#[test]
fn an_encrypted_file_after_the_references_keyless_delete_opens_with_the_id_gone() {
    let dir = scratch_dir("vmgs-stale");
    let (file, key, a, b) = (
        dir.join("x.vmgs"),
        dir.join("key"),
        dir.join("a"),
        dir.join("b"),
    );
    std::fs::write(&key, [0x33u8; 32]).unwrap();
    std::fs::write(&a, b"nvram contents").unwrap();
    std::fs::write(&b, b"attestation").unwrap();
    let o = vmgs(&["create", "-f", s(&file), "-k", s(&key), "-e", "AES_GCM"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    for (id, data) in [("TPM_NVRAM", &a), ("ATTEST", &b)] {
        let o = vmgs(&[
            "write",
            "-f",
            s(&file),
            "-d",
            s(data),
            "-i",
            id,
            "-k",
            s(&key),
        ]);
        assert_eq!(code(&o), 0, "{}", text(&o));
    }
    delete_as_the_reference_does(&file, 3);
    let o = vmgs(&["query-size", "-f", s(&file), "-i", "TPM_NVRAM"]);
    assert_eq!(code(&o), 4, "{}", text(&o));
    let o = vmgs(&["dump", "-f", s(&file), "-i", "3", "-k", s(&key)]);
    assert_eq!(code(&o), 4, "{}", text(&o));
    let o = vmgs(&[
        "dump",
        "-f",
        s(&file),
        "-i",
        "ATTEST",
        "-k",
        s(&key),
        "--raw-stdout",
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(o.stdout, b"attestation");
    assert!(
        text(&o).contains("TPM_NVRAM"),
        "the leftover key is named: {}",
        text(&o)
    );
    let o = vmgs(&["dump-file-table", "-f", s(&file), "-k", s(&key)]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(!table.contains("TPM_NVRAM"), "{table}");
    assert!(table.contains("ATTEST"), "{table}");

    // Our delete without -k, as the reference's: the id goes, the others stay readable.
    let o = vmgs(&["delete", "-f", s(&file), "-i", "ATTEST"]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = vmgs(&["query-size", "-f", s(&file), "-i", "ATTEST"]);
    assert_eq!(code(&o), 4, "{}", text(&o));
    // A keyed change afterwards leaves no leftover keys to warn about.
    let o = vmgs(&[
        "write",
        "-f",
        s(&file),
        "-d",
        s(&a),
        "-i",
        "TPM_NVRAM",
        "-k",
        s(&key),
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = vmgs(&[
        "dump",
        "-f",
        s(&file),
        "-i",
        "TPM_NVRAM",
        "-k",
        s(&key),
        "--raw-stdout",
    ]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(o.stdout, b"nvram contents");
    assert!(!text(&o).contains("warning"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(dir);
}
