//! `pv-tpm-gateway`: the TPM's network front ends (mssim and swtpm protocols) in a process of
//! their own, outside the engine's sandbox. It holds only listening sockets the microkernel
//! bound on loopback (it cannot create, bind or connect a socket) and a `vtpm` channel.
//!
//! Capabilities expected: its control channel; listeners named `mssim-command`,
//! `mssim-platform`, `swtpm-data`, `swtpm-control`, `swtpm-control-unix` (any subset: the
//! microkernel binds only those the host asked for, `paravisor run --listen`), each with the
//! localities its connections may use (locality 0 only unless the manifest grants more); the
//! calling end of a `vtpm` channel. One thread, one poll loop: connections are served in turn.
//!
//! A command at a locality its listener is not granted is answered with TPM_RC_LOCALITY and
//! never reaches the TPM; the refusal is counted (REFUSED in `paravisor ps`) and logged with the
//! listener's name. Platform signals go to the TPM, which refuses them while the guest
//! partition uses it.
//!
//! While it waits for the TPM the gateway keeps answering its own control channel, so that a
//! TPM that is restarting (or in its restart back-off) never makes the supervisor's watchdog
//! kill the gateway too. A command the TPM restarted under is sent again with its number
//! (answered from the TPM's record if it had run: never twice). A TPM that is up but does not
//! take commands (stopped with SIGSTOP, wedged: the supervisor marks its channel
//! `Unresponsive`) gets each command with a deadline to start; once that has passed with the
//! command still in the ring, the TPM will refuse it unrun, so the client is told
//! TPM_RC_RETRY ("not started") within the deadline instead of waiting for the watchdog, and
//! later commands get the same answer at once until the TPM takes commands again.
#![forbid(unsafe_code)]

use std::io::Read;
use std::io::Write;
use std::net::TcpListener;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use ipc_defs::capability::Grant;
use ipc_defs::endpoint;
use ipc_defs::hosted::runtime;
use ipc_defs::hosted::sys;
use ipc_defs::hosted::CallError;
use ipc_defs::hosted::ClientEnd;
use ipc_defs::hosted::Sent;
use ipc_defs::hosted::WaitPolicy;
use ipc_defs::layout::ServerState;
use ipc_defs::services::vtpm;
use ipc_defs::services::vtpm::Localities;
use ipc_defs::services::vtpm::TpmBytes;
use ipc_defs::Interface;
use pv_vtpm::gateway::Connection;
use pv_vtpm::gateway::Protocol;
use pv_vtpm::gateway::Step;
use pv_vtpm::gateway::RC_LOCALITY;
use pv_vtpm::server::error_response;

/// Longest a TPM command may take (RSA key generation on a slow machine); the TPM's own
/// watchdog (10 s by default) ends a longer one first.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a request is sent again after the TPM restarted under it: a TPM in a crash loop
/// is marked failed by the supervisor long before (its channel then says `Gone`).
const RESENDS: usize = 64;
/// How long a request may wait in the ring of a TPM marked unresponsive before its client is
/// told TPM_RC_RETRY: well within the default watchdog (10 s), far longer than a command
/// waits behind another.
const START_WITHIN: Duration = Duration::from_secs(3);
/// Longest wait for the TPM's answer between two looks at the control channel: the
/// supervisor pings every second and gives the answer 100 ms.
const CONTROL_EVERY: Duration = Duration::from_millis(20);
/// TPM_RC_RETRY: "the TPM was not able to start the command".
const RC_RETRY: u32 = 0x922;
/// Most connections served at once (the descriptor limit is 64); more are closed at once.
const MAX_CLIENTS: usize = 32;
/// How long the gateway spins for the TPM's answer before it sleeps (about one RSA-2048
/// signature; key generation takes longer and is answered through the sleep).
const CALL_SPIN: Duration = Duration::from_millis(2);
/// How long a reply may wait for a client that does not read: a client that stalls longer
/// is dropped rather than stalling everyone else.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the loop sleeps between looks at the control channel.
const POLL: Duration = Duration::from_millis(50);
/// TPM_RC_FAILURE.
const RC_FAILURE: u32 = 0x101;

type Tpm = ClientEnd<endpoint::Request<vtpm::Request>, endpoint::Response<vtpm::Response>>;

