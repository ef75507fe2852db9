//! `paravisor audit`: the privilege matrix an auditor reads, one row per service.
//!
//! A [`Row`] holds the facts as data (numbers, ranges, the manifest's own grant records); the
//! text matrix is rendered from it and `--json` serializes it as it is, so the two cannot
//! disagree and a script never parses a display string.

use std::collections::BTreeMap;
use std::fmt::Write;

use ipc_defs::capability::Grant;
use ipc_defs::services::intercept::Interrupt;
use serde::Serialize;

use crate::manifest::format_duration;
use crate::manifest::format_size;
use crate::manifest::grant_text;
use crate::manifest::DeviceRange;
use crate::manifest::FileGrant;
use crate::manifest::KeyGrant;
use crate::manifest::ListenAddress;
use crate::manifest::ListenGrant;
use crate::manifest::Manifest;
use crate::manifest::Missing;
use crate::manifest::RegionGrant;
use crate::manifest::RestartPolicy;
use crate::manifest::Sealing;
use crate::manifest::TapGrant;
use crate::plan::CapabilityPlan;
use crate::plan::Run;
use crate::plan::Source;
use crate::profiles;
use crate::sandbox::Namespaces;

/// One service's privileges.
#[derive(Debug, Serialize)]
pub struct Row {
    pub service: String,
    pub binary: String,
    /// Its capability slots, as its bootstrap record lists them in a run with a guest
    /// partition, every declared listener bound and every declared TAP attached
    /// ([`crate::plan`]).
    pub slots: Vec<SlotRow>,
    pub serves: Vec<&'static str>,
    /// Services that may call this one, by endpoint.
    pub callers: Vec<Caller>,
    pub calls: Vec<&'static str>,
    /// Shared regions: name and size in bytes.
    pub regions: Vec<RegionGrant>,
    /// Granted files: name, path, access ("read-only", "read-write"), what a missing one
    /// means.
    pub files: Vec<FileGrant>,
    pub keys: Vec<KeyRow>,
    /// Declared TPM front ends: name, address (`{"tcp": "IP:PORT"}` or `{"unix": PATH}`),
    /// localities.
    pub listen: Vec<ListenGrant>,
    /// Declared TAP devices (a NIC's back end, frames only): attached only to the host
    /// interface `paravisor run --tap NAME=IFNAME[@NETNS]` names.
    pub taps: Vec<TapGrant>,
    /// Its descriptor store: how many descriptors it may keep across its restarts, at which
    /// slot.
    pub fd_store: Option<FdStoreRow>,
    /// What each call reaches beyond its endpoint (e.g. the vmgs file ids).
    pub call_grants: Vec<CallGrant>,
    /// What each client may reach of this service's endpoints.
    pub client_grants: Vec<ClientGrant>,
    /// Guest-physical MMIO ranges: base and size in bytes.
    pub mmio: Vec<DeviceRange>,
    /// I/O-port ranges: base and size.
    pub pio: Vec<DeviceRange>,
    /// Guest interrupt lines the service holds (eventfds wired to the VM: intercept only).
    pub interrupts: Vec<InterruptRow>,
    /// What the guest partition sends it, when a guest runs.
    pub guest: Option<String>,
    /// The guest memory it may reach (DMA), when a guest runs: base, size, kind.
    pub dma: Option<DmaRow>,
    /// Its doorbells (4-byte registers inside its own mmio), when a guest runs.
    pub doorbells: Option<DeviceRange>,
    /// What the microkernel itself holds with it: the platform capability, its own channel.
    pub microkernel: Option<String>,
    /// Address-space limit in bytes.
    pub memory_bytes: u64,
    pub open_files: u64,
    pub restart: RestartRow,
    pub watchdog_ms: u64,
    pub namespaces: Vec<&'static str>,
    pub syscalls_base: Vec<&'static str>,
    pub syscalls_extra: Vec<String>,
    /// What its grants add, each one syscall with fixed arguments (a TAP's one ioctl, the
    /// store's sendmsg on its own descriptor).
    pub syscalls_granted: Vec<String>,
    /// The uid and gid it runs as, and where they come from.
    pub uid: u32,
    pub gid: u32,
    pub ids: crate::privilege::IdSource,
    /// Supplementary groups (none as root).
    pub groups: Vec<u32>,
    /// The capability sets by name, each empty.
    pub capabilities: BTreeMap<&'static str, Vec<String>>,
    pub securebits: Vec<&'static str>,
    /// Seccomp filters stacked on it (spawner's, loader, its own).
    pub seccomp_filters: u32,
}

