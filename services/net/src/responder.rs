//! A host side of the NIC that lives in the service: it answers ARP requests for one IPv4
//! address and ICMP echo requests to it, and drops everything else. With it a guest can ping
//! "the host" (QEMU's `10.0.2.2` by convention) with no host network set-up at all, which is
//! what the service uses when the microkernel grants it no TAP device, and what the tests
//! check the NIC with.
//!
//! Every frame is parsed from untrusted bytes with checked lengths; a reply is built in a
//! buffer of the request's size, so nothing is larger than what the guest sent. Replies wait
//! in a queue of at most [`MAX_PENDING`] frames; more are dropped and counted.

use std::collections::VecDeque;
use std::net::Ipv4Addr;

use pv_devices::virtio::net::BackendError;
use pv_devices::virtio::net::FrameIo;
use pv_devices::virtio::net::MacAddress;
use pv_devices::virtio::net::NetHeader;
use serde::Serialize;

/// Replies waiting for the guest's receive buffers: a guest that pings without posting
/// buffers cannot make the service hold more (each is at most one MTU-sized frame).
pub const MAX_PENDING: usize = 64;

const ETH_HLEN: usize = 14;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ARP_LEN: usize = 28;
const IPPROTO_ICMP: u8 = 1;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;

/// What the responder did with the frames the guest sent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ResponderCounters {
    pub arp_replies: u64,
    pub echo_replies: u64,
    /// Frames that were neither an ARP request nor an echo request for our address.
    pub ignored: u64,
    /// Replies dropped because [`MAX_PENDING`] were already waiting.
    pub dropped: u64,
}

/// The in-service host: one MAC and one IPv4 address.
#[derive(Debug)]
pub struct Responder {
    mac: MacAddress,
    address: Ipv4Addr,
    pending: VecDeque<Vec<u8>>,
    counters: ResponderCounters,
}

impl Responder {
    pub fn new(mac: MacAddress, address: Ipv4Addr) -> Responder {
        Responder {
            mac,
            address,
            pending: VecDeque::new(),
            counters: ResponderCounters::default(),
        }
    }

    pub fn counters(&self) -> &ResponderCounters {
        &self.counters
    }

    /// Whether replies wait for the guest.
    pub fn has_frames(&self) -> bool {
        !self.pending.is_empty()
    }

    fn answer(&self, frame: &[u8]) -> Option<Reply> {
        let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
        let payload = frame.get(ETH_HLEN..)?;
        match ethertype {
            ETHERTYPE_ARP => self.arp(frame, payload).map(Reply::Arp),
            ETHERTYPE_IPV4 => self.echo(frame, payload).map(Reply::Echo),
            _ => None,
        }
    }

    /// An ARP reply to a request for our address (Ethernet, IPv4).
    fn arp(&self, frame: &[u8], arp: &[u8]) -> Option<Vec<u8>> {
        let arp = arp.get(..ARP_LEN)?;
        // htype 1 (Ethernet), ptype IPv4, hlen 6, plen 4, oper 1 (request).
        if arp[..8] != [0, 1, 8, 0, 6, 4, 0, 1] || arp[24..28] != self.address.octets() {
            return None;
        }
        let sender_mac = &arp[8..14];
        let sender_ip = &arp[14..18];
        let mut reply = Vec::with_capacity(ETH_HLEN + ARP_LEN);
        reply.extend_from_slice(sender_mac);
        reply.extend_from_slice(&self.mac.0);
        reply.extend_from_slice(&frame[12..14]);
        reply.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        reply.extend_from_slice(&self.mac.0);
        reply.extend_from_slice(&self.address.octets());
        reply.extend_from_slice(sender_mac);
        reply.extend_from_slice(sender_ip);
        Some(reply)
    }

