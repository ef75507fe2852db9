//! The state directory's secrets and guest-state files: made on the first run, checked and
//! handed out on every start.
//!
//! On the first `paravisor run` a key declared with `missing = "create"` is made (32 bytes
//! from the kernel's CSPRNG, mode 0600) and a file declared with `missing = "create-vmgs"`
//! is created as an encrypted VMGS file under that key. Later runs reuse both. A key is never
//! made for a guest-state file that already exists: a new key could not open it.

use std::fs::OpenOptions;
use std::io::Read;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zeroize::Zeroize;

use crate::manifest::Manifest;
use crate::manifest::Missing;
use crate::manifest::MissingKey;
use crate::manifest::KEY_BYTES;

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

/// Reads a key file: a regular file (not a link) of exactly 32 bytes that only its owner can
/// read or write.
pub fn load_key(path: &Path) -> Result<KeyBytes, String> {
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("key file {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("key file {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("key file {} is not a regular file", path.display()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "key file {} is accessible to group or others (mode {:04o}); run `chmod 600 {}`",
            path.display(),
            meta.mode() & 0o7777,
            path.display()
        ));
    }
    if meta.len() != KEY_BYTES as u64 {
        return Err(format!(
            "key file {} is {} bytes; a key is exactly {KEY_BYTES}",
            path.display(),
            meta.len()
        ));
    }
    let mut key = KeyBytes([0; KEY_BYTES]);
    file.read_exact(&mut key.0)
        .map_err(|e| format!("key file {}: {e}", path.display()))?;
    Ok(key)
}

/// Makes a new random key file (mode 0600) atomically: written and synced under a temporary
/// name, linked into place (which fails rather than replace an existing key), the directory
/// synced. A crash leaves either no key or the whole key, never a short one.
fn create_key(path: &Path) -> Result<(), String> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let name = path
        .file_name()
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let tmp = dir.join(format!(".{}.creating", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut key = KeyBytes([0; KEY_BYTES]);
        getrandom::getrandom(&mut key.0).map_err(|e| format!("no randomness for a key: {e}"))?;
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| format!("key file {}: {e}", tmp.display()))?;
        file.write_all(&key.0)
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("key file {}: {e}", tmp.display()))?;
        std::fs::hard_link(&tmp, path).map_err(|e| format!("key file {}: {e}", path.display()))?;
        std::fs::remove_file(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        std::fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("{}: {e}", dir.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Creates what the manifest says to create when missing. Returns a line for each thing
/// created, for the log.
pub fn prepare(manifest: &Manifest, state_dir: &Path) -> Result<Vec<String>, String> {
    let mut made = Vec::new();
    for s in &manifest.services {
        for f in &s.files {
            let Missing::CreateVmgs { key, size } = &f.missing else {
                continue;
            };
            let Some(k) = s.keys.iter().find(|k| &k.name == key) else {
                return Err(format!("service {}: no key \"{key}\"", s.name));
            };
            let Some(key_file) = &k.path else {
                // Sealed: made (or unsealed) by the supervisor once attest runs.
                continue;
            };
            let vmgs_path = state_dir.join(&f.path);
            let key_path = state_dir.join(key_file);
            let vmgs_exists = vmgs_path.exists();
            if !key_path.exists() {
                if vmgs_exists {
                    return Err(format!(
                        "guest-state file {} exists but its key {} is missing; refusing to make a new key that cannot open it (restore the key, or move the file away to start afresh)",
                        vmgs_path.display(),
                        key_path.display()
                    ));
                }
                if k.missing == MissingKey::Create {
                    create_key(&key_path)?;
                    made.push(format!(
                        "made a new random datastore key {} (mode 0600)",
                        key_path.display()
                    ));
                }
            }
            if !vmgs_exists {
                let bytes = load_key(&key_path)?;
                let key = pv_vmgs::Key::from_bytes(bytes.0);
                crate::vmgs_cli::create_vmgs_file(&vmgs_path, *size, Some(&key))?;
                made.push(format!(
                    "created encrypted guest-state file {} ({} byte image) under key {}",
                    vmgs_path.display(),
                    size,
                    key_path.display()
                ));
            }
        }
        for k in &s.keys {
            let Some(path) = k.path.as_ref().map(|p| state_dir.join(p)) else {
                continue;
            };
            if !path.exists() && k.missing == MissingKey::Create {
                create_key(&path)?;
                made.push(format!(
                    "made a new random key {} (mode 0600)",
                    path.display()
                ));
            }
        }
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_readable_by_others_are_refused() {
        let dir = std::env::temp_dir().join(format!("pv-keytest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        create_key(&path).unwrap();
        assert_eq!(load_key(&path).unwrap().0.len(), 32);
        assert!(create_key(&path).is_err(), "never replaces a key");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        assert!(load_key(&path).unwrap_err().contains("chmod 600"));
        std::fs::write(dir.join("short"), [1u8; 31]).unwrap();
        std::fs::set_permissions(
            dir.join("short"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        assert!(load_key(&dir.join("short"))
            .unwrap_err()
            .contains("31 bytes"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
