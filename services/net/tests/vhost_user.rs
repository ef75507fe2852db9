//! The virtio-net device through the shared vhost-user transport, driven by rust-vmm's front
//! end (what QEMU speaks) in one process: a frame the guest transmits reaches the host side,
//! and a frame from the host side lands in the guest's receive buffer, with the in-service
//! responder and with a TAP descriptor (a `SOCK_SEQPACKET` socket pair standing in for it).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::Mutex;

use pv_devices::virtio::net::MacAddress;
use pv_devices::virtio::net::VirtioNet;
use pv_devices::virtio::net::HEADER_LEN;
use pv_net::device::HostLink;
use pv_net::device::NetDevice;
use pv_net::responder::Responder;
use pv_net::tap::TapLink;
use pv_vhost_user::Backend;
use pv_vhost_user::VirtioDevice;
use vhost::vhost_user::BackendReqHandler;
use vhost::vhost_user::Frontend;
use vhost::vhost_user::VhostUserFrontend;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::VhostBackend;
use vhost::VhostUserMemoryRegionInfo;
use vhost::VringConfigData;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::mmap::MmapRegion;
use vm_memory::Address;
use vm_memory::Bytes;
use vm_memory::FileOffset;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;
use vm_memory::GuestRegionMmap;
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 4 << 20;
/// Where the front end says it mapped guest memory (only differences matter).
const USER: u64 = 0x7f00_0000_0000;
const QSIZE: u16 = 16;
const RX_RING: u64 = 0;
const TX_RING: u64 = 0x8000;
const RX_BUF: u64 = 0x10_0000;
const TX_BUF: u64 = 0x20_0000;
const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const HOST_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x35, 0x02]);

type Device = NetDevice<HostLink>;

struct Guest {
    file: File,
    mem: GuestMemoryMmap,
}

fn guest() -> Guest {
    let file = File::from(ipc_defs::hosted::sys::memfd("test-guest", MEM).unwrap());
    let region =
        MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), MEM as usize).unwrap();
    let mem =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap();
    Guest { file, mem }
}

fn device(link: HostLink) -> Device {
    NetDevice::new(VirtioNet::new(link, MacAddress(GUEST_MAC), 1500).unwrap())
}

/// A back end serving one end of a socket pair on a thread; the front end on the other.
fn connect(backend: &Arc<Mutex<Backend<Device>>>) -> Frontend {
    let (a, b) = UnixStream::pair().unwrap();
    let mut handler = BackendReqHandler::from_stream(a, backend.clone());
    std::thread::spawn(move || while handler.handle_request().is_ok() {});
    Frontend::from_stream(b, 2)
}

struct Rings<'a> {
    rx: MockSplitQueue<'a, GuestMemoryMmap>,
    tx: MockSplitQueue<'a, GuestMemoryMmap>,
    _events: Vec<EventFd>,
    calls: Vec<EventFd>,
}

/// QEMU's start of a vhost-user-net device: features, protocol features (no in-flight record
/// is offered: the device keeps nothing in flight), memory, both rings.
fn start<'a>(fe: &mut Frontend, g: &'a Guest) -> Rings<'a> {
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    assert!(!protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    fe.set_protocol_features(protocol).unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: USER,
        mmap_offset: 0,
        mmap_handle: g.file.as_raw_fd(),
    }])
    .unwrap();
    let rx = MockSplitQueue::create(&g.mem, GuestAddress(RX_RING), QSIZE);
    let tx = MockSplitQueue::create(&g.mem, GuestAddress(TX_RING), QSIZE);
    let mut events = Vec::new();
    let mut calls = Vec::new();
    for (i, q) in [&rx, &tx].into_iter().enumerate() {
        fe.set_vring_num(i, QSIZE).unwrap();
        fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: USER + q.desc_table_addr().0,
                used_ring_addr: USER + q.used_addr().0,
                avail_ring_addr: USER + q.avail_addr().0,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(i, 0).unwrap();
        let kick = EventFd::new(0).unwrap();
        // Non-blocking: a test reads it to see whether the device interrupted.
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_kick(i, &kick).unwrap();
        fe.set_vring_call(i, &call).unwrap();
        fe.set_vring_enable(i, true).unwrap();
        events.push(kick);
        calls.push(call);
    }
    // A reply-bearing request: every message before it has been handled.
    fe.get_queue_num().unwrap();
    Rings {
        rx,
        tx,
        _events: events,
        calls,
    }
}

