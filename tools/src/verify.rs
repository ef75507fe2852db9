//! `paravisor attest verify`: what a remote verifier does with our evidence, using the `sev`
//! crate for the certificate chain and the report signature. Every input is hostile; every
//! refusal names its reason.

use std::path::Path;

use sev::certs::snp::ca;
use sev::certs::snp::Certificate;
use sev::certs::snp::Chain;
use sev::certs::snp::Verifiable;
use sev::firmware::guest::AttestationReport;
use sev::parser::ByteParser;
use sha2::Digest;

use microkernel::snp::REPORT_LEN;
use microkernel::util::hex;
use microkernel::util::read_at_most;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{file} is not a certificate: {reason}")]
    Certificate { file: String, reason: String },
    #[error("the ARK's SHA-256 fingerprint is {found}, not the pinned {pinned}: this chain is not from the platform you trust")]
    ArkFingerprint { found: String, pinned: String },
    #[error("the pinned ARK fingerprint \"{0}\" is not a SHA-256 (64 hex digits, colons allowed)")]
    BadPin(String),
    #[error("the certificate chain does not verify: {0}")]
    Chain(String),
    #[error("the report is {0} bytes, not {REPORT_LEN}")]
    ReportSize(usize),
    #[error("the report does not parse: {0}")]
    ReportFormat(String),
    #[error("reserved bytes {start:#x}..{end:#x} of the report are not zero")]
    Reserved { start: usize, end: usize },
    #[error("the report's signature does not verify with the VCEK: {0}")]
    Signature(String),
    #[error("the report's signature algorithm is {0}, not 1 (ECDSA P-384 with SHA-384)")]
    SignatureAlgorithm(u32),
    #[error("measurement mismatch: the report says {found}, expected {expected}")]
    Measurement { found: String, expected: String },
    #[error("report_data mismatch: the report says {found}, expected {expected}")]
    ReportData { found: String, expected: String },
    #[error("the report's {component} SPL is {report}, but the VCEK certifies {certificate}: a VCEK is issued for one TCB, and this one is not the report's")]
    Tcb {
        component: &'static str,
        report: u8,
        certificate: u8,
    },
    #[error("the report's chip id {report}.. is not the VCEK's hwID {certificate}..: the report is from another chip")]
    ChipId { report: String, certificate: String },
    #[error("the VCEK's {0} extension does not parse")]
    Extension(&'static str),
}

/// The KDS extensions of a VCEK (AMD's VCEK specification) naming the TCB components it was
/// issued for, and the chip's hardware id. Which byte of REPORTED_TCB holds a component
/// depends on the generation (Turin added FMC and moved the others); the sev crate's decoder
/// knows, so the report's values come from its parse.
const TCB_EXTENSIONS: [(&str, &str); 5] = [
    ("1.3.6.1.4.1.3704.1.3.1", "boot loader"),
    ("1.3.6.1.4.1.3704.1.3.2", "TEE"),
    ("1.3.6.1.4.1.3704.1.3.3", "SNP"),
    ("1.3.6.1.4.1.3704.1.3.8", "microcode"),
    ("1.3.6.1.4.1.3704.1.3.9", "FMC"),
];
const HWID_EXTENSION: &str = "1.3.6.1.4.1.3704.1.4";

