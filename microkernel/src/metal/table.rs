//! The metal image's task table, laid out from the manifest's `[[metal.task]]`: computed once
//! here, used by the validator (so that `check` refuses what cannot be laid out) and by
//! `paravisor metal build` (which adds the programs' images and encodes it).
//!
//! The layout, in the order a reader of `audit --metal` sees it:
//! - tasks: in manifest order (task `i` is the `i`-th `[[metal.task]]`);
//! - channels: one per call, each client in task order, its calls in the order written; the
//!   server's grant is the one the hosted platform computes ([`crate::plan::channel_grant`];
//!   a metal task holds no listener, so TPM commands are at locality 0); every ring holds
//!   `[paravisor] ring-capacity` bytes;
//! - regions: each task's `regions`, then its RAM disks, in task order;
//! - images: one per distinct program, in order of first use;
//! - each task's slots: the channels it serves, the channels it calls, its regions, each at
//!   the next page of the slot window after the previous slot and one unmapped guard page
//!   (a task that runs off the end of one slot faults instead of writing into the next).

use ipc_defs::layout::ChannelLayout;
use ipc_defs::metal::round_up;
use ipc_defs::metal::BootGrant;
use ipc_defs::metal::BootSlot;
use ipc_defs::metal::Channel;
use ipc_defs::metal::Grant;
use ipc_defs::metal::Region;
use ipc_defs::metal::Restart;
use ipc_defs::metal::RestartPolicy;
use ipc_defs::metal::Slot;
use ipc_defs::metal::TableError;
use ipc_defs::metal::Task;
use ipc_defs::metal::TaskBoot;
use ipc_defs::metal::TaskTable;
use ipc_defs::metal::MAX_CHANNELS;
use ipc_defs::metal::MAX_REGIONS;
use ipc_defs::metal::MAX_SLOTS;
use ipc_defs::metal::MAX_TASKS;
use ipc_defs::metal::PAGE;
use ipc_defs::metal::SLOT_BASE;
use ipc_defs::metal::STACK_TOP;
use ipc_defs::metal::TABLE_VERSION;
use ipc_defs::Interface;

use crate::manifest::format_size;
use crate::manifest::MetalTask;

/// One task as laid out: the table's [`Task`] with its program's name and owned strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedTask {
    pub name: String,
    /// The program its image is built from.
    pub program: String,
    /// Its image's index in [`MetalPlan::programs`].
    pub image: u16,
    pub args: String,
    pub heap: u64,
    pub stack: u64,
    pub restart: Restart,
    pub slots: Vec<Slot>,
}

/// A region as laid out, with the task that holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRegion {
    pub name: String,
    pub size: u64,
    pub holder: u16,
}

/// The task table of an image, but for the images themselves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetalPlan {
    pub tasks: Vec<PlannedTask>,
    pub channels: Vec<Channel>,
    pub regions: Vec<PlannedRegion>,
    /// The distinct programs, in order of first use: image `i` is built from `programs[i]`.
    pub programs: Vec<String>,
}

/// Why the tasks cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("[metal] describes {count} tasks; an image holds at most {MAX_TASKS}")]
    TooManyTasks { count: usize },
    #[error("the metal tasks make {count} calls (one channel each); an image holds at most {MAX_CHANNELS} channels")]
    TooManyChannels { count: usize },
    #[error(
        "the metal tasks hold {count} regions and RAM disks; an image holds at most {MAX_REGIONS}"
    )]
    TooManyRegions { count: usize },
    #[error("task \"{name}\" would hold {count} slots (channels served and called, regions); a task holds at most {MAX_SLOTS}")]
    TooManySlots {
        task: usize,
        name: String,
        count: usize,
    },
    #[error("task \"{name}\" calls \"{interface}\", which no metal task serves")]
    Unserved {
        task: usize,
        name: String,
        interface: Interface,
    },
    #[error("task \"{name}\": its channels and regions need {} of the slot window (guard pages included), and its stack leaves {}", format_size(*needed), format_size(*room))]
    SlotsDoNotFit {
        task: usize,
        name: String,
        needed: u64,
        room: u64,
    },
    #[error("task \"{name}\": its boot record (name, args, slots' names) does not fit its page")]
    BootRecord { task: usize, name: String },
    #[error("ring capacity {0} cannot make a channel")]
    RingCapacity(u32),
    #[error("the derived task table fails its own check ({0}): a bug of the builder")]
    Table(TableError),
    #[error("{got} images for {expected} programs")]
    Images { expected: usize, got: usize },
}

impl PlanError {
    /// The task the problem is about, if one is.
    pub fn task(&self) -> Option<usize> {
        match self {
            PlanError::TooManySlots { task, .. }
            | PlanError::Unserved { task, .. }
            | PlanError::SlotsDoNotFit { task, .. }
            | PlanError::BootRecord { task, .. } => Some(*task),
            _ => None,
        }
    }

