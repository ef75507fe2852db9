//! Most of the partition's `unsafe`: telling KVM where guest RAM lives, and kicking a vCPU
//! thread out of `KVM_RUN` with a signal (the rest: `vcpu` reads a port exit's width).

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryBackend;
use vm_memory::GuestMemoryRegion;

use super::memory::GuestRam;

/// The signal that interrupts a vCPU's `KVM_RUN` (its handler does nothing: the point is the
/// `EINTR`).
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 1
}

extern "C" fn ignore(_: libc::c_int) {}

/// Installs the no-op handler for [`kick_signal`] (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler address and an empty mask is a valid
    // argument; `ignore` is async-signal-safe (it does nothing).
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = ignore as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(kick_signal(), &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sends the kick signal to `thread` (a vCPU thread, still running).
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live thread of this process (the caller joins it only after).
    unsafe {
        libc::pthread_kill(thread, kick_signal());
    }
}

/// The calling thread's pthread id.
pub fn current_thread() -> libc::pthread_t {
    // SAFETY: no arguments, always succeeds.
    unsafe { libc::pthread_self() }
}

/// Maps every region of `ram` into the VM at its guest-physical address.
pub fn register_ram(vm: &VmFd, ram: &GuestRam) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in ram.memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| kvm_ioctls::Error::new(libc::EFAULT))?;
        let entry = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping is owned by `ram`, which the partition keeps alive as long as
        // the VM (it drops the VM first); it is `memory_size` bytes long and not handed to KVM
        // twice.
        unsafe { vm.set_user_memory_region(entry)? };
    }
    Ok(())
}

/// Where a vCPU's `kvm_run` structure is mapped (read after an exit by
/// [`RunArea::io_size`]). Not `Send`: it belongs to the vCPU's thread.
pub struct RunArea(*const kvm_bindings::kvm_run);

impl RunArea {
    pub fn of(vcpu: &mut kvm_ioctls::VcpuFd) -> RunArea {
        RunArea(vcpu.get_kvm_run() as *const kvm_bindings::kvm_run)
    }

    /// The width of one port access of the current KVM_EXIT_IO (string I/O moves `count` of
    /// them in one exit).
    ///
    /// # Safety
    /// The vCPU this area was taken from must still exist, and its last `KVM_RUN` must have
    /// ended with KVM_EXIT_IO (so that `io` is the union field KVM filled).
    pub unsafe fn io_size(&self) -> usize {
        // SAFETY: per the function's contract: the mapping is alive and holds an I/O exit.
        let size =
            unsafe { std::ptr::read_volatile(&raw const (*self.0).__bindgen_anon_1.io.size) };
        usize::from(size).max(1)
    }
}
