//! An NVMe controller (NVMe 1.4, the subset Linux's `nvme` driver uses; facts in
//! `DEVICE-FACTS.md`) over a [`Disk`]: one namespace of 4 KiB blocks, the admin queue and up to
//! [`MAX_IO_QUEUES`] I/O queue pairs, commands and PRPs in the guest memory the transport maps.
//!
//! The transport feeds it the guest's BAR 0 accesses ([`NvmeController::mmio_read`] /
//! [`NvmeController::mmio_write`]); a doorbell write runs the commands then submitted and
//! says whether the interrupt should be raised. Every guest value is checked: a queue size,
//! base or id out of range, a PRP outside guest memory or a list too long, a block past the
//! namespace are completion errors, never a panic or an access outside guest memory.
//!
//! **Shadow doorbells** (Doorbell Buffer Config, admin opcode 0x7C, OACS bit 8): a driver
//! that uses them keeps each I/O queue's SQ tail and CQ head in a page of its memory and
//! writes the doorbell register only when the controller's event index (a second page) asks
//! for it. A transport can then deliver those doorbell writes as bare signals (a KVM
//! ioeventfd: no value, no exit to user space) and call [`NvmeController::stage_kick`],
//! which reads the values from the shadow page. The admin queue keeps its registers.
//!
//! **Completions are staged**: the `stage_*` calls run commands and leave their completion
//! entries in the state ([`NvmeState`]) until [`NvmeController::post`] writes them. A
//! transport that keeps a crash checkpoint stores the state between the two: a restarted
//! process posts the staged entries again (the same bytes in the same slots) instead of
//! running commands the guest may already have seen completed.

use vm_memory::Bytes;
use vm_memory::GuestAddress;
use vm_memory::GuestMemory;

use crate::block::BlockError;
use crate::block::Disk;
use crate::block::BLOCK;

/// Bytes of BAR 0: registers, then the doorbells of queues 0..=MAX_IO_QUEUES.
pub const BAR_SIZE: u64 = 0x4000;
/// I/O queue pairs the controller offers.
pub const MAX_IO_QUEUES: u16 = 4;
/// Largest I/O queue (entries; CAP.MQES + 1).
pub const MAX_QUEUE_ENTRIES: u16 = 1024;
/// Largest admin queue (entries): what AQA's 12-bit sizes can say.
const MAX_ADMIN_ENTRIES: u16 = 4096;
/// Largest transfer: 2^MDTS pages of 4 KiB.
pub const MDTS: u8 = 8;
const PAGE: u64 = 4096;
const DOORBELLS: u64 = 0x1000;
/// OACS bit 8: the controller supports Doorbell Buffer Config.
const OACS_DOORBELL_BUFFER: u16 = 1 << 8;
/// Rounds of a kick: a shadow value the driver wrote while the event index was being
/// updated is picked up by the next round (bounded: a driver racing forever waits for
/// its next kick).
const KICK_ROUNDS: usize = 4;

/// Register offsets.
const CAP: u64 = 0x00;
const VS: u64 = 0x08;
const CC: u64 = 0x14;
const CSTS: u64 = 0x1c;
const AQA: u64 = 0x24;
const ASQ: u64 = 0x28;
const ACQ: u64 = 0x30;

/// A completion status: status code type and status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub sct: u8,
    pub sc: u8,
}

impl Status {
    pub const SUCCESS: Status = Status { sct: 0, sc: 0x00 };
    pub const INVALID_OPCODE: Status = Status { sct: 0, sc: 0x01 };
    pub const INVALID_FIELD: Status = Status { sct: 0, sc: 0x02 };
    pub const DATA_TRANSFER_ERROR: Status = Status { sct: 0, sc: 0x04 };
    pub const INTERNAL_ERROR: Status = Status { sct: 0, sc: 0x06 };
    pub const INVALID_NAMESPACE: Status = Status { sct: 0, sc: 0x0b };
    pub const LBA_OUT_OF_RANGE: Status = Status { sct: 0, sc: 0x80 };
    pub const INVALID_CQ: Status = Status { sct: 1, sc: 0x00 };
    pub const INVALID_QUEUE_ID: Status = Status { sct: 1, sc: 0x01 };
    pub const INVALID_QUEUE_SIZE: Status = Status { sct: 1, sc: 0x02 };
    pub const UNRECOVERED_READ_ERROR: Status = Status { sct: 2, sc: 0x81 };

    fn field(self) -> u32 {
        (u32::from(self.sc) | u32::from(self.sct & 7) << 8) << 17
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Sq {
    base: u64,
    size: u16,
    head: u16,
    tail: u16,
    cq: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Cq {
    base: u64,
    size: u16,
    tail: u16,
    head: u16,
    phase: bool,
}

/// What a controller holds besides its disk: registers and queues. A service keeps it in a
/// checkpoint after every access, so that a restarted process goes on where the last one
/// stopped ([`NvmeController::state`], [`NvmeController::restore`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NvmeState {
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    /// The shadow doorbell and event index pages, once the driver configured them.
    #[serde(default)]
    shadow: Option<Shadow>,
    /// Completion entries staged and not yet known to be posted: address and bytes.
    #[serde(default)]
    staged: Vec<(u64, [u8; 16])>,
}

/// Where a driver keeps its shadow doorbells and reads the controller's event indexes
/// (each a page laid out as the doorbell registers, stride 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Shadow {
    doorbells: u64,
    event_index: u64,
}

/// An NVMe controller with one namespace over `disk`.
pub struct NvmeController<D: Disk> {
    disk: D,
    serial: [u8; 20],
    cc: u32,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    shadow: Option<Shadow>,
    staged: Vec<(u64, [u8; 16])>,
    /// Failures the service logs (a tampered block with its LBA, a bad PRP...).
    pub errors: Vec<String>,
}

/// A 64-byte submission queue entry's fields this controller reads.
#[derive(Debug, Clone, Copy)]
struct Command {
    opcode: u8,
    cid: u16,
    nsid: u32,
    prp1: u64,
    prp2: u64,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
}

impl Command {
    fn parse(b: &[u8; 64]) -> Command {
        let d = |i: usize| u32::from_le_bytes(b[i * 4..i * 4 + 4].try_into().expect("4"));
        let q = |i: usize| u64::from_le_bytes(b[i * 4..i * 4 + 8].try_into().expect("8"));
        Command {
            opcode: b[0],
            cid: u16::from_le_bytes([b[2], b[3]]),
            nsid: d(1),
            prp1: q(6),
            prp2: q(8),
            cdw10: d(10),
            cdw11: d(11),
            cdw12: d(12),
        }
    }
}

impl<D: Disk> NvmeController<D> {
    pub fn new(disk: D, serial: &str) -> NvmeController<D> {
        let mut s = [b' '; 20];
        for (d, c) in s
            .iter_mut()
            .zip(serial.bytes().filter(u8::is_ascii_graphic))
        {
            *d = c;
        }
        NvmeController {
            disk,
            serial: s,
            cc: 0,
            csts: 0,
            aqa: 0,
            asq: 0,
            acq: 0,
            sqs: vec![None; usize::from(MAX_IO_QUEUES) + 1],
            cqs: vec![None; usize::from(MAX_IO_QUEUES) + 1],
            shadow: None,
            staged: Vec::new(),
            errors: Vec::new(),
        }
    }

