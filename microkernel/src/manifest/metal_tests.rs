//! `[[metal.task]]` as specifications: what a task inherits from its service, what a task of
//! its own states, and each rule of the metal pass, with the line its diagnostic points at.

use std::time::Duration;

use ipc_defs::services::vmgs::FileId;
use ipc_defs::services::vmgs::FileIdSet;

use super::*;

/// A store with a guest-state file (a RAM disk on metal) and hosted-only grants, and a
/// caller of it.
const SERVICES: &str = r#"
[[service]]
name = "store"
binary = "pv-vmgs"
serves = ["vmgs"]
files = [
  { name = "guest-state", path = "guest.vmgs", access = "read-write", missing = "create-vmgs", key = "datastore", size = "1M" },
  { name = "log", path = "store.log", access = "read-write", missing = "create" },
]
keys = [{ name = "datastore", path = "ds.key", missing = "create" }]
regions = [{ name = "journal", size = "5000" }]
pio = [{ base = 0x3f8, size = 8 }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }
syscalls = ["pwrite64", "fdatasync"]

[[service]]
name = "tpm"
binary = "pv-vtpm"
serves = ["vtpm"]
calls = [{ endpoint = "vmgs", file-ids = ["TPM_NVRAM", "TPM_PPI"] }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "on-failure", max = 3, window = "10s", backoff = "10ms" }
"#;

const METAL: &str = r#"
[[metal.task]]
name = "store"
program = "pv-vmgs-metal"
heap = "1M"

[[metal.task]]
name = "client"
program = "pv-metal-client"
args = "write then read"
stack = "10000"
calls = [{ endpoint = "vmgs", file-ids = ["ATTEST"] }]
regions = [{ name = "scratch", size = "8K" }]
restart = { policy = "on-failure", max = 2, window = "30s", backoff = "20ms", max-backoff = "2s" }
"#;

fn good() -> String {
    format!("{SERVICES}{METAL}")
}

fn parse(src: &str) -> Result<Manifest, Vec<Diagnostic>> {
    Manifest::parse(Path::new("m.toml"), src).map_err(|e| e.diagnostics().to_vec())
}

fn accepted(src: &str) -> Manifest {
    parse(src).unwrap_or_else(|d| panic!("refused: {d:#?}\n{src}"))
}

/// The 1-based line of the only occurrence of `needle` in `src`.
fn line_of(src: &str, needle: &str) -> usize {
    assert_eq!(src.matches(needle).count(), 1, "{needle:?} is not unique");
    line_col(src, src.find(needle).unwrap()).0
}

/// `src` is refused with a diagnostic that contains `needle`, at the line of `at`, with a
/// help line.
fn refused_at(src: &str, at: &str, needle: &str) {
    refused_on(src, line_of(src, at), needle);
}

/// `src` is refused with a diagnostic that contains `needle`, at `line`, with a help line.
fn refused_on(src: &str, line: usize, needle: &str) {
    let d = parse(src)
        .err()
        .unwrap_or_else(|| panic!("accepted:\n{src}"));
    assert!(
        d.iter()
            .any(|d| d.line == line && d.message.contains(needle) && !d.help.is_empty()),
        "no diagnostic at line {line} with {needle:?}: {d:#?}"
    );
}

fn task<'m>(m: &'m Manifest, name: &str) -> &'m MetalTask {
    m.metal.iter().find(|t| t.name == name).unwrap()
}

#[test]
fn a_task_named_like_a_service_is_that_service_on_metal() {
    let m = accepted(&good());
    let store = task(&m, "store");
    let service = m.service("store").unwrap();
    assert!(store.from_service);
    assert_eq!(store.program, "pv-vmgs-metal");
    assert_eq!(store.serves, vec![Interface::Vmgs]);
    assert_eq!(store.calls, service.calls);
    assert_eq!(store.restart, service.restart);
    assert_eq!(store.heap, 1 << 20);
    assert_eq!(store.stack, DEFAULT_TASK_STACK);
    // Its region, rounded up to pages; its guest-state file as a RAM disk of its size; the
    // file without a size is not.
    assert_eq!(
        store.regions,
        vec![RegionGrant {
            name: "journal".into(),
            size: 8192
        }]
    );
    assert_eq!(
        store.ram_disks,
        vec![RegionGrant {
            name: "guest-state".into(),
            size: 1 << 20
        }]
    );
    let left: Vec<(&str, &str)> = store
        .hosted_only
        .iter()
        .map(|h| (h.key, h.what.as_str()))
        .collect();
    assert_eq!(
        left,
        vec![
            ("files", "log"),
            ("keys", "datastore"),
            ("pio", "0x3f8+0x8"),
            ("syscalls", "pwrite64, fdatasync"),
        ]
    );
}

