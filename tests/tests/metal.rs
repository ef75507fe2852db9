//! The metal image from the host's side: `[[metal.task]]` refused by `paravisor check` with
//! the line and what would be right; `paravisor metal build` of the shipped manifest, and its
//! clear failures (no tasks, a program the task package lacks, no cargo, a failed build);
//! `paravisor audit --metal` of the built image equal to what the manifest grants, the
//! expectation read from the manifest here with the toml crate (not with the builder's code);
//! `paravisor metal log`; and, with QEMU, the image's first log lines.
//!
//! The image is built once per test binary (the first test that needs it builds it; a cold
//! build takes a minute or two on two cores).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use common::edited;
use common::pv;
use common::scratch_dir;
use common::set;
use common::text;
use ipc_defs::layout::ChannelLayout;
use ipc_defs::services::vmgs::FileId;
use sha2::Digest;
use toml::Value;

fn shipped() -> String {
    std::fs::read_to_string(common::shipped_manifest()).unwrap()
}

/// The 1-based line of the only occurrence of `needle` in `text`.
fn line_of(text: &str, needle: &str) -> usize {
    assert_eq!(text.matches(needle).count(), 1, "{needle:?} is not unique");
    text[..text.find(needle).unwrap()].matches('\n').count() + 1
}

/// `paravisor ARGS` with `manifest` written to a scratch `m.toml` in place of `{}`: exit 1,
/// a message with `needle` at the line of `at` (the first line of it) and a help line.
fn refused(args: &[&str], manifest: &str, at: &str, needle: &str) {
    let dir = scratch_dir("metal-bad");
    let path = dir.join("m.toml");
    std::fs::write(&path, manifest).unwrap();
    let path = path.to_str().unwrap();
    let args: Vec<&str> = args
        .iter()
        .map(|a| if *a == "{}" { path } else { a })
        .collect();
    let out = pv(&args);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}:\n{msg}\n{manifest}");
    assert!(msg.contains(needle), "{args:?}: no {needle:?} in:\n{msg}");
    let place = format!("m.toml:{}:", line_of(manifest, at));
    assert!(msg.contains(&place), "{args:?}: not at {place}:\n{msg}");
    assert!(msg.contains("help:"), "{args:?}: no help:\n{msg}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_refuses_bad_metal_tasks_at_their_line() {
    let check = ["check", "{}"];
    // A program that is a path, not a bin name.
    let m = edited(&shipped(), |d| {
        set(d, "metal.task.echo.program", "\"../pv-echo\"")
    });
    refused(&check, &m, "\"../pv-echo\"", "is not a program name");
    // Two tasks of one name.
    let m = edited(&shipped(), |d| set(d, "metal.task.echo.name", "\"vmgs\""));
    let second = m.rfind("name = \"vmgs\"").unwrap();
    let line = m[..second].matches('\n').count() + 1;
    let dir = scratch_dir("metal-twice");
    std::fs::write(dir.join("m.toml"), &m).unwrap();
    let out = pv(&["check", dir.join("m.toml").to_str().unwrap()]);
    assert!(
        text(&out).contains(&format!("m.toml:{line}:"))
            && text(&out).contains("task \"vmgs\" is defined twice"),
        "{}",
        text(&out)
    );
    // An endpoint that does not exist, and one that no metal task serves (vtpm is served by
    // a hosted service only).
    let m = edited(&shipped(), |d| {
        set(d, "metal.task.metal-client.calls.1.endpoint", "\"echoes\"")
    });
    refused(&check, &m, "\"echoes\"", "unknown endpoint \"echoes\"");
    let m = edited(&shipped(), |d| {
        set(d, "metal.task.metal-client.calls.1.endpoint", "\"vtpm\"")
    });
    refused(
        &check,
        &m,
        "endpoint = \"vtpm\" }]\nrestart",
        "no metal task serves it",
    );
    // Beyond the bounds: a heap larger than its window.
    let m = edited(&shipped(), |d| set(d, "metal.task.vmgs.heap", "\"1G\""));
    refused(&check, &m, "heap = \"1G\"", "task heap 1G is out of range");
    // A service-backed task that states a grant of its own.
    let m = edited(&shipped(), |d| {
        common::add(d, "metal.task.vmgs.serves", "[\"echo\", \"net\"]")
    });
    refused(
        &check,
        &m,
        "serves = [\"echo\", \"net\"]",
        "is the service's",
    );
    // A key the schema does not know.
    let m = edited(&shipped(), |d| {
        common::add(d, "metal.task.echo.priority", "3")
    });
    refused(&check, &m, "priority = 3", "unknown field `priority`");
}

