//! The guest-state broker: `pv-vmgs --broker`, started on the slot of the service that holds
//! a sealed key (its identity, sandbox and seccomp profile) with the guest-state file and
//! nothing else (no key, no channel but its control channel), for the sealing steps that
//! read or write the host's file. The microkernel keeps the platform and the keys; the
//! broker parses the file. As OpenVMM's broker asks its VMGS worker for the protectors
//! before the store is unlocked, the privileged process never parses the host's file.

use std::io::Read;

use ipc_defs::services::vmgs::BrokerRequest;
use ipc_defs::services::vmgs::BrokerResponse;
use ipc_defs::services::vmgs::KeyBytes as WireKey;
use ipc_defs::services::vmgs::ProtectorBytes;
use ipc_defs::services::vmgs::Protectors;

use super::capabilities::grant;
use super::capabilities::Fd;
use super::*;

/// How long one broker request may take (a rotation commits three times, fsync each).
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the broker has to exit once told to.
const BROKER_EXIT: Duration = Duration::from_secs(5);

/// A running broker. Dropped, it is told to stop and waited for (killed if it does not
/// stop); every answer it gave was durable before it was sent.
pub(super) struct Broker {
    service: String,
    pidfd: OwnedFd,
    /// The read ends of its stdout and stderr, until read.
    output: Vec<std::fs::File>,
    control: Arc<Mutex<ControlEnd>>,
    /// The control channel itself, to move it to a new epoch when the broker ends (as after
    /// any death): the service's own start that follows finds nothing of the broker's.
    control_mem: ChannelMemory,
    ended: bool,
}

impl Supervisor {
    /// Starts the broker for the guest-state file `file` (the manifest's file `name`) on
    /// service `i`'s slot, and waits for its first answer. Its capabilities are the plan's
    /// [`crate::plan::CapabilityPlan::broker_slots`]; the file's descriptor is `file` (for
    /// a new image, the temporary file that becomes it).
    pub(super) fn broker(
        &self,
        i: usize,
        name: &str,
        file: std::fs::File,
    ) -> Result<Broker, String> {
        let s = &self.services[i];
        let fail =
            |e: &dyn std::fmt::Display| format!("the guest-state broker ({}): {e}", s.spec.name);
        let index = s
            .spec
            .files
            .iter()
            .position(|f| f.name == name)
            .ok_or_else(|| fail(&format_args!("no file \"{name}\"")))?;
        let slots = self
            .plan
            .broker_slots(i, index)
            .ok_or_else(|| fail(&format_args!("no broker plan for file \"{name}\"")))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let file = OwnedFd::from(file);
        // Its lines say it is the broker, not the service (cut to the record's 16).
        let mut record = self.bootstrap_record(&format!("{}-broker", s.spec.name));
        let mut raw = Vec::new();
        for slot in &slots {
            let (size, fd) = match slot.source {
                crate::plan::Source::File(_) => (len, file.as_raw_fd()),
                _ => {
                    let (size, fd) = self.descriptor(i, slot)?;
                    // The service's own pages and program: descriptors the supervisor keeps.
                    let Fd::Borrowed(fd) = fd else {
                        return Err(fail(&format_args!("{} is not kept", slot.name)));
                    };
                    (size, fd)
                }
            };
            grant(&mut record, slot, size).map_err(|e| fail(&e))?;
            raw.push(fd);
        }
        let bytes = postcard::to_allocvec(&record).map_err(|e| fail(&e))?;
        let record_fd = ipc_defs::hosted::sys::memfd("pv-bootstrap-broker", bytes.len() as u64)
            .map_err(|e| fail(&e))?;
        write_all_at(&record_fd, &bytes).map_err(|e| fail(&e))?;
        ipc_defs::hosted::sys::seal_read_only(&record_fd).map_err(|e| fail(&e))?;
        raw.insert(0, record_fd.as_raw_fd());
        // Its executable sits right after its (fewer) capabilities: a loader filter of its own.
        let loader = profiles::loader_program(
            &s.spec.syscalls,
            SpawnPlan::binary_slot(raw.len()),
            profiles::GrantRules::default(),
        )
        .map_err(|e| fail(&e))?;
        let (stdout, stdout_end) = sandbox::output_pipe().map_err(|e| fail(&e))?;
        let (stderr, stderr_end) = sandbox::output_pipe().map_err(|e| fail(&e))?;
        let mut plan = SpawnPlan::new(
            (&s.binary, s.image.as_ref()),
            &["--broker".to_string()],
            &raw,
            &s.code
                .iter()
                .map(|(fd, length, path)| (fd.as_ref(), *length, path.as_str()))
                .collect::<Vec<_>>(),
            loader,
            vec![
                (libc::RLIMIT_AS, s.spec.limits.memory),
                (libc::RLIMIT_NOFILE, s.spec.limits.open_files),
                (libc::RLIMIT_CORE, 0),
            ],
            &self.sandbox_root,
            &format!("pv-{}", s.spec.name),
        )
        .map_err(|e| fail(&e))?
        .run_as(sandbox::Identity::of(&s.privilege));
        plan.set_output(stdout_end, stderr_end);
        // Frames of an earlier process on this control channel are not the broker's.
        let _ = s.control_mem.restart_epoch(Direction::Requests);
        let control_mem = second_mapping(&s.control_mem).map_err(|e| fail(&e))?;
        let spawned = self
            .spawner
            .as_ref()
            .ok_or_else(|| fail(&"the spawner thread is not running"))?
            .spawn(plan, Namespaces::all() - Namespaces::USER)
            .map_err(|e| fail(&e))?;
        drop(file);
        let mut broker = Broker {
            service: s.spec.name.clone(),
            pidfd: spawned.pidfd,
            output: vec![stdout.into(), stderr.into()],
            control: s.control.clone(),
            control_mem,
            ended: false,
        };
        broker.first_answer().map_err(|e| fail(&e))?;
        Ok(broker)
    }
}

