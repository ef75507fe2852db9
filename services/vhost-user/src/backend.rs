//! The vhost-user back end of one device: the front end (QEMU, or any vhost-user front end)
//! shares its guest memory and the virtqueues' eventfds; this back end hands each ready queue
//! to a [`VirtioDevice`] and, for a device that answers requests one at a time, records each
//! request in flight so that a restarted process submits exactly the ones its predecessor left
//! unanswered.
//!
//! rust-vmm's `vhost` crate parses and answers the protocol's messages
//! ([`vhost::vhost_user::BackendReqHandler`]); this module is the request handler behind it.
//! `vhost-user-backend` (the same project's ready-made handler) is not used: it refuses
//! `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` (its `get_inflight_fd` returns "not supported") and
//! runs a thread per queue, where a service answers every queue from one thread (one
//! seccomp profile without thread creation, requests from one device served in order).
//!
//! Everything the front end sends is checked: ring indexes and sizes, addresses that must
//! fall inside the memory it shared, memory regions that must not overlap and must lie within
//! their files, in-flight records that must hold what they claim. A bad message is refused
//! with an error reply; a ring whose driver misbehaves (avail index beyond the ring, a head
//! past it, used ring outside memory) is stopped until the device is reset.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;

use pv_devices::virtio::VIRTIO_RING_F_EVENT_IDX;
use pv_devices::virtio::VIRTIO_RING_F_INDIRECT_DESC;
use vhost::vhost_user::message::VhostTransferStateDirection;
use vhost::vhost_user::message::VhostTransferStatePhase;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::message::VhostUserLog;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vhost::vhost_user::message::VhostUserShMemConfig;
use vhost::vhost_user::message::VhostUserSharedMsg;
use vhost::vhost_user::message::VhostUserSingleMemoryRegion;
use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::vhost_user::message::VhostUserVringState;
use vhost::vhost_user::Error as VuError;
use vhost::vhost_user::GpuBackend;
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserVirtioFeatures;
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;
use vm_memory::GuestRegionMmap;

use crate::device::Counts;
use crate::device::Ring;
use crate::device::VirtioDevice;
use crate::inflight::Record;

type VuResult<T> = Result<T, VuError>;

/// Largest queue a front end may set up (QEMU's default is 128 or 256).
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Most guest memory regions a front end may share.
pub const MAX_REGIONS: usize = 32;
/// Bytes of configuration space a front end may read (VHOST_USER_MAX_CONFIG_SIZE).
pub const CONFIG_SPACE: usize = 256;
/// A front-end address range and where it is in guest memory.
struct Mapping {
    user_addr: u64,
    size: u64,
    guest_addr: u64,
}

struct RingState {
    queue: Queue,
    kick: Option<File>,
    call: Option<File>,
    /// SET_VRING_BASE: where the front end says the driver's requests continue.
    base: u16,
    enabled: bool,
    /// Set up by the front end (a kick descriptor) and not stopped since.
    started: bool,
    /// Ready to serve: the in-flight record read, the indexes set.
    active: bool,
    /// Stopped for a driver error until the device is reset.
    broken: bool,
    /// In-flight requests of the last back end, still to be answered (oldest first).
    resubmit: Vec<u16>,
    /// The driver is interrupted once when the ring starts serving (or gets a new call
    /// descriptor), whatever the ring's notification state says: a back end killed between
    /// publishing used entries and signalling them leaves a driver that waits for an
    /// interrupt its successor would otherwise never send (the entries are already past the
    /// driver's `used_event`). A spurious interrupt costs the driver one look at its ring.
    owe_interrupt: bool,
}

impl RingState {
    fn new() -> RingState {
        RingState {
            queue: Queue::new(MAX_QUEUE_SIZE).expect("MAX_QUEUE_SIZE is a valid queue size"),
            kick: None,
            call: None,
            base: 0,
            enabled: false,
            started: false,
            active: false,
            broken: false,
            resubmit: Vec::new(),
            owe_interrupt: false,
        }
    }
}