#[test]
fn metal_build_refuses_what_it_cannot_build() {
    let build = ["metal", "build", "--manifest", "{}"];
    // A valid name the task package has no program of.
    let m = edited(&shipped(), |d| {
        set(d, "metal.task.echo.program", "\"pv-no-such-task\"")
    });
    refused(
        &build,
        &m,
        "\"pv-no-such-task\"",
        "is not a program of pv-metal-tasks",
    );
    // A manifest without tasks.
    let cut = shipped().find("\n[[metal.task]]").unwrap();
    let dir = scratch_dir("metal-none");
    let path = dir.join("m.toml");
    std::fs::write(&path, &shipped()[..cut]).unwrap();
    let out = pv(&["metal", "build", "--manifest", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("has no [[metal.task]]"),
        "{}",
        text(&out)
    );
}

/// Two tasks whose programs the task package has, beside one hosted service.
const ECHO_ONLY: &str = r#"
[[service]]
name = "store"
binary = "pv-vmgs"
serves = ["vmgs"]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }

[[metal.task]]
name = "echo"
program = "pv-echo-metal"
serves = ["echo"]
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }

[[metal.task]]
name = "client"
program = "pv-metal-client"
calls = [{ endpoint = "echo" }]
restart = { policy = "never", max = 0, window = "10s", backoff = "10ms" }
"#;

/// `metal build` of [`ECHO_ONLY`] with `PATH` set to `path` only.
fn build_with_path(path: &Path) -> std::process::Output {
    let dir = scratch_dir("metal-path");
    std::fs::write(dir.join("m.toml"), ECHO_ONLY).unwrap();
    Command::new(common::paravisor())
        .args(["metal", "build", "--manifest"])
        .arg(dir.join("m.toml"))
        .arg("--out")
        .arg(dir.join("never.elf"))
        .env("PATH", path)
        .output()
        .unwrap()
}

#[test]
fn metal_build_says_when_cargo_is_missing_or_fails() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir("metal-cargo");
    let out = build_with_path(&dir);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("cannot run cargo"), "{}", text(&out));
    // A cargo that fails: its output is shown.
    let fake = dir.join("cargo");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'error: could not compile `pv-fake` (bin \"x\")' >&2\nexit 101\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = build_with_path(&dir);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(
        msg.contains("building the task programs failed")
            && msg.contains("could not compile `pv-fake`"),
        "{msg}"
    );
}

/// The shipped manifest's image, built once: its path and what `metal build` printed.
fn built() -> &'static (PathBuf, String) {
    static BUILT: OnceLock<(PathBuf, String)> = OnceLock::new();
    BUILT.get_or_init(|| {
        let dir = scratch_dir("metal-image");
        let image = dir.join("pv-metal.elf");
        let out = Command::new(common::paravisor())
            .args(["metal", "build", "--manifest"])
            .arg(common::shipped_manifest())
            .arg("--out")
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success(), "metal build:\n{}", text(&out));
        (image, text(&out))
    })
}

