//! The NVMe controller on our own guest partition: a PCI function whose configuration
//! accesses intercept's host bridge forwards here, whose BAR 0 accesses the partition routes
//! here (the manifest's `mmio` range, where the BAR sits fixed), whose interrupt is the line
//! the manifest gives the service (an eventfd the microkernel wired as a KVM irqfd), and
//! which reaches only the guest memory the manifest grants (`guest-memory`: the partition's
//! shared window in the confidential-VM model).
//!
//! Every access is checkpointed (controller registers and queues, PCI state, each vCPU's
//! last access and its answer) before it is answered, in a region the microkernel keeps
//! across restarts: a process killed in the middle of an access is replaced by one that
//! answers the partition's resent access from the record if it had completed, or performs it
//! again from the state before it (commands a doorbell ran are run again: the same data to
//! the same blocks, the same completions in the same slots).
//!
//! **Doorbells through an ioeventfd.** With a `doorbells` grant, once the driver turns on
//! shadow doorbells the function's answers ask the partition to arm the I/O queues'
//! doorbells ([`Next::Doorbells`]): a doorbell write then only signals the service's eventfd
//! (the vCPU goes on at once) and [`PciNvme::kick`] reads the values from the shadow page.
//! Completions are checkpointed before they are posted (the controller stages them), so a
//! process killed after the guest saw a completion never runs that command again: its
//! successor posts the staged entries again, the same bytes in the same slots.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;

use ipc_defs::hosted::checkpoint::CheckpointArea;
use ipc_defs::hosted::checkpoint::CheckpointMemory;
use ipc_defs::services::guest::mask;
use ipc_defs::services::guest::Access;
use ipc_defs::services::guest::Next;
use ipc_defs::services::guest::Reply;
use ipc_defs::services::guest::Space;
use pv_devices::block::Disk;
use pv_devices::nvme::NvmeController;
use pv_devices::nvme::NvmeState;
use pv_devices::nvme::BAR_SIZE;
use pv_devices::pci_function::FunctionState;
use pv_devices::pci_function::Identity;
use pv_devices::pci_function::PciFunction;
use serde::Deserialize;
use serde::Serialize;
use vm_memory::GuestMemoryMmap;

/// The function's identity: Red Hat's QEMU NVMe ids (Linux binds by class anyway), class
/// 01:08:02 (mass storage, non-volatile memory, NVM Express), revision 2.
const IDENTITY: Identity = Identity {
    vendor: 0x1b36,
    device: 0x0010,
    class_revision: 0x0108_0202,
    subsystem_vendor: 0x1b36,
    subsystem: 0x0010,
};

/// A vCPU's last access and what it was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct LastAccess {
    seq: u64,
    address: u64,
    write: bool,
    value: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Checkpoint {
    nvme: NvmeState,
    pci: FunctionState,
    last: BTreeMap<u32, LastAccess>,
}

/// The NVMe function.
pub struct PciNvme<M: CheckpointMemory> {
    nvme: NvmeController<Box<dyn Disk + Send>>,
    pci: PciFunction,
    memory: GuestMemoryMmap,
    /// An empty memory: what the device reaches while the driver has bus mastering off.
    no_memory: GuestMemoryMmap,
    irq: Option<File>,
    area: CheckpointArea<M>,
    last: BTreeMap<u32, LastAccess>,
    /// Whether the partition delivers the doorbells as signals when asked (a `doorbells`
    /// grant): every answer then says whether they should be.
    doorbells: bool,
    /// Accesses answered from the record after a restart.
    pub repeats: u64,
    /// Kicks that ran commands (doorbells that came as signals, not accesses).
    pub kicks: u64,
}

impl<M: CheckpointMemory> PciNvme<M> {
    /// The function for `disk` with BAR 0 at `bar`, DMA into `memory`, interrupt line `line`
    /// (its eventfd `irq`), resumed from the checkpoint in `area` if there is one. With
    /// `doorbells`, its answers arm the I/O doorbells once the driver uses shadow doorbells.
    pub fn new(
        disk: Box<dyn Disk + Send>,
        serial: &str,
        bar: u64,
        memory: GuestMemoryMmap,
        irq: Option<(u8, File)>,
        area: M,
        doorbells: bool,
    ) -> Result<PciNvme<M>, String> {
        let mut area = CheckpointArea::new(area);
        let mut nvme = NvmeController::new(disk, serial);
        let (line, irq) = match irq {
            Some((line, fd)) => (line, Some(fd)),
            None => (0xff, None),
        };
        let mut pci = PciFunction::new(IDENTITY, bar, BAR_SIZE, line, Vec::new())?;
        let mut last = BTreeMap::new();
        if let Some(c) = area.load::<Checkpoint>() {
            nvme.restore(c.nvme)
                .map_err(|e| format!("the controller's checkpoint: {e}"))?;
            pci.restore(c.pci);
            last = c.last;
            tracing::info!("NVMe controller resumed from its checkpoint");
        }
        let mut function = PciNvme {
            nvme,
            pci,
            memory,
            no_memory: GuestMemoryMmap::default(),
            irq,
            area,
            last,
            doorbells,
            repeats: 0,
            kicks: 0,
        };
        // Completions the last process checkpointed but may not have posted.
        function.post();
        Ok(function)
    }