/// Checks the report's REPORTED_TCB and CHIP_ID against what the VCEK (DER) certifies, as
/// AMD's tools do: the VCEK is specific to one chip and one TCB. Extensions the certificate
/// does not carry are not checked (a VLEK carries no hwID).
fn check_vcek_facts(vcek_der: &[u8], report: &AttestationReport) -> Result<(), VerifyError> {
    use x509_cert::der::Decode;
    let cert =
        x509_cert::Certificate::from_der(vcek_der).map_err(|e| VerifyError::Certificate {
            file: microkernel::snp::VCEK_PEM.into(),
            reason: e.to_string(),
        })?;
    let extensions = cert.tbs_certificate.extensions.unwrap_or_default();
    let find = |oid: &str| {
        extensions
            .iter()
            .find(|e| e.extn_id.to_string() == oid)
            .map(|e| e.extn_value.as_bytes().to_vec())
    };
    let tcb = &report.reported_tcb;
    for (oid, component) in TCB_EXTENSIONS {
        let Some(value) = find(oid) else {
            continue;
        };
        let int = x509_cert::der::asn1::Uint::from_der(&value)
            .map_err(|_| VerifyError::Extension(component))?;
        let bytes = int.as_bytes();
        let certificate = match bytes {
            [v] => *v,
            [] => 0,
            _ => return Err(VerifyError::Extension(component)),
        };
        let reported = match component {
            "boot loader" => tcb.bootloader,
            "TEE" => tcb.tee,
            "SNP" => tcb.snp,
            "microcode" => tcb.microcode,
            // A report of a generation without FMC against a VCEK that certifies one.
            _ => tcb
                .fmc
                .ok_or(VerifyError::Extension("FMC (the report has none)"))?,
        };
        if reported != certificate {
            return Err(VerifyError::Tcb {
                component,
                report: reported,
                certificate,
            });
        }
    }
    if let Some(value) = find(HWID_EXTENSION) {
        // A DER OCTET STRING of 64 bytes; older VCEKs (AMD's KDS before its x509 DER fix, still
        // in circulation) carry the 64 raw bytes.
        let hwid = match x509_cert::der::asn1::OctetString::from_der(&value) {
            Ok(o) if o.as_bytes().len() == 64 => o.as_bytes().to_vec(),
            _ if value.len() == 64 => value,
            _ => return Err(VerifyError::Extension("hwID")),
        };
        let chip = &report.chip_id[..];
        if hwid != chip {
            return Err(VerifyError::ChipId {
                report: hex(&chip[..8]),
                certificate: hex(&hwid[..8]),
            });
        }
    }
    Ok(())
}

/// Reserved ranges of every report version (must be zero).
const RESERVED: &[(usize, usize)] = &[
    (0x4C, 0x50),
    (0x18B, 0x1A0),
    (0x1EB, 0x1EC),
    (0x1EF, 0x1F0),
    (0x330, 0x4A0),
];

/// Reserved ranges that depend on the version: before version 3 the CPUID bytes, before
/// version 5 the mitigation vectors (0x1F8..0x208) are reserved.
fn reserved_for(version: u32) -> Vec<(usize, usize)> {
    let mut r = RESERVED.to_vec();
    if version < 3 {
        r.push((0x188, 0x18B));
    }
    r.push(if version < 5 {
        (0x1F8, 0x2A0)
    } else {
        (0x208, 0x2A0)
    });
    r
}

/// Where the report's four TCB_VERSION fields are (CURRENT, REPORTED, COMMITTED, LAUNCH).
const TCB_FIELDS: [usize; 4] = [0x38, 0x180, 0x1E0, 0x1F0];

/// The reserved bytes inside each TCB_VERSION: Milan and Genoa put boot loader and TEE in
/// bytes 0-1 and SNP and microcode in 6-7 (2..6 reserved); Turin puts FMC, boot loader, TEE,
/// SNP in 0-3 and microcode in 7 (4..7 reserved). The generation is told as the sev crate
/// tells it, so both read the same layout: from version 3 on by CPUID family (1Ah: Turin);
/// in version 2 (no CPUID bytes) by a chip id whose last 56 bytes are zero (Turin's 8-byte
/// id).
fn tcb_reserved(report: &[u8], version: u32) -> std::ops::Range<usize> {
    let chip = &report[0x1A0..0x1E0];
    let turin = if version >= 3 {
        report[0x188] == 0x1A
    } else {
        chip.iter().any(|b| *b != 0) && chip[8..].iter().all(|b| *b == 0)
    };
    if turin {
        4..7
    } else {
        2..6
    }
}

