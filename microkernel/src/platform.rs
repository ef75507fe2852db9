//! SIMULATED PLATFORM: the stand-in for the AMD secure processor (PSP), and the only place
//! that plays hardware. Nothing here is secure: the chip secret is a file.
//!
//! `paravisor platform init` provisions a platform identity once, in its own directory
//! (separate from the paravisor's state; private, 0700, and checked like the state directory
//! on every use: see [`crate::owned_dir`]): a random chip secret (`chip-secret.INSECURE`, mode
//! 0600, refused unless it is ours and private), and a certificate chain in AMD's shape:
//! - ARK and ASK: RSA-4096, signed with RSASSA-PSS (SHA-384, MGF1-SHA-384, salt 48), ARK
//!   self-signed, ASK by the ARK. Their private keys are used once and dropped, as AMD keeps
//!   its own: only the chain remains.
//! - VCEK: ECDSA P-384, derived from the chip secret and the TCB (as the real one is), signed
//!   by the ASK, with the key-distribution service's extensions (struct version, product name,
//!   the TCB components, the hardware id).
//!
//! Subjects say SIMULATED; the VCEK's common name does not contain "SEV" (snpguest would take
//! it for an ASK).

use std::io::Read;
use std::path::Path;
use std::path::PathBuf;

use p384::ecdsa::SigningKey as EcdsaKey;
use sha2::Digest;
use sha2::Sha384;
use sha2::Sha512;

use crate::owned_dir::OwnedDir;
// The SEV-SNP facts this simulator shares with the paravisor and the verifier.
pub use crate::snp::*;

/// Files of a platform directory.
pub const CHIP_SECRET: &str = "chip-secret.INSECURE";

/// The TCB the simulated firmware reports: boot loader, TEE, SNP, microcode SPLs.
pub const TCB: Tcb = Tcb {
    bootloader: 3,
    tee: 0,
    snp: 8,
    microcode: 115,
};

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("platform directory {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error(
        "platform directory {0} already holds a platform identity (delete it to make a new one)"
    )]
    Exists(String),
    #[error("making the certificates: {0}")]
    Crypto(String),
    #[error("{0} is not a platform directory (no {CHIP_SECRET}); run `paravisor platform init`")]
    Missing(String),
    #[error("{0}")]
    Dir(#[from] crate::owned_dir::DirError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PlatformError + '_ {
    move |error| PlatformError::Io {
        path: path.display().to_string(),
        error,
    }
}

pub fn crypto(e: impl std::fmt::Display) -> PlatformError {
    PlatformError::Crypto(e.to_string())
}

/// A platform's certificate chain, PEM: what provisioning writes next to the chip secret.
pub struct ChainPem {
    pub ark: String,
    pub ask: String,
    pub vcek: String,
}

/// Makes the chain of a new platform (its VCEK from [`Platform::vcek_key`] and
/// [`Platform::chip_id`]). Certificate building (RSA-4096 keys, X.509) is in the tools
/// (`pv_tools::provision`), not in the trusted core, which only writes what it is given.
pub type Certificates = dyn Fn(&Platform) -> Result<ChainPem, PlatformError>;

/// A provisioned platform: its chip secret (and what derives from it), and its directory.
pub struct Platform {
    secret: zeroize::Zeroizing<[u8; 64]>,
    dir: OwnedDir,
}

/// Largest certificate read from a platform directory.
const MAX_CERT: u64 = 64 * 1024;

impl Platform {
    /// Provisions a new platform identity in `dir` (which must not hold one). The directory
    /// above it may be shared (`/tmp`) but must be safe to make a directory in
    /// ([`crate::owned_dir::ParentDir`]).
    pub fn init(dir: &Path, certificates: &Certificates) -> Result<Platform, PlatformError> {
        match Platform::open(dir) {
            Ok(_) => return Err(PlatformError::Exists(dir.display().to_string())),
            Err(PlatformError::Missing(_)) => {}
            // Someone else's directory (or a link, a file) in the way: refused by name.
            Err(e) => return Err(e),
        }
        let name = dir.file_name().ok_or_else(|| PlatformError::Io {
            path: dir.display().to_string(),
            error: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory name"),
        })?;
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let parent = crate::owned_dir::ParentDir::open(&parent, "parent directory")?;
        // Built in a new private directory and renamed into place: a platform is either
        // complete or absent, and two first runs at once cannot mix their halves.
        let (tmp_name, tmp) =
            parent.new_private_dir(&format!(".{}.init-", name.to_string_lossy()))?;
        let result = Self::init_in(&tmp, certificates).and_then(|()| {
            // An empty directory in the way is replaced; a platform already there wins.
            parent.rename(&tmp_name, Path::new(name)).map_err(|e| {
                if Platform::open(dir).is_ok() {
                    PlatformError::Exists(dir.display().to_string())
                } else {
                    io(dir)(e)
                }
            })
        });
        if result.is_err() {
            for f in [ARK_PEM, ASK_PEM, VCEK_PEM, CHIP_SECRET] {
                let _ = tmp.remove(Path::new(f));
            }
            let _ = parent.remove_dir(&tmp_name);
        }
        result?;
        Platform::open(dir)
    }

