//! AES-256-GCM as the format uses it (12-byte nonce, 16-byte tag kept apart from the
//! ciphertext, no associated data), keys that wipe themselves, and where randomness comes
//! from: the kernel's CSPRNG (getrandom(2)) on the hosted platform, or the source the platform
//! shell installs (`set_random_source`) without `std`.

use alloc::borrow::Cow;

use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use aes_gcm::Nonce;
use aes_gcm::Tag;
use zeroize::Zeroize;

use crate::format::KEY_BYTES;
use crate::format::NONCE_BYTES;
use crate::format::TAG_BYTES;

/// Draws before a source that gives only all-zero keys is taken for broken. A working source
/// gives one with probability 2^-256, so a second draw is already proof; a few more cost
/// nothing and an endless loop would hang the store.
const ZERO_KEY_DRAWS: usize = 4;

/// A 32-byte AES-256 key. Never printed; wiped on drop.
#[derive(Clone)]
pub struct Key([u8; KEY_BYTES]);

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl Key {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Key {
        Key(bytes)
    }

    /// A key from a slice that must be exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Key> {
        <[u8; KEY_BYTES]>::try_from(bytes).ok().map(Key)
    }

    /// A fresh random key (never all zero: that would be the reference writer's defect).
    pub fn try_random() -> Result<Key, RandomError> {
        Key::drawn_from(fill_random)
    }

    fn drawn_from(
        mut fill: impl FnMut(&mut [u8]) -> Result<(), RandomError>,
    ) -> Result<Key, RandomError> {
        for _ in 0..ZERO_KEY_DRAWS {
            let mut k = Key([0u8; KEY_BYTES]);
            fill(&mut k.0)?;
            if !k.is_zero() {
                return Ok(k);
            }
        }
        Err(RandomError::Failed(Cow::Borrowed(
            "it gave only all-zero keys (a broken source)",
        )))
    }

    /// A fresh random key from getrandom(2), for hosted tools. The kernel's CSPRNG does not
    /// fail once seeded; if the call itself fails (a seccomp profile without getrandom) there
    /// is no safe way on, so it panics rather than hand out a predictable key.
    #[cfg(feature = "std")]
    pub fn random() -> Key {
        match Key::try_random() {
            Ok(k) => k,
            Err(e) => panic!("{e}; refusing to make keys or nonces"),
        }
    }

    pub fn is_zero(&self) -> bool {
        self.0.iter().fold(0u8, |acc, b| acc | b) == 0
    }

    /// Equality in time independent of the contents.
    pub fn ct_eq(&self, other: &Key) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }

    pub fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }
}

impl core::fmt::Debug for Key {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Key(<secret>)")
    }
}

/// Why no random bytes could be had. Keys and nonces are then not made at all: the operation
/// that needed them fails ([`crate::Error::Random`]) and nothing predictable is written.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RandomError {
    #[error("no random source is installed (the platform shell must call crypto::set_random_source before the store makes keys or nonces)")]
    NoSource,
    #[error("a random source is already installed; it is set once, at start")]
    AlreadyInstalled,
    #[error("the random source failed: {0}")]
    Failed(Cow<'static, str>),
}

/// A source of cryptographically secure random bytes: fills the whole buffer or fails.
pub type RandomSource = fn(&mut [u8]) -> Result<(), RandomError>;

/// The source installed by the platform shell (no `std`: there is no OS to ask).
#[cfg(not(feature = "std"))]
static SOURCE: once_cell::race::OnceBox<RandomSource> = once_cell::race::OnceBox::new();

/// Installs the source every key and nonce comes from (on metal, RDRAND). Call it once, at
/// start, before the store is opened; a second call is refused and the first source stays.
#[cfg(not(feature = "std"))]
pub fn set_random_source(source: RandomSource) -> Result<(), RandomError> {
    SOURCE
        .set(alloc::boxed::Box::new(source))
        .map_err(|_| RandomError::AlreadyInstalled)
}

/// Fills `buf` from the kernel's CSPRNG (getrandom(2)).
#[cfg(feature = "std")]
pub fn fill_random(buf: &mut [u8]) -> Result<(), RandomError> {
    getrandom::getrandom(buf)
        .map_err(|e| RandomError::Failed(alloc::format!("getrandom(2): {e}").into()))
}

/// Fills `buf` from the installed source; without one, an error (never zeros).
#[cfg(not(feature = "std"))]
pub fn fill_random(buf: &mut [u8]) -> Result<(), RandomError> {
    match SOURCE.get() {
        Some(source) => source(buf),
        None => Err(RandomError::NoSource),
    }
}

/// A fresh nonce as the format makes them: four random bytes, then a zero 64-bit counter.
pub fn new_nonce() -> Result<[u8; NONCE_BYTES], RandomError> {
    let mut n = [0u8; NONCE_BYTES];
    fill_random(&mut n[..4])?;
    Ok(n)
}

