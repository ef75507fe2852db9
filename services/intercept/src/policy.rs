//! The exit policy for everything intercept does not model as a device: unclaimed ports and
//! MMIO, MSRs, hypercalls and vCPU events.
//!
//! - Unclaimed accesses behave as on a bus with nothing on it: reads return all-ones of the
//!   access size, writes are dropped. They are counted per space and direction, and the first
//!   occurrence of each distinct (space, address) is logged (rate-limited, see
//!   [`crate::ratelimit`]), which shows what a guest probes for.
//! - MSRs: denied by default (the guest gets #GP), except what [`MSR_ALLOWLIST`] lists. KVM
//!   answers every MSR it implements itself; what reaches intercept is what the microkernel's
//!   MSR filter passes up, so the list starts empty. To let a guest use one, add a
//!   [`MsrRule`] with its value and the reason.
//! - Hypercalls: none is implemented; each answers KVM's "unknown hypercall" ([`KVM_ENOSYS`]).
//! - vCPU events end the run with a status that says how it ended ([`event_status`]).
//!
//! Everything the guest causes here is counted exactly and logged at a bounded rate.

use ipc_defs::services::guest::mask;
use ipc_defs::services::guest::Access;
use ipc_defs::services::guest::Next;
use ipc_defs::services::guest::Reply;
use ipc_defs::services::guest::Space;
use ipc_defs::services::intercept::Event;
use ipc_defs::services::intercept::HypercallOutcome;
use ipc_defs::services::intercept::MsrOutcome;

use crate::ratelimit::worth_logging;
use crate::ratelimit::Sightings;
use crate::server::Counters;

pub use ipc_defs::services::intercept::GUEST_CRASHED;
pub use ipc_defs::services::intercept::HALTED_FOREVER;
pub use ipc_defs::services::intercept::HYPERVISOR_FAILED;

/// The hypercall return value for an unknown hypercall: `-KVM_ENOSYS` (-1000), as KVM itself
/// answers one (include/uapi/linux/kvm_para.h).
pub const KVM_ENOSYS: u64 = (-1000i64) as u64;

/// How an allowed MSR behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrAccess {
    /// Reads return the value; writes fault.
    ReadOnly(u64),
    /// Reads return the value; writes are accepted and ignored.
    Constant(u64),
}

/// One allowed MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrRule {
    pub index: u32,
    /// Its architectural name, for logs and for the reader of the table.
    pub name: &'static str,
    pub access: MsrAccess,
}

/// The MSRs a guest may use beyond what KVM implements: none yet (see the module header).
pub const MSR_ALLOWLIST: &[MsrRule] = &[];

/// The policy's state: the MSR table, and what was already logged.
#[derive(Debug)]
pub struct Policy {
    msrs: &'static [MsrRule],
    /// Unclaimed accesses by (is MMIO, address).
    unclaimed: Sightings<(bool, u64)>,
    /// Denied MSRs by (index, is a write).
    denied_msrs: Sightings<(u32, bool)>,
    hypercalls: Sightings<u64>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new()
    }
}

impl Policy {
    /// The platform's policy, with [`MSR_ALLOWLIST`].
    pub fn new() -> Policy {
        Policy::with_msrs(MSR_ALLOWLIST)
    }

    /// A policy with another MSR table.
    pub fn with_msrs(msrs: &'static [MsrRule]) -> Policy {
        Policy {
            msrs,
            unclaimed: Sightings::default(),
            denied_msrs: Sightings::default(),
            hypercalls: Sightings::default(),
        }
    }

