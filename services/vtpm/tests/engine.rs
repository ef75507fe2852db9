//! The TPM in-process (libtpms through our wrapper): manufacture, commands, permanent state
//! through the store, and resuming from a checkpoint after the process is gone.

use std::sync::Mutex;

use ipc_defs::services::vtpm::Localities;
use ipc_defs::services::vtpm::Platform;
use ipc_defs::services::vtpm::Request;
use ipc_defs::services::vtpm::Response;
use ipc_defs::services::vtpm::Right;
use ipc_defs::services::vtpm::TpmBytes;
use ipc_defs::services::vtpm::VtpmError;
use ipc_defs::services::vtpm::VtpmGrant;
use pv_vtpm::libtpms::Engine;
use pv_vtpm::server::Clients;
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

/// The test's own client: commands at every locality and platform signals.
const TEST: VtpmGrant = VtpmGrant {
    commands: Localities::ALL,
    platform: true,
    registers: 0,
};
/// The guest partition's channel, one vCPU.
const GUEST: VtpmGrant = VtpmGrant {
    commands: Localities::NONE,
    platform: false,
    registers: 1,
};

/// A TPM serving the client "test" and no guest partition.
fn start(disk: &Disk, region: &Region) -> Tpm<Disk, Region> {
    start_for(disk, region, 0)
}

/// A TPM serving the client "test" and a guest partition of `vcpus` vCPUs.
fn start_for(disk: &Disk, region: &Region, vcpus: u32) -> Tpm<Disk, Region> {
    try_start(disk, region, vcpus).expect("start")
}

fn try_start(disk: &Disk, region: &Region, vcpus: u32) -> Result<Tpm<Disk, Region>, String> {
    let nv = SharedNv::default();
    let engine = Engine::take(Box::new(nv.clone()))
        .expect("free")
        .expect("TPM 2.0");
    let clients = Clients {
        commands: vec!["test".into()],
        vcpus,
    };
    Tpm::start(engine, nv, disk.clone(), region.clone(), clients)
}

