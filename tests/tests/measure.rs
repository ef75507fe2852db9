//! The measured launch: `paravisor measure` gives a verifier the reference value that
//! `paravisor run` reports, and any change to what runs changes it.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn measurement(paravisor: &Path, args: &[&str]) -> serde_json::Value {
    let out = output_of(
        Command::new(paravisor)
            .arg("measure")
            .arg(shipped_manifest())
            .args(args)
            .arg("--json"),
    );
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn measure_lists_every_item_in_order_and_is_reproducible() {
    let a = measurement(&paravisor(), &[]);
    let b = measurement(&paravisor(), &[]);
    assert_eq!(a["measurement"], b["measurement"]);
    assert_eq!(a["measurement"].as_str().unwrap().len(), 96);
    let kinds: Vec<&str> = a["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    // The microkernel first, then the manifest, the services, the shared code they map.
    assert_eq!(&kinds[..2], &["microkernel", "manifest"]);
    assert_eq!(kinds.iter().filter(|k| **k == "service").count(), 7);
    let names: Vec<&str> = a["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "library")
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for lib in [
        "ld-linux-x86-64.so.2",
        "libc.so.6",
        "libtpms.so.0",
        "libcrypto.so.3",
    ] {
        assert!(names.contains(&lib), "{lib} not measured: {names:?}");
    }
    assert_eq!(
        &kinds[kinds.len() - 3..],
        &["guest-image", "command-line", "vcpu-state"]
    );
    // The guest's command line is part of it; without a guest there is no guest part.
    let other = measurement(&paravisor(), &["--cmdline", "extends=9"]);
    assert_ne!(a["measurement"], other["measurement"]);
    let none = measurement(&paravisor(), &["--no-guest"]);
    assert_eq!(
        none["entries"].as_array().unwrap().len(),
        a["entries"].as_array().unwrap().len() - 3
    );
}

/// A copy of the installation (paravisor and every service binary) in a new directory.
fn installation_copy(tag: &str) -> std::path::PathBuf {
    let dir = scratch_dir(tag);
    for entry in std::fs::read_dir(bin_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name == "paravisor" || (name.starts_with("pv-") && !name.ends_with(".d")) {
            std::fs::copy(&path, dir.join(&name)).unwrap();
        }
    }
    dir
}

/// The names of the entries whose hashes differ between two logs of the same shape.
fn differing(before: &serde_json::Value, after: &serde_json::Value) -> Vec<String> {
    let (b, a) = (
        before["entries"].as_array().unwrap(),
        after["entries"].as_array().unwrap(),
    );
    assert_eq!(b.len(), a.len());
    b.iter()
        .zip(a)
        .filter(|(x, y)| x["sha384"] != y["sha384"])
        .map(|(x, _)| x["name"].as_str().unwrap().to_string())
        .collect()
}

/// Flips the last bit of a file (an ELF file still runs).
fn flip_last_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_changed_service_binary_changes_the_measurement() {
    // A copy of the installation whose pv-net differs by one byte.
    let dir = installation_copy("measure-copy");
    let copy = dir.join("paravisor");
    let before = measurement(&copy, &[]);
    assert_eq!(
        before["measurement"],
        measurement(&paravisor(), &[])["measurement"]
    );
    flip_last_byte(&dir.join("pv-net"));
    let after = measurement(&copy, &[]);
    assert_ne!(before["measurement"], after["measurement"]);
    // Only the net entry's hash differs in the log.
    assert_eq!(differing(&before, &after), vec!["net (pv-net)".to_string()]);
    let _ = std::fs::remove_dir_all(dir);
}

/// The microkernel's own image is the first entry: a paravisor changed by one byte (the red
/// team's added line) measures differently, and only its entry differs.
#[test]
fn a_changed_microkernel_changes_the_measurement() {
    let dir = installation_copy("measure-mk");
    let copy = dir.join("paravisor");
    let before = measurement(&copy, &[]);
    assert_eq!(before["entries"][0]["kind"], "microkernel");
    flip_last_byte(&copy);
    let after = measurement(&copy, &[]);
    assert_ne!(before["measurement"], after["measurement"]);
    assert_eq!(differing(&before, &after), vec!["paravisor".to_string()]);
    let _ = std::fs::remove_dir_all(dir);
}

/// The red team's attack: libtpms replaced under /usr/lib in a private mount namespace ran its
/// own code inside pv-vtpm with the launch measurement unchanged. Every library a service maps
/// is measured now (and the sandbox holds only those copies): the replacement changes the
/// measurement, and the log names the library.
#[test]
fn a_library_replaced_in_a_private_mount_namespace_changes_the_measurement() {
    if !sandbox_available("a_library_replaced_in_a_private_mount_namespace") {
        return;
    }
    let dir = scratch_dir("measure-lib");
    let real = std::fs::canonicalize("/usr/lib/x86_64-linux-gnu/libtpms.so.0").unwrap();
    let fake = dir.join("libtpms-forwarding.so");
    std::fs::copy(&real, &fake).unwrap();
    flip_last_byte(&fake);
    let before = measurement(&paravisor(), &[]);
    let out = Command::new("unshare")
        .arg("-m")
        .arg("sh")
        .arg("-c")
        .arg(format!(
            "mount --make-rprivate / && mount --bind '{}' '{}' && exec '{}' measure '{}' --json",
            fake.display(),
            real.display(),
            paravisor().display(),
            shipped_manifest().display()
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let after: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(before["measurement"], after["measurement"]);
    assert_eq!(differing(&before, &after), vec!["libtpms.so.0".to_string()]);
    let _ = std::fs::remove_dir_all(dir);
}

/// `LD_PRELOAD` on paravisor ran the red team's code in the microkernel: such variables are
/// refused, by name, before anything is measured or started.
#[test]
fn a_preloaded_library_is_refused() {
    for (var, value) in [
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libz.so.1"),
        ("LD_AUDIT", "/nonexistent/audit.so"),
        ("GLIBC_TUNABLES", "glibc.malloc.check=3"),
    ] {
        for command in ["measure", "run"] {
            let out = Command::new(paravisor())
                .arg(command)
                .arg(shipped_manifest())
                .arg("--no-guest")
                .env(var, value)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{var} {command}: {}", text(&out));
            let said = text(&out);
            assert!(
                said.contains("refusing") && said.contains(var),
                "{var} {command}: {said}"
            );
        }
    }
}

/// A library found through `LD_LIBRARY_PATH` instead of the system directories is code the
/// measurement would not cover: the microkernel sees that it maps it and refuses, naming it.
#[test]
fn a_library_found_through_ld_library_path_is_refused() {
    let dir = scratch_dir("measure-ldpath");
    let real = std::fs::canonicalize("/usr/lib/x86_64-linux-gnu/libgcc_s.so.1").unwrap();
    let other = dir.join("libgcc_s.so.1");
    std::fs::copy(&real, &other).unwrap();
    flip_last_byte(&other);
    let out = Command::new(paravisor())
        .arg("measure")
        .arg(shipped_manifest())
        .env("LD_LIBRARY_PATH", &dir)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains(other.to_str().unwrap()) && said.contains("not its measured"),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The measurement is a function of what runs, not of where it is installed or how its
/// paths are spelled: the same release measured from another directory, through a relative,
/// a `./` or an absolute manifest path, and with the guest file named differently, measures
/// the same (the paths are kept in the log, outside what is measured).
#[test]
fn paths_and_working_directory_do_not_change_the_measurement() {
    let dir = scratch_dir("measure-paths");
    let install = dir.join("release");
    std::fs::create_dir_all(&install).unwrap();
    for entry in std::fs::read_dir(bin_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name == "paravisor" || (name.starts_with("pv-") && !name.ends_with(".d")) {
            std::fs::copy(&path, install.join(&name)).unwrap();
        }
    }
    std::fs::copy(shipped_manifest(), install.join("manifest.toml")).unwrap();
    let guest = dir.join("kernel-a");
    std::fs::write(&guest, b"not really a kernel, but measured all the same").unwrap();
    std::fs::copy(&guest, install.join("other-name")).unwrap();
    let measure = |cwd: &Path, exe: &Path, args: &[&str]| -> serde_json::Value {
        let out = output_of(
            Command::new(exe)
                .current_dir(cwd)
                .arg("measure")
                .args(args)
                .arg("--json"),
        );
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let abs = install.join("manifest.toml");
    let abs = abs.to_str().unwrap();
    let exe = install.join("paravisor");
    let reference = measure(&install, &exe, &[]);
    for (cwd, args) in [
        (&install, vec!["manifest.toml"]),
        (&install, vec!["./manifest.toml"]),
        (&install, vec![abs]),
        (&dir, vec!["release/manifest.toml"]),
        (&dir, vec![abs]),
    ] {
        let m = measure(cwd, &exe, &args);
        assert_eq!(
            m["measurement"], reference["measurement"],
            "{args:?} in {cwd:?}"
        );
    }
    // The same through the installation's own copy of the shipped binaries elsewhere.
    assert_eq!(
        measure(&dir, &paravisor(), &[abs])["measurement"],
        reference["measurement"]
    );
    // A guest file: its contents count, not its name or location; the path is still logged.
    let a = measure(&dir, &exe, &[abs, "--kernel", "kernel-a"]);
    let b = measure(
        &install,
        &exe,
        &["manifest.toml", "--kernel", "./other-name"],
    );
    assert_eq!(a["measurement"], b["measurement"]);
    let logged: Vec<&str> = b["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert!(logged.contains(&"./other-name"), "{logged:?}");
    assert!(logged.contains(&"manifest.toml"), "{logged:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn run_records_the_launch_log_that_measure_predicts() {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!(
            "SKIPPED: no /dev/kvm: run_records_the_launch_log_that_measure_predicts needs a guest"
        );
        return;
    }
    let dir = scratch_dir("measure-run");
    let manifest = dir.join("manifest.toml");
    std::fs::write(&manifest, shipped_text()).unwrap();
    let out = Command::new(paravisor())
        .arg("run")
        .arg(&manifest)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["--cmdline", "tpm=0 interrupt=0 unowned=0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let recorded: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state/launch-log.json")).unwrap()).unwrap();
    let predicted = Command::new(paravisor())
        .arg("measure")
        .arg(&manifest)
        .args(["--cmdline", "tpm=0 interrupt=0 unowned=0", "--json"])
        .output()
        .unwrap();
    let predicted: serde_json::Value = serde_json::from_slice(&predicted.stdout).unwrap();
    assert_eq!(recorded["measurement"], predicted["measurement"]);
    assert!(text(&out).contains(recorded["measurement"].as_str().unwrap()));
    let _ = std::fs::remove_dir_all(dir);
}

/// `paravisor audit` says what is measured and what the host chooses, and the canonical
/// configuration it describes is the one the launch log's manifest entry measures.
#[test]
fn audit_says_which_settings_are_measured_and_which_the_host_chooses() {
    let out = pv(&["audit", "--json", shipped_manifest().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let c = &audit["configuration"];
    let measured: Vec<&str> = c["measured"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(
        measured.contains(&"services") && measured.contains(&"attest"),
        "{measured:?}"
    );
    assert!(!measured.contains(&"state_dir"), "{measured:?}");
    let host: Vec<&str> = c["host_settings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["key"].as_str().unwrap())
        .collect();
    for key in [
        "state-dir",
        "platform-dir",
        "key-release",
        "listen",
        "log-format",
        "log-file",
    ] {
        assert!(host.contains(&key), "{key} not among {host:?}");
    }
    let log = measurement(&paravisor(), &["--no-guest"]);
    let entry = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "manifest")
        .unwrap();
    assert_eq!(entry["sha384"], c["measured_sha384"]);
    assert_eq!(entry["length"], c["measured_bytes"]);
    assert_eq!(log["config"]["format"], "pv-measured-config-1");
    let out = pv(&["audit", shipped_manifest().to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("host settings (not measured"), "{text}");
}
