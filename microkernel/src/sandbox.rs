//! Starting a service process inside its sandbox: the microkernel's main `unsafe` module (see
//! the crate docs for the other two).
//!
//! Everything that allocates is prepared in the parent ([`SpawnPlan`]); the child, between
//! `clone` and `execveat`, makes only raw syscalls on that prepared data (it may be forked
//! from a process whose allocator lock another thread holds). In order, the child:
//! 1. moves the granted descriptors to their slots and closes every other descriptor: stdin
//!    is `/dev/null`, stdout and stderr the write ends of the supervisor's pipes for this
//!    start ([`SpawnPlan::set_output`]), never the microkernel's own terminal or log file;
//! 2. asks to be killed when the microkernel dies (no orphans; set first of all);
//! 3. in its fresh mount namespace, pivots into an empty tmpfs that holds only copies of the
//!    measured loader and libraries the service needs (written from their sealed memfds, then
//!    the whole root is made read-only: no host files, no /proc, no /dev), and sets its own
//!    hostname in its UTS namespace;
//! 4. applies the manifest's resource limits;
//! 5. takes on the service's identity ([`crate::privilege`]): locked securebits, an empty
//!    bounding and ambient set, no supplementary groups, its own gid and uid, no capability
//!    left in any set (checked), and the parent-death signal armed again (a change of
//!    identity clears it);
//! 6. sets no_new_privs and installs the loader seccomp filter;
//! 7. execs the service binary through its descriptor, with an empty environment.
//!
//! A failure in the child is written to a close-on-exec pipe as (step, errno), so the parent
//! can say exactly what went wrong instead of seeing an anonymous exit.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::os::fd::RawFd;
use std::path::Path;
use std::path::PathBuf;

use bitflags::bitflags;

bitflags! {
    /// The namespaces a service gets.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Namespaces: u32 {
        const MOUNT = libc::CLONE_NEWNS as u32;
        const PID = libc::CLONE_NEWPID as u32;
        const NET = libc::CLONE_NEWNET as u32;
        const IPC = libc::CLONE_NEWIPC as u32;
        const UTS = libc::CLONE_NEWUTS as u32;
        /// Only when the microkernel is not privileged: a user namespace lets an ordinary
        /// user create the others.
        const USER = libc::CLONE_NEWUSER as u32;
    }
}

impl Namespaces {
    /// Names as in `/proc/PID/ns`.
    pub fn names(self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (flag, name) in [
            (Namespaces::MOUNT, "mnt"),
            (Namespaces::PID, "pid"),
            (Namespaces::NET, "net"),
            (Namespaces::IPC, "ipc"),
            (Namespaces::UTS, "uts"),
            (Namespaces::USER, "user"),
        ] {
            if self.contains(flag) {
                v.push(name);
            }
        }
        v
    }
}

/// What to create inside the new root (paths relative to it).
#[derive(Debug)]
enum RootEntry {
    /// A directory.
    Dir(CString),
    /// A measured library: a copy of `length` bytes of the sealed memfd `source`, or, with
    /// a [`LibraryStore`], a bind of the store's copy (`source` may then be gone).
    Copy {
        source: Option<OwnedFd>,
        target: CString,
        length: u64,
    },
}

/// At most this many libraries per service (the child keeps their descriptors in a fixed
/// array: it may not allocate).
const MAX_CODE_FILES: usize = 32;

/// Everything the child needs, allocated before `clone`.
pub struct SpawnPlan {
    /// Descriptor of the service binary (opened by the parent).
    pub binary: OwnedFd,
    /// `argv` of the service.
    argv: Vec<CString>,
    /// `(source descriptor, slot)` pairs; slots are consecutive from 3.
    pub slots: Vec<(RawFd, RawFd)>,
    /// The loader seccomp program.
    pub loader_filter: Vec<seccompiler::sock_filter>,
    /// `(resource, limit)` pairs for setrlimit.
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    /// Empty directory the child mounts its tmpfs root on.
    new_root: CString,
    /// The tmpfs root's mount options (its size fits the library copies).
    root_options: CString,
    root_entries: Vec<RootEntry>,
    /// For each copy in `root_entries`, in order: the file of the [`LibraryStore`] to
    /// bind-mount instead ([`SpawnPlan::bind_from`]); empty: the child copies.
    bind_sources: Vec<CString>,
    hostname: Vec<u8>,
    /// `/dev/null`, for stdin (and stdout and stderr without [`SpawnPlan::set_output`]).
    dev_null: OwnedFd,
    /// The write ends of the pipes the child's stdout and stderr go to.
    output: Option<(OwnedFd, OwnedFd)>,
    /// Who the service runs as ([`SpawnPlan::run_as`]); required.
    identity: Option<Identity>,
}

/// The identity the child takes on before exec (from [`crate::privilege::plan`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// As the host sees them. In a user namespace the only ids mapped are these: to
    /// themselves when the microkernel is root; from root inside when it is not (the only
    /// mapping an unprivileged process may write, and the one that lets it read a
    /// non-dumpable service's `/proc/PID/fd` for the live audit: those files belong to the
    /// namespace's root).
    pub uid: u32,
    pub gid: u32,
    /// Empty the supplementary groups (root only: an unprivileged user namespace forbids it).
    pub drop_groups: bool,
    /// The microkernel is root (it may map any id into a user namespace it falls back to).
    pub root: bool,
    pub securebits: u32,
}

