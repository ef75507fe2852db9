//! The guest-key checks, each refusing by name, on real evidence captured from pv-vtpm
//! (`tools/tests/fixtures/guest-kbs`, see its README) and on structures signed by a software
//! AK where a property cannot be had from a real TPM (a key the TPM would not certify, a
//! certification over the nonce that tpm2-tools 5.4 cannot make).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use rsa::traits::PublicKeyParts;
use rsa::Pkcs1v15Sign;
use rsa::RsaPrivateKey;

use super::*;
use crate::kbs::Policy;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/guest-kbs")
}

fn fixture(name: &str) -> Vec<u8> {
    let path = fixture_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn fixture_hex(name: &str) -> String {
    String::from_utf8(fixture(name)).unwrap().trim().to_string()
}

fn unhex(s: &str) -> Vec<u8> {
    microkernel::util::parse_hex(s).unwrap()
}

/// The captured exchange: its nonce, the report's report_data, the TPM evidence.
fn real() -> ([u8; NONCE_LEN], [u8; 64], TpmEvidence) {
    let nonce: [u8; 32] = unhex(&fixture_hex("nonce.hex")).try_into().unwrap();
    let report = fixture("report.bin");
    let report_data: [u8; 64] = report[0x50..0x90].try_into().unwrap();
    let evidence = TpmEvidence {
        claims: fixture("claims.json"),
        quote: fixture("quote.msg"),
        quote_signature: fixture("quote.sig"),
        pcrs: fixture("quote.pcrs"),
        transfer_key: fixture("transfer.pub"),
        certify: fixture("certify.attest"),
        certify_signature: fixture("certify.sig"),
    };
    (nonce, report_data, evidence)
}

/// A sha256 PCR after one extend of SHA-256(`event`) from zero, as the fixture's README
/// says PCRs 4 and 7 were made.
fn extended(event: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(Sha256::digest(event));
    h.finalize().into()
}

fn check(
    nonce: &[u8; NONCE_LEN],
    report_data: &[u8; 64],
    evidence: &TpmEvidence,
    policy: &PcrPolicy,
) -> Result<VerifiedTpm, Refusal> {
    check_tpm_evidence(nonce, report_data, evidence, policy, |_| {})
}

fn refused(r: Result<VerifiedTpm, Refusal>) -> Refusal {
    match r {
        Err(refusal) => refusal,
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn real_evidence_from_pv_vtpm_passes_every_tpm_check() {
    let (nonce, report_data, evidence) = real();
    let pcr7 = extended(b"secure boot state");
    let policy: PcrPolicy = [
        (0, vec![[0u8; 32]]),
        (4, vec![extended(b"bootloader")]),
        (7, vec![[0xEE; 32], pcr7]),
    ]
    .into();
    let mut seen = Vec::new();
    let verified = check_tpm_evidence(&nonce, &report_data, &evidence, &policy, |p| {
        seen = p.to_vec()
    })
    .unwrap();
    assert_eq!(verified.pcrs.len(), 10, "sha256:0-9 quoted");
    assert_eq!(
        seen, verified.pcrs,
        "the quoted PCRs are shown before the policy"
    );
    assert_eq!(verified.pcrs[7].value, pcr7);
    let described = describe_pcrs(&verified.pcrs);
    assert!(
        described.contains(&format!("sha256:7={}", hex(&pcr7))),
        "{described}"
    );
    // The certified key is the transfer key sent.
    let public = tpm::parse_rsa_public(&evidence.transfer_key).unwrap();
    assert_eq!(verified.transfer_key.n().to_bytes_be(), public.modulus);
}

#[test]
fn claims_other_than_the_reported_ones_are_refused_as_claims() {
    let (nonce, report_data, mut evidence) = real();
    let none = PcrPolicy::new();
    // One byte of the claims changed: they no longer hash to report_data.
    evidence.claims[10] ^= 1;
    let r = refused(check(&nonce, &report_data, &evidence, &none));
    assert_eq!(r.check, Check::Claims);
    assert!(r.message.contains(&hex(&report_data)), "{r}");
    // Claims that hash right but carry no usable AK (what a report over other claims would
    // need): each refused by name.
    for (claims, why) in [
        (&b"not json"[..], "not JSON"),
        (br#"{"keys":[]}"#, "exactly one \"HCLAkPub\""),
        (
            br#"{"keys":[{"kid":"HCLAkPub","kty":"RSA","n":"AQAB","e":"AQAB"},{"kid":"HCLAkPub","kty":"RSA","n":"AQAB","e":"AQAB"}]}"#,
            "exactly one",
        ),
        (
            br#"{"keys":[{"kid":"HCLAkPub","kty":"EC","n":"AQAB","e":"AQAB"}]}"#,
            "not RSA",
        ),
        (
            br#"{"keys":[{"kid":"HCLAkPub","kty":"RSA","n":"AQAB","e":"AQAB"}]}"#,
            "not an RSA-2048 key",
        ),
        (
            br#"{"keys":[{"kid":"HCLAkPub","kty":"RSA","n":"A+B/","e":"AQAB"}]}"#,
            "not base64url",
        ),
    ] {
        let mut data = [0u8; 64];
        data[..32].copy_from_slice(&Sha256::digest(claims));
        let evidence = TpmEvidence {
            claims: claims.to_vec(),
            ..real().2
        };
        let r = refused(check(&nonce, &data, &evidence, &none));
        assert_eq!(r.check, Check::Claims, "{r}");
        assert!(r.message.contains(why), "{why}: {r}");
    }
}

#[test]
fn a_quote_by_a_key_other_than_the_ak_is_refused_as_quote_signature() {
    let (nonce, report_data, mut evidence) = real();
    evidence.quote = fixture("other-ak-quote.msg");
    evidence.quote_signature = fixture("other-ak-quote.sig");
    evidence.pcrs = fixture("other-ak-quote.pcrs");
    let r = refused(check(&nonce, &report_data, &evidence, &PcrPolicy::new()));
    assert_eq!(r.check, Check::QuoteSignature);
    assert!(r.message.contains("not signed by the AK"), "{r}");
}

#[test]
fn a_change_to_any_byte_of_the_quote_or_its_signature_is_refused_as_quote_signature() {
    let (nonce, report_data, evidence) = real();
    for at in 0..evidence.quote.len() {
        let mut e = evidence.clone();
        e.quote[at] ^= 0x01;
        let r = refused(check(&nonce, &report_data, &e, &PcrPolicy::new()));
        assert_eq!(r.check, Check::QuoteSignature, "byte {at}: {r}");
    }
    for at in [0, 1, 3, 5, 100, evidence.quote_signature.len() - 1] {
        let mut e = evidence.clone();
        e.quote_signature[at] ^= 0x01;
        let r = refused(check(&nonce, &report_data, &e, &PcrPolicy::new()));
        assert_eq!(r.check, Check::QuoteSignature, "byte {at}: {r}");
    }
    // The certification in the quote's place: signed by the AK, made by the TPM, but not a
    // quote.
    let mut e = evidence.clone();
    e.quote = evidence.certify.clone();
    e.quote_signature = evidence.certify_signature.clone();
    let r = refused(check(&nonce, &report_data, &e, &PcrPolicy::new()));
    assert_eq!(r.check, Check::QuoteSignature);
    assert!(
        r.message.contains("ATTEST_CREATION, not ATTEST_QUOTE"),
        "{r}"
    );
}

#[test]
fn a_quote_made_for_another_challenge_is_refused_as_quote_nonce() {
    let (nonce, report_data, evidence) = real();
    let mut fresh = nonce;
    fresh[0] ^= 0xFF;
    let r = refused(check(&fresh, &report_data, &evidence, &PcrPolicy::new()));
    assert_eq!(r.check, Check::QuoteNonce);
    assert!(r.message.contains(&hex(&nonce)) && r.message.contains(&hex(&fresh)));
}

#[test]
fn pcr_values_that_are_not_the_quoted_ones_are_refused_as_pcr_digest() {
    let (nonce, report_data, evidence) = real();
    let mut changed = evidence.clone();
    changed.pcrs[7 * 32] ^= 1;
    let mut short = evidence.clone();
    short.pcrs.truncate(9 * 32);
    let mut long = evidence.clone();
    long.pcrs.extend_from_slice(&[0; 32]);
    for (what, e) in [("changed", changed), ("short", short), ("long", long)] {
        let r = refused(check(&nonce, &report_data, &e, &PcrPolicy::new()));
        assert_eq!(r.check, Check::PcrDigest, "{what}: {r}");
    }
}

#[test]
fn a_pcr_outside_the_policy_is_refused_as_pcr_policy_with_the_values() {
    let (nonce, report_data, evidence) = real();
    let pcr7 = extended(b"secure boot state");
    let wrong: PcrPolicy = [(7, vec![[0xAB; 32], [0xCD; 32]])].into();
    let r = refused(check(&nonce, &report_data, &evidence, &wrong));
    assert_eq!(r.check, Check::PcrPolicy);
    assert_eq!(
        r.message,
        format!(
            "PCR 7 (sha256) is {}; the policy allows {} or {}",
            hex(&pcr7),
            "ab".repeat(32),
            "cd".repeat(32)
        )
    );
    // A policy PCR the quote did not select.
    let unquoted: PcrPolicy = [(12, vec![[0; 32]])].into();
    let r = refused(check(&nonce, &report_data, &evidence, &unquoted));
    assert_eq!(r.check, Check::PcrPolicy);
    assert!(
        r.message.contains("PCR 12") && r.message.contains("sha256: 0,1,2,3,4,5,6,7,8,9"),
        "{r}"
    );
}

#[test]
fn a_transfer_key_the_ak_did_not_certify_over_this_nonce_is_refused_as_transfer_key() {
    let (nonce, report_data, evidence) = real();
    let refuse = |e: &TpmEvidence, why: &str| {
        let r = refused(check(&nonce, &report_data, e, &PcrPolicy::new()));
        assert_eq!(r.check, Check::TransferKey, "{why}: {r}");
        assert!(r.message.contains(why), "{why}: {r}");
    };
    // Another public key than the one certified (one bit of its modulus).
    let mut e = evidence.clone();
    let last = e.transfer_key.len() - 1;
    e.transfer_key[last] ^= 1;
    refuse(&e, "is not the name of the transfer key sent");
    // The certification's signature is the quote's.
    let mut e = evidence.clone();
    e.certify_signature = evidence.quote_signature.clone();
    refuse(&e, "not signed by the AK");
    // tpm2_certify's certification (ATTEST_CERTIFY, qualifying data 00ff55aa).
    let mut e = evidence.clone();
    e.certify = fixture("certify-no-nonce.attest");
    e.certify_signature = fixture("certify-no-nonce.sig");
    refuse(&e, "qualifying data 00ff55aa is not this request's nonce");
    // The quote in the certification's place.
    let mut e = evidence.clone();
    e.certify = evidence.quote.clone();
    e.certify_signature = evidence.quote_signature.clone();
    refuse(&e, "ATTEST_QUOTE, not ATTEST_CREATION or ATTEST_CERTIFY");
    // Not a public area at all.
    let mut e = evidence.clone();
    e.transfer_key.truncate(100);
    refuse(&e, "TPM2B_PUBLIC");
}

// ---------------------------------------------------------------------------------------
// Structures signed by a software AK: properties a real TPM will not produce.

/// A software AK and a software transfer key (RSA-2048), made once.
fn keys() -> &'static (RsaPrivateKey, RsaPrivateKey) {
    static KEYS: OnceLock<(RsaPrivateKey, RsaPrivateKey)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut rng = rand_core::OsRng;
        (
            RsaPrivateKey::new(&mut rng, 2048).unwrap(),
            RsaPrivateKey::new(&mut rng, 2048).unwrap(),
        )
    })
}

fn tpm2b(bytes: &[u8]) -> Vec<u8> {
    let mut v = (bytes.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(bytes);
    v
}

/// A TPMS_ATTEST as a TPM lays it out.
fn attest(magic: u32, kind: u16, extra: &[u8], attested: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&tpm2b(&[0x00, 0x0b].repeat(17)));
    v.extend_from_slice(&tpm2b(extra));
    v.extend_from_slice(&[0; 8 + 4 + 4]);
    v.push(1);
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(attested);
    v
}

/// RSASSA-SHA256 by `key`, as a TPMT_SIGNATURE.
fn sign(key: &RsaPrivateKey, message: &[u8]) -> Vec<u8> {
    let sig = key
        .sign(Pkcs1v15Sign::new::<Sha256>(), &Sha256::digest(message))
        .unwrap();
    let mut v = vec![0x00, 0x14, 0x00, 0x0b];
    v.extend_from_slice(&tpm2b(&sig));
    v
}

/// A TPM2B_PUBLIC of an RSA key.
fn public(attributes: u32, name_alg: u16, scheme: &[u8], bits: u16, modulus: &[u8]) -> Vec<u8> {
    let mut area = alg::RSA.to_be_bytes().to_vec();
    area.extend_from_slice(&name_alg.to_be_bytes());
    area.extend_from_slice(&attributes.to_be_bytes());
    area.extend_from_slice(&tpm2b(&[]));
    area.extend_from_slice(&alg::NULL.to_be_bytes());
    area.extend_from_slice(scheme);
    area.extend_from_slice(&bits.to_be_bytes());
    area.extend_from_slice(&0u32.to_be_bytes());
    area.extend_from_slice(&tpm2b(modulus));
    tpm2b(&area)
}

/// The attributes pv-attest.sh gives its transfer key.
const TRANSFER: u32 = attr::FIXED_TPM
    | attr::FIXED_PARENT
    | attr::SENSITIVE_DATA_ORIGIN
    | attr::USER_WITH_AUTH
    | attr::DECRYPT;

/// Evidence signed by the software AK: claims naming it, a quote of sha256:0-2 (all zero),
/// and a certification of `transfer_key` of `kind` over `certify_nonce`.
fn synthetic(
    nonce: &[u8; 32],
    transfer_key: Vec<u8>,
    kind: u16,
    certify_nonce: &[u8],
) -> ([u8; 64], TpmEvidence) {
    use base64::Engine as _;
    let (ak, _) = keys();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let claims = format!(
        r#"{{"keys":[{{"kid":"HCLAkPub","key_ops":["sign"],"kty":"RSA","e":"{}","n":"{}"}}]}}"#,
        b64(&ak.e().to_bytes_be()),
        b64(&ak.n().to_bytes_be())
    )
    .into_bytes();
    let mut report_data = [0u8; 64];
    report_data[..32].copy_from_slice(&Sha256::digest(&claims));
    let pcrs = vec![0u8; 3 * 32];
    let mut info = 1u32.to_be_bytes().to_vec();
    info.extend_from_slice(&[0x00, 0x0b, 3, 0b111, 0, 0]);
    info.extend_from_slice(&tpm2b(&Sha256::digest(&pcrs)));
    let quote = attest(tpm::TPM_GENERATED, tpm::st::ATTEST_QUOTE, nonce, &info);
    let name = tpm::parse_rsa_public(&transfer_key)
        .ok()
        .and_then(|p| p.name())
        .unwrap_or_default();
    let mut info = tpm2b(&name);
    info.extend_from_slice(&tpm2b(&[0; 32]));
    let certify = attest(tpm::TPM_GENERATED, kind, certify_nonce, &info);
    let evidence = TpmEvidence {
        claims,
        quote_signature: sign(ak, &quote),
        quote,
        pcrs,
        transfer_key,
        certify_signature: sign(ak, &certify),
        certify,
    };
    (report_data, evidence)
}

fn transfer_public(attributes: u32) -> Vec<u8> {
    let modulus = keys().1.n().to_bytes_be();
    public(
        attributes,
        alg::SHA256,
        &alg::NULL.to_be_bytes(),
        2048,
        &modulus,
    )
}

#[test]
fn a_secret_wrapped_to_a_certified_key_opens_with_that_key_by_rsa_oaep_sha256() {
    let nonce = [0x5A; 32];
    for kind in [tpm::st::ATTEST_CREATION, tpm::st::ATTEST_CERTIFY] {
        let (data, evidence) = synthetic(&nonce, transfer_public(TRANSFER), kind, &nonce);
        let verified = check(&nonce, &data, &evidence, &PcrPolicy::new()).unwrap();
        let secret = b"the tenant's disk secret".repeat(8);
        let secret = &secret[..MAX_SECRET_LEN];
        let wrapped = wrap_secret(secret, &verified.transfer_key).unwrap();
        assert_eq!(wrapped.len(), 256);
        let opened = keys().1.decrypt(Oaep::new::<Sha256>(), &wrapped).unwrap();
        assert_eq!(opened, secret);
        // Two wraps differ (OAEP is randomised); a byte more than one block carries fails.
        assert_ne!(
            wrap_secret(secret, &verified.transfer_key).unwrap(),
            wrapped
        );
        let too_long = vec![1u8; MAX_SECRET_LEN + 1];
        assert_eq!(
            wrap_secret(&too_long, &verified.transfer_key)
                .unwrap_err()
                .check,
            Check::Wrap
        );
    }
}

#[test]
fn a_transfer_key_that_could_leave_the_tpm_or_is_not_for_decryption_is_refused() {
    let nonce = [0x5A; 32];
    let modulus = keys().1.n().to_bytes_be();
    let null = alg::NULL.to_be_bytes();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "not fixedTPM",
            transfer_public(TRANSFER & !attr::FIXED_TPM),
            "must have fixedTPM",
        ),
        (
            "not fixedParent",
            transfer_public(TRANSFER & !attr::FIXED_PARENT),
            "must have fixedTPM",
        ),
        (
            "imported",
            transfer_public(TRANSFER & !attr::SENSITIVE_DATA_ORIGIN),
            "sensitiveDataOrigin",
        ),
        (
            "no decrypt",
            transfer_public(TRANSFER & !attr::DECRYPT),
            "and decrypt",
        ),
        (
            "signs too",
            transfer_public(TRANSFER | attr::SIGN),
            "neither restricted nor sign",
        ),
        (
            "restricted",
            transfer_public(TRANSFER | attr::RESTRICTED),
            "neither restricted nor sign",
        ),
        (
            "sha1 name",
            public(TRANSFER, alg::SHA1, &null, 2048, &modulus),
            "nameAlg is sha1",
        ),
        (
            "RSA-1024",
            public(TRANSFER, alg::SHA256, &null, 1024, &modulus[..128]),
            "not RSA-2048",
        ),
        (
            "PKCS#1 v1.5 scheme",
            public(
                TRANSFER,
                alg::SHA256,
                &alg::RSAES.to_be_bytes(),
                2048,
                &modulus,
            ),
            "must be NULL or OAEP with sha256",
        ),
    ];
    for (what, key, why) in cases {
        let (data, evidence) = synthetic(&nonce, key, tpm::st::ATTEST_CREATION, &nonce);
        let r = refused(check(&nonce, &data, &evidence, &PcrPolicy::new()));
        assert_eq!(r.check, Check::TransferKey, "{what}: {r}");
        assert!(r.message.contains(why), "{what}: {r}");
    }
    // An OAEP-SHA256 scheme on the key is as good as none.
    let mut oaep = alg::OAEP.to_be_bytes().to_vec();
    oaep.extend_from_slice(&alg::SHA256.to_be_bytes());
    let key = public(TRANSFER, alg::SHA256, &oaep, 2048, &modulus);
    let (data, evidence) = synthetic(&nonce, key, tpm::st::ATTEST_CREATION, &nonce);
    check(&nonce, &data, &evidence, &PcrPolicy::new()).unwrap();
    // A certification over another nonce.
    let (data, evidence) = synthetic(
        &nonce,
        transfer_public(TRANSFER),
        tpm::st::ATTEST_CERTIFY,
        &[1; 32],
    );
    let r = refused(check(&nonce, &data, &evidence, &PcrPolicy::new()));
    assert_eq!(r.check, Check::TransferKey);
    assert!(r.message.contains("another challenge"), "{r}");
}

