//! The guest side of the partition's virtio-net function (`net=1`), a polling virtio 1.x
//! driver (virtio 1.2, 4.1 and 5.1):
//! 1. finds the function on PCI bus 0 by its ids (1af4:1041, modern virtio-net), reads its
//!    64-bit BAR 0/1 (the device places it) and sets Memory Space and Bus Master Enable;
//! 2. walks the vendor capabilities to the common configuration, notify, ISR and device
//!    configuration structures (all in BAR 0, checked);
//! 3. resets the device, negotiates VERSION_1 and MAC and nothing else: every other bit the
//!    device offers (offloads, EVENT_IDX, MRG_RXBUF...) is refused, since this driver does
//!    not implement it, so the header is the 12-byte `virtio_net_hdr_v1` with all zeros on
//!    transmit and every received frame fits one buffer;
//! 4. sets up the receive and transmit queues ([`QUEUE_ENTRIES`] each) in the shared window,
//!    posts every receive buffer, sets DRIVER_OK and reads the MAC;
//! 5. sends an ARP request for 10.0.2.2 from 10.0.2.15 and checks the reply; then sends
//!    `net-pings` ICMP echo requests, each with its own payload (length and bytes depend on
//!    its sequence number), and checks each reply byte for byte, with its IP and ICMP
//!    checksums.
//!
//! Completions are found by **polling the used rings** (guest memory is cheap to poll; the
//! function's INTx line stays masked at the IOAPIC). A request whose reply does not come
//! within [`REPLY_WAIT_CYCLES`] is sent again, up to [`ATTEMPTS`] times: a device service
//! killed under the guest loses what it held for it (the responder's reply), and its
//! successor resumes the queues. Every echo reply that arrives is checked, also a late one
//! for an earlier request (its payload is known from its sequence number): a corrupted frame
//! is a failure whenever it comes, a duplicate is only counted.
//!
//! This file holds the contract's facts, the queues and the set-up steps; `ping.rs` the
//! frames (ARP, echo requests and the checks of their replies).

mod ping;

use core::ptr::read_volatile;
use core::ptr::write_volatile;
use core::sync::atomic::fence;
use core::sync::atomic::AtomicU32;
use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering;

use crate::check;
use crate::pci_read;
use crate::pci_write;
use crate::put_dec;
use crate::put_hex;
use crate::put_hex_digits;
use crate::putc;
use crate::puts;
use crate::rdtsc;
use crate::FAILURES;

/// The options of the network step.
pub struct Config {
    /// `net=1`: run the step (and fail without a device).
    pub enabled: bool,
    /// `net-pings=N`: echo requests sent and checked.
    pub pings: u64,
    /// `window=0xADDR`: guest-physical base of the shared window.
    pub window: u64,
    /// `net-irq=1`: route the INTx line and check that a used ring interrupts (and that the
    /// ISR then says "queue").
    pub interrupt: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            enabled: false,
            pings: 4,
            window: crate::nvme::WINDOW,
            interrupt: false,
        }
    }
}

// ---- the contract's facts ----

const VENDOR_VIRTIO: u32 = 0x1af4;
/// 0x1040 + 1: a modern virtio network device.
const DEVICE_NET: u32 = 0x1041;
const PCI_COMMAND: u32 = 0x04;
const PCI_STATUS_CAPABILITIES: u32 = 1 << (16 + 4);
const PCI_BAR0: u32 = 0x10;
const PCI_BAR1: u32 = 0x14;
const PCI_CAPABILITIES: u32 = 0x34;
const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_BUS_MASTER: u32 = 1 << 2;
const CAP_VENDOR: u8 = 0x09;
/// virtio_pci_cap cfg_type values.
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const IDENTITY_MAPPED: u64 = 1 << 32;

