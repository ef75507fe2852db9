//! The in-flight record of vhost-user's `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, for split
//! queues: shared memory the back end allocates and the front end (QEMU) keeps across the
//! back end's crashes, in which the back end marks each request it has taken off a ring until
//! the request is on the used ring. A restarted back end reads it to know exactly which
//! requests were in flight and submits those again.
//!
//! Layout, per queue, at `queue * queue_bytes(queue_size)` (the record is the back end's own:
//! the front end only keeps the descriptor): a 16-byte header (features u64, version u16,
//! desc_num u16, last_batch_head u16, used_idx u16), then one 16-byte entry per descriptor
//! (inflight u8, 5 bytes padding, next u16, counter u64), little-endian.
//!
//! A request is marked (counter, then `inflight = 1`) when it is taken off the ring. Before its
//! used-ring entry is published `last_batch_head` names it; after, its mark is cleared and
//! `used_idx` copies the ring's used index. A back end that died between publishing and
//! clearing is recognised by `used_idx` differing from the ring's: that request is done.

use std::sync::atomic::fence;
use std::sync::atomic::Ordering;

use vm_memory::Bytes;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;

/// The record layout this back end writes.
pub const VERSION: u16 = 1;
const HEADER: u64 = 16;
const ENTRY: u64 = 16;
const ALIGN: u64 = 64;
/// Largest split queue (virtio 1.x).
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of one queue's part of the record.
pub fn queue_bytes(queue_size: u16) -> u64 {
    (HEADER + ENTRY * u64::from(queue_size)).div_ceil(ALIGN) * ALIGN
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("queue size {0} is not a power of two in 1..=32768")]
    QueueSize(u16),
    #[error("{queues} queues is out of range (1..={max})")]
    Queues { queues: u16, max: u16 },
    #[error("the in-flight record is {have} bytes; {queues} queues of {queue_size} need {need}")]
    TooSmall {
        have: u64,
        need: u64,
        queues: u16,
        queue_size: u16,
    },
    #[error("queue {0} is not in the in-flight record")]
    NoQueue(u16),
    #[error("queue {queue} has {size} descriptors; the in-flight record tracks {tracked}")]
    QueueTooLarge { queue: u16, size: u16, tracked: u16 },
    #[error("descriptor {head} is not one of the {tracked} the in-flight record tracks for queue {queue}")]
    NoHead { queue: u16, head: u16, tracked: u16 },
    #[error("the in-flight record of queue {queue} is version {version}, not {VERSION}")]
    Version { queue: u16, version: u16 },
    #[error("in-flight record access: {0}")]
    Memory(String),
}

/// What a restarted back end finds for one queue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Recovered {
    /// The requests (descriptor heads) that were in flight, oldest first.
    pub heads: Vec<u16>,
    /// The largest counter in the record: new requests count on from it.
    pub last_counter: u64,
}

/// The record, mapped.
pub struct Record {
    mem: GuestMemoryMmap,
    queues: u16,
    queue_size: u16,
}

impl Record {
    /// Bytes of a record for `queues` queues of `queue_size` descriptors, checked.
    pub fn size_for(queues: u16, queue_size: u16, max_queues: u16) -> Result<u64, RecordError> {
        if queue_size == 0 || !queue_size.is_power_of_two() || queue_size > MAX_QUEUE_SIZE {
            return Err(RecordError::QueueSize(queue_size));
        }
        if queues == 0 || queues > max_queues {
            return Err(RecordError::Queues {
                queues,
                max: max_queues,
            });
        }
        Ok(u64::from(queues) * queue_bytes(queue_size))
    }

    /// The record in `mem` (mapped at address 0), which must hold `queues` queues of
    /// `queue_size` descriptors.
    pub fn new(
        mem: GuestMemoryMmap,
        queues: u16,
        queue_size: u16,
        max_queues: u16,
    ) -> Result<Record, RecordError> {
        let need = Record::size_for(queues, queue_size, max_queues)?;
        let have = vm_memory::GuestMemoryBackend::last_addr(&mem)
            .0
            .saturating_add(1);
        if vm_memory::GuestMemoryBackend::num_regions(&mem) != 1 || have < need {
            return Err(RecordError::TooSmall {
                have,
                need,
                queues,
                queue_size,
            });
        }
        Ok(Record {
            mem,
            queues,
            queue_size,
        })
    }

    fn header(&self, queue: u16, field: u64) -> GuestAddress {
        GuestAddress(u64::from(queue) * queue_bytes(self.queue_size) + field)
    }

    fn entry(&self, queue: u16, head: u16, field: u64) -> GuestAddress {
        self.header(queue, HEADER + u64::from(head) * ENTRY + field)
    }

