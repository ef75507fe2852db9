//! The gateway's calls to the TPM: one request at a time, answered while the gateway keeps
//! answering its own control channel, sent again (with its number) when the TPM restarted
//! under it, and refused at once while the TPM takes nothing.

use std::time::Duration;

use ipc_defs::endpoint;
use ipc_defs::hosted::runtime;
use ipc_defs::hosted::CallError;
use ipc_defs::hosted::ClientEnd;
use ipc_defs::hosted::Sent;
use ipc_defs::layout::ServerState;
use ipc_defs::services::vtpm;

/// Longest a TPM command may take (RSA key generation on a slow machine); the TPM's own
/// watchdog (10 s by default) ends a longer one first.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a request is sent again after the TPM restarted under it: a TPM in a crash loop
/// is marked failed by the supervisor long before (its channel then says `Gone`).
const RESENDS: usize = 64;
/// How long a request may wait in the ring of a TPM marked unresponsive before its client is
/// told TPM_RC_RETRY: well within the default watchdog (10 s), far longer than a command
/// waits behind another.
const START_WITHIN: Duration = Duration::from_secs(3);
/// Longest wait for the TPM's answer between two looks at the control channel: the
/// supervisor pings every second and gives the answer 100 ms.
const CONTROL_EVERY: Duration = Duration::from_millis(20);

pub(crate) type Tpm =
    ClientEnd<endpoint::Request<vtpm::Request>, endpoint::Response<vtpm::Response>>;

/// The TPM's channel as the gateway uses it.
pub(crate) struct TpmLink {
    pub(crate) end: Tpm,
    /// A request the gateway stopped waiting for while the TPM had not taken it, past its
    /// deadline to start (its client was told TPM_RC_RETRY). While it is still in the ring
    /// (same epoch, not taken), the TPM takes nothing: requests are not sent but answered
    /// "not started" at once.
    pub(crate) abandoned: Option<Sent>,
    /// Whether the TPM is powered on, as the last power signal it answered left it (`None`:
    /// not known, e.g. before any).
    pub(crate) powered: Option<bool>,
}

/// How a request to the TPM ended (returned once per request, never stored: its size, a
/// response's, costs nothing).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The TPM's answer.
    Answer(vtpm::Response),
    /// The TPM did not start it and never will (it is up but takes nothing): the client may
    /// send it again.
    NotStarted,
    /// Whether it was carried out is unknown (the TPM is gone for good, or the channel
    /// failed).
    Unknown(CallError),
    /// The supervisor asked the gateway to stop meanwhile (already acknowledged).
    Shutdown,
}

impl TpmLink {
    /// Whether `signal` would leave the TPM exactly as it is (as far as the gateway knows).
    pub(crate) fn changes_nothing(&self, signal: vtpm::Platform) -> bool {
        match signal {
            vtpm::Platform::NvOn | vtpm::Platform::CancelOff => true,
            vtpm::Platform::PowerOn => self.powered == Some(true),
            _ => false,
        }
    }

    /// Keeps track of the power state from the answers to power signals.
    pub(crate) fn observe(&mut self, signal: vtpm::Platform, outcome: &Outcome) {
        if let Outcome::Answer(vtpm::Response::Done) = outcome {
            match signal {
                vtpm::Platform::PowerOn | vtpm::Platform::Reset => self.powered = Some(true),
                vtpm::Platform::PowerOff => self.powered = Some(false),
                _ => {}
            }
        }
    }

    /// Whether an abandoned request still blocks the ring (the TPM has taken nothing since).
    fn stalled(&mut self) -> bool {
        match self.abandoned {
            Some(sent) if self.end.epoch() == sent.epoch() && !self.end.taken(sent) => true,
            _ => {
                self.abandoned = None;
                false
            }
        }
    }

    /// One request, made by `request` with its deadline to start: sent again if the TPM
    /// restarted under it (then without a deadline: it may have been carried out, and only
    /// its answer, from the TPM's record, may tell) or let the deadline pass before taking it
    /// (it was not carried out). Its answer is awaited while the gateway answers its own
    /// control channel.
    pub(crate) fn call(
        &mut self,
        started: &mut runtime::Started,
        request: impl Fn(vtpm::StartBy) -> vtpm::Request,
    ) -> Outcome {
        if self.stalled() {
            return Outcome::NotStarted;
        }
        let mut resends = 0;
        // Whether this request may have been carried out already (the TPM restarted while it
        // was in flight): then it is never reported as not started.
        let mut maybe_ran = false;
        loop {
            let start_by = (!maybe_ran).then(|| {
                ipc_defs::hosted::sys::monotonic_ns().saturating_add(START_WITHIN.as_nanos() as u64)
            });
            let sent = match self.end.start(
                &endpoint::Request::Service(request(start_by)),
                COMMAND_TIMEOUT,
            ) {
                Ok(sent) => sent,
                Err(CallError::PeerRestarted { .. }) if resends < RESENDS => {
                    resends += 1;
                    continue;
                }
                Err(e) => return Outcome::Unknown(e),
            };
            let waited_since = std::time::Instant::now();
            let answer = loop {
                match self.end.wait_reply(sent, CONTROL_EVERY) {
                    Ok(Some(answer)) => break Ok(answer),
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
                if !started.answer_control() {
                    return Outcome::Shutdown;
                }
                if let Some(by) = start_by {
                    if ipc_defs::hosted::sys::monotonic_ns() > by
                        && self.end.server_state() == ServerState::Unresponsive
                        && !self.end.taken(sent)
                    {
                        // Past its deadline and not taken: the TPM will refuse it unrun.
                        tracing::warn!(
                            "the TPM is unresponsive and has not taken a request in {:.1?}: its client is told to retry",
                            waited_since.elapsed()
                        );
                        self.abandoned = Some(sent);
                        return Outcome::NotStarted;
                    }
                }
                if self.end.server_state() == ServerState::Gone {
                    break Err(CallError::PeerRestarted {
                        sent_in: sent.epoch(),
                        now: self.end.epoch(),
                    });
                }
                if waited_since.elapsed() > COMMAND_TIMEOUT {
                    break Err(CallError::TimedOut(COMMAND_TIMEOUT));
                }
            };
            match answer {
                Ok(endpoint::Response::Service(vtpm::Response::Error(
                    vtpm::VtpmError::Expired,
                ))) if resends < RESENDS => {
                    // Taken after its deadline (the TPM was slow, not stopped): not carried
                    // out; send it again.
                    resends += 1;
                }
                Ok(endpoint::Response::Service(r)) => return Outcome::Answer(r),
                Ok(_) => return Outcome::Unknown(CallError::MalformedReply),
                Err(CallError::PeerRestarted { .. })
                    if resends < RESENDS && self.end.server_state() != ServerState::Gone =>
                {
                    resends += 1;
                    maybe_ran = true;
                }
                Err(e) => return Outcome::Unknown(e),
            }
        }
    }
}
