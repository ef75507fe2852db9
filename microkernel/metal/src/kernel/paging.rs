//! Page tables: the kernel's identity map and one address space per task.
//!
//! Every address space has the same top: PML4[0] → its own PDPT, whose
//! - entry 0 is the kernel's page directory: RAM below 1 GiB identity mapped in 2 MiB pages,
//!   supervisor only (a task that reads or writes there, another task's frames or its own
//!   page tables included, takes a page fault);
//! - entry 1 is the task's own directory for the user window (1-2 GiB) in 4 KiB pages;
//! - entry 3 is the kernel's directory for the local APIC's page (supervisor, uncached).
//!
//! A user page the task owns (image, heap, stack, boot record) carries [`OWNED`]; a shared
//! page (a channel's or a region's) does not, so tearing an address space down frees exactly
//! the task's own frames.

use ipc_defs::metal::PAGE;
use ipc_defs::metal::USER_END;
use pv_metal::frames::Frames;
use x86_64::registers::control::Cr3;
use x86_64::registers::control::Cr3Flags;
use x86_64::structures::paging::PageTable;
use x86_64::structures::paging::PageTableFlags as F;
use x86_64::structures::paging::PhysFrame;
use x86_64::PhysAddr;

/// An available PTE bit: the frame belongs to this address space.
pub const OWNED: F = F::BIT_9;

/// The local APIC's page.
pub const APIC_BASE: u64 = 0xFEE0_0000;

/// Why a mapping failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, defmt::Format)]
pub enum MapError {
    /// No free frame.
    OutOfMemory,
    /// Outside the user window, or already mapped.
    Address(u64),
}

/// The frame at `phys`, as a page table (through the identity map).
fn table(phys: u64) -> &'static mut PageTable {
    // SAFETY: page-table frames come from the frame allocator, below 1 GiB (identity mapped
    // in every address space), and each is used as a table by one owner at a time; the
    // kernel runs on one CPU with interrupts off, so no two references are alive at once
    // beyond the call that made them.
    unsafe { &mut *(phys as *mut PageTable) }
}

/// A fresh zeroed frame.
pub fn zeroed_frame(frames: &mut Frames) -> Result<u64, MapError> {
    let frame = frames.alloc().ok_or(MapError::OutOfMemory)?;
    // SAFETY: a free frame below 1 GiB (identity mapped), now ours alone.
    unsafe { core::ptr::write_bytes(frame as *mut u8, 0, PAGE as usize) };
    Ok(frame)
}

/// The kernel's shared directories.
pub struct Kernel {
    /// The identity map of the first GiB.
    low: u64,
    /// The local APIC's page.
    apic: u64,
    /// The kernel's own PML4 (used while no task runs).
    root: u64,
}

impl Kernel {
    /// Builds the kernel's map and switches to it.
    pub fn init(frames: &mut Frames) -> Result<Kernel, MapError> {
        let low = zeroed_frame(frames)?;
        for (i, entry) in table(low).iter_mut().enumerate() {
            entry.set_addr(
                PhysAddr::new(i as u64 * 0x20_0000),
                F::PRESENT | F::WRITABLE | F::HUGE_PAGE,
            );
        }
        let apic = zeroed_frame(frames)?;
        let slot = ((APIC_BASE >> 21) & 511) as usize;
        table(apic)[slot].set_addr(
            PhysAddr::new(APIC_BASE),
            F::PRESENT
                | F::WRITABLE
                | F::HUGE_PAGE
                | F::NO_CACHE
                | F::WRITE_THROUGH
                | F::NO_EXECUTE,
        );
        let mut k = Kernel { low, apic, root: 0 };
        k.root = k.new_top(frames, None)?;
        k.switch_to(k.root);
        Ok(k)
    }

    /// A PML4 with the kernel's directories and, if given, a task's user directory.
    fn new_top(&self, frames: &mut Frames, user: Option<u64>) -> Result<u64, MapError> {
        let pdpt = zeroed_frame(frames)?;
        let pml4 = match zeroed_frame(frames) {
            Ok(f) => f,
            Err(e) => {
                let _ = frames.free(pdpt);
                return Err(e);
            }
        };
        let directories = table(pdpt);
        directories[0].set_addr(PhysAddr::new(self.low), F::PRESENT | F::WRITABLE);
        directories[3].set_addr(PhysAddr::new(self.apic), F::PRESENT | F::WRITABLE);
        if let Some(user) = user {
            directories[1].set_addr(
                PhysAddr::new(user),
                F::PRESENT | F::WRITABLE | F::USER_ACCESSIBLE,
            );
        }
        table(pml4)[0].set_addr(
            PhysAddr::new(pdpt),
            F::PRESENT | F::WRITABLE | F::USER_ACCESSIBLE,
        );
        Ok(pml4)
    }

