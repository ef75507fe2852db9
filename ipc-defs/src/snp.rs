//! SEV-SNP facts the paravisor, its secure processor (simulated: `sim/`) and the verifier
//! share: the report's size and signed part, the TCB encoding, what a report request and a
//! derived-key request carry, and the names of a certificate chain's files. Facts only: no
//! secrets, no cryptography, no OS code.

pub use crate::services::platform::FieldSelect;
pub use crate::services::platform::REPORT_LEN;

/// The files of a certificate chain directory (`attest certs`, a platform directory).
pub const ARK_PEM: &str = "ark.pem";
pub const ASK_PEM: &str = "ask.pem";
pub const VCEK_PEM: &str = "vcek.pem";

/// The signed part: bytes 0..0x2A0.
pub const SIGNED_LEN: usize = 0x2A0;
/// The report version we produce (carries the CPUID fields of the generation).
pub const REPORT_VERSION: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

impl Tcb {
    /// The 64-bit TCB_VERSION of an SNP report (Milan layout: boot loader byte 0, TEE byte 1,
    /// SNP byte 6, microcode byte 7).
    pub fn raw(self) -> u64 {
        u64::from_le_bytes([
            self.bootloader,
            self.tee,
            0,
            0,
            0,
            0,
            self.snp,
            self.microcode,
        ])
    }
}

/// The guest policy the simulated launch uses: ABI 0.0, SMT allowed (bit 16), the reserved
/// bit 17 that must be one, debugging not allowed.
pub const POLICY: u64 = (1 << 16) | (1 << 17);

/// What a report request carries (the rest the platform fills in).
#[derive(Debug, Clone)]
pub struct ReportRequest {
    pub report_data: [u8; 64],
    pub measurement: [u8; 48],
    pub host_data: [u8; 32],
    pub vmpl: u32,
    pub policy: u64,
    /// REPORT_ID: the guest's, fixed for its lifetime (a launch), as the hardware keeps it.
    pub report_id: [u8; 32],
}

/// The launch facts a derived key can be bound to.
#[derive(Debug, Clone, Copy)]
pub struct LaunchFacts {
    pub measurement: [u8; 48],
    pub policy: u64,
    pub guest_svn: u32,
}
