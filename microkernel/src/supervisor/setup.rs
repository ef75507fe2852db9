//! Building a run: every service's channels, pages, programs and listeners, the
//! microkernel's own links (attest, platform), from the manifest and the capability plan;
//! nothing is started here.

use super::*;

/// Another mapping of the channel `mem` (the same memory: what one writes the other sees).
pub(super) fn second_mapping(mem: &ChannelMemory) -> Result<ChannelMemory, String> {
    ipc_defs::hosted::sys::dup_inheritable(mem.shm())
        .map_err(|e| e.to_string())
        .and_then(|fd| ChannelMemory::open(fd).map_err(|e| e.to_string()))
}

pub(super) fn create_err(what: impl Into<String>) -> impl FnOnce(String) -> RunError {
    let what = what.into();
    move |reason| RunError::Create { what, reason }
}

impl Supervisor {
    /// Builds every channel, region and filter the manifest describes; starts nothing yet.
    pub fn new(opts: &Options) -> Result<Supervisor, RunError> {
        let m = &opts.manifest;
        let state = opts.state.try_clone()?;
        let lock = match &opts.lock {
            Some(l) => l.try_clone()?,
            None => lock_state_dir(&state)?,
        };
        // The platform before any state file is made: a platform that is refused (another
        // user's, a chip secret others can read) leaves the state untouched.
        let platform = match m.services.iter().any(|s| s.platform) {
            true => Some(open_or_init_platform(&opts.platform_dir)?),
            false => None,
        };
        let enabled =
            crate::listeners::enabled(m, &opts.listen).map_err(|e| create_err("front ends")(e))?;
        let taps = crate::taps::enabled(m, &opts.taps).map_err(create_err("TAP devices"))?;
        // What each service is handed, computed once: the channels below are made in its
        // order, and every start hands over its slots.
        let bound: Vec<String> = enabled.iter().map(|l| l.name.clone()).collect();
        let attached: Vec<String> = taps.iter().map(|t| t.name.clone()).collect();
        let plan = CapabilityPlan::new(
            &m.services,
            Run {
                guest_vcpus: opts.guest.as_ref().map(|g| g.vcpus),
                listening: Some(&bound),
                taps: Some(&attached),
            },
        );
        let mut services = Vec::new();
        let tag_width = m.services.iter().map(|s| s.name.len()).max().unwrap_or(0);
        // Who each service runs as: computed once, here, for spawn and the live audit.
        let mut privileges =
            crate::privilege::plan(m, &crate::privilege::Runner::current()).into_iter();
        let filters = crate::thread_filters::ThreadFilters::compile(m, std::process::id())
            .map_err(|e| create_err("the microkernel's thread filters")(e.to_string()))?;
        for (i, spec) in m.services.iter().enumerate() {
            let privilege = privileges.next().ok_or_else(|| {
                create_err(format!("identity of {}", spec.name))("no plan".into())
            })?;
            services.push(Self::service(
                opts, i, &plan, &enabled, &taps, tag_width, privilege,
            )?);
        }
        let mut links = Vec::new();
        for link in &plan.links {
            let what = format!(
                "channel {} -> {}",
                m.services[link.client].name, link.interface
            );
            let mem = ChannelMemory::create(&link.memfd, m.ring_capacity)
                .map_err(|e| create_err(what)(e.to_string()))?;
            links.push(Link {
                client: link.client,
                server: link.server,
                interface: link.interface,
                mem,
            });
        }
        let guest = match &opts.guest {
            None => None,
            Some(config) => Some(Self::guest(config, &plan, m, opts.keep_running)?),
        };
        let attest_link = Self::attest_link(&plan, m.ring_capacity)?;
        let platform_link = match (plan.platform, platform) {
            (Some(holder), Some(platform)) => Some(Self::platform_link(
                holder,
                platform,
                opts,
                m.ring_capacity,
            )?),
            _ => None,
        };
        Ok(Supervisor {
            state,
            _lock: lock,
            attest_link,
            platform_link,
            unsealed: std::collections::BTreeMap::new(),
            sealing: m.attest.clone(),
            manifest: m.clone(),
            measurement: opts.launch_log.measurement,
            sealing_measurement: opts.launch_log.paravisor_measurement(),
            launch_log: opts.launch_log.clone(),
            sandbox_root: opts.state_dir.join(".sandbox-root"),
            state_dir: opts.state_dir.clone(),
            log_filter: opts.log_filter.clone(),
            services,
            plan,
            links,
            ring_capacity: m.ring_capacity,
            guest,
            qemu: opts.qemu.clone(),
            vmm: None,
            keep_running: opts.keep_running,
            ping_nonce: 0,
            filters,
            spawner: None,
            worker: None,
        })
    }

