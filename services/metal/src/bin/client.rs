//! The metal client task: exercises the services it is granted and logs each result;
//! exits 0 only if every check passed.
#![no_std]
#![no_main]

extern crate alloc;

use ipc_defs::metal::BootGrant;
use ipc_defs::services::bytes::Bytes;
use ipc_defs::services::echo;
use ipc_defs::services::vmgs;
use ipc_defs::services::vmgs::FileId;
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
            Interface::Vmgs => match Client::at(boot, slot) {
                Some(mut vmgs) => failures += check_vmgs(&mut vmgs, file_arg(boot)),
                None => {
                    log!("slot {}: cannot open the vmgs channel", slot);
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

/// The VMGS file this client was granted (`vmgs-file=N` in its arguments; default 5,
/// ATTEST).
fn file_arg(boot: &TaskBoot) -> FileId {
    let id = boot
        .args
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("vmgs-file=")?.parse::<u32>().ok())
        .and_then(FileId::new);
    id.unwrap_or(FileId::ATTEST)
}

/// One call, retried once if the store restarted under it (a write or read is idempotent).
fn vmgs_call(
    vmgs: &mut Client<vmgs::Request, vmgs::Response>,
    request: vmgs::Request,
    what: &str,
) -> Result<vmgs::Response, CallError> {
    match vmgs.call(request.clone(), deadline()) {
        Err(CallError::PeerRestarted) => {
            log!(
                "vmgs {}: PeerRestarted (the store restarted); retrying",
                what
            );
            vmgs.call(request, deadline())
        }
        other => other,
    }
}

/// Writes a file, reads it back, reads it again (across a restart of the store, if it is
/// configured to fault), and is refused a file it was not granted.
fn check_vmgs(vmgs: &mut Client<vmgs::Request, vmgs::Response>, file: FileId) -> u32 {
    let mut failures = 0;
    let content: alloc::vec::Vec<u8> = (0..3000u32).map(|i| (i * 7 + 3) as u8).collect();
    let write = vmgs::Request::Write {
        file,
        total: content.len() as u32,
        offset: 0,
        data: vmgs::Chunk::new(&content).unwrap(),
    };
    match vmgs_call(vmgs, write, "write") {
        Ok(vmgs::Response::Written) => log!(
            "vmgs: wrote {} bytes to file {}",
            content.len(),
            file.index()
        ),
        other => {
            log!("FAIL vmgs write: {:?}", other);
            failures += 1;
        }
    }
    for round in ["read back", "read again"] {
        match vmgs_call(vmgs, vmgs::Request::Read { file, offset: 0 }, round) {
            Ok(vmgs::Response::Data { total, data })
                if total as usize == content.len() && data.as_slice() == content.as_slice() =>
            {
                log!(
                    "vmgs: {}: {} bytes, as written (epoch {})",
                    round,
                    total,
                    vmgs.epoch().0
                )
            }
            other => {
                log!("FAIL vmgs {}: {:?}", round, other);
                failures += 1;
            }
        }
    }
    let forbidden = FileId::HW_KEY_PROTECTOR;
    match vmgs_call(
        vmgs,
        vmgs::Request::Read {
            file: forbidden,
            offset: 0,
        },
        "forbidden read",
    ) {
        Ok(vmgs::Response::Error(vmgs::VmgsError::NotPermitted(f))) if f == forbidden => {
            log!("vmgs: a file not granted is refused")
        }
        other => {
            log!("FAIL vmgs read of a file not granted: {:?}", other);
            failures += 1;
        }
    }
    failures
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
