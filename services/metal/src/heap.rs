//! The task's heap: the boot record's `heap` bytes at [`ipc_defs::metal::HEAP_BASE`], given
//! to a linked-list allocator (the kernel maps them, zeroed, before the task starts).

use ipc_defs::metal::TaskBoot;
use ipc_defs::metal::HEAP_BASE;

#[cfg(feature = "image")]
#[global_allocator]
static HEAP: linked_list_allocator::LockedHeap = linked_list_allocator::LockedHeap::empty();

/// Hands the heap to the allocator (once, before `main`).
pub fn init(boot: &TaskBoot) {
    #[cfg(feature = "image")]
    // SAFETY: the kernel mapped `boot.heap` bytes at HEAP_BASE for this task alone, and
    // nothing else uses them.
    unsafe {
        HEAP.lock().init(HEAP_BASE as *mut u8, boot.heap as usize);
    }
    let _ = (boot, HEAP_BASE);
}
