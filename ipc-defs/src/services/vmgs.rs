//! The guest-state store's interface: whole-file reads and writes of VMGS file ids.
//!
//! A client may touch only the file ids the manifest grants it on its channel (`file-ids` of
//! its `vmgs` call); the service learns them from its bootstrap record, never from a message.
//! File contents travel in chunks of at most [`MAX_CHUNK`] bytes so that a frame always fits a
//! ring: a read is a sequence of [`Request::Read`] at growing offsets served from one
//! snapshot, a write a sequence of [`Request::Write`] staged in the service and committed to
//! the file (durably) when its last byte arrives. Only then is it acknowledged.

use core::fmt;

use serde::Deserialize;
use serde::Deserializer;
use serde::Serialize;

/// Most content bytes one request or response carries. A 64 KiB ring (the default) holds a
/// full chunk with room for a second frame.
pub const MAX_CHUNK: usize = 24 * 1024;

/// Largest file the service stages for one client: four times the default VMGS image, far
/// above any real guest-state file (a vTPM's NVRAM is tens of KiB).
pub const MAX_FILE_SIZE: u32 = 16 << 20;

/// A VMGS file id: the index of the file's entry in the file table (0..=63). Every value of
/// this type is in range: decoding refuses anything else.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct FileId(u8);

impl<'de> Deserialize<'de> for FileId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<FileId, D::Error> {
        let n = u8::deserialize(d)?;
        FileId::new(u32::from(n)).ok_or_else(|| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Unsigned(u64::from(n)),
                &"a VMGS file id 0..=63",
            )
        })
    }
}

impl FileId {
    /// Number of entries in a file table.
    pub const COUNT: usize = 64;

    pub const FILE_TABLE: FileId = FileId(0);
    pub const BIOS_NVRAM: FileId = FileId(1);
    pub const TPM_PPI: FileId = FileId(2);
    pub const TPM_NVRAM: FileId = FileId(3);
    pub const RTC_SKEW: FileId = FileId(4);
    pub const ATTEST: FileId = FileId(5);
    pub const KEY_PROTECTOR: FileId = FileId(6);
    pub const VM_UNIQUE_ID: FileId = FileId(7);
    pub const GUEST_FIRMWARE: FileId = FileId(8);
    pub const CUSTOM_UEFI: FileId = FileId(9);
    pub const GUEST_WATCHDOG: FileId = FileId(10);
    pub const HW_KEY_PROTECTOR: FileId = FileId(11);
    pub const GUEST_SECRET_KEY: FileId = FileId(13);
    pub const HIBERNATION_TOKEN: FileId = FileId(14);
    pub const PLATFORM_SEED: FileId = FileId(15);
    pub const PROVENANCE_DOC: FileId = FileId(16);
    pub const TPM_NVRAM_BACKUP: FileId = FileId(17);
    pub const PROVISIONING_MARKER: FileId = FileId(18);
    pub const EXTENDED_FILE_TABLE: FileId = FileId(63);
    /// The storage service's disk keys (ours: the format leaves ids 19-62 unnamed).
    pub const PV_STORAGE_KEYS: FileId = FileId(32);

