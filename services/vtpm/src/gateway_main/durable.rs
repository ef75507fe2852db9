//! What lets a killed gateway's successor carry on its connections: the fd store (every
//! connection, every data channel a control connection handed over, and the outbox), the
//! journal region ([`pv_vtpm::gateway_journal`]) and the outbox, a pipe every reply goes
//! through on its way to its connection (see the journal's header for why).

use std::io;
use std::io::Read;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;

use ipc_defs::fd_store::KeptRecord;
use ipc_defs::hosted::fd_store::FdStore;
use ipc_defs::hosted::runtime::Context;
use ipc_defs::hosted::sys;
use ipc_defs::hosted::SharedMemory;
use pv_vtpm::gateway_journal::Journal;
use pv_vtpm::gateway_journal::JournalMemory;
use pv_vtpm::gateway_journal::Recovered;
use pv_vtpm::gateway_journal::JOURNAL_REGION;

/// The outbox's two ends in the store (connections have ids below these).
const OUTBOX_READ: u32 = 1_000_000;
const OUTBOX_WRITE: u32 = 1_000_001;
/// Record names: an accepted connection, a data channel handed over on a control
/// connection (both with the listener's name as their state), the outbox's ends.
pub(crate) const CONNECTION: &str = "connection";
pub(crate) const DATA_CHANNEL: &str = "data-channel";
const OUTBOX_READ_NAME: &str = "outbox-read";
const OUTBOX_WRITE_NAME: &str = "outbox-write";
/// Descriptors of the store that are not connections (the outbox's two ends).
pub(crate) const RESERVED: usize = 2;

/// The journal region, as the journal's memory.
pub(crate) struct Region(SharedMemory);

impl JournalMemory for Region {
    fn size(&self) -> usize {
        self.0.len()
    }
    fn read(&self, offset: usize, buf: &mut [u8]) {
        // In bounds: the journal checked the size when it opened.
        let _ = self.0.read(offset, buf);
    }
    fn write(&mut self, offset: usize, data: &[u8]) {
        let _ = self.0.write(offset, data);
    }
    fn publish(&mut self, offset: usize, value: u32) {
        if let Ok(word) = self.0.atomic_u32(offset) {
            word.store(value, Ordering::Release);
        }
    }
}

/// A pipe every reply is written into whole, then moved to its connection with splice.
pub(crate) struct Outbox {
    read: OwnedFd,
    write: OwnedFd,
}

impl Outbox {
    /// Puts `reply` in the (empty) outbox: a pipe write of less than its capacity is whole.
    pub(crate) fn put(&self, reply: &[u8]) -> io::Result<()> {
        std::fs::File::from(self.write.try_clone()?).write_all(reply)
    }

    /// Whether something waits in the outbox.
    pub(crate) fn has_data(&self) -> bool {
        sys::poll_readable(&[self.read.as_fd()], std::time::Duration::ZERO).is_ok_and(|r| r[0])
    }

