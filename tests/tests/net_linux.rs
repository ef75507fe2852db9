//! An unmodified Linux (Debian's cloud kernel, its stock virtio_net driver, busybox `ip` and
//! `ping`) under QEMU on our net service: a vhost-user-net NIC whose host side is pv-net's
//! in-service responder (the shipped manifest's `--address 10.0.2.2`), so no host network
//! set-up is needed.

mod common;

use std::time::Duration;

use common::linux;

/// The listener the shipped manifest's net service serves, asked for.
const LISTEN: &[&str] = &["--listen", "vhost-user-net"];

/// Boots Linux with our NIC on `socket`, gives eth0 `cidr` and pings `peer` ten times: all
/// must be answered. The guest's exit (its console holds the NIC's line, the pings and the
/// ARP table).
fn ping_ten_times(
    image: &linux::Image,
    socket: &std::path::Path,
    cidr: &str,
    peer: &str,
    inst: &common::Instance,
) -> linux::GuestExit {
    let script = format!(
        r#"
set -e
n=300
while ! ip link show eth0 >/dev/null 2>&1 && [ "$n" -gt 0 ]; do usleep 100000; n=$((n - 1)); done
ip link set eth0 up
ip addr add {cidr} dev eth0
echo "NIC: $(cat /sys/class/net/eth0/address) mtu $(cat /sys/class/net/eth0/mtu) carrier $(cat /sys/class/net/eth0/carrier)"
ping -c 10 -W 10 {peer} > /tmp/ping || true
cat /tmp/ping
grep -q '10 packets transmitted, 10 packets received, 0% packet loss' /tmp/ping
cat /proc/net/arp
echo PING-OK
"#
    );
    let exit = linux::Guest::new(image)
        .vhost_user_net(socket, false)
        .script(&script)
        // Only to end a hung guest: the boot takes seconds, the pings ten.
        .timeout(Duration::from_secs(300))
        .run();
    assert_eq!(
        exit.status,
        0,
        "guest failed:\n{}\n{}",
        exit.console,
        inst.log()
    );
    assert!(exit.console.contains("PING-OK"), "{}", exit.console);
    exit
}

#[test]
fn linux_on_our_vhost_user_net_pings_the_responder_ten_times_without_loss() {
    let test = "linux_on_our_vhost_user_net_pings_the_responder_ten_times_without_loss";
    if !common::sandbox_available(test) {
        return;
    }
    let Some(image) = linux::image(test) else {
        return;
    };
    let inst = common::Instance::start_with("net-linux", &common::shipped_text(), 7, LISTEN);
    let socket = inst.dir.join("state/net/vhost-user-net.sock");
    let exit = ping_ten_times(&image, &socket, "10.0.2.15/24", "10.0.2.2", &inst);
    assert!(
        exit.console.contains("52:54:00:12:35:02"),
        "the responder's MAC answered ARP:\n{}",
        exit.console
    );
}

/// The same NIC with its frames on a TAP in a network namespace the test makes (the host side
/// at 10.78.0.1 inside it, nothing addressed outside it): Linux pings the host side of the TAP,
/// which the host's own stack answers.
#[test]
fn linux_on_our_vhost_user_net_pings_the_host_side_of_its_tap() {
    let test = "linux_on_our_vhost_user_net_pings_the_host_side_of_its_tap";
    if !common::netns::taps_available(test) {
        return;
    }
    let Some(image) = linux::image(test) else {
        return;
    };
    let ns = common::netns::Netns::new("net-linux");
    let tap = format!("net0=pvtap0@{}", ns.name);
    let args = ["--listen", "vhost-user-net", "--tap", &tap];
    let inst = common::Instance::start_with("net-linux-tap", &common::shipped_text(), 7, &args);
    ns.ip_ok(&["addr", "add", "10.78.0.1/24", "dev", "pvtap0"]);
    ns.ip_ok(&["link", "set", "pvtap0", "up"]);
    let socket = inst.dir.join("state/net/vhost-user-net.sock");
    ping_ten_times(&image, &socket, "10.78.0.15/24", "10.78.0.1", &inst);
    // The host side saw the guest: its neighbour table holds the guest's address.
    let neighbours = ns.ip_ok(&["neigh", "show", "dev", "pvtap0"]);
    assert!(neighbours.contains("10.78.0.15"), "{neighbours}");
}

