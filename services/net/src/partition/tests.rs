//! The function as a driver sees it: configuration space, negotiation, queues in the window,
//! frames both ways through the responder, restarts and hostile set-ups.

use std::net::Ipv4Addr;

use ipc_defs::hosted::checkpoint::MemRegion;
use pv_devices::virtio::net::MacAddress;
use pv_devices::virtio::pci::ACKNOWLEDGE;
use pv_devices::virtio::pci::DRIVER;
use pv_devices::virtio::pci::DRIVER_OK;
use pv_devices::virtio::pci::FEATURES_OK;
use pv_devices::virtio::pci::ISR_AT;
use pv_devices::virtio::pci::NOTIFY_AT;
use vm_memory::Bytes;
use vm_memory::GuestAddress;

use super::*;
use crate::device::HostLink;
use crate::responder::Responder;

const BAR: u64 = 0xfe00_4000;
const WINDOW: u64 = 0xb000_0000;
/// Configuration accesses of 00:04.0.
const CONFIG: u64 = 4 << 11;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x35, 0x02]);
/// Entries per ring in these tests.
const SIZE: u16 = 8;
/// Each queue's rings: descriptors, driver (avail), device (used).
const RINGS: [(u64, u64, u64); 2] = [
    (WINDOW, WINDOW + 0x1000, WINDOW + 0x2000),
    (WINDOW + 0x3000, WINDOW + 0x4000, WINDOW + 0x5000),
];
const BUFFERS: u64 = WINDOW + 0x8000;
const VIRTIO_F_VERSION_1_HIGH: u64 = 1;
const MAC_FEATURE: u64 = 1 << 5;

type Function = PciNet<MemRegion, HostLink>;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(WINDOW), 0x10000)]).unwrap()
}

fn function(region: &MemRegion, memory: &GuestMemoryMmap) -> Function {
    let link = HostLink::Responder(Responder::new(HOST_MAC, Ipv4Addr::new(10, 0, 2, 2)));
    let net = VirtioNet::new(link, MacAddress(GUEST_MAC), 1500).unwrap();
    PciNet::new(net, BAR, memory.clone(), None, region.clone(), true).unwrap()
}

/// A driver's accesses, numbered as the partition numbers them.
struct Driver {
    seq: u64,
}

impl Driver {
    fn access(
        &mut self,
        f: &mut Function,
        space: Space,
        address: u64,
        size: u8,
        write: Option<u64>,
    ) -> Reply {
        self.seq += 1;
        f.access(Access {
            vcpu: 0,
            seq: self.seq,
            space,
            address,
            size,
            write,
        })
    }

    fn cfg(&mut self, f: &mut Function, reg: u64, size: u8, write: Option<u64>) -> u64 {
        self.access(f, Space::PciConfig, CONFIG | reg, size, write)
            .value
    }

    fn read(&mut self, f: &mut Function, offset: u64, size: u8) -> u64 {
        self.access(f, Space::Mmio, BAR + offset, size, None).value
    }

    fn write(&mut self, f: &mut Function, offset: u64, size: u8, value: u64) -> Reply {
        self.access(f, Space::Mmio, BAR + offset, size, Some(value))
    }

    /// Negotiates `features` and sets up both queues at [`RINGS`]; DRIVER_OK's answer.
    fn set_up(&mut self, f: &mut Function, features: u64) -> Reply {
        self.cfg(f, 0x04, 2, Some(0x6));
        self.write(f, 0x14, 1, 0);
        self.write(f, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER));
        self.write(f, 0x08, 4, 0);
        self.write(f, 0x0c, 4, features & 0xffff_ffff);
        self.write(f, 0x08, 4, 1);
        self.write(f, 0x0c, 4, features >> 32);
        self.write(f, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
        for (n, (desc, driver, device)) in RINGS.iter().enumerate() {
            self.write(f, 0x16, 2, n as u64);
            self.write(f, 0x18, 2, u64::from(SIZE));
            self.write(f, 0x20, 8, *desc);
            self.write(f, 0x28, 8, *driver);
            self.write(f, 0x30, 8, *device);
            self.write(f, 0x1c, 2, 1);
        }
        self.write(
            f,
            0x14,
            1,
            u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
        )
    }
}

/// Puts descriptor `head` (one buffer) on queue `n`'s available ring.
fn post(memory: &GuestMemoryMmap, n: usize, head: u16, addr: u64, len: u32, writable: bool) {
    let (desc, driver, _) = RINGS[n];
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&(if writable { 2u16 } else { 0 }).to_le_bytes());
    memory
        .write_slice(&d, GuestAddress(desc + 16 * u64::from(head)))
        .unwrap();
    let idx: u16 = memory.read_obj(GuestAddress(driver + 2)).unwrap();
    memory
        .write_obj(head, GuestAddress(driver + 4 + 2 * u64::from(idx % SIZE)))
        .unwrap();
    memory
        .write_obj(idx.wrapping_add(1), GuestAddress(driver + 2))
        .unwrap();
}

