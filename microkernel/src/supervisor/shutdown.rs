//! Stopping: the waves (clients before the servers they call) and the grace before a kill.

use super::*;

impl Supervisor {
    /// The services in waves that stop every client before the services it calls (a
    /// layering of the `calls` graph): a wave is every service none of whose clients is in
    /// a later wave. Services in a cycle of calls go one at a time, in reverse manifest order.
    pub(super) fn stop_waves(&self) -> Vec<Vec<usize>> {
        let n = self.services.len();
        let mut stopped = vec![false; n];
        let mut waves = Vec::new();
        let mut left = n;
        while left > 0 {
            let mut wave: Vec<usize> = (0..n)
                .rev()
                .filter(|&i| {
                    !stopped[i]
                        && !self
                            .links
                            .iter()
                            .any(|l| l.server == i && l.client != i && !stopped[l.client])
                })
                .collect();
            if wave.is_empty() {
                wave.push((0..n).rev().find(|&i| !stopped[i]).expect("one left"));
            }
            for &i in &wave {
                stopped[i] = true;
            }
            left -= wave.len();
            waves.push(wave);
        }
        waves
    }

    /// Stops every service: a shutdown request, a grace period, then SIGKILL; wave by wave,
    /// so that a service has exited before the services it calls are asked to stop (a vTPM
    /// still writing its state reaches vmgs, a call in flight to attest gets its answer).
    pub(super) fn shutdown(&mut self) {
        for wave in self.stop_waves() {
            for &i in &wave {
                let s = &mut self.services[i];
                s.restart_at = None;
                // Skip services that are already gone (their pidfd is readable).
                let alive = s.process.as_ref().is_some_and(|p| {
                    sandbox::poll_readable(&[p.pidfd.as_raw_fd()], 0).is_ok_and(|r| !r[0])
                });
                // A starting service gets the request after its first ping, and ends as
                // soon as it serves.
                if alive && matches!(s.state, State::Running | State::Starting) {
                    let _ = worker::lock(&s.control)
                        .call(&ctl::Request::Shutdown, Duration::from_millis(500));
                }
            }
            let deadline = Instant::now() + SHUTDOWN_GRACE;
            for &i in &wave {
                if let Some(p) = self.services[i].process.take() {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if !self.wait_exit_forwarding(&p.pidfd, left) {
                        let name = &self.services[i].spec.name;
                        tracing::warn!(service = %name, "did not stop in time; killing");
                        let _ = sandbox::pidfd_signal(&p.pidfd, libc::SIGKILL);
                        self.wait_exit_forwarding(&p.pidfd, Duration::from_secs(5));
                    }
                    self.services[i].state = State::Stopped;
                    self.services[i].starting = None;
                }
                // Its last words before the services it calls are asked to stop.
                self.drain_output(i);
            }
        }
        tracing::info!("all services stopped");
    }
}
