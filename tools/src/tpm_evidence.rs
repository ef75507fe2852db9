//! TPM 2.0 structures a guest sends as evidence, and the checks of their signatures: the
//! key broker's reading of `tpm2_quote`, `tpm2_certifycreation` / `tpm2_certify` and
//! `tpm2_create` output (TPM 2.0 Library, Part 2: Structures).
//!
//! Every byte here comes from the network: each structure is parsed in full by a bounds-checked
//! [`Reader`] into owned values, every size is checked against the specification's maximum,
//! and nothing is left over; every failure is a [`TpmParseError`] naming the structure and
//! the offset. Nothing here decides whether evidence is acceptable (that is the broker's
//! policy, `kbs_guest`); it only says what the bytes are, and whether a signature over them
//! verifies. The cryptography is the `rsa` and `sha2` crates'.

use rsa::BigUint;
use rsa::Pkcs1v15Sign;
use rsa::RsaPublicKey;
use sha2::Digest;
use sha2::Sha256;

/// TPM_ALG_ID values (Part 2, table 9) that this module speaks about.
pub mod alg {
    pub const RSA: u16 = 0x0001;
    pub const SHA1: u16 = 0x0004;
    pub const SHA256: u16 = 0x000B;
    pub const SHA384: u16 = 0x000C;
    pub const SHA512: u16 = 0x000D;
    pub const NULL: u16 = 0x0010;
    pub const RSASSA: u16 = 0x0014;
    pub const RSAES: u16 = 0x0015;
    pub const RSAPSS: u16 = 0x0016;
    pub const OAEP: u16 = 0x0017;
}

/// TPM_GENERATED_VALUE: the first four bytes of every structure the TPM signs itself. A
/// restricted signing key (the AK) signs nothing else that starts with them, so a message that
/// does and verifies was made by the TPM.
pub const TPM_GENERATED: u32 = 0xFF54_4347;

/// TPM_ST attestation types (Part 2, table 19).
pub mod st {
    pub const ATTEST_CERTIFY: u16 = 0x8017;
    pub const ATTEST_QUOTE: u16 = 0x8018;
    pub const ATTEST_CREATION: u16 = 0x801A;
}

/// TPMA_OBJECT bits (Part 2, table 31).
pub mod attr {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN: u32 = 1 << 18;
}

/// The largest TPMU_NAME: a digest of the largest hash (SHA-512) after its algorithm.
const MAX_NAME: usize = 2 + 64;
/// The largest TPM2B_DATA (sizeof TPMT_HA: an algorithm and the largest digest).
const MAX_DATA: usize = 2 + 64;
/// The largest digest (SHA-512).
const MAX_DIGEST: usize = 64;
/// Banks in one TPML_PCR_SELECTION (the TPM's HASH_COUNT is at most the four hashes here; a
/// few to spare).
const MAX_BANKS: u32 = 8;
/// Bytes of a PCR bitmap: 32 PCRs. TPMs implement 24 (PCR_SELECT_MAX 3).
const MAX_PCR_SELECT: usize = 4;
/// The largest RSA key or signature this module reads: 4096 bits.
const MAX_RSA_BYTES: usize = 512;
/// The largest authPolicy (a SHA-512 digest).
const MAX_POLICY: usize = 64;

