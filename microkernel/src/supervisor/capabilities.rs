//! A service's capability table: every descriptor its bootstrap record names, made in the order
//! `manifest::capability_slots` counts them.

use super::*;

impl Supervisor {
    /// The bootstrap record and the descriptors of service `i`, in slot order (slot 3 is the
    /// record itself, added by the caller).
    pub(super) fn capabilities(&self, i: usize) -> Result<Grants, String> {
        let s = &self.services[i];
        let shm_cap = |kind, name: String, shm: &SharedMemory| {
            (
                kind,
                name,
                shm.len() as u64,
                Fd::Borrowed(shm.as_raw_fd()),
                Some(memfd_link(shm)),
                Grant::Interface,
            )
        };
        #[allow(clippy::type_complexity)]
        let mut caps: Vec<(CapabilityKind, String, u64, Fd, Option<String>, Grant)> = vec![
            shm_cap(CapabilityKind::Status, "status".into(), &s.status),
            // The runtime closes the seccomp program once it is installed.
            (
                CapabilityKind::SeccompProgram,
                "seccomp".into(),
                0,
                Fd::Borrowed(s.service_program.as_raw_fd()),
                None,
                Grant::Interface,
            ),
            shm_cap(
                CapabilityKind::Control,
                "control".into(),
                s.control_mem.shm(),
            ),
        ];
        for link in &self.links {
            if link.server == i {
                let client = &self.services[link.client].spec;
                let mut cap = shm_cap(
                    CapabilityKind::Serve(link.interface),
                    client.name.clone(),
                    link.mem.shm(),
                );
                cap.5 = client
                    .grants
                    .get(&link.interface)
                    .copied()
                    .unwrap_or(Grant::Interface);
                // A front end's commands: locality 0 and the localities of the listeners this
                // run bound (`--listen`), not of every listener the manifest declares.
                if let Grant::Vtpm(g) = &mut cap.5 {
                    if !g.commands.is_empty() {
                        let zero = ipc_defs::services::vtpm::Localities::ZERO;
                        g.commands = self.services[link.client].listeners.iter().fold(
                            zero,
                            |all, l| match l.grant {
                                Grant::Localities(these) => all.union(these),
                                _ => all,
                            },
                        );
                    }
                }
                caps.push(cap);
            }
        }
        if let Some(guest) = &self.guest {
            for link in guest.links.iter().filter(|l| l.server == i) {
                let mut cap = shm_cap(
                    CapabilityKind::Serve(link.interface),
                    "guest".into(),
                    link.mem.shm(),
                );
                if link.interface == Interface::Intercept {
                    // Which PCI devices the host bridge forwards instead of answering.
                    let owned = self
                        .services
                        .iter()
                        .filter_map(|s| s.spec.pci_device)
                        .fold(0u32, |m, d| m | 1 << d);
                    cap.5 = Grant::PciDevices(owned);
                }
                if link.interface == Interface::Vtpm {
                    // The partition alone drives the TPM's registers, for its own vCPUs.
                    cap.5 = Grant::Vtpm(ipc_defs::services::vtpm::VtpmGrant {
                        registers: guest.vcpus,
                        ..ipc_defs::services::vtpm::VtpmGrant::NONE
                    });
                }
                caps.push(cap);
                if link.interface == Interface::Intercept {
                    for (irq, fd) in &guest.interrupts {
                        caps.push((
                            CapabilityKind::Interrupt(*irq),
                            format!("irq-{irq}").replace(' ', "-"),
                            0,
                            Fd::Borrowed(*fd),
                            Some("anon_inode:[eventfd]".into()),
                            Grant::Interface,
                        ));
                    }
                }
            }
        }
        if let Some(link) = self.attest_link.as_ref().filter(|l| l.server == i) {
            caps.push(shm_cap(
                CapabilityKind::Serve(Interface::Attest),
                attest::PARAVISOR_CLIENT.into(),
                link.mem.shm(),
            ));
        }
        if let Some(link) = self.platform_link.as_ref().filter(|l| l.holder == i) {
            caps.push(shm_cap(
                CapabilityKind::Platform,
                "platform".into(),
                link.mem.shm(),
            ));
        }
        for link in &self.links {
            if link.client == i {
                caps.push(shm_cap(
                    CapabilityKind::Call(link.interface),
                    self.services[link.server].spec.name.clone(),
                    link.mem.shm(),
                ));
            }
        }
        for (name, shm) in &s.regions {
            caps.push(shm_cap(CapabilityKind::Region, name.clone(), shm));
        }
        for f in &s.spec.files {
            // Through the state directory's descriptor: never a link, a FIFO or another
            // user's file.
            let how = match (f.access, &f.missing) {
                (FileAccess::ReadWrite, Missing::Create) => Open::ReadWriteOrCreate(0o600),
                (FileAccess::ReadWrite, _) => Open::ReadWrite,
                (_, _) => Open::Read,
            };
            let file = self
                .state
                .open_file(&f.path, how)
                .map_err(|e| format!("file \"{}\": {e}", f.name))?;
            let len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .map(|p| p.display().to_string())
                .ok();
            caps.push((
                CapabilityKind::File(f.access),
                f.name.clone(),
                len,
                Fd::Owned(file.into()),
                link,
                Grant::Interface,
            ));
        }
        for k in &s.spec.keys {
            // The key travels as a sealed memfd: the service gets the bytes, not the file.
            let loaded;
            let key = match &k.path {
                Some(path) => {
                    loaded = crate::state_files::load_key(&self.state, path)?;
                    &loaded
                }
                None => self
                    .unsealed
                    .get(&(i, k.name.clone()))
                    .ok_or_else(|| format!("sealed key \"{}\" has not been unsealed", k.name))?,
            };
            let fd =
                ipc_defs::hosted::sys::memfd(&format!("pv-key-{}", k.name), key.0.len() as u64)
                    .map_err(|e| format!("key \"{}\": {e}", k.name))?;
            write_all_at(&fd, &key.0).map_err(|e| format!("key \"{}\": {e}", k.name))?;
            ipc_defs::hosted::sys::seal_read_only(&fd)
                .map_err(|e| format!("key \"{}\": {e}", k.name))?;
            // The service may close it once read, so the live audit does not expect it.
            caps.push((
                CapabilityKind::Key,
                k.name.clone(),
                key.0.len() as u64,
                Fd::Owned(fd),
                None,
                Grant::Interface,
            ));
        }
        for l in &s.listeners {
            let link = std::fs::read_link(format!("/proc/self/fd/{}", l.socket.as_raw_fd()))
                .ok()
                .map(|p| p.display().to_string());
            caps.push((
                CapabilityKind::Listener,
                l.name.clone(),
                0,
                Fd::Borrowed(l.socket.as_raw_fd()),
                link,
                l.grant,
            ));
        }
        let mut record = Bootstrap {
            magic: bootstrap::BOOTSTRAP_MAGIC,
            service: name16(&s.spec.name),
            log_filter: HString::try_from(self.log_filter.as_str())
                .unwrap_or_else(|_| HString::try_from("info").unwrap_or_default()),
            capabilities: heapless::Vec::new(),
        };
        let mut fds = Vec::new();
        let mut expected = vec![(0, "/dev/null".to_string())];
        for (k, (kind, name, size, fd, link, grant)) in caps.into_iter().enumerate() {
            let slot = bootstrap::FIRST_CAPABILITY_SLOT + k as i32;
            record
                .capabilities
                .push(Capability {
                    slot,
                    kind,
                    name: name16(&name),
                    size,
                    grant,
                })
                .map_err(|_| "too many capabilities for the bootstrap record".to_string())?;
            fds.push(fd);
            if let Some(link) = link {
                expected.push((slot, link));
            }
        }
        Ok(Grants {
            record,
            fds,
            expected,
        })
    }
}