impl Identity {
    /// The identity of a service in `plan`, run by `runner`.
    pub fn of(plan: &crate::privilege::ServicePrivilege) -> Identity {
        Identity {
            uid: plan.uid,
            gid: plan.gid,
            drop_groups: plan.drop_groups,
            root: !plan.user_namespace,
            securebits: plan.securebits,
        }
    }
}

/// `struct __user_cap_header_struct` for capset/capget.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`; version 3 takes two (capabilities 0-31 and 32-63).
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// _LINUX_CAPABILITY_VERSION_3.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;
/// Highest capability number the bounding-set loop tries (the kernel answers EINVAL past
/// its own last one).
const LAST_CAPABILITY: libc::c_ulong = 63;

/// A started child.
pub struct Spawned {
    pub pid: libc::pid_t,
    pub pidfd: OwnedFd,
    pub namespaces: Namespaces,
}

/// Why a service could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot prepare the sandbox: {0}")]
    Prepare(io::Error),
    #[error("clone failed: {0}")]
    Clone(io::Error),
    #[error("sandbox set-up failed at step \"{step}\": {error}")]
    Child {
        step: &'static str,
        error: io::Error,
    },
}

/// Steps of the child, reported on failure.
const STEPS: &[&str] = &[
    "move descriptors",
    "parent-death signal",
    "make mounts private",
    "mount tmpfs root",
    "populate root",
    "pivot_root",
    "detach old root",
    "read-only root",
    "set hostname",
    "setrlimit",
    "no_new_privs",
    "seccomp",
    "execveat",
    "signal mask",
    "new session",
    "securebits",
    "empty the bounding set",
    "empty the ambient set",
    "setgroups",
    "setresgid",
    "setresuid",
    "capset",
    "verify no capabilities",
];

/// First descriptor the child uses for its temporary copies; above any slot.
const SCRATCH_FD: RawFd = 256;
/// Most descriptors a spawn places at slots 3, 4, ...: the bootstrap record, every
/// capability and every kept descriptor ([`SpawnPlan::new`] refuses more).
const MAX_SLOTS: usize = 1 + ipc_defs::bootstrap::MAX_CAPABILITIES + ipc_defs::fd_store::MAX_KEPT;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

