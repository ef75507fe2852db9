//! The paravisor's privileged core: it reads `manifest.toml`, creates every channel and
//! region, starts each service in its own sandbox with exactly the capabilities the manifest
//! grants, supervises and restarts them, and answers the `paravisor` command line.
//!
//! It holds no device or service logic: it only builds, hands out and watches capabilities,
//! and runs the guest partition ([`partition`]: the KVM VM, whose exits it routes to the
//! services that own them).
//!
//! `unsafe` is denied crate-wide and allowed, each block with a `// SAFETY:` note, in four
//! modules only: [`sandbox`] (process creation: clone, pivot_root, execveat), `partition::kvm`
//! (guest RAM registration, vCPU kicks), [`partition::vcpu`] (reading the width of a port
//! exit from the vCPU's `kvm_run` page) and `taps::tun` (setns into a network namespace,
//! TUNSETIFF). The ring and mapping code it uses is in `ipc_defs::hosted`.
#![deny(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod control;
pub mod fd_store;
pub mod host_config;
pub mod host_vmm;
pub mod launch;
pub mod listeners;
pub mod logging;
pub mod manifest;
pub mod metal;
pub mod operator;
pub mod output;
pub mod owned_dir;
pub mod partition;
pub mod plan;
pub mod platform;
pub mod platform_server;
pub mod privilege;
pub mod profiles;
#[allow(unsafe_code)]
pub mod sandbox;
pub mod snp;
pub mod spawner;
pub mod supervisor;
pub mod taps;
pub mod thread_filters;
pub mod util;

// The launch's modules keep their short paths (`crate::measure`, ...).
pub use launch::key_protector;
pub use launch::key_release;
pub use launch::libraries;
pub use launch::measure;
pub use launch::state_files;
