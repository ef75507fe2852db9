//! `paravisor bench net`, the restart: `kill -9` of pv-net while a Linux guest sits on its
//! NIC, and two times per kill, both from the moment `paravisor kill` has sent the signal:
//!
//! - **the first packet through the restarted service**: `pv-netpeer --probe` runs in the
//!   TAP's namespace and knocks on a closed TCP port of the guest every [`PROBE_EVERY`] (each
//!   knock in its own thread, waiting up to [`PROBE_TIMEOUT`]); the guest's kernel answers
//!   each with a RST. The time is that of the first answer to a knock sent after the kill:
//!   the SYN went through the new pv-net (or waited in the TAP's queue for it) and the RST
//!   came back through it. Both times are the host's wall clock. The knocks' spacing is the
//!   resolution. QEMU 7.2 reconnects a second after the disconnection (`reconnect=1` is
//!   whole seconds, and pv-net needs QEMU's rings again), which bounds this from below.
//! - **the service running again**: the time of the supervisor's `running service=net
//!   pid=NEW` line in the paravisor's log (its clock is the host's wall clock too). Not a
//!   poll of `ps`: one `ps` round trip takes 40-100 ms here, which would be most of the
//!   number.
//!
//! The service's restart policy is [`RESTART_POLICY`], as for `bench storage`'s restart: with
//! kills [`KILL_SPACING`] apart every restart is the first of its one-second window
//! (immediate), so the back-off the shipped policy adds to repeated crashes is not counted.

use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use crate::bench_net::NetInstance;
use crate::bench_net::GUEST_ADDRESS;
use crate::bench_net::PROGRESS;
use crate::bench_net_host::NetPeer;
use crate::bench_net_host::Netns;
use crate::bench_storage::err;
use crate::bench_storage::median;
use crate::net_peer::unix_seconds;

/// pv-net's restart policy in the bench's manifest (the same reasoning as pv-storage's).
pub const RESTART_POLICY: &str = crate::bench_storage_restart::RESTART_POLICY;
/// Time between kills: QEMU's one-second reconnection, the handshake and a steady stretch of
/// answered knocks.
pub const KILL_SPACING: Duration = Duration::from_millis(3000);
/// How long a kill may take to its first packet before the bench calls it lost (and says so):
/// thirty times QEMU's one-second reconnection.
pub const FIRST_PACKET_LIMIT: Duration = Duration::from_secs(30);
/// Time from one knock to the next: the resolution of the first-packet time.
pub const PROBE_EVERY: Duration = Duration::from_millis(10);
/// How long a knock waits for its answer (a guest under TCG answers in a few milliseconds;
/// a knock waiting in the TAP's queue for the restarted service, longer).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// The port knocked on: TCP's discard port, on which nothing listens in the guest.
const PROBE_PORT: u16 = 9;

#[derive(Debug, Clone, Serialize)]
pub struct RestartReport {
    pub kills: usize,
    pub restart_policy: String,
    pub probe_every_ms: f64,
    /// Each kill's time to the first answer to a knock sent after it, in milliseconds; `None`
    /// (null) when none came within [`FIRST_PACKET_LIMIT`].
    pub first_packet_ms: Vec<Option<f64>>,
    /// Their median, the kills without an answer counted as longer than any other; `None` when
    /// they are half or more.
    pub first_packet_median_ms: Option<f64>,
    /// Each kill's time to the supervisor's saying the new pv-net runs, in milliseconds.
    pub service_running_ms: Vec<f64>,
    pub service_running_median_ms: f64,
    /// What went wrong with a kill (no packet through the new process in time), with the
    /// paravisor's log.
    pub notes: Vec<String>,
}

/// The median (the upper one of an even count) of `v`, `None` counted as longer than any time.
pub fn median_or_none(v: &[Option<f64>]) -> Option<f64> {
    let mut sorted = v.to_vec();
    sorted.sort_by(|a, b| match (a, b) {
        (Some(a), Some(b)) => a.total_cmp(b),
        (a, b) => a.is_none().cmp(&b.is_none()),
    });
    sorted.get(sorted.len() / 2).copied().flatten()
}

