//! The control socket's commands (ps, logs, probe, attest, audit --live), and the live checks
//! of a running service against its plan.

use super::worker::Answer;
use super::*;

impl Supervisor {
    /// `paravisor logs SERVICE`: its recent lines after `after`, or its last `tail`.
    pub(super) fn logs(&self, service: &str, after: Option<u64>, tail: usize) -> Reply {
        let Some(s) = self.services.iter().find(|s| s.spec.name == service) else {
            return Reply::Error {
                message: format!("no service named \"{service}\""),
            };
        };
        let page = s.output.history(after, tail, LOGS_REPLY_BYTES);
        Reply::Logs {
            lines: page
                .lines
                .into_iter()
                .map(|l| crate::control::LogLine {
                    seq: l.seq,
                    source: l.source.name().into(),
                    text: l.text,
                })
                .collect(),
            missed: page.missed,
            last: page.last,
            state: s.state.name().into(),
        }
    }

    /// Answers `cmd`: at once when it only reads or changes the supervisor's state, on the
    /// control worker when it waits on a service ([`worker`]).
    pub(super) fn command(&mut self, cmd: Command) -> Answer {
        let now = match cmd {
            Command::Ps => Reply::Ps {
                services: self.ps(),
                guest: self.guest_row(),
                control: self.worker.as_ref().and_then(|w| w.busy()),
            },
            Command::Restart { service } => self.operator_restart(&service),
            Command::Logs {
                service,
                after,
                tail,
            } => self.logs(&service, after, tail),
            Command::Kill { service, signal } => self.kill(&service, signal),
            Command::LiveAudit => {
                let (checked, checks, findings) = self.live_audit();
                Reply::Audit {
                    checked,
                    checks,
                    findings,
                }
            }
            Command::Shutdown => Reply::Done {
                message: "shutting down".into(),
            },
            Command::Probe { service, endpoint } => return self.probe(&service, &endpoint),
            Command::AttestReport { report_data } => return self.attest_report(&report_data),
            Command::AttestBench { samples } => return self.attest_bench(samples),
        };
        Answer::Now(now)
    }

    /// `paravisor kill SERVICE [SIGNAL]`.
    fn kill(&self, service: &str, signal: i32) -> Reply {
        let Some(s) = self.services.iter().find(|s| s.spec.name == service) else {
            return Reply::Error {
                message: format!("no service named \"{service}\""),
            };
        };
        let Some(p) = &s.process else {
            return Reply::Error {
                message: format!("service \"{service}\" is not running ({})", s.state.name()),
            };
        };
        match sandbox::pidfd_signal(&p.pidfd, signal) {
            Ok(()) => Reply::Done {
                message: format!("sent {} to {service} (pid {})", signal_name(signal), p.pid),
            },
            Err(e) => Reply::Error {
                message: format!("cannot signal {service}: {e}"),
            },
        }
    }

    /// `paravisor probe SERVICE ENDPOINT`: the service calls the endpoint on its control
    /// channel's say-so (on the worker: the call waits up to twice the control timeout).
    fn probe(&self, service: &str, endpoint: &str) -> Answer {
        let now = |message| Answer::Now(Reply::Error { message });
        let Some(s) = self.services.iter().find(|s| s.spec.name == service) else {
            return now(format!("no service named \"{service}\""));
        };
        let Some(interface) = Interface::from_name(endpoint) else {
            return now(format!("unknown endpoint \"{endpoint}\""));
        };
        // Only a running service answers on its control channel (a starting one's first
        // answer belongs to its start).
        if s.state != State::Running {
            return now(format!(
                "service \"{service}\" is not running ({})",
                s.state.name()
            ));
        }
        let control = s.control.clone();
        let service = service.to_string();
        Answer::Later(
            "probe",
            Box::new(move || {
                let outcome = worker::lock(&control).call(
                    &ctl::Request::Probe {
                        endpoint: interface,
                    },
                    CONTROL_TIMEOUT * 2,
                );
                match outcome {
                    Ok(ctl::Response::Probe(outcome)) => Reply::Probe {
                        result: crate::control::ProbeResult::of(&outcome),
                        message: probe_text(&service, interface, outcome),
                    },
                    Ok(other) => Reply::Error {
                        message: format!("unexpected answer {other:?}"),
                    },
                    Err(e) => Reply::Error {
                        message: format!("{service} did not answer: {e}"),
                    },
                }
            }),
        )
    }