impl SpawnPlan {
    /// Prepares a spawn of `binary` (executed from `image`, its measured copy, if given) with
    /// descriptors `caps` placed at slots 3, 4, ..., and `code` (sealed image, length, path in
    /// the sandbox: its loader and libraries) copied into its root.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        (binary, image): (&Path, Option<&OwnedFd>),
        args: &[String],
        caps: &[RawFd],
        code: &[(Option<&OwnedFd>, u64, &str)],
        loader_filter: Vec<seccompiler::sock_filter>,
        rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
        new_root: &Path,
        hostname: &str,
    ) -> Result<SpawnPlan, SpawnError> {
        let prep = SpawnError::Prepare;
        if caps.len() > MAX_SLOTS {
            return Err(prep(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} descriptors to place (at most {MAX_SLOTS})", caps.len()),
            )));
        }
        // The measured image when there is one (a sealed memfd), else the file itself.
        let binary_fd = match image {
            Some(fd) => fd.try_clone().map_err(prep)?,
            None => std::fs::File::open(binary).map_err(prep)?.into(),
        };
        let dev_null = std::fs::File::open("/dev/null").map_err(prep)?.into();
        let name = binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut argv = vec![cstr(&name).map_err(prep)?];
        for a in args {
            argv.push(cstr(a).map_err(prep)?);
        }
        let slots = caps
            .iter()
            .enumerate()
            .map(|(i, fd)| (*fd, 3 + i as RawFd))
            .collect();
        std::fs::create_dir_all(new_root).map_err(prep)?;
        let (root_entries, root_bytes) = root_view(code).map_err(prep)?;
        Ok(SpawnPlan {
            binary: binary_fd,
            argv,
            slots,
            loader_filter,
            rlimits,
            new_root: cstr(&new_root.to_string_lossy()).map_err(prep)?,
            root_options: cstr(&format!("size={}k,mode=0755", root_bytes / 1024)).map_err(prep)?,
            root_entries,
            bind_sources: Vec::new(),
            hostname: hostname.as_bytes().to_vec(),
            dev_null,
            output: None,
            identity: None,
        })
    }

    /// Sends the child's stdout and stderr to these pipes (the write ends of
    /// [`output_pipe`]s; the plan holds them until it is dropped after the spawn).
    pub fn set_output(&mut self, stdout: OwnedFd, stderr: OwnedFd) {
        self.output = Some((stdout, stderr));
    }

    /// The child binds its libraries from `store` instead of copying them (all or none: only
    /// if the store holds every one).
    pub fn bind_from(&mut self, store: &LibraryStore) {
        let sources: Option<Vec<CString>> = self
            .root_entries
            .iter()
            .filter_map(|e| match e {
                RootEntry::Copy { target, .. } => Some(target),
                RootEntry::Dir(_) => None,
            })
            .map(|target| store.source_of(target))
            .collect();
        self.bind_sources = sources.unwrap_or_default();
    }

    /// The service runs as `identity` (see [`Identity`]).
    pub fn run_as(mut self, identity: Identity) -> SpawnPlan {
        self.identity = Some(identity);
        self
    }

    /// Slot the binary descriptor occupies in the child (just after the capabilities).
    pub fn binary_slot(caps: usize) -> RawFd {
        3 + caps as RawFd
    }

    /// Clones the child into `namespaces` (inside a new user namespace if the kernel refuses
    /// them outright, as it does an ordinary user) and runs it to `execveat`. Never with
    /// fewer: without its mount namespace a service would map the host's libraries instead of
    /// the measured copies, and see the host's files.
    pub fn spawn(&self, wanted: Namespaces) -> Result<Spawned, SpawnError> {
        if self.identity.is_none() {
            return Err(SpawnError::Prepare(io::Error::new(
                io::ErrorKind::InvalidInput,
                "no identity for the service (SpawnPlan::run_as)",
            )));
        }
        let mut attempts = vec![wanted];
        if wanted != Namespaces::empty() {
            // Unprivileged: the same namespaces inside a new user namespace.
            attempts.push(wanted | Namespaces::USER);
        }
        let mut last = None;
        for ns in attempts {
            match self.spawn_once(ns) {
                Err(SpawnError::Clone(e))
                    if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EINVAL)) =>
                {
                    tracing::debug!(namespaces = ?ns.names(), "kernel refused these namespaces: {e}");
                    last = Some(SpawnError::Clone(e));
                }
                // Inside an unprivileged user namespace some set-up steps may still be refused.
                Err(e) if ns.contains(Namespaces::USER) => {
                    tracing::warn!(namespaces = ?ns.names(), "sandbox in a user namespace failed: {e}");
                    last = Some(e);
                }
                Ok(spawned) => {
                    if !spawned.namespaces.contains(wanted) {
                        tracing::warn!(
                            wanted = ?wanted.names(),
                            got = ?spawned.namespaces.names(),
                            "service runs without the namespaces it should have (the kernel refused them); `audit --live` will report it"
                        );
                    }
                    return Ok(spawned);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| SpawnError::Clone(io::ErrorKind::Unsupported.into())))
    }

    fn spawn_once(&self, ns: Namespaces) -> Result<Spawned, SpawnError> {
        let mut pipe = [0 as RawFd; 2];
        // SAFETY: `pipe` is a valid out-array of two descriptors.
        if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(SpawnError::Prepare(io::Error::last_os_error()));
        }
        // SAFETY: pipe2 returned two fresh descriptors that we now own.
        let (err_read, err_write) =
            unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
        // With a user namespace the parent must write the id maps before the child may
        // create anything; the child waits for one byte on this pipe.
        let mut sync = [0 as RawFd; 2];
        // SAFETY: `sync` is a valid out-array of two descriptors.
        if unsafe { libc::pipe2(sync.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(SpawnError::Prepare(io::Error::last_os_error()));
        }
        // SAFETY: pipe2 returned two fresh descriptors that we now own.
        let (sync_read, sync_write) =
            unsafe { (OwnedFd::from_raw_fd(sync[0]), OwnedFd::from_raw_fd(sync[1])) };
        let mut pidfd: RawFd = -1;
        let flags = libc::CLONE_PIDFD as libc::c_ulong
            | ns.bits() as libc::c_ulong
            | libc::SIGCHLD as libc::c_ulong;
        // SAFETY: clone without a new stack behaves like fork: the child gets a copy of our
        // address space and continues here. `pidfd` is a valid out-pointer (CLONE_PIDFD
        // stores the pidfd through the parent_tid argument).
        let pid = unsafe {
            libc::syscall(
                libc::SYS_clone,
                flags,
                0usize,
                &mut pidfd as *mut RawFd,
                0usize,
                0usize,
            )
        };
        if pid < 0 {
            return Err(SpawnError::Clone(io::Error::last_os_error()));
        }
        if pid == 0 {
            // In the child: never returns.
            self.child(
                ns,
                err_write.as_raw_fd(),
                sync_read.as_raw_fd(),
                sync_write.as_raw_fd(),
            );
        }
        drop(err_write);
        drop(sync_read);
        // SAFETY: CLONE_PIDFD gave us a fresh pidfd for the child.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        if ns.contains(Namespaces::USER) {
            if let Err(e) = write_id_maps(pid as libc::pid_t, self.identity) {
                let _ = pidfd_signal(&pidfd, libc::SIGKILL);
                let mut status = 0;
                // SAFETY: reaps our own child, which we just killed.
                unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
                return Err(SpawnError::Prepare(e));
            }
        }
        // SAFETY: writes one byte from a live buffer to the pipe we own.
        unsafe { libc::write(sync_write.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        drop(sync_write);
        let mut report = [0u8; 8];
        let mut got = 0usize;
        while got < report.len() {
            // SAFETY: reading into the unfilled tail of a valid buffer from the pipe we own.
            // EOF (0) means the child reached execveat (the pipe is close-on-exec) or died;
            // a death before exec shows up as the service's exit, which the supervisor reaps.
            let n = unsafe {
                libc::read(
                    err_read.as_raw_fd(),
                    report[got..].as_mut_ptr().cast(),
                    report.len() - got,
                )
            };
            if n > 0 {
                got += n as usize;
            } else if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            } else {
                break;
            }
        }
        if got == report.len() {
            let step = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]) as usize;
            let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
            let mut status = 0;
            // SAFETY: reaps our own child, which has exited (it wrote its report and exits).
            unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
            return Err(SpawnError::Child {
                step: STEPS.get(step).copied().unwrap_or("unknown"),
                error: io::Error::from_raw_os_error(errno),
            });
        }
        Ok(Spawned {
            pid: pid as libc::pid_t,
            pidfd,
            namespaces: ns,
        })
    }

    /// The child side. Only raw syscalls on prepared data from here on.
    fn child(&self, ns: Namespaces, err_fd: RawFd, sync_fd: RawFd, sync_write: RawFd) -> ! {
        // SAFETY: (whole function) every call below is a raw syscall on data prepared before
        // clone (CStrings, vectors, descriptors); nothing allocates, locks or unwinds. On any
        // failure the child reports (step, errno) on the close-on-exec pipe and _exits.
        unsafe {
            let fail = |step: usize, err_fd: RawFd| -> ! {
                let errno = *libc::__errno_location();
                let mut msg = [0u8; 8];
                msg[..4].copy_from_slice(&(step as u32).to_ne_bytes());
                msg[4..].copy_from_slice(&errno.to_ne_bytes());
                libc::write(err_fd, msg.as_ptr().cast(), 8);
                libc::_exit(127);
            };

            // Die with the microkernel, from here on (before waiting on it).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                fail(1, err_fd);
            }
            // Wait until the parent has written our id maps (or decided not to). Our copy of
            // the write end is closed first, so that a parent that died reads as EOF.
            libc::close(sync_write);
            let mut byte = [0u8; 1];
            loop {
                let n = libc::read(sync_fd, byte.as_mut_ptr().cast(), 1);
                if n == 1 {
                    break;
                }
                if n < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                libc::_exit(127);
            }

            // A session of its own: a terminal's Ctrl-C (sent to the foreground process group)
            // reaches the microkernel, which stops the services in order, not the services.
            if libc::setsid() < 0 {
                fail(14, err_fd);
            }

            // Signals: the parent blocks SIGINT/SIGTERM for its signalfd; start clean.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
                fail(13, err_fd);
            }

            // 1. Descriptors: copy everything we keep above the slot range, then place it.
            let n = self.slots.len();
            let binary_slot = Self::binary_slot(n);
            let err_slot = binary_slot + 1;
            let mut scratch = [0 as RawFd; MAX_SLOTS];
            for (i, (src, _)) in self.slots.iter().enumerate() {
                let fd = libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, SCRATCH_FD);
                if fd < 0 {
                    fail(0, err_fd);
                }
                scratch[i] = fd;
            }
            // The library images, out of the way of the slots too (closed after the copies).
            let mut code_fds = [-1 as RawFd; MAX_CODE_FILES];
            let mut copies = 0;
            for entry in &self.root_entries {
                if let RootEntry::Copy { source, .. } = entry {
                    if copies >= MAX_CODE_FILES {
                        fail(0, err_fd);
                    }
                    // No image: bound from the store (a missing bind fails "populate root").
                    if let Some(source) = source {
                        let fd = libc::fcntl(source.as_raw_fd(), libc::F_DUPFD_CLOEXEC, SCRATCH_FD);
                        if fd < 0 {
                            fail(0, err_fd);
                        }
                        code_fds[copies] = fd;
                    }
                    copies += 1;
                }
            }
            let bin_tmp = libc::fcntl(self.binary.as_raw_fd(), libc::F_DUPFD_CLOEXEC, SCRATCH_FD);
            let err_tmp = libc::fcntl(err_fd, libc::F_DUPFD_CLOEXEC, SCRATCH_FD);
            if bin_tmp < 0 || err_tmp < 0 {
                fail(0, err_fd);
            }
            let err_fd = err_tmp;
            // stdin, stdout, stderr: copied first too, so that a pipe end the parent got at
            // 0, 1 or 2 neither clobbers another nor keeps its close-on-exec flag.
            let (stdout_src, stderr_src) = match &self.output {
                Some((out, err)) => (out.as_raw_fd(), err.as_raw_fd()),
                None => (self.dev_null.as_raw_fd(), self.dev_null.as_raw_fd()),
            };
            let stdio = [self.dev_null.as_raw_fd(), stdout_src, stderr_src];
            let mut stdio_tmp = [0 as RawFd; 3];
            for (tmp, src) in stdio_tmp.iter_mut().zip(stdio) {
                *tmp = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, SCRATCH_FD);
                if *tmp < 0 {
                    fail(0, err_fd);
                }
            }
            for (target, tmp) in stdio_tmp.iter().enumerate() {
                if libc::dup2(*tmp, target as RawFd) < 0 {
                    fail(0, err_fd);
                }
            }
            for (i, (_, slot)) in self.slots.iter().enumerate() {
                // dup2 clears close-on-exec: the slot survives exec.
                if libc::dup2(scratch[i], *slot) < 0 {
                    fail(0, err_fd);
                }
            }
            if libc::dup3(bin_tmp, binary_slot, libc::O_CLOEXEC) < 0
                || libc::dup3(err_tmp, err_slot, libc::O_CLOEXEC) < 0
            {
                fail(0, err_fd);
            }
            let err_fd = err_slot;

            // 3. File system view. The copies must be readable by the service's own uid
            // whatever the operator's umask.
            libc::umask(0o022);
            if ns.contains(Namespaces::MOUNT) {
                let none = c"none".as_ptr();
                if libc::mount(
                    none,
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    fail(2, err_fd);
                }
                if libc::mount(
                    c"tmpfs".as_ptr(),
                    self.new_root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    self.root_options.as_ptr().cast(),
                ) != 0
                {
                    fail(3, err_fd);
                }
                if libc::chdir(self.new_root.as_ptr()) != 0 {
                    fail(3, err_fd);
                }
                let mut copy = 0;
                for entry in &self.root_entries {
                    let ok = match entry {
                        RootEntry::Dir(path) => libc::mkdir(path.as_ptr(), 0o755) == 0,
                        RootEntry::Copy { target, length, .. } => {
                            copy += 1;
                            match self.bind_sources.get(copy - 1) {
                                Some(source) => bind_file(source, target),
                                None => copy_file(code_fds[copy - 1], target, *length),
                            }
                        }
                    };
                    if !ok {
                        fail(4, err_fd);
                    }
                }
                if libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0 {
                    fail(5, err_fd);
                }
                if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0 {
                    fail(6, err_fd);
                }
                if libc::chdir(c"/".as_ptr()) != 0 {
                    fail(6, err_fd);
                }
                if libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                    std::ptr::null(),
                ) != 0
                {
                    fail(7, err_fd);
                }
            }
            // Everything but the slots, the binary and the error pipe is closed from here on
            // (the library images were needed until their copies were made).
            if libc::syscall(libc::SYS_close_range, err_slot as u32 + 1, u32::MAX, 0u32) != 0 {
                fail(0, err_fd);
            }
            if ns.contains(Namespaces::UTS)
                && libc::sethostname(self.hostname.as_ptr().cast(), self.hostname.len()) != 0
            {
                fail(8, err_fd);
            }

            // 4. Resource limits.
            for (resource, value) in &self.rlimits {
                let lim = libc::rlimit {
                    rlim_cur: *value,
                    rlim_max: *value,
                };
                if libc::setrlimit(*resource, &lim) != 0 {
                    fail(9, err_fd);
                }
            }

            // 5. The service's identity, with no capability in any set. After the mounts and
            // the hostname (they need privilege), before the loader filter (it allows none of
            // this). Raw syscalls: glibc's set*id wrappers would try to reach the parent's
            // other threads, which glibc still believes are ours.
            let Some(id) = self.identity else {
                fail(22, err_fd);
            };
            // Without privilege and without a user namespace there is nothing to drop or lock
            // (and no CAP_SETPCAP to do it with); the checks below still apply.
            let privileged = id.root || ns.contains(Namespaces::USER);
            if privileged {
                if libc::prctl(
                    libc::PR_SET_SECUREBITS,
                    id.securebits as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    fail(15, err_fd);
                }
                for cap in 0..=LAST_CAPABILITY {
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                        && *libc::__errno_location() != libc::EINVAL
                    {
                        fail(16, err_fd);
                    }
                }
            }
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                fail(17, err_fd);
            }
            if id.drop_groups
                && libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0
            {
                fail(18, err_fd);
            }
            // The ids as this process names them: in an unprivileged user namespace the
            // service's ids are its root (see `Identity`), whose privilege is gone below.
            let (uid, gid) = if !id.root && ns.contains(Namespaces::USER) {
                (0, 0)
            } else {
                (id.uid, id.gid)
            };
            if libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0 {
                fail(19, err_fd);
            }
            if libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0 {
                fail(20, err_fd);
            }
            // Leaving uid 0 cleared the permitted, effective and ambient sets; the
            // inheritable set (and the others, in a user namespace) go here.
            let header = CapHeader {
                version: CAPABILITY_VERSION_3,
                pid: 0,
            };
            let none = [CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            if libc::syscall(libc::SYS_capset, &header, none.as_ptr()) != 0 {
                fail(21, err_fd);
            }
            let mut held = [CapData {
                effective: u32::MAX,
                permitted: u32::MAX,
                inheritable: u32::MAX,
            }; 2];
            let header = CapHeader {
                version: CAPABILITY_VERSION_3,
                pid: 0,
            };
            let kept = libc::syscall(libc::SYS_capget, &header, held.as_mut_ptr()) != 0
                || held
                    .iter()
                    .any(|d| d.effective | d.permitted | d.inheritable != 0)
                || (privileged
                    && (libc::prctl(libc::PR_CAPBSET_READ, 0, 0, 0, 0) != 0
                        || libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0)
                            != id.securebits as i32));
            if kept {
                *libc::__errno_location() = libc::EPERM;
                fail(22, err_fd);
            }
            // A change of identity clears the parent-death signal: arm it again, then make
            // sure the parent did not die in between (its end of the error pipe, held until
            // we exec, would be gone).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                fail(1, err_fd);
            }
            let mut parent = libc::pollfd {
                fd: err_fd,
                events: libc::POLLOUT,
                revents: 0,
            };
            if libc::poll(&mut parent, 1, 0) < 0 || parent.revents & libc::POLLERR != 0 {
                libc::_exit(127);
            }

            // 6. No privilege gain through exec, and the loader filter.
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                fail(10, err_fd);
            }
            let prog = libc::sock_fprog {
                len: self.loader_filter.len() as u16,
                filter: self.loader_filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0u32,
                &prog as *const libc::sock_fprog,
            ) != 0
            {
                fail(11, err_fd);
            }

            // 7. Exec through the descriptor; empty environment.
            let mut argv: [*const libc::c_char; 16] = [std::ptr::null(); 16];
            for (i, a) in self.argv.iter().take(15).enumerate() {
                argv[i] = a.as_ptr();
            }
            let envp: [*const libc::c_char; 1] = [std::ptr::null()];
            libc::syscall(
                libc::SYS_execveat,
                binary_slot,
                c"".as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
                libc::AT_EMPTY_PATH,
            );
            fail(12, err_fd);
        }
    }
}

