//! The key protectors kept in a guest-state file, unencrypted (each protects itself), so that
//! the datastore key can be recovered before the file is unlocked:
//!
//! - HW_KEY_PROTECTOR (11): the datastore key sealed by the microkernel to this platform and
//!   launch ([`SealedKey`]), under a key only the microkernel can have the platform derive:
//!   its context is one the platform channel refuses
//!   ([`ipc_defs::services::platform::DATASTORE_KEY_CONTEXT`]), so no service (pv-attest
//!   included) can obtain it.
//! - KEY_PROTECTOR (6), with key release: the datastore key wrapped under the tenant key a
//!   key broker releases to a report its policy accepts ([`TenantWrapped`]). It is what lets
//!   a new measurement re-seal: the broker releases the tenant key to the new launch, which
//!   unwraps the datastore key and seals it again.
//!
//! This module seals and wraps (in the microkernel, which holds the platform); reading and
//! writing the protectors in the host's file is the guest-state broker's
//! (`pv_vmgs::broker`, run as `pv-vmgs --broker` in the vmgs service's sandbox).

use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use aes_gcm::Nonce;
use aes_gcm::Tag;
use ipc_defs::services::platform::FieldSelect;
use ipc_defs::services::platform::DATASTORE_KEY_CONTEXT;
use zeroize::Zeroizing;

use crate::platform::Platform;
use crate::snp::LaunchFacts;

/// A datastore key.
pub const KEY_LEN: usize = 32;

/// A sealed datastore key as it is stored (VMGS file id HW_KEY_PROTECTOR, unencrypted: it
/// protects itself). The header is in clear so that a refusal can say what it was sealed to;
/// it is authenticated (AES-GCM associated data), so changing it breaks the seal.
///
/// Layout: magic `PVSEAL01` (8) | format 1 (1) | GUEST_FIELD_SELECT bits (1) | measurement
/// at sealing (48) | nonce (12) | wrapped key (32) | GCM tag (16) = 118 bytes. (The blobs
/// pv-attest made before sealing moved into the microkernel are the same, under the same
/// wrapping key: they open.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedKey {
    pub select: FieldSelect,
    /// The launch measurement when it was sealed (part of the key only if selected).
    pub measurement: [u8; 48],
    pub nonce: [u8; 12],
    pub wrapped: [u8; KEY_LEN],
    pub tag: [u8; 16],
}

impl SealedKey {
    pub const MAGIC: [u8; 8] = *b"PVSEAL01";
    pub const FORMAT: u8 = 1;
    /// Bytes of the authenticated clear header.
    pub const HEADER_LEN: usize = 8 + 1 + 1 + 48;
    pub const LEN: usize = Self::HEADER_LEN + 12 + KEY_LEN + 16;

