//! `paravisor audit --metal IMAGE`: the task table a metal kernel image carries, read from
//! its `.pv_tasks` section, decoded and checked as the kernel does ([`TaskTable::decode`]),
//! and shown as an auditor reads it: each task's slots with their grants (interface, peer,
//! VMGS file ids, region) and addresses, its heap, stack and restart policy, each image's
//! size and SHA-256.
//!
//! [`Audit`] holds the facts as data; the text is rendered from it and `--json` serializes it
//! as it is, so the two cannot disagree.

use std::fmt::Write;
use std::path::Path;

use ipc_defs::capability::Grant as ChannelGrant;
use ipc_defs::metal::Grant;
use ipc_defs::metal::RestartPolicy;
use ipc_defs::metal::TableError;
use ipc_defs::metal::TaskTable;
use object::Object;
use object::ObjectSection;
use serde::Serialize;
use sha2::Digest;

use crate::manifest::format_duration;
use crate::manifest::format_size;
use crate::manifest::grant_text;

/// The section of the kernel image that holds the task table.
pub const TASKS_SECTION: &str = ".pv_tasks";

/// Why an image's table cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an ELF file ({reason}); pass the kernel image `paravisor metal build` wrote"
    )]
    NotElf { path: String, reason: String },
    #[error("{path} has no {TASKS_SECTION} section: it is not a metal kernel image, or one built without a task table (build it with `paravisor metal build`)")]
    NoTable { path: String },
    #[error("the task table of {path} is refused: {error}")]
    Table { path: String, error: TableError },
}

/// The `.pv_tasks` section of the ELF file `elf`, if it has one.
pub fn tasks_section(elf: &[u8]) -> Result<Option<&[u8]>, object::Error> {
    let file = object::File::parse(elf)?;
    match file.section_by_name(TASKS_SECTION) {
        Some(section) => section.data().map(Some),
        None => Ok(None),
    }
}

/// The audit of one image.
#[derive(Debug, Serialize)]
pub struct Audit {
    /// The kernel image: its path, bytes and SHA-256.
    pub image: Blob,
    pub table_version: u32,
    /// Bytes of the encoded table (images included).
    pub table_bytes: usize,
    pub tasks: Vec<TaskRow>,
    pub channels: Vec<ChannelRow>,
    pub regions: Vec<RegionRow>,
    /// The task programs' images, in table order.
    pub images: Vec<ImageRow>,
}

#[derive(Debug, Serialize)]
pub struct Blob {
    pub path: String,
    pub bytes: usize,
    pub sha256: String,
}

#[derive(Debug, Serialize)]
pub struct TaskRow {
    pub index: usize,
    pub name: String,
    /// Its image's index.
    pub image: u16,
    pub args: String,
    /// Bytes.
    pub heap: u64,
    pub stack: u64,
    pub restart: RestartRow,
    pub slots: Vec<SlotRow>,
}

#[derive(Debug, Serialize)]
pub struct RestartRow {
    /// "always", "on-failure" or "never", as the manifest writes it.
    pub policy: &'static str,
    pub max: u32,
    pub window_ms: u32,
    pub backoff_ms: u32,
    pub max_backoff_ms: u32,
}

/// One capability slot of a task.
#[derive(Debug, Serialize)]
pub struct SlotRow {
    pub slot: usize,
    /// "client" (the calling end of a channel), "server" (the serving end) or "region".
    pub kind: &'static str,
    /// Channels: the interface and the peer task's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<u16>,
    /// Channels: what the client may reach, as the server enforces it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// Channels limited to VMGS file ids: those ids (numbers, ascending).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_ids: Option<Vec<u8>>,
    /// Regions: its name and index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region_index: Option<u16>,
    /// Where the task sees it, and its bytes.
    pub address: u64,
    pub size: u64,
}

#[derive(Debug, Serialize)]
pub struct ChannelRow {
    pub index: usize,
    pub interface: &'static str,
    pub client: String,
    pub server: String,
    pub grant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_ids: Option<Vec<u8>>,
    pub ring_capacity: u32,
}

