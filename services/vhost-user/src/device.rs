//! What a device tells the transport ([`VirtioDevice`]) and what the transport hands a device
//! to serve one of its queues ([`Ring`]).
//!
//! A device answers its queues in one of two ways:
//! - **one request at a time** ([`Ring::answer_each`]): the transport takes each chain off the
//!   ring, marks it in the in-flight record, lets the device answer it, puts it on the used
//!   ring and clears the mark, and asks virtio-queue whether the driver wants an interrupt.
//!   Block and SCSI requests are answered this way: a restarted service resubmits exactly the
//!   requests its predecessor left unanswered.
//! - **the queue whole** ([`Ring::parts`]): the device takes and publishes chains itself and
//!   says whether the driver must be interrupted ([`Ring::notify`]). virtio-net does: it
//!   publishes a frame's buffers together and keeps nothing in flight between calls, so it
//!   has no use for the in-flight record ([`VirtioDevice::wants_inflight_record`] false).

use std::num::Wrapping;
use std::os::fd::BorrowedFd;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pv_devices::virtio::Outcome;
use virtio_queue::DescriptorChain;
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;

use crate::inflight::Record;

/// Requests answered on one ring before the service looks at its other work.
pub const BATCH: usize = 256;

/// A virtio device model behind a vhost-user socket: what the transport must know of it.
///
/// The transport adds the ring features (`VIRTIO_RING_F_INDIRECT_DESC`,
/// `VIRTIO_RING_F_EVENT_IDX`) and `VHOST_USER_F_PROTOCOL_FEATURES` to [`features`], checks that
/// the driver acknowledges only what was offered, maps guest memory, validates every ring
/// address and index, and interrupts the driver when a [`Ring`] asks it to.
///
/// [`features`]: VirtioDevice::features
pub trait VirtioDevice {
    /// The device's own virtio feature bits.
    fn features(&self) -> u64;
    /// The features the driver acknowledged (already checked to be offered), ring features
    /// included.
    fn acknowledge(&mut self, _features: u64) {}
    /// The configuration space (the transport pads it with zeros up to the protocol's 256
    /// bytes, as front ends read their own idea of its length).
    fn config(&self) -> Vec<u8>;
    /// Queues a front end may set up.
    fn queues(&self) -> u16;
    /// Whether the transport offers `VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD` and keeps the
    /// record for [`Ring::answer_each`].
    fn wants_inflight_record(&self) -> bool;
    /// Whether the device takes anything from queue `index` (a queue it never answers is
    /// neither activated nor served).
    fn answers(&self, _index: usize) -> bool {
        true
    }
    /// Serves what ring `ring.index()` holds, up to a batch; whether more work waits (the loop
    /// then comes back without waiting). An error stops the ring until the driver resets the
    /// device.
    fn serve(&mut self, ring: &mut Ring<'_>) -> Result<bool, String>;
    /// Ring `index` stopped (the front end asked for its base, set it up again, or reset the
    /// device): the device forgets what it waited for on it.
    fn stopped(&mut self, _index: usize) {}
    /// The driver reset the device, or the front end reset its owner: the rings are gone.
    fn reset(&mut self) {}
    /// The front end went away (everything it set up is dropped; the device's back end stays).
    fn disconnected(&mut self) {
        self.reset();
    }
    /// Descriptors whose readability means the device has work (a TAP with frames for the
    /// guest): the loop waits on them with the rings' kicks.
    fn wake_fds(&self) -> Vec<BorrowedFd<'_>> {
        Vec::new()
    }
    /// The longest the loop may wait before serving the device again, when it waits for
    /// something it cannot poll (a back end that refused a frame).
    fn wait_limit(&self) -> Option<Duration> {
        None
    }
}

/// Requests answered through [`Ring::answer_each`] and what came of them (for `paravisor ps`
/// and the tests).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub requests: u64,
    /// Answered with an error status (a bad request, a medium error).
    pub failed: u64,
    /// Returned without a status (the chain could not carry one).
    pub malformed: u64,
    /// Submitted again after a restart, from the in-flight record.
    pub resubmitted: u64,
}

/// One ready ring, handed to [`VirtioDevice::serve`]: its queue (indexes set, addresses
/// checked) over the front end's guest memory.
pub struct Ring<'a> {
    pub(crate) index: usize,
    pub(crate) name: &'a str,
    pub(crate) mem: &'a GuestMemoryMmap,
    pub(crate) queue: &'a mut Queue,
    pub(crate) record: Option<&'a Record>,
    pub(crate) resubmit: &'a mut Vec<u16>,
    pub(crate) counter: &'a mut u64,
    pub(crate) counts: &'a mut Counts,
    pub(crate) notify: bool,
}