    /// What would be right.
    pub fn help(&self) -> String {
        match self {
            PlanError::TooManyTasks { .. } => "remove tasks, or merge two into one program".into(),
            PlanError::TooManyChannels { .. } => "remove calls".into(),
            PlanError::TooManyRegions { .. } => {
                "remove regions, or give a task one larger region instead of several".into()
            }
            PlanError::TooManySlots { .. } => "split the task, or let fewer tasks call it".into(),
            PlanError::Unserved { .. } => {
                "add a [[metal.task]] that serves it, or remove the call".into()
            }
            PlanError::SlotsDoNotFit { .. } => {
                "make its regions or its stack smaller, or [paravisor] ring-capacity smaller".into()
            }
            PlanError::BootRecord { .. } => "shorten its args".into(),
            PlanError::RingCapacity(_) => "use a power of two ring-capacity, e.g. \"64K\"".into(),
            PlanError::Table(_) | PlanError::Images { .. } => "report it".into(),
        }
    }
}

/// A table that would not fit the contract's bounds (checked before, so a bug).
fn full<T>(_: T) -> PlanError {
    PlanError::Table(TableError::Encoding)
}

/// The table's restart record: the manifest's policy with its times in milliseconds.
pub fn restart_record(r: &crate::manifest::Restart) -> Restart {
    let ms = |d: std::time::Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
    Restart {
        policy: match r.policy {
            crate::manifest::RestartPolicy::Always => RestartPolicy::Always,
            crate::manifest::RestartPolicy::OnFailure => RestartPolicy::OnFailure,
            crate::manifest::RestartPolicy::Never => RestartPolicy::Never,
        },
        max: r.max,
        window_ms: ms(r.window),
        backoff_ms: ms(r.backoff),
        max_backoff_ms: ms(r.max_backoff),
    }
}

impl MetalPlan {
    /// Lays out `tasks` (validated `[[metal.task]]`) with rings of `ring_capacity` bytes.
    pub fn new(tasks: &[MetalTask], ring_capacity: u32) -> Result<MetalPlan, PlanError> {
        if tasks.len() > MAX_TASKS {
            return Err(PlanError::TooManyTasks { count: tasks.len() });
        }
        let channel_size = ChannelLayout::new(ring_capacity)
            .map(|l| round_up(l.region_size() as u64))
            .map_err(|_| PlanError::RingCapacity(ring_capacity))?;
        let mut channels = Vec::new();
        for (client, t) in tasks.iter().enumerate() {
            for &interface in &t.calls {
                let server = tasks
                    .iter()
                    .position(|s| s.serves.contains(&interface))
                    .ok_or_else(|| PlanError::Unserved {
                        task: client,
                        name: t.name.clone(),
                        interface,
                    })?;
                channels.push(Channel {
                    interface,
                    client: client as u16,
                    server: server as u16,
                    grant: crate::plan::channel_grant(&t.grants, &[], interface),
                    ring_capacity,
                });
            }
        }
        if channels.len() > MAX_CHANNELS {
            return Err(PlanError::TooManyChannels {
                count: channels.len(),
            });
        }
        let regions: Vec<PlannedRegion> = tasks
            .iter()
            .enumerate()
            .flat_map(|(i, t)| {
                t.regions
                    .iter()
                    .chain(&t.ram_disks)
                    .map(move |r| PlannedRegion {
                        name: r.name.clone(),
                        size: round_up(r.size),
                        holder: i as u16,
                    })
            })
            .collect();
        if regions.len() > MAX_REGIONS {
            return Err(PlanError::TooManyRegions {
                count: regions.len(),
            });
        }
        let mut programs: Vec<String> = Vec::new();
        for t in tasks {
            if !programs.contains(&t.program) {
                programs.push(t.program.clone());
            }
        }
        let mut planned = Vec::new();
        for (i, t) in tasks.iter().enumerate() {
            let me = i as u16;
            let mut grants: Vec<(Grant, u64)> = Vec::new();
            for (c, ch) in channels.iter().enumerate() {
                if ch.server == me {
                    grants.push((Grant::Server { channel: c as u16 }, channel_size));
                }
            }
            for (c, ch) in channels.iter().enumerate() {
                if ch.client == me {
                    grants.push((Grant::Client { channel: c as u16 }, channel_size));
                }
            }
            for (r, region) in regions.iter().enumerate() {
                if region.holder == me {
                    grants.push((Grant::Region { region: r as u16 }, region.size));
                }
            }
            if grants.len() > MAX_SLOTS {
                return Err(PlanError::TooManySlots {
                    task: i,
                    name: t.name.clone(),
                    count: grants.len(),
                });
            }
            let room = (STACK_TOP - PAGE - SLOT_BASE).saturating_sub(t.stack);
            let mut slots = Vec::new();
            let mut next = SLOT_BASE;
            for (grant, size) in grants {
                slots.push(Slot {
                    grant,
                    address: next,
                    size,
                });
                // The slot, then its guard page.
                next = next.saturating_add(size).saturating_add(PAGE);
            }
            let needed = slots.last().map_or(0, |s| s.address + s.size - SLOT_BASE);
            if needed > room {
                return Err(PlanError::SlotsDoNotFit {
                    task: i,
                    name: t.name.clone(),
                    needed,
                    room,
                });
            }
            planned.push(PlannedTask {
                name: t.name.clone(),
                program: t.program.clone(),
                image: programs.iter().position(|p| p == &t.program).unwrap_or(0) as u16,
                args: t.args.clone(),
                heap: t.heap,
                stack: t.stack,
                restart: restart_record(&t.restart),
                slots,
            });
        }
        let plan = MetalPlan {
            tasks: planned,
            channels,
            regions,
            programs,
        };
        for i in 0..plan.tasks.len() {
            plan.boot_record(i)?;
        }
        let no_images = vec![&[][..]; plan.programs.len()];
        plan.table(&no_images)?.check().map_err(PlanError::Table)?;
        Ok(plan)
    }

