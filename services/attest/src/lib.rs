//! The attestation service's logic, apart from any process or channel code: reports and the
//! certificate chain, derived keys bound to the caller, runtime measurement registers, the
//! launch log, and sealing of the VMGS datastore key.
//!
//! The platform (the secure processor) is reached through [`PlatformPort`]; in the service it
//! is the channel the microkernel serves, in tests a fake.
//!
//! Sealing: the wrapping key is `KDF(platform key, "VMGSKEY", "ISOHWKEY")` (SP 800-108 counter
//! mode, HMAC-SHA-256, as OpenHCL names its hardware key protector), where the platform key is
//! the platform's derived key for the selected launch facts and a context that only the
//! `paravisor` client's sealing uses. The datastore key is wrapped with AES-256-GCM under a
//! random nonce, the blob's clear header (what it was sealed to) as associated data.
#![forbid(unsafe_code)]

use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use aes_gcm::Nonce;
use aes_gcm::Tag;
use hmac::Mac;
use ipc_defs::services::attest::AttestError;
use ipc_defs::services::attest::FieldSelect;
use ipc_defs::services::attest::Request;
use ipc_defs::services::attest::Response;
use ipc_defs::services::attest::SealedKey;
use ipc_defs::services::attest::KEY_LEN;
use ipc_defs::services::attest::MAX_CHUNK;
use ipc_defs::services::attest::PARAVISOR_CLIENT;
use ipc_defs::services::attest::RUNTIME_REGISTERS;
use ipc_defs::services::bytes::Bytes;
use ipc_defs::services::platform;
use sha2::Digest;
use sha2::Sha256;
use sha2::Sha384;
use zeroize::Zeroizing;

/// Where the measurement sits in a report.
const MEASUREMENT_AT: usize = 0x90;
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
    pub seals: u64,
    pub unseals_failed: u64,
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
                let report = self.report(platform, &report_data, vmpl_for(caller, vmpl))?;
                Ok(Response::Report(report))
            }
            Request::GetExtendedReport { report_data, vmpl } => {
                let report = self.report(platform, &report_data, vmpl_for(caller, vmpl))?;
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
            Request::Seal { key, select } => {
                if caller != PARAVISOR_CLIENT {
                    return Err(AttestError::NotPermitted);
                }
                let key: [u8; KEY_LEN] =
                    key.as_slice().try_into().map_err(|_| AttestError::BadKey)?;
                let sealed = self.seal(platform, &Zeroizing::new(key), select)?;
                self.counters.seals += 1;
                Ok(Response::Sealed(
                    Bytes::new(&sealed.to_bytes()).expect("fits"),
                ))
            }
            Request::Unseal { sealed } => {
                if caller != PARAVISOR_CLIENT {
                    return Err(AttestError::NotPermitted);
                }
                let sealed = SealedKey::parse(sealed.as_slice()).map_err(|_| {
                    self.counters.unseals_failed += 1;
                    AttestError::UnsealFailed
                })?;
                let key = unseal(platform, &sealed).inspect_err(|_| {
                    self.counters.unseals_failed += 1;
                })?;
                Ok(Response::Key(Bytes::new(&key[..]).expect("32 bytes")))
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

    fn seal(
        &mut self,
        platform: &mut dyn PlatformPort,
        key: &[u8; KEY_LEN],
        select: FieldSelect,
    ) -> Result<SealedKey, AttestError> {
        // The measurement goes into the clear header (so that a refusal can name it): this
        // launch's, from a report of our own.
        let report = self.report(platform, &Bytes::new(&[0; 64]).expect("64 bytes"), 0)?;
        let mut measurement = [0u8; 48];
        measurement.copy_from_slice(&report.as_slice()[MEASUREMENT_AT..MEASUREMENT_AT + 48]);
        let mut nonce = [0u8; 12];
        getrandom::getrandom(&mut nonce).map_err(|_| AttestError::PlatformUnavailable)?;
        let mut sealed = SealedKey {
            select,
            measurement,
            nonce,
            wrapped: [0; KEY_LEN],
            tag: [0; 16],
        };
        let wrapping = wrapping_key(platform, select)?;
        let cipher = Aes256Gcm::new(&(*wrapping).into());
        let nonce: Nonce<_> = sealed.nonce.into();
        sealed.wrapped = *key;
        let tag: Tag = cipher
            .encrypt_inout_detached(&nonce, &sealed.header(), (&mut sealed.wrapped[..]).into())
            .map_err(|_| AttestError::PlatformUnavailable)?;
        sealed.tag = tag.into();
        Ok(sealed)
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

/// The VMPL a report for `caller` carries: what the microkernel asks for; for any other
/// client, at least [`attest::SERVICE_VMPL`].
fn vmpl_for(caller: &str, asked: u8) -> u8 {
    if caller == PARAVISOR_CLIENT {
        asked
    } else {
        asked.max(ipc_defs::services::attest::SERVICE_VMPL)
    }
}

/// Opens a sealed key under this platform and launch.
fn unseal(
    platform: &mut dyn PlatformPort,
    sealed: &SealedKey,
) -> Result<Zeroizing<[u8; KEY_LEN]>, AttestError> {
    let wrapping = wrapping_key(platform, sealed.select)?;
    let cipher = Aes256Gcm::new(&(*wrapping).into());
    let nonce: Nonce<_> = sealed.nonce.into();
    let tag: Tag = sealed.tag.into();
    let mut key = Zeroizing::new(sealed.wrapped);
    cipher
        .decrypt_inout_detached(&nonce, &sealed.header(), (&mut key[..]).into(), &tag)
        .map_err(|_| AttestError::UnsealFailed)?;
    Ok(key)
}

/// The key that wraps the datastore key for `select`.
fn wrapping_key(
    platform: &mut dyn PlatformPort,
    select: FieldSelect,
) -> Result<Zeroizing<[u8; 32]>, AttestError> {
    let ctx = bound_context(PARAVISOR_CLIENT, b"VMGS datastore key");
    let platform_key = derived_key(platform, select, &ctx)?;
    Ok(Zeroizing::new(kdf_sp800_108(
        &platform_key[..],
        b"VMGSKEY",
        b"ISOHWKEY",
    )))
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
) -> Result<Zeroizing<[u8; 32]>, AttestError> {
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
            let mut key = Zeroizing::new([0u8; 32]);
            key.copy_from_slice(k.as_slice());
            Ok(key)
        }
        platform::Response::Error(e) => Err(AttestError::Platform(e)),
        _ => Err(AttestError::PlatformUnavailable),
    }
}

/// SP 800-108 KDF in counter mode with HMAC-SHA-256, one 256-bit block.
pub fn kdf_sp800_108(key: &[u8], label: &[u8], context: &[u8]) -> [u8; 32] {
    let mut mac =
        <hmac::Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(&1u32.to_be_bytes());
    mac.update(label);
    mac.update(&[0]);
    mac.update(context);
    mac.update(&256u32.to_be_bytes());
    mac.finalize().into_bytes().into()
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
