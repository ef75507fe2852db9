//! Tasks: loading, running, notifying, stopping and restarting them.
//!
//! The kernel runs on one CPU and never while a task runs, so its state is a plain struct
//! behind one lock (taken by every trap from ring 3). A task's registers live in its
//! [`Task::context`] while it does not run; switching tasks is copying contexts in and out
//! of the trap frame and loading the next task's page tables.

use core::ptr::NonNull;

use ipc_defs::layout::ChannelLayout;
use ipc_defs::layout::Direction;
use ipc_defs::layout::ServerState;
use ipc_defs::metal::BootGrant;
use ipc_defs::metal::BootSlot;
use ipc_defs::metal::Grant;
use ipc_defs::metal::Syscall;
use ipc_defs::metal::TaskBoot;
use ipc_defs::metal::TaskTable;
use ipc_defs::metal::BOOT_INFO;
use ipc_defs::metal::HEAP_BASE;
use ipc_defs::metal::MAX_LOG;
use ipc_defs::metal::MAX_SLOTS;
use ipc_defs::metal::MAX_TASKS;
use ipc_defs::metal::PAGE;
use ipc_defs::metal::STACK_TOP;
use ipc_defs::ring::Channel;
use pv_metal::elf;
use pv_metal::frames::Frames;
use pv_metal::restart::Decision;
use pv_metal::restart::History;

use crate::cpu::TrapFrame;
use crate::paging;
use crate::paging::Access;
use crate::paging::MapError;
use crate::paging::Space;

/// An FXSAVE area: the task's x87/SSE registers while it does not run.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
pub struct Fx(pub [u8; 512]);