    /// The ids that have a name in the format, with that name.
    pub const NAMED: [(FileId, &'static str); 19] = [
        (FileId::FILE_TABLE, "FILE_TABLE"),
        (FileId::BIOS_NVRAM, "BIOS_NVRAM"),
        (FileId::TPM_PPI, "TPM_PPI"),
        (FileId::TPM_NVRAM, "TPM_NVRAM"),
        (FileId::RTC_SKEW, "RTC_SKEW"),
        (FileId::ATTEST, "ATTEST"),
        (FileId::KEY_PROTECTOR, "KEY_PROTECTOR"),
        (FileId::VM_UNIQUE_ID, "VM_UNIQUE_ID"),
        (FileId::GUEST_FIRMWARE, "GUEST_FIRMWARE"),
        (FileId::CUSTOM_UEFI, "CUSTOM_UEFI"),
        (FileId::GUEST_WATCHDOG, "GUEST_WATCHDOG"),
        (FileId::HW_KEY_PROTECTOR, "HW_KEY_PROTECTOR"),
        (FileId::GUEST_SECRET_KEY, "GUEST_SECRET_KEY"),
        (FileId::HIBERNATION_TOKEN, "HIBERNATION_TOKEN"),
        (FileId::PLATFORM_SEED, "PLATFORM_SEED"),
        (FileId::PROVENANCE_DOC, "PROVENANCE_DOC"),
        (FileId::TPM_NVRAM_BACKUP, "TPM_NVRAM_BACKUP"),
        (FileId::PROVISIONING_MARKER, "PROVISIONING_MARKER"),
        (FileId::EXTENDED_FILE_TABLE, "EXTENDED_FILE_TABLE"),
    ];

    /// The id with this table index, if it is one (0..=63).
    pub const fn new(index: u32) -> Option<FileId> {
        if index < FileId::COUNT as u32 {
            Some(FileId(index as u8))
        } else {
            None
        }
    }

    /// The entry index in the file table.
    pub const fn index(self) -> usize {
        self.0 as usize
    }

    /// Ids the paravisor defines in the range the format leaves unnamed, with their names.
    pub const OURS: [(FileId, &'static str); 1] = [(FileId::PV_STORAGE_KEYS, "PV_STORAGE_KEYS")];

    /// The name of this id (the format's, or one of [`FileId::OURS`]), if it has one.
    pub fn name(self) -> Option<&'static str> {
        FileId::NAMED
            .iter()
            .chain(FileId::OURS.iter())
            .find(|(id, _)| *id == self)
            .map(|(_, n)| *n)
    }

    /// Other names the reference sources use for the same ids.
    pub const ALIASES: [(FileId, &'static str); 1] = [(FileId(14), "HIBERNATION_FIRMWARE")];

    /// Parses a name (`TPM_NVRAM`, any case) or a number (`3`, `0x3`).
    pub fn parse(text: &str) -> Option<FileId> {
        let t = text.trim();
        if let Some(&(id, _)) = FileId::NAMED
            .iter()
            .chain(FileId::ALIASES.iter())
            .chain(FileId::OURS.iter())
            .find(|(_, n)| n.eq_ignore_ascii_case(t))
        {
            return Some(id);
        }
        let n = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => t.parse::<u32>().ok()?,
        };
        FileId::new(n)
    }

    /// Ids a client may hold: everything but the two tables, which only the store itself
    /// writes.
    pub const fn is_user_file(self) -> bool {
        self.0 != FileId::FILE_TABLE.0 && self.0 != FileId::EXTENDED_FILE_TABLE.0
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n} ({})", self.0),
            None => write!(f, "file {}", self.0),
        }
    }
}

impl fmt::Debug for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A set of file ids (one bit per table entry): what a client's channel grants.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileIdSet(u64);

impl FileIdSet {
    pub const EMPTY: FileIdSet = FileIdSet(0);

    pub const fn from_bits(bits: u64) -> FileIdSet {
        FileIdSet(bits)
    }

    pub const fn bits(self) -> u64 {
        self.0
    }

    pub const fn with(self, id: FileId) -> FileIdSet {
        FileIdSet(self.0 | 1 << id.0)
    }

    pub const fn contains(self, id: FileId) -> bool {
        self.0 & (1 << id.0) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = FileId> {
        (0..FileId::COUNT as u8)
            .map(FileId)
            .filter(move |id| self.contains(*id))
    }
}

impl FromIterator<FileId> for FileIdSet {
    fn from_iter<T: IntoIterator<Item = FileId>>(iter: T) -> Self {
        iter.into_iter().fold(FileIdSet::EMPTY, FileIdSet::with)
    }
}

impl fmt::Display for FileIdSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, id) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            match id.name() {
                Some(n) => f.write_str(n)?,
                None => write!(f, "{}", id.0)?,
            }
        }
        Ok(())
    }
}

impl fmt::Debug for FileIdSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{{{self}}}")
    }
}

/// Up to [`MAX_CHUNK`] bytes of file content.
pub type Chunk = super::bytes::Bytes<MAX_CHUNK>;

