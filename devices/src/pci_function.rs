//! The configuration space of a PCI function that a device service owns on the partition
//! (intercept's host bridge forwards its accesses): identity, a command register, one fixed
//! 64-bit memory BAR (BAR 0/1) that still answers the sizing probe, the INTx pin and line,
//! and an optional capability list (vendor capabilities below 0x100: the configuration space
//! is 256 bytes, DEVICE-FACTS).
//!
//! The BAR's address is the manifest's `mmio` range, not the guest's to move: a write of an
//! address is ignored, a write of all ones asks the size, as the PCI specification's probe
//! does. What the guest may change ([`FunctionState`]) is small, serializable and checkpointed
//! by the service with the rest of its device.

use serde::Deserialize;
use serde::Serialize;

/// Command register bits.
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_BUS_MASTER: u16 = 1 << 2;
const COMMAND_INTERRUPT_DISABLE: u16 = 1 << 10;
/// The command bits a driver may set: memory space, bus master, interrupt disable.
const COMMAND_WRITABLE: u16 = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTERRUPT_DISABLE;
/// Status register: a capability list is present.
const STATUS_CAPABILITIES: u32 = 1 << 4;
/// BAR 0's type bits: 64-bit memory, not prefetchable.
const BAR_64: u32 = 0x4;
/// Where the capability list starts.
pub const CAPABILITIES_AT: usize = 0x40;
/// The configuration space's size.
const SPACE: usize = 256;

/// Who the function is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub vendor: u16,
    pub device: u16,
    /// Class code (base, sub, programming interface) << 8 | revision.
    pub class_revision: u32,
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// What the guest changes in the configuration space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionState {
    command: u16,
    /// A sizing write (all ones) to BAR 0 / BAR 1 is waiting for its read.
    sizing: [bool; 2],
    interrupt_line: u8,
}

/// One function's configuration space.
#[derive(Debug, Clone)]
pub struct PciFunction {
    identity: Identity,
    bar: u64,
    bar_size: u64,
    /// The capability list's bytes, from [`CAPABILITIES_AT`] (each capability's next pointer
    /// already set by whoever built them).
    capabilities: Vec<u8>,
    state: FunctionState,
}

impl PciFunction {
    /// A function whose BAR 0 sits at `bar` (`bar_size` bytes, a power of two of at least
    /// 16), on INTx line `line` (0xff: none), with `capabilities` (at most 0xc0 bytes).
    pub fn new(
        identity: Identity,
        bar: u64,
        bar_size: u64,
        line: u8,
        capabilities: Vec<u8>,
    ) -> Result<PciFunction, String> {
        if !bar_size.is_power_of_two() || bar_size < 16 {
            return Err(format!(
                "BAR size {bar_size:#x} is not a power of two of 16 or more"
            ));
        }
        if !bar.is_multiple_of(bar_size) {
            return Err(format!("BAR 0 at {bar:#x} is not {bar_size:#x}-aligned"));
        }
        if capabilities.len() > SPACE - CAPABILITIES_AT {
            return Err("the capability list does not fit below 0x100".into());
        }
        Ok(PciFunction {
            identity,
            bar,
            bar_size,
            capabilities,
            state: FunctionState {
                interrupt_line: line,
                ..FunctionState::default()
            },
        })
    }

    pub fn bar(&self) -> u64 {
        self.bar
    }

    pub fn bar_size(&self) -> u64 {
        self.bar_size
    }

    /// The offset of `address` in BAR 0, when the BAR decodes it (memory space enabled).
    pub fn bar_offset(&self, address: u64) -> Option<u64> {
        let offset = address.wrapping_sub(self.bar);
        (self.memory_enabled() && offset < self.bar_size).then_some(offset)
    }

    pub fn memory_enabled(&self) -> bool {
        self.state.command & COMMAND_MEMORY != 0
    }

    /// Whether the function may reach guest memory (DMA).
    pub fn bus_master(&self) -> bool {
        self.state.command & COMMAND_BUS_MASTER != 0
    }

    /// Whether the driver masked the INTx pin.
    pub fn interrupt_disabled(&self) -> bool {
        self.state.command & COMMAND_INTERRUPT_DISABLE != 0
    }

    pub fn state(&self) -> FunctionState {
        self.state
    }

    /// Takes up the state an earlier process checkpointed.
    pub fn restore(&mut self, state: FunctionState) {
        self.state = FunctionState {
            command: state.command & COMMAND_WRITABLE,
            ..state
        };
    }

