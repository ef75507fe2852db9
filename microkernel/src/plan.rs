//! The capability plan: what every service is handed, computed once from the manifest.
//!
//! For each service, the ordered list of its capability slots (descriptor 4 on, after the
//! bootstrap record at 3): each slot's kind and name as its bootstrap record shows them, its
//! grant, where the supervisor takes the descriptor from, and what `/proc/PID/fd/N` shows while
//! the service holds it. Besides the manifest, the plan depends on two facts of the run:
//! whether a guest partition runs (and its vCPUs: the register grant of its vtpm channel), and
//! which declared listeners the host asked for (`run --listen`).
//!
//! Everything that needs a service's slots takes them from here: the manifest's validator (the
//! open-files limit, the bootstrap record's size), `run` (the channels it creates, in the plan's
//! order; each start's descriptors; where the loader's filter expects the binary), `audit` (the
//! slots it prints) and `audit --live` (the descriptors a running service may hold). Services
//! find their capabilities by kind and name, but the loader's filter and the live audit go by
//! slot number: the order here is part of the contract.
//!
//! Pure: no descriptors, no system calls. It assumes a validated manifest (every call served
//! by exactly one service); on one that is not, a call without a server has no link and no slot,
//! which only the validator's later diagnostics see.
#![forbid(unsafe_code)]

use ipc_defs::bootstrap::FIRST_CAPABILITY_SLOT;
use ipc_defs::capability::CapabilityKind;
use ipc_defs::capability::Grant;
use ipc_defs::services::attest::PARAVISOR_CLIENT;
use ipc_defs::services::intercept::Interrupt;
use ipc_defs::services::vtpm::Localities;
use ipc_defs::services::vtpm::VtpmGrant;
use ipc_defs::Interface;

use crate::manifest::GuestMemoryAccess;
use crate::manifest::ServiceSpec;

/// Name of the memfd of the microkernel's own channel to attest.
pub const PARAVISOR_ATTEST_MEMFD: &str = "pv-chan-paravisor-attest";
/// Name of the memfd of the platform channel.
pub const PLATFORM_MEMFD: &str = "pv-chan-attest-platform";

/// Name of a service's status page memfd.
pub fn status_memfd(service: &str) -> String {
    format!("pv-status-{service}")
}

/// Name of a service's control channel memfd.
pub fn control_memfd(service: &str) -> String {
    format!("pv-control-{service}")
}

/// Name of the memfd that carries a service's seccomp program.
pub fn seccomp_memfd(service: &str) -> String {
    format!("pv-seccomp-{service}")
}

/// Name of a region's memfd.
pub fn region_memfd(service: &str, region: &str) -> String {
    format!("pv-region-{service}-{region}")
}

/// Name of the sealed memfd a key travels in.
pub fn key_memfd(key: &str) -> String {
    format!("pv-key-{key}")
}

/// What a run adds to the manifest.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    /// The guest partition's vCPUs (ids `0..n`), or `None` when no guest runs
    /// (`run --no-guest`): then there is no partition channel and no interrupt eventfd.
    pub guest_vcpus: Option<u32>,
    /// The declared listeners this run binds, by name (unique across a manifest); `None`:
    /// every declared one.
    pub listening: Option<&'a [String]>,
    /// The declared TAPs this run attaches, by name (unique across a manifest); `None`:
    /// every declared one.
    pub taps: Option<&'a [String]>,
}

impl Run<'static> {
    /// The most any run hands out: a guest partition of the largest size, every declared
    /// listener and every declared TAP. The manifest's bounds (open files, the bootstrap
    /// record) are checked against it, and `audit` prints it.
    pub const MOST: Run<'static> = Run {
        guest_vcpus: Some(crate::partition::MAX_VCPUS),
        listening: None,
        taps: None,
    };
}

impl Run<'_> {
    fn binds(&self, listener: &str) -> bool {
        self.listening
            .is_none_or(|names| names.iter().any(|n| n == listener))
    }

    fn attaches(&self, tap: &str) -> bool {
        self.taps.is_none_or(|names| names.iter().any(|n| n == tap))
    }
}

/// The channel between two services: `client` calls `interface`, which `server` serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub client: usize,
    pub server: usize,
    pub interface: Interface,
    pub memfd: String,
}

/// A link's index in [`CapabilityPlan::links`] (not a service's index, nor a slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkId(pub usize);

