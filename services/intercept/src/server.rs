//! Request dispatch: who may ask what, and which device or policy answers.
//!
//! [`Intercept`] owns the platform devices, the policy and the counters. Its callers are
//! named by the channel a request arrived on (the runtime's `Caller`, from the manifest),
//! never by the message:
//! - the guest partition ([`PARTITION`]) sends accesses, MSRs, hypercalls and events; anyone
//!   else who sends one is refused with [`InterceptError::NotThePartition`];
//! - a device service asks for an interrupt with [`Request::Raise`]; it is raised only if its
//!   channel's grant ([`Grant::Interrupts`]) contains it, otherwise refused with
//!   [`InterceptError::NotGranted`]. The partition has no such grant, so it cannot raise
//!   interrupts through intercept either.
//!
//! Refusals are returned, counted here, and logged by the service's shell with the caller's
//! name and refusal count ([`is_refusal`]; the runtime's `Caller::refuse`), so that every
//! service reports refusals the same way.
//!
//! Port map (the guest's port space; MMIO has no device of intercept's): 0x60 and 0x64 i8042,
//! 0xF4 debug exit, 0x3F8..=0x3FF COM1, 0xCF8..=0xCFF PCI conf1. An access belongs to the
//! device at its first port; everything else is unclaimed ([`crate::policy`]).
//!
//! Intercept keeps no replay record of accesses (`Access::seq`): the router repeats an access
//! only after intercept restarted, and a restarted intercept has lost its device state anyway
//! (its devices start from reset), so there is nothing to answer a repeat from.

use ipc_defs::capability::Grant;
use ipc_defs::services::guest::Access;
use ipc_defs::services::guest::Next;
use ipc_defs::services::guest::Reply;
use ipc_defs::services::guest::Space;
use ipc_defs::services::intercept::InterceptError;
use ipc_defs::services::intercept::Interrupt;
use ipc_defs::services::intercept::InterruptSet;
use ipc_defs::services::intercept::Request;
use ipc_defs::services::intercept::Response;
use ipc_defs::services::intercept::DEBUG_EXIT_PORT;

use crate::low_byte;
use crate::pci;
use crate::platform;
use crate::platform::I8042;
use crate::policy::Policy;
use crate::ratelimit::worth_logging;
use crate::uart;
use pv_devices::pci_host::Pci;
use pv_devices::uart16550::Irq;
use pv_devices::uart16550::Uart;

/// The client name of the guest partition (the microkernel's vCPU threads), the only caller
/// that may send guest exits.
pub const PARTITION: &str = "guest";

/// Where interrupts go: the eventfds wired to the guest's interrupt controller.
pub trait InterruptSink {
    /// Raises `irq` once (an edge).
    fn raise(&mut self, irq: Interrupt) -> Result<(), RaiseError>;
}

pub use pv_devices::uart16550::Console;

/// Why an interrupt could not be raised.
#[derive(Debug, thiserror::Error)]
pub enum RaiseError {
    #[error("no eventfd is wired to {0} (the manifest wires none for it)")]
    NotWired(Interrupt),
    #[error("signalling the eventfd of {irq}: {error}")]
    Signal {
        irq: Interrupt,
        error: std::io::Error,
    },
}

/// Counters of intercept's work; all saturate rather than wrap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Accesses to COM1.
    pub uart_accesses: u64,
    /// Bytes the guest transmitted on COM1.
    pub uart_bytes: u64,
    /// COM1 interrupts raised (rising edges of its output).
    pub uart_interrupts: u64,
    /// COM1 interrupts that could not be raised (line 4 not wired, or the signal failed).
    pub uart_interrupts_lost: u64,
    /// Accesses to the PCI conf1 ports.
    pub pci_accesses: u64,
    /// Configuration accesses handed to the device service that owns the function.
    pub pci_forwarded: u64,
    /// Accesses to the i8042.
    pub i8042_accesses: u64,
    /// Resets the guest asked for (i8042 command 0xFE).
    pub resets: u64,
    /// Writes to the debug-exit port.
    pub debug_exits: u64,
    pub unclaimed_port_reads: u64,
    pub unclaimed_port_writes: u64,
    pub unclaimed_mmio_reads: u64,
    pub unclaimed_mmio_writes: u64,
    /// Distinct unclaimed (space, address) pairs seen (see [`crate::ratelimit::Sightings`]).
    pub unclaimed_distinct: u64,
    /// Accesses refused as malformed (size not 1, 2, 4 or 8).
    pub bad_accesses: u64,
    pub msrs_allowed: u64,
    /// MSR accesses answered with #GP.
    pub msrs_denied: u64,
    pub hypercalls: u64,
    /// vCPU events (each ends the run).
    pub events: u64,
    /// Interrupts raised for device services.
    pub interrupts_raised: u64,
    /// Interrupt requests refused: not in the caller's grant.
    pub interrupts_not_granted: u64,
    /// Granted interrupts that could not be delivered.
    pub interrupts_not_delivered: u64,
    /// Guest exits sent by a client other than the partition.
    pub not_the_partition: u64,
}