/// What a client asks of the store.
// A chunk is inline (no allocation, `no_std`); a message is decoded once into one value, so
// the size of the largest variant costs nothing per request.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The size of a file's contents.
    Size { file: FileId },
    /// Up to [`MAX_CHUNK`] bytes of a file from `offset`. A read at offset 0 takes a snapshot
    /// of the whole file (decrypted and authenticated); reads at later offsets come from that
    /// snapshot, so a multi-chunk read is consistent even if the file is written meanwhile.
    Read { file: FileId, offset: u32 },
    /// Part of a file's new contents: `data` goes at `offset` of a file of `total` bytes.
    /// Chunks must come in order, starting at 0; the chunk that completes `total` commits the
    /// whole file at once (old contents or new, never a mix) and is answered with
    /// [`Response::Written`] only when the new contents are durable.
    Write {
        file: FileId,
        total: u32,
        offset: u32,
        data: Chunk,
    },
    /// Removes a file (durably).
    Delete { file: FileId },
    /// The caller's files that exist, with their sizes.
    List,
}

/// Largest key protector (HW_KEY_PROTECTOR, KEY_PROTECTOR) a broker request carries: they
/// are a few hundred bytes; the host's file may claim gigabytes.
pub const MAX_PROTECTOR: usize = 4096;

/// A key protector: an unencrypted file of the guest-state file.
pub type ProtectorBytes = super::bytes::Bytes<MAX_PROTECTOR>;

/// A datastore key in a broker request (it travels only on the microkernel's control
/// channel to the broker, which is the process the key is for).
pub type KeyBytes = super::bytes::Bytes<32>;

/// Protectors written together, in one commit.
pub type Protectors = heapless::Vec<(FileId, ProtectorBytes), 2>;

/// What the microkernel asks `pv-vmgs --broker` about the guest-state file it was given:
/// the operations of sealing and key release that touch the file. The broker parses the
/// host's file in its sandbox; the microkernel sees only protector bytes and outcomes.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerRequest {
    /// An unencrypted file, read without the key (at most [`MAX_PROTECTOR`] bytes).
    /// Answered with [`BrokerResponse::Plain`] (`None`: the file has no such id).
    ReadPlain { file: FileId },
    /// Replaces an unencrypted file in one crash-consistent commit; `key` unlocks the file.
    /// Answered with [`BrokerResponse::Done`].
    WritePlain {
        key: KeyBytes,
        file: FileId,
        data: ProtectorBytes,
    },
    /// Replaces the datastore key `old` by `new`, with `protectors` (what protects `new`)
    /// committed in the same step that makes `old` stop opening the file: `new` is added to
    /// the other key slot first, then the protectors are written, then `old`'s slot is
    /// cleared; a crash at any point leaves protectors whose key opens the file.
    Rotate {
        old: KeyBytes,
        new: KeyBytes,
        protectors: Protectors,
    },
    /// Makes a new image of `size` bytes in the (empty, new) file, encrypted under `key`,
    /// with `protectors` written unencrypted.
    Create {
        size: u64,
        key: KeyBytes,
        protectors: Protectors,
    },
}

/// What the broker answers. Requests are not idempotent in general (a repeated `Rotate`
/// fails: `old` no longer opens the file); the microkernel sends each once.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerResponse {
    Plain(Option<ProtectorBytes>),
    Done,
    /// What went wrong, for the operator (names the file id, never key material).
    Failed(heapless::String<256>),
}

/// A file as [`Request::List`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub file: FileId,
    pub size: u64,
    pub encrypted: bool,
}

/// What the store answers.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Size {
        bytes: u64,
    },
    /// Bytes of a read; `total` is the file's size in the snapshot.
    Data {
        total: u32,
        data: Chunk,
    },
    /// A write chunk was staged; `received` bytes of `total` so far.
    Staged {
        received: u32,
    },
    /// The file's new contents are committed and durable.
    Written,
    /// The file is gone (durably), or never existed.
    Deleted,
    Files(heapless::Vec<FileInfo, { FileId::COUNT }>),
    Error(VmgsError),
}

/// Why a request failed. Each says which file it concerns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmgsError {
    /// The manifest does not grant this caller the file id. Counted and logged.
    NotPermitted(FileId),
    /// The file has never been written (or was deleted).
    NotFound(FileId),
    /// A read or write chunk at an offset the service did not expect: a read past 0 with no
    /// snapshot (the service restarted, or the snapshot is of another file) or a write chunk
    /// out of order. Start again at offset 0.
    OutOfSequence { file: FileId, expected: u32 },
    /// Larger than [`MAX_FILE_SIZE`] or than the store has room for.
    TooLarge { file: FileId, bytes: u64 },
    /// The store's image has no free extent large enough for the file.
    NoSpace { file: FileId, bytes: u64 },
    /// The file's stored contents failed authentication: the host changed them.
    Authentication(FileId),
    /// The backing file could not be read or written; the store is unchanged.
    Storage(FileId),
}

