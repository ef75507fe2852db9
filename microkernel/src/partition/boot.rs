//! Putting a guest image into RAM and the boot vCPU into the state it expects.
//!
//! Both images start in 64-bit mode on page tables the loader builds: an identity map of the
//! low 4 GiB in 2 MiB pages (user-accessible, so that the test guest's ring-3 code reaches
//! its device registers), flat code and data segments.
//! - The test guest (an ELF image linked at 1 MiB) gets its command line's address in RSI.
//! - Linux (a bzImage) gets the 64-bit boot protocol: the zero page in RSI, with the E820
//!   map, the command line, the initrd, and ACPI tables (see [`super::acpi`]).

use std::io::Cursor;

use kvm_bindings::kvm_regs;
use kvm_bindings::kvm_segment;
use kvm_bindings::kvm_sregs;
use linux_loader::bootparam::boot_params;
use linux_loader::loader::KernelLoader;
use vm_memory::ByteValued;
use vm_memory::Bytes;
use vm_memory::GuestAddress;
use vm_memory::GuestMemoryMmap;

/// Where the loader puts its structures (all below 1 MiB, outside any image).
pub const GDT: u64 = 0x500;
pub const ZERO_PAGE: u64 = 0x7000;
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xA000;
/// Four page directories (0xB000..0xF000) map 4 GiB.
pub const PD: u64 = 0xB000;
pub const COMMAND_LINE: u64 = 0x20000;
/// Longest command line we place.
pub const COMMAND_LINE_MAX: usize = 2048;
/// Where images start (the classic "high memory" start).
pub const HIGH_MEMORY: u64 = 0x10_0000;

/// The selectors the 64-bit boot protocol names (`__BOOT_CS`, `__BOOT_DS`).
const CODE_SELECTOR: u16 = 0x10;
const DATA_SELECTOR: u16 = 0x18;
const TSS_SELECTOR: u16 = 0x20;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("guest image: {0}")]
    Image(String),
    #[error("writing guest memory: {0}")]
    Memory(String),
    #[error("command line of {0} bytes (at most {COMMAND_LINE_MAX})")]
    CommandLine(usize),
}

fn mem_err(e: impl std::fmt::Display) -> BootError {
    BootError::Memory(e.to_string())
}

/// The boot vCPU's registers after loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub rip: u64,
    /// RSI at entry: the command line (test guest) or the zero page (Linux).
    pub rsi: u64,
}

/// Identity page tables for 0..4 GiB and the GDT.
pub fn write_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    const PRESENT_RW_USER: u64 = 0b111;
    const HUGE: u64 = 1 << 7;
    mem.write_obj(PDPT | PRESENT_RW_USER, GuestAddress(PML4))
        .map_err(mem_err)?;
    for i in 0..4u64 {
        let pd = PD + i * 0x1000;
        mem.write_obj(pd | PRESENT_RW_USER, GuestAddress(PDPT + i * 8))
            .map_err(mem_err)?;
        for j in 0..512u64 {
            let frame = ((i * 512 + j) << 21) | PRESENT_RW_USER | HUGE;
            mem.write_obj(frame, GuestAddress(pd + j * 8))
                .map_err(mem_err)?;
        }
    }
    for (i, entry) in gdt_entries().iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT + i as u64 * 8))
            .map_err(mem_err)?;
    }
    Ok(())
}

fn gdt_entries() -> [u64; 5] {
    [
        0,
        0,
        0x00AF_9B00_0000_FFFF, // 0x10 code: 64-bit, present, DPL 0, accessed
        0x00CF_9300_0000_FFFF, // 0x18 data: present, writable, accessed
        0x0000_8B00_0000_0067, // 0x20 TSS (busy), base 0: the guest loads its own
    ]
}