    /// The clear header (the associated data of the seal).
    pub fn header(&self) -> [u8; Self::HEADER_LEN] {
        let mut h = [0u8; Self::HEADER_LEN];
        h[..8].copy_from_slice(&Self::MAGIC);
        h[8] = Self::FORMAT;
        h[9] = self.select.bits();
        h[10..].copy_from_slice(&self.measurement);
        h
    }

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        let mut at = 0;
        for part in [
            &self.header()[..],
            &self.nonce[..],
            &self.wrapped[..],
            &self.tag[..],
        ] {
            b[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        b
    }

    /// Parses stored bytes (hostile: they come from the host's disk).
    pub fn parse(bytes: &[u8]) -> Result<SealedKey, SealedKeyError> {
        if bytes.len() != Self::LEN {
            return Err(SealedKeyError::Length(bytes.len()));
        }
        if bytes[..8] != Self::MAGIC {
            return Err(SealedKeyError::Magic);
        }
        if bytes[8] != Self::FORMAT {
            return Err(SealedKeyError::Format(bytes[8]));
        }
        let bits = bytes[9];
        if bits & !0b0011_1001 != 0 {
            return Err(SealedKeyError::Select(bits));
        }
        let select = FieldSelect {
            policy: bits & 1 != 0,
            measurement: bits & (1 << 3) != 0,
            guest_svn: bits & (1 << 4) != 0,
            tcb: bits & (1 << 5) != 0,
        };
        let take = |at: usize, n: usize| &bytes[at..at + n];
        let mut k = SealedKey {
            select,
            measurement: [0; 48],
            nonce: [0; 12],
            wrapped: [0; KEY_LEN],
            tag: [0; 16],
        };
        k.measurement.copy_from_slice(take(10, 48));
        k.nonce.copy_from_slice(take(58, 12));
        k.wrapped.copy_from_slice(take(70, KEY_LEN));
        k.tag.copy_from_slice(take(70 + KEY_LEN, 16));
        Ok(k)
    }

    /// Seals `key` to `platform` and the launch facts `select` names (of `facts`, whose
    /// measurement also goes into the clear header).
    pub fn seal(
        platform: &Platform,
        facts: &LaunchFacts,
        key: &[u8; KEY_LEN],
        select: FieldSelect,
    ) -> Result<SealedKey, String> {
        let mut nonce = [0u8; 12];
        getrandom::getrandom(&mut nonce).map_err(|e| format!("no randomness: {e}"))?;
        let mut sealed = SealedKey {
            select,
            measurement: facts.measurement,
            nonce,
            wrapped: *key,
            tag: [0; 16],
        };
        let cipher = Aes256Gcm::new(&(*wrapping_key(platform, facts, select)).into());
        let n: Nonce<_> = sealed.nonce.into();
        let tag: Tag = cipher
            .encrypt_inout_detached(&n, &sealed.header(), (&mut sealed.wrapped[..]).into())
            .map_err(|_| "AES-GCM failed".to_string())?;
        sealed.tag = tag.into();
        Ok(sealed)
    }

    /// The datastore key, if it was sealed on `platform` to these launch facts (those its
    /// header selects) and nothing changed.
    pub fn unseal(
        &self,
        platform: &Platform,
        facts: &LaunchFacts,
    ) -> Option<Zeroizing<[u8; KEY_LEN]>> {
        let cipher = Aes256Gcm::new(&(*wrapping_key(platform, facts, self.select)).into());
        let n: Nonce<_> = self.nonce.into();
        let tag: Tag = self.tag.into();
        let mut key = Zeroizing::new(self.wrapped);
        cipher
            .decrypt_inout_detached(&n, &self.header(), (&mut key[..]).into(), &tag)
            .ok()?;
        Some(key)
    }
}

/// The key that wraps the datastore key: `KDF(platform key, "VMGSKEY", "ISOHWKEY")` (SP
/// 800-108, as OpenHCL names its hardware key protector), the platform key being the derived
/// key for `select` and the reserved context. Asked of the platform in-process: the platform
/// channel refuses that context.
fn wrapping_key(
    platform: &Platform,
    facts: &LaunchFacts,
    select: FieldSelect,
) -> Zeroizing<[u8; 32]> {
    let platform_key = Zeroizing::new(platform.derived_key(select, facts, &DATASTORE_KEY_CONTEXT));
    Zeroizing::new(pv_sim::kdf_sp800_108(
        &platform_key[..],
        b"VMGSKEY",
        b"ISOHWKEY",
    ))
}

/// Why stored bytes are not a sealed key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SealedKeyError {
    #[error("{0} bytes, a sealed key is {len}", len = SealedKey::LEN)]
    Length(usize),
    #[error("not a sealed key (no PVSEAL01 magic)")]
    Magic,
    #[error("unknown sealed-key format {0}")]
    Format(u8),
    #[error("unknown field-select bits {0:#04x}")]
    Select(u8),
}

/// The datastore key wrapped under a tenant key (AES-256-GCM; the magic and the tenant key's
/// id are the associated data, so the id cannot be changed without breaking the tag).
/// Layout: magic `PVKBSKP2` (8) | tenant key id (32) | nonce (12) | wrapped key (32) | tag
/// (16) = 100 bytes. The id (`kbs::key_id`) says which tenant key opens it, so a protector
/// made under another broker key is noticed while the key can still be re-wrapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantWrapped {
    pub key_id: [u8; 32],
    pub nonce: [u8; 12],
    pub wrapped: [u8; 32],
    pub tag: [u8; 16],
}

impl TenantWrapped {
    pub const MAGIC: [u8; 8] = *b"PVKBSKP2";
    pub const LEN: usize = 8 + 32 + 12 + 32 + 16;

    fn aad(key_id: &[u8; 32]) -> [u8; 40] {
        let mut a = [0u8; 40];
        a[..8].copy_from_slice(&Self::MAGIC);
        a[8..].copy_from_slice(key_id);
        a
    }