/// The new root's entries for `code` (the directories, then each copy) and the tmpfs size
/// they need.
fn root_view(code: &[(Option<&OwnedFd>, u64, &str)]) -> io::Result<(Vec<RootEntry>, u64)> {
    if code.len() > MAX_CODE_FILES {
        return Err(io::Error::other(format!(
            "{} libraries: more than the sandbox takes ({MAX_CODE_FILES})",
            code.len()
        )));
    }
    let mut entries = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    let mut bytes = 64 * 1024;
    for (_, length, path) in code {
        let rel = path.trim_start_matches('/');
        if rel
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
        {
            return Err(io::Error::other(format!("unusable library path {path}")));
        }
        let parts: Vec<&str> = rel.split('/').collect();
        for n in 1..parts.len() {
            let dir = parts[..n].join("/");
            if !dirs.contains(&dir) {
                dirs.push(dir.clone());
                entries.push(RootEntry::Dir(cstr(&dir)?));
            }
        }
        // tmpfs allocates whole pages.
        bytes += length.div_ceil(4096) * 4096 + 4096;
    }
    for (image, length, path) in code {
        entries.push(RootEntry::Copy {
            source: image.map(|i| i.try_clone()).transpose()?,
            target: cstr(path.trim_start_matches('/'))?,
            length: *length,
        });
    }
    Ok((entries, bytes))
}

