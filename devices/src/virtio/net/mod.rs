//! virtio-net (virtio 1.x, 5.1): one receive queue ([`RX_QUEUE`], 0) and one transmit queue
//! ([`TX_QUEUE`], 1) between the guest's stock driver and a [`FrameIo`] back end that carries
//! whole Ethernet frames (a TAP device in the service; [`MemLink`] in tests and fuzzing).
//!
//! **Offered** ([`VirtioNet::features`]): VERSION_1, MAC (the address in the configuration),
//! MTU (the largest payload the device passes, default 1500), STATUS (link up, in the
//! configuration's `status`) and MRG_RXBUF (a received frame may span several receive
//! buffers, their count in the header's `num_buffers`). The transport adds the ring features
//! INDIRECT_DESC and EVENT_IDX, as it does for virtio-blk: virtio-queue follows indirect tables,
//! and the model reads the queue's `event_idx_enabled` where it matters (below).
//!
//! **Offloads, over a back end that carries headers** ([`FrameIo::carries_headers`]: a TAP
//! with a virtio-net header; [`OFFLOAD_FEATURES`]): CSUM and GUEST_CSUM (partial checksums
//! both ways), HOST_TSO4/6 with HOST_ECN and GUEST_TSO4/6 with GUEST_ECN (TCP segments of up
//! to 64 KiB both ways). The model passes each header through (the host's stack and the
//! guest's finish checksums and cut segments), after checking it against what was negotiated
//! (`check_tx_header` for the driver's, `VirtioNet::check_rx` for the host's, which is not
//! trusted to honour [`FrameIo::accept_offloads`]); a partial checksum for a driver without
//! GUEST_CSUM is finished here. Over a back end without headers (the responder, [`MemLink`]
//! by default) no offload is offered and a transmitted header must be all zero.
//!
//! **Not offered**: UFO and USO, the control queue (CTRL_VQ: no promiscuous, MAC filter, VLAN
//! or guest-offload commands, the driver receives whatever the back end delivers), no
//! multiqueue (MQ), no RSS, no SPEED_DUPLEX: each would add a parser of guest input and none
//! is needed for a working NIC.
//!
//! **The back end is a trait the model owns** ([`FrameIo`]: `send` a frame, `recv` a frame
//! into a buffer), rather than a model that returns frames for the caller to carry. A single
//! poll loop then calls [`VirtioNet::process_tx`] when the transmit queue is kicked (or the
//! back end becomes writable again) and [`VirtioNet::process_rx`] when the back end is readable
//! or the receive queue is kicked; each tells the loop what it waits for ([`TxProgress`],
//! [`RxProgress`]). The model stays free of OS calls (a TAP fd implements the trait in the
//! service), copies each frame once between guest memory and the back end, and holds the
//! back-pressure rules in one place: a transmit chain the back end cannot take yet stays on
//! the ring, and a received frame the guest has no buffers for is the only one read ahead.
//!
//! **Bounds.** The largest frame either way is [`VirtioNet::max_frame`]: the MTU plus the
//! Ethernet header and one VLAN tag (the MTU is 1500 or more until the driver acknowledges
//! MTU); a TCP segment, where negotiated, up to [`GSO_FRAME_LIMIT`]. A longer frame is dropped and counted ([`DropReason::Oversized`]); its length is
//! known from the descriptors before a byte is copied, so nothing is buffered beyond one
//! frame per direction. A chain that does not end (a loop, a `next` past its table, more
//! descriptors than the queue holds), has no descriptor, reaches outside guest memory, has
//! the wrong direction (device-writable bytes on transmit, device-readable on receive) or is
//! shorter than the header is returned with used length 0 and counted, never followed. A
//! received frame is either published whole or not at all: the receive buffers it needs are
//! taken off the ring, and if they are not enough they are put back (`set_next_avail`) and
//! the frame waits, alone, for the driver to post more ([`RxProgress::WaitingForBuffers`]);
//! the back end is not read meanwhile, so frames queue in the back end (the TAP's queue,
//! which drops when full), not here. All the used entries of one frame are published with one
//! store of the used index, so a driver polling the ring never sees part of a frame.
//!
//! **Ring discipline, for restarts.** Between calls, every chain taken off either queue is on
//! the used ring: a restarted service resumes both queues at their used index (nothing in
//! flight to recover), and the only state lost with the process is the one frame that was
//! waiting for receive buffers (TCP retransmits it).
//!
//! **Notifications.** Both calls return whether the driver must be interrupted
//! ([`TxReport::notify`], [`RxReport::notify`]), computed over every used entry the call
//! published. virtio-queue's `needs_notification` counts only entries added through its
//! `add_used`, one at a time, and so cannot see a frame's entries published together: the
//! transport asks the report instead. While a frame waits for receive buffers, the model arms
//! the receive queue (with EVENT_IDX, `avail_event` at the available index it saw) so the
//! driver's next post kicks; the transport leaves the receive queue's notifications to it.

use std::collections::VecDeque;
use std::fmt;
use std::io::Read;
use std::io::Write;

use serde::Deserialize;
use serde::Serialize;
use virtio_queue::DescriptorChain;
use virtio_queue::QueueT;
use vm_memory::GuestMemory;

