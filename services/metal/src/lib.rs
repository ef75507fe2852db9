//! The task runtime of the metal platform, and (in `src/bin`) the task programs.
//!
//! A task is entered in ring 3 at `_start` with its stack ready and its boot record at
//! [`ipc_defs::metal::BOOT_INFO`]. [`task_main!`] names the task's `main`, which gets the
//! decoded [`TaskBoot`]; returning from it exits with its status. The heap (the boot record's
//! size, at [`ipc_defs::metal::HEAP_BASE`]) backs `alloc`. [`sys`] holds the system calls and
//! [`channel`] the client and server ends over `ipc-defs` rings.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;
// The C runtime's memory functions (a task image has no C library).
extern crate pv_freestanding;

pub mod channel;
pub mod rng;
pub mod sys;

pub use ipc_defs::metal::TaskBoot;

/// Formats and logs a line through the kernel's log (at most [`ipc_defs::metal::MAX_LOG`]
/// bytes; longer lines are cut).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        let mut line = $crate::sys::Line::new();
        let _ = core::fmt::Write::write_fmt(&mut line, format_args!($($arg)*));
        $crate::sys::log(line.as_bytes());
    }};
}

/// The boot record of this task.
pub fn boot() -> Option<TaskBoot<'static>> {
    // SAFETY: the kernel maps the boot record's page read-only at BOOT_INFO before the task
    // starts and never unmaps or changes it while the task runs.
    let page = unsafe {
        core::slice::from_raw_parts(
            ipc_defs::metal::BOOT_INFO as *const u8,
            ipc_defs::metal::PAGE as usize,
        )
    };
    TaskBoot::decode(page)
}

/// Declares `$main: fn(&TaskBoot) -> u64` as the task's entry.
#[macro_export]
macro_rules! task_main {
    ($main:path) => {
        core::arch::global_asm!(
            ".section .text._start, \"ax\"",
            ".global _start",
            "_start:",
            "xor ebp, ebp",
            "call pv_task_start",
            "ud2",
            ".text",
        );

        #[no_mangle]
        extern "C" fn pv_task_start() -> ! {
            let status = match $crate::boot() {
                Some(boot) => {
                    $crate::heap::init(&boot);
                    $main(&boot)
                }
                None => 120,
            };
            $crate::sys::exit(status)
        }
    };
}

pub mod heap;

#[cfg(feature = "image")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    log!("panic: {}", info);
    sys::exit(101)
}
