//! Health and restarts: the watchdog's pings, reaping an exited service, deciding whether and
//! when it starts again, and the operator's `restart`.

use super::*;

impl Supervisor {
    /// The watchdog: pings every running service; one that has not answered for its
    /// manifest's `watchdog` is killed as hung (its death is then handled like any other).
    ///
    /// Silence is not counted while the service waits for a server that is not up: one it
    /// calls is starting, in its restart back-off or not started yet, or is itself silent for
    /// that reason. A service blocked in a call cannot answer a ping, and killing it would only
    /// spread one service's fault to its clients (and theirs): a vTPM killed four times while
    /// the store it writes to sat in a long back-off. Which call it is blocked in cannot be
    /// seen from here, so any server of its that is down explains its silence; once every
    /// server is up again it has its whole watchdog period to answer. A service silent while
    /// its servers are up is marked `Unresponsive` on the channels it serves (its clients may
    /// stop waiting for it, see `ServerState`) and killed after its period. Services silent
    /// in a cycle of calls with nothing down explain nothing: each is killed in turn.
    pub(super) fn health_check(&mut self) {
        let now = Instant::now();
        let mut silent = vec![false; self.services.len()];
        for (i, s) in self.services.iter_mut().enumerate() {
            if s.state != State::Running || s.kill_reason.is_some() || s.process.is_none() {
                continue;
            }
            // A probe on the control worker holds the channel: this round skips the service
            // (neither an answer nor a silence; the probe has its own timeout).
            let Some(mut control) = worker::try_lock(&s.control) else {
                continue;
            };
            let answer = control.call(&ctl::Request::Ping { nonce: 0 }, HEALTH_TIMEOUT);
            drop(control);
            match answer {
                Ok(ctl::Response::Pong { .. }) => {
                    s.last_answer = Instant::now();
                    s.silence_counted_from = s.last_answer;
                }
                _ => silent[i] = true,
            }
        }
        let waiting_for = self.waiting_for_down_servers(&silent);
        for i in 0..self.services.len() {
            // Not pinged: not running, or being killed already (its death decides).
            if self.services[i].state != State::Running || self.services[i].kill_reason.is_some() {
                continue;
            }
            let unresponsive = silent[i] && waiting_for[i].is_none();
            if unresponsive != self.services[i].unresponsive {
                self.services[i].unresponsive = unresponsive;
                let state = if unresponsive {
                    ServerState::Unresponsive
                } else {
                    ServerState::Up
                };
                for link in self.links.iter().filter(|l| l.server == i) {
                    link.mem.set_server_state(state);
                }
            }
            if !silent[i] {
                continue;
            }
            if let Some(j) = waiting_for[i] {
                let server = self.services[j].spec.name.clone();
                let s = &mut self.services[i];
                s.silence_counted_from = now;
                tracing::debug!(service = %s.spec.name, "silent while {server} is not up: not counted");
                continue;
            }
            let s = &mut self.services[i];
            let silent_for = now.saturating_duration_since(s.silence_counted_from);
            if silent_for >= s.spec.watchdog {
                let reason = format!(
                    "unresponsive for {:.1?} (watchdog {}); killed",
                    silent_for,
                    crate::manifest::format_duration(s.spec.watchdog)
                );
                tracing::error!(service = %s.spec.name, "{reason}");
                s.kill_reason = Some(reason);
                if let Some(p) = &s.process {
                    let _ = sandbox::pidfd_signal(&p.pidfd, libc::SIGKILL);
                }
            }
        }
    }

    /// For each service that is `silent`, the server that is not up (starting, in back-off,
    /// not started yet) that it waits for, directly or through servers silent for the same
    /// reason; `None` if its silence is its own.
    pub(super) fn waiting_for_down_servers(&self, silent: &[bool]) -> Vec<Option<usize>> {
        let down = |j: usize| {
            matches!(
                self.services[j].state,
                State::Starting | State::Backoff | State::Waiting
            )
        };
        let mut cause: Vec<Option<usize>> = vec![None; self.services.len()];
        // Each round explains at least one more service, or ends: at most one round per
        // service.
        loop {
            let mut changed = false;
            for l in &self.links {
                let (i, j) = (l.client, l.server);
                if !silent[i] || cause[i].is_some() || i == j {
                    continue;
                }
                let why = if down(j) {
                    Some(j)
                } else if silent[j] {
                    cause[j]
                } else {
                    None
                };
                if why.is_some() {
                    cause[i] = why;
                    changed = true;
                }
            }
            if !changed {
                return cause;
            }
        }
    }

