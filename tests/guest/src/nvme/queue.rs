//! The NVMe driver's queues: submission entries written into the shared window, completions
//! found by their phase tag, doorbells, and the waits (bounded by TSC time, with a CSTS read
//! now and then) in which the driver spends its time.
//!
//! Doorbells: the admin queue's are always MMIO writes. An I/O queue's are too, until
//! Doorbell Buffer Config gives the controller shadow doorbells
//! ([`Controller::use_shadow_doorbells`]); then every new value goes to the shadow page
//! first, and the MMIO write follows only when the device's event index asks for it
//! ([`needs_event`]). The device may take such a write through an ioeventfd, which loses the
//! value: it reads the shadow page instead, so the shadow is always current before any
//! MMIO write. Either way a doorbell write starts work the device finishes when it will; the
//! driver learns of the end only from a completion's phase tag.

use core::sync::atomic::fence;
use core::sync::atomic::Ordering;

use super::shared_read32;
use super::shared_write32;
use super::Failure;
use super::Layout;
use super::ADMIN_CQ;
use super::ADMIN_SQ;
use super::CSTS_CFS;
use super::CSTS_RDY;
use super::DOORBELLS;
use super::IO_CQ;
use super::IO_QID;
use super::IO_SQ;
use super::REG_CSTS;
use super::STATUS_CHECK_CYCLES;
use super::TIMEOUT_CYCLES;
use super::WAIT_REPORT_CYCLES;
use crate::mmio_read32;
use crate::mmio_write32;
use crate::putc;
use crate::puts;
use crate::rdtsc;

/// A 64-byte submission queue entry.
#[derive(Clone, Copy)]
pub(super) struct Command {
    dw: [u32; 16],
}

impl Command {
    pub(super) fn new(opcode: u8, nsid: u32) -> Command {
        let mut dw = [0; 16];
        dw[0] = u32::from(opcode);
        dw[1] = nsid;
        Command { dw }
    }

    pub(super) fn prp(mut self, prp1: u64, prp2: u64) -> Command {
        self.dw[6] = prp1 as u32;
        self.dw[7] = (prp1 >> 32) as u32;
        self.dw[8] = prp2 as u32;
        self.dw[9] = (prp2 >> 32) as u32;
        self
    }

    /// Command dword `n` (10..=15).
    pub(super) fn cdw(mut self, n: usize, value: u32) -> Command {
        self.dw[n] = value;
        self
    }

    pub(super) fn with_cid(mut self, cid: u16) -> Command {
        self.dw[0] = (self.dw[0] & 0xffff) | u32::from(cid) << 16;
        self
    }
}

/// A 16-byte completion queue entry's fields.
pub(super) struct Completion {
    pub(super) result: u32,
    pub(super) sqid: u16,
    pub(super) cid: u16,
    /// Status field (DW3 bits 31:17): 0 is success.
    pub(super) status: u16,
}

/// One submission queue and the completion queue it posts to (`qid` both).
pub(super) struct Queue {
    qid: u16,
    pub(super) sq: u64,
    pub(super) cq: u64,
    pub(super) entries: u16,
    sq_tail: u16,
    cq_head: u16,
    /// The phase tag of a new entry at `cq_head`.
    phase: bool,
}

impl Queue {
    fn new(qid: u16, sq: u64, cq: u64, entries: u16) -> Queue {
        Queue {
            qid,
            sq,
            cq,
            entries,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        }
    }

    /// Writes `command` at the tail (the doorbell is rung separately).
    pub(super) fn push(&mut self, command: &Command) {
        let at = self.sq + u64::from(self.sq_tail) * 64;
        for (i, dw) in command.dw.iter().enumerate() {
            shared_write32(at + 4 * i as u64, *dw);
        }
        self.sq_tail = (self.sq_tail + 1) % self.entries;
    }

    /// The entry at the head if the device has posted it (its phase tag is the current one).
    fn peek(&self) -> Option<Completion> {
        let at = self.cq + u64::from(self.cq_head) * 16;
        let dw3 = shared_read32(at + 12);
        if (dw3 >> 16) & 1 != u32::from(self.phase) {
            return None;
        }
        // The rest of the entry after its phase tag.
        fence(Ordering::Acquire);
        Some(Completion {
            result: shared_read32(at),
            sqid: (shared_read32(at + 8) >> 16) as u16,
            cid: dw3 as u16,
            status: (dw3 >> 17) as u16,
        })
    }

    fn pop(&mut self) {
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
    }
}

#[derive(Clone, Copy)]
pub(super) enum Which {
    Admin,
    Io,
}

/// The two doorbells of a queue pair.
#[derive(Clone, Copy)]
enum Doorbell {
    SubmissionTail,
    CompletionHead,
}

