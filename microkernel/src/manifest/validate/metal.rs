//! The pass over `[metal]`: each `[[metal.task]]` on its own (name, program, heap, stack,
//! args, and its grants: its `[[service]]`'s, or stated with the service syntax), then the
//! rules that span the image's tasks (an endpoint served by one task, every call served by
//! a task, each VMGS file id granted to one client), and last the task table itself, laid
//! out by [`crate::metal::MetalPlan`]: what `paravisor check` accepts is exactly what
//! `paravisor metal build` can lay out (the contract's bounds, the slot window, the one-page
//! boot record).
//!
//! The hosted passes and this one do not meet: a service that is not a task is not in the
//! image, and a task's endpoints are judged against the other tasks only.

use std::collections::BTreeMap;
use std::ops::Range;

use ipc_defs::bootstrap::MAX_NAME;
use ipc_defs::capability::Grant;
use ipc_defs::metal::round_up;
use ipc_defs::metal::PAGE;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::Interface;
use toml::Spanned;

use super::Seen;
use super::Validator;
use crate::manifest::schema::RawMetal;
use crate::manifest::schema::RawMetalTask;
use crate::manifest::values::format_size;
use crate::manifest::values::line_col;
use crate::manifest::values::parse_size;
use crate::manifest::values::valid_name;
use crate::manifest::HostedOnly;
use crate::manifest::MetalTask;
use crate::manifest::Missing;
use crate::manifest::RegionGrant;
use crate::manifest::Restart;
use crate::manifest::RestartPolicy;
use crate::manifest::ServiceSpec;
use crate::manifest::DEFAULT_TASK_HEAP;
use crate::manifest::DEFAULT_TASK_STACK;
use crate::manifest::MAX_TASK_ARGS;
use crate::manifest::MAX_TASK_HEAP;
use crate::manifest::MAX_TASK_STACK;
use crate::manifest::RESERVED_NAMES;

/// Longest program name: a cargo bin name, as the builder passes it to `cargo --bin`.
const MAX_PROGRAM: usize = 64;

