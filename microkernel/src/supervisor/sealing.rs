//! The datastore key's sealing at launch: unsealing under this launch, creating a sealed
//! guest-state file, rotation, key release through the broker, `vmgs reseal`, the launch logs
//! kept with it, and the simulated platform's directory.

use super::*;

/// A sealed key's guest-state file: its name in the manifest and its path in the state
/// directory.
pub(super) struct GuestState {
    file: String,
    path: PathBuf,
}

impl Supervisor {
    /// `paravisor reseal`: unseals (re-sealing through the broker if needed) every sealed
    /// key under this launch, then stops the services it started. What happened, per key.
    pub fn reseal(mut self) -> Result<Vec<String>, RunError> {
        let _signals = sandbox::signalfd(&[libc::SIGINT, libc::SIGTERM])?;
        self.confine()?;
        let result = self.unseal_keys();
        if let Err(RunError::SealedKey(why)) = &result {
            self.record_refusal(why);
        }
        self.shutdown();
        result?;
        if self.unsealed.is_empty() {
            return Ok(vec![
                "the manifest declares no sealed key; nothing to do".into()
            ]);
        }
        Ok(self
            .unsealed
            .keys()
            .map(|(i, name)| {
                format!(
                    "key \"{name}\" of {}: sealed (policy {}) to paravisor measurement {}",
                    self.services[*i].spec.name,
                    self.sealing.sealing.name(),
                    crate::util::hex(&self.sealing_measurement)
                )
            })
            .collect())
    }

