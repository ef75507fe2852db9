//! The vTPM's attestation binding, as OpenHCL makes it: the TPM's keys are tied to an
//! SEV-SNP report, so that a remote verifier who checks the report can trust quotes the
//! TPM signs.
//!
//! - An attestation key (AK, restricted RSA-2048 signing key) at [`AK_HANDLE`], a primary
//!   key of the endorsement hierarchy made persistent (created on the first start), and the
//!   endorsement key (EK, TCG template L-1), derived again at each start and not persisted
//!   (its usual handle [`EK_HANDLE`] stays the guest's). Both come from the endorsement
//!   seed: the same keys for the TPM's life.
//! - Runtime claims ([`claims_json`]): both public keys as JWKs and a few facts about the
//!   TPM, as compact JSON with a fixed key order.
//! - A report from the attest service whose `REPORT_DATA` is the claims' SHA-256,
//!   zero-padded to 64 bytes. Report and claims are written, exactly as they are, to the
//!   platform NV indices [`REPORT_INDEX`] and [`CLAIMS_INDEX`]; the guest reads them with
//!   `tpm2_nvread 0x01400001` and `tpm2_nvread 0x01400002`.
//!
//! A verifier checks the report (chain, signature, measurement), checks that the claims hash
//! to its report data, takes the AK from the claims, and checks quotes with it.
//!
//! Every command goes through [`Tpm::own_command`], the path guest commands take: numbered,
//! stored in VMGS before it is answered, checkpointed. The binding runs once per start of
//! the service ([`bind`]); it never blocks the TPM: if the report cannot be had, or the guest
//! has disabled the platform hierarchy, it says why and the TPM serves without a binding.
//!
//! Nothing here trusts the integrity of the NV indices: they are only the transport. The
//! report's signature covers the claims' hash, so altered evidence fails verification.

use base64::Engine as _;
use ipc_defs::services::attest::REPORT_DATA_LEN;
use ipc_defs::services::attest::REPORT_LEN;
use ipc_defs::services::vtpm::Platform;
use ipc_defs::services::vtpm::Response;
use ipc_defs::services::vtpm::VtpmError;
use serde::Serialize;
use sha2::Digest;
use sha2::Sha256;

use crate::server::Tpm;
use crate::state::CheckpointMemory;
use crate::state::PermanentStore;
use crate::tpm2;
use crate::tpm2::alg;
use crate::tpm2::CommandCode;
use crate::tpm2::Hierarchy;
use crate::tpm2::NvAttributes;
use crate::tpm2::NvIndex;
use crate::tpm2::NvPublic;
use crate::tpm2::ObjectAttributes;
use crate::tpm2::Persistent;
use crate::tpm2::Public;
use crate::tpm2::ResponseCode;
use crate::tpm2::ResponseError;
use crate::tpm2::RsaPublic;
use crate::tpm2::RsaScheme;
use crate::tpm2::StartupClear;
use crate::tpm2::SymmetricDef;

/// The attestation key's persistent handle (OpenHCL's).
pub const AK_HANDLE: Persistent = Persistent(0x8100_0003);
/// The RSA EK's persistent handle (TCG EK Credential Profile: the RSA 2048 EK).
pub const EK_HANDLE: Persistent = Persistent(0x8101_0001);
/// The attestation report, raw ([`REPORT_LEN`] bytes).
pub const REPORT_INDEX: NvIndex = NvIndex(0x0140_0001);
/// The runtime claims (JSON) whose SHA-256 is the report's data.
pub const CLAIMS_INDEX: NvIndex = NvIndex(0x0140_0002);
/// The largest NV index libtpms defines (its `MAX_NV_INDEX_SIZE`): the claims must fit.
pub const MAX_NV_INDEX_SIZE: usize = 2048;
/// Bytes per TPM2_NV_Write if the TPM does not say (libtpms' `MAX_NV_BUFFER_SIZE`).
const DEFAULT_NV_BUFFER: u32 = 1024;
/// Where an SNP report carries its `REPORT_DATA`.
const REPORT_DATA_OFFSET: usize = 0x50;
/// The name the binding's keys have as JWKs (OpenHCL's, which verifiers look for).
const AK_KID: &str = "HCLAkPub";
const EK_KID: &str = "HCLEkPub";