// Common configuration (4.1.4.3).
const DEVICE_FEATURE_SELECT: usize = 0x00;
const DEVICE_FEATURE: usize = 0x04;
const DRIVER_FEATURE_SELECT: usize = 0x08;
const DRIVER_FEATURE: usize = 0x0c;
const NUM_QUEUES: usize = 0x12;
const DEVICE_STATUS: usize = 0x14;
const QUEUE_SELECT: usize = 0x16;
const QUEUE_SIZE: usize = 0x18;
const QUEUE_ENABLE: usize = 0x1c;
const QUEUE_NOTIFY_OFF: usize = 0x1e;
const QUEUE_DESC: usize = 0x20;
const QUEUE_DRIVER: usize = 0x28;
const QUEUE_DEVICE: usize = 0x30;
const ACKNOWLEDGE: u8 = 1;
const DRIVER: u8 = 2;
const DRIVER_OK: u8 = 4;
const FEATURES_OK: u8 = 8;

/// The features this driver implements: VERSION_1 (bit 32) and MAC (bit 5). Nothing else
/// is ever accepted, whatever the device offers.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const IMPLEMENTED: u64 = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC;

const RX: u16 = 0;
const TX: u16 = 1;
/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
/// num_buffers.
const HEADER: usize = 12;
const DESC_F_WRITE: u16 = 2;

// ---- the driver's choices ----

/// Entries per queue (fewer if the device's maximum is smaller).
const QUEUE_ENTRIES: u16 = 16;
/// Bytes of each frame buffer: a 1514-byte frame and its header fit.
const BUFFER: u64 = 2048;
/// Where the driver's structures sit in the shared window: past the NVMe driver's (which
/// ends below 0x30000), so that both can run in one guest.
const AREA: u64 = 0x20_0000;
/// Offsets from [`AREA`]: each queue's rings, one page each, and the buffers.
const RX_RINGS: u64 = 0x0000;
const TX_RINGS: u64 = 0x3000;
const RX_BUFFERS: u64 = 0x1_0000;
const TX_BUFFERS: u64 = 0x2_0000;
const AREA_END: u64 = TX_BUFFERS + QUEUE_ENTRIES as u64 * BUFFER;
const _: () = assert!(RX_BUFFERS + QUEUE_ENTRIES as u64 * BUFFER <= TX_BUFFERS);
const _: () = assert!(AREA + AREA_END <= crate::nvme::WINDOW_SIZE);

/// The TSC rate the time bounds assume (as the NVMe driver's): no slower clock makes them
/// shorter than they say.
const ASSUMED_TSC_HZ: u64 = 4_000_000_000;
/// A reply not back within this is asked for again (the request or its reply was lost, e.g.
/// with a killed service): 2 s at 4 GHz.
const REPLY_WAIT_CYCLES: u64 = 2 * ASSUMED_TSC_HZ;
/// Echoes between two progress lines.
const PROGRESS: u64 = 10;
/// Sends of one request before it has failed (a service restart costs one or two).
const ATTEMPTS: u32 = 8;

/// Interrupts taken at [`crate::arch::NET_VECTOR`] (counted by the trap handler).
pub static INTERRUPTS: AtomicU32 = AtomicU32::new(0);

/// Notify writes made (each an exit unless the partition delivers them as doorbell signals).
static NOTIFY_WRITES: AtomicU64 = AtomicU64::new(0);

/// A step that failed, with what it saw.
enum Failure {
    Value(&'static str, u64),
    /// No reply after [`ATTEMPTS`] sends.
    NoReply(&'static str, u64),
}

impl Failure {
    fn report(&self) {
        puts("guest: FAIL net: ");
        match *self {
            Failure::Value(what, v) => {
                puts(what);
                puts(": ");
                put_hex(v);
            }
            Failure::NoReply(what, n) => {
                puts(what);
                puts(" ");
                put_dec(n);
                puts(": no reply after every attempt");
            }
        }
        putc(b'\n');
        FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

// ---- memory ----

fn read8(at: u64) -> u8 {
    // SAFETY: `at` is a device register in the identity-mapped, user-accessible BAR, or a
    // byte of the shared window that only this driver and the device use.
    unsafe { read_volatile(at as *const u8) }
}

fn read16(at: u64) -> u16 {
    // SAFETY: as read8, aligned to 2.
    unsafe { read_volatile(at as *const u16) }
}

fn read32(at: u64) -> u32 {
    // SAFETY: as read8, aligned to 4.
    unsafe { read_volatile(at as *const u32) }
}

fn write8(at: u64, v: u8) {
    // SAFETY: as read8.
    unsafe { write_volatile(at as *mut u8, v) }
}

fn write16(at: u64, v: u16) {
    // SAFETY: as read16.
    unsafe { write_volatile(at as *mut u16, v) }
}

fn write32(at: u64, v: u32) {
    // SAFETY: as read32.
    unsafe { write_volatile(at as *mut u32, v) }
}

fn write64(at: u64, v: u64) {
    // SAFETY: as read8, aligned to 8.
    unsafe { write_volatile(at as *mut u64, v) }
}

fn copy_out(at: u64, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        write8(at + i as u64, *b);
    }
}

fn copy_in(at: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        *b = read8(at + i as u64);
    }
}

fn put_mac(mac: &[u8]) {
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            putc(b':');
        }
        put_hex_digits(u64::from(*b), 2);
    }
}

