//! Guest RAM: one memfd (so that a later issue can grant a device service a window of it for
//! DMA), mapped into the microkernel and, through KVM, into the guest at guest-physical 0.

use std::fs::File;
use std::sync::Arc;

use vm_memory::FileOffset;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;

/// Guest RAM below the 32-bit MMIO hole (3 GiB .. 4 GiB holds the IOAPIC, the TPM, the LAPIC).
pub const MAX_RAM: u64 = 3 << 30;

pub struct GuestRam {
    pub memory: GuestMemoryMmap,
    pub file: Arc<File>,
    pub size: u64,
}

impl GuestRam {
    /// `size` bytes of zeroed RAM at guest-physical 0.
    pub fn new(size: u64) -> std::io::Result<GuestRam> {
        if size == 0 || size > MAX_RAM || !size.is_multiple_of(4096) {
            return Err(std::io::Error::other(format!(
                "guest RAM of {size} bytes: give a multiple of 4 KiB up to {} MiB",
                MAX_RAM >> 20
            )));
        }
        let fd = ipc_defs::hosted::sys::memfd("pv-guest-ram", size)?;
        let file = Arc::new(File::from(fd));
        let memory = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size as usize,
            Some(FileOffset::from_arc(file.clone(), 0)),
        )])
        .map_err(|e| std::io::Error::other(format!("mapping guest RAM: {e}")))?;
        Ok(GuestRam { memory, file, size })
    }
}
