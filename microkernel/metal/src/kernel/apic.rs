//! The local APIC: the periodic timer that preempts tasks and drives deadlines and restart
//! back-offs; and the legacy PICs, masked.
//!
//! The timer counts the APIC bus clock, 1 GHz under both KVM and QEMU's TCG (their APIC
//! models count nanoseconds), divided by 16.
//!
//! The registers are reached as x2APIC MSRs where the CPU has x2APIC (KVM), else through the
//! xAPIC page (QEMU 7.2's TCG has no x2APIC). On KVM-on-PVM, whose ring 0 is emulated, a
//! ring-0 access to the xAPIC page ends the run with an internal error; MSRs work.

use x86_64::instructions::port::Port;

use crate::clock::TICK_NS;
use crate::cpu::SPURIOUS_VECTOR;
use crate::cpu::TIMER_VECTOR;
use crate::paging::APIC_BASE;

const SPURIOUS: u64 = 0xF0;
const EOI: u64 = 0xB0;
const LVT_TIMER: u64 = 0x320;
const INITIAL_COUNT: u64 = 0x380;
const DIVIDE: u64 = 0x3E0;
const PERIODIC: u32 = 1 << 17;
const DIVIDE_BY_16: u32 = 0b0011;

use core::sync::atomic::AtomicBool;
use core::sync::atomic::Ordering;

use x86_64::registers::model_specific::Msr;

static X2APIC: AtomicBool = AtomicBool::new(false);
const APIC_BASE_MSR: u32 = 0x1B;
const X2APIC_ENABLE: u64 = 1 << 10;
const APIC_GLOBAL_ENABLE: u64 = 1 << 11;

fn write(register: u64, value: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        let mut msr = Msr::new(0x800 + (register >> 4) as u32);
        // SAFETY: the x2APIC MSR of the register; writing it programs the local APIC only.
        unsafe { msr.write(u64::from(value)) };
    } else {
        // SAFETY: a register of the local APIC's page, which the kernel maps uncached in
        // every address space at its architectural address.
        unsafe { core::ptr::write_volatile((APIC_BASE + register) as *mut u32, value) };
    }
}

/// Masks the 8259s, enables the local APIC and starts the timer.
pub fn init() {
    // CPUID.1:ECX bit 21: x2APIC.
    let x2apic = core::arch::x86_64::__cpuid(1).ecx & (1 << 21) != 0;
    if x2apic {
        let mut base = Msr::new(APIC_BASE_MSR);
        // SAFETY: turning on x2APIC mode (from enabled xAPIC mode, as the architecture
        // requires both bits) changes only how the local APIC is addressed.
        unsafe {
            let value = base.read();
            base.write(value | APIC_GLOBAL_ENABLE | X2APIC_ENABLE);
        }
        X2APIC.store(true, Ordering::Relaxed);
    }
    defmt::info!(
        "local APIC: {=str}",
        if x2apic {
            "x2APIC (MSRs)"
        } else {
            "xAPIC (MMIO)"
        }
    );
    for port in [0x21u16, 0xA1] {
        // SAFETY: the PICs' mask registers; masking every line keeps legacy interrupts out.
        unsafe { Port::<u8>::new(port).write(0xFF) };
    }
    write(SPURIOUS, 0x100 | u32::from(SPURIOUS_VECTOR));
    write(DIVIDE, DIVIDE_BY_16);
    write(LVT_TIMER, PERIODIC | u32::from(TIMER_VECTOR));
    write(INITIAL_COUNT, (TICK_NS / 16) as u32);
}

/// Ends the interrupt being handled.
pub fn eoi() {
    write(EOI, 0);
}
