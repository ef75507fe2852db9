//! The guest side of the partition's NVMe function (`nvme=1`), a polling NVMe 1.4 driver
//! against the contract in docs/guest-partition.md:
//! 1. finds the function on PCI bus 0 by its class (0x010802), reads its 64-bit BAR 0/1 (the
//!    device places it; the driver never moves it) and its INTx line, and sets Memory Space
//!    and Bus Master Enable;
//! 2. resets and enables the controller in the specification's order (CC.EN=0, wait RDY=0,
//!    AQA/ASQ/ACQ, CC.EN=1, wait RDY=1), identifies the controller (model, serial) and
//!    namespace 1 (size, 4 KiB blocks);
//! 3. if the controller offers Doorbell Buffer Config (Identify OACS bit 8) and
//!    `nvme-dbbuf` is not 0, gives it a shadow doorbell page and an EventIdx page
//!    ([`use_shadow_doorbells`]); then asks for one I/O queue pair and creates it;
//! 4. with `nvme-irq=1`, routes the INTx line through the IOAPIC and takes the interrupt of
//!    an I/O completion;
//! 5. runs `nvme-passes` passes (`pass.rs`), each of which writes every block (up to
//!    `nvme-blocks`) with a pattern of (run, pass, block, word), flushes, reads every block
//!    back and compares every byte. Commands carry 1, 2, 8 and 3 blocks in turn, so PRP1
//!    alone, PRP1 + PRP2 and PRP lists are all used, on data pages that are not contiguous;
//!    [`SLOTS`] commands are in flight at once;
//! 6. prints how many MMIO writes of I/O queue doorbells it made and how many the shadow
//!    doorbells let it skip.
//!
//! This file holds the contract's facts, the layout of the window and the set-up steps;
//! `queue.rs` the submission and completion queues, doorbells and waits.
//!
//! The device reaches only the partition's shared window ([`WINDOW`], [`WINDOW_SIZE`];
//! `window=0xADDR` moves it): every queue, PRP list, identify page and data page lives there
//! ([`Layout`]), and nothing the device writes is read from anywhere else.
//!
//! Costs on PVM: guest memory is cheap to poll, every register access is an exit. So the
//! driver touches registers to ring doorbells (once per batch, and with shadow doorbells
//! only when the device's event index asks), and, while a completion is late, to read CSTS
//! now and then: that notices a fatal controller or a device that is gone (all ones), and its
//! exits show the partition's watchdog that the guest is alive. Waits are bounded by elapsed
//! TSC time ([`TIMEOUT_CYCLES`]), not by a number of polls: a device service restarted under
//! the guest stalls a command for seconds, and that is no failure.
//!
//! Nothing assumes that a command is done when its doorbell write returns: with shadow
//! doorbells the device learns of I/O doorbells through an ioeventfd (the write returns at
//! once, the device reads the shadow page later), or not at all until it looks (a skipped
//! write). Every command, admin ones too, is waited for by its completion's phase tag, and
//! the interrupt of `nvme-irq=1` by its own bounded wait.

mod pass;
mod queue;

use core::ptr::read_volatile;
use core::ptr::write_volatile;
use core::sync::atomic::fence;
use core::sync::atomic::AtomicU32;
use core::sync::atomic::Ordering;

use queue::reg_read32;
use queue::reg_write32;
use queue::reg_write64;
use queue::wait_ready;
use queue::Command;
use queue::Controller;

use crate::arch;
use crate::check;
use crate::pci_read;
use crate::pci_write;
use crate::put_dec;
use crate::put_hex;
use crate::put_hex_digits;
use crate::putc;
use crate::puts;
use crate::rdtsc;
use crate::syscall;
use crate::FAILURES;

/// Interrupts taken at [`arch::NVME_VECTOR`] (counted by the trap handler).
pub static INTERRUPTS: AtomicU32 = AtomicU32::new(0);