/// The back end of one vhost-user connection.
pub struct Backend<D> {
    /// The device's name, for logs (the listener's).
    name: String,
    device: D,
    acked_features: u64,
    acked_protocol: VhostUserProtocolFeatures,
    mem: Option<GuestMemoryMmap>,
    mappings: Vec<Mapping>,
    rings: Vec<RingState>,
    inflight: Option<(Record, File)>,
    counter: u64,
    pub counts: Counts,
    /// Problems logged once each (a misbehaving driver must not flood the log).
    logged: u64,
}

fn invalid(why: String) -> VuError {
    VuError::ReqHandlerError(std::io::Error::new(std::io::ErrorKind::InvalidInput, why))
}

impl<D: VirtioDevice> Backend<D> {
    pub fn new(name: &str, device: D) -> Backend<D> {
        let rings = (0..device.queues()).map(|_| RingState::new()).collect();
        Backend {
            name: name.to_string(),
            device,
            acked_features: 0,
            acked_protocol: VhostUserProtocolFeatures::empty(),
            mem: None,
            mappings: Vec::new(),
            rings,
            inflight: None,
            counter: 0,
            counts: Counts::default(),
            logged: 0,
        }
    }

    /// The front end went away: everything it set up is dropped (the device and its back end
    /// stay).
    pub fn disconnected(&mut self) {
        self.forget_front_end();
        self.device.disconnected();
    }

    fn forget_front_end(&mut self) {
        self.acked_features = 0;
        self.acked_protocol = VhostUserProtocolFeatures::empty();
        self.mem = None;
        self.mappings.clear();
        self.rings = (0..self.device.queues())
            .map(|_| RingState::new())
            .collect();
        self.inflight = None;
        self.counter = 0;
        self.logged = 0;
    }

    pub fn device(&mut self) -> &mut D {
        &mut self.device
    }

    pub fn device_ref(&self) -> &D {
        &self.device
    }

