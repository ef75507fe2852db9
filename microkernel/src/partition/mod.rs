//! The guest partition: a KVM VM whose every exit is answered by a service.
//!
//! The microkernel creates the VM (in-kernel IOAPIC and local APICs), guest RAM as a memfd,
//! one thread per vCPU, and an eventfd per guest interrupt a manifest grant names, wired to
//! the VM as a KVM irqfd and handed to `intercept` (which raises only what each device was
//! granted). Exits go through the [`router::Router`]: port and MMIO ranges a service owns go to
//! that service, everything else to `intercept`.
//!
//! Guests: the test guest (`tests/guest`, embedded in `paravisor`, the default) or a Linux
//! bzImage with an optional initrd (64-bit boot protocol, ACPI tables for the IOAPIC and SMP).

pub mod acpi;
pub mod boot;
#[allow(unsafe_code)]
mod kvm;
pub mod memory;
pub mod router;
#[allow(unsafe_code)]
pub mod vcpu;

use std::os::fd::AsRawFd;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;

use ipc_defs::services::intercept::Interrupt;
use kvm_bindings::kvm_enable_cap;
use kvm_bindings::kvm_pit_config;
use kvm_ioctls::Cap;
use kvm_ioctls::Kvm;
use kvm_ioctls::VcpuFd;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use self::memory::GuestRam;
use self::router::Router;
use self::vcpu::Outcome;
use self::vcpu::VcpuStats;
use crate::manifest::DeviceRange;

/// The test guest, built from tests/guest by the build script.
pub static TEST_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest.elf"));

/// What to boot.
#[derive(Debug, Clone)]
pub enum Image {
    /// The embedded test guest (or another ELF image at `path`), with its command line.
    TestGuest {
        path: Option<PathBuf>,
        command_line: String,
    },
    /// A Linux bzImage.
    Linux {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        command_line: String,
    },
}

#[derive(Debug, Clone)]
pub struct GuestConfig {
    pub image: Image,
    pub memory: u64,
    pub vcpus: u32,
    /// End the run (with a register report) when the guest makes no exit for this long;
    /// `None`: never (an idle Linux guest may sit in HLT inside KVM for hours).
    pub watchdog: Option<std::time::Duration>,
}

/// The test guest exits all the time (its longest silence is a few seconds of waiting for
/// an interrupt): silence this long means it is stuck.
pub const TEST_GUEST_WATCHDOG: std::time::Duration = std::time::Duration::from_secs(30);
/// A Linux guest on KVM-on-PVM that has made no exit for this long is stuck in KVM's
/// emulator, not idle.
pub const PVM_LINUX_WATCHDOG: std::time::Duration = std::time::Duration::from_secs(20);

