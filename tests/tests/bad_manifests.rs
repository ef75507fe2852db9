//! CAmkES-style bad-manifest cases: each one is refused by `paravisor check` with a non-zero
//! exit and a message that names the line. A case is a good manifest with the keys it breaks
//! changed as TOML (`common::edited`), so a case that names a key the manifest lacks fails
//! instead of checking the good manifest.

mod common;

use common::add;
use common::edited;
use common::push;
use common::pv;
use common::remove;
use common::scratch_dir;
use common::set;
use common::text;
use toml_edit::DocumentMut;

const GOOD: &str = r#"[[service]]
name = "store"
binary = "pv-vmgs"
serves = ["vmgs"]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }

[[service]]
name = "tpm"
binary = "pv-vtpm"
serves = ["vtpm"]
calls = [{ endpoint = "vmgs", file-ids = ["TPM_NVRAM", "TPM_PPI"] }]
mmio = [{ base = 0xfed40000, size = 0x5000 }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "on-failure", max = 3, window = "10s", backoff = "10ms" }
"#;

/// GOOD after `change`. A key added to "store" lands on line 7 (after its `restart`), one
/// added to "tpm" on line 16 (its last).
fn edit(change: impl FnOnce(&mut DocumentMut)) -> String {
    edited(GOOD, change)
}

