//! The microkernel's side of the platform channel: a thread that answers the attest
//! service's report and derived-key requests with the simulated secure processor
//! ([`crate::platform`]) and the launch facts fixed at launch.
//!
//! The facts (measurement, policy, host data) come from the measured launch, never from a
//! request: a service can choose only the report data, the VMPL, and which facts and context
//! a derived key mixes in, as a guest can on hardware.
//!
//! What this channel never gives, whatever the client asks: a VMPL 0 report (the paravisor's
//! own evidence, what a key broker releases the tenant key to) and a key for a context the
//! microkernel reserves (`platform::RESERVED_CONTEXTS`: the datastore key's wrapping key).
//! The microkernel makes those itself with [`Platform`] in-process, a path no channel reaches.
//! A refusal is a typed error to the client, a warning in the log and a count (the holder's
//! REFUSED in `paravisor ps`).

use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ipc_defs::hosted::channel::ChannelMemory;
use ipc_defs::hosted::channel::ServerEnd;
use ipc_defs::hosted::channel::WaitPolicy;
use ipc_defs::services::bytes::Bytes;
use ipc_defs::services::platform::PlatformError;
use ipc_defs::services::platform::Request;
use ipc_defs::services::platform::Response;
use ipc_defs::services::platform::MICROKERNEL_VMPL;
use ipc_defs::services::platform::REPORT_DATA_LEN;

use crate::platform::Platform;
use crate::snp::LaunchFacts;
use crate::snp::ReportRequest;

/// How long the thread sleeps between looks at its stop flag when idle.
const IDLE: Duration = Duration::from_millis(200);
/// How long a reply waits for a client that does not drain its ring.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// What the platform knows about the launch.
#[derive(Debug, Clone, Copy)]
pub struct Launch {
    pub facts: LaunchFacts,
    pub host_data: [u8; 32],
    /// The launch's REPORT_ID: the same in every report of this launch.
    pub report_id: [u8; 32],
}

/// Answers one request from the channel's client.
pub fn answer(platform: &Platform, launch: &Launch, request: &Request) -> Response {
    match request {
        Request::Report { report_data, vmpl } => {
            if *vmpl > 3 {
                return Response::Error(PlatformError::BadVmpl(*vmpl));
            }
            if *vmpl == MICROKERNEL_VMPL {
                return Response::Error(PlatformError::ReservedVmpl);
            }
            let Ok(report_data) = <[u8; REPORT_DATA_LEN]>::try_from(report_data.as_slice()) else {
                return Response::Error(PlatformError::BadReportData);
            };
            let req = ReportRequest {
                report_data,
                measurement: launch.facts.measurement,
                host_data: launch.host_data,
                vmpl: u32::from(*vmpl),
                policy: launch.facts.policy,
                report_id: launch.report_id,
            };
            match platform.report(&req) {
                Ok(r) => {
                    Bytes::new(&r).map_or(Response::Error(PlatformError::Signing), Response::Report)
                }
                Err(e) => {
                    tracing::error!("platform: report not signed: {e}");
                    Response::Error(PlatformError::Signing)
                }
            }
        }
        Request::DerivedKey { select, context } => {
            if ipc_defs::services::platform::is_reserved_context(context.as_slice()) {
                return Response::Error(PlatformError::ReservedContext);
            }
            let key = zeroize::Zeroizing::new(platform.derived_key(
                *select,
                &launch.facts,
                context.as_slice(),
            ));
            Bytes::new(&key[..]).map_or(Response::Error(PlatformError::Signing), Response::Key)
        }
    }
}

/// Whether `response` refuses something reserved to the microkernel.
fn is_reserved_refusal(response: &Response) -> bool {
    matches!(
        response,
        Response::Error(PlatformError::ReservedVmpl | PlatformError::ReservedContext)
    )
}

/// Requests answered, and requests refused as reserved to the microkernel.
#[derive(Debug, Default)]
pub struct Counters {
    pub answered: AtomicU64,
    pub refused: AtomicU64,
}

/// The serving thread.
pub struct PlatformServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// For `ps` (the holder's REFUSED) and tests.
    pub counters: Arc<Counters>,
}

impl PlatformServer {
    /// Serves the channel `mem` (a second mapping of the channel the service `client`, the
    /// attest service, calls), in a thread confined by `filters` (installed before it reads a
    /// request; see [`crate::thread_filters::platform`]).
    pub fn start(
        mem: ChannelMemory,
        platform: Arc<Platform>,
        launch: Launch,
        client: String,
        filters: Vec<seccompiler::BpfProgram>,
    ) -> std::io::Result<PlatformServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (s, c) = (stop.clone(), counters.clone());
        let (ready, confined) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("platform".into())
            .spawn(move || {
                let installed = crate::thread_filters::install(&filters);
                let ok = installed.is_ok();
                let _ = ready.send(installed);
                if ok {
                    serve(ServerEnd::new(mem), &platform, &launch, &client, &s, &c);
                }
            })?;
        confined
            .recv()
            .map_err(|_| std::io::Error::other("the platform thread ended at start"))?
            .map_err(|e| {
                std::io::Error::other(format!("cannot confine the platform thread: {e}"))
            })?;
        Ok(PlatformServer {
            stop,
            thread: Some(thread),
            counters,
        })
    }
}