/// In the child: copies `length` bytes of `source` (from its start, whatever its offset) into
/// a new file `target`, read-only and executable. Raw syscalls only.
///
/// # Safety
/// SAFETY: called only in the forked child, with descriptors and a string prepared before
/// the fork.
unsafe fn copy_file(source: RawFd, target: &CString, length: u64) -> bool {
    // SAFETY: open/sendfile/close on descriptors the child owns and a valid C string.
    unsafe {
        let out = libc::open(
            target.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o555,
        );
        if out < 0 {
            return false;
        }
        let mut offset: libc::off_t = 0;
        while (offset as u64) < length {
            let left = (length - offset as u64).min(1 << 30) as usize;
            let n = libc::sendfile(out, source, &mut offset, left);
            if n <= 0 {
                if n < 0 && *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                libc::close(out);
                return false;
            }
        }
        libc::close(out) == 0
    }
}

/// In the child: an empty file `target` with `source` bind-mounted over it. Raw syscalls
/// only.
///
/// # Safety
/// SAFETY: called only in the forked child, with strings prepared before the fork.
unsafe fn bind_file(source: &CString, target: &CString) -> bool {
    // SAFETY: open/close/mount with valid C strings.
    unsafe {
        let out = libc::open(
            target.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
            0o555,
        );
        if out < 0 || libc::close(out) != 0 {
            return false;
        }
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) == 0
    }
}

