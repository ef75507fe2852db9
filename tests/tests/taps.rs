//! The TAP capability end to end: `paravisor run --tap NAME=IFNAME@NETNS` attaches a TAP inside
//! a network namespace the test makes, hands its descriptor to the service that the manifest
//! lets hold it, and frames cross both ways through it while the service can do nothing else
//! with the network (no socket, no ioctl). The service is `pv-hostile tap-responder`: it
//! answers ARP and logs UDP datagrams with read, write and poll on its descriptor only.
//!
//! Each test makes its own namespace (`ip netns add`, removed on drop) and only addresses
//! inside it; they need root and `ip`, and say SKIPPED otherwise.

mod common;

use std::process::Command;
use std::time::Duration;
use std::time::Instant;

use common::netns::taps_available;
use common::netns::Netns;
use common::sandbox_available;
use common::service;
use common::text;
use common::Instance;
use common::RESTART_ALWAYS;
use common::RESTART_NEVER;

/// The service's side of the link.
const SERVICE_IP: &str = "10.77.0.2";
const SERVICE_MAC: &str = "02:00:00:77:00:02";
/// The host's side, inside the test's namespace.
const HOST_CIDR: &str = "10.77.0.1/24";
/// The longest any awaited event may take before the test gives up (a backstop for a hung
/// run, never a measure: every wait ends on the event itself).
const BACKSTOP: Duration = Duration::from_secs(60);

/// Sends one UDP datagram holding `payload` to the service's port 9, from inside the
/// namespace (bash's /dev/udp: no tool beyond bash and ip is needed).
fn send_udp(ns: &Netns, payload: &str) {
    let out = ns.bash(&format!("echo -n {payload} > /dev/udp/{SERVICE_IP}/9"));
    assert!(out.status.success(), "{}", text(&out));
}

/// A manifest of one service, `nic`, that serves net and holds TAP net0, running
/// `pv-hostile ARGS`.
fn nic(args: &str, restart: &str) -> String {
    service(
        "nic",
        "pv-hostile",
        &format!("serves = [\"net\"]\ntaps = [{{ name = \"net0\" }}]\nargs = [{args}]\n{restart}"),
    )
}

fn responder(restart: &str) -> String {
    nic(
        &format!("\"tap-responder\", \"net0\", \"{SERVICE_IP}\", \"{SERVICE_MAC}\""),
        restart,
    )
}

/// Waits until the instance's log holds `needle` at least `count` times.
fn wait_for_log(inst: &Instance, needle: &str, count: usize) {
    let deadline = Instant::now() + BACKSTOP;
    while inst.log().matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "no {count}x {needle:?} in the log:\n{}",
            inst.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `cond` holds of the namespace.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + BACKSTOP;
    while !cond() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The interface's index in the namespace (a new TAP would have a new one).
fn ifindex(ns: &Netns, interface: &str) -> String {
    let line = ns.ip_ok(&["-o", "link", "show", interface]);
    line.split(':')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn frames_cross_a_tap_in_a_namespace_both_ways_and_the_link_stays_up_across_restarts() {
    let test = "frames_cross_a_tap_in_a_namespace_both_ways_and_the_link_stays_up_across_restarts";
    if !taps_available(test) {
        return;
    }
    let ns = Netns::new("frames");
    let tap = format!("net0=pvtap0@{}", ns.name);
    let mut inst = Instance::start_with("tap", &responder(RESTART_ALWAYS), 1, &["--tap", &tap]);
    wait_for_log(&inst, "tap net0: ready", 1);
    assert!(inst.log().contains("made for this run"), "{}", inst.log());

    // The TAP is in the test's namespace, not in the paravisor's own.
    ns.ip_ok(&["link", "show", "pvtap0"]);
    let root = Command::new("ip")
        .args(["link", "show", "pvtap0"])
        .output()
        .expect("ip");
    assert!(
        !root.status.success(),
        "pvtap0 is visible in the root namespace"
    );
    // The service holds it as the plan says (its descriptor, /dev/net/tun, and nothing else).
    let audit = inst.pv(&["audit", "--live"]);
    assert!(audit.status.success(), "{}", text(&audit));

    // The host's side: an address and the link up (the host's job, not the paravisor's).
    ns.ip_ok(&["addr", "add", HOST_CIDR, "dev", "pvtap0"]);
    ns.ip_ok(&["link", "set", "pvtap0", "up"]);
    send_udp(&ns, "hello-from-host");
    // Host -> service: the ARP request and then the datagram reach the service...
    wait_for_log(&inst, "UDP from 10.77.0.1", 1);
    assert!(
        inst.log().contains("answered ARP request from 10.77.0.1"),
        "{}",
        inst.log()
    );
    assert!(
        inst.log().contains("to port 9: \"hello-from-host\""),
        "{}",
        inst.log()
    );
    // ... and service -> host: the kernel took the service's ARP answer.
    let neighbour = ns.ip_ok(&["neigh", "show", SERVICE_IP]);
    assert!(neighbour.contains(SERVICE_MAC), "{neighbour}");

    // kill -9: the microkernel keeps the TAP, so the host's link never goes down and the
    // restarted service gets the same interface.
    let index = ifindex(&ns, "pvtap0");
    let carrier_changes = ns.counter("pvtap0", "carrier_changes");
    let old_pid = inst.pid("nic");
    let out = inst.pv(&["kill", "nic", "--signal", "KILL"]);
    assert!(out.status.success(), "{}", text(&out));
    inst.wait_until(BACKSTOP, |rows| {
        rows.iter().any(|r| {
            r["name"] == "nic"
                && r["state"] == "running"
                && r["pid"].as_i64() != Some(old_pid as i64)
        })
    });
    wait_for_log(&inst, "tap net0: ready", 2);
    assert_eq!(
        ifindex(&ns, "pvtap0"),
        index,
        "a new interface after the restart"
    );
    assert_eq!(
        ns.counter("pvtap0", "carrier_changes"),
        carrier_changes,
        "the link went down with the service"
    );
    ns.ip_ok(&["neigh", "flush", "dev", "pvtap0"]);
    send_udp(&ns, "again");
    wait_for_log(&inst, "to port 9: \"again\"", 1);
    wait_for("the restarted service's ARP answer", || {
        ns.ip_ok(&["neigh", "show", SERVICE_IP])
            .contains(SERVICE_MAC)
    });
    assert_eq!(
        inst.log().matches("answered ARP request").count(),
        2,
        "{}",
        inst.log()
    );

    // A TAP made for the run goes with it.
    let status = inst.stop();
    assert!(status.success(), "{status}:\n{}", inst.log());
    assert!(
        !ns.ip(&["link", "show", "pvtap0"]).status.success(),
        "pvtap0 outlived the run"
    );
}

#[test]
fn a_persistent_tap_is_attached_and_outlives_the_run() {
    let test = "a_persistent_tap_is_attached_and_outlives_the_run";
    if !taps_available(test) {
        return;
    }
    let ns = Netns::new("persist");
    ns.ip_ok(&["tuntap", "add", "dev", "pvtap1", "mode", "tap"]);
    let index = ifindex(&ns, "pvtap1");
    let tap = format!("net0=pvtap1@{}", ns.name);
    let mut inst = Instance::start_with("tapp", &responder(RESTART_NEVER), 1, &["--tap", &tap]);
    wait_for_log(&inst, "tap net0: ready", 1);
    assert!(inst.log().contains("a persistent TAP"), "{}", inst.log());
    assert_eq!(ifindex(&ns, "pvtap1"), index, "not the TAP the host made");
    let status = inst.stop();
    assert!(status.success(), "{status}:\n{}", inst.log());
    assert_eq!(
        ifindex(&ns, "pvtap1"),
        index,
        "the persistent TAP went with the run"
    );
}

#[test]
fn without_a_tap_named_the_service_has_none_and_no_interface_is_made() {
    let test = "without_a_tap_named_the_service_has_none_and_no_interface_is_made";
    if !taps_available(test) {
        return;
    }
    let before = text(
        &Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip"),
    );
    let inst = Instance::start("tapnone", &responder(RESTART_NEVER), 1);
    wait_for_log(&inst, "tap net0: no TAP (the host named none)", 1);
    let after = text(
        &Command::new("ip")
            .args(["-o", "link"])
            .output()
            .expect("ip"),
    );
    let names = |t: &str| -> Vec<String> {
        t.lines()
            .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().to_string()))
            .collect()
    };
    assert_eq!(
        names(&before),
        names(&after),
        "a plain run made an interface"
    );
    assert_eq!(inst.row("nic")["state"], "running");
}

