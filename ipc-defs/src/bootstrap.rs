//! The bootstrap record: the first thing a service reads, naming every capability it holds.
//!
//! The microkernel writes the record (postcard) into a sealed memfd at descriptor
//! [`BOOTSTRAP_SLOT`]; every other capability is a descriptor at the slot the record names.
//! A service has no other way to find anything: no paths, no environment.

use heapless::String;
use heapless::Vec;
use serde::Deserialize;
use serde::Serialize;

use crate::capability::CapabilityKind;
use crate::capability::Grant;
use crate::fd_store::Kept;
use crate::fd_store::MAX_KEPT;

/// Descriptor number of the bootstrap memfd in every service.
pub const BOOTSTRAP_SLOT: i32 = 3;
/// First descriptor number used for the capabilities the record lists.
pub const FIRST_CAPABILITY_SLOT: i32 = 4;
/// Most capabilities one service can hold; the manifest validator enforces it.
pub const MAX_CAPABILITIES: usize = 48;
/// Longest service, endpoint or region name.
pub const MAX_NAME: usize = 32;
/// Largest encoded bootstrap record: the most capabilities, and the most kept descriptors
/// with their records.
pub const MAX_RECORD: usize = 16384;
/// `"PVBS"`.
pub const BOOTSTRAP_MAGIC: u32 = 0x5342_5650;

/// A name with the manifest's length bound.
pub type Name = String<MAX_NAME>;

/// One granted capability: the descriptor at `slot` is a `kind` named `name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    pub slot: i32,
    pub kind: CapabilityKind,
    /// The peer service (for channels), the region or the file name.
    pub name: Name,
    /// Size of the mapping or file in bytes, where that applies.
    pub size: u64,
    /// For a served channel: what its client may reach.
    pub grant: Grant,
}

/// Everything a service is told at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    pub magic: u32,
    /// The service's own name, for logs.
    pub service: Name,
    /// A `tracing` filter directive (e.g. `info`), from the microkernel's `RUST_LOG`.
    pub log_filter: String<64>,
    pub capabilities: Vec<Capability, MAX_CAPABILITIES>,
    /// Descriptors the service's descriptor store kept across its last restart, each at its
    /// slot (after every capability's) with the record the service gave it.
    pub kept: Vec<Kept, MAX_KEPT>,
}

/// Why a bootstrap record cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootstrapError {
    /// Not postcard for a [`Bootstrap`], or over a bound.
    Malformed,
    /// Decoded, but the magic is wrong (not from our microkernel).
    BadMagic(u32),
    /// A slot below [`FIRST_CAPABILITY_SLOT`] or listed twice.
    BadSlot(i32),
}

impl core::fmt::Display for BootstrapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            BootstrapError::Malformed => write!(f, "bootstrap record is not a valid record"),
            BootstrapError::BadMagic(m) => write!(f, "bootstrap record has magic {m:#x}"),
            BootstrapError::BadSlot(s) => write!(f, "bootstrap record lists bad slot {s}"),
        }
    }
}

impl Bootstrap {
    /// Decodes and checks a record.
    pub fn decode(bytes: &[u8]) -> Result<Bootstrap, BootstrapError> {
        let record: Bootstrap =
            postcard::from_bytes(bytes).map_err(|_| BootstrapError::Malformed)?;
        if record.magic != BOOTSTRAP_MAGIC {
            return Err(BootstrapError::BadMagic(record.magic));
        }
        let slots = record
            .capabilities
            .iter()
            .map(|c| c.slot)
            .chain(record.kept.iter().map(|k| k.slot));
        for (i, slot) in slots.clone().enumerate() {
            if slot < FIRST_CAPABILITY_SLOT || slots.clone().take(i).any(|s| s == slot) {
                return Err(BootstrapError::BadSlot(slot));
            }
        }
        Ok(record)
    }

    /// The capabilities of a kind.
    pub fn find(&self, kind: CapabilityKind) -> impl Iterator<Item = &Capability> {
        self.capabilities.iter().filter(move |c| c.kind == kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Interface;

    #[test]
    fn record_round_trips_and_rejects_garbage() {
        let mut caps = Vec::new();
        caps.push(Capability {
            slot: 4,
            kind: CapabilityKind::Call(Interface::Vmgs),
            name: Name::try_from("vmgs").unwrap(),
            size: 4096,
            grant: Grant::Interface,
        })
        .unwrap();
        let rec = Bootstrap {
            magic: BOOTSTRAP_MAGIC,
            service: Name::try_from("vtpm").unwrap(),
            log_filter: String::try_from("info").unwrap(),
            capabilities: caps,
            kept: Vec::new(),
        };
        let bytes = postcard::to_allocvec(&rec).unwrap();
        assert_eq!(Bootstrap::decode(&bytes), Ok(rec.clone()));
        assert_eq!(
            Bootstrap::decode(&bytes[..3]),
            Err(BootstrapError::Malformed)
        );
        let mut dup = rec.clone();
        let first = dup.capabilities[0].clone();
        dup.capabilities.push(first).unwrap();
        let bytes = postcard::to_allocvec(&dup).unwrap();
        assert_eq!(Bootstrap::decode(&bytes), Err(BootstrapError::BadSlot(4)));
        // A kept descriptor may not take a capability's slot either.
        let mut kept = rec.clone();
        kept.kept
            .push(Kept {
                slot: 4,
                record: crate::fd_store::KeptRecord::new(1, "conn", b"").unwrap(),
            })
            .unwrap();
        let bytes = postcard::to_allocvec(&kept).unwrap();
        assert_eq!(Bootstrap::decode(&bytes), Err(BootstrapError::BadSlot(4)));
    }

    #[test]
    fn the_largest_record_fits_its_bound() {
        use crate::fd_store::KeptRecord;
        use crate::fd_store::MAX_KEPT_NAME;
        use crate::fd_store::MAX_STATE;
        let name = Name::try_from("a".repeat(MAX_NAME).as_str()).unwrap();
        let mut rec = Bootstrap {
            magic: BOOTSTRAP_MAGIC,
            service: name.clone(),
            log_filter: String::try_from("x".repeat(64).as_str()).unwrap(),
            capabilities: Vec::new(),
            kept: Vec::new(),
        };
        for slot in 0..MAX_CAPABILITIES as i32 {
            rec.capabilities
                .push(Capability {
                    slot: 4 + slot,
                    kind: CapabilityKind::Interrupt(crate::services::intercept::Interrupt::Line(
                        23,
                    )),
                    name: name.clone(),
                    size: u64::MAX,
                    grant: Grant::Doorbells {
                        base: u64::MAX,
                        size: u64::MAX,
                    },
                })
                .unwrap();
        }
        for k in 0..MAX_KEPT as i32 {
            rec.kept
                .push(Kept {
                    slot: 1000 + k,
                    record: KeptRecord::new(
                        u32::MAX,
                        &"a".repeat(MAX_KEPT_NAME),
                        &[0xff; MAX_STATE],
                    )
                    .unwrap(),
                })
                .unwrap();
        }
        let bytes = postcard::to_allocvec(&rec).unwrap();
        assert!(bytes.len() <= MAX_RECORD, "{} bytes", bytes.len());
        assert_eq!(Bootstrap::decode(&bytes), Ok(rec));
    }
}