fn cmd(tpm: &mut Tpm<Disk, Region>, seq: u64, bytes: &[u8]) -> Vec<u8> {
    match tpm.handle(
        "test",
        &TEST,
        Request::Command {
            seq,
            locality: 0,
            command: TpmBytes::new(bytes).unwrap(),
            start_by: None,
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
        tpm.handle("test", &TEST, Request::platform(Platform::Reset)),
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
    match tpm.handle("guest", &GUEST, access(offset, size, None)) {
        Response::Register(v) => v,
        other => panic!("{other:?}"),
    }
}

fn set(tpm: &mut Tpm<Disk, Region>, offset: u64, size: u8, value: u64) {
    assert_eq!(
        tpm.handle("guest", &GUEST, access(offset, size, Some(value))),
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
    let mut tpm = start_for(&disk, &region, 1);
    assert_eq!(reg(&mut tpm, pv_vtpm::tis::DID_VID, 4), 0x0001_1014);
    assert_eq!(rc(&tis_transmit(&mut tpm, &STARTUP_CLEAR)), 0);
    let r = tis_transmit(&mut tpm, &GET_RANDOM_32);
    assert_eq!((rc(&r), r.len()), (0, 44));
    // The guest's commands are recorded like any client's: a restart keeps their effects.
    let d: [u8; 32] = Sha256::digest(b"guest").into();
    assert_eq!(rc(&tis_transmit(&mut tpm, &pcr_extend_16(&d))), 0);
    drop(tpm);
    let mut tpm = start_for(&disk, &region, 1);
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
        tpm.handle("test", &TEST, Request::platform(Platform::PowerOff)),
        Response::Done
    );
    drop(tpm);
    let mut tpm = start(&disk, &region);
    assert!(tpm.continued() && !tpm.is_powered());
    assert!(matches!(
        tpm.handle(
            "test",
            &TEST,
            Request::Command {
                seq: 1,
                locality: 0,
                command: TpmBytes::new(&STARTUP_CLEAR).unwrap(),
                start_by: None,
            }
        ),
        Response::Error(_)
    ));
    assert_eq!(
        tpm.handle("test", &TEST, Request::platform(Platform::PowerOn)),
        Response::Done
    );
    assert_eq!(rc(&cmd(&mut tpm, 2, &STARTUP_CLEAR)), 0);
}

#[test]
fn a_guest_response_not_yet_read_survives_a_restart() {
    use pv_vtpm::tis::*;
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start_for(&disk, &region, 1);
    assert_eq!(rc(&tis_transmit(&mut tpm, &STARTUP_CLEAR)), 0);
    // The guest sends GetRandom and writes tpmGo; the service dies before the guest reads.
    set(&mut tpm, ACCESS, 1, u64::from(ACCESS_REQUEST_USE));
    set(&mut tpm, STS, 1, u64::from(STS_COMMAND_READY));
    for b in GET_RANDOM_32 {
        set(&mut tpm, DATA_FIFO, 1, u64::from(b));
    }
    set(&mut tpm, STS, 1, u64::from(STS_GO));
    drop(tpm);
    let mut tpm = start_for(&disk, &region, 1);
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

/// The checkpoint region's bytes.
fn snapshot(region: &Region) -> Vec<u8> {
    region.0.borrow().clone()
}

fn access_of(vcpu: u32, seq: u64, offset: u64, write: Option<u64>) -> Request {
    Request::Mmio(ipc_defs::services::guest::Access {
        vcpu,
        seq,
        space: ipc_defs::services::guest::Space::Mmio,
        address: pv_vtpm::tis::BASE + offset,
        size: 1,
        write,
    })
}

#[test]
fn every_request_beyond_the_callers_grant_is_refused_and_leaves_the_tpm_as_it_was() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start(&disk, &region);
    assert_eq!(rc(&cmd(&mut tpm, 1, &STARTUP_CLEAR)), 0);
    let before = snapshot(&region);
    let command = |seq, locality| Request::Command {
        seq,
        locality,
        command: TpmBytes::new(&GET_RANDOM_32).unwrap(),
        start_by: None,
    };
    let nothing = VtpmGrant::NONE;
    let locality_0 = VtpmGrant {
        commands: Localities::ZERO,
        ..VtpmGrant::NONE
    };
    for (client, grant, request, refusal) in [
        // A client of vtpm with no grant: no commands, signals or registers.
        ("test", nothing, command(2, 0), Right::Commands),
        (
            "test",
            nothing,
            Request::platform(Platform::PowerOff),
            Right::Platform,
        ),
        (
            "test",
            nothing,
            access_of(0, 1, pv_vtpm::tis::ACCESS, Some(0x08)),
            Right::Registers,
        ),
        // Commands granted at locality 0 only: 2 and 4 (the DRTM PCRs' localities) refused.
        ("test", locality_0, command(3, 2), Right::Locality(2)),
        ("test", locality_0, command(4, 4), Right::Locality(4)),
        // A name the TPM was not started for, whatever its grant says: nothing of it
        // goes into the checkpoint.
        ("stranger", TEST, command(5, 0), Right::Commands),
    ] {
        assert_eq!(
            tpm.handle(client, &grant, request.clone()),
            Response::Error(VtpmError::NotGranted(refusal)),
            "{request:?}"
        );
    }
    assert_eq!(tpm.counters.refused, 6);
    assert!(tpm.is_powered());
    assert_eq!(
        snapshot(&region),
        before,
        "a refusal changed the checkpoint"
    );
    // What is granted still works.
    assert_eq!(rc(&cmd(&mut tpm, 6, &GET_RANDOM_32)), 0);
}

#[test]
fn platform_signals_that_would_change_the_tpm_are_refused_while_a_guest_uses_it() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start_for(&disk, &region, 1);
    assert!(tpm.guest_uses_it());
    for signal in [
        Platform::PowerOff,
        Platform::Reset,
        Platform::NvOff,
        Platform::CancelOn,
        Platform::ResetEstablished { locality: 4 },
    ] {
        assert_eq!(
            tpm.handle("test", &TEST, Request::platform(signal)),
            Response::Error(VtpmError::GuestUsesTpm),
            "{signal:?}"
        );
    }
    // What leaves the TPM as it is (what tpm2-tools' mssim TCTI sends on connecting) is
    // answered.
    for signal in [
        Platform::PowerOn,
        Platform::NvOn,
        Platform::CancelOff,
        Platform::GetEstablished,
    ] {
        assert!(
            !matches!(
                tpm.handle("test", &TEST, Request::platform(signal)),
                Response::Error(_)
            ),
            "{signal:?}"
        );
    }
    assert!(tpm.is_powered());
    assert_eq!(tpm.counters.refused, 5);
}

#[test]
fn register_accesses_under_invented_vcpu_ids_are_refused_and_cannot_grow_the_checkpoint() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start_for(&disk, &region, 2);
    let guest = VtpmGrant {
        registers: 2,
        ..VtpmGrant::NONE
    };
    // The partition's own vCPUs are served.
    for vcpu in 0..2 {
        assert!(matches!(
            tpm.handle(
                "guest",
                &guest,
                access_of(vcpu, 1, pv_vtpm::tis::ACCESS, None)
            ),
            Response::Register(_)
        ));
    }
    let before = snapshot(&region);
    for (i, vcpu) in (2..20_002u32).enumerate() {
        let r = tpm.handle(
            "guest",
            &guest,
            access_of(vcpu, i as u64, pv_vtpm::tis::INT_ENABLE, Some(0)),
        );
        assert_eq!(r, Response::Error(VtpmError::NoSuchVcpu { vcpu, vcpus: 2 }));
    }
    assert_eq!(tpm.counters.refused, 20_000);
    assert_eq!(snapshot(&region), before);
    // And a restart from the region succeeds.
    drop(tpm);
    let tpm = start_for(&disk, &region, 2);
    assert!(tpm.resumed);
}

