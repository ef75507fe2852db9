//! The two one-register platform devices: the i8042 keyboard controller's reset line and the
//! debug-exit port.
//!
//! The i8042 is modelled only as far as a guest needs it to reset the machine: writing
//! command 0xFE ("pulse output line 0", wired to the CPU's reset on every PC) to port 0x64
//! resets; status reads say "no data, input buffer empty" (0), so a guest polling before it
//! writes a command never waits; data reads give 0; every other write is accepted and
//! ignored. There is no keyboard or mouse behind it: a driver's self-test gets no answer and
//! gives up.
//!
//! The debug-exit port ([`DEBUG_EXIT_PORT`]) ends the run: a write of any size ends it with
//! the low byte of the value as `paravisor run`'s exit status (0 = pass). Reads return
//! all-ones, as from an unclaimed port. Tests should use statuses below
//! [`crate::HALTED_FOREVER`]: the statuses from 0x7c up also name how a run ended without one.

use ipc_defs::services::guest::mask;
use ipc_defs::services::guest::Next;
use ipc_defs::services::guest::Reply;
pub use ipc_defs::services::intercept::DEBUG_EXIT_PORT;

use crate::low_byte;

/// The i8042's data port.
pub const I8042_DATA: u16 = 0x60;
/// The i8042's command (write) and status (read) port.
pub const I8042_COMMAND: u16 = 0x64;
/// The i8042 command that pulses output line 0: the CPU reset.
pub const I8042_RESET: u8 = 0xfe;
/// Status: output buffer empty, input buffer empty, nothing else.
const I8042_STATUS: u8 = 0;

/// The keyboard controller, as far as the reset line.
#[derive(Debug, Default)]
pub struct I8042;

impl I8042 {
    /// A read at `port` ([`I8042_DATA`] or [`I8042_COMMAND`]).
    pub fn read(&self, port: u16) -> u8 {
        match port {
            I8042_COMMAND => I8042_STATUS,
            _ => 0,
        }
    }

    /// A write at `port`: whether the machine resets.
    pub fn write(&mut self, port: u16, value: u64) -> Next {
        if port == I8042_COMMAND && low_byte(value) == I8042_RESET {
            Next::Reset
        } else {
            Next::Resume
        }
    }
}

/// An access to the debug-exit port: a write ends the run with its low byte as the status.
pub fn debug_exit(size: u8, write: Option<u64>) -> Reply {
    match write {
        Some(value) => Reply {
            value: 0,
            next: Next::Exit(low_byte(value)),
        },
        None => Reply::read(mask(size)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_command_0xfe_on_the_command_port_resets() {
        let mut kbc = I8042;
        assert_eq!(kbc.write(I8042_COMMAND, 0xfe), Next::Reset);
        assert_eq!(kbc.write(I8042_COMMAND, 0x12fe), Next::Reset);
        assert_eq!(kbc.write(I8042_COMMAND, 0xaa), Next::Resume);
        assert_eq!(kbc.write(I8042_DATA, 0xfe), Next::Resume);
        assert_eq!(kbc.read(I8042_COMMAND), 0);
        assert_eq!(kbc.read(I8042_DATA), 0);
    }

    #[test]
    fn debug_exit_status_is_the_low_byte() {
        assert_eq!(debug_exit(4, Some(0x1234_5601)).next, Next::Exit(0x01));
        assert_eq!(debug_exit(2, None), Reply::read(0xffff));
    }
}
