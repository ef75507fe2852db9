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
    let o = vmgs(&["query-encryption", "-f", s(&file)]);
    assert_eq!(code(&o), 0);
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
    assert_ne!(o.stdout, contents);

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
    let o = vmgs(&["dump", "-f", s(&f.join("plain.vmgs")), "-i", "NOPE"]);
    assert_ne!(code(&o), 0);
    assert!(text(&o).contains("not a file id"), "{}", text(&o));
    let _ = std::fs::remove_dir_all(dir);
}
