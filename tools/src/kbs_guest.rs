//! Guest-conducted attestation at the key broker: the `guest-key` request, with which a guest
//! proves itself through its vTPM, as Azure confidential VMs do, and gets the tenant's disk
//! secret wrapped to a key inside that TPM.
//!
//! The guest (`tools/guest/pv-attest.sh`, stock `tpm2-tools`) sends: the SNP report and the
//! runtime claims pv-vtpm wrote to NV 0x01400001 and 0x01400002 (report_data = SHA-256(claims)
//! zero-padded; the claims carry the AK as the JWK "HCLAkPub"), a quote by the AK over the
//! broker's nonce and a PCR selection, the PCR values, and a TPM-resident RSA-2048 decrypt key
//! (the *transfer key*) with the AK's certification of it over the same nonce. The broker
//! checks, in this order, each refusal naming its [`Check`]: the nonce, the report (chain,
//! signature, reserved bytes; then measurement, VMPL, guest policy, TCB), the claims, the
//! quote's signature, its nonce, its PCR digest, the PCR policy, the transfer key; then
//! encrypts the `[guest] secret-file` to the transfer key with RSA-OAEP (SHA-256, empty
//! label), which `tpm2_rsadecrypt -s oaep` undoes inside the TPM.
//!
//! Why each piece: the report, verified against the pinned ARK, says which paravisor runs;
//! its report_data binds the claims, so the AK is that paravisor's vTPM's; the AK is a
//! restricted key, so what it signs that starts with TPM_GENERATED_VALUE the TPM made; the
//! nonce in the quote and in the certification makes both fresh; the certification's name
//! binds the exact public area, whose attributes say the private key was made in and cannot
//! leave that TPM. So only that TPM can unwrap the secret.
//!
//! The TPM structures are parsed in [`crate::tpm_evidence`]; the request itself here. Both
//! treat every byte as hostile: typed errors, no panics, no unchecked indexing.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::time::Instant;

use rsa::Oaep;
use rsa::RsaPublicKey;
use sha2::Digest;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::kbs::Broker;
use crate::kbs::ReportFacts;
use crate::tpm_evidence as tpm;
use crate::tpm_evidence::alg;
use crate::tpm_evidence::attr;
use crate::tpm_evidence::Attested;
use crate::tpm_evidence::PcrValue;
use microkernel::key_release::KbsError;
use microkernel::key_release::MAX_LINE;
use microkernel::key_release::NONCE_LEN;
use microkernel::snp::REPORT_LEN;
use microkernel::util::hex;

/// The request's name on the wire.
pub const GUEST_KEY: &str = "guest-key";
/// The largest secret the broker wraps: RSA-OAEP with SHA-256 to a 2048-bit key carries at
/// most 256 - 2·32 - 2 bytes.
pub const MAX_SECRET_LEN: usize = 256 - 2 * 32 - 2;
/// The VMPL guest evidence comes from by default: the attest service gives its clients
/// reports at VMPL 1 or above (0 is the paravisor's own).
pub const DEFAULT_GUEST_VMPL: u32 = 1;
/// The PCRs a policy may name (a TPM has 24).
const PCR_COUNT: u8 = 24;
/// The name the claims give the AK (OpenHCL's).
pub const AK_KID: &str = "HCLAkPub";
/// The AK's size: pv-vtpm's AK is RSA-2048.
const AK_MODULUS_BYTES: usize = 256;
/// The transfer key's size.
const TRANSFER_MODULUS_BYTES: usize = 256;

/// Field limits (bytes, before hex). The claims fill at most one NV index (libtpms'
/// MAX_NV_INDEX_SIZE); TPM structures are far below 1 KiB (a quote of 24 PCRs in four banks
/// is ~330 bytes, a 4096-bit signature 518); PCR values at most 32 PCRs of the four hashes.
const MAX_CLAIMS: usize = 2048;
const MAX_TPM_STRUCTURE: usize = 1024;
const MAX_PCR_VALUES: usize = 32 * (20 + 32 + 48 + 64);
/// The longest guest-key line: every field at its limit, as hex, with the JSON around them.
const MAX_GUEST_KEY_LINE: usize =
    2 * (NONCE_LEN + REPORT_LEN + MAX_CLAIMS + 5 * MAX_TPM_STRUCTURE + MAX_PCR_VALUES) + 512;
