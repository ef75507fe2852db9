//! The host configuration: what the host chooses for one instance and the launch does not
//! measure (where its state and platform live, which front ends it binds where, which host
//! interface each TAP is, where the key broker is, how it logs).
//!
//! `manifest.toml` is the paravisor's identity: its measured configuration
//! ([`crate::manifest::Manifest::measured_config`]) is the same on every host. It may name
//! defaults for these settings; a host file (`paravisor run --host FILE`) overrides them, and
//! command-line flags override both. So two instances of one release run side by side from
//! the same manifest (other state directories, other ports) with one measurement, and a port
//! that is busy on this host is moved without touching what sealed state is bound to.
//!
//! The file is TOML, strict (an unknown key is an error, so a misspelt setting is never
//! silently ignored), and bounded in size; relative paths are relative to the directory
//! `paravisor` is started in, as the manifest's are:
//!
//! ```toml
//! state-dir = "/var/lib/pv/b"
//! platform-dir = "/var/lib/pv/platform"
//! key-release = "127.0.0.1:8700"
//! listen = ["mssim-command=127.0.0.1:12321", "mssim-platform=127.0.0.1:12322"]
//! taps = ["net0=pvtap0@guests"]
//! log-format = "json"
//! log-file = "/var/log/pv/b.log"
//! ```

use std::path::Path;
use std::path::PathBuf;

use serde::Deserialize;

use crate::manifest::Manifest;

/// Largest host file read (it is a handful of lines).
const MAX_HOST_FILE: u64 = 64 << 10;

/// How the log is written (`logging.rs`).
pub use crate::logging::LogFormat;

/// A host file as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct HostConfig {
    pub state_dir: Option<PathBuf>,
    pub platform_dir: Option<PathBuf>,
    /// The key broker's loopback address (the tenant key's id is in the manifest, measured).
    pub key_release: Option<String>,
    /// Front ends to bind, as `--listen` takes them (`NAME`, `NAME=ADDRESS|PATH`, `all`).
    pub listen: Option<Vec<String>>,
    /// TAPs to attach, as `--tap` takes them (`NAME=IFNAME` or `NAME=IFNAME@NETNS`).
    pub taps: Option<Vec<String>>,
    pub log_format: Option<LogFormat>,
    pub log_file: Option<PathBuf>,
}

/// The settings one start uses, after manifest defaults, host file and flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSettings {
    pub state_dir: PathBuf,
    /// `None`: "platform" next to the state directory.
    pub platform_dir: Option<PathBuf>,
    pub key_release: Option<std::net::SocketAddr>,
    pub listen: Vec<String>,
    /// `NAME=IFNAME[@NETNS]` for each TAP to attach (none: no TAP is attached).
    pub taps: Vec<String>,
    pub log_format: LogFormat,
    pub log_file: Option<PathBuf>,
}

/// What the command line says (each overrides the host file).
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub state_dir: Option<PathBuf>,
    pub platform_dir: Option<PathBuf>,
    pub listen: Vec<String>,
    pub taps: Vec<String>,
    pub log_format: Option<LogFormat>,
    pub log_file: Option<PathBuf>,
}

impl HostConfig {
    /// Reads and checks the host file at `path`.
    pub fn load(path: &Path) -> Result<HostConfig, String> {
        use std::io::Read;
        let shown = path.display();
        let file = std::fs::File::open(path).map_err(|e| format!("host file {shown}: {e}"))?;
        let meta = file
            .metadata()
            .map_err(|e| format!("host file {shown}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("host file {shown} is not a regular file"));
        }
        let mut text = String::new();
        file.take(MAX_HOST_FILE + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("host file {shown}: {e}"))?;
        if text.len() as u64 > MAX_HOST_FILE {
            return Err(format!(
                "host file {shown} is larger than {MAX_HOST_FILE} bytes"
            ));
        }
        HostConfig::parse(&text).map_err(|e| format!("host file {shown}: {e}"))
    }

    /// Parses host-file text.
    pub fn parse(text: &str) -> Result<HostConfig, String> {
        let config: HostConfig = toml::from_str(text).map_err(|e| {
            format!(
                "{} (the keys a host file takes: state-dir, platform-dir, key-release, listen, taps, log-format, log-file)",
                e.message().trim()
            )
        })?;
        for (key, path) in [
            ("state-dir", &config.state_dir),
            ("platform-dir", &config.platform_dir),
            ("log-file", &config.log_file),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return Err(format!("{key} is empty"));
            }
        }
        Ok(config)
    }

