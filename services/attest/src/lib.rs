//! The attestation service's logic, apart from any process or channel code: reports and the
//! certificate chain, derived keys bound to the caller, runtime measurement registers and the
//! launch log.
//!
//! The platform (the secure processor) is reached through [`PlatformPort`]; in the service it
//! is the channel the microkernel serves, in tests a fake.
//!
//! What it must never do, and cannot: produce VMPL 0 evidence (the paravisor's own, what a key
//! broker releases secrets to) or a key for a context the microkernel reserves (the VMGS
//! datastore key's). Its reports are at VMPL 1 or above, and the platform channel refuses the
//! rest anyway. The datastore key is sealed by the microkernel itself, with the platform
//! in-process (`microkernel::key_protector`).
#![forbid(unsafe_code)]

use ipc_defs::services::attest::AttestError;
use ipc_defs::services::attest::FieldSelect;
use ipc_defs::services::attest::Request;
use ipc_defs::services::attest::Response;
use ipc_defs::services::attest::MAX_CHUNK;
use ipc_defs::services::attest::RUNTIME_REGISTERS;
use ipc_defs::services::bytes::Bytes;
use ipc_defs::services::platform;
use sha2::Digest;
use sha2::Sha256;
use sha2::Sha384;

/// Runtime events kept (the oldest are dropped; the registers keep everything).
const MAX_EVENTS: usize = 1024;

/// The secure processor, as the service reaches it.
pub trait PlatformPort {
    fn call(&mut self, request: &platform::Request) -> Result<platform::Response, String>;
}

/// One runtime measurement event.
#[derive(Debug, Clone)]
pub struct RuntimeEvent {
    pub client: String,
    pub register: u8,
    pub digest: String,
    pub event: String,
}

/// Counters (no secrets).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub reports: u64,
    pub keys: u64,
    pub extends: u64,
}

/// The service's state.
pub struct Attest {
    chain: Option<Vec<u8>>,
    launch_log: Option<Vec<u8>>,
    registers: [[u8; 48]; RUNTIME_REGISTERS as usize],
    events: Vec<RuntimeEvent>,
    dropped_events: u64,
    pub counters: Counters,
}

impl Attest {
    /// `chain`: ARK, ASK and VCEK (PEM); `launch_log`: the launch log (JSON). Either may be
    /// missing (the requests that need it then answer [`AttestError::Unavailable`]).
    pub fn new(chain: Option<Vec<u8>>, launch_log: Option<Vec<u8>>) -> Attest {
        Attest {
            chain,
            launch_log,
            registers: [[0; 48]; RUNTIME_REGISTERS as usize],
            events: Vec::new(),
            dropped_events: 0,
            counters: Counters::default(),
        }
    }

    /// Answers `request` from `caller` (the client name of the channel it came on).
    pub fn handle(
        &mut self,
        platform: &mut dyn PlatformPort,
        caller: &str,
        request: Request,
    ) -> Response {
        match self.answer(platform, caller, request) {
            Ok(r) => r,
            Err(e) => Response::Error(e),
        }
    }

    fn answer(
        &mut self,
        platform: &mut dyn PlatformPort,
        caller: &str,
        request: Request,
    ) -> Result<Response, AttestError> {
        match request {
            Request::GetReport { report_data, vmpl } => {
                let report = self.report(platform, &report_data, vmpl_for(vmpl))?;
                Ok(Response::Report(report))
            }
            Request::GetExtendedReport { report_data, vmpl } => {
                let report = self.report(platform, &report_data, vmpl_for(vmpl))?;
                let chain = self.chain.as_deref().ok_or(AttestError::Unavailable)?;
                let (total, data) = chunk(chain, 0)?;
                Ok(Response::ExtendedReport {
                    report,
                    chain_len: total,
                    chain: data,
                })
            }
            Request::GetCertChain { offset } => {
                let chain = self.chain.as_deref().ok_or(AttestError::Unavailable)?;
                let (total, data) = chunk(chain, offset)?;
                Ok(Response::Chunk { total, data })
            }
            Request::GetLaunchLog { offset } => {
                let log = self.launch_log.as_deref().ok_or(AttestError::Unavailable)?;
                let (total, data) = chunk(log, offset)?;
                Ok(Response::Chunk { total, data })
            }
            Request::GetRuntimeLog { offset } => {
                let log = self.runtime_log();
                let (total, data) = chunk(&log, offset)?;
                Ok(Response::Chunk { total, data })
            }
            Request::GetDerivedKey { select, context } => {
                // Bound to the caller: no service can ask for another's key.
                let ctx = bound_context(caller, context.as_slice());
                let key = derived_key(platform, select, &ctx)?;
                self.counters.keys += 1;
                Ok(Response::Key(Bytes::new(&key[..]).expect("32 bytes")))
            }
            Request::ExtendRuntime {
                index,
                digest,
                event,
            } => {
                if index >= RUNTIME_REGISTERS {
                    return Err(AttestError::BadRegister(index));
                }
                if digest.len() != 48 {
                    return Err(AttestError::BadDigest);
                }
                let reg = &mut self.registers[index as usize];
                let new: [u8; 48] = Sha384::new()
                    .chain_update(&reg[..])
                    .chain_update(digest.as_slice())
                    .finalize()
                    .into();
                *reg = new;
                if self.events.len() == MAX_EVENTS {
                    self.events.remove(0);
                    self.dropped_events += 1;
                }
                self.events.push(RuntimeEvent {
                    client: caller.to_string(),
                    register: index,
                    digest: hex(digest.as_slice()),
                    event: String::from_utf8_lossy(event.as_slice()).into_owned(),
                });
                self.counters.extends += 1;
                Ok(Response::Extended(Bytes::new(&new).expect("48 bytes")))
            }
        }
    }

