//! `paravisor audit`: the privilege matrix an auditor reads, one row per service.

use std::fmt::Write;

use serde::Serialize;

use crate::manifest::format_duration;
use crate::manifest::format_size;
use crate::manifest::grant_text;
use crate::manifest::Manifest;
use crate::manifest::Missing;
use crate::profiles;
use crate::sandbox::Namespaces;

/// One service's privileges, as printed.
#[derive(Debug, Serialize)]
pub struct Row {
    pub service: String,
    pub binary: String,
    pub serves: Vec<String>,
    /// Services that may call this one, by endpoint.
    pub callers: Vec<String>,
    pub calls: Vec<String>,
    pub regions: Vec<String>,
    pub files: Vec<String>,
    pub keys: Vec<String>,
    pub listen: Vec<String>,
    /// What each call reaches beyond its endpoint (e.g. `vmgs: file-ids [...]`).
    pub call_grants: Vec<String>,
    /// What each client may reach of this service's endpoints (e.g. the vmgs file ids).
    pub client_grants: Vec<String>,
    pub mmio: Vec<String>,
    pub pio: Vec<String>,
    /// Guest interrupt lines the service holds (eventfds wired to the VM: intercept only).
    pub interrupts: Vec<String>,
    /// What the guest partition sends it, when a guest runs.
    pub guest: Option<String>,
    /// What the microkernel itself holds with it: the platform capability, its own channel.
    pub microkernel: Option<String>,
    pub memory: String,
    pub open_files: u64,
    pub restart: String,
    pub watchdog: String,
    pub namespaces: Vec<&'static str>,
    pub syscalls_base: Vec<&'static str>,
    pub syscalls_extra: Vec<String>,
    /// The uid and gid it runs as, and where they come from.
    pub uid: u32,
    pub gid: u32,
    pub ids: crate::privilege::IdSource,
    /// Supplementary groups (none as root).
    pub groups: Vec<u32>,
    /// The capability sets, each empty.
    pub capabilities: Vec<String>,
    pub securebits: Vec<&'static str>,
    /// Seccomp filters stacked on it (spawner's, loader, its own).
    pub seccomp_filters: u32,
}