    /// Loads `root` into CR3 (unless it is loaded already).
    pub fn switch_to(&self, root: u64) {
        if Cr3::read().0.start_address().as_u64() == root {
            return;
        }
        let frame = PhysFrame::containing_address(PhysAddr::new(root));
        // SAFETY: every root this kernel makes maps the kernel (code, data, stacks, tables)
        // at the same addresses, so execution continues unchanged.
        unsafe { Cr3::write(frame, Cr3Flags::empty()) };
    }

    /// The kernel's own root (no task).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// A new, empty task address space.
    pub fn new_space(&self, frames: &mut Frames) -> Result<Space, MapError> {
        let user = zeroed_frame(frames)?;
        match self.new_top(frames, Some(user)) {
            Ok(root) => Ok(Space { root, user }),
            Err(e) => {
                let _ = frames.free(user);
                Err(e)
            }
        }
    }
}

/// A task's address space.
pub struct Space {
    /// Its PML4.
    pub root: u64,
    /// Its user directory (1-2 GiB).
    user: u64,
}

/// How a user page is mapped.
#[derive(Clone, Copy)]
pub struct Access {
    pub writable: bool,
    pub executable: bool,
    /// The task's own frame (freed with the space), or a shared one.
    pub owned: bool,
}

fn user_index(va: u64) -> Option<(usize, usize)> {
    if !(ipc_defs::metal::IMAGE_BASE..USER_END).contains(&va) || !va.is_multiple_of(PAGE) {
        return None;
    }
    Some((((va >> 21) & 511) as usize, ((va >> 12) & 511) as usize))
}

impl Space {
    /// Maps the frame at `phys` at user address `va`.
    pub fn map(
        &mut self,
        frames: &mut Frames,
        va: u64,
        phys: u64,
        access: Access,
    ) -> Result<(), MapError> {
        let (pd, pt) = user_index(va).ok_or(MapError::Address(va))?;
        let directory = table(self.user);
        if directory[pd].is_unused() {
            let frame = zeroed_frame(frames)?;
            directory[pd].set_addr(
                PhysAddr::new(frame),
                F::PRESENT | F::WRITABLE | F::USER_ACCESSIBLE,
            );
        }
        let entry = &mut table(directory[pd].addr().as_u64())[pt];
        if !entry.is_unused() {
            return Err(MapError::Address(va));
        }
        let mut flags = F::PRESENT | F::USER_ACCESSIBLE;
        if access.writable {
            flags |= F::WRITABLE;
        }
        if !access.executable {
            flags |= F::NO_EXECUTE;
        }
        if access.owned {
            flags |= OWNED;
        }
        entry.set_addr(PhysAddr::new(phys), flags);
        Ok(())
    }

    /// Maps a fresh zeroed frame of the task's own at `va`; returns the frame.
    pub fn map_new(
        &mut self,
        frames: &mut Frames,
        va: u64,
        writable: bool,
        executable: bool,
    ) -> Result<u64, MapError> {
        let frame = zeroed_frame(frames)?;
        let access = Access {
            writable,
            executable,
            owned: true,
        };
        if let Err(e) = self.map(frames, va, frame, access) {
            let _ = frames.free(frame);
            return Err(e);
        }
        Ok(frame)
    }

    /// The physical address behind user address `va`, if the task may access it (`write`:
    /// for writing).
    pub fn translate(&self, va: u64, write: bool) -> Option<u64> {
        let (pd, pt) = user_index(va & !(PAGE - 1))?;
        let directory = table(self.user);
        if directory[pd].is_unused() {
            return None;
        }
        let entry = &table(directory[pd].addr().as_u64())[pt];
        let flags = entry.flags();
        if !flags.contains(F::PRESENT | F::USER_ACCESSIBLE)
            || (write && !flags.contains(F::WRITABLE))
        {
            return None;
        }
        Some(entry.addr().as_u64() + (va & (PAGE - 1)))
    }

    /// Frees the task's own frames and every table of the space.
    pub fn destroy(self, frames: &mut Frames) {
        let directory = table(self.user);
        for entry in directory.iter() {
            if entry.is_unused() {
                continue;
            }
            let pt = entry.addr().as_u64();
            for page in table(pt).iter() {
                if !page.is_unused() && page.flags().contains(OWNED) {
                    let _ = frames.free(page.addr().as_u64());
                }
            }
            let _ = frames.free(pt);
        }
        let pdpt = table(self.root)[0].addr().as_u64();
        for frame in [self.user, pdpt, self.root] {
            let _ = frames.free(frame);
        }
    }
}
