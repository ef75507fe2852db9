//! The TPM service's request handling: commands through the engine, exactly once per client
//! command number; permanent state durable before the response; a checkpoint of the
//! volatile state after every command; the platform signals.
//!
//! Every request is checked against the caller's channel grant ([`VtpmGrant`]) first:
//! commands only at granted localities, platform signals only if granted, register accesses
//! only from the guest partition's channel and only for its vCPUs. While a guest partition
//! has the TPM, platform signals that would change the TPM under it are refused. A refusal
//! leaves nothing in the checkpoint.
//!
//! The checkpoint must always fit its region, or no restart could resume from it. Each of its
//! tables is bounded by what the bootstrap record says ([`Clients`]): one last command per
//! client granted commands (plus the guest's TIS client and the service's own), one last
//! access per vCPU of the partition; [`Tpm::start`] refuses a region too small for the
//! tables at their fullest plus [`ENGINE_STATE_RESERVE`], and drops entries of clients or
//! vCPUs that are not there (a checkpoint written by another configuration).

use ipc_defs::services::guest::mask;
use ipc_defs::services::guest::Access;
use ipc_defs::services::guest::Space;
use ipc_defs::services::vtpm::Platform;
use ipc_defs::services::vtpm::Request;
use ipc_defs::services::vtpm::Response;
use ipc_defs::services::vtpm::Right;
use ipc_defs::services::vtpm::TpmBytes;
use ipc_defs::services::vtpm::VtpmError;
use ipc_defs::services::vtpm::VtpmGrant;
use ipc_defs::services::vtpm::MAX_COMMAND;

use crate::libtpms::Engine;
use crate::state::Checkpoint;
use crate::state::CheckpointArea;
use crate::state::CheckpointMemory;
use crate::state::LastAccess;
use crate::state::LastCommand;
use crate::state::PermanentRecord;
use crate::state::PermanentStore;
use crate::state::SharedNv;
use crate::tis;
use crate::tis::Effect;
use crate::tpm2::ST_NO_SESSIONS;
use ipc_defs::hosted::checkpoint::SLOT_HEADER;

/// Size of a TPM 2.0 command or response header (tag, size, code).
pub const TPM_HEADER: usize = 10;
/// TPM_RC_COMMAND_SIZE: the size field and the bytes received disagree.
pub const RC_COMMAND_SIZE: u32 = 0x142;
/// TPM_RC_FAILURE.
pub const RC_FAILURE: u32 = 0x101;

/// A TPM error response with no sessions.
pub fn error_response(rc: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(TPM_HEADER);
    r.extend_from_slice(&ST_NO_SESSIONS.to_be_bytes());
    r.extend_from_slice(&(TPM_HEADER as u32).to_be_bytes());
    r.extend_from_slice(&rc.to_be_bytes());
    r
}

/// Counters of the TPM's work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub commands: u64,
    pub replayed: u64,
    pub permanent_writes: u64,
    pub checkpoints: u64,
    /// Commands that left nothing to checkpoint (see [`changes_volatile_state`]).
    pub checkpoints_skipped: u64,
    /// Requests refused: not granted, a vCPU the partition lacks, a platform signal while
    /// the guest uses the TPM.
    pub refused: u64,
}

/// Whether `response` refuses the caller something its grant or the guest's use of the TPM
/// does not allow (the shell counts and logs these with the caller's name).
pub fn is_refusal(response: &Response) -> bool {
    matches!(
        response,
        Response::Error(
            VtpmError::NotGranted(_) | VtpmError::NoSuchVcpu { .. } | VtpmError::GuestUsesTpm
        )
    )
}

/// Who the TPM serves, from its bootstrap record: what bounds the tables of its checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Clients {
    /// The clients granted commands (by channel name): each keeps its last command and
    /// response in the checkpoint.
    pub commands: Vec<String>,
    /// The guest partition's vCPUs (0: no guest partition): each keeps its last register
    /// access in the checkpoint. Set, the guest uses the TPM.
    pub vcpus: u32,
}

