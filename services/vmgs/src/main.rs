//! `pv-vmgs`: the encrypted, crash-consistent guest-state file. It never sees the guest; it only answers vmgs::Request.
//!
//! Capabilities expected (from the bootstrap record): its control channel, the serving end of
//! one `vmgs` channel per client the manifest allows, and the calling ends the manifest grants.
//! The service's own requests arrive with the issue that defines `ipc_defs::services::vmgs`;
//! until then its endpoint answers the common ping and the control interface, both handled by
//! the runtime, and nothing else exists to be asked.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use ipc_defs::hosted::runtime;
use ipc_defs::services::vmgs;
use ipc_defs::Interface;

fn main() -> ExitCode {
    runtime::run::<vmgs::Request, vmgs::Response>(
        Interface::Vmgs,
        |_context, request| match request {},
    )
}
