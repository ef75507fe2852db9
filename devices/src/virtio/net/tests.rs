//! The model against a driver written out in guest memory: the properties the module header
//! promises.

use virtio_queue::Queue;
use vm_memory::Bytes;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;

use super::*;
use crate::virtio::testing::memory;
use crate::virtio::testing::NEXT;
use crate::virtio::testing::WRITE;

const MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
/// Where the tests' buffers start (the mock queue sits at 0).
const BUF: u64 = 0x10_0000;
const QUEUE_SIZE: u16 = 16;

/// A device whose driver acknowledged everything offered.
fn device(mtu: u16) -> VirtioNet<MemLink> {
    let mut dev = VirtioNet::new(MemLink::default(), MAC, mtu).unwrap();
    dev.set_acked_features(dev.features());
    dev
}

/// One descriptor: address, length, device-writable.
type Buf = (u64, u32, bool);

/// The driver's side of one queue of [`QUEUE_SIZE`]: descriptor table at 0, available
/// ring at 0x1000, used ring at 0x2000 (virtio-queue's `MockSplitQueue` lays its used ring
/// over the tail of the available ring, where `used_event` lives).
struct Driver<'m> {
    mem: &'m GuestMemoryMmap,
    descs: u16,
    posted: u16,
}

const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

impl<'m> Driver<'m> {
    fn new(mem: &'m GuestMemoryMmap) -> (Driver<'m>, Queue) {
        for at in [AVAIL, USED] {
            mem.write_slice(&[0; 0x1000], GuestAddress(at)).unwrap();
        }
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(QUEUE_SIZE);
        q.set_desc_table_address(Some(0), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        let driver = Driver {
            mem,
            descs: 0,
            posted: 0,
        };
        (driver, q)
    }

    /// Writes `chains` into the table and makes them available.
    fn post(&mut self, chains: &[&[Buf]]) {
        for chain in chains {
            let head = self.descs;
            for (i, &(addr, len, writable)) in chain.iter().enumerate() {
                let more = i + 1 < chain.len();
                let flags = if more { NEXT } else { 0 } | if writable { WRITE } else { 0 };
                let next = if more { self.descs + 1 } else { 0 };
                self.descriptor(self.descs, addr, len, flags, next);
                self.descs += 1;
            }
            self.make_available(head);
        }
    }

    fn descriptor(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(16 * u64::from(index)))
            .unwrap();
    }

