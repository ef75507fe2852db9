//! `paravisor bench memory`: what an idle instance holds in memory. It starts `paravisor run
//! --no-guest` of the shipped manifest in the benchmark's directory, waits until every service
//! runs, and reads:
//! - each process's proportional set size (`/proc/PID/smaps_rollup`: the microkernel and every
//!   service), split into anonymous, file and shared-memory pages;
//! - every shared-memory object the instance holds, counted once by inode, whole (its
//!   allocated pages, mapped or not): the sealed copies of the service binaries and
//!   libraries the microkernel executes from (memfds it holds as descriptors, mostly mapped by
//!   nobody, so in no process's PSS), the library copies in each service's tmpfs root, the
//!   channels, status pages, records and seccomp programs.
//!
//! The total is the processes' PSS less their shared-memory pages (which the objects count
//! whole) plus the objects: nothing counted twice, nothing left out that the instance holds.
//! It is compared with the goal (32 MiB) and with Firecracker's published VMM overhead
//! (< 5 MiB per microVM, its specification), which has no services or sealed images to hold.
//!
//! Reading the services' `/proc` files needs the rights `ps` of another user's processes
//! needs (root, as `run` with namespaces).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

/// The footprint this project aims at for a whole idle instance.
pub const GOAL_KIB: u64 = 32 * 1024;
/// Firecracker's published memory overhead of its VMM process per microVM (its
/// specification: "< 5 MiB").
pub const FIRECRACKER_KIB: u64 = 5 * 1024;
/// How long the instance may take to start every service (catches a hang only).
const START_TIMEOUT: Duration = Duration::from_secs(180);
/// Left to the services after their start, so that start-up allocations settle.
const SETTLE: Duration = Duration::from_secs(1);

/// One process's proportional set size, in KiB.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessMemory {
    pub name: String,
    pub pid: i32,
    pub pss_kib: u64,
    pub pss_anon_kib: u64,
    pub pss_file_kib: u64,
    pub pss_shmem_kib: u64,
}

/// One shared-memory object (a memfd or a tmpfs file), counted once.
#[derive(Debug, Clone, Serialize)]
pub struct SharedObject {
    /// "sealed service binary", "sealed library", "service root library copy" or "channels,
    /// status pages, records".
    pub kind: String,
    /// The memfd's name or the file's path in the root that holds it.
    pub name: String,
    /// Its allocated memory (whole pages), in KiB.
    pub kib: u64,
    /// The processes that hold or map it.
    pub held_by: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub processes: Vec<ProcessMemory>,
    pub shared: Vec<SharedObject>,
    /// Sum of the processes' PSS less their shared-memory pages.
    pub processes_own_kib: u64,
    /// Sum of the shared objects.
    pub shared_kib: u64,
    pub total_kib: u64,
    pub goal_kib: u64,
    pub firecracker_kib: u64,
    /// Sizes of the service executables next to `paravisor` (what each sealed copy holds).
    pub binaries: BTreeMap<String, u64>,
}

fn err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// The `Pss*` lines of `smaps_rollup`, in KiB.
fn parse_rollup(text: &str) -> ProcessMemory {
    let mut m = ProcessMemory::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(value)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(kib) = value.parse::<u64>() else {
            continue;
        };
        match key {
            "Pss:" => m.pss_kib = kib,
            "Pss_Anon:" => m.pss_anon_kib = kib,
            "Pss_File:" => m.pss_file_kib = kib,
            "Pss_Shmem:" => m.pss_shmem_kib = kib,
            _ => {}
        }
    }
    m
}

/// What a memfd's name says it is.
fn memfd_kind(name: &str) -> &'static str {
    if name.starts_with("pv-image-") {
        "sealed service binary"
    } else if name.starts_with("pv-library") {
        "sealed library"
    } else {
        "channels, status pages, records"
    }
}

/// The objects found so far, by (device, inode).
type Objects = BTreeMap<(u64, u64), SharedObject>;

fn add(objects: &mut Objects, meta: &std::fs::Metadata, kind: &str, name: &str, holder: &str) {
    let o = objects
        .entry((meta.dev(), meta.ino()))
        .or_insert_with(|| SharedObject {
            kind: kind.into(),
            name: name.into(),
            // Allocated 512-byte blocks: the pages the object holds, written or not mapped.
            kib: meta.blocks() / 2,
            held_by: Vec::new(),
        });
    if !o.held_by.iter().any(|h| h == holder) {
        o.held_by.push(holder.into());
    }
}

/// The memfds process `pid` holds as descriptors.
fn held_memfds(pid: i32, holder: &str, objects: &mut Objects) -> std::io::Result<()> {
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let path = entry?.path();
        let Ok(target) = std::fs::read_link(&path) else {
            continue;
        };
        let target = target.to_string_lossy();
        let Some(name) = target.strip_prefix("/memfd:") else {
            continue;
        };
        let name = name.trim_end_matches(" (deleted)");
        if let Ok(meta) = std::fs::metadata(&path) {
            add(objects, &meta, memfd_kind(name), name, holder);
        }
    }
    Ok(())
}

