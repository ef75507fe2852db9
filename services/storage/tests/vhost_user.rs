//! The back end against rust-vmm's vhost-user front end (what QEMU speaks), in one process:
//! the handshake, a write and a read through a virtqueue in shared memory, the in-flight
//! record handed to a second back end, and messages a hostile front end could send; then
//! `pv-storage`'s loop (the shared transport's, `pv_vhost_user::front_end`) over several devices, with front ends that stop half-way through a
//! message or never read their replies.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use pv_devices::block::raw::RawDisk;
use pv_devices::block::MemStore;
use pv_devices::block::BLOCK;
use pv_devices::virtio::blk::VirtioBlk;
use pv_storage::vhost::Device;
use pv_vhost_user::front_end::serve_once;
use pv_vhost_user::front_end::Export;
use pv_vhost_user::inflight::Record;
use pv_vhost_user::Backend;
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::message::MAX_MSG_SIZE;
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
use vmm_sys_util::epoll::ControlOperation;
use vmm_sys_util::epoll::Epoll;
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const MEM: u64 = 4 << 20;
/// Where the front end says it mapped guest memory (any value: only differences matter).
const USER: u64 = 0x7f00_0000_0000;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
const QSIZE: u16 = 16;

struct Guest {
    file: File,
    mem: GuestMemoryMmap,
}

fn guest() -> Guest {
    let fd = ipc_defs::hosted::sys::memfd("test-guest", MEM).unwrap();
    let file = File::from(fd);
    let region =
        MmapRegion::from_file(FileOffset::new(file.try_clone().unwrap(), 0), MEM as usize).unwrap();
    let mem =
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap();
    Guest { file, mem }
}

fn disk() -> Device {
    let disk = RawDisk::new(MemStore {
        bytes: vec![0; 64 * BLOCK],
    })
    .unwrap();
    Device::Blk(VirtioBlk::new(Box::new(disk), "test"))
}

/// A back end serving one end of a socket pair on a thread; the front end on the other.
fn connect(backend: &Arc<Mutex<Backend<Device>>>) -> (Frontend, std::thread::JoinHandle<()>) {
    let (a, b) = UnixStream::pair().unwrap();
    let mut handler = BackendReqHandler::from_stream(a, backend.clone());
    let thread = std::thread::spawn(move || while handler.handle_request().is_ok() {});
    (Frontend::from_stream(b, 8), thread)
}

struct Rings {
    kick: EventFd,
    call: EventFd,
}

/// QEMU's handshake: features and protocol features.
fn handshake(fe: &mut Frontend) {
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    assert!(protocol.contains(VhostUserProtocolFeatures::INFLIGHT_SHMFD));
    fe.set_protocol_features(protocol).unwrap();
}

/// QEMU's start sequence for ring 0 over `guest`'s memory, with the in-flight record.
fn start(
    fe: &mut Frontend,
    g: &Guest,
    vq: &MockSplitQueue<GuestMemoryMmap>,
    inflight: Option<(&VhostUserInflight, &File)>,
) -> Rings {
    if let Some((info, file)) = inflight {
        fe.set_inflight_fd(info, file.as_raw_fd()).unwrap();
    }
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM,
        userspace_addr: USER,
        mmap_offset: 0,
        mmap_handle: g.file.as_raw_fd(),
    }])
    .unwrap();
    fe.set_vring_num(0, QSIZE).unwrap();
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: USER + vq.desc_table_addr().0,
            used_ring_addr: USER + vq.used_addr().0,
            avail_ring_addr: USER + vq.avail_addr().0,
            log_addr: None,
        },
    )
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    let rings = Rings {
        kick: EventFd::new(0).unwrap(),
        call: EventFd::new(0).unwrap(),
    };
    fe.set_vring_kick(0, &rings.kick).unwrap();
    fe.set_vring_call(0, &rings.call).unwrap();
    fe.set_vring_enable(0, true).unwrap();
    // A reply-bearing request: every message before it has been handled.
    fe.get_queue_num().unwrap();
    rings
}

fn request(g: &Guest, vq: &MockSplitQueue<GuestMemoryMmap>, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    g.mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
    g.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let write = if kind == 0 { 2 } else { 0 };
    vq.build_desc_chain(&[
        RawDescriptor::from(Descriptor::new(HEADER, 16, 1, 0)),
        RawDescriptor::from(Descriptor::new(DATA, BLOCK as u32, 1 | write, 0)),
        RawDescriptor::from(Descriptor::new(STATUS, 1, 2, 0)),
    ])
    .unwrap();
}

