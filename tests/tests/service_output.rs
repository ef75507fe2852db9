//! A service's output reaches the operator only through the supervisor: each service writes
//! to pipes of its own, and the supervisor tags, escapes, cuts and rate-limits every line
//! (issue 12, item 3). Each test performs an attack of the red team's report with
//! `pv-hostile`.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use common::paravisor;
use common::sandbox_available;
use common::scratch_dir;
use common::service;
use common::text;
use common::Instance;
use common::RESTART_ALWAYS;
use common::RESTART_NEVER;
use common::VMGS_BODY;

/// The supervisor's rate limit (`microkernel/src/output.rs`): a burst of this many lines...
const BURST_LINES: u64 = 10_000;
/// ...then this many lines per 30 s.
const LINES_PER_30S: u64 = 10_000;
/// The longest line passed on (bytes of the service's text, before escaping).
const MAX_LINE: usize = 4096;

/// vmgs (a service to kill meanwhile) and a hostile service doing `args`.
fn with_hostile(args: &str) -> String {
    let mut m = service("vmgs", "pv-vmgs", &format!("{VMGS_BODY}\n{RESTART_ALWAYS}"));
    m += &service(
        "hostile",
        "pv-hostile",
        &format!("calls = [{{ endpoint = \"vmgs\", file-ids = [\"TPM_NVRAM\"] }}]\nargs = [{args}]\nwatchdog = \"60s\"\n{RESTART_NEVER}"),
    );
    m
}

/// The instance's output file, as text (bytes that are not UTF-8 shown as U+FFFD: before
/// the fix a service could write any bytes there).
fn output(inst: &Instance) -> String {
    String::from_utf8_lossy(&std::fs::read(inst.dir.join("paravisor.log")).unwrap_or_default())
        .into_owned()
}

/// The service whose tag starts `line` ("name  | text"), if it has one.
fn tag(line: &str) -> Option<&str> {
    line.split_once(" | ").map(|(t, _)| t.trim_end())
}

/// Starts `paravisor run --no-guest` on `manifest_text` through `wrap` (which gets the
/// paravisor's command line and returns what to spawn), with stdout and stderr both in
/// `paravisor.log`, and waits until `expect_running` services run.
fn start(
    tag: &str,
    manifest_text: &str,
    expect_running: usize,
    wrap: impl FnOnce(Command) -> Command,
) -> Instance {
    let dir = scratch_dir(tag);
    let manifest = dir.join("manifest.toml");
    std::fs::write(&manifest, manifest_text).expect("write manifest");
    let mut cmd = Command::new(paravisor());
    cmd.arg("run")
        .arg("--no-guest")
        .arg(&manifest)
        .arg("--state-dir")
        .arg(dir.join("state"));
    let log = std::fs::File::create(dir.join("paravisor.log")).expect("log");
    // One open file for both, as `paravisor run >log 2>&1` makes it.
    let child = wrap(cmd)
        .process_group(0)
        .stdout(log.try_clone().expect("dup"))
        .stderr(log)
        .spawn()
        .expect("spawn paravisor run");
    let inst = Instance {
        dir,
        manifest,
        child: Some(child),
    };
    inst.wait_until(Duration::from_secs(60), |rows| {
        rows.iter().filter(|r| r["state"] == "running").count() >= expect_running
    });
    inst
}

fn wait_for_output(inst: &Instance, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !output(inst).contains(needle) {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} after {timeout:?}:\n{}",
            output(inst)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_service_cannot_rewrite_or_deface_the_paravisors_log_file() {
    if !sandbox_available("a_service_cannot_rewrite_or_deface_the_paravisors_log_file") {
        return;
    }
    let inst = start("deface", &with_hostile("\"deface-output\""), 1, |c| c);
    wait_for_output(&inst, "pv-hostile: defaced", Duration::from_secs(60));
    let out = output(&inst);
    // The first line, the launch measurement, is intact.
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first.contains("launch measurement") && !first.contains("DEFACE"),
        "the first line of the log was rewritten: {first:?}\n{out}"
    );
    // Seeking a pipe fails; what was written after it is appended, tagged.
    assert!(
        out.contains("seek of descriptor 1: Err") && out.contains("seek of descriptor 2: Err"),
        "{out}"
    );
    let hostile: Vec<&str> = out.lines().filter(|l| l.contains("DEFACE")).collect();
    // Each piece once through stdout and once through stderr.
    for piece in [
        "DEFACE-1",
        "DEFACE-2",
        "DEFACE-3",
        "DEFACE-4",
        "DEFACE-REWRITE",
    ] {
        assert_eq!(
            hostile.iter().filter(|l| l.contains(piece)).count(),
            2,
            "{piece}:\n{out}"
        );
    }
    for line in &hostile {
        // Every line of the service carries its own tag, never another's...
        assert_eq!(tag(line), Some("hostile"), "untagged or forged: {line:?}");
        // ...and drives no terminal: no escape, bell, carriage return, 8-bit CSI, bidi
        // override or broken UTF-8 reaches the log as such.
        for c in ['\x1b', '\x07', '\r', '\u{9b}', '\u{202e}', '\u{fffd}'] {
            assert!(!line.contains(c), "{c:?} passed through: {line:?}");
        }
    }
    // What they were is still readable.
    assert!(out.contains("DEFACE-1 \\x1b]0;pv-hostile-title\\x07\\x1b[2J\\x1b[HDEFACE-2"));
    assert!(out.contains("DEFACE-3 \\xc2\\x9b31mred\\u{202e}desrever"));
    assert!(out.contains("DEFACE-4\\x0dattest      | DEFACE-FORGED-TAG"));
    assert!(out.contains("DEFACE-5 \\xff\\xfe"));
}

