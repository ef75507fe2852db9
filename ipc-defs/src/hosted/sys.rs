//! Thin, checked wrappers over the Linux syscalls the IPC layer needs.

use std::io;
use std::os::fd::AsRawFd;
use std::os::fd::FromRawFd;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;
use std::sync::atomic::AtomicPtr;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn cvt(ret: libc::c_long) -> io::Result<libc::c_long> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Creates an anonymous shared-memory file of `len` bytes, sealable.
pub fn memfd(name: &str, len: u64) -> io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on a descriptor we own.
    cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } as libc::c_long)?;
    Ok(fd)
}

/// Seals a memfd against growing and shrinking (its size is part of the contract).
pub fn seal_size(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain fcntl on a descriptor we own.
    cvt(unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
        )
    } as libc::c_long)?;
    Ok(())
}

/// Seals a memfd completely read-only (for records the receiver must not change).
pub fn seal_read_only(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: plain fcntl on a descriptor we own.
    cvt(unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL,
        )
    } as libc::c_long)?;
    Ok(())
}

/// Size of the file behind `fd`.
pub fn file_size(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
    // SAFETY: `st` is a valid out-pointer for one `stat`.
    cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } as libc::c_long)?;
    // SAFETY: fstat succeeded, so it filled the struct.
    Ok(unsafe { st.assume_init() }.st_size as u64)
}

/// Maps `len` bytes of `fd` shared, readable and (if `writable`) writable.
pub fn map_shared(fd: &impl AsRawFd, len: usize, writable: bool) -> io::Result<NonNull<u8>> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a fresh mapping at an address of the kernel's choosing; it aliases no Rust
    // object. The caller owns the returned mapping and unmaps it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::from(io::ErrorKind::Other))
}

/// Unmaps a mapping made by [`map_shared`].
///
/// # Safety
/// `ptr`/`len` must be exactly a live mapping from [`map_shared`], and nothing may use it
/// afterwards.
pub unsafe fn unmap(ptr: NonNull<u8>, len: usize) {
    // SAFETY: per this function's contract.
    unsafe {
        libc::munmap(ptr.as_ptr().cast(), len);
    }
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    }
}

/// Sleeps while `*word == expected`, at most `timeout` (shared, not private: the word lives in
/// memory shared between processes).
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts = timeout.map(timespec);
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live, 4-aligned u32 for the call; `ts_ptr` is null or points to a
    // timespec on our stack. FUTEX_WAIT only reads both.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            0usize,
            0u32,
        );
    }
}

/// Wakes up to `n` sleepers on `word`.
pub fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: `word` is a live, 4-aligned u32; FUTEX_WAKE does not dereference further.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            0usize,
            0usize,
            0u32,
        );
    }
}

/// `struct futex_waitv` of Linux 5.16.
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

/// `FUTEX2_SIZE_U32`.
const FUTEX2_SIZE_U32: u32 = 0x02;
/// `__NR_futex_waitv` on x86_64.
const SYS_FUTEX_WAITV: libc::c_long = 449;
/// Most words `futex_waitv` accepts at once.
pub const FUTEX_WAITV_MAX: usize = 128;

/// Sleeps until any of `words` differs from its expected value (or a wake, or `timeout`).
pub fn futex_wait_any(words: &[(&AtomicU32, u32)], timeout: Option<Duration>) -> io::Result<()> {
    let waiters: Vec<FutexWaitv> = words
        .iter()
        .take(FUTEX_WAITV_MAX)
        .map(|(w, v)| FutexWaitv {
            val: *v as u64,
            uaddr: w.as_ptr() as u64,
            flags: FUTEX2_SIZE_U32,
            reserved: 0,
        })
        .collect();
    let deadline = match timeout {
        Some(t) => {
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `now` is a valid out-pointer.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
            let total = Duration::new(now.tv_sec as u64, now.tv_nsec as u32) + t;
            Some(timespec(total))
        }
        None => None,
    };
    let ts_ptr = deadline
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `waiters` is a live array of `waiters.len()` futex_waitv records whose uaddr
    // fields point at live shared words; `ts_ptr` is null or a timespec on our stack.
    let ret = unsafe {
        libc::syscall(
            SYS_FUTEX_WAITV,
            waiters.as_ptr(),
            waiters.len() as u32,
            0u32,
            ts_ptr,
            libc::CLOCK_MONOTONIC,
        )
    };
    if ret < 0 {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Value changed before we slept, timed out, or interrupted: all mean "look again".
            Some(libc::EAGAIN) | Some(libc::ETIMEDOUT) | Some(libc::EINTR) => Ok(()),
            _ => Err(err),
        }
    } else {
        Ok(())
    }
}

