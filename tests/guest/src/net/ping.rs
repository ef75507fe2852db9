//! The frames of the network step: an ARP request for 10.0.2.2, echo requests whose length
//! and payload follow from their sequence number, and the byte-for-byte check of every reply
//! (with its IP and ICMP checksums); also the one-time interrupt check of `net-irq=1`.
//! `net.rs` holds the device and its queues.

use core::sync::atomic::Ordering;

use super::put_mac;
use super::read8;
use super::Failure;
use super::Nic;
use super::Structures;
use super::ATTEMPTS;
use super::BUFFER;
use super::INTERRUPTS;
use super::PROGRESS;
use super::REPLY_WAIT_CYCLES;
use crate::check;
use crate::put_dec;
use crate::put_hex;
use crate::putc;
use crate::puts;
use crate::rdtsc;
use crate::FAILURES;

const OUR_IP: [u8; 4] = [10, 0, 2, 15];
const HOST_IP: [u8; 4] = [10, 0, 2, 2];
const ETHERTYPE_ARP: [u8; 2] = [0x08, 0x06];
const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
/// The echo requests' identifier.
const ECHO_ID: u16 = 0x7e57;

/// The Internet checksum (RFC 1071): 0 over bytes that carry a correct one.
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let high = u32::from(bytes[i]) << 8;
        let low = bytes.get(i + 1).map_or(0, |b| u32::from(*b));
        sum += high | low;
        i += 2;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// ARP for 10.0.2.2: its MAC, or None after a failed check.
pub(super) fn arp(nic: &mut Nic) -> Result<Option<[u8; 6]>, Failure> {
    let mut request = [0u8; 42];
    request[..6].copy_from_slice(&[0xff; 6]);
    request[6..12].copy_from_slice(&nic.mac);
    request[12..14].copy_from_slice(&ETHERTYPE_ARP);
    request[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    request[22..28].copy_from_slice(&nic.mac);
    request[28..32].copy_from_slice(&OUR_IP);
    request[38..42].copy_from_slice(&HOST_IP);
    let mut frame = [0u8; BUFFER as usize];
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            nic.resent += 1;
        }
        nic.send(&request)?;
        while let Some(len) = nic.receive(&mut frame)? {
            let f = &frame[..len];
            if len < 42 || f[12..14] != ETHERTYPE_ARP {
                nic.ignored += 1;
                continue;
            }
            let ok = f[..6] == nic.mac
                && f[14..22] == [0, 1, 8, 0, 6, 4, 0, 2]
                && f[6..12] == f[22..28]
                && f[28..32] == HOST_IP
                && f[32..38] == nic.mac
                && f[38..42] == OUR_IP;
            let mut mac = [0u8; 6];
            mac.copy_from_slice(&f[22..28]);
            puts(if ok { "guest: ok   " } else { "guest: FAIL " });
            puts("net: ARP 10.0.2.2 is ");
            put_mac(&mac);
            putc(b'\n');
            if !ok {
                FAILURES.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            return Ok(Some(mac));
        }
    }
    Err(Failure::NoReply("ARP request", 1))
}

/// Routes the INTx line through the IOAPIC, sends one echo request and checks that the used
/// rings interrupt and that the ISR then has its queue bit (the read clears it). The line is
/// masked again afterwards: the rest polls.
pub(super) fn interrupt_check(
    nic: &mut Nic,
    s: &Structures,
    host_mac: &[u8; 6],
    line: u8,
) -> Result<(), Failure> {
    if line >= crate::IOAPIC_LINES {
        return Err(Failure::Value(
            "the interrupt line is not an IOAPIC input",
            u64::from(line),
        ));
    }
    // What an earlier completion left in the ISR is cleared first.
    let _ = read8(s.isr);
    crate::route_line(line, crate::arch::NET_VECTOR);
    let before = INTERRUPTS.load(Ordering::SeqCst);
    crate::syscall(crate::SYS_STI, 0, 0);
    let mut request = [0u8; 700];
    let seq = 0xfffe;
    let len = echo_request(nic, host_mac, seq, &mut request);
    let sent = nic.send(&request[..len]);
    let start = rdtsc();
    let mut taken = false;
    while sent.is_ok() && rdtsc().wrapping_sub(start) < REPLY_WAIT_CYCLES {
        if INTERRUPTS.load(Ordering::SeqCst) != before {
            taken = true;
            break;
        }
        core::hint::spin_loop();
    }
    crate::syscall(crate::SYS_CLI, 0, 0);
    crate::mask_line(line);
    sent?;
    let isr = read8(s.isr);
    puts("guest: net: interrupt line ");
    put_dec(u64::from(line));
    puts(" routed to vector 0x26: ");
    put_dec(u64::from(
        INTERRUPTS.load(Ordering::SeqCst).wrapping_sub(before),
    ));
    puts(" interrupts, ISR ");
    put_hex(u64::from(isr));
    putc(b'\n');
    check(
        taken && isr & 1 != 0,
        "net: a used ring interrupts (INTx -> IOAPIC -> vector 0x26) and the ISR says queue",
    );
    // The reply is taken (and checked) like any other; a lost one is sent again.
    let mut frame = [0u8; BUFFER as usize];
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            nic.resent += 1;
            nic.send(&request[..len])?;
        }
        while let Some(n) = nic.receive(&mut frame)? {
            match check_reply(nic, host_mac, &frame[..n])? {
                Echo::Reply(r) if r == seq => return Ok(()),
                Echo::Reply(_) => nic.stale += 1,
                Echo::Other => nic.ignored += 1,
            }
        }
    }
    Err(Failure::NoReply(
        "echo request (interrupt check)",
        u64::from(seq),
    ))
}

