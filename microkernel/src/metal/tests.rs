//! The task table's layout as specifications: task, channel, region and image order; slot
//! order and addresses; the server's grant; the bounds; the encoded table as the kernel
//! decodes it.

use std::path::Path;

use ipc_defs::capability::Grant as ChannelGrant;
use ipc_defs::layout::ChannelLayout;
use ipc_defs::metal::Grant;
use ipc_defs::metal::RestartPolicy;
use ipc_defs::metal::TaskBoot;
use ipc_defs::metal::TaskTable;
use ipc_defs::metal::PAGE;
use ipc_defs::metal::SLOT_BASE;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::services::vmgs::FileIdSet;
use ipc_defs::services::vtpm::Localities;
use ipc_defs::Interface;

use super::*;
use crate::manifest::Manifest;

fn manifest(src: &str) -> Manifest {
    Manifest::parse(Path::new("m.toml"), src).unwrap_or_else(|e| panic!("{e}"))
}

fn plan(src: &str) -> MetalPlan {
    let m = manifest(src);
    MetalPlan::new(&m.metal, m.ring_capacity).unwrap()
}

const RESTART: &str =
    "restart = { policy = \"always\", max = 4, window = \"1m\", backoff = \"50ms\" }";

/// A store served to two clients; the second client also holds a region, and shares its
/// program with the first; a TPM task takes commands.
fn src() -> String {
    format!(
        r#"
[paravisor]
ring-capacity = "32K"

[[metal.task]]
name = "first"
program = "pv-client"
calls = [{{ endpoint = "vmgs", file-ids = ["TPM_NVRAM"] }}, {{ endpoint = "vtpm", tpm = ["commands"] }}]
{RESTART}

[[metal.task]]
name = "store"
program = "pv-store"
serves = ["vmgs"]
regions = [{{ name = "disk", size = "1M" }}, {{ name = "journal", size = "5000" }}]
heap = "1M"
{RESTART}

[[metal.task]]
name = "second"
program = "pv-client"
args = "again"
calls = [{{ endpoint = "vmgs", file-ids = ["ATTEST", "TPM_PPI"] }}]
regions = [{{ name = "scratch", size = "4K" }}]
{RESTART}

[[metal.task]]
name = "tpm"
program = "pv-tpm"
serves = ["vtpm"]
{RESTART}

[[service]]
name = "unrelated"
binary = "pv-x"
serves = ["net"]
limits = {{ memory = "64M", open-files = 32 }}
{RESTART}
"#
    )
}

fn channel_bytes(capacity: u32) -> u64 {
    ipc_defs::metal::round_up(ChannelLayout::new(capacity).unwrap().region_size() as u64)
}

#[test]
fn tasks_images_channels_and_regions_are_in_manifest_order() {
    let p = plan(&src());
    let names: Vec<&str> = p.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["first", "store", "second", "tpm"]);
    // One image per distinct program, in order of first use.
    assert_eq!(p.programs, ["pv-client", "pv-store", "pv-tpm"]);
    let images: Vec<u16> = p.tasks.iter().map(|t| t.image).collect();
    assert_eq!(images, [0, 1, 0, 2]);
    // One channel per call: each client in task order, its calls in order.
    let ends: Vec<(Interface, u16, u16)> = p
        .channels
        .iter()
        .map(|c| (c.interface, c.client, c.server))
        .collect();
    assert_eq!(
        ends,
        [
            (Interface::Vmgs, 0, 1),
            (Interface::Vtpm, 0, 3),
            (Interface::Vmgs, 2, 1)
        ]
    );
    assert!(p.channels.iter().all(|c| c.ring_capacity == 32 << 10));
    let regions: Vec<(&str, u64, u16)> = p
        .regions
        .iter()
        .map(|r| (r.name.as_str(), r.size, r.holder))
        .collect();
    assert_eq!(
        regions,
        [
            ("disk", 1 << 20, 1),
            ("journal", 8192, 1),
            ("scratch", 4096, 2)
        ]
    );
}

#[test]
fn the_server_holds_each_clients_grant_as_the_hosted_platform_computes_it() {
    let p = plan(&src());
    assert_eq!(
        p.channels[0].grant,
        ChannelGrant::VmgsFiles(FileIdSet::EMPTY.with(FileId::TPM_NVRAM))
    );
    assert_eq!(
        p.channels[2].grant,
        ChannelGrant::VmgsFiles(FileIdSet::EMPTY.with(FileId::ATTEST).with(FileId::TPM_PPI))
    );
    // TPM commands at locality 0 only: a metal task holds no listener.
    match p.channels[1].grant {
        ChannelGrant::Vtpm(g) => {
            assert_eq!(g.commands, Localities::ZERO);
            assert!(!g.platform);
        }
        other => panic!("{other:?}"),
    }
    // The same as the hosted plan's for a client without listeners.
    let m = manifest(&src());
    assert_eq!(
        crate::plan::channel_grant(&m.metal[0].grants, &[], Interface::Vtpm),
        p.channels[1].grant
    );
}