impl Fx {
    /// The state after reset: x87 control word 0x37F, MXCSR 0x1F80 (all exceptions masked).
    fn initial() -> Fx {
        let mut fx = [0u8; 512];
        fx[0..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        fx[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        Fx(fx)
    }
}

/// Where a task is.
#[derive(Clone, Copy, PartialEq, Eq, defmt::Format)]
pub enum State {
    /// Runnable.
    Ready,
    /// In `wait`, for a bit of `mask` or until `deadline` (ns).
    Waiting { mask: u32, deadline: u64 },
    /// Stopped; starts again at `restart_at` (ns).
    Stopped { restart_at: u64 },
    /// Stopped for good (`clean`: its last stop was an exit with status 0).
    Ended { clean: bool },
}

/// Why a task stopped.
#[derive(Clone, Copy, defmt::Format)]
pub enum Stop {
    /// It called `exit`.
    Exit(u64),
    /// A CPU exception in ring 3.
    Exception {
        vector: u64,
        error: u64,
        rip: u64,
        address: u64,
    },
    /// An unknown system call number.
    BadSyscall(u64),
    /// A slot it does not hold, or one of the wrong kind.
    BadSlot(u64),
    /// A buffer outside its memory, or too long.
    BadBuffer(u64),
    /// Its image could not be loaded (no memory, a bad image).
    LoadFailed,
}

impl Stop {
    fn failure(&self) -> bool {
        !matches!(self, Stop::Exit(0))
    }
}

pub struct Task {
    pub context: TrapFrame,
    pub fx: Fx,
    space: Option<Space>,
    pub state: State,
    /// Notification bits set and not yet taken by `wait`.
    pending: u32,
    restarts: u32,
    history: History,
    /// For each slot holding a channel end: the peer task and the peer's slot.
    peers: [Option<(u16, u16)>; MAX_SLOTS],
}

/// A channel's memory (physically contiguous, identity mapped).
struct ChannelMemory {
    base: u64,
    layout: ChannelLayout,
}

impl ChannelMemory {
    fn channel(&self) -> Channel<'static> {
        // SAFETY: `base` is the start of frames the kernel allocated for this channel for
        // its whole life, `layout.region_size()` bytes, page aligned, identity mapped; tasks
        // change the contents concurrently only in the sense the ring expects (they do not
        // run while the kernel does).
        unsafe {
            Channel::from_raw(
                NonNull::new(self.base as *mut u8).expect("channel memory is never at 0"),
                self.layout,
            )
        }
    }
}

/// The kernel's state.
pub struct Kernel {
    pub table: TaskTable<'static>,
    pub paging: paging::Kernel,
    pub tasks: heapless::Vec<Task, MAX_TASKS>,
    channels: heapless::Vec<ChannelMemory, { ipc_defs::metal::MAX_CHANNELS }>,
    regions: heapless::Vec<u64, { ipc_defs::metal::MAX_REGIONS }>,
    /// The task whose context is in the trap frame.
    pub current: usize,
}

/// Why the kernel could not set the table up.
#[derive(Clone, Copy, defmt::Format)]
pub enum SetupError {
    /// Not enough contiguous memory for channel or region `0`.
    Memory(u16),
    /// Channel `0` has a ring capacity the layout refuses.
    Layout(u16),
}

fn zero(base: u64, bytes: u64) {
    // SAFETY: frames the kernel just allocated (identity mapped, below 1 GiB), its own.
    unsafe { core::ptr::write_bytes(base as *mut u8, 0, bytes as usize) };
}

impl Kernel {
    /// Allocates and lays out every channel and region, and the tasks' bookkeeping.
    pub fn new(
        table: TaskTable<'static>,
        paging: paging::Kernel,
        frames: &mut Frames,
    ) -> Result<Kernel, SetupError> {
        let mut k = Kernel {
            table,
            paging,
            tasks: heapless::Vec::new(),
            channels: heapless::Vec::new(),
            regions: heapless::Vec::new(),
            current: 0,
        };
        for (i, c) in k.table.channels.iter().enumerate() {
            let layout =
                ChannelLayout::new(c.ring_capacity).map_err(|_| SetupError::Layout(i as u16))?;
            let bytes = ipc_defs::metal::round_up(layout.region_size() as u64);
            let base = frames
                .alloc_contiguous((bytes / PAGE) as usize)
                .ok_or(SetupError::Memory(i as u16))?;
            zero(base, bytes);
            // SAFETY: the frames just allocated and zeroed, `bytes` long, the kernel's alone
            // until tasks map them.
            let memory =
                unsafe { core::slice::from_raw_parts_mut(base as *mut u8, bytes as usize) };
            layout
                .initialise(memory)
                .map_err(|_| SetupError::Layout(i as u16))?;
            let _ = k.channels.push(ChannelMemory { base, layout });
        }
        for (i, r) in k.table.regions.iter().enumerate() {
            let base = frames
                .alloc_contiguous((r.size / PAGE) as usize)
                .ok_or(SetupError::Memory(i as u16))?;
            zero(base, r.size);
            let _ = k.regions.push(base);
        }
        for t in 0..k.table.tasks.len() {
            let mut peers = [None; MAX_SLOTS];
            for (s, slot) in k.table.tasks[t].slots.iter().enumerate() {
                peers[s] = k.peer_of(slot.grant);
            }
            let _ = k.tasks.push(Task {
                context: TrapFrame::default(),
                fx: Fx::initial(),
                space: None,
                state: State::Stopped { restart_at: 0 },
                pending: 0,
                restarts: 0,
                history: History::new(),
                peers,
            });
        }
        Ok(k)
    }

    /// The other end of a channel grant: its task and its slot there.
    fn peer_of(&self, grant: Grant) -> Option<(u16, u16)> {
        let (channel, want) = match grant {
            Grant::Client { channel } => (channel, Grant::Server { channel }),
            Grant::Server { channel } => (channel, Grant::Client { channel }),
            Grant::Region { .. } => return None,
        };
        let c = self.table.channels.get(usize::from(channel))?;
        let peer = match grant {
            Grant::Client { .. } => c.server,
            _ => c.client,
        };
        let slot = self.table.tasks[usize::from(peer)]
            .slots
            .iter()
            .position(|s| s.grant == want)?;
        Some((peer, slot as u16))
    }

