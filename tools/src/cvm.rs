//! A confidential VM on this machine, end to end, as the README's "A confidential VM on your
//! machine" sets it up by hand: a tenant (broker directory with its tenant key, the disk
//! secret and a `[guest]` policy), a network namespace with a persistent TAP whose host side
//! is the broker's address, the broker (`kbs serve`) inside that namespace, and `paravisor
//! run --vmm qemu` of the Linux image with the TAP as its NIC's back end and the kernel
//! command line that makes the image's /init attest and unlock its data disk
//! (`pv.ip`, `pv.kbs`, `pv.disk`, `pv.provision`: docs/linux-harness.md).
//!
//! Used by the tests (tests/tests/cvm_attest.rs) and `paravisor bench chaos`. Needs root
//! (namespaces, TAPs, the sandbox) and `ip`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;
use std::time::Instant;

use crate::bench_net_host::Netns;
use crate::bench_storage::err;
use crate::bench_vtpm::Guard;

/// The TAP's host side: the broker's address.
pub const HOST_ADDRESS: &str = "10.0.2.2";
/// The guest's address on its NIC.
pub const GUEST_ADDRESS: &str = "10.0.2.15/24";
/// The broker's port.
pub const KBS_PORT: u16 = 8700;
/// The TAP's name in the namespace (at most 15 bytes).
pub const TAP: &str = "pvtap0";
/// The guest's data disk: the shipped manifest's vhost-user-blk disk.
pub const DATA_DISK: &str = "/dev/vda";
/// The kernel command line's fixed part.
pub const CMDLINE: &str = "console=ttyS0 quiet loglevel=4 panic=-1";
/// How long the broker may take to listen.
const BROKER_START: Duration = Duration::from_secs(30);

/// The kernel command line that makes the image's /init attest to the broker in this world
/// and open its data disk (`provision`: format it if it holds no LUKS header).
pub fn guest_cmdline(provision: bool) -> String {
    format!(
        "{CMDLINE} pv.ip={GUEST_ADDRESS} pv.kbs={HOST_ADDRESS}:{KBS_PORT} pv.disk={DATA_DISK}{}",
        if provision { " pv.provision=1" } else { "" }
    )
}

/// The network: a namespace of its own with a persistent TAP at [`HOST_ADDRESS`], which
/// `run --tap net0=TAP@NETNS` attaches (so the broker can bind its address first).
pub struct Network {
    pub netns: Netns,
}

impl Network {
    pub fn new(tag: &str) -> std::io::Result<Network> {
        let netns = Netns::new(tag)?;
        netns.ip(&["tuntap", "add", TAP, "mode", "tap"])?;
        netns.ip(&["addr", "add", &format!("{HOST_ADDRESS}/24"), "dev", TAP])?;
        netns.ip(&["link", "set", TAP, "up"])?;
        netns.ip(&["link", "set", "lo", "up"])?;
        Ok(Network { netns })
    }

    /// `run`'s `--tap` value for this network.
    pub fn tap_arg(&self) -> String {
        format!("net0={TAP}@{}", self.netns.name)
    }
}

/// What the tenant's broker releases and to what.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Allowed paravisor measurements (`paravisor measure --vmm qemu ...`).
    pub measurements: Vec<String>,
    /// sha256 PCR index -> allowed values.
    pub pcrs: Vec<(u32, Vec<String>)>,
    /// How long a challenge stays valid, in seconds.
    pub max_nonce_age: u64,
}

/// The tenant's side: its directory (tenant key, disk secret, certificates, policy) and its
/// broker in the world's namespace.
pub struct Broker {
    pub dir: PathBuf,
    pub secret: Vec<u8>,
    process: Option<Guard>,
}