/// Where Doorbell Buffer Config put the shadow doorbells and the event indexes (guest-physical
/// pages in the window; a doorbell's entry is at its offset from the first MMIO doorbell).
#[derive(Clone, Copy)]
struct ShadowDoorbells {
    shadow: u64,
    event_indexes: u64,
}

/// MMIO writes of I/O queue doorbells: made, and left out because the event index did not
/// ask for them (always 0 with MMIO doorbells).
#[derive(Clone, Copy, Default)]
pub(super) struct DoorbellCounts {
    pub(super) written: u64,
    pub(super) skipped: u64,
}

/// Whether a doorbell that moved from `old` to `new` passed the device's event index
/// `event`, i.e. `event` is in `old..new` (modulo 2^16): then the device asked for an MMIO
/// write (Linux's `nvme_dbbuf_need_event`, the virtio event index rule). A queue index that
/// wraps past its last entry reads as a move of nearly 2^16 and always rings: more writes
/// than needed, never fewer.
fn needs_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// An enabled controller and its queues.
pub(super) struct Controller {
    bar: usize,
    /// Bytes between doorbells (4 << CAP.DSTRD).
    stride: usize,
    pub(super) layout: Layout,
    admin: Queue,
    pub(super) io: Queue,
    next_cid: u16,
    /// Set once Doorbell Buffer Config succeeded: I/O queue doorbells go through it.
    shadow: Option<ShadowDoorbells>,
    io_doorbells: DoorbellCounts,
}

pub(super) fn reg_read32(bar: usize, offset: usize) -> u32 {
    mmio_read32(bar + offset)
}

pub(super) fn reg_write32(bar: usize, offset: usize, value: u32) {
    mmio_write32(bar + offset, value);
}

/// A 64-bit register as two 32-bit writes, low half first.
pub(super) fn reg_write64(bar: usize, offset: usize, value: u64) {
    reg_write32(bar, offset, value as u32);
    reg_write32(bar, offset + 4, (value >> 32) as u32);
}

/// CSTS, or the failure it shows: fatal status, or all ones (nothing answers the BAR).
pub(super) fn csts(bar: usize, what: &'static str) -> Result<u32, Failure> {
    let csts = reg_read32(bar, REG_CSTS);
    if csts == u32::MAX || csts & CSTS_CFS != 0 {
        return Err(Failure::Controller(what, csts));
    }
    Ok(csts)
}

/// Waits until CSTS.RDY is `ready`, for at most `cycles`.
pub(super) fn wait_ready(
    bar: usize,
    ready: bool,
    cycles: u64,
    what: &'static str,
) -> Result<(), Failure> {
    let start = rdtsc();
    loop {
        if (csts(bar, what)? & CSTS_RDY != 0) == ready {
            return Ok(());
        }
        if rdtsc().wrapping_sub(start) > cycles {
            return Err(Failure::Timeout(what));
        }
    }
}

impl Controller {
    /// The controller at `bar` just enabled with its admin queues at `layout`'s; the I/O
    /// queue pair (not created yet) at its place in `layout`.
    pub(super) fn new(
        bar: usize,
        stride: usize,
        layout: Layout,
        (admin_entries, io_entries): (u16, u16),
    ) -> Controller {
        Controller {
            bar,
            stride,
            layout,
            admin: Queue::new(0, layout.at(ADMIN_SQ), layout.at(ADMIN_CQ), admin_entries),
            io: Queue::new(IO_QID, layout.at(IO_SQ), layout.at(IO_CQ), io_entries),
            next_cid: 0,
            shadow: None,
            io_doorbells: DoorbellCounts::default(),
        }
    }

    /// Bytes from the first doorbell to past the last of queue pair `qid`: what a shadow
    /// doorbell page must hold.
    pub(super) fn doorbell_bytes(&self, qid: u16) -> u64 {
        ((2 * usize::from(qid) + 2) * self.stride) as u64
    }

    /// From now on, the I/O queue's doorbells go through the shadow page at `shadow` and the
    /// event indexes at `event_indexes`, which Doorbell Buffer Config gave the controller.
    /// Both pages were zeroed before that command and the I/O queue does not exist yet, so
    /// its shadow doorbells start at 0 as its doorbells do (the event index page is the
    /// device's to write from then on).
    pub(super) fn use_shadow_doorbells(&mut self, shadow: u64, event_indexes: u64) {
        self.shadow = Some(ShadowDoorbells {
            shadow,
            event_indexes,
        });
    }

    pub(super) fn doorbell_counts(&self) -> DoorbellCounts {
        self.io_doorbells
    }

    /// Offset of a doorbell from the first (0x1000 in the BAR, 0 in the shadow page).
    fn doorbell_offset(&self, qid: u16, doorbell: Doorbell) -> usize {
        let index = 2 * usize::from(qid)
            + match doorbell {
                Doorbell::SubmissionTail => 0,
                Doorbell::CompletionHead => 1,
            };
        index * self.stride
    }

