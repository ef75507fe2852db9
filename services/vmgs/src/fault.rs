//! A storage device for crash tests: it records every write and flush, and can be told to
//! stop (as at a power cut) after the n-th operation, or to fail it.
//!
//! The model of durability is the strict one: at a crash, writes since the last completed
//! flush may or may not have reached the medium. [`FaultyStorage::crash_images`] gives the
//! images a crash can leave behind.

use alloc::vec::Vec;

use crate::storage::MemStorage;
use crate::storage::Storage;
use crate::storage::StorageError;
use crate::storage::StorageResult;

/// One device operation, as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Write { offset: u64, bytes: Vec<u8> },
    Flush,
}

/// What happens at the chosen operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The device stops: this operation and all later ones fail and change nothing.
    Stop,
    /// This operation fails with an I/O error; later ones work.
    Fail,
    /// This operation takes effect (a write lands in the cache, a flush makes it durable)
    /// but reports an I/O error: the caller cannot tell what happened.
    FailAfter,
}

/// A memory device that counts writes and flushes and fails on demand.
#[derive(Clone, Debug, Default)]
pub struct FaultyStorage {
    /// What the medium holds for sure (everything before the last completed flush).
    durable: MemStorage,
    /// Writes since the last completed flush: visible to reads, not yet durable.
    pending: Vec<Op>,
    /// The view reads see.
    current: MemStorage,
    /// Operations seen so far (writes and flushes).
    pub ops: usize,
    /// Fault at operation number `n` (0-based), if any.
    pub fault_at: Option<(usize, Fault)>,
    stopped: bool,
}

impl FaultyStorage {
    pub fn new(image: Vec<u8>) -> FaultyStorage {
        FaultyStorage {
            durable: MemStorage::new(image.clone()),
            current: MemStorage::new(image),
            ..FaultyStorage::default()
        }
    }

    /// Fault at the n-th write or flush from now on.
    pub fn fail_at(&mut self, n: usize, fault: Fault) {
        self.ops = 0;
        self.fault_at = Some((n, fault));
        self.stopped = false;
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The bytes as reads see them now.
    pub fn image(&self) -> &[u8] {
        &self.current.bytes
    }

    /// Images a crash now can leave: the durable state plus each prefix of the unflushed
    /// writes (in issue order), and, for each of them alone, the durable state plus only that
    /// one (devices reorder). Always includes the durable state and the current view.
    pub fn crash_images(&self) -> Vec<Vec<u8>> {
        let mut images = Vec::new();
        let mut image = self.durable.clone();
        images.push(image.bytes.clone());
        for op in &self.pending {
            if let Op::Write { offset, bytes } = op {
                let _ = image.write_at(*offset, bytes);
                images.push(image.bytes.clone());
            }
        }
        for op in &self.pending {
            if let Op::Write { offset, bytes } = op {
                let mut one = self.durable.clone();
                let _ = one.write_at(*offset, bytes);
                images.push(one.bytes);
            }
        }
        images
    }

    /// Counts an operation; says whether to perform it and whether to report an error.
    fn next(&mut self) -> (bool, StorageResult<()>) {
        if self.stopped {
            return (false, Err(StorageError::other("device stopped")));
        }
        let n = self.ops;
        self.ops += 1;
        match self.fault_at {
            Some((at, Fault::Stop)) if at == n => {
                self.stopped = true;
                (false, Err(StorageError::other("device stopped")))
            }
            Some((at, Fault::Fail)) if at == n => {
                (false, Err(StorageError::other("injected I/O error")))
            }
            Some((at, Fault::FailAfter)) if at == n => (
                true,
                Err(StorageError::other("injected I/O error after the fact")),
            ),
            _ => (true, Ok(())),
        }
    }
}

impl Storage for FaultyStorage {
    fn size(&self) -> StorageResult<u64> {
        self.current.size()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> StorageResult<()> {
        if self.stopped {
            return Err(StorageError::other("device stopped"));
        }
        self.current.read_at(offset, buf)
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> StorageResult<()> {
        let (perform, result) = self.next();
        if perform {
            self.current.write_at(offset, buf)?;
            self.pending.push(Op::Write {
                offset,
                bytes: buf.to_vec(),
            });
        }
        result
    }

    fn flush(&mut self) -> StorageResult<()> {
        let (perform, result) = self.next();
        if perform {
            self.durable = self.current.clone();
            self.pending.clear();
        }
        result
    }
}
