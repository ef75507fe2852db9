//! The on-disk structures of a VMGS version 3 file, byte for byte (see
//! `shared/design/VMGS-FORMAT.md`). Every structure is a little-endian `zerocopy` type with
//! alignment 1, so it can be read from and written to any offset of a block, and its size is
//! checked at compile time.

use zerocopy::little_endian::U16;
use zerocopy::little_endian::U32;
use zerocopy::little_endian::U64;
use zerocopy::FromBytes;
use zerocopy::Immutable;
use zerocopy::IntoBytes;
use zerocopy::KnownLayout;

/// `GUESTRTS`.
pub const SIGNATURE: [u8; 8] = *b"GUESTRTS";
/// Format version 3.0.
pub const VERSION_3: u32 = 0x0003_0000;
/// Version 1 files are GPT disks: `EFI PART` at byte 512.
pub const V1_SIGNATURE: [u8; 8] = *b"EFI PART";
/// Allocation unit.
pub const BLOCK_SIZE: u64 = 4096;
/// Blocks 0 and 1 hold the two header copies; file data starts at block 2.
pub const FIRST_DATA_BLOCK: u32 = 2;
/// Offset of the second header copy on a disk with 512-byte sectors.
pub const SECOND_HEADER_OFFSET: u64 = 512;
/// Entries in the file table and in the extended file table.
pub const FILE_COUNT: usize = 64;
/// Bytes of a file table (one block).
pub const FILE_TABLE_BYTES: usize = FILE_COUNT * core::mem::size_of::<FileEntry>();
/// Blocks of a file table.
pub const FILE_TABLE_BLOCKS: u32 = 1;

/// AES-256-GCM: key, nonce and tag sizes.
pub const KEY_BYTES: usize = 32;
pub const NONCE_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;

/// `Header::encryption_algorithm` values.
pub const ENCRYPTION_NONE: u16 = 0;
pub const ENCRYPTION_AES_GCM: u16 = 1;

/// `Header::markers` bit: the file was reprovisioned.
pub const MARKER_REPROVISIONED: u16 = 1 << 0;

/// `FileEntry::attributes` / `ExtendedFileEntry::attributes` bits.
pub const ATTR_ENCRYPTED: u32 = 1 << 0;
pub const ATTR_AUTHENTICATED: u32 = 1 << 1;

/// One of the header's two slots for the wrapped metadata key.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct KeySlot {
    pub nonce: [u8; NONCE_BYTES],
    pub reserved: U32,
    pub tag: [u8; TAG_BYTES],
    /// The metadata key, AES-256-GCM encrypted with the datastore key.
    pub wrapped_key: [u8; KEY_BYTES],
}

impl KeySlot {
    pub fn is_empty(&self) -> bool {
        self.as_bytes().iter().all(|b| *b == 0)
    }
}

/// The VMGS header; two copies, at byte 0 and byte 512.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct Header {
    pub signature: [u8; 8],
    pub version: U32,
    /// CRC-32 (IEEE) of the header with this field zeroed.
    pub checksum: U32,
    pub sequence: U32,
    pub header_size: U32,
    /// In blocks.
    pub file_table_offset: U32,
    /// In blocks.
    pub file_table_size: U32,
    pub encryption_algorithm: U16,
    pub markers: U16,
    pub key_slots: [KeySlot; 2],
    pub reserved: U32,
}

/// One file-table entry.
#[repr(C)]
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct FileEntry {
    /// In blocks.
    pub offset: U32,
    /// In blocks; 0 means the file does not exist.
    pub allocation_size: U32,
    /// Bytes of content.
    pub valid_data_size: U64,
    pub nonce: [u8; NONCE_BYTES],
    pub tag: [u8; TAG_BYTES],
    pub attributes: U32,
    pub reserved: [u8; 16],
}

/// One entry of the extended file table (file id 63), which is itself encrypted.
#[repr(C)]
#[derive(Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ExtendedFileEntry {
    pub attributes: U32,
    /// The file's own AES-256-GCM key.
    pub key: [u8; KEY_BYTES],
    pub reserved: [u8; 28],
}

/// The file table: one block.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct FileTable {
    pub entries: [FileEntry; FILE_COUNT],
}

/// The extended file table: one block, stored encrypted with the metadata key.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct ExtendedFileTable {
    pub entries: [ExtendedFileEntry; FILE_COUNT],
}

const _: () = assert!(core::mem::size_of::<KeySlot>() == 64);
const _: () = assert!(core::mem::size_of::<Header>() == 168);
const _: () = assert!(core::mem::size_of::<FileEntry>() == 64);
const _: () = assert!(core::mem::size_of::<ExtendedFileEntry>() == 64);
const _: () = assert!(core::mem::size_of::<FileTable>() == BLOCK_SIZE as usize);
const _: () = assert!(core::mem::size_of::<ExtendedFileTable>() == BLOCK_SIZE as usize);
const _: () = assert!(core::mem::align_of::<Header>() == 1);

/// Size of the header, as stored in `header_size`.
pub const HEADER_BYTES: u32 = core::mem::size_of::<Header>() as u32;

impl Header {
    /// The checksum this header should carry.
    pub fn compute_checksum(&self) -> u32 {
        let mut copy = *self;
        copy.checksum = U32::new(0);
        crc32fast::hash(copy.as_bytes())
    }

    pub fn is_encrypted(&self) -> bool {
        self.encryption_algorithm.get() == ENCRYPTION_AES_GCM
    }
}

impl FileEntry {
    pub fn exists(&self) -> bool {
        self.allocation_size.get() != 0
    }
}

impl Default for FileTable {
    fn default() -> Self {
        FileTable {
            entries: [FileEntry::default(); FILE_COUNT],
        }
    }
}

impl Default for ExtendedFileTable {
    fn default() -> Self {
        ExtendedFileTable {
            entries: [ExtendedFileEntry::default(); FILE_COUNT],
        }
    }
}

// The extended table holds every file's key: its Debug output never shows them.
impl core::fmt::Debug for ExtendedFileEntry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ExtendedFileEntry")
            .field("attributes", &self.attributes.get())
            .field("key", &"<secret>")
            .finish()
    }
}

impl core::fmt::Debug for ExtendedFileTable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ExtendedFileTable(<secret>)")
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn debug_output_of_the_extended_table_names_it_but_never_shows_a_key() {
        let entry = ExtendedFileEntry {
            attributes: U32::new(ATTR_ENCRYPTED | ATTR_AUTHENTICATED),
            key: [0xab; KEY_BYTES],
            reserved: [0; 28],
        };
        assert_eq!(
            format!("{entry:?}"),
            r#"ExtendedFileEntry { attributes: 3, key: "<secret>" }"#
        );
        let table = ExtendedFileTable {
            entries: [entry; FILE_COUNT],
        };
        assert_eq!(format!("{table:?}"), "ExtendedFileTable(<secret>)");
    }
}
