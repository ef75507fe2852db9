//! A guest (or vhost-user front end) that writes anything into the memory a virtio-scsi queue
//! lives in: descriptor table, available ring and buffers are all fuzz bytes, and the queue's
//! size too. Processing must end (loops bounded), answer or refuse each chain, never panic or
//! touch memory outside the guest's 64 KiB, and leave the disk's size alone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_devices::block::raw::RawDisk;
use pv_devices::block::Disk;
use pv_devices::block::MemStore;
use pv_devices::block::BLOCK;
use pv_devices::scsi::ScsiDisk;
use pv_devices::virtio::scsi::VirtioScsi;
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;

const MEMORY: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&size, image)) = data.split_first() else {
        return;
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
    let n = image.len().min(MEMORY);
    mem.write_slice(&image[..n], GuestAddress(0)).unwrap();
    // Queue size a power of two up to 256; rings at fixed places the fuzz bytes fill.
    let size = 1u16 << (size % 9);
    let Ok(mut queue) = Queue::new(size) else {
        return;
    };
    queue.set_size(size);
    queue.set_ready(true);
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x1000), Some(0));
    queue.set_used_ring_address(Some(0x2000), Some(0));
    if !queue.is_valid(&mem) {
        return;
    }
    let disk = RawDisk::new(MemStore {
        bytes: vec![0; 4 * BLOCK],
    })
    .unwrap();
    let mut dev = VirtioScsi::new(ScsiDisk::new(disk, "fuzz"));
    // The same memory as a request queue, then as the control queue.
    let _ = dev.process_requests(&mem, &mut queue);
    let _ = dev.process_control(&mem, &mut queue);
    assert_eq!(dev.scsi().disk().blocks(), 4);
});