    /// Service `i`'s pidfd became readable: it died.
    pub(super) fn reap(&mut self, i: usize) {
        let Some(p) = self.services[i].process.as_ref() else {
            return;
        };
        let exit = match sandbox::pidfd_reap(&p.pidfd) {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(service = %self.services[i].spec.name, "cannot reap: {e}");
                return;
            }
        };
        let uptime = p.started.elapsed();
        self.services[i].process = None;
        // Its last words before the report of its end, and everything it gave its store.
        self.drain_output(i);
        self.take_kept_of_the_dead(i);
        // A service that dies before it answers its first ping failed to start, whatever its
        // exit status.
        let starting = self.services[i].state == State::Starting;
        self.services[i].starting = None;
        let reason = match self.services[i].kill_reason.take() {
            Some(why) => why,
            None if starting => format!(
                "start failed: died during start: {}",
                self.exit_reason(i, exit)
            ),
            None => self.exit_reason(i, exit),
        };
        let failure = starting || exit != Exit::Code(0);
        if failure {
            tracing::warn!(service = %self.services[i].spec.name, "{reason} after {uptime:.1?}");
        } else {
            tracing::info!(service = %self.services[i].spec.name, "{reason}");
        }
        self.services[i]
            .output
            .note(format!("{reason} after {uptime:.1?}"));
        self.services[i].last_exit = Some(reason);
        self.after_death(i);
        if std::mem::take(&mut self.services[i].operator_restart) {
            // `paravisor restart`: at once, outside the policy (and its crash-loop count).
            let s = &mut self.services[i];
            s.restart_at = Some(Instant::now());
            s.backoff = Some(Duration::ZERO);
            s.state = State::Backoff;
            return;
        }
        self.schedule_restart(i, failure);
    }

    pub(super) fn exit_reason(&self, i: usize, exit: Exit) -> String {
        let note = self.services[i]
            .status
            .atomic_u32(core::mem::offset_of!(StatusPage, violation_syscall))
            .map(|a| a.swap(NO_VIOLATION, std::sync::atomic::Ordering::AcqRel))
            .unwrap_or(NO_VIOLATION);
        match exit {
            Exit::Code(VIOLATION_EXIT_STATUS) | Exit::Signal(libc::SIGSYS) => {
                let which = if note == NO_VIOLATION {
                    "a syscall outside its profile (before its runtime could name it)".to_string()
                } else {
                    format!(
                        "forbidden syscall {} (#{note})",
                        profiles::syscall_name(note)
                    )
                };
                format!("policy violation: {which}; killed by its seccomp filter")
            }
            Exit::Code(0) => "exited cleanly".into(),
            // The runtime turns signals that a PID-namespace init would ignore into this
            // exit status (see ipc_defs::hosted::sys::EXIT_SIGNALS).
            Exit::Code(c)
                if c > 128 && ipc_defs::hosted::sys::EXIT_SIGNALS.contains(&(c - 128)) =>
            {
                format!("killed by {}", signal_name(c - 128))
            }
            Exit::Code(c) => format!("exited with status {c}"),
            Exit::Signal(s) => format!("killed by {}", signal_name(s)),
        }
    }

    /// The process of service `i` is gone: move its channels to a new epoch so that peers
    /// stop waiting for it, and drop what it left unread.
    pub(super) fn after_death(&mut self, i: usize) {
        // Its channels say `Down` now, whatever the watchdog said of it.
        self.services[i].unresponsive = false;
        let _ = self.services[i]
            .control_mem
            .restart_epoch(Direction::Requests);
        for link in &self.links {
            if link.server == i {
                link.mem.channel().set_server_state(ServerState::Down);
                let epoch = link.mem.restart_epoch(Direction::Requests);
                tracing::info!(channel = %format!("{}->{}", self.services[link.client].spec.name, link.interface), %epoch, "server gone; new epoch");
            }
            if link.client == i {
                let _ = link.mem.restart_epoch(Direction::Responses);
            }
        }
        if let Some(link) = self.attest_link.as_ref().filter(|l| l.server == i) {
            link.mem.channel().set_server_state(ServerState::Down);
            let _ = link.mem.restart_epoch(Direction::Requests);
        }
        if let Some(link) = self.platform_link.as_ref().filter(|l| l.holder == i) {
            let _ = link.mem.restart_epoch(Direction::Responses);
        }
        if let Some(guest) = &self.guest {
            for link in guest.links.iter().filter(|l| l.server == i) {
                link.mem.channel().set_server_state(ServerState::Down);
                let epoch = link.mem.restart_epoch(Direction::Requests);
                tracing::info!(channel = %format!("guest->{}", link.interface), %epoch, "server gone; new epoch");
            }
        }
    }

    /// Applies the restart policy after an exit (or a failed start).
    pub(super) fn schedule_restart(&mut self, i: usize, failure: bool) {
        self.decide_restart(i, failure);
        if matches!(self.services[i].state, State::Failed | State::Stopped) {
            let why = format!("the service is {}", self.services[i].state.name());
            self.drop_kept(i, &why);
            // No process will serve its channels again: callers stop waiting for one (the new
            // epoch wakes any that sleep in a call).
            for link in self.links.iter().filter(|l| l.server == i) {
                link.mem.channel().set_server_state(ServerState::Gone);
                let _ = link.mem.restart_epoch(Direction::Requests);
            }
            if let Some(guest) = &self.guest {
                for link in guest.links.iter().filter(|l| l.server == i) {
                    link.mem.channel().set_server_state(ServerState::Gone);
                    let _ = link.mem.restart_epoch(Direction::Requests);
                }
            }
            if let Some(link) = self.attest_link.as_ref().filter(|l| l.server == i) {
                link.mem.channel().set_server_state(ServerState::Gone);
                let _ = link.mem.restart_epoch(Direction::Requests);
            }
        }
    }

    pub(super) fn decide_restart(&mut self, i: usize, failure: bool) {
        let s = &mut self.services[i];
        let now = Instant::now();
        match restart_decision(&s.spec.restart, failure, &mut s.recent, now) {
            Decision::Stay(state) => s.state = state,
            Decision::CrashLoop { restarts } => {
                s.state = State::Failed;
                let msg = format!(
                    "crash loop: {restarts} restarts within {}; marked failed (the other services keep running)",
                    crate::manifest::format_duration(s.spec.restart.window)
                );
                tracing::error!(service = %s.spec.name, "{msg}");
                s.output.note(format!(
                    "{msg}; `paravisor restart {}` revives it",
                    s.spec.name
                ));
                s.last_exit = Some(format!(
                    "{}; {msg}",
                    s.last_exit.clone().unwrap_or_default()
                ));
            }
            Decision::RestartIn(delay) => {
                s.restart_at = Some(now + delay);
                s.backoff = Some(delay);
                s.state = State::Backoff;
                s.output.note(format!(
                    "restarting in {}",
                    crate::manifest::format_duration(delay)
                ));
                tracing::info!(service = %s.spec.name, "restarting in {delay:?}");
            }
        }
    }

    /// `paravisor restart SERVICE`: a running service is killed and started again at once; one
    /// in its back-off starts now; a failed or stopped one is started again with a fresh
    /// crash-loop count (its clients wait for it again instead of failing at once). None of
    /// these counts against its restart policy.
    pub(super) fn operator_restart(&mut self, service: &str) -> Reply {
        let Some(i) = self.services.iter().position(|s| s.spec.name == service) else {
            return Reply::Error {
                message: format!("no service named \"{service}\""),
            };
        };
        let s = &mut self.services[i];
        let was = s.state;
        let message = match was {
            State::Waiting => {
                return Reply::Error {
                    message: format!(
                        "service \"{service}\" has not been started yet (the first starts go in manifest order)"
                    ),
                }
            }
            State::Running | State::Starting => {
                let Some(p) = &s.process else {
                    return Reply::Error {
                        message: format!("service \"{service}\" has no process"),
                    };
                };
                if let Err(e) = sandbox::pidfd_signal(&p.pidfd, libc::SIGKILL) {
                    return Reply::Error {
                        message: format!("cannot stop {service}: {e}"),
                    };
                }
                // Its death (reaped as any other) starts it again.
                s.operator_restart = true;
                s.kill_reason = Some("restarted by the operator (`paravisor restart`)".into());
                format!("restarting {service} (pid {} killed)", p.pid)
            }
            State::Backoff => {
                s.restart_at = Some(Instant::now());
                format!("restarting {service} now (it was in its restart back-off)")
            }
            State::Failed | State::Stopped => {
                s.restart_at = Some(Instant::now());
                s.backoff = Some(Duration::ZERO);
                s.state = State::Backoff;
                // Its clients wait for it again (they stopped waiting when it was given up).
                for link in self.links.iter().filter(|l| l.server == i) {
                    link.mem.set_server_state(ServerState::Down);
                }
                if let Some(guest) = &self.guest {
                    for link in guest.links.iter().filter(|l| l.server == i) {
                        link.mem.set_server_state(ServerState::Down);
                    }
                }
                if let Some(link) = self.attest_link.as_ref().filter(|l| l.server == i) {
                    link.mem.set_server_state(ServerState::Down);
                }
                format!("restarting {service} (it was {})", was.name())
            }
        };
        let s = &mut self.services[i];
        // A fresh crash-loop count: the operator revived it.
        s.recent.clear();
        s.output.note(format!("{message}, asked by the operator"));
        tracing::info!(service = %service, "{message}, asked by the operator");
        Reply::Done { message }
    }
}