// ---- the device ----

/// One split virtqueue of the driver.
struct Queue {
    index: u16,
    entries: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    /// The next available index the driver publishes, and the used index it has seen.
    avail_idx: u16,
    seen_used: u16,
}

impl Queue {
    fn new(index: u16, rings: u64, entries: u16, notify: u64) -> Queue {
        Queue {
            index,
            entries,
            desc: rings,
            avail: rings + 0x1000,
            used: rings + 0x2000,
            notify,
            avail_idx: 0,
            seen_used: 0,
        }
    }

    /// Descriptor `head`: one buffer.
    fn describe(&self, head: u16, addr: u64, len: u32, flags: u16) {
        let at = self.desc + 16 * u64::from(head);
        write64(at, addr);
        write32(at + 8, len);
        write16(at + 12, flags);
        write16(at + 14, 0);
    }

    /// Makes `head` available (without a notification).
    fn publish(&mut self, head: u16) {
        write16(
            self.avail + 4 + 2 * u64::from(self.avail_idx % self.entries),
            head,
        );
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The entry (and the descriptor and buffer before it) before the index.
        fence(Ordering::SeqCst);
        write16(self.avail + 2, self.avail_idx);
    }

    fn kick(&self) {
        fence(Ordering::SeqCst);
        write16(self.notify, self.index);
        NOTIFY_WRITES.fetch_add(1, Ordering::Relaxed);
    }

    /// The next used entry (head, length), if the device published one.
    fn take_used(&mut self) -> Option<(u16, u32)> {
        let idx = read16(self.used + 2);
        if idx == self.seen_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let at = self.used + 4 + 8 * u64::from(self.seen_used % self.entries);
        self.seen_used = self.seen_used.wrapping_add(1);
        Some((read32(at) as u16, read32(at + 4)))
    }
}

/// Addresses of the structures the capabilities point at.
struct Structures {
    common: u64,
    isr: u64,
    notify: u64,
    notify_multiplier: u32,
    device: u64,
}

struct Nic {
    rx: Queue,
    tx: Queue,
    mac: [u8; 6],
    area: u64,
    /// What came back, for the summary.
    sent: u64,
    resent: u64,
    stale: u64,
    ignored: u64,
}

/// Runs the network step; failures are printed and counted, and end the step.
pub fn run(config: &Config) {
    if !config.enabled {
        return;
    }
    if let Err(f) = steps(config) {
        f.report();
    }
}

fn steps(config: &Config) -> Result<(), Failure> {
    let area = config.window + AREA;
    let Some(device) = (0..32).find(|&d| pci_read(0, d, 0, 0) == VENDOR_VIRTIO | DEVICE_NET << 16)
    else {
        check(false, "net: a virtio-net function (1af4:1041) on bus 0");
        return Ok(());
    };
    let (bar, line) = enable_function(device)?;
    let s = structures(device, bar)?;
    let mut nic = negotiate(&s, area)?;
    let Some(host_mac) = ping::arp(&mut nic)? else {
        return Ok(());
    };
    if config.interrupt {
        ping::interrupt_check(&mut nic, &s, &host_mac, line)?;
    }
    ping::echoes(&mut nic, &host_mac, config.pings)?;
    puts("guest: net: ");
    put_dec(nic.sent);
    puts(" frames sent, ");
    put_dec(nic.resent);
    puts(" sent again after a timeout, ");
    put_dec(nic.stale);
    puts(" late or repeated replies checked, ");
    put_dec(nic.ignored);
    puts(" other frames ignored\n");
    puts("guest: net: notify writes: ");
    put_dec(NOTIFY_WRITES.load(Ordering::Relaxed));
    putc(b'\n');
    Ok(())
}

