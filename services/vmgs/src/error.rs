//! The errors of the format library: each says what is wrong, with the values involved, and
//! names the file id where one is concerned. Nothing read from a VMGS file can make the
//! library panic; it ends in one of these.

use alloc::string::String;

use ipc_defs::services::vmgs::FileId;

use crate::crypto::RandomError;
use crate::storage::StorageError;

/// What is wrong with the VHD container around the image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    #[error("the file is {0} bytes, not a whole number of 512-byte sectors with a VHD footer")]
    BadLength(u64),
    #[error(
        "no VHD footer (cookie \"conectix\") in the last 512 bytes: not a VMGS file, or truncated"
    )]
    NoFooter,
    #[error("VHD footer checksum is {stored:#010x}, expected {computed:#010x}")]
    FooterChecksum { stored: u32, computed: u32 },
    #[error("VHD footer version {0:#x} is not 1.0")]
    FooterVersion(u32),
    #[error("VHD disk type {0} is not a fixed disk (2)")]
    NotFixed(u32),
    #[error("VHD footer says the image is {size} bytes, but the file has room for {room}")]
    FooterSize { size: u64, room: u64 },
    #[error("image size {0} is outside 16 KiB..=4 GiB or not a multiple of 512")]
    ImageSize(u64),
}

/// Why one header copy is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderProblem {
    #[error("empty (all zero)")]
    Empty,
    #[error("signature is not GUESTRTS")]
    Signature,
    #[error("version {0:#x} is not 3.0")]
    Version(u32),
    #[error("header size {0} is not 168")]
    Size(u32),
    #[error("file table at block {offset} ({size} blocks) is not one block inside the image")]
    FileTable { offset: u32, size: u32 },
    #[error("encryption algorithm {0} is unknown")]
    Algorithm(u16),
    #[error("checksum {stored:#010x} does not match the contents ({computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
}

/// Errors of the format library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error while {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: StorageError,
    },
    #[error("the file is empty (zero length or no header written)")]
    Empty,
    #[error("not a VMGS file: {0}")]
    Container(#[from] ContainerError),
    #[error("this is a VMGS version 1 file (GPT disk); only version 3 is supported")]
    V1Format,
    #[error("no valid header: header 1 is {header1}; header 2 is {header2}")]
    NoValidHeader {
        header1: HeaderProblem,
        header2: HeaderProblem,
    },
    #[error(
        "both headers are valid but their sequence numbers ({seq1} and {seq2}) are not consecutive"
    )]
    SequenceMismatch { seq1: u32, seq2: u32 },
    #[error("{file}: table entry is corrupt: {reason}")]
    CorruptEntry { file: FileId, reason: String },
    #[error("{a} and {b} occupy overlapping blocks")]
    Overlap { a: FileId, b: FileId },
    #[error("the guest-state file is encrypted; a datastore key is needed")]
    NeedsKey,
    #[error("the guest-state file is not encrypted")]
    NotEncrypted,
    #[error(
        "wrong key: the datastore key opens neither key slot (or the key slots were tampered with)"
    )]
    WrongKey,
    #[error("a datastore key must be 32 bytes, not {0}")]
    KeyLength(usize),
    #[error("{0}: authentication failed: the stored contents or their table entry were changed")]
    Authentication(FileId),
    #[error("{0}: not allocated (no such file)")]
    NotFound(FileId),
    #[error("{0} is maintained by the store and cannot be written, moved or deleted")]
    Reserved(FileId),
    #[error("{0}: already exists (allow overwriting to replace it)")]
    Exists(FileId),
    #[error("{0}: is encrypted; writing it unencrypted would need an explicit overwrite")]
    OverwriteEncrypted(FileId),
    #[error("{file}: {bytes} bytes do not fit in any free extent of the image")]
    NoSpace { file: FileId, bytes: u64 },
    #[error("the file is already encrypted (use update-key to change its key)")]
    AlreadyEncrypted,
    #[error("the file's metadata key is all zero (written by a defective reference tool), so anyone with an old copy could forge its contents; retire it with `paravisor vmgs update-key` first")]
    ZeroMetadataKey,
    #[error("{0}: stored unencrypted in an encrypted file, so not authenticated (the host could have written it)")]
    Unauthenticated(FileId),
    #[error("{file}: {bytes} bytes is more than the {limit} this reader accepts")]
    TooLarge {
        file: FileId,
        bytes: u64,
        limit: u64,
    },
    #[error("the new datastore key is the same as the old one")]
    SameKey,
    #[error("the store failed in the middle of a commit; reopen the file to continue")]
    Poisoned,
    #[error("no randomness for keys or nonces: {0}")]
    Random(#[from] RandomError),
}

impl Error {
    pub(crate) fn io(what: &'static str) -> impl FnOnce(StorageError) -> Error {
        move |source| Error::Io { what, source }
    }

    /// The file id the error concerns, if any.
    pub fn file(&self) -> Option<FileId> {
        match self {
            Error::CorruptEntry { file, .. } | Error::NoSpace { file, .. } => Some(*file),
            Error::Authentication(f)
            | Error::NotFound(f)
            | Error::Reserved(f)
            | Error::Exists(f)
            | Error::OverwriteEncrypted(f)
            | Error::Unauthenticated(f) => Some(*f),
            Error::TooLarge { file, .. } => Some(*file),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = core::result::Result<T, E>;