#[derive(Debug, Serialize)]
pub struct RegionRow {
    pub index: usize,
    pub name: String,
    pub size: u64,
    /// The task that holds it.
    pub holder: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ImageRow {
    pub index: usize,
    pub bytes: usize,
    pub sha256: String,
    /// The tasks that run it.
    pub tasks: Vec<String>,
}

fn sha256(bytes: &[u8]) -> String {
    crate::util::hex(&sha2::Sha256::digest(bytes))
}

fn file_ids(grant: &ChannelGrant) -> Option<Vec<u8>> {
    match grant {
        ChannelGrant::VmgsFiles(set) => Some(set.iter().map(|f| f.index() as u8).collect()),
        _ => None,
    }
}

fn policy_name(p: RestartPolicy) -> &'static str {
    match p {
        RestartPolicy::Always => "always",
        RestartPolicy::OnFailure => "on-failure",
        RestartPolicy::Never => "never",
    }
}

/// Reads the image at `path` and audits its table.
pub fn audit_file(path: &Path) -> Result<Audit, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Read {
        path: path.display().to_string(),
        source,
    })?;
    audit(&path.display().to_string(), &bytes)
}

/// Audits the table of the kernel image `elf` (named `path` in messages).
pub fn audit(path: &str, elf: &[u8]) -> Result<Audit, ImageError> {
    let section = tasks_section(elf)
        .map_err(|e| ImageError::NotElf {
            path: path.into(),
            reason: e.to_string(),
        })?
        .ok_or_else(|| ImageError::NoTable { path: path.into() })?;
    let table = TaskTable::decode(section).map_err(|error| ImageError::Table {
        path: path.into(),
        error,
    })?;
    Ok(rows(path, elf, section.len(), &table))
}

/// The audit of a decoded and checked `table` (every index in range).
fn rows(path: &str, elf: &[u8], table_bytes: usize, table: &TaskTable) -> Audit {
    let name = |t: u16| {
        table
            .tasks
            .get(usize::from(t))
            .map_or_else(|| format!("#{t}"), |t| t.name.to_string())
    };
    let tasks = table
        .tasks
        .iter()
        .enumerate()
        .map(|(index, t)| TaskRow {
            index,
            name: t.name.into(),
            image: t.image,
            args: t.args.into(),
            heap: t.heap,
            stack: t.stack,
            restart: RestartRow {
                policy: policy_name(t.restart.policy),
                max: t.restart.max,
                window_ms: t.restart.window_ms,
                backoff_ms: t.restart.backoff_ms,
                max_backoff_ms: t.restart.max_backoff_ms,
            },
            slots: t
                .slots
                .iter()
                .enumerate()
                .map(|(slot, s)| {
                    let mut row = SlotRow {
                        slot,
                        kind: "region",
                        interface: None,
                        peer: None,
                        channel: None,
                        grant: None,
                        file_ids: None,
                        region: None,
                        region_index: None,
                        address: s.address,
                        size: s.size,
                    };
                    match s.grant {
                        Grant::Client { channel } | Grant::Server { channel } => {
                            let c = &table.channels[usize::from(channel)];
                            let server = matches!(s.grant, Grant::Server { .. });
                            row.kind = if server { "server" } else { "client" };
                            row.interface = Some(c.interface.name());
                            row.peer = Some(name(if server { c.client } else { c.server }));
                            row.channel = Some(channel);
                            row.grant = Some(grant_text(&c.grant));
                            row.file_ids = file_ids(&c.grant);
                        }
                        Grant::Region { region } => {
                            row.region = Some(table.regions[usize::from(region)].name.into());
                            row.region_index = Some(region);
                        }
                    }
                    row
                })
                .collect(),
        })
        .collect();
    let channels = table
        .channels
        .iter()
        .enumerate()
        .map(|(index, c)| ChannelRow {
            index,
            interface: c.interface.name(),
            client: name(c.client),
            server: name(c.server),
            grant: grant_text(&c.grant),
            file_ids: file_ids(&c.grant),
            ring_capacity: c.ring_capacity,
        })
        .collect();
    let regions = table
        .regions
        .iter()
        .enumerate()
        .map(|(index, r)| RegionRow {
            index,
            name: r.name.into(),
            size: r.size,
            holder: table
                .tasks
                .iter()
                .find(|t| {
                    t.slots.iter().any(|s| {
                        s.grant
                            == Grant::Region {
                                region: index as u16,
                            }
                    })
                })
                .map(|t| t.name.to_string()),
        })
        .collect();
    let images = table
        .images
        .iter()
        .enumerate()
        .map(|(index, image)| ImageRow {
            index,
            bytes: image.len(),
            sha256: sha256(image),
            tasks: table
                .tasks
                .iter()
                .filter(|t| usize::from(t.image) == index)
                .map(|t| t.name.to_string())
                .collect(),
        })
        .collect();
    Audit {
        image: Blob {
            path: path.into(),
            bytes: elf.len(),
            sha256: sha256(elf),
        },
        table_version: table.version,
        table_bytes,
        tasks,
        channels,
        regions,
        images,
    }
}

