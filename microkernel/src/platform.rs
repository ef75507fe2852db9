//! SIMULATED PLATFORM: where the host keeps the simulated secure processor ([`pv_sim::Chip`],
//! in `sim/`, the only code that plays hardware) and its certificate chain. Nothing here is
//! secure: the chip secret is a file.
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

pub use pv_sim::Chip;
pub use pv_sim::TCB;

use crate::owned_dir::OwnedDir;
// The SEV-SNP facts this simulator shares with the paravisor and the verifier.
pub use crate::snp::*;

/// Files of a platform directory.
pub const CHIP_SECRET: &str = "chip-secret.INSECURE";

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

impl From<pv_sim::ChipError> for PlatformError {
    fn from(e: pv_sim::ChipError) -> PlatformError {
        match e {
            pv_sim::ChipError::Crypto(m) => PlatformError::Crypto(m),
        }
    }
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

/// A provisioned platform: its chip (the secret and what derives from it: reports, keys, the
/// VCEK; a `Platform` derefs to it), and its directory.
pub struct Platform {
    chip: Chip,
    dir: OwnedDir,
}

impl std::ops::Deref for Platform {
    type Target = Chip;
    fn deref(&self) -> &Chip {
        &self.chip
    }
}

/// A new guest's REPORT_ID (random; the hardware assigns one at launch).
pub fn new_report_id() -> Result<[u8; 32], PlatformError> {
    Ok(pv_sim::new_report_id()?)
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
        let platform = Platform {
            chip: Chip::generate()?,
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
        write(CHIP_SECRET, &platform.chip.secret()[..], 0o600)
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
        let mut secret = zeroize::Zeroizing::new([0u8; pv_sim::SECRET_LEN]);
        secret.copy_from_slice(&bytes);
        Ok(Platform {
            chip: Chip::from_secret(secret),
            dir: d,
        })
    }

    /// The platform's directory, as it was named.
    pub fn dir(&self) -> &Path {
        self.dir.path()
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
