//! The state directory's secrets and guest-state files: made on the first run, checked and
//! handed out on every start.
//!
//! On the first `paravisor run` a key declared with `missing = "create"` is made (32 bytes
//! from the kernel's CSPRNG, mode 0600) and a file declared with `missing = "create-vmgs"`
//! is created as an encrypted VMGS file under that key. Later runs reuse both. A key is never
//! made for a guest-state file that already exists: a new key could not open it.

use std::io::Read;
use std::io::Write;
use std::path::Path;

use zeroize::Zeroize;

use crate::manifest::Manifest;
use crate::manifest::Missing;
use crate::manifest::MissingKey;
use crate::manifest::KEY_BYTES;
use crate::owned_dir::OwnedDir;

/// A key read from its file; wiped on drop.
pub struct KeyBytes(pub [u8; KEY_BYTES]);

impl std::fmt::Debug for KeyBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyBytes(<secret>)")
    }
}

impl Drop for KeyBytes {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// Reads the key file `rel` of the state directory: a regular file of ours (not a link, not
/// a FIFO) of exactly 32 bytes that only its owner can read or write.
pub fn load_key(state: &OwnedDir, rel: &Path) -> Result<KeyBytes, String> {
    let path = state.shown(rel);
    let mut file = state
        .open_secret(rel)
        .map_err(|e| format!("key: {e}"))?
        .ok_or_else(|| format!("key file {} does not exist", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("key file {}: {e}", path.display()))?
        .len();
    if len != KEY_BYTES as u64 {
        return Err(format!(
            "key file {} is {len} bytes; a key is exactly {KEY_BYTES}",
            path.display(),
        ));
    }
    let mut key = KeyBytes([0; KEY_BYTES]);
    file.read_exact(&mut key.0)
        .map_err(|e| format!("key file {}: {e}", path.display()))?;
    Ok(key)
}

/// Makes a new random key file `rel` (mode 0600) atomically: written and synced under a
/// temporary name, linked into place (which fails rather than replace an existing key), the
/// directory synced. A crash leaves either no key or the whole key, never a short one.
fn create_key(state: &OwnedDir, rel: &Path) -> Result<(), String> {
    let mut key = KeyBytes([0; KEY_BYTES]);
    getrandom::getrandom(&mut key.0).map_err(|e| format!("no randomness for a key: {e}"))?;
    state
        .create_new(rel, 0o600, |mut file| {
            file.write_all(&key.0)
                .map(|()| file)
                .map_err(|e| format!("key file {}: {e}", state.shown(rel).display()))
        })
        .map_err(|e| format!("key {e}"))
}

/// Creates what the manifest says to create when missing. Returns a line for each thing
/// created, for the log.
pub fn prepare(manifest: &Manifest, state: &OwnedDir) -> Result<Vec<String>, String> {
    let mut made = Vec::new();
    let exists = |rel: &Path| state.exists(rel).map_err(|e| e.to_string());
    for s in &manifest.services {
        for f in &s.files {
            let Missing::CreateVmgs { key, size } = &f.missing else {
                continue;
            };
            let Some(k) = s.keys.iter().find(|k| &k.name == key) else {
                return Err(format!("service {}: no key \"{key}\"", s.name));
            };
            let Some(key_file) = &k.path else {
                // Sealed: made (or unsealed) by the supervisor with the platform.
                continue;
            };
            let vmgs_path = state.shown(&f.path);
            let key_path = state.shown(key_file);
            let vmgs_exists = exists(&f.path)?;
            if !exists(key_file)? {
                if vmgs_exists {
                    return Err(format!(
                        "guest-state file {} exists but its key {} is missing; refusing to make a new key that cannot open it (restore the key, or move the file away to start afresh)",
                        vmgs_path.display(),
                        key_path.display()
                    ));
                }
                if k.missing == MissingKey::Create {
                    create_key(state, key_file)?;
                    made.push(format!(
                        "made a new random datastore key {} (mode 0600)",
                        key_path.display()
                    ));
                }
            }
            if !vmgs_exists {
                let bytes = load_key(state, key_file)?;
                let key = pv_vmgs::Key::from_bytes(bytes.0);
                create_vmgs_in(state, &f.path, *size, Some(&key), &[])?;
                made.push(format!(
                    "created encrypted guest-state file {} ({} byte image) under key {}",
                    vmgs_path.display(),
                    size,
                    key_path.display()
                ));
            }
        }
        for k in &s.keys {
            let Some(rel) = &k.path else {
                continue;
            };
            if !exists(rel)? && k.missing == MissingKey::Create {
                create_key(state, rel)?;
                made.push(format!(
                    "made a new random key {} (mode 0600)",
                    state.shown(rel).display()
                ));
            }
        }
    }
    Ok(made)
}

/// A new VMGS image of `size` bytes in the empty `file` (shown as `path`), encrypted under
/// `key`, with `plain_files` written unencrypted.
pub fn fill_vmgs(
    file: std::fs::File,
    path: &Path,
    size: u64,
    key: Option<&pv_vmgs::Key>,
    plain_files: &[(pv_vmgs::FileId, &[u8])],
) -> Result<std::fs::File, String> {
    pv_vmgs::broker::create(pv_vmgs::FileStorage::new(file), size, key, plain_files)
        .map(pv_vmgs::FileStorage::into_inner)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Creates the guest-state file `rel` of the state directory, encrypted under `key`, with
/// `plain_files` (key protectors) written unencrypted before it appears: made through the
/// directory's descriptor (a temporary file linked into place, never replacing a file).
pub fn create_vmgs_in(
    state: &OwnedDir,
    rel: &Path,
    size: u64,
    key: Option<&pv_vmgs::Key>,
    plain_files: &[(pv_vmgs::FileId, &[u8])],
) -> Result<(), String> {
    let shown = state.shown(rel);
    state.create_new(rel, 0o600, |file| {
        fill_vmgs(file, &shown, size, key, plain_files)
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn keys_readable_by_others_are_refused() {
        let dir = std::env::temp_dir().join(format!("pv-keytest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = OwnedDir::open(&dir, "state directory", true).unwrap();
        let k = Path::new("k");
        create_key(&state, k).unwrap();
        assert_eq!(load_key(&state, k).unwrap().0.len(), 32);
        assert!(create_key(&state, k).is_err(), "never replaces a key");
        std::fs::set_permissions(dir.join("k"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_key(&state, k).unwrap_err().contains("chmod 600"));
        std::fs::write(dir.join("short"), [1u8; 31]).unwrap();
        std::fs::set_permissions(dir.join("short"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        assert!(load_key(&state, Path::new("short"))
            .unwrap_err()
            .contains("31 bytes"));
        // A link to a key elsewhere is not a key of this state.
        std::os::unix::fs::symlink(dir.join("k"), dir.join("link")).unwrap();
        assert!(load_key(&state, Path::new("link"))
            .unwrap_err()
            .contains("symbolic link"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