impl Rings<'_> {
    fn post_receive_buffer(&self) {
        self.rx
            .build_desc_chain(&[RawDescriptor::from(Descriptor::new(RX_BUF, 2048, 2, 0))])
            .unwrap();
    }

    /// The guest transmits `frame` behind a zero header.
    fn transmit(&self, g: &Guest, frame: &[u8]) {
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes.extend_from_slice(frame);
        g.mem.write_slice(&bytes, GuestAddress(TX_BUF)).unwrap();
        self.tx
            .build_desc_chain(&[RawDescriptor::from(Descriptor::new(
                TX_BUF,
                bytes.len() as u32,
                0,
                0,
            ))])
            .unwrap();
    }

    /// The used ring's index and its first entry's length, of ring `q`.
    fn used(g: &Guest, q: &MockSplitQueue<GuestMemoryMmap>) -> (u16, u32) {
        let idx = g.mem.read_obj(q.used_addr().unchecked_add(2)).unwrap();
        let len = g.mem.read_obj(q.used_addr().unchecked_add(8)).unwrap();
        (idx, len)
    }

    /// The frame the device put in the receive buffer (after the header).
    fn received(g: &Guest, len: u32) -> Vec<u8> {
        let mut v = vec![0u8; len as usize];
        g.mem.read_slice(&mut v, GuestAddress(RX_BUF)).unwrap();
        let num_buffers = u16::from_le_bytes([v[10], v[11]]);
        assert_eq!(num_buffers, 1);
        v.split_off(HEADER_LEN)
    }
}

/// Serves until nothing more is left to do at once (as the service's loop does).
fn serve(backend: &Mutex<Backend<Device>>) {
    for _ in 0..10 {
        if !backend.lock().unwrap().serve_ready() {
            return;
        }
    }
    panic!("the device kept saying it had more work");
}

fn arp_request_for(target: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[10, 0, 2, 15]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f
}

#[test]
fn a_transmitted_arp_request_comes_back_as_the_responders_reply_in_a_receive_buffer() {
    let g = guest();
    let link = HostLink::Responder(Responder::new(HOST_MAC, [10, 0, 2, 2].into()));
    let backend = Arc::new(Mutex::new(Backend::new("t", device(link))));
    let mut fe = connect(&backend);
    let rings = start(&mut fe, &g);
    rings.post_receive_buffer();
    rings.transmit(&g, &arp_request_for([10, 0, 2, 2]));
    serve(&backend);
    assert_eq!(Rings::used(&g, &rings.tx), (1, 0), "the frame was taken");
    let (idx, len) = Rings::used(&g, &rings.rx);
    assert_eq!(idx, 1, "one frame received");
    let reply = Rings::received(&g, len);
    assert_eq!(reply.len(), 42);
    assert_eq!(&reply[..6], &GUEST_MAC, "to the guest");
    assert_eq!(&reply[6..12], &HOST_MAC.0, "from the responder");
    assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
    assert_eq!(&reply[28..32], &[10, 0, 2, 2]);
    for call in &rings.calls {
        assert!(call.read().unwrap() >= 1, "both queues interrupted");
    }
    let mut b = backend.lock().unwrap();
    let c = *b.device().counters();
    assert_eq!((c.tx_frames, c.rx_frames), (1, 1));
    assert_eq!(c.tx_dropped.total() + c.rx_dropped.total(), 0);
}

