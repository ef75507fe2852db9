//! The passes over what a service runs as and how it is kept: its name and binary, its limits
//! (memory; open files, which depend on who calls it, as do the capabilities that must fit
//! the bootstrap record), its syscall fragment, watchdog, restart policy and user ids; and
//! the rules of those across services (how many services, shared ids).

use std::ops::Range;
use std::time::Duration;

use ipc_defs::bootstrap::MAX_CAPABILITIES;
use ipc_defs::bootstrap::MAX_NAME;
use toml::Spanned;

use super::Seen;
use super::Validator;
use crate::manifest::schema::RawLimits;
use crate::manifest::schema::RawRestart;
use crate::manifest::schema::RawUser;
use crate::manifest::values::format_duration;
use crate::manifest::values::format_size;
use crate::manifest::values::line_col;
use crate::manifest::values::parse_duration;
use crate::manifest::values::parse_size;
use crate::manifest::values::valid_name;
use crate::manifest::Limits;
use crate::manifest::Restart;
use crate::manifest::RestartPolicy;
use crate::manifest::ServiceSpec;
use crate::manifest::BASE_DESCRIPTORS;
use crate::manifest::DEFAULT_MAX_BACKOFF;
use crate::manifest::DEFAULT_WATCHDOG;
use crate::manifest::FORBIDDEN_SYSCALLS;
use crate::manifest::MAX_BACKOFF;
use crate::manifest::MAX_MEMORY;
use crate::manifest::MAX_OPEN_FILES;
use crate::manifest::MAX_RESTARTS;
use crate::manifest::MAX_SERVICES;
use crate::manifest::MAX_WATCHDOG;
use crate::manifest::MAX_WINDOW;
use crate::manifest::MIN_BACKOFF;
use crate::manifest::MIN_MEMORY;
use crate::manifest::MIN_WATCHDOG;
use crate::manifest::RESERVED_NAMES;
use crate::plan::CapabilityPlan;
use crate::plan::Run;
use crate::privilege::UserSpec;