impl core::fmt::Display for Counters {
    /// One line, for the log at shutdown.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "uart: {} accesses, {} bytes out, {} interrupts ({} lost); pci: {} accesses ({} forwarded); \
             i8042: {} accesses, {} resets; debug exits: {}; unclaimed: port {} reads {} writes, \
             mmio {} reads {} writes, {} distinct; bad accesses: {}; msrs: {} allowed {} denied; \
             hypercalls: {}; events: {}; interrupts: {} raised, {} not granted, {} not delivered; \
             not the partition: {}",
            self.uart_accesses,
            self.uart_bytes,
            self.uart_interrupts,
            self.uart_interrupts_lost,
            self.pci_accesses,
            self.pci_forwarded,
            self.i8042_accesses,
            self.resets,
            self.debug_exits,
            self.unclaimed_port_reads,
            self.unclaimed_port_writes,
            self.unclaimed_mmio_reads,
            self.unclaimed_mmio_writes,
            self.unclaimed_distinct,
            self.bad_accesses,
            self.msrs_allowed,
            self.msrs_denied,
            self.hypercalls,
            self.events,
            self.interrupts_raised,
            self.interrupts_not_granted,
            self.interrupts_not_delivered,
            self.not_the_partition,
        )
    }
}

/// Whether `response` refuses the caller something the manifest does not allow it (the shell
/// counts and logs these as refusals).
pub fn is_refusal(response: &Response) -> bool {
    matches!(
        response,
        Response::Error(InterceptError::NotGranted(_) | InterceptError::NotThePartition)
    )
}

/// Which of intercept's devices a port belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    Com1,
    PciConf1,
    I8042,
    DebugExit,
}

fn device_at(port: u16) -> Option<Device> {
    match port {
        uart::COM1..=uart::COM1_LAST => Some(Device::Com1),
        pci::CONFIG_ADDRESS..=pci::CONFIG_LAST => Some(Device::PciConf1),
        platform::I8042_DATA | platform::I8042_COMMAND => Some(Device::I8042),
        DEBUG_EXIT_PORT => Some(Device::DebugExit),
        _ => None,
    }
}

/// The exit policy's state: devices, policy, counters, and where interrupts and console output
/// go.
pub struct Intercept<S: InterruptSink, C: Console> {
    uart: Uart,
    pci: Pci,
    i8042: I8042,
    policy: Policy,
    sink: S,
    console: C,
    pub counters: Counters,
}

impl<S: InterruptSink, C: Console> Intercept<S, C> {
    /// The platform as after reset, raising interrupts through `sink` and writing the UART's
    /// output to `console`.
    pub fn new(sink: S, console: C) -> Self {
        Intercept::with_policy(sink, console, Policy::new())
    }

    /// The same, with another policy (another MSR table).
    pub fn with_policy(sink: S, console: C, policy: Policy) -> Self {
        Intercept {
            uart: Uart::new(),
            pci: Pci::new(),
            i8042: I8042,
            policy,
            sink,
            console,
            counters: Counters::default(),
        }
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    pub fn console(&self) -> &C {
        &self.console
    }

    pub fn console_mut(&mut self) -> &mut C {
        &mut self.console
    }

    /// Answers `request` from the client `caller`, whose channel carries `grant`.
    pub fn handle(&mut self, caller: &str, grant: Grant, request: Request) -> Response {
        /// The PCI devices (bus 0) device services own, from the partition's grant.
        fn owned_pci_devices(grant: Grant) -> u32 {
            match grant {
                Grant::PciDevices(mask) => mask,
                _ => 0,
            }
        }
        let from_partition = caller == PARTITION;
        match request {
            Request::Raise(irq) => self.raise_for(caller, grant, irq),
            _ if !from_partition => {
                bump(&mut self.counters.not_the_partition);
                Response::Error(InterceptError::NotThePartition)
            }
            Request::Io(access) => match self.access(&access, owned_pci_devices(grant)) {
                Ok(reply) => Response::Io(reply),
                Err(e) => Response::Error(e),
            },
            Request::Msr { vcpu, index, write } => {
                Response::Msr(self.policy.msr(vcpu, index, write, &mut self.counters))
            }
            Request::Hypercall { vcpu, nr, args } => {
                Response::Hypercall(self.policy.hypercall(vcpu, nr, &args, &mut self.counters))
            }
            Request::Event { vcpu, event } => {
                Response::Next(self.policy.event(vcpu, &event, &mut self.counters))
            }
        }
    }

    /// Input for COM1 (from a later input channel): what fits in its receive FIFO.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        let (taken, irq) = self.uart.receive(bytes);
        self.uart_irq(irq);
        taken
    }