#[test]
fn a_task_of_its_own_states_its_grants_in_the_service_syntax() {
    let m = accepted(&good());
    let client = task(&m, "client");
    assert!(!client.from_service);
    assert_eq!(client.args, "write then read");
    assert_eq!(client.heap, DEFAULT_TASK_HEAP);
    assert_eq!(client.stack, 12288, "10000 bytes rounded up to pages");
    assert_eq!(client.calls, vec![Interface::Vmgs]);
    assert_eq!(
        client.grants.get(&Interface::Vmgs),
        Some(&Grant::VmgsFiles(FileIdSet::EMPTY.with(FileId::ATTEST)))
    );
    assert_eq!(client.regions[0].size, 8192);
    assert!(client.ram_disks.is_empty() && client.hosted_only.is_empty());
    assert_eq!(client.restart.policy, RestartPolicy::OnFailure);
    assert_eq!(client.restart.max_backoff, Duration::from_secs(2));
    // The tasks in the order written; a service that is not a task is not in the image.
    let names: Vec<&str> = m.metal.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["store", "client"]);
}

/// The hosted platform ignores `[metal]`: the measured configuration of the shipped manifest
/// is the same without it.
#[test]
fn the_hosted_measurement_does_not_see_metal_tasks() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest.toml")).unwrap();
    let with = accepted(&shipped);
    assert!(
        !with.metal.is_empty(),
        "the shipped manifest has metal tasks"
    );
    let cut = shipped.find("\n[[metal.task]]").unwrap();
    let without = accepted(&shipped[..cut]);
    assert!(without.metal.is_empty());
    assert_eq!(with.measured_bytes(), without.measured_bytes());
    assert_eq!(with.services, without.services);
}

#[test]
fn task_names_are_valid_unique_and_not_reserved() {
    let twice = format!("{}[[metal.task]]\nname = \"client\"\nprogram = \"pv-x\"\nrestart = {{ policy = \"never\", max = 0, window = \"1s\", backoff = \"1ms\" }}\n", good());
    let d = parse(&twice).unwrap_err();
    assert!(
        d.iter()
            .any(|d| d.message.contains("task \"client\" is defined twice")
                && d.line == twice.lines().count() - 2),
        "{d:#?}"
    );
    let bad = good().replace("name = \"client\"", "name = \"Client_1\"");
    refused_at(&bad, "name = \"Client_1\"", "not a valid name");
    let reserved = good().replace("name = \"client\"", "name = \"guest\"");
    refused_at(&reserved, "name = \"guest\"", "reserved");
}

#[test]
fn a_program_is_a_plain_bin_name() {
    for bad in ["", "../pv-x", "target/pv-x", "PV-X", "-x", &"x".repeat(65)] {
        let src = good().replace("\"pv-metal-client\"", &format!("\"{bad}\""));
        refused_at(
            &src,
            &format!("program = \"{bad}\""),
            "is not a program name",
        );
    }
    accepted(&good().replace("\"pv-metal-client\"", "\"pv_metal_2\""));
}

#[test]
fn every_call_is_served_by_a_metal_task() {
    // The service "tpm" calls vmgs: as a task, with no task serving vmgs, it may not.
    let src = format!("{SERVICES}\n[[metal.task]]\nname = \"tpm\"\nprogram = \"pv-x\"\n");
    refused_at(&src, "name = \"tpm\"\nprogram", "no metal task serves it");
    // A task of its own that calls what only a hosted service serves.
    let src = good().replace(
        "calls = [{ endpoint = \"vmgs\", file-ids = [\"ATTEST\"] }]",
        "calls = [{ endpoint = \"vtpm\" }]",
    );
    refused_at(&src, "endpoint = \"vtpm\"", "no metal task serves it");
    // An endpoint that does not exist.
    let src = good().replace(
        "endpoint = \"vmgs\", file-ids = [\"ATTEST\"]",
        "endpoint = \"vmgsx\"",
    );
    refused_at(&src, "endpoint = \"vmgsx\"", "unknown endpoint");
}

