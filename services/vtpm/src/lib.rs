//! The vTPM: a TPM 2.0 for the guest, run by libtpms (the engine behind swtpm and QEMU) in
//! this sandboxed process, its permanent state in the encrypted VMGS and its volatile state
//! checkpointed after every command so that a crash of the process is invisible to clients.
//!
//! [`libtpms`] is the only module with `unsafe` (the FFI); [`state`] keeps the state blobs
//! and the checkpoint; [`server`] runs commands exactly once per client command number and
//! handles the platform signals; [`binding`] ties the TPM's attestation key to a platform
//! report (the few commands it sends are built and parsed in [`tpm2`]). The process
//! (`main.rs`) never opens files or sockets: its state reaches VMGS only through its vmgs
//! channel (file ids TPM_NVRAM, TPM_PPI), its report comes through its attest channel.
#![deny(unsafe_code)]

pub mod binding;
pub mod gateway;
pub mod gateway_journal;
pub mod libtpms;
pub mod server;
pub mod state;
pub mod tpm2;

// The register model it serves (a library of its own: `devices/`).
pub use pv_devices::tpm_tis as tis;