#[test]
fn slots_are_served_then_called_channels_then_regions_with_a_guard_page_between() {
    let p = plan(&src());
    let ch = channel_bytes(32 << 10);
    let store = &p.tasks[1];
    let laid: Vec<(Grant, u64, u64)> = store
        .slots
        .iter()
        .map(|s| (s.grant, s.address, s.size))
        .collect();
    let second = SLOT_BASE + ch + PAGE;
    let disk = second + ch + PAGE;
    assert_eq!(
        laid,
        [
            (Grant::Server { channel: 0 }, SLOT_BASE, ch),
            (Grant::Server { channel: 2 }, second, ch),
            (Grant::Region { region: 0 }, disk, 1 << 20),
            (Grant::Region { region: 1 }, disk + (1 << 20) + PAGE, 8192),
        ]
    );
    let second = &p.tasks[2];
    assert_eq!(second.slots[0].grant, Grant::Client { channel: 2 });
    assert_eq!(second.slots[0].address, SLOT_BASE);
    assert_eq!(second.slots[1].grant, Grant::Region { region: 2 });
    assert_eq!(second.slots[1].address, SLOT_BASE + ch + PAGE);
    assert!(p.tasks[3].slots.len() == 1 && p.tasks[0].slots.len() == 2);
}

#[test]
fn heap_stack_args_and_restart_are_the_manifests() {
    let p = plan(&src());
    let store = &p.tasks[1];
    assert_eq!((store.heap, store.stack), (1 << 20, 64 << 10));
    assert_eq!(p.tasks[2].args, "again");
    let r = store.restart;
    assert_eq!(r.policy, RestartPolicy::Always);
    assert_eq!(
        (r.max, r.window_ms, r.backoff_ms, r.max_backoff_ms),
        (4, 60_000, 50, 1000)
    );
}

#[test]
fn the_encoded_table_is_what_the_kernel_decodes() {
    let p = plan(&src());
    let images: Vec<Vec<u8>> = (0..3).map(|i| vec![i as u8; 100 + i]).collect();
    let slices: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    let bytes = p.encode(&slices).unwrap();
    let table = TaskTable::decode(&bytes).unwrap();
    assert_eq!(table, p.table(&slices).unwrap());
    assert_eq!(table.images[2], &images[2][..]);
    assert_eq!(table.tasks[3].name, "tpm");
    // One image too few is refused, not laid out.
    assert_eq!(
        p.encode(&slices[..2]),
        Err(PlanError::Images {
            expected: 3,
            got: 2
        })
    );
}

#[test]
fn each_boot_record_fits_its_page_and_names_the_peers() {
    let p = plan(&src());
    let record = p.boot_record(1).unwrap();
    let boot = TaskBoot::decode(&record).unwrap();
    assert_eq!(boot.name, "store");
    let names: Vec<&str> = boot.slots.iter().map(|s| s.name).collect();
    assert_eq!(names, ["first", "second", "disk", "journal"]);
    // Args the manifest would refuse as too long, laid out anyway: the record is refused.
    let m = manifest(&src());
    let mut tasks = m.metal.clone();
    tasks[1].args = "x".repeat(PAGE as usize);
    assert_eq!(
        MetalPlan::new(&tasks, m.ring_capacity),
        Err(PlanError::BootRecord {
            task: 1,
            name: "store".into()
        })
    );
}

#[test]
fn what_does_not_fit_the_contract_is_refused() {
    let m = manifest(&src());
    // Slots past the slot window: a region as large as the window.
    let mut tasks = m.metal.clone();
    tasks[2].regions[0].size = 512 << 20;
    match MetalPlan::new(&tasks, m.ring_capacity) {
        Err(PlanError::SlotsDoNotFit { task: 2, .. }) => {}
        other => panic!("{other:?}"),
    }
    // A call nobody serves (the validator refuses it first).
    let mut tasks = m.metal.clone();
    tasks[3].serves.clear();
    assert!(matches!(
        MetalPlan::new(&tasks, m.ring_capacity),
        Err(PlanError::Unserved { task: 0, .. })
    ));
    // More tasks than an image holds.
    let many = vec![m.metal[3].clone(); ipc_defs::metal::MAX_TASKS + 1];
    assert_eq!(
        MetalPlan::new(&many, m.ring_capacity),
        Err(PlanError::TooManyTasks { count: 17 })
    );
    // A ring capacity the layout refuses.
    assert_eq!(
        MetalPlan::new(&m.metal, 1000),
        Err(PlanError::RingCapacity(1000))
    );
}
