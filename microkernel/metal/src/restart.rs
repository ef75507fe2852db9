//! Whether and when a stopped task starts again: the manifest's `restart` rules, as the
//! hosted supervisor applies them (at most `max` restarts per `window`, the first at once,
//! later ones after `backoff`, doubling up to `max-backoff`), on the kernel's clock.

use heapless::Deque;
use ipc_defs::metal::Restart;
use ipc_defs::metal::RestartPolicy;

/// Most restarts remembered per task (a policy's `max` above this counts as this).
pub const REMEMBERED: usize = 32;

/// What happens to a task that stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not restarted: its policy says so (`never`, or `on-failure` after a clean exit).
    Stay,
    /// More than `max` restarts within the window: given up.
    CrashLoop,
    /// Restarted at this time (nanoseconds since boot).
    RestartAt(u64),
}

/// The times of a task's recent restarts.
#[derive(Default)]
pub struct History {
    recent: Deque<u64, REMEMBERED>,
}

const MS: u64 = 1_000_000;

impl History {
    pub fn new() -> History {
        History {
            recent: Deque::new(),
        }
    }

    /// Restarts within the window, as of the last decision.
    pub fn recent(&self) -> usize {
        self.recent.len()
    }

    /// The policy applied to a stop at `now` (`failure`: a fault, or a non-zero exit).
    pub fn decide(&mut self, policy: &Restart, failure: bool, now: u64) -> Decision {
        let restart = match policy.policy {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => failure,
            RestartPolicy::Never => false,
        };
        if !restart {
            return Decision::Stay;
        }
        let window = u64::from(policy.window_ms) * MS;
        while self
            .recent
            .front()
            .is_some_and(|t| now.saturating_sub(*t) > window)
        {
            self.recent.pop_front();
        }
        let max = (policy.max as usize).min(REMEMBERED);
        if self.recent.len() >= max {
            return Decision::CrashLoop;
        }
        let delay = match self.recent.len() {
            0 => 0,
            n => {
                let doubled = u64::from(policy.backoff_ms).saturating_mul(1u64 << (n - 1).min(32));
                doubled.min(u64::from(policy.max_backoff_ms)) * MS
            }
        };
        let _ = self.recent.push_back(now);
        Decision::RestartAt(now + delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(policy: RestartPolicy) -> Restart {
        Restart {
            policy,
            max: 3,
            window_ms: 1000,
            backoff_ms: 50,
            max_backoff_ms: 80,
        }
    }

    #[test]
    fn immediate_then_backed_off_then_a_crash_loop_until_the_window_passes() {
        let p = policy(RestartPolicy::Always);
        let mut h = History::new();
        assert_eq!(h.decide(&p, true, 0), Decision::RestartAt(0));
        assert_eq!(h.decide(&p, true, 10 * MS), Decision::RestartAt(60 * MS));
        // Doubled to 100 ms, capped at 80.
        assert_eq!(h.decide(&p, false, 20 * MS), Decision::RestartAt(100 * MS));
        assert_eq!(h.decide(&p, true, 30 * MS), Decision::CrashLoop);
        // Past the window the old restarts are forgotten.
        assert_eq!(
            h.decide(&p, true, 1021 * MS),
            Decision::RestartAt(1021 * MS)
        );
    }

    #[test]
    fn the_policy_decides_whether_at_all() {
        let mut h = History::new();
        assert_eq!(
            h.decide(&policy(RestartPolicy::Never), true, 0),
            Decision::Stay
        );
        let on_failure = policy(RestartPolicy::OnFailure);
        assert_eq!(h.decide(&on_failure, false, 0), Decision::Stay);
        assert_eq!(h.decide(&on_failure, true, 0), Decision::RestartAt(0));
    }
}