/// Why bytes are not the structure they should be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmParseError {
    #[error("{what}: ends at byte {at}, where {need} more bytes were expected")]
    Truncated {
        what: &'static str,
        at: usize,
        need: usize,
    },
    #[error("{what}: {extra} bytes left over after the structure")]
    Trailing { what: &'static str, extra: usize },
    #[error("{what}: {field} is {found}, more than the {max} it may be")]
    TooLarge {
        what: &'static str,
        field: &'static str,
        found: usize,
        max: usize,
    },
    #[error("{what}: {message}")]
    Invalid { what: &'static str, message: String },
}

/// A cursor over hostile bytes: every read is bounds-checked, big-endian as the TPM writes.
struct Reader<'a> {
    what: &'static str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(what: &'static str, bytes: &'a [u8]) -> Reader<'a> {
        Reader { what, bytes, at: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TpmParseError> {
        let end = self.at.checked_add(n);
        match end.and_then(|end| self.bytes.get(self.at..end)) {
            Some(s) => {
                self.at += n;
                Ok(s)
            }
            None => Err(TpmParseError::Truncated {
                what: self.what,
                at: self.bytes.len(),
                need: n.saturating_sub(self.bytes.len().saturating_sub(self.at)),
            }),
        }
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TpmParseError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, TpmParseError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, TpmParseError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, TpmParseError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, TpmParseError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A TPM2B: a 16-bit size, then that many bytes, at most `max`.
    fn sized(&mut self, field: &'static str, max: usize) -> Result<Vec<u8>, TpmParseError> {
        let size = usize::from(self.u16()?);
        if size > max {
            return Err(TpmParseError::TooLarge {
                what: self.what,
                field,
                found: size,
                max,
            });
        }
        Ok(self.take(size)?.to_vec())
    }

    fn invalid(&self, message: String) -> TpmParseError {
        TpmParseError::Invalid {
            what: self.what,
            message,
        }
    }

    /// The end: nothing may be left.
    fn end(self) -> Result<(), TpmParseError> {
        match self.bytes.len() - self.at.min(self.bytes.len()) {
            0 => Ok(()),
            extra => Err(TpmParseError::Trailing {
                what: self.what,
                extra,
            }),
        }
    }
}

/// The digest size of a hash algorithm the TPM banks use.
pub fn digest_size(hash: u16) -> Option<usize> {
    match hash {
        alg::SHA1 => Some(20),
        alg::SHA256 => Some(32),
        alg::SHA384 => Some(48),
        alg::SHA512 => Some(64),
        _ => None,
    }
}

/// A hash algorithm's name, for messages.
pub fn hash_name(hash: u16) -> String {
    match hash {
        alg::SHA1 => "sha1".into(),
        alg::SHA256 => "sha256".into(),
        alg::SHA384 => "sha384".into(),
        alg::SHA512 => "sha512".into(),
        other => format!("hash {other:#06x}"),
    }
}

/// One bank of a TPML_PCR_SELECTION: its hash and the PCRs selected, ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrBank {
    pub hash: u16,
    pub pcrs: Vec<u8>,
}

/// TPMS_CLOCK_INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockInfo {
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub safe: bool,
}

/// What a TPMS_ATTEST attests (TPMU_ATTEST), for the types a guest sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attested {
    /// TPMS_QUOTE_INFO.
    Quote {
        selection: Vec<PcrBank>,
        pcr_digest: Vec<u8>,
    },
    /// TPMS_CERTIFY_INFO (`tpm2_certify`).
    Certify {
        name: Vec<u8>,
        qualified_name: Vec<u8>,
    },
    /// TPMS_CREATION_INFO (`tpm2_certifycreation`).
    Creation {
        object_name: Vec<u8>,
        creation_hash: Vec<u8>,
    },
}

/// A TPMS_ATTEST: what a TPM signs with an attestation key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    /// TPM_GENERATED_VALUE if the TPM made it (checked by whoever relies on it).
    pub magic: u32,
    /// The TPM_ST_ATTEST_* type.
    pub kind: u16,
    pub qualified_signer: Vec<u8>,
    /// The caller's qualifying data (the broker's nonce).
    pub extra_data: Vec<u8>,
    pub clock_info: ClockInfo,
    pub firmware_version: u64,
    pub attested: Attested,
}

/// The name of a TPM_ST attestation type, for messages.
pub fn attest_type_name(kind: u16) -> String {
    match kind {
        st::ATTEST_QUOTE => "ATTEST_QUOTE".into(),
        st::ATTEST_CERTIFY => "ATTEST_CERTIFY".into(),
        st::ATTEST_CREATION => "ATTEST_CREATION".into(),
        0x8014 => "ATTEST_NV".into(),
        0x8015 => "ATTEST_COMMAND_AUDIT".into(),
        0x8016 => "ATTEST_SESSION_AUDIT".into(),
        0x8019 => "ATTEST_TIME".into(),
        0x801C => "ATTEST_NV_DIGEST".into(),
        other => format!("{other:#06x}"),
    }
}