    /// The microkernel's own channel to the attest service, if the manifest has one.
    pub(super) fn attest_link(
        plan: &CapabilityPlan,
        ring_capacity: u32,
    ) -> Result<Option<AttestLink>, RunError> {
        Ok(match plan.paravisor_attest {
            None => None,
            Some(server) => {
                let mem = ChannelMemory::create(crate::plan::PARAVISOR_ATTEST_MEMFD, ring_capacity)
                    .map_err(|e| create_err("channel paravisor -> attest")(e.to_string()))?;
                let view =
                    second_mapping(&mem).map_err(create_err("channel paravisor -> attest"))?;
                Some(AttestLink {
                    server,
                    client: Arc::new(Mutex::new(ClientEnd::new(view, WaitPolicy::default()))),
                    mem,
                })
            }
        })
    }

    /// The platform channel held by service `holder`, served by a thread of the microkernel
    /// with `platform` and this launch's facts.
    pub(super) fn platform_link(
        holder: usize,
        platform: crate::platform::Platform,
        opts: &Options,
        ring_capacity: u32,
    ) -> Result<PlatformLink, RunError> {
        let mem = ChannelMemory::create(crate::plan::PLATFORM_MEMFD, ring_capacity)
            .map_err(|e| create_err("platform channel")(e.to_string()))?;
        let view = second_mapping(&mem).map_err(create_err("platform channel"))?;
        let launch = crate::platform_server::Launch {
            facts: crate::snp::LaunchFacts {
                measurement: opts.launch_log.measurement,
                policy: crate::snp::POLICY,
                guest_svn: 0,
            },
            host_data: [0; 32],
            report_id: crate::platform::new_report_id()?,
        };
        Ok(PlatformLink {
            holder,
            mem,
            platform: std::sync::Arc::new(platform),
            launch,
            pending: Some(view),
            server: None,
        })
    }

