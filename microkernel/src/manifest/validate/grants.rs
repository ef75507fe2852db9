//! The passes over what a service is handed besides its channels: files and keys (paths inside
//! the state directory, never claimed twice), guest-state files created when missing,
//! listeners with their TPM localities, shared-memory regions, TAP devices, and the
//! descriptor store.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::path::PathBuf;

use ipc_defs::bootstrap::MAX_NAME;
use ipc_defs::capability::FileAccess;
use ipc_defs::capability::Grant;
use ipc_defs::fd_store::MAX_KEPT;
use ipc_defs::services::vtpm::Localities;
use ipc_defs::Interface;
use toml::Spanned;

use super::Seen;
use super::Validator;
use crate::manifest::schema::RawFdStore;
use crate::manifest::schema::RawFile;
use crate::manifest::schema::RawKey;
use crate::manifest::schema::RawListen;
use crate::manifest::schema::RawRegion;
use crate::manifest::schema::RawTap;
use crate::manifest::values::parse_size;
use crate::manifest::values::valid_name;
use crate::manifest::FdStoreGrant;
use crate::manifest::FileGrant;
use crate::manifest::KeyGrant;
use crate::manifest::ListenAddress;
use crate::manifest::ListenGrant;
use crate::manifest::Missing;
use crate::manifest::MissingKey;
use crate::manifest::RegionGrant;
use crate::manifest::ServiceSpec;
use crate::manifest::TapGrant;
use crate::manifest::MAX_MEMORY;
use crate::manifest::MAX_TAPS;

/// Syscalls a service that holds a TAP may not be granted. `ioctl` on a TAP's descriptor
/// reconfigures the host's end of it (filters, queues, the virtio-net header, its owner):
/// the microkernel sets it up before the service starts, and its holder gets one ioctl
/// request only, `TUNSETOFFLOAD` within a fixed set of flags, checked by a seccomp rule of its
/// own ([`crate::profiles::service_program`]). `socket` would give it a second way onto a
/// network beside the one it is handed.
pub const TAP_HOLDER_REFUSED: &[&str] = &["ioctl", "socket"];