fn used_idx(g: &Guest, vq: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
    g.mem.read_obj(vq.used_addr().unchecked_add(2)).unwrap()
}

/// QEMU's GET_INFLIGHT_FD for the one ring of QSIZE descriptors: the back end's record.
fn record_for_one_ring(fe: &mut Frontend) -> (VhostUserInflight, File) {
    let info = VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 1,
        queue_size: QSIZE,
    };
    fe.get_inflight_fd(&info).unwrap()
}

#[test]
fn a_front_end_writes_and_reads_a_block_through_shared_memory() {
    let g = guest();
    let vq = MockSplitQueue::new(&g.mem, QSIZE);
    let backend = Arc::new(Mutex::new(Backend::new("t", disk())));
    let (mut fe, _t) = connect(&backend);
    handshake(&mut fe);
    let (inflight, record) = record_for_one_ring(&mut fe);
    let rings = start(&mut fe, &g, &vq, Some((&inflight, &record)));
    g.mem
        .write_slice(&[0x42; BLOCK], GuestAddress(DATA))
        .unwrap();
    request(&g, &vq, 1, 8);
    rings.kick.write(1).unwrap();
    backend.lock().unwrap().serve_ready();
    assert_eq!(used_idx(&g, &vq), 1);
    assert_eq!(
        g.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        0,
        "write status OK"
    );
    assert_eq!(rings.call.read().unwrap(), 1, "the driver was interrupted");
    g.mem.write_slice(&[0; BLOCK], GuestAddress(DATA)).unwrap();
    request(&g, &vq, 0, 8);
    backend.lock().unwrap().serve_ready();
    assert_eq!(used_idx(&g, &vq), 2);
    let mut back = [0u8; BLOCK];
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|b| *b == 0x42), "the block read back");
    let counts = backend.lock().unwrap().counts;
    assert_eq!(
        (counts.requests, counts.failed, counts.resubmitted),
        (2, 0, 0)
    );
}

#[test]
fn a_second_back_end_answers_exactly_the_request_the_first_left_in_flight() {
    let g = guest();
    let vq = MockSplitQueue::new(&g.mem, QSIZE);
    let first = Arc::new(Mutex::new(Backend::new("t", disk())));
    let (mut fe, t) = connect(&first);
    handshake(&mut fe);
    let (inflight, record_file) = record_for_one_ring(&mut fe);
    let _rings = start(&mut fe, &g, &vq, Some((&inflight, &record_file)));
    // One request answered...
    g.mem
        .write_slice(&[0x11; BLOCK], GuestAddress(DATA))
        .unwrap();
    request(&g, &vq, 1, 8);
    first.lock().unwrap().serve_ready();
    assert_eq!(used_idx(&g, &vq), 1);
    // ...then a write the first back end took off the ring and died in (as the record
    // says when a process is killed between taking a request and answering it).
    g.mem
        .write_slice(&[0x22; BLOCK], GuestAddress(DATA))
        .unwrap();
    request(&g, &vq, 1, 16);
    let head: u16 = g
        .mem
        .read_obj(vq.avail_addr().unchecked_add(4 + 2))
        .unwrap();
    {
        let region = MmapRegion::from_file(
            FileOffset::new(record_file.try_clone().unwrap(), 0),
            inflight.mmap_size as usize,
        )
        .unwrap();
        let mem =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        let record = Record::new(mem, 1, QSIZE, 8).unwrap();
        record.start(0, head, 99).unwrap();
    }
    drop(fe);
    t.join().unwrap();
    drop(first);
    // The front end reconnects to a new process and hands the record back; QEMU, which
    // could not ask the dead back end, restores the ring to its used index.
    let second = Arc::new(Mutex::new(Backend::new("t", disk())));
    let (mut fe, _t) = connect(&second);
    handshake(&mut fe);
    let _rings = start(&mut fe, &g, &vq, Some((&inflight, &record_file)));
    second.lock().unwrap().serve_ready();
    assert_eq!(used_idx(&g, &vq), 2, "the request in flight was answered");
    let counts = second.lock().unwrap().counts;
    assert_eq!(
        (counts.requests, counts.resubmitted),
        (1, 1),
        "exactly the one in flight, once"
    );
    // Its data reached the (new back end's) disk.
    g.mem.write_slice(&[0; BLOCK], GuestAddress(DATA)).unwrap();
    request(&g, &vq, 0, 16);
    second.lock().unwrap().serve_ready();
    let mut back = [0u8; BLOCK];
    g.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert!(back.iter().all(|b| *b == 0x22));
}