// The shared line limit (64 KiB) holds the largest guest-key request: no raise needed.
const _: () = assert!(MAX_GUEST_KEY_LINE <= MAX_LINE);

/// The checks of a guest-key request, in the order they are made; a refusal names one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The line is not a well-formed guest-key request.
    Request,
    /// The broker's policy has no `[guest]` table.
    Policy,
    Nonce,
    Report,
    Measurement,
    Vmpl,
    GuestPolicy,
    Tcb,
    Claims,
    QuoteSignature,
    QuoteNonce,
    PcrDigest,
    PcrPolicy,
    TransferKey,
    /// Encrypting the secret failed (the broker's fault, not the evidence's).
    Wrap,
}

impl Check {
    /// The name the reply's `check` field carries.
    pub fn name(self) -> &'static str {
        match self {
            Check::Request => "request",
            Check::Policy => "policy",
            Check::Nonce => "nonce",
            Check::Report => "report",
            Check::Measurement => "measurement",
            Check::Vmpl => "vmpl",
            Check::GuestPolicy => "guest-policy",
            Check::Tcb => "tcb",
            Check::Claims => "claims",
            Check::QuoteSignature => "quote-signature",
            Check::QuoteNonce => "quote-nonce",
            Check::PcrDigest => "pcr-digest",
            Check::PcrPolicy => "pcr-policy",
            Check::TransferKey => "transfer-key",
            Check::Wrap => "wrap",
        }
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A refused guest-key request: which check, why (with the values), and whether the same
/// evidence could succeed with a new challenge (an expired or unknown nonce).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{check}: {message}")]
pub struct Refusal {
    pub check: Check,
    pub message: String,
    pub retry: bool,
}

impl Refusal {
    fn new(check: Check, message: impl Into<String>) -> Refusal {
        Refusal {
            check,
            message: message.into(),
            retry: false,
        }
    }

    /// The reply line: `{"check":NAME,"error":MESSAGE}`, and `"retry":true` when a new
    /// challenge may succeed.
    pub fn reply(&self) -> String {
        let mut reply = serde_json::json!({
            "check": self.check.name(),
            "error": self.message,
        });
        if self.retry {
            reply["retry"] = serde_json::Value::Bool(true);
        }
        reply.to_string()
    }
}

// ---------------------------------------------------------------------------------------
// The policy's `[guest]` table.

/// `[guest]` as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct GuestFile {
    secret_file: PathBuf,
    #[serde(default = "default_guest_vmpl")]
    vmpl: u32,
    #[serde(default)]
    pcrs: BTreeMap<String, PcrAllowed>,
}

fn default_guest_vmpl() -> u32 {
    DEFAULT_GUEST_VMPL
}

/// One PCR's allowed values: a value, or a list of them.
#[derive(Debug, serde::Deserialize)]
#[serde(untagged)]
enum PcrAllowed {
    One(String),
    Any(Vec<String>),
}

/// The sha256-bank PCRs a quote must show, each with the values allowed.
pub type PcrPolicy = BTreeMap<u8, Vec<[u8; 32]>>;

/// A validated `[guest]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRelease {
    pub secret_file: PathBuf,
    pub vmpl: u32,
    pub pcrs: PcrPolicy,
}

impl GuestFile {
    /// Validates the table; relative paths are taken from `base`. The error is the message
    /// for the policy file's refusal.
    pub fn validate(self, base: &Path) -> Result<GuestRelease, String> {
        if !(1..=3).contains(&self.vmpl) {
            return Err(format!(
                "[guest] vmpl = {} is not 1, 2 or 3: guest evidence comes through the attest \
                 service, at VMPL 1 or above (VMPL 0 is the paravisor's own)",
                self.vmpl
            ));
        }
        let mut pcrs = PcrPolicy::new();
        for (index, allowed) in self.pcrs {
            let pcr = index
                .parse::<u8>()
                .ok()
                .filter(|i| *i < PCR_COUNT)
                .ok_or_else(|| {
                    format!(
                        "[guest] pcrs: \"{index}\" is not a PCR index (0 to {})",
                        PCR_COUNT - 1
                    )
                })?;
            let values = match allowed {
                PcrAllowed::One(v) => vec![v],
                PcrAllowed::Any(v) => v,
            };
            if values.is_empty() {
                return Err(format!(
                    "[guest] pcrs: PCR {pcr} allows no value: no quote could ever pass"
                ));
            }
            let mut parsed = Vec::with_capacity(values.len());
            for v in &values {
                let value: [u8; 32] = strict_hex(v)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        format!("[guest] pcrs: PCR {pcr}'s \"{v}\" is not a sha256 value (64 hex digits)")
                    })?;
                parsed.push(value);
            }
            pcrs.insert(pcr, parsed);
        }
        Ok(GuestRelease {
            secret_file: base.join(self.secret_file),
            vmpl: self.vmpl,
            pcrs,
        })
    }
}