    /// Tells the controller `value`, the new value of `doorbell` of queue pair `qid`: an MMIO
    /// write, or with shadow doorbells (I/O queues only) a write of the shadow page and an
    /// MMIO write only if the event index asks for one.
    fn ring(&mut self, qid: u16, doorbell: Doorbell, value: u16) {
        let offset = self.doorbell_offset(qid, doorbell);
        if qid == 0 {
            reg_write32(self.bar, DOORBELLS + offset, u32::from(value));
            return;
        }
        if let Some(s) = self.shadow {
            let at = s.shadow + offset as u64;
            let old = shared_read32(at) as u16;
            shared_write32(at, u32::from(value));
            // A full barrier: the shadow value is visible before the event index is read.
            // Without it the read may pass the write, and a device that moved its event index
            // and then read the old shadow value would wait for a write that never comes.
            // (Built without SSE2, this is `lock or [rsp], 0` rather than `mfence`: the same
            // store-load ordering for the window's write-back memory.)
            fence(Ordering::SeqCst);
            let event = shared_read32(s.event_indexes + offset as u64) as u16;
            if !needs_event(event, value, old) {
                self.io_doorbells.skipped += 1;
                return;
            }
        }
        reg_write32(self.bar, DOORBELLS + offset, u32::from(value));
        self.io_doorbells.written += 1;
    }

    fn queue(&mut self, which: Which) -> &mut Queue {
        match which {
            Which::Admin => &mut self.admin,
            Which::Io => &mut self.io,
        }
    }

    pub(super) fn cid(&mut self) -> u16 {
        let cid = self.next_cid;
        // 0xFFFF is not a valid command id.
        self.next_cid = if cid >= 0xfffe { 0 } else { cid + 1 };
        cid
    }

    /// Submits what was pushed: the new tail. The commands run when the device gets to
    /// them; only their completions say they are done.
    pub(super) fn ring_sq(&mut self, which: Which) {
        let q = self.queue(which);
        let (qid, tail) = (q.qid, q.sq_tail);
        // The entries (and the data they point to) are in memory before the device looks.
        fence(Ordering::SeqCst);
        self.ring(qid, Doorbell::SubmissionTail, tail);
    }

    /// Gives back the completion entries consumed: the new head.
    pub(super) fn ring_cq(&mut self, which: Which) {
        let q = self.queue(which);
        let (qid, head) = (q.qid, q.cq_head);
        self.ring(qid, Doorbell::CompletionHead, head);
    }

    /// The next completion of `which` (consumed; the head doorbell is rung separately), waited
    /// for by polling memory, bounded by [`TIMEOUT_CYCLES`].
    pub(super) fn completion(
        &mut self,
        which: Which,
        what: &'static str,
    ) -> Result<Completion, Failure> {
        let start = rdtsc();
        let (mut checked, mut reported) = (start, start);
        loop {
            if let Some(c) = self.queue(which).peek() {
                let q = self.queue(which);
                q.pop();
                if c.sqid != q.qid {
                    return Err(Failure::Queue(what, c.sqid));
                }
                return Ok(c);
            }
            let now = rdtsc();
            if now.wrapping_sub(start) > TIMEOUT_CYCLES {
                return Err(Failure::Timeout(what));
            }
            if now.wrapping_sub(checked) > STATUS_CHECK_CYCLES {
                checked = now;
                csts(self.bar, what)?;
            }
            if now.wrapping_sub(reported) > WAIT_REPORT_CYCLES {
                reported = now;
                puts("guest: nvme: still waiting: ");
                puts(what);
                putc(b'\n');
            }
            core::hint::spin_loop();
        }
    }

    /// Runs one admin command to its successful completion; its result (DW0).
    pub(super) fn admin(&mut self, command: Command, what: &'static str) -> Result<u32, Failure> {
        let cid = self.cid();
        self.admin.push(&command.with_cid(cid));
        self.ring_sq(Which::Admin);
        let c = self.completion(Which::Admin, what)?;
        self.ring_cq(Which::Admin);
        if c.cid != cid {
            return Err(Failure::Cid(what, c.cid));
        }
        if c.status != 0 {
            return Err(Failure::Status(what, c.status));
        }
        Ok(c.result)
    }

    /// Runs one I/O command without data to its successful completion.
    pub(super) fn io(&mut self, command: Command, what: &'static str) -> Result<(), Failure> {
        let cid = self.cid();
        self.io.push(&command.with_cid(cid));
        self.ring_sq(Which::Io);
        let c = self.completion(Which::Io, what)?;
        self.ring_cq(Which::Io);
        if c.cid != cid {
            return Err(Failure::Cid(what, c.cid));
        }
        if c.status != 0 {
            return Err(Failure::Status(what, c.status));
        }
        Ok(())
    }
}
