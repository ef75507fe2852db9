//! A driver that programs the virtio PCI transport with anything: reads and writes of any
//! size at any BAR 0 offset, in any order. Never a panic; the queues it enables stay within
//! their maximum sizes; and the transport's state is always one a restarted service takes up.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_devices::virtio::pci::VirtioPci;
use pv_devices::virtio::pci::BAR_SIZE;

const MAX: [u16; 2] = [256, 64];

fuzz_target!(|data: &[u8]| {
    let mut t = VirtioPci::new(1 << 5 | 1 << 16, &MAX);
    for op in data.chunks_exact(12) {
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]])) % BAR_SIZE;
        let size = [1u8, 2, 4, 8][usize::from(op[2] & 3)];
        let value = u64::from_le_bytes(op[4..12].try_into().unwrap());
        if op[3] & 1 == 0 {
            let _ = t.read(offset, size, &[0u8; 12]);
        } else {
            let _ = t.write(offset, size, value);
        }
    }
    for (n, max) in MAX.iter().enumerate() {
        if let Some(q) = t.queue_config(n as u16) {
            assert!(q.size <= *max && q.size.is_power_of_two(), "{q:?}");
        }
    }
    VirtioPci::new(1 << 5 | 1 << 16, &MAX)
        .restore(t.state())
        .expect("a transport's own state is restorable");
});
