//! `paravisor bench net`: a Linux guest's network through our net service (pv-net,
//! vhost-user-net, on a TAP the microkernel hands it) against QEMU's own virtio-net on a TAP
//! (`-netdev tap`, QEMU's default user-space back end), in the same run, and what a `kill -9`
//! of pv-net costs the guest ([`crate::bench_net_restart`]).
//!
//! Each side gets a network namespace of its own ([`crate::bench_net_host`]: `ip netns add`,
//! removed at the end) with its TAP's host side at 10.78.0.1/24 and `pv-netpeer` listening there (run by
//! `ip netns exec`: nothing else of ours enters a namespace). The two guests boot one after
//! the other (ours, then QEMU's) from the same kernel and image with the same memory, vCPU
//! and acceleration, and run the same script: ping the host side (busybox `ping`, each
//! reply's time), then several rounds of an upload (`PUT`) and a download (`GET`) of the same
//! random bytes over TCP, both checked against the guest's own SHA-256 and the peer's. The
//! peer times each transfer on the host's clock; the report holds the medians and the ratios
//! ours/QEMU against the issue's targets. The two sides are not measured side by side: the
//! ratio is of the medians, so the others' load on a shared machine can move it.
//!
//! Needs root (namespaces, TAPs, the sandbox), `ip` (iproute2), /dev/net/tun and QEMU; says
//! which is missing and fails otherwise.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use crate::bench_net_host::NetPeer;
use crate::bench_net_host::Netns;
use crate::bench_net_restart::RestartReport;
use crate::bench_storage::err;
use crate::bench_storage::median;
use crate::bench_storage::own_session;
use crate::bench_vtpm::Guard;
use crate::linux_guest;
use crate::linux_guest::GuestFile;
use crate::linux_guest::Image;
use crate::linux_guest::Running;

/// Lines the guest prints for the person watching (echoed to stderr), and the bench's own.
pub const PROGRESS: &str = "bench net:";
/// The TAP's host side, where pv-netpeer listens (inside each side's namespace).
pub const HOST_ADDRESS: &str = "10.78.0.1";
/// The guest's address on its NIC.
pub const GUEST_ADDRESS: &str = "10.78.0.15";
/// pv-netpeer's port on the host side.
const PEER_PORT: u16 = 5001;
/// The TAPs' names in their namespaces (at most 15 bytes, Linux's limit).
const OUR_TAP: &str = "pvtap0";
const QEMU_TAP: &str = "qtap0";
/// The shipped manifest's net listener, asked for.
const NET_LISTENER: &str = "vhost-user-net";
/// Guest RAM and vCPUs, the same for both sides (the transfer file lives in the guest's
/// tmpfs: 64 MiB at most).
const GUEST_MEMORY_MIB: u64 = 512;
/// How long a paravisor may take to have pv-net running (a first start makes the simulated
/// platform's keys: seconds on a busy machine).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The issue's targets: ours at least this share of QEMU's TCP throughput...
pub const TARGET_THROUGHPUT_RATIO: f64 = 0.9;
/// ...and a ping round trip at most this multiple of QEMU's.
pub const TARGET_RTT_RATIO: f64 = 1.2;

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    /// Upload-and-download rounds per side.
    pub rounds: usize,
    /// Bytes moved each way per round, in MiB.
    pub transfer_mib: u64,
    /// Pings per side (0.2 s apart).
    pub pings: u32,
    /// `kill -9`s of pv-net for the restart.
    pub kills: usize,
}

impl Effort {
    /// The default: about 5 minutes under TCG on a 2-core machine (32 MiB each way takes
    /// ~10 s up and ~4 s down per round here; five rounds, so that the median shrugs off two
    /// rounds the others' load slowed).
    pub const FULL: Effort = Effort {
        rounds: 5,
        transfer_mib: 32,
        pings: 20,
        kills: 10,
    };
    /// A smoke run (`--quick`): one small round, a few pings, two kills.
    pub const QUICK: Effort = Effort {
        rounds: 1,
        transfer_mib: 4,
        pings: 5,
        kills: 2,
    };
}