    /// `paravisor attest report`: a report from the attest service over 64 bytes, with its
    /// chain (on the worker).
    fn attest_report(&self, report_data: &str) -> Answer {
        let Some(data) = crate::util::parse_hex(report_data)
            .filter(|d| d.len() == attest::REPORT_DATA_LEN)
            .and_then(|d| Bytes::new(&d))
        else {
            return Answer::Now(Reply::Error {
                message: "report data must be 64 bytes of hex".into(),
            });
        };
        match self.attest_client() {
            Ok(client) => Answer::Later(
                "attest report",
                Box::new(move || extended_report(&client, data)),
            ),
            Err(message) => Answer::Now(Reply::Error { message }),
        }
    }

    /// `paravisor bench attest`: reports and derived keys through the attest service, then
    /// on the platform directly (the microkernel's own handle), alternating (on the worker).
    fn attest_bench(&self, samples: usize) -> Answer {
        let ready = self.attest_client().and_then(|client| {
            let (platform, launch) = self.own_platform().map_err(|e| e.to_string())?;
            Ok((client, platform, launch.facts))
        });
        let measurement = self.measurement;
        match ready {
            Ok((client, platform, facts)) => Answer::Later(
                "bench attest",
                Box::new(move || {
                    let direct = Direct {
                        platform: &platform,
                        facts,
                        measurement,
                    };
                    match bench_attest(&client, &direct, samples.clamp(1, 1_000)) {
                        Ok(l) => Reply::AttestBench(l),
                        Err(message) => Reply::Error { message },
                    }
                }),
            ),
            Err(message) => Answer::Now(Reply::Error { message }),
        }
    }

    /// The microkernel's own channel to the attest service, if that service runs.
    fn attest_client(&self) -> Result<AttestClient, String> {
        let link = self
            .attest_link
            .as_ref()
            .ok_or("the manifest has no attest service")?;
        let name = self.services[link.server].spec.name.clone();
        if self.services[link.server].state != State::Running {
            return Err(format!(
                "the attest service \"{name}\" is not running ({})",
                self.services[link.server].state.name()
            ));
        }
        Ok(AttestClient {
            name,
            end: link.client.clone(),
        })
    }

    pub(super) fn ps(&mut self) -> Vec<ServiceRow> {
        let mut rows = Vec::new();
        for i in 0..self.services.len() {
            // A service that missed its last health pings shows the counters it last gave:
            // asking it again would hold up the loop (and every service's output, restarts
            // and the watchdog) for nothing.
            let answering =
                self.services[i].last_answer.elapsed() < HEALTH_INTERVAL * 2 + HEALTH_TIMEOUT;
            if self.services[i].state == State::Running && answering {
                let stats = worker::try_lock(&self.services[i].control)
                    .map(|mut c| c.call(&ctl::Request::Stats, STATS_TIMEOUT));
                if let Some(Ok(ctl::Response::Stats(st))) = stats {
                    self.services[i].last_stats = st;
                }
            }
            let s = &self.services[i];
            let epochs = self
                .links
                .iter()
                .filter(|l| l.server == i)
                .map(|l| {
                    (
                        self.services[l.client].spec.name.clone(),
                        l.mem.channel().epoch().0,
                    )
                })
                .collect();
            rows.push(ServiceRow {
                name: s.spec.name.clone(),
                pid: s.process.as_ref().map(|p| p.pid),
                state: s.state.name().into(),
                restarts: s.restarts,
                uptime_ms: s
                    .process
                    .as_ref()
                    .map(|p| p.started.elapsed().as_millis() as u64),
                messages_in: s.last_stats.requests_in,
                messages_out: s.last_stats.responses_out,
                refused: s.last_stats.refused + self.platform_refusals(i),
                output_dropped: s.output.dropped(),
                last_exit: s.last_exit.clone(),
                namespaces: s
                    .process
                    .as_ref()
                    .map(|p| p.namespaces.names().iter().map(|n| n.to_string()).collect())
                    .unwrap_or_default(),
                epochs,
                guest_exits: self.guest.as_ref().and_then(|g| {
                    g.links
                        .iter()
                        .find(|l| l.server == i)
                        .map(|l| l.exits.load(std::sync::atomic::Ordering::Relaxed))
                }),
                backoff_ms: s.backoff.map(|d| d.as_millis() as u64),
                restart_in_ms: s
                    .restart_at
                    .map(|t| t.saturating_duration_since(Instant::now()).as_millis() as u64),
                unresponsive: s.unresponsive,
                fd_store: s.store.as_ref().map(|f| crate::control::FdStoreState {
                    kept: f.len(),
                    max: f.max(),
                    refused: f.refused,
                }),
            });
        }
        rows
    }

