//! The metal microkernel: the paravisor's microkernel as a freestanding x86-64 kernel.
//!
//! It boots (PVH from QEMU, or our own partition's 64-bit entry), takes over the CPU (GDT,
//! TSS, IDT, its own page tables, the local APIC's timer), then runs the tasks of the task
//! table the image builder linked in (`.pv_tasks`, made from `manifest.toml` by `paravisor
//! metal build`): each in ring 3 with its own address space holding its image, heap, stack,
//! boot record and exactly the channels and regions the table grants. Tasks talk over
//! `ipc-defs` rings in shared pages and wake each other with `notify`/`wait`; a task that
//! faults or breaks a rule is stopped, its channels move to a new epoch, and it is restarted
//! as its policy says. The run ends when no task can ever run again.
//!
//! `unsafe` is confined to the modules that touch the machine (`boot`, `cpu`, `log`,
//! `paging`, `apic`, the FPU state here) and to the copies in and out of task memory
//! (`tasks`); each block says why it holds.
#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]

// The C runtime's memory functions (the image has no C library).
extern crate pv_freestanding;

mod apic;
mod boot;
mod clock;
mod cpu;
mod log;
mod paging;
mod tasks;

use ipc_defs::metal::TaskTable;
use pv_metal::frames::Frames;
use x86_64::instructions::interrupts;
use x86_64::instructions::port::Port;
use x86_64::registers::control::Cr0;
use x86_64::registers::control::Cr0Flags;
use x86_64::registers::control::Cr2;
use x86_64::registers::control::Cr4;
use x86_64::registers::control::Cr4Flags;
use x86_64::registers::model_specific::Efer;
use x86_64::registers::model_specific::EferFlags;

/// The debug-exit port: our partition ends the run with the value written as its status;
/// QEMU's `isa-debug-exit` exits with `value * 2 + 1`.
const DEBUG_EXIT: u16 = 0xf4;

/// Status when the kernel itself fails (a panic, a fault in ring 0, a bad task table).
const KERNEL_FAILED: u8 = 0x70;
/// Status when the run ended with a task that failed for good.
const TASK_FAILED: u8 = 1;

/// The task table `paravisor metal build` made (postcard, task images included).
#[link_section = ".pv_tasks"]
#[used]
static TABLE: [u8; include_bytes!(env!("PV_METAL_TABLE")).len()] =
    *include_bytes!(env!("PV_METAL_TABLE"));

/// The kernel has no heap. `object` (the ELF reader) names the `alloc` crate, which needs an
/// allocator to link; this one refuses every allocation (the kernel makes none: an attempt
/// would end in the panic handler).
struct NoHeap;

// SAFETY: `alloc` returns null (allocation failure), which GlobalAlloc allows; nothing is
// ever handed out, so `dealloc` has nothing to free.
unsafe impl core::alloc::GlobalAlloc for NoHeap {
    unsafe fn alloc(&self, _: core::alloc::Layout) -> *mut u8 {
        core::ptr::null_mut()
    }

    unsafe fn dealloc(&self, _: *mut u8, _: core::alloc::Layout) {}
}

#[global_allocator]
static NO_HEAP: NoHeap = NoHeap;

static FRAMES: spin::Mutex<Frames> = spin::Mutex::new(Frames::new());
static KERNEL: spin::Mutex<Option<tasks::Kernel>> = spin::Mutex::new(None);

extern "C" {
    static __kernel_start: u8;
    static __kernel_end: u8;
}