#[test]
fn a_service_cannot_read_what_the_operator_types_into_the_terminal() {
    if !sandbox_available("a_service_cannot_read_what_the_operator_types_into_the_terminal") {
        return;
    }
    // The paravisor runs on a terminal (a pseudo-terminal that `script` makes), where its
    // descriptors 0, 1 and 2 are that terminal, readable and writable.
    let script = Command::new("script").arg("--version").output();
    assert!(
        script.is_ok_and(|o| o.status.success()),
        "this test needs `script` (util-linux; Debian's bsdutils) to give the paravisor a terminal"
    );
    let mut inst = start("tty", &with_hostile("\"read-terminal\""), 1, |pv| {
        let line = std::iter::once(pv.get_program())
            .chain(pv.get_args())
            .map(|a| format!("'{}'", a.to_string_lossy()))
            .collect::<Vec<_>>()
            .join(" ");
        let mut script = Command::new("script");
        script
            .args(["-q", "-e", "-f", "-c", &line, "/dev/null"])
            .stdin(Stdio::piped());
        script
    });
    // The operator types a secret into the terminal.
    {
        use std::io::Write;
        let stdin = inst.child.as_mut().unwrap().stdin.as_mut().unwrap();
        stdin.write_all(b"sudo-password-hunter2\n").unwrap();
        stdin.flush().unwrap();
    }
    inst.wait_until(Duration::from_secs(60), |rows| {
        rows.iter()
            .any(|r| r["name"] == "hostile" && r["last_exit"].is_string())
    });
    let row = inst.row("hostile");
    assert!(
        row["last_exit"].to_string().contains("exited cleanly"),
        "the service read from its terminal descriptors: {row}\n{}",
        output(&inst)
    );
    let out = output(&inst);
    assert!(out.contains("descriptor 0: nothing to read"), "{out}");
    assert!(out.contains("descriptor 1: refused"), "{out}");
    assert!(out.contains("descriptor 2: refused"), "{out}");
    // On a terminal the microkernel colours its lines; the services' lines carry no colour
    // (their stderr is a pipe: they write none, and it would show escaped).
    assert!(out.contains("\u{1b}["), "no colour on a terminal:\n{out:?}");
    assert!(
        !out.contains("\\x1b["),
        "a service coloured its lines:\n{out}"
    );
    // Stop it through its control socket, then `script` ends with it.
    let stop = inst.pv(&["stop"]);
    assert!(stop.status.success(), "{}", text(&stop));
    let mut child = inst.child.take().unwrap();
    drop(child.stdin.take());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "paravisor did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{}", output(&inst));
}

/// `output_dropped` of `service` in `paravisor ps --json`.
fn dropped(rows: &[serde_json::Value], service: &str) -> Option<u64> {
    rows.iter()
        .find(|r| r["name"] == service)
        .and_then(|r| r["output_dropped"].as_u64())
}

/// Flood lines of the hostile service that reached the log, each checked for its tag.
fn flood_lines(out: &str) -> u64 {
    out.lines()
        .filter(|l| l.contains("pv-hostile: flood line "))
        .inspect(|l| assert_eq!(tag(l), Some("hostile"), "{l:?}"))
        .count() as u64
}