#[test]
fn a_structure_the_tpm_did_not_make_is_refused_though_the_ak_signed_it() {
    // A restricted AK never signs a message starting with TPM_GENERATED_VALUE that the TPM
    // did not make; a message with another magic proves nothing about the TPM.
    let nonce = [0x5A; 32];
    let (data, mut evidence) = synthetic(
        &nonce,
        transfer_public(TRANSFER),
        tpm::st::ATTEST_CREATION,
        &nonce,
    );
    evidence.quote[0] = 0x00;
    evidence.quote_signature = sign(&keys().0, &evidence.quote);
    let r = refused(check(&nonce, &data, &evidence, &PcrPolicy::new()));
    assert_eq!(r.check, Check::QuoteSignature);
    assert!(
        r.message.contains("not TPM_GENERATED_VALUE 0xff544347"),
        "{r}"
    );
}

#[test]
fn the_checks_run_in_their_documented_order() {
    // Everything wrong at once: the first check in the order is the one named.
    let (nonce, report_data, evidence) = real();
    let mut e = evidence.clone();
    e.quote_signature = fixture("other-ak-quote.sig");
    e.pcrs.push(0);
    e.transfer_key.truncate(10);
    let policy: PcrPolicy = [(7, vec![[0; 32]])].into();
    assert_eq!(
        refused(check(&nonce, &report_data, &e, &policy)).check,
        Check::QuoteSignature
    );
    e.quote_signature = evidence.quote_signature.clone();
    assert_eq!(
        refused(check(&nonce, &report_data, &e, &policy)).check,
        Check::PcrDigest
    );
    e.pcrs = evidence.pcrs.clone();
    assert_eq!(
        refused(check(&nonce, &report_data, &e, &policy)).check,
        Check::PcrPolicy
    );
    assert_eq!(
        refused(check(&nonce, &report_data, &e, &PcrPolicy::new())).check,
        Check::TransferKey
    );
}