impl Drop for PlatformServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    mut end: ServerEnd,
    platform: &Platform,
    launch: &Launch,
    client: &str,
    stop: &AtomicBool,
    counters: &Counters,
) {
    // The epoch in which the ring was found broken: nothing is read until the supervisor
    // moves the channel on (it does when the client restarts).
    let mut broken_in = None;
    while !stop.load(Ordering::Acquire) {
        if broken_in.is_some_and(|e| e == end.memory().channel().epoch()) {
            std::thread::sleep(IDLE);
            continue;
        }
        broken_in = None;
        ipc_defs::hosted::channel::wait_any(&[end.request_ring()], WaitPolicy::BLOCKING, IDLE);
        loop {
            let incoming = match end.try_next() {
                Ok(Some(i)) => i,
                Ok(None) => break,
                Err(e) => {
                    // A client killed mid-write leaves a torn frame; the supervisor moves the
                    // channel to a new epoch when it restarts, which discards it.
                    tracing::warn!("platform channel: {e}; ignored until its client restarts");
                    broken_in = Some(end.memory().channel().epoch());
                    break;
                }
            };
            let response = match end.decode::<Request>(&incoming) {
                Some(request) => {
                    let response = answer(platform, launch, &request);
                    if let Response::Error(e) = &response {
                        if is_reserved_refusal(&response) {
                            counters.refused.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(
                                client,
                                "platform channel: refused {}: {e}",
                                match request {
                                    Request::Report { .. } => "a VMPL 0 report",
                                    Request::DerivedKey { .. } => "a key for a reserved context",
                                }
                            );
                        }
                    }
                    response
                }
                None => {
                    tracing::warn!(client, "platform channel: undecodable request refused");
                    Response::Error(PlatformError::Malformed)
                }
            };
            let _ = end.reply(&incoming, &response, REPLY_TIMEOUT);
            counters.answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::PermissionsExt;

    use ipc_defs::services::platform::FieldSelect;
    use ipc_defs::services::platform::DATASTORE_KEY_CONTEXT;

    use super::*;

    /// A platform with a fixed chip secret (no certificates: reports and keys need none).
    pub(crate) fn test_platform(tag: &str, secret: [u8; 64]) -> Platform {
        let dir = std::env::temp_dir().join(format!("pv-ps-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let secret_path = dir.join(crate::platform::CHIP_SECRET);
        std::fs::write(&secret_path, secret).unwrap();
        std::fs::set_permissions(&secret_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Platform::open(&dir).unwrap()
    }

    fn launch() -> Launch {
        Launch {
            facts: crate::snp::LaunchFacts {
                measurement: [3; 48],
                policy: crate::snp::POLICY,
                guest_svn: 0,
            },
            host_data: [0; 32],
            report_id: [1; 32],
        }
    }

    /// What a compromised attest service would ask for to speak as the paravisor (a VMPL 0
    /// report over data of its choosing) or to open the guest-state file (the datastore
    /// key's wrapping key): refused on the channel, whatever it selects; what the channel is
    /// for still works.
    #[test]
    fn the_channel_refuses_vmpl_0_and_the_datastore_keys_context() {
        let platform = test_platform("answer", [7; 64]);
        let launch = launch();
        let report = |vmpl| {
            answer(
                &platform,
                &launch,
                &Request::Report {
                    report_data: Bytes::new(&[0x5a; 64]).unwrap(),
                    vmpl,
                },
            )
        };
        assert_eq!(report(0), Response::Error(PlatformError::ReservedVmpl));
        assert!(is_reserved_refusal(&report(0)));
        assert_eq!(report(4), Response::Error(PlatformError::BadVmpl(4)));
        match report(1) {
            Response::Report(r) => assert_eq!(r.as_slice()[0x30], 1),
            other => panic!("{other:?}"),
        }
        for bits in 0..16u8 {
            let select = FieldSelect {
                policy: bits & 1 != 0,
                measurement: bits & 2 != 0,
                guest_svn: bits & 4 != 0,
                tcb: bits & 8 != 0,
            };
            let key = |context: &[u8]| {
                answer(
                    &platform,
                    &launch,
                    &Request::DerivedKey {
                        select,
                        context: Bytes::new(context).unwrap(),
                    },
                )
            };
            assert_eq!(
                key(&DATASTORE_KEY_CONTEXT),
                Response::Error(PlatformError::ReservedContext)
            );
            assert!(matches!(key(&[0x39; 32]), Response::Key(_)));
        }
    }
}
