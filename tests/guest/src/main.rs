//! The paravisor's test guest: a freestanding x86-64 program the microkernel loads as an ELF
//! image and enters in 64-bit mode (identity-mapped page tables with user access, flat
//! segments), built with the host toolchain (`#![no_std]`, no SSE, `-nostartfiles -static
//! -nostdlib`, `guest.ld`) by the microkernel's build script.
//!
//! Ring 0 sets up a GDT, TSS and IDT and drops to ring 3: on PVM ring-0 code is emulated
//! instruction by instruction, ring-3 code runs natively. PVM keeps guest user mode at IOPL 0,
//! so ring 3 does port I/O through a system call (`int 0x81`; PVM turns `int 0x80` in user mode into #UD); its MMIO (the TPM, the APICs)
//! it does itself. Ring 3 then, each step printed on COM1:
//! 1. enumerates PCI bus 0 through conf1 and expects a host bridge;
//! 2. runs the TPM TIS register sequence of Linux's `tpm_tis_core` against the vtpm service:
//!    Startup, GetRandom, PCR_Read, PCR_Extend, PCR_Read, and a loop of extends whose final
//!    value it checks against the hash chain it computes itself;
//! 3. routes COM1's line 4 through the IOAPIC, enables the UART's transmit interrupt and
//!    takes it;
//! 4. if the partition has one (or `nvme=1`), drives the partition's NVMe function (`nvme.rs`): identify,
//!    an I/O queue pair in the shared window, and passes that write, flush, read back and
//!    check every block of namespace 1;
//! 5. with `net=1`, drives the partition's virtio-net function (`net.rs`): negotiation, a
//!    receive and a transmit queue in the shared window, an ARP request and `net-pings` echo
//!    requests to the service's responder, each reply checked byte for byte;
//! 6. optionally (`bench=N`) times N port reads handled by a service (COM1's scratch
//!    register, answered by intercept) against N handled in the microkernel's vCPU thread;
//!
//! and writes its status to the debug-exit port: 0 if every check passed.
//!
//! The boot command line (a NUL-terminated string, its address in RSI at entry) takes
//! `extends=N` (default 8), `bench=N` (default 0), `interrupt=0|1` (default 1),
//! `tpm=0|1` (default 1), `unowned=0|1` (default 1: accesses nothing owns, an unknown MSR),
//! `triple-fault=1` (runs wild on purpose, first thing), and for NVMe `nvme=0|1` (default: if there is one),
//! `nvme-passes=N` (default 1), `nvme-blocks=N` (default 1024: the most blocks tested),
//! `nvme-irq=0|1` (default 0), `nvme-dbbuf=0|1` (default 1: shadow doorbells if the
//! controller offers Doorbell Buffer Config; 0: MMIO doorbells only), `window=0xADDR` (the
//! shared window, default 0xb0000000), and for the NIC `net=0|1` (default 0) and
//! `net-pings=N` (default 4), `net-irq=0|1` (default 0).
//! Numbers are decimal, or hexadecimal after `0x`.
#![no_std]
#![no_main]

mod arch;
mod net;
mod nvme;
mod sha256;

use core::arch::asm;
use core::arch::global_asm;
use core::ptr::addr_of;
use core::ptr::read_volatile;
use core::ptr::write_volatile;
use core::sync::atomic::AtomicU32;
use core::sync::atomic::AtomicUsize;
use core::sync::atomic::Ordering;

const COM1: u16 = 0x3f8;
const DEBUG_EXIT: u16 = 0xf4;
/// Answered by the microkernel's vCPU thread itself (the benchmark's in-thread baseline).
const IN_THREAD_PORT: u16 = 0xf5;
const PCI_ADDRESS: u16 = 0xcf8;
const PCI_DATA: u16 = 0xcfc;
const TIS: usize = 0xFED4_0000;
const LAPIC: usize = 0xFEE0_0000;
const IOAPIC: usize = 0xFEC0_0000;

/// Status for a failed check, an unexpected exception, a panic.
const STATUS_FAILED: u8 = 1;
const STATUS_EXCEPTION: u8 = 3;
const STATUS_PANIC: u8 = 4;

static mut KERNEL_STACK: arch::Stack = arch::Stack([0; 16384]);
static mut USER_STACK: [arch::Stack; 4] = [
    arch::Stack([0; 16384]),
    arch::Stack([0; 16384]),
    arch::Stack([0; 16384]),
    arch::Stack([0; 16384]),
];
/// The boot command line's address (set in ring 0, read in ring 3).
static COMMAND_LINE: AtomicUsize = AtomicUsize::new(0);
/// UART interrupts taken.
static UART_INTERRUPTS: AtomicU32 = AtomicU32::new(0);
static FAILURES: AtomicU32 = AtomicU32::new(0);

