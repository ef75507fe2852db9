//! `paravisor bench storage`, the part without a guest: 4 KiB random reads and writes, one at
//! a time, through pv-storage's vhost-user back end and its device model and disk, against
//! `fio` (psync) on the same image file on the host.
//!
//! "Ours" runs in this process: [`pv_vhost_user::Backend`] over a virtio-blk model and a
//! raw or encrypted disk on a 256 MiB image file, opened by [`pv_storage::disks::open`] from a
//! `--device` argument as the service opens its disks, set up by rust-vmm's vhost-user front end
//! over a socket pair (features, memory table, in-flight record, ring addresses, kick and
//! call eventfds: what QEMU sends), with a memfd as guest memory. Each request is what a
//! driver and the service do for it: the driver writes the header and three descriptors,
//! publishes them on the avail ring and kicks; the service's loop step (poll the kick, take
//! it, answer the ring: in-flight record, read or write of the image, used ring, call) runs;
//! the driver takes the call and checks the used ring and the status byte. One thread, so
//! no wake-up of another thread is counted on either side: fio's psync engine calls
//! `pread`/`pwrite` in its own thread too. Both go through the page cache (the service opens
//! its image without O_DIRECT; fio runs with `direct=0` and `invalidate=0` on a file written
//! and synced before).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

use pv_devices::block::Disk;
use pv_devices::block::BLOCK;
use pv_devices::virtio::blk::VirtioBlk;
use pv_storage::disks::DeviceSpec;
use pv_storage::disks::KeyStore;
use pv_storage::disks::KeyTable;
use pv_storage::vhost::Device;
use pv_vhost_user::Backend;
use serde::Serialize;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::BackendReqHandler;
use vhost::vhost_user::Frontend;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use vhost::VhostUserMemoryRegionInfo;
use vhost::VringConfigData;
use vm_memory::mmap::MmapRegion;
use vm_memory::Bytes;
use vm_memory::FileOffset;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;
use vm_memory::GuestRegionMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use crate::bench_storage::err;
use crate::bench_storage::fio_terse;
use crate::bench_storage::median;
use crate::bench_storage::median_ratio;
use crate::bench_storage::DISK_BYTES;

/// Guest memory the front end shares: the ring and one request's buffers.
const MEM: u64 = 4 << 20;
/// Where the front end says it mapped guest memory (any value: only differences matter).
const USER: u64 = 0x7f00_0000_0000;
/// Ring size: QEMU's default for vhost-user-blk-pci (`queue-size`).
const QSIZE: u16 = 128;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HEADER: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
/// Descriptor flags (virtio 1.x 2.7.5).
const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// One access pattern: ours (raw and encrypted) against fio on the raw image.
#[derive(Debug, Clone, Serialize)]
pub struct HostRow {
    pub pattern: String,
    /// Medians over the rounds, requests per second.
    pub ours_raw_iops: f64,
    pub ours_encrypted_iops: f64,
    pub fio_iops: Option<f64>,
    /// Median of the per-round ratios ours / fio.
    pub raw_ratio: Option<f64>,
    pub encrypted_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    /// What "ours" is here (in-process, which path).
    pub ours: String,
    pub baseline: String,
    pub rounds: usize,
    pub seconds_per_sample: f64,
    pub rows: Vec<HostRow>,
    /// Why the fio column is empty, if it is.
    pub fio_skipped: Option<String>,
}

/// A driver of one virtio-blk ring, and the back end it drives, in this process.
struct Driver {
    backend: Arc<Mutex<Backend<Device>>>,
    frontend: Option<Frontend>,
    handler: Option<JoinHandle<()>>,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    /// The driver's next avail index (and, as requests are answered one at a time, the used
    /// index it expects after the next answer).
    next_avail: u16,
    /// Kept open: the memfds the front end shared.
    _files: (File, File),
}

