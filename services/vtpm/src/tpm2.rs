//! The few TPM 2.0 commands the service sends its own TPM (start-up and the attestation
//! binding): typed builders, and response parsers that check every length against the bytes
//! they were given (a response is never indexed unchecked; a short or inconsistent one is a
//! [`ResponseError::Malformed`], never a panic). Only the wire format (TPM 2.0 Library,
//! Part 2 structures, Part 3 commands) lives here, no policy and no TPM state.
//!
//! Authorization is always a password session with an empty password (`TPM_RS_PW`): the
//! service only uses hierarchies whose authorization it expects to be empty, and a TPM that
//! answers `TPM_RC_AUTH_FAIL` or `TPM_RC_BAD_AUTH` says that someone (the guest) set one.

use core::fmt;

/// `TPM_ST_NO_SESSIONS`.
pub const ST_NO_SESSIONS: u16 = 0x8001;
/// `TPM_ST_SESSIONS`.
pub const ST_SESSIONS: u16 = 0x8002;
/// Size of a command or response header (tag, size, code).
const HEADER: usize = 10;
/// One password session in a command's authorization area: `TPM_RS_PW` (0x40000009), an
/// empty nonce, no attributes, an empty password.
const PASSWORD_SESSION: [u8; 9] = [0x40, 0, 0, 0x09, 0, 0, 0, 0, 0];

/// Algorithm identifiers (`TPM_ALG_ID`) the binding uses.
pub mod alg {
    pub const RSA: u16 = 0x0001;
    pub const AES: u16 = 0x0006;
    pub const SHA256: u16 = 0x000B;
    pub const NULL: u16 = 0x0010;
    pub const RSASSA: u16 = 0x0014;
    pub const RSAES: u16 = 0x0015;
    pub const RSAPSS: u16 = 0x0016;
    pub const OAEP: u16 = 0x0017;
    pub const CFB: u16 = 0x0043;
}

/// Command codes (`TPM_CC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum CommandCode {
    NvUndefineSpace = 0x122,
    EvictControl = 0x120,
    NvDefineSpace = 0x12A,
    CreatePrimary = 0x131,
    NvWrite = 0x137,
    Startup = 0x144,
    Shutdown = 0x145,
    NvRead = 0x14E,
    FlushContext = 0x165,
    NvReadPublic = 0x169,
    ReadPublic = 0x173,
    GetCapability = 0x17A,
}

impl CommandCode {
    /// The command's name as Part 3 gives it (for diagnostics).
    pub fn name(self) -> &'static str {
        match self {
            CommandCode::NvUndefineSpace => "TPM2_NV_UndefineSpace",
            CommandCode::EvictControl => "TPM2_EvictControl",
            CommandCode::NvDefineSpace => "TPM2_NV_DefineSpace",
            CommandCode::CreatePrimary => "TPM2_CreatePrimary",
            CommandCode::NvWrite => "TPM2_NV_Write",
            CommandCode::Startup => "TPM2_Startup",
            CommandCode::Shutdown => "TPM2_Shutdown",
            CommandCode::NvRead => "TPM2_NV_Read",
            CommandCode::FlushContext => "TPM2_FlushContext",
            CommandCode::NvReadPublic => "TPM2_NV_ReadPublic",
            CommandCode::ReadPublic => "TPM2_ReadPublic",
            CommandCode::GetCapability => "TPM2_GetCapability",
        }
    }
}

/// A TPM response code (`TPM_RC`), with the questions the binding asks of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseCode(pub u32);

/// Format-1 response codes (bit 7 set): the error number is in bits 0..6, bits 8..11 name
/// the handle, parameter or session it applies to.
const RC_FMT1: u32 = 0x080;

impl ResponseCode {
    pub const SUCCESS: ResponseCode = ResponseCode(0);
    /// `TPM_RC_INITIALIZE`: TPM2_Startup has not run since the TPM was powered on.
    pub const INITIALIZE: ResponseCode = ResponseCode(0x100);

