//! `paravisor`: the command line of the microkernel.
#![forbid(unsafe_code)]

use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use microkernel::audit;
use microkernel::cli::*;
use microkernel::control::Command;
use microkernel::control::Reply;
use microkernel::manifest::Manifest;
use microkernel::manifest::DEFAULT_MANIFEST;
use microkernel::supervisor;

/// What `run` does before the supervisor: load the manifest and the host's settings, measure
/// the launch (keeping the measured binaries); the supervisor's options. Nothing is written to
/// the state directory here: the launch log is written once the start is not refused.
fn launch(
    manifest: Option<PathBuf>,
    host: Option<&Path>,
    flags: microkernel::host_config::Flags,
    guest: GuestArgs,
    offline: bool,
) -> Result<supervisor::Options, ExitCode> {
    let keep_running = guest.keep_running;
    let qemu = if offline { None } else { guest.qemu_config()? };
    let mut guest = guest.config()?;
    // Before the platform or any key is loaded: nothing of this process ends up in a core
    // file.
    let root = ipc_defs::hosted::sys::effective_uid() == 0;
    microkernel::sandbox::no_core_dumps(root)
        .map_err(|e| failed(format!("cannot turn core dumps off: {e}")))?;
    // A panic prints its message only: the default hook's backtrace (RUST_BACKTRACE) opens
    // files, which the vCPU and platform threads' filters answer by killing the process.
    std::panic::set_hook(Box::new(|info| eprintln!("paravisor: {info}")));
    let mut m = load(manifest.as_deref())?;
    let host = match host {
        Some(path) => microkernel::host_config::HostConfig::load(path).map_err(failed)?,
        None => microkernel::host_config::HostConfig::default(),
    };
    let mut settings = host.settle(&m, &flags).map_err(failed)?;
    if offline {
        // `vmgs reseal` opens no listener and attaches no TAP, whatever the host file asks
        // `run` for.
        settings.listen.clear();
        settings.taps.clear();
    }
    if let Some(q) = &qemu {
        // QEMU's devices are on listeners: bound for it whatever else the host asked for.
        for name in q.listeners(&m).map_err(failed)? {
            let named = |l: &String| l == "all" || l == &name || l.starts_with(&format!("{name}="));
            if !settings.listen.iter().any(named) {
                settings.listen.push(name);
            }
        }
    }
    settings.apply(&mut m);
    microkernel::logging::init(&microkernel::logging::LogOptions {
        format: settings.log_format,
        file: settings.log_file.clone(),
    })
    .map_err(failed)?;
    let state_dir = settings.state_dir.clone();
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let platform_dir = match settings.platform_dir.clone() {
        Some(dir) => dir,
        None => supervisor::default_platform_dir(&state_dir).map_err(failed)?,
    };
    // The measured launch: before any service runs.
    let started = std::time::Instant::now();
    let (log, sealed) =
        microkernel::measure::launch_sealed(&m, &bin_dir, guest.as_ref()).map_err(failed)?;
    // From here on the guest's files are their measured copies.
    if let Some(g) = guest.as_mut() {
        sealed.apply(g);
    }
    // Made private (0700) if missing; refused if another user could change it.
    let state = microkernel::owned_dir::OwnedDir::open(&state_dir, "state directory", true)
        .map_err(failed)?;
    // Before anything is written to the state: one paravisor per state directory.
    let lock = supervisor::lock_state_dir(&state).map_err(failed)?;
    tracing::info!(
        entries = log.entries.len(),
        bytes = log.bytes,
        "launch measurement {} ({:.0} ms; paravisor {}); the log goes to launch-log.json of the state directory",
        microkernel::util::hex(&log.measurement),
        started.elapsed().as_secs_f64() * 1e3,
        &microkernel::util::hex(&log.paravisor_measurement())[..16],
    );
    Ok(supervisor::Options {
        manifest: m,
        state_dir,
        state,
        bin_dir,
        log_filter: std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        guest,
        keep_running,
        platform_dir,
        launch_log: log,
        sealed,
        lock: Some(lock),
        listen: microkernel::listeners::ListenRequest::parse(&settings.listen),
        taps: microkernel::taps::TapRequest::parse(&settings.taps),
        qemu,
    })
}

