//! Where `paravisor run` logs and how its lines look ([`LogOptions`]: `--log-format`,
//! `--log-file`).
//!
//! The log is the microkernel's own `tracing` events and the lines its services write to
//! stderr (tagged by `output.rs`); the services' stdout (the guest's console) stays on stdout.
//! - `text`: human lines. Colour (ANSI escapes) only when the line goes to a terminal; a pipe
//!   or a file gets plain text. Services never colour their lines (their stderr is a pipe).
//! - `json`: one JSON object per line. The microkernel's events as `timestamp`, `level`,
//!   `message` and the event's fields; a service's line as
//!   `{"timestamp", "service", "stream", "message"}` (the message escaped as in text mode;
//!   `"cut": true` when it was cut). On stdout too, so that a consumer reads one format.
//! - `--log-file PATH`: the log is appended to PATH instead of stderr: created 0600 if
//!   missing; refused if it is a symbolic link, not a regular file, or not owned by the user
//!   running paravisor (another user's file could be a trap or someone else's log). A
//!   failure that ends `run` is still printed on stderr.
//!
//! The file is opened once, before the supervisor's seccomp filter: afterwards only `write`
//! reaches it.

use std::fs::File;
use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::sync::OnceLock;

/// How log lines look (a `run` flag, or the host file's `log-format`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human lines (coloured only on a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The log settings of a run (the host file's, overridden by `run`'s flags: `host_config`).
#[derive(Clone, Debug, Default)]
pub struct LogOptions {
    pub format: LogFormat,
    /// Append the log here instead of writing it to stderr.
    pub file: Option<PathBuf>,
}

/// Why the log cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log file {0}: {1}")]
    Open(String, std::io::Error),
    #[error("log file {0} is a symbolic link: refused (name the file itself)")]
    Link(String),
    #[error("log file {0} is not a regular file: refused")]
    NotAFile(String),
    #[error("log file {0} belongs to uid {1}, not to the user running paravisor (uid {2}): refused (remove it or name another file)")]
    NotOurs(String, u32, u32),
}

/// The destination chosen by [`init`], for the whole process (as `tracing`'s subscriber is).
struct Destination {
    format: LogFormat,
    file: Option<File>,
}

static DESTINATION: OnceLock<Destination> = OnceLock::new();

/// Opens `path` for appending: created 0600 if missing, never through a link, and only a
/// regular file of ours.
pub fn open_log_file(path: &Path) -> Result<File, LogError> {
    let shown = path.display().to_string();
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => LogError::Link(shown.clone()),
            _ => LogError::Open(shown.clone(), e),
        })?;
    let meta = file
        .metadata()
        .map_err(|e| LogError::Open(shown.clone(), e))?;
    if !meta.file_type().is_file() {
        return Err(LogError::NotAFile(shown));
    }
    let me = ipc_defs::hosted::sys::effective_uid();
    if meta.uid() != me {
        return Err(LogError::NotOurs(shown, meta.uid(), me));
    }
    Ok(file)
}

/// Sets the process's log up as `options` say (once; later calls change nothing).
pub fn init(options: &LogOptions) -> Result<(), LogError> {
    let file = options.file.as_deref().map(open_log_file).transpose()?;
    let ansi = file.is_none() && std::io::stderr().is_terminal();
    let _ = DESTINATION.set(Destination {
        format: options.format,
        file,
    });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(log_writer)
        .with_target(false);
    let _ = match options.format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        LogFormat::Json => builder.with_ansi(false).event_format(JsonLines).try_init(),
    };
    Ok(())
}

/// The microkernel's events as JSON lines: `timestamp`, `level`, `message` and the event's
/// own fields. (Ours rather than tracing-subscriber's `json` feature: that feature would put
/// serde_json into every service's build, whose tests compare numbers with `.into()`.)
struct JsonLines;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonLines
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = serde_json::Map::new();
        fields.insert("timestamp".into(), timestamp().into());
        fields.insert("level".into(), event.metadata().level().as_str().into());
        event.record(&mut JsonFields(&mut fields));
        writeln!(writer, "{}", serde_json::Value::Object(fields))
    }
}

/// Collects an event's fields as JSON values.
struct JsonFields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().into(), format!("{value:?}").into());
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

/// Now, as tracing's text lines show it (RFC 3339, UTC).
fn timestamp() -> String {
    use tracing_subscriber::fmt::time::FormatTime;
    let mut timestamp = String::new();
    let _ = tracing_subscriber::fmt::time::SystemTime.format_time(
        &mut tracing_subscriber::fmt::format::Writer::new(&mut timestamp),
    );
    timestamp
}

/// The format [`init`] chose (text before it ran).
pub fn format() -> LogFormat {
    DESTINATION.get().map_or(LogFormat::Text, |d| d.format)
}

/// Where log lines go: the log file, or stderr.
pub fn log_writer() -> LogWriter {
    LogWriter
}

/// A writer to the log's destination (see [`log_writer`]).
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match DESTINATION.get().and_then(|d| d.file.as_ref()) {
            Some(mut f) => f.write(buf),
            None => std::io::stderr().write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        // One write for a line when the destination takes it whole (O_APPEND: lines of
        // several threads do not interleave).
        match DESTINATION.get().and_then(|d| d.file.as_ref()) {
            Some(mut f) => f.write_all(buf),
            None => std::io::stderr().lock().write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match DESTINATION.get().and_then(|d| d.file.as_ref()) {
            Some(mut f) => f.flush(),
            None => std::io::stderr().flush(),
        }
    }
}

/// A service's output line as a JSON line: `text` is already escaped (`output::escape`).
pub fn service_line_json(service: &str, stream: &str, text: &str, cut: bool) -> String {
    let mut line = serde_json::json!({
        "timestamp": timestamp(),
        "service": service,
        "stream": stream,
        "message": text,
    });
    if cut {
        line["cut"] = serde_json::Value::Bool(true);
    }
    line.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pv-logging-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_log_file_is_created_private_appended_and_never_followed_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("file");
        let path = dir.join("run.log");
        open_log_file(&path).unwrap().write_all(b"one\n").unwrap();
        open_log_file(&path).unwrap().write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "one\ntwo\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let link = dir.join("link.log");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(matches!(open_log_file(&link), Err(LogError::Link(_))));
        let fifo_like = dir.join("sub");
        std::fs::create_dir(&fifo_like).unwrap();
        assert!(open_log_file(&fifo_like).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_service_line_in_json_keeps_its_escaped_text_and_names_its_source() {
        let line = service_line_json("vtpm", "stderr", "a \\x1b[31m \"quoted\"", true);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["service"], "vtpm");
        assert_eq!(v["stream"], "stderr");
        assert_eq!(v["message"], "a \\x1b[31m \"quoted\"");
        assert_eq!(v["cut"], true);
        assert!(v["timestamp"].as_str().is_some_and(|t| t.len() > 10), "{v}");
        assert!(!line.contains('\n') && !line.contains('\x1b'));
    }
}