impl fmt::Display for VmgsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmgsError::NotPermitted(id) => write!(f, "{id}: not granted to this caller"),
            VmgsError::NotFound(id) => write!(f, "{id}: no such file"),
            VmgsError::OutOfSequence { file, expected } => {
                write!(
                    f,
                    "{file}: chunk out of sequence (expected offset {expected}); start again at 0"
                )
            }
            VmgsError::TooLarge { file, bytes } => write!(f, "{file}: {bytes} bytes is too large"),
            VmgsError::NoSpace { file, bytes } => {
                write!(
                    f,
                    "{file}: no room for {bytes} bytes in the guest-state image"
                )
            }
            VmgsError::Authentication(id) => {
                write!(
                    f,
                    "{id}: stored contents failed authentication (tampered with)"
                )
            }
            VmgsError::Storage(id) => write!(f, "{id}: backing store I/O failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_ids_parse_by_name_or_number() {
        assert_eq!(FileId::parse("TPM_NVRAM"), Some(FileId::TPM_NVRAM));
        assert_eq!(FileId::parse("tpm_ppi"), Some(FileId::TPM_PPI));
        assert_eq!(
            FileId::parse("pv_storage_keys"),
            Some(FileId::PV_STORAGE_KEYS)
        );
        assert_eq!(FileId::PV_STORAGE_KEYS.name(), Some("PV_STORAGE_KEYS"));
        assert_eq!(FileId::parse("3"), Some(FileId::TPM_NVRAM));
        assert_eq!(FileId::parse("0x3f"), Some(FileId::EXTENDED_FILE_TABLE));
        assert_eq!(FileId::parse("64"), None);
        assert_eq!(FileId::parse("HIBERNATION_FIRMWARE"), FileId::new(14));
        assert_eq!(FileId::parse("NVRAM"), None);
        assert_eq!(FileId::new(12).unwrap().name(), None);
    }

    #[test]
    fn file_ids_out_of_range_do_not_decode() {
        for bad in [64u8, 67, 255] {
            // Read { file, offset: 0 }
            assert!(
                postcard::from_bytes::<Request>(&[1, bad, 0]).is_err(),
                "{bad}"
            );
            assert!(postcard::from_bytes::<Request>(&[3, bad]).is_err(), "{bad}");
        }
        assert_eq!(
            postcard::from_bytes::<Request>(&[1, 63, 0]).unwrap(),
            Request::Read {
                file: FileId::EXTENDED_FILE_TABLE,
                offset: 0
            }
        );
    }

    #[test]
    fn file_id_sets_hold_what_was_put_in() {
        let set: FileIdSet = [FileId::TPM_NVRAM, FileId::TPM_PPI].into_iter().collect();
        assert!(set.contains(FileId::TPM_NVRAM) && set.contains(FileId::TPM_PPI));
        assert!(!set.contains(FileId::ATTEST));
        assert_eq!(std::format!("{set}"), "TPM_PPI, TPM_NVRAM");
    }

    #[test]
    fn chunks_travel_as_byte_strings_and_oversized_ones_are_refused() {
        let data = [7u8; 1000];
        let req = Request::Write {
            file: FileId::TPM_NVRAM,
            total: 1000,
            offset: 0,
            data: Chunk::new(&data).unwrap(),
        };
        let bytes = postcard::to_allocvec(&req).unwrap();
        assert!(bytes.len() < 1010, "encoded as raw bytes: {}", bytes.len());
        assert_eq!(postcard::from_bytes::<Request>(&bytes).unwrap(), req);

        // A hostile length prefix beyond the bound is a decode error, not an allocation.
        let mut evil = postcard::to_allocvec(&Request::Write {
            file: FileId::TPM_NVRAM,
            total: 0,
            offset: 0,
            data: Chunk::default(),
        })
        .unwrap();
        evil.truncate(evil.len() - 1);
        evil.extend_from_slice(&[0xff, 0xff, 0x03]);
        evil.extend(std::iter::repeat_n(0u8, 70000));
        assert!(postcard::from_bytes::<Request>(&evil).is_err());
        assert!(Chunk::new(&[0; MAX_CHUNK + 1]).is_none());
    }
}