/// The report's ECDSA P-384 / SHA-384 signature checked over its raw bytes 0..0x2A0 with the
/// VCEK's key. The sev crate (8.0.0) checks a re-encoding of its parsed report instead, which
/// drops the reserved bytes inside the TCB fields: with those flipped its verdict (and
/// snpguest 0.11.0's) is still "signed". R and S are 72-byte little-endian fields holding
/// 48-byte values: the 24 bytes above must be zero.
pub fn check_raw_signature(vcek_der: &[u8], report: &[u8]) -> Result<(), VerifyError> {
    use p384::ecdsa::signature::DigestVerifier;
    use x509_cert::der::Decode;
    if report.len() != REPORT_LEN {
        return Err(VerifyError::ReportSize(report.len()));
    }
    let algorithm = u32::from_le_bytes([report[0x34], report[0x35], report[0x36], report[0x37]]);
    if algorithm != 1 {
        return Err(VerifyError::SignatureAlgorithm(algorithm));
    }
    let cert =
        x509_cert::Certificate::from_der(vcek_der).map_err(|e| VerifyError::Certificate {
            file: microkernel::snp::VCEK_PEM.into(),
            reason: e.to_string(),
        })?;
    let spki = cert.tbs_certificate.subject_public_key_info;
    let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(spki.subject_public_key.raw_bytes())
        .map_err(|_| VerifyError::Certificate {
            file: microkernel::snp::VCEK_PEM.into(),
            reason: "its public key is not an ECDSA P-384 key".into(),
        })?;
    let scalar = |at: usize| -> Result<[u8; 48], VerifyError> {
        let field = &report[at..at + 72];
        if field[48..].iter().any(|b| *b != 0) {
            return Err(VerifyError::Signature(format!(
                "the {} value at {at:#x} is wider than 48 bytes",
                if at == 0x2A0 { "R" } else { "S" }
            )));
        }
        let mut be = [0u8; 48];
        for (i, b) in field[..48].iter().rev().enumerate() {
            be[i] = *b;
        }
        Ok(be)
    };
    let (r, s) = (scalar(0x2A0)?, scalar(0x2E8)?);
    let signature = p384::ecdsa::Signature::from_scalars(r, s)
        .map_err(|_| VerifyError::Signature("R or S is not a valid P-384 scalar".into()))?;
    key.verify_digest(
        sha2::Sha384::new_with_prefix(&report[..microkernel::snp::SIGNED_LEN]),
        &signature,
    )
    .map_err(|_| {
        VerifyError::Signature(format!(
            "bytes 0..{:#x} are not what the VCEK signed",
            microkernel::snp::SIGNED_LEN
        ))
    })
}

/// What a verified report says.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Claims {
    pub version: u32,
    /// A 64-bit field: in JSON a hex string, since JSON numbers above 2^53 lose bits in
    /// most readers.
    #[serde(serialize_with = "hex_u64")]
    pub policy: u64,
    pub vmpl: u32,
    pub measurement: String,
    pub report_data: String,
    pub host_data: String,
    pub chip_id: String,
    /// A 64-bit field (microcode SPL in its top byte): in JSON a hex string.
    #[serde(serialize_with = "hex_u64")]
    pub reported_tcb: u64,
}

/// A 64-bit value as `0x` and 16 hex digits.
fn hex_u64<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#018x}"))
}

/// One check a verification made, and its result (`attest verify --json` lists them).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// What was found (and, for a failed check, why it is refused).
    pub detail: String,
}

/// Everything a verification did: the checks in the order they were made (the last one
/// failed if the verification did), and the claims if every check passed.
#[derive(Debug)]
pub struct Verification {
    pub checks: Vec<Check>,
    pub outcome: Result<Claims, VerifyError>,
}

/// Records each check as it is made.
#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    /// Records `result` under `name`: `detail` of the value if it passed, the error if not.
    fn record<T>(
        &mut self,
        name: &'static str,
        result: Result<T, VerifyError>,
        detail: impl FnOnce(&T) -> String,
    ) -> Result<T, VerifyError> {
        let (ok, detail) = match &result {
            Ok(v) => (true, detail(v)),
            Err(e) => (false, e.to_string()),
        };
        self.0.push(Check { name, ok, detail });
        result
    }
}

/// The largest certificate file a verifier reads (AMD's are under 3 KiB).
const MAX_CERTIFICATE_FILE: u64 = 64 * 1024;

fn read(path: &Path) -> Result<Vec<u8>, VerifyError> {
    read_at_most(path, MAX_CERTIFICATE_FILE).map_err(|error| VerifyError::Read {
        path: path.display().to_string(),
        error,
    })
}

fn certificate(dir: &Path, file: &str) -> Result<(Certificate, Vec<u8>), VerifyError> {
    let cert = parse_certificate(&read(&dir.join(file))?, file)?;
    let der = cert.to_der().map_err(|e| VerifyError::Certificate {
        file: file.into(),
        reason: e.to_string(),
    })?;
    Ok((cert, der))
}

/// Parses a report from untrusted bytes: size, zero reserved bytes, then the sev crate's
/// decoder.
pub fn parse_report(report: &[u8]) -> Result<AttestationReport, VerifyError> {
    check_reserved(report)?;
    decode_report(report)
}

