//! The exit policy: what happens to every guest exit that no device service owns, and the
//! gate through which device services raise guest interrupts. `main.rs` runs it as the
//! `pv-intercept` service.
//!
//! The library holds the platform devices intercept models itself ([`uart`]: COM1, a 16550;
//! [`pci`]: the conf1 configuration mechanism and its host bridge; [`platform`]: the i8042
//! reset line and the debug-exit port), the policy for everything else ([`policy`]: MSRs,
//! hypercalls, vCPU events, unclaimed ports and MMIO), the console the UART writes to
//! ([`console`]) and the request dispatch ([`server::Intercept`]). It has no OS code:
//! interrupts leave through [`server::InterruptSink`] and UART output through
//! [`server::Console`], which the tests replace by recorders.
//!
//! What it must never do: take a caller's identity or grant from a message (both come from the
//! channel the request arrived on), raise an interrupt the manifest did not grant the caller,
//! accept a guest exit from anyone but the guest partition ([`PARTITION`]), or panic on any
//! request, however malformed.
#![forbid(unsafe_code)]

pub mod console;
pub mod platform;
pub mod policy;
pub mod ratelimit;
pub mod server;

// The device models it serves (libraries of their own: `devices/`).
pub use pv_devices::pci_host as pci;
pub use pv_devices::uart16550 as uart;

pub use policy::GUEST_CRASHED;
pub use policy::HALTED_FOREVER;
pub use policy::HYPERVISOR_FAILED;
pub use server::Console;
pub use server::Counters;
pub use server::Intercept;
pub use server::InterruptSink;
pub use server::RaiseError;
pub use server::PARTITION;

/// The low byte of a value written by the guest: what an 8-bit device register takes from an
/// access of any size.
pub(crate) fn low_byte(value: u64) -> u8 {
    value.to_le_bytes()[0]
}
