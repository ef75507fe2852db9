//! The schema of `manifest.toml` as written: every table and key, with the span of each value
//! so that a diagnostic can point at it. Unknown keys are errors (`deny_unknown_fields`);
//! nothing here is checked beyond its TOML type, which is the validator's work.

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawManifest {
    #[serde(default)]
    pub(super) paravisor: Option<RawParavisor>,
    #[serde(default)]
    pub(super) service: Vec<Spanned<RawService>>,
    #[serde(default)]
    pub(super) attest: Option<RawAttest>,
    /// The metal platform's tasks (`[[metal.task]]`); the hosted platform ignores them.
    #[serde(default)]
    pub(super) metal: Option<RawMetal>,
}

/// `[metal]`: what the metal image holds.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawMetal {
    #[serde(default)]
    pub(super) task: Vec<Spanned<RawMetalTask>>,
}

/// One `[[metal.task]]`: a ring-3 task of the metal image. A task named like a
/// `[[service]]` takes that service's endpoints, regions and restart policy; any other task
/// states them here, with the service's syntax.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawMetalTask {
    pub(super) name: Spanned<String>,
    /// A program (bin) of the task package (`services/metal`).
    pub(super) program: Spanned<String>,
    /// Its command line, in its boot record.
    #[serde(default)]
    pub(super) args: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) heap: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) stack: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) serves: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub(super) calls: Option<Spanned<Vec<Spanned<RawCall>>>>,
    #[serde(default)]
    pub(super) regions: Option<Spanned<Vec<Spanned<RawRegion>>>>,
    #[serde(default)]
    pub(super) restart: Option<Spanned<RawRestart>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawAttest {
    pub(super) sealing: Option<Spanned<String>>,
    pub(super) key_release: Option<Spanned<String>>,
    pub(super) key_release_id: Option<Spanned<String>>,
    pub(super) platform_dir: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawParavisor {
    pub(super) state_dir: Option<Spanned<String>>,
    pub(super) ring_capacity: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawService {
    pub(super) name: Spanned<String>,
    pub(super) binary: Spanned<String>,
    #[serde(default)]
    pub(super) args: Vec<String>,
    #[serde(default)]
    pub(super) serves: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) calls: Vec<Spanned<RawCall>>,
    #[serde(default)]
    pub(super) files: Vec<Spanned<RawFile>>,
    #[serde(default)]
    pub(super) keys: Vec<Spanned<RawKey>>,
    #[serde(default)]
    pub(super) listen: Vec<Spanned<RawListen>>,
    #[serde(default)]
    pub(super) regions: Vec<Spanned<RawRegion>>,
    /// TAP devices (a NIC's back end) the microkernel attaches for it when the host names
    /// their interfaces (`paravisor run --tap NAME=IFNAME[@NETNS]`).
    #[serde(default)]
    pub(super) taps: Vec<Spanned<RawTap>>,
    /// A descriptor store: descriptors the service sends it are kept across its restarts.
    #[serde(default)]
    pub(super) fd_store: Option<Spanned<RawFdStore>>,
    #[serde(default)]
    pub(super) mmio: Vec<Spanned<RawRange>>,
    #[serde(default)]
    pub(super) pio: Vec<Spanned<RawRange>>,
    /// IOAPIC lines the service's own devices raise (intercept, or a device service).
    #[serde(default)]
    pub(super) interrupts: Vec<Spanned<i64>>,
    /// The PCI device (bus 0, 1..=31) whose configuration space the service answers.
    #[serde(default)]
    pub(super) pci_device: Option<Spanned<i64>>,
    /// The guest memory a device service may reach: "shared-window" or "all".
    #[serde(default)]
    pub(super) guest_memory: Option<Spanned<String>>,
    /// A device service's doorbells (4-byte registers inside its own `mmio`), delivered as
    /// ioeventfd signals once the device arms them.
    #[serde(default)]
    pub(super) doorbells: Option<Spanned<RawRange>>,
    pub(super) limits: Spanned<RawLimits>,
    pub(super) restart: Spanned<RawRestart>,
    #[serde(default)]
    pub(super) syscalls: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) watchdog: Option<Spanned<String>>,
    /// Holds the calling end of the secure processor (the attest service only).
    #[serde(default)]
    pub(super) platform: Option<Spanned<bool>>,
    /// The uid and gid it runs as (default: derived from its name).
    #[serde(default)]
    pub(super) user: Option<Spanned<RawUser>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawUser {
    pub(super) uid: Spanned<i64>,
    /// Default: the uid.
    #[serde(default)]
    pub(super) gid: Option<Spanned<i64>>,
    /// Other services that say so too may share these ids.
    #[serde(default)]
    pub(super) shared: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawCall {
    pub(super) endpoint: Spanned<String>,
    #[serde(default)]
    pub(super) file_ids: Option<Spanned<Vec<Spanned<String>>>>,
    /// For calls to intercept: the IOAPIC lines the caller may ask it to raise.
    #[serde(default)]
    pub(super) interrupts: Option<Spanned<Vec<Spanned<i64>>>>,
    /// For calls to vtpm: what the caller may ask of the TPM ("commands", "platform").
    #[serde(default)]
    pub(super) tpm: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawListen {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    pub(super) address: Option<Spanned<String>>,
    /// A Unix socket, relative to the state directory.
    #[serde(default)]
    pub(super) path: Option<Spanned<String>>,
    /// The TPM localities its connections' commands may use (default: 0 only).
    #[serde(default)]
    pub(super) localities: Option<Spanned<Vec<Spanned<i64>>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawKey {
    pub(super) name: Spanned<String>,
    #[serde(default)]
    pub(super) path: Option<Spanned<String>>,
    /// Kept sealed in the guest-state file instead of a key file.
    #[serde(default)]
    pub(super) sealed: Option<Spanned<bool>>,
    #[serde(default)]
    pub(super) missing: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawFile {
    pub(super) name: Spanned<String>,
    pub(super) path: Spanned<String>,
    pub(super) access: Spanned<String>,
    #[serde(default)]
    pub(super) missing: Option<Spanned<String>>,
    /// For `missing = "create-vmgs"`: the key (of this service) the new file is encrypted with.
    #[serde(default)]
    pub(super) key: Option<Spanned<String>>,
    /// For `missing = "create-vmgs"`: the image size (default 4M).
    #[serde(default)]
    pub(super) size: Option<Spanned<String>>,
}

/// One TAP: only its name is the manifest's; which host interface it is, in which network
/// namespace, is the host's choice (host configuration, never measured).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawTap {
    pub(super) name: Spanned<String>,
}

/// `fd-store = { max = 16 }`: how many descriptors the microkernel keeps for the service.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawFdStore {
    pub(super) max: Spanned<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawRegion {
    pub(super) name: Spanned<String>,
    pub(super) size: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawRange {
    pub(super) base: Spanned<u64>,
    pub(super) size: Spanned<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawLimits {
    pub(super) memory: Spanned<String>,
    pub(super) open_files: Spanned<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub(super) struct RawRestart {
    pub(super) policy: Spanned<String>,
    pub(super) max: Spanned<i64>,
    pub(super) window: Spanned<String>,
    pub(super) backoff: Spanned<String>,
    #[serde(default)]
    pub(super) max_backoff: Option<Spanned<String>>,
}

/// The help line of a TOML error the schema refuses (an unknown key, a missing key, a wrong
/// shape).
pub(super) fn parse_help(message: &str) -> String {
    if message.contains("unknown field") {
        "remove the key or fix its spelling; the accepted keys are listed in the message".into()
    } else if message.contains("missing field `program`") {
        "add the key; every [[metal.task]] needs name and program".into()
    } else if message.contains("missing field") {
        "add the key; every service needs name, binary, limits and restart".into()
    } else {
        "see the shipped manifest.toml for the expected shape".into()
    }
}
