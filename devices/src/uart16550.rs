//! COM1: a 16550A UART at ports 0x3F8..=0x3FF on IOAPIC line 4, as Linux's 8250 driver
//! probes and drives it (it finds a 16550A with a 16-byte FIFO) and as firmware and early
//! consoles poll it.
//!
//! Transmission is instant: a byte written to THR goes to the [`Console`] at once, so the
//! line status always reports the transmitter empty (THRE and TEMT) and baud rate, word
//! length and flow control do not matter (they are stored and read back). Reception has no
//! source yet: [`Uart::receive`] is the entry point a later input channel will use, with the
//! 16550's receive FIFO behind it (16 bytes with FIFOs on, one without; more is an overrun).
//!
//! Interrupts: the UART's output is pending while an enabled condition holds (line status
//! error, received data, THR empty, in that priority, as IIR reports it). The IOAPIC line is
//! edge-triggered, so every access that takes the output from idle to pending returns
//! [`Irq::Rising`] and the caller raises line 4 once. The THR-empty condition follows the
//! 16550 (and QEMU, whose behaviour Windows and Linux are known to rely on): it is set when
//! THR empties and when IER's THRI bit is turned on, cleared when IIR is read while reporting
//! it, and cleared by turning THRI off.
//!
//! A write to THR clears the condition and, THR emptying at once, sets it again: if nothing
//! else was pending, the output falls and rises within the write, which is a new edge, as on
//! a real 16550 whose transmitter is idle. A driver that refills THR on LSR's THRE without
//! reading IIR first (Linux does, when it services received data and transmits in one
//! interrupt) therefore still gets its next THR-empty interrupt; an output that stayed high
//! across the write would never give the edge-triggered line another edge.
//!
//! What it does not model: modem status changes (MSR's delta bits are never set; outside
//! loopback the modem lines read as a connected, ready peer), receive timeouts and FIFO
//! trigger levels (received data interrupts at once), breaks and parity/framing errors.
//!
//! Accesses wider than a byte act on the register at their address with the low byte of the
//! value; reads return that register's byte zero-extended. (A real 16550 sits on an 8-bit
//! bus; no driver makes such accesses.)

use std::collections::VecDeque;

use ipc_defs::services::intercept::Interrupt;

/// Where the UART's output goes.
pub trait Console {
    /// The guest transmitted `byte`.
    fn transmit(&mut self, byte: u8);
}

/// COM1's first port.
pub const COM1: u16 = 0x3f8;
/// COM1's last port (eight registers).
pub const COM1_LAST: u16 = COM1 + 7;
/// COM1's interrupt: ISA IRQ 4, on the IOAPIC input of the same number.
pub const COM1_IRQ: Interrupt = Interrupt::Line(4);

/// The receive FIFO of a 16550A.
pub const RX_FIFO: usize = 16;

// Register offsets from the base port.
/// Receive buffer (read) / transmit holding (write); divisor latch low with DLAB.
pub const RBR_THR: u16 = 0;
/// Interrupt enable; divisor latch high with DLAB.
pub const IER: u16 = 1;
/// Interrupt identification (read) / FIFO control (write).
pub const IIR_FCR: u16 = 2;
pub const LCR: u16 = 3;
pub const MCR: u16 = 4;
pub const LSR: u16 = 5;
pub const MSR: u16 = 6;
pub const SCR: u16 = 7;

/// IER: received data available.
pub const IER_RDI: u8 = 0x01;
/// IER: transmit holding register empty.
pub const IER_THRI: u8 = 0x02;
/// IER: receiver line status.
pub const IER_RLSI: u8 = 0x04;
/// IER: modem status.
pub const IER_MSI: u8 = 0x08;
/// IER bits a 16550 has; the others read as zero (Linux's probe checks both).
const IER_MASK: u8 = 0x0f;

/// IIR: no interrupt pending.
pub const IIR_NO_INT: u8 = 0x01;
pub const IIR_THRI: u8 = 0x02;
pub const IIR_RDI: u8 = 0x04;
pub const IIR_RLSI: u8 = 0x06;
/// IIR's interrupt identification bits.
const IIR_ID: u8 = 0x0f;
/// IIR bits 6-7: FIFOs enabled (a 16550A; a 16450 reads 0 here).
pub const IIR_FIFOS: u8 = 0xc0;