#[test]
fn a_checkpoint_with_records_of_unknown_clients_and_vcpus_resumes_with_them_dropped() {
    use pv_vtpm::state::CheckpointArea;
    use pv_vtpm::state::LastAccess;
    use pv_vtpm::state::LastCommand;
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start_for(&disk, &region, 1);
    assert_eq!(rc(&cmd(&mut tpm, 1, &STARTUP_CLEAR)), 0);
    drop(tpm);
    // What an unbounded table left behind (as the code before the grants let any client
    // write): thousands of vCPUs and clients that are not there. It still fits its slot.
    let mut area = CheckpointArea::new(region.clone());
    let mut bloated: pv_vtpm::state::Checkpoint = area.load().expect("a checkpoint");
    for vcpu in 1..6000 {
        bloated.accesses.insert(
            vcpu,
            LastAccess {
                seq: 1,
                address: pv_vtpm::tis::BASE,
                write: true,
                value: 0,
            },
        );
    }
    for n in 0..5 {
        bloated.last.insert(
            format!("gone-{n}"),
            LastCommand {
                seq: 1,
                response: vec![0; 4000],
            },
        );
    }
    area.store(&bloated).expect("fits its slot");
    let mut tpm = start_for(&disk, &region, 1);
    assert!(tpm.resumed);
    assert_eq!(rc(&cmd(&mut tpm, 2, &GET_RANDOM_32)), 0);
    let now: pv_vtpm::state::Checkpoint = CheckpointArea::new(region.clone())
        .load()
        .expect("a checkpoint");
    assert!(
        now.accesses.keys().all(|v| *v < 1),
        "{:?}",
        now.accesses.len()
    );
    assert!(now.last.keys().all(|c| !c.starts_with("gone-")));
}

#[test]
fn a_region_too_small_for_the_tables_at_their_fullest_is_refused_at_start() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(64 << 10));
    let e = try_start(&disk, &region, 1).err().expect("refused");
    assert!(
        e.contains("checkpoint region (65536 bytes)") && e.contains("vtpm-checkpoint"),
        "{e}"
    );
}

