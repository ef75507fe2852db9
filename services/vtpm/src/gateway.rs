//! The network front ends of the TPM, as pure protocol code: bytes from a connection in,
//! steps out (a TPM command, a platform signal, bytes to send, or "close"). The
//! `pv-tpm-gateway` process does the socket I/O and forwards steps to the vtpm service over
//! its channel; it runs outside the engine's sandbox and holds only listening sockets the
//! microkernel bound on loopback.
//!
//! Protocols:
//! - **mssim** (the TPM 2.0 reference simulator's TCP protocol, what `-T mssim:` speaks):
//!   a command port (`TPM_SEND_COMMAND` = 8: locality byte, u32 size, command; answered
//!   with u32 size, response, u32 0) and a platform port (u32 signal, answered with u32 0).
//!   All integers big-endian.
//! - **swtpm** socket protocol (what `-T swtpm:` and QEMU's `-tpmdev emulator` speak): a data
//!   channel carrying bare TPM commands and responses, and a control channel of u32 command
//!   codes with fixed-size big-endian payloads (swtpm's `tpm_ioctl.h`).
//!
//! Everything read is hostile: a size beyond the TPM's buffer, an unknown code or a bad
//! locality closes the connection or gets a TPM error; nothing can make the parser allocate
//! more than one command or loop.
//!
//! Localities: a connection may use only the localities its listener is granted (manifest
//! `listen = [{ ..., localities = [0, 3] }]`; locality 0 only by default). A command at
//! another (mssim's locality byte, or the swtpm locality a control connection set), a swtpm
//! `SET_LOCALITY` or `RESET_TPMESTABLISHED` naming another, is refused here
//! ([`Step::Refused`]: a TPM error, counted and logged by the process) and never reaches the
//! TPM. Localities 1-4 are the platform's (3 and 4: DRTM, PCRs 17-22).

use ipc_defs::services::vtpm::Localities;
use ipc_defs::services::vtpm::Platform;
use ipc_defs::services::vtpm::MAX_COMMAND;

/// Which protocol a listener speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    MssimCommand,
    MssimPlatform,
    SwtpmData,
    SwtpmControl,
}

impl Protocol {
    /// The protocol of a listener, by the name the manifest gives it.
    pub fn from_listener_name(name: &str) -> Option<Protocol> {
        match name {
            "mssim-command" => Some(Protocol::MssimCommand),
            "mssim-platform" => Some(Protocol::MssimPlatform),
            "swtpm-data" => Some(Protocol::SwtpmData),
            "swtpm-control" | "swtpm-control-unix" => Some(Protocol::SwtpmControl),
            _ => None,
        }
    }
}

/// mssim codes.
pub mod mssim {
    pub const POWER_ON: u32 = 1;
    pub const POWER_OFF: u32 = 2;
    pub const PHYS_PRES_ON: u32 = 3;
    pub const PHYS_PRES_OFF: u32 = 4;
    pub const HASH_START: u32 = 5;
    pub const HASH_DATA: u32 = 6;
    pub const HASH_END: u32 = 7;
    pub const SEND_COMMAND: u32 = 8;
    pub const CANCEL_ON: u32 = 9;
    pub const CANCEL_OFF: u32 = 10;
    pub const NV_ON: u32 = 11;
    pub const NV_OFF: u32 = 12;
    pub const KEY_CACHE_ON: u32 = 13;
    pub const KEY_CACHE_OFF: u32 = 14;
    pub const REMOTE_HANDSHAKE: u32 = 15;
    pub const RESET: u32 = 17;
    pub const RESTART: u32 = 18;
    pub const SESSION_END: u32 = 20;
    pub const STOP: u32 = 21;
    /// What REMOTE_HANDSHAKE answers: protocol version 1, TPM in a "platform available,
    /// NV available, power on" state (the reference simulator's flags 1|2|4... as it reports).
    pub const SERVER_VERSION: u32 = 1;
    pub const HANDSHAKE_FLAGS: u32 = 0x0000_0007;
}