use super::Slice;
use ring::arm;
use ring::available;
use ring::notify_needed;
use ring::pop;
use ring::publish;
use ring::receive_buffer;
use ring::shape;

/// The device finishes checksums the driver left partial (NEEDS_CSUM on transmit).
pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
/// The driver takes frames whose checksum is partial (NEEDS_CSUM) or already checked
/// (DATA_VALID).
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
/// The driver takes TCP segments of up to 64 KiB (IPv4, IPv6), and with ECN.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
/// The device takes TCP segments of up to 64 KiB (IPv4, IPv6), and with ECN.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
/// Every offload the device offers over a back end that carries headers
/// ([`FrameIo::carries_headers`]): checksums and TCP segmentation both ways. Not UFO or USO:
/// Linux does not send UDP fragments through virtio-net any more, and UDP segmentation would
/// be another parser for little.
pub const OFFLOAD_FEATURES: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_GUEST_ECN
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_HOST_ECN;
/// The device's MTU is in the configuration (5.1.3).
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
/// The device's MAC address is in the configuration.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// A received frame may span several receive buffers (`num_buffers` in its header).
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
/// The configuration's `status` is valid.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// `status`: the link is up.
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

/// The receive queue's index, the transmit queue's, and how many queues the device has.
pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const QUEUES: u16 = 2;

/// Bytes of `struct virtio_net_hdr_v1` (flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers): the header of every frame once VERSION_1 or MRG_RXBUF is
/// negotiated.
pub const HEADER_LEN: usize = 12;
/// The header of a legacy driver that negotiated neither: no `num_buffers`.
pub const LEGACY_HEADER_LEN: usize = 10;
/// Header `flags`: the checksum from `csum_start` to the end is partial (its field at
/// `csum_start + csum_offset` holds the pseudo-header's sum); the receiver finishes it.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// Header `flags` (towards the driver only): the frame's checksums were checked.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// Header `gso_type`: not a segment, a TCP/IPv4 segment, a TCP/IPv6 segment; the ECN bit.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;
/// The largest frame a TCP segmentation offload carries: a 64 KiB IP packet behind an
/// Ethernet header and a VLAN tag.
pub const GSO_FRAME_LIMIT: usize = 65535 + ETH_HLEN + VLAN_HLEN;
/// Bytes of an Ethernet header (destination, source, type): the shortest frame.
pub const ETH_HLEN: usize = 14;
/// Bytes of one 802.1Q tag: a VLAN interface over the NIC sends MTU-sized payloads behind it.
pub const VLAN_HLEN: usize = 4;
/// Smallest MTU the device may announce (5.1.4.1), and the standard Ethernet MTU (what the
/// driver assumes until it acknowledges VIRTIO_NET_F_MTU).
pub const MIN_MTU: u16 = 68;
pub const ETH_DATA_LEN: u16 = 1500;
/// Bytes of the configuration space (`struct virtio_net_config` up to `supported_hash_types`).
pub const CONFIG_LEN: usize = 24;
/// Frames one call handles before it returns to the poll loop (QEMU's TX_BURST), so a busy
/// direction cannot starve the other.
pub const BATCH: usize = 256;
/// Times a receive re-measures the buffers when the driver posts more while the device arms
/// the queue; past that the call returns [`RxProgress::More`] rather than spin on a guest.
const ARM_ATTEMPTS: usize = 4;

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// Whether a NIC may own it: not a group address, not all zero.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Why the device cannot be made, or why a queue stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetError {
    #[error(
        "MTU {0} is below the {MIN_MTU} bytes virtio-net allows: configure {MIN_MTU} to 65535"
    )]
    Mtu(u16),
    #[error(
        "MAC address {0} is a group or zero address: configure a unicast one (first byte even)"
    )]
    Mac(MacAddress),
    /// The ring itself is unusable (the available index announces more chains than the queue
    /// holds, a head past the ring, the used ring outside guest memory): the transport stops
    /// the queue until the driver resets the device.
    #[error("{queue} queue stopped until the driver resets the device: {why}")]
    Ring { queue: &'static str, why: String },
}

/// What a back end could not do with a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// It cannot take a frame now (a full TAP queue, `EAGAIN`): the transmit chain stays on the
    /// ring and the poll loop calls again when the back end is writable.
    #[error("the back end cannot take a frame now")]
    Busy,
    /// It failed: a transmitted frame is dropped and counted; a receive stops the call.
    #[error("back end: {0}")]
    Failed(String),
}

/// The offloads the guest's driver takes on receive: what the back end may hand over
/// ([`FrameIo::accept_offloads`]; a TAP's `TUNSETOFFLOAD`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestOffloads {
    /// Partial checksums (and checked ones).
    pub csum: bool,
    /// TCP segments over IPv4, over IPv6, and with ECN.
    pub tso4: bool,
    pub tso6: bool,
    pub ecn: bool,
}