/// The guest partition's channel (client `guest`) to a service that answers guest accesses:
/// intercept, and each service that owns ranges or a PCI device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLink {
    pub server: usize,
    /// Intercept for intercept; for a device, its one interface that takes guest accesses.
    pub interface: Interface,
    pub memfd: String,
}

/// A guest link's index in [`CapabilityPlan::guest_links`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestLinkId(pub usize);

/// Where the supervisor takes a slot's descriptor from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The service's status page.
    StatusPage,
    /// Its seccomp program (a sealed memfd).
    SeccompProgram,
    /// The serving end of its control channel.
    Control,
    /// The serving end of a link, to the link's client for its interface.
    Served(LinkId),
    /// The serving end of the guest partition's channel.
    Guest(GuestLinkId),
    /// The eventfd wired to this guest interrupt.
    GuestInterrupt(Interrupt),
    /// Guest memory for a device's DMA.
    GuestMemory(GuestMemoryAccess),
    /// The service's doorbell eventfd (the partition makes one per `doorbells` grant).
    Doorbells,
    /// The serving end of the microkernel's own channel to attest.
    ParavisorAttest,
    /// The calling end of the platform channel (the microkernel serves it).
    Platform,
    /// The calling end of a link, to its server.
    Call(LinkId),
    /// The service's `regions[n]`.
    Region(usize),
    /// Its `files[n]`, opened through the state directory.
    File(usize),
    /// Its `keys[n]`, as a sealed memfd.
    Key(usize),
    /// The service's end of its descriptor store (a socket pair made for the run).
    FdStore,
    /// Its `listen[n]`, bound by the microkernel.
    Listener(usize),
    /// Its `taps[n]`, attached by the microkernel to the host interface the run names.
    Tap(usize),
}

/// What `/proc/PID/fd/N` of the service shows for a slot while it holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// A memfd of this name.
    Memfd(String),
    /// An eventfd.
    Eventfd,
    /// What this run opened for it (a file's resolved path, a bound socket's inode,
    /// `/dev/net/tun` for a TAP, its descriptor store's socket): known only once opened.
    Opened,
    /// Nothing: closed by the time the service answers (the runtime installs its seccomp
    /// program and closes it; a key is closed once read).
    Closed,
}

impl Held {
    /// The link, when the plan alone knows it.
    pub fn link(&self) -> Option<String> {
        match self {
            Held::Memfd(name) => Some(format!("/memfd:{name} (deleted)")),
            Held::Eventfd => Some("anon_inode:[eventfd]".into()),
            Held::Opened | Held::Closed => None,
        }
    }
}

/// One capability slot of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The descriptor number in the service.
    pub slot: i32,
    pub kind: CapabilityKind,
    /// The name its bootstrap record shows: the peer service of a channel, the region, file,
    /// key or listener name.
    pub name: String,
    pub grant: Grant,
    pub source: Source,
    pub held: Held,
}

/// Every channel the microkernel creates and every service's slots, for one run.
#[derive(Debug, Clone)]
pub struct CapabilityPlan {
    /// The channels between services, in the order the supervisor creates them: each client
    /// in manifest order, its calls in order.
    pub links: Vec<Link>,
    /// The guest partition's channels, in manifest order of their servers (none without a
    /// guest).
    pub guest_links: Vec<GuestLink>,
    /// The interrupts wired to the guest: intercept's own lines and every line a call to
    /// intercept grants (none without a guest).
    pub interrupts: Vec<Interrupt>,
    /// The service the microkernel calls as client `paravisor`: the one that serves attest.
    pub paravisor_attest: Option<usize>,
    /// The service that holds the platform channel.
    pub platform: Option<usize>,
    /// Each service's slots, in manifest order.
    slots: Vec<Vec<Slot>>,
}

impl CapabilityPlan {
    pub fn new(services: &[ServiceSpec], run: Run) -> CapabilityPlan {
        let mut links = Vec::new();
        for (client, spec) in services.iter().enumerate() {
            for &interface in &spec.calls {
                if let Some(server) = services.iter().position(|s| s.serves.contains(&interface)) {
                    links.push(Link {
                        client,
                        server,
                        interface,
                        memfd: format!("pv-chan-{}-{interface}", spec.name),
                    });
                }
            }
        }
        let guest = run.guest_vcpus.is_some();
        let guest_links = match guest {
            true => services
                .iter()
                .enumerate()
                .filter_map(|(server, spec)| {
                    guest_link_interface(spec).map(|interface| GuestLink {
                        server,
                        interface,
                        memfd: format!("pv-guest-{}", spec.name),
                    })
                })
                .collect(),
            false => Vec::new(),
        };
        let interrupts = match guest {
            true => crate::manifest::guest_interrupts(services),
            false => Vec::new(),
        };
        let mut plan = CapabilityPlan {
            links,
            guest_links,
            interrupts,
            paravisor_attest: services
                .iter()
                .position(|s| s.serves.contains(&Interface::Attest)),
            platform: services.iter().position(|s| s.platform),
            slots: Vec::new(),
        };
        plan.slots = (0..services.len())
            .map(|i| plan.service_slots(services, i, &run))
            .collect();
        plan
    }

