//! The guest partition's side of the loop: creating and starting it, its watchdog, its row in
//! `ps`, and stopping it.

use super::*;

impl Supervisor {
    /// Creates the VM (with the interrupts the manifest grants wired) and the partition's
    /// channels, as `plan` lists them; the vCPUs start in [`Supervisor::run`], once the
    /// services are up.
    pub(super) fn guest(
        config: &crate::partition::GuestConfig,
        plan: &CapabilityPlan,
        m: &Manifest,
        keep_running: bool,
    ) -> Result<Guest, RunError> {
        use crate::partition::Image;
        if crate::partition::is_pvm() {
            if let Image::Linux { .. } = config.image {
                tracing::warn!(
                    "/dev/kvm is KVM on PVM (a software virtualiser): a stock Linux kernel does not \
                     boot on it (its instruction emulator fails on cmpxchg16b, xrstor and int3 in \
                     early boot); expect the run to end with an emulation failure. Use hardware KVM \
                     for Linux guests; the test guest runs here."
                );
            } else {
                tracing::info!(
                    "/dev/kvm is KVM on PVM: ring-0 guest code is emulated, ring 3 runs natively"
                );
            }
        }
        let doorbells: Vec<(String, crate::manifest::DeviceRange)> = m
            .services
            .iter()
            .filter_map(|s| Some((s.name.clone(), s.doorbells?)))
            .collect();
        let partition =
            crate::partition::Partition::create(config.clone(), &plan.interrupts, &doorbells)?;
        let mut links = Vec::new();
        for link in &plan.guest_links {
            let mem = ChannelMemory::create(&link.memfd, m.ring_capacity).map_err(|e| {
                create_err(format!("channel guest -> {}", m.services[link.server].name))(
                    e.to_string(),
                )
            })?;
            links.push(GuestLink {
                server: link.server,
                interface: link.interface,
                mem,
                exits: Default::default(),
            });
        }
        let description = match &config.image {
            Image::TestGuest {
                path: None,
                command_line,
            } => {
                format!("test guest (embedded) \"{command_line}\"")
            }
            Image::TestGuest {
                path: Some(p),
                command_line,
            } => {
                format!("ELF guest {} \"{command_line}\"", p.display())
            }
            Image::Linux {
                kernel,
                command_line,
                ..
            } => {
                format!("Linux {} \"{command_line}\"", kernel.display())
            }
        };
        Ok(Guest {
            interrupts: partition.interrupt_fds(),
            memory: partition.memory_fds(),
            doorbells: partition.doorbell_fds(),
            partition: Some(partition),
            running: None,
            links,
            ended: vmm_sys_util::eventfd::EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)?,
            keep_running,
            outcome: None,
            watchdog: config.watchdog,
            progress: None,
            declared_hung: false,
            description: format!(
                "{description}, {} MiB, {} vCPU(s)",
                config.memory >> 20,
                config.vcpus
            ),
        })
    }

    pub(super) fn guest_watchdog_armed(&self) -> bool {
        self.guest
            .as_ref()
            .is_some_and(|g| g.watchdog.is_some() && g.running.is_some() && g.outcome.is_none())
    }

    /// The partition's watchdog: a guest that made no exit for its period is declared hung
    /// (its vCPUs end with a register report).
    pub(super) fn check_guest_progress(&mut self) {
        if !self.guest_watchdog_armed() {
            return;
        }
        let Some(guest) = self.guest.as_mut() else {
            return;
        };
        let (Some(period), Some(running)) = (guest.watchdog, guest.running.as_ref()) else {
            return;
        };
        let exits = running.exits();
        let now = Instant::now();
        if guest.declared_hung {
            // Kick again until the vCPUs have ended (a kick can land just before KVM_RUN).
            running.declare_hung();
            return;
        }
        match guest.progress {
            // Waiting for a service (e.g. one restarting) is not being stuck in the guest.
            Some((seen, at)) if seen == exits && !running.in_call() => {
                if now.duration_since(at) >= period {
                    tracing::error!("the guest made no exit for {period:?}: declaring it hung");
                    running.declare_hung();
                    guest.declared_hung = true;
                }
            }
            _ => guest.progress = Some((exits, now)),
        }
    }

    /// Starts the vCPUs, with a router over the partition's channels.
    pub(super) fn start_guest(&mut self) -> Result<(), RunError> {
        use crate::partition::router;
        let Some(guest) = self.guest.as_mut() else {
            return Ok(());
        };
        let Some(partition) = guest.partition.take() else {
            return Ok(());
        };
        let mut devices = Vec::new();
        let mut routes = Vec::new();
        let mut intercept = None;
        let mut pci_owners = Vec::new();
        for link in &guest.links {
            let fd = link.mem.shm().as_fd().try_clone_to_owned()?;
            let mem = ChannelMemory::open(fd)
                .map_err(|e| create_err("partition channel")(e.to_string()))?;
            // The vCPU waits for the device's answer: spin (yielding) for a while first.
            let end = ClientEnd::new(
                mem,
                WaitPolicy {
                    spin: Duration::from_millis(2),
                    spin_only: false,
                },
            );
            let spec = &self.services[link.server].spec;
            let end = router::DeviceEnd::for_interface(link.interface, end);
            let index = devices.len();
            if link.interface == Interface::Intercept {
                intercept = Some(index);
            }
            for (space, ranges) in [
                (ipc_defs::services::guest::Space::Mmio, &spec.mmio),
                (ipc_defs::services::guest::Space::Port, &spec.pio),
            ] {
                for r in ranges {
                    routes.push(router::Route {
                        space,
                        base: r.base,
                        size: r.size,
                        device: index,
                    });
                }
            }
            if let Some(d) = spec.pci_device {
                pci_owners.push((d, index));
            }
            devices.push(router::Device {
                service: spec.name.clone(),
                end,
                exits: link.exits.clone(),
                doorbells: partition.doorbells(&spec.name),
            });
        }
        let ended = guest.ended.try_clone()?;
        let running = partition.start(
            router::Router::new(devices, routes, intercept, pci_owners),
            ended,
            self.filters.vcpu.clone(),
        )?;
        tracing::info!("guest started: {}", guest.description);
        guest.running = Some(running);
        Ok(())
    }

    pub(super) fn guest_row(&self) -> Option<crate::control::GuestRow> {
        use std::sync::atomic::Ordering;
        let guest = self.guest.as_ref()?;
        let vcpus = guest
            .running
            .as_ref()
            .map(|r| {
                r.stats
                    .iter()
                    .enumerate()
                    .map(|(id, s)| crate::control::VcpuRow {
                        id: id as u32,
                        state: match s.state.load(Ordering::Relaxed) {
                            crate::partition::vcpu::STATE_RUNNING => "running",
                            crate::partition::vcpu::STATE_ENDED => "ended",
                            _ => "created",
                        }
                        .into(),
                        exits: s.exits.load(Ordering::Relaxed),
                        in_thread: s.in_thread.load(Ordering::Relaxed),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(crate::control::GuestRow {
            image: guest.description.clone(),
            vcpus,
            exits_by_service: guest
                .links
                .iter()
                .map(|l| {
                    (
                        self.services[l.server].spec.name.clone(),
                        l.exits.load(Ordering::Relaxed),
                    )
                })
                .collect(),
            outcome: guest.outcome.as_ref().map(|o| format!("{o:?}")),
        })
    }

    /// Stops the vCPUs (before the services they wait for).
    pub(super) fn stop_guest(&mut self) {
        if let Some(guest) = self.guest.as_mut() {
            if let Some(running) = guest.running.take() {
                let outcome = running.stop();
                if guest.outcome.is_none() {
                    guest.outcome = outcome;
                }
            }
        }
    }

    /// The guest's run ended (its `ended` eventfd fired): reports it; whether the paravisor
    /// stops now.
    pub(super) fn guest_ended(&mut self) -> bool {
        let Some(guest) = self.guest.as_mut() else {
            return false;
        };
        let _ = guest.ended.read();
        let Some(running) = guest.running.as_ref() else {
            return false;
        };
        let Some(outcome) = running.outcome() else {
            return false;
        };
        if guest.outcome.is_some() {
            return !guest.keep_running;
        }
        use crate::partition::vcpu::Outcome;
        match &outcome {
            Outcome::Exited(status) => tracing::info!("guest ended with status {status}"),
            Outcome::Reset => tracing::warn!(
                "guest asked for a reset; rebooting a guest is not supported, so the run ends"
            ),
            Outcome::Failed(why) => tracing::error!("guest partition failed: {why}"),
            Outcome::Stopped => {}
        }
        guest.outcome = Some(outcome);
        if guest.keep_running {
            tracing::info!(
                "--keep-running: the services stay up; stop with `paravisor stop` or Ctrl-C"
            );
        }
        !guest.keep_running
    }
}
