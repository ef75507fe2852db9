//! Starting services: confining the microkernel's threads first, then each start (spawn,
//! first ping, the sandbox check once it answers).

use super::*;

impl Supervisor {
    /// Starts the spawner and platform threads, each under its own seccomp filter, then
    /// confines this thread (see [`crate::thread_filters`] for the order). After the signal
    /// mask is set: the threads inherit it.
    pub(super) fn confine(&mut self) -> Result<(), RunError> {
        if self.spawner.is_none() {
            // One copy of every service's libraries, for all of them (see LibraryStore).
            let mut libraries = Vec::new();
            for s in &self.services {
                for (fd, length, path) in &s.code {
                    if let Some(fd) = fd {
                        libraries.push((fd.try_clone()?, *length, path.clone()));
                    }
                }
            }
            let spawner = crate::spawner::Spawner::start(
                self.filters.spawner.clone(),
                Some((self.state_dir.join(".sandbox-store"), libraries)),
            )?;
            if spawner.has_store() {
                // The store is the measured copy every start binds from: the images are
                // not needed any more (their memory is the instance's largest share).
                for s in &mut self.services {
                    for (fd, _, _) in &mut s.code {
                        *fd = None;
                    }
                }
            }
            self.spawner = Some(spawner);
        }
        self.start_platform()?;
        if self.worker.is_none() {
            self.worker = Some(worker::ControlWorker::start(self.filters.control.clone())?);
        }
        crate::thread_filters::install(&self.filters.supervisor).map_err(|e| RunError::Create {
            what: "the supervisor's seccomp filter".into(),
            reason: e.to_string(),
        })?;
        tracing::info!(
            "microkernel threads confined: supervisor, spawner, control{}, vCPUs at start",
            if self.platform_link.is_some() {
                ", platform"
            } else {
                ""
            }
        );
        Ok(())
    }

    /// Starts the platform's serving thread (after the signal mask: see [`PlatformLink`]).
    pub(super) fn start_platform(&mut self) -> Result<(), RunError> {
        if let Some(link) = self.platform_link.as_mut() {
            if let Some(view) = link.pending.take() {
                link.server = Some(crate::platform_server::PlatformServer::start(
                    view,
                    link.platform.clone(),
                    link.launch,
                    self.services[link.holder].spec.name.clone(),
                    self.filters.platform.clone(),
                )?);
                link.mem.set_server_state(ServerState::Up);
            }
        }
        Ok(())
    }

    /// Starts service `i` (first start or restart): spawns it and sends its first ping; the
    /// main loop ([`Supervisor::check_starts`]) takes it from there.
    pub(super) fn start(&mut self, i: usize) {
        self.services[i].state = State::Starting;
        if let Err(reason) = self.spawn(i) {
            self.start_failed(i, reason);
        }
    }

    pub(super) fn spawn(&mut self, i: usize) -> Result<(), String> {
        let Grants {
            record,
            mut fds,
            mut opened,
            kept,
        } = self.capabilities(i)?;
        // Its stdout and stderr: pipes of this start, read by the supervisor.
        let (stdout, stdout_end) =
            sandbox::output_pipe().map_err(|e| format!("output pipe: {e}"))?;
        let (stderr, stderr_end) =
            sandbox::output_pipe().map_err(|e| format!("output pipe: {e}"))?;
        for (slot, pipe) in [(1, &stdout), (2, &stderr)] {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", pipe.as_raw_fd()))
                .map_err(|e| format!("output pipe: {e}"))?;
            opened.push((slot, link.display().to_string()));
        }
        self.services[i].opened = opened;
        let record_bytes =
            postcard::to_allocvec(&record).map_err(|e| format!("bootstrap record: {e}"))?;
        let record_fd = ipc_defs::hosted::sys::memfd(
            &format!("pv-bootstrap-{}", record.service),
            record_bytes.len() as u64,
        )
        .map_err(|e| e.to_string())?;
        write_all_at(&record_fd, &record_bytes).map_err(|e| e.to_string())?;
        ipc_defs::hosted::sys::seal_read_only(&record_fd).map_err(|e| e.to_string())?;
        let mut raw = vec![record_fd.as_raw_fd()];
        raw.extend(fds.iter().map(|f| f.as_raw()));
        let s = &self.services[i];
        // Kept descriptors come after the planned slots and push the binary's slot on: the
        // loader's filter names that slot.
        let loader_filter = match kept {
            0 => s.loader_filter.clone(),
            _ => profiles::loader_program(
                &s.spec.syscalls,
                SpawnPlan::binary_slot(raw.len()),
                s.grant_rules,
            )
            .map_err(|e| format!("loader profile: {e}"))?,
        };
        if kept > 0 {
            tracing::info!(service = %s.spec.name, kept, "handing back what its fd store kept");
        }
        let rlimits = vec![
            (libc::RLIMIT_AS, s.spec.limits.memory),
            (libc::RLIMIT_NOFILE, s.spec.limits.open_files),
            (libc::RLIMIT_CORE, 0),
        ];
        let mut plan = SpawnPlan::new(
            (&s.binary, s.image.as_ref()),
            &s.spec.args,
            &raw,
            &s.code
                .iter()
                .map(|(fd, length, path)| (fd.as_ref(), *length, path.as_str()))
                .collect::<Vec<_>>(),
            loader_filter,
            rlimits,
            &self.sandbox_root,
            &format!("pv-{}", s.spec.name),
        )
        .map_err(|e| e.to_string())?
        .run_as(sandbox::Identity::of(&s.privilege));
        plan.set_output(stdout_end, stderr_end);
        let spawner = self
            .spawner
            .as_ref()
            .ok_or("the spawner thread is not running")?;
        // The plan (with our copies of the pipes' write ends) is dropped on the spawner
        // thread after the spawn: the service holds the only ones, so its pipes end when it
        // does.
        let spawned = spawner
            .spawn(plan, Namespaces::all() - Namespaces::USER)
            .map_err(|e| e.to_string())?;
        fds.clear();
        self.services[i].output.attach(stdout, stderr);
        self.services[i].process = Some(Process {
            pid: spawned.pid,
            pidfd: spawned.pidfd,
            namespaces: spawned.namespaces,
            started: Instant::now(),
        });
        self.ping_nonce += 1;
        let nonce = self.ping_nonce;
        let ping = worker::lock(&self.services[i].control)
            .send(&ctl::Request::Ping { nonce })
            .map_err(|e| format!("cannot send its first ping: {e}"))?;
        let now = Instant::now();
        self.services[i].starting = Some(PendingStart {
            ping,
            nonce,
            deadline: now + START_TIMEOUT,
            next_look: now + Duration::from_millis(1),
        });
        Ok(())
    }