    /// Whether the driver configured shadow doorbells: its I/O queues' doorbell writes then
    /// need not carry a value ([`NvmeController::stage_kick`]).
    pub fn shadow_doorbells(&self) -> bool {
        self.shadow.is_some()
    }

    pub fn disk(&mut self) -> &mut D {
        &mut self.disk
    }

    /// The registers and queues.
    pub fn state(&self) -> NvmeState {
        NvmeState {
            cc: self.cc,
            csts: self.csts,
            aqa: self.aqa,
            asq: self.asq,
            acq: self.acq,
            sqs: self.sqs.clone(),
            cqs: self.cqs.clone(),
            shadow: self.shadow,
            staged: self.staged.clone(),
        }
    }

    /// Takes up `state` (from [`NvmeController::state`] of an earlier process); a state that
    /// could not have come from a controller is refused whole.
    pub fn restore(&mut self, state: NvmeState) -> Result<(), String> {
        let queues = usize::from(MAX_IO_QUEUES) + 1;
        if state.sqs.len() != queues || state.cqs.len() != queues {
            return Err(format!(
                "{} / {} queues recorded",
                state.sqs.len(),
                state.cqs.len()
            ));
        }
        // The admin queues may be as large as AQA says (4096 entries), I/O queues CAP.MQES.
        let largest = |qid: usize| {
            if qid == 0 {
                MAX_ADMIN_ENTRIES
            } else {
                MAX_QUEUE_ENTRIES
            }
        };
        let sq_ok = state.sqs.iter().enumerate().all(|(qid, q)| {
            q.is_none_or(|q| {
                (2..=largest(qid)).contains(&q.size)
                    && q.head < q.size
                    && q.tail < q.size
                    && usize::from(q.cq) < queues
            })
        });
        let cq_ok = state.cqs.iter().enumerate().all(|(qid, q)| {
            q.is_none_or(|q| {
                (2..=largest(qid)).contains(&q.size) && q.head < q.size && q.tail < q.size
            })
        });
        if !sq_ok || !cq_ok {
            return Err("a recorded queue is out of range".into());
        }
        let shadow_ok = state
            .shadow
            .is_none_or(|s| s.doorbells.is_multiple_of(PAGE) && s.event_index.is_multiple_of(PAGE));
        let most_staged = usize::from(MAX_ADMIN_ENTRIES)
            + usize::from(MAX_IO_QUEUES) * usize::from(MAX_QUEUE_ENTRIES);
        if !shadow_ok || state.staged.len() > most_staged {
            return Err("recorded shadow doorbells or staged completions out of range".into());
        }
        self.cc = state.cc;
        self.csts = state.csts;
        self.aqa = state.aqa;
        self.asq = state.asq;
        self.acq = state.acq;
        self.sqs = state.sqs;
        self.cqs = state.cqs;
        self.shadow = state.shadow;
        self.staged = state.staged;
        Ok(())
    }

    fn cap(&self) -> u64 {
        // MQES, CQR (contiguous queues required), TO 2 s (units of 500 ms), DSTRD 0,
        // CSS bit 37: the NVM command set, MPSMIN/MPSMAX 0 (4 KiB pages).
        u64::from(MAX_QUEUE_ENTRIES - 1) | 1 << 16 | 4 << 24 | 1 << 37
    }

    /// A read of BAR 0 at `offset` (`size` 4 or 8 bytes).
    pub fn mmio_read(&self, offset: u64, size: u8) -> u64 {
        let reg = |v: u64| -> u64 {
            match size {
                4 => v & 0xffff_ffff,
                _ => v,
            }
        };
        match offset {
            CAP => reg(self.cap()),
            0x04 => self.cap() >> 32,
            VS => 0x0001_0400,
            CC => u64::from(self.cc),
            CSTS => u64::from(self.csts),
            AQA => u64::from(self.aqa),
            ASQ => reg(self.asq),
            0x2c => self.asq >> 32,
            ACQ => reg(self.acq),
            0x34 => self.acq >> 32,
            _ => 0,
        }
    }

    /// A write of BAR 0, with its completions posted. True when a completion was posted
    /// (raise the interrupt).
    pub fn mmio_write<M: GuestMemory>(
        &mut self,
        mem: &M,
        offset: u64,
        size: u8,
        value: u64,
    ) -> bool {
        self.stage_mmio_write(mem, offset, size, value);
        self.post(mem)
    }

    /// A write of BAR 0; the completions it makes are staged ([`NvmeController::post`]).
    pub fn stage_mmio_write<M: GuestMemory>(&mut self, mem: &M, offset: u64, size: u8, value: u64) {
        let low = value as u32;
        match offset {
            CC => self.set_cc(low),
            AQA => self.aqa = low,
            ASQ if size == 8 => self.asq = value,
            ASQ => self.asq = (self.asq & !0xffff_ffff) | u64::from(low),
            0x2c => self.asq = (self.asq & 0xffff_ffff) | u64::from(low) << 32,
            ACQ if size == 8 => self.acq = value,
            ACQ => self.acq = (self.acq & !0xffff_ffff) | u64::from(low),
            0x34 => self.acq = (self.acq & 0xffff_ffff) | u64::from(low) << 32,
            o if (DOORBELLS..BAR_SIZE).contains(&o) && self.csts & 1 == 1 => {
                let index = (o - DOORBELLS) / 4;
                let qid = usize::try_from(index / 2).unwrap_or(usize::MAX);
                if qid != 0 && self.shadow.is_some() {
                    // The shadow page holds the value (the same one, for a driver that
                    // keeps it); a transport that gets no value calls stage_kick alike.
                    self.stage_kick(mem);
                } else if index.is_multiple_of(2) {
                    self.sq_doorbell(mem, qid, low);
                } else {
                    if let Some(Some(cq)) = self.cqs.get_mut(qid) {
                        if u32::from(cq.size) > low {
                            cq.head = low as u16;
                        }
                    }
                    // Room on the queue: what waited for it runs now.
                    self.run_waiting(mem);
                }
            }
            _ => {}
        }
    }

    /// Writes the staged completion entries into guest memory. True when there were any
    /// (raise the interrupt).
    pub fn post<M: GuestMemory>(&mut self, mem: &M) -> bool {
        let mut posted = false;
        for (at, entry) in std::mem::take(&mut self.staged) {
            if mem.write_slice(&entry, GuestAddress(at)).is_err() {
                self.errors
                    .push(format!("completion entry at {at:#x}: outside guest memory"));
            } else {
                posted = true;
            }
        }
        posted
    }

    /// Whether completions are staged and not yet posted.
    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }

