//! Seccomp filters of the microkernel's own threads: the supervisor (main thread), the
//! spawner, the platform server, the control worker and each vCPU. Services have theirs in [`crate::profiles`].
//!
//! Filters belong to a thread and are inherited by every thread and process it creates
//! afterwards, so the order of start-up decides what stacks on what:
//! 1. `run` creates the *spawner*, *platform* and *control* threads first; each installs its
//!    own filter before it does anything else.
//! 2. the *supervisor* (main thread) then installs its own: it answers the control socket
//!    and reads what services send it, but never mounts, changes identity or executes.
//! 3. *vCPU* threads, created later by the supervisor, inherit its filter and add their own,
//!    the narrowest, before their first `KVM_RUN`: the guest's exit data is read there.
//! 4. *services* are cloned by the spawner, so they inherit its filter: it allows what the
//!    sandbox child does before `execveat` and whatever any service of the manifest may do
//!    afterwards (the loader and service filters then narrow each service to its own).
//!
//! A violation in the supervisor, platform or a vCPU thread kills the whole paravisor
//! (SECCOMP_RET_KILL_PROCESS, which the kernel logs with the syscall number: audit
//! type=1326); its services die with it (parent-death signal). The spawner's filter traps
//! instead (SIGSYS): inherited by a service, a trap reaches the service runtime's handler,
//! which names the syscall; in the spawner itself SIGSYS has no handler and kills the
//! paravisor all the same.
//!
//! Each profile is data ([`ThreadProfile`]) that `paravisor audit` prints and
//! [`ThreadProfile::compile`] turns into BPF; the lists were found with `strace -f` of
//! `paravisor run` and the test suite.

use std::collections::BTreeMap;

use seccompiler::BpfProgram;
use seccompiler::SeccompAction;
use seccompiler::SeccompCmpArgLen;
use seccompiler::SeccompCmpOp;
use seccompiler::SeccompCondition;
use seccompiler::SeccompFilter;
use seccompiler::SeccompRule;
use seccompiler::TargetArch;
use serde::Serialize;
use syscalls::Sysno;

use crate::manifest::Manifest;
use crate::privilege::Check;
use crate::profiles;
use crate::profiles::ProfileError;

/// What every microkernel thread needs: memory, waiting, time, signals, logging, exit.
const THREAD_BASE: &[&str] = &[
    "read",
    "write",
    "close",
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "brk",
    "futex",
    "futex_waitv",
    "sched_yield",
    "sched_getaffinity",
    "clock_gettime",
    "clock_nanosleep",
    "nanosleep",
    "getrandom",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "restart_syscall",
    "gettid",
    "getpid",
    "exit",
    "exit_group",
];

/// The supervisor on top of [`THREAD_BASE`]: the state directory and granted files (opened
/// at every start), memfds for channels and keys, `/proc` for the live audit, the control
/// socket, services' descriptor stores (`recvmsg` of their packets, `fstat` and
/// `getsockopt(SO_ACCEPTCONN)` of each descriptor; the socket pairs are made before the
/// thread is confined: no `socketpair`), pidfds, and creating vCPU threads.
const SUPERVISOR: &[&str] = &[
    "openat",
    "pread64",
    "pwrite64",
    "readv",
    "writev",
    "lseek",
    "fstat",
    "newfstatat",
    "statx",
    "fcntl",
    "getdents64",
    "readlink",
    "readlinkat",
    "access",
    "faccessat2",
    "getcwd",
    "mkdir",
    "mkdirat",
    "rmdir",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "link",
    "linkat",
    "chmod",
    "fchmod",
    "fchmodat",
    "fsync",
    "fdatasync",
    "ftruncate",
    "fallocate",
    "copy_file_range",
    // std::fs::copy's fallback where copy_file_range is refused.
    "sendfile",
    "flock",
    // The owner checks of the state directory's files (owned_dir) compare with these.
    "geteuid",
    "getuid",
    "getegid",
    "getgid",
    "memfd_create",
    "dup",
    "pipe2",
    "eventfd2",
    "poll",
    "ppoll",
    "accept4",
    "setsockopt",
    "getsockopt",
    "sendto",
    "recvfrom",
    "sendmsg",
    "recvmsg",
    "shutdown",
    "waitid",
    "wait4",
    "pidfd_send_signal",
    "rt_sigaction",
    "set_robust_list",
    "rseq",
    "seccomp",
];