    /// What the vCPU does after an access: resume, and (with doorbells) whether the I/O
    /// doorbells should come as signals.
    fn next(&self) -> Next {
        if self.doorbells {
            Next::Doorbells {
                armed: self.nvme.shadow_doorbells(),
            }
        } else {
            Next::Resume
        }
    }

    /// Checkpoints the state (staged completions included) before anything of it is seen.
    fn checkpoint(&mut self) {
        let checkpoint = Checkpoint {
            nvme: self.nvme.state(),
            pci: self.pci.state(),
            last: self.last.clone(),
        };
        if let Err(e) = self.area.store(&checkpoint) {
            tracing::error!("NVMe checkpoint not written: {e}");
        }
    }

    /// Posts the staged completions and raises the interrupt for them.
    fn post(&mut self) {
        let memory = if self.pci.bus_master() {
            &self.memory
        } else {
            &self.no_memory
        };
        let interrupt = self.nvme.post(memory);
        if interrupt && !self.pci.interrupt_disabled() {
            if let Some(irq) = self.irq.as_mut() {
                let _ = irq.write_all(&1u64.to_ne_bytes());
            }
        }
    }

    /// The doorbell eventfd fired: runs what the shadow doorbells say was submitted
    /// (checkpointed before its completions are posted). True when commands ran.
    pub fn kick(&mut self) -> bool {
        if !self.pci.memory_enabled() {
            return false;
        }
        let memory = if self.pci.bus_master() {
            &self.memory
        } else {
            &self.no_memory
        };
        let changed = self.nvme.stage_kick(memory);
        if !changed && !self.nvme.has_staged() {
            return false;
        }
        self.kicks += 1;
        self.checkpoint();
        self.post();
        true
    }

    /// Answers one access of the partition (and records it before the answer leaves).
    pub fn access(&mut self, a: Access) -> Reply {
        let write = a.write.is_some();
        if let Some(l) = self.last.get(&a.vcpu) {
            if l.seq == a.seq && l.address == a.address && l.write == write {
                // Sent again after a restart: this access was done.
                self.repeats += 1;
                tracing::info!(
                    vcpu = a.vcpu,
                    seq = a.seq,
                    "access answered from the record (sent again after a restart)"
                );
                return Reply {
                    value: l.value,
                    next: self.next(),
                };
            }
        }
        let value = match (a.space, a.written()) {
            _ if !a.size_is_valid() => mask(a.size),
            (Space::PciConfig, None) => self.pci.read(a.address & 0xff, a.size),
            (Space::PciConfig, Some(v)) => {
                self.pci.write(a.address & 0xff, a.size, v);
                0
            }
            (Space::Mmio, None) => self.mmio_read(a.address, a.size),
            (Space::Mmio, Some(v)) => {
                self.mmio_write(a.address, a.size, v);
                0
            }
            // Ports: the function has none.
            (Space::Port, None) => mask(a.size),
            (Space::Port, Some(_)) => 0,
        };
        self.last.insert(
            a.vcpu,
            LastAccess {
                seq: a.seq,
                address: a.address,
                write,
                value,
            },
        );
        self.checkpoint();
        self.post();
        Reply {
            value,
            next: self.next(),
        }
    }

    /// The errors the controller met since the last look (a tampered block with its LBA, a
    /// bad PRP), for the log.
    pub fn take_errors(&mut self) -> Vec<String> {
        std::mem::take(&mut self.nvme.errors)
    }

    fn mmio_read(&self, address: u64, size: u8) -> u64 {
        let Some(offset) = self
            .pci
            .bar_offset(address)
            .filter(|_| matches!(size, 4 | 8))
        else {
            return mask(size);
        };
        self.nvme.mmio_read(offset, size)
    }

    fn mmio_write(&mut self, address: u64, size: u8, value: u64) {
        let Some(offset) = self
            .pci
            .bar_offset(address)
            .filter(|_| matches!(size, 4 | 8))
        else {
            return;
        };
        let memory = if self.pci.bus_master() {
            &self.memory
        } else {
            &self.no_memory
        };
        // Completions are staged: the access checkpoints before it posts them.
        self.nvme.stage_mmio_write(memory, offset, size, value);
    }
}

