//! Key release, the paravisor's half: the protocol it shares with the tenant's broker
//! (`paravisor kbs`, a relying-party tool outside the trust boundary), and [`fetch_key`], the
//! client the supervisor uses to get the tenant key for sealed state.
//!
//! The protocol (lines of JSON over TCP, the binding of a report to a challenge and a
//! transfer key, the ECDH + HKDF + AES-GCM wrap) is described with the broker, in `kbs.rs`.
//! Everything here treats the broker's bytes as hostile: every decode is a typed
//! [`KbsError`].

use std::io::Read;
use std::io::Write;
use std::net::SocketAddr;
use std::net::TcpStream;
use std::time::Duration;
use std::time::Instant;

use aes_gcm::aead::AeadInOut;
use aes_gcm::aead::KeyInit;
use aes_gcm::Aes256Gcm;
use aes_gcm::Nonce as GcmNonce;
use aes_gcm::Tag;
use p384::ecdh::EphemeralSecret;
use p384::ecdh::SharedSecret;
use p384::elliptic_curve::sec1::ToEncodedPoint;
use p384::PublicKey;
use sha2::Digest;
use sha2::Sha384;
use sha2::Sha512;
use zeroize::Zeroizing;

use crate::snp::REPORT_LEN;
use crate::util::hex;
use crate::util::parse_hex;

/// The protocol's domain separator: in the binding, the KDF salt and the KDF info.
pub const DOMAIN: &[u8] = b"pv-kbs-v1";
/// HKDF info prefix of the wrap key.
const WRAP_INFO: &[u8] = b"pv-kbs-v1 key wrap";
/// Where `kbs serve` listens without `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8700";
/// The longest request or reply line: a key request is about 2.6 KB of hex, so this leaves
/// room while keeping what a hostile client can make the broker buffer small.
pub const MAX_LINE: usize = 64 * 1024;
/// How long a client waits to connect, and for the whole reply (verification takes
/// milliseconds; this only has to outlast a busy broker).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once. When all are taken, an idle one is closed to make room (one
/// lingering after its reply first, else the one waiting longest for its request line; what
/// an evicted connection sent is not worked on): idle connections cannot lock genuine
/// clients out. Only when every one is being worked on is a new one answered "busy".
/// Threads stay bounded: evicted ones end at once, and never more than twice this many.
pub const MAX_CLIENTS: usize = 16;
pub const NONCE_LEN: usize = 32;
/// A SEC1 uncompressed P-384 point: 0x04 ‖ X ‖ Y.
pub const TRANSFER_KEY_LEN: usize = 97;
/// The wrapped key: 32 bytes of ciphertext and the 16-byte GCM tag.
pub const WRAPPED_LEN: usize = 48;

