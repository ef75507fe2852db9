//! What a benchmark runs in: a temporary directory of its own ([`BenchDir`]: unique, private,
//! removed on every way out), and the machine's load while it ran ([`MachineLoad`]: a
//! benchmark on a machine that others keep busy measures them too, so it says so).

use std::path::Path;
use std::path::PathBuf;

/// A fresh directory for one benchmark run: a unique name (`pv-bench-WHAT-RANDOM`) made
/// with mode 0700 (it holds a platform's chip secret and keys), removed with everything in
/// it when dropped: after success, an error (`?`) or a panic alike.
#[derive(Debug)]
pub struct BenchDir {
    path: PathBuf,
}

impl BenchDir {
    /// A new directory for benchmark `what` inside `parent` (the system's temporary
    /// directory when `None`); never an existing one.
    pub fn new(what: &str, parent: Option<&Path>) -> std::io::Result<BenchDir> {
        use std::os::unix::fs::DirBuilderExt;
        let parent = parent.map_or_else(std::env::temp_dir, Path::to_path_buf);
        for _ in 0..16 {
            let mut nonce = [0u8; 6];
            getrandom::getrandom(&mut nonce).map_err(std::io::Error::other)?;
            let path = parent.join(format!(
                "pv-bench-{what}-{}",
                microkernel::util::hex(&nonce)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(BenchDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("{}: {e}", path.display()),
                    ))
                }
            }
        }
        Err(std::io::Error::other(format!(
            "no unused benchmark directory name in {}",
            parent.display()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Others' share of the machine's CPU time above which a benchmark warns: a quiet machine's
/// background stays at a few percent; one more build on two cores takes half of it or more.
pub const BUSY_SHARE: f64 = 0.15;

/// CPU time counters at one moment, in the kernel's clock ticks.
#[derive(Clone, Copy, Debug)]
struct Ticks {
    /// Every CPU's time, busy or idle (`/proc/stat`).
    total: u64,
    /// Every CPU's busy time: user, nice, system, irq, softirq, steal.
    busy: u64,
    /// This process's CPU time and that of its children it has waited for
    /// (`/proc/self/stat`: utime, stime, cutime, cstime).
    own: u64,
}

fn ticks() -> Option<Ticks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_ticks(&stat, &own)
}

/// [`Ticks`] from the text of `/proc/stat` and `/proc/self/stat`.
fn parse_ticks(stat: &str, own_stat: &str) -> Option<Ticks> {
    let cpu: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))?
        .split_whitespace()
        .skip(1)
        .map(|n| n.parse().unwrap_or(0))
        .collect();
    let field = |i: usize| cpu.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal (guest time is inside user already)
    let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
    let total = busy + field(3) + field(4);
    // The fields after the command name, which may hold spaces and parentheses.
    let after = own_stat.get(own_stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime, stime, cutime, cstime: fields 14-17 of the file, the 12th-15th after the name.
    let own = (11..15)
        .map(|i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum::<Option<u64>>()?;
    Some(Ticks { total, busy, own })
}

/// Others' share of the CPU time between two samples.
fn others_share(start: Ticks, now: Ticks) -> Option<f64> {
    let total = now.total.checked_sub(start.total).filter(|t| *t > 0)?;
    let busy = now.busy.saturating_sub(start.busy);
    let own = now.own.saturating_sub(start.own);
    Some((busy.saturating_sub(own) as f64 / total as f64).clamp(0.0, 1.0))
}

/// The machine's CPU time from [`MachineLoad::start`] on.
#[derive(Debug)]
pub struct MachineLoad {
    start: Option<Ticks>,
}

/// What others did meanwhile.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OthersLoad {
    /// The share of all CPUs' time that processes other than this one and its children used.
    pub share: f64,
    pub cpus: usize,
}

impl MachineLoad {
    pub fn start() -> MachineLoad {
        MachineLoad { start: ticks() }
    }

    /// Others' share of the machine since the start (children count as ours once waited
    /// for), or `None` when `/proc` cannot tell.
    pub fn others(&self) -> Option<OthersLoad> {
        let share = others_share(self.start?, ticks()?)?;
        let cpus = std::fs::read_to_string("/proc/stat")
            .map(|s| {
                s.lines()
                    .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
                    .count()
            })
            .unwrap_or(1)
            .max(1);
        Some(OthersLoad { share, cpus })
    }

    /// The warning to print when others used more than [`BUSY_SHARE`] of the machine.
    pub fn warning(&self) -> Option<String> {
        let load = self.others()?;
        (load.share > BUSY_SHARE).then(|| {
            format!(
                "WARNING: the machine was busy during this benchmark: other processes used {:.0}% \
                 of its {} CPUs' time (more than {:.0}%): its numbers measure them too; run it \
                 again on a quiet machine",
                load.share * 100.0,
                load.cpus,
                BUSY_SHARE * 100.0
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bench_dir_is_unique_private_and_removed_with_its_contents_on_drop() {
        use std::os::unix::fs::PermissionsExt;
        let a = BenchDir::new("unit", None).unwrap();
        let b = BenchDir::new("unit", None).unwrap();
        assert_ne!(a.path(), b.path());
        let mode = std::fs::metadata(a.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::create_dir_all(a.path().join("state/tpm")).unwrap();
        std::fs::write(a.path().join("state/tpm/secret"), b"x").unwrap();
        let path = a.path().to_path_buf();
        let failing = || -> std::io::Result<()> {
            let _dir = a;
            Err(std::io::Error::other("a benchmark failed"))
        };
        assert!(failing().is_err());
        assert!(!path.exists(), "{} left behind", path.display());
        drop(b);
    }

    #[test]
    fn others_load_is_the_busy_time_that_is_not_ours_or_our_childrens() {
        let stat = |user: u64, idle: u64| {
            format!("cpu  {user} 0 100 {idle} 10 5 5 0 0 0\ncpu0 1 2 3 4\ncpu1 1 2 3 4\n")
        };
        // pid (comm with ) and spaces) state ppid ... utime stime cutime cstime ...
        let own = |utime: u64, cutime: u64| {
            format!("42 (pv bench) x) S 1 42 42 0 -1 4194560 0 0 0 0 {utime} 3 {cutime} 0 20 0")
        };
        let start = parse_ticks(&stat(1000, 5000), &own(10, 0)).unwrap();
        assert_eq!((start.busy, start.total, start.own), (1110, 6120, 13));
        // 400 busy ticks out of 1000: 300 of them ours (200 self, 100 a waited-for child).
        let now = parse_ticks(&stat(1400, 5600), &own(210, 100)).unwrap();
        let share = others_share(start, now).unwrap();
        assert!((share - 0.1).abs() < 1e-9, "{share}");
        // All of it ours: nobody else.
        let now = parse_ticks(&stat(1400, 5600), &own(410, 0)).unwrap();
        assert_eq!(others_share(start, now), Some(0.0));
        // No time passed: no answer rather than a division by zero.
        assert_eq!(others_share(start, start), None);
        assert!(parse_ticks("intr 1 2\n", &own(1, 1)).is_none());
        assert!(parse_ticks(&stat(1, 1), "42 (x) S 1 2").is_none());
    }

    #[test]
    fn the_machine_load_of_this_process_can_be_read() {
        let load = MachineLoad::start();
        assert!(
            load.start.is_some(),
            "/proc/stat or /proc/self/stat unreadable"
        );
    }
}
