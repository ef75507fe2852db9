//! virtio-scsi (virtio 1.x, 5.6): one target with one LUN, a [`ScsiDisk`], on a request
//! queue; task management on the control queue. A request is a descriptor chain: the command
//! header the device reads (LUN, tag, attributes, a 32-byte CDB) and the data out, then the
//! response header the device writes (sense length, residual, status, response, 96 bytes of
//! sense) and the data in. A LUN other than target 0 / LUN 0 is BAD_TARGET; a chain that does
//! not fit this shape is returned with nothing written (and named), never a panic or an access
//! outside guest memory.

use std::io::Read;
use std::io::Write;

use virtio_queue::DescriptorChain;
use virtio_queue::QueueT;
use vm_memory::GuestMemory;

use super::Outcome;
use crate::block::Disk;
use crate::scsi::ScsiDisk;

/// Sizes the device announces in its configuration (and reads and writes).
pub const CDB_SIZE: usize = 32;
pub const SENSE_SIZE: usize = 96;
/// The command header: lun (8), tag (8), task attribute, priority, crn, then the CDB.
pub const CMD_HEADER: usize = 19 + CDB_SIZE;
/// The response header: sense_len, resid (u32 each), status qualifier (u16), status,
/// response, then the sense.
pub const RESP_HEADER: usize = 12 + SENSE_SIZE;
/// Largest data of one request (in or out).
pub const MAX_DATA: usize = 1 << 20;

/// Response codes (5.6.6.1).
pub const VIRTIO_SCSI_S_OK: u8 = 0;
pub const VIRTIO_SCSI_S_OVERRUN: u8 = 1;
pub const VIRTIO_SCSI_S_BAD_TARGET: u8 = 3;
pub const VIRTIO_SCSI_S_FAILURE: u8 = 9;
/// Task management (5.6.6.2): the request type, and the answer for a function done.
pub const VIRTIO_SCSI_T_TMF: u32 = 0;
/// The device may send VIRTIO_SCSI_T_PARAM_CHANGE events (feature bit 2).
pub const VIRTIO_SCSI_F_CHANGE: u64 = 1 << 2;
pub const VIRTIO_SCSI_S_FUNCTION_COMPLETE: u8 = 0;
pub const VIRTIO_SCSI_S_FUNCTION_REJECTED: u8 = 11;

/// A virtio-scsi device with one disk at target 0, LUN 0.
pub struct VirtioScsi<D: Disk> {
    scsi: ScsiDisk<D>,
}

/// Whether `lun` (the request's 8-byte LUN field) addresses target 0, LUN 0.
fn is_lun0(lun: &[u8]) -> bool {
    lun[0] == 1 && lun[1] == 0 && lun[2] & 0x3f == 0 && lun[3] == 0 && lun[2] & 0xc0 != 0x80
}

impl<D: Disk> VirtioScsi<D> {
    pub fn new(scsi: ScsiDisk<D>) -> VirtioScsi<D> {
        VirtioScsi { scsi }
    }

    /// VERSION_1, and VIRTIO_SCSI_F_CHANGE: the device may report parameter changes on the
    /// event queue. It never has one to report; the bit is offered because QEMU's own
    /// virtio-scsi offers it to every driver and hands the driver's acknowledgement to a
    /// vhost-user back end as is.
    pub fn features(&self) -> u64 {
        super::VIRTIO_F_VERSION_1 | VIRTIO_SCSI_F_CHANGE
    }

