//! Virtio device models over rust-vmm's split virtqueues (`virtio-queue`, guest memory through
//! `vm-memory`): what the storage and network services serve, on whichever transport (a
//! vhost-user front end's memory, or our partition's guest memory window). The transport
//! hands a model its queue and the memory the queue lives in; the model takes requests off
//! the queue, answers them in the guest's buffers and puts them on the used ring.
//!
//! - [`blk`]: virtio-blk over a [`crate::block::Disk`].
//! - [`scsi`]: virtio-scsi with one LUN, a [`crate::scsi::ScsiDisk`].

pub mod blk;
pub mod scsi;

/// VIRTIO_F_VERSION_1 (feature bit 32): a modern (1.x) device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
