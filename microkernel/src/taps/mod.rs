//! TAP devices as the host configuration names them: the manifest declares each TAP a
//! service may hold (`taps = [{ name = "net0" }]`, measured); `paravisor run` attaches only
//! those the host names with `--tap NAME=IFNAME[@NETNS]` (or the host file's `taps`), and a
//! TAP named by nobody is not created: its holder's bootstrap record simply lacks it, so a
//! plain `run` needs no network set-up and changes nothing on the host's network.
//!
//! Attaching is the microkernel's work, once per run, in [`crate::supervisor::Supervisor::new`]
//! before any of its threads is confined: on a thread of its own (which ends right after) it
//! enters `/run/netns/NETNS` if one is named (only that thread's namespace changes), opens
//! `/dev/net/tun` there and attaches it to the TAP `IFNAME` (the persistent TAP of that name,
//! or a new one, which lives as long as the paravisor holds it). The descriptor keeps
//! working in the original namespace: a TAP belongs to the namespace it was made in, whoever
//! holds it. The supervisor keeps it across the service's restarts, so the host's side of the
//! link never goes down with the service. Every thread filter refuses `setns` and the TUN
//! ioctls, so nothing after start-up can attach another.
//!
//! Not here: the interface's admin state and addresses (`ip link set IFNAME up`, `ip addr`),
//! bridges and routes: those are the host's; its carrier is up while the paravisor holds it.
//!
//! The service gets the descriptor only (non-blocking, `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`:
//! one Ethernet frame behind a 12-byte virtio-net header per read or write, so checksum and
//! segmentation offloads pass through; [`tun::TAP_FLAGS`]). Its profile has no socket and
//! one ioctl only: `TUNSETOFFLOAD` with flags within [`ipc_defs::hosted::sys::TAP_OFFLOADS`],
//! for the offloads its guest's driver accepts (the seccomp rule checks the request and the
//! flags: [`crate::profiles`]); the manifest's validator refuses `ioctl` and `socket` whole.

use std::os::fd::AsFd;
use std::os::fd::OwnedFd;

use crate::manifest::Manifest;

#[allow(unsafe_code)]
mod tun;

/// Where network namespaces that `ip netns add` makes are named.
pub const NETNS_DIR: &str = "/run/netns";

/// The host's side of one TAP: an interface name, in the paravisor's own network namespace
/// or the one named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInterface {
    pub ifname: String,
    /// A name under [`NETNS_DIR`]; `None`: the paravisor's own namespace.
    pub netns: Option<String>,
}

impl std::fmt::Display for HostInterface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.netns {
            Some(ns) => write!(f, "{}@{ns}", self.ifname),
            None => write!(f, "{}", self.ifname),
        }
    }
}

/// Which TAPs the host names (`paravisor run --tap NAME=IFNAME[@NETNS]`, repeatable; the host
/// file's `taps`), as given: checked against the manifest by [`enabled`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapRequest {
    pub values: Vec<String>,
}

impl TapRequest {
    pub fn parse(values: &[String]) -> TapRequest {
        TapRequest {
            values: values.to_vec(),
        }
    }
}

/// A TAP to attach: its holder, its name in the manifest, and the host interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enabled {
    pub service: String,
    pub name: String,
    pub host: HostInterface,
}

/// An attached TAP, held by the supervisor for the run.
pub struct Attached {
    pub name: String,
    pub host: HostInterface,
    pub fd: OwnedFd,
    /// It existed (persistent) before; otherwise this run made it, and it goes with the run.
    pub persistent: bool,
}

/// The TAPs `request` names, resolved against the manifest: a value that is not
/// `NAME=IFNAME[@NETNS]`, a name the manifest does not declare, a name or a host interface
/// given twice, an interface or namespace name the kernel would refuse are errors that say
/// what is declared or what is wrong.
pub fn enabled(m: &Manifest, request: &TapRequest) -> Result<Vec<Enabled>, String> {
    let declared: Vec<(&str, &str)> = m
        .services
        .iter()
        .flat_map(|s| {
            s.taps
                .iter()
                .map(move |t| (s.name.as_str(), t.name.as_str()))
        })
        .collect();
    let names = || {
        let list: Vec<&str> = declared.iter().map(|(_, t)| *t).collect();
        if list.is_empty() {
            "the manifest declares no TAP".to_string()
        } else {
            format!("the manifest declares: {}", list.join(", "))
        }
    };
    let mut out: Vec<Enabled> = Vec::new();
    for value in &request.values {
        let Some((name, host)) = value.split_once('=') else {
            return Err(format!(
                "--tap {value}: say which host interface it is: --tap {value}=IFNAME or --tap {value}=IFNAME@NETNS ({})",
                names()
            ));
        };
        let Some((service, _)) = declared.iter().find(|(_, t)| *t == name) else {
            return Err(format!(
                "--tap {value}: no TAP named \"{name}\" ({})",
                names()
            ));
        };
        let host = host_interface(value, host)?;
        if out.iter().any(|e| e.name == name) {
            return Err(format!("--tap {name} is given twice"));
        }
        if let Some(other) = out.iter().find(|e| e.host == host) {
            return Err(format!(
                "--tap {value}: {host} is TAP {} already (a TAP interface has one holder)",
                other.name
            ));
        }
        out.push(Enabled {
            service: service.to_string(),
            name: name.to_string(),
            host,
        });
    }
    Ok(out)
}