/// The report's size, and that every reserved byte of its version is zero; its version.
fn check_reserved(report: &[u8]) -> Result<u32, VerifyError> {
    if report.len() != REPORT_LEN {
        return Err(VerifyError::ReportSize(report.len()));
    }
    let version = u32::from_le_bytes([report[0], report[1], report[2], report[3]]);
    for (start, end) in reserved_for(version) {
        if report[start..end].iter().any(|b| *b != 0) {
            return Err(VerifyError::Reserved { start, end });
        }
    }
    let inner = tcb_reserved(report, version);
    for field in TCB_FIELDS {
        let (start, end) = (field + inner.start, field + inner.end);
        if report[start..end].iter().any(|b| *b != 0) {
            return Err(VerifyError::Reserved { start, end });
        }
    }
    Ok(version)
}

/// The sev crate's decoder.
fn decode_report(report: &[u8]) -> Result<AttestationReport, VerifyError> {
    <AttestationReport as ByteParser<()>>::from_bytes(report)
        .map_err(|e| VerifyError::ReportFormat(e.to_string()))
}

/// Parses a certificate (PEM, or DER when it is not PEM) from untrusted bytes.
///
/// PEM is decoded to DER in one piece first: the streaming PEM reader of `der` 0.7 (behind
/// `Certificate::from_pem`) loops forever on some short bodies (fuzzing found "fg==").
pub fn parse_certificate(bytes: &[u8], file: &str) -> Result<Certificate, VerifyError> {
    let bad = |reason: String| VerifyError::Certificate {
        file: file.into(),
        reason,
    };
    let begin = b"-----BEGIN";
    let at = bytes.windows(begin.len()).position(|w| w == begin);
    let der = if let Some(at) = at {
        // Text before the block (as `openssl x509 -text` writes) is skipped; a second block
        // is refused: each file holds one certificate.
        let pem = &bytes[at..];
        let blocks = pem.windows(begin.len()).filter(|w| w == begin).count();
        if blocks > 1 {
            return Err(bad(format!(
                "it holds {blocks} PEM blocks; each of ark.pem, ask.pem, vcek.pem holds one certificate"
            )));
        }
        let (label, der) =
            x509_cert::der::pem::decode_vec(pem).map_err(|e| bad(format!("PEM: {e}")))?;
        if label != "CERTIFICATE" {
            return Err(bad(format!("a PEM \"{label}\", not a CERTIFICATE")));
        }
        der
    } else {
        bytes.to_vec()
    };
    Certificate::from_der(&der).map_err(|e| bad(e.to_string()))
}

/// SHA-256 of the ARK certificate (DER), as hex: what a verifier pins.
pub fn ark_fingerprint(certs: &Path) -> Result<String, VerifyError> {
    let (_, der) = certificate(certs, microkernel::snp::ARK_PEM)?;
    Ok(hex(&sha2::Sha256::digest(&der)))
}

