//! An initiator that sends anything: a CDB, data for it and a room for the answer, all fuzz
//! bytes, to a small disk. Every command ends in GOOD or CHECK CONDITION with sense, the
//! answer never exceeds the room given, and the disk keeps its size.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_devices::block::raw::RawDisk;
use pv_devices::block::Disk;
use pv_devices::block::MemStore;
use pv_devices::block::BLOCK;
use pv_devices::scsi::ScsiDisk;
use pv_devices::scsi::CHECK_CONDITION;
use pv_devices::scsi::GOOD;

fuzz_target!(|data: &[u8]| {
    let Some((&cdb_len, rest)) = data.split_first() else {
        return;
    };
    let (cdb, rest) = rest.split_at((cdb_len as usize % 17).min(rest.len()));
    let room = rest.first().map_or(0, |r| usize::from(*r) * 64);
    let disk = RawDisk::new(MemStore {
        bytes: vec![0; 8 * BLOCK],
    })
    .unwrap();
    let mut scsi = ScsiDisk::new(disk, "fuzz");
    let answer = scsi.execute(cdb, rest, room);
    assert!(answer.data.len() <= room);
    match answer.status {
        GOOD => assert!(answer.sense.is_none()),
        CHECK_CONDITION => assert!(answer.sense.is_some()),
        other => panic!("status {other}"),
    }
    assert_eq!(scsi.disk().blocks(), 8);
});
