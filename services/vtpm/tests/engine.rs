//! The TPM in-process (libtpms through our wrapper): manufacture, commands, permanent state
//! through the store, and resuming from a checkpoint after the process is gone.

use std::sync::Mutex;

use ipc_defs::services::vtpm::Platform;
use ipc_defs::services::vtpm::Request;
use ipc_defs::services::vtpm::Response;
use ipc_defs::services::vtpm::TpmBytes;
use pv_vtpm::libtpms::Engine;
use pv_vtpm::server::Tpm;
use pv_vtpm::state::MemPermanent;
use pv_vtpm::state::MemRegion;
use pv_vtpm::state::SharedNv;
use sha2::Digest;
use sha2::Sha256;

/// libtpms is one TPM per process: tests take it in turn.
static ENGINE: Mutex<()> = Mutex::new(());

type Disk = MemPermanent;
type Region = MemRegion;

fn start(disk: &Disk, region: &Region) -> Tpm<Disk, Region> {
    let nv = SharedNv::default();
    let engine = Engine::take(Box::new(nv.clone()))
        .expect("free")
        .expect("TPM 2.0");
    Tpm::start(engine, nv, disk.clone(), region.clone()).expect("start")
}

fn cmd(tpm: &mut Tpm<Disk, Region>, seq: u64, bytes: &[u8]) -> Vec<u8> {
    match tpm.handle(
        "test",
        Request::Command {
            seq,
            locality: 0,
            command: TpmBytes::new(bytes).unwrap(),
        },
    ) {
        Response::Tpm(r) => r.as_slice().to_vec(),
        other => panic!("{other:?}"),
    }
}

fn rc(response: &[u8]) -> u32 {
    u32::from_be_bytes(response[6..10].try_into().unwrap())
}

const STARTUP_CLEAR: [u8; 12] = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x44, 0, 0];
const GET_RANDOM_32: [u8; 12] = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 32];
const PCR_READ_16: [u8; 20] = [
    0x80, 1, 0, 0, 0, 20, 0, 0, 1, 0x7e, 0, 0, 0, 1, 0, 0x0b, 3, 0, 0, 1,
];

fn pcr_extend_16(digest: &[u8; 32]) -> Vec<u8> {
    let mut c = vec![0x80, 2, 0, 0, 0, 65, 0, 0, 1, 0x82, 0, 0, 0, 16, 0, 0, 0, 9];
    c.extend_from_slice(&[0x40, 0, 0, 9, 0, 0, 0, 0, 0]);
    c.extend_from_slice(&[0, 0, 0, 1, 0, 0x0b]);
    c.extend_from_slice(digest);
    assert_eq!(c.len(), 65);
    c
}

fn pcr16(tpm: &mut Tpm<Disk, Region>, seq: u64) -> Vec<u8> {
    let r = cmd(tpm, seq, &PCR_READ_16);
    assert_eq!(rc(&r), 0);
    r[r.len() - 32..].to_vec()
}

#[test]
fn the_tpm_starts_extends_and_resumes_after_a_crash_with_the_same_pcrs() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start(&disk, &region);
    assert!(!tpm.resumed);
    assert!(
        disk.0.lock().unwrap().is_some(),
        "a manufactured TPM stored its state"
    );
    assert_eq!(rc(&cmd(&mut tpm, 1, &STARTUP_CLEAR)), 0);
    let r = cmd(&mut tpm, 2, &GET_RANDOM_32);
    assert_eq!((rc(&r), r.len()), (0, 10 + 2 + 32));

    let mut expected = [0u8; 32];
    for (i, seq) in (3..8).enumerate() {
        let d: [u8; 32] = Sha256::digest([i as u8]).into();
        assert_eq!(rc(&cmd(&mut tpm, seq, &pcr_extend_16(&d))), 0);
        expected = Sha256::new()
            .chain_update(expected)
            .chain_update(d)
            .finalize()
            .into();
    }
    assert_eq!(pcr16(&mut tpm, 8), expected);

    // The process dies; a new one starts from the same VMGS record and checkpoint region.
    drop(tpm);
    let mut tpm = start(&disk, &region);
    assert!(tpm.resumed);
    assert_eq!(pcr16(&mut tpm, 9), expected, "PCRs survive the restart");
    // The last command sent again (its reply was lost) is answered, not run again.
    let d: [u8; 32] = Sha256::digest(b"once").into();
    let first = cmd(&mut tpm, 10, &pcr_extend_16(&d));
    drop(tpm);
    let mut tpm = start(&disk, &region);
    assert_eq!(cmd(&mut tpm, 10, &pcr_extend_16(&d)), first);
    assert_eq!(tpm.counters.replayed, 1);
    expected = Sha256::new()
        .chain_update(expected)
        .chain_update(d)
        .finalize()
        .into();
    assert_eq!(pcr16(&mut tpm, 11), expected, "extended exactly once");

    // A power cycle is a fresh boot: PCRs reset, Startup needed again.
    assert_eq!(
        tpm.handle("test", Request::Platform(Platform::Reset)),
        Response::Done
    );
    assert_eq!(
        rc(&cmd(&mut tpm, 12, &PCR_READ_16)),
        0x100,
        "TPM_RC_INITIALIZE"
    );
    assert_eq!(rc(&cmd(&mut tpm, 13, &STARTUP_CLEAR)), 0);
    assert_eq!(pcr16(&mut tpm, 14), [0u8; 32]);
}

