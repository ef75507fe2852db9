//! The host's VMM under `run --vmm qemu`: starting QEMU on the bound listeners, its end, and
//! stopping it (see [`crate::host_vmm`]).

use super::*;

/// The UEFI variable store QEMU's firmware writes, in the state directory (made from the
/// firmware's template on the first run).
const UEFI_VARS: &str = "uefi-vars.fd";
/// The largest variable store copied from a template (Debian's 4M store is 528 KiB).
const MAX_VARS: u64 = 16 << 20;

impl Supervisor {
    /// Starts QEMU if this run has one: its variable store, its command line (recorded in
    /// the launch log), the process. Called before the threads are confined.
    pub(super) fn start_vmm(&mut self) -> Result<(), RunError> {
        let Some(config) = self.qemu.take() else {
            return Ok(());
        };
        let m = &self.manifest;
        let fail = |what: &'static str| move |e: String| create_err(what)(e);
        let attached = config.attached(m).map_err(fail("QEMU's devices"))?;
        let request = crate::listeners::ListenRequest {
            all: false,
            named: config
                .listeners(m)
                .map_err(fail("QEMU's devices"))?
                .into_iter()
                .map(|n| (n, None))
                .collect(),
        };
        let enabled = crate::listeners::enabled(m, &request).map_err(fail("QEMU's listeners"))?;
        let vars = match &config.firmware {
            None => None,
            Some(code) => Some(self.uefi_vars(code)?),
        };
        let args = crate::host_vmm::command_line(
            &config,
            &attached,
            &enabled,
            &self.state_dir,
            vars.as_deref(),
        )
        .map_err(fail("QEMU's command line"))?;
        let accel = config.resolved_accel();
        let vmm = crate::host_vmm::HostVmm::spawn(&config.qemu, &args, accel)?;
        tracing::info!(
            pid = vmm.pid(),
            accel = ?accel,
            devices = ?attached.iter().map(|a| a.listener.as_str()).collect::<Vec<_>>(),
            "QEMU started (the host's VMM, not measured; its command line is in launch-log.json): {} {}",
            config.kernel.display(),
            config.initrd.as_ref().map(|i| i.display().to_string()).unwrap_or_default()
        );
        self.launch_log.host_vmm = Some(vmm.record.clone());
        self.vmm = Some(vmm);
        Ok(())
    }

    /// The variable store for UEFI `code`: the state directory's, made from the firmware's
    /// template the first time.
    fn uefi_vars(&self, code: &Path) -> Result<PathBuf, RunError> {
        let rel = Path::new(UEFI_VARS);
        if !self.state.exists(rel)? {
            let template = crate::host_vmm::vars_template(code).ok_or_else(|| {
                create_err("the UEFI variable store")(format!(
                    "no template next to {} (expected a name with _CODE that _VARS replaces)",
                    code.display()
                ))
            })?;
            let bytes = std::fs::read(&template).map_err(|e| {
                create_err("the UEFI variable store")(format!("{}: {e}", template.display()))
            })?;
            if bytes.len() as u64 > MAX_VARS {
                return Err(create_err("the UEFI variable store")(format!(
                    "{} is {} bytes: not a variable store",
                    template.display(),
                    bytes.len()
                )));
            }
            self.state
                .create_new(rel, 0o600, |mut f| {
                    use std::io::Write;
                    f.write_all(&bytes).map_err(|e| e.to_string())?;
                    Ok(f)
                })
                .map_err(create_err("the UEFI variable store"))?;
            tracing::info!(
                "UEFI variable store {} made from {}",
                self.state.shown(rel).display(),
                template.display()
            );
        }
        // Opened once through the directory's descriptor: a regular file of ours, no link.
        drop(
            self.state
                .open_file(rel, crate::owned_dir::Open::ReadWrite)?,
        );
        Ok(std::path::absolute(self.state_dir.join(rel))
            .unwrap_or_else(|_| self.state_dir.join(rel)))
    }

    /// QEMU's process ended (its pidfd is readable): whether the paravisor stops now.
    pub(super) fn vmm_ended(&mut self) -> bool {
        let Some(vmm) = self.vmm.as_mut() else {
            return false;
        };
        if vmm.reap().is_none() {
            return false;
        }
        if self.keep_running {
            tracing::info!(
                "--keep-running: the services stay up; stop with `paravisor stop` or Ctrl-C"
            );
        }
        !self.keep_running
    }

    /// Stops QEMU (before the services its devices use).
    pub(super) fn stop_vmm(&mut self) {
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.stop();
        }
    }
}
