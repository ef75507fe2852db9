//! Block back ends: what a storage device model (virtio-blk, virtio-scsi, NVMe) turns the
//! guest's requests into. A [`Disk`] has 4 KiB blocks; a request names a block range. Two
//! back ends: [`raw::RawDisk`] (the image holds the guest's bytes) and
//! [`encrypted::EncryptedDisk`] (each block sealed with AES-256-GCM; the host sees
//! ciphertext, and a changed block reads as a medium error, never as other data).
//!
//! Back ends reach the image through [`Store`], so that they are tested in memory and the
//! service gives them its granted file.

pub mod encrypted;
pub mod raw;

/// Bytes of a block.
pub const BLOCK: usize = 4096;

/// Why a block request failed, as a device reports it to the guest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The block at `lba` does not read back as written (its seal does not open): a medium
    /// error for that block (the guest gets an I/O error, never other data).
    #[error("block {lba}: unreadable (its contents or seal were changed)")]
    Medium { lba: u64 },
    /// The request reaches past the disk's last block.
    #[error("blocks {first}..{end} are outside the disk's {blocks} blocks")]
    OutOfRange { first: u64, end: u64, blocks: u64 },
    /// The buffer is not a whole number of blocks.
    #[error("a {0}-byte buffer is not a whole number of {BLOCK}-byte blocks")]
    Unaligned(usize),
    /// The image could not be read or written.
    #[error("image I/O: {0}")]
    Io(String),
}

/// A disk of [`BLOCK`]-byte blocks.
pub trait Disk {
    /// Blocks the guest sees.
    fn blocks(&self) -> u64;
    /// Reads blocks `lba..` into `buf` (a whole number of blocks).
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes `data` (a whole number of blocks) to blocks `lba..`.
    fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), BlockError>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), BlockError>;
}

impl<D: Disk + ?Sized> Disk for Box<D> {
    fn blocks(&self) -> u64 {
        (**self).blocks()
    }
    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        (**self).read(lba, buf)
    }
    fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), BlockError> {
        (**self).write(lba, data)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        (**self).flush()
    }
}

/// The image a back end keeps its bytes in (a file the manifest grants, or memory in tests).
pub trait Store {
    /// Bytes of the image.
    fn size(&self) -> Result<u64, BlockError>;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError>;
    /// Makes the completed writes durable.
    fn sync(&mut self) -> Result<(), BlockError>;
    /// Grows (or shrinks) the image to `len` bytes.
    fn set_len(&mut self, len: u64) -> Result<(), BlockError>;
}

/// An image in memory (tests, fuzzing).
#[derive(Debug, Clone, Default)]
pub struct MemStore {
    pub bytes: Vec<u8>,
}

impl Store for MemStore {
    fn size(&self) -> Result<u64, BlockError> {
        Ok(self.bytes.len() as u64)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| self.bytes.get(o..o.checked_add(buf.len())?))
            .ok_or_else(|| BlockError::Io(format!("read past the end at {offset}")))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        let dst = usize::try_from(offset)
            .ok()
            .and_then(|o| self.bytes.get_mut(o..o.checked_add(data.len())?))
            .ok_or_else(|| BlockError::Io(format!("write past the end at {offset}")))?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), BlockError> {
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> Result<(), BlockError> {
        let len = usize::try_from(len).map_err(|_| BlockError::Io("too large".into()))?;
        self.bytes.resize(len, 0);
        Ok(())
    }
}

/// An image file (the service's granted `files` capability).
#[derive(Debug)]
pub struct FileStore(pub std::fs::File);

impl Store for FileStore {
    fn size(&self) -> Result<u64, BlockError> {
        self.0.metadata().map(|m| m.len()).map_err(io)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset).map_err(io)
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, data, offset).map_err(io)
    }

    fn sync(&mut self) -> Result<(), BlockError> {
        self.0.sync_data().map_err(io)
    }

    fn set_len(&mut self, len: u64) -> Result<(), BlockError> {
        self.0.set_len(len).map_err(io)
    }
}

fn io(e: std::io::Error) -> BlockError {
    BlockError::Io(e.to_string())
}

/// The blocks `lba..` a buffer of `len` bytes covers, checked against a disk of `blocks`.
pub(crate) fn range(lba: u64, len: usize, blocks: u64) -> Result<u64, BlockError> {
    if !len.is_multiple_of(BLOCK) {
        return Err(BlockError::Unaligned(len));
    }
    let count = (len / BLOCK) as u64;
    match lba.checked_add(count) {
        Some(end) if end <= blocks => Ok(count),
        end => Err(BlockError::OutOfRange {
            first: lba,
            end: end.unwrap_or(u64::MAX),
            blocks,
        }),
    }
}
