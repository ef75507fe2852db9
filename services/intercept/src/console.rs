//! The guest's serial console as the operator sees it: the bytes the guest writes to COM1,
//! passed on a line at a time to any [`std::io::Write`] (the service's stdout).
//!
//! A line is written and flushed when its newline arrives; a line that grows past
//! [`LINE_LIMIT`] without one is written as it is, and whatever is left is written when the
//! console is dropped (at shutdown). The text is passed on unmodified, except that control
//! characters other than `\n`, `\r` and `\t` (C0, DEL and the C1 range), and bytes that are not
//! UTF-8, are shown as `\xNN`: the guest must not be able to drive the operator's terminal
//! with escape sequences. Valid UTF-8 passes through, so a guest's non-ASCII text stays
//! readable.
//!
//! It never fails the guest: a write error (stdout closed) loses the output and is counted.

use std::io::Write;

use crate::server::Console;

/// Bytes a partial line may hold before it is written without its newline: a guest that never
/// writes one still shows its output, and memory stays bounded.
pub const LINE_LIMIT: usize = 1024;

/// A console that writes whole lines to `W`.
pub struct LineConsole<W: Write> {
    out: W,
    line: Vec<u8>,
    escaped: Vec<u8>,
    /// Writes to `out` that failed (their text is lost).
    pub write_errors: u64,
}

impl<W: Write> LineConsole<W> {
    pub fn new(out: W) -> LineConsole<W> {
        LineConsole {
            out,
            line: Vec::with_capacity(LINE_LIMIT + 1),
            escaped: Vec::new(),
            write_errors: 0,
        }
    }

    /// Writes out what is buffered, complete line or not.
    pub fn finish(&mut self) {
        self.emit(self.line.len());
    }

    /// Writes out the first `end` buffered bytes.
    fn emit(&mut self, end: usize) {
        if end == 0 {
            return;
        }
        self.escaped.clear();
        escape(&self.line[..end], &mut self.escaped);
        self.line.drain(..end);
        let written = self
            .out
            .write_all(&self.escaped)
            .and_then(|()| self.out.flush());
        if written.is_err() {
            self.write_errors = self.write_errors.saturating_add(1);
        }
    }
}

impl<W: Write> Console for LineConsole<W> {
    fn transmit(&mut self, byte: u8) {
        self.line.push(byte);
        if byte == b'\n' {
            self.emit(self.line.len());
        } else if self.line.len() > LINE_LIMIT {
            // Keep a character that is still arriving whole for the next write.
            let keep = incomplete_utf8_tail(&self.line);
            self.emit(self.line.len() - keep);
        }
    }
}

impl<W: Write> Drop for LineConsole<W> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Appends `text` to `out` with control characters and non-UTF-8 bytes as `\xNN`.
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
            if c.is_control() && !matches!(c, '\n' | '\r' | '\t') {
                bytes.iter().for_each(|b| hex(*b, out));
            } else {
                out.extend_from_slice(bytes);
            }
        }
        chunk.invalid().iter().for_each(|b| hex(*b, out));
    }
}

/// How many bytes at the end of `text` are the start of a UTF-8 character still missing
/// bytes (0 if none).
fn incomplete_utf8_tail(text: &[u8]) -> usize {
    for back in 1..=text.len().min(3) {
        let b = text[text.len() - back];
        if b & 0xc0 == 0x80 {
            continue; // a continuation byte: look further back for the lead
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

    fn console_output(input: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut c = LineConsole::new(&mut out);
            input.iter().for_each(|b| c.transmit(*b));
        }
        out
    }

    /// A writer that records each write, to see where lines were cut.
    struct Writes<'a>(&'a mut Vec<Vec<u8>>);

    impl Write for Writes<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push(buf.to_vec());
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn complete_lines_are_written_unmodified() {
        let text = b"[    0.000000] Linux version 6.1\r\n\tindented \xc3\xa9t\xc3\xa9\r\n";
        assert_eq!(console_output(text), text);
    }

    #[test]
    fn control_bytes_and_invalid_utf8_are_escaped() {
        assert_eq!(
            console_output(b"\x1b[2Jhi\x00\x7f\xff\xc2\x9b!\n"),
            b"\\x1b[2Jhi\\x00\\x7f\\xff\\xc2\\x9b!\n"
        );
    }

    #[test]
    fn a_line_is_written_when_it_ends() {
        let mut writes = Vec::new();
        {
            let mut c = LineConsole::new(Writes(&mut writes));
            b"one\ntw".iter().for_each(|b| c.transmit(*b));
            assert_eq!(c.out.0, &[b"one\n".to_vec()]);
        }
        // The partial line is written at the end.
        assert_eq!(writes, [b"one\n".to_vec(), b"tw".to_vec()]);
    }

    #[test]
    fn a_long_line_is_written_in_pieces_that_keep_characters_whole() {
        let mut writes = Vec::new();
        {
            let mut c = LineConsole::new(Writes(&mut writes));
            let mut text = vec![b'a'; LINE_LIMIT];
            text.extend_from_slice("é".as_bytes());
            text.extend_from_slice(b"b\n");
            text.iter().for_each(|b| c.transmit(*b));
        }
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[0], vec![b'a'; LINE_LIMIT]);
        assert_eq!(writes[1], "éb\n".as_bytes());
    }

    #[test]
    fn incomplete_tails_are_recognised() {
        assert_eq!(incomplete_utf8_tail(b"ab"), 0);
        assert_eq!(incomplete_utf8_tail(b"a\xc3"), 1);
        assert_eq!(incomplete_utf8_tail(b"a\xc3\xa9"), 0);
        assert_eq!(incomplete_utf8_tail(b"\xf0\x9f\x98"), 3);
        assert_eq!(incomplete_utf8_tail(b"\xf0\x9f\x98\x80"), 0);
        assert_eq!(incomplete_utf8_tail(b"\x80\x80\x80"), 0);
        assert_eq!(incomplete_utf8_tail(b""), 0);
    }
}
