//! `pv-vhost-user`: the vhost-user transport every device service shares (storage's
//! virtio-blk and virtio-scsi, net's virtio-net). A device model implements
//! [`VirtioDevice`] (its feature bits, configuration bytes, queue count, whether it wants the
//! in-flight record, and how it serves one ready queue); this crate does the rest:
//! - [`backend`]: the protocol's request handler behind rust-vmm's `BackendReqHandler`: guest
//!   memory, rings, kicks and calls, MQ, REPLY_ACK, CONFIG, INFLIGHT_SHMFD, EVENT_IDX and
//!   INDIRECT_DESC, every front-end value checked;
//! - [`front_end`]: listeners, at most one front end each, and one poll loop over them that
//!   no front end can stop (a message reaches the handler only whole, with room for the
//!   reply);
//! - [`inflight`]: the split-queue in-flight record a restarted back end recovers requests
//!   from;
//! - [`function`]: not vhost-user but shared by the same services: the grants of a device's
//!   PCI function on our own partition (guest memory, line, checkpoint, doorbells).
//!
//! It holds no device logic and no process code: no capability is taken here, the service's
//! `main` hands in its listeners. It never opens a file or a socket; the only descriptors it
//! creates are the in-flight record's memfd.
#![forbid(unsafe_code)]

pub mod backend;
pub mod device;
pub mod front_end;
pub mod function;
pub mod inflight;

pub use backend::Backend;
pub use device::Counts;
pub use device::Ring;
pub use device::VirtioDevice;
pub use device::BATCH;