    /// Whether the driver's features, with VHOST_USER_F_PROTOCOL_FEATURES, are set (rust-vmm's
    /// handler takes SET_VRING_ENABLE only then; see `front_end`).
    pub fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Whether the front end asked for REPLY_ACK's replies.
    pub fn reply_ack_negotiated(&self) -> bool {
        self.acked_protocol
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    fn warn(&mut self, what: &str) {
        self.logged += 1;
        if self.logged <= 20 || self.logged.is_multiple_of(1000) {
            tracing::warn!(device = %self.name, "{what}");
        }
    }

    fn ring(&mut self, index: u32) -> VuResult<&mut RingState> {
        let n = self.rings.len();
        self.rings
            .get_mut(index as usize)
            .ok_or_else(|| invalid(format!("ring {index} does not exist (the device has {n})")))
    }

    fn to_guest(&self, user_addr: u64, what: &str) -> VuResult<GuestAddress> {
        self.mappings
            .iter()
            .find(|m| user_addr >= m.user_addr && user_addr - m.user_addr < m.size)
            .map(|m| GuestAddress(user_addr - m.user_addr + m.guest_addr))
            .ok_or_else(|| {
                invalid(format!(
                    "the {what} address {user_addr:#x} is in no shared memory region"
                ))
            })
    }

    /// The eventfds the service waits on: (ring, kick) for every started ring.
    pub fn kicks(&self) -> Vec<(usize, BorrowedFd<'_>)> {
        self.rings
            .iter()
            .enumerate()
            .filter(|(_, r)| r.started)
            .filter_map(|(i, r)| r.kick.as_ref().map(|k| (i, k.as_fd())))
            .collect()
    }

    /// Takes the count of a ring's kick eventfd (the driver's notifications since the last
    /// look); only for a kick that polled readable (the read would wait otherwise).
    pub fn take_kick(&mut self, ring: usize) {
        if let Some(mut kick) = self.rings.get(ring).and_then(|r| r.kick.as_ref()) {
            let mut count = [0u8; 8];
            let _ = std::io::Read::read(&mut kick, &mut count);
        }
    }

    /// Serves every ring that is ready; whether any has more work than one batch (the caller
    /// comes back without waiting).
    pub fn serve_ready(&mut self) -> bool {
        let mut more = false;
        for i in 0..self.rings.len() {
            more |= self.serve(i);
        }
        more
    }

    /// Answers what ring `index` has (up to a batch); whether more is waiting.
    pub fn serve(&mut self, index: usize) -> bool {
        if self.mem.is_none() || !self.device.answers(index) {
            return false;
        }
        {
            let r = &self.rings[index];
            if !r.started || !r.enabled || r.broken {
                return false;
            }
        }
        if !self.rings[index].active {
            if let Err(why) = self.activate(index) {
                self.rings[index].broken = true;
                self.warn(&format!("ring {index} stopped: {why}"));
                return false;
            }
        }
        let Backend {
            name,
            device,
            mem,
            rings,
            inflight,
            counter,
            counts,
            ..
        } = self;
        let Some(mem) = mem.as_ref() else {
            return false;
        };
        let state = &mut rings[index];
        let mut ring = Ring {
            index,
            name,
            mem,
            queue: &mut state.queue,
            record: inflight.as_ref().map(|(r, _)| r),
            resubmit: &mut state.resubmit,
            counter,
            counts,
            notify: false,
        };
        let served = device.serve(&mut ring);
        let notify = ring.notify || state.owe_interrupt;
        if notify {
            if let Some(call) = state.call.as_mut() {
                let _ = call.write_all(&1u64.to_ne_bytes());
                state.owe_interrupt = false;
            }
        }
        match served {
            Ok(more) => more,
            Err(why) => {
                self.rings[index].broken = true;
                self.warn(&format!(
                    "ring {index} stopped until the driver resets the device: {why}"
                ));
                false
            }
        }
    }

    /// Makes a started ring ready: its used index from guest memory, and (with an in-flight
    /// record) where the requests continue and which to submit again.
    fn activate(&mut self, index: usize) -> Result<(), String> {
        let mem = self.mem.as_ref().ok_or("no guest memory")?;
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let ring = &mut self.rings[index];
        ring.queue.set_event_idx(event_idx);
        ring.queue.set_ready(true);
        if !ring.queue.is_valid(mem) {
            return Err(
                "its descriptor table or rings are not inside guest memory, or misaligned".into(),
            );
        }
        let used = ring
            .queue
            .used_idx(mem, Ordering::Acquire)
            .map_err(|e| format!("used index: {e}"))?;
        ring.queue.set_next_used(used.0);
        ring.queue.set_next_avail(ring.base);
        if let Some((record, _)) = &self.inflight {
            let size = ring.queue.size();
            let found = record
                .recover(index as u16, size, used.0)
                .map_err(|e| e.to_string())?;
            self.counter = self.counter.max(found.last_counter);
            // The requests in flight are the ones after the last answered, in the order they
            // were taken (requests are answered in order): continue from the used index.
            ring.queue.set_next_avail(used.0);
            if !found.heads.is_empty() {
                tracing::info!(device = %self.name, ring = index, heads = ?found.heads, "submitting again the requests in flight when the last back end stopped");
            }
            ring.resubmit = found.heads;
        }
        ring.active = true;
        ring.owe_interrupt = true;
        Ok(())
    }

    fn inflight_record_offered(&self) -> VuResult<()> {
        if self.device.wants_inflight_record() {
            Ok(())
        } else {
            unsupported("an in-flight record (INFLIGHT_SHMFD is not offered for this device)")
        }
    }

    fn stop(&mut self, index: usize) {
        let ring = &mut self.rings[index];
        ring.started = false;
        ring.active = false;
        ring.kick = None;
        ring.queue.set_ready(false);
        self.device.stopped(index);
    }
}

fn unsupported<T>(what: &'static str) -> VuResult<T> {
    Err(VuError::InvalidOperation(what))
}

impl<D: VirtioDevice> VhostUserBackendReqHandlerMut for Backend<D> {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.disconnected();
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        for i in 0..self.rings.len() {
            self.stop(i);
            if let Some((record, _)) = &self.inflight {
                let _ = record.clear(i as u16);
            }
            self.rings[i] = RingState::new();
        }
        self.device.reset();
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.device.features()
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.get_features()?;
        if features & !offered != 0 {
            return Err(invalid(format!(
                "features {:#x} were not offered",
                features & !offered
            )));
        }
        self.acked_features = features;
        self.device.acknowledge(features);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        let offered = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG;
        if self.device.wants_inflight_record() {
            Ok(offered | VhostUserProtocolFeatures::INFLIGHT_SHMFD)
        } else {
            Ok(offered)
        }
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.get_protocol_features()?;
        let acked = VhostUserProtocolFeatures::from_bits(features)
            .filter(|f| offered.contains(*f))
            .ok_or_else(|| invalid(format!("protocol features {features:#x} were not offered")))?;
        self.acked_protocol = acked;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.device.queues()))
    }

    fn set_mem_table(
        &mut self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy.is_some() {
            return unsupported("postcopy migration");
        }
        if regions.len() > MAX_REGIONS || regions.len() != files.len() {
            return Err(invalid(format!(
                "{} regions with {} descriptors (at most {MAX_REGIONS})",
                regions.len(),
                files.len()
            )));
        }
        let mut mapped = Vec::new();
        let mut mappings = Vec::new();
        for (r, file) in regions.iter().zip(files) {
            let region = map_region(file, r.mmap_offset, r.memory_size, r.guest_phys_addr)
                .map_err(invalid)?;
            if r.user_addr.checked_add(r.memory_size).is_none() {
                return Err(invalid(
                    "a region's front-end address range overflows".into(),
                ));
            }
            if mappings.iter().any(|m: &Mapping| {
                r.user_addr < m.user_addr + m.size && m.user_addr < r.user_addr + r.memory_size
            }) {
                return Err(invalid(
                    "two regions overlap in the front end's address space".into(),
                ));
            }
            mappings.push(Mapping {
                user_addr: r.user_addr,
                size: r.memory_size,
                guest_addr: r.guest_phys_addr,
            });
            mapped.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| invalid(format!("guest memory regions: {e}")))?;
        self.mem = Some(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let ring = self.ring(index)?;
        let size = u16::try_from(num).map_err(|_| invalid(format!("ring size {num}")))?;
        ring.queue
            .try_set_size(size)
            .map_err(|e| invalid(format!("ring {index} size {num}: {e}")))
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let desc = self.to_guest(descriptor, "descriptor table")?;
        let avail = self.to_guest(available, "avail ring")?;
        let used = self.to_guest(used, "used ring")?;
        let ring = self.ring(index)?;
        ring.queue
            .try_set_desc_table_address(desc)
            .and_then(|()| ring.queue.try_set_avail_ring_address(avail))
            .and_then(|()| ring.queue.try_set_used_ring_address(used))
            .map_err(|e| invalid(format!("ring {index} addresses: {e}")))
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let base = u16::try_from(base).map_err(|_| invalid(format!("ring base {base}")))?;
        self.ring(index)?.base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.ring(index)?;
        let i = index as usize;
        let next = if self.rings[i].active {
            self.rings[i].queue.next_avail()
        } else {
            self.rings[i].base
        };
        self.stop(i);
        self.rings[i].base = next;
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let ring = self.ring(u32::from(index))?;
        let Some(fd) = fd else {
            return Err(invalid(
                "polling mode (a ring without a kick descriptor) is not supported".into(),
            ));
        };
        ring.kick = Some(fd);
        ring.started = true;
        ring.active = false;
        ring.broken = false;
        self.device.stopped(usize::from(index));
        // Without the protocol-features handshake a ring is enabled once started.
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            self.rings[index as usize].enabled = true;
        }
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let ring = self.ring(u32::from(index))?;
        ring.owe_interrupt |= fd.is_some();
        ring.call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.ring(u32::from(index))?;
        Ok(())
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        self.ring(index)?.enabled = enable;
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        // A front end asks for its own idea of the structure (QEMU 7.2: the whole
        // virtio_blk_config of its headers, fields of features never offered included): the
        // bytes past the device's fields read as zero, up to the protocol's limit.
        let mut config = self.device.config();
        config.resize(CONFIG_SPACE, 0);
        let start = offset as usize;
        let end = start
            .checked_add(size as usize)
            .filter(|e| *e <= config.len());
        match end {
            Some(end) => Ok(config[start..end].to_vec()),
            None => Err(invalid(format!(
                "configuration bytes {offset}+{size}: the space is {CONFIG_SPACE} bytes"
            ))),
        }
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        unsupported("the configuration space is read-only")
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        unsupported("not a GPU")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unsupported("shared objects")
    }

    fn get_inflight_fd(&mut self, req: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        self.inflight_record_offered()?;
        let size = Record::size_for(req.num_queues, req.queue_size, self.device.queues())
            .map_err(|e| invalid(e.to_string()))?;
        let fd = ipc_defs::hosted::sys::memfd("vhost-user-inflight", size)
            .map_err(VuError::ReqHandlerError)?;
        let file = File::from(fd);
        let mem = map_record(file.try_clone().map_err(VuError::ReqHandlerError)?, 0, size)?;
        let record = Record::new(mem, req.num_queues, req.queue_size, self.device.queues())
            .map_err(|e| invalid(e.to_string()))?;
        let reply = VhostUserInflight {
            mmap_size: size,
            mmap_offset: 0,
            num_queues: req.num_queues,
            queue_size: req.queue_size,
        };
        let handed = file.try_clone().map_err(VuError::ReqHandlerError)?;
        self.inflight = Some((record, file));
        Ok((reply, handed))
    }

    fn set_inflight_fd(&mut self, req: &VhostUserInflight, file: File) -> VuResult<()> {
        self.inflight_record_offered()?;
        let need = Record::size_for(req.num_queues, req.queue_size, self.device.queues())
            .map_err(|e| invalid(e.to_string()))?;
        if req.mmap_size < need {
            return Err(invalid(format!(
                "in-flight record of {} bytes; {} queues of {} need {need}",
                req.mmap_size, req.num_queues, req.queue_size
            )));
        }
        let mem = map_record(
            file.try_clone().map_err(VuError::ReqHandlerError)?,
            req.mmap_offset,
            need,
        )?;
        let record = Record::new(mem, req.num_queues, req.queue_size, self.device.queues())
            .map_err(|e| invalid(e.to_string()))?;
        tracing::info!(device = %self.name, queues = req.num_queues, "front end handed back its in-flight record");
        self.inflight = Some((record, file));
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        unsupported("memory slots (CONFIGURE_MEM_SLOTS is not offered)")
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        unsupported("memory slots (CONFIGURE_MEM_SLOTS is not offered)")
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        unsupported("memory slots (CONFIGURE_MEM_SLOTS is not offered)")
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        unsupported("device state transfer (migration)")
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        unsupported("device state transfer (migration)")
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        unsupported("shared memory regions")
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        unsupported("dirty logging (migration)")
    }
}

