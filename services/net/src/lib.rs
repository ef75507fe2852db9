//! `pv-net`: the guest's NIC. The virtio-net model (`pv_devices::virtio::net`) served over the
//! shared vhost-user transport (`pv_vhost_user`) to a front end such as QEMU's
//! `-netdev vhost-user`, with one of two host sides:
//! - a TAP device the microkernel opened and granted ([`tap::TapLink`]: the service gets the
//!   descriptor only, never opens an interface or makes a socket);
//! - without one, an in-service responder ([`responder::Responder`]) that answers ARP and
//!   ICMP echo for one address, so a guest can ping "the host" with no host set-up.
//!
//! It never sees the vTPM, VMGS or the disks: its capabilities are its listener, the guest
//! memory a front end shares over it, and the TAP when granted. Memory is bounded: one frame
//! buffer per direction in the model, at most [`responder::MAX_PENDING`] replies.
#![forbid(unsafe_code)]

pub mod config;
pub mod device;
pub mod partition;
pub mod responder;
pub mod tap;