    /// Checks that `head` of `queue` has an entry: a mark never lands in another queue's part.
    fn check(&self, queue: u16, head: u16) -> Result<(), RecordError> {
        if queue >= self.queues {
            return Err(RecordError::NoQueue(queue));
        }
        if head >= self.queue_size {
            return Err(RecordError::NoHead {
                queue,
                head,
                tracked: self.queue_size,
            });
        }
        Ok(())
    }

    fn put<T: vm_memory::ByteValued>(&self, at: GuestAddress, v: T) -> Result<(), RecordError> {
        self.mem
            .write_obj(v, at)
            .map_err(|e| RecordError::Memory(e.to_string()))
    }

    fn get<T: vm_memory::ByteValued>(&self, at: GuestAddress) -> Result<T, RecordError> {
        self.mem
            .read_obj(at)
            .map_err(|e| RecordError::Memory(e.to_string()))
    }

    /// Checks that `queue` (of `size` descriptors) fits the record; a fresh (zeroed) part is
    /// given this layout's header.
    pub fn prepare(&self, queue: u16, size: u16) -> Result<(), RecordError> {
        if queue >= self.queues {
            return Err(RecordError::NoQueue(queue));
        }
        if size > self.queue_size {
            return Err(RecordError::QueueTooLarge {
                queue,
                size,
                tracked: self.queue_size,
            });
        }
        match self.get::<u16>(self.header(queue, 8))? {
            0 => {
                self.put(self.header(queue, 10), size)?;
                fence(Ordering::SeqCst);
                self.put(self.header(queue, 8), VERSION)
            }
            VERSION => Ok(()),
            version => Err(RecordError::Version { queue, version }),
        }
    }

    /// Request `head` of `queue` was taken off the ring (the `counter`-th request).
    pub fn start(&self, queue: u16, head: u16, counter: u64) -> Result<(), RecordError> {
        self.check(queue, head)?;
        self.put(self.entry(queue, head, 8), counter)?;
        fence(Ordering::SeqCst);
        self.put(self.entry(queue, head, 0), 1u8)
    }

    /// Request `head` is about to be published on the used ring.
    pub fn completing(&self, queue: u16, head: u16) -> Result<(), RecordError> {
        self.check(queue, head)?;
        self.put(self.header(queue, 12), head)?;
        fence(Ordering::SeqCst);
        Ok(())
    }

    /// Request `head` is on the used ring, whose index is now `used_idx`.
    pub fn completed(&self, queue: u16, head: u16, used_idx: u16) -> Result<(), RecordError> {
        self.check(queue, head)?;
        self.put(self.entry(queue, head, 0), 0u8)?;
        fence(Ordering::SeqCst);
        self.put(self.header(queue, 14), used_idx)
    }

    /// The requests of `queue` (`size` descriptors) in flight when the last back end stopped,
    /// given the used index the ring has now; the record is brought up to date with it.
    pub fn recover(
        &self,
        queue: u16,
        size: u16,
        ring_used_idx: u16,
    ) -> Result<Recovered, RecordError> {
        self.prepare(queue, size)?;
        if self.get::<u16>(self.header(queue, 14))? != ring_used_idx {
            // Published but not cleared: that request is done.
            let last = self.get::<u16>(self.header(queue, 12))?;
            if last < self.queue_size {
                self.put(self.entry(queue, last, 0), 0u8)?;
            }
            fence(Ordering::SeqCst);
            self.put(self.header(queue, 14), ring_used_idx)?;
        }
        let mut found = Vec::new();
        let mut last_counter = 0;
        for head in 0..self.queue_size {
            let counter: u64 = self.get(self.entry(queue, head, 8))?;
            last_counter = last_counter.max(counter);
            if self.get::<u8>(self.entry(queue, head, 0))? == 1 {
                if head < size {
                    found.push((counter, head));
                } else {
                    // A head the queue cannot have: not a request of this ring.
                    self.put(self.entry(queue, head, 0), 0u8)?;
                }
            }
        }
        found.sort_unstable();
        Ok(Recovered {
            heads: found.into_iter().map(|(_, h)| h).collect(),
            last_counter,
        })
    }