    fn report(
        &mut self,
        platform: &mut dyn PlatformPort,
        report_data: &Bytes<{ platform::REPORT_DATA_LEN }>,
        vmpl: u8,
    ) -> Result<Bytes<{ platform::REPORT_LEN }>, AttestError> {
        let mut data = [0u8; platform::REPORT_DATA_LEN];
        // Shorter report data is zero-padded (the hardware takes exactly 64 bytes).
        data[..report_data.len()].copy_from_slice(report_data.as_slice());
        let response = platform
            .call(&platform::Request::Report {
                report_data: Bytes::new(&data).expect("64 bytes"),
                vmpl,
            })
            .map_err(|e| {
                tracing::warn!("platform: {e}");
                AttestError::PlatformUnavailable
            })?;
        match response {
            platform::Response::Report(r) if r.len() == platform::REPORT_LEN => {
                self.counters.reports += 1;
                Ok(r)
            }
            platform::Response::Error(e) => Err(AttestError::Platform(e)),
            _ => Err(AttestError::PlatformUnavailable),
        }
    }

    /// The runtime registers and their events (JSON).
    pub fn runtime_log(&self) -> Vec<u8> {
        let value = serde_json::json!({
            "registers": self.registers.iter().map(|r| hex(r)).collect::<Vec<_>>(),
            "events": self.events.iter().map(|e| serde_json::json!({
                "client": e.client,
                "register": e.register,
                "digest": e.digest,
                "event": e.event,
            })).collect::<Vec<_>>(),
            "dropped-events": self.dropped_events,
        });
        serde_json::to_vec_pretty(&value).unwrap_or_default()
    }
}

/// The VMPL of a report this service asks for: at least [`ipc_defs::services::attest::SERVICE_VMPL`], whoever
/// asks (the microkernel's own VMPL 0 evidence never goes through a service).
fn vmpl_for(asked: u8) -> u8 {
    asked.max(ipc_defs::services::attest::SERVICE_VMPL)
}

/// The platform context for `caller`'s derived key: SHA-256(caller || 0 || context).
fn bound_context(caller: &str, context: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(caller.as_bytes())
        .chain_update([0])
        .chain_update(context)
        .finalize()
        .into()
}

fn derived_key(
    platform: &mut dyn PlatformPort,
    select: FieldSelect,
    context: &[u8; 32],
) -> Result<zeroize::Zeroizing<[u8; 32]>, AttestError> {
    let response = platform
        .call(&platform::Request::DerivedKey {
            select,
            context: Bytes::new(context).expect("32 bytes"),
        })
        .map_err(|e| {
            tracing::warn!("platform: {e}");
            AttestError::PlatformUnavailable
        })?;
    match response {
        platform::Response::Key(k) if k.len() == 32 => {
            let mut key = zeroize::Zeroizing::new([0u8; 32]);
            key.copy_from_slice(k.as_slice());
            Ok(key)
        }
        platform::Response::Error(e) => Err(AttestError::Platform(e)),
        _ => Err(AttestError::PlatformUnavailable),
    }
}

/// A piece of `data` from `offset`, with the whole length.
fn chunk(data: &[u8], offset: u32) -> Result<(u32, Bytes<MAX_CHUNK>), AttestError> {
    let offset = offset as usize;
    if offset > data.len() {
        return Err(AttestError::BadOffset);
    }
    let end = (offset + MAX_CHUNK).min(data.len());
    Ok((
        data.len() as u32,
        Bytes::new(&data[offset..end]).expect("at most a chunk"),
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