/// `IFNAME[@NETNS]` of `--tap NAME=...`, each checked as the kernel would.
fn host_interface(value: &str, text: &str) -> Result<HostInterface, String> {
    let (ifname, netns) = match text.split_once('@') {
        Some((i, n)) => (i, Some(n)),
        None => (text, None),
    };
    if let Some(problem) = ifname_problem(ifname) {
        return Err(format!(
            "--tap {value}: interface name \"{ifname}\" {problem}"
        ));
    }
    if let Some(ns) = netns {
        if let Some(problem) = netns_problem(ns) {
            return Err(format!(
                "--tap {value}: network namespace \"{ns}\" {problem}"
            ));
        }
    }
    Ok(HostInterface {
        ifname: ifname.to_string(),
        netns: netns.map(str::to_string),
    })
}

/// What is wrong with an interface name, if anything: the kernel's rules (1 to 15 bytes, not
/// `.` or `..`, no `/`, `:` or white space), printable ASCII, and no `%` (a pattern the kernel
/// would fill in: the TAP must be the one the host named).
pub fn ifname_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        Some("is not 1 to 15 bytes long")
    } else if name == "." || name == ".." {
        Some("is not an interface name")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b':' | b'%'))
    {
        Some("may hold printable ASCII only, without '/', ':', '%' or spaces")
    } else {
        None
    }
}

/// What is wrong with a network namespace's name, if anything: a file name under
/// [`NETNS_DIR`] (no `/`, not `.` or `..`, at most 255 bytes, printable ASCII).
pub fn netns_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 255 {
        Some("is not 1 to 255 bytes long")
    } else if name == "." || name == ".." || name.contains('/') {
        Some("is not a name under /run/netns (as `ip netns add NAME` makes)")
    } else if !name.bytes().all(|b| b.is_ascii_graphic()) {
        Some("may hold printable ASCII only")
    } else {
        None
    }
}

/// Attaches `e`'s TAP (see the module's header): in its namespace if it names one, on a thread
/// of its own. Errors say what the host must do.
pub fn attach(e: &Enabled) -> Result<Attached, String> {
    let host = &e.host;
    let ns = match &host.netns {
        None => None,
        Some(name) => {
            let path = std::path::Path::new(NETNS_DIR).join(name);
            let file = std::fs::File::open(&path).map_err(|err| match err.kind() {
                std::io::ErrorKind::NotFound => format!(
                    "no network namespace \"{name}\" ({} does not exist): make it with `ip netns add {name}`",
                    path.display()
                ),
                _ => format!("network namespace {}: {err}", path.display()),
            })?;
            Some(OwnedFd::from(file))
        }
    };
    let opened = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("pv-tap".into())
            .spawn_scoped(scope, || {
                if let Some(ns) = &ns {
                    tun::enter_netns(ns.as_fd()).map_err(Step::Namespace)?;
                }
                tun::open_tap(&host.ifname).map_err(Step::Tap)
            })
            .map_err(|err| format!("a thread to attach TAP {host}: {err}"))?
            .join()
            .map_err(|_| format!("the thread attaching TAP {host} panicked"))
    })?;
    let (fd, flags) = opened.map_err(|step| step.explain(host))?;
    Ok(Attached {
        name: e.name.clone(),
        host: host.clone(),
        fd,
        persistent: flags & libc::IFF_PERSIST != 0,
    })
}

/// Where attaching failed.
enum Step {
    Namespace(std::io::Error),
    Tap(std::io::Error),
}