impl Driver {
    /// QEMU's handshake with a back end for `device`: features, protocol features, the
    /// in-flight record, the memory table, ring 0's size, addresses, base, kick and call.
    fn new(device: Device) -> std::io::Result<Driver> {
        let backend = Arc::new(Mutex::new(Backend::new("bench", device)));
        let (ours, theirs) = UnixStream::pair()?;
        let mut handler = BackendReqHandler::from_stream(ours, backend.clone());
        let handler = std::thread::spawn(move || while handler.handle_request().is_ok() {});
        let mut fe = Frontend::from_stream(theirs, 1);
        let vu = |e: vhost::Error| err(format!("vhost-user handshake: {e}"));
        let memfd = File::from(ipc_defs::hosted::sys::memfd("pv-bench-guest", MEM)?);
        let region = MmapRegion::from_file(FileOffset::new(memfd.try_clone()?, 0), MEM as usize)
            .map_err(|e| err(format!("mapping guest memory: {e}")))?;
        let mem = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| err("guest memory region"))
            .and_then(|r| {
                GuestMemoryMmap::from_regions(vec![r]).map_err(|e| err(format!("{e}")))
            })?;
        fe.set_owner().map_err(vu)?;
        let features = fe.get_features().map_err(vu)?;
        fe.set_features(features).map_err(vu)?;
        let protocol = fe.get_protocol_features().map_err(vu)?;
        fe.set_protocol_features(protocol).map_err(vu)?;
        let (inflight, record) = fe
            .get_inflight_fd(&VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: 1,
                queue_size: QSIZE,
            })
            .map_err(vu)?;
        fe.set_inflight_fd(&inflight, record.as_raw_fd())
            .map_err(vu)?;
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM,
            userspace_addr: USER,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        }])
        .map_err(vu)?;
        fe.set_vring_num(0, QSIZE).map_err(vu)?;
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: USER + DESC,
                used_ring_addr: USER + USED,
                avail_ring_addr: USER + AVAIL,
                log_addr: None,
            },
        )
        .map_err(vu)?;
        fe.set_vring_base(0, 0).map_err(vu)?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        let call = EventFd::new(EFD_NONBLOCK)?;
        fe.set_vring_kick(0, &kick).map_err(vu)?;
        fe.set_vring_call(0, &call).map_err(vu)?;
        fe.set_vring_enable(0, true).map_err(vu)?;
        // A request with a reply: every message before it has been handled.
        fe.get_queue_num().map_err(vu)?;
        Ok(Driver {
            backend,
            frontend: Some(fe),
            handler: Some(handler),
            mem,
            kick,
            call,
            next_avail: 0,
            _files: (memfd, record),
        })
    }

    fn put(&self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        self.mem
            .write_slice(bytes, GuestAddress(at))
            .map_err(|e| err(format!("guest memory at {at:#x}: {e}")))
    }

    fn get<const N: usize>(&self, at: u64) -> std::io::Result<[u8; N]> {
        let mut bytes = [0u8; N];
        self.mem
            .read_slice(&mut bytes, GuestAddress(at))
            .map_err(|e| err(format!("guest memory at {at:#x}: {e}")))?;
        Ok(bytes)
    }

    /// One 4 KiB request for block `lba`, answered before this returns.
    fn request(&mut self, write: bool, lba: u64) -> std::io::Result<()> {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&u32::from(write).to_le_bytes());
        header[8..].copy_from_slice(&(lba * (BLOCK as u64 / 512)).to_le_bytes());
        self.put(HEADER, &header)?;
        self.put(STATUS, &[0xff])?;
        let data_flags = if write { NEXT } else { NEXT | WRITE };
        for (i, (addr, len, flags, next)) in [
            (HEADER, 16u32, NEXT, 1u16),
            (DATA, BLOCK as u32, data_flags, 2),
            (STATUS, 1, WRITE, 0),
        ]
        .into_iter()
        .enumerate()
        {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            self.put(DESC + 16 * i as u64, &d)?;
        }
        let slot = u64::from(self.next_avail % QSIZE);
        self.put(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes())?;
        // used_event (EVENT_IDX): interrupt me when this request is answered.
        self.put(
            AVAIL + 4 + 2 * u64::from(QSIZE),
            &self.next_avail.to_le_bytes(),
        )?;
        self.next_avail = self.next_avail.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.put(AVAIL + 2, &self.next_avail.to_le_bytes())?;
        self.kick.write(1)?;
        self.serve()?;
        self.call
            .read()
            .map_err(|e| err(format!("the back end did not signal the call eventfd: {e}")))?;
        let used = u16::from_le_bytes(self.get(USED + 2)?);
        let [status] = self.get::<1>(STATUS)?;
        if used != self.next_avail || status != 0 {
            return Err(err(format!(
                "request for block {lba}: used index {used} (expected {}), status {status}",
                self.next_avail
            )));
        }
        Ok(())
    }

    /// The service loop's step for a kick (services/storage/src/main.rs `serve_once`): poll
    /// the rings' kicks, take the readable ones, answer the rings.
    fn serve(&self) -> std::io::Result<()> {
        let mut backend = self
            .backend
            .lock()
            .map_err(|_| err("the back end's lock is poisoned"))?;
        let ready: Vec<usize> = {
            let kicks = backend.kicks();
            let fds: Vec<_> = kicks.iter().map(|(_, fd)| *fd).collect();
            let readable = ipc_defs::hosted::sys::poll_readable(&fds, Duration::ZERO)?;
            kicks
                .iter()
                .zip(readable)
                .filter(|(_, r)| *r)
                .map(|((ring, _), _)| *ring)
                .collect()
        };
        for ring in ready {
            backend.take_kick(ring);
        }
        backend.serve_ready();
        Ok(())
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The front end's end closes: the handler thread sees the disconnection and ends.
        drop(self.frontend.take());
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }
}

