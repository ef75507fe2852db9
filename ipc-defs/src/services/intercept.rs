//! The exit policy's interface: what no device service owns goes here.
//!
//! Two kinds of client call `intercept`:
//! - the guest partition (the microkernel's vCPU threads, client name `guest`): accesses to
//!   unclaimed ports and MMIO and to the platform devices intercept models itself (16550 UART
//!   at 0x3F8, PCI conf1 at 0xCF8/0xCFC, i8042 at 0x60/0x64, debug-exit at
//!   [`DEBUG_EXIT_PORT`]), MSR accesses, hypercalls and vCPU events (shutdown, internal
//!   error, an exit the router cannot handle);
//! - device services, which ask it to raise an interrupt. Intercept raises only the lines and
//!   MSI vectors the manifest granted the caller (its channel's
//!   [`crate::capability::Grant::Interrupts`]); any other request is refused, logged with the
//!   caller's name and counted.

use serde::Deserialize;
use serde::Serialize;

use super::guest::Access;
use super::guest::Next;
use super::guest::Reply;

/// The debug-exit port: a guest that writes a byte here ends the run, and the byte becomes
/// `paravisor run`'s exit status (0 = pass). A 32-bit port, like QEMU's `isa-debug-exit`
/// placed at 0xF4, but the value is the status itself.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Exit status of a run whose guest triple-faulted (KVM_EXIT_SHUTDOWN): the guest crashed.
pub const GUEST_CRASHED: u8 = 0x7d;
/// Exit status of a run the hypervisor could not continue: a KVM internal error, a failed
/// VM entry, an exit the microkernel's router does not know, or a partition failure.
pub const HYPERVISOR_FAILED: u8 = 0x7e;
/// Exit status of a run whose guest halted with interrupts off, so that nothing can wake it
/// (what Linux does after `halt` or `poweroff` on a machine without ACPI power-off).
pub const HALTED_FOREVER: u8 = 0x7c;

/// The IOAPIC's inputs (GSIs) a line interrupt can name.
pub const IOAPIC_LINES: u8 = 24;

/// An interrupt a device can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Interrupt {
    /// An IOAPIC input (GSI 0..24), edge-triggered.
    Line(u8),
    /// A message-signalled interrupt with this vector (0x10..=0xFF), to the boot vCPU.
    Msi(u8),
}

impl core::fmt::Display for Interrupt {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Interrupt::Line(l) => write!(f, "line {l}"),
            Interrupt::Msi(v) => write!(f, "MSI vector {v:#x}"),
        }
    }
}

/// A set of interrupts (a grant).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptSet {
    /// Bit n: IOAPIC line n.
    pub lines: u32,
    /// Bit v: MSI vector v.
    pub msi: [u64; 4],
}

impl InterruptSet {
    pub const EMPTY: InterruptSet = InterruptSet {
        lines: 0,
        msi: [0; 4],
    };

    /// Adds `irq`; false if it is not a valid interrupt (line >= 24, MSI vector < 0x10).
    pub fn insert(&mut self, irq: Interrupt) -> bool {
        if !is_valid(irq) {
            return false;
        }
        match irq {
            Interrupt::Line(l) => self.lines |= 1 << l,
            Interrupt::Msi(v) => self.msi[usize::from(v / 64)] |= 1 << (v % 64),
        }
        true
    }

    pub fn contains(&self, irq: Interrupt) -> bool {
        is_valid(irq)
            && match irq {
                Interrupt::Line(l) => self.lines & (1 << l) != 0,
                Interrupt::Msi(v) => self.msi[usize::from(v / 64)] & (1 << (v % 64)) != 0,
            }
    }

    pub fn is_empty(&self) -> bool {
        self.lines == 0 && self.msi == [0; 4]
    }

    /// Every interrupt in the set, lines first.
    pub fn iter(&self) -> impl Iterator<Item = Interrupt> + '_ {
        (0..IOAPIC_LINES)
            .map(Interrupt::Line)
            .chain((0x10..=0xffu8).map(Interrupt::Msi))
            .filter(|i| self.contains(*i))
    }
}

/// Whether an interrupt names something that exists (vectors below 0x10 are exceptions).
pub fn is_valid(irq: Interrupt) -> bool {
    match irq {
        Interrupt::Line(l) => l < IOAPIC_LINES,
        Interrupt::Msi(v) => v >= 0x10,
    }
}

/// What the vCPU saw, for events that are not accesses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    Shutdown,
    /// KVM could not run or emulate the guest (suberror as KVM reports it).
    InternalError { suberror: u32 },
    /// KVM's entry into the guest failed (hardware reason).
    FailEntry { reason: u64 },
    /// The guest halted with interrupts off: it can never run again.
    HaltedForever,
    /// An exit reason the router does not know.
    Unhandled { reason: u32 },
}

/// What a client asks of intercept.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A guest access to a range no device service owns, or to intercept's own devices
    /// (guest partition only).
    Io(Access),
    /// `rdmsr` / `wrmsr` of an MSR the hypervisor does not handle itself (guest partition
    /// only). `write` is the value written; `None` is a read.
    Msr {
        vcpu: u32,
        index: u32,
        write: Option<u64>,
    },
    /// A hypercall the hypervisor passed up (guest partition only).
    Hypercall { vcpu: u32, nr: u64, args: [u64; 6] },
    /// A vCPU event that ends or may end the run (guest partition only).
    Event { vcpu: u32, event: Event },
    /// A device service asks for an interrupt.
    Raise(Interrupt),
}

/// The answer to an MSR access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MsrOutcome {
    /// The read returns this value / the write is accepted.
    Value(u64),
    /// Denied: the guest gets #GP.
    Fault,
}

/// The answer to a hypercall.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HypercallOutcome {
    /// The guest's RAX after the call.
    Return(u64),
}

/// What intercept answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Answer to [`Request::Io`].
    Io(Reply),
    /// Answer to [`Request::Msr`].
    Msr(MsrOutcome),
    /// Answer to [`Request::Hypercall`].
    Hypercall(HypercallOutcome),
    /// Answer to [`Request::Event`]: what the vCPU does now.
    Next(Next),
    /// The interrupt was raised.
    Raised,
    Error(InterceptError),
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InterceptError {
    /// The caller's grant does not include this interrupt.
    NotGranted(Interrupt),
    /// Only the guest partition may send accesses, MSRs, hypercalls and events.
    NotThePartition,
    /// The access is malformed (size not 1, 2, 4 or 8).
    BadAccess { size: u8 },
    /// The interrupt is granted but could not be delivered (its line is not wired).
    NotDelivered(Interrupt),
}

impl core::fmt::Display for InterceptError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            InterceptError::NotGranted(i) => {
                write!(f, "{i} is not granted to this caller by the manifest")
            }
            InterceptError::NotThePartition => {
                f.write_str("only the guest partition may send guest exits")
            }
            InterceptError::BadAccess { size } => write!(f, "access of {size} bytes"),
            InterceptError::NotDelivered(i) => write!(f, "{i} could not be delivered"),
        }
    }
}
