//! One vCPU thread: run the vCPU, hand each exit to the router, resume with the answer.

use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::AtomicU8;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;

use ipc_defs::services::guest::Access;
use ipc_defs::services::guest::Next;
use ipc_defs::services::guest::Space;
use ipc_defs::services::intercept::Event;
use ipc_defs::services::intercept::HypercallOutcome;
use ipc_defs::services::intercept::MsrOutcome;
use kvm_ioctls::VcpuExit;
use kvm_ioctls::VcpuFd;
use serde::Serialize;

use super::router::RouteError;
use super::router::Router;
use super::router::IN_THREAD_PORT;

/// How a vCPU's run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Outcome {
    /// The guest (or the intercept policy) ended the run with this status.
    Exited(u8),
    /// The guest asked for a reset (i8042, triple fault policy, KVM system event).
    Reset,
    /// The partition could not go on; the text says why, with the vCPU's registers.
    Failed(String),
    /// Stopped from outside (shutdown).
    Stopped,
}

/// What `paravisor ps` shows of a vCPU.
#[derive(Debug, Default)]
pub struct VcpuStats {
    pub exits: AtomicU64,
    /// Exits answered in the vCPU thread (the benchmark port).
    pub in_thread: AtomicU64,
    /// 0 created, 1 running, 2 ended.
    pub state: AtomicU8,
    /// Set while the vCPU waits for a service's answer (the watchdog does not count that
    /// time as the guest being stuck).
    pub in_call: AtomicBool,
}

pub const STATE_RUNNING: u8 = 1;
pub const STATE_ENDED: u8 = 2;

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

fn fill(data: &mut [u8], value: u64) {
    let b = value.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

/// What the exit handler decided.
enum Step {
    Resume,
    End(Outcome),
    /// An event for intercept, after which the registers are dumped.
    Event(Event),
}

/// The vCPU's registers, for a failure report.
pub fn dump(vcpu: &VcpuFd) -> String {
    let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) else {
        return "registers unavailable".into();
    };
    format!(
        "rip {:#018x} rsp {:#018x} rflags {:#010x}\n\
         rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}\n\
         rsi {:#018x} rdi {:#018x} rbp {:#018x}\n\
         r8  {:#018x} r9  {:#018x} r10 {:#018x} r11 {:#018x}\n\
         r12 {:#018x} r13 {:#018x} r14 {:#018x} r15 {:#018x}\n\
         cs {:#06x} (dpl {}) ss {:#06x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}",
        r.rip,
        r.rsp,
        r.rflags,
        r.rax,
        r.rbx,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        r.rbp,
        r.r8,
        r.r9,
        r.r10,
        r.r11,
        r.r12,
        r.r13,
        r.r14,
        r.r15,
        s.cs.selector,
        s.cs.dpl,
        s.ss.selector,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer
    )
}

fn failed(vcpu: &VcpuFd, id: u32, why: impl std::fmt::Display) -> Outcome {
    Outcome::Failed(format!("vCPU {id}: {why}\n{}", dump(vcpu)))
}

fn next_step(next: Next) -> Step {
    match next {
        Next::Resume => Step::Resume,
        Next::Exit(status) => Step::End(Outcome::Exited(status)),
        Next::Reset => Step::End(Outcome::Reset),
        // The router resolves forwards and doorbell states before the vCPU sees an answer.
        Next::ForwardPciConfig { .. } | Next::Doorbells { .. } => Step::Resume,
    }
}

