//! PCI configuration mechanism #1 ("conf1"): the address register at 0xCF8 and the data
//! window at 0xCFC..=0xCFF, and the functions behind it.
//!
//! Bus 0 holds one function: a host bridge at 00:00.0, so that Linux's type-1 probe
//! (`pci_check_type1`, `pci_sanity_check`) finds the mechanism and its bus scan finds a root.
//! Every other bus, device and function is empty: its configuration space reads all-ones
//! (the "no device" answer) and writes to it are dropped.
//!
//! Who answers a function's configuration accesses is a table of [`Slot`]s by [`Bdf`]. Today
//! every slot is modelled here; a later device service that owns a slot (a virtio or NVMe
//! function) becomes another kind of [`Slot`] whose accesses the dispatcher forwards to that
//! service, without changing the address decoding.
//!
//! Access rules (as on a PIIX/ICH chipset): the address register is a 32-bit register,
//! reached only by 32-bit accesses at 0xCF8; narrower or unaligned accesses to 0xCF8..=0xCFB
//! read all-ones and are dropped (Linux's probe writes a byte to 0xCFB and ignores the
//! result). A data access at 0xCFC + k of `size` bytes reaches the register bytes k..k+size
//! of the addressed dword; one that would cross the dword, or any data access while the
//! address register's enable bit (31) is clear, reads all-ones and is dropped.

use std::collections::BTreeMap;

use ipc_defs::services::guest::mask;

/// The configuration address register.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// The configuration data window (four ports).
pub const CONFIG_DATA: u16 = 0xcfc;
/// The last port of the mechanism.
pub const CONFIG_LAST: u16 = CONFIG_DATA + 3;

/// Address register bit 31: configuration accesses through the data window are enabled.
const ENABLE: u32 = 1 << 31;
/// The address register's implemented bits: enable, bus, device, function, dword register.
/// Bits 30:24 (reserved) and 1:0 (the dword's byte, always 0) read as zero.
const ADDRESS_BITS: u32 = 0x80ff_fffc;

/// A PCI function's address: bus, device (0..32), function (0..8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    bus: u8,
    device: u8,
    function: u8,
}

impl Bdf {
    /// The host bridge's address.
    pub const HOST_BRIDGE: Bdf = Bdf {
        bus: 0,
        device: 0,
        function: 0,
    };

    /// `None` if the device or function number is out of range.
    pub fn new(bus: u8, device: u8, function: u8) -> Option<Bdf> {
        (device < 32 && function < 8).then_some(Bdf {
            bus,
            device,
            function,
        })
    }

    /// The function the address register points at.
    fn of_address(address: u32) -> Bdf {
        let [_, devfn, bus, _] = address.to_le_bytes();
        Bdf {
            bus,
            device: devfn >> 3,
            function: devfn & 7,
        }
    }

    pub fn bus(&self) -> u8 {
        self.bus
    }

    pub fn device(&self) -> u8 {
        self.device
    }

    pub fn function(&self) -> u8 {
        self.function
    }
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

/// Who answers a function's configuration accesses.
#[derive(Debug)]
pub enum Slot {
    /// The host bridge, modelled here.
    HostBridge(HostBridge),
    // A later issue: `Service { .. }`, a function owned by a device service, to which the
    // dispatcher forwards the access.
}

impl Slot {
    /// Reads `size` bytes at `offset` (within one dword of the 256-byte space).
    fn read(&self, offset: u8, size: u8) -> u32 {
        match self {
            Slot::HostBridge(b) => b.space().read(offset, size),
        }
    }

    fn write(&mut self, offset: u8, size: u8, value: u32) {
        match self {
            Slot::HostBridge(b) => b.write(offset, size, value),
        }
    }
}

/// The host bridge: a type-0 header with class 0x060000 (bridge, host), no BARs, no
/// capabilities, no interrupt.
///
/// Its id is Red Hat's 0x1b36:0x0008, the id QEMU gives its generic host bridge (`gpex`):
/// a virtual bridge with no chipset registers behind it, for which Linux has no driver and no
/// quirks. An Intel (0x8086) id would make Linux and firmware take it for a real chipset (the
/// i440FX or Q35) and reach for that chipset's registers (PAM, SMRAM, stolen memory) that do
/// not exist here.
#[derive(Debug, Default)]
pub struct HostBridge {
    /// The command register, the only writable one.
    command: u16,
}

impl HostBridge {
    pub const VENDOR_ID: u16 = 0x1b36;
    pub const DEVICE_ID: u16 = 0x0008;
    /// Base class 0x06 (bridge), subclass 0x00 (host), programming interface 0.
    pub const CLASS: u32 = 0x06_00_00;
    /// Command bits a host bridge may have set: I/O and memory space, bus master, parity
    /// error response, SERR#, interrupt disable. The rest are hardwired to 0.
    const COMMAND_WRITABLE: u16 = 0x0547;