    fn raise_for(&mut self, caller: &str, grant: Grant, irq: Interrupt) -> Response {
        let granted = match grant {
            Grant::Interrupts(set) => set,
            _ => InterruptSet::EMPTY,
        };
        if !granted.contains(irq) {
            bump(&mut self.counters.interrupts_not_granted);
            return Response::Error(InterceptError::NotGranted(irq));
        }
        match self.sink.raise(irq) {
            Ok(()) => {
                bump(&mut self.counters.interrupts_raised);
                Response::Raised
            }
            Err(e) => {
                bump(&mut self.counters.interrupts_not_delivered);
                if worth_logging(self.counters.interrupts_not_delivered) {
                    tracing::warn!(client = caller, "granted interrupt not delivered: {e}");
                }
                Response::Error(InterceptError::NotDelivered(irq))
            }
        }
    }

    fn access(&mut self, access: &Access, owned: u32) -> Result<Reply, InterceptError> {
        if !access.size_is_valid() {
            bump(&mut self.counters.bad_accesses);
            if worth_logging(self.counters.bad_accesses) {
                tracing::warn!(
                    vcpu = access.vcpu,
                    size = access.size,
                    "malformed access from the partition (size not 1, 2, 4 or 8)"
                );
            }
            return Err(InterceptError::BadAccess { size: access.size });
        }
        let device = match access.space {
            Space::Port => u16::try_from(access.address)
                .ok()
                .and_then(|port| Some((port, device_at(port)?))),
            Space::Mmio | Space::PciConfig => None,
        };
        let Some((port, device)) = device else {
            return Ok(self.policy.unclaimed(access, &mut self.counters));
        };
        let written = access.written();
        let reply = match device {
            Device::Com1 => {
                bump(&mut self.counters.uart_accesses);
                let offset = port - uart::COM1;
                match written {
                    None => {
                        let (value, irq) = self.uart.read(offset);
                        self.uart_irq(irq);
                        Reply::read(value.into())
                    }
                    Some(value) => {
                        let mut console = Counting {
                            console: &mut self.console,
                            bytes: &mut self.counters.uart_bytes,
                        };
                        let irq = self.uart.write(offset, low_byte(value), &mut console);
                        self.uart_irq(irq);
                        Reply::WRITTEN
                    }
                }
            }
            Device::PciConf1 => {
                bump(&mut self.counters.pci_accesses);
                if let Some(address) = self.pci.owned_target(port, access.size, owned) {
                    // A function a device service owns: the partition takes it there.
                    bump(&mut self.counters.pci_forwarded);
                    return Ok(Reply {
                        value: 0,
                        next: Next::ForwardPciConfig { address },
                    });
                }
                match written {
                    None => Reply::read(self.pci.read(port, access.size)),
                    Some(value) => {
                        self.pci.write(port, access.size, value);
                        Reply::WRITTEN
                    }
                }
            }
            Device::I8042 => {
                bump(&mut self.counters.i8042_accesses);
                match written {
                    None => Reply::read(self.i8042.read(port).into()),
                    Some(value) => {
                        let next = self.i8042.write(port, value);
                        if next == Next::Reset {
                            bump(&mut self.counters.resets);
                            tracing::info!(
                                vcpu = access.vcpu,
                                "the guest reset the machine (i8042)"
                            );
                        }
                        Reply { value: 0, next }
                    }
                }
            }
            Device::DebugExit => {
                let reply = platform::debug_exit(access.size, written);
                if let Next::Exit(status) = reply.next {
                    bump(&mut self.counters.debug_exits);
                    tracing::info!(
                        vcpu = access.vcpu,
                        status,
                        "the guest ended the run (debug exit)"
                    );
                }
                reply
            }
        };
        Ok(reply)
    }