/// Maps `size` bytes of `file` at `offset` as guest memory at `guest`, checked against the
/// file's size.
fn map_region(file: File, offset: u64, size: u64, guest: u64) -> Result<GuestRegionMmap, String> {
    let have = file
        .metadata()
        .map_err(|e| format!("region file: {e}"))?
        .len();
    let end = offset.checked_add(size).ok_or("region end overflows")?;
    // A region beyond its file's end would fault (SIGBUS) when touched.
    if end > have {
        return Err(format!(
            "region {offset:#x}+{size:#x} is beyond its file's {have:#x} bytes"
        ));
    }
    let size = usize::try_from(size).map_err(|_| "region too large")?;
    let region = MmapRegion::from_file(FileOffset::new(file, offset), size)
        .map_err(|e| format!("mapping a region: {e}"))?;
    GuestRegionMmap::new(region, GuestAddress(guest))
        .ok_or_else(|| "region overflows the guest address space".to_string())
}

/// Maps `size` bytes of an in-flight record at `offset` of `file`, checked against its size.
fn map_record(file: File, offset: u64, size: u64) -> VuResult<GuestMemoryMmap> {
    let region = map_region(file, offset, size, 0).map_err(invalid)?;
    GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| invalid(format!("in-flight record: {e}")))
}
