//! The metal platform's part of the core: the task table an image carries, laid out from the
//! manifest's `[[metal.task]]` ([`MetalPlan`], used by the validator and by `paravisor metal
//! build`), and the audit of a built image's table (`paravisor audit --metal`, [`image`]).
//!
//! The kernel itself is `microkernel/metal` (package `pv-metal`); the contract between these
//! and it is `ipc_defs::metal`. Building images (cargo, the programs, the kernel) is an
//! operator's tool and lives in `pv-tools` (`tools/src/metal`), not here.
#![forbid(unsafe_code)]

pub mod image;
pub mod table;

pub use table::MetalPlan;
pub use table::PlanError;

#[cfg(test)]
mod tests;
