//! `pv-attest`: measurements, attestation reports and sealing keys. It never touches guest devices; it only answers attest::Request.
//!
//! Capabilities expected (from the bootstrap record): its control channel, the serving end of
//! one `attest` channel per client the manifest allows, and the calling ends the manifest grants.
//! The service's own requests arrive with the issue that defines `ipc_defs::services::attest`;
//! until then its endpoint answers the common ping and the control interface, both handled by
//! the runtime, and nothing else exists to be asked.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use ipc_defs::hosted::runtime;
use ipc_defs::services::attest;
use ipc_defs::Interface;

fn main() -> ExitCode {
    runtime::run::<attest::Request, attest::Response>(
        Interface::Attest,
        |_context, _caller, request| match request {},
    )
}
