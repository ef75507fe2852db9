//! A channel region whose every byte (header, indices, stamps, lengths, payload) comes from
//! the fuzzer, i.e. from a hostile peer: the ring operations must return typed errors, never
//! panic, read or write out of bounds, or loop without end.
#![no_main]

use std::ptr::NonNull;

use ipc_defs::layout::ChannelLayout;
use ipc_defs::layout::Direction;
use ipc_defs::layout::Epoch;
use ipc_defs::ring::Channel;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let layout = ChannelLayout::new(4096).unwrap();
    let size = layout.region_size();
    let mut mem = vec![0u64; size / 8 + 8];
    let base = mem.as_mut_ptr().cast::<u8>();
    let off = base.align_offset(64);
    // SAFETY: `mem` holds `size` bytes after the aligned offset for the whole target.
    let region = unsafe { std::slice::from_raw_parts_mut(base.add(off), size) };
    for (i, b) in data.iter().enumerate() {
        region[i % size] ^= *b;
    }
    // SAFETY: as above; the region outlives `channel`.
    let channel = unsafe { Channel::from_raw(NonNull::new(base.add(off)).unwrap(), layout) };
    let _ = ChannelLayout::from_region(region);
    let mut buf = vec![0u8; 4096];
    for dir in [Direction::Requests, Direction::Responses] {
        let ring = channel.ring(dir);
        for _ in 0..64 {
            let _ = ring.has_data();
            match ring.try_recv(&mut buf) {
                Ok(Some(got)) => assert!(got.len <= buf.len()),
                Ok(None) => break,
                Err(_) => {}
            }
            let _ = ring.release();
        }
        let _ = ring.try_send(Epoch(1), &data[..data.len().min(600)]);
        let _ = ring.recover_producer();
        let _ = ring.try_recv(&mut buf);
        let _ = ring.discard_all();
        let _ = ring.prepare_sleep();
        let _ = ring.prepare_space_sleep(64);
    }
});