/// Reads BAR 0/1 and turns on memory decoding and bus mastering (INTx left enabled); the
/// BAR's address and the interrupt line.
fn enable_function(device: u32) -> Result<(u64, u8), Failure> {
    let bar0 = pci_read(0, device, 0, PCI_BAR0);
    if bar0 & 1 != 0 || (bar0 >> 1) & 3 != 2 {
        return Err(Failure::Value(
            "BAR0 is not a 64-bit memory BAR",
            u64::from(bar0),
        ));
    }
    let address = u64::from(pci_read(0, device, 0, PCI_BAR1)) << 32 | u64::from(bar0 & !0xf);
    if address == 0 || address >= IDENTITY_MAPPED {
        return Err(Failure::Value("BAR0/1 is zero or above 4 GiB", address));
    }
    let command = pci_read(0, device, 0, PCI_COMMAND) & 0xffff;
    pci_write(
        0,
        device,
        0,
        PCI_COMMAND,
        command | COMMAND_MEMORY | COMMAND_BUS_MASTER,
    );
    let line = pci_read(0, device, 0, 0x3c) & 0xff;
    puts("guest: net: virtio-net at 00:");
    put_hex_digits(u64::from(device), 2);
    puts(".0, BAR0 at ");
    put_hex(address);
    puts(", interrupt line ");
    put_dec(u64::from(line));
    puts(" (the driver polls its used rings; net-irq=1 checks the line once)\n");
    Ok((address, line as u8))
}

fn config_byte(device: u32, offset: u32) -> u8 {
    (pci_read(0, device, 0, offset & !3) >> (8 * (offset & 3))) as u8
}

/// Walks the capability list to the four structures, each inside BAR 0.
fn structures(device: u32, bar: u64) -> Result<Structures, Failure> {
    if pci_read(0, device, 0, PCI_COMMAND) & PCI_STATUS_CAPABILITIES == 0 {
        return Err(Failure::Value("no capability list (status bit 4)", 0));
    }
    let mut found = [None::<(u32, u32)>; 5];
    let mut multiplier = 0;
    let mut at = u32::from(config_byte(device, PCI_CAPABILITIES)) & !3;
    let mut hops = 0;
    while at != 0 && hops < 48 {
        hops += 1;
        if config_byte(device, at) == CAP_VENDOR {
            let cfg_type = config_byte(device, at + 3);
            let bar_index = config_byte(device, at + 4);
            let offset = pci_read(0, device, 0, at + 8);
            let length = pci_read(0, device, 0, at + 12);
            if bar_index == 0
                && (1..=4).contains(&cfg_type)
                && found[usize::from(cfg_type)].is_none()
            {
                found[usize::from(cfg_type)] = Some((offset, length));
                if cfg_type == CAP_NOTIFY {
                    multiplier = pci_read(0, device, 0, at + 16);
                }
            }
        }
        at = u32::from(config_byte(device, at + 1)) & !3;
    }
    let need = |cfg_type: u8, what: &'static str| {
        found[usize::from(cfg_type)].ok_or(Failure::Value(what, u64::from(cfg_type)))
    };
    let common = need(CAP_COMMON, "no common configuration capability")?;
    let notify = need(CAP_NOTIFY, "no notify capability")?;
    let isr = need(CAP_ISR, "no ISR capability")?;
    let device_cfg = need(CAP_DEVICE, "no device configuration capability")?;
    if common.1 < 0x38 || device_cfg.1 < 6 {
        return Err(Failure::Value(
            "a structure is shorter than virtio's",
            u64::from(common.1),
        ));
    }
    puts("guest: ok   net: virtio capabilities: common at +");
    put_hex(u64::from(common.0));
    puts(", notify at +");
    put_hex(u64::from(notify.0));
    puts(" (multiplier ");
    put_dec(u64::from(multiplier));
    puts("), device at +");
    put_hex(u64::from(device_cfg.0));
    putc(b'\n');
    Ok(Structures {
        common: bar + u64::from(common.0),
        isr: bar + u64::from(isr.0),
        notify: bar + u64::from(notify.0),
        notify_multiplier: multiplier,
        device: bar + u64::from(device_cfg.0),
    })
}