/// Ends the run with `status`.
pub fn exit(status: u8) -> ! {
    // SAFETY: the debug-exit port ends the VM; nothing else listens there.
    unsafe { Port::<u8>::new(DEBUG_EXIT).write(status) };
    loop {
        interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// Lets ring 3 use SSE (the host target's `core` does, in tasks), with each task's
/// registers saved and restored by the kernel; and turns on no-execute pages.
fn enable_fpu_and_nx() {
    // SAFETY: clearing EM and setting MP and OSFXSR/OSXMMEXCPT enables x87/SSE with
    // FXSAVE-format state; NXE makes the no-execute bit of page entries valid. Neither
    // changes what the kernel's own code does (it is built without SSE).
    unsafe {
        Cr0::update(|f| {
            f.remove(Cr0Flags::EMULATE_COPROCESSOR | Cr0Flags::TASK_SWITCHED);
            f.insert(Cr0Flags::MONITOR_COPROCESSOR);
        });
        Cr4::update(|f| f.insert(Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE));
        Efer::update(|f| f.insert(EferFlags::NO_EXECUTE_ENABLE));
    }
}

fn fxsave(area: &mut tasks::Fx) {
    // SAFETY: a 512-byte, 16-aligned area; FXSAVE writes exactly that.
    unsafe { core::arch::asm!("fxsave64 [{}]", in(reg) area.0.as_mut_ptr(), options(nostack)) };
}

fn fxrstor(area: &tasks::Fx) {
    // SAFETY: a 512-byte, 16-aligned area holding an FXSAVE image (the initial one, with a
    // valid MXCSR, or one FXSAVE wrote).
    unsafe { core::arch::asm!("fxrstor64 [{}]", in(reg) area.0.as_ptr(), options(nostack)) };
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
    cpu::init();
    enable_fpu_and_nx();
    let mut frames = FRAMES.lock();
    for &(start, end) in &machine.ram {
        frames.add(start.max(0x10_0000), end);
    }
    // Linker symbols: only their addresses are taken.
    let (image_start, image_end) = (
        &raw const __kernel_start as u64,
        &raw const __kernel_end as u64,
    );
    frames.reserve(image_start, image_end);
    defmt::info!(
        "memory: {=usize} free frames ({=u64} KiB), kernel image {=u64} KiB",
        frames.count(),
        frames.count() as u64 * 4,
        (image_end - image_start) / 1024
    );
    let paging = match paging::Kernel::init(&mut frames) {
        Ok(p) => p,
        Err(e) => {
            defmt::error!("kernel page tables: {}", e);
            exit(KERNEL_FAILED);
        }
    };
    let table = match TaskTable::decode(&TABLE) {
        Ok(t) => t,
        Err(_) => {
            defmt::error!("the task table in this image is not valid");
            exit(KERNEL_FAILED);
        }
    };
    defmt::info!(
        "task table: {=usize} tasks, {=usize} channels, {=usize} regions",
        table.tasks.len(),
        table.channels.len(),
        table.regions.len()
    );
    let mut kernel = match tasks::Kernel::new(table, paging, &mut frames) {
        Ok(k) => k,
        Err(e) => {
            defmt::error!("setting up channels and regions: {}", e);
            exit(KERNEL_FAILED);
        }
    };
    if kernel.tasks.is_empty() {
        defmt::info!("no task to run");
        exit(0);
    }
    for t in 0..kernel.tasks.len() {
        if kernel.start(t, &mut frames).is_err() {
            kernel.stop(t, tasks::Stop::LoadFailed, 0, &mut frames);
        }
    }
    apic::init();
    let first = match kernel.pick(kernel.tasks.len() - 1) {
        Some(t) => t,
        None => finish(&kernel),
    };
    kernel.current = first;
    kernel.paging.switch_to(kernel.root(first));
    let context = kernel.tasks[first].context;
    fxrstor(&kernel.tasks[first].fx);
    *KERNEL.lock() = Some(kernel);
    drop(frames);
    enter(&context);
}

/// Ends the run once no task can run again: 0 if every task that ended did so cleanly.
fn finish(kernel: &tasks::Kernel) -> ! {
    let clean = kernel.all_clean();
    defmt::info!(
        "no task can run any more: the run ends (clean: {=bool})",
        clean
    );
    exit(if clean { 0 } else { TASK_FAILED });
}

/// Enters ring 3 with `context`, on the trap stack (where every later trap lands).
fn enter(context: &cpu::TrapFrame) -> ! {
    let top = cpu::trap_stack_top();
    let frame = (top - core::mem::size_of::<cpu::TrapFrame>() as u64) as *mut cpu::TrapFrame;
    // SAFETY: the trap stack is the kernel's, unused now (no trap is being handled); the
    // frame goes where the CPU would have pushed one, and the common exit path pops it and
    // returns to ring 3 with `iretq`.
    unsafe {
        frame.write(*context);
        core::arch::asm!("mov rsp, {}", "jmp trap_return", in(reg) frame, options(noreturn));
    }
}

/// Every trap (exception, interrupt, system call) lands here with its frame.
#[no_mangle]
extern "C" fn trap(frame: &mut cpu::TrapFrame) {
    if !frame.from_user() {
        // Only the idle loop runs with interrupts on in ring 0.
        match frame.vector as u8 {
            cpu::TIMER_VECTOR => {
                clock::tick();
                apic::eoi();
                return;
            }
            cpu::SPURIOUS_VECTOR => return,
            _ => {
                defmt::error!(
                    "kernel fault: vector {=u64} error {=u64:#x} at {=u64:#x} (address {=u64:#x})",
                    frame.vector,
                    frame.error,
                    frame.rip,
                    Cr2::read_raw()
                );
                exit(KERNEL_FAILED);
            }
        }
    }
    let mut guard = KERNEL.lock();
    let Some(kernel) = guard.as_mut() else {
        exit(KERNEL_FAILED);
    };
    let mut frames = FRAMES.lock();
    let current = kernel.current;
    kernel.tasks[current].context = *frame;
    fxsave(&mut kernel.tasks[current].fx);
    let now = clock::now_ns();
    match frame.vector as u8 {
        cpu::TIMER_VECTOR => {
            clock::tick();
            apic::eoi();
        }
        cpu::SPURIOUS_VECTOR => {}
        ipc_defs::metal::SYSCALL_VECTOR => kernel.syscall(current, now, &mut frames),
        6 if kernel.syscall_by_ud(current) => kernel.syscall(current, now, &mut frames),
        _ => {
            let stop = tasks::Stop::Exception {
                vector: frame.vector,
                error: frame.error,
                rip: frame.rip,
                address: Cr2::read_raw(),
            };
            kernel.stop(current, stop, now, &mut frames);
        }
    }
    let next = loop {
        kernel.tick(clock::now_ns(), &mut frames);
        if let Some(t) = kernel.pick(current) {
            break t;
        }
        if !kernel.alive() {
            finish(kernel);
        }
        // Nothing to run: wait for the timer (its ring-0 handler only counts the tick).
        interrupts::enable_and_hlt();
        interrupts::disable();
    };
    kernel.paging.switch_to(kernel.root(next));
    kernel.current = next;
    *frame = kernel.tasks[next].context;
    fxrstor(&kernel.tasks[next].fx);
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    match info.location() {
        Some(l) => defmt::error!("kernel panic at {=str}:{=u32}", l.file(), l.line()),
        None => defmt::error!("kernel panic"),
    }
    exit(KERNEL_FAILED);
}

#[defmt::panic_handler]
fn defmt_panic() -> ! {
    exit(KERNEL_FAILED);
}