impl Validator<'_> {
    /// A service's name: valid, not reserved for the paravisor, and not another service's.
    pub(super) fn service_name(&mut self, raw: &Spanned<String>, seen: &mut Seen) {
        let name = raw.get_ref();
        if !valid_name(name) {
            self.error(
                raw.span(),
                format!("service name \"{name}\" is not a valid name"),
                format!("use 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
            );
        } else if RESERVED_NAMES.contains(&name.as_str()) {
            self.error(
                raw.span(),
                format!("service name \"{name}\" is reserved"),
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
                format!("service \"{name}\" is defined twice (first at line {line})"),
                "give each service a unique name",
            );
        } else {
            seen.names.insert(name.clone(), raw.span());
        }
    }

    /// `binary`: a plain executable name (found next to the paravisor), not a path.
    pub(super) fn binary(&mut self, raw: &Spanned<String>) -> String {
        let binary = raw.get_ref().clone();
        if binary.is_empty() || binary.contains('/') || binary.starts_with('.') {
            self.error(
                raw.span(),
                format!("binary \"{binary}\" must be a plain executable name"),
                "binaries are found next to the paravisor executable; write e.g. \"pv-vmgs\"",
            );
        }
        binary
    }

    /// `limits`: a memory limit between MIN_MEMORY and MAX_MEMORY. The open-files limit is
    /// checked once every service is known ([`Self::open_files_and_capabilities`]).
    pub(super) fn limits(
        &mut self,
        limits: &RawLimits,
        name: &str,
        service_span: &Range<usize>,
        seen: &mut Seen,
    ) -> Limits {
        let memory = match parse_size(limits.memory.get_ref()) {
            Some(n) if (MIN_MEMORY..=MAX_MEMORY).contains(&n) => n,
            Some(0) => {
                self.error(
                    limits.memory.span(),
                    "memory limit is zero",
                    format!("give at least {}M", MIN_MEMORY >> 20),
                );
                0
            }
            Some(n) => {
                self.error(
                    limits.memory.span(),
                    format!("memory limit {} is absurd", format_size(n)),
                    format!(
                        "use between {}M and {}G",
                        MIN_MEMORY >> 20,
                        MAX_MEMORY >> 30
                    ),
                );
                0
            }
            None => {
                self.error(
                    limits.memory.span(),
                    format!("memory limit \"{}\" is not a size", limits.memory.get_ref()),
                    "write a size such as \"64M\"",
                );
                0
            }
        };
        // Checked once every service is known: the serving channels depend on who calls.
        seen.pending_limits.push((
            name.to_string(),
            limits.open_files.clone(),
            service_span.clone(),
        ));
        let open_files = *limits.open_files.get_ref();
        Limits {
            memory,
            open_files: open_files.max(0) as u64,
        }
    }

    /// Each service's open-files limit is positive, at most MAX_OPEN_FILES and room for the
    /// descriptors it holds, and its capabilities fit the bootstrap record. Both depend on
    /// who calls it, so they are checked once every service is known.
    pub(super) fn open_files_and_capabilities(
        &mut self,
        pending_limits: Vec<(String, Spanned<i64>, Range<usize>)>,
        services: &[ServiceSpec],
    ) {
        // The most a run hands each service: a guest partition, every declared listener.
        let plan = CapabilityPlan::new(services, Run::MOST);
        for (name, open_files_spanned, service_span) in pending_limits {
            let Some(i) = services.iter().position(|x| x.name == name) else {
                continue;
            };
            let capabilities = plan.slots(i).len();
            let open_files = *open_files_spanned.get_ref();
            // A restart hands back every descriptor its store kept, besides its capabilities.
            let kept = services[i].fd_store.map_or(0, |f| u64::from(f.max));
            let needed = BASE_DESCRIPTORS + capabilities as u64 + kept;
            if open_files <= 0 {
                self.error(
                    open_files_spanned.span(),
                    format!("open-files limit {open_files} is zero or negative"),
                    format!("this service needs at least {needed}"),
                );
            } else if open_files as u64 > MAX_OPEN_FILES {
                self.error(
                    open_files_spanned.span(),
                    format!("open-files limit {open_files} is absurd"),
                    format!("use at most {MAX_OPEN_FILES}"),
                );
            } else if (open_files as u64) < needed {
                self.error(
                    open_files_spanned.span(),
                    format!("open-files limit {open_files} is below the {needed} descriptors this service holds"),
                    format!("raise it to at least {needed}"),
                );
            }
            if capabilities > MAX_CAPABILITIES {
                self.error(
                    service_span,
                    format!("service \"{name}\" holds {capabilities} capabilities"),
                    format!("at most {MAX_CAPABILITIES} fit the bootstrap record; split the service or its clients"),
                );
            }
        }
    }

    /// At most MAX_SERVICES services.
    pub(super) fn service_count(&mut self, services: &[ServiceSpec]) {
        if services.len() > MAX_SERVICES {
            self.error(
                0..0,
                format!("the manifest describes {} services", services.len()),
                format!("at most {MAX_SERVICES}: each runs under a uid of its own"),
            );
        }
    }

    /// `syscalls`: kernel syscall names, each once, none of the FORBIDDEN_SYSCALLS that would
    /// let a service leave its sandbox.
    pub(super) fn syscalls(&mut self, raw: &[Spanned<String>]) -> Vec<String> {
        let mut syscalls = Vec::new();
        for sc in raw {
            let sname = sc.get_ref();
            if FORBIDDEN_SYSCALLS.contains(&sname.as_str()) {
                self.error(
                    sc.span(),
                    format!("syscall \"{sname}\" would let the service leave its sandbox"),
                    "no service may be granted it; do the work in the microkernel and pass a capability instead",
                );
            } else if sname.parse::<syscalls::Sysno>().is_err() {
                self.error(
                    sc.span(),
                    format!("\"{sname}\" is not an x86_64 syscall name"),
                    "use the kernel's name, e.g. \"pwrite64\" or \"fdatasync\"",
                );
            } else if syscalls.contains(sname) {
                self.error(
                    sc.span(),
                    format!("syscall \"{sname}\" is listed twice"),
                    "list it once",
                );
            } else {
                syscalls.push(sname.clone());
            }
        }
        syscalls
    }

    /// `watchdog`: a duration between MIN_WATCHDOG and MAX_WATCHDOG (DEFAULT_WATCHDOG when
    /// absent).
    pub(super) fn watchdog(&mut self, raw: Option<&Spanned<String>>) -> Duration {
        match raw {
            None => DEFAULT_WATCHDOG,
            Some(w) => match parse_duration(w.get_ref()) {
                Some(d) if (MIN_WATCHDOG..=MAX_WATCHDOG).contains(&d) => d,
                _ => {
                    self.error(
                        w.span(),
                        format!("watchdog \"{}\" is not a duration between 1s and 1h", w.get_ref()),
                        "write e.g. \"10s\"; a hung service is killed after this long without answering",
                    );
                    DEFAULT_WATCHDOG
                }
            },
        }
    }

    pub(super) fn restart(&mut self, r: &RawRestart) -> Restart {
        let policy = match r.policy.get_ref().as_str() {
            "always" => RestartPolicy::Always,
            "on-failure" => RestartPolicy::OnFailure,
            "never" => RestartPolicy::Never,
            other => {
                self.error(
                    r.policy.span(),
                    format!("restart policy \"{other}\" is unknown"),
                    "use \"always\", \"on-failure\" or \"never\"",
                );
                RestartPolicy::Never
            }
        };
        let max = *r.max.get_ref();
        if !(0..=MAX_RESTARTS as i64).contains(&max) {
            self.error(
                r.max.span(),
                format!("restart max {max} is out of range"),
                format!("use 0 to {MAX_RESTARTS}"),
            );
        }
        if policy != RestartPolicy::Never && max == 0 {
            self.error(
                r.max.span(),
                format!("policy \"{policy}\" with max = 0 never restarts"),
                "use policy = \"never\", or allow at least one restart",
            );
        }
        let mut duration =
            |s: &Spanned<String>, what: &str, min: Duration, max: Duration| -> Duration {
                match parse_duration(s.get_ref()) {
                    Some(d) if d >= min && d <= max => d,
                    Some(d) => {
                        self.error(
                            s.span(),
                            format!("restart {what} {} is zero or absurd", format_duration(d)),
                            format!(
                                "use between {} and {}",
                                format_duration(min),
                                format_duration(max)
                            ),
                        );
                        min
                    }
                    None => {
                        self.error(
                            s.span(),
                            format!("restart {what} \"{}\" is not a duration", s.get_ref()),
                            "write e.g. \"100ms\", \"10s\" or \"5m\"",
                        );
                        min
                    }
                }
            };
        let window = duration(&r.window, "window", Duration::from_secs(1), MAX_WINDOW);
        let backoff = duration(&r.backoff, "backoff", MIN_BACKOFF, MAX_BACKOFF);
        let max_backoff = match &r.max_backoff {
            None => DEFAULT_MAX_BACKOFF.max(backoff),
            Some(m) => {
                let ceiling = duration(m, "max-backoff", MIN_BACKOFF, MAX_BACKOFF);
                if ceiling < backoff {
                    self.error(
                        m.span(),
                        format!(
                            "restart max-backoff {} is below backoff {}",
                            format_duration(ceiling),
                            format_duration(backoff)
                        ),
                        "the back-off doubles from `backoff` up to `max-backoff`: make it at least `backoff`",
                    );
                }
                ceiling.max(backoff)
            }
        };
        Restart {
            policy,
            max: max.clamp(0, MAX_RESTARTS as i64) as u32,
            window,
            backoff,
            max_backoff,
        }
    }

    /// `user = { uid = N, gid = N, shared = true }`: ids that are not root's, not the
    /// overflow id and not -1.
    pub(super) fn user(&mut self, raw: &Spanned<RawUser>) -> Option<UserSpec> {
        let u = raw.get_ref();
        let mut id = |v: &Spanned<i64>, what: &str| -> Option<u32> {
            match u32::try_from(*v.get_ref()) {
                Ok(0) => {
                    self.error(
                        v.span(),
                        format!("{what} 0 is root's"),
                        "a service never runs as root: pick an unused id, or remove `user` to derive one from the service's name",
                    );
                    None
                }
                Ok(crate::privilege::OVERFLOW_ID) => {
                    self.error(
                        v.span(),
                        format!("{what} {} is the overflow id (nobody/nogroup), shared by unrelated daemons", crate::privilege::OVERFLOW_ID),
                        "pick an id of the service's own",
                    );
                    None
                }
                Ok(n) if n != u32::MAX => Some(n),
                _ => {
                    self.error(
                        v.span(),
                        format!("{what} {} is not a usable id", v.get_ref()),
                        format!(
                            "use 1 to {} (not {})",
                            u32::MAX - 1,
                            crate::privilege::OVERFLOW_ID
                        ),
                    );
                    None
                }
            }
        };
        let uid = id(&u.uid, "uid");
        let gid = match &u.gid {
            Some(g) => id(g, "gid"),
            None => uid,
        };
        Some(UserSpec {
            uid: uid?,
            gid: gid?,
            shared: u.shared.as_ref().is_some_and(|b| *b.get_ref()),
        })
    }

    /// Two services with the same uid or gid could signal and trace each other: an error
    /// unless both say `shared = true`.
    pub(super) fn shared_ids(&mut self, users: &[(String, UserSpec, Range<usize>)]) {
        for (i, (name, spec, span)) in users.iter().enumerate() {
            for (other, o, first) in &users[..i] {
                for (what, mine, theirs) in [("uid", spec.uid, o.uid), ("gid", spec.gid, o.gid)] {
                    if mine == theirs && !(spec.shared && o.shared) {
                        let (line, _) = line_col(self.source, first.start);
                        self.error(
                            span.clone(),
                            format!("service \"{name}\" has {what} {mine}, as \"{other}\" (line {line}) has"),
                            "give each service ids of its own (or remove `user` to derive them), or write `shared = true` in both if they must share",
                        );
                    }
                }
            }
        }
    }
}