/// A classic BPF instruction, as `struct sock_filter`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// Installs a seccomp filter on the calling thread (and, with TSYNC, on all threads),
/// after setting no_new_privs.
pub fn install_seccomp(program: &[SockFilter]) -> io::Result<()> {
    if program.is_empty() || program.len() > u16::MAX as usize {
        return Err(io::ErrorKind::InvalidInput.into());
    }
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } as libc::c_long)?;
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `program`, a live array of `len` instructions with the
    // layout of `struct sock_filter`; the kernel copies it during the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &fprog as *const libc::sock_fprog,
        )
    })?;
    Ok(())
}

/// Makes the calling process non-dumpable: no core file, and no other process of its uid may
/// trace it or read its memory (its `/proc/PID` then belongs to root). A service runs under
/// a uid of its own, and exec made it dumpable again.
pub fn set_not_dumpable() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } as libc::c_long)?;
    Ok(())
}

/// Where the SIGSYS handler writes the refused syscall number (the service's status page).
static VIOLATION_NOTE: AtomicPtr<AtomicU32> = AtomicPtr::new(std::ptr::null_mut());

/// Offset of `si_syscall` in `siginfo_t` for SIGSYS on x86_64: three ints, padding to 16,
/// then `void *si_call_addr`, then `int si_syscall`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS; we read one int at the offset
    // the x86_64 ABI gives for si_syscall.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let note = VIOLATION_NOTE.load(Ordering::Acquire);
    if !note.is_null() {
        // SAFETY: the pointer was set from a live mapping of the status page that is never
        // unmapped while the process runs.
        unsafe { (*note).store(nr as u32, Ordering::Release) };
    }
    // SAFETY: exit_group is async-signal-safe and never returns.
    unsafe {
        libc::syscall(libc::SYS_exit_group, crate::layout::VIOLATION_EXIT_STATUS);
    }
}

/// Routes seccomp's SIGSYS to a handler that records the syscall in `note` and exits with
/// [`crate::layout::VIOLATION_EXIT_STATUS`], so that the supervisor can name the violation.
///
/// `note` must stay valid for the rest of the process's life.
pub fn report_violations_to(note: &'static AtomicU32) -> io::Result<()> {
    VIOLATION_NOTE.store(
        note as *const AtomicU32 as *mut AtomicU32,
        Ordering::Release,
    );
    // SAFETY: zeroed sigaction is a valid starting point; we fill handler and flags.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only does async-signal-safe work.
    cvt(unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } as libc::c_long)?;
    Ok(())
}

extern "C" fn exit_with_signal(sig: libc::c_int) {
    // SAFETY: exit_group is async-signal-safe and never returns.
    unsafe {
        libc::syscall(libc::SYS_exit_group, 128 + sig);
    }
}

/// Signals a service must die by even though it is the init process of its PID namespace.
///
/// The kernel drops signals without a handler that are sent to a namespace's init (only
/// SIGKILL and SIGSTOP are forced), so `paravisor kill --signal TERM` or the service's own
/// `abort()` would otherwise do nothing (abort then ends in a fault). The runtime handles
/// these by exiting at once with status 128 + signal, which the supervisor reports as a
/// death by that signal.
pub const EXIT_SIGNALS: &[i32] = &[
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGABRT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Installs the handlers described at [`EXIT_SIGNALS`].
pub fn exit_on_signals() -> io::Result<()> {
    for sig in EXIT_SIGNALS {
        // SAFETY: zeroed sigaction is a valid starting point; we fill the handler.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = exit_with_signal as *const () as usize;
        // SAFETY: installs a handler that only makes one async-signal-safe syscall.
        cvt(unsafe { libc::sigaction(*sig, &action, std::ptr::null_mut()) } as libc::c_long)?;
    }
    Ok(())
}

/// Reads up to `buf.len()` bytes at `offset` of `fd`.
pub fn pread(fd: &impl AsRawFd, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    // SAFETY: `buf` is a valid writable buffer of its length.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            offset as libc::off_t,
        )
    };
    Ok(cvt(n as libc::c_long)? as usize)
}