    /// Checks every running service against the manifest: identity, capabilities,
    /// no_new_privs, seccomp (each listed as a check made), descriptors (against its
    /// capability plan), namespaces, limits; and the microkernel's own threads' filters.
    pub(super) fn live_audit(&self) -> (Vec<String>, Vec<crate::control::Checked>, Vec<Finding>) {
        let mut checked = Vec::new();
        let mut checks = Vec::new();
        let mut findings = Vec::new();
        let record = |checks: &mut Vec<_>, findings: &mut Vec<_>, service: &str, c| {
            let c: crate::privilege::Check = c;
            if !c.ok {
                findings.push(Finding {
                    service: service.to_string(),
                    what: c.difference(),
                });
            }
            checks.push(crate::control::Checked {
                service: service.to_string(),
                check: c,
            });
        };
        for c in crate::thread_filters::check_threads(
            self.spawner.is_some(),
            self.platform_link
                .as_ref()
                .is_some_and(|l| l.server.is_some()),
            self.worker.is_some(),
        ) {
            record(&mut checks, &mut findings, "paravisor", c);
        }
        for (i, s) in self.services.iter().enumerate() {
            let Some(p) = &s.process else {
                if s.state != State::Stopped {
                    findings.push(Finding {
                        service: s.spec.name.clone(),
                        what: format!("not running ({})", s.state.name()),
                    });
                }
                continue;
            };
            if s.state == State::Starting {
                findings.push(Finding {
                    service: s.spec.name.clone(),
                    what: "starting: not checked before it answers its first ping".into(),
                });
                continue;
            }
            checked.push(s.spec.name.clone());
            for c in crate::privilege::check_pid(p.pid, &s.privilege) {
                record(&mut checks, &mut findings, &s.spec.name, c);
            }
            if let Some(store) = &s.store {
                // Its bound holds (the store refuses past it; this is the audit saying so).
                let kept = store.len();
                record(
                    &mut checks,
                    &mut findings,
                    &s.spec.name,
                    crate::privilege::Check {
                        what: "fd-store kept".into(),
                        expected: format!("at most {}", store.max()),
                        actual: kept.to_string(),
                        ok: kept <= store.max(),
                    },
                );
            }
            let expect = ExpectedProcess {
                namespaces: Namespaces::all() - Namespaces::USER,
                memory: s.spec.limits.memory,
                open_files: s.spec.limits.open_files,
                // Its capability plan's, not what the supervisor recorded handing over.
                descriptors: self.expected_descriptors(i),
                code: s.code.iter().map(|(_, _, path)| path.clone()).collect(),
                listening: s.listeners.iter().map(|b| b.listening()).collect(),
                kept: s
                    .store
                    .as_ref()
                    .map(|f| f.kept_inodes())
                    .unwrap_or_default(),
            };
            for what in check_process(p.pid, &expect)
                .into_iter()
                .chain(s.listeners.iter().flat_map(crate::listeners::check))
            {
                findings.push(Finding {
                    service: s.spec.name.clone(),
                    what,
                });
            }
        }
        (checked, checks, findings)
    }
}

/// The attest service's name and the microkernel's end of its channel, for a job.
struct AttestClient {
    name: String,
    end: Arc<Mutex<AttestEnd>>,
}

impl AttestClient {
    /// One call. A service that went down since the job was queued is named as such.
    fn call(&self, request: &attest::Request) -> Result<attest::Response, String> {
        let mut end = worker::lock(&self.end);
        let name = &self.name;
        if end.server_state() != ServerState::Up {
            return Err(format!("the attest service \"{name}\" is not running"));
        }
        match end.call(
            &ipc_defs::endpoint::Request::Service(request.clone()),
            ATTEST_TIMEOUT,
        ) {
            Ok(ipc_defs::endpoint::Response::Service(r)) => Ok(r),
            Ok(other) => Err(format!("attest service \"{name}\" answered {other:?}")),
            Err(e) => Err(format!("attest service \"{name}\": {e}")),
        }
    }
}

