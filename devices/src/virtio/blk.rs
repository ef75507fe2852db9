//! virtio-blk (virtio 1.x, 5.2): block requests from a split virtqueue to a [`Disk`].
//!
//! A request is a descriptor chain: a 16-byte header the device reads (type u32, reserved
//! u32, sector u64, little-endian), the data (read by the device for a write, written by it
//! for a read), and one status byte the device writes last. The device advertises 4 KiB
//! logical blocks (VIRTIO_BLK_F_BLK_SIZE), so Linux sends sectors and lengths in whole blocks;
//! anything else, a request past the disk's end, a block whose seal does not open, or a
//! chain that does not fit its shape is answered with an error status, never a panic or an
//! access outside the guest memory the queue lives in (`vm-memory` checks every address).

use std::io::Read;
use std::io::Write;

use virtio_queue::DescriptorChain;
use virtio_queue::QueueT;
use vm_memory::GuestMemory;

pub use super::Outcome;
use crate::block::BlockError;
use crate::block::Disk;
use crate::block::BLOCK;

/// Request types (5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status values.
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Feature bits (5.2.3).
pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
pub const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// More than one request queue (`num_queues` in the configuration space).
pub const VIRTIO_BLK_F_MQ: u64 = 1 << 12;

/// Bytes of a sector (the unit of the header's `sector` and of `capacity`).
pub const SECTOR: u64 = 512;
/// Largest data of one request: 1 MiB (SIZE_MAX x SEG_MAX advertise it).
pub const MAX_REQUEST: usize = 1 << 20;
/// Largest segment, and segments per request.
pub const SIZE_MAX: u32 = 64 << 10;
pub const SEG_MAX: u32 = (MAX_REQUEST as u32) / SIZE_MAX;
/// Bytes of the answer to GET_ID.
pub const ID_BYTES: usize = 20;

/// A virtio-blk device over `disk`.
pub struct VirtioBlk<D: Disk> {
    disk: D,
    id: [u8; ID_BYTES],
    queues: u16,
}

impl<D: Disk> VirtioBlk<D> {
    /// The device for `disk`; `serial` is what GET_ID answers (cut to 20 bytes).
    pub fn new(disk: D, serial: &str) -> VirtioBlk<D> {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        VirtioBlk {
            disk,
            id,
            queues: 1,
        }
    }

    /// Offers `queues` request queues (at least 1); every queue is answered the same way.
    pub fn set_queues(&mut self, queues: u16) {
        self.queues = queues.max(1);
    }

    pub fn queues(&self) -> u16 {
        self.queues
    }

    /// The features the device offers.
    pub fn features(&self) -> u64 {
        super::VIRTIO_F_VERSION_1
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_MQ
    }