/// A listening socket: TCP on loopback, or a Unix socket in the state directory.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Tells the two kinds apart by the socket's own address family.
    fn from_fd(fd: OwnedFd) -> Listener {
        let unix = UnixListener::from(fd);
        if unix.local_addr().is_ok() {
            Listener::Unix(unix)
        } else {
            Listener::Tcp(TcpListener::from(OwnedFd::from(unix)))
        }
    }

    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }

    fn accept(&self) -> Option<Stream> {
        match self {
            Listener::Tcp(l) => l.accept().ok().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
                Stream::Tcp(s)
            }),
            Listener::Unix(l) => l.accept().ok().map(|(s, _)| {
                let _ = s.set_write_timeout(Some(WRITE_TIMEOUT));
                Stream::Unix(s)
            }),
        }
    }
}

/// A connection of either kind.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }

    /// Reads, taking descriptors passed over a Unix socket along.
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
        match self {
            Stream::Tcp(s) => {
                let n = s.read(buf)?;
                let _ = sys::tcp_quickack(s);
                Ok((n, Vec::new()))
            }
            Stream::Unix(s) => sys::recv_with_fds(s, buf),
        }
    }

    fn write_all(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.write_all(bytes),
            Stream::Unix(s) => s.write_all(bytes),
        }
    }
}

struct Client {
    stream: Stream,
    conn: Connection,
    /// The listener it came through, for logs.
    listener: String,
}

fn main() -> ExitCode {
    let mut started = match runtime::enter() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tpm-gateway: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    started.answer_first_ping();
    let mut listeners = Vec::new();
    for (name, fd) in std::mem::take(&mut started.context.listeners) {
        let Some(protocol) = Protocol::from_listener_name(&name) else {
            tracing::error!("listener \"{name}\" names no TPM protocol (mssim-command, mssim-platform, swtpm-data, swtpm-control)");
            return ExitCode::FAILURE;
        };
        let localities = match started.context.listener_grants.get(&name) {
            Some(Grant::Localities(l)) => *l,
            _ => Localities::ZERO,
        };
        tracing::info!(listener = %name, localities = %localities, "front end");
        listeners.push((protocol, localities, name, Listener::from_fd(fd)));
    }
    let Some(end) = started.context.clients.remove(&Interface::Vtpm) else {
        tracing::error!("the manifest grants no vtpm channel");
        return ExitCode::FAILURE;
    };
    let mut tpm = TpmLink {
        end: end.into_typed(),
        abandoned: None,
        powered: None,
    };
    // A TPM command takes from microseconds (GetRandom) to milliseconds (key generation), and
    // a client waits for each one: wait for the answer by spinning (yielding to anything else
    // runnable on this CPU) rather than by sleeping, whose cross-CPU wake-up would add ~47 us
    // to every command. On a one-CPU machine the default (sleep at once) stays.
    if WaitPolicy::default() != WaitPolicy::BLOCKING {
        tpm.end.set_policy(WaitPolicy {
            spin: CALL_SPIN,
            spin_only: false,
        });
    }
    // Command numbers increase across restarts of this gateway too: start from the clock.
    let mut seq = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut swtpm_locality = 0u8;
    let mut clients: Vec<Client> = Vec::new();
    tracing::info!(listeners = listeners.len(), "TPM front ends ready");
    loop {
        if !started.answer_control() {
            tracing::info!("shut down on request");
            return ExitCode::SUCCESS;
        }
        let ready = {
            let fds: Vec<_> = listeners
                .iter()
                .map(|(_, _, _, l)| l.as_fd())
                .chain(clients.iter().map(|c| c.stream.as_fd()))
                .collect();
            match sys::poll_readable(&fds, POLL) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!("poll: {e}");
                    return ExitCode::FAILURE;
                }
            }
        };
        for (i, (protocol, localities, name, listener)) in listeners.iter().enumerate() {
            if ready[i] {
                if let Some(stream) = listener.accept() {
                    if clients.len() >= MAX_CLIENTS {
                        tracing::warn!("{MAX_CLIENTS} connections already; refusing another");
                        drop(stream);
                        continue;
                    }
                    clients.push(Client {
                        stream,
                        conn: Connection::granted(*protocol, *localities),
                        listener: name.clone(),
                    });
                }
            }
        }
        let mut keep = Vec::with_capacity(clients.len());
        let mut new_data = Vec::new();
        let mut shutdown = false;
        for (i, mut client) in clients.into_iter().enumerate() {
            let is_ready = ready.get(listeners.len() + i).copied().unwrap_or(false);
            if shutdown || !is_ready {
                keep.push(client);
                continue;
            }
            match serve(
                &mut client,
                &mut started,
                &mut tpm,
                &mut seq,
                &mut swtpm_locality,
                &mut new_data,
            ) {
                Served::Keep => keep.push(client),
                Served::Drop => {}
                Served::Shutdown => shutdown = true,
            }
        }
        if shutdown {
            tracing::info!("shut down on request");
            return ExitCode::SUCCESS;
        }
        // Data channels handed over with CMD_SET_DATAFD (QEMU's -tpmdev emulator): granted
        // what the control connection's listener is.
        keep.extend(new_data.into_iter().map(|(fd, localities, listener)| {
            let stream = UnixStream::from(fd);
            let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
            Client {
                stream: Stream::Unix(stream),
                conn: Connection::granted(Protocol::SwtpmData, localities),
                listener,
            }
        }));
        clients = keep;
    }
}