    fn format1_number(self) -> Option<u32> {
        (self.0 & RC_FMT1 != 0).then_some(self.0 & 0x3F)
    }

    /// `TPM_RC_HANDLE` on any handle: for ReadPublic and NV_ReadPublic, nothing is there.
    pub fn is_handle(self) -> bool {
        self.format1_number() == Some(0x0B)
    }

    /// `TPM_RC_HIERARCHY`: the hierarchy is disabled.
    pub fn is_hierarchy(self) -> bool {
        self.format1_number() == Some(0x05)
    }

    /// `TPM_RC_AUTH_FAIL` or `TPM_RC_BAD_AUTH`: the hierarchy's authorization is not empty.
    pub fn is_auth_failure(self) -> bool {
        matches!(self.format1_number(), Some(0x0E) | Some(0x22))
    }

    fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x100 => "TPM_RC_INITIALIZE",
            0x101 => "TPM_RC_FAILURE",
            0x14C => "TPM_RC_NV_DEFINED",
            0x14B => "TPM_RC_NV_SPACE",
            0x149 => "TPM_RC_NV_AUTHORIZATION",
            0x902 => "TPM_RC_OBJECT_MEMORY",
            _ => match self.format1_number()? {
                0x05 => "TPM_RC_HIERARCHY",
                0x0B => "TPM_RC_HANDLE",
                0x0E => "TPM_RC_AUTH_FAIL",
                0x15 => "TPM_RC_SIZE",
                0x22 => "TPM_RC_BAD_AUTH",
                _ => return None,
            },
        })
    }
}

impl fmt::Display for ResponseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({:#x})", self.0),
            None => write!(f, "{:#x}", self.0),
        }
    }
}

/// Why a response gave no answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseError {
    /// The TPM refused the command.
    Tpm(ResponseCode),
    /// The response is not the structure the command returns (what was wrong).
    Malformed(&'static str),
}

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResponseError::Tpm(rc) => write!(f, "TPM response code {rc}"),
            ResponseError::Malformed(what) => write!(f, "malformed response ({what})"),
        }
    }
}

/// A hierarchy's permanent handle, authorized with an empty password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    Owner,
    Endorsement,
    Platform,
}

impl Hierarchy {
    pub fn handle(self) -> u32 {
        match self {
            Hierarchy::Owner => 0x4000_0001,
            Hierarchy::Endorsement => 0x4000_000B,
            Hierarchy::Platform => 0x4000_000C,
        }
    }
}

impl fmt::Display for Hierarchy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hierarchy::Owner => "owner",
            Hierarchy::Endorsement => "endorsement",
            Hierarchy::Platform => "platform",
        })
    }
}

/// A persistent object's handle (`0x81xxxxxx`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Persistent(pub u32);

/// A loaded (transient) object's handle (`0x80xxxxxx`), as TPM2_CreatePrimary returns it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Transient(pub u32);

/// An NV index's handle (`0x01xxxxxx`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NvIndex(pub u32);

/// Handles read as hex (as the TPM specification and the tools write them).
macro_rules! hex_handle {
    ($($t:ident),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#010x})", stringify!($t), self.0)
            }
        }
    )*};
}
hex_handle!(Persistent, Transient, NvIndex);

impl fmt::Display for Persistent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#010x}", self.0)
    }
}

impl fmt::Display for NvIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#010x}", self.0)
    }
}

/// `TPMA_OBJECT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectAttributes(pub u32);

impl ObjectAttributes {
    pub const FIXED_TPM: u32 = 1 << 1;
    pub const FIXED_PARENT: u32 = 1 << 4;
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    pub const NO_DA: u32 = 1 << 10;
    pub const RESTRICTED: u32 = 1 << 16;
    pub const DECRYPT: u32 = 1 << 17;
    pub const SIGN: u32 = 1 << 18;
}

/// `TPMA_NV`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvAttributes(pub u32);