/// One side's samples and medians.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub name: String,
    /// Each round's upload (guest to host) and download, MB/s (10^6 bytes).
    pub upload_mb_per_second: Vec<f64>,
    pub download_mb_per_second: Vec<f64>,
    /// Each ping reply's round trip, milliseconds.
    pub ping_rtt_ms: Vec<f64>,
    pub pings_sent: u32,
    pub upload_median: f64,
    pub download_median: f64,
    pub ping_rtt_median_ms: f64,
}

/// One compared quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub what: String,
    pub unit: String,
    pub ours: f64,
    pub qemu_tap: f64,
    /// ours / QEMU's.
    pub ratio: f64,
    /// The target on the ratio, e.g. ">= 0.90".
    pub target: String,
    pub met: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    /// The guest's kernel, QEMU's acceleration, memory and vCPUs.
    pub guest: String,
    pub rounds: usize,
    pub transfer_bytes: u64,
    pub ours: Side,
    pub qemu_tap: Side,
    pub rows: Vec<Row>,
    pub restart: RestartReport,
}

/// What the bench needs of the host, or why it cannot run.
pub fn check_host() -> Result<(), String> {
    let mut missing = Vec::new();
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        missing.push("root (network namespaces, TAPs and the services' sandbox)");
    }
    if !Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun (the tun module)");
    }
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ip {
        missing.push("the `ip` command (apt-get install iproute2)");
    }
    if !linux_guest::runs("qemu-system-x86_64") {
        missing.push("qemu-system-x86_64 (apt-get install qemu-system-x86)");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "bench net cannot run here: it needs {}",
            missing.join(", ")
        ))
    }
}

/// One transfer as pv-netpeer reports it (`put|get BYTES SHA256 SECONDS`).
#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    pub upload: bool,
    pub bytes: u64,
    pub sha256: String,
    pub seconds: f64,
}

impl Transfer {
    pub fn parse(line: &str) -> Option<Transfer> {
        let mut words = line.split_whitespace();
        let upload = match words.next()? {
            "put" => true,
            "get" => false,
            _ => return None,
        };
        Some(Transfer {
            upload,
            bytes: words.next()?.parse().ok()?,
            sha256: words.next()?.to_string(),
            seconds: words.next()?.parse().ok()?,
        })
    }

    pub fn mb_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds.max(1e-9)
    }
}

/// Each reply's round trip from busybox ping's lines on the console (`PVB-PING 64 bytes from
/// 10.78.0.1: seq=0 ttl=64 time=0.612 ms`).
pub fn ping_times(console: &[String]) -> Vec<f64> {
    console
        .iter()
        .filter_map(|l| {
            l.split_once("PVB-PING ")?
                .1
                .split_once("time=")?
                .1
                .split(' ')
                .next()
        })
        .filter_map(|t| t.parse().ok())
        .collect()
}

/// The guest's script, the same on both sides: eth0 at [`GUEST_ADDRESS`], `PVB-READY` and a
/// wait for the host's "go" (a line typed before the script reads is lost), pings, then the
/// rounds (`PVB-ROUND N` after each), then `PVB-IDLE` and a wait for the host again (the
/// restart kills pv-net meanwhile).
fn guest_script(effort: &Effort) -> String {
    let bytes = effort.transfer_mib << 20;
    format!(
        r#"set -e
n=300
while ! ip link show eth0 >/dev/null 2>&1 && [ "$n" -gt 0 ]; do usleep 100000; n=$((n - 1)); done
ip link set eth0 up
ip addr add {GUEST_ADDRESS}/24 dev eth0
dd if=/dev/urandom of=/tmp/d bs=1M count={mib} 2>/dev/null
want=$(sha256sum /tmp/d | cut -d' ' -f1)
echo "PVB-LOCAL $want"
echo PVB-READY
read -t 600 go
n=100
until ping -c 1 -W 1 {HOST_ADDRESS} >/dev/null 2>&1; do
  n=$((n - 1)); [ "$n" -gt 0 ] || {{ echo "no answer from {HOST_ADDRESS}"; exit 3; }}
done
echo "{PROGRESS} guest: {pings} pings"
ping -c {pings} -i 0.2 -W 5 {HOST_ADDRESS} > /tmp/ping || true
sed 's/^/PVB-PING /' /tmp/ping
r=1
while [ "$r" -le {rounds} ]; do
  {{ echo PUT; cat /tmp/d; }} | nc {HOST_ADDRESS} {PEER_PORT} > /tmp/put
  [ "$(cat /tmp/put)" = "stored {bytes} $want" ] || {{ echo "upload answered: $(cat /tmp/put)"; exit 4; }}
  got=$(echo GET | nc {HOST_ADDRESS} {PEER_PORT} | sha256sum | cut -d' ' -f1)
  [ "$got" = "$want" ] || {{ echo "download's sum $got, not $want"; exit 5; }}
  echo "PVB-ROUND $r"
  echo "{PROGRESS} guest: round $r of {rounds} done"
  r=$((r + 1))
done
echo PVB-IDLE
read -t 900 go
"#,
        mib = effort.transfer_mib,
        pings = effort.pings,
        rounds = effort.rounds,
    )
}

