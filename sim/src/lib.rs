//! SIMULATED SECURE PROCESSOR: the stand-in for the AMD secure processor (PSP) of an SEV-SNP
//! machine, and the only code in the project that plays hardware. Nothing here is secure: the
//! chip secret, fused into silicon on a real part, is 64 bytes the host keeps in a file.
//!
//! A [`Chip`] is that secret and what the firmware derives from it: the chip id, the VCEK
//! (an ECDSA P-384 key per TCB), signed ATTESTATION_REPORTs, and keys derived from the
//! secret and the launch facts a guest selects. Where the secret is kept (a private platform
//! directory, checked on every use) and who may ask for what (the platform channel's rules)
//! are the microkernel's business (`microkernel/src/platform.rs`, `platform_server.rs`); the
//! certificate chain a provisioning step makes for the VCEK is the tools' (`pv_tools::
//! provision`). The SEV-SNP facts the three share are in [`ipc_defs::snp`].
//!
//! On hardware this crate disappears: the microkernel asks the real PSP through the SNP guest
//! request interface, and the same [`ipc_defs::snp`] facts describe what comes back.
#![forbid(unsafe_code)]

use ipc_defs::snp::FieldSelect;
use ipc_defs::snp::LaunchFacts;
use ipc_defs::snp::ReportRequest;
use ipc_defs::snp::Tcb;
use ipc_defs::snp::REPORT_LEN;
use ipc_defs::snp::REPORT_VERSION;
use ipc_defs::snp::SIGNED_LEN;
use p384::ecdsa::SigningKey as EcdsaKey;
use sha2::Digest;
use sha2::Sha384;
use sha2::Sha512;
use zeroize::Zeroizing;

/// Size of a chip secret.
pub const SECRET_LEN: usize = 64;

/// The TCB the simulated firmware reports: boot loader, TEE, SNP, microcode SPLs.
pub const TCB: Tcb = Tcb {
    bootloader: 3,
    tee: 0,
    snp: 8,
    microcode: 115,
};

#[derive(Debug, thiserror::Error)]
pub enum ChipError {
    #[error("{0}")]
    Crypto(String),
}

fn crypto(e: impl std::fmt::Display) -> ChipError {
    ChipError::Crypto(e.to_string())
}

/// A simulated chip: its secret, and what derives from it.
pub struct Chip {
    secret: Zeroizing<[u8; SECRET_LEN]>,
}

impl Chip {
    /// A new chip with a random secret (what provisioning a platform makes).
    pub fn generate() -> Result<Chip, ChipError> {
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        getrandom::getrandom(&mut secret[..]).map_err(crypto)?;
        Ok(Chip { secret })
    }

    /// The chip whose secret is `secret` (as read back from where the host keeps it).
    pub fn from_secret(secret: Zeroizing<[u8; SECRET_LEN]>) -> Chip {
        Chip { secret }
    }

    /// The secret, for the host to store (provisioning writes it once).
    pub fn secret(&self) -> &[u8; SECRET_LEN] {
        &self.secret
    }

    /// The chip id (the report's CHIP_ID and the VCEK's hwID): derived from the secret.
    pub fn chip_id(&self) -> [u8; 64] {
        Sha512::new()
            .chain_update(b"PV-SIM chip id")
            .chain_update(&self.secret[..])
            .finalize()
            .into()
    }

    /// The VCEK for `tcb`: a P-384 key derived from the chip secret and the TCB (a hash of
    /// both, counter-extended until it is a valid scalar).
    pub fn vcek_key(&self, tcb: Tcb) -> Result<EcdsaKey, ChipError> {
        for counter in 0u32..64 {
            let d = Sha384::new()
                .chain_update(b"PV-SIM VCEK")
                .chain_update(&self.secret[..])
                .chain_update(tcb.raw().to_le_bytes())
                .chain_update(counter.to_le_bytes())
                .finalize();
            if let Ok(k) = EcdsaKey::from_slice(&d) {
                return Ok(k);
            }
        }
        Err(ChipError::Crypto(
            "no valid P-384 scalar from the chip secret".into(),
        ))
    }
}

/// SIGNATURE_ALGO: ECDSA P-384 with SHA-384.
const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;
/// CPUID family / model / stepping of the claimed generation (Milan: family 19h, model 01h).
const CPUID_FAMILY: u8 = 0x19;
const CPUID_MODEL: u8 = 0x01;
const CPUID_STEPPING: u8 = 0x01;

/// A new guest's REPORT_ID (random; the hardware assigns one at launch).
pub fn new_report_id() -> Result<[u8; 32], ChipError> {
    let mut id = [0u8; 32];
    getrandom::getrandom(&mut id).map_err(crypto)?;
    Ok(id)
}