impl Clients {
    /// The clients of a bootstrap record's served channels, by their grants.
    pub fn from_grants<'a>(grants: impl IntoIterator<Item = (&'a str, VtpmGrant)>) -> Clients {
        let mut clients = Clients::default();
        for (name, grant) in grants {
            if !grant.commands.is_empty() {
                clients.commands.push(name.to_string());
            }
            clients.vcpus = clients.vcpus.max(grant.registers);
        }
        clients
    }

    /// Whether `client` may have a record of its last command in the checkpoint: a client
    /// granted commands, or one of the TPM's own.
    fn keeps_record(&self, client: &str) -> bool {
        client == TIS_CLIENT
            || client == PLATFORM_CLIENT
            || self.commands.iter().any(|c| c == client)
    }

    /// The most bytes the checkpoint's tables can take (each entry at its largest, with
    /// postcard's length prefixes), besides the engine's own state.
    pub fn tables_max(&self) -> usize {
        let record = |name: &str| name.len() + RECORD_OVERHEAD + MAX_COMMAND;
        let records: usize = self
            .commands
            .iter()
            .map(|c| record(c))
            .chain([record(TIS_CLIENT), record(PLATFORM_CLIENT)])
            .sum();
        records + self.vcpus as usize * ACCESS_MAX + TIS_MAX
    }
}

/// Room in each checkpoint slot for the engine's volatile state and savestate: libtpms 0.9's
/// volatile state with every object slot holding an RSA-3072 key and every session slot
/// taken is 13.9 KiB (`a_tpm_at_its_fullest_checkpoints_within_the_engine_reserve` measures it
/// and fails if it passes half of this), and it keeps no separate savestate; the rest is
/// room for libtpms versions that keep more.
pub const ENGINE_STATE_RESERVE: usize = 64 << 10;
/// Bytes a command record takes besides its client name and response: length prefixes, the
/// sequence number (a varint of at most 10 bytes), the map's own prefix share.
const RECORD_OVERHEAD: usize = 32;
/// Largest encoded last access of one vCPU (key and four varints, the bool).
const ACCESS_MAX: usize = 5 + 10 + 10 + 1 + 10;
/// Largest encoded register interface: a command or a response of the TPM's buffer, with its
/// phase and the fixed registers.
const TIS_MAX: usize = 2 * MAX_COMMAND + 64;

/// Whether a command may change the volatile state, so that a checkpoint must follow it.
/// Only session-less commands that read are exempt. GetRandom advances the random number
/// generator, which is volatile state: a resumed TPM would repeat its output from the last
/// checkpoint on, so every resume stirs fresh entropy in first ([`Tpm::start`]).
pub fn changes_volatile_state(command: &[u8]) -> bool {
    if command.len() < TPM_HEADER || command[0..2] != ST_NO_SESSIONS.to_be_bytes() {
        return true;
    }
    let code = u32::from_be_bytes([command[6], command[7], command[8], command[9]]);
    !matches!(
        code,
        0x17E // PCR_Read
            | 0x17B // GetRandom
            | 0x17A // GetCapability
            | 0x173 // ReadPublic
            | 0x17C // GetTestResult
            | 0x169 // NV_ReadPublic
            | 0x181 // ReadClock
            | 0x18A // TestParms
    )
}

/// The TPM: engine, state stores, and each client's last command.
pub struct Tpm<P: PermanentStore, M: CheckpointMemory> {
    engine: Engine,
    nv: SharedNv,
    permanent: P,
    area: CheckpointArea<M>,
    checkpoint: Checkpoint,
    pub counters: Counters,
    /// Set when the TPM can no longer keep its promises (its state could not be stored):
    /// the process must exit, so that a restart resumes from what is durable.
    pub fatal: Option<String>,
    /// Whether the TPM resumed from a checkpoint (true) or started afresh.
    pub resumed: bool,
    /// Who it serves (the bounds of the checkpoint's tables).
    clients: Clients,
}

/// The client name under which guest (TIS) commands are recorded.
const TIS_CLIENT: &str = "guest-tis";
/// The client name of commands the service sends its own TPM (start-up, the attestation
/// binding).
const PLATFORM_CLIENT: &str = "platform";