impl Step {
    /// What failed, why, and what the host can do about it.
    fn explain(self, host: &HostInterface) -> String {
        let ifname = &host.ifname;
        match self {
            Step::Namespace(err) => {
                let ns = host.netns.as_deref().unwrap_or_default();
                match err.raw_os_error() {
                    Some(libc::EPERM) => format!(
                        "entering network namespace \"{ns}\" for TAP {host}: {err} (it needs CAP_SYS_ADMIN: run paravisor as root, or leave @{ns} out and attach a TAP of the paravisor's own namespace)"
                    ),
                    Some(libc::EINVAL) => format!(
                        "{NETNS_DIR}/{ns} is not a network namespace (name one `ip netns add` made)"
                    ),
                    _ => format!("entering network namespace \"{ns}\" for TAP {host}: {err}"),
                }
            }
            Step::Tap(err) => match err.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ENODEV) => format!(
                    "TAP {host}: /dev/net/tun: {err} (load the tun module: `modprobe tun`)"
                ),
                Some(libc::EPERM) | Some(libc::EACCES) => format!(
                    "TAP {host}: {err}: creating a TAP needs CAP_NET_ADMIN (run paravisor as root), and attaching to a persistent one needs its owner's uid (make it with `ip tuntap add dev {ifname} mode tap user USER`)"
                ),
                Some(libc::EBUSY) => format!(
                    "TAP {host}: {err}: another process holds it (a single-queue TAP has one holder: stop the other one, or name another interface)"
                ),
                Some(libc::EINVAL) => format!(
                    "TAP {host}: {err}: an interface of that name exists but is not a single-queue TAP (a TUN device, a multi-queue TAP or another kind of link): name another interface or remove it"
                ),
                _ => format!("TAP {host}: {err}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const MANIFEST: &str = r#"
[[service]]
name = "net"
binary = "pv-net"
serves = ["net"]
taps = [{ name = "net0" }, { name = "net1" }]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }
"#;

    fn manifest() -> Manifest {
        Manifest::parse(Path::new("m.toml"), MANIFEST).expect("valid")
    }

    fn request(values: &[&str]) -> TapRequest {
        TapRequest::parse(&values.iter().map(|v| v.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn nothing_is_attached_unless_named_and_a_name_says_which_interface() {
        let m = manifest();
        assert_eq!(enabled(&m, &request(&[])).unwrap(), vec![]);
        let one = enabled(&m, &request(&["net1=pvtap0@pvtest-1"])).unwrap();
        assert_eq!(
            one,
            vec![Enabled {
                service: "net".into(),
                name: "net1".into(),
                host: HostInterface {
                    ifname: "pvtap0".into(),
                    netns: Some("pvtest-1".into()),
                },
            }]
        );
        assert_eq!(one[0].host.to_string(), "pvtap0@pvtest-1");
        let own = enabled(&m, &request(&["net0=tap-guest"])).unwrap();
        assert_eq!(own[0].host.netns, None);
    }

    #[test]
    fn unknown_names_bad_interfaces_and_doubles_are_refused_with_what_is_declared() {
        let m = manifest();
        for (values, needle) in [
            (&["net0"][..], "say which host interface"),
            (&["net9=tap0"], "declares: net0, net1"),
            (&["net0="], "is not 1 to 15 bytes"),
            (&["net0=a-very-long-ifname"], "is not 1 to 15 bytes"),
            (&["net0=tap%d"], "without '/', ':', '%'"),
            (&["net0=eth0:1"], "without '/', ':', '%'"),
            (&["net0=.."], "is not an interface name"),
            (&["net0=tap0@"], "is not 1 to 255 bytes"),
            (&["net0=tap0@../x"], "not a name under /run/netns"),
            (&["net0=tap0", "net0=tap1"], "given twice"),
            (&["net0=tap0@ns", "net1=tap0@ns"], "is TAP net0 already"),
        ] {
            let e = enabled(&m, &request(values)).unwrap_err();
            assert!(e.contains(needle), "{values:?}: {e}");
        }
        // The same interface name in two namespaces is two interfaces.
        assert_eq!(
            enabled(&m, &request(&["net0=tap0@a", "net1=tap0@b"]))
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn a_missing_namespace_is_named_with_the_command_that_makes_it() {
        let e = attach(&Enabled {
            service: "net".into(),
            name: "net0".into(),
            host: HostInterface {
                ifname: "pvtap0".into(),
                netns: Some(format!("pv-no-such-ns-{}", std::process::id())),
            },
        })
        .err()
        .expect("refused");
        assert!(e.contains("ip netns add pv-no-such-ns-"), "{e}");
    }
}