impl Chip {
    /// An SEV-SNP ATTESTATION_REPORT (version 3, little-endian, 0x4A0 bytes), signed with the
    /// VCEK over bytes 0..0x2A0 (ECDSA P-384 / SHA-384; R and S little-endian, zero-padded
    /// to 72 bytes, at 0x2A0 and 0x2E8). Reserved bytes are zero.
    pub fn report(&self, req: &ReportRequest) -> Result<[u8; REPORT_LEN], ChipError> {
        let mut r = [0u8; REPORT_LEN];
        let tcb = TCB.raw().to_le_bytes();
        let put =
            |r: &mut [u8; REPORT_LEN], at: usize, b: &[u8]| r[at..at + b.len()].copy_from_slice(b);
        put(&mut r, 0x00, &REPORT_VERSION.to_le_bytes());
        put(&mut r, 0x04, &0u32.to_le_bytes()); // guest SVN
        put(&mut r, 0x08, &req.policy.to_le_bytes());
        put(&mut r, 0x30, &req.vmpl.to_le_bytes());
        put(&mut r, 0x34, &SIG_ALGO_ECDSA_P384_SHA384.to_le_bytes());
        put(&mut r, 0x38, &tcb); // current TCB
        put(&mut r, 0x40, &1u64.to_le_bytes()); // platform info: SMT enabled
        put(&mut r, 0x48, &0u32.to_le_bytes()); // key info: signed by the VCEK, chip id shown
        put(&mut r, 0x50, &req.report_data);
        put(&mut r, 0x90, &req.measurement);
        put(&mut r, 0xC0, &req.host_data);
        put(&mut r, 0x140, &req.report_id);
        put(&mut r, 0x180, &tcb); // reported TCB (the VCEK's)
        put(&mut r, 0x188, &[CPUID_FAMILY, CPUID_MODEL, CPUID_STEPPING]);
        put(&mut r, 0x1A0, &self.chip_id());
        put(&mut r, 0x1E0, &tcb); // committed TCB
        put(&mut r, 0x1E8, &[8, 55, 1]); // current firmware build, minor, major
        put(&mut r, 0x1EC, &[8, 55, 1]); // committed
        put(&mut r, 0x1F0, &tcb); // launch TCB
        self.sign(&mut r)?;
        Ok(r)
    }

    /// Signs bytes 0..0x2A0 of `r` with the VCEK, into its signature field (R and S
    /// little-endian, zero-padded to 72 bytes, at 0x2A0 and 0x2E8).
    pub fn sign(&self, r: &mut [u8; REPORT_LEN]) -> Result<(), ChipError> {
        let key = self.vcek_key(TCB)?;
        let digest = Sha384::new_with_prefix(&r[..SIGNED_LEN]);
        let sig: p384::ecdsa::Signature =
            p384::ecdsa::signature::DigestSigner::try_sign_digest(&key, digest).map_err(crypto)?;
        let (rb, sb) = sig.split_bytes();
        r[0x2A0..0x330].fill(0);
        let mut le = |at: usize, be: &[u8]| {
            for (i, b) in be.iter().rev().enumerate() {
                r[at + i] = *b;
            }
        };
        le(0x2A0, &rb);
        le(0x2E8, &sb);
        Ok(())
    }
}

impl Chip {
    /// A 32-byte key from the chip secret mixed with the selected launch facts and the
    /// caller's context: what the hardware's key request gives a guest. The chip and TCB are
    /// always in it; the measurement only when selected.
    pub fn derived_key(
        &self,
        select: FieldSelect,
        facts: &LaunchFacts,
        context: &[u8],
    ) -> [u8; 32] {
        let mut ctx = vec![select.bits()];
        ctx.extend_from_slice(&self.chip_id());
        ctx.extend_from_slice(&TCB.raw().to_le_bytes());
        if select.policy {
            ctx.extend_from_slice(&facts.policy.to_le_bytes());
        }
        if select.measurement {
            ctx.extend_from_slice(&facts.measurement);
        }
        if select.guest_svn {
            ctx.extend_from_slice(&facts.guest_svn.to_le_bytes());
        }
        if select.tcb {
            ctx.extend_from_slice(&TCB.raw().to_le_bytes());
        }
        ctx.extend_from_slice(&(context.len() as u32).to_le_bytes());
        ctx.extend_from_slice(context);
        kdf_sp800_108(&self.secret[..], b"PV-SIM DERIVED KEY", &ctx)
    }
}

/// SP 800-108 KDF in counter mode with HMAC-SHA-256, one 256-bit block: HMAC(key,
/// [1]_32 || label || 0x00 || context || [256]_32).
pub fn kdf_sp800_108(key: &[u8], label: &[u8], context: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
        .expect("HMAC takes a key of any length");
    mac.update(&1u32.to_be_bytes());
    mac.update(label);
    mac.update(&[0]);
    mac.update(context);
    mac.update(&256u32.to_be_bytes());
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SP 800-108 counter mode, HMAC-SHA-256, one block, against an independent computation
    /// (Python: hmac.new(key, b"\x00\x00\x00\x01" + label + b"\x00" + ctx +
    /// b"\x00\x00\x01\x00", "sha256")).
    #[test]
    fn kdf_matches_an_independent_computation() {
        let k = kdf_sp800_108(b"key", b"VMGSKEY", b"ctx");
        assert_eq!(
            hex::encode(k),
            "f843b39f0608d8a98ecc1e63840ec5527474562d613b0105680c9af1b6a90eab"
        );
    }
}
