//! The VMGS guest-state store: a library for VMGS version 3 files (OpenVMM / Hyper-V
//! compatible) and, in `main.rs`, the `pv-vmgs` service that serves one such file to the
//! services the manifest allows.
//!
//! The library holds the format ([`format`], [`vhd`]), its cryptography ([`crypto`]), the
//! crash-consistent store ([`store::Vmgs`]) and the request handling of the service
//! ([`server`]). It has no OS code: all I/O goes through [`storage::Storage`], which tests
//! replace by a device that fails on demand ([`fault`]).
//!
//! What it must never do: return data that failed authentication, write a header before the
//! data it points to is durable, overwrite any block the active state uses, log key material
//! or file contents.
//!
//! # Platforms
//!
//! With the default `std` feature (the hosted platform) the library adds `FileStorage`,
//! takes keys and nonces from getrandom(2), and logs through `tracing`. Without it the library
//! is `#![no_std]` + `alloc`, for the metal platform, where the store runs as a ring-3 task of
//! the kernel over a RAM-disk region ([`MemStorage`]). The platform shell then must:
//!
//! - install a random source once, before the first key or nonce is made
//!   (`crypto::set_random_source`, without `std`; the metal shell's is RDRAND). Until then every operation
//!   that needs randomness fails with [`Error::Random`], never with a predictable key;
//! - build with the RustCrypto crates forced to their constant-time software backends, since
//!   ring-3 tasks there run without SSE (`-C target-feature=-sse,-sse2,...,+soft-float`) and
//!   AES-NI / CLMUL code would use XMM registers:
//!
//!   ```text
//!   RUSTFLAGS='--cfg aes_backend="soft" --cfg polyval_backend="soft"'
//!   ```
//!
//!   `aes_backend="soft"` makes `aes` (0.9) skip AES-NI/VAES detection and use fixslicing
//!   (add `--cfg aes_backend_soft="compact"` for smaller, slower code); `polyval_backend="soft"`
//!   makes `polyval` (0.7), which `ghash` is built on, skip CLMUL. crc32fast needs no flag: its
//!   PCLMULQDQ path is chosen at compile time without `std`, and a target without SSE has none.
//!   Neither cfg is set in the hosted build. Give them with an explicit `--target`, so that
//!   they (and the target features) do not reach proc macros built for the host. Built that
//!   way with `-C target-feature=-sse,-sse2,+soft-float`, the library's object code and that
//!   of aes, polyval, ghash, ctr and crc32fast hold no AES-NI, PCLMULQDQ or XMM instruction
//!   (`objdump -d`; the hosted build's hold hundreds of `aesenc`).
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

mod log;

pub mod broker;
pub mod crypto;
pub mod error;
pub mod fault;
pub mod format;
pub mod server;
pub mod storage;
pub mod store;
pub mod vhd;

pub use crypto::Key;
pub use error::Error;
pub use ipc_defs::services::vmgs::FileId;
#[cfg(feature = "std")]
pub use storage::FileStorage;
pub use storage::MemStorage;
pub use storage::Storage;
pub use storage::StorageError;
pub use storage::StorageErrorKind;
pub use store::Vmgs;

/// The library as the metal platform builds it (no `std`): keys and nonces come only from the
/// source the platform installs. One test, because that source is a process-wide, once-only
/// setting. Run with `cargo test -p pv-vmgs --no-default-features --lib`.
#[cfg(all(test, not(feature = "std")))]
mod tests {
    use core::sync::atomic::AtomicU8;
    use core::sync::atomic::Ordering;

    use ipc_defs::services::vmgs::Chunk;
    use ipc_defs::services::vmgs::FileIdSet;
    use ipc_defs::services::vmgs::Request;
    use ipc_defs::services::vmgs::Response;

    use super::*;
    use crate::crypto::RandomError;
    use crate::server::Server;

    /// A stand-in for RDRAND: different bytes on every call, so nonces differ.
    fn counting_source(buf: &mut [u8]) -> Result<(), RandomError> {
        static NEXT: AtomicU8 = AtomicU8::new(1);
        for b in buf {
            *b = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    #[test]
    fn without_std_the_store_runs_on_the_installed_random_source_and_refuses_without_one() {
        let key = Key::from_bytes([7; 32]);
        // Before the platform installs a source: an error, never a key or nonce of zeros.
        assert_eq!(Key::try_random().err(), Some(RandomError::NoSource));
        assert!(matches!(
            Vmgs::create(MemStorage::default(), 64 << 10, Some(&key)),
            Err(Error::Random(RandomError::NoSource))
        ));

        crypto::set_random_source(counting_source).unwrap();
        assert_eq!(
            crypto::set_random_source(counting_source),
            Err(RandomError::AlreadyInstalled),
            "the first source stays"
        );

        // The RAM disk: create, commit, reopen, and serve a client's read.
        let mut v = Vmgs::create(MemStorage::default(), 64 << 10, Some(&key)).unwrap();
        v.write_file(FileId::TPM_NVRAM, b"nvram").unwrap();
        let image = v.into_storage();
        assert!(Vmgs::open(image.clone(), None).unwrap().is_encrypted());
        let mut server = Server::open(image, Some(key)).unwrap();
        let nvram = FileIdSet::EMPTY.with(FileId::TPM_NVRAM);
        let read = Request::Read {
            file: FileId::TPM_NVRAM,
            offset: 0,
        };
        assert_eq!(
            server.handle("vtpm", nvram, read),
            Response::Data {
                total: 5,
                data: Chunk::new(b"nvram").unwrap()
            }
        );
        let write = Request::Write {
            file: FileId::TPM_NVRAM,
            total: 3,
            offset: 0,
            data: Chunk::new(b"new").unwrap(),
        };
        assert_eq!(server.handle("vtpm", nvram, write), Response::Written);
    }
}
