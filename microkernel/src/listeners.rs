//! The TPM's front ends as the host configuration asks for them: the manifest declares each
//! listener (name, default address or path, localities); `paravisor run` binds only those
//! named with `--listen NAME[=ADDRESS|PATH]` (or `--listen all`). Nothing listens otherwise.
//!
//! A Unix socket is bound inside a directory that is the running user's and mode 0700 (made
//! so, or refused if it exists otherwise), so no other user can reach it even before it is
//! made 0600; a TCP socket on loopback is reachable by every local user, and `run` says so
//! at start-up. The sockets are bound once and kept across restarts of the service.

use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::path::PathBuf;

use ipc_defs::capability::Grant;

use crate::manifest::ListenAddress;
use crate::manifest::Manifest;

/// Mode of the directory a Unix front end is bound in: its owner's alone.
pub const SOCKET_DIR_MODE: u32 = 0o700;
/// Mode of a Unix front end's socket.
pub const SOCKET_MODE: u32 = 0o600;

/// Which front ends the host asked for (`paravisor run --listen ...`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenRequest {
    /// `--listen all`: every declared listener at its declared address.
    pub all: bool,
    /// `--listen NAME` or `--listen NAME=ADDRESS|PATH`, in order.
    pub named: Vec<(String, Option<String>)>,
}

impl ListenRequest {
    /// From the `--listen` values: `all`, `NAME` or `NAME=ADDRESS|PATH`.
    pub fn parse(values: &[String]) -> ListenRequest {
        let mut request = ListenRequest::default();
        for v in values {
            match v.split_once('=') {
                _ if v == "all" => request.all = true,
                Some((name, at)) => request.named.push((name.to_string(), Some(at.to_string()))),
                None => request.named.push((v.clone(), None)),
            }
        }
        request
    }
}

/// A listener to bind: its service, name, where, and what its connections may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enabled {
    pub service: String,
    pub name: String,
    pub address: ListenAddress,
    pub grant: Grant,
}

/// A bound listener.
pub struct Bound {
    pub name: String,
    pub socket: OwnedFd,
    pub address: ListenAddress,
    /// For a Unix socket: its path as bound (to check its mode later).
    pub path: Option<PathBuf>,
    pub grant: Grant,
}

/// The listeners `request` enables, resolved against the manifest: a name it does not
/// declare, an address that is not loopback, a name given twice are errors that say what is
/// declared.
pub fn enabled(m: &Manifest, request: &ListenRequest) -> Result<Vec<Enabled>, String> {
    let declared: Vec<(&str, &crate::manifest::ListenGrant)> = m
        .services
        .iter()
        .flat_map(|s| s.listen.iter().map(move |l| (s.name.as_str(), l)))
        .collect();
    let names = || {
        let list: Vec<&str> = declared.iter().map(|(_, l)| l.name.as_str()).collect();
        if list.is_empty() {
            "the manifest declares no listener".to_string()
        } else {
            format!("the manifest declares: {}", list.join(", "))
        }
    };
    for (i, (name, _)) in request.named.iter().enumerate() {
        if request.named[..i].iter().any(|(n, _)| n == name) {
            return Err(format!("--listen {name} is given twice"));
        }
    }
    let mut out = Vec::new();
    for (service, l) in &declared {
        let asked = request.named.iter().find(|(n, _)| n == &l.name);
        if !request.all && asked.is_none() {
            continue;
        }
        let address = match asked.and_then(|(_, at)| at.as_deref()) {
            None => l.address.clone(),
            Some(at) => override_address(&l.name, at)?,
        };
        out.push(Enabled {
            service: service.to_string(),
            name: l.name.clone(),
            address,
            grant: Grant::Localities(l.localities),
        });
    }
    for (name, _) in &request.named {
        if !declared.iter().any(|(_, l)| &l.name == name) {
            return Err(format!(
                "--listen {name}: no listener of that name ({}; or --listen all)",
                names()
            ));
        }
    }
    Ok(out)
}

/// `--listen NAME=AT`: a loopback TCP address, or a Unix socket path (relative to the state
/// directory, or absolute).
fn override_address(name: &str, at: &str) -> Result<ListenAddress, String> {
    if let Ok(a) = at.parse::<std::net::SocketAddr>() {
        if !a.ip().is_loopback() || a.port() == 0 {
            return Err(format!(
                "--listen {name}={at}: not a loopback address with a port (the TPM is never \
                 exposed to the network: use 127.0.0.1:PORT, [::1]:PORT or a Unix socket path)"
            ));
        }
        return Ok(ListenAddress::Tcp(a));
    }
    if at.is_empty() || at.ends_with('/') || at.contains(':') && !at.contains('/') {
        return Err(format!(
            "--listen {name}={at}: neither a loopback address (127.0.0.1:PORT) nor a socket path"
        ));
    }
    Ok(ListenAddress::Unix(PathBuf::from(at)))
}

