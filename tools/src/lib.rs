//! What an operator or a relying party runs, outside the paravisor's trusted core: the
//! report and certificate verifier (`attest verify`), the tenant's key broker (`kbs`), the
//! VMGS file tool (`vmgs`), the benchmarks (`bench`), with the Linux guest some of them
//! boot (`linux_guest`, shared with the tests' harness), and the metal image's build, log
//! decoder and runner (`metal`). The `pv-tools` binary runs them;
//! `paravisor` hands these commands to it, so none of this code is in the binary the launch
//! measures.
#![forbid(unsafe_code)]

pub mod bench;
pub mod bench_attest;
pub mod bench_boot;
pub mod bench_chaos;
pub mod bench_env;
pub mod bench_guest;
pub mod bench_measure;
pub mod bench_memory;
pub mod bench_net;
pub mod bench_net_host;
pub mod bench_net_restart;
pub mod bench_storage;
pub mod bench_storage_guest;
pub mod bench_storage_host;
pub mod bench_storage_restart;
pub mod bench_vmgs;
pub mod bench_vtpm;
pub mod cli;
pub mod cvm;
pub mod kbs;
pub mod kbs_args;
pub mod kbs_guest;
pub mod linux_guest;
pub mod metal;
pub mod net_peer;
pub mod provision;
pub mod tpm_evidence;
pub mod verify;
pub mod vmgs_args;
pub mod vmgs_cli;
