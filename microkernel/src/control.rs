//! The control socket of a running instance: how `paravisor ps`, `kill`, `restart`, `logs`,
//! `probe` and `audit --live` talk to `paravisor run`.
//!
//! One request per connection, as one line of JSON each way. The socket lives in the state
//! directory with mode 0600: only the user who runs the paravisor can use it. Nothing is
//! pushed: `logs --follow` and `ps --watch` ask again, so a slow reader never holds up the
//! supervisor (every reply is small, and written with a timeout).

use std::io::BufRead;
use std::io::BufReader;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::Serialize;

/// File name of the control socket inside the state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// How long a command waits for the instance.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(15);

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// What a command asks of the running instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Command {
    Ps,
    Kill {
        service: String,
        signal: i32,
    },
    /// Start a service again now: a running one is killed first; a failed one gets a fresh
    /// crash-loop count.
    Restart {
        service: String,
    },
    /// A service's recent output and the supervisor's notes about it: the lines after number
    /// `after`, or (without it) the last `tail`.
    Logs {
        service: String,
        #[serde(default)]
        after: Option<u64>,
        #[serde(default)]
        tail: usize,
    },
    Probe {
        service: String,
        endpoint: String,
    },
    LiveAudit,
    Shutdown,
    /// A report from the attest service over these 64 bytes (hex), with its chain.
    AttestReport {
        report_data: String,
    },
    /// Times reports and derived keys through the attest service and directly (benchmark).
    AttestBench {
        samples: usize,
    },
}

/// One row of `paravisor ps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRow {
    pub name: String,
    pub pid: Option<i32>,
    pub state: String,
    pub restarts: u32,
    pub uptime_ms: Option<u64>,
    pub messages_in: u64,
    pub messages_out: u64,
    /// Requests refused because the caller's grant does not cover them.
    #[serde(default)]
    pub refused: u64,
    /// Lines of the service's output the rate limit dropped (since the paravisor started).
    #[serde(default)]
    pub output_dropped: u64,
    pub last_exit: Option<String>,
    pub namespaces: Vec<String>,
    /// Epoch of each channel this service serves, by client.
    pub epochs: Vec<(String, u32)>,
    /// Guest exits this service answered (a guest runs and the service answers its
    /// accesses).
    #[serde(default)]
    pub guest_exits: Option<u64>,
    /// The delay before its pending restart, or before its last one (its back-off).
    #[serde(default)]
    pub backoff_ms: Option<u64>,
    /// While it waits out its back-off: how long until it is started again.
    #[serde(default)]
    pub restart_in_ms: Option<u64>,
    /// It missed its last watchdog ping while nothing it calls was down.
    #[serde(default)]
    pub unresponsive: bool,
    /// Its descriptor store, if it has one: what is kept now, its bound, and the packets it
    /// refused since the paravisor started.
    #[serde(default)]
    pub fd_store: Option<FdStoreState>,
}

/// A descriptor store in `paravisor ps`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct FdStoreState {
    pub kept: usize,
    pub max: usize,
    pub refused: u64,
}

/// One line of `paravisor logs`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    /// Numbered per service from 1.
    pub seq: u64,
    /// "stdout", "stderr", or "paravisor" (the supervisor's note about the service).
    pub source: String,
    /// Escaped as when passed on: no terminal controls.
    pub text: String,
}

/// A command under way on the control thread, in `paravisor ps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlJob {
    pub command: String,
    pub running_ms: u64,
}

/// The guest partition in `paravisor ps`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GuestRow {
    pub image: String,
    pub vcpus: Vec<VcpuRow>,
    /// Exits each service answered, by service.
    pub exits_by_service: Vec<(String, u64)>,
    /// How the run ended, if it has.
    pub outcome: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuRow {
    pub id: u32,
    pub state: String,
    pub exits: u64,
    /// Exits answered in the vCPU thread itself (the benchmark port).
    pub in_thread: u64,
}

/// One difference found by the live audit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Finding {
    pub service: String,
    pub what: String,
}

/// One comparison the live audit made (and passed or not).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Checked {
    /// The service, or `paravisor` for the microkernel's own threads.
    pub service: String,
    #[serde(flatten)]
    pub check: crate::privilege::Check,
}

