//! Crash consistency: every update is stopped after each of its writes and flushes in turn;
//! every image a crash can leave then opens to exactly the old state or exactly the new one.

use std::collections::BTreeMap;

use pv_vmgs::error::Error;
use pv_vmgs::fault::Fault;
use pv_vmgs::fault::FaultyStorage;
use pv_vmgs::FileId;
use pv_vmgs::Key;
use pv_vmgs::MemStorage;
use pv_vmgs::Vmgs;

type State = BTreeMap<FileId, Vec<u8>>;

fn key(byte: u8) -> Key {
    Key::from_bytes([byte; 32])
}

fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i as u8) ^ seed).collect()
}

/// Opens an image with the first key that works and reads every user file.
fn state_of(image: Vec<u8>, keys: &[Option<Key>]) -> Result<State, String> {
    let mut last = String::new();
    for k in keys {
        match Vmgs::open(MemStorage::new(image.clone()), k.as_ref()) {
            Ok(mut v) => {
                let mut state = State::new();
                for f in v.files() {
                    if f.id.is_user_file() {
                        let data = v.read_file(f.id).map_err(|e| e.to_string())?;
                        state.insert(f.id, data);
                    }
                }
                return Ok(state);
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

fn base(key: Option<&Key>) -> Vec<u8> {
    let mut v = Vmgs::create(MemStorage::default(), 256 << 10, key).unwrap();
    v.write_file(FileId::TPM_NVRAM, &bytes(9000, 1)).unwrap();
    v.write_file(FileId::TPM_PPI, b"ppi").unwrap();
    v.into_storage().bytes
}

/// Runs `update` on `image`, stopping the device at each operation in turn, and checks every
/// crash image. Returns the number of operations the update performs.
fn check_every_stop(
    image: &[u8],
    open_key: Option<Key>,
    keys: &[Option<Key>],
    update: impl Fn(&mut Vmgs<FaultyStorage>) -> Result<(), Error>,
) -> usize {
    let old = state_of(image.to_vec(), keys).expect("old state opens");
    // A clean run: how many operations, and the new state.
    let mut v = Vmgs::open(FaultyStorage::new(image.to_vec()), open_key.as_ref()).unwrap();
    v.storage_mut().fail_at(usize::MAX, Fault::Stop);
    update(&mut v).expect("update succeeds on a healthy device");
    let ops = v.storage_mut().ops;
    let new = state_of(v.into_storage().image().to_vec(), keys).expect("new state opens");
    assert_ne!(old, new, "the update changes something");
    assert!(ops >= 2, "at least a data write and a header");

    for n in 0..ops {
        for fault in [Fault::Stop, Fault::Fail, Fault::FailAfter] {
            let mut v = Vmgs::open(FaultyStorage::new(image.to_vec()), open_key.as_ref()).unwrap();
            v.storage_mut().fail_at(n, fault);
            let result = update(&mut v);
            assert!(result.is_err(), "operation {n} failed, so must the update");
            let poisoned = v.is_poisoned();
            let dev = v.into_storage();
            for (i, crash) in dev.crash_images().into_iter().enumerate() {
                let got = state_of(crash, keys).unwrap_or_else(|e| {
                    panic!("{fault:?} at op {n}, crash image {i}: unreadable: {e}")
                });
                assert!(
                    got == old || got == new,
                    "{fault:?} at op {n}, crash image {i}: a mix of old and new"
                );
            }
            if fault == Fault::Fail && !poisoned {
                // The handle stayed usable: it still holds the old state.
                let now = state_of(dev.image().to_vec(), keys).unwrap();
                assert_eq!(
                    now, old,
                    "failed op {n}: unpoisoned handle but state changed"
                );
            }
        }
    }
    ops
}

#[test]
fn writing_a_new_file_is_all_or_nothing_at_every_stop() {
    let k = key(1);
    let keys = [Some(k.clone())];
    let ops = check_every_stop(&base(Some(&k)), Some(k.clone()), &keys, |v| {
        v.write_file(FileId::ATTEST, &bytes(5000, 3))
    });
    // File table, data, extended table, flush, header, flush.
    assert_eq!(ops, 6);
    check_every_stop(&base(None), None, &[None], |v| {
        v.write_file(FileId::ATTEST, b"a")
    });
}

#[test]
fn overwriting_a_file_is_all_or_nothing_at_every_stop() {
    let k = key(2);
    check_every_stop(&base(Some(&k)), Some(k.clone()), &[Some(k.clone())], |v| {
        v.write_file(FileId::TPM_NVRAM, &bytes(12000, 9))
    });
    check_every_stop(&base(None), None, &[None], |v| {
        v.write_file(FileId::TPM_NVRAM, &bytes(12000, 9))
    });
}

#[test]
fn delete_and_move_are_all_or_nothing_at_every_stop() {
    let k = key(3);
    check_every_stop(&base(Some(&k)), Some(k.clone()), &[Some(k.clone())], |v| {
        v.delete_file(FileId::TPM_PPI)
    });
    check_every_stop(&base(Some(&k)), Some(k.clone()), &[Some(k.clone())], |v| {
        v.move_file(FileId::TPM_NVRAM, FileId::TPM_NVRAM_BACKUP, false)
    });
}

#[test]
fn encrypting_a_plain_file_is_all_or_nothing_at_every_stop() {
    let k = key(4);
    let image = base(None);
    let old = state_of(image.clone(), &[None]).unwrap();
    // Old state opens without a key, new state with it; contents are the same, so mark the
    // difference by what opens: compare through a wrapper that reports encryption.
    let mut v = Vmgs::open(FaultyStorage::new(image.clone()), None).unwrap();
    v.storage_mut().fail_at(usize::MAX, Fault::Stop);
    v.encrypt(&k).unwrap();
    let ops = v.storage_mut().ops;
    for n in 0..ops {
        let mut v = Vmgs::open(FaultyStorage::new(image.clone()), None).unwrap();
        v.storage_mut().fail_at(n, Fault::Stop);
        // A stop while wiping the old plaintext leaves the file encrypted: reported as a
        // warning, not an error.
        if v.encrypt(&k).is_ok() {
            assert!(
                v.warnings().iter().any(|w| w.contains("wiping")),
                "stop at {n}"
            );
        }
        for crash in v.into_storage().crash_images() {
            let plain = state_of(crash.clone(), &[None]);
            let encrypted = state_of(crash, &[Some(k.clone())]);
            match (plain, encrypted) {
                (Ok(s), Err(_)) | (Err(_), Ok(s)) => assert_eq!(s, old, "stop at {n}"),
                other => panic!("stop at {n}: opens as {other:?}"),
            }
        }
    }
}

/// An `encrypt` that fails before its header lands leaves the handle as it was: plain, not
/// unlocked, usable, and able to try again.
#[test]
fn a_failed_encrypt_leaves_the_handle_plain_and_usable() {
    let k = key(16);
    let image = base(None);
    let mut v = Vmgs::open(FaultyStorage::new(image.clone()), None).unwrap();
    // The first data write fails; nothing of the new state is referenced.
    v.storage_mut().fail_at(0, Fault::Fail);
    assert!(v.encrypt(&k).is_err());
    assert!(!v.is_poisoned());
    assert!(!v.is_encrypted());
    assert!(!v.is_unlocked(), "a plain file handle holds no key");
    assert_eq!(
        state_of(v.storage_mut().image().to_vec(), &[None]).unwrap(),
        state_of(image.clone(), &[None]).unwrap()
    );
    v.storage_mut().fail_at(usize::MAX, Fault::Stop);
    v.encrypt(&k).unwrap();
    assert!(v.is_unlocked());
    let image_after = v.into_storage().image().to_vec();
    assert_eq!(
        state_of(image_after, &[Some(k.clone())]).unwrap(),
        state_of(image, &[None]).unwrap()
    );
}

/// `create` on storage that still holds an old file (a caller that did not truncate it)
/// clears both old headers first: the new file opens as new, without a warning, and no
/// fallback can lead back to the old state.
#[test]
fn a_file_created_over_an_old_one_never_falls_back_to_it() {
    let mut old = Vmgs::open(MemStorage::new(base(None)), None).unwrap();
    old.write_file(FileId::ATTEST, b"old").unwrap();
    let old = old.into_storage();
    assert!(
        old.bytes[512..520] == *b"GUESTRTS",
        "the old file has a header in slot 2"
    );
    let v = Vmgs::create(old, 256 << 10, None).unwrap();
    let image = v.into_storage().bytes;
    assert!(
        image[512..1024].iter().all(|b| *b == 0),
        "old slot 2 cleared"
    );
    let v = Vmgs::open(MemStorage::new(image.clone()), None).unwrap();
    assert!(v.warnings().is_empty(), "{:?}", v.warnings());
    assert_eq!(state_of(image, &[None]).unwrap(), State::new());
}

#[test]
fn key_rotation_never_loses_the_file_at_any_stop() {
    let (old_key, new_key) = (key(5), key(6));
    let image = base(Some(&old_key));
    let expected = state_of(image.clone(), &[Some(old_key.clone())]).unwrap();
    let mut v = Vmgs::open(FaultyStorage::new(image.clone()), Some(&old_key)).unwrap();
    v.storage_mut().fail_at(usize::MAX, Fault::Stop);
    v.update_key(&new_key).unwrap();
    let ops = v.storage_mut().ops;
    let done = v.into_storage().image().to_vec();
    assert!(
        state_of(done.clone(), &[Some(old_key.clone())]).is_err(),
        "old key is refused after rotation"
    );
    assert_eq!(state_of(done, &[Some(new_key.clone())]).unwrap(), expected);
    for n in 0..ops {
        let mut v = Vmgs::open(FaultyStorage::new(image.clone()), Some(&old_key)).unwrap();
        v.storage_mut().fail_at(n, Fault::Stop);
        assert!(v.update_key(&new_key).is_err());
        for crash in v.into_storage().crash_images() {
            let got = state_of(crash, &[Some(old_key.clone()), Some(new_key.clone())])
                .unwrap_or_else(|e| panic!("stop at {n}: {e}"));
            assert_eq!(got, expected, "stop at {n}");
        }
    }
}

/// A rotation from the second key slot (the state the first rotation leaves) goes back to
/// the first slot, never loses the file at any stop, and leaves only the newest key working.
#[test]
fn a_second_rotation_from_the_second_slot_never_loses_the_file_at_any_stop() {
    let (first, second, third) = (key(10), key(11), key(12));
    let mut v = Vmgs::open(MemStorage::new(base(Some(&first))), Some(&first)).unwrap();
    v.update_key(&second).unwrap();
    let image = v.into_storage().bytes;
    let expected = state_of(image.clone(), &[Some(second.clone())]).unwrap();

    let mut v = Vmgs::open(FaultyStorage::new(image.clone()), Some(&second)).unwrap();
    v.storage_mut().fail_at(usize::MAX, Fault::Stop);
    v.update_key(&third).unwrap();
    let ops = v.storage_mut().ops;
    let done = v.into_storage().image().to_vec();
    for old in [&first, &second] {
        assert!(
            state_of(done.clone(), &[Some(old.clone())]).is_err(),
            "an old key still opens the file"
        );
    }
    assert_eq!(state_of(done, &[Some(third.clone())]).unwrap(), expected);
    for n in 0..ops {
        let mut v = Vmgs::open(FaultyStorage::new(image.clone()), Some(&second)).unwrap();
        v.storage_mut().fail_at(n, Fault::Stop);
        assert!(v.update_key(&third).is_err());
        for crash in v.into_storage().crash_images() {
            let got = state_of(crash, &[Some(second.clone()), Some(third.clone())])
                .unwrap_or_else(|e| panic!("stop at {n}: {e}"));
            assert_eq!(got, expected, "stop at {n}");
        }
    }
}

/// A commit whose header write failed leaves the on-disk state unknown: the handle then
/// refuses every read and change (and touches the device no more) until the file is reopened.
#[test]
fn a_poisoned_handle_refuses_reads_and_changes_until_reopened() {
    let k = key(13);
    let image = base(Some(&k));
    let old = state_of(image.clone(), &[Some(k.clone())]).unwrap();
    let mut v = Vmgs::open(FaultyStorage::new(image), Some(&k)).unwrap();
    // Operations of a write: table, data, extended table, flush, header, flush.
    v.storage_mut().fail_at(4, Fault::Fail);
    assert!(v.write_file(FileId::ATTEST, b"lost").is_err());
    assert!(v.is_poisoned());
    let ops = v.storage_mut().ops;
    let after_failure = v.storage_mut().image().to_vec();

    let poisoned = |r: Result<(), Error>, what: &str| {
        assert!(matches!(r, Err(Error::Poisoned)), "{what}: {r:?}");
    };
    let nvram = FileId::TPM_NVRAM;
    poisoned(v.read_file(nvram).map(drop), "read_file");
    poisoned(v.read_raw(nvram).map(drop), "read_raw");
    poisoned(
        v.read_unauthenticated(nvram).map(drop),
        "read_unauthenticated",
    );
    poisoned(v.write_file(nvram, b"x"), "write_file");
    poisoned(
        v.write_file_unencrypted(FileId::KEY_PROTECTOR, b"x"),
        "write_file_unencrypted",
    );
    poisoned(v.delete_file(FileId::TPM_PPI), "delete_file");
    poisoned(
        v.move_file(nvram, FileId::TPM_NVRAM_BACKUP, false),
        "move_file",
    );
    poisoned(v.encrypt(&key(14)), "encrypt");
    poisoned(v.add_key(&key(14)), "add_key");
    poisoned(v.drop_other_key(), "drop_other_key");
    poisoned(v.update_key(&key(14)), "update_key");
    assert_eq!(
        v.storage_mut().ops,
        ops,
        "the poisoned handle wrote or flushed"
    );
    let dev = v.into_storage();
    assert_eq!(dev.image(), &after_failure[..]);

    // Reopened, the file is the old state and takes changes again.
    let mut v = Vmgs::open(dev, Some(&k)).unwrap();
    assert_eq!(
        state_of(v.storage_mut().image().to_vec(), &[Some(k.clone())]),
        Ok(old)
    );
    v.write_file(FileId::ATTEST, b"kept").unwrap();
    assert_eq!(v.read_file(FileId::ATTEST).unwrap(), b"kept");
}

/// After a commit whose final flush failed, the new header may be only in the page cache.
/// The recovery (reopen, then `persist_active_header`) writes that header again into its own
/// slot and flushes: from then on every crash leaves the state the reopened handle reads, and
/// later commits build on it. Checked with the recovered header in either slot.
#[test]
fn the_header_a_recovery_reads_back_is_made_durable_in_its_own_slot() {
    let k = key(15);
    let mut one_more = Vmgs::open(MemStorage::new(base(Some(&k))), Some(&k)).unwrap();
    one_more.write_file(FileId::ATTEST, b"parity").unwrap();
    for image in [base(Some(&k)), one_more.into_storage().bytes] {
        let mut v = Vmgs::open(FaultyStorage::new(image), Some(&k)).unwrap();
        // Operations of a write: table, data, extended table, flush, header, flush. The
        // final flush fails and does nothing: the header is written but not durable.
        v.storage_mut().fail_at(5, Fault::Fail);
        assert!(v.write_file(FileId::TPM_NVRAM, b"new").is_err());
        assert!(v.is_poisoned());

        let mut v = Vmgs::open(v.into_storage(), Some(&k)).unwrap();
        let slot = v.active_slot();
        assert_eq!(v.read_file(FileId::TPM_NVRAM).unwrap(), b"new");
        let recovered = state_of(v.storage_mut().image().to_vec(), &[Some(k.clone())]).unwrap();
        v.persist_active_header().unwrap();
        for (i, crash) in v.storage_mut().crash_images().into_iter().enumerate() {
            assert_eq!(
                state_of(crash, &[Some(k.clone())]),
                Ok(recovered.clone()),
                "slot {slot}, crash image {i}"
            );
        }

        v.write_file(FileId::TPM_NVRAM, b"newer").unwrap();
        let mut v =
            Vmgs::open(MemStorage::new(v.into_storage().image().to_vec()), Some(&k)).unwrap();
        assert_eq!(v.read_file(FileId::TPM_NVRAM).unwrap(), b"newer");
        assert_eq!(v.active_slot(), 1 - slot);
    }
}

#[test]
fn torn_active_header_falls_back_to_the_previous_state() {
    let k = key(8);
    let mut v = Vmgs::create(MemStorage::default(), 256 << 10, Some(&k)).unwrap();
    v.write_file(FileId::TPM_NVRAM, b"first").unwrap();
    v.write_file(FileId::TPM_NVRAM, b"second").unwrap();
    let active = v.active_slot();
    let mut image = v.into_storage().bytes;
    // Half of the active header never reached the disk.
    let at = active * 512;
    image[at + 84..at + 168].fill(0);
    let mut v = Vmgs::open(MemStorage::new(image), Some(&k)).unwrap();
    assert_eq!(v.read_file(FileId::TPM_NVRAM).unwrap(), b"first");
    assert!(
        v.warnings().iter().any(|w| w.contains("invalid")),
        "{:?}",
        v.warnings()
    );
    // And the next commit goes on from there.
    v.write_file(FileId::TPM_NVRAM, b"third").unwrap();
    let image = v.into_storage().bytes;
    let mut v = Vmgs::open(MemStorage::new(image), Some(&k)).unwrap();
    assert_eq!(v.read_file(FileId::TPM_NVRAM).unwrap(), b"third");
}

#[test]
fn a_long_run_of_commits_survives_sequence_wrap_and_reuses_space() {
    let mut v = Vmgs::create(MemStorage::default(), 64 << 10, Some(&key(9))).unwrap();
    // 16 blocks: far fewer than the commits below, so freed extents must be reused.
    for i in 0..200u32 {
        v.write_file(FileId::TPM_NVRAM, &i.to_le_bytes().repeat(1000))
            .unwrap();
    }
    let image = v.into_storage().bytes;
    let mut v = Vmgs::open(MemStorage::new(image), Some(&key(9))).unwrap();
    assert_eq!(
        v.read_file(FileId::TPM_NVRAM).unwrap(),
        199u32.to_le_bytes().repeat(1000)
    );
}
