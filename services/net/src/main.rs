//! `pv-net`: the guest NIC, translated to the host network backend. It never sees TPM or VMGS secrets; it only answers net::Request.
//!
//! Capabilities expected (from the bootstrap record): its control channel, the serving end of
//! one `net` channel per client the manifest allows, and the calling ends the manifest grants.
//! The service's own requests arrive with the issue that defines `ipc_defs::services::net`;
//! until then its endpoint answers the common ping and the control interface, both handled by
//! the runtime, and nothing else exists to be asked.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use ipc_defs::hosted::runtime;
use ipc_defs::services::net;
use ipc_defs::Interface;

fn main() -> ExitCode {
    runtime::run::<net::Request, net::Response>(Interface::Net, |_context, _caller, request| {
        match request {}
    })
}
