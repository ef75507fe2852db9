//! A network namespace of a test's own (`ip netns add`, removed on drop), for the tests that
//! attach a TAP (`paravisor run --tap NAME=IFNAME@NETNS`) and address only inside it.

use std::process::Command;

use super::sandbox_available;
use super::text;

/// A network namespace of the test's own, removed (with every interface in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("pvtest-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("ip");
        assert!(out.status.success(), "ip netns add {name}: {}", text(&out));
        Netns { name }
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .expect("ip")
    }

    /// `ip -n NAME ARGS...`, which must succeed; its output.
    pub fn ip_ok(&self, args: &[&str]) -> String {
        let out = self.ip(args);
        assert!(
            out.status.success(),
            "ip -n {} {args:?}: {}",
            self.name,
            text(&out)
        );
        text(&out)
    }

    /// `COMMAND` run by bash inside the namespace.
    pub fn bash(&self, command: &str) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "bash", "-c", command])
            .output()
            .expect("ip netns exec")
    }

    /// A counter of `interface` from the namespace's sysfs.
    pub fn counter(&self, interface: &str, name: &str) -> u64 {
        let out = self.bash(&format!("cat /sys/class/net/{interface}/{name}"));
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a number")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Root (the sandbox, namespaces, the TAP), `ip` and /dev/net/tun, or a loud SKIPPED.
pub fn taps_available(test: &str) -> bool {
    if !sandbox_available(test) {
        return false;
    }
    let ip = Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    let tun = std::path::Path::new("/dev/net/tun").exists();
    if !ip || !tun {
        eprintln!("SKIPPED: {test}: needs the `ip` command (iproute2) and /dev/net/tun");
    }
    ip && tun
}
