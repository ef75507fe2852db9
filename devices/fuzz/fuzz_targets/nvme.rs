//! A guest that programs the NVMe controller with anything: register and doorbell writes
//! from fuzz bytes, over 64 KiB of guest memory (queues, commands, PRP lists) that are fuzz
//! bytes too, shadow doorbell kicks among them (a guest that turned shadow doorbells on with
//! pages of fuzz bytes). Every step ends in a value, a completion status or a noted error:
//! never a panic, a hang or an access outside guest memory; the namespace keeps its size,
//! and the controller's state, staged completions included, is one a successor takes up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_devices::block::raw::RawDisk;
use pv_devices::block::Disk;
use pv_devices::block::MemStore;
use pv_devices::block::BLOCK;
use pv_devices::nvme::NvmeController;
use vm_memory::Bytes;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;

const MEMORY: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
    let (writes, image) = data.split_at(data.len().min(16 * 12));
    let n = image.len().min(MEMORY);
    mem.write_slice(&image[..n], GuestAddress(0)).unwrap();
    let disk = RawDisk::new(MemStore {
        bytes: vec![0; 8 * BLOCK],
    })
    .unwrap();
    let mut nvme = NvmeController::new(disk, "fuzz");
    // A usable start most of the time: admin queues at 0x1000/0x2000, then the fuzz writes.
    nvme.mmio_write(&mem, 0x24, 4, 7 << 16 | 7);
    nvme.mmio_write(&mem, 0x28, 8, 0x1000);
    nvme.mmio_write(&mem, 0x30, 8, 0x2000);
    nvme.mmio_write(&mem, 0x14, 4, 1);
    for w in writes.chunks_exact(12) {
        let offset = u64::from(u16::from_le_bytes([w[0], w[1]])) % 0x4000;
        let size = if w[2] & 1 == 0 { 4 } else { 8 };
        let value = u64::from_le_bytes(w[4..12].try_into().unwrap());
        if w[3] & 1 == 1 {
            // A doorbell that came without its value (an ioeventfd).
            nvme.stage_kick(&mem);
            nvme.post(&mem);
        } else {
            let _ = nvme.mmio_write(&mem, offset & !3, size, value);
        }
        let _ = nvme.mmio_read(offset & !3, size);
    }
    assert_eq!(nvme.disk().blocks(), 8);
    let mut successor = NvmeController::new(
        RawDisk::new(MemStore {
            bytes: vec![0; 8 * BLOCK],
        })
        .unwrap(),
        "fuzz",
    );
    successor
        .restore(nvme.state())
        .expect("a controller's own state is restorable");
});
