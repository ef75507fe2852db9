//! `paravisor bench vtpm`: our vTPM (a whole `paravisor run`: gateway process, vtpm process,
//! VMGS write-through, checkpoints) against `swtpm` started in the same run, both over one
//! persistent loopback connection speaking the swtpm data protocol (bare TPM commands).
//! Also the time from `kill -9` of pv-vtpm to the first successful command afterwards.
//!
//! The two are measured in alternating rounds (ours, swtpm, ours, ...) so that a disturbance
//! of the shared machine hits both alike, and the median round is reported. Everything runs
//! twice: as the scheduler places it on all CPUs (where a cross-CPU wake-up costs ~47 us and
//! the placement the scheduler happens to choose decides most of the rate), and with every
//! process of both (the client too) on one CPU, which is reproducible.

use std::io::Read;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub operation: String,
    /// Median over the rounds.
    pub ours_per_second: f64,
    pub swtpm_per_second: Option<f64>,
    /// Median of the per-round ratios (ours / swtpm).
    pub ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct Placement {
    /// "all CPUs" or "one CPU".
    pub cpus: String,
    pub rates: Vec<Rate>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub placements: Vec<Placement>,
    /// Each kill's time to the first successful command, in milliseconds, in order: the first
    /// restart in the policy's window is immediate, later ones wait out its doubling back-off.
    pub restart_to_first_command_ms: Vec<f64>,
}

/// How long a benchmark's paravisor gets to stop its services when asked.
const STOP_GRACE: Duration = Duration::from_secs(30);

/// A child process, ended when dropped: a paravisor (`state`: its state directory) is asked to
/// stop first, so that it stops and reaps its services (their CPU time then counts as this
/// process's, see `bench_env::MachineLoad`); anything else is killed.
pub struct Guard {
    child: Child,
    state: Option<std::path::PathBuf>,
}