/// Takes ownership of descriptor `fd` if it is open.
pub fn take_fd(fd: i32) -> io::Result<OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor.
    cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) } as libc::c_long)?;
    // SAFETY: the descriptor is open, and the bootstrap protocol gives this process sole
    // ownership of its capability slots; each slot is taken once by the runtime.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Duplicates `fd` without close-on-exec, so that a child started with `Command` inherits it
/// (benchmarks pass their shared memory this way).
pub fn dup_inheritable(fd: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD on a descriptor we hold; the result is a fresh descriptor we own.
    let new = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD, 3) } as libc::c_long)?;
    // SAFETY: `new` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new as i32) })
}

// Directory-relative file operations: the microkernel does all I/O in its state and platform
// directories through a descriptor of the directory it checked (`microkernel::owned_dir`),
// never through a path that someone could redirect after the check.

fn c_name(name: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(name.as_os_str().as_bytes())
        .map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// openat(2): `name` relative to the directory `dir`, with `flags` (O_CLOEXEC is always
/// added) and, when it creates, `mode`.
pub fn openat(
    dir: &impl AsRawFd,
    name: &std::path::Path,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    let cname = c_name(name)?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call; the
    // mode is passed as the variadic argument openat expects with O_CREAT.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            cname.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    let fd = cvt(fd as libc::c_long)?;
    // SAFETY: openat returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// mkdirat(2): a new directory `name` in `dir` (the umask applies to `mode`).
pub fn mkdirat(dir: &impl AsRawFd, name: &std::path::Path, mode: u32) -> io::Result<()> {
    let cname = c_name(name)?;
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    cvt(
        unsafe { libc::mkdirat(dir.as_raw_fd(), cname.as_ptr(), mode as libc::mode_t) }
            as libc::c_long,
    )?;
    Ok(())
}

/// renameat(2) within one directory: `from` replaces `to` (whatever `to` is: a symbolic link
/// is replaced, never followed).
pub fn renameat(
    dir: &impl AsRawFd,
    from: &std::path::Path,
    to: &std::path::Path,
) -> io::Result<()> {
    let (cfrom, cto) = (c_name(from)?, c_name(to)?);
    // SAFETY: both names are valid NUL-terminated strings for the duration of the call.
    cvt(unsafe {
        libc::renameat(
            dir.as_raw_fd(),
            cfrom.as_ptr(),
            dir.as_raw_fd(),
            cto.as_ptr(),
        )
    } as libc::c_long)?;
    Ok(())
}

/// linkat(2) within one directory, not following `from` if it is a link: fails if `to`
/// exists (a way to put a file in place that never replaces one).
pub fn linkat(dir: &impl AsRawFd, from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    let (cfrom, cto) = (c_name(from)?, c_name(to)?);
    // SAFETY: both names are valid NUL-terminated strings for the duration of the call.
    cvt(unsafe {
        libc::linkat(
            dir.as_raw_fd(),
            cfrom.as_ptr(),
            dir.as_raw_fd(),
            cto.as_ptr(),
            0,
        )
    } as libc::c_long)?;
    Ok(())
}

/// unlinkat(2): removes `name` from `dir` (a directory, which must be empty, if `directory`).
pub fn unlinkat(dir: &impl AsRawFd, name: &std::path::Path, directory: bool) -> io::Result<()> {
    let cname = c_name(name)?;
    let flags = if directory { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), cname.as_ptr(), flags) } as libc::c_long)?;
    Ok(())
}

