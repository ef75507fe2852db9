//! The manifest's rules as specifications: each test gives `Manifest::parse` a manifest that
//! keeps or breaks a rule (most start from the shipped one or a small fixture) and checks the
//! model, or the diagnostic and the line it points at. One file: the tests share their
//! fixtures (`GOOD`, `TPM`, `refused_at`), and a rule is judged on the whole path from the
//! TOML text to the model, not on one pass.

use ipc_defs::bootstrap::MAX_CAPABILITIES;

use super::*;
use crate::plan::CapabilityPlan;
use crate::plan::Run;

fn shipped() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest.toml")).unwrap()
}

fn measured(text: &str) -> Vec<u8> {
    Manifest::parse(Path::new("m.toml"), text)
        .unwrap()
        .measured_bytes()
}

/// Comments, layout, key order, number spelling and host settings leave the measured
/// configuration as it is; anything the services may do changes it.
#[test]
fn the_measured_configuration_is_canonical_and_leaves_host_settings_out() {
    let text = shipped();
    let base = measured(&text);
    // Comments and blank lines gone, a comment added, whitespace changed.
    let stripped: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(measured(&stripped), base);
    assert_eq!(measured(&format!("# a note\n{text}\n\n# end\n")), base);
    let spaced = text.replace("restart = { policy", "restart   =   {   policy");
    assert_ne!(spaced, text);
    assert_eq!(measured(&spaced), base);
    // Key order inside a table; a size and a number spelt differently.
    let reordered = text.replace(
        "limits = { memory = \"128M\", open-files = 32 }",
        "limits = { open-files = 0x20, memory = \"131072K\" }",
    );
    assert_ne!(reordered, text);
    assert_eq!(measured(&reordered), base);
    // Host settings: state and platform directories, a listener's address.
    let host = text
        .replace("state-dir = \"state\"", "state-dir = \"/srv/elsewhere\"")
        .replace("# platform-dir = \"platform\"", "platform-dir = \"/srv/p\"")
        .replace("127.0.0.1:2321", "127.0.0.1:12321");
    assert_ne!(host, text);
    assert_eq!(measured(&host), base);
    // What a service may do is measured: a limit, a grant, the sealing policy.
    for (from, to) in [
        (
            "memory = \"128M\", open-files = 32 }",
            "memory = \"256M\", open-files = 32 }",
        ),
        ("sealing = \"measurement\"", "sealing = \"platform\""),
        ("backoff = \"50ms\"", "backoff = \"60ms\""),
    ] {
        assert!(text.contains(from), "{from}");
        assert_ne!(
            measured(&text.replacen(from, to, 1)),
            base,
            "{from} -> {to}"
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&base).unwrap();
    assert_eq!(json["format"], MEASURED_CONFIG_FORMAT);
    assert!(json.get("state_dir").is_none() && json.get("path").is_none());
    assert!(json["attest"].get("platform_dir").is_none());
    assert!(json["attest"].get("key_release").is_none());
    let vtpm = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "vtpm")
        .unwrap();
    for l in vtpm["listen"].as_array().unwrap() {
        assert!(l.get("address").is_none() && l.get("name").is_some(), "{l}");
    }
}

#[test]
fn canonical_json_sorts_keys_at_every_depth() {
    let a: serde_json::Value =
        serde_json::from_str(r#"{"b":1,"a":{"d":[{"y":1,"x":2}],"c":null}}"#).unwrap();
    assert_eq!(
        String::from_utf8(canonical_json(&a)).unwrap(),
        r#"{"a":{"c":null,"d":[{"x":2,"y":1}]},"b":1}"#
    );
}

const GOOD: &str = r#"
[[service]]
name = "a"
binary = "pv-a"
serves = ["vmgs"]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }

[[service]]
name = "b"
binary = "pv-b"
calls = [{ endpoint = "vmgs", file-ids = ["TPM_NVRAM"] }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "on-failure", max = 3, window = "10s", backoff = "10ms" }
"#;