impl NvAttributes {
    pub const PPWRITE: u32 = 1 << 0;
    pub const OWNERWRITE: u32 = 1 << 1;
    pub const AUTHWRITE: u32 = 1 << 2;
    pub const WRITEALL: u32 = 1 << 12;
    pub const PPREAD: u32 = 1 << 16;
    pub const OWNERREAD: u32 = 1 << 17;
    pub const AUTHREAD: u32 = 1 << 18;
    pub const NO_DA: u32 = 1 << 25;
    /// Set by the TPM once the index has been written; never part of a definition.
    pub const WRITTEN: u32 = 1 << 29;
    pub const PLATFORMCREATE: u32 = 1 << 30;

    /// The attributes a definition gives (without what the TPM sets as the index is used).
    pub fn defined(self) -> NvAttributes {
        NvAttributes(self.0 & !Self::WRITTEN)
    }

    pub fn written(self) -> bool {
        self.0 & Self::WRITTEN != 0
    }
}

/// `TPMT_SYM_DEF_OBJECT` of an algorithm other than `TPM_ALG_NULL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SymmetricDef {
    pub algorithm: u16,
    pub key_bits: u16,
    pub mode: u16,
}

/// `TPMT_RSA_SCHEME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RsaScheme {
    Null,
    Rsaes,
    /// With its hash algorithm.
    Rsassa(u16),
    Rsapss(u16),
    Oaep(u16),
}

/// An RSA key's public area (`TPMT_PUBLIC` with `type` `TPM_ALG_RSA`); as a template, its
/// `modulus` is the `unique` field's initial contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RsaPublic {
    pub name_alg: u16,
    pub attributes: ObjectAttributes,
    pub auth_policy: Vec<u8>,
    /// `None` for `TPM_ALG_NULL`.
    pub symmetric: Option<SymmetricDef>,
    pub scheme: RsaScheme,
    pub key_bits: u16,
    /// 0 means the default, 65537.
    pub exponent: u32,
    pub modulus: Vec<u8>,
}

/// A public area: RSA (all the binding uses), or another type (not parsed further).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Public {
    Rsa(RsaPublic),
    Other { type_alg: u16 },
}

impl RsaPublic {
    /// The public exponent (the TPM writes 0 for 65537).
    pub fn exponent_value(&self) -> u32 {
        if self.exponent == 0 {
            65537
        } else {
            self.exponent
        }
    }

    /// Whether this key was made from `template`: every field but the key itself is the
    /// template's, and the modulus is as long as the key size says.
    pub fn made_from(&self, template: &RsaPublic) -> bool {
        self.name_alg == template.name_alg
            && self.attributes == template.attributes
            && self.auth_policy == template.auth_policy
            && self.symmetric == template.symmetric
            && self.scheme == template.scheme
            && self.key_bits == template.key_bits
            && self.exponent_value() == template.exponent_value()
            && self.modulus.len() * 8 == usize::from(self.key_bits)
    }

    /// `TPMT_PUBLIC`.
    fn encode(&self, out: &mut Vec<u8>) {
        put_u16(out, alg::RSA);
        put_u16(out, self.name_alg);
        put_u32(out, self.attributes.0);
        put_tpm2b(out, &self.auth_policy);
        match self.symmetric {
            None => put_u16(out, alg::NULL),
            Some(s) => {
                put_u16(out, s.algorithm);
                put_u16(out, s.key_bits);
                put_u16(out, s.mode);
            }
        }
        match self.scheme {
            RsaScheme::Null => put_u16(out, alg::NULL),
            RsaScheme::Rsaes => put_u16(out, alg::RSAES),
            RsaScheme::Rsassa(h) => {
                put_u16(out, alg::RSASSA);
                put_u16(out, h);
            }
            RsaScheme::Rsapss(h) => {
                put_u16(out, alg::RSAPSS);
                put_u16(out, h);
            }
            RsaScheme::Oaep(h) => {
                put_u16(out, alg::OAEP);
                put_u16(out, h);
            }
        }
        put_u16(out, self.key_bits);
        put_u32(out, self.exponent);
        put_tpm2b(out, &self.modulus);
    }
}