/// A data connection handed over on a control connection, with that one's grant.
type NewData = (OwnedFd, Localities, String);

/// What became of a client after its requests were answered.
enum Served {
    Keep,
    Drop,
    /// The supervisor asked the gateway to stop while it waited for the TPM.
    Shutdown,
}

/// Reads what a client sent and answers every complete request.
fn serve(
    client: &mut Client,
    started: &mut runtime::Started,
    tpm: &mut TpmLink,
    seq: &mut u64,
    swtpm_locality: &mut u8,
    new_data: &mut Vec<NewData>,
) -> Served {
    let mut buf = [0u8; 8192];
    let room = client.conn.room().min(buf.len());
    if room == 0 {
        return Served::Drop;
    }
    let (n, mut passed) = match client.stream.read(&mut buf[..room]) {
        Ok((0, _)) | Err(_) => return Served::Drop,
        Ok(r) => r,
    };
    if !client.conn.feed(&buf[..n]) {
        return Served::Drop;
    }
    loop {
        if client.conn.protocol == Protocol::SwtpmData {
            client.conn.locality = *swtpm_locality;
        }
        let Some(step) = client.conn.next_step() else {
            return Served::Keep;
        };
        let reply = match step {
            Step::Command { locality, command } => {
                match run_command(tpm, started, seq, locality, &command) {
                    Ok(response) => client.conn.tpm_reply(&response),
                    // Whether the command ran is unknown: the client must not be told to
                    // retry it (it could run twice), so the connection ends.
                    Err(Unanswered::Unknown) => return Served::Drop,
                    Err(Unanswered::Shutdown) => return Served::Shutdown,
                }
            }
            Step::Refused { what, reply } => {
                started.refuse(format_args!("a client of {}", client.listener), what);
                reply
            }
            Step::Signal(signal) => {
                let mut result = tpm.call(started, |start_by| vtpm::Request::Platform {
                    signal,
                    start_by,
                });
                if let Outcome::NotStarted = result {
                    // A TPM that takes nothing (stopped) will never apply it. Power on of a TPM
                    // known to be on, NV on and cancel off change nothing, so the TPM is as
                    // asked: what an mssim client sends whenever it connects is answered, and
                    // the client gets to its command (and to TPM_RC_RETRY) instead of failing
                    // to connect.
                    if tpm.changes_nothing(signal) {
                        result = Outcome::Answer(vtpm::Response::Done);
                    }
                }
                tpm.observe(signal, &result);
                match &result {
                    // The TPM refused it, counted and logged it (with this gateway's name).
                    Outcome::Answer(vtpm::Response::Error(e)) => tracing::debug!(
                        listener = %client.listener,
                        "platform signal {signal:?} refused by the TPM: {e}"
                    ),
                    Outcome::Shutdown => return Served::Shutdown,
                    _ => tracing::debug!(?signal, ?result, "platform signal"),
                }
                let (ok, established) = match result {
                    Outcome::Answer(vtpm::Response::Done) => (true, false),
                    Outcome::Answer(vtpm::Response::Established(e)) => (true, e),
                    _ => (false, false),
                };
                client.conn.signal_reply(ok, established)
            }
            Step::Reply(bytes) => {
                if let Some(l) = client.conn.take_locality() {
                    *swtpm_locality = l;
                }
                bytes
            }
            Step::ReplyAndClose(bytes) => {
                let _ = client.stream.write_all(&bytes);
                return Served::Drop;
            }
            Step::Close => return Served::Drop,
            Step::TakeDataFd(ok) => {
                if passed.is_empty() {
                    let mut fail = (pv_vtpm::gateway::swtpm::RESULT_FAIL)
                        .to_be_bytes()
                        .to_vec();
                    fail.truncate(4);
                    fail
                } else {
                    new_data.push((
                        passed.remove(0),
                        client.conn.granted,
                        format!("{} (data)", client.listener),
                    ));
                    ok
                }
            }
        };
        if client.stream.write_all(&reply).is_err() {
            return Served::Drop;
        }
    }
}