#[test]
fn malformed_commands_get_tpm_errors() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start(&disk, &region);
    assert_eq!(rc(&cmd(&mut tpm, 1, &STARTUP_CLEAR)), 0);
    // Size field larger than the data; truncated header; garbage.
    let mut big = GET_RANDOM_32;
    big[5] = 40;
    assert_eq!(rc(&cmd(&mut tpm, 2, &big)), 0x142);
    assert_eq!(rc(&cmd(&mut tpm, 3, &[0x80, 1, 0])), 0x142);
    let garbage: Vec<u8> = (0..4000u32).map(|i| (i * 7) as u8).collect();
    let r = cmd(&mut tpm, 4, &garbage);
    assert_ne!(rc(&r), 0);
    // Still working.
    assert_eq!(rc(&cmd(&mut tpm, 5, &GET_RANDOM_32)), 0);
}

static ACCESS_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn access(offset: u64, size: u8, write: Option<u64>) -> Request {
    Request::Mmio(ipc_defs::services::guest::Access {
        vcpu: 0,
        seq: ACCESS_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        space: ipc_defs::services::guest::Space::Mmio,
        address: pv_vtpm::tis::BASE + offset,
        size,
        write,
    })
}

fn reg(tpm: &mut Tpm<Disk, Region>, offset: u64, size: u8) -> u64 {
    match tpm.handle("guest", access(offset, size, None)) {
        Response::Register(v) => v,
        other => panic!("{other:?}"),
    }
}

fn set(tpm: &mut Tpm<Disk, Region>, offset: u64, size: u8, value: u64) {
    assert_eq!(
        tpm.handle("guest", access(offset, size, Some(value))),
        Response::Done
    );
}

/// One command through the TIS registers, as Linux's tpm_tis_core drives them.
fn tis_transmit(tpm: &mut Tpm<Disk, Region>, command: &[u8]) -> Vec<u8> {
    use pv_vtpm::tis::*;
    set(tpm, ACCESS, 1, u64::from(ACCESS_REQUEST_USE));
    assert_ne!(reg(tpm, ACCESS, 1) as u8 & ACCESS_ACTIVE_LOCALITY, 0);
    set(tpm, STS, 1, u64::from(STS_COMMAND_READY));
    for (i, b) in command.iter().enumerate() {
        if i + 1 == command.len() {
            assert_ne!(reg(tpm, STS, 1) as u32 & STS_EXPECT, 0);
        }
        set(tpm, DATA_FIFO, 1, u64::from(*b));
    }
    assert_eq!(reg(tpm, STS, 1) as u32 & STS_EXPECT, 0);
    set(tpm, STS, 1, u64::from(STS_GO));
    assert_ne!(reg(tpm, STS, 1) as u32 & STS_DATA_AVAIL, 0);
    let mut r = Vec::new();
    while reg(tpm, STS, 1) as u32 & STS_DATA_AVAIL != 0 {
        r.push(reg(tpm, DATA_FIFO, 1) as u8);
    }
    set(tpm, STS, 1, u64::from(STS_COMMAND_READY));
    set(tpm, ACCESS, 1, u64::from(ACCESS_ACTIVE_LOCALITY));
    r
}

