//! The echo interface: the server answers with what it was sent. It is the metal platform's
//! smallest real service, and the target of its fault-injection tests: [`Request::Fault`]
//! makes the server stop the way a buggy service would, so that a test can watch the kernel
//! stop it, bump its channels' epochs and restart it while its clients and everyone else
//! carry on.

use serde::Deserialize;
use serde::Serialize;

use super::bytes::Bytes;

/// Longest message echoed.
pub const MAX_ECHO: usize = 1024;

/// How a server asked to fault does so.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    /// An undefined instruction (#UD).
    InvalidOpcode,
    /// A read of an address it has no mapping for (#PF).
    PageFault,
    /// A privileged instruction (#GP).
    Privileged,
    /// A clean exit with a non-zero status.
    Exit,
}

// Messages are inline (no allocation on either platform): the small variant's waste is the
// price of that.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Answered with [`Response::Echo`] of the same bytes.
    Echo(Bytes<MAX_ECHO>),
    /// The server faults as asked, without answering (a debug request).
    Fault(Fault),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Echo(Bytes<MAX_ECHO>),
}
