//! What the guest partition sends a service that owns a guest address range: one access of
//! the guest to a port or MMIO range the manifest granted that service (`pio` / `mmio`), and
//! what the vCPU does next.
//!
//! The microkernel's exit router numbers the accesses of each vCPU (`seq`, increasing). A
//! router whose call failed because the service restarted sends the same access with the same
//! number again; a device whose registers have side effects (a FIFO read pops a byte) keeps the
//! number and reply of its last access in its crash checkpoint and answers a repeat from
//! there, so an access is never applied twice.

use serde::Deserialize;
use serde::Serialize;

/// Which address space an access is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Space {
    /// x86 port I/O (`in` / `out`), 16-bit addresses.
    Port,
    /// Memory-mapped I/O: a guest-physical address no RAM is mapped at.
    Mmio,
    /// The configuration space of a PCI function the service owns, forwarded by intercept's
    /// host bridge: `address` = bus << 16 | device << 11 | function << 8 | register (byte
    /// offset).
    PciConfig,
}

/// One guest access, as the vCPU made it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// The vCPU that made it.
    pub vcpu: u32,
    /// Per-vCPU access number (see the module header).
    pub seq: u64,
    pub space: Space,
    /// The port or guest-physical address accessed (absolute, not an offset).
    pub address: u64,
    /// 1, 2, 4 or 8 bytes.
    pub size: u8,
    /// The value written (little-endian, `size` bytes significant); `None` for a read.
    pub write: Option<u64>,
}

impl Access {
    /// Whether `size` is one the hardware can produce.
    pub fn size_is_valid(&self) -> bool {
        matches!(self.size, 1 | 2 | 4 | 8)
    }

    /// The value written, cut to the access size.
    pub fn written(&self) -> Option<u64> {
        self.write.map(|v| v & mask(self.size))
    }
}

/// The all-ones value of an access of `size` bytes (what an unowned read returns).
pub fn mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

/// What becomes of the vCPU after an access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Next {
    /// Resume the guest.
    Resume,
    /// End the run with this status (the guest wrote the debug-exit port, or the intercept
    /// policy ended it): `paravisor run` exits with it.
    Exit(u8),
    /// Reset the machine (i8042 reset line, or a triple fault under a reset policy).
    Reset,
    /// (From intercept's host bridge only.) The access is a configuration access of a PCI
    /// function another service owns: the partition sends it to that service as a
    /// [`Space::PciConfig`] access at `address`, and that answer is the access's answer.
    ForwardPciConfig { address: u32 },
    /// (From a device with a `doorbells` grant only.) Resume, and deliver the device's
    /// doorbell writes as signals of its doorbell eventfd (`armed`) or as accesses (not).
    /// The device says it in every answer: the partition changes the wiring only when the
    /// state differs, so an answer repeated after a restart is harmless.
    Doorbells { armed: bool },
}

/// The answer to an [`Access`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// The value a read returns (ignored for writes).
    pub value: u64,
    pub next: Next,
}

impl Reply {
    pub const fn read(value: u64) -> Reply {
        Reply {
            value,
            next: Next::Resume,
        }
    }

    pub const WRITTEN: Reply = Reply {
        value: 0,
        next: Next::Resume,
    };
}