/// Binds one listener. A Unix socket's path is relative to `state_dir` unless absolute.
pub fn bind(l: &Enabled, state_dir: &Path) -> Result<Bound, String> {
    let (socket, path) = match &l.address {
        ListenAddress::Tcp(a) => {
            let socket = std::net::TcpListener::bind(a)
                .map(OwnedFd::from)
                .map_err(|e| format!("{a}: {e}"))?;
            tracing::warn!(
                service = %l.service,
                listener = %l.name,
                "TPM front end on TCP {a}: EVERY LOCAL USER can reach it (and use or power-cycle \
                 this TPM as far as its grant allows); prefer a Unix socket listener, which only \
                 this user can reach"
            );
            (socket, None)
        }
        ListenAddress::Unix(p) => {
            let path = state_dir.join(p);
            (bind_unix(&path)?, Some(path))
        }
    };
    tracing::info!(service = %l.service, listener = %l.name, address = %l.address, "listening");
    Ok(Bound {
        name: l.name.clone(),
        socket,
        address: l.address.clone(),
        path,
        grant: l.grant,
    })
}

/// A Unix listener at `path`, inside a private directory: the directory is made mode 0700
/// (its parents as usual), or, if it exists, must be a directory of this user's with no
/// access for anyone else; the socket is bound there (so it is never reachable by another
/// user, whatever the umask) and made 0600.
fn bind_unix(path: &Path) -> Result<OwnedFd, String> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .ok_or_else(|| {
            format!(
                "{}: a socket needs a directory of its own to live in",
                path.display()
            )
        })?;
    private_dir(dir)?;
    // A socket left by an earlier run (never another kind of file).
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    let listener = std::os::unix::net::UnixListener::bind(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(OwnedFd::from(listener))
}

/// Makes `dir` (mode 0700) or checks that the existing one is private to this user.
fn private_dir(dir: &Path) -> Result<(), String> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .map_err(|e| format!("{}: {e}", parent.display()))?;
            }
            std::fs::DirBuilder::new()
                .mode(SOCKET_DIR_MODE)
                .create(dir)
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            // The mode asked for is cut by the umask; never widened by it.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(SOCKET_DIR_MODE))
                .map_err(|e| format!("{}: {e}", dir.display()))?;
            Ok(())
        }
        Err(e) => Err(format!("{}: {e}", dir.display())),
        Ok(_) => match dir_problem(dir) {
            None => Ok(()),
            Some(problem) => Err(format!(
                "{}: {problem}; a front end's socket is bound only in a directory of its own \
                 user's with mode 0700 (fix it with `chmod 700` / `chown`, or remove it and \
                 it is made so)",
                dir.display()
            )),
        },
    }
}

/// What is wrong with a socket directory, if anything: not a directory (or a symlink), not
/// this user's, open to others.
pub fn dir_problem(dir: &Path) -> Option<String> {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    let me = std::fs::metadata("/proc/self").map(|m| m.uid()).ok();
    if !meta.file_type().is_dir() {
        Some("is not a directory".into())
    } else if Some(meta.uid()) != me {
        Some(format!("is owned by uid {}, not this user", meta.uid()))
    } else if meta.mode() & 0o077 != 0 {
        Some(format!(
            "has mode {:04o}: other users can reach what is inside",
            meta.mode() & 0o7777
        ))
    } else {
        None
    }
}

/// What `audit --live` finds wrong with a bound listener: a Unix socket that is not 0600, or
/// whose directory is not private.
pub fn check(b: &Bound) -> Vec<String> {
    let Some(path) = &b.path else {
        return Vec::new();
    };
    let mut out = Vec::new();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() && m.mode() & 0o777 == SOCKET_MODE => {}
        Ok(m) => out.push(format!(
            "listener {} at {} has mode {:04o}, not a socket of mode 0600",
            b.name,
            path.display(),
            m.mode() & 0o7777
        )),
        Err(e) => out.push(format!("listener {} at {}: {e}", b.name, path.display())),
    }
    if let Some(problem) = path.parent().and_then(dir_problem) {
        out.push(format!(
            "listener {}'s directory {}: {problem}",
            b.name,
            path.parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default()
        ));
    }
    out
}

/// Where a bound listener listens, as the live audit needs it: its TCP port or Unix path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listening {
    Tcp(u16),
    Unix(String),
}

impl Bound {
    pub fn listening(&self) -> Listening {
        match (&self.address, &self.path) {
            (ListenAddress::Tcp(a), _) => Listening::Tcp(a.port()),
            (ListenAddress::Unix(p), None) => Listening::Unix(p.display().to_string()),
            (ListenAddress::Unix(_), Some(path)) => Listening::Unix(path.display().to_string()),
        }
    }
}