/// Everything that can go wrong, on either side. Refusals name exactly what failed; the
/// broker sends their text to the client.
#[derive(Debug, thiserror::Error)]
pub enum KbsError {
    // The broker's configuration.
    #[error("policy {path}: {error}")]
    PolicyRead { path: String, error: std::io::Error },
    #[error("policy {path}: {message}")]
    PolicyInvalid { path: String, message: String },
    #[error("key file {path}: {error}")]
    KeyFileIo { path: String, error: std::io::Error },
    #[error("key file {path} has mode {mode:o}: group or others may access it; `chmod 600` it")]
    KeyFileMode { path: String, mode: u32 },
    #[error("key file {path} holds {len} bytes, not a 32-byte key")]
    KeyFileSize { path: String, len: u64 },
    #[error(
        "the ARK in {certs} has SHA-256 fingerprint {found}, not the policy's pinned {pinned}"
    )]
    ArkNotPinned {
        certs: String,
        found: String,
        pinned: String,
    },
    #[error("\"{0}\" is not an IP address and port (such as {DEFAULT_LISTEN})")]
    BadAddress(String),
    #[error("listening on {addr}: {error}")]
    Listen {
        addr: SocketAddr,
        error: std::io::Error,
    },

    // The wire.
    #[error("the line received (a request at the broker, a reply at the client) is longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("no complete line within {0:?}")]
    Timeout(Duration),
    #[error("the peer closed the connection without sending a line")]
    Closed,
    #[error("connection: {0}")]
    Io(String),
    #[error("the request is not valid: {0}")]
    Malformed(String),
    #[error("the request's {field} is not valid: {reason}")]
    BadField { field: &'static str, reason: String },
    #[error("the broker is busy ({MAX_CLIENTS} clients); try again")]
    Busy,

    // Refusals of a key request.
    #[error("nonce unknown or expired (ask for a new challenge)")]
    NonceUnknownOrExpired,
    #[error("nonce already used (replay)")]
    NonceReplayed,
    /// The verifier's refusal, as its message (the broker converts its `VerifyError`).
    #[error("report refused: {0}")]
    Evidence(String),
    #[error("report_data {found} does not bind this nonce and transfer key (expected {expected}): the report was made for another exchange or another key")]
    Binding { found: String, expected: String },
    #[error("measurement {0} is not in the policy's allowed list")]
    MeasurementNotAllowed(String),
    #[error("the report comes from VMPL {found}; the policy accepts VMPL {required} only")]
    Vmpl { found: u32, required: u32 },
    #[error("the guest policy {0:#x} allows debugging (bit 19), which the policy forbids")]
    DebugAllowed(u64),
    #[error("the guest policy {0:#x} allows a migration agent (bit 18), which the policy forbids")]
    MigrationAgentAllowed(u64),
    #[error("the guest policy {0:#x} allows SMT (bit 16), which the policy forbids")]
    SmtAllowed(u64),
    #[error("reported TCB {component} SPL {reported} is below the policy's minimum {minimum}")]
    TcbTooLow {
        component: &'static str,
        reported: u8,
        minimum: u8,
    },
    #[error("wrapping the key: {0}")]
    Wrap(String),

    // The client.
    #[error("connecting to the broker at {addr}: {error}")]
    Connect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("the broker refused: {0}")]
    Refused(String),
    #[error("the broker's reply is not valid: {0}")]
    BadReply(String),
    #[error("getting evidence: {0}")]
    EvidenceSource(String),
    #[error(
        "the wrapped key does not authenticate: a tampered reply, or not for this transfer key"
    )]
    Unwrap,
}

pub fn io_err(e: std::io::Error) -> KbsError {
    KbsError::Io(e.to_string())
}

// ---------------------------------------------------------------------------------------
// The binding and the wrap.

/// What REPORT_DATA must hold for a key request: SHA-512("pv-kbs-v1" ‖ nonce ‖
/// transfer_pub), `transfer_pub` being the exact bytes sent as `transfer_key` (SEC1
/// uncompressed). It ties the report to this challenge and to this transfer key, so a
/// captured report neither replays nor lets another key receive the secret.
pub fn binding(nonce: &[u8; NONCE_LEN], transfer_pub: &[u8]) -> [u8; 64] {
    Sha512::new()
        .chain_update(DOMAIN)
        .chain_update(nonce)
        .chain_update(transfer_pub)
        .finalize()
        .into()
}

/// A key wrapped to a transfer key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    /// The broker's ephemeral public key (SEC1 uncompressed).
    pub server_key: [u8; TRANSFER_KEY_LEN],
    /// AES-256-GCM ciphertext of the key, then the tag.
    pub wrapped_key: [u8; WRAPPED_LEN],
}

/// The AES key (32 bytes) and IV (12 bytes) of one wrap.
fn wrap_secret(
    shared: &SharedSecret,
    nonce: &[u8; NONCE_LEN],
    server_pub: &[u8; TRANSFER_KEY_LEN],
    transfer_pub: &[u8; TRANSFER_KEY_LEN],
) -> Result<Zeroizing<[u8; 44]>, KbsError> {
    let mut info = Vec::with_capacity(WRAP_INFO.len() + NONCE_LEN + 2 * TRANSFER_KEY_LEN);
    info.extend_from_slice(WRAP_INFO);
    info.extend_from_slice(nonce);
    info.extend_from_slice(server_pub);
    info.extend_from_slice(transfer_pub);
    let mut okm = Zeroizing::new([0u8; 44]);
    shared
        .extract::<Sha384>(Some(DOMAIN))
        .expand(&info, &mut okm[..])
        .map_err(|e| KbsError::Wrap(e.to_string()))?;
    Ok(okm)
}

