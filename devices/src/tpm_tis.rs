//! The guest's register interface to the TPM: a TPM Interface Specification (TIS 1.3, FIFO)
//! register model for the MMIO range at 0xFED40000 (five localities of 4 KiB), as Linux's
//! `tpm_tis` driver drives it (`tpm_tis.force=1 tpm_tis.interrupts=0`).
//!
//! A pure state machine: the vtpm service feeds it the guest's reads and writes (relative to
//! the range's base) and runs the command it hands back when the guest writes `tpmGo`.
//! Whatever the guest writes, the model stays within its buffers: oversized commands are
//! cut off (and answered with a TPM size error), reads outside a register give all ones.

/// Whether a read at `offset` changes the interface (it pops the FIFO): such a read is
/// checkpointed like a write.
pub fn read_has_effect(offset: u64) -> bool {
    let reg = offset % 0x1000;
    (DATA_FIFO..DATA_FIFO + 4).contains(&reg) || (XDATA_FIFO..XDATA_FIFO + 0x40).contains(&reg)
}

/// Size of the register range: localities 0..=4, 4 KiB each.
pub const RANGE: u64 = 0x5000;
/// Base address Linux and firmware expect.
pub const BASE: u64 = 0xFED4_0000;

pub const ACCESS: u64 = 0x00;
pub const INT_ENABLE: u64 = 0x08;
pub const INT_VECTOR: u64 = 0x0C;
pub const INT_STATUS: u64 = 0x10;
pub const INTF_CAPABILITY: u64 = 0x14;
pub const STS: u64 = 0x18;
pub const DATA_FIFO: u64 = 0x24;
pub const INTERFACE_ID: u64 = 0x30;
pub const XDATA_FIFO: u64 = 0x80;
pub const DID_VID: u64 = 0xF00;
pub const RID: u64 = 0xF04;

/// TPM_ACCESS bits.
pub const ACCESS_ESTABLISHMENT: u8 = 1 << 0;
pub const ACCESS_REQUEST_USE: u8 = 1 << 1;
pub const ACCESS_PENDING_REQUEST: u8 = 1 << 2;
pub const ACCESS_SEIZE: u8 = 1 << 3;
pub const ACCESS_BEEN_SEIZED: u8 = 1 << 4;
pub const ACCESS_ACTIVE_LOCALITY: u8 = 1 << 5;
pub const ACCESS_VALID: u8 = 1 << 7;

/// TPM_STS bits (low byte, and the family/cancel bits of the top byte).
pub const STS_RESPONSE_RETRY: u32 = 1 << 1;
pub const STS_SELFTEST_DONE: u32 = 1 << 2;
pub const STS_EXPECT: u32 = 1 << 3;
pub const STS_DATA_AVAIL: u32 = 1 << 4;
pub const STS_GO: u32 = 1 << 5;
pub const STS_COMMAND_READY: u32 = 1 << 6;
pub const STS_VALID: u32 = 1 << 7;
pub const STS_COMMAND_CANCEL: u32 = 1 << 24;
pub const STS_RESET_ESTABLISHMENT: u32 = 1 << 25;
/// TPM family field (bits 26-27): 01 = TPM 2.0.
pub const STS_FAMILY_TPM2: u32 = 1 << 26;

/// Bytes the guest may move per burst.
const BURST: u32 = 64;
/// Largest command the model accepts.
const MAX_COMMAND: usize = ipc_defs::services::vtpm::MAX_COMMAND;
/// Vendor 0x1014 (the id QEMU's and swtpm's TIS report), device 1.
const DID_VID_VALUE: u32 = 0x0001_1014;
/// TPM_INTF_CAPABILITY: data transfer sizes 1..=64 bytes (bits 9-10 = 11), burst count
/// static (bit 8), interface version TIS 1.3 for TPM 2.0 (bits 28-30 = 011), and no
/// interrupts offered.
const INTF_CAPABILITY_VALUE: u32 = (0b011 << 28) | (0b11 << 9) | (1 << 8);
/// TPM_INTERFACE_ID (PTP): interface type 0 (FIFO for TPM 2.0), version 0; all five
/// localities (bit 8), transfers up to 64 bytes (bits 9-10), FIFO interface (bit 13),
/// FIFO selected (bits 17-18 = 0).
const INTERFACE_ID_VALUE: u32 = (1 << 8) | (0b11 << 9) | (1 << 13);