/// swtpm control codes.
pub mod swtpm {
    pub const GET_CAPABILITY: u32 = 1;
    pub const INIT: u32 = 2;
    pub const SHUTDOWN: u32 = 3;
    pub const GET_TPMESTABLISHED: u32 = 4;
    pub const SET_LOCALITY: u32 = 5;
    pub const HASH_START: u32 = 6;
    pub const HASH_DATA: u32 = 7;
    pub const HASH_END: u32 = 8;
    pub const CANCEL_TPM_CMD: u32 = 9;
    pub const STORE_VOLATILE: u32 = 10;
    pub const RESET_TPMESTABLISHED: u32 = 11;
    pub const STOP: u32 = 14;
    pub const GET_CONFIG: u32 = 15;
    pub const SET_BUFFERSIZE: u32 = 17;
    pub const SET_DATAFD: u32 = 16;
    /// What GET_CAPABILITY reports (swtpm's `PTM_CAP_*` bits).
    pub const CAPABILITIES: u64 = 1 // INIT
        | (1 << 1) // SHUTDOWN
        | (1 << 2) // GET_TPMESTABLISHED
        | (1 << 3) // SET_LOCALITY
        | (1 << 5) // CANCEL_TPM_CMD
        | (1 << 6) // STORE_VOLATILE
        | (1 << 7) // RESET_TPMESTABLISHED
        | (1 << 10) // STOP
        | (1 << 11) // GET_CONFIG
        | (1 << 12) // SET_DATAFD (on the Unix-socket control channel)
        | (1 << 13); // SET_BUFFERSIZE
    /// `TPM_FAIL` as a control result.
    pub const RESULT_FAIL: u32 = 9;
    /// `TPM_BAD_PARAMETER`.
    pub const RESULT_BAD_PARAMETER: u32 = 3;
    /// `TPM_BAD_LOCALITY`: a locality the connection's listener is not granted.
    pub const RESULT_BAD_LOCALITY: u32 = 0x3d;
}

/// What a connection asks for next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Run a TPM command; answer with [`Connection::tpm_reply`].
    Command { locality: u8, command: Vec<u8> },
    /// Apply a platform signal; answer with [`Connection::signal_reply`].
    Signal(Platform),
    /// Send these bytes (an answer that needs no TPM).
    Reply(Vec<u8>),
    /// Send these bytes, then close.
    ReplyAndClose(Vec<u8>),
    /// Close the connection.
    Close,
    /// Take the descriptor that came with this message as a new data connection (swtpm's
    /// CMD_SET_DATAFD, on a Unix-socket control channel), then send these bytes.
    TakeDataFd(Vec<u8>),
    /// A request beyond the connection's grant (a locality its listener is not granted):
    /// count and log the refusal (`what`), send `reply` (a TPM error), go on.
    Refused { what: String, reply: Vec<u8> },
}

/// TPM_RC_LOCALITY.
pub const RC_LOCALITY: u32 = 0x907;

/// A TPM error response (no sessions) with `rc`.
fn tpm_error(rc: u32) -> Vec<u8> {
    let mut r = 0x8001u16.to_be_bytes().to_vec();
    r.extend_from_slice(&10u32.to_be_bytes());
    r.extend_from_slice(&rc.to_be_bytes());
    r
}

/// A connection's parser: bytes accumulate until a whole request is there.
#[derive(Debug)]
pub struct Connection {
    pub protocol: Protocol,
    buffer: Vec<u8>,
    /// The locality for swtpm data commands (set through the control channel; shared by
    /// the gateway across a client's connections).
    pub locality: u8,
    /// The control command being answered (for its reply format).
    pending_control: Option<u32>,
    /// Set by a swtpm SET_LOCALITY until the gateway takes it ([`Connection::take_locality`]).
    locality_set: bool,
    /// The localities this connection's listener is granted.
    pub granted: Localities,
}

/// Most bytes a connection may hold unparsed: one full mssim command with its framing.
pub const MAX_BUFFERED: usize = MAX_COMMAND + 16;

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

impl Connection {
    /// A connection of a listener granted locality 0 only (the default).
    pub fn new(protocol: Protocol) -> Connection {
        Connection::granted(protocol, Localities::ZERO)
    }

    /// A connection of a listener granted `localities`.
    pub fn granted(protocol: Protocol, localities: Localities) -> Connection {
        Connection {
            protocol,
            buffer: Vec::new(),
            locality: 0,
            pending_control: None,
            locality_set: false,
            granted: localities,
        }
    }