fn errors(src: &str) -> Vec<Diagnostic> {
    match Manifest::parse(Path::new("m.toml"), src) {
        Ok(_) => panic!("manifest unexpectedly valid"),
        Err(e) => e.diagnostics().to_vec(),
    }
}

/// Asserts that `src` is refused with a diagnostic at `line` whose message holds `needle`.
fn refused_at(src: &str, line: usize, needle: &str) {
    let d = errors(src);
    assert!(
        d.iter()
            .any(|d| d.line == line && d.message.contains(needle)),
        "no diagnostic at line {line} with {needle:?}: {d:?}\n{src}"
    );
}

fn accepted(src: &str) -> Manifest {
    Manifest::parse(Path::new("m.toml"), src)
        .unwrap_or_else(|e| panic!("refused: {:?}\n{src}", e.diagnostics()))
}

#[test]
fn the_ring_capacity_is_a_power_of_two_within_the_layouts_bounds() {
    let with = |cap: &str| format!("[paravisor]\nring-capacity = \"{cap}\"\n{GOOD}");
    assert_eq!(accepted(&with("64K")).ring_capacity, 64 << 10);
    assert_eq!(
        accepted(&with("16M")).ring_capacity,
        ipc_defs::layout::MAX_RING_CAPACITY
    );
    // In range but not a power of two; a power of two above the range; unreadable.
    for bad in ["96K", "32M", "lots"] {
        refused_at(
            &with(bad),
            2,
            &format!("ring-capacity \"{bad}\" is not usable"),
        );
    }
}

#[test]
fn a_binary_is_a_plain_name_next_to_the_paravisor() {
    for bad in ["", "bin/pv-a", "/usr/bin/pv-a", ".pv-a"] {
        let src = GOOD.replacen("binary = \"pv-a\"", &format!("binary = \"{bad}\""), 1);
        refused_at(&src, 4, "must be a plain executable name");
    }
    accepted(&GOOD.replacen("pv-a", "pv-a.v2", 1));
}

#[test]
fn a_call_is_listed_once_and_never_to_the_callers_own_endpoint() {
    let twice = GOOD.replace(
        "calls = [{ endpoint = \"vmgs\", file-ids = [\"TPM_NVRAM\"] }]",
        "calls = [{ endpoint = \"vmgs\", file-ids = [\"TPM_NVRAM\"] }, { endpoint = \"vmgs\", file-ids = [\"TPM_PPI\"] }]",
    );
    refused_at(&twice, 12, "lists a call to \"vmgs\" twice");
    let own = GOOD.replace(
        "serves = [\"vmgs\"]",
        "serves = [\"vmgs\"]\ncalls = [{ endpoint = \"vmgs\", file-ids = [\"TPM_PPI\"] }]",
    );
    refused_at(&own, 6, "calls \"vmgs\", which it serves itself");
}

/// Keys, listeners and regions: distinct names pass, a repeated one is refused where it
/// is repeated.
#[test]
fn names_within_a_service_are_unique() {
    let with = |line: &str| {
        GOOD.replacen(
            "serves = [\"vmgs\"]\n",
            &format!("serves = [\"vmgs\"]\n{line}\n"),
            1,
        )
    };
    let keys = |a: &str, b: &str| {
        with(&format!(
            "keys = [{{ name = \"{a}\", path = \"{a}.key\" }}, {{ name = \"{b}\", path = \"{b}2.key\" }}]"
        ))
    };
    let m = accepted(&keys("k1", "k2"));
    assert_eq!(m.services[0].keys.len(), 2);
    refused_at(&keys("k1", "k1"), 6, "key \"k1\" is listed twice");

    let listen = |a: &str, b: &str| {
        with(&format!(
            "listen = [{{ name = \"{a}\", address = \"127.0.0.1:1\" }}, {{ name = \"{b}\", address = \"127.0.0.1:2\" }}]"
        ))
    };
    let m = accepted(&listen("l1", "l2"));
    assert_eq!(m.services[0].listen.len(), 2);
    refused_at(
        &listen("l1", "l1"),
        6,
        "listener name \"l1\" is invalid or listed twice",
    );
    refused_at(
        &listen("l1", "L 2"),
        6,
        "listener name \"L 2\" is invalid or listed twice",
    );

    let regions = |a: &str, b: &str| {
        with(&format!(
            "regions = [{{ name = \"{a}\", size = \"4K\" }}, {{ name = \"{b}\", size = \"8K\" }}]"
        ))
    };
    let m = accepted(&regions("r1", "r2"));
    assert_eq!(m.services[0].regions.len(), 2);
    refused_at(&regions("r1", "r1"), 6, "region \"r1\" is listed twice");
}

