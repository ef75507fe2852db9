//! The TAP module's `unsafe`: entering a network namespace and attaching a `/dev/net/tun`
//! descriptor to a TAP interface (`TUNSETIFF`), reading its flags back (`TUNGETIFF`).
//!
//! Called only from [`super::attach`], on a thread of its own that ends right after, and only
//! before the microkernel confines its threads: every thread filter refuses `setns` and these
//! ioctls ([`crate::thread_filters`]).

use std::io;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;

/// The flags a TAP is attached with: a TAP (Ethernet frames), no packet-information prefix,
/// and a virtio-net header in front of every frame either way (`IFF_VNET_HDR`, of
/// [`VNET_HEADER_LEN`] bytes): the guest's checksum and segmentation offloads pass through
/// it to the host's stack, and the host's to the guest, without the service finishing a
/// checksum or cutting a segment.
pub const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Bytes of the header in front of each frame: `struct virtio_net_hdr_v1` (with
/// `num_buffers`), the header of a VERSION_1 driver, so the service passes it through as is.
pub const VNET_HEADER_LEN: libc::c_int = 12;

/// Moves the calling thread into the network namespace `ns` (an open `/run/netns/NAME`).
/// Only this thread's namespace changes; the caller runs it on a thread that ends after.
pub fn enter_netns(ns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns takes a descriptor and a flag; `ns` is open for the call's duration, and
    // CLONE_NEWNET changes only the calling thread's network namespace (no memory is touched).
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A `/dev/net/tun` descriptor (read-write, non-blocking, close-on-exec) attached to TAP
/// interface `ifname` of the calling thread's network namespace: the persistent TAP of that
/// name, or a new one that lives while the descriptor does. Also returns the device's flags
/// as the kernel reports them (`IFF_PERSIST` set: it existed before).
///
/// `ifname` must be a valid interface name (1 to 15 bytes; the caller checks it).
pub fn open_tap(ifname: &str) -> io::Result<(OwnedFd, libc::c_int)> {
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // Opened in this thread's namespace: the TAP is made in the namespace of the descriptor's
    // opener.
    let tun: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?
        .into();
    // SAFETY: ifreq is plain data (a name and a union of integers and addresses): all zeroes
    // is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in request.ifr_name.iter_mut().zip(name) {
        *to = *from as libc::c_char;
    }
    // The name's NUL is the zeroed byte after it (name.len() < IFNAMSIZ).
    request.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
    // SAFETY: TUNSETIFF reads (and may write back the name of) one ifreq, which `request` is
    // and which outlives the call; `tun` is an open /dev/net/tun descriptor.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETVNETHDRSZ reads one c_int through the pointer, which outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETVNETHDRSZ, &VNET_HEADER_LEN) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // No offload towards the service until its guest's driver accepts some (the holder may
    // set them, `TUNSETOFFLOAD` only): the kernel hands over whole, checksummed frames.
    // SAFETY: TUNSETOFFLOAD takes its flags as the argument itself (no pointer).
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOFFLOAD, 0 as libc::c_ulong) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above: all zeroes is a valid ifreq.
    let mut got: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one ifreq, which `got` is and which outlives the call.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNGETIFF, &mut got) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF set the flags member of the union (a c_short; any value is valid).
    let flags = libc::c_int::from(unsafe { got.ifr_ifru.ifru_flags }) & 0xffff;
    Ok((tun, flags))
}
