//! `paravisor vmgs ...`: VMGS file tools with the reference `vmgstool`'s command names,
//! options and exit codes, on top of the `pv_vmgs` format library.
//!
//! Exit codes ([`exit`]): the reference tool's, which automation relies on, and 64 for a
//! command-line usage error (clap's 2 would read as "not encrypted").

use std::fs::File;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;

use pv_vmgs::error::Error;
use pv_vmgs::format::Header;
use pv_vmgs::store::inspect_headers;
use pv_vmgs::vhd;
use pv_vmgs::FileId;
use pv_vmgs::FileStorage;
use pv_vmgs::Key;
use pv_vmgs::Vmgs;

use crate::vmgs_args::*;

/// A failure: what went wrong with which file, and the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(path: &Path, e: Error) -> Failure {
        let code = match e {
            Error::NotEncrypted => exit::NOT_ENCRYPTED,
            Error::Empty => exit::EMPTY,
            Error::NotFound(_) => exit::NOT_FOUND,
            Error::V1Format => exit::V1_FORMAT,
            _ => exit::ERROR,
        };
        let hint = match e {
            Error::NeedsKey => " (give the datastore key with -k)",
            Error::Exists(_) => " (use --allow-overwrite)",
            _ => "",
        };
        Failure {
            code,
            message: format!("{}: {e}{hint}", path.display()),
        }
    }

    fn other(code: u8, message: String) -> Failure {
        Failure { code, message }
    }
}

type Outcome = Result<(), Failure>;

/// Runs a subcommand and returns the process exit code.
pub fn run(cmd: VmgsCmd) -> ExitCode {
    match dispatch(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("paravisor vmgs: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn read_key(path: &Path) -> Result<Key, Failure> {
    let fail = |e: std::io::Error| {
        Failure::other(exit::ERROR, format!("key file {}: {e}", path.display()))
    };
    let len = std::fs::metadata(path).map_err(fail)?.len();
    if len != 32 {
        return Err(Failure::other(
            exit::ERROR,
            format!(
                "key file {} is {len} bytes; a datastore key is exactly 32 bytes",
                path.display()
            ),
        ));
    }
    let bytes = std::fs::read(path).map_err(fail)?;
    let key = Key::from_slice(&bytes).ok_or_else(|| {
        Failure::other(
            exit::ERROR,
            format!(
                "key file {} is {} bytes; a datastore key is exactly 32 bytes",
                path.display(),
                bytes.len()
            ),
        )
    });
    zeroize::Zeroize::zeroize(&mut { bytes });
    key
}

fn opt_key(key: &OptKey) -> Result<Option<Key>, Failure> {
    key.key.as_deref().map(read_key).transpose()
}

fn open_file(path: &Path, write: bool) -> Result<FileStorage, Failure> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .map_err(|e| Failure::other(exit::ERROR, format!("{}: {e}", path.display())))?;
    Ok(FileStorage::new(file))
}

fn open(path: &Path, key: Option<&Key>, write: bool) -> Result<Vmgs<FileStorage>, Failure> {
    let vmgs = Vmgs::open(open_file(path, write)?, key).map_err(|e| Failure::new(path, e))?;
    for w in vmgs.warnings() {
        eprintln!("paravisor vmgs: {}: warning: {w}", path.display());
    }
    Ok(vmgs)
}

fn parse_image_size(text: Option<&str>) -> Result<u64, Failure> {
    let Some(text) = text else {
        return Ok(vhd::DEFAULT_IMAGE);
    };
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => microkernel::manifest::parse_size(t),
    };
    let size = parsed.ok_or_else(|| {
        Failure::other(
            exit::ERROR,
            format!("file size \"{text}\" is not a size in bytes"),
        )
    })?;
    vhd::check_image_size(size)
        .map_err(|e| Failure::other(exit::ERROR, format!("file size: {e}")))?;
    Ok(size)
}

