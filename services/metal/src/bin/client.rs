//! The metal client task: exercises the services it is granted and logs each result;
//! exits 0 only if every check passed.
#![no_std]
#![no_main]

extern crate alloc;

use ipc_defs::metal::BootGrant;
use ipc_defs::services::bytes::Bytes;
use ipc_defs::services::echo;
use ipc_defs::Interface;
use pv_metal_tasks::channel::CallError;
use pv_metal_tasks::channel::Client;
use pv_metal_tasks::log;
use pv_metal_tasks::sys;
use pv_metal_tasks::TaskBoot;

pv_metal_tasks::task_main!(main);

/// How long one call may take before it counts as a hang (ring-0 code is emulated on some
/// machines: calls are slow there, but never this slow).
const CALL_NS: u64 = 60_000_000_000;

fn deadline() -> u64 {
    sys::now_ns().saturating_add(CALL_NS)
}

fn main(boot: &TaskBoot) -> u64 {
    log!(
        "started (restart {}), {} slots",
        boot.restarts,
        boot.slots.len()
    );
    let mut failures = check_clock();
    let mut checked = 0;
    for (slot, s) in boot.slots.iter().enumerate() {
        let BootGrant::Client(interface) = s.grant else {
            continue;
        };
        match interface {
            Interface::Echo => match Client::at(boot, slot) {
                Some(mut echo) => failures += check_echo(&mut echo),
                None => {
                    log!("slot {}: cannot open the echo channel", slot);
                    failures += 1;
                }
            },
            other => {
                log!("slot {}: no check for {}", slot, other);
                continue;
            }
        }
        checked += 1;
    }
    if checked == 0 {
        log!("FAIL: no service to check");
        2
    } else if failures == 0 {
        log!("PASS: {} services checked", checked);
        0
    } else {
        log!("FAIL: {} checks failed", failures);
        1
    }
}

/// A wait on no bit returns at its deadline, not before; `yield` returns.
fn check_clock() -> u32 {
    let start = sys::now_ns();
    let bits = sys::wait(0, start + 50_000_000);
    sys::yield_now();
    let waited = sys::now_ns() - start;
    if bits != 0 || waited < 50_000_000 {
        log!(
            "FAIL wait: bits {} after {} ns (deadline 50 ms)",
            bits,
            waited
        );
        return 1;
    }
    log!("wait: deadline of 50 ms kept ({} ms)", waited / 1_000_000);
    0
}

/// Round trips, then each kind of fault on request: the call in flight fails with
/// PeerRestarted, the next one succeeds against the restarted server.
fn check_echo(echo: &mut Client<echo::Request, echo::Response>) -> u32 {
    let mut failures = 0;
    for i in 0..16u32 {
        let message = [i as u8; 100];
        match echo.call(
            echo::Request::Echo(Bytes::new(&message).unwrap()),
            deadline(),
        ) {
            Ok(echo::Response::Echo(back)) if back.as_slice() == message => {}
            other => {
                log!("echo round trip {}: {:?}", i, other);
                failures += 1;
            }
        }
    }
    log!("echo: 16 round trips checked");
    for kind in [
        echo::Fault::InvalidOpcode,
        echo::Fault::PageFault,
        echo::Fault::Privileged,
        echo::Fault::Exit,
    ] {
        let epoch = echo.epoch();
        match echo.call(echo::Request::Fault(kind), deadline()) {
            Err(CallError::PeerRestarted) => {}
            other => {
                log!(
                    "echo fault {:?}: expected PeerRestarted, got {:?}",
                    kind,
                    other
                );
                failures += 1;
            }
        }
        let message = b"after the restart";
        match echo.call(
            echo::Request::Echo(Bytes::new(message).unwrap()),
            deadline(),
        ) {
            Ok(echo::Response::Echo(back)) if back.as_slice() == message => {
                log!(
                    "echo fault {:?}: PeerRestarted, then served (epoch {} -> {})",
                    kind,
                    epoch.0,
                    echo.epoch().0
                );
            }
            other => {
                log!("echo after fault {:?}: {:?}", kind, other);
                failures += 1;
            }
        }
    }
    failures
}