#[test]
fn the_guest_register_interface_runs_commands_on_the_engine() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start(&disk, &region);
    assert_eq!(reg(&mut tpm, pv_vtpm::tis::DID_VID, 4), 0x0001_1014);
    assert_eq!(rc(&tis_transmit(&mut tpm, &STARTUP_CLEAR)), 0);
    let r = tis_transmit(&mut tpm, &GET_RANDOM_32);
    assert_eq!((rc(&r), r.len()), (0, 44));
    // The guest's commands are recorded like any client's: a restart keeps their effects.
    let d: [u8; 32] = Sha256::digest(b"guest").into();
    assert_eq!(rc(&tis_transmit(&mut tpm, &pcr_extend_16(&d))), 0);
    drop(tpm);
    let mut tpm = start(&disk, &region);
    let expected: [u8; 32] = Sha256::new()
        .chain_update([0u8; 32])
        .chain_update(d)
        .finalize()
        .into();
    let r = tis_transmit(&mut tpm, &PCR_READ_16);
    assert_eq!(&r[r.len() - 32..], &expected);
}

#[test]
fn a_resumed_tpm_never_repeats_random_output() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start(&disk, &region);
    assert_eq!(rc(&cmd(&mut tpm, 1, &STARTUP_CLEAR)), 0);
    drop(tpm);
    // Two resumes from the very same checkpoint (as if the first one's output was lost in
    // a crash): their random numbers must differ.
    let saved = region.0.borrow().clone();
    let mut tpm = start(&disk, &region);
    let a = cmd(&mut tpm, 2, &GET_RANDOM_32);
    drop(tpm);
    *region.0.borrow_mut() = saved;
    let mut tpm = start(&disk, &region);
    let b = cmd(&mut tpm, 3, &GET_RANDOM_32);
    assert_eq!((rc(&a), rc(&b)), (0, 0));
    assert_ne!(a, b, "the generator state was replayed");
}

#[test]
fn a_tpm_restarted_before_its_startup_starts_and_still_never_repeats_random_output() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    // Powered on, waiting for TPM2_Startup (as after a platform reset) when the process dies.
    drop(start(&disk, &region));
    let saved = region.0.borrow().clone();
    let mut tpm = start(&disk, &region);
    assert!(tpm.resumed);
    assert_eq!(rc(&cmd(&mut tpm, 1, &STARTUP_CLEAR)), 0);
    let a = cmd(&mut tpm, 2, &GET_RANDOM_32);
    drop(tpm);
    *region.0.borrow_mut() = saved;
    let mut tpm = start(&disk, &region);
    assert_eq!(rc(&cmd(&mut tpm, 3, &STARTUP_CLEAR)), 0);
    let b = cmd(&mut tpm, 4, &GET_RANDOM_32);
    assert_eq!((rc(&a), rc(&b)), (0, 0));
    assert_ne!(a, b, "the generator state was replayed");
}

#[test]
fn a_powered_off_tpm_stays_off_across_a_restart() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start(&disk, &region);
    assert_eq!(
        tpm.handle("test", Request::Platform(Platform::PowerOff)),
        Response::Done
    );
    drop(tpm);
    let mut tpm = start(&disk, &region);
    assert!(tpm.continued() && !tpm.is_powered());
    assert!(matches!(
        tpm.handle(
            "test",
            Request::Command {
                seq: 1,
                locality: 0,
                command: TpmBytes::new(&STARTUP_CLEAR).unwrap()
            }
        ),
        Response::Error(_)
    ));
    assert_eq!(
        tpm.handle("test", Request::Platform(Platform::PowerOn)),
        Response::Done
    );
    assert_eq!(rc(&cmd(&mut tpm, 2, &STARTUP_CLEAR)), 0);
}

#[test]
fn a_guest_response_not_yet_read_survives_a_restart() {
    use pv_vtpm::tis::*;
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start(&disk, &region);
    assert_eq!(rc(&tis_transmit(&mut tpm, &STARTUP_CLEAR)), 0);
    // The guest sends GetRandom and writes tpmGo; the service dies before the guest reads.
    set(&mut tpm, ACCESS, 1, u64::from(ACCESS_REQUEST_USE));
    set(&mut tpm, STS, 1, u64::from(STS_COMMAND_READY));
    for b in GET_RANDOM_32 {
        set(&mut tpm, DATA_FIFO, 1, u64::from(b));
    }
    set(&mut tpm, STS, 1, u64::from(STS_GO));
    drop(tpm);
    let mut tpm = start(&disk, &region);
    assert_ne!(
        reg(&mut tpm, STS, 1) as u32 & STS_DATA_AVAIL,
        0,
        "the response is still there"
    );
    let mut r = Vec::new();
    while reg(&mut tpm, STS, 1) as u32 & STS_DATA_AVAIL != 0 {
        r.push(reg(&mut tpm, DATA_FIFO, 1) as u8);
    }
    assert_eq!((rc(&r), r.len()), (0, 44));
}
