//! The calling side of the `vmgs` interface for services that keep state in the VMGS file
//! (vtpm, attest): whole-file reads and writes over chunked requests, with the retry rule
//! the interface allows.
//!
//! A write replaces the whole file, so it is idempotent: if the store restarts in the middle
//! (the call fails with `PeerRestarted`) the whole write is sent again. [`VmgsClient::write`]
//! returns only once the store has acknowledged the commit, i.e. the new contents are
//! durable. Reads restart from offset 0 the same way.

use std::time::Duration;

use super::channel::CallError;
use super::channel::ClientEnd;
use crate::endpoint;
use crate::endpoint::ErrorCode;
use crate::services::vmgs::Chunk;
use crate::services::vmgs::FileId;
use crate::services::vmgs::FileInfo;
use crate::services::vmgs::Request;
use crate::services::vmgs::Response;
use crate::services::vmgs::VmgsError;
use crate::services::vmgs::MAX_CHUNK;
use crate::services::vmgs::MAX_FILE_SIZE;

/// How long one chunk may take (a commit includes two fdatasyncs).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a request is re-sent after the store restarted before giving up (the store's
/// restart policy ends in "failed" well before this many restarts).
const MAX_RESTARTS: u32 = 16;

/// Why a vmgs call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmgsCallError {
    #[error("vmgs: {0}")]
    Vmgs(VmgsError),
    #[error("vmgs channel: {0}")]
    Call(#[from] CallError),
    #[error("vmgs endpoint: {0}")]
    Endpoint(ErrorCode),
    #[error("vmgs answered {0} with an unexpected response")]
    Unexpected(&'static str),
    #[error("{0}: {1} bytes is more than a VMGS file may hold")]
    TooLarge(FileId, usize),
}

/// The channel, owned or shared with the runtime.
enum Channel {
    Owned(super::runtime::PlainClient),
    Shared(super::runtime::SharedClient),
}

/// A typed client of the vmgs store.
pub struct VmgsClient {
    end: Channel,
    /// Restarts of the store seen by this client (each one retried).
    pub restarts_seen: u64,
}

impl VmgsClient {
    /// Takes the calling end the runtime granted (typed for pings) and speaks vmgs on it.
    pub fn new(end: ClientEnd<endpoint::Request<()>, endpoint::Response<()>>) -> VmgsClient {
        VmgsClient {
            end: Channel::Owned(end),
            restarts_seen: 0,
        }
    }

    /// Speaks vmgs on a calling end shared with the runtime (see `Context::share_client`).
    pub fn shared(end: super::runtime::SharedClient) -> VmgsClient {
        VmgsClient {
            end: Channel::Shared(end),
            restarts_seen: 0,
        }
    }

    fn call(&mut self, request: Request) -> Result<Response, VmgsCallError> {
        let request = endpoint::Request::Service(request);
        let reply: endpoint::Response<Response> = match &mut self.end {
            Channel::Owned(end) => end.call_with(&request, CALL_TIMEOUT)?,
            Channel::Shared(end) => end.borrow_mut().call_with(&request, CALL_TIMEOUT)?,
        };
        match reply {
            endpoint::Response::Service(r) => Ok(r),
            endpoint::Response::Error(code) => Err(VmgsCallError::Endpoint(code)),
            endpoint::Response::Pong { .. } | endpoint::Response::Guest(_) => {
                Err(VmgsCallError::Unexpected("a request"))
            }
        }
    }

    /// Runs `op` again from the start whenever the store restarts under it.
    fn retrying<T>(
        &mut self,
        mut op: impl FnMut(&mut Self) -> Result<T, VmgsCallError>,
    ) -> Result<T, VmgsCallError> {
        let mut restarts = 0;
        loop {
            match op(self) {
                Err(VmgsCallError::Call(CallError::PeerRestarted { .. }))
                | Err(VmgsCallError::Vmgs(VmgsError::OutOfSequence { .. }))
                    if restarts < MAX_RESTARTS =>
                {
                    restarts += 1;
                    self.restarts_seen += 1;
                }
                other => return other,
            }
        }
    }

    /// A file's whole contents.
    pub fn read(&mut self, file: FileId) -> Result<Vec<u8>, VmgsCallError> {
        self.retrying(|c| {
            let mut out = Vec::new();
            let mut expected: Option<usize> = None;
            loop {
                let offset = out.len() as u32;
                match c.call(Request::Read { file, offset })? {
                    // The store is another process: its sizes are checked, not trusted.
                    Response::Data { total, data } => {
                        let total = total as usize;
                        if total > MAX_FILE_SIZE as usize
                            || expected.is_some_and(|t| t != total)
                            || out.len() + data.len() > total
                            || (data.is_empty() && out.len() < total)
                        {
                            return Err(VmgsCallError::Unexpected("read (inconsistent sizes)"));
                        }
                        expected = Some(total);
                        out.extend_from_slice(data.as_slice());
                        if out.len() == total {
                            return Ok(out);
                        }
                    }
                    Response::Error(e) => return Err(VmgsCallError::Vmgs(e)),
                    _ => return Err(VmgsCallError::Unexpected("read")),
                }
            }
        })
    }

    /// Replaces a file's contents; returns once they are durable.
    pub fn write(&mut self, file: FileId, data: &[u8]) -> Result<(), VmgsCallError> {
        if data.len() > MAX_FILE_SIZE as usize {
            return Err(VmgsCallError::TooLarge(file, data.len()));
        }
        let total = data.len() as u32;
        self.retrying(|c| {
            let mut offset = 0usize;
            loop {
                let end = (offset + MAX_CHUNK).min(data.len());
                let chunk = Chunk::new(&data[offset..end]).expect("at most MAX_CHUNK");
                let request = Request::Write {
                    file,
                    total,
                    offset: offset as u32,
                    data: chunk,
                };
                match c.call(request)? {
                    Response::Written if end == data.len() => return Ok(()),
                    Response::Staged { received } if received as usize == end => offset = end,
                    Response::Error(e) => return Err(VmgsCallError::Vmgs(e)),
                    _ => return Err(VmgsCallError::Unexpected("write")),
                }
            }
        })
    }

    /// Removes a file (no error if it does not exist).
    pub fn delete(&mut self, file: FileId) -> Result<(), VmgsCallError> {
        self.retrying(|c| match c.call(Request::Delete { file })? {
            Response::Deleted => Ok(()),
            Response::Error(e) => Err(VmgsCallError::Vmgs(e)),
            _ => Err(VmgsCallError::Unexpected("delete")),
        })
    }

    /// The size of a file's contents.
    pub fn size(&mut self, file: FileId) -> Result<u64, VmgsCallError> {
        self.retrying(|c| match c.call(Request::Size { file })? {
            Response::Size { bytes } => Ok(bytes),
            Response::Error(e) => Err(VmgsCallError::Vmgs(e)),
            _ => Err(VmgsCallError::Unexpected("size")),
        })
    }

    /// The caller's existing files.
    pub fn list(&mut self) -> Result<Vec<FileInfo>, VmgsCallError> {
        self.retrying(|c| match c.call(Request::List)? {
            Response::Files(files) => Ok(files.to_vec()),
            Response::Error(e) => Err(VmgsCallError::Vmgs(e)),
            _ => Err(VmgsCallError::Unexpected("list")),
        })
    }
}