    fn uart_irq(&mut self, irq: Irq) {
        if irq != Irq::Rising {
            return;
        }
        match self.sink.raise(uart::COM1_IRQ) {
            Ok(()) => bump(&mut self.counters.uart_interrupts),
            Err(e) => {
                bump(&mut self.counters.uart_interrupts_lost);
                if worth_logging(self.counters.uart_interrupts_lost) {
                    tracing::warn!("COM1 interrupt lost: {e}");
                }
            }
        }
    }
}

fn bump(counter: &mut u64) {
    *counter = counter.saturating_add(1);
}

/// The console, counting what passes through it.
struct Counting<'a, C: Console> {
    console: &'a mut C,
    bytes: &'a mut u64,
}

impl<C: Console> Console for Counting<'_, C> {
    fn transmit(&mut self, byte: u8) {
        bump(self.bytes);
        self.console.transmit(byte);
    }
}

/// An interrupt sink that records what it raises, for tests and the fuzz target.
#[derive(Debug, Default)]
pub struct RecordingSink {
    /// Interrupts that are wired (others fail with [`RaiseError::NotWired`]).
    pub wired: InterruptSet,
    /// What was raised, in order.
    pub raised: Vec<Interrupt>,
}

impl RecordingSink {
    /// A sink with every valid interrupt wired.
    pub fn all_wired() -> RecordingSink {
        let mut wired = InterruptSet::EMPTY;
        wired.lines = (1 << ipc_defs::services::intercept::IOAPIC_LINES) - 1;
        wired.msi = [!0xffff, !0, !0, !0];
        RecordingSink {
            wired,
            raised: Vec::new(),
        }
    }
}

impl InterruptSink for RecordingSink {
    fn raise(&mut self, irq: Interrupt) -> Result<(), RaiseError> {
        if !self.wired.contains(irq) {
            return Err(RaiseError::NotWired(irq));
        }
        self.raised.push(irq);
        Ok(())
    }
}

/// A console that keeps what it is given, for tests and the fuzz target.
#[derive(Debug, Default)]
pub struct RecordingConsole {
    pub output: Vec<u8>,
}

impl Console for RecordingConsole {
    fn transmit(&mut self, byte: u8) {
        self.output.push(byte);
    }
}

#[cfg(test)]
mod tests {
    use ipc_defs::services::guest::mask;
    use ipc_defs::services::intercept::Event;
    use ipc_defs::services::intercept::HypercallOutcome;
    use ipc_defs::services::intercept::MsrOutcome;

    use super::*;
    use crate::policy::KVM_ENOSYS;
    use crate::GUEST_CRASHED;
    use crate::HALTED_FOREVER;
    use crate::HYPERVISOR_FAILED;

    type Tested = Intercept<RecordingSink, RecordingConsole>;

    fn intercept() -> Tested {
        Intercept::new(RecordingSink::all_wired(), RecordingConsole::default())
    }

    fn io(space: Space, address: u64, size: u8, write: Option<u64>) -> Request {
        Request::Io(Access {
            vcpu: 0,
            seq: 0,
            space,
            address,
            size,
            write,
        })
    }

    fn guest(i: &mut Tested, request: Request) -> Response {
        i.handle(PARTITION, Grant::Interface, request)
    }

    fn inb(i: &mut Tested, port: u16) -> u64 {
        match guest(i, io(Space::Port, port.into(), 1, None)) {
            Response::Io(Reply {
                value,
                next: Next::Resume,
            }) => value,
            other => panic!("{other:?}"),
        }
    }

    fn out(i: &mut Tested, port: u16, size: u8, value: u64) -> Next {
        match guest(i, io(Space::Port, port.into(), size, Some(value))) {
            Response::Io(Reply { next, .. }) => next,
            other => panic!("{other:?}"),
        }
    }

    fn read(i: &mut Tested, space: Space, address: u64, size: u8) -> u64 {
        match guest(i, io(space, address, size, None)) {
            Response::Io(r) => r.value,
            other => panic!("{other:?}"),
        }
    }

    fn granted(irqs: &[Interrupt]) -> Grant {
        let mut set = InterruptSet::EMPTY;
        for i in irqs {
            assert!(set.insert(*i));
        }
        Grant::Interrupts(set)
    }