/// One capability slot: its descriptor, kind (`serve:vtpm`, `file:rw`, ...) and name.
#[derive(Debug, Serialize)]
pub struct SlotRow {
    pub slot: i32,
    pub kind: String,
    pub name: String,
}

/// A descriptor store: at most `max` descriptors (connected sockets, pipes) kept across the
/// service's restarts, the store's socket at `slot`.
#[derive(Debug, Serialize)]
pub struct FdStoreRow {
    pub max: u32,
    pub slot: i32,
}

/// A service that may call an endpoint of this one.
#[derive(Debug, Serialize)]
pub struct Caller {
    pub service: String,
    pub endpoint: &'static str,
}

/// A key the service holds: the manifest's record, and for a sealed key the sealing policy.
#[derive(Debug, Serialize)]
pub struct KeyRow {
    #[serde(flatten)]
    pub key: KeyGrant,
    pub sealed: bool,
    pub sealing: Option<Sealing>,
}

/// A call's grant.
#[derive(Debug, Serialize)]
pub struct CallGrant {
    pub endpoint: &'static str,
    #[serde(serialize_with = "ser_grant")]
    pub grant: Grant,
}

/// A client's grant on one of this service's endpoints.
#[derive(Debug, Serialize)]
pub struct ClientGrant {
    pub client: String,
    pub endpoint: &'static str,
    #[serde(serialize_with = "ser_grant")]
    pub grant: Grant,
}

/// An interrupt: `{"line": 4}` or `{"msi": 32}`.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum InterruptRow {
    Line(u8),
    Msi(u8),
}

impl From<Interrupt> for InterruptRow {
    fn from(i: Interrupt) -> InterruptRow {
        match i {
            Interrupt::Line(l) => InterruptRow::Line(l),
            Interrupt::Msi(v) => InterruptRow::Msi(v),
        }
    }
}

impl From<InterruptRow> for Interrupt {
    fn from(i: InterruptRow) -> Interrupt {
        match i {
            InterruptRow::Line(l) => Interrupt::Line(l),
            InterruptRow::Msi(v) => Interrupt::Msi(v),
        }
    }
}

/// The restart policy, with its durations in milliseconds.
#[derive(Debug, Serialize)]
pub struct RestartRow {
    pub policy: RestartPolicy,
    pub max: u32,
    pub window_ms: u64,
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
}