impl Broker {
    /// Waits for the answer to its first ping: it is then sandboxed and serving.
    fn first_answer(&mut self) -> Result<(), String> {
        let answer = lock_end(&self.control).call(&ctl::Request::Ping { nonce: 0 }, START_TIMEOUT);
        match answer {
            Ok(ctl::Response::Pong { .. }) => Ok(()),
            other => Err(format!(
                "did not start ({other:?}){}",
                self.exit_and_output()
            )),
        }
    }

    fn ask(&self, request: BrokerRequest) -> Result<BrokerResponse, String> {
        match lock_end(&self.control).call(&ctl::Request::GuestState(request), BROKER_TIMEOUT) {
            Ok(ctl::Response::GuestState(BrokerResponse::Failed(why))) => Err(why.to_string()),
            Ok(ctl::Response::GuestState(r)) => Ok(r),
            Ok(other) => Err(format!("the broker answered {other:?}")),
            Err(e) => Err(format!("the broker did not answer: {e}")),
        }
    }

    /// An unencrypted file (a key protector), read without the key.
    pub(super) fn read_plain(&self, file: FileId) -> Result<Option<Vec<u8>>, String> {
        match self.ask(BrokerRequest::ReadPlain { file })? {
            BrokerResponse::Plain(data) => Ok(data.map(|d| d.as_slice().to_vec())),
            other => Err(format!("the broker answered {other:?}")),
        }
    }

    /// Replaces an unencrypted file; `key` unlocks the image.
    pub(super) fn write_plain(
        &self,
        key: &[u8; 32],
        file: FileId,
        data: &[u8],
    ) -> Result<(), String> {
        let data =
            ProtectorBytes::new(data).ok_or_else(|| format!("{file}: protector too large"))?;
        self.done(BrokerRequest::WritePlain {
            key: wire_key(key),
            file,
            data,
        })
    }

    /// Replaces the key `old` by `new` with `protectors`, crash-safely (see
    /// [`BrokerRequest::Rotate`]).
    pub(super) fn rotate(
        &self,
        old: &[u8; 32],
        new: &[u8; 32],
        protectors: &[(FileId, Vec<u8>)],
    ) -> Result<(), String> {
        self.done(BrokerRequest::Rotate {
            old: wire_key(old),
            new: wire_key(new),
            protectors: wire_protectors(protectors)?,
        })
    }

    /// Makes a new image in the broker's (new, empty) file.
    pub(super) fn create(
        &self,
        size: u64,
        key: &[u8; 32],
        protectors: &[(FileId, Vec<u8>)],
    ) -> Result<(), String> {
        self.done(BrokerRequest::Create {
            size,
            key: wire_key(key),
            protectors: wire_protectors(protectors)?,
        })
    }

    fn done(&self, request: BrokerRequest) -> Result<(), String> {
        match self.ask(request)? {
            BrokerResponse::Done => Ok(()),
            other => Err(format!("the broker answered {other:?}")),
        }
    }

    /// Waits for the process to end (killing it after [`BROKER_EXIT`]) and logs what it
    /// printed; the last lines, for an error message.
    fn exit_and_output(&mut self) -> String {
        if !self.ended {
            let gone =
                sandbox::poll_readable(&[self.pidfd.as_raw_fd()], BROKER_EXIT.as_millis() as i32)
                    .is_ok_and(|r| r[0]);
            if !gone {
                let _ = sandbox::pidfd_signal(&self.pidfd, libc::SIGKILL);
                let _ = sandbox::poll_readable(&[self.pidfd.as_raw_fd()], 5_000);
            }
            self.ended = true;
            let _ = self.control_mem.restart_epoch(Direction::Requests);
        }
        let mut last = String::new();
        for pipe in self.output.drain(..) {
            // Its writers ended with the process: this reads what is left, then stops.
            let mut text = Vec::new();
            let _ = pipe.take(64 * 1024).read_to_end(&mut text);
            for line in String::from_utf8_lossy(&text).lines() {
                tracing::info!(service = %self.service, "broker: {line}");
                last = line.to_string();
            }
        }
        if last.is_empty() {
            String::new()
        } else {
            format!("; its last line: {last}")
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if !self.ended {
            let _ =
                lock_end(&self.control).call(&ctl::Request::Shutdown, Duration::from_millis(500));
            let _ = self.exit_and_output();
        }
    }
}

fn lock_end(end: &Mutex<ControlEnd>) -> std::sync::MutexGuard<'_, ControlEnd> {
    worker::lock(end)
}

fn wire_key(key: &[u8; 32]) -> WireKey {
    WireKey::new(key).expect("32 bytes")
}

fn wire_protectors(protectors: &[(FileId, Vec<u8>)]) -> Result<Protectors, String> {
    let mut out = Protectors::new();
    for (id, bytes) in protectors {
        let b = ProtectorBytes::new(bytes).ok_or_else(|| format!("{id}: protector too large"))?;
        out.push((*id, b))
            .map_err(|_| "more than two protectors".to_string())?;
    }
    Ok(out)
}