/// The target of the symbolic link `link` is a descriptor of (opened with O_PATH |
/// O_NOFOLLOW): readlinkat(2) with an empty name.
pub fn readlink_fd(link: &impl AsRawFd) -> io::Result<std::path::PathBuf> {
    use std::os::unix::ffi::OsStringExt;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: the name is a valid empty C string; `buf` is writable for its length.
    let n = unsafe {
        libc::readlinkat(
            link.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let n = cvt(n as libc::c_long)? as usize;
    if n >= buf.len() {
        return Err(io::ErrorKind::InvalidData.into());
    }
    buf.truncate(n);
    Ok(std::ffi::OsString::from_vec(buf).into())
}

/// The effective user id of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes within it for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        libc::CPU_SET(cpu, &mut set);
        cvt(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
                as libc::c_long,
        )?;
    }
    Ok(())
}

/// `CLOCK_MONOTONIC` in nanoseconds: the one clock every process of the machine reads alike
/// (services share the host's time namespace), so that a deadline one process sets another
/// can check.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec as u64)
}

/// How many CPUs the system has online (1 if that cannot be read).
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(1) as usize
}

/// A blocking eventfd (counter semantics).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd with constant flags returns a fresh descriptor or -1.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) } as libc::c_long)?;
    // SAFETY: fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Adds 1 to an eventfd.
pub fn eventfd_signal(fd: &impl AsRawFd) -> io::Result<()> {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    cvt(n as libc::c_long).map(|_| ())
}

/// Blocks until an eventfd is non-zero and resets it.
pub fn eventfd_wait(fd: &impl AsRawFd) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64.
    let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    cvt(n as libc::c_long).map(|_| v)
}

/// User plus system CPU time of process `pid`, in clock ticks, from `/proc/PID/stat`.
pub fn cpu_ticks(pid: u32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or(io::ErrorKind::InvalidData)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is index 0, utime is 11, stime is 12.
    let utime: u64 = fields
        .get(11)
        .and_then(|v| v.parse().ok())
        .ok_or(io::ErrorKind::InvalidData)?;
    let stime: u64 = fields
        .get(12)
        .and_then(|v| v.parse().ok())
        .ok_or(io::ErrorKind::InvalidData)?;
    Ok(utime + stime)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf with a constant name has no memory effects.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if n > 0 {
        n as u64
    } else {
        100
    }
}

/// Waits up to `timeout` until any of `fds` is readable (or hung up); returns which are.
pub fn poll_readable(
    fds: &[std::os::fd::BorrowedFd<'_>],
    timeout: Duration,
) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures for the call; the
    // descriptors are borrowed, so they stay open during it.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds
        .iter()
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
}

/// Whether the peer of the socket `fd` has shut down its side or is gone (POLLRDHUP,
/// POLLHUP, POLLERR now): a reader holding part of a request will get no more of it.
pub fn peer_closed(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call; the descriptor is borrowed, so it stays open.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// Makes reads and writes on `fd` return `WouldBlock` instead of waiting (O_NONBLOCK; the
/// open file's flag, so every descriptor of it sees it).
pub fn set_nonblocking(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL and F_SETFL take and return integers only; the descriptor is borrowed,
    // so it stays open for both calls.
    let flags = cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) } as libc::c_long)?;
    // SAFETY: as above.
    cvt(unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_SETFL,
            flags as libc::c_int | libc::O_NONBLOCK,
        )
    } as libc::c_long)?;
    Ok(())
}

/// Whether a write to `fd` would go through without waiting: for a Unix stream socket, whether
/// at most a quarter of its send buffer is taken by bytes the peer has not read (the kernel's
/// POLLOUT), so a message of a few KiB fits. A socket whose peer is gone counts as writable:
/// the write fails at once.
pub fn writable_now(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call; the descriptor is borrowed, so it stays open.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e);
    }
    Ok(pfd.revents & (libc::POLLOUT | libc::POLLHUP | libc::POLLERR) != 0)
}

/// The offloads a TAP's holder may let the kernel hand it ([`tap_set_offloads`]): partial
/// checksums and TCP segments of up to 64 KiB (IPv4, IPv6, with ECN), each delivered with its
/// virtio-net header. No UDP fragmentation or segmentation: the NIC offers neither.
pub const TAP_OFFLOADS: u32 = TAP_CSUM | TAP_TSO4 | TAP_TSO6 | TAP_TSO_ECN;
/// Each of [`TAP_OFFLOADS`]: partial checksums; TCP segments over IPv4, over IPv6; with ECN.
pub const TAP_CSUM: u32 = libc::TUN_F_CSUM;
pub const TAP_TSO4: u32 = libc::TUN_F_TSO4;
pub const TAP_TSO6: u32 = libc::TUN_F_TSO6;
pub const TAP_TSO_ECN: u32 = libc::TUN_F_TSO_ECN;

