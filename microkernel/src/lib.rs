//! The paravisor's privileged core: it reads `manifest.toml`, creates every channel and
//! region, starts each service in its own sandbox with exactly the capabilities the manifest
//! grants, supervises and restarts them, and answers the `paravisor` command line.
//!
//! It holds no device or service logic: it only builds, hands out and watches capabilities,
//! and runs the guest partition ([`partition`]: the KVM VM, whose exits it routes to the
//! services that own them). `unsafe` lives in [`sandbox`] (process creation) and
//! `partition::kvm` (guest RAM registration, vCPU kicks) alone; the ring and mapping code it
//! uses is in `ipc_defs::hosted`.

pub mod audit;
pub mod bench;
pub mod bench_attest;
pub mod bench_env;
pub mod bench_guest;
pub mod bench_measure;
pub mod bench_memory;
pub mod bench_vmgs;
pub mod bench_vtpm;
pub mod control;
pub mod host_config;
pub mod kbs;
pub mod key_protector;
pub mod libraries;
pub mod listeners;
pub mod logging;
pub mod manifest;
pub mod measure;
pub mod operator;
pub mod output;
pub mod owned_dir;
pub mod partition;
pub mod platform;
pub mod platform_server;
pub mod privilege;
pub mod profiles;
pub mod sandbox;
pub mod spawner;
pub mod state_files;
pub mod supervisor;
pub mod thread_filters;
pub mod verify;
pub mod vmgs_cli;
