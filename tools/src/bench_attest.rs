//! `paravisor bench attest`: report and derived-key latency through the attest service of a
//! running paravisor (microkernel -> attest -> platform thread -> back), against the same
//! platform operations called directly in one process, in the same run.
//!
//! The timing loop runs inside the supervisor (`Command::AttestBench`), over its own channel
//! to attest: the numbers hold the two channel hops and the service's work, not the control
//! socket's.

use std::path::Path;
use std::time::Duration;
use std::time::Instant;

use serde::Serialize;

use microkernel::control::Latencies;

#[derive(Debug, Serialize)]
pub struct Report {
    pub latencies: Latencies,
    pub report_ratio: f64,
    pub key_ratio: f64,
}

pub fn run(manifest: &Path, dir: &Path, quick: bool) -> std::io::Result<Report> {
    let samples = if quick { 20 } else { 301 };
    let text = std::fs::read_to_string(manifest)?;
    let (_paravisor, state) = crate::bench_vtpm::start_instance(&text, &dir.join("instance"), &[])?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let latencies = loop {
        match microkernel::control::send(
            &state,
            &microkernel::control::Command::AttestBench { samples },
        ) {
            Ok(microkernel::control::Reply::AttestBench(l)) => break l,
            Ok(microkernel::control::Reply::Error { message }) if Instant::now() > deadline => {
                return Err(std::io::Error::other(message))
            }
            _ if Instant::now() > deadline => {
                return Err(std::io::Error::other(format!(
                    "the paravisor did not answer; its log ends:\n{}",
                    crate::bench_guest::log_tail(&dir.join("instance/paravisor.log"))
                )))
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    Ok(Report {
        report_ratio: latencies.report_service_us / latencies.report_direct_us,
        key_ratio: latencies.key_service_us / latencies.key_direct_us,
        latencies,
    })
}

pub fn text(r: &Report) -> String {
    let l = &r.latencies;
    format!(
        "attestation latency, median of {} calls each (through the attest service vs the platform called directly, same run)\n\
         {:<34} {:>10} {:>10} {:>8}\n\
         {:<34} {:>8.1} us {:>7.1} us {:>7.2}x\n\
         {:<34} {:>8.1} us {:>7.1} us {:>7.2}x\n",
        l.samples,
        "",
        "service",
        "direct",
        "ratio",
        "GetReport (P-384 signature)",
        l.report_service_us,
        l.report_direct_us,
        r.report_ratio,
        "GetDerivedKey (SP 800-108)",
        l.key_service_us,
        l.key_direct_us,
        r.key_ratio,
    )
}
