//! The service's arguments (the manifest's `args`):
//!
//! ```text
//! --listen NAME      the listener (a `listen` grant) QEMU's vhost-user-net connects to;
//!                    without it the service serves no NIC (it still answers its pings)
//! --address IPV4     the in-service responder's address, used when no TAP is granted
//! --mac MAC          the responder's MAC address (default 52:54:00:12:35:02)
//! --device-mac MAC   the device's MAC in its configuration space (default 52:54:00:12:34:56)
//! --mtu BYTES        the device's MTU (default 1500)
//! --device virtio-net-pci,bar=ADDR
//!                    also serve a virtio-net PCI function on the guest partition, its BAR 0
//!                    fixed at ADDR (the start of the manifest's `mmio` range, 16 KiB); only
//!                    when a guest partition runs (`paravisor run` with a guest)
//! ```

use std::net::Ipv4Addr;

use pv_devices::virtio::net::MacAddress;
use pv_devices::virtio::net::ETH_DATA_LEN;

/// The responder's MAC when none is given (the one QEMU's user network gives its host).
pub const RESPONDER_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x35, 0x02]);
/// The device's MAC when none is given (QEMU's first NIC's).
pub const DEVICE_MAC: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);

/// What the arguments ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: Option<String>,
    pub address: Option<Ipv4Addr>,
    pub responder_mac: MacAddress,
    pub device_mac: MacAddress,
    pub mtu: u16,
    /// The partition's virtio-net function (`--device virtio-net-pci,bar=ADDR`).
    pub partition: Option<PartitionFunction>,
}

/// The PCI function on the guest partition: where its BAR 0 sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionFunction {
    /// Guest-physical address of BAR 0 (the manifest's `mmio` range, fixed).
    pub bar: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0} needs a value")]
    Missing(String),
    #[error(
        "unknown argument \"{0}\": use --listen, --address, --mac, --device-mac, --mtu or --device"
    )]
    Unknown(String),
    #[error("{flag} \"{value}\": {why}")]
    Value {
        flag: String,
        value: String,
        why: String,
    },
}

fn mac(flag: &str, value: &str) -> Result<MacAddress, ConfigError> {
    let bad = |why: &str| ConfigError::Value {
        flag: flag.into(),
        value: value.into(),
        why: why.into(),
    };
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() != 6 {
        return Err(bad("six hexadecimal bytes separated by ':'"));
    }
    let mut b = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        b[i] =
            u8::from_str_radix(p, 16).map_err(|_| bad("six hexadecimal bytes separated by ':'"))?;
    }
    let m = MacAddress(b);
    if !m.is_unicast() {
        return Err(bad("a unicast address (first byte even, not all zero)"));
    }
    Ok(m)
}

/// `virtio-net-pci,bar=ADDR` (ADDR hexadecimal after `0x`, or decimal).
fn partition_function(flag: &str, value: &str) -> Result<PartitionFunction, ConfigError> {
    let bad = |why: &str| ConfigError::Value {
        flag: flag.into(),
        value: value.into(),
        why: why.into(),
    };
    let mut parts = value.split(',');
    if parts.next() != Some("virtio-net-pci") {
        return Err(bad(
            "the one model is virtio-net-pci: --device virtio-net-pci,bar=ADDR",
        ));
    }
    let mut bar = None;
    for part in parts {
        match part.split_once('=') {
            Some(("bar", v)) => {
                let parsed = match v.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => v.parse(),
                };
                bar = Some(parsed.map_err(|_| bad("bar= takes an address such as 0xfe004000"))?);
            }
            _ => return Err(bad("the one key is bar=ADDR")),
        }
    }
    let bar =
        bar.ok_or_else(|| bad("bar=ADDR is required (the start of the manifest's mmio range)"))?;
    if bar % pv_devices::virtio::pci::BAR_SIZE != 0 {
        return Err(bad("bar= must be aligned to the BAR's 16 KiB"));
    }
    Ok(PartitionFunction { bar })
}

impl Config {
    pub fn from_args(args: impl IntoIterator<Item = String>) -> Result<Config, ConfigError> {
        let mut config = Config {
            listen: None,
            address: None,
            responder_mac: RESPONDER_MAC,
            device_mac: DEVICE_MAC,
            mtu: ETH_DATA_LEN,
            partition: None,
        };
        let mut args = args.into_iter();
        while let Some(flag) = args.next() {
            let mut value = || {
                args.next()
                    .ok_or_else(|| ConfigError::Missing(flag.clone()))
            };
            match flag.as_str() {
                "--listen" => config.listen = Some(value()?),
                "--address" => {
                    let v = value()?;
                    config.address = Some(v.parse().map_err(|_| ConfigError::Value {
                        flag: flag.clone(),
                        value: v.clone(),
                        why: "an IPv4 address such as 10.0.2.2".into(),
                    })?);
                }
                "--mac" => config.responder_mac = mac(&flag, &value()?)?,
                "--device-mac" => config.device_mac = mac(&flag, &value()?)?,
                "--mtu" => {
                    let v = value()?;
                    config.mtu = v.parse().map_err(|_| ConfigError::Value {
                        flag: flag.clone(),
                        value: v.clone(),
                        why: "a number of bytes, 68 to 65535".into(),
                    })?;
                }
                "--device" => config.partition = Some(partition_function(&flag, &value()?)?),
                other => return Err(ConfigError::Unknown(other.into())),
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Config::from_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn the_shipped_arguments_parse() {
        let c = parse(&["--listen", "vhost-user-net", "--address", "10.0.2.2"]).unwrap();
        assert_eq!(c.listen.as_deref(), Some("vhost-user-net"));
        assert_eq!(c.address, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(
            (c.responder_mac, c.device_mac, c.mtu),
            (RESPONDER_MAC, DEVICE_MAC, 1500)
        );
        assert_eq!(c.partition, None);
        let c = parse(&["--device", "virtio-net-pci,bar=0xfe004000"]).unwrap();
        assert_eq!(c.partition, Some(PartitionFunction { bar: 0xfe00_4000 }));
    }

    #[test]
    fn bad_arguments_are_errors_that_name_them() {
        assert_eq!(parse(&[]).unwrap().listen, None, "no NIC, not an error");
        assert_eq!(
            parse(&["--listen"]),
            Err(ConfigError::Missing("--listen".into()))
        );
        assert!(matches!(parse(&["--bogus"]), Err(ConfigError::Unknown(_))));
        for bad in [
            &["--listen", "n", "--address", "10.0.2"][..],
            &["--listen", "n", "--mac", "01:00:00:00:00:01"],
            &["--listen", "n", "--mac", "52:54:00:12:35"],
            &["--listen", "n", "--mtu", "70000"],
            &["--device", "virtio-blk,bar=0xfe004000"],
            &["--device", "virtio-net-pci"],
            &["--device", "virtio-net-pci,bar=0xfe004100"],
            &["--device", "virtio-net-pci,bar=zz"],
            &["--device", "virtio-net-pci,bar=0xfe004000,irq=3"],
        ] {
            assert!(
                matches!(parse(bad), Err(ConfigError::Value { .. })),
                "{bad:?}"
            );
        }
    }
}
