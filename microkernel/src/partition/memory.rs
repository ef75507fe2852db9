//! Guest memory: RAM as one memfd at guest-physical 0, and the **shared window**, a second
//! memfd at [`SHARED_WINDOW_BASE`]: the memory a guest of a confidential VM shares with its
//! devices (queues, buffers). A device service the manifest gives `guest-memory =
//! "shared-window"` gets the window's memfd and nothing of RAM; `"all"` gets RAM's.

use std::fs::File;
use std::sync::Arc;

use vm_memory::FileOffset;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;

/// Guest RAM below the 32-bit MMIO hole (3 GiB .. 4 GiB holds the IOAPIC, the TPM, the LAPIC).
pub const MAX_RAM: u64 = 3 << 30;
/// Where the shared window sits: above the largest RAM, below the MMIO hole, inside the
/// loader's identity map of the low 4 GiB.
pub const SHARED_WINDOW_BASE: u64 = 0xB000_0000;
/// Bytes of the shared window.
pub const SHARED_WINDOW_SIZE: u64 = 4 << 20;
/// The memfds' names (what `/proc/PID/fd` of a service holding one shows).
pub const RAM_MEMFD: &str = "pv-guest-ram";
pub const SHARED_WINDOW_MEMFD: &str = "pv-guest-shared";

pub struct GuestRam {
    /// RAM and the shared window.
    pub memory: GuestMemoryMmap,
    pub file: Arc<File>,
    pub shared_window: Arc<File>,
    pub size: u64,
}

impl GuestRam {
    /// `size` bytes of zeroed RAM at guest-physical 0, and the zeroed shared window.
    pub fn new(size: u64) -> std::io::Result<GuestRam> {
        if size == 0 || size > MAX_RAM.min(SHARED_WINDOW_BASE) || !size.is_multiple_of(4096) {
            return Err(std::io::Error::other(format!(
                "guest RAM of {size} bytes: give a multiple of 4 KiB up to {} MiB",
                MAX_RAM.min(SHARED_WINDOW_BASE) >> 20
            )));
        }
        let fd = ipc_defs::hosted::sys::memfd(RAM_MEMFD, size)?;
        let file = Arc::new(File::from(fd));
        let window = ipc_defs::hosted::sys::memfd(SHARED_WINDOW_MEMFD, SHARED_WINDOW_SIZE)?;
        let shared_window = Arc::new(File::from(window));
        let memory = GuestMemoryMmap::from_ranges_with_files([
            (
                GuestAddress(0),
                size as usize,
                Some(FileOffset::from_arc(file.clone(), 0)),
            ),
            (
                GuestAddress(SHARED_WINDOW_BASE),
                SHARED_WINDOW_SIZE as usize,
                Some(FileOffset::from_arc(shared_window.clone(), 0)),
            ),
        ])
        .map_err(|e| std::io::Error::other(format!("mapping guest RAM: {e}")))?;
        Ok(GuestRam {
            memory,
            file,
            shared_window,
            size,
        })
    }
}
