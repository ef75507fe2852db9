//! The key broker (KBS): releases a tenant's secret key only to attestation evidence that
//! verifies, wrapped so that only the attested party can unwrap it.
//!
//! `paravisor kbs serve` is its own process, run by the tenant, **outside** the paravisor's
//! trust boundary: it holds the tenant key and the policy, trusts only the pinned ARK, and
//! treats every byte from the network as hostile. The paravisor side is [`fetch_key`]. The
//! broker never sees a guest, never signs anything, and never releases the key unwrapped.
//!
//! # Policy (`--policy POLICY.toml`)
//!
//! Relative paths are relative to the policy file's directory. Unknown keys are errors.
//!
//! ```toml
//! key-file = "tenant.key"          # 32 raw bytes, no group/other access (`kbs init-key`)
//! certs = "certs"                  # ark.pem, ask.pem, vcek.pem (`attest certs`)
//! ark-fingerprint = "9f3c…"        # SHA-256 of the ARK (`attest fingerprint`)
//! allowed-measurements = ["…"]     # SNP launch digests (48 bytes hex, `paravisor measure`)
//! max-nonce-age = 60               # seconds a challenge stays valid [default 60, max 3600]
//! vmpl = 0                         # the VMPL reports must come from [default 0]
//!
//! [guest-policy]                   # the report's SNP guest policy [all optional]
//! allow-debug = false              # bit 19 DEBUG [default false]
//! allow-migration-agent = false    # bit 18 MIGRATE_MA [default false]
//! allow-smt = true                 # bit 16 SMT [default true]
//!
//! [minimum-tcb]                    # the report's REPORTED_TCB, per component (required)
//! bootloader = 3
//! tee = 0
//! snp = 8
//! microcode = 115
//!
//! [guest]                          # guest-key (crate::kbs_guest) [optional]
//! secret-file = "disk.secret"      # 1 to 190 bytes, no group/other access
//! vmpl = 1                         # the VMPL guest reports come from [default 1]
//! pcrs = { "7" = ["…"] }           # sha256 PCR index -> allowed value(s)
//! ```
//!
//! # Protocol (TCP, one request line and one reply line per connection)
//!
//! The broker listens on loopback unless `--listen` names another address (never every
//! interface): guests reach it on the host's end of their TAP.
//! Lines are JSON objects ended by `\n`, at most [`MAX_LINE`] bytes; byte strings are
//! lowercase hex. A client that sends nothing is dropped after [`REQUEST_DEADLINE`].
//!
//! 1. `{"request":"challenge"}` → `{"nonce":"<32 bytes>","expires_in_secs":60}`. The broker
//!    remembers the nonce with its time.
//! 2. The client makes an ephemeral P-384 *transfer key*, and has the platform put
//!    [`binding`]`(nonce, transfer_key)` = SHA-512("pv-kbs-v1" ‖ nonce ‖ transfer_key) into
//!    the report's REPORT_DATA.
//! 3. `{"request":"key","nonce":"…","transfer_key":"<SEC1 uncompressed, 97 bytes>",
//!    "report":"<0x4A0 bytes>"}` → `{"server_key":"<SEC1, 97 bytes>","wrapped_key":"<48
//!    bytes>"}`. The nonce is consumed first (a second use is a replay, whatever the
//!    outcome of the first); then the report must verify against the pinned chain, bind this
//!    nonce and transfer key, carry an allowed measurement, and satisfy the VMPL, guest
//!    policy and TCB of the policy.
//! 4. Any refusal: `{"error":"<the reason>"}` (also logged by the broker).
//! 5. `{"request":"guest-key",...}`: a guest's own evidence through its vTPM, answered with
//!    its `[guest]` secret wrapped to a key in that TPM, or a refusal that names its check
//!    (`{"check":"…","error":"…"}`); see [`crate::kbs_guest`].
//!
//! The wrap: ECDH between a fresh server key and the transfer key; HKDF-SHA-384 (salt
//! "pv-kbs-v1", info "pv-kbs-v1 key wrap" ‖ nonce ‖ server_key ‖ transfer_key) gives a
//! 32-byte AES-256 key and a 12-byte IV; AES-256-GCM over the tenant key with the nonce as
//! associated data gives the 32-byte ciphertext and its 16-byte tag.

use std::collections::HashMap;
use std::io::Read;
use std::io::Write;
use std::net::Shutdown;
use std::net::TcpListener;
use std::net::TcpStream;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;

use zeroize::Zeroizing;

use crate::verify::VerifyError;
use microkernel::snp::Tcb;
use microkernel::snp::REPORT_LEN;
use microkernel::util::hex;
use microkernel::util::parse_hex;

// The protocol and the client half live with the paravisor; the broker is built on them, and
// their old paths (`kbs::parse_request`, `kbs::KbsError`...) stay valid.
pub use crate::kbs_args::listen_address;
pub use crate::kbs_args::KbsCmd;
pub use crate::kbs_args::Listen;
pub use crate::kbs_args::ListenError;
pub use microkernel::key_release::*;

/// How long the broker waits for a client's whole request line: a silent or dribbling client
/// cannot hold a connection slot longer than this.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// Challenges outstanding at once (issued, not yet expired): bounds the nonce table's
/// memory against a client that only ever asks for challenges.
pub const MAX_OUTSTANDING_NONCES: usize = 4096;
/// The longest nonce lifetime a policy may set: nonces are for freshness, not storage.
const MAX_NONCE_AGE_LIMIT: u64 = 3600;
/// The default nonce lifetime.
const DEFAULT_NONCE_AGE: u64 = 60;
/// After a reply, how long the broker reads and discards what the client still sends (so
/// that closing with unread input does not reset the connection before the client has read
/// the reply), and at most how much.
const LINGER: Duration = Duration::from_millis(250);
const LINGER_BYTES: usize = 256 * 1024;