pub const FCR_ENABLE_FIFO: u8 = 0x01;
pub const FCR_CLEAR_RCVR: u8 = 0x02;

/// LCR: divisor latch access.
pub const LCR_DLAB: u8 = 0x80;

pub const MCR_DTR: u8 = 0x01;
pub const MCR_RTS: u8 = 0x02;
pub const MCR_OUT1: u8 = 0x04;
pub const MCR_OUT2: u8 = 0x08;
pub const MCR_LOOP: u8 = 0x10;
/// MCR bits a 16550 has.
const MCR_MASK: u8 = 0x1f;

/// LSR: data ready.
pub const LSR_DR: u8 = 0x01;
/// LSR: overrun error.
pub const LSR_OE: u8 = 0x02;
/// LSR: transmit holding register empty.
pub const LSR_THRE: u8 = 0x20;
/// LSR: transmitter empty.
pub const LSR_TEMT: u8 = 0x40;

pub const MSR_CTS: u8 = 0x10;
pub const MSR_DSR: u8 = 0x20;
pub const MSR_RI: u8 = 0x40;
pub const MSR_DCD: u8 = 0x80;

/// Divisor after reset: 12, i.e. 9600 baud from the PC's 1.8432 MHz clock.
const RESET_DIVISOR: u16 = 12;

/// What an access did to the UART's interrupt output.
#[must_use = "a rising edge must be delivered as an interrupt"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Irq {
    /// No new edge (the output stayed idle, stayed pending, or went idle).
    Unchanged,
    /// The output went from idle to pending: raise [`COM1_IRQ`] once.
    Rising,
}

/// The 16550's registers and receive FIFO.
#[derive(Debug)]
pub struct Uart {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    divisor: u16,
    fifos: bool,
    /// The THR-empty interrupt condition (see the module header).
    thre_pending: bool,
    /// A received byte was lost since LSR was last read.
    overrun: bool,
    rx: VecDeque<u8>,
    /// The interrupt output as of the last access.
    output: bool,
}

impl Default for Uart {
    fn default() -> Self {
        Uart::new()
    }
}

impl Uart {
    /// A UART as after reset: no interrupts enabled, FIFOs off, 9600 baud.
    pub fn new() -> Uart {
        Uart {
            ier: 0,
            lcr: 0,
            mcr: 0,
            scr: 0,
            divisor: RESET_DIVISOR,
            fifos: false,
            thre_pending: false,
            overrun: false,
            rx: VecDeque::with_capacity(RX_FIFO),
            output: false,
        }
    }

    /// Reads the register at `offset` (0..=7 from [`COM1`]).
    pub fn read(&mut self, offset: u16) -> (u8, Irq) {
        let dlab = self.lcr & LCR_DLAB != 0;
        let [divisor_low, divisor_high] = self.divisor.to_le_bytes();
        let value = match offset {
            RBR_THR if dlab => divisor_low,
            RBR_THR => self.rx.pop_front().unwrap_or(0),
            IER if dlab => divisor_high,
            IER => self.ier,
            IIR_FCR => {
                let iir = self.iir();
                // Reading IIR acknowledges THR empty (only when that is what it reports).
                if iir & IIR_ID == IIR_THRI {
                    self.thre_pending = false;
                }
                iir
            }
            LCR => self.lcr,
            MCR => self.mcr,
            LSR => {
                let lsr = self.lsr();
                self.overrun = false;
                lsr
            }
            MSR => self.msr(),
            SCR => self.scr,
            _ => 0xff,
        };
        (value, self.sample())
    }

