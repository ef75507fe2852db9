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
use std::str::FromStr;
use std::time::Duration;

use p384::ecdsa::SigningKey as EcdsaKey;
use rsa::pss::SigningKey as PssKey;
use rsa::RsaPrivateKey;
use sha2::Digest;
use sha2::Sha384;
use sha2::Sha512;
use x509_cert::builder::Builder;
use x509_cert::builder::CertificateBuilder;
use x509_cert::builder::Profile;
use x509_cert::der::asn1::Ia5String;
use x509_cert::der::asn1::OctetString;
use x509_cert::der::oid::AssociatedOid;
use x509_cert::der::oid::ObjectIdentifier;
use x509_cert::der::Encode;
use x509_cert::der::EncodePem;
use x509_cert::ext::AsExtension;
use x509_cert::ext::Extension;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::EncodePublicKey;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::Validity;

use crate::owned_dir::OwnedDir;
// The SEV-SNP facts this simulator shares with the paravisor and the verifier.
pub use crate::snp::*;

/// Files of a platform directory.
pub const CHIP_SECRET: &str = "chip-secret.INSECURE";

/// The product the simulated chip claims to be (a real generation, so that verifiers know
/// the report layout): AMD EPYC Milan.
pub const PRODUCT: &str = "Milan";
/// The TCB the simulated firmware reports: boot loader, TEE, SNP, microcode SPLs.
pub const TCB: Tcb = Tcb {
    bootloader: 3,
    tee: 0,
    snp: 8,
    microcode: 115,
};

/// How long the certificates are valid.
const VALIDITY: Duration = Duration::from_secs(25 * 365 * 24 * 3600);

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

fn crypto(e: impl std::fmt::Display) -> PlatformError {
    PlatformError::Crypto(e.to_string())
}

/// A provisioned platform: its chip secret (and what derives from it), and its directory.
pub struct Platform {
    secret: zeroize::Zeroizing<[u8; 64]>,
    dir: OwnedDir,
}

/// Largest certificate read from a platform directory.
const MAX_CERT: u64 = 64 * 1024;

/// A KDS extension of the VCEK: an OID and its DER value.
struct KdsExtension {
    oid: ObjectIdentifier,
    der: Vec<u8>,
}

impl AssociatedOid for KdsExtension {
    // Never used: `to_extension` below writes each extension's own OID.
    const OID: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.4.1.3704.1");
}

impl x509_cert::der::Encode for KdsExtension {
    fn encoded_len(&self) -> x509_cert::der::Result<x509_cert::der::Length> {
        x509_cert::der::Length::try_from(self.der.len())
    }

    fn encode(&self, writer: &mut impl x509_cert::der::Writer) -> x509_cert::der::Result<()> {
        writer.write(&self.der)
    }
}

impl AsExtension for KdsExtension {
    fn critical(&self, _: &Name, _: &[Extension]) -> bool {
        false
    }

    fn to_extension(&self, _: &Name, _: &[Extension]) -> Result<Extension, x509_cert::der::Error> {
        Ok(Extension {
            extn_id: self.oid,
            critical: false,
            extn_value: OctetString::new(self.der.clone())?,
        })
    }
}

/// The VCEK's key-distribution-service extensions (OIDs 1.3.6.1.4.1.3704.1.*).
fn kds_extensions(tcb: Tcb, hw_id: &[u8; 64]) -> Result<Vec<KdsExtension>, PlatformError> {
    let int = |v: u8| x509_cert::der::asn1::Int::new(&[v]).and_then(|i| i.to_der());
    let uint = |v: u8| -> Result<Vec<u8>, PlatformError> {
        // A non-negative INTEGER: a leading zero byte when the top bit is set.
        if v >= 0x80 {
            x509_cert::der::asn1::Int::new(&[0, v])
                .and_then(|i| i.to_der())
                .map_err(crypto)
        } else {
            int(v).map_err(crypto)
        }
    };
    let oid = |s: &str| ObjectIdentifier::from_str(s).map_err(crypto);
    let mut out = vec![
        KdsExtension {
            oid: oid("1.3.6.1.4.1.3704.1.1")?,
            der: uint(1)?,
        },
        KdsExtension {
            oid: oid("1.3.6.1.4.1.3704.1.2")?,
            der: Ia5String::new(&format!("{PRODUCT}-B0"))
                .and_then(|s| s.to_der())
                .map_err(crypto)?,
        },
    ];
    for (n, v) in [
        (1, tcb.bootloader),
        (2, tcb.tee),
        (3, tcb.snp),
        (4, 0),
        (5, 0),
        (6, 0),
        (7, 0),
        (8, tcb.microcode),
    ] {
        out.push(KdsExtension {
            oid: oid(&format!("1.3.6.1.4.1.3704.1.3.{n}"))?,
            der: uint(v)?,
        });
    }
    out.push(KdsExtension {
        oid: oid("1.3.6.1.4.1.3704.1.4")?,
        der: OctetString::new(hw_id.to_vec())
            .and_then(|o| o.to_der())
            .map_err(crypto)?,
    });
    Ok(out)
}