/// Which offloads the kernel may use for the frames a TAP hands its holder (`TUNSETOFFLOAD`):
/// those the guest's driver accepts, a subset of [`TAP_OFFLOADS`] (others are refused here
/// before the call, and by the holder's seccomp filter). Frames the holder writes may carry
/// any offload the TAP supports whatever is set here.
pub fn tap_set_offloads(tap: std::os::fd::BorrowedFd<'_>, offloads: u32) -> io::Result<()> {
    if offloads & !TAP_OFFLOADS != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: TUNSETOFFLOAD takes its flags as the argument itself (no pointer); on a
    // descriptor that is not a TUN/TAP the kernel answers an error and changes nothing.
    let r = unsafe {
        libc::ioctl(
            tap.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            offloads as libc::c_ulong,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What [`peek_stream`] found at the head of a socket's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peeked {
    /// Bytes copied: the first ones queued, still queued. 0 is end of file.
    pub len: usize,
    /// The copy ends with a write that carried descriptors (SCM_RIGHTS): the kernel stops a
    /// look there, so bytes queued after it are not in the copy even if `buf` had room.
    pub ends_at_descriptors: bool,
}

/// Copies the first bytes queued on a Unix stream socket into `buf` without taking them and
/// without waiting (MSG_PEEK | MSG_DONTWAIT); nothing queued is an error of kind `WouldBlock`.
/// No control buffer is given, so descriptors sent with the bytes are neither installed here
/// nor lost: they stay queued for the read that takes the bytes (the kernel only reports
/// that it left them, with MSG_CTRUNC).
pub fn peek_stream(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Peeked> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: a zeroed msghdr is a valid "no name, no control" header; only the data vector
    // is filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    // SAFETY: `msg` points at `iov`, valid for `buf.len()` bytes, and both outlive the call;
    // with no control buffer the kernel writes only into `buf` and `msg.msg_flags`.
    let n = unsafe {
        libc::recvmsg(
            fd.as_raw_fd(),
            &mut msg,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Peeked {
        len: n as usize,
        ends_at_descriptors: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// Asks the kernel to acknowledge what arrives on a TCP socket at once rather than delay the
/// ACK: a peer that sends a request in several small writes (the mssim protocol's code,
/// locality, size, command) would otherwise stall on its Nagle timer for each request. The
/// flag is not sticky, so it is set after every read.
pub fn tcp_quickack(fd: &impl AsRawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a descriptor we hold, with a pointer to a live c_int and its size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } as libc::c_long)?;
    Ok(())
}

/// Reads from a Unix stream socket, also taking any descriptors sent with the bytes
/// (SCM_RIGHTS): at most `MAX_PASSED_FDS`; more are closed.
pub fn recv_with_fds(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let received = recv_message(fd, buf, libc::MSG_CMSG_CLOEXEC)?;
    Ok((received.len, received.fds))
}

/// Most descriptors one received message may install (each message of the protocols here
/// carries at most one or two); the kernel closes any beyond and says so (MSG_CTRUNC).
const MAX_PASSED_FDS: usize = 4;

/// What [`recv_message`] took.
struct Received {
    len: usize,
    /// The kernel's msg_flags (MSG_TRUNC, MSG_CTRUNC).
    flags: libc::c_int,
    fds: Vec<OwnedFd>,
}

/// recvmsg(2) with `flags` into `buf` and a control buffer of [`MAX_PASSED_FDS`]
/// descriptors; every descriptor installed is returned (owned, so none leaks).
fn recv_message(fd: &impl AsRawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // Room for the control message of MAX_PASSED_FDS descriptors, 8-aligned.
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is a valid "no name, no control" header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE((MAX_PASSED_FDS * 4) as u32) } as usize;
    debug_assert!(msg.msg_controllen <= std::mem::size_of_val(&control));
    // SAFETY: `msg` points at `iov` (valid for `buf.len()` bytes) and at `control`, which
    // is larger than msg_controllen; both outlive the call. Callers pass MSG_CMSG_CLOEXEC,
    // so received descriptors do not leak across exec.
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, flags) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within
    // msg_controllen; each SCM_RIGHTS payload holds whole c_ints, read unaligned; each is a
    // descriptor the kernel just installed in this process, owned by nothing else.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..count {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    if raw >= 0 {
                        fds.push(OwnedFd::from_raw_fd(raw));
                    }
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len: n as usize,
        flags: msg.msg_flags,
        fds,
    })
}

