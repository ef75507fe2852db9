//! `pv-tpm-gateway`: the TPM's network front ends (mssim and swtpm protocols) in a process of
//! their own, outside the engine's sandbox. It holds only listening sockets the microkernel
//! bound on loopback (it cannot create, bind or connect a socket) and a `vtpm` channel.
//!
//! Capabilities expected: its control channel; listeners named `mssim-command`,
//! `mssim-platform`, `swtpm-data`, `swtpm-control`, `swtpm-control-unix` (any subset: the
//! microkernel binds only those the host asked for, `paravisor run --listen`), each with the
//! localities its connections may use (locality 0 only unless the manifest grants more); the
//! calling end of a `vtpm` channel; and, to outlive its own restarts, an fd store with the
//! region `tpm-gateway-journal` ([`durable`]). One thread, one poll loop: connections are
//! served in turn, one whole request at a time.
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
//!
//! A gateway that is killed loses no connection and no request. Every connection it accepts
//! and every data channel QEMU hands it (swtpm's CMD_SET_DATAFD) is put in its fd store
//! before it is served, and forgotten when it ends; a request is read with MSG_PEEK,
//! recorded in the journal (with its command number, which the journal keeps ahead of every
//! number sent), and only then taken off its connection; its reply goes through the outbox
//! pipe. The successor gets the connections back, finishes the request in flight exactly
//! once (see [`pv_vtpm::gateway_journal`]) and serves them as if it had just accepted them.
//! What is lost: a connection accepted in the few instructions before it is kept (its
//! client sees it close).
#![forbid(unsafe_code)]

// The process's own modules, next to it (a binary's root looks for them in src/).
#[path = "gateway_main/durable.rs"]
mod durable;
#[path = "gateway_main/sockets.rs"]
mod sockets;
#[path = "gateway_main/tpm_link.rs"]
mod tpm_link;

use std::collections::BTreeSet;
use std::os::fd::AsFd;
use std::os::fd::OwnedFd;
use std::process::ExitCode;
use std::time::Duration;
use std::time::Instant;

use durable::Durable;
use ipc_defs::capability::Grant;
use ipc_defs::hosted::runtime;
use ipc_defs::hosted::sys;
use ipc_defs::hosted::WaitPolicy;
use ipc_defs::services::vtpm;
use ipc_defs::services::vtpm::Localities;
use ipc_defs::services::vtpm::TpmBytes;
use ipc_defs::Interface;
use pv_vtpm::gateway::Connection;
use pv_vtpm::gateway::Protocol;
use pv_vtpm::gateway::Step;
use pv_vtpm::gateway::MAX_BUFFERED;
use pv_vtpm::gateway::RC_LOCALITY;
use pv_vtpm::gateway_journal::InFlight;
use pv_vtpm::server::error_response;
use sockets::Listener;
use sockets::Stream;
use tpm_link::Outcome;
use tpm_link::TpmLink;

/// TPM_RC_RETRY: "the TPM was not able to start the command".
const RC_RETRY: u32 = 0x922;
/// Most connections served at once (the descriptor limit is 64); more are closed at once.
/// With an fd store, also no more than it keeps.
const MAX_CLIENTS: usize = 32;
/// How long the gateway spins for the TPM's answer before it sleeps (about one RSA-2048
/// signature; key generation takes longer and is answered through the sleep).
const CALL_SPIN: Duration = Duration::from_millis(2);
/// How long the loop sleeps between looks at the control channel.
const POLL: Duration = Duration::from_millis(50);
/// How long a Unix connection holding part of a request is left out of the poll at first
/// (poll cannot wait for more bytes on a Unix socket that holds some): its client sends the
/// rest within microseconds, or a gateway that looked at once would spin. The pause grows
/// with the wait (a quarter of it), up to [`PARTIAL_RETRY_MAX`], for a client that stalls.
const PARTIAL_RETRY: Duration = Duration::from_millis(1);
const PARTIAL_RETRY_MAX: Duration = Duration::from_millis(50);
/// Requests of one connection answered in a row before the others get their turn.
const REQUESTS_PER_TURN: usize = 16;
/// TPM_RC_FAILURE.
const RC_FAILURE: u32 = 0x101;