/// A fresh nonce for a header key slot: all 12 bytes random. The datastore key wraps many
/// metadata keys over a file's life (and across files, and across rollbacks of one file),
/// so the counter part starts at a random point too; readers take the stored nonce as is.
pub fn new_slot_nonce() -> Result<[u8; NONCE_BYTES], RandomError> {
    let mut n = [0u8; NONCE_BYTES];
    fill_random(&mut n)?;
    Ok(n)
}

/// The next nonce for re-wrapping a metadata key in the same slot: new random prefix, counter
/// (little-endian, bytes 4..12) plus one.
pub fn next_nonce(previous: &[u8; NONCE_BYTES]) -> Result<[u8; NONCE_BYTES], RandomError> {
    let mut counter = [0u8; 8];
    counter.copy_from_slice(&previous[4..]);
    let counter = u64::from_le_bytes(counter).wrapping_add(1);
    let mut n = [0u8; NONCE_BYTES];
    fill_random(&mut n[..4])?;
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Ok(n)
}

/// Encrypts `data` in place; returns the tag.
pub fn seal(key: &Key, nonce: &[u8; NONCE_BYTES], data: &mut [u8]) -> [u8; TAG_BYTES] {
    let cipher = Aes256Gcm::new(&(*key.as_bytes()).into());
    let nonce: Nonce<_> = (*nonce).into();
    // In-place encryption with a detached tag cannot fail for inputs under GCM's 64 GiB limit,
    // and VMGS files are at most 4 GiB.
    let tag: Tag = cipher
        .encrypt_inout_detached(&nonce, &[], data.into())
        .expect("AES-GCM input within its length limit");
    tag.into()
}

/// Decrypts `data` in place if the tag authenticates it. On failure `data` is wiped and
/// `false` returned: unauthenticated plaintext never leaves this function.
#[must_use]
pub fn open(key: &Key, nonce: &[u8; NONCE_BYTES], tag: &[u8; TAG_BYTES], data: &mut [u8]) -> bool {
    let cipher = Aes256Gcm::new(&(*key.as_bytes()).into());
    let nonce: Nonce<_> = (*nonce).into();
    let tag: Tag = (*tag).into();
    match cipher.decrypt_inout_detached(&nonce, &[], data.into(), &tag) {
        Ok(()) => true,
        Err(_) => {
            data.zeroize();
            false
        }
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;

    #[test]
    fn sealed_data_opens_only_with_its_key_nonce_and_tag() {
        let key = Key::random();
        let nonce = new_nonce().unwrap();
        let mut data = *b"guest secrets";
        let tag = seal(&key, &nonce, &mut data);
        assert_ne!(&data, b"guest secrets");
        let mut copy = data;
        assert!(open(&key, &nonce, &tag, &mut copy));
        assert_eq!(&copy, b"guest secrets");
        let mut bad = data;
        bad[0] ^= 1;
        assert!(!open(&key, &nonce, &tag, &mut bad));
        assert_eq!(bad, [0; 13], "failed plaintext is wiped");
        let mut copy = data;
        assert!(!open(&Key::random(), &nonce, &tag, &mut copy));
    }

    #[test]
    fn nonce_counter_increments_with_carry() {
        let mut n = [0u8; 12];
        n[4] = 0xff;
        let next = next_nonce(&n).unwrap();
        assert_eq!(&next[4..], &[0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&new_nonce().unwrap()[4..], &[0; 8]);
    }

    #[test]
    fn a_source_of_only_zeros_is_an_error_not_an_endless_loop() {
        let mut draws = 0;
        let zeros = |buf: &mut [u8]| {
            draws += 1;
            buf.fill(0);
            Ok(())
        };
        assert!(matches!(
            Key::drawn_from(zeros),
            Err(RandomError::Failed(_))
        ));
        assert_eq!(draws, ZERO_KEY_DRAWS);
    }

    #[test]
    fn debug_output_names_a_key_but_never_shows_it() {
        let key = Key::from_bytes([0xab; KEY_BYTES]);
        assert_eq!(format!("{key:?}"), "Key(<secret>)");
    }

    /// Only the all-zero key is redrawn: every other key is as likely as any other. Of 200
    /// uniform keys about 12% hold a zero byte (1 - (255/256)^32); more than half is a bias
    /// that a uniform draw shows with probability far below 1e-20.
    #[test]
    fn random_keys_are_uniform_not_only_nonzero() {
        let with_a_zero_byte = (0..200)
            .map(|_| Key::random())
            .filter(|k| k.as_bytes().contains(&0))
            .count();
        assert!(with_a_zero_byte < 100, "{with_a_zero_byte} of 200");
    }
}
