//! The kernel's clock: timer ticks since boot.

use core::sync::atomic::AtomicU64;
use core::sync::atomic::Ordering;

/// Nanoseconds per timer tick.
pub const TICK_NS: u64 = 10_000_000;

static TICKS: AtomicU64 = AtomicU64::new(0);

/// One more tick (the timer interrupt).
pub fn tick() {
    TICKS.fetch_add(1, Ordering::Relaxed);
}

/// Nanoseconds since the timer started.
pub fn now_ns() -> u64 {
    TICKS.load(Ordering::Relaxed) * TICK_NS
}
