//! `paravisor bench net`, the host side: a network namespace of the bench's own for each side
//! ([`Netns`], removed on every way out) and `pv-netpeer` run inside it ([`NetPeer`]: the
//! TCP peer of the guest's transfers, or the prober of the restart), its lines read as they
//! come. Nothing else of ours runs in a namespace.

use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;
use std::time::Instant;

use crate::bench_net::HOST_ADDRESS;
use crate::bench_storage::err;

/// A network namespace of the bench's own (`ip netns add`), removed with every interface in
/// it when dropped.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> std::io::Result<Netns> {
        let name = format!("pvbench-{}-{tag}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name])?;
        Ok(Netns { name })
    }

    /// `ip -n NAME ARGS...`, which must succeed; its output.
    pub fn ip(&self, args: &[&str]) -> std::io::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`, which execs it:
    /// the child's pid is the program's).
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Waits until `interface` is there, then gives it the host side's address and brings
    /// it up.
    pub fn address(&self, interface: &str, deadline: Instant) -> std::io::Result<()> {
        while self.ip(&["link", "show", interface]).is_err() {
            if Instant::now() > deadline {
                return Err(err(format!(
                    "no interface {interface} appeared in namespace {}",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let cidr = format!("{HOST_ADDRESS}/24");
        self.ip(&["addr", "add", &cidr, "dev", interface])?;
        self.ip(&["link", "set", interface, "up"])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// `ip ARGS...`, which must succeed; its output.
fn ip(args: &[&str]) -> std::io::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| err(format!("ip: {e}")))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(err(format!("ip {}: {}", args.join(" "), text.trim())));
    }
    Ok(text)
}

/// `pv-netpeer` run inside a namespace (listening, or probing the guest), its stdout read
/// line by line as it comes; killed when dropped.
pub struct NetPeer {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    seen: Vec<String>,
    /// Lines before this one were returned by [`NetPeer::wait_for`] or skipped by it.
    cursor: usize,
}

impl NetPeer {
    /// Starts `pv-netpeer ARGS...` in `ns` and waits for its first line, which starts with
    /// `first` (`listening` or `probing`).
    pub fn start(ns: &Netns, args: &[String], first: &str) -> std::io::Result<NetPeer> {
        let program = microkernel::cli::bin_dir().join("pv-netpeer");
        if !program.is_file() {
            return Err(err(format!(
                "{} is not there: build the workspace (cargo build --release)",
                program.display()
            )));
        }
        let mut child = ns
            .exec(&program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("ip netns exec {}: {e}", program.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| err("pv-netpeer's stdout"))?;
        let (tx, lines) = mpsc::channel();
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
            cursor: 0,
        };
        peer.wait_for(first, Instant::now() + Duration::from_secs(30))?;
        Ok(peer)
    }

    /// The next line after the last one returned that starts with `prefix`; an error of kind
    /// `TimedOut` when `deadline` passes first.
    pub fn wait_for(&mut self, prefix: &str, deadline: Instant) -> std::io::Result<String> {
        loop {
            if self.cursor == self.seen.len() {
                let wait = deadline.saturating_duration_since(Instant::now());
                match self.lines.recv_timeout(wait) {
                    Ok(line) => self.seen.push(line),
                    Err(e) => {
                        // Timed out (the caller may wait again) or the peer ended.
                        let kind = match e {
                            mpsc::RecvTimeoutError::Timeout => std::io::ErrorKind::TimedOut,
                            mpsc::RecvTimeoutError::Disconnected => std::io::ErrorKind::BrokenPipe,
                        };
                        let tail = &self.seen[self.seen.len().saturating_sub(20)..];
                        return Err(std::io::Error::new(
                            kind,
                            format!(
                                "pv-netpeer printed no `{prefix}` line ({e}); its last lines:\n{}",
                                tail.join("\n")
                            ),
                        ));
                    }
                }
            }
            self.cursor += 1;
            let line = &self.seen[self.cursor - 1];
            if line.starts_with(prefix) {
                return Ok(line.clone());
            }
        }
    }
}

impl Drop for NetPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
