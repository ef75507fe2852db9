//! `paravisor bench measure`: the launch measurement of a manifest as `run` does it (it hashes
//! the microkernel, every service binary and library, the guest image, ..., and copies each
//! binary and library into the sealed memfd it will use) against `sha384sum` of the same
//! files, in the same run.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Report {
    pub bytes: u64,
    pub runs: usize,
    /// Medians, in milliseconds.
    pub measure_ms: f64,
    pub sha384sum_ms: Option<f64>,
    pub measure_gb_per_s: f64,
    pub sha384sum_gb_per_s: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run(manifest: &Path, bin_dir: &Path, quick: bool) -> std::io::Result<Report> {
    let m = microkernel::manifest::Manifest::load(manifest)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let guest = microkernel::partition::GuestConfig {
        image: microkernel::partition::Image::TestGuest {
            path: None,
            command_line: String::new(),
        },
        memory: microkernel::partition::TEST_GUEST_MEMORY,
        vcpus: 1,
        watchdog: None,
    };
    // The baseline hashes the same files: every entry read from a file (the microkernel,
    // the service binaries, their libraries).
    let (log, _) = microkernel::measure::launch_sealed(&m, bin_dir, Some(&guest))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let files: Vec<String> = log
        .entries
        .iter()
        .filter(|e| e.kind != microkernel::measure::Kind::Manifest)
        .filter_map(|e| e.path.clone())
        .collect();
    let runs = if quick { 3 } else { 7 };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut bytes = 0;
    for _ in 0..runs {
        let t = Instant::now();
        // What `run` does: hash every byte and keep the sealed copies it executes.
        let (log, _sealed) = microkernel::measure::launch_sealed(&m, bin_dir, Some(&guest))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        ours.push(t.elapsed().as_secs_f64());
        bytes = log.bytes;
        let t = Instant::now();
        match Command::new("sha384sum").args(&files).output() {
            Ok(o) if o.status.success() => theirs.push(t.elapsed().as_secs_f64()),
            _ => {}
        }
    }
    let measure_s = median(ours);
    let sum_s = (!theirs.is_empty()).then(|| median(theirs));
    Ok(Report {
        bytes,
        runs,
        measure_ms: measure_s * 1e3,
        sha384sum_ms: sum_s.map(|s| s * 1e3),
        measure_gb_per_s: bytes as f64 / measure_s / 1e9,
        sha384sum_gb_per_s: sum_s.map(|s| bytes as f64 / s / 1e9),
    })
}

pub fn text(r: &Report) -> String {
    let mut out = format!(
        "launch measurement of the shipped manifest ({} bytes: microkernel, manifest, service binaries, their libraries, test guest; median of {} runs)\n  paravisor measure: {:.0} ms, {:.2} GB/s\n",
        r.bytes, r.runs, r.measure_ms, r.measure_gb_per_s
    );
    match (r.sha384sum_ms, r.sha384sum_gb_per_s) {
        (Some(ms), Some(gbs)) => out.push_str(&format!(
            "  sha384sum of the same files: {ms:.0} ms, {gbs:.2} GB/s (ours {:.2}x its time)\n",
            r.measure_ms / ms
        )),
        _ => out.push_str("  sha384sum not available: no baseline\n"),
    }
    out
}