#[cfg(test)]
mod tests {
    use ipc_defs::hosted::checkpoint::MemRegion;
    use pv_devices::block::raw::RawDisk;
    use pv_devices::block::MemStore;
    use vm_memory::Bytes;
    use vm_memory::GuestAddress;

    use super::*;

    const BAR: u64 = 0xfe00_0000;
    const WINDOW: u64 = 0xb000_0000;

    fn function(region: &MemRegion, memory: &GuestMemoryMmap) -> PciNvme<MemRegion> {
        function_with(region, memory, 0, false)
    }

    /// The function over a 16-block disk of `fill` bytes, with or without doorbells.
    fn function_with(
        region: &MemRegion,
        memory: &GuestMemoryMmap,
        fill: u8,
        doorbells: bool,
    ) -> PciNvme<MemRegion> {
        let disk = RawDisk::new(MemStore {
            bytes: vec![fill; 16 * 4096],
        })
        .unwrap();
        PciNvme::new(
            Box::new(disk),
            "t",
            BAR,
            memory.clone(),
            None,
            region.clone(),
            doorbells,
        )
        .unwrap()
    }

    fn access(
        vcpu: u32,
        seq: u64,
        space: Space,
        address: u64,
        size: u8,
        write: Option<u64>,
    ) -> Access {
        Access {
            vcpu,
            seq,
            space,
            address,
            size,
            write,
        }
    }

