//! `pv-storage`: the guest's disks. Device models from `pv-devices` (virtio-blk, virtio-scsi)
//! served over vhost-user to a front end such as QEMU, on disks the microkernel opened for the
//! service (raw, or encrypted with a key kept in VMGS). The transport is `pv_vhost_user`'s,
//! shared with the other device services; [`vhost`] holds only what storage's devices tell
//! it. The process holds only its listeners, its image files and a vmgs channel granting its
//! own key file: no TPM, no other VMGS file.
#![forbid(unsafe_code)]

pub mod disks;
pub mod partition;
pub mod vhost;
