//! The descriptor store: what a service the manifest allows (`fd-store = { max = N }`) tells
//! the microkernel about descriptors it wants kept across its own restarts (systemd's
//! FDSTORE, as a capability).
//!
//! The service holds one end of a `SOCK_SEQPACKET` socket pair ([`CapabilityKind::FdStore`]);
//! each packet is one [`StoreMessage`] (postcard, at most [`MAX_MESSAGE`] bytes), a
//! [`StoreMessage::Keep`] with exactly one descriptor attached (`SCM_RIGHTS`), a
//! [`StoreMessage::Forget`] with none. The microkernel holds what it is given, at most the
//! manifest's bound, and hands every kept descriptor back to the service's next start (a
//! restart, never a clean shutdown), each at a slot the bootstrap record lists with its
//! record ([`Kept`]). Nothing goes the other way: the microkernel never writes to the
//! service's end, and a refused message is refused silently for the service (logged and
//! counted by the microkernel).
//!
//! To the microkernel every message is hostile input: this module decodes and checks the
//! bytes (size, shape, names, no trailing bytes); the microkernel checks the descriptor
//! (a socket or a pipe, not a listening socket, not the store itself) and the bound.
//!
//! [`CapabilityKind::FdStore`]: crate::capability::CapabilityKind::FdStore

use heapless::String;
use heapless::Vec;
use serde::Deserialize;
use serde::Serialize;

/// Most descriptors any store may keep (the manifest's `max` is at most this): each comes
/// back as a descriptor and a record in the bootstrap record, whose size is bounded.
pub const MAX_KEPT: usize = 32;
/// Most bytes of state a record carries: what the service needs to resume one descriptor
/// (which listener it came from, whose data channel it is), not a journal (that belongs in
/// a region).
pub const MAX_STATE: usize = 64;
/// Longest record name (the kind of descriptor, in the service's own words).
pub const MAX_KEPT_NAME: usize = 32;
/// Largest encoded message: a Keep with the longest name and state, and room to spare. A
/// packet longer than this is refused unread.
pub const MAX_MESSAGE: usize = 128;

/// What the service says a kept descriptor is: its own number for it (unique among what it
/// keeps), a name and a little state. The microkernel interprets none of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeptRecord {
    pub id: u32,
    /// 1 to [`MAX_KEPT_NAME`] characters from `a-z`, `0-9`, `-`.
    pub name: String<MAX_KEPT_NAME>,
    pub state: Vec<u8, MAX_STATE>,
}

/// One packet on the store socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StoreMessage {
    /// Keep the one descriptor sent with this packet under `record.id` (what was kept under
    /// that id before is dropped).
    Keep(KeptRecord),
    /// Drop what is kept under `id` (its connection ended).
    Forget { id: u32 },
}

/// A kept descriptor as a start hands it back: at `slot`, with its record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub slot: i32,
    pub record: KeptRecord,
}

/// Why a packet is not a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// Longer than [`MAX_MESSAGE`] (the length seen, which may be truncated).
    TooLong(usize),
    /// Not postcard for a [`StoreMessage`], or bytes left after it.
    Malformed,
    /// A record name that is empty or has a character outside `a-z`, `0-9`, `-`.
    BadName,
}

impl core::fmt::Display for StoreError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StoreError::TooLong(n) => {
                write!(f, "a message of {n} bytes (at most {MAX_MESSAGE})")
            }
            StoreError::Malformed => write!(f, "not a store message"),
            StoreError::BadName => write!(
                f,
                "a record name outside 1-{MAX_KEPT_NAME} characters of a-z, 0-9, '-'"
            ),
        }
    }
}

/// Whether `name` is a valid record name.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_KEPT_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl KeptRecord {
    /// A record, or `None` if the name or state is out of bounds.
    pub fn new(id: u32, name: &str, state: &[u8]) -> Option<KeptRecord> {
        if !valid_name(name) {
            return None;
        }
        Some(KeptRecord {
            id,
            name: String::try_from(name).ok()?,
            state: Vec::from_slice(state).ok()?,
        })
    }
}

