//! A task's program image: the loadable segments of an ELF64 file, checked before anything
//! is mapped (inside the image window, apart from each other, never writable and executable,
//! the entry in an executable segment).

use ipc_defs::metal::HEAP_BASE;
use ipc_defs::metal::IMAGE_BASE;
use ipc_defs::metal::PAGE;
use object::elf;
use object::read::elf::FileHeader;
use object::read::elf::ProgramHeader;
use object::LittleEndian;

/// Most loadable segments a task image has.
pub const MAX_SEGMENTS: usize = 8;

/// One loadable segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    /// Where it starts in the task (page aligned: the pages are the segment's own).
    pub address: u64,
    /// Bytes in memory (the part past `data` is zero).
    pub size: u64,
    pub data: &'a [u8],
    pub writable: bool,
    pub executable: bool,
}

impl Segment<'_> {
    /// The end of its last page.
    pub fn end(&self) -> u64 {
        (self.address + self.size).div_ceil(PAGE) * PAGE
    }
}

/// A checked image.
#[derive(Debug)]
pub struct Image<'a> {
    pub entry: u64,
    pub segments: heapless::Vec<Segment<'a>, MAX_SEGMENTS>,
}

/// Why an image is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageError {
    /// Not an ELF64 little-endian x86-64 executable.
    NotElf,
    /// More loadable segments than [`MAX_SEGMENTS`].
    TooManySegments,
    /// A segment outside the image window, misaligned, overlapping another, larger in the
    /// file than in memory, or both writable and executable.
    Segment(u64),
    /// The entry point is not inside an executable segment.
    Entry(u64),
}

