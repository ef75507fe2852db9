//! The microkernel's side of the platform channel: a thread that answers the attest
//! service's report and derived-key requests with the simulated secure processor
//! ([`crate::platform`]) and the launch facts fixed at launch.
//!
//! The facts (measurement, policy, host data) come from the measured launch, never from a
//! request: a service can choose only the report data, the VMPL, and which facts and context
//! a derived key mixes in, as a guest can on hardware.

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
use ipc_defs::services::platform::REPORT_DATA_LEN;

use crate::platform::LaunchFacts;
use crate::platform::Platform;
use crate::platform::ReportRequest;

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

/// Answers one request.
pub fn answer(platform: &Platform, launch: &Launch, request: &Request) -> Response {
    match request {
        Request::Report { report_data, vmpl } => {
            if *vmpl > 3 {
                return Response::Error(PlatformError::BadVmpl(*vmpl));
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
            let key = zeroize::Zeroizing::new(platform.derived_key(
                *select,
                &launch.facts,
                context.as_slice(),
            ));
            Bytes::new(&key[..]).map_or(Response::Error(PlatformError::Signing), Response::Key)
        }
    }
}

/// The serving thread.
pub struct PlatformServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Requests answered (for `ps`-style counters and tests).
    pub answered: Arc<AtomicU64>,
}

impl PlatformServer {
    /// Serves the channel `mem` (a second mapping of the channel the attest service calls),
    /// in a thread confined by `filters` (installed before it reads a request; see
    /// [`crate::thread_filters::platform`]).
    pub fn start(
        mem: ChannelMemory,
        platform: Platform,
        launch: Launch,
        filters: Vec<seccompiler::BpfProgram>,
    ) -> std::io::Result<PlatformServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let (s, a) = (stop.clone(), answered.clone());
        let (ready, confined) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("platform".into())
            .spawn(move || {
                let installed = crate::thread_filters::install(&filters);
                let ok = installed.is_ok();
                let _ = ready.send(installed);
                if ok {
                    serve(ServerEnd::new(mem), &platform, &launch, &s, &a);
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
            answered,
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
    stop: &AtomicBool,
    answered: &AtomicU64,
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
                Some(request) => answer(platform, launch, &request),
                None => {
                    tracing::warn!("platform channel: undecodable request refused");
                    Response::Error(PlatformError::Malformed)
                }
            };
            let _ = end.reply(&incoming, &response, REPLY_TIMEOUT);
            answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}