#[test]
fn a_flood_of_output_is_rate_limited_and_every_dropped_line_is_counted() {
    if !sandbox_available("a_flood_of_output_is_rate_limited_and_every_dropped_line_is_counted") {
        return;
    }
    const LINES: u64 = 100_000;
    let inst = start(
        "flood",
        &with_hostile(&format!("\"flood\", \"{LINES}\"")),
        1,
        |c| c,
    );
    // Every line the service wrote is either in the log or counted as dropped.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (passed, dropped) = loop {
        let rows = inst.ps().expect("ps answers");
        let dropped = dropped(&rows, "hostile").expect("ps shows dropped output lines");
        let passed = flood_lines(&output(&inst));
        if passed + dropped >= LINES {
            break (passed, dropped);
        }
        assert!(
            Instant::now() < deadline,
            "{passed} lines passed and {dropped} dropped of {LINES}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(passed + dropped, LINES, "lines lost or made up");
    assert!(dropped > 0, "no line was dropped");
    // The first lines (the burst) passed, in order.
    let out = output(&inst);
    assert!(out.contains("pv-hostile: flood line 0\n"), "{out}");
    assert!(out.contains("pv-hostile: flood line 9000\n"));
    // The supervisor says so (on its next tick).
    wait_for_output(
        &inst,
        "lines of its output dropped",
        Duration::from_secs(30),
    );
    assert!(output(&inst)
        .lines()
        .any(|l| l.contains("hostile") && l.contains("lines of its output dropped")));
}

#[test]
fn a_service_flooding_its_output_does_not_stop_ps_kill_or_stop() {
    if !sandbox_available("a_service_flooding_its_output_does_not_stop_ps_kill_or_stop") {
        return;
    }
    let started = Instant::now();
    let mut inst = start("flood-forever", &with_hostile("\"flood\", \"0\""), 2, |c| c);
    // `ps` answers while the flood goes on, and shows the drops growing.
    inst.wait_until(Duration::from_secs(60), |rows| {
        dropped(rows, "hostile").is_some_and(|d| d > 0)
    });
    let first = dropped(&inst.ps().unwrap(), "hostile").unwrap();
    inst.wait_until(Duration::from_secs(60), |rows| {
        dropped(rows, "hostile").is_some_and(|d| d > first)
    });
    // A kill of another service takes effect.
    let old = inst.pid("vmgs");
    let out = inst.pv(&["kill", "vmgs"]);
    assert!(out.status.success(), "{}", text(&out));
    inst.wait_until(Duration::from_secs(60), |rows| {
        rows.iter().any(|r| {
            r["name"] == "vmgs" && r["state"] == "running" && r["pid"].as_i64() != Some(old as i64)
        })
    });
    assert_eq!(inst.row("hostile")["state"], "running");
    // And the paravisor stops cleanly.
    assert_eq!(inst.stop().code(), Some(0), "{}", output(&inst));
    // What reached the log is bounded by the rate limit, however fast the service wrote.
    let seconds = started.elapsed().as_secs() + 1;
    let passed = flood_lines(&output(&inst));
    let bound = BURST_LINES + LINES_PER_30S * seconds / 30 + 1;
    assert!(
        passed <= bound,
        "{passed} flood lines in {seconds} s passed the limit of {bound}"
    );
}

#[test]
fn output_without_newlines_is_cut_and_the_supervisor_memory_stays_bounded() {
    if !sandbox_available("output_without_newlines_is_cut_and_the_supervisor_memory_stays_bounded")
    {
        return;
    }
    const BYTES: u64 = 64 << 20;
    let inst = start(
        "long-line",
        &with_hostile(&format!("\"long-line\", \"{BYTES}\"")),
        1,
        |c| c,
    );
    // The service exits once every byte is written, i.e. read by the supervisor.
    inst.wait_until(Duration::from_secs(120), |rows| {
        rows.iter()
            .any(|r| r["name"] == "hostile" && r["last_exit"].is_string())
    });
    let row = inst.row("hostile");
    assert!(
        row["last_exit"].to_string().contains("exited cleanly"),
        "{row}"
    );
    let pid = inst.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmHWM");
    assert!(
        peak_kib < 40 << 10,
        "the paravisor's memory peaked at {peak_kib} KiB while a service wrote {BYTES} bytes without a newline"
    );
    let log = Path::new(&inst.dir).join("paravisor.log");
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(size < 1 << 20, "the log grew to {size} bytes");
    let out = output(&inst);
    let cut: Vec<&str> = out.lines().filter(|l| l.contains("xxxxxxxx")).collect();
    assert_eq!(cut.len(), 1, "{cut:?}");
    assert_eq!(tag(cut[0]), Some("hostile"));
    assert!(cut[0].contains(&"x".repeat(MAX_LINE)) && !cut[0].contains(&"x".repeat(MAX_LINE + 1)));
    assert!(cut[0].contains("[cut"), "{}", cut[0]);
    assert!(
        out.contains(&format!("pv-hostile: long line of {BYTES} bytes written")),
        "{out}"
    );
}
