//! Syscall profiles: the common base every service runtime needs, the extra the dynamic loader
//! needs to get to `main`, and their compilation (with a service's fragment) to seccomp BPF.
//!
//! A service runs under two stacked filters, both installed before any of its own code runs:
//! 1. the *loader* filter, installed by the microkernel in the child just before `execveat`:
//!    base + what `ld.so` and libc start-up need (it can open files, but the mount namespace
//!    shows it nothing except the shared libraries);
//! 2. the *service* filter, installed by the runtime from the bootstrap record before it maps
//!    a single channel: base + the manifest's fragment, nothing else.
//!
//! Filters stack (the strictest answer wins), so a service that skipped step 2 would still be
//! confined by step 1; and the supervisor checks that both are in place (`Seccomp_filters: 2`)
//! before it reports the service running.

use std::collections::BTreeMap;

use seccompiler::BpfProgram;
use seccompiler::SeccompAction;
use seccompiler::SeccompCmpArgLen;
use seccompiler::SeccompCmpOp;
use seccompiler::SeccompCondition;
use seccompiler::SeccompFilter;
use seccompiler::SeccompRule;
use seccompiler::TargetArch;
use syscalls::Sysno;

/// What every service runtime needs after start-up: memory, futex waits on its rings, time,
/// signals for its own fault handling, reading its capabilities, writing logs, exiting.
pub const BASE: &[&str] = &[
    "read",
    "write",
    "writev",
    "pread64",
    "close",
    "fstat",
    "newfstatat",
    "statx",
    "lseek",
    "fcntl",
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
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "sigaltstack",
    "getpid",
    "gettid",
    "tgkill",
    "poll",
    "ppoll",
    "restart_syscall",
    "exit",
    "exit_group",
];

/// What the dynamic loader and libc/Rust start-up need on top of [`BASE`], only until the
/// runtime installs the service filter. `openat` is here because `ld.so` opens the shared
/// libraries; the mount namespace holds nothing else to open.
pub const LOADER: &[&str] = &[
    "openat",
    "access",
    "readlink",
    "arch_prctl",
    "set_tid_address",
    "set_robust_list",
    "rseq",
    "prlimit64",
    "prctl",
    "seccomp",
    "getcwd",
    "uname",
];

/// Errors compiling a profile.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("\"{0}\" is not an x86_64 syscall name")]
    UnknownSyscall(String),
    #[error("seccomp compilation failed: {0}")]
    Compile(String),
}

fn sysno(name: &str) -> Result<i64, ProfileError> {
    name.parse::<Sysno>()
        .map(|s| s.id() as i64)
        .map_err(|_| ProfileError::UnknownSyscall(name.to_string()))
}

/// The syscall name of a number, for reports.
pub fn syscall_name(nr: u32) -> String {
    Sysno::new(nr as usize).map_or_else(|| format!("syscall #{nr}"), |s| s.name().to_string())
}

fn compile(
    names: impl IntoIterator<Item = impl AsRef<str>>,
    extra: BTreeMap<i64, Vec<SeccompRule>>,
) -> Result<BpfProgram, ProfileError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = extra;
    // A name allowed outright (no rule) wins over a grant's narrower rule for the same call.
    for n in names {
        rules.insert(sysno(n.as_ref())?, vec![]);
    }
    // A violation traps (SIGSYS) rather than killing outright, so that the runtime's handler
    // can name the syscall for the supervisor; without a handler SIGSYS kills the process.
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| ProfileError::Compile(e.to_string()))?;
    filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| ProfileError::Compile(e.to_string()))
}

/// The one ioctl a TAP's holder may make: `TUNSETOFFLOAD` (argument 1) with flags
/// (argument 2) within [`ipc_defs::hosted::sys::TAP_OFFLOADS`], the offloads its guest's
/// driver accepts. Any descriptor may be named: on one that is not a TAP the kernel refuses
/// the request, and the holder has no other TAP than its own.
fn tap_offload_rule() -> Result<SeccompRule, ProfileError> {
    let compile_err = |e: seccompiler::BackendError| ProfileError::Compile(e.to_string());
    SeccompRule::new(vec![
        SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::TUNSETOFFLOAD,
        )
        .map_err(compile_err)?,
        // No flag outside the set: (flags & !set) == 0 over the whole argument.
        SeccompCondition::new(
            2,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(!u64::from(ipc_defs::hosted::sys::TAP_OFFLOADS)),
            0,
        )
        .map_err(compile_err)?,
    ])
    .map_err(compile_err)
}

/// What a service's grants add to its filter beyond its fragment: each allows one syscall
/// with fixed arguments only, which a name in a fragment could not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GrantRules {
    /// It holds a TAP: `ioctl(TUNSETOFFLOAD)` within the NIC's offloads.
    pub tap_holder: bool,
    /// It holds a descriptor store at this slot: `sendmsg` on that descriptor only (the
    /// store's messages; its other sockets need their own `sendmsg` in the fragment).
    pub fd_store_slot: Option<i32>,
}

impl GrantRules {
    /// The rules of service `i` of `services`, from its capability plan `slots`.
    pub fn of(spec: &crate::manifest::ServiceSpec, slots: &[crate::plan::Slot]) -> GrantRules {
        GrantRules {
            tap_holder: !spec.taps.is_empty(),
            fd_store_slot: slots
                .iter()
                .find(|s| s.source == crate::plan::Source::FdStore)
                .map(|s| s.slot),
        }
    }