global_asm!(
    ".section .text._start",
    ".global _start",
    "_start:",
    "    lea rsp, [rip + {stack} + 16384]",
    "    mov rdi, rsi",
    "    call {main}",
    "2:  hlt",
    "    jmp 2b",
    stack = sym KERNEL_STACK,
    main = sym kernel_main,
);

// ---- memory functions the compiler may call (no libc here) ----

/// # Safety
/// As C's memcpy.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        write_volatile(dest.add(i), read_volatile(src.add(i)));
        i += 1;
    }
    dest
}

/// # Safety
/// As C's memmove.
#[no_mangle]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) < (src as usize) {
        return memcpy(dest, src, n);
    }
    let mut i = n;
    while i > 0 {
        i -= 1;
        write_volatile(dest.add(i), read_volatile(src.add(i)));
    }
    dest
}

/// # Safety
/// As C's memset.
#[no_mangle]
pub unsafe extern "C" fn memset(dest: *mut u8, value: i32, n: usize) -> *mut u8 {
    let mut i = 0;
    while i < n {
        write_volatile(dest.add(i), value as u8);
        i += 1;
    }
    dest
}

/// # Safety
/// As C's memcmp.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        let (x, y) = (read_volatile(a.add(i)), read_volatile(b.add(i)));
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// As C's bcmp.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    memcmp(a, b, n)
}

// ---- port and memory-mapped I/O ----

/// System calls (vector 0x81): RAX = operation, RDI and RSI its arguments, RAX the result.
const SYS_OUTB: u64 = 0;
const SYS_INB: u64 = 1;
const SYS_OUTL: u64 = 2;
const SYS_INL: u64 = 3;
const SYS_INB_LOOP: u64 = 4;
const SYS_STI: u64 = 5;
const SYS_CLI: u64 = 6;
const SYS_TRIPLE_FAULT: u64 = 7;
const SYS_OUTSB: u64 = 8;
const SYS_RDMSR: u64 = 9;

/// Set while ring 0 executes an instruction that may take #GP on purpose (an MSR probe):
/// the #GP handler then skips the 2-byte instruction and records the fault.
static EXPECTING_GP: AtomicU32 = AtomicU32::new(0);
static GP_SEEN: AtomicU32 = AtomicU32::new(0);

fn in_ring0() -> bool {
    let cs: u16;
    // SAFETY: reads the code segment selector.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3 == 0
}

fn syscall(op: u64, a: u64, b: u64) -> u64 {
    let result: u64;
    // SAFETY: the guest's own system call gate; the handler preserves every register but RAX.
    unsafe {
        asm!("int 0x81", inlateout("rax") op => result, in("rdi") a, in("rsi") b, options(nostack))
    };
    result
}

/// Writes `bytes` to `port` with one `rep outsb` (string I/O).
fn outsb(port: u16, bytes: &[u8]) {
    let result: u64;
    // SAFETY: the guest's own system call gate, as `syscall`, with the length in RDX.
    unsafe {
        asm!("int 0x81", inlateout("rax") SYS_OUTSB => result, in("rdi") u64::from(port),
             in("rsi") bytes.as_ptr() as u64, in("rdx") bytes.len() as u64, options(nostack))
    };
    let _ = result;
}