/// The EK's policy: `TPM2_PolicySecret(TPM_RH_ENDORSEMENT)` (TCG EK Credential Profile,
/// template L-1).
const EK_AUTH_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xB3, 0xF8, 0x1A, 0x90, 0xCC, 0x8D, 0x46, 0xA5, 0xD7, 0x24,
    0xFD, 0x52, 0xD7, 0x6E, 0x06, 0x52, 0x0B, 0x64, 0xF2, 0xA1, 0xDA, 0x1B, 0x33, 0x14, 0x69, 0xAA,
];

/// OpenHCL's AK (its `ak_pub_template`): a restricted RSA-2048 signing key (RSASSA with
/// SHA-256) that cannot leave the TPM, usable without a policy and exempt from
/// dictionary-attack lockout; `unique` zero-filled, as OpenHCL's.
pub fn ak_template() -> RsaPublic {
    RsaPublic {
        name_alg: alg::SHA256,
        attributes: ObjectAttributes(
            ObjectAttributes::FIXED_TPM
                | ObjectAttributes::FIXED_PARENT
                | ObjectAttributes::SENSITIVE_DATA_ORIGIN
                | ObjectAttributes::USER_WITH_AUTH
                | ObjectAttributes::NO_DA
                | ObjectAttributes::RESTRICTED
                | ObjectAttributes::SIGN,
        ),
        auth_policy: Vec::new(),
        symmetric: None,
        scheme: RsaScheme::Rsassa(alg::SHA256),
        key_bits: 2048,
        exponent: 0,
        modulus: vec![0; 256],
    }
}

/// The TCG EK Credential Profile's template L-1: RSA-2048, AES-128-CFB for its children,
/// the standard policy. The same key `tpm2_createek -G rsa` makes.
pub fn ek_template() -> RsaPublic {
    RsaPublic {
        name_alg: alg::SHA256,
        attributes: ObjectAttributes(
            ObjectAttributes::FIXED_TPM
                | ObjectAttributes::FIXED_PARENT
                | ObjectAttributes::SENSITIVE_DATA_ORIGIN
                | ObjectAttributes::ADMIN_WITH_POLICY
                | ObjectAttributes::RESTRICTED
                | ObjectAttributes::DECRYPT,
        ),
        auth_policy: EK_AUTH_POLICY.to_vec(),
        symmetric: Some(SymmetricDef {
            algorithm: alg::AES,
            key_bits: 128,
            mode: alg::CFB,
        }),
        scheme: RsaScheme::Null,
        key_bits: 2048,
        exponent: 0,
        modulus: vec![0; 256],
    }
}

/// The evidence indices' definition: written only by the platform, readable by anyone
/// (empty authorization value, owner, platform), no lockout, gone only with the platform's
/// consent (TPM2_Clear keeps them). Not `WRITEALL`: the report is longer than one write.
pub fn evidence_index(index: NvIndex, size: u16) -> NvPublic {
    NvPublic {
        index,
        name_alg: alg::SHA256,
        attributes: NvAttributes(
            NvAttributes::PPWRITE
                | NvAttributes::PPREAD
                | NvAttributes::OWNERREAD
                | NvAttributes::AUTHREAD
                | NvAttributes::NO_DA
                | NvAttributes::PLATFORMCREATE,
        ),
        auth_policy: Vec::new(),
        size,
    }
}

/// What the binding needs from outside the TPM.
pub trait Attester {
    /// A report ([`REPORT_LEN`] bytes) signed by the platform over `report_data` (the attest
    /// service's `GetReport`).
    fn report(&mut self, report_data: &[u8; REPORT_DATA_LEN]) -> Result<Vec<u8>, String>;

    /// Called between the binding's slow steps (key generation, the report): the process
    /// answers its supervisor here.
    fn keep_alive(&mut self) {}
}