    /// The configuration space (5.6.4): one request queue, one target, one LUN.
    pub fn config(&self) -> [u8; 36] {
        let mut c = [0u8; 36];
        let mut put = |at: usize, v: u32| c[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(0, 1); // num_queues
        put(4, (MAX_DATA / 4096) as u32); // seg_max
        put(8, (MAX_DATA / 512) as u32); // max_sectors
        put(12, 128); // cmd_per_lun
        put(16, 0); // event_info_size
        put(20, SENSE_SIZE as u32);
        put(24, CDB_SIZE as u32);
        // max_channel 0 (u16 at 28), max_target 0 (u16 at 30), max_lun 0 (u32 at 32).
        c
    }

    pub fn scsi(&mut self) -> &mut ScsiDisk<D> {
        &mut self.scsi
    }

    /// Answers every command on a request queue.
    pub fn process_requests<M: GuestMemory, Q: QueueT>(
        &mut self,
        mem: &M,
        queue: &mut Q,
    ) -> Vec<Outcome> {
        super::drain(mem, queue, |chain| self.answer_request(mem, chain))
    }

    /// Answers task management on the control queue: with one disk that completes every
    /// command before answering, there is never a task to abort, so every function is done.
    pub fn process_control<M: GuestMemory, Q: QueueT>(
        &mut self,
        mem: &M,
        queue: &mut Q,
    ) -> Vec<Outcome> {
        super::drain(mem, queue, |chain| answer_control(mem, chain))
    }

    /// One command of a request queue (for a transport that takes chains off the queue itself).
    pub fn answer_request<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> (u32, Outcome) {
        let malformed = |why: String| (0, Outcome::Malformed(why));
        let (mut reader, mut writer) = match super::parts(mem, chain) {
            Ok(p) => p,
            Err(outcome) => return (0, outcome),
        };
        let mut header = [0u8; CMD_HEADER];
        if let Err(e) = reader.read_exact(&mut header) {
            return malformed(format!("command header: {e}"));
        }
        if writer.available_bytes() < RESP_HEADER {
            return malformed("no room for the response header".into());
        }
        let mut data_in = match writer.split_at(RESP_HEADER) {
            Ok(d) => d,
            Err(e) => return malformed(format!("data in: {e}")),
        };
        let data_out_len = reader.available_bytes();
        let room = data_in.available_bytes();
        let mut response = [0u8; RESP_HEADER];
        let (written_in, outcome) = if !is_lun0(&header[..8]) {
            response[11] = VIRTIO_SCSI_S_BAD_TARGET;
            (0, Outcome::Failed("no such target or LUN".into()))
        } else if data_out_len > MAX_DATA || room > MAX_DATA {
            response[11] = VIRTIO_SCSI_S_OVERRUN;
            (
                0,
                Outcome::Failed("more data than a request may carry".into()),
            )
        } else {
            let mut data_out = vec![0u8; data_out_len];
            match reader.read_exact(&mut data_out) {
                Err(e) => {
                    response[11] = VIRTIO_SCSI_S_FAILURE;
                    (0, Outcome::Failed(format!("data out: {e}")))
                }
                Ok(()) => {
                    let answer = self.scsi.execute(&header[19..], &data_out, room);
                    response[10] = answer.status;
                    if let Some(sense) = answer.sense {
                        response[..4].copy_from_slice(&(sense.len() as u32).to_le_bytes());
                        response[12..12 + sense.len()].copy_from_slice(&sense);
                    }
                    // Residual: the room given and not filled.
                    response[4..8]
                        .copy_from_slice(&((room - answer.data.len()) as u32).to_le_bytes());
                    match data_in.write_all(&answer.data) {
                        Ok(()) if answer.sense.is_none() => (answer.data.len(), Outcome::Done),
                        Ok(()) => (
                            answer.data.len(),
                            Outcome::Failed(format!(
                                "CHECK CONDITION, sense key {:#x} ASC {:#x}",
                                response[14] & 0xf,
                                response[24]
                            )),
                        ),
                        Err(e) => {
                            response[11] = VIRTIO_SCSI_S_FAILURE;
                            (0, Outcome::Failed(format!("data in: {e}")))
                        }
                    }
                }
            }
        };
        match writer.write_all(&response) {
            Ok(()) => ((RESP_HEADER + written_in) as u32, outcome),
            Err(e) => (0, Outcome::Malformed(format!("response header: {e}"))),
        }
    }
}

/// One control request: a task management function is answered FUNCTION_COMPLETE (nothing
/// is ever pending); anything else (asynchronous notification, which the device does not
/// offer) is rejected.
pub fn answer_control<M: GuestMemory>(mem: &M, chain: DescriptorChain<&M>) -> (u32, Outcome) {
    let malformed = |why: String| (0, Outcome::Malformed(why));
    let mut reader = match chain.clone().reader(mem) {
        Ok(r) => r,
        Err(e) => return malformed(format!("readable part: {e}")),
    };
    let mut writer = match chain.writer(mem) {
        Ok(w) => w,
        Err(e) => return malformed(format!("writable part: {e}")),
    };
    let mut kind = [0u8; 4];
    if let Err(e) = reader.read_exact(&mut kind) {
        return malformed(format!("control header: {e}"));
    }
    let (answer, outcome) = if u32::from_le_bytes(kind) == VIRTIO_SCSI_T_TMF {
        (VIRTIO_SCSI_S_FUNCTION_COMPLETE, Outcome::Done)
    } else {
        (
            VIRTIO_SCSI_S_FUNCTION_REJECTED,
            Outcome::Failed("control request rejected".into()),
        )
    };
    // TMF's answer is one byte; an asynchronous-notification answer is event_actual (u32,
    // none) and then the byte.
    let out: Vec<u8> = if u32::from_le_bytes(kind) == VIRTIO_SCSI_T_TMF {
        vec![answer]
    } else {
        vec![0, 0, 0, 0, answer]
    };
    if writer.available_bytes() < out.len() {
        return malformed("no room for the answer".into());
    }
    match writer.write_all(&out) {
        Ok(()) => (out.len() as u32, outcome),
        Err(e) => (0, Outcome::Malformed(format!("answer: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::Address;
    use vm_memory::Bytes;
    use vm_memory::GuestAddress;
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::block::raw::RawDisk;
    use crate::block::MemStore;
    use crate::block::BLOCK;
    use crate::virtio::testing::desc;
    use crate::virtio::testing::memory;
    use crate::virtio::testing::NEXT;
    use crate::virtio::testing::WRITE;

    const CMD: u64 = 0x10_0000;
    const OUT: u64 = 0x18_0000;
    const RESP: u64 = 0x20_0000;
    const IN: u64 = 0x28_0000;

    fn device() -> VirtioScsi<RawDisk<MemStore>> {
        let disk = RawDisk::new(MemStore {
            bytes: vec![0; 8 * BLOCK],
        })
        .unwrap();
        VirtioScsi::new(ScsiDisk::new(disk, "pv-scsi-0"))
    }

    fn command(mem: &GuestMemoryMmap, lun: [u8; 8], cdb: &[u8]) {
        let mut h = [0u8; CMD_HEADER];
        h[..8].copy_from_slice(&lun);
        h[8..16].copy_from_slice(&7u64.to_le_bytes());
        h[19..19 + cdb.len()].copy_from_slice(cdb);
        mem.write_slice(&h, GuestAddress(CMD)).unwrap();
    }

    const LUN0: [u8; 8] = [1, 0, 0x40, 0, 0, 0, 0, 0];

    /// Runs one chain; the outcome, used length and the response header.
    fn run(
        dev: &mut VirtioScsi<RawDisk<MemStore>>,
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
    ) -> (Outcome, u32, [u8; RESP_HEADER]) {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        let mut queue: Queue = vq.create_queue().unwrap();
        mem.write_slice(&[0xff; RESP_HEADER], GuestAddress(RESP))
            .unwrap();
        let outcomes = dev.process_requests(mem, &mut queue);
        let used: u32 = mem.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
        let mut resp = [0u8; RESP_HEADER];
        mem.read_slice(&mut resp, GuestAddress(RESP)).unwrap();
        (outcomes[0].clone(), used, resp)
    }

    #[test]
    fn a_write_then_a_read_through_the_request_queue() {
        let mem = memory();
        let mut dev = device();
        let data: Vec<u8> = (0..BLOCK).map(|i| (i % 241) as u8).collect();
        mem.write_slice(&data, GuestAddress(OUT)).unwrap();
        command(&mem, LUN0, &[0x2a, 0, 0, 0, 0, 5, 0, 0, 1, 0]);
        let write = [
            desc(CMD, CMD_HEADER as u32, NEXT),
            desc(OUT, BLOCK as u32, NEXT),
            desc(RESP, RESP_HEADER as u32, WRITE),
        ];
        let (outcome, used, resp) = run(&mut dev, &mem, &write);
        assert_eq!((outcome, used), (Outcome::Done, RESP_HEADER as u32));
        assert_eq!((resp[10], resp[11]), (crate::scsi::GOOD, VIRTIO_SCSI_S_OK));
        command(&mem, LUN0, &[0x28, 0, 0, 0, 0, 5, 0, 0, 1, 0]);
        let read = [
            desc(CMD, CMD_HEADER as u32, NEXT),
            desc(RESP, RESP_HEADER as u32, NEXT | WRITE),
            desc(IN, BLOCK as u32, WRITE),
        ];
        let (outcome, used, resp) = run(&mut dev, &mem, &read);
        assert_eq!(
            (outcome, used),
            (Outcome::Done, (RESP_HEADER + BLOCK) as u32)
        );
        assert_eq!(
            u32::from_le_bytes(resp[4..8].try_into().unwrap()),
            0,
            "no residual"
        );
        let mut back = vec![0u8; BLOCK];
        mem.read_slice(&mut back, GuestAddress(IN)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn check_conditions_carry_their_sense_and_other_luns_are_bad_targets() {
        let mem = memory();
        let mut dev = device();
        command(&mem, LUN0, &[0xc0, 0, 0, 0, 0, 0]);
        let descs = [
            desc(CMD, CMD_HEADER as u32, NEXT),
            desc(RESP, RESP_HEADER as u32, NEXT | WRITE),
            desc(IN, 64, WRITE),
        ];
        let (outcome, _, resp) = run(&mut dev, &mem, &descs);
        assert!(matches!(outcome, Outcome::Failed(_)));
        assert_eq!(resp[10], crate::scsi::CHECK_CONDITION);
        assert_eq!(u32::from_le_bytes(resp[..4].try_into().unwrap()), 18);
        assert_eq!(
            (resp[12 + 2], resp[12 + 12]),
            (crate::scsi::ILLEGAL_REQUEST, 0x20)
        );
        for lun in [
            [1, 1, 0x40, 0, 0, 0, 0, 0],
            [1, 0, 0x40, 1, 0, 0, 0, 0],
            [0; 8],
        ] {
            command(&mem, lun, &[0x00; 6]);
            let (_, _, resp) = run(&mut dev, &mem, &descs);
            assert_eq!(resp[11], VIRTIO_SCSI_S_BAD_TARGET, "{lun:?}");
        }
    }

    #[test]
    fn chains_without_room_for_a_response_are_returned_untouched() {
        let mem = memory();
        let mut dev = device();
        command(&mem, LUN0, &[0x00; 6]);
        let short = [desc(CMD, CMD_HEADER as u32, NEXT), desc(RESP, 20, WRITE)];
        let (outcome, used, resp) = run(&mut dev, &mem, &short);
        assert!(matches!(outcome, Outcome::Malformed(_)));
        assert_eq!((used, resp[0]), (0, 0xff));
        let no_header = [desc(CMD, 10, NEXT), desc(RESP, RESP_HEADER as u32, WRITE)];
        assert!(matches!(
            run(&mut dev, &mem, &no_header).0,
            Outcome::Malformed(_)
        ));
    }

    #[test]
    fn task_management_completes_and_other_control_requests_are_rejected() {
        let mem = memory();
        let mut dev = device();
        for (kind, expect, len) in [
            (VIRTIO_SCSI_T_TMF, VIRTIO_SCSI_S_FUNCTION_COMPLETE, 1u32),
            (1, VIRTIO_SCSI_S_FUNCTION_REJECTED, 5),
        ] {
            mem.write_slice(&kind.to_le_bytes(), GuestAddress(CMD))
                .unwrap();
            let vq = MockSplitQueue::new(&mem, 16);
            vq.build_desc_chain(&[desc(CMD, 24, NEXT), desc(RESP, 8, WRITE)])
                .unwrap();
            let mut queue: Queue = vq.create_queue().unwrap();
            dev.process_control(&mem, &mut queue);
            let used: u32 = mem.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
            let answer: u8 = mem
                .read_obj(GuestAddress(RESP + u64::from(len) - 1))
                .unwrap();
            assert_eq!((used, answer), (len, expect));
        }
    }

    #[test]
    fn the_configuration_announces_one_lun_and_the_sizes_used() {
        let c = device().config();
        let word = |at: usize| u32::from_le_bytes(c[at..at + 4].try_into().unwrap());
        assert_eq!((word(0), word(20), word(24), word(32)), (1, 96, 32, 0));
    }
}