impl StoreMessage {
    /// Decodes and checks one packet: at most [`MAX_MESSAGE`] bytes, exactly one message, a
    /// valid name. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<StoreMessage, StoreError> {
        if bytes.len() > MAX_MESSAGE {
            return Err(StoreError::TooLong(bytes.len()));
        }
        let (message, rest) =
            postcard::take_from_bytes::<StoreMessage>(bytes).map_err(|_| StoreError::Malformed)?;
        if !rest.is_empty() {
            return Err(StoreError::Malformed);
        }
        if let StoreMessage::Keep(record) = &message {
            if !valid_name(&record.name) {
                return Err(StoreError::BadName);
            }
        }
        Ok(message)
    }

    /// Encodes the message into `buf` ([`MAX_MESSAGE`] bytes are always enough); the bytes
    /// written.
    pub fn encode<'b>(&self, buf: &'b mut [u8; MAX_MESSAGE]) -> Option<&'b mut [u8]> {
        postcard::to_slice(self, buf).ok()
    }

    /// Whether a descriptor must come with this message (exactly one) or none may.
    pub fn carries_descriptor(&self) -> bool {
        matches!(self, StoreMessage::Keep(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_within_their_bound() {
        let longest =
            KeptRecord::new(u32::MAX, &"a".repeat(MAX_KEPT_NAME), &[0xff; MAX_STATE]).unwrap();
        for m in [
            StoreMessage::Keep(longest),
            StoreMessage::Forget { id: u32::MAX },
            StoreMessage::Keep(KeptRecord::new(0, "c", &[]).unwrap()),
        ] {
            let mut buf = [0u8; MAX_MESSAGE];
            let bytes = m.encode(&mut buf).expect("fits").to_vec();
            assert!(bytes.len() <= MAX_MESSAGE);
            assert_eq!(StoreMessage::decode(&bytes), Ok(m));
        }
    }

    #[test]
    fn hostile_packets_are_refused() {
        let mut buf = [0u8; MAX_MESSAGE];
        let good = StoreMessage::Forget { id: 7 }
            .encode(&mut buf)
            .unwrap()
            .to_vec();
        // Trailing bytes, truncation, oversize, an unknown variant.
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(StoreMessage::decode(&trailing), Err(StoreError::Malformed));
        assert_eq!(StoreMessage::decode(&good[..1]), Err(StoreError::Malformed));
        assert_eq!(StoreMessage::decode(&[]), Err(StoreError::Malformed));
        assert_eq!(
            StoreMessage::decode(&[0; MAX_MESSAGE + 1]),
            Err(StoreError::TooLong(MAX_MESSAGE + 1))
        );
        assert_eq!(StoreMessage::decode(&[9]), Err(StoreError::Malformed));
        // A name the record constructor would refuse, encoded by hand.
        for name in ["", "UPPER", "sp ace", "dot.ted"] {
            let m = StoreMessage::Keep(KeptRecord {
                id: 1,
                name: String::try_from(name).unwrap(),
                state: Vec::new(),
            });
            let bytes = m.encode(&mut buf).unwrap().to_vec();
            assert_eq!(
                StoreMessage::decode(&bytes),
                Err(StoreError::BadName),
                "{name:?}"
            );
        }
        // State longer than its bound: postcard refuses the length.
        let mut long = vec![0u8, 1, 1, b'c', (MAX_STATE + 1) as u8];
        long.extend(std::iter::repeat_n(0, MAX_STATE + 1));
        assert_eq!(StoreMessage::decode(&long), Err(StoreError::Malformed));
    }

    #[test]
    fn record_names_are_checked_at_construction() {
        assert!(KeptRecord::new(1, "swtpm-control-unix", b"x").is_some());
        assert!(KeptRecord::new(1, "Bad", b"").is_none());
        assert!(KeptRecord::new(1, "", b"").is_none());
        assert!(KeptRecord::new(1, "x", &[0; MAX_STATE + 1]).is_none());
    }
}
