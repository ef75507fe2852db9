//! A SCSI direct-access disk (SBC-3/SPC-4) over a [`Disk`]: the commands Linux's `sd` and
//! `virtio_scsi` send, translated to block requests. What a transport carries (virtio-scsi
//! requests, a vhost-user-scsi queue) is the CDB, the data the initiator sends and the room
//! it gives for data back; this answers with a status, data and, on CHECK CONDITION, sense.
//!
//! Commands: TEST UNIT READY, REQUEST SENSE, INQUIRY (standard data and VPD pages 0x00,
//! 0x80, 0x83, 0xb0, 0xb1, 0xb2), MODE SENSE(6/10) (the caching page: write cache on, so
//! Linux sends SYNCHRONIZE CACHE), READ CAPACITY(10/16), READ/WRITE(10/16), SYNCHRONIZE
//! CACHE(10/16), UNMAP, REPORT LUNS. Anything else is CHECK CONDITION, ILLEGAL REQUEST,
//! "invalid command operation code"; a bad field, INVALID FIELD IN CDB; a block past the end,
//! LBA OUT OF RANGE; a block whose seal does not open, MEDIUM ERROR with the LBA in the sense
//! information field.

use crate::block::BlockError;
use crate::block::Disk;
use crate::block::BLOCK;

/// Status codes (SAM-5).
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

/// Sense keys.
pub const NO_SENSE: u8 = 0x0;
pub const MEDIUM_ERROR: u8 = 0x3;
pub const ILLEGAL_REQUEST: u8 = 0x5;

/// Bytes of fixed-format sense data.
pub const SENSE_LEN: usize = 18;
/// Most blocks one READ or WRITE may move (also the block limits page's maximum transfer).
pub const MAX_TRANSFER_BLOCKS: u32 = 256;
/// Most blocks one UNMAP descriptor, and descriptors one UNMAP, may name.
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 16;
pub const MAX_UNMAP_DESCRIPTORS: u32 = 64;

const VENDOR: &[u8; 8] = b"PARAVSR ";
const PRODUCT: &[u8; 16] = b"pv-storage disk ";
const REVISION: &[u8; 4] = b"0001";

/// What a command came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u8,
    /// Data for the initiator, cut to the room it gave.
    pub data: Vec<u8>,
    /// Fixed-format sense data, with CHECK CONDITION.
    pub sense: Option<[u8; SENSE_LEN]>,
}

/// A SCSI disk (LUN 0) over `disk`.
pub struct ScsiDisk<D: Disk> {
    disk: D,
    serial: String,
    /// The sense of the last CHECK CONDITION, for REQUEST SENSE.
    last_sense: Option<[u8; SENSE_LEN]>,
}

/// Fixed-format sense data: `key`, additional sense code and qualifier, and (for a medium
/// error) the LBA in the information field.
pub fn sense(key: u8, asc: u8, ascq: u8, lba: Option<u64>) -> [u8; SENSE_LEN] {
    let mut s = [0u8; SENSE_LEN];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    if let Some(lba) = lba.and_then(|l| u32::try_from(l).ok()) {
        s[0] |= 0x80; // VALID: the information field holds the LBA.
        s[3..7].copy_from_slice(&lba.to_be_bytes());
    }
    s
}

/// Why a command ends in CHECK CONDITION.
enum Check {
    InvalidOpcode,
    InvalidField,
    OutOfRange,
    Medium(u64),
    /// The transport gave too little data for a write, or the image failed.
    Io,
}

impl Check {
    fn sense(&self) -> [u8; SENSE_LEN] {
        match self {
            Check::InvalidOpcode => sense(ILLEGAL_REQUEST, 0x20, 0x00, None),
            Check::InvalidField => sense(ILLEGAL_REQUEST, 0x24, 0x00, None),
            Check::OutOfRange => sense(ILLEGAL_REQUEST, 0x21, 0x00, None),
            // Unrecovered read error.
            Check::Medium(lba) => sense(MEDIUM_ERROR, 0x11, 0x00, Some(*lba)),
            // Logical unit communication failure: the back end did not answer.
            Check::Io => sense(0x4, 0x08, 0x00, None),
        }
    }
}