/// xorshift64: the blocks a random pattern visits (uniform over the disk, like fio's
/// `norandommap`).
fn next_block(state: &mut u64, blocks: u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state % blocks
}

/// Requests per second of `write`s (or reads) at random blocks for `run`, after `ramp`.
fn ours_iops(
    driver: &mut Driver,
    write: bool,
    ramp: Duration,
    run: Duration,
    seed: &mut u64,
) -> std::io::Result<f64> {
    let blocks = DISK_BYTES / BLOCK as u64;
    let until = Instant::now() + ramp;
    while Instant::now() < until {
        for _ in 0..64 {
            driver.request(write, next_block(seed, blocks))?;
        }
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < run {
        for _ in 0..64 {
            driver.request(write, next_block(seed, blocks))?;
        }
        n += 64;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// fio's requests per second: one job, psync, 4 KiB, random over the whole file, through
/// the page cache.
fn fio_iops(image: &Path, write: bool, ramp: Duration, run: Duration) -> std::io::Result<f64> {
    let out = Command::new("fio")
        .arg("--name=host")
        .arg(format!("--filename={}", image.display()))
        .arg(if write {
            "--rw=randwrite"
        } else {
            "--rw=randread"
        })
        .args([
            "--bs=4k",
            "--ioengine=psync",
            "--direct=0",
            "--invalidate=0",
        ])
        .args(["--norandommap", "--randrepeat=0", "--time_based"])
        .arg(format!("--ramp_time={}ms", ramp.as_millis()))
        .arg(format!("--runtime={}ms", run.as_millis()))
        .arg(format!("--size={DISK_BYTES}"))
        .args(["--output-format=terse", "--terse-version=3"])
        .stdin(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| l.starts_with("3;"));
    match (out.status.success(), line.map(fio_terse)) {
        (true, Some(Ok(r))) => Ok(if write { r.write_iops } else { r.read_iops }),
        (_, parsed) => Err(err(format!(
            "fio on the host failed ({}; {:?}):\n{}{stdout}",
            out.status,
            parsed.map(|p| p.err()),
            String::from_utf8_lossy(&out.stderr)
        ))),
    }
}

/// A file of `DISK_BYTES` written whole, 4 KiB at a time as the encrypted disk writes its
/// blocks, and synced: every block allocated and in the page cache, in pages of the same
/// size on both images (Linux 6.16+ caches a file written in large pieces in large folios, and
/// a 4 KiB write into one then costs several times as much: 60k against 230k random writes a
/// second after 1 MiB against 4 KiB writes, fio on this machine's ext4).
fn filled_image(path: &Path) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    let mut block = [0u8; BLOCK];
    for (i, b) in block.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31) ^ 0x5a;
    }
    for lba in 0..DISK_BYTES / BLOCK as u64 {
        block[0] = lba as u8;
        f.write_all_at(&block, lba * BLOCK as u64)?;
    }
    f.sync_all()?;
    Ok(f)
}

fn blk(disk: Box<dyn Disk + Send>) -> Device {
    Device::Blk(VirtioBlk::new(disk, "bench"))
}

/// The encrypted disk's key, kept in memory (the service keeps it in VMGS).
#[derive(Default)]
struct MemKeys(Option<Vec<u8>>);

impl KeyStore for MemKeys {
    fn load(&mut self) -> Result<KeyTable, String> {
        self.0
            .as_deref()
            .map_or(Ok(KeyTable::default()), KeyTable::decode)
    }

    fn store(&mut self, table: &KeyTable) -> Result<(), String> {
        self.0 = Some(table.encode().to_vec());
        Ok(())
    }
}

/// The disk `--device ARG` names, on `file`, opened as pv-storage opens its disks.
fn open(arg: &str, file: File, keys: &mut MemKeys) -> std::io::Result<Box<dyn Disk + Send>> {
    let spec = DeviceSpec::parse(arg).map_err(err)?;
    pv_storage::disks::open(&spec, file, Some(keys)).map_err(err)
}