fn dispatch(cmd: VmgsCmd) -> Outcome {
    match cmd {
        VmgsCmd::Create {
            file,
            size,
            key,
            alg,
            force,
        } => {
            let size = parse_image_size(size.as_deref())?;
            let key = match (opt_key(&key)?, alg.alg.as_deref()) {
                (Some(k), Some("AES_GCM")) => Some(k),
                (None, None | Some("NONE")) => None,
                (Some(_), _) => {
                    return Err(Failure::other(exit::ERROR, "-k needs -e AES_GCM".into()));
                }
                (None, Some(_)) => {
                    return Err(Failure::other(
                        exit::ERROR,
                        "-e AES_GCM needs a key file (-k)".into(),
                    ));
                }
            };
            create(&file.path, size, key.as_ref(), force)
        }
        VmgsCmd::Write {
            file,
            data,
            id,
            key,
            allow_overwrite,
        } => {
            let key = opt_key(&key)?;
            let contents = std::fs::read(&data).map_err(|e| {
                Failure::other(exit::ERROR, format!("data file {}: {e}", data.display()))
            })?;
            let mut vmgs = open(&file.path, key.as_ref(), true)?;
            if vmgs.file_info(id.id).is_ok_and(|f| f.size > 0) && !allow_overwrite {
                return Err(Failure::new(&file.path, Error::Exists(id.id)));
            }
            vmgs.write_file(id.id, &contents)
                .map_err(|e| Failure::new(&file.path, e))?;
            eprintln!(
                "wrote {} bytes to {} in {}{}",
                contents.len(),
                id.id,
                file.path.display(),
                if vmgs.is_encrypted() {
                    " (encrypted)"
                } else {
                    ""
                }
            );
            Ok(())
        }
        VmgsCmd::Dump {
            file,
            data,
            id,
            key,
            raw_stdout,
        } => {
            let key = opt_key(&key)?;
            let mut vmgs = open(&file.path, key.as_ref(), false)?;
            let info = vmgs
                .file_info(id.id)
                .map_err(|e| Failure::new(&file.path, e))?;
            // Ciphertext is never dumped as if it were the contents (the reference tool does,
            // with a warning a script does not see).
            if info.encrypted && !vmgs.is_unlocked() {
                return Err(Failure::new(&file.path, Error::NeedsKey));
            }
            let contents = match vmgs.read_file(id.id) {
                Err(Error::Unauthenticated(_)) => {
                    eprintln!(
                        "paravisor vmgs: {}: warning: {} is stored unencrypted in an encrypted file: it is not authenticated",
                        file.path.display(),
                        id.id
                    );
                    vmgs.read_unauthenticated(id.id)
                }
                other => other,
            }
            .map_err(|e| Failure::new(&file.path, e))?;
            if let Some(out) = data {
                write_private(&out, &contents)?;
                eprintln!(
                    "{} bytes of {} written to {}",
                    contents.len(),
                    id.id,
                    out.display()
                );
            } else if raw_stdout {
                std::io::stdout()
                    .write_all(&contents)
                    .map_err(|e| Failure::other(exit::ERROR, format!("stdout: {e}")))?;
            } else {
                print!("{}", hex_dump(&contents));
            }
            Ok(())
        }
        VmgsCmd::DumpHeaders { file } => {
            let mut storage = open_file(&file.path, false)?;
            let report = inspect_headers(&mut storage).map_err(|e| Failure::new(&file.path, e))?;
            print!("{}", headers_table(&report));
            match report.active {
                Ok(_) => Ok(()),
                Err(_)
                    if report
                        .problems
                        .iter()
                        .all(|p| matches!(p, Some(pv_vmgs::error::HeaderProblem::Empty))) =>
                {
                    Err(Failure::new(&file.path, Error::Empty))
                }
                Err(e) => Err(Failure::other(
                    exit::ERROR,
                    format!("{}: {e}", file.path.display()),
                )),
            }
        }
        VmgsCmd::DumpFileTable { file, key } => {
            let key = opt_key(&key)?;
            let vmgs = open(&file.path, key.as_ref(), false)?;
            print!("{}", file_table(&vmgs));
            Ok(())
        }
        VmgsCmd::QuerySize { file, id } => {
            let vmgs = open(&file.path, None, false)?;
            let info = vmgs
                .file_info(id.id)
                .map_err(|e| Failure::new(&file.path, e))?;
            println!("{}", info.size);
            eprintln!("{} has a size of {} bytes", id.id, info.size);
            Ok(())
        }
        VmgsCmd::QueryEncryption { file } => {
            let vmgs = open(&file.path, None, false)?;
            let path = file.path.display();
            if !vmgs.is_encrypted() {
                println!("{path} is not encrypted (encryption scheme: None)");
                return Err(Failure::other(
                    exit::NOT_ENCRYPTED,
                    format!("{path}: not encrypted"),
                ));
            }
            // As the reference decides it: by which key protector file is allocated.
            let has = |id| vmgs.file_info(id).is_ok();
            let (scheme, code) = if has(FileId::KEY_PROTECTOR) {
                ("GspKey", None)
            } else if has(FileId::VM_UNIQUE_ID) {
                ("GspById", Some(exit::GSP_BY_ID))
            } else {
                ("an unknown encryption scheme", Some(exit::GSP_UNKNOWN))
            };
            println!("{path} is encrypted with AES GCM encryption algorithm using {scheme}");
            if has(FileId::HW_KEY_PROTECTOR) {
                eprintln!("{path}: its datastore key is sealed to the platform (HW_KEY_PROTECTOR)");
            }
            match code {
                None => Ok(()),
                Some(code) => Err(Failure::other(
                    code,
                    format!("{path}: encrypted using {scheme}"),
                )),
            }
        }
        VmgsCmd::UpdateKey {
            file,
            key,
            new_key,
            alg: _,
        } => {
            let old = read_key(&key)?;
            let new = read_key(&new_key)?;
            let mut vmgs = open(&file.path, Some(&old), true)?;
            vmgs.update_key(&new)
                .map_err(|e| Failure::new(&file.path, e))?;
            eprintln!("{}: datastore key replaced", file.path.display());
            Ok(())
        }
        VmgsCmd::Encrypt { file, key, alg: _ } => {
            let key = read_key(&key)?;
            let mut vmgs = open(&file.path, None, true)?;
            if vmgs.is_encrypted() {
                return Err(Failure::other(
                    exit::ERROR,
                    format!(
                        "{}: already encrypted (use update-key to change its key)",
                        file.path.display()
                    ),
                ));
            }
            vmgs.encrypt(&key)
                .map_err(|e| Failure::new(&file.path, e))?;
            eprintln!("{}: encrypted with AES-256-GCM", file.path.display());
            Ok(())
        }
        VmgsCmd::Delete { file, id, key } => {
            let key = opt_key(&key)?;
            let mut vmgs = open(&file.path, key.as_ref(), true)?;
            vmgs.delete_file(id.id)
                .map_err(|e| Failure::new(&file.path, e))?;
            eprintln!("{}: deleted {}", file.path.display(), id.id);
            if vmgs.is_encrypted() && !vmgs.is_unlocked() {
                // As the reference tool's delete: the file table changes, the encrypted
                // extended table cannot.
                eprintln!(
                    "{}: (without the key: {}'s key stays in the encrypted extended file table until the next change made with the key)",
                    file.path.display(),
                    id.id
                );
            }
            Ok(())
        }
        VmgsCmd::Move {
            file,
            src,
            dst,
            key,
            allow_overwrite,
        } => {
            let key = opt_key(&key)?;
            let mut vmgs = open(&file.path, key.as_ref(), true)?;
            vmgs.move_file(src, dst, allow_overwrite)
                .map_err(|e| Failure::new(&file.path, e))?;
            eprintln!("{}: moved {src} to {dst}", file.path.display());
            Ok(())
        }
    }
}

