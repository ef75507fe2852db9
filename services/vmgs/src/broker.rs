//! The guest-state file's part in sealing and key release: reading and writing the key
//! protectors (unencrypted files that protect themselves), rotating the datastore key, and
//! making a new sealed file. `pv-vmgs --broker` answers these for the microkernel
//! ([`ipc_defs::services::vmgs::BrokerRequest`]), so that the host's file, which is hostile
//! input, is parsed in this service's sandbox and never in the privileged process.

use alloc::string::ToString;
use alloc::vec::Vec;

use ipc_defs::services::vmgs::BrokerRequest;
use ipc_defs::services::vmgs::BrokerResponse;
use ipc_defs::services::vmgs::KeyBytes;
use ipc_defs::services::vmgs::ProtectorBytes;
use ipc_defs::services::vmgs::Protectors;
use ipc_defs::services::vmgs::MAX_PROTECTOR;

use crate::Error;
use crate::FileId;
use crate::Key;
use crate::Storage;
use crate::Vmgs;

/// An unencrypted file of the image in `storage`, read without the key (`None`: no such
/// id). At most [`MAX_PROTECTOR`] bytes: a key protector is a few hundred bytes; the host's
/// disk may claim gigabytes.
pub fn read_plain<S: Storage>(storage: S, id: FileId) -> Result<(S, Option<Vec<u8>>), Error> {
    let mut vmgs = Vmgs::open(storage, None)?;
    vmgs.set_read_limit(MAX_PROTECTOR as u64);
    let data = match vmgs.read_unauthenticated(id) {
        Ok(b) => Some(b),
        Err(Error::NotFound(_)) => None,
        Err(e) => return Err(e),
    };
    Ok((vmgs.into_storage(), data))
}

/// Replaces file `id` with `data`, unencrypted, in one crash-consistent commit (`key`
/// unlocks the image: the commit rewrites its tables).
pub fn write_plain<S: Storage>(storage: S, key: &Key, id: FileId, data: &[u8]) -> Result<S, Error> {
    let mut vmgs = Vmgs::open(storage, Some(key))?;
    vmgs.write_file_unencrypted(id, data)?;
    Ok(vmgs.into_storage())
}

/// Replaces the datastore key `old` by `new`, with `protectors` (what protects `new`) stored
/// in the same commit that makes `old` stop opening the image: `new` is added to the other
/// header slot first (both open it), then the protectors are written (only `new` opens it
/// from this commit on), then `old`'s slot is cleared. A crash at any point leaves
/// protectors whose key opens the image.
pub fn rotate<S: Storage>(
    storage: S,
    old: &Key,
    new: &Key,
    protectors: &[(FileId, &[u8])],
) -> Result<S, Error> {
    let mut vmgs = Vmgs::open(storage, Some(old))?;
    vmgs.add_key(new)?;
    vmgs.write_files_unencrypted(protectors)?;
    vmgs.drop_other_key()?;
    Ok(vmgs.into_storage())
}

/// A new image of `size` bytes in the empty `storage`, encrypted under `key` (`None`: not
/// encrypted), with `protectors` written unencrypted.
pub fn create<S: Storage>(
    storage: S,
    size: u64,
    key: Option<&Key>,
    protectors: &[(FileId, &[u8])],
) -> Result<S, Error> {
    let mut vmgs = Vmgs::create(storage, size, key)?;
    for (id, data) in protectors {
        vmgs.write_file_unencrypted(*id, data)?;
    }
    Ok(vmgs.into_storage())
}

/// Answers one request about the image in `storage`. A failed operation leaves `storage`
/// empty: the microkernel ends the sealing attempt on any failure, and a later request
/// answers that the file is gone.
pub fn answer<S: Storage>(storage: &mut Option<S>, request: BrokerRequest) -> BrokerResponse {
    let Some(s) = storage.take() else {
        return failed(format_args!(
            "the guest-state file is gone after an earlier failure"
        ));
    };
    let key = |k: &KeyBytes| {
        <[u8; 32]>::try_from(k.as_slice())
            .map(Key::from_bytes)
            .map_err(|_| Error::KeyLength(k.len()))
    };
    let result = match request {
        BrokerRequest::ReadPlain { file } => read_plain(s, file).and_then(|(s, data)| {
            let data = match data {
                Some(d) => Some(ProtectorBytes::new(&d).ok_or(Error::TooLarge {
                    file,
                    bytes: d.len() as u64,
                    limit: MAX_PROTECTOR as u64,
                })?),
                None => None,
            };
            Ok((s, BrokerResponse::Plain(data)))
        }),
        BrokerRequest::WritePlain { key: k, file, data } => key(&k)
            .and_then(|k| write_plain(s, &k, file, data.as_slice()))
            .map(|s| (s, BrokerResponse::Done)),
        BrokerRequest::Rotate {
            old,
            new,
            protectors,
        } => key(&old)
            .and_then(|old| Ok((old, key(&new)?)))
            .and_then(|(old, new)| rotate(s, &old, &new, &slices(&protectors)))
            .map(|s| (s, BrokerResponse::Done)),
        BrokerRequest::Create {
            size,
            key: k,
            protectors,
        } => key(&k)
            .and_then(|k| create(s, size, Some(&k), &slices(&protectors)))
            .map(|s| (s, BrokerResponse::Done)),
    };
    match result {
        Ok((s, response)) => {
            *storage = Some(s);
            response
        }
        Err(e) => failed(format_args!("{e}")),
    }
}