#[test]
fn a_tap_holder_is_killed_for_a_socket_or_an_ioctl() {
    let test = "a_tap_holder_is_killed_for_a_socket_or_an_ioctl";
    if !taps_available(test) {
        return;
    }
    let ns = Netns::new("probe");
    for (args, syscall) in [
        ("\"socket\"", "socket"),
        ("\"tap-ioctl\", \"net0\"", "ioctl"),
    ] {
        let tap = format!("net0=pvtap2@{}", ns.name);
        let inst = Instance::start_with("tapprobe", &nic(args, RESTART_NEVER), 0, &["--tap", &tap]);
        inst.wait_until(BACKSTOP, |rows| {
            rows.iter()
                .any(|r| r["name"] == "nic" && r["state"] == "failed")
        });
        let exit = inst.row("nic")["last_exit"].to_string();
        assert!(
            exit.contains("policy violation") && exit.contains(syscall),
            "{args}: {exit}\n{}",
            inst.log()
        );
        if syscall == "ioctl" {
            assert!(
                inst.log()
                    .contains("pv-hostile: TUNSETOFFLOAD on TAP net0 allowed"),
                "{}",
                inst.log()
            );
        }
    }
}

#[test]
fn a_tap_the_host_cannot_provide_stops_the_run_with_what_to_do() {
    let test = "a_tap_the_host_cannot_provide_stops_the_run_with_what_to_do";
    if !sandbox_available(test) {
        return;
    }
    let dir = common::scratch_dir("tapbad");
    let manifest = dir.join("m.toml");
    std::fs::write(&manifest, responder(RESTART_NEVER)).unwrap();
    let missing = format!("pv-missing-{}", std::process::id());
    for (tap, needle) in [
        (
            format!("net0=pvtap3@{missing}"),
            format!("make it with `ip netns add {missing}`"),
        ),
        (
            "net7=pvtap3".to_string(),
            "the manifest declares: net0".to_string(),
        ),
        ("net0".to_string(), "say which host interface".to_string()),
    ] {
        let mut child = common::spawn_of(
            Command::new(common::paravisor())
                .args(["run", "--no-guest"])
                .arg(&manifest)
                .arg("--state-dir")
                .arg(dir.join("state"))
                .args(["--tap", &tap])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped()),
        );
        // A run that took the TAP would run on: it is stopped, and the case fails.
        let deadline = Instant::now() + BACKSTOP;
        while child.try_wait().expect("wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("output");
        assert!(!out.status.success(), "--tap {tap} was accepted");
        assert!(text(&out).contains(&needle), "--tap {tap}: {}", text(&out));
    }
    let _ = std::fs::remove_dir_all(dir);
}
