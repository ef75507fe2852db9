//! Who each service runs as, and the check that it does: the privilege plan.
//!
//! When the microkernel is root, every service runs under a uid and gid of its own (the
//! manifest's `user = { uid, gid }`, or derived from the service's name in systemd's
//! dynamic-user range, as systemd's `DynamicUser=` and Firecracker's jailer do), with no
//! supplementary groups, every capability set empty (inheritable, permitted, effective,
//! bounding, ambient), and locked securebits, so that neither a uid change nor an exec can
//! give it a capability back. When the microkernel is an ordinary user, the services run
//! in a user namespace that maps that user's uid alone: they run as that user, with the same
//! empty capability sets and locked securebits inside the namespace.
//!
//! [`plan`] is computed once per `paravisor run` (and by `paravisor audit`); the sandbox
//! child applies it between its mounts and its seccomp filter ([`crate::sandbox`]), the
//! supervisor checks `/proc/PID/status` against it before it reports a service running,
//! and `audit --live` lists every check ([`check_pid`]).
//!
//! Never here: the system calls that change identity (the sandbox child makes them).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

use serde::Serialize;

use crate::manifest::Manifest;

/// First and last id of systemd's range for dynamic users (`DynamicUser=`,
/// 61184-65519): ids no distribution hands to an account.
pub const DYNAMIC_FIRST: u32 = 61184;
pub const DYNAMIC_LAST: u32 = 65519;
/// The overflow id ("nobody"/"nogroup"): shared by unrelated daemons and what the kernel
/// shows for unmapped ids, so never a service's.
pub const OVERFLOW_ID: u32 = 65534;

/// SECBIT_NOROOT: uid 0 gains no capabilities at exec.
const SECBIT_NOROOT: u32 = 1 << 0;
const SECBIT_NOROOT_LOCKED: u32 = 1 << 1;
/// SECBIT_NO_SETUID_FIXUP (left off: a uid change away from 0 clears the capability sets).
const SECBIT_NO_SETUID_FIXUP_LOCKED: u32 = 1 << 3;
/// SECBIT_KEEP_CAPS (left off: capabilities do not survive a uid change).
const SECBIT_KEEP_CAPS_LOCKED: u32 = 1 << 5;
/// SECBIT_NO_CAP_AMBIENT_RAISE: no capability can be made ambient.
const SECBIT_NO_CAP_AMBIENT_RAISE: u32 = 1 << 6;
const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: u32 = 1 << 7;

/// The securebits every service runs with: root gets nothing at exec, the setuid fix-up
/// (capabilities cleared when the uids leave 0) stays on, capabilities are never kept across
/// a uid change and never made ambient; every bit locked, so the service cannot change them.
pub const SECUREBITS: u32 = SECBIT_NOROOT
    | SECBIT_NOROOT_LOCKED
    | SECBIT_NO_SETUID_FIXUP_LOCKED
    | SECBIT_KEEP_CAPS_LOCKED
    | SECBIT_NO_CAP_AMBIENT_RAISE
    | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;

/// Names of [`SECUREBITS`], as `paravisor audit` prints them.
pub const SECUREBIT_NAMES: &[&str] = &[
    "noroot",
    "noroot-locked",
    "no-setuid-fixup-locked (fix-up on)",
    "keep-caps-locked (off)",
    "no-cap-ambient-raise",
    "no-cap-ambient-raise-locked",
];

/// The capability sets as `/proc/PID/status` names them; each must read all zeros.
pub const CAPABILITY_SETS: &[&str] = &["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"];

/// Seccomp filters on a service: the spawner thread's (inherited), the loader filter and the
/// service's own.
pub const SERVICE_FILTERS: u32 = 3;

/// A service's uid and gid as the manifest sets them or as derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct UserSpec {
    pub uid: u32,
    pub gid: u32,
    /// The operator allows other services (that say so too) to share these ids.
    pub shared: bool,
}

/// Where a service's ids come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IdSource {
    /// Derived from the service's name in the dynamic-user range.
    Derived,
    /// The manifest's `user = { ... }`.
    Manifest,
    /// The unprivileged microkernel's own ids (the only ones its user namespace maps).
    Microkernel,
}

/// Who runs `paravisor run`: root, or an ordinary user (services then run in a user
/// namespace that maps that user alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Runner {
    Root,
    User {
        uid: u32,
        gid: u32,
        groups: Vec<u32>,
    },
}