    /// Loads task `t` and makes it runnable (its first start, or a restart).
    pub fn start(&mut self, t: usize, frames: &mut Frames) -> Result<(), MapError> {
        let spec = &self.table.tasks[t];
        let image = elf::parse(self.table.images[usize::from(spec.image)]).map_err(|e| {
            let why = match e {
                elf::ImageError::NotElf => "not an x86-64 ELF executable",
                elf::ImageError::TooManySegments => "too many segments",
                elf::ImageError::Segment(_) => "a segment outside the image window or W+X",
                elf::ImageError::Entry(_) => "its entry is not in code",
            };
            defmt::error!("task {=str}: bad image: {=str}", spec.name, why);
            MapError::Address(0)
        })?;
        let mut space = self.paging.new_space(frames)?;
        let result = self.fill(t, &mut space, &image, frames);
        if let Err(e) = result {
            space.destroy(frames);
            return Err(e);
        }
        let (code, data) = crate::cpu::user_selectors();
        let task = &mut self.tasks[t];
        task.context = TrapFrame {
            rip: image.entry,
            cs: code | 3,
            rflags: 0x202,
            rsp: STACK_TOP,
            ss: data | 3,
            ..TrapFrame::default()
        };
        task.fx = Fx::initial();
        task.space = Some(space);
        task.state = State::Ready;
        task.pending = 0;
        defmt::info!(
            "task {=str} started (restart {=u32})",
            self.table.tasks[t].name,
            self.tasks[t].restarts
        );
        for s in 0..self.table.tasks[t].slots.len() {
            if let Grant::Server { channel } = self.table.tasks[t].slots[s].grant {
                self.channels[usize::from(channel)]
                    .channel()
                    .set_server_state(ServerState::Up);
                self.wake_peer(t, s);
            }
        }
        Ok(())
    }

