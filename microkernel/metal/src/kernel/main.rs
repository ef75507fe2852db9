//! The metal microkernel: the paravisor's microkernel as a freestanding x86-64 kernel.
//!
//! It boots (PVH from QEMU, or our own partition's 64-bit entry), takes over the CPU (GDT,
//! TSS, IDT, its own page tables), then runs the tasks of the task table the image builder
//! linked in (`.pv_tasks`, made from `manifest.toml` by `paravisor metal build`): each in
//! ring 3 with its own address space holding its image, heap, stack, boot record and exactly
//! the channels and regions the table grants. Tasks talk over `ipc-defs` rings in shared
//! pages and wake each other with `notify`/`wait` system calls; a task that faults or
//! breaks a rule is stopped, its channels move to a new epoch, and it is restarted as its
//! policy says.
//!
//! `unsafe` is confined to the modules that touch the machine (`boot`, `cpu`, `log`,
//! `paging`, `apic`) and to the copy in and out of task memory; each block says why it holds.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

// The C runtime's memory functions (the image has no C library).
extern crate pv_freestanding;

mod boot;
mod clock;
mod cpu;
mod log;

use x86_64::instructions::port::Port;

/// The debug-exit port: our partition ends the run with the value written as its status;
/// QEMU's `isa-debug-exit` exits with `value * 2 + 1`.
const DEBUG_EXIT: u16 = 0xf4;

/// Status when the kernel itself fails (a panic, a fault in ring 0).
const KERNEL_FAILED: u8 = 0x70;

/// Ends the run with `status`.
pub fn exit(status: u8) -> ! {
    // SAFETY: the debug-exit port ends the VM; nothing else listens there.
    unsafe { Port::<u8>::new(DEBUG_EXIT).write(status) };
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

#[no_mangle]
extern "C" fn kernel_main(info: u64, kind: u64) -> ! {
    log::init();
    let machine = boot::machine(info, kind);
    defmt::info!(
        "pv-metal: entered by {}, command line {=str}",
        machine.entry,
        machine.cmdline.as_str()
    );
    for (start, end) in &machine.ram {
        defmt::info!("RAM {=u64:#x}..{=u64:#x}", start, end);
    }
    cpu::init();
    defmt::info!("descriptor tables loaded");
    exit(0);
}

/// Every trap (exception, interrupt, system call) lands here with its frame.
#[no_mangle]
extern "C" fn trap(frame: &mut cpu::TrapFrame) {
    if !frame.from_user() {
        defmt::error!(
            "kernel fault: vector {=u64} error {=u64:#x} at {=u64:#x}",
            frame.vector,
            frame.error,
            frame.rip
        );
        exit(KERNEL_FAILED);
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    defmt::error!("kernel panic: {}", defmt::Display2Format(info));
    exit(KERNEL_FAILED);
}

#[defmt::panic_handler]
fn defmt_panic() -> ! {
    exit(KERNEL_FAILED);
}
