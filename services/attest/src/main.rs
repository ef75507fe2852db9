//! `pv-attest`: reports, the platform's certificate chain, derived keys bound to the caller,
//! runtime measurements, the launch log, and sealing of the VMGS datastore key (see the
//! library).
//!
//! Capabilities expected (from the bootstrap record): its control channel, the serving end of
//! one `attest` channel per client (the microkernel's own is named `paravisor`), the calling
//! end of the platform channel, the calls the manifest grants, and two read-only files: the
//! launch log (`launch-log`) and the platform's certificate chain (`platform-certs`).
#![forbid(unsafe_code)]

use std::os::unix::fs::FileExt;
use std::process::ExitCode;
use std::time::Duration;

use ipc_defs::endpoint;
use ipc_defs::hosted::runtime;
use ipc_defs::hosted::ClientEnd;
use ipc_defs::services::attest;
use ipc_defs::services::platform;
use ipc_defs::Interface;
use pv_attest::Attest;
use pv_attest::PlatformPort;

/// How long the platform may take for one request (a P-384 signature).
const PLATFORM_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest launch log or chain read from the files the microkernel grants.
const MAX_FILE: u64 = 4 << 20;

struct Channel(Option<ClientEnd<platform::Request, platform::Response>>);

impl PlatformPort for Channel {
    fn call(&mut self, request: &platform::Request) -> Result<platform::Response, String> {
        let end = self.0.as_mut().ok_or(
            "no platform capability (the manifest gives this service no `platform = true`)",
        )?;
        end.call(request, PLATFORM_TIMEOUT)
            .map_err(|e| e.to_string())
    }
}

fn read_granted(context: &mut runtime::Context, name: &str) -> Option<Vec<u8>> {
    let fd = context.files.remove(name)?;
    let file = std::fs::File::from(fd);
    let len = file.metadata().map(|m| m.len()).unwrap_or(0).min(MAX_FILE) as usize;
    let mut buf = vec![0u8; len];
    let mut at = 0;
    while at < len {
        match file.read_at(&mut buf[at..], at as u64) {
            Ok(0) => break,
            Ok(n) => at += n,
            Err(e) => {
                tracing::warn!("file \"{name}\": {e}");
                return None;
            }
        }
    }
    buf.truncate(at);
    Some(buf)
}

fn main() -> ExitCode {
    let mut started = match runtime::enter() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("attest: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    let chain = read_granted(&mut started.context, "platform-certs");
    let launch_log = read_granted(&mut started.context, "launch-log");
    let mut platform = Channel(started.context.platform.take());
    if platform.0.is_none() {
        tracing::warn!("no platform capability: reports and keys will be refused");
    }
    tracing::info!(
        chain = chain.as_ref().map_or(0, Vec::len),
        launch_log = launch_log.as_ref().map_or(0, Vec::len),
        "attestation ready"
    );
    let mut attest = Attest::new(chain, launch_log);
    started.serve::<attest::Request, attest::Response>(
        Interface::Attest,
        move |_context, caller, request| {
            let response = attest.handle(&mut platform, &caller.name, request);
            if matches!(
                response,
                attest::Response::Error(attest::AttestError::NotPermitted)
            ) {
                caller.refuse("a request reserved to the microkernel");
            }
            endpoint::Response::Service(response)
        },
    )
}