#[test]
fn an_endpoint_is_served_by_one_task() {
    let src = format!(
        "{}[[metal.task]]\nname = \"second-store\"\nprogram = \"pv-x\"\nserves = [\"vmgs\"]\nrestart = {{ policy = \"never\", max = 0, window = \"1s\", backoff = \"1ms\" }}\n",
        good()
    );
    refused_at(
        &src,
        "serves = [\"vmgs\"]\nrestart",
        "endpoint \"vmgs\" is served twice",
    );
    // Served by a service-backed task after a task of its own.
    let src = format!(
        "{}{}",
        own_task("early-store", "serves = [\"vmgs\"]\n"),
        good()
    );
    let store = line_of(&src, "[[metal.task]]\nname = \"store\"") + 1;
    refused_on(&src, store, "endpoint \"vmgs\" is served twice");
}

#[test]
fn a_service_task_states_no_grants_of_its_own() {
    for (key, value) in [
        ("serves", "[\"vtpm\"]"),
        ("calls", "[{ endpoint = \"vtpm\" }]"),
        ("regions", "[{ name = \"r\", size = \"4K\" }]"),
        (
            "restart",
            "{ policy = \"never\", max = 0, window = \"1s\", backoff = \"1ms\" }",
        ),
    ] {
        let src = good().replace("heap = \"1M\"", &format!("heap = \"1M\"\n{key} = {value}"));
        let line = line_of(&src, &format!("heap = \"1M\"\n{key}")) + 1;
        refused_on(&src, line, &format!("its `{key}` is the service's"));
    }
}

#[test]
fn a_task_of_its_own_needs_a_restart_policy_and_valid_grants() {
    let src = good().replace(
        "restart = { policy = \"on-failure\", max = 2, window = \"30s\", backoff = \"20ms\", max-backoff = \"2s\" }\n",
        "",
    );
    refused_at(&src, "name = \"client\"", "has no `restart`");
    let src = good().replace(
        "policy = \"on-failure\", max = 2",
        "policy = \"sometimes\", max = 2",
    );
    refused_at(
        &src,
        "\"sometimes\"",
        "restart policy \"sometimes\" is unknown",
    );
    let src = good().replace("file-ids = [\"ATTEST\"]", "file-ids = []");
    refused_at(&src, "file-ids = []", "file-ids is empty");
    let src = good().replace("size = \"8K\"", "size = \"0\"");
    refused_at(&src, "size = \"0\"", "region size");
}

#[test]
fn heap_and_stack_are_sizes_within_their_windows() {
    for (from, to, needle) in [
        (
            "heap = \"1M\"",
            "heap = \"1G\"",
            "task heap 1G is out of range",
        ),
        (
            "heap = \"1M\"",
            "heap = \"0\"",
            "task heap 0 is out of range",
        ),
        ("heap = \"1M\"", "heap = \"lots\"", "is not a size"),
        (
            "stack = \"10000\"",
            "stack = \"32M\"",
            "task stack 32M is out of range",
        ),
    ] {
        refused_at(&good().replace(from, to), to, needle);
    }
    // The largest of each is accepted.
    let m = accepted(
        &good()
            .replace("heap = \"1M\"", "heap = \"256M\"")
            .replace("stack = \"10000\"", "stack = \"16M\""),
    );
    assert_eq!(task(&m, "store").heap, MAX_TASK_HEAP);
    assert_eq!(task(&m, "client").stack, MAX_TASK_STACK);
}

#[test]
fn unknown_or_missing_keys_of_a_task_are_errors() {
    let src = good().replace("heap = \"1M\"", "heap = \"1M\"\nbinary = \"pv-vmgs\"");
    let line = line_of(&src, "heap = \"1M\"\nbinary") + 1;
    refused_on(&src, line, "unknown field `binary`");
    let src = good().replace("program = \"pv-vmgs-metal\"\n", "");
    let d = parse(&src).unwrap_err();
    assert!(
        d[0].message.contains("missing field `program`") && d[0].help.contains("[[metal.task]]"),
        "{d:#?}"
    );
    let src = good().replace(
        "[[metal.task]]\nname = \"store\"",
        "[metal]\nflavour = 1\n[[metal.task]]\nname = \"store\"",
    );
    refused_at(&src, "flavour", "unknown field `flavour`");
}