    /// Everything service `i` keeps across its starts: its channels to the microkernel
    /// (control, status page), regions, bound listeners, attached TAPs, descriptor store,
    /// seccomp programs, and the measured copies of its code.
    pub(super) fn service(
        opts: &Options,
        i: usize,
        plan: &CapabilityPlan,
        enabled: &[crate::listeners::Enabled],
        taps: &[crate::taps::Enabled],
        tag_width: usize,
        privilege: crate::privilege::ServicePrivilege,
    ) -> Result<Service, RunError> {
        let m = &opts.manifest;
        let spec = &m.services[i];
        let binary = opts.bin_dir.join(&spec.binary);
        std::fs::metadata(&binary).map_err(|source| RunError::Binary {
            service: spec.name.clone(),
            path: binary.display().to_string(),
            source,
        })?;
        let control_mem =
            ChannelMemory::create(&crate::plan::control_memfd(&spec.name), m.ring_capacity)
                .map_err(|e| {
                    create_err(format!("control channel of {}", spec.name))(e.to_string())
                })?;
        let status = SharedMemory::create(&crate::plan::status_memfd(&spec.name), 4096)?;
        init_status(&status)?;
        let mut regions = Vec::new();
        for r in &spec.regions {
            let shm = SharedMemory::create(
                &crate::plan::region_memfd(&spec.name, &r.name),
                r.size as usize,
            )?;
            regions.push((r.name.clone(), shm));
        }
        let mut listeners = Vec::new();
        for l in enabled.iter().filter(|l| l.service == spec.name) {
            let bound = crate::listeners::bind(l, &opts.state_dir).map_err(|e| {
                create_err(format!(
                    "listener {} of {} on {}",
                    l.name, spec.name, l.address
                ))(e)
            })?;
            listeners.push(bound);
        }
        // Before any thread is confined: attaching may enter a network namespace, which no
        // thread filter allows later (see crate::taps).
        let mut attached = Vec::new();
        for t in taps.iter().filter(|t| t.service == spec.name) {
            let tap = crate::taps::attach(t)
                .map_err(create_err(format!("TAP {} of {}", t.name, spec.name)))?;
            tracing::info!(
                service = %spec.name,
                tap = %t.name,
                interface = %tap.host,
                "TAP attached ({}; its admin state and addresses are the host's)",
                if tap.persistent {
                    "a persistent TAP: it stays after the run"
                } else {
                    "made for this run: it goes when the run ends"
                }
            );
            attached.push(tap);
        }
        let grant_rules = profiles::GrantRules::of(spec, plan.slots(i));
        let program = profiles::service_program(&spec.syscalls, grant_rules)
            .map_err(|e| create_err(format!("seccomp profile of {}", spec.name))(e.to_string()))?;
        let bytes = profiles::program_bytes(&program);
        let program_fd = ipc_defs::hosted::sys::memfd(
            &crate::plan::seccomp_memfd(&spec.name),
            bytes.len() as u64,
        )?;
        write_all_at(&program_fd, &bytes)?;
        ipc_defs::hosted::sys::seal_read_only(&program_fd)?;
        // The bootstrap record, then the service's slots: the binary comes after them.
        let caps = 1 + plan.slots(i).len();
        let loader_filter =
            profiles::loader_program(&spec.syscalls, SpawnPlan::binary_slot(caps), grant_rules)
                .map_err(|e| {
                    create_err(format!("loader profile of {}", spec.name))(e.to_string())
                })?;
        // Before any thread is confined (the supervisor's filter has no socketpair).
        let store = match spec.fd_store {
            Some(f) => Some(crate::fd_store::Store::new(f.max as usize).map_err(|e| {
                create_err(format!("descriptor store of {}", spec.name))(e.to_string())
            })?),
            None => None,
        };
        let image = match opts.sealed.services.get(i) {
            Some(fd) => Some(fd.try_clone()?),
            None => None,
        };
        let code = opts
            .sealed
            .code_of(i)
            .into_iter()
            .map(|(fd, length, path)| Ok((Some(fd.try_clone()?), length, path.to_string())))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Service {
            spec: spec.clone(),
            binary,
            image,
            code,
            control: Arc::new(Mutex::new(ClientEnd::new(
                second_mapping(&control_mem)
                    .map_err(|e| create_err(format!("control channel of {}", spec.name))(e))?,
                WaitPolicy::default(),
            ))),
            control_mem,
            status,
            regions,
            listeners,
            taps: attached,
            store,
            grant_rules,
            service_program: program_fd,
            loader_filter,
            state: State::Stopped,
            process: None,
            restarts: 0,
            recent: VecDeque::new(),
            restart_at: None,
            backoff: None,
            operator_restart: false,
            last_exit: None,
            last_stats: ctl::Stats::default(),
            opened: Vec::new(),
            last_answer: Instant::now(),
            silence_counted_from: Instant::now(),
            unresponsive: false,
            kill_reason: None,
            starting: None,
            output: ServiceOutput::new(&spec.name, tag_width).with_format(crate::logging::format()),
            privilege,
        })
    }
}

/// Takes the state directory's lock (`.lock`, an advisory exclusive lock released when the
/// process ends), or says that another paravisor holds it.
pub fn lock_state_dir(dir: &OwnedDir) -> Result<std::fs::File, RunError> {
    let path = dir.shown(Path::new(".lock"));
    let file = dir.open_file(Path::new(".lock"), Open::ReadWriteOrCreate(0o600))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(RunError::AlreadyRunning(dir.path().display().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(RunError::StateDir(path.display().to_string(), e))
        }
    }
}