    fn make_available(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.posted % QUEUE_SIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.posted += 1;
        self.mem
            .write_obj(self.posted, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// The used ring's element `i`: head and length.
    fn used(&self, i: u64) -> (u32, u32) {
        let at = USED + 4 + 8 * i;
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn set_used_event(&self, event: u16) {
        let at = AVAIL + 4 + 2 * u64::from(QUEUE_SIZE);
        self.mem.write_obj(event, GuestAddress(at)).unwrap();
    }

    fn avail_event(&self) -> u16 {
        let at = USED + 4 + 8 * u64::from(QUEUE_SIZE);
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }
}

fn frame(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

fn header(mem: &GuestMemoryMmap, at: u64) -> NetHeader {
    let mut h = [0u8; HEADER_LEN];
    mem.read_slice(&mut h, GuestAddress(at)).unwrap();
    NetHeader::from_bytes(&h)
}

#[test]
fn a_frame_split_over_descriptors_reaches_the_back_end_whole() {
    let mem = memory();
    let mut dev = device(1500);
    let data = frame(60);
    mem.write_slice(&[0; HEADER_LEN], GuestAddress(BUF))
        .unwrap();
    mem.write_slice(&data[..20], GuestAddress(BUF + 0x1000))
        .unwrap();
    mem.write_slice(&data[20..], GuestAddress(BUF + 0x2000))
        .unwrap();
    // The header alone, then the frame in two pieces; and header and frame in one buffer.
    let mut joined = vec![0u8; HEADER_LEN];
    joined.extend_from_slice(&data);
    mem.write_slice(&joined, GuestAddress(BUF + 0x3000))
        .unwrap();
    let (mut drv, mut q) = Driver::new(&mem);
    drv.post(&[
        &[
            (BUF, HEADER_LEN as u32, false),
            (BUF + 0x1000, 20, false),
            (BUF + 0x2000, 40, false),
        ],
        &[(BUF + 0x3000, joined.len() as u32, false)],
    ]);
    let report = dev.process_tx(&mem, &mut q).unwrap();
    assert_eq!(
        report,
        TxReport {
            progress: TxProgress::Idle,
            notify: true
        }
    );
    assert_eq!(dev.backend().from_guest, vec![data.clone(), data]);
    assert_eq!(drv.used_idx(), 2);
    assert_eq!((drv.used(0), drv.used(1)), ((0, 0), (3, 0)));
    let c = dev.counters();
    assert_eq!((c.tx_frames, c.tx_bytes, c.tx_dropped.total()), (2, 120, 0));
}

#[test]
fn a_small_frame_fills_one_receive_buffer() {
    let mem = memory();
    let mut dev = device(1500);
    let data = frame(60);
    dev.backend().to_guest.push_back(data.clone());
    let (mut drv, mut q) = Driver::new(&mem);
    drv.post(&[&[(BUF, 2048, true)]]);
    let report = dev.process_rx(&mem, &mut q).unwrap();
    assert_eq!(
        report,
        RxReport {
            progress: RxProgress::Idle,
            notify: true
        }
    );
    assert_eq!(drv.used(0), (0, 72));
    let h = header(&mem, BUF);
    assert_eq!(
        h,
        NetHeader {
            num_buffers: 1,
            ..NetHeader::default()
        }
    );
    let mut back = vec![0u8; 60];
    mem.read_slice(&mut back, GuestAddress(BUF + 12)).unwrap();
    assert_eq!(back, data);
    assert_eq!((dev.counters().rx_frames, dev.counters().rx_bytes), (1, 60));
}

#[test]
fn a_large_frame_spans_mergeable_buffers_and_says_how_many() {
    let mem = memory();
    let mut dev = device(9000);
    let data = frame(9000 + ETH_HLEN);
    dev.backend().to_guest.push_back(data.clone());
    let (mut drv, mut q) = Driver::new(&mem);
    let bufs: Vec<[Buf; 1]> = (0..4).map(|i| [(BUF + i * 0x2000, 4096, true)]).collect();
    let chains: Vec<&[Buf]> = bufs.iter().map(|b| &b[..]).collect();
    drv.post(&chains);
    assert_eq!(
        dev.process_rx(&mem, &mut q).unwrap().progress,
        RxProgress::Idle
    );
    // 9026 bytes with the header: two whole buffers and 834 bytes of a third; the fourth
    // is left for the next frame.
    assert_eq!(drv.used_idx(), 3);
    assert_eq!(
        [drv.used(0), drv.used(1), drv.used(2)],
        [(0, 4096), (1, 4096), (2, 834)]
    );
    assert_eq!(q.next_avail(), 3);
    assert_eq!(header(&mem, BUF).num_buffers, 3);
    let mut back = Vec::new();
    for (i, len) in [(0u64, 4096 - 12), (1, 4096), (2, 834)] {
        let mut part = vec![0u8; len];
        let skip = if i == 0 { 12 } else { 0 };
        mem.read_slice(&mut part, GuestAddress(BUF + i * 0x2000 + skip))
            .unwrap();
        back.extend_from_slice(&part);
    }
    assert_eq!(back, data);
}

#[test]
fn without_receive_buffers_a_frame_waits_and_nothing_is_published() {
    let mem = memory();
    let mut dev = device(1500);
    for len in [1514, 100] {
        dev.backend().to_guest.push_back(frame(len));
    }
    let (mut drv, mut q) = Driver::new(&mem);
    q.set_event_idx(true);
    let waiting = RxReport {
        progress: RxProgress::WaitingForBuffers,
        notify: false,
    };
    assert_eq!(dev.process_rx(&mem, &mut q).unwrap(), waiting);
    assert!(dev.has_waiting_frame());
    assert_eq!(
        dev.backend().to_guest.len(),
        1,
        "the back end is not read ahead"
    );
    // One buffer too small for the frame: taken, put back, nothing published.
    drv.post(&[&[(BUF, 1024, true)]]);
    assert_eq!(dev.process_rx(&mem, &mut q).unwrap(), waiting);
    assert_eq!((drv.used_idx(), q.next_avail()), (0, 0));
    // Armed: the driver's next post (past available index 1) kicks.
    assert_eq!(drv.avail_event(), 1);
    assert_eq!(dev.counters().rx_waits, 2);
    // A second buffer: the waiting frame takes both, then the next frame has none.
    drv.post(&[&[(BUF + 0x1000, 1024, true)]]);
    assert_eq!(
        dev.process_rx(&mem, &mut q).unwrap().progress,
        RxProgress::WaitingForBuffers
    );
    assert_eq!(drv.used_idx(), 2);
    assert_eq!(header(&mem, BUF).num_buffers, 2);
    assert_eq!(
        (dev.counters().rx_frames, dev.counters().rx_dropped.total()),
        (1, 0)
    );
}

#[test]
fn without_mergeable_buffers_a_frame_larger_than_the_next_buffer_is_dropped() {
    let mem = memory();
    let mut dev = device(1500);
    dev.set_acked_features(super::super::VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC);
    for len in [1514, 60] {
        dev.backend().to_guest.push_back(frame(len));
    }
    let (mut drv, mut q) = Driver::new(&mem);
    drv.post(&[&[(BUF, 1024, true)], &[(BUF + 0x1000, 1024, true)]]);
    assert_eq!(
        dev.process_rx(&mem, &mut q).unwrap().progress,
        RxProgress::Idle
    );
    // The big frame dropped (counted), the small one in the first buffer, num_buffers 1.
    assert_eq!(dev.counters().rx_dropped.no_rx_buffers, 1);
    assert_eq!((drv.used_idx(), drv.used(0)), (1, (0, 72)));
    assert_eq!(header(&mem, BUF).num_buffers, 1);
}

#[test]
fn an_oversized_transmitted_frame_is_dropped_and_counted() {
    let mem = memory();
    let mut dev = device(1500);
    let max = dev.max_frame();
    assert_eq!(max, 1518);
    mem.write_slice(&[0; HEADER_LEN], GuestAddress(BUF))
        .unwrap();
    let (mut drv, mut q) = Driver::new(&mem);
    let header = (BUF, HEADER_LEN as u32, false);
    drv.post(&[
        &[header, (BUF + 0x1000, max as u32 + 1, false)],
        &[header, (BUF + 0x1000, max as u32, false)],
        // Far past anything the model would buffer: refused from the descriptors.
        &[header, (BUF + 0x1000, 0x20_0000, false)],
    ]);
    dev.process_tx(&mem, &mut q).unwrap();
    assert_eq!(dev.backend().from_guest.len(), 1);
    assert_eq!(dev.backend().from_guest[0].len(), max);
    assert_eq!(dev.counters().tx_dropped.oversized, 2);
    assert_eq!(drv.used_idx(), 3);
    assert!(dev.last_problem().unwrap().contains("longer than the 1518"));
}

#[test]
fn malformed_transmit_chains_are_returned_empty_and_counted() {
    let mem = memory();
    let mut dev = device(1500);
    let (mut drv, mut q) = Driver::new(&mem);
    drv.post(&[
        // Shorter than the header.
        &[(BUF, 8, false)],
        // A device-writable buffer on transmit.
        &[(BUF, HEADER_LEN as u32, false), (BUF + 0x1000, 64, true)],
        // Outside guest memory.
        &[(BUF, HEADER_LEN as u32, false), (0x3f_ffc0, 0x100, false)],
    ]);
    dev.process_tx(&mem, &mut q).unwrap();
    assert!(dev.backend().from_guest.is_empty());
    assert_eq!(dev.counters().tx_dropped.malformed, 3);
    assert_eq!(drv.used_idx(), 3);
    for i in 0..3 {
        assert_eq!(drv.used(i).1, 0);
    }
}

#[test]
fn a_transmitted_frame_asking_for_an_offload_is_dropped() {
    let mem = memory();
    let mut dev = device(1500);
    let (mut drv, mut q) = Driver::new(&mem);
    let gso = NetHeader {
        gso_type: 1, // TCPV4
        gso_size: 1448,
        ..NetHeader::default()
    };
    let csum = NetHeader {
        flags: 1, // NEEDS_CSUM
        ..NetHeader::default()
    };
    for (i, h) in [gso, csum].iter().enumerate() {
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(&frame(60));
        mem.write_slice(&bytes, GuestAddress(BUF + i as u64 * 0x1000))
            .unwrap();
    }
    drv.post(&[&[(BUF, 72, false)], &[(BUF + 0x1000, 72, false)]]);
    dev.process_tx(&mem, &mut q).unwrap();
    assert!(dev.backend().from_guest.is_empty());
    assert_eq!(dev.counters().tx_dropped.offload, 2);
    assert_eq!(drv.used_idx(), 2);
}

#[test]
fn chains_that_loop_are_returned_and_counted() {
    let mem = memory();
    let mut dev = device(1500);
    // Descriptor 0 -> 1 -> 0 -> ...: it never ends.
    let looping = |drv: &mut Driver, flags: u16| {
        drv.descriptor(0, BUF, 12, NEXT | flags, 1);
        drv.descriptor(1, BUF + 0x1000, 64, NEXT | flags, 0);
        drv.descs = 2;
        drv.make_available(0);
    };
    let (mut drv, mut q) = Driver::new(&mem);
    looping(&mut drv, 0);
    dev.process_tx(&mem, &mut q).unwrap();
    assert_eq!(dev.counters().tx_dropped.malformed, 1);
    assert!(dev.last_problem().unwrap().contains("does not end"));

    let (mut drv, mut q) = Driver::new(&mem);
    looping(&mut drv, WRITE);
    drv.post(&[&[(BUF + 0x2000, 2048, true)]]);
    dev.backend().to_guest.push_back(frame(60));
    dev.process_rx(&mem, &mut q).unwrap();
    // The looping buffer went back empty; the frame took the next one.
    assert_eq!(dev.counters().rx_malformed_chains, 1);
    assert_eq!([drv.used(0), drv.used(1)], [(0, 0), (2, 72)]);
    assert_eq!(dev.counters().rx_frames, 1);
}

#[test]
fn a_busy_back_end_leaves_the_frame_on_the_ring() {
    let mem = memory();
    let mut dev = device(1500);
    mem.write_slice(&[0; HEADER_LEN], GuestAddress(BUF))
        .unwrap();
    let (mut drv, mut q) = Driver::new(&mem);
    drv.post(&[&[(BUF, 72, false)]]);
    dev.backend().busy = true;
    let report = dev.process_tx(&mem, &mut q).unwrap();
    assert_eq!(
        report,
        TxReport {
            progress: TxProgress::Blocked,
            notify: false
        }
    );
    assert_eq!((q.next_avail(), drv.used_idx()), (0, 0));
    dev.backend().busy = false;
    assert_eq!(
        dev.process_tx(&mem, &mut q).unwrap().progress,
        TxProgress::Idle
    );
    assert_eq!(dev.backend().from_guest.len(), 1);
}

#[test]
fn the_driver_is_interrupted_when_its_used_event_falls_inside_a_frame() {
    let mem = memory();
    let mut dev = device(9000);
    let (mut drv, mut q) = Driver::new(&mem);
    let bufs: Vec<[Buf; 1]> = (0..6).map(|i| [(BUF + i * 0x2000, 4096, true)]).collect();
    let chains: Vec<&[Buf]> = bufs.iter().map(|b| &b[..]).collect();
    drv.post(&chains);
    q.set_event_idx(true);
    // The driver wants to hear when entry 1 is used: the frame's second buffer.
    drv.set_used_event(1);
    dev.backend().to_guest.push_back(frame(9014));
    let report = dev.process_rx(&mem, &mut q).unwrap();
    assert!(report.notify);
    // Entries 3..6 do not include 1 again.
    drv.set_used_event(1);
    dev.backend().to_guest.push_back(frame(9014));
    let report = dev.process_rx(&mem, &mut q).unwrap();
    assert_eq!(drv.used_idx(), 6);
    assert!(!report.notify);
}

#[test]
fn a_reset_drops_the_waiting_frame_and_counts_it() {
    let mut dev = device(1500);
    let mem = memory();
    let (_, mut q) = Driver::new(&mem);
    dev.backend().to_guest.push_back(frame(60));
    dev.process_rx(&mem, &mut q).unwrap();
    assert!(dev.has_waiting_frame());
    dev.reset();
    assert!(!dev.has_waiting_frame());
    assert_eq!(dev.counters().rx_dropped.no_rx_buffers, 1);
}

#[test]
fn the_configuration_announces_mac_link_one_pair_and_the_mtu() {
    let mut dev = device(9000);
    let c = dev.config();
    let word = |at: usize| u16::from_le_bytes([c[at], c[at + 1]]);
    assert_eq!(&c[..6], &MAC.0);
    assert_eq!(
        (word(6), word(8), word(10)),
        (VIRTIO_NET_S_LINK_UP, 1, 9000)
    );
    assert!(dev.set_link(false));
    assert!(!dev.set_link(false));
    assert_eq!(dev.config()[6], 0);
    let offered = dev.features();
    assert_eq!(
        offered & ((1 << 3) - 1),
        VIRTIO_NET_F_MTU & 7,
        "no checksum offload"
    );
    assert_eq!(offered & (0x7f << 7), 0, "no TSO, UFO or ECN either way");
    assert_eq!(offered & (1 << 17), 0, "no control queue");
    assert_eq!(
        VirtioNet::new(MemLink::default(), MAC, 67).err(),
        Some(NetError::Mtu(67))
    );
    let group = MacAddress([1, 0, 0x5e, 0, 0, 1]);
    assert_eq!(
        VirtioNet::new(MemLink::default(), group, 1500).err(),
        Some(NetError::Mac(group))
    );
}

#[test]
fn headers_round_trip() {
    let h = NetHeader {
        flags: 1,
        gso_type: 3,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 2,
    };
    assert_eq!(NetHeader::from_bytes(&h.to_bytes()), h);
    let (reason, why) = check_tx_header(&h, 2000, OFFLOAD_FEATURES).unwrap_err();
    assert_eq!(reason, DropReason::Offload);
    assert!(why.starts_with("gso_type 0x3"), "{why}");
}

/// A device over a back end that carries headers, its driver acknowledging `acked`.
fn offloading_device(acked: impl Fn(u64) -> u64) -> VirtioNet<MemLink> {
    let link = MemLink {
        headers: true,
        ..MemLink::default()
    };
    let mut dev = VirtioNet::new(link, MAC, 1500).unwrap();
    dev.set_acked_features(acked(dev.features()));
    dev
}

/// A TCP segment's header as Linux sends one: partial checksum at the TCP header, 1448-byte
/// segments behind 54 bytes of headers.
const SEGMENT: NetHeader = NetHeader {
    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
    gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
    hdr_len: 54,
    gso_size: 1448,
    csum_start: 34,
    csum_offset: 16,
    num_buffers: 0,
};

#[test]
fn over_a_back_end_with_headers_the_offloads_are_offered_and_the_back_end_told() {
    assert_eq!(device(1500).features() & OFFLOAD_FEATURES, 0);
    let dev = offloading_device(|offered| offered);
    assert_eq!(dev.features() & OFFLOAD_FEATURES, OFFLOAD_FEATURES);
    let all = GuestOffloads {
        csum: true,
        tso4: true,
        tso6: true,
        ecn: true,
    };
    assert_eq!(dev.backend_ref().accepted, all);
    // Segments only with partial checksums: TSO without GUEST_CSUM gives nothing.
    let dev = offloading_device(|offered| offered & !VIRTIO_NET_F_GUEST_CSUM);
    assert_eq!(dev.backend_ref().accepted, GuestOffloads::default());
    let mut dev = offloading_device(|offered| offered);
    dev.reset();
    assert_eq!(dev.backend_ref().accepted, GuestOffloads::default());
}

#[test]
fn a_tcp_segment_goes_to_the_back_end_whole_with_its_header() {
    let mem = memory();
    let mut dev = offloading_device(|offered| offered);
    let data = frame(20_000);
    let mut bytes = SEGMENT.to_bytes().to_vec();
    bytes.extend_from_slice(&data);
    mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
    let (mut drv, mut q) = Driver::new(&mem);
    drv.post(&[&[(BUF, bytes.len() as u32, false)]]);
    dev.process_tx(&mem, &mut q).unwrap();
    assert_eq!(dev.backend().from_guest, vec![data]);
    assert_eq!(dev.backend().from_guest_headers, vec![SEGMENT]);
    // Without HOST_TSO4 and 6 the same chain is too long for the MTU, and a short one asking
    // for the segmentation is refused.
    let mut dev =
        offloading_device(|offered| offered & !(VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6));
    let mut short = SEGMENT.to_bytes().to_vec();
    short.extend_from_slice(&frame(1000));
    mem.write_slice(&short, GuestAddress(BUF + 0x10000))
        .unwrap();
    drv.post(&[
        &[(BUF, bytes.len() as u32, false)],
        &[(BUF + 0x10000, short.len() as u32, false)],
    ]);
    dev.process_tx(&mem, &mut q).unwrap();
    assert!(dev.backend().from_guest.is_empty());
    let drops = dev.counters().tx_dropped;
    assert_eq!((drops.oversized, drops.offload), (1, 1));
}

#[test]
fn transmitted_headers_that_do_not_fit_their_frame_are_dropped() {
    let cases = [
        // The checksum field past the end of a 100-byte frame.
        NetHeader {
            csum_start: 90,
            csum_offset: 16,
            gso_type: 0,
            ..SEGMENT
        },
        // A segment of size 0.
        NetHeader {
            gso_size: 0,
            ..SEGMENT
        },
        // Headers longer than the frame.
        NetHeader {
            hdr_len: 101,
            ..SEGMENT
        },
    ];
    for h in cases {
        let (reason, why) = check_tx_header(&h, 100, OFFLOAD_FEATURES).unwrap_err();
        assert_eq!(reason, DropReason::Malformed, "{h:?}: {why}");
    }
    // ECN without segmentation, DATA_VALID from the driver: offloads not offered.
    for h in [
        NetHeader {
            gso_type: VIRTIO_NET_HDR_GSO_ECN,
            ..NetHeader::default()
        },
        NetHeader {
            flags: VIRTIO_NET_HDR_F_DATA_VALID,
            ..NetHeader::default()
        },
    ] {
        let (reason, _) = check_tx_header(&h, 100, OFFLOAD_FEATURES).unwrap_err();
        assert_eq!(reason, DropReason::Offload, "{h:?}");
    }
    check_tx_header(&SEGMENT, 100, OFFLOAD_FEATURES).unwrap();
}

#[test]
fn a_segment_from_the_host_spans_mergeable_buffers_with_its_header() {
    let mem = memory();
    let mut dev = offloading_device(|offered| offered);
    let data = frame(30_000);
    dev.backend().to_guest.push_back(data.clone());
    dev.backend().to_guest_headers.push_back(SEGMENT);
    let (mut drv, mut q) = Driver::new(&mem);
    let bufs: Vec<[Buf; 1]> = (0..8).map(|i| [(BUF + i * 0x2000, 4096, true)]).collect();
    let chains: Vec<&[Buf]> = bufs.iter().map(|b| &b[..]).collect();
    drv.post(&chains);
    dev.process_rx(&mem, &mut q).unwrap();
    // 30012 bytes with the header: eight buffers, the last partly.
    assert_eq!(drv.used_idx(), 8);
    assert_eq!(
        header(&mem, BUF),
        NetHeader {
            num_buffers: 8,
            ..SEGMENT
        }
    );
    assert_eq!(dev.counters().rx_frames, 1);
}

/// The folded ones' complement sum of `bytes` (RFC 1071): 0xffff over a region whose
/// checksum is right.
fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[test]
fn a_partial_checksum_is_finished_for_a_driver_that_does_not_take_them() {
    let mem = memory();
    let no_guest_offloads = VIRTIO_NET_F_GUEST_CSUM
        | VIRTIO_NET_F_GUEST_TSO4
        | VIRTIO_NET_F_GUEST_TSO6
        | VIRTIO_NET_F_GUEST_ECN;
    let mut dev = offloading_device(|offered| offered & !no_guest_offloads);
    // An odd length, so the last byte is summed alone; the field holds some pseudo-header sum.
    let mut data = frame(501);
    data[50..52].copy_from_slice(&0x1234u16.to_be_bytes());
    let partial = NetHeader {
        gso_type: 0,
        gso_size: 0,
        hdr_len: 0,
        ..SEGMENT
    };
    dev.backend().to_guest.push_back(data.clone());
    dev.backend().to_guest_headers.push_back(partial);
    // And a segment, which this driver cannot take.
    dev.backend().to_guest.push_back(frame(3000));
    dev.backend().to_guest_headers.push_back(SEGMENT);
    let (mut drv, mut q) = Driver::new(&mem);
    drv.post(&[&[(BUF, 2048, true)], &[(BUF + 0x1000, 2048, true)]]);
    dev.process_rx(&mem, &mut q).unwrap();
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(
        header(&mem, BUF),
        NetHeader {
            num_buffers: 1,
            ..NetHeader::default()
        }
    );
    let mut back = vec![0u8; data.len()];
    mem.read_slice(&mut back, GuestAddress(BUF + HEADER_LEN as u64))
        .unwrap();
    assert_eq!(back[..50], data[..50]);
    assert_eq!(back[52..], data[52..]);
    // The receiver adds the pseudo-header's sum (what the field held) to the region's.
    let with_pseudo = u32::from(ones_sum(&back[34..])) + 0x1234;
    let folded = (with_pseudo & 0xffff) + (with_pseudo >> 16);
    assert_eq!(folded, 0xffff, "the finished checksum checks");
    let c = dev.counters();
    assert_eq!((c.rx_checksums_finished, c.rx_dropped.offload), (1, 1));
}

#[test]
fn hostile_headers_from_the_host_are_dropped_and_counted() {
    let mem = memory();
    let mut dev = offloading_device(|offered| offered);
    let bad = [
        NetHeader {
            flags: 0x40,
            ..NetHeader::default()
        },
        NetHeader {
            csum_start: 1000,
            ..SEGMENT
        },
        NetHeader {
            gso_size: 0,
            ..SEGMENT
        },
        NetHeader {
            gso_type: 3, // UDP fragments: not offered
            ..SEGMENT
        },
    ];
    for h in bad {
        dev.backend().to_guest.push_back(frame(200));
        dev.backend().to_guest_headers.push_back(h);
    }
    // Longer than the MTU without being a segment.
    dev.backend().to_guest.push_back(frame(3000));
    let (mut drv, mut q) = Driver::new(&mem);
    drv.post(&[&[(BUF, 4096, true)]]);
    dev.process_rx(&mem, &mut q).unwrap();
    assert_eq!(drv.used_idx(), 0);
    let d = dev.counters().rx_dropped;
    assert_eq!((d.malformed, d.offload, d.oversized), (3, 1, 1));
}

/// A fuzz find: fields that mean nothing under the header's flags and type (checksum fields
/// without NEEDS_CSUM, segment fields without a segment type) went to the back end as the
/// driver wrote them. They are now zero, as is a header to a back end without headers.
#[test]
fn only_the_meaningful_header_fields_reach_the_back_end() {
    let mem = memory();
    let stray = NetHeader {
        hdr_len: 4,
        gso_size: 7,
        csum_start: 9472,
        csum_offset: 9472,
        num_buffers: 3,
        ..NetHeader::default()
    };
    for headers in [true, false] {
        let link = MemLink {
            headers,
            ..MemLink::default()
        };
        let mut dev = VirtioNet::new(link, MAC, 1500).unwrap();
        dev.set_acked_features(dev.features());
        let mut bytes = stray.to_bytes().to_vec();
        bytes.extend_from_slice(&frame(60));
        mem.write_slice(&bytes, GuestAddress(BUF)).unwrap();
        let (mut drv, mut q) = Driver::new(&mem);
        drv.post(&[&[(BUF, bytes.len() as u32, false)]]);
        dev.process_tx(&mem, &mut q).unwrap();
        assert_eq!(
            dev.backend().from_guest_headers,
            vec![NetHeader::default()],
            "headers: {headers}"
        );
    }
}
