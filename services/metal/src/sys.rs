//! The system calls (`int 0x81`; numbers and rules in [`ipc_defs::metal::Syscall`]).

use core::arch::asm;

use ipc_defs::metal::Syscall;
use ipc_defs::metal::MAX_LOG;

/// One system call: number, three arguments; status and value back.
fn call(number: Syscall, a: u64, b: u64, c: u64) -> (u64, u64) {
    let status: u64;
    let value: u64;
    // SAFETY: `int 0x81` enters the kernel through its system call gate; the kernel reads
    // the arguments, writes RAX and RDX, and returns with every other register as it was.
    // A call the kernel refuses ends this task, never corrupts it.
    unsafe {
        asm!("int 0x81",
             inlateout("rax") number as u64 => status,
             in("rdi") a, in("rsi") b,
             inlateout("rdx") c => value,
             options(nostack));
    }
    (status, value)
}

/// Ends this task with `status`.
pub fn exit(status: u64) -> ! {
    call(Syscall::Exit, status, 0, 0);
    // The kernel never returns from Exit; if it did, fault rather than run on.
    loop {
        // SAFETY: `ud2` raises #UD, which stops this task.
        unsafe { asm!("ud2") };
    }
}

/// Lets the next task run.
pub fn yield_now() {
    call(Syscall::Yield, 0, 0, 0);
}

/// Sets the peer's notification bit of the channel in `slot`.
pub fn notify(slot: usize) {
    call(Syscall::Notify, slot as u64, 0, 0);
}

/// Waits for a notification in `mask` or until `deadline_ns` (since boot; `u64::MAX`: none).
/// Returns the bits that were set (0: the deadline passed).
pub fn wait(mask: u32, deadline_ns: u64) -> u32 {
    call(Syscall::Wait, u64::from(mask), deadline_ns, 0).1 as u32
}

/// Nanoseconds since boot.
pub fn now_ns() -> u64 {
    call(Syscall::Now, 0, 0, 0).1
}

/// Logs `text` (cut at [`MAX_LOG`] bytes).
pub fn log(text: &[u8]) {
    let text = &text[..text.len().min(MAX_LOG)];
    call(Syscall::Log, text.as_ptr() as u64, text.len() as u64, 0);
}

/// A log line being formatted.
pub struct Line(heapless::Vec<u8, MAX_LOG>);

impl Line {
    pub fn new() -> Line {
        Line(heapless::Vec::new())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Default for Line {
    fn default() -> Line {
        Line::new()
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = MAX_LOG - self.0.len();
        let _ = self.0.extend_from_slice(&s.as_bytes()[..s.len().min(room)]);
        Ok(())
    }
}
