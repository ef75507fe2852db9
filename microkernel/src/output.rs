//! What services write to their stdout and stderr, as the operator sees it.
//!
//! Each start of a service gets two pipes of its own (`sandbox::output_pipe`), whose write
//! ends the child holds at descriptors 1 and 2; the service never holds the microkernel's own
//! terminal or log file (it could read what the operator types, drive the terminal, or seek
//! the log file and rewrite it). The supervisor keeps the read ends, non-blocking, in its
//! poll loop, and passes the text on to its own stdout and stderr a line at a time:
//! - every line starts with the service's tag (`name | `); a service cannot forge another's,
//!   since its text can neither end a line nor return to its start;
//! - control characters (C0 but tab, DEL, C1), bidirectional-text controls and bytes that are
//!   not UTF-8 are shown escaped (`\x1b`, `\u{202e}`): no cursor movement, title, colour or
//!   reordering reaches the terminal; a line's trailing carriage return is dropped;
//! - a line longer than [`MAX_LINE`] is cut there, and the rest of it dropped;
//! - per service and stream, a token bucket ([`BURST_LINES`] lines, refilled at that many per
//!   [`REFILL_PERIOD`], journald's default) limits the rate; lines over it are dropped and
//!   counted (`paravisor ps`, and a notice in the supervisor's log).
//!
//! It never blocks on a service's pipe, reads at most [`READ_BUDGET`] bytes per stream per turn
//! of the supervisor's loop, and holds at most one unfinished line per stream: what a service
//! writes cannot stall the supervisor or grow its memory. After a service's death its pipes
//! are drained before its exit is reported, so its last words come before the report.
//!
//! The lines passed on (escaped, after the rate limit) are also kept, with the supervisor's
//! own notes about the service (started, exited, restarting in ...), in a per-service history
//! for `paravisor logs`: at most [`HISTORY_LINES`] lines and [`HISTORY_BYTES`] bytes, the
//! oldest dropped first, each numbered so that a follower asks for what came after the last
//! line it saw and is told how many it missed.

use std::collections::VecDeque;
use std::fs::File;
use std::io::ErrorKind;
use std::io::Read;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::fd::OwnedFd;
use std::os::fd::RawFd;
use std::time::Duration;
use std::time::Instant;

/// Longest line passed on, in bytes of the service's text: a few screens of a log line; a
/// service that writes without newlines holds no more than this of the supervisor's memory.
pub const MAX_LINE: usize = 4096;
/// Lines a service may write at once, per stream, before lines are dropped...
pub const BURST_LINES: u32 = 10_000;
/// ...and the period in which the bucket refills by as many (10 000 lines per 30 s, as
/// journald's default rate limit: a chatty start or a Linux guest's boot console passes, a
/// flood does not fill the disk or the terminal).
pub const REFILL_PERIOD: Duration = Duration::from_secs(30);
/// Most bytes read from one stream per turn of the supervisor's loop: a flooding service
/// gets its share of the loop, not all of it.
pub const READ_BUDGET: usize = 64 * 1024;
/// Most bytes read from the pipes of a service that has ended (more than a pipe holds).
const DRAIN_LIMIT: usize = 16 << 20;
/// Lines of a service's history kept for `paravisor logs`...
pub const HISTORY_LINES: usize = 2000;
/// ...and at most this many bytes of them (a few hundred typical log lines; 7 services keep
/// under 2 MiB however long their lines are).
pub const HISTORY_BYTES: usize = 256 << 10;

/// Where a line of a service's history came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Stdout,
    Stderr,
    /// The supervisor's note about the service (started, exited, restarting ...).
    Paravisor,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Stdout => "stdout",
            Source::Stderr => "stderr",
            Source::Paravisor => "paravisor",
        }
    }
}

/// One line of a service's history: escaped (safe for a terminal), without the tag.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryLine {
    /// Numbered from 1 per service, never reused.
    pub seq: u64,
    pub source: Source,
    pub text: String,
}