    /// Looks for the first answer of every starting service, without waiting. The answer
    /// proves the service up and inside its own profile: it is then `running`. A start that
    /// misses its deadline, or gets another answer, fails.
    pub(super) fn check_starts(&mut self) {
        for i in 0..self.services.len() {
            let Some(p) = &self.services[i].starting else {
                continue;
            };
            let (ping, nonce, deadline) = (p.ping, p.nonce, p.deadline);
            let now = Instant::now();
            let reply = worker::lock(&self.services[i].control).try_reply(ping);
            match reply {
                Ok(Some(ctl::Response::Pong { nonce: n })) if n == nonce => self.started(i),
                Ok(Some(other)) => {
                    self.start_failed(i, format!("answered its first ping with {other:?}"))
                }
                Ok(None) if now >= deadline => self.start_failed(
                    i,
                    format!("did not answer its first ping within {START_TIMEOUT:?}"),
                ),
                Ok(None) => {
                    if let Some(p) = self.services[i]
                        .starting
                        .as_mut()
                        .filter(|p| now >= p.next_look)
                    {
                        // Often while a quick start is likely, then every interval.
                        let waited = now.saturating_duration_since(deadline - START_TIMEOUT);
                        p.next_look =
                            now + (waited / 8).clamp(Duration::from_millis(1), START_LOOK_INTERVAL);
                    }
                }
                Err(e) => self.start_failed(i, format!("did not answer its first ping: {e}")),
            }
        }
    }

    /// Service `i` answered its first ping: checks its sandbox, then it serves.
    pub(super) fn started(&mut self, i: usize) {
        self.services[i].starting = None;
        let Some((pid, namespaces)) = self.services[i]
            .process
            .as_ref()
            .map(|p| (p.pid, p.namespaces))
        else {
            return;
        };
        if let Some(problem) = sandbox_problem(pid, &self.services[i].privilege) {
            return self.start_failed(i, format!("sandbox not in force: {problem}"));
        }
        for link in &self.links {
            if link.server == i {
                link.mem.set_server_state(ServerState::Up);
            }
        }
        if let Some(guest) = &self.guest {
            for link in guest.links.iter().filter(|l| l.server == i) {
                link.mem.set_server_state(ServerState::Up);
            }
        }
        if let Some(link) = self.attest_link.as_ref().filter(|l| l.server == i) {
            link.mem.set_server_state(ServerState::Up);
        }
        // Its clients, and theirs, may have waited for it: their silence counts from now,
        // so that each has its whole watchdog period to finish the call it was blocked in.
        let now = Instant::now();
        let mut waiting = vec![i];
        let mut seen = vec![false; self.services.len()];
        while let Some(server) = waiting.pop() {
            for l in self.links.iter().filter(|l| l.server == server) {
                if !std::mem::replace(&mut seen[l.client], true) {
                    let c = &mut self.services[l.client];
                    c.silence_counted_from = c.silence_counted_from.max(now);
                    waiting.push(l.client);
                }
            }
        }
        let s = &mut self.services[i];
        s.state = State::Running;
        s.last_answer = Instant::now();
        s.silence_counted_from = s.last_answer;
        s.unresponsive = false;
        s.kill_reason = None;
        s.output.note(format!("running (pid {pid})"));
        tracing::info!(service = %s.spec.name, pid, uid = s.privilege.uid, namespaces = ?namespaces.names(), "running");
    }

    /// The start of service `i` failed: a process that exists is killed, and its death
    /// (through its pidfd and [`Supervisor::reap`]) moves its channels on and applies the
    /// restart policy, never while it might still write to its rings; without a process that
    /// happens now.
    pub(super) fn start_failed(&mut self, i: usize, reason: String) {
        let s = &mut self.services[i];
        s.starting = None;
        tracing::error!(service = %s.spec.name, "cannot start: {reason}");
        let reason = format!("start failed: {reason}");
        s.last_exit = Some(reason.clone());
        match &s.process {
            Some(p) => {
                s.kill_reason = Some(reason);
                let _ = sandbox::pidfd_signal(&p.pidfd, libc::SIGKILL);
            }
            None => {
                self.after_death(i);
                self.schedule_restart(i, true);
            }
        }
    }
}
