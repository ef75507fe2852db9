//! A service's capability table: the descriptor behind each slot of its capability plan
//! ([`crate::plan`]), in the plan's order, and the descriptors the live audit expects it to
//! hold.

use super::*;
use crate::manifest::FileGrant;
use crate::manifest::KeyGrant;
use crate::plan::Held;
use crate::plan::Slot;
use crate::plan::Source;

impl Supervisor {
    /// The bootstrap record and the descriptors of service `i`, in slot order (slot 3 is the
    /// record itself, added by the caller): its planned slots, then what its descriptor store
    /// kept, each with its record.
    pub(super) fn capabilities(&self, i: usize) -> Result<Grants, String> {
        let s = &self.services[i];
        let mut record = self.bootstrap_record(&s.spec.name);
        let mut fds = Vec::new();
        let mut opened = Vec::new();
        let planned = self.plan.slots(i);
        for slot in planned {
            let (size, fd) = self.descriptor(i, slot)?;
            if slot.held == Held::Opened {
                if let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw())) {
                    opened.push((slot.slot, link.display().to_string()));
                }
            }
            grant(&mut record, slot, size)?;
            fds.push(fd);
        }
        let mut kept = 0;
        if let Some(store) = &s.store {
            let first = bootstrap::FIRST_CAPABILITY_SLOT + planned.len() as i32;
            for (k, (kept_record, fd)) in store.kept().enumerate() {
                record
                    .kept
                    .push(ipc_defs::fd_store::Kept {
                        slot: first + k as i32,
                        record: kept_record.clone(),
                    })
                    .map_err(|_| "too many kept descriptors for the bootstrap record")?;
                fds.push(Fd::Borrowed(fd.as_raw_fd()));
                kept += 1;
            }
        }
        Ok(Grants {
            record,
            fds,
            opened,
            kept,
        })
    }

    /// An empty bootstrap record for a process called `name`, with this run's log filter.
    pub(super) fn bootstrap_record(&self, name: &str) -> Bootstrap {
        Bootstrap {
            magic: bootstrap::BOOTSTRAP_MAGIC,
            service: name16(name),
            log_filter: HString::try_from(self.log_filter.as_str())
                .unwrap_or_else(|_| HString::try_from("info").unwrap_or_default()),
            capabilities: heapless::Vec::new(),
            kept: heapless::Vec::new(),
        }
    }

    /// The descriptor behind `slot` of service `i`, and the size its record gives.
    pub(super) fn descriptor(&self, i: usize, slot: &Slot) -> Result<(u64, Fd), String> {
        let s = &self.services[i];
        let missing = || {
            format!(
                "capability \"{}\" ({}) is planned, but the supervisor has nothing for it",
                slot.name, slot.kind
            )
        };
        let shm = |shm: &SharedMemory| Ok((shm.len() as u64, Fd::Borrowed(shm.as_raw_fd())));
        let guest = self.guest.as_ref();
        match slot.source {
            Source::StatusPage => shm(&s.status),
            // The runtime closes the seccomp program once it is installed.
            Source::SeccompProgram => Ok((0, Fd::Borrowed(s.service_program.as_raw_fd()))),
            Source::Control => shm(s.control_mem.shm()),
            Source::Served(link) | Source::Call(link) => {
                shm(self.links.get(link.0).ok_or_else(missing)?.mem.shm())
            }
            Source::Guest(link) => shm(guest
                .and_then(|g| g.links.get(link.0))
                .ok_or_else(missing)?
                .mem
                .shm()),
            Source::GuestInterrupt(irq) => guest
                .and_then(|g| g.interrupts.iter().find(|(line, _)| *line == irq))
                .map(|(_, fd)| (0, Fd::Borrowed(*fd)))
                .ok_or_else(missing),
            Source::GuestMemory(access) => guest
                .and_then(|g| g.memory.iter().find(|(a, _)| *a == access))
                .map(|(_, fd)| (0, Fd::Borrowed(*fd)))
                .ok_or_else(missing),
            Source::Doorbells => guest
                .and_then(|g| g.doorbells.iter().find(|(name, _)| *name == s.spec.name))
                .map(|(_, fd)| (0, Fd::Borrowed(*fd)))
                .ok_or_else(missing),
            Source::ParavisorAttest => {
                shm(self.attest_link.as_ref().ok_or_else(missing)?.mem.shm())
            }
            Source::Platform => shm(self.platform_link.as_ref().ok_or_else(missing)?.mem.shm()),
            Source::Region(n) => shm(&s.regions.get(n).ok_or_else(missing)?.1),
            Source::File(n) => self.open_file(s.spec.files.get(n).ok_or_else(missing)?),
            Source::Key(n) => self.key(i, s.spec.keys.get(n).ok_or_else(missing)?),
            Source::Listener(_) => s
                .listeners
                .iter()
                .find(|l| l.name == slot.name)
                .map(|l| (0, Fd::Borrowed(l.socket.as_raw_fd())))
                .ok_or_else(missing),
            Source::FdStore => s
                .store
                .as_ref()
                .map(|store| (0, Fd::Borrowed(store.service_end().as_raw_fd())))
                .ok_or_else(missing),
            Source::Tap(_) => s
                .taps
                .iter()
                .find(|t| t.name == slot.name)
                .map(|t| (0, Fd::Borrowed(t.fd.as_raw_fd())))
                .ok_or_else(missing),
        }
    }

    /// A granted file, opened through the state directory's descriptor: never a link, a FIFO
    /// or another user's file.
    fn open_file(&self, f: &FileGrant) -> Result<(u64, Fd), String> {
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
        Ok((len, Fd::Owned(file.into())))
    }

    /// Key `k` of service `i` as a sealed memfd: the service gets the bytes, not the file.
    fn key(&self, i: usize, k: &KeyGrant) -> Result<(u64, Fd), String> {
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
        let fd = ipc_defs::hosted::sys::memfd(&crate::plan::key_memfd(&k.name), key.0.len() as u64)
            .map_err(|e| format!("key \"{}\": {e}", k.name))?;
        write_all_at(&fd, &key.0).map_err(|e| format!("key \"{}\": {e}", k.name))?;
        ipc_defs::hosted::sys::seal_read_only(&fd)
            .map_err(|e| format!("key \"{}\": {e}", k.name))?;
        Ok((key.0.len() as u64, Fd::Owned(fd)))
    }

    /// `(descriptor, /proc link)` of what running service `i` may hold, from its plan: stdin
    /// (`/dev/null`), then each slot it keeps, at the link the plan names (a memfd, an
    /// eventfd) or, where only the run knows it (its output pipes, a file's resolved path, a
    /// bound socket), at the one its last start recorded. Slots it closes (its seccomp
    /// program, keys) are not expected.
    pub(super) fn expected_descriptors(&self, i: usize) -> Vec<(i32, String)> {
        let s = &self.services[i];
        let recorded = |fd: i32| {
            s.opened
                .iter()
                .find(|(n, _)| *n == fd)
                .map(|(_, link)| link.clone())
        };
        let mut expected = vec![(0, "/dev/null".to_string())];
        for fd in [1, 2] {
            expected.extend(recorded(fd).map(|link| (fd, link)));
        }
        for slot in self.plan.slots(i) {
            let link = match &slot.held {
                Held::Opened => recorded(slot.slot),
                held => held.link(),
            };
            expected.extend(link.map(|link| (slot.slot, link)));
        }
        expected
    }
}

/// What one start of a service hands it.
pub(super) struct Grants {
    pub(super) record: Bootstrap,
    /// Descriptors in slot order, from slot 4 (the record itself goes to slot 3).
    pub(super) fds: Vec<Fd>,
    /// `(slot, /proc link)` of what this start opened that only the run knows (a file's
    /// resolved path, a bound socket), for the live audit.
    pub(super) opened: Vec<(i32, String)>,
    /// How many of `fds` (the last ones) are kept descriptors its store handed back.
    pub(super) kept: usize,
}

/// A descriptor in a capability list: one the supervisor keeps, or one opened for this start.
pub(super) enum Fd {
    Borrowed(i32),
    Owned(OwnedFd),
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

/// Lists planned `slot` (with the size of what stands behind it) in `record`.
pub(super) fn grant(record: &mut Bootstrap, slot: &Slot, size: u64) -> Result<(), String> {
    record
        .capabilities
        .push(Capability {
            slot: slot.slot,
            kind: slot.kind,
            name: name16(&slot.name),
            size,
            grant: slot.grant,
        })
        .map_err(|_| "too many capabilities for the bootstrap record".to_string())
}