/// One read-only tmpfs holding a single copy of every library the services map, which
/// each service's root binds its libraries from instead of holding copies of its own (one
/// libc for all services instead of one each).
///
/// It lives in a mount namespace of the spawner thread's own (`unshare(CLONE_FS |
/// CLONE_NEWNS)`), so the host never sees it and it goes with the process; each service is
/// cloned from that thread, so its namespace starts as a copy that holds the store. Filled
/// from the sealed images of the measured libraries, then made read-only (the superblock,
/// so every bind of it is read-only too). Needs root: an unprivileged microkernel cannot
/// make a mount namespace outside a user namespace, and its services copy as before.
pub struct LibraryStore {
    /// Where it is mounted (absolute).
    dir: PathBuf,
    /// The sandbox paths it holds (relative, as [`RootEntry::Copy`] targets are).
    files: Vec<CString>,
}

impl LibraryStore {
    /// Makes the store at `dir` with `libraries` (sealed image, length, sandbox path) in
    /// the calling thread's new mount namespace. Call on the spawner thread, before its
    /// filter (which has no unshare).
    pub fn create(dir: &Path, libraries: &[(OwnedFd, u64, String)]) -> io::Result<LibraryStore> {
        let os = |what: &str| {
            let e = io::Error::last_os_error();
            io::Error::new(e.kind(), format!("{what}: {e}"))
        };
        std::fs::create_dir_all(dir)?;
        let dir = std::fs::canonicalize(dir)?;
        // SAFETY: unshare on the calling thread only (CLONE_FS makes its root, cwd and umask
        // its own, which a new mount namespace needs in a process with other threads).
        if unsafe { libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS) } != 0 {
            return Err(os("unshare(CLONE_FS | CLONE_NEWNS)"));
        }
        // SAFETY: a valid mode; affects this thread's fs only (just unshared).
        unsafe { libc::umask(0o022) };
        // SAFETY: valid C strings and null data, as mount(2) takes them.
        if unsafe {
            libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(os("making the spawner's mounts private"));
        }
        let mut unique: Vec<&(OwnedFd, u64, String)> = Vec::new();
        for l in libraries {
            if !unique.iter().any(|u| u.2 == l.2) {
                unique.push(l);
            }
        }
        let bytes: u64 = 64 * 1024
            + unique
                .iter()
                .map(|(_, length, _)| length.div_ceil(4096) * 4096 + 4096)
                .sum::<u64>();
        let c_dir = cstr(&dir.to_string_lossy())?;
        let options = cstr(&format!("size={}k,mode=0755", bytes / 1024))?;
        // SAFETY: valid C strings, as mount(2) takes them.
        if unsafe {
            libc::mount(
                c"pv-library-store".as_ptr(),
                c_dir.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                options.as_ptr().cast(),
            )
        } != 0
        {
            return Err(os("mounting the library store"));
        }
        let mut files = Vec::new();
        for (image, length, path) in unique {
            let rel = path.trim_start_matches('/');
            if rel
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
            {
                return Err(io::Error::other(format!("unusable library path {path}")));
            }
            let target = dir.join(rel);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let c_target = cstr(&target.to_string_lossy())?;
            // SAFETY: a descriptor we hold and a valid C string; copy_file only uses raw
            // syscalls and reads the image from offset 0 without moving its offset.
            if !unsafe { copy_file(image.as_raw_fd(), &c_target, *length) } {
                return Err(os(&format!("copying {path} into the library store")));
            }
            files.push(cstr(rel)?);
        }
        // SAFETY: valid C strings, as mount(2) takes them.
        if unsafe {
            libc::mount(
                std::ptr::null(),
                c_dir.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
                std::ptr::null(),
            )
        } != 0
        {
            return Err(os("making the library store read-only"));
        }
        Ok(LibraryStore { dir, files })
    }

    /// The store's file for sandbox path `target` (relative), if it holds it.
    fn source_of(&self, target: &CString) -> Option<CString> {
        self.files
            .contains(target)
            .then(|| {
                cstr(
                    &self
                        .dir
                        .join(target.to_string_lossy().as_ref())
                        .to_string_lossy(),
                )
                .ok()
            })
            .flatten()
    }

    /// Files it holds.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// A pipe for one of a service's output streams: the read end for the supervisor
