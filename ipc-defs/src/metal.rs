//! The metal platform's contract: what the image builder writes, the kernel enforces and a
//! task finds at its start.
//!
//! - [`TaskTable`]: every task of an image with exactly its grants (channel ends, regions,
//!   the peers it may notify), as the builder derived them from `manifest.toml`. postcard in
//!   the kernel image's `.pv_tasks` section; `paravisor audit --metal` prints it.
//! - The address-space layout every task shares ([`IMAGE_BASE`], [`BOOT_INFO`], the slots'
//!   window) and [`TaskBoot`], the record a task reads at [`BOOT_INFO`].
//! - The system calls ([`Syscall`]): `int 0x81` from ring 3, number in RAX, arguments in RDI,
//!   RSI, RDX; status back in RAX and a value in RDX.
//!
//! Nothing here trusts its input: the kernel decodes the table it was built with and checks
//! every address and index again ([`TaskTable::check`]), and a task's boot record is decoded
//! with the same bounds.

use heapless::Vec;
use serde::Deserialize;
use serde::Serialize;

use crate::Interface;

/// Bumped on any incompatible change of this module.
pub const TABLE_VERSION: u32 = 1;

/// Most tasks an image holds.
pub const MAX_TASKS: usize = 16;
/// Most channels an image holds.
pub const MAX_CHANNELS: usize = 32;
/// Most regions an image holds.
pub const MAX_REGIONS: usize = 16;
/// Most capability slots a task holds (its notification bits are one per slot).
pub const MAX_SLOTS: usize = 16;

/// The page size of every mapping.
pub const PAGE: u64 = 4096;
/// Where every task's ELF image is linked (the start of the user window: 1 GiB, so that
/// tasks use the small code model and the kernel's identity map of RAM stays below it).
pub const IMAGE_BASE: u64 = 0x4000_0000;
/// The end of the user window (exclusive): 2 GiB.
pub const USER_END: u64 = 0x8000_0000;
/// Where the slots' memory starts (channels and regions, in slot order, each page aligned).
pub const SLOT_BASE: u64 = 0x6000_0000;
/// The task's boot record ([`TaskBoot`]), one read-only page.
pub const BOOT_INFO: u64 = 0x7FFF_0000;
/// The top of the task's stack (the stack grows down from here; the page above it is the
/// boot record, the pages under the stack's limit are unmapped).
pub const STACK_TOP: u64 = 0x7FFE_F000;
/// Where a task's heap starts (its size is the task's `heap` grant).
pub const HEAP_BASE: u64 = 0x5000_0000;

/// The interrupt vector of the system call gate (DPL 3). 0x80 is not used: KVM on PVM turns
/// a user-mode `int 0x80` into #UD.
pub const SYSCALL_VECTOR: u8 = 0x81;

/// The system calls. A call with an unknown number, a slot the caller was not given, or a
/// buffer outside its own memory stops the caller as a fault: a task that does it is either
/// broken or hostile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Syscall {
    /// Ends the task (RDI: its exit code). The kernel restarts it as its policy says.
    Exit = 0,
    /// Gives the CPU to the next runnable task.
    Yield = 1,
    /// Sets the peer's notification bit for the channel in slot RDI (a channel slot only).
    Notify = 2,
    /// Waits until a notification bit in mask RDI is set or the clock reaches RSI
    /// (nanoseconds since boot, `u64::MAX`: no deadline); returns the bits that were set (0:
    /// the deadline passed) and clears them.
    Wait = 3,
    /// Logs RSI bytes of text at RDI through the kernel's log (a task's only output).
    Log = 4,
    /// Nanoseconds since boot (in RDX).
    Now = 5,
}

impl Syscall {
    pub fn from_number(n: u64) -> Option<Syscall> {
        Some(match n {
            0 => Syscall::Exit,
            1 => Syscall::Yield,
            2 => Syscall::Notify,
            3 => Syscall::Wait,
            4 => Syscall::Log,
            5 => Syscall::Now,
            _ => return None,
        })
    }
}

/// Longest text one `Log` call carries.
pub const MAX_LOG: usize = 256;

/// When a task is restarted, as the manifest's `restart` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// A task's restart limits (the manifest's `restart` table, times in milliseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restart {
    pub policy: RestartPolicy,
    /// At most this many restarts per `window_ms`.
    pub max: u32,
    pub window_ms: u32,
    /// The first restart is immediate, the next after this, doubling up to `max_backoff_ms`.
    pub backoff_ms: u32,
    pub max_backoff_ms: u32,
}

