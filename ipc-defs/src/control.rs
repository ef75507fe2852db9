//! The control interface every service serves to the microkernel (and only to it).
//!
//! The control channel is a capability of its own ([`crate::CapabilityKind::Control`]): no
//! other service can ask a service to shut down or to probe its peers.

use serde::Deserialize;
use serde::Serialize;

use crate::capability::Interface;
use crate::endpoint::ErrorCode;
use crate::layout::Epoch;

/// What the microkernel asks of a service.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Liveness: answered with the same nonce.
    Ping { nonce: u64 },
    /// Counters since start.
    Stats,
    /// Stop serving and exit with status 0.
    Shutdown,
    /// Ping `endpoint` through the service's own capability to call it, and say what
    /// happened. This is how an operator (or a test) checks the connectivity the manifest
    /// grants, from inside the sandbox that enforces it.
    Probe { endpoint: Interface },
    /// The guest-state file's key protectors, asked of `pv-vmgs` started as the
    /// microkernel's broker (`--broker`: no key, no client) so that the privileged process
    /// never parses the host's file itself. Any other service answers
    /// [`ErrorCode::Unsupported`]; only the microkernel holds a control channel.
    GuestState(crate::services::vmgs::BrokerRequest),
}

/// Counters a service keeps about its own traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests received on all served channels (control included).
    pub requests_in: u64,
    /// Responses sent.
    pub responses_out: u64,
    /// Calls made to other services.
    pub calls_out: u64,
    /// Frames dropped because they belonged to an earlier epoch.
    pub stale_dropped: u64,
    /// Frames rejected as malformed (bad length, bad postcard, corrupt ring).
    pub malformed: u64,
    /// Requests refused because the caller's grant does not cover them.
    pub refused: u64,
}

/// How a [`Request::Probe`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProbeOutcome {
    /// The endpoint answered.
    Reached { epoch: Epoch, round_trip_ns: u64 },
    /// The manifest grants this service no capability to call the endpoint.
    NoCapability,
    /// The endpoint's server restarted while the probe was in flight.
    PeerRestarted { sent_in: Epoch, now: Epoch },
    /// No answer before the deadline.
    TimedOut,
    /// The channel failed otherwise.
    Failed(ErrorCode),
}

/// What a service answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum Response {
    Pong { nonce: u64 },
    Stats(Stats),
    ShuttingDown,
    Probe(ProbeOutcome),
    GuestState(crate::services::vmgs::BrokerResponse),
    Error(ErrorCode),
}