/// A binding in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bound {
    pub ak: RsaPublic,
    pub ek: RsaPublic,
    /// The keys this start created (none once they exist).
    pub created: Vec<Persistent>,
    /// The claims as written to [`CLAIMS_INDEX`].
    pub claims: Vec<u8>,
    pub claims_sha256: [u8; 32],
    /// The report as written to [`REPORT_INDEX`].
    pub report: Vec<u8>,
}

/// Why there is no binding (the TPM serves on regardless).
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("the TPM is powered off")]
    PoweredOff,
    #[error("the TPM resumed before TPM2_Startup ran: left as it was, for the guest's firmware to start")]
    NotStarted,
    #[error("the platform hierarchy is disabled (phEnable or phEnableNV clear: the guest's firmware turned it off), so the report and claims cannot be written; they stay as the last start left them")]
    PlatformDisabled,
    #[error(
        "{command}: the {hierarchy} hierarchy's authorization is not empty (the guest set it)"
    )]
    AuthorizationSet {
        hierarchy: Hierarchy,
        command: &'static str,
    },
    #[error("{command}: the {hierarchy} hierarchy is disabled (the guest turned it off)")]
    HierarchyDisabled {
        hierarchy: Hierarchy,
        command: &'static str,
    },
    #[error("{command}: {error}")]
    Command {
        command: &'static str,
        error: ResponseError,
    },
    #[error("{command} did not run: {error}")]
    Engine {
        command: &'static str,
        error: VtpmError,
    },
    #[error("no attestation report: {0}")]
    Report(String),
    #[error("the claims are {0} bytes, more than an NV index holds ({MAX_NV_INDEX_SIZE})")]
    ClaimsTooLarge(usize),
}

impl BindError {
    /// The TPM's response code, if the TPM refused a command.
    fn code(&self) -> Option<ResponseCode> {
        match self {
            BindError::Command {
                error: ResponseError::Tpm(rc),
                ..
            } => Some(*rc),
            _ => None,
        }
    }

    /// Names a refusal for what it says about `hierarchy` (its authorization, or its enable).
    fn about(self, hierarchy: Hierarchy) -> BindError {
        if let BindError::Command {
            command,
            error: ResponseError::Tpm(rc),
        } = self
        {
            if rc.is_auth_failure() {
                return BindError::AuthorizationSet { hierarchy, command };
            }
            if rc.is_hierarchy() {
                return BindError::HierarchyDisabled { hierarchy, command };
            }
        }
        self
    }
}

/// Runs one of the binding's commands and parses its response.
fn run<P: PermanentStore, M: CheckpointMemory, T>(
    tpm: &mut Tpm<P, M>,
    code: CommandCode,
    command: &[u8],
    parse: impl FnOnce(&[u8]) -> Result<T, ResponseError>,
) -> Result<T, BindError> {
    let response = tpm
        .own_command(command)
        .map_err(|error| BindError::Engine {
            command: code.name(),
            error,
        })?;
    parse(&response).map_err(|error| BindError::Command {
        command: code.name(),
        error,
    })
}

/// Makes sure the TPM holds its AK and EK, and writes fresh evidence for them: the claims,
/// and a report over their hash from `attester`.
///
/// A TPM that was started (the shipped manifest's `--startup-clear`, or a resume of a
/// started TPM) is bound as it is. A fresh TPM that waits for the guest's firmware is
/// started for the binding and then shut down and reset, so the firmware finds it as it
/// was (OpenHCL, too, provisions its TPM before the firmware runs); a resumed one that
/// waits is left alone (its firmware may be about to resume a saved state).
pub fn bind<P: PermanentStore, M: CheckpointMemory>(
    tpm: &mut Tpm<P, M>,
    attester: &mut dyn Attester,
) -> Result<Bound, BindError> {
    if !tpm.is_powered() {
        return Err(BindError::PoweredOff);
    }
    match hierarchies(tpm) {
        Ok(flags) => bind_started(tpm, attester, flags),
        Err(e) if e.code() == Some(ResponseCode::INITIALIZE) => {
            if tpm.continued() {
                return Err(BindError::NotStarted);
            }
            run(
                tpm,
                CommandCode::Startup,
                &tpm2::startup_clear(),
                tpm2::parse_done,
            )?;
            let bound = hierarchies(tpm).and_then(|flags| bind_started(tpm, attester, flags));
            let reset = shut_down_and_reset(tpm);
            let bound = bound?;
            reset?;
            Ok(bound)
        }
        Err(e) => Err(e),
    }
}