    #[test]
    fn unowned_port_reads_all_ones_and_write_is_dropped() {
        let mut i = intercept();
        for size in [1, 2, 4, 8] {
            assert_eq!(read(&mut i, Space::Port, 0x80, size), mask(size));
            assert_eq!(out(&mut i, 0x80, size, 0x1234), Next::Resume);
            assert_eq!(read(&mut i, Space::Port, 0x80, size), mask(size));
        }
        assert_eq!(i.counters.unclaimed_port_reads, 8);
        assert_eq!(i.counters.unclaimed_port_writes, 4);
        assert_eq!(i.counters.unclaimed_distinct, 1);
    }

    #[test]
    fn unowned_mmio_reads_all_ones_and_is_counted_apart_from_ports() {
        let mut i = intercept();
        assert_eq!(read(&mut i, Space::Mmio, 0xfee0_0000, 4), 0xffff_ffff);
        assert_eq!(read(&mut i, Space::Mmio, 0xfebf_0000, 8), u64::MAX);
        // MMIO at an address that is a device's port is still unclaimed.
        assert_eq!(read(&mut i, Space::Mmio, 0x3f8, 1), 0xff);
        let r = guest(&mut i, io(Space::Mmio, 0xfee0_0000, 4, Some(1)));
        assert_eq!(r, Response::Io(Reply::WRITTEN));
        let c = i.counters;
        assert_eq!(
            (
                c.unclaimed_mmio_reads,
                c.unclaimed_mmio_writes,
                c.unclaimed_port_reads,
                c.unclaimed_distinct
            ),
            (3, 1, 0, 3)
        );
        assert_eq!(i.counters.uart_accesses, 0);
    }

    #[test]
    fn port_address_beyond_16_bits_is_unclaimed() {
        let mut i = intercept();
        assert_eq!(read(&mut i, Space::Port, 0x1_03f8, 1), 0xff);
        assert_eq!(read(&mut i, Space::Port, u64::MAX, 2), 0xffff);
        assert_eq!(i.counters.unclaimed_port_reads, 2);
        assert_eq!(i.counters.uart_accesses, 0);
    }

    #[test]
    fn bad_access_size_is_rejected() {
        let mut i = intercept();
        for size in [0, 3, 5, 16, 255] {
            assert_eq!(
                guest(&mut i, io(Space::Port, 0x3f8, size, Some(1))),
                Response::Error(InterceptError::BadAccess { size })
            );
        }
        assert_eq!(i.counters.bad_accesses, 5);
        assert!(i.console().output.is_empty());
    }

    #[test]
    fn uart_output_reaches_the_console() {
        let mut i = intercept();
        for b in b"boot\n" {
            out(&mut i, uart::COM1, 1, (*b).into());
        }
        assert_eq!(i.console().output, b"boot\n");
        assert_eq!(i.counters.uart_bytes, 5);
    }

    #[test]
    fn uart_accesses_wider_than_a_byte_act_on_the_low_byte() {
        let mut i = intercept();
        out(&mut i, uart::COM1 + uart::SCR, 4, 0x1234_56ab);
        assert_eq!(
            read(&mut i, Space::Port, (uart::COM1 + uart::SCR).into(), 2),
            0xab
        );
        out(&mut i, uart::COM1, 2, 0x4142);
        assert_eq!(i.console().output, b"B");
    }

    #[test]
    fn thre_interrupt_raises_line_4_once_per_edge() {
        let mut i = intercept();
        let iir = uart::COM1 + uart::IIR_FCR;
        out(&mut i, uart::COM1 + uart::IER, 1, uart::IER_THRI.into());
        assert_eq!(i.sink().raised, [uart::COM1_IRQ]);
        // Still pending: reading registers, acknowledging it, and enabling more raise nothing.
        inb(&mut i, uart::COM1 + uart::LSR);
        out(&mut i, uart::COM1 + uart::IER, 1, 0x03);
        assert_eq!(inb(&mut i, iir), u64::from(uart::IIR_THRI));
        assert_eq!(inb(&mut i, iir), u64::from(uart::IIR_NO_INT));
        assert_eq!(i.sink().raised.len(), 1);
        // Each THR write empties THR again: one new edge each.
        out(&mut i, uart::COM1, 1, b'a'.into());
        assert_eq!(i.sink().raised, [uart::COM1_IRQ, uart::COM1_IRQ]);
        out(&mut i, uart::COM1, 1, b'b'.into());
        assert_eq!(i.sink().raised.len(), 3);
        // Off and on again: one more.
        out(&mut i, uart::COM1 + uart::IER, 1, 0);
        assert_eq!(i.sink().raised.len(), 3);
        out(&mut i, uart::COM1 + uart::IER, 1, uart::IER_THRI.into());
        assert_eq!(i.sink().raised.len(), 4);
        assert_eq!(i.counters.uart_interrupts, 4);
        // Interrupts disabled: output never raises.
        out(&mut i, uart::COM1 + uart::IER, 1, 0);
        out(&mut i, uart::COM1, 1, b'c'.into());
        assert_eq!(i.sink().raised.len(), 4);
    }