/// Boots the guest with `devices` (in namespace `inside` when given: QEMU's TAP is made
/// there), its console followed.
fn boot(
    image: &Image,
    dir: &Path,
    name: &str,
    inside: Option<&Netns>,
    devices: &[String],
    effort: &Effort,
) -> std::io::Result<Running> {
    let initrd = dir.join(format!("{name}-initrd.img"));
    linux_guest::initrd_with(
        &image.initrd,
        &[GuestFile::script(&guest_script(effort))],
        &initrd,
    )?;
    let qemu = linux_guest::qemu_command(&linux_guest::Machine {
        image,
        initrd: &initrd,
        memory_mib: GUEST_MEMORY_MIB,
        cpus: 1,
        accel: linux_guest::Accel::from_env().map_err(err)?,
        kernel_args: linux_guest::KERNEL_ARGS,
    });
    // Each QEMU in a session of its own, as pv-net is (see `own_session`).
    let mut cmd = match inside {
        Some(ns) => {
            let mut cmd = ns.exec("setsid");
            cmd.arg(qemu.get_program());
            cmd
        }
        None => own_session(qemu.get_program()),
    };
    cmd.args(qemu.get_args()).args(devices);
    Running::spawn(cmd, &dir.join(format!("{name}-qemu.log")), PROGRESS)
}

/// A paravisor serving pv-net's vhost-user-net on a TAP in `ns`.
pub struct NetInstance {
    pub guard: Guard,
    pub state: PathBuf,
    pub dir: PathBuf,
}

impl NetInstance {
    fn start(text: &str, dir: &Path, ns: &Netns) -> std::io::Result<NetInstance> {
        let run_args = [
            "--listen".to_string(),
            NET_LISTENER.to_string(),
            "--tap".to_string(),
            format!("net0={OUR_TAP}@{}", ns.name),
        ];
        let (guard, state) = crate::bench_vtpm::start_instance_with(text, dir, &run_args)?;
        let mut instance = NetInstance {
            guard,
            state,
            dir: dir.to_path_buf(),
        };
        instance.net_pid(None, Instant::now() + START_TIMEOUT)?;
        Ok(instance)
    }

    /// The socket QEMU connects to (the microkernel binds it for `--listen vhost-user-net`).
    pub fn socket(&self) -> PathBuf {
        self.state.join("net/vhost-user-net.sock")
    }