#[test]
fn a_region_is_neither_empty_nor_larger_than_any_memory_limit() {
    let with = |size: &str| {
        GOOD.replacen(
            "serves = [\"vmgs\"]\n",
            &format!("serves = [\"vmgs\"]\nregions = [{{ name = \"r\", size = \"{size}\" }}]\n"),
            1,
        )
    };
    assert_eq!(
        accepted(&with("64G")).services[0].regions[0].size,
        MAX_MEMORY
    );
    assert_eq!(accepted(&with("1")).services[0].regions[0].size, 1);
    for bad in ["0", "65G", "big"] {
        refused_at(
            &with(bad),
            6,
            &format!("region size \"{bad}\" is zero, absurd or unreadable"),
        );
    }
}

/// The vTPM with a device range, and a TPM front end with one listener.
const TPM: &str = r#"
[[service]]
name = "tpm"
binary = "pv-vtpm"
serves = ["vtpm"]
mmio = [{ base = 0xfed40000, size = 0x5000 }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }

[[service]]
name = "gw"
binary = "pv-tpm-gateway"
calls = [{ endpoint = "vtpm", tpm = ["commands"] }]
listen = [{ name = "mssim-command", address = "127.0.0.1:2321", localities = [0, 3] }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }
"#;

fn tpm_grant(m: &Manifest) -> ipc_defs::services::vtpm::VtpmGrant {
    match m.service("gw").unwrap().grants.get(&Interface::Vtpm) {
        Some(Grant::Vtpm(g)) => *g,
        other => panic!("no vtpm grant: {other:?}"),
    }
}

#[test]
fn a_front_end_gets_its_listeners_localities_only_if_it_may_send_commands() {
    let m = accepted(TPM);
    assert_eq!(
        tpm_grant(&m).commands,
        ipc_defs::services::vtpm::Localities::ZERO.with(3)
    );
    // Platform signals only: its listener's localities must not grant it commands.
    let m = accepted(&TPM.replace(
        "tpm = [\"commands\"] }]\nlisten = [{ name = \"mssim-command\", address = \"127.0.0.1:2321\", localities = [0, 3] }]",
        "tpm = [\"platform\"] }]\nlisten = [{ name = \"mssim-platform\", address = \"127.0.0.1:2322\" }]",
    ));
    let g = tpm_grant(&m);
    assert!(g.commands.is_empty(), "{g:?}");
    assert!(g.platform);
}

#[test]
fn a_device_range_ends_within_its_address_space() {
    let with = |range: &str| TPM.replace("{ base = 0xfed40000, size = 0x5000 }", range);
    // Up to the last byte of each space, not one past it.
    let m = accepted(&with("{ base = 0xffffffffff000, size = 0x1000 }"));
    assert_eq!(m.service("tpm").unwrap().mmio[0].end(), 1 << 52);
    for bad in [
        "{ base = 0xffffffffff000, size = 0x1001 }",
        "{ base = 0xffffffffff000, size = 0x100000 }",
        "{ base = 0x10000000000000, size = 1 }",
    ] {
        refused_at(
            &with(bad),
            6,
            "runs past the end of the mmio space (0x10000000000000)",
        );
    }
    let pio = |range: &str| {
        TPM.replace(
            "mmio = [{ base = 0xfed40000, size = 0x5000 }]",
            &format!("pio = [{range}]"),
        )
    };
    accepted(&pio("{ base = 0xfff0, size = 0x10 }"));
    refused_at(
        &pio("{ base = 0xfff0, size = 0x11 }"),
        6,
        "runs past the end of the pio space (0x10000)",
    );
    // The partition's own port, whether the range starts at it, ends at it or spans it.
    let port = crate::partition::router::IN_THREAD_PORT as u64;
    for (base, size) in [(port, 1), (port - 1, 2), (port - 3, 4), (port, 0x10)] {
        refused_at(
            &pio(&format!("{{ base = {base:#x}, size = {size:#x} }}")),
            6,
            "which the partition answers itself",
        );
    }
    accepted(&pio(&format!("{{ base = {:#x}, size = 1 }}", port + 1)));
    accepted(&pio(&format!("{{ base = {:#x}, size = 1 }}", port - 1)));
}