/// SNP guest policy bits the policy file speaks about.
const POLICY_SMT: u64 = 1 << 16;
const POLICY_MIGRATE_MA: u64 = 1 << 18;
const POLICY_DEBUG: u64 = 1 << 19;

impl From<VerifyError> for KbsError {
    fn from(e: VerifyError) -> KbsError {
        KbsError::Evidence(e.to_string())
    }
}

// ---------------------------------------------------------------------------------------
// The policy.

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct PolicyFile {
    key_file: PathBuf,
    certs: PathBuf,
    ark_fingerprint: String,
    allowed_measurements: Vec<String>,
    #[serde(default = "default_nonce_age")]
    max_nonce_age: u64,
    #[serde(default)]
    vmpl: u32,
    #[serde(default)]
    guest_policy: GuestPolicy,
    minimum_tcb: MinimumTcb,
    #[serde(default)]
    guest: Option<crate::kbs_guest::GuestFile>,
}

fn default_nonce_age() -> u64 {
    DEFAULT_NONCE_AGE
}

/// Which SNP guest-policy permissions a released-to guest may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct GuestPolicy {
    pub allow_debug: bool,
    pub allow_migration_agent: bool,
    pub allow_smt: bool,
}

impl Default for GuestPolicy {
    fn default() -> GuestPolicy {
        GuestPolicy {
            allow_debug: false,
            allow_migration_agent: false,
            allow_smt: true,
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct MinimumTcb {
    bootloader: u8,
    tee: u8,
    snp: u8,
    microcode: u8,
}

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub key_file: PathBuf,
    pub certs: PathBuf,
    /// Lowercase hex, no separators.
    pub ark_fingerprint: String,
    pub allowed_measurements: Vec<[u8; 48]>,
    pub max_nonce_age: Duration,
    pub vmpl: u32,
    pub guest_policy: GuestPolicy,
    pub minimum_tcb: Tcb,
    /// `[guest]`: what guest-key requests get, and what their evidence must show (none:
    /// guest-key is refused).
    pub guest: Option<crate::kbs_guest::GuestRelease>,
}

/// The facts of a verified report that the policy judges.
#[derive(Debug, Clone, Copy)]
pub struct ReportFacts {
    pub policy: u64,
    pub vmpl: u32,
    pub report_data: [u8; 64],
    pub measurement: [u8; 48],
    pub reported_tcb: Tcb,
}

impl ReportFacts {
    /// Reads the facts at their SNP report offsets (policy 0x08, VMPL 0x30, REPORT_DATA
    /// 0x50, MEASUREMENT 0x90) and REPORTED_TCB as the report's generation lays it out.
    pub fn of(report: &[u8; REPORT_LEN]) -> ReportFacts {
        let mut policy = [0u8; 8];
        policy.copy_from_slice(&report[0x08..0x10]);
        let mut vmpl = [0u8; 4];
        vmpl.copy_from_slice(&report[0x30..0x34]);
        let mut report_data = [0u8; 64];
        report_data.copy_from_slice(&report[0x50..0x90]);
        let mut measurement = [0u8; 48];
        measurement.copy_from_slice(&report[0x90..0xC0]);
        // REPORTED_TCB's layout depends on the generation (Turin moved the components and
        // added FMC): the sev crate's decoder knows it. A report that does not parse has
        // failed verification before its facts are looked at; its TCB reads as zero here.
        let reported_tcb = crate::verify::parse_report(report)
            .map(|r| Tcb {
                bootloader: r.reported_tcb.bootloader,
                tee: r.reported_tcb.tee,
                snp: r.reported_tcb.snp,
                microcode: r.reported_tcb.microcode,
            })
            .unwrap_or(Tcb {
                bootloader: 0,
                tee: 0,
                snp: 0,
                microcode: 0,
            });
        ReportFacts {
            policy: u64::from_le_bytes(policy),
            vmpl: u32::from_le_bytes(vmpl),
            report_data,
            measurement,
            reported_tcb,
        }
    }
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, KbsError> {
        let text = std::fs::read_to_string(path).map_err(|error| KbsError::PolicyRead {
            path: path.display().to_string(),
            error,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Policy::parse(&text, base, &path.display().to_string())
    }

    /// Validates policy text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path, name: &str) -> Result<Policy, KbsError> {
        let invalid = |message: String| KbsError::PolicyInvalid {
            path: name.to_string(),
            message,
        };
        let file: PolicyFile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let ark_fingerprint = crate::verify::normalize_fingerprint(&file.ark_fingerprint);
        if parse_hex(&ark_fingerprint).is_none_or(|b| b.len() != 32) {
            return Err(invalid(format!(
                "ark-fingerprint \"{}\" is not a SHA-256 (32 bytes of hex)",
                file.ark_fingerprint
            )));
        }
        if file.allowed_measurements.is_empty() {
            return Err(invalid(
                "allowed-measurements is empty: no report could ever get the key".into(),
            ));
        }
        let mut allowed = Vec::with_capacity(file.allowed_measurements.len());
        for (i, m) in file.allowed_measurements.iter().enumerate() {
            let m: [u8; 48] = parse_hex(m)
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| {
                    invalid(format!(
                        "allowed-measurements[{i}] \"{m}\" is not 48 bytes of hex"
                    ))
                })?;
            allowed.push(m);
        }
        if file.vmpl > 3 {
            return Err(invalid(format!(
                "vmpl = {} is not a VMPL (0 to 3; the paravisor's key release uses 0)",
                file.vmpl
            )));
        }
        if !(1..=MAX_NONCE_AGE_LIMIT).contains(&file.max_nonce_age) {
            return Err(invalid(format!(
                "max-nonce-age = {} is outside 1..={MAX_NONCE_AGE_LIMIT} seconds",
                file.max_nonce_age
            )));
        }
        let guest = match file.guest {
            Some(g) => Some(g.validate(base).map_err(invalid)?),
            None => None,
        };
        Ok(Policy {
            key_file: base.join(file.key_file),
            certs: base.join(file.certs),
            ark_fingerprint,
            allowed_measurements: allowed,
            max_nonce_age: Duration::from_secs(file.max_nonce_age),
            vmpl: file.vmpl,
            guest_policy: file.guest_policy,
            minimum_tcb: Tcb {
                bootloader: file.minimum_tcb.bootloader,
                tee: file.minimum_tcb.tee,
                snp: file.minimum_tcb.snp,
                microcode: file.minimum_tcb.microcode,
            },
            guest,
        })
    }

    /// Whether a verified report's facts satisfy the policy (the binding is checked apart).
    pub fn admit(&self, facts: &ReportFacts) -> Result<(), KbsError> {
        self.admit_at(facts, self.vmpl)
    }

    /// [`Policy::admit`] for reports that must come from `vmpl` (a guest's: `[guest] vmpl`).
    pub fn admit_at(&self, facts: &ReportFacts, vmpl: u32) -> Result<(), KbsError> {
        if !self.allowed_measurements.contains(&facts.measurement) {
            return Err(KbsError::MeasurementNotAllowed(hex(&facts.measurement)));
        }
        if facts.vmpl != vmpl {
            return Err(KbsError::Vmpl {
                found: facts.vmpl,
                required: vmpl,
            });
        }
        let p = facts.policy;
        let g = self.guest_policy;
        if p & POLICY_DEBUG != 0 && !g.allow_debug {
            return Err(KbsError::DebugAllowed(p));
        }
        if p & POLICY_MIGRATE_MA != 0 && !g.allow_migration_agent {
            return Err(KbsError::MigrationAgentAllowed(p));
        }
        if p & POLICY_SMT != 0 && !g.allow_smt {
            return Err(KbsError::SmtAllowed(p));
        }
        let (r, m) = (facts.reported_tcb, self.minimum_tcb);
        for (component, reported, minimum) in [
            ("boot loader", r.bootloader, m.bootloader),
            ("TEE", r.tee, m.tee),
            ("SNP", r.snp, m.snp),
            ("microcode", r.microcode, m.microcode),
        ] {
            if reported < minimum {
                return Err(KbsError::TcbTooLow {
                    component,
                    reported,
                    minimum,
                });
            }
        }
        Ok(())
    }
}

/// Reads a tenant key file: a regular file of exactly 32 bytes that neither group nor others
/// may access.
pub fn load_key(path: &Path) -> Result<Zeroizing<[u8; 32]>, KbsError> {
    let name = || path.display().to_string();
    let io = |error| KbsError::KeyFileIo {
        path: name(),
        error,
    };
    // The opened file is the one checked and read (`kbs init-key FILE` makes one).
    let mut file = microkernel::util::open_regular(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KbsError::KeyFileMode { path: name(), mode });
    }
    if !meta.is_file() || meta.len() != 32 {
        return Err(KbsError::KeyFileSize {
            path: name(),
            len: meta.len(),
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(33));
    (&mut file).take(33).read_to_end(&mut bytes).map_err(io)?;
    let mut key = Zeroizing::new([0u8; 32]);
    if bytes.len() != 32 {
        return Err(KbsError::KeyFileSize {
            path: name(),
            len: bytes.len() as u64,
        });
    }
    key.copy_from_slice(&bytes);
    Ok(key)
}

/// Creates a tenant key file: 32 random bytes, mode 0600. Never overwrites.
pub fn init_key(path: &Path) -> Result<(), KbsError> {
    let err = |error| KbsError::KeyFileIo {
        path: path.display().to_string(),
        error,
    };
    let mut key = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(&mut key[..]).map_err(|e| err(std::io::Error::other(e.to_string())))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(&key[..]).map_err(err)?;
    f.sync_all().map_err(err)
}

fn error_line(e: &KbsError) -> String {
    serde_json::json!({ "error": e.to_string() }).to_string()
}

// ---------------------------------------------------------------------------------------
// The broker.

#[derive(Debug, Clone, Copy)]
struct Issued {
    at: Instant,
    used: bool,
}

/// Issued challenges. A nonce stays here, marked used, until it expires, so that a second use
/// is reported as a replay rather than as unknown.
#[derive(Debug, Default)]
struct Nonces {
    issued: HashMap<[u8; NONCE_LEN], Issued>,
}

impl Nonces {
    fn purge(&mut self, now: Instant, max_age: Duration) {
        self.issued
            .retain(|_, i| now.saturating_duration_since(i.at) <= max_age);
    }

    /// A new challenge. When the table is full, the oldest entry makes room: a client that
    /// only asks for challenges cannot lock others out (CI found 4,100 requests in a second
    /// blocked release for the nonce lifetime), and an evicted nonce is refused as unknown, so
    /// nothing becomes acceptable that was not. A genuine client answers its challenge within
    /// milliseconds; evicting it would take MAX_OUTSTANDING_NONCES requests in that time.
    fn issue(&mut self, now: Instant, max_age: Duration) -> Result<[u8; NONCE_LEN], KbsError> {
        self.purge(now, max_age);
        if self.issued.len() >= MAX_OUTSTANDING_NONCES {
            let oldest = self
                .issued
                .iter()
                .min_by_key(|(_, i)| i.at)
                .map(|(n, _)| *n);
            if let Some(n) = oldest {
                self.issued.remove(&n);
            }
        }
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::getrandom(&mut nonce).map_err(|e| KbsError::Wrap(e.to_string()))?;
        self.issued.insert(
            nonce,
            Issued {
                at: now,
                used: false,
            },
        );
        Ok(nonce)
    }

    /// Consumes a nonce: it must be known, unexpired and unused.
    fn consume(
        &mut self,
        nonce: &[u8; NONCE_LEN],
        now: Instant,
        max_age: Duration,
    ) -> Result<(), KbsError> {
        match self.issued.get_mut(nonce) {
            Some(i) if now.saturating_duration_since(i.at) > max_age => {
                self.issued.remove(nonce);
                Err(KbsError::NonceUnknownOrExpired)
            }
            Some(i) if i.used => Err(KbsError::NonceReplayed),
            Some(i) => {
                i.used = true;
                Ok(())
            }
            None => Err(KbsError::NonceUnknownOrExpired),
        }
    }
}

/// Why a broker cannot start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(transparent)]
    Kbs(#[from] KbsError),
    #[error(transparent)]
    Secret(#[from] crate::kbs_guest::SecretFileError),
}

/// The broker: the policy, the tenant key, the guest secret and the issued nonces.
pub struct Broker {
    policy: Policy,
    key: Zeroizing<[u8; 32]>,
    /// `[guest] secret-file`'s bytes, if the policy has `[guest]`.
    guest_secret: Option<Zeroizing<Vec<u8>>>,
    nonces: Mutex<Nonces>,
}

impl Broker {
    /// A broker for `policy`: reads the key file (and the guest secret) and checks the
    /// certificate directory's ARK against the pin now, so that a misconfiguration fails at
    /// start, not per request.
    pub fn new(policy: Policy) -> Result<Broker, BrokerError> {
        let key = load_key(&policy.key_file)?;
        let guest_secret = match &policy.guest {
            Some(g) => Some(crate::kbs_guest::load_secret(&g.secret_file)?),
            None => None,
        };
        let found = crate::verify::ark_fingerprint(&policy.certs).map_err(KbsError::from)?;
        if found != policy.ark_fingerprint {
            return Err(KbsError::ArkNotPinned {
                certs: policy.certs.display().to_string(),
                found,
                pinned: policy.ark_fingerprint.clone(),
            }
            .into());
        }
        Ok(Broker {
            policy,
            key,
            guest_secret,
            nonces: Mutex::default(),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The guest secret, if the policy releases one.
    pub(crate) fn guest_secret(&self) -> Option<&[u8]> {
        self.guest_secret.as_deref().map(|s| &s[..])
    }

    /// Issues `nonce` as if it had been a challenge (tests replaying captured evidence).
    #[cfg(test)]
    pub(crate) fn issue_nonce(&self, nonce: [u8; NONCE_LEN], now: Instant) {
        self.nonces().issued.insert(
            nonce,
            Issued {
                at: now,
                used: false,
            },
        );
    }

    /// Consumes a challenge nonce: it must be known, unexpired and unused.
    pub(crate) fn consume_nonce(
        &self,
        nonce: &[u8; NONCE_LEN],
        now: Instant,
    ) -> Result<(), KbsError> {
        self.nonces().consume(nonce, now, self.policy.max_nonce_age)
    }

    fn nonces(&self) -> std::sync::MutexGuard<'_, Nonces> {
        // A panic while holding the lock cannot leave the table inconsistent (each operation
        // is one map update), so a poisoned lock is still good.
        self.nonces.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh challenge nonce.
    pub fn challenge(&self, now: Instant) -> Result<[u8; NONCE_LEN], KbsError> {
        self.nonces().issue(now, self.policy.max_nonce_age)
    }

    /// Judges a key request; the wrapped key if everything holds.
    pub fn release(&self, req: &KeyRequest, now: Instant) -> Result<Wrapped, KbsError> {
        self.consume_nonce(&req.nonce, now)?;
        crate::verify::verify(
            &req.report[..],
            &self.policy.certs,
            &self.policy.ark_fingerprint,
            None,
            None,
        )?;
        let facts = ReportFacts::of(&req.report);
        let expected = binding(&req.nonce, &req.transfer_bytes);
        if facts.report_data != expected {
            return Err(KbsError::Binding {
                found: hex(&facts.report_data),
                expected: hex(&expected),
            });
        }
        self.policy.admit(&facts)?;
        wrap(&self.key, &req.nonce, &req.transfer_key)
    }

    /// Answers one request line with one reply line (without the newline), and logs it.
    pub fn handle_line(&self, line: &[u8], now: Instant, peer: &str) -> String {
        match crate::kbs_guest::parse_guest_request(line) {
            Ok(Some(req)) => return self.handle_guest(&req, now, peer),
            Ok(None) => {}
            Err(refusal) => {
                tracing::warn!(%peer, "guest-key refused: {refusal}");
                return refusal.reply();
            }
        }
        let outcome = parse_request(line).and_then(|req| match req {
            Request::Challenge => self.challenge(now).map(|nonce| {
                tracing::debug!(%peer, "challenge issued");
                serde_json::json!({
                    "nonce": hex(&nonce),
                    "expires_in_secs": self.policy.max_nonce_age.as_secs(),
                })
                .to_string()
            }),
            Request::Key(req) => self.release(&req, now).map(|w| {
                let facts = ReportFacts::of(&req.report);
                tracing::info!(
                    %peer,
                    measurement = %hex(&facts.measurement),
                    "key RELEASED (wrapped to the attested transfer key)"
                );
                serde_json::json!({
                    "server_key": hex(&w.server_key),
                    "wrapped_key": hex(&w.wrapped_key),
                })
                .to_string()
            }),
        });
        outcome.unwrap_or_else(|e| {
            tracing::warn!(%peer, "refused: {e}");
            error_line(&e)
        })
    }

    /// Serves one connection: one request line, one reply line. While it waits for the
    /// request and after the reply, `seat` lets a newer connection evict it.
    fn serve_connection(&self, stream: TcpStream, seat: &Seat) {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        seat.waiting(&stream);
        let read = read_line(&stream, Instant::now() + REQUEST_DEADLINE);
        if !seat.working() {
            // Evicted while waiting: its seat is a newer connection's now, and what it had
            // sent (a shutdown read returns the buffered bytes) is not worked on.
            return;
        }
        let reply = match read {
            Ok(line) => self.handle_line(&line, Instant::now(), &peer),
            Err(KbsError::Closed) => return,
            Err(e) => {
                tracing::warn!(%peer, "refused: {e}");
                error_line(&e)
            }
        };
        send_and_close(stream, &reply, seat);
    }
}

/// Writes `reply` and a newline, then closes, first reading and discarding briefly what the
/// peer still sends so that the close does not reset the connection under the reply.
fn send_and_close(mut stream: TcpStream, reply: &str, seat: &Seat) {
    let _ = stream.set_write_timeout(Some(REQUEST_DEADLINE));
    let mut line = reply.as_bytes().to_vec();
    line.push(b'\n');
    if stream
        .write_all(&line)
        .and_then(|_| stream.flush())
        .is_err()
    {
        return;
    }
    let _ = stream.shutdown(Shutdown::Write);
    // The reply is out: from here the connection may give its seat away (first of all).
    seat.lingering(&stream);
    let until = Instant::now() + LINGER;
    let mut drained = 0;
    let mut sink = [0u8; 4096];
    while drained < LINGER_BYTES {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

/// What an evictable connection is doing; the first kind goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Idle {
    /// Answered, draining what the peer still sends.
    Lingering,
    /// Waiting for its request line.
    Waiting,
}

/// The connections being served, and which of them may be closed to make room.
#[derive(Default)]
struct Seats {
    active: usize,
    next_id: u64,
    /// Connections waiting for their request or lingering after their reply: what, since
    /// when, and a handle to shut them down. Connections being worked on are never here.
    evictable: HashMap<u64, (Idle, Instant, TcpStream)>,
    /// Connections evicted whose threads have not yet noticed.
    evicted: std::collections::HashSet<u64>,
}

impl Seats {
    /// Closes one idle connection (lingering ones first, then the longest waiting); false if
    /// none is idle.
    fn evict_one(&mut self) -> bool {
        let first = self
            .evictable
            .iter()
            .min_by_key(|(_, (idle, since, _))| (*idle, *since))
            .map(|(id, _)| *id);
        match first.and_then(|id| self.evictable.remove(&id).map(|e| (id, e))) {
            Some((id, (_, _, stream))) => {
                // Its thread's read or linger returns at once and the thread ends.
                let _ = stream.shutdown(Shutdown::Both);
                self.evicted.insert(id);
                true
            }
            None => false,
        }
    }
}

/// One connection's seat; given up when dropped (also if its thread panics).
struct Seat {
    seats: Arc<std::sync::Mutex<Seats>>,
    id: u64,
}

impl Seat {
    fn lock(&self) -> std::sync::MutexGuard<'_, Seats> {
        self.seats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn idle(&self, what: Idle, stream: &TcpStream) {
        if let Ok(handle) = stream.try_clone() {
            let mut seats = self.lock();
            if !seats.evicted.contains(&self.id) {
                seats
                    .evictable
                    .insert(self.id, (what, Instant::now(), handle));
            }
        }
    }

    fn waiting(&self, stream: &TcpStream) {
        self.idle(Idle::Waiting, stream);
    }

    fn lingering(&self, stream: &TcpStream) {
        self.idle(Idle::Lingering, stream);
    }

    /// Leaves the evictable set to work on a request; false if evicted already.
    fn working(&self) -> bool {
        let mut seats = self.lock();
        seats.evictable.remove(&self.id);
        !seats.evicted.contains(&self.id)
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut seats = self.lock();
        seats.evictable.remove(&self.id);
        seats.evicted.remove(&self.id);
        seats.active -= 1;
    }
}

/// Serves connections on `listener` forever: a thread per connection, at most
/// [`MAX_CLIENTS`] at once (see there for how room is made).
pub fn serve(broker: Arc<Broker>, listener: TcpListener) {
    let seats = Arc::new(std::sync::Mutex::new(Seats::default()));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and the like: wait, rather than spin.
                tracing::warn!("accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let (admitted, evicted) = {
            let mut s = seats.lock().unwrap_or_else(|e| e.into_inner());
            // An evicted connection keeps its seat until its thread has ended (at once: it
            // does no more work), so the count passes the limit briefly; never past twice it.
            let (room, evicted) = if s.active < MAX_CLIENTS {
                (true, false)
            } else if s.active < 2 * MAX_CLIENTS && s.evict_one() {
                (true, true)
            } else {
                (false, false)
            };
            if room {
                s.active += 1;
                s.next_id += 1;
            }
            (room.then_some(s.next_id), evicted)
        };
        if evicted {
            tracing::warn!("all {MAX_CLIENTS} seats taken: closed the connection idle longest");
        }
        let Some(id) = admitted else {
            tracing::warn!("refused a connection: {}", KbsError::Busy);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let mut line = error_line(&KbsError::Busy).into_bytes();
            line.push(b'\n');
            let mut stream = stream;
            let _ = stream.write_all(&line);
            continue;
        };
        let seat = Seat {
            seats: seats.clone(),
            id,
        };
        let broker = broker.clone();
        let spawned = std::thread::Builder::new()
            .name("kbs-client".into())
            .spawn(move || {
                broker.serve_connection(stream, &seat);
            });
        if let Err(e) = spawned {
            tracing::warn!("no thread for a client: {e}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The command line.

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

/// The measurement `paravisor run` would produce for `manifest` and the test guest.
fn default_measurement(manifest: Option<&Path>) -> Result<[u8; 48], String> {
    use microkernel::partition;
    let path = manifest.unwrap_or(Path::new(microkernel::manifest::DEFAULT_MANIFEST));
    let m = microkernel::manifest::Manifest::load(path).map_err(|e| e.to_string())?;
    let bin_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let guest = partition::GuestConfig {
        image: partition::Image::TestGuest {
            path: None,
            command_line: String::new(),
        },
        memory: partition::TEST_GUEST_MEMORY,
        vcpus: 1,
        watchdog: Some(partition::TEST_GUEST_WATCHDOG),
    };
    microkernel::measure::launch(&m, &bin_dir, Some(&guest))
        .map(|l| l.measurement)
        .map_err(|e| e.to_string())
}

fn write_new_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Runs `paravisor kbs ...`.
pub fn run(cmd: KbsCmd) -> ExitCode {
    match run_inner(cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("paravisor kbs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(cmd: KbsCmd) -> Result<(), String> {
    match cmd {
        KbsCmd::Serve { policy, listen } => {
            let Listen { addr, network } = listen_address(&listen).map_err(|e| e.to_string())?;
            init_logging();
            let policy = Policy::load(&policy).map_err(|e| e.to_string())?;
            let broker = Broker::new(policy).map_err(|e| e.to_string())?;
            let listener = TcpListener::bind(addr)
                .map_err(|error| KbsError::Listen { addr, error }.to_string())?;
            let p = broker.policy();
            if network {
                tracing::warn!(
                    "listening on {addr}, not loopback: the protocol is safe on an untrusted \
                     network (one-time nonces; keys and secrets leave only wrapped to attested \
                     keys), but anyone on that network can reach this listener"
                );
            }
            tracing::info!(
                "key broker listening on {} (key id {}; {} allowed measurement(s), nonces valid {} s, ARK {})",
                listener.local_addr().unwrap_or(addr),
                key_id(&broker.key),
                p.allowed_measurements.len(),
                p.max_nonce_age.as_secs(),
                p.ark_fingerprint
            );
            if let Some(g) = &p.guest {
                tracing::info!(
                    "guest-key: releasing {} to guest evidence at VMPL {} ({} PCR(s) pinned)",
                    g.secret_file.display(),
                    g.vmpl,
                    g.pcrs.len()
                );
            }
            serve(Arc::new(broker), listener);
            Ok(())
        }
        KbsCmd::InitKey { file } => {
            init_key(&file).map_err(|e| e.to_string())?;
            let key = load_key(&file).map_err(|e| e.to_string())?;
            println!(
                "{}: a new 32-byte tenant key (mode 0600); key id {} (put it in the paravisor's manifest: `[attest] key-release-id`)",
                file.display(),
                key_id(&key)
            );
            Ok(())
        }
        KbsCmd::Fetch {
            kbs,
            platform_dir,
            measurement,
            manifest,
            out,
        } => {
            let addr = std::net::ToSocketAddrs::to_socket_addrs(kbs.as_str())
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| KbsError::BadAddress(kbs.clone()).to_string())?;
            let measurement: [u8; 48] = match measurement {
                Some(m) => parse_hex(&m)
                    .and_then(|v| v.try_into().ok())
                    .ok_or("--measurement is not 48 bytes of hex")?,
                None => default_measurement(manifest.as_deref())?,
            };
            let platform =
                microkernel::platform::Platform::open(&platform_dir).map_err(|e| e.to_string())?;
            let key = fetch_key(addr, |report_data| {
                platform
                    .report(&microkernel::snp::ReportRequest {
                        report_data: *report_data,
                        measurement,
                        host_data: [0; 32],
                        vmpl: 0,
                        policy: microkernel::snp::POLICY,
                        report_id: microkernel::platform::new_report_id()
                            .map_err(|e| e.to_string())?,
                    })
                    .map(|r| r.to_vec())
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| e.to_string())?;
            write_new_private(&out, &key[..]).map_err(|e| format!("{}: {e}", out.display()))?;
            println!(
                "{}: the tenant key, released by the broker at {addr} for measurement {} \
                 (report from the SIMULATED platform)",
                out.display(),
                hex(&measurement)
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kbs_args::POLICY_HELP;
    use p384::ecdh::EphemeralSecret;

    /// The generator of P-384, SEC1 uncompressed: a valid transfer key.
    const G: &str = "04aa87ca22be8b05378eb1c71ef320ad746e1d3b628ba79b9859f741e082542a385502f25dbf55296c3a545e3872760ab73617de4a96262c6f5d9e98bf9292dc29f8f41dbd289a147ce9da3113b5f0b8c00a60b1ce1d7e819d7a431d7c90ea0e5f";

    fn g() -> Vec<u8> {
        parse_hex(G).unwrap()
    }

    /// Seats: lingering connections are evicted before waiting ones, the longest waiting
    /// first; an evicted connection cannot go on to be worked on; counts balance.
    #[test]
    fn seats_evict_idle_connections_in_order_and_evicted_ones_do_no_work() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Vec::new();
        for _ in 0..3 {
            let client = TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            conns.push((client, server));
        }
        let seats = Arc::new(std::sync::Mutex::new(Seats::default()));
        let seat = |id| {
            seats.lock().unwrap().active += 1;
            Seat {
                seats: seats.clone(),
                id,
            }
        };
        let (a, b, c) = (seat(1), seat(2), seat(3));
        a.waiting(&conns[0].1);
        b.waiting(&conns[1].1);
        assert!(c.working(), "c works on a request: not evictable");
        c.lingering(&conns[2].1);
        // Lingering c goes first although it became idle last; then a, waiting longest.
        assert!(seats.lock().unwrap().evict_one());
        assert!(seats.lock().unwrap().evicted.contains(&3));
        assert!(seats.lock().unwrap().evict_one());
        assert!(!a.working(), "evicted while waiting: no work");
        assert!(b.working());
        assert!(!seats.lock().unwrap().evict_one(), "nothing idle is left");
        // The evicted socket was shut down: its peer sees the end.
        let mut buf = [0u8; 1];
        conns[0]
            .0
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!((&conns[0].0).read(&mut buf).unwrap(), 0);
        drop((a, b, c));
        let s = seats.lock().unwrap();
        assert_eq!((s.active, s.evictable.len(), s.evicted.len()), (0, 0, 0));
    }

    /// The policy format `kbs serve --help` shows parses as shown (placeholders filled in).
    #[test]
    fn the_help_texts_policy_example_is_a_valid_policy() {
        let body = POLICY_HELP
            .split_once("\n\n")
            .and_then(|(_, rest)| rest.split_once("\nRequired:"))
            .map(|(example, _)| example)
            .unwrap();
        let text: String = body
            .lines()
            .map(|l| format!("{}\n", l.strip_prefix("  ").unwrap_or(l)))
            .collect::<String>()
            .replace("9f3c...", &"ab".repeat(32))
            .replace("<sha256>", &"ef".repeat(32))
            .replace("[\"...\"]", &format!("[\"{}\"]", "cd".repeat(48)));
        let p = Policy::parse(&text, Path::new("/etc/kbs"), "help").unwrap();
        assert_eq!(p.key_file, Path::new("/etc/kbs/tenant.key"));
        assert_eq!(p.max_nonce_age, Duration::from_secs(60));
        let guest = p.guest.unwrap();
        assert_eq!(guest.secret_file, Path::new("/etc/kbs/disk.secret"));
        assert_eq!(guest.pcrs[&7], vec![[0xef; 32]]);
    }

    /// Python: hashlib.sha512(b"pv-kbs-v1" + b"\x11" * 32 + G).hexdigest()
    #[test]
    fn binding_matches_an_independent_computation() {
        assert_eq!(
            hex(&binding(&[0x11; 32], &g())),
            "fff9d7c72d4df6b6667e80153a6a4dcaa86ec225ba68603fa0cd0485feb2ac0a266b6c79314815c98b140c66cbae2b5101ec8740bed0dcaca39c684bbc934e85"
        );
        assert_ne!(binding(&[0x11; 32], &g()), binding(&[0x12; 32], &g()));
    }

    #[test]
    fn a_wrapped_key_opens_only_with_its_transfer_key_and_nonce() {
        let key = [0x42u8; 32];
        let nonce = [7u8; 32];
        let transfer = EphemeralSecret::random(&mut rand_core::OsRng);
        let w = wrap(&key, &nonce, &transfer.public_key()).unwrap();
        assert_ne!(&w.wrapped_key[..32], &key[..], "the key travels encrypted");
        assert_eq!(*unwrap(&transfer, &nonce, &w).unwrap(), key);
        // Two wraps of one key differ (a fresh server key each time).
        assert_ne!(wrap(&key, &nonce, &transfer.public_key()).unwrap(), w);
        // Another transfer key, another nonce, a flipped bit anywhere: refused.
        let other = EphemeralSecret::random(&mut rand_core::OsRng);
        assert!(matches!(unwrap(&other, &nonce, &w), Err(KbsError::Unwrap)));
        assert!(matches!(
            unwrap(&transfer, &[8; 32], &w),
            Err(KbsError::Unwrap)
        ));
        for at in [0, 31, 32, 47] {
            let mut bad = w.clone();
            bad.wrapped_key[at] ^= 1;
            assert!(matches!(
                unwrap(&transfer, &nonce, &bad),
                Err(KbsError::Unwrap)
            ));
        }
        let mut bad = w.clone();
        bad.server_key[50] ^= 1;
        assert!(matches!(
            unwrap(&transfer, &nonce, &bad),
            Err(KbsError::Unwrap)
        ));
    }

    fn request(nonce: &str, key: &str, report: &str) -> String {
        format!(
            r#"{{"request":"key","nonce":"{nonce}","transfer_key":"{key}","report":"{report}"}}"#
        )
    }

    #[test]
    fn requests_parse_strictly() {
        assert!(matches!(
            parse_request(br#"{"request":"challenge"}"#),
            Ok(Request::Challenge)
        ));
        let nonce = "ab".repeat(32);
        let report = "00".repeat(REPORT_LEN);
        match parse_request(request(&nonce, G, &report).as_bytes()) {
            Ok(Request::Key(k)) => {
                assert_eq!(k.nonce, [0xab; 32]);
                assert_eq!(k.transfer_bytes.to_vec(), g());
            }
            other => panic!("{other:?}"),
        }
        let field = |r: Result<Request, KbsError>| match r {
            Err(KbsError::BadField { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            field(parse_request(request("ab", G, &report).as_bytes())),
            "nonce"
        );
        assert_eq!(
            field(parse_request(request(&nonce, "zz", &report).as_bytes())),
            "transfer_key"
        );
        // Compressed, or not on the curve.
        let compressed = format!("02{}", &G[2..98]);
        assert_eq!(
            field(parse_request(
                request(&nonce, &compressed, &report).as_bytes()
            )),
            "transfer_key"
        );
        let off_curve = format!("{}00", &G[..G.len() - 2]);
        assert_eq!(
            field(parse_request(
                request(&nonce, &off_curve, &report).as_bytes()
            )),
            "transfer_key"
        );
        assert_eq!(
            field(parse_request(request(&nonce, G, "00").as_bytes())),
            "report"
        );
        for bad in [
            &b"hello"[..],
            br#"{"request":"challenge","extra":1}"#,
            br#"{"request":"key","nonce":"","transfer_key":"","report":"","extra":1}"#,
            br#"{"request":"challenge","request":"challenge"}"#,
            br#"{"request":"steal"}"#,
            br#"{"nonce":"00"}"#,
            b"",
        ] {
            assert!(
                matches!(parse_request(bad), Err(KbsError::Malformed(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_request(&vec![b' '; MAX_LINE + 1]),
            Err(KbsError::LineTooLong)
        ));
    }

    #[test]
    fn replies_parse_strictly() {
        match parse_reply(br#"{"error":"no"}"#) {
            Ok(Reply::Error(e)) => assert_eq!(e, "no"),
            other => panic!("{other:?}"),
        }
        let n = "cd".repeat(32);
        assert!(matches!(
            parse_reply(format!(r#"{{"nonce":"{n}","expires_in_secs":5}}"#).as_bytes()),
            Ok(Reply::Challenge {
                nonce: [0xcd, ..],
                expires_in_secs: 5
            })
        ));
        assert!(parse_reply(format!(r#"{{"nonce":"{n}","error":"x"}}"#).as_bytes()).is_err());
        assert!(parse_reply(br#"{"server_key":"04"}"#).is_err());
        assert!(parse_reply(b"{}").is_err());
    }

    #[test]
    fn a_nonce_is_good_once_and_only_while_fresh() {
        let age = Duration::from_secs(60);
        let mut n = Nonces::default();
        let t0 = Instant::now();
        let a = n.issue(t0, age).unwrap();
        let b = n.issue(t0, age).unwrap();
        assert_ne!(a, b);
        assert!(matches!(
            n.consume(&[0; 32], t0, age),
            Err(KbsError::NonceUnknownOrExpired)
        ));
        n.consume(&a, t0, age).unwrap();
        assert!(matches!(
            n.consume(&a, t0, age),
            Err(KbsError::NonceReplayed)
        ));
        let late = t0 + age + Duration::from_secs(1);
        assert!(matches!(
            n.consume(&b, late, age),
            Err(KbsError::NonceUnknownOrExpired)
        ));
        // Expired ones are forgotten; the table is bounded.
        n.purge(late, age);
        assert!(n.issued.is_empty());
        let first = n.issue(t0, age).unwrap();
        for _ in 1..MAX_OUTSTANDING_NONCES {
            n.issue(t0 + Duration::from_millis(1), age).unwrap();
        }
        // Full: the next challenge evicts the oldest, which is then refused as unknown.
        let newest = n.issue(t0 + Duration::from_millis(2), age).unwrap();
        assert_eq!(n.issued.len(), MAX_OUTSTANDING_NONCES);
        let now = t0 + Duration::from_millis(3);
        assert!(matches!(
            n.consume(&first, now, age),
            Err(KbsError::NonceUnknownOrExpired)
        ));
        n.consume(&newest, now, age).unwrap();
        n.issue(late, age).unwrap();
        assert_eq!(n.issued.len(), 1, "expired challenges are purged");
    }

    const POLICY_TEXT: &str = r#"
key-file = "tenant.key"
certs = "certs"
ark-fingerprint = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
allowed-measurements = ["abababababababababababababababababababababababababababababababababababababababababababababababab"]
[minimum-tcb]
bootloader = 3
tee = 0
snp = 8
microcode = 115
"#;

    #[test]
    fn the_policy_judges_measurement_vmpl_guest_policy_and_tcb() {
        let p = Policy::parse(POLICY_TEXT, Path::new("/etc/kbs"), "p.toml").unwrap();
        assert_eq!(p.key_file, Path::new("/etc/kbs/tenant.key"));
        assert_eq!(p.max_nonce_age, Duration::from_secs(60));
        let good = ReportFacts {
            policy: microkernel::snp::POLICY,
            vmpl: 0,
            report_data: [0; 64],
            measurement: [0xab; 48],
            reported_tcb: microkernel::platform::TCB,
        };
        p.admit(&good).unwrap();
        let e = p
            .admit(&ReportFacts {
                measurement: [0xac; 48],
                ..good
            })
            .unwrap_err();
        assert!(e.to_string().contains(&"ac".repeat(48)), "{e}");
        assert!(matches!(
            p.admit(&ReportFacts { vmpl: 1, ..good }),
            Err(KbsError::Vmpl {
                found: 1,
                required: 0
            })
        ));
        assert!(matches!(
            p.admit(&ReportFacts {
                policy: good.policy | POLICY_DEBUG,
                ..good
            }),
            Err(KbsError::DebugAllowed(_))
        ));
        assert!(matches!(
            p.admit(&ReportFacts {
                policy: good.policy | POLICY_MIGRATE_MA,
                ..good
            }),
            Err(KbsError::MigrationAgentAllowed(_))
        ));
        let old = Tcb {
            snp: 7,
            ..microkernel::platform::TCB
        };
        let e = p
            .admit(&ReportFacts {
                reported_tcb: old,
                ..good
            })
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "reported TCB SNP SPL 7 is below the policy's minimum 8"
        );
        let no_smt = Policy::parse(
            &POLICY_TEXT.replace(
                "[minimum-tcb]",
                "[guest-policy]\nallow-smt = false\n[minimum-tcb]",
            ),
            Path::new("."),
            "p",
        )
        .unwrap();
        assert!(matches!(no_smt.admit(&good), Err(KbsError::SmtAllowed(_))));
    }

    #[test]
    fn bad_policies_are_refused_with_their_reason() {
        let bad = |text: String, needle: &str| {
            let e = Policy::parse(&text, Path::new("."), "p.toml").unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        };
        bad(POLICY_TEXT.replace("certs = ", "cert = "), "unknown field");
        bad(
            POLICY_TEXT.replace("[\"abab", "[\"zzab"),
            "allowed-measurements[0]",
        );
        bad(
            POLICY_TEXT.replace("ark-fingerprint = \"00", "ark-fingerprint = \"0"),
            "ark-fingerprint",
        );
        bad(format!("max-nonce-age = 0\n{POLICY_TEXT}"), "max-nonce-age");
        bad(POLICY_TEXT.replace("microcode = 115", ""), "microcode");
        bad(
            POLICY_TEXT.replace(
                "allowed-measurements = [\"",
                "allowed-measurements = []\nx = [\"",
            ),
            "unknown field",
        );
    }

    #[test]
    fn key_files_must_be_private_and_32_bytes() {
        let dir = std::env::temp_dir().join(format!("pv-kbs-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let k = dir.join("k");
        init_key(&k).unwrap();
        assert!(init_key(&k).is_err(), "never overwrites");
        assert_eq!(load_key(&k).unwrap().len(), 32);
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            load_key(&k),
            Err(KbsError::KeyFileMode { mode: 0o640, .. })
        ));
        let short = dir.join("short");
        write_new_private(&short, &[1; 31]).unwrap();
        assert!(matches!(
            load_key(&short),
            Err(KbsError::KeyFileSize { len: 31, .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