/// Runs the comparison in `dir` (a directory of the benchmark's own): `rounds` rounds, each
/// measuring every side for `run` after `ramp`, in an order that rotates.
pub fn run(
    dir: &Path,
    rounds: usize,
    ramp: Duration,
    run: Duration,
) -> std::io::Result<HostReport> {
    let raw_path = dir.join("host-raw.img");
    let raw_file = filled_image(&raw_path)?;
    let mut keys = MemKeys::default();
    let size = DISK_BYTES >> 20;
    let raw = open(
        &format!("vhost-user-blk,listen=bench,file=raw,size={size}M"),
        raw_file.try_clone()?,
        &mut keys,
    )?;
    let enc_file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join("host-encrypted.img"))?;
    let mut enc = open(
        &format!("vhost-user-blk,listen=bench,file=encrypted,encrypted,size={size}M"),
        enc_file.try_clone()?,
        &mut keys,
    )?;
    // Every block written once: a never-written block reads as zeros without decryption.
    let plain = vec![0xa5u8; 256 * BLOCK];
    for at in (0..DISK_BYTES / BLOCK as u64).step_by(256) {
        enc.write(at, &plain).map_err(err)?;
    }
    enc.flush().map_err(err)?;
    enc_file.sync_all()?;

    let fio_skipped = (!crate::linux_guest::runs("fio")).then(|| {
        "fio is not installed on the host (apt-get install fio): no baseline for this row"
            .to_string()
    });
    let mut raw_driver = Driver::new(blk(raw))?;
    let mut enc_driver = Driver::new(blk(enc))?;
    let mut rows = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for (pattern, write) in [
        ("4 KiB random read, one at a time", false),
        ("4 KiB random write, one at a time", true),
    ] {
        let (mut ours_raw, mut ours_enc, mut fio) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            for side in 0..3 {
                match (side + round) % 3 {
                    0 => ours_raw.push(ours_iops(&mut raw_driver, write, ramp, run, &mut seed)?),
                    1 => ours_enc.push(ours_iops(&mut enc_driver, write, ramp, run, &mut seed)?),
                    _ if fio_skipped.is_none() => fio.push(fio_iops(&raw_path, write, ramp, run)?),
                    _ => {}
                }
            }
        }
        let have_fio = !fio.is_empty();
        rows.push(HostRow {
            pattern: pattern.into(),
            raw_ratio: have_fio.then(|| median_ratio(&ours_raw, &fio)),
            encrypted_ratio: have_fio.then(|| median_ratio(&ours_enc, &fio)),
            ours_raw_iops: median(ours_raw),
            ours_encrypted_iops: median(ours_enc),
            fio_iops: have_fio.then(|| median(fio)),
        });
    }
    drop(raw_file);
    Ok(HostReport {
        ours: "pv-storage's vhost-user back end (pv_vhost_user::Backend, virtio-blk model, \
               the raw or encrypted disk pv_storage::disks::open makes of the image file) in \
               this process, set up by \
               rust-vmm's vhost-user front end over a socket pair with memfd guest memory; per \
               request: descriptors, avail ring, kick, the service loop's step (poll, take the \
               kick, answer the ring), call; one thread"
            .into(),
        baseline: "fio --ioengine=psync --bs=4k --direct=0 --invalidate=0 --norandommap on the \
                   same raw image file (written whole and synced before)"
            .into(),
        rounds,
        seconds_per_sample: run.as_secs_f64(),
        rows,
        fio_skipped,
    })
}

pub fn text(r: &HostReport) -> String {
    let mut out = format!(
        "Storage without a guest: {} rounds of {:.1} s per side, the order rotating; medians; \
         ratios = medians of the per-round ratios\n  ours: {}\n  baseline: {}\n",
        r.rounds, r.seconds_per_sample, r.ours, r.baseline
    );
    out.push_str(&format!(
        "  {:<38} {:>10} {:>10} {:>10} {:>9} {:>9}\n",
        "pattern (IOPS)", "ours raw", "ours enc", "fio", "raw/fio", "enc/fio"
    ));
    let opt = |x: Option<f64>, f: fn(f64) -> String| x.map_or_else(|| "-".to_string(), f);
    for row in &r.rows {
        out.push_str(&format!(
            "  {:<38} {:>10.0} {:>10.0} {:>10} {:>9} {:>9}\n",
            row.pattern,
            row.ours_raw_iops,
            row.ours_encrypted_iops,
            opt(row.fio_iops, |x| format!("{x:.0}")),
            opt(row.raw_ratio, |x| format!("{x:.2}x")),
            opt(row.encrypted_ratio, |x| format!("{x:.2}x")),
        ));
    }
    if let Some(why) = &r.fio_skipped {
        out.push_str(&format!("  fio column SKIPPED: {why}\n"));
    }
    out
}