impl Public {
    /// `TPMT_PUBLIC`: the RSA form completely, any other type only as far as its type.
    fn parse(r: &mut Reader<'_>) -> Result<Public, ResponseError> {
        let type_alg = r.u16()?;
        if type_alg != alg::RSA {
            return Ok(Public::Other { type_alg });
        }
        let name_alg = r.u16()?;
        let attributes = ObjectAttributes(r.u32()?);
        let auth_policy = r.tpm2b()?.to_vec();
        let symmetric = match r.u16()? {
            alg::NULL => None,
            algorithm => Some(SymmetricDef {
                algorithm,
                key_bits: r.u16()?,
                mode: r.u16()?,
            }),
        };
        let scheme = match r.u16()? {
            alg::NULL => RsaScheme::Null,
            alg::RSAES => RsaScheme::Rsaes,
            alg::RSASSA => RsaScheme::Rsassa(r.u16()?),
            alg::RSAPSS => RsaScheme::Rsapss(r.u16()?),
            alg::OAEP => RsaScheme::Oaep(r.u16()?),
            _ => return Err(ResponseError::Malformed("unknown RSA scheme")),
        };
        let key_bits = r.u16()?;
        let exponent = r.u32()?;
        let modulus = r.tpm2b()?.to_vec();
        Ok(Public::Rsa(RsaPublic {
            name_alg,
            attributes,
            auth_policy,
            symmetric,
            scheme,
            key_bits,
            exponent,
            modulus,
        }))
    }
}

/// An NV index's public area (`TPMS_NV_PUBLIC`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NvPublic {
    pub index: NvIndex,
    pub name_alg: u16,
    pub attributes: NvAttributes,
    pub auth_policy: Vec<u8>,
    pub size: u16,
}

impl NvPublic {
    fn encode(&self, out: &mut Vec<u8>) {
        put_u32(out, self.index.0);
        put_u16(out, self.name_alg);
        put_u32(out, self.attributes.0);
        put_tpm2b(out, &self.auth_policy);
        put_u16(out, self.size);
    }

    fn parse(r: &mut Reader<'_>) -> Result<NvPublic, ResponseError> {
        Ok(NvPublic {
            index: NvIndex(r.u32()?),
            name_alg: r.u16()?,
            attributes: NvAttributes(r.u32()?),
            auth_policy: r.tpm2b()?.to_vec(),
            size: r.u16()?,
        })
    }

    /// Whether this index is defined as `other` is (the attributes the TPM sets as the index
    /// is used aside).
    pub fn defined_as(&self, other: &NvPublic) -> bool {
        self.index == other.index
            && self.name_alg == other.name_alg
            && self.attributes.defined() == other.attributes.defined()
            && self.auth_policy == other.auth_policy
            && self.size == other.size
    }
}

// ---- Encoding ----------------------------------------------------------------------------

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

/// A `TPM2B_*`: 16-bit size, then the bytes. Callers pass at most a few KiB (the commands'
/// own limits are far below 64 KiB); anything longer is cut at 64 KiB - 1 so that the
/// encoding stays self-consistent (and the TPM refuses it).
fn put_tpm2b(out: &mut Vec<u8>, bytes: &[u8]) {
    debug_assert!(bytes.len() <= usize::from(u16::MAX));
    let bytes = &bytes[..bytes.len().min(usize::from(u16::MAX))];
    put_u16(out, bytes.len() as u16);
    out.extend_from_slice(bytes);
}

