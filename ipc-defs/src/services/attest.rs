//! The attestation service's interface: reports, the platform's certificate chain, derived
//! keys, runtime measurements and the launch log.
//!
//! The caller's identity is the channel it calls on (the client name the microkernel put in
//! the attest service's bootstrap record), never anything in a message: a derived key is
//! bound to the caller's name, so no service can obtain another's key, and runtime events are
//! logged under the name of the service that extended them. The client named `paravisor` is
//! the microkernel itself (`paravisor attest report`). Sealing the VMGS datastore key is not
//! here: the microkernel does it with the platform in-process (`microkernel::key_protector`),
//! under a key the platform channel refuses to derive for this service.

use core::fmt;

use serde::Deserialize;
use serde::Serialize;

use super::bytes::Bytes;
pub use super::platform::FieldSelect;
pub use super::platform::MAX_CONTEXT;
pub use super::platform::REPORT_DATA_LEN;
pub use super::platform::REPORT_LEN;

/// Largest piece of a certificate chain or launch log in one response.
pub const MAX_CHUNK: usize = 16 * 1024;
/// Number of runtime measurement registers.
pub const RUNTIME_REGISTERS: u8 = 4;
/// Longest description of a runtime event.
pub const MAX_EVENT: usize = 256;
/// A derived key.
pub const KEY_LEN: usize = 32;

/// The client name the microkernel's own channel carries (a reserved service name).
pub const PARAVISOR_CLIENT: &str = "paravisor";
/// The lowest VMPL a service's report carries: a service is not the paravisor's core, so a
/// compromised one cannot produce VMPL 0 evidence over data of its choosing.
pub const SERVICE_VMPL: u8 = 1;
/// The VMPL of a report asked for from outside the paravisor (`paravisor attest report`).
pub const OUTSIDE_VMPL: u8 = 3;

#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A signed report over `report_data`, at privilege level `vmpl`. VMPL 0 (the
    /// paravisor's own evidence, what a key broker releases secrets to) is the microkernel's
    /// alone and never comes from this service: every report carries at least
    /// [`SERVICE_VMPL`], whatever is asked (the platform channel refuses VMPL 0 anyway).
    GetReport {
        report_data: Bytes<REPORT_DATA_LEN>,
        vmpl: u8,
    },
    /// A report and, in the same answer, the certificate chain that verifies it (as SNP's
    /// extended guest request). The chain may take several [`Request::GetCertChain`]s if it
    /// is longer than one chunk; `chain_len` says how long it is.
    GetExtendedReport {
        report_data: Bytes<REPORT_DATA_LEN>,
        vmpl: u8,
    },
    /// The certificate chain (ARK, ASK, VCEK, PEM, concatenated) from byte `offset`.
    GetCertChain { offset: u32 },
    /// A 32-byte key bound to the selected launch facts, the caller's identity and `context`.
    GetDerivedKey {
        select: FieldSelect,
        context: Bytes<MAX_CONTEXT>,
    },
    /// Extends runtime register `index` (SHA-384: new = H(old || digest)) and logs `event`
    /// under the caller's name.
    ExtendRuntime {
        index: u8,
        digest: Bytes<48>,
        event: Bytes<MAX_EVENT>,
    },
    /// The launch log (JSON, as `paravisor measure --json` prints it) from byte `offset`.
    GetLaunchLog { offset: u32 },
    /// The runtime registers and their event log (JSON) from byte `offset`.
    GetRuntimeLog { offset: u32 },
}

#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Report(Bytes<REPORT_LEN>),
    /// A report and the first chunk of its chain; `chain_len` is the whole chain's length.
    ExtendedReport {
        report: Bytes<REPORT_LEN>,
        chain_len: u32,
        chain: Bytes<MAX_CHUNK>,
    },
    /// A chunk of a certificate chain, launch log or runtime log, and the whole length.
    Chunk {
        total: u32,
        data: Bytes<MAX_CHUNK>,
    },
    Key(Bytes<KEY_LEN>),
    /// The register's new value.
    Extended(Bytes<48>),
    Error(AttestError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttestError {
    /// The request is reserved to another client.
    NotPermitted,
    /// The platform refused or failed.
    Platform(super::platform::PlatformError),
    /// The platform could not be reached.
    PlatformUnavailable,
    /// Runtime registers are 0..RUNTIME_REGISTERS; digests are 48 bytes.
    BadRegister(u8),
    BadDigest,
    /// The offset is past the end.
    BadOffset,
    /// The service has no launch log or certificate chain (not given at start).
    Unavailable,
}

impl fmt::Display for AttestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttestError::NotPermitted => f.write_str("not permitted for this client"),
            AttestError::Platform(e) => write!(f, "platform: {e}"),
            AttestError::PlatformUnavailable => f.write_str("the platform did not answer"),
            AttestError::BadRegister(i) => {
                write!(
                    f,
                    "runtime register {i} does not exist (0..{RUNTIME_REGISTERS})"
                )
            }
            AttestError::BadDigest => f.write_str("a runtime digest is 48 bytes (SHA-384)"),
            AttestError::BadOffset => f.write_str("offset past the end"),
            AttestError::Unavailable => f.write_str("not available in this service"),
        }
    }
}