    #[test]
    fn the_configuration_space_is_an_nvme_function_with_a_fixed_64_bit_bar() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(WINDOW), 0x10000)]).unwrap();
        let mut f = function(&MemRegion::new(8192), &memory);
        let mut seq = 0;
        let mut cfg = |f: &mut PciNvme<MemRegion>, reg: u64, size: u8, write: Option<u64>| {
            seq += 1;
            f.access(access(0, seq, Space::PciConfig, 0x1800 | reg, size, write))
                .value
        };
        assert_eq!(cfg(&mut f, 0, 4, None), 0x0010_1b36);
        assert_eq!(cfg(&mut f, 0x08, 4, None) >> 8, 0x01_08_02);
        assert_eq!(cfg(&mut f, 0x10, 4, None), BAR | 4);
        cfg(&mut f, 0x10, 4, Some(0xffff_ffff));
        assert_eq!(cfg(&mut f, 0x10, 4, None), 0xffff_c004, "the size: 16 KiB");
        cfg(&mut f, 0x10, 4, Some(0x1234_0000));
        assert_eq!(
            cfg(&mut f, 0x10, 4, None),
            BAR | 4,
            "the address stays fixed"
        );
        assert_eq!(cfg(&mut f, 0x3d, 1, None), 1, "INTA");
        // Memory decoding off: the BAR reads all ones.
        assert_eq!(
            f.access(access(0, 100, Space::Mmio, BAR + 8, 4, None))
                .value,
            0xffff_ffff
        );
        cfg(&mut f, 0x04, 2, Some(0x0006));
        assert_eq!(
            f.access(access(0, 101, Space::Mmio, BAR + 8, 4, None))
                .value,
            0x0001_0400,
            "VS"
        );
    }

    #[test]
    fn a_restarted_function_resumes_from_its_checkpoint_and_answers_a_repeat_from_the_record() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(WINDOW), 0x10000)]).unwrap();
        let region = MemRegion::new(16384);
        let mut f = function(&region, &memory);
        f.access(access(0, 1, Space::PciConfig, 0x1804, 2, Some(0x6)));
        // An admin queue, enabled.
        f.access(access(0, 2, Space::Mmio, BAR + 0x24, 4, Some(0x000f_000f)));
        f.access(access(0, 3, Space::Mmio, BAR + 0x28, 4, Some(WINDOW)));
        f.access(access(
            0,
            4,
            Space::Mmio,
            BAR + 0x30,
            4,
            Some(WINDOW + 0x1000),
        ));
        f.access(access(0, 5, Space::Mmio, BAR + 0x14, 4, Some(0x0046_0001)));
        assert_eq!(
            f.access(access(0, 6, Space::Mmio, BAR + 0x1c, 4, None))
                .value
                & 1,
            1
        );
        // An Identify controller command, rung by a doorbell the restart replays.
        let mut cmd = [0u8; 64];
        cmd[0] = 0x06;
        cmd[2] = 7;
        cmd[24..32].copy_from_slice(&(WINDOW + 0x2000).to_le_bytes());
        cmd[40] = 1;
        memory.write_slice(&cmd, GuestAddress(WINDOW)).unwrap();
        f.access(access(0, 7, Space::Mmio, BAR + 0x1000, 4, Some(1)));
        let cqe: [u8; 16] = memory.read_obj(GuestAddress(WINDOW + 0x1000)).unwrap();
        assert_eq!(u16::from_le_bytes([cqe[12], cqe[13]]), 7, "completed");
        drop(f);
        // A new process: enabled, with the queue where it was; the doorbell sent again is
        // answered from the record, not run a second time.
        let mut g = function(&region, &memory);
        assert_eq!(
            g.access(access(0, 7, Space::Mmio, BAR + 0x1000, 4, Some(1)))
                .value,
            0
        );
        assert_eq!(g.repeats, 1);
        assert_eq!(
            g.access(access(0, 8, Space::Mmio, BAR + 0x1c, 4, None))
                .value
                & 1,
            1
        );
        let second: [u8; 16] = memory.read_obj(GuestAddress(WINDOW + 0x1010)).unwrap();
        assert_eq!(second, [0; 16], "no second completion");
    }

    #[test]
    fn shadow_doorbells_arm_the_partitions_doorbells_and_a_kick_runs_the_io_queue() {
        let memory = GuestMemoryMmap::from_ranges(&[(GuestAddress(WINDOW), 0x10000)]).unwrap();
        let region = MemRegion::new(16384);
        let mut f = function_with(&region, &memory, 0x33, true);
        let mut seq = 0;
        let mut mmio = |f: &mut PciNvme<MemRegion>, offset: u64, write: Option<u64>| {
            seq += 1;
            f.access(access(0, seq, Space::Mmio, BAR + offset, 4, write))
        };
        f.access(access(0, 1000, Space::PciConfig, 0x1804, 2, Some(0x6)));
        mmio(&mut f, 0x24, Some(0x000f_000f));
        mmio(&mut f, 0x28, Some(WINDOW));
        mmio(&mut f, 0x30, Some(WINDOW + 0x1000));
        let reply = mmio(&mut f, 0x14, Some(0x0046_0001));
        assert_eq!(reply.next, Next::Doorbells { armed: false });
        // Admin commands: an I/O CQ at +0x3000, an I/O SQ at +0x4000 (8 entries each), then
        // shadow doorbells at +0x5000 and event indexes at +0x6000.
        let mut admin = |f: &mut PciNvme<MemRegion>, slot: u64, cmd: [u8; 64]| {
            memory
                .write_slice(&cmd, GuestAddress(WINDOW + slot * 64))
                .unwrap();
            mmio(f, 0x1000, Some(slot + 1))
        };
        let command = |opcode: u8, prp1: u64, prp2: u64, cdw10: u32, cdw11: u32| {
            let mut c = [0u8; 64];
            c[0] = opcode;
            c[2] = opcode;
            c[24..32].copy_from_slice(&prp1.to_le_bytes());
            c[32..40].copy_from_slice(&prp2.to_le_bytes());
            c[40..44].copy_from_slice(&cdw10.to_le_bytes());
            c[44..48].copy_from_slice(&cdw11.to_le_bytes());
            c
        };
        admin(&mut f, 0, command(0x05, WINDOW + 0x3000, 0, 1 | 7 << 16, 1));
        admin(
            &mut f,
            1,
            command(0x01, WINDOW + 0x4000, 0, 1 | 7 << 16, 1 | 1 << 16),
        );
        let reply = admin(
            &mut f,
            2,
            command(0x7c, WINDOW + 0x5000, WINDOW + 0x6000, 0, 0),
        );
        assert_eq!(
            reply.next,
            Next::Doorbells { armed: true },
            "the answer that turned shadow doorbells on arms them"
        );
        // A read of block 2 into +0x8000, its tail in the shadow page only; the doorbell
        // came as a signal.
        let mut read = command(0x02, WINDOW + 0x8000, 0, 2, 0);
        read[2] = 0x44;
        read[4] = 1; // namespace 1
        memory
            .write_slice(&read, GuestAddress(WINDOW + 0x4000))
            .unwrap();
        memory
            .write_obj(1u32, GuestAddress(WINDOW + 0x5008))
            .unwrap();
        assert!(f.kick());
        assert_eq!(f.kicks, 1);
        let cqe: [u8; 16] = memory.read_obj(GuestAddress(WINDOW + 0x3000)).unwrap();
        assert_eq!(cqe[12], 0x44, "completed");
        assert_eq!(cqe[14] >> 1, 0, "success");
        let data: [u8; 16] = memory.read_obj(GuestAddress(WINDOW + 0x8000)).unwrap();
        assert_eq!(data, [0x33; 16]);
        assert!(!f.kick(), "nothing new");
        // A new process resumes armed, and runs nothing twice.
        drop(f);
        let mut g = function_with(&region, &memory, 0x33, true);
        assert!(!g.kick());
        let reply = g.access(access(0, 500, Space::Mmio, BAR + 0x1c, 4, None));
        assert_eq!(reply.next, Next::Doorbells { armed: true });
    }
}
