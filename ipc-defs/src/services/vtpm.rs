//! The TPM's interface: TPM 2.0 commands in their wire format, and the platform signals a
//! TPM receives from outside the command stream (power, NV availability, cancel, locality,
//! the DRTM hash sequence), as the TPM simulator protocols carry them.
//!
//! Commands are numbered by their client (`seq`, increasing per channel). The TPM records the
//! number and response of each client's last completed command in its crash checkpoint, so a
//! client whose call failed because the TPM restarted sends the same command with the same
//! number again: if it had completed, the recorded response comes back; if not, it runs
//! now. A command is never applied twice.
//!
//! Who may ask what is the channel's grant ([`VtpmGrant`], from the bootstrap record), never
//! the message: TPM commands at the localities granted, platform signals, and the guest's
//! register interface, which only the guest partition's channel holds, for its own vCPUs.

use core::fmt;

use serde::Deserialize;
use serde::Serialize;

/// Largest command or response (libtpms' TPM 2.0 I/O buffer).
pub const MAX_COMMAND: usize = 4096;

/// A TPM command or response in its wire format.
pub type TpmBytes = super::bytes::Bytes<MAX_COMMAND>;

/// Localities 0..=4.
pub const LOCALITIES: u8 = 5;

/// A set of TPM localities (bit n = locality n).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Localities(u8);

impl Localities {
    pub const NONE: Localities = Localities(0);
    /// Locality 0 only: what a front end gets unless the manifest grants more.
    pub const ZERO: Localities = Localities(1);
    pub const ALL: Localities = Localities((1 << LOCALITIES) - 1);

    /// Adds `locality`; false if it does not exist (above 4).
    pub fn insert(&mut self, locality: u8) -> bool {
        if locality >= LOCALITIES {
            return false;
        }
        self.0 |= 1 << locality;
        true
    }

    pub const fn with(self, locality: u8) -> Localities {
        if locality >= LOCALITIES {
            self
        } else {
            Localities(self.0 | 1 << locality)
        }
    }

    pub fn contains(self, locality: u8) -> bool {
        locality < LOCALITIES && self.0 & (1 << locality) != 0
    }

    pub fn union(self, other: Localities) -> Localities {
        Localities(self.0 | other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = u8> {
        (0..LOCALITIES).filter(move |l| self.contains(*l))
    }
}

impl fmt::Display for Localities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, l) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{l}")?;
        }
        f.write_str("]")
    }
}

/// What one client of the TPM may do: its channel's grant, put in the TPM's bootstrap record
/// by the microkernel (from the client's `calls = [{ endpoint = "vtpm", tpm = [...] }]`, or,
/// for the guest partition's channel, from the partition itself). Everything not granted is
/// refused with [`VtpmError::NotGranted`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VtpmGrant {
    /// [`Request::Command`] at these localities (none: no commands).
    pub commands: Localities,
    /// [`Request::Platform`] signals (power, NV, cancel, the established flag).
    pub platform: bool,
    /// [`Request::Mmio`]: the guest partition's register interface, for vCPUs
    /// `0..registers` (0: no register access). Only the partition's channel has it.
    pub registers: u32,
}

impl VtpmGrant {
    /// Nothing beyond the endpoint's ping.
    pub const NONE: VtpmGrant = VtpmGrant {
        commands: Localities::NONE,
        platform: false,
        registers: 0,
    };

    pub fn is_none(&self) -> bool {
        *self == VtpmGrant::NONE
    }
}

impl fmt::Display for VtpmGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_none() {
            return f.write_str("nothing beyond ping");
        }
        let mut sep = "";
        if !self.commands.is_empty() {
            write!(f, "TPM commands at localities {}", self.commands)?;
            sep = ", ";
        }
        if self.platform {
            write!(f, "{sep}platform signals")?;
            sep = ", ";
        }
        if self.registers > 0 {
            write!(
                f,
                "{sep}the register interface for vCPUs 0..{}",
                self.registers
            )?;
        }
        Ok(())
    }
}

/// What a grant can lack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Right {
    /// TPM commands at all.
    Commands,
    /// TPM commands at this locality.
    Locality(u8),
    /// Platform signals.
    Platform,
    /// The guest's register interface.
    Registers,
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Right::Commands => f.write_str("TPM commands"),
            Right::Locality(l) => write!(f, "TPM commands at locality {l}"),
            Right::Platform => f.write_str("platform signals"),
            Right::Registers => f.write_str("the guest's register interface"),
        }
    }
}

/// The latest moment at which the TPM may take a request off its ring and still carry it
/// out, in nanoseconds of `CLOCK_MONOTONIC` (one clock for every process of the machine).
/// A request taken later is answered [`VtpmError::Expired`] and not carried out, so a client
/// that finds its request still in the ring after that moment knows it never will be: it can
/// tell its own client "not started, retry" (TPM_RC_RETRY) truthfully, even while the TPM is
/// stopped (SIGSTOP) rather than dead.
pub type StartBy = Option<u64>;

