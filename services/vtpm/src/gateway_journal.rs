//! The gateway's journal: the one request it is answering, in a region the microkernel keeps
//! across the gateway's restarts (`tpm-gateway-journal`), so that a gateway killed at any
//! instruction leaves its successor enough to finish that request exactly once.
//!
//! The gateway answers one request at a time, whole, before it reads the next (from any
//! connection): so one in-flight record is enough. Its life:
//!
//! 1. `Received { owner, seq, request }`: written before the request's bytes are taken off
//!    the connection (the gateway reads with MSG_PEEK until then) and before a TPM command
//!    with number `seq` is sent. A successor finds the request either still queued (taken
//!    then: the client sends nothing more before its answer, so the queue's head is these
//!    very bytes) or taken, and runs it again: the TPM answers a command it ran from its
//!    record of that number (never twice), platform signals are idempotent, the rest is
//!    answered by the parser alone.
//! 2. `Answered { owner }`: the reply is whole in the outbox (a pipe the fd store keeps). Its
//!    length is recorded before it is written there: a successor that finds a `Received`
//!    request with that many bytes in the outbox knows its reply is there whole (anything
//!    else is thrown away and the request carried out again). From the outbox it moves to
//!    the connection with splice(2): what moved is gone from the pipe, what did not is still
//!    there, so a successor sends exactly the rest: never twice, never lost.
//! 3. `Idle` once the outbox is empty.
//!
//! Besides the record: the next command number (every number below it may have been sent:
//! a successor never reuses one, or the TPM would answer a new command with an old command's
//! response), and the swtpm locality the connections share.
//!
//! The journal is the gateway's own memory, but it is read back as input: a record that is
//! not one (bad magic, phase or length) is dropped, never trusted. Pure: no OS code; the
//! memory is behind [`JournalMemory`].

use crate::gateway::MAX_BUFFERED;

/// The region's name in the manifest.
pub const JOURNAL_REGION: &str = "tpm-gateway-journal";
/// Most request bytes a record holds: one whole request of any protocol.
pub const MAX_REQUEST: usize = MAX_BUFFERED;
/// The bytes the journal takes at the start of its region.
pub const JOURNAL_SIZE: usize = REQUEST + MAX_REQUEST;

/// "PVGJ".
const MAGIC: u32 = 0x4a47_5650;
const VERSION: u32 = 1;

// Layout (little-endian).
const OFF_MAGIC: usize = 0;
const OFF_VERSION: usize = 4;
const OFF_NEXT_SEQ: usize = 8;
const OFF_LOCALITY: usize = 16;
const OFF_PHASE: usize = 20;
const OFF_OWNER: usize = 24;
const OFF_SEQ: usize = 32;
const OFF_LEN: usize = 40;
const OFF_REPLY_LEN: usize = 44;
const REQUEST: usize = 48;

const IDLE: u32 = 0;
const RECEIVED: u32 = 1;
const ANSWERED: u32 = 2;

/// The memory a journal lives in (a shared region, or a vector in tests).
pub trait JournalMemory {
    fn size(&self) -> usize;
    fn read(&self, offset: usize, buf: &mut [u8]);
    fn write(&mut self, offset: usize, data: &[u8]);
    /// Writes the phase word after every write before it (a release store): a record is
    /// never seen with its phase before its contents.
    fn publish(&mut self, offset: usize, value: u32);
}

impl JournalMemory for Vec<u8> {
    fn size(&self) -> usize {
        self.len()
    }
    fn read(&self, offset: usize, buf: &mut [u8]) {
        buf.copy_from_slice(&self[offset..offset + buf.len()]);
    }
    fn write(&mut self, offset: usize, data: &[u8]) {
        self[offset..offset + data.len()].copy_from_slice(data);
    }
    fn publish(&mut self, offset: usize, value: u32) {
        self.write(offset, &value.to_le_bytes());
    }
}

/// The request in flight, as a successor finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InFlight {
    Idle,
    /// `request` of connection `owner` (its fd-store id), numbered `seq` if a TPM command
    /// (else 0): maybe still queued on the connection, maybe carried out; its reply not made,
    /// or being written to the outbox (`reply_len` bytes; 0: not yet).
    Received {
        owner: u32,
        seq: u64,
        request: Vec<u8>,
        reply_len: u32,
    },
    /// The reply to connection `owner`'s request is in the outbox (all of it, or what is left
    /// of it after part was sent).
    Answered {
        owner: u32,
    },
}