/// Where frames go to and come from: the host's side of the NIC.
pub trait FrameIo {
    /// Whether each frame goes with a virtio-net header that the other side honours (a TAP
    /// with `IFF_VNET_HDR`): the device then offers [`OFFLOAD_FEATURES`]. Without, frames
    /// are whole and checksummed both ways and every header it is given is all zero.
    fn carries_headers(&self) -> bool {
        false
    }
    /// The guest's driver takes these offloads: the back end may now hand over frames that
    /// use them (and only them).
    fn accept_offloads(&mut self, _offloads: GuestOffloads) -> Result<(), BackendError> {
        Ok(())
    }
    /// Sends one Ethernet frame with its header (`num_buffers` zero; without
    /// [`FrameIo::carries_headers`], all zero).
    fn send(&mut self, header: &NetHeader, frame: &[u8]) -> Result<(), BackendError>;
    /// Writes the next frame waiting for the guest at the start of `buf` and returns its
    /// header and length, or `None` when none waits. A frame longer than `buf` is cut to
    /// `buf.len()`; the model passes a buffer one byte longer than the longest frame it takes,
    /// and drops a frame that fills it.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(NetHeader, usize)>, BackendError>;
}

/// An in-memory back end, for tests and fuzzing (as [`crate::block::MemStore`] is for disks):
/// frames waiting for the guest (with their headers, when `headers` is on: all zero where
/// `to_guest_headers` runs out), and the frames it sent with theirs.
#[derive(Debug, Default)]
pub struct MemLink {
    pub to_guest: VecDeque<Vec<u8>>,
    pub to_guest_headers: VecDeque<NetHeader>,
    pub from_guest: Vec<Vec<u8>>,
    pub from_guest_headers: Vec<NetHeader>,
    /// Answer every send with [`BackendError::Busy`].
    pub busy: bool,
    /// Carry headers ([`FrameIo::carries_headers`]), as a TAP with a virtio-net header does.
    pub headers: bool,
    /// What the device last said the guest accepts.
    pub accepted: GuestOffloads,
}

impl FrameIo for MemLink {
    fn carries_headers(&self) -> bool {
        self.headers
    }

    fn accept_offloads(&mut self, offloads: GuestOffloads) -> Result<(), BackendError> {
        self.accepted = offloads;
        Ok(())
    }

    fn send(&mut self, header: &NetHeader, frame: &[u8]) -> Result<(), BackendError> {
        if self.busy {
            return Err(BackendError::Busy);
        }
        self.from_guest.push(frame.to_vec());
        self.from_guest_headers.push(*header);
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(NetHeader, usize)>, BackendError> {
        let Some(frame) = self.to_guest.pop_front() else {
            return Ok(None);
        };
        let header = self.to_guest_headers.pop_front().unwrap_or_default();
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(Some((header, n)))
    }
}

/// The header in front of every frame (5.1.6), little-endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetHeader {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    /// Receive buffers the frame spans (written by the device; unused on transmit).
    pub num_buffers: u16,
}

impl NetHeader {
    pub fn from_bytes(b: &[u8; HEADER_LEN]) -> NetHeader {
        let word = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        NetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: word(2),
            gso_size: word(4),
            csum_start: word(6),
            csum_offset: word(8),
            num_buffers: word(10),
        }
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (at, v) in [
            (2, self.hdr_len),
            (4, self.gso_size),
            (6, self.csum_start),
            (8, self.csum_offset),
            (10, self.num_buffers),
        ] {
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// The header with only the fields its flags and type give a meaning: checksum fields
    /// only with NEEDS_CSUM, segment fields only for a segment, no `num_buffers` (the
    /// driver's number of buffers means nothing to a back end).
    pub fn meaningful(&self) -> NetHeader {
        let checksum = self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        let segment = self.gso() != VIRTIO_NET_HDR_GSO_NONE;
        NetHeader {
            flags: self.flags,
            gso_type: self.gso_type,
            hdr_len: if segment { self.hdr_len } else { 0 },
            gso_size: if segment { self.gso_size } else { 0 },
            csum_start: if checksum { self.csum_start } else { 0 },
            csum_offset: if checksum { self.csum_offset } else { 0 },
            num_buffers: 0,
        }
    }

    /// The segmentation type without its ECN bit.
    fn gso(&self) -> u8 {
        self.gso_type & !VIRTIO_NET_HDR_GSO_ECN
    }

    /// Why the checksum request of a `len`-byte frame does not fit in it, if it does not.
    fn checksum_outside(&self, len: usize) -> Option<String> {
        let field = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
        (self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && field > len).then(|| {
            format!(
                "a checksum field at {}+{} outside the {len}-byte frame",
                self.csum_start, self.csum_offset
            )
        })
    }

    /// Why a segment's fields do not describe one, if they do not: no segment size, or
    /// headers longer than the frame.
    fn segment_malformed(&self, len: usize) -> Option<String> {
        if self.gso() == VIRTIO_NET_HDR_GSO_NONE {
            return None;
        }
        if self.gso_size == 0 {
            return Some(format!("gso_type {:#x} with gso_size 0", self.gso_type));
        }
        (usize::from(self.hdr_len) > len)
            .then(|| format!("hdr_len {} past the {len}-byte frame", self.hdr_len))
    }
}

/// What the driver may ask of the device in a transmitted header under `acked` features: the
/// offload it asks for that was not negotiated (`Err((Offload, why))`), or a request that
/// does not fit the frame (`Err((Malformed, why))`).
fn check_tx_header(h: &NetHeader, len: usize, acked: u64) -> Result<(), (DropReason, String)> {
    let offload = |why: String| Err((DropReason::Offload, why));
    if h.flags & !VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        return offload(format!(
            "flags {:#x} (only NEEDS_CSUM is the driver's to set)",
            h.flags
        ));
    }
    if h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && acked & VIRTIO_NET_F_CSUM == 0 {
        return offload("NEEDS_CSUM (checksum offload was not negotiated)".into());
    }
    let needed = match h.gso() {
        VIRTIO_NET_HDR_GSO_NONE => 0,
        VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
        other => return offload(format!("gso_type {other:#x} (not offered)")),
    };
    if needed != 0 && acked & needed == 0 {
        return offload(format!(
            "gso_type {:#x} (that segmentation offload was not negotiated)",
            h.gso_type
        ));
    }
    if h.gso_type & VIRTIO_NET_HDR_GSO_ECN != 0
        && (needed == 0 || acked & VIRTIO_NET_F_HOST_ECN == 0)
    {
        return offload(format!(
            "gso_type {:#x} (ECN segmentation was not negotiated)",
            h.gso_type
        ));
    }
    if let Some(why) = h.checksum_outside(len).or_else(|| h.segment_malformed(len)) {
        return Err((DropReason::Malformed, why));
    }
    Ok(())
}