/// [`peek_stream`], also taking copies of the descriptors sent with the bytes it copies (the
/// originals stay queued with them, for the read that takes the bytes): what a service that
/// must keep a passed descriptor before it takes the message needs.
pub fn peek_stream_with_fds(
    fd: &impl AsRawFd,
    buf: &mut [u8],
) -> io::Result<(Peeked, Vec<OwnedFd>)> {
    let received = recv_message(
        fd,
        buf,
        libc::MSG_PEEK | libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
    )?;
    Ok((
        Peeked {
            len: received.len,
            ends_at_descriptors: !received.fds.is_empty() || received.flags & libc::MSG_CTRUNC != 0,
        },
        received.fds,
    ))
}

/// A connected pair of `SOCK_SEQPACKET` Unix sockets (close-on-exec): message boundaries
/// kept, descriptors passed with messages. A descriptor store is one.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: socketpair writes two descriptors into the array it is given.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    } as libc::c_long)?;
    // SAFETY: both are fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sends `bytes` as one message on `sock`, with `fd` attached (SCM_RIGHTS) if given. Never
/// raises SIGPIPE (MSG_NOSIGNAL): a peer that is gone is an error.
pub fn send_with_fd(
    sock: &impl AsRawFd,
    bytes: &[u8],
    fd: Option<std::os::fd::BorrowedFd<'_>>,
) -> io::Result<()> {
    send_with_fds(sock, bytes, fd.as_slice())
}

/// Most descriptors [`send_with_fds`] attaches to one message (the kernel takes up to 253).
pub const MAX_SENT_FDS: usize = 16;

/// [`send_with_fd`] with up to [`MAX_SENT_FDS`] descriptors attached.
pub fn send_with_fds(
    sock: &impl AsRawFd,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> io::Result<()> {
    if fds.len() > MAX_SENT_FDS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // CMSG_SPACE(16 * 4) = 80 bytes.
    let mut control = [0u64; 10];
    // SAFETY: a zeroed msghdr is a valid "no name, no control" header, filled in below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = (fds.len() * 4) as u32;
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size (at most 80 bytes: within `control`).
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(payload) } as usize;
        debug_assert!(msg.msg_controllen <= std::mem::size_of_val(&control));
        // SAFETY: the header has a control buffer of msg_controllen bytes, so CMSG_FIRSTHDR
        // points inside `control`, and CMSG_DATA of a header of CMSG_LEN(payload) has room
        // for `fds.len()` c_ints, written unaligned.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload) as usize;
            let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
            for (i, fd) in fds.iter().enumerate() {
                std::ptr::write_unaligned(data.add(i), fd.as_raw_fd());
            }
        }
    }
    // SAFETY: `msg` points at `iov` (readable for `bytes.len()` bytes) and, if set, at
    // `control`; all outlive the call. The kernel only reads them.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n as usize != bytes.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "message sent in part",
        ));
    }
    Ok(())
}

/// One message taken by [`recv_packet`].
pub struct Packet {
    /// Bytes copied into the buffer.
    pub len: usize,
    /// The message was longer than the buffer: the rest is gone (MSG_TRUNC).
    pub truncated: bool,
    /// More descriptors came than fit: the kernel closed the rest (MSG_CTRUNC).
    pub descriptors_dropped: bool,
    /// The descriptors that came with it (close-on-exec), owned here.
    pub fds: Vec<OwnedFd>,
}