    /// The configuration space (5.2.4) up to `num_queues`: capacity (sectors), size_max,
    /// seg_max, geometry (none), blk_size, topology (none), writeback (no: WCE is not
    /// offered, every write is answered once the back end has it), num_queues.
    pub fn config(&self) -> [u8; 36] {
        let mut c = [0u8; 36];
        c[..8].copy_from_slice(&(self.disk.blocks() * (BLOCK as u64 / SECTOR)).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        c[34..36].copy_from_slice(&self.queues.to_le_bytes());
        c
    }

    pub fn disk(&mut self) -> &mut D {
        &mut self.disk
    }

    /// Answers every request available on `queue` ([`super::drain`]); the outcomes, in order
    /// (the service logs the failures).
    pub fn process<M, Q>(&mut self, mem: &M, queue: &mut Q) -> Vec<Outcome>
    where
        M: GuestMemory,
        Q: QueueT,
    {
        super::drain(mem, queue, |chain| self.answer(mem, chain))
    }

    /// One request: the bytes written into its buffers (data and status), and its outcome.
    /// For a transport that takes chains off the queue itself (to record them in flight).
    pub fn answer<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> (u32, Outcome) {
        let malformed = |why: String| (0, Outcome::Malformed(why));
        let (mut reader, mut writer) = match super::parts(mem, chain) {
            Ok(p) => p,
            Err(outcome) => return (0, outcome),
        };
        let Some(data_len) = writer.available_bytes().checked_sub(1) else {
            return malformed("no byte for the status".into());
        };
        let mut status = match writer.split_at(data_len) {
            Ok(s) => s,
            Err(e) => return malformed(format!("status byte: {e}")),
        };
        let header: [u8; 16] = match reader.read_obj() {
            Ok(h) => h,
            Err(e) => return self.finish(&mut status, 0, Err(Failed::Io(format!("header: {e}")))),
        };
        let kind = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let sector = u64::from_le_bytes(header[8..].try_into().expect("8 bytes"));
        let (written, result) = match kind {
            VIRTIO_BLK_T_IN => match self.read(sector, data_len) {
                Ok(data) => match writer.write_all(&data) {
                    Ok(()) => (data.len(), Ok(())),
                    Err(e) => (0, Err(Failed::Io(format!("data: {e}")))),
                },
                Err(e) => (0, Err(e)),
            },
            VIRTIO_BLK_T_OUT => (0, self.write(sector, &mut reader)),
            VIRTIO_BLK_T_FLUSH => (0, self.disk.flush().map_err(Failed::Block)),
            VIRTIO_BLK_T_GET_ID => {
                let n = data_len.min(ID_BYTES);
                match writer.write_all(&self.id[..n]) {
                    Ok(()) => (n, Ok(())),
                    Err(e) => (0, Err(Failed::Io(format!("id: {e}")))),
                }
            }
            other => (0, Err(Failed::Unsupported(other))),
        };
        self.finish(&mut status, written, result)
    }

    /// Writes the status byte; the used length counts it.
    fn finish<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        status: &mut virtio_queue::Writer<'_, B>,
        written: usize,
        result: Result<(), Failed>,
    ) -> (u32, Outcome) {
        let (code, outcome) = match result {
            Ok(()) => (VIRTIO_BLK_S_OK, Outcome::Done),
            Err(Failed::Unsupported(kind)) => (
                VIRTIO_BLK_S_UNSUPP,
                Outcome::Failed(format!("request type {kind} is not supported")),
            ),
            Err(e) => (VIRTIO_BLK_S_IOERR, Outcome::Failed(e.to_string())),
        };
        match status.write_all(&[code]) {
            // The data and status written: both are at most the chain's writable bytes.
            Ok(()) => ((written + 1) as u32, outcome),
            Err(e) => (0, Outcome::Malformed(format!("status byte: {e}"))),
        }
    }

    fn blocks_of(&self, sector: u64, len: usize) -> Result<u64, Failed> {
        let per_block = BLOCK as u64 / SECTOR;
        if len > MAX_REQUEST {
            return Err(Failed::TooLong(len));
        }
        if !sector.is_multiple_of(per_block) {
            return Err(Failed::Unaligned { sector, len });
        }
        Ok(sector / per_block)
    }

    fn read(&mut self, sector: u64, len: usize) -> Result<Vec<u8>, Failed> {
        let lba = self.blocks_of(sector, len)?;
        let mut data = vec![0u8; len];
        self.disk.read(lba, &mut data).map_err(Failed::Block)?;
        Ok(data)
    }

    fn write<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        sector: u64,
        reader: &mut virtio_queue::Reader<'_, B>,
    ) -> Result<(), Failed> {
        let len = reader.available_bytes();
        let lba = self.blocks_of(sector, len)?;
        let mut data = vec![0u8; len];
        reader
            .read_exact(&mut data)
            .map_err(|e| Failed::Io(format!("data: {e}")))?;
        self.disk.write(lba, &data).map_err(Failed::Block)
    }
}

