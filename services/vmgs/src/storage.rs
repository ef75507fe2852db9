//! Where the bytes of a VMGS image live. The format code reads and writes only through
//! [`Storage`], so tests can put it on memory that fails on demand ([`crate::fault`]) and the
//! service can put it on the descriptor the microkernel granted.

use std::io;

/// A byte-addressed device with an explicit durability barrier.
pub trait Storage {
    /// Current length in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset`; a short device is an error (`UnexpectedEof`).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the device if needed.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Makes every completed write durable: a write is not known to survive a crash until a
    /// `flush` after it has returned.
    fn flush(&mut self) -> io::Result<()>;
}

impl<S: Storage + ?Sized> Storage for &mut S {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        (**self).write_at(offset, buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        (**self).flush()
    }
}

/// An image held in memory (tests, fuzzing, and building a file before it is published).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemStorage {
    pub bytes: Vec<u8>,
}

impl MemStorage {
    pub fn new(bytes: Vec<u8>) -> MemStorage {
        MemStorage { bytes }
    }
}

fn range(offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
    let end = start.checked_add(len).ok_or(io::ErrorKind::InvalidInput)?;
    Ok(start..end)
}

impl Storage for MemStorage {
    fn size(&self) -> io::Result<u64> {
        Ok(self.bytes.len() as u64)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = range(offset, buf.len())?;
        let src = self
            .bytes
            .get(r)
            .ok_or(io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let r = range(offset, buf.len())?;
        if self.bytes.len() < r.end {
            self.bytes.resize(r.end, 0);
        }
        self.bytes[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A regular file. `flush` is `fdatasync`.
#[derive(Debug)]
pub struct FileStorage {
    file: std::fs::File,
}

impl FileStorage {
    pub fn new(file: std::fs::File) -> FileStorage {
        FileStorage { file }
    }

    pub fn into_inner(self) -> std::fs::File {
        self.file
    }
}

impl Storage for FileStorage {
    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.file, buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}
