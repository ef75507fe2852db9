//! The measured launch: before any service runs, the microkernel measures what it is about to
//! start, in order (its own executable, the manifest, each service executable in manifest
//! order, the shared code they map: the dynamic loader and every library, by name, the guest
//! image(s) and command line, the boot vCPU's initial state) into
//! - a **launch log**: one entry per item (sequence, kind, name, length, SHA-384), and
//! - a **launch digest** computed the way an AMD SEV-SNP secure processor computes a guest's
//!   (SNP_LAUNCH_UPDATE): a SHA-384 chain over 4 KiB pages, each step hashing a PAGE_INFO
//!   record (previous digest, SHA-384 of the page, record length 0x70, page type, IMI flag,
//!   VMPL permissions, GPA). It becomes the attestation report's `measurement`.
//!
//! The pages are the log's own entries, one 4 KiB record page per entry at a fixed address
//! ([`IMAGE_BASE`] + seq * 4 KiB; the vCPU state's as a VMSA page at SNP's VMSA GPA): so a
//! verifier recomputes the measurement from the launch log alone, and checks the log's hashes
//! against the release it trusts (`paravisor measure` does both from the files). A record
//! holds the entry's sequence, kind, length, SHA-384 and name, so lengths and order are bound
//! too. Files are hashed once, as they stream in: time is proportional to bytes, memory
//! constant.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::path::PathBuf;

use serde::Serialize;
use sha2::Digest;
use sha2::Sha384;

use crate::libraries::Library;
use crate::manifest::Manifest;
use crate::partition::GuestConfig;
use crate::partition::Image;
use crate::util::hex;

/// Where the measured image starts (guest-physical, above 4 GiB: outside any real guest RAM
/// layout, so it can never be confused with one).
pub const IMAGE_BASE: u64 = 0x1_0000_0000;
/// SNP's GPA for VMSA pages (page-aligned, bits above 51 clear).
pub const VMSA_GPA: u64 = 0xFFFF_FFFF_F000;
const PAGE: usize = 4096;
/// PAGE_INFO.LENGTH.
const PAGE_INFO_LEN: u16 = 0x70;
/// SNP page types.
const PAGE_TYPE_NORMAL: u8 = 0x01;
const PAGE_TYPE_VMSA: u8 = 0x02;

pub type Digest384 = [u8; 48];

/// What an entry measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The running paravisor's own executable (the microkernel).
    Microkernel,
    Manifest,
    Service,
    /// A dynamic loader or shared library that the microkernel or a service maps.
    Library,
    GuestImage,
    GuestInitrd,
    CommandLine,
    VcpuState,
}