/// Where the interface is in the command cycle.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Phase {
    /// After reset: neither ready nor holding anything.
    Idle,
    /// commandReady set: the FIFO takes a command.
    Ready,
    /// Bytes of a command are arriving.
    Reception(Vec<u8>),
    /// `tpmGo` was written: the command runs (numbered `seq` once the TPM numbers it).
    Execution {
        locality: u8,
        command: Vec<u8>,
        seq: Option<u64>,
    },
    /// The response is in the FIFO.
    Completion { response: Vec<u8>, read: usize },
}

/// The TIS register model. Its state is part of the TPM's checkpoint, so that a guest
/// command survives a restart of the service: one in execution is finished (or answered
/// from the record) by the restarted TPM, a response not yet read is still there.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tis {
    active: Option<u8>,
    pending: [bool; 5],
    seized: [bool; 5],
    phase: Phase,
    int_enable: u32,
    int_vector: u8,
    established: bool,
}

impl Default for Tis {
    fn default() -> Self {
        Tis {
            active: None,
            pending: [false; 5],
            seized: [false; 5],
            phase: Phase::Idle,
            int_enable: 0,
            int_vector: 0,
            established: false,
        }
    }
}

/// What a write asks of the TPM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    None,
    /// Run this command at this locality; hand the response to [`Tis::complete`].
    Execute {
        locality: u8,
        command: Vec<u8>,
    },
    /// Cancel the running command.
    Cancel,
    /// Reset the TPM's established flag (from locality 3 or 4 only).
    ResetEstablished {
        locality: u8,
    },
}

fn expected_len(buf: &[u8]) -> Option<usize> {
    (buf.len() >= 6).then(|| u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize)
}

impl Tis {
    pub fn new() -> Tis {
        Tis::default()
    }

    /// Sets the established flag the ACCESS register reports (from the engine).
    pub fn set_established(&mut self, established: bool) {
        self.established = established;
    }

    fn split(offset: u64) -> Option<(u8, u64)> {
        if offset >= RANGE {
            return None;
        }
        Some(((offset / 0x1000) as u8, offset % 0x1000))
    }

    fn sts(&self) -> u32 {
        let mut v = STS_VALID | STS_FAMILY_TPM2 | STS_SELFTEST_DONE;
        let burst = match &self.phase {
            Phase::Idle | Phase::Execution { .. } => 0,
            Phase::Ready => {
                v |= STS_COMMAND_READY;
                BURST
            }
            Phase::Reception(buf) => {
                if expected_len(buf).is_none_or(|n| buf.len() < n.min(MAX_COMMAND)) {
                    v |= STS_EXPECT;
                }
                BURST
            }
            Phase::Completion { response, read } => {
                let left = response.len().saturating_sub(*read) as u32;
                if left > 0 {
                    v |= STS_DATA_AVAIL;
                }
                left.min(BURST)
            }
        };
        v | (burst << 8)
    }