    /// A doorbell rang without its value (or several did): with shadow doorbells on, reads
    /// each I/O queue's SQ tail and CQ head from the shadow page, runs what was submitted
    /// (completions staged), and updates the event indexes so that the driver rings again
    /// when it submits more, or frees room a queue waits for. True when the controller's
    /// state changed (a transport checkpoints it then).
    pub fn stage_kick<M: GuestMemory>(&mut self, mem: &M) -> bool {
        let Some(shadow) = self.shadow else {
            return false;
        };
        if self.csts & 0b11 != 1 {
            return false;
        }
        let before = (self.sqs.clone(), self.cqs.clone());
        for _ in 0..KICK_ROUNDS {
            let seen = self.read_shadow(mem, shadow);
            // Heads first: the room that completions need.
            for (qid, (_, head)) in seen.iter().enumerate().skip(1) {
                if let (Some(Some(cq)), Some(head)) = (self.cqs.get_mut(qid), head) {
                    cq.head = *head;
                }
            }
            for (qid, (tail, _)) in seen.iter().enumerate().skip(1) {
                if let Some(tail) = tail {
                    self.sq_doorbell(mem, qid, u32::from(*tail));
                }
            }
            self.write_event_indexes(mem, shadow);
            // A value the driver wrote after it was read above, but before it saw the new
            // event index, rang no doorbell: look once more.
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            if self.read_shadow(mem, shadow) == self.read_shadow_state() {
                break;
            }
        }
        before != (self.sqs.clone(), self.cqs.clone())
    }

    /// Each I/O queue's shadow SQ tail and CQ head (index = queue id; `None` for a queue that
    /// does not exist or a value out of range, which is logged).
    fn read_shadow<M: GuestMemory>(
        &mut self,
        mem: &M,
        shadow: Shadow,
    ) -> Vec<(Option<u16>, Option<u16>)> {
        let mut out = vec![(None, None); usize::from(MAX_IO_QUEUES) + 1];
        for (qid, slot) in out.iter_mut().enumerate().skip(1) {
            let at = shadow.doorbells + 8 * qid as u64;
            let mut value = |at: u64, size: Option<u16>, what: &str| -> Option<u16> {
                let size = size?;
                match mem.read_obj::<u32>(GuestAddress(at)) {
                    Ok(v) if v < u32::from(size) => Some(v as u16),
                    Ok(v) => {
                        self.errors.push(format!(
                            "queue {qid}: shadow {what} {v} past its {size} entries"
                        ));
                        None
                    }
                    Err(_) => None,
                }
            };
            let sq_size = self.sqs[qid].map(|q| q.size);
            let cq_size = self.cqs[qid].map(|q| q.size);
            *slot = (
                value(at, sq_size, "SQ tail"),
                value(at + 4, cq_size, "CQ head"),
            );
        }
        out
    }

    /// What [`Self::read_shadow`] reads when nothing changed since the last kick.
    fn read_shadow_state(&self) -> Vec<(Option<u16>, Option<u16>)> {
        (0..=usize::from(MAX_IO_QUEUES))
            .map(|qid| {
                if qid == 0 {
                    return (None, None);
                }
                (self.sqs[qid].map(|q| q.tail), self.cqs[qid].map(|q| q.head))
            })
            .collect()
    }

    /// Event indexes: an SQ's is the tail taken (the driver rings when it goes past it); a
    /// CQ's is its head while a submission queue waits for room on it (the driver rings
    /// when it frees an entry), else one behind the head (it does not ring).
    fn write_event_indexes<M: GuestMemory>(&mut self, mem: &M, shadow: Shadow) {
        for qid in 1..=usize::from(MAX_IO_QUEUES) {
            let at = shadow.event_index + 8 * qid as u64;
            if let Some(sq) = self.sqs[qid] {
                let _ = mem.write_obj(u32::from(sq.tail), GuestAddress(at));
            }
            if let Some(cq) = self.cqs[qid] {
                let waiting = self
                    .sqs
                    .iter()
                    .flatten()
                    .any(|sq| usize::from(sq.cq) == qid && sq.head != sq.tail);
                let index = if waiting {
                    cq.head
                } else {
                    (cq.head + cq.size - 1) % cq.size
                };
                let _ = mem.write_obj(u32::from(index), GuestAddress(at + 4));
            }
        }
    }

    /// Runs the entries of submission queues that waited for room on their completion queue.
    fn run_waiting<M: GuestMemory>(&mut self, mem: &M) {
        for qid in 0..self.sqs.len() {
            if let Some(sq) = self.sqs[qid] {
                if sq.head != sq.tail {
                    self.sq_doorbell(mem, qid, u32::from(sq.tail));
                }
            }
        }
    }

    fn set_cc(&mut self, cc: u32) {
        let was = self.cc & 1 == 1;
        self.cc = cc;
        match (was, cc & 1 == 1) {
            (false, true) => {
                let sq_size = (self.aqa & 0xfff) as u16 + 1;
                let cq_size = ((self.aqa >> 16) & 0xfff) as u16 + 1;
                let aligned = self.asq.is_multiple_of(PAGE) && self.acq.is_multiple_of(PAGE);
                if !aligned || sq_size < 2 || cq_size < 2 || self.asq == 0 || self.acq == 0 {
                    self.csts = 1 << 1; // CFS: the admin queue is unusable.
                    self.errors
                        .push("controller enabled with an invalid admin queue".into());
                    return;
                }
                self.sqs[0] = Some(Sq {
                    base: self.asq,
                    size: sq_size,
                    head: 0,
                    tail: 0,
                    cq: 0,
                });
                self.cqs[0] = Some(Cq {
                    base: self.acq,
                    size: cq_size,
                    tail: 0,
                    head: 0,
                    phase: true,
                });
                self.csts = 1;
            }
            (true, false) => self.reset(),
            _ => {}
        }
        // A shutdown request (CC.SHN) completes at once: nothing is cached here.
        if (cc >> 14) & 3 != 0 {
            self.csts = (self.csts & !(3 << 2)) | 2 << 2;
        }
    }

    fn reset(&mut self) {
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
        self.shadow = None;
        self.staged.clear();
        self.csts = 0;
    }

    /// New tail of submission queue `qid`: runs what it submitted, while its completion
    /// queue has room (the rest waits for the driver to free some).
    fn sq_doorbell<M: GuestMemory>(&mut self, mem: &M, qid: usize, tail: u32) -> bool {
        let Some(Some(sq)) = self.sqs.get(qid).copied() else {
            self.errors.push(format!(
                "doorbell of submission queue {qid}, which does not exist"
            ));
            return false;
        };
        if self.csts & 1 << 1 != 0 {
            return false; // fatal: nothing runs until a reset
        }
        if tail >= u32::from(sq.size) {
            self.errors.push(format!(
                "submission queue {qid}: tail {tail} past its {} entries",
                sq.size
            ));
            return false;
        }
        let mut sq = sq;
        sq.tail = tail as u16;
        if let Some(s) = self.sqs[qid].as_mut() {
            s.tail = sq.tail;
        }
        let mut posted = false;
        while sq.head != sq.tail {
            let full = self
                .cqs
                .get(usize::from(sq.cq))
                .copied()
                .flatten()
                .is_none_or(|cq| (cq.tail + 1) % cq.size == cq.head);
            if full {
                break;
            }
            let mut raw = [0u8; 64];
            let at = sq.base + u64::from(sq.head) * 64;
            sq.head = (sq.head + 1) % sq.size;
            if let Some(s) = self.sqs[qid].as_mut() {
                s.head = sq.head;
            }
            if mem.read_slice(&mut raw, GuestAddress(at)).is_err() {
                // The queue is where the device cannot reach (outside the memory it was
                // given): nothing can be answered on it; the controller says it is fatally
                // stopped (CSTS.CFS), which a driver notices, rather than leave it waiting.
                self.errors.push(format!(
                    "submission queue {qid}: entry at {at:#x} is outside the guest memory this device may reach; controller fatal"
                ));
                self.csts |= 1 << 1;
                break;
            }
            let cmd = Command::parse(&raw);
            let answer = if qid == 0 {
                self.admin(mem, &cmd)
            } else {
                self.io(mem, &cmd)
            };
            // An async event request stays outstanding (no event is ever reported).
            let Some((status, result)) = answer else {
                continue;
            };
            posted |= self.complete(mem, (sq.cq, qid as u16, sq.head), cmd.cid, (status, result));
        }
        posted
    }