/// What the restart policy says after an exit.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Not restarted: `Failed` after a failure, `Stopped` after a clean exit.
    Stay(State),
    /// More than the policy's `max` restarts within its window: failed.
    CrashLoop { restarts: usize },
    /// Restarted after this delay (the restart is counted in `recent`).
    RestartIn(Duration),
}

/// The restart policy `policy` applied to an exit at `now` (`failure`: not a clean exit),
/// given the times of the restarts so far (`recent`, oldest first; those older than the
/// window are forgotten, and a restart decided here is added).
pub(super) fn restart_decision(
    policy: &crate::manifest::Restart,
    failure: bool,
    recent: &mut VecDeque<Instant>,
    now: Instant,
) -> Decision {
    let restart = match policy.policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => failure,
        RestartPolicy::Never => false,
    };
    if !restart {
        return Decision::Stay(if failure {
            State::Failed
        } else {
            State::Stopped
        });
    }
    while recent
        .front()
        .is_some_and(|t| now.duration_since(*t) > policy.window)
    {
        recent.pop_front();
    }
    if recent.len() as u32 >= policy.max {
        return Decision::CrashLoop {
            restarts: recent.len(),
        };
    }
    // The first restart within the window is immediate (a single crash costs the service's
    // clients no wait); repeated ones back off from `backoff`, doubling up to `max-backoff`
    // (clients wait for a restarting server rather than fail, so the ceiling bounds their
    // wait).
    let delay = policy.delay(recent.len() as u32);
    recent.push_back(now);
    Decision::RestartIn(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Restart;

    fn policy(policy: RestartPolicy) -> Restart {
        Restart {
            policy,
            max: 3,
            window: Duration::from_secs(10),
            backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(250),
        }
    }

    #[test]
    fn the_policy_decides_whether_an_exit_is_restarted() {
        let now = Instant::now();
        let mut recent = VecDeque::new();
        let decide = |p, failure, recent: &mut VecDeque<Instant>| {
            restart_decision(&policy(p), failure, recent, now)
        };
        assert_eq!(
            decide(RestartPolicy::Never, true, &mut recent),
            Decision::Stay(State::Failed)
        );
        assert_eq!(
            decide(RestartPolicy::Never, false, &mut recent),
            Decision::Stay(State::Stopped)
        );
        assert_eq!(
            decide(RestartPolicy::OnFailure, false, &mut recent),
            Decision::Stay(State::Stopped)
        );
        assert!(recent.is_empty(), "no restart, nothing counted");
        assert_eq!(
            decide(RestartPolicy::OnFailure, true, &mut recent),
            Decision::RestartIn(Duration::ZERO)
        );
        assert_eq!(
            decide(RestartPolicy::Always, false, &mut recent),
            Decision::RestartIn(Duration::from_millis(100))
        );
    }

    #[test]
    fn restarts_back_off_to_the_ceiling_then_a_crash_loop_fails_the_service() {
        let p = policy(RestartPolicy::Always);
        let start = Instant::now();
        let mut recent = VecDeque::new();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Immediate, then backoff, then doubled but capped at max-backoff.
        assert_eq!(
            restart_decision(&p, true, &mut recent, at(0)),
            Decision::RestartIn(Duration::ZERO)
        );
        assert_eq!(
            restart_decision(&p, true, &mut recent, at(10)),
            Decision::RestartIn(Duration::from_millis(100))
        );
        assert_eq!(
            restart_decision(&p, true, &mut recent, at(200)),
            Decision::RestartIn(Duration::from_millis(200).min(p.max_backoff))
        );
        // The fourth exit inside the window: max (3) restarts already.
        assert_eq!(
            restart_decision(&p, true, &mut recent, at(500)),
            Decision::CrashLoop { restarts: 3 }
        );
        assert_eq!(recent.len(), 3, "a refused restart is not counted");
    }

    #[test]
    fn restarts_older_than_the_window_are_forgotten() {
        let p = policy(RestartPolicy::Always);
        let start = Instant::now();
        let mut recent = VecDeque::new();
        for ms in [0, 1, 2] {
            restart_decision(&p, true, &mut recent, start + Duration::from_millis(ms));
        }
        // Just past the window of the first two: they no longer count, and the delay is that
        // of the second restart in the window.
        let later = start + p.window + Duration::from_millis(2);
        assert_eq!(
            restart_decision(&p, true, &mut recent, later),
            Decision::RestartIn(Duration::from_millis(100))
        );
        assert_eq!(recent.len(), 2);
        // Exactly at the window's end a restart still counts (older than, not as old as).
        let mut recent = VecDeque::from([start]);
        restart_decision(&p, true, &mut recent, start + p.window);
        assert_eq!(recent.len(), 2);
    }
}
