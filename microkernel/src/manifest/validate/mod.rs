//! Validation: from the schema (`Raw*`) to the model ([`Manifest`]), collecting every problem
//! as a [`Diagnostic`] instead of stopping at the first.
//!
//! [`Validator::validate`] runs the passes in the order `paravisor check` prints them: the
//! `[paravisor]` table (here), each `[[service]]` on its own, the rules that span services,
//! then `[attest]`, then `[metal]`. Each pass is a method of [`Validator`], in the file of its subject:
//! - `process`: name, binary, limits and descriptors, syscalls, watchdog, restart, user ids;
//! - `endpoints`: what a service serves and calls, and what each call grants;
//! - `grants`: files, keys, listeners, regions, TAPs and the descriptor store, and the state
//!   paths they claim;
//! - `devices`: guest address ranges, the PCI device, interrupt lines;
//! - `attest`: the `[attest]` table, the platform capability and sealed keys;
//! - `metal`: `[[metal.task]]`, the metal image's tasks and their grants, judged against
//!   each other only (the hosted platform ignores them).
//!
//! What a service's passes claim is recorded in [`Seen`] for the passes that span services.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::path::PathBuf;

use ipc_defs::capability::Grant;
use ipc_defs::layout::MAX_RING_CAPACITY;
use ipc_defs::layout::MIN_RING_CAPACITY;
use ipc_defs::Interface;
use toml::Spanned;

use crate::manifest::schema::RawManifest;
use crate::manifest::schema::RawParavisor;
use crate::manifest::schema::RawService;
use crate::manifest::values::format_size;
use crate::manifest::values::line_col;
use crate::manifest::values::parse_size;
use crate::manifest::DeviceRange;
use crate::manifest::Diagnostic;
use crate::manifest::Manifest;
use crate::manifest::ServiceSpec;
use crate::manifest::DEFAULT_RING_CAPACITY;
use crate::manifest::DEFAULT_STATE_DIR;
use crate::manifest::MIN_VMGS_RING;
use crate::privilege::UserSpec;

mod attest;
mod devices;
mod endpoints;
mod grants;
mod metal;
mod process;

/// Checks a parsed manifest and records each problem, with its place in `source`, in
/// `diagnostics`.
pub(super) struct Validator<'a> {
    pub(super) file: String,
    pub(super) source: &'a str,
    pub(super) diagnostics: Vec<Diagnostic>,
}

/// What the per-service passes record for the passes that span services: names, endpoints,
/// paths, addresses and device numbers already claimed (each later claim is checked against
/// them), and what can only be judged once every service is known.
#[derive(Default)]
struct Seen {
    /// Each service's name, where it is first defined.
    names: BTreeMap<String, Range<usize>>,
    /// Each served endpoint: its server and where it says so.
    servers: BTreeMap<Interface, (String, Range<usize>)>,
    /// Every call (client, endpoint, where), to check that some service serves it.
    pending_calls: Vec<(String, Interface, Range<usize>)>,
    /// Each service's last call that grants something: where a file-id clash points.
    call_spans: BTreeMap<String, Range<usize>>,
    /// Every granted file's path, and where.
    file_paths: Vec<(PathBuf, Range<usize>)>,
    /// Every key file's path, and where.
    key_paths: Vec<(PathBuf, Range<usize>)>,
    /// Every sealed key: (service, key, where).
    sealed_keys: Vec<(String, String, Range<usize>)>,
    /// The services that say `platform = true`, and where.
    platform_holders: Vec<(String, Range<usize>)>,
    /// TCP addresses listened on, and by which service.
    addresses: Vec<(String, std::net::SocketAddr)>,
    /// Listener names, and their service.
    listener_names: Vec<(String, String)>,
    /// TAP names, and their service.
    tap_names: Vec<(String, String)>,
    /// Every service's valid mmio ranges, and where.
    mmio: Vec<(String, DeviceRange, Range<usize>)>,
    /// Every service's valid pio ranges, and where.
    pio: Vec<(String, DeviceRange, Range<usize>)>,
    /// PCI device numbers, and their owner.
    pci_owners: Vec<(String, u8)>,
    /// Every service's own interrupt lines (`interrupts`), and where.
    own_lines: Vec<(
        String,
        ipc_defs::services::intercept::Interrupt,
        Range<usize>,
    )>,
    /// Each service's open-files limit and the service's span: the descriptors it needs
    /// depend on who calls it.
    pending_limits: Vec<(String, Spanned<i64>, Range<usize>)>,
    /// Services with `user = {...}`: their ids, and where.
    users: Vec<(String, UserSpec, Range<usize>)>,
}