    /// Writes `value` to the register at `offset`; a transmitted byte goes to `console`.
    pub fn write(&mut self, offset: u16, value: u8, console: &mut dyn Console) -> Irq {
        let dlab = self.lcr & LCR_DLAB != 0;
        match offset {
            RBR_THR if dlab => self.divisor = (self.divisor & 0xff00) | u16::from(value),
            RBR_THR => {
                // THR fills (the output falls unless something else is pending) and,
                // transmission being instant, empties again.
                self.thre_pending = false;
                let filled = self.sample();
                debug_assert_eq!(filled, Irq::Unchanged, "clearing a condition never raises");
                if self.mcr & MCR_LOOP != 0 {
                    self.push_rx(value);
                } else {
                    console.transmit(value);
                }
                self.thre_pending = true;
            }
            IER if dlab => self.divisor = (self.divisor & 0x00ff) | (u16::from(value) << 8),
            IER => {
                let changed = (self.ier ^ value) & IER_MASK;
                self.ier = value & IER_MASK;
                // Turning THRI on with THR empty (always) signals THR empty anew, even if it
                // was acknowledged before: Linux's THRE test and Windows depend on it.
                if changed & IER_THRI != 0 {
                    self.thre_pending = self.ier & IER_THRI != 0;
                }
            }
            IIR_FCR => {
                let fifos = value & FCR_ENABLE_FIFO != 0;
                if fifos != self.fifos || (fifos && value & FCR_CLEAR_RCVR != 0) {
                    self.rx.clear();
                }
                self.fifos = fifos;
            }
            LCR => self.lcr = value,
            MCR => self.mcr = value & MCR_MASK,
            // LSR and MSR writes are factory tests on real parts; SCR is plain storage.
            SCR => self.scr = value,
            _ => {}
        }
        self.sample()
    }

    /// Input from the outside world: queues what fits in the receive FIFO and returns how many
    /// bytes it took; a byte that does not fit is lost and reported as an overrun.
    pub fn receive(&mut self, bytes: &[u8]) -> (usize, Irq) {
        let before = self.rx.len();
        for &b in bytes {
            self.push_rx(b);
        }
        (self.rx.len() - before, self.sample())
    }

    /// Whether the interrupt output is pending.
    pub fn interrupt_pending(&self) -> bool {
        self.pending_id().is_some()
    }

    fn push_rx(&mut self, byte: u8) {
        let capacity = if self.fifos { RX_FIFO } else { 1 };
        if self.rx.len() < capacity {
            self.rx.push_back(byte);
        } else {
            self.overrun = true;
        }
    }

    /// The highest-priority pending interrupt, as IIR identifies it.
    fn pending_id(&self) -> Option<u8> {
        if self.ier & IER_RLSI != 0 && self.overrun {
            Some(IIR_RLSI)
        } else if self.ier & IER_RDI != 0 && !self.rx.is_empty() {
            Some(IIR_RDI)
        } else if self.ier & IER_THRI != 0 && self.thre_pending {
            Some(IIR_THRI)
        } else {
            // Modem status (IER_MSI) never changes, so it never interrupts.
            None
        }
    }

    fn iir(&self) -> u8 {
        let fifos = if self.fifos { IIR_FIFOS } else { 0 };
        self.pending_id().unwrap_or(IIR_NO_INT) | fifos
    }

    fn lsr(&self) -> u8 {
        let mut lsr = LSR_THRE | LSR_TEMT;
        if !self.rx.is_empty() {
            lsr |= LSR_DR;
        }
        if self.overrun {
            lsr |= LSR_OE;
        }
        lsr
    }

    fn msr(&self) -> u8 {
        if self.mcr & MCR_LOOP == 0 {
            return MSR_DCD | MSR_DSR | MSR_CTS;
        }
        // Loopback: the modem outputs come back as the modem inputs.
        let mut msr = 0;
        for (out, input) in [
            (MCR_RTS, MSR_CTS),
            (MCR_DTR, MSR_DSR),
            (MCR_OUT1, MSR_RI),
            (MCR_OUT2, MSR_DCD),
        ] {
            if self.mcr & out != 0 {
                msr |= input;
            }
        }
        msr
    }

