//! `paravisor bench vmgs`: the guest-state store against plain file I/O in the same run.
//!
//! - 1 MiB encrypted write (a full commit: encryption, data, tables, two flushes, header)
//!   against `pwrite` + `fdatasync` of the same bytes to a scratch file on the same file
//!   system;
//! - 1 MiB encrypted read (read + authenticated decryption) against `pread`;
//! - a 1 KiB encrypted write through a vmgs server process over our ring (request, commit,
//!   acknowledgement) against a 1 KiB `pwrite` + `fdatasync`.
//!
//! Samples of the two sides are interleaved so that drift on a shared machine hits both;
//! the report gives medians and the ratio of medians.

use std::fs::File;
use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use ipc_defs::endpoint;
use ipc_defs::hosted::sys;
use ipc_defs::hosted::vmgs_client::VmgsClient;
use ipc_defs::hosted::ChannelMemory;
use ipc_defs::hosted::ClientEnd;
use ipc_defs::hosted::ServerEnd;
use ipc_defs::hosted::WaitPolicy;
use ipc_defs::services::vmgs;
use ipc_defs::services::vmgs::FileId;
use ipc_defs::services::vmgs::FileIdSet;
use pv_vmgs::server::Server;
use pv_vmgs::FileStorage;
use pv_vmgs::Key;
use pv_vmgs::Vmgs;
use serde::Serialize;

/// One comparison: our operation against its plain baseline, both medians.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub what: String,
    pub ours_median_us: f64,
    pub baseline: String,
    pub baseline_median_us: f64,
    /// ours / baseline.
    pub ratio: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub directory: String,
    pub samples: usize,
    pub comparisons: Vec<Comparison>,
}

const MIB: usize = 1 << 20;
/// The image the benchmark creates: room for several shadow copies of a 1 MiB file.
const IMAGE: u64 = 8 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Runs `ours` and `base` alternately `samples` times (after one warm-up each) and returns
/// the medians in microseconds.
fn interleaved(
    samples: usize,
    mut ours: impl FnMut() -> std::io::Result<()>,
    mut base: impl FnMut() -> std::io::Result<()>,
) -> std::io::Result<(f64, f64)> {
    ours()?;
    base()?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let t = Instant::now();
        ours()?;
        a.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        base()?;
        b.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((median(a), median(b)))
}

fn comparison(what: &str, baseline: &str, (ours, base): (f64, f64)) -> Comparison {
    Comparison {
        what: what.into(),
        ours_median_us: ours,
        baseline: baseline.into(),
        baseline_median_us: base,
        ratio: ours / base,
    }
}