/// Reads and checks `bytes`.
pub fn parse(bytes: &[u8]) -> Result<Image<'_>, ImageError> {
    let header = elf::FileHeader64::<LittleEndian>::parse(bytes).map_err(|_| ImageError::NotElf)?;
    let e = header.endian().map_err(|_| ImageError::NotElf)?;
    if header.e_machine(e) != elf::EM_X86_64 || header.e_type(e) != elf::ET_EXEC {
        return Err(ImageError::NotElf);
    }
    let headers = header
        .program_headers(e, bytes)
        .map_err(|_| ImageError::NotElf)?;
    let mut segments = heapless::Vec::new();
    for ph in headers.iter().filter(|ph| ph.p_type(e) == elf::PT_LOAD) {
        let address = ph.p_vaddr(e);
        let size = ph.p_memsz(e);
        let flags = ph.p_flags(e).0;
        let data = ph
            .data(e, bytes)
            .map_err(|_| ImageError::Segment(address))?;
        let segment = Segment {
            address,
            size,
            data,
            writable: flags & elf::PF_W.0 != 0,
            executable: flags & elf::PF_X.0 != 0,
        };
        let end = address
            .checked_add(size)
            .ok_or(ImageError::Segment(address))?;
        if !address.is_multiple_of(PAGE)
            || address < IMAGE_BASE
            || end > HEAP_BASE
            || data.len() as u64 > size
            || (segment.writable && segment.executable)
            || segments
                .iter()
                .any(|s: &Segment| address < s.end() && s.address < segment.end())
        {
            return Err(ImageError::Segment(address));
        }
        segments
            .push(segment)
            .map_err(|_| ImageError::TooManySegments)?;
    }
    let entry = header.e_entry(e);
    if !segments
        .iter()
        .any(|s| s.executable && (s.address..s.address + s.size).contains(&entry))
    {
        return Err(ImageError::Entry(entry));
    }
    Ok(Image { entry, segments })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 executable with the given (vaddr, memsz, file bytes, flags) segments.
    fn elf(entry: u64, segments: &[(u64, u64, &[u8], u32)]) -> Vec<u8> {
        let phoff = 64u64;
        let data_at = phoff + 56 * segments.len() as u64;
        let mut out = vec![0u8; data_at as usize];
        out[..4].copy_from_slice(b"\x7fELF");
        out[4] = 2; // 64-bit
        out[5] = 1; // little endian
        out[6] = 1;
        out[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        out[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        out[20..24].copy_from_slice(&1u32.to_le_bytes());
        out[24..32].copy_from_slice(&entry.to_le_bytes());
        out[32..40].copy_from_slice(&phoff.to_le_bytes());
        out[52..54].copy_from_slice(&64u16.to_le_bytes());
        out[54..56].copy_from_slice(&56u16.to_le_bytes());
        out[56..58].copy_from_slice(&(segments.len() as u16).to_le_bytes());
        let mut offset = data_at;
        for (i, (vaddr, memsz, data, flags)) in segments.iter().enumerate() {
            let ph = 64 + 56 * i;
            out[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes());
            out[ph + 4..ph + 8].copy_from_slice(&flags.to_le_bytes());
            out[ph + 8..ph + 16].copy_from_slice(&offset.to_le_bytes());
            out[ph + 16..ph + 24].copy_from_slice(&vaddr.to_le_bytes());
            out[ph + 24..ph + 32].copy_from_slice(&vaddr.to_le_bytes());
            out[ph + 32..ph + 40].copy_from_slice(&(data.len() as u64).to_le_bytes());
            out[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
            offset += data.len() as u64;
        }
        for (_, _, data, _) in segments {
            out.extend_from_slice(data);
        }
        out
    }

    const RX: u32 = elf::PF_R.0 | elf::PF_X.0;
    const RW: u32 = elf::PF_R.0 | elf::PF_W.0;

    #[test]
    fn a_good_image_yields_its_segments_and_entry() {
        let bytes = elf(
            IMAGE_BASE + 4,
            &[
                (IMAGE_BASE, 0x10, b"code", RX),
                (IMAGE_BASE + PAGE, 0x2000, b"data", RW),
            ],
        );
        let image = parse(&bytes).unwrap();
        assert_eq!(image.entry, IMAGE_BASE + 4);
        assert_eq!(image.segments.len(), 2);
        assert_eq!(image.segments[1].data, b"data");
        assert!(image.segments[1].writable && !image.segments[1].executable);
    }

    #[test]
    fn every_bad_segment_and_entry_is_refused() {
        let bad = |entry, segments: &[(u64, u64, &[u8], u32)]| {
            parse(&elf(entry, segments)).map(|i| i.entry)
        };
        // Outside the window, into the heap, misaligned, overlapping, W+X, file > memory.
        assert_eq!(
            bad(0x1000, &[(0x1000, 16, b"", RX)]).unwrap_err(),
            ImageError::Segment(0x1000)
        );
        assert!(bad(IMAGE_BASE, &[(HEAP_BASE - PAGE, 2 * PAGE, b"", RX)]).is_err());
        assert!(bad(IMAGE_BASE + 8, &[(IMAGE_BASE + 8, 16, b"", RX)]).is_err());
        assert!(bad(
            IMAGE_BASE,
            &[
                (IMAGE_BASE, 0x1800, b"", RX),
                (IMAGE_BASE + PAGE, 16, b"", RW)
            ]
        )
        .is_err());
        assert!(bad(IMAGE_BASE, &[(IMAGE_BASE, 16, b"", RX | elf::PF_W.0)]).is_err());
        assert!(bad(IMAGE_BASE, &[(IMAGE_BASE, 2, b"four", RX)]).is_err());
        assert!(bad(u64::MAX - 8, &[(!0xfff, 0x2000, b"", RX)]).is_err());
        // The entry in a data segment, or nowhere.
        assert_eq!(
            bad(
                IMAGE_BASE + PAGE,
                &[(IMAGE_BASE, 16, b"", RX), (IMAGE_BASE + PAGE, 16, b"", RW)]
            )
            .unwrap_err(),
            ImageError::Entry(IMAGE_BASE + PAGE)
        );
        assert_eq!(parse(b"not an elf").unwrap_err(), ImageError::NotElf);
        let mut truncated = elf(IMAGE_BASE, &[(IMAGE_BASE, 16, b"code", RX)]);
        truncated.truncate(100);
        assert!(parse(&truncated).is_err());
    }
}
