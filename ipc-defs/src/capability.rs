//! What a service can be granted, and the interfaces (endpoint kinds) that exist.

use serde::Deserialize;
use serde::Serialize;

/// An interface that a service can serve and others can call. The manifest names endpoints by
/// these names; a name not listed here is an unknown endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Interface {
    /// Exit policy and platform devices.
    Intercept,
    /// The guest-state store.
    Vmgs,
    /// The TPM.
    Vtpm,
    /// Measurements, reports, sealing keys.
    Attest,
    /// The guest block device.
    Storage,
    /// The guest NIC.
    Net,
    /// Echo: answers with what it is sent (the metal platform's smallest service, and its
    /// fault-injection target).
    Echo,
}

impl Interface {
    pub const ALL: [Interface; 7] = [
        Interface::Intercept,
        Interface::Vmgs,
        Interface::Vtpm,
        Interface::Attest,
        Interface::Storage,
        Interface::Net,
        Interface::Echo,
    ];

    /// The name used in `manifest.toml` and in diagnostics.
    pub fn name(self) -> &'static str {
        match self {
            Interface::Intercept => "intercept",
            Interface::Vmgs => "vmgs",
            Interface::Vtpm => "vtpm",
            Interface::Attest => "attest",
            Interface::Storage => "storage",
            Interface::Net => "net",
            Interface::Echo => "echo",
        }
    }

    pub fn from_name(name: &str) -> Option<Interface> {
        Interface::ALL.into_iter().find(|i| i.name() == name)
    }
}

impl core::fmt::Display for Interface {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a served channel lets its client reach, beyond the interface itself. The microkernel
/// puts it in the server's bootstrap record from the client's `calls` entry; the server
/// enforces it on every request of that channel. A client never states its own grant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Grant {
    /// The whole interface (or not a served channel).
    #[default]
    Interface,
    /// A `vmgs` channel limited to these file ids.
    VmgsFiles(crate::services::vmgs::FileIdSet),
    /// An `intercept` channel whose client may raise these interrupts (and no others).
    Interrupts(crate::services::intercept::InterruptSet),
    /// The partition's `intercept` channel: bit n set = PCI device 00:n is owned by a device
    /// service (its configuration accesses are forwarded there).
    PciDevices(u32),
    /// A `vtpm` channel: what its client may ask of the TPM (commands at which localities,
    /// platform signals, the register interface).
    Vtpm(crate::services::vtpm::VtpmGrant),
    /// A listener of a TPM front end: its connections' commands may use these localities
    /// (locality 0 only unless the manifest grants more).
    Localities(crate::services::vtpm::Localities),
    /// The guest partition's channel to a device service: the guest's accesses to what the
    /// manifest gives the service (`Request::Guest`).
    GuestPartition,
    /// Guest memory a device may reach (DMA): `size` bytes at guest-physical `base`.
    GuestMemory { base: u64, size: u64 },
    /// A device's doorbells: the 4-byte registers in `size` bytes at guest-physical `base`,
    /// whose writes the partition delivers as signals of one eventfd once the device arms
    /// them (see [`CapabilityKind::Doorbells`]).
    Doorbells { base: u64, size: u64 },
    /// A descriptor store ([`CapabilityKind::FdStore`]): it keeps at most `max` descriptors.
    FdStore { max: u32 },
}

/// How a granted file may be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileAccess {
    ReadOnly,
    ReadWrite,
}

/// The kind of a capability, i.e. of the descriptor at a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CapabilityKind {
    /// The serving end of the service's control channel (the microkernel is the client).
    Control,
    /// The serving end of a channel for `Interface`, one per client.
    Serve(Interface),
    /// The calling end of a channel to `Interface`.
    Call(Interface),
    /// A shared-memory region named in the manifest.
    Region,
    /// A file opened by the microkernel on the service's behalf.
    File(FileAccess),
    /// The service's status page (counters, fault note), also mapped by the supervisor.
    Status,
    /// The service's own seccomp program, applied by the runtime before service code runs.
    SeccompProgram,
    /// A secret (a sealed memfd holding the key bytes), e.g. the VMGS datastore key. The
    /// service gets the key, never the file it was kept in.
    Key,
    /// A listening socket the microkernel bound (loopback only): the service may accept
    /// connections on it, but never create, bind or connect a socket of its own.
    Listener,
    /// An eventfd wired to this guest interrupt (KVM irqfd): signalling it raises the
    /// interrupt. Intercept holds its own lines; a device service holds the lines the
    /// manifest gives it (`interrupts`), others ask intercept.
    Interrupt(crate::services::intercept::Interrupt),
    /// Guest memory for a device's DMA: a memfd holding the guest-physical range its grant
    /// names (the partition's shared window, or all of guest RAM).
    GuestMemory,
    /// A device's doorbell eventfd. The partition signals it after every access it sends the
    /// device (so the device waits on one descriptor), and, while the device has armed its
    /// doorbells ([`crate::services::guest::Next::Doorbells`]), KVM signals it for each guest
    /// write to a doorbell its grant names (a KVM ioeventfd: the value written is not
    /// delivered; the device reads it from memory it shares with the driver).
    Doorbells,
    /// The calling end of the channel to the secure processor (reports and derived keys:
    /// [`crate::services::platform`]), which the microkernel serves. Only the service that
    /// serves `attest` may hold it.
    Platform,
    /// A TAP device's descriptor (`/dev/net/tun` attached to one host interface, non-blocking,
    /// no packet-information prefix, no virtio-net header): each `read` is one Ethernet frame
    /// from the host, each `write` sends one. The microkernel created or attached it, in the
    /// host's network namespace of choice, before the service started, and keeps it across
    /// its restarts. The holder needs no socket and no ioctl for it (its profile has neither);
    /// its name is the manifest's (`taps = [{ name = "net0" }]`), never the host interface's.
    Tap,
    /// The service's end of its descriptor store (a `SOCK_SEQPACKET` socket pair with the
    /// microkernel, [`crate::fd_store`]): it may send descriptors it wants kept across its
    /// restarts, and nothing else (its profile allows `sendmsg` on this slot only). What it
    /// kept comes back at its next start as slots the bootstrap record lists in `kept`.
    FdStore,
}

impl core::fmt::Display for CapabilityKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CapabilityKind::Control => write!(f, "control"),
            CapabilityKind::Serve(i) => write!(f, "serve:{i}"),
            CapabilityKind::Call(i) => write!(f, "call:{i}"),
            CapabilityKind::Region => write!(f, "region"),
            CapabilityKind::File(FileAccess::ReadOnly) => write!(f, "file:ro"),
            CapabilityKind::File(FileAccess::ReadWrite) => write!(f, "file:rw"),
            CapabilityKind::Status => write!(f, "status"),
            CapabilityKind::SeccompProgram => write!(f, "seccomp"),
            CapabilityKind::Key => write!(f, "key"),
            CapabilityKind::Listener => write!(f, "listener"),
            CapabilityKind::Interrupt(i) => write!(f, "interrupt:{i}"),
            CapabilityKind::Platform => write!(f, "platform"),
            CapabilityKind::GuestMemory => write!(f, "guest-memory"),
            CapabilityKind::Doorbells => write!(f, "doorbells"),
            CapabilityKind::Tap => write!(f, "tap"),
            CapabilityKind::FdStore => write!(f, "fd-store"),
        }
    }
}