/// The hierarchies' enables, or `TPM_RC_INITIALIZE` if the TPM has not been started.
fn hierarchies<P: PermanentStore, M: CheckpointMemory>(
    tpm: &mut Tpm<P, M>,
) -> Result<StartupClear, BindError> {
    run(
        tpm,
        CommandCode::GetCapability,
        &tpm2::get_tpm_property(tpm2::PT_STARTUP_CLEAR),
        |r| {
            tpm2::parse_tpm_property(r, tpm2::PT_STARTUP_CLEAR)?
                .map(StartupClear)
                .ok_or(ResponseError::Malformed("no TPM_PT_STARTUP_CLEAR"))
        },
    )
}

/// TPM2_Shutdown(CLEAR) and a platform reset: the TPM waits for TPM2_Startup again, and
/// its next start is an orderly one.
fn shut_down_and_reset<P: PermanentStore, M: CheckpointMemory>(
    tpm: &mut Tpm<P, M>,
) -> Result<(), BindError> {
    run(
        tpm,
        CommandCode::Shutdown,
        &tpm2::shutdown_clear(),
        tpm2::parse_done,
    )?;
    match tpm.own_signal(Platform::Reset) {
        Response::Done => Ok(()),
        Response::Error(error) => Err(BindError::Engine {
            command: "platform reset",
            error,
        }),
        _ => Err(BindError::Engine {
            command: "platform reset",
            error: VtpmError::Engine(0),
        }),
    }
}

fn bind_started<P: PermanentStore, M: CheckpointMemory>(
    tpm: &mut Tpm<P, M>,
    attester: &mut dyn Attester,
    flags: StartupClear,
) -> Result<Bound, BindError> {
    let mut created = Vec::new();
    attester.keep_alive();
    let ak = ensure_key(tpm, AK_HANDLE, &ak_template(), &mut created)?;
    attester.keep_alive();
    let ek = derive_key(tpm, &ek_template())?;
    attester.keep_alive();
    let claims = claims_json(&ak, &ek);
    if claims.len() > MAX_NV_INDEX_SIZE {
        return Err(BindError::ClaimsTooLarge(claims.len()));
    }
    let claims_sha256: [u8; 32] = Sha256::digest(&claims).into();
    if !(flags.ph_enable() && flags.ph_enable_nv()) {
        return Err(BindError::PlatformDisabled);
    }
    let mut report_data = [0u8; REPORT_DATA_LEN];
    report_data[..claims_sha256.len()].copy_from_slice(&claims_sha256);
    let report = match attester
        .report(&report_data)
        .and_then(|r| check_report(r, &report_data))
    {
        Ok(r) => r,
        Err(why) => {
            // A new launch must not show the last launch's report as its own. A resumed
            // service keeps what this launch wrote.
            if !tpm.continued() {
                if let Err(e) = remove_evidence(tpm) {
                    tracing::warn!("the last launch's report and claims could not be removed: {e}");
                }
            }
            return Err(BindError::Report(why));
        }
    };
    attester.keep_alive();
    let chunk = nv_buffer(tpm)?;
    write_evidence(tpm, CLAIMS_INDEX, &claims, chunk)?;
    write_evidence(tpm, REPORT_INDEX, &report, chunk)?;
    Ok(Bound {
        ak,
        ek,
        created,
        claims,
        claims_sha256,
        report,
    })
}

/// The report as it must be: [`REPORT_LEN`] bytes carrying our report data.
fn check_report(report: Vec<u8>, report_data: &[u8; REPORT_DATA_LEN]) -> Result<Vec<u8>, String> {
    if report.len() != REPORT_LEN {
        return Err(format!(
            "the report is {} bytes, not {REPORT_LEN}",
            report.len()
        ));
    }
    if report.get(REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + REPORT_DATA_LEN)
        != Some(&report_data[..])
    {
        return Err("the report does not carry the claims' hash as its report data".into());
    }
    Ok(report)
}