impl Kind {
    /// Whether the entry measures the guest (not the paravisor itself).
    pub fn is_guest(self) -> bool {
        matches!(
            self,
            Kind::GuestImage | Kind::GuestInitrd | Kind::CommandLine | Kind::VcpuState
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Microkernel => "microkernel",
            Kind::Manifest => "manifest",
            Kind::Service => "service",
            Kind::Library => "library",
            Kind::GuestImage => "guest-image",
            Kind::GuestInitrd => "guest-initrd",
            Kind::CommandLine => "command-line",
            Kind::VcpuState => "vcpu-state",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Entry {
    pub seq: u32,
    pub kind: Kind,
    pub name: String,
    pub length: u64,
    #[serde(serialize_with = "hex_digest", deserialize_with = "digest_from_hex")]
    pub sha384: Digest384,
    /// Guest-physical address of its first page in the measured image.
    pub gpa: u64,
    /// Where the file was read from, for the reader of the log. Not measured: the same
    /// release measures the same wherever it is installed and however its paths are spelled
    /// (`manifest.toml`, `./manifest.toml`, `/srv/pv/manifest.toml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

fn hex_digest<S: serde::Serializer>(d: &Digest384, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex(d))
}

fn digest_from_hex<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Digest384, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    crate::util::parse_hex(&s)
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| serde::de::Error::custom("not 48 bytes of hex"))
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct LaunchLog {
    pub entries: Vec<Entry>,
    /// The launch digest: the report's `measurement`.
    #[serde(serialize_with = "hex_digest", deserialize_with = "digest_from_hex")]
    pub measurement: Digest384,
    /// Bytes measured.
    pub bytes: u64,
    /// The measured configuration (the manifest entry measures its canonical bytes,
    /// [`crate::manifest::canonical_json`]): for the reader, and for a refusal's field-level
    /// diff. Not trusted when read back: [`LaunchLog::checked_config`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// How the host's VMM was started (`run --vmm qemu`): a record, not measured (QEMU is
    /// the host's, outside the paravisor's trust boundary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_vmm: Option<crate::host_vmm::HostVmmRecord>,
}

impl LaunchLog {
    /// The configuration, if it is the one the manifest entry measured.
    pub fn checked_config(&self) -> Option<&serde_json::Value> {
        let config = self.config.as_ref()?;
        let entry = self.entries.iter().find(|e| e.kind == Kind::Manifest)?;
        let bytes = crate::manifest::canonical_json(config);
        (bytes.len() as u64 == entry.length && Sha384::digest(&bytes)[..] == entry.sha384[..])
            .then_some(config)
    }

    /// The paravisor's own measurement: the launch digest of its entries alone (the
    /// microkernel, the measured configuration, the services and their libraries), without
    /// the guest it boots. What `sealing = "measurement"` binds the guest-state key to: the
    /// same paravisor opens its state whichever guest it runs (the guest is in the report's
    /// full measurement, and measures itself into the vTPM). On hardware this is the
    /// paravisor's image as the secure processor measures it, with the guest loaded after
    /// launch (as OpenHCL loads the guest's firmware and OS).
    pub fn paravisor_measurement(&self) -> Digest384 {
        let own: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| !e.kind.is_guest())
            .cloned()
            .collect();
        digest_of(&own)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("measuring {what} {path}: {error}")]
    Read {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error(
        "refusing to measure a launch with {0} set: these variables load code into the \
         microkernel or change how it runs, which the measurement cannot tell; unset them"
    )]
    Environment(String),
    #[error("{0}")]
    Code(String),
}

/// SNP's launch digest: a SHA-384 chain of PAGE_INFO records.
#[derive(Debug, Clone)]
pub struct LaunchDigest {
    digest: Digest384,
}

impl Default for LaunchDigest {
    fn default() -> Self {
        LaunchDigest { digest: [0; 48] }
    }
}

impl LaunchDigest {
    /// One step: PAGE_INFO {current digest, contents digest, length, type, IMI 0, VMPL3/2/1
    /// permissions 0, reserved, gpa}.
    fn step(&mut self, page_type: u8, gpa: u64, contents: &Digest384) {
        let mut info = [0u8; PAGE_INFO_LEN as usize];
        info[0..48].copy_from_slice(&self.digest);
        info[48..96].copy_from_slice(contents);
        info[96..98].copy_from_slice(&PAGE_INFO_LEN.to_le_bytes());
        info[98] = page_type;
        // 99: IMI page, 100..103: VMPL3/2/1 permissions, 103: reserved: all zero.
        info[104..112].copy_from_slice(&gpa.to_le_bytes());
        self.digest = Sha384::digest(info).into();
    }

    /// A normal page (exactly 4 KiB) at `gpa`.
    pub fn normal_page(&mut self, gpa: u64, page: &[u8; PAGE]) {
        let contents: Digest384 = Sha384::digest(page).into();
        self.step(PAGE_TYPE_NORMAL, gpa, &contents);
    }

    /// A VMSA page.
    pub fn vmsa_page(&mut self, page: &[u8; PAGE]) {
        let contents: Digest384 = Sha384::digest(page).into();
        self.step(PAGE_TYPE_VMSA, VMSA_GPA, &contents);
    }

    pub fn value(&self) -> Digest384 {
        self.digest
    }
}

/// Builds the log, item by item.
#[derive(Default)]
pub struct Measurer {
    log: Vec<Entry>,
    bytes: u64,
}

/// "PVLAUNCH": the first bytes of every record page.
const RECORD_MAGIC: &[u8; 8] = b"PVLAUNCH";

impl Kind {
    fn code(self) -> u32 {
        match self {
            Kind::Manifest => 1,
            Kind::Service => 2,
            Kind::GuestImage => 3,
            Kind::GuestInitrd => 4,
            Kind::CommandLine => 5,
            Kind::VcpuState => 6,
            Kind::Microkernel => 7,
            Kind::Library => 8,
        }
    }
}

/// An entry's record page: magic, seq (u32), kind (u32), length (u64), SHA-384, name length
/// (u16) and name (cut to fit), zeros; little-endian.
pub fn record_page(e: &Entry) -> [u8; PAGE] {
    let mut page = [0u8; PAGE];
    page[0..8].copy_from_slice(RECORD_MAGIC);
    page[8..12].copy_from_slice(&e.seq.to_le_bytes());
    page[12..16].copy_from_slice(&e.kind.code().to_le_bytes());
    page[16..24].copy_from_slice(&e.length.to_le_bytes());
    page[24..72].copy_from_slice(&e.sha384);
    let name = e.name.as_bytes();
    let n = name.len().min(PAGE - 74);
    page[72..74].copy_from_slice(&(n as u16).to_le_bytes());
    page[74..74 + n].copy_from_slice(&name[..n]);
    page
}

/// The launch digest of a log: its record pages chained as SNP chains pages.
pub fn digest_of(entries: &[Entry]) -> Digest384 {
    let mut d = LaunchDigest::default();
    for e in entries {
        let page = record_page(e);
        if e.kind == Kind::VcpuState {
            d.vmsa_page(&page);
        } else {
            d.normal_page(e.gpa, &page);
        }
    }
    d.value()
}

impl Measurer {
    /// Measures one item read from `source` (streamed).
    pub fn item(
        &mut self,
        kind: Kind,
        name: &str,
        mut source: impl Read,
    ) -> std::io::Result<&Entry> {
        let mut whole = Sha384::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut length = 0u64;
        loop {
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            whole.update(&buf[..n]);
            length += n as u64;
        }
        self.push(kind, name, length, whole.finalize().into());
        Ok(self.log.last().expect("just pushed"))
    }

