//! The one contract between paravisor processes.
//!
//! Everything two processes must agree on lives here and nowhere else: the byte layout of a
//! channel's shared memory (header, rings, frame slots), the capability kinds a service can be
//! granted, the bootstrap record that tells a service which descriptor holds which
//! capability, and the postcard message enums of every interface.
//!
//! The crate is `#![no_std]` so that the same definitions serve the hosted build (services as
//! Linux processes) and the later metal build. The ring algorithm itself ([`ring`]) is also
//! `no_std`: it works on any mapping of the channel memory. The Linux-only half (memfd, mmap,
//! futex, the service runtime) is behind the `hosted` feature in [`hosted`].
//!
//! This crate never trusts a peer: every decode of shared memory or of a frame is checked and
//! returns a typed error.
//!
//! `unsafe` is denied crate-wide and allowed, each block with a `// SAFETY:` note, only where
//! raw memory or syscalls are unavoidable: [`ring`] (atomics over the shared mapping) and, in
//! the hosted half, `hosted::sys` (syscalls), `hosted::shm` (the mapping) and
//! `hosted::channel` (one place that views a mapping as a channel).
#![cfg_attr(not(any(feature = "std", test)), no_std)]
#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(any(feature = "std", test))]
extern crate std;

pub mod bootstrap;
pub mod capability;
pub mod control;
pub mod endpoint;
pub mod fd_store;
pub mod layout;
pub mod metal;
#[allow(unsafe_code)]
pub mod ring;
pub mod services;
pub mod snp;

#[cfg(feature = "hosted")]
pub mod hosted;

pub use capability::CapabilityKind;
pub use capability::Interface;
pub use layout::Epoch;