/// The paravisor log's lines from `since` (wall-clock seconds) on.
fn log_after(instance: &NetInstance, since: f64) -> Vec<String> {
    let log = std::fs::read_to_string(instance.dir.join("paravisor.log")).unwrap_or_default();
    let lines: Vec<String> = log.lines().map(str::to_string).collect();
    // Service lines start with the service's name; the time stamp is their first word after
    // `|` or the line's first word.
    let time = |l: &str| {
        let stamp = l.rsplit_once("| ").map_or(l, |(_, rest)| rest);
        log_time(stamp.split_whitespace().next().unwrap_or(""))
    };
    let from = lines
        .iter()
        .position(|l| time(l).is_some_and(|t| t >= since - 0.5))
        .unwrap_or(lines.len().saturating_sub(20));
    lines[from..].iter().take(40).cloned().collect()
}

/// A probe's `reply SENT RECEIVED` line: both wall-clock seconds.
pub fn reply_times(line: &str) -> Option<(f64, f64)> {
    let mut words = line.strip_prefix("reply ")?.split_whitespace();
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

/// `kills` kills of `instance`'s pv-net under a guest idle on its NIC (in `ns`).
pub fn run(instance: &mut NetInstance, ns: &Netns, kills: usize) -> std::io::Result<RestartReport> {
    let args = [
        "--probe".to_string(),
        format!("{GUEST_ADDRESS}:{PROBE_PORT}"),
        "--every-ms".to_string(),
        PROBE_EVERY.as_millis().to_string(),
        "--timeout-ms".to_string(),
        PROBE_TIMEOUT.as_millis().to_string(),
    ];
    let mut probe = NetPeer::start(ns, &args, "probing ")?;
    // The guest answers before the first kill.
    probe.wait_for("reply ", Instant::now() + Duration::from_secs(30))?;
    let (mut first_packet, mut running, mut notes) = (Vec::new(), Vec::new(), Vec::new());
    // `killed` is only a deadline's start: every reported time is on the wall clock.
    for k in 0..kills {
        std::thread::sleep(KILL_SPACING);
        let pid = instance.net_pid(None, Instant::now() + Duration::from_secs(10))?;
        let reply = microkernel::control::send(
            &instance.state,
            &microkernel::control::Command::Kill {
                service: "net".into(),
                signal: 9,
            },
        )
        .map_err(err)?;
        let (killed, killed_wall) = (Instant::now(), unix_seconds());
        if !matches!(reply, microkernel::control::Reply::Done { .. }) {
            return Err(err(format!("paravisor kill net: {reply:?}")));
        }
        let new_pid = instance.net_pid(Some(pid), killed + Duration::from_secs(30))?;
        let log = std::fs::read_to_string(instance.dir.join("paravisor.log"))?;
        let started = running_since(&log, new_pid).ok_or_else(|| {
            err(format!(
                "the paravisor's log has no `running service=net pid={new_pid}` line with a time"
            ))
        })?;
        running.push((started - killed_wall) * 1e3);
        let deadline = killed + FIRST_PACKET_LIMIT;
        let received = loop {
            let line = match probe.wait_for("reply ", deadline) {
                Ok(line) => line,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => break None,
                Err(e) => return Err(e),
            };
            match reply_times(&line) {
                Some((sent, received)) if sent >= killed_wall => break Some(received),
                Some(_) => continue,
                None => return Err(err(format!("pv-netpeer --probe printed {line:?}"))),
            }
        };
        let time = received.map(|r| (r - killed_wall) * 1e3);
        first_packet.push(time);
        match time {
            Some(ms) => eprintln!(
                "{PROGRESS} kill {} of {kills}: pv-net running again after {:.1} ms, the first \
                 packet through it after {ms:.0} ms",
                k + 1,
                running[k],
            ),
            None => {
                let net_log = log_after(instance, killed_wall);
                let note = format!(
                    "kill {}: pv-net ran again after {:.1} ms but no knock sent after the kill \
                     was answered within {} s; the paravisor's log since the kill:\n{}",
                    k + 1,
                    running[k],
                    FIRST_PACKET_LIMIT.as_secs(),
                    net_log.join("\n")
                );
                eprintln!("{PROGRESS} {note}");
                notes.push(note);
            }
        }
    }
    Ok(RestartReport {
        kills,
        restart_policy: RESTART_POLICY.into(),
        probe_every_ms: PROBE_EVERY.as_secs_f64() * 1e3,
        first_packet_median_ms: median_or_none(&first_packet),
        first_packet_ms: first_packet,
        notes,
        service_running_median_ms: median(running.clone()),
        service_running_ms: running,
    })
}

/// The wall-clock time (seconds since the Unix epoch) of the supervisor's line saying that
/// pv-net runs as `pid`, from the paravisor's `log`.
pub fn running_since(log: &str, pid: i32) -> Option<f64> {
    let needle = format!(" running service=net pid={pid} ");
    let line = log.lines().find(|l| l.contains(&needle))?;
    log_time(line.split_whitespace().next()?)
}

/// Seconds since the Unix epoch of a log line's UTC time stamp, `2026-12-07T07:58:19.379918Z`
/// (tracing's format).
pub fn log_time(stamp: &str) -> Option<f64> {
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.split('-').map(|n| n.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.split(':');
    let (h, min) = (
        hms.next()?.parse::<i64>().ok()?,
        hms.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = hms.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    // Days from 1970-01-01 to the date (Howard Hinnant's days_from_civil: the year counted
    // from March, so that the leap day is the last of its year).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let year_of_era = y - era * 400;
    let day_of_year = (153 * ((m + 9) % 12) + 2) / 5 + d - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

pub fn text(r: &RestartReport) -> String {
    let answered: Vec<f64> = r.first_packet_ms.iter().flatten().copied().collect();
    let lost = r.kills - answered.len();
    let median = match r.first_packet_median_ms {
        Some(ms) => format!("{ms:.0} ms"),
        None => "none".into(),
    };
    let mut out = format!(
        "Restart: {} kill -9s of pv-net ({:.1} s apart; restart = {}) under an idle guest, \
         probed from the TAP's host side every {:.0} ms (TCP knocks on a closed port)\n  kill \
         to the first packet through the restarted service: median {median} (range {} ms{}; \
         QEMU 7.2's reconnect=1 retries once a second: the floor)\n  kill to pv-net running \
         again (the supervisor's `running` line for the new process): median {:.1} ms (range {} \
         ms)\n",
        r.kills,
        KILL_SPACING.as_secs_f64(),
        r.restart_policy,
        r.probe_every_ms,
        crate::bench_net::range(&answered, 0),
        if lost > 0 {
            format!(
                "; {lost} of {} kills: NO packet within {} s, counted as longest",
                r.kills,
                FIRST_PACKET_LIMIT.as_secs()
            )
        } else {
            String::new()
        },
        r.service_running_median_ms,
        crate::bench_net::range(&r.service_running_ms, 1),
    );
    for note in &r.notes {
        out.push_str(&format!("  NOTE: {note}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_reply_gives_its_send_and_receive_times() {
        assert_eq!(
            reply_times("reply 1733380000.125000 1733380000.127500"),
            Some((1733380000.125, 1733380000.1275))
        );
        assert_eq!(reply_times("probing 10.78.0.15:9"), None);
        assert_eq!(reply_times("reply 1.0"), None);
    }

    #[test]
    fn a_kill_without_a_packet_counts_as_longer_than_any_other() {
        assert_eq!(median_or_none(&[Some(3.0), None, Some(1.0)]), Some(3.0));
        assert_eq!(median_or_none(&[Some(3.0), None, None]), None);
        assert_eq!(median_or_none(&[Some(2.0), Some(1.0)]), Some(2.0));
        assert_eq!(median_or_none(&[]), None);
    }

    #[test]
    fn the_supervisors_running_line_gives_the_new_processs_start_on_the_wall_clock() {
        // `date -u -d 2026-12-07T07:58:19Z +%s` is 1796630299; 2000-03-01 follows a leap day.
        assert_eq!(log_time("2026-12-07T07:58:19.500000Z"), Some(1796630299.5));
        assert_eq!(log_time("2000-03-01T00:00:00Z"), Some(951868800.0));
        assert_eq!(log_time("1970-01-01T00:00:00.000001Z"), Some(0.000001));
        assert_eq!(log_time("2026-13-07T07:58:19Z"), None);
        assert_eq!(log_time("net"), None);
        let log = "2026-12-07T07:58:19.329541Z  WARN killed by SIGKILL after 4.1s service=net\n\
                   2026-12-07T07:58:19.379918Z  INFO running service=net pid=8541 uid=63020\n";
        let t = running_since(log, 8541).unwrap();
        assert!((t - 1796630299.379918).abs() < 1e-6, "{t}");
        assert_eq!(running_since(log, 854), None);
    }
}