/// A connected `SOCK_SEQPACKET` pair, non-blocking: one frame per message, as a TAP.
fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array it is given, which has room
    // for two; each is then owned by exactly one OwnedFd.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

#[test]
fn frames_cross_a_tap_descriptor_both_ways_and_a_full_one_holds_the_guests_frame() {
    let g = guest();
    let (ours, host) = seqpacket_pair();
    let host = UnixStream::from(host);
    // Our side again, to fill the host's queue with (the same non-blocking socket).
    let filler = UnixStream::from(ours.try_clone().unwrap());
    let backend = Arc::new(Mutex::new(Backend::new(
        "t",
        device(HostLink::Tap(TapLink::new(ours, false).unwrap())),
    )));
    let mut fe = connect(&backend);
    let rings = start(&mut fe, &g);
    serve(&backend);
    assert_eq!(
        backend.lock().unwrap().device_ref().wake_fds().len(),
        1,
        "the TAP is polled once the receive queue runs"
    );
    // Out: the guest's frame arrives whole, as one message.
    let out = arp_request_for([10, 0, 2, 9]);
    rings.transmit(&g, &out);
    serve(&backend);
    let mut buf = [0u8; 2048];
    let n = std::io::Read::read(&mut &host, &mut buf).unwrap();
    assert_eq!(&buf[..n], &out[..]);
    // In: a frame from the host lands in the guest's buffer.
    let mut inbound = GUEST_MAC.to_vec();
    inbound.extend_from_slice(&HOST_MAC.0);
    inbound.extend_from_slice(&[0x88, 0xb5]);
    inbound.extend(0..100u8);
    std::io::Write::write_all(&mut &host, &inbound).unwrap();
    rings.post_receive_buffer();
    serve(&backend);
    let (idx, len) = Rings::used(&g, &rings.rx);
    assert_eq!(idx, 1);
    assert_eq!(Rings::received(&g, len), inbound);
    // The host stops reading: once its socket is full the guest's next frame stays on the
    // ring, and goes out when there is room again.
    let mut queued = 0;
    while std::io::Write::write(&mut &filler, &out).is_ok() {
        queued += 1;
    }
    assert!(queued > 0);
    let (before, _) = Rings::used(&g, &rings.tx);
    rings.transmit(&g, &out);
    serve(&backend);
    assert_eq!(
        Rings::used(&g, &rings.tx).0,
        before,
        "held while the TAP is full"
    );
    assert!(backend.lock().unwrap().device_ref().wait_limit().is_some());
    for _ in 0..queued {
        std::io::Read::read(&mut &host, &mut buf).unwrap();
    }
    serve(&backend);
    assert_eq!(
        Rings::used(&g, &rings.tx).0,
        before.wrapping_add(1),
        "sent once there was room"
    );
    assert_eq!(
        std::io::Read::read(&mut &host, &mut buf).unwrap(),
        out.len()
    );
}

/// A frame from the host to the guest carrying its number `i`.
fn numbered(i: u32) -> Vec<u8> {
    let mut f = GUEST_MAC.to_vec();
    f.extend_from_slice(&HOST_MAC.0);
    f.extend_from_slice(&[0x88, 0xb5]);
    f.extend_from_slice(&i.to_be_bytes());
    // Full-sized, and every byte depends on the number: a mixed-up frame shows.
    f.extend((0..1496u32).map(|k| (k.wrapping_mul(31) ^ i) as u8));
    f
}