    /// Moves everything in the outbox to `to` (waiting for room as long as `to`'s send
    /// timeout allows).
    pub(crate) fn flush(&self, to: BorrowedFd<'_>) -> io::Result<()> {
        while self.has_data() {
            if sys::splice_from_pipe(self.read.as_fd(), to, 1 << 16)? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }

    /// Takes everything in the outbox out of it (at most `limit` bytes are looked for).
    pub(crate) fn take_all(&self, limit: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let Ok(fd) = self.read.try_clone() else {
            return out;
        };
        let mut file = std::fs::File::from(fd);
        let mut buf = [0u8; 4096];
        while out.len() <= limit && self.has_data() {
            match file.read(&mut buf) {
                Ok(n) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        out
    }

    /// Throws away what is in the outbox (its connection is gone).
    pub(crate) fn drain(&self) {
        let Ok(fd) = self.read.try_clone() else {
            return;
        };
        let mut file = std::fs::File::from(fd);
        let mut buf = [0u8; 4096];
        while self.has_data() {
            if !matches!(file.read(&mut buf), Ok(n) if n > 0) {
                return;
            }
        }
    }
}

/// The store, the journal and the outbox.
pub(crate) struct Durable {
    pub(crate) store: FdStore,
    pub(crate) journal: Journal<Region>,
    pub(crate) outbox: Outbox,
}

/// A connection the store handed back: its id, kind (connection or data channel), listener.
pub(crate) struct KeptConnection {
    pub(crate) id: u32,
    pub(crate) data_channel: bool,
    pub(crate) listener: String,
    pub(crate) fd: OwnedFd,
}

impl Durable {
    /// The store and the journal region the manifest grants, with what the last process kept
    /// and journaled; `None` (and everything kept closed) without both.
    pub(crate) fn open(context: &mut Context) -> Option<(Durable, Recovered, Vec<KeptConnection>)> {
        let kept = std::mem::take(&mut context.kept);
        let region = context.regions.remove(JOURNAL_REGION);
        let (store, region) = match (context.fd_store.take(), region) {
            (Some(store), Some(region)) => (store, region),
            (None, None) => return None,
            (store, _) => {
                tracing::error!(
                    "connections are not kept across restarts: the manifest grants {}",
                    if store.is_some() {
                        format!("an fd store but no `{JOURNAL_REGION}` region")
                    } else {
                        format!("a `{JOURNAL_REGION}` region but no fd store")
                    }
                );
                // Nothing is kept for a process that cannot use it.
                for (record, _) in &kept {
                    if let Some(store) = &store {
                        let _ = store.forget(record.id);
                    }
                }
                return None;
            }
        };
        let (journal, recovered) = match Journal::open(Region(region)) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!("connections are not kept across restarts: {e}");
                for (record, _) in &kept {
                    let _ = store.forget(record.id);
                }
                return None;
            }
        };
        let mut outbox = (None, None);
        let mut connections = Vec::new();
        for (record, fd) in kept {
            let listener = String::from_utf8(record.state.to_vec()).unwrap_or_default();
            match (record.name.as_str(), record.id) {
                (OUTBOX_READ_NAME, OUTBOX_READ) => outbox.0 = Some(fd),
                (OUTBOX_WRITE_NAME, OUTBOX_WRITE) => outbox.1 = Some(fd),
                (CONNECTION | DATA_CHANNEL, id) if id < OUTBOX_READ => {
                    connections.push(KeptConnection {
                        id,
                        data_channel: record.name.as_str() == DATA_CHANNEL,
                        listener,
                        fd,
                    })
                }
                (name, id) => {
                    tracing::warn!(
                        "the fd store kept {name} {id}, which this gateway does not use: closed"
                    );
                    let _ = store.forget(id);
                }
            }
        }
        let outbox = match outbox {
            (Some(read), Some(write)) => Outbox { read, write },
            _ => {
                // The first start (or a predecessor killed while it made the outbox): a new
                // one. A reply the journal says is in the outbox would be lost with it, but
                // the outbox is made before any request is served.
                let (read, write) = match sys::pipe() {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::error!("connections are not kept across restarts: no outbox: {e}");
                        return None;
                    }
                };
                for (id, name, fd) in [
                    (OUTBOX_READ, OUTBOX_READ_NAME, &read),
                    (OUTBOX_WRITE, OUTBOX_WRITE_NAME, &write),
                ] {
                    let record = KeptRecord::new(id, name, &[]).expect("a valid record");
                    if let Err(e) = store.keep(&record, fd.as_fd()) {
                        tracing::error!(
                            "connections are not kept across restarts: the outbox: {e}"
                        );
                        return None;
                    }
                }
                Outbox { read, write }
            }
        };
        Some((
            Durable {
                store,
                journal,
                outbox,
            },
            recovered,
            connections,
        ))
    }

    /// Most connections the store keeps besides the outbox.
    pub(crate) fn capacity(&self) -> usize {
        self.store.max().saturating_sub(RESERVED)
    }

    /// Keeps connection `id` (of `kind`, from `listener`).
    pub(crate) fn keep(&self, id: u32, kind: &str, listener: &str, fd: BorrowedFd<'_>) {
        let Some(record) = KeptRecord::new(id, kind, listener.as_bytes()) else {
            return;
        };
        if let Err(e) = self.store.keep(&record, fd) {
            tracing::warn!(
                id,
                "connection not kept (it ends if the gateway restarts): {e}"
            );
        }
    }

    /// Forgets connection `id` (it ended): its peer sees it end once the gateway closes it.
    pub(crate) fn forget(&self, id: u32) {
        if let Err(e) = self.store.forget(id) {
            tracing::warn!(
                id,
                "connection not forgotten (it stays open until the gateway restarts): {e}"
            );
        }
    }
}