fn features(common: u64) -> u64 {
    write32(common + DEVICE_FEATURE_SELECT as u64, 0);
    let low = read32(common + DEVICE_FEATURE as u64);
    write32(common + DEVICE_FEATURE_SELECT as u64, 1);
    let high = read32(common + DEVICE_FEATURE as u64);
    u64::from(high) << 32 | u64::from(low)
}

/// Resets, negotiates, sets up both queues, posts the receive buffers and sets DRIVER_OK.
fn negotiate(s: &Structures, area: u64) -> Result<Nic, Failure> {
    let c = s.common;
    let status = |v: u8| write8(c + DEVICE_STATUS as u64, v);
    status(0);
    let mut polls = 0u32;
    while read8(c + DEVICE_STATUS as u64) != 0 {
        polls += 1;
        if polls > 100_000 {
            return Err(Failure::Value("device status not 0 after the reset", 0));
        }
    }
    status(ACKNOWLEDGE);
    status(ACKNOWLEDGE | DRIVER);
    let offered = features(c);
    if offered & VIRTIO_F_VERSION_1 == 0 {
        return Err(Failure::Value(
            "the device does not offer VERSION_1",
            offered,
        ));
    }
    let accepted = offered & IMPLEMENTED;
    write32(c + DRIVER_FEATURE_SELECT as u64, 0);
    write32(c + DRIVER_FEATURE as u64, accepted as u32);
    write32(c + DRIVER_FEATURE_SELECT as u64, 1);
    write32(c + DRIVER_FEATURE as u64, (accepted >> 32) as u32);
    status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    let kept = read8(c + DEVICE_STATUS as u64) & FEATURES_OK != 0;
    puts("guest: net: device offers ");
    put_hex_digits(offered, 16);
    puts(", driver accepts ");
    put_hex_digits(accepted, 16);
    putc(b'\n');
    check(
        kept,
        "net: FEATURES_OK kept (VERSION_1 and MAC accepted, nothing unknown)",
    );
    if !kept {
        return Err(Failure::Value("FEATURES_OK refused", accepted));
    }
    let queues = read16(c + NUM_QUEUES as u64);
    if queues < 2 {
        return Err(Failure::Value("fewer than two queues", u64::from(queues)));
    }
    let mut made = [None, None];
    for (index, rings) in [(RX, RX_RINGS), (TX, TX_RINGS)] {
        write16(c + QUEUE_SELECT as u64, index);
        let max = read16(c + QUEUE_SIZE as u64);
        if max == 0 {
            return Err(Failure::Value("a queue of size 0", u64::from(index)));
        }
        let mut entries = QUEUE_ENTRIES;
        while entries > max {
            entries /= 2;
        }
        let rings = area + rings;
        for page in 0..3 {
            for w in 0..512 {
                write64(rings + page * 0x1000 + 8 * w, 0);
            }
        }
        write16(c + QUEUE_SIZE as u64, entries);
        for (register, address) in [
            (QUEUE_DESC, rings),
            (QUEUE_DRIVER, rings + 0x1000),
            (QUEUE_DEVICE, rings + 0x2000),
        ] {
            write32(c + register as u64, address as u32);
            write32(c + register as u64 + 4, (address >> 32) as u32);
        }
        let notify_off = read16(c + QUEUE_NOTIFY_OFF as u64);
        let notify = s.notify + u64::from(notify_off) * u64::from(s.notify_multiplier);
        write16(c + QUEUE_ENABLE as u64, 1);
        made[usize::from(index)] = Some(Queue::new(index, rings, entries, notify));
    }
    let (Some(mut rx), Some(tx)) = (made[0].take(), made[1].take()) else {
        return Err(Failure::Value("queues not made", 0));
    };
    for head in 0..rx.entries {
        let buffer = area + RX_BUFFERS + u64::from(head) * BUFFER;
        rx.describe(head, buffer, BUFFER as u32, DESC_F_WRITE);
        rx.publish(head);
    }
    status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    rx.kick();
    let mut mac = [0u8; 6];
    for (i, b) in mac.iter_mut().enumerate() {
        *b = read8(s.device + i as u64);
    }
    puts("guest: net: DRIVER_OK: ");
    put_dec(u64::from(rx.entries));
    puts(" receive and ");
    put_dec(u64::from(tx.entries));
    puts(" transmit entries at ");
    put_hex(rx.desc);
    puts(" and ");
    put_hex(tx.desc);
    puts(", MAC ");
    put_mac(&mac);
    putc(b'\n');
    Ok(Nic {
        rx,
        tx,
        mac,
        area,
        sent: 0,
        resent: 0,
        stale: 0,
        ignored: 0,
    })
}