/// A guest that posts no receive buffers while the host floods its TAP: the device reads
/// one frame and waits with it, reading nothing more (its memory stays one frame); the
/// host's queue fills and refuses the rest, which the host counts (a TAP's kernel queue drops
/// and counts them the same way, in its tx_dropped); nothing reaches the guest meanwhile.
/// Once the guest posts buffers every frame the host queued arrives, in order and whole.
#[test]
fn a_guest_without_receive_buffers_under_a_host_flood_holds_one_frame_and_loses_none_queued() {
    let g = guest();
    let (ours, host) = seqpacket_pair();
    let host = UnixStream::from(host);
    let backend = Arc::new(Mutex::new(Backend::new(
        "t",
        device(HostLink::Tap(TapLink::new(ours, false).unwrap())),
    )));
    let mut fe = connect(&backend);
    let rings = start(&mut fe, &g);
    serve(&backend);
    let (mut queued, mut refused) = (0u32, 0u32);
    for _ in 0..20_000 {
        match std::io::Write::write(&mut &host, &numbered(queued)) {
            Ok(_) => queued += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                refused += 1;
                serve(&backend);
            }
            Err(e) => panic!("{e}"),
        }
    }
    serve(&backend);
    assert!(refused > 0, "the host's queue filled");
    assert_eq!(Rings::used(&g, &rings.rx).0, 0, "nothing reached the guest");
    {
        let mut b = backend.lock().unwrap();
        let c = *b.device().counters();
        assert_eq!(c.rx_frames, 0);
        assert!(c.rx_waits >= 1, "{c:?}");
        assert!(b.device().has_waiting_frame(), "one frame read and held");
    }
    // The guest posts buffers one at a time: each frame queued arrives in turn. (Written by
    // hand: the mock queue refuses an available index more than a ring ahead of 0.)
    let desc = rings.rx.desc_table_addr();
    g.mem.write_obj(RX_BUF, desc).unwrap();
    g.mem.write_obj(2048u32, desc.unchecked_add(8)).unwrap();
    g.mem.write_obj(2u16, desc.unchecked_add(12)).unwrap(); // device-writable
    let avail = rings.rx.avail_addr();
    let mut delivered = 0u32;
    loop {
        let next: u16 = g.mem.read_obj(avail.unchecked_add(2)).unwrap();
        let slot = 4 + 2 * u64::from(next % QSIZE);
        g.mem.write_obj(0u16, avail.unchecked_add(slot)).unwrap();
        g.mem
            .write_obj(next.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
        serve(&backend);
        let idx: u16 = g
            .mem
            .read_obj(rings.rx.used_addr().unchecked_add(2))
            .unwrap();
        if idx == delivered as u16 {
            break;
        }
        let slot = u64::from(delivered % u32::from(QSIZE));
        let len: u32 = g
            .mem
            .read_obj(rings.rx.used_addr().unchecked_add(4 + 8 * slot + 4))
            .unwrap();
        assert_eq!(
            Rings::received(&g, len),
            numbered(delivered),
            "frame {delivered}"
        );
        delivered += 1;
    }
    assert_eq!(delivered, queued, "every frame the host queued, none lost");
    eprintln!("{queued} frames queued and delivered in order, {refused} refused by the full queue");
}

/// A ring that starts serving interrupts its driver once, with no work done: a back end
/// killed between publishing used entries and signalling them left a driver waiting for an
/// interrupt; without this its successor never sends one (the entries are already past the
/// driver's `used_event`), and the guest's NIC stays dead until the next restart (`bench
/// net` saw one restart in ten pass no packet for 30 s). Nothing more after that without work.
#[test]
fn a_ring_that_starts_serving_interrupts_its_driver_once() {
    let g = guest();
    let link = HostLink::Responder(Responder::new(HOST_MAC, [10, 0, 2, 2].into()));
    let backend = Arc::new(Mutex::new(Backend::new("t", device(link))));
    let mut fe = connect(&backend);
    let rings = start(&mut fe, &g);
    serve(&backend);
    for (i, call) in rings.calls.iter().enumerate() {
        assert_eq!(call.read().ok(), Some(1), "ring {i} interrupted once");
    }
    serve(&backend);
    for (i, call) in rings.calls.iter().enumerate() {
        assert!(
            call.read().is_err(),
            "ring {i}: no second interrupt without work"
        );
    }
}