struct Client {
    /// Its id in the fd store (unique among the connections).
    id: u32,
    stream: Stream,
    conn: Connection,
    /// The listener it came through (for a data channel: its control connection's), for
    /// logs and for its grant when it is handed back.
    listener: String,
    /// A Unix connection holding part of a request: when to look at it again (poll cannot
    /// wait for more on a Unix socket that holds some), and since when it waits.
    retry_at: Option<Instant>,
    partial_since: Option<Instant>,
    /// A TCP connection holding part of a request: its low-water mark is raised, so poll
    /// says readable only once more has come.
    low_water: bool,
}

/// What became of a client after its requests were answered.
enum Served {
    Keep,
    Drop,
    /// The supervisor asked the gateway to stop while it waited for the TPM.
    Shutdown,
}

/// How one request is answered.
enum Reply {
    Send(Vec<u8>),
    SendAndClose(Vec<u8>),
    Close,
    Shutdown,
}

/// A listener the gateway accepts on.
struct Front {
    protocol: Protocol,
    localities: Localities,
    name: String,
    listener: Listener,
}

struct Gateway {
    started: runtime::Started,
    tpm: TpmLink,
    /// The last command number used.
    seq: u64,
    /// The locality for swtpm data commands, set on a control connection.
    swtpm_locality: u8,
    durable: Option<Durable>,
    fronts: Vec<Front>,
    clients: Vec<Client>,
    /// Data channels handed over while the clients are served, added after.
    adopted: Vec<Client>,
    /// The ids and socket inodes of every connection (served or just adopted).
    ids: BTreeSet<u32>,
    inodes: BTreeSet<u64>,
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
    let mut fronts = Vec::new();
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
        fronts.push(Front {
            protocol,
            localities,
            name,
            listener: Listener::from_fd(fd),
        });
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
    let (durable, recovered, kept) = match Durable::open(&mut started.context) {
        Some((d, r, k)) => (Some(d), Some(r), k),
        None => (None, None, Vec::new()),
    };
    // Command numbers increase across restarts of this gateway, and across runs of the
    // paravisor (the TPM keeps its last one): past the journal's and the clock's.
    let clock = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let mut gateway = Gateway {
        started,
        tpm,
        seq: clock.max(recovered.as_ref().map_or(0, |r| r.next_seq)),
        swtpm_locality: recovered.as_ref().map_or(0, |r| r.locality),
        durable,
        fronts,
        clients: Vec::new(),
        adopted: Vec::new(),
        ids: BTreeSet::new(),
        inodes: BTreeSet::new(),
    };
    if let Some(d) = gateway.durable.as_mut() {
        d.journal.set_next_seq(gateway.seq.saturating_add(1));
    }
    gateway.take_back(kept);
    if let Some(r) = recovered {
        if let Served::Shutdown = gateway.resume(r.in_flight) {
            tracing::info!("shut down on request");
            return ExitCode::SUCCESS;
        }
    }
    tracing::info!(
        listeners = gateway.fronts.len(),
        connections = gateway.clients.len(),
        kept = gateway.durable.is_some(),
        "TPM front ends ready"
    );
    gateway.run()
}

impl Gateway {
    /// Most connections served at once.
    fn capacity(&self) -> usize {
        self.durable
            .as_ref()
            .map_or(MAX_CLIENTS, |d| d.capacity().min(MAX_CLIENTS))
    }

    /// The connections the last process kept, served again: each with its listener's grant
    /// as the manifest gives it now (a listener this run does not bind: closed).
    fn take_back(&mut self, kept: Vec<durable::KeptConnection>) {
        for k in kept {
            let front = self.fronts.iter().find(|f| f.name == k.listener);
            let Some(front) = front else {
                tracing::warn!(id = k.id, listener = %k.listener, "a kept connection of a listener this run does not hold: closed");
                if let Some(d) = &self.durable {
                    d.forget(k.id);
                }
                continue;
            };
            let protocol = if k.data_channel {
                Protocol::SwtpmData
            } else {
                front.protocol
            };
            let stream = Stream::from_fd(k.fd);
            let inode = stream.inode();
            if self.inodes.contains(&inode) || !self.ids.insert(k.id) {
                // One connection kept under two ids: served once, the copy forgotten.
                tracing::warn!(id = k.id, "a connection kept twice: the copy is forgotten");
                if let Some(d) = &self.durable {
                    d.forget(k.id);
                }
                continue;
            }
            self.inodes.insert(inode);
            tracing::info!(id = k.id, listener = %k.listener, data_channel = k.data_channel, "connection taken back");
            self.clients.push(Client {
                id: k.id,
                stream,
                conn: Connection::granted(protocol, front.localities),
                listener: k.listener,
                retry_at: None,
                partial_since: None,
                low_water: false,
            });
        }
    }