/// A device as (major, minor): `mountinfo` writes them in decimal, `maps` in hexadecimal.
fn device(text: &str, radix: u32) -> Option<(u32, u32)> {
    let (major, minor) = text.split_once(':')?;
    Some((
        u32::from_str_radix(major, radix).ok()?,
        u32::from_str_radix(minor, radix).ok()?,
    ))
}

/// The devices of process `pid`'s tmpfs mounts.
fn tmpfs_devices(pid: i32) -> Vec<(u32, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (head, tail) = l.split_once(" - ")?;
            if tail.split_whitespace().next()? != "tmpfs" {
                return None;
            }
            device(head.split_whitespace().nth(2)?, 10)
        })
        .collect()
}

/// The shared-memory files process `pid` maps: memfds, and files of its tmpfs mounts (a
/// service's root with its library copies).
fn mapped_shmem(pid: i32, holder: &str, objects: &mut Objects) -> std::io::Result<()> {
    let tmpfs = tmpfs_devices(pid);
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    for line in maps.lines() {
        let fields: Vec<&str> = line.splitn(6, char::is_whitespace).collect();
        let [range, _, _, dev, inode, path] = fields[..] else {
            continue;
        };
        let path = path.trim();
        if inode == "0" || path.is_empty() {
            continue;
        }
        let kind = if let Some(name) = path.strip_prefix("/memfd:") {
            memfd_kind(name.trim_end_matches(" (deleted)"))
        } else if device(dev, 16).is_some_and(|d| tmpfs.contains(&d)) {
            "service root library copy"
        } else {
            continue;
        };
        let name = path
            .strip_prefix("/memfd:")
            .unwrap_or(path)
            .trim_end_matches(" (deleted)");
        // The mapped file itself (root may open it through map_files); else by its path in
        // the process's root.
        let meta = std::fs::metadata(format!("/proc/{pid}/map_files/{range}"))
            .or_else(|_| std::fs::metadata(format!("/proc/{pid}/root{path}")));
        if let Ok(meta) = meta {
            add(objects, &meta, kind, name, holder);
        }
    }
    Ok(())
}

/// Measures the running instance whose microkernel is `paravisor` and whose services are
/// `services` (name, pid).
pub fn measure(
    paravisor: i32,
    services: &[(String, i32)],
    bin_dir: &Path,
    binaries: &[String],
) -> std::io::Result<Report> {
    let mut processes = Vec::new();
    let mut objects = Objects::new();
    let all = std::iter::once(("paravisor".to_string(), paravisor)).chain(services.iter().cloned());
    for (name, pid) in all {
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
            .map_err(|e| err(format!("/proc/{pid}/smaps_rollup ({name}): {e}")))?;
        processes.push(ProcessMemory {
            name: name.clone(),
            pid,
            ..parse_rollup(&rollup)
        });
        if pid == paravisor {
            held_memfds(pid, &name, &mut objects)?;
        }
        mapped_shmem(pid, &name, &mut objects)?;
    }
    let processes_own_kib = processes
        .iter()
        .map(|p| p.pss_kib.saturating_sub(p.pss_shmem_kib))
        .sum();
    let mut shared: Vec<SharedObject> = objects.into_values().collect();
    shared.sort_by(|a, b| a.kind.cmp(&b.kind).then(b.kib.cmp(&a.kib)));
    let shared_kib = shared.iter().map(|o| o.kib).sum();
    let binaries = binaries
        .iter()
        .map(|b| {
            let size = std::fs::metadata(bin_dir.join(b)).map_or(0, |m| m.len());
            (b.clone(), size)
        })
        .collect();
    Ok(Report {
        processes,
        shared,
        processes_own_kib,
        shared_kib,
        total_kib: processes_own_kib + shared_kib,
        goal_kib: GOAL_KIB,
        firecracker_kib: FIRECRACKER_KIB,
        binaries,
    })
}