#[test]
fn an_empty_metal_table_is_an_error() {
    let src = format!("{SERVICES}\n[metal]\n");
    refused_at(&src, "[metal]", "[metal] describes no task");
}

#[test]
fn each_vmgs_file_id_is_granted_to_one_task() {
    let src = format!(
        "{}[[metal.task]]\nname = \"tpm\"\nprogram = \"pv-x\"\n",
        good().replace("file-ids = [\"ATTEST\"]", "file-ids = [\"TPM_PPI\"]")
    );
    refused_at(
        &src,
        "name = \"tpm\"\nprogram",
        "file id TPM_PPI (2) is granted to both metal tasks",
    );
    // The same id held by a hosted service that is not a task is no clash on metal.
    accepted(&good().replace("file-ids = [\"ATTEST\"]", "file-ids = [\"TPM_NVRAM\"]"));
}

#[test]
fn args_fit_the_boot_record() {
    let long = "x".repeat(MAX_TASK_ARGS + 1);
    let src = good().replace("args = \"write then read\"", &format!("args = \"{long}\""));
    refused_at(
        &src,
        "args = ",
        "args of task \"client\" are 1025 bytes long",
    );
    accepted(&good().replace(
        "args = \"write then read\"",
        &format!("args = \"{}\"", &long[1..]),
    ));
}

/// A task beyond the contract's bounds.
fn own_task(name: &str, extra: &str) -> String {
    format!("[[metal.task]]\nname = \"{name}\"\nprogram = \"pv-x\"\n{extra}restart = {{ policy = \"never\", max = 0, window = \"1s\", backoff = \"1ms\" }}\n")
}

#[test]
fn the_image_holds_at_most_its_bounds() {
    // 17 tasks.
    let mut src = good();
    for i in 0..14 {
        src.push_str(&own_task(&format!("idle-{i}"), ""));
    }
    accepted(&src);
    src.push_str(&own_task("one-too-many", ""));
    refused_at(
        &src,
        "[[metal.task]]\nname = \"store\"",
        "[metal] describes 17 tasks",
    );
    // 17 regions: the store's two, the client's one and 14 more.
    let regions = |n: usize| {
        let r: Vec<String> = (0..n)
            .map(|i| format!("{{ name = \"r{i}\", size = \"4K\" }}"))
            .collect();
        format!("regions = [{}]\n", r.join(", "))
    };
    accepted(&format!("{}{}", good(), own_task("hoarder", &regions(13))));
    let src = format!("{}{}", good(), own_task("hoarder", &regions(14)));
    refused_at(
        &src,
        "[[metal.task]]\nname = \"store\"",
        "the metal tasks hold 17 regions and RAM disks",
    );
    // 17 slots on one task: 7 channels served, 10 regions.
    let mut src = format!(
        "{}{}",
        good(),
        own_task("hub", &format!("serves = [\"attest\"]\n{}", regions(10)))
    );
    for i in 0..7 {
        src.push_str(&own_task(
            &format!("caller-{i}"),
            "calls = [{ endpoint = \"attest\" }]\n",
        ));
    }
    refused_at(&src, "name = \"hub\"", "task \"hub\" would hold 17 slots");
    // Channels and regions that do not fit the slot window.
    let src = good().replace("size = \"8K\"", "size = \"600M\"");
    refused_at(&src, "name = \"client\"", "its channels and regions need");
}

#[test]
fn the_shipped_manifest_has_a_store_on_a_ram_disk_and_its_client() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest.toml")).unwrap();
    let m = accepted(&shipped);
    let vmgs = task(&m, "vmgs");
    assert!(vmgs.from_service);
    assert_eq!(vmgs.ram_disks.len(), 1);
    let keys: Vec<&str> = vmgs.hosted_only.iter().map(|h| h.key).collect();
    assert_eq!(keys, ["keys", "syscalls"]);
    let client = task(&m, "metal-client");
    assert_eq!(client.calls, vec![Interface::Vmgs, Interface::Echo]);
    assert_eq!(task(&m, "echo").serves, vec![Interface::Echo]);
}
