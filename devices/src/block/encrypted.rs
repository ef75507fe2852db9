//! The encrypted back end: every block sealed with AES-256-GCM under the disk key, so that
//! the host, which keeps the image, sees only ciphertext, and a block it changes (or moves to
//! another address) reads as a medium error for that block, never as other data.
//!
//! Image layout (all little-endian):
//! - block 0, the header: magic `PVBLKENC`, format 1 (u32), block size 4096 (u32), data
//!   blocks (u64), then a key check: a nonce (12) and the GCM tag (16) of an empty message
//!   whose associated data is the 24 header bytes before it. A wrong key, or a changed
//!   header, does not open.
//! - blocks 1..1+M, the records: 32 bytes per data block (nonce 12, tag 16, 4 zero), 128 per
//!   block. An all-zero record is a block never written: it reads as zeros.
//! - blocks 1+M.., the data: block `lba`'s ciphertext, sealed with a random nonce and the
//!   associated data `PVBLK` || lba (so a block moved to another address does not open).
//!
//! What this does not protect against: the host giving back an older image, or an older
//! copy of one block with its record (whole-image or per-block rollback: both open, as they
//! were once written), or a zeroed record (the block then reads as never written). The
//! freshness of the whole disk needs a counter outside the host's reach (e.g. in VMGS).
//! Nonces are random (96 bits): the key is good for about 2^32 block writes (16 TiB).

use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use aes_gcm::Nonce;
use aes_gcm::Tag;

use super::range;
use super::BlockError;
use super::Disk;
use super::Store;
use super::BLOCK;

const MAGIC: [u8; 8] = *b"PVBLKENC";
const FORMAT: u32 = 1;
/// Bytes of the header the key check authenticates.
const HEADER_AAD: usize = 24;
const RECORD: usize = 32;
const RECORDS_PER_BLOCK: u64 = (BLOCK / RECORD) as u64;

/// Why an image does not open as an encrypted disk.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not an encrypted disk image (no PVBLKENC header)")]
    NotEncrypted,
    #[error("encrypted disk format {0}, this build reads format 1")]
    Format(u32),
    #[error("the header's block size is {0}, not 4096")]
    BlockSize(u32),
    #[error("the key does not open this disk (or its header was changed)")]
    WrongKey,
    #[error("the image is {actual} bytes; its header needs {needed}")]
    Truncated { actual: u64, needed: u64 },
    #[error("{0}")]
    Block(#[from] BlockError),
}

/// A disk whose blocks are sealed in its image.
pub struct EncryptedDisk<S: Store> {
    store: S,
    cipher: Aes256Gcm,
    blocks: u64,
    /// First byte of the data area.
    data: u64,
}

/// Image bytes for `blocks` data blocks: header, records, data.
fn layout(blocks: u64) -> Option<(u64, u64)> {
    let record_blocks = blocks.div_ceil(RECORDS_PER_BLOCK);
    let data = 1u64.checked_add(record_blocks)?.checked_mul(BLOCK as u64)?;
    let end = data.checked_add(blocks.checked_mul(BLOCK as u64)?)?;
    Some((data, end))
}

fn header_aad(blocks: u64) -> [u8; HEADER_AAD] {
    let mut h = [0u8; HEADER_AAD];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    h[16..24].copy_from_slice(&blocks.to_le_bytes());
    h
}

fn block_aad(lba: u64) -> [u8; 13] {
    let mut a = [0u8; 13];
    a[..5].copy_from_slice(b"PVBLK");
    a[5..].copy_from_slice(&lba.to_le_bytes());
    a
}

fn random_nonce() -> Result<[u8; 12], BlockError> {
    let mut n = [0u8; 12];
    getrandom::getrandom(&mut n).map_err(|e| BlockError::Io(format!("no randomness: {e}")))?;
    Ok(n)
}

