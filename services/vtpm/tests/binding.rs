//! The attestation binding in-process, on the real engine (libtpms) with in-memory state and
//! a fake platform: keys created once and kept, evidence exactly as written, the claims'
//! hash in the report, and the cases where the binding must stand aside.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use base64::Engine as _;
use ipc_defs::services::attest::REPORT_DATA_LEN;
use ipc_defs::services::attest::REPORT_LEN;
use ipc_defs::services::vtpm::Localities;
use ipc_defs::services::vtpm::Platform;
use ipc_defs::services::vtpm::Request;
use ipc_defs::services::vtpm::Response;
use ipc_defs::services::vtpm::TpmBytes;
use ipc_defs::services::vtpm::VtpmGrant;
use pv_vtpm::binding;
use pv_vtpm::binding::Attester;
use pv_vtpm::binding::BindError;
use pv_vtpm::binding::Bound;
use pv_vtpm::libtpms::Engine;
use pv_vtpm::server::Clients;
use pv_vtpm::server::Tpm;
use pv_vtpm::state::MemPermanent;
use pv_vtpm::state::MemRegion;
use pv_vtpm::state::SharedNv;
use pv_vtpm::tpm2;
use pv_vtpm::tpm2::Hierarchy;
use pv_vtpm::tpm2::NvIndex;
use pv_vtpm::tpm2::Public;
use pv_vtpm::tpm2::RsaPublic;
use sha2::Digest;
use sha2::Sha256;

/// libtpms is one TPM per process: tests take it in turn.
static ENGINE: Mutex<()> = Mutex::new(());

type Disk = MemPermanent;
type Region = MemRegion;

/// A launch: the permanent state (VMGS) outlives it, the checkpoint region does not.
fn region() -> Region {
    Region::new(256 << 10)
}

fn start(disk: &Disk, region: &Region) -> Tpm<Disk, Region> {
    let nv = SharedNv::default();
    let engine = Engine::take(Box::new(nv.clone()))
        .expect("free")
        .expect("TPM 2.0");
    let clients = Clients {
        commands: vec!["client".into()],
        vcpus: 0,
    };
    Tpm::start(engine, nv, disk.clone(), region.clone(), clients).expect("start")
}

/// The client's grant: commands at every locality, platform signals.
const CLIENT: VtpmGrant = VtpmGrant {
    commands: Localities::ALL,
    platform: true,
    registers: 0,
};

/// A fresh launch started as the shipped manifest starts it (`--startup-clear`).
fn start_cleared(disk: &Disk, region: &Region) -> Tpm<Disk, Region> {
    let mut tpm = start(disk, region);
    assert!(!tpm.continued());
    tpm.startup_clear().expect("TPM2_Startup");
    tpm
}

/// The platform's stand-in: reports that carry the report data at 0x50 and, elsewhere, the
/// number of the call (so that a refreshed report differs from the last).
#[derive(Default)]
struct FakePlatform {
    asked: Vec<[u8; REPORT_DATA_LEN]>,
    unreachable: bool,
    pings: u32,
}

impl Attester for FakePlatform {
    fn report(&mut self, report_data: &[u8; REPORT_DATA_LEN]) -> Result<Vec<u8>, String> {
        if self.unreachable {
            return Err("the attest service did not answer: no reply within 3s".into());
        }
        self.asked.push(*report_data);
        let mut report = vec![self.asked.len() as u8; REPORT_LEN];
        report[0x50..0x90].copy_from_slice(report_data);
        Ok(report)
    }

    fn keep_alive(&mut self) {
        self.pings += 1;
    }
}

static SEQ: AtomicU64 = AtomicU64::new(1);