impl Validator<'_> {
    /// `files`: valid names, paths inside the state directory, a known access and `missing`
    /// mode (`key` and `size` only with "create-vmgs"), and no read-only file created when
    /// missing. Paths shared with other grants are checked in [`Self::state_paths`].
    pub(super) fn files(
        &mut self,
        raw: &[Spanned<RawFile>],
        keys: &[Spanned<RawKey>],
        seen: &mut Seen,
    ) -> Vec<FileGrant> {
        let mut files = Vec::new();
        for f in raw {
            let f = f.get_ref();
            let fname = f.name.get_ref();
            if !valid_name(fname) {
                self.error(
                    f.name.span(),
                    format!("file name \"{fname}\" is not a valid name"),
                    format!("use 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
                );
            }
            let p = PathBuf::from(f.path.get_ref());
            self.check_state_path(&f.path, "file");
            seen.file_paths.push((p.clone(), f.path.span()));
            let access = match f.access.get_ref().as_str() {
                "read-only" => FileAccess::ReadOnly,
                "read-write" => FileAccess::ReadWrite,
                other => {
                    self.error(
                        f.access.span(),
                        format!("file access \"{other}\" is unknown"),
                        "use \"read-only\" or \"read-write\"",
                    );
                    FileAccess::ReadOnly
                }
            };
            let missing = match f.missing.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
                None | Some(("error", _)) => Missing::Error,
                Some(("create", _)) => Missing::Create,
                Some(("create-vmgs", span)) => self.create_vmgs(f, span, keys),
                Some((other, span)) => {
                    self.error(
                        span,
                        format!("missing = \"{other}\" is unknown"),
                        "use \"error\", \"create\" or \"create-vmgs\"",
                    );
                    Missing::Error
                }
            };
            if !matches!(missing, Missing::CreateVmgs { .. }) {
                for (what, field) in [("key", &f.key), ("size", &f.size)] {
                    if let Some(field) = field {
                        self.error(
                            field.span(),
                            format!("`{what}` applies only to missing = \"create-vmgs\""),
                            "remove it, or set missing = \"create-vmgs\"",
                        );
                    }
                }
            }
            if missing != Missing::Error && access == FileAccess::ReadOnly {
                self.error(
                    f.access.span(),
                    "a read-only file cannot be created when missing",
                    "use access = \"read-write\" or missing = \"error\"",
                );
            }
            files.push(FileGrant {
                name: fname.clone(),
                path: p,
                access,
                missing,
            });
        }
        files
    }

    /// `missing = "create-vmgs"`: needs `key` naming a key of the same service; `size` is
    /// optional.
    fn create_vmgs(
        &mut self,
        f: &RawFile,
        span: Range<usize>,
        keys: &[Spanned<RawKey>],
    ) -> Missing {
        let size = match &f.size {
            None => pv_vmgs::vhd::DEFAULT_IMAGE,
            Some(text) => match parse_size(text.get_ref()) {
                Some(n) if pv_vmgs::vhd::check_image_size(n).is_ok() => n,
                _ => {
                    self.error(
                        text.span(),
                        format!("VMGS size \"{}\" is not usable", text.get_ref()),
                        "use a multiple of 512 bytes between 16K and 4G, e.g. \"4M\"",
                    );
                    pv_vmgs::vhd::DEFAULT_IMAGE
                }
            },
        };
        let Some(key) = &f.key else {
            self.error(
                span,
                "missing = \"create-vmgs\" needs `key`: the guest-state file is created encrypted",
                "add key = \"<name of a key in this service's `keys`>\"",
            );
            return Missing::Error;
        };
        if !keys
            .iter()
            .any(|k| k.get_ref().name.get_ref() == key.get_ref())
        {
            self.error(
                key.span(),
                format!(
                    "key \"{}\" is not one of this service's keys",
                    key.get_ref()
                ),
                "add it to `keys = [{ name = ..., path = ..., missing = \"create\" }]`",
            );
        }
        Missing::CreateVmgs {
            key: key.get_ref().clone(),
            size,
        }
    }

    /// `keys`: valid, unique names; each key either in a key file inside the state directory
    /// or sealed (not both), with a known `missing` mode.
    pub(super) fn keys(
        &mut self,
        raw: &[Spanned<RawKey>],
        name: &str,
        seen: &mut Seen,
    ) -> Vec<KeyGrant> {
        let mut keys = Vec::new();
        for k in raw {
            let k = k.get_ref();
            let kname = k.name.get_ref();
            if !valid_name(kname) {
                self.error(
                    k.name.span(),
                    format!("key name \"{kname}\" is not a valid name"),
                    format!("use 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
                );
            }
            if keys.iter().any(|x: &KeyGrant| &x.name == kname) {
                self.error(
                    k.name.span(),
                    format!("key \"{kname}\" is listed twice"),
                    "give each key a unique name",
                );
            }
            let sealed = k.sealed.as_ref().is_some_and(|b| *b.get_ref());
            let path = match (&k.path, sealed) {
                (Some(p), false) => {
                    self.check_state_path(p, "key");
                    seen.key_paths.push((PathBuf::from(p.get_ref()), p.span()));
                    Some(PathBuf::from(p.get_ref()))
                }
                (None, true) => {
                    seen.sealed_keys
                        .push((name.to_string(), kname.clone(), k.name.span()));
                    None
                }
                _ => {
                    self.error(
                        k.name.span(),
                        format!("key \"{kname}\" needs either a `path` or `sealed = true`"),
                        "a key lives in a key file in the state directory (`path = \"...\"`) or sealed in its guest-state file (`sealed = true`), not both",
                    );
                    None
                }
            };
            let missing = match k.missing.as_ref().map(|m| (m.get_ref().as_str(), m.span())) {
                None | Some(("error", _)) => MissingKey::Error,
                Some(("create", _)) => MissingKey::Create,
                Some((other, span)) => {
                    self.error(
                        span,
                        format!("missing = \"{other}\" is unknown for a key"),
                        "use \"error\" or \"create\"",
                    );
                    MissingKey::Error
                }
            };
            keys.push(KeyGrant {
                name: kname.clone(),
                path,
                missing,
            });
        }
        keys
    }

    /// A path that must name something inside the state directory.
    fn check_state_path(&mut self, path: &Spanned<String>, what: &str) {
        let p = Path::new(path.get_ref());
        if path.get_ref().is_empty()
            || p.is_absolute()
            || p.components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            self.error(
                path.span(),
                format!(
                    "{what} path \"{}\" must stay inside the state directory",
                    path.get_ref()
                ),
                "write a relative path without '..', e.g. \"guest.vmgs\"",
            );
        }
    }

    /// Paths granted across services: a guest-state file is granted to one service only, a
    /// key file is never also granted as a file, and no key file is listed twice.
    pub(super) fn state_paths(
        &mut self,
        file_paths: &[(PathBuf, Range<usize>)],
        key_paths: &[(PathBuf, Range<usize>)],
        services: &[ServiceSpec],
    ) {
        for (i, (path, span)) in file_paths.iter().enumerate() {
            if file_paths[..i].iter().any(|(p, _)| p == path)
                && services
                    .iter()
                    .flat_map(|s| &s.files)
                    .any(|f| &f.path == path && matches!(f.missing, Missing::CreateVmgs { .. }))
            {
                self.error(
                    span.clone(),
                    format!("\"{}\" is a guest-state file; it is granted to one service only", path.display()),
                    "other services reach the guest state through the vmgs endpoint and its file-ids",
                );
            }
            if key_paths.iter().any(|(k, _)| k == path) {
                self.error(
                    span.clone(),
                    format!(
                        "\"{}\" is a key file; it cannot also be granted as a file",
                        path.display()
                    ),
                    "keys reach services only as key capabilities; give the file another path",
                );
            }
        }
        for (i, (path, span)) in key_paths.iter().enumerate() {
            if key_paths[..i].iter().any(|(k, _)| k == path) {
                self.error(
                    span.clone(),
                    format!("key file \"{}\" is listed twice", path.display()),
                    "give each key its own file",
                );
            }
        }
    }

    /// `listen`: names valid and unique across the manifest; each listener on exactly one of
    /// a loopback TCP address (no address listened on twice) or a Unix socket inside the
    /// state directory, with its TPM localities ([`Self::localities`]).
    pub(super) fn listeners(
        &mut self,
        raw: &[Spanned<RawListen>],
        name: &str,
        grants: &BTreeMap<Interface, Grant>,
        seen: &mut Seen,
    ) -> Vec<ListenGrant> {
        let mut listen: Vec<ListenGrant> = Vec::new();
        for l in raw {
            let l = l.get_ref();
            let lname = l.name.get_ref();
            if !valid_name(lname) || listen.iter().any(|x| &x.name == lname) {
                self.error(
                    l.name.span(),
                    format!("listener name \"{lname}\" is invalid or listed twice"),
                    format!("use unique names of 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
                );
            } else if let Some((_, other)) = seen.listener_names.iter().find(|(n, _)| n == lname) {
                self.error(
                    l.name.span(),
                    format!("listener name \"{lname}\" is also a listener of \"{other}\""),
                    "`paravisor run --listen NAME` names a listener: give each one a name of its own",
                );
            }
            seen.listener_names.push((lname.clone(), name.to_string()));
            let localities = self.localities(l, name, grants);
            match (&l.address, &l.path) {
                (Some(address), None) => match address.get_ref().parse::<std::net::SocketAddr>() {
                    Ok(a) if a.ip().is_loopback() && a.port() != 0 => {
                        if let Some((other, _)) = seen.addresses.iter().find(|(_, x)| *x == a) {
                            self.error(
                                address.span(),
                                format!("address {a} is already listened on by \"{other}\""),
                                "give each listener its own port",
                            );
                        }
                        seen.addresses.push((name.to_string(), a));
                        listen.push(ListenGrant {
                            name: lname.clone(),
                            address: ListenAddress::Tcp(a),
                            localities,
                        });
                    }
                    Ok(a) => self.error(
                        address.span(),
                        format!("listen address {a} is not a loopback address with a port"),
                        "listen on 127.0.0.1:PORT or [::1]:PORT only: the TPM is never exposed to the network",
                    ),
                    Err(_) => self.error(
                        address.span(),
                        format!("\"{}\" is not an address", address.get_ref()),
                        "write e.g. \"127.0.0.1:2321\"",
                    ),
                },
                (None, Some(path)) => {
                    self.check_state_path(path, "listener");
                    listen.push(ListenGrant {
                        name: lname.clone(),
                        address: ListenAddress::Unix(PathBuf::from(path.get_ref())),
                        localities,
                    });
                }
                _ => self.error(
                    l.name.span(),
                    format!("listener \"{lname}\" needs exactly one of `address` (loopback TCP) and `path` (Unix socket)"),
                    "write address = \"127.0.0.1:PORT\" or path = \"tpm/swtpm.sock\"",
                ),
            }
        }
        listen
    }

    /// `localities = [...]` of a listener: 0..=4, each once; only for a TPM front end (a
    /// service whose call to vtpm grants commands). Locality 0 only when absent.
    fn localities(
        &mut self,
        listen: &RawListen,
        service: &str,
        grants: &BTreeMap<Interface, Grant>,
    ) -> Localities {
        let Some(list) = &listen.localities else {
            return Localities::ZERO;
        };
        let commands =
            matches!(grants.get(&Interface::Vtpm), Some(Grant::Vtpm(g)) if !g.commands.is_empty());
        if !commands {
            self.error(
                list.span(),
                format!("localities apply to TPM front ends, but \"{service}\" is granted no TPM commands"),
                "give the service calls = [{ endpoint = \"vtpm\", tpm = [\"commands\"] }], or remove localities",
            );
        }
        if list.get_ref().is_empty() {
            self.error(
                list.span(),
                "localities is empty: the listener's connections could send no command",
                "list at least locality 0, or remove localities (locality 0 only)",
            );
        }
        let mut set = Localities::NONE;
        for l in list.get_ref() {
            let n = *l.get_ref();
            match u8::try_from(n) {
                Ok(x) if set.contains(x) => self.error(
                    l.span(),
                    format!("locality {n} is listed twice"),
                    "list each locality once",
                ),
                Ok(x) if set.insert(x) => {}
                _ => self.error(
                    l.span(),
                    format!("locality {n} does not exist"),
                    "TPM localities are 0..=4 (1-4 are the platform's: 3 and 4 reset and extend the DRTM PCRs 17-22)",
                ),
            }
        }
        set
    }

    /// `regions`: valid, unique names, each with a size neither zero nor above MAX_MEMORY.
    pub(super) fn regions(&mut self, raw: &[Spanned<RawRegion>]) -> Vec<RegionGrant> {
        let mut regions = Vec::new();
        for r in raw {
            let r = r.get_ref();
            let rname = r.name.get_ref();
            if !valid_name(rname) {
                self.error(
                    r.name.span(),
                    format!("region name \"{rname}\" is not a valid name"),
                    format!("use 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
                );
            }
            if regions.iter().any(|x: &RegionGrant| &x.name == rname) {
                self.error(
                    r.name.span(),
                    format!("region \"{rname}\" is listed twice"),
                    "give each region a unique name",
                );
            }
            match parse_size(r.size.get_ref()) {
                Some(n) if n > 0 && n <= MAX_MEMORY => regions.push(RegionGrant {
                    name: rname.clone(),
                    size: n,
                }),
                _ => self.error(
                    r.size.span(),
                    format!(
                        "region size \"{}\" is zero, absurd or unreadable",
                        r.size.get_ref()
                    ),
                    "write a size such as \"256K\" or \"4M\"",
                ),
            }
        }
        regions
    }

    /// `fd-store`: a bound of 1 to [`MAX_KEPT`] descriptors (each comes back as a slot of the
    /// bootstrap record at a restart; the open-files limit must leave room for them, which
    /// [`Self::open_files_and_capabilities`] checks).
    pub(super) fn fd_store(&mut self, raw: Option<&Spanned<RawFdStore>>) -> Option<FdStoreGrant> {
        let raw = raw?;
        let max = raw.get_ref().max.get_ref();
        match u32::try_from(*max) {
            Ok(m) if (1..=MAX_KEPT as u32).contains(&m) => Some(FdStoreGrant { max: m }),
            _ => {
                self.error(
                    raw.get_ref().max.span(),
                    format!("fd-store max {max} is out of range"),
                    format!("keep between 1 and {MAX_KEPT} descriptors, or remove fd-store"),
                );
                None
            }
        }
    }

    /// `taps`: each a valid name, once in the manifest (`paravisor run --tap NAME=IFNAME`
    /// names one); at most [`MAX_TAPS`]; held only by the service that serves `net` (a TAP is
    /// the guest NIC's back end: no other service has any business with host frames); and
    /// never next to a syscall of [`TAP_HOLDER_REFUSED`] (frames only: no ioctl, no socket).
    pub(super) fn taps(
        &mut self,
        raw: &[Spanned<RawTap>],
        name: &str,
        serves: &[Interface],
        syscalls: &[Spanned<String>],
        seen: &mut Seen,
    ) -> Vec<TapGrant> {
        let mut taps: Vec<TapGrant> = Vec::new();
        for t in raw {
            let tname = t.get_ref().name.get_ref();
            let span = t.get_ref().name.span();
            if !valid_name(tname) {
                self.error(
                    span,
                    format!("TAP name \"{tname}\" is not a valid name"),
                    format!("use 1 to {MAX_NAME} characters from a-z, 0-9 and '-'"),
                );
                continue;
            }
            if taps.iter().any(|x| &x.name == tname) {
                self.error(
                    span,
                    format!("TAP \"{tname}\" is listed twice"),
                    "give each TAP of the service a name of its own",
                );
                continue;
            }
            if let Some((_, other)) = seen.tap_names.iter().find(|(n, _)| n == tname) {
                self.error(
                    span,
                    format!("TAP name \"{tname}\" is also a TAP of \"{other}\""),
                    "`paravisor run --tap NAME=IFNAME` names a TAP: give each one a name of its own",
                );
                continue;
            }
            seen.tap_names.push((tname.clone(), name.to_string()));
            taps.push(TapGrant {
                name: tname.clone(),
            });
        }
        let Some(first) = raw.first() else {
            return taps;
        };
        if !serves.contains(&Interface::Net) {
            self.error(
                first.span(),
                format!("service \"{name}\" holds a TAP but does not serve net"),
                "a TAP is the guest NIC's back end: only the service that serves `net` may hold one (give it serves = [\"net\"], or remove taps)",
            );
        }
        if raw.len() > MAX_TAPS {
            self.error(
                first.span(),
                format!("service \"{name}\" holds {} TAPs", raw.len()),
                format!("at most {MAX_TAPS}: one per guest NIC the service serves"),
            );
        }
        for sc in syscalls {
            if TAP_HOLDER_REFUSED.contains(&sc.get_ref().as_str()) {
                self.error(
                    sc.span(),
                    format!(
                        "syscall \"{}\" is refused to \"{name}\", which holds a TAP",
                        sc.get_ref()
                    ),
                    "the microkernel sets the TAP up before the service starts (no packet information, a virtio-net header); its holder reads and writes frames and may only set the offloads its guest accepts (TUNSETOFFLOAD, allowed by a rule of its own), so it is granted neither ioctl nor socket",
                );
            }
        }
        taps
    }
}
