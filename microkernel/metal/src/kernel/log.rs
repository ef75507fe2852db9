//! The kernel's log: defmt frames on COM1, one line each.
//!
//! A defmt frame is binary (the format string's index in the image's `.defmt` table, then
//! the arguments), and the consoles it crosses are text: our partition's console drops
//! control bytes and passes whole lines. So each frame goes out as a line `#d:` + the
//! frame's bytes in hex; `paravisor metal log --image K` (defmt's decoder and the image's
//! table) turns those lines back into messages and passes every other line through.
//!
//! The kernel runs with interrupts off except while it idles (and its interrupt handler there
//! logs nothing), so frames do not nest. One that did (a fault inside the logger) would end
//! the unfinished line first: the outer frame's line is then cut short (the decoder says it
//! cannot decode it) and the nested one stands whole on its own line.

use core::sync::atomic::AtomicBool;
use core::sync::atomic::Ordering;

use x86_64::instructions::port::Port;

const COM1: u16 = 0x3f8;
/// Marks a defmt frame line.
pub const FRAME_PREFIX: &[u8] = b"#d:";

/// Sets COM1 to 115200 8N1 without interrupts.
pub fn init() {
    let setup: [(u16, u8); 7] = [
        (1, 0x00), // no interrupts
        (3, 0x80), // divisor latch
        (0, 0x01), // 115200
        (1, 0x00),
        (3, 0x03), // 8N1
        (2, 0xC7), // FIFO on, cleared
        (4, 0x03), // DTR, RTS
    ];
    for (offset, value) in setup {
        // SAFETY: COM1's registers; writing them configures the UART and nothing else.
        unsafe { Port::<u8>::new(COM1 + offset).write(value) };
    }
}

/// One byte to COM1, after the transmitter has room.
pub fn put(byte: u8) {
    // SAFETY: COM1's line status and data registers.
    unsafe {
        let mut status = Port::<u8>::new(COM1 + 5);
        let mut spins = 0u32;
        while status.read() & 0x20 == 0 && spins < 100_000 {
            spins += 1;
        }
        Port::<u8>::new(COM1).write(byte);
    }
}

pub fn put_all(bytes: &[u8]) {
    for &b in bytes {
        put(b);
    }
}

fn put_hex(byte: u8) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    put(DIGITS[usize::from(byte >> 4)]);
    put(DIGITS[usize::from(byte & 15)]);
}

static TAKEN: AtomicBool = AtomicBool::new(false);

#[defmt::global_logger]
struct Logger;

// SAFETY: one CPU, and no logging from the idle loop's interrupt handler: `acquire`,
// `write` and `release` run in that order for one frame at a time; a nested frame (a fault
// inside the logger) ends the outer frame's line first, so no line holds two frames.
unsafe impl defmt::Logger for Logger {
    fn acquire() {
        if TAKEN.swap(true, Ordering::Acquire) {
            put(b'\n');
        }
        put_all(FRAME_PREFIX);
    }

    unsafe fn flush() {}

    unsafe fn release() {
        put(b'\n');
        TAKEN.store(false, Ordering::Release);
    }

    unsafe fn write(bytes: &[u8]) {
        for &b in bytes {
            put_hex(b);
        }
    }
}

defmt::timestamp!("{=u64:us}", crate::clock::now_ns() / 1000);