/// A command from a client of the TPM (as the gateway sends a tool's).
fn guest(tpm: &mut Tpm<Disk, Region>, command: &[u8]) -> Vec<u8> {
    match tpm.handle(
        "client",
        &CLIENT,
        Request::Command {
            seq: SEQ.fetch_add(1, Ordering::Relaxed),
            locality: 0,
            command: TpmBytes::new(command).expect("fits"),
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

fn read_key(tpm: &mut Tpm<Disk, Region>, handle: tpm2::Persistent) -> Option<RsaPublic> {
    match tpm2::parse_read_public(&guest(tpm, &tpm2::read_public(handle))) {
        Ok(Public::Rsa(k)) => Some(k),
        Ok(other) => panic!("{other:?}"),
        Err(_) => None,
    }
}

/// An index's whole contents as a guest reads them (`tpm2_nvread`), or `None` if the index
/// does not exist.
fn nv_read_all(tpm: &mut Tpm<Disk, Region>, index: NvIndex) -> Option<Vec<u8>> {
    let public = tpm2::parse_nv_read_public(&guest(tpm, &tpm2::nv_read_public(index))).ok()?;
    let mut out = Vec::new();
    while out.len() < usize::from(public.size) {
        let n = (usize::from(public.size) - out.len()).min(1024) as u16;
        let r = guest(tpm, &tpm2::nv_read(index, n, out.len() as u16));
        out.extend(tpm2::parse_nv_read(&r).expect("NV_Read"));
    }
    Some(out)
}

fn modulus_in_claims(claims: &[u8], kid: &str) -> Vec<u8> {
    let json: serde_json::Value = serde_json::from_slice(claims).expect("claims are JSON");
    let key = json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == kid)
        .unwrap_or_else(|| panic!("no {kid}"));
    assert_eq!(key["kty"], "RSA");
    assert_eq!(key["e"], "AQAB");
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(key["n"].as_str().unwrap())
        .unwrap()
}

/// Checks what a guest can read against what the binding says it wrote.
fn assert_evidence(tpm: &mut Tpm<Disk, Region>, bound: &Bound) {
    let report = nv_read_all(tpm, binding::REPORT_INDEX).expect("report index");
    let claims = nv_read_all(tpm, binding::CLAIMS_INDEX).expect("claims index");
    assert_eq!(report.len(), REPORT_LEN, "exactly the report, no padding");
    assert_eq!(report, bound.report);
    assert_eq!(claims, bound.claims);
    let hash: [u8; 32] = Sha256::digest(&claims).into();
    assert_eq!(hash, bound.claims_sha256);
    assert_eq!(&report[0x50..0x70], &hash, "the report is over the claims");
    assert_eq!(&report[0x70..0x90], &[0u8; 32], "zero-padded to 64 bytes");
    let ak = read_key(tpm, binding::AK_HANDLE).expect("AK");
    assert!(
        read_key(tpm, binding::EK_HANDLE).is_none(),
        "the EK's usual handle stays free"
    );
    let r = guest(
        tpm,
        &tpm2::create_primary(Hierarchy::Endorsement, &binding::ek_template()),
    );
    let (handle, public) = tpm2::parse_create_primary(&r).expect("EK derived");
    assert_eq!(rc(&guest(tpm, &tpm2::flush_context(handle))), 0);
    let Public::Rsa(ek) = public else {
        panic!("an RSA EK")
    };
    assert!(ak.made_from(&binding::ak_template()));
    assert!(ek.made_from(&binding::ek_template()));
    assert_eq!(modulus_in_claims(&claims, "HCLAkPub"), ak.modulus);
    assert_eq!(modulus_in_claims(&claims, "HCLEkPub"), ek.modulus);
}

#[test]
fn keys_are_created_once_and_every_launch_writes_a_fresh_report_over_the_same_claims() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let disk = Disk::default();
    let mut platform = FakePlatform::default();

    let launch1 = region();
    let mut tpm = start_cleared(&disk, &launch1);
    assert!(!binding::in_place(&mut tpm), "nothing bound yet");
    let first = binding::bind(&mut tpm, &mut platform).expect("bound");
    assert!(binding::in_place(&mut tpm));
    assert_eq!(first.created, [binding::AK_HANDLE]);
    assert_eq!(platform.asked.len(), 1);
    assert!(
        platform.pings >= 3,
        "the supervisor is answered between steps"
    );
    assert_evidence(&mut tpm, &first);
    let writes_before = tpm.counters.permanent_writes;

    // The service restarts within the launch (resumed): the keys are there, the evidence
    // is written again.
    drop(tpm);
    let mut tpm = start(&disk, &launch1);
    assert!(tpm.resumed);
    assert!(
        binding::in_place(&mut tpm),
        "a restart finds this launch's binding"
    );
    let again = binding::bind(&mut tpm, &mut platform).expect("bound");
    assert!(again.created.is_empty(), "no second AK");
    assert_eq!(again.claims, first.claims);
    assert_ne!(again.report, first.report, "a new report");
    assert_evidence(&mut tpm, &again);
    let refresh_writes = tpm.counters.permanent_writes;
    eprintln!("a refresh stored the permanent state {refresh_writes} times (first start: {writes_before})");

    // A new launch (fresh checkpoint region, same VMGS): same keys, same claims, new report.
    drop(tpm);
    let mut tpm = start_cleared(&disk, &region());
    let next = binding::bind(&mut tpm, &mut platform).expect("bound");
    assert!(next.created.is_empty());
    assert_eq!((next.ak.clone(), next.ek.clone()), (first.ak, first.ek));
    assert_eq!(next.claims, first.claims);
    assert_evidence(&mut tpm, &next);
    assert_eq!(platform.asked.len(), 3);
    assert!(platform
        .asked
        .iter()
        .all(|d| d[..32] == first.claims_sha256));

    // The persistent handles hold exactly one key: the AK (the EK is derived, not kept).
    let handles = guest(
        &mut tpm,
        &[
            0x80, 1, 0, 0, 0, 22, 0, 0, 1, 0x7A, 0, 0, 0, 1, 0x81, 0, 0, 0, 0, 0, 0, 32,
        ],
    );
    assert_eq!(rc(&handles), 0);
    let count = u32::from_be_bytes(handles[15..19].try_into().unwrap());
    assert_eq!(count, 1, "{handles:02x?}");
}

#[test]
fn without_a_report_the_tpm_serves_unbound_and_a_new_launch_shows_no_old_report() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let disk = Disk::default();
    let launch1 = region();
    let mut tpm = start_cleared(&disk, &launch1);
    let bound = binding::bind(&mut tpm, &mut FakePlatform::default()).expect("bound");

    // Resumed within the launch, attest unreachable: this launch's evidence stays.
    drop(tpm);
    let mut tpm = start(&disk, &launch1);
    let mut down = FakePlatform {
        unreachable: true,
        ..FakePlatform::default()
    };
    let e = binding::bind(&mut tpm, &mut down).unwrap_err();
    assert!(matches!(e, BindError::Report(_)), "{e}");
    assert!(e.to_string().contains("did not answer"), "{e}");
    assert_evidence(&mut tpm, &bound);

    // A new launch, attest unreachable: the keys are there, the last launch's report is not.
    drop(tpm);
    let mut tpm = start_cleared(&disk, &region());
    let mut down = FakePlatform {
        unreachable: true,
        ..FakePlatform::default()
    };
    assert!(matches!(
        binding::bind(&mut tpm, &mut down),
        Err(BindError::Report(_))
    ));
    assert_eq!(nv_read_all(&mut tpm, binding::REPORT_INDEX), None);
    assert_eq!(nv_read_all(&mut tpm, binding::CLAIMS_INDEX), None);
    assert!(read_key(&mut tpm, binding::AK_HANDLE).is_some());
    // The TPM serves on.
    let r = guest(&mut tpm, &[0x80, 1, 0, 0, 0, 12, 0, 0, 1, 0x7b, 0, 8]);
    assert_eq!((rc(&r), r.len()), (0, 20));
    assert!(tpm.fatal.is_none());
}