    /// Finishes the request the last process was answering when it died (see
    /// [`pv_vtpm::gateway_journal`]).
    fn resume(&mut self, in_flight: InFlight) -> Served {
        let owner = match &in_flight {
            InFlight::Idle => return Served::Keep,
            InFlight::Received { owner, .. } | InFlight::Answered { owner } => *owner,
        };
        let Some(at) = self.clients.iter().position(|c| c.id == owner) else {
            // Its connection ended (or was never kept): nothing to answer.
            if let Some(d) = self.durable.as_mut() {
                d.outbox.drain();
                d.journal.idle();
            }
            return Served::Keep;
        };
        let mut client = self.clients.remove(at);
        let served = match in_flight {
            InFlight::Received {
                seq,
                request,
                reply_len,
                ..
            } if !self.reply_made(reply_len) => {
                tracing::info!(id = owner, seq, "resuming the request in flight");
                self.resume_request(&mut client, seq, &request)
            }
            // The reply was made (all of it is in the outbox, or what is left of it).
            _ => {
                tracing::info!(id = owner, "sending the rest of a reply");
                match self.durable.as_mut() {
                    Some(d) => {
                        d.journal.answered(owner);
                        self.flush(&mut client, false)
                    }
                    None => Served::Keep,
                }
            }
        };
        self.settle(client, served)
    }

    /// Whether the outbox holds the whole reply, `len` bytes, to the request in flight (its
    /// predecessor died after writing it, before recording it written); anything else found
    /// there is thrown away, and the request is carried out again.
    fn reply_made(&mut self, len: u32) -> bool {
        let Some(d) = self.durable.as_mut() else {
            return false;
        };
        if !d.outbox.has_data() {
            return false;
        }
        let reply = d.outbox.take_all(len as usize);
        if len == 0 || reply.len() != len as usize {
            d.outbox.drain();
            tracing::warn!(
                found = reply.len(),
                recorded = len,
                "a reply cut short in the outbox: thrown away"
            );
            return false;
        }
        d.outbox.put(&reply).is_ok()
    }

    /// Carries out `request` of `client` again, numbered `seq`: first taken off the
    /// connection if it is still queued there.
    fn resume_request(&mut self, client: &mut Client, seq: u64, request: &[u8]) -> Served {
        let mut queued = vec![0u8; request.len()];
        let with_fds = client.conn.protocol == Protocol::SwtpmControl;
        let mut passed = Vec::new();
        if let Ok((n, fds)) = client.stream.peek(&mut queued, with_fds) {
            // The client sends nothing after a request before its reply: bytes that begin
            // like it are it (and a data channel passed with them is one kept already).
            if n == request.len() && queued == request {
                passed = fds;
                if client.stream.take(n).is_err() {
                    return Served::Drop;
                }
            }
        }
        if client.conn.protocol == Protocol::SwtpmData {
            client.conn.locality = self.swtpm_locality;
        }
        match client.conn.parse_queued(request) {
            Some((step, _)) => self.carry_out(client, step, request, passed, Some(seq)),
            None => {
                if let Some(d) = self.durable.as_mut() {
                    d.journal.idle();
                }
                Served::Keep
            }
        }
    }