fn used(memory: &GuestMemoryMmap, n: usize) -> (u16, Vec<(u32, u32)>) {
    let (_, _, device) = RINGS[n];
    let idx: u16 = memory.read_obj(GuestAddress(device + 2)).unwrap();
    let entries = (0..idx.min(SIZE))
        .map(|i| {
            let at = device + 4 + 8 * u64::from(i);
            (
                memory.read_obj(GuestAddress(at)).unwrap(),
                memory.read_obj(GuestAddress(at + 4)).unwrap(),
            )
        })
        .collect();
    (idx, entries)
}

fn arp_request() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[10, 0, 2, 15]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 2, 2]);
    f
}

/// Transmits `frame` (after a zero header) from the buffer at `BUFFERS + 0x1000 * slot`.
fn transmit(memory: &GuestMemoryMmap, head: u16, frame: &[u8]) {
    let at = BUFFERS + 0x1000 * u64::from(head);
    memory.write_slice(&[0u8; 12], GuestAddress(at)).unwrap();
    memory.write_slice(frame, GuestAddress(at + 12)).unwrap();
    post(memory, 1, head, at, 12 + frame.len() as u32, false);
}

fn receive_buffer(memory: &GuestMemoryMmap, head: u16) -> u64 {
    let at = BUFFERS + 0x4000 + 0x800 * u64::from(head);
    post(memory, 0, head, at, 0x800, true);
    at
}

#[test]
fn the_configuration_space_is_a_modern_virtio_net_function_with_a_fixed_bar() {
    let memory = memory();
    let mut f = function(&MemRegion::new(16384), &memory);
    let mut d = Driver { seq: 0 };
    assert_eq!(d.cfg(&mut f, 0, 4, None), 0x1041_1af4);
    assert_eq!(d.cfg(&mut f, 0x08, 4, None) >> 8, 0x02_00_00);
    assert_eq!(d.cfg(&mut f, 0x10, 4, None), BAR | 4);
    assert_eq!(d.cfg(&mut f, 0x34, 1, None), 0x40, "capabilities");
    // Memory decoding off: BAR reads are all ones, writes vanish.
    assert_eq!(d.read(&mut f, 0x12, 2), 0xffff);
    d.cfg(&mut f, 0x04, 2, Some(0x6));
    assert_eq!(d.read(&mut f, 0x12, 2), 2, "two queues");
    assert_eq!(
        d.read(&mut f, pv_devices::virtio::pci::DEVICE_AT, 4),
        u64::from(u32::from_le_bytes([0x52, 0x54, 0x00, 0x12])),
        "the MAC in the device configuration"
    );
}

#[test]
fn a_driver_sends_an_arp_request_and_receives_the_responders_answer_with_an_interrupt() {
    let memory = memory();
    let mut f = function(&MemRegion::new(16384), &memory);
    let mut d = Driver { seq: 0 };
    let reply = d.set_up(&mut f, MAC_FEATURE | VIRTIO_F_VERSION_1_HIGH << 32);
    assert_eq!(
        reply.next,
        Next::Doorbells { armed: true },
        "armed at DRIVER_OK"
    );
    assert_ne!(d.read(&mut f, 0x14, 1) as u8 & FEATURES_OK, 0);
    let buffer = receive_buffer(&memory, 0);
    transmit(&memory, 0, &arp_request());
    // The notify write as an exit (doorbells not armed yet on this path), then the kick.
    d.write(&mut f, NOTIFY_AT + 4, 2, 1);
    assert_eq!(f.counters().notify_exits, 1);
    while f.serve_queues() {}
    assert_eq!(used(&memory, 1), (1, vec![(0, 0)]), "the frame went out");
    let (idx, entries) = used(&memory, 0);
    assert_eq!(idx, 1);
    assert_eq!(entries[0], (0, 12 + 42));
    let mut frame = [0u8; 12 + 42];
    memory.read_slice(&mut frame, GuestAddress(buffer)).unwrap();
    assert_eq!(&frame[12..18], &GUEST_MAC);
    assert_eq!(&frame[12 + 22..12 + 28], &HOST_MAC.0, "the responder's MAC");
    assert_eq!(
        d.read(&mut f, ISR_AT, 1),
        1,
        "the queue bit, cleared by the read"
    );
    assert_eq!(d.read(&mut f, ISR_AT, 1), 0);
    assert_eq!(f.net_counters().tx_frames, 1);
    assert_eq!(f.net_counters().rx_frames, 1);
}