fn sec1(key: &PublicKey) -> Result<[u8; TRANSFER_KEY_LEN], KbsError> {
    key.to_encoded_point(false)
        .as_bytes()
        .try_into()
        .map_err(|_| KbsError::Wrap("a P-384 point is not 97 bytes uncompressed".into()))
}

/// Parses a transfer key: exactly a SEC1 uncompressed P-384 point (on the curve, not the
/// identity), so that the bytes bound into the report are the one encoding of the key.
pub fn parse_transfer_key(bytes: &[u8]) -> Result<(PublicKey, [u8; TRANSFER_KEY_LEN]), KbsError> {
    let bad = |reason: String| KbsError::BadField {
        field: "transfer_key",
        reason,
    };
    let raw: [u8; TRANSFER_KEY_LEN] = bytes.try_into().map_err(|_| {
        bad(format!(
            "{} bytes, not a {TRANSFER_KEY_LEN}-byte SEC1 uncompressed P-384 point",
            bytes.len()
        ))
    })?;
    if raw[0] != 0x04 {
        return Err(bad(format!(
            "starts with {:#04x}, not 0x04 (SEC1 uncompressed)",
            raw[0]
        )));
    }
    let key = PublicKey::from_sec1_bytes(&raw).map_err(|_| bad("not a point on P-384".into()))?;
    Ok((key, raw))
}

/// Wraps `key` to `transfer` for the exchange of `nonce`, with a fresh server key.
pub fn wrap(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    transfer: &PublicKey,
) -> Result<Wrapped, KbsError> {
    let server = EphemeralSecret::random(&mut rand_core::OsRng);
    let server_key = sec1(&server.public_key())?;
    let transfer_pub = sec1(transfer)?;
    let secret = wrap_secret(
        &server.diffie_hellman(transfer),
        nonce,
        &server_key,
        &transfer_pub,
    )?;
    let (aes_key, iv) = secret.split_at(32);
    let cipher = Aes256Gcm::new_from_slice(aes_key).map_err(|e| KbsError::Wrap(e.to_string()))?;
    let iv: [u8; 12] = iv
        .try_into()
        .map_err(|_| KbsError::Wrap("IV length".into()))?;
    let iv: GcmNonce<_> = iv.into();
    let mut wrapped_key = [0u8; WRAPPED_LEN];
    wrapped_key[..32].copy_from_slice(key);
    let tag: Tag = cipher
        .encrypt_inout_detached(&iv, nonce, (&mut wrapped_key[..32]).into())
        .map_err(|e| KbsError::Wrap(e.to_string()))?;
    wrapped_key[32..].copy_from_slice(&tag);
    Ok(Wrapped {
        server_key,
        wrapped_key,
    })
}

/// Unwraps a key wrapped to `transfer` (the secret half of the transfer key) for the
/// exchange of `nonce`.
pub fn unwrap(
    transfer: &EphemeralSecret,
    nonce: &[u8; NONCE_LEN],
    wrapped: &Wrapped,
) -> Result<Zeroizing<[u8; 32]>, KbsError> {
    let server = PublicKey::from_sec1_bytes(&wrapped.server_key).map_err(|_| KbsError::Unwrap)?;
    let transfer_pub = sec1(&transfer.public_key())?;
    let secret = wrap_secret(
        &transfer.diffie_hellman(&server),
        nonce,
        &wrapped.server_key,
        &transfer_pub,
    )?;
    let (aes_key, iv) = secret.split_at(32);
    let cipher = Aes256Gcm::new_from_slice(aes_key).map_err(|e| KbsError::Wrap(e.to_string()))?;
    let iv: [u8; 12] = iv.try_into().map_err(|_| KbsError::Unwrap)?;
    let iv: GcmNonce<_> = iv.into();
    let tag: [u8; 16] = wrapped.wrapped_key[32..]
        .try_into()
        .map_err(|_| KbsError::Unwrap)?;
    let tag: Tag = tag.into();
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(&wrapped.wrapped_key[..32]);
    cipher
        .decrypt_inout_detached(&iv, nonce, (&mut key[..]).into(), &tag)
        .map_err(|_| KbsError::Unwrap)?;
    Ok(key)
}

