//! A checkpoint a service keeps in a region the microkernel holds across its restarts (the
//! vTPM's volatile state, a storage controller's registers and queues): two slots, each with
//! a generation and a CRC, written alternately, so that a crash in the middle of writing one
//! leaves the previous checkpoint in force.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes of a slot header: magic, generation, length, CRC.
pub const SLOT_HEADER: usize = 24;
/// `"PVCK"`.
const SLOT_MAGIC: u32 = 0x4b43_5650;

/// A memory a checkpoint can live in (the region capability, or memory in tests).
pub trait CheckpointMemory {
    fn size(&self) -> usize;
    fn read(&self, offset: usize, buf: &mut [u8]) -> bool;
    fn write(&self, offset: usize, data: &[u8]) -> bool;
}

impl CheckpointMemory for super::SharedMemory {
    fn size(&self) -> usize {
        super::SharedMemory::len(self)
    }
    fn read(&self, offset: usize, buf: &mut [u8]) -> bool {
        super::SharedMemory::read(self, offset, buf).is_ok()
    }
    fn write(&self, offset: usize, data: &[u8]) -> bool {
        super::SharedMemory::write(self, offset, data).is_ok()
    }
}

/// A checkpoint memory in the process (tests, fuzzing): shared, so a "restarted" TPM can be
/// given the same memory.
#[derive(Clone)]
pub struct MemRegion(pub std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl MemRegion {
    pub fn new(size: usize) -> MemRegion {
        MemRegion(std::rc::Rc::new(std::cell::RefCell::new(vec![0; size])))
    }
}

impl CheckpointMemory for MemRegion {
    fn size(&self) -> usize {
        self.0.borrow().len()
    }
    fn read(&self, offset: usize, buf: &mut [u8]) -> bool {
        let m = self.0.borrow();
        let Some(s) = m.get(offset..offset + buf.len()) else {
            return false;
        };
        buf.copy_from_slice(s);
        true
    }
    fn write(&self, offset: usize, data: &[u8]) -> bool {
        let mut m = self.0.borrow_mut();
        let Some(s) = m.get_mut(offset..offset + data.len()) else {
            return false;
        };
        s.copy_from_slice(data);
        true
    }
}

/// The two-slot checkpoint area.
pub struct CheckpointArea<M: CheckpointMemory> {
    memory: M,
    generation: u64,
}

impl<M: CheckpointMemory> CheckpointArea<M> {
    pub fn new(memory: M) -> Self {
        CheckpointArea {
            memory,
            generation: 0,
        }
    }

    fn slot_size(&self) -> usize {
        self.memory.size() / 2
    }

    fn read_slot<T: DeserializeOwned>(&self, slot: usize) -> Option<(u64, T)> {
        let base = slot * self.slot_size();
        let mut header = [0u8; SLOT_HEADER];
        if !self.memory.read(base, &mut header) {
            return None;
        }
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4"));
        if word(0) != SLOT_MAGIC {
            return None;
        }
        let generation = u64::from_le_bytes(header[8..16].try_into().expect("8"));
        let len = word(16) as usize;
        if len > self.slot_size().saturating_sub(SLOT_HEADER) {
            return None;
        }
        let mut body = vec![0u8; len];
        if !self.memory.read(base + SLOT_HEADER, &mut body) || crc32fast::hash(&body) != word(20) {
            return None;
        }
        postcard::from_bytes(&body).ok().map(|c| (generation, c))
    }

    /// The newest intact checkpoint, if any.
    pub fn load<T: DeserializeOwned>(&mut self) -> Option<T> {
        let newest = [0, 1]
            .into_iter()
            .filter_map(|s| self.read_slot(s))
            .max_by_key(|(g, _)| *g)?;
        self.generation = newest.0;
        Some(newest.1)
    }

    /// Writes a checkpoint into the slot the newest one is not in.
    pub fn store<T: Serialize>(&mut self, checkpoint: &T) -> Result<(), String> {
        let body = postcard::to_allocvec(checkpoint).map_err(|e| e.to_string())?;
        if body.len() > self.slot_size().saturating_sub(SLOT_HEADER) {
            return Err(format!(
                "checkpoint of {} bytes does not fit a {}-byte slot",
                body.len(),
                self.slot_size()
            ));
        }
        let generation = self.generation + 1;
        let slot = (generation % 2) as usize;
        let base = slot * self.slot_size();
        let mut header = [0u8; SLOT_HEADER];
        header[0..4].copy_from_slice(&SLOT_MAGIC.to_le_bytes());
        header[8..16].copy_from_slice(&generation.to_le_bytes());
        header[16..20].copy_from_slice(&(body.len() as u32).to_le_bytes());
        header[20..24].copy_from_slice(&crc32fast::hash(&body).to_le_bytes());
        // Invalidate, write the body, then the header: a crash leaves this slot invalid and
        // the other one (the previous checkpoint) in force.
        if !self.memory.write(base, &[0u8; 4])
            || !self.memory.write(base + SLOT_HEADER, &body)
            || !self.memory.write(base, &header)
        {
            return Err("checkpoint region write failed".into());
        }
        self.generation = generation;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_intact_slot_wins_and_a_torn_one_is_ignored() {
        let mem = MemRegion::new(4096);
        let mut area = CheckpointArea::new(mem.clone());
        assert_eq!(area.load::<u64>(), None);
        area.store(&7u64).unwrap();
        area.store(&8u64).unwrap();
        assert_eq!(CheckpointArea::new(mem.clone()).load::<u64>(), Some(8));
        // Tear the newest slot (generation 2 lives in slot 0): the older one is in force.
        mem.0.borrow_mut()[SLOT_HEADER] ^= 0xff;
        let mut again = CheckpointArea::new(mem.clone());
        assert_eq!(again.load::<u64>(), Some(7));
        // Writing on goes to the slot after the one in force.
        again.store(&9u64).unwrap();
        assert_eq!(CheckpointArea::new(mem).load::<u64>(), Some(9));
        let mut small = CheckpointArea::new(MemRegion::new(64));
        assert!(small.store(&vec![0u8; 100]).is_err());
    }
}
