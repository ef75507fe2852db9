//! What a device service's PCI function on our own partition is granted (storage's NVMe
//! function, net's virtio-net function), taken out of the service's bootstrap context: the
//! partition's shared window mapped as guest memory, the interrupt line the function raises,
//! the region its checkpoint lives in, and its doorbells' eventfd when granted. Every device
//! service with a partition function starts the same way; this is that start.

use std::fs::File;

use ipc_defs::hosted::runtime::Context;
use ipc_defs::hosted::shm::SharedMemory;
use ipc_defs::services::intercept::Interrupt;
use vm_memory::mmap::MmapRegion;
use vm_memory::FileOffset;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;
use vm_memory::GuestRegionMmap;

/// A partition function's grants.
pub struct FunctionGrants {
    /// The guest memory the function may reach (the shared window), mapped.
    pub memory: GuestMemoryMmap,
    /// The interrupt line it raises, and the eventfd that raises it; `None` when the
    /// manifest grants no line (the function then works without interrupts).
    pub irq: Option<(u8, File)>,
    /// Where its checkpoint lives (kept across the service's restarts).
    pub checkpoint: SharedMemory,
    /// The eventfd its armed doorbells signal, when the manifest grants doorbells.
    pub doorbells: Option<File>,
}

/// Takes the grants of the function `what` (for messages: "the NVMe function") out of
/// `context`, its checkpoint in the region named `checkpoint_region`. A missing grant is an
/// error that says what to grant.
pub fn take_grants(
    context: &mut Context,
    what: &str,
    checkpoint_region: &str,
) -> Result<FunctionGrants, String> {
    let memory = context.guest_memory.take().ok_or_else(|| {
        format!("{what} needs guest memory: give the service guest-memory = \"shared-window\"")
    })?;
    let file = File::from(memory.fd);
    // Never more than the file holds: a mapping past its end faults when touched.
    let size = file
        .metadata()
        .map_err(|e| format!("guest memory: {e}"))?
        .len()
        .min(memory.size);
    let size = usize::try_from(size).map_err(|_| "guest memory too large to map")?;
    let region = GuestRegionMmap::new(
        MmapRegion::from_file(FileOffset::new(file, 0), size)
            .map_err(|e| format!("mapping guest memory: {e}"))?,
        GuestAddress(memory.base),
    )
    .ok_or("guest memory overflows the address space")?;
    let memory =
        GuestMemoryMmap::from_regions(vec![region]).map_err(|e| format!("guest memory: {e}"))?;
    let irq = match std::mem::take(&mut context.interrupts).into_iter().next() {
        Some((Interrupt::Line(line), fd)) => Some((line, File::from(fd))),
        _ => None,
    };
    let checkpoint = context.regions.remove(checkpoint_region).ok_or_else(|| {
        format!("{what} keeps its state in a region \"{checkpoint_region}\": grant it")
    })?;
    let doorbells = context.doorbells.take().map(|d| File::from(d.fd));
    Ok(FunctionGrants {
        memory,
        irq,
        checkpoint,
        doorbells,
    })
}