fn outb(port: u16, value: u8) {
    if !in_ring0() {
        syscall(SYS_OUTB, u64::from(port), u64::from(value));
        return;
    }
    // SAFETY: port I/O in ring 0.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

fn inb(port: u16) -> u8 {
    if !in_ring0() {
        return syscall(SYS_INB, u64::from(port), 0) as u8;
    }
    let value: u8;
    // SAFETY: as outb.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}

fn outl(port: u16, value: u32) {
    if !in_ring0() {
        syscall(SYS_OUTL, u64::from(port), u64::from(value));
        return;
    }
    // SAFETY: as outb.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) };
}

fn inl(port: u16) -> u32 {
    if !in_ring0() {
        return syscall(SYS_INL, u64::from(port), 0) as u32;
    }
    let value: u32;
    // SAFETY: as outb.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// `count` byte reads of `port` in one system call (the benchmark's loop, in ring 0).
fn inb_loop(port: u16, count: u64) {
    syscall(SYS_INB_LOOP, u64::from(port), count);
}

fn mmio_read8(address: usize) -> u8 {
    // SAFETY: a device register in the identity-mapped, user-accessible MMIO window.
    unsafe { read_volatile(address as *const u8) }
}

fn mmio_read32(address: usize) -> u32 {
    // SAFETY: as mmio_read8.
    unsafe { read_volatile(address as *const u32) }
}

fn mmio_write8(address: usize, value: u8) {
    // SAFETY: as mmio_read8.
    unsafe { write_volatile(address as *mut u8, value) }
}

fn mmio_write32(address: usize, value: u32) {
    // SAFETY: as mmio_read8.
    unsafe { write_volatile(address as *mut u32, value) }
}

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the time-stamp counter (allowed in ring 3 here).
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

fn exit(status: u8) -> ! {
    outb(DEBUG_EXIT, status);
    // The partition stops this vCPU at the write; nothing runs after it.
    loop {
        core::hint::spin_loop();
    }
}

// ---- console ----

fn putc(byte: u8) {
    // Wait for THR empty (LSR bit 5), as a polling driver does.
    let mut tries = 0u32;
    while inb(COM1 + 5) & 0x20 == 0 && tries < 1000 {
        tries += 1;
    }
    outb(COM1, byte);
}

fn puts(s: &str) {
    for b in s.bytes() {
        putc(b);
    }
}

fn put_dec(mut v: u64) {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while n > 0 {
        n -= 1;
        putc(digits[n]);
    }
}

fn put_hex_digits(v: u64, digits: u32) {
    let mut i = digits;
    while i > 0 {
        i -= 1;
        let nibble = ((v >> (i * 4)) & 0xf) as u8;
        putc(if nibble < 10 { b'0' + nibble } else { b'a' + nibble - 10 });
    }
}

fn put_hex(v: u64) {
    puts("0x");
    put_hex_digits(v, 8);
}

fn put_bytes(bytes: &[u8]) {
    for b in bytes {
        put_hex_digits(u64::from(*b), 2);
    }
}

fn check(ok: bool, what: &str) {
    puts(if ok { "guest: ok   " } else { "guest: FAIL " });
    puts(what);
    putc(b'\n');
    if !ok {
        FAILURES.fetch_add(1, Ordering::Relaxed);
    }
}

// ---- ring 0 ----

/// Entered from `_start` in ring 0 with the loader's page tables and segments.
extern "C" fn kernel_main(command_line: usize) -> ! {
    COMMAND_LINE.store(command_line, Ordering::Relaxed);
    // SAFETY: once, in ring 0, before anything else; the user stack is ours and mapped.
    unsafe {
        arch::setup();
        let top = addr_of!(USER_STACK) as u64 + core::mem::size_of::<[arch::Stack; 4]>() as u64;
        arch::enter_user(user_main, top)
    }
}

/// Every trap and interrupt (ring 0, interrupts off).
extern "C" fn trap(frame: &mut arch::TrapFrame) {
    let vector = frame.vector as u8;
    if vector == arch::UART_VECTOR {
        // Acknowledge at the UART (IIR read), stop further transmit interrupts, EOI.
        let _ = inb(COM1 + 2);
        outb(COM1 + 1, 0);
        UART_INTERRUPTS.fetch_add(1, Ordering::SeqCst);
        mmio_write32(LAPIC + 0xB0, 0);
        return;
    }
    if vector == arch::NVME_VECTOR {
        // Nothing to acknowledge at the device (its line is pulsed per completion): count, EOI.
        nvme::INTERRUPTS.fetch_add(1, Ordering::SeqCst);
        mmio_write32(LAPIC + 0xB0, 0);
        return;
    }
    if vector == arch::NET_VECTOR {
        // The driver reads the ISR itself (in ring 3) once it sees the count move: count, EOI.
        net::INTERRUPTS.fetch_add(1, Ordering::SeqCst);
        mmio_write32(LAPIC + 0xB0, 0);
        return;
    }
    if vector == arch::SPURIOUS_VECTOR {
        return;
    }
    if vector == arch::SYSCALL_VECTOR {
        system_call(frame);
        return;
    }
    if vector == 13 && frame.cs & 3 == 0 && EXPECTING_GP.load(Ordering::SeqCst) != 0 {
        GP_SEEN.store(1, Ordering::SeqCst);
        frame.rip += 2;
        return;
    }
    // PVM turns `int N` in user mode into #UD: a #UD at our own `int 0x81` is that system
    // call (on hardware KVM the gate above is taken directly).
    if vector == 6 && frame.cs & 3 == 3 {
        // SAFETY: the faulting instruction is in the identity-mapped image.
        let bytes = unsafe {
            [
                read_volatile(frame.rip as *const u8),
                read_volatile((frame.rip + 1) as *const u8),
            ]
        };
        if bytes == [0xCD, arch::SYSCALL_VECTOR] {
            frame.rip += 2;
            system_call(frame);
            return;
        }
    }
    puts("guest: unexpected exception ");
    put_dec(frame.vector);
    puts(" error ");
    put_hex(frame.error);
    puts(" at rip ");
    put_hex(frame.rip);
    puts(" cs ");
    put_hex(frame.cs);
    puts(" rflags ");
    put_hex(frame.rflags);
    putc(b'\n');
    exit(STATUS_EXCEPTION);
}

/// A system call from ring 3: RAX the operation, RDI and RSI its arguments, RAX the result.
fn system_call(frame: &mut arch::TrapFrame) {
    let (a, b) = (frame.rdi, frame.rsi);
    frame.rax = match frame.rax {
        SYS_OUTB => {
            outb(a as u16, b as u8);
            0
        }
        SYS_INB => u64::from(inb(a as u16)),
        SYS_OUTL => {
            outl(a as u16, b as u32);
            0
        }
        SYS_INL => u64::from(inl(a as u16)),
        SYS_INB_LOOP => {
            let port = a as u16;
            for _ in 0..b {
                // SAFETY: port I/O in ring 0.
                unsafe {
                    asm!("in al, dx", in("dx") port, out("al") _, options(nomem, nostack, preserves_flags))
                };
            }
            0
        }
        SYS_STI => {
            frame.rflags |= 1 << 9;
            0
        }
        SYS_CLI => {
            frame.rflags &= !(1 << 9);
            0
        }
        SYS_OUTSB => {
            // `rep outsb`: string I/O, several bytes in one exit (RDX holds the length).
            let (port, from, len) = (a as u16, b, frame.rdx);
            // SAFETY: the bytes are in the guest's identity-mapped image.
            unsafe {
                asm!("rep outsb", in("dx") port, inout("rsi") from => _, inout("rcx") len => _, options(nostack, preserves_flags))
            };
            0
        }
        SYS_RDMSR => {
            // Reads MSR `a`; the result, or u64::MAX with GP_SEEN set if it faulted.
            GP_SEEN.store(0, Ordering::SeqCst);
            EXPECTING_GP.store(1, Ordering::SeqCst);
            let (lo, hi): (u32, u32);
            // SAFETY: rdmsr in ring 0; a #GP is handled (the instruction is skipped).
            unsafe { asm!("rdmsr", in("ecx") a as u32, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
            EXPECTING_GP.store(0, Ordering::SeqCst);
            if GP_SEEN.load(Ordering::SeqCst) != 0 {
                u64::MAX
            } else {
                (u64::from(hi) << 32) | u64::from(lo)
            }
        }
        SYS_TRIPLE_FAULT => {
            // No IDT at all, then an exception: #UD cannot be delivered, nor #DF: shutdown.
            let empty = [0u8; 10];
            // SAFETY: deliberately ends the guest (the test of a guest that runs wild).
            unsafe { asm!("lidt [{0}]", "ud2", in(reg) &empty, options(noreturn)) }
        }
        _ => u64::MAX,
    };
}

/// The precompiled `core` refers to the unwinding personality; with `panic=abort` nothing
/// unwinds, so it is never called.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    puts("guest: panic\n");
    exit(STATUS_PANIC)
}

// ---- ring 3 ----

struct Options {
    extends: u64,
    bench: u64,
    interrupt: bool,
    tpm: bool,
    unowned: bool,
    crash: bool,
    nvme: nvme::Config,
    net: net::Config,
}

/// An option's value: decimal, or hexadecimal after `0x`; other characters are skipped.
fn number(value: &[u8]) -> u64 {
    let (digits, radix) = match value {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (value, 10),
    };
    let mut n: u64 = 0;
    for d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' if radix == 16 => d - b'a' + 10,
            b'A'..=b'F' if radix == 16 => d - b'A' + 10,
            _ => continue,
        };
        n = n.saturating_mul(radix).saturating_add(u64::from(v));
    }
    n
}

fn options() -> Options {
    let mut o = Options {
        extends: 8,
        bench: 0,
        interrupt: true,
        tpm: true,
        unowned: true,
        crash: false,
        nvme: nvme::Config::default(),
        net: net::Config::default(),
    };
    let at = COMMAND_LINE.load(Ordering::Relaxed);
    if at == 0 {
        return o;
    }
    // The loader places up to 2 KiB, NUL-terminated; options fit in the first 512 bytes.
    let mut line = [0u8; 512];
    let mut len = 0;
    while len < line.len() {
        // SAFETY: the loader's command line page is mapped and user-accessible.
        let b = unsafe { read_volatile((at + len) as *const u8) };
        if b == 0 {
            break;
        }
        line[len] = b;
        len += 1;
    }
    for word in line[..len].split(|b| *b == b' ') {
        let mut kv = word.splitn(2, |b| *b == b'=');
        let (Some(key), Some(value)) = (kv.next(), kv.next()) else {
            continue;
        };
        let n = number(value);
        match key {
            b"extends" => o.extends = n,
            b"bench" => o.bench = n,
            b"interrupt" => o.interrupt = n != 0,
            b"tpm" => o.tpm = n != 0,
            b"unowned" => o.unowned = n != 0,
            b"triple-fault" => o.crash = n != 0,
            b"nvme" => o.nvme.enabled = Some(n != 0),
            b"nvme-passes" => o.nvme.passes = n,
            b"nvme-blocks" => o.nvme.max_blocks = n,
            b"nvme-irq" => o.nvme.interrupt = n != 0,
            b"nvme-dbbuf" => o.nvme.shadow_doorbells = n != 0,
            b"window" => {
                o.nvme.window = n;
                o.net.window = n;
            }
            b"net" => o.net.enabled = n != 0,
            b"net-pings" => o.net.pings = n,
            b"net-irq" => o.net.interrupt = n != 0,
            _ => {}
        }
    }
    o
}

extern "C" fn user_main() -> ! {
    puts("guest: hello from ring 3\n");
    outsb(COM1, b"guest: string I/O (rep outsb) reaches the console\n");
    let o = options();
    if o.crash {
        puts("guest: triple fault on purpose\n");
        syscall(SYS_TRIPLE_FAULT, 0, 0);
    }
    pci_scan();
    if o.unowned {
        unowned_checks();
        msr_check();
    }
    if o.tpm {
        tpm_checks(o.extends);
    }
    if o.interrupt {
        interrupt_check();
    }
    if o.nvme.enabled != Some(false) {
        nvme::run(&o.nvme);
    }
    net::run(&o.net);
    if o.bench > 0 {
        bench(o.bench);
    }
    let failures = FAILURES.load(Ordering::Relaxed);
    if failures == 0 {
        puts("guest: all checks passed\n");
        exit(0)
    }
    puts("guest: ");
    put_dec(u64::from(failures));
    puts(" checks failed\n");
    exit(STATUS_FAILED)
}

fn pci_read(bus: u32, device: u32, function: u32, offset: u32) -> u32 {
    outl(
        PCI_ADDRESS,
        0x8000_0000 | (bus << 16) | (device << 11) | (function << 8) | (offset & 0xfc),
    );
    inl(PCI_DATA)
}

/// A 32-bit write to configuration space (conf1, as `pci_read`).
fn pci_write(bus: u32, device: u32, function: u32, offset: u32, value: u32) {
    outl(
        PCI_ADDRESS,
        0x8000_0000 | (bus << 16) | (device << 11) | (function << 8) | (offset & 0xfc),
    );
    outl(PCI_DATA, value);
}

fn pci_scan() {
    let mut bridge = false;
    for device in 0..32 {
        let id = pci_read(0, device, 0, 0);
        if id == 0xffff_ffff {
            continue;
        }
        let class = pci_read(0, device, 0, 8) >> 8;
        puts("guest: pci 00:");
        put_hex_digits(u64::from(device), 2);
        puts(".0 ");
        put_hex_digits(u64::from(id & 0xffff), 4);
        putc(b':');
        put_hex_digits(u64::from(id >> 16), 4);
        puts(" class ");
        put_hex_digits(u64::from(class), 6);
        putc(b'\n');
        if device == 0 && class >> 16 == 0x06 {
            bridge = true;
        }
    }
    check(bridge, "PCI host bridge at 00:00.0");
}

/// Nothing owns COM2 or 0xFEB00000: reads give all ones, writes vanish (intercept counts
/// them).
fn unowned_checks() {
    let port = inb(0x2f8 + 7);
    outb(0x2f8 + 7, 0x5a);
    let again = inb(0x2f8 + 7);
    check(port == 0xff && again == 0xff, "unowned port 0x2ff reads 0xff, a write there is dropped");
    let mmio = 0xFEB0_0000;
    let value = mmio_read32(mmio);
    mmio_write32(mmio, 0x1234_5678);
    let after = mmio_read32(mmio);
    check(
        value == 0xffff_ffff && after == 0xffff_ffff,
        "unowned MMIO 0xfeb00000 reads all ones, a write there is dropped",
    );
}

/// An MSR no one implements: KVM passes the access up, intercept denies it (deny by
/// default), and the guest gets #GP.
fn msr_check() {
    let value = syscall(SYS_RDMSR, 0x4000_00ff, 0);
    check(
        value == u64::MAX && GP_SEEN.load(Ordering::SeqCst) != 0,
        "rdmsr of an unknown MSR is denied with #GP",
    );
}

// ---- TPM over TIS ----

const ACCESS: usize = 0x00;
const STS: usize = 0x18;
const FIFO: usize = 0x24;
const DID_VID: usize = 0xF00;
const ACCESS_VALID: u8 = 0x80;
const ACCESS_ACTIVE: u8 = 0x20;
const ACCESS_REQUEST: u8 = 0x02;
const STS_VALID: u8 = 0x80;
const STS_READY: u8 = 0x40;
const STS_GO: u8 = 0x20;
const STS_DATA: u8 = 0x10;
const STS_EXPECT: u8 = 0x08;
/// Polls before a TPM step counts as hung (each poll is an exit: seconds on PVM).
const POLLS: u32 = 200_000;

fn wait_sts(mask: u8, value: u8) -> bool {
    for _ in 0..POLLS {
        if mmio_read8(TIS + STS) & mask == value {
            return true;
        }
    }
    false
}

fn burst_count() -> usize {
    ((mmio_read32(TIS + STS) >> 8) & 0xffff) as usize
}

/// One command through the FIFO at locality 0, as `tpm_tis_core` sends it; the response's
/// length.
fn tpm_transact(command: &[u8], response: &mut [u8]) -> Result<usize, &'static str> {
    mmio_write8(TIS + ACCESS, ACCESS_REQUEST);
    let mut granted = false;
    for _ in 0..POLLS {
        if mmio_read8(TIS + ACCESS) & (ACCESS_VALID | ACCESS_ACTIVE) == ACCESS_VALID | ACCESS_ACTIVE {
            granted = true;
            break;
        }
    }
    if !granted {
        return Err("locality 0 not granted");
    }
    mmio_write8(TIS + STS, STS_READY);
    if !wait_sts(STS_READY, STS_READY) {
        return Err("commandReady not reached");
    }
    let last = command.len() - 1;
    let mut i = 0;
    let mut polls = 0u32;
    while i < last {
        let burst = burst_count();
        if burst == 0 {
            polls += 1;
            if polls > POLLS {
                return Err("burstCount stayed 0 while sending");
            }
            continue;
        }
        let mut n = 0;
        while n < burst && i < last {
            mmio_write8(TIS + FIFO, command[i]);
            i += 1;
            n += 1;
        }
    }
    if !wait_sts(STS_VALID | STS_EXPECT, STS_VALID | STS_EXPECT) {
        return Err("expect not set before the last byte");
    }
    mmio_write8(TIS + FIFO, command[last]);
    if !wait_sts(STS_VALID | STS_EXPECT, STS_VALID) {
        return Err("expect still set after the last byte");
    }
    mmio_write8(TIS + STS, STS_GO);
    if !wait_sts(STS_VALID | STS_DATA, STS_VALID | STS_DATA) {
        return Err("no response (dataAvail)");
    }
    let mut got = 0;
    let mut want = 10;
    let mut polls = 0u32;
    while got < want {
        let burst = burst_count();
        if burst == 0 {
            polls += 1;
            if polls > POLLS {
                return Err("burstCount stayed 0 while receiving");
            }
            continue;
        }
        let mut n = 0;
        while n < burst && got < want {
            response[got] = mmio_read8(TIS + FIFO);
            got += 1;
            n += 1;
        }
        if got == 10 && want == 10 {
            let size =
                u32::from_be_bytes([response[2], response[3], response[4], response[5]]) as usize;
            if !(10..=response.len()).contains(&size) {
                return Err("response size out of range");
            }
            want = size;
        }
    }
    if !wait_sts(STS_VALID | STS_DATA, STS_VALID) {
        return Err("dataAvail still set after the response");
    }
    mmio_write8(TIS + STS, STS_READY);
    mmio_write8(TIS + ACCESS, ACCESS_ACTIVE);
    Ok(want)
}

fn rc(response: &[u8]) -> u32 {
    u32::from_be_bytes([response[6], response[7], response[8], response[9]])
}

/// Runs `command`; the response, or a printed failure.
fn tpm(command: &[u8], response: &mut [u8], what: &str) -> Option<usize> {
    match tpm_transact(command, response) {
        Ok(n) => Some(n),
        Err(e) => {
            puts("guest: FAIL ");
            puts(what);
            puts(": ");
            puts(e);
            putc(b'\n');
            FAILURES.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

const PCR: u8 = 16;

fn pcr_read(what: &str) -> Option<[u8; 32]> {
    let command = [
        0x80, 0x01, 0, 0, 0, 20, 0, 0, 0x01, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, 0, 0, 1 << (PCR - 16),
    ];
    let mut r = [0u8; 128];
    let n = tpm(&command, &mut r, what)?;
    // header 10, update counter 4, selection 10, digest count 4, size 2, digest 32
    if n != 62 || rc(&r) != 0 || r[24..30] != [0, 0, 0, 1, 0, 32] {
        check(false, what);
        return None;
    }
    let mut value = [0u8; 32];
    value.copy_from_slice(&r[30..62]);
    Some(value)
}

fn pcr_extend(digest: &[u8; 32]) -> bool {
    let mut command = [0u8; 65];
    command[..33].copy_from_slice(&[
        0x80, 0x02, 0, 0, 0, 65, 0, 0, 0x01, 0x82, 0, 0, 0, PCR, 0, 0, 0, 9, 0x40, 0, 0, 9, 0,
        0, 0, 0, 0, 0, 0, 0, 1, 0, 0x0b,
    ]);
    command[33..].copy_from_slice(digest);
    let mut r = [0u8; 64];
    matches!(tpm(&command, &mut r, "PCR_Extend"), Some(_)) && rc(&r) == 0
}

/// Extends between two progress lines of the extend loop.
const EXTEND_PROGRESS: u64 = 100;

fn tpm_checks(extends: u64) {
    let id = mmio_read32(TIS + DID_VID);
    puts("guest: TPM TIS at 0xfed40000, DID_VID ");
    put_hex(u64::from(id));
    putc(b'\n');
    // All ones (nothing decodes the address) or all zeros: no TPM, as Linux's tpm_tis sees a
    // missing chip. Its steps are skipped: every poll of a session would time out, each an
    // exit (seconds per step on a loaded machine). With `tpm=1` a TPM was expected, so this
    // is a failed check; the guest goes on with the next step.
    if id == 0xffff_ffff || id == 0 {
        puts("guest: FAIL no TPM at 0xfed40000 (DID_VID ");
        put_hex(u64::from(id));
        puts("): TPM checks skipped\n");
        FAILURES.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut r = [0u8; 128];
    let startup = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0];
    if let Some(_) = tpm(&startup, &mut r, "Startup") {
        // TPM_RC_INITIALIZE (0x100): already started (by the paravisor, as firmware would).
        let code = rc(&r);
        check(code == 0 || code == 0x100, "TPM2_Startup(CLEAR)");
    }
    let get_random = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7b, 0, 16];
    if let Some(n) = tpm(&get_random, &mut r, "GetRandom") {
        let ok = n == 28 && rc(&r) == 0 && r[10..12] == [0, 16] && r[12..28] != [0; 16];
        puts("guest: TPM2_GetRandom(16) = ");
        put_bytes(&r[12..28.min(n.max(12))]);
        putc(b'\n');
        check(ok, "TPM2_GetRandom(16)");
    }
    let Some(before) = pcr_read("PCR_Read") else {
        return;
    };
    puts("guest: PCR16 = ");
    put_bytes(&before);
    putc(b'\n');
    let digest = sha256::digest(&[b"paravisor test guest"]);
    let extended = pcr_extend(&digest);
    check(extended, "TPM2_PCR_Extend(16)");
    let expected = sha256::digest(&[&before, &digest]);
    if let Some(after) = pcr_read("PCR_Read") {
        puts("guest: PCR16 = ");
        put_bytes(&after);
        putc(b'\n');
        check(after == expected, "PCR16 = SHA-256(old || digest)");
    }
    if extends == 0 {
        return;
    }
    puts("guest: extend loop of ");
    put_dec(extends);
    puts(" started\n");
    let mut chain = expected;
    let start = match pcr_read("PCR_Read") {
        Some(v) => v,
        None => return,
    };
    if start != chain {
        chain = start;
    }
    let mut all = true;
    for i in 0..extends {
        let d = sha256::digest(&[b"extend ", &i.to_le_bytes()]);
        if !pcr_extend(&d) {
            all = false;
            break;
        }
        chain = sha256::digest(&[&chain, &d]);
        // Progress (a slow loop on a busy machine is not a hung one).
        if (i + 1) % EXTEND_PROGRESS == 0 && i + 1 < extends {
            puts("guest: extends done: ");
            put_dec(i + 1);
            putc(b'\n');
        }
    }
    check(all, "every extend of the loop answered");
    if let Some(last) = pcr_read("PCR_Read") {
        puts("guest: PCR16 = ");
        put_bytes(&last);
        putc(b'\n');
        check(last == chain, "extend loop: PCR16 equals the hash chain");
    }
}

// ---- interrupts ----

/// IOAPIC inputs (redirection entries).
const IOAPIC_LINES: u8 = 24;

/// Routes IOAPIC input `line` to `vector` on APIC 0 (fixed, edge, active high), with the
/// legacy PIC masked (its lines would otherwise arrive at its own, unprogrammed vectors) and
/// the local APIC enabled.
fn route_line(line: u8, vector: u8) {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    mmio_write32(LAPIC + 0xF0, 0x100 | u32::from(arch::SPURIOUS_VECTOR));
    mmio_write32(LAPIC + 0x80, 0);
    let entry = 0x10 + 2 * u32::from(line);
    // Destination (APIC 0) first, then the low half, which unmasks.
    mmio_write32(IOAPIC, entry + 1);
    mmio_write32(IOAPIC + 0x10, 0);
    mmio_write32(IOAPIC, entry);
    mmio_write32(IOAPIC + 0x10, u32::from(vector));
}

/// Masks IOAPIC input `line` again (as it was at reset).
fn mask_line(line: u8) {
    mmio_write32(IOAPIC, 0x10 + 2 * u32::from(line));
    mmio_write32(IOAPIC + 0x10, 1 << 16);
}

fn interrupt_check() {
    // Route COM1's line 4 through the IOAPIC to vector 0x24 on APIC 0.
    route_line(4, arch::UART_VECTOR);
    let before = UART_INTERRUPTS.load(Ordering::SeqCst);
    // Interrupts on in ring 3 (the system call returns with IF set): the IDT has a gate for
    // every vector that can come.
    syscall(SYS_STI, 0, 0);
    // The UART's transmit-holding-register-empty interrupt: pending as soon as enabled.
    outb(COM1 + 1, 0x02);
    let start = rdtsc();
    let mut taken = false;
    // About 10^10 cycles at most; the interrupt comes in microseconds.
    while rdtsc().wrapping_sub(start) < 10_000_000_000 {
        if UART_INTERRUPTS.load(Ordering::SeqCst) != before {
            taken = true;
            break;
        }
        core::hint::spin_loop();
    }
    syscall(SYS_CLI, 0, 0);
    outb(COM1 + 1, 0);
    check(taken, "COM1 interrupt (line 4 -> IOAPIC -> vector 0x24) taken");
}

// ---- benchmark ----

/// Cycles per read of `port`, `n` reads in one ring-0 loop.
fn time_port(port: u16, n: u64) -> u64 {
    let start = rdtsc();
    inb_loop(port, n);
    rdtsc().wrapping_sub(start) / n
}

fn bench(n: u64) {
    // Warm both paths, then alternate halves so that drift hits both alike.
    let _ = time_port(COM1 + 7, 16);
    let _ = time_port(IN_THREAD_PORT, 16);
    let half = (n / 2).max(1);
    let service = (time_port(COM1 + 7, half) + time_port(COM1 + 7, half)) / 2;
    let in_thread = (time_port(IN_THREAD_PORT, half) + time_port(IN_THREAD_PORT, half)) / 2;
    puts("guest: bench ");
    put_dec(half * 2);
    puts(" port reads each: service (intercept) ");
    put_dec(service);
    puts(" cycles/exit, in-thread ");
    put_dec(in_thread);
    puts(" cycles/exit, ratio ");
    let ratio = service * 100 / in_thread.max(1);
    put_dec(ratio / 100);
    putc(b'.');
    put_dec(ratio % 100 / 10);
    put_dec(ratio % 10);
    putc(b'\n');
}