#[test]
fn hostile_front_end_messages_are_refused_and_the_back_end_keeps_working() {
    let g = guest();
    let backend = Arc::new(Mutex::new(Backend::new("t", disk())));
    // Each refusal closes nothing on our side of the handler but the message; the handler
    // thread stops at the first error, so each case gets its own connection.
    let case = |f: &dyn Fn(&mut Frontend) -> bool| {
        let (mut fe, t) = connect(&backend);
        handshake(&mut fe);
        // Refused: the message itself fails, or the back end hung up on it.
        let refused = f(&mut fe) || fe.get_queue_num().is_err();
        drop(fe);
        t.join().unwrap();
        backend.lock().unwrap().disconnected();
        refused
    };
    let region = |size: u64, offset: u64, user: u64| VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: size,
        userspace_addr: user,
        mmap_offset: offset,
        mmap_handle: g.file.as_raw_fd(),
    };
    // A region larger than its file (touching it would fault).
    assert!(case(&|fe| fe
        .set_mem_table(&[region(MEM * 2, 0, USER)])
        .is_err()));
    assert!(case(&|fe| fe
        .set_mem_table(&[region(MEM, 4096, USER)])
        .is_err()));
    // Two regions at the same guest address.
    assert!(case(&|fe| fe
        .set_mem_table(&[
            region(MEM / 2, 0, USER),
            region(MEM / 2, MEM / 2, USER + MEM)
        ])
        .is_err()));
    // Ring sizes and indexes out of range; ring addresses outside the shared memory.
    assert!(case(&|fe| fe.set_vring_num(0, 3).is_err()));
    assert!(case(&|fe| fe.set_vring_num(0, 4096).is_err()));
    assert!(case(&|fe| {
        fe.set_mem_table(&[region(MEM, 0, USER)]).unwrap();
        let bad = VringConfigData {
            queue_max_size: 16,
            queue_size: 16,
            flags: 0,
            desc_table_addr: 0x1000,
            used_ring_addr: USER,
            avail_ring_addr: USER,
            log_addr: None,
        };
        fe.set_vring_addr(0, &bad).is_err()
    }));
    // In-flight records: too many queues, a bad queue size, a record smaller than it says.
    assert!(case(&|fe| fe
        .get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 100,
            queue_size: 16
        })
        .is_err()));
    assert!(case(&|fe| fe
        .get_inflight_fd(&VhostUserInflight {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues: 1,
            queue_size: 100
        })
        .is_err()));
    assert!(case(&|fe| {
        let small = File::from(ipc_defs::hosted::sys::memfd("small", 64).unwrap());
        fe.set_inflight_fd(
            &VhostUserInflight {
                mmap_size: 1 << 20,
                mmap_offset: 0,
                num_queues: 1,
                queue_size: 256,
            },
            small.as_raw_fd(),
        )
        .is_err()
    }));
    // Configuration bytes beyond the device's: the handler's error becomes the protocol's
    // empty reply (which rust-vmm's own front end waits past, so asked directly here).
    {
        use vhost::vhost_user::VhostUserBackendReqHandlerMut;
        let flags = vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE;
        let mut b = backend.lock().unwrap();
        assert!(b.get_config(250, 8, flags).is_err());
        assert_eq!(b.get_config(30, 32, flags).unwrap().len(), 32);
        assert!(b.get_config(u32::MAX, 8, flags).is_err());
        assert_eq!(b.get_config(0, 8, flags).unwrap().len(), 8);
    }
    // After all that, a well-behaved front end is served.
    let vq = MockSplitQueue::new(&g.mem, QSIZE);
    let (mut fe, _t) = connect(&backend);
    handshake(&mut fe);
    let _rings = start(&mut fe, &g, &vq, None);
    request(&g, &vq, 0, 0);
    backend.lock().unwrap().serve_ready();
    assert_eq!(used_idx(&g, &vq), 1);
}

#[test]
fn a_driver_that_announces_more_requests_than_its_ring_holds_stops_only_that_ring() {
    let g = guest();
    let vq = MockSplitQueue::new(&g.mem, QSIZE);
    let backend = Arc::new(Mutex::new(Backend::new("t", disk())));
    let (mut fe, _t) = connect(&backend);
    handshake(&mut fe);
    let _rings = start(&mut fe, &g, &vq, None);
    g.mem
        .write_obj(1000u16, vq.avail_addr().unchecked_add(2))
        .unwrap();
    assert!(!backend.lock().unwrap().serve_ready());
    assert_eq!(
        used_idx(&g, &vq),
        0,
        "nothing answered from a ring that lies"
    );
    assert_eq!(backend.lock().unwrap().counts.requests, 0);
}