/// Takes the next message of a `SOCK_SEQPACKET` socket without waiting (`WouldBlock` if there
/// is none): its bytes into `buf`, at most four descriptors (close-on-exec) installed.
pub fn recv_packet(sock: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Packet> {
    let received = recv_message(sock, buf, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC)?;
    Ok(Packet {
        len: received.len.min(buf.len()),
        truncated: received.flags & libc::MSG_TRUNC != 0,
        descriptors_dropped: received.flags & libc::MSG_CTRUNC != 0,
        fds: received.fds,
    })
}

/// Whether `fd` is a listening socket (SO_ACCEPTCONN); an error if it is no socket.
pub fn is_listening_socket(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, a live c_int.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    } as libc::c_long)?;
    Ok(value != 0)
}

/// How long a send on `fd` may wait for room before it fails (SO_SNDTIMEO; a socket's
/// option, so every descriptor of the socket sees it).
pub fn set_send_timeout(fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: setsockopt reads a live timeval of the size given.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    } as libc::c_long)?;
    Ok(())
}

/// The fewest bytes a TCP socket must hold before poll calls it readable (SO_RCVLOWAT):
/// a reader waiting for the rest of a request is not woken for each piece of it.
pub fn set_receive_low_water(fd: std::os::fd::BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    let value = bytes.clamp(1, i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt reads a live c_int of the size given.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } as libc::c_long)?;
    Ok(())
}

/// A pipe (read end, write end), close-on-exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    cvt(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } as libc::c_long)?;
    // SAFETY: both are fresh descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Moves up to `len` bytes from the pipe `from` to `to` in the kernel (splice(2)): what moved
/// has left the pipe, what did not is still in it, whatever interrupts the call. Waits as
/// `to` does for room (its send timeout), never for the pipe (an empty pipe moves 0 bytes).
pub fn splice_from_pipe(
    from: std::os::fd::BorrowedFd<'_>,
    to: std::os::fd::BorrowedFd<'_>,
    len: usize,
) -> io::Result<usize> {
    // SAFETY: splice with no offsets (both NULL) on descriptors we hold; it copies nothing
    // into our memory.
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE,
        )
    };
    Ok(cvt(n as libc::c_long)? as usize)
}

/// A privileged operation, attempted by `pv-hostile` to show that a service holds no
/// privilege: each needs uid 0 or a capability that the sandbox takes away, and each is
/// harmless if it does succeed (it changes nothing outside the service's own namespaces).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privileged {
    /// setuid(0) (CAP_SETUID).
    SetUidRoot,
    /// setresuid(0, 0, 0) (CAP_SETUID).
    SetResUidRoot,
    /// setresgid(0, 0, 0) (CAP_SETGID).
    SetResGidRoot,
    /// setgroups([0]) (CAP_SETGID).
    JoinGroupRoot,
    /// capset: every capability into the permitted and effective sets (only a subset of
    /// the permitted set may be set).
    RaiseAllCapabilities,
    /// fchown(0, 0, 0): /dev/null, root's, to root (CAP_CHOWN: not the owner).
    ChownNotOwned,
    /// fchmod(0, 0666): /dev/null's own mode (CAP_FOWNER: not the owner).
    ChmodNotOwned,
    /// socket(AF_INET, SOCK_RAW, IPPROTO_ICMP) (CAP_NET_RAW).
    RawSocket,
    /// setrlimit(RLIMIT_NOFILE) one above the hard limit (CAP_SYS_RESOURCE).
    RaiseOpenFiles,
    /// sethostname in its own UTS namespace (CAP_SYS_ADMIN over that namespace).
    SetHostname,
    /// settimeofday(NULL, NULL): checks CAP_SYS_TIME, sets nothing.
    SetClock,
    /// init_module of an empty image (CAP_SYS_MODULE; outside every service profile).
    LoadModule,
}

impl Privileged {
    /// Every operation, module loading last (the service profile kills the process there).
    pub const ALL: [Privileged; 12] = [
        Privileged::SetUidRoot,
        Privileged::SetResUidRoot,
        Privileged::SetResGidRoot,
        Privileged::JoinGroupRoot,
        Privileged::RaiseAllCapabilities,
        Privileged::ChownNotOwned,
        Privileged::ChmodNotOwned,
        Privileged::RawSocket,
        Privileged::RaiseOpenFiles,
        Privileged::SetHostname,
        Privileged::SetClock,
        Privileged::LoadModule,
    ];
}