#[test]
fn a_watchdog_is_between_a_second_and_an_hour() {
    let with = |w: &str| TPM.replacen("limits = {", &format!("watchdog = \"{w}\"\nlimits = {{"), 1);
    for (w, d) in [("1s", 1), ("90s", 90), ("1h", 3600)] {
        assert_eq!(
            accepted(&with(w)).service("tpm").unwrap().watchdog,
            Duration::from_secs(d)
        );
    }
    assert_eq!(
        accepted(TPM).service("tpm").unwrap().watchdog,
        DEFAULT_WATCHDOG
    );
    for bad in ["0s", "999ms", "61m", "2h", "soon"] {
        refused_at(
            &with(bad),
            7,
            &format!("watchdog \"{bad}\" is not a duration between 1s and 1h"),
        );
    }
}

#[test]
fn open_files_is_at_most_the_ceiling() {
    let with = |n: u64| TPM.replacen("open-files = 32", &format!("open-files = {n}"), 1);
    assert_eq!(
        accepted(&with(MAX_OPEN_FILES))
            .service("tpm")
            .unwrap()
            .limits
            .open_files,
        MAX_OPEN_FILES
    );
    for bad in [MAX_OPEN_FILES + 1, MAX_OPEN_FILES * 4] {
        refused_at(&with(bad), 7, &format!("open-files limit {bad} is absurd"));
    }
}

/// The 1-based line of the first line of `src` that holds `needle`.
fn line_of(src: &str, needle: &str) -> usize {
    1 + src
        .lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} is not in the manifest"))
}

/// The capability plan's slot count of `spec` with every declared listener, with or
/// without a guest partition.
fn capability_slots_with(spec: &ServiceSpec, services: &[ServiceSpec], guest: bool) -> usize {
    let i = services.iter().position(|s| std::ptr::eq(s, spec)).unwrap();
    let run = Run {
        guest_vcpus: guest.then_some(1),
        listening: None,
        taps: None,
    };
    CapabilityPlan::new(services, run).slots(i).len()
}

/// [`capability_slots_with`] a guest partition: what the validator bounds.
fn capability_slots(spec: &ServiceSpec, services: &[ServiceSpec]) -> usize {
    capability_slots_with(spec, services, true)
}