fn count(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

/// The audit as text.
pub fn text(a: &Audit) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "metal image {} ({} bytes, sha256 {})\ntask table version {}, {} bytes: {}, {}, {}, {}",
        a.image.path,
        a.image.bytes,
        a.image.sha256,
        a.table_version,
        a.table_bytes,
        count(a.tasks.len(), "task"),
        count(a.channels.len(), "channel"),
        count(a.regions.len(), "region"),
        count(a.images.len(), "image")
    );
    for t in &a.tasks {
        let r = &t.restart;
        let _ = writeln!(
            out,
            "\ntask {} \"{}\": image {}, heap {}, stack {}, restart {} (at most {} per {}, backoff {} up to {})",
            t.index,
            t.name,
            t.image,
            format_size(t.heap),
            format_size(t.stack),
            r.policy,
            r.max,
            format_duration(std::time::Duration::from_millis(r.window_ms.into())),
            format_duration(std::time::Duration::from_millis(r.backoff_ms.into())),
            format_duration(std::time::Duration::from_millis(r.max_backoff_ms.into())),
        );
        if !t.args.is_empty() {
            let _ = writeln!(out, "  args: {}", t.args);
        }
        if t.slots.is_empty() {
            let _ = writeln!(out, "  no slots: it can reach no other task and no region");
        }
        for s in &t.slots {
            let place = format!("{:#x}+{}", s.address, format_size(s.size));
            let what = match s.kind {
                "region" => format!(
                    "region \"{}\" (region {})",
                    s.region.as_deref().unwrap_or("?"),
                    s.region_index.unwrap_or(0)
                ),
                kind => format!(
                    "{} {} {} \"{}\" (channel {}): {}",
                    if kind == "server" { "serves" } else { "calls" },
                    s.interface.unwrap_or("?"),
                    if kind == "server" { "to" } else { "on" },
                    s.peer.as_deref().unwrap_or("?"),
                    s.channel.unwrap_or(0),
                    s.grant.as_deref().unwrap_or("?"),
                ),
            };
            let _ = writeln!(out, "  slot {:<2} {place:<24} {what}", s.slot);
        }
    }
    if !a.channels.is_empty() {
        let _ = writeln!(out, "\nchannels:");
    }
    for c in &a.channels {
        let _ = writeln!(
            out,
            "  {} {}: \"{}\" calls \"{}\", rings of {}, the client may reach: {}",
            c.index,
            c.interface,
            c.client,
            c.server,
            format_size(c.ring_capacity.into()),
            c.grant
        );
    }
    if !a.regions.is_empty() {
        let _ = writeln!(out, "\nregions:");
    }
    for r in &a.regions {
        let _ = writeln!(
            out,
            "  {} \"{}\": {}, held by \"{}\"",
            r.index,
            r.name,
            format_size(r.size),
            r.holder.as_deref().unwrap_or("no task")
        );
    }
    let _ = writeln!(out, "\nimages:");
    for i in &a.images {
        let _ = writeln!(
            out,
            "  {}: {} bytes, sha256 {}, run by {}",
            i.index,
            i.bytes,
            i.sha256,
            i.tasks.join(", ")
        );
    }
    out
}
