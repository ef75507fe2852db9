//! Writes the seed corpora (`seeds/<target>/`): what a real front end sends, so the fuzzers
//! start from sessions that reach the rings and the in-flight record rather than from the
//! handshake's first refusals.
//!
//! `cd services/storage/fuzz && cargo run --example seeds`
//!
//! vhost_user_messages: QEMU's start sequence (GET_FEATURES, SET_FEATURES,
//! GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, SET_OWNER, GET_INFLIGHT_FD, SET_MEM_TABLE,
//! SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, SET_VRING_KICK, SET_VRING_CALL,
//! SET_VRING_ENABLE) over a 1 MiB memfd, alone, with a write and a read the guest put on
//! the ring, for virtio-scsi, without the protocol-features handshake, a reconnection that
//! hands the in-flight record back with a request marked in flight, every request the handler
//! passes to the back end, and a ring with more than one batch waiting; and
//! `vhost_user_messages.dict`, the header of every request. inflight_record: a fresh record
//! served, one a back end left mid-request, one too small.
//!
//! `seeds/<target>/found_*` are not written here: they are inputs the fuzzers found (a bug
//! since fixed), kept so that every run tries them again.

use std::path::Path;

use pv_vhost_user::inflight::queue_bytes;
use pv_storage_fuzz::messages::Script;
use pv_storage_fuzz::messages::POOL_DEV_NULL;
use pv_storage_fuzz::messages::POOL_EVENTFD;
use pv_storage_fuzz::messages::POOL_RECEIVED;
use pv_storage_fuzz::record;
use pv_storage_fuzz::record::Call;
use vhost::vhost_user::message::FrontendReq;
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::message::VhostUserMemory;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vhost::vhost_user::message::VhostUserU64;
use vhost::vhost_user::message::VhostUserVringAddr;
use vhost::vhost_user::message::VhostUserVringAddrFlags;
use vhost::vhost_user::message::VhostUserVringState;
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::ByteValued;

/// Where the front end says it mapped guest memory (only differences matter).
const USER: u64 = 0x7f00_0000_0000;
/// Pool memfd 0 is `MEMFD_SIZES[5]`, 1 MiB of guest memory at guest address 0.
const MIB: u8 = 5;
const MEM: u64 = 1 << 20;
const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADERS: u64 = 0x3000;
const DATA: u64 = 0x4000;
/// A disk block (and the data of one request).
const BLOCK: usize = 4096;
const STATUS: u64 = 0x6000;