    /// An access no device claims (`access.size` already validated).
    pub fn unclaimed(&mut self, access: &Access, counters: &mut Counters) -> Reply {
        let count = match (access.space, access.write.is_some()) {
            (Space::Port, false) => &mut counters.unclaimed_port_reads,
            (Space::Port, true) => &mut counters.unclaimed_port_writes,
            // Config space reaches intercept only through its own host bridge, never as an
            // access of its own; count it with MMIO.
            (Space::Mmio | Space::PciConfig, false) => &mut counters.unclaimed_mmio_reads,
            (Space::Mmio | Space::PciConfig, true) => &mut counters.unclaimed_mmio_writes,
        };
        *count = count.saturating_add(1);
        if let Some(n) = self
            .unclaimed
            .note((access.space == Space::Mmio, access.address))
        {
            tracing::warn!(
                vcpu = access.vcpu,
                space = ?access.space,
                address = format_args!("{:#x}", access.address),
                size = access.size,
                written = %hex(access.written()),
                distinct = n,
                "unclaimed access: reads give all-ones, writes are dropped"
            );
        }
        counters.unclaimed_distinct = self.unclaimed.distinct();
        match access.write {
            Some(_) => Reply::WRITTEN,
            None => Reply::read(mask(access.size)),
        }
    }

    /// `rdmsr` (`write` = `None`) or `wrmsr` of `index`.
    pub fn msr(
        &mut self,
        vcpu: u32,
        index: u32,
        write: Option<u64>,
        counters: &mut Counters,
    ) -> MsrOutcome {
        let outcome = match (self.msrs.iter().find(|r| r.index == index), write) {
            (Some(rule), None) => match rule.access {
                MsrAccess::ReadOnly(v) | MsrAccess::Constant(v) => MsrOutcome::Value(v),
            },
            (Some(rule), Some(_)) => match rule.access {
                MsrAccess::ReadOnly(_) => MsrOutcome::Fault,
                MsrAccess::Constant(_) => MsrOutcome::Value(0),
            },
            (None, _) => MsrOutcome::Fault,
        };
        match outcome {
            MsrOutcome::Value(_) => counters.msrs_allowed = counters.msrs_allowed.saturating_add(1),
            MsrOutcome::Fault => {
                counters.msrs_denied = counters.msrs_denied.saturating_add(1);
                if let Some(n) = self.denied_msrs.note((index, write.is_some())) {
                    tracing::warn!(
                        vcpu,
                        msr = format_args!("{index:#x}"),
                        access = if write.is_some() { "wrmsr" } else { "rdmsr" },
                        written = %hex(write),
                        distinct = n,
                        "MSR denied: the guest gets #GP"
                    );
                }
            }
        }
        outcome
    }

    /// A hypercall: none is implemented.
    pub fn hypercall(
        &mut self,
        vcpu: u32,
        nr: u64,
        args: &[u64; 6],
        counters: &mut Counters,
    ) -> HypercallOutcome {
        counters.hypercalls = counters.hypercalls.saturating_add(1);
        if let Some(n) = self.hypercalls.note(nr) {
            tracing::warn!(
                vcpu,
                nr,
                ?args,
                distinct = n,
                "unknown hypercall: answered -KVM_ENOSYS"
            );
        }
        HypercallOutcome::Return(KVM_ENOSYS)
    }

    /// A vCPU event: the run ends with the event's status.
    pub fn event(&mut self, vcpu: u32, event: &Event, counters: &mut Counters) -> Next {
        counters.events = counters.events.saturating_add(1);
        let status = event_status(event);
        if worth_logging(counters.events) {
            tracing::error!(
                vcpu,
                ?event,
                status = format_args!("{status:#x}"),
                "{}: ending the run",
                describe(event)
            );
        }
        Next::Exit(status)
    }
}

/// A written value for logs ("-" for a read).
fn hex(value: Option<u64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:#x}"))
}

/// The exit status of a run that ended with `event`.
pub fn event_status(event: &Event) -> u8 {
    match event {
        Event::Shutdown => GUEST_CRASHED,
        Event::HaltedForever => HALTED_FOREVER,
        Event::InternalError { .. } | Event::FailEntry { .. } | Event::Unhandled { .. } => {
            HYPERVISOR_FAILED
        }
    }
}