fn name(cn: &str) -> Result<Name, PlatformError> {
    Name::from_str(&format!(
        "CN={cn},OU=Engineering,O=SIMULATED PSP - NOT AMD,L=Santa Clara,ST=CA,C=US"
    ))
    .map_err(crypto)
}

/// From one day before now (a verifier whose clock is a little behind must not see a chain
/// that is "not yet valid") for 25 years.
fn validity() -> Result<Validity, PlatformError> {
    const SLACK: Duration = Duration::from_secs(24 * 3600);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(crypto)?;
    let start = now.saturating_sub(SLACK);
    // RFC 5280: UTCTime through 2049, GeneralizedTime from 2050 on.
    const Y2050: Duration = Duration::from_secs(2_524_608_000);
    let time = |d: Duration| {
        if d < Y2050 {
            x509_cert::der::asn1::UtcTime::from_unix_duration(d).map(x509_cert::time::Time::from)
        } else {
            x509_cert::der::asn1::GeneralizedTime::from_unix_duration(d)
                .map(x509_cert::time::Time::from)
        }
        .map_err(crypto)
    };
    Ok(Validity {
        not_before: time(start)?,
        not_after: time(start + SLACK + VALIDITY)?,
    })
}

fn serial() -> Result<SerialNumber, PlatformError> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(crypto)?;
    b[0] &= 0x7f;
    SerialNumber::new(&b).map_err(crypto)
}

fn pem(cert: &x509_cert::Certificate) -> Result<String, PlatformError> {
    cert.to_pem(x509_cert::der::pem::LineEnding::LF)
        .map_err(crypto)
}