    /// The slots of service `i` (manifest order), from [`FIRST_CAPABILITY_SLOT`] on.
    pub fn slots(&self, i: usize) -> &[Slot] {
        self.slots.get(i).map_or(&[], Vec::as_slice)
    }

    /// The slots of the guest-state broker started on service `i`'s slot for its file
    /// `file` (`pv-vmgs --broker`, during sealing): its status page, seccomp program and
    /// control channel, and that file; nothing else (no key, no channel to another service).
    /// `None` if the service has no such file.
    pub fn broker_slots(&self, i: usize, file: usize) -> Option<Vec<Slot>> {
        let own = |wanted: Source| self.slots(i).iter().find(|s| s.source == wanted).cloned();
        let mut slots = vec![
            own(Source::StatusPage)?,
            own(Source::SeccompProgram)?,
            own(Source::Control)?,
            own(Source::File(file))?,
        ];
        for (k, slot) in slots.iter_mut().enumerate() {
            slot.slot = FIRST_CAPABILITY_SLOT + k as i32;
        }
        Some(slots)
    }

    /// The interface of service `i` the guest partition's channel reaches, if it has one.
    pub fn guest_interface(&self, i: usize) -> Option<Interface> {
        self.guest_links
            .iter()
            .find(|l| l.server == i)
            .map(|l| l.interface)
    }

