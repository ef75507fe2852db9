//! `pv-vtpm`: the guest's TPM 2.0. It never opens files or sockets; its permanent state
//! reaches VMGS only through its vmgs channel, its volatile state goes to the checkpoint
//! region after every command.
//!
//! Capabilities expected: its control channel; the serving end of one `vtpm` channel per
//! client, each with its grant (commands at which localities, platform signals; the guest
//! partition's channel: the register interface for its vCPUs), which every request is checked
//! against, refusals counted and logged with the client's name; the calling end of a `vmgs`
//! channel (granted TPM_NVRAM); the region
//! `vtpm-checkpoint` (kept by the microkernel across restarts of this service); the calling
//! end of an `attest` channel, for the report that binds the TPM's attestation key (without
//! it the TPM serves unbound, and says so).
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::Duration;

use ipc_defs::capability::Grant;
use ipc_defs::endpoint;
use ipc_defs::endpoint::Response;
use ipc_defs::hosted::runtime;
use ipc_defs::hosted::runtime::SharedClient;
use ipc_defs::hosted::runtime::Started;
use ipc_defs::hosted::vmgs_client::VmgsCallError;
use ipc_defs::hosted::vmgs_client::VmgsClient;
use ipc_defs::hosted::CallError;
use ipc_defs::services::attest;
use ipc_defs::services::bytes::Bytes;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::services::vmgs::VmgsError;
use ipc_defs::services::vtpm;
use ipc_defs::services::vtpm::VtpmGrant;
use ipc_defs::Interface;
use pv_vtpm::binding;
use pv_vtpm::binding::Attester;
use pv_vtpm::libtpms::Engine;
use pv_vtpm::server::is_refusal;
use pv_vtpm::server::Clients;
use pv_vtpm::server::Tpm;
use pv_vtpm::state::PermanentStore;
use pv_vtpm::state::SharedNv;

/// The region the manifest grants for the checkpoint.
const CHECKPOINT_REGION: &str = "vtpm-checkpoint";
/// How long the attest service may take for a report: a signature, well within the
/// supervisor's watchdog (10 s), which this process does not answer while it waits.
const REPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reports asked for again after the attest service restarted under the request.
const REPORT_RETRIES: u32 = 3;

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
    let clients = Clients::from_grants(
        started
            .clients()
            .map(|(name, grant)| (name, vtpm_grant(grant))),
    );
    let mut tpm = match start(&mut started.context, clients) {
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
    let mut reports = AttestReports {
        attest: started.context.share_client(Interface::Attest),
        started: &mut started,
        shutdown: false,
    };
    let outcome = if tpm.continued() && binding::in_place(&mut tpm) {
        tracing::info!("attestation binding of this launch in place (restart within the launch)");
        None
    } else {
        Some(binding::bind(&mut tpm, &mut reports))
    };
    match outcome {
        None => {}
        Some(Ok(bound)) => tracing::info!(
            created = ?bound.created,
            "attestation binding: AK at {} (and the EK, derived) in the claims; report ({} bytes) in NV {}, claims ({} bytes, SHA-256 {}) in NV {}",
            binding::AK_HANDLE,
            bound.report.len(),
            binding::REPORT_INDEX,
            bound.claims.len(),
            hex(&bound.claims_sha256),
            binding::CLAIMS_INDEX,
        ),
        Some(Err(e)) => {
            tracing::warn!("no attestation binding: {e}; the TPM serves without one")
        }
    }
    if reports.shutdown {
        tracing::info!("shut down on request");
        return ExitCode::SUCCESS;
    }
    if let Some(why) = &tpm.fatal {
        tracing::error!("exiting so that a restart resumes from durable state: {why}");
        return ExitCode::FAILURE;
    }
    started.serve(
        Interface::Vtpm,
        move |_context, caller, request: vtpm::Request| {
            // Taken after its deadline to start: its client has told its own client that it
            // did not start (TPM_RC_RETRY), so it must not.
            if request
                .start_by()
                .is_some_and(|by| ipc_defs::hosted::sys::monotonic_ns() > by)
            {
                return Response::Service(vtpm::Response::Error(vtpm::VtpmError::Expired));
            }
            let what = describe(&request);
            let grant = vtpm_grant(caller.grant);
            let response = tpm.handle(&caller.name, &grant, request);
            if let vtpm::Response::Error(e) = &response {
                if is_refusal(&response) {
                    caller.refuse(format_args!("{what}: {e} (grants: {grant})"));
                }
            }
            if let Some(why) = &tpm.fatal {
                tracing::error!("exiting so that a restart resumes from durable state: {why}");
                std::process::exit(1);
            }
            Response::Service(response)
        },
    )
}

