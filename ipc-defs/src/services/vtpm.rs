//! The TPM's interface: TPM 2.0 commands in their wire format, and the platform signals a
//! TPM receives from outside the command stream (power, NV availability, cancel, locality,
//! the DRTM hash sequence), as the TPM simulator protocols carry them.
//!
//! Commands are numbered by their client (`seq`, increasing per channel). The TPM records the
//! number and response of each client's last completed command in its crash checkpoint, so a
//! client whose call failed because the TPM restarted sends the same command with the same
//! number again: if it had completed, the recorded response comes back; if not, it runs
//! now. A command is never applied twice.

use core::fmt;

use serde::Deserialize;
use serde::Serialize;

/// Largest command or response (libtpms' TPM 2.0 I/O buffer).
pub const MAX_COMMAND: usize = 4096;

/// A TPM command or response in its wire format.
pub type TpmBytes = super::bytes::Bytes<MAX_COMMAND>;

/// What a client asks of the TPM.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Runs one TPM command at `locality` (0..=4).
    Command {
        seq: u64,
        locality: u8,
        command: TpmBytes,
    },
    /// A platform signal.
    Platform(Platform),
    /// A guest access to the TPM's register range (TIS at 0xFED40000..0xFED45000), from the
    /// guest partition: a read is answered with [`Response::Register`], a write with
    /// [`Response::Done`]. The TPM keeps each vCPU's last access number and answer in its
    /// checkpoint, so an access sent again after a restart is never applied twice (see
    /// [`crate::services::guest`]).
    Mmio(crate::services::guest::Access),
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
        }
    }
}
