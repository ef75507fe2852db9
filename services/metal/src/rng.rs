//! Randomness for tasks: the CPU's RDRAND, which ring 3 may execute (no system call).

/// Whether the CPU has RDRAND (CPUID.1:ECX bit 30).
pub fn available() -> bool {
    core::arch::x86_64::__cpuid(1).ecx & (1 << 30) != 0
}

/// One 64-bit value, or `None` if RDRAND failed ten times (the architecture's advice: a
/// failure is transient; ten in a row mean the source is broken).
fn next() -> Option<u64> {
    for _ in 0..10 {
        let value: u64;
        let ok: u8;
        // SAFETY: RDRAND writes a register and the carry flag, nothing else; callers check
        // `available()` first.
        unsafe {
            core::arch::asm!("rdrand {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok,
                             options(nomem, nostack));
        }
        if ok == 1 {
            return Some(value);
        }
    }
    None
}

/// Fills `buf` from RDRAND; false if the CPU has none or it kept failing.
pub fn fill(buf: &mut [u8]) -> bool {
    if !available() {
        return false;
    }
    for chunk in buf.chunks_mut(8) {
        let Some(value) = next() else {
            return false;
        };
        chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
    }
    true
}