    /// Forgets every mark of `queue` (the driver reset the device: nothing it had submitted
    /// is owed an answer).
    pub fn clear(&self, queue: u16) -> Result<(), RecordError> {
        self.check(queue, 0)?;
        for head in 0..self.queue_size {
            self.put(self.entry(queue, head, 0), 0u8)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(queues: u16, size: u16) -> Record {
        let bytes = Record::size_for(queues, size, 8).unwrap() as usize;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes)]).unwrap();
        Record::new(mem, queues, size, 8).unwrap()
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(queue_bytes(128), 2112);
        assert_eq!(
            Record::size_for(2, 100, 8),
            Err(RecordError::QueueSize(100))
        );
        assert!(matches!(
            Record::size_for(9, 128, 8),
            Err(RecordError::Queues { .. })
        ));
        assert!(matches!(
            Record::size_for(0, 128, 8),
            Err(RecordError::Queues { .. })
        ));
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4096)]).unwrap();
        assert!(matches!(
            Record::new(small, 2, 256, 8),
            Err(RecordError::TooSmall { .. })
        ));
        let r = record(1, 16);
        assert_eq!(r.prepare(1, 16), Err(RecordError::NoQueue(1)));
        assert!(matches!(
            r.prepare(0, 32),
            Err(RecordError::QueueTooLarge { .. })
        ));
    }

    #[test]
    fn a_fresh_record_has_nothing_in_flight() {
        let r = record(2, 16);
        assert_eq!(r.recover(1, 16, 0).unwrap(), Recovered::default());
    }

    #[test]
    fn requests_taken_and_not_answered_are_found_oldest_first() {
        let r = record(1, 16);
        r.prepare(0, 16).unwrap();
        r.start(0, 7, 1).unwrap();
        r.start(0, 3, 2).unwrap();
        r.start(0, 9, 3).unwrap();
        r.completing(0, 3).unwrap();
        r.completed(0, 3, 1).unwrap();
        let found = r.recover(0, 16, 1).unwrap();
        assert_eq!(found.heads, vec![7, 9]);
        assert_eq!(found.last_counter, 3);
    }

    #[test]
    fn a_request_published_but_not_cleared_is_done() {
        let r = record(1, 16);
        r.prepare(0, 16).unwrap();
        r.start(0, 5, 10).unwrap();
        r.completing(0, 5).unwrap();
        // The back end died here: the used ring says 1, the record still 0.
        let found = r.recover(0, 16, 1).unwrap();
        assert!(found.heads.is_empty(), "{found:?}");
        // And the record now agrees with the ring.
        assert_eq!(r.recover(0, 16, 1).unwrap().heads, Vec::<u16>::new());
    }

    #[test]
    fn a_request_not_yet_published_is_in_flight() {
        let r = record(1, 16);
        r.prepare(0, 16).unwrap();
        r.start(0, 5, 10).unwrap();
        r.completing(0, 5).unwrap();
        assert_eq!(r.recover(0, 16, 0).unwrap().heads, vec![5]);
    }

    #[test]
    fn marks_beyond_a_smaller_queue_are_dropped_and_a_reset_clears_all() {
        let r = record(1, 16);
        r.prepare(0, 16).unwrap();
        r.start(0, 12, 1).unwrap();
        r.start(0, 2, 2).unwrap();
        assert_eq!(r.recover(0, 8, 0).unwrap().heads, vec![2]);
        r.clear(0).unwrap();
        assert!(r.recover(0, 16, 0).unwrap().heads.is_empty());
    }

    #[test]
    fn marks_outside_a_queue_are_refused_and_leave_the_other_queues_alone() {
        let r = record(2, 16);
        r.prepare(0, 16).unwrap();
        r.prepare(1, 16).unwrap();
        r.start(1, 4, 3).unwrap();
        // Queue 0's part is 320 bytes: descriptor 19's entry would be queue 1's header.
        assert_eq!(
            r.start(0, 19, 7),
            Err(RecordError::NoHead {
                queue: 0,
                head: 19,
                tracked: 16
            })
        );
        assert!(matches!(
            r.completing(0, 16),
            Err(RecordError::NoHead { .. })
        ));
        assert!(matches!(
            r.completed(0, 16, 1),
            Err(RecordError::NoHead { .. })
        ));
        assert_eq!(r.start(2, 0, 7), Err(RecordError::NoQueue(2)));
        assert_eq!(r.clear(2), Err(RecordError::NoQueue(2)));
        assert_eq!(r.prepare(1, 16), Ok(()), "queue 1's header is intact");
        let found = r.recover(1, 16, 0).unwrap();
        assert_eq!((found.heads, found.last_counter), (vec![4], 3));
    }

    #[test]
    fn a_record_of_another_layout_is_refused() {
        let r = record(1, 16);
        r.put(r.header(0, 8), 7u16).unwrap();
        assert_eq!(
            r.prepare(0, 16),
            Err(RecordError::Version {
                queue: 0,
                version: 7
            })
        );
    }
}
