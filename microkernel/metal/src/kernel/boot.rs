//! The two ways in, and what each says about the machine.
//!
//! - `_start` (the ELF entry), from our own partition's loader: 64-bit mode on identity page
//!   tables, the command line's address in RSI. RAM is `mem=` MiB of the command line
//!   (default 64, the partition's default).
//! - `pvh_start32` (named by the PVH ELF note, Xen's `PHYS32_ENTRY`), from QEMU's `-kernel`:
//!   32-bit protected mode without paging, the `hvm_start_info` address in EBX. It maps the
//!   first GiB, turns on long mode and joins the 64-bit path. RAM comes from the start
//!   info's memory map.
//!
//! Both call `kernel_main(info, kind)` on the boot stack.

use core::arch::global_asm;

/// How the kernel was entered.
#[derive(Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum Entry {
    /// Our partition: `info` is the command line's address.
    Partition,
    /// PVH: `info` is the `hvm_start_info` address.
    Pvh,
}

// The PVH note, the 32-bit entry and its boot page tables (1 GiB in 2 MiB pages), and the
// 64-bit entry. The boot GDT has a 64-bit code segment at 0x08 and data at 0x10; the kernel
// loads its real GDT as soon as it runs Rust code.
global_asm!(
    r#"
    .section .note.pvh, "a"
    .p2align 2
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .p2align 2
    .long pvh_start32

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %edi
    mov $boot_pdpt, %eax
    or $3, %eax
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $3, %eax
    mov %eax, boot_pdpt
    xor %ecx, %ecx
1:
    mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, boot_pd(,%ecx,8)
    inc %ecx
    cmp $512, %ecx
    jne 1b
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt boot_gdt_pointer
    ljmp $0x08, $pvh_start64

    .code64
pvh_start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov %edi, %edi
    mov $1, %esi
    jmp 2f

    .global _start
_start:
    cli
    cld
    mov %rsi, %rdi
    xor %esi, %esi
2:
    mov $boot_stack_top, %rsp
    xor %ebp, %ebp
    call kernel_main
3:
    hlt
    jmp 3b

    .section .rodata
    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
boot_gdt_pointer:
    .word 23
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .p2align 12
boot_stack:
    .space 524288
boot_stack_top:
boot_pml4:
    .space 4096
boot_pdpt:
    .space 4096
boot_pd:
    .space 4096
    .text
    "#,
    options(att_syntax)
);

/// Xen's `hvm_start_info` (version 1), as far as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// One `hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

const START_INFO_MAGIC: u32 = 0x336e_c578;
const MEMMAP_RAM: u32 = 1;

/// What the kernel learns at entry.
pub struct Machine {
    pub entry: Entry,
    /// The command line (at most 1 KiB; empty if none).
    pub cmdline: heapless::String<1024>,
    /// Usable RAM ranges (start, end), at most 16.
    pub ram: heapless::Vec<(u64, u64), 16>,
}

/// Reads a NUL-terminated string at physical `at` (identity mapped), at most the capacity.
fn read_cmdline(at: u64) -> heapless::String<1024> {
    let mut s = heapless::String::new();
    if at == 0 {
        return s;
    }
    for i in 0..1024u64 {
        // SAFETY: the loader put the command line at `at` in RAM, which the boot page
        // tables identity map; reading stops at its NUL or at 1 KiB.
        let b = unsafe { core::ptr::read_volatile((at + i) as *const u8) };
        if b == 0 || s.push(char::from(b)).is_err() {
            break;
        }
    }
    s
}

/// `key=` of a command line, as a number.
pub fn cmdline_number(cmdline: &str, key: &str) -> Option<u64> {
    cmdline.split_ascii_whitespace().find_map(|w| {
        let v = w.strip_prefix(key)?.strip_prefix('=')?;
        match v.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => v.parse().ok(),
        }
    })
}

/// The machine, from the entry's registers.
pub fn machine(info: u64, kind: u64) -> Machine {
    let mut m = Machine {
        entry: if kind == 1 {
            Entry::Pvh
        } else {
            Entry::Partition
        },
        cmdline: heapless::String::new(),
        ram: heapless::Vec::new(),
    };
    match m.entry {
        Entry::Partition => {
            m.cmdline = read_cmdline(info);
            let mib = cmdline_number(&m.cmdline, "mem").unwrap_or(64);
            let _ = m.ram.push((0, mib << 20));
        }
        Entry::Pvh => {
            // SAFETY: QEMU put the start info at `info` in low RAM (identity mapped); its
            // magic is checked before anything else is believed.
            let start = unsafe { core::ptr::read_unaligned(info as *const StartInfo) };
            if start.magic != START_INFO_MAGIC {
                return m;
            }
            m.cmdline = read_cmdline(start.cmdline_paddr);
            if start.version >= 1 {
                for i in 0..u64::from(start.memmap_entries.min(64)) {
                    let at = start.memmap_paddr + i * core::mem::size_of::<MemmapEntry>() as u64;
                    // SAFETY: the memory map QEMU describes, entry by entry, in low RAM.
                    let e = unsafe { core::ptr::read_unaligned(at as *const MemmapEntry) };
                    if e.kind == MEMMAP_RAM && m.ram.push((e.addr, e.addr + e.size)).is_err() {
                        break;
                    }
                }
            }
        }
    }
    m
}