/// The key broker's client (only with `[attest] key-release`): one loopback TCP connection.
const KEY_RELEASE: &[&str] = &["connect", "getsockname", "getpeername"];

/// The platform thread on top of [`THREAD_BASE`]: nothing. It waits on its ring and signs.
const PLATFORM: &[&str] = &[];

/// The control worker on top of [`THREAD_BASE`]: sending its answer on a control connection
/// the supervisor accepted (std's socket writes are `sendto` with MSG_NOSIGNAL; the thread
/// can neither make nor accept a socket), and the answer's send timeout (in [`control`]).
/// Otherwise it calls services over their rings and signs (the attest benchmark's direct half).
const CONTROL: &[&str] = &["sendto"];

/// The vCPU threads on top of [`THREAD_BASE`] (and `ioctl` for exactly the requests below):
/// they run the vCPU and call services over their rings. No file, socket or process call.
const VCPU: &[&str] = &[];

/// The spawner thread's own work on top of [`THREAD_BASE`]: pipes to its child, the clone
/// itself (flags checked), the user namespace's id maps, reaping a child that failed.
const SPAWNER: &[&str] = &["pipe2", "openat", "wait4", "waitid", "pidfd_send_signal"];

/// What the sandbox child does between `clone` and `execveat` (see [`crate::sandbox`]).
pub const SANDBOX_CHILD: &[&str] = &[
    "umask",
    "dup2",
    "dup3",
    "fcntl",
    "close_range",
    "setsid",
    "prctl",
    "mount",
    "umount2",
    "pivot_root",
    "chdir",
    "mkdir",
    "symlink",
    // Files the child writes into its new root (copies of the libraries it may map).
    "sendfile",
    "sethostname",
    "prlimit64",
    "setrlimit",
    "setgroups",
    "setresgid",
    "setresuid",
    "capset",
    "capget",
    "poll",
    "seccomp",
];

/// The requests a vCPU thread makes on its vCPU descriptor: run it, and read its registers
/// for a failure report.
fn vcpu_ioctls() -> [(&'static str, u64); 4] {
    // _IO(KVMIO, 0x80), _IOR(KVMIO, 0x81, struct kvm_regs), _IOR(KVMIO, 0x83, struct kvm_sregs),
    // _IOW(KVMIO, 0x79, struct kvm_ioeventfd): a device's answer arms or disarms its
    // doorbells, on the vCPU thread that carried the access (before the guest goes on).
    const KVMIO: u64 = 0xAE;
    let ior = |nr: u64, size: usize| (2u64 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr;
    let iow = |nr: u64, size: usize| (1u64 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr;
    [
        (
            "KVM_IOEVENTFD",
            iow(0x79, std::mem::size_of::<kvm_bindings::kvm_ioeventfd>()),
        ),
        ("KVM_RUN", KVMIO << 8 | 0x80),
        (
            "KVM_GET_REGS",
            ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>()),
        ),
        (
            "KVM_GET_SREGS",
            ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>()),
        ),
    ]
}

/// The clone flags of a new thread (what glibc's `pthread_create` passes).
const THREAD_CLONE: u64 = (libc::CLONE_VM | libc::CLONE_THREAD) as u64;
/// Every flag the sandbox's clone may pass (`sandbox::SpawnPlan::spawn`).
const SANDBOX_CLONE: u64 = (libc::CLONE_PIDFD
    | libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWUSER
    | libc::SIGCHLD) as u64;

/// Which microkernel thread a profile is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Thread {
    Supervisor,
    Spawner,
    Platform,
    Control,
    Vcpu,
}

