//! A hostile task (tests only): does what its arguments name, each a way a compromised
//! service could try to reach beyond its grants. The kernel must stop it every time, and
//! say why; it logs `attempting ...` first, and `survived ...` if the attempt did not stop
//! it (which a test treats as a failure).
#![no_std]
#![no_main]

use core::arch::asm;

use ipc_defs::metal::BOOT_INFO;
use ipc_defs::metal::HEAP_BASE;
use ipc_defs::metal::IMAGE_BASE;
use pv_metal_tasks::log;
use pv_metal_tasks::TaskBoot;

pv_metal_tasks::task_main!(main);

fn main(boot: &TaskBoot) -> u64 {
    let attempt = boot.args;
    log!("attempting {}", attempt);
    if attempt == "hog" {
        // Keeps the CPU without a system call that gives it up, for two seconds: the timer
        // must preempt it, and every other task carry on meanwhile.
        let until = pv_metal_tasks::sys::now_ns() + 2_000_000_000;
        let mut spins = 0u64;
        while pv_metal_tasks::sys::now_ns() < until {
            for _ in 0..100_000 {
                spins = core::hint::black_box(spins + 1);
            }
        }
        log!("hog: done after {} spins", spins);
        return 0;
    }
    // SAFETY (each): every one of these is meant to fault; the kernel stops this task.
    unsafe {
        match attempt {
            // Another task's frames, and the kernel's, are only in the kernel's map.
            "read-kernel" => {
                let _ = core::ptr::read_volatile(0x10_0000 as *const u64);
            }
            "read-other-task" => {
                // Physical memory well above the kernel image, where the frames of the tasks
                // loaded before this one are, through the address the kernel reaches it at.
                for mib in 4..64u64 {
                    let _ = core::ptr::read_volatile((mib << 20) as *const u64);
                }
            }
            // There is no window onto the page tables: not the recursive slot, not the
            // kernel's identity map of their frames.
            "write-page-tables" => {
                core::ptr::write_volatile(0xFFFF_FF7F_BFDF_E000 as *mut u64, 0);
                core::ptr::write_volatile(0x1000 as *mut u64, 0);
            }
            "write-cr3" => asm!("mov cr3, {}", in(reg) 0u64),
            "privileged" => asm!("cli"),
            "port-io" => asm!("out dx, al", in("dx") 0xf4u16, in("al") 0u8),
            "write-code" => core::ptr::write_volatile(IMAGE_BASE as *mut u8, 0xC3),
            "write-boot-record" => core::ptr::write_volatile(BOOT_INFO as *mut u8, 0),
            "execute-heap" => {
                core::ptr::write_volatile(HEAP_BASE as *mut u8, 0xC3);
                let f: extern "C" fn() = core::mem::transmute(HEAP_BASE as usize);
                f();
            }
            "bad-slot" => {
                asm!("int 0x81", in("rax") 2u64, in("rdi") 15u64, options(nostack));
            }
            "bad-syscall" => {
                asm!("int 0x81", in("rax") 99u64, options(nostack));
            }
            "bad-buffer" => {
                // Log bytes from the kernel's memory.
                asm!("int 0x81", in("rax") 4u64, in("rdi") 0x10_0000u64, in("rsi") 64u64,
                     options(nostack));
            }
            other => {
                log!("unknown attempt {}", other);
                return 2;
            }
        }
    }
    log!("survived {}", attempt);
    1
}
