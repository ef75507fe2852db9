//! `pv-tools`: the commands of `paravisor` that are not the trusted core (the verifier,
//! the key broker, the vmgs tool, the benchmarks). `paravisor` hands them over with the
//! command line as given, before parsing it; their arguments are defined here
//! (`pv_tools::cli`), not in the trusted binary.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use microkernel::cli::bin_dir;
use microkernel::cli::load;
use microkernel::cli::usage_error;
use microkernel::cli::GuestArgs;
use microkernel::manifest::DEFAULT_MANIFEST;
use pv_tools::cli::AttestCmd;
use pv_tools::cli::PlatformCmd;
use pv_tools::cli::ToolCli as Cli;
use pv_tools::cli::ToolCmd as Cmd;

fn main() -> ExitCode {
    // A core command (`check`, `run`, `vmgs reseal`, ...) is refused here, never run.
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let core_command = args.first().and_then(|a| a.to_str()).is_some_and(|first| {
        use clap::CommandFactory;
        first != "help"
            && microkernel::cli::Cli::command()
                .find_subcommand(first)
                .is_some()
    });
    if core_command && !microkernel::cli::is_tool_command(&args) {
        eprintln!("paravisor: this command is the core's: run it as `paravisor`, not `pv-tools`");
        return ExitCode::from(2);
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    let prints_only = matches!(
        cli.command,
        Cmd::Attest {
            action: AttestCmd::Fingerprint { .. } | AttestCmd::Verify { .. }
        } | Cmd::Vmgs { .. }
    );
    if prints_only {
        microkernel::sandbox::default_sigpipe();
    }
    // Every child of a benchmark is waited for when `run` returns: its CPU time is ours.
    let load =
        matches!(cli.command, Cmd::Bench { .. }).then(pv_tools::bench_env::MachineLoad::start);
    let code = match run(cli) {
        Ok(code) | Err(code) => code,
    };
    if let Some(warning) = load.and_then(|l| l.warning()) {
        eprintln!("paravisor: {warning}");
    }
    code
}

fn run(cli: Cli) -> Result<ExitCode, ExitCode> {
    match cli.command {
        Cmd::Attest { action } => attest(action),
        Cmd::Platform {
            action: PlatformCmd::Init { platform_dir },
        } => {
            let started = std::time::Instant::now();
            match pv_tools::provision::init(&platform_dir) {
                Ok(p) => {
                    println!(
                        "SIMULATED platform provisioned in {} ({:.1} s): {}, {}, {} and {} \
                         (the chip secret is a plain file: this platform is for development \
                         and tests, never for secrets); chip id {}",
                        platform_dir.display(),
                        started.elapsed().as_secs_f64(),
                        microkernel::snp::ARK_PEM,
                        microkernel::snp::ASK_PEM,
                        microkernel::snp::VCEK_PEM,
                        microkernel::platform::CHIP_SECRET,
                        &microkernel::util::hex(&p.chip_id())[..16]
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("paravisor: {e}");
                    Err(ExitCode::FAILURE)
                }
            }
        }
        Cmd::Bench { what, .. }
            if [
                "vtpm", "guest", "measure", "attest", "memory", "storage", "net", "boot", "chaos",
            ]
            .contains(&what.as_str())
                && !Path::new(DEFAULT_MANIFEST).is_file() =>
        {
            eprintln!(
                "paravisor: bench {what} runs the {DEFAULT_MANIFEST} of the current directory, \
                 and there is none here: run it from the directory that holds the shipped \
                 manifest (the repository's root)"
            );
            Err(ExitCode::FAILURE)
        }
        Cmd::Bench {
            what,
            dir,
            samples,
            quick,
            json,
            ..
        } if what == "vmgs" => {
            let dir = bench_dir(&what, dir.as_deref())?;
            let samples = if quick { 5 } else { samples };
            let report = pv_tools::bench_vmgs::run(dir.path(), samples);
            print_report(report, json, pv_tools::bench_vmgs::text)
        }
        Cmd::Bench {
            what,
            dir,
            quick,
            json,
            image_script,
            seconds,
            ..
        } if ["storage", "net", "chaos", "boot"].contains(&what.as_str()) => {
            // The benches that boot a Linux guest: one image, one temporary directory.
            let dir = bench_dir(&what, dir.as_deref())?;
            let script = image_script.unwrap_or_else(|| pv_tools::linux_guest::BUILD_SCRIPT.into());
            let manifest = Path::new(DEFAULT_MANIFEST);
            match what.as_str() {
                "storage" => {
                    let effort = if quick {
                        pv_tools::bench_storage::Effort::QUICK
                    } else {
                        pv_tools::bench_storage::Effort::FULL
                    };
                    print_report(
                        pv_tools::bench_storage::run(manifest, dir.path(), &script, effort),
                        json,
                        pv_tools::bench_storage::text,
                    )
                }
                "net" => {
                    let effort = if quick {
                        pv_tools::bench_net::Effort::QUICK
                    } else {
                        pv_tools::bench_net::Effort::FULL
                    };
                    print_report(
                        pv_tools::bench_net::run(manifest, dir.path(), &script, effort),
                        json,
                        pv_tools::bench_net::text,
                    )
                }
                "chaos" => {
                    let seconds = seconds.unwrap_or(if quick { 60 } else { 600 });
                    let report = pv_tools::bench_chaos::run(
                        manifest,
                        &bin_dir(),
                        dir.path(),
                        &script,
                        seconds,
                    );
                    let held = report.as_ref().is_ok_and(|r| r.held);
                    let code = print_report(report, json, pv_tools::bench_chaos::text)?;
                    if held {
                        Ok(code)
                    } else {
                        Err(ExitCode::FAILURE)
                    }
                }
                _ => print_report(
                    pv_tools::bench_boot::run(manifest, &bin_dir(), dir.path(), &script, quick),
                    json,
                    pv_tools::bench_boot::text,
                ),
            }
        }
        Cmd::Bench {
            what, quick, json, ..
        } if what == "measure" => {
            let report =
                pv_tools::bench_measure::run(Path::new(DEFAULT_MANIFEST), &bin_dir(), quick);
            print_report(report, json, pv_tools::bench_measure::text)
        }
        Cmd::Bench {
            what,
            dir,
            quick,
            json,
            ..
        } if ["attest", "guest", "vtpm", "memory"].contains(&what.as_str()) => {
            let dir = bench_dir(&what, dir.as_deref())?;
            let manifest = Path::new(DEFAULT_MANIFEST);
            match what.as_str() {
                "attest" => print_report(
                    pv_tools::bench_attest::run(manifest, dir.path(), quick),
                    json,
                    pv_tools::bench_attest::text,
                ),
                "guest" => print_report(
                    pv_tools::bench_guest::run(manifest, dir.path(), quick),
                    json,
                    pv_tools::bench_guest::text,
                ),
                "vtpm" => print_report(
                    pv_tools::bench_vtpm::run(manifest, dir.path(), quick),
                    json,
                    pv_tools::bench_vtpm::text,
                ),
                _ => print_report(
                    pv_tools::bench_memory::run(manifest, dir.path(), &bin_dir()),
                    json,
                    pv_tools::bench_memory::text,
                ),
            }
        }
        Cmd::Bench {
            samples,
            quick,
            json,
            ..
        } => {
            let mut effort = pv_tools::bench::Effort {
                samples,
                ..Default::default()
            };
            if quick {
                effort = pv_tools::bench::Effort {
                    samples: 5,
                    fast_batch: 200,
                    slow_batch: 20,
                    idle: std::time::Duration::from_millis(500),
                };
            }
            let report = pv_tools::bench::run(effort);
            print_report(report, json, pv_tools::bench::text)
        }
        Cmd::BenchPeer { kind, cpu, fds } => {
            pv_tools::bench::peer(&kind, cpu, &fds).map_err(|e| {
                eprintln!("paravisor bench peer {kind}: {e}");
                ExitCode::FAILURE
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Vmgs { command } => Ok(pv_tools::vmgs_cli::run(command)),
        Cmd::Kbs { command } => Ok(pv_tools::kbs::run(command)),
        Cmd::Metal { action } => pv_tools::metal::command(action),
    }
}

fn attest(action: AttestCmd) -> Result<ExitCode, ExitCode> {
    let fail = |e: String| {
        eprintln!("paravisor: {e}");
        ExitCode::FAILURE
    };
    match action {
        AttestCmd::Fingerprint { certs } => {
            let f = pv_tools::verify::ark_fingerprint(&certs).map_err(|e| fail(e.to_string()))?;
            println!("{f}");
            Ok(ExitCode::SUCCESS)
        }
        AttestCmd::Verify {
            report,
            certs,
            ark_fingerprint,
            expected_measurement,
            launch_log,
            manifest,
            guest,
            nonce,
            strict,
            json,
        } => {
            // Any size error is the verifier's to name (a report is exactly 0x4A0 bytes).
            let bytes = microkernel::util::read_at_most(&report, 1 << 20)
                .map_err(|e| fail(format!("{}: {e}", report.display())))?;
            let log: Option<microkernel::measure::LaunchLog> = match &launch_log {
                Some(path) => Some(
                    microkernel::util::read_at_most(path, 16 << 20)
                        .map_err(|e| e.to_string())
                        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
                        .map_err(|e| fail(format!("launch log {}: {e}", path.display())))?,
                ),
                None => None,
            };
            let expected: Option<[u8; 48]> = match (expected_measurement, manifest) {
                _ if log.is_some() => log
                    .as_ref()
                    .map(|l| microkernel::measure::digest_of(&l.entries)),
                (Some(m), _) => Some(
                    microkernel::util::parse_hex(&m)
                        .and_then(|v| v.try_into().ok())
                        .ok_or_else(|| {
                            fail("--expected-measurement is not 48 bytes of hex".into())
                        })?,
                ),
                (None, Some(path)) => {
                    let m = load(Some(&path))?;
                    let measure = |g: &GuestArgs| -> Result<[u8; 48], ExitCode> {
                        let config = g.config()?;
                        Ok(
                            microkernel::measure::launch(&m, &bin_dir(), config.as_ref())
                                .map_err(|e| fail(e.to_string()))?
                                .measurement,
                        )
                    };
                    let with_guest = measure(&guest)?;
                    if guest.is_default() {
                        // No guest options: this release launched with its test guest, or
                        // with none (`run --no-guest`); the report says which.
                        let without = measure(&GuestArgs {
                            no_guest: true,
                            ..GuestArgs::default()
                        })?;
                        let reported = bytes.get(0x90..0xC0);
                        if reported == Some(&without[..]) {
                            eprintln!("(measurement: this release launched without a guest, `run --no-guest`)");
                            Some(without)
                        } else {
                            if reported == Some(&with_guest[..]) {
                                eprintln!(
                                    "(measurement: this release launched with its test guest)"
                                );
                            }
                            Some(with_guest)
                        }
                    } else {
                        Some(with_guest)
                    }
                }
                (None, None) => None,
            };
            let nonce = match &nonce {
                Some(n) => Some(
                    microkernel::util::parse_hex(n)
                        .ok_or_else(|| fail("--nonce must be hex bytes, e.g. 00112233".into()))?,
                ),
                None => None,
            };
            let data = nonce.as_deref().map(microkernel::snp::report_data_for);
            let verification = pv_tools::verify::verify_checked(
                &bytes,
                &certs,
                &ark_fingerprint,
                expected.as_ref(),
                data.as_ref(),
            );
            report_verification(
                verification,
                VerifyRequest {
                    measurement_given: expected.is_some(),
                    nonce: nonce.as_deref(),
                    strict,
                    json,
                    log: log.as_ref(),
                },
            )
        }
    }
}

/// What `attest verify` was asked, for [`report_verification`].
struct VerifyRequest<'a> {
    measurement_given: bool,
    nonce: Option<&'a [u8]>,
    strict: bool,
    json: bool,
    log: Option<&'a microkernel::measure::LaunchLog>,
}

/// Prints a verification (text, or JSON with every check) and gives the exit status: 0
/// verified, 1 refused (also, under --strict, for a missing measurement or nonce).
fn report_verification(
    mut verification: pv_tools::verify::Verification,
    req: VerifyRequest,
) -> Result<ExitCode, ExitCode> {
    let VerifyRequest {
        measurement_given,
        nonce,
        strict,
        json,
        log,
    } = req;
    let missing = pv_tools::verify::missing_references(measurement_given, nonce);
    let refused_strict = strict && !missing.is_empty();
    let not_checked = if strict {
        verification
            .checks
            .extend(missing.iter().map(|c| pv_tools::verify::Check {
                detail: format!("--strict: {}", c.detail),
                ..c.clone()
            }));
        Vec::new()
    } else {
        missing.clone()
    };
    if json {
        let doc = serde_json::json!({
            "verified": verification.outcome.is_ok() && !refused_strict,
            "strict": strict,
            "checks": verification.checks,
            "not_checked": not_checked,
            "claims": verification.outcome.as_ref().ok(),
            "error": verification.outcome.as_ref().err().map(|e| e.to_string()),
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    }
    let claims = match verification.outcome {
        Ok(claims) => claims,
        Err(e) => {
            eprintln!("paravisor: report REFUSED: {e}");
            return Err(ExitCode::FAILURE);
        }
    };
    for c in &missing {
        if strict {
            eprintln!("paravisor: report REFUSED (--strict): {}", c.detail);
        } else {
            eprintln!("paravisor: WARNING: {}", c.detail);
        }
    }
    if refused_strict {
        return Err(ExitCode::FAILURE);
    }
    if !json {
        println!("report verified: ARK pinned, chain and signature valid (over the raw bytes, and by the sev crate), reserved bytes zero{}{}",
            if measurement_given { ", measurement as expected" } else { " (measurement not checked)" },
            if nonce.is_some() { ", nonce as expected" } else { "" });
        println!(
            "  version {}  policy {:#x}  vmpl {}  reported TCB {:#018x}",
            claims.version, claims.policy, claims.vmpl, claims.reported_tcb
        );
        println!("  measurement {}", claims.measurement);
        println!("  report_data {}", claims.report_data);
        println!("  chip_id     {}", claims.chip_id);
        if let Some(l) = log {
            println!("  launch log (its recomputed digest is the report's measurement):");
            for e in &l.entries {
                println!(
                    "    {:>3} {:<13} {:>10} {} {}",
                    e.seq,
                    e.kind.name(),
                    e.length,
                    microkernel::util::hex(&e.sha384),
                    e.name
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A benchmark's own temporary directory (removed when dropped).
fn bench_dir(what: &str, parent: Option<&Path>) -> Result<pv_tools::bench_env::BenchDir, ExitCode> {
    pv_tools::bench_env::BenchDir::new(what, parent).map_err(|e| {
        eprintln!("paravisor: benchmark directory: {e}");
        ExitCode::FAILURE
    })
}

/// Prints a benchmark report as text or JSON.
fn print_report<R: serde::Serialize>(
    report: std::io::Result<R>,
    json: bool,
    text: fn(&R) -> String,
) -> Result<ExitCode, ExitCode> {
    let report = report.map_err(|e| {
        eprintln!("paravisor: benchmark failed: {e}");
        ExitCode::FAILURE
    })?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", text(&report));
    }
    Ok(ExitCode::SUCCESS)
}
