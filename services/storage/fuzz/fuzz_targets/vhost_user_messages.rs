//! A vhost-user front end that sends anything: raw messages (headers whose sizes may lie,
//! bodies of any bytes) with descriptors attached as it likes (memfds of awkward sizes, an
//! eventfd, /dev/null, the in-flight record the back end handed out), and a guest that writes
//! anything into the memory it shared, over rust-vmm's `BackendReqHandler` and our `Backend`
//! on a small virtio-blk or virtio-scsi disk. After every step the rings that got set up are
//! served over that memory. Every message ends in a reply, a refusal or a dropped connection
//! (the back end then forgets the front end, as `pv-storage` does, and the rest of the input
//! is a new front end): never a panic, a hang or an access outside mapped memory. The disk
//! keeps its size, and the counts add up (failures and resubmissions are among the requests).
//!
//! Format: `pv_storage_fuzz::messages`. Seeds (`cargo run --example seeds`):
//! `services/storage/fuzz/seeds/vhost_user_messages`.
//!
//! The handler reads a message with blocking reads, so the target hands it a message only when
//! `pv-storage`'s gate (the shared transport's `pv_vhost_user::front_end::Gate`, which peeks at the handler's socket)
//! lets it through; a front end the gate refuses (an absurd size, descriptors with part of a
//! message) is dropped as the service drops it. At the end of the input the target closes its
//! side, so that a partial message meets end of file rather than a wait. The gate's clock is
//! held still: a wait never times out here (the loop's tests cover that).
#![no_main]

use std::fs::File;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use pv_devices::block::raw::RawDisk;
use pv_devices::block::Disk;
use pv_devices::block::MemStore;
use pv_devices::block::BLOCK;
use pv_devices::scsi::ScsiDisk;
use pv_devices::virtio::blk::VirtioBlk;
use pv_devices::virtio::scsi::VirtioScsi;
use pv_storage::vhost::Device;
use pv_storage::vhost::BLK_QUEUES;
use pv_vhost_user::front_end::Gate;
use pv_vhost_user::front_end::Next;
use pv_vhost_user::Backend;
use pv_storage_fuzz::messages::Action;
use pv_storage_fuzz::messages::Input;
use pv_storage_fuzz::messages::POOL;
use pv_storage_fuzz::messages::POOL_DEV_NULL;
use pv_storage_fuzz::messages::POOL_EVENTFD;
use pv_storage_fuzz::messages::POOL_RECEIVED;
use vhost::vhost_user::message::MAX_MSG_SIZE;
use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Blocks of the disk behind the device.
const DISK_BLOCKS: u64 = 16;

fn device(scsi: bool) -> Device {
    let disk: Box<dyn Disk + Send> = Box::new(
        RawDisk::new(MemStore {
            bytes: vec![0; DISK_BLOCKS as usize * BLOCK],
        })
        .unwrap(),
    );
    if scsi {
        Device::Scsi(VirtioScsi::new(ScsiDisk::new(disk, "fuzz")))
    } else {
        let mut blk = VirtioBlk::new(disk, "fuzz");
        blk.set_queues(BLK_QUEUES);
        Device::Blk(blk)
    }
}

/// What no front end can change: the disk's size, and counts that add up.
fn check(backend: &Mutex<Backend<Device>>) {
    let mut b = backend.lock().unwrap();
    let c = b.counts;
    assert!(c.failed + c.malformed <= c.requests, "{c:?}");
    assert!(c.resubmitted <= c.requests, "{c:?}");
    let blocks = match b.device() {
        Device::Blk(d) => d.disk().blocks(),
        Device::Scsi(d) => d.scsi().disk().blocks(),
    };
    assert_eq!(blocks, DISK_BLOCKS);
}

/// The descriptors a front end can send.
struct Pool {
    memfds: [File; 3],
    eventfd: EventFd,
    dev_null: File,
    /// The last descriptor the back end sent (GET_INFLIGHT_FD's record).
    received: Option<File>,
}

impl Pool {
    fn new(sizes: [u64; 3]) -> Pool {
        let memfd = |size| File::from(ipc_defs::hosted::sys::memfd("fuzz-guest", size).unwrap());
        Pool {
            memfds: sizes.map(memfd),
            eventfd: EventFd::new(0).unwrap(),
            dev_null: File::options()
                .read(true)
                .write(true)
                .open("/dev/null")
                .unwrap(),
            received: None,
        }
    }