/// A report over `data` at the outside VMPL, with the whole certificate chain.
fn extended_report(client: &AttestClient, data: Bytes<{ attest::REPORT_DATA_LEN }>) -> Reply {
    match client.call(&attest::Request::GetExtendedReport {
        report_data: data,
        vmpl: attest::OUTSIDE_VMPL,
    }) {
        Ok(attest::Response::ExtendedReport {
            report,
            chain_len,
            chain,
        }) => {
            // A chain is a few KiB; attest is a service, its numbers are checked.
            if chain_len as usize > MAX_CHAIN {
                return Reply::Error {
                    message: format!("attest announced a {chain_len}-byte chain"),
                };
            }
            let mut certs = chain.as_slice().to_vec();
            while certs.len() < chain_len as usize {
                match client.call(&attest::Request::GetCertChain {
                    offset: certs.len() as u32,
                }) {
                    Ok(attest::Response::Chunk { total, data })
                        if !data.is_empty() && total == chain_len =>
                    {
                        certs.extend_from_slice(data.as_slice())
                    }
                    other => {
                        return Reply::Error {
                            message: format!("certificate chain: {other:?}"),
                        }
                    }
                }
            }
            Reply::Report {
                report: crate::util::hex(report.as_slice()),
                certs: String::from_utf8_lossy(&certs).into_owned(),
            }
        }
        Ok(attest::Response::Error(e)) => Reply::Error {
            message: format!("attest refused: {e}"),
        },
        Ok(other) => Reply::Error {
            message: format!("attest answered {other:?}"),
        },
        Err(e) => Reply::Error { message: e },
    }
}

/// What the benchmark's direct half signs with: the platform, this launch's facts.
struct Direct<'a> {
    platform: &'a crate::platform::Platform,
    facts: crate::snp::LaunchFacts,
    measurement: [u8; 48],
}