impl Thread {
    /// What `/proc/self/task/TID/comm` shows for it (a vCPU's is `vcpu` and its number).
    pub fn comm(self) -> &'static str {
        match self {
            Thread::Supervisor => "paravisor",
            Thread::Spawner => SPAWNER_THREAD,
            Thread::Platform => "platform",
            Thread::Control => CONTROL_THREAD,
            Thread::Vcpu => "vcpu",
        }
    }

    /// Filters stacked on the thread: its own, and those inherited from the thread that
    /// created it (see the module's header).
    pub fn filters(self) -> u32 {
        match self {
            Thread::Supervisor => 2,
            Thread::Spawner | Thread::Platform | Thread::Control => 1,
            Thread::Vcpu => 3,
        }
    }
}

/// The spawner thread's name.
pub const SPAWNER_THREAD: &str = "pv-spawner";
/// The control worker's name.
pub const CONTROL_THREAD: &str = "control";

/// One allowed syscall, with the argument values it is limited to (any of the alternatives;
/// none: any arguments).
#[derive(Debug, Clone, Serialize)]
pub struct Allowed {
    pub syscall: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub only: Vec<String>,
    #[serde(skip)]
    rules: Vec<Vec<(u8, SeccompCmpArgLen, SeccompCmpOp, u64)>>,
}

/// A thread's allowlist as data: printed by `audit`, compiled by [`ThreadProfile::compile`].
#[derive(Debug, Clone, Serialize)]
pub struct ThreadProfile {
    pub thread: Thread,
    /// What a syscall outside the list does.
    pub violation: &'static str,
    #[serde(skip)]
    action: SeccompAction,
    pub allowed: Vec<Allowed>,
    /// Syscalls answered with an error instead of being run (a second filter).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub refused: Vec<String>,
}

impl ThreadProfile {
    fn new(thread: Thread, action: SeccompAction) -> ThreadProfile {
        ThreadProfile {
            thread,
            violation: match action {
                SeccompAction::Trap => {
                    "SIGSYS (the paravisor dies; a service's runtime names the call)"
                }
                _ => "kills the paravisor (and with it every service), logged by the kernel",
            },
            action,
            allowed: Vec::new(),
            refused: Vec::new(),
        }
    }

    fn allow(mut self, names: &[&str]) -> ThreadProfile {
        for n in names {
            self = self.allow_only(n, "", Vec::new());
        }
        self
    }

    /// Allows `syscall` (with any arguments if `rule` is empty, else only as `rule` says:
    /// alternatives accumulate). Unconditional wins over conditional.
    fn allow_only(
        mut self,
        syscall: &str,
        text: &str,
        rule: Vec<(u8, SeccompCmpArgLen, SeccompCmpOp, u64)>,
    ) -> ThreadProfile {
        match self.allowed.iter_mut().find(|a| a.syscall == syscall) {
            Some(a) if a.only.is_empty() => {}
            Some(a) if rule.is_empty() => {
                a.only.clear();
                a.rules.clear();
            }
            Some(a) => {
                a.only.push(text.into());
                a.rules.push(rule);
            }
            None => self.allowed.push(Allowed {
                syscall: syscall.into(),
                only: if rule.is_empty() {
                    Vec::new()
                } else {
                    vec![text.into()]
                },
                rules: if rule.is_empty() {
                    Vec::new()
                } else {
                    vec![rule]
                },
            }),
        }
        self
    }