/// (close-on-exec and non-blocking: reading it never waits for the service), the write end for
/// the child ([`SpawnPlan::set_output`]; close-on-exec here, placed at 1 or 2 in the child).
pub fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid out-array of two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that we now own.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: F_GETFL and F_SETFL on a descriptor we own.
    let nonblocking = unsafe {
        let flags = libc::fcntl(read.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(read.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !nonblocking {
        return Err(io::Error::last_os_error());
    }
    Ok((read, write))
}

/// Maps the service's uid and gid, and nothing else, in the child's new user namespace: as
/// root, to themselves (no root exists inside); unprivileged, our own ids from root inside
/// (the only mapping such a process may write, and only with setgroups denied). Root inside
/// holds no capability and gains none at exec (securebits `noroot`, locked).
fn write_id_maps(pid: libc::pid_t, identity: Option<Identity>) -> io::Result<()> {
    let id = identity.ok_or(io::ErrorKind::InvalidInput)?;
    let (uid_inside, gid_inside) = if id.root { (id.uid, id.gid) } else { (0, 0) };
    if !id.root {
        std::fs::write(format!("/proc/{pid}/setgroups"), "deny")?;
    }
    std::fs::write(
        format!("/proc/{pid}/uid_map"),
        format!("{uid_inside} {} 1", id.uid),
    )?;
    std::fs::write(
        format!("/proc/{pid}/gid_map"),
        format!("{gid_inside} {} 1", id.gid),
    )?;
    Ok(())
}

/// A descriptor for process `pid`, a child of ours not reaped yet (so the number cannot
/// have been reused).
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0u32) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh descriptor that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Makes a program spawned by `command` die with this process's thread that spawns it
/// (SIGKILL as its parent-death signal; a child whose parent already died exits at once).
pub fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit).
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before the prctl: then another process is the
            // parent and no signal will come.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Sends `signal` to the process behind `pidfd`.