impl Validator<'_> {
    pub(super) fn error(
        &mut self,
        span: Range<usize>,
        message: impl Into<String>,
        help: impl Into<String>,
    ) {
        let (line, column) = line_col(self.source, span.start);
        self.diagnostics.push(Diagnostic {
            file: self.file.clone(),
            line,
            column,
            message: message.into(),
            help: help.into(),
        });
    }

    /// Checks `raw` pass by pass, collecting every problem, and builds the manifest it
    /// describes (meaningful only when no diagnostic was recorded). The passes run in this
    /// order, which is the order `paravisor check` prints diagnostics in: the `[paravisor]`
    /// table, each service on its own, the rules that span services, `[attest]`, then `[metal]`.
    pub(super) fn validate(&mut self, path: &Path, raw: RawManifest) -> Manifest {
        let (state_dir, ring_capacity, ring_span) = self.paravisor_settings(raw.paravisor);
        let mut seen = Seen::default();
        let services = self.services(raw.service, &mut seen);
        self.unserved_calls(seen.pending_calls, &seen.servers);
        self.open_files_and_capabilities(seen.pending_limits, &services);
        self.overlaps(&seen.mmio, "mmio");
        self.overlaps(&seen.pio, "pio");
        self.shared_ids(&seen.users);
        self.service_count(&services);
        self.state_paths(&seen.file_paths, &seen.key_paths, &services);
        self.vmgs_file_owners(&services, &seen.call_spans);
        self.line_holders(&seen.own_lines, &services);
        self.vmgs_ring(ring_capacity, ring_span, &services);
        let attest = self.attest_settings(
            raw.attest,
            &services,
            &seen.sealed_keys,
            &seen.platform_holders,
        );
        let metal = self.metal(raw.metal, &services, ring_capacity);
        Manifest {
            path: path.to_path_buf(),
            state_dir,
            ring_capacity,
            services,
            attest,
            metal,
            source: self.source.to_string(),
        }
    }

    /// The `[paravisor]` table: a non-empty `state-dir`, and a `ring-capacity` that is a power
    /// of two within the ring layout's bounds. Returns the state directory, the ring capacity
    /// and where the capacity is written.
    fn paravisor_settings(
        &mut self,
        raw: Option<RawParavisor>,
    ) -> (PathBuf, u32, Option<Range<usize>>) {
        let mut state_dir = PathBuf::from(DEFAULT_STATE_DIR);
        let mut ring_capacity = DEFAULT_RING_CAPACITY;
        let mut ring_span: Option<Range<usize>> = None;
        if let Some(p) = raw {
            if let Some(dir) = p.state_dir {
                if dir.get_ref().is_empty() {
                    self.error(
                        dir.span(),
                        "state-dir is empty",
                        "name a directory, e.g. \"state\"",
                    );
                } else {
                    state_dir = PathBuf::from(dir.get_ref());
                }
            }
            if let Some(cap) = p.ring_capacity {
                ring_span = Some(cap.span());
                match parse_size(cap.get_ref()) {
                    Some(n)
                        if n.is_power_of_two()
                            && (MIN_RING_CAPACITY as u64..=MAX_RING_CAPACITY as u64)
                                .contains(&n) =>
                    {
                        ring_capacity = n as u32
                    }
                    _ => self.error(
                        cap.span(),
                        format!("ring-capacity \"{}\" is not usable", cap.get_ref()),
                        format!(
                            "use a power of two between {}K and {}M, e.g. \"64K\"",
                            MIN_RING_CAPACITY >> 10,
                            MAX_RING_CAPACITY >> 20
                        ),
                    ),
                }
            }
        }
        (state_dir, ring_capacity, ring_span)
    }

    /// With a vmgs endpoint, the ring capacity holds a full chunk (MIN_VMGS_RING).
    fn vmgs_ring(
        &mut self,
        ring_capacity: u32,
        ring_span: Option<Range<usize>>,
        services: &[ServiceSpec],
    ) {
        if ring_capacity < MIN_VMGS_RING
            && services.iter().any(|s| s.serves.contains(&Interface::Vmgs))
        {
            self.error(
                ring_span.unwrap_or(0..0),
                format!(
                    "ring-capacity {} is too small for the vmgs endpoint (its chunks need {})",
                    format_size(ring_capacity.into()),
                    format_size(MIN_VMGS_RING.into())
                ),
                format!(
                    "set ring-capacity to at least \"{}\"",
                    format_size(MIN_VMGS_RING.into())
                ),
            );
        }
    }

    /// Every `[[service]]` table, in the order written; a manifest needs at least one.
    fn services(&mut self, raw: Vec<Spanned<RawService>>, seen: &mut Seen) -> Vec<ServiceSpec> {
        if raw.is_empty() {
            self.error(
                0..0,
                "the manifest describes no service",
                "add [[service]] tables, one per service process",
            );
        }
        let mut services = Vec::new();
        for raw_service in raw {
            services.push(self.service(raw_service, seen));
        }
        services
    }

    /// One `[[service]]` table on its own: its name, binary, endpoints (it must serve or call
    /// something), grants, devices, limits, restart policy, syscalls, watchdog and user.
    /// What can only be judged against the other services is recorded in `seen`.
    fn service(&mut self, raw_service: Spanned<RawService>, seen: &mut Seen) -> ServiceSpec {
        let service_span = raw_service.span();
        let s = raw_service.into_inner();
        let name = s.name.get_ref().clone();
        self.service_name(&s.name, seen);
        let binary = self.binary(&s.binary);
        let serves = self.serves(&s.serves, &name, seen);
        let (calls, mut grants) = self.calls(&s.calls, &name, &serves, seen);
        if serves.is_empty() && calls.is_empty() {
            self.error(
                s.name.span(),
                format!("service \"{name}\" serves nothing and calls nothing"),
                "a disconnected service can do nothing useful; give it `serves` or `calls`, or remove it",
            );
        }
        let files = self.files(&s.files, &s.keys, seen);
        let keys = self.keys(&s.keys, &name, seen);
        let listen = self.listeners(&s.listen, &name, &grants, seen);
        let regions = self.regions(&s.regions);
        let taps = self.taps(&s.taps, &name, &serves, &s.syscalls, seen);
        let fd_store = self.fd_store(s.fd_store.as_ref());
        let (mmio, pio, pci_device) = self.guest_devices(&s, &name, &serves, &service_span, seen);
        let owns_device = !mmio.is_empty() || !pio.is_empty() || pci_device.is_some();
        let interrupts = self.own_interrupts(&s.interrupts, &name, &serves, owns_device);
        for line in interrupts.iter() {
            let span = s
                .interrupts
                .first()
                .map_or(service_span.clone(), |l| l.span());
            seen.own_lines.push((name.clone(), line, span));
        }
        let guest_memory = self.guest_memory(s.guest_memory.as_ref(), &name, owns_device);
        let doorbells = self.doorbells(s.doorbells.as_ref(), &name, &serves, &mmio);
        let limits = self.limits(s.limits.get_ref(), &name, &service_span, seen);
        let restart = self.restart(s.restart.get_ref());
        let syscalls = self.syscalls(&s.syscalls);
        let watchdog = self.watchdog(s.watchdog.as_ref());

        // A front end's TPM commands may use the localities its listeners are granted.
        if let Some(Grant::Vtpm(g)) = grants.get_mut(&Interface::Vtpm) {
            if !g.commands.is_empty() {
                for l in &listen {
                    g.commands = g.commands.union(l.localities);
                }
            }
        }
        let user = s.user.as_ref().and_then(|u| self.user(u));
        if let (Some(spec), Some(raw)) = (user, &s.user) {
            seen.users.push((name.clone(), spec, raw.span()));
        }
        if let Some(p) = s.platform.as_ref().filter(|p| *p.get_ref()) {
            seen.platform_holders.push((name.clone(), p.span()));
        }
        ServiceSpec {
            user,
            name,
            watchdog,
            binary,
            args: s.args,
            serves,
            calls,
            files,
            keys,
            listen,
            taps,
            fd_store,
            grants,
            regions,
            mmio,
            pio,
            interrupts,
            pci_device,
            guest_memory,
            doorbells,
            limits,
            restart,
            syscalls,
            platform: s.platform.as_ref().is_some_and(|p| *p.get_ref()),
        }
    }
}