/// The offloads features `acked` say the guest takes on receive.
fn guest_offloads(acked: u64) -> GuestOffloads {
    let csum = acked & VIRTIO_NET_F_GUEST_CSUM != 0;
    GuestOffloads {
        csum,
        // A segment's checksum is partial: no segments for a driver that does not take those.
        tso4: csum && acked & VIRTIO_NET_F_GUEST_TSO4 != 0,
        tso6: csum && acked & VIRTIO_NET_F_GUEST_TSO6 != 0,
        ecn: csum
            && acked & VIRTIO_NET_F_GUEST_ECN != 0
            && acked & (VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6) != 0,
    }
}

/// Finishes a partial checksum in `frame` as the guest's NIC would (the driver does not take
/// partial ones): the ones' complement sum of everything from `start` to the end (the field
/// included, which holds the pseudo-header's sum), complemented, into the field at `field`.
/// The caller checked that the field is inside the frame.
fn finish_checksum(frame: &mut [u8], start: usize, field: usize) {
    let mut sum: u64 = 0;
    let mut words = frame[start..].chunks_exact(2);
    for w in &mut words {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u64::from(u16::from_be_bytes([*last, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // At most 0xffff after folding.
    let folded = !(sum as u16);
    frame[field..field + 2].copy_from_slice(&folded.to_be_bytes());
}

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Longer than [`VirtioNet::max_frame`].
    Oversized,
    /// Shorter than an Ethernet header.
    Runt,
    /// A transmitted header asked for an offload that was not negotiated (`gso_type` or
    /// `flags` not zero).
    Offload,
    /// The transmit chain was malformed (see the module header); it went back empty.
    Malformed,
    /// The guest had no receive buffers that could ever hold it: without MRG_RXBUF the next
    /// buffer was too small, or a ring full of posted buffers was, or the device was reset
    /// while the frame waited.
    NoRxBuffers,
    /// The back end failed to send it.
    Backend,
}

/// Frames dropped in one direction, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drops {
    pub oversized: u64,
    pub runt: u64,
    pub offload: u64,
    pub malformed: u64,
    pub no_rx_buffers: u64,
    pub backend: u64,
}

impl Drops {
    fn count(&mut self, reason: DropReason) {
        let n = match reason {
            DropReason::Oversized => &mut self.oversized,
            DropReason::Runt => &mut self.runt,
            DropReason::Offload => &mut self.offload,
            DropReason::Malformed => &mut self.malformed,
            DropReason::NoRxBuffers => &mut self.no_rx_buffers,
            DropReason::Backend => &mut self.backend,
        };
        *n += 1;
    }

    pub fn total(&self) -> u64 {
        self.oversized
            + self.runt
            + self.offload
            + self.malformed
            + self.no_rx_buffers
            + self.backend
    }
}

/// The device's counters (always on; the service shows them in its dump).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Frames the back end took from the guest, and their bytes (without the header).
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames published to the guest, and their bytes (without the header).
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_dropped: Drops,
    pub rx_dropped: Drops,
    /// Receive chains returned empty because they were malformed (a chain, not a frame).
    pub rx_malformed_chains: u64,
    /// Times a received frame had to wait for the guest to post buffers.
    pub rx_waits: u64,
    /// Received frames whose partial checksum the device finished because the driver does not
    /// take partial ones.
    pub rx_checksums_finished: u64,
}

/// Where [`VirtioNet::process_tx`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxProgress {
    /// The transmit queue is empty: wait for a kick.
    Idle,
    /// [`BATCH`] frames were handled and more may wait: call again after other work.
    More,
    /// The back end is full; the chain it refused is back on the ring: call again when the
    /// back end is writable.
    Blocked,
}