/// The TPM's channel as the gateway uses it.
struct TpmLink {
    end: Tpm,
    /// A request the gateway stopped waiting for while the TPM had not taken it, past its
    /// deadline to start (its client was told TPM_RC_RETRY). While it is still in the ring
    /// (same epoch, not taken), the TPM takes nothing: requests are not sent but answered
    /// "not started" at once.
    abandoned: Option<Sent>,
    /// Whether the TPM is powered on, as the last power signal it answered left it (`None`:
    /// not known, e.g. before any).
    powered: Option<bool>,
}

/// How a request to the TPM ended (returned once per request, never stored: its size, a
/// response's, costs nothing).
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Outcome {
    /// The TPM's answer.
    Answer(vtpm::Response),
    /// The TPM did not start it and never will (it is up but takes nothing): the client may
    /// send it again.
    NotStarted,
    /// Whether it was carried out is unknown (the TPM is gone for good, or the channel
    /// failed).
    Unknown(CallError),
    /// The supervisor asked the gateway to stop meanwhile (already acknowledged).
    Shutdown,
}

impl TpmLink {
    /// Whether `signal` would leave the TPM exactly as it is (as far as the gateway knows).
    fn changes_nothing(&self, signal: vtpm::Platform) -> bool {
        match signal {
            vtpm::Platform::NvOn | vtpm::Platform::CancelOff => true,
            vtpm::Platform::PowerOn => self.powered == Some(true),
            _ => false,
        }
    }

    /// Keeps track of the power state from the answers to power signals.
    fn observe(&mut self, signal: vtpm::Platform, outcome: &Outcome) {
        if let Outcome::Answer(vtpm::Response::Done) = outcome {
            match signal {
                vtpm::Platform::PowerOn | vtpm::Platform::Reset => self.powered = Some(true),
                vtpm::Platform::PowerOff => self.powered = Some(false),
                _ => {}
            }
        }
    }

    /// Whether an abandoned request still blocks the ring (the TPM has taken nothing since).
    fn stalled(&mut self) -> bool {
        match self.abandoned {
            Some(sent) if self.end.epoch() == sent.epoch() && !self.end.taken(sent) => true,
            _ => {
                self.abandoned = None;
                false
            }
        }
    }