    /// Task `i`'s boot record as the kernel writes it, at its longest (the restart count at
    /// its largest), encoded: it must fit the boot record's page.
    pub fn boot_record(&self, i: usize) -> Result<Vec<u8>, PlanError> {
        let t = &self.tasks[i];
        let too_big = || PlanError::BootRecord {
            task: i,
            name: t.name.clone(),
        };
        let mut boot = TaskBoot {
            name: &t.name,
            args: &t.args,
            restarts: u32::MAX,
            heap: t.heap,
            slots: heapless::Vec::new(),
        };
        for slot in &t.slots {
            let (grant, name) = match slot.grant {
                Grant::Client { channel } => {
                    let c = &self.channels[usize::from(channel)];
                    (
                        BootGrant::Client(c.interface),
                        &self.tasks[usize::from(c.server)].name,
                    )
                }
                Grant::Server { channel } => {
                    let c = &self.channels[usize::from(channel)];
                    (
                        BootGrant::Server(c.interface, c.grant),
                        &self.tasks[usize::from(c.client)].name,
                    )
                }
                Grant::Region { region } => {
                    (BootGrant::Region, &self.regions[usize::from(region)].name)
                }
            };
            boot.slots
                .push(BootSlot {
                    grant,
                    name,
                    address: slot.address,
                    size: slot.size,
                })
                .map_err(|_| too_big())?;
        }
        let mut page = vec![0u8; PAGE as usize];
        let used = boot.encode(&mut page).ok_or_else(too_big)?;
        page.truncate(used);
        Ok(page)
    }

    /// The task table with `images` (one per program, in [`MetalPlan::programs`] order).
    pub fn table<'a>(&'a self, images: &[&'a [u8]]) -> Result<TaskTable<'a>, PlanError> {
        if images.len() != self.programs.len() {
            return Err(PlanError::Images {
                expected: self.programs.len(),
                got: images.len(),
            });
        }
        let mut table = TaskTable {
            version: TABLE_VERSION,
            tasks: heapless::Vec::new(),
            channels: heapless::Vec::new(),
            regions: heapless::Vec::new(),
            images: heapless::Vec::new(),
        };
        for t in &self.tasks {
            let mut slots = heapless::Vec::new();
            for s in &t.slots {
                slots.push(*s).map_err(full)?;
            }
            table
                .tasks
                .push(Task {
                    name: &t.name,
                    image: t.image,
                    args: &t.args,
                    heap: t.heap,
                    stack: t.stack,
                    restart: t.restart,
                    slots,
                })
                .map_err(full)?;
        }
        for c in &self.channels {
            table.channels.push(*c).map_err(full)?;
        }
        for r in &self.regions {
            table
                .regions
                .push(Region {
                    name: &r.name,
                    size: r.size,
                })
                .map_err(full)?;
        }
        for image in images {
            table.images.push(image).map_err(full)?;
        }
        Ok(table)
    }

    /// The table with `images`, checked, in the bytes the kernel includes (postcard). The
    /// bytes are decoded again and must give the same table.
    pub fn encode(&self, images: &[&[u8]]) -> Result<Vec<u8>, PlanError> {
        let table = self.table(images)?;
        table.check().map_err(PlanError::Table)?;
        let bytes = postcard::to_allocvec(&table).map_err(full)?;
        let same = TaskTable::decode(&bytes).map_err(PlanError::Table)? == table;
        match same {
            true => Ok(bytes),
            false => Err(PlanError::Table(TableError::Encoding)),
        }
    }

    /// Bytes of memory the tasks take at least, besides their images and page tables: every
    /// heap, stack, boot record, region and channel (each once).
    pub fn memory(&self) -> u64 {
        let channel = self
            .tasks
            .iter()
            .flat_map(|t| &t.slots)
            .find(|s| matches!(s.grant, Grant::Server { .. }))
            .map_or(0, |s| s.size);
        self.tasks
            .iter()
            .map(|t| t.heap + t.stack + PAGE)
            .sum::<u64>()
            + self.regions.iter().map(|r| r.size).sum::<u64>()
            + channel * self.channels.len() as u64
    }
}