fn io(e: pv_vmgs::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn scratch(dir: &Path, name: &str) -> std::io::Result<File> {
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    // Unlinked at once: nothing is left behind, whatever happens.
    std::fs::remove_file(&path)?;
    Ok(f)
}

/// Runs the comparisons in `dir` (a directory on the file system to measure).
pub fn run(dir: &Path, samples: usize) -> std::io::Result<Report> {
    std::fs::create_dir_all(dir)?;
    let key = Key::random();
    let data: Vec<u8> = (0..MIB).map(|i| (i * 7 + i / 4096) as u8).collect();
    let mut comparisons = Vec::new();

    // The store and the baseline file, both fully allocated before measuring.
    let vmgs_file = scratch(dir, ".pv-bench-vmgs")?;
    let mut vmgs = Vmgs::create(FileStorage::new(vmgs_file), IMAGE, Some(&key)).map_err(io)?;
    let plain = scratch(dir, ".pv-bench-plain")?;
    plain.write_all_at(&vec![0u8; 2 * MIB], 0)?;
    plain.sync_all()?;
    for _ in 0..3 {
        vmgs.write_file(FileId::TPM_NVRAM, &data).map_err(io)?;
    }

    let write = interleaved(
        samples,
        || vmgs.write_file(FileId::TPM_NVRAM, &data).map_err(io),
        || {
            plain.write_all_at(&data, 0)?;
            plain.sync_data()
        },
    )?;
    comparisons.push(comparison(
        "1 MiB encrypted write + commit (library)",
        "pwrite + fdatasync of 1 MiB",
        write,
    ));

    let mut buf = vec![0u8; MIB];
    let read = interleaved(
        samples,
        || {
            let got = vmgs.read_file(FileId::TPM_NVRAM).map_err(io)?;
            if got.len() != MIB {
                return Err(std::io::Error::other("short read"));
            }
            Ok(())
        },
        || plain.read_exact_at(&mut buf, 0),
    )?;
    comparisons.push(comparison(
        "1 MiB encrypted read (library)",
        "pread of 1 MiB",
        read,
    ));
    drop(vmgs);

    // Through a server process over the ring.
    let service_file = scratch(dir, ".pv-bench-service")?;
    Vmgs::create(
        FileStorage::new(service_file.try_clone()?),
        IMAGE,
        Some(&key),
    )
    .map_err(io)?;
    let key_fd = sys::memfd("pv-bench-key", 32)?;
    let key_file = File::from(key_fd);
    key_file.write_all_at(key.as_bytes(), 0)?;
    let mem = ChannelMemory::create("pv-bench-vmgs", 64 << 10).map_err(std::io::Error::other)?;
    let fds = vec![
        sys::dup_inheritable(mem.shm())?,
        sys::dup_inheritable(&service_file)?,
        sys::dup_inheritable(&key_file)?,
    ];
    let (_, theirs) = crate::bench::cpus();
    let peer = crate::bench::spawn_peer("vmgs-server", theirs, fds)?;
    let mut end: ClientEnd<endpoint::Request<()>, endpoint::Response<()>> =
        ClientEnd::new(mem, WaitPolicy::default());
    crate::bench::wait_for_server(&mut end)?;
    let mut client = VmgsClient::new(end);
    let small = &data[..1024];
    let service = interleaved(
        samples,
        || {
            client
                .write(FileId::TPM_NVRAM, small)
                .map_err(std::io::Error::other)
        },
        || {
            plain.write_all_at(small, 0)?;
            plain.sync_data()
        },
    )?;
    comparisons.push(comparison(
        "1 KiB encrypted write through the vmgs server (round trip incl. commit)",
        "pwrite + fdatasync of 1 KiB",
        service,
    ));
    drop(peer);

    Ok(Report {
        directory: dir.display().to_string(),
        samples,
        comparisons,
    })
}

/// The server side: the same request handling as `pv-vmgs`, over one channel.
pub fn serve(channel: OwnedFd, file: OwnedFd, key: OwnedFd) -> std::io::Result<()> {
    let mut bytes = [0u8; 32];
    File::from(key).read_exact_at(&mut bytes, 0)?;
    let key = Key::from_bytes(bytes);
    let mut server = Server::open(FileStorage::new(File::from(file)), Some(key)).map_err(io)?;
    let mem = ChannelMemory::open(channel).map_err(std::io::Error::other)?;
    let mut end = ServerEnd::new(mem);
    let granted = FileIdSet::EMPTY.with(FileId::TPM_NVRAM);
    loop {
        match end.try_next() {
            Ok(Some(incoming)) => {
                let reply = match end.decode::<endpoint::Request<vmgs::Request>>(&incoming) {
                    Some(endpoint::Request::Ping { nonce }) => endpoint::Response::Pong { nonce },
                    Some(endpoint::Request::Service(q)) => {
                        endpoint::Response::Service(server.handle("bench", granted, q))
                    }
                    Some(endpoint::Request::Guest(_)) | None => {
                        endpoint::Response::Error(endpoint::ErrorCode::Malformed)
                    }
                };
                let _ = end.reply(&incoming, &reply, Duration::from_secs(1));
            }
            Ok(None) => ipc_defs::hosted::channel::wait_any(
                &[end.request_ring()],
                WaitPolicy::default(),
                Duration::from_secs(5),
            ),
            Err(_) => {}
        }
    }
}

pub fn text(r: &Report) -> String {
    let mut out = format!(
        "VMGS store vs plain file I/O in {} (median of {} interleaved samples)\n",
        r.directory, r.samples
    );
    for c in &r.comparisons {
        out.push_str(&format!(
            "  {:<72} {:>9.1} us   vs {:<28} {:>9.1} us   ratio {:.2}x\n",
            c.what, c.ours_median_us, c.baseline, c.baseline_median_us, c.ratio
        ));
    }
    out
}