fn block_check(e: BlockError) -> Check {
    match e {
        BlockError::Medium { lba } => Check::Medium(lba),
        BlockError::OutOfRange { .. } => Check::OutOfRange,
        BlockError::Unaligned(_) => Check::InvalidField,
        BlockError::Io(_) => Check::Io,
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

impl<D: Disk> ScsiDisk<D> {
    pub fn new(disk: D, serial: &str) -> ScsiDisk<D> {
        ScsiDisk {
            disk,
            serial: serial
                .chars()
                .filter(|c| c.is_ascii_graphic())
                .take(32)
                .collect(),
            last_sense: None,
        }
    }

    pub fn disk(&mut self) -> &mut D {
        &mut self.disk
    }

    /// Runs `cdb` with `data_out` (what the initiator sent) and room for `data_in_len` bytes
    /// back.
    pub fn execute(&mut self, cdb: &[u8], data_out: &[u8], data_in_len: usize) -> Answer {
        match self.command(cdb, data_out) {
            Ok(mut data) => {
                data.truncate(data_in_len);
                Answer {
                    status: GOOD,
                    data,
                    sense: None,
                }
            }
            Err(check) => {
                let s = check.sense();
                self.last_sense = Some(s);
                Answer {
                    status: CHECK_CONDITION,
                    data: Vec::new(),
                    sense: Some(s),
                }
            }
        }
    }

    fn command(&mut self, cdb: &[u8], data_out: &[u8]) -> Result<Vec<u8>, Check> {
        let Some(&opcode) = cdb.first() else {
            return Err(Check::InvalidOpcode);
        };
        let need = |n: usize| {
            if cdb.len() < n {
                Err(Check::InvalidField)
            } else {
                Ok(())
            }
        };
        match opcode {
            0x00 => Ok(Vec::new()), // TEST UNIT READY
            0x03 => {
                // REQUEST SENSE: the last CHECK CONDITION's sense, once; then NO SENSE.
                Ok(self
                    .last_sense
                    .take()
                    .unwrap_or_else(|| sense(NO_SENSE, 0, 0, None))
                    .to_vec())
            }
            0x12 => {
                need(6)?;
                self.inquiry(cdb)
            }
            0x1a => {
                need(6)?;
                self.mode_sense(cdb[2] & 0x3f, false)
            }
            0x5a => {
                need(10)?;
                self.mode_sense(cdb[2] & 0x3f, true)
            }
            0x25 => {
                need(10)?;
                let last = self.disk.blocks().saturating_sub(1);
                let mut d = u32::try_from(last)
                    .unwrap_or(u32::MAX)
                    .to_be_bytes()
                    .to_vec();
                d.extend_from_slice(&(BLOCK as u32).to_be_bytes());
                Ok(d)
            }
            0x9e if cdb.get(1).map(|b| b & 0x1f) == Some(0x10) => {
                need(16)?;
                // READ CAPACITY(16); LBPME: UNMAP is supported.
                let mut d = vec![0u8; 32];
                d[..8].copy_from_slice(&self.disk.blocks().saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&(BLOCK as u32).to_be_bytes());
                d[14] = 0x80;
                Ok(d)
            }
            0x28 | 0x2a => {
                need(10)?;
                let (lba, count) = (u64::from(be32(&cdb[2..])), u32::from(be16(&cdb[7..])));
                self.transfer(opcode == 0x2a, lba, count, data_out)
            }
            0x88 | 0x8a => {
                need(16)?;
                let (lba, count) = (be64(&cdb[2..]), be32(&cdb[10..]));
                self.transfer(opcode == 0x8a, lba, count, data_out)
            }
            0x35 | 0x91 => self.disk.flush().map(|()| Vec::new()).map_err(block_check),
            0x42 => {
                need(10)?;
                self.unmap(data_out)
            }
            0xa0 => {
                need(12)?;
                // REPORT LUNS: LUN 0 only.
                let mut d = vec![0u8; 16];
                d[3] = 8;
                Ok(d)
            }
            _ => Err(Check::InvalidOpcode),
        }
    }

    fn transfer(
        &mut self,
        write: bool,
        lba: u64,
        count: u32,
        data_out: &[u8],
    ) -> Result<Vec<u8>, Check> {
        if count > MAX_TRANSFER_BLOCKS {
            return Err(Check::InvalidField);
        }
        match lba.checked_add(u64::from(count)) {
            Some(end) if end <= self.disk.blocks() => {}
            _ => return Err(Check::OutOfRange),
        }
        let len = count as usize * BLOCK;
        if write {
            let data = data_out.get(..len).ok_or(Check::Io)?;
            self.disk.write(lba, data).map_err(block_check)?;
            Ok(Vec::new())
        } else {
            let mut data = vec![0u8; len];
            self.disk.read(lba, &mut data).map_err(block_check)?;
            Ok(data)
        }
    }

    /// UNMAP: each descriptor's blocks read as zeros afterwards.
    fn unmap(&mut self, list: &[u8]) -> Result<Vec<u8>, Check> {
        if list.is_empty() {
            return Ok(Vec::new());
        }
        if list.len() < 8 {
            return Err(Check::InvalidField);
        }
        let described = usize::from(be16(&list[2..]));
        let descriptors = list.get(8..8 + described).ok_or(Check::InvalidField)?;
        if described % 16 != 0 || described / 16 > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Check::InvalidField);
        }
        // All checked before any is applied: a bad list changes nothing.
        let mut ranges = Vec::new();
        for d in descriptors.chunks_exact(16) {
            let (lba, count) = (be64(d), be32(&d[8..]));
            if count > MAX_UNMAP_BLOCKS {
                return Err(Check::InvalidField);
            }
            match lba.checked_add(u64::from(count)) {
                Some(end) if end <= self.disk.blocks() => ranges.push((lba, count)),
                _ => return Err(Check::OutOfRange),
            }
        }
        let zeros = vec![0u8; BLOCK];
        for (lba, count) in ranges {
            for k in 0..u64::from(count) {
                self.disk.write(lba + k, &zeros).map_err(block_check)?;
            }
        }
        Ok(Vec::new())
    }

    fn inquiry(&self, cdb: &[u8]) -> Result<Vec<u8>, Check> {
        let evpd = cdb[1] & 1 != 0;
        let page = cdb[2];
        if !evpd {
            if page != 0 {
                return Err(Check::InvalidField);
            }
            let mut d = vec![0u8; 36];
            d[2] = 0x06; // SPC-4
            d[3] = 0x02; // response data format 2
            d[4] = 31; // additional length
            d[7] = 0x02; // CMDQUE
            d[8..16].copy_from_slice(VENDOR);
            d[16..32].copy_from_slice(PRODUCT);
            d[32..36].copy_from_slice(REVISION);
            return Ok(d);
        }
        let body: Vec<u8> = match page {
            0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
            0x80 => self.serial.as_bytes().to_vec(),
            0x83 => {
                // One designator: T10 vendor id based, ASCII: vendor then serial.
                let mut id = VENDOR.to_vec();
                id.extend_from_slice(self.serial.as_bytes());
                let mut d = vec![0x02, 0x01, 0x00, id.len() as u8];
                d.extend_from_slice(&id);
                d
            }
            0xb0 => {
                let mut d = vec![0u8; 0x3c];
                d[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes()); // max transfer
                d[8..12].copy_from_slice(&8u32.to_be_bytes()); // optimal transfer
                d[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes()); // max unmap LBAs
                d[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                d
            }
            0xb1 => {
                let mut d = vec![0u8; 0x3c];
                d[1] = 0x01; // non-rotating medium
                d
            }
            0xb2 => vec![0x00, 0x80, 0x00, 0x00], // LBPU: UNMAP supported
            _ => return Err(Check::InvalidField),
        };
        let mut d = vec![0x00, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        Ok(d)
    }

    /// MODE SENSE: the caching page (0x08: write cache enabled) for page 0x08 or all pages
    /// (0x3f); no block descriptors; not write protected.
    fn mode_sense(&self, page: u8, ten: bool) -> Result<Vec<u8>, Check> {
        let pages: Vec<u8> = match page {
            0x08 | 0x3f => {
                let mut caching = vec![0u8; 20];
                caching[0] = 0x08;
                caching[1] = 0x12;
                caching[2] = 0x04; // WCE
                caching
            }
            _ => return Err(Check::InvalidField),
        };
        let mut d = if ten {
            let mut h = vec![0u8; 8];
            h[..2].copy_from_slice(&((6 + pages.len()) as u16).to_be_bytes());
            h
        } else {
            vec![(3 + pages.len()) as u8, 0, 0, 0]
        };
        d.extend_from_slice(&pages);
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::encrypted::EncryptedDisk;
    use crate::block::raw::RawDisk;
    use crate::block::MemStore;

    fn disk(blocks: usize) -> ScsiDisk<RawDisk<MemStore>> {
        let raw = RawDisk::new(MemStore {
            bytes: vec![0; blocks * BLOCK],
        })
        .unwrap();
        ScsiDisk::new(raw, "pv0001")
    }

    fn rw10(opcode: u8, lba: u32, count: u16) -> [u8; 10] {
        let mut c = [0u8; 10];
        c[0] = opcode;
        c[2..6].copy_from_slice(&lba.to_be_bytes());
        c[7..9].copy_from_slice(&count.to_be_bytes());
        c
    }

    fn rw16(opcode: u8, lba: u64, count: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = opcode;
        c[2..10].copy_from_slice(&lba.to_be_bytes());
        c[10..14].copy_from_slice(&count.to_be_bytes());
        c
    }

    fn key_asc(a: &Answer) -> (u8, u8) {
        let s = a.sense.expect("sense");
        (s[2] & 0xf, s[12])
    }

    #[test]
    fn writes_read_back_through_10_and_16_byte_commands() {
        let mut d = disk(16);
        let data: Vec<u8> = (0..2 * BLOCK).map(|i| (i % 253) as u8).collect();
        assert_eq!(d.execute(&rw10(0x2a, 3, 2), &data, 0).status, GOOD);
        let a = d.execute(&rw16(0x88, 3, 2), &[], 2 * BLOCK);
        assert_eq!((a.status, a.data), (GOOD, data.clone()));
        assert_eq!(
            d.execute(&rw16(0x8a, 15, 1), &data[..BLOCK], 0).status,
            GOOD
        );
        let a = d.execute(&rw10(0x28, 15, 1), &[], BLOCK);
        assert_eq!(a.data, data[..BLOCK]);
        assert_eq!(
            d.execute(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 0).status,
            GOOD
        );
    }

    #[test]
    fn past_the_end_too_long_and_short_data_are_refused_by_name() {
        let mut d = disk(16);
        let a = d.execute(&rw10(0x28, 15, 2), &[], 2 * BLOCK);
        assert_eq!(
            (a.status, key_asc(&a)),
            (CHECK_CONDITION, (ILLEGAL_REQUEST, 0x21))
        );
        let a = d.execute(&rw16(0x88, u64::MAX, 1), &[], BLOCK);
        assert_eq!(key_asc(&a), (ILLEGAL_REQUEST, 0x21));
        let a = d.execute(&rw16(0x88, 0, MAX_TRANSFER_BLOCKS + 1), &[], 0);
        assert_eq!(key_asc(&a), (ILLEGAL_REQUEST, 0x24));
        // A write whose data the transport did not deliver.
        let a = d.execute(&rw10(0x2a, 0, 2), &[0; BLOCK], 0);
        assert_eq!(a.status, CHECK_CONDITION);
        // A CDB cut short, and nothing at all.
        assert_eq!(
            key_asc(&d.execute(&[0x28, 0, 0], &[], BLOCK)),
            (ILLEGAL_REQUEST, 0x24)
        );
        assert_eq!(key_asc(&d.execute(&[], &[], 0)), (ILLEGAL_REQUEST, 0x20));
    }

    #[test]
    fn unknown_commands_are_illegal_requests_and_request_sense_reports_them_once() {
        let mut d = disk(1);
        let a = d.execute(&[0xc0, 0, 0, 0, 0, 0], &[], 64);
        assert_eq!(
            (a.status, key_asc(&a)),
            (CHECK_CONDITION, (ILLEGAL_REQUEST, 0x20))
        );
        let s = d.execute(&[0x03, 0, 0, 0, 18, 0], &[], 18);
        assert_eq!(
            (s.status, s.data[2], s.data[12]),
            (GOOD, ILLEGAL_REQUEST, 0x20)
        );
        let s = d.execute(&[0x03, 0, 0, 0, 18, 0], &[], 18);
        assert_eq!(s.data[2], NO_SENSE);
        assert_eq!(d.execute(&[0x00; 6], &[], 0).status, GOOD);
    }

    #[test]
    fn inquiry_gives_standard_data_and_the_vpd_pages_linux_reads() {
        let mut d = disk(8);
        let std = d.execute(&[0x12, 0, 0, 0, 96, 0], &[], 96);
        assert_eq!(std.data.len(), 36);
        assert_eq!(std.data[0] & 0x1f, 0, "direct-access block device");
        assert_eq!(&std.data[8..16], VENDOR);
        let vpd = |d: &mut ScsiDisk<_>, page: u8| d.execute(&[0x12, 1, page, 0, 255, 0], &[], 255);
        let pages = vpd(&mut d, 0x00);
        assert_eq!(&pages.data[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
        for page in [0x80, 0x83, 0xb0, 0xb1, 0xb2] {
            let a = vpd(&mut d, page);
            assert_eq!((a.status, a.data[1]), (GOOD, page));
            assert_eq!(
                usize::from(be16(&a.data[2..])),
                a.data.len() - 4,
                "page {page:#x}"
            );
        }
        assert_eq!(&vpd(&mut d, 0x80).data[4..], b"pv0001");
        assert_eq!(be32(&vpd(&mut d, 0xb0).data[8..]), MAX_TRANSFER_BLOCKS);
        assert_eq!(key_asc(&vpd(&mut d, 0x99)), (ILLEGAL_REQUEST, 0x24));
        // Cut to the allocation length the initiator gave.
        assert_eq!(d.execute(&[0x12, 0, 0, 0, 5, 0], &[], 5).data.len(), 5);
    }

    #[test]
    fn capacity_mode_pages_and_luns() {
        let mut d = disk(8);
        let c10 = d.execute(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[], 8);
        assert_eq!((be32(&c10.data), be32(&c10.data[4..])), (7, 4096));
        let mut c16 = [0u8; 16];
        c16[0] = 0x9e;
        c16[1] = 0x10;
        let c = d.execute(&c16, &[], 32);
        assert_eq!((be64(&c.data), be32(&c.data[8..])), (7, 4096));
        let m6 = d.execute(&[0x1a, 0, 0x3f, 0, 255, 0], &[], 255);
        assert_eq!(
            (m6.data[0] as usize, m6.data[4], m6.data[6] & 4),
            (m6.data.len() - 1, 0x08, 4)
        );
        let m10 = d.execute(&[0x5a, 0, 0x08, 0, 0, 0, 0, 1, 0, 0], &[], 255);
        assert_eq!(usize::from(be16(&m10.data)), m10.data.len() - 2);
        let luns = d.execute(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 0, 0], &[], 255);
        assert_eq!((be32(&luns.data), luns.data.len()), (8, 16));
    }

    #[test]
    fn unmap_zeroes_its_blocks_and_a_bad_list_changes_nothing() {
        let mut d = disk(8);
        d.execute(&rw10(0x2a, 0, 8), &[0xaa; 8 * BLOCK], 0);
        let list = |descs: &[(u64, u32)]| {
            let mut l = vec![0u8; 8];
            l[2..4].copy_from_slice(&((descs.len() * 16) as u16).to_be_bytes());
            for (lba, n) in descs {
                l.extend_from_slice(&lba.to_be_bytes());
                l.extend_from_slice(&n.to_be_bytes());
                l.extend_from_slice(&[0; 4]);
            }
            l
        };
        let unmap = [0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0];
        assert_eq!(d.execute(&unmap, &list(&[(2, 2)]), 0).status, GOOD);
        let a = d.execute(&rw10(0x28, 0, 8), &[], 8 * BLOCK);
        assert!(a.data[2 * BLOCK..4 * BLOCK].iter().all(|b| *b == 0));
        assert!(a.data[..2 * BLOCK]
            .iter()
            .chain(&a.data[4 * BLOCK..])
            .all(|b| *b == 0xaa));
        // One good range and one past the end: refused, and the good one not applied.
        let a = d.execute(&unmap, &list(&[(0, 1), (7, 2)]), 0);
        assert_eq!(key_asc(&a), (ILLEGAL_REQUEST, 0x21));
        assert_eq!(
            d.execute(&rw10(0x28, 0, 1), &[], BLOCK).data,
            vec![0xaa; BLOCK]
        );
        // A list that claims more than it holds.
        let mut short = list(&[(0, 1)]);
        short[3] = 32;
        assert_eq!(
            key_asc(&d.execute(&unmap, &short, 0)),
            (ILLEGAL_REQUEST, 0x24)
        );
    }

    #[test]
    fn a_changed_encrypted_block_is_a_medium_error_naming_its_lba() {
        let enc = EncryptedDisk::create(MemStore::default(), &[9; 32], 4).unwrap();
        let mut d = ScsiDisk::new(enc, "enc");
        d.execute(&rw10(0x2a, 3, 1), &[1; BLOCK], 0);
        let store = d.disk().store_mut();
        let end = store.bytes.len();
        store.bytes[end - 1] ^= 1;
        let a = d.execute(&rw10(0x28, 3, 1), &[], BLOCK);
        let s = a.sense.unwrap();
        assert_eq!(
            (a.status, s[2], s[12]),
            (CHECK_CONDITION, MEDIUM_ERROR, 0x11)
        );
        assert_eq!(
            (s[0] & 0x80, be32(&s[3..])),
            (0x80, 3),
            "the LBA in the information field"
        );
        assert!(a.data.is_empty());
    }
}
