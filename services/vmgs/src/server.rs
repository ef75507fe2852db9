//! The service's request handling, apart from any process or channel code: who may touch
//! which file id, chunked reads from a snapshot, chunked writes staged until complete and
//! acknowledged only after their commit, and recovery of a store whose commit failed.

use alloc::collections::BTreeMap;
use alloc::string::String;
use alloc::string::ToString;
use alloc::vec::Vec;

use ipc_defs::services::vmgs::Chunk;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::services::vmgs::FileIdSet;
use ipc_defs::services::vmgs::FileInfo;
use ipc_defs::services::vmgs::Request;
use ipc_defs::services::vmgs::Response;
use ipc_defs::services::vmgs::VmgsError;
use ipc_defs::services::vmgs::MAX_CHUNK;
use ipc_defs::services::vmgs::MAX_FILE_SIZE;
use zeroize::Zeroize;

use crate::crypto::Key;
use crate::error::Error;
use crate::log::log_error;
use crate::log::log_warn;
use crate::storage::Storage;
use crate::store::Vmgs;

/// A buffer of file contents that is wiped when dropped.
#[derive(Default)]
struct Plain(Vec<u8>);

impl Drop for Plain {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// What the server remembers about one client between its requests.
#[derive(Default)]
struct ClientState {
    /// The file being read and its contents at the read at offset 0.
    snapshot: Option<(FileId, Plain)>,
    /// The file being written, its announced size and the bytes received so far.
    staging: Option<(FileId, u32, Plain)>,
}

/// Counters of the store's work (no contents, no keys).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub reads: u64,
    pub commits: u64,
    pub refused: u64,
    pub failures: u64,
    pub reopens: u64,
}

/// Serves `vmgs::Request`s against one open store.
pub struct Server<S: Storage> {
    /// `None` only while a poisoned store is being reopened, or if reopening failed.
    vmgs: Option<Vmgs<S>>,
    key: Option<Key>,
    clients: BTreeMap<String, ClientState>,
    pub counters: Counters,
}

/// Whether a response refuses the request for lack of a grant (the runtime counts those).
pub fn is_refusal(response: &Response) -> bool {
    matches!(response, Response::Error(VmgsError::NotPermitted(_)))
}

impl<S: Storage> Server<S> {
    /// Opens the store on `storage`; `key` unlocks an encrypted one.
    pub fn open(storage: S, key: Option<Key>) -> Result<Server<S>, Error> {
        let vmgs = open_checked(storage, key.as_ref())?;
        Ok(Server {
            vmgs: Some(vmgs),
            key,
            clients: BTreeMap::new(),
            counters: Counters::default(),
        })
    }

    /// The open store (`None` if a failed commit could not be recovered from).
    pub fn store(&self) -> Option<&Vmgs<S>> {
        self.vmgs.as_ref()
    }

    /// Whether the server can go on (its store is open).
    pub fn healthy(&self) -> bool {
        self.vmgs.as_ref().is_some_and(|v| !v.is_poisoned())
    }

    /// Answers one request of `client`, which the manifest grants `granted`.
    pub fn handle(&mut self, client: &str, granted: FileIdSet, request: Request) -> Response {
        let file = match &request {
            Request::Size { file }
            | Request::Read { file, .. }
            | Request::Write { file, .. }
            | Request::Delete { file } => Some(*file),
            Request::List => None,
        };
        if let Some(file) = file {
            if !granted.contains(file) || !file.is_user_file() {
                self.counters.refused += 1;
                return Response::Error(VmgsError::NotPermitted(file));
            }
        }
        let response = match self.vmgs.as_mut() {
            Some(vmgs) => {
                let state = self.clients.entry(client.to_string()).or_default();
                answer(vmgs, state, &mut self.counters, granted, request)
            }
            None => Response::Error(VmgsError::Storage(file.unwrap_or(FileId::FILE_TABLE))),
        };
        if matches!(response, Response::Error(VmgsError::Storage(_))) {
            self.counters.failures += 1;
        }
        self.recover();
        response
    }

    /// After a failed commit the on-disk state is only known by reading it again.
    fn recover(&mut self) {
        if !self.vmgs.as_ref().is_some_and(|v| v.is_poisoned()) {
            return;
        }
        let Some(vmgs) = self.vmgs.take() else { return };
        self.clients.clear();
        self.counters.reopens += 1;
        // What is read back may be a header that reached only the page cache (a failed
        // flush can leave it there, marked clean): write it again and flush before anything
        // is committed on top of it, or give up.
        let reopened = open_checked(vmgs.into_storage(), self.key.as_ref()).and_then(|mut v| {
            v.persist_active_header()?;
            Ok(v)
        });
        match reopened {
            Ok(v) => {
                log_warn!("a commit failed midway; reopened the guest-state file");
                self.vmgs = Some(v);
            }
            Err(e) => {
                log_error!("a commit failed midway and the file cannot be reopened: {e}")
            }
        }
    }
}

