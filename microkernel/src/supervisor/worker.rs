//! The control worker: the thread that runs the control commands that wait on a service (a
//! probe, a report through the attest service, the attest benchmark's thousand signatures),
//! so that the poll loop goes on reaping, restarting, watching the guest and answering `ps`
//! meanwhile. The loop checks a command against the current state, then hands the worker the
//! connection and a job holding only what the job uses (shared channel ends, the platform);
//! jobs run one at a time, in order, and each answers its own connection.
//!
//! The thread confines itself ([`crate::thread_filters::control`]) before its first job.

use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::time::Instant;

use crate::control::Reply;

/// A command's work, run on the worker; its reply goes to the command's connection.
pub(super) type Job = Box<dyn FnOnce() -> Reply + Send>;

/// What the poll loop does with a command: answer it now, or hand it to the worker (with
/// the command's name, for `ps`).
pub(super) enum Answer {
    Now(Reply),
    Later(&'static str, Job),
}

type Queued = (UnixStream, &'static str, Job);

pub(super) struct ControlWorker {
    jobs: mpsc::Sender<Queued>,
    /// The command under way and since when.
    busy: Arc<Mutex<Option<(&'static str, Instant)>>>,
}

impl ControlWorker {
    /// Starts the thread under `filters`; returns once it is confined.
    pub(super) fn start(filters: Vec<seccompiler::BpfProgram>) -> std::io::Result<ControlWorker> {
        let (jobs, queue) = mpsc::channel::<Queued>();
        let (ready, confined) = mpsc::channel();
        let busy = Arc::new(Mutex::new(None));
        let now_busy = busy.clone();
        std::thread::Builder::new()
            .name(crate::thread_filters::CONTROL_THREAD.into())
            .spawn(move || {
                let installed = crate::thread_filters::install(&filters);
                let ok = installed.is_ok();
                let _ = ready.send(installed);
                if ok {
                    // Ends when the supervisor drops its sender (at shutdown); a job under
                    // way then finishes against channels that are going away, and fails.
                    for (stream, command, job) in queue {
                        *lock(&now_busy) = Some((command, Instant::now()));
                        let reply = job();
                        *lock(&now_busy) = None;
                        crate::control::write_reply(&stream, &reply);
                    }
                }
            })?;
        confined
            .recv()
            .map_err(|_| std::io::Error::other("the control thread ended at start"))?
            .map_err(|e| {
                std::io::Error::other(format!("cannot confine the control thread: {e}"))
            })?;
        Ok(ControlWorker { jobs, busy })
    }

    /// Queues `job` (the command `command`), answered on `stream`. If the worker is gone,
    /// says so on `stream` at once.
    pub(super) fn submit(&self, stream: UnixStream, command: &'static str, job: Job) {
        if let Err(mpsc::SendError((stream, _, _))) = self.jobs.send((stream, command, job)) {
            crate::control::write_reply(
                &stream,
                &Reply::Error {
                    message: "the control thread is not running".into(),
                },
            );
        }
    }
}

impl ControlWorker {
    /// The command under way, for `ps`.
    pub(super) fn busy(&self) -> Option<crate::control::ControlJob> {
        lock(&self.busy).map(|(command, since)| crate::control::ControlJob {
            command: command.into(),
            running_ms: since.elapsed().as_millis() as u64,
        })
    }
}

/// Locks a channel end the loop and the worker share. A panic while it was held leaves the
/// end as usable as any call that failed (its epoch and rings are in shared memory).
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The end if no job holds it now.
pub(super) fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}