/// The attest benchmark's samples: each operation through the service, then directly.
fn bench_attest(
    client: &AttestClient,
    direct: &Direct,
    samples: usize,
) -> Result<crate::control::Latencies, String> {
    use crate::control::median;
    let select = crate::key_protector::sealing_select(crate::manifest::Sealing::Measurement);
    let (mut rs, mut rd, mut ks, mut kd) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..samples {
        let mut data = [0u8; 64];
        data[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        // A service's VMPL: the platform channel signs no VMPL 0.
        match client.call(&attest::Request::GetReport {
            report_data: Bytes::new(&data).expect("64 bytes"),
            vmpl: attest::SERVICE_VMPL,
        })? {
            attest::Response::Report(_) => rs.push(t.elapsed().as_secs_f64() * 1e6),
            other => return Err(describe(&other)),
        }
        let t = Instant::now();
        direct
            .platform
            .report(&crate::snp::ReportRequest {
                report_data: data,
                measurement: direct.measurement,
                host_data: [0; 32],
                vmpl: u32::from(attest::SERVICE_VMPL),
                policy: crate::snp::POLICY,
                report_id: [0; 32],
            })
            .map_err(|e| e.to_string())?;
        rd.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        match client.call(&attest::Request::GetDerivedKey {
            select,
            context: Bytes::new(&data[..8]).expect("8 bytes"),
        })? {
            attest::Response::Key(_) => ks.push(t.elapsed().as_secs_f64() * 1e6),
            other => return Err(describe(&other)),
        }
        let t = Instant::now();
        std::hint::black_box(
            direct
                .platform
                .derived_key(select, &direct.facts, &data[..32]),
        );
        kd.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(crate::control::Latencies {
        samples,
        report_service_us: median(rs),
        report_direct_us: median(rd),
        key_service_us: median(ks),
        key_direct_us: median(kd),
    })
}

pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGSYS => "SIGSYS",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGFPE => "SIGFPE",
        libc::SIGHUP => "SIGHUP",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGCONT => "SIGCONT",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

/// Parses "KILL", "SIGKILL", "kill" or "9".
pub fn parse_signal(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let up = s.to_ascii_uppercase();
    let up = up.strip_prefix("SIG").unwrap_or(&up).to_string();
    (1..=31).find(|n| signal_name(*n) == format!("SIG{up}"))
}

pub(super) fn probe_text(service: &str, endpoint: Interface, outcome: ctl::ProbeOutcome) -> String {
    match outcome {
        ctl::ProbeOutcome::Reached {
            epoch,
            round_trip_ns,
        } => {
            format!(
                "{service} -> {endpoint}: reached (epoch {epoch}, round trip {round_trip_ns} ns)"
            )
        }
        ctl::ProbeOutcome::NoCapability => {
            format!("{service} -> {endpoint}: no capability (the manifest does not let {service} call {endpoint})")
        }
        ctl::ProbeOutcome::PeerRestarted { sent_in, now } => {
            format!("{service} -> {endpoint}: peer restarted (sent in epoch {sent_in}, now {now})")
        }
        ctl::ProbeOutcome::TimedOut => format!("{service} -> {endpoint}: timed out"),
        ctl::ProbeOutcome::Failed(code) => format!("{service} -> {endpoint}: failed: {code}"),
    }
}

/// What a service process must look like.
pub struct ExpectedProcess {
    pub namespaces: Namespaces,
    pub memory: u64,
    pub open_files: u64,
    /// `(descriptor, its /proc/PID/fd link)`, from 0: stdin is `/dev/null`, stdout and stderr
    /// the pipes of the service's output (never the microkernel's own), then the capabilities.
    pub descriptors: Vec<(i32, String)>,
    /// The files it may map besides memfds: the sandbox paths of its measured loader and
    /// libraries.
    pub code: Vec<String>,
    /// Its listeners: it may hold connections accepted from them too
    /// ([`crate::listeners::accepted_sockets`]).
    pub listening: Vec<crate::listeners::Listening>,
    /// The inodes of the sockets and pipes its descriptor store keeps: it may hold those
    /// (what a restart handed back, what it gave the store since).
    pub kept: std::collections::BTreeSet<u64>,
}

/// Why a freshly started service is not sandboxed as it must be, if it is not: the first of
/// its privilege checks that fails (identity, capabilities, no_new_privs, its seccomp
/// filters: a service that skipped its own profile has one filter too few).
pub(super) fn sandbox_problem(
    pid: i32,
    plan: &crate::privilege::ServicePrivilege,
) -> Option<String> {
    crate::privilege::check_pid(pid, plan)
        .into_iter()
        .find(|c| !c.ok)
        .map(|c| c.difference())
}

/// Compares a live process with what the manifest says; one line per difference.
/// (Identity, capabilities and seccomp: [`crate::privilege::check_pid`].)
pub fn check_process(pid: i32, expect: &ExpectedProcess) -> Vec<String> {
    let mut out = Vec::new();
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let wanted = expect.namespaces.names().contains(&ns);
        let mine = std::fs::read_link(format!("/proc/self/ns/{ns}")).ok();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).ok();
        let separate = mine.is_some() && theirs.is_some() && mine != theirs;
        if wanted && !separate {
            out.push(format!("shares the {ns} namespace with the microkernel"));
        }
    }
    if let Ok(limits) = std::fs::read_to_string(format!("/proc/{pid}/limits")) {
        for (label, want) in [
            ("Max address space", expect.memory),
            ("Max open files", expect.open_files),
        ] {
            let line = limits.lines().find(|l| l.starts_with(label));
            let soft = line.and_then(|l| {
                l[label.len()..]
                    .split_whitespace()
                    .next()
                    .map(str::to_string)
            });
            if soft.as_deref() != Some(&want.to_string()) {
                out.push(format!(
                    "{label} is {} but the manifest says {want}",
                    soft.unwrap_or_else(|| "unknown".into())
                ));
            }
        }
    } else {
        out.push("cannot read its limits".into());
    }
    match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(dir) => {
            // Read after its descriptors are listed: a connection it holds is in the tables.
            let mut accepted_sockets = None;
            for entry in dir.flatten() {
                let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let target = std::fs::read_link(entry.path())
                    .map(|t| t.display().to_string())
                    .unwrap_or_default();
                let accepted = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|i| i.parse::<u64>().ok())
                    .is_some_and(|i| {
                        // Read again on a miss: it may have accepted since the last read.
                        let known = accepted_sockets
                            .as_ref()
                            .is_some_and(|s: &std::collections::BTreeSet<u64>| s.contains(&i));
                        known || {
                            let now = crate::listeners::accepted_sockets(&expect.listening);
                            let found = now.contains(&i);
                            accepted_sockets = Some(now);
                            found
                        }
                    });
                let kept = ["socket:[", "pipe:["]
                    .iter()
                    .find_map(|p| target.strip_prefix(p))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|i| i.parse::<u64>().ok())
                    .is_some_and(|i| expect.kept.contains(&i));
                match expect.descriptors.iter().find(|(slot, _)| *slot == fd) {
                    Some((_, want)) if &target == want => {}
                    _ if accepted || kept => {}
                    Some((_, want)) => out.push(format!(
                        "descriptor {fd} is {target}, but the manifest grants {want} there"
                    )),
                    None => out.push(format!(
                        "holds descriptor {fd} ({target}) that the manifest does not grant"
                    )),
                }
            }
        }
        Err(e) => out.push(format!("cannot list its descriptors: {e}")),
    }
    match crate::libraries::mapped_files(&pid.to_string()) {
        Ok(mapped) => out.extend(crate::libraries::unexpected_maps(&mapped, &expect.code)),
        Err(e) => out.push(format!("cannot read what it maps: {e}")),
    }
    out
}