    fn bytes(&self) -> [u8; SPACE] {
        let mut c = [0u8; SPACE];
        let mut put = |at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let id = &self.identity;
        put(0x00, u32::from(id.vendor) | u32::from(id.device) << 16);
        let status = if self.capabilities.is_empty() {
            0
        } else {
            STATUS_CAPABILITIES
        };
        put(0x04, u32::from(self.state.command) | status << 16);
        put(0x08, id.class_revision);
        let bar0 = if self.state.sizing[0] {
            !(self.bar_size as u32).wrapping_sub(1) | BAR_64
        } else {
            (self.bar as u32 & !0xf) | BAR_64
        };
        put(0x10, bar0);
        let bar1 = if self.state.sizing[1] {
            !((self.bar_size - 1) >> 32) as u32
        } else {
            (self.bar >> 32) as u32
        };
        put(0x14, bar1);
        put(
            0x2c,
            u32::from(id.subsystem_vendor) | u32::from(id.subsystem) << 16,
        );
        if !self.capabilities.is_empty() {
            put(0x34, CAPABILITIES_AT as u32);
        }
        // Interrupt line (the guest's to write), pin INTA.
        put(0x3c, u32::from(self.state.interrupt_line) | 1 << 8);
        c[CAPABILITIES_AT..CAPABILITIES_AT + self.capabilities.len()]
            .copy_from_slice(&self.capabilities);
        c
    }

    /// A configuration read of `size` bytes at `offset` (little-endian; past the space: 0).
    pub fn read(&self, offset: u64, size: u8) -> u64 {
        let c = self.bytes();
        let at = offset as usize;
        match c.get(at..at + usize::from(size)) {
            Some(bytes) => bytes.iter().rev().fold(0u64, |v, b| v << 8 | u64::from(*b)),
            None => 0,
        }
    }

    /// A configuration write: the command register, the interrupt line, and the BAR sizing
    /// probe; every other byte is read-only.
    pub fn write(&mut self, offset: u64, size: u8, value: u64) {
        for i in 0..u64::from(size) {
            let byte = (value >> (8 * i)) as u8;
            let command = &mut self.state.command;
            match offset + i {
                0x04 => *command = (*command & 0xff00 | u16::from(byte)) & COMMAND_WRITABLE,
                0x05 => *command = (*command & 0x00ff | u16::from(byte) << 8) & COMMAND_WRITABLE,
                0x3c => self.state.interrupt_line = byte,
                _ => {}
            }
        }
        for (bar, reg) in [(0, 0x10), (1, 0x14)] {
            if offset == reg && size == 4 {
                self.state.sizing[bar] = value as u32 == u32::MAX;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NVME: Identity = Identity {
        vendor: 0x1b36,
        device: 0x0010,
        class_revision: 0x0108_0202,
        subsystem_vendor: 0x1b36,
        subsystem: 0x0010,
    };

    #[test]
    fn a_fixed_64_bit_bar_answers_the_sizing_probe_and_stays_where_it_is() {
        let mut f = PciFunction::new(NVME, 0xfe00_0000, 0x4000, 10, Vec::new()).unwrap();
        assert_eq!(f.read(0, 4), 0x0010_1b36);
        assert_eq!(f.read(0x08, 4) >> 8, 0x01_08_02);
        assert_eq!(f.read(0x10, 4), 0xfe00_0004);
        f.write(0x10, 4, 0xffff_ffff);
        assert_eq!(f.read(0x10, 4), 0xffff_c004, "16 KiB");
        f.write(0x14, 4, 0xffff_ffff);
        assert_eq!(f.read(0x14, 4), 0xffff_ffff, "below 4 GiB");
        f.write(0x10, 4, 0x1234_0000);
        assert_eq!(f.read(0x10, 4), 0xfe00_0004, "the address stays");
        assert_eq!(f.read(0x3c, 2), 0x010a, "line 10, pin INTA");
        assert_eq!(f.read(0x06, 2) & 0x10, 0, "no capability list");
        assert_eq!(f.bar_offset(0xfe00_0008), None, "memory decoding off");
        f.write(0x04, 2, 0xffff);
        assert_eq!(
            f.read(0x04, 2),
            0x0406,
            "only memory, bus master, INTx disable"
        );
        assert_eq!(f.bar_offset(0xfe00_0008), Some(8));
        assert_eq!(f.bar_offset(0xfe00_4000), None);
        assert!(f.bus_master() && f.interrupt_disabled());
        let mut g = PciFunction::new(NVME, 0xfe00_0000, 0x4000, 10, Vec::new()).unwrap();
        g.restore(f.state());
        assert_eq!(g.read(0x04, 2), 0x0406);
    }

    #[test]
    fn a_capability_list_sits_at_0x40_and_the_status_says_so() {
        let caps = vec![0x09, 0x00, 0x04, 0x01];
        let f = PciFunction::new(NVME, 0xfe00_0000, 0x4000, 10, caps).unwrap();
        assert_eq!(f.read(0x06, 2) & 0x10, 0x10);
        assert_eq!(f.read(0x34, 1), 0x40);
        assert_eq!(f.read(0x40, 4), 0x0104_0009);
        assert_eq!(f.read(0x100, 4), 0, "past the space");
        assert!(PciFunction::new(NVME, 0xfe00_0000, 0x4000, 10, vec![0; 0xc1]).is_err());
        assert!(PciFunction::new(NVME, 0xfe00_1000, 0x4000, 10, Vec::new()).is_err());
        assert!(PciFunction::new(NVME, 0xfe00_0000, 0x3000, 10, Vec::new()).is_err());
    }
}