/// What a `logs` request gets from the history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistoryPage {
    pub lines: Vec<HistoryLine>,
    /// Lines after the one asked from that are no longer kept (the follower was too slow,
    /// or asked for more than is kept).
    pub missed: u64,
    /// The number of the last line kept so far (0: none yet): where to ask from next.
    pub last: u64,
}

/// The bounded history of one service's lines.
#[derive(Debug, Default)]
struct History {
    lines: VecDeque<HistoryLine>,
    bytes: usize,
    last: u64,
}

impl History {
    fn push(&mut self, source: Source, text: String) {
        self.last += 1;
        self.bytes += text.len();
        self.lines.push_back(HistoryLine {
            seq: self.last,
            source,
            text,
        });
        while self.lines.len() > HISTORY_LINES || self.bytes > HISTORY_BYTES {
            match self.lines.pop_front() {
                Some(old) => self.bytes -= old.text.len(),
                None => break,
            }
        }
    }

    /// The lines after number `after` (the last `tail` kept if `after` is `None`), at most
    /// `max_bytes` of text (at least one line).
    fn page(&self, after: Option<u64>, tail: usize, max_bytes: usize) -> HistoryPage {
        let first_kept = self.lines.front().map_or(self.last + 1, |l| l.seq);
        let from = match after {
            Some(a) => a.saturating_add(1),
            None => self.last.saturating_sub(tail as u64) + 1,
        };
        let missed = match after {
            Some(_) => first_kept.saturating_sub(from),
            None => 0,
        };
        let mut lines = Vec::new();
        let mut bytes = 0;
        for l in self.lines.iter().filter(|l| l.seq >= from) {
            if !lines.is_empty() && bytes + l.text.len() > max_bytes {
                break;
            }
            bytes += l.text.len();
            lines.push(l.clone());
        }
        // Nothing (more) to give: everything up to the newest has been given or missed.
        let last = lines.last().map_or(self.last, |l| l.seq);
        HistoryPage {
            lines,
            missed,
            last,
        }
    }
}

/// One of a service's two output streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub const ALL: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// The rate limit of one stream, kept exact in time: each line costs
/// `REFILL_PERIOD / BURST_LINES` of credit, which accrues with time up to `REFILL_PERIOD`.
#[derive(Debug)]
struct TokenBucket {
    credit: Duration,
    updated: Option<Instant>,
}

impl TokenBucket {
    fn full() -> TokenBucket {
        TokenBucket {
            credit: REFILL_PERIOD,
            updated: None,
        }
    }

    /// Takes a line's token if there is one.
    fn take(&mut self, now: Instant) -> bool {
        let since = self
            .updated
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.credit = (self.credit + since).min(REFILL_PERIOD);
        self.updated = Some(now);
        let cost = REFILL_PERIOD / BURST_LINES;
        match self.credit.checked_sub(cost) {
            Some(left) => {
                self.credit = left;
                true
            }
            None => false,
        }
    }
}

/// One stream: the read end of the current start's pipe and the line being assembled.
#[derive(Debug)]
struct StreamState {
    pipe: Option<File>,
    line: Vec<u8>,
    /// The current line was cut at [`MAX_LINE`]; the rest of it is being dropped.
    cutting: bool,
    bucket: TokenBucket,
}

/// What the supervisor keeps of one service's output, across its restarts (the rate limit
/// and the count of dropped lines carry over: a crash loop gets no fresh burst).
#[derive(Debug)]
pub struct ServiceOutput {
    tag: Vec<u8>,
    /// The service's name, for JSON lines.
    name: String,
    format: crate::logging::LogFormat,
    streams: [StreamState; 2],
    dropped: u64,
    unreported: u64,
    history: History,
}

