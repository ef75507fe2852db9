//! Descriptor tables and the one way into the kernel.
//!
//! GDT: kernel code and data, user data and code (the order `sysret` would want), and the
//! TSS, whose RSP0 is the trap stack every entry from ring 3 lands on and whose IST1 is a
//! separate stack for double faults.
//!
//! IDT: the 32 exceptions, the timer and the system call gate (the only DPL-3 gate). Every
//! entry stub pushes the same [`TrapFrame`] (error code or zero, vector, then the general
//! registers) and calls [`crate::trap`]; what the frame holds when that returns is what
//! `iretq` resumes, which is how the kernel switches tasks: it swaps the frame's contents.

use core::arch::global_asm;

use x86_64::instructions::segmentation::Segment;
use x86_64::instructions::segmentation::CS;
use x86_64::instructions::segmentation::DS;
use x86_64::instructions::segmentation::ES;
use x86_64::instructions::segmentation::SS;
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::Descriptor;
use x86_64::structures::gdt::GlobalDescriptorTable;
use x86_64::structures::gdt::SegmentSelector;
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::structures::tss::TaskStateSegment;
use x86_64::PrivilegeLevel;
use x86_64::VirtAddr;

/// The timer's vector.
pub const TIMER_VECTOR: u8 = 0x20;
/// The local APIC's spurious vector.
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// What every entry pushes, lowest address first.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// Whether the trap came from ring 3.
    pub fn from_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

// Entry stubs. Vectors 8, 10-14, 17, 21, 29 and 30 push an error code; the others push 0 in
// its place. The common part saves the registers, calls `trap` with the frame, and restores
// whatever the frame then holds.
macro_rules! stubs {
    ($($vector:literal $kind:ident),* $(,)?) => {
        global_asm!(
            ".text",
            $(
                concat!(".global trap_", stringify!($vector)),
                concat!("trap_", stringify!($vector), ":"),
                stubs!(@push $kind),
                concat!("push ", stringify!($vector)),
                "jmp trap_common",
            )*
        );
    };
    (@push code) => { "" };
    (@push none) => { "push 0" };
}

stubs!(
    0 none, 1 none, 2 none, 3 none, 4 none, 5 none, 6 none, 7 none, 8 code, 10 code,
    11 code, 12 code, 13 code, 14 code, 16 none, 17 code, 18 none, 19 none, 20 none,
    21 code, 28 none, 29 code, 30 code, 32 none, 129 none, 255 none,
);

global_asm!(
    ".text",
    "trap_common:",
    "push rax",
    "push rbx",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push rbp",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "cld",
    "mov rdi, rsp",
    "call trap",
    ".global trap_return",
    "trap_return:",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rbp",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rbx",
    "pop rax",
    "add rsp, 16",
    "iretq",
);

extern "C" {
    fn trap_0();
    fn trap_1();
    fn trap_2();
    fn trap_3();
    fn trap_4();
    fn trap_5();
    fn trap_6();
    fn trap_7();
    fn trap_8();
    fn trap_10();
    fn trap_11();
    fn trap_12();
    fn trap_13();
    fn trap_14();
    fn trap_16();
    fn trap_17();
    fn trap_18();
    fn trap_19();
    fn trap_20();
    fn trap_21();
    fn trap_28();
    fn trap_29();
    fn trap_30();
    fn trap_32();
    fn trap_129();
    fn trap_255();
}

const TRAP_STACK: usize = 256 * 1024;
const FAULT_STACK: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack<const N: usize>([u8; N]);

static mut TRAP_STACK_MEMORY: Stack<TRAP_STACK> = Stack([0; TRAP_STACK]);
static mut FAULT_STACK_MEMORY: Stack<FAULT_STACK> = Stack([0; FAULT_STACK]);

struct Gdt {
    gdt: GlobalDescriptorTable,
    kernel_code: SegmentSelector,
    kernel_data: SegmentSelector,
    user_code: SegmentSelector,
    user_data: SegmentSelector,
    tss: SegmentSelector,
}