#[test]
fn a_restarted_function_resumes_its_queues_at_the_used_index_and_answers_a_repeat_from_the_record()
{
    let memory = memory();
    let region = MemRegion::new(16384);
    let mut f = function(&region, &memory);
    let mut d = Driver { seq: 0 };
    d.set_up(&mut f, MAC_FEATURE | VIRTIO_F_VERSION_1_HIGH << 32);
    receive_buffer(&memory, 0);
    transmit(&memory, 0, &arp_request());
    while f.serve_queues() {}
    let isr_read_seq = d.seq + 1;
    assert_eq!(d.read(&mut f, ISR_AT, 1), 1);
    drop(f);
    // A new process: DRIVER_OK and the queues as they were; the ISR read sent again gets the
    // same answer (not the cleared ISR); nothing is sent twice.
    let mut g = function(&region, &memory);
    let again = g.access(Access {
        vcpu: 0,
        seq: isr_read_seq,
        space: Space::Mmio,
        address: BAR + ISR_AT,
        size: 1,
        write: None,
    });
    assert_eq!(again.value, 1);
    assert_eq!(again.next, Next::Doorbells { armed: true });
    assert_eq!(g.counters().repeats, 1);
    while g.serve_queues() {}
    assert_eq!(g.net_counters().tx_frames, 0, "nothing sent again");
    // The successor interrupts once with nothing new (its predecessor may have died between
    // publishing and raising the line): the ISR says queue again (here without a line).
    assert_eq!(d.read(&mut g, ISR_AT, 1), 1, "one interrupt after resuming");
    assert_eq!(d.read(&mut g, ISR_AT, 1), 0, "and only one");
    receive_buffer(&memory, 1);
    transmit(&memory, 1, &arp_request());
    while g.serve_queues() {}
    assert_eq!(used(&memory, 1).0, 2);
    assert_eq!(
        used(&memory, 0).0,
        2,
        "the second answer in the second buffer"
    );
    assert_eq!(used(&memory, 0).1[1], (1, 12 + 42));
}

#[test]
fn hostile_set_ups_are_typed_errors_and_the_function_serves_on() {
    let memory = memory();
    let mut f = function(&MemRegion::new(16384), &memory);
    let mut d = Driver { seq: 0 };
    // Features never offered: FEATURES_OK does not stay.
    d.cfg(&mut f, 0x04, 2, Some(0x6));
    d.write(&mut f, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER));
    d.write(&mut f, 0x08, 4, 1);
    d.write(&mut f, 0x0c, 4, 1 | 1 << 30);
    d.write(
        &mut f,
        0x14,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
    );
    assert_eq!(d.read(&mut f, 0x14, 1) as u8 & FEATURES_OK, 0);
    // A queue size that is no power of two, or over the maximum, keeps the old one.
    d.write(&mut f, 0x16, 2, 0);
    d.write(&mut f, 0x18, 2, 100);
    d.write(&mut f, 0x18, 2, 4096);
    assert_eq!(d.read(&mut f, 0x18, 2), u64::from(QUEUE_SIZE));
    // Odd sizes, a queue that does not exist, notifies before DRIVER_OK: no effect.
    d.write(&mut f, 0x14, 4, 0xffff_ffff);
    d.write(&mut f, 0x16, 2, 9);
    d.write(&mut f, 0x1c, 2, 1);
    d.write(&mut f, NOTIFY_AT + 0x100, 2, 0);
    f.access(Access {
        vcpu: 0,
        seq: 1000,
        space: Space::Mmio,
        address: BAR,
        size: 3,
        write: Some(1),
    });
    assert!(!f.serve_queues());
    // DRIVER_OK without FEATURES_OK (features not offered written, never accepted): a typed
    // error, nothing served, the written features never reach the model.
    d.write(&mut f, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER | DRIVER_OK));
    let errors = f.take_errors();
    assert!(
        matches!(errors.as_slice(), [PciNetError::FeaturesNotAccepted { .. }]),
        "{errors:?}"
    );
    assert!(!f.serve_queues());
    // Rings outside the window: a typed error at DRIVER_OK, the queue not served.
    d.write(&mut f, 0x14, 1, 0);
    d.write(&mut f, 0x14, 1, u64::from(ACKNOWLEDGE | DRIVER));
    d.write(&mut f, 0x08, 4, 1);
    d.write(&mut f, 0x0c, 4, 1);
    d.write(
        &mut f,
        0x14,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK),
    );
    d.write(&mut f, 0x16, 2, 1);
    d.write(&mut f, 0x20, 8, 0x20_0000);
    d.write(&mut f, 0x28, 8, 0x20_1000);
    d.write(&mut f, 0x30, 8, 0x20_2000);
    d.write(&mut f, 0x1c, 2, 1);
    d.write(
        &mut f,
        0x14,
        1,
        u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK),
    );
    let errors = f.take_errors();
    assert!(
        matches!(
            errors.as_slice(),
            [PciNetError::RingsOutside {
                queue: "transmit",
                desc: 0x20_0000,
                ..
            }]
        ),
        "{errors:?}"
    );
    assert!(!f.serve_queues());
    // A proper set-up, then a transmit descriptor outside the window and an available index
    // that announces more chains than the ring holds.
    d.set_up(&mut f, MAC_FEATURE | VIRTIO_F_VERSION_1_HIGH << 32);
    post(&memory, 1, 0, 0x1000, 64, false);
    while f.serve_queues() {}
    assert_eq!(f.net_counters().tx_dropped.malformed, 1);
    assert_eq!(used(&memory, 1).1[0], (0, 0), "returned empty");
    memory
        .write_obj(100u16, GuestAddress(RINGS[1].1 + 2))
        .unwrap();
    while f.serve_queues() {}
    let errors = f.take_errors();
    assert!(
        matches!(
            errors.as_slice(),
            [PciNetError::Ring(NetError::Ring {
                queue: "transmit",
                ..
            })]
        ),
        "{errors:?}"
    );
    // Stopped until the reset; the reset and a new set-up serve it again.
    d.set_up(&mut f, MAC_FEATURE | VIRTIO_F_VERSION_1_HIGH << 32);
    assert!(f.take_errors().is_empty());
}