/// What a channel's grant lets its client ask of the TPM: nothing unless it is a vtpm grant.
fn vtpm_grant(grant: Grant) -> VtpmGrant {
    match grant {
        Grant::Vtpm(g) => g,
        _ => VtpmGrant::NONE,
    }
}

/// The request without its contents, for logs.
fn describe(request: &vtpm::Request) -> String {
    match request {
        vtpm::Request::Command { locality, .. } => format!("TPM command at locality {locality}"),
        vtpm::Request::Platform { signal, .. } => format!("platform signal {signal:?}"),
        vtpm::Request::Mmio(a) => format!("register access at {:#x} (vCPU {})", a.address, a.vcpu),
    }
}

fn start(
    context: &mut runtime::Context,
    clients: Clients,
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
    Tpm::start(
        engine,
        nv,
        VmgsPermanent(VmgsClient::shared(vmgs)),
        region,
        clients,
    )
}

/// Reports from the attest service, for the binding.
struct AttestReports<'a> {
    attest: Option<SharedClient>,
    started: &'a mut Started,
    /// The supervisor asked for shutdown while the binding ran (already acknowledged).
    shutdown: bool,
}

impl Attester for AttestReports<'_> {
    fn report(&mut self, report_data: &[u8; attest::REPORT_DATA_LEN]) -> Result<Vec<u8>, String> {
        // Asked to stop (answered while the keys were made): no new call that may wait.
        self.keep_alive();
        if self.shutdown {
            return Err("the supervisor asked this service to stop".into());
        }
        let attest_client = self.attest.clone().ok_or(
            "the manifest grants vtpm no attest channel (calls = [{ endpoint = \"attest\" }])",
        )?;
        let report_data = Bytes::new(report_data).ok_or("report data longer than 64 bytes")?;
        let request = endpoint::Request::Service(attest::Request::GetReport {
            report_data,
            vmpl: attest::SERVICE_VMPL,
        });
        let mut restarts = 0;
        loop {
            let reply: Result<endpoint::Response<attest::Response>, CallError> = attest_client
                .borrow_mut()
                .call_with(&request, REPORT_TIMEOUT);
            return match reply {
                Ok(Response::Service(attest::Response::Report(report))) => {
                    Ok(report.as_slice().to_vec())
                }
                Ok(Response::Service(attest::Response::Error(e))) => {
                    Err(format!("the attest service refused: {e}"))
                }
                Ok(Response::Service(_)) => {
                    Err("the attest service answered GetReport with something else".into())
                }
                Ok(Response::Error(code)) => Err(format!("the attest endpoint: {code}")),
                Ok(Response::Pong { .. } | Response::Guest(_)) => {
                    Err("the attest endpoint answered with something else".into())
                }
                Err(CallError::PeerRestarted { .. }) if restarts < REPORT_RETRIES => {
                    restarts += 1;
                    self.keep_alive();
                    continue;
                }
                Err(e) => Err(format!("the attest service did not answer: {e}")),
            };
        }
    }

    fn keep_alive(&mut self) {
        if !self.shutdown && !self.started.answer_control() {
            self.shutdown = true;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