    /// Posts the completion of command `cid` of submission queue `sqid` (whose head is now
    /// `sq_head`) on completion queue `cqid`.
    fn complete<M: GuestMemory>(
        &mut self,
        mem: &M,
        (cqid, sqid, sq_head): (u16, u16, u16),
        cid: u16,
        (status, result): (Status, u32),
    ) -> bool {
        let Some(Some(cq)) = self.cqs.get_mut(usize::from(cqid)) else {
            return false;
        };
        if (cq.tail + 1) % cq.size == cq.head {
            self.errors.push(format!("completion queue {cqid} is full"));
            return false;
        }
        let mut entry = [0u8; 16];
        entry[..4].copy_from_slice(&result.to_le_bytes());
        entry[8..12].copy_from_slice(&(u32::from(sq_head) | u32::from(sqid) << 16).to_le_bytes());
        let dw3 = u32::from(cid) | u32::from(cq.phase) << 16 | status.field();
        entry[12..].copy_from_slice(&dw3.to_le_bytes());
        let at = cq.base + u64::from(cq.tail) * 16;
        if !mem.check_range(
            GuestAddress(at),
            entry.len(),
            vm_memory::Permissions::ReadWrite,
        ) {
            self.errors.push(format!(
                "completion queue {cqid}: entry outside guest memory"
            ));
            return false;
        }
        self.staged.push((at, entry));
        cq.tail = (cq.tail + 1) % cq.size;
        if cq.tail == 0 {
            cq.phase = !cq.phase;
        }
        true
    }

    fn admin<M: GuestMemory>(&mut self, mem: &M, cmd: &Command) -> Option<(Status, u32)> {
        let qid = (cmd.cdw10 & 0xffff) as usize;
        let size = ((cmd.cdw10 >> 16) & 0xffff) + 1;
        let ok = Some((Status::SUCCESS, 0));
        match cmd.opcode {
            0x05 => {
                // Create I/O completion queue: physically contiguous (PC) required.
                if qid == 0 || qid > usize::from(MAX_IO_QUEUES) || self.cqs[qid].is_some() {
                    return Some((Status::INVALID_QUEUE_ID, 0));
                }
                if size < 2
                    || size > u32::from(MAX_QUEUE_ENTRIES)
                    || cmd.cdw11 & 1 == 0
                    || !cmd.prp1.is_multiple_of(PAGE)
                {
                    return Some((Status::INVALID_QUEUE_SIZE, 0));
                }
                self.cqs[qid] = Some(Cq {
                    base: cmd.prp1,
                    size: size as u16,
                    tail: 0,
                    head: 0,
                    phase: true,
                });
                ok
            }
            0x01 => {
                let cqid = (cmd.cdw11 >> 16) as usize;
                if qid == 0 || qid > usize::from(MAX_IO_QUEUES) || self.sqs[qid].is_some() {
                    return Some((Status::INVALID_QUEUE_ID, 0));
                }
                if cqid == 0 || self.cqs.get(cqid).is_none_or(Option::is_none) {
                    return Some((Status::INVALID_CQ, 0));
                }
                if size < 2
                    || size > u32::from(MAX_QUEUE_ENTRIES)
                    || cmd.cdw11 & 1 == 0
                    || !cmd.prp1.is_multiple_of(PAGE)
                {
                    return Some((Status::INVALID_QUEUE_SIZE, 0));
                }
                self.sqs[qid] = Some(Sq {
                    base: cmd.prp1,
                    size: size as u16,
                    head: 0,
                    tail: 0,
                    cq: cqid as u16,
                });
                ok
            }
            0x00 => {
                if qid == 0 || self.sqs.get(qid).is_none_or(Option::is_none) {
                    return Some((Status::INVALID_QUEUE_ID, 0));
                }
                self.sqs[qid] = None;
                ok
            }
            0x04 => {
                if qid == 0 || self.cqs.get(qid).is_none_or(Option::is_none) {
                    return Some((Status::INVALID_QUEUE_ID, 0));
                }
                // A completion queue a submission queue still posts to stays.
                if self
                    .sqs
                    .iter()
                    .flatten()
                    .any(|sq| usize::from(sq.cq) == qid)
                {
                    return Some((Status::INVALID_QUEUE_ID, 0));
                }
                self.cqs[qid] = None;
                ok
            }
            0x06 => Some(self.identify(mem, cmd)),
            0x09 | 0x0a => {
                let n = u32::from(MAX_IO_QUEUES - 1);
                match cmd.cdw10 & 0xff {
                    // Number of queues: what the controller gives, whatever was asked.
                    0x07 => Some((Status::SUCCESS, n | n << 16)),
                    // Volatile write cache: present, and stays on.
                    0x06 => Some((Status::SUCCESS, 1)),
                    _ if cmd.opcode == 0x0a => ok,
                    _ => Some((Status::INVALID_FIELD, 0)),
                }
            }
            0x0c => None,
            0x7c => {
                // Doorbell Buffer Config: two pages the device reaches, page-aligned.
                let usable = |a: u64| {
                    a != 0
                        && a.is_multiple_of(PAGE)
                        && mem.check_range(
                            GuestAddress(a),
                            PAGE as usize,
                            vm_memory::Permissions::ReadWrite,
                        )
                };
                if !usable(cmd.prp1) || !usable(cmd.prp2) || cmd.prp1 == cmd.prp2 {
                    return Some((Status::INVALID_FIELD, 0));
                }
                let shadow = Shadow {
                    doorbells: cmd.prp1,
                    event_index: cmd.prp2,
                };
                self.shadow = Some(shadow);
                self.write_event_indexes(mem, shadow);
                ok
            }
            _ => Some((Status::INVALID_OPCODE, 0)),
        }
    }