impl<P: PermanentStore, M: CheckpointMemory> Tpm<P, M> {
    /// Loads the permanent state from `permanent` and the newest checkpoint from `memory`,
    /// and powers the engine on: a TPM with no permanent state is manufactured (and its state
    /// stored), one with a checkpoint resumes where it was. `clients` bounds the checkpoint's
    /// tables: a region too small for them at their fullest is refused.
    pub fn start(
        engine: Engine,
        nv: SharedNv,
        mut permanent: P,
        memory: M,
        clients: Clients,
    ) -> Result<Self, String> {
        let needed = 2 * (SLOT_HEADER + clients.tables_max() + ENGINE_STATE_RESERVE);
        if memory.size() < needed {
            return Err(format!(
                "the checkpoint region ({} bytes) cannot hold a checkpoint of {} command client(s) \
                 and {} vCPU(s) at its fullest: give the region at least {} KiB in the manifest \
                 (regions = [{{ name = \"vtpm-checkpoint\", size = \"{}K\" }}])",
                memory.size(),
                clients.commands.len(),
                clients.vcpus,
                needed.div_ceil(1024),
                needed.div_ceil(1024)
            ));
        }
        let record = match permanent.read()? {
            None => None,
            Some(bytes) => Some(PermanentRecord::decode(&bytes).ok_or_else(|| {
                format!(
                    "TPM_NVRAM holds {} bytes that are not this TPM's state record",
                    bytes.len()
                )
            })?),
        };
        let mut area = CheckpointArea::new(memory);
        let mut checkpoint: Checkpoint = area.load().unwrap_or_default();
        if let Some((client, last)) = record.as_ref().and_then(|r| r.command.clone()) {
            // The permanent state may be newer than the checkpoint (a crash between the two
            // writes): its command is then the client's last.
            if checkpoint
                .last
                .get(&client)
                .is_none_or(|l| l.seq < last.seq)
            {
                checkpoint.last.insert(client, last);
            }
        }
        // Records of clients and vCPUs this start does not have are of no use (nobody can send
        // their repeats) and would leave the tables unbounded.
        checkpoint
            .last
            .retain(|client, _| clients.keeps_record(client));
        checkpoint.accesses.retain(|vcpu, _| *vcpu < clients.vcpus);
        let resumed = checkpoint.volatile.is_some();
        let powered_off = checkpoint.powered_off;
        {
            let mut n = nv.lock();
            n.permanent = record.map(|r| r.permall);
            n.resume_volatile = checkpoint.volatile.clone();
            n.savestate = checkpoint.savestate.clone();
        }
        let mut tpm = Tpm {
            engine,
            nv,
            permanent,
            area,
            checkpoint,
            counters: Counters::default(),
            fatal: None,
            resumed,
            clients,
        };
        // A TPM the platform had powered off stays off across a restart of this process.
        if !powered_off {
            tpm.engine
                .power_on()
                .map_err(|rc| format!("libtpms did not start ({rc:#x})"))?;
            if resumed {
                tpm.stir_random()?;
            }
        }
        if let Some((locality, command, seq)) = tpm.checkpoint.tis.in_execution() {
            // Killed while a guest command ran: answer it from the record if it completed,
            // run it now if it did not.
            let seq =
                seq.unwrap_or_else(|| tpm.checkpoint.last.get(TIS_CLIENT).map_or(1, |l| l.seq + 1));
            tpm.run_tis_command(seq, locality, &command);
        }
        tpm.persist(None)?;
        Ok(tpm)
    }

    pub fn is_powered(&self) -> bool {
        self.engine.is_powered()
    }

    /// Mixes fresh entropy from the kernel into the TPM's random number generator: after a
    /// resume its state may be older than the last random bytes it handed out. A TPM that
    /// resumed before its TPM2_Startup refuses it and needs none: its Startup reseeds the
    /// generator from fresh entropy (libtpms' `CryptRandStartup`); and it must still start
    /// (a restart between a platform reset and the firmware's Startup is not a failure).
    fn stir_random(&mut self) -> Result<(), String> {
        let mut command = vec![0x80, 1, 0, 0, 0, 44, 0, 0, 1, 0x46, 0, 32];
        let mut entropy = [0u8; 32];
        getrandom::getrandom(&mut entropy).map_err(|e| format!("no entropy: {e}"))?;
        command.extend_from_slice(&entropy);
        let r = self
            .engine
            .process(0, &command)
            .map_err(|rc| format!("StirRandom failed ({rc:#x})"))?;
        match r.get(6..10) {
            // Success, or TPM_RC_INITIALIZE.
            Some([0, 0, 0, 0]) | Some([0, 0, 1, 0]) => Ok(()),
            _ => Err(format!("StirRandom answered {r:02x?}")),
        }
    }

