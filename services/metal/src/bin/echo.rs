//! The echo service on metal: answers every `echo` request with its bytes, and faults on a
//! `Fault` request the way its caller asks (the fault-injection target of the tests).
#![no_std]
#![no_main]

use core::arch::asm;

use ipc_defs::endpoint::Response;
use ipc_defs::services::echo;
use ipc_defs::Interface;
use pv_metal_tasks::channel;
use pv_metal_tasks::log;
use pv_metal_tasks::sys;
use pv_metal_tasks::TaskBoot;

pv_metal_tasks::task_main!(main);

fn main(boot: &TaskBoot) -> u64 {
    log!("serving echo (start {})", boot.restarts);
    channel::serve(
        boot,
        Interface::Echo,
        |caller, request: echo::Request| match request {
            echo::Request::Echo(bytes) => Response::Service(echo::Response::Echo(bytes)),
            echo::Request::Fault(kind) => {
                log!("faulting on request of {}: {:?}", caller.name, kind);
                fault(kind)
            }
        },
    )
}

/// Stops this task the way `kind` says.
fn fault(kind: echo::Fault) -> ! {
    match kind {
        // SAFETY: `ud2` only raises #UD; the kernel stops this task.
        echo::Fault::InvalidOpcode => unsafe { asm!("ud2", options(noreturn)) },
        echo::Fault::PageFault => {
            // SAFETY: below the task window is the kernel's memory, never mapped for ring 3:
            // the read faults (#PF) and the kernel stops this task before it returns.
            let _ = unsafe { core::ptr::read_volatile(0x10_0000 as *const u64) };
        }
        // SAFETY: `hlt` in ring 3 raises #GP; the kernel stops this task.
        echo::Fault::Privileged => unsafe { asm!("hlt", options(noreturn)) },
        echo::Fault::Exit => sys::exit(3),
    }
    sys::exit(4)
}