    /// A TPM command at `locality`, unless the listener is not granted it.
    fn command_at(&self, locality: u8, command: Vec<u8>) -> Step {
        if self.granted.contains(locality) {
            Step::Command { locality, command }
        } else {
            Step::Refused {
                what: format!(
                    "TPM command at locality {locality} (the listener is granted localities {})",
                    self.granted
                ),
                reply: self.tpm_reply(&tpm_error(RC_LOCALITY)),
            }
        }
    }

    /// How many more bytes this connection may buffer (read no more than this).
    pub fn room(&self) -> usize {
        MAX_BUFFERED - self.buffer.len()
    }

    /// The locality a swtpm SET_LOCALITY on this connection chose, once.
    pub fn take_locality(&mut self) -> Option<u8> {
        std::mem::take(&mut self.locality_set).then_some(self.locality)
    }

    /// Adds bytes read from the socket. `false` if the peer sent more than any request can
    /// be (the connection must be closed).
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        if self.buffer.len() + bytes.len() > MAX_BUFFERED {
            return false;
        }
        self.buffer.extend_from_slice(bytes);
        true
    }

    fn take(&mut self, n: usize) -> Vec<u8> {
        self.buffer.drain(..n).collect()
    }

    /// The first complete request in `queued` (bytes still queued on the connection: a
    /// gateway that reads with MSG_PEEK takes a request off its connection only once it
    /// recorded it), and how many of the bytes it is; `None` while it is incomplete. What
    /// was fed before is forgotten.
    pub fn parse_queued(&mut self, queued: &[u8]) -> Option<(Step, usize)> {
        self.buffer.clear();
        let queued = &queued[..queued.len().min(MAX_BUFFERED)];
        self.buffer.extend_from_slice(queued);
        let step = self.next_step()?;
        let taken = queued.len() - self.buffer.len();
        self.buffer.clear();
        Some((step, taken))
    }

    /// The next complete request, if one has arrived.
    pub fn next_step(&mut self) -> Option<Step> {
        match self.protocol {
            Protocol::MssimCommand => self.mssim_command(),
            Protocol::MssimPlatform => self.mssim_platform(),
            Protocol::SwtpmData => self.swtpm_data(),
            Protocol::SwtpmControl => self.swtpm_control(),
        }
    }

    fn mssim_command(&mut self) -> Option<Step> {
        if self.buffer.len() < 4 {
            return None;
        }
        let code = be32(&self.buffer);
        match code {
            mssim::SEND_COMMAND => {
                if self.buffer.len() < 9 {
                    return None;
                }
                let locality = self.buffer[4];
                let size = be32(&self.buffer[5..]) as usize;
                if size > MAX_COMMAND {
                    return Some(Step::Close);
                }
                if self.buffer.len() < 9 + size {
                    return None;
                }
                let mut frame = self.take(9 + size);
                let command = frame.split_off(9);
                Some(self.command_at(locality, command))
            }
            mssim::REMOTE_HANDSHAKE => {
                if self.buffer.len() < 8 {
                    return None;
                }
                self.take(8);
                let mut r = mssim::SERVER_VERSION.to_be_bytes().to_vec();
                r.extend_from_slice(&mssim::HANDSHAKE_FLAGS.to_be_bytes());
                r.extend_from_slice(&0u32.to_be_bytes());
                Some(Step::Reply(r))
            }
            // Signals are accepted on the command port too, as the simulator does.
            _ => self.signal_or_close(code),
        }
    }

    fn mssim_platform(&mut self) -> Option<Step> {
        if self.buffer.len() < 4 {
            return None;
        }
        let code = be32(&self.buffer);
        self.signal_or_close(code)
    }

    /// The codes both mssim ports take: session end, stop, platform signals.
    fn signal_or_close(&mut self, code: u32) -> Option<Step> {
        let signal = match code {
            mssim::SESSION_END => {
                self.take(4);
                return Some(Step::Close);
            }
            mssim::STOP => {
                self.take(4);
                return Some(Step::ReplyAndClose(0u32.to_be_bytes().to_vec()));
            }
            mssim::POWER_ON => Platform::PowerOn,
            mssim::POWER_OFF => Platform::PowerOff,
            mssim::RESET | mssim::RESTART => Platform::Reset,
            mssim::NV_ON => Platform::NvOn,
            mssim::NV_OFF => Platform::NvOff,
            mssim::CANCEL_ON => Platform::CancelOn,
            mssim::CANCEL_OFF => Platform::CancelOff,
            // Physical presence and the key cache have no effect on this TPM: acknowledged.
            mssim::PHYS_PRES_ON
            | mssim::PHYS_PRES_OFF
            | mssim::KEY_CACHE_ON
            | mssim::KEY_CACHE_OFF => {
                self.take(4);
                return Some(Step::Reply(0u32.to_be_bytes().to_vec()));
            }
            // Anything else (including the DRTM hash signals, not offered): close.
            _ => return Some(Step::Close),
        };
        self.take(4);
        Some(Step::Signal(signal))
    }

    fn swtpm_data(&mut self) -> Option<Step> {
        if self.buffer.len() < 10 {
            return None;
        }
        let size = be32(&self.buffer[2..]) as usize;
        if !(10..=MAX_COMMAND).contains(&size) {
            return Some(Step::Close);
        }
        if self.buffer.len() < size {
            return None;
        }
        let command = self.take(size);
        Some(self.command_at(self.locality, command))
    }

    fn swtpm_control(&mut self) -> Option<Step> {
        if self.buffer.len() < 4 {
            return None;
        }
        let code = be32(&self.buffer);
        let input = match code {
            swtpm::INIT | swtpm::SET_BUFFERSIZE => 4,
            swtpm::SET_LOCALITY | swtpm::RESET_TPMESTABLISHED => 1,
            swtpm::GET_CAPABILITY
            | swtpm::SHUTDOWN
            | swtpm::GET_TPMESTABLISHED
            | swtpm::CANCEL_TPM_CMD
            | swtpm::STORE_VOLATILE
            | swtpm::STOP
            | swtpm::GET_CONFIG
            | swtpm::SET_DATAFD => 0,
            _ => {
                return Some(Step::ReplyAndClose(
                    swtpm::RESULT_FAIL.to_be_bytes().to_vec(),
                ))
            }
        };
        if self.buffer.len() < 4 + input {
            return None;
        }
        let frame = self.take(4 + input);
        // swtpm reads one control message per read and ignores what follows its payload;
        // clients rely on that (QEMU sends whole request unions, e.g. 4 bytes for the
        // one-byte locality). So does this parser.
        self.buffer.clear();
        let ok = 0u32.to_be_bytes().to_vec();
        let step = match code {
            swtpm::GET_CAPABILITY => Step::Reply(swtpm::CAPABILITIES.to_be_bytes().to_vec()),
            swtpm::SET_DATAFD => Step::TakeDataFd(ok),
            swtpm::INIT => Step::Signal(Platform::Reset),
            swtpm::SHUTDOWN | swtpm::STOP => Step::Signal(Platform::PowerOff),
            swtpm::GET_TPMESTABLISHED => Step::Signal(Platform::GetEstablished),
            swtpm::SET_LOCALITY => {
                let loc = frame[4];
                if loc > 4 {
                    Step::Reply(swtpm::RESULT_BAD_PARAMETER.to_be_bytes().to_vec())
                } else if !self.granted.contains(loc) {
                    Step::Refused {
                        what: format!(
                            "SET_LOCALITY {loc} (the listener is granted localities {})",
                            self.granted
                        ),
                        reply: swtpm::RESULT_BAD_LOCALITY.to_be_bytes().to_vec(),
                    }
                } else {
                    self.locality = loc;
                    self.locality_set = true;
                    Step::Reply(ok)
                }
            }
            swtpm::CANCEL_TPM_CMD => Step::Signal(Platform::CancelOn),
            swtpm::STORE_VOLATILE => Step::Reply(ok),
            swtpm::RESET_TPMESTABLISHED if !self.granted.contains(frame[4]) => Step::Refused {
                what: format!(
                    "RESET_TPMESTABLISHED at locality {} (the listener is granted localities {})",
                    frame[4], self.granted
                ),
                reply: swtpm::RESULT_BAD_LOCALITY.to_be_bytes().to_vec(),
            },
            swtpm::RESET_TPMESTABLISHED => {
                Step::Signal(Platform::ResetEstablished { locality: frame[4] })
            }
            swtpm::GET_CONFIG => {
                let mut r = ok;
                r.extend_from_slice(&0u32.to_be_bytes());
                Step::Reply(r)
            }
            swtpm::SET_BUFFERSIZE => {
                let mut r = ok;
                for v in [MAX_COMMAND as u32, MAX_COMMAND as u32, MAX_COMMAND as u32] {
                    r.extend_from_slice(&v.to_be_bytes());
                }
                Step::Reply(r)
            }
            _ => unreachable!("codes filtered above"),
        };
        if matches!(step, Step::Signal(_)) {
            self.pending_control = Some(code);
        }
        Some(step)
    }

    /// The bytes answering a TPM command's response.
    pub fn tpm_reply(&self, response: &[u8]) -> Vec<u8> {
        match self.protocol {
            Protocol::MssimCommand => {
                let mut r = (response.len() as u32).to_be_bytes().to_vec();
                r.extend_from_slice(response);
                r.extend_from_slice(&0u32.to_be_bytes());
                r
            }
            _ => response.to_vec(),
        }
    }

    /// The bytes answering a platform signal (`ok`: it was applied; `established`: for the
    /// swtpm established-flag query).
    pub fn signal_reply(&mut self, ok: bool, established: bool) -> Vec<u8> {
        match self.protocol {
            Protocol::SwtpmControl => {
                let result = if ok { 0 } else { swtpm::RESULT_FAIL };
                let mut r = result.to_be_bytes().to_vec();
                if self.pending_control.take() == Some(swtpm::GET_TPMESTABLISHED) {
                    r.extend_from_slice(&[u8::from(established), 0, 0, 0]);
                }
                r
            }
            _ => (if ok { 0u32 } else { 1 }).to_be_bytes().to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mssim_commands_are_framed_and_partial_input_waits() {
        let mut c = Connection::granted(Protocol::MssimCommand, Localities::ZERO.with(3));
        let cmd = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x44, 0, 0];
        let mut frame = mssim::SEND_COMMAND.to_be_bytes().to_vec();
        frame.push(3);
        frame.extend_from_slice(&(cmd.len() as u32).to_be_bytes());
        frame.extend_from_slice(&cmd);
        assert!(c.feed(&frame[..7]));
        assert_eq!(c.next_step(), None);
        assert!(c.feed(&frame[7..]));
        assert_eq!(
            c.next_step(),
            Some(Step::Command {
                locality: 3,
                command: cmd.to_vec()
            })
        );
        assert_eq!(c.tpm_reply(&[1, 2]), vec![0, 0, 0, 2, 1, 2, 0, 0, 0, 0]);
    }

    #[test]
    fn hostile_mssim_input_closes_the_connection() {
        let mut c = Connection::new(Protocol::MssimCommand);
        let mut frame = mssim::SEND_COMMAND.to_be_bytes().to_vec();
        frame.push(0);
        frame.extend_from_slice(&0x0010_0000u32.to_be_bytes());
        c.feed(&frame);
        assert_eq!(c.next_step(), Some(Step::Close));
        let mut c = Connection::new(Protocol::MssimPlatform);
        c.feed(&99u32.to_be_bytes());
        assert_eq!(c.next_step(), Some(Step::Close));
        let mut c = Connection::new(Protocol::MssimCommand);
        assert!(
            !c.feed(&vec![0; MAX_BUFFERED + 1]),
            "1 MiB of garbage is refused"
        );
    }

    #[test]
    fn swtpm_data_and_control() {
        let mut c = Connection::granted(Protocol::SwtpmData, Localities::ALL);
        c.locality = 2;
        let cmd = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 8];
        c.feed(&cmd);
        assert_eq!(
            c.next_step(),
            Some(Step::Command {
                locality: 2,
                command: cmd.to_vec()
            })
        );
        c.feed(&[0x80, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 1, 0x7b]);
        assert_eq!(c.next_step(), Some(Step::Close));

        let mut k = Connection::granted(Protocol::SwtpmControl, Localities::ALL);
        let mut m = swtpm::SET_LOCALITY.to_be_bytes().to_vec();
        m.push(3);
        k.feed(&m);
        assert_eq!(k.next_step(), Some(Step::Reply(vec![0, 0, 0, 0])));
        assert_eq!(k.locality, 3);
        // QEMU's form: the locality padded to the 4-byte request union.
        let mut m = swtpm::SET_LOCALITY.to_be_bytes().to_vec();
        m.extend_from_slice(&[1, 0, 0, 0]);
        k.feed(&m);
        assert_eq!(k.next_step(), Some(Step::Reply(vec![0, 0, 0, 0])));
        assert_eq!(
            k.next_step(),
            None,
            "the padding is not taken for a command"
        );
        k.feed(&swtpm::GET_TPMESTABLISHED.to_be_bytes());
        assert_eq!(k.next_step(), Some(Step::Signal(Platform::GetEstablished)));
        assert_eq!(k.signal_reply(true, true), vec![0, 0, 0, 0, 1, 0, 0, 0]);
        k.feed(&77u32.to_be_bytes());
        assert!(matches!(k.next_step(), Some(Step::ReplyAndClose(_))));
    }

    #[test]
    fn a_queued_request_is_parsed_without_taking_what_follows_it() {
        let cmd = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 8];
        let mut c = Connection::new(Protocol::MssimCommand);
        let mut queued = mssim_frame(0, &cmd);
        let one = queued.len();
        assert_eq!(c.parse_queued(&queued[..one - 1]), None, "incomplete");
        queued.extend_from_slice(&mssim_frame(0, &cmd)[..5]);
        assert_eq!(
            c.parse_queued(&queued),
            Some((
                Step::Command {
                    locality: 0,
                    command: cmd.to_vec()
                },
                one
            ))
        );
        // A swtpm control message takes whatever came with it (as swtpm's one read does).
        let mut k = Connection::new(Protocol::SwtpmControl);
        let mut m = swtpm::SET_LOCALITY.to_be_bytes().to_vec();
        m.extend_from_slice(&[0, 0, 0, 0]);
        assert_eq!(k.parse_queued(&m), Some((Step::Reply(vec![0, 0, 0, 0]), 8)));
    }

    fn mssim_frame(locality: u8, command: &[u8]) -> Vec<u8> {
        let mut frame = mssim::SEND_COMMAND.to_be_bytes().to_vec();
        frame.push(locality);
        frame.extend_from_slice(&(command.len() as u32).to_be_bytes());
        frame.extend_from_slice(command);
        frame
    }

    #[test]
    fn a_command_at_a_locality_the_listener_is_not_granted_never_reaches_the_tpm() {
        let cmd = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 8];
        // The default: locality 0 only. Localities 1-4 (and 9, which does not exist) are
        // answered with TPM_RC_LOCALITY in the mssim framing, and the connection goes on.
        let mut c = Connection::new(Protocol::MssimCommand);
        for locality in [1, 2, 3, 4, 9] {
            c.feed(&mssim_frame(locality, &cmd));
            match c.next_step() {
                Some(Step::Refused { reply, what }) => {
                    assert_eq!(&reply[4..14], &tpm_error(RC_LOCALITY)[..], "{what}");
                    assert!(what.contains(&format!("locality {locality}")), "{what}");
                }
                other => panic!("locality {locality}: {other:?}"),
            }
        }
        c.feed(&mssim_frame(0, &cmd));
        assert!(matches!(
            c.next_step(),
            Some(Step::Command { locality: 0, .. })
        ));
        // Granted [0, 3]: 3 passes, 4 does not.
        let mut c = Connection::granted(Protocol::MssimCommand, Localities::ZERO.with(3));
        c.feed(&mssim_frame(3, &cmd));
        assert!(matches!(
            c.next_step(),
            Some(Step::Command { locality: 3, .. })
        ));
        c.feed(&mssim_frame(4, &cmd));
        assert!(matches!(c.next_step(), Some(Step::Refused { .. })));

        // swtpm: SET_LOCALITY to an ungranted locality is refused and changes nothing; a data
        // command at a locality set elsewhere (the gateway shares it) is refused too.
        let mut k = Connection::new(Protocol::SwtpmControl);
        let mut m = swtpm::SET_LOCALITY.to_be_bytes().to_vec();
        m.push(4);
        k.feed(&m);
        assert!(matches!(
            k.next_step(),
            Some(Step::Refused { ref reply, .. }) if reply == &swtpm::RESULT_BAD_LOCALITY.to_be_bytes()
        ));
        assert_eq!(k.take_locality(), None);
        let mut m = swtpm::RESET_TPMESTABLISHED.to_be_bytes().to_vec();
        m.push(3);
        k.feed(&m);
        assert!(matches!(k.next_step(), Some(Step::Refused { .. })));
        let mut d = Connection::new(Protocol::SwtpmData);
        d.locality = 2;
        d.feed(&cmd);
        match d.next_step() {
            Some(Step::Refused { reply, .. }) => assert_eq!(reply, tpm_error(RC_LOCALITY)),
            other => panic!("{other:?}"),
        }
    }
}
