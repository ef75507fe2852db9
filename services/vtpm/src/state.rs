//! Where the TPM's state lives, and the record that makes commands exactly-once.
//!
//! - **Permanent state** ("permall": seeds, NV indices, persistent objects) goes to VMGS file
//!   `TPM_NVRAM`, wrapped with the number and response of the command that produced it, so
//!   that a command whose NV change became durable is answered from the record if it is sent
//!   again after a crash, never run twice. libtpms hands the blob over during the command;
//!   it is held back and written once the response exists, before the response is sent.
//! - **Volatile state** (PCRs, loaded objects, sessions) is checkpointed after every command
//!   into the checkpoint region, a memory region the microkernel owns and keeps across
//!   restarts of this service, together with each client's last command number and response.
//!   Two slots, each with a CRC, written alternately: a crash in the middle of a checkpoint
//!   leaves the previous one.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::Serialize;

use crate::libtpms::NvError;
use crate::libtpms::NvName;

/// A byte blob that postcard encodes as one length-prefixed string (a copy), not as a
/// sequence of separately encoded bytes: the state blobs are tens of KiB and are encoded
/// after every command.
pub mod blob {
    use serde::de::Visitor;
    use serde::Deserializer;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(V)
    }

    /// The same for an optional blob.
    pub mod option {
        use serde::Deserialize;
        use serde::Deserializer;
        use serde::Serialize;
        use serde::Serializer;

        #[derive(Serialize, Deserialize)]
        struct Wrap(#[serde(with = "super")] Vec<u8>);

        pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            v.as_ref().map(|b| Wrap(b.clone())).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

/// One client's last completed command.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastCommand {
    pub seq: u64,
    #[serde(with = "blob")]
    pub response: Vec<u8>,
}

/// The record kept with the permanent state in VMGS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermanentRecord {
    /// The client and command whose execution produced this state, if one did.
    pub command: Option<(String, LastCommand)>,
    #[serde(with = "blob")]
    pub permall: Vec<u8>,
}

/// `"PVTPMNV1"`: the VMGS TPM_NVRAM file is our record, not a bare libtpms blob.
pub const PERMANENT_MAGIC: [u8; 8] = *b"PVTPMNV1";

impl PermanentRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = PERMANENT_MAGIC.to_vec();
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<PermanentRecord> {
        let body = bytes.strip_prefix(&PERMANENT_MAGIC)?;
        postcard::from_bytes(body).ok()
    }
}

/// What a checkpoint holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The engine's volatile state; `None` when the TPM is powered off.
    #[serde(with = "blob::option")]
    pub volatile: Option<Vec<u8>>,
    /// The state TPM2_Shutdown(STATE) saved, for the next TPM2_Startup(STATE).
    #[serde(with = "blob::option")]
    pub savestate: Option<Vec<u8>>,
    /// Each client's last completed command.
    pub last: BTreeMap<String, LastCommand>,
    /// The platform powered the TPM off (a restart of the service keeps it off).
    pub powered_off: bool,
    /// The guest register interface's state.
    pub tis: crate::tis::Tis,
    /// Each vCPU's last register access.
    pub accesses: BTreeMap<u32, LastAccess>,
}

/// A vCPU's last register access: a repeat (same number, address and direction) is answered
/// with `value` instead of being applied again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastAccess {
    pub seq: u64,
    pub address: u64,
    pub write: bool,
    /// The value the read returned (0 for a write).
    pub value: u64,
}

pub use ipc_defs::hosted::checkpoint::CheckpointArea;
pub use ipc_defs::hosted::checkpoint::CheckpointMemory;
pub use ipc_defs::hosted::checkpoint::MemRegion;

/// A permanent store in the process (tests, fuzzing), shared like [`MemRegion`].
#[derive(Clone, Default)]
pub struct MemPermanent(pub std::sync::Arc<std::sync::Mutex<Option<Vec<u8>>>>);

impl PermanentStore for MemPermanent {
    fn read(&mut self) -> Result<Option<Vec<u8>>, String> {
        Ok(self.0.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(bytes.to_vec());
        Ok(())
    }
}

/// Where libtpms' permanent state is kept durably (VMGS through the vmgs channel).
pub trait PermanentStore {
    fn read(&mut self) -> Result<Option<Vec<u8>>, String>;
    fn write(&mut self, bytes: &[u8]) -> Result<(), String>;
}

/// What the engine's NVRAM callbacks see: the permanent state as last loaded or stored,
/// a volatile state to resume from, the savestate; and the permanent blob the running
/// command produced, held until the server writes it with the command's record.
#[derive(Default)]
pub struct EngineNv {
    pub permanent: Option<Vec<u8>>,
    pub pending_permanent: Option<Vec<u8>>,
    pub resume_volatile: Option<Vec<u8>>,
    pub savestate: Option<Vec<u8>>,
}

/// The handle the engine's callbacks hold (shared with the server).
#[derive(Clone, Default)]
pub struct SharedNv(pub std::sync::Arc<std::sync::Mutex<EngineNv>>);

impl SharedNv {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, EngineNv> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl crate::libtpms::NvStore for SharedNv {
    fn load(&mut self, name: NvName) -> Result<Option<Vec<u8>>, NvError> {
        let nv = self.lock();
        Ok(match name {
            NvName::Permanent => nv
                .pending_permanent
                .clone()
                .or_else(|| nv.permanent.clone()),
            NvName::Volatile => nv.resume_volatile.clone(),
            NvName::SaveState => nv.savestate.clone(),
        })
    }

    fn store(&mut self, name: NvName, data: &[u8]) -> Result<(), NvError> {
        let mut nv = self.lock();
        match name {
            NvName::Permanent => nv.pending_permanent = Some(data.to_vec()),
            NvName::Volatile => nv.resume_volatile = Some(data.to_vec()),
            NvName::SaveState => nv.savestate = Some(data.to_vec()),
        }
        Ok(())
    }

    fn delete(&mut self, name: NvName) -> Result<(), NvError> {
        let mut nv = self.lock();
        match name {
            NvName::Permanent => {
                nv.permanent = None;
                nv.pending_permanent = None;
            }
            NvName::Volatile => nv.resume_volatile = None,
            NvName::SaveState => nv.savestate = None,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_records_round_trip_and_bare_blobs_are_not_records() {
        let r = PermanentRecord {
            command: Some((
                "gw".into(),
                LastCommand {
                    seq: 7,
                    response: vec![1, 2],
                },
            )),
            permall: vec![9; 50],
        };
        assert_eq!(PermanentRecord::decode(&r.encode()), Some(r));
        assert_eq!(PermanentRecord::decode(b"garbage"), None);
    }
}
