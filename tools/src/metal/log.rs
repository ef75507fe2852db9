//! `paravisor metal log`: the metal kernel's log made readable.
//!
//! The kernel writes each defmt frame as a text line `#d:` + the frame's bytes in lowercase
//! hex (a console may put its own prefix before it, e.g. our partition's `intercept   | `).
//! [`LogDecoder`] turns such a line into `PREFIX TIMESTAMP LEVEL message` with the format
//! strings of the image's defmt table, passes every other line through unchanged, and makes
//! a frame it cannot decode a line that says so (with the frame, so nothing is lost).
//!
//! The frames come from a serial line: nothing in them is trusted. A frame is decoded only
//! whole (all its bytes used), and a decoder panic on a malformed frame is caught and
//! reported as an undecodable frame.

use std::io::BufRead;
use std::io::Write;
use std::path::Path;

use defmt_decoder::Table;

/// Marks a defmt frame line (the kernel's `log::FRAME_PREFIX`).
pub const FRAME_MARKER: &str = "#d:";

/// Why a log cannot be decoded at all.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot read the image {path}: {source}")]
    Image {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: cannot read its defmt table: {reason}")]
    Table { path: String, reason: String },
    #[error("{path} has no defmt table (no .defmt section, or its symbols were stripped): decode the log with the image `paravisor metal build` wrote, which keeps its symbols")]
    NoTable { path: String },
    #[error("cannot read the log: {0}")]
    Input(std::io::Error),
    #[error("cannot write the decoded log: {0}")]
    Output(std::io::Error),
}

/// Decodes the log lines of one image.
pub struct LogDecoder {
    table: Table,
}

impl LogDecoder {
    /// The decoder for the kernel image at `path`.
    pub fn open(path: &Path) -> Result<LogDecoder, LogError> {
        let elf = std::fs::read(path).map_err(|source| LogError::Image {
            path: path.display().to_string(),
            source,
        })?;
        LogDecoder::new(&path.display().to_string(), &elf)
    }

    /// The decoder for the kernel image `elf` (named `path` in messages).
    pub fn new(path: &str, elf: &[u8]) -> Result<LogDecoder, LogError> {
        match Table::parse(elf) {
            Ok(Some(table)) => Ok(LogDecoder { table }),
            Ok(None) => Err(LogError::NoTable { path: path.into() }),
            Err(e) => Err(LogError::Table {
                path: path.into(),
                reason: format!("{e:#}"),
            }),
        }
    }

    /// One line of output as it should be shown (without its line end): a frame decoded, any
    /// other line as it was.
    pub fn line(&self, line: &str) -> String {
        let line = line.trim_end_matches(['\n', '\r']);
        let Some(at) = line.find(FRAME_MARKER) else {
            return line.to_string();
        };
        let (prefix, rest) = line.split_at(at);
        let hex = rest[FRAME_MARKER.len()..].trim();
        match self.frame(hex) {
            Ok(text) => format!("{prefix}{text}"),
            Err(why) => format!("{prefix}(undecodable defmt frame: {why}) {FRAME_MARKER}{hex}"),
        }
    }

    /// A frame's text: `TIMESTAMP LEVEL message`.
    fn frame(&self, hex: &str) -> Result<String, String> {
        let bytes = parse_hex(hex)?;
        let table = &self.table;
        // The decoder indexes and unwraps inside; a frame that breaks it is reported, not a
        // reason to stop decoding the rest of the log.
        let decoded = std::panic::catch_unwind(|| -> Result<String, String> {
            let (frame, used) = table.decode(&bytes).map_err(|e| match e {
                defmt_decoder::DecodeError::UnexpectedEof => "truncated".to_string(),
                defmt_decoder::DecodeError::Malformed => {
                    "malformed (an index the image's table lacks: built from another image?)"
                        .to_string()
                }
            })?;
            if used != bytes.len() {
                return Err(format!(
                    "{} bytes after the frame's {used}",
                    bytes.len() - used
                ));
            }
            let level = frame.level().map_or("PRINT", |l| match l.as_str() {
                "trace" => "TRACE",
                "debug" => "DEBUG",
                "info" => "INFO",
                "warn" => "WARN",
                _ => "ERROR",
            });
            let message = frame.display_message().to_string();
            Ok(match frame.display_timestamp() {
                Some(ts) => format!("{ts} {level:<5} {message}"),
                None => format!("{level:<5} {message}"),
            })
        });
        decoded.unwrap_or_else(|_| Err("the decoder failed on it".into()))
    }

    /// Decodes every line of `input` into `output`, flushing each line (a live log).
    pub fn stream(&self, input: impl BufRead, mut output: impl Write) -> Result<(), LogError> {
        for line in input.split(b'\n') {
            let line = line.map_err(LogError::Input)?;
            let text = String::from_utf8_lossy(&line);
            writeln!(output, "{}", self.line(&text)).map_err(LogError::Output)?;
            output.flush().map_err(LogError::Output)?;
        }
        Ok(())
    }

    /// Decodes a whole captured log.
    pub fn text(&self, log: &str) -> String {
        log.lines().map(|l| self.line(l) + "\n").collect()
    }
}

/// Decodes the captured `log` of the kernel image at `image` (what a test reads).
pub fn decode(image: &Path, log: &str) -> Result<String, LogError> {
    Ok(LogDecoder::open(image)?.text(log))
}

/// Lowercase (or uppercase) hex digits, two per byte.
fn parse_hex(hex: &str) -> Result<Vec<u8>, String> {
    if hex.is_empty() {
        return Err("empty".into());
    }
    if !hex.len().is_multiple_of(2) {
        return Err(format!("{} hex digits, an odd number", hex.len()));
    }
    hex.as_bytes()
        .chunks(2)
        .map(|pair| {
            std::str::from_utf8(pair)
                .ok()
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(|| format!("\"{}\" is not hex", String::from_utf8_lossy(pair)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_of_a_frame_is_checked() {
        assert_eq!(parse_hex("00ff10"), Ok(vec![0, 255, 16]));
        assert!(parse_hex("0").unwrap_err().contains("odd"));
        assert!(parse_hex("zz").unwrap_err().contains("not hex"));
        assert!(parse_hex("").is_err());
    }

    #[test]
    fn an_image_without_a_defmt_table_is_refused() {
        let err = LogDecoder::new("x", b"not an elf").err().unwrap();
        assert!(matches!(err, LogError::Table { .. }), "{err}");
    }
}