/// A command: header, handles, the authorization area (one empty password session per
/// authorized handle, if any), parameters.
fn command(code: CommandCode, handles: &[u32], sessions: usize, params: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(HEADER + 4 * handles.len() + 4 + 9 * sessions + params.len());
    put_u16(
        &mut c,
        if sessions > 0 {
            ST_SESSIONS
        } else {
            ST_NO_SESSIONS
        },
    );
    put_u32(&mut c, 0); // size, below
    put_u32(&mut c, code as u32);
    for h in handles {
        put_u32(&mut c, *h);
    }
    if sessions > 0 {
        put_u32(&mut c, (PASSWORD_SESSION.len() * sessions) as u32);
        for _ in 0..sessions {
            c.extend_from_slice(&PASSWORD_SESSION);
        }
    }
    c.extend_from_slice(params);
    let size = (c.len() as u32).to_be_bytes();
    c[2..6].copy_from_slice(&size);
    c
}

/// `TPM2_Startup(TPM_SU_CLEAR)`.
pub fn startup_clear() -> Vec<u8> {
    command(CommandCode::Startup, &[], 0, &[0, 0])
}

/// `TPM2_Shutdown(TPM_SU_CLEAR)`.
pub fn shutdown_clear() -> Vec<u8> {
    command(CommandCode::Shutdown, &[], 0, &[0, 0])
}

/// `TPM_CAP_TPM_PROPERTIES`.
const CAP_TPM_PROPERTIES: u32 = 6;
/// `TPM_PT_NV_BUFFER_MAX`: the most bytes one TPM2_NV_Write (or Read) carries.
pub const PT_NV_BUFFER_MAX: u32 = 0x100 + 44;
/// `TPM_PT_STARTUP_CLEAR`: the hierarchies' enables ([`StartupClear`]).
pub const PT_STARTUP_CLEAR: u32 = 0x200 + 1;

/// `TPMA_STARTUP_CLEAR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartupClear(pub u32);