/// The options of the NVMe step.
pub struct Config {
    /// `nvme=1`: run the step, and fail without a device; `nvme=0`: skip it; unset: run it
    /// if the partition has an NVMe function.
    pub enabled: Option<bool>,
    /// `nvme-passes=N`: write-all, flush, read-all-and-verify N times.
    pub passes: u64,
    /// `nvme-blocks=N`: test at most the first N blocks of the namespace.
    pub max_blocks: u64,
    /// `nvme-irq=1`: route the INTx line and check that a completion interrupts.
    pub interrupt: bool,
    /// `nvme-dbbuf=1` (the default): use shadow doorbells if the controller offers them;
    /// `nvme-dbbuf=0`: ring every doorbell by MMIO.
    pub shadow_doorbells: bool,
    /// `window=0xADDR`: guest-physical base of the shared window.
    pub window: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            enabled: None,
            passes: 1,
            max_blocks: DEFAULT_MAX_BLOCKS,
            interrupt: false,
            shadow_doorbells: true,
            window: WINDOW,
        }
    }
}

// ---- the contract's facts ----

/// The partition's shared window: the only guest memory the device can reach.
pub const WINDOW: u64 = 0xB000_0000;
/// Bytes in the shared window (4 MiB).
pub const WINDOW_SIZE: u64 = 0x40_0000;
/// The loader's page tables identity-map the low 4 GiB: the window and BAR must lie there.
const IDENTITY_MAPPED: u64 = 1 << 32;
/// PCI class code of an NVMe controller (mass storage, non-volatile memory, NVMe).
const CLASS_NVME: u32 = 0x01_0802;
/// The vendor and device ids the contract names (QEMU's NVMe ids).
const VENDOR_ID: u32 = 0x1b36;
const DEVICE_ID: u32 = 0x0010;
/// Bytes of BAR 0 (registers, then doorbells).
const BAR_SIZE: u64 = 0x4000;
/// Memory pages (CC.MPS 0) and logical blocks (LBADS 12) are both 4 KiB.
const PAGE: u64 = 4096;
const LBADS: u32 = 12;
const BLOCK_WORDS: u64 = PAGE / 8;
/// The namespace under test.
const NSID: u32 = 1;

// Configuration space.
const PCI_COMMAND: u32 = 0x04;
const PCI_CLASS: u32 = 0x08;
const PCI_BAR0: u32 = 0x10;
const PCI_BAR1: u32 = 0x14;
const PCI_INTERRUPT: u32 = 0x3c;
const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_BUS_MASTER: u32 = 1 << 2;
const COMMAND_INTX_DISABLE: u32 = 1 << 10;

// Controller registers (NVMe 1.4, 3.1).
const REG_CAP: usize = 0x00;
const REG_VS: usize = 0x08;
const REG_CC: usize = 0x14;
const REG_CSTS: usize = 0x1c;
const REG_AQA: usize = 0x24;
const REG_ASQ: usize = 0x28;
const REG_ACQ: usize = 0x30;
const DOORBELLS: usize = 0x1000;
const CSTS_RDY: u32 = 1 << 0;
const CSTS_CFS: u32 = 1 << 1;
/// CC: EN, CSS 0 (NVM), MPS 0 (4 KiB), AMS 0, IOSQES 6 (64-byte entries), IOCQES 4 (16).
const CC_ENABLE: u32 = 1 | 6 << 16 | 4 << 20;

// Opcodes.
const ADMIN_CREATE_SQ: u8 = 0x01;
const ADMIN_CREATE_CQ: u8 = 0x05;
const ADMIN_IDENTIFY: u8 = 0x06;
const ADMIN_SET_FEATURES: u8 = 0x09;
const ADMIN_DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
const FEATURE_NUMBER_OF_QUEUES: u32 = 0x07;
const CNS_NAMESPACE: u32 = 0x00;
const CNS_CONTROLLER: u32 = 0x01;
/// Identify controller's OACS (bytes 256..258) bit 8: Doorbell Buffer Config is supported.
const OACS_DOORBELL_BUFFER_CONFIG: u16 = 1 << 8;
const IO_FLUSH: u8 = 0x00;
const IO_WRITE: u8 = 0x01;
const IO_READ: u8 = 0x02;

// ---- the driver's choices ----