    /// Service `i`'s slots in the order the supervisor hands them over: its own pages and
    /// control channel, what it serves (to services, the guest partition, the microkernel),
    /// then what it calls and holds.
    fn service_slots(&self, services: &[ServiceSpec], i: usize, run: &Run) -> Vec<Slot> {
        let spec = &services[i];
        let mut slots = Slots(Vec::new());
        slots.push(
            CapabilityKind::Status,
            "status",
            Grant::Interface,
            Source::StatusPage,
            Held::Memfd(status_memfd(&spec.name)),
        );
        slots.push(
            CapabilityKind::SeccompProgram,
            "seccomp",
            Grant::Interface,
            Source::SeccompProgram,
            Held::Closed,
        );
        slots.push(
            CapabilityKind::Control,
            "control",
            Grant::Interface,
            Source::Control,
            Held::Memfd(control_memfd(&spec.name)),
        );
        for (id, link) in self.links.iter().enumerate() {
            if link.server == i {
                let client = &services[link.client];
                slots.push(
                    CapabilityKind::Serve(link.interface),
                    &client.name,
                    served_grant(client, link.interface, run),
                    Source::Served(LinkId(id)),
                    Held::Memfd(link.memfd.clone()),
                );
            }
        }
        for (id, link) in self.guest_links.iter().enumerate() {
            if link.server != i {
                continue;
            }
            let grant = match link.interface {
                // Which PCI devices the host bridge forwards instead of answering.
                Interface::Intercept => Grant::PciDevices(
                    services
                        .iter()
                        .filter_map(|s| s.pci_device)
                        .fold(0u32, |m, d| m | 1 << d),
                ),
                // The partition alone drives the TPM's registers, for its own vCPUs.
                Interface::Vtpm => Grant::Vtpm(VtpmGrant {
                    registers: run.guest_vcpus.unwrap_or(0),
                    ..VtpmGrant::NONE
                }),
                // Any other device: the guest's accesses to its ranges.
                _ => Grant::GuestPartition,
            };
            slots.push(
                CapabilityKind::Serve(link.interface),
                "guest",
                grant,
                Source::Guest(GuestLinkId(id)),
                Held::Memfd(link.memfd.clone()),
            );
            // The lines this service raises itself: a device its own; intercept its own and
            // those it raises for the devices whose calls grant them.
            let devices_own = |irq: Interrupt| {
                services.iter().any(|s| {
                    !s.serves.contains(&Interface::Intercept) && s.interrupts.contains(irq)
                })
            };
            for &irq in &self.interrupts {
                let held = if link.interface == Interface::Intercept {
                    !devices_own(irq)
                } else {
                    spec.interrupts.contains(irq)
                };
                if held {
                    slots.push(
                        CapabilityKind::Interrupt(irq),
                        &format!("irq-{irq}").replace(' ', "-"),
                        Grant::Interface,
                        Source::GuestInterrupt(irq),
                        Held::Eventfd,
                    );
                }
            }
            if let Some(access) = spec.guest_memory {
                let (base, size, memfd) = match access {
                    GuestMemoryAccess::SharedWindow => (
                        crate::partition::memory::SHARED_WINDOW_BASE,
                        crate::partition::memory::SHARED_WINDOW_SIZE,
                        crate::partition::memory::SHARED_WINDOW_MEMFD,
                    ),
                    GuestMemoryAccess::All => (
                        0,
                        crate::partition::memory::MAX_RAM,
                        crate::partition::memory::RAM_MEMFD,
                    ),
                };
                slots.push(
                    CapabilityKind::GuestMemory,
                    "guest-memory",
                    Grant::GuestMemory { base, size },
                    Source::GuestMemory(access),
                    Held::Memfd(memfd.into()),
                );
            }
            if let Some(d) = spec.doorbells {
                slots.push(
                    CapabilityKind::Doorbells,
                    "doorbells",
                    Grant::Doorbells {
                        base: d.base,
                        size: d.size,
                    },
                    Source::Doorbells,
                    Held::Eventfd,
                );
            }
        }
        if self.paravisor_attest == Some(i) {
            slots.push(
                CapabilityKind::Serve(Interface::Attest),
                PARAVISOR_CLIENT,
                Grant::Interface,
                Source::ParavisorAttest,
                Held::Memfd(PARAVISOR_ATTEST_MEMFD.into()),
            );
        }
        if self.platform == Some(i) {
            slots.push(
                CapabilityKind::Platform,
                "platform",
                Grant::Interface,
                Source::Platform,
                Held::Memfd(PLATFORM_MEMFD.into()),
            );
        }
        for (id, link) in self.links.iter().enumerate() {
            if link.client == i {
                slots.push(
                    CapabilityKind::Call(link.interface),
                    &services[link.server].name,
                    Grant::Interface,
                    Source::Call(LinkId(id)),
                    Held::Memfd(link.memfd.clone()),
                );
            }
        }
        for (n, r) in spec.regions.iter().enumerate() {
            slots.push(
                CapabilityKind::Region,
                &r.name,
                Grant::Interface,
                Source::Region(n),
                Held::Memfd(region_memfd(&spec.name, &r.name)),
            );
        }
        for (n, f) in spec.files.iter().enumerate() {
            slots.push(
                CapabilityKind::File(f.access),
                &f.name,
                Grant::Interface,
                Source::File(n),
                Held::Opened,
            );
        }
        for (n, k) in spec.keys.iter().enumerate() {
            slots.push(
                CapabilityKind::Key,
                &k.name,
                Grant::Interface,
                Source::Key(n),
                Held::Closed,
            );
        }
        if let Some(store) = spec.fd_store {
            slots.push(
                CapabilityKind::FdStore,
                "fd-store",
                Grant::FdStore { max: store.max },
                Source::FdStore,
                Held::Opened,
            );
        }
        // Last, what the host chooses: a run that binds fewer listeners or attaches fewer TAPs
        // than the manifest declares shifts no slot before them.
        for (n, l) in spec.listen.iter().enumerate() {
            if run.binds(&l.name) {
                slots.push(
                    CapabilityKind::Listener,
                    &l.name,
                    Grant::Localities(l.localities),
                    Source::Listener(n),
                    Held::Opened,
                );
            }
        }
        for (n, t) in spec.taps.iter().enumerate() {
            if run.attaches(&t.name) {
                slots.push(
                    CapabilityKind::Tap,
                    &t.name,
                    Grant::Interface,
                    Source::Tap(n),
                    Held::Opened,
                );
            }
        }
        slots.0
    }
}

/// A service's slots as they are added, each numbered after the one before.
struct Slots(Vec<Slot>);

impl Slots {
    fn push(&mut self, kind: CapabilityKind, name: &str, grant: Grant, source: Source, held: Held) {
        let slot = FIRST_CAPABILITY_SLOT + self.0.len() as i32;
        self.0.push(Slot {
            slot,
            kind,
            name: name.to_string(),
            grant,
            source,
            held,
        });
    }
}

