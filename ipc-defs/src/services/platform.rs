//! The secure processor's interface, as the hardware offers it to a guest: a signed report
//! over 64 bytes of the caller's data, and a key derived from the chip secret and the launch
//! facts the caller selects. Nothing else: the launch facts (measurement, policy, host data)
//! are fixed by the microkernel at launch, never taken from a message.
//!
//! The microkernel serves this channel itself (the secure processor is simulated: see
//! `sim/`, kept by `microkernel/src/platform.rs`); the manifest lets exactly one service, the one that serves
//! `attest`, hold its calling end ([`crate::capability::CapabilityKind::Platform`]).
//!
//! Two things the platform does only for the microkernel itself, in-process, and refuses on
//! this channel: a report at VMPL 0 (the paravisor's own evidence, the only kind a key broker
//! releases secrets to) and a key for a context in [`RESERVED_CONTEXTS`] (the datastore key's
//! wrapping key). So even a compromised attest service can neither speak for the paravisor
//! nor unwrap the guest-state file's key.

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

/// The context of the platform key that wraps the VMGS datastore key (sealed in its
/// HW_KEY_PROTECTOR): SHA-256("paravisor" || 0x00 || "VMGS datastore key"). This is the
/// context pv-attest derived for the microkernel's channel when it did the sealing, kept so
/// that guest-state files sealed then still open. pv-attest's own contexts are SHA-256(caller
/// || 0x00 || context) for a service's name, and no service may be called `paravisor`, so
/// it never produces this one for a service; the platform channel refuses it outright.
pub const DATASTORE_KEY_CONTEXT: [u8; 32] = [
    0x39, 0x34, 0x3a, 0xb8, 0xf6, 0xcb, 0x18, 0x9d, 0xe4, 0x76, 0x8a, 0xa8, 0x01, 0x59, 0x49, 0xe2,
    0xf3, 0x5e, 0xd5, 0x81, 0x28, 0xd3, 0xbf, 0x65, 0xa0, 0x66, 0xa4, 0xcc, 0xb1, 0x1d, 0xb8, 0x7b,
];

/// Derived-key contexts only the microkernel may use (in-process); the platform channel
/// refuses a [`Request::DerivedKey`] for any of them, whatever the field selection.
pub const RESERVED_CONTEXTS: &[[u8; 32]] = &[DATASTORE_KEY_CONTEXT];

/// The VMPL reserved to the microkernel's own evidence; the channel signs VMPL 1..=3 only.
pub const MICROKERNEL_VMPL: u8 = 0;

/// Whether `context` is one the microkernel reserves.
pub fn is_reserved_context(context: &[u8]) -> bool {
    RESERVED_CONTEXTS.iter().any(|r| r.as_slice() == context)
}

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
    /// A report over `report_data`, at privilege level `vmpl` (1..=3: VMPL 0 is refused with
    /// [`PlatformError::ReservedVmpl`]).
    Report {
        report_data: Bytes<REPORT_DATA_LEN>,
        vmpl: u8,
    },
    /// A 32-byte key from the chip secret, the selected facts and `context` (not one of
    /// [`RESERVED_CONTEXTS`]: refused with [`PlatformError::ReservedContext`]).
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
    /// VMPL 0 is the microkernel's own evidence; this channel signs VMPL 1..=3.
    ReservedVmpl,
    /// The derived-key context is reserved to the microkernel (the datastore key's).
    ReservedContext,
}

impl fmt::Display for PlatformError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PlatformError::BadVmpl(v) => write!(f, "VMPL {v} does not exist (0..=3)"),
            PlatformError::BadReportData => f.write_str("report data must be exactly 64 bytes"),
            PlatformError::Signing => f.write_str("the platform could not sign the report"),
            PlatformError::Malformed => f.write_str("malformed request"),
            PlatformError::ReservedVmpl => f.write_str(
                "VMPL 0 is reserved to the microkernel's own evidence; a report asked on the platform channel is at VMPL 1..=3",
            ),
            PlatformError::ReservedContext => f.write_str(
                "this derived-key context is reserved to the microkernel (the datastore key's wrapping key)",
            ),
        }
    }
}
