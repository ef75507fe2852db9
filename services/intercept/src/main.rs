//! `pv-intercept`: the exit policy and the platform devices (COM1, PCI conf1, i8042, debug
//! exit), and the gate for guest interrupts. It only answers `intercept::Request`: guest exits
//! from the guest partition (client `guest`), interrupt requests from device services. It
//! never sees VMGS keys or TPM state, never takes a caller's identity or grant from a message,
//! and raises no interrupt the manifest did not grant the asking service.
//!
//! Capabilities expected (from the bootstrap record): its control channel; the serving end of
//! one `intercept` channel per client (the partition's, and one per device service, carrying
//! that service's interrupt grant); one eventfd per guest interrupt the microkernel wired
//! (KVM irqfds; COM1 uses line 4). The guest's serial output goes to stdout, a line at a time.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::process::ExitCode;

use ipc_defs::endpoint::Response;
use ipc_defs::hosted::runtime;
use ipc_defs::services::intercept;
use ipc_defs::services::intercept::Interrupt;
use ipc_defs::Interface;
use pv_intercept::console::LineConsole;
use pv_intercept::server::is_refusal;
use pv_intercept::Intercept;
use pv_intercept::InterruptSink;
use pv_intercept::RaiseError;

/// The eventfds wired to guest interrupts: writing 1 raises one edge.
struct Eventfds(BTreeMap<Interrupt, File>);

impl InterruptSink for Eventfds {
    fn raise(&mut self, irq: Interrupt) -> Result<(), RaiseError> {
        let fd = self.0.get(&irq).ok_or(RaiseError::NotWired(irq))?;
        let mut fd: &File = fd;
        fd.write_all(&1u64.to_ne_bytes())
            .map_err(|error| RaiseError::Signal { irq, error })
    }
}

/// The service's state; at shutdown it writes out the console's last partial line and logs
/// what it did.
struct Service(Intercept<Eventfds, LineConsole<std::io::Stdout>>);

impl Drop for Service {
    fn drop(&mut self) {
        self.0.console_mut().finish();
        tracing::info!("{}", self.0.counters);
    }
}

fn main() -> ExitCode {
    let mut started = match runtime::enter() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("intercept: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    let wired: BTreeMap<Interrupt, File> = std::mem::take(&mut started.context.interrupts)
        .into_iter()
        .map(|(irq, fd)| (irq, File::from(fd)))
        .collect();
    tracing::info!(
        interrupts = %wired.keys().map(Interrupt::to_string).collect::<Vec<_>>().join(", "),
        "platform: COM1 at 0x3f8 (line 4), PCI conf1 at 0xcf8, i8042 at 0x60/0x64, debug exit at 0xf4"
    );
    let mut service = Service(Intercept::new(
        Eventfds(wired),
        LineConsole::new(std::io::stdout()),
    ));
    started.serve(
        Interface::Intercept,
        move |_context, caller, request: intercept::Request| {
            let kind = kind(&request);
            let response = service.0.handle(&caller.name, caller.grant, request);
            if let intercept::Response::Error(e) = &response {
                if is_refusal(&response) {
                    caller.refuse(format_args!("{kind}: {e}"));
                }
            }
            Response::Service(response)
        },
    )
}

/// The kind of a request, for refusal logs.
fn kind(request: &intercept::Request) -> &'static str {
    match request {
        intercept::Request::Io(_) => "access",
        intercept::Request::Msr { .. } => "msr",
        intercept::Request::Hypercall { .. } => "hypercall",
        intercept::Request::Event { .. } => "event",
        intercept::Request::Raise(_) => "raise",
    }
}
