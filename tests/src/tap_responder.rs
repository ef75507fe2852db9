//! `pv-hostile tap-responder NAME IP MAC`: a host on its TAP capability, for the tests of the
//! TAP's way through the microkernel. With nothing but `read`, `write` and `poll` on the
//! descriptor (no socket, no ioctl), it answers ARP requests for IP with MAC and ICMP echo
//! requests to IP, and logs each UDP datagram sent to IP, one line each, so a test on the
//! host's side sees both directions: its ARP answer in the host's neighbour table, the host's
//! datagram in the log.

use std::fmt::Write as _;
use std::io::Read;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::time::Duration;

use ipc_defs::hosted::runtime;
use ipc_defs::hosted::sys;

const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERNET_HEADER: usize = 14;
/// Longest frame read: the MTU (1500) and the Ethernet header, with room for a VLAN tag.
const MAX_FRAME: usize = 1522;
/// The virtio-net header in front of each frame on the microkernel's TAPs.
const VNET_HEADER_LEN: usize = 12;
/// How long the loop waits for a frame before it answers its control channel again.
const POLL: Duration = Duration::from_millis(100);

/// Runs the responder until the microkernel asks for shutdown: exit status 0; 20 if the
/// arguments are wrong, 21 if the TAP fails a read or write.
pub fn run(started: &mut runtime::Started, args: &[String]) -> std::process::ExitCode {
    let parsed = (
        args.get(1),
        args.get(2).and_then(|a| a.parse::<Ipv4Addr>().ok()),
        args.get(3).and_then(|m| parse_mac(m)),
    );
    let (Some(name), Some(ip), Some(mac)) = parsed else {
        eprintln!("pv-hostile: tap-responder NAME IP MAC: {args:?}");
        return std::process::ExitCode::from(20);
    };
    started.answer_first_ping();
    let Some(fd) = started.context.taps.remove(name.as_str()) else {
        // The host named no interface for it: the context simply lacks the TAP.
        eprintln!("pv-hostile: tap {name}: no TAP (the host named none); serving nothing");
        return serve_control(started);
    };
    eprintln!(
        "pv-hostile: tap {name}: ready, answering ARP and ICMP echo for {ip} as {}",
        mac_text(&mac)
    );
    let mut tap = std::fs::File::from(fd);
    let mut frame = [0u8; VNET_HEADER_LEN + MAX_FRAME];
    loop {
        if !started.answer_control() {
            return std::process::ExitCode::SUCCESS;
        }
        match sys::poll_readable(&[tap.as_fd()], POLL) {
            Ok(ready) if ready.first() == Some(&true) => {}
            Ok(_) => continue,
            Err(e) => {
                eprintln!("pv-hostile: tap {name}: poll: {e}");
                return std::process::ExitCode::from(21);
            }
        }
        // Every frame there is, one per read, until the TAP has none (it is non-blocking).
        loop {
            let n = match tap.read(&mut frame) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    eprintln!("pv-hostile: tap {name}: read: {e}");
                    return std::process::ExitCode::from(21);
                }
            };
            // The microkernel's TAPs put a virtio-net header in front of each frame; with
            // no offload set none comes partial, so the header is skipped and an all-zero
            // one sent.
            let Some(received) = frame[..n].get(VNET_HEADER_LEN..) else {
                continue;
            };
            let Some(answer) = answer(received, ip, mac, name) else {
                continue;
            };
            let mut out = vec![0u8; VNET_HEADER_LEN];
            out.extend_from_slice(&answer);
            if let Err(e) = tap.write_all(&out) {
                eprintln!("pv-hostile: tap {name}: write: {e}");
                return std::process::ExitCode::from(21);
            }
        }
    }
}

/// Answers the control channel until shutdown.
fn serve_control(started: &mut runtime::Started) -> std::process::ExitCode {
    while started.answer_control() {
        std::thread::sleep(POLL);
    }
    std::process::ExitCode::SUCCESS
}