fn slices(protectors: &Protectors) -> Vec<(FileId, &[u8])> {
    protectors
        .iter()
        .map(|(id, b)| (*id, b.as_slice()))
        .collect()
}

/// A failure, cut to what the response holds.
fn failed(why: core::fmt::Arguments) -> BrokerResponse {
    let text = why.to_string();
    let mut end = text.len().min(256);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    BrokerResponse::Failed(heapless::String::try_from(&text[..end]).unwrap_or_default())
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::*;
    use crate::MemStorage;

    fn protectors(items: &[(FileId, &[u8])]) -> Protectors {
        items
            .iter()
            .map(|(id, b)| (*id, ProtectorBytes::new(b).unwrap()))
            .collect()
    }

    fn key_bytes(k: [u8; 32]) -> KeyBytes {
        KeyBytes::new(&k).unwrap()
    }

    #[test]
    fn a_rotation_leaves_an_image_the_new_key_and_its_protectors_open() {
        let (old, new) = ([7u8; 32], [9u8; 32]);
        let mut file = Some(MemStorage::new(Vec::new()));
        let made = answer(
            &mut file,
            BrokerRequest::Create {
                size: 1 << 20,
                key: key_bytes(old),
                protectors: protectors(&[(FileId::HW_KEY_PROTECTOR, b"old protector")]),
            },
        );
        assert_eq!(made, BrokerResponse::Done);
        let rotated = answer(
            &mut file,
            BrokerRequest::Rotate {
                old: key_bytes(old),
                new: key_bytes(new),
                protectors: protectors(&[(FileId::HW_KEY_PROTECTOR, b"new protector")]),
            },
        );
        assert_eq!(rotated, BrokerResponse::Done);
        let image = file.take().unwrap();
        assert!(Vmgs::open(image.clone(), Some(&Key::from_bytes(new))).is_ok());
        assert!(Vmgs::open(image.clone(), Some(&Key::from_bytes(old))).is_err());
        let mut file = Some(image);
        assert_eq!(
            answer(
                &mut file,
                BrokerRequest::ReadPlain {
                    file: FileId::HW_KEY_PROTECTOR
                }
            ),
            BrokerResponse::Plain(Some(ProtectorBytes::new(b"new protector").unwrap()))
        );
    }

    #[test]
    fn a_missing_protector_is_none_and_a_written_one_reads_back() {
        let key = [3u8; 32];
        let mut file = Some(MemStorage::new(Vec::new()));
        let create = BrokerRequest::Create {
            size: 1 << 20,
            key: key_bytes(key),
            protectors: Protectors::new(),
        };
        assert_eq!(answer(&mut file, create), BrokerResponse::Done);
        let read = BrokerRequest::ReadPlain {
            file: FileId::KEY_PROTECTOR,
        };
        assert_eq!(answer(&mut file, read.clone()), BrokerResponse::Plain(None));
        let write = BrokerRequest::WritePlain {
            key: key_bytes(key),
            file: FileId::KEY_PROTECTOR,
            data: ProtectorBytes::new(b"wrapped").unwrap(),
        };
        assert_eq!(answer(&mut file, write), BrokerResponse::Done);
        assert_eq!(
            answer(&mut file, read),
            BrokerResponse::Plain(Some(ProtectorBytes::new(b"wrapped").unwrap()))
        );
    }

    #[test]
    fn a_failure_is_named_and_the_file_is_not_used_again() {
        let mut file = Some(MemStorage::new(Vec::new()));
        // Not an image: nothing to read.
        let read = BrokerRequest::ReadPlain {
            file: FileId::HW_KEY_PROTECTOR,
        };
        assert!(matches!(
            answer(&mut file, read.clone()),
            BrokerResponse::Failed(_)
        ));
        match answer(&mut file, read) {
            BrokerResponse::Failed(why) => assert!(why.contains("gone"), "{why}"),
            other => panic!("{other:?}"),
        }
        // A key of the wrong length is refused before the file is touched.
        let mut file = Some(MemStorage::new(Vec::new()));
        let short = BrokerRequest::Create {
            size: 1 << 20,
            key: KeyBytes::new(&[1; 31]).unwrap(),
            protectors: Protectors::new(),
        };
        assert!(matches!(
            answer(&mut file, short),
            BrokerResponse::Failed(_)
        ));
    }
}
