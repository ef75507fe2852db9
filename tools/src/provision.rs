//! Provisioning a SIMULATED platform's certificate chain, in AMD's shape: ARK and ASK
//! (RSA-4096, RSASSA-PSS with SHA-384, MGF1-SHA-384, salt 48; the ARK self-signed, the ASK
//! by the ARK, their private keys used once and dropped), and the VCEK (the chip's P-384
//! key, signed by the ASK, with the key-distribution service's extensions). The core
//! (`microkernel::platform`) makes the chip secret and writes what this returns; the RSA and
//! X.509 code stays out of the trusted binary.

use std::str::FromStr;
use std::time::Duration;

use microkernel::platform::crypto;
use microkernel::platform::ChainPem;
use microkernel::platform::Platform;
use microkernel::platform::PlatformError;
use microkernel::platform::TCB;
use microkernel::snp::Tcb;
use rsa::pss::SigningKey as PssKey;
use rsa::RsaPrivateKey;
use sha2::Sha384;
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

/// The product the simulated chip claims to be (a real generation, so that verifiers know
/// the report layout): AMD EPYC Milan.
pub const PRODUCT: &str = "Milan";

/// How long the certificates are valid.
const VALIDITY: Duration = Duration::from_secs(25 * 365 * 24 * 3600);

/// Provisions a SIMULATED platform in `dir` (see `Platform::init`) with a chain made here.
pub fn init(dir: &std::path::Path) -> Result<Platform, PlatformError> {
    Platform::init(dir, &certificates)
}

/// The chain of a new platform: fresh ARK and ASK, and the VCEK of `platform`'s chip.
pub fn certificates(platform: &Platform) -> Result<ChainPem, PlatformError> {
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
    Ok(ChainPem {
        ark: pem(&ark)?,
        ask: pem(&ask)?,
        vcek: pem(&vcek)?,
    })
}

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