/// What one start of a service hands it.
pub(super) struct Grants {
    pub(super) record: Bootstrap,
    /// Descriptors in slot order, from slot 4 (the record itself goes to slot 3).
    pub(super) fds: Vec<Fd>,
    /// `(slot, /proc link)` of each descriptor the service keeps, for the live audit.
    pub(super) expected: Vec<(i32, String)>,
}

/// A descriptor in a capability list: one the supervisor keeps, or one opened for this start.
pub(super) enum Fd {
    Borrowed(i32),
    Owned(OwnedFd),
}

/// What `/proc/PID/fd/N` shows for a memfd of this name.
pub(super) fn memfd_link(shm: &SharedMemory) -> String {
    format!("/memfd:{} (deleted)", shm.name())
}

impl Fd {
    pub(super) fn as_raw(&self) -> i32 {
        match self {
            Fd::Borrowed(fd) => *fd,
            Fd::Owned(fd) => fd.as_raw_fd(),
        }
    }
}

pub(super) fn name16(s: &str) -> bootstrap::Name {
    let mut out = bootstrap::Name::new();
    for c in s.chars() {
        if out.push(c).is_err() {
            break;
        }
    }
    out
}

pub(super) fn capability_count(spec: &ServiceSpec, m: &Manifest, guest: bool) -> usize {
    // The bootstrap record itself, then the slots it lists.
    1 + crate::manifest::capability_slots_with(spec, &m.services, guest)
}

pub(super) fn init_status(status: &SharedMemory) -> io::Result<()> {
    let page = StatusPage {
        magic: STATUS_MAGIC,
        violation_syscall: NO_VIOLATION,
        _reserved: [0; 14],
    };
    status.write(0, zerocopy::IntoBytes::as_bytes(&page))
}

pub(super) fn write_all_at(fd: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd.try_clone()?);
    file.write_all_at(bytes, 0)
}
