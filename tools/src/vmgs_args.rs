//! `paravisor vmgs ...`'s arguments (the reference vmgstool's command names and options) and
//! exit codes. The commands run in the tools binary (`pv-tools`, `vmgs_cli`), except
//! `reseal`, which the core runs.

use std::path::PathBuf;

use clap::Args;
use clap::Subcommand;
use pv_vmgs::FileId;

/// The exit codes of `paravisor vmgs`: the reference vmgstool's (its `ExitCode`), and one of
/// ours for usage errors that none of its codes means.
pub mod exit {
    /// Any other error.
    pub const ERROR: u8 = 1;
    /// `query-encryption` of a plain file, or a key given for one.
    pub const NOT_ENCRYPTED: u8 = 2;
    /// A zero-length file, or one with no header written.
    pub const EMPTY: u8 = 3;
    /// The file id is not allocated.
    pub const NOT_FOUND: u8 = 4;
    /// A VMGS version 1 file.
    pub const V1_FORMAT: u8 = 5;
    /// `query-encryption`: encrypted, with VM_UNIQUE_ID but no KEY_PROTECTOR (the
    /// reference's "GspById").
    pub const GSP_BY_ID: u8 = 6;
    /// `query-encryption`: encrypted, with neither KEY_PROTECTOR nor VM_UNIQUE_ID (the
    /// reference's "unknown encryption scheme").
    pub const GSP_UNKNOWN: u8 = 7;
    /// The command line is wrong (sysexits' EX_USAGE).
    pub const USAGE: u8 = 64;
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum VmgsCmd {
    /// Create a new VMGS file (a 4 MiB image by default), optionally encrypted.
    Create {
        #[command(flatten)]
        file: FileArg,
        /// Image size in bytes (without the 512-byte VHD footer); K/M/G suffixes allowed.
        #[arg(short = 's', long = "file-size", alias = "filesize")]
        size: Option<String>,
        #[command(flatten)]
        key: OptKey,
        #[command(flatten)]
        alg: OptAlg,
        /// Replace an existing file.
        #[arg(long = "force-create", alias = "forcecreate")]
        force: bool,
    },
    /// Write a file id's contents from a data file.
    Write {
        #[command(flatten)]
        file: FileArg,
        /// The data to write.
        #[arg(short = 'd', long = "data-path", alias = "datapath")]
        data: PathBuf,
        #[command(flatten)]
        id: IdArg,
        #[command(flatten)]
        key: OptKey,
        /// Replace the file id if it already exists.
        #[arg(long = "allow-overwrite", alias = "allowoverwrite")]
        allow_overwrite: bool,
    },
    /// Print a file id's contents as hex, or write them to a file (-d) or raw to stdout.
    Dump {
        #[command(flatten)]
        file: FileArg,
        /// Write the contents to this file instead of printing them.
        #[arg(short = 'd', long = "data-path", alias = "datapath")]
        data: Option<PathBuf>,
        #[command(flatten)]
        id: IdArg,
        #[command(flatten)]
        key: OptKey,
        /// Write the raw bytes to stdout.
        #[arg(long = "raw-stdout", alias = "rawstdout", conflicts_with = "data")]
        raw_stdout: bool,
    },
    /// Print both headers, check them and say which is active.
    DumpHeaders {
        #[command(flatten)]
        file: FileArg,
    },
    /// Print the file table.
    DumpFileTable {
        #[command(flatten)]
        file: FileArg,
        #[command(flatten)]
        key: OptKey,
    },
    /// Print the size of a file id's contents (the number alone on stdout).
    QuerySize {
        #[command(flatten)]
        file: FileArg,
        #[command(flatten)]
        id: IdArg,
    },
    /// Say whether the file is encrypted (exit 2 if not).
    QueryEncryption {
        #[command(flatten)]
        file: FileArg,
    },
    /// Replace the datastore key of an encrypted file.
    UpdateKey {
        #[command(flatten)]
        file: FileArg,
        /// The current key file.
        #[arg(short = 'k', long = "key-path", alias = "keypath")]
        key: PathBuf,
        /// The new key file.
        #[arg(short = 'n', long = "new-key-path", alias = "newkeypath")]
        new_key: PathBuf,
        #[command(flatten)]
        alg: Alg,
    },
    /// Encrypt an unencrypted file (every existing file id is re-encrypted).
    Encrypt {
        #[command(flatten)]
        file: FileArg,
        /// The key file.
        #[arg(short = 'k', long = "key-path", alias = "keypath")]
        key: PathBuf,
        #[command(flatten)]
        alg: Alg,
    },
    /// Remove a file id (no key needed, as with the reference tool: on an encrypted file
    /// without -k only the file table changes).
    Delete {
        #[command(flatten)]
        file: FileArg,
        #[command(flatten)]
        id: IdArg,
        #[command(flatten)]
        key: OptKey,
    },
    /// Give a file id's contents another id.
    Move {
        #[command(flatten)]
        file: FileArg,
        /// The id to move from.
        #[arg(long = "src-file-id", alias = "src", value_parser = parse_id)]
        src: FileId,
        /// The id to move to.
        #[arg(long = "dst-file-id", alias = "dst", value_parser = parse_id)]
        dst: FileId,
        #[command(flatten)]
        key: OptKey,
        /// Replace the destination if it exists.
        #[arg(long = "allow-overwrite", alias = "allowoverwrite")]
        allow_overwrite: bool,
    },
}

#[derive(Args, Debug)]
pub struct FileArg {
    /// The VMGS file.
    #[arg(short = 'f', long = "file-path", alias = "filepath")]
    pub path: PathBuf,
}

#[derive(Args, Debug)]
pub struct IdArg {
    /// File id: a name (TPM_NVRAM, BIOS_NVRAM, ...) or a number.
    #[arg(short = 'i', long = "file-id", alias = "fileid", value_parser = parse_id)]
    pub id: FileId,
}

#[derive(Args, Debug)]
pub struct OptKey {
    /// The 32-byte datastore key file (needed to read or change an encrypted file).
    #[arg(short = 'k', long = "key-path", alias = "keypath")]
    pub key: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct OptAlg {
    /// Encryption algorithm (with -k): AES_GCM.
    #[arg(short = 'e', long = "encryption-algorithm", alias = "encryptionalgorithm", value_parser = ["AES_GCM", "NONE"])]
    pub alg: Option<String>,
}

#[derive(Args, Debug)]
pub struct Alg {
    /// Encryption algorithm: AES_GCM.
    #[arg(short = 'e', long = "encryption-algorithm", alias = "encryptionalgorithm", value_parser = ["AES_GCM"])]
    pub alg: String,
}

pub fn parse_id(text: &str) -> Result<FileId, String> {
    FileId::parse(text).ok_or_else(|| {
        let names: Vec<&str> = FileId::NAMED.iter().map(|(_, n)| *n).collect();
        format!(
            "\"{text}\" is not a file id: use a number 0..=63 or one of {}",
            names.join(", ")
        )
    })
}