impl<S: Store> EncryptedDisk<S> {
    /// Makes a new disk of `blocks` blocks in `store` (its image is sized to fit; every block
    /// reads as zeros until written).
    pub fn create(
        mut store: S,
        key: &[u8; 32],
        blocks: u64,
    ) -> Result<EncryptedDisk<S>, OpenError> {
        let (data, end) = layout(blocks).ok_or(BlockError::OutOfRange {
            first: 0,
            end: blocks,
            blocks: u64::MAX / BLOCK as u64,
        })?;
        let cipher = Aes256Gcm::new(key.into());
        store.set_len(0)?;
        store.set_len(end)?;
        let aad = header_aad(blocks);
        let nonce = random_nonce()?;
        let tag = cipher
            .encrypt_inout_detached(&Nonce::from(nonce), &aad, (&mut [][..]).into())
            .map_err(|_| BlockError::Io("sealing the header failed".into()))?;
        let mut header = [0u8; BLOCK];
        header[..HEADER_AAD].copy_from_slice(&aad);
        header[HEADER_AAD..HEADER_AAD + 12].copy_from_slice(&nonce);
        header[HEADER_AAD + 12..HEADER_AAD + 28].copy_from_slice(&tag);
        store.write_at(0, &header)?;
        store.sync()?;
        Ok(EncryptedDisk {
            store,
            cipher,
            blocks,
            data,
        })
    }

    /// Opens the disk in `store` under `key`: the header must be ours, its key check must open
    /// and the image must hold every block it names.
    pub fn open(mut store: S, key: &[u8; 32]) -> Result<EncryptedDisk<S>, OpenError> {
        if store.size()? < BLOCK as u64 {
            return Err(OpenError::NotEncrypted);
        }
        let mut header = [0u8; HEADER_AAD + 28];
        store.read_at(0, &mut header)?;
        if header[..8] != MAGIC {
            return Err(OpenError::NotEncrypted);
        }
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4"));
        if word(8) != FORMAT {
            return Err(OpenError::Format(word(8)));
        }
        if word(12) != BLOCK as u32 {
            return Err(OpenError::BlockSize(word(12)));
        }
        let blocks = u64::from_le_bytes(header[16..24].try_into().expect("8"));
        let cipher = Aes256Gcm::new(key.into());
        let nonce: [u8; 12] = header[HEADER_AAD..HEADER_AAD + 12].try_into().expect("12");
        let tag: [u8; 16] = header[HEADER_AAD + 12..HEADER_AAD + 28]
            .try_into()
            .expect("16");
        cipher
            .decrypt_inout_detached(
                &Nonce::from(nonce),
                &header[..HEADER_AAD],
                (&mut [][..]).into(),
                &Tag::from(tag),
            )
            .map_err(|_| OpenError::WrongKey)?;
        let (data, end) = layout(blocks).ok_or(OpenError::Truncated {
            actual: store.size()?,
            needed: u64::MAX,
        })?;
        let actual = store.size()?;
        if actual < end {
            return Err(OpenError::Truncated {
                actual,
                needed: end,
            });
        }
        Ok(EncryptedDisk {
            store,
            cipher,
            blocks,
            data,
        })
    }

    /// The image (tests change it as a host would).
    pub fn store_mut(&mut self) -> &mut S {
        &mut self.store
    }

    fn record_at(&self, lba: u64) -> u64 {
        BLOCK as u64 + lba * RECORD as u64
    }

    fn read_block(&mut self, lba: u64, out: &mut [u8]) -> Result<(), BlockError> {
        let mut record = [0u8; RECORD];
        self.store.read_at(self.record_at(lba), &mut record)?;
        if record == [0u8; RECORD] {
            out.fill(0);
            return Ok(());
        }
        self.store.read_at(self.data + lba * BLOCK as u64, out)?;
        let nonce: [u8; 12] = record[..12].try_into().expect("12");
        let tag: [u8; 16] = record[12..28].try_into().expect("16");
        if record[28..] != [0; 4]
            || self
                .cipher
                .decrypt_inout_detached(
                    &Nonce::from(nonce),
                    &block_aad(lba),
                    out.into(),
                    &Tag::from(tag),
                )
                .is_err()
        {
            // Never the bytes that failed: they are the host's, not the guest's.
            out.fill(0);
            return Err(BlockError::Medium { lba });
        }
        Ok(())
    }