/// What one capability slot of a task holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Grant {
    /// The calling end of channel `channel` (an index into [`TaskTable::channels`]).
    Client { channel: u16 },
    /// The serving end of channel `channel`.
    Server { channel: u16 },
    /// Region `region` (an index into [`TaskTable::regions`]).
    Region { region: u16 },
}

/// A capability slot: a grant and where it is mapped in the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub grant: Grant,
    /// Page aligned, inside `SLOT_BASE..BOOT_INFO`.
    pub address: u64,
    /// Bytes, a multiple of [`PAGE`].
    pub size: u64,
}

/// One task of the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task<'a> {
    pub name: &'a str,
    /// Its ELF image (linked at [`IMAGE_BASE`]), an index into [`TaskTable::images`].
    pub image: u16,
    /// Its command line (what a test task is to do), in its boot record.
    pub args: &'a str,
    /// Heap bytes (a multiple of [`PAGE`]), mapped at [`HEAP_BASE`].
    pub heap: u64,
    /// Stack bytes (a multiple of [`PAGE`]), under [`STACK_TOP`].
    pub stack: u64,
    pub restart: Restart,
    pub slots: Vec<Slot, MAX_SLOTS>,
}

/// A channel between two tasks, laid out as [`crate::layout::ChannelLayout`] says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Channel {
    pub interface: Interface,
    /// Task indices.
    pub client: u16,
    pub server: u16,
    /// What the client may reach (the server enforces it), as on the hosted platform.
    pub grant: crate::capability::Grant,
    pub ring_capacity: u32,
}

/// Memory a task holds across its restarts (a RAM disk, a checkpoint), zeroed at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region<'a> {
    pub name: &'a str,
    /// Bytes, a multiple of [`PAGE`].
    pub size: u64,
}

/// Every task of an image and everything it is granted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskTable<'a> {
    pub version: u32,
    #[serde(borrow)]
    pub tasks: Vec<Task<'a>, MAX_TASKS>,
    pub channels: Vec<Channel, MAX_CHANNELS>,
    #[serde(borrow)]
    pub regions: Vec<Region<'a>, MAX_REGIONS>,
    /// The tasks' ELF images (one per distinct program).
    #[serde(borrow)]
    pub images: Vec<&'a [u8], MAX_TASKS>,
}

/// Why a task table is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Not a postcard task table (or more entries than the bounds allow).
    Encoding,
    /// Built for another version of this module.
    Version(u32),
    /// Task `task`'s slot `slot` names a channel or region that does not exist, or a channel
    /// whose end it is not.
    Grant { task: u16, slot: u16 },
    /// Task `task`'s slot `slot` is not page aligned, is outside the slot window, or
    /// overlaps another slot.
    Address { task: u16, slot: u16 },
    /// Channel `channel` does not have exactly one client slot and one server slot, names a
    /// task that does not exist, or has an impossible ring capacity.
    Channel(u16),
    /// Task `task`'s heap or stack does not fit its window, or its image does not exist.
    Task(u16),
    /// Region `region` is held by no task, or has a bad size.
    Region(u16),
}

impl core::fmt::Display for TableError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TableError::Encoding => write!(f, "not a task table"),
            TableError::Version(v) => write!(f, "task table version {v}, not {TABLE_VERSION}"),
            TableError::Grant { task, slot } => write!(f, "task {task} slot {slot}: bad grant"),
            TableError::Address { task, slot } => {
                write!(f, "task {task} slot {slot}: bad or overlapping address")
            }
            TableError::Channel(c) => write!(f, "channel {c}: bad ends or ring capacity"),
            TableError::Task(t) => write!(f, "task {t}: bad heap, stack or image"),
            TableError::Region(r) => write!(f, "region {r}: unused or bad size"),
        }
    }
}

fn page_aligned(v: u64) -> bool {
    v.is_multiple_of(PAGE)
}

