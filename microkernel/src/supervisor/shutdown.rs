//! Stopping: the waves (clients before the servers they call) and the grace before a kill.

use super::*;

impl Supervisor {
    /// The services in waves that stop every client before the services it calls (a
    /// layering of the `calls` graph): a wave is every service none of whose clients is in
    /// a later wave. When only cycles of calls are left, the last service of the manifest goes
    /// alone (see [`stop_waves`]).
    pub(super) fn stop_waves(&self) -> Vec<Vec<usize>> {
        let calls: Vec<(usize, usize)> = self.links.iter().map(|l| (l.client, l.server)).collect();
        stop_waves(self.services.len(), &calls)
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
                // Its last words before the services it calls are asked to stop; what its
                // store kept closes with it (a clean shutdown hands nothing on).
                self.drain_output(i);
                self.drop_kept(i, "the paravisor stops");
            }
        }
        tracing::info!("all services stopped");
    }
}

/// The waves of [`Supervisor::stop_waves`] for `n` services and `calls` as (client, server)
/// pairs: every client in an earlier wave than the services it calls; when only cycles are
/// left, the last service of the manifest goes alone and the calls decide again.
pub(super) fn stop_waves(n: usize, calls: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut stopped = vec![false; n];
    let mut waves = Vec::new();
    let mut left = n;
    while left > 0 {
        let mut wave: Vec<usize> = (0..n)
            .rev()
            .filter(|&i| {
                !stopped[i]
                    && !calls
                        .iter()
                        .any(|&(client, server)| server == i && client != i && !stopped[client])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_stop_before_the_services_they_call() {
        // The shipped shape: 0 vmgs <- 1 attest, 2 vtpm; 2 vtpm <- 3 gateway; 4 alone.
        let calls = [(1, 0), (2, 0), (3, 2), (2, 1)];
        assert_eq!(
            stop_waves(5, &calls),
            vec![vec![4, 3], vec![2], vec![1], vec![0]]
        );
        assert!(stop_waves(0, &[]).is_empty());
        // A service calling itself does not wait for itself.
        assert_eq!(stop_waves(1, &[(0, 0)]), vec![vec![0]]);
    }

    #[test]
    fn a_cycle_of_calls_is_broken_at_its_last_service_then_the_calls_decide_again() {
        // 0 -> 1 -> 2 -> 0, and 3 -> 0. After 3, nobody is free: 2 (the last of the cycle)
        // goes alone; then 0, whose callers (2, 3) are gone, before 1, which 0 calls.
        let calls = [(0, 1), (1, 2), (2, 0), (3, 0)];
        assert_eq!(
            stop_waves(4, &calls),
            vec![vec![3], vec![2], vec![0], vec![1]]
        );
    }
}