/// The instance's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Ps {
        services: Vec<ServiceRow>,
        /// The guest partition, when there is one.
        #[serde(default)]
        guest: Option<GuestRow>,
        /// The command the control thread runs now, if any.
        #[serde(default)]
        control: Option<ControlJob>,
    },
    Done {
        message: String,
    },
    Audit {
        checked: Vec<String>,
        /// Every comparison made, with its result.
        #[serde(default)]
        checks: Vec<Checked>,
        findings: Vec<Finding>,
    },
    Error {
        message: String,
    },
    /// Lines of a service's history.
    Logs {
        lines: Vec<LogLine>,
        /// Lines after the one asked from that are no longer kept.
        missed: u64,
        /// The number of the last line given (or of the newest, if none): ask after it next.
        last: u64,
        /// The service's state now.
        state: String,
    },
    /// A raw attestation report (hex) and the chain that verifies it (PEM: ARK, ASK, VCEK).
    Report {
        report: String,
        certs: String,
    },
    /// `bench attest`'s timings, taken by the supervisor over its own channel to attest.
    AttestBench(Latencies),
    /// What a probe found, and the line that says so.
    Probe {
        result: ProbeResult,
        message: String,
    },
}

/// What `paravisor probe SERVICE ENDPOINT` found; each has its own exit status, so that a
/// script can tell "not granted" from "granted but not answering".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeResult {
    /// The endpoint answered through the service's own capability: exit 0.
    Reached,
    /// The manifest grants the service no capability to call the endpoint: exit 3.
    NoCapability,
    /// No answer before the service's deadline: exit 4.
    TimedOut,
    /// The endpoint's server restarted while the probe was in flight: exit 5.
    PeerRestarted,
    /// The channel failed otherwise (an error answer, a malformed reply): exit 6.
    Failed,
}

impl ProbeResult {
    pub fn of(outcome: &ipc_defs::control::ProbeOutcome) -> ProbeResult {
        use ipc_defs::control::ProbeOutcome;
        match outcome {
            ProbeOutcome::Reached { .. } => ProbeResult::Reached,
            ProbeOutcome::NoCapability => ProbeResult::NoCapability,
            ProbeOutcome::TimedOut => ProbeResult::TimedOut,
            ProbeOutcome::PeerRestarted { .. } => ProbeResult::PeerRestarted,
            ProbeOutcome::Failed(_) => ProbeResult::Failed,
        }
    }

    /// The exit status of `paravisor probe` (1 is left for "could not probe at all": no
    /// instance, no such service or endpoint, the service not running or not answering; 2
    /// for a usage error).
    pub fn exit_code(self) -> u8 {
        match self {
            ProbeResult::Reached => 0,
            ProbeResult::NoCapability => 3,
            ProbeResult::TimedOut => 4,
            ProbeResult::PeerRestarted => 5,
            ProbeResult::Failed => 6,
        }
    }
}

/// Errors of a command-line client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no paravisor is running with state directory {dir} (cannot connect to {socket}: {source}); start one with `paravisor run` or pass --state-dir")]
    NotRunning {
        dir: String,
        socket: String,
        source: std::io::Error,
    },
    #[error("control socket I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("instance sent an unreadable reply: {0}")]
    Reply(#[from] serde_json::Error),
}

/// Sends one command to the instance whose state directory is `state_dir`.
pub fn send(state_dir: &Path, command: &Command) -> Result<Reply, ClientError> {
    let path = socket_path(state_dir);
    let mut stream = UnixStream::connect(&path).map_err(|source| ClientError::NotRunning {
        dir: state_dir.display().to_string(),
        socket: path.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    let mut line = serde_json::to_string(command)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply)?;
    Ok(serde_json::from_str(&reply)?)
}

/// Reads one command from an accepted connection (server side).
pub fn read_command(stream: &UnixStream) -> Result<Command, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream.take_limited())
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&line).map_err(|e| format!("bad command: {e}"))
}

/// How long the instance waits for a client to take its reply: a client that does not read
/// cannot hold up the supervisor's loop for longer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Writes the reply to an accepted connection (server side).
pub fn write_reply(mut stream: &UnixStream, reply: &Reply) {
    let _ = stream.set_write_timeout(Some(REPLY_TIMEOUT));
    if let Ok(mut line) = serde_json::to_string(reply) {
        line.push('\n');
        let _ = stream.write_all(line.as_bytes());
    }
}

/// A bounded reader, so that a client cannot make the supervisor buffer without end.
trait TakeLimited {
    fn take_limited(&self) -> std::io::Take<&UnixStream>;
}

impl TakeLimited for UnixStream {
    fn take_limited(&self) -> std::io::Take<&UnixStream> {
        std::io::Read::take(self, 64 * 1024)
    }
}

/// `bench attest`'s medians in microseconds: an attestation report and a derived key, each
/// through the attest service and from the platform directly, in the same run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latencies {
    pub samples: usize,
    pub report_service_us: f64,
    pub report_direct_us: f64,
    pub key_service_us: f64,
    pub key_direct_us: f64,
}

/// The median of `v` (the upper one of an even count; 0 for none).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