impl<'a> TaskTable<'a> {
    /// Decodes and checks a table.
    pub fn decode(bytes: &'a [u8]) -> Result<TaskTable<'a>, TableError> {
        let table: TaskTable<'a> = postcard::from_bytes(bytes).map_err(|_| TableError::Encoding)?;
        table.check()?;
        Ok(table)
    }

    /// Every index in range, every channel with exactly one client and one server, every
    /// slot page aligned inside the slot window and apart from the task's other slots, every
    /// heap and stack inside its window.
    pub fn check(&self) -> Result<(), TableError> {
        if self.version != TABLE_VERSION {
            return Err(TableError::Version(self.version));
        }
        let mut ends = [(0u8, 0u8); MAX_CHANNELS];
        let mut region_used = [false; MAX_REGIONS];
        for (t, task) in self.tasks.iter().enumerate() {
            let t16 = t as u16;
            if usize::from(task.image) >= self.images.len()
                || !page_aligned(task.heap)
                || !page_aligned(task.stack)
                || task.heap > SLOT_BASE - HEAP_BASE
                || task.stack == 0
                || task.stack > STACK_TOP - SLOT_BASE
            {
                return Err(TableError::Task(t16));
            }
            for (s, slot) in task.slots.iter().enumerate() {
                let bad_grant = TableError::Grant {
                    task: t16,
                    slot: s as u16,
                };
                let bad_address = TableError::Address {
                    task: t16,
                    slot: s as u16,
                };
                let size = match slot.grant {
                    Grant::Client { channel } | Grant::Server { channel } => {
                        let c = self.channels.get(usize::from(channel)).ok_or(bad_grant)?;
                        let layout = crate::layout::ChannelLayout::new(c.ring_capacity)
                            .map_err(|_| TableError::Channel(channel))?;
                        let (owner, end) = match slot.grant {
                            Grant::Client { .. } => (c.client, &mut ends[usize::from(channel)].0),
                            _ => (c.server, &mut ends[usize::from(channel)].1),
                        };
                        if owner != t16 {
                            return Err(bad_grant);
                        }
                        *end += 1;
                        round_up(layout.region_size() as u64)
                    }
                    Grant::Region { region } => {
                        let r = self.regions.get(usize::from(region)).ok_or(bad_grant)?;
                        region_used[usize::from(region)] = true;
                        r.size
                    }
                };
                let end = slot.address.checked_add(slot.size).ok_or(bad_address)?;
                if slot.size != size
                    || !page_aligned(slot.address)
                    || slot.address < SLOT_BASE
                    || end > STACK_TOP - task.stack - PAGE
                {
                    return Err(bad_address);
                }
                for other in &task.slots[..s] {
                    if slot.address < other.address + other.size && other.address < end {
                        return Err(bad_address);
                    }
                }
            }
        }
        for (c, channel) in self.channels.iter().enumerate() {
            let (client, server) = ends[c];
            if client != 1
                || server != 1
                || usize::from(channel.client) >= self.tasks.len()
                || usize::from(channel.server) >= self.tasks.len()
                || channel.client == channel.server
            {
                return Err(TableError::Channel(c as u16));
            }
        }
        for (r, region) in self.regions.iter().enumerate() {
            if !region_used[r] || region.size == 0 || !page_aligned(region.size) {
                return Err(TableError::Region(r as u16));
            }
        }
        Ok(())
    }
}

/// `bytes` rounded up to whole pages.
pub fn round_up(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE) * PAGE
}

/// What a slot is, as its task sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BootGrant {
    Client(Interface),
    Server(Interface, crate::capability::Grant),
    Region,
}

/// One slot in a task's boot record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootSlot<'a> {
    pub grant: BootGrant,
    /// The peer task's name (channels) or the region's name.
    pub name: &'a str,
    pub address: u64,
    /// Bytes: a channel's exact size (its ring layout follows from it; the mapping is whole
    /// pages), or a region's.
    pub size: u64,
}

/// What a task finds at [`BOOT_INFO`]: a little-endian u32 length, then this, postcard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskBoot<'a> {
    pub name: &'a str,
    pub args: &'a str,
    /// How many times this task was restarted (0 at its first start).
    pub restarts: u32,
    pub heap: u64,
    #[serde(borrow)]
    pub slots: Vec<BootSlot<'a>, MAX_SLOTS>,
}

impl<'a> TaskBoot<'a> {
    /// Decodes a boot record page.
    pub fn decode(page: &'a [u8]) -> Option<TaskBoot<'a>> {
        let len = u32::from_le_bytes(page.get(..4)?.try_into().ok()?) as usize;
        postcard::from_bytes(page.get(4..4 + len)?).ok()
    }

    /// Encodes into a boot record page; `None` if it does not fit.
    pub fn encode(&self, page: &mut [u8]) -> Option<usize> {
        let (head, body) = page.split_at_mut_checked(4)?;
        let used = postcard::to_slice(self, body).ok()?.len();
        head.copy_from_slice(&(used as u32).to_le_bytes());
        Some(4 + used)
    }
}

#[cfg(test)]
mod tests;