    /// The poll loop: control channel, listeners, connections.
    fn run(mut self) -> ExitCode {
        loop {
            if !self.started.answer_control() {
                tracing::info!("shut down on request");
                return ExitCode::SUCCESS;
            }
            let now = Instant::now();
            // Unix connections holding part of a request sit out until their next look.
            let polled: Vec<usize> = (0..self.clients.len())
                .filter(|&i| self.clients[i].retry_at.is_none_or(|at| at <= now))
                .collect();
            let timeout = self
                .clients
                .iter()
                .filter_map(|c| c.retry_at.map(|at| at.saturating_duration_since(now)))
                .min()
                .unwrap_or(POLL)
                .min(POLL);
            let ready = {
                let fds: Vec<_> = self
                    .fronts
                    .iter()
                    .map(|f| f.listener.as_fd())
                    .chain(polled.iter().map(|&i| self.clients[i].stream.as_fd()))
                    .collect();
                match sys::poll_readable(&fds, timeout) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!("poll: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            };
            let accepting: Vec<usize> = (0..self.fronts.len()).filter(|&f| ready[f]).collect();
            for f in accepting {
                self.accept(f);
            }
            // A Unix connection whose next look is due is looked at, readable or not.
            let mut due = vec![false; self.clients.len()];
            for (k, &i) in polled.iter().enumerate() {
                due[i] = ready[self.fronts.len() + k] || self.clients[i].retry_at.is_some();
            }
            let clients = std::mem::take(&mut self.clients);
            let mut shutdown = false;
            for (i, mut client) in clients.into_iter().enumerate() {
                if shutdown || !due.get(i).copied().unwrap_or(false) {
                    self.clients.push(client);
                    continue;
                }
                let served = self.serve(&mut client);
                if let Served::Shutdown = self.settle(client, served) {
                    shutdown = true;
                }
            }
            if shutdown {
                tracing::info!("shut down on request");
                return ExitCode::SUCCESS;
            }
            let adopted = std::mem::take(&mut self.adopted);
            self.clients.extend(adopted);
        }
    }

    /// Puts `client` back among the served ones, or ends it (forgotten by the store, then
    /// closed).
    fn settle(&mut self, client: Client, served: Served) -> Served {
        match served {
            Served::Keep | Served::Shutdown => self.clients.push(client),
            Served::Drop => self.end(client),
        }
        served
    }

    /// A connection ends: forgotten by the store first (so the store does not keep it open),
    /// then closed; a reply left for it is thrown away.
    fn end(&mut self, client: Client) {
        self.ids.remove(&client.id);
        self.inodes.remove(&client.stream.inode());
        if let Some(d) = self.durable.as_mut() {
            d.forget(client.id);
            if matches!(d.journal.peek(), InFlight::Answered { owner } | InFlight::Received { owner, .. } if owner == client.id)
            {
                d.outbox.drain();
                d.journal.idle();
            }
        }
        tracing::debug!(id = client.id, listener = %client.listener, "connection ended");
    }

    /// The lowest id no connection has.
    fn free_id(&self) -> u32 {
        (0..).find(|i| !self.ids.contains(i)).unwrap_or(0)
    }

    /// Accepts a connection on front `f`: kept by the store before it is served.
    fn accept(&mut self, f: usize) {
        let Some(stream) = self.fronts[f].listener.accept() else {
            return;
        };
        stream.set_up();
        if self.ids.len() >= self.capacity() {
            tracing::warn!("{} connections already; refusing another", self.capacity());
            return;
        }
        let id = self.free_id();
        let front = &self.fronts[f];
        if let Some(d) = &self.durable {
            d.keep(id, durable::CONNECTION, &front.name, stream.as_fd());
        }
        self.ids.insert(id);
        self.inodes.insert(stream.inode());
        self.clients.push(Client {
            id,
            stream,
            conn: Connection::granted(front.protocol, front.localities),
            listener: front.name.clone(),
            retry_at: None,
            partial_since: None,
            low_water: false,
        });
    }

    /// Answers the whole requests queued on `client`, one at a time.
    fn serve(&mut self, client: &mut Client) -> Served {
        let mut buf = vec![0u8; MAX_BUFFERED];
        for _ in 0..REQUESTS_PER_TURN {
            let with_fds = client.conn.protocol == Protocol::SwtpmControl;
            let (n, fds) = match client.stream.peek(&mut buf, with_fds) {
                Ok((0, _)) => return Served::Drop,
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Served::Keep,
                Err(_) => return Served::Drop,
            };
            if client.conn.protocol == Protocol::SwtpmData {
                client.conn.locality = self.swtpm_locality;
            }
            let Some((step, taken)) = client.conn.parse_queued(&buf[..n]) else {
                return self.wait_for_more(client, n);
            };
            client.retry_at = None;
            client.partial_since = None;
            if std::mem::take(&mut client.low_water) {
                let _ = sys::set_receive_low_water(client.stream.as_fd(), 1);
            }
            match self.carry_out(client, step, &buf[..taken], fds, None) {
                Served::Keep => {}
                other => return other,
            }
        }
        Served::Keep
    }

    /// Part of a request is queued (`n` bytes): wait for the rest without spinning, or end a
    /// connection whose client closed it mid-request.
    fn wait_for_more(&mut self, client: &mut Client, n: usize) -> Served {
        if sys::peer_closed(client.stream.as_fd()) {
            return Served::Drop;
        }
        match &client.stream {
            Stream::Tcp(s) => {
                // Readable again only once more has come.
                let _ = sys::set_receive_low_water(s.as_fd(), n + 1);
                client.low_water = true;
            }
            Stream::Unix(_) => {
                let now = Instant::now();
                let since = *client.partial_since.get_or_insert(now);
                let pause = (now.saturating_duration_since(since) / 4)
                    .clamp(PARTIAL_RETRY, PARTIAL_RETRY_MAX);
                client.retry_at = Some(now + pause);
            }
        }
        Served::Keep
    }

    /// Carries out one request of `client`: `request` is its bytes, queued on the
    /// connection unless it is `resumed` from the journal (with its command number);
    /// `fds` the descriptors that came with it. Recorded before it is taken, answered
    /// through the outbox.
    fn carry_out(
        &mut self,
        client: &mut Client,
        step: Step,
        request: &[u8],
        fds: Vec<OwnedFd>,
        resumed: Option<u64>,
    ) -> Served {
        if let Step::Close = step {
            return Served::Drop;
        }
        let mut seq = match (&step, resumed) {
            (Step::Command { .. }, Some(seq)) if seq != 0 => seq,
            (Step::Command { .. }, _) => self.next_number(),
            _ => 0,
        };
        // A data channel handed over is kept before the message that hands it over is
        // taken: a successor finds it in the store or the message still queued.
        let mut adopted = true;
        if let Step::TakeDataFd(_) = &step {
            adopted = match fds.into_iter().next() {
                Some(fd) => self.adopt(client, fd),
                // Resumed: it was kept before the message was recorded.
                None => resumed.is_some(),
            };
        }
        if let Some(d) = self.durable.as_mut() {
            d.journal.received(client.id, seq, request);
        }
        if resumed.is_none() && client.stream.take(request.len()).is_err() {
            return Served::Drop;
        }
        let reply = self.reply(client, step, &mut seq, adopted);
        self.deliver(client, reply)
    }

    /// The answer to one request.
    fn reply(&mut self, client: &mut Client, step: Step, seq: &mut u64, adopted: bool) -> Reply {
        match step {
            Step::Command { locality, command } => {
                match self.run_command(seq, locality, &command) {
                    Ok(response) => Reply::Send(client.conn.tpm_reply(&response)),
                    // Whether the command ran is unknown: the client must not be told to
                    // retry it (it could run twice), so the connection ends.
                    Err(Unanswered::Unknown) => Reply::Close,
                    Err(Unanswered::Shutdown) => Reply::Shutdown,
                }
            }
            Step::Refused { what, reply } => {
                self.started
                    .refuse(format_args!("a client of {}", client.listener), what);
                Reply::Send(reply)
            }
            Step::Signal(signal) => self.signal(client, signal),
            Step::Reply(bytes) => {
                if let Some(l) = client.conn.take_locality() {
                    self.swtpm_locality = l;
                    if let Some(d) = self.durable.as_mut() {
                        d.journal.set_locality(l);
                    }
                }
                Reply::Send(bytes)
            }
            Step::ReplyAndClose(bytes) => Reply::SendAndClose(bytes),
            Step::Close => Reply::Close,
            Step::TakeDataFd(ok) if adopted => Reply::Send(ok),
            Step::TakeDataFd(_) => {
                let mut fail = pv_vtpm::gateway::swtpm::RESULT_FAIL.to_be_bytes().to_vec();
                fail.truncate(4);
                Reply::Send(fail)
            }
        }
    }

    /// A platform signal, answered as the client's protocol says.
    fn signal(&mut self, client: &mut Client, signal: vtpm::Platform) -> Reply {
        let mut result = self
            .tpm
            .call(&mut self.started, |start_by| vtpm::Request::Platform {
                signal,
                start_by,
            });
        if let Outcome::NotStarted = result {
            // A TPM that takes nothing (stopped) will never apply it. Power on of a TPM
            // known to be on, NV on and cancel off change nothing, so the TPM is as asked:
            // what an mssim client sends whenever it connects is answered, and the client
            // gets to its command (and to TPM_RC_RETRY) instead of failing to connect.
            if self.tpm.changes_nothing(signal) {
                result = Outcome::Answer(vtpm::Response::Done);
            }
        }
        self.tpm.observe(signal, &result);
        match &result {
            // The TPM refused it, counted and logged it (with this gateway's name).
            Outcome::Answer(vtpm::Response::Error(e)) => tracing::debug!(
                listener = %client.listener,
                "platform signal {signal:?} refused by the TPM: {e}"
            ),
            Outcome::Shutdown => return Reply::Shutdown,
            _ => tracing::debug!(?signal, ?result, "platform signal"),
        }
        let (ok, established) = match result {
            Outcome::Answer(vtpm::Response::Done) => (true, false),
            Outcome::Answer(vtpm::Response::Established(e)) => (true, e),
            _ => (false, false),
        };
        Reply::Send(client.conn.signal_reply(ok, established))
    }

    /// Sends a reply: through the outbox when connections are kept (recorded as made once it
    /// is there whole), else written directly.
    fn deliver(&mut self, client: &mut Client, reply: Reply) -> Served {
        let (bytes, close) = match reply {
            Reply::Send(b) => (b, false),
            Reply::SendAndClose(b) => (b, true),
            Reply::Close => return Served::Drop,
            // Recorded as received: a successor (if any) answers it.
            Reply::Shutdown => return Served::Shutdown,
        };
        let sent = match self.durable.as_mut() {
            Some(d) => {
                d.journal.replying(bytes.len());
                if d.outbox.put(&bytes).is_err() {
                    return Served::Drop;
                }
                d.journal.answered(client.id);
                return match self.flush(client, close) {
                    Served::Keep if close => Served::Drop,
                    other => other,
                };
            }
            None => client.stream.write_all(&bytes),
        };
        match (sent, close) {
            (Ok(()), false) => Served::Keep,
            _ => Served::Drop,
        }
    }

    /// Moves the reply in the outbox to `client`; then nothing is in flight.
    fn flush(&mut self, client: &mut Client, closing: bool) -> Served {
        let Some(d) = self.durable.as_mut() else {
            return Served::Keep;
        };
        let sent = d.outbox.flush(client.stream.as_fd());
        if sent.is_err() {
            // Its client is gone or stalled: the rest is thrown away with the connection.
            return Served::Drop;
        }
        d.journal.idle();
        if closing {
            Served::Drop
        } else {
            Served::Keep
        }
    }

    /// A data channel `fd` handed over on control connection `control`: kept by the store
    /// (once per channel: QEMU hands it over once, a resumed message may hand over a copy
    /// of one kept already) and served with the control connection's grant.
    fn adopt(&mut self, control: &Client, fd: OwnedFd) -> bool {
        let stream = Stream::from_fd(fd);
        let inode = stream.inode();
        if self.inodes.contains(&inode) {
            return true;
        }
        if self.ids.len() >= self.capacity() {
            tracing::warn!(
                "{} connections already; refusing a data channel",
                self.capacity()
            );
            return false;
        }
        let id = self.free_id();
        if let Some(d) = &self.durable {
            d.keep(id, durable::DATA_CHANNEL, &control.listener, stream.as_fd());
        }
        self.ids.insert(id);
        self.inodes.insert(inode);
        self.adopted.push(Client {
            id,
            stream,
            conn: Connection::granted(Protocol::SwtpmData, control.conn.granted),
            listener: control.listener.clone(),
            retry_at: None,
            partial_since: None,
            low_water: false,
        });
        true
    }

    /// The next command number, recorded as possibly used before it is.
    fn next_number(&mut self) -> u64 {
        self.seq += 1;
        if let Some(d) = self.durable.as_mut() {
            d.journal.set_next_seq(self.seq + 1);
        }
        self.seq
    }

    /// Runs a TPM command under number `seq`; a TPM response (an error response if the TPM
    /// refused it or did not start it). The number makes a re-send after a TPM restart, or
    /// by a successor of this gateway, safe: never applied twice.
    fn run_command(
        &mut self,
        seq: &mut u64,
        locality: u8,
        command: &[u8],
    ) -> Result<Vec<u8>, Unanswered> {
        let Some(bytes) = TpmBytes::new(command) else {
            return Ok(error_response(pv_vtpm::server::RC_COMMAND_SIZE));
        };
        for _ in 0..2 {
            let number = *seq;
            let outcome = self
                .tpm
                .call(&mut self.started, |start_by| vtpm::Request::Command {
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
                // Our numbering is behind the TPM's record (the clock went back across a
                // restart of this gateway): the command was refused unrun; number it past
                // the record, recorded before it is sent.
                Outcome::Answer(vtpm::Response::Error(vtpm::VtpmError::StaleSequence { last })) => {
                    self.seq = self.seq.max(last);
                    *seq = self.next_number();
                    if let Some(d) = self.durable.as_mut() {
                        d.journal.renumbered(*seq);
                    }
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
}

/// Why a command got no TPM response.
enum Unanswered {
    /// Whether it ran is unknown.
    Unknown,
    /// The gateway is stopping.
    Shutdown,
}