/// Each service's descriptor slots, counted by hand from the shipped manifest: 3 (status
/// page, seccomp program, control channel) + one per client link it serves + the
/// microkernel's attest and platform channels + the guest partition's channel (intercept,
/// or a device with ranges) + intercept's interrupt eventfds + calls, regions, files, keys,
/// the fd store and listeners.
#[test]
fn capability_slots_count_every_descriptor_a_service_holds() {
    let m = accepted(&shipped());
    let slots = |name: &str, guest: bool| {
        capability_slots_with(m.service(name).unwrap(), &m.services, guest)
    };
    // (name, with a guest, without one)
    let expected = [
        ("intercept", 3 + 1 + 1 + 3, 3 + 3), // guest channel, interrupt 4, 3 calls
        ("vmgs", 3 + 3 + 1 + 1, 3 + 3 + 1 + 1), // served to attest, vtpm and storage, a file, a key
        ("attest", 3 + 1 + 2 + 1 + 2, 3 + 1 + 2 + 1 + 2), // served to vtpm, microkernel and platform, a call, 2 files
        ("vtpm", 3 + 2 + 1 + 2 + 1, 3 + 2 + 2 + 1), // served to intercept and the gateway, mmio, 2 calls, a region
        ("tpm-gateway", 3 + 1 + 1 + 1 + 5, 3 + 1 + 1 + 1 + 5), // a call, a region, its fd store, 5 listeners
        (
            "storage",
            3 + 2 + 1 + 1 + 1 + 1 + 1 + 3 + 2,
            3 + 1 + 1 + 1 + 3 + 2,
        ), // served to intercept and the partition, line 10, guest memory, doorbells, a call, a region, 3 files, 2 listeners
    ];
    for (name, with_guest, without) in expected {
        assert_eq!(slots(name, true), with_guest, "{name} with a guest");
        assert_eq!(slots(name, false), without, "{name} without a guest");
        assert_eq!(
            capability_slots(m.service(name).unwrap(), &m.services),
            with_guest
        );
    }
    // A device reached through port ranges only, or through its PCI function only, has
    // the guest partition's channel too.
    let pio = TPM.replace(
        "mmio = [{ base = 0xfed40000, size = 0x5000 }]",
        "pio = [{ base = 0x2f8, size = 8 }]",
    );
    let pci = TPM.replace(
        "mmio = [{ base = 0xfed40000, size = 0x5000 }]",
        "pci-device = 3",
    );
    for src in [TPM.to_string(), pio, pci] {
        let m = accepted(&src);
        let tpm = m.service("tpm").unwrap();
        assert_eq!(
            capability_slots_with(tpm, &m.services, true),
            3 + 1 + 1,
            "{src}"
        );
        assert_eq!(
            capability_slots_with(tpm, &m.services, false),
            3 + 1,
            "{src}"
        );
    }
}

#[test]
fn guest_interrupts_are_intercepts_lines_and_those_its_callers_are_granted() {
    let m = accepted(&shipped());
    // Intercept's COM1, storage's own line for its NVMe function and net's for its
    // virtio-net function.
    assert_eq!(
        guest_interrupts(&m.services),
        [4, 10, 11].map(Interrupt::Line)
    );
    let src = shipped()
        .replacen(
            "calls = [{ endpoint = \"vmgs\", file-ids = [\"PV_STORAGE_KEYS\"] }]",
            "calls = [{ endpoint = \"vmgs\", file-ids = [\"PV_STORAGE_KEYS\"] }, { endpoint = \"intercept\", interrupts = [12, 5] }]",
            1,
        )
        .replacen(
            "serves = [\"net\"]",
            "serves = [\"net\"]\ncalls = [{ endpoint = \"intercept\", interrupts = [13] }]",
            1,
        );
    let m = accepted(&src);
    assert_eq!(
        guest_interrupts(&m.services),
        [4, 5, 10, 11, 12, 13].map(Interrupt::Line)
    );
}

#[test]
fn descriptors_and_capabilities_have_their_bounds() {
    let needed = |src: &str| {
        let m = accepted(src);
        BASE_DESCRIPTORS as usize + capability_slots(m.service("tpm").unwrap(), &m.services)
    };
    let n = needed(TPM);
    let with = |n: usize| TPM.replacen("open-files = 32", &format!("open-files = {n}"), 1);
    accepted(&with(n));
    refused_at(
        &with(n - 1),
        7,
        &format!("is below the {n} descriptors this service holds"),
    );

    // Regions until the bootstrap record is exactly full, then one more.
    let regions = |count: usize| {
        let list: Vec<String> = (0..count)
            .map(|i| format!("{{ name = \"r{i}\", size = \"4K\" }}"))
            .collect();
        TPM.replacen(
            "serves = [\"vtpm\"]",
            &format!("serves = [\"vtpm\"]\nregions = [{}]", list.join(", ")),
            1,
        )
        .replacen("open-files = 32", "open-files = 1000", 1)
    };
    let base = {
        let m = accepted(TPM);
        capability_slots(m.service("tpm").unwrap(), &m.services)
    };
    let full = MAX_CAPABILITIES - base;
    let m = accepted(&regions(full));
    assert_eq!(
        capability_slots(m.service("tpm").unwrap(), &m.services),
        MAX_CAPABILITIES
    );
    for over in [full + 1, full + 5] {
        refused_at(
            &regions(over),
            2,
            &format!("holds {} capabilities", MAX_CAPABILITIES + over - full),
        );
    }
}