fn segment(selector: u16, entry: u64) -> kvm_segment {
    kvm_segment {
        base: ((entry >> 16) & 0xFF_FFFF) | ((entry >> 32) & 0xFF00_0000),
        limit: ((entry & 0xFFFF) | ((entry >> 32) & 0xF_0000)) as u32,
        selector,
        type_: ((entry >> 40) & 0xF) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// 64-bit mode on the loader's page tables and GDT.
pub fn long_mode(sregs: &mut kvm_sregs) {
    let gdt = gdt_entries();
    let code = segment(CODE_SELECTOR, gdt[2]);
    let data = segment(DATA_SELECTOR, gdt[3]);
    let mut tss = segment(TSS_SELECTOR, gdt[4]);
    // A TSS limit counts bytes (G = 0).
    tss.g = 0;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    // PE, MP, ET, NE, WP, AM, PG
    sregs.cr0 = 0x8005_0033;
    // PAE, OSFXSR, OSXMMEXCPT
    sregs.cr4 = 0x620;
    sregs.cr3 = PML4;
    // LME, LMA
    sregs.efer = 0x500;
}

/// Where the boot vCPU will start for `image`, known before anything is loaded (the launch
/// measurement includes it): the ELF header's entry point with the command line in RSI for
/// the test guest; the 64-bit entry of a bzImage loaded at 1 MiB with the zero page in RSI.
pub fn expected_entry(image: &super::Image) -> Entry {
    match image {
        super::Image::TestGuest { path, .. } => {
            let mut header = [0u8; 32];
            let n = match path {
                None => {
                    let n = super::TEST_GUEST.len().min(32);
                    header[..n].copy_from_slice(&super::TEST_GUEST[..n]);
                    n
                }
                Some(p) => std::fs::File::open(p)
                    .and_then(|mut f| std::io::Read::read(&mut f, &mut header))
                    .unwrap_or(0),
            };
            let rip = if n >= 32 {
                u64::from_le_bytes(header[24..32].try_into().unwrap_or([0; 8]))
            } else {
                0
            };
            Entry {
                rip,
                rsi: COMMAND_LINE,
            }
        }
        super::Image::Linux { .. } => Entry {
            rip: HIGH_MEMORY + 0x200,
            rsi: ZERO_PAGE,
        },
    }
}

pub fn entry_regs(entry: Entry) -> kvm_regs {
    kvm_regs {
        rip: entry.rip,
        rsi: entry.rsi,
        rsp: HIGH_MEMORY - 0x10,
        rflags: 0x2,
        ..Default::default()
    }
}

fn write_command_line(mem: &GuestMemoryMmap, line: &str) -> Result<(), BootError> {
    if line.len() >= COMMAND_LINE_MAX || line.contains('\0') {
        return Err(BootError::CommandLine(line.len()));
    }
    let mut bytes = line.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(COMMAND_LINE))
        .map_err(mem_err)
}

/// Loads an ELF image (the test guest) and its command line.
pub fn load_elf(
    mem: &GuestMemoryMmap,
    image: &[u8],
    command_line: &str,
) -> Result<Entry, BootError> {
    let result = linux_loader::loader::Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(HIGH_MEMORY)),
    )
    .map_err(|e| BootError::Image(format!("not a loadable x86-64 ELF image: {e}")))?;
    write_command_line(mem, command_line)?;
    Ok(Entry {
        rip: result.kernel_load.0,
        rsi: COMMAND_LINE,
    })
}

/// E820 types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Loads a bzImage with the 64-bit boot protocol: kernel at 1 MiB, initrd at the top of RAM,
/// zero page with the E820 map and command line; the ACPI tables' RSDP pointer goes in the
/// zero page too.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    ram_size: u64,
    kernel: &[u8],
    initrd: Option<&[u8]>,
    command_line: &str,
    rsdp: u64,
) -> Result<Entry, BootError> {
    let result = linux_loader::loader::BzImage::load(
        mem,
        None,
        &mut Cursor::new(kernel),
        Some(GuestAddress(HIGH_MEMORY)),
    )
    .map_err(|e| {
        BootError::Image(format!(
            "not a bzImage the 64-bit boot protocol can load: {e}"
        ))
    })?;
    let mut params = boot_params {
        hdr: result
            .setup_header
            .ok_or_else(|| BootError::Image("bzImage without a setup header".into()))?,
        ..Default::default()
    };
    // Boot protocol 2.12 or later is needed for the 64-bit entry point (xloadflags bit 0).
    let (version, xloadflags) = (params.hdr.version, params.hdr.xloadflags);
    if version < 0x020c || xloadflags & 1 == 0 {
        return Err(BootError::Image(format!(
            "the kernel's boot protocol ({version:#x}) has no 64-bit entry point"
        )));
    }
    let cmdline_limit = params.hdr.cmdline_size;
    if cmdline_limit != 0 && command_line.len() as u64 >= u64::from(cmdline_limit) {
        return Err(BootError::CommandLine(command_line.len()));
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.loadflags |= 0x01; // LOADED_HIGH
    params.hdr.cmd_line_ptr = COMMAND_LINE as u32;
    write_command_line(mem, command_line)?;
    if let Some(initrd) = initrd {
        let initrd_max = params.hdr.initrd_addr_max;
        let max = u64::from(initrd_max).min(ram_size - 1);
        let len = initrd.len() as u64;
        let at = max
            .checked_sub(len)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= result.kernel_end)
            .ok_or_else(|| {
                BootError::Image(format!("initrd of {len} bytes does not fit in RAM"))
            })?;
        mem.write_slice(initrd, GuestAddress(at)).map_err(mem_err)?;
        params.hdr.ramdisk_image = at as u32;
        params.hdr.ramdisk_size = len as u32;
    }
    let e820: [(u64, u64, u32); 3] = [
        (0, 0x9_fc00, E820_RAM),
        (0x9_fc00, HIGH_MEMORY - 0x9_fc00, E820_RESERVED),
        (HIGH_MEMORY, ram_size - HIGH_MEMORY, E820_RAM),
    ];
    for (i, (addr, size, kind)) in e820.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *kind;
    }
    params.e820_entries = e820.len() as u8;
    params.acpi_rsdp_addr = rsdp;
    mem.write_slice(params.as_slice(), GuestAddress(ZERO_PAGE))
        .map_err(mem_err)?;
    // The 64-bit entry point is 0x200 past the protected-mode code's start.
    Ok(Entry {
        rip: result.kernel_load.0 + 0x200,
        rsi: ZERO_PAGE,
    })
}