/// Parses a TPMS_ATTEST (`tpm2_quote -m`, `tpm2_certify -o`, `tpm2_certifycreation
/// --attestation`). The magic is read, not judged; a type other than quote, certify and
/// creation is refused (nothing else is evidence here).
pub fn parse_attest(bytes: &[u8]) -> Result<Attest, TpmParseError> {
    let mut r = Reader::new("TPMS_ATTEST", bytes);
    let magic = r.u32()?;
    let kind = r.u16()?;
    let qualified_signer = r.sized("qualifiedSigner", MAX_NAME)?;
    let extra_data = r.sized("extraData", MAX_DATA)?;
    let clock = r.u64()?;
    let reset_count = r.u32()?;
    let restart_count = r.u32()?;
    let safe = match r.u8()? {
        0 => false,
        1 => true,
        other => return Err(r.invalid(format!("clockInfo.safe is {other}, not YES or NO"))),
    };
    let firmware_version = r.u64()?;
    let attested = match kind {
        st::ATTEST_QUOTE => {
            let selection = parse_selection(&mut r)?;
            let pcr_digest = r.sized("pcrDigest", MAX_DIGEST)?;
            Attested::Quote {
                selection,
                pcr_digest,
            }
        }
        st::ATTEST_CERTIFY => Attested::Certify {
            name: r.sized("name", MAX_NAME)?,
            qualified_name: r.sized("qualifiedName", MAX_NAME)?,
        },
        st::ATTEST_CREATION => Attested::Creation {
            object_name: r.sized("objectName", MAX_NAME)?,
            creation_hash: r.sized("creationHash", MAX_DIGEST)?,
        },
        other => {
            return Err(r.invalid(format!(
                "type {} is not a quote, certification or creation certification",
                attest_type_name(other)
            )))
        }
    };
    r.end()?;
    Ok(Attest {
        magic,
        kind,
        qualified_signer,
        extra_data,
        clock_info: ClockInfo {
            clock,
            reset_count,
            restart_count,
            safe,
        },
        firmware_version,
        attested,
    })
}

/// A TPML_PCR_SELECTION. A bank listed twice is refused: which of its values counts would
/// be ambiguous.
fn parse_selection(r: &mut Reader<'_>) -> Result<Vec<PcrBank>, TpmParseError> {
    let count = r.u32()?;
    if count > MAX_BANKS {
        return Err(TpmParseError::TooLarge {
            what: r.what,
            field: "pcrSelect.count",
            found: count as usize,
            max: MAX_BANKS as usize,
        });
    }
    let mut banks: Vec<PcrBank> = Vec::new();
    for _ in 0..count {
        let hash = r.u16()?;
        let size = usize::from(r.u8()?);
        if size > MAX_PCR_SELECT {
            return Err(TpmParseError::TooLarge {
                what: r.what,
                field: "sizeofSelect",
                found: size,
                max: MAX_PCR_SELECT,
            });
        }
        let bitmap = r.take(size)?;
        if banks.iter().any(|b| b.hash == hash) {
            return Err(r.invalid(format!("the {} bank is selected twice", hash_name(hash))));
        }
        let mut pcrs = Vec::new();
        for (byte, bits) in bitmap.iter().enumerate() {
            for bit in 0..8 {
                if bits & (1 << bit) != 0 {
                    // byte < MAX_PCR_SELECT: at most 31.
                    pcrs.push((byte * 8 + bit) as u8);
                }
            }
        }
        banks.push(PcrBank { hash, pcrs });
    }
    Ok(banks)
}

/// A TPMT_SIGNATURE (`-s` in tpm2-tools' default "tss" format). Only RSA signatures are
/// read; others are refused by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// TPM_ALG_RSASSA or TPM_ALG_RSAPSS.
    pub scheme: u16,
    pub hash: u16,
    pub signature: Vec<u8>,
}

/// Parses a TPMT_SIGNATURE.
pub fn parse_signature(bytes: &[u8]) -> Result<Signature, TpmParseError> {
    let mut r = Reader::new("TPMT_SIGNATURE", bytes);
    let scheme = r.u16()?;
    if scheme != alg::RSASSA && scheme != alg::RSAPSS {
        return Err(r.invalid(format!(
            "signature algorithm {scheme:#06x} is not RSASSA ({:#06x}) or RSAPSS",
            alg::RSASSA
        )));
    }
    let hash = r.u16()?;
    let signature = r.sized("signature", MAX_RSA_BYTES)?;
    r.end()?;
    Ok(Signature {
        scheme,
        hash,
        signature,
    })
}