    /// Writes a new identity into the empty private directory `dir`: a new chip secret, and
    /// the chain `certificates` makes for it.
    fn init_in(dir: &OwnedDir, certificates: &Certificates) -> Result<(), PlatformError> {
        let mut secret = zeroize::Zeroizing::new([0u8; 64]);
        getrandom::getrandom(&mut secret[..]).map_err(crypto)?;
        let platform = Platform {
            secret,
            dir: dir.try_clone().map_err(io(dir.path()))?,
        };
        let chain = certificates(&platform)?;
        let write = |file: &str, bytes: &[u8], mode: u32| {
            dir.create_new(Path::new(file), mode, |mut f| {
                std::io::Write::write_all(&mut f, bytes)
                    .map(|()| f)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| io(dir.path())(std::io::Error::other(e)))
        };
        for (file, pem) in [
            (ARK_PEM, &chain.ark),
            (ASK_PEM, &chain.ask),
            (VCEK_PEM, &chain.vcek),
        ] {
            write(file, pem.as_bytes(), 0o644)?;
        }
        // Last: a directory with a chip secret is a complete platform.
        write(CHIP_SECRET, &platform.secret[..], 0o600)
    }

    /// Opens a provisioned platform: its directory must be ours and private (and the
    /// directories above it safe), the chip secret a regular 0600 file of ours.
    pub fn open(dir: &Path) -> Result<Platform, PlatformError> {
        let d = match OwnedDir::open(dir, "platform directory", false) {
            Ok(d) => d,
            Err(e) if e.is_missing() => {
                return Err(PlatformError::Missing(dir.display().to_string()))
            }
            Err(e) => return Err(e.into()),
        };
        let path = d.shown(Path::new(CHIP_SECRET));
        let Some(file) = d.open_secret(Path::new(CHIP_SECRET))? else {
            return Err(PlatformError::Missing(dir.display().to_string()));
        };
        let mut bytes = zeroize::Zeroizing::new(Vec::new());
        file.take(65).read_to_end(&mut bytes).map_err(io(&path))?;
        if bytes.len() != 64 {
            return Err(PlatformError::Crypto(format!(
                "{} holds {}{} bytes, not a 64-byte chip secret",
                path.display(),
                if bytes.len() > 64 { "more than " } else { "" },
                bytes.len().min(64)
            )));
        }
        let mut secret = zeroize::Zeroizing::new([0u8; 64]);
        secret.copy_from_slice(&bytes);
        Ok(Platform { secret, dir: d })
    }

    /// The platform's directory, as it was named.
    pub fn dir(&self) -> &Path {
        self.dir.path()
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
    pub fn vcek_key(&self, tcb: Tcb) -> Result<EcdsaKey, PlatformError> {
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
        Err(PlatformError::Crypto(
            "no valid P-384 scalar from the chip secret".into(),
        ))
    }
}

/// The chain as one PEM text: ARK, ASK, VCEK.
pub fn chain_pem(platform: &Platform) -> Result<String, PlatformError> {
    chain_in(&platform.dir)
}

/// The chain of the platform directory `dir` (checked as [`Platform::open`] does), for a
/// verifier: one PEM text, ARK, ASK, VCEK.
pub fn read_chain(dir: &Path) -> Result<String, PlatformError> {
    chain_in(&OwnedDir::open(dir, "platform directory", false)?)
}

fn chain_in(dir: &OwnedDir) -> Result<String, PlatformError> {
    let mut out = String::new();
    for f in [ARK_PEM, ASK_PEM, VCEK_PEM] {
        let path = dir.shown(Path::new(f));
        let bytes = dir
            .read(Path::new(f), MAX_CERT)?
            .ok_or_else(|| PlatformError::Missing(dir.path().display().to_string()))?;
        out.push_str(
            &String::from_utf8(bytes)
                .map_err(|e| PlatformError::Crypto(format!("{}: {e}", path.display())))?,
        );
    }
    Ok(out)
}

/// SIGNATURE_ALGO: ECDSA P-384 with SHA-384.
const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;
/// CPUID family / model / stepping of the claimed generation (Milan: family 19h, model 01h).
const CPUID_FAMILY: u8 = 0x19;
const CPUID_MODEL: u8 = 0x01;
const CPUID_STEPPING: u8 = 0x01;

/// A new guest's REPORT_ID (random; the hardware assigns one at launch).
pub fn new_report_id() -> Result<[u8; 32], PlatformError> {
    let mut id = [0u8; 32];
    getrandom::getrandom(&mut id).map_err(crypto)?;
    Ok(id)
}

impl Platform {
    /// An SEV-SNP ATTESTATION_REPORT (version 3, little-endian, 0x4A0 bytes), signed with the
    /// VCEK over bytes 0..0x2A0 (ECDSA P-384 / SHA-384; R and S little-endian, zero-padded
    /// to 72 bytes, at 0x2A0 and 0x2E8). Reserved bytes are zero.
    pub fn report(&self, req: &ReportRequest) -> Result<[u8; REPORT_LEN], PlatformError> {
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
    pub fn sign(&self, r: &mut [u8; REPORT_LEN]) -> Result<(), PlatformError> {
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

impl Platform {
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
            crate::util::hex(&k),
            "f843b39f0608d8a98ecc1e63840ec5527474562d613b0105680c9af1b6a90eab"
        );
    }
}
