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

/// What a service's grants add to its filter beyond the fragment: the TAP offload rule for a
/// TAP's holder.
fn grant_rules(tap_holder: bool) -> Result<BTreeMap<i64, Vec<SeccompRule>>, ProfileError> {
    let mut extra = BTreeMap::new();
    if tap_holder {
        extra.insert(sysno("ioctl")?, vec![tap_offload_rule()?]);
    }
    Ok(extra)
}

/// The filter a service runs under for good: base plus its manifest fragment, and the TAP
/// offload rule when it holds a TAP (`tap_holder`).
pub fn service_program(fragment: &[String], tap_holder: bool) -> Result<BpfProgram, ProfileError> {
    compile(
        BASE.iter()
            .copied()
            .map(String::from)
            .chain(fragment.iter().cloned()),
        grant_rules(tap_holder)?,
    )
}

/// The filter installed before `execveat`: base, fragment, loader needs, and `execveat` of
/// exactly the service binary's descriptor with `AT_EMPTY_PATH`.
pub fn loader_program(
    fragment: &[String],
    binary_slot: i32,
    tap_holder: bool,
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
    let mut extra = grant_rules(tap_holder)?;
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
        let p = service_program(&["pwrite64".to_string()], false).unwrap();
        assert!(!p.is_empty());
        assert_eq!(program_bytes(&p).len(), p.len() * 8);
        loader_program(&[], 9, false).unwrap();
        assert!(service_program(&[], true).unwrap().len() > p.len());
        loader_program(&[], 9, true).unwrap();
        assert!(matches!(
            service_program(&["nosuchcall".into()], false),
            Err(ProfileError::UnknownSyscall(_))
        ));
    }
}