/// The key at `handle`: the one there if it was made from `template`, else a new primary
/// key of the endorsement hierarchy made persistent there (a key of another kind is
/// evicted first: the handle is the paravisor's).
fn ensure_key<P: PermanentStore, M: CheckpointMemory>(
    tpm: &mut Tpm<P, M>,
    handle: Persistent,
    template: &RsaPublic,
    created: &mut Vec<Persistent>,
) -> Result<RsaPublic, BindError> {
    match run(
        tpm,
        CommandCode::ReadPublic,
        &tpm2::read_public(handle),
        tpm2::parse_read_public,
    ) {
        Ok(Public::Rsa(key)) if key.made_from(template) => return Ok(key),
        Ok(other) => {
            let what = match other {
                Public::Rsa(_) => "an RSA key of another template".to_string(),
                Public::Other { type_alg } => format!("a key of type {type_alg:#06x}"),
            };
            tracing::warn!("{handle} holds {what}, not the paravisor's key: replacing it");
            run(
                tpm,
                CommandCode::EvictControl,
                &tpm2::evict_control(handle.0, handle),
                tpm2::parse_done,
            )
            .map_err(|e| e.about(Hierarchy::Owner))?;
        }
        Err(e) if e.code().is_some_and(|rc| rc.is_handle()) => {}
        Err(e) => return Err(e),
    }
    let (transient, public) = create_primary(tpm, template)?;
    let persisted = run(
        tpm,
        CommandCode::EvictControl,
        &tpm2::evict_control(transient.0, handle),
        tpm2::parse_done,
    )
    .map_err(|e| e.about(Hierarchy::Owner));
    // The loaded copy goes either way: it would hold one of the TPM's few object slots.
    let flushed = run(
        tpm,
        CommandCode::FlushContext,
        &tpm2::flush_context(transient),
        tpm2::parse_done,
    );
    persisted?;
    flushed?;
    let key = match public {
        Public::Rsa(key) if key.made_from(template) => key,
        _ => {
            return Err(BindError::Command {
                command: CommandCode::CreatePrimary.name(),
                error: ResponseError::Malformed("the new key is not of its template"),
            })
        }
    };
    tracing::info!("created the key at {handle} and made it persistent");
    created.push(handle);
    Ok(key)
}

/// Whether this launch's binding is in place: the AK and both evidence indices exist. On a
/// restart of the service within a launch ([`Tpm::continued`]) the report written at the
/// launch's first start still describes it, so the restart need not make a new one (the
/// restart's latency stays that of the TPM alone).
pub fn in_place<P: PermanentStore, M: CheckpointMemory>(tpm: &mut Tpm<P, M>) -> bool {
    let ak = run(
        tpm,
        CommandCode::ReadPublic,
        &tpm2::read_public(AK_HANDLE),
        tpm2::parse_read_public,
    );
    matches!(ak, Ok(Public::Rsa(ref k)) if k.made_from(&ak_template()))
        && [REPORT_INDEX, CLAIMS_INDEX].into_iter().all(|index| {
            run(
                tpm,
                CommandCode::NvReadPublic,
                &tpm2::nv_read_public(index),
                tpm2::parse_nv_read_public,
            )
            .is_ok()
        })
}

/// TPM2_CreatePrimary of `template` in the endorsement hierarchy: the loaded key and its
/// public part.
fn create_primary<P: PermanentStore, M: CheckpointMemory>(
    tpm: &mut Tpm<P, M>,
    template: &RsaPublic,
) -> Result<(tpm2::Transient, Public), BindError> {
    run(
        tpm,
        CommandCode::CreatePrimary,
        &tpm2::create_primary(Hierarchy::Endorsement, template),
        tpm2::parse_create_primary,
    )
    .map_err(|e| e.about(Hierarchy::Endorsement))
}