#[test]
fn a_guest_that_disabled_the_platform_hierarchy_keeps_the_evidence_it_has() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let disk = Disk::default();
    let launch = region();
    let mut tpm = start_cleared(&disk, &launch);
    let bound = binding::bind(&mut tpm, &mut FakePlatform::default()).expect("bound");
    // What a guest's firmware does at the end of its boot:
    // TPM2_HierarchyControl(TPM_RH_PLATFORM, enable = TPM_RH_PLATFORM, state = NO).
    let hierarchy_control = [
        0x80, 2, 0, 0, 0, 32, 0, 0, 1, 0x21, 0x40, 0, 0, 0x0C, 0, 0, 0, 9, 0x40, 0, 0, 9, 0, 0, 0,
        0, 0, 0x40, 0, 0, 0x0C, 0,
    ];
    assert_eq!(rc(&guest(&mut tpm, &hierarchy_control)), 0);
    drop(tpm);
    let mut tpm = start(&disk, &launch);
    let mut platform = FakePlatform::default();
    let e = binding::bind(&mut tpm, &mut platform).unwrap_err();
    assert!(matches!(e, BindError::PlatformDisabled), "{e}");
    assert!(platform.asked.is_empty(), "no report asked for in vain");
    assert_evidence(&mut tpm, &bound);
}