impl Platform {
    /// Provisions a new platform identity in `dir` (which must not hold one). The directory
    /// above it may be shared (`/tmp`) but must be safe to make a directory in
    /// ([`crate::owned_dir::ParentDir`]).
    pub fn init(dir: &Path) -> Result<Platform, PlatformError> {
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
        let result = Self::init_in(&tmp).and_then(|()| {
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

    /// Writes a new identity into the empty private directory `dir`.
    fn init_in(dir: &OwnedDir) -> Result<(), PlatformError> {
        let mut secret = zeroize::Zeroizing::new([0u8; 64]);
        getrandom::getrandom(&mut secret[..]).map_err(crypto)?;
        let platform = Platform {
            secret,
            dir: dir.try_clone().map_err(io(dir.path()))?,
        };
        let mut rng = rand_core::OsRng;
        let ark_key = RsaPrivateKey::new(&mut rng, 4096).map_err(crypto)?;
        let ask_key = RsaPrivateKey::new(&mut rng, 4096).map_err(crypto)?;
        let ark_signer = PssKey::<Sha384>::new(ark_key.clone());
        let ask_signer = PssKey::<Sha384>::new(ask_key.clone());
        let spki = |k: &RsaPrivateKey| {
            k.to_public_key()
                .to_public_key_der()
                .map_err(crypto)
                .and_then(|d| SubjectPublicKeyInfoOwned::try_from(d.as_bytes()).map_err(crypto))
        };
        let ark_name = name(&format!("ARK-{PRODUCT}-SIM"))?;
        let ask_name = name(&format!("SEV-{PRODUCT}-SIM"))?;
        let ark = CertificateBuilder::new(
            Profile::Root,
            serial()?,
            validity()?,
            ark_name.clone(),
            spki(&ark_key)?,
            &ark_signer,
        )
        .map_err(crypto)?
        .build_with_rng::<rsa::pss::Signature>(&mut rng)
        .map_err(crypto)?;
        let ask = CertificateBuilder::new(
            Profile::SubCA {
                issuer: ark_name,
                path_len_constraint: Some(0),
            },
            serial()?,
            validity()?,
            ask_name.clone(),
            spki(&ask_key)?,
            &ark_signer,
        )
        .map_err(crypto)?
        .build_with_rng::<rsa::pss::Signature>(&mut rng)
        .map_err(crypto)?;
        let vcek_key = platform.vcek_key(TCB)?;
        let vcek_spki = vcek_key
            .verifying_key()
            .to_public_key_der()
            .map_err(crypto)
            .and_then(|d| SubjectPublicKeyInfoOwned::try_from(d.as_bytes()).map_err(crypto))?;
        let mut vcek = CertificateBuilder::new(
            Profile::Leaf {
                issuer: ask_name,
                enable_key_agreement: false,
                enable_key_encipherment: false,
            },
            serial()?,
            validity()?,
            name("VCEK-SIM")?,
            vcek_spki,
            &ask_signer,
        )
        .map_err(crypto)?;
        for ext in kds_extensions(TCB, &platform.chip_id())? {
            vcek.add_extension(&ext).map_err(crypto)?;
        }
        let vcek = vcek
            .build_with_rng::<rsa::pss::Signature>(&mut rng)
            .map_err(crypto)?;
        let write = |file: &str, bytes: &[u8], mode: u32| {
            dir.create_new(Path::new(file), mode, |mut f| {
                std::io::Write::write_all(&mut f, bytes)
                    .map(|()| f)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| io(dir.path())(std::io::Error::other(e)))
        };
        for (file, cert) in [(ARK_PEM, &ark), (ASK_PEM, &ask), (VCEK_PEM, &vcek)] {
            write(file, pem(cert)?.as_bytes(), 0o644)?;
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
    use sev::certs::snp::ca;
    use sev::certs::snp::Certificate;
    use sev::certs::snp::Chain;
    use sev::certs::snp::Verifiable;

    use super::*;

    fn cert(dir: &Path, file: &str) -> Certificate {
        Certificate::from_pem(&std::fs::read(dir.join(file)).unwrap()).unwrap()
    }

    #[test]
    fn a_new_platform_has_a_chain_the_sev_crate_verifies() {
        let dir = std::env::temp_dir().join(format!("pv-platform-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let platform = Platform::init(&dir).expect("init");
        let chain = Chain {
            ca: ca::Chain {
                ark: cert(&dir, ARK_PEM),
                ask: cert(&dir, ASK_PEM),
            },
            vek: cert(&dir, VCEK_PEM),
        };
        (&chain).verify().expect("the chain verifies");
        // A second init refuses; opening gives the same chip.
        assert!(matches!(
            Platform::init(&dir),
            Err(PlatformError::Exists(_))
        ));
        let again = Platform::open(&dir).unwrap();
        assert_eq!(again.chip_id(), platform.chip_id());
        // The VCEK certificate carries the key the chip derives.
        let vcek_pub = again.vcek_key(TCB).unwrap();
        let sec1 = vcek_pub.verifying_key().to_encoded_point(false);
        assert_eq!(chain.vek.public_key_sec1(), sec1.as_bytes());
        // A chain whose ASK another ARK signed does not verify.
        let other = dir.join("other");
        Platform::init(&other).unwrap();
        let mixed = Chain {
            ca: ca::Chain {
                ark: cert(&other, ARK_PEM),
                ask: cert(&dir, ASK_PEM),
            },
            vek: cert(&dir, VCEK_PEM),
        };
        assert!((&mixed).verify().is_err());

        // A report: the sev crate parses it and verifies it against the chain.
        let req = ReportRequest {
            report_data: [0x5a; 64],
            measurement: [0x11; 48],
            host_data: [0; 32],
            vmpl: 0,
            policy: POLICY,
            report_id: [7; 32],
        };
        let raw = platform.report(&req).unwrap();
        let report =
            <sev::firmware::guest::AttestationReport as sev::parser::ByteParser<()>>::from_bytes(
                &raw,
            )
            .expect("parses");
        assert_eq!(report.report_data, [0x5a; 64]);
        assert_eq!(report.measurement, [0x11; 48]);
        assert_eq!(report.chip_id, platform.chip_id());
        (&chain, &report).verify().expect("the report verifies");
        // Any flipped bit of the signed part breaks it.
        for at in [0x00usize, 0x50, 0x90, 0x1A0, 0x29F] {
            let mut bad = raw;
            bad[at] ^= 1;
            let ok = <sev::firmware::guest::AttestationReport as sev::parser::ByteParser<()>>::from_bytes(&bad)
                .map(|r| (&chain, &r).verify().is_ok())
                .unwrap_or(false);
            assert!(!ok, "a flip at {at:#x} went unnoticed");
        }
        // Another platform's report does not verify with this chain.
        let foreign = Platform::open(&other).unwrap().report(&req).unwrap();
        let foreign =
            <sev::firmware::guest::AttestationReport as sev::parser::ByteParser<()>>::from_bytes(
                &foreign,
            )
            .unwrap();
        assert!((&chain, &foreign).verify().is_err());
        // Derived keys: bound to the measurement only when it is selected.
        let facts = LaunchFacts {
            measurement: [1; 48],
            policy: POLICY,
            guest_svn: 0,
        };
        let changed = LaunchFacts {
            measurement: [2; 48],
            ..facts
        };
        let by_m = FieldSelect {
            measurement: true,
            ..Default::default()
        };
        let k = platform.derived_key(by_m, &facts, b"VMGSKEY");
        assert_eq!(k, again.derived_key(by_m, &facts, b"VMGSKEY"));
        assert_ne!(k, platform.derived_key(by_m, &changed, b"VMGSKEY"));
        assert_ne!(k, platform.derived_key(by_m, &facts, b"ISOHWKEY"));
        let chip_only = FieldSelect::default();
        assert_eq!(
            platform.derived_key(chip_only, &facts, b"VMGSKEY"),
            platform.derived_key(chip_only, &changed, b"VMGSKEY")
        );
        let foreign = Platform::open(&other).unwrap();
        assert_ne!(k, foreign.derived_key(by_m, &facts, b"VMGSKEY"));
        let _ = std::fs::remove_dir_all(&dir);
    }

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
