//! Ring 0: the guest's own GDT (kernel and user segments, a TSS), an IDT whose gates lead to
//! one trap handler, and the drop to ring 3. On PVM every ring-0 instruction is emulated, so
//! ring 0 does only this set-up and the trap handlers; the work runs in ring 3.

use core::arch::asm;
use core::arch::global_asm;
use core::ptr::addr_of;
use core::ptr::addr_of_mut;

pub const KERNEL_CODE: u16 = 0x08;
pub const KERNEL_DATA: u16 = 0x10;
pub const USER_CODE: u16 = 0x18 | 3;
pub const USER_DATA: u16 = 0x20 | 3;
pub const TSS_SELECTOR: u16 = 0x28;

/// The vector the IOAPIC delivers COM1's line 4 at.
pub const UART_VECTOR: u8 = 0x24;
/// The vector the IOAPIC delivers the NVMe function's INTx line at (`nvme-irq=1`).
pub const NVME_VECTOR: u8 = 0x25;
/// The vector the IOAPIC delivers the virtio-net function's INTx line at (`net-irq=1`).
pub const NET_VECTOR: u8 = 0x26;
/// The local APIC's spurious vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// The system call vector (a DPL-3 gate): ring 3 asks ring 0 for port I/O and for
/// interrupts on or off. (IOPL 3 would allow those in ring 3 itself, but PVM keeps a guest's
/// user mode at IOPL 0: `in`/`out` there fault.)
pub const SYSCALL_VECTOR: u8 = 0x81;

/// RFLAGS in ring 3: interrupts off, reserved bit 1.
const USER_RFLAGS: u64 = 0x0002;

#[repr(C, align(16))]
struct Gdt([u64; 7]);

