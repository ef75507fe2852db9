//! `pv-vtpm`: the guest's TPM 2.0, its state kept in VMGS. It never opens files or sockets; its state reaches VMGS only through its vmgs channel.
//!
//! Capabilities expected (from the bootstrap record): its control channel, the serving end of
//! one `vtpm` channel per client the manifest allows, and the calling ends the manifest grants.
//! The service's own requests arrive with the issue that defines `ipc_defs::services::vtpm`;
//! until then its endpoint answers the common ping and the control interface, both handled by
//! the runtime, and nothing else exists to be asked.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use ipc_defs::hosted::runtime;
use ipc_defs::services::vtpm;
use ipc_defs::Interface;

fn main() -> ExitCode {
    runtime::run::<vtpm::Request, vtpm::Response>(Interface::Vtpm, |_context, _caller, request| {
        match request {}
    })
}