    #[test]
    fn uart_interrupt_without_a_wired_line_is_counted_lost() {
        let mut i = Intercept::new(RecordingSink::default(), RecordingConsole::default());
        out(&mut i, uart::COM1 + uart::IER, 1, uart::IER_THRI.into());
        assert!(i.sink().raised.is_empty());
        assert_eq!(i.counters.uart_interrupts_lost, 1);
        assert_eq!(
            inb(&mut i, uart::COM1 + uart::IIR_FCR),
            u64::from(uart::IIR_THRI)
        );
    }

    #[test]
    fn received_input_raises_the_receive_interrupt() {
        let mut i = intercept();
        out(&mut i, uart::COM1 + uart::IER, 1, uart::IER_RDI.into());
        assert_eq!(i.receive(b"x"), 1);
        assert_eq!(i.sink().raised, [uart::COM1_IRQ]);
        assert_eq!(inb(&mut i, uart::COM1), u64::from(b'x'));
    }

    #[test]
    fn debug_exit_write_ends_the_run_with_its_status() {
        for size in [1, 2, 4, 8] {
            let mut i = intercept();
            assert_eq!(
                read(&mut i, Space::Port, DEBUG_EXIT_PORT.into(), size),
                mask(size)
            );
            assert_eq!(out(&mut i, DEBUG_EXIT_PORT, size, 0x0103), Next::Exit(3));
            assert_eq!(i.counters.debug_exits, 1);
        }
        let mut i = intercept();
        assert_eq!(out(&mut i, DEBUG_EXIT_PORT, 1, 0), Next::Exit(0));
    }

    #[test]
    fn i8042_reset_resets() {
        let mut i = intercept();
        assert_eq!(inb(&mut i, platform::I8042_COMMAND), 0);
        assert_eq!(out(&mut i, platform::I8042_COMMAND, 1, 0xfe), Next::Reset);
        assert_eq!(i.counters.resets, 1);
    }

    #[test]
    fn i8042_reads_zero_and_ignores_other_writes() {
        let mut i = intercept();
        assert_eq!(inb(&mut i, platform::I8042_DATA), 0);
        assert_eq!(out(&mut i, platform::I8042_COMMAND, 1, 0xaa), Next::Resume);
        assert_eq!(out(&mut i, platform::I8042_DATA, 1, 0xfe), Next::Resume);
        assert_eq!(i.counters.resets, 0);
        assert_eq!(i.counters.unclaimed_port_writes, 0);
    }

    #[test]
    fn pci_host_bridge_is_found_and_empty_slots_read_all_ones() {
        let mut i = intercept();
        let config = |bus: u32, device: u32, register: u32| {
            0x8000_0000u64 | u64::from(bus << 16 | device << 11 | register)
        };
        out(&mut i, pci::CONFIG_ADDRESS, 4, config(0, 0, 0));
        assert_eq!(
            read(&mut i, Space::Port, pci::CONFIG_DATA.into(), 4),
            0x0008_1b36
        );
        out(&mut i, pci::CONFIG_ADDRESS, 4, config(0, 0, 8));
        assert_eq!(
            read(&mut i, Space::Port, pci::CONFIG_DATA.into(), 4) >> 8,
            0x06_00_00
        );
        for device in 1..32 {
            out(&mut i, pci::CONFIG_ADDRESS, 4, config(0, device, 0));
            assert_eq!(
                read(&mut i, Space::Port, pci::CONFIG_DATA.into(), 4),
                0xffff_ffff
            );
        }
        out(&mut i, pci::CONFIG_ADDRESS, 4, config(1, 0, 0));
        assert_eq!(
            read(&mut i, Space::Port, pci::CONFIG_DATA.into(), 2),
            0xffff
        );
        assert_eq!(i.counters.unclaimed_port_reads, 0);
    }