impl Validator<'_> {
    /// `[metal]`: its tasks in the order written (their task indices), each judged on its
    /// own, then together, then laid out.
    pub(super) fn metal(
        &mut self,
        raw: Option<RawMetal>,
        services: &[ServiceSpec],
        ring_capacity: u32,
    ) -> Vec<MetalTask> {
        let Some(raw) = raw else {
            return Vec::new();
        };
        // Where `[metal]` (or the first `[[metal.task]]`) is written: the toml crate gives no
        // span for a table made of dotted headers.
        let metal_span = self.source.find("[metal").map_or(0..0, |at| at..at + 1);
        if raw.task.is_empty() {
            self.error(
                metal_span.clone(),
                "[metal] describes no task",
                "add [[metal.task]] tables (name, program), or remove [metal]",
            );
        }
        let before = self.diagnostics.len();
        let mut seen = Seen::default();
        let mut tasks = Vec::new();
        let mut spans = Vec::new();
        for t in raw.task {
            spans.push(t.get_ref().name.span());
            tasks.push(self.metal_task(t, services, &mut seen));
        }
        for (client, endpoint, span) in seen.pending_calls {
            if !seen.servers.contains_key(&endpoint) {
                self.error(
                    span,
                    format!("task \"{client}\" calls \"{endpoint}\", but no metal task serves it"),
                    format!("add a [[metal.task]] that serves \"{endpoint}\" (the service that serves it, by its name), or remove the call"),
                );
            }
        }
        self.metal_file_owners(&tasks, &seen.call_spans);
        // The layout needs a consistent set of tasks; it is judged once the rest holds.
        if self.diagnostics.len() == before {
            if let Err(e) = crate::metal::MetalPlan::new(&tasks, ring_capacity) {
                let span = e
                    .task()
                    .and_then(|t| spans.get(t).cloned())
                    .unwrap_or(metal_span);
                self.error(span, e.to_string(), e.help());
            }
        }
        tasks
    }

    /// One `[[metal.task]]`.
    fn metal_task(
        &mut self,
        raw: Spanned<RawMetalTask>,
        services: &[ServiceSpec],
        seen: &mut Seen,
    ) -> MetalTask {
        let t = raw.into_inner();
        let name = t.name.get_ref().clone();
        self.task_name(&t.name, seen);
        let program = self.program(&t.program);
        let args = match &t.args {
            Some(a) if a.get_ref().len() > MAX_TASK_ARGS => {
                self.error(
                    a.span(),
                    format!(
                        "args of task \"{name}\" are {} bytes long",
                        a.get_ref().len()
                    ),
                    format!("at most {MAX_TASK_ARGS} bytes travel in the task's boot record"),
                );
                String::new()
            }
            Some(a) => a.get_ref().clone(),
            None => String::new(),
        };
        let heap = self.task_size(t.heap.as_ref(), "heap", DEFAULT_TASK_HEAP, MAX_TASK_HEAP);
        let stack = self.task_size(
            t.stack.as_ref(),
            "stack",
            DEFAULT_TASK_STACK,
            MAX_TASK_STACK,
        );
        let mut task = MetalTask {
            name: name.clone(),
            program,
            args,
            heap,
            stack,
            from_service: false,
            serves: Vec::new(),
            calls: Vec::new(),
            grants: BTreeMap::new(),
            regions: Vec::new(),
            ram_disks: Vec::new(),
            restart: Restart {
                policy: RestartPolicy::Never,
                max: 0,
                window: std::time::Duration::from_secs(1),
                backoff: crate::manifest::MIN_BACKOFF,
                max_backoff: crate::manifest::MIN_BACKOFF,
            },
            hosted_only: Vec::new(),
        };
        match services.iter().find(|s| s.name == name) {
            Some(service) => self.service_task(&mut task, service, &t, seen),
            None => {
                if let Some(serves) = &t.serves {
                    task.serves = self.serves(serves.get_ref(), &name, seen);
                }
                if let Some(calls) = &t.calls {
                    (task.calls, task.grants) =
                        self.calls(calls.get_ref(), &name, &task.serves, seen);
                }
                if let Some(regions) = &t.regions {
                    task.regions = self.regions(regions.get_ref());
                }
                match &t.restart {
                    Some(r) => task.restart = self.restart(r.get_ref()),
                    None => self.error(
                        t.name.span(),
                        format!("task \"{name}\" names no [[service]] and has no `restart`"),
                        "add restart = { policy = \"always\", max = 5, window = \"60s\", backoff = \"50ms\" }, or name the [[service]] it is",
                    ),
                }
            }
        }
        for r in task.regions.iter_mut().chain(task.ram_disks.iter_mut()) {
            r.size = round_up(r.size);
        }
        task
    }

    /// A task that is the `[[service]]` of its name: that service's endpoints, call grants,
    /// regions and restart policy; each file with a size (a guest-state file) a RAM disk;
    /// what only the hosted platform has recorded as left out. The service syntax's keys
    /// are refused here: the service is the one statement of its grants.
    fn service_task(
        &mut self,
        task: &mut MetalTask,
        service: &ServiceSpec,
        raw: &RawMetalTask,
        seen: &mut Seen,
    ) {
        let name = &service.name;
        let own_keys = [
            ("serves", raw.serves.as_ref().map(Spanned::span)),
            ("calls", raw.calls.as_ref().map(Spanned::span)),
            ("regions", raw.regions.as_ref().map(Spanned::span)),
            ("restart", raw.restart.as_ref().map(Spanned::span)),
        ];
        for (key, span) in own_keys {
            if let Some(span) = span {
                self.error(
                    span,
                    format!("task \"{name}\" is the service \"{name}\": its `{key}` is the service's"),
                    "remove it here and change the [[service]], or give the task a name of its own to state its own grants",
                );
            }
        }
        let span = raw.name.span();
        for &i in &service.serves {
            self.task_serves(i, name, span.clone(), seen);
        }
        for &i in &service.calls {
            seen.pending_calls.push((name.clone(), i, span.clone()));
        }
        if service.grants.contains_key(&Interface::Vmgs) {
            seen.call_spans.insert(name.clone(), span.clone());
        }
        task.from_service = true;
        task.serves = service.serves.clone();
        task.calls = service.calls.clone();
        task.grants = service.grants.clone();
        task.regions = service.regions.clone();
        task.ram_disks = service
            .files
            .iter()
            .filter_map(|f| match &f.missing {
                Missing::CreateVmgs { size, .. } => Some(RegionGrant {
                    name: f.name.clone(),
                    size: *size,
                }),
                _ => None,
            })
            .collect();
        for disk in &task.ram_disks {
            if task.regions.iter().any(|r| r.name == disk.name) {
                self.error(
                    span.clone(),
                    format!(
                        "task \"{name}\": its RAM disk \"{}\" (a file of the service) has the name of one of its regions",
                        disk.name
                    ),
                    "rename the file or the region in the [[service]]: a task's regions are found by name",
                );
            }
        }
        task.restart = service.restart.clone();
        task.hosted_only = hosted_only(service);
    }

    /// An endpoint a service-backed task serves: one task per endpoint.
    fn task_serves(&mut self, i: Interface, name: &str, span: Range<usize>, seen: &mut Seen) {
        if let Some((other, first)) = seen.servers.get(&i) {
            let (line, _) = line_col(self.source, first.start);
            self.error(
                span,
                format!("endpoint \"{i}\" is served twice: by \"{other}\" (line {line}) and by \"{name}\""),
                "exactly one metal task may serve an endpoint; remove one of the two",
            );
        } else {
            seen.servers.insert(i, (name.to_string(), span));
        }
    }

    /// A task's name: valid, not reserved, and not another task's.
    fn task_name(&mut self, raw: &Spanned<String>, seen: &mut Seen) {
        let name = raw.get_ref();
        if !valid_name(name) {
            self.error(
                raw.span(),
                format!("task name \"{name}\" is not a valid name"),
                format!("use 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
            );
        } else if RESERVED_NAMES.contains(&name.as_str()) {
            self.error(
                raw.span(),
                format!("task name \"{name}\" is reserved"),
                format!(
                    "the paravisor itself uses {}; pick another name",
                    RESERVED_NAMES.join(", ")
                ),
            );
        }
        if let Some(first) = seen.names.get(name) {
            let (line, _) = line_col(self.source, first.start);
            self.error(
                raw.span(),
                format!("task \"{name}\" is defined twice (first at line {line})"),
                "give each [[metal.task]] a unique name",
            );
        } else {
            seen.names.insert(name.clone(), raw.span());
        }
    }

    /// `program`: a cargo bin name (the builder checks that the task package has it).
    fn program(&mut self, raw: &Spanned<String>) -> String {
        let p = raw.get_ref();
        let ok = !p.is_empty()
            && p.len() <= MAX_PROGRAM
            && p.starts_with(|c: char| c.is_ascii_lowercase())
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            self.error(
                raw.span(),
                format!("program \"{p}\" is not a program name"),
                format!("name a bin of the task package (services/metal, package pv-metal-tasks), e.g. \"pv-metal-client\": 1 to {MAX_PROGRAM} characters from a-z, 0-9, '-' and '_', not a path"),
            );
        }
        p.clone()
    }

    /// `heap` or `stack`: a size from a page to `max`, rounded up to whole pages.
    fn task_size(
        &mut self,
        raw: Option<&Spanned<String>>,
        what: &str,
        default: u64,
        max: u64,
    ) -> u64 {
        let Some(raw) = raw else {
            return default;
        };
        match parse_size(raw.get_ref()) {
            Some(n) if (1..=max).contains(&n) => round_up(n),
            Some(n) => {
                self.error(
                    raw.span(),
                    format!("task {what} {} is out of range", format_size(n)),
                    format!(
                        "use between {} and {} (default {})",
                        format_size(PAGE),
                        format_size(max),
                        format_size(default)
                    ),
                );
                default
            }
            None => {
                self.error(
                    raw.span(),
                    format!("task {what} \"{}\" is not a size", raw.get_ref()),
                    "write a size such as \"256K\" or \"1M\"",
                );
                default
            }
        }
    }

    /// Each VMGS file id is granted to one task: two tasks writing the same id would
    /// overwrite each other.
    fn metal_file_owners(
        &mut self,
        tasks: &[MetalTask],
        call_spans: &BTreeMap<String, Range<usize>>,
    ) {
        let mut owners: BTreeMap<FileId, &str> = BTreeMap::new();
        for t in tasks {
            let Some(Grant::VmgsFiles(set)) = t.grants.get(&Interface::Vmgs) else {
                continue;
            };
            for id in set.iter() {
                if let Some(other) = owners.insert(id, &t.name) {
                    self.error(
                        call_spans.get(&t.name).cloned().unwrap_or(0..0),
                        format!(
                            "file id {id} is granted to both metal tasks \"{other}\" and \"{}\"",
                            t.name
                        ),
                        "grant each VMGS file id to one task only",
                    );
                }
            }
        }
    }
}

