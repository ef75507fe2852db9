//! `paravisor kbs ...`'s arguments, and what `--listen` accepts. The key broker runs in the
//! tools binary (`pv-tools`): it belongs to the tenant, outside the paravisor's trust
//! boundary.

use std::net::SocketAddr;
use std::path::PathBuf;

use microkernel::key_release::DEFAULT_LISTEN;

/// The policy file's format, for `kbs serve --help`.
pub const POLICY_HELP: &str = "\
Policy file (TOML; relative paths are relative to the policy file; unknown keys are errors):

  key-file = \"tenant.key\"          # 32 raw bytes, mode 0600 (`paravisor kbs init-key`)
  certs = \"certs\"                  # ark.pem, ask.pem, vcek.pem (`paravisor attest certs`)
  ark-fingerprint = \"9f3c...\"      # SHA-256 of the ARK (`paravisor attest fingerprint`)
  allowed-measurements = [\"...\"]   # launch digests, 48 bytes hex (`paravisor measure`)
  max-nonce-age = 60               # seconds a challenge stays valid [default 60, max 3600]
  vmpl = 0                         # the VMPL reports must come from [default 0]

  [guest-policy]                   # the report's SNP guest policy bits [all optional]
  allow-debug = false              # bit 19 DEBUG [default false]
  allow-migration-agent = false    # bit 18 MIGRATE_MA [default false]
  allow-smt = true                 # bit 16 SMT [default true]

  [minimum-tcb]                    # the report's REPORTED_TCB, per component (required)
  bootloader = 3
  tee = 0
  snp = 8
  microcode = 115

  [guest]                          # guest-key: guests' own vTPM evidence [optional]
  secret-file = \"disk.secret\"      # 1 to 190 bytes, mode 0600: wrapped to the guest's TPM
  vmpl = 1                         # the VMPL guest reports come from [default 1]
  pcrs = { \"7\" = [\"<sha256>\"] }    # sha256 PCR -> allowed value(s) [default: none pinned]

Required: key-file, certs, ark-fingerprint, allowed-measurements, and [minimum-tcb] with all
four components. allowed-measurements, [guest-policy] and [minimum-tcb] judge guest reports
too. Each quote's PCR values are logged: pin them from a boot you trust.";

/// `paravisor kbs ...`
#[derive(clap::Subcommand, Debug)]
pub enum KbsCmd {
    /// Run the key broker in the foreground: it releases the tenant key, wrapped, to reports
    /// that verify and satisfy the policy, and (with `[guest]`) the guest secret to a guest's
    /// vTPM evidence (`tools/guest/pv-attest.sh`).
    #[command(after_help = POLICY_HELP)]
    Serve {
        /// The policy file (TOML; its keys are below).
        #[arg(long)]
        policy: PathBuf,
        /// Address to listen on: an IP address and port, loopback unless you name another
        /// (guests reach the broker on the host's end of their TAP: `ip netns exec NS
        /// paravisor kbs serve --listen 10.0.2.2:8700`); never every interface.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        listen: String,
    },
    /// Create a tenant key file: 32 random bytes, mode 0600 (never overwrites).
    InitKey { file: PathBuf },
    /// TEST TOOL: fetch the key with a report from the SIMULATED platform (the real client
    /// is the paravisor's attest path) and write it to a new file (mode 0600).
    Fetch {
        /// The broker's address.
        #[arg(long)]
        kbs: String,
        /// The simulated platform that signs the report.
        #[arg(long)]
        platform_dir: PathBuf,
        /// The measurement to report (hex) [default: what `paravisor measure` gives for
        /// the manifest and the test guest].
        #[arg(long)]
        measurement: Option<String>,
        /// The manifest for the default measurement [default: manifest.toml].
        #[arg(long, conflicts_with = "measurement")]
        manifest: Option<PathBuf>,
        #[arg(short, long)]
        out: PathBuf,
    },
}

/// Why `--listen` is refused.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("\"{0}\" is not an IP address and port (such as {DEFAULT_LISTEN}, or 10.0.2.2:8700 for guests behind a TAP)")]
    BadAddress(String),
    #[error("{0} is every interface of this host: the broker listens on loopback, or on the one address you name (such as 10.0.2.2:8700, the host's end of the guests' TAP)")]
    EveryInterface(SocketAddr),
}

/// Where the broker listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    pub addr: SocketAddr,
    /// Not loopback: reachable from a network (guests reach the broker over a TAP).
    pub network: bool,
}

/// Parses a listen address: an IP address and port, loopback or one named address (never
/// the unspecified address, which is every interface).
pub fn listen_address(s: &str) -> Result<Listen, ListenError> {
    let addr: SocketAddr = s
        .trim()
        .parse()
        .map_err(|_| ListenError::BadAddress(s.to_string()))?;
    if addr.ip().is_unspecified() {
        return Err(ListenError::EveryInterface(addr));
    }
    Ok(Listen {
        addr,
        network: !addr.ip().is_loopback(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broker_listens_on_loopback_or_one_named_address_never_on_every_interface() {
        assert!(!listen_address("127.0.0.1:8700").unwrap().network);
        assert!(!listen_address("[::1]:8700").unwrap().network);
        // The host's end of a guests' TAP: allowed, and marked as reachable from a network.
        let tap = listen_address("10.0.2.2:8700").unwrap();
        assert!(tap.network);
        assert_eq!(tap.addr.to_string(), "10.0.2.2:8700");
        for every in ["0.0.0.0:8700", "[::]:8700"] {
            assert!(matches!(
                listen_address(every),
                Err(ListenError::EveryInterface(_))
            ));
        }
        assert!(matches!(
            listen_address("localhost"),
            Err(ListenError::BadAddress(_))
        ));
    }
}
