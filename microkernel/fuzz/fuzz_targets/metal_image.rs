//! What the metal kernel reads from its image before any task runs, and what a task reads
//! at its start: any bytes as a task table (decoded and checked: every index in range, every
//! slot inside its window and apart from the others), each image in a table that passes as
//! an ELF task image (segments inside the window, never W+X, the entry in code), and any
//! bytes as a boot record page. Never a panic; a table that passes encodes back to itself;
//! an image that passes has its segments inside the window.
#![no_main]

use ipc_defs::metal::TaskBoot;
use ipc_defs::metal::TaskTable;
use ipc_defs::metal::HEAP_BASE;
use ipc_defs::metal::IMAGE_BASE;
use libfuzzer_sys::fuzz_target;

fn image(bytes: &[u8]) {
    if let Ok(image) = pv_metal::elf::parse(bytes) {
        for s in &image.segments {
            assert!(s.address >= IMAGE_BASE && s.end() <= HEAP_BASE);
            assert!(!(s.writable && s.executable));
            assert!(s.data.len() as u64 <= s.size);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(table) = TaskTable::decode(data) {
        let again = postcard::to_allocvec(&table).unwrap();
        assert_eq!(TaskTable::decode(&again).unwrap(), table);
        for bytes in &table.images {
            image(bytes);
        }
    }
    image(data);
    let _ = TaskBoot::decode(data);
});