    /// The syscall names, sorted (for printing).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .allowed
            .iter()
            .map(|a| {
                if a.only.is_empty() {
                    a.syscall.clone()
                } else {
                    format!("{} ({})", a.syscall, a.only.join(" | "))
                }
            })
            .collect();
        v.sort();
        v
    }

    /// The BPF programs to install, in order: the allowlist, then (if any) the filter that
    /// answers [`ThreadProfile::refused`] calls with ENOSYS.
    pub fn compile(&self) -> Result<Vec<BpfProgram>, ProfileError> {
        let err = |e: &dyn std::fmt::Display| ProfileError::Compile(e.to_string());
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for a in &self.allowed {
            let nr = sysno(&a.syscall)?;
            let mut list = Vec::new();
            for r in &a.rules {
                let conditions = r
                    .iter()
                    .map(|(arg, len, op, value)| {
                        SeccompCondition::new(*arg, len.clone(), op.clone(), *value)
                            .map_err(|e| err(&e))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                list.push(SeccompRule::new(conditions).map_err(|e| err(&e))?);
            }
            rules.insert(nr, list);
        }
        let mut out = vec![program(rules, self.action.clone(), SeccompAction::Allow)?];
        if !self.refused.is_empty() {
            let mut refused = BTreeMap::new();
            for n in &self.refused {
                refused.insert(sysno(n)?, Vec::new());
            }
            out.push(program(
                refused,
                SeccompAction::Allow,
                SeccompAction::Errno(libc::ENOSYS as u32),
            )?);
        }
        Ok(out)
    }
}

fn sysno(name: &str) -> Result<i64, ProfileError> {
    name.parse::<Sysno>()
        .map(|s| s.id() as i64)
        .map_err(|_| ProfileError::UnknownSyscall(name.to_string()))
}

fn program(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, ProfileError> {
    let filter = SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
        .map_err(|e| ProfileError::Compile(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| ProfileError::Compile(e.to_string()))
}

fn eq(arg: u8, value: u64) -> (u8, SeccompCmpArgLen, SeccompCmpOp, u64) {
    (arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
}

/// The supervisor's profile. `pid` is the paravisor's own (it may signal its own threads
/// only); `key_release`: the manifest names a key broker.
pub fn supervisor(pid: u32, key_release: bool) -> ThreadProfile {
    let mut p = ThreadProfile::new(Thread::Supervisor, SeccompAction::KillProcess)
        .allow(THREAD_BASE)
        .allow(SUPERVISOR)
        // Kicking its own vCPU threads out of KVM_RUN; never another process.
        .allow_only("tgkill", "own threads", vec![eq(0, u64::from(pid))])
        // Threads only: glibc's fallback when clone3 says ENOSYS (clone3's flags are in
        // memory, out of a filter's sight, hence refused below).
        .allow_only(
            "clone",
            "new threads only",
            vec![(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(THREAD_CLONE),
                THREAD_CLONE,
            )],
        )
        .allow(&["clone3"])
        .allow_only("ioctl", "FIONBIO", vec![eq(1, libc::FIONBIO)])
        .allow_only(
            "prctl",
            "PR_SET_NAME",
            vec![eq(0, libc::PR_SET_NAME as u64)],
        )
        .allow_only(
            "prctl",
            "PR_SET_NO_NEW_PRIVS",
            vec![eq(0, libc::PR_SET_NO_NEW_PRIVS as u64)],
        );
    // vCPU threads inherit this filter: what they need must pass it too.
    for (name, request) in vcpu_ioctls() {
        p = p.allow_only("ioctl", name, vec![eq(1, request)]);
    }
    if key_release {
        p = p.allow(KEY_RELEASE);
        for (name, family) in [
            ("AF_INET, SOCK_STREAM", libc::AF_INET),
            ("AF_INET6, SOCK_STREAM", libc::AF_INET6),
        ] {
            p = p.allow_only(
                "socket",
                name,
                vec![
                    eq(0, family as u64),
                    (
                        1,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::MaskedEq(0xf),
                        libc::SOCK_STREAM as u64,
                    ),
                ],
            );
        }
    }
    p.refused.push("clone3".into());
    p
}

/// The spawner's profile: its own work, the sandbox child's until `execveat`, and what any
/// service of `m` may do afterwards (each service's own filters narrow it).
pub fn spawner(m: &Manifest) -> ThreadProfile {
    let mut p = ThreadProfile::new(Thread::Spawner, SeccompAction::Trap)
        .allow(THREAD_BASE)
        .allow(SPAWNER)
        .allow(SANDBOX_CHILD)
        .allow(profiles::BASE)
        .allow(profiles::LOADER)
        .allow_only(
            "clone",
            "a sandboxed process: namespaces and a pidfd only",
            vec![(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(!SANDBOX_CLONE),
                0,
            )],
        )
        .allow_only(
            "execveat",
            "through a descriptor (AT_EMPTY_PATH)",
            vec![eq(4, libc::AT_EMPTY_PATH as u64)],
        );
    for s in &m.services {
        let names: Vec<&str> = s.syscalls.iter().map(String::as_str).collect();
        p = p.allow(&names);
    }
    // A store's holder sends on its store (its own filters allow that one descriptor, whose
    // slot depends on the run: with a guest or without).
    if m.services.iter().any(|s| s.fd_store.is_some()) {
        p = p.allow(&["sendmsg"]);
    }
    // A TAP's holder sets its TAP's offloads (its own filters allow that one request).
    if m.services.iter().any(|s| !s.taps.is_empty()) {
        p = p.allow_only(
            "ioctl",
            "TUNSETOFFLOAD within the NIC's offloads, for a TAP's holder",
            vec![
                eq(1, libc::TUNSETOFFLOAD),
                (
                    2,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(!u64::from(ipc_defs::hosted::sys::TAP_OFFLOADS)),
                    0,
                ),
            ],
        );
    }
    p
}

/// The platform thread's profile.
pub fn platform() -> ThreadProfile {
    ThreadProfile::new(Thread::Platform, SeccompAction::KillProcess)
        .allow(THREAD_BASE)
        .allow(PLATFORM)
}

/// The control worker's profile: its answer's send timeout is the one socket option it sets.
pub fn control() -> ThreadProfile {
    ThreadProfile::new(Thread::Control, SeccompAction::KillProcess)
        .allow(THREAD_BASE)
        .allow(CONTROL)
        .allow_only(
            "setsockopt",
            "SOL_SOCKET, SO_SNDTIMEO",
            vec![
                eq(1, libc::SOL_SOCKET as u64),
                eq(2, libc::SO_SNDTIMEO as u64),
            ],
        )
}

/// A vCPU thread's profile: `ioctl` only for the vCPU requests it makes.
pub fn vcpu() -> ThreadProfile {
    let mut p = ThreadProfile::new(Thread::Vcpu, SeccompAction::KillProcess)
        .allow(THREAD_BASE)
        .allow(VCPU);
    for (name, request) in vcpu_ioctls() {
        p = p.allow_only("ioctl", name, vec![eq(1, request)]);
    }
    p
}

/// Every thread profile of a run of `m`, in start-up order (for `audit`).
pub fn all(m: &Manifest, pid: u32) -> Vec<ThreadProfile> {
    vec![
        spawner(m),
        platform(),
        control(),
        supervisor(pid, m.attest.key_release.is_some()),
        vcpu(),
    ]
}

/// The compiled filters of one run, made once at start.
pub struct ThreadFilters {
    pub supervisor: Vec<BpfProgram>,
    pub spawner: Vec<BpfProgram>,
    pub platform: Vec<BpfProgram>,
    pub control: Vec<BpfProgram>,
    pub vcpu: Vec<BpfProgram>,
}

impl ThreadFilters {
    pub fn compile(m: &Manifest, pid: u32) -> Result<ThreadFilters, ProfileError> {
        Ok(ThreadFilters {
            supervisor: supervisor(pid, m.attest.key_release.is_some()).compile()?,
            spawner: spawner(m).compile()?,
            platform: platform().compile()?,
            control: control().compile()?,
            vcpu: vcpu().compile()?,
        })
    }
}

/// The live audit's checks of the microkernel's own threads: each is in seccomp filter
/// mode with no_new_privs and as many filters as its place in the start-up order gives it;
/// a thread that is none of the known ones, or a missing spawner, platform or control thread
/// (when `spawner`, `platform` or `control` says it runs), is a difference.
pub fn check_threads(spawner: bool, platform: bool, control: bool) -> Vec<Check> {
    let missing = |what: &str, e: String| Check {
        what: what.into(),
        expected: "running".into(),
        actual: e,
        ok: false,
    };
    let dir = match std::fs::read_dir("/proc/self/task") {
        Ok(d) => d,
        Err(e) => return vec![missing("threads", format!("/proc/self/task: {e}"))],
    };
    let pid = std::process::id();
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for entry in dir.flatten() {
        let Ok(tid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm"))
            .map(|c| c.trim().to_string())
            .unwrap_or_default();
        // Gone between listing and reading: nothing to check.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        // KVM's workers (e.g. `kvm-nx-lpage-recovery`) are threads of the process that run
        // kernel code only: no syscall of theirs goes through a filter.
        if is_kernel_worker(&entry.path()) {
            out.push(Check {
                what: format!("thread {comm} ({tid})"),
                expected: "a kernel worker (runs no user code)".into(),
                actual: "a kernel worker (runs no user code)".into(),
                ok: true,
            });
            continue;
        }
        let thread = if tid == pid {
            Some(Thread::Supervisor)
        } else {
            [Thread::Spawner, Thread::Platform, Thread::Control]
                .into_iter()
                .find(|t| t.comm() == comm)
                .or_else(|| {
                    comm.strip_prefix(Thread::Vcpu.comm())
                        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                        .map(|_| Thread::Vcpu)
                })
        };
        let Some(thread) = thread else {
            out.push(Check {
                what: format!("thread {comm} ({tid})"),
                expected: "a microkernel thread with a filter of its own".into(),
                actual: "unknown thread".into(),
                ok: false,
            });
            continue;
        };
        seen.push(thread);
        let name = if thread == Thread::Supervisor {
            "supervisor".to_string()
        } else {
            comm
        };
        for (what, expected) in [
            ("NoNewPrivs", "1".to_string()),
            ("Seccomp", "2".to_string()),
            ("Seccomp_filters", thread.filters().to_string()),
        ] {
            out.push(Check::new(
                &format!("{name} {what}"),
                expected,
                crate::privilege::field(&status, &format!("{what}:")),
            ));
        }
    }
    for (wanted, thread) in [
        (spawner, Thread::Spawner),
        (platform, Thread::Platform),
        (control, Thread::Control),
    ] {
        if wanted && !seen.contains(&thread) {
            out.push(missing(
                &format!("{} thread", thread.comm()),
                "missing".into(),
            ));
        }
    }
    out
}

/// PF_USER_WORKER: a kernel thread attached to a user process (KVM's workers, io_uring's).
const PF_USER_WORKER: u64 = 0x4000;

/// Whether the task at `task` (a `/proc/self/task/TID` directory) is a kernel worker.
fn is_kernel_worker(task: &std::path::Path) -> bool {
    let stat = std::fs::read_to_string(task.join("stat")).unwrap_or_default();
    // The flags are the 7th field after the command name, which may hold spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(6))
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_USER_WORKER != 0)
}

/// Installs `programs` on the calling thread (and no other), in order, with no_new_privs.
pub fn install(programs: &[BpfProgram]) -> std::io::Result<()> {
    for p in programs {
        seccompiler::apply_filter(p).map_err(std::io::Error::other)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::syscall_under_filters;
    use crate::sandbox::Exit;

    const KILLED: Exit = Exit::Signal(libc::SIGSYS);

    fn run(programs: &[BpfProgram], nr: libc::c_long, args: [u64; 6]) -> Exit {
        syscall_under_filters(programs, nr, args)
    }

    fn request(name: &str) -> u64 {
        vcpu_ioctls()
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, r)| *r)
            .unwrap()
    }

    #[test]
    fn vcpu_requests_match_the_kernel_headers() {
        // KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS as <linux/kvm.h> defines them on x86_64.
        assert_eq!(request("KVM_RUN"), 0xae80);
        assert_eq!(request("KVM_GET_REGS"), 0x8090_ae81);
        assert_eq!(request("KVM_GET_SREGS"), 0x8138_ae83);
    }

    #[test]
    fn a_vcpu_thread_may_run_its_vcpu_and_nothing_else() {
        let vcpu = vcpu().compile().unwrap();
        let ebadf = Exit::Code(libc::EBADF);
        let fd = u64::MAX; // -1: every allowed ioctl fails with EBADF instead of acting
        assert_eq!(
            run(&vcpu, libc::SYS_ioctl, [fd, request("KVM_RUN"), 0, 0, 0, 0]),
            ebadf
        );
        assert_eq!(
            run(
                &vcpu,
                libc::SYS_ioctl,
                [fd, request("KVM_GET_REGS"), 0, 0, 0, 0]
            ),
            ebadf
        );
        // Another vCPU request (KVM_SET_REGS), a terminal's, and every file, socket or
        // process call: the whole paravisor dies.
        assert_eq!(
            run(&vcpu, libc::SYS_ioctl, [fd, 0x4090_ae82, 0, 0, 0, 0]),
            KILLED
        );
        assert_eq!(
            run(&vcpu, libc::SYS_ioctl, [fd, libc::TIOCSTI, 0, 0, 0, 0]),
            KILLED
        );
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_setresuid,
            libc::SYS_kill,
        ] {
            assert_eq!(run(&vcpu, nr, [0; 6]), KILLED, "syscall {nr}");
        }
    }

    #[test]
    fn the_supervisor_may_not_mount_change_identity_exec_or_fork() {
        let pid = std::process::id();
        let sup = supervisor(pid, false).compile().unwrap();
        assert_eq!(sup.len(), 2, "allowlist and the clone3 refusal");
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_pivot_root,
            libc::SYS_setresuid,
            libc::SYS_setuid,
            libc::SYS_capset,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_init_module,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_kill,
        ] {
            assert_eq!(run(&sup, nr, [0; 6]), KILLED, "syscall {nr}");
        }
        // A new process (fork-like clone flags), and a signal to another process.
        assert_eq!(
            run(&sup, libc::SYS_clone, [libc::SIGCHLD as u64, 0, 0, 0, 0, 0]),
            KILLED
        );
        assert_eq!(run(&sup, libc::SYS_tgkill, [1, 1, 0, 0, 0, 0]), KILLED);
        // clone3 answers ENOSYS (glibc then creates threads with clone, whose flags are
        // checked); ioctl only for FIONBIO and the vCPU requests.
        assert_eq!(
            run(&sup, libc::SYS_clone3, [0; 6]),
            Exit::Code(libc::ENOSYS)
        );
        let fd = u64::MAX;
        assert_eq!(
            run(&sup, libc::SYS_ioctl, [fd, request("KVM_RUN"), 0, 0, 0, 0]),
            Exit::Code(libc::EBADF)
        );
        assert_eq!(
            run(&sup, libc::SYS_ioctl, [fd, libc::TIOCSTI, 0, 0, 0, 0]),
            KILLED
        );
        // Files stay open to it (the state directory, /proc for the live audit).
        assert_eq!(
            run(
                &sup,
                libc::SYS_openat,
                [libc::AT_FDCWD as u64, 0, 0, 0, 0, 0]
            ),
            Exit::Code(libc::EFAULT)
        );
        // With a key broker, TCP sockets; never raw or packet ones.
        let kbs = supervisor(pid, true).compile().unwrap();
        let tcp = [libc::AF_INET as u64, libc::SOCK_STREAM as u64, 0, 0, 0, 0];
        assert_eq!(run(&kbs, libc::SYS_socket, tcp), Exit::Code(0));
        let raw = [libc::AF_INET as u64, libc::SOCK_RAW as u64, 1, 0, 0, 0];
        assert_eq!(run(&kbs, libc::SYS_socket, raw), KILLED);
        let packet = [libc::AF_PACKET as u64, libc::SOCK_RAW as u64, 0, 0, 0, 0];
        assert_eq!(run(&kbs, libc::SYS_socket, packet), KILLED);
        assert_eq!(
            run(&sup, libc::SYS_socket, tcp),
            KILLED,
            "no broker: no socket"
        );
    }

    #[test]
    fn the_platform_thread_may_only_wait_and_answer() {
        let platform = platform().compile().unwrap();
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_ioctl,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_mount,
        ] {
            assert_eq!(run(&platform, nr, [0; 6]), KILLED, "syscall {nr}");
        }
        assert_eq!(run(&platform, libc::SYS_getpid, [0; 6]), Exit::Code(0));
    }

    #[test]
    fn the_control_worker_may_only_wait_sign_and_answer() {
        let control = control().compile().unwrap();
        // No file, socket, process or mount call: it answers on a connection the supervisor
        // accepted, over rings the supervisor made.
        for nr in [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_ioctl,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_kill,
            libc::SYS_mount,
        ] {
            assert_eq!(run(&control, nr, [0; 6]), KILLED, "syscall {nr}");
        }
        assert_eq!(run(&control, libc::SYS_getpid, [0; 6]), Exit::Code(0));
        // The answer's send timeout (on descriptor -1 here: EBADF), and no other option.
        let option = |name: i32| [u64::MAX, libc::SOL_SOCKET as u64, name as u64, 0, 0, 0];
        assert_eq!(
            run(&control, libc::SYS_setsockopt, option(libc::SO_SNDTIMEO)),
            Exit::Code(libc::EBADF)
        );
        assert_eq!(
            run(&control, libc::SYS_setsockopt, option(libc::SO_SNDBUF)),
            KILLED
        );
    }

    #[test]
    fn the_spawner_allows_the_sandbox_and_the_services_but_no_thread_or_other_exec() {
        let m = Manifest::parse(
            std::path::Path::new("m.toml"),
            r#"
[[service]]
name = "a"
binary = "pv-a"
serves = ["vmgs"]
syscalls = ["pwrite64", "accept4"]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }
"#,
        )
        .unwrap();
        let p = spawner(&m);
        for needed in [
            "mount",
            "pivot_root",
            "setresuid",
            "capset",
            "seccomp",
            "accept4",
        ] {
            assert!(p.allowed.iter().any(|a| a.syscall == needed), "{needed}");
        }
        let spawner = p.compile().unwrap();
        // Traps (SIGSYS: a service's runtime names the call; here nothing handles it).
        for nr in [
            libc::SYS_socket,
            libc::SYS_ptrace,
            libc::SYS_init_module,
            libc::SYS_bpf,
        ] {
            assert_eq!(run(&spawner, nr, [0; 6]), KILLED, "syscall {nr}");
        }
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert_eq!(
            run(&spawner, libc::SYS_clone, [thread, 0, 0, 0, 0, 0]),
            KILLED
        );
        // execveat through a descriptor only (-1 here: EBADF), never by path.
        let empty = c"".as_ptr() as u64;
        let by_fd = [u64::MAX, empty, 0, 0, libc::AT_EMPTY_PATH as u64, 0];
        assert_eq!(
            run(&spawner, libc::SYS_execveat, by_fd),
            Exit::Code(libc::EBADF)
        );
        assert_eq!(
            run(&spawner, libc::SYS_execveat, [u64::MAX, empty, 0, 0, 0, 0]),
            KILLED
        );
    }

    /// TAPs are attached once, before any thread is confined (`crate::taps`): after that no
    /// thread of the microkernel may enter a network namespace or attach a TAP, so a
    /// compromised thread cannot reach another network through the paravisor.
    #[test]
    fn no_thread_may_enter_a_namespace_or_attach_a_tap_after_start() {
        let m = Manifest::parse(
            std::path::Path::new("m.toml"),
            &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest.toml"))
                .unwrap(),
        )
        .unwrap();
        let fd = u64::MAX;
        for profile in all(&m, std::process::id()) {
            let program = profile.compile().unwrap();
            for (what, nr, args) in [
                (
                    "setns",
                    libc::SYS_setns,
                    [fd, libc::CLONE_NEWNET as u64, 0, 0, 0, 0],
                ),
                (
                    "TUNSETIFF",
                    libc::SYS_ioctl,
                    [fd, libc::TUNSETIFF, 0, 0, 0, 0],
                ),
                (
                    "TUNSETPERSIST",
                    libc::SYS_ioctl,
                    [fd, libc::TUNSETPERSIST, 0, 0, 0, 0],
                ),
            ] {
                assert_eq!(
                    run(&program, nr, args),
                    KILLED,
                    "{what} under {:?}",
                    profile.thread
                );
            }
        }
    }
}