    fn write_block(&mut self, lba: u64, plain: &[u8]) -> Result<(), BlockError> {
        let nonce = random_nonce()?;
        let mut sealed = plain.to_vec();
        let tag = self
            .cipher
            .encrypt_inout_detached(
                &Nonce::from(nonce),
                &block_aad(lba),
                (&mut sealed[..]).into(),
            )
            .map_err(|_| BlockError::Io("sealing a block failed".into()))?;
        let mut record = [0u8; RECORD];
        record[..12].copy_from_slice(&nonce);
        record[12..28].copy_from_slice(&tag);
        // The data, then its record: until the record is written the old record does not open
        // the new data (a torn write reads as a medium error, never as mixed data).
        self.store
            .write_at(self.data + lba * BLOCK as u64, &sealed)?;
        self.store.write_at(self.record_at(lba), &record)
    }
}

impl<S: Store> Disk for EncryptedDisk<S> {
    fn blocks(&self) -> u64 {
        self.blocks
    }

    fn read(&mut self, lba: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        range(lba, buf.len(), self.blocks)?;
        for (k, block) in buf.chunks_exact_mut(BLOCK).enumerate() {
            self.read_block(lba + k as u64, block)?;
        }
        Ok(())
    }

    fn write(&mut self, lba: u64, data: &[u8]) -> Result<(), BlockError> {
        range(lba, data.len(), self.blocks)?;
        for (k, block) in data.chunks_exact(BLOCK).enumerate() {
            self.write_block(lba + k as u64, block)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        self.store.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemStore;

    const KEY: [u8; 32] = [0x42; 32];

    fn disk(blocks: u64) -> EncryptedDisk<MemStore> {
        EncryptedDisk::create(MemStore::default(), &KEY, blocks).unwrap()
    }

    fn pattern(seed: u8) -> Vec<u8> {
        (0..BLOCK)
            .map(|i| (i as u8).wrapping_mul(7) ^ seed)
            .collect()
    }

    #[test]
    fn blocks_round_trip_and_unwritten_blocks_read_as_zeros() {
        let mut d = disk(300);
        assert_eq!(d.blocks(), 300);
        let mut two = pattern(1);
        two.extend(pattern(2));
        d.write(129, &two).unwrap();
        let mut back = vec![0; 2 * BLOCK];
        d.read(129, &mut back).unwrap();
        assert_eq!(back, two);
        let mut zero = vec![1; BLOCK];
        d.read(0, &mut zero).unwrap();
        assert_eq!(zero, vec![0; BLOCK]);
        // Reopened under the key: the same contents.
        let image = d.store.clone();
        let mut again = EncryptedDisk::open(image, &KEY).unwrap();
        again.read(129, &mut back).unwrap();
        assert_eq!(back, two);
    }

    #[test]
    fn the_image_holds_no_plaintext() {
        let mut d = disk(8);
        let secret = b"the guest's secret".repeat(BLOCK / 18 + 1)[..BLOCK].to_vec();
        for lba in 0..8 {
            d.write(lba, &secret).unwrap();
        }
        let image = &d.store.bytes;
        assert!(!image.windows(18).any(|w| w == b"the guest's secret"));
    }

    #[test]
    fn a_changed_block_or_record_is_a_medium_error_for_that_block_only() {
        let mut d = disk(4);
        for lba in 0..4 {
            d.write(lba, &pattern(lba as u8)).unwrap();
        }
        let data = d.data as usize;
        // A flipped byte of block 2's ciphertext.
        d.store.bytes[data + 2 * BLOCK + 100] ^= 1;
        let mut buf = vec![0xee; BLOCK];
        assert_eq!(d.read(2, &mut buf), Err(BlockError::Medium { lba: 2 }));
        assert_eq!(
            buf,
            vec![0; BLOCK],
            "nothing of the changed block is returned"
        );
        for lba in [0, 1, 3] {
            d.read(lba, &mut buf).unwrap();
            assert_eq!(buf, pattern(lba as u8));
        }
        // A flipped bit of block 1's tag, and a non-zero reserved byte of block 3's record.
        d.store.bytes[BLOCK + RECORD + 20] ^= 0x80;
        assert_eq!(d.read(1, &mut buf), Err(BlockError::Medium { lba: 1 }));
        d.store.bytes[BLOCK + 3 * RECORD + 30] = 1;
        assert_eq!(d.read(3, &mut buf), Err(BlockError::Medium { lba: 3 }));
        // A read over a bad block fails as a whole, naming it.
        let mut all = vec![0; 4 * BLOCK];
        assert_eq!(d.read(0, &mut all), Err(BlockError::Medium { lba: 1 }));
    }

    #[test]
    fn a_block_moved_to_another_address_does_not_open() {
        let mut d = disk(2);
        d.write(0, &pattern(10)).unwrap();
        d.write(1, &pattern(11)).unwrap();
        let data = d.data as usize;
        let (a, b) = d.store.bytes.split_at_mut(data + BLOCK);
        a[data..].swap_with_slice(&mut b[..BLOCK]);
        let (r0, r1) = d.store.bytes[BLOCK..BLOCK + 2 * RECORD].split_at_mut(RECORD);
        r0.swap_with_slice(r1);
        let mut buf = vec![0; BLOCK];
        assert_eq!(d.read(0, &mut buf), Err(BlockError::Medium { lba: 0 }));
        assert_eq!(d.read(1, &mut buf), Err(BlockError::Medium { lba: 1 }));
    }

    #[test]
    fn an_image_opens_only_as_made_under_its_key() {
        let d = disk(16);
        let image = d.store.clone();
        assert_eq!(
            EncryptedDisk::open(image.clone(), &[0x43; 32]).err(),
            Some(OpenError::WrongKey)
        );
        // A header that claims more blocks (the key check covers it).
        let mut more = image.clone();
        more.bytes[16] = 17;
        assert_eq!(
            EncryptedDisk::open(more, &KEY).err(),
            Some(OpenError::WrongKey)
        );
        let mut cut = image.clone();
        cut.bytes.truncate(cut.bytes.len() - 1);
        assert!(matches!(
            EncryptedDisk::open(cut, &KEY).err(),
            Some(OpenError::Truncated { .. })
        ));
        let mut other = image.clone();
        other.bytes[0] = b'X';
        assert_eq!(
            EncryptedDisk::open(other, &KEY).err(),
            Some(OpenError::NotEncrypted)
        );
        assert_eq!(
            EncryptedDisk::open(MemStore { bytes: vec![0; 10] }, &KEY).err(),
            Some(OpenError::NotEncrypted)
        );
        let mut format = image.clone();
        format.bytes[8] = 2;
        assert_eq!(
            EncryptedDisk::open(format, &KEY).err(),
            Some(OpenError::Format(2))
        );
        // A header naming an impossible number of blocks is refused, not overflowed.
        let mut huge = image;
        huge.bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(EncryptedDisk::open(huge, &KEY).is_err());
        assert!(EncryptedDisk::open(MemStore::default(), &KEY).is_err());
    }

    #[test]
    fn requests_outside_the_disk_are_refused() {
        let mut d = disk(3);
        let mut buf = vec![0; 2 * BLOCK];
        assert!(matches!(
            d.read(2, &mut buf),
            Err(BlockError::OutOfRange {
                first: 2,
                end: 4,
                blocks: 3
            })
        ));
        assert_eq!(d.write(0, &[0; 10]), Err(BlockError::Unaligned(10)));
        assert!(EncryptedDisk::create(MemStore::default(), &KEY, u64::MAX).is_err());
    }
}