/// The public part of the primary key `template` gives in the endorsement hierarchy, not
/// kept: the EK is derived again at each start rather than persisted, so that its usual
/// handle ([`EK_HANDLE`]) stays free for the guest's own provisioning (`tpm2_createek -c
/// 0x81010001`, `tpm2_evictcontrol ... 0x81010001` work as on a fresh TPM). The endorsement
/// seed makes it the same key each time, the one `tpm2_createek` makes.
fn derive_key<P: PermanentStore, M: CheckpointMemory>(
    tpm: &mut Tpm<P, M>,
    template: &RsaPublic,
) -> Result<RsaPublic, BindError> {
    let (transient, public) = create_primary(tpm, template)?;
    run(
        tpm,
        CommandCode::FlushContext,
        &tpm2::flush_context(transient),
        tpm2::parse_done,
    )?;
    match public {
        Public::Rsa(key) if key.made_from(template) => Ok(key),
        _ => Err(BindError::Command {
            command: CommandCode::CreatePrimary.name(),
            error: ResponseError::Malformed("the derived key is not of its template"),
        }),
    }
}

/// Bytes per TPM2_NV_Write: what the TPM says (`TPM_PT_NV_BUFFER_MAX`), within reason.
fn nv_buffer<P: PermanentStore, M: CheckpointMemory>(
    tpm: &mut Tpm<P, M>,
) -> Result<usize, BindError> {
    let max = run(
        tpm,
        CommandCode::GetCapability,
        &tpm2::get_tpm_property(tpm2::PT_NV_BUFFER_MAX),
        |r| tpm2::parse_tpm_property(r, tpm2::PT_NV_BUFFER_MAX),
    )?
    .unwrap_or(DEFAULT_NV_BUFFER);
    Ok(max.clamp(64, MAX_NV_INDEX_SIZE as u32) as usize)
}

/// Writes `data` to the platform index `index`, defined exactly as long as `data` (an
/// index of another size or definition is undefined first).
fn write_evidence<P: PermanentStore, M: CheckpointMemory>(
    tpm: &mut Tpm<P, M>,
    index: NvIndex,
    data: &[u8],
    chunk: usize,
) -> Result<(), BindError> {
    let size = u16::try_from(data.len())
        .ok()
        .filter(|s| usize::from(*s) <= MAX_NV_INDEX_SIZE)
        .ok_or(BindError::ClaimsTooLarge(data.len()))?;
    let wanted = evidence_index(index, size);
    let define = match run(
        tpm,
        CommandCode::NvReadPublic,
        &tpm2::nv_read_public(index),
        tpm2::parse_nv_read_public,
    ) {
        Ok(existing) if existing.defined_as(&wanted) => false,
        Ok(_) => {
            undefine(tpm, index)?;
            true
        }
        Err(e) if e.code().is_some_and(|rc| rc.is_handle()) => true,
        Err(e) => return Err(e),
    };
    if define {
        run(
            tpm,
            CommandCode::NvDefineSpace,
            &tpm2::nv_define_space(Hierarchy::Platform, &wanted),
            tpm2::parse_done,
        )
        .map_err(|e| e.about(Hierarchy::Platform))?;
    }
    for (i, piece) in data.chunks(chunk.max(1)).enumerate() {
        // Below MAX_NV_INDEX_SIZE, checked above.
        let offset = (i * chunk) as u16;
        run(
            tpm,
            CommandCode::NvWrite,
            &tpm2::nv_write(Hierarchy::Platform, index, offset, piece),
            tpm2::parse_done,
        )
        .map_err(|e| e.about(Hierarchy::Platform))?;
    }
    Ok(())
}

fn undefine<P: PermanentStore, M: CheckpointMemory>(
    tpm: &mut Tpm<P, M>,
    index: NvIndex,
) -> Result<(), BindError> {
    run(
        tpm,
        CommandCode::NvUndefineSpace,
        &tpm2::nv_undefine_space(Hierarchy::Platform, index),
        tpm2::parse_done,
    )
    .map_err(|e| e.about(Hierarchy::Platform))
}