/// A grant as data: `{"kind": "file-ids", "file_ids": [...]}`, `{"kind": "vtpm",
/// "command_localities": [...], "platform": bool, "register_vcpus": n}`, ...
fn ser_grant<S: serde::Serializer>(g: &Grant, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    #[serde(tag = "kind", rename_all = "kebab-case")]
    enum Data {
        Interface,
        FileIds {
            file_ids: Vec<String>,
        },
        /// Devices 00:NN on the PCI bus.
        PciDevices {
            devices: Vec<u8>,
        },
        Interrupts {
            interrupts: Vec<InterruptRow>,
        },
        Vtpm {
            command_localities: Vec<u8>,
            platform: bool,
            register_vcpus: u32,
        },
        Localities {
            localities: Vec<u8>,
        },
        GuestPartition,
        GuestMemory {
            base: u64,
            size: u64,
        },
        Doorbells {
            base: u64,
            size: u64,
        },
        FdStore {
            max: u32,
        },
    }
    let data = match g {
        Grant::Interface => Data::Interface,
        Grant::VmgsFiles(set) => Data::FileIds {
            file_ids: set
                .iter()
                .map(|id| {
                    id.name()
                        .map_or_else(|| id.index().to_string(), str::to_string)
                })
                .collect(),
        },
        Grant::PciDevices(mask) => Data::PciDevices {
            devices: (0..32u8).filter(|d| mask & (1 << d) != 0).collect(),
        },
        Grant::Interrupts(set) => Data::Interrupts {
            interrupts: set.iter().map(InterruptRow::from).collect(),
        },
        Grant::Vtpm(v) => Data::Vtpm {
            command_localities: v.commands.iter().collect(),
            platform: v.platform,
            register_vcpus: v.registers,
        },
        Grant::Localities(l) => Data::Localities {
            localities: l.iter().collect(),
        },
        Grant::GuestPartition => Data::GuestPartition,
        Grant::GuestMemory { base, size } => Data::GuestMemory {
            base: *base,
            size: *size,
        },
        Grant::Doorbells { base, size } => Data::Doorbells {
            base: *base,
            size: *size,
        },
        Grant::FdStore { max } => Data::FdStore { max: *max },
    };
    data.serialize(s)
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Guest memory a device may reach.
#[derive(Debug, Clone, Serialize)]
pub struct DmaRow {
    pub base: u64,
    pub size: u64,
    /// "shared-window" or "all".
    pub kind: &'static str,
}

pub fn rows(m: &Manifest) -> Vec<Row> {
    let plan = crate::privilege::plan(m, &crate::privilege::Runner::current());
    let capabilities = CapabilityPlan::new(&m.services, Run::MOST);
    m.services
        .iter()
        .zip(plan)
        .enumerate()
        .map(|(i, (s, p))| Row {
            uid: p.uid,
            gid: p.gid,
            ids: p.source,
            groups: p.groups.clone(),
            capabilities: crate::privilege::CAPABILITY_SETS
                .iter()
                .map(|c| (*c, Vec::new()))
                .collect(),
            securebits: crate::privilege::SECUREBIT_NAMES.to_vec(),
            seccomp_filters: p.filters,
            service: s.name.clone(),
            binary: s.binary.clone(),
            slots: capabilities
                .slots(i)
                .iter()
                .map(|slot| SlotRow {
                    slot: slot.slot,
                    kind: slot.kind.to_string(),
                    name: slot.name.clone(),
                })
                .collect(),
            serves: s.serves.iter().map(|i| i.name()).collect(),
            callers: capabilities
                .slots(i)
                .iter()
                .filter_map(|slot| match slot.source {
                    Source::Served(link) => Some(&capabilities.links[link.0]),
                    _ => None,
                })
                .map(|link| Caller {
                    service: m.services[link.client].name.clone(),
                    endpoint: link.interface.name(),
                })
                .collect(),
            calls: s.calls.iter().map(|i| i.name()).collect(),
            regions: s.regions.clone(),
            files: s.files.clone(),
            keys: s
                .keys
                .iter()
                .map(|k| KeyRow {
                    key: k.clone(),
                    sealed: k.is_sealed(),
                    sealing: k.is_sealed().then_some(m.attest.sealing),
                })
                .collect(),
            listen: s.listen.clone(),
            taps: s.taps.clone(),
            fd_store: capabilities
                .slots(i)
                .iter()
                .find_map(|slot| match slot.grant {
                    Grant::FdStore { max } => Some(FdStoreRow {
                        max,
                        slot: slot.slot,
                    }),
                    _ => None,
                }),
            client_grants: m
                .services
                .iter()
                .flat_map(|c| {
                    c.grants
                        .iter()
                        .filter(|(i, _)| s.serves.contains(i))
                        .map(move |(i, g)| ClientGrant {
                            client: c.name.clone(),
                            endpoint: i.name(),
                            grant: *g,
                        })
                })
                .collect(),
            call_grants: s
                .grants
                .iter()
                .map(|(i, g)| CallGrant {
                    endpoint: i.name(),
                    grant: *g,
                })
                .collect(),
            mmio: s.mmio.clone(),
            pio: s.pio.clone(),
            interrupts: capabilities
                .slots(i)
                .iter()
                .filter_map(|slot| match slot.source {
                    Source::GuestInterrupt(irq) => Some(InterruptRow::from(irq)),
                    _ => None,
                })
                .collect(),
            guest: if capabilities.guest_interface(i) == Some(ipc_defs::Interface::Intercept) {
                Some(
                    "accesses to its ranges and to every unowned port and MMIO address, MSRs, \
                     hypercalls, vCPU events"
                        .into(),
                )
            } else if capabilities.guest_interface(i) == Some(ipc_defs::Interface::Vtpm) {
                Some(
                    "accesses to its ranges, as client `guest` (the partition's channel; its grant \
                     comes from the microkernel, not from a manifest entry): the register interface \
                     for the partition's own vCPUs only (ids below `run --vcpus`), no commands or \
                     platform signals of its own; while it runs, front ends' platform signals that \
                     would change the TPM are refused"
                        .into(),
                )
            } else if capabilities.guest_interface(i).is_some() {
                let pci = s
                    .pci_device
                    .map(|d| format!(" and to PCI function 00:{d:02x}.0's configuration space"))
                    .unwrap_or_default();
                Some(format!("accesses to its ranges{pci}"))
            } else {
                None
            },
            dma: capabilities.slots(i).iter().find_map(|slot| match slot.grant {
                Grant::GuestMemory { base, size } => Some(DmaRow {
                    base,
                    size,
                    kind: s.guest_memory.map_or("", |g| g.name()),
                }),
                _ => None,
            }),
            doorbells: capabilities.slots(i).iter().find_map(|slot| match slot.grant {
                Grant::Doorbells { base, size } => Some(DeviceRange { base, size }),
                _ => None,
            }),
            microkernel: match (
                capabilities.platform == Some(i),
                capabilities.paravisor_attest == Some(i),
            ) {
                (true, _) => Some(format!(
                    "holds the platform (reports and derived keys, served by the microkernel); the microkernel calls it as client `paravisor` (seal/unseal of sealed keys, `attest report`); sealing policy {}{}",
                    m.attest.sealing.name(),
                    m.attest
                        .key_release
                        .map(|a| format!(", key release by the broker at {a}"))
                        .unwrap_or_default()
                )),
                (false, true) => Some(
                    "the microkernel calls it as client `paravisor` (no platform capability: reports and keys are refused)".into(),
                ),
                _ => None,
            },
            memory_bytes: s.limits.memory,
            open_files: s.limits.open_files,
            restart: RestartRow {
                policy: s.restart.policy,
                max: s.restart.max,
                window_ms: millis(s.restart.window),
                backoff_ms: millis(s.restart.backoff),
                max_backoff_ms: millis(s.restart.max_backoff),
            },
            watchdog_ms: millis(s.watchdog),
            namespaces: (Namespaces::all() - Namespaces::USER).names(),
            syscalls_base: profiles::BASE.to_vec(),
            syscalls_extra: s.syscalls.clone(),
            syscalls_granted: profiles::GrantRules::of(s, capabilities.slots(i)).describe(),
        })
        .collect()
}

/// The text forms of a row's lists, as the matrix prints them.
impl Row {
    fn slots_text(&self) -> Vec<String> {
        self.slots
            .iter()
            .map(|s| match s.name == s.kind {
                true => format!("{} {}", s.slot, s.kind),
                false => format!("{} {} {}", s.slot, s.kind, s.name),
            })
            .collect()
    }

    fn callers_text(&self) -> Vec<String> {
        self.callers
            .iter()
            .map(|c| format!("{}->{}", c.service, c.endpoint))
            .collect()
    }

    fn regions_text(&self) -> Vec<String> {
        self.regions
            .iter()
            .map(|r| format!("{} ({})", r.name, format_size(r.size)))
            .collect()
    }

    fn files_text(&self) -> Vec<String> {
        self.files
            .iter()
            .map(|f| {
                format!(
                    "{} = {} ({}{})",
                    f.name,
                    f.path.display(),
                    match f.access {
                        ipc_defs::capability::FileAccess::ReadOnly => "ro",
                        ipc_defs::capability::FileAccess::ReadWrite => "rw",
                    },
                    match &f.missing {
                        Missing::Error => String::new(),
                        Missing::Create => ", created empty if missing".into(),
                        Missing::CreateVmgs { key, .. } =>
                            format!(", created as a VMGS encrypted with key {key} if missing"),
                    }
                )
            })
            .collect()
    }

    fn keys_text(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| match (&k.key.path, k.sealing) {
                (Some(p), _) => format!("{} = {}", k.key.name, p.display()),
                (None, sealing) => format!(
                    "{} sealed in its guest-state file (HW_KEY_PROTECTOR) by the microkernel, policy {}",
                    k.key.name,
                    sealing.map_or("-", Sealing::name)
                ),
            })
            .collect()
    }

    fn listen_text(&self) -> Vec<String> {
        // Localities mean something to a TPM front end only.
        let tpm = self.calls.contains(&"vtpm") || self.serves.contains(&"vtpm");
        self.listen
            .iter()
            .map(|l| {
                format!(
                    "{} = {} ({}{}; off unless `run --listen {}`)",
                    l.name,
                    l.address,
                    if tpm {
                        format!("localities {}; ", l.localities)
                    } else {
                        String::new()
                    },
                    match l.address {
                        ListenAddress::Tcp(_) => "TCP: every local user can reach it",
                        ListenAddress::Unix(_) => "socket 0600 in a 0700 directory",
                    },
                    l.name
                )
            })
            .collect()
    }

    fn taps_text(&self) -> Vec<String> {
        self.taps
            .iter()
            .map(|t| {
                format!(
                    "{} (a TAP device the host names with `run --tap {}=IFNAME[@NETNS]`, none otherwise; frames with a virtio-net header: no socket, no ioctl but TUNSETOFFLOAD)",
                    t.name, t.name
                )
            })
            .collect()
    }

    fn call_grants_text(&self) -> Vec<String> {
        self.call_grants
            .iter()
            .map(|g| format!("{}: {}", g.endpoint, grant_text(&g.grant)))
            .collect()
    }

    fn client_grants_text(&self) -> Vec<String> {
        self.client_grants
            .iter()
            .map(|g| format!("{} on {}: {}", g.client, g.endpoint, grant_text(&g.grant)))
            .collect()
    }

    fn restart_text(&self) -> String {
        let r = &self.restart;
        let ms = |n: u64| format_duration(std::time::Duration::from_millis(n));
        format!(
            "{} (max {} per {}, back-off {} up to {})",
            r.policy,
            r.max,
            ms(r.window_ms),
            ms(r.backoff_ms),
            ms(r.max_backoff_ms)
        )
    }
}