/// What a client asks of the TPM.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Runs one TPM command at `locality` (0..=4), unless taken after `start_by`.
    Command {
        seq: u64,
        locality: u8,
        command: TpmBytes,
        start_by: StartBy,
    },
    /// A platform signal, unless taken after `start_by`.
    Platform { signal: Platform, start_by: StartBy },
    /// A guest access to the TPM's register range (TIS at 0xFED40000..0xFED45000), from the
    /// guest partition: a read is answered with [`Response::Register`], a write with
    /// [`Response::Done`]. The TPM keeps each vCPU's last access number and answer in its
    /// checkpoint, so an access sent again after a restart is never applied twice (see
    /// [`crate::services::guest`]).
    Mmio(crate::services::guest::Access),
}

impl Request {
    /// A platform signal without a deadline.
    pub const fn platform(signal: Platform) -> Request {
        Request::Platform {
            signal,
            start_by: None,
        }
    }

    /// Its deadline to start, if it has one (checked by the serving process, which reads the
    /// clock, when it takes the request off its ring).
    pub fn start_by(&self) -> StartBy {
        match self {
            Request::Command { start_by, .. } | Request::Platform { start_by, .. } => *start_by,
            Request::Mmio(_) => None,
        }
    }
}

/// Signals from the platform, as the simulator protocols name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Platform {
    /// Power on (a no-op if already on, as on the reference simulator).
    PowerOn,
    /// Power off: volatile state is lost, as at a real power cut.
    PowerOff,
    /// Power cycle: off, then on.
    Reset,
    /// The NV memory becomes available / unavailable.
    NvOn,
    NvOff,
    /// The cancel line, for long-running commands.
    CancelOn,
    CancelOff,
    /// The TPM's "established" flag (set by the DRTM sequence), and its reset, which the
    /// TPM allows from locality 3 or 4 only.
    GetEstablished,
    ResetEstablished {
        locality: u8,
    },
}

/// What the TPM answers.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// The TPM's response to a command (a TPM error code is a response too).
    Tpm(TpmBytes),
    /// The signal was applied.
    Done,
    /// Answer to [`Platform::GetEstablished`].
    Established(bool),
    /// The value a register read returns.
    Register(u64),
    Error(VtpmError),
}

/// Why a request could not be carried out (TPM-level errors are TPM responses instead).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VtpmError {
    /// The TPM is powered off; send PowerOn first.
    PoweredOff,
    /// Localities are 0..=4.
    BadLocality(u8),
    /// The command is shorter than a TPM header or its size field disagrees with its length.
    MalformedCommand,
    /// A command number lower than the client's last one.
    StaleSequence { last: u64 },
    /// The engine failed (libtpms result code); the TPM may need a power cycle.
    Engine(u32),
    /// The TPM's permanent state could not be stored; the command's effect is not durable.
    Storage,
    /// The caller's grant does not include this (see [`VtpmGrant`]).
    NotGranted(Right),
    /// A register access from a vCPU the partition does not have (ids are `0..vcpus`).
    NoSuchVcpu { vcpu: u32, vcpus: u32 },
    /// A platform signal that would change the TPM under the guest partition, which uses it
    /// (power, NV, cancel, the established flag): refused while the partition has the TPM.
    GuestUsesTpm,
    /// Taken off the ring after its [`StartBy`] moment: not carried out.
    Expired,
}

impl fmt::Display for VtpmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VtpmError::PoweredOff => f.write_str("the TPM is powered off"),
            VtpmError::BadLocality(l) => write!(f, "locality {l} does not exist"),
            VtpmError::MalformedCommand => f.write_str("malformed TPM command"),
            VtpmError::StaleSequence { last } => {
                write!(f, "command number below the last one ({last})")
            }
            VtpmError::Engine(rc) => write!(f, "TPM engine failure {rc:#x}"),
            VtpmError::Storage => f.write_str("TPM state could not be stored"),
            VtpmError::NotGranted(r) => {
                write!(f, "{r} not granted to this caller by the manifest")
            }
            VtpmError::NoSuchVcpu { vcpu, vcpus } => write!(
                f,
                "register access from vCPU {vcpu}, but the partition has vCPUs 0..{vcpus}"
            ),
            VtpmError::GuestUsesTpm => f.write_str(
                "the guest partition uses this TPM: platform signals (power, NV, cancel, \
                 established flag) are refused while it does",
            ),
            VtpmError::Expired => f.write_str("taken after its deadline to start: not carried out"),
        }
    }
}