/// The socket inodes of connections accepted from `bound` (the live audit lets a front end
/// hold those besides its capabilities): TCP sockets whose local port is a listener's (an
/// accepted connection shares it), Unix sockets named by a listener's path. Read from the
/// microkernel's own network namespace, where the listeners were bound.
pub fn accepted_sockets(bound: &[Listening]) -> std::collections::BTreeSet<u64> {
    let mut inodes = std::collections::BTreeSet::new();
    let ports: Vec<u16> = bound
        .iter()
        .filter_map(|b| match b {
            Listening::Tcp(p) => Some(*p),
            Listening::Unix(_) => None,
        })
        .collect();
    if !ports.is_empty() {
        for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = f
                    .get(1)
                    .and_then(|a| a.rsplit_once(':'))
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
                let inode = f.get(9).and_then(|i| i.parse::<u64>().ok());
                if let (Some(port), Some(inode)) = (port, inode) {
                    if inode != 0 && ports.contains(&port) {
                        inodes.insert(inode);
                    }
                }
            }
        }
    }
    let paths: Vec<&String> = bound
        .iter()
        .filter_map(|b| match b {
            Listening::Unix(p) => Some(p),
            Listening::Tcp(_) => None,
        })
        .collect();
    if !paths.is_empty() {
        let text = std::fs::read_to_string("/proc/self/net/unix").unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(inode), Some(path)) =
                (f.get(6).and_then(|i| i.parse::<u64>().ok()), f.get(7))
            {
                if paths.iter().any(|p| p.as_str() == *path) {
                    inodes.insert(inode);
                }
            }
        }
    }
    inodes
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"
[[service]]
name = "vtpm"
binary = "pv-vtpm"
serves = ["vtpm"]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }

[[service]]
name = "gw"
binary = "pv-tpm-gateway"
calls = [{ endpoint = "vtpm", tpm = ["commands"] }]
listen = [
  { name = "mssim-command", address = "127.0.0.1:2321", localities = [0, 3] },
  { name = "swtpm-control-unix", path = "tpm/sock" },
]
limits = { memory = "64M", open-files = 32 }
restart = { policy = "always", max = 3, window = "10s", backoff = "10ms" }
"#;

    fn manifest() -> Manifest {
        Manifest::parse(Path::new("m.toml"), MANIFEST).expect("valid")
    }

    fn request(values: &[&str]) -> ListenRequest {
        ListenRequest::parse(&values.iter().map(|v| v.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn nothing_listens_unless_asked_for_and_overrides_stay_on_loopback() {
        let m = manifest();
        assert_eq!(enabled(&m, &request(&[])).unwrap(), vec![]);
        let all = enabled(&m, &request(&["all"])).unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(
            all[0].grant,
            Grant::Localities(ipc_defs::services::vtpm::Localities::ZERO.with(3))
        );
        let one = enabled(&m, &request(&["mssim-command=127.0.0.1:5555"])).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].address.to_string(), "127.0.0.1:5555");
        let path = enabled(&m, &request(&["swtpm-control-unix=/run/x/tpm.sock"])).unwrap();
        assert_eq!(path[0].address.to_string(), "unix:/run/x/tpm.sock");
        for bad in [
            "nope",
            "mssim-command=0.0.0.0:2321",
            "mssim-command=10.1.2.3:2321",
            "mssim-command=127.0.0.1:0",
        ] {
            let e = enabled(&m, &request(&[bad])).unwrap_err();
            assert!(
                e.contains("declares: mssim-command, swtpm-control-unix") || e.contains("loopback"),
                "{bad}: {e}"
            );
        }
        assert!(enabled(&m, &request(&["mssim-command", "mssim-command"])).is_err());
    }

    #[test]
    fn a_unix_front_end_is_0600_inside_a_0700_directory_and_a_shared_directory_is_refused() {
        let base = std::env::temp_dir().join(format!("pv-listen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let l = Enabled {
            service: "gw".into(),
            name: "swtpm-control-unix".into(),
            address: ListenAddress::Unix("tpm/sock".into()),
            grant: Grant::Localities(ipc_defs::services::vtpm::Localities::ZERO),
        };
        let bound = bind(&l, &base).unwrap();
        let dir = std::fs::metadata(base.join("tpm")).unwrap();
        assert_eq!(dir.mode() & 0o777, 0o700);
        let sock = std::fs::symlink_metadata(base.join("tpm/sock")).unwrap();
        assert_eq!(sock.mode() & 0o777, 0o600);
        assert_eq!(check(&bound), Vec::<String>::new());
        drop(bound);
        // A directory others can enter: refused, the socket not bound there.
        std::fs::set_permissions(base.join("tpm"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = bind(&l, &base).err().expect("refused");
        assert!(e.contains("mode 0755"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