    /// Whether this start continued an earlier run of the service (resumed or kept powered
    /// off), rather than a fresh power-on.
    pub fn continued(&self) -> bool {
        self.resumed || self.checkpoint.powered_off
    }

    /// Sends TPM2_Startup(CLEAR), as platform firmware would: for a TPM used directly by
    /// tools rather than by a guest whose firmware starts it. A guest's boot power-cycles
    /// the TPM (a platform reset), after which its firmware sends its own Startup.
    pub fn startup_clear(&mut self) -> Result<(), String> {
        match self.own_command(&crate::tpm2::startup_clear()) {
            Ok(r) if r.get(6..10) == Some(&[0, 0, 0, 0]) => Ok(()),
            Ok(r) => Err(format!("TPM2_Startup answered {r:02x?}")),
            Err(e) => Err(format!("TPM2_Startup failed: {e}")),
        }
    }

    /// Runs a command the service sends its own TPM (start-up, the attestation binding) at
    /// locality 0: numbered under the service's own client and run, recorded and stored
    /// exactly as a guest's command is, so that its effect is as durable as any other (and
    /// the binding's commands never mix with a client's command numbers).
    pub fn own_command(&mut self, command: &[u8]) -> Result<Vec<u8>, VtpmError> {
        let seq = self
            .checkpoint
            .last
            .get(PLATFORM_CLIENT)
            .map_or(1, |l| l.seq + 1);
        match self.command(PLATFORM_CLIENT, seq, 0, command) {
            Response::Tpm(r) => Ok(r.as_slice().to_vec()),
            Response::Error(e) => Err(e),
            _ => Err(VtpmError::Engine(RC_FAILURE)),
        }
    }

    /// Writes what the engine produced: permanent state (with the command's record) first,
    /// then the volatile checkpoint.
    fn persist(&mut self, command: Option<(&str, &LastCommand)>) -> Result<(), String> {
        let pending = self.nv.lock().pending_permanent.take();
        if let Some(permall) = pending {
            let record = PermanentRecord {
                command: command.map(|(c, l)| (c.to_string(), l.clone())),
                permall,
            };
            self.permanent.write(&record.encode())?;
            self.counters.permanent_writes += 1;
            self.nv.lock().permanent = Some(record.permall);
        }
        if let Some((client, last)) = command {
            self.checkpoint
                .last
                .insert(client.to_string(), last.clone());
        }
        self.checkpoint.volatile = if self.engine.is_powered() {
            Some(
                self.engine
                    .volatile_state()
                    .map_err(|rc| format!("volatile state not available ({rc:#x})"))?,
            )
        } else {
            None
        };
        self.checkpoint.savestate = self.nv.lock().savestate.clone();
        self.checkpoint.powered_off = !self.engine.is_powered();
        self.area.store(&self.checkpoint)?;
        self.counters.checkpoints += 1;
        Ok(())
    }

    fn fail(&mut self, what: String) -> Response {
        tracing::error!("{what}");
        self.fatal = Some(what);
        Response::Error(VtpmError::Storage)
    }

    /// Whether a guest partition uses this TPM (it has the register interface).
    pub fn guest_uses_it(&self) -> bool {
        self.clients.vcpus > 0
    }

    /// Answers one request of `client`, whose channel carries `grant`.
    pub fn handle(&mut self, client: &str, grant: &VtpmGrant, request: Request) -> Response {
        let response = match request {
            // The deadline to start is checked by the process that takes the request off its
            // ring (it reads the clock); the library runs what it is given.
            Request::Command {
                seq,
                locality,
                command,
                start_by: _,
            } => {
                if grant.commands.is_empty() || !self.clients.keeps_record(client) {
                    Response::Error(VtpmError::NotGranted(Right::Commands))
                } else if locality > 4 {
                    Response::Error(VtpmError::BadLocality(locality))
                } else if !grant.commands.contains(locality) {
                    Response::Error(VtpmError::NotGranted(Right::Locality(locality)))
                } else {
                    self.command(client, seq, locality, command.as_slice())
                }
            }
            Request::Platform { signal, .. } => {
                if !grant.platform {
                    Response::Error(VtpmError::NotGranted(Right::Platform))
                } else if self.guest_uses_it() && !self.leaves_tpm_as_it_is(signal) {
                    Response::Error(VtpmError::GuestUsesTpm)
                } else {
                    self.platform(signal)
                }
            }
            Request::Mmio(access) => {
                let vcpus = grant.registers.min(self.clients.vcpus);
                if grant.registers == 0 {
                    Response::Error(VtpmError::NotGranted(Right::Registers))
                } else if access.vcpu >= vcpus {
                    Response::Error(VtpmError::NoSuchVcpu {
                        vcpu: access.vcpu,
                        vcpus,
                    })
                } else {
                    self.mmio(access)
                }
            }
        };
        if is_refusal(&response) {
            self.counters.refused += 1;
        }
        response
    }