    fn push(&mut self, kind: Kind, name: &str, length: u64, sha384: Digest384) {
        let seq = self.log.len() as u32;
        let gpa = if kind == Kind::VcpuState {
            VMSA_GPA
        } else {
            IMAGE_BASE + u64::from(seq) * PAGE as u64
        };
        self.bytes += length;
        self.log.push(Entry {
            seq,
            kind,
            name: name.to_string(),
            length,
            sha384,
            gpa,
            path: None,
        });
    }

    /// Notes where the last item was read from (not measured).
    fn read_from(&mut self, path: &Path) {
        if let Some(e) = self.log.last_mut() {
            e.path = Some(path.display().to_string());
        }
    }

    /// The boot vCPU's initial state (the last entry; a VMSA page in the digest).
    pub fn vcpu_state(&mut self, state: &[u8]) {
        self.push(
            Kind::VcpuState,
            "vcpu0",
            state.len() as u64,
            Sha384::digest(state).into(),
        );
    }

    pub fn finish(self) -> LaunchLog {
        LaunchLog {
            measurement: digest_of(&self.log),
            entries: self.log,
            bytes: self.bytes,
            config: None,
            host_vmm: None,
        }
    }
}

fn file(m: &mut Measurer, kind: Kind, name: &str, path: &Path) -> Result<(), MeasureError> {
    let err = |error| MeasureError::Read {
        what: kind.name(),
        path: path.display().to_string(),
        error,
    };
    let f = File::open(path).map_err(err)?;
    m.item(kind, name, f).map_err(err)?;
    m.read_from(path);
    Ok(())
}

/// The boot vCPU's initial state, serialised (what the partition sets before the first run):
/// entry point and RSI, control registers, EFER, GDT, segment selectors.
pub fn initial_vcpu_state(guest: &GuestConfig) -> Vec<u8> {
    let entry = crate::partition::boot::expected_entry(&guest.image);
    let mut sregs = kvm_bindings::kvm_sregs::default();
    crate::partition::boot::long_mode(&mut sregs);
    let regs = crate::partition::boot::entry_regs(entry);
    let mut out = Vec::new();
    for v in [
        regs.rip,
        regs.rsi,
        regs.rsp,
        regs.rflags,
        sregs.cr0,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.gdt.base,
        u64::from(sregs.gdt.limit),
        u64::from(sregs.cs.selector),
        u64::from(sregs.ds.selector),
        u64::from(guest.vcpus),
        guest.memory,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Measures a launch: the manifest's text as validated, each service binary in manifest
/// order from `bin_dir`, and the guest, if any.
pub fn launch(
    manifest: &Manifest,
    bin_dir: &Path,
    guest: Option<&GuestConfig>,
) -> Result<LaunchLog, MeasureError> {
    launch_inner(manifest, bin_dir, guest, false).map(|(log, _)| log)
}

/// [`launch`], keeping each service binary exactly as measured: its bytes are copied, while
/// they are hashed, into a memfd sealed against any change, one per service in manifest
/// order. The supervisor executes those (never the path again), so what runs is what was
/// measured even if the file on disk is replaced or rewritten afterwards.
pub fn launch_sealed(
    manifest: &Manifest,
    bin_dir: &Path,
    guest: Option<&GuestConfig>,
) -> Result<(LaunchLog, Sealed), MeasureError> {
    launch_inner(manifest, bin_dir, guest, true)
}

/// The measured files, kept as sealed memfds: each service binary (manifest order), the
/// shared code they map, and each guest file (image, initrd) with the path it was measured
/// from.
#[derive(Debug, Default)]
pub struct Sealed {
    pub services: Vec<OwnedFd>,
    /// Per service (manifest order): its interpreter and libraries, as indexes into
    /// `libraries`.
    pub service_code: Vec<Vec<usize>>,
    /// Every library measured, by name.
    pub libraries: Vec<SealedLibrary>,
    pub guest: Vec<(PathBuf, OwnedFd)>,
}

/// A library exactly as measured.
#[derive(Debug)]
pub struct SealedLibrary {
    pub library: Library,
    pub image: OwnedFd,
    pub length: u64,
}

impl Sealed {
    /// The copies service `index`'s sandbox holds: (sealed image, length, path inside the
    /// sandbox).
    pub fn code_of(&self, index: usize) -> Vec<(&OwnedFd, u64, &str)> {
        self.service_code
            .get(index)
            .map(|ids| {
                ids.iter()
                    .filter_map(|&i| self.libraries.get(i))
                    .map(|l| (&l.image, l.length, l.library.sandbox_path.as_str()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Sealed {
    /// Points `guest`'s files at their measured copies (`/proc/self/fd/N` of the memfds, which
    /// must stay open while the partition loads them), so that the guest loaded is the one
    /// measured whatever happens to the files.
    pub fn apply(&self, guest: &mut GuestConfig) {
        use std::os::fd::AsRawFd;
        let copy = |p: &mut PathBuf| {
            if let Some((_, fd)) = self.guest.iter().find(|(orig, _)| orig == p) {
                *p = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
            }
        };
        match &mut guest.image {
            Image::TestGuest { path: Some(p), .. } => copy(p),
            Image::TestGuest { path: None, .. } => {}
            Image::Linux { kernel, initrd, .. } => {
                copy(kernel);
                if let Some(i) = initrd {
                    copy(i);
                }
            }
        }
    }
}

/// Measures the file at `path`; with `keep`, copies exactly the bytes hashed into a sealed
/// memfd named `memfd_name` and returns it.
fn measure_file(
    m: &mut Measurer,
    kind: Kind,
    name: &str,
    path: &Path,
    keep: Option<&str>,
) -> Result<Option<OwnedFd>, MeasureError> {
    let Some(memfd_name) = keep else {
        file(m, kind, name, path)?;
        return Ok(None);
    };
    let err = |error| MeasureError::Read {
        what: kind.name(),
        path: path.display().to_string(),
        error,
    };
    let source = File::open(path).map_err(err)?;
    let image = File::from(ipc_defs::hosted::sys::memfd(memfd_name, 0).map_err(err)?);
    m.item(
        kind,
        name,
        CopyInto {
            inner: source,
            out: &image,
            at: 0,
        },
    )
    .map_err(err)?;
    m.read_from(path);
    let image = OwnedFd::from(image);
    ipc_defs::hosted::sys::seal_read_only(&image).map_err(err)?;
    Ok(Some(image))
}

/// A reader that writes what it reads into a file at increasing offsets.
struct CopyInto<'a, R> {
    inner: R,
    out: &'a File,
    at: u64,
}

impl<R: Read> Read for CopyInto<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        std::os::unix::fs::FileExt::write_all_at(self.out, &buf[..n], self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

fn launch_inner(
    manifest: &Manifest,
    bin_dir: &Path,
    guest: Option<&GuestConfig>,
    keep_images: bool,
) -> Result<(LaunchLog, Sealed), MeasureError> {
    let mut sealed = Sealed::default();
    let mut m = Measurer::default();
    let refused = crate::libraries::refused_environment(std::env::vars_os().map(|(k, v)| {
        (
            k.to_string_lossy().into_owned(),
            v.to_string_lossy().into_owned(),
        )
    }));
    if !refused.is_empty() {
        return Err(MeasureError::Environment(refused.join(", ")));
    }
    // Whoever measures checks first that it maps nothing but its executable and that
    // executable's libraries (a library slipped in through LD_LIBRARY_PATH would make every
    // value it computes suspect).
    let running = Path::new("/proc/self/exe");
    let running_code =
        crate::libraries::resolve(running).map_err(|e| MeasureError::Code(e.to_string()))?;
    crate::libraries::check_own_maps(running, &running_code).map_err(MeasureError::Code)?;
    // The microkernel first (its libraries are measured below with the services'). A run
    // measures its executable as running. A reference value (`measure`, a verifier, a tool)
    // measures the `paravisor` file in `bin_dir`: what a run from there would be.
    let path = if keep_images {
        running.to_path_buf()
    } else {
        bin_dir.join("paravisor")
    };
    let own = path.as_path();
    let own_code = if keep_images {
        running_code
    } else {
        crate::libraries::resolve(own).map_err(|e| MeasureError::Code(e.to_string()))?
    };
    let read_err = |what: &'static str, path: &Path| {
        let path = path.display().to_string();
        move |error| MeasureError::Read { what, path, error }
    };
    let exe = File::open(own).map_err(read_err("microkernel", own))?;
    m.item(Kind::Microkernel, "paravisor", exe)
        .map_err(read_err("microkernel", own))?;
    if keep_images {
        if let Ok(path) = std::env::current_exe() {
            m.read_from(&path);
        }
    } else {
        m.read_from(own);
    }
    let mut libraries: Vec<Library> = Vec::new();
    let mut add_code = |code: &crate::libraries::Needs| -> Result<Vec<usize>, MeasureError> {
        let mut ids = Vec::new();
        for lib in &code.code {
            let i = match libraries.iter().position(|l| l.name == lib.name) {
                Some(i) => {
                    let same = std::fs::canonicalize(&libraries[i].host_path).ok()
                        == std::fs::canonicalize(&lib.host_path).ok();
                    if !same {
                        return Err(MeasureError::Code(format!(
                            "two different files are both {}: {} and {}",
                            lib.name,
                            libraries[i].host_path.display(),
                            lib.host_path.display()
                        )));
                    }
                    i
                }
                None => {
                    libraries.push(lib.clone());
                    libraries.len() - 1
                }
            };
            ids.push(i);
        }
        Ok(ids)
    };
    add_code(&own_code)?;
    // Names are part of the measurement, so they never include a path.
    // The measured configuration in its canonical form, not the file's text: comments,
    // layout and host settings do not change the launch.
    m.item(Kind::Manifest, "manifest", &manifest.measured_bytes()[..])
        .map_err(|error| MeasureError::Read {
            what: "manifest",
            path: manifest.path.display().to_string(),
            error,
        })?;
    m.read_from(&manifest.path);
    for s in &manifest.services {
        let path: PathBuf = bin_dir.join(&s.binary);
        let name = format!("{} ({})", s.name, s.binary);
        let memfd = format!("pv-image-{}", s.binary);
        let keep = keep_images.then_some(memfd.as_str());
        if let Some(fd) = measure_file(&mut m, Kind::Service, &name, &path, keep)? {
            sealed.services.push(fd);
        }
        let code = crate::libraries::resolve(&path).map_err(|e| {
            MeasureError::Code(format!("the shared code of service {}: {e}", s.name))
        })?;
        sealed.service_code.push(add_code(&code)?);
    }
    // The shared code, each file once, by name (the order, and so the log, does not depend
    // on which service needed it first).
    let mut order: Vec<usize> = (0..libraries.len()).collect();
    order.sort_by(|&a, &b| libraries[a].name.cmp(&libraries[b].name));
    let mut renumber = vec![0; libraries.len()];
    for (new, &old) in order.iter().enumerate() {
        renumber[old] = new;
        let lib = &libraries[old];
        let keep = keep_images.then_some("pv-library");
        let image = measure_file(&mut m, Kind::Library, &lib.name, &lib.host_path, keep)?;
        let length = m.log.last().map_or(0, |e| e.length);
        if let Some(image) = image {
            sealed.libraries.push(SealedLibrary {
                library: lib.clone(),
                image,
                length,
            });
        }
    }
    for ids in &mut sealed.service_code {
        for i in ids.iter_mut() {
            *i = renumber[*i];
        }
    }
    if let Some(guest) = guest {
        let line = match &guest.image {
            Image::TestGuest {
                path: None,
                command_line,
            } => {
                m.item(
                    Kind::GuestImage,
                    "test guest (embedded)",
                    crate::partition::TEST_GUEST,
                )
                .map_err(|error| MeasureError::Read {
                    what: "guest image",
                    path: "(embedded)".into(),
                    error,
                })?;
                command_line
            }
            Image::TestGuest {
                path: Some(p),
                command_line,
            } => {
                let keep = keep_images.then_some("pv-guest-image");
                if let Some(fd) = measure_file(&mut m, Kind::GuestImage, "guest image", p, keep)? {
                    sealed.guest.push((p.clone(), fd));
                }
                command_line
            }
            Image::Linux {
                kernel,
                initrd,
                command_line,
            } => {
                let keep = keep_images.then_some("pv-guest-kernel");
                if let Some(fd) = measure_file(&mut m, Kind::GuestImage, "kernel", kernel, keep)? {
                    sealed.guest.push((kernel.clone(), fd));
                }
                if let Some(i) = initrd {
                    let keep = keep_images.then_some("pv-guest-initrd");
                    if let Some(fd) = measure_file(&mut m, Kind::GuestInitrd, "initrd", i, keep)? {
                        sealed.guest.push((i.clone(), fd));
                    }
                }
                command_line
            }
        };
        m.item(Kind::CommandLine, "command line", line.as_bytes())
            .map_err(|error| MeasureError::Read {
                what: "command line",
                path: String::new(),
                error,
            })?;
        m.vcpu_state(&initial_vcpu_state(guest));
    }
    let mut log = m.finish();
    log.config = Some(manifest.measured_config());
    Ok((log, sealed))
}

/// The fields that differ between two measured configurations, one line each:
/// `services[vtpm].limits.memory: 134217728 -> 268435456`, `services[net] is new`. Lists of
/// named things (services, files, keys, listeners) are matched by name, so a reordering
/// reads as what it is.
pub fn config_diff(then: &serde_json::Value, now: &serde_json::Value) -> Vec<String> {
    use serde_json::Value;
    fn short(v: &Value) -> String {
        let t = v.to_string();
        match t.char_indices().nth(96) {
            Some((cut, _)) => format!("{}..", &t[..cut]),
            None => t,
        }
    }
    fn named(a: &[Value]) -> Option<Vec<(&str, &Value)>> {
        let names: Vec<(&str, &Value)> = a
            .iter()
            .map(|v| v.get("name").and_then(Value::as_str).map(|n| (n, v)))
            .collect::<Option<_>>()?;
        let unique = names
            .iter()
            .map(|(n, _)| *n)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            == names.len();
        unique.then_some(names)
    }
    fn walk(path: &str, then: &Value, now: &Value, out: &mut Vec<String>) {
        if out.len() >= 64 {
            return;
        }
        let join = |k: &str| {
            if path.is_empty() {
                k.to_string()
            } else {
                format!("{path}.{k}")
            }
        };
        match (then, now) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    match a.get(k) {
                        Some(old) => walk(&join(k), old, v, out),
                        None => out.push(format!("{}: (not set) -> {}", join(k), short(v))),
                    }
                }
                for (k, v) in a {
                    if !b.contains_key(k) {
                        out.push(format!("{}: {} -> (not set)", join(k), short(v)));
                    }
                }
            }
            (Value::Array(a), Value::Array(b)) => match (named(a), named(b)) {
                (Some(na), Some(nb)) => {
                    for (n, v) in &nb {
                        match na.iter().find(|(m, _)| m == n) {
                            Some((_, old)) => walk(&format!("{path}[{n}]"), old, v, out),
                            None => out.push(format!("{path}[{n}] is new")),
                        }
                    }
                    for (n, _) in &na {
                        if !nb.iter().any(|(m, _)| m == n) {
                            out.push(format!("{path}[{n}] is gone"));
                        }
                    }
                    fn common<'a>(x: &[(&'a str, &Value)], y: &[(&str, &Value)]) -> Vec<&'a str> {
                        x.iter()
                            .map(|(n, _)| *n)
                            .filter(|n| y.iter().any(|(m, _)| m == n))
                            .collect()
                    }
                    if common(&na, &nb) != common(&nb, &na) {
                        out.push(format!("{path}: the order changed"));
                    }
                }
                _ if a.len() == b.len() => {
                    for (i, (x, y)) in a.iter().zip(b).enumerate() {
                        walk(&format!("{path}[{i}]"), x, y, out);
                    }
                }
                _ => out.push(format!("{path}: {} -> {}", short(then), short(now))),
            },
            _ if then != now => out.push(format!("{path}: {} -> {}", short(then), short(now))),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", then, now, &mut out);
    out
}

/// What differs between the paravisor entries of two launch logs (the guest's are not part
/// of a seal), with the measured configuration compared field by field when both logs hold
/// it intact. Empty when they measure the same paravisor.
pub fn paravisor_changes(then: &LaunchLog, now: &LaunchLog) -> Vec<String> {
    let key = |e: &Entry| (e.kind.name().to_string(), e.name.clone());
    // "service net (pv-net)", "manifest", "microkernel paravisor".
    let label = |e: &Entry| {
        if e.name == e.kind.name() {
            e.name.clone()
        } else {
            format!("{} {}", e.kind.name(), e.name)
        }
    };
    let own = |l: &LaunchLog| -> Vec<Entry> {
        l.entries
            .iter()
            .filter(|e| !e.kind.is_guest())
            .cloned()
            .collect()
    };
    let (old, new) = (own(then), own(now));
    let mut changes = Vec::new();
    for e in &new {
        match old.iter().find(|t| key(t) == key(e)) {
            None => changes.push(format!("{} is new", label(e))),
            Some(t) if t.sha384 != e.sha384 || t.length != e.length => {
                match (e.kind, then.checked_config(), now.checked_config()) {
                    (Kind::Manifest, Some(a), Some(b)) => {
                        let fields = config_diff(a, b);
                        changes.push(format!(
                            "the measured configuration changed: {}",
                            if fields.is_empty() {
                                "(its form changed)".to_string()
                            } else {
                                fields.join(", ")
                            }
                        ))
                    }
                    _ => changes.push(format!(
                        "{} changed ({} -> {} bytes, SHA-384 {}.. -> {}..)",
                        label(e),
                        t.length,
                        e.length,
                        &hex(&t.sha384)[..12],
                        &hex(&e.sha384)[..12]
                    )),
                }
            }
            Some(_) => {}
        }
    }
    for t in &old {
        if !new.iter().any(|e| key(e) == key(t)) {
            changes.push(format!("{} is gone", label(t)));
        }
    }
    if changes.is_empty() && digest_of(&old) != digest_of(&new) {
        changes.push("the order of the launch changed".into());
    }
    changes
}

/// The log as text.
pub fn text(log: &LaunchLog) -> String {
    let mut out = format!(
        "launch log ({} entries, {} bytes measured)\n  {:>3} {:<13} {:>10} {:<96} name\n",
        log.entries.len(),
        log.bytes,
        "seq",
        "kind",
        "length",
        "sha384"
    );
    for e in &log.entries {
        out.push_str(&format!(
            "  {:>3} {:<13} {:>10} {} {}\n",
            e.seq,
            e.kind.name(),
            e.length,
            hex(&e.sha384),
            match &e.path {
                Some(p) => format!("{}  [{p}]", e.name),
                None => e.name.clone(),
            }
        ));
    }
    out.push_str(&format!(
        "measurement (SNP launch digest): {}\n",
        hex(&log.measurement)
    ));
    out.push_str(&format!(
        "paravisor measurement (its entries without the guest; what sealed state is bound to): {}\n",
        hex(&log.paravisor_measurement())
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_diff_names_each_changed_field_and_matches_lists_by_name() {
        let then = serde_json::json!({
            "services": [
                {"name": "vmgs", "limits": {"memory": 1, "open_files": 32}, "syscalls": ["a"]},
                {"name": "vtpm", "limits": {"memory": 2, "open_files": 32}},
                {"name": "net", "limits": {"memory": 3, "open_files": 32}},
            ],
            "attest": {"sealing": "measurement"},
        });
        let now = serde_json::json!({
            "services": [
                {"name": "vtpm", "limits": {"memory": 4, "open_files": 32}},
                {"name": "vmgs", "limits": {"memory": 1, "open_files": 32}, "syscalls": ["a", "b"]},
                {"name": "disk", "limits": {"memory": 3, "open_files": 32}},
            ],
            "attest": {"sealing": "platform", "key_release_id": "ab"},
        });
        let d = config_diff(&then, &now);
        for want in [
            "services[vtpm].limits.memory: 2 -> 4",
            "services[vmgs].syscalls: [\"a\"] -> [\"a\",\"b\"]",
            "services[disk] is new",
            "services[net] is gone",
            "services: the order changed",
            "attest.sealing: \"measurement\" -> \"platform\"",
            "attest.key_release_id: (not set) -> \"ab\"",
        ] {
            assert!(d.iter().any(|l| l == want), "{want} not in {d:#?}");
        }
        assert_eq!(d.len(), 7, "{d:#?}");
        assert!(config_diff(&then, &then).is_empty());
    }

    fn log_of(items: &[(Kind, &str, &[u8])], config: Option<serde_json::Value>) -> LaunchLog {
        let mut m = Measurer::default();
        for (kind, name, bytes) in items {
            m.item(*kind, name, *bytes).unwrap();
        }
        let mut log = m.finish();
        log.config = config;
        log
    }

    /// The seal binds the paravisor's entries; the guest it boots changes the report's
    /// measurement only.
    #[test]
    fn the_paravisor_measurement_leaves_the_guest_out() {
        let config = serde_json::json!({"services": [{"name": "a", "max": 1}]});
        let bytes = crate::manifest::canonical_json(&config);
        let own: Vec<(Kind, &str, &[u8])> = vec![
            (Kind::Microkernel, "paravisor", b"mk"),
            (Kind::Manifest, "manifest", &bytes),
            (Kind::Service, "a (pv-a)", b"a"),
        ];
        let alone = log_of(&own, Some(config.clone()));
        let mut with_guest = own.clone();
        with_guest.push((Kind::GuestImage, "guest image", b"guest"));
        with_guest.push((Kind::CommandLine, "command line", b"console=ttyS0"));
        let guest = log_of(&with_guest, Some(config.clone()));
        assert_eq!(alone.measurement, alone.paravisor_measurement());
        assert_ne!(guest.measurement, alone.measurement);
        assert_eq!(guest.paravisor_measurement(), alone.paravisor_measurement());
        assert!(paravisor_changes(&alone, &guest).is_empty());
        // A changed service or configuration is a change of the paravisor, named.
        let other = serde_json::json!({"services": [{"name": "a", "max": 2}]});
        let other_bytes = crate::manifest::canonical_json(&other);
        let changed = log_of(
            &[
                (Kind::Microkernel, "paravisor", b"mk"),
                (Kind::Manifest, "manifest", &other_bytes),
                (Kind::Service, "a (pv-a)", b"a2"),
            ],
            Some(other),
        );
        assert_ne!(
            changed.paravisor_measurement(),
            alone.paravisor_measurement()
        );
        let c = paravisor_changes(&alone, &changed);
        assert_eq!(c.len(), 2, "{c:#?}");
        assert_eq!(
            c[0],
            "the measured configuration changed: services[a].max: 1 -> 2"
        );
        assert!(
            c[1].starts_with("service a (pv-a) changed (1 -> 2 bytes"),
            "{c:#?}"
        );
        // A config that is not the measured one is not believed: the entry is named instead.
        let mut forged = changed.clone();
        forged.config = Some(config);
        assert!(forged.checked_config().is_none());
        assert!(paravisor_changes(&alone, &forged)[0].starts_with("manifest changed ("));
    }

    #[test]
    fn the_digest_chains_page_info_records() {
        // Two steps by hand: PAGE_INFO = digest || SHA-384(page) || 0x70 || type || zeros
        // || gpa, hashed.
        let page = [7u8; PAGE];
        let mut d = LaunchDigest::default();
        d.normal_page(0x1000, &page);
        let mut info = vec![0u8; 48];
        info.extend_from_slice(&Sha384::digest(page));
        info.extend_from_slice(&[0x70, 0, 1, 0, 0, 0, 0, 0]);
        info.extend_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(info.len(), 0x70);
        let expected: Digest384 = Sha384::digest(&info).into();
        assert_eq!(d.value(), expected);
    }

    /// The same two steps through an independent implementation of SNP's launch digest
    /// (sev-snp-measure 0.0.13, PyPI: `GCTX().update_normal_pages(0x1000, b"\x07" * 4096);
    /// .update_vmsa_page(b"\x09" * 4096); .ld().hex()`).
    #[test]
    fn the_chain_matches_an_independent_snp_implementation() {
        let mut d = LaunchDigest::default();
        d.normal_page(0x1000, &[7u8; PAGE]);
        d.vmsa_page(&[9u8; PAGE]);
        assert_eq!(
            hex(&d.value()),
            "82c4cc1e53d764bde2b7772c4af53dbc05dbd748093b0d6396e7a7b365ad1f86\
             492bfc65180b37df6ec2ff2daafd2f4e"
        );
    }

    #[test]
    fn a_changed_byte_or_order_changes_the_measurement() {
        let measure = |items: &[&[u8]]| {
            let mut m = Measurer::default();
            for (i, it) in items.iter().enumerate() {
                m.item(Kind::Service, &i.to_string(), *it).unwrap();
            }
            m.finish().measurement
        };
        let a = measure(&[b"one", b"two"]);
        assert_eq!(a, measure(&[b"one", b"two"]));
        assert_ne!(a, measure(&[b"one", b"twp"]));
        assert_ne!(a, measure(&[b"two", b"one"]));
        // Lengths are bound: a trailing zero byte is a different item.
        assert_ne!(a, measure(&[b"one", b"two\0"]));
    }

    #[test]
    fn the_log_alone_gives_the_measurement_and_records_each_item() {
        let mut m = Measurer::default();
        let big = vec![1u8; 3 * PAGE + 1];
        m.item(Kind::Manifest, "m", &big[..]).unwrap();
        m.item(Kind::Service, "s", &b"x"[..]).unwrap();
        m.vcpu_state(&[9u8; 100]);
        let log = m.finish();
        assert_eq!(log.entries[0].gpa, IMAGE_BASE);
        assert_eq!(log.entries[1].gpa, IMAGE_BASE + PAGE as u64);
        assert_eq!(log.entries[2].gpa, VMSA_GPA);
        assert_eq!(log.entries[0].length, 3 * PAGE as u64 + 1);
        let h: Digest384 = Sha384::digest(&big).into();
        assert_eq!(log.entries[0].sha384, h);
        assert_eq!(log.bytes, 3 * PAGE as u64 + 2 + 100);
        // A verifier holding only the log gets the same measurement.
        assert_eq!(digest_of(&log.entries), log.measurement);
        let mut tampered = log.entries.clone();
        tampered[1].length += 1;
        assert_ne!(digest_of(&tampered), log.measurement);
    }
}