    /// The rules as `paravisor audit` prints them, e.g. `sendmsg (descriptor 9 only)`.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.tap_holder {
            out.push("ioctl (TUNSETOFFLOAD within the NIC's offloads)".to_string());
        }
        if let Some(slot) = self.fd_store_slot {
            out.push(format!("sendmsg (descriptor {slot} only: its fd store)"));
        }
        out
    }

    fn rules(&self) -> Result<BTreeMap<i64, Vec<SeccompRule>>, ProfileError> {
        let mut extra = BTreeMap::new();
        if self.tap_holder {
            extra.insert(sysno("ioctl")?, vec![tap_offload_rule()?]);
        }
        if let Some(slot) = self.fd_store_slot {
            extra.insert(sysno("sendmsg")?, vec![descriptor_rule(slot)?]);
        }
        Ok(extra)
    }
}

/// A rule that matches a call on descriptor `slot` (argument 0) only.
fn descriptor_rule(slot: i32) -> Result<SeccompRule, ProfileError> {
    let compile_err = |e: seccompiler::BackendError| ProfileError::Compile(e.to_string());
    SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        slot as u64,
    )
    .map_err(compile_err)?])
    .map_err(compile_err)
}

/// The filter a service runs under for good: base plus its manifest fragment, and what its
/// grants add ([`GrantRules`]).
pub fn service_program(
    fragment: &[String],
    grants: GrantRules,
) -> Result<BpfProgram, ProfileError> {
    compile(
        BASE.iter()
            .copied()
            .map(String::from)
            .chain(fragment.iter().cloned()),
        grants.rules()?,
    )
}

/// The filter installed before `execveat`: base, fragment, loader needs, what its grants add
/// (the service filter stacks on this one, so both must allow it), and `execveat` of exactly
/// the service binary's descriptor with `AT_EMPTY_PATH`.
pub fn loader_program(
    fragment: &[String],
    binary_slot: i32,
    grants: GrantRules,
) -> Result<BpfProgram, ProfileError> {
    let exec_rule = SeccompRule::new(vec![
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            binary_slot as u64,
        )
        .map_err(|e| ProfileError::Compile(e.to_string()))?,
        SeccompCondition::new(
            4,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::AT_EMPTY_PATH as u64,
        )
        .map_err(|e| ProfileError::Compile(e.to_string()))?,
    ])
    .map_err(|e| ProfileError::Compile(e.to_string()))?;
    let mut extra = grants.rules()?;
    extra.insert(sysno("execveat")?, vec![exec_rule]);
    compile(
        BASE.iter()
            .chain(LOADER.iter())
            .copied()
            .map(String::from)
            .chain(fragment.iter().cloned()),
        extra,
    )
}

/// Serialises a program as `struct sock_filter` records, for the bootstrap capability.
pub fn program_bytes(program: &BpfProgram) -> Vec<u8> {
    let mut out = Vec::with_capacity(program.len() * 8);
    for insn in program {
        out.extend_from_slice(&insn.code.to_ne_bytes());
        out.push(insn.jt);
        out.push(insn.jf);
        out.extend_from_slice(&insn.k.to_ne_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_and_loader_names_are_all_real_syscalls() {
        for n in BASE.iter().chain(LOADER) {
            sysno(n).unwrap();
        }
        assert_eq!(syscall_name(41), "socket");
    }

    #[test]
    fn programs_compile() {
        let none = GrantRules::default();
        let tap = GrantRules {
            tap_holder: true,
            ..GrantRules::default()
        };
        let p = service_program(&["pwrite64".to_string()], none).unwrap();
        assert!(!p.is_empty());
        assert_eq!(program_bytes(&p).len(), p.len() * 8);
        loader_program(&[], 9, none).unwrap();
        assert!(service_program(&[], tap).unwrap().len() > p.len());
        loader_program(&[], 9, tap).unwrap();
        assert!(matches!(
            service_program(&["nosuchcall".into()], none),
            Err(ProfileError::UnknownSyscall(_))
        ));
    }

    /// The store's holder may send on its store's slot and nowhere else (its other sockets
    /// are connections from listeners); a service without a store may not send at all.
    #[test]
    fn an_fd_store_allows_sendmsg_on_its_own_slot_only() {
        use crate::sandbox::syscall_under_filters;
        use crate::sandbox::Exit;
        let store = GrantRules {
            fd_store_slot: Some(900),
            ..GrantRules::default()
        };
        let with = [service_program(&[], store).unwrap()];
        let without = [service_program(&[], GrantRules::default()).unwrap()];
        let on = |fd: u64| [fd, 0, 0, 0, 0, 0];
        // Descriptor 900 is not open in the test child: the kernel, not the filter, answers.
        assert_eq!(
            syscall_under_filters(&with, libc::SYS_sendmsg, on(900)),
            Exit::Code(libc::EBADF)
        );
        for fd in [899, 901, 0, 3] {
            assert_eq!(
                syscall_under_filters(&with, libc::SYS_sendmsg, on(fd)),
                Exit::Signal(libc::SIGSYS),
                "sendmsg on {fd}"
            );
        }
        assert_eq!(
            syscall_under_filters(&without, libc::SYS_sendmsg, on(900)),
            Exit::Signal(libc::SIGSYS)
        );
        // A fragment that allows sendmsg outright keeps it outright.
        let all = [service_program(&["sendmsg".into()], store).unwrap()];
        assert_eq!(
            syscall_under_filters(&all, libc::SYS_sendmsg, on(901)),
            Exit::Code(libc::EBADF)
        );
        assert_eq!(
            store.describe(),
            ["sendmsg (descriptor 900 only: its fd store)"]
        );
    }
}