/// Default RAM: enough for the test guest; Linux needs more (`--memory`).
pub const TEST_GUEST_MEMORY: u64 = 64 << 20;
pub const LINUX_MEMORY: u64 = 512 << 20;
/// vCPUs a partition may have (the MADT's room, the APIC ids of one IOAPIC system).
pub const MAX_VCPUS: u32 = 64;

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("/dev/kvm: {0} (the guest partition needs KVM; `paravisor run --no-guest` runs the services alone)")]
    Kvm(kvm_ioctls::Error),
    #[error("KVM lacks {0}")]
    Missing(&'static str),
    #[error("{what}: {reason}")]
    Setup { what: &'static str, reason: String },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("reading {path}: {error}")]
    Read { path: String, error: std::io::Error },
}

fn setup(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PartitionError {
    move |e| PartitionError::Setup {
        what,
        reason: e.to_string(),
    }
}

/// Whether `/dev/kvm` is KVM on PVM (a software virtualiser, no VMX/SVM): small guests run,
/// ring-0 code is emulated, a stock Linux kernel does not boot.
pub fn is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// A VM with its RAM loaded and its vCPUs set up, not yet running.
pub struct Partition {
    // Field order is drop order: vCPUs and the VM before the RAM KVM maps.
    vcpus: Vec<VcpuFd>,
    interrupts: Vec<(Interrupt, EventFd)>,
    /// Each device service's doorbell eventfd and doorbells, by service name.
    doorbells: Vec<(String, EventFd, DeviceRange)>,
    vm: Arc<VmFd>,
    _kvm: Kvm,
    _ram: GuestRam,
    pub config: GuestConfig,
}

impl Partition {
    /// Creates the VM, loads the image and wires `interrupts` (IOAPIC lines) as irqfds.
    ///
    /// `doorbells`: the doorbells each device service may arm (an eventfd each, not yet
    /// registered with KVM: see [`DoorbellSwitch`]).
    pub fn create(
        config: GuestConfig,
        interrupts: &[Interrupt],
        doorbells: &[(String, DeviceRange)],
    ) -> Result<Partition, PartitionError> {
        if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
            return Err(PartitionError::Setup {
                what: "vCPUs",
                reason: format!("{} vCPUs: give 1 to {MAX_VCPUS}", config.vcpus),
            });
        }
        let kvm = Kvm::new().map_err(PartitionError::Kvm)?;
        for (cap, name) in [
            (Cap::Irqchip, "an in-kernel irqchip"),
            (Cap::Irqfd, "irqfd"),
            (Cap::UserMemory, "user memory"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(PartitionError::Missing(name));
            }
        }
        let vm = kvm.create_vm().map_err(setup("creating the VM"))?;
        vm.create_irq_chip()
            .map_err(setup("creating the irqchip"))?;
        if matches!(config.image, Image::Linux { .. }) {
            vm.create_pit2(kvm_pit_config::default())
                .map_err(setup("creating the PIT"))?;
        }
        // MSR accesses KVM does not handle itself reach intercept (deny by default there).
        if kvm.check_extension(Cap::X86UserSpaceMsr) {
            let cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
                args: [
                    u64::from(
                        kvm_bindings::KVM_MSR_EXIT_REASON_INVAL
                            | kvm_bindings::KVM_MSR_EXIT_REASON_UNKNOWN,
                    ),
                    0,
                    0,
                    0,
                ],
                ..Default::default()
            };
            vm.enable_cap(&cap)
                .map_err(setup("routing MSR exits to user space"))?;
        }
        let ram = GuestRam::new(config.memory).map_err(|e| PartitionError::Setup {
            what: "guest RAM",
            reason: e.to_string(),
        })?;
        kvm::register_ram(&vm, &ram).map_err(setup("registering guest RAM"))?;

        let mut wired = Vec::new();
        for irq in interrupts {
            let Interrupt::Line(line) = *irq else {
                return Err(PartitionError::Setup {
                    what: "wiring interrupts",
                    reason: format!("{irq}: only IOAPIC lines can be wired yet"),
                });
            };
            let fd = EventFd::new(libc::EFD_CLOEXEC).map_err(|e| PartitionError::Setup {
                what: "eventfd",
                reason: e.to_string(),
            })?;
            vm.register_irqfd(&fd, u32::from(line))
                .map_err(setup("registering an irqfd"))?;
            wired.push((*irq, fd));
        }
        if !doorbells.is_empty() && !kvm.check_extension(Cap::Ioeventfd) {
            return Err(PartitionError::Missing("ioeventfd"));
        }
        let mut device_doorbells = Vec::new();
        for (service, range) in doorbells {
            let fd = EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK).map_err(|e| {
                PartitionError::Setup {
                    what: "eventfd",
                    reason: e.to_string(),
                }
            })?;
            device_doorbells.push((service.clone(), fd, *range));
        }

        boot::write_tables(&ram.memory)?;
        let entry = match &config.image {
            Image::TestGuest { path, command_line } => {
                let image = match path {
                    Some(p) => read(p)?,
                    None => TEST_GUEST.to_vec(),
                };
                boot::load_elf(&ram.memory, &image, command_line)?
            }
            Image::Linux {
                kernel,
                initrd,
                command_line,
            } => {
                let kernel = read(kernel)?;
                let initrd = initrd.as_ref().map(|p| read(p)).transpose()?;
                let rsdp =
                    acpi::write(&ram.memory, config.vcpus).map_err(|e| PartitionError::Setup {
                        what: "ACPI tables",
                        reason: e.to_string(),
                    })?;
                boot::load_linux(
                    &ram.memory,
                    ram.size,
                    &kernel,
                    initrd.as_deref(),
                    command_line,
                    rsdp,
                )?
            }
        };

        // The launch measurement took the entry from the image before loading: they agree,
        // or the measurement would describe another start.
        let expected = boot::expected_entry(&config.image);
        if entry != expected {
            return Err(PartitionError::Setup {
                what: "boot entry",
                reason: format!(
                    "the image starts at {:#x} (RSI {:#x}), the measurement expected {:#x} (RSI {:#x})",
                    entry.rip, entry.rsi, expected.rip, expected.rsi
                ),
            });
        }
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(setup("reading the supported CPUID"))?;
        let mut vcpus = Vec::new();
        for id in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(setup("creating a vCPU"))?;
            let mut cpuid = cpuid.clone();
            for e in cpuid.as_mut_slice() {
                // The initial APIC id (leaf 1, EBX 31:24) names the vCPU.
                if e.function == 1 {
                    e.ebx = (e.ebx & 0x00FF_FFFF) | (id << 24);
                }
            }
            vcpu.set_cpuid2(&cpuid).map_err(setup("setting CPUID"))?;
            if id == 0 {
                let mut sregs = vcpu.get_sregs().map_err(setup("reading sregs"))?;
                boot::long_mode(&mut sregs);
                vcpu.set_sregs(&sregs)
                    .map_err(setup("entering long mode"))?;
                vcpu.set_regs(&boot::entry_regs(entry))
                    .map_err(setup("setting registers"))?;
            }
            vcpus.push(vcpu);
        }
        Ok(Partition {
            vcpus,
            interrupts: wired,
            doorbells: device_doorbells,
            vm: Arc::new(vm),
            _kvm: kvm,
            _ram: ram,
            config,
        })
    }

    /// The memfds of guest memory a device may be given: the shared window and all of RAM.
    pub fn memory_fds(&self) -> Vec<(crate::manifest::GuestMemoryAccess, RawFd)> {
        vec![
            (
                crate::manifest::GuestMemoryAccess::SharedWindow,
                self._ram.shared_window.as_raw_fd(),
            ),
            (
                crate::manifest::GuestMemoryAccess::All,
                self._ram.file.as_raw_fd(),
            ),
        ]
    }

    /// Each device service's doorbell eventfd (for its capability), by service name.
    pub fn doorbell_fds(&self) -> Vec<(String, RawFd)> {
        self.doorbells
            .iter()
            .map(|(name, fd, _)| (name.clone(), fd.as_raw_fd()))
            .collect()
    }

    /// The router's switch for `service`'s doorbells, if it has any.
    pub fn doorbells(&self, service: &str) -> Option<DoorbellSwitch> {
        let (_, fd, range) = self.doorbells.iter().find(|(n, _, _)| n == service)?;
        Some(DoorbellSwitch {
            vm: self.vm.clone(),
            fd: fd.try_clone().ok()?,
            range: *range,
            armed: false,
        })
    }

    /// The eventfds wired to guest interrupts (for the capabilities of their holders).
    pub fn interrupt_fds(&self) -> Vec<(Interrupt, RawFd)> {
        self.interrupts
            .iter()
            .map(|(i, fd)| (*i, fd.as_raw_fd()))
            .collect()
    }

    /// Starts every vCPU thread. `ended` is signalled when the first vCPU's run ends. Each
    /// thread installs `filters` (see [`crate::thread_filters::vcpu`]) before its first
    /// `KVM_RUN`; a thread that cannot ends its run as failed instead of running the guest.
    pub fn start(
        mut self,
        router: Router,
        ended: EventFd,
        filters: Vec<seccompiler::BpfProgram>,
    ) -> std::io::Result<Running> {
        kvm::install_kick_handler()?;
        let stop = router.stop.clone();
        let hung = Arc::new(AtomicBool::new(false));
        let router = Arc::new(Mutex::new(router));
        let outcome = Arc::new(Mutex::new(None::<Outcome>));
        let ended = Arc::new(ended);
        let mut threads = Vec::new();
        let mut stats = Vec::new();
        for (id, vcpu) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let s = Arc::new(VcpuStats::default());
            stats.push(s.clone());
            let (router, stop, hung, outcome, ended, filters) = (
                router.clone(),
                stop.clone(),
                hung.clone(),
                outcome.clone(),
                ended.clone(),
                filters.clone(),
            );
            let (tx, rx) = std::sync::mpsc::channel();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let _ = tx.send(kvm::current_thread());
                    // A panic in the loop must still end the run (with a report), not leave a
                    // dead vCPU behind a live paravisor.
                    // The guest's exit data is read from here on: confined first.
                    let result = match crate::thread_filters::install(&filters) {
                        Err(e) => Outcome::Failed(format!(
                            "vCPU {id}: cannot install its seccomp filter: {e}"
                        )),
                        Ok(()) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            vcpu::run(id as u32, vcpu, &router, &stop, &hung, &s)
                        }))
                        .unwrap_or_else(|_| {
                            Outcome::Failed(format!("vCPU {id}: its thread panicked"))
                        }),
                    };
                    let mut first = outcome.lock().unwrap_or_else(|p| p.into_inner());
                    if first.is_none() && result != Outcome::Stopped {
                        *first = Some(result);
                        let _ = ended.write(1);
                    }
                })?;
            let thread = rx.recv().map_err(std::io::Error::other)?;
            threads.push((thread, handle));
        }
        Ok(Running {
            partition: self,
            router,
            threads,
            stop,
            hung,
            outcome,
            stats,
        })
    }
}

