//! `pv-intercept`: vCPU exit policy, platform devices (serial, PCI config) and interrupt validation. It never sees VMGS keys or TPM state; it only answers intercept::Request.
//!
//! Capabilities expected (from the bootstrap record): its control channel, the serving end of
//! one `intercept` channel per client the manifest allows, and the calling ends the manifest grants.
//! The service's own requests arrive with the issue that defines `ipc_defs::services::intercept`;
//! until then its endpoint answers the common ping and the control interface, both handled by
//! the runtime, and nothing else exists to be asked.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use ipc_defs::hosted::runtime;
use ipc_defs::services::intercept;
use ipc_defs::Interface;

fn main() -> ExitCode {
    runtime::run::<intercept::Request, intercept::Response>(
        Interface::Intercept,
        |_context, _caller, request| match request {},
    )
}