/// What an event means, for the operator.
fn describe(event: &Event) -> String {
    match event {
        Event::Shutdown => "the guest triple-faulted (shutdown)".into(),
        Event::InternalError { suberror } => {
            // KVM_INTERNAL_ERROR_* (include/uapi/linux/kvm.h).
            let what = match suberror {
                1 => "instruction emulation failed",
                2 => "an exception occurred while delivering another",
                3 => "event delivery hit an exit",
                4 => "unexpected exit reason",
                _ => "unknown suberror",
            };
            format!("KVM internal error {suberror}: {what}")
        }
        Event::FailEntry { reason } => {
            format!("KVM could not enter the guest (hardware reason {reason:#x})")
        }
        Event::HaltedForever => "the guest halted with interrupts off".into(),
        Event::Unhandled { reason } => {
            format!("the router does not handle KVM exit reason {reason}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_table_answers_listed_msrs_and_denies_the_rest() {
        const RULES: &[MsrRule] = &[
            MsrRule {
                index: 0x10,
                name: "TEST_RO",
                access: MsrAccess::ReadOnly(7),
            },
            MsrRule {
                index: 0x11,
                name: "TEST_CONST",
                access: MsrAccess::Constant(9),
            },
        ];
        let mut p = Policy::with_msrs(RULES);
        let mut c = Counters::default();
        assert_eq!(p.msr(0, 0x10, None, &mut c), MsrOutcome::Value(7));
        assert_eq!(p.msr(0, 0x10, Some(1), &mut c), MsrOutcome::Fault);
        assert_eq!(p.msr(0, 0x11, None, &mut c), MsrOutcome::Value(9));
        assert_eq!(p.msr(0, 0x11, Some(1), &mut c), MsrOutcome::Value(0));
        assert_eq!(p.msr(0, 0x12, None, &mut c), MsrOutcome::Fault);
        assert_eq!((c.msrs_allowed, c.msrs_denied), (3, 2));
    }

    #[test]
    fn the_platform_allows_no_msr_yet() {
        assert!(MSR_ALLOWLIST.is_empty());
    }

    #[test]
    fn each_kind_of_ending_has_its_own_status() {
        assert_eq!(event_status(&Event::Shutdown), GUEST_CRASHED);
        assert_eq!(event_status(&Event::HaltedForever), HALTED_FOREVER);
        for e in [
            Event::InternalError { suberror: 1 },
            Event::FailEntry {
                reason: 0x8000_0021,
            },
            Event::Unhandled { reason: 99 },
        ] {
            assert_eq!(event_status(&e), HYPERVISOR_FAILED);
        }
        let statuses = [GUEST_CRASHED, HYPERVISOR_FAILED, HALTED_FOREVER];
        assert!(statuses.iter().all(|s| *s != 0));
        assert_ne!(GUEST_CRASHED, HYPERVISOR_FAILED);
        assert_ne!(GUEST_CRASHED, HALTED_FOREVER);
        assert_ne!(HYPERVISOR_FAILED, HALTED_FOREVER);
    }

    #[test]
    fn each_ending_is_explained_to_the_operator_in_kvm_terms() {
        let said = |e: Event| describe(&e);
        assert!(said(Event::Shutdown).contains("triple-faulted"));
        assert!(said(Event::HaltedForever).contains("halted with interrupts off"));
        for (suberror, meaning) in [
            (1, "instruction emulation failed"),
            (2, "an exception occurred while delivering another"),
            (3, "event delivery hit an exit"),
            (4, "unexpected exit reason"),
            (5, "unknown suberror"),
        ] {
            let text = said(Event::InternalError { suberror });
            assert_eq!(text, format!("KVM internal error {suberror}: {meaning}"));
        }
        let text = said(Event::FailEntry {
            reason: 0x8000_0021,
        });
        assert!(
            text.contains("could not enter") && text.contains("0x80000021"),
            "{text}"
        );
        let text = said(Event::Unhandled { reason: 99 });
        assert!(text.contains("exit reason 99"), "{text}");
    }

    #[test]
    fn a_logged_value_is_hex_and_a_read_has_none() {
        assert_eq!(hex(None), "-");
        assert_eq!(hex(Some(0)), "0x0");
        assert_eq!(hex(Some(0xfed4_0000)), "0xfed40000");
    }
}
