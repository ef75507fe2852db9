//! `pv-storage`: the guest's disks, served to vhost-user front ends (QEMU's
//! `vhost-user-blk-pci` and `vhost-user-scsi-pci`, or any other).
//!
//! Capabilities expected (from the bootstrap record): its control channel; one listener per
//! `--device` (Unix sockets the microkernel bound, only those the host asked for with
//! `paravisor run --listen`); one image file per `--device` (`files` grants); for encrypted
//! disks, a vmgs channel granting PV_STORAGE_KEYS. Nothing else: it cannot open a file, create
//! a socket or reach the TPM.
//!
//! One thread, one poll loop over the listeners, the front ends' sockets and the rings' kick
//! eventfds, and the control channel between two waits. A front end that disconnects (QEMU
//! stopping, or reconnecting) is dropped with everything it set up; the disk stays open. No
//! front end can stop the loop: its messages reach the handler only whole, with room for the
//! reply, and one that leaves a message incomplete or its replies unread is dropped
//! (`pv_vhost_user::front_end`).
//! Killed and restarted, the service takes the next connection on the same listener (the
//! microkernel keeps it) and the front end hands back its in-flight record: the requests the
//! killed process had taken but not answered are answered then.
#![forbid(unsafe_code)]

use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::time::Duration;

use ipc_defs::hosted::runtime;
use ipc_defs::hosted::sys;
use ipc_defs::hosted::vmgs_client::VmgsCallError;
use ipc_defs::hosted::vmgs_client::VmgsClient;
use ipc_defs::services::storage;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::services::vmgs::VmgsError;
use ipc_defs::Interface;
use pv_devices::scsi::ScsiDisk;
use pv_devices::virtio::blk::VirtioBlk;
use pv_devices::virtio::scsi::VirtioScsi;
use pv_storage::disks;
use pv_storage::disks::DeviceSpec;
use pv_storage::disks::KeyStore;
use pv_storage::disks::KeyTable;
use pv_storage::disks::Model;
use pv_storage::partition::PciNvme;
use pv_storage::vhost::Device;
use pv_storage::vhost::BLK_QUEUES;
use pv_vhost_user::front_end::serve_once;
use pv_vhost_user::front_end::Export;

/// How long the loop waits before it looks at the control channel again (the supervisor
/// pings every second and gives the answer 100 ms).
const POLL: Duration = Duration::from_millis(20);
/// With the partition's device too: how long its ring is waited on before the sockets are
/// looked at again while a vhost-user front end is connected.
const PARTITION_SLICE: Duration = Duration::from_millis(1);

/// Disk keys in VMGS.
struct VmgsKeys(VmgsClient);

impl KeyStore for VmgsKeys {
    fn load(&mut self) -> Result<KeyTable, String> {
        match self.0.read(FileId::PV_STORAGE_KEYS) {
            Ok(bytes) => KeyTable::decode(&bytes),
            Err(VmgsCallError::Vmgs(VmgsError::NotFound(_))) => Ok(KeyTable::default()),
            Err(e) => Err(format!("reading the disk keys: {e}")),
        }
    }

    fn store(&mut self, table: &KeyTable) -> Result<(), String> {
        self.0
            .write(FileId::PV_STORAGE_KEYS, &table.encode())
            .map_err(|e| format!("storing the disk keys: {e}"))
    }
}

fn main() -> ExitCode {
    let mut started = match runtime::enter() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("storage: cannot start: {e}");
            return ExitCode::from(2);
        }
    };
    // Disk keys live in VMGS; the channel is needed only while the disks open.
    let mut keys = started
        .context
        .clients
        .remove(&Interface::Vmgs)
        .map(|end| VmgsKeys(VmgsClient::new(end)));
    let mut exports = match setup(&mut started.context, &mut keys) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut partition = match partition_device(&mut started, &mut keys) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    drop(keys);
    tracing::info!(devices = exports.len(), "disks ready");
    let mut more = false;
    loop {
        if !started.answer_control() {
            tracing::info!("shut down on request");
            return ExitCode::SUCCESS;
        }
        // Pings (and nothing else: the interface has no requests) from the services that call
        // storage.
        started
            .answer_served::<storage::Request, storage::Response>(|_, _, request| match request {});
        // One thread: a vCPU waiting for the partition's device is answered within a wake-up
        // of its request (the wait is on its ring); the sockets and kicks are looked at in
        // between, at once while a front end is connected (a kick then waits at most
        // PARTITION_SLICE), else every POLL.
        let socket_wait = match partition.as_mut() {
            Some(p) => {
                let connected = exports.iter().any(|e| e.front_end.is_some());
                let slice = if more || connected {
                    PARTITION_SLICE
                } else {
                    POLL
                };
                p.serve(if more { Duration::ZERO } else { slice });
                Duration::ZERO
            }
            None if more => Duration::ZERO,
            None => POLL,
        };
        more = match serve_once(&mut exports, socket_wait) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!("{e}");
                return ExitCode::FAILURE;
            }
        };
    }
}