static TSS: spin::Once<TaskStateSegment> = spin::Once::new();
static GDT: spin::Once<Gdt> = spin::Once::new();
static IDT: spin::Once<InterruptDescriptorTable> = spin::Once::new();

/// The top of the stack every trap from ring 3 lands on (the TSS's RSP0).
pub fn trap_stack_top() -> u64 {
    (&raw const TRAP_STACK_MEMORY) as u64 + TRAP_STACK as u64
}

/// The selectors a task runs with (code, data).
pub fn user_selectors() -> (u64, u64) {
    let g = GDT.get().expect("cpu::init ran");
    (u64::from(g.user_code.0), u64::from(g.user_data.0))
}

/// Loads the GDT, TSS and IDT.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        tss.privilege_stack_table[0] =
            VirtAddr::from_ptr(&raw const TRAP_STACK_MEMORY) + TRAP_STACK as u64;
        tss.interrupt_stack_table[0] =
            VirtAddr::from_ptr(&raw const FAULT_STACK_MEMORY) + FAULT_STACK as u64;
        tss
    });
    let g = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let kernel_code = gdt.append(Descriptor::kernel_code_segment());
        let kernel_data = gdt.append(Descriptor::kernel_data_segment());
        let user_code = gdt.append(Descriptor::user_code_segment());
        let user_data = gdt.append(Descriptor::user_data_segment());
        let tss = gdt.append(Descriptor::tss_segment(tss));
        Gdt {
            gdt,
            kernel_code,
            kernel_data,
            user_code,
            user_data,
            tss,
        }
    });
    g.gdt.load();
    // SAFETY: the selectors index the GDT just loaded; the TSS descriptor is its own.
    unsafe {
        CS::set_reg(g.kernel_code);
        DS::set_reg(g.kernel_data);
        ES::set_reg(g.kernel_data);
        SS::set_reg(g.kernel_data);
        load_tss(g.tss);
    }
    // The gates take the code selector CS holds when they are made: the GDT just loaded
    // (not the loader's, whose 0x08 may be anything).
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        let gate = |f: unsafe extern "C" fn()| VirtAddr::new(f as usize as u64);
        // SAFETY (each `set_handler_addr` below): the address is an entry stub that saves
        // the registers, calls `trap` and ends in `iretq`.
        macro_rules! set {
            ($($entry:ident = $stub:ident),* $(,)?) => {
                $(unsafe { idt.$entry.set_handler_addr(gate($stub)); })*
            };
        }
        set!(
            divide_error = trap_0,
            debug = trap_1,
            non_maskable_interrupt = trap_2,
            breakpoint = trap_3,
            overflow = trap_4,
            bound_range_exceeded = trap_5,
            invalid_opcode = trap_6,
            device_not_available = trap_7,
            invalid_tss = trap_10,
            segment_not_present = trap_11,
            stack_segment_fault = trap_12,
            general_protection_fault = trap_13,
            page_fault = trap_14,
            x87_floating_point = trap_16,
            alignment_check = trap_17,
            machine_check = trap_18,
            simd_floating_point = trap_19,
            virtualization = trap_20,
            cp_protection_exception = trap_21,
            hv_injection_exception = trap_28,
            vmm_communication_exception = trap_29,
            security_exception = trap_30,
        );
        // SAFETY: as above; IST1 is the fault stack, set in the TSS.
        unsafe {
            idt.double_fault
                .set_handler_addr(gate(trap_8))
                .set_stack_index(0);
        }
        // SAFETY: entry stubs, as above. The system call gate is the only one ring 3 may
        // name with `int`.
        unsafe {
            idt[TIMER_VECTOR].set_handler_addr(gate(trap_32));
            idt[SPURIOUS_VECTOR].set_handler_addr(gate(trap_255));
            idt[ipc_defs::metal::SYSCALL_VECTOR]
                .set_handler_addr(gate(trap_129))
                .set_privilege_level(PrivilegeLevel::Ring3);
        }
        idt
    });
    idt.load();
}