/// kill -9 of pv-net under a running guest (QEMU reconnects, `reconnect=1`): the guest's link
/// never goes down (`carrier_changes` unchanged: the harness turns QEMU's link status off),
/// and pings are answered again by the restarted service.
#[test]
fn a_killed_net_service_comes_back_without_a_link_flap_for_the_guest() {
    let test = "a_killed_net_service_comes_back_without_a_link_flap_for_the_guest";
    if !common::sandbox_available(test) {
        return;
    }
    let Some(image) = linux::image(test) else {
        return;
    };
    let inst = common::Instance::start_with("net-linux-kill", &common::shipped_text(), 7, LISTEN);
    let socket = inst.dir.join("state/net/vhost-user-net.sock");
    let script = r#"
n=300
while ! ip link show eth0 >/dev/null 2>&1 && [ "$n" -gt 0 ]; do usleep 100000; n=$((n - 1)); done
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ping -c 2 -W 10 10.0.2.2
echo "BEFORE changes=$(cat /sys/class/net/eth0/carrier_changes)"
read go
n=120
until ping -c 1 -W 5 10.0.2.2 >/dev/null 2>&1 || [ "$n" -eq 0 ]; do n=$((n - 1)); done
ping -c 5 -W 10 10.0.2.2
echo "AFTER changes=$(cat /sys/class/net/eth0/carrier_changes) carrier=$(cat /sys/class/net/eth0/carrier)"
"#;
    let mut guest = linux::Guest::new(&image)
        .vhost_user_net(&socket, true)
        .script(script)
        .timeout(Duration::from_secs(600))
        .spawn();
    let before = guest.wait_for_line("BEFORE changes=", Duration::from_secs(300));
    let old_pid = inst.row("net")["pid"].clone();
    let out = inst.pv(&["kill", "net", "--signal", "KILL"]);
    assert!(out.status.success(), "{}", common::text(&out));
    // The new process runs before the guest looks again.
    let until = std::time::Instant::now() + Duration::from_secs(120);
    while !(inst.row("net")["state"] == "running" && inst.row("net")["pid"] != old_pid) {
        assert!(
            std::time::Instant::now() < until,
            "net did not come back:\n{}",
            inst.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    guest.send_line("go");
    let after = guest.wait_for_line("AFTER changes=", Duration::from_secs(300));
    let exit = guest.wait();
    let changes = |line: &str| -> String {
        line.split("changes=")
            .nth(1)
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(
        changes(&before),
        changes(&after),
        "a link flap:\n{}",
        exit.console
    );
    assert!(after.contains("carrier=1"), "{}", exit.console);
    assert!(
        exit.console
            .contains("5 packets transmitted, 5 packets received, 0% packet loss"),
        "{}",
        exit.console
    );
}

/// The guest's side of one TCP round against `pv-netpeer` on 10.78.0.1:5001: 64 MiB of
/// random bytes made in the guest, uploaded (`PUT`), downloaded again (`GET`), both checked
/// against the guest's own SHA-256. Prints `LOCAL <sum>`, the peer's answer, the
/// downloaded sum and, when both match, `TCP-OK`.
const TCP_ROUND: &str = r#"
dd if=/dev/urandom of=/tmp/d bs=1M count=64 2>/dev/null
want=$(sha256sum /tmp/d | cut -d' ' -f1)
echo "LOCAL $want"
{ echo PUT; cat /tmp/d; } | nc 10.78.0.1 5001 > /tmp/put
echo "PUT-ANSWER $(cat /tmp/put)"
got=$(echo GET | nc 10.78.0.1 5001 | sha256sum | cut -d' ' -f1)
echo "GOT $got"
[ "$(cat /tmp/put)" = "stored 67108864 $want" ]
[ "$got" = "$want" ]
echo TCP-OK
"#;

/// Brings eth0 up at 10.78.0.15/24 once the driver made it, and prints its carrier changes.
const TAP_NIC_UP: &str = r#"
set -e
n=300
while ! ip link show eth0 >/dev/null 2>&1 && [ "$n" -gt 0 ]; do usleep 100000; n=$((n - 1)); done
ip link set eth0 up
ip addr add 10.78.0.15/24 dev eth0
echo "BEFORE changes=$(cat /sys/class/net/eth0/carrier_changes)"
echo "FEATURES $(cat /sys/class/net/eth0/device/features)"
"#;

/// Whether the guest's driver negotiated feature `bit` (its `FEATURES` line: the virtio
/// device's `features` file, one character per bit from bit 0).
fn negotiated(console: &str, bit: usize) -> bool {
    console
        .lines()
        .find_map(|l| l.strip_prefix("FEATURES "))
        .and_then(|bits| bits.as_bytes().get(bit).copied())
        == Some(b'1')
}

/// What a TCP test needs on the host: a namespace with pv-net's TAP at 10.78.0.1/24 and
/// pv-netpeer listening there, and the paravisor serving vhost-user-net on that TAP.
struct TcpSetUp {
    // Dropped in this order: the peer and the paravisor before the namespace.
    peer: common::netns::NetPeer,
    inst: common::Instance,
    _ns: common::netns::Netns,
}

impl TcpSetUp {
    fn new(tag: &str, progress_every: u64) -> TcpSetUp {
        let ns = common::netns::Netns::new(tag);
        let tap = format!("net0=pvtap0@{}", ns.name);
        let args = ["--listen", "vhost-user-net", "--tap", &tap];
        // Restarts enough for the kill test (the shipped limit is 5 a minute).
        let manifest = common::edited(&common::shipped_text(), |doc| {
            common::set(doc, "service.net.restart.max", "40");
        });
        let inst = common::Instance::start_with(tag, &manifest, 7, &args);
        ns.ip_ok(&["addr", "add", "10.78.0.1/24", "dev", "pvtap0"]);
        ns.ip_ok(&["link", "set", "pvtap0", "up"]);
        let peer = common::netns::NetPeer::start(&ns, "10.78.0.1:5001", progress_every);
        TcpSetUp {
            peer,
            inst,
            _ns: ns,
        }
    }

    fn socket(&self) -> std::path::PathBuf {
        self.inst.dir.join("state/net/vhost-user-net.sock")
    }

    /// The guest's sum (its `LOCAL` line) must be what the peer received and sent back.
    fn check_sums(&mut self, console: &str) {
        let local = console
            .lines()
            .find_map(|l| l.strip_prefix("LOCAL "))
            .unwrap_or_else(|| panic!("no LOCAL line:\n{console}"))
            .trim()
            .to_string();
        let put = self.peer.line("put ", Duration::from_secs(60));
        let get = self.peer.line("get ", Duration::from_secs(60));
        eprintln!("peer: {put}; {get}");
        assert!(
            put.starts_with(&format!("put 67108864 {local} ")),
            "{put} vs {local}"
        );
        assert!(
            get.starts_with(&format!("get 67108864 {local} ")),
            "{get} vs {local}"
        );
    }
}

/// 64 MiB over TCP each way between Linux on our vhost-user-net and the host side of its
/// TAP, checksummed on both ends.
#[test]
fn linux_on_our_vhost_user_net_moves_64_mib_over_tcp_both_ways() {
    let test = "linux_on_our_vhost_user_net_moves_64_mib_over_tcp_both_ways";
    if !common::netns::taps_available(test) {
        return;
    }
    let Some(image) = linux::image(test) else {
        return;
    };
    let mut setup = TcpSetUp::new("net-tcp", 4 << 20);
    let exit = linux::Guest::new(&image)
        .vhost_user_net(&setup.socket(), false)
        .script(&format!("{TAP_NIC_UP}{TCP_ROUND}"))
        .timeout(Duration::from_secs(900))
        .run();
    assert_eq!(
        exit.status,
        0,
        "guest failed:\n{}\n{}",
        exit.console,
        setup.inst.log()
    );
    assert!(exit.console.contains("TCP-OK"), "{}", exit.console);
    setup.check_sums(&exit.console);
    // The offloads passed through the TAP: checksums and TCP segments both ways (bits 0, 1,
    // 7 GUEST_TSO4, 11 HOST_TSO4).
    for bit in [0, 1, 7, 11] {
        assert!(
            negotiated(&exit.console, bit),
            "bit {bit}:\n{}",
            exit.console
        );
    }
}

/// kill -9 of pv-net ten times while the guest moves 64 MiB each way over TCP: each kill
/// comes after the restarted service moved data (the peer's progress), six during the upload
/// and four during the download. The transfer completes, both checksums match, and the
/// guest's carrier never changed.
#[test]
fn ten_kills_of_the_net_service_during_a_tcp_transfer_lose_nothing_and_never_flap_the_link() {
    let test =
        "ten_kills_of_the_net_service_during_a_tcp_transfer_lose_nothing_and_never_flap_the_link";
    if !common::netns::taps_available(test) {
        return;
    }
    let Some(image) = linux::image(test) else {
        return;
    };
    // A kill after each 10 MiB crossed: the tenth at 100 MiB at the latest of the 128.
    let mut setup = TcpSetUp::new("net-tcp-kill", 10 << 20);
    let script = format!(
        "{TAP_NIC_UP}{TCP_ROUND}\necho \"AFTER changes=$(cat /sys/class/net/eth0/carrier_changes) carrier=$(cat /sys/class/net/eth0/carrier)\"\n"
    );
    let guest = linux::Guest::new(&image)
        .vhost_user_net(&setup.socket(), true)
        .script(&script)
        .timeout(Duration::from_secs(1800))
        .spawn();
    let mut kills = Vec::new();
    for _ in 0..10 {
        setup.peer.drain();
        let progress = setup.peer.wait_for("progress ", Duration::from_secs(600));
        let old_pid = setup.inst.row("net")["pid"].clone();
        let out = setup.inst.pv(&["kill", "net", "--signal", "KILL"]);
        assert!(out.status.success(), "{}", common::text(&out));
        kills.push(progress);
        let until = std::time::Instant::now() + Duration::from_secs(120);
        while !(setup.inst.row("net")["state"] == "running"
            && setup.inst.row("net")["pid"] != old_pid)
        {
            assert!(
                std::time::Instant::now() < until,
                "net did not come back:\n{}",
                setup.inst.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    eprintln!("kills at peer progress: {kills:?}");
    let exit = guest.wait();
    assert_eq!(
        exit.status,
        0,
        "guest failed after kills at {kills:?}:\n{}\n{}",
        exit.console,
        setup.inst.log()
    );
    assert!(exit.console.contains("TCP-OK"), "{}", exit.console);
    setup.check_sums(&exit.console);
    let changes = |tag: &str| -> String {
        exit.console
            .lines()
            .find_map(|l| l.split(tag).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no {tag} line:\n{}", exit.console))
            .to_string()
    };
    assert_eq!(
        changes("BEFORE changes="),
        changes("AFTER changes="),
        "the guest saw its link flap:\n{}",
        exit.console
    );
    assert!(exit.console.contains("carrier=1"), "{}", exit.console);
    assert_eq!(
        setup.inst.row("net")["restarts"],
        10,
        "{}",
        setup.inst.log()
    );
}
