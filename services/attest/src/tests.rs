use super::*;

/// A platform double: a "report" is the report data and the measurement in place, a derived
/// key a hash of the secret, the selected facts and the context (what the real one mixes).
struct Fake {
    secret: u8,
    measurement: [u8; 48],
}

impl PlatformPort for Fake {
    fn call(&mut self, request: &platform::Request) -> Result<platform::Response, String> {
        Ok(match request {
            platform::Request::Report { report_data, vmpl } => {
                let mut r = [0u8; platform::REPORT_LEN];
                r[0x30] = *vmpl;
                r[0x50..0x90].copy_from_slice(report_data.as_slice());
                r[0x90..0xC0].copy_from_slice(&self.measurement);
                platform::Response::Report(Bytes::new(&r).unwrap())
            }
            platform::Request::DerivedKey { select, context } => {
                let mut h = Sha256::new()
                    .chain_update([self.secret, select.bits()])
                    .chain_update(context.as_slice());
                if select.measurement {
                    h.update(self.measurement);
                }
                platform::Response::Key(Bytes::new(&h.finalize()).unwrap())
            }
        })
    }
}

fn fake(measurement: u8) -> Fake {
    Fake {
        secret: 1,
        measurement: [measurement; 48],
    }
}

const MEASUREMENT: FieldSelect = FieldSelect {
    policy: true,
    measurement: true,
    guest_svn: false,
    tcb: true,
};
#[test]
fn derived_keys_are_bound_to_the_caller() {
    let mut a = Attest::new(None, None);
    let mut get = |caller: &str, ctx: &[u8]| match a.handle(
        &mut fake(1),
        caller,
        Request::GetDerivedKey {
            select: MEASUREMENT,
            context: Bytes::new(ctx).unwrap(),
        },
    ) {
        Response::Key(k) => k,
        other => panic!("{other:?}"),
    };
    let vtpm = get("vtpm", b"x");
    assert_eq!(vtpm, get("vtpm", b"x"), "stable");
    assert_ne!(vtpm, get("net", b"x"), "another caller, another key");
    assert_ne!(vtpm, get("vtpm", b"y"), "another context, another key");
}

#[test]
fn runtime_registers_extend_and_log_the_caller() {
    let mut a = Attest::new(None, None);
    let extend = |a: &mut Attest, index: u8, digest: &[u8]| {
        a.handle(
            &mut fake(1),
            "vtpm",
            Request::ExtendRuntime {
                index,
                digest: Bytes::new(digest).unwrap(),
                event: Bytes::new(b"boot").unwrap(),
            },
        )
    };
    let expected: [u8; 48] = Sha384::new()
        .chain_update([0u8; 48])
        .chain_update([3u8; 48])
        .finalize()
        .into();
    assert_eq!(
        extend(&mut a, 1, &[3; 48]),
        Response::Extended(Bytes::new(&expected).unwrap())
    );
    assert_eq!(
        extend(&mut a, RUNTIME_REGISTERS, &[3; 48]),
        Response::Error(AttestError::BadRegister(RUNTIME_REGISTERS))
    );
    assert_eq!(
        extend(&mut a, 0, &[3; 32]),
        Response::Error(AttestError::BadDigest)
    );
    let log: serde_json::Value = serde_json::from_slice(&a.runtime_log()).unwrap();
    assert_eq!(log["events"][0]["client"], "vtpm");
    assert_eq!(log["registers"][1], hex(&expected));
}

#[test]
fn chains_and_logs_come_in_chunks() {
    let chain: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
    let mut a = Attest::new(Some(chain.clone()), None);
    let mut got = Vec::new();
    let report_data = Bytes::new(&[9; 64]).unwrap();
    match a.handle(
        &mut fake(1),
        "x",
        Request::GetExtendedReport {
            report_data,
            vmpl: 0,
        },
    ) {
        Response::ExtendedReport {
            report,
            chain_len,
            chain: first,
        } => {
            assert_eq!(&report.as_slice()[0x50..0x90], &[9; 64]);
            assert_eq!(chain_len as usize, chain.len());
            got.extend_from_slice(first.as_slice());
        }
        other => panic!("{other:?}"),
    }
    while got.len() < chain.len() {
        match a.handle(
            &mut fake(1),
            "x",
            Request::GetCertChain {
                offset: got.len() as u32,
            },
        ) {
            Response::Chunk { data, .. } => got.extend_from_slice(data.as_slice()),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(got, chain);
    assert_eq!(
        a.handle(&mut fake(1), "x", Request::GetCertChain { offset: 40_001 }),
        Response::Error(AttestError::BadOffset)
    );
    assert_eq!(
        a.handle(&mut fake(1), "x", Request::GetLaunchLog { offset: 0 }),
        Response::Error(AttestError::Unavailable)
    );
}

/// VMPL 0 is the paravisor's own evidence (what a key broker releases secrets to): the
/// microkernel makes it in-process; through this service no client gets it, the microkernel's
/// own channel included.
#[test]
fn no_client_of_attest_gets_a_vmpl_0_report() {
    let mut a = Attest::new(None, None);
    let mut vmpl = |caller: &str, asked: u8| match a.handle(
        &mut fake(1),
        caller,
        Request::GetReport {
            report_data: Bytes::new(&[1; 64]).unwrap(),
            vmpl: asked,
        },
    ) {
        Response::Report(r) => r.as_slice()[0x30],
        other => panic!("{other:?}"),
    };
    let service = ipc_defs::services::attest::SERVICE_VMPL;
    assert_eq!(
        vmpl(ipc_defs::services::attest::PARAVISOR_CLIENT, 0),
        service
    );
    assert_eq!(vmpl(ipc_defs::services::attest::PARAVISOR_CLIENT, 3), 3);
    assert_eq!(vmpl("vtpm", 0), service);
    assert_eq!(vmpl("vtpm", 2), 2);
}