#[test]
fn a_manifest_holds_at_most_max_services() {
    let with = |clients: usize| {
        let mut src = TPM.to_string();
        for i in 0..clients {
            src.push_str(&format!(
                "\n[[service]]\nname = \"c{i}\"\nbinary = \"pv-c\"\ncalls = [{{ endpoint = \"vtpm\", tpm = [\"platform\"] }}]\nlimits = {{ memory = \"64M\", open-files = 32 }}\nrestart = {{ policy = \"never\", max = 0, window = \"10s\", backoff = \"10ms\" }}\n"
            ));
        }
        src
    };
    // TPM has two services; the vTPM serves one link per client, so its own bootstrap
    // record overflows long before MAX_SERVICES: only the count's diagnostic is looked at.
    let count = |src: &str| -> Vec<Diagnostic> {
        match Manifest::parse(Path::new("m.toml"), src) {
            Ok(_) => Vec::new(),
            Err(e) => e
                .diagnostics()
                .iter()
                .filter(|d| d.message.contains("services"))
                .cloned()
                .collect(),
        }
    };
    assert!(count(&with(MAX_SERVICES - 2)).is_empty());
    for over in [MAX_SERVICES - 1, MAX_SERVICES + 3] {
        let d = count(&with(over));
        assert!(
            d.iter()
                .any(|d| d.message == format!("the manifest describes {} services", over + 2)),
            "{d:?}"
        );
    }
}

#[test]
fn files_other_than_guest_state_may_be_shared_and_paths_stay_inside_the_state_dir() {
    let shared = shipped().replace(
        "serves = [\"net\"]",
        "serves = [\"net\"]\nfiles = [{ name = \"certs\", path = \"platform-certs.pem\", access = \"read-only\" }]",
    );
    accepted(&shared);
    let with = |path: &str| {
        shipped().replace(
            "serves = [\"net\"]",
            &format!("serves = [\"net\"]\nfiles = [{{ name = \"f\", path = \"{path}\", access = \"read-only\" }}]"),
        )
    };
    for bad in ["", "/etc/shadow", "../x", "a/../../x", "./x"] {
        let src = with(bad);
        refused_at(&src, line_of(&src, "name = \"f\""), &format!("\"{bad}\""));
    }
    accepted(&with("sub/dir/x"));
}

#[test]
fn a_vmgs_ring_needs_room_for_its_chunks() {
    let src = |cap: u32| {
        let s = shipped();
        s.replace(
            "ring-capacity = \"64K\"",
            &format!("ring-capacity = \"{}K\"", cap >> 10),
        )
    };
    assert_eq!(accepted(&src(MIN_VMGS_RING)).ring_capacity, MIN_VMGS_RING);
    let small = src(MIN_VMGS_RING / 2);
    refused_at(
        &small,
        line_of(&small, "ring-capacity"),
        "too small for the vmgs endpoint",
    );
}

#[test]
fn a_sealed_key_is_the_key_of_its_own_guest_state_file() {
    let src = shipped().replace(
        "serves = [\"net\"]",
        "serves = [\"net\"]\nkeys = [{ name = \"datastore\", sealed = true }]",
    );
    refused_at(
        &src,
        line_of(&src, "serves = [\"net\"]") + 1,
        "sealed key \"datastore\" is not the key of a guest-state file of \"net\"",
    );
    let size = |size: &str| shipped().replace("size = \"4M\"", &format!("size = \"{size}\""));
    accepted(&size("16K"));
    for bad in ["1K", "8G", "4M1"] {
        let src = size(bad);
        refused_at(
            &src,
            line_of(&src, "guest.vmgs"),
            &format!("VMGS size \"{bad}\" is not usable"),
        );
    }
}

