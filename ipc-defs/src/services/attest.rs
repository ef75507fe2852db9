//! The attestation service's interface: reports, the platform's certificate chain, derived
//! keys, runtime measurements and the launch log.
//!
//! The caller's identity is the channel it calls on (the client name the microkernel put in
//! the attest service's bootstrap record), never anything in a message: a derived key is
//! bound to the caller's name, so no service can obtain another's key, and runtime events are
//! logged under the name of the service that extended them. The client named `paravisor` is
//! the microkernel itself; only it may seal and unseal the VMGS datastore key.

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
/// A datastore key.
pub const KEY_LEN: usize = 32;
/// Largest sealed-key blob.
pub const MAX_SEALED: usize = 512;

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
    /// alone: any other client's report carries at least [`SERVICE_VMPL`], whatever it asks.
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
    /// Seals a datastore key to this platform and the selected launch facts (the manifest's
    /// sealing policy) (`paravisor` only). The answer is a [`SealedKey`] in its byte form.
    Seal {
        key: Bytes<KEY_LEN>,
        select: FieldSelect,
    },
    /// Unseals a blob made by [`Request::Seal`] (`paravisor` only).
    Unseal { sealed: Bytes<MAX_SEALED> },
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
    Sealed(Bytes<MAX_SEALED>),
    Error(AttestError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttestError {
    /// The request is reserved to another client (sealing is the microkernel's).
    NotPermitted,
    /// The platform refused or failed.
    Platform(super::platform::PlatformError),
    /// The platform could not be reached.
    PlatformUnavailable,
    /// Runtime registers are 0..RUNTIME_REGISTERS; digests are 48 bytes.
    BadRegister(u8),
    BadDigest,
    /// A datastore key is 32 bytes.
    BadKey,
    /// The offset is past the end.
    BadOffset,
    /// The sealed blob is not one of ours, or was made under other launch facts (another
    /// measurement, under the `measurement` policy), or was tampered with.
    UnsealFailed,
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
                write!(f, "runtime register {i} does not exist (0..{RUNTIME_REGISTERS})")
            }
            AttestError::BadDigest => f.write_str("a runtime digest is 48 bytes (SHA-384)"),
            AttestError::BadKey => f.write_str("a datastore key is 32 bytes"),
            AttestError::BadOffset => f.write_str("offset past the end"),
            AttestError::UnsealFailed => f.write_str(
                "the sealed key does not open under this platform and launch (sealed under another measurement or platform, or altered)",
            ),
            AttestError::Unavailable => f.write_str("not available in this service"),
        }
    }
}

/// A sealed datastore key as it is stored (VMGS file id HW_KEY_PROTECTOR, unencrypted: it
/// protects itself). The header is in clear so that a refusal can say what it was sealed to;
/// it is authenticated (AES-GCM associated data), so changing it breaks the seal.
///
/// Layout: magic `PVSEAL01` (8) | format 1 (1) | GUEST_FIELD_SELECT bits (1) | measurement
/// at sealing (48) | nonce (12) | wrapped key (32) | GCM tag (16) = 118 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedKey {
    pub select: FieldSelect,
    /// The launch measurement when it was sealed (part of the key only if selected).
    pub measurement: [u8; 48],
    pub nonce: [u8; 12],
    pub wrapped: [u8; KEY_LEN],
    pub tag: [u8; 16],
}

impl SealedKey {
    pub const MAGIC: [u8; 8] = *b"PVSEAL01";
    pub const FORMAT: u8 = 1;
    /// Bytes of the authenticated clear header.
    pub const HEADER_LEN: usize = 8 + 1 + 1 + 48;
    pub const LEN: usize = Self::HEADER_LEN + 12 + KEY_LEN + 16;

    /// The clear header (the associated data of the seal).
    pub fn header(&self) -> [u8; Self::HEADER_LEN] {
        let mut h = [0u8; Self::HEADER_LEN];
        h[..8].copy_from_slice(&Self::MAGIC);
        h[8] = Self::FORMAT;
        h[9] = self.select.bits();
        h[10..].copy_from_slice(&self.measurement);
        h
    }

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        let mut at = 0;
        for part in [
            &self.header()[..],
            &self.nonce[..],
            &self.wrapped[..],
            &self.tag[..],
        ] {
            b[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        b
    }

    /// Parses stored bytes (hostile: they come from the host's disk).
    pub fn parse(bytes: &[u8]) -> Result<SealedKey, SealedKeyError> {
        if bytes.len() != Self::LEN {
            return Err(SealedKeyError::Length(bytes.len()));
        }
        if bytes[..8] != Self::MAGIC {
            return Err(SealedKeyError::Magic);
        }
        if bytes[8] != Self::FORMAT {
            return Err(SealedKeyError::Format(bytes[8]));
        }
        let bits = bytes[9];
        if bits & !0b0011_1001 != 0 {
            return Err(SealedKeyError::Select(bits));
        }
        let select = FieldSelect {
            policy: bits & 1 != 0,
            measurement: bits & (1 << 3) != 0,
            guest_svn: bits & (1 << 4) != 0,
            tcb: bits & (1 << 5) != 0,
        };
        let take = |at: usize, n: usize| &bytes[at..at + n];
        let mut k = SealedKey {
            select,
            measurement: [0; 48],
            nonce: [0; 12],
            wrapped: [0; KEY_LEN],
            tag: [0; 16],
        };
        k.measurement.copy_from_slice(take(10, 48));
        k.nonce.copy_from_slice(take(58, 12));
        k.wrapped.copy_from_slice(take(70, KEY_LEN));
        k.tag.copy_from_slice(take(70 + KEY_LEN, 16));
        Ok(k)
    }
}

/// Why stored bytes are not a sealed key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealedKeyError {
    Length(usize),
    Magic,
    Format(u8),
    Select(u8),
}

impl fmt::Display for SealedKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealedKeyError::Length(n) => {
                write!(f, "{n} bytes, a sealed key is {}", SealedKey::LEN)
            }
            SealedKeyError::Magic => f.write_str("not a sealed key (no PVSEAL01 magic)"),
            SealedKeyError::Format(v) => write!(f, "unknown sealed-key format {v}"),
            SealedKeyError::Select(b) => write!(f, "unknown field-select bits {b:#04x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_key_round_trips_and_refuses_garbage() {
        let k = SealedKey {
            select: FieldSelect {
                policy: true,
                measurement: true,
                guest_svn: false,
                tcb: true,
            },
            measurement: [7; 48],
            nonce: [1; 12],
            wrapped: [2; KEY_LEN],
            tag: [3; 16],
        };
        let b = k.to_bytes();
        assert_eq!(SealedKey::parse(&b), Ok(k));
        assert_eq!(
            SealedKey::parse(&b[1..]),
            Err(SealedKeyError::Length(b.len() - 1))
        );
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(SealedKey::parse(&bad), Err(SealedKeyError::Magic));
        let mut bad = b;
        bad[9] = 0x80;
        assert_eq!(SealedKey::parse(&bad), Err(SealedKeyError::Select(0x80)));
    }
}
