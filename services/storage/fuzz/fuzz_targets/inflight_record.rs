//! An in-flight record that is anything: a memfd of any size holding any bytes (the front end
//! keeps the record and hands it back, so a hostile one chooses every byte), with any queue
//! parameters, then any calls on it. `Record::new`, `prepare` and `recover` end in a typed
//! error or a result consistent with what they were asked: a record is accepted only if it
//! holds the queues it claims, a queue is prepared only if the record has it, recovered
//! requests are distinct heads of the ring, and recovering twice finds the same requests.
//! The calls a ring makes while serving (`start`, `completing`, `completed`, `clear`) succeed
//! only for a queue and descriptor the record has. No call changes a byte outside the part of
//! the queue it names (checked on records up to 64 KiB).
//!
//! Format: `pv_storage_fuzz::record`. Seeds (`cargo run --example seeds`):
//! `services/storage/fuzz/seeds/inflight_record`.
#![no_main]

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;

use libfuzzer_sys::fuzz_target;
use pv_vhost_user::inflight::queue_bytes;
use pv_vhost_user::inflight::Record;
use pv_vhost_user::inflight::RecordError;
use pv_vhost_user::inflight::VERSION;
use pv_storage_fuzz::record::Call;
use pv_storage_fuzz::record::Input;
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;
use vm_memory::GuestRegionMmap;

fn read_u16(file: &File, at: u64) -> Option<u16> {
    let mut b = [0u8; 2];
    file.read_exact_at(&mut b, at).ok()?;
    Some(u16::from_le_bytes(b))
}

/// Largest record whose bytes are compared around each call (a copy of the file per call).
const COMPARED: u64 = 64 << 10;

fn contents(file: &File, size: u64) -> Option<Vec<u8>> {
    (size <= COMPARED).then(|| {
        let mut v = vec![0u8; size as usize];
        file.read_exact_at(&mut v, 0).unwrap();
        v
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let size = u64::from(input.file_size);
    let file = File::from(ipc_defs::hosted::sys::memfd("fuzz-inflight", size).unwrap());
    let n = input.bytes.len().min(size as usize);
    file.write_all_at(&input.bytes[..n], 0).unwrap();
    // Mapped as the back end maps a record it is handed: the whole file at offset 0.
    let Ok(region) =
        MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), size as usize)
    else {
        assert_eq!(size, 0, "a memfd of {size} bytes maps");
        return;
    };
    let mem =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap();
    let need = Record::size_for(input.queues, input.queue_size, input.max_queues);
    let record = match Record::new(mem, input.queues, input.queue_size, input.max_queues) {
        Ok(r) => r,
        Err(e) => {
            match need {
                Ok(need) => assert!(
                    matches!(e, RecordError::TooSmall { have, .. } if have == size && have < need),
                    "{e} (need {need}, have {size})"
                ),
                Err(why) => assert_eq!(e, why),
            }
            return;
        }
    };
    let need = need.expect("an accepted record has a valid size");
    assert!(need <= size, "a record of {size} bytes accepted for {need}");
    assert!(input.queue_size.is_power_of_two());
    assert!(input.queues >= 1 && input.queues <= input.max_queues);
    let version_at = |queue: u16| u64::from(queue) * queue_bytes(input.queue_size) + 8;
    for call in input.calls {
        let before = contents(&file, size);
        let queue = match call {
            Call::Prepare { queue, size } => {
                match record.prepare(queue, size) {
                    Ok(()) => {
                        assert!(queue < input.queues && size <= input.queue_size);
                        assert_eq!(read_u16(&file, version_at(queue)), Some(VERSION));
                    }
                    Err(RecordError::NoQueue(q)) => assert!(q == queue && queue >= input.queues),
                    Err(RecordError::QueueTooLarge { .. }) => assert!(size > input.queue_size),
                    Err(RecordError::Version { version, .. }) => {
                        assert!(version != 0 && version != VERSION)
                    }
                    Err(e) => panic!("prepare({queue}, {size}): {e}"),
                }
                queue
            }
            Call::Recover { queue, size, used } => {
                if let Ok(found) = record.recover(queue, size, used) {
                    assert!(queue < input.queues && size <= input.queue_size);
                    let distinct: HashSet<u16> = found.heads.iter().copied().collect();
                    assert_eq!(distinct.len(), found.heads.len(), "{found:?}");
                    assert!(found.heads.iter().all(|h| *h < size), "{found:?}");
                    let again = record.recover(queue, size, used).expect("recovered once");
                    assert_eq!(again, found, "a second recovery finds the same requests");
                }
                queue
            }
            Call::Start {
                queue,
                head,
                counter,
            } => {
                if record.start(queue, head, counter).is_ok() {
                    assert!(queue < input.queues && head < input.queue_size);
                }
                queue
            }
            Call::Completing { queue, head } => {
                if record.completing(queue, head).is_ok() {
                    assert!(queue < input.queues && head < input.queue_size);
                }
                queue
            }
            Call::Completed { queue, head, used } => {
                if record.completed(queue, head, used).is_ok() {
                    assert!(queue < input.queues && head < input.queue_size);
                }
                queue
            }
            Call::Clear { queue } => {
                if record.clear(queue).is_ok() {
                    assert!(queue < input.queues);
                }
                queue
            }
        };
        only_in_part(before, &file, size, queue, input.queue_size);
    }
});

/// No byte outside `queue`'s part of the record changed since `before`.
fn only_in_part(before: Option<Vec<u8>>, file: &File, size: u64, queue: u16, queue_size: u16) {
    let (Some(before), Some(after)) = (before, contents(file, size)) else {
        return;
    };
    let part = queue_bytes(queue_size);
    let start = (u64::from(queue) * part).min(size) as usize;
    let end = (u64::from(queue) * part + part).min(size) as usize;
    assert!(
        before[..start] == after[..start] && before[end..] == after[end..],
        "a byte outside queue {queue}'s part {start:#x}..{end:#x} changed"
    );
}