#[test]
fn a_head_outside_the_ring_stops_it_before_the_in_flight_record_or_the_counts_change() {
    let g = guest();
    let vq = MockSplitQueue::new(&g.mem, QSIZE);
    // A record for two rings, with ring 0's head 6 in flight when its back end stopped.
    let first = Arc::new(Mutex::new(Backend::new("t", disk())));
    let (mut fe, t) = connect(&first);
    handshake(&mut fe);
    let info = VhostUserInflight {
        mmap_size: 0,
        mmap_offset: 0,
        num_queues: 2,
        queue_size: QSIZE,
    };
    let (inflight, record_file) = fe.get_inflight_fd(&info).unwrap();
    drop(fe);
    t.join().unwrap();
    let record_mem = || {
        let region = MmapRegion::from_file(
            FileOffset::new(record_file.try_clone().unwrap(), 0),
            inflight.mmap_size as usize,
        )
        .unwrap();
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap()
    };
    let record = Record::new(record_mem(), 2, QSIZE, 8).unwrap();
    record.prepare(0, QSIZE).unwrap();
    record.start(0, 6, 1).unwrap();
    // The driver's next request names descriptor 19 of a ring of 16: its entry in the
    // record would be ring 1's header.
    g.mem
        .write_obj(19u16, vq.avail_addr().unchecked_add(4))
        .unwrap();
    g.mem
        .write_obj(1u16, vq.avail_addr().unchecked_add(2))
        .unwrap();
    let second = Arc::new(Mutex::new(Backend::new("t", disk())));
    let (mut fe, _t) = connect(&second);
    handshake(&mut fe);
    let _rings = start(&mut fe, &g, &vq, Some((&inflight, &record_file)));
    assert!(!second.lock().unwrap().serve_ready());
    assert_eq!(used_idx(&g, &vq), 0, "nothing answered");
    assert_eq!(
        second.lock().unwrap().counts,
        Default::default(),
        "no request answered, so none resubmitted"
    );
    let ring1_part = pv_vhost_user::inflight::queue_bytes(QSIZE);
    let mut part = vec![0u8; ring1_part as usize];
    record_mem()
        .read_slice(&mut part, GuestAddress(ring1_part))
        .unwrap();
    assert!(part.iter().all(|b| *b == 0), "ring 1's part untouched");
}

/// Far longer than any step of these tests takes on a loaded machine: reached only when the
/// service hangs, which then fails the test instead of stalling the suite.
const HANG: Duration = Duration::from_secs(120);

/// Runs `f` on a thread of its own; a panic if it has not finished within [`HANG`].
fn within(f: impl FnOnce() + Send + 'static) {
    let (done, finished) = mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = done.send(());
    });
    match finished.recv_timeout(HANG) {
        Ok(()) => t.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(t.join().unwrap_err())
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("hung: the service stopped serving"),
    }
}

/// `pv-storage`'s loop ([`serve_once`]) on a thread, over one virtio-blk disk per name, each
/// on a listener of its own (as the microkernel binds them); stops when dropped.
struct Service {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
}

impl Service {
    fn start(names: &[&str]) -> Service {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pv-storage-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut exports: Vec<Export<Device>> = names
            .iter()
            .map(|name| Export {
                name: name.to_string(),
                listener: UnixListener::bind(dir.join(name)).unwrap(),
                backend: Arc::new(Mutex::new(Backend::new(name, disk()))),
                front_end: None,
            })
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // Not joined: a service that hangs must fail the test, not hold it.
        std::thread::spawn(move || {
            let mut more = false;
            while !stopped.load(Ordering::Relaxed) {
                let wait = if more {
                    Duration::ZERO
                } else {
                    Duration::from_millis(20)
                };
                more = serve_once(&mut exports, wait).unwrap();
            }
        });
        Service { dir, stop }
    }