/// Writes a PEM chain (ARK, ASK, VCEK in that order) as ark.pem, ask.pem, vcek.pem.
fn write_chain(chain: &str, dir: &Path) -> Result<(), String> {
    const END: &str = "-----END CERTIFICATE-----";
    let certs: Vec<String> = chain
        .split_inclusive(END)
        .map(str::trim)
        .filter(|c| c.ends_with(END))
        .map(|c| format!("{c}\n"))
        .collect();
    if certs.len() != 3 {
        return Err(format!(
            "the chain holds {} certificates, not 3 (ARK, ASK, VCEK)",
            certs.len()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for (name, cert) in [
        microkernel::snp::ARK_PEM,
        microkernel::snp::ASK_PEM,
        microkernel::snp::VCEK_PEM,
    ]
    .iter()
    .zip(&certs)
    {
        std::fs::write(dir.join(name), cert)
            .map_err(|e| format!("{}: {e}", dir.join(name).display()))?;
    }
    Ok(())
}

fn attest(action: AttestCmd) -> Result<ExitCode, ExitCode> {
    let fail = |e: String| {
        eprintln!("paravisor: {e}");
        ExitCode::FAILURE
    };
    match action {
        AttestCmd::Report {
            nonce,
            out,
            certs,
            state_dir,
            manifest,
        } => {
            // An empty nonce is 64 zero bytes of report data, as `platform report` and
            // `attest verify` take it.
            let nonce = microkernel::util::parse_hex(&nonce)
                .ok_or_else(|| fail("--nonce must be hex bytes, e.g. 00112233".into()))?;
            let report_data = microkernel::snp::report_data_for(&nonce);
            let dir = client_state_dir(state_dir, manifest.as_deref())?;
            let reply = send(
                &dir,
                &Command::AttestReport {
                    report_data: microkernel::util::hex(&report_data),
                },
            )?;
            let (report, chain) = match reply {
                Reply::Report { report, certs } => (report, certs),
                Reply::Error { message } => return Err(fail(message)),
                other => return Err(fail(format!("unexpected reply {other:?}"))),
            };
            let report = microkernel::util::parse_hex(&report)
                .filter(|r| r.len() == microkernel::snp::REPORT_LEN)
                .ok_or_else(|| fail("the paravisor sent a report of the wrong size".into()))?;
            std::fs::write(&out, &report).map_err(|e| fail(format!("{}: {e}", out.display())))?;
            println!(
                "report ({} bytes) written to {}; report_data = {}",
                report.len(),
                out.display(),
                if nonce.len() <= 64 {
                    format!("the {}-byte nonce, zero-padded to 64 bytes", nonce.len())
                } else {
                    format!(
                        "SHA-512 of the {}-byte nonce (longer than 64 bytes)",
                        nonce.len()
                    )
                }
            );
            if let Some(certs) = certs {
                write_chain(&chain, &certs).map_err(fail)?;
                println!("ark.pem, ask.pem, vcek.pem written to {}", certs.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        AttestCmd::Certs {
            platform_dir,
            state_dir,
            manifest,
            out,
        } => {
            let platform_dir = match platform_dir {
                Some(dir) => dir,
                None => {
                    // A manifest named on the command line must load; the default one may
                    // be absent.
                    let m = match &manifest {
                        Some(path) => Some(load(Some(path))?),
                        None => Manifest::load(Path::new(DEFAULT_MANIFEST)).ok(),
                    };
                    let state = client_state_dir(state_dir, manifest.as_deref())?;
                    match m.and_then(|m| m.attest.platform_dir) {
                        Some(dir) => dir,
                        None => supervisor::default_platform_dir(&state).map_err(fail)?,
                    }
                }
            };
            // Read as `run` reads it: a platform directory of ours, no links.
            let chain = microkernel::platform::read_chain(&platform_dir)
                .map_err(|e| fail(e.to_string()))?;
            write_chain(&chain, &out).map_err(fail)?;
            println!("ark.pem, ask.pem, vcek.pem written to {}", out.display());
            Ok(ExitCode::SUCCESS)
        }
        AttestCmd::Fingerprint { .. } | AttestCmd::Verify { .. } => Ok(forward_to_tools()),
    }
}

/// `paravisor run`'s exit status: the guest's own status when it wrote one, 0 without a guest
/// or after a reset, [`PARTITION_FAILED`] when the partition could not go on.
fn guest_exit_code(outcome: Option<microkernel::partition::vcpu::Outcome>) -> ExitCode {
    use microkernel::partition::vcpu::Outcome;
    match outcome {
        None | Some(Outcome::Stopped) | Some(Outcome::Reset) => ExitCode::SUCCESS,
        Some(Outcome::Exited(status)) => ExitCode::from(status),
        Some(Outcome::Failed(why)) => {
            eprintln!("paravisor: the guest partition failed: {why}");
            ExitCode::from(PARTITION_FAILED)
        }
    }
}

/// The exit code of a run under `--vmm qemu`: the guest's status line, else 0 for a guest
/// that powered off and 1 for a QEMU that failed or was killed; a run stopped by the
/// operator (Ctrl-C, `paravisor stop`) exits 0, as without QEMU.
fn vmm_exit_code(outcome: microkernel::host_vmm::VmmOutcome) -> ExitCode {
    use microkernel::host_vmm::VmmOutcome;
    match outcome {
        VmmOutcome::Status(status) => ExitCode::from(status),
        VmmOutcome::Exited(0) | VmmOutcome::Stopped => ExitCode::SUCCESS,
        VmmOutcome::Exited(_) | VmmOutcome::Signalled(_) => ExitCode::FAILURE,
    }
}

/// Exit status when the partition itself failed (intercept's status for a hypervisor failure).
const PARTITION_FAILED: u8 = ipc_defs::services::intercept::HYPERVISOR_FAILED;

fn main() -> ExitCode {
    // A tool's command line is the tools binary's to parse (its arguments are not in here).
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    if microkernel::cli::is_tool_command(&args) {
        return forward_to_tools();
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    if cli.command.is_tool() {
        return forward_to_tools();
    }
    let prints_only = matches!(
        cli.command,
        Cmd::Check { .. }
            | Cmd::Audit { live: false, .. }
            | Cmd::Measure { .. }
            | Cmd::Attest {
                action: AttestCmd::Certs { .. }
            }
    );
    if prints_only {
        microkernel::sandbox::default_sigpipe();
    }
    match run(cli) {
        Ok(code) | Err(code) => code,
    }
}

/// Hands the command line, as given, to the tools binary next to this one (`pv-tools`): the
/// verifier, the key broker, the vmgs tool and the benchmarks are not part of the trusted
/// core, so they are not in the binary the launch measures. Returns only if that fails.
fn forward_to_tools() -> ExitCode {
    use std::os::unix::process::CommandExt;
    let tools = bin_dir().join(microkernel::cli::TOOLS_BINARY);
    let error = std::process::Command::new(&tools)
        .arg0("paravisor")
        .args(std::env::args_os().skip(1))
        .exec();
    eprintln!(
        "paravisor: cannot run {}: {error} ({} ships next to paravisor)",
        tools.display(),
        microkernel::cli::TOOLS_BINARY
    );
    ExitCode::FAILURE
}

fn run(cli: Cli) -> Result<ExitCode, ExitCode> {
    match cli.command {
        Cmd::Check { manifest } => check(manifest.as_deref()),
        Cmd::Audit {
            metal: Some(image),
            json,
            ..
        } => audit_metal(&image, json),
        Cmd::Audit {
            manifest,
            json,
            live: false,
            ..
        } => audit_static(manifest.as_deref(), json),
        Cmd::Audit {
            manifest,
            json,
            live: true,
            state_dir,
            metal: None,
        } => audit_live(manifest.as_deref(), state_dir, json),
        Cmd::Platform {
            action:
                PlatformCmd::Report {
                    platform_dir,
                    nonce,
                    measurement,
                    out,
                },
        } => platform_report(&platform_dir, &nonce, measurement.as_deref(), &out),
        Cmd::Attest { action } => attest(action),
        Cmd::Measure {
            manifest,
            guest,
            json,
        } => measure(manifest.as_deref(), &guest, json),
        Cmd::Run {
            manifest,
            state_dir,
            platform_dir,
            listen,
            tap,
            host,
            log,
            guest,
        } => run_instance(
            manifest,
            host.as_deref(),
            microkernel::host_config::Flags {
                state_dir,
                platform_dir,
                listen,
                taps: tap,
                log_format: log.log_format,
                log_file: log.log_file,
            },
            guest,
        ),
        Cmd::Vmgs {
            command:
                VmgsTop::Reseal {
                    manifest,
                    state_dir,
                    platform_dir,
                    host,
                    guest,
                },
        } => reseal(
            manifest,
            host.as_deref(),
            microkernel::host_config::Flags {
                state_dir,
                platform_dir,
                ..Default::default()
            },
            guest,
        ),
        Cmd::Ps {
            state_dir,
            json,
            manifest,
            watch,
            count,
            interval,
        } => {
            let dir = client_state_dir(state_dir, manifest.as_deref())?;
            if !watch {
                return print_ps(send(&dir, &Command::Ps)?, json);
            }
            microkernel::operator::watch(&dir, count, interval, |reply| {
                print_ps(reply, json).map(|_| ())
            })
        }
        Cmd::Restart {
            service,
            no_wait,
            state_dir,
            manifest,
        } => {
            let dir = client_state_dir(state_dir, manifest.as_deref())?;
            microkernel::operator::restart(&dir, &service, !no_wait).map_err(|e| {
                eprintln!("paravisor: {e}");
                ExitCode::FAILURE
            })
        }
        Cmd::Logs {
            service,
            follow,
            lines,
            state_dir,
            manifest,
        } => {
            let dir = client_state_dir(state_dir, manifest.as_deref())?;
            microkernel::operator::logs(&dir, &service, lines, follow).map_err(|e| {
                eprintln!("paravisor: {e}");
                ExitCode::FAILURE
            })
        }
        Cmd::Kill {
            service,
            signal,
            state_dir,
            manifest,
        } => {
            let Some(sig) = supervisor::parse_signal(&signal) else {
                eprintln!("paravisor: unknown signal \"{signal}\" (use a name such as KILL, TERM, SEGV or a number)");
                return Err(ExitCode::FAILURE);
            };
            let dir = client_state_dir(state_dir, manifest.as_deref())?;
            done(send(
                &dir,
                &Command::Kill {
                    service,
                    signal: sig,
                },
            )?)
        }
        Cmd::Probe {
            service,
            endpoint,
            state_dir,
            manifest,
        } => {
            let dir = client_state_dir(state_dir, manifest.as_deref())?;
            match send(&dir, &Command::Probe { service, endpoint })? {
                Reply::Probe { result, message } => {
                    println!("{message}");
                    Ok(ExitCode::from(result.exit_code()))
                }
                other => Err(unexpected(other)),
            }
        }
        // Tools' commands are handed over before parsing; a rewritten command line that still
        // names one is handed over here.
        Cmd::Platform {
            action: PlatformCmd::Init(_),
        }
        | Cmd::Bench(_)
        | Cmd::BenchPeer(_)
        | Cmd::Kbs(_)
        | Cmd::Metal(_)
        | Cmd::Vmgs { .. } => Ok(forward_to_tools()),
        Cmd::Stop {
            state_dir,
            manifest,
        } => {
            let dir = client_state_dir(state_dir, manifest.as_deref())?;
            done(send(&dir, &Command::Shutdown)?)
        }
    }
}

/// `check`: the manifest is valid and every service's executable is there.
fn check(manifest: Option<&Path>) -> Result<ExitCode, ExitCode> {
    let m = load(manifest)?;
    let missing = m.missing_binaries(&bin_dir());
    if !missing.is_empty() {
        for d in &missing {
            eprintln!("{d}");
        }
        return Err(ExitCode::FAILURE);
    }
    let metal = match m.metal.len() {
        0 => String::new(),
        n => format!("; {n} metal tasks (`paravisor metal build` makes their image)"),
    };
    println!(
        "{}: valid ({} services, {} channels{metal})",
        m.path.display(),
        m.services.len(),
        m.services.iter().map(|s| s.calls.len()).sum::<usize>()
    );
    Ok(ExitCode::SUCCESS)
}

/// `measure`: the launch log and digest a verifier expects, without running anything.
fn measure(manifest: Option<&Path>, guest: &GuestArgs, json: bool) -> Result<ExitCode, ExitCode> {
    let m = load(manifest)?;
    let guest = guest.config()?;
    let log = microkernel::measure::launch(&m, &bin_dir(), guest.as_ref()).map_err(|e| {
        eprintln!("paravisor: {e}");
        ExitCode::FAILURE
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&log).unwrap_or_default());
    } else {
        print!("{}", microkernel::measure::text(&log));
    }
    Ok(ExitCode::SUCCESS)
}

/// `run`: the paravisor, until a signal, `stop`, or the end of its guest.
fn run_instance(
    manifest: Option<PathBuf>,
    host: Option<&Path>,
    flags: microkernel::host_config::Flags,
    guest: GuestArgs,
) -> Result<ExitCode, ExitCode> {
    let mut opts = launch(manifest, host, flags, guest, false)?;
    let sup = supervisor::Supervisor::new(&opts).map_err(failed)?;
    // The supervisor holds what it needs of the measured libraries; the rest (the
    // microkernel's own, measured only) is let go.
    opts.sealed.libraries.clear();
    let summary = sup.run().map_err(failed)?;
    if let Some(vmm) = summary.vmm {
        return Ok(vmm_exit_code(vmm));
    }
    Ok(guest_exit_code(summary.guest))
}

/// `vmgs reseal`: unseal (or re-seal through the key broker) every sealed key under this
/// launch, then stop.
fn reseal(
    manifest: Option<PathBuf>,
    host: Option<&Path>,
    flags: microkernel::host_config::Flags,
    guest: GuestArgs,
) -> Result<ExitCode, ExitCode> {
    // A guest option that does not fit (2 under `run`) is a usage error here too.
    if guest.config().is_err() {
        return Err(ExitCode::from(microkernel::cli::VMGS_USAGE));
    }
    let opts = launch(manifest, host, flags, guest, true)?;
    let sup = supervisor::Supervisor::new(&opts).map_err(failed)?;
    let lines = sup.reseal().map_err(failed)?;
    for line in lines {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit`: the privilege matrix the manifest grants (text, or JSON).
fn audit_static(manifest: Option<&Path>, json: bool) -> Result<ExitCode, ExitCode> {
    let m = load(manifest)?;
    if json {
        let doc = serde_json::json!({
            "manifest": m.path.display().to_string(),
            "services": audit::rows(&m),
            "runner": microkernel::privilege::Runner::current().describe(),
            "securebits": microkernel::privilege::SECUREBIT_NAMES,
            "threads": audit::thread_profiles(&m),
            "configuration": audit::configuration(&m),
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        print!("{}", audit::text(&m));
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit --metal IMAGE`: the task table a metal kernel image carries.
fn audit_metal(image: &Path, json: bool) -> Result<ExitCode, ExitCode> {
    let audit = microkernel::metal::image::audit_file(image).map_err(failed)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&audit).unwrap_or_default()
        );
    } else {
        print!("{}", microkernel::metal::image::text(&audit));
    }
    Ok(ExitCode::SUCCESS)
}

/// `audit --live`: the running instance checked against its plan; exit 1 on a difference.
fn audit_live(
    manifest: Option<&Path>,
    state_dir: Option<PathBuf>,
    json: bool,
) -> Result<ExitCode, ExitCode> {
    let dir = client_state_dir(state_dir, manifest)?;
    match send(&dir, &Command::LiveAudit)? {
        Reply::Audit {
            checked,
            checks,
            findings,
        } => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "checked": checked, "checks": checks, "findings": findings })
                );
            } else {
                let mut last = None;
                for c in &checks {
                    if last != Some(&c.service) {
                        println!("{}:", c.service);
                        last = Some(&c.service);
                    }
                    let c = &c.check;
                    if c.ok {
                        println!("  ok    {} = {}", c.what, c.expected);
                    } else {
                        println!("  FAIL  {} = {} (plan: {})", c.what, c.actual, c.expected);
                    }
                }
                for f in &findings {
                    println!("DIFF {}: {}", f.service, f.what);
                }
                println!(
                    "live audit: {} services checked ({}), {} checks of identity, capabilities and seccomp listed above (namespaces, limits and descriptors too), {} difference(s)",
                    checked.len(),
                    checked.join(", "),
                    checks.len(),
                    findings.len()
                );
            }
            Ok(if findings.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        other => Err(unexpected(other)),
    }
}

/// `platform report`: a report signed by the SIMULATED platform directly (tests, demos).
fn platform_report(
    platform_dir: &Path,
    nonce: &str,
    measurement: Option<&str>,
    out: &Path,
) -> Result<ExitCode, ExitCode> {
    let fail = |e: String| {
        eprintln!("paravisor: {e}");
        ExitCode::FAILURE
    };
    let platform =
        microkernel::platform::Platform::open(platform_dir).map_err(|e| fail(e.to_string()))?;
    let nonce = microkernel::util::parse_hex(nonce)
        .ok_or_else(|| fail("--nonce must be hex bytes, e.g. 00112233".into()))?;
    let measurement: [u8; 48] = match measurement {
        Some(m) => microkernel::util::parse_hex(m)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| fail("--measurement is not 48 bytes of hex".into()))?,
        None => {
            let m = load(None)?;
            let guest = GuestArgs::default().config()?;
            microkernel::measure::launch(&m, &bin_dir(), guest.as_ref())
                .map_err(|e| fail(e.to_string()))?
                .measurement
        }
    };
    let report = platform
        .report(&microkernel::snp::ReportRequest {
            report_data: microkernel::snp::report_data_for(&nonce),
            measurement,
            host_data: [0; 32],
            vmpl: 0,
            policy: microkernel::snp::POLICY,
            report_id: microkernel::platform::new_report_id().map_err(|e| fail(e.to_string()))?,
        })
        .map_err(|e| fail(e.to_string()))?;
    std::fs::write(out, report).map_err(|e| fail(format!("{}: {e}", out.display())))?;
    println!(
        "{}: SIMULATED SNP report, measurement {}",
        out.display(),
        microkernel::util::hex(&measurement)
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints a `ps` reply as the table (or JSON).
fn print_ps(reply: Reply, json: bool) -> Result<ExitCode, ExitCode> {
    match reply {
        Reply::Ps {
            services,
            guest,
            control,
        } => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&services).unwrap_or_default()
                );
                return Ok(ExitCode::SUCCESS);
            }
            let exits = |name: &str| {
                guest.as_ref().and_then(|g| {
                    g.exits_by_service
                        .iter()
                        .find(|(s, _)| s == name)
                        .map(|(_, n)| n.to_string())
                })
            };
            println!(
                "{:<11} {:>8} {:<9} {:>8} {:>10} {:>8} {:>8} {:>7} {:>9} {:>7} {:>6}  LAST EXIT",
                "SERVICE",
                "PID",
                "STATE",
                "RESTARTS",
                "UPTIME",
                "MSG-IN",
                "MSG-OUT",
                "REFUSED",
                "EXITS",
                "DROPPED",
                "KEPT"
            );
            for r in services {
                println!(
                    "{:<11} {:>8} {:<9} {:>8} {:>10} {:>8} {:>8} {:>7} {:>9} {:>7} {:>6}  {}",
                    r.name,
                    r.pid.map_or("-".into(), |p| p.to_string()),
                    r.state,
                    r.restarts,
                    r.uptime_ms.map_or("-".into(), uptime),
                    r.messages_in,
                    r.messages_out,
                    r.refused,
                    exits(&r.name).unwrap_or_else(|| "-".into()),
                    r.output_dropped,
                    r.fd_store
                        .map_or("-".into(), |f| format!("{}/{}", f.kept, f.max)),
                    r.last_exit.unwrap_or_else(|| "-".into())
                );
            }
            if let Some(g) = guest {
                println!("\nguest: {}", g.image);
                for v in &g.vcpus {
                    println!(
                        "  vcpu{} {:<8} {} exits ({} answered in the vCPU thread)",
                        v.id, v.state, v.exits, v.in_thread
                    );
                }
                if let Some(o) = &g.outcome {
                    println!("  ended: {o}");
                }
            }
            if let Some(c) = control {
                println!(
                    "\ncontrol thread: {} (running {})",
                    c.command,
                    uptime(c.running_ms)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        other => Err(unexpected(other)),
    }
}

fn done(reply: Reply) -> Result<ExitCode, ExitCode> {
    match reply {
        Reply::Done { message } => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(unexpected(other)),
    }
}

fn unexpected(reply: Reply) -> ExitCode {
    match reply {
        Reply::Error { message } => eprintln!("paravisor: {message}"),
        other => eprintln!("paravisor: unexpected reply {other:?}"),
    }
    ExitCode::FAILURE
}

fn uptime(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{}.{}s", s, (ms % 1000) / 100)
    }
}
