//! The key protectors kept in a guest-state file, unencrypted (each protects itself), so that
//! the datastore key can be recovered before the file is unlocked:
//!
//! - HW_KEY_PROTECTOR (11): the datastore key sealed by the attest service to this platform
//!   and launch ([`ipc_defs::services::attest::SealedKey`]).
//! - KEY_PROTECTOR (6), with key release: the datastore key wrapped under the tenant key a
//!   key broker releases to a report its policy accepts ([`TenantWrapped`]). It is what lets
//!   a new measurement re-seal: the broker releases the tenant key to the new launch, which
//!   unwraps the datastore key and seals it again.

use std::path::Path;

use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use aes_gcm::Nonce;
use aes_gcm::Tag;
use ipc_defs::services::vmgs::FileId;
use zeroize::Zeroizing;

/// The datastore key wrapped under a tenant key (AES-256-GCM, the magic as associated data).
/// Layout: magic `PVKBSKP1` (8) | nonce (12) | wrapped key (32) | tag (16) = 68 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantWrapped {
    pub nonce: [u8; 12],
    pub wrapped: [u8; 32],
    pub tag: [u8; 16],
}

impl TenantWrapped {
    pub const MAGIC: [u8; 8] = *b"PVKBSKP1";
    pub const LEN: usize = 8 + 12 + 32 + 16;

    /// Wraps `key` under `tenant`.
    pub fn wrap(tenant: &[u8; 32], key: &[u8; 32]) -> Result<TenantWrapped, String> {
        let mut nonce = [0u8; 12];
        getrandom::getrandom(&mut nonce).map_err(|e| format!("no randomness: {e}"))?;
        let mut wrapped = *key;
        let cipher = Aes256Gcm::new(&(*tenant).into());
        let n: Nonce<_> = nonce.into();
        let tag: Tag = cipher
            .encrypt_inout_detached(&n, &Self::MAGIC, (&mut wrapped[..]).into())
            .map_err(|_| "AES-GCM failed".to_string())?;
        Ok(TenantWrapped {
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
            .decrypt_inout_detached(&n, &Self::MAGIC, (&mut key[..]).into(), &tag)
            .ok()?;
        Some(key)
    }

    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&Self::MAGIC);
        b[8..20].copy_from_slice(&self.nonce);
        b[20..52].copy_from_slice(&self.wrapped);
        b[52..].copy_from_slice(&self.tag);
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
            return Err("not a tenant-wrapped key (no PVKBSKP1 magic)".into());
        }
        let mut w = TenantWrapped {
            nonce: [0; 12],
            wrapped: [0; 32],
            tag: [0; 16],
        };
        w.nonce.copy_from_slice(&bytes[8..20]);
        w.wrapped.copy_from_slice(&bytes[20..52]);
        w.tag.copy_from_slice(&bytes[52..]);
        Ok(w)
    }
}

fn open(path: &Path, write: bool) -> Result<std::fs::File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| format!("guest-state file {}: {e}", path.display()))
}

/// An unencrypted file of the guest-state file at `path`, read without the key (`None`: the
/// file has no such id).
pub fn read_plain(path: &Path, id: FileId) -> Result<Option<Vec<u8>>, String> {
    let mut vmgs = pv_vmgs::Vmgs::open(pv_vmgs::FileStorage::new(open(path, false)?), None)
        .map_err(|e| format!("guest-state file {}: {e}", path.display()))?;
    match vmgs.read_unauthenticated(id) {
        Ok(b) => Ok(Some(b)),
        Err(pv_vmgs::Error::NotFound(_)) => Ok(None),
        Err(e) => Err(format!("guest-state file {}: {id}: {e}", path.display())),
    }
}

/// Replaces file `id` of the guest-state file at `path` with `data`, unencrypted, in one
/// crash-consistent commit (the key unlocks the file: the commit rewrites its tables).
pub fn write_plain(path: &Path, key: &[u8; 32], id: FileId, data: &[u8]) -> Result<(), String> {
    let vkey = pv_vmgs::Key::from_bytes(*key);
    let mut vmgs = pv_vmgs::Vmgs::open(pv_vmgs::FileStorage::new(open(path, true)?), Some(&vkey))
        .map_err(|e| format!("guest-state file {}: {e}", path.display()))?;
    vmgs.write_file_unencrypted(id, data)
        .map_err(|e| format!("guest-state file {}: {id}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_wrap_round_trips_and_refuses_the_wrong_key_or_a_change() {
        let w = TenantWrapped::wrap(&[1; 32], &[2; 32]).unwrap();
        let b = w.to_bytes();
        let p = TenantWrapped::parse(&b).unwrap();
        assert_eq!(*p.unwrap(&[1; 32]).unwrap(), [2; 32]);
        assert!(p.unwrap(&[3; 32]).is_none());
        for i in 8..b.len() {
            let mut bad = b;
            bad[i] ^= 1;
            assert!(TenantWrapped::parse(&bad)
                .unwrap()
                .unwrap(&[1; 32])
                .is_none());
        }
        assert!(TenantWrapped::parse(&b[..67]).is_err());
        let mut bad = b;
        bad[0] = b'X';
        assert!(TenantWrapped::parse(&bad).is_err());
    }
}