/// Runs vCPU `id` until the guest ends, the partition fails, or `stop` is set.
pub fn run(
    id: u32,
    mut vcpu: VcpuFd,
    router: &Mutex<Router>,
    stop: &AtomicBool,
    hung: &AtomicBool,
    stats: &Arc<VcpuStats>,
) -> Outcome {
    stats.state.store(STATE_RUNNING, Ordering::Relaxed);
    let run_area = super::kvm::RunArea::of(&mut vcpu);
    // Access numbers start at a random point: a device's record of an earlier partition's
    // access can never match one of this one.
    let mut seq = {
        let mut b = [0u8; 8];
        let _ = getrandom::getrandom(&mut b);
        u64::from_le_bytes(b) >> 1
    };
    let mut again = 0u32;
    let outcome = loop {
        if hung.load(Ordering::Relaxed) {
            break failed(
                &vcpu,
                id,
                "made no exit for the partition's watchdog period: the guest is stuck inside KVM \
                 (on KVM-on-PVM this is where a stock kernel ends up)",
            );
        }
        if stop.load(Ordering::Relaxed) {
            break Outcome::Stopped;
        }
        let mut access = |space: Space, address: u64, size: usize, write: Option<u64>| {
            seq += 1;
            let access = Access {
                vcpu: id,
                seq,
                space,
                address,
                size: size as u8,
                write,
            };
            stats.in_call.store(true, Ordering::Relaxed);
            let result = router
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .access(access);
            stats.in_call.store(false, Ordering::Relaxed);
            result
        };
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick, or KVM asking to be called again; never a hot loop.
                again += 1;
                if again > 100 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                continue;
            }
            Err(e) => break failed(&vcpu, id, format!("KVM_RUN failed: {e}")),
        };
        again = 0;
        stats.exits.fetch_add(1, Ordering::Relaxed);
        let step: Result<Step, RouteError> = match exit {
            VcpuExit::IoIn(port, data) if port == IN_THREAD_PORT => {
                data.fill(0);
                stats.in_thread.fetch_add(1, Ordering::Relaxed);
                Ok(Step::Resume)
            }
            VcpuExit::IoOut(port, _) if port == IN_THREAD_PORT => {
                stats.in_thread.fetch_add(1, Ordering::Relaxed);
                Ok(Step::Resume)
            }
            // String I/O (`rep ins`/`rep outs`) moves several accesses in one exit: each is
            // its own access, in order, stopping at the first that ends the run.
            VcpuExit::IoIn(port, data) => {
                // SAFETY: this is a KVM_EXIT_IO of this vCPU's last run.
                let size = unsafe { run_area.io_size() };
                let mut step = Ok(Step::Resume);
                for chunk in data.chunks_mut(size) {
                    step = access(Space::Port, u64::from(port), chunk.len(), None).map(|reply| {
                        fill(chunk, reply.value);
                        next_step(reply.next)
                    });
                    if !matches!(step, Ok(Step::Resume)) {
                        break;
                    }
                }
                step
            }
            VcpuExit::IoOut(port, data) => {
                // SAFETY: this is a KVM_EXIT_IO of this vCPU's last run.
                let size = unsafe { run_area.io_size() };
                let mut step = Ok(Step::Resume);
                for chunk in data.chunks(size) {
                    step = access(
                        Space::Port,
                        u64::from(port),
                        chunk.len(),
                        Some(le_value(chunk)),
                    )
                    .map(|reply| next_step(reply.next));
                    if !matches!(step, Ok(Step::Resume)) {
                        break;
                    }
                }
                step
            }
            VcpuExit::MmioRead(address, data) => access(Space::Mmio, address, data.len(), None)
                .map(|reply| {
                    fill(data, reply.value);
                    next_step(reply.next)
                }),
            VcpuExit::MmioWrite(address, data) => {
                access(Space::Mmio, address, data.len(), Some(le_value(data)))
                    .map(|reply| next_step(reply.next))
            }
            VcpuExit::X86Rdmsr(msr) => {
                let r = router.lock().unwrap_or_else(|p| p.into_inner());
                let mut r = r;
                r.msr(id, msr.index, None).map(|outcome| {
                    match outcome {
                        MsrOutcome::Value(v) => *msr.data = v,
                        MsrOutcome::Fault => *msr.error = 1,
                    }
                    Step::Resume
                })
            }
            VcpuExit::X86Wrmsr(msr) => {
                let mut r = router.lock().unwrap_or_else(|p| p.into_inner());
                r.msr(id, msr.index, Some(msr.data)).map(|outcome| {
                    if outcome == MsrOutcome::Fault {
                        *msr.error = 1;
                    }
                    Step::Resume
                })
            }
            VcpuExit::Hypercall(call) => {
                let mut r = router.lock().unwrap_or_else(|p| p.into_inner());
                r.hypercall(id, call.nr, call.args)
                    .map(|HypercallOutcome::Return(v)| {
                        *call.ret = v;
                        Step::Resume
                    })
            }
            VcpuExit::Shutdown => Ok(Step::Event(Event::Shutdown)),
            VcpuExit::InternalError => Ok(Step::Event(Event::InternalError { suberror: 0 })),
            VcpuExit::FailEntry(reason, _) => Ok(Step::Event(Event::FailEntry { reason })),
            VcpuExit::Hlt => Ok(Step::Event(Event::HaltedForever)),
            VcpuExit::SystemEvent(kind, _) => match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => Ok(Step::End(Outcome::Reset)),
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => Ok(Step::End(Outcome::Exited(0))),
                other => Ok(Step::Event(Event::Unhandled { reason: other })),
            },
            VcpuExit::IrqWindowOpen | VcpuExit::Intr => Ok(Step::Resume),
            other => Ok(Step::Event(Event::Unhandled {
                reason: exit_code(&other),
            })),
        };
        match step {
            Ok(Step::Resume) => {}
            Ok(Step::End(outcome)) => break outcome,
            Ok(Step::Event(event)) => {
                let registers = dump(&vcpu);
                tracing::error!(vcpu = id, ?event, "guest stopped:\n{registers}");
                let next = router
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .event(id, event.clone());
                break match next {
                    Ok(Next::Exit(status)) => Outcome::Exited(status),
                    Ok(Next::Reset) => Outcome::Reset,
                    Ok(Next::Resume | Next::ForwardPciConfig { .. } | Next::Doorbells { .. }) => {
                        Outcome::Failed(format!(
                            "vCPU {id}: {event:?} cannot be resumed\n{registers}"
                        ))
                    }
                    Err(RouteError::Stopping { .. }) => Outcome::Stopped,
                    Err(e) => Outcome::Failed(format!("vCPU {id}: {event:?}; {e}\n{registers}")),
                };
            }
            // An exit met the stop on its way to a service: the run was stopped, not failed.
            Err(RouteError::Stopping { .. }) => break Outcome::Stopped,
            Err(e) => break failed(&vcpu, id, e),
        }
    };
    stats.state.store(STATE_ENDED, Ordering::Relaxed);
    outcome
}

/// A number for an exit the router does not handle (KVM's exit reason where it is known).
fn exit_code(exit: &VcpuExit<'_>) -> u32 {
    match exit {
        VcpuExit::Unknown => kvm_bindings::KVM_EXIT_UNKNOWN,
        VcpuExit::Exception => kvm_bindings::KVM_EXIT_EXCEPTION,
        VcpuExit::Debug(_) => kvm_bindings::KVM_EXIT_DEBUG,
        VcpuExit::Nmi => kvm_bindings::KVM_EXIT_NMI,
        VcpuExit::IoapicEoi(_) => kvm_bindings::KVM_EXIT_IOAPIC_EOI,
        _ => u32::MAX,
    }
}