/// What a successor finds in the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// Every command number below this may have been sent (0: none known).
    pub next_seq: u64,
    pub locality: u8,
    pub in_flight: InFlight,
}

/// Why the region cannot hold a journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooSmall(pub usize);

impl std::fmt::Display for TooSmall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the journal region has {} bytes; it needs {JOURNAL_SIZE}",
            self.0
        )
    }
}

pub struct Journal<M: JournalMemory> {
    mem: M,
}

fn u32_at<M: JournalMemory>(mem: &M, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    mem.read(offset, &mut b);
    u32::from_le_bytes(b)
}

fn u64_at<M: JournalMemory>(mem: &M, offset: usize) -> u64 {
    let mut b = [0u8; 8];
    mem.read(offset, &mut b);
    u64::from_le_bytes(b)
}

impl<M: JournalMemory> Journal<M> {
    /// Opens the journal in `mem`: what a predecessor left (nothing in a new region, or in
    /// one that does not hold a journal: it is made one).
    pub fn open(mut mem: M) -> Result<(Journal<M>, Recovered), TooSmall> {
        if mem.size() < JOURNAL_SIZE {
            return Err(TooSmall(mem.size()));
        }
        let valid = u32_at(&mem, OFF_MAGIC) == MAGIC && u32_at(&mem, OFF_VERSION) == VERSION;
        let recovered = if valid {
            let mut locality = [0u8];
            mem.read(OFF_LOCALITY, &mut locality);
            Recovered {
                next_seq: u64_at(&mem, OFF_NEXT_SEQ),
                // A locality out of range is none the gateway ever set: 0.
                locality: if locality[0] <= 4 { locality[0] } else { 0 },
                in_flight: Self::in_flight(&mem),
            }
        } else {
            mem.write(OFF_MAGIC, &MAGIC.to_le_bytes());
            mem.write(OFF_VERSION, &VERSION.to_le_bytes());
            mem.write(OFF_NEXT_SEQ, &0u64.to_le_bytes());
            mem.write(OFF_LOCALITY, &[0]);
            mem.publish(OFF_PHASE, IDLE);
            Recovered {
                next_seq: 0,
                locality: 0,
                in_flight: InFlight::Idle,
            }
        };
        Ok((Journal { mem }, recovered))
    }

    fn in_flight(mem: &M) -> InFlight {
        let owner = u32_at(mem, OFF_OWNER);
        match u32_at(mem, OFF_PHASE) {
            RECEIVED => {
                let len = u32_at(mem, OFF_LEN) as usize;
                if len == 0 || len > MAX_REQUEST {
                    return InFlight::Idle;
                }
                let mut request = vec![0u8; len];
                mem.read(REQUEST, &mut request);
                InFlight::Received {
                    owner,
                    seq: u64_at(mem, OFF_SEQ),
                    request,
                    reply_len: u32_at(mem, OFF_REPLY_LEN),
                }
            }
            ANSWERED => InFlight::Answered { owner },
            _ => InFlight::Idle,
        }
    }

    /// Every command number below `next` may be sent from now on (written before any is).
    pub fn set_next_seq(&mut self, next: u64) {
        self.mem.write(OFF_NEXT_SEQ, &next.to_le_bytes());
    }

    pub fn set_locality(&mut self, locality: u8) {
        self.mem.write(OFF_LOCALITY, &[locality]);
    }

    /// Connection `owner`'s `request` (at most [`MAX_REQUEST`] bytes; longer is refused),
    /// numbered `seq`, is about to be taken and carried out.
    pub fn received(&mut self, owner: u32, seq: u64, request: &[u8]) -> bool {
        if request.is_empty() || request.len() > MAX_REQUEST {
            return false;
        }
        // Not a record while it changes: a successor that finds the old phase with new bytes
        // would compare the wrong request.
        self.mem.publish(OFF_PHASE, IDLE);
        self.mem.write(OFF_OWNER, &owner.to_le_bytes());
        self.mem.write(OFF_SEQ, &seq.to_le_bytes());
        self.mem
            .write(OFF_LEN, &(request.len() as u32).to_le_bytes());
        self.mem.write(OFF_REPLY_LEN, &0u32.to_le_bytes());
        self.mem.write(REQUEST, request);
        self.mem.publish(OFF_PHASE, RECEIVED);
        true
    }