    /// Makes or unseals every sealed key before the services that hold them start: for each
    /// sealed key, either creates its guest-state file with a new random key sealed into
    /// HW_KEY_PROTECTOR, or unseals the stored one. With the platform in-process: no service
    /// takes part (nor could: the platform channel refuses the context of the wrapping key).
    pub(super) fn unseal_keys(&mut self) -> Result<(), RunError> {
        let mut wanted = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            for k in s.spec.keys.iter().filter(|k| k.is_sealed()) {
                let file = s.spec.files.iter().find_map(|f| match &f.missing {
                    Missing::CreateVmgs { key, size } if key == &k.name => {
                        Some((f.name.clone(), f.path.clone(), *size))
                    }
                    _ => None,
                });
                let (file, path, size) = file.ok_or_else(|| {
                    RunError::SealedKey(format!(
                        "sealed key \"{}\" has no guest-state file",
                        k.name
                    ))
                })?;
                wanted.push((i, k.name.clone(), GuestState { file, path }, size));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        self.own_platform()?;
        let select = crate::key_protector::sealing_select(self.sealing.sealing);
        if self.sealing.sealing == crate::manifest::Sealing::Platform {
            tracing::warn!(
                "sealing policy \"platform\": any paravisor on this platform (any build, any manifest) can unseal the datastore key; for development only (production: `[attest] sealing = \"measurement\"`)"
            );
        }
        for (i, name, state, size) in wanted {
            let key = if self.state.exists(&state.path)? {
                self.open_sealed(i, &state, select)?
            } else {
                self.create_sealed(i, &state, size, select)?
            };
            self.unsealed.insert((i, name), key);
        }
        Ok(())
    }

    /// First start: a new random datastore key, sealed into HW_KEY_PROTECTOR (and, with key
    /// release, wrapped under the broker's tenant key into KEY_PROTECTOR) of a new
    /// guest-state file encrypted under it. The file appears only with its protectors.
    pub(super) fn create_sealed(
        &mut self,
        i: usize,
        state: &GuestState,
        size: u64,
        select: attest::FieldSelect,
    ) -> Result<KeyBytes, RunError> {
        let path = state.path.as_path();
        let mut key = KeyBytes([0; crate::manifest::KEY_BYTES]);
        getrandom::getrandom(&mut key.0)
            .map_err(|e| RunError::SealedKey(format!("no randomness for a key: {e}")))?;
        let sealed = self.seal(&key, select)?;
        let mut protectors = vec![(FileId::HW_KEY_PROTECTOR, sealed)];
        if let Some(addr) = self.sealing.key_release {
            let tenant = self.release(addr)?;
            let wrapped = TenantWrapped::wrap(&tenant, &key.0).map_err(RunError::SealedKey)?;
            protectors.push((FileId::KEY_PROTECTOR, wrapped.to_bytes().to_vec()));
        }
        // Made by the broker in a new file that appears only once complete, with its
        // protectors (a temporary file linked into place, never replacing one).
        self.state
            .create_new(path, 0o600, |file| {
                let copy = file.try_clone().map_err(|e| e.to_string())?;
                let broker = self.broker(i, &state.file, copy)?;
                broker.create(size, &key.0, &protectors)?;
                // Gone before the file appears.
                drop(broker);
                Ok(file)
            })
            .map_err(|e| {
                RunError::SealedKey(format!(
                    "guest-state file {}: {e}",
                    self.state.shown(path).display()
                ))
            })?;
        self.keep_sealing_log();
        tracing::info!(
            "created encrypted guest-state file {} under a new random datastore key, sealed (policy {}) in its HW_KEY_PROTECTOR{}",
            self.state.shown(path).display(),
            self.sealing.sealing.name(),
            if self.sealing.key_release.is_some() {
                " and wrapped under the key broker's tenant key in its KEY_PROTECTOR"
            } else {
                ""
            }
        );
        Ok(key)
    }

    /// Later starts: unseals HW_KEY_PROTECTOR. A key sealed under another policy than the
    /// manifest's is rotated to a new key sealed under the manifest's (an old blob of the
    /// weaker policy must not open the file any more). With key release, a KEY_PROTECTOR that
    /// is missing or made under another tenant key is re-made; and if the seal does not open
    /// (a new measurement), the broker releases the tenant key to this launch, which unwraps
    /// KEY_PROTECTOR and rotates to a new key sealed to itself: an old release's blob opens
    /// nothing afterwards, so the broker's policy can retire it.
    pub(super) fn open_sealed(
        &mut self,
        i: usize,
        state: &GuestState,
        select: attest::FieldSelect,
    ) -> Result<KeyBytes, RunError> {
        let path = state.path.as_path();
        let shown = self.state.shown(path);
        let file_error =
            |e: String| RunError::SealedKey(format!("guest-state file {}: {e}", shown.display()));
        let broker = self
            .broker(i, &state.file, self.guest_state(path, true)?)
            .map_err(RunError::SealedKey)?;
        let stored = broker
            .read_plain(FileId::HW_KEY_PROTECTOR)
            .map_err(file_error)?;
        let (unsealed, refusal) = match &stored {
            None => (
                None,
                format!(
                    "guest-state file {} holds no sealed key (no HW_KEY_PROTECTOR): it was made under a key file or by another tool. \
                     Give the vmgs service its key file (`keys = [{{ name = ..., path = ... }}]`), or move the file away to start afresh",
                    shown.display()
                ),
            ),
            Some(bytes) => match self.unseal_stored(&shown, bytes)? {
                Ok(opened) => (Some(opened), String::new()),
                Err(why) => (None, why),
            },
        };
        let release = self.sealing.key_release;
        match (unsealed, release) {
            (Some((key, sealed_select)), _) if sealed_select != select => {
                tracing::warn!(
                    "the datastore key of {} is sealed under another policy than the manifest's ({}): rotating to a new key sealed under it",
                    shown.display(),
                    self.sealing.sealing.name()
                );
                let tenant = match release {
                    Some(addr) => Some(self.release(addr)?),
                    None => None,
                };
                self.rotate(&broker, &key, select, tenant.as_deref())
            }
            (Some((key, _)), None) => Ok(key),
            (Some((key, _)), Some(addr)) => {
                let pinned = self.sealing.key_release_id.clone().unwrap_or_default();
                let current = broker
                    .read_plain(FileId::KEY_PROTECTOR)
                    .map_err(file_error)?
                    .and_then(|b| TenantWrapped::parse(&b).ok())
                    .is_some_and(|w| w.key_id_hex() == pinned);
                if !current {
                    // Key release added to an existing state, or a protector made under
                    // another tenant key: wrap the key for the broker now, while it opens.
                    let tenant = self.release(addr)?;
                    let wrapped =
                        TenantWrapped::wrap(&tenant, &key.0).map_err(RunError::SealedKey)?;
                    broker
                        .write_plain(&key.0, FileId::KEY_PROTECTOR, &wrapped.to_bytes())
                        .map_err(file_error)?;
                    tracing::info!(
                        "datastore key of {} wrapped under the key broker's tenant key (KEY_PROTECTOR)",
                        shown.display()
                    );
                }
                Ok(key)
            }
            (None, None) => Err(RunError::SealedKey(refusal)),
            (None, Some(addr)) => {
                let Some(kp) = broker
                    .read_plain(FileId::KEY_PROTECTOR)
                    .map_err(file_error)?
                else {
                    return Err(RunError::SealedKey(format!(
                        "{refusal} (key release is configured, but {} has no KEY_PROTECTOR: it was sealed before key release was, so the broker cannot help)",
                        shown.display()
                    )));
                };
                let kp = TenantWrapped::parse(&kp).map_err(|e| {
                    RunError::SealedKey(format!(
                        "guest-state file {}: KEY_PROTECTOR: {e}",
                        shown.display()
                    ))
                })?;
                tracing::info!(
                    "the sealed datastore key of {} does not unseal under this launch; asking the key broker at {addr}",
                    shown.display()
                );
                let tenant = self.release(addr).map_err(|e| {
                    RunError::SealedKey(format!("{refusal} Key release failed too: {e}"))
                })?;
                let key = kp.unwrap(&tenant).ok_or_else(|| {
                    RunError::SealedKey(format!(
                        "the key broker at {addr} released a key that does not open the KEY_PROTECTOR of {} (made under tenant key {}, not this one)",
                        shown.display(),
                        kp.key_id_hex()
                    ))
                })?;
                let key = self.rotate(&broker, &KeyBytes(*key), select, Some(&tenant))?;
                tracing::warn!(
                    "datastore key of {} released by the key broker at {addr}, rotated and re-sealed (policy {}) to paravisor measurement {}",
                    shown.display(),
                    self.sealing.sealing.name(),
                    crate::util::hex(&self.sealing_measurement)
                );
                Ok(key)
            }
        }
    }

    /// Replaces the datastore key `old` of the guest-state file `broker` holds by a new random
    /// one, sealed under `select` (and wrapped under `tenant`), in a crash-safe sequence
    /// ([`ipc_defs::services::vmgs::BrokerRequest::Rotate`]).
    pub(super) fn rotate(
        &mut self,
        broker: &super::broker::Broker,
        old: &KeyBytes,
        select: attest::FieldSelect,
        tenant: Option<&[u8; 32]>,
    ) -> Result<KeyBytes, RunError> {
        let mut key = KeyBytes([0; crate::manifest::KEY_BYTES]);
        getrandom::getrandom(&mut key.0)
            .map_err(|e| RunError::SealedKey(format!("no randomness for a key: {e}")))?;
        let sealed = self.seal(&key, select)?;
        let mut protectors = vec![(FileId::HW_KEY_PROTECTOR, sealed)];
        if let Some(t) = tenant {
            let wrapped = TenantWrapped::wrap(t, &key.0).map_err(RunError::SealedKey)?;
            protectors.push((FileId::KEY_PROTECTOR, wrapped.to_bytes().to_vec()));
        }
        broker
            .rotate(&old.0, &key.0, &protectors)
            .map_err(|e| RunError::SealedKey(format!("key rotation: {e}")))?;
        self.keep_sealing_log();
        Ok(key)
    }

    /// The tenant key from the broker at `addr`, for a report of this launch.
    pub(super) fn release(
        &mut self,
        addr: std::net::SocketAddr,
    ) -> Result<zeroize::Zeroizing<[u8; 32]>, RunError> {
        let pinned = self.sealing.key_release_id.clone().ok_or_else(|| {
            RunError::SealedKey(
                "key release needs `key-release-id` (manifest validation should have caught this)"
                    .into(),
            )
        })?;
        let (platform, launch) = self.own_platform()?;
        let key = crate::key_release::fetch_key(addr, |report_data| {
            // VMPL 0: the paravisor's own evidence, the only kind the broker accepts; signed
            // here, in-process (the platform channel refuses VMPL 0).
            platform
                .report(&crate::snp::ReportRequest {
                    report_data: *report_data,
                    measurement: launch.facts.measurement,
                    host_data: launch.host_data,
                    vmpl: u32::from(ipc_defs::services::platform::MICROKERNEL_VMPL),
                    policy: launch.facts.policy,
                    report_id: launch.report_id,
                })
                .map(|r| r.to_vec())
                .map_err(|e| e.to_string())
        })
        .map_err(|e| RunError::SealedKey(format!("key release by the broker at {addr}: {e}")))?;
        let id = crate::key_release::key_id(&key);
        if id != pinned {
            return Err(RunError::SealedKey(format!(
                "the broker at {addr} released a key with id {id}, not the manifest's key-release-id {pinned}: it is not the tenant's broker (or holds another tenant key); nothing was wrapped under it"
            )));
        }
        Ok(key)
    }

    /// The platform and this launch's facts, for the microkernel's own use.
    pub(super) fn own_platform(
        &self,
    ) -> Result<
        (
            std::sync::Arc<crate::platform::Platform>,
            crate::platform_server::Launch,
        ),
        RunError,
    > {
        self.platform_link
            .as_ref()
            .map(|l| (l.platform.clone(), l.launch))
            .ok_or_else(|| {
                RunError::SealedKey(
                    "sealed keys and key release need the platform: give the attest service `platform = true` (manifest validation should have caught this)"
                        .into(),
                )
            })
    }

    /// The launch facts a key is sealed to: this launch's, with the paravisor's own
    /// measurement (the guest it boots is not part of what opens its state).
    pub(super) fn sealing_facts(
        &self,
        launch: &crate::platform_server::Launch,
    ) -> crate::snp::LaunchFacts {
        crate::snp::LaunchFacts {
            measurement: self.sealing_measurement,
            ..launch.facts
        }
    }

    /// The guest-state file `rel` of the state directory, through its descriptor.
    pub(super) fn guest_state(&self, rel: &Path, write: bool) -> Result<std::fs::File, RunError> {
        let how = if write { Open::ReadWrite } else { Open::Read };
        Ok(self.state.open_file(rel, how)?)
    }

    /// Seals `key` to this platform and launch (in-process); the stored bytes.
    pub(super) fn seal(
        &mut self,
        key: &KeyBytes,
        select: attest::FieldSelect,
    ) -> Result<Vec<u8>, RunError> {
        let (platform, launch) = self.own_platform()?;
        let sealed = SealedKey::seal(&platform, &self.sealing_facts(&launch), &key.0, select)
            .map_err(|e| RunError::SealedKey(format!("sealing the datastore key: {e}")))?;
        Ok(sealed.to_bytes().to_vec())
    }

    /// Unseals `stored` (the HW_KEY_PROTECTOR of `path`): the key, or why it did not unseal
    /// (the refusal an operator reads).
    pub(super) fn unseal_stored(
        &mut self,
        path: &Path,
        stored: &[u8],
    ) -> Result<Result<(KeyBytes, attest::FieldSelect), String>, RunError> {
        let sealed = match SealedKey::parse(stored) {
            Ok(s) => s,
            Err(e) => {
                return Ok(Err(format!(
                    "guest-state file {}: its HW_KEY_PROTECTOR is unusable: {e}",
                    path.display()
                )))
            }
        };
        let (platform, launch) = self.own_platform()?;
        match sealed.unseal(&platform, &self.sealing_facts(&launch)) {
            Some(k) => {
                let key = KeyBytes(*k);
                tracing::info!(
                    "datastore key of {} unsealed (sealed under policy {})",
                    path.display(),
                    if sealed.select.measurement {
                        "measurement"
                    } else {
                        "platform"
                    }
                );
                Ok(Ok((key, sealed.select)))
            }
            None => Ok(Err(self.unseal_refusal(path, &sealed))),
        }
    }

    /// Keeps the launch log of the run that sealed a key (`sealed-launch-log.json`), so that a
    /// later refusal can say what changed.
    pub(super) fn keep_sealing_log(&self) {
        self.write_log(Path::new(SEALED_LAUNCH_LOG), &self.launch_log);
    }

    /// Writes a launch log into the state directory (public: 0644); a failure is logged.
    pub(super) fn write_log(&self, to: &Path, log: &crate::measure::LaunchLog) {
        let kept = serde_json::to_vec_pretty(log)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                self.state
                    .replace(to, &bytes, 0o644)
                    .map_err(|e| e.to_string())
            });
        match kept {
            Ok(None) => {}
            Ok(Some(was)) => tracing::warn!(
                "{} was a {was}, not a file of ours: replaced",
                self.state.shown(to).display()
            ),
            Err(e) => tracing::warn!("{} not written: {e}", self.state.shown(to).display()),
        }
    }

    /// What differs between the launch log of the run that sealed (if kept and it matches
    /// `sealed_to`) and this run's paravisor.
    pub(super) fn launch_changes(&self, sealed_to: &[u8; 48]) -> Option<Vec<String>> {
        // A file of the (untrusted) state directory: bounded, and only a hint for the operator.
        let bytes = self
            .state
            .read(Path::new(SEALED_LAUNCH_LOG), MAX_LAUNCH_LOG)
            .ok()??;
        let then: crate::measure::LaunchLog = serde_json::from_slice(&bytes).ok()?;
        if then.entries.len() > 4096 || &then.paravisor_measurement() != sealed_to {
            return None;
        }
        let changes = crate::measure::paravisor_changes(&then, &self.launch_log);
        (!changes.is_empty()).then_some(changes)
    }

    /// After a refused start: `refused/` of the state directory holds the refused launch's
    /// log and why (the only thing a refused start writes).
    pub(super) fn record_refusal(&self, why: &str) {
        let dir = match self.state.subdir(Path::new(REFUSED_DIR), true) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!("refusal not recorded in {REFUSED_DIR}/: {e}");
                return;
            }
        };
        let log = serde_json::to_vec_pretty(&self.launch_log).unwrap_or_default();
        for (name, bytes) in [
            (LAUNCH_LOG, log),
            ("reason.txt", format!("{why}\n").into_bytes()),
        ] {
            if let Err(e) = dir.replace(Path::new(name), &bytes, 0o644) {
                tracing::warn!("{} not written: {e}", dir.shown(Path::new(name)).display());
            }
        }
    }

    /// Once the start is not refused: the launch log (for the attest service and readers),
    /// the platform's chain, and the state files the manifest creates when missing.
    pub(super) fn write_state(&mut self) -> Result<(), RunError> {
        self.write_log(Path::new(LAUNCH_LOG), &self.launch_log);
        if let Some(link) = &self.platform_link {
            // The chain, for the attest service (public: a verifier checks it anyway).
            let chain = crate::platform::chain_pem(&link.platform)?;
            let certs = Path::new(PLATFORM_CERTS);
            // Rewritten only when it differs; whatever is not a regular file of ours (a
            // link, a FIFO) is replaced, never written through.
            let same = matches!(
                self.state.read(certs, MAX_CHAIN as u64),
                Ok(Some(b)) if b == chain.as_bytes()
            );
            if !same {
                if let Some(was) = self.state.replace(certs, chain.as_bytes(), 0o644)? {
                    tracing::warn!(
                        "{} was a {was}, not a file of ours: replaced",
                        self.state.shown(certs).display()
                    );
                }
            }
        }
        for line in crate::state_files::prepare(&self.manifest, &self.state)
            .map_err(create_err("state files"))?
        {
            tracing::info!("{line}");
        }
        Ok(())
    }

    /// Why a stored key did not unseal, and what the operator can do.
    pub(super) fn unseal_refusal(&self, path: &Path, sealed: &SealedKey) -> String {
        let file = path.display();
        let refused = self.state.shown(Path::new(REFUSED_DIR));
        if sealed.select.measurement && sealed.measurement != self.sealing_measurement {
            let what = match self.launch_changes(&sealed.measurement) {
                Some(changes) => format!(
                    "What changed since the sealing run ({SEALED_LAUNCH_LOG} vs this launch):\n{}",
                    changes.iter().map(|c| format!("  - {c}\n")).collect::<String>()
                ),
                None => "Something it measures changed since (the microkernel, a service binary or library, the measured configuration: compare `paravisor measure --json` with the launch log of the run that sealed it).\n".into(),
            };
            format!(
                "refusing to start: the datastore key of guest-state file {file} is sealed under policy \"measurement\" to paravisor measurement {} (as its header says), but this paravisor measures {}.\n{what}\
                 Three ways out:\n\
                 \x20 1. key release: a key broker whose policy accepts this launch (`paravisor kbs serve`), named by `[attest] key-release-id` (and its address, `key-release`): the start re-seals the key to this measurement;\n\
                 \x20 2. `paravisor vmgs reseal` (with key release configured): the same, offline, before starting;\n\
                 \x20 3. a new state directory (`--state-dir NEW`): a fresh start; {file} cannot be read without its key (move it away to start afresh here).\n\
                 Or start the build and configuration that sealed it. Nothing was written but {} (this launch's log and this message).",
                crate::util::hex(&sealed.measurement),
                crate::util::hex(&self.sealing_measurement),
                refused.display()
            )
        } else {
            format!(
                "refusing to start: the datastore key of guest-state file {file} does not unseal on this platform (sealed under policy \"{}\"{}): it was sealed by another platform (another --platform-dir or chip secret), or its HW_KEY_PROTECTOR was altered. \
                 Use the platform that sealed it, release the key through a key broker (`[attest] key-release-id`, `paravisor vmgs reseal`), or start afresh with a new state directory (`--state-dir NEW`, or move {file} away). Nothing was written but {}.",
                if sealed.select.measurement { "measurement" } else { "platform" },
                if sealed.select.measurement {
                    format!(", measurement {} = this one", &crate::util::hex(&sealed.measurement)[..16])
                } else {
                    String::new()
                },
                refused.display()
            )
        }
    }

    /// Platform requests of service `i` refused as reserved to the microkernel.
    pub(super) fn platform_refusals(&self, i: usize) -> u64 {
        self.platform_link
            .as_ref()
            .filter(|l| l.holder == i)
            .and_then(|l| l.server.as_ref())
            .map_or(0, |s| {
                s.counters
                    .refused
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
    }
}

/// Largest launch log read back from the state directory.
pub(super) const MAX_LAUNCH_LOG: u64 = 1 << 20;

/// Where `run` keeps the simulated platform unless told: `platform` next to the state
/// directory (never inside it: the platform outlives any one state). Never in a shared
/// directory (one others may write to, even sticky like `/tmp`): whoever made `platform`
/// there first would choose the chip secret, and so sign reports that verify as ours.
pub fn default_platform_dir(state_dir: &Path) -> Result<PathBuf, String> {
    let parent = match state_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    match crate::owned_dir::shared_mode(&parent, "the directory of the state directory") {
        Ok(None) => Ok(parent.join("platform")),
        Ok(Some(mode)) => Err(format!(
            "the state directory {} is in {}, which others may write to (mode {mode:04o}), so its default platform directory (\"platform\" next to it) could have been made by another user. \
             Name a private platform directory with --platform-dir (or `[attest] platform-dir` in the manifest), or use a state directory whose parent is yours",
            state_dir.display(),
            if parent == Path::new(".") { "the current directory".to_string() } else { parent.display().to_string() },
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// Opens the simulated platform in `dir`, provisioning one (and saying so) if there is none.
pub(super) fn open_or_init_platform(dir: &Path) -> Result<crate::platform::Platform, RunError> {
    use crate::platform::Platform;
    use crate::platform::PlatformError;
    use std::os::unix::process::CommandExt;
    match Platform::open(dir) {
        Ok(p) => Ok(p),
        Err(PlatformError::Missing(_)) => {
            tracing::warn!(
                "no platform in {}: provisioning a SIMULATED one (chip secret in a plain file: development only; `paravisor platform init` makes one explicitly)",
                dir.display()
            );
            // Certificate building (RSA, X.509) is not in the trusted binary: the tools
            // binary next to it provisions, as `paravisor platform init` would.
            let tools = crate::cli::bin_dir().join(crate::cli::TOOLS_BINARY);
            let out = std::process::Command::new(&tools)
                .arg0("paravisor")
                .arg("platform")
                .arg("init")
                .arg("--platform-dir")
                .arg(dir)
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| {
                    RunError::Platform(PlatformError::Crypto(format!(
                        "cannot run {} to provision the platform: {e}",
                        tools.display()
                    )))
                })?;
            match Platform::open(dir) {
                // Provisioned (by it, or by another paravisor at the same moment).
                Ok(p) => Ok(p),
                Err(e) if out.status.success() => Err(e.into()),
                Err(_) => Err(RunError::Platform(PlatformError::Crypto(format!(
                    "provisioning the platform failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                )))),
            }
        }
        Err(e) => Err(e.into()),
    }
}