/// Attempts `op` with raw syscalls (this process is single-threaded; glibc's set*id
/// wrappers would be the same here); the kernel's answer.
pub fn attempt(op: Privileged) -> io::Result<()> {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let ret: libc::c_long = match op {
        // SAFETY: integer arguments only.
        Privileged::SetUidRoot => unsafe { libc::syscall(libc::SYS_setuid, 0) },
        // SAFETY: integer arguments only.
        Privileged::SetResUidRoot => unsafe { libc::syscall(libc::SYS_setresuid, 0, 0, 0) },
        // SAFETY: integer arguments only.
        Privileged::SetResGidRoot => unsafe { libc::syscall(libc::SYS_setresgid, 0, 0, 0) },
        Privileged::JoinGroupRoot => {
            let groups: [libc::gid_t; 1] = [0];
            // SAFETY: `groups` holds the one gid the call reads.
            unsafe { libc::syscall(libc::SYS_setgroups, 1usize, groups.as_ptr()) }
        }
        Privileged::RaiseAllCapabilities => {
            let header = CapHeader {
                version: 0x2008_0522,
                pid: 0,
            };
            let all = [
                CapData {
                    effective: u32::MAX,
                    permitted: u32::MAX,
                    inheritable: 0,
                },
                CapData {
                    effective: u32::MAX,
                    permitted: u32::MAX,
                    inheritable: 0,
                },
            ];
            // SAFETY: a version-3 header and the two data records it says follow.
            unsafe { libc::syscall(libc::SYS_capset, &header, all.as_ptr()) }
        }
        // SAFETY: integer arguments only.
        Privileged::ChownNotOwned => unsafe { libc::syscall(libc::SYS_fchown, 0, 0, 0) },
        // SAFETY: integer arguments only.
        Privileged::ChmodNotOwned => unsafe { libc::syscall(libc::SYS_fchmod, 0, 0o666) },
        Privileged::RawSocket => {
            // SAFETY: integer arguments only.
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_socket,
                    libc::AF_INET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::IPPROTO_ICMP,
                )
            };
            if fd >= 0 {
                // SAFETY: the descriptor was just created by this call and is ours.
                drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
                0
            } else {
                fd
            }
        }
        Privileged::RaiseOpenFiles => {
            let mut old = libc::rlimit64 {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: reads the limit into `old` (no new limit given).
            let got = unsafe {
                libc::syscall(
                    libc::SYS_prlimit64,
                    0,
                    libc::RLIMIT_NOFILE,
                    std::ptr::null::<libc::rlimit64>(),
                    &mut old,
                )
            };
            if got < 0 {
                got
            } else {
                let new = libc::rlimit64 {
                    rlim_cur: old.rlim_max.saturating_add(1),
                    rlim_max: old.rlim_max.saturating_add(1),
                };
                // SAFETY: sets the limit from `new`; no old value asked.
                unsafe {
                    libc::syscall(
                        libc::SYS_prlimit64,
                        0,
                        libc::RLIMIT_NOFILE,
                        &new,
                        std::ptr::null_mut::<libc::rlimit64>(),
                    )
                }
            }
        }
        Privileged::SetHostname => {
            let name = b"pwned";
            // SAFETY: `name` is valid for the length given.
            unsafe { libc::syscall(libc::SYS_sethostname, name.as_ptr(), name.len()) }
        }
        // SAFETY: both pointers null: the call only checks the capability.
        Privileged::SetClock => unsafe {
            libc::syscall(
                libc::SYS_settimeofday,
                std::ptr::null::<libc::timeval>(),
                std::ptr::null::<libc::c_void>(),
            )
        },
        Privileged::LoadModule => {
            let params = c"";
            // SAFETY: an empty image (null, length 0) and an empty parameter string.
            unsafe {
                libc::syscall(
                    libc::SYS_init_module,
                    std::ptr::null::<u8>(),
                    0usize,
                    params.as_ptr(),
                )
            }
        }
    };
    cvt(ret).map(|_| ())
}