/// Where [`VirtioNet::process_rx`] stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RxProgress {
    /// The back end has no frame: wait for it to be readable.
    Idle,
    /// [`BATCH`] frames were handled, or the driver kept posting buffers while the device
    /// looked: call again after other work.
    More,
    /// A frame waits for receive buffers; the queue is armed: call again when it is kicked
    /// (and do not read the back end meanwhile).
    WaitingForBuffers,
    /// The back end failed to receive, for this reason.
    BackendFailed(String),
}

/// What one [`VirtioNet::process_tx`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxReport {
    pub progress: TxProgress,
    /// The driver wants an interrupt for the used entries published.
    pub notify: bool,
}

/// What one [`VirtioNet::process_rx`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxReport {
    pub progress: RxProgress,
    /// The driver wants an interrupt for the used entries published.
    pub notify: bool,
}

/// A virtio-net device over the back end `B`.
pub struct VirtioNet<B: FrameIo> {
    backend: B,
    mac: MacAddress,
    mtu: u16,
    link_up: bool,
    acked: u64,
    counters: Counters,
    last_problem: Option<String>,
    /// One frame read from the guest, and one from the back end (one byte longer, so a frame
    /// too long for it shows).
    tx_frame: Vec<u8>,
    rx_frame: Vec<u8>,
    /// The header and length of the frame in `rx_frame` that waits for receive buffers.
    rx_waiting: Option<(NetHeader, usize)>,
}

impl<B: FrameIo> VirtioNet<B> {
    /// The device with `mac` and `mtu` (at least [`MIN_MTU`]), its link up.
    pub fn new(backend: B, mac: MacAddress, mtu: u16) -> Result<VirtioNet<B>, NetError> {
        if mtu < MIN_MTU {
            return Err(NetError::Mtu(mtu));
        }
        if !mac.is_unicast() {
            return Err(NetError::Mac(mac));
        }
        // Segments of up to 64 KiB only over a back end that carries headers.
        let mut largest = frame_limit(mtu.max(ETH_DATA_LEN));
        if backend.carries_headers() {
            largest = largest.max(GSO_FRAME_LIMIT);
        }
        Ok(VirtioNet {
            backend,
            mac,
            mtu,
            link_up: true,
            acked: 0,
            counters: Counters::default(),
            last_problem: None,
            tx_frame: vec![0; largest],
            rx_frame: vec![0; largest + 1],
            rx_waiting: None,
        })
    }

    /// The features the device offers (the transport adds the ring features): the offloads
    /// only over a back end that carries headers.
    pub fn features(&self) -> u64 {
        let offloads = if self.backend.carries_headers() {
            OFFLOAD_FEATURES
        } else {
            0
        };
        super::VIRTIO_F_VERSION_1
            | VIRTIO_NET_F_MAC
            | VIRTIO_NET_F_MTU
            | VIRTIO_NET_F_STATUS
            | VIRTIO_NET_F_MRG_RXBUF
            | offloads
    }