/// The frame to send back for `frame`, if any; logs what it saw.
fn answer(frame: &[u8], ip: Ipv4Addr, mac: [u8; 6], name: &str) -> Option<Vec<u8>> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let payload = frame.get(ETHERNET_HEADER..)?;
    let peer: [u8; 6] = frame.get(6..12)?.try_into().ok()?;
    let reply = match ethertype {
        ETHERTYPE_ARP => arp_reply(payload, ip, mac, name)?,
        ETHERTYPE_IPV4 => ipv4(payload, ip, name)?,
        _ => return None,
    };
    let mut out = Vec::with_capacity(ETHERNET_HEADER + reply.len());
    out.extend_from_slice(&peer);
    out.extend_from_slice(&mac);
    out.extend_from_slice(&ethertype.to_be_bytes());
    out.extend_from_slice(&reply);
    Some(out)
}

/// The ARP reply to a request for `ip` (Ethernet and IPv4 only).
fn arp_reply(arp: &[u8], ip: Ipv4Addr, mac: [u8; 6], name: &str) -> Option<Vec<u8>> {
    let arp = arp.get(..28)?;
    let ethernet_ipv4 = arp[..6] == [0, 1, 0x08, 0x00, 6, 4];
    let request = arp[6..8] == [0, 1];
    if !ethernet_ipv4 || !request || arp[24..28] != ip.octets() {
        return None;
    }
    let asker = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    eprintln!("pv-hostile: tap {name}: answered ARP request from {asker}");
    let mut reply = arp[..6].to_vec();
    reply.extend_from_slice(&[0, 2]);
    reply.extend_from_slice(&mac);
    reply.extend_from_slice(&ip.octets());
    reply.extend_from_slice(&arp[8..18]);
    Some(reply)
}

/// For an IPv4 packet to `ip`: the echo reply to an ICMP echo request; a UDP datagram is
/// logged (source, ports, payload) and answers nothing.
fn ipv4(packet: &[u8], ip: Ipv4Addr, name: &str) -> Option<Vec<u8>> {
    let header_len = usize::from(*packet.first()? & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*packet.get(2)?, *packet.get(3)?]));
    if *packet.first()? >> 4 != 4 || header_len < 20 || total < header_len {
        return None;
    }
    let packet = packet.get(..total)?;
    if packet[16..20] != ip.octets() {
        return None;
    }
    let from = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let body = &packet[header_len..];
    match packet[9] {
        // UDP
        17 => {
            let ports = body.get(..4)?;
            let data = body.get(8..).unwrap_or_default();
            let mut shown = String::new();
            for b in data.iter().take(64) {
                match b {
                    b' '..=b'~' => shown.push(char::from(*b)),
                    _ => {
                        let _ = write!(shown, "\\x{b:02x}");
                    }
                }
            }
            eprintln!(
                "pv-hostile: tap {name}: UDP from {from}:{} to port {}: \"{shown}\"",
                u16::from_be_bytes([ports[0], ports[1]]),
                u16::from_be_bytes([ports[2], ports[3]])
            );
            None
        }
        // ICMP echo request
        1 if body.first() == Some(&8) && body.len() >= 8 => {
            eprintln!("pv-hostile: tap {name}: answered ICMP echo from {from}");
            let mut reply = packet[..header_len].to_vec();
            reply[8] = 64; // TTL
            reply[12..16].copy_from_slice(&ip.octets());
            reply[16..20].copy_from_slice(&from.octets());
            reply[10..12].copy_from_slice(&[0, 0]);
            let sum = checksum(&reply);
            reply[10..12].copy_from_slice(&sum.to_be_bytes());
            let mut icmp = body.to_vec();
            icmp[0] = 0; // echo reply
            icmp[2..4].copy_from_slice(&[0, 0]);
            let sum = checksum(&icmp);
            icmp[2..4].copy_from_slice(&sum.to_be_bytes());
            reply.extend_from_slice(&icmp);
            Some(reply)
        }
        _ => None,
    }
}

/// The Internet checksum (RFC 1071) of `bytes`.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    bytes.try_into().ok()
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
