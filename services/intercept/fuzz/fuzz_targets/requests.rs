//! Arbitrary requests from the partition and from a device service: each must be answered
//! with a response or a typed error, never a panic, and no caller may get past its rights.
//!
//! Input: a sequence of (selector byte, postcard `intercept::Request`); the selector's low bit
//! picks the caller: the partition (`guest`, no interrupt grant) or the device service
//! `storage` (granted line 5 and MSI vector 0x40).
#![no_main]

use ipc_defs::capability::Grant;
use ipc_defs::services::guest::mask;
use ipc_defs::services::guest::Next;
use ipc_defs::services::intercept::InterceptError;
use ipc_defs::services::intercept::Interrupt;
use ipc_defs::services::intercept::InterruptSet;
use ipc_defs::services::intercept::Request;
use ipc_defs::services::intercept::Response;
use libfuzzer_sys::fuzz_target;
use pv_intercept::server::is_refusal;
use pv_intercept::server::RecordingConsole;
use pv_intercept::server::RecordingSink;
use pv_intercept::uart::COM1_IRQ;
use pv_intercept::Intercept;
use pv_intercept::PARTITION;

const DEVICE: &str = "storage";

fuzz_target!(|data: &[u8]| {
    let mut device_grant = InterruptSet::EMPTY;
    device_grant.insert(Interrupt::Line(5));
    device_grant.insert(Interrupt::Msi(0x40));
    // Line 4 (COM1) and the device's line are wired; its MSI vector is not.
    let mut sink = RecordingSink::default();
    sink.wired.insert(COM1_IRQ);
    sink.wired.insert(Interrupt::Line(5));
    let mut intercept = Intercept::new(sink, RecordingConsole::default());

    let mut rest = data;
    while let Ok(((selector, request), tail)) = postcard::take_from_bytes::<(u8, Request)>(rest) {
        rest = tail;
        let (caller, grant) = if selector & 1 == 0 {
            (PARTITION, Grant::Interface)
        } else {
            (DEVICE, Grant::Interrupts(device_grant))
        };
        let raised_before = intercept.sink().raised.len();
        let response = intercept.handle(caller, grant, request.clone());
        let raised = &intercept.sink().raised[raised_before..];
        match (&request, &response) {
            (Request::Raise(irq), Response::Raised) => {
                assert_eq!(caller, DEVICE);
                assert!(device_grant.contains(*irq));
                assert_eq!(raised, [*irq]);
            }
            (Request::Raise(irq), Response::Error(InterceptError::NotGranted(i))) => {
                assert_eq!(irq, i);
                assert!(caller == PARTITION || !device_grant.contains(*irq));
                assert!(raised.is_empty());
            }
            (Request::Raise(irq), Response::Error(InterceptError::NotDelivered(i))) => {
                assert_eq!(irq, i);
                assert!(device_grant.contains(*irq));
                assert!(raised.is_empty());
            }
            (Request::Raise(_), other) => panic!("raise answered {other:?}"),
            (_, Response::Error(InterceptError::NotThePartition)) => {
                assert_eq!(caller, DEVICE);
                assert!(raised.is_empty());
            }
            (_, _) if caller == DEVICE => panic!("a device's exit was answered: {response:?}"),
            (Request::Io(access), Response::Io(reply)) => {
                assert!(access.size_is_valid());
                if access.write.is_none() {
                    assert!(reply.value <= mask(access.size));
                    assert_eq!(reply.next, Next::Resume);
                }
                // The partition's accesses raise nothing but COM1's line.
                assert!(raised.iter().all(|i| *i == COM1_IRQ));
            }
            (Request::Io(access), Response::Error(InterceptError::BadAccess { size })) => {
                assert_eq!(access.size, *size);
                assert!(!access.size_is_valid());
            }
            (Request::Msr { .. }, Response::Msr(_))
            | (Request::Hypercall { .. }, Response::Hypercall(_))
            | (Request::Event { .. }, Response::Next(Next::Exit(_))) => assert!(raised.is_empty()),
            (request, response) => panic!("{request:?} answered {response:?}"),
        }
        assert_eq!(
            is_refusal(&response),
            matches!(
                response,
                Response::Error(InterceptError::NotGranted(_) | InterceptError::NotThePartition)
            )
        );
    }
    let c = intercept.counters;
    assert_eq!(c.uart_bytes as usize, intercept.console().output.len());
    assert_eq!(
        (c.uart_interrupts + c.interrupts_raised) as usize,
        intercept.sink().raised.len()
    );
});