    /// A guest read of `size` bytes (1, 2 or 4) at `offset` from the range's base.
    pub fn read(&mut self, offset: u64, size: u8) -> u64 {
        let ones = if size >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * u32::from(size))) - 1
        };
        let Some((locality, reg)) = Tis::split(offset) else {
            return ones;
        };
        let active = self.active == Some(locality);
        let value: u64 = match reg {
            ACCESS => {
                let mut a = ACCESS_VALID;
                if active {
                    a |= ACCESS_ACTIVE_LOCALITY;
                }
                if self
                    .pending
                    .iter()
                    .enumerate()
                    .any(|(l, p)| *p && l as u8 != locality)
                {
                    a |= ACCESS_PENDING_REQUEST;
                }
                if self.seized[locality as usize] {
                    a |= ACCESS_BEEN_SEIZED;
                }
                if !self.established {
                    a |= ACCESS_ESTABLISHMENT;
                }
                u64::from(a)
            }
            // Registers of a locality that does not hold the TPM read as all ones.
            _ if !active
                && reg != INTF_CAPABILITY
                && reg != DID_VID
                && reg != RID
                && reg != INTERFACE_ID =>
            {
                ones
            }
            INT_ENABLE => u64::from(self.int_enable),
            INT_VECTOR => u64::from(self.int_vector),
            INT_STATUS => 0,
            INTF_CAPABILITY => u64::from(INTF_CAPABILITY_VALUE),
            INTERFACE_ID => u64::from(INTERFACE_ID_VALUE),
            DID_VID => u64::from(DID_VID_VALUE),
            RID => 1,
            r if (STS..STS + 4).contains(&r) => u64::from(self.sts() >> (8 * (r - STS))),
            r if (DATA_FIFO..DATA_FIFO + 4).contains(&r)
                || (XDATA_FIFO..XDATA_FIFO + 0x40).contains(&r) =>
            {
                let mut v = 0u64;
                for i in 0..u64::from(size.min(8)) {
                    v |= u64::from(self.fifo_read()) << (8 * i);
                }
                return v;
            }
            _ => ones,
        };
        value & ones
    }

    fn fifo_read(&mut self) -> u8 {
        match &mut self.phase {
            Phase::Completion { response, read } if *read < response.len() => {
                let b = response[*read];
                *read += 1;
                b
            }
            _ => 0xFF,
        }
    }

    /// A guest write; returns what the TPM must do.
    pub fn write(&mut self, offset: u64, size: u8, value: u64) -> Effect {
        let Some((locality, reg)) = Tis::split(offset) else {
            return Effect::None;
        };
        if reg == ACCESS {
            return self.write_access(locality, value as u8);
        }
        if self.active != Some(locality) {
            return Effect::None;
        }
        match reg {
            INT_ENABLE => self.int_enable = value as u32,
            INT_VECTOR => self.int_vector = value as u8,
            r if (STS..STS + 4).contains(&r) => {
                return self.write_sts(locality, (value as u32) << (8 * (r - STS)));
            }
            r if (DATA_FIFO..DATA_FIFO + 4).contains(&r)
                || (XDATA_FIFO..XDATA_FIFO + 0x40).contains(&r) =>
            {
                for i in 0..u64::from(size.min(8)) {
                    self.fifo_write((value >> (8 * i)) as u8);
                }
            }
            _ => {}
        }
        Effect::None
    }

    fn write_access(&mut self, locality: u8, bits: u8) -> Effect {
        let l = locality as usize;
        if bits & ACCESS_ACTIVE_LOCALITY != 0 && self.active == Some(locality) {
            // Relinquish: the next pending locality (highest first) gets the TPM.
            self.active = None;
            self.phase = Phase::Idle;
            if let Some(next) = (0..5).rev().find(|&n| self.pending[n]) {
                self.pending[next] = false;
                self.active = Some(next as u8);
            }
        } else if bits & ACCESS_SEIZE != 0 && self.active.is_none_or(|a| a < locality) {
            if let Some(old) = self.active {
                self.seized[old as usize] = true;
            }
            self.active = Some(locality);
            self.phase = Phase::Idle;
        } else if bits & ACCESS_REQUEST_USE != 0 {
            if self.active.is_none() {
                self.active = Some(locality);
                self.seized[l] = false;
            } else if self.active != Some(locality) {
                self.pending[l] = true;
            }
        }
        Effect::None
    }

    fn write_sts(&mut self, locality: u8, bits: u32) -> Effect {
        if bits & STS_COMMAND_CANCEL != 0 {
            return Effect::Cancel;
        }
        if bits & STS_RESET_ESTABLISHMENT != 0 && locality >= 3 {
            return Effect::ResetEstablished { locality };
        }
        if bits & STS_COMMAND_READY != 0 {
            self.phase = Phase::Ready;
        } else if bits & STS_GO != 0 {
            if let Phase::Reception(buf) = &self.phase {
                let command = buf.clone();
                // Executing: the response replaces it (see `complete`).
                self.phase = Phase::Execution {
                    locality,
                    command: command.clone(),
                    seq: None,
                };
                return Effect::Execute { locality, command };
            }
        } else if bits & STS_RESPONSE_RETRY != 0 {
            if let Phase::Completion { read, .. } = &mut self.phase {
                *read = 0;
            }
        }
        Effect::None
    }

    fn fifo_write(&mut self, byte: u8) {
        match &mut self.phase {
            Phase::Ready => self.phase = Phase::Reception(vec![byte]),
            Phase::Reception(buf) if buf.len() < MAX_COMMAND => buf.push(byte),
            // Beyond the buffer, or outside reception: dropped (the size check fails later).
            _ => {}
        }
    }

    /// The response of the command [`Effect::Execute`] asked for.
    pub fn complete(&mut self, response: Vec<u8>) {
        self.phase = Phase::Completion { response, read: 0 };
    }

    /// Records the number the TPM gives the command in execution.
    pub fn number(&mut self, n: u64) {
        if let Phase::Execution { seq, .. } = &mut self.phase {
            *seq = Some(n);
        }
    }

    /// The command in execution, if the state was saved while one ran: (locality, command,
    /// its number if it had been given one).
    pub fn in_execution(&self) -> Option<(u8, Vec<u8>, Option<u64>)> {
        match &self.phase {
            Phase::Execution {
                locality,
                command,
                seq,
            } => Some((*locality, command.clone(), *seq)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The access pattern of Linux's tpm_tis_core for one command at locality 0, with an
    /// engine stub; returns the response read back.
    fn linux_transmit(tis: &mut Tis, command: &[u8], engine: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
        // request_locality
        tis.write(ACCESS, 1, u64::from(ACCESS_REQUEST_USE));
        let access = tis.read(ACCESS, 1) as u8;
        assert_eq!(
            access & (ACCESS_ACTIVE_LOCALITY | ACCESS_VALID),
            ACCESS_ACTIVE_LOCALITY | ACCESS_VALID
        );
        // tpm_tis_send_data: commandReady, then burst writes with expect checks.
        assert_eq!(
            tis.read(STS, 1) as u32 & STS_COMMAND_READY,
            0,
            "idle after locality grant"
        );
        tis.write(STS, 1, u64::from(STS_COMMAND_READY));
        assert_ne!(tis.read(STS, 1) as u32 & STS_COMMAND_READY, 0);
        let mut sent = 0;
        while sent < command.len() - 1 {
            let burst = ((tis.read(STS, 4) >> 8) & 0xffff) as usize;
            assert!(burst > 0);
            let n = burst.min(command.len() - 1 - sent);
            for b in &command[sent..sent + n] {
                tis.write(DATA_FIFO, 1, u64::from(*b));
            }
            sent += n;
            let sts = tis.read(STS, 1) as u32;
            assert_eq!(
                sts & (STS_VALID | STS_EXPECT),
                STS_VALID | STS_EXPECT,
                "expect while bytes are missing"
            );
        }
        tis.write(DATA_FIFO, 1, u64::from(command[command.len() - 1]));
        assert_eq!(
            tis.read(STS, 1) as u32 & STS_EXPECT,
            0,
            "expect clear after the last byte"
        );
        // go
        match tis.write(STS, 1, u64::from(STS_GO)) {
            Effect::Execute {
                locality: 0,
                command: c,
            } => tis.complete(engine(&c)),
            other => panic!("go gave {other:?}"),
        }
        // wait_for_tpm_stat(dataAvail | stsValid), then burst reads: header first.
        assert_eq!(
            tis.read(STS, 1) as u32 & (STS_DATA_AVAIL | STS_VALID),
            STS_DATA_AVAIL | STS_VALID
        );
        let mut response = Vec::new();
        while response.len() < 10 {
            response.push(tis.read(DATA_FIFO, 1) as u8);
        }
        let size = u32::from_be_bytes(response[2..6].try_into().unwrap()) as usize;
        while response.len() < size {
            let burst = ((tis.read(STS, 4) >> 8) & 0xffff) as usize;
            let n = burst.min(size - response.len()).min(4);
            let v = tis.read(DATA_FIFO, n as u8);
            for i in 0..n {
                response.push((v >> (8 * i)) as u8);
            }
        }
        assert_eq!(tis.read(STS, 1) as u32 & STS_DATA_AVAIL, 0, "no data left");
        // ready for the next command, then relinquish the locality.
        tis.write(STS, 1, u64::from(STS_COMMAND_READY));
        tis.write(ACCESS, 1, u64::from(ACCESS_ACTIVE_LOCALITY));
        assert_eq!(tis.read(ACCESS, 1) as u8 & ACCESS_ACTIVE_LOCALITY, 0);
        response
    }

    #[test]
    fn linux_tpm_tis_core_sequence_round_trips_a_command() {
        let mut tis = Tis::new();
        assert_eq!(tis.read(DID_VID, 4), 0x0001_1014);
        let startup = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x44, 0, 0];
        let echo = |c: &[u8]| {
            let mut r = vec![0x80, 1, 0, 0, 0, 0x1e, 0, 0, 0, 0];
            r.extend_from_slice(&c[..20.min(c.len())]);
            r.resize(0x1e, 0xab);
            r
        };
        let r = linux_transmit(&mut tis, &startup, echo);
        assert_eq!(r.len(), 0x1e);
        assert_eq!(&r[10..22], &startup);
        // A long command over several bursts.
        let mut long = vec![0x80, 1, 0, 0, 0, 200, 0, 0, 1, 0x7e];
        long.resize(200, 7);
        let r = linux_transmit(&mut tis, &long, echo);
        assert_eq!(&r[10..30], &long[..20]);
    }

    #[test]
    fn other_localities_are_locked_out_until_relinquished() {
        let mut tis = Tis::new();
        tis.write(0x1000 + ACCESS, 1, u64::from(ACCESS_REQUEST_USE));
        assert_eq!(
            tis.read(0x1000 + ACCESS, 1) as u8 & ACCESS_ACTIVE_LOCALITY,
            ACCESS_ACTIVE_LOCALITY
        );
        // Locality 0 asks: pending; its STS reads as all ones, its writes do nothing.
        tis.write(ACCESS, 1, u64::from(ACCESS_REQUEST_USE));
        assert_eq!(tis.read(ACCESS, 1) as u8 & ACCESS_ACTIVE_LOCALITY, 0);
        assert_eq!(
            tis.read(0x1000 + ACCESS, 1) as u8 & ACCESS_PENDING_REQUEST,
            ACCESS_PENDING_REQUEST
        );
        assert_eq!(tis.read(STS, 4), 0xffff_ffff);
        assert_eq!(
            tis.write(STS, 1, u64::from(STS_COMMAND_READY)),
            Effect::None
        );
        // Locality 1 relinquishes: 0 gets it.
        tis.write(0x1000 + ACCESS, 1, u64::from(ACCESS_ACTIVE_LOCALITY));
        assert_eq!(
            tis.read(ACCESS, 1) as u8 & ACCESS_ACTIVE_LOCALITY,
            ACCESS_ACTIVE_LOCALITY
        );
    }

    #[test]
    fn hostile_register_traffic_stays_in_bounds() {
        let mut tis = Tis::new();
        tis.write(ACCESS, 1, u64::from(ACCESS_REQUEST_USE));
        tis.write(STS, 1, u64::from(STS_COMMAND_READY));
        // 10000 bytes into the FIFO: capped at the TPM's buffer.
        for i in 0..10_000u32 {
            tis.write(DATA_FIFO, 4, u64::from(i));
        }
        match tis.write(STS, 1, u64::from(STS_GO)) {
            Effect::Execute { command, .. } => assert!(command.len() <= MAX_COMMAND),
            other => panic!("{other:?}"),
        }
        // Reads past the response, outside the range, of unknown registers: all ones.
        tis.complete(vec![0x80, 1, 0, 0, 0, 10, 0, 0, 1, 0x42]);
        for _ in 0..20 {
            tis.read(DATA_FIFO, 1);
        }
        assert_eq!(tis.read(DATA_FIFO, 1), 0xff);
        assert_eq!(tis.read(RANGE + 4, 4), 0xffff_ffff);
        assert_eq!(tis.read(0x0ABC, 2), 0xffff);
        assert_eq!(tis.write(RANGE, 4, 0), Effect::None);
    }
}
