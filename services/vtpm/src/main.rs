//! `pv-vtpm`: the guest's TPM 2.0. It never opens files or sockets; its permanent state
//! reaches VMGS only through its vmgs channel, its volatile state goes to the checkpoint
//! region after every command.
//!
//! Capabilities expected: its control channel; the serving end of one `vtpm` channel per
//! client; the calling end of a `vmgs` channel (granted TPM_NVRAM); the region
//! `vtpm-checkpoint` (kept by the microkernel across restarts of this service).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use ipc_defs::endpoint::Response;
use ipc_defs::hosted::runtime;
use ipc_defs::hosted::vmgs_client::VmgsCallError;
use ipc_defs::hosted::vmgs_client::VmgsClient;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::services::vmgs::VmgsError;
use ipc_defs::services::vtpm;
use ipc_defs::Interface;
use pv_vtpm::libtpms::Engine;
use pv_vtpm::server::Tpm;
use pv_vtpm::state::PermanentStore;
use pv_vtpm::state::SharedNv;

/// The region the manifest grants for the checkpoint.
const CHECKPOINT_REGION: &str = "vtpm-checkpoint";

/// The permanent state in VMGS file TPM_NVRAM.
struct VmgsPermanent(VmgsClient);

impl PermanentStore for VmgsPermanent {
    fn read(&mut self) -> Result<Option<Vec<u8>>, String> {
        match self.0.read(FileId::TPM_NVRAM) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(VmgsCallError::Vmgs(VmgsError::NotFound(_))) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.0
            .write(FileId::TPM_NVRAM, bytes)
            .map_err(|e| e.to_string())
    }
}

fn main() -> ExitCode {
    // Before the service's seccomp profile (which allows no openat) is in force.
    pv_vtpm::libtpms::preload_crypto_config();
    let mut started = match runtime::enter() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vtpm: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    // The supervisor's start handshake first: loading the state may take a while.
    started.answer_first_ping();
    let mut tpm = match start(&mut started.context) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // `--startup-clear` (manifest `args`): a fresh TPM is started as firmware would start
    // it, so that tools can use it at once. Not after a resume: it was started before.
    if !tpm.continued() && std::env::args().any(|a| a == "--startup-clear") {
        if let Err(e) = tpm.startup_clear() {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    }
    tracing::info!(
        resumed = tpm.resumed,
        "TPM 2.0 (libtpms) {}",
        if tpm.resumed {
            "resumed from its checkpoint"
        } else {
            "started"
        }
    );
    started.serve(
        Interface::Vtpm,
        move |_context, caller, request: vtpm::Request| {
            let response = tpm.handle(&caller.name, request);
            if let Some(why) = &tpm.fatal {
                tracing::error!("exiting so that a restart resumes from durable state: {why}");
                std::process::exit(1);
            }
            Response::Service(response)
        },
    )
}

fn start(
    context: &mut runtime::Context,
) -> Result<Tpm<VmgsPermanent, ipc_defs::hosted::SharedMemory>, String> {
    let region = context
        .regions
        .remove(CHECKPOINT_REGION)
        .ok_or_else(|| format!("the manifest grants no region \"{CHECKPOINT_REGION}\""))?;
    let vmgs = context
        .share_client(Interface::Vmgs)
        .ok_or("the manifest grants no vmgs channel")?;
    let nv = SharedNv::default();
    let engine = Engine::take(Box::new(nv.clone()))
        .ok_or("the TPM engine is already in use")?
        .map_err(|rc| format!("libtpms refused TPM 2.0 ({rc:#x})"))?;
    Tpm::start(engine, nv, VmgsPermanent(VmgsClient::shared(vmgs)), region)
}
