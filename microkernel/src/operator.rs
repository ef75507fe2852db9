//! The operator's commands that take more than one exchange with a running instance:
//! `paravisor restart` (asks, then waits for the new start), `paravisor logs [--follow]`
//! (pages through a service's kept lines), `paravisor ps --watch` (lists again and again).
//!
//! Each exchange is one short request on the control socket ([`crate::control`]): a follower
//! asks for the lines after the last one it printed, so however slowly it reads, the
//! supervisor never waits for it, keeps nothing for it, and tells it how many lines it missed.

use std::io::IsTerminal;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use std::time::Instant;

use crate::control;
use crate::control::ClientError;
use crate::control::Command;
use crate::control::LogLine;
use crate::control::Reply;
use crate::control::ServiceRow;

/// How often `logs --follow` asks for new lines when the last answer had none.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(200);
/// How often `restart` looks whether the service runs again.
const RESTART_LOOK: Duration = Duration::from_millis(50);
/// How long `restart` waits for the service to run: its start timeout (10 s) plus a back-off,
/// with room for a busy machine; only catches an instance that stopped answering.
const RESTART_WAIT: Duration = Duration::from_secs(60);

/// The rows of `ps`.
fn rows(dir: &Path) -> Result<Vec<ServiceRow>, String> {
    match control::send(dir, &Command::Ps).map_err(|e| e.to_string())? {
        Reply::Ps { services, .. } => Ok(services),
        Reply::Error { message } => Err(message),
        other => Err(format!("unexpected reply {other:?}")),
    }
}

fn row<'a>(rows: &'a [ServiceRow], service: &str) -> Result<&'a ServiceRow, String> {
    rows.iter()
        .find(|r| r.name == service)
        .ok_or_else(|| format!("no service named \"{service}\""))
}

/// `paravisor restart SERVICE`: asks for the restart and, with `wait`, waits until the new
/// start runs (or fails: exit status 1, with why).
pub fn restart(dir: &Path, service: &str, wait: bool) -> Result<ExitCode, String> {
    let before = row(&rows(dir)?, service)?.restarts;
    match control::send(
        dir,
        &Command::Restart {
            service: service.to_string(),
        },
    )
    .map_err(|e| e.to_string())?
    {
        Reply::Done { message } => println!("{message}"),
        Reply::Error { message } => return Err(message),
        other => return Err(format!("unexpected reply {other:?}")),
    }
    if !wait {
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = Instant::now() + RESTART_WAIT;
    loop {
        std::thread::sleep(RESTART_LOOK);
        let rows = rows(dir)?;
        let r = row(&rows, service)?;
        if r.restarts > before {
            match r.state.as_str() {
                "running" => {
                    println!(
                        "{service} running (pid {})",
                        r.pid.map_or("-".into(), |p| p.to_string())
                    );
                    return Ok(ExitCode::SUCCESS);
                }
                "failed" | "stopped" => {
                    return Err(format!(
                        "{service} did not come back: {} ({})",
                        r.state,
                        r.last_exit.as_deref().unwrap_or("no exit recorded")
                    ))
                }
                _ => {}
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{service} is not running after {RESTART_WAIT:?} (state {}); see `paravisor logs {service}`",
                r.state
            ));
        }
    }
}

/// One line of `logs` as printed: the service's own text as it was passed on, the
/// supervisor's notes marked as such.
fn print_line(out: &mut impl Write, line: &LogLine) -> std::io::Result<()> {
    match line.source.as_str() {
        "paravisor" => writeln!(out, "-- paravisor: {}", line.text),
        _ => writeln!(out, "{}", line.text),
    }
}

/// `paravisor logs SERVICE [--follow]`: the last `tail` lines kept, then (following) every new
/// one, until the instance stops.
pub fn logs(dir: &Path, service: &str, tail: usize, follow: bool) -> Result<ExitCode, String> {
    let mut out = std::io::stdout().lock();
    let mut after: Option<u64> = None;
    let mut printed = 0usize;
    loop {
        let request = Command::Logs {
            service: service.to_string(),
            after,
            tail,
        };
        let reply = match control::send(dir, &request) {
            Ok(r) => r,
            // The instance stopped while we followed it: the end of its logs.
            Err(ClientError::NotRunning { .. } | ClientError::Io(_)) if after.is_some() => {
                return Ok(ExitCode::SUCCESS)
            }
            Err(e) => return Err(e.to_string()),
        };
        let (lines, missed, last) = match reply {
            Reply::Logs {
                lines,
                missed,
                last,
                ..
            } => (lines, missed, last),
            Reply::Error { message } => return Err(message),
            other => return Err(format!("unexpected reply {other:?}")),
        };
        let io = |e: std::io::Error| e.to_string();
        if missed > 0 {
            writeln!(
                out,
                "-- paravisor: {missed} lines no longer kept (more came than it keeps)"
            )
            .map_err(io)?;
        }
        for line in &lines {
            print_line(&mut out, line).map_err(io)?;
        }
        out.flush().map_err(io)?;
        printed += lines.len();
        after = Some(last);
        if lines.is_empty() || (!follow && printed >= tail) {
            if !follow {
                return Ok(ExitCode::SUCCESS);
            }
            std::thread::sleep(FOLLOW_INTERVAL);
        }
    }
}

/// `paravisor ps --watch`: `show` each listing every `interval` seconds (clearing a terminal
/// first), until the instance stops or after `count` listings.
pub fn watch(
    dir: &Path,
    count: Option<u64>,
    interval: f64,
    mut show: impl FnMut(Reply) -> Result<(), ExitCode>,
) -> Result<ExitCode, ExitCode> {
    let interval = Duration::from_secs_f64(if interval.is_finite() {
        interval.clamp(0.05, 3600.0)
    } else {
        1.0
    });
    let terminal = std::io::stdout().is_terminal();
    let mut shown = 0u64;
    loop {
        let reply = match control::send(dir, &Command::Ps) {
            Ok(r) => r,
            Err(_) if shown > 0 => {
                eprintln!("paravisor: the instance stopped");
                return Ok(ExitCode::SUCCESS);
            }
            Err(e) => {
                eprintln!("paravisor: {e}");
                return Err(ExitCode::FAILURE);
            }
        };
        if terminal {
            // Home and clear, as `watch` does.
            print!("\x1b[H\x1b[2J");
        } else if shown > 0 {
            println!();
        }
        show(reply)?;
        let _ = std::io::stdout().flush();
        shown += 1;
        if count.is_some_and(|c| shown >= c) {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(interval);
    }
}
