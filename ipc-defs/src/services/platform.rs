//! The secure processor's interface, as the hardware offers it to a guest: a signed report
//! over 64 bytes of the caller's data, and a key derived from the chip secret and the launch
//! facts the caller selects. Nothing else: the launch facts (measurement, policy, host data)
//! are fixed by the microkernel at launch, never taken from a message.
//!
//! The microkernel serves this channel itself (the platform is simulated: see
//! `microkernel/src/platform.rs`); the manifest lets exactly one service, the one that serves
//! `attest`, hold its calling end ([`crate::capability::CapabilityKind::Platform`]).

use core::fmt;

use serde::Deserialize;
use serde::Serialize;

use super::bytes::Bytes;

/// Size of an SEV-SNP attestation report.
pub const REPORT_LEN: usize = 0x4A0;
/// Bytes of caller data a report carries.
pub const REPORT_DATA_LEN: usize = 64;
/// Most context bytes a derived-key request may mix in.
pub const MAX_CONTEXT: usize = 128;

/// Which launch facts a derived key is bound to, as SNP's GUEST_FIELD_SELECT names them. The
/// chip and its TCB are always in the key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldSelect {
    pub policy: bool,
    pub measurement: bool,
    pub guest_svn: bool,
    pub tcb: bool,
}

impl FieldSelect {
    /// The bits of GUEST_FIELD_SELECT (0 policy, 3 measurement, 4 guest SVN, 5 TCB version).
    pub fn bits(self) -> u8 {
        u8::from(self.policy)
            | u8::from(self.measurement) << 3
            | u8::from(self.guest_svn) << 4
            | u8::from(self.tcb) << 5
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// A report over `report_data`, at privilege level `vmpl` (0..=3).
    Report {
        report_data: Bytes<REPORT_DATA_LEN>,
        vmpl: u8,
    },
    /// A 32-byte key from the chip secret, the selected facts and `context`.
    DerivedKey {
        select: FieldSelect,
        context: Bytes<MAX_CONTEXT>,
    },
}

#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Report(Bytes<REPORT_LEN>),
    Key(Bytes<32>),
    Error(PlatformError),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlatformError {
    /// VMPLs are 0..=3.
    BadVmpl(u8),
    /// The report data is not exactly 64 bytes.
    BadReportData,
    /// The platform could not sign (its key material is unusable).
    Signing,
    /// The request could not be decoded.
    Malformed,
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlatformError::BadVmpl(v) => write!(f, "VMPL {v} does not exist (0..=3)"),
            PlatformError::BadReportData => f.write_str("report data must be exactly 64 bytes"),
            PlatformError::Signing => f.write_str("the platform could not sign the report"),
            PlatformError::Malformed => f.write_str("malformed request"),
        }
    }
}
