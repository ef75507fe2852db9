//! `paravisor bench storage`, the restart: `kill -9` of pv-storage while a Linux guest reads
//! its encrypted disk steadily, and two times per kill:
//!
//! - **the guest's stall**: from the kill to the first request the restarted service
//!   completes, as the guest sees it. fio in the guest reads 4 KiB blocks one at a time at a
//!   fixed rate ([`STEADY_IOPS`]) and logs every completion's time (`write_lat_log`,
//!   `log_avg_msec=0`); a kill shows as a gap between two completions. The gap is the stall
//!   plus the time from the last completion before the kill to the kill, less than one period
//!   (2 ms), so no clock is compared across the guest and the host. QEMU 7.2 reconnects a
//!   second after the disconnection (`reconnect=1` is whole seconds), which bounds this from
//!   below.
//! - **the service's own restart**: from the kill (the moment `paravisor kill` has sent the
//!   signal) to a front end's first message answered by the new process: right after the
//!   kill the bench connects to the socket itself and sends GET_FEATURES (the connection
//!   waits in the listener's queue, which the microkernel keeps, until the new process takes
//!   it), then disconnects before QEMU's reconnection.
//!
//! The service's restart policy is `RESTART_POLICY` for this: more restarts than the shipped
//! five a minute, and a one-second window, so that with kills [`KILL_SPACING`] apart every
//! restart is the first of its window (immediate): the back-off the shipped policy adds to
//! repeated crashes (50 ms, doubling, at most 1 s) is the policy's, not a cost of restarting.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

use crate::bench_storage::blk_device;
use crate::bench_storage::boot;
use crate::bench_storage::err;
use crate::bench_storage::median;
use crate::bench_storage::Instance;
use crate::bench_storage::PROGRESS;
use crate::linux_guest::GuestFile;
use crate::linux_guest::Image;

/// pv-storage's restart policy in the bench's manifests.
pub const RESTART_POLICY: &str =
    "{ policy = \"on-failure\", max = 100, window = \"1s\", backoff = \"50ms\" }";
/// Time between kills: QEMU's one-second reconnection, the handshake and a steady stretch.
pub const KILL_SPACING: Duration = Duration::from_millis(2500);
/// The guest's steady reads per second: one every 2 ms, the resolution of the stall.
pub const STEADY_IOPS: u32 = 500;
/// A pause between two completions at least this long is a stall (the steady period is
/// 2 ms; a restart's stall is at least QEMU's one-second reconnection).
pub const STALL_MS: u32 = 300;

#[derive(Debug, Clone, Serialize)]
pub struct RestartReport {
    pub kills: usize,
    pub restart_policy: String,
    /// Each stall the guest saw, in milliseconds (one per kill, in order).
    pub guest_stalls_ms: Vec<f64>,
    pub guest_stall_median_ms: f64,
    /// Each kill's time to the new process answering a front end, in milliseconds.
    pub service_restarts_ms: Vec<f64>,
    pub service_restart_median_ms: f64,
    /// When the guest saw another number of stalls than there were kills.
    pub note: Option<String>,
}

/// The guest's script: steady reads for `seconds`, then the stalls from fio's log.
fn script(seconds: u64) -> String {
    format!(
        r#"fio --name=steady --filename=/dev/vda --rw=randread --bs=4k --ioengine=psync --direct=1 \
    --rate_iops={STEADY_IOPS} --time_based --runtime={seconds}s --write_lat_log=/tmp/steady \
    --log_avg_msec=0 --output=/tmp/out &
fio=$!
sleep 2
echo "PVB-STEADY"
wait $fio || {{ cat /tmp/out; exit 1; }}
grep -q 'err= 0' /tmp/out || {{ cat /tmp/out; exit 1; }}
log=$(ls /tmp/steady_clat.*.log | head -1)
awk -F, '{{ t = $1 + 0; if (NR > 1 && t - p >= {STALL_MS}) print "PVB-STALL", p, t; p = t }}' "$log"
echo "PVB-COMPLETIONS $(wc -l < "$log")"
"#
    )
}

/// A front end's first message: connects to `socket` and asks for the features; returns when
/// a back end answered.
fn first_answer(socket: &Path, timeout: Duration) -> std::io::Result<()> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    let frontend = Frontend::from_stream(stream, 1);
    frontend
        .get_features()
        .map(|_| ())
        .map_err(|e| err(format!("GET_FEATURES after the kill: {e}")))
}