/// The interface of `spec` the guest partition's channel reaches, if it has one: intercept,
/// or the one interface that takes guest accesses of a service that owns ranges or a PCI
/// device.
fn guest_link_interface(spec: &ServiceSpec) -> Option<Interface> {
    let owns_ranges = !spec.mmio.is_empty() || !spec.pio.is_empty() || spec.pci_device.is_some();
    if spec.serves.contains(&Interface::Intercept) {
        Some(Interface::Intercept)
    } else if owns_ranges {
        spec.serves.first().copied()
    } else {
        None
    }
}

/// What the channel from `client` for `interface` lets it reach: its `calls` entry's grant,
/// with a front end's TPM commands at locality 0 and the localities of the listeners this run
/// binds, not of every listener the manifest declares.
fn served_grant(client: &ServiceSpec, interface: Interface, run: &Run) -> Grant {
    let bound: Vec<Localities> = client
        .listen
        .iter()
        .filter(|l| run.binds(&l.name))
        .map(|l| l.localities)
        .collect();
    channel_grant(&client.grants, &bound, interface)
}

/// The server's side of a channel: what the client's `calls` entry for `interface` grants
/// (the whole interface when it names nothing), with TPM commands at locality 0 and at the
/// localities of `listeners` (those the client holds). The hosted plan and the metal task
/// table both compute it here; a metal task holds no listener.
pub fn channel_grant(
    grants: &std::collections::BTreeMap<Interface, Grant>,
    listeners: &[Localities],
    interface: Interface,
) -> Grant {
    let mut grant = grants.get(&interface).copied().unwrap_or(Grant::Interface);
    if let Grant::Vtpm(g) = &mut grant {
        if !g.commands.is_empty() {
            g.commands = listeners
                .iter()
                .fold(Localities::ZERO, |all, l| all.union(*l));
        }
    }
    grant
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ipc_defs::capability::FileAccess;

    use super::*;
    use crate::manifest::Manifest;

    fn shipped() -> Manifest {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest.toml");
        Manifest::load(Path::new(path)).unwrap()
    }

    fn parse(source: &str) -> Manifest {
        Manifest::parse(Path::new("test.toml"), source).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn index(m: &Manifest, name: &str) -> usize {
        m.services.iter().position(|s| s.name == name).unwrap()
    }

    /// `kind name` of each slot of `service`.
    fn listed(plan: &CapabilityPlan, m: &Manifest, service: &str) -> Vec<String> {
        plan.slots(index(m, service))
            .iter()
            .map(|s| format!("{} {}", s.kind, s.name))
            .collect()
    }

    const NO_GUEST: Run<'static> = Run {
        guest_vcpus: None,
        listening: None,
        taps: None,
    };

    #[test]
    fn the_shipped_manifests_slots_in_the_order_services_are_handed_them() {
        let m = shipped();
        let plan = CapabilityPlan::new(&m.services, Run::MOST);
        let own = ["status status", "seccomp seccomp", "control control"];
        let with = |rest: &[&str]| -> Vec<String> {
            own.iter().chain(rest).map(|s| s.to_string()).collect()
        };
        assert_eq!(
            listed(&plan, &m, "intercept"),
            with(&[
                "serve:intercept guest",
                "interrupt:line 4 irq-line-4",
                "call:vtpm vtpm",
                "call:storage storage",
                "call:net net",
            ])
        );
        assert_eq!(
            listed(&plan, &m, "vmgs"),
            with(&[
                "serve:vmgs attest",
                "serve:vmgs vtpm",
                "serve:vmgs storage",
                "file:rw guest-state",
                "key datastore",
            ])
        );
        assert_eq!(
            listed(&plan, &m, "attest"),
            with(&[
                "serve:attest vtpm",
                "serve:attest paravisor",
                "platform platform",
                "call:vmgs vmgs",
                "file:ro launch-log",
                "file:ro platform-certs",
            ])
        );
        assert_eq!(
            listed(&plan, &m, "vtpm"),
            with(&[
                "serve:vtpm intercept",
                "serve:vtpm tpm-gateway",
                "serve:vtpm guest",
                "call:vmgs vmgs",
                "call:attest attest",
                "region vtpm-checkpoint",
            ])
        );
        assert_eq!(
            listed(&plan, &m, "tpm-gateway"),
            with(&[
                "call:vtpm vtpm",
                "region tpm-gateway-journal",
                "fd-store fd-store",
                "listener mssim-command",
                "listener mssim-platform",
                "listener swtpm-data",
                "listener swtpm-control",
                "listener swtpm-control-unix",
            ])
        );
        assert_eq!(
            listed(&plan, &m, "storage"),
            with(&[
                "serve:storage intercept",
                "serve:storage guest",
                "interrupt:line 10 irq-line-10",
                "guest-memory guest-memory",
                "doorbells doorbells",
                "call:vmgs vmgs",
                "region nvme-checkpoint",
                "file:rw nvme-image",
                "file:rw blk-image",
                "file:rw scsi-image",
                "listener vhost-user-blk",
                "listener vhost-user-scsi",
            ])
        );
        assert_eq!(
            listed(&plan, &m, "net"),
            with(&[
                "serve:net intercept",
                "serve:net guest",
                "interrupt:line 11 irq-line-11",
                "guest-memory guest-memory",
                "doorbells doorbells",
                "region net-checkpoint",
                "listener vhost-user-net",
                "tap net0",
            ])
        );

        // Without a guest: no partition channel, no interrupt; nothing else moves but up.
        let without = CapabilityPlan::new(&m.services, NO_GUEST);
        assert_eq!(
            listed(&without, &m, "intercept"),
            with(&["call:vtpm vtpm", "call:storage storage", "call:net net"])
        );
        let vtpm = listed(&plan, &m, "vtpm");
        let vtpm: Vec<String> = vtpm
            .into_iter()
            .filter(|s| s != "serve:vtpm guest")
            .collect();
        assert_eq!(listed(&without, &m, "vtpm"), vtpm);
        // The partition's device loses its partition channel, line, guest memory and doorbells.
        let storage: Vec<String> = listed(&plan, &m, "storage")
            .into_iter()
            .filter(|s| {
                ![
                    "serve:storage guest",
                    "interrupt:line 10 irq-line-10",
                    "guest-memory guest-memory",
                    "doorbells doorbells",
                ]
                .contains(&s.as_str())
            })
            .collect();
        assert_eq!(listed(&without, &m, "storage"), storage);
        // So does net's virtio-net function.
        let net: Vec<String> = listed(&plan, &m, "net")
            .into_iter()
            .filter(|s| {
                ![
                    "serve:net guest",
                    "interrupt:line 11 irq-line-11",
                    "guest-memory guest-memory",
                    "doorbells doorbells",
                ]
                .contains(&s.as_str())
            })
            .collect();
        assert_eq!(listed(&without, &m, "net"), net);
        for name in ["vmgs", "attest", "tpm-gateway"] {
            assert_eq!(
                listed(&without, &m, name),
                listed(&plan, &m, name),
                "{name}"
            );
        }
        assert!(without.guest_links.is_empty() && without.interrupts.is_empty());
    }

    #[test]
    fn slots_are_numbered_from_the_first_capability_slot_without_gaps() {
        let m = shipped();
        for run in [Run::MOST, NO_GUEST] {
            let plan = CapabilityPlan::new(&m.services, run);
            for i in 0..m.services.len() {
                let numbers: Vec<i32> = plan.slots(i).iter().map(|s| s.slot).collect();
                let expected: Vec<i32> = (FIRST_CAPABILITY_SLOT..).take(numbers.len()).collect();
                assert_eq!(numbers, expected, "{}", m.services[i].name);
            }
        }
    }

    #[test]
    fn links_are_created_client_by_client_in_call_order() {
        let m = shipped();
        let plan = CapabilityPlan::new(&m.services, Run::MOST);
        let links: Vec<String> = plan
            .links
            .iter()
            .map(|l| {
                format!(
                    "{}->{} {}",
                    m.services[l.client].name, m.services[l.server].name, l.memfd
                )
            })
            .collect();
        assert_eq!(
            links,
            [
                "intercept->vtpm pv-chan-intercept-vtpm",
                "intercept->storage pv-chan-intercept-storage",
                "intercept->net pv-chan-intercept-net",
                "attest->vmgs pv-chan-attest-vmgs",
                "vtpm->vmgs pv-chan-vtpm-vmgs",
                "vtpm->attest pv-chan-vtpm-attest",
                "tpm-gateway->vtpm pv-chan-tpm-gateway-vtpm",
                "storage->vmgs pv-chan-storage-vmgs",
            ]
        );
        // Each end of a link names the same memfd.
        for (id, link) in plan.links.iter().enumerate() {
            for (service, source) in [
                (link.server, Source::Served(LinkId(id))),
                (link.client, Source::Call(LinkId(id))),
            ] {
                let slot = plan.slots(service).iter().find(|s| s.source == source);
                assert_eq!(
                    slot.map(|s| &s.held),
                    Some(&Held::Memfd(link.memfd.clone()))
                );
            }
        }
        let guest: Vec<(&str, Interface, &str)> = plan
            .guest_links
            .iter()
            .map(|l| {
                (
                    m.services[l.server].name.as_str(),
                    l.interface,
                    l.memfd.as_str(),
                )
            })
            .collect();
        assert_eq!(
            guest,
            [
                ("intercept", Interface::Intercept, "pv-guest-intercept"),
                ("vtpm", Interface::Vtpm, "pv-guest-vtpm"),
                ("storage", Interface::Storage, "pv-guest-storage"),
                ("net", Interface::Net, "pv-guest-net"),
            ]
        );
        assert_eq!(plan.paravisor_attest, Some(index(&m, "attest")));
        assert_eq!(plan.platform, Some(index(&m, "attest")));
    }

    /// One service that holds every kind of capability there is.
    const EVERYTHING: &str = r#"
[[service]]
name = "hub"
binary = "pv-hub"
serves = ["intercept", "attest"]
platform = true
calls = [{ endpoint = "vtpm", tpm = ["commands"] }]
interrupts = [4]
regions = [{ name = "scratch", size = "4K" }]
files = [{ name = "log", path = "hub.log", access = "read-write", missing = "create" }]
keys = [{ name = "secret", path = "hub.key", missing = "create" }]
fd-store = { max = 2 }
listen = [
  { name = "front", address = "127.0.0.1:2321", localities = [0, 3] },
  { name = "back", path = "hub/back-sock", localities = [2] },
]
pci-device = 5
limits = { memory = "64M", open-files = 64 }
restart = { policy = "never", max = 0, window = "10s", backoff = "10ms" }

[[service]]
name = "tpm"
binary = "pv-vtpm"
serves = ["vtpm"]
calls = [{ endpoint = "intercept", interrupts = [7] }]
mmio = [{ base = 0xfed40000, size = 0x5000 }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "never", max = 0, window = "10s", backoff = "10ms" }
"#;

    #[test]
    fn a_service_with_every_kind_of_capability_gets_them_in_order_with_their_grants() {
        let m = parse(EVERYTHING);
        let bound = ["front".to_string()];
        let run = Run {
            guest_vcpus: Some(2),
            listening: Some(&bound),
            taps: None,
        };
        let plan = CapabilityPlan::new(&m.services, run);
        let hub = plan.slots(0);
        let expected = [
            (CapabilityKind::Status, "status", Grant::Interface),
            (CapabilityKind::SeccompProgram, "seccomp", Grant::Interface),
            (CapabilityKind::Control, "control", Grant::Interface),
            (
                CapabilityKind::Serve(Interface::Intercept),
                "tpm",
                m.services[1].grants[&Interface::Intercept],
            ),
            (
                CapabilityKind::Serve(Interface::Intercept),
                "guest",
                Grant::PciDevices(1 << 5),
            ),
            (
                CapabilityKind::Interrupt(Interrupt::Line(4)),
                "irq-line-4",
                Grant::Interface,
            ),
            (
                CapabilityKind::Interrupt(Interrupt::Line(7)),
                "irq-line-7",
                Grant::Interface,
            ),
            (
                CapabilityKind::Serve(Interface::Attest),
                "paravisor",
                Grant::Interface,
            ),
            (CapabilityKind::Platform, "platform", Grant::Interface),
            (
                CapabilityKind::Call(Interface::Vtpm),
                "tpm",
                Grant::Interface,
            ),
            (CapabilityKind::Region, "scratch", Grant::Interface),
            (
                CapabilityKind::File(FileAccess::ReadWrite),
                "log",
                Grant::Interface,
            ),
            (CapabilityKind::Key, "secret", Grant::Interface),
            (
                CapabilityKind::FdStore,
                "fd-store",
                Grant::FdStore { max: 2 },
            ),
            // Only the listener this run binds.
            (
                CapabilityKind::Listener,
                "front",
                Grant::Localities(Localities::ZERO.with(3)),
            ),
        ];
        let got: Vec<(CapabilityKind, &str, Grant)> = hub
            .iter()
            .map(|s| (s.kind, s.name.as_str(), s.grant))
            .collect();
        assert_eq!(got, expected);
        let held: Vec<Option<String>> = hub.iter().map(|s| s.held.link()).collect();
        assert_eq!(
            held,
            [
                Some("/memfd:pv-status-hub (deleted)".to_string()),
                None,
                Some("/memfd:pv-control-hub (deleted)".into()),
                Some("/memfd:pv-chan-tpm-intercept (deleted)".into()),
                Some("/memfd:pv-guest-hub (deleted)".into()),
                Some("anon_inode:[eventfd]".into()),
                Some("anon_inode:[eventfd]".into()),
                Some("/memfd:pv-chan-paravisor-attest (deleted)".into()),
                Some("/memfd:pv-chan-attest-platform (deleted)".into()),
                Some("/memfd:pv-chan-hub-vtpm (deleted)".into()),
                Some("/memfd:pv-region-hub-scratch (deleted)".into()),
                None,
                None,
                None,
                None,
            ]
        );
        assert_eq!(hub[11].held, Held::Opened);
        assert_eq!(hub[12].held, Held::Closed);
        // The store's socket pair is made for the run: its link is known once made.
        assert_eq!(
            (hub[13].source, &hub[13].held),
            (Source::FdStore, &Held::Opened)
        );
        assert_eq!(hub[14].source, Source::Listener(0));

        // The TPM: its client's commands at the localities of the listeners this run binds
        // (not `back`'s 2); the partition's channel drives the registers of its 2 vCPUs.
        let tpm = plan.slots(1);
        assert_eq!(tpm[3].name, "hub");
        assert_eq!(
            tpm[3].grant,
            Grant::Vtpm(VtpmGrant {
                commands: Localities::ZERO.with(3),
                ..VtpmGrant::NONE
            })
        );
        assert_eq!(
            (tpm[4].name.as_str(), tpm[4].source),
            ("guest", Source::Guest(GuestLinkId(1)))
        );
        assert_eq!(
            tpm[4].grant,
            Grant::Vtpm(VtpmGrant {
                registers: 2,
                ..VtpmGrant::NONE
            })
        );

        // Every declared listener, when the run binds them all: still the last slots.
        let all = CapabilityPlan::new(&m.services, Run::MOST);
        let last: Vec<&str> = all.slots(0)[14..].iter().map(|s| s.name.as_str()).collect();
        assert_eq!(last, ["front", "back"]);
        let Grant::Vtpm(g) = all.slots(1)[3].grant else {
            panic!("no vtpm grant");
        };
        assert_eq!(g.commands, Localities::ZERO.with(2).with(3));
    }

    #[test]
    fn a_tap_is_handed_over_only_when_the_run_attaches_it_and_comes_last() {
        let m = shipped();
        let net = index(&m, "net");
        let named = ["net0".to_string()];
        let run = |taps: &[String]| {
            let run = Run {
                guest_vcpus: Some(1),
                listening: Some(&[]),
                taps: Some(taps),
            };
            CapabilityPlan::new(&m.services, run)
        };
        // The host named nothing: no slot (the service's context simply lacks it).
        let none = run(&[]);
        assert!(none
            .slots(net)
            .iter()
            .all(|s| s.kind != CapabilityKind::Tap));
        let plan = run(&named);
        let last = plan.slots(net).last().expect("slots").clone();
        assert_eq!(
            (last.kind, last.name.as_str(), last.source, last.held),
            (CapabilityKind::Tap, "net0", Source::Tap(0), Held::Opened)
        );
        assert_eq!(plan.slots(net).len(), none.slots(net).len() + 1);
        // Every other service's slots are the same either way.
        for i in (0..m.services.len()).filter(|&i| i != net) {
            assert_eq!(plan.slots(i), none.slots(i), "{}", m.services[i].name);
        }
    }

    #[test]
    fn the_broker_holds_the_services_own_pages_and_the_file_alone() {
        let m = shipped();
        let plan = CapabilityPlan::new(&m.services, Run::MOST);
        let vmgs = m.services.iter().position(|s| s.name == "vmgs").unwrap();
        let slots = plan.broker_slots(vmgs, 0).expect("vmgs has a file");
        let kinds: Vec<_> = slots
            .iter()
            .map(|s| (s.slot, s.kind, s.name.as_str()))
            .collect();
        assert_eq!(
            kinds,
            [
                (4, CapabilityKind::Status, "status"),
                (5, CapabilityKind::SeccompProgram, "seccomp"),
                (6, CapabilityKind::Control, "control"),
                (
                    7,
                    CapabilityKind::File(ipc_defs::capability::FileAccess::ReadWrite),
                    "guest-state"
                ),
            ]
        );
        assert!(plan.broker_slots(vmgs, 1).is_none(), "vmgs has one file");
    }
}