/// Echo request `seq`'s payload: its length and every byte follow from `seq`.
fn payload(seq: u16, out: &mut [u8]) -> usize {
    let len = 32 + (usize::from(seq) % 5) * 97;
    for (i, b) in out[..len].iter_mut().enumerate() {
        *b = (usize::from(seq).wrapping_mul(31) ^ i.wrapping_mul(7) ^ (i >> 3)) as u8;
    }
    len
}

/// Echo request `seq` to 10.0.2.2, in `out`: its length.
fn echo_request(nic: &Nic, host_mac: &[u8; 6], seq: u16, out: &mut [u8]) -> usize {
    let mut data = [0u8; 600];
    let n = payload(seq, &mut data);
    let total = 20 + 8 + n;
    out[..6].copy_from_slice(host_mac);
    out[6..12].copy_from_slice(&nic.mac);
    out[12..14].copy_from_slice(&ETHERTYPE_IPV4);
    let ip = &mut out[14..14 + total];
    ip[..12].copy_from_slice(&[
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        (seq >> 8) as u8,
        seq as u8,
        0x40,
        0,
        64,
        1,
        0,
        0,
    ]);
    ip[12..16].copy_from_slice(&OUR_IP);
    ip[16..20].copy_from_slice(&HOST_IP);
    let sum = checksum(&ip[..20]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    let icmp = &mut ip[20..];
    icmp[..8].copy_from_slice(&[
        8,
        0,
        0,
        0,
        (ECHO_ID >> 8) as u8,
        ECHO_ID as u8,
        (seq >> 8) as u8,
        seq as u8,
    ]);
    icmp[8..].copy_from_slice(&data[..n]);
    let sum = checksum(icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    14 + total
}

/// What a received frame is to the echo loop.
enum Echo {
    /// Not an echo reply to us (counted, ignored).
    Other,
    /// A correct reply to request `seq`.
    Reply(u16),
}

/// Checks a frame that claims to be an echo reply for us, byte for byte against the
/// request its sequence number names; a wrong byte is a failure.
fn check_reply(nic: &Nic, host_mac: &[u8; 6], f: &[u8]) -> Result<Echo, Failure> {
    if f.len() < 14 + 20 + 8
        || f[12..14] != ETHERTYPE_IPV4
        || f[14 + 9] != 1
        || f[14 + 20] != 0
        || f[14 + 24..14 + 26] != ECHO_ID.to_be_bytes()
    {
        return Ok(Echo::Other);
    }
    let seq = u16::from_be_bytes([f[14 + 26], f[14 + 27]]);
    let mut data = [0u8; 600];
    let n = payload(seq, &mut data);
    let total = 20 + 8 + n;
    let ip = &f[14..];
    let wrong = if f.len() != 14 + total {
        Some("length")
    } else if f[..6] != nic.mac || f[6..12] != *host_mac {
        Some("MAC addresses")
    } else if ip[0] != 0x45 || usize::from(u16::from_be_bytes([ip[2], ip[3]])) != total {
        Some("IP version, header length or total length")
    } else if checksum(&ip[..20]) != 0 {
        Some("IP header checksum")
    } else if ip[12..16] != HOST_IP || ip[16..20] != OUR_IP {
        Some("IP addresses")
    } else if checksum(&ip[20..total]) != 0 {
        Some("ICMP checksum")
    } else if ip[21] != 0 {
        Some("ICMP code")
    } else if ip[28..total] != data[..n] {
        Some("payload")
    } else {
        None
    };
    if let Some(what) = wrong {
        puts("guest: FAIL net: echo reply ");
        put_dec(u64::from(seq));
        puts(": wrong ");
        puts(what);
        putc(b'\n');
        return Err(Failure::Value(
            "a corrupted echo reply, sequence",
            u64::from(seq),
        ));
    }
    Ok(Echo::Reply(seq))
}

pub(super) fn echoes(nic: &mut Nic, host_mac: &[u8; 6], pings: u64) -> Result<(), Failure> {
    let mut request = [0u8; 700];
    let mut frame = [0u8; BUFFER as usize];
    let mut checked = 0u64;
    for i in 0..pings {
        let seq = (i + 1) as u16;
        let len = echo_request(nic, host_mac, seq, &mut request);
        let mut answered = false;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                nic.resent += 1;
                puts("guest: net: echo ");
                put_dec(u64::from(seq));
                puts(": no reply yet, sent again\n");
            }
            nic.send(&request[..len])?;
            while let Some(n) = nic.receive(&mut frame)? {
                match check_reply(nic, host_mac, &frame[..n])? {
                    Echo::Other => nic.ignored += 1,
                    Echo::Reply(s) if s == seq => {
                        answered = true;
                        break;
                    }
                    // A reply to an earlier request (or a second one to this): correct,
                    // counted, not this one's.
                    Echo::Reply(_) => nic.stale += 1,
                }
            }
            if answered {
                break;
            }
        }
        if !answered {
            return Err(Failure::NoReply("echo request", u64::from(seq)));
        }
        checked += 1;
        // Progress every PROGRESS echoes only: each console byte is an exit, and a guest that
        // mostly prints would mostly not be exchanging frames.
        if checked % PROGRESS != 0 && checked != pings {
            continue;
        }
        puts("guest: net: echo ");
        put_dec(u64::from(seq));
        puts(" of ");
        put_dec(pings);
        puts(" checked\n");
    }
    puts("guest: ok   net: ");
    put_dec(checked);
    puts(" echo replies checked\n");
    Ok(())
}
