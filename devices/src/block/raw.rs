//! The raw back end: block `n` is bytes `n * 4096..` of the image, as the guest wrote them.

use super::range;
use super::BlockError;
use super::Disk;
use super::Store;
use super::BLOCK;

pub struct RawDisk<S: Store> {
    store: S,
    blocks: u64,
}

impl<S: Store> RawDisk<S> {
    /// The disk in `store`: as many whole blocks as the image holds.
    pub fn new(store: S) -> Result<RawDisk<S>, BlockError> {
        let blocks = store.size()? / BLOCK as u64;
        Ok(RawDisk { store, blocks })
    }
}

impl<S: Store> Disk for RawDisk<S> {
    fn blocks(&self) -> u64 {
        self.blocks
    }

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        range(lba, buf.len(), self.blocks)?;
        self.store.read_at(lba * BLOCK as u64, buf)
    }

    fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), BlockError> {
        range(lba, data.len(), self.blocks)?;
        self.store.write_at(lba * BLOCK as u64, data)
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        self.store.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemStore;

    #[test]
    fn blocks_read_back_and_requests_stay_on_the_disk() {
        let mut disk = RawDisk::new(MemStore {
            bytes: vec![0; 4 * BLOCK + 100],
        })
        .unwrap();
        assert_eq!(disk.blocks(), 4, "a partial block is not a block");
        disk.write(1, &[7; 2 * BLOCK]).unwrap();
        let mut back = vec![0; 2 * BLOCK];
        disk.read(1, &mut back).unwrap();
        assert_eq!(back, vec![7; 2 * BLOCK]);
        assert_eq!(
            disk.read(3, &mut back),
            Err(BlockError::OutOfRange {
                first: 3,
                end: 5,
                blocks: 4
            })
        );
        assert_eq!(disk.write(0, &[1; 100]), Err(BlockError::Unaligned(100)));
        assert!(matches!(
            disk.read(u64::MAX, &mut back),
            Err(BlockError::OutOfRange { .. })
        ));
    }
}