pub fn pidfd_signal(pidfd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a pidfd we own and no siginfo.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// Reaps the child behind `pidfd` if it has exited.
pub fn pidfd_reap(pidfd: &OwnedFd) -> io::Result<Option<Exit>> {
    // SAFETY: zeroed siginfo_t is a valid out-buffer.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child's pidfd with a valid out-pointer.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid filled `info` (or left si_pid 0 with WNOHANG if nothing exited).
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    Ok(Some(match info.si_code {
        libc::CLD_EXITED => Exit::Code(status),
        _ => Exit::Signal(status),
    }))
}

/// Blocks `signals` in this thread and returns a signalfd for them.
pub fn signalfd(signals: &[i32]) -> io::Result<OwnedFd> {
    // SAFETY: sigset manipulation on a local set; sigprocmask and signalfd with valid pointers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// No core dump of the microkernel, which holds the platform's chip secret, unsealed keys and
/// guest memory (a seccomp kill would otherwise dump it); as root also not dumpable, so that
/// no other process of its uid may trace it or read its memory. (Unprivileged it must stay
/// dumpable: it writes its children's user-namespace id maps, which that would forbid.)
pub fn no_core_dumps(root: bool) -> io::Result<()> {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit with a valid rlimit record.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) has no pointer arguments.
    if root && unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Lets SIGPIPE end the process, as for any command-line filter: a command that only prints
/// (`measure --json | head`) then stops quietly when its reader goes away, instead of
/// panicking in `println!`. Never for commands that talk over sockets: there a vanished
/// peer must be an error they report, not a silent death.
pub fn default_sigpipe() {
    // SAFETY: installs the default disposition for one signal; no handler code runs, and
    // no other thread exists yet when `main` calls this.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Reads one pending signal number from a signalfd, if any.
pub fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: zeroed signalfd_siginfo is a valid buffer of its size.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: reading at most `size` bytes into `info`.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n == size as isize).then_some(info.ssi_signo as i32)
}

/// Waits until any descriptor in `fds` is readable or `timeout_ms` passes (-1: forever).
/// Returns the readiness of each.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: `pfds` is a valid array of `len` pollfd records.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

/// Test support: how a forked child ends that installs `programs` on itself and then makes
/// syscall `nr` with `args`: `Exit::Signal(SIGSYS)` if a filter killed or trapped it, else
/// `Exit::Code` of the errno the call returned (0 if it succeeded).
#[cfg(test)]
pub(crate) fn syscall_under_filters(
    programs: &[seccompiler::BpfProgram],
    nr: libc::c_long,
    args: [u64; 6],
) -> Exit {
    let progs: Vec<libc::sock_fprog> = programs
        .iter()
        .map(|p| libc::sock_fprog {
            len: p.len() as u16,
            filter: p.as_ptr() as *mut libc::sock_filter,
        })
        .collect();
    // SAFETY: the child makes raw syscalls only, on data prepared before the fork (the
    // programs outlive it), and ends with _exit; the parent only waits for it.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                libc::_exit(200);
            }
            for p in &progs {
                if libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0u32,
                    p as *const libc::sock_fprog,
                ) != 0
                {
                    libc::_exit(201);
                }
            }
            let r = libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]);
            libc::_exit(if r < 0 { *libc::__errno_location() } else { 0 });
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        if libc::WIFSIGNALED(status) {
            Exit::Signal(libc::WTERMSIG(status))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs_and_copies(entries: &[RootEntry]) -> (Vec<String>, Vec<(String, u64)>) {
        let mut dirs = Vec::new();
        let mut copies = Vec::new();
        for e in entries {
            match e {
                RootEntry::Dir(d) => {
                    assert!(copies.is_empty(), "a directory after a copy: {entries:?}");
                    dirs.push(d.to_string_lossy().into_owned());
                }
                RootEntry::Copy { target, length, .. } => {
                    copies.push((target.to_string_lossy().into_owned(), *length))
                }
            }
        }
        (dirs, copies)
    }

    #[test]
    fn the_root_holds_each_library_at_its_path_under_directories_made_once_first() {
        let code = [
            (None, 5000, "/lib64/ld-linux-x86-64.so.2"),
            (None, 4096, "/lib/x86_64-linux-gnu/libc.so.6"),
            (None, 1, "/lib/x86_64-linux-gnu/libm.so.6"),
            (None, 0, "/top"),
        ];
        let (entries, bytes) = root_view(&code).unwrap();
        let (dirs, copies) = dirs_and_copies(&entries);
        assert_eq!(dirs, ["lib64", "lib", "lib/x86_64-linux-gnu"]);
        assert_eq!(
            copies,
            [
                ("lib64/ld-linux-x86-64.so.2".to_string(), 5000),
                ("lib/x86_64-linux-gnu/libc.so.6".to_string(), 4096),
                ("lib/x86_64-linux-gnu/libm.so.6".to_string(), 1),
                ("top".to_string(), 0),
            ]
        );
        // 64 KiB of slack, then each file in whole pages plus a page for its inode.
        let pages = (2 + 1) + (1 + 1) + (1 + 1) + 1;
        assert_eq!(bytes, 64 * 1024 + pages * 4096);
        let (entries, bytes) = root_view(&[]).unwrap();
        assert!(entries.is_empty());
        assert_eq!(bytes, 64 * 1024);
    }

    #[test]
    fn a_library_path_that_could_leave_the_root_or_names_nothing_is_refused() {
        for path in [
            "/lib/../etc/shadow",
            "/lib/./x",
            "/lib//x",
            "/lib/",
            "..",
            "/",
        ] {
            let e = root_view(&[(None, 1, path)]).unwrap_err();
            assert!(
                e.to_string().contains("unusable library path"),
                "{path}: {e}"
            );
        }
    }

    #[test]
    fn no_more_libraries_than_the_child_can_hold_without_allocating() {
        let paths: Vec<String> = (0..=MAX_CODE_FILES)
            .map(|n| format!("/lib/l{n}.so"))
            .collect();
        let code: Vec<(Option<&OwnedFd>, u64, &str)> =
            paths.iter().map(|p| (None, 1, p.as_str())).collect();
        assert!(root_view(&code[..MAX_CODE_FILES]).is_ok());
        let e = root_view(&code).unwrap_err();
        assert!(e.to_string().contains("more than the sandbox takes"), "{e}");
    }

    #[test]
    fn the_binary_sits_just_after_the_capability_slots() {
        // Capabilities occupy 3, 4, ... (after stdin, stdout, stderr).
        assert_eq!(SpawnPlan::binary_slot(0), 3);
        assert_eq!(SpawnPlan::binary_slot(5), 8);
    }

    #[test]
    fn namespaces_are_named_as_in_proc() {
        assert!(Namespaces::empty().names().is_empty());
        assert_eq!(
            Namespaces::all().names(),
            ["mnt", "pid", "net", "ipc", "uts", "user"]
        );
        assert_eq!(
            (Namespaces::NET | Namespaces::USER).names(),
            ["net", "user"]
        );
    }

    #[test]
    fn a_service_takes_the_identity_its_privilege_plan_gives() {
        let plan = crate::privilege::ServicePrivilege {
            service: "tpm".into(),
            uid: 61234,
            gid: 61235,
            source: crate::privilege::IdSource::Derived,
            groups: vec![],
            drop_groups: true,
            user_namespace: false,
            securebits: 0x2f,
            filters: 2,
        };
        let id = Identity::of(&plan);
        assert_eq!(
            id,
            Identity {
                uid: 61234,
                gid: 61235,
                drop_groups: true,
                root: true,
                securebits: 0x2f,
            }
        );
        let unprivileged = crate::privilege::ServicePrivilege {
            drop_groups: false,
            user_namespace: true,
            ..plan
        };
        let id = Identity::of(&unprivileged);
        assert!(!id.root && !id.drop_groups);
    }
}