// ---------------------------------------------------------------------------------------
// The request line, the policy, the secret file.

fn request_line(nonce: &str, e: &TpmEvidence, report: &[u8]) -> String {
    serde_json::json!({
        "request": "guest-key",
        "nonce": nonce,
        "report": hex(report),
        "claims": hex(&e.claims),
        "quote": hex(&e.quote),
        "quote_signature": hex(&e.quote_signature),
        "pcrs": hex(&e.pcrs),
        "transfer_key": hex(&e.transfer_key),
        "certify": hex(&e.certify),
        "certify_signature": hex(&e.certify_signature),
    })
    .to_string()
}

#[test]
fn guest_key_requests_parse_strictly_and_other_requests_pass_through() {
    let (_, _, e) = real();
    let nonce = fixture_hex("nonce.hex");
    let report = fixture("report.bin");
    let line = request_line(&nonce, &e, &report);
    assert!(line.len() < MAX_LINE / 4, "{} bytes", line.len());
    let req = parse_guest_request(line.as_bytes()).unwrap().unwrap();
    assert_eq!(hex(&req.nonce), nonce);
    assert_eq!(req.report[..], report[..]);
    assert_eq!(req.evidence.certify, e.certify);
    // Not guest-key: for the other requests' parser.
    for other in [
        &br#"{"request":"challenge"}"#[..],
        br#"{"request":"key","nonce":"00"}"#,
        b"not json",
        br#"{"request":5}"#,
    ] {
        assert!(parse_guest_request(other).unwrap().is_none());
    }
    let bad = |line: String, why: &str| {
        let r = parse_guest_request(line.as_bytes()).unwrap_err();
        assert_eq!(r.check, Check::Request);
        assert!(r.message.contains(why), "{why}: {r}");
    };
    let mut v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut v = v.clone();
        v[key] = value;
        v.to_string()
    };
    bad(with("extra", 1.into()), "unknown field");
    bad(with("nonce", "00".into()), "nonce is 1 bytes, not 32");
    bad(with("quote", "0x00".into()), "quote is not hex");
    bad(with("pcrs", "abc".into()), "pcrs is not hex");
    bad(
        with("report", "00".repeat(REPORT_LEN - 1).into()),
        "report is",
    );
    bad(
        with("claims", "00".repeat(MAX_CLAIMS + 1).into()),
        "more than the 4096",
    );
    v.as_object_mut().unwrap().remove("certify");
    bad(v.to_string(), "missing field `certify`");
}