impl Runner {
    /// The calling process's identity, from `/proc/self/status`.
    pub fn current() -> Runner {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let ids = |name: &str| -> Vec<u32> {
            field(&status, name)
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        };
        let (uid, gid) = (ids("Uid:"), ids("Gid:"));
        match (uid.get(1), gid.get(1)) {
            (Some(0), _) | (None, _) => Runner::Root,
            (Some(u), Some(g)) => Runner::User {
                uid: *u,
                gid: *g,
                groups: ids("Groups:"),
            },
            (Some(u), None) => Runner::User {
                uid: *u,
                gid: *u,
                groups: Vec::new(),
            },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Runner::Root => "root: each service under its own uid and gid".into(),
            Runner::User { uid, gid, .. } => format!(
                "uid {uid} (not root): every service as uid {uid} gid {gid}, the only ids its user namespace maps"
            ),
        }
    }
}

/// What one service runs as: the plan the sandbox applies and the live audit checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePrivilege {
    pub service: String,
    /// The uid and gid the service runs as, as the host sees them.
    pub uid: u32,
    pub gid: u32,
    pub source: IdSource,
    /// Supplementary groups: none as root; in a user namespace the microkernel's, which an
    /// unprivileged process cannot drop (they are the user's own).
    pub groups: Vec<u32>,
    /// The sandbox child empties the supplementary groups (root only).
    pub drop_groups: bool,
    /// Runs in a user namespace (the microkernel is not root).
    pub user_namespace: bool,
    pub securebits: u32,
    /// Seccomp filters stacked on the service.
    pub filters: u32,
}

/// The ids of every service: each service's own (manifest or derived), or, when the
/// microkernel is not root, its own ids for all. Manifest order.
pub fn plan(m: &Manifest, runner: &Runner) -> Vec<ServicePrivilege> {
    let ids = assign_ids(m.services.iter().map(|s| (s.name.as_str(), s.user)));
    m.services
        .iter()
        .map(|s| {
            let (uid, gid, source) = match runner {
                Runner::Root => ids[&s.name],
                Runner::User { uid, gid, .. } => (*uid, *gid, IdSource::Microkernel),
            };
            let (groups, drop_groups, user_namespace) = match runner {
                Runner::Root => (Vec::new(), true, false),
                Runner::User { groups, .. } => (groups.clone(), false, true),
            };
            ServicePrivilege {
                service: s.name.clone(),
                uid,
                gid,
                source,
                groups,
                drop_groups,
                user_namespace,
                securebits: SECUREBITS,
                filters: SERVICE_FILTERS,
            }
        })
        .collect()
}

/// The derived id of `name` at `attempt`: a hash of the name into the dynamic-user range.
fn derived_id(name: &str, attempt: u32) -> u32 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"paravisor service uid\0");
    h.update(name.as_bytes());
    h.update(attempt.to_le_bytes());
    let d = h.finalize();
    let n = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    DYNAMIC_FIRST + n % (DYNAMIC_LAST - DYNAMIC_FIRST + 1)
}

/// Assigns every service its ids: the manifest's where it sets them; otherwise derived from
/// the name (gid = uid), taking the next attempt while the id is taken by another service
/// (either as uid or gid) or is the overflow id. Services are derived in name order, so the
/// result does not depend on the order of the manifest.
pub fn assign_ids<'a>(
    services: impl IntoIterator<Item = (&'a str, Option<UserSpec>)>,
) -> BTreeMap<String, (u32, u32, IdSource)> {
    let services: Vec<(&str, Option<UserSpec>)> = services.into_iter().collect();
    let mut taken: BTreeSet<u32> = BTreeSet::from([OVERFLOW_ID]);
    let mut out = BTreeMap::new();
    for (name, user) in &services {
        if let Some(u) = user {
            taken.insert(u.uid);
            taken.insert(u.gid);
            out.insert(name.to_string(), (u.uid, u.gid, IdSource::Manifest));
        }
    }
    let mut derived: Vec<&str> = services
        .iter()
        .filter(|(_, u)| u.is_none())
        .map(|(n, _)| *n)
        .collect();
    derived.sort_unstable();
    for name in derived {
        // The range has 4336 ids and the manifest at most MAX_SERVICES services, so a free
        // id is a few attempts away.
        let id = (0..u32::MAX)
            .map(|attempt| derived_id(name, attempt))
            .find(|id| !taken.contains(id))
            .unwrap_or(DYNAMIC_FIRST);
        taken.insert(id);
        out.insert(name.to_string(), (id, id, IdSource::Derived));
    }
    out
}