    /// A platform signal from the service itself (the attestation binding's reset): trusted,
    /// not subject to a grant.
    pub fn own_signal(&mut self, signal: Platform) -> Response {
        self.platform(signal)
    }

    /// Whether a platform signal would leave the TPM exactly as it is: what a front-end
    /// client may still send while the guest uses the TPM (tpm2-tools' mssim TCTI sends power
    /// on and NV on whenever it connects).
    fn leaves_tpm_as_it_is(&self, signal: Platform) -> bool {
        match signal {
            Platform::PowerOn => self.engine.is_powered(),
            Platform::NvOn | Platform::CancelOff | Platform::GetEstablished => true,
            Platform::PowerOff
            | Platform::Reset
            | Platform::NvOff
            | Platform::CancelOn
            | Platform::ResetEstablished { .. } => false,
        }
    }

    /// A guest register access. A write of `tpmGo` runs the command in the FIFO; its
    /// response is in the FIFO when the write returns. Every access that changes the
    /// interface (a write, a FIFO read) is in the checkpoint, with its number, before it is
    /// answered: after a restart a repeat gets the recorded answer and a new access finds the
    /// interface exactly as the guest left it.
    fn mmio(&mut self, access: Access) -> Response {
        let offset = access.address.wrapping_sub(tis::BASE);
        let answer = |write: bool, value: u64| {
            if write {
                Response::Done
            } else {
                Response::Register(value)
            }
        };
        // The TPM has no PCI configuration space: a forwarded config access finds nothing.
        if !matches!(access.size, 1 | 2 | 4) || offset >= tis::RANGE || access.space != Space::Mmio
        {
            return answer(access.write.is_some(), mask(access.size));
        }
        let record = |value: u64| LastAccess {
            seq: access.seq,
            address: access.address,
            write: access.write.is_some(),
            value,
        };
        if let Some(last) = self.checkpoint.accesses.get(&access.vcpu) {
            if *last == record(last.value) {
                self.counters.replayed += 1;
                return answer(last.write, last.value);
            }
        }
        let Some(value) = access.written() else {
            self.checkpoint
                .tis
                .set_established(self.engine.established());
            let value = self.checkpoint.tis.read(offset, access.size);
            self.checkpoint.accesses.insert(access.vcpu, record(value));
            if tis::read_has_effect(offset) {
                if let Err(e) = self.store_checkpoint() {
                    return self.fail(format!("TPM state not stored: {e}"));
                }
            }
            return Response::Register(value);
        };
        self.checkpoint.accesses.insert(access.vcpu, record(0));
        match self.checkpoint.tis.write(offset, access.size, value) {
            Effect::None => {}
            Effect::Cancel => self.engine.cancel(),
            Effect::ResetEstablished { locality } => {
                if let Err(rc) = self.engine.reset_established_flag(locality) {
                    tracing::warn!("resetting the established flag: TPM error {rc:#x}");
                }
                // The engine's state changed: a full checkpoint, not just the interface's.
                if let Err(e) = self.persist(None) {
                    return self.fail(format!("TPM state not stored: {e}"));
                }
                return Response::Done;
            }
            Effect::Execute { locality, command } => {
                let seq = self
                    .checkpoint
                    .last
                    .get(TIS_CLIENT)
                    .map_or(1, |l| l.seq + 1);
                self.checkpoint.tis.number(seq);
                // The command is in the checkpoint before it runs: a restart finishes it.
                if let Err(e) = self.persist(None) {
                    return self.fail(format!("TPM state not stored: {e}"));
                }
                self.run_tis_command(seq, locality, &command);
                return Response::Done;
            }
        }
        if let Err(e) = self.store_checkpoint() {
            return self.fail(format!("TPM state not stored: {e}"));
        }
        Response::Done
    }