    fn identify<M: GuestMemory>(&mut self, mem: &M, cmd: &Command) -> (Status, u32) {
        let mut page = vec![0u8; BLOCK];
        match cmd.cdw10 & 0xff {
            0x00 if cmd.nsid == 1 => {
                let blocks = self.disk.blocks();
                page[..8].copy_from_slice(&blocks.to_le_bytes()); // NSZE
                page[8..16].copy_from_slice(&blocks.to_le_bytes()); // NCAP
                page[16..24].copy_from_slice(&blocks.to_le_bytes()); // NUSE
                page[130] = 12; // LBAF0: 2^12-byte blocks (bytes 128..132: MS, LBADS, RP)
            }
            0x00 => return (Status::INVALID_NAMESPACE, 0),
            0x01 => {
                page[..2].copy_from_slice(&0x1b36u16.to_le_bytes()); // VID
                page[4..24].copy_from_slice(&self.serial);
                page[24..64].copy_from_slice(b"pv-storage NVMe                         ");
                page[64..72].copy_from_slice(b"0001    ");
                page[77] = MDTS;
                page[80..84].copy_from_slice(&0x0001_0400u32.to_le_bytes()); // VER
                page[256..258].copy_from_slice(&OACS_DOORBELL_BUFFER.to_le_bytes()); // OACS
                page[512] = 0x66; // SQES
                page[513] = 0x44; // CQES
                page[516..520].copy_from_slice(&1u32.to_le_bytes()); // NN
                page[520] = 1 << 2; // ONCS: dataset management
                page[525] = 1; // VWC: volatile write cache (flush means something)
            }
            0x02 => page[..4].copy_from_slice(&1u32.to_le_bytes()),
            // Namespace id descriptors, and the I/O command set structures: none.
            0x03 | 0x06 => {}
            _ => return (Status::INVALID_FIELD, 0),
        }
        match self.transfer(mem, cmd, BLOCK, |buf| {
            buf.copy_from_slice(&page);
        }) {
            Ok(()) => (Status::SUCCESS, 0),
            Err(s) => (s, 0),
        }
    }

    /// The guest pages a command's data lives in, from its PRPs: `(address, bytes)` in order.
    fn prps<M: GuestMemory>(
        &mut self,
        mem: &M,
        cmd: &Command,
        len: usize,
    ) -> Result<Vec<(u64, usize)>, Status> {
        let mut out = Vec::new();
        let first = (PAGE - cmd.prp1 % PAGE).min(len as u64) as usize;
        out.push((cmd.prp1, first));
        let mut left = len - first;
        if left == 0 {
            return Ok(out);
        }
        if left <= PAGE as usize {
            if !cmd.prp2.is_multiple_of(PAGE) {
                return Err(Status::INVALID_FIELD);
            }
            out.push((cmd.prp2, left));
            return Ok(out);
        }
        // A PRP list: entries of 8 bytes; the last of a full list page chains to the next.
        let mut list = cmd.prp2;
        if !list.is_multiple_of(8) {
            return Err(Status::INVALID_FIELD);
        }
        let max_entries = (1usize << MDTS) + 1;
        while left > 0 {
            if out.len() > max_entries {
                return Err(Status::INVALID_FIELD);
            }
            let entries_here = ((PAGE - list % PAGE) / 8) as usize;
            let pages_needed = left.div_ceil(PAGE as usize);
            let chain = pages_needed > entries_here;
            let usable = if chain {
                entries_here - 1
            } else {
                pages_needed
            };
            for k in 0..usable {
                let entry: u64 = mem
                    .read_obj::<u64>(GuestAddress(list + 8 * k as u64))
                    .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
                if !entry.is_multiple_of(PAGE) {
                    return Err(Status::INVALID_FIELD);
                }
                let n = left.min(PAGE as usize);
                out.push((entry, n));
                left -= n;
            }
            if chain {
                list = mem
                    .read_obj::<u64>(GuestAddress(list + 8 * usable as u64))
                    .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
                if !list.is_multiple_of(8) {
                    return Err(Status::INVALID_FIELD);
                }
            }
        }
        Ok(out)
    }

    /// Fills `len` bytes with `fill` and copies them to the command's data pages.
    fn transfer<M: GuestMemory>(
        &mut self,
        mem: &M,
        cmd: &Command,
        len: usize,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), Status> {
        let pages = self.prps(mem, cmd, len)?;
        let mut buf = vec![0u8; len];
        fill(&mut buf);
        let mut at = 0;
        for (addr, n) in pages {
            mem.write_slice(&buf[at..at + n], GuestAddress(addr))
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            at += n;
        }
        Ok(())
    }

    fn io<M: GuestMemory>(&mut self, mem: &M, cmd: &Command) -> Option<(Status, u32)> {
        if cmd.nsid != 1 {
            return Some((Status::INVALID_NAMESPACE, 0));
        }
        let status = match cmd.opcode {
            0x00 => match self.disk.flush() {
                Ok(()) => Status::SUCCESS,
                Err(e) => self.block_status(e),
            },
            0x01 | 0x02 => self.read_write(mem, cmd),
            0x09 => self.deallocate(mem, cmd),
            _ => Status::INVALID_OPCODE,
        };
        Some((status, 0))
    }

    fn read_write<M: GuestMemory>(&mut self, mem: &M, cmd: &Command) -> Status {
        let lba = u64::from(cmd.cdw10) | u64::from(cmd.cdw11) << 32;
        let blocks = (cmd.cdw12 & 0xffff) + 1;
        if blocks > 1 << MDTS {
            return Status::INVALID_FIELD;
        }
        match lba.checked_add(u64::from(blocks)) {
            Some(end) if end <= self.disk.blocks() => {}
            _ => return Status::LBA_OUT_OF_RANGE,
        }
        let len = blocks as usize * BLOCK;
        let pages = match self.prps(mem, cmd, len) {
            Ok(p) => p,
            Err(s) => return s,
        };
        let mut buf = vec![0u8; len];
        if cmd.opcode == 0x01 {
            let mut at = 0;
            for (addr, n) in pages {
                if mem
                    .read_slice(&mut buf[at..at + n], GuestAddress(addr))
                    .is_err()
                {
                    return Status::DATA_TRANSFER_ERROR;
                }
                at += n;
            }
            match self.disk.write(lba, &buf) {
                Ok(()) => Status::SUCCESS,
                Err(e) => self.block_status(e),
            }
        } else {
            if let Err(e) = self.disk.read(lba, &mut buf) {
                return self.block_status(e);
            }
            let mut at = 0;
            for (addr, n) in pages {
                if mem
                    .write_slice(&buf[at..at + n], GuestAddress(addr))
                    .is_err()
                {
                    return Status::DATA_TRANSFER_ERROR;
                }
                at += n;
            }
            Status::SUCCESS
        }
    }

    /// Dataset management with the deallocate attribute: the ranges read as zeros after.
    fn deallocate<M: GuestMemory>(&mut self, mem: &M, cmd: &Command) -> Status {
        let ranges = (cmd.cdw10 & 0xff) as usize + 1;
        if cmd.cdw11 & 1 << 2 == 0 {
            return Status::SUCCESS; // only hints: nothing to do
        }
        let mut list = vec![0u8; ranges * 16];
        let cmd_list = Command {
            prp2: cmd.prp2,
            ..*cmd
        };
        let pages = match self.prps(mem, &cmd_list, list.len()) {
            Ok(p) => p,
            Err(s) => return s,
        };
        let mut at = 0;
        for (addr, n) in pages {
            if mem
                .read_slice(&mut list[at..at + n], GuestAddress(addr))
                .is_err()
            {
                return Status::DATA_TRANSFER_ERROR;
            }
            at += n;
        }
        let mut todo = Vec::new();
        for r in list.chunks_exact(16) {
            let count = u32::from_le_bytes(r[4..8].try_into().expect("4"));
            let lba = u64::from_le_bytes(r[8..16].try_into().expect("8"));
            match lba.checked_add(u64::from(count)) {
                Some(end) if end <= self.disk.blocks() && count <= 1 << 16 => {
                    todo.push((lba, count))
                }
                _ => return Status::LBA_OUT_OF_RANGE,
            }
        }
        let zeros = vec![0u8; BLOCK];
        for (lba, count) in todo {
            for k in 0..u64::from(count) {
                if let Err(e) = self.disk.write(lba + k, &zeros) {
                    return self.block_status(e);
                }
            }
        }
        Status::SUCCESS
    }