/// A pinned SHA-256 fingerprint in any of the forms people copy: plain hex, upper or lower
/// case, colon-separated, or openssl's `sha256 Fingerprint=AB:CD:...` line.
pub fn normalize_fingerprint(pin: &str) -> String {
    let pin = pin.rsplit('=').next().unwrap_or(pin).trim();
    let pin = pin
        .strip_prefix("0x")
        .or_else(|| pin.strip_prefix("0X"))
        .unwrap_or(pin);
    pin.chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Verifies `report` against the chain in `certs` (ark.pem, ask.pem, vcek.pem) whose ARK
/// must have the SHA-256 fingerprint `ark_pin`; then the expected measurement and
/// report_data, when given.
pub fn verify(
    report: &[u8],
    certs: &Path,
    ark_pin: &str,
    expected_measurement: Option<&[u8; 48]>,
    expected_report_data: Option<&[u8; 64]>,
) -> Result<Claims, VerifyError> {
    verify_checked(
        report,
        certs,
        ark_pin,
        expected_measurement,
        expected_report_data,
    )
    .outcome
}

/// [`verify`], with the list of checks it made (up to the first that failed).
pub fn verify_checked(
    report: &[u8],
    certs: &Path,
    ark_pin: &str,
    expected_measurement: Option<&[u8; 48]>,
    expected_report_data: Option<&[u8; 64]>,
) -> Verification {
    let mut checks = Checks::default();
    let outcome = run_checks(
        &mut checks,
        report,
        certs,
        ark_pin,
        expected_measurement,
        expected_report_data,
    );
    Verification {
        checks: checks.0,
        outcome,
    }
}

fn run_checks(
    checks: &mut Checks,
    report: &[u8],
    certs: &Path,
    ark_pin: &str,
    expected_measurement: Option<&[u8; 48]>,
    expected_report_data: Option<&[u8; 64]>,
) -> Result<Claims, VerifyError> {
    let ark = (|| {
        let pinned = normalize_fingerprint(ark_pin);
        if pinned.len() != 64 || !pinned.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(VerifyError::BadPin(ark_pin.to_string()));
        }
        let (ark, ark_der) = certificate(certs, microkernel::snp::ARK_PEM)?;
        let found = hex(&sha2::Sha256::digest(&ark_der));
        if found != pinned {
            return Err(VerifyError::ArkFingerprint { found, pinned });
        }
        Ok((ark, pinned))
    })();
    let (ark, _) = checks.record("ark-fingerprint", ark, |(_, pinned)| {
        format!("the ARK's SHA-256 is the pinned {pinned}")
    })?;
    let (ask, vcek, vcek_der) = checks.record(
        "certificates",
        (|| {
            let (ask, _) = certificate(certs, microkernel::snp::ASK_PEM)?;
            let (vcek, vcek_der) = certificate(certs, microkernel::snp::VCEK_PEM)?;
            Ok((ask, vcek, vcek_der))
        })(),
        |_| "ask.pem and vcek.pem are certificates".into(),
    )?;
    let chain = Chain {
        ca: ca::Chain { ark, ask },
        vek: vcek,
    };
    // Link by link first, so that a refusal names the certificate that does not fit; then
    // the sev crate's whole-chain check.
    for (signer, signee, name, what) in [
        (
            &chain.ca.ark,
            &chain.ca.ark,
            "ark-self-signed",
            "the ARK is not self-signed",
        ),
        (
            &chain.ca.ark,
            &chain.ca.ask,
            "ask-signed-by-ark",
            "the ASK is not signed by the ARK",
        ),
        (
            &chain.ca.ask,
            &chain.vek,
            "vcek-signed-by-ask",
            "the VCEK is not signed by the ASK",
        ),
    ] {
        let link = (signer, signee)
            .verify()
            .map_err(|e| VerifyError::Chain(format!("{what} ({e})")));
        checks.record(name, link, |_| "signature valid".into())?;
    }
    checks.record(
        "chain",
        (&chain)
            .verify()
            .map_err(|e| VerifyError::Chain(e.to_string())),
        |_| "ARK -> ASK -> VCEK verifies (sev crate)".into(),
    )?;
    checks.record(
        "report-size",
        if report.len() == REPORT_LEN {
            Ok(())
        } else {
            Err(VerifyError::ReportSize(report.len()))
        },
        |_| format!("{REPORT_LEN} bytes"),
    )?;
    // The signature first: a tampered report is named as such, whatever field was changed.
    checks.record("signature", check_raw_signature(&vcek_der, report), |_| {
        format!(
            "ECDSA P-384 over bytes 0..{:#x} verifies with the VCEK",
            microkernel::snp::SIGNED_LEN
        )
    })?;
    let version = checks.record("reserved-bytes", check_reserved(report), |_| {
        "every reserved byte of the report's version is zero".into()
    })?;
    let parsed = checks.record("report-format", decode_report(report), |_| {
        format!("version {version} report decodes (sev crate)")
    })?;
    checks.record(
        "signature-sev",
        (&chain, &parsed)
            .verify()
            .map_err(|e| VerifyError::Signature(e.to_string())),
        |_| "the sev crate's check of the parsed report agrees".into(),
    )?;
    checks.record(
        "vcek-tcb-and-chip",
        check_vcek_facts(&vcek_der, &parsed),
        |_| {
            "the report's TCB and chip id are those the VCEK certifies (where it names them)".into()
        },
    )?;
    if let Some(m) = expected_measurement {
        let result = if parsed.measurement == *m {
            Ok(())
        } else {
            Err(VerifyError::Measurement {
                found: hex(&parsed.measurement),
                expected: hex(m),
            })
        };
        checks.record("measurement", result, |_| format!("{} as expected", hex(m)))?;
    }
    if let Some(d) = expected_report_data {
        let result = if parsed.report_data == *d {
            Ok(())
        } else {
            Err(VerifyError::ReportData {
                found: hex(&parsed.report_data),
                expected: hex(d),
            })
        };
        checks.record("report-data", result, |_| {
            format!("{} as expected (the nonce)", hex(d))
        })?;
    }
    Ok(Claims {
        version: parsed.version,
        policy: u64::from_le_bytes(report[0x08..0x10].try_into().unwrap_or([0; 8])),
        vmpl: parsed.vmpl,
        measurement: hex(&parsed.measurement),
        report_data: hex(&parsed.report_data),
        host_data: hex(&parsed.host_data),
        chip_id: hex(&parsed.chip_id),
        reported_tcb: u64::from_le_bytes(report[0x180..0x188].try_into().unwrap_or([0; 8])),
    })
}