/// An RSA key's public area (TPMT_PUBLIC of type TPM_ALG_RSA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RsaPublicArea {
    pub name_alg: u16,
    pub attributes: u32,
    pub auth_policy: Vec<u8>,
    /// TPMT_SYM_DEF_OBJECT's algorithm (TPM_ALG_NULL for a key that is not a parent).
    pub symmetric: u16,
    /// TPMT_RSA_SCHEME: the scheme and, if it has one, its hash.
    pub scheme: u16,
    pub scheme_hash: Option<u16>,
    pub key_bits: u16,
    /// 0 stands for 65537.
    pub exponent: u32,
    pub modulus: Vec<u8>,
    /// The TPMT_PUBLIC bytes exactly as sent: what the key's name hashes.
    pub public_area: Vec<u8>,
}

/// Parses a TPM2B_PUBLIC holding an RSA key (`tpm2_create -u`, `tpm2_readpublic -o`): the
/// 16-bit size, then a TPMT_PUBLIC of exactly that size.
pub fn parse_rsa_public(bytes: &[u8]) -> Result<RsaPublicArea, TpmParseError> {
    let mut outer = Reader::new("TPM2B_PUBLIC", bytes);
    let size = usize::from(outer.u16()?);
    let area = outer.take(size)?;
    outer.end()?;
    let mut r = Reader::new("TPMT_PUBLIC", area);
    let kind = r.u16()?;
    if kind != alg::RSA {
        return Err(r.invalid(format!(
            "type {kind:#06x} is not an RSA key ({:#06x})",
            alg::RSA
        )));
    }
    let name_alg = r.u16()?;
    let attributes = r.u32()?;
    let auth_policy = r.sized("authPolicy", MAX_POLICY)?;
    let symmetric = r.u16()?;
    if symmetric != alg::NULL {
        // keyBits and mode of the symmetric algorithm a parent protects its children with.
        r.u16()?;
        r.u16()?;
    }
    let scheme = r.u16()?;
    let scheme_hash = match scheme {
        alg::NULL | alg::RSAES => None,
        alg::RSASSA | alg::RSAPSS | alg::OAEP => Some(r.u16()?),
        other => return Err(r.invalid(format!("RSA scheme {other:#06x} is not one of RSA's"))),
    };
    let key_bits = r.u16()?;
    let exponent = r.u32()?;
    let modulus = r.sized("unique.rsa", MAX_RSA_BYTES)?;
    r.end()?;
    Ok(RsaPublicArea {
        name_alg,
        attributes,
        auth_policy,
        symmetric,
        scheme,
        scheme_hash,
        key_bits,
        exponent,
        modulus,
        public_area: area.to_vec(),
    })
}

impl RsaPublicArea {
    /// The key's TPM name, nameAlg ‖ H_nameAlg(TPMT_PUBLIC), for a SHA-256 nameAlg (the only
    /// one the broker accepts); None for another.
    pub fn name(&self) -> Option<Vec<u8>> {
        if self.name_alg != alg::SHA256 {
            return None;
        }
        let mut name = alg::SHA256.to_be_bytes().to_vec();
        name.extend_from_slice(&Sha256::digest(&self.public_area));
        Some(name)
    }

    /// The key for the `rsa` crate.
    pub fn key(&self) -> Result<RsaPublicKey, String> {
        let e = if self.exponent == 0 {
            65537
        } else {
            self.exponent
        };
        rsa_key(&self.modulus, &e.to_be_bytes())
    }
}

/// An RSA public key from its big-endian modulus and exponent.
pub fn rsa_key(modulus: &[u8], exponent: &[u8]) -> Result<RsaPublicKey, String> {
    RsaPublicKey::new(
        BigUint::from_bytes_be(modulus),
        BigUint::from_bytes_be(exponent),
    )
    .map_err(|e| format!("not a usable RSA public key: {e}"))
}