impl ServiceOutput {
    /// The output of service `name`, tagged with the name padded to `width` (the longest
    /// name of the manifest, so that the text of every service starts in the same column).
    pub fn new(name: &str, width: usize) -> ServiceOutput {
        let stream = || StreamState {
            pipe: None,
            line: Vec::new(),
            cutting: false,
            bucket: TokenBucket::full(),
        };
        ServiceOutput {
            tag: format!("{name:<width$} | ").into_bytes(),
            name: name.to_string(),
            format: crate::logging::LogFormat::Text,
            streams: [stream(), stream()],
            dropped: 0,
            unreported: 0,
            history: History::default(),
        }
    }

    /// Its lines as `format` says (text, tagged, by default; JSON lines: see `logging.rs`).
    pub fn with_format(mut self, format: crate::logging::LogFormat) -> ServiceOutput {
        self.format = format;
        self
    }

    /// Adds the supervisor's own note about the service to its history (not printed: the
    /// supervisor's log has it already).
    pub fn note(&mut self, text: impl Into<String>) {
        self.history.push(Source::Paravisor, text.into());
    }

    /// The history after line `after`, or its last `tail` lines; at most `max_bytes` of text.
    pub fn history(&self, after: Option<u64>, tail: usize, max_bytes: usize) -> HistoryPage {
        self.history.page(after, tail, max_bytes)
    }

    /// Takes the read ends of a new start's pipes (non-blocking).
    pub fn attach(&mut self, stdout: OwnedFd, stderr: OwnedFd) {
        for (stream, fd) in [(Stream::Stdout, stdout), (Stream::Stderr, stderr)] {
            let s = &mut self.streams[stream.index()];
            s.pipe = Some(File::from(fd));
            s.line.clear();
            s.cutting = false;
        }
    }

    /// The open read ends, to poll.
    pub fn fds(&self) -> Vec<(Stream, RawFd)> {
        Stream::ALL
            .into_iter()
            .filter_map(|s| Some((s, self.streams[s.index()].pipe.as_ref()?.as_raw_fd())))
            .collect()
    }

    /// Lines dropped by the rate limit since the supervisor started.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Lines dropped since the last call (for the supervisor's periodic notice).
    pub fn take_unreported(&mut self) -> u64 {
        std::mem::take(&mut self.unreported)
    }

    /// Reads what `stream` holds now (at most [`READ_BUDGET`], never waiting) and writes its
    /// complete lines to `sink`. At the end of the stream (the service closed it or ended),
    /// the unfinished line is written too and the pipe closed.
    pub fn pump(&mut self, stream: Stream, sink: &mut dyn Write) {
        let mut out = Vec::new();
        let now = Instant::now();
        let open = self.read(stream, READ_BUDGET, now, &mut out);
        if !open {
            self.close(stream, now, &mut out);
        }
        write_out(sink, &out);
    }

    /// After the service's process has ended: everything left in its pipes, then the
    /// unfinished lines; closes the pipes.
    pub fn drain(&mut self, stdout: &mut dyn Write, stderr: &mut dyn Write) {
        let now = Instant::now();
        for stream in Stream::ALL {
            let mut out = Vec::new();
            self.read(stream, DRAIN_LIMIT, now, &mut out);
            self.close(stream, now, &mut out);
            match stream {
                Stream::Stdout => write_out(stdout, &out),
                Stream::Stderr => write_out(stderr, &out),
            }
        }
    }