fn ranges_text(ranges: &[DeviceRange]) -> Vec<String> {
    ranges
        .iter()
        .map(|r| format!("{:#x}+{:#x}", r.base, r.size))
        .collect()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(", ")
    }
}

/// The human-readable matrix.
pub fn text(m: &Manifest) -> String {
    let rows = rows(m);
    let mut out = String::new();
    let _ = writeln!(out, "Privilege matrix of {}", m.path.display());
    let _ = writeln!(
        out,
        "(every service: its own uid and gid, no capabilities, no_new_privs; fresh {} namespaces; empty read-only root with only shared libraries; seccomp = common base + listed extras; all other syscalls kill the service)\n",
        (Namespaces::all() - Namespaces::USER).names().join("/")
    );
    let _ = writeln!(
        out,
        "{:<12} {:<11} {:<18} {:<36} {:<8} {:>6} {:>5}  {:<40} SYSCALLS (base +)",
        "SERVICE", "SERVES", "CALLS", "CALLED BY", "MEMORY", "FILES#", "", "RESTART"
    );
    for r in &rows {
        let _ = writeln!(
            out,
            "{:<12} {:<11} {:<18} {:<36} {:<8} {:>6} {:>5}  {:<40} {}",
            r.service,
            list(&strs(&r.serves)),
            list(&strs(&r.calls)),
            list(&r.callers_text()),
            format_size(r.memory_bytes),
            r.open_files,
            "",
            r.restart_text(),
            if r.syscalls_extra.is_empty() {
                "-".to_string()
            } else {
                r.syscalls_extra.join(", ")
            }
        );
    }
    let _ = writeln!(
        out,
        "\n(slots: the descriptors from 4 on, as each service's bootstrap record lists them when a guest runs, every declared listener is bound and every declared TAP attached; without a guest its channel and interrupts are left out and the later slots move up; a listener the run does not bind or a TAP it does not attach is left out)"
    );
    let _ = writeln!(out);
    for r in &rows {
        let _ = writeln!(out, "{} ({}):", r.service, r.binary);
        let _ = writeln!(out, "  slots:   {}", r.slots_text().join(", "));
        let _ = writeln!(out, "  regions: {}", list(&r.regions_text()));
        let _ = writeln!(out, "  files:   {}", list(&r.files_text()));
        let _ = writeln!(out, "  keys:    {}", list(&r.keys_text()));
        if r.listen.is_empty() {
            let _ = writeln!(out, "  listen:  -");
        } else {
            let _ = writeln!(
                out,
                "  listen:  (declared; bound only those `paravisor run --listen NAME` or `--listen all` asks for)"
            );
            for l in &r.listen_text() {
                let _ = writeln!(out, "           {l}");
            }
        }
        if !r.taps.is_empty() {
            let _ = writeln!(out, "  taps:    {}", r.taps_text().join("; "));
        }
        if let Some(f) = &r.fd_store {
            let _ = writeln!(
                out,
                "  fd-store: slot {}: keeps up to {} descriptors it sends (connected sockets, pipes; never a listener, a file or the store itself) across its restarts, handed back after its capabilities; dropped when it is given up or the paravisor stops",
                f.slot, f.max
            );
        }
        if !r.syscalls_granted.is_empty() {
            let _ = writeln!(
                out,
                "  syscalls granted with it: {}",
                r.syscalls_granted.join("; ")
            );
        }
        let _ = writeln!(out, "  grants:  {}", list(&r.call_grants_text()));
        if !r.client_grants.is_empty() {
            let _ = writeln!(out, "  clients: {}", r.client_grants_text().join("; "));
        }
        let _ = writeln!(out, "  mmio:    {}", list(&ranges_text(&r.mmio)));
        let _ = writeln!(out, "  pio:     {}", list(&ranges_text(&r.pio)));
        if !r.interrupts.is_empty() {
            let _ = writeln!(
                out,
                "  interrupts: {} (wired to the guest; raised only as granted)",
                r.interrupts
                    .iter()
                    .map(|i| Interrupt::from(*i).to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if let Some(g) = &r.guest {
            let _ = writeln!(out, "  guest:   {g}");
        }
        if let Some(d) = &r.dma {
            let _ = writeln!(
                out,
                "  dma:     guest memory {:#x}..{:#x} only ({}); nothing else of the guest's",
                d.base,
                d.base + d.size,
                d.kind
            );
        }
        if let Some(d) = &r.doorbells {
            let _ = writeln!(
                out,
                "  doorbells: {} at {:#x}..{:#x} (inside its own mmio), delivered as eventfd signals while the device arms them",
                d.size / 4,
                d.base,
                d.base + d.size
            );
        }
        if let Some(k) = &r.microkernel {
            let _ = writeln!(out, "  microkernel: {k}");
        }
        let _ = writeln!(
            out,
            "  watchdog: {}",
            format_duration(std::time::Duration::from_millis(r.watchdog_ms))
        );
        let _ = writeln!(
            out,
            "  runs as: uid {} gid {} ({}), supplementary groups: {}; no capability in any set; {} seccomp filters",
            r.uid,
            r.gid,
            match r.ids {
                crate::privilege::IdSource::Derived => "derived from its name",
                crate::privilege::IdSource::Manifest => "the manifest's `user`",
                crate::privilege::IdSource::Microkernel => "the paravisor's own: not root",
            },
            if r.groups.is_empty() {
                "none".to_string()
            } else {
                r.groups
                    .iter()
                    .map(|g| g.to_string())
                    .collect::<Vec<_>>()
                    .join(" ")
            },
            r.seccomp_filters
        );
    }
    let _ = writeln!(
        out,
        "\ncommon syscall base ({}): {}",
        profiles::BASE.len(),
        profiles::BASE.join(" ")
    );
    let _ = writeln!(
        out,
        "\nidentity of every service: {}; capabilities: inheritable, permitted, effective, bounding and ambient sets empty; securebits: {} (all locked); not dumpable",
        crate::privilege::Runner::current().describe(),
        crate::privilege::SECUREBIT_NAMES.join(", ")
    );
    let _ = writeln!(
        out,
        "\nthe microkernel's threads, each under a seccomp filter of its own (services are cloned by the spawner and inherit its filter; vCPU threads inherit the supervisor's):"
    );
    for t in thread_profiles(m) {
        let names = t.names();
        let _ = writeln!(
            out,
            "  {:?} ({} filter(s); outside the list: {}): {} syscalls: {}{}",
            t.thread,
            t.thread.filters(),
            t.violation,
            names.len(),
            names.join(" "),
            if t.refused.is_empty() {
                String::new()
            } else {
                format!("; refused with ENOSYS: {}", t.refused.join(" "))
            }
        );
    }
    out.push_str(&configuration_text(m));
    out
}

/// Which of the configuration is measured and which the host chooses (`paravisor audit`).
pub fn configuration_text(m: &Manifest) -> String {
    let c = configuration(m);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nmeasured configuration (the launch log's \"manifest\" entry is the SHA-384 of its canonical form, {} bytes, SHA-384 {}..; `paravisor measure --json` prints it as \"config\"; comments, layout and key order do not count):",
        c["measured_bytes"], &c["measured_sha384"].as_str().unwrap_or_default()[..16]
    );
    let _ = writeln!(out, "  top level: {}", list_of(&c["measured"]));
    let _ = writeln!(
        out,
        "  per service: {}",
        list_of(&c["measured_per_service"])
    );
    let _ = writeln!(
        out,
        "host settings (not measured; the manifest's value is a default, `paravisor run --host FILE` overrides it, flags override both):"
    );
    for h in c["host_settings"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<13} {} (default: {})",
            h["key"].as_str().unwrap_or_default(),
            h["what"].as_str().unwrap_or_default(),
            h["manifest_default"].as_str().unwrap_or("none")
        );
    }
    out
}

fn list_of(v: &serde_json::Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// [`configuration_text`] for machines: the measured keys, the canonical form's length and
/// SHA-384, and each host setting with the manifest's default.
pub fn configuration(m: &Manifest) -> serde_json::Value {
    use sha2::Digest;
    let measured = m.measured_config();
    let bytes = m.measured_bytes();
    let keys = |v: &serde_json::Value| -> Vec<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    let per_service = measured["services"].get(0).map(keys).unwrap_or_default();
    let listeners: Vec<String> = m
        .services
        .iter()
        .flat_map(|s| s.listen.iter().map(|l| format!("{} {}", l.name, l.address)))
        .collect();
    let taps: Vec<String> = m
        .services
        .iter()
        .flat_map(|s| s.taps.iter().map(|t| format!("{} ({})", t.name, s.name)))
        .collect();
    let defaults = |key: &str| -> Option<String> {
        match key {
            "state-dir" => Some(m.state_dir.display().to_string()),
            "platform-dir" => Some(
                m.attest
                    .platform_dir
                    .as_ref()
                    .map_or("\"platform\" next to the state directory".into(), |d| {
                        d.display().to_string()
                    }),
            ),
            "key-release" => m.attest.key_release.map(|a| a.to_string()),
            "listen" => Some(if listeners.is_empty() {
                "none declared".into()
            } else {
                format!(
                    "none bound unless asked; declared: {}",
                    listeners.join(", ")
                )
            }),
            "taps" => Some(if taps.is_empty() {
                "none declared".into()
            } else {
                format!("none attached unless named; declared: {}", taps.join(", "))
            }),
            "log-format" => Some("text".into()),
            _ => None,
        }
    };
    serde_json::json!({
        "measured": keys(&measured),
        "measured_per_service": per_service,
        "measured_bytes": bytes.len(),
        "measured_sha384": crate::util::hex(&sha2::Sha384::digest(&bytes)),
        "host_settings": crate::manifest::HOST_SETTINGS.iter().map(|(key, what)| serde_json::json!({
            "key": key,
            "what": what,
            "manifest_default": defaults(key),
        })).collect::<Vec<_>>(),
    })
}

/// The microkernel's thread filters a run of `m` installs (the pid a supervisor may
/// signal is its own; shown as 0 here).
pub fn thread_profiles(m: &Manifest) -> Vec<crate::thread_filters::ThreadProfile> {
    crate::thread_filters::all(m, 0)
}
