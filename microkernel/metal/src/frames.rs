//! Physical memory: a bitmap of 4 KiB frames below [`LIMIT`] (the kernel identity-maps RAM
//! up to there, and the tasks' window starts there).

use ipc_defs::metal::PAGE;

/// Frames are managed below this address (1 GiB: the start of the tasks' window).
pub const LIMIT: u64 = ipc_defs::metal::IMAGE_BASE;
const FRAMES: usize = (LIMIT / PAGE) as usize;
const WORDS: usize = FRAMES / 64;

/// Why a frame operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Not page aligned, or at or past [`LIMIT`].
    Address(u64),
    /// Freed while it was free.
    DoubleFree(u64),
}

/// Which frames are free (a set bit: free).
pub struct Frames {
    free: [u64; WORDS],
    count: usize,
}

impl Default for Frames {
    fn default() -> Frames {
        Frames::new()
    }
}

impl Frames {
    /// No frame free.
    pub const fn new() -> Frames {
        Frames {
            free: [0; WORDS],
            count: 0,
        }
    }

    /// Marks the whole frames inside `start..end` free (the part below [`LIMIT`]).
    pub fn add(&mut self, start: u64, end: u64) {
        let first = start.div_ceil(PAGE);
        let last = end.min(LIMIT) / PAGE;
        for frame in first..last {
            self.set(frame as usize, true);
        }
    }

    /// Marks every frame touching `start..end` used (the kernel image, firmware tables).
    pub fn reserve(&mut self, start: u64, end: u64) {
        let first = start / PAGE;
        let last = end.min(LIMIT).div_ceil(PAGE);
        for frame in first..last {
            self.set(frame as usize, false);
        }
    }

    fn set(&mut self, frame: usize, free: bool) {
        let (word, bit) = (frame / 64, 1u64 << (frame % 64));
        let was = self.free[word] & bit != 0;
        if free && !was {
            self.free[word] |= bit;
            self.count += 1;
        } else if !free && was {
            self.free[word] &= !bit;
            self.count -= 1;
        }
    }

    /// Free frames.
    pub fn count(&self) -> usize {
        self.count
    }

    /// One free frame's address (lowest first).
    pub fn alloc(&mut self) -> Option<u64> {
        let word = self.free.iter().position(|w| *w != 0)?;
        let frame = word * 64 + self.free[word].trailing_zeros() as usize;
        self.set(frame, false);
        Some(frame as u64 * PAGE)
    }

    /// `n` physically contiguous free frames (the start address). Whole words are skipped
    /// or counted at once: ring-0 code is slow to run where it is emulated.
    pub fn alloc_contiguous(&mut self, n: usize) -> Option<u64> {
        if n == 0 {
            return None;
        }
        let mut run = 0;
        let mut frame = 0;
        while frame < FRAMES {
            let word = self.free[frame / 64];
            if frame % 64 == 0 && word == 0 {
                run = 0;
                frame += 64;
                continue;
            }
            if frame % 64 == 0 && word == u64::MAX && run + 64 < n {
                run += 64;
                frame += 64;
                continue;
            }
            if word & (1 << (frame % 64)) != 0 {
                run += 1;
                if run == n {
                    let first = frame + 1 - n;
                    for f in first..=frame {
                        self.set(f, false);
                    }
                    return Some(first as u64 * PAGE);
                }
            } else {
                run = 0;
            }
            frame += 1;
        }
        None
    }

    /// Gives a frame back.
    pub fn free(&mut self, address: u64) -> Result<(), FrameError> {
        if !address.is_multiple_of(PAGE) || address >= LIMIT {
            return Err(FrameError::Address(address));
        }
        let frame = (address / PAGE) as usize;
        if self.free[frame / 64] & (1 << (frame % 64)) != 0 {
            return Err(FrameError::DoubleFree(address));
        }
        self.set(frame, true);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_come_from_what_was_added_and_not_reserved() {
        let mut f = Box::new(Frames::new());
        assert_eq!(f.alloc(), None);
        f.add(0x1800, 0x6000); // frames 2..6 (0x1000 is partial)
        f.reserve(0x3000, 0x3001); // frame 3
        assert_eq!(f.count(), 3);
        assert_eq!(f.alloc(), Some(0x2000));
        assert_eq!(f.alloc(), Some(0x4000));
        assert_eq!(f.alloc(), Some(0x5000));
        assert_eq!(f.alloc(), None);
        f.free(0x4000).unwrap();
        assert_eq!(f.free(0x4000), Err(FrameError::DoubleFree(0x4000)));
        assert_eq!(f.free(0x4001), Err(FrameError::Address(0x4001)));
        assert_eq!(f.free(LIMIT), Err(FrameError::Address(LIMIT)));
        assert_eq!(f.alloc(), Some(0x4000));
    }

    #[test]
    fn contiguous_runs_skip_holes_and_nothing_passes_the_limit() {
        let mut f = Box::new(Frames::new());
        f.add(0, 0x10000);
        f.reserve(0x2000, 0x3000);
        assert_eq!(f.alloc_contiguous(3), Some(0x3000));
        assert_eq!(f.alloc_contiguous(2), Some(0x0));
        assert_eq!(f.alloc_contiguous(100), None);
        assert_eq!(f.count(), 16 - 1 - 3 - 2);
        let mut g = Box::new(Frames::new());
        g.add(LIMIT - 0x2000, LIMIT + 0x10000);
        assert_eq!(g.count(), 2);
        // Runs across whole free words.
        let mut h = Box::new(Frames::new());
        h.add(0x1000, 0x20_0000);
        assert_eq!(h.alloc_contiguous(300), Some(0x1000));
        assert_eq!(h.alloc_contiguous(211), Some(0x1000 + 300 * PAGE));
        assert_eq!(h.alloc_contiguous(1), None);
    }
}