/// TPM2_StartAuthSession: an unbound, unsalted HMAC session.
fn start_auth_session() -> Vec<u8> {
    let mut c = vec![0x80, 1, 0, 0, 0, 0, 0, 0, 1, 0x76];
    c.extend_from_slice(&0x4000_0007u32.to_be_bytes()); // tpmKey: TPM_RH_NULL
    c.extend_from_slice(&0x4000_0007u32.to_be_bytes()); // bind: TPM_RH_NULL
    c.extend_from_slice(&32u16.to_be_bytes());
    c.extend_from_slice(&[7; 32]); // nonceCaller
    c.extend_from_slice(&0u16.to_be_bytes()); // encryptedSalt
    c.push(0); // TPM_SE_HMAC
    c.extend_from_slice(&0x0010u16.to_be_bytes()); // symmetric: TPM_ALG_NULL
    c.extend_from_slice(&0x000bu16.to_be_bytes()); // authHash: SHA-256
    let len = c.len() as u32;
    c[2..6].copy_from_slice(&len.to_be_bytes());
    c
}

#[test]
fn a_tpm_at_its_fullest_checkpoints_within_the_engine_reserve() {
    use pv_vtpm::server::ENGINE_STATE_RESERVE;
    use pv_vtpm::state::CheckpointArea;
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let (disk, region) = (Disk::default(), Region::new(256 << 10));
    let mut tpm = start(&disk, &region);
    assert_eq!(rc(&cmd(&mut tpm, 1, &STARTUP_CLEAR)), 0);
    let mut seq = 2;
    let mut next = || {
        seq += 1;
        seq
    };
    // Every object slot loaded (RSA-3072 primaries, the largest keys this libtpms makes),
    // every session slot taken, a PCR extended.
    let mut template = pv_vtpm::binding::ak_template();
    template.key_bits = 3072;
    template.modulus = vec![0; 384];
    let create = pv_vtpm::tpm2::create_primary(pv_vtpm::tpm2::Hierarchy::Owner, &template);
    let mut objects = 0;
    while objects < 16 {
        let r = cmd(&mut tpm, next(), &create);
        if rc(&r) != 0 {
            assert_eq!(rc(&r), 0x902, "TPM_RC_OBJECT_MEMORY");
            break;
        }
        objects += 1;
    }
    let mut sessions = 0;
    while sessions < 128 {
        let r = cmd(&mut tpm, next(), &start_auth_session());
        if rc(&r) != 0 {
            break;
        }
        sessions += 1;
    }
    assert!(
        objects >= 3 && sessions >= 3,
        "{objects} objects, {sessions} sessions"
    );
    let d: [u8; 32] = Sha256::digest(b"full").into();
    assert_eq!(rc(&cmd(&mut tpm, next(), &pcr_extend_16(&d))), 0);
    // TPM2_Shutdown(STATE): a savestate, if this libtpms keeps one apart, joins the volatile
    // state in the checkpoint.
    let shutdown_state = [0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x45, 0, 1];
    assert_eq!(rc(&cmd(&mut tpm, next(), &shutdown_state)), 0);
    let c: pv_vtpm::state::Checkpoint = CheckpointArea::new(region.clone())
        .load()
        .expect("a checkpoint");
    let engine = c.volatile.as_ref().map_or(0, Vec::len) + c.savestate.as_ref().map_or(0, Vec::len);
    eprintln!(
        "{objects} objects, {sessions} sessions: volatile {} bytes, savestate {} bytes",
        c.volatile.as_ref().map_or(0, Vec::len),
        c.savestate.as_ref().map_or(0, Vec::len)
    );
    assert!(
        engine <= ENGINE_STATE_RESERVE / 2,
        "the engine's state ({engine} bytes) leaves the reserve ({ENGINE_STATE_RESERVE}) less than half spare"
    );
}