    /// Samples the interrupt output after an access.
    fn sample(&mut self) -> Irq {
        let pending = self.interrupt_pending();
        let rising = pending && !self.output;
        self.output = pending;
        if rising {
            Irq::Rising
        } else {
            Irq::Unchanged
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Out(Vec<u8>);

    impl Console for Out {
        fn transmit(&mut self, byte: u8) {
            self.0.push(byte);
        }
    }

    fn rd(u: &mut Uart, offset: u16) -> u8 {
        u.read(offset).0
    }

    fn wr(u: &mut Uart, offset: u16, value: u8) -> Irq {
        u.write(offset, value, &mut Out::default())
    }

    #[test]
    fn scratch_register_round_trips() {
        let mut u = Uart::new();
        for v in [0x00, 0x55, 0xaa, 0xff] {
            let _ = wr(&mut u, SCR, v);
            assert_eq!(rd(&mut u, SCR), v);
        }
    }

    #[test]
    fn iir_reads_no_interrupt_and_fifo_bits_follow_fcr() {
        let mut u = Uart::new();
        assert_eq!(rd(&mut u, IIR_FCR), 0x01);
        let _ = wr(&mut u, IIR_FCR, FCR_ENABLE_FIFO);
        assert_eq!(rd(&mut u, IIR_FCR), 0xc1);
        let _ = wr(&mut u, IIR_FCR, 0);
        assert_eq!(rd(&mut u, IIR_FCR), 0x01);
    }

    #[test]
    fn ier_keeps_only_the_four_interrupt_enable_bits() {
        let mut u = Uart::new();
        let _ = wr(&mut u, IER, 0xff);
        assert_eq!(rd(&mut u, IER), 0x0f);
        let _ = wr(&mut u, IER, 0);
        assert_eq!(rd(&mut u, IER), 0);
    }

    #[test]
    fn divisor_latch_is_reached_only_with_dlab() {
        let mut u = Uart::new();
        let _ = wr(&mut u, LCR, LCR_DLAB | 0x03);
        assert_eq!((rd(&mut u, 0), rd(&mut u, 1)), (12, 0));
        let _ = wr(&mut u, 0, 0x01);
        let _ = wr(&mut u, 1, 0x02);
        assert_eq!((rd(&mut u, 0), rd(&mut u, 1)), (0x01, 0x02));
        let _ = wr(&mut u, LCR, 0x03);
        assert_eq!(rd(&mut u, LCR), 0x03);
        // IER was not touched by the divisor write.
        assert_eq!(rd(&mut u, IER), 0);
        let _ = wr(&mut u, LCR, LCR_DLAB);
        assert_eq!((rd(&mut u, 0), rd(&mut u, 1)), (0x01, 0x02));
    }

    #[test]
    fn lsr_always_reports_an_empty_transmitter() {
        let mut u = Uart::new();
        assert_eq!(rd(&mut u, LSR), LSR_THRE | LSR_TEMT);
        let _ = wr(&mut u, RBR_THR, b'x');
        assert_eq!(rd(&mut u, LSR), LSR_THRE | LSR_TEMT);
    }

    #[test]
    fn thr_bytes_go_to_the_console_in_order() {
        let mut u = Uart::new();
        let mut out = Out::default();
        for b in b"hello\n" {
            let _ = u.write(RBR_THR, *b, &mut out);
        }
        assert_eq!(out.0, b"hello\n");
    }

    #[test]
    fn thre_interrupt_is_pending_when_enabled_and_acknowledged_by_reading_iir() {
        let mut u = Uart::new();
        assert_eq!(wr(&mut u, IER, IER_THRI), Irq::Rising);
        assert_eq!(u.read(IIR_FCR), (IIR_THRI, Irq::Unchanged));
        assert!(!u.interrupt_pending());
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NO_INT);
        // Writing THR re-arms it: THR empties at once.
        assert_eq!(wr(&mut u, RBR_THR, b'a'), Irq::Rising);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_THRI);
        // Turning THRI off clears it.
        let _ = wr(&mut u, RBR_THR, b'b');
        assert_eq!(wr(&mut u, IER, 0), Irq::Unchanged);
        assert_eq!(rd(&mut u, IIR_FCR), IIR_NO_INT);
    }

