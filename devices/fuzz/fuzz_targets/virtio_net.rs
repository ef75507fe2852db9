//! A guest (or vhost-user front end) that writes anything into the memory a virtio-net queue
//! pair lives in: descriptor tables, available rings and buffers are all fuzz bytes, and the
//! queues' size, the negotiated features and the frames the host sends too. Processing must
//! end (loops bounded), never panic or touch memory outside the guest's 64 KiB, send only
//! frames within the MTU (or TCP segments within 64 KiB, when a back end carrying headers
//! and segmentation were negotiated), and keep every chain it takes on the used ring
//! (nothing in flight between calls, which is what lets the service restart). With a back
//! end that carries headers, the host's headers are fuzz bytes too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pv_devices::virtio::net::MacAddress;
use pv_devices::virtio::net::MemLink;
use pv_devices::virtio::net::NetHeader;
use pv_devices::virtio::net::VirtioNet;
use pv_devices::virtio::net::ETH_HLEN;
use pv_devices::virtio::net::GSO_FRAME_LIMIT;
use pv_devices::virtio::net::HEADER_LEN;
use pv_devices::virtio::net::OFFLOAD_FEATURES;
use pv_devices::virtio::net::VIRTIO_NET_HDR_GSO_NONE;
use pv_devices::virtio::net::VIRTIO_NET_F_MRG_RXBUF;
use pv_devices::virtio::net::VIRTIO_NET_F_MTU;
use pv_devices::virtio::VIRTIO_F_VERSION_1;
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::Bytes;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;

const MEMORY: usize = 64 << 10;

/// Where the queues' rings sit: both available rings and the descriptor table they share in
/// the first bytes the fuzzer writes (overlapping, as a hostile guest may lay them out), the
/// used rings, which only the device writes, further on.
const RX_AVAIL: u32 = 0;
const TX_AVAIL: u32 = 0x10;
const TABLE: u32 = 0x100;
const RX_USED: u32 = 0x8000;
const TX_USED: u32 = 0xc000;

fn queue(
    mem: &GuestMemoryMmap,
    size: u16,
    avail: u32,
    used: u32,
    event_idx: bool,
) -> Option<Queue> {
    let mut queue = Queue::new(size).ok()?;
    queue.set_size(size);
    queue.set_ready(true);
    queue.set_event_idx(event_idx);
    queue.set_desc_table_address(Some(TABLE), Some(0));
    queue.set_avail_ring_address(Some(avail), Some(0));
    queue.set_used_ring_address(Some(used), Some(0));
    queue.is_valid(mem).then_some(queue)
}

fuzz_target!(|data: &[u8]| {
    let Some((&[size, knobs, frames], image)) = data.split_first_chunk::<3>() else {
        return;
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
    let n = image.len().min(MEMORY);
    mem.write_slice(&image[..n], GuestAddress(0)).unwrap();
    // Queue size a power of two up to 256.
    let size = 1u16 << (size % 9);
    let event_idx = knobs & 1 != 0;
    let (Some(mut rx), Some(mut tx)) = (
        queue(&mem, size, RX_AVAIL, RX_USED, event_idx),
        queue(&mem, size, TX_AVAIL, TX_USED, event_idx),
    ) else {
        return;
    };
    let mtu = if knobs & 2 != 0 { 1500 } else { 9000 };
    let link = MemLink {
        headers: knobs & 16 != 0,
        ..MemLink::default()
    };
    let mut dev = VirtioNet::new(link, MacAddress([2, 0, 0, 0, 0, 1]), mtu).unwrap();
    let mut features = VIRTIO_NET_F_MTU;
    if knobs & 16 != 0 {
        // Any subset of the offloads, from the image's first bytes.
        let mut bits = [0u8; 8];
        let k = image.len().min(8);
        bits[..k].copy_from_slice(&image[..k]);
        features |= u64::from_le_bytes(bits) & OFFLOAD_FEATURES;
    }
    if knobs & 4 != 0 {
        features |= VIRTIO_F_VERSION_1;
    }
    if knobs & 8 != 0 {
        features |= VIRTIO_NET_F_MRG_RXBUF;
    }
    dev.set_acked_features(features);
    let max = dev.max_frame();
    // Frames from the host: lengths around the interesting edges, taken from the fuzz bytes.
    for i in 0..frames % 8 {
        let len = match (frames >> 3).wrapping_add(i) % 5 {
            0 => ETH_HLEN - 1,
            1 => 60,
            2 => 1514,
            3 => max,
            _ => max + 1,
        };
        dev.backend().to_guest.push_back(vec![i; len]);
        // The host's header for it: fuzz bytes from the image (all zero past its end).
        let mut header = [0u8; HEADER_LEN];
        let at = (usize::from(i) * HEADER_LEN + 0x20).min(image.len());
        let k = (image.len() - at).min(HEADER_LEN);
        header[..k].copy_from_slice(&image[at..at + k]);
        dev.backend()
            .to_guest_headers
            .push_back(NetHeader::from_bytes(&header));
    }
    if dev.process_tx(&mem, &mut tx).is_ok() {
        assert_eq!(
            tx.next_avail(),
            tx.next_used(),
            "a transmit chain left in flight"
        );
    }
    let link = dev.backend_ref();
    for (frame, header) in link.from_guest.iter().zip(&link.from_guest_headers) {
        let limit = if header.gso_type & 0x7f == VIRTIO_NET_HDR_GSO_NONE {
            max
        } else {
            GSO_FRAME_LIMIT
        };
        assert!(
            (ETH_HLEN..=limit).contains(&frame.len()),
            "sent {} bytes with {header:?}",
            frame.len()
        );
        assert!(
            link.headers || *header == NetHeader::default(),
            "a header to a back end without: {header:?}"
        );
    }
    for _ in 0..3 {
        if dev.process_rx(&mem, &mut rx).is_err() {
            break;
        }
        assert_eq!(
            rx.next_avail(),
            rx.next_used(),
            "a receive chain left in flight"
        );
    }
    let c = *dev.counters();
    let offered = u64::from(frames % 8);
    let waiting = u64::from(dev.has_waiting_frame());
    let unread = dev.backend().to_guest.len() as u64;
    assert_eq!(
        c.rx_frames + c.rx_dropped.total() + waiting + unread,
        offered,
        "every frame from the host is delivered, dropped, waiting or unread: {c:?}"
    );
});