    /// Wraps `key` under `tenant`.
    pub fn wrap(tenant: &[u8; 32], key: &[u8; 32]) -> Result<TenantWrapped, String> {
        let mut nonce = [0u8; 12];
        getrandom::getrandom(&mut nonce).map_err(|e| format!("no randomness: {e}"))?;
        let key_id = crate::key_release::key_id_bytes(tenant);
        let mut wrapped = *key;
        let cipher = Aes256Gcm::new(&(*tenant).into());
        let n: Nonce<_> = nonce.into();
        let tag: Tag = cipher
            .encrypt_inout_detached(&n, &Self::aad(&key_id), (&mut wrapped[..]).into())
            .map_err(|_| "AES-GCM failed".to_string())?;
        Ok(TenantWrapped {
            key_id,
            nonce,
            wrapped,
            tag: tag.into(),
        })
    }

    /// The datastore key, if `tenant` is the key it was wrapped under and nothing changed.
    pub fn unwrap(&self, tenant: &[u8; 32]) -> Option<Zeroizing<[u8; 32]>> {
        let mut key = Zeroizing::new(self.wrapped);
        let cipher = Aes256Gcm::new(&(*tenant).into());
        let n: Nonce<_> = self.nonce.into();
        let tag: Tag = self.tag.into();
        cipher
            .decrypt_inout_detached(&n, &Self::aad(&self.key_id), (&mut key[..]).into(), &tag)
            .ok()?;
        Some(key)
    }

    /// The id of the tenant key it says it was wrapped under (hex, as `kbs::key_id`).
    pub fn key_id_hex(&self) -> String {
        crate::util::hex(&self.key_id)
    }

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&Self::MAGIC);
        b[8..40].copy_from_slice(&self.key_id);
        b[40..52].copy_from_slice(&self.nonce);
        b[52..84].copy_from_slice(&self.wrapped);
        b[84..].copy_from_slice(&self.tag);
        b
    }

    /// Parses stored bytes (hostile: the host's disk).
    pub fn parse(bytes: &[u8]) -> Result<TenantWrapped, String> {
        if bytes.len() != Self::LEN {
            return Err(format!(
                "{} bytes, a tenant-wrapped key is {}",
                bytes.len(),
                Self::LEN
            ));
        }
        if bytes[..8] != Self::MAGIC {
            return Err("not a tenant-wrapped key (no PVKBSKP2 magic)".into());
        }
        let mut w = TenantWrapped {
            key_id: [0; 32],
            nonce: [0; 12],
            wrapped: [0; 32],
            tag: [0; 16],
        };
        w.key_id.copy_from_slice(&bytes[8..40]);
        w.nonce.copy_from_slice(&bytes[40..52]);
        w.wrapped.copy_from_slice(&bytes[52..84]);
        w.tag.copy_from_slice(&bytes[84..]);
        Ok(w)
    }
}

