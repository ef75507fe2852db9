//! A mapped shared-memory file (memfd), owned with its mapping.

use std::io;
use std::os::fd::AsFd;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;

use super::sys;

/// A memfd and a shared mapping of all of it. The memory may be written at any time by the
/// other processes that map it, so this type never hands out references to it: only raw
/// pointers (for the ring code) and checked copies.
#[derive(Debug)]
pub struct SharedMemory {
    ptr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
    /// The memfd name given at creation (empty for received mappings).
    name: String,
}

// SAFETY: the mapping is process-wide and not tied to a thread; access goes through raw
// copies and atomics only.
unsafe impl Send for SharedMemory {}

impl SharedMemory {
    /// Creates and maps a zero-filled region of `len` bytes, its size sealed.
    pub fn create(name: &str, len: usize) -> io::Result<SharedMemory> {
        let fd = sys::memfd(name, len as u64)?;
        sys::seal_size(&fd)?;
        let ptr = sys::map_shared(&fd, len, true)?;
        Ok(SharedMemory {
            ptr,
            len,
            fd,
            name: name.to_string(),
        })
    }

    /// Maps all of an existing shared-memory descriptor (received as a capability).
    pub fn map(fd: OwnedFd, writable: bool) -> io::Result<SharedMemory> {
        let len = sys::file_size(&fd)?;
        if len == 0 || len > isize::MAX as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("shared region has unusable size {len}"),
            ));
        }
        let len = len as usize;
        let ptr = sys::map_shared(&fd, len, writable)?;
        Ok(SharedMemory {
            ptr,
            len,
            fd,
            name: String::new(),
        })
    }

    /// The memfd name given at creation (what `/proc/PID/fd` shows as `/memfd:NAME`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies `buf.len()` bytes from `offset` out of the region.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> io::Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: bounds checked above; the source is shared memory of plain bytes that a peer
        // may be changing, which is fine for a byte copy whose result is validated by callers.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Copies `data` into the region at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> io::Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: bounds checked above; the mapping is writable for regions we create, and a
        // write to a read-only mapping would fault, which `map(.., false)` callers never do.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Reads `len` bytes at `offset` in place, 8 bytes at a time, folding each word into an
    /// accumulator (a checksum over data passed by reference, without copying it out).
    /// `offset` and `len` must be multiples of 8.
    pub fn fold_words(
        &self,
        offset: usize,
        len: usize,
        init: u64,
        f: impl Fn(u64, u64) -> u64,
    ) -> io::Result<u64> {
        self.check(offset, len)?;
        if !offset.is_multiple_of(8) || !len.is_multiple_of(8) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let mut acc = init;
        for i in (0..len).step_by(8) {
            // SAFETY: in bounds (checked) and 8-aligned (page-aligned mapping, aligned offset);
            // a volatile read of a plain word that a peer may be writing yields some value,
            // which is all a checksum needs.
            let word = unsafe {
                self.ptr
                    .as_ptr()
                    .add(offset + i)
                    .cast::<u64>()
                    .read_volatile()
            };
            acc = f(acc, word);
        }
        Ok(acc)
    }

    fn check(&self, offset: usize, len: usize) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is outside the {}-byte region",
                    self.len
                ),
            )),
        }
    }

    /// An atomic u32 inside the region (for status words).
    pub fn atomic_u32(&self, offset: usize) -> io::Result<&std::sync::atomic::AtomicU32> {
        self.check(offset, 4)?;
        if !offset.is_multiple_of(4) {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // SAFETY: in bounds and aligned (the mapping is page-aligned); shared memory is only
        // accessed atomically through the returned reference, which borrows `self` and so
        // cannot outlive the mapping.
        Ok(unsafe { std::sync::atomic::AtomicU32::from_ptr(self.ptr.as_ptr().add(offset).cast()) })
    }
}

impl AsFd for SharedMemory {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for SharedMemory {
    fn as_raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are our live mapping; no borrow of it can outlive `self`.
        unsafe { sys::unmap(self.ptr, self.len) };
    }
}
