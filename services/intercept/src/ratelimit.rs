//! How often intercept logs what the guest does wrong. The guest controls how often it does
//! anything, so every log line it can cause is rate-limited: counters stay exact, the log
//! shows the first occurrences and then a sample.

use std::collections::BTreeSet;

/// Occurrences logged one by one: enough to see what a guest probes at boot.
pub const LOGGED_FIRST: u64 = 16;
/// After the first ones, every this-many-th occurrence is logged, so that a guest stuck in a
/// loop is still visible without flooding the log.
pub const LOG_EVERY: u64 = 1000;
/// Distinct keys remembered to log each one once. A guest that probes more (a sweep of the
/// whole MMIO space) is not remembered further: each new key past this is counted as a new
/// distinct one, and logged only every [`LOG_EVERY`]th time, so memory stays bounded.
pub const REMEMBERED: usize = 1024;

/// Whether the `n`th occurrence (counting from 1) is logged.
pub fn worth_logging(n: u64) -> bool {
    n <= LOGGED_FIRST || n.is_multiple_of(LOG_EVERY)
}

/// Distinct keys seen (an address, an MSR index), for logging each one's first occurrence.
#[derive(Debug)]
pub struct Sightings<K> {
    seen: BTreeSet<K>,
    distinct: u64,
}

impl<K: Ord> Default for Sightings<K> {
    fn default() -> Self {
        Sightings {
            seen: BTreeSet::new(),
            distinct: 0,
        }
    }
}

impl<K: Ord> Sightings<K> {
    /// Notes an occurrence of `key`. Returns its number among the distinct keys if it was not
    /// seen before and is worth logging (see [`worth_logging`]).
    pub fn note(&mut self, key: K) -> Option<u64> {
        if self.seen.contains(&key) {
            return None;
        }
        self.distinct = self.distinct.saturating_add(1);
        if self.seen.len() < REMEMBERED {
            self.seen.insert(key);
        }
        worth_logging(self.distinct).then_some(self.distinct)
    }

    /// Distinct keys seen (approximately, once more than [`REMEMBERED`] were seen).
    pub fn distinct(&self) -> u64 {
        self.distinct
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_occurrences_are_logged_then_every_thousandth() {
        let logged: Vec<u64> = (1..=3000).filter(|n| worth_logging(*n)).collect();
        let mut expected: Vec<u64> = (1..=LOGGED_FIRST).collect();
        expected.extend([1000, 2000, 3000]);
        assert_eq!(logged, expected);
    }

    #[test]
    fn each_distinct_key_is_logged_once() {
        let mut s = Sightings::default();
        assert_eq!(s.note(0x80), Some(1));
        assert_eq!(s.note(0x80), None);
        assert_eq!(s.note(0x81), Some(2));
        assert_eq!(s.note(0x80), None);
        assert_eq!(s.distinct(), 2);
    }

    #[test]
    fn a_sweep_is_remembered_only_up_to_the_bound() {
        let mut s = Sightings::default();
        let logged = (0..100_000u64).filter_map(|k| s.note(k)).count();
        assert_eq!(s.seen.len(), REMEMBERED);
        assert_eq!(s.distinct(), 100_000);
        assert_eq!(logged as u64, LOGGED_FIRST + 100);
    }
}