    /// Maps the image, heap, stack, boot record and slots of task `t` into `space`.
    fn fill(
        &self,
        t: usize,
        space: &mut Space,
        image: &elf::Image,
        frames: &mut Frames,
    ) -> Result<(), MapError> {
        let spec = &self.table.tasks[t];
        for segment in &image.segments {
            let mut va = segment.address;
            while va < segment.end() {
                let frame = space.map_new(frames, va, segment.writable, segment.executable)?;
                let offset = (va - segment.address) as usize;
                if offset < segment.data.len() {
                    let bytes =
                        &segment.data[offset..segment.data.len().min(offset + PAGE as usize)];
                    // SAFETY: `frame` is the fresh frame just mapped (identity mapped for the
                    // kernel), a page long; `bytes` is at most a page.
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            bytes.as_ptr(),
                            frame as *mut u8,
                            bytes.len(),
                        )
                    };
                }
                va += PAGE;
            }
        }
        let mut va = HEAP_BASE;
        while va < HEAP_BASE + spec.heap {
            space.map_new(frames, va, true, false)?;
            va += PAGE;
        }
        let mut va = STACK_TOP - spec.stack;
        while va < STACK_TOP {
            space.map_new(frames, va, true, false)?;
            va += PAGE;
        }
        let boot = space.map_new(frames, BOOT_INFO, false, false)?;
        self.write_boot(t, boot);
        for slot in &spec.slots {
            let base = match slot.grant {
                Grant::Client { channel } | Grant::Server { channel } => {
                    self.channels[usize::from(channel)].base
                }
                Grant::Region { region } => self.regions[usize::from(region)],
            };
            let shared = Access {
                writable: true,
                executable: false,
                owned: false,
            };
            let mut offset = 0;
            while offset < slot.size {
                space.map(frames, slot.address + offset, base + offset, shared)?;
                offset += PAGE;
            }
        }
        Ok(())
    }

    /// Writes task `t`'s boot record into the frame at `page`.
    fn write_boot(&self, t: usize, page: u64) {
        let spec = &self.table.tasks[t];
        let mut boot = TaskBoot {
            name: spec.name,
            args: spec.args,
            restarts: self.tasks[t].restarts,
            heap: spec.heap,
            slots: heapless::Vec::new(),
        };
        for slot in &spec.slots {
            let (grant, name) = match slot.grant {
                Grant::Client { channel } => {
                    let c = &self.table.channels[usize::from(channel)];
                    (
                        BootGrant::Client(c.interface),
                        self.table.tasks[usize::from(c.server)].name,
                    )
                }
                Grant::Server { channel } => {
                    let c = &self.table.channels[usize::from(channel)];
                    (
                        BootGrant::Server(c.interface, c.grant),
                        self.table.tasks[usize::from(c.client)].name,
                    )
                }
                Grant::Region { region } => (
                    BootGrant::Region,
                    self.table.regions[usize::from(region)].name,
                ),
            };
            // A channel's record gives the channel's exact size (its layout follows from
            // it); the mapping itself is whole pages.
            let size = match slot.grant {
                Grant::Client { channel } | Grant::Server { channel } => {
                    self.channels[usize::from(channel)].layout.region_size() as u64
                }
                Grant::Region { .. } => slot.size,
            };
            let _ = boot.slots.push(BootSlot {
                grant,
                name,
                address: slot.address,
                size,
            });
        }
        // SAFETY: `page` is the boot record's fresh frame, a page long, identity mapped.
        let memory = unsafe { core::slice::from_raw_parts_mut(page as *mut u8, PAGE as usize) };
        if boot.encode(memory).is_none() {
            defmt::error!("task {=str}: boot record does not fit a page", spec.name);
        }
    }

    /// Sets the notification bit of the peer of task `t`'s slot `slot`.
    fn wake_peer(&mut self, t: usize, slot: usize) {
        if let Some((peer, peer_slot)) = self.tasks[t].peers[slot] {
            self.deliver(usize::from(peer), 1 << peer_slot);
        }
    }

    /// Adds notification `bits` to task `t`, waking it if it waits for one of them.
    fn deliver(&mut self, t: usize, bits: u32) {
        let task = &mut self.tasks[t];
        task.pending |= bits;
        if let State::Waiting { mask, .. } = task.state {
            let taken = task.pending & mask;
            if taken != 0 {
                task.pending &= !taken;
                task.context.rax = 0;
                task.context.rdx = u64::from(taken);
                task.state = State::Ready;
            }
        }
    }

    /// Stops task `t`: frees its memory, moves its channels to a new epoch (their peers are
    /// woken and see it), and decides on its restart.
    pub fn stop(&mut self, t: usize, why: Stop, now: u64, frames: &mut Frames) {
        let name = self.table.tasks[t].name;
        match why {
            Stop::Exit(status) => defmt::info!("task {=str} exited with {=u64}", name, status),
            Stop::Exception {
                vector,
                error,
                rip,
                address,
            } => {
                let what = match vector {
                    0 => "divide error",
                    6 => "invalid opcode",
                    13 => "general protection fault",
                    14 => "page fault",
                    17 => "alignment check",
                    19 => "SIMD exception",
                    _ => "exception",
                };
                if vector == 14 {
                    defmt::warn!(
                        "task {=str} stopped: {=str} at {=u64:#x} on {=u64:#x} (error {=u64:#x})",
                        name,
                        what,
                        rip,
                        address,
                        error
                    );
                } else {
                    defmt::warn!(
                        "task {=str} stopped: {=str} ({=u64}) at {=u64:#x} (error {=u64:#x})",
                        name,
                        what,
                        vector,
                        rip,
                        error
                    );
                }
            }
            Stop::BadSyscall(n) => {
                defmt::warn!("task {=str} stopped: unknown system call {=u64}", name, n)
            }
            Stop::BadSlot(slot) => defmt::warn!(
                "task {=str} stopped: capability slot {=u64} is not one it holds",
                name,
                slot
            ),
            Stop::BadBuffer(at) => defmt::warn!(
                "task {=str} stopped: buffer at {=u64:#x} is not its memory",
                name,
                at
            ),
            Stop::LoadFailed => defmt::error!("task {=str} could not be loaded", name),
        }
        if let Some(space) = self.tasks[t].space.take() {
            // Off its tables before they are freed (they may be the ones loaded).
            self.paging.switch_to(self.paging.root());
            space.destroy(frames);
        }
        for s in 0..self.table.tasks[t].slots.len() {
            let grant = self.table.tasks[t].slots[s].grant;
            let (channel, consumed) = match grant {
                Grant::Server { channel } => (channel, Direction::Requests),
                Grant::Client { channel } => (channel, Direction::Responses),
                Grant::Region { .. } => continue,
            };
            let memory = self.channels[usize::from(channel)].channel();
            memory.restart_epoch(consumed);
            if consumed == Direction::Requests {
                memory.set_server_state(ServerState::Down);
            }
            self.wake_peer(t, s);
        }
        let policy = self.table.tasks[t].restart;
        let task = &mut self.tasks[t];
        task.pending = 0;
        task.state = match task.history.decide(&policy, why.failure(), now) {
            Decision::RestartAt(at) => {
                task.restarts += 1;
                State::Stopped { restart_at: at }
            }
            Decision::Stay => State::Ended {
                clean: !why.failure(),
            },
            Decision::CrashLoop => {
                defmt::error!(
                    "task {=str}: {=usize} restarts within its window: given up",
                    name,
                    task.history.recent()
                );
                State::Ended { clean: false }
            }
        };
        if let State::Ended { .. } = self.tasks[t].state {
            for s in 0..self.table.tasks[t].slots.len() {
                if let Grant::Server { channel } = self.table.tasks[t].slots[s].grant {
                    self.channels[usize::from(channel)]
                        .channel()
                        .set_server_state(ServerState::Gone);
                    self.wake_peer(t, s);
                }
            }
        }
    }

    /// Handles the system call in task `t`'s saved context.
    pub fn syscall(&mut self, t: usize, now: u64, frames: &mut Frames) {
        let c = self.tasks[t].context;
        let (a, b) = (c.rdi, c.rsi);
        let slots = self.table.tasks[t].slots.len();
        let mut value = 0;
        match Syscall::from_number(c.rax) {
            None => return self.stop(t, Stop::BadSyscall(c.rax), now, frames),
            Some(Syscall::Exit) => return self.stop(t, Stop::Exit(a), now, frames),
            Some(Syscall::Yield) => {}
            Some(Syscall::Notify) => {
                let slot = a as usize;
                if slot >= slots || self.tasks[t].peers[slot].is_none() {
                    return self.stop(t, Stop::BadSlot(a), now, frames);
                }
                self.wake_peer(t, slot);
            }
            Some(Syscall::Wait) => {
                let mask = a as u32;
                if a > u64::from(u32::MAX) || (slots < 32 && mask >> slots != 0) {
                    return self.stop(t, Stop::BadSlot(a), now, frames);
                }
                let task = &mut self.tasks[t];
                let taken = task.pending & mask;
                if taken != 0 || b <= now {
                    task.pending &= !taken;
                    value = u64::from(taken);
                } else {
                    task.state = State::Waiting { mask, deadline: b };
                    return;
                }
            }
            Some(Syscall::Log) => {
                let mut text = [0u8; MAX_LOG];
                if b > MAX_LOG as u64 || !self.copy_in(t, a, &mut text[..b as usize]) {
                    return self.stop(t, Stop::BadBuffer(a), now, frames);
                }
                let text = &mut text[..b as usize];
                for byte in text.iter_mut() {
                    if !(b' '..=b'~').contains(byte) {
                        *byte = b'?';
                    }
                }
                // SAFETY: every byte is printable ASCII now, which is valid UTF-8 (checked
                // here rather than with `str::from_utf8`, whose prebuilt code uses SSE, which
                // ring 0 must not).
                let text = unsafe { core::str::from_utf8_unchecked(text) };
                defmt::info!("{=str}: {=str}", self.table.tasks[t].name, text);
            }
            Some(Syscall::Now) => value = now,
        }
        let context = &mut self.tasks[t].context;
        context.rax = 0;
        context.rdx = value;
    }

    /// Whether task `t`'s #UD is a system call: KVM on PVM turns a user-mode `int N` into
    /// #UD (on other hypervisors the gate is taken directly). If the faulting instruction is
    /// `int 0x81`, the task's RIP moves past it and the call is made as if through the gate.
    pub fn syscall_by_ud(&mut self, t: usize) -> bool {
        let mut bytes = [0u8; 2];
        let rip = self.tasks[t].context.rip;
        if !self.copy_in(t, rip, &mut bytes) || bytes != [0xCD, ipc_defs::metal::SYSCALL_VECTOR] {
            return false;
        }
        self.tasks[t].context.rip = rip + 2;
        true
    }

    /// Copies task `t`'s memory at `at` into `out`; false if any byte is not its to read.
    fn copy_in(&self, t: usize, at: u64, out: &mut [u8]) -> bool {
        let Some(space) = &self.tasks[t].space else {
            return false;
        };
        for (i, byte) in out.iter_mut().enumerate() {
            let Some(phys) = at
                .checked_add(i as u64)
                .and_then(|va| space.translate(va, false))
            else {
                return false;
            };
            // SAFETY: `phys` is a frame mapped user-readable in the task's own space
            // (translate checked it), identity mapped for the kernel.
            *byte = unsafe { core::ptr::read_volatile(phys as *const u8) };
        }
        true
    }

    /// Wakes waiters whose deadline passed and restarts tasks whose back-off ended.
    pub fn tick(&mut self, now: u64, frames: &mut Frames) {
        for t in 0..self.tasks.len() {
            match self.tasks[t].state {
                State::Waiting { deadline, .. } if deadline <= now => {
                    let task = &mut self.tasks[t];
                    task.context.rax = 0;
                    task.context.rdx = 0;
                    task.state = State::Ready;
                }
                State::Stopped { restart_at } if restart_at <= now => {
                    if self.start(t, frames).is_err() {
                        self.stop(t, Stop::LoadFailed, now, frames);
                    }
                }
                _ => {}
            }
        }
    }

    /// The next runnable task after `after`, round robin.
    pub fn pick(&self, after: usize) -> Option<usize> {
        let n = self.tasks.len();
        (1..=n)
            .map(|i| (after + i) % n)
            .find(|&t| self.tasks[t].state == State::Ready)
    }

    /// Whether anything can still happen: a task runs, waits with a deadline, or will be
    /// restarted. If not, no task can ever run again.
    pub fn alive(&self) -> bool {
        self.tasks.iter().any(|t| match t.state {
            State::Ready | State::Stopped { .. } => true,
            State::Waiting { deadline, .. } => deadline != u64::MAX,
            State::Ended { .. } => false,
        })
    }

    /// Whether every task that ended did so cleanly.
    pub fn all_clean(&self) -> bool {
        self.tasks
            .iter()
            .all(|t| !matches!(t.state, State::Ended { clean: false }))
    }

    /// Task `t`'s page tables.
    pub fn root(&self, t: usize) -> u64 {
        self.tasks[t]
            .space
            .as_ref()
            .map_or(self.paging.root(), |s| s.root)
    }
}