#[test]
fn a_key_release_id_is_64_hex_digits() {
    let with = |id: &str| {
        shipped().replace(
            "sealing = \"measurement\"",
            &format!("sealing = \"measurement\"\nkey-release = \"127.0.0.1:8700\"\nkey-release-id = \"{id}\""),
        )
    };
    let good = "0123456789abcdefABCDEF0123456789abcdef0123456789abcdef0123456789";
    assert_eq!(
        accepted(&with(good)).attest.key_release_id.as_deref(),
        Some(good.to_ascii_lowercase().as_str())
    );
    for bad in [
        &good[1..],
        &format!("{good}0"),
        &good.replace('0', "g"),
        "0123",
    ] {
        let src = with(bad);
        refused_at(
            &src,
            line_of(&src, "key-release-id"),
            "key-release-id is not a key id",
        );
    }
}

#[test]
fn a_shared_uid_needs_both_services_to_say_so() {
    let with = |a: &str, b: &str| {
        TPM.replacen(
            "serves = [\"vtpm\"]",
            &format!("serves = [\"vtpm\"]\nuser = {a}"),
            1,
        )
        .replacen("calls = [", &format!("user = {b}\ncalls = ["), 1)
    };
    accepted(&with(
        "{ uid = 61000, shared = true }",
        "{ uid = 61000, shared = true }",
    ));
    for (a, b) in [
        ("{ uid = 61000, shared = true }", "{ uid = 61000 }"),
        ("{ uid = 61000 }", "{ uid = 61000, shared = true }"),
        ("{ uid = 61000 }", "{ uid = 61000 }"),
    ] {
        refused_at(&with(a, b), 14, "has uid 61000, as \"tpm\" (line 6) has");
    }
}

#[test]
fn restart_rules() {
    let with = |r: &str| {
        TPM.replacen(
            "restart = { policy = \"always\", max = 3, window = \"10s\", backoff = \"10ms\" }",
            &format!("restart = {{ {r} }}"),
            1,
        )
    };
    accepted(&with(
        "policy = \"never\", max = 0, window = \"10s\", backoff = \"10ms\"",
    ));
    for policy in ["always", "on-failure"] {
        refused_at(
            &with(&format!(
                "policy = \"{policy}\", max = 0, window = \"10s\", backoff = \"10ms\""
            )),
            8,
            "with max = 0 never restarts",
        );
    }
    // A ceiling equal to the back-off is a constant back-off.
    let m = accepted(&with(
        "policy = \"always\", max = 3, window = \"10s\", backoff = \"20ms\", max-backoff = \"20ms\"",
    ));
    assert_eq!(
        m.service("tpm").unwrap().restart.delay(5),
        Duration::from_millis(20)
    );
}

#[test]
fn adjacent_device_ranges_do_not_overlap() {
    let with = |a: &str, b: &str| {
        TPM.replace(
            "mmio = [{ base = 0xfed40000, size = 0x5000 }]",
            &format!("mmio = [{a}, {b}]"),
        )
    };
    let low = "{ base = 0x1000, size = 0x1000 }";
    let high = "{ base = 0x2000, size = 0x1000 }";
    accepted(&with(low, high));
    accepted(&with(high, low));
    let across = "{ base = 0x1fff, size = 2 }";
    refused_at(&with(low, across), 6, "overlaps");
    refused_at(&with(across, low), 6, "overlaps");
    refused_at(&with(high, across), 6, "overlaps");
}

#[test]
fn good_manifest_parses() {
    let m = Manifest::parse(Path::new("m.toml"), GOOD).unwrap();
    assert_eq!(m.services.len(), 2);
    assert_eq!(m.server_of(Interface::Vmgs).unwrap().name, "a");
    assert_eq!(m.services[1].restart.backoff, Duration::from_millis(10));
    assert_eq!(m.services[1].restart.max_backoff, DEFAULT_MAX_BACKOFF);
}