/// Starts an idle instance of `manifest` in `dir` (a fresh directory of the benchmark's
/// own), measures it, stops it.
pub fn run(manifest: &Path, dir: &Path, bin_dir: &Path) -> std::io::Result<Report> {
    let text = std::fs::read_to_string(manifest)?;
    let m = microkernel::manifest::Manifest::parse(manifest, &text).map_err(err)?;
    let instance_dir = dir.join("instance");
    let (mut paravisor, state) = crate::bench_vtpm::start_instance(&text, &instance_dir, &[])?;
    let deadline = Instant::now() + START_TIMEOUT;
    let services = loop {
        if let Ok(microkernel::control::Reply::Ps { services, .. }) =
            microkernel::control::send(&state, &microkernel::control::Command::Ps)
        {
            if services.len() == m.services.len()
                && services
                    .iter()
                    .all(|s| s.state == "running" && s.pid.is_some())
            {
                break services;
            }
        }
        if let Some(status) = paravisor.exited() {
            return Err(err(format!(
                "paravisor run exited with {status}; its log ends:\n{}",
                crate::bench_guest::log_tail(&instance_dir.join("paravisor.log"))
            )));
        }
        if Instant::now() > deadline {
            return Err(err(format!(
                "not every service was running after {START_TIMEOUT:?}; the log ends:\n{}",
                crate::bench_guest::log_tail(&instance_dir.join("paravisor.log"))
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(SETTLE);
    let services: Vec<(String, i32)> = services
        .into_iter()
        .filter_map(|s| Some((s.name, s.pid?)))
        .collect();
    let binaries: Vec<String> = m.services.iter().map(|s| s.binary.clone()).collect();
    measure(paravisor.pid(), &services, bin_dir, &binaries)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

pub fn text(r: &Report) -> String {
    let mut out = String::from(
        "idle instance (`paravisor run --no-guest`, the shipped manifest): proportional set \
         size of each process (/proc/PID/smaps_rollup)\n",
    );
    out.push_str(&format!(
        "  {:<14} {:>8} {:>10} {:>10} {:>10} {:>10}\n",
        "process", "pid", "PSS", "anon", "file", "shmem"
    ));
    for p in &r.processes {
        out.push_str(&format!(
            "  {:<14} {:>8} {:>10} {:>10} {:>10} {:>10}\n",
            p.name,
            p.pid,
            mib(p.pss_kib),
            mib(p.pss_anon_kib),
            mib(p.pss_file_kib),
            mib(p.pss_shmem_kib)
        ));
    }
    out.push_str("shared memory the instance holds, each object once, whole:\n");
    let mut kinds: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for o in &r.shared {
        let k = kinds.entry(o.kind.as_str()).or_default();
        k.0 += 1;
        k.1 += o.kib;
    }
    for (kind, (count, kib)) in &kinds {
        out.push_str(&format!(
            "  {:<44} {:>10}\n",
            format!("{kind} ({count})"),
            mib(*kib)
        ));
    }
    let sizes: Vec<String> = r
        .binaries
        .iter()
        .map(|(b, s)| format!("{b} {}", mib(s / 1024)))
        .collect();
    out.push_str(&format!("  (service executables: {})\n", sizes.join(", ")));
    out.push_str(&format!(
        "total: {} = the processes' own pages {} + shared memory {}\n\
         goal < {}: {}; Firecracker's published VMM overhead < {} per microVM: ours is {:.1}x that\n",
        mib(r.total_kib),
        mib(r.processes_own_kib),
        mib(r.shared_kib),
        mib(r.goal_kib),
        if r.total_kib < r.goal_kib {
            "met"
        } else {
            "NOT met"
        },
        mib(r.firecracker_kib),
        r.total_kib as f64 / r.firecracker_kib as f64
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pss_lines_of_smaps_rollup_are_read_in_kib() {
        let text =
            "00400000-7ffd00000000 ---p 00000000 00:00 0                          [rollup]\n\
                    Rss:                4120 kB\n\
                    Pss:                1234 kB\n\
                    Pss_Dirty:           800 kB\n\
                    Pss_Anon:            700 kB\n\
                    Pss_File:            500 kB\n\
                    Pss_Shmem:            34 kB\n\
                    Shared_Clean:       2000 kB\n";
        let m = parse_rollup(text);
        assert_eq!(
            (m.pss_kib, m.pss_anon_kib, m.pss_file_kib, m.pss_shmem_kib),
            (1234, 700, 500, 34)
        );
    }

    #[test]
    fn devices_are_read_in_decimal_from_mountinfo_and_in_hexadecimal_from_maps() {
        assert_eq!(device("0:26", 10), Some((0, 26)));
        assert_eq!(device("00:1a", 16), Some((0, 26)));
        assert_eq!(device("fd:01", 16), Some((253, 1)));
        assert_eq!(device("x", 16), None);
    }

    #[test]
    fn memfds_are_classified_by_the_names_the_microkernel_gives_them() {
        assert_eq!(memfd_kind("pv-image-pv-vtpm"), "sealed service binary");
        assert_eq!(memfd_kind("pv-library"), "sealed library");
        assert_eq!(
            memfd_kind("pv-chan-vtpm-vmgs"),
            "channels, status pages, records"
        );
    }

    #[test]
    fn this_process_maps_and_holds_a_memfd_that_is_found_once_whole() {
        use std::io::Write;
        let fd = ipc_defs::hosted::sys::memfd("pv-image-unit", 0).unwrap();
        let mut file = std::fs::File::from(fd);
        file.write_all(&vec![7u8; 64 * 1024]).unwrap();
        let me = std::process::id() as i32;
        let mut objects = Objects::new();
        held_memfds(me, "me", &mut objects).unwrap();
        let found: Vec<&SharedObject> = objects
            .values()
            .filter(|o| o.name == "pv-image-unit")
            .collect();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].kind, "sealed service binary");
        assert_eq!(found[0].kib, 64);
        // Seen again (as another holder): still one object.
        held_memfds(me, "again", &mut objects).unwrap();
        let o = objects
            .values()
            .find(|o| o.name == "pv-image-unit")
            .unwrap();
        assert_eq!(o.held_by, ["me", "again"]);
    }
}
