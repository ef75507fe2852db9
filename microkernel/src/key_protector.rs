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
        let key_id = crate::kbs::key_id_bytes(tenant);
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
        crate::measure::hex(&self.key_id)
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

/// Replaces the datastore key of the guest-state file at `path` (`old` opens it) by `new`,
/// with `protectors` (what protects `new`) stored in the same commit that makes the old key
/// stop opening it: the new key is added to the other header slot first (both open the
/// file), then the protectors are written (only the new key opens it from this commit on),
/// then the old slot is cleared. A crash at any point leaves protectors whose key opens the
/// file.
pub fn rotate(
    path: &Path,
    old: &[u8; 32],
    new: &[u8; 32],
    protectors: &[(FileId, &[u8])],
) -> Result<(), String> {
    let err = |e: pv_vmgs::Error| format!("guest-state file {}: key rotation: {e}", path.display());
    let old = pv_vmgs::Key::from_bytes(*old);
    let new = pv_vmgs::Key::from_bytes(*new);
    let mut vmgs = pv_vmgs::Vmgs::open(pv_vmgs::FileStorage::new(open(path, true)?), Some(&old))
        .map_err(err)?;
    vmgs.add_key(&new).map_err(err)?;
    vmgs.write_files_unencrypted(protectors).map_err(err)?;
    vmgs.drop_other_key().map_err(err)
}

/// Largest key protector read from a guest-state file.
pub const MAX_PROTECTOR: usize = 4096;

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
    // A key protector is a few hundred bytes; the host's disk may claim gigabytes.
    vmgs.set_read_limit(MAX_PROTECTOR as u64);
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
        assert_eq!(w.key_id_hex(), crate::kbs::key_id(&[1; 32]));
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
    fn a_rotation_leaves_a_file_the_new_key_and_its_protectors_open() {
        let dir = std::env::temp_dir().join(format!("pv-rotate-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("g.vmgs");
        let (old, new) = ([7u8; 32], [9u8; 32]);
        crate::vmgs_cli::create_vmgs_file_with(
            &path,
            1 << 20,
            Some(&pv_vmgs::Key::from_bytes(old)),
            &[(FileId::HW_KEY_PROTECTOR, b"old protector")],
        )
        .unwrap();
        rotate(
            &path,
            &old,
            &new,
            &[(FileId::HW_KEY_PROTECTOR, b"new protector")],
        )
        .unwrap();
        assert_eq!(
            read_plain(&path, FileId::HW_KEY_PROTECTOR)
                .unwrap()
                .unwrap(),
            b"new protector"
        );
        let file = || pv_vmgs::FileStorage::new(open(&path, false).unwrap());
        assert!(pv_vmgs::Vmgs::open(file(), Some(&pv_vmgs::Key::from_bytes(new))).is_ok());
        assert!(pv_vmgs::Vmgs::open(file(), Some(&pv_vmgs::Key::from_bytes(old))).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
