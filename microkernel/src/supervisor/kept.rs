//! Services' descriptor stores in the supervisor's loop ([`crate::fd_store`]): taking what a
//! service sends (a bounded number of packets per turn, never waiting), everything it sent
//! before it died, logging refusals, and dropping what is kept when the service is given up.

use super::*;
use crate::fd_store::Applied;
use crate::fd_store::Event;

/// Refusals logged one by one per service; after that, every thousandth (each is counted).
const REFUSALS_LOGGED: u64 = 20;

impl Supervisor {
    /// Takes up to `budget` packets from service `i`'s store, without waiting.
    pub(super) fn take_kept(&mut self, i: usize, budget: usize) {
        let s = &mut self.services[i];
        let Some(store) = s.store.as_mut() else {
            return;
        };
        for event in store.take(budget) {
            match event {
                Event::Applied(Applied::Kept { id, replaced }) => {
                    tracing::debug!(
                        service = %s.spec.name,
                        id,
                        replaced = replaced.is_some(),
                        kept = store.len(),
                        "descriptor kept"
                    );
                }
                Event::Applied(Applied::Forgot { id, .. }) => {
                    tracing::debug!(service = %s.spec.name, id, kept = store.len(), "descriptor forgotten");
                }
                Event::Refused(refusal) => {
                    let n = store.refused;
                    if n <= REFUSALS_LOGGED || n.is_multiple_of(1000) {
                        tracing::warn!(
                            service = %s.spec.name,
                            refused = n,
                            "fd store: refused {refusal}; its descriptors closed"
                        );
                        s.output
                            .note(format!("fd store refused {refusal} ({n} refused in all)"));
                    }
                }
            }
        }
    }

    /// Service `i`'s process is gone: applies everything it sent before it died, so that its
    /// next start gets all of it.
    pub(super) fn take_kept_of_the_dead(&mut self, i: usize) {
        self.take_kept(i, crate::fd_store::PACKETS_AFTER_DEATH);
    }

    /// Service `i` will not start again (given up, stopped) or the paravisor stops: what its
    /// store keeps is closed, so that the peers of its connections see them end.
    pub(super) fn drop_kept(&mut self, i: usize, why: &str) {
        let s = &mut self.services[i];
        if let Some(store) = s.store.as_mut() {
            let n = store.clear();
            if n > 0 {
                tracing::info!(service = %s.spec.name, "fd store: {n} kept descriptors closed ({why})");
                s.output
                    .note(format!("{n} kept descriptors closed ({why})"));
            }
        }
    }
}