/// Creates a VMGS file at `path`. The file is built under a temporary name and renamed into
/// place, so a failed create never leaves a half-made file behind.
fn create(path: &Path, size: u64, key: Option<&Key>, force: bool) -> Outcome {
    if path.exists() && !force {
        return Err(Failure::other(
            exit::ERROR,
            format!(
                "{}: already exists (use --force-create to replace it)",
                path.display()
            ),
        ));
    }
    create_vmgs_file(path, size, key).map_err(|e| Failure::other(exit::ERROR, e))?;
    eprintln!(
        "created {} ({} byte image{})",
        path.display(),
        size,
        if key.is_some() {
            ", encrypted with AES-256-GCM"
        } else {
            ""
        }
    );
    Ok(())
}

/// Creates a fresh VMGS file (mode 0600) atomically: temporary file, sync, rename, sync of
/// the directory. Used by the CLI and by the microkernel on a first run.
pub fn create_vmgs_file(path: &Path, size: u64, key: Option<&Key>) -> Result<(), String> {
    create_vmgs_file_with(path, size, key, &[])
}

/// [`create_vmgs_file`] with unencrypted files written before the file appears under its name
/// (a key protector: the file never exists without it).
pub fn create_vmgs_file_with(
    path: &Path,
    size: u64,
    key: Option<&Key>,
    plain_files: &[(FileId, &[u8])],
) -> Result<(), String> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let tmp = dir.join(format!(".{}.creating", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| -> Result<(), String> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        microkernel::state_files::fill_vmgs(file, path, size, key, plain_files)?
            .sync_all()
            .map_err(|e| format!("{}: {e}", tmp.display()))?;
        // Linked into place, never renamed over: a file that appeared meanwhile is never
        // replaced (it may hold a guest's state).
        std::fs::hard_link(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
        std::fs::remove_file(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("{}: {e}", dir.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes decrypted contents to a new file readable by its owner only.
fn write_private(path: &Path, contents: &[u8]) -> Outcome {
    let fail = |e: std::io::Error| Failure::other(exit::ERROR, format!("{}: {e}", path.display()));
    // Not through a symbolic link, and owner-only even if the file existed with wider
    // permissions (mode 0600 at creation applies to new files only).
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(fail)?;
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(fail)?;
    f.set_len(0).map_err(fail)?;
    f.write_all(contents).map_err(fail)
}

/// 16 bytes a line: `0x00, 0x01, ...  // ascii`.
fn hex_dump(bytes: &[u8]) -> String {
    let mut out = String::new();
    for line in bytes.chunks(16) {
        for b in line {
            out.push_str(&format!("0x{b:02x}, "));
        }
        for _ in line.len()..16 {
            out.push_str("      ");
        }
        out.push_str("// ");
        for &b in line {
            out.push(if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            });
        }
        out.push('\n');
    }
    out
}

fn id_name(id: FileId) -> String {
    id.name()
        .map_or_else(|| format!("({})", id.index()), str::to_string)
}

fn file_table<S: pv_vmgs::Storage>(vmgs: &Vmgs<S>) -> String {
    let mut out = String::from("FILE TABLE\n");
    out.push_str(&format!(
        "{:>7}  {:<25} {:>7} {:>10} {:>10}  {}\n",
        "FILE ID", "NAME", "OFFSET", "ALLOCATED", "VALID", "ENCRYPTED"
    ));
    for f in vmgs.files() {
        out.push_str(&format!(
            "{:>7}  {:<25} {:>7} {:>10} {:>10}  {}\n",
            f.id.index(),
            id_name(f.id),
            f.offset,
            u64::from(f.blocks) * pv_vmgs::format::BLOCK_SIZE,
            f.size,
            if f.encrypted { "yes" } else { "no" }
        ));
    }
    out
}

fn headers_table(report: &pv_vmgs::store::HeaderReport) -> String {
    let [h1, h2] = &report.headers;
    let mut out = String::from("FILE HEADERS\n");
    let row = |out: &mut String, field: &str, f: &dyn Fn(&Header) -> String| {
        out.push_str(&format!("{field:<22} {:>70} {:>70}\n", f(h1), f(h2)));
    };
    out.push_str(&format!(
        "{:<22} {:>70} {:>70}\n",
        "Field", "Header 1", "Header 2"
    ));
    row(&mut out, "Signature:", &|h| {
        format!("{:#018x}", u64::from_le_bytes(h.signature))
    });
    row(&mut out, "Version:", &|h| {
        let v = h.version.get();
        format!("{}.{}", v >> 16, v & 0xffff)
    });
    row(&mut out, "Checksum:", &|h| {
        format!("{:#010x}", h.checksum.get())
    });
    row(&mut out, "Sequence:", &|h| h.sequence.get().to_string());
    row(&mut out, "HeaderSize:", &|h| {
        h.header_size.get().to_string()
    });
    row(&mut out, "FileTableOffset:", &|h| {
        format!("{:#010x}", h.file_table_offset.get())
    });
    row(&mut out, "FileTableSize:", &|h| {
        h.file_table_size.get().to_string()
    });
    row(&mut out, "EncryptionAlgorithm:", &|h| {
        format!("{:#06x}", h.encryption_algorithm.get())
    });
    row(&mut out, "Markers:", &|h| {
        format!("{:#06x}", h.markers.get())
    });
    for slot in 0..2 {
        out.push_str(&format!("MetadataKey{}:\n", slot + 1));
        row(&mut out, "  Nonce:", &|h| hex(&h.key_slots[slot].nonce));
        row(&mut out, "  Reserved:", &|h| {
            format!("{:#010x}", h.key_slots[slot].reserved.get())
        });
        row(&mut out, "  AuthenticationTag:", &|h| {
            hex(&h.key_slots[slot].tag)
        });
        row(&mut out, "  EncryptionKey:", &|h| {
            hex(&h.key_slots[slot].wrapped_key)
        });
    }
    row(&mut out, "Reserved:", &|h| {
        format!("{:#010x}", h.reserved.get())
    });
    out.push_str(&"-".repeat(164));
    out.push_str("\n\n");
    for (i, p) in report.problems.iter().enumerate() {
        match p {
            None => out.push_str(&format!("Verifying header {}... [VALID]\n", i + 1)),
            Some(p) => out.push_str(&format!(
                "Verifying header {}... [INVALID] Error: {p}\n",
                i + 1
            )),
        }
    }
    match &report.active {
        Ok(slot) => out.push_str(&format!("Active header is {}\n", slot + 1)),
        Err(e) => out.push_str(&format!("Unable to determine active header: {e}\n")),
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    format!("0x{}", microkernel::util::hex(bytes))
}