    #[test]
    fn config_accesses_of_a_granted_device_are_handed_to_its_owner_and_no_other() {
        let mut i = intercept();
        // The partition's channel says device services own 00:03 and 00:1f.
        let owned = Grant::PciDevices(1 << 3 | 1 << 31);
        let config = |device: u32, function: u32, register: u32| {
            0x8000_0000u32 | device << 11 | function << 8 | register
        };
        let handle = |i: &mut Tested, port: u16, size: u8, write: Option<u64>| match i.handle(
            PARTITION,
            owned,
            io(Space::Port, port.into(), size, write),
        ) {
            Response::Io(reply) => reply,
            other => panic!("{other:?}"),
        };
        for (device, function, register, size) in [(3, 0, 0, 4), (3, 2, 0x11, 1), (31, 7, 0x3e, 2)]
        {
            let address = config(device, function, register & !3);
            handle(&mut i, pci::CONFIG_ADDRESS, 4, Some(address.into()));
            let port = pci::CONFIG_DATA + (register & 3) as u16;
            for write in [None, Some(0x1234)] {
                let reply = handle(&mut i, port, size, write);
                assert_eq!(
                    reply.next,
                    Next::ForwardPciConfig {
                        address: device << 11 | function << 8 | register
                    },
                    "00:{device:02x}.{function} register {register:#x}"
                );
            }
        }
        assert_eq!(i.counters.pci_forwarded, 6);
        // The host bridge and devices nobody owns are answered here, never handed over.
        for device in [0, 2, 4, 30] {
            handle(
                &mut i,
                pci::CONFIG_ADDRESS,
                4,
                Some(config(device, 0, 0).into()),
            );
            let reply = handle(&mut i, pci::CONFIG_DATA, 4, None);
            assert_eq!(reply.next, Next::Resume, "00:{device:02x}");
            let expected = if device == 0 {
                0x0008_1b36
            } else {
                0xffff_ffff
            };
            assert_eq!(reply.value, expected, "00:{device:02x}");
        }
        // The address register itself is intercept's, owned device or not.
        handle(&mut i, pci::CONFIG_ADDRESS, 4, Some(config(3, 0, 0).into()));
        let reply = handle(&mut i, pci::CONFIG_ADDRESS, 4, None);
        assert_eq!(reply.next, Next::Resume);
        assert_eq!(reply.value, u64::from(config(3, 0, 0)));
        assert_eq!(i.counters.pci_forwarded, 6);
        // Without the grant the same access is not forwarded: another client's channel (or
        // the partition's plain one) names no owned devices.
        handle(&mut i, pci::CONFIG_ADDRESS, 4, Some(config(3, 0, 0).into()));
        let r = guest(&mut i, io(Space::Port, pci::CONFIG_DATA.into(), 4, None));
        assert_eq!(r, Response::Io(Reply::read(0xffff_ffff)));
        assert_eq!(i.counters.pci_forwarded, 6);
    }

    #[test]
    fn the_shutdown_log_line_gives_every_counter() {
        let mut i = intercept();
        out(&mut i, uart::COM1, 1, u64::from(b'x'));
        inb(&mut i, 0x80);
        out(&mut i, 0x84, 1, 1);
        let line = i.counters.to_string();
        assert!(line.starts_with("uart: 1 accesses, 1 bytes out,"), "{line}");
        assert!(line.contains("unclaimed: port 1 reads 1 writes"), "{line}");
        assert!(line.ends_with("not the partition: 0"), "{line}");
    }

    #[test]
    fn only_the_partition_may_send_exits() {
        let mut i = intercept();
        let exits = [
            io(Space::Port, DEBUG_EXIT_PORT.into(), 1, Some(0)),
            io(Space::Port, uart::COM1.into(), 1, Some(b'!'.into())),
            Request::Msr {
                vcpu: 0,
                index: 0x10,
                write: None,
            },
            Request::Hypercall {
                vcpu: 0,
                nr: 1,
                args: [0; 6],
            },
            Request::Event {
                vcpu: 0,
                event: Event::Shutdown,
            },
        ];
        for (n, exit) in exits.iter().enumerate() {
            for (caller, grant) in [
                ("vtpm", Grant::Interface),
                ("storage", granted(&[Interrupt::Line(5)])),
                ("Guest", Grant::Interface),
            ] {
                let r = i.handle(caller, grant, exit.clone());
                assert_eq!(r, Response::Error(InterceptError::NotThePartition), "{n}");
                assert!(is_refusal(&r));
            }
        }
        assert_eq!(i.counters.not_the_partition, 15);
        assert!(i.console().output.is_empty());
        assert_eq!(i.counters.debug_exits + i.counters.events, 0);
    }