/// Why the `[guest] secret-file` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("[guest] secret-file {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("[guest] secret-file {path} has mode {mode:o}: group or others may access it; `chmod 600` it")]
    Mode { path: String, mode: u32 },
    #[error("[guest] secret-file {path} holds {len} bytes; a guest secret is 1 to {MAX_SECRET_LEN} bytes (what RSA-OAEP SHA-256 carries to a 2048-bit key)")]
    Size { path: String, len: u64 },
}

/// Reads the guest secret: a regular file of 1 to [`MAX_SECRET_LEN`] bytes that neither
/// group nor others may access.
pub fn load_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, SecretFileError> {
    let name = || path.display().to_string();
    let io = |error| SecretFileError::Io {
        path: name(),
        error,
    };
    let mut file = microkernel::util::open_regular(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::Mode { path: name(), mode });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(MAX_SECRET_LEN + 1));
    (&mut file)
        .take(MAX_SECRET_LEN as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.is_empty() || bytes.len() > MAX_SECRET_LEN {
        return Err(SecretFileError::Size {
            path: name(),
            len: meta.len().max(bytes.len() as u64),
        });
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------------------
// The request.

/// A decoded guest-key request: the byte strings, sized, not yet judged.
#[derive(Debug, Clone)]
pub struct GuestKeyRequest {
    pub nonce: [u8; NONCE_LEN],
    pub report: Box<[u8; REPORT_LEN]>,
    pub evidence: TpmEvidence,
}

/// The TPM half of a guest's evidence, as sent.
#[derive(Debug, Clone, Default)]
pub struct TpmEvidence {
    /// The runtime claims JSON (NV 0x01400002).
    pub claims: Vec<u8>,
    /// TPMS_ATTEST (`tpm2_quote -m`).
    pub quote: Vec<u8>,
    /// TPMT_SIGNATURE (`tpm2_quote -s`).
    pub quote_signature: Vec<u8>,
    /// The selected PCRs' values, concatenated (`tpm2_quote -o FILE -F values`).
    pub pcrs: Vec<u8>,
    /// TPM2B_PUBLIC of the transfer key (`tpm2_create -u`).
    pub transfer_key: Vec<u8>,
    /// TPMS_ATTEST of type ATTEST_CREATION (`tpm2_certifycreation --attestation`) or
    /// ATTEST_CERTIFY (`tpm2_certify -o`) over the transfer key.
    pub certify: Vec<u8>,
    /// TPMT_SIGNATURE of `certify`.
    pub certify_signature: Vec<u8>,
}

#[derive(serde::Deserialize)]
struct RequestKind {
    request: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireGuestKey {
    #[allow(dead_code)]
    request: String,
    nonce: String,
    report: String,
    claims: String,
    quote: String,
    quote_signature: String,
    pcrs: String,
    transfer_key: String,
    certify: String,
    certify_signature: String,
}

/// Hex with nothing else (no prefix, separators or spaces), either case; an odd number of
/// digits does not decode.
fn strict_hex(s: &str) -> Option<Vec<u8>> {
    if !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    microkernel::util::parse_hex(s)
}

fn field(name: &'static str, s: &str, max: usize) -> Result<Vec<u8>, Refusal> {
    if s.len() > 2 * max {
        return Err(Refusal::new(
            Check::Request,
            format!(
                "{name} is {} hex digits, more than the {} its {max} bytes allow",
                s.len(),
                2 * max
            ),
        ));
    }
    strict_hex(s).ok_or_else(|| Refusal::new(Check::Request, format!("{name} is not hex")))
}

fn exact<const N: usize>(name: &'static str, s: &str) -> Result<[u8; N], Refusal> {
    let v = field(name, s, N)?;
    let len = v.len();
    v.try_into()
        .map_err(|_| Refusal::new(Check::Request, format!("{name} is {len} bytes, not {N}")))
}

/// Decodes a request line if it is a guest-key request: `Ok(None)` for any other line
/// (the key broker's other requests decode it), a [`Check::Request`] refusal for a
/// guest-key request that is not well formed.
pub fn parse_guest_request(line: &[u8]) -> Result<Option<GuestKeyRequest>, Refusal> {
    match serde_json::from_slice::<RequestKind>(line) {
        Ok(kind) if kind.request == GUEST_KEY => {}
        _ => return Ok(None),
    }
    if line.len() > MAX_LINE {
        return Err(Refusal::new(
            Check::Request,
            format!("the line is longer than {MAX_LINE} bytes"),
        ));
    }
    let w: WireGuestKey = serde_json::from_slice(line)
        .map_err(|e| Refusal::new(Check::Request, format!("the request is not valid: {e}")))?;
    let report = exact::<REPORT_LEN>("report", &w.report)?;
    Ok(Some(GuestKeyRequest {
        nonce: exact::<NONCE_LEN>("nonce", &w.nonce)?,
        report: Box::new(report),
        evidence: TpmEvidence {
            claims: field("claims", &w.claims, MAX_CLAIMS)?,
            quote: field("quote", &w.quote, MAX_TPM_STRUCTURE)?,
            quote_signature: field("quote_signature", &w.quote_signature, MAX_TPM_STRUCTURE)?,
            pcrs: field("pcrs", &w.pcrs, MAX_PCR_VALUES)?,
            transfer_key: field("transfer_key", &w.transfer_key, MAX_TPM_STRUCTURE)?,
            certify: field("certify", &w.certify, MAX_TPM_STRUCTURE)?,
            certify_signature: field("certify_signature", &w.certify_signature, MAX_TPM_STRUCTURE)?,
        },
    }))
}

// ---------------------------------------------------------------------------------------
// The checks.

/// What the TPM half of the evidence established.
#[derive(Debug, Clone)]
pub struct VerifiedTpm {
    /// Every quoted PCR, its value checked against the signed digest.
    pub pcrs: Vec<PcrValue>,
    /// The certified transfer key.
    pub transfer_key: RsaPublicKey,
}

/// The AK in the claims, after checking that the claims are the ones the report carries:
/// report_data = SHA-256(claims) zero-padded to 64 bytes.
pub fn claims_ak(report_data: &[u8; 64], claims: &[u8]) -> Result<RsaPublicKey, Refusal> {
    let refuse = |m: String| Refusal::new(Check::Claims, m);
    let mut expected = [0u8; 64];
    expected[..32].copy_from_slice(&Sha256::digest(claims));
    if *report_data != expected {
        return Err(refuse(format!(
            "the report's report_data {} is not SHA-256(claims) zero-padded, {}: these claims \
             are not the ones the report was made over",
            hex(report_data),
            hex(&expected)
        )));
    }
    let json: serde_json::Value = serde_json::from_slice(claims)
        .map_err(|e| refuse(format!("the claims are not JSON: {e}")))?;
    let keys = json
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or_else(|| refuse("the claims have no \"keys\" array".into()))?;
    let mut aks = keys
        .iter()
        .filter(|k| k.get("kid").and_then(|v| v.as_str()) == Some(AK_KID));
    let (Some(ak), None) = (aks.next(), aks.next()) else {
        return Err(refuse(format!(
            "the claims' keys do not hold exactly one \"{AK_KID}\" (the AK)"
        )));
    };
    let text = |name: &str| {
        ak.get(name)
            .and_then(|v| v.as_str())
            .ok_or_else(|| refuse(format!("the claims' {AK_KID} has no string \"{name}\"")))
    };
    if text("kty")? != "RSA" {
        return Err(refuse(format!(
            "the claims' {AK_KID} is of kty \"{}\", not RSA",
            text("kty")?
        )));
    }
    let b64 = |name: &str| -> Result<Vec<u8>, Refusal> {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text(name)?)
            .map_err(|e| refuse(format!("the claims' {AK_KID}.{name} is not base64url: {e}")))
    };
    let (n, e) = (b64("n")?, b64("e")?);
    if n.len() != AK_MODULUS_BYTES || e.len() > 4 {
        return Err(refuse(format!(
            "the claims' {AK_KID} has a {}-byte modulus and {}-byte exponent, not an RSA-2048 key",
            n.len(),
            e.len()
        )));
    }
    tpm::rsa_key(&n, &e).map_err(|m| refuse(format!("the claims' {AK_KID}: {m}")))
}

/// Parses an AK-signed TPMS_ATTEST and checks, in order: its signature by `ak`, that the TPM
/// made it (TPM_GENERATED_VALUE), and its type. `what` names it in messages.
fn signed_attest(
    ak: &RsaPublicKey,
    message: &[u8],
    signature: &[u8],
    what: &str,
    types: &[u16],
    check: Check,
) -> Result<tpm::Attest, Refusal> {
    let refuse = |m: String| Refusal::new(check, m);
    let attest = tpm::parse_attest(message).map_err(|e| refuse(format!("the {what}: {e}")))?;
    let sig = tpm::parse_signature(signature)
        .map_err(|e| refuse(format!("the {what}'s signature: {e}")))?;
    tpm::verify_rsassa_sha256(ak, message, &sig).map_err(|e| {
        refuse(format!(
            "the {what} is not signed by the AK in the claims ({AK_KID}): {e}"
        ))
    })?;
    if attest.magic != tpm::TPM_GENERATED {
        return Err(refuse(format!(
            "the {what}'s magic is {:#010x}, not TPM_GENERATED_VALUE {:#010x}: not a structure the TPM made",
            attest.magic,
            tpm::TPM_GENERATED
        )));
    }
    if !types.contains(&attest.kind) {
        let wanted: Vec<String> = types.iter().map(|t| tpm::attest_type_name(*t)).collect();
        return Err(refuse(format!(
            "the {what} is of type {}, not {}",
            tpm::attest_type_name(attest.kind),
            wanted.join(" or ")
        )));
    }
    Ok(attest)
}

/// Checks the quote: its signature by the AK (and magic and type), its nonce, and the PCR
/// values against its digest. The quoted PCRs.
pub fn check_quote(
    ak: &RsaPublicKey,
    nonce: &[u8; NONCE_LEN],
    evidence: &TpmEvidence,
) -> Result<Vec<PcrValue>, Refusal> {
    let quote = signed_attest(
        ak,
        &evidence.quote,
        &evidence.quote_signature,
        "quote",
        &[tpm::st::ATTEST_QUOTE],
        Check::QuoteSignature,
    )?;
    if quote.extra_data != nonce[..] {
        return Err(Refusal::new(
            Check::QuoteNonce,
            format!(
                "the quote's qualifying data {} is not this request's nonce {}: a quote made \
                 for another challenge",
                hex(&quote.extra_data),
                hex(nonce)
            ),
        ));
    }
    let Attested::Quote {
        selection,
        pcr_digest,
    } = quote.attested
    else {
        return Err(Refusal::new(
            Check::QuoteSignature,
            "the quote holds no quote",
        ));
    };
    let values = tpm::split_pcr_values(&selection, &evidence.pcrs)
        .map_err(|m| Refusal::new(Check::PcrDigest, m))?;
    let digest = tpm::pcr_digest(&values);
    if pcr_digest != digest[..] {
        return Err(Refusal::new(
            Check::PcrDigest,
            format!(
                "the PCR values given hash to {}, but the quote's pcrDigest is {}: not the \
                 values quoted",
                hex(&digest),
                hex(&pcr_digest)
            ),
        ));
    }
    Ok(values)
}

/// The quoted PCRs, for the log: `sha256:0=… sha256:1=…`.
pub fn describe_pcrs(values: &[PcrValue]) -> String {
    values
        .iter()
        .map(|v| format!("{}:{}={}", tpm::hash_name(v.hash), v.index, hex(&v.value)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Checks the quoted PCRs against the policy: every policy PCR must be quoted in the sha256
/// bank, with an allowed value.
pub fn check_pcr_policy(policy: &PcrPolicy, values: &[PcrValue]) -> Result<(), Refusal> {
    for (index, allowed) in policy {
        let seen = values
            .iter()
            .find(|v| v.hash == alg::SHA256 && v.index == *index);
        let Some(seen) = seen else {
            let quoted: Vec<String> = values
                .iter()
                .filter(|v| v.hash == alg::SHA256)
                .map(|v| v.index.to_string())
                .collect();
            return Err(Refusal::new(
                Check::PcrPolicy,
                format!(
                    "PCR {index} (sha256) is in the policy but not in the quote's selection \
                     (sha256: {})",
                    if quoted.is_empty() {
                        "none".to_string()
                    } else {
                        quoted.join(",")
                    }
                ),
            ));
        };
        if !allowed.iter().any(|a| a[..] == seen.value[..]) {
            let allowed: Vec<String> = allowed.iter().map(|a| hex(a)).collect();
            return Err(Refusal::new(
                Check::PcrPolicy,
                format!(
                    "PCR {index} (sha256) is {}; the policy allows {}",
                    hex(&seen.value),
                    allowed.join(" or ")
                ),
            ));
        }
    }
    Ok(())
}

/// Checks the transfer key: its certification is by the AK (signature, magic, type
/// ATTEST_CREATION or ATTEST_CERTIFY), over this nonce, of this exact public area; and the
/// area is an RSA-2048 decryption key made in the TPM and bound to it (fixedTPM,
/// fixedParent, sensitiveDataOrigin, decrypt; neither restricted nor sign) whose scheme
/// allows OAEP with SHA-256.
pub fn check_transfer_key(
    ak: &RsaPublicKey,
    nonce: &[u8; NONCE_LEN],
    evidence: &TpmEvidence,
) -> Result<RsaPublicKey, Refusal> {
    let refuse = |m: String| Refusal::new(Check::TransferKey, m);
    let key = tpm::parse_rsa_public(&evidence.transfer_key)
        .map_err(|e| refuse(format!("the transfer key: {e}")))?;
    let certify = signed_attest(
        ak,
        &evidence.certify,
        &evidence.certify_signature,
        "transfer key's certification",
        &[tpm::st::ATTEST_CREATION, tpm::st::ATTEST_CERTIFY],
        Check::TransferKey,
    )?;
    if certify.extra_data != nonce[..] {
        return Err(refuse(format!(
            "the certification's qualifying data {} is not this request's nonce {}: a \
             certification made for another challenge",
            hex(&certify.extra_data),
            hex(nonce)
        )));
    }
    let certified = match &certify.attested {
        Attested::Creation { object_name, .. } => object_name,
        Attested::Certify { name, .. } => name,
        Attested::Quote { .. } => return Err(refuse("the certification is a quote".into())),
    };
    let name = key.name().ok_or_else(|| {
        refuse(format!(
            "the transfer key's nameAlg is {}, not sha256",
            tpm::hash_name(key.name_alg)
        ))
    })?;
    if *certified != name {
        return Err(refuse(format!(
            "the certified name {} is not the name of the transfer key sent, {}: the \
             certification is of another key",
            hex(certified),
            hex(&name)
        )));
    }
    let required =
        attr::FIXED_TPM | attr::FIXED_PARENT | attr::SENSITIVE_DATA_ORIGIN | attr::DECRYPT;
    let forbidden = attr::RESTRICTED | attr::SIGN;
    if key.attributes & required != required || key.attributes & forbidden != 0 {
        return Err(refuse(format!(
            "the transfer key's attributes are {:#010x}; it must have fixedTPM, fixedParent, \
             sensitiveDataOrigin and decrypt ({required:#010x}) and neither restricted nor sign \
             ({forbidden:#010x})",
            key.attributes
        )));
    }
    if key.key_bits != 2048 || key.modulus.len() != TRANSFER_MODULUS_BYTES {
        return Err(refuse(format!(
            "the transfer key is {} bits with a {}-byte modulus, not RSA-2048",
            key.key_bits,
            key.modulus.len()
        )));
    }
    let oaep_sha256 = key.scheme == alg::OAEP && key.scheme_hash == Some(alg::SHA256);
    if key.scheme != alg::NULL && !oaep_sha256 {
        return Err(refuse(format!(
            "the transfer key's scheme is {:#06x}: it must be NULL or OAEP with sha256 (the \
             secret is wrapped with RSA-OAEP SHA-256)",
            key.scheme
        )));
    }
    key.key()
        .map_err(|m| refuse(format!("the transfer key: {m}")))
}

/// The TPM half of the checks, after the report: claims, quote (signature, nonce, PCR
/// digest), PCR policy, transfer key. `quoted` sees the quoted PCRs once their digest is
/// checked, before the policy judges them (the broker logs them there). Pure: no state, no
/// I/O.
pub fn check_tpm_evidence(
    nonce: &[u8; NONCE_LEN],
    report_data: &[u8; 64],
    evidence: &TpmEvidence,
    pcr_policy: &PcrPolicy,
    quoted: impl FnOnce(&[PcrValue]),
) -> Result<VerifiedTpm, Refusal> {
    let ak = claims_ak(report_data, &evidence.claims)?;
    let pcrs = check_quote(&ak, nonce, evidence)?;
    quoted(&pcrs);
    check_pcr_policy(pcr_policy, &pcrs)?;
    let transfer_key = check_transfer_key(&ak, nonce, evidence)?;
    Ok(VerifiedTpm { pcrs, transfer_key })
}

/// The check a refusal of the report's facts belongs to.
fn admit_check(e: &KbsError) -> Check {
    match e {
        KbsError::MeasurementNotAllowed(_) => Check::Measurement,
        KbsError::Vmpl { .. } => Check::Vmpl,
        KbsError::DebugAllowed(_)
        | KbsError::MigrationAgentAllowed(_)
        | KbsError::SmtAllowed(_) => Check::GuestPolicy,
        KbsError::TcbTooLow { .. } => Check::Tcb,
        _ => Check::Report,
    }
}

/// Encrypts `secret` to `key` with RSA-OAEP, SHA-256 for the hash and MGF1, empty label:
/// what `tpm2_rsadecrypt -s oaep` decrypts with a SHA-256-named key.
pub fn wrap_secret(secret: &[u8], key: &RsaPublicKey) -> Result<Vec<u8>, Refusal> {
    key.encrypt(&mut rand_core::OsRng, Oaep::new::<Sha256>(), secret)
        .map_err(|e| Refusal::new(Check::Wrap, format!("encrypting the secret: {e}")))
}

/// A released secret, and what was established.
#[derive(Debug)]
pub struct Released {
    pub wrapped_secret: Vec<u8>,
    pub facts: ReportFacts,
    pub pcrs: Vec<PcrValue>,
}

impl Broker {
    /// Judges a guest-key request; the secret, wrapped to the certified transfer key, if
    /// every check holds. The nonce is consumed first, whatever follows.
    pub fn release_guest(
        &self,
        req: &GuestKeyRequest,
        now: Instant,
        peer: &str,
    ) -> Result<Released, Refusal> {
        let policy = self.policy();
        let (Some(guest), Some(secret)) = (policy.guest.as_ref(), self.guest_secret()) else {
            return Err(Refusal::new(
                Check::Policy,
                "this broker's policy has no [guest] table: it releases no secret to guests",
            ));
        };
        self.consume_nonce(&req.nonce, now).map_err(|e| Refusal {
            check: Check::Nonce,
            retry: matches!(e, KbsError::NonceUnknownOrExpired),
            message: e.to_string(),
        })?;
        crate::verify::verify(
            &req.report[..],
            &policy.certs,
            &policy.ark_fingerprint,
            None,
            None,
        )
        .map_err(|e| Refusal::new(Check::Report, e.to_string()))?;
        let facts = ReportFacts::of(&req.report);
        policy
            .admit_at(&facts, guest.vmpl)
            .map_err(|e| Refusal::new(admit_check(&e), e.to_string()))?;
        let verified = check_tpm_evidence(
            &req.nonce,
            &facts.report_data,
            &req.evidence,
            &guest.pcrs,
            |pcrs| {
                tracing::info!(
                    %peer,
                    measurement = %hex(&facts.measurement),
                    "guest quote PCRs: {}",
                    describe_pcrs(pcrs)
                );
            },
        )?;
        let wrapped_secret = wrap_secret(secret, &verified.transfer_key)?;
        Ok(Released {
            wrapped_secret,
            facts,
            pcrs: verified.pcrs,
        })
    }

    /// Answers a guest-key request line (without the newline), and logs the outcome.
    pub fn handle_guest(&self, req: &GuestKeyRequest, now: Instant, peer: &str) -> String {
        match self.release_guest(req, now, peer) {
            Ok(r) => {
                tracing::info!(
                    %peer,
                    measurement = %hex(&r.facts.measurement),
                    "guest secret RELEASED (wrapped to the certified transfer key)"
                );
                serde_json::json!({ "wrapped_secret": hex(&r.wrapped_secret) }).to_string()
            }
            Err(refusal) => {
                tracing::warn!(%peer, "guest-key refused: {refusal}");
                refusal.reply()
            }
        }
    }
}

#[cfg(test)]
mod tests;