/// The launch facts a sealing policy binds the datastore key to. Policy and TCB always (a
/// debug-enabled launch or an older firmware cannot unseal); the measurement under
/// `measurement`.
pub fn sealing_select(policy: crate::manifest::Sealing) -> FieldSelect {
    FieldSelect {
        policy: true,
        measurement: policy == crate::manifest::Sealing::Measurement,
        guest_svn: false,
        tcb: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::platform_server::tests::test_platform;

    const MEASUREMENT: FieldSelect = FieldSelect {
        policy: true,
        measurement: true,
        guest_svn: false,
        tcb: true,
    };
    const PLATFORM: FieldSelect = FieldSelect {
        policy: true,
        measurement: false,
        guest_svn: false,
        tcb: true,
    };

    fn facts(measurement: u8) -> LaunchFacts {
        LaunchFacts {
            measurement: [measurement; 48],
            policy: crate::snp::POLICY,
            guest_svn: 0,
        }
    }

    fn hex_bytes(s: &str) -> Vec<u8> {
        crate::util::parse_hex(s).unwrap()
    }

    #[test]
    fn tenant_wrap_round_trips_and_refuses_the_wrong_key_or_a_change() {
        let w = TenantWrapped::wrap(&[1; 32], &[2; 32]).unwrap();
        assert_eq!(w.key_id_hex(), crate::key_release::key_id(&[1; 32]));
        let b = w.to_bytes();
        let p = TenantWrapped::parse(&b).unwrap();
        assert_eq!(*p.unwrap(&[1; 32]).unwrap(), [2; 32]);
        assert!(p.unwrap(&[3; 32]).is_none());
        // Any changed byte, the key id included, breaks it.
        for i in 8..b.len() {
            let mut bad = b;
            bad[i] ^= 1;
            assert!(TenantWrapped::parse(&bad)
                .unwrap()
                .unwrap(&[1; 32])
                .is_none());
        }
        assert!(TenantWrapped::parse(&b[..b.len() - 1]).is_err());
        let mut bad = b;
        bad[0] = b'X';
        assert!(TenantWrapped::parse(&bad).is_err());
    }

    #[test]
    fn the_reserved_context_is_the_one_pv_attest_sealed_under() {
        use sha2::Digest;
        let expected: [u8; 32] = sha2::Sha256::new()
            .chain_update(b"paravisor")
            .chain_update([0])
            .chain_update(b"VMGS datastore key")
            .finalize()
            .into();
        assert_eq!(DATASTORE_KEY_CONTEXT, expected);
        assert!(ipc_defs::services::platform::is_reserved_context(&expected));
    }

    /// A HW_KEY_PROTECTOR that pv-attest sealed (policy "platform") before sealing moved into
    /// the microkernel, taken from a guest-state file made by that build, with the chip
    /// secret of the platform it ran on: it opens, so existing sealed state keeps working.
    #[test]
    fn a_key_sealed_by_the_old_attest_service_still_unseals() {
        let secret = hex_bytes(
            "dca8f82c5f05f29898ed9fd5f6242ddce88191f94f61def732d9d242d06e01c0\
             52b7304bc773a8081e6da71a69403cef7f1a66ca652e481dda001df6b8cca280",
        );
        let blob = hex_bytes(
            "50565345414c303101217cab20ef6e25ff24faf8502ca37b1c90c90ce7c50cd1\
             7555d38d7436e9301eb8b792037db2c68cfd74fcf30c8d7303335013732c7642\
             33b917682dc86646540da9b1ac2dea7631f8901335e112de86acb9f23f682645\
             01cb000ca8f75561a4512d1489a5756f7dfd4f8d7f26",
        );
        let platform = test_platform("old-seal", secret.try_into().unwrap());
        let sealed = SealedKey::parse(&blob).unwrap();
        assert_eq!(sealed.select, PLATFORM);
        // Under "platform" the measurement is not part of the key: any launch opens it.
        assert!(sealed.unseal(&platform, &facts(9)).is_some());
        let other = test_platform("old-seal-other", [1; 64]);
        assert!(sealed.unseal(&other, &facts(9)).is_none());
    }

    #[test]
    fn a_sealed_key_unseals_only_under_the_facts_it_was_sealed_to() {
        let platform = test_platform("seal", [5; 64]);
        let key = [0x5a; 32];
        let sealed = SealedKey::seal(&platform, &facts(1), &key, MEASUREMENT).unwrap();
        assert_eq!(
            sealed.measurement, [1; 48],
            "the header names the measurement"
        );
        assert_ne!(sealed.wrapped, key, "the key is not stored in clear");
        let stored = SealedKey::parse(&sealed.to_bytes()).unwrap();
        assert_eq!(*stored.unseal(&platform, &facts(1)).unwrap(), key);
        assert!(
            stored.unseal(&platform, &facts(2)).is_none(),
            "another measurement cannot unseal"
        );
        // Under "platform", a new measurement still unseals; another chip does not.
        let by_platform = SealedKey::seal(&platform, &facts(1), &key, PLATFORM).unwrap();
        assert_eq!(*by_platform.unseal(&platform, &facts(2)).unwrap(), key);
        let other = test_platform("seal-other", [6; 64]);
        assert!(by_platform.unseal(&other, &facts(1)).is_none());
        // Any changed byte breaks it, the clear header included; so does a downgraded policy.
        let bytes = sealed.to_bytes();
        for i in 0..bytes.len() {
            let mut bad = bytes;
            bad[i] ^= 0x10;
            let opened = SealedKey::parse(&bad)
                .ok()
                .and_then(|k| k.unseal(&platform, &facts(1)));
            assert!(opened.is_none(), "byte {i} flipped still unseals");
        }
        let mut downgraded = sealed.clone();
        downgraded.select = PLATFORM;
        assert!(downgraded.unseal(&platform, &facts(1)).is_none());
    }

    #[test]
    fn sealed_key_round_trips_and_refuses_garbage() {
        let k = SealedKey {
            select: MEASUREMENT,
            measurement: [7; 48],
            nonce: [1; 12],
            wrapped: [2; KEY_LEN],
            tag: [3; 16],
        };
        let b = k.to_bytes();
        assert_eq!(SealedKey::parse(&b), Ok(k));
        assert_eq!(
            SealedKey::parse(&b[1..]),
            Err(SealedKeyError::Length(b.len() - 1))
        );
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(SealedKey::parse(&bad), Err(SealedKeyError::Magic));
        let mut bad = b;
        bad[9] = 0x80;
        assert_eq!(SealedKey::parse(&bad), Err(SealedKeyError::Select(0x80)));
    }
}