    /// Stores the checkpoint as it is (the engine's state has not changed since the last
    /// one: only the register interface has).
    fn store_checkpoint(&mut self) -> Result<(), String> {
        self.area.store(&self.checkpoint)?;
        self.counters.checkpoints += 1;
        Ok(())
    }

    /// Runs a guest command with its number and puts the response in the FIFO; the
    /// interface's state is checkpointed with the command (which records it) and again with
    /// its response, so a restart at any point neither loses nor repeats it.
    fn run_tis_command(&mut self, seq: u64, locality: u8, command: &[u8]) {
        let response = match self.command(TIS_CLIENT, seq, locality, command) {
            Response::Tpm(bytes) => bytes.as_slice().to_vec(),
            _ => error_response(RC_FAILURE),
        };
        self.checkpoint.tis.complete(response);
        if let Err(e) = self.persist(None) {
            self.fail(format!("TPM state not stored: {e}"));
        }
    }

    fn command(&mut self, client: &str, seq: u64, locality: u8, command: &[u8]) -> Response {
        if let Some(last) = self.checkpoint.last.get(client) {
            if seq == last.seq {
                // Sent again after a restart: it completed before; never run it twice.
                self.counters.replayed += 1;
                return tpm_response(&last.response);
            }
            if seq < last.seq {
                return Response::Error(VtpmError::StaleSequence { last: last.seq });
            }
        }
        if locality > 4 {
            return Response::Error(VtpmError::BadLocality(locality));
        }
        if !self.engine.is_powered() {
            return Response::Error(VtpmError::PoweredOff);
        }
        let response = if command.len() < TPM_HEADER
            || u32::from_be_bytes([command[2], command[3], command[4], command[5]]) as usize
                != command.len()
        {
            error_response(RC_COMMAND_SIZE)
        } else {
            match self.engine.process(locality, command) {
                Ok(r) => r,
                Err(rc) => return Response::Error(VtpmError::Engine(rc)),
            }
        };
        self.counters.commands += 1;
        let last = LastCommand { seq, response };
        let permanent_changed = self.nv.lock().pending_permanent.is_some();
        if permanent_changed || changes_volatile_state(command) {
            if let Err(e) = self.persist(Some((client, &last))) {
                return self.fail(format!("TPM state not stored: {e}"));
            }
        } else {
            self.counters.checkpoints_skipped += 1;
        }
        tpm_response(&last.response)
    }

    fn platform(&mut self, signal: Platform) -> Response {
        let result = match signal {
            Platform::PowerOn => self.power_on(),
            Platform::PowerOff => {
                self.power_off();
                Ok(())
            }
            Platform::Reset => {
                self.power_off();
                self.power_on()
            }
            Platform::NvOn | Platform::NvOff | Platform::CancelOff => Ok(()),
            Platform::CancelOn => {
                self.engine.cancel();
                Ok(())
            }
            Platform::GetEstablished => return Response::Established(self.engine.established()),
            Platform::ResetEstablished { locality } => self
                .engine
                .reset_established_flag(locality)
                .map_err(|rc| format!("reset of the established flag failed ({rc:#x})")),
        };
        if let Err(e) = result {
            tracing::warn!("{signal:?}: {e}");
            return Response::Error(VtpmError::Engine(0));
        }
        match self.persist(None) {
            Ok(()) => Response::Done,
            Err(e) => self.fail(format!("TPM state not stored: {e}")),
        }
    }

    fn power_on(&mut self) -> Result<(), String> {
        self.engine
            .power_on()
            .map_err(|rc| format!("power on failed ({rc:#x})"))
    }

    /// Power off: the volatile state is gone, as at a real power cut; a later power on is a
    /// fresh boot (TPM2_Startup needed), not a resume.
    fn power_off(&mut self) {
        self.engine.power_off();
        self.nv.lock().resume_volatile = None;
    }
}

fn tpm_response(bytes: &[u8]) -> Response {
    match TpmBytes::new(bytes) {
        Some(b) => Response::Tpm(b),
        None => {
            Response::Tpm(TpmBytes::new(&error_response(RC_COMMAND_SIZE)).expect("header fits"))
        }
    }
}

const _: () = assert!(MAX_COMMAND >= TPM_HEADER);
