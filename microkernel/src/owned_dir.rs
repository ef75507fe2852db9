//! A directory the paravisor owns (the state directory, the simulated platform's directory):
//! opened once as a descriptor, checked, and from then on used only through that descriptor.
//!
//! What is checked, and refused with the directory's name and what to do:
//! - the directory belongs to the user the paravisor runs as and is not writable by group or
//!   others. Group/other *read* is allowed (an existing `state/` made 0755 by an earlier
//!   version keeps working): every secret inside is a file of its own that must be 0600. A
//!   directory made here is 0700;
//! - every directory above it belongs to root or that user and is not writable by group or
//!   others unless sticky (`/tmp`): nobody else can rename it or anything leading to it;
//! - a symbolic link on the way is followed only if it belongs to root or that user, and where
//!   it leads is checked the same way;
//! - files inside are opened relative to the directory's descriptor, never following a link
//!   (subdirectories too), non-blocking (a FIFO cannot hang a start), and must be regular
//!   files of that user (a secret: not accessible to group or others either);
//! - a file written whole goes to a new temporary file (O_EXCL), is synced and renamed over
//!   the name: whatever was there (a link, a FIFO, another user's file) is replaced, never
//!   written through. A file that must never be replaced (a key, a guest-state file) is
//!   linked into place instead, which fails if the name exists.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::fs::Metadata;
use std::io;
use std::io::Read;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Component;
use std::path::Path;
use std::path::PathBuf;

use ipc_defs::hosted::sys;

/// Most symbolic links followed while resolving one directory (as the kernel's limit).
const MAX_LINKS: usize = 40;
/// Mode of a directory made here: its owner's alone.
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Why a directory or a file in it is refused.
#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{subject}: {source}")]
    Io { subject: String, source: io::Error },
    #[error("{subject} does not exist")]
    Missing { subject: String },
    #[error("{subject} belongs to uid {owner}, not to uid {euid} that runs the paravisor: another user could have put or changed what is in it; use one of your own (a new directory, or `chown {euid} {path}` if it is yours)")]
    NotOwned {
        subject: String,
        path: String,
        owner: u32,
        euid: u32,
    },
    #[error("{subject} is writable by group or others (mode {mode:04o}): another user could plant files in it; run `chmod go-w {path}` or use a private directory")]
    Writable {
        subject: String,
        path: String,
        mode: u32,
    },
    #[error("{subject}: the directory {parent} above it {why}, so another user could replace what lies below it; use a directory whose parents only root or you can change")]
    UnsafeParent {
        subject: String,
        parent: String,
        why: String,
    },
    #[error("{subject}: the symbolic link {link} on its path belongs to uid {owner} (neither root nor you); refusing to follow it")]
    UnsafeLink {
        subject: String,
        link: String,
        owner: u32,
    },
    #[error("{subject}: more than {MAX_LINKS} symbolic links on its path")]
    TooManyLinks { subject: String },
    #[error("{subject} is a {found}, not a {expected}; refusing to use it (if you did not put it there, remove it: `rm {path}`)")]
    WrongType {
        subject: String,
        path: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error(
        "{subject} is accessible to group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    NotPrivate {
        subject: String,
        path: String,
        mode: u32,
    },
    #[error("{subject} is larger than the {limit} bytes it can be")]
    TooLarge { subject: String, limit: u64 },
}

impl DirError {
    /// Whether the thing asked for does not exist (nothing else is wrong).
    pub fn is_missing(&self) -> bool {
        matches!(self, DirError::Missing { .. })
    }
}

fn io_error(subject: &str) -> impl FnOnce(io::Error) -> DirError + '_ {
    move |source| DirError::Io {
        subject: subject.to_string(),
        source,
    }
}

/// What a file type is called in a refusal.
fn kind(ft: std::fs::FileType) -> &'static str {
    if ft.is_symlink() {
        "symbolic link"
    } else if ft.is_dir() {
        "directory"
    } else if ft.is_fifo() {
        "FIFO"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "device"
    } else {
        "regular file"
    }
}