    fn connect(&self, name: &str) -> UnixStream {
        UnixStream::connect(self.dir.join(name)).unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A well-behaved front end with its guest and ring 0 started.
struct Driver {
    _fe: Frontend,
    g: Guest,
    vq: MockSplitQueue<'static, GuestMemoryMmap>,
    rings: Rings,
    sector: u64,
}

impl Driver {
    fn connect(service: &Service, name: &str) -> Driver {
        let mut fe = Frontend::from_stream(service.connect(name), 8);
        handshake(&mut fe);
        let g = guest();
        // The queue is a view of the guest's memory (a mapping shared by its clones), kept
        // for the test's life.
        let vq = MockSplitQueue::new(Box::leak(Box::new(g.mem.clone())), QSIZE);
        let rings = start(&mut fe, &g, &vq, None);
        Driver {
            _fe: fe,
            g,
            vq,
            rings,
            sector: 0,
        }
    }

    /// Writes a block and reads it back through the service, each answered with an
    /// interrupt.
    fn round_trip(&mut self) {
        let fill = 0x40 + self.sector as u8;
        self.g
            .mem
            .write_slice(&[fill; BLOCK], GuestAddress(DATA))
            .unwrap();
        for kind in [1, 0] {
            let before = used_idx(&self.g, &self.vq);
            request(&self.g, &self.vq, kind, self.sector);
            self.rings.kick.write(1).unwrap();
            // The answer is awaited on the used index, not the interrupt: the mock queue lays
            // its used ring over the avail ring's used_event, so EVENT_IDX suppression would
            // read an answer's length there.
            while used_idx(&self.g, &self.vq) == before {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(
                self.g.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
                0,
                "request {kind} answered OK"
            );
            if kind == 1 {
                self.g
                    .mem
                    .write_slice(&[0; BLOCK], GuestAddress(DATA))
                    .unwrap();
            }
        }
        let mut back = [0u8; BLOCK];
        self.g
            .mem
            .read_slice(&mut back, GuestAddress(DATA))
            .unwrap();
        assert!(back.iter().all(|b| *b == fill), "the block read back");
        self.sector += 8;
    }
}

/// A raw vhost-user header: `request`, version 1, `size` bytes of body to follow.
fn header(request: FrontendReq, size: u32) -> Vec<u8> {
    [request as u32, 1, size]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// Waits until the service has closed its end of `s` (without reading what it sent).
fn wait_for_hang_up(s: &UnixStream) {
    let epoll = Epoll::new().unwrap();
    epoll
        .ctl(
            ControlOperation::Add,
            s.as_raw_fd(),
            EpollEvent::new(EventSet::READ_HANG_UP, 0),
        )
        .unwrap();
    let mut events = [EpollEvent::default()];
    while epoll.wait(-1, &mut events).unwrap() == 0 {}
}

#[test]
fn a_front_end_that_stops_mid_message_stalls_no_other_disk_and_is_dropped() {
    within(|| {
        let service = Service::start(&["hostile", "busy"]);
        let mut busy = Driver::connect(&service, "busy");
        let mut body = header(FrontendReq::SET_FEATURES, 8);
        body.extend_from_slice(&[0; 3]);
        let partial = [
            (
                "half a header",
                header(FrontendReq::GET_FEATURES, 0)[..6].to_vec(),
            ),
            ("a header and no body", header(FrontendReq::SET_FEATURES, 8)),
            ("3 of 8 body bytes", body),
        ];
        for (what, bytes) in partial {
            let mut hostile = service.connect("hostile");
            hostile.write_all(&bytes).unwrap();
            // The other disk is served while that message waits for the rest...
            busy.round_trip();
            // ...and the front end that sent it is dropped (the next one is accepted only
            // then), though it keeps its connection open.
            wait_for_hang_up(&hostile);
            eprintln!("dropped after {what}");
        }
        // Its disk serves the next front end.
        Driver::connect(&service, "hostile").round_trip();
        busy.round_trip();
    });
}

#[test]
fn a_header_announcing_an_absurd_body_drops_its_front_end_at_once() {
    within(|| {
        let service = Service::start(&["hostile", "busy"]);
        let mut busy = Driver::connect(&service, "busy");
        for size in [MAX_MSG_SIZE as u32 + 1, u32::MAX] {
            let mut hostile = service.connect("hostile");
            hostile
                .write_all(&header(FrontendReq::SET_MEM_TABLE, size))
                .unwrap();
            wait_for_hang_up(&hostile);
            busy.round_trip();
        }
        Driver::connect(&service, "hostile").round_trip();
    });
}

#[test]
fn a_front_end_that_never_reads_its_replies_stalls_no_other_disk_and_is_dropped() {
    within(|| {
        let service = Service::start(&["hostile", "busy"]);
        let mut busy = Driver::connect(&service, "busy");
        let hostile = service.connect("hostile");
        // Far more replies than a socket buffers: the service's writes would block.
        let flood: Vec<u8> = (0..20_000)
            .flat_map(|_| header(FrontendReq::GET_FEATURES, 0))
            .collect();
        let writer = {
            let mut hostile = hostile.try_clone().unwrap();
            // It may block until the service drops the front end, then fails: either is fine.
            std::thread::spawn(move || {
                let _ = hostile.write_all(&flood);
            })
        };
        busy.round_trip();
        wait_for_hang_up(&hostile);
        writer.join().unwrap();
        busy.round_trip();
        Driver::connect(&service, "hostile").round_trip();
    });
}