impl Guard {
    /// A process that is killed when the guard is dropped.
    pub fn process(child: Child) -> Guard {
        Guard { child, state: None }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// How the process ended, if it has.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(state) = &self.state {
            if microkernel::control::send(state, &microkernel::control::Command::Shutdown).is_ok() {
                let until = Instant::now() + STOP_GRACE;
                while Instant::now() < until {
                    if let Ok(Some(_)) = self.child.try_wait() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// One TPM command over a swtpm-protocol data connection.
fn transact(s: &mut TcpStream, command: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(command)?;
    let mut header = [0u8; 10];
    s.read_exact(&mut header)?;
    let size = u32::from_be_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if !(10..=4096).contains(&size) {
        return Err(err(format!("response of {size} bytes")));
    }
    let mut response = header.to_vec();
    response.resize(size, 0);
    s.read_exact(&mut response[10..])?;
    Ok(response)
}

fn rc(response: &[u8]) -> u32 {
    u32::from_be_bytes([response[6], response[7], response[8], response[9]])
}

/// TPM_RC_RETRY: the TPM could not start the command; the client sends it again.
const RC_RETRY: u32 = 0x922;

fn expect_ok(s: &mut TcpStream, command: &[u8], what: &str) -> std::io::Result<Vec<u8>> {
    let mut r = transact(s, command)?;
    for _ in 0..10 {
        if rc(&r) != RC_RETRY {
            break;
        }
        r = transact(s, command)?;
    }
    if rc(&r) != 0 {
        return Err(err(format!("{what}: TPM error {:#x}", rc(&r))));
    }
    Ok(r)
}

const STARTUP_CLEAR: [u8; 12] = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x44, 0, 0];
const GET_RANDOM_32: [u8; 12] = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 32];
const PCR_READ_16: [u8; 20] = [
    0x80, 1, 0, 0, 0, 20, 0, 0, 1, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, 0, 0, 1,
];
/// A password session with an empty password (TPM_RS_PW).
const PASSWORD_SESSION: [u8; 13] = [0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0];

fn with_size(mut c: Vec<u8>) -> Vec<u8> {
    let len = c.len() as u32;
    c[2..6].copy_from_slice(&len.to_be_bytes());
    c
}

fn pcr_extend_16() -> Vec<u8> {
    let mut c = vec![0x80, 2, 0, 0, 0, 0, 0, 0, 1, 0x82, 0, 0, 0, 16];
    c.extend_from_slice(&PASSWORD_SESSION);
    c.extend_from_slice(&[0, 0, 0, 1, 0, 0x0b]);
    c.extend_from_slice(&[0x5a; 32]);
    with_size(c)
}

/// TPM2_CreatePrimary in the owner hierarchy: a restricted ECDSA P-256 signing key.
fn create_primary_ecc() -> Vec<u8> {
    let mut c = vec![0x80, 2, 0, 0, 0, 0, 0, 0, 1, 0x31, 0x40, 0, 0, 1];
    c.extend_from_slice(&PASSWORD_SESSION);
    c.extend_from_slice(&[0, 4, 0, 0, 0, 0]); // inSensitive: empty auth and data
    let public: Vec<u8> = [
        &[0x00, 0x23, 0x00, 0x0b][..], // ECC, SHA-256 name
        &0x0005_0072u32.to_be_bytes(), // fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|sign
        &[0, 0],                       // no policy
        &[0x00, 0x10],                 // no symmetric
        &[0x00, 0x18, 0x00, 0x0b],     // ECDSA with SHA-256
        &[0x00, 0x03],                 // NIST P-256
        &[0x00, 0x10],                 // no KDF
        &[0, 0, 0, 0],                 // empty unique point
    ]
    .concat();
    c.extend_from_slice(&(public.len() as u16).to_be_bytes());
    c.extend_from_slice(&public);
    c.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // outsideInfo, creationPCR
    with_size(c)
}

fn quote(handle: u32) -> Vec<u8> {
    let mut c = vec![0x80, 2, 0, 0, 0, 0, 0, 0, 1, 0x58];
    c.extend_from_slice(&handle.to_be_bytes());
    c.extend_from_slice(&PASSWORD_SESSION);
    c.extend_from_slice(&[0, 4, 1, 2, 3, 4]); // qualifying data
    c.extend_from_slice(&[0x00, 0x10]); // the key's own scheme
    c.extend_from_slice(&[0, 0, 0, 1, 0, 0x0b, 3, 1, 0, 0]); // PCR 0, SHA-256
    with_size(c)
}

fn flush(handle: u32) -> Vec<u8> {
    let mut c = vec![0x80, 1, 0, 0, 0, 14, 0, 0, 1, 0x65];
    c.extend_from_slice(&handle.to_be_bytes());
    c
}

/// CreatePrimary(ECC P-256) + Quote + FlushContext.
fn create_and_quote(s: &mut TcpStream) -> std::io::Result<()> {
    let r = expect_ok(s, &create_primary_ecc(), "CreatePrimary")?;
    let handle = u32::from_be_bytes([r[10], r[11], r[12], r[13]]);
    let q = expect_ok(s, &quote(handle), "Quote");
    expect_ok(s, &flush(handle), "FlushContext")?;
    q.map(|_| ())
}

/// Operations per second of `n` operations.
fn round(
    s: &mut TcpStream,
    n: usize,
    op: fn(&mut TcpStream) -> std::io::Result<()>,
) -> std::io::Result<f64> {
    let start = Instant::now();
    for _ in 0..n {
        op(s)?;
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `rounds` alternating rounds of `n` operations on each connection; medians.
fn compare(
    ours: &mut TcpStream,
    mut theirs: Option<&mut TcpStream>,
    name: &str,
    rounds: usize,
    n: usize,
    op: fn(&mut TcpStream) -> std::io::Result<()>,
) -> std::io::Result<Rate> {
    op(ours)?;
    if let Some(t) = theirs.as_deref_mut() {
        op(t)?;
    }
    let (mut mine, mut other, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let m = round(ours, n, op)?;
        mine.push(m);
        if let Some(t) = theirs.as_deref_mut() {
            let o = round(t, n, op)?;
            other.push(o);
            ratios.push(m / o);
        }
    }
    Ok(Rate {
        operation: name.into(),
        ours_per_second: median(mine),
        swtpm_per_second: (!other.is_empty()).then(|| median(other)),
        ratio: (!ratios.is_empty()).then(|| median(ratios)),
    })
}

fn connect(port: u16, deadline: Duration) -> std::io::Result<TcpStream> {
    let until = Instant::now() + deadline;
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                return Ok(s);
            }
            Err(e) if Instant::now() > until => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A free port P with P+1 free too, below the kernel's ephemeral range: a port taken from
/// that range (bind to port 0) may become some client connection's source port before the
/// instance binds it.
fn adjacent_ports() -> std::io::Result<u16> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(12_000);
    let span = u32::from(ephemeral_low - 10_001);
    let mut seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..10_000 {
        seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let p = 10_000 + ((seed >> 8) % span) as u16;
        let a = std::net::TcpListener::bind(("127.0.0.1", p));
        if a.is_ok() && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            return Ok(p);
        }
    }
    Err(err("no two adjacent free ports"))
}

/// The shipped manifest's text with its TPM listeners on free ports (kept adjacent); also
/// the new swtpm data port.
fn listeners_moved(text: &str) -> std::io::Result<(String, u16)> {
    let mssim = adjacent_ports()?;
    let mut swtpm_data = adjacent_ports()?;
    while swtpm_data.abs_diff(mssim) < 2 {
        swtpm_data = adjacent_ports()?;
    }
    let text = text
        .replace("127.0.0.1:2321", &format!("127.0.0.1:{mssim}"))
        .replace("127.0.0.1:2322", &format!("127.0.0.1:{}", mssim + 1))
        .replace("127.0.0.1:2331", &format!("127.0.0.1:{swtpm_data}"))
        .replace("127.0.0.1:2332", &format!("127.0.0.1:{}", swtpm_data + 1));
    Ok((text, swtpm_data))
}

/// Starts `paravisor run --no-guest` of manifest `text` in `dir` (made here; it must not
/// exist yet; the log in `dir/paravisor.log`), with the front ends `listen` names: the process
/// (stopped when dropped) and its state directory.
pub fn start_instance(
    text: &str,
    dir: &Path,
    listen: &[&str],
) -> std::io::Result<(Guard, std::path::PathBuf)> {
    let args: Vec<String> = listen
        .iter()
        .flat_map(|l| ["--listen".to_string(), l.to_string()])
        .collect();
    start_instance_with(text, dir, &args)
}

/// [`start_instance`] with any further `paravisor run` arguments (`--listen NAME`, `--tap
/// NAME=IFNAME@NETNS`).
pub fn start_instance_with(
    text: &str,
    dir: &Path,
    run_args: &[String],
) -> std::io::Result<(Guard, std::path::PathBuf)> {
    std::fs::create_dir(dir)?;
    let run_manifest = dir.join("manifest.toml");
    std::fs::write(&run_manifest, text)?;
    let state = dir.join("state");
    let child = Command::new(microkernel::cli::paravisor())
        .arg("run")
        .arg("--no-guest")
        .arg(&run_manifest)
        .arg("--state-dir")
        .arg(&state)
        .args(run_args)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("paravisor.log"))?)
        .spawn()?;
    Ok((
        Guard {
            child,
            state: Some(state.clone()),
        },
        state,
    ))
}