impl Broker {
    /// Makes the tenant's directory in `dir`: the platform's certificates (from
    /// `platform_dir`), a tenant key and a random 32-byte disk secret.
    pub fn prepare(paravisor: &Path, dir: &Path, platform_dir: &Path) -> std::io::Result<Broker> {
        std::fs::create_dir_all(dir)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        let certs = dir.join("certs");
        run_ok(
            Command::new(paravisor)
                .args(["attest", "certs", "--platform-dir"])
                .arg(platform_dir)
                .arg("--out")
                .arg(&certs),
        )?;
        run_ok(
            Command::new(paravisor)
                .args(["kbs", "init-key"])
                .arg(dir.join("tenant.key")),
        )?;
        let mut secret = vec![0u8; 32];
        getrandom::getrandom(&mut secret).map_err(err)?;
        let path = dir.join("disk.secret");
        std::fs::write(&path, &secret)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Broker {
            dir: dir.to_path_buf(),
            secret,
            process: None,
        })
    }

    /// The ARK's fingerprint, as the policy pins it.
    fn fingerprint(&self, paravisor: &Path) -> std::io::Result<String> {
        let out = run_ok(
            Command::new(paravisor)
                .args(["attest", "fingerprint", "--certs"])
                .arg(self.dir.join("certs")),
        )?;
        Ok(out.trim().to_string())
    }

    /// Writes `policy` and (re)starts the broker with it in `network`'s namespace.
    pub fn serve(
        &mut self,
        paravisor: &Path,
        network: &Network,
        policy: &Policy,
    ) -> std::io::Result<()> {
        self.stop();
        let quoted = |v: &[String]| {
            v.iter()
                .map(|m| format!("\"{m}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let pcrs: Vec<String> = policy
            .pcrs
            .iter()
            .map(|(i, values)| format!("\"{i}\" = [{}]", quoted(values)))
            .collect();
        let text = format!(
            "key-file = \"tenant.key\"\ncerts = \"certs\"\nark-fingerprint = \"{}\"\n\
             allowed-measurements = [{}]\nmax-nonce-age = {}\n\
             [minimum-tcb]\nbootloader = 0\ntee = 0\nsnp = 0\nmicrocode = 0\n\
             [guest]\nsecret-file = \"disk.secret\"\npcrs = {{ {} }}\n",
            self.fingerprint(paravisor)?,
            quoted(&policy.measurements),
            policy.max_nonce_age.max(10),
            pcrs.join(", ")
        );
        let path = self.dir.join("policy.toml");
        std::fs::write(&path, text)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("kbs.log"))?;
        let mut cmd = network.netns.exec(paravisor);
        cmd.args(["kbs", "serve", "--policy"])
            .arg(&path)
            .args(["--listen", &format!("{HOST_ADDRESS}:{KBS_PORT}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("ip netns exec ... kbs serve: {e}")))?;
        self.process = Some(Guard::process(child));
        // Listening once a connection from inside the namespace is accepted (bash's
        // /dev/tcp: nothing else of ours runs in the namespace).
        let deadline = Instant::now() + BROKER_START;
        loop {
            let probe = network
                .netns
                .exec("bash")
                .args(["-c", &format!("exec 3<>/dev/tcp/{HOST_ADDRESS}/{KBS_PORT}")])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if probe {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(err(format!(
                    "the broker did not listen on {HOST_ADDRESS}:{KBS_PORT} within {BROKER_START:?}:\n{}",
                    self.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        self.process = None;
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kbs.log")).unwrap_or_default()
    }
}

/// `paravisor run --vmm qemu` of `kernel` and `initrd` on `network`, with the given kernel
/// command line, state and platform directories.
#[allow(clippy::too_many_arguments)]
pub fn run_command(
    paravisor: &Path,
    manifest: &Path,
    state_dir: &Path,
    platform_dir: &Path,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    network: &Network,
) -> Command {
    let mut cmd = Command::new(paravisor);
    cmd.arg("run")
        .arg(manifest)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--platform-dir")
        .arg(platform_dir)
        .args(["--vmm", "qemu", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .args(["--cmdline", cmdline, "--tap", &network.tap_arg()]);
    cmd
}

/// The paravisor measurement a report of this launch carries (`measure --vmm qemu`).
pub fn measurement(paravisor: &Path, manifest: &Path, kernel: &Path) -> std::io::Result<String> {
    let out = run_ok(
        Command::new(paravisor)
            .arg("measure")
            .arg(manifest)
            .args(["--vmm", "qemu", "--kernel"])
            .arg(kernel)
            .arg("--json"),
    )?;
    let log: serde_json::Value = serde_json::from_str(&out).map_err(err)?;
    log["measurement"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| err("measure --json has no measurement"))
}

/// Runs `cmd`; its stdout, or an error with its output.
fn run_ok(cmd: &mut Command) -> std::io::Result<String> {
    let out = cmd
        .output()
        .map_err(|e| err(format!("{:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(err(format!(
            "{:?} {:?} failed: {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The sha256 PCR 9 a UEFI boot of `--vmm qemu` leaves (Debian's OVMF, Linux 6.1's EFI
/// stub): the stub measures its load options, which OVMF makes of the command line and
/// ` initrd=initrd` (UTF-16LE, with the terminating NUL), then the initrd's bytes, each as
/// one extend of PCR 9 from zero. A tenant pins it without a reference boot; the tests check
/// it against the guest's own PCR.
pub fn expected_pcr9(cmdline: &str, initrd: &[u8]) -> String {
    use sha2::Digest;
    use sha2::Sha256;
    let options: Vec<u8> = format!("{cmdline} initrd=initrd\0")
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let mut pcr = [0u8; 32];
    for event in [Sha256::digest(&options), Sha256::digest(initrd)] {
        let mut h = Sha256::new();
        h.update(pcr);
        h.update(event);
        pcr = h.finalize().into();
    }
    microkernel::util::hex(&pcr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values read in a guest booted with `console=ttyS0 panic=-1` and an initrd whose
    /// SHA-256 was 33b3547b...: the load options event's digest d90b3bd6... (from the
    /// event log) comes out of the rule above.
    #[test]
    fn the_load_options_digest_is_the_utf16_command_line_with_the_initrd_option() {
        use sha2::Digest;
        let options: Vec<u8> = "console=ttyS0 panic=-1 initrd=initrd\0"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(
            microkernel::util::hex(&sha2::Sha256::digest(&options)),
            "d90b3bd67c5c4168eb0745f09aacc5deb6e58cee8d3b09e006ba0c99d9375aa4"
        );
        assert_eq!(expected_pcr9("x", b"").len(), 64);
    }
}