    /// Reads up to `limit` bytes of `stream` into lines in `out`; whether the pipe is still
    /// open (false at its end or on an error).
    fn read(&mut self, stream: Stream, limit: usize, now: Instant, out: &mut Vec<u8>) -> bool {
        let mut buf = [0u8; 16 * 1024];
        let mut total = 0;
        while total < limit {
            let Some(mut pipe) = self.streams[stream.index()].pipe.as_ref() else {
                return false;
            };
            match pipe.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => {
                    total += n;
                    self.feed(stream, &buf[..n], now, out);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Writes out the unfinished line of `stream` and closes its pipe.
    fn close(&mut self, stream: Stream, now: Instant, out: &mut Vec<u8>) {
        self.finish(stream, now, out);
        self.streams[stream.index()].pipe = None;
    }

    /// Splits `bytes` of `stream` into lines, appending each complete one to `out`.
    fn feed(&mut self, stream: Stream, bytes: &[u8], now: Instant, out: &mut Vec<u8>) {
        let mut rest = bytes;
        while !rest.is_empty() {
            match rest.iter().position(|b| *b == b'\n') {
                Some(end) => {
                    self.append(stream, &rest[..end], now, out);
                    self.end_line(stream, now, out);
                    rest = &rest[end + 1..];
                }
                None => {
                    self.append(stream, rest, now, out);
                    break;
                }
            }
        }
    }

    /// Adds text without a newline to the current line, cutting it at [`MAX_LINE`].
    fn append(&mut self, stream: Stream, piece: &[u8], now: Instant, out: &mut Vec<u8>) {
        let s = &mut self.streams[stream.index()];
        if s.cutting {
            return;
        }
        let room = MAX_LINE - s.line.len();
        if piece.len() <= room {
            s.line.extend_from_slice(piece);
            return;
        }
        s.line.extend_from_slice(&piece[..room]);
        s.cutting = true;
        let mut line = std::mem::take(&mut s.line);
        // Never half a character.
        let whole = line.len() - incomplete_utf8_tail(&line);
        self.emit(stream, &line[..whole], true, now, out);
        line.clear();
        self.streams[stream.index()].line = line;
    }

    fn end_line(&mut self, stream: Stream, now: Instant, out: &mut Vec<u8>) {
        let s = &mut self.streams[stream.index()];
        if std::mem::take(&mut s.cutting) {
            return;
        }
        let mut line = std::mem::take(&mut s.line);
        self.emit(stream, &line, false, now, out);
        line.clear();
        self.streams[stream.index()].line = line;
    }

    /// The unfinished line, if any, as a line of its own.
    fn finish(&mut self, stream: Stream, now: Instant, out: &mut Vec<u8>) {
        let s = &self.streams[stream.index()];
        if !s.line.is_empty() && !s.cutting {
            self.end_line(stream, now, out);
        }
        let s = &mut self.streams[stream.index()];
        s.line.clear();
        s.cutting = false;
    }

    /// One line to `out`, tagged and escaped (or as a JSON line), if the rate limit lets it
    /// through; into the history, escaped, either way.
    fn emit(&mut self, stream: Stream, text: &[u8], cut: bool, now: Instant, out: &mut Vec<u8>) {
        if !self.streams[stream.index()].bucket.take(now) {
            self.dropped += 1;
            self.unreported += 1;
            return;
        }
        let text = if cut {
            text
        } else {
            text.strip_suffix(b"\r").unwrap_or(text)
        };
        let mut escaped = Vec::new();
        escape(text, &mut escaped);
        // Escaped text is UTF-8.
        let escaped = String::from_utf8_lossy(&escaped).into_owned();
        let cut_note = if cut {
            format!(" [cut: longer than {MAX_LINE} bytes]")
        } else {
            String::new()
        };
        let (source, name) = match stream {
            Stream::Stdout => (Source::Stdout, "stdout"),
            Stream::Stderr => (Source::Stderr, "stderr"),
        };
        match self.format {
            crate::logging::LogFormat::Json => out.extend_from_slice(
                crate::logging::service_line_json(&self.name, name, &escaped, cut).as_bytes(),
            ),
            crate::logging::LogFormat::Text => {
                out.extend_from_slice(&self.tag);
                out.extend_from_slice(escaped.as_bytes());
                out.extend_from_slice(cut_note.as_bytes());
            }
        }
        out.push(b'\n');
        self.history.push(source, escaped + &cut_note);
    }
}

/// Writes `bytes` (whole lines) to `sink`; an output the operator closed loses them.
fn write_out(sink: &mut dyn Write, bytes: &[u8]) {
    if !bytes.is_empty() {
        let _ = sink.write_all(bytes).and_then(|()| sink.flush());
    }
}

/// Appends `text` to `out` with control characters (but tab), bidirectional-text controls and
/// bytes that are not UTF-8 escaped; other UTF-8 passes, so non-ASCII text stays readable.
pub fn escape(text: &[u8], out: &mut Vec<u8>) {
    fn hex(b: u8, out: &mut Vec<u8>) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        out.extend_from_slice(&[
            b'\\',
            b'x',
            DIGITS[usize::from(b >> 4)],
            DIGITS[usize::from(b & 0xf)],
        ]);
    }
    for chunk in text.utf8_chunks() {
        for c in chunk.valid().chars() {
            let mut utf8 = [0; 4];
            let bytes = c.encode_utf8(&mut utf8).as_bytes();
            if c.is_control() && c != '\t' {
                bytes.iter().for_each(|b| hex(*b, out));
            } else if reorders_or_breaks(c) {
                out.extend_from_slice(format!("\\u{{{:04x}}}", u32::from(c)).as_bytes());
            } else {
                out.extend_from_slice(bytes);
            }
        }
        chunk.invalid().iter().for_each(|b| hex(*b, out));
    }
}

/// Characters that are not control characters but change how a line shows: bidirectional
/// overrides, marks and isolates (text shown in another order than written), and the line
/// and paragraph separators (a line break to some viewers).
fn reorders_or_breaks(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

/// How many bytes at the end of `text` start a UTF-8 character still missing bytes.
fn incomplete_utf8_tail(text: &[u8]) -> usize {
    for back in 1..=text.len().min(3) {
        let b = text[text.len() - back];
        if b & 0xc0 == 0x80 {
            continue;
        }
        let needed = match b {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xff => 4,
            _ => return 0,
        };
        return if back < needed { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(out: &mut ServiceOutput, stream: Stream, bytes: &[u8], now: Instant) -> String {
        let mut buf = Vec::new();
        out.feed(stream, bytes, now, &mut buf);
        String::from_utf8(buf).expect("escaped output is UTF-8")
    }

    #[test]
    fn complete_lines_are_tagged_and_unfinished_ones_wait() {
        let mut o = ServiceOutput::new("vtpm", 6);
        let now = Instant::now();
        assert_eq!(
            lines(&mut o, Stream::Stderr, b"one\ntw", now),
            "vtpm   | one\n"
        );
        assert_eq!(
            lines(&mut o, Stream::Stderr, b"o\n\n", now),
            "vtpm   | two\nvtpm   | \n"
        );
        // The streams are separate lines.
        assert_eq!(lines(&mut o, Stream::Stdout, b"out", now), "");
        assert_eq!(
            lines(&mut o, Stream::Stderr, b"err\n", now),
            "vtpm   | err\n"
        );
        let mut buf = Vec::new();
        o.finish(Stream::Stdout, now, &mut buf);
        assert_eq!(buf, b"vtpm   | out\n");
    }

    #[test]
    fn terminal_controls_and_broken_utf8_are_escaped() {
        let mut o = ServiceOutput::new("x", 1);
        let now = Instant::now();
        let text = "\x1b]0;title\x07\x1b[2Jé\tok\rx | forged\u{9b}31m\u{202e}rev\u{2028}\x7f\r\n";
        let mut bytes = text.as_bytes().to_vec();
        bytes.splice(3..3, [0xff, 0xc3]);
        assert_eq!(
            lines(&mut o, Stream::Stdout, &bytes, now),
            "x | \\x1b]0\\xff\\xc3;title\\x07\\x1b[2Jé\tok\\x0dx | forged\\xc2\\x9b31m\\u{202e}rev\\u{2028}\\x7f\n"
        );
    }

    #[test]
    fn json_lines_carry_the_service_stream_and_escaped_text() {
        let mut o = ServiceOutput::new("vtpm", 6).with_format(crate::logging::LogFormat::Json);
        let now = Instant::now();
        let out = lines(
            &mut o,
            Stream::Stderr,
            b"hello \x1b[31mred\r\nsecond\n",
            now,
        );
        let rows: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        assert_eq!(rows.len(), 2, "{out}");
        assert_eq!(rows[0]["service"], "vtpm");
        assert_eq!(rows[0]["stream"], "stderr");
        assert_eq!(rows[0]["message"], "hello \\x1b[31mred");
        assert_eq!(rows[1]["message"], "second");
        assert!(!out.contains('\x1b'));
    }

    #[test]
    fn a_long_line_is_cut_whole_characters_kept_and_the_rest_dropped() {
        let mut o = ServiceOutput::new("s", 1);
        let now = Instant::now();
        let mut text = vec![b'a'; MAX_LINE - 1];
        text.extend_from_slice("é".as_bytes());
        let mut out = lines(&mut o, Stream::Stderr, &text, now);
        // More of the same line, in pieces, then its end and a short line.
        out += &lines(&mut o, Stream::Stderr, &[b'b'; 100_000], now);
        out += &lines(&mut o, Stream::Stderr, b"bbb\nnext\n", now);
        let expected = format!(
            "s | {} [cut: longer than {MAX_LINE} bytes]\ns | next\n",
            "a".repeat(MAX_LINE - 1)
        );
        assert_eq!(out, expected);
        // A line of exactly the limit is not cut.
        let mut exact = vec![b'c'; MAX_LINE];
        exact.push(b'\n');
        assert_eq!(
            lines(&mut o, Stream::Stderr, &exact, now),
            format!("s | {}\n", "c".repeat(MAX_LINE))
        );
    }

    #[test]
    fn lines_over_the_rate_limit_are_dropped_counted_and_the_bucket_refills() {
        let mut o = ServiceOutput::new("f", 1);
        let start = Instant::now();
        let flood = "l\n".repeat(BURST_LINES as usize + 500);
        let out = lines(&mut o, Stream::Stderr, flood.as_bytes(), start);
        assert_eq!(out.lines().count(), BURST_LINES as usize);
        assert_eq!(o.dropped(), 500);
        assert_eq!(o.take_unreported(), 500);
        assert_eq!(o.take_unreported(), 0);
        // The other stream has its own bucket.
        assert_eq!(lines(&mut o, Stream::Stdout, b"o\n", start), "f | o\n");
        // Three seconds later a tenth of the burst has come back.
        let later = start + REFILL_PERIOD / 10;
        let out = lines(&mut o, Stream::Stderr, flood.as_bytes(), later);
        assert_eq!(out.lines().count(), BURST_LINES as usize / 10);
        assert_eq!(
            o.dropped(),
            500 + (BURST_LINES as u64 + 500) - u64::from(BURST_LINES) / 10
        );
    }

    #[test]
    fn the_history_keeps_the_last_lines_within_its_bounds_and_numbers_them() {
        let mut o = ServiceOutput::new("h", 1);
        let now = Instant::now();
        lines(&mut o, Stream::Stderr, b"one\n\x1b[2Jtwo\n", now);
        o.note("restarting in 50ms");
        lines(&mut o, Stream::Stdout, b"three\n", now);
        let page = o.history(None, 10, usize::MAX);
        let got: Vec<(u64, Source, &str)> = page
            .lines
            .iter()
            .map(|l| (l.seq, l.source, l.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (1, Source::Stderr, "one"),
                (2, Source::Stderr, "\\x1b[2Jtwo"),
                (3, Source::Paravisor, "restarting in 50ms"),
                (4, Source::Stdout, "three"),
            ]
        );
        assert_eq!((page.missed, page.last), (0, 4));
        // The last two; what came after line 3; nothing new after 4.
        assert_eq!(o.history(None, 2, usize::MAX).lines[0].seq, 3);
        assert_eq!(o.history(Some(3), 0, usize::MAX).lines.len(), 1);
        let idle = o.history(Some(4), 0, usize::MAX);
        assert!(idle.lines.is_empty());
        assert_eq!((idle.missed, idle.last), (0, 4));
        // A page stops at its byte budget (but holds at least one line).
        let page = o.history(Some(0), 0, 4);
        assert_eq!(page.lines.len(), 1);
        assert_eq!(page.last, 1);

        // Bounded in lines: a flood keeps the newest, and a slow follower learns what it
        // missed.
        let flood = "x\n".repeat(HISTORY_LINES + 100);
        lines(&mut o, Stream::Stderr, flood.as_bytes(), now);
        let page = o.history(Some(4), 0, usize::MAX);
        assert_eq!(page.missed, 100);
        assert_eq!(page.lines.len(), HISTORY_LINES);
        assert_eq!(page.last, 4 + HISTORY_LINES as u64 + 100);
        // Bounded in bytes: long lines push out old ones.
        let long = format!("{}\n", "y".repeat(MAX_LINE));
        lines(&mut o, Stream::Stderr, long.repeat(100).as_bytes(), now);
        let kept = o.history(None, usize::MAX, usize::MAX).lines;
        let bytes: usize = kept.iter().map(|l| l.text.len()).sum();
        assert!(bytes <= HISTORY_BYTES, "{bytes}");
        assert!(kept.len() >= HISTORY_BYTES / MAX_LINE - 1);
    }

    #[test]
    fn pumping_never_waits_and_a_closed_pipe_gives_its_last_line() {
        let (read, write) = crate::sandbox::output_pipe().expect("pipe");
        let (read2, _write2) = crate::sandbox::output_pipe().expect("pipe");
        let mut o = ServiceOutput::new("p", 1);
        o.attach(read2, read);
        let mut w = File::from(write);
        w.write_all(b"first\nsecond").unwrap();
        let mut sink = Vec::new();
        o.pump(Stream::Stderr, &mut sink);
        assert_eq!(sink, b"p | first\n");
        // Nothing more to read: returns at once, the pipe stays open.
        o.pump(Stream::Stderr, &mut sink);
        assert_eq!(o.fds().len(), 2);
        drop(w);
        o.pump(Stream::Stderr, &mut sink);
        assert_eq!(sink, b"p | first\np | second\n");
        let open: Vec<Stream> = o.fds().iter().map(|(s, _)| *s).collect();
        assert_eq!(open, [Stream::Stdout]);
    }

    #[test]
    fn draining_reads_everything_left_and_closes() {
        let (read, write) = crate::sandbox::output_pipe().expect("pipe");
        let (read2, write2) = crate::sandbox::output_pipe().expect("pipe");
        let mut o = ServiceOutput::new("d", 1);
        o.attach(read, read2);
        let mut w = File::from(write);
        // More than one turn's budget, and an unfinished line.
        let many = "0123456789abcdef\n".repeat(READ_BUDGET / 17 + 100);
        let writer = std::thread::spawn(move || {
            w.write_all(many.as_bytes()).unwrap();
            w.write_all(b"last words").unwrap();
        });
        let mut out = Vec::new();
        let mut err = Vec::new();
        // Keep the pipe from filling while the writer runs, as the main loop does.
        while !writer.is_finished() {
            o.pump(Stream::Stdout, &mut out);
        }
        writer.join().unwrap();
        drop(write2);
        o.drain(&mut out, &mut err);
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), READ_BUDGET / 17 + 101);
        assert!(
            text.ends_with("d | last words\n"),
            "{}",
            &text[text.len() - 40..]
        );
        assert!(err.is_empty());
        assert!(o.fds().is_empty());
    }
}