impl Nic {
    /// Sends one frame (after a zero header) and waits until the device has taken it, so that
    /// its buffer can be written again.
    fn send(&mut self, frame: &[u8]) -> Result<(), Failure> {
        let head = self.tx.avail_idx % self.tx.entries;
        let buffer = self.area + TX_BUFFERS + u64::from(head) * BUFFER;
        copy_out(buffer, &[0u8; HEADER]);
        copy_out(buffer + HEADER as u64, frame);
        self.tx
            .describe(head, buffer, (HEADER + frame.len()) as u32, 0);
        self.tx.publish(head);
        self.tx.kick();
        self.sent += 1;
        let start = rdtsc();
        let mut kicked = start;
        loop {
            if let Some((used, _)) = self.tx.take_used() {
                if used != head {
                    return Err(Failure::Value(
                        "the transmit queue returned another buffer",
                        u64::from(used),
                    ));
                }
                return Ok(());
            }
            // A service restarted meanwhile resumes the queue; a kick now and then makes
            // sure it looks (and is an exit: the partition sees a live guest).
            let now = rdtsc();
            if now.wrapping_sub(kicked) > REPLY_WAIT_CYCLES {
                self.tx.kick();
                kicked = now;
            }
            if now.wrapping_sub(start) > u64::from(ATTEMPTS) * REPLY_WAIT_CYCLES {
                return Err(Failure::NoReply(
                    "transmit buffer not returned, frame",
                    self.sent,
                ));
            }
            core::hint::spin_loop();
        }
    }

    /// The next received frame (without its header) within [`REPLY_WAIT_CYCLES`], copied into
    /// `out`; its buffer is posted again at once.
    fn receive(&mut self, out: &mut [u8; BUFFER as usize]) -> Result<Option<usize>, Failure> {
        let start = rdtsc();
        loop {
            if let Some((head, len)) = self.rx.take_used() {
                if head >= self.rx.entries || len as u64 > BUFFER || (len as usize) < HEADER {
                    return Err(Failure::Value(
                        "a used receive entry out of range (head << 32 | length)",
                        u64::from(head) << 32 | u64::from(len),
                    ));
                }
                let buffer = self.area + RX_BUFFERS + u64::from(head) * BUFFER;
                let mut header = [0u8; HEADER];
                copy_in(buffer, &mut header);
                let frame = len as usize - HEADER;
                copy_in(buffer + HEADER as u64, &mut out[..frame]);
                self.rx.publish(head);
                self.rx.kick();
                // No offload was negotiated: no flags, no segmentation, one buffer.
                if header[..10] != [0; 10] || header[10..12] != [1, 0] {
                    return Err(Failure::Value(
                        "a received header with offload fields or num_buffers != 1",
                        u64::from(header[0])
                            | u64::from(header[1]) << 8
                            | u64::from(header[10]) << 16,
                    ));
                }
                return Ok(Some(frame));
            }
            if rdtsc().wrapping_sub(start) > REPLY_WAIT_CYCLES {
                return Ok(None);
            }
            core::hint::spin_loop();
        }
    }
}