/// One comparison of a live process with its plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Check {
    /// What was checked (`Uid`, `CapEff`, `Seccomp_filters`, ...).
    pub what: String,
    pub expected: String,
    pub actual: String,
    pub ok: bool,
}

impl Check {
    pub(crate) fn new(what: &str, expected: String, actual: Option<String>) -> Check {
        let actual = actual.unwrap_or_else(|| "(missing)".into());
        Check {
            what: what.into(),
            ok: actual == expected,
            expected,
            actual,
        }
    }

    /// The line a difference becomes in the live audit's findings.
    pub fn difference(&self) -> String {
        format!(
            "{} is {} but the plan says {}",
            self.what, self.actual, self.expected
        )
    }
}

/// The value of `name` (e.g. `"Uid:"`) in a `/proc/PID/status` text, trimmed.
pub(crate) fn field(status: &str, name: &str) -> Option<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The checks of one `/proc/PID/status` text against `p`: uids, gids, groups, every
/// capability set, no_new_privs, seccomp mode and filter count. In this order.
pub fn check_status(status: &str, p: &ServicePrivilege) -> Vec<Check> {
    let four = |id: u32| format!("{id} {id} {id} {id}");
    let mut out = vec![
        Check::new("Uid", four(p.uid), field(status, "Uid:")),
        Check::new("Gid", four(p.gid), field(status, "Gid:")),
        Check::new(
            "Groups",
            p.groups
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(" "),
            field(status, "Groups:"),
        ),
    ];
    for set in CAPABILITY_SETS {
        out.push(Check::new(
            set,
            "0000000000000000".into(),
            field(status, &format!("{set}:")),
        ));
    }
    out.push(Check::new(
        "NoNewPrivs",
        "1".into(),
        field(status, "NoNewPrivs:"),
    ));
    out.push(Check::new("Seccomp", "2".into(), field(status, "Seccomp:")));
    out.push(Check::new(
        "Seccomp_filters",
        p.filters.to_string(),
        field(status, "Seccomp_filters:"),
    ));
    out
}