#[repr(C, packed)]
struct Tss {
    _reserved0: u32,
    rsp0: u64,
    rsp1: u64,
    rsp2: u64,
    _reserved1: u64,
    ist: [u64; 7],
    _reserved2: u64,
    _reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct Idt([[u64; 2]; 256]);

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

#[repr(C, align(16))]
pub struct Stack(pub [u8; 16384]);

static mut GDT: Gdt = Gdt([0; 7]);
static mut TSS: Tss = Tss {
    _reserved0: 0,
    rsp0: 0,
    rsp1: 0,
    rsp2: 0,
    _reserved1: 0,
    ist: [0; 7],
    _reserved2: 0,
    _reserved3: 0,
    iomap_base: 0,
};
static mut IDT: Idt = Idt([[0; 2]; 256]);
/// The stack traps run on (TSS.rsp0).
static mut TRAP_STACK: Stack = Stack([0; 16384]);

/// What the trap stubs push, lowest address first.
#[repr(C)]
pub struct TrapFrame {
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

// One stub per vector we install: exceptions 0..=31, the UART's and the NVMe function's
// vectors, the system call and the spurious vector. Vectors with a CPU-pushed error code push
// only their number; the others push a zero first, so every frame has the same shape.
global_asm!(
    ".macro TRAP_NOERR n",
    "trap_stub_\\n:",
    "    push 0",
    "    push \\n",
    "    jmp trap_common",
    ".endm",
    ".macro TRAP_ERR n",
    "trap_stub_\\n:",
    "    push \\n",
    "    jmp trap_common",
    ".endm",
    ".section .text",
    ".irp n, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,36,37,38,129,255",
    "TRAP_NOERR \\n",
    ".endr",
    ".irp n, 8,10,11,12,13,14,17,21,29,30",
    "TRAP_ERR \\n",
    ".endr",
    "trap_common:",
    "    push rax",
    "    push rcx",
    "    push rdx",
    "    push rsi",
    "    push rdi",
    "    push r8",
    "    push r9",
    "    push r10",
    "    push r11",
    "    mov rdi, rsp",
    "    cld",
    "    call {handler}",
    "    pop r11",
    "    pop r10",
    "    pop r9",
    "    pop r8",
    "    pop rdi",
    "    pop rsi",
    "    pop rdx",
    "    pop rcx",
    "    pop rax",
    "    add rsp, 16",
    "    iretq",
    ".section .rodata",
    ".balign 8",
    ".global trap_stubs",
    "trap_stubs:",
    ".irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,36,37,129,255,38",
    "    .quad trap_stub_\\n",
    ".endr",
    handler = sym crate::trap,
);

extern "C" {
    static trap_stubs: [u64; 37];
}

fn gate(handler: u64, user_callable: bool) -> [u64; 2] {
    // Present, interrupt gate (interrupts off on entry), DPL 0 or 3.
    let attributes: u64 = if user_callable { 0xEE } else { 0x8E };
    let low = (handler & 0xFFFF)
        | (u64::from(KERNEL_CODE) << 16)
        | (attributes << 40)
        | ((handler >> 16) & 0xFFFF) << 48;
    [low, handler >> 32]
}

/// Loads the GDT (with the TSS), the IDT, and the segment registers.
///
/// # Safety
/// Ring 0, once, before anything relies on the segments.
pub unsafe fn setup() {
    let tss = addr_of!(TSS) as u64;
    let trap_top = addr_of!(TRAP_STACK) as u64 + core::mem::size_of::<Stack>() as u64;
    addr_of_mut!(TSS.rsp0).write_unaligned(trap_top);
    addr_of_mut!(TSS.iomap_base).write_unaligned(core::mem::size_of::<Tss>() as u16);
    let limit = core::mem::size_of::<Tss>() as u64 - 1;
    let tss_low = (limit & 0xFFFF)
        | ((tss & 0xFF_FFFF) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xF) << 48)
        | (((tss >> 24) & 0xFF) << 56);
    let gdt = addr_of_mut!(GDT.0);
    (*gdt) = [
        0,
        0x00AF_9A00_0000_FFFF, // kernel code, 64-bit
        0x00CF_9200_0000_FFFF, // kernel data
        0x00AF_FA00_0000_FFFF, // user code, 64-bit, DPL 3
        0x00CF_F200_0000_FFFF, // user data, DPL 3
        tss_low,
        tss >> 32,
    ];
    let gdt_pointer = DescriptorPointer {
        limit: (core::mem::size_of::<Gdt>() - 1) as u16,
        base: gdt as u64,
    };
    asm!(
        "lgdt [{p}]",
        "push {code}",
        "lea {tmp}, [rip + 2f]",
        "push {tmp}",
        "retfq",
        "2:",
        "mov ds, {data:x}",
        "mov es, {data:x}",
        "mov ss, {data:x}",
        "ltr {tss:x}",
        p = in(reg) &gdt_pointer,
        code = in(reg) u64::from(KERNEL_CODE),
        tmp = out(reg) _,
        data = in(reg) u64::from(KERNEL_DATA),
        tss = in(reg) u64::from(TSS_SELECTOR),
    );

    let stubs = &*addr_of!(trap_stubs);
    let idt = addr_of_mut!(IDT.0);
    for (vector, stub) in stubs.iter().take(32).enumerate() {
        (*idt)[vector] = gate(*stub, false);
    }
    (*idt)[usize::from(UART_VECTOR)] = gate(stubs[32], false);
    (*idt)[usize::from(NVME_VECTOR)] = gate(stubs[33], false);
    (*idt)[usize::from(SYSCALL_VECTOR)] = gate(stubs[34], true);
    (*idt)[usize::from(SPURIOUS_VECTOR)] = gate(stubs[35], false);
    (*idt)[usize::from(NET_VECTOR)] = gate(stubs[36], false);
    let idt_pointer = DescriptorPointer {
        limit: (core::mem::size_of::<Idt>() - 1) as u16,
        base: idt as u64,
    };
    asm!("lidt [{p}]", p = in(reg) &idt_pointer);
}

/// Leaves ring 0 for good: `entry` runs in ring 3 on `stack_top`, interrupts off.
///
/// # Safety
/// After [`setup`]; `stack_top` must be the top of a mapped, user-accessible stack.
pub unsafe fn enter_user(entry: extern "C" fn() -> !, stack_top: u64) -> ! {
    asm!(
        "push {ss}",
        "push {rsp}",
        "push {rflags}",
        "push {cs}",
        "push {rip}",
        "iretq",
        ss = in(reg) u64::from(USER_DATA),
        rsp = in(reg) stack_top,
        rflags = in(reg) USER_RFLAGS,
        cs = in(reg) u64::from(USER_CODE),
        rip = in(reg) entry as usize as u64,
        options(noreturn),
    );
}