    fn block_status(&mut self, e: BlockError) -> Status {
        self.errors.push(e.to_string());
        match e {
            BlockError::Medium { .. } => Status::UNRECOVERED_READ_ERROR,
            BlockError::OutOfRange { .. } => Status::LBA_OUT_OF_RANGE,
            BlockError::Unaligned(_) => Status::INVALID_FIELD,
            BlockError::Io(_) => Status::INTERNAL_ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::block::encrypted::EncryptedDisk;
    use crate::block::raw::RawDisk;
    use crate::block::MemStore;

    const ASQ_AT: u64 = 0x1000;
    const ACQ_AT: u64 = 0x2000;
    const IOCQ_AT: u64 = 0x3000;
    const IOSQ_AT: u64 = 0x4000;
    const LIST_AT: u64 = 0x5000;
    const DATA_AT: u64 = 0x10_0000;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    struct Host<D: Disk> {
        nvme: NvmeController<D>,
        mem: GuestMemoryMmap,
        /// Next slot of the admin and I/O submission queues, and the completions read.
        tails: [u16; 2],
        heads: [u16; 2],
    }

    impl<D: Disk> Host<D> {
        /// A controller enabled with 8-entry admin queues, and I/O queue pair 1.
        fn new(disk: D) -> Host<D> {
            let mut h = Host {
                nvme: NvmeController::new(disk, "PV0001"),
                mem: memory(),
                tails: [0; 2],
                heads: [0; 2],
            };
            h.nvme.mmio_write(&h.mem, AQA, 4, 7 << 16 | 7);
            h.nvme.mmio_write(&h.mem, ASQ, 8, ASQ_AT);
            h.nvme.mmio_write(&h.mem, ACQ, 8, ACQ_AT);
            h.nvme.mmio_write(&h.mem, CC, 4, 1 | 6 << 16 | 4 << 20);
            assert_eq!(h.nvme.mmio_read(CSTS, 4) & 1, 1, "ready");
            let (s, _) = h.admin(0x05, 1 | 7 << 16, 1, IOCQ_AT, 0);
            assert_eq!(s, Status::SUCCESS, "create I/O CQ");
            let (s, _) = h.admin(0x01, 1 | 7 << 16, 1 | 1 << 16, IOSQ_AT, 0);
            assert_eq!(s, Status::SUCCESS, "create I/O SQ");
            h
        }

        /// Submits on queue `q` (0 admin, 1 I/O) and returns the completion's status and
        /// result.
        fn submit(&mut self, q: usize, sqe: [u8; 64]) -> (Status, u32) {
            let (sq, cq, size) = if q == 0 {
                (ASQ_AT, ACQ_AT, 8)
            } else {
                (IOSQ_AT, IOCQ_AT, 8)
            };
            let slot = self.tails[q];
            self.mem
                .write_slice(&sqe, GuestAddress(sq + u64::from(slot) * 64))
                .unwrap();
            self.tails[q] = (slot + 1) % size;
            let posted = self.nvme.mmio_write(
                &self.mem,
                DOORBELLS + 8 * q as u64,
                4,
                u64::from(self.tails[q]),
            );
            assert!(posted, "no completion: {:?}", self.nvme.errors);
            let mut cqe = [0u8; 16];
            let at = cq + u64::from(self.heads[q]) * 16;
            self.mem.read_slice(&mut cqe, GuestAddress(at)).unwrap();
            self.heads[q] = (self.heads[q] + 1) % size;
            self.nvme.mmio_write(
                &self.mem,
                DOORBELLS + 8 * q as u64 + 4,
                4,
                u64::from(self.heads[q]),
            );
            let dw3 = u32::from_le_bytes(cqe[12..].try_into().unwrap());
            assert_eq!(
                dw3 & 0xffff,
                u32::from(u16::from_le_bytes([sqe[2], sqe[3]])),
                "cid"
            );
            let status = Status {
                sc: (dw3 >> 17) as u8,
                sct: ((dw3 >> 25) & 7) as u8,
            };
            (status, u32::from_le_bytes(cqe[..4].try_into().unwrap()))
        }

        fn admin(
            &mut self,
            opcode: u8,
            cdw10: u32,
            cdw11: u32,
            prp1: u64,
            nsid: u32,
        ) -> (Status, u32) {
            self.submit(0, sqe(opcode, nsid, prp1, 0, [cdw10, cdw11, 0]))
        }
    }

    fn sqe(opcode: u8, nsid: u32, prp1: u64, prp2: u64, cdw: [u32; 3]) -> [u8; 64] {
        static CID: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
        let mut e = [0u8; 64];
        e[0] = opcode;
        e[2..4].copy_from_slice(
            &CID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                .to_le_bytes(),
        );
        e[4..8].copy_from_slice(&nsid.to_le_bytes());
        e[24..32].copy_from_slice(&prp1.to_le_bytes());
        e[32..40].copy_from_slice(&prp2.to_le_bytes());
        for (i, d) in cdw.iter().enumerate() {
            e[40 + 4 * i..44 + 4 * i].copy_from_slice(&d.to_le_bytes());
        }
        e
    }

    fn raw(blocks: usize) -> RawDisk<MemStore> {
        RawDisk::new(MemStore {
            bytes: vec![0; blocks * BLOCK],
        })
        .unwrap()
    }

    /// A read or write of `n` blocks at `lba`.
    fn rw(opcode: u8, lba: u64, n: u32, prp1: u64, prp2: u64) -> [u8; 64] {
        sqe(
            opcode,
            1,
            prp1,
            prp2,
            [lba as u32, (lba >> 32) as u32, n - 1],
        )
    }

    #[test]
    fn identify_answers_what_the_linux_driver_probes() {
        let mut h = Host::new(raw(32));
        let (s, _) = h.admin(0x06, 1, 0, DATA_AT, 0);
        assert_eq!(s, Status::SUCCESS);
        let mut page = [0u8; BLOCK];
        h.mem.read_slice(&mut page, GuestAddress(DATA_AT)).unwrap();
        assert_eq!(&page[4..10], b"PV0001");
        assert_eq!((page[512], page[513], page[516]), (0x66, 0x44, 1));
        let (s, _) = h.admin(0x06, 0, 0, DATA_AT, 1);
        assert_eq!(s, Status::SUCCESS);
        h.mem.read_slice(&mut page, GuestAddress(DATA_AT)).unwrap();
        assert_eq!(
            (u64::from_le_bytes(page[..8].try_into().unwrap()), page[130]),
            (32, 12)
        );
        assert_eq!(h.admin(0x06, 0, 0, DATA_AT, 2).0, Status::INVALID_NAMESPACE);
        assert_eq!(h.admin(0x06, 2, 0, DATA_AT, 0).0, Status::SUCCESS);
        let (s, queues) = h.admin(0x09, 0x07, 0xffff_ffff, 0, 0);
        assert_eq!((s, queues), (Status::SUCCESS, 3 | 3 << 16));
        assert_eq!(h.admin(0x7f, 0, 0, 0, 0).0, Status::INVALID_OPCODE);
    }

    #[test]
    fn blocks_written_through_a_prp_list_read_back_through_two_prps() {
        let mut h = Host::new(raw(32));
        let data: Vec<u8> = (0..3 * BLOCK).map(|i| (i % 239) as u8).collect();
        // Pages at DATA_AT, +0x3000, +0x1000: listed out of order on purpose.
        for (k, page) in [0u64, 0x3000, 0x1000].iter().enumerate() {
            h.mem
                .write_slice(
                    &data[k * BLOCK..(k + 1) * BLOCK],
                    GuestAddress(DATA_AT + page),
                )
                .unwrap();
        }
        h.mem
            .write_obj(DATA_AT + 0x3000, GuestAddress(LIST_AT))
            .unwrap();
        h.mem
            .write_obj(DATA_AT + 0x1000, GuestAddress(LIST_AT + 8))
            .unwrap();
        assert_eq!(
            h.submit(1, rw(0x01, 5, 3, DATA_AT, LIST_AT)).0,
            Status::SUCCESS
        );
        assert_eq!(
            h.submit(1, sqe(0x00, 1, 0, 0, [0; 3])).0,
            Status::SUCCESS,
            "flush"
        );
        // Read blocks 5..7 into a buffer that starts mid-page: PRP1 covers 2 KiB, PRP2 the rest
        // of a 4 KiB read.
        let mid = 0x20_0800;
        assert_eq!(
            h.submit(1, rw(0x02, 6, 1, mid, 0x20_1000)).0,
            Status::SUCCESS
        );
        let mut back = vec![0u8; BLOCK];
        h.mem.read_slice(&mut back, GuestAddress(mid)).unwrap();
        assert_eq!(back, data[BLOCK..2 * BLOCK]);
    }

    #[test]
    fn bad_ranges_prps_and_queues_are_completion_errors() {
        let mut h = Host::new(raw(8));
        assert_eq!(
            h.submit(1, rw(0x02, 7, 2, DATA_AT, DATA_AT + 0x1000)).0,
            Status::LBA_OUT_OF_RANGE
        );
        assert_eq!(
            h.submit(1, rw(0x02, u64::MAX, 1, DATA_AT, 0)).0,
            Status::LBA_OUT_OF_RANGE
        );
        assert_eq!(
            h.submit(1, rw(0x02, 0, 1, 0x40_0000, 0)).0,
            Status::DATA_TRANSFER_ERROR
        );
        assert_eq!(
            h.submit(1, rw(0x02, 0, 2, DATA_AT, DATA_AT + 0x10)).0,
            Status::INVALID_FIELD
        );
        assert_eq!(
            h.submit(1, rw(0x02, 0, 1 << 9, DATA_AT, LIST_AT)).0,
            Status::INVALID_FIELD
        );
        assert_eq!(
            h.submit(1, sqe(0x02, 2, DATA_AT, 0, [0; 3])).0,
            Status::INVALID_NAMESPACE
        );
        assert_eq!(
            h.admin(0x05, 9 | 7 << 16, 1, IOCQ_AT, 0).0,
            Status::INVALID_QUEUE_ID
        );
        assert_eq!(
            h.admin(0x05, 2 | 0xffff << 16, 1, IOCQ_AT, 0).0,
            Status::INVALID_QUEUE_SIZE
        );
        assert_eq!(
            h.admin(0x01, 2 | 7 << 16, 1 | 3 << 16, IOSQ_AT, 0).0,
            Status::INVALID_CQ
        );
        assert_eq!(
            h.admin(0x04, 1, 0, 0, 0).0,
            Status::INVALID_QUEUE_ID,
            "SQ 1 still posts to it"
        );
        // A doorbell of a queue that does not exist, or a tail past the queue: noted, nothing run.
        assert!(!h.nvme.mmio_write(&h.mem, DOORBELLS + 8 * 3, 4, 1));
        assert!(!h.nvme.mmio_write(&h.mem, DOORBELLS + 8, 4, 100));
        assert_eq!(h.nvme.errors.len(), 2, "{:?}", h.nvme.errors);
    }

    #[test]
    fn a_changed_encrypted_block_is_an_unrecovered_read_error() {
        let disk = EncryptedDisk::create(MemStore::default(), &[3; 32], 4).unwrap();
        let mut h = Host::new(disk);
        h.mem
            .write_slice(&[0x5a; BLOCK], GuestAddress(DATA_AT))
            .unwrap();
        assert_eq!(h.submit(1, rw(0x01, 3, 1, DATA_AT, 0)).0, Status::SUCCESS);
        let store = h.nvme.disk().store_mut();
        let end = store.bytes.len();
        store.bytes[end - 7] ^= 4;
        assert_eq!(
            h.submit(1, rw(0x02, 3, 1, 0x20_0000, 0)).0,
            Status::UNRECOVERED_READ_ERROR
        );
        assert!(
            h.nvme.errors.iter().any(|e| e.contains("block 3")),
            "{:?}",
            h.nvme.errors
        );
    }

    #[test]
    fn an_admin_queue_that_is_not_page_aligned_fails_the_controller() {
        let mut n = NvmeController::new(raw(1), "x");
        let mem = memory();
        n.mmio_write(&mem, AQA, 4, 7 << 16 | 7);
        n.mmio_write(&mem, ASQ, 8, 0x1010);
        n.mmio_write(&mem, ACQ, 8, ACQ_AT);
        n.mmio_write(&mem, CC, 4, 1);
        assert_eq!(n.mmio_read(CSTS, 4), 2, "CFS, not ready");
        // Doorbells of a controller that is not ready do nothing.
        assert!(!n.mmio_write(&mem, DOORBELLS, 4, 1));
    }

    const SHADOW_AT: u64 = 0x6000;
    const EVENT_AT: u64 = 0x7000;

    impl<D: Disk> Host<D> {
        /// Turns shadow doorbells on (Doorbell Buffer Config).
        fn shadow_on(&mut self) {
            let cmd = sqe(0x7c, 0, SHADOW_AT, EVENT_AT, [0; 3]);
            assert_eq!(self.submit(0, cmd).0, Status::SUCCESS);
            assert!(self.nvme.shadow_doorbells());
        }

        /// Puts `sqe` in the I/O queue's next slot and its new tail in the shadow page only.
        fn queue_shadowed(&mut self, sqe: [u8; 64]) {
            let slot = self.tails[1];
            self.mem
                .write_slice(&sqe, GuestAddress(IOSQ_AT + u64::from(slot) * 64))
                .unwrap();
            self.tails[1] = (slot + 1) % 8;
            self.mem
                .write_obj(u32::from(self.tails[1]), GuestAddress(SHADOW_AT + 8))
                .unwrap();
        }

        fn event_index(&self, index: u64) -> u32 {
            self.mem
                .read_obj(GuestAddress(EVENT_AT + 4 * index))
                .unwrap()
        }

        /// The I/O completion in slot `n`: its command id.
        fn io_completion(&self, n: u64) -> u16 {
            let cqe: [u8; 16] = self.mem.read_obj(GuestAddress(IOCQ_AT + 16 * n)).unwrap();
            u16::from_le_bytes([cqe[12], cqe[13]])
        }
    }

    fn cid(sqe: &[u8; 64]) -> u16 {
        u16::from_le_bytes([sqe[2], sqe[3]])
    }

    #[test]
    fn shadow_doorbells_run_what_the_shadow_page_holds_and_ask_for_the_next_ring() {
        let mut h = Host::new(raw(32));
        let (s, _) = h.admin(0x06, 1, 0, DATA_AT, 0);
        assert_eq!(s, Status::SUCCESS);
        let oacs: u16 = h.mem.read_obj(GuestAddress(DATA_AT + 256)).unwrap();
        assert_ne!(
            oacs & OACS_DOORBELL_BUFFER,
            0,
            "OACS: Doorbell Buffer Config"
        );
        h.shadow_on();
        let read = rw(0x02, 0, 1, DATA_AT, 0);
        h.queue_shadowed(read);
        // The doorbell came without a value (an ioeventfd): the shadow page has it.
        assert!(h.nvme.stage_kick(&h.mem));
        assert!(h.nvme.has_staged());
        assert_eq!(h.io_completion(0), 0, "staged, not yet posted");
        assert!(h.nvme.post(&h.mem));
        assert_eq!(h.io_completion(0), cid(&read));
        // The SQ's event index is the tail taken (the next submission rings); the CQ's is one
        // behind its head (freeing entries does not ring while nothing waits for room).
        assert_eq!(h.event_index(2), 1);
        assert_eq!(h.event_index(3), 7);
        // Nothing new: a second kick changes nothing.
        assert!(!h.nvme.stage_kick(&h.mem));
        // A value written to the register itself is ignored for the shadow's.
        let write = rw(0x01, 1, 1, DATA_AT, 0);
        h.queue_shadowed(write);
        h.nvme.stage_mmio_write(&h.mem, DOORBELLS + 8, 4, 5);
        assert!(h.nvme.post(&h.mem));
        assert_eq!(h.io_completion(1), cid(&write));
    }

    #[test]
    fn a_full_completion_queue_holds_submissions_until_the_driver_frees_an_entry() {
        let mut h = Host::new(raw(32));
        h.shadow_on();
        // 8-entry queues: the completion queue holds 7 unread entries.
        let mut cids = Vec::new();
        for k in 0..7 {
            let c = rw(0x02, k, 1, DATA_AT, 0);
            cids.push(cid(&c));
            h.queue_shadowed(c);
        }
        h.nvme.stage_kick(&h.mem);
        assert!(h.nvme.post(&h.mem));
        let last = rw(0x02, 7, 1, DATA_AT, 0);
        h.queue_shadowed(last);
        h.nvme.stage_kick(&h.mem);
        assert!(!h.nvme.post(&h.mem), "no room: nothing completes");
        assert_eq!(
            h.event_index(3),
            0,
            "the CQ's event index asks for its next head"
        );
        // The driver reads one entry and says so in the shadow page only.
        h.mem.write_obj(1u32, GuestAddress(SHADOW_AT + 12)).unwrap();
        h.nvme.stage_kick(&h.mem);
        assert!(h.nvme.post(&h.mem));
        assert_eq!(h.io_completion(7), cid(&last));
        for (n, c) in cids.iter().enumerate() {
            assert_eq!(h.io_completion(n as u64), *c);
        }
        assert!(h.nvme.errors.is_empty(), "{:?}", h.nvme.errors);
    }

    #[test]
    fn staged_completions_are_posted_by_the_controller_that_restores_them() {
        let mut h = Host::new(raw(32));
        h.shadow_on();
        let read = rw(0x02, 0, 1, DATA_AT, 0);
        h.queue_shadowed(read);
        assert!(h.nvme.stage_kick(&h.mem));
        let state = h.nvme.state();
        // The process dies before posting; the next one takes the state up.
        let mut next = NvmeController::new(raw(32), "PV0001");
        next.restore(state).unwrap();
        assert!(next.shadow_doorbells());
        assert!(next.post(&h.mem));
        assert_eq!(h.io_completion(0), cid(&read));
        // It does not run the command again.
        assert!(!next.stage_kick(&h.mem));
        assert!(!next.post(&h.mem));
    }

    #[test]
    fn doorbell_buffer_config_takes_only_two_pages_the_device_reaches_and_a_reset_drops_them() {
        let mut h = Host::new(raw(32));
        for (shadow, events) in [
            (SHADOW_AT + 8, EVENT_AT),
            (SHADOW_AT, 0),
            (SHADOW_AT, SHADOW_AT),
            (SHADOW_AT, 0x40_0000),
        ] {
            let cmd = sqe(0x7c, 0, shadow, events, [0; 3]);
            assert_eq!(h.submit(0, cmd).0, Status::INVALID_FIELD);
            assert!(!h.nvme.shadow_doorbells());
        }
        h.shadow_on();
        h.nvme.mmio_write(&h.mem, CC, 4, 0);
        assert!(!h.nvme.shadow_doorbells(), "a reset forgets them");
        let mut state = h.nvme.state();
        state.shadow = Some(Shadow {
            doorbells: SHADOW_AT + 1,
            event_index: EVENT_AT,
        });
        assert!(NvmeController::new(raw(1), "x").restore(state).is_err());
    }

    #[test]
    fn a_hostile_shadow_value_is_refused_and_logged() {
        let mut h = Host::new(raw(32));
        h.shadow_on();
        h.mem
            .write_obj(4000u32, GuestAddress(SHADOW_AT + 8))
            .unwrap();
        assert!(!h.nvme.stage_kick(&h.mem));
        assert!(!h.nvme.post(&h.mem));
        assert!(
            h.nvme
                .errors
                .iter()
                .any(|e| e.contains("shadow SQ tail 4000")),
            "{:?}",
            h.nvme.errors
        );
    }

    #[test]
    fn a_controller_with_the_largest_admin_queues_is_taken_up_by_its_successor() {
        // Found by the fuzz target: AQA allows 4096 entries; a successor refused that state.
        let mut n = NvmeController::new(raw(1), "x");
        let mem = memory();
        n.mmio_write(&mem, AQA, 4, 0x0fff_0fff);
        n.mmio_write(&mem, ASQ, 8, 0x10_0000);
        n.mmio_write(&mem, ACQ, 8, 0x20_0000);
        n.mmio_write(&mem, CC, 4, 1);
        assert_eq!(n.mmio_read(CSTS, 4), 1, "ready");
        NvmeController::new(raw(1), "x")
            .restore(n.state())
            .expect("its own state");
    }
}