    /// The settings for one start: `flags` over this file over the manifest's defaults.
    /// Refuses a key broker address when the manifest pins no tenant key (key release is a
    /// measured choice), and a pinned tenant key with no address anywhere.
    pub fn settle(&self, manifest: &Manifest, flags: &Flags) -> Result<HostSettings, String> {
        let key_release = match &self.key_release {
            Some(text) => {
                if manifest.attest.key_release_id.is_none() {
                    return Err(format!(
                        "the host file names a key broker (key-release = \"{text}\"), but the manifest pins no tenant key (`[attest] key-release-id`): key release is part of the measured configuration, so it is off for this manifest"
                    ));
                }
                Some(
                    crate::manifest::parse_key_release(text)
                        .map_err(|(message, help)| format!("{message}: {help}"))?,
                )
            }
            None => manifest.attest.key_release,
        };
        if manifest.attest.key_release_id.is_some() && key_release.is_none() {
            return Err(
                "the manifest pins a tenant key (`[attest] key-release-id`) but names no key broker: give its address as `key-release` in the host file (`--host`) or the manifest"
                    .into(),
            );
        }
        Ok(HostSettings {
            state_dir: flags
                .state_dir
                .clone()
                .or_else(|| self.state_dir.clone())
                .unwrap_or_else(|| manifest.state_dir.clone()),
            platform_dir: flags
                .platform_dir
                .clone()
                .or_else(|| self.platform_dir.clone())
                .or_else(|| manifest.attest.platform_dir.clone()),
            key_release,
            listen: if flags.listen.is_empty() {
                self.listen.clone().unwrap_or_default()
            } else {
                flags.listen.clone()
            },
            taps: if flags.taps.is_empty() {
                self.taps.clone().unwrap_or_default()
            } else {
                flags.taps.clone()
            },
            log_format: flags.log_format.or(self.log_format).unwrap_or_default(),
            log_file: flags.log_file.clone().or_else(|| self.log_file.clone()),
        })
    }
}

impl HostSettings {
    /// Puts the host's choices into the manifest the supervisor runs (they are outside its
    /// measured configuration, so the measurement does not change).
    pub fn apply(&self, manifest: &mut Manifest) {
        manifest.state_dir = self.state_dir.clone();
        manifest.attest.platform_dir = self.platform_dir.clone();
        manifest.attest.key_release = self.key_release;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_ID: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn manifest(attest: &str) -> Manifest {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest.toml"))
                .unwrap();
        let text = text.replacen("\n[attest]\n", &format!("\n[attest]\n{attest}\n"), 1);
        Manifest::parse(Path::new("manifest.toml"), &text).unwrap()
    }

    #[test]
    fn flags_override_the_file_which_overrides_the_manifest() {
        let m = manifest("");
        let none = HostConfig::default().settle(&m, &Flags::default()).unwrap();
        assert_eq!(none.state_dir, m.state_dir);
        assert_eq!(none.listen, Vec::<String>::new());
        assert_eq!(none.taps, Vec::<String>::new());
        assert_eq!(none.log_format, LogFormat::Text);
        let file = HostConfig::parse(
            "state-dir = \"b\"\nlisten = [\"mssim-command=127.0.0.1:9\"]\ntaps = [\"net0=tap0@ns\"]\nlog-format = \"json\"\n",
        )
        .unwrap();
        let s = file.settle(&m, &Flags::default()).unwrap();
        assert_eq!(s.state_dir, PathBuf::from("b"));
        assert_eq!(s.listen, vec!["mssim-command=127.0.0.1:9".to_string()]);
        assert_eq!(s.taps, vec!["net0=tap0@ns".to_string()]);
        assert_eq!(s.log_format, LogFormat::Json);
        let flags = Flags {
            state_dir: Some("c".into()),
            listen: vec!["all".into()],
            taps: vec!["net0=tap1".into()],
            log_format: Some(LogFormat::Text),
            ..Flags::default()
        };
        let s = file.settle(&m, &flags).unwrap();
        assert_eq!(s.state_dir, PathBuf::from("c"));
        assert_eq!(s.listen, vec!["all".to_string()]);
        assert_eq!(s.taps, vec!["net0=tap1".to_string()]);
        assert_eq!(s.log_format, LogFormat::Text);
    }

    #[test]
    fn unknown_keys_and_empty_paths_are_refused() {
        let e = HostConfig::parse("state_dir = \"x\"\n").unwrap_err();
        assert!(e.contains("state_dir") && e.contains("state-dir"), "{e}");
        assert!(HostConfig::parse("services = []\n").is_err());
        assert!(HostConfig::parse("state-dir = \"\"\n")
            .unwrap_err()
            .contains("empty"));
        assert!(HostConfig::parse("log-format = \"xml\"\n").is_err());
    }

    #[test]
    fn key_release_is_the_manifests_choice_and_the_hosts_address() {
        let off = manifest("");
        let e = HostConfig::parse("key-release = \"127.0.0.1:8700\"\n")
            .unwrap()
            .settle(&off, &Flags::default())
            .unwrap_err();
        assert!(e.contains("pins no tenant key"), "{e}");
        let on = manifest(&format!("key-release-id = \"{KEY_ID}\""));
        let e = HostConfig::default()
            .settle(&on, &Flags::default())
            .unwrap_err();
        assert!(e.contains("names no key broker"), "{e}");
        let s = HostConfig::parse("key-release = \"127.0.0.1:8700\"\n")
            .unwrap()
            .settle(&on, &Flags::default())
            .unwrap();
        assert_eq!(s.key_release, Some("127.0.0.1:8700".parse().unwrap()));
        let e = HostConfig::parse("key-release = \"10.0.0.1:8700\"\n")
            .unwrap()
            .settle(&on, &Flags::default())
            .unwrap_err();
        assert!(e.contains("loopback"), "{e}");
        // The address is not measured; the pinned id is.
        let mut moved = on.clone();
        s.apply(&mut moved);
        assert_eq!(moved.measured_bytes(), on.measured_bytes());
        assert_ne!(on.measured_bytes(), off.measured_bytes());
    }
}