fn guest_table(text: &str) -> Result<GuestRelease, String> {
    let file: GuestFile = toml::from_str(text).map_err(|e| e.to_string())?;
    file.validate(Path::new("/etc/kbs"))
}

#[test]
fn the_guest_table_parses_and_bad_ones_are_refused_with_their_reason() {
    let v = |b: u8| hex(&[b; 32]);
    let g = guest_table(&format!(
        "secret-file = \"disk.secret\"\npcrs = {{ \"0\" = \"{}\", \"7\" = [\"{}\", \"{}\"] }}",
        v(1),
        v(2),
        v(3)
    ))
    .unwrap();
    assert_eq!(g.secret_file, Path::new("/etc/kbs/disk.secret"));
    assert_eq!(g.vmpl, DEFAULT_GUEST_VMPL);
    assert_eq!(g.pcrs[&0], vec![[1; 32]]);
    assert_eq!(g.pcrs[&7], vec![[2; 32], [3; 32]]);
    let bad = |text: String, why: &str| {
        let e = guest_table(&text).unwrap_err();
        assert!(e.contains(why), "{why}: {e}");
    };
    let s = "secret-file = \"s\"\n";
    bad(format!("{s}vmpl = 0"), "VMPL 0 is the paravisor's own");
    bad(format!("{s}vmpl = 4"), "not 1, 2 or 3");
    bad(
        format!("{s}pcrs = {{ \"24\" = \"{}\" }}", v(0)),
        "not a PCR index",
    );
    bad(
        format!("{s}pcrs = {{ \"x\" = \"{}\" }}", v(0)),
        "not a PCR index",
    );
    bad(
        format!("{s}pcrs = {{ \"1\" = \"abcd\" }}"),
        "not a sha256 value",
    );
    bad(format!("{s}pcrs = {{ \"1\" = [] }}"), "allows no value");
    bad(format!("{s}secret = \"x\""), "unknown field");
    bad("vmpl = 1".into(), "secret-file");
}