/// How a directory on a path is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    /// The directory itself: ours, not writable by group or others.
    Owned,
    /// A directory above it: root's or ours, not writable by group or others unless sticky.
    Above,
}

fn check_dir(meta: &Metadata, rule: Rule, here: &Path, subject: &str) -> Result<(), DirError> {
    let euid = sys::effective_uid();
    let mode = meta.mode() & 0o7777;
    let writable = mode & 0o022 != 0;
    match rule {
        Rule::Owned if meta.uid() != euid => Err(DirError::NotOwned {
            subject: subject.to_string(),
            path: here.display().to_string(),
            owner: meta.uid(),
            euid,
        }),
        Rule::Owned if writable => Err(DirError::Writable {
            subject: subject.to_string(),
            path: here.display().to_string(),
            mode,
        }),
        Rule::Above if meta.uid() != 0 && meta.uid() != euid => Err(DirError::UnsafeParent {
            subject: subject.to_string(),
            parent: here.display().to_string(),
            why: format!(
                "belongs to uid {}, neither root nor you (uid {euid})",
                meta.uid()
            ),
        }),
        Rule::Above if writable && mode & 0o1000 == 0 => Err(DirError::UnsafeParent {
            subject: subject.to_string(),
            parent: here.display().to_string(),
            why: format!("is writable by group or others (mode {mode:04o}) and not sticky"),
        }),
        _ => Ok(()),
    }
}

/// The parts of `path` to walk: names and `..`.
fn parts(path: &Path) -> Vec<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect()
}

fn open_path(dir: &File, name: &Path) -> io::Result<File> {
    sys::openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0).map(File::from)
}

/// Resolves `path` from `/` one directory at a time, each opened (O_PATH | O_NOFOLLOW)
/// relative to the one before and checked (the last by `last`, the others as directories
/// above it); missing directories are made (0700) if `create`. A descriptor of the last one.
fn walk(path: &Path, subject: &str, create: bool, last: Rule) -> Result<File, DirError> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(io_error(subject))?
            .join(path)
    };
    let root = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open("/")
            .map_err(io_error(subject))?
    };
    let mut pending: VecDeque<OsString> = parts(&absolute).into();
    if !pending.is_empty() {
        check_dir(
            &root.metadata().map_err(io_error(subject))?,
            Rule::Above,
            Path::new("/"),
            subject,
        )?;
    }
    // The directories walked, for `..`.
    let mut stack: Vec<(File, PathBuf)> = vec![(root, PathBuf::from("/"))];
    let mut links = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            if stack.len() > 1 {
                stack.pop();
            }
            continue;
        }
        let (dir, at) = stack.last().expect("the root stays");
        let here = at.join(&name);
        let name = Path::new(&name);
        let file = match open_path(dir, name) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                match sys::mkdirat(dir, name, PRIVATE_DIR_MODE) {
                    Ok(()) => {}
                    // Made meanwhile by someone else: the checks below decide.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => {
                        return Err(io_error(&format!("{subject}: making {}", here.display()))(
                            e,
                        ))
                    }
                }
                open_path(dir, name).map_err(io_error(subject))?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(DirError::Missing {
                    subject: if here == absolute {
                        subject.to_string()
                    } else {
                        format!("{subject}: {}", here.display())
                    },
                })
            }
            Err(e) => return Err(io_error(subject)(e)),
        };
        let meta = file.metadata().map_err(io_error(subject))?;
        if meta.file_type().is_symlink() {
            let euid = sys::effective_uid();
            if meta.uid() != 0 && meta.uid() != euid {
                return Err(DirError::UnsafeLink {
                    subject: subject.to_string(),
                    link: here.display().to_string(),
                    owner: meta.uid(),
                });
            }
            links += 1;
            if links > MAX_LINKS {
                return Err(DirError::TooManyLinks {
                    subject: subject.to_string(),
                });
            }
            let target = sys::readlink_fd(&file).map_err(io_error(subject))?;
            if target.is_absolute() {
                stack.truncate(1);
            }
            for part in parts(&target).into_iter().rev() {
                pending.push_front(part);
            }
            continue;
        }
        if !meta.is_dir() {
            return Err(DirError::WrongType {
                subject: subject.to_string(),
                path: here.display().to_string(),
                found: kind(meta.file_type()),
                expected: "directory",
            });
        }
        if !pending.is_empty() {
            check_dir(&meta, Rule::Above, &here, subject)?;
        }
        stack.push((file, here));
    }
    let (file, at) = stack.pop().expect("the root stays");
    check_dir(
        &file.metadata().map_err(io_error(subject))?,
        last,
        &at,
        subject,
    )?;
    Ok(file)
}