/// A case cannot silently check GOOD instead: an edit of a key GOOD lacks fails.
#[test]
#[should_panic(expected = "no service.tpm.serve to set")]
fn an_edit_of_a_key_the_manifest_lacks_fails_the_case() {
    edit(|m| set(m, "service.tpm.serve", r#"["tpmx"]"#));
}

/// Checks `manifest`; asserts failure with `needle` in the output at `line`.
fn refused(manifest: &str, line: usize, needle: &str) {
    let dir = scratch_dir("bad");
    let path = dir.join("bad.toml");
    std::fs::write(&path, manifest).unwrap();
    let out = pv(&["check", path.to_str().unwrap()]);
    let msg = text(&out);
    assert!(
        !out.status.success(),
        "accepted a bad manifest:\n{manifest}"
    );
    assert!(msg.contains(needle), "message lacks {needle:?}:\n{msg}");
    let at = format!("bad.toml:{line}:");
    assert!(
        msg.contains(&at),
        "message does not point at line {line}:\n{msg}"
    );
    assert!(
        msg.contains("help:"),
        "message does not say what would be right:\n{msg}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn good_manifest_and_shipped_manifest_pass() {
    let dir = scratch_dir("good");
    let path = dir.join("good.toml");
    std::fs::write(&path, GOOD).unwrap();
    let out = pv(&["check", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pv(&["check", common::shipped_manifest().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn unknown_endpoint_is_refused() {
    refused(
        &edit(|m| set(m, "service.tpm.serves", r#"["tpmx"]"#)),
        11,
        "unknown endpoint \"tpmx\"",
    );
}

#[test]
fn endpoint_served_twice_is_refused() {
    refused(
        &edit(|m| set(m, "service.tpm.serves", r#"["vmgs"]"#)),
        11,
        "served twice",
    );
}

#[test]
fn call_to_an_endpoint_nobody_serves_is_refused() {
    refused(
        &edit(|m| set(m, "service.tpm.calls", r#"[{ endpoint = "net" }]"#)),
        12,
        "no service serves it",
    );
}

#[test]
fn disconnected_service_is_refused() {
    let m = format!(
        "{GOOD}\n[[service]]\nname = \"lonely\"\nbinary = \"pv-net\"\nlimits = {{ memory = \"64M\", open-files = 32 }}\nrestart = {{ policy = \"never\", max = 0, window = \"10s\", backoff = \"10ms\" }}\n"
    );
    refused(&m, 18, "serves nothing and calls nothing");
}

#[test]
fn duplicate_service_names_are_refused() {
    refused(
        &edit(|m| set(m, "service.tpm.name", r#""store""#)),
        9,
        "defined twice",
    );
}

#[test]
fn zero_memory_limit_is_refused() {
    refused(
        &edit(|m| set(m, "service.store.limits.memory", r#""0""#)),
        5,
        "memory limit is zero",
    );
}

#[test]
fn absurd_memory_limit_is_refused() {
    refused(
        &edit(|m| set(m, "service.store.limits.memory", r#""9000G""#)),
        5,
        "absurd",
    );
}

#[test]
fn zero_open_files_is_refused() {
    refused(
        &edit(|m| set(m, "service.store.limits.open-files", "0")),
        5,
        "open-files limit 0",
    );
}

#[test]
fn absurd_restart_limits_are_refused() {
    refused(
        &edit(|m| set(m, "service.store.restart.max", "100000")),
        6,
        "restart max 100000",
    );
    refused(
        &edit(|m| set(m, "service.store.restart.backoff", r#""0ms""#)),
        6,
        "backoff",
    );
    refused(
        &edit(|m| set(m, "service.store.restart.policy", r#""sometimes""#)),
        6,
        "restart policy \"sometimes\"",
    );
    // The back-off's ceiling: a duration, not absurd, not below the back-off itself.
    refused(
        &edit(|m| add(m, "service.store.restart.max-backoff", r#""5ms""#)),
        6,
        "restart max-backoff 5ms is below backoff 10ms",
    );
    refused(
        &edit(|m| add(m, "service.store.restart.max-backoff", r#""1y""#)),
        6,
        "restart max-backoff \"1y\" is not a duration",
    );
    refused(
        &edit(|m| add(m, "service.store.restart.max-backof", r#""1s""#)),
        6,
        "max-backof",
    );
}

#[test]
fn overlapping_device_ranges_are_refused() {
    // Refused at the later of the two ranges: "tpm"'s, a line down with "store" a line longer.
    let m = edit(|m| {
        add(
            m,
            "service.store.mmio",
            "[{ base = 0xfed44000, size = 0x2000 }]",
        )
    });
    refused(&m, 14, "overlaps");
}

#[test]
fn unknown_keys_are_refused() {
    refused(
        &edit(|m| add(m, "service.store.binray", r#""x""#)),
        7,
        "unknown field",
    );
}

#[test]
fn syscall_fragments_cannot_undo_the_sandbox() {
    refused(
        &edit(|m| add(m, "service.store.syscalls", r#"["ptrace"]"#)),
        7,
        "leave its sandbox",
    );
    refused(
        &edit(|m| add(m, "service.store.syscalls", r#"["frobnicate"]"#)),
        7,
        "not an x86_64 syscall",
    );
}

#[test]
fn files_must_stay_in_the_state_directory() {
    refused(
        &edit(|m| {
            add(
                m,
                "service.store.files",
                r#"[{ name = "x", path = "../etc/passwd", access = "read-only" }]"#,
            )
        }),
        7,
        "inside the state directory",
    );
}

#[test]
fn missing_manifest_names_the_file() {
    let out = pv(&["check", "/nonexistent/manifest.toml"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("/nonexistent/manifest.toml"),
        "{}",
        text(&out)
    );
}

#[test]
fn open_files_below_the_granted_descriptors_is_refused() {
    // "store" holds status, seccomp program, control and one serving channel per caller:
    // 4 slots + 8 for stdio, the record and the runtime = 12.
    refused(
        &edit(|m| set(m, "service.store.limits.open-files", "11")),
        5,
        "below the 12 descriptors",
    );
}

#[test]
fn vmgs_call_without_file_ids_is_refused() {
    refused(
        &edit(|m| remove(m, "service.tpm.calls.0.file-ids")),
        12,
        "must say which file ids",
    );
}

#[test]
fn unknown_or_reserved_vmgs_file_ids_are_refused() {
    let file_ids = |ids: &str| edit(|m| set(m, "service.tpm.calls.0.file-ids", ids));
    refused(
        &file_ids(r#"["TPM_NVRAM", "TPM_PP"]"#),
        12,
        "\"TPM_PP\" is not a VMGS file id",
    );
    refused(
        &file_ids(r#"["TPM_NVRAM", "FILE_TABLE"]"#),
        12,
        "cannot be granted",
    );
    refused(
        &file_ids(r#"["TPM_NVRAM", "64"]"#),
        12,
        "not a VMGS file id",
    );
    refused(&file_ids(r#"["TPM_NVRAM", "3"]"#), 12, "listed twice");
}

#[test]
fn file_ids_on_a_call_to_another_endpoint_are_refused() {
    let m = edit(|m| {
        set(m, "service.store.serves", r#"["vmgs", "net"]"#);
        set(
            m,
            "service.tpm.calls",
            r#"[{ endpoint = "vmgs", file-ids = ["TPM_NVRAM"] }, { endpoint = "net", file-ids = ["TPM_NVRAM"] }]"#,
        );
    });
    refused(&m, 12, "file-ids applies to calls to \"vmgs\"");
}

/// A guest-state file "store" creates on the first run, encrypted with its key "datastore":
/// `files` on line 7, `keys` on line 8.
fn store_files(m: &mut DocumentMut) {
    add(
        m,
        "service.store.files",
        r#"[{ name = "guest-state", path = "guest.vmgs", access = "read-write", missing = "create-vmgs", key = "datastore" }]"#,
    );
    add(
        m,
        "service.store.keys",
        r#"[{ name = "datastore", path = "guest.vmgs.key", missing = "create" }]"#,
    );
}

#[test]
fn created_guest_state_needs_a_key_of_its_service() {
    let good = edit(store_files);
    let dir = scratch_dir("vmgsgood");
    let path = dir.join("good.toml");
    std::fs::write(&path, &good).unwrap();
    let out = pv(&["check", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    refused(
        &edited(&good, |m| remove(m, "service.store.files.guest-state.key")),
        7,
        "needs `key`",
    );
    refused(
        &edited(&good, |m| {
            set(m, "service.store.files.guest-state.key", r#""other""#)
        }),
        7,
        "not one of this service's keys",
    );
    refused(
        &edited(&good, |m| {
            set(m, "service.store.keys.datastore.path", r#""guest.vmgs""#)
        }),
        7,
        "is a key file",
    );
    refused(
        &edited(&good, |m| {
            set(
                m,
                "service.store.keys.datastore.path",
                r#""../guest.vmgs.key""#,
            )
        }),
        8,
        "must stay inside the state directory",
    );
}

#[test]
fn a_vmgs_file_id_granted_to_two_clients_is_refused() {
    let m = format!(
        "{}\n[[service]]\nname = \"other\"\nbinary = \"pv-attest\"\nserves = [\"attest\"]\ncalls = [{{ endpoint = \"vmgs\", file-ids = [\"ATTEST\", \"TPM_PPI\"] }}]\nlimits = {{ memory = \"64M\", open-files = 32 }}\nrestart = {{ policy = \"never\", max = 0, window = \"10s\", backoff = \"10ms\" }}\n",
        GOOD
    );
    refused(&m, 21, "is granted to both");
}

#[test]
fn the_guest_state_file_cannot_be_granted_to_another_service() {
    // With "store" two lines longer, "tpm"'s new last line is 18.
    let m = edit(|m| {
        store_files(m);
        add(
            m,
            "service.tpm.files",
            r#"[{ name = "steal", path = "guest.vmgs", access = "read-only" }]"#,
        );
    });
    refused(&m, 18, "is a guest-state file");
}

#[test]
fn a_ring_too_small_for_vmgs_chunks_is_refused() {
    let m = format!("[paravisor]\nring-capacity = \"16K\"\n\n{GOOD}");
    refused(&m, 2, "too small for the vmgs endpoint");
}

#[test]
fn listeners_only_on_loopback_or_unix_sockets_in_the_state_directory() {
    let with = |listen: &str| edit(|m| add(m, "service.tpm.listen", &format!("[{listen}]")));
    refused(
        &with("{ name = \"mssim-command\", address = \"0.0.0.0:2321\" }"),
        16,
        "not a loopback address",
    );
    refused(
        &with("{ name = \"mssim-command\", address = \"10.0.0.1:2321\" }"),
        16,
        "not a loopback address",
    );
    refused(
        &with("{ name = \"x\", address = \"127.0.0.1:2321\", path = \"t.sock\" }"),
        16,
        "exactly one of",
    );
    refused(
        &with("{ name = \"x\", path = \"../t.sock\" }"),
        16,
        "must stay inside the state directory",
    );
    refused(
        &with("{ name = \"a\", address = \"127.0.0.1:2321\" }, { name = \"b\", address = \"127.0.0.1:2321\" }"),
        16,
        "already listened on",
    );
}

#[test]
fn reserved_service_names_are_refused() {
    refused(
        &edit(|m| set(m, "service.tpm.name", r#""platform""#)),
        9,
        "is reserved",
    );
}

const INTERCEPT: &str = r#"
[[service]]
name = "platform-devices"
binary = "pv-intercept"
serves = ["intercept"]
interrupts = [4]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }
"#;

/// GOOD and INTERCEPT (lines 17-23) after `change`.
fn edit_with_intercept(change: impl FnOnce(&mut DocumentMut)) -> String {
    edited(&format!("{GOOD}{INTERCEPT}"), change)
}

#[test]
fn interrupt_grants_pass_where_they_belong() {
    let m = edit_with_intercept(|m| {
        push(
            m,
            "service.tpm.calls",
            r#"{ endpoint = "intercept", interrupts = [5, 6] }"#,
        )
    });
    let dir = scratch_dir("irq-good");
    let path = dir.join("good.toml");
    std::fs::write(&path, &m).unwrap();
    let out = pv(&["check", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pv(&["audit", path.to_str().unwrap()]);
    assert!(
        text(&out).contains("interrupts [line 5, line 6]"),
        "{}",
        text(&out)
    );
}

#[test]
fn interrupt_lines_only_on_intercept_devices_and_in_calls_to_intercept() {
    // Own lines on a service that owns no guest device.
    refused(
        &edit(|m| add(m, "service.store.interrupts", "[5]")),
        7,
        "lists interrupts but owns no guest device",
    );
    // A device's own line (tpm owns a range) is accepted, and shown by the audit.
    let m = edit(|m| add(m, "service.tpm.interrupts", "[5]"));
    let dir = common::scratch_dir("bad-manifest-own-line");
    let path = dir.join("m.toml");
    std::fs::write(&path, &m).unwrap();
    let out = common::pv(&["audit", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("irq-line-5"), "{}", text(&out));
    // Two holders of one line.
    let m = edit(|m| {
        add(m, "service.tpm.interrupts", "[5]");
        add(m, "service.store.pio", "[{ base = 0x2f8, size = 8 }]");
        add(m, "service.store.interrupts", "[5]");
    });
    refused(
        &m,
        18,
        "interrupt line 5 is listed by both \"store\" and \"tpm\"",
    );
    // A line grant in a call to another endpoint.
    refused(
        &edit(|m| add(m, "service.tpm.calls.0.interrupts", "[5]")),
        12,
        "interrupts applies to calls to \"intercept\"",
    );
}

#[test]
fn interrupt_lines_that_do_not_exist_or_repeat_are_refused() {
    let m = edit_with_intercept(|m| set(m, "service.platform-devices.interrupts", "[4, 24]"));
    refused(&m, 21, "interrupt line 24 does not exist");
    let m = edit_with_intercept(|m| set(m, "service.platform-devices.interrupts", "[4, 4]"));
    refused(&m, 21, "listed twice");
}

#[test]
fn a_range_of_a_service_with_two_interfaces_is_refused() {
    let m = edit(|m| {
        set(m, "service.store.serves", r#"["vmgs", "net"]"#);
        add(m, "service.store.pio", "[{ base = 0x2f8, size = 8 }]");
    });
    refused(
        &m,
        7,
        "owns guest address ranges or a PCI device but serves 2 interfaces",
    );
}

#[test]
fn guest_memory_only_for_a_device_and_of_a_known_kind() {
    refused(
        &edit(|m| add(m, "service.store.guest-memory", r#""all""#)),
        7,
        "asks for guest memory but owns no guest device",
    );
    refused(
        &edit(|m| add(m, "service.tpm.guest-memory", r#""private""#)),
        16,
        "guest-memory \"private\" is not a kind of guest memory",
    );
    let m = edit(|m| add(m, "service.tpm.guest-memory", r#""shared-window""#));
    let dir = common::scratch_dir("bad-manifest-guest-memory");
    let path = dir.join("m.toml");
    std::fs::write(&path, &m).unwrap();
    let out = common::pv(&["audit", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("dma:     guest memory 0xb0000000..0xb0400000 only (shared-window)"),
        "{}",
        text(&out)
    );
}

#[test]
fn doorbells_are_whole_registers_inside_the_devices_own_mmio_of_a_generic_device() {
    // "store" owns no range; give it one for the cases that need it.
    let with_range = |doorbells: &str| {
        let doorbells = doorbells.to_string();
        edit(move |m| {
            add(
                m,
                "service.store.mmio",
                "[{ base = 0xfe000000, size = 0x4000 }]",
            );
            add(m, "service.store.doorbells", &doorbells);
        })
    };
    refused(
        &edit(|m| {
            add(
                m,
                "service.store.doorbells",
                "{ base = 0xfe001008, size = 0x20 }",
            )
        }),
        7,
        "are not inside its own mmio ranges",
    );
    refused(
        &with_range("{ base = 0xfe003ff8, size = 0x10 }"),
        8,
        "are not inside its own mmio ranges",
    );
    refused(
        &with_range("{ base = 0xfe001002, size = 0x20 }"),
        8,
        "are not whole 4-byte registers",
    );
    refused(
        &with_range("{ base = 0xfe001000, size = 0x200 }"),
        8,
        "128 doorbells: at most 64 are wired",
    );
    refused(
        &edit(|m| {
            add(
                m,
                "service.tpm.doorbells",
                "{ base = 0xfed40000, size = 4 }",
            )
        }),
        16,
        "answers guest accesses in its own interface",
    );
    let m = with_range("{ base = 0xfe001008, size = 0x20 }");
    let dir = common::scratch_dir("doorbells-audit");
    let path = dir.join("m.toml");
    std::fs::write(&path, &m).unwrap();
    let out = common::pv(&["audit", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("doorbells: 8 at 0xfe001008..0xfe001028 (inside its own mmio)"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_partitions_own_port_cannot_be_claimed() {
    let m = edit_with_intercept(|m| {
        add(
            m,
            "service.platform-devices.pio",
            "[{ base = 0xf0, size = 0x10 }]",
        )
    });
    refused(&m, 24, "which the partition answers itself");
}

#[test]
fn the_partitions_client_name_is_reserved() {
    refused(
        &edit(|m| set(m, "service.tpm.name", r#""guest""#)),
        9,
        "is reserved",
    );
}

#[test]
fn pci_devices_must_exist_and_have_one_owner() {
    refused(
        &edit(|m| add(m, "service.tpm.pci-device", "0")),
        16,
        "PCI device 0 does not exist on bus 0",
    );
    refused(
        &edit(|m| add(m, "service.tpm.pci-device", "32")),
        16,
        "PCI device 32 does not exist on bus 0",
    );
    // With "tpm" a line longer, the second owner's new last line is 25.
    let m = edit_with_intercept(|m| {
        add(m, "service.tpm.pci-device", "3");
        add(m, "service.platform-devices.pci-device", "3");
    });
    refused(&m, 25, "PCI device 3 is already owned by \"tpm\"");
    // A service with two interfaces cannot own a device (whose channel would carry it?).
    refused(
        &edit(|m| {
            set(m, "service.store.serves", r#"["vmgs", "net"]"#);
            add(m, "service.store.pci-device", "4");
        }),
        7,
        "owns guest address ranges or a PCI device but serves 2 interfaces",
    );
}

/// A manifest with a sealed datastore key and an attest service that holds the platform.
const SEALED: &str = r#"[attest]
sealing = "measurement"

[[service]]
name = "store"
binary = "pv-vmgs"
serves = ["vmgs"]
files = [{ name = "guest-state", path = "guest.vmgs", access = "read-write", missing = "create-vmgs", key = "datastore" }]
keys = [{ name = "datastore", sealed = true }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }

[[service]]
name = "att"
binary = "pv-attest"
serves = ["attest"]
platform = true
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }

[[service]]
name = "tpm"
binary = "pv-vtpm"
serves = ["vtpm"]
calls = [{ endpoint = "vmgs", file-ids = ["TPM_NVRAM"] }, { endpoint = "attest" }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "on-failure", max = 3, window = "10s", backoff = "10ms" }
"#;

/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the manifest"))
        + 1
}

#[test]
fn attestation_settings_are_checked() {
    let dir = scratch_dir("sealed-good");
    let path = dir.join("good.toml");
    std::fs::write(&path, SEALED).unwrap();
    let out = pv(&["check", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pv(&["audit", path.to_str().unwrap()]);
    assert!(
        text(&out).contains(
            "sealed in its guest-state file (HW_KEY_PROTECTOR) by the microkernel, policy measurement"
        ),
        "{}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(dir);

    // The platform only for the service that serves attest ("tpm"'s new last line).
    let m = edited(SEALED, |m| add(m, "service.tpm.platform", "true"));
    refused(&m, 28, "holds the platform but does not serve attest");
    let m = edited(SEALED, |m| set(m, "attest.sealing", r#""tpm""#));
    refused(&m, 2, "sealing = \"tpm\" is unknown");
    let m = edited(SEALED, |m| {
        add(m, "service.store.keys.datastore.path", r#""k""#)
    });
    refused(
        &m,
        line_of(&m, "sealed = true"),
        "needs either a `path` or `sealed = true`",
    );
    let m = edited(SEALED, |m| remove(m, "service.att.platform"));
    refused(
        &m,
        line_of(&m, "sealed = true"),
        "needs the attest service to hold the platform",
    );
    // Keys added to [attest] follow `sealing`, from line 3 on.
    let m = edited(SEALED, |m| {
        add(m, "attest.key-release", r#""10.0.0.1:8700""#);
        add(
            m,
            "attest.key-release-id",
            &format!("\"{}\"", "ab".repeat(32)),
        );
    });
    refused(&m, 3, "not a loopback address");
    let m = edited(SEALED, |m| {
        add(m, "attest.key-release", r#""127.0.0.1:8700""#)
    });
    refused(&m, 3, "key-release without key-release-id");
    let m = edited(SEALED, |m| {
        add(m, "attest.key-release", r#""127.0.0.1:8700""#);
        add(m, "attest.key-release-id", r#""xyz""#);
    });
    refused(&m, 4, "key-release-id is not a key id");
    let m = edited(SEALED, |m| {
        set(
            m,
            "service.tpm.calls.0.file-ids",
            r#"["TPM_NVRAM", "KEY_PROTECTOR"]"#,
        )
    });
    refused(
        &m,
        line_of(&m, "sealed = true"),
        "which holds the sealed datastore key",
    );
}

/// GOOD with a front end that calls the TPM (`call`) and listens (`listen`).
fn with_front_end(call: &str, listen: &str) -> String {
    format!(
        "{GOOD}\n[[service]]\nname = \"gw\"\nbinary = \"pv-tpm-gateway\"\ncalls = [{call}]\nlisten = [{listen}]\nlimits = {{ memory = \"64M\", open-files = 32 }}\nrestart = {{ policy = \"always\", max = 3, window = \"10s\", backoff = \"10ms\" }}\n"
    )
}

#[test]
fn what_a_client_may_ask_of_the_tpm_is_checked() {
    let listen = "{ name = \"mssim-command\", address = \"127.0.0.1:2321\" }";
    // Line 20 is the call, 21 the listener.
    refused(
        &with_front_end(
            "{ endpoint = \"vtpm\", tpm = [\"commands\", \"registers\"] }",
            listen,
        ),
        20,
        "the TPM's register interface cannot be granted to a service",
    );
    refused(
        &with_front_end("{ endpoint = \"vtpm\", tpm = [\"power\"] }", listen),
        20,
        "\"power\" is not something a client may ask of the TPM",
    );
    refused(
        &with_front_end(
            "{ endpoint = \"vtpm\", tpm = [\"platform\", \"platform\"] }",
            listen,
        ),
        20,
        "\"platform\" is listed twice",
    );
    refused(
        &with_front_end("{ endpoint = \"vtpm\", tpm = [] }", listen),
        20,
        "tpm is empty",
    );
    refused(
        &with_front_end(
            "{ endpoint = \"vmgs\", file-ids = [\"ATTEST\"], tpm = [\"commands\"] }",
            listen,
        ),
        20,
        "tpm applies to calls to \"vtpm\"",
    );
}

#[test]
fn listener_localities_exist_and_belong_to_tpm_front_ends() {
    let call = "{ endpoint = \"vtpm\", tpm = [\"commands\"] }";
    refused(
        &with_front_end(
            call,
            "{ name = \"mssim-command\", address = \"127.0.0.1:2321\", localities = [0, 5] }",
        ),
        21,
        "locality 5 does not exist",
    );
    refused(
        &with_front_end(
            call,
            "{ name = \"mssim-command\", address = \"127.0.0.1:2321\", localities = [3, 3] }",
        ),
        21,
        "locality 3 is listed twice",
    );
    refused(
        &with_front_end(
            call,
            "{ name = \"mssim-command\", address = \"127.0.0.1:2321\", localities = [] }",
        ),
        21,
        "localities is empty",
    );
    refused(
        &with_front_end(
            "{ endpoint = \"vtpm\" }",
            "{ name = \"mssim-command\", address = \"127.0.0.1:2321\", localities = [0, 3] }",
        ),
        21,
        "granted no TPM commands",
    );
}

#[test]
fn listener_names_are_unique_across_the_manifest() {
    // "tpm" one line longer: the front end's listener is on line 22.
    let m = edited(
        &with_front_end(
            "{ endpoint = \"vtpm\", tpm = [\"commands\"] }",
            "{ name = \"mssim-command\", address = \"127.0.0.1:2321\" }",
        ),
        |m| {
            add(
                m,
                "service.tpm.listen",
                r#"[{ name = "mssim-command", address = "127.0.0.1:2400" }]"#,
            )
        },
    );
    refused(&m, 22, "is also a listener of \"tpm\"");
}

#[test]
fn a_service_user_must_not_be_root_nobody_or_another_services() {
    for (user, needle) in [
        ("{ uid = 0 }", "uid 0 is root's"),
        ("{ uid = 61000, gid = 0 }", "gid 0 is root's"),
        ("{ uid = 65534 }", "is the overflow id"),
        ("{ uid = 4294967295 }", "is not a usable id"),
        ("{ uid = -5 }", "is not a usable id"),
        (r#"{ uid = 61000, name = "x" }"#, "unknown field"),
    ] {
        refused(&edit(|m| add(m, "service.tpm.user", user)), 16, needle);
    }
    // One uid (or gid) for two services: they could signal and trace each other. "store"'s
    // user is on line 7.
    let users = |store: &str, tpm: &str| {
        edit(|m| {
            add(m, "service.store.user", store);
            add(m, "service.tpm.user", tpm);
        })
    };
    let both = users("{ uid = 61000 }", "{ uid = 61000, gid = 61001 }");
    refused(
        &both,
        line_of(&both, "gid = 61001"),
        "has uid 61000, as \"store\" (line 7) has",
    );
    let gids = users("{ uid = 61000 }", "{ uid = 61002, gid = 61000 }");
    refused(&gids, line_of(&gids, "uid = 61002"), "has gid 61000");
    // Unless the operator says so for both.
    let shared = users(
        "{ uid = 61000, shared = true }",
        "{ uid = 61000, gid = 61001, shared = true }",
    );
    let dir = scratch_dir("user-shared");
    let path = dir.join("shared.toml");
    std::fs::write(&path, &shared).unwrap();
    let out = pv(&["check", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = pv(&["audit", path.to_str().unwrap()]);
    assert!(
        text(&out).contains("runs as: uid 61000 gid 61001 (the manifest's `user`)"),
        "{}",
        text(&out)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn check_fails_when_a_service_binary_does_not_exist() {
    // Valid in every other way: only the executable is missing (a typo, or not built).
    let typo = edit(|m| set(m, "service.tpm.binary", r#""pv-vtmp""#));
    refused(&typo, 10, "binary \"pv-vtmp\" of service \"tpm\"");
    let dir = scratch_dir("missing-binary");
    let path = dir.join("bad.toml");
    std::fs::write(&path, &typo).unwrap();
    let out = pv(&["check", path.to_str().unwrap()]);
    let msg = text(&out);
    assert_eq!(out.status.code(), Some(1), "{msg}");
    assert!(msg.contains("pv-vtmp does not exist"), "{msg}");
    // It does not call the manifest valid (paths are left out: a checkout may be anywhere).
    let words = msg
        .replace(&common::bin_dir().display().to_string(), "BIN")
        .replace(&dir.display().to_string(), "DIR");
    assert!(!words.contains("valid"), "{msg}");
    // A file that is there but not executable is refused too.
    let fake = common::bin_dir().join("pv-not-executable-check");
    std::fs::write(&fake, b"#!/bin/sh\n").unwrap();
    std::fs::write(
        &path,
        edit(|m| set(m, "service.tpm.binary", r#""pv-not-executable-check""#)),
    )
    .unwrap();
    let out = pv(&["check", path.to_str().unwrap()]);
    let _ = std::fs::remove_file(&fake);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("is not executable"), "{}", text(&out));
    let _ = std::fs::remove_dir_all(dir);
}

/// GOOD with the guest's NIC, `nic`, holding TAP net0 on line 21; a key added to it lands on
/// line 24.
fn with_nic(change: impl FnOnce(&mut DocumentMut)) -> String {
    let m = format!(
        "{GOOD}\n[[service]]\nname = \"nic\"\nbinary = \"pv-net\"\nserves = [\"net\"]\ntaps = [{{ name = \"net0\" }}]\nlimits = {{ memory = \"64M\", open-files = 32 }}\nrestart = {{ policy = \"never\", max = 0, window = \"10s\", backoff = \"10ms\" }}\n"
    );
    edited(&m, change)
}

#[test]
fn taps_are_the_net_servers_alone_named_once_and_never_with_ioctl_or_socket() {
    let dir = scratch_dir("taps-good");
    let path = dir.join("good.toml");
    std::fs::write(&path, with_nic(|_| {})).unwrap();
    let out = pv(&["check", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // A service that does not serve the guest's NIC has no business with host frames.
    refused(
        &with_nic(|m| add(m, "service.store.taps", r#"[{ name = "net1" }]"#)),
        7,
        "\"store\" holds a TAP but does not serve net",
    );
    // `run --tap NAME=...` names one TAP: a name is given once in the whole manifest (nic's
    // taps move to line 22 with store's).
    refused(
        &with_nic(|m| add(m, "service.store.taps", r#"[{ name = "net0" }]"#)),
        22,
        "TAP name \"net0\" is also a TAP of \"store\"",
    );
    for (taps, needle) in [
        (
            r#"[{ name = "net0" }, { name = "net0" }]"#,
            "TAP \"net0\" is listed twice",
        ),
        (
            r#"[{ name = "Net_0" }]"#,
            "TAP name \"Net_0\" is not a valid name",
        ),
        (
            r#"[{ name = "a" }, { name = "b" }, { name = "c" }, { name = "d" }, { name = "e" }, { name = "f" }, { name = "g" }, { name = "h" }, { name = "i" }]"#,
            "holds 9 TAPs",
        ),
        // The host interface is the host's choice, never the manifest's.
        (
            r#"[{ name = "net0", ifname = "tap0" }]"#,
            "unknown field `ifname`",
        ),
    ] {
        refused(&with_nic(|m| set(m, "service.nic.taps", taps)), 21, needle);
    }
    // Frames only: the TAP's holder gets neither ioctl (which would reconfigure the host's
    // end) nor socket.
    for syscall in ["ioctl", "socket"] {
        refused(
            &with_nic(|m| {
                add(
                    m,
                    "service.nic.syscalls",
                    &format!("[\"read\", \"{syscall}\"]"),
                )
            }),
            24,
            &format!("syscall \"{syscall}\" is refused to \"nic\", which holds a TAP"),
        );
    }
    // audit shows the grant and who names the interface.
    let out = pv(&["audit", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(
            "taps:    net0 (a TAP device the host names with `run --tap net0=IFNAME[@NETNS]`, none otherwise; frames with a virtio-net header: no socket, no ioctl but TUNSETOFFLOAD)"
        ),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("7 tap net0"), "{}", text(&out));
    let out = pv(&["audit", "--json", path.to_str().unwrap()]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let nic = doc["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "nic")
        .expect("nic's row");
    assert_eq!(nic["taps"], serde_json::json!([{ "name": "net0" }]));
    let _ = std::fs::remove_dir_all(dir);
}