    /// Pool entry `index` (modulo [`POOL`]); none for a descriptor not received yet.
    fn fd(&self, index: u8) -> Option<RawFd> {
        match index % POOL as u8 {
            i @ 0..=2 => Some(self.memfds[usize::from(i)].as_raw_fd()),
            POOL_EVENTFD => Some(self.eventfd.as_raw_fd()),
            POOL_DEV_NULL => Some(self.dev_null.as_raw_fd()),
            _ => self.received.as_ref().map(|f| f.as_raw_fd()),
        }
    }

    /// The guest (or the front end) writes into shared memory, within the file's size.
    fn write(&self, target: u8, offset: u32, bytes: &[u8]) {
        let file = match target {
            0..=2 => &self.memfds[usize::from(target)],
            POOL_RECEIVED => match &self.received {
                Some(f) => f,
                None => return,
            },
            _ => return,
        };
        let len = file.metadata().unwrap().len();
        if len == 0 {
            return;
        }
        let offset = u64::from(offset) % len;
        let n = bytes.len().min((len - offset) as usize);
        file.write_all_at(&bytes[..n], offset).unwrap();
    }
}

/// One front end's connection: our end of the socket, the handler on the other, and the gate
/// that looks at the handler's socket (a second descriptor of it).
struct Connection {
    front: UnixStream,
    handler: BackendReqHandler<Mutex<Backend<Device>>>,
    back: UnixStream,
    gate: Gate,
}

impl Connection {
    fn new(backend: &Arc<Mutex<Backend<Device>>>) -> Connection {
        let (front, back) = UnixStream::pair().unwrap();
        front.set_nonblocking(true).unwrap();
        Connection {
            front,
            handler: BackendReqHandler::from_stream(back.try_clone().unwrap(), backend.clone()),
            back,
            gate: Gate::default(),
        }
    }

    /// Sends `bytes` with descriptors; false if the socket would not take it all.
    fn send(&mut self, bytes: &[u8], fds: &[RawFd]) -> bool {
        if bytes.is_empty() {
            return true;
        }
        matches!(self.front.send_with_fds(&[bytes], fds), Ok(n) if n == bytes.len())
    }

    /// Lets the handler take every message the gate lets through; false once the gate or the
    /// handler has dropped the connection.
    fn handle_ready(&mut self, backend: &Mutex<Backend<Device>>, pool: &mut Pool, now: Instant) -> bool {
        loop {
            match self.gate.check(&self.back, now) {
                Ok(Next::Ready(_)) => {
                    if !self.handle_one(backend, pool) {
                        return false;
                    }
                }
                Ok(Next::Waiting(_) | Next::Idle) => return true,
                Ok(Next::Closed) | Err(_) => return false,
            }
        }
    }

    fn handle_one(&mut self, backend: &Mutex<Backend<Device>>, pool: &mut Pool) -> bool {
        let ok = self.handler.handle_request().is_ok();
        self.take_replies(pool);
        backend.lock().unwrap().serve_ready();
        ok
    }

    /// Reads what the back end answered (never waiting), keeping a descriptor it sent.
    fn take_replies(&mut self, pool: &mut Pool) {
        let mut buf = [0u8; 2 * MAX_MSG_SIZE];
        while let Ok((n, fds)) = ipc_defs::hosted::sys::recv_with_fds(&self.front, &mut buf) {
            if let Some(fd) = fds.into_iter().last() {
                pool.received = Some(File::from(fd));
            }
            if n == 0 {
                break;
            }
        }
    }

    /// The front end closes its side: what is left is handled up to the end of file (a
    /// partial message is then an error, not a wait).
    fn close(mut self, backend: &Mutex<Backend<Device>>, pool: &mut Pool) {
        self.front.shutdown(Shutdown::Write).unwrap();
        while self.handle_one(backend, pool) {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let mut pool = Pool::new(input.memfd_sizes);
    let backend = Arc::new(Mutex::new(Backend::new("fuzz", device(input.scsi))));
    let mut conn = Connection::new(&backend);
    let now = Instant::now();
    for action in input {
        match action {
            Action::Write {
                target,
                offset,
                bytes,
            } => {
                pool.write(target, offset, bytes);
                backend.lock().unwrap().serve_ready();
            }
            Action::Message { fds, bytes } => {
                let fds: Vec<RawFd> = fds.iter().filter_map(|i| pool.fd(*i)).collect();
                if !conn.send(bytes, &fds) {
                    break;
                }
                if !conn.handle_ready(&backend, &mut pool, now) {
                    // The gate or the handler dropped the front end: `pv-storage` forgets it
                    // and waits for the next, which the rest of the input is.
                    backend.lock().unwrap().disconnected();
                    conn = Connection::new(&backend);
                }
            }
        }
    }
    conn.close(&backend, &mut pool);
    check(&backend);
});