/// Whether the directory at `path` is shared: writable by group or others (sticky or not),
/// so that anyone may make a new name in it. `None` if it does not exist (it would be made
/// private); its own mode otherwise. The path to it is checked as for a directory above a
/// state directory.
pub fn shared_mode(path: &Path, what: &str) -> Result<Option<u32>, DirError> {
    let subject = format!("{what} {}", path.display());
    match walk(path, &subject, false, Rule::Above) {
        Ok(dir) => {
            let mode = dir.metadata().map_err(io_error(&subject))?.mode() & 0o7777;
            Ok((mode & 0o022 != 0).then_some(mode))
        }
        Err(e) if e.is_missing() => Ok(None),
        Err(e) => Err(e),
    }
}

/// A checked directory of ours, used only through its descriptor.
#[derive(Debug)]
pub struct OwnedDir {
    dir: File,
    path: PathBuf,
}

/// A file to open in an [`OwnedDir`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// An existing file, read-only.
    Read,
    /// An existing file, read and written.
    ReadWrite,
    /// Read and written, made with this mode if missing.
    ReadWriteOrCreate(u32),
}

impl OwnedDir {
    /// Opens the directory `path` (`what` names it in errors: "state directory"), made
    /// (0700, with any missing directory above it) if missing and `create`; checks it and
    /// the directories above it.
    pub fn open(path: &Path, what: &str, create: bool) -> Result<OwnedDir, DirError> {
        let subject = format!("{what} {}", path.display());
        let found = walk(path, &subject, create, Rule::Owned)?;
        let dir = sys::openat(
            &found,
            Path::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .map_err(io_error(&subject))?;
        Ok(OwnedDir {
            dir: File::from(dir),
            path: path.to_path_buf(),
        })
    }

    /// The directory as it was named (for messages and for what must be a path: a socket).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where `rel` is, for messages.
    pub fn shown(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }

    pub fn try_clone(&self) -> io::Result<OwnedDir> {
        Ok(OwnedDir {
            dir: self.dir.try_clone()?,
            path: self.path.clone(),
        })
    }

    /// Flushes the directory's entries (after a rename or link into it).
    pub fn sync(&self) -> io::Result<()> {
        self.dir.sync_all()
    }

    /// The subdirectory `rel` (names only, no `..`), each level opened without following a
    /// link and checked like this one; made (0700) if missing and `create`.
    pub fn subdir(&self, rel: &Path, create: bool) -> Result<OwnedDir, DirError> {
        let mut dir = self.dir.try_clone().map_err(io_error(&self.subject(rel)))?;
        let mut at = self.path.clone();
        for part in rel.components() {
            let Component::Normal(name) = part else {
                return Err(DirError::Io {
                    subject: self.subject(rel),
                    source: io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "not a plain relative path",
                    ),
                });
            };
            at.push(name);
            let subject = format!("directory {}", at.display());
            let name = Path::new(name);
            let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            let opened = match sys::openat(&dir, name, flags, 0) {
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    match sys::mkdirat(&dir, name, PRIVATE_DIR_MODE) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                        Err(e) => return Err(io_error(&subject)(e)),
                    }
                    sys::openat(&dir, name, flags, 0)
                }
                other => other,
            };
            let next = File::from(
                opened.map_err(|e| self.refusal(&dir, name, &at, &subject, e, "directory"))?,
            );
            check_dir(
                &next.metadata().map_err(io_error(&subject))?,
                Rule::Owned,
                &at,
                &subject,
            )?;
            dir = next;
        }
        Ok(OwnedDir { dir, path: at })
    }

    fn subject(&self, rel: &Path) -> String {
        format!("file {}", self.shown(rel).display())
    }

    /// Turns a failed open into the refusal it stands for: what is there instead (a link,
    /// a directory, ...), or that nothing is.
    fn refusal(
        &self,
        dir: &File,
        name: &Path,
        shown: &Path,
        subject: &str,
        e: io::Error,
        expected: &'static str,
    ) -> DirError {
        if e.kind() == io::ErrorKind::NotFound {
            return DirError::Missing {
                subject: subject.to_string(),
            };
        }
        // ELOOP (a link under O_NOFOLLOW), ENOTDIR (not a directory): say what it is.
        if let Ok(meta) = open_path(dir, name).and_then(|f| f.metadata()) {
            let found = kind(meta.file_type());
            if found != expected {
                return DirError::WrongType {
                    subject: subject.to_string(),
                    path: shown.display().to_string(),
                    found,
                    expected,
                };
            }
        }
        io_error(subject)(e)
    }

    /// The directory holding `rel` (made if `create`) and `rel`'s own name.
    fn split<'a>(&self, rel: &'a Path, create: bool) -> Result<(OwnedDir, &'a Path), DirError> {
        let name = rel.file_name().ok_or_else(|| DirError::Io {
            subject: self.subject(rel),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        })?;
        let parent = rel.parent().unwrap_or(Path::new(""));
        let dir = if parent.as_os_str().is_empty() {
            self.try_clone().map_err(io_error(&self.subject(rel)))?
        } else {
            self.subdir(parent, create)?
        };
        Ok((dir, Path::new(name)))
    }

    /// Opens the file `rel`: never through a link, without blocking, and only if it is a
    /// regular file of ours.
    pub fn open_file(&self, rel: &Path, how: Open) -> Result<File, DirError> {
        let subject = self.subject(rel);
        let (dir, name) = self.split(rel, matches!(how, Open::ReadWriteOrCreate(_)))?;
        let (flags, mode) = match how {
            Open::Read => (libc::O_RDONLY, 0),
            Open::ReadWrite => (libc::O_RDWR, 0),
            Open::ReadWriteOrCreate(mode) => (libc::O_RDWR | libc::O_CREAT, mode),
        };
        let file = sys::openat(
            &dir.dir,
            name,
            flags | libc::O_NOFOLLOW | libc::O_NONBLOCK,
            mode,
        )
        .map(File::from)
        .map_err(|e| {
            self.refusal(
                &dir.dir,
                name,
                &self.shown(rel),
                &subject,
                e,
                "regular file",
            )
        })?;
        let meta = file.metadata().map_err(io_error(&subject))?;
        if !meta.is_file() {
            return Err(DirError::WrongType {
                subject,
                path: self.shown(rel).display().to_string(),
                found: kind(meta.file_type()),
                expected: "regular file",
            });
        }
        let euid = sys::effective_uid();
        if meta.uid() != euid {
            return Err(DirError::NotOwned {
                subject,
                path: self.shown(rel).display().to_string(),
                owner: meta.uid(),
                euid,
            });
        }
        Ok(file)
    }

    /// [`OwnedDir::open_file`], `None` if there is no such file.
    pub fn open_existing(&self, rel: &Path, how: Open) -> Result<Option<File>, DirError> {
        match self.open_file(rel, how) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.is_missing() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A secret (a key, a chip secret): a regular file of ours that group and others cannot
    /// access. `None` if there is none.
    pub fn open_secret(&self, rel: &Path) -> Result<Option<File>, DirError> {
        let Some(file) = self.open_existing(rel, Open::Read)? else {
            return Ok(None);
        };
        let mode = file
            .metadata()
            .map_err(io_error(&self.subject(rel)))?
            .mode()
            & 0o7777;
        if mode & 0o077 != 0 {
            return Err(DirError::NotPrivate {
                subject: self.subject(rel),
                path: self.shown(rel).display().to_string(),
                mode,
            });
        }
        Ok(Some(file))
    }

    /// The contents of `rel` (at most `limit` bytes), `None` if there is no such file.
    pub fn read(&self, rel: &Path, limit: u64) -> Result<Option<Vec<u8>>, DirError> {
        let Some(file) = self.open_existing(rel, Open::Read)? else {
            return Ok(None);
        };
        read_limited(file, limit, &self.subject(rel)).map(Some)
    }

    /// Whether anything (of any kind, a dangling link too) has the name `rel`.
    pub fn exists(&self, rel: &Path) -> Result<bool, DirError> {
        let (dir, name) = match self.split(rel, false) {
            Ok(x) => x,
            Err(e) if e.is_missing() => return Ok(false),
            Err(e) => return Err(e),
        };
        match open_path(&dir.dir, name) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error(&self.subject(rel))(e)),
        }
    }

    /// What is at `rel` if it is not a regular file of ours ("symbolic link", "FIFO", "file
    /// of uid 65534"); `None` if it is one, or if nothing is there.
    pub fn foreign(&self, rel: &Path) -> Option<String> {
        let (dir, name) = self.split(rel, false).ok()?;
        let meta = open_path(&dir.dir, name).and_then(|f| f.metadata()).ok()?;
        if !meta.is_file() {
            Some(kind(meta.file_type()).to_string())
        } else if meta.uid() != sys::effective_uid() {
            Some(format!("file of uid {}", meta.uid()))
        } else {
            None
        }
    }

    /// A new temporary file next to `name` in `dir`, with exactly `mode`.
    fn temporary(
        dir: &OwnedDir,
        name: &Path,
        mode: u32,
        subject: &str,
    ) -> Result<(File, PathBuf), DirError> {
        let mut random = [0u8; 8];
        getrandom::getrandom(&mut random)
            .map_err(|e| io_error(subject)(io::Error::other(e.to_string())))?;
        let tmp = PathBuf::from(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            crate::util::hex(&random)
        ));
        let file = sys::openat(
            &dir.dir,
            &tmp,
            libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            mode,
        )
        .map(File::from)
        .map_err(io_error(subject))?;
        // Exactly `mode`, whatever the umask took away.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_error(subject))?;
        Ok((file, tmp))
    }

    /// Replaces `rel` with `bytes` (mode `mode`): a new temporary file, synced, renamed over
    /// the name, the directory synced. Whatever was at the name is replaced, never written
    /// through. Returns what was there if it was not a regular file of ours (for a warning).
    pub fn replace(&self, rel: &Path, bytes: &[u8], mode: u32) -> Result<Option<String>, DirError> {
        let subject = self.subject(rel);
        let (dir, name) = self.split(rel, true)?;
        let was = self.foreign(rel);
        if was.as_deref() == Some("directory") {
            return Err(DirError::WrongType {
                subject,
                path: self.shown(rel).display().to_string(),
                found: "directory",
                expected: "regular file",
            });
        }
        let (mut file, tmp) = Self::temporary(&dir, name, mode, &subject)?;
        let result = file
            .write_all(bytes)
            .and_then(|()| file.sync_all())
            .and_then(|()| sys::renameat(&dir.dir, &tmp, name))
            .and_then(|()| dir.sync());
        if let Err(e) = result {
            let _ = sys::unlinkat(&dir.dir, &tmp, false);
            return Err(io_error(&subject)(e));
        }
        Ok(was)
    }

    /// Makes the new file `rel` (mode `mode`) whole or not at all: `fill` writes a temporary
    /// file, which is synced and linked to the name (failing if the name exists: a file that
    /// appeared meanwhile is never replaced), then the directory is synced.
    pub fn create_new(
        &self,
        rel: &Path,
        mode: u32,
        fill: impl FnOnce(File) -> Result<File, String>,
    ) -> Result<(), String> {
        let subject = self.subject(rel);
        let (dir, name) = self.split(rel, true).map_err(|e| e.to_string())?;
        let (file, tmp) = Self::temporary(&dir, name, mode, &subject).map_err(|e| e.to_string())?;
        let result = fill(file).and_then(|file| {
            file.sync_all()
                .and_then(|()| sys::linkat(&dir.dir, &tmp, name))
                .and_then(|()| sys::unlinkat(&dir.dir, &tmp, false))
                .and_then(|()| dir.sync())
                .map_err(|e| format!("{subject}: {e}"))
        });
        if result.is_err() {
            let _ = sys::unlinkat(&dir.dir, &tmp, false);
        }
        result
    }

    /// Removes the file `name` (not a directory) of this directory, if it is there.
    pub fn remove(&self, name: &Path) -> Result<(), DirError> {
        match sys::unlinkat(&self.dir, name, false) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error(&self.subject(name))(e)),
        }
    }
}

