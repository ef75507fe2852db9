//! Where the bytes of a VMGS image live. The format code reads and writes only through
//! [`Storage`], so tests can put it on memory that fails on demand ([`crate::fault`]) and the
//! service can put it on the descriptor the microkernel granted.

use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::ops::Range;

/// What kind of failure a [`StorageError`] is, for callers that act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageErrorKind {
    /// A read went past the end of the device.
    UnexpectedEof,
    /// An offset or length the device cannot address.
    InvalidInput,
    /// Anything else the device reported (a host I/O error, a stopped device).
    Other,
}

impl StorageErrorKind {
    /// What the kind says when the device gives no message of its own.
    fn describe(self) -> &'static str {
        match self {
            StorageErrorKind::UnexpectedEof => "unexpected end of file",
            StorageErrorKind::InvalidInput => "invalid input parameter",
            StorageErrorKind::Other => "other error",
        }
    }
}

/// Why a [`Storage`] operation failed: a kind to act on and a message to log. On the hosted
/// platform it is made from an `std::io::Error`, whose kind and text it keeps (the log reads as
/// before: "I/O error while reading the file: Input/output error (os error 5)").
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct StorageError {
    kind: StorageErrorKind,
    message: Cow<'static, str>,
}

impl StorageError {
    /// An error of `kind` with the device's own message.
    pub fn new(kind: StorageErrorKind, message: impl Into<Cow<'static, str>>) -> StorageError {
        StorageError {
            kind,
            message: message.into(),
        }
    }

    /// An error of no particular kind (what `std::io::Error::other` is to `io::Error`).
    pub fn other(message: impl Into<Cow<'static, str>>) -> StorageError {
        StorageError::new(StorageErrorKind::Other, message)
    }

    pub fn kind(&self) -> StorageErrorKind {
        self.kind
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<StorageErrorKind> for StorageError {
    fn from(kind: StorageErrorKind) -> StorageError {
        StorageError::new(kind, kind.describe())
    }
}

#[cfg(feature = "std")]
impl From<std::io::Error> for StorageError {
    fn from(e: std::io::Error) -> StorageError {
        let kind = match e.kind() {
            std::io::ErrorKind::UnexpectedEof => StorageErrorKind::UnexpectedEof,
            std::io::ErrorKind::InvalidInput => StorageErrorKind::InvalidInput,
            _ => StorageErrorKind::Other,
        };
        StorageError::new(kind, e.to_string())
    }
}

#[cfg(feature = "std")]
impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> std::io::Error {
        let kind = match e.kind {
            StorageErrorKind::UnexpectedEof => std::io::ErrorKind::UnexpectedEof,
            StorageErrorKind::InvalidInput => std::io::ErrorKind::InvalidInput,
            StorageErrorKind::Other => std::io::ErrorKind::Other,
        };
        std::io::Error::new(kind, e.message.into_owned())
    }
}

/// What a [`Storage`] operation returns.
pub type StorageResult<T> = Result<T, StorageError>;

/// A byte-addressed device with an explicit durability barrier.
pub trait Storage {
    /// Current length in bytes.
    fn size(&self) -> StorageResult<u64>;
    /// Fills `buf` from `offset`; a short device is an error (`UnexpectedEof`).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> StorageResult<()>;
    /// Writes all of `buf` at `offset`, growing the device if needed.
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> StorageResult<()>;
    /// Makes every completed write durable: a write is not known to survive a crash until a
    /// `flush` after it has returned.
    fn flush(&mut self) -> StorageResult<()>;
}

impl<S: Storage + ?Sized> Storage for &mut S {
    fn size(&self) -> StorageResult<u64> {
        (**self).size()
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> StorageResult<()> {
        (**self).read_at(offset, buf)
    }
    fn write_at(&mut self, offset: u64, buf: &[u8]) -> StorageResult<()> {
        (**self).write_at(offset, buf)
    }
    fn flush(&mut self) -> StorageResult<()> {
        (**self).flush()
    }
}

/// An image held in memory (tests, fuzzing, building a file before it is published, and the
/// metal platform's RAM disk).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemStorage {
    pub bytes: Vec<u8>,
}

impl MemStorage {
    pub fn new(bytes: Vec<u8>) -> MemStorage {
        MemStorage { bytes }
    }
}

fn range(offset: u64, len: usize) -> StorageResult<Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| StorageErrorKind::InvalidInput)?;
    let end = start
        .checked_add(len)
        .ok_or(StorageErrorKind::InvalidInput)?;
    Ok(start..end)
}

impl Storage for MemStorage {
    fn size(&self) -> StorageResult<u64> {
        Ok(self.bytes.len() as u64)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> StorageResult<()> {
        let r = range(offset, buf.len())?;
        let src = self.bytes.get(r).ok_or(StorageErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> StorageResult<()> {
        let r = range(offset, buf.len())?;
        if self.bytes.len() < r.end {
            self.bytes.resize(r.end, 0);
        }
        self.bytes[r].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> StorageResult<()> {
        Ok(())
    }
}

/// A regular file (hosted platform). `flush` is `fdatasync`.
#[cfg(feature = "std")]
#[derive(Debug)]
pub struct FileStorage {
    file: std::fs::File,
}

#[cfg(feature = "std")]
impl FileStorage {
    pub fn new(file: std::fs::File) -> FileStorage {
        FileStorage { file }
    }

    pub fn into_inner(self) -> std::fs::File {
        self.file
    }
}

#[cfg(feature = "std")]
impl Storage for FileStorage {
    fn size(&self) -> StorageResult<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> StorageResult<()> {
        Ok(std::os::unix::fs::FileExt::read_exact_at(
            &self.file, buf, offset,
        )?)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> StorageResult<()> {
        Ok(std::os::unix::fs::FileExt::write_all_at(
            &self.file, buf, offset,
        )?)
    }

    fn flush(&mut self) -> StorageResult<()> {
        Ok(self.file.sync_data()?)
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    /// The hosted log names an I/O failure as `std::io::Error` did before the library had its
    /// own error type, and a conversion back keeps the kind.
    #[test]
    fn io_errors_keep_their_kind_and_message() {
        let eio = std::io::Error::from_raw_os_error(5);
        let text = eio.to_string();
        let e = StorageError::from(eio);
        assert_eq!((e.kind(), e.to_string()), (StorageErrorKind::Other, text));
        let eof = StorageError::from(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        assert_eq!(eof.kind(), StorageErrorKind::UnexpectedEof);
        assert_eq!(
            std::io::Error::from(eof).kind(),
            std::io::ErrorKind::UnexpectedEof
        );
        let short = MemStorage::new(vec![0; 4])
            .read_at(2, &mut [0; 4])
            .unwrap_err();
        assert_eq!(
            short.to_string(),
            std::io::Error::from(std::io::ErrorKind::UnexpectedEof).to_string()
        );
    }
}