/// Admin queue entries (each of SQ and CQ; fewer if CAP.MQES says so).
const ADMIN_ENTRIES: u16 = 16;
/// I/O queue entries (fewer if CAP.MQES says so, but more than [`SLOTS`]).
const IO_ENTRIES: u16 = 32;
/// The I/O queue pair's id (SQ 1 posts to CQ 1).
const IO_QID: u16 = 1;
/// I/O commands in flight at once: submitted together (one doorbell), then reaped.
const SLOTS: usize = 4;
/// Blocks per command, in turn: one page (PRP1), two (PRP1 + PRP2), eight and three (PRP2
/// points to a PRP list).
const TRANSFER_BLOCKS: [u64; 4] = [1, 2, 8, 3];
/// The largest of [`TRANSFER_BLOCKS`]: the data pages each slot owns.
const MAX_TRANSFER_BLOCKS: u64 = 8;
/// Blocks tested unless `nvme-blocks` says otherwise: the shipped disk (256 blocks) whole,
/// a big one on its first 4 MiB, so that a pass stays seconds long.
pub const DEFAULT_MAX_BLOCKS: u64 = 1024;

/// Where each structure lives in the shared window (offsets; all page-aligned).
const ADMIN_SQ: u64 = 0x0000;
const ADMIN_CQ: u64 = 0x1000;
const IO_SQ: u64 = 0x2000;
const IO_CQ: u64 = 0x3000;
const IDENTIFY: u64 = 0x4000;
/// Doorbell Buffer Config's two pages: the shadow doorbells the driver writes, and the
/// event indexes the device writes (each a doorbell's value at which it wants an MMIO write).
const SHADOW_DOORBELLS: u64 = 0x5000;
const EVENT_INDEXES: u64 = 0x6000;
/// One PRP list page per slot.
const PRP_LISTS: u64 = 0x8000;
/// [`MAX_TRANSFER_BLOCKS`] pages per slot, interleaved (page k of slot s at k * SLOTS + s),
/// so that no command's pages are contiguous: a device that reads PRP1 onwards as one run
/// fails the check.
const DATA: u64 = 0x1_0000;
const LAYOUT_END: u64 = DATA + SLOTS as u64 * MAX_TRANSFER_BLOCKS * PAGE;
const _: () = assert!(LAYOUT_END <= WINDOW_SIZE);
const _: () = assert!(PRP_LISTS + SLOTS as u64 * PAGE <= DATA);
const _: () = assert!(EVENT_INDEXES + PAGE <= PRP_LISTS);
const _: () = assert!(IO_ENTRIES as usize > SLOTS);

/// The TSC rate the time bounds assume: no slower clock makes them shorter than they say.
/// (The partition's CPUID reports no TSC frequency: leaves 0x15 and 0x16 read zero here.)
const ASSUMED_TSC_HZ: u64 = 4_000_000_000;
/// A command (or a CSTS change) not done after 60 s has failed: long enough for a device
/// service to be killed, restarted and to replay what it had taken.
const TIMEOUT_CYCLES: u64 = 60 * ASSUMED_TSC_HZ;
/// While a completion is late, CSTS is read this often (an exit: the partition's watchdog,
/// 30 s without one, must not take a waiting guest for a hung one).
const STATUS_CHECK_CYCLES: u64 = ASSUMED_TSC_HZ / 2;
/// ...and a "still waiting" line printed this often.
const WAIT_REPORT_CYCLES: u64 = 10 * ASSUMED_TSC_HZ;
/// How long the interrupt of a completion may take (it comes in microseconds).
const INTERRUPT_WAIT_CYCLES: u64 = 10_000_000_000;