/// What `service` holds on the hosted platform that a metal task has no counterpart for:
/// each such key of its `[[service]]`, with what it names.
fn hosted_only(service: &ServiceSpec) -> Vec<HostedOnly> {
    let mut out = Vec::new();
    let mut add = |key: &'static str, what: String| {
        if !what.is_empty() {
            out.push(HostedOnly { key, what });
        }
    };
    let names = |v: &mut dyn Iterator<Item = &String>| v.cloned().collect::<Vec<_>>().join(", ");
    let ranges = |v: &[crate::manifest::DeviceRange]| {
        v.iter()
            .map(|r| format!("{:#x}+{:#x}", r.base, r.size))
            .collect::<Vec<_>>()
            .join(", ")
    };
    add(
        "files",
        names(
            &mut service
                .files
                .iter()
                .filter(|f| !matches!(f.missing, Missing::CreateVmgs { .. }))
                .map(|f| &f.name),
        ),
    );
    add("keys", names(&mut service.keys.iter().map(|k| &k.name)));
    add("listen", names(&mut service.listen.iter().map(|l| &l.name)));
    add("taps", names(&mut service.taps.iter().map(|t| &t.name)));
    if let Some(store) = service.fd_store {
        add("fd-store", format!("max {}", store.max));
    }
    if service.platform {
        add("platform", "the secure processor".into());
    }
    add("mmio", ranges(&service.mmio));
    add("pio", ranges(&service.pio));
    add(
        "interrupts",
        service
            .interrupts
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", "),
    );
    if let Some(d) = service.pci_device {
        add("pci-device", format!("00:{d:02x}"));
    }
    if let Some(g) = service.guest_memory {
        add("guest-memory", g.name().into());
    }
    if let Some(d) = service.doorbells {
        add("doorbells", ranges(&[d]));
    }
    add("syscalls", service.syscalls.join(", "));
    if let Some(u) = service.user {
        add("user", format!("uid {} gid {}", u.uid, u.gid));
    }
    out
}