// ---------------------------------------------------------------------------------------
// Requests and replies.

#[derive(Debug, serde::Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
enum WireRequest {
    // `{}`, not a unit variant: serde ignores unknown fields next to a unit variant's tag.
    Challenge {},
    Key {
        nonce: String,
        transfer_key: String,
        report: String,
    },
}

/// A decoded request.
#[derive(Debug)]
pub enum Request {
    Challenge,
    Key(Box<KeyRequest>),
}

#[derive(Debug)]
pub struct KeyRequest {
    pub nonce: [u8; NONCE_LEN],
    pub transfer_key: PublicKey,
    /// The exact bytes the client sent as its transfer key (what the binding covers).
    pub transfer_bytes: [u8; TRANSFER_KEY_LEN],
    pub report: [u8; REPORT_LEN],
}

fn field_hex(field: &'static str, s: &str) -> Result<Vec<u8>, KbsError> {
    parse_hex(s).ok_or_else(|| KbsError::BadField {
        field,
        reason: "not hex".into(),
    })
}

fn sized<const N: usize>(field: &'static str, v: Vec<u8>) -> Result<[u8; N], KbsError> {
    let len = v.len();
    v.try_into().map_err(|_| KbsError::BadField {
        field,
        reason: format!("{len} bytes, not {N}"),
    })
}

/// Decodes one request line from a client (hostile input: every failure is a typed error).
pub fn parse_request(line: &[u8]) -> Result<Request, KbsError> {
    if line.len() > MAX_LINE {
        return Err(KbsError::LineTooLong);
    }
    let wire: WireRequest =
        serde_json::from_slice(line).map_err(|e| KbsError::Malformed(e.to_string()))?;
    match wire {
        WireRequest::Challenge {} => Ok(Request::Challenge),
        WireRequest::Key {
            nonce,
            transfer_key,
            report,
        } => {
            let nonce = sized::<NONCE_LEN>("nonce", field_hex("nonce", &nonce)?)?;
            let (transfer_key, transfer_bytes) =
                parse_transfer_key(&field_hex("transfer_key", &transfer_key)?)?;
            let report = sized::<REPORT_LEN>("report", field_hex("report", &report)?)?;
            Ok(Request::Key(Box::new(KeyRequest {
                nonce,
                transfer_key,
                transfer_bytes,
                report,
            })))
        }
    }
}

/// A decoded reply.
#[derive(Debug)]
pub enum Reply {
    Challenge {
        nonce: [u8; NONCE_LEN],
        expires_in_secs: u64,
    },
    Key(Wrapped),
    Error(String),
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct WireReply {
    nonce: Option<String>,
    expires_in_secs: Option<u64>,
    server_key: Option<String>,
    wrapped_key: Option<String>,
    error: Option<String>,
}

fn reply_field<const N: usize>(field: &'static str, s: &str) -> Result<[u8; N], KbsError> {
    parse_hex(s)
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| KbsError::BadReply(format!("{field} is not {N} bytes of hex")))
}

/// Decodes one reply line from the broker.
pub fn parse_reply(line: &[u8]) -> Result<Reply, KbsError> {
    let w: WireReply =
        serde_json::from_slice(line).map_err(|e| KbsError::BadReply(e.to_string()))?;
    match w {
        WireReply {
            error: Some(e),
            nonce: None,
            server_key: None,
            wrapped_key: None,
            ..
        } => Ok(Reply::Error(e)),
        WireReply {
            nonce: Some(n),
            expires_in_secs,
            server_key: None,
            wrapped_key: None,
            error: None,
        } => Ok(Reply::Challenge {
            nonce: reply_field("nonce", &n)?,
            expires_in_secs: expires_in_secs.unwrap_or(0),
        }),
        WireReply {
            server_key: Some(s),
            wrapped_key: Some(w),
            nonce: None,
            expires_in_secs: None,
            error: None,
        } => Ok(Reply::Key(Wrapped {
            server_key: reply_field("server_key", &s)?,
            wrapped_key: reply_field("wrapped_key", &w)?,
        })),
        _ => Err(KbsError::BadReply(
            "neither a challenge, a wrapped key nor an error".into(),
        )),
    }
}