    /// The request's number changed before it was sent (the TPM's record was ahead).
    pub fn renumbered(&mut self, seq: u64) {
        self.mem.write(OFF_SEQ, &seq.to_le_bytes());
    }

    /// The reply, `len` bytes, is about to be written to the outbox.
    pub fn replying(&mut self, len: usize) {
        self.mem.write(
            OFF_REPLY_LEN,
            &(len.min(u32::MAX as usize) as u32).to_le_bytes(),
        );
    }

    /// The reply to `owner`'s request is whole in the outbox.
    pub fn answered(&mut self, owner: u32) {
        self.mem.write(OFF_OWNER, &owner.to_le_bytes());
        self.mem.publish(OFF_PHASE, ANSWERED);
    }

    /// Nothing is in flight.
    pub fn idle(&mut self) {
        self.mem.publish(OFF_PHASE, IDLE);
    }

    /// What a successor would find now.
    pub fn peek(&self) -> InFlight {
        Self::in_flight(&self.mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_region_becomes_an_empty_journal_and_a_record_survives_reopening() {
        let mem = vec![0u8; JOURNAL_SIZE];
        let (mut j, r) = Journal::open(mem).unwrap();
        assert_eq!(
            r,
            Recovered {
                next_seq: 0,
                locality: 0,
                in_flight: InFlight::Idle
            }
        );
        j.set_next_seq(101);
        j.set_locality(3);
        assert!(j.received(7, 100, b"request"));
        let (mut j, r) = Journal::open(j.mem).unwrap();
        assert_eq!(r.next_seq, 101);
        assert_eq!(r.locality, 3);
        assert_eq!(
            r.in_flight,
            InFlight::Received {
                owner: 7,
                seq: 100,
                request: b"request".to_vec(),
                reply_len: 0,
            }
        );
        j.replying(19);
        assert!(matches!(j.peek(), InFlight::Received { reply_len: 19, .. }));
        j.renumbered(500);
        assert!(matches!(j.peek(), InFlight::Received { seq: 500, .. }));
        j.answered(7);
        let (mut j, r) = Journal::open(j.mem).unwrap();
        assert_eq!(r.in_flight, InFlight::Answered { owner: 7 });
        j.idle();
        let (_, r) = Journal::open(j.mem).unwrap();
        assert_eq!(r.in_flight, InFlight::Idle);
    }

    #[test]
    fn a_journal_that_is_not_one_is_dropped_not_trusted() {
        assert_eq!(Journal::open(vec![0u8; 16]).err(), Some(TooSmall(16)));
        // Garbage: not a journal, made one.
        let (j, r) = Journal::open(vec![0xa5u8; JOURNAL_SIZE]).unwrap();
        assert_eq!(r.in_flight, InFlight::Idle);
        assert_eq!(r.next_seq, 0);
        // A record whose length is out of range, or whose phase is unknown: idle.
        let mut mem = j.mem;
        mem.publish(OFF_PHASE, RECEIVED);
        mem.write(OFF_LEN, &((MAX_REQUEST + 1) as u32).to_le_bytes());
        mem.write(OFF_LOCALITY, &[9]);
        let (j, r) = Journal::open(mem).unwrap();
        assert_eq!((r.in_flight, r.locality), (InFlight::Idle, 0));
        let mut mem = j.mem;
        mem.publish(OFF_PHASE, 77);
        assert_eq!(Journal::open(mem).unwrap().1.in_flight, InFlight::Idle);
        // Requests are bounded.
        let (mut j, _) = Journal::open(vec![0u8; JOURNAL_SIZE]).unwrap();
        assert!(!j.received(1, 1, &[]));
        assert!(!j.received(1, 1, &vec![0; MAX_REQUEST + 1]));
        assert!(j.received(1, 1, &vec![0; MAX_REQUEST]));
    }
}