/// The references a verification was not given, each as a failed check that says what is
/// left unproven: without a measurement the report does not say what was launched, without
/// a nonce (or with an empty one) not when. `attest verify` warns of them, and with
/// `--strict` refuses the report for them.
pub fn missing_references(measurement_given: bool, nonce: Option<&[u8]>) -> Vec<Check> {
    let mut missing = Vec::new();
    if !measurement_given {
        missing.push(Check {
            name: "measurement",
            ok: false,
            detail: "no reference measurement was given (--manifest, --launch-log or \
                     --expected-measurement): the report is genuine, but what it measured was \
                     not checked"
                .into(),
        });
    }
    let nonce = match nonce {
        None => Some("no --nonce was given: the report's freshness was not checked"),
        Some([]) => Some(
            "the --nonce given is empty: report_data was checked to be all zeros, which \
             proves no freshness",
        ),
        Some(_) => None,
    };
    if let Some(why) = nonce {
        missing.push(Check {
            name: "nonce",
            ok: false,
            detail: why.into(),
        });
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;
    use microkernel::snp::report_data_for;

    /// Found by fuzzing: `der`'s streaming PEM reader never returns on this body.
    #[test]
    fn a_short_pem_body_is_refused_rather_than_hanging() {
        let pem = b"-----BEGIN CERTIFICATE-----\nfg==\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            parse_certificate(pem, "x"),
            Err(VerifyError::Certificate { .. })
        ));
        assert!(parse_certificate(b"-----BEGIN KEY-----\nfg==\n-----END KEY-----\n", "x").is_err());
        assert!(matches!(
            parse_report(&[0; 10]),
            Err(VerifyError::ReportSize(10))
        ));
    }

    #[test]
    fn nonces_longer_than_report_data_are_hashed() {
        assert_eq!(&report_data_for(b"ab")[..3], b"ab\0");
        let long = [7u8; 65];
        assert_eq!(
            report_data_for(&long).to_vec(),
            sha2::Sha512::digest(long).to_vec()
        );
    }

    #[test]
    fn fingerprints_are_taken_in_the_forms_people_copy() {
        let plain = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        for form in [
            plain.clone(),
            plain.to_uppercase(),
            colons.clone(),
            format!("sha256 Fingerprint={colons}\n"),
            format!("  {plain}  "),
        ] {
            assert_eq!(normalize_fingerprint(&form), plain, "{form}");
        }
        let dir = std::path::Path::new("/nonexistent");
        assert!(matches!(
            verify(&[0; REPORT_LEN], dir, "abc", None, None),
            Err(VerifyError::BadPin(_))
        ));
        // The refusal is the last check listed.
        let v = verify_checked(&[0; REPORT_LEN], dir, "abc", None, None);
        assert_eq!(
            v.checks.iter().map(|c| (c.name, c.ok)).collect::<Vec<_>>(),
            [("ark-fingerprint", false)]
        );
        assert!(v.checks[0].detail.contains("abc"), "{:?}", v.checks);
    }

    #[test]
    fn missing_references_name_what_a_genuine_report_does_not_prove() {
        let names = |v: Vec<Check>| v.into_iter().map(|c| c.name).collect::<Vec<_>>();
        assert!(names(missing_references(true, Some(b"n"))).is_empty());
        assert_eq!(
            names(missing_references(false, Some(b"n"))),
            ["measurement"]
        );
        assert_eq!(names(missing_references(true, None)), ["nonce"]);
        assert_eq!(names(missing_references(true, Some(b""))), ["nonce"]);
        assert_eq!(
            names(missing_references(false, None)),
            ["measurement", "nonce"]
        );
    }

    #[test]
    fn sixty_four_bit_claims_are_hex_strings_in_json() {
        let claims = Claims {
            version: 2,
            policy: 0x30000,
            vmpl: 0,
            measurement: String::new(),
            report_data: String::new(),
            host_data: String::new(),
            chip_id: String::new(),
            reported_tcb: 0x7308_0000_0000_0003,
        };
        let v = serde_json::to_value(&claims).unwrap();
        assert_eq!(v["reported_tcb"], "0x7308000000000003");
        assert_eq!(v["policy"], "0x0000000000030000");
        assert_eq!(v["version"], 2);
    }
}