    /// pv-net's pid once it runs (and is not `not`), waiting until `deadline`.
    pub fn net_pid(&mut self, not: Option<i32>, deadline: Instant) -> std::io::Result<i32> {
        use microkernel::control::Command as Control;
        use microkernel::control::Reply;
        loop {
            if let Ok(Reply::Ps { services, .. }) =
                microkernel::control::send(&self.state, &Control::Ps)
            {
                let running = services
                    .iter()
                    .find(|s| s.name == "net")
                    .filter(|s| s.state == "running")
                    .and_then(|s| s.pid)
                    .filter(|p| Some(*p) != not);
                if let Some(pid) = running.filter(|_| self.socket().exists()) {
                    return Ok(pid);
                }
            }
            let log = || crate::bench_guest::log_tail(&self.dir.join("paravisor.log"));
            if let Some(status) = self.guard.exited() {
                return Err(err(format!(
                    "paravisor run exited with {status}; its log ends:\n{}",
                    log()
                )));
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "pv-net was not running in time; the log ends:\n{}",
                    log()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// pv-netpeer listening on the host side of `ns`'s TAP.
fn listening_peer(ns: &Netns) -> std::io::Result<NetPeer> {
    let args = [
        "--listen".to_string(),
        format!("{HOST_ADDRESS}:{PEER_PORT}"),
        // No progress lines: only the transfers' are read.
        "--progress-every".to_string(),
        u64::MAX.to_string(),
    ];
    NetPeer::start(ns, &args, "listening ")
}

/// The guest's pings and rounds once it is READY: sends "go", follows the console to
/// `PVB-IDLE`, and checks every transfer the peer reports against the guest's sum.
fn measure_side(
    name: &str,
    guest: &mut Running,
    peer: &mut NetPeer,
    effort: &Effort,
) -> std::io::Result<Side> {
    // Only to end a hung guest: boot, pings and a minute for every 8 MiB each way (under TCG
    // 8 MiB take ~3 s up and ~1 s down here), whatever the load.
    let budget =
        Duration::from_secs(120 + 60 * effort.rounds as u64 * effort.transfer_mib.div_ceil(8));
    let deadline = Instant::now() + budget;
    let local = guest.line_with("PVB-LOCAL ", deadline)?;
    let want = local
        .split_once("PVB-LOCAL ")
        .map(|(_, sum)| sum.trim().to_string())
        .unwrap_or_default();
    guest.line_with("PVB-READY", deadline)?;
    guest.send_line("go")?;
    guest.line_with("PVB-IDLE", deadline)?;
    let bytes = effort.transfer_mib << 20;
    let (mut upload, mut download) = (Vec::new(), Vec::new());
    for _ in 0..effort.rounds * 2 {
        let line = peer.wait_for("", deadline)?;
        let transfer = Transfer::parse(&line)
            .filter(|t| t.bytes == bytes && t.sha256 == want)
            .ok_or_else(|| {
                err(format!(
                    "{name}: pv-netpeer reported {line:?}; the guest sent {bytes} bytes of \
                     SHA-256 {want}"
                ))
            })?;
        if transfer.upload {
            upload.push(transfer.mb_per_second());
        } else {
            download.push(transfer.mb_per_second());
        }
    }
    let rtt = ping_times(guest.console());
    if rtt.is_empty() {
        return Err(guest.failure(&format!("{name}: no ping was answered")));
    }
    Ok(Side {
        name: name.into(),
        upload_median: median(upload.clone()),
        download_median: median(download.clone()),
        ping_rtt_median_ms: median(rtt.clone()),
        upload_mb_per_second: upload,
        download_mb_per_second: download,
        ping_rtt_ms: rtt,
        pings_sent: effort.pings,
    })
}

/// Ends a guest waiting at `PVB-IDLE` and checks its script's status.
fn finish(guest: &mut Running) -> std::io::Result<()> {
    guest.send_line("go")?;
    let status = guest.exit_status(Instant::now() + Duration::from_secs(60))?;
    if status != 0 {
        return Err(guest.failure(&format!("the guest's script exited with {status}")));
    }
    Ok(())
}

/// The rows from both sides' medians.
pub fn rows(ours: &Side, qemu: &Side) -> Vec<Row> {
    let throughput = |what: &str, a: f64, b: f64| Row {
        what: what.into(),
        unit: "MB/s".into(),
        ours: a,
        qemu_tap: b,
        ratio: a / b,
        target: format!(">= {TARGET_THROUGHPUT_RATIO:.2}"),
        met: a / b >= TARGET_THROUGHPUT_RATIO,
    };
    let (a, b) = (ours.ping_rtt_median_ms, qemu.ping_rtt_median_ms);
    vec![
        throughput(
            "TCP upload (guest to host)",
            ours.upload_median,
            qemu.upload_median,
        ),
        throughput(
            "TCP download (host to guest)",
            ours.download_median,
            qemu.download_median,
        ),
        Row {
            what: "ping round trip (guest to host)".into(),
            unit: "ms".into(),
            ours: a,
            qemu_tap: b,
            ratio: a / b,
            target: format!("<= {TARGET_RTT_RATIO:.2}"),
            met: a / b <= TARGET_RTT_RATIO,
        },
    ]
}

/// Everything `bench net` measures, in `dir` (a fresh directory of its own).
pub fn run(
    manifest: &Path,
    dir: &Path,
    image_script: &Path,
    effort: Effort,
) -> std::io::Result<Report> {
    check_host().map_err(err)?;
    let shipped = std::fs::read_to_string(manifest)?;
    let text = crate::bench_storage::with_restart_policy(
        &shipped,
        "net",
        crate::bench_net_restart::RESTART_POLICY,
    )
    .map_err(err)?;
    let image = linux_guest::build_image(image_script).map_err(err)?;
    let accel = linux_guest::Accel::from_env().map_err(err)?;

    eprintln!("{PROGRESS} ours: pv-net (vhost-user-net) on TAP {OUR_TAP} in a namespace");
    let ours_ns = Netns::new("ours")?;
    let mut instance = NetInstance::start(&text, &dir.join("ours"), &ours_ns)?;
    ours_ns.address(OUR_TAP, Instant::now() + Duration::from_secs(30))?;
    let mut peer = listening_peer(&ours_ns)?;
    let socket = instance.socket();
    let devices: Vec<String> = vec![
        "-chardev".into(),
        format!("socket,id=n0,path={},reconnect=1", socket.display()),
        "-netdev".into(),
        "vhost-user,id=net0,chardev=n0".into(),
        "-device".into(),
        // vectors=0: QEMU 7.2's vhost-user-net crashes with MSI-X; status=off: no link flap
        // while pv-net restarts (docs/net.md).
        "virtio-net-pci,netdev=net0,vectors=0,status=off".into(),
    ];
    let mut guest = boot(&image, dir, "ours", None, &devices, &effort)?;
    let ours = measure_side("ours", &mut guest, &mut peer, &effort)?;
    drop(peer);
    eprintln!("{PROGRESS} restart: kill -9 of pv-net under the idle guest, probed from the host");
    let restart = crate::bench_net_restart::run(&mut instance, &ours_ns, effort.kills)?;
    finish(&mut guest)?;
    drop(guest);
    drop(instance);
    drop(ours_ns);

    eprintln!("{PROGRESS} baseline: QEMU's -netdev tap (TAP {QEMU_TAP}) in a namespace");
    let qemu_ns = Netns::new("qemu")?;
    let devices: Vec<String> = vec![
        "-netdev".into(),
        format!("tap,id=net0,ifname={QEMU_TAP},script=no,downscript=no"),
        "-device".into(),
        "virtio-net-pci,netdev=net0".into(),
    ];
    let mut guest = boot(&image, dir, "qemu", Some(&qemu_ns), &devices, &effort)?;
    qemu_ns.address(QEMU_TAP, Instant::now() + Duration::from_secs(60))?;
    let mut peer = listening_peer(&qemu_ns)?;
    let qemu_tap = measure_side("QEMU tap", &mut guest, &mut peer, &effort)?;
    finish(&mut guest)?;
    drop(guest);
    drop(peer);
    drop(qemu_ns);

    Ok(Report {
        guest: format!(
            "{} under QEMU ({accel:?}), 1 vCPU, {GUEST_MEMORY_MIB} MiB",
            image.kernel.display()
        ),
        rounds: effort.rounds,
        transfer_bytes: effort.transfer_mib << 20,
        rows: rows(&ours, &qemu_tap),
        ours,
        qemu_tap,
        restart,
    })
}

/// "min-max" of `v` with `decimals`.
pub(crate) fn range(v: &[f64], decimals: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.decimals$}-{max:.decimals$}")
}

pub fn text(r: &Report) -> String {
    let mut out = format!(
        "Network in a Linux guest: ours (pv-net, vhost-user-net, on a TAP) against QEMU's own \
         virtio-net on a TAP (-netdev tap, user-space back end), each TAP's host side in a \
         namespace of its own\n  guest: {}; ours with vectors=0 (INTx: QEMU 7.2's \
         vhost-user-net crashes with MSI-X), QEMU's with its default MSI-X\n  TCP to pv-netpeer \
         on the host side: {} rounds of {} MiB up and down, checksummed; ping: busybox, {} \
         per side, 0.2 s apart; medians; the sides ran one after the other, ratio = ours / \
         QEMU's medians\n",
        r.guest,
        r.rounds,
        r.transfer_bytes >> 20,
        r.ours.pings_sent,
    );
    out.push_str(&format!(
        "  {:<32} {:>6} {:>9} {:>9} {:>10} {:>8}  {}\n",
        "", "unit", "ours", "QEMU tap", "ours/QEMU", "target", "met"
    ));
    for row in &r.rows {
        let decimals = if row.unit == "ms" { 3 } else { 2 };
        out.push_str(&format!(
            "  {:<32} {:>6} {:>9.decimals$} {:>9.decimals$} {:>9.2}x {:>8}  {}\n",
            row.what,
            row.unit,
            row.ours,
            row.qemu_tap,
            row.ratio,
            row.target,
            if row.met { "yes" } else { "NO" }
        ));
    }
    for side in [&r.ours, &r.qemu_tap] {
        out.push_str(&format!(
            "  {:<9} upload {} MB/s, download {} MB/s, ping {} ms ({} of {} answered)\n",
            side.name,
            range(&side.upload_mb_per_second, 2),
            range(&side.download_mb_per_second, 2),
            range(&side.ping_rtt_ms, 3),
            side.ping_rtt_ms.len(),
            side.pings_sent
        ));
    }
    out.push_str(&crate::bench_net_restart::text(&r.restart));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_line_gives_the_transfer_and_its_rate() {
        let t = Transfer::parse("put 4194304 ab12 0.500000").unwrap();
        assert!(t.upload);
        assert_eq!((t.bytes, t.sha256.as_str()), (4194304, "ab12"));
        assert!((t.mb_per_second() - 8.388608).abs() < 1e-9);
        assert!(!Transfer::parse("get 1 x 1.0").unwrap().upload);
        assert_eq!(Transfer::parse("progress 4194304"), None);
        assert_eq!(Transfer::parse("put 12 ab"), None);
        assert_eq!(Transfer::parse("put x ab 1.0"), None);
    }

    #[test]
    fn ping_times_are_read_from_busybox_lines_only() {
        let console: Vec<String> = [
            "PVB-PING PING 10.78.0.1 (10.78.0.1): 56 data bytes",
            "PVB-PING 64 bytes from 10.78.0.1: seq=0 ttl=64 time=0.612 ms",
            "PVB-PING 64 bytes from 10.78.0.1: seq=1 ttl=64 time=12.5 ms",
            "64 bytes from 10.78.0.1: seq=9 ttl=64 time=99 ms",
            "PVB-PING round-trip min/avg/max = 0.612/6.556/12.500 ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(ping_times(&console), vec![0.612, 12.5]);
    }

    #[test]
    fn a_row_meets_its_target_by_the_ratio_of_the_medians() {
        let side = |up: f64, down: f64, rtt: f64| Side {
            name: "x".into(),
            upload_mb_per_second: vec![up],
            download_mb_per_second: vec![down],
            ping_rtt_ms: vec![rtt],
            pings_sent: 1,
            upload_median: up,
            download_median: down,
            ping_rtt_median_ms: rtt,
        };
        let rows = rows(&side(9.0, 5.0, 1.3), &side(10.0, 10.0, 1.0));
        assert!(rows[0].met, "0.9x of the upload is enough");
        assert!(!rows[1].met, "0.5x of the download is not");
        assert!(!rows[2].met, "1.3x the round trip is too slow");
        assert!((rows[2].ratio - 1.3).abs() < 1e-9);
    }

    #[test]
    fn the_bench_manifest_changes_only_the_net_services_restart_policy() {
        let shipped =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest.toml"))
                .unwrap();
        let policy = crate::bench_net_restart::RESTART_POLICY;
        let text = crate::bench_storage::with_restart_policy(&shipped, "net", policy).unwrap();
        let net = &text[text.find("name = \"net\"").unwrap()..];
        let net = &net[..net.find("\n[[").unwrap_or(net.len())];
        assert!(net.contains(&format!("restart = {policy}\n")), "{net}");
        assert_eq!(text.matches(policy).count(), 1);
        assert_eq!(text.lines().count(), shipped.lines().count());
    }
}