    /// One request, made by `request` with its deadline to start: sent again if the TPM
    /// restarted under it (then without a deadline: it may have been carried out, and only
    /// its answer, from the TPM's record, may tell) or let the deadline pass before taking it
    /// (it was not carried out). Its answer is awaited while the gateway answers its own
    /// control channel.
    fn call(
        &mut self,
        started: &mut runtime::Started,
        request: impl Fn(vtpm::StartBy) -> vtpm::Request,
    ) -> Outcome {
        if self.stalled() {
            return Outcome::NotStarted;
        }
        let mut resends = 0;
        // Whether this request may have been carried out already (the TPM restarted while it
        // was in flight): then it is never reported as not started.
        let mut maybe_ran = false;
        loop {
            let start_by = (!maybe_ran).then(|| {
                ipc_defs::hosted::sys::monotonic_ns().saturating_add(START_WITHIN.as_nanos() as u64)
            });
            let sent = match self.end.start(
                &endpoint::Request::Service(request(start_by)),
                COMMAND_TIMEOUT,
            ) {
                Ok(sent) => sent,
                Err(CallError::PeerRestarted { .. }) if resends < RESENDS => {
                    resends += 1;
                    continue;
                }
                Err(e) => return Outcome::Unknown(e),
            };
            let waited_since = std::time::Instant::now();
            let answer = loop {
                match self.end.wait_reply(sent, CONTROL_EVERY) {
                    Ok(Some(answer)) => break Ok(answer),
                    Ok(None) => {}
                    Err(e) => break Err(e),
                }
                if !started.answer_control() {
                    return Outcome::Shutdown;
                }
                if let Some(by) = start_by {
                    if ipc_defs::hosted::sys::monotonic_ns() > by
                        && self.end.server_state() == ServerState::Unresponsive
                        && !self.end.taken(sent)
                    {
                        // Past its deadline and not taken: the TPM will refuse it unrun.
                        tracing::warn!(
                            "the TPM is unresponsive and has not taken a request in {:.1?}: its client is told to retry",
                            waited_since.elapsed()
                        );
                        self.abandoned = Some(sent);
                        return Outcome::NotStarted;
                    }
                }
                if self.end.server_state() == ServerState::Gone {
                    break Err(CallError::PeerRestarted {
                        sent_in: sent.epoch(),
                        now: self.end.epoch(),
                    });
                }
                if waited_since.elapsed() > COMMAND_TIMEOUT {
                    break Err(CallError::TimedOut(COMMAND_TIMEOUT));
                }
            };
            match answer {
                Ok(endpoint::Response::Service(vtpm::Response::Error(
                    vtpm::VtpmError::Expired,
                ))) if resends < RESENDS => {
                    // Taken after its deadline (the TPM was slow, not stopped): not carried
                    // out; send it again.
                    resends += 1;
                }
                Ok(endpoint::Response::Service(r)) => return Outcome::Answer(r),
                Ok(_) => return Outcome::Unknown(CallError::MalformedReply),
                Err(CallError::PeerRestarted { .. })
                    if resends < RESENDS && self.end.server_state() != ServerState::Gone =>
                {
                    resends += 1;
                    maybe_ran = true;
                }
                Err(e) => return Outcome::Unknown(e),
            }
        }
    }
}

/// Why a command got no TPM response.
enum Unanswered {
    /// Whether it ran is unknown.
    Unknown,
    /// The gateway is stopping.
    Shutdown,
}

/// Runs a TPM command under the next command number; a TPM response (an error response if
/// the TPM refused it or did not start it). The number makes a re-send after a TPM restart
/// safe: never applied twice.
fn run_command(
    tpm: &mut TpmLink,
    started: &mut runtime::Started,
    seq: &mut u64,
    locality: u8,
    command: &[u8],
) -> Result<Vec<u8>, Unanswered> {
    let Some(bytes) = TpmBytes::new(command) else {
        return Ok(error_response(pv_vtpm::server::RC_COMMAND_SIZE));
    };
    for _ in 0..2 {
        *seq += 1;
        let number = *seq;
        let outcome = tpm.call(started, |start_by| vtpm::Request::Command {
            seq: number,
            locality,
            command: bytes.clone(),
            start_by,
        });
        return match outcome {
            Outcome::Answer(vtpm::Response::Tpm(r)) => Ok(r.as_slice().to_vec()),
            Outcome::Answer(vtpm::Response::Error(
                vtpm::VtpmError::BadLocality(_)
                | vtpm::VtpmError::NotGranted(vtpm::Right::Locality(_)),
            )) => Ok(error_response(RC_LOCALITY)),
            // Our numbering is behind the TPM's record (the clock went back across a restart
            // of this gateway): the command was refused unrun; number it past the record.
            Outcome::Answer(vtpm::Response::Error(vtpm::VtpmError::StaleSequence { last })) => {
                *seq = last;
                continue;
            }
            Outcome::Answer(vtpm::Response::Error(e)) => {
                tracing::warn!("TPM command failed: {e}");
                Ok(error_response(RC_FAILURE))
            }
            Outcome::Answer(_) => Ok(error_response(RC_FAILURE)),
            Outcome::NotStarted => Ok(error_response(RC_RETRY)),
            Outcome::Shutdown => Err(Unanswered::Shutdown),
            Outcome::Unknown(e) => {
                tracing::warn!("TPM unreachable: {e}; closing the client's connection");
                Err(Unanswered::Unknown)
            }
        };
    }
    Ok(error_response(RC_FAILURE))
}