    /// An echo reply to an unfragmented ICMP echo request to our address whose checksums hold.
    fn echo(&self, frame: &[u8], ip: &[u8]) -> Option<Vec<u8>> {
        let version_ihl = *ip.first()?;
        let header_len = usize::from(version_ihl & 0xf) * 4;
        if version_ihl >> 4 != 4 || header_len < 20 {
            return None;
        }
        let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
        let ip = ip.get(..total)?;
        let header = ip.get(..header_len)?;
        let fragment = u16::from_be_bytes([header[6], header[7]]);
        if fragment & 0x3fff != 0
            || header[9] != IPPROTO_ICMP
            || header[16..20] != self.address.octets()
            || checksum(header) != 0
        {
            return None;
        }
        let icmp = &ip[header_len..];
        if icmp.len() < 8 || icmp[0] != ICMP_ECHO_REQUEST || icmp[1] != 0 || checksum(icmp) != 0 {
            return None;
        }
        let mut reply = Vec::with_capacity(ETH_HLEN + total);
        reply.extend_from_slice(&frame[6..12]);
        reply.extend_from_slice(&self.mac.0);
        reply.extend_from_slice(&frame[12..14]);
        let at = reply.len();
        reply.extend_from_slice(ip);
        let ip = &mut reply[at..];
        // Addresses swapped, a fresh TTL, the header's checksum again.
        let (source, destination) = (ip[12..16].to_vec(), ip[16..20].to_vec());
        ip[12..16].copy_from_slice(&destination);
        ip[16..20].copy_from_slice(&source);
        ip[8] = 64;
        ip[10..12].fill(0);
        let sum = checksum(&ip[..header_len]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let icmp = &mut ip[header_len..];
        icmp[0] = ICMP_ECHO_REPLY;
        icmp[2..4].fill(0);
        let sum = checksum(icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        Some(reply)
    }
}

enum Reply {
    Arp(Vec<u8>),
    Echo(Vec<u8>),
}

/// The Internet checksum (RFC 1071) of `bytes`: 0 over data that carries a correct one.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl FrameIo for Responder {
    fn send(&mut self, _header: &NetHeader, frame: &[u8]) -> Result<(), BackendError> {
        let reply = match self.answer(frame) {
            Some(Reply::Arp(f)) => {
                self.counters.arp_replies += 1;
                f
            }
            Some(Reply::Echo(f)) => {
                self.counters.echo_replies += 1;
                f
            }
            None => {
                self.counters.ignored += 1;
                return Ok(());
            }
        };
        if self.pending.len() >= MAX_PENDING {
            self.counters.dropped += 1;
        } else {
            self.pending.push_back(reply);
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(NetHeader, usize)>, BackendError> {
        Ok(self.pending.pop_front().map(|frame| {
            let n = frame.len().min(buf.len());
            buf[..n].copy_from_slice(&frame[..n]);
            (NetHeader::default(), n)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OURS: MacAddress = MacAddress([0x52, 0x54, 0x00, 0x12, 0x35, 0x02]);
    const GUEST: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    fn responder() -> Responder {
        Responder::new(OURS, Ipv4Addr::new(10, 0, 2, 2))
    }

    fn arp_request(target: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[8, 6, 0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[10, 0, 2, 15]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target);
        f
    }

    fn echo_request(target: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut f = OURS.0.to_vec();
        f.extend_from_slice(&GUEST);
        f.extend_from_slice(&[8, 0]);
        let total = 20 + 8 + payload.len();
        let mut ip = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            1,
            0x40,
            0,
            64,
            1,
            0,
            0,
        ];
        ip.extend_from_slice(&[10, 0, 2, 15]);
        ip.extend_from_slice(&target);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34, 0, 7];
        icmp.extend_from_slice(payload);
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&icmp);
        f
    }

    fn take(r: &mut Responder) -> Option<Vec<u8>> {
        let mut buf = [0u8; 1600];
        r.recv(&mut buf).unwrap().map(|(_, n)| buf[..n].to_vec())
    }

    #[test]
    fn an_arp_request_for_our_address_gets_our_mac() {
        let mut r = responder();
        r.send(&NetHeader::default(), &arp_request([10, 0, 2, 2]))
            .unwrap();
        let reply = take(&mut r).expect("a reply");
        assert_eq!(&reply[..6], &GUEST, "to the asker");
        assert_eq!(&reply[6..12], &OURS.0);
        assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
        assert_eq!(&reply[22..28], &OURS.0);
        assert_eq!(&reply[28..32], &[10, 0, 2, 2]);
        assert_eq!(&reply[32..38], &GUEST);
        assert_eq!(&reply[38..42], &[10, 0, 2, 15]);
        r.send(&NetHeader::default(), &arp_request([10, 0, 2, 3]))
            .unwrap();
        assert!(take(&mut r).is_none(), "another address is not ours");
        assert_eq!(r.counters().arp_replies, 1);
        assert_eq!(r.counters().ignored, 1);
    }

    #[test]
    fn an_echo_request_comes_back_as_a_reply_with_valid_checksums() {
        let mut r = responder();
        let request = echo_request([10, 0, 2, 2], b"0123456789abcdef");
        r.send(&NetHeader::default(), &request).unwrap();
        let reply = take(&mut r).expect("a reply");
        assert_eq!(reply.len(), request.len());
        assert_eq!(&reply[..6], &GUEST);
        let ip = &reply[14..];
        assert_eq!(checksum(&ip[..20]), 0);
        assert_eq!(&ip[12..16], &[10, 0, 2, 2]);
        assert_eq!(&ip[16..20], &[10, 0, 2, 15]);
        let icmp = &ip[20..];
        assert_eq!(icmp[0], 0, "echo reply");
        assert_eq!(checksum(icmp), 0);
        assert_eq!(
            &icmp[4..],
            &request[14 + 20 + 4..],
            "identifier, sequence, payload"
        );
    }

    #[test]
    fn malformed_or_foreign_frames_are_ignored_never_answered() {
        let mut r = responder();
        let good = echo_request([10, 0, 2, 2], b"x");
        let mut bad_sum = good.clone();
        *bad_sum.last_mut().unwrap() ^= 1;
        let mut long_total = good.clone();
        long_total[16] = 0xff;
        let mut fragment = good.clone();
        fragment[20] = 0x20;
        for frame in [
            vec![],
            good[..13].to_vec(),
            good[..30].to_vec(),
            bad_sum,
            long_total,
            fragment,
            echo_request([10, 0, 2, 9], b"x"),
            arp_request([10, 0, 2, 2])[..40].to_vec(),
        ] {
            r.send(&NetHeader::default(), &frame).unwrap();
        }
        assert!(take(&mut r).is_none());
        assert_eq!(r.counters().ignored, 8);
    }

    #[test]
    fn replies_beyond_the_queue_are_dropped_and_counted() {
        let mut r = responder();
        for _ in 0..MAX_PENDING + 5 {
            r.send(&NetHeader::default(), &arp_request([10, 0, 2, 2]))
                .unwrap();
        }
        assert_eq!(r.counters().dropped, 5);
        let mut n = 0;
        while take(&mut r).is_some() {
            n += 1;
        }
        assert_eq!(n, MAX_PENDING);
    }
}