/// The tenant key's public identity: SHA-256("pv-kbs key id" || key), hex. The paravisor's
/// manifest pins it (`[attest] key-release-id`, measured with the manifest), so a broker the
/// host runs in the tenant's place cannot hand over a key of its own choosing: a datastore
/// key wrapped under that key would be readable by the host.
pub fn key_id(key: &[u8; 32]) -> String {
    hex(&key_id_bytes(key))
}

/// [`key_id`] as bytes.
pub fn key_id_bytes(key: &[u8; 32]) -> [u8; 32] {
    sha2::Sha256::new()
        .chain_update(b"pv-kbs key id")
        .chain_update(key)
        .finalize()
        .into()
}

/// Reads one line (without its newline; or up to EOF) of at most [`MAX_LINE`] bytes, by
/// `deadline`.
pub fn read_line(mut stream: &TcpStream, deadline: Instant) -> Result<Vec<u8>, KbsError> {
    let started = Instant::now();
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(KbsError::Timeout(
                deadline.saturating_duration_since(started),
            ));
        }
        stream.set_read_timeout(Some(left)).map_err(io_err)?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(KbsError::Timeout(
                    deadline.saturating_duration_since(started),
                ))
            }
            Err(e) => return Err(io_err(e)),
        };
        if n == 0 {
            return if line.is_empty() {
                Err(KbsError::Closed)
            } else {
                Ok(line)
            };
        }
        let got = chunk.get(..n).unwrap_or_default();
        let end = got.iter().position(|b| *b == b'\n');
        line.extend_from_slice(&got[..end.unwrap_or(got.len())]);
        if line.len() > MAX_LINE {
            return Err(KbsError::LineTooLong);
        }
        if end.is_some() {
            return Ok(line);
        }
    }
}

// ---------------------------------------------------------------------------------------
// The client.

/// One exchange: connect, send `request`, read the reply line.
fn exchange(addr: SocketAddr, request: &str) -> Result<Reply, KbsError> {
    let mut stream = TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT)
        .map_err(|error| KbsError::Connect { addr, error })?;
    stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .map_err(io_err)?;
    let mut line = request.as_bytes().to_vec();
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let reply = read_line(&stream, Instant::now() + CLIENT_TIMEOUT)?;
    match parse_reply(&reply)? {
        Reply::Error(e) => Err(KbsError::Refused(e)),
        r => Ok(r),
    }
}

/// Fetches the tenant key from the broker at `addr`: a challenge, an ephemeral transfer key,
/// `evidence(binding(nonce, transfer key))` for the report, then the wrapped key, unwrapped.
pub fn fetch_key(
    addr: SocketAddr,
    evidence: impl FnOnce(&[u8; 64]) -> Result<Vec<u8>, String>,
) -> Result<Zeroizing<[u8; 32]>, KbsError> {
    let nonce = match exchange(addr, r#"{"request":"challenge"}"#)? {
        Reply::Challenge { nonce, .. } => nonce,
        _ => return Err(KbsError::BadReply("a challenge was expected".into())),
    };
    let transfer = EphemeralSecret::random(&mut rand_core::OsRng);
    let transfer_pub = sec1(&transfer.public_key())?;
    let report = evidence(&binding(&nonce, &transfer_pub)).map_err(KbsError::EvidenceSource)?;
    let request = serde_json::json!({
        "request": "key",
        "nonce": hex(&nonce),
        "transfer_key": hex(&transfer_pub),
        "report": hex(&report),
    })
    .to_string();
    match exchange(addr, &request)? {
        Reply::Key(wrapped) => unwrap(&transfer, &nonce, &wrapped),
        _ => Err(KbsError::BadReply("a wrapped key was expected".into())),
    }
}