/// Checks that `signature` is `key`'s RSASSA-PKCS1-v1_5 SHA-256 signature of `message`.
pub fn verify_rsassa_sha256(
    key: &RsaPublicKey,
    message: &[u8],
    signature: &Signature,
) -> Result<(), String> {
    if signature.scheme != alg::RSASSA || signature.hash != alg::SHA256 {
        return Err(format!(
            "the signature is {} with {}, not RSASSA with sha256",
            if signature.scheme == alg::RSAPSS {
                "RSAPSS"
            } else {
                "RSASSA"
            },
            hash_name(signature.hash)
        ));
    }
    key.verify(
        Pkcs1v15Sign::new::<Sha256>(),
        &Sha256::digest(message),
        &signature.signature,
    )
    .map_err(|_| "the signature does not verify with the key".to_string())
}

/// One PCR's value as quoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcrValue {
    pub hash: u16,
    pub index: u8,
    pub value: Vec<u8>,
}

/// Splits PCR values as `tpm2_quote -o FILE -F values` writes them (each selected PCR's
/// digest, no framing: bank by bank in the selection's order, PCRs ascending) along
/// `selection`. The length must be exactly what the selection calls for.
pub fn split_pcr_values(selection: &[PcrBank], values: &[u8]) -> Result<Vec<PcrValue>, String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    for bank in selection {
        let size = digest_size(bank.hash).ok_or_else(|| {
            format!(
                "the quote selects PCRs of an unknown bank ({})",
                hash_name(bank.hash)
            )
        })?;
        for index in &bank.pcrs {
            let value = values.get(at..at + size).ok_or_else(|| {
                format!(
                    "{} bytes of PCR values for a selection of {} bytes",
                    values.len(),
                    selection_len(selection)
                )
            })?;
            out.push(PcrValue {
                hash: bank.hash,
                index: *index,
                value: value.to_vec(),
            });
            at += size;
        }
    }
    if at != values.len() {
        return Err(format!(
            "{} bytes of PCR values for a selection of {at} bytes",
            values.len()
        ));
    }
    Ok(out)
}

/// The bytes of PCR values a selection calls for (unknown banks count as nothing).
fn selection_len(selection: &[PcrBank]) -> usize {
    selection
        .iter()
        .map(|b| digest_size(b.hash).unwrap_or(0) * b.pcrs.len())
        .sum()
}

