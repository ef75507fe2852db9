//! Small helpers every part of the binary uses: hex text, and reading a file that whoever
//! sent it may have made hostile (a FIFO, a device, gigabytes).

use std::path::Path;

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

/// Parses hex as people paste it: an optional `0x`, either case, spaces and colons between
/// bytes.
pub fn parse_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let s: String = s
        .chars()
        .filter(|c| !c.is_whitespace() && *c != ':')
        .collect();
    ::hex::decode(s).ok()
}

/// Opens a regular file for reading, and nothing else: a FIFO or a device could block for
/// ever. Opened without blocking, then the opened file is checked (the path may change in
/// between).
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(file)
}

/// Reads a file of evidence, refusing one larger than `limit` bytes before reading it all:
/// evidence comes from whoever sent it, and a verifier must not be made to swallow gigabytes.
pub fn read_at_most(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    open_regular(path)?
        .take(limit + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than the {limit} bytes such a file can be"),
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_parsing_takes_what_people_paste() {
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(parse_hex("0a:0B 0c"), Some(vec![10, 11, 12]));
        assert_eq!(parse_hex("0x0A0b"), Some(vec![10, 11]));
        assert_eq!(parse_hex(" 00ab10 "), Some(vec![0, 0xab, 0x10]));
        assert_eq!(parse_hex(""), Some(vec![]));
        assert_eq!(parse_hex("0x"), Some(vec![]));
        for bad in ["abc", "0g", "+f", "-1", "é1"] {
            assert_eq!(parse_hex(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_regular_files_of_bounded_size_are_read() {
        let dir = std::env::temp_dir().join(format!("pv-util-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, [7u8; 100]).unwrap();
        assert_eq!(read_at_most(&file, 100).unwrap().len(), 100);
        let e = read_at_most(&file, 99).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert_eq!(
            open_regular(&dir).unwrap_err().kind(),
            std::io::ErrorKind::InvalidInput
        );
        assert_eq!(
            open_regular(Path::new("/dev/null")).unwrap_err().kind(),
            std::io::ErrorKind::InvalidInput
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