impl<'a> Ring<'a> {
    /// The queue's index in the device.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Guest memory and the queue, for a device that takes and publishes chains itself (it
    /// then says with [`Ring::notify`] whether the driver wants an interrupt; the in-flight
    /// record is not kept for it).
    pub fn parts(&mut self) -> (&'a GuestMemoryMmap, &mut Queue) {
        (self.mem, self.queue)
    }

    /// Interrupts the driver once the device returns.
    pub fn notify(&mut self) {
        self.notify = true;
    }

    /// Asks the driver to notify (kick) for its next chain: with EVENT_IDX, `avail_event` at
    /// the next available index; without, the used ring's NO_NOTIFY flag cleared. Whether
    /// chains arrived meanwhile (the device serves them rather than wait for a kick that will
    /// not come).
    pub fn rearm(&mut self) -> Result<bool, String> {
        self.queue
            .enable_notification(self.mem)
            .map_err(|e| format!("arming notifications: {e}"))
    }

    /// Answers the ring's requests one at a time, up to [`BATCH`], with `answer` (the bytes it
    /// wrote into the chain's buffers, and the outcome), each recorded in the in-flight record
    /// while it is answered; then asks virtio-queue whether the driver wants an interrupt.
    /// Whether more requests wait.
    pub fn answer_each(
        &mut self,
        answer: impl FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> (u32, Outcome),
    ) -> Result<bool, String> {
        let drained = self.drain(answer);
        if self.queue.needs_notification(self.mem).unwrap_or(true) {
            self.notify = true;
        }
        drained
    }

    fn drain(
        &mut self,
        mut answer: impl FnMut(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>) -> (u32, Outcome),
    ) -> Result<bool, String> {
        let mem = self.mem;
        let queue = &mut *self.queue;
        let record = self.record;
        let name = self.name;
        let index = self.index;
        let q = index as u16;
        let event_idx = queue.event_idx_enabled();
        let mut answered = 0;
        loop {
            if event_idx {
                queue.disable_notification(mem).map_err(|e| e.to_string())?;
            }
            let avail = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(|e| format!("avail index: {e}"))?;
            let pending = (avail - Wrapping(queue.next_avail())).0;
            if pending > queue.size() {
                return Err(format!(
                    "the driver says {pending} requests are waiting on a ring of {}",
                    queue.size()
                ));
            }
            for _ in 0..pending {
                if answered == BATCH {
                    return Ok(true);
                }
                let chain = queue
                    .pop_descriptor_chain(mem)
                    .ok_or("a request the avail index announced is not there")?;
                let head = chain.head_index();
                // virtio-queue hands out a chain whose head is past the ring (it refuses
                // only to follow it): that head must not be marked in flight, where its
                // entry would be another queue's part of the record.
                if head >= queue.size() {
                    return Err(format!(
                        "the driver offered descriptor {head} on a ring of {}",
                        queue.size()
                    ));
                }
                let resubmission = (!self.resubmit.is_empty()).then(|| self.resubmit.remove(0));
                if let Some(expected) = resubmission.filter(|e| *e != head) {
                    tracing::warn!(device = %name, ring = index, head, expected, "the ring holds another request where the in-flight record expected one");
                }
                *self.counter += 1;
                if let Some(r) = record {
                    r.start(q, head, *self.counter).map_err(|e| e.to_string())?;
                }
                let (written, outcome) = answer(mem, chain);
                if let Some(r) = record {
                    r.completing(q, head).map_err(|e| e.to_string())?;
                }
                queue
                    .add_used(mem, head, written)
                    .map_err(|e| format!("used ring: {e}"))?;
                if let Some(r) = record {
                    r.completed(q, head, queue.next_used())
                        .map_err(|e| e.to_string())?;
                }
                answered += 1;
                let counts = &mut *self.counts;
                counts.requests += 1;
                // A resubmission counts once answered (a ring that stops first answered
                // nothing).
                if resubmission.is_some() {
                    counts.resubmitted += 1;
                }
                // Counted exactly; logged one by one at first, then every thousandth (a
                // driver scanning 255 SCSI targets, or a hostile one, must not flood the log).
                let (what, n) = match outcome {
                    Outcome::Done => continue,
                    Outcome::Failed(why) => {
                        counts.failed += 1;
                        (format!("request failed: {why}"), counts.failed)
                    }
                    Outcome::Malformed(why) => {
                        counts.malformed += 1;
                        (format!("malformed request: {why}"), counts.malformed)
                    }
                };
                if n <= 20 || n.is_multiple_of(1000) {
                    tracing::warn!(device = %name, ring = index, count = n, "{what}");
                }
            }
            if !event_idx || !queue.enable_notification(mem).map_err(|e| e.to_string())? {
                return Ok(false);
            }
        }
    }
}