/// A step of the driver that failed, with what it saw.
enum Failure {
    /// A value the driver cannot work with.
    Value(&'static str, u64),
    /// Nothing happened within [`TIMEOUT_CYCLES`].
    Timeout(&'static str),
    /// CSTS says the controller failed (CFS), or reads all ones (the device is gone).
    Controller(&'static str, u32),
    /// A command completed with an error status (the 15-bit status field).
    Status(&'static str, u16),
    /// A completion that answers no command in flight (its CID).
    Cid(&'static str, u16),
    /// A completion from the wrong submission queue (its SQID).
    Queue(&'static str, u16),
}

impl Failure {
    fn report(&self) {
        puts("guest: FAIL nvme: ");
        match *self {
            Failure::Value(what, v) => {
                puts(what);
                puts(": 0x");
                put_hex_digits(v, if v > u64::from(u32::MAX) { 16 } else { 8 });
            }
            Failure::Timeout(what) => {
                puts(what);
                puts(": no answer within the timeout (60 s at 4 GHz)");
            }
            Failure::Controller(what, csts) => {
                puts(what);
                puts(": CSTS ");
                put_hex(u64::from(csts));
                puts(if csts == u32::MAX {
                    " (all ones: nothing answers the BAR any more)"
                } else {
                    " (CFS: the controller reports a fatal error)"
                });
            }
            Failure::Status(what, status) => {
                puts(what);
                puts(": status ");
                put_hex(u64::from(status));
                puts(" (type ");
                put_dec(u64::from((status >> 8) & 7));
                puts(", code ");
                put_hex(u64::from(status & 0xff));
                putc(b')');
            }
            Failure::Cid(what, cid) => {
                puts(what);
                puts(": completion for command id ");
                put_dec(u64::from(cid));
                puts(", which is not in flight");
            }
            Failure::Queue(what, sqid) => {
                puts(what);
                puts(": completion names submission queue ");
                put_dec(u64::from(sqid));
            }
        }
        putc(b'\n');
        FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

// ---- the shared window ----

/// Guest-physical addresses of the driver's structures in the shared window (identity-mapped,
/// so each is also the address the driver uses).
#[derive(Clone, Copy)]
struct Layout {
    window: u64,
}

impl Layout {
    fn at(self, offset: u64) -> u64 {
        self.window + offset
    }

    /// The PRP list page of `slot`.
    fn prp_list(self, slot: usize) -> u64 {
        self.at(PRP_LISTS + slot as u64 * PAGE)
    }

    /// Data page `k` of `slot`.
    fn data_page(self, slot: usize, k: u64) -> u64 {
        self.at(DATA + (k * SLOTS as u64 + slot as u64) * PAGE)
    }
}

fn shared_read32(gpa: u64) -> u32 {
    // SAFETY: `gpa` is in the shared window: identity-mapped, user-accessible guest memory
    // that only this driver and the device use, aligned to 4.
    unsafe { read_volatile(gpa as *const u32) }
}

fn shared_read64(gpa: u64) -> u64 {
    // SAFETY: as shared_read32, aligned to 8.
    unsafe { read_volatile(gpa as *const u64) }
}

fn shared_write32(gpa: u64, value: u32) {
    // SAFETY: as shared_read32.
    unsafe { write_volatile(gpa as *mut u32, value) }
}

fn shared_write64(gpa: u64, value: u64) {
    // SAFETY: as shared_read64.
    unsafe { write_volatile(gpa as *mut u64, value) }
}

fn zero_page(gpa: u64) {
    for w in 0..BLOCK_WORDS {
        shared_write64(gpa + 8 * w, 0);
    }
}

// ---- the steps ----

/// Runs the NVMe step; failures are printed and counted, and end the step.
pub fn run(config: &Config) {
    if let Err(f) = steps(config) {
        f.report();
    }
}

fn steps(config: &Config) -> Result<(), Failure> {
    let window = config.window;
    if !window.is_multiple_of(PAGE) || window + WINDOW_SIZE > IDENTITY_MAPPED {
        return Err(Failure::Value(
            "window= must be page-aligned and below 4 GiB",
            window,
        ));
    }
    let layout = Layout { window };
    let Some(device) = (0..32).find(|&d| {
        pci_read(0, d, 0, 0) != u32::MAX && pci_read(0, d, 0, PCI_CLASS) >> 8 == CLASS_NVME
    }) else {
        if config.enabled.is_none() {
            crate::puts("guest: nvme: no NVMe function on this partition (skipped)\n");
            return Ok(());
        }
        check(false, "nvme: a PCI function of class 010802 on bus 0");
        return Ok(());
    };
    let (bar, line) = enable_function(device)?;
    check_window(layout)?;
    let mut controller = enable(bar, layout)?;
    let identity = identify(&mut controller)?;
    use_shadow_doorbells(&mut controller, config, &identity)?;
    create_io_queues(&mut controller)?;
    let mut io = || {
        if config.interrupt {
            interrupt_check(&mut controller, line)?;
        }
        pass::run_passes(&mut controller, config, &identity)
    };
    let result = io();
    let counts = controller.doorbell_counts();
    puts("guest: nvme: I/O doorbells: ");
    put_dec(counts.written);
    puts(" written, ");
    put_dec(counts.skipped);
    puts(" skipped\n");
    result
}

/// Reads the function's BAR and interrupt line, and turns on memory decoding and bus
/// mastering (and INTx, by clearing Interrupt Disable). The BAR's address and the line.
fn enable_function(device: u32) -> Result<(usize, u8), Failure> {
    let id = pci_read(0, device, 0, 0);
    puts("guest: nvme: 00:");
    put_hex_digits(u64::from(device), 2);
    puts(".0 ");
    put_hex_digits(u64::from(id & 0xffff), 4);
    putc(b':');
    put_hex_digits(u64::from(id >> 16), 4);
    puts(" class 010802\n");
    check(
        id == VENDOR_ID | DEVICE_ID << 16,
        "nvme: function is 1b36:0010",
    );
    let bar0 = pci_read(0, device, 0, PCI_BAR0);
    if bar0 & 1 != 0 || (bar0 >> 1) & 3 != 2 {
        return Err(Failure::Value(
            "BAR0 is not a 64-bit memory BAR",
            u64::from(bar0),
        ));
    }
    let bar1 = pci_read(0, device, 0, PCI_BAR1);
    let address = u64::from(bar1) << 32 | u64::from(bar0 & !0xf);
    let placed = address != 0 && address.is_multiple_of(BAR_SIZE);
    if !placed || address + BAR_SIZE > IDENTITY_MAPPED {
        return Err(Failure::Value(
            "BAR0/1 is zero, not 16 KiB-aligned, or above 4 GiB",
            address,
        ));
    }
    let interrupt = pci_read(0, device, 0, PCI_INTERRUPT);
    let (line, pin) = (interrupt as u8, (interrupt >> 8) as u8);
    let command = pci_read(0, device, 0, PCI_COMMAND) & 0xffff;
    // The status half (RW1C) is written as zeros: nothing in it changes.
    let enabled = (command | COMMAND_MEMORY | COMMAND_BUS_MASTER) & !COMMAND_INTX_DISABLE;
    pci_write(0, device, 0, PCI_COMMAND, enabled);
    let now = pci_read(0, device, 0, PCI_COMMAND) & 0xffff;
    puts("guest: nvme: BAR0 at ");
    put_hex(address);
    puts(", interrupt line ");
    put_dec(u64::from(line));
    puts(" pin ");
    put_dec(u64::from(pin));
    puts(", command ");
    put_hex(u64::from(now));
    putc(b'\n');
    check(
        now & (COMMAND_MEMORY | COMMAND_BUS_MASTER) == COMMAND_MEMORY | COMMAND_BUS_MASTER,
        "nvme: memory space and bus master enabled",
    );
    Ok((address as usize, line))
}

/// The window must be memory: a word written there reads back (where nothing is mapped,
/// reads give all ones).
fn check_window(layout: Layout) -> Result<(), Failure> {
    for offset in [0, LAYOUT_END - 8] {
        let at = layout.at(offset);
        shared_write64(at, 0x5A5A_0000_0000_A5A5 ^ at);
        if shared_read64(at) != 0x5A5A_0000_0000_A5A5 ^ at {
            return Err(Failure::Value(
                "the shared window is not memory (a write there does not read back) at",
                at,
            ));
        }
    }
    Ok(())
}

/// Resets and enables the controller with its admin queue in the window.
fn enable(bar: usize, layout: Layout) -> Result<Controller, Failure> {
    let (cap_low, cap_high) = (reg_read32(bar, REG_CAP), reg_read32(bar, REG_CAP + 4));
    let cap = u64::from(cap_high) << 32 | u64::from(cap_low);
    let vs = reg_read32(bar, REG_VS);
    if cap == u64::MAX {
        return Err(Failure::Value(
            "CAP reads all ones (no device behind the BAR)",
            cap,
        ));
    }
    let mqes = (cap & 0xffff) as u16;
    let timeout = (cap >> 24) & 0xff;
    let dstrd = (cap >> 32) & 0xf;
    puts("guest: nvme: CAP ");
    put_hex_digits(cap, 16);
    puts(" (MQES ");
    put_dec(u64::from(mqes));
    puts(", TO ");
    put_dec(timeout);
    puts(", DSTRD ");
    put_dec(dstrd);
    puts("), VS ");
    put_hex(u64::from(vs));
    putc(b'\n');
    if (cap >> 37) & 1 == 0 {
        return Err(Failure::Value("CAP.CSS lacks the NVM command set", cap));
    }
    if (cap >> 48) & 0xf != 0 {
        return Err(Failure::Value("CAP.MPSMIN is above 4 KiB pages", cap));
    }
    let stride = 4usize << dstrd;
    if DOORBELLS + (2 * usize::from(IO_QID) + 2) * stride > BAR_SIZE as usize {
        return Err(Failure::Value(
            "CAP.DSTRD puts queue 1's doorbells past the BAR",
            dstrd,
        ));
    }
    // MQES is zero-based; a queue of n entries holds n - 1 commands.
    let largest = u32::from(mqes) + 1;
    let admin_entries = u32::from(ADMIN_ENTRIES).min(largest) as u16;
    let io_entries = u32::from(IO_ENTRIES).min(largest) as u16;
    if admin_entries < 2 || usize::from(io_entries) <= SLOTS {
        return Err(Failure::Value("CAP.MQES allows too small queues", cap));
    }
    // CAP.TO is in 500 ms units; never wait less than the general timeout.
    let ready_cycles = TIMEOUT_CYCLES.max(timeout * ASSUMED_TSC_HZ / 2);

    reg_write32(bar, REG_CC, 0);
    wait_ready(bar, false, ready_cycles, "CSTS.RDY after CC.EN=0")?;
    for offset in [
        ADMIN_SQ,
        ADMIN_CQ,
        IO_SQ,
        IO_CQ,
        IDENTIFY,
        SHADOW_DOORBELLS,
        EVENT_INDEXES,
    ] {
        zero_page(layout.at(offset));
    }
    let aqa = u32::from(admin_entries - 1) << 16 | u32::from(admin_entries - 1);
    reg_write32(bar, REG_AQA, aqa);
    reg_write64(bar, REG_ASQ, layout.at(ADMIN_SQ));
    reg_write64(bar, REG_ACQ, layout.at(ADMIN_CQ));
    fence(Ordering::SeqCst);
    reg_write32(bar, REG_CC, CC_ENABLE);
    wait_ready(bar, true, ready_cycles, "CSTS.RDY after CC.EN=1")?;
    puts("guest: nvme: controller ready: admin queues of ");
    put_dec(u64::from(admin_entries));
    puts(" entries at ");
    put_hex(layout.at(ADMIN_SQ));
    puts(" (SQ) and ");
    put_hex(layout.at(ADMIN_CQ));
    puts(" (CQ)\n");
    Ok(Controller::new(
        bar,
        stride,
        layout,
        (admin_entries, io_entries),
    ))
}

/// What identify says that the passes need.
struct Identity {
    /// NSZE of namespace 1.
    blocks: u64,
    /// The largest transfer (MDTS) in blocks; u64::MAX when the controller sets no limit.
    max_transfer_blocks: u64,
    /// OACS bit 8: the controller takes Doorbell Buffer Config.
    doorbell_buffer_config: bool,
}

/// Identify controller and namespace 1, through the identify page of the window.
fn identify(c: &mut Controller) -> Result<Identity, Failure> {
    let page = c.layout.at(IDENTIFY);
    let mut data = [0u8; PAGE as usize];
    let command = Command::new(ADMIN_IDENTIFY, 0)
        .prp(page, 0)
        .cdw(10, CNS_CONTROLLER);
    c.admin(command, "Identify controller")?;
    copy_from_shared(page, &mut data);
    let serial = trimmed(&data[4..24]);
    let model = trimmed(&data[24..64]);
    puts("guest: nvme: model \"");
    put_text(model);
    puts("\", serial \"");
    put_text(serial);
    puts("\", firmware \"");
    put_text(trimmed(&data[64..72]));
    puts("\"\n");
    check(!model.is_empty(), "nvme: Identify controller gives a model");
    check(
        !serial.is_empty(),
        "nvme: Identify controller gives a serial",
    );
    let (sqes, cqes) = (data[512], data[513]);
    check(
        sqes & 0xf <= 6 && 6 <= sqes >> 4 && cqes & 0xf <= 4 && 4 <= cqes >> 4,
        "nvme: controller takes 64-byte submission and 16-byte completion entries",
    );
    let oacs = u16::from_le_bytes([data[256], data[257]]);
    let doorbell_buffer_config = oacs & OACS_DOORBELL_BUFFER_CONFIG != 0;
    let namespaces = u32::from_le_bytes([data[516], data[517], data[518], data[519]]);
    check(namespaces >= 1, "nvme: controller has a namespace");
    // MDTS: 2^MDTS pages of CAP.MPSMIN (4 KiB, checked), 0 for no limit.
    let mdts = data[77];
    let max_transfer_blocks = match mdts {
        0 => u64::MAX,
        m if m < 32 => 1 << m,
        _ => u64::MAX,
    };

    zero_page(page);
    let command = Command::new(ADMIN_IDENTIFY, NSID)
        .prp(page, 0)
        .cdw(10, CNS_NAMESPACE);
    c.admin(command, "Identify namespace 1")?;
    copy_from_shared(page, &mut data);
    let nsze = u64::from_le_bytes([
        data[0], data[1], data[2], data[3], data[4], data[5], data[6], data[7],
    ]);
    let (nlbaf, format) = (data[25], data[26] & 0xf);
    if format > nlbaf {
        return Err(Failure::Value(
            "FLBAS names an LBA format past NLBAF",
            u64::from(format),
        ));
    }
    let at = 128 + 4 * usize::from(format);
    let lbaf = u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]);
    let (metadata, lbads) = (lbaf & 0xffff, (lbaf >> 16) & 0xff);
    puts("guest: nvme: namespace 1: ");
    put_dec(nsze);
    puts(" blocks of ");
    put_dec(1u64.checked_shl(lbads).unwrap_or(0));
    puts(" bytes (LBA format ");
    put_dec(u64::from(format));
    puts("), ");
    put_dec(nsze.saturating_mul(PAGE) >> 10);
    puts(" KiB\n");
    check(nsze > 0, "nvme: namespace 1 has blocks");
    if lbads != LBADS || metadata != 0 {
        return Err(Failure::Value(
            "namespace 1's LBA format is not 4096-byte blocks without metadata",
            u64::from(lbaf),
        ));
    }
    Ok(Identity {
        blocks: nsze,
        max_transfer_blocks,
        doorbell_buffer_config,
    })
}

fn copy_from_shared(gpa: u64, out: &mut [u8; PAGE as usize]) {
    for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&shared_read64(gpa + 8 * i as u64).to_le_bytes());
    }
}

/// An identify string without its padding (spaces, NULs).
fn trimmed(bytes: &[u8]) -> &[u8] {
    let mut end = bytes.len();
    while end > 0 && (bytes[end - 1] == b' ' || bytes[end - 1] == 0) {
        end -= 1;
    }
    &bytes[..end]
}

fn put_text(bytes: &[u8]) {
    for b in bytes {
        putc(if b.is_ascii_graphic() || *b == b' ' {
            *b
        } else {
            b'?'
        });
    }
}

/// Doorbell Buffer Config (NVMe 1.3+, admin opcode 0x7C), before any I/O queue exists, as
/// Linux sends it: PRP1 the shadow doorbell page, PRP2 the EventIdx page, both zeroed (a
/// queue's doorbells start at 0). From then on I/O queue doorbells go through the shadow
/// page (`queue.rs`); the admin queue keeps MMIO doorbells. Not offered, or `nvme-dbbuf=0`:
/// MMIO doorbells throughout. A controller that offers the command and fails it is a failed
/// check, and the driver goes on with MMIO doorbells (as Linux does).
fn use_shadow_doorbells(
    c: &mut Controller,
    config: &Config,
    identity: &Identity,
) -> Result<(), Failure> {
    if !config.shadow_doorbells {
        puts("guest: nvme: doorbells: MMIO (nvme-dbbuf=0)\n");
        return Ok(());
    }
    if !identity.doorbell_buffer_config {
        puts("guest: nvme: doorbells: MMIO (the controller does not offer Doorbell Buffer Config, OACS bit 8)\n");
        return Ok(());
    }
    if c.doorbell_bytes(IO_QID) > PAGE {
        puts("guest: nvme: doorbells: MMIO (CAP.DSTRD spreads queue 1's doorbells past one shadow page)\n");
        return Ok(());
    }
    let (shadow, events) = (c.layout.at(SHADOW_DOORBELLS), c.layout.at(EVENT_INDEXES));
    let command = Command::new(ADMIN_DOORBELL_BUFFER_CONFIG, 0).prp(shadow, events);
    match c.admin(command, "Doorbell Buffer Config") {
        Ok(_) => {}
        Err(f @ Failure::Status(..)) => {
            f.report();
            puts("guest: nvme: doorbells: MMIO (Doorbell Buffer Config failed)\n");
            return Ok(());
        }
        Err(f) => return Err(f),
    }
    c.use_shadow_doorbells(shadow, events);
    puts("guest: ok   nvme: shadow doorbells at ");
    put_hex(shadow);
    puts(" (event index at ");
    put_hex(events);
    puts(")\n");
    Ok(())
}

/// Asks for one I/O queue pair, creates its completion queue (interrupts on) and its
/// submission queue.
fn create_io_queues(c: &mut Controller) -> Result<(), Failure> {
    // Number of queues: one SQ and one CQ (both zero-based); the answer is what is granted.
    let command = Command::new(ADMIN_SET_FEATURES, 0)
        .cdw(10, FEATURE_NUMBER_OF_QUEUES)
        .cdw(11, 0);
    let granted = c.admin(command, "Set Features (number of queues)")?;
    puts("guest: nvme: controller grants ");
    put_dec(u64::from(granted & 0xffff) + 1);
    puts(" submission and ");
    put_dec(u64::from(granted >> 16) + 1);
    puts(" completion queues\n");

    let size = u32::from(c.io.entries - 1) << 16 | u32::from(IO_QID);
    // PC (physically contiguous), IEN (interrupts enabled), IV 0.
    let command = Command::new(ADMIN_CREATE_CQ, 0)
        .prp(c.io.cq, 0)
        .cdw(10, size)
        .cdw(11, 1 | 1 << 1);
    c.admin(command, "Create I/O completion queue 1")?;
    // PC, QPRIO 0, posting to completion queue IO_QID.
    let command = Command::new(ADMIN_CREATE_SQ, 0)
        .prp(c.io.sq, 0)
        .cdw(10, size)
        .cdw(11, u32::from(IO_QID) << 16 | 1);
    c.admin(command, "Create I/O submission queue 1")?;
    puts("guest: nvme: I/O queue pair 1 created: ");
    put_dec(u64::from(c.io.entries));
    puts(" entries, SQ at ");
    put_hex(c.io.sq);
    puts(", CQ at ");
    put_hex(c.io.cq);
    putc(b'\n');
    Ok(())
}

/// Routes the function's INTx line through the IOAPIC, and checks that the completion of an
/// I/O command (a Flush) interrupts. The line is masked again afterwards: the passes poll.
fn interrupt_check(c: &mut Controller, line: u8) -> Result<(), Failure> {
    if line >= crate::IOAPIC_LINES {
        return Err(Failure::Value(
            "the interrupt line is not an IOAPIC input",
            u64::from(line),
        ));
    }
    crate::route_line(line, arch::NVME_VECTOR);
    let before = INTERRUPTS.load(Ordering::SeqCst);
    syscall(crate::SYS_STI, 0, 0);
    let flushed = c.io(Command::new(IO_FLUSH, NSID), "Flush (interrupt check)");
    let start = rdtsc();
    let mut taken = false;
    while flushed.is_ok() && rdtsc().wrapping_sub(start) < INTERRUPT_WAIT_CYCLES {
        if INTERRUPTS.load(Ordering::SeqCst) != before {
            taken = true;
            break;
        }
        core::hint::spin_loop();
    }
    syscall(crate::SYS_CLI, 0, 0);
    crate::mask_line(line);
    flushed?;
    puts("guest: nvme: interrupt line ");
    put_dec(u64::from(line));
    puts(" routed to vector 0x25: ");
    put_dec(u64::from(
        INTERRUPTS.load(Ordering::SeqCst).wrapping_sub(before),
    ));
    puts(" interrupts\n");
    check(
        taken,
        "nvme: interrupt of an I/O completion taken (INTx -> IOAPIC -> vector 0x25)",
    );
    Ok(())
}