/// A guest that writes anything anywhere: random accesses of every size to BAR 0 and the
/// configuration space, and random bytes into its rings and descriptors, with the queues
/// served after each. The function must never panic, and must answer every access.
#[test]
fn random_accesses_and_scribbled_rings_never_panic_the_function() {
    let memory = memory();
    let region = MemRegion::new(16384);
    let mut f = function(&region, &memory);
    let mut d = Driver { seq: 0 };
    let mut kicks = 0;
    let mut malformed = 0;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        // xorshift64*: reproducible, no dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for round in 0..20_000u32 {
        if round % 2_000 == 0 {
            // Now and then a proper set-up, so the queues are live while the rest is noise.
            d.set_up(&mut f, MAC_FEATURE | VIRTIO_F_VERSION_1_HIGH << 32);
        }
        let r = next();
        let size = [1u8, 2, 4, 8, 3][(r % 5) as usize];
        let value = next();
        match (r >> 8) % 8 {
            0 => {
                d.cfg(&mut f, (r >> 16) % 0x100, size, Some(value));
            }
            1 => {
                d.cfg(&mut f, (r >> 16) % 0x100, size, None);
            }
            2 | 3 => {
                d.write(&mut f, (r >> 16) % (BAR_SIZE + 0x100), size, value);
            }
            4 => {
                d.read(&mut f, (r >> 16) % (BAR_SIZE + 0x100), size);
            }
            5 => {
                // Chains announced on a random queue, often more than are there.
                let (_, driver, _) = RINGS[(r >> 16) as usize % 2];
                let idx: u16 = memory.read_obj(GuestAddress(driver + 2)).unwrap();
                let head = (value >> 16) as u16 % (2 * SIZE);
                let _ =
                    memory.write_obj(head, GuestAddress(driver + 4 + 2 * u64::from(idx % SIZE)));
                let _ =
                    memory.write_obj(idx.wrapping_add(value as u16 % 4), GuestAddress(driver + 2));
            }
            6 => {
                // A random descriptor: anywhere, any length, any flags, any next.
                let (desc, _, _) = RINGS[(r >> 16) as usize % 2];
                let at = desc + 16 * ((r >> 20) % u64::from(SIZE));
                let addr = if value & 1 == 0 {
                    WINDOW + (value >> 8) % 0x10000
                } else {
                    value >> 8
                };
                let _ = memory.write_obj(addr, GuestAddress(at));
                let _ = memory.write_obj((next() % 0x3000) as u32, GuestAddress(at + 8));
                let _ = memory.write_obj(next() as u32, GuestAddress(at + 12));
            }
            _ => {
                // Scribble on the rings.
                let at = WINDOW + (r >> 16) % 0x6000;
                let _ = memory.write_obj(value as u32, GuestAddress(at & !3));
            }
        }
        let mut calls = 0;
        while f.serve_queues() && calls < 8 {
            calls += 1;
        }
        let _ = f.take_errors();
        if round % 5_000 == 4_999 {
            // A restart from whatever was checkpointed.
            kicks += f.counters().kicks;
            malformed +=
                f.net_counters().tx_dropped.malformed + f.net_counters().rx_malformed_chains;
            drop(f);
            f = function(&region, &memory);
        }
    }
    eprintln!("{kicks} times the queues were served, {malformed} malformed chains returned");
    assert!(kicks > 1000, "the queues were live for part of the run");
}