/// Every check of the live process `pid` against `p`: [`check_status`], and (as root) that
/// the process is not dumpable (the files of its `/proc/PID` belong to root although it runs as
/// `p.uid`, so no process of that uid can trace it or read its memory; the directory itself
/// always shows the effective uid). Securebits have no
/// `/proc` field: the sandbox child reads them back before exec instead.
pub fn check_pid(pid: i32, p: &ServicePrivilege) -> Vec<Check> {
    let mut out = match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => check_status(&status, p),
        Err(e) => vec![Check {
            what: "status".into(),
            expected: "readable".into(),
            actual: format!("/proc/{pid}/status: {e}"),
            ok: false,
        }],
    };
    // In a user namespace the files belong to its root, the microkernel's own uid, either
    // way (and the microkernel's user may trace its services regardless): not observable.
    if p.user_namespace {
        return out;
    }
    out.push(Check::new(
        "Dumpable",
        "no (/proc/PID/status owned by uid 0)".into(),
        std::fs::metadata(format!("/proc/{pid}/status"))
            .ok()
            .map(|m| {
                if m.uid() == 0 {
                    "no (/proc/PID/status owned by uid 0)".into()
                } else {
                    format!("yes (/proc/PID/status owned by uid {})", m.uid())
                }
            }),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(uid: u32) -> Option<UserSpec> {
        Some(UserSpec {
            uid,
            gid: uid,
            shared: false,
        })
    }

    #[test]
    fn derived_ids_are_distinct_nonzero_in_range_and_independent_of_order() {
        let names = [
            "intercept",
            "vmgs",
            "attest",
            "vtpm",
            "tpm-gateway",
            "storage",
        ];
        let a = assign_ids(names.iter().map(|n| (*n, None)));
        let b = assign_ids(names.iter().rev().map(|n| (*n, None)));
        assert_eq!(a, b);
        let ids: BTreeSet<u32> = a.values().map(|(u, _, _)| *u).collect();
        assert_eq!(ids.len(), names.len(), "{a:?}");
        for (uid, gid, source) in a.values() {
            assert!((DYNAMIC_FIRST..=DYNAMIC_LAST).contains(uid));
            assert_eq!(uid, gid);
            assert_ne!(*uid, OVERFLOW_ID);
            assert_eq!(*source, IdSource::Derived);
        }
    }

    #[test]
    fn a_collision_takes_the_next_attempt_and_manifest_ids_are_avoided() {
        // Make "vmgs"'s first choice another service's manifest uid: it moves on.
        let first = derived_id("vmgs", 0);
        let ids = assign_ids([("vmgs", None), ("other", spec(first))]);
        assert_eq!(ids["other"], (first, first, IdSource::Manifest));
        assert_eq!(ids["vmgs"].0, derived_id("vmgs", 1));
        // Two derived services whose hashes collide (found by search: ~80 names suffice for
        // a birthday collision in 4336 ids): the one first in name order keeps its id.
        let mut seen = BTreeMap::new();
        let (x, y) = (0..100_000)
            .map(|i| format!("s{i}"))
            .find_map(|n| {
                let id = derived_id(&n, 0);
                match seen.get(&id) {
                    Some(other) => Some((String::clone(other), n)),
                    None => {
                        seen.insert(id, n);
                        None
                    }
                }
            })
            .expect("a collision");
        let ids = assign_ids([(y.as_str(), None), (x.as_str(), None)]);
        let (first, second) = if x < y { (&x, &y) } else { (&y, &x) };
        assert_eq!(ids[first.as_str()].0, derived_id(first, 0));
        assert_eq!(ids[second.as_str()].0, derived_id(second, 1));
    }

    const STATUS: &str = "Name:\tpv-vmgs\nUid:\t61234\t61234\t61234\t61234\nGid:\t61234\t61234\t61234\t61234\nGroups:\t\nNoNewPrivs:\t1\nSeccomp:\t2\nSeccomp_filters:\t3\nCapInh:\t0000000000000000\nCapPrm:\t0000000000000000\nCapEff:\t0000000000000000\nCapBnd:\t0000000000000000\nCapAmb:\t0000000000000000\n";

    fn planned() -> ServicePrivilege {
        ServicePrivilege {
            service: "vmgs".into(),
            uid: 61234,
            gid: 61234,
            source: IdSource::Derived,
            groups: Vec::new(),
            drop_groups: true,
            user_namespace: false,
            securebits: SECUREBITS,
            filters: SERVICE_FILTERS,
        }
    }

    #[test]
    fn status_of_a_confined_service_passes_every_check() {
        let checks = check_status(STATUS, &planned());
        assert_eq!(checks.len(), 11);
        assert!(checks.iter().all(|c| c.ok), "{checks:?}");
    }

    #[test]
    fn root_or_a_capability_or_a_missing_filter_is_a_difference() {
        for (from, to, what) in [
            (
                "Uid:\t61234\t61234\t61234\t61234",
                "Uid:\t0\t0\t0\t0",
                "Uid",
            ),
            (
                "Gid:\t61234\t61234\t61234\t61234",
                "Gid:\t61234\t0\t61234\t61234",
                "Gid",
            ),
            ("Groups:\t", "Groups:\t0", "Groups"),
            (
                "CapEff:\t0000000000000000",
                "CapEff:\t000001fffeffffff",
                "CapEff",
            ),
            (
                "CapBnd:\t0000000000000000",
                "CapBnd:\t0000000000200000",
                "CapBnd",
            ),
            ("CapAmb:\t0000000000000000", "CapAmb:", "CapAmb"),
            (
                "Seccomp_filters:\t3",
                "Seccomp_filters:\t2",
                "Seccomp_filters",
            ),
            ("NoNewPrivs:\t1", "NoNewPrivs:\t0", "NoNewPrivs"),
        ] {
            let status = STATUS.replace(from, to);
            assert_ne!(status, STATUS);
            let bad: Vec<_> = check_status(&status, &planned())
                .into_iter()
                .filter(|c| !c.ok)
                .collect();
            assert_eq!(bad.len(), 1, "{what}: {bad:?}");
            assert_eq!(bad[0].what, what);
        }
    }

    #[test]
    fn securebits_lock_what_they_set() {
        // Every bit that is set is locked, and the three behaviours are locked either way.
        for (bit, lock) in [(0, 1), (2, 3), (4, 5), (6, 7)] {
            assert!(SECUREBITS & (1 << lock) != 0, "bit {bit} is not locked");
        }
        assert_eq!(SECUREBITS & (1 << 4), 0, "keep-caps must be off");
        assert_eq!(SECUREBITS & (1 << 2), 0, "the setuid fix-up must stay on");
        assert_eq!(SECUREBITS, 0xeb);
    }

    fn shipped() -> Manifest {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest.toml"))
                .unwrap();
        Manifest::parse(std::path::Path::new("manifest.toml"), &text).unwrap()
    }

    #[test]
    fn as_root_each_service_gets_its_own_ids_no_groups_and_every_restriction() {
        let m = shipped();
        let plans = plan(&m, &Runner::Root);
        let ids = assign_ids(m.services.iter().map(|s| (s.name.as_str(), s.user)));
        let names: Vec<&str> = plans.iter().map(|p| p.service.as_str()).collect();
        let expected: Vec<&str> = m.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, expected, "manifest order");
        for p in &plans {
            assert_eq!((p.uid, p.gid, p.source), ids[&p.service], "{}", p.service);
            assert!(p.groups.is_empty() && p.drop_groups && !p.user_namespace);
            assert_eq!((p.securebits, p.filters), (SECUREBITS, SERVICE_FILTERS));
        }
    }

    #[test]
    fn as_a_user_every_service_runs_as_that_user_in_a_user_namespace() {
        let m = shipped();
        let runner = Runner::User {
            uid: 1000,
            gid: 1001,
            groups: vec![1001, 27],
        };
        let plans = plan(&m, &runner);
        assert_eq!(plans.len(), m.services.len());
        for p in &plans {
            assert_eq!(
                (p.uid, p.gid, p.source),
                (1000, 1001, IdSource::Microkernel)
            );
            assert_eq!(p.groups, [1001, 27], "its groups cannot be dropped");
            assert!(!p.drop_groups && p.user_namespace);
            assert_eq!((p.securebits, p.filters), (SECUREBITS, SERVICE_FILTERS));
        }
    }

    #[test]
    fn the_runner_is_described_with_what_it_means_for_the_services() {
        assert!(Runner::Root
            .describe()
            .contains("each service under its own uid"));
        let user = Runner::User {
            uid: 1000,
            gid: 1001,
            groups: vec![],
        };
        let text = user.describe();
        assert!(
            text.contains("uid 1000 (not root)") && text.contains("gid 1001"),
            "{text}"
        );
    }

    #[test]
    fn derived_ids_reach_both_ends_of_the_dynamic_range_and_never_leave_it() {
        // 50,000 names over 4,336 ids: every id, the first and the last included, is hit.
        let ids: BTreeSet<u32> = (0..50_000)
            .map(|i| derived_id(&format!("s{i}"), 0))
            .collect();
        assert_eq!(ids.first(), Some(&DYNAMIC_FIRST));
        assert_eq!(ids.last(), Some(&DYNAMIC_LAST));
        assert_eq!(ids.len() as u32, DYNAMIC_LAST - DYNAMIC_FIRST + 1);
    }

    #[test]
    fn a_difference_names_what_was_found_and_what_was_planned() {
        let c = Check::new(
            "CapEff",
            "0000000000000000".into(),
            Some("00000000a80425fb".into()),
        );
        assert!(!c.ok);
        assert_eq!(
            c.difference(),
            "CapEff is 00000000a80425fb but the plan says 0000000000000000"
        );
        assert_eq!(Check::new("Seccomp", "2".into(), None).actual, "(missing)");
    }

    #[test]
    fn a_live_process_is_checked_field_by_field_and_for_dumpability_as_root() {
        use std::os::unix::fs::MetadataExt;
        let me = std::process::id() as i32;
        let checks = check_pid(me, &planned());
        let what: Vec<&str> = checks.iter().map(|c| c.what.as_str()).collect();
        assert_eq!(
            what,
            [
                "Uid",
                "Gid",
                "Groups",
                "CapInh",
                "CapPrm",
                "CapEff",
                "CapBnd",
                "CapAmb",
                "NoNewPrivs",
                "Seccomp",
                "Seccomp_filters",
                "Dumpable"
            ]
        );
        // This test process is dumpable: its /proc files belong to its own uid.
        let owner = std::fs::metadata(format!("/proc/{me}/status"))
            .unwrap()
            .uid();
        let dumpable = checks.last().unwrap();
        if owner == 0 {
            assert_eq!(dumpable.actual, "no (/proc/PID/status owned by uid 0)");
            assert!(dumpable.ok);
        } else {
            assert_eq!(
                dumpable.actual,
                format!("yes (/proc/PID/status owned by uid {owner})")
            );
            assert!(!dumpable.ok);
        }
        // In a user namespace ownership says nothing: not checked.
        let in_namespace = ServicePrivilege {
            user_namespace: true,
            ..planned()
        };
        assert_eq!(check_pid(me, &in_namespace).len(), 11);
        // A process that is gone fails its checks; it is not a panic.
        let gone = check_pid(i32::MAX, &planned());
        assert_eq!(gone[0].what, "status");
        assert!(gone.iter().all(|c| !c.ok), "{gone:?}");
    }
}