/// At most `limit` bytes of `file`, refusing a longer one.
fn read_limited(file: File, limit: u64, subject: &str) -> Result<Vec<u8>, DirError> {
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error(subject))?;
    if bytes.len() as u64 > limit {
        return Err(DirError::TooLarge {
            subject: subject.to_string(),
            limit,
        });
    }
    Ok(bytes)
}

/// A directory in which a private directory can be made safely, even a shared one such as
/// `/tmp`: it and the directories above it belong to root or us, and are not writable by
/// others unless sticky (so nobody else can rename what we make in it).
#[derive(Debug)]
pub struct ParentDir {
    dir: File,
    path: PathBuf,
}

impl ParentDir {
    /// Opens (making it 0700 if missing) the directory `path`, checked as a directory above.
    pub fn open(path: &Path, what: &str) -> Result<ParentDir, DirError> {
        let subject = format!("{what} {}", path.display());
        Ok(ParentDir {
            dir: walk(path, &subject, true, Rule::Above)?,
            path: path.to_path_buf(),
        })
    }

    /// A new private directory (0700) in it, named `prefix` + a random suffix: its name and
    /// the directory.
    pub fn new_private_dir(&self, prefix: &str) -> Result<(PathBuf, OwnedDir), DirError> {
        let mut random = [0u8; 8];
        let subject = format!("a new directory in {}", self.path.display());
        getrandom::getrandom(&mut random)
            .map_err(|e| io_error(&subject)(io::Error::other(e.to_string())))?;
        let name = PathBuf::from(format!("{prefix}{}", crate::util::hex(&random)));
        sys::mkdirat(&self.dir, &name, PRIVATE_DIR_MODE).map_err(io_error(&subject))?;
        let dir = File::from(
            sys::openat(
                &self.dir,
                &name,
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                0,
            )
            .map_err(io_error(&subject))?,
        );
        let path = self.path.join(&name);
        check_dir(
            &dir.metadata().map_err(io_error(&subject))?,
            Rule::Owned,
            &path,
            &subject,
        )?;
        Ok((name, OwnedDir { dir, path }))
    }