/// `kills` kills of `instance`'s pv-storage under a guest reading its disk.
pub fn run(
    image: &Image,
    dir: &Path,
    instance: &mut Instance,
    kills: usize,
) -> std::io::Result<RestartReport> {
    let seconds = 2 + (KILL_SPACING * kills as u32).as_secs() + 4;
    let devices = blk_device("encrypted", &instance.socket(), 4);
    let files = [GuestFile::script(&script(seconds))];
    let deadline = Instant::now() + Duration::from_secs(seconds * 3 + 120);
    let mut guest = boot(image, dir, "restart", &devices, &files)?;
    guest.line_with("PVB-STEADY", deadline)?;
    let mut service = Vec::new();
    for k in 0..kills {
        std::thread::sleep(KILL_SPACING);
        let pid = instance.storage_pid(None, Instant::now() + Duration::from_secs(10))?;
        let reply = microkernel::control::send(
            &instance.state,
            &microkernel::control::Command::Kill {
                service: "storage".into(),
                signal: 9,
            },
        )
        .map_err(err)?;
        let killed = Instant::now();
        if !matches!(reply, microkernel::control::Reply::Done { .. }) {
            return Err(err(format!("paravisor kill storage: {reply:?}")));
        }
        first_answer(&instance.socket(), Duration::from_secs(30))?;
        service.push(killed.elapsed().as_secs_f64() * 1e3);
        instance.storage_pid(Some(pid), Instant::now() + Duration::from_secs(10))?;
        eprintln!(
            "{PROGRESS} kill {} of {kills}: a new pv-storage answered after {:.1} ms",
            k + 1,
            service[k]
        );
    }
    guest.line_with("PVB-COMPLETIONS", deadline)?;
    let status = guest.exit_status(deadline)?;
    if status != 0 {
        return Err(guest.failure(&format!("the guest's script exited with {status}")));
    }
    let mut stalls: Vec<f64> = guest
        .console()
        .iter()
        .filter_map(|l| {
            let mut words = l.split_once("PVB-STALL ")?.1.split_whitespace();
            let before: f64 = words.next()?.parse().ok()?;
            let after: f64 = words.next()?.parse().ok()?;
            Some(after - before)
        })
        .collect();
    let note = (stalls.len() != kills).then(|| {
        format!(
            "the guest saw {} stalls of {STALL_MS} ms or more for {kills} kills: {stalls:?} \
             (the {kills} longest are counted)",
            stalls.len()
        )
    });
    if stalls.len() > kills {
        let mut longest: Vec<usize> = (0..stalls.len()).collect();
        longest.sort_by(|a, b| stalls[*b].total_cmp(&stalls[*a]));
        let mut kept = longest[..kills].to_vec();
        kept.sort_unstable();
        stalls = kept.iter().map(|i| stalls[*i]).collect();
    }
    Ok(RestartReport {
        kills,
        restart_policy: RESTART_POLICY.into(),
        guest_stall_median_ms: median(stalls.clone()),
        guest_stalls_ms: stalls,
        service_restart_median_ms: median(service.clone()),
        service_restarts_ms: service,
        note,
    })
}

/// "min-max ms" of `v` with `decimals`.
fn range(v: &[f64], decimals: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.decimals$}-{max:.decimals$} ms")
}

pub fn text(r: &RestartReport) -> String {
    let mut out = format!(
        "Restart: {} kill -9s of pv-storage ({:.1} s apart; restart = {}) under a guest's \
         steady 4 KiB reads ({STEADY_IOPS}/s, psync) of its encrypted disk\n",
        r.kills,
        KILL_SPACING.as_secs_f64(),
        r.restart_policy
    );
    out.push_str(&format!(
        "  kill to the guest's first request completed by the new process: median {:.0} ms \
         (range {}; QEMU 7.2 reconnects 1 s after the disconnection: the floor)\n",
        r.guest_stall_median_ms,
        range(&r.guest_stalls_ms, 0)
    ));
    out.push_str(&format!(
        "  kill to the new process answering a front end's first message (GET_FEATURES): \
         median {:.1} ms (range {})\n",
        r.service_restart_median_ms,
        range(&r.service_restarts_ms, 1)
    ));
    if let Some(note) = &r.note {
        out.push_str(&format!("  NOTE: {note}\n"));
    }
    out
}
