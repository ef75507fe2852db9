//! The framing every channel uses, and what every service endpoint answers whatever its
//! interface.
//!
//! A frame's payload is a postcard [`Envelope`]: a tag chosen by the client (so that replies
//! can be matched, and stale ones recognised) and a body. A service endpoint speaks
//! [`Request<S>`] / [`Response<S>`], where `S` is its own interface from [`crate::services`].

use serde::Deserialize;
use serde::Serialize;

/// A tagged message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<B> {
    pub tag: u32,
    pub body: B,
}

/// A request to a service endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request<S> {
    /// Liveness through this very channel; answered by the runtime.
    Ping { nonce: u64 },
    /// The interface's own request.
    Service(S),
    /// One access of the guest partition to a range or PCI function the manifest gives the
    /// service (`mmio`, `pio`, `pci-device`): only on the partition's own channel (its grant
    /// says [`crate::capability::Grant::GuestPartition`]); answered with
    /// [`Response::Guest`]. Any interface's device service takes them the same way.
    Guest(crate::services::guest::Access),
}

/// A response from a service endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response<S> {
    Pong {
        nonce: u64,
    },
    Service(S),
    Error(ErrorCode),
    /// The answer to [`Request::Guest`].
    Guest(crate::services::guest::Reply),
}

/// Errors that any endpoint can return, on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request could not be decoded.
    Malformed,
    /// The endpoint does not implement this request.
    Unsupported,
    /// The caller is not allowed to make this request.
    NotPermitted,
    /// The frame did not fit the ring.
    TooLarge,
    /// The server's state does not allow it now (e.g. shutting down).
    Unavailable,
}

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let s = match self {
            ErrorCode::Malformed => "malformed request",
            ErrorCode::Unsupported => "request not supported by this endpoint",
            ErrorCode::NotPermitted => "not permitted for this caller",
            ErrorCode::TooLarge => "frame too large",
            ErrorCode::Unavailable => "endpoint unavailable",
        };
        f.write_str(s)
    }
}