    /// The configuration space as it reads now.
    fn space(&self) -> ConfigSpace {
        let mut s = ConfigSpace([0; 256]);
        s.put(0x00, &Self::VENDOR_ID.to_le_bytes());
        s.put(0x02, &Self::DEVICE_ID.to_le_bytes());
        s.put(0x04, &self.command.to_le_bytes());
        // 0x06 status 0 (no capability list); 0x08 revision 0.
        s.put(0x09, &Self::CLASS.to_le_bytes()[..3]);
        // 0x0E header type 0, single function; BARs, subsystem, interrupt all 0.
        s
    }

    fn write(&mut self, offset: u8, size: u8, value: u32) {
        let bytes = value.to_le_bytes();
        let mut command = self.command.to_le_bytes();
        for (i, b) in bytes.iter().take(usize::from(size)).enumerate() {
            match usize::from(offset) + i {
                0x04 => command[0] = *b,
                0x05 => command[1] = *b,
                // Read-only (status bits are write-1-to-clear, and none is ever set).
                _ => {}
            }
        }
        self.command = u16::from_le_bytes(command) & Self::COMMAND_WRITABLE;
    }
}

/// A 256-byte configuration space image.
struct ConfigSpace([u8; 256]);

impl ConfigSpace {
    fn put(&mut self, offset: usize, bytes: &[u8]) {
        self.0[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    /// Little-endian read of `size` (1..=4) bytes at `offset`; bytes past the end read 0xff.
    fn read(&self, offset: u8, size: u8) -> u32 {
        let mut v = [0xff; 4];
        for (i, b) in v.iter_mut().take(usize::from(size)).enumerate() {
            if let Some(x) = self.0.get(usize::from(offset) + i) {
                *b = *x;
            }
        }
        u32::from_le_bytes(v) & (mask(size) as u32)
    }
}

/// The conf1 mechanism and the slot table behind it.
#[derive(Debug)]
pub struct Pci {
    address: u32,
    slots: BTreeMap<Bdf, Slot>,
}

impl Default for Pci {
    fn default() -> Self {
        Pci::new()
    }
}

impl Pci {
    /// The platform's PCI: a host bridge at 00:00.0 and nothing else.
    pub fn new() -> Pci {
        let mut slots = BTreeMap::new();
        slots.insert(Bdf::HOST_BRIDGE, Slot::HostBridge(HostBridge::default()));
        Pci { address: 0, slots }
    }

    /// Who answers accesses to `bdf`, if anyone.
    pub fn slot(&self, bdf: Bdf) -> Option<&Slot> {
        self.slots.get(&bdf)
    }

    /// A read of `size` bytes at `port` (one of [`CONFIG_ADDRESS`]..=[`CONFIG_LAST`]).
    pub fn read(&mut self, port: u16, size: u8) -> u64 {
        if port == CONFIG_ADDRESS && size == 4 {
            return u64::from(self.address);
        }
        match self.target(port, size) {
            Some((bdf, offset)) => match self.slots.get(&bdf) {
                Some(slot) => u64::from(slot.read(offset, size)),
                None => mask(size),
            },
            None => mask(size),
        }
    }

    /// A write of `size` bytes at `port`.
    pub fn write(&mut self, port: u16, size: u8, value: u64) {
        if port == CONFIG_ADDRESS && size == 4 {
            self.address = (value as u32) & ADDRESS_BITS;
            return;
        }
        if let Some((bdf, offset)) = self.target(port, size) {
            if let Some(slot) = self.slots.get_mut(&bdf) {
                slot.write(offset, size, (value & mask(size)) as u32);
            }
        }
    }

    /// If a data-window access reaches a function of a bus-0 device in `owned` (bit n:
    /// device n, owned by a device service), the configuration address to forward it to
    /// that service at (bus << 16 | device << 11 | function << 8 | register byte).
    pub fn owned_target(&self, port: u16, size: u8, owned: u32) -> Option<u32> {
        let (bdf, offset) = self.target(port, size)?;
        if bdf.bus() != 0 || owned & (1 << bdf.device()) == 0 || bdf == Bdf::HOST_BRIDGE {
            return None;
        }
        Some(u32::from(bdf.device()) << 11 | u32::from(bdf.function()) << 8 | u32::from(offset))
    }

    /// The function and register offset a data-window access reaches, if it reaches one.
    fn target(&self, port: u16, size: u8) -> Option<(Bdf, u8)> {
        if self.address & ENABLE == 0 {
            return None;
        }
        let byte = port.checked_sub(CONFIG_DATA)?;
        if byte > 3 || byte + u16::from(size) > 4 {
            return None;
        }
        let register = self.address.to_le_bytes()[0];
        Some((Bdf::of_address(self.address), register | byte as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(pci: &mut Pci, bus: u8, device: u8, function: u8, register: u8) {
        let a = ENABLE
            | u32::from(bus) << 16
            | u32::from(device) << 11
            | u32::from(function) << 8
            | u32::from(register);
        pci.write(CONFIG_ADDRESS, 4, a.into());
    }

    fn read(pci: &mut Pci, bdf: (u8, u8, u8), offset: u8, size: u8) -> u64 {
        select(pci, bdf.0, bdf.1, bdf.2, offset & 0xfc);
        pci.read(CONFIG_DATA + u16::from(offset & 3), size)
    }

    #[test]
    fn address_register_round_trips_only_as_a_dword() {
        let mut pci = Pci::new();
        pci.write(CONFIG_ADDRESS, 4, 0xffff_ffff);
        assert_eq!(pci.read(CONFIG_ADDRESS, 4), 0x80ff_fffc);
        assert_eq!(pci.read(CONFIG_ADDRESS, 2), 0xffff);
        assert_eq!(pci.read(CONFIG_ADDRESS + 3, 1), 0xff);
        pci.write(CONFIG_ADDRESS + 3, 1, 0x01);
        pci.write(CONFIG_ADDRESS, 2, 0);
        assert_eq!(pci.read(CONFIG_ADDRESS, 4), 0x80ff_fffc);
    }

    /// Linux's `pci_check_type1()` and `pci_sanity_check()` (arch/x86/pci/direct.c).
    #[test]
    fn linux_type1_probe_finds_the_mechanism_and_a_host_bridge() {
        let mut pci = Pci::new();
        pci.write(0xcfb, 1, 0x01);
        let saved = pci.read(CONFIG_ADDRESS, 4);
        pci.write(CONFIG_ADDRESS, 4, 0x8000_0000);
        assert_eq!(pci.read(CONFIG_ADDRESS, 4), 0x8000_0000);
        pci.write(CONFIG_ADDRESS, 4, saved);
        // PCI_CLASS_DEVICE (0x0A, 16 bits) of 00:00.0 is PCI_CLASS_BRIDGE_HOST.
        assert_eq!(read(&mut pci, (0, 0, 0), 0x0a, 2), 0x0600);
    }

    #[test]
    fn config_accesses_of_an_owned_device_are_forwarded_and_the_bridge_never_is() {
        let mut pci = Pci::new();
        let owned = 1 << 3;
        select(&mut pci, 0, 3, 1, 0x10);
        assert_eq!(
            pci.owned_target(CONFIG_DATA + 2, 2, owned),
            Some(3 << 11 | 1 << 8 | 0x12)
        );
        // Not owned, another bus, the host bridge, or the mechanism disabled: answered here.
        select(&mut pci, 0, 4, 0, 0);
        assert_eq!(pci.owned_target(CONFIG_DATA, 4, owned), None);
        select(&mut pci, 1, 3, 0, 0);
        assert_eq!(pci.owned_target(CONFIG_DATA, 4, owned), None);
        select(&mut pci, 0, 0, 0, 0);
        assert_eq!(pci.owned_target(CONFIG_DATA, 4, u32::MAX), None);
        pci.write(CONFIG_ADDRESS, 4, 3 << 11);
        assert_eq!(pci.owned_target(CONFIG_DATA, 4, owned), None);
    }

    #[test]
    fn host_bridge_identifies_itself() {
        let mut pci = Pci::new();
        assert_eq!(read(&mut pci, (0, 0, 0), 0, 4), 0x0008_1b36);
        assert_eq!(read(&mut pci, (0, 0, 0), 0, 2), 0x1b36);
        assert_eq!(read(&mut pci, (0, 0, 0), 2, 2), 0x0008);
        assert_eq!(read(&mut pci, (0, 0, 0), 0x08, 4), 0x0600_0000);
        assert_eq!(read(&mut pci, (0, 0, 0), 0x0b, 1), 0x06);
        // Header type 0, single function; no BARs; no capabilities.
        assert_eq!(read(&mut pci, (0, 0, 0), 0x0e, 1), 0);
        assert_eq!(read(&mut pci, (0, 0, 0), 0x10, 4), 0);
        assert_eq!(read(&mut pci, (0, 0, 0), 0x06, 2), 0);
        assert_eq!(read(&mut pci, (0, 0, 0), 0xfc, 4), 0);
    }

    #[test]
    fn host_bridge_is_read_only_except_the_command_register() {
        let mut pci = Pci::new();
        for offset in (0..=0xfc).step_by(4) {
            select(&mut pci, 0, 0, 0, offset);
            pci.write(CONFIG_DATA, 4, 0xffff_ffff);
        }
        assert_eq!(read(&mut pci, (0, 0, 0), 0, 4), 0x0008_1b36);
        assert_eq!(read(&mut pci, (0, 0, 0), 4, 4), 0x0000_0547);
        assert_eq!(read(&mut pci, (0, 0, 0), 0x10, 4), 0);
        select(&mut pci, 0, 0, 0, 4);
        pci.write(CONFIG_DATA + 1, 1, 0);
        assert_eq!(pci.read(CONFIG_DATA, 2), 0x0047);
        pci.write(CONFIG_DATA, 2, 0x0006);
        assert_eq!(pci.read(CONFIG_DATA, 4), 0x0006);
    }

    #[test]
    fn empty_slots_read_all_ones_and_drop_writes() {
        let mut pci = Pci::new();
        for (bdf, offset) in [
            ((0, 0, 1), 0),
            ((0, 1, 0), 0),
            ((0, 31, 7), 0x3c),
            ((1, 0, 0), 0),
        ] {
            assert_eq!(read(&mut pci, bdf, offset, 4), 0xffff_ffff);
            assert_eq!(read(&mut pci, bdf, offset, 2), 0xffff);
            assert_eq!(read(&mut pci, bdf, offset, 1), 0xff);
            pci.write(CONFIG_DATA, 4, 0);
            assert_eq!(read(&mut pci, bdf, offset, 4), 0xffff_ffff);
        }
        assert!(pci.slot(Bdf::new(0, 1, 0).unwrap()).is_none());
        assert!(pci.slot(Bdf::HOST_BRIDGE).is_some());
    }

    #[test]
    fn disabled_address_register_reads_all_ones() {
        let mut pci = Pci::new();
        pci.write(CONFIG_ADDRESS, 4, 0);
        assert_eq!(pci.read(CONFIG_DATA, 4), 0xffff_ffff);
        pci.write(CONFIG_DATA, 4, 0);
        select(&mut pci, 0, 0, 0, 4);
        assert_eq!(pci.read(CONFIG_DATA, 4), 0);
    }

    #[test]
    fn data_accesses_reach_their_bytes_and_never_cross_the_dword() {
        let mut pci = Pci::new();
        select(&mut pci, 0, 0, 0, 0);
        assert_eq!(pci.read(CONFIG_DATA + 1, 1), 0x1b);
        assert_eq!(pci.read(CONFIG_DATA + 2, 2), 0x0008);
        assert_eq!(pci.read(CONFIG_DATA + 1, 2), 0x081b);
        assert_eq!(pci.read(CONFIG_DATA + 2, 4), 0xffff_ffff);
        assert_eq!(pci.read(CONFIG_DATA + 3, 2), 0xffff);
        assert_eq!(pci.read(CONFIG_DATA, 8), u64::MAX);
    }

    #[test]
    fn bdf_names_only_real_functions() {
        assert!(Bdf::new(0, 32, 0).is_none());
        assert!(Bdf::new(0, 0, 8).is_none());
        assert_eq!(Bdf::new(1, 2, 3).unwrap().to_string(), "01:02.3");
    }
}