    /// The features the driver acknowledged (the transport has checked they were offered):
    /// they set the header's size, whether a frame may span receive buffers, and which
    /// offloads each way (the back end is told which it may hand over).
    pub fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
        self.tell_backend_offloads();
    }

    /// Tells the back end what the driver takes on receive. A back end that cannot follow is
    /// logged; what it hands over anyway is checked frame by frame ([`Self::process_rx`]).
    fn tell_backend_offloads(&mut self) {
        if !self.backend.carries_headers() {
            return;
        }
        let offloads = guest_offloads(self.acked);
        if let Err(e) = self.backend.accept_offloads(offloads) {
            self.last_problem = Some(format!("setting the back end's offloads: {e}"));
        }
    }

    /// The configuration space (5.1.4): mac, status, max_virtqueue_pairs (1), mtu; speed and
    /// duplex unknown (SPEED_DUPLEX is not offered); no RSS.
    pub fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[..6].copy_from_slice(&self.mac.0);
        let status = if self.link_up {
            VIRTIO_NET_S_LINK_UP
        } else {
            0
        };
        c[6..8].copy_from_slice(&status.to_le_bytes());
        c[8..10].copy_from_slice(&1u16.to_le_bytes());
        c[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        c[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        c[16] = 0xff;
        c
    }

    /// Sets the link's state; true when it changed (the transport then raises a configuration
    /// change interrupt).
    pub fn set_link(&mut self, up: bool) -> bool {
        std::mem::replace(&mut self.link_up, up) != up
    }

    /// The driver reset the device: features forgotten, the frame waiting for buffers
    /// dropped. Counters stay.
    pub fn reset(&mut self) {
        self.acked = 0;
        self.tell_backend_offloads();
        if self.rx_waiting.take().is_some() {
            self.dropped(RX, DropReason::NoRxBuffers, "device reset".into());
        }
    }

    /// The longest frame (without the header) the device takes or passes that is not a
    /// segment: the MTU, plus the Ethernet header and a VLAN tag. A TCP segment may be up to
    /// [`GSO_FRAME_LIMIT`] where that offload was negotiated.
    pub fn max_frame(&self) -> usize {
        if self.acked & VIRTIO_NET_F_MTU != 0 {
            frame_limit(self.mtu)
        } else {
            frame_limit(self.mtu.max(ETH_DATA_LEN))
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// What the last dropped frame, malformed chain or back-end failure was (for the log).
    pub fn last_problem(&self) -> Option<&str> {
        self.last_problem.as_deref()
    }

    /// Whether a received frame waits for the guest's receive buffers.
    pub fn has_waiting_frame(&self) -> bool {
        self.rx_waiting.is_some()
    }

    pub fn backend(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The back end, to look at (the descriptor a service polls for it).
    pub fn backend_ref(&self) -> &B {
        &self.backend
    }

    fn header_len(&self) -> usize {
        if self.acked & (super::VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF) != 0 {
            HEADER_LEN
        } else {
            LEGACY_HEADER_LEN
        }
    }

    fn mergeable(&self) -> bool {
        self.acked & VIRTIO_NET_F_MRG_RXBUF != 0
    }

    fn dropped(&mut self, direction: Direction, reason: DropReason, why: String) {
        match direction {
            Direction::Transmit => self.counters.tx_dropped.count(reason),
            Direction::Receive => self.counters.rx_dropped.count(reason),
        }
        self.last_problem = Some(format!("{direction}: {why}"));
    }

    /// Sends every frame waiting on the transmit queue (up to [`BATCH`]) to the back end and
    /// returns each chain with used length 0.
    pub fn process_tx<M, Q>(&mut self, mem: &M, queue: &mut Q) -> Result<TxReport, NetError>
    where
        M: GuestMemory,
        Q: QueueT,
    {
        let first_used = queue.next_used();
        let mut handled = 0;
        let progress = 'ring: loop {
            let (_, waiting) = available(mem, queue, TX)?;
            if waiting == 0 {
                break TxProgress::Idle;
            }
            for _ in 0..waiting {
                if handled == BATCH {
                    break 'ring TxProgress::More;
                }
                let chain = pop(mem, queue, TX)?;
                let head = chain.head_index();
                match self.transmit(mem, chain) {
                    Ok(len) => {
                        self.counters.tx_frames += 1;
                        self.counters.tx_bytes += len as u64;
                    }
                    Err(Unsent::Busy) => {
                        queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                        break 'ring TxProgress::Blocked;
                    }
                    Err(Unsent::Dropped(reason, why)) => self.dropped(TX, reason, why),
                }
                queue
                    .add_used(mem, head, 0)
                    .map_err(|e| ring(TX, format!("used ring: {e}")))?;
                handled += 1;
            }
        };
        let notify = notify_needed(mem, queue, first_used, TX)?;
        Ok(TxReport { progress, notify })
    }

    /// One transmit chain to the back end: the frame's length.
    fn transmit<M: GuestMemory>(
        &mut self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> Result<usize, Unsent> {
        let malformed = |why: String| Unsent::Dropped(DropReason::Malformed, why);
        let shape = shape(&chain).map_err(malformed)?;
        if shape.writable != 0 {
            return Err(malformed(format!(
                "{} device-writable bytes in a transmit chain",
                shape.writable
            )));
        }
        let header_len = self.header_len();
        let Some(len) = shape.readable.checked_sub(header_len as u64) else {
            return Err(malformed(format!(
                "{} bytes, shorter than the {header_len}-byte header",
                shape.readable
            )));
        };
        // A segment may be longer than the MTU (its header says, below); nothing is longer
        // than the buffer.
        let segments = self.acked & (VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6) != 0;
        let max = self.max_frame();
        let limit = if segments { self.tx_frame.len() } else { max };
        if len > limit as u64 {
            return Err(Unsent::Dropped(
                DropReason::Oversized,
                format!("a frame of {len} bytes, longer than the {limit} allowed"),
            ));
        }
        // At most the buffer's length.
        let len = len as usize;
        if len < ETH_HLEN {
            return Err(Unsent::Dropped(
                DropReason::Runt,
                format!("a frame of {len} bytes, shorter than an Ethernet header"),
            ));
        }
        let mut reader = chain
            .reader(mem)
            .map_err(|e| malformed(format!("a buffer outside guest memory: {e}")))?;
        let mut header = [0u8; HEADER_LEN];
        reader
            .read_exact(&mut header[..header_len])
            .map_err(|e| malformed(format!("header: {e}")))?;
        let header = NetHeader::from_bytes(&header);
        check_tx_header(&header, len, self.acked)
            .map_err(|(reason, why)| Unsent::Dropped(reason, why))?;
        // Only the fields that mean something go on (a back end without headers gets none).
        let header = if self.backend.carries_headers() {
            header.meaningful()
        } else {
            NetHeader::default()
        };
        if header.gso() == VIRTIO_NET_HDR_GSO_NONE && len > max {
            return Err(Unsent::Dropped(
                DropReason::Oversized,
                format!("a frame of {len} bytes, not a segment and longer than the {max} the MTU allows"),
            ));
        }
        let frame = &mut self.tx_frame[..len];
        reader
            .read_exact(frame)
            .map_err(|e| malformed(format!("frame: {e}")))?;
        match self.backend.send(&header, frame) {
            Ok(()) => Ok(len),
            Err(BackendError::Busy) => Err(Unsent::Busy),
            Err(BackendError::Failed(why)) => Err(Unsent::Dropped(DropReason::Backend, why)),
        }
    }

    /// Delivers frames from the back end into the receive queue (up to [`BATCH`]), the one
    /// waiting for buffers first.
    pub fn process_rx<M, Q>(&mut self, mem: &M, queue: &mut Q) -> Result<RxReport, NetError>
    where
        M: GuestMemory,
        Q: QueueT,
    {
        let first_used = queue.next_used();
        let mut handled = 0;
        let progress = loop {
            if handled == BATCH {
                break RxProgress::More;
            }
            let (header, len) = match self.rx_waiting.take() {
                Some(waiting) => waiting,
                None => match self.backend.recv(&mut self.rx_frame) {
                    Ok(Some(received)) => received,
                    Ok(None) | Err(BackendError::Busy) => break RxProgress::Idle,
                    Err(BackendError::Failed(why)) => {
                        self.last_problem = Some(format!("receive: {why}"));
                        break RxProgress::BackendFailed(why);
                    }
                },
            };
            handled += 1;
            let header = match self.check_rx(header, len) {
                Ok(header) => header,
                Err((reason, why)) => {
                    self.dropped(RX, reason, why);
                    continue;
                }
            };
            let frame = std::mem::take(&mut self.rx_frame);
            let delivery = self.deliver(mem, queue, &header, &frame[..len]);
            self.rx_frame = frame;
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    // The queue stopped: the frame waits for the reset, which drops it.
                    self.rx_waiting = Some((header, len));
                    return Err(e);
                }
            };
            match delivery {
                Delivery::Published => {
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += len as u64;
                }
                Delivery::Dropped(reason, why) => self.dropped(RX, reason, why),
                Delivery::NoRoom => {
                    self.rx_waiting = Some((header, len));
                    self.counters.rx_waits += 1;
                    break RxProgress::WaitingForBuffers;
                }
                Delivery::Racing => {
                    self.rx_waiting = Some((header, len));
                    break RxProgress::More;
                }
            }
        };
        let notify = notify_needed(mem, queue, first_used, RX)?;
        Ok(RxReport { progress, notify })
    }

    /// A frame from the back end (`len` bytes in `rx_frame`) as the driver may see it: its
    /// size and header checked against what was negotiated (the host is not trusted to honour
    /// `accept_offloads`), a partial checksum finished for a driver that does not take those.
    /// The header to deliver, or why the frame is dropped.
    fn check_rx(
        &mut self,
        mut header: NetHeader,
        len: usize,
    ) -> Result<NetHeader, (DropReason, String)> {
        let max = self.max_frame();
        if len < ETH_HLEN {
            let why = format!("a frame of {len} bytes, shorter than an Ethernet header");
            return Err((DropReason::Runt, why));
        }
        if !self.backend.carries_headers() {
            header = NetHeader::default();
        }
        let offloads = guest_offloads(self.acked);
        let allowed = match header.gso() {
            VIRTIO_NET_HDR_GSO_NONE => true,
            VIRTIO_NET_HDR_GSO_TCPV4 => offloads.tso4,
            VIRTIO_NET_HDR_GSO_TCPV6 => offloads.tso6,
            _ => false,
        } && (header.gso_type & VIRTIO_NET_HDR_GSO_ECN == 0
            || (header.gso() != VIRTIO_NET_HDR_GSO_NONE && offloads.ecn));
        if !allowed {
            return Err((
                DropReason::Offload,
                format!(
                    "a segment (gso_type {:#x}) the driver does not take",
                    header.gso_type
                ),
            ));
        }
        let limit = if header.gso() == VIRTIO_NET_HDR_GSO_NONE {
            max
        } else {
            // One byte less than the buffer: a frame that filled it was cut.
            self.rx_frame.len() - 1
        };
        if len > limit {
            let why = format!("a frame of {len} bytes or more, longer than the {limit} allowed");
            return Err((DropReason::Oversized, why));
        }
        if header.flags & !(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) != 0 {
            return Err((
                DropReason::Malformed,
                format!("header flags {:#x}", header.flags),
            ));
        }
        if let Some(why) = header
            .checksum_outside(len)
            .or_else(|| header.segment_malformed(len))
        {
            return Err((DropReason::Malformed, why));
        }
        if !offloads.csum {
            if header.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
                let start = usize::from(header.csum_start);
                let field = start + usize::from(header.csum_offset);
                finish_checksum(&mut self.rx_frame[..len], start, field);
                self.counters.rx_checksums_finished += 1;
            }
            // Not a segment either (those need partial checksums): nothing left to say.
            header = NetHeader::default();
        }
        Ok(header.meaningful())
    }

    /// One frame into the receive buffers the driver posted: published whole, or nothing
    /// published and the buffers put back.
    fn deliver<M, Q>(
        &mut self,
        mem: &M,
        queue: &mut Q,
        header: &NetHeader,
        frame: &[u8],
    ) -> Result<Delivery, NetError>
    where
        M: GuestMemory,
        Q: QueueT,
    {
        let header_len = self.header_len();
        let need = header_len + frame.len();
        for _ in 0..ARM_ATTEMPTS {
            let (seen, waiting) = available(mem, queue, RX)?;
            let mut start = queue.next_avail();
            let mut buffers: Vec<(u16, Writer<'_, M>)> = Vec::new();
            let mut room = 0usize;
            let mut popped = 0;
            while room < need && popped < waiting && (buffers.is_empty() || self.mergeable()) {
                let chain = pop(mem, queue, RX)?;
                popped += 1;
                let head = chain.head_index();
                match receive_buffer(mem, chain, header_len) {
                    Ok(writer) => {
                        room = room.saturating_add(writer.available_bytes());
                        buffers.push((head, writer));
                    }
                    Err(why) => {
                        // Returned empty, with the buffers taken before it: used entries
                        // between frames, which the driver counts as errors and recycles.
                        let mut empty: Vec<(u16, u32)> =
                            buffers.drain(..).map(|(h, _)| (h, 0)).collect();
                        empty.push((head, 0));
                        publish(mem, queue, &empty)?;
                        room = 0;
                        start = queue.next_avail();
                        self.counters.rx_malformed_chains += 1;
                        self.last_problem = Some(format!("receive buffer {head}: {why}"));
                    }
                }
            }
            if room >= need {
                return self.fill(mem, queue, buffers, header, frame);
            }
            queue.set_next_avail(start);
            if !buffers.is_empty() && !self.mergeable() {
                return Ok(Delivery::Dropped(
                    DropReason::NoRxBuffers,
                    format!("a frame of {} bytes, larger than the next receive buffer ({room} bytes with the header) and MRG_RXBUF is off", frame.len()),
                ));
            }
            if popped == queue.size() {
                return Ok(Delivery::Dropped(
                    DropReason::NoRxBuffers,
                    format!(
                        "a frame of {} bytes, larger than a ring full of receive buffers ({room} bytes)",
                        frame.len()
                    ),
                ));
            }
            arm(mem, queue, seen)?;
            let (now, _) = available(mem, queue, RX)?;
            if now == seen {
                return Ok(Delivery::NoRoom);
            }
        }
        Ok(Delivery::Racing)
    }

    /// Writes the header and `frame` across `buffers` (each filled before the next) and
    /// publishes them together.
    fn fill<M, Q>(
        &mut self,
        mem: &M,
        queue: &mut Q,
        mut buffers: Vec<(u16, Writer<'_, M>)>,
        header: &NetHeader,
        frame: &[u8],
    ) -> Result<Delivery, NetError>
    where
        M: GuestMemory,
        Q: QueueT,
    {
        let header_len = self.header_len();
        // At most as many as the ring holds, which is at most 32768.
        let header = NetHeader {
            num_buffers: buffers.len() as u16,
            ..*header
        }
        .to_bytes();
        let mut rest = frame;
        let mut used = Vec::with_capacity(buffers.len());
        let mut failed = None;
        for (i, (head, writer)) in buffers.iter_mut().enumerate() {
            let first: &[u8] = if i == 0 { &header[..header_len] } else { &[] };
            let n = rest.len().min(writer.available_bytes() - first.len());
            if let Err(e) = writer
                .write_all(first)
                .and_then(|()| writer.write_all(&rest[..n]))
            {
                failed = Some(format!("receive buffer {head}: {e}"));
                break;
            }
            rest = &rest[n..];
            // A buffer's length is a u32: at most that many bytes were written into it.
            used.push((*head, (first.len() + n) as u32));
        }
        if let Some(why) = failed {
            let empty: Vec<(u16, u32)> = buffers.iter().map(|(h, _)| (*h, 0)).collect();
            publish(mem, queue, &empty)?;
            return Ok(Delivery::Dropped(DropReason::Malformed, why));
        }
        publish(mem, queue, &used)?;
        Ok(Delivery::Published)
    }
}

/// The queue a frame went through, for counters, messages and errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Transmit,
    Receive,
}

const TX: Direction = Direction::Transmit;
const RX: Direction = Direction::Receive;

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Transmit => "transmit",
            Direction::Receive => "receive",
        })
    }
}

/// The largest frame for `mtu`.
fn frame_limit(mtu: u16) -> usize {
    usize::from(mtu) + ETH_HLEN + VLAN_HLEN
}

fn ring(direction: Direction, why: String) -> NetError {
    NetError::Ring {
        queue: match direction {
            Direction::Transmit => "transmit",
            Direction::Receive => "receive",
        },
        why,
    }
}

/// Why a transmit chain was not sent.
enum Unsent {
    Busy,
    Dropped(DropReason, String),
}

/// What became of one received frame.
enum Delivery {
    Published,
    Dropped(DropReason, String),
    /// The buffers posted cannot hold it yet; the queue is armed.
    NoRoom,
    /// The driver posted buffers while the device armed the queue, every time it looked.
    Racing,
}

mod ring;

/// A receive buffer's writer.
type Writer<'a, M> = virtio_queue::Writer<'a, Slice<'a, M>>;

#[cfg(test)]
mod tests;
