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
#![forbid(unsafe_code)]

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
pub use storage::FileStorage;
pub use storage::MemStorage;
pub use storage::Storage;
pub use store::Vmgs;