/// The quote's pcrDigest for these values: SHA-256 of their concatenation in selection
/// order (the TPM hashes with the signing scheme's hash, SHA-256 for the AK).
pub fn pcr_digest(values: &[PcrValue]) -> [u8; 32] {
    let mut h = Sha256::new();
    for v in values {
        h.update(&v.value);
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quote as `tpm2_quote` made it on swtpm (sha256:0-9, nonce 1526fa..).
    const QUOTE: &str = concat!(
        "ff54434780180022000b172fabb4b1aa235eee7e23b5414c980a36ca9fadd46f51dd9c58d5e3fd248c3a0020",
        "1526faf32b11088f8c6c67229cc28b7bed6cfdf3b001b8ad6049d3d28d3a9ee9000000000000a03f00000001",
        "0000000001201910230016363600000001000b03ff0300002094170d7ec4cd1ecdd815c0ba49fb9ed7ea0048",
        "5076f7e2055264a7220883e488",
    );

    fn unhex(s: &str) -> Vec<u8> {
        microkernel::util::parse_hex(s).unwrap()
    }

    #[test]
    fn a_quote_parses_into_its_fields() {
        let q = parse_attest(&unhex(QUOTE)).unwrap();
        assert_eq!(q.magic, TPM_GENERATED);
        assert_eq!(q.kind, st::ATTEST_QUOTE);
        assert_eq!(q.extra_data[..2], [0x15, 0x26]);
        assert_eq!(q.extra_data.len(), 32);
        assert_eq!(q.qualified_signer.len(), 34);
        match q.attested {
            Attested::Quote {
                selection,
                pcr_digest,
            } => {
                assert_eq!(
                    selection,
                    vec![PcrBank {
                        hash: alg::SHA256,
                        pcrs: (0..10).collect()
                    }]
                );
                assert_eq!(pcr_digest.len(), 32);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_truncation_and_extension_of_a_quote_is_a_typed_error() {
        let q = unhex(QUOTE);
        for n in 0..q.len() {
            assert!(parse_attest(&q[..n]).is_err(), "cut at {n}");
        }
        let mut long = q.clone();
        long.push(0);
        assert!(matches!(
            parse_attest(&long),
            Err(TpmParseError::Trailing { extra: 1, .. })
        ));
    }

    #[test]
    fn oversized_fields_and_twice_selected_banks_are_refused() {
        let mut q = unhex(QUOTE);
        // qualifiedSigner's size (offset 6) set beyond a name's.
        q[6..8].copy_from_slice(&0x0100u16.to_be_bytes());
        assert!(matches!(
            parse_attest(&q),
            Err(TpmParseError::TooLarge {
                field: "qualifiedSigner",
                ..
            })
        ));
        let mut sel = Vec::new();
        sel.extend_from_slice(&2u32.to_be_bytes());
        for _ in 0..2 {
            sel.extend_from_slice(&[0x00, 0x0b, 3, 1, 0, 0]);
        }
        let mut r = Reader::new("t", &sel);
        assert!(parse_selection(&mut r)
            .unwrap_err()
            .to_string()
            .contains("selected twice"));
    }

    #[test]
    fn pcr_values_split_along_the_selection_exactly() {
        let sel = vec![
            PcrBank {
                hash: alg::SHA256,
                pcrs: vec![0, 7],
            },
            PcrBank {
                hash: alg::SHA1,
                pcrs: vec![1],
            },
        ];
        let mut values = vec![0xAA; 32];
        values.extend_from_slice(&[0xBB; 32]);
        values.extend_from_slice(&[0xCC; 20]);
        let v = split_pcr_values(&sel, &values).unwrap();
        assert_eq!(v.len(), 3);
        assert_eq!(
            (v[1].hash, v[1].index, v[1].value[0]),
            (alg::SHA256, 7, 0xBB)
        );
        assert_eq!(
            (v[2].hash, v[2].index, v[2].value.len()),
            (alg::SHA1, 1, 20)
        );
        assert!(split_pcr_values(&sel, &values[..83]).is_err());
        let mut more = values.clone();
        more.push(0);
        assert!(split_pcr_values(&sel, &more).is_err());
        let unknown = vec![PcrBank {
            hash: 0x0012,
            pcrs: vec![0],
        }];
        assert!(split_pcr_values(&unknown, &[0; 32]).is_err());
    }

    #[test]
    fn signatures_and_public_areas_parse_strictly() {
        let mut sig = vec![0x00, 0x14, 0x00, 0x0b, 0x01, 0x00];
        sig.extend_from_slice(&[7; 256]);
        let s = parse_signature(&sig).unwrap();
        assert_eq!(
            (s.scheme, s.hash, s.signature.len()),
            (alg::RSASSA, alg::SHA256, 256)
        );
        sig[1] = 0x18; // ECDSA
        assert!(parse_signature(&sig).is_err());
        sig[1] = 0x14;
        assert!(parse_signature(&sig[..100]).is_err());
        // An RSA-2048 decrypt key as `tpm2_create -G rsa2048:null:null` writes it.
        let mut area = vec![0x00, 0x01, 0x00, 0x0b, 0x00, 0x02, 0x00, 0x72, 0x00, 0x00];
        area.extend_from_slice(&[0x00, 0x10, 0x00, 0x10, 0x08, 0x00, 0, 0, 0, 0, 0x01, 0x00]);
        area.extend_from_slice(&[0xC5; 256]);
        let mut public = (area.len() as u16).to_be_bytes().to_vec();
        public.extend_from_slice(&area);
        let p = parse_rsa_public(&public).unwrap();
        assert_eq!(p.attributes, 0x0002_0072);
        assert_eq!((p.key_bits, p.exponent, p.modulus.len()), (2048, 0, 256));
        assert_eq!(p.public_area, area);
        let name = p.name().unwrap();
        assert_eq!(name[..2], [0x00, 0x0b]);
        assert_eq!(name[2..], Sha256::digest(&area)[..]);
        // The outer size must be the area's.
        public[1] ^= 1;
        assert!(parse_rsa_public(&public).is_err());
    }
}