/// Runs the comparison on all CPUs, then on one. `manifest` is the manifest to run (its
/// listeners are moved to free ports); `dir` (a fresh directory of the benchmark's own) holds
/// the temporary state.
pub fn run(manifest: &Path, dir: &Path, quick: bool) -> std::io::Result<Report> {
    let (all, restarts) = measure(manifest, &dir.join("all-cpus"), quick, true)?;
    // Pinned last: the pin is inherited by everything started from here on.
    ipc_defs::hosted::sys::pin_to_cpu(0)?;
    let (one, _) = measure(manifest, &dir.join("one-cpu"), quick, false)?;
    Ok(Report {
        placements: vec![
            Placement {
                cpus: "all CPUs".into(),
                rates: all,
            },
            Placement {
                cpus: "one CPU".into(),
                rates: one,
            },
        ],
        restart_to_first_command_ms: restarts,
    })
}

/// One paravisor and one swtpm, started afresh: the rates, and (`kills`) the restart times.
fn measure(
    manifest: &Path,
    dir: &Path,
    quick: bool,
    kills: bool,
) -> std::io::Result<(Vec<Rate>, Vec<f64>)> {
    let (rounds, n) = if quick { (3, 50) } else { (7, 300) };
    let (text, swtpm_data) = listeners_moved(&std::fs::read_to_string(manifest)?)?;
    let (_paravisor, state) = start_instance(&text, dir, &["swtpm-data"])?;
    let mut ours = connect(swtpm_data, Duration::from_secs(30))?;
    // The listener is bound before the TPM is up: wait for the first answer.
    let _ = transact(&mut ours, &STARTUP_CLEAR)?;

    let reference = match adjacent_ports().and_then(|p| {
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--flags", "not-need-init"])
            .arg("--server")
            .arg(format!("type=tcp,port={p},bindaddr=127.0.0.1"))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", p + 1))
            .arg("--tpmstate")
            .arg(format!("dir={}", dir.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let guard = Guard { child, state: None };
        let mut s = connect(p, Duration::from_secs(10))?;
        expect_ok(&mut s, &STARTUP_CLEAR, "swtpm Startup")?;
        Ok((guard, s))
    }) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("swtpm not available ({e}); reporting our rates only");
            None
        }
    };
    let (_swtpm_guard, mut theirs) = match reference {
        Some((g, s)) => (Some(g), Some(s)),
        None => (None, None),
    };

    let mut rates = Vec::new();
    type Op = fn(&mut TcpStream) -> std::io::Result<()>;
    let ops: [(&str, Op, usize); 4] = [
        (
            "GetRandom(32)",
            |s| expect_ok(s, &GET_RANDOM_32, "GetRandom").map(|_| ()),
            n,
        ),
        (
            "PCR_Extend(16, SHA-256)",
            |s| expect_ok(s, &pcr_extend_16(), "PCR_Extend").map(|_| ()),
            n,
        ),
        (
            "PCR_Read(16, SHA-256)",
            |s| expect_ok(s, &PCR_READ_16, "PCR_Read").map(|_| ()),
            n,
        ),
        ("CreatePrimary(ECC P-256) + Quote", create_and_quote, n / 10),
    ];
    for (name, op, count) in ops {
        rates.push(compare(
            &mut ours,
            theirs.as_mut(),
            name,
            rounds,
            count,
            op,
        )?);
    }

    // kill -9 of pv-vtpm, then the first successful command.
    let mut restarts = Vec::new();
    let kills = match (kills, quick) {
        (false, _) => 0,
        (true, true) => 1,
        (true, false) => 3,
    };
    for _ in 0..kills {
        let before = Instant::now();
        let status = Command::new(microkernel::cli::paravisor())
            .args(["kill", "vtpm", "--signal", "KILL", "--state-dir"])
            .arg(&state)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            return Err(err("paravisor kill vtpm failed"));
        }
        expect_ok(&mut ours, &GET_RANDOM_32, "GetRandom after the restart")?;
        restarts.push(before.elapsed().as_secs_f64() * 1e3);
        // Let the restart policy's back-off window pass between kills.
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = Command::new(microkernel::cli::paravisor())
        .args(["stop", "--state-dir"])
        .arg(&state)
        .stdout(Stdio::null())
        .status();
    Ok((rates, restarts))
}

pub fn text(r: &Report) -> String {
    let mut out = String::from(
        "vTPM operations per second over one persistent loopback connection \
         (median of alternating rounds; ratio = median of the per-round ratios)\n",
    );
    for placement in &r.placements {
        out.push_str(&format!(
            "  {:<36} {:>10} {:>10} {:>8}\n",
            format!("[{}] operation", placement.cpus),
            "ours",
            "swtpm",
            "ratio"
        ));
        for rate in &placement.rates {
            let theirs = rate
                .swtpm_per_second
                .map_or_else(|| "-".into(), |t| format!("{t:.0}"));
            let ratio = rate
                .ratio
                .map_or_else(|| "-".into(), |x| format!("{x:.2}x"));
            out.push_str(&format!(
                "  {:<36} {:>10.0} {:>10} {:>8}\n",
                rate.operation, rate.ours_per_second, theirs, ratio
            ));
        }
    }
    let times: Vec<String> = r
        .restart_to_first_command_ms
        .iter()
        .map(|t| format!("{t:.1} ms"))
        .collect();
    out.push_str(&format!(
        "kill -9 of pv-vtpm to the first successful command: {} \
         (successive kills: the first restart is immediate, later ones back off)\n",
        times.join(", ")
    ));
    out
}