    /// Renames `from` to `to` (a directory replaces an empty directory; fails on a full one).
    pub fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        sys::renameat(&self.dir, from, to)?;
        // O_PATH descriptors cannot be synced; a reopened one can.
        let synced = sys::openat(
            &self.dir,
            Path::new("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .map(File::from)
        .and_then(|d| d.sync_all());
        if let Err(e) = synced {
            tracing::warn!("{}: not synced: {e}", self.path.display());
        }
        Ok(())
    }

    /// Removes the empty directory `name`.
    pub fn remove_dir(&self, name: &Path) -> io::Result<()> {
        sys::unlinkat(&self.dir, name, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pv-owned-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn a_new_directory_is_private_and_files_are_replaced_not_written_through() {
        let base = scratch("new");
        let dir = OwnedDir::open(&base.join("a/state"), "state directory", true).unwrap();
        for d in [base.join("a"), base.join("a/state")] {
            assert_eq!(
                std::fs::metadata(&d).unwrap().mode() & 0o777,
                0o700,
                "{d:?}"
            );
        }
        // A link planted at a name the paravisor writes: the link is replaced, the file it
        // points at is untouched.
        let victim = base.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, base.join("a/state/log.json")).unwrap();
        let was = dir.replace(Path::new("log.json"), b"{}", 0o644).unwrap();
        assert_eq!(was.as_deref(), Some("symbolic link"));
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let meta = std::fs::symlink_metadata(base.join("a/state/log.json")).unwrap();
        assert!(meta.is_file());
        assert_eq!(meta.mode() & 0o777, 0o644);
        // Read back through the checks; a link is refused by name.
        assert_eq!(dir.read(Path::new("log.json"), 10).unwrap().unwrap(), b"{}");
        std::os::unix::fs::symlink(&victim, base.join("a/state/link")).unwrap();
        let e = dir.open_file(Path::new("link"), Open::Read).unwrap_err();
        assert!(e.to_string().contains("is a symbolic link"), "{e}");
        // Too long for its limit.
        assert!(matches!(
            dir.read(Path::new("log.json"), 1),
            Err(DirError::TooLarge { .. })
        ));
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let base = scratch("fifo");
        let dir = OwnedDir::open(&base, "state directory", false).unwrap();
        let status = std::process::Command::new("mkfifo")
            .arg(base.join("f"))
            .status()
            .unwrap();
        assert!(status.success());
        let e = dir.open_file(Path::new("f"), Open::Read).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        let e = dir.open_file(Path::new("f"), Open::ReadWrite).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
        // Replacing it does not open it.
        dir.replace(Path::new("f"), b"x", 0o600).unwrap();
        assert_eq!(std::fs::read(base.join("f")).unwrap(), b"x");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn writable_directories_and_their_children_are_refused() {
        let base = scratch("modes");
        let state = base.join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o770)).unwrap();
        let e = OwnedDir::open(&state, "state directory", true).unwrap_err();
        assert!(matches!(e, DirError::Writable { mode: 0o770, .. }), "{e}");
        assert!(e.to_string().contains("chmod go-w"), "{e}");
        // Readable by others is allowed (its secrets are private files of their own).
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        OwnedDir::open(&state, "state directory", true).unwrap();
        // A parent anyone can write to, without the sticky bit.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = OwnedDir::open(&state, "state directory", true).unwrap_err();
        assert!(matches!(e, DirError::UnsafeParent { .. }), "{e}");
        assert!(e.to_string().contains("not sticky"), "{e}");
        // Sticky (as /tmp): fine for a directory below it, but it is shared.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o1777)).unwrap();
        OwnedDir::open(&state, "state directory", true).unwrap();
        assert_eq!(shared_mode(&base, "directory").unwrap(), Some(0o1777));
        assert_eq!(shared_mode(&state, "directory").unwrap(), None);
        assert_eq!(shared_mode(&base.join("none"), "directory").unwrap(), None);
        // A subdirectory or secret that others may write or read.
        std::fs::create_dir(state.join("sub")).unwrap();
        std::fs::set_permissions(state.join("sub"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        let dir = OwnedDir::open(&state, "state directory", false).unwrap();
        let e = dir.subdir(Path::new("sub"), false).unwrap_err();
        assert!(matches!(e, DirError::Writable { .. }), "{e}");
        std::fs::write(state.join("key"), [0u8; 32]).unwrap();
        std::fs::set_permissions(state.join("key"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let e = dir.open_secret(Path::new("key")).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        assert!(dir.open_secret(Path::new("none")).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_new_file_never_replaces_one() {
        let base = scratch("create");
        let dir = OwnedDir::open(&base, "state directory", false).unwrap();
        let write = |bytes: &'static [u8]| {
            move |mut f: File| f.write_all(bytes).map(|()| f).map_err(|e| e.to_string())
        };
        dir.create_new(Path::new("sub/k"), 0o600, write(b"one"))
            .unwrap();
        assert!(dir
            .create_new(Path::new("sub/k"), 0o600, write(b"two"))
            .is_err());
        assert_eq!(std::fs::read(base.join("sub/k")).unwrap(), b"one");
        assert_eq!(
            std::fs::metadata(base.join("sub")).unwrap().mode() & 0o777,
            0o700
        );
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(base.join("sub")).unwrap().count(), 1);
        assert!(dir.exists(Path::new("sub/k")).unwrap());
        assert!(!dir.exists(Path::new("nothing/k")).unwrap());
        let _ = std::fs::remove_dir_all(&base);
    }
}
