//! Arbitrary bytes from a network client of each TPM protocol, in arbitrary pieces: the
//! parser yields steps or asks to close, never panics, never holds more than one command.
//! Read as the gateway reads (MSG_PEEK: what is queued, parsed without taking it), a request
//! takes no more than was queued, and the bytes it takes (what the journal keeps, and a
//! restarted gateway parses again) are the same request.
#![no_main]

use ipc_defs::services::vtpm::Localities;
use libfuzzer_sys::fuzz_target;
use pv_vtpm::gateway::Connection;
use pv_vtpm::gateway::Protocol;
use pv_vtpm::gateway::Step;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let protocol = match selector % 4 {
        0 => Protocol::MssimCommand,
        1 => Protocol::MssimPlatform,
        2 => Protocol::SwtpmData,
        _ => Protocol::SwtpmControl,
    };
    // Locality 0 only (the default), or every locality.
    let granted = if selector & 0x80 != 0 {
        Localities::ALL
    } else {
        Localities::ZERO
    };
    let mut peeker = Connection::granted(protocol, granted);
    if let Some((step, taken)) = peeker.parse_queued(rest) {
        assert!(taken <= rest.len());
        if taken > 0 {
            let mut again = Connection::granted(protocol, granted);
            assert_eq!(again.parse_queued(&rest[..taken]), Some((step, taken)));
        }
    }
    let mut conn = Connection::granted(protocol, granted);
    // Pieces of varying size, as reads would deliver them.
    let mut at = 0;
    let mut piece = 1 + (selector as usize >> 2);
    while at < rest.len() {
        let end = (at + piece).min(rest.len());
        if !conn.feed(&rest[at..end]) {
            return;
        }
        at = end;
        piece = piece * 3 % 97 + 1;
        for _ in 0..16 {
            match conn.next_step() {
                None => break,
                Some(Step::Close) | Some(Step::ReplyAndClose(_)) => return,
                Some(Step::Command { locality, command }) => {
                    assert!(command.len() <= 4096);
                    let _ = conn.tpm_reply(&command);
                    let _ = locality;
                }
                Some(Step::Signal(_)) => {
                    let _ = conn.signal_reply(true, false);
                }
                Some(Step::Reply(_)) | Some(Step::TakeDataFd(_)) | Some(Step::Refused { .. }) => {}
            }
        }
    }
});