impl StartupClear {
    pub fn ph_enable(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn sh_enable(self) -> bool {
        self.0 & 2 != 0
    }
    pub fn eh_enable(self) -> bool {
        self.0 & 4 != 0
    }
    pub fn ph_enable_nv(self) -> bool {
        self.0 & 8 != 0
    }
}

/// `TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES, property, 1)`.
pub fn get_tpm_property(property: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    put_u32(&mut p, CAP_TPM_PROPERTIES);
    put_u32(&mut p, property);
    put_u32(&mut p, 1);
    command(CommandCode::GetCapability, &[], 0, &p)
}

/// The value of `property` in a [`get_tpm_property`] response; `None` if the TPM does not
/// have it (it answers with the next property it has, or none).
pub fn parse_tpm_property(response: &[u8], property: u32) -> Result<Option<u32>, ResponseError> {
    let mut r = response_body(response, ST_NO_SESSIONS)?;
    let _more = r.u8()?;
    if r.u32()? != CAP_TPM_PROPERTIES {
        return Err(ResponseError::Malformed(
            "another capability than asked for",
        ));
    }
    let count = r.u32()?;
    for _ in 0..count {
        let (p, v) = (r.u32()?, r.u32()?);
        if p == property {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

/// `TPM2_ReadPublic(handle)`.
pub fn read_public(handle: Persistent) -> Vec<u8> {
    command(CommandCode::ReadPublic, &[handle.0], 0, &[])
}

/// The object's public area from a [`read_public`] response.
pub fn parse_read_public(response: &[u8]) -> Result<Public, ResponseError> {
    let mut r = response_body(response, ST_NO_SESSIONS)?;
    let mut public = Reader::new(r.tpm2b()?);
    Public::parse(&mut public)
}

/// `TPM2_CreatePrimary(hierarchy)` of `template`, with an empty authorization value and no
/// creation data.
pub fn create_primary(hierarchy: Hierarchy, template: &RsaPublic) -> Vec<u8> {
    let mut p = Vec::with_capacity(512);
    // TPM2B_SENSITIVE_CREATE: empty userAuth and data.
    p.extend_from_slice(&[0, 4, 0, 0, 0, 0]);
    let mut public = Vec::with_capacity(400);
    template.encode(&mut public);
    put_tpm2b(&mut p, &public);
    put_tpm2b(&mut p, &[]); // outsideInfo
    put_u32(&mut p, 0); // creationPCR: no selections
    command(CommandCode::CreatePrimary, &[hierarchy.handle()], 1, &p)
}

/// The new object's handle and public area from a [`create_primary`] response.
pub fn parse_create_primary(response: &[u8]) -> Result<(Transient, Public), ResponseError> {
    let mut r = response_body(response, ST_SESSIONS)?;
    let handle = Transient(r.u32()?);
    let mut params = Reader::new(r.parameters()?);
    let mut public = Reader::new(params.tpm2b()?);
    Ok((handle, Public::parse(&mut public)?))
}

/// `TPM2_EvictControl(TPM_RH_OWNER, object, persistent)`: makes a loaded `object` persistent
/// at `persistent`, or, given the persistent handle itself as `object`, removes it.
pub fn evict_control(object: u32, persistent: Persistent) -> Vec<u8> {
    command(
        CommandCode::EvictControl,
        &[Hierarchy::Owner.handle(), object],
        1,
        &persistent.0.to_be_bytes(),
    )
}

/// `TPM2_FlushContext(handle)`.
pub fn flush_context(handle: Transient) -> Vec<u8> {
    command(CommandCode::FlushContext, &[], 0, &handle.0.to_be_bytes())
}

/// `TPM2_NV_ReadPublic(index)`.
pub fn nv_read_public(index: NvIndex) -> Vec<u8> {
    command(CommandCode::NvReadPublic, &[index.0], 0, &[])
}

/// The index's public area from an [`nv_read_public`] response.
pub fn parse_nv_read_public(response: &[u8]) -> Result<NvPublic, ResponseError> {
    let mut r = response_body(response, ST_NO_SESSIONS)?;
    let mut public = Reader::new(r.tpm2b()?);
    NvPublic::parse(&mut public)
}

/// `TPM2_NV_DefineSpace(hierarchy)` of `public`, with an empty authorization value.
pub fn nv_define_space(hierarchy: Hierarchy, public: &NvPublic) -> Vec<u8> {
    let mut p = Vec::with_capacity(64);
    put_tpm2b(&mut p, &[]); // auth
    let mut nv = Vec::with_capacity(48);
    public.encode(&mut nv);
    put_tpm2b(&mut p, &nv);
    command(CommandCode::NvDefineSpace, &[hierarchy.handle()], 1, &p)
}

/// `TPM2_NV_UndefineSpace(hierarchy, index)`.
pub fn nv_undefine_space(hierarchy: Hierarchy, index: NvIndex) -> Vec<u8> {
    command(
        CommandCode::NvUndefineSpace,
        &[hierarchy.handle(), index.0],
        1,
        &[],
    )
}

/// `TPM2_NV_Write(hierarchy, index)` of `data` at `offset` (at most the TPM's
/// [`PT_NV_BUFFER_MAX`] bytes).
pub fn nv_write(hierarchy: Hierarchy, index: NvIndex, offset: u16, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(data.len() + 4);
    put_tpm2b(&mut p, data);
    put_u16(&mut p, offset);
    command(CommandCode::NvWrite, &[hierarchy.handle(), index.0], 1, &p)
}

/// `TPM2_NV_Read` of `size` bytes at `offset`, authorized by the index itself (`AUTHREAD`)
/// with its empty authorization value.
pub fn nv_read(index: NvIndex, size: u16, offset: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(4);
    put_u16(&mut p, size);
    put_u16(&mut p, offset);
    command(CommandCode::NvRead, &[index.0, index.0], 1, &p)
}

/// The bytes from an [`nv_read`] response.
pub fn parse_nv_read(response: &[u8]) -> Result<Vec<u8>, ResponseError> {
    let mut r = response_body(response, ST_SESSIONS)?;
    let mut params = Reader::new(r.parameters()?);
    Ok(params.tpm2b()?.to_vec())
}

/// Checks a response that carries nothing but its code (Startup, Shutdown, EvictControl,
/// FlushContext, NV_DefineSpace, NV_UndefineSpace, NV_Write).
pub fn parse_done(response: &[u8]) -> Result<(), ResponseError> {
    let tag = header(response)?;
    if tag != ST_NO_SESSIONS && tag != ST_SESSIONS {
        return Err(ResponseError::Malformed("unknown tag"));
    }
    Ok(())
}

// ---- Parsing -----------------------------------------------------------------------------

/// Checks a response's header: its size field is its length, its code is success. Returns
/// the tag.
fn header(response: &[u8]) -> Result<u16, ResponseError> {
    let mut r = Reader::new(response);
    let tag = r.u16()?;
    let size = r.u32()?;
    let rc = r.u32()?;
    if size as usize != response.len() {
        return Err(ResponseError::Malformed(
            "size field is not the response's length",
        ));
    }
    if rc != 0 {
        return Err(ResponseError::Tpm(ResponseCode(rc)));
    }
    Ok(tag)
}

/// The bytes after a successful response's header; `tag` is the one the command's
/// sessions call for.
fn response_body(response: &[u8], tag: u16) -> Result<Reader<'_>, ResponseError> {
    if header(response)? != tag {
        return Err(ResponseError::Malformed("unexpected tag"));
    }
    Ok(Reader::new(response.get(HEADER..).unwrap_or_default()))
}

/// A cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Reader<'a> {
        Reader { bytes }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ResponseError> {
        if n > self.bytes.len() {
            return Err(ResponseError::Malformed("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, ResponseError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, ResponseError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ResponseError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn tpm2b(&mut self) -> Result<&'a [u8], ResponseError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// A sessions response's parameter area (`parameterSize`, then that many bytes).
    fn parameters(&mut self) -> Result<&'a [u8], ResponseError> {
        let n = self.u32()?;
        self.take(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsa_template() -> RsaPublic {
        RsaPublic {
            name_alg: alg::SHA256,
            attributes: ObjectAttributes(0x0005_0472),
            auth_policy: vec![],
            symmetric: None,
            scheme: RsaScheme::Rsassa(alg::SHA256),
            key_bits: 2048,
            exponent: 0,
            modulus: vec![],
        }
    }

    fn response(tag: u16, body: &[u8]) -> Vec<u8> {
        let mut r = Vec::new();
        put_u16(&mut r, tag);
        put_u32(&mut r, (HEADER + body.len()) as u32);
        put_u32(&mut r, 0);
        r.extend_from_slice(body);
        r
    }

    #[test]
    fn commands_carry_their_size_tag_and_password_session() {
        // TPM2_Startup(CLEAR), as libtpms' own test vectors spell it.
        assert_eq!(startup_clear(), [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x44, 0, 0]);
        let c = nv_write(Hierarchy::Platform, NvIndex(0x0140_0001), 7, b"abc");
        let expected: Vec<u8> = [
            &[0x80, 0x02][..],
            &(c.len() as u32).to_be_bytes(),
            &[0, 0, 1, 0x37],
            &[0x40, 0, 0, 0x0C, 0x01, 0x40, 0, 0x01],
            &[0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0, 0, 0],
            &[0, 3, b'a', b'b', b'c', 0, 7],
        ]
        .concat();
        assert_eq!(c, expected);
    }

    #[test]
    fn a_public_area_round_trips() {
        let mut key = rsa_template();
        key.modulus = vec![0xA5; 256];
        let mut body = Vec::new();
        let mut public = Vec::new();
        key.encode(&mut public);
        put_tpm2b(&mut body, &public);
        put_tpm2b(&mut body, &[0; 34]); // name
        put_tpm2b(&mut body, &[0; 34]); // qualified name
        let parsed = parse_read_public(&response(ST_NO_SESSIONS, &body)).unwrap();
        assert_eq!(parsed, Public::Rsa(key.clone()));
        assert!(key.made_from(&rsa_template()));
        let mut other = key.clone();
        other.attributes.0 &= !ObjectAttributes::FIXED_TPM;
        assert!(
            !other.made_from(&rsa_template()),
            "an exportable key is not ours"
        );
    }

    #[test]
    fn error_codes_are_recognised_whatever_handle_they_name() {
        assert!(ResponseCode(0x18B).is_handle());
        assert!(ResponseCode(0x28B).is_handle());
        assert!(!ResponseCode(0x14C).is_handle());
        assert!(ResponseCode(0x98E).is_auth_failure());
        assert!(ResponseCode(0x9A2).is_auth_failure());
        assert!(ResponseCode(0x185).is_hierarchy());
        assert_eq!(
            ResponseCode(0x18B).to_string(),
            "TPM_RC_HANDLE (0x18b)",
            "named for the log"
        );
        let mut err = response(ST_NO_SESSIONS, &[]);
        err[6..10].copy_from_slice(&0x18Bu32.to_be_bytes());
        assert_eq!(
            parse_read_public(&err),
            Err(ResponseError::Tpm(ResponseCode(0x18B)))
        );
    }

    /// A deterministic byte stream (no dependency for a few thousand pseudo-random bytes).
    fn noise(seed: u32, len: usize) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn every_parser_refuses_truncated_and_garbled_responses_without_panicking() {
        let mut key = rsa_template();
        key.modulus = vec![1; 256];
        let mut public = Vec::new();
        key.encode(&mut public);
        let mut read_public_body = Vec::new();
        put_tpm2b(&mut read_public_body, &public);
        let mut create_body = 0x8000_0000u32.to_be_bytes().to_vec();
        let mut params = Vec::new();
        put_tpm2b(&mut params, &public);
        put_u32(&mut create_body, params.len() as u32);
        create_body.extend_from_slice(&params);
        type Accepts = fn(&[u8]) -> bool;
        let good: [(Vec<u8>, Accepts); 3] = [
            (response(ST_NO_SESSIONS, &read_public_body), |b| {
                parse_read_public(b).is_ok()
            }),
            (response(ST_SESSIONS, &create_body), |b| {
                parse_create_primary(b).is_ok()
            }),
            (
                response(
                    ST_NO_SESSIONS,
                    &[0, 0, 0, 0, 6, 0, 0, 0, 1, 0, 0, 1, 0x2C, 0, 0, 4, 0],
                ),
                |b| parse_tpm_property(b, PT_NV_BUFFER_MAX) == Ok(Some(1024)),
            ),
        ];
        let parsers: [Accepts; 6] = [
            |b| parse_read_public(b).is_ok(),
            |b| parse_create_primary(b).is_ok(),
            |b| parse_nv_read_public(b).is_ok(),
            |b| parse_nv_read(b).is_ok(),
            |b| parse_tpm_property(b, PT_STARTUP_CLEAR).is_ok(),
            |b| parse_done(b).is_ok(),
        ];
        for (whole, parses) in &good {
            assert!(parses(whole));
            for cut in 0..whole.len() {
                for p in &parsers {
                    let _ = p(&whole[..cut]);
                }
                // Cut short with the size field patched to match: still refused.
                let mut t = whole[..cut].to_vec();
                if t.len() >= HEADER {
                    let len = (t.len() as u32).to_be_bytes();
                    t[2..6].copy_from_slice(&len);
                    assert!(!parses(&t), "a response cut at {cut} was accepted");
                }
            }
        }
        for seed in 0..2000 {
            let mut b = noise(seed, 10 + (seed as usize % 600));
            let len = (b.len() as u32).to_be_bytes();
            b[2..6].copy_from_slice(&len);
            b[6..10].fill(0);
            b[0..2].copy_from_slice(if seed % 2 == 0 {
                &[0x80, 1]
            } else {
                &[0x80, 2]
            });
            for p in &parsers {
                let _ = p(&b);
            }
        }
    }
}
