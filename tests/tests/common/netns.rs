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

/// `pv-netpeer` (the host side of a guest's TCP transfers: `PUT` keeps an upload, `GET` sends
/// it back) listening on `listen` inside a namespace; its lines read as they come. Killed on
/// drop.
pub struct NetPeer {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl NetPeer {
    /// Starts the peer in `ns` on `listen` (an address already on an interface there) and
    /// waits until it listens.
    pub fn start(ns: &Netns, listen: &str, progress_every: u64) -> NetPeer {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(super::bin_dir().join("pv-netpeer"))
            .args(["--listen", listen, "--progress-every"])
            .arg(progress_every.to_string())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("ip netns exec pv-netpeer");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut peer = NetPeer {
            child,
            lines,
            seen: Vec::new(),
        };
        peer.wait_for("listening ", std::time::Duration::from_secs(60));
        peer
    }

    /// The next line starting with `prefix` (earlier lines are kept in [`NetPeer::seen`]);
    /// panics with everything seen after `timeout`, which only catches a hang.
    pub fn wait_for(&mut self, prefix: &str, timeout: std::time::Duration) -> String {
        let until = std::time::Instant::now() + timeout;
        loop {
            let left = until.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "pv-netpeer printed no `{prefix}` line ({e}); it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The first line starting with `prefix` the peer printed, read already or waited for.
    pub fn line(&mut self, prefix: &str, timeout: std::time::Duration) -> String {
        self.drain();
        match self.seen.iter().find(|l| l.starts_with(prefix)) {
            Some(line) => line.clone(),
            None => self.wait_for(prefix, timeout),
        }
    }

    /// Reads every line printed so far into [`NetPeer::seen`], so that the next
    /// [`NetPeer::wait_for`] sees only what comes after.
    pub fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// Every line read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }
}

impl Drop for NetPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