/// A device's doorbells as the router holds them: the eventfd it signals after every access
/// it sends the device ([`DoorbellSwitch::wake`]), and the KVM ioeventfds that, while armed,
/// signal it for every guest write to a doorbell instead of an exit.
///
/// Armed only when the device asks ([`ipc_defs::services::guest::Next::Doorbells`]): a
/// doorbell write's value is lost on the ioeventfd path, so the device arms them only once
/// the driver keeps the values where the device reads them (NVMe's shadow doorbells).
pub struct DoorbellSwitch {
    vm: Arc<VmFd>,
    fd: EventFd,
    range: DeviceRange,
    armed: bool,
}

impl DoorbellSwitch {
    /// Wakes the device (it waits on this descriptor, not on its ring).
    pub fn wake(&self) {
        let _ = self.fd.write(1);
    }

    pub fn armed(&self) -> bool {
        self.armed
    }

    /// Registers (or removes) an ioeventfd for each doorbell; the state is unchanged when
    /// KVM refuses (arming is undone: the doorbells stay exits, which work too).
    pub fn set(&mut self, armed: bool) -> Result<(), String> {
        if armed == self.armed {
            return Ok(());
        }
        let addresses: Vec<u64> = (self.range.base..self.range.base + self.range.size)
            .step_by(4)
            .collect();
        for (i, &a) in addresses.iter().enumerate() {
            let at = kvm_ioctls::IoEventAddress::Mmio(a);
            let done = if armed {
                self.vm
                    .register_ioevent(&self.fd, &at, kvm_ioctls::NoDatamatch)
            } else {
                self.vm
                    .unregister_ioevent(&self.fd, &at, kvm_ioctls::NoDatamatch)
            };
            if let Err(e) = done {
                if armed {
                    for &b in &addresses[..i] {
                        let _ = self.vm.unregister_ioevent(
                            &self.fd,
                            &kvm_ioctls::IoEventAddress::Mmio(b),
                            kvm_ioctls::NoDatamatch,
                        );
                    }
                    return Err(format!("an ioeventfd at {a:#x}: {e}"));
                }
                // Disarming goes on: a doorbell left registered swallows writes.
                tracing::error!("removing the ioeventfd at {a:#x}: {e}");
            }
        }
        self.armed = armed;
        Ok(())
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, PartitionError> {
    std::fs::read(path).map_err(|error| PartitionError::Read {
        path: path.display().to_string(),
        error,
    })
}

/// A running partition.
pub struct Running {
    pub router: Arc<Mutex<Router>>,
    threads: Vec<(libc::pthread_t, JoinHandle<()>)>,
    stop: Arc<AtomicBool>,
    hung: Arc<AtomicBool>,
    outcome: Arc<Mutex<Option<Outcome>>>,
    pub stats: Vec<Arc<VcpuStats>>,
    // Last: the VM outlives the threads that run it.
    partition: Partition,
}

impl Running {
    /// How the run ended, once it has.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn config(&self) -> &GuestConfig {
        &self.partition.config
    }

    /// Exits made so far by all vCPUs (the watchdog's measure of progress).
    pub fn exits(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| s.exits.load(Ordering::Relaxed))
            .sum()
    }

    /// The guest made no exit for the watchdog period: every vCPU ends its run with a
    /// register report (its `ended` event follows).
    pub fn declare_hung(&self) {
        self.hung.store(true, Ordering::SeqCst);
        for (thread, handle) in &self.threads {
            if !handle.is_finished() {
                kvm::kick(*thread);
            }
        }
    }

    /// Whether any vCPU is waiting for a service's answer (not stuck in the guest).
    pub fn in_call(&self) -> bool {
        self.stats.iter().any(|s| s.in_call.load(Ordering::Relaxed))
    }

    /// Stops every vCPU (kicking it out of KVM_RUN) and waits for the threads.
    pub fn stop(mut self) -> Option<Outcome> {
        self.halt();
        self.outcome
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (thread, handle) in &self.threads {
            // Kick until the thread is out of KVM_RUN and has seen the flag (a kick that lands
            // just before KVM_RUN is lost; the next one is not).
            while !handle.is_finished() {
                kvm::kick(*thread);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        for (_, handle) in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

impl Drop for Running {
    /// The threads end before the VM and its RAM go.
    fn drop(&mut self) {
        self.halt();
    }
}