    #[test]
    fn an_edge_is_reported_only_when_the_output_was_idle() {
        let mut u = Uart::new();
        assert_eq!(wr(&mut u, IER, IER_THRI), Irq::Rising);
        // Still pending (not acknowledged): no new edge.
        assert_eq!(wr(&mut u, IER, IER_THRI | IER_RDI), Irq::Unchanged);
        assert_eq!(u.read(LSR).1, Irq::Unchanged);
        // A THR write lets the output fall and rise again: a new edge, acknowledged or not.
        assert_eq!(wr(&mut u, RBR_THR, b'a'), Irq::Rising);
        assert_eq!(wr(&mut u, RBR_THR, b'b'), Irq::Rising);
        // Unless something else holds the output high across the write.
        assert_eq!(u.receive(b"x").1, Irq::Unchanged);
        assert_eq!(wr(&mut u, RBR_THR, b'c'), Irq::Unchanged);
        assert_eq!(u.read(RBR_THR), (b'x', Irq::Unchanged));
        assert_eq!(wr(&mut u, RBR_THR, b'd'), Irq::Rising);
    }

    /// Linux's 8250 interrupt handler services received data and then refills THR on LSR's
    /// THRE, without an IIR read that reports THRE: it must still get its next interrupt.
    #[test]
    fn refilling_thr_after_receiving_gives_the_next_transmit_interrupt() {
        let mut u = Uart::new();
        let _ = wr(&mut u, IER, IER_THRI | IER_RDI);
        let _ = rd(&mut u, IIR_FCR);
        assert_eq!(u.receive(b"x").1, Irq::Rising);
        // The handler: IIR says received data; read it; LSR says THRE; write THR.
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RDI);
        assert_eq!(rd(&mut u, RBR_THR), b'x');
        assert_eq!(rd(&mut u, LSR) & LSR_THRE, LSR_THRE);
        assert_eq!(wr(&mut u, RBR_THR, b'y'), Irq::Rising);
    }

    /// The sequence of Linux's `autoconfig()` / `autoconfig_16550a()` (8250_port.c).
    #[test]
    fn linux_autoconfig_finds_a_16550a() {
        let mut u = Uart::new();
        // Scratch test through IER.
        let saved = rd(&mut u, IER);
        let _ = wr(&mut u, IER, 0);
        let scratch2 = rd(&mut u, IER) & 0x0f;
        let _ = wr(&mut u, IER, 0x0f);
        let scratch3 = rd(&mut u, IER) & 0x0f;
        let _ = wr(&mut u, IER, saved);
        assert_eq!((scratch2, scratch3), (0, 0x0f));
        // Loopback test (skipped for COM1..3 by UPF_SKIP_TEST, but it passes).
        let saved_mcr = rd(&mut u, MCR);
        let _ = wr(&mut u, MCR, MCR_LOOP | 0x0a);
        assert_eq!(rd(&mut u, MSR) & 0xf0, 0x90);
        let _ = wr(&mut u, MCR, saved_mcr);
        // FIFO type.
        let _ = wr(&mut u, LCR, 0);
        let _ = wr(&mut u, IIR_FCR, FCR_ENABLE_FIFO);
        assert_eq!(rd(&mut u, IIR_FCR) >> 6, 3, "16550A");
        // No EFR behind LCR 0x80 / 0xBF (an ST16C650 / 16850 would read 0 there).
        for conf in [0x80, 0xbf] {
            let _ = wr(&mut u, LCR, conf);
            assert_ne!(rd(&mut u, IIR_FCR), 0);
        }
        // Not a National SuperIO: "EXCR1" (register 2 with LCR 0xE0) does not follow MCR LOOP.
        let _ = wr(&mut u, LCR, 0);
        let status1 = rd(&mut u, MCR);
        let _ = wr(&mut u, LCR, 0xe0);
        let status2 = rd(&mut u, IIR_FCR);
        assert_eq!((status1 ^ status2) & MCR_LOOP, 0);
        let _ = wr(&mut u, LCR, 0);
        let _ = wr(&mut u, MCR, status1 ^ MCR_LOOP);
        let _ = wr(&mut u, LCR, 0xe0);
        let status2 = rd(&mut u, IIR_FCR);
        let _ = wr(&mut u, LCR, 0);
        let _ = wr(&mut u, MCR, status1);
        assert_eq!((status1 ^ status2) & MCR_LOOP, 0);
        // Not a 16750: no 64-byte FIFO bit (IIR bit 5), with or without DLAB.
        let _ = wr(&mut u, IIR_FCR, FCR_ENABLE_FIFO | 0x20);
        assert_eq!(rd(&mut u, IIR_FCR) & 0xe0, 0xc0);
        let _ = wr(&mut u, LCR, 0x80);
        let _ = wr(&mut u, IIR_FCR, FCR_ENABLE_FIFO | 0x20);
        assert_eq!(rd(&mut u, IIR_FCR) & 0xe0, 0xc0);
        let _ = wr(&mut u, LCR, 0);
        // Not an XScale: IER bit 6 (UUE) does not stick.
        let _ = wr(&mut u, IER, 0x40);
        assert_eq!(rd(&mut u, IER) & 0x40, 0);
    }

    /// The THRE test of Linux's `serial8250_do_startup()`: THRE must be re-asserted when THRI
    /// is turned off and on again, or Linux falls back to polling the transmitter.
    #[test]
    fn linux_thre_test_sees_thre_reasserted() {
        let mut u = Uart::new();
        let _ = wr(&mut u, IER, IER_THRI);
        let iir1 = rd(&mut u, IIR_FCR);
        let _ = wr(&mut u, IER, 0);
        let _ = wr(&mut u, IER, IER_THRI);
        let iir = rd(&mut u, IIR_FCR);
        let _ = wr(&mut u, IER, 0);
        assert_eq!(iir1 & IIR_NO_INT, 0);
        assert_eq!(iir & IIR_NO_INT, 0);
        // And the TXEN test: enabling THRI gives an interrupt with the transmitter empty.
        let _ = wr(&mut u, IER, IER_THRI);
        let lsr = rd(&mut u, LSR);
        let iir = rd(&mut u, IIR_FCR);
        assert!(lsr & LSR_TEMT != 0 && iir & IIR_NO_INT == 0);
    }

    #[test]
    fn received_bytes_set_data_ready_and_raise_the_receive_interrupt() {
        let mut u = Uart::new();
        let _ = wr(&mut u, IIR_FCR, FCR_ENABLE_FIFO);
        let _ = wr(&mut u, IER, IER_RDI);
        assert_eq!(u.receive(b"ok"), (2, Irq::Rising));
        assert_eq!(rd(&mut u, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut u, IIR_FCR), 0xc0 | IIR_RDI);
        assert_eq!(rd(&mut u, RBR_THR), b'o');
        assert_eq!(rd(&mut u, RBR_THR), b'k');
        assert_eq!(rd(&mut u, LSR) & LSR_DR, 0);
        assert_eq!(rd(&mut u, IIR_FCR), 0xc0 | IIR_NO_INT);
        // An empty receive buffer reads 0.
        assert_eq!(rd(&mut u, RBR_THR), 0);
    }

    #[test]
    fn receive_overflow_is_an_overrun_that_lsr_reports_once() {
        let mut u = Uart::new();
        let _ = wr(&mut u, IER, IER_RLSI);
        // FIFOs off: one byte of buffer.
        assert_eq!(u.receive(b"ab"), (1, Irq::Rising));
        assert_eq!(rd(&mut u, IIR_FCR), IIR_RLSI);
        assert_eq!(rd(&mut u, LSR), LSR_THRE | LSR_TEMT | LSR_DR | LSR_OE);
        assert_eq!(rd(&mut u, LSR), LSR_THRE | LSR_TEMT | LSR_DR);
        let _ = wr(&mut u, IIR_FCR, FCR_ENABLE_FIFO);
        assert_eq!(u.receive(&[0; 40]).0, RX_FIFO);
        let _ = wr(&mut u, IIR_FCR, FCR_ENABLE_FIFO | FCR_CLEAR_RCVR);
        assert_eq!(rd(&mut u, LSR) & LSR_DR, 0);
    }

    #[test]
    fn loopback_returns_transmitted_bytes_and_reflects_mcr_in_msr() {
        let mut u = Uart::new();
        let mut out = Out::default();
        assert_eq!(rd(&mut u, MSR), MSR_DCD | MSR_DSR | MSR_CTS);
        let _ = u.write(MCR, MCR_LOOP | MCR_DTR | MCR_OUT1, &mut out);
        assert_eq!(rd(&mut u, MSR), MSR_DSR | MSR_RI);
        let _ = u.write(RBR_THR, b'z', &mut out);
        assert!(out.0.is_empty());
        assert_eq!(rd(&mut u, RBR_THR), b'z');
    }
}