#[test]
fn the_shipped_manifest_builds_and_says_what_it_left_out() {
    let (image, said) = built();
    assert!(image.is_file());
    assert!(image.with_extension("tasks").is_file());
    for task in ["vmgs", "echo", "metal-client"] {
        assert!(said.contains(&format!("  {task}: ")), "{said}");
    }
    assert!(
        said.contains("left out of vmgs (hosted platform only): keys (datastore), syscalls (pwrite64, fdatasync, fsync)"),
        "{said}"
    );
    assert!(said.contains("region guest-state (4M)"), "{said}");
}

// ---- What the manifest grants, read here on its own ----

fn size(text: &str) -> u64 {
    let t = text.trim();
    let (digits, shift) = match t.chars().last().unwrap() {
        'K' => (&t[..t.len() - 1], 10),
        'M' => (&t[..t.len() - 1], 20),
        'G' => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    digits.parse::<u64>().unwrap() << shift
}

fn pages(bytes: u64) -> u64 {
    bytes.div_ceil(4096) * 4096
}

fn millis(text: &str) -> u64 {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap();
    let n: u64 = text[..split].parse().unwrap();
    n * match &text[split..] {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        other => panic!("unit {other}"),
    }
}

fn strs(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// A call: its endpoint and the VMGS file ids it grants (ascending numbers), if any.
type Call = (String, Option<Vec<u64>>);

/// One task as the manifest states it.
struct Stated {
    name: String,
    program: String,
    heap: u64,
    stack: u64,
    serves: Vec<String>,
    calls: Vec<Call>,
    regions: Vec<(String, u64)>,
    restart: serde_json::Value,
}

/// The `[[metal.task]]` of `text`, each with its service's grants when it names one
/// (manifest.toml's header says what a task inherits and what the defaults are).
fn stated(text: &str) -> (Vec<Stated>, u32) {
    let doc: Value = toml::from_str(text).unwrap();
    let services: BTreeMap<String, &Value> = doc["service"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap().to_string(), s))
        .collect();
    let ring = doc
        .get("paravisor")
        .and_then(|p| p.get("ring-capacity"))
        .map_or(64 << 10, |r| size(r.as_str().unwrap()) as u32);
    let tasks = doc["metal"]["task"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let name = t["name"].as_str().unwrap().to_string();
            let from = services.get(&name).copied().unwrap_or(t);
            let calls = from
                .get("calls")
                .and_then(Value::as_array)
                .map(|calls| {
                    calls
                        .iter()
                        .map(|c| {
                            let ids = c.get("file-ids").map(|ids| {
                                let mut n: Vec<u64> = strs(Some(ids))
                                    .iter()
                                    .map(|i| FileId::parse(i).unwrap().index() as u64)
                                    .collect();
                                n.sort();
                                n
                            });
                            (c["endpoint"].as_str().unwrap().to_string(), ids)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let mut regions: Vec<(String, u64)> = from
                .get("regions")
                .and_then(Value::as_array)
                .map(|r| {
                    r.iter()
                        .map(|r| {
                            let size = size(r["size"].as_str().unwrap());
                            (r["name"].as_str().unwrap().to_string(), pages(size))
                        })
                        .collect()
                })
                .unwrap_or_default();
            // A service's files with a size (guest-state files, 4M unless said) are RAM
            // disks.
            if from.get("binary").is_some() {
                for f in from
                    .get("files")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if f.get("missing").and_then(Value::as_str) == Some("create-vmgs") {
                        let size = f.get("size").map_or(4 << 20, |s| size(s.as_str().unwrap()));
                        regions.push((f["name"].as_str().unwrap().to_string(), pages(size)));
                    }
                }
            }
            let r = &from["restart"];
            let backoff = millis(r["backoff"].as_str().unwrap());
            let max_backoff = r
                .get("max-backoff")
                .map_or(backoff.max(1000), |m| millis(m.as_str().unwrap()));
            let restart = serde_json::json!({
                "policy": r["policy"].as_str().unwrap(),
                "max": r["max"].as_integer().unwrap(),
                "window_ms": millis(r["window"].as_str().unwrap()),
                "backoff_ms": backoff,
                "max_backoff_ms": max_backoff,
            });
            let task_size = |key: &str, default: u64| {
                t.get(key)
                    .map_or(default, |v| pages(size(v.as_str().unwrap())))
            };
            Stated {
                program: t["program"].as_str().unwrap().to_string(),
                heap: task_size("heap", 256 << 10),
                stack: task_size("stack", 64 << 10),
                serves: strs(from.get("serves")),
                calls,
                regions,
                restart,
                name,
            }
        })
        .collect();
    (tasks, ring)
}

/// What each slot of `tasks[i]` must be: the channels it serves (each caller in task order,
/// its calls in order), the channels it calls, its regions; each at the next page after the
/// previous slot and a guard page.
fn expected_slots(tasks: &[Stated], i: usize, channel: u64) -> Vec<serde_json::Value> {
    let server_of = |endpoint: &str| {
        tasks
            .iter()
            .find(|t| t.serves.iter().any(|s| s == endpoint))
            .unwrap_or_else(|| panic!("no task serves {endpoint}"))
    };
    let mut slots = Vec::new();
    for caller in tasks {
        for (endpoint, ids) in &caller.calls {
            if server_of(endpoint).name == tasks[i].name {
                slots.push((
                    "server",
                    endpoint.clone(),
                    caller.name.clone(),
                    ids.clone(),
                    channel,
                ));
            }
        }
    }
    for (endpoint, ids) in &tasks[i].calls {
        slots.push((
            "client",
            endpoint.clone(),
            server_of(endpoint).name.clone(),
            ids.clone(),
            channel,
        ));
    }
    let mut address = 0x6000_0000u64;
    let mut out = Vec::new();
    for (kind, interface, peer, ids, size) in slots {
        let mut slot = serde_json::json!({
            "kind": kind, "interface": interface, "peer": peer, "address": address, "size": size,
        });
        if let Some(ids) = ids {
            slot["file_ids"] = serde_json::json!(ids);
        }
        out.push(slot);
        address += size + 4096;
    }
    for (name, size) in &tasks[i].regions {
        out.push(serde_json::json!({
            "kind": "region", "region": name, "address": address, "size": size,
        }));
        address += size + 4096;
    }
    out
}

/// Only the keys `expected` has.
fn picked(actual: &serde_json::Value, expected: &serde_json::Value) -> serde_json::Value {
    let keys = expected.as_object().unwrap().keys();
    keys.map(|k| (k.clone(), actual[k].clone()))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn audit_of_the_built_image_is_what_the_manifest_grants() {
    let (image, _) = built();
    let out = pv(&["audit", "--metal", image.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (tasks, ring) = stated(&shipped());
    let channel = pages(ChannelLayout::new(ring).unwrap().region_size() as u64);

    let names: Vec<&str> = audit["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, want, "the tasks, in manifest order");
    for (i, t) in tasks.iter().enumerate() {
        let row = &audit["tasks"][i];
        assert_eq!(row["heap"], t.heap, "{} heap", t.name);
        assert_eq!(row["stack"], t.stack, "{} stack", t.name);
        assert_eq!(row["restart"], t.restart, "{} restart", t.name);
        let slots = expected_slots(&tasks, i, channel);
        let actual: Vec<serde_json::Value> = row["slots"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&slots)
            .map(|(a, e)| picked(a, e))
            .collect();
        assert_eq!(
            row["slots"].as_array().unwrap().len(),
            slots.len(),
            "{}",
            t.name
        );
        assert_eq!(actual, slots, "{} slots", t.name);
        // Its image is its program's, as cargo built it.
        let program = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/metal/x86_64-unknown-linux-gnu/release")
            .join(&t.program);
        let bytes = std::fs::read(&program).unwrap();
        let img = &audit["images"][row["image"].as_u64().unwrap() as usize];
        assert_eq!(img["sha256"], sha256_hex(&bytes), "{} image", t.name);
        assert_eq!(img["bytes"], bytes.len(), "{} image", t.name);
    }
    // One image per program, one channel per call, every ring of the manifest's capacity.
    let mut programs: Vec<&str> = tasks.iter().map(|t| t.program.as_str()).collect();
    programs.dedup();
    assert_eq!(audit["images"].as_array().unwrap().len(), programs.len());
    let calls: usize = tasks.iter().map(|t| t.calls.len()).sum();
    let channels = audit["channels"].as_array().unwrap();
    assert_eq!(channels.len(), calls);
    assert!(channels.iter().all(|c| c["ring_capacity"] == ring));
    // The text says the same.
    let out = pv(&["audit", "--metal", image.to_str().unwrap()]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("serves vmgs to \"metal-client\""), "{said}");
    assert!(said.contains("file-ids [ATTEST]"), "{said}");
}

#[test]
fn audit_refuses_what_is_not_a_metal_image() {
    let dir = scratch_dir("metal-audit");
    let junk = dir.join("junk");
    std::fs::write(&junk, b"not an elf").unwrap();
    let out = pv(&["audit", "--metal", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("is not an ELF file"), "{}", text(&out));
    // An ELF file without a task table: the paravisor itself.
    let out = pv(&["audit", "--metal", common::paravisor().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("has no .pv_tasks section"),
        "{}",
        text(&out)
    );
    // A table that is not one: the section's bytes changed (version 0).
    let (image, _) = built();
    let mut bytes = std::fs::read(image).unwrap();
    let table = std::fs::read(image.with_extension("tasks")).unwrap();
    let at = bytes
        .windows(table.len())
        .position(|w| w == table.as_slice())
        .expect("the image holds its table");
    bytes[at] = 0x7f;
    let broken = dir.join("broken.elf");
    std::fs::write(&broken, &bytes).unwrap();
    let out = pv(&["audit", "--metal", broken.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("task table version 127"),
        "{}",
        text(&out)
    );
}

#[test]
fn metal_log_passes_other_lines_and_names_undecodable_frames() {
    let (image, _) = built();
    let dir = scratch_dir("metal-log");
    let log = dir.join("log.txt");
    std::fs::write(&log, "plain line\nintercept   | #d:0g\n#d:0100\n").unwrap();
    let out = pv(&[
        "metal",
        "log",
        "--image",
        image.to_str().unwrap(),
        log.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(lines[0], "plain line");
    assert!(
        lines[1].starts_with("intercept   | (undecodable defmt frame: \"0g\" is not hex) #d:0g"),
        "{lines:?}"
    );
    assert!(
        lines[2].starts_with("(undecodable defmt frame: truncated)"),
        "{lines:?}"
    );
    // An image without a defmt table.
    let out = pv(&[
        "metal",
        "log",
        "--image",
        log.to_str().unwrap(),
        log.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
}

/// Whether QEMU is installed; a SKIPPED line if not.
fn qemu_available(test: &str) -> bool {
    let there = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    if !there {
        eprintln!("SKIPPED: {test}: no qemu-system-x86_64 (apt-get install qemu-system-x86)");
    }
    there
}

#[test]
fn the_image_boots_under_qemu_and_logs_its_tasks() {
    let test = "the_image_boots_under_qemu_and_logs_its_tasks";
    if !qemu_available(test) {
        return;
    }
    let (image, _) = built();
    // The raw console (the run ends by itself, or is stopped after its timeout: either way
    // the first lines are there).
    let out = pv(&[
        "metal",
        "run",
        "--image",
        image.to_str().unwrap(),
        "--raw",
        "--timeout",
        "20",
    ]);
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        raw.lines().next().is_some_and(|l| l.starts_with("#d:")),
        "{}",
        text(&out)
    );
    // Decoded with the library, as a test reads captured output.
    let decoded = pv_tools::metal::log::decode(image, &raw).unwrap();
    let first = decoded.lines().next().unwrap();
    assert!(
        first.contains("INFO  pv-metal: entered by Pvh"),
        "{decoded}"
    );
    assert!(!decoded.contains("undecodable"), "{decoded}");
    for task in ["vmgs", "echo", "metal-client"] {
        assert!(
            decoded
                .lines()
                .any(|l| l.contains(&format!("task {task} started"))),
            "no start of {task}:\n{decoded}"
        );
    }
    // And through `metal log`, each line as the library decodes it.
    let dir = scratch_dir("metal-qemu");
    let captured = dir.join("raw.txt");
    let prefixed: String = raw
        .lines()
        .map(|l| format!("intercept   | {l}\n"))
        .collect();
    std::fs::write(&captured, &prefixed).unwrap();
    let out = pv(&[
        "metal",
        "log",
        "--image",
        image.to_str().unwrap(),
        captured.to_str().unwrap(),
    ]);
    let via_cli = String::from_utf8_lossy(&out.stdout);
    let want: String = decoded
        .lines()
        .map(|l| format!("intercept   | {l}\n"))
        .collect();
    assert_eq!(via_cli, want);
}

// ---- Booting the image: its tasks, a store restarted under its client, hostile tasks ----

/// The shipped manifest with the VMGS task told to fault on its third request (the client's
/// second read: a restart under its feet), and `extra` appended (more tasks).
fn boot_manifest(extra: &str) -> String {
    let shipped = shipped();
    let at = shipped
        .find("program = \"pv-vmgs-metal\"")
        .expect("the shipped vmgs task");
    let mut text = shipped.clone();
    text.insert_str(at, "args = \"fault-after=3\"\n");
    text.push_str(extra);
    text
}

/// Every attempt of the hostile program, and the kernel's words for stopping it.
const ATTEMPTS: &[(&str, &str)] = &[
    ("read-kernel", "page fault at"),
    ("read-other-task", "page fault at"),
    ("write-page-tables", "page fault at"),
    ("write-cr3", "general protection fault"),
    ("privileged", "general protection fault"),
    ("port-io", "general protection fault"),
    ("write-code", "page fault at"),
    ("write-boot-record", "page fault at"),
    ("execute-heap", "page fault at"),
    ("bad-slot", "capability slot 15 is not one it holds"),
    ("bad-syscall", "unknown system call 99"),
    ("bad-buffer", "buffer at 0x100000 is not its memory"),
];

fn hostile_tasks() -> String {
    let mut text = String::new();
    for (attempt, _) in ATTEMPTS {
        text.push_str(&format!(
            "\n[[metal.task]]\nname = \"h-{attempt}\"\nprogram = \"pv-metal-hostile\"\n\
             args = \"{attempt}\"\nrestart = {{ policy = \"never\", max = 1, window = \"60s\", backoff = \"50ms\" }}\n"
        ));
    }
    // One that keeps the CPU for 2 s without giving it up: the timer preempts it.
    text.push_str(
        "\n[[metal.task]]\nname = \"hog\"\nprogram = \"pv-metal-hostile\"\nargs = \"hog\"\n\
         restart = { policy = \"never\", max = 1, window = \"60s\", backoff = \"50ms\" }\n",
    );
    text
}

/// The image of the boot manifest (with the hostile tasks), built once.
fn boot_image() -> &'static PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let dir = scratch_dir("metal-boot");
        let manifest = dir.join("manifest.toml");
        std::fs::write(&manifest, boot_manifest(&hostile_tasks())).unwrap();
        let image = dir.join("pv-metal.elf");
        let out = Command::new(common::paravisor())
            .args(["metal", "build", "--manifest"])
            .arg(&manifest)
            .arg("--out")
            .arg(&image)
            .output()
            .unwrap();
        assert!(out.status.success(), "metal build:\n{}", text(&out));
        image
    })
}

/// What a boot of the boot image must show, whichever way it was booted.
fn check_boot(log: &str) {
    let has = |needle: &str| log.lines().any(|l| l.contains(needle));
    for task in ["vmgs", "echo", "metal-client", "hog"] {
        assert!(
            has(&format!("task {task} started (restart 0)")),
            "no start of {task}:\n{log}"
        );
    }
    // The store: written, read back, restarted under the client, read again from the RAM
    // disk its predecessor wrote, and a file not granted refused.
    for line in [
        "metal-client: vmgs: wrote 3000 bytes to file 5",
        "metal-client: vmgs: read back: 3000 bytes, as written (epoch 1)",
        "vmgs: faulting on request 3 as configured",
        "task vmgs stopped: invalid opcode (6)",
        "task vmgs started (restart 1)",
        "metal-client: vmgs read again: PeerRestarted (the store restarted); retrying",
        "metal-client: vmgs: read again: 3000 bytes, as written (epoch 2)",
        "metal-client: vmgs: a file not granted is refused",
        "metal-client: wait: deadline of 50 ms kept",
    ] {
        assert!(has(line), "no {line:?}:\n{log}");
    }
    // Echo faulted on request in four ways; each time the call in flight failed with
    // PeerRestarted and the next one was served by its successor.
    for kind in ["InvalidOpcode", "PageFault", "Privileged", "Exit"] {
        assert!(
            has(&format!(
                "metal-client: echo fault {kind}: PeerRestarted, then served"
            )),
            "{kind}:\n{log}"
        );
    }
    assert!(has("metal-client: PASS: 2 services checked"), "{log}");
    // Every hostile attempt stopped, with the kernel's reason, and none survived.
    for (attempt, reason) in ATTEMPTS {
        assert!(
            has(&format!("task h-{attempt} stopped: {reason}")),
            "h-{attempt} not stopped with {reason:?}:\n{log}"
        );
        assert!(
            !has(&format!("survived {attempt}")),
            "{attempt} survived:\n{log}"
        );
    }
    // The client finished while the hog still held the CPU it was given.
    let at = |needle: &str| log.lines().position(|l| l.contains(needle)).unwrap();
    assert!(at("metal-client: PASS") < at("hog: hog: done"), "{log}");
    assert!(
        has("no task can run any more: the run ends (clean: false)"),
        "{log}"
    );
    assert!(
        !has("undecodable") && !has("kernel fault") && !has("kernel panic"),
        "{log}"
    );
}

#[test]
fn under_qemu_tasks_run_isolated_a_restarted_store_keeps_its_data_and_every_hostile_attempt_is_stopped(
) {
    let test = "under_qemu_tasks_run_isolated_a_restarted_store_keeps_its_data_and_every_hostile_attempt_is_stopped";
    if !qemu_available(test) {
        return;
    }
    let image = boot_image();
    // The timeout only catches a hang: the run ends by itself in about 3 s.
    let out = pv(&[
        "metal",
        "run",
        "--image",
        image.to_str().unwrap(),
        "--timeout",
        "600",
    ]);
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    // Hostile tasks ended badly (on purpose): the kernel says so in its status.
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(log.contains("entered by Pvh"), "{log}");
    check_boot(&log);
}

#[test]
fn in_our_own_partition_the_same_image_does_the_same() {
    let test = "in_our_own_partition_the_same_image_does_the_same";
    if !common::kvm_available(test) {
        return;
    }
    let image = boot_image();
    let mut run = common::GuestRun::start(
        "metal-partition",
        &common::shipped_text(),
        &[
            "--guest",
            image.to_str().unwrap(),
            "--memory",
            "128",
            "--cmdline",
            "mem=128",
        ],
    );
    let status = run.wait(std::time::Duration::from_secs(300));
    let log = pv_tools::metal::log::decode(image, &run.console()).unwrap();
    assert_eq!(status.code(), Some(1), "{log}\n{}", run.log());
    assert!(log.contains("entered by Partition"), "{log}");
    check_boot(&log);
}