#[test]
fn a_guest_secret_must_be_private_and_fit_one_oaep_block() {
    let dir = std::env::temp_dir().join(format!("pv-kbs-guest-secret-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, len: usize, mode: u32| {
        let p = dir.join(name);
        std::fs::write(&p, vec![7u8; len]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    assert_eq!(
        load_secret(&write("ok", MAX_SECRET_LEN, 0o600))
            .unwrap()
            .len(),
        190
    );
    assert!(matches!(
        load_secret(&write("open", 32, 0o644)),
        Err(SecretFileError::Mode { mode: 0o644, .. })
    ));
    assert!(matches!(
        load_secret(&write("long", MAX_SECRET_LEN + 1, 0o600)),
        Err(SecretFileError::Size { len: 191, .. })
    ));
    assert!(matches!(
        load_secret(&write("empty", 0, 0o600)),
        Err(SecretFileError::Size { len: 0, .. })
    ));
    assert!(matches!(
        load_secret(&dir.join("missing")),
        Err(SecretFileError::Io { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn refusals_are_one_json_line_with_their_check_and_retry_only_when_a_new_challenge_helps() {
    let r = Refusal::new(Check::PcrPolicy, "PCR 7 is \"x\"");
    assert_eq!(
        r.reply(),
        r#"{"check":"pcr-policy","error":"PCR 7 is \"x\""}"#
    );
    let r = Refusal {
        retry: true,
        ..Refusal::new(Check::Nonce, "nonce unknown or expired")
    };
    assert_eq!(
        r.reply(),
        r#"{"check":"nonce","error":"nonce unknown or expired","retry":true}"#
    );
}

// ---------------------------------------------------------------------------------------
// The broker, end to end on the captured evidence.

/// A broker trusting the fixture's platform and measurement, with `extra` policy lines (top
/// level, before the tables) and `guest` lines (in `[guest]`, none: no `[guest]`).
fn broker(tag: &str, extra: &str, guest: Option<&str>) -> (Broker, PathBuf) {
    let dir = std::env::temp_dir().join(format!("pv-kbs-guest-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    crate::kbs::init_key(&dir.join("tenant.key")).unwrap();
    let secret = dir.join("disk.secret");
    std::fs::write(&secret, b"disk secret of the tenant").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut text = format!(
        "key-file = \"tenant.key\"\ncerts = \"{}\"\nark-fingerprint = \"{}\"\n\
         allowed-measurements = [\"{}\"]\n{extra}\n\
         [minimum-tcb]\nbootloader = 0\ntee = 0\nsnp = 0\nmicrocode = 0\n",
        fixture_dir().join("certs").display(),
        fixture_hex("ark-fingerprint.hex"),
        fixture_hex("measurement.hex"),
    );
    if let Some(g) = guest {
        text.push_str(&format!("[guest]\nsecret-file = \"disk.secret\"\n{g}\n"));
    }
    let policy = Policy::parse(&text, &dir, "test policy").unwrap();
    (Broker::new(policy).unwrap(), dir)
}

fn real_request() -> GuestKeyRequest {
    let (_, _, e) = real();
    let line = request_line(&fixture_hex("nonce.hex"), &e, &fixture("report.bin"));
    parse_guest_request(line.as_bytes()).unwrap().unwrap()
}

/// The broker's verdict on the captured request, its nonce issued now.
fn verdict(b: &Broker, req: &GuestKeyRequest) -> Result<Released, Refusal> {
    let now = Instant::now();
    b.issue_nonce(req.nonce, now);
    b.release_guest(req, now, "test")
}

#[test]
fn the_broker_releases_the_secret_to_real_guest_evidence_once() {
    let pcr7 = hex(&extended(b"secure boot state"));
    let (b, dir) = broker("ok", "", Some(&format!("pcrs = {{ \"7\" = \"{pcr7}\" }}")));
    let req = real_request();
    let released = verdict(&b, &req).unwrap();
    assert_eq!(released.wrapped_secret.len(), 256);
    assert_eq!(
        hex(&released.facts.measurement),
        fixture_hex("measurement.hex")
    );
    assert_eq!(
        released.facts.vmpl, 1,
        "pv-vtpm's report comes through attest at VMPL 1"
    );
    // The same request again: its nonce is spent.
    let r = b.release_guest(&req, Instant::now(), "test").unwrap_err();
    assert_eq!((r.check, r.retry), (Check::Nonce, false));
    assert!(r.message.contains("replay"), "{r}");
    // A nonce the broker never issued (or that expired): a new challenge may succeed.
    let mut unknown = real_request();
    unknown.nonce[0] ^= 1;
    let r = b
        .release_guest(&unknown, Instant::now(), "test")
        .unwrap_err();
    assert_eq!((r.check, r.retry), (Check::Nonce, true));
    let later = Instant::now() + Duration::from_secs(3600);
    let fresh = real_request();
    b.issue_nonce(fresh.nonce, Instant::now());
    let r = b.release_guest(&fresh, later, "test").unwrap_err();
    assert_eq!((r.check, r.retry), (Check::Nonce, true));
    // The reply line.
    let line = request_line(&fixture_hex("nonce.hex"), &real().2, &fixture("report.bin"));
    b.issue_nonce(req.nonce, Instant::now());
    let reply: serde_json::Value =
        serde_json::from_str(&b.handle_line(line.as_bytes(), Instant::now(), "test")).unwrap();
    assert_eq!(
        reply["wrapped_secret"].as_str().unwrap().len(),
        512,
        "{reply}"
    );
    let reply: serde_json::Value =
        serde_json::from_str(&b.handle_line(line.as_bytes(), Instant::now(), "test")).unwrap();
    assert_eq!(reply["check"], "nonce", "{reply}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_broker_refuses_real_guest_evidence_by_the_check_that_fails() {
    let req = real_request();
    let cases: Vec<(&str, String, Option<String>, Check, String)> = vec![
        (
            "no-guest",
            String::new(),
            None,
            Check::Policy,
            "no [guest] table".into(),
        ),
        (
            "measurement",
            String::new(),
            Some(String::new()),
            Check::Measurement,
            // Replaced below: the fixture's measurement is not allowed.
            "is not in the policy's allowed list".into(),
        ),
        (
            "vmpl",
            String::new(),
            Some("vmpl = 2".into()),
            Check::Vmpl,
            "VMPL 1; the policy accepts VMPL 2 only".into(),
        ),
        (
            "smt",
            "[guest-policy]\nallow-smt = false".into(),
            Some(String::new()),
            Check::GuestPolicy,
            "allows SMT".into(),
        ),
        (
            "pcr",
            String::new(),
            Some(format!("pcrs = {{ \"4\" = \"{}\" }}", "00".repeat(32))),
            Check::PcrPolicy,
            format!("PCR 4 (sha256) is {}", hex(&extended(b"bootloader"))),
        ),
    ];
    for (tag, extra, guest, expected, why) in cases {
        let (b, dir) = broker(tag, &extra, guest.as_deref());
        let b = if tag == "measurement" {
            let mut p = b.policy().clone();
            p.allowed_measurements = vec![[0xAB; 48]];
            Broker::new(p).unwrap()
        } else {
            b
        };
        let r = verdict(&b, &req).unwrap_err();
        assert_eq!(r.check, expected, "{tag}: {r}");
        assert!(r.message.contains(&why), "{tag}: {r}");
        let _ = std::fs::remove_dir_all(dir);
    }
    // The TCB: a minimum above the simulated platform's.
    let (b, dir) = broker("tcb", "", Some(String::new()).as_deref());
    let mut p = b.policy().clone();
    p.minimum_tcb.snp = 255;
    let r = verdict(&Broker::new(p).unwrap(), &req).unwrap_err();
    assert_eq!(r.check, Check::Tcb, "{r}");
    let _ = std::fs::remove_dir_all(dir);
    // A report with one bit changed: its signature fails.
    let (b, dir) = broker("report", "", Some(String::new()).as_deref());
    let mut forged = real_request();
    forged.report[0x90] ^= 1;
    let r = verdict(&b, &forged).unwrap_err();
    assert_eq!(r.check, Check::Report, "{r}");
    assert!(r.message.contains("signature does not verify"), "{r}");
    let _ = std::fs::remove_dir_all(dir);
}