    #[test]
    fn msr_access_is_denied_with_gp() {
        let mut i = intercept();
        for (index, write) in [
            (0xc000_0080, None),
            (0x1b, Some(0xfee0_0900)),
            (0xffff_ffff, None),
        ] {
            let r = guest(
                &mut i,
                Request::Msr {
                    vcpu: 1,
                    index,
                    write,
                },
            );
            assert_eq!(r, Response::Msr(MsrOutcome::Fault));
        }
        assert_eq!(i.counters.msrs_denied, 3);
    }

    #[test]
    fn unknown_hypercall_returns_enosys() {
        let mut i = intercept();
        let r = guest(
            &mut i,
            Request::Hypercall {
                vcpu: 0,
                nr: 5,
                args: [1; 6],
            },
        );
        assert_eq!(r, Response::Hypercall(HypercallOutcome::Return(KVM_ENOSYS)));
        assert_eq!(KVM_ENOSYS as i64, -1000);
        assert_eq!(i.counters.hypercalls, 1);
    }

    #[test]
    fn events_end_the_run_with_their_status() {
        let mut i = intercept();
        for (event, status) in [
            (Event::Shutdown, GUEST_CRASHED),
            (Event::InternalError { suberror: 1 }, HYPERVISOR_FAILED),
            (Event::FailEntry { reason: 7 }, HYPERVISOR_FAILED),
            (Event::Unhandled { reason: 99 }, HYPERVISOR_FAILED),
            (Event::HaltedForever, HALTED_FOREVER),
        ] {
            let r = guest(&mut i, Request::Event { vcpu: 0, event });
            assert_eq!(r, Response::Next(Next::Exit(status)));
        }
        assert_eq!(i.counters.events, 5);
    }

    #[test]
    fn granted_interrupt_is_raised() {
        let mut i = intercept();
        // A line, and an MSI vector in each 64-vector word of the set.
        let irqs = [
            Interrupt::Line(5),
            Interrupt::Msi(0x10),
            Interrupt::Msi(0x40),
            Interrupt::Msi(0x80),
            Interrupt::Msi(0xff),
        ];
        let grant = granted(&irqs);
        for irq in irqs {
            assert_eq!(
                i.handle("storage", grant, Request::Raise(irq)),
                Response::Raised
            );
        }
        assert_eq!(i.sink().raised, irqs);
        assert_eq!(i.counters.interrupts_raised, 5);
    }

    #[test]
    fn ungranted_interrupt_is_refused_and_counted() {
        let mut i = intercept();
        let grant = granted(&[Interrupt::Line(5)]);
        for irq in [
            Interrupt::Line(4),
            Interrupt::Line(24),
            Interrupt::Line(255),
            Interrupt::Msi(0x40),
            Interrupt::Msi(0),
        ] {
            let r = i.handle("storage", grant, Request::Raise(irq));
            assert_eq!(r, Response::Error(InterceptError::NotGranted(irq)));
            assert!(is_refusal(&r));
        }
        // A client without an interrupt grant has none.
        let r = i.handle("vtpm", Grant::Interface, Request::Raise(Interrupt::Line(5)));
        assert_eq!(
            r,
            Response::Error(InterceptError::NotGranted(Interrupt::Line(5)))
        );
        assert!(i.sink().raised.is_empty());
        assert_eq!(i.counters.interrupts_not_granted, 6);
    }

    #[test]
    fn partition_may_not_raise_interrupts() {
        let mut i = intercept();
        let r = guest(&mut i, Request::Raise(uart::COM1_IRQ));
        assert_eq!(
            r,
            Response::Error(InterceptError::NotGranted(uart::COM1_IRQ))
        );
        assert!(i.sink().raised.is_empty());
    }

    #[test]
    fn granted_but_unwired_interrupt_is_not_delivered() {
        let mut i = Intercept::new(RecordingSink::default(), RecordingConsole::default());
        let grant = granted(&[Interrupt::Line(5)]);
        let r = i.handle("storage", grant, Request::Raise(Interrupt::Line(5)));
        assert_eq!(
            r,
            Response::Error(InterceptError::NotDelivered(Interrupt::Line(5)))
        );
        assert!(!is_refusal(&r));
        assert_eq!(i.counters.interrupts_not_delivered, 1);
    }
}
