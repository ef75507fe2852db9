//! The spawner: the microkernel thread that clones every service process.
//!
//! Seccomp filters are inherited by a clone, so a service starts under the filter of the
//! thread that cloned it. The supervisor's own filter allows no mount, no change of identity
//! and no exec; the sandbox child needs all three before its `execveat`. So services are
//! cloned here instead, by a thread whose filter allows what the sandbox child does and what
//! any service of the manifest may do (see [`crate::thread_filters::spawner`]); the loader and
//! service filters then confine each service to its own profile.
//!
//! The thread takes a prepared [`SpawnPlan`] (made by the supervisor, which also keeps the
//! descriptors it names open until the answer), runs [`SpawnPlan::spawn`] and hands back the
//! [`Spawned`] child. It never ends while the process lives: a child's parent-death signal
//! fires when the *thread* that cloned it ends, and services must die with the microkernel,
//! not with a helper thread.

use std::io;
use std::sync::mpsc;

use seccompiler::BpfProgram;

use crate::sandbox::LibraryStore;
use crate::sandbox::Namespaces;
use crate::sandbox::SpawnError;
use crate::sandbox::SpawnPlan;
use crate::sandbox::Spawned;

struct Request {
    plan: SpawnPlan,
    namespaces: Namespaces,
    reply: mpsc::SyncSender<Result<Spawned, SpawnError>>,
}

/// The handle of the spawner thread.
pub struct Spawner {
    requests: mpsc::Sender<Request>,
    /// It made a [`LibraryStore`]: services bind their libraries from it.
    store: bool,
}

/// Where to make the [`LibraryStore`] and the libraries it holds (sealed image, length,
/// sandbox path).
pub type StoreRequest = (std::path::PathBuf, Vec<(std::os::fd::OwnedFd, u64, String)>);

impl Spawner {
    /// Starts the thread, which installs `filters` before it takes a request; fails if it
    /// cannot. Call with the signals the process handles itself already blocked (the thread
    /// inherits the mask). With `store` (a directory and the libraries: sealed image, length,
    /// sandbox path), the thread first makes a [`LibraryStore`] there that every service
    /// binds its libraries from; where it cannot (not root), services copy them as before.
    pub fn start(filters: Vec<BpfProgram>, store: Option<StoreRequest>) -> io::Result<Spawner> {
        let (requests, incoming) = mpsc::channel::<Request>();
        let (ready, confined) = mpsc::channel();
        std::thread::Builder::new()
            .name(crate::thread_filters::SPAWNER_THREAD.into())
            .spawn(move || {
                let store = store.and_then(|(dir, libraries)| {
                    match LibraryStore::create(&dir, &libraries) {
                        Ok(store) => {
                            tracing::info!(
                                libraries = store.len(),
                                "library store made: services bind their libraries from one read-only copy"
                            );
                            Some(store)
                        }
                        Err(e) => {
                            tracing::info!("no library store ({e}): each service root holds copies of its libraries");
                            None
                        }
                    }
                });
                let installed = crate::thread_filters::install(&filters);
                let confined = installed.is_ok();
                let _ = ready.send(installed.map(|()| store.is_some()));
                while let Some(Ok(Request {
                    plan,
                    namespaces,
                    reply,
                })) = confined.then(|| incoming.recv())
                {
                    let mut plan = plan;
                    if let Some(store) = &store {
                        plan.bind_from(store);
                    }
                    let result = plan.spawn(namespaces);
                    drop(plan);
                    let _ = reply.send(result);
                }
                loop {
                    std::thread::park();
                }
            })?;
        let store = confined
            .recv()
            .map_err(|_| io::Error::other("the spawner thread ended at start"))?
            .map_err(|e| io::Error::other(format!("cannot confine the spawner thread: {e}")))?;
        Ok(Spawner { requests, store })
    }

    /// Whether services bind their libraries from a [`LibraryStore`].
    pub fn has_store(&self) -> bool {
        self.store
    }

    /// Spawns `plan` (see [`SpawnPlan::spawn`]) on the spawner thread and waits for it.
    pub fn spawn(&self, plan: SpawnPlan, namespaces: Namespaces) -> Result<Spawned, SpawnError> {
        let gone = || SpawnError::Prepare(io::Error::other("the spawner thread is gone"));
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .send(Request {
                plan,
                namespaces,
                reply,
            })
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }
}