/// Opens every device the arguments name whose listener the host asked for.
fn setup(
    context: &mut runtime::Context,
    keys: &mut Option<VmgsKeys>,
) -> Result<Vec<Export<Device>>, String> {
    let specs = DeviceSpec::from_args(std::env::args().skip(1))?;
    let mut exports = Vec::new();
    for spec in specs.into_iter().filter(|s| s.model != Model::Nvme) {
        let Some(listener) = context.listeners.remove(&spec.listen) else {
            tracing::info!(listener = %spec.listen, "not serving this device: the host did not ask for its listener (paravisor run --listen)");
            continue;
        };
        let file = context.files.remove(&spec.file).ok_or_else(|| {
            format!(
                "device on \"{}\": the manifest grants no file \"{}\"",
                spec.listen, spec.file
            )
        })?;
        let disk = disks::open(
            &spec,
            std::fs::File::from(file),
            keys.as_mut().map(|k| k as &mut dyn KeyStore),
        )?;
        let device = match spec.model {
            Model::Blk => {
                let mut blk = VirtioBlk::new(disk, &spec.file);
                blk.set_queues(BLK_QUEUES);
                Device::Blk(blk)
            }
            Model::Scsi => Device::Scsi(VirtioScsi::new(ScsiDisk::new(disk, &spec.file))),
            Model::Nvme => unreachable!("filtered out above"),
        };
        tracing::info!(listener = %spec.listen, image = %spec.file, encrypted = spec.encrypted, model = ?spec.model, "serving");
        exports.push(Export::new(
            &spec.listen,
            UnixListener::from(listener),
            device,
        ));
    }
    Ok(exports)
}

/// The partition's NVMe function, ready to run on its thread.
struct PartitionDevice {
    link: runtime::GuestLink,
    nvme: PciNvme<ipc_defs::hosted::SharedMemory>,
    /// The doorbell eventfd (a `doorbells` grant): the partition signals it after each access
    /// it sends, and KVM for each armed doorbell write. Without it, the wait is on the ring.
    doorbells: Option<std::fs::File>,
}

/// Where the NVMe function keeps its checkpoint (a `regions` grant).
const CHECKPOINT_REGION: &str = "nvme-checkpoint";

impl PartitionDevice {
    /// Answers the partition's accesses and runs what rang doorbells, waiting up to `wait`
    /// for either.
    fn serve(&mut self, wait: Duration) {
        let nvme = &mut self.nvme;
        match self.doorbells.as_mut() {
            Some(doorbells) => {
                let signalled = sys::poll_readable(&[doorbells.as_fd()], wait)
                    .is_ok_and(|ready| ready.first() == Some(&true));
                if signalled {
                    // Drained before the ring is looked at: a signal after this look stays.
                    let mut count = [0u8; 8];
                    let _ = std::io::Read::read(doorbells, &mut count);
                }
                self.link
                    .serve(Duration::ZERO, |access| nvme.access(access));
                nvme.kick();
            }
            None => {
                self.link.serve(wait, |access| nvme.access(access));
            }
        }
        for e in self.nvme.take_errors() {
            tracing::warn!(device = "nvme", "{e}");
        }
    }
}

/// The `nvme` device of the arguments, when there is a guest partition to serve it to.
fn partition_device(
    started: &mut runtime::Started,
    keys: &mut Option<VmgsKeys>,
) -> Result<Option<PartitionDevice>, String> {
    let specs = DeviceSpec::from_args(std::env::args().skip(1))?;
    let Some(spec) = specs.into_iter().find(|s| s.model == Model::Nvme) else {
        return Ok(None);
    };
    let Some(link) = started.take_guest_link() else {
        tracing::info!("no guest partition: the NVMe function is not served");
        return Ok(None);
    };
    let context = &mut started.context;
    let grants =
        pv_vhost_user::function::take_grants(context, "the NVMe function", CHECKPOINT_REGION)?;
    let file = context.files.remove(&spec.file).ok_or_else(|| {
        format!(
            "the NVMe function: the manifest grants no file \"{}\"",
            spec.file
        )
    })?;
    let disk = disks::open(
        &spec,
        std::fs::File::from(file),
        keys.as_mut().map(|k| k as &mut dyn KeyStore),
    )?;
    let bar = spec.bar.ok_or("the NVMe function needs bar=ADDR")?;
    let doorbells = grants.doorbells;
    let nvme = PciNvme::new(
        disk,
        &spec.file,
        bar,
        grants.memory,
        grants.irq,
        grants.checkpoint,
        doorbells.is_some(),
    )?;
    tracing::info!(
        image = %spec.file,
        bar = format_args!("{bar:#x}"),
        doorbells = doorbells.is_some(),
        "NVMe function ready"
    );
    Ok(Some(PartitionDevice {
        link,
        nvme,
        doorbells,
    }))
}