pub fn rows(m: &Manifest) -> Vec<Row> {
    let plan = crate::privilege::plan(m, &crate::privilege::Runner::current());
    m.services
        .iter()
        .zip(plan)
        .map(|(s, p)| Row {
            uid: p.uid,
            gid: p.gid,
            ids: p.source,
            groups: p.groups.clone(),
            capabilities: crate::privilege::CAPABILITY_SETS
                .iter()
                .map(|c| format!("{c}: none"))
                .collect(),
            securebits: crate::privilege::SECUREBIT_NAMES.to_vec(),
            seccomp_filters: p.filters,
            service: s.name.clone(),
            binary: s.binary.clone(),
            serves: s.serves.iter().map(|i| i.name().to_string()).collect(),
            callers: m
                .services
                .iter()
                .flat_map(|c| {
                    c.calls
                        .iter()
                        .filter(|i| s.serves.contains(i))
                        .map(move |i| format!("{}->{}", c.name, i))
                })
                .collect(),
            calls: s.calls.iter().map(|i| i.name().to_string()).collect(),
            regions: s
                .regions
                .iter()
                .map(|r| format!("{} ({})", r.name, format_size(r.size)))
                .collect(),
            files: s
                .files
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
                .collect(),
            keys: s
                .keys
                .iter()
                .map(|k| match &k.path {
                    Some(p) => format!("{} = {}", k.name, p.display()),
                    None => format!(
                        "{} sealed in its guest-state file (HW_KEY_PROTECTOR) by the microkernel, policy {}",
                        k.name,
                        m.attest.sealing.name()
                    ),
                })
                .collect(),
            listen: s
                .listen
                .iter()
                .map(|l| {
                    format!(
                        "{} = {} (localities {}; {}; off unless `run --listen {}`)",
                        l.name,
                        l.address,
                        l.localities,
                        match l.address {
                            crate::manifest::ListenAddress::Tcp(_) =>
                                "TCP: every local user can reach it",
                            crate::manifest::ListenAddress::Unix(_) =>
                                "socket 0600 in a 0700 directory",
                        },
                        l.name
                    )
                })
                .collect(),
            client_grants: m
                .services
                .iter()
                .flat_map(|c| {
                    c.grants
                        .iter()
                        .filter(|(i, _)| s.serves.contains(i))
                        .map(move |(i, g)| format!("{} on {i}: {}", c.name, grant_text(g)))
                })
                .collect(),
            call_grants: s
                .grants
                .iter()
                .map(|(i, g)| format!("{i}: {}", grant_text(g)))
                .collect(),
            mmio: s
                .mmio
                .iter()
                .map(|r| format!("{:#x}+{:#x}", r.base, r.size))
                .collect(),
            pio: s
                .pio
                .iter()
                .map(|r| format!("{:#x}+{:#x}", r.base, r.size))
                .collect(),
            interrupts: if s.serves.contains(&ipc_defs::Interface::Intercept) {
                crate::manifest::guest_interrupts(&m.services)
                    .iter()
                    .map(|i| i.to_string())
                    .collect()
            } else {
                Vec::new()
            },
            guest: if s.serves.contains(&ipc_defs::Interface::Intercept) {
                Some(
                    "accesses to its ranges and to every unowned port and MMIO address, MSRs, \
                     hypercalls, vCPU events"
                        .into(),
                )
            } else if s.serves.contains(&ipc_defs::Interface::Vtpm)
                && (!s.mmio.is_empty() || !s.pio.is_empty())
            {
                Some(
                    "accesses to its ranges, as client `guest` (the partition's channel; its grant \
                     comes from the microkernel, not from a manifest entry): the register interface \
                     for the partition's own vCPUs only (ids below `run --vcpus`), no commands or \
                     platform signals of its own; while it runs, front ends' platform signals that \
                     would change the TPM are refused"
                        .into(),
                )
            } else if !s.mmio.is_empty() || !s.pio.is_empty() {
                Some("accesses to its ranges".into())
            } else {
                None
            },
            microkernel: match (s.platform, s.serves.contains(&ipc_defs::Interface::Attest)) {
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
            memory: format_size(s.limits.memory),
            open_files: s.limits.open_files,
            restart: format!(
                "{} (max {} per {}, back-off {} up to {})",
                s.restart.policy,
                s.restart.max,
                format_duration(s.restart.window),
                format_duration(s.restart.backoff),
                format_duration(s.restart.max_backoff)
            ),
            watchdog: format_duration(s.watchdog),
            namespaces: (Namespaces::all() - Namespaces::USER).names(),
            syscalls_base: profiles::BASE.to_vec(),
            syscalls_extra: s.syscalls.clone(),
        })
        .collect()
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
            list(&r.serves),
            list(&r.calls),
            list(&r.callers),
            r.memory,
            r.open_files,
            "",
            r.restart,
            if r.syscalls_extra.is_empty() {
                "-".to_string()
            } else {
                r.syscalls_extra.join(", ")
            }
        );
    }
    let _ = writeln!(out);
    for r in &rows {
        let _ = writeln!(out, "{} ({}):", r.service, r.binary);
        let _ = writeln!(out, "  regions: {}", list(&r.regions));
        let _ = writeln!(out, "  files:   {}", list(&r.files));
        let _ = writeln!(out, "  keys:    {}", list(&r.keys));
        if r.listen.is_empty() {
            let _ = writeln!(out, "  listen:  -");
        } else {
            let _ = writeln!(
                out,
                "  listen:  (declared; bound only those `paravisor run --listen NAME` or `--listen all` asks for)"
            );
            for l in &r.listen {
                let _ = writeln!(out, "           {l}");
            }
        }
        let _ = writeln!(out, "  grants:  {}", list(&r.call_grants));
        if !r.client_grants.is_empty() {
            let _ = writeln!(out, "  clients: {}", r.client_grants.join("; "));
        }
        let _ = writeln!(out, "  mmio:    {}", list(&r.mmio));
        let _ = writeln!(out, "  pio:     {}", list(&r.pio));
        if !r.interrupts.is_empty() {
            let _ = writeln!(
                out,
                "  interrupts: {} (wired to the guest; raised only as granted)",
                r.interrupts.join(", ")
            );
        }
        if let Some(g) = &r.guest {
            let _ = writeln!(out, "  guest:   {g}");
        }
        if let Some(k) = &r.microkernel {
            let _ = writeln!(out, "  microkernel: {k}");
        }
        let _ = writeln!(out, "  watchdog: {}", r.watchdog);
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
    out
}

/// The microkernel's thread filters a run of `m` installs (the pid a supervisor may
/// signal is its own; shown as 0 here).
pub fn thread_profiles(m: &Manifest) -> Vec<crate::thread_filters::ThreadProfile> {
    crate::thread_filters::all(m, 0)
}