/// Why a request got an error status.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error("{0}")]
    Block(BlockError),
    #[error("sector {sector}, {len} bytes: not whole 4 KiB blocks")]
    Unaligned { sector: u64, len: usize },
    #[error("{0} bytes is more than a request may carry")]
    TooLong(usize),
    #[error("guest buffer: {0}")]
    Io(String),
    #[error("request type {0}")]
    Unsupported(u32),
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::Address;
    use vm_memory::Bytes;
    use vm_memory::GuestAddress;
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::block::encrypted::EncryptedDisk;
    use crate::block::raw::RawDisk;
    use crate::block::MemStore;
    use crate::virtio::testing::desc;
    use crate::virtio::testing::memory;
    use crate::virtio::testing::NEXT;
    use crate::virtio::testing::WRITE;

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn device(blocks: usize) -> VirtioBlk<RawDisk<MemStore>> {
        let disk = RawDisk::new(MemStore {
            bytes: vec![0; blocks * BLOCK],
        })
        .unwrap();
        VirtioBlk::new(disk, "pv-disk-0")
    }

    /// Puts `descs` on a fresh queue as one chain and processes it: the outcome, the used
    /// length and the status byte.
    fn run<D: Disk>(
        dev: &mut VirtioBlk<D>,
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
    ) -> (Outcome, u32, u8) {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let outcomes = dev.process(mem, &mut queue);
        assert_eq!(outcomes.len(), 1, "{outcomes:?}");
        let used_len: u32 = mem.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
        let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
        (outcomes[0].clone(), used_len, status)
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
    }

    /// A request with `len` data bytes, read by the device (`out`) or written by it.
    fn request(len: u32, out: bool) -> Vec<RawDescriptor> {
        vec![
            desc(HEADER, 16, NEXT),
            desc(DATA, len, NEXT | if out { 0 } else { WRITE }),
            desc(STATUS, 1, WRITE),
        ]
    }

    #[test]
    fn a_written_block_reads_back() {
        let mem = memory();
        let mut dev = device(4);
        let pattern: Vec<u8> = (0..2 * BLOCK).map(|i| (i % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 8);
        let out = run(&mut dev, &mem, &request(2 * BLOCK as u32, true));
        assert_eq!(
            out,
            (Outcome::Done, 1, VIRTIO_BLK_S_OK),
            "only the status written"
        );
        mem.write_slice(&vec![0; 2 * BLOCK], GuestAddress(DATA))
            .unwrap();
        header(&mem, VIRTIO_BLK_T_IN, 8);
        let out = run(&mut dev, &mem, &request(2 * BLOCK as u32, false));
        assert_eq!(out, (Outcome::Done, 2 * BLOCK as u32 + 1, VIRTIO_BLK_S_OK));
        let mut back = vec![0; 2 * BLOCK];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let flush = [desc(HEADER, 16, NEXT), desc(STATUS, 1, WRITE)];
        assert_eq!(run(&mut dev, &mem, &flush).2, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn requests_that_are_not_whole_blocks_on_the_disk_get_an_error_status() {
        let mem = memory();
        let mut dev = device(4);
        for (sector, len) in [
            (1, BLOCK as u32),      // not on a block boundary
            (0, 512),               // not a whole block
            (24, 2 * BLOCK as u32), // past the last block
            (u64::MAX - 7, BLOCK as u32),
        ] {
            header(&mem, VIRTIO_BLK_T_IN, sector);
            let (outcome, used, status) = run(&mut dev, &mem, &request(len, false));
            assert_eq!(status, VIRTIO_BLK_S_IOERR, "{sector} {len}: {outcome:?}");
            assert_eq!(used, 1);
            assert!(matches!(outcome, Outcome::Failed(_)));
        }
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        let too_long = request(MAX_REQUEST as u32 + BLOCK as u32, true);
        assert_eq!(run(&mut dev, &mem, &too_long).2, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn get_id_answers_the_serial_and_unknown_types_are_unsupported() {
        let mem = memory();
        let mut dev = device(1);
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let (_, used, status) = run(&mut dev, &mem, &request(ID_BYTES as u32, false));
        assert_eq!((used, status), (ID_BYTES as u32 + 1, VIRTIO_BLK_S_OK));
        let mut id = [0u8; ID_BYTES];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..9], b"pv-disk-0");
        header(&mem, 99, 0);
        assert_eq!(
            run(&mut dev, &mem, &request(16, false)).2,
            VIRTIO_BLK_S_UNSUPP
        );
    }

    #[test]
    fn chains_that_cannot_carry_a_status_are_returned_untouched() {
        let mem = memory();
        let mut dev = device(1);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        // No writable byte at all.
        let (outcome, used, status) =
            run(&mut dev, &mem, &[desc(HEADER, 16, NEXT), desc(DATA, 16, 0)]);
        assert!(matches!(outcome, Outcome::Malformed(_)), "{outcome:?}");
        assert_eq!((used, status), (0, 0xff));
        // A buffer outside guest memory.
        let outside = [
            desc(HEADER, 16, NEXT),
            desc(0x3f_ff00, 0x1000, NEXT | WRITE),
            desc(STATUS, 1, WRITE),
        ];
        let (outcome, used, status) = run(&mut dev, &mem, &outside);
        assert!(matches!(outcome, Outcome::Malformed(_)), "{outcome:?}");
        assert_eq!((used, status), (0, 0xff));
        // A header shorter than 16 bytes: an error status, nothing read past it.
        let short = [desc(HEADER, 8, NEXT), desc(STATUS, 1, WRITE)];
        assert_eq!(run(&mut dev, &mem, &short).2, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn a_chain_that_loops_ends() {
        let mem = memory();
        let mut dev = device(1);
        let vq = MockSplitQueue::new(&mem, 16);
        header(&mem, VIRTIO_BLK_T_OUT, 0);
        // Descriptor 0 -> 1 -> 0 -> ...: the queue's bound on a chain stops it.
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(HEADER, 16, NEXT, 1)),
                RawDescriptor::from(SplitDescriptor::new(DATA, 4096, NEXT, 0)),
            ],
            0,
        )
        .unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        let outcomes = dev.process(&mem, &mut queue);
        assert!(
            outcomes.iter().all(|o| matches!(o, Outcome::Malformed(_))),
            "{outcomes:?}"
        );
    }

    #[test]
    fn a_changed_encrypted_block_is_an_io_error_naming_it() {
        let mem = memory();
        let disk = EncryptedDisk::create(MemStore::default(), &[7; 32], 4).unwrap();
        let mut dev = VirtioBlk::new(disk, "enc");
        mem.write_slice(&[0xab; BLOCK], GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_OUT, 16);
        assert_eq!(
            run(&mut dev, &mem, &request(BLOCK as u32, true)).2,
            VIRTIO_BLK_S_OK
        );
        // The host flips a bit of block 2's ciphertext (the image ends with blocks 2 and 3).
        let store = dev.disk().store_mut();
        let end = store.bytes.len();
        store.bytes[end - 2 * BLOCK + 5] ^= 1;
        header(&mem, VIRTIO_BLK_T_IN, 16);
        let (outcome, _, status) = run(&mut dev, &mem, &request(BLOCK as u32, false));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        assert_eq!(
            outcome,
            Outcome::Failed("block 2: unreadable (its contents or seal were changed)".into())
        );
        let mut data = [0u8; BLOCK];
        mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
        assert!(
            data.iter().all(|b| *b == 0xab),
            "no byte of the changed block reached the guest"
        );
    }

    #[test]
    fn the_configuration_says_capacity_in_sectors_and_4_kib_blocks() {
        let dev = device(3);
        let c = dev.config();
        assert_eq!(u64::from_le_bytes(c[..8].try_into().unwrap()), 24);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_ne!(dev.features() & VIRTIO_BLK_F_FLUSH, 0);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 1);
        let mut dev = dev;
        dev.set_queues(4);
        assert_eq!(
            u16::from_le_bytes(dev.config()[34..36].try_into().unwrap()),
            4
        );
        dev.set_queues(0);
        assert_eq!(dev.queues(), 1, "a device has at least one queue");
    }
}
