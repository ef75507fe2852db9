//! Device models as libraries: each is a state machine over a device's registers that a
//! service feeds the guest's accesses to and asks what to do next (raise an interrupt, run a
//! TPM command, forward a configuration access). No process, no OS call, no channel: the
//! services in `services/` own those, and these models are tested in-process (and fuzzed
//! through their services' targets).
//!
//! - [`uart16550`]: the 16550 UART on COM1 (the guest's console), for `pv-intercept`.
//! - [`pci_function`]: the configuration space of a PCI function a device service owns (a
//!   fixed 64-bit BAR, INTx, a capability list), for the partition's NVMe and virtio functions.
//! - [`pci_host`]: PCI configuration mechanism #1 and the host bridge at 00:00.0, for
//!   `pv-intercept`.
//! - [`tpm_tis`]: the TPM Interface Specification (TIS 1.3, FIFO) registers at 0xFED40000,
//!   for `pv-vtpm`.
//! - [`block`]: the block back ends the storage models translate to: a raw image, and one
//!   whose every block is sealed with AES-256-GCM (the host sees ciphertext only).
//! - [`virtio`]: virtio devices over rust-vmm's split virtqueues: [`virtio::blk`],
//!   [`virtio::scsi`], [`virtio::net`].
//! - [`nvme`]: an NVMe controller (admin and I/O queues, PRPs and PRP lists) over a block back
//!   end, for the partition's NVMe function.
//! - [`scsi`]: a SCSI direct-access disk (the commands Linux's `sd` sends) over a block back
//!   end, for virtio-scsi and vhost-user-scsi.
#![forbid(unsafe_code)]

pub mod block;
pub mod nvme;
pub mod pci_function;
pub mod pci_host;
pub mod scsi;
pub mod tpm_tis;
pub mod uart16550;
pub mod virtio;