/// Undefines the report and claims indices, if they exist.
fn remove_evidence<P: PermanentStore, M: CheckpointMemory>(
    tpm: &mut Tpm<P, M>,
) -> Result<(), BindError> {
    for index in [REPORT_INDEX, CLAIMS_INDEX] {
        match run(
            tpm,
            CommandCode::NvReadPublic,
            &tpm2::nv_read_public(index),
            tpm2::parse_nv_read_public,
        ) {
            Ok(_) => undefine(tpm, index)?,
            Err(e) if e.code().is_some_and(|rc| rc.is_handle()) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The runtime claims, in OpenHCL's shape.
#[derive(Serialize)]
struct Claims {
    keys: [Jwk; 2],
    #[serde(rename = "vm-configuration")]
    vm_configuration: VmConfiguration,
}

/// An RSA public key as a JSON Web Key (RFC 7517/7518): big-endian integers, base64url
/// without padding.
#[derive(Serialize)]
struct Jwk {
    kid: &'static str,
    key_ops: [&'static str; 1],
    kty: &'static str,
    e: String,
    n: String,
}

/// The facts this service knows about the VM's TPM. OpenHCL's claims also carry
/// `console-enabled`, `secure-boot`, `vmUniqueId` and `current-time`; the vTPM knows none
/// of them (and a time would make the claims differ at every start for no verifier's
/// benefit: the report is new at every start anyway).
#[derive(Serialize)]
#[serde(rename_all = "kebab-case")]
struct VmConfiguration {
    /// The VM has this TPM.
    tpm_enabled: bool,
    /// Its state outlives the VM (it is kept in the VMGS file).
    tpm_persisted: bool,
}

fn jwk(kid: &'static str, op: &'static str, key: &RsaPublic) -> Jwk {
    let b64 = |bytes: &[u8]| {
        // Integers in a JWK have no leading zero bytes.
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[start..])
    };
    Jwk {
        kid,
        key_ops: [op],
        kty: "RSA",
        e: b64(&key.exponent_value().to_be_bytes()),
        n: b64(&key.modulus),
    }
}

/// The claims as compact JSON, keys in a fixed order, so that the same keys give the same
/// bytes (and the same hash) at every start:
/// `{"keys":[{"kid":"HCLAkPub","key_ops":["sign"],"kty":"RSA","e":..,"n":..},
/// {"kid":"HCLEkPub","key_ops":["encrypt"],..}],"vm-configuration":{"tpm-enabled":true,
/// "tpm-persisted":true}}`.
pub fn claims_json(ak: &RsaPublic, ek: &RsaPublic) -> Vec<u8> {
    let claims = Claims {
        keys: [jwk(AK_KID, "sign", ak), jwk(EK_KID, "encrypt", ek)],
        vm_configuration: VmConfiguration {
            tpm_enabled: true,
            tpm_persisted: true,
        },
    };
    // Strings, booleans and arrays only: serialisation cannot fail.
    serde_json::to_vec(&claims).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_openhcl_shaped_compact_and_in_a_fixed_order() {
        let mut ak = ak_template();
        ak.modulus = vec![0xFB; 256];
        let mut ek = ek_template();
        ek.modulus = vec![0x00, 0x01, 0x02];
        let json = String::from_utf8(claims_json(&ak, &ek)).unwrap();
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([0xFB; 256]);
        assert_eq!(
            json,
            format!(
                r#"{{"keys":[{{"kid":"HCLAkPub","key_ops":["sign"],"kty":"RSA","e":"AQAB","n":"{n}"}},{{"kid":"HCLEkPub","key_ops":["encrypt"],"kty":"RSA","e":"AQAB","n":"AQI"}}],"vm-configuration":{{"tpm-enabled":true,"tpm-persisted":true}}}}"#
            )
        );
        assert!(n.contains('_'), "base64url, not base64: {n}");
    }

    #[test]
    fn a_report_must_be_whole_and_over_our_data() {
        let data = [7u8; REPORT_DATA_LEN];
        let mut report = vec![0u8; REPORT_LEN];
        report[REPORT_DATA_OFFSET..REPORT_DATA_OFFSET + REPORT_DATA_LEN].copy_from_slice(&data);
        assert!(check_report(report.clone(), &data).is_ok());
        assert!(check_report(report[..REPORT_LEN - 1].to_vec(), &data).is_err());
        report[REPORT_DATA_OFFSET] ^= 1;
        assert!(check_report(report, &data).is_err());
    }
}