/// Features QEMU acks for a disk: VERSION_1, the ring features and PROTOCOL_FEATURES.
const VERSION_1: u64 = 1 << 32;
const RING: u64 = (1 << 28) | (1 << 29);
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// A message: request, flags (version 1), size, then the body (the header type is the
/// crate's own).
fn msg(code: FrontendReq, body: &[u8]) -> Vec<u8> {
    let mut m = u32::from(code).to_le_bytes().to_vec();
    m.extend_from_slice(&1u32.to_le_bytes());
    m.extend_from_slice(&(body.len() as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

fn u64_msg(code: FrontendReq, v: u64) -> Vec<u8> {
    msg(code, VhostUserU64::new(v).as_slice())
}

fn state(code: FrontendReq, index: u32, num: u32) -> Vec<u8> {
    msg(code, VhostUserVringState::new(index, num).as_slice())
}

fn handshake(s: &mut Script, features: u64, protocol: bool) {
    s.message(&[], &msg(FrontendReq::GET_FEATURES, &[]));
    s.message(&[], &u64_msg(FrontendReq::SET_FEATURES, features));
    if protocol {
        let proto = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        s.message(&[], &msg(FrontendReq::GET_PROTOCOL_FEATURES, &[]));
        s.message(
            &[],
            &u64_msg(FrontendReq::SET_PROTOCOL_FEATURES, proto.bits()),
        );
    }
    s.message(&[], &msg(FrontendReq::SET_OWNER, &[]));
}

/// The in-flight record for `queues` queues of QSIZE: asked for, or handed back.
fn inflight(s: &mut Script, queues: u16, hand_back: bool) {
    let size = if hand_back {
        u64::from(queues) * queue_bytes(QSIZE)
    } else {
        0
    };
    let body = VhostUserInflight::new(size, 0, queues, QSIZE);
    if hand_back {
        s.message(
            &[POOL_RECEIVED],
            &msg(FrontendReq::SET_INFLIGHT_FD, body.as_slice()),
        );
    } else {
        s.message(&[], &msg(FrontendReq::GET_INFLIGHT_FD, body.as_slice()));
    }
}

/// SET_MEM_TABLE and ring `ring`'s set-up, as QEMU sends them when the driver starts.
fn start_ring(s: &mut Script, ring: u32, protocol: bool) {
    let table = VhostUserMemory::new(1);
    let region = VhostUserMemoryRegion::new(0, MEM, USER, 0);
    s.message(
        &[0],
        &msg(
            FrontendReq::SET_MEM_TABLE,
            &[table.as_slice(), region.as_slice()].concat(),
        ),
    );
    s.message(&[], &state(FrontendReq::SET_VRING_NUM, ring, QSIZE.into()));
    let addr = VhostUserVringAddr::new(
        ring,
        VhostUserVringAddrFlags::empty(),
        USER + DESC,
        USER + USED,
        USER + AVAIL,
        0,
    );
    s.message(&[], &msg(FrontendReq::SET_VRING_ADDR, addr.as_slice()));
    s.message(&[], &state(FrontendReq::SET_VRING_BASE, ring, 0));
    s.message(
        &[POOL_EVENTFD],
        &u64_msg(FrontendReq::SET_VRING_KICK, ring.into()),
    );
    s.message(
        &[POOL_EVENTFD],
        &u64_msg(FrontendReq::SET_VRING_CALL, ring.into()),
    );
    if protocol {
        s.message(&[], &state(FrontendReq::SET_VRING_ENABLE, ring, 1));
    }
}

/// A descriptor the guest writes: guest address, length, flags (NEXT is added).
type Desc = (u64, u32, u16);

/// The guest puts chains on the ring from avail slot `first` on: each a head and its
/// descriptors.
fn guest_chains(s: &mut Script, first: u16, chains: &[(u16, &[Desc])]) {
    for (i, (head, descs)) in chains.iter().enumerate() {
        for (j, (addr, len, flags)) in descs.iter().enumerate() {
            let index = head + j as u16;
            let next_flag = if j + 1 < descs.len() { 1 } else { 0 };
            let mut d = Vec::new();
            d.extend_from_slice(&addr.to_le_bytes());
            d.extend_from_slice(&len.to_le_bytes());
            d.extend_from_slice(&(flags | next_flag).to_le_bytes());
            d.extend_from_slice(&(index + 1).to_le_bytes());
            s.write(0, (DESC + 16 * u64::from(index)) as u32, &d);
        }
        let slot = u64::from(first) + i as u64;
        s.write(0, (AVAIL + 4 + 2 * slot) as u32, &head.to_le_bytes());
    }
    let idx = first + chains.len() as u16;
    s.write(0, (AVAIL + 2) as u32, &idx.to_le_bytes());
}

/// A virtio-blk write of block 1 (sector 8; the disk's blocks are 4 KiB) and a read of it.
fn blk_requests(s: &mut Script) {
    let header = |kind: u32, sector: u64| {
        [
            kind.to_le_bytes().as_slice(),
            &[0; 4],
            &sector.to_le_bytes(),
        ]
        .concat()
    };
    s.write(0, HEADERS as u32, &header(1, 8));
    s.write(0, HEADERS as u32 + 16, &header(0, 8));
    s.write(0, DATA as u32, &[0x5a; BLOCK]);
    guest_chains(
        s,
        0,
        &[
            (
                0,
                &[(HEADERS, 16, 0), (DATA, BLOCK as u32, 0), (STATUS, 1, 2)],
            ),
            (
                3,
                &[
                    (HEADERS + 16, 16, 0),
                    (DATA + BLOCK as u64, BLOCK as u32, 2),
                    (STATUS + 1, 1, 2),
                ],
            ),
        ],
    );
}

fn vhost_user_messages() -> Vec<(&'static str, Vec<u8>)> {
    let blk = VERSION_1 | RING | PROTOCOL_FEATURES;
    let mut seeds = Vec::new();

    let mut s = Script::new(false, [MIB, 1, 0]);
    handshake(&mut s, blk, true);
    inflight(&mut s, 1, false);
    start_ring(&mut s, 0, true);
    seeds.push(("qemu_start", s.bytes().to_vec()));

    blk_requests(&mut s);
    seeds.push(("qemu_start_write_read", s.bytes().to_vec()));

    // The connection ends (an invalid message), as when a back end dies having taken a
    // third request (head 6, marked in the record) off the ring; the front end reconnects,
    // hands the record back, and the request is answered again.
    s.message(&[], &[0xff; 12]);
    guest_chains(
        &mut s,
        2,
        &[(
            6,
            &[
                (HEADERS, 16, 0),
                (DATA, BLOCK as u32, 0),
                (STATUS + 2, 1, 2),
            ],
        )],
    );
    let mut entry = vec![1u8, 0, 0, 0, 0, 0, 0, 0];
    entry.extend_from_slice(&9u64.to_le_bytes());
    s.write(POOL_RECEIVED, 16 + 16 * 6, &entry);
    handshake(&mut s, blk, true);
    inflight(&mut s, 1, true);
    start_ring(&mut s, 0, true);
    seeds.push(("reconnect_with_record", s.bytes().to_vec()));

    let mut s = Script::new(false, [MIB, 1, 0]);
    handshake(&mut s, VERSION_1 | RING, false);
    start_ring(&mut s, 0, false);
    blk_requests(&mut s);
    seeds.push(("no_protocol_features", s.bytes().to_vec()));

    // virtio-scsi: INQUIRY on the first request queue (ring 2).
    let mut s = Script::new(true, [MIB, 1, 0]);
    handshake(&mut s, VERSION_1 | RING | PROTOCOL_FEATURES, true);
    inflight(&mut s, 3, false);
    start_ring(&mut s, 2, true);
    let mut req = vec![1u8, 0, 0x40, 0, 0, 0, 0, 0];
    req.extend_from_slice(&[0; 8 + 3]);
    let mut cdb = [0u8; 32];
    cdb[..6].copy_from_slice(&[0x12, 0, 0, 0, 36, 0]);
    req.extend_from_slice(&cdb);
    s.write(0, HEADERS as u32, &req);
    guest_chains(
        &mut s,
        0,
        &[(0, &[(HEADERS, 51, 0), (STATUS, 108, 2), (DATA, 36, 2)])],
    );
    seeds.push(("scsi_inquiry", s.bytes().to_vec()));
    seeds.push(("every_request", every_request()));
    seeds.push(("full_batch", full_batch()));
    seeds
}

/// Every request the handler passes to the back end, in sessions that each end with one it
/// refuses (the handler then drops the connection and the next session reconnects).
fn every_request() -> Vec<u8> {
    let blk = VERSION_1 | RING | PROTOCOL_FEATURES;
    let mut s = Script::new(false, [MIB, 1, 0]);
    // A long session: queue count, configuration, two memory regions, a ring started,
    // served, stopped, restarted and disabled.
    handshake(&mut s, blk, true);
    s.message(&[], &msg(FrontendReq::GET_QUEUE_NUM, &[]));
    let config = |offset: u32, size: u32| {
        let mut body = offset.to_le_bytes().to_vec();
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.resize(12 + size as usize, 0);
        body
    };
    s.message(&[], &msg(FrontendReq::GET_CONFIG, &config(0, 60)));
    s.message(&[], &msg(FrontendReq::GET_CONFIG, &config(250, 8)));
    inflight(&mut s, 1, false);
    let table = VhostUserMemory::new(2);
    let low = VhostUserMemoryRegion::new(0, MEM, USER, 0);
    let high = VhostUserMemoryRegion::new(MEM, 4096, USER + MEM, 0);
    s.message(
        &[0, 1],
        &msg(
            FrontendReq::SET_MEM_TABLE,
            &[table.as_slice(), low.as_slice(), high.as_slice()].concat(),
        ),
    );
    s.message(&[], &state(FrontendReq::SET_VRING_NUM, 0, QSIZE.into()));
    let addr = VhostUserVringAddr::new(
        0,
        VhostUserVringAddrFlags::empty(),
        USER + DESC,
        USER + USED,
        USER + AVAIL,
        0,
    );
    s.message(&[], &msg(FrontendReq::SET_VRING_ADDR, addr.as_slice()));
    s.message(&[], &state(FrontendReq::SET_VRING_BASE, 0, 0));
    s.message(&[POOL_EVENTFD], &u64_msg(FrontendReq::SET_VRING_KICK, 0));
    s.message(&[POOL_EVENTFD], &u64_msg(FrontendReq::SET_VRING_CALL, 0));
    s.message(&[POOL_EVENTFD], &u64_msg(FrontendReq::SET_VRING_ERR, 0));
    s.message(&[], &state(FrontendReq::SET_VRING_ENABLE, 0, 1));
    blk_requests(&mut s);
    s.message(&[], &state(FrontendReq::GET_VRING_BASE, 0, 0));
    s.message(&[], &state(FrontendReq::SET_VRING_BASE, 0, 2));
    s.message(&[POOL_EVENTFD], &u64_msg(FrontendReq::SET_VRING_KICK, 0));
    s.message(&[], &state(FrontendReq::SET_VRING_ENABLE, 0, 0));
    s.message(&[], &state(FrontendReq::GET_VRING_BASE, 0, 0));
    s.message(&[], &msg(FrontendReq::CHECK_DEVICE_STATE, &[]));
    let transfer = [0u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
    s.message(&[1], &msg(FrontendReq::SET_DEVICE_STATE_FD, &transfer));
    s.message(&[], &msg(FrontendReq::RESET_OWNER, &[]));
    s.message(&[], &msg(FrontendReq::SET_CONFIG, &config(0, 4)));
    // Sessions that end at once: polling mode, overlapping regions, a GPU socket, a mapping
    // past its file's end, an in-flight record that is not one.
    handshake(&mut s, blk, true);
    s.message(&[], &u64_msg(FrontendReq::SET_VRING_KICK, 0x100));
    handshake(&mut s, blk, true);
    let table = VhostUserMemory::new(2);
    let other = VhostUserMemoryRegion::new(2 * MEM, 4096, USER + 4096, 0);
    s.message(
        &[0, 1],
        &msg(
            FrontendReq::SET_MEM_TABLE,
            &[table.as_slice(), low.as_slice(), other.as_slice()].concat(),
        ),
    );
    handshake(&mut s, blk, true);
    s.message(&[POOL_EVENTFD], &msg(FrontendReq::GPU_SET_SOCKET, &[]));
    handshake(&mut s, blk, true);
    let table = VhostUserMemory::new(1);
    let past = VhostUserMemoryRegion::new(0, 2 * MEM, USER, 0);
    s.message(
        &[0],
        &msg(
            FrontendReq::SET_MEM_TABLE,
            &[table.as_slice(), past.as_slice()].concat(),
        ),
    );
    handshake(&mut s, blk, true);
    let body = VhostUserInflight::new(1 << 20, 0, 1, 256);
    s.message(
        &[POOL_DEV_NULL],
        &msg(FrontendReq::SET_INFLIGHT_FD, body.as_slice()),
    );
    s.bytes().to_vec()
}

/// A ring of 512 whose driver announces 300 requests (each a lone descriptor that cannot
/// carry a status): more than one batch.
fn full_batch() -> Vec<u8> {
    let mut s = Script::new(false, [MIB, 1, 0]);
    handshake(&mut s, VERSION_1 | RING | PROTOCOL_FEATURES, true);
    let table = VhostUserMemory::new(1);
    let region = VhostUserMemoryRegion::new(0, MEM, USER, 0);
    s.message(
        &[0],
        &msg(
            FrontendReq::SET_MEM_TABLE,
            &[table.as_slice(), region.as_slice()].concat(),
        ),
    );
    s.message(&[], &state(FrontendReq::SET_VRING_NUM, 0, 512));
    let addr = VhostUserVringAddr::new(
        0,
        VhostUserVringAddrFlags::empty(),
        USER,
        USER + 0x3000,
        USER + 0x2000,
        0,
    );
    s.message(&[], &msg(FrontendReq::SET_VRING_ADDR, addr.as_slice()));
    s.write(0, 0x2002, &300u16.to_le_bytes());
    s.message(&[POOL_EVENTFD], &u64_msg(FrontendReq::SET_VRING_KICK, 0));
    s.message(&[], &state(FrontendReq::SET_VRING_ENABLE, 0, 1));
    s.bytes().to_vec()
}

/// A libFuzzer dictionary: the header of every request (code, flags with version 1), so
/// that mutations can splice in a message of any kind.
fn dictionary() -> String {
    let mut dict =
        String::from("# vhost-user request headers (request u32, flags u32 = version 1)\n");
    for code in 1u32..=44 {
        let mut entry = code.to_le_bytes().to_vec();
        entry.extend_from_slice(&1u32.to_le_bytes());
        let escaped: String = entry.iter().map(|b| format!("\\x{b:02x}")).collect();
        dict.push_str(&format!("request_{code}=\"{escaped}\"\n"));
    }
    dict
}

fn inflight_record() -> Vec<(&'static str, Vec<u8>)> {
    let size = queue_bytes(QSIZE) as u32;
    // Queue 0's part as a back end that died mid-request left it: version 1, 16 descriptors,
    // last_batch_head 3, used_idx 1; heads 7 and 3 in flight (counters 1 and 2).
    let mut part = Vec::new();
    part.extend_from_slice(&0u64.to_le_bytes());
    part.extend_from_slice(&1u16.to_le_bytes());
    part.extend_from_slice(&QSIZE.to_le_bytes());
    part.extend_from_slice(&3u16.to_le_bytes());
    part.extend_from_slice(&1u16.to_le_bytes());
    for head in 0..QSIZE {
        let (inflight, counter) = match head {
            7 => (1u8, 1u64),
            3 => (1, 2),
            _ => (0, 0),
        };
        part.extend_from_slice(&[inflight, 0, 0, 0, 0, 0]);
        part.extend_from_slice(&(head + 1).to_le_bytes());
        part.extend_from_slice(&counter.to_le_bytes());
    }
    let serve = [
        Call::Prepare {
            queue: 0,
            size: QSIZE,
        },
        Call::Start {
            queue: 0,
            head: 5,
            counter: 1,
        },
        Call::Completing { queue: 0, head: 5 },
        Call::Completed {
            queue: 0,
            head: 5,
            used: 1,
        },
        Call::Start {
            queue: 0,
            head: 6,
            counter: 2,
        },
        Call::Recover {
            queue: 0,
            size: QSIZE,
            used: 1,
        },
        Call::Clear { queue: 0 },
        Call::Recover {
            queue: 0,
            size: 8,
            used: 0,
        },
    ];
    vec![
        (
            "fresh_record_served",
            record::encode(2, QSIZE, 8, 2 * size, &serve, &[]),
        ),
        (
            "left_by_a_dead_back_end",
            record::encode(
                1,
                QSIZE,
                8,
                size,
                &[
                    Call::Recover {
                        queue: 0,
                        size: QSIZE,
                        used: 2,
                    },
                    Call::Recover {
                        queue: 0,
                        size: QSIZE,
                        used: 2,
                    },
                ],
                &part,
            ),
        ),
        ("too_small", record::encode(2, 256, 8, 4096, &[], &[])),
    ]
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for (target, seeds) in [
        ("vhost_user_messages", vhost_user_messages()),
        ("inflight_record", inflight_record()),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let dict = Path::new(env!("CARGO_MANIFEST_DIR")).join("vhost_user_messages.dict");
    std::fs::write(dict, dictionary()).unwrap();
}