#[test]
fn a_tpm_waiting_for_its_firmware_is_bound_and_left_waiting() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let disk = Disk::default();
    let mut tpm = start(&disk, &region());
    let bound = binding::bind(&mut tpm, &mut FakePlatform::default()).expect("bound");
    assert_eq!(bound.created.len(), 1);
    // Still waiting for TPM2_Startup, as the firmware expects.
    let r = guest(&mut tpm, &tpm2::read_public(binding::AK_HANDLE));
    assert_eq!(rc(&r), 0x100, "TPM_RC_INITIALIZE");
    assert_eq!(rc(&guest(&mut tpm, &tpm2::startup_clear())), 0);
    assert_evidence(&mut tpm, &bound);

    // One that resumed waiting is left alone (its firmware may resume a saved state).
    let launch = region();
    drop(tpm);
    drop(start(&disk, &launch));
    let mut tpm = start(&disk, &launch);
    assert!(tpm.resumed);
    let e = binding::bind(&mut tpm, &mut FakePlatform::default()).unwrap_err();
    assert!(matches!(e, BindError::NotStarted), "{e}");
    // And a TPM the platform powered off is not touched.
    tpm.handle("client", &CLIENT, Request::platform(Platform::PowerOff));
    let e = binding::bind(&mut tpm, &mut FakePlatform::default()).unwrap_err();
    assert!(matches!(e, BindError::PoweredOff), "{e}");
}

#[test]
fn a_foreign_key_at_the_ak_handle_is_replaced_by_the_paravisors_ak() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let disk = Disk::default();
    let mut tpm = start_cleared(&disk, &region());
    // A guest persists a key of its own, one that is not restricted, at the AK's handle.
    let mut foreign = binding::ak_template();
    foreign.attributes.0 &= !tpm2::ObjectAttributes::RESTRICTED;
    let r = guest(&mut tpm, &tpm2::create_primary(Hierarchy::Owner, &foreign));
    let (handle, _) = tpm2::parse_create_primary(&r).expect("created");
    let r = guest(&mut tpm, &tpm2::evict_control(handle.0, binding::AK_HANDLE));
    assert_eq!(rc(&r), 0);
    assert_eq!(rc(&guest(&mut tpm, &tpm2::flush_context(handle))), 0);
    assert!(!read_key(&mut tpm, binding::AK_HANDLE)
        .unwrap()
        .made_from(&binding::ak_template()));

    let bound = binding::bind(&mut tpm, &mut FakePlatform::default()).expect("bound");
    assert!(bound.created.contains(&binding::AK_HANDLE));
    assert_evidence(&mut tpm, &bound);
}

#[test]
fn the_ek_is_the_standard_one_that_tools_derive() {
    let _one = ENGINE.lock().unwrap_or_else(|p| p.into_inner());
    let disk = Disk::default();
    let mut tpm = start_cleared(&disk, &region());
    let bound = binding::bind(&mut tpm, &mut FakePlatform::default()).expect("bound");
    // The EK template, created again by a client (as `tpm2_createek -G rsa` does), gives
    // the very key in the claims: the verifier's EK certificate matches it.
    let r = guest(
        &mut tpm,
        &tpm2::create_primary(Hierarchy::Endorsement, &binding::ek_template()),
    );
    let (handle, public) = tpm2::parse_create_primary(&r).expect("created");
    assert_eq!(public, Public::Rsa(bound.ek.clone()));
    assert_eq!(rc(&guest(&mut tpm, &tpm2::flush_context(handle))), 0);
}