#[test]
fn the_back_off_doubles_up_to_its_ceiling() {
    let src = GOOD.replacen(
        "backoff = \"10ms\" }",
        "backoff = \"10ms\", max-backoff = \"50ms\" }",
        1,
    );
    let m = Manifest::parse(Path::new("m.toml"), &src).unwrap();
    let r = &m.services[0].restart;
    let delays: Vec<u64> = (0..8).map(|n| r.delay(n).as_millis() as u64).collect();
    assert_eq!(delays, [0, 10, 20, 40, 50, 50, 50, 50]);
    // Without one, the ceiling is a second (or the back-off itself, if longer).
    let m = Manifest::parse(Path::new("m.toml"), GOOD).unwrap();
    assert_eq!(m.services[0].restart.delay(30), DEFAULT_MAX_BACKOFF);
    let slow = GOOD.replacen("backoff = \"10ms\"", "backoff = \"5s\"", 1);
    let m = Manifest::parse(Path::new("m.toml"), &slow).unwrap();
    assert_eq!(m.services[0].restart.max_backoff, Duration::from_secs(5));
}

#[test]
fn a_ceiling_below_the_back_off_is_refused_where_it_is_written() {
    let src = GOOD.replacen(
        "backoff = \"10ms\" }",
        "backoff = \"10ms\", max-backoff = \"5ms\" }",
        1,
    );
    let d = errors(&src);
    assert!(
        d.iter()
            .any(|d| d.line == 7 && d.message.contains("max-backoff 5ms is below backoff 10ms")),
        "{d:?}"
    );
}

#[test]
fn line_and_column_point_at_the_value() {
    let src = GOOD.replace("serves = [\"vmgs\"]", "serves = [\"vmgz\"]");
    let d = errors(&src);
    assert!(
        d.iter().any(|d| d.line == 5
            && d.column == 11
            && d.message.contains("unknown endpoint \"vmgz\"")),
        "{d:?}"
    );
}

/// `fd-store = { max = N }`: 1 to MAX_KEPT descriptors, a typo in the table is an error, and
/// the open-files limit leaves room for every descriptor a restart hands back.
#[test]
fn an_fd_store_keeps_a_bounded_number_of_descriptors_within_the_open_files_limit() {
    use ipc_defs::fd_store::MAX_KEPT;
    // The gateway's table with `store` (its line 14) and `open-files = n` (line 16).
    let with_limit = |store: &str, n: usize| {
        let src = TPM.replacen("listen = [", &format!("{store}\nlisten = ["), 1);
        let at = src.rfind("open-files = 32").unwrap();
        format!(
            "{}open-files = {n}{}",
            &src[..at],
            &src[at + "open-files = 32".len()..]
        )
    };
    let with = |store: &str| with_limit(store, 64);
    let m = accepted(&with("fd-store = { max = 4 }"));
    assert_eq!(
        m.service("gw").unwrap().fd_store,
        Some(FdStoreGrant { max: 4 })
    );
    assert_eq!(m.service("tpm").unwrap().fd_store, None);
    accepted(&with(&format!("fd-store = {{ max = {MAX_KEPT} }}")));
    for bad in ["0", "-1", &(MAX_KEPT + 1).to_string(), "4294967296"] {
        refused_at(
            &with(&format!("fd-store = {{ max = {bad} }}")),
            14,
            &format!("fd-store max {bad} is out of range"),
        );
    }
    assert!(!errors(&with("fd-store = { max = 4, keep = 2 }")).is_empty());
    assert!(!errors(&with("fd-store = 4")).is_empty());

    // Every kept descriptor comes back at a restart: the limit must hold them all.
    let m = accepted(&with("fd-store = { max = 20 }"));
    let gw = m.service("gw").unwrap();
    let needed = BASE_DESCRIPTORS as usize + capability_slots(gw, &m.services) + 20;
    accepted(&with_limit("fd-store = { max = 20 }", needed));
    refused_at(
        &with_limit("fd-store = { max = 20 }", needed - 1),
        16,
        &format!("is below the {needed} descriptors this service holds"),
    );
}