/// Opens the store as the service may use it: not a file with the defective all-zero
/// metadata key (anyone with an old copy could forge its contents; `paravisor vmgs
/// update-key` retires it), and never reading more than a client may be sent.
fn open_checked<S: Storage>(storage: S, key: Option<&Key>) -> Result<Vmgs<S>, Error> {
    let mut vmgs = Vmgs::open(storage, key)?;
    if vmgs.has_zero_metadata_key() {
        return Err(Error::ZeroMetadataKey);
    }
    vmgs.set_read_limit(u64::from(MAX_FILE_SIZE));
    Ok(vmgs)
}

fn map_error(file: FileId, e: Error) -> VmgsError {
    match e {
        Error::NotFound(_) => VmgsError::NotFound(file),
        Error::Authentication(_) => VmgsError::Authentication(file),
        Error::NoSpace { bytes, .. } => VmgsError::NoSpace { file, bytes },
        Error::TooLarge { bytes, .. } => VmgsError::TooLarge { file, bytes },
        Error::Unauthenticated(_) => VmgsError::Authentication(file),
        other => {
            log_error!("{file}: {other}");
            VmgsError::Storage(file)
        }
    }
}

fn answer<S: Storage>(
    vmgs: &mut Vmgs<S>,
    state: &mut ClientState,
    counters: &mut Counters,
    granted: FileIdSet,
    request: Request,
) -> Response {
    match request {
        Request::Size { file } => match vmgs.file_info(file) {
            Ok(info) => Response::Size { bytes: info.size },
            Err(e) => Response::Error(map_error(file, e)),
        },
        Request::Read { file, offset } => {
            if offset == 0 {
                counters.reads += 1;
                match vmgs.read_file(file) {
                    Ok(data) => state.snapshot = Some((file, Plain(data))),
                    Err(e) => {
                        state.snapshot = None;
                        return Response::Error(map_error(file, e));
                    }
                }
            }
            let Some((snap_file, data)) = &state.snapshot else {
                return Response::Error(VmgsError::OutOfSequence { file, expected: 0 });
            };
            let start = offset as usize;
            if *snap_file != file || start > data.0.len() {
                return Response::Error(VmgsError::OutOfSequence { file, expected: 0 });
            }
            let end = (start + MAX_CHUNK).min(data.0.len());
            let total = data.0.len() as u32;
            let chunk = Chunk::new(&data.0[start..end]).expect("at most MAX_CHUNK bytes");
            if end == data.0.len() {
                state.snapshot = None;
            }
            Response::Data { total, data: chunk }
        }
        Request::Write {
            file,
            total,
            offset,
            data,
        } => {
            if total > MAX_FILE_SIZE || u64::from(total) > vmgs.image_size() {
                state.staging = None;
                return Response::Error(VmgsError::TooLarge {
                    file,
                    bytes: total.into(),
                });
            }
            if offset == 0 {
                state.staging = Some((file, total, Plain(Vec::with_capacity(total as usize))));
            }
            let Some((staged_file, staged_total, buf)) = &mut state.staging else {
                return Response::Error(VmgsError::OutOfSequence { file, expected: 0 });
            };
            let expected = buf.0.len() as u32;
            if *staged_file != file
                || *staged_total != total
                || offset != expected
                || u64::from(offset) + data.len() as u64 > u64::from(total)
            {
                let expected = if *staged_file == file { expected } else { 0 };
                state.staging = None;
                return Response::Error(VmgsError::OutOfSequence { file, expected });
            }
            buf.0.extend_from_slice(data.as_slice());
            if buf.0.len() < total as usize {
                return Response::Staged {
                    received: buf.0.len() as u32,
                };
            }
            let Some((_, _, contents)) = state.staging.take() else {
                unreachable!("staging checked above")
            };
            // A read snapshot of this file is now stale.
            if state.snapshot.as_ref().is_some_and(|(f, _)| *f == file) {
                state.snapshot = None;
            }
            match vmgs.write_file(file, &contents.0) {
                Ok(()) => {
                    counters.commits += 1;
                    Response::Written
                }
                Err(e) => Response::Error(map_error(file, e)),
            }
        }
        Request::Delete { file } => match vmgs.delete_file(file) {
            Ok(()) => {
                counters.commits += 1;
                Response::Deleted
            }
            Err(Error::NotFound(_)) => Response::Deleted,
            Err(e) => Response::Error(map_error(file, e)),
        },
        Request::List => {
            let mut files = heapless::Vec::new();
            for info in vmgs.files() {
                if granted.contains(info.id) && info.id.is_user_file() {
                    let _ = files.push(FileInfo {
                        file: info.id,
                        size: info.size,
                        encrypted: info.encrypted,
                    });
                }
            }
            Response::Files(files)
        }
    }
}
