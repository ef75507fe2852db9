//! `pv-storage` as it runs (sandboxed, under its seccomp profile, started by the microkernel)
//! against vhost-user front ends that misbehave on the socket: one that stops half-way
//! through a message and keeps the connection open, one whose header announces an absurd
//! body, one that floods requests and never reads the replies. Each is dropped with a log
//! line saying why, while the other disk's front end is answered throughout, and the next
//! front end on the same socket is served.

mod common;

use std::io::ErrorKind;
use std::io::Read;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;
use std::time::Instant;

/// The listeners the shipped manifest's storage service serves, asked for.
const LISTEN: &[&str] = &["--listen", "vhost-user-blk", "--listen", "vhost-user-scsi"];
/// Far longer than any step takes on a loaded machine: reached only when the service hangs.
const HANG: Duration = Duration::from_secs(120);
/// vhost-user requests (the protocol's numbers).
const GET_FEATURES: u32 = 1;
const SET_MEM_TABLE: u32 = 5;
/// The reply flag of a vhost-user header, with version 1.
const REPLY: u32 = 0x4 | 0x1;

/// A vhost-user header: request, flags, body size (u32 little-endian each).
fn words(request: u32, flags: u32, size: u32) -> Vec<u8> {
    [request, flags, size]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// A request's header: version 1, `size` bytes of body to follow.
fn header(request: u32, size: u32) -> Vec<u8> {
    words(request, 1, size)
}

fn connect(inst: &common::Instance, listener: &str) -> UnixStream {
    let s = UnixStream::connect(inst.dir.join(format!("state/storage/{listener}.sock")))
        .unwrap_or_else(|e| panic!("{listener}: {e}\n{}", inst.log()));
    s.set_read_timeout(Some(HANG)).unwrap();
    s.set_write_timeout(Some(HANG)).unwrap();
    s
}

/// Asks for the device's features and checks that the service answers.
fn answered(inst: &common::Instance, s: &mut UnixStream) {
    s.write_all(&header(GET_FEATURES, 0)).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply)
        .unwrap_or_else(|e| panic!("no answer: {e}\n{}", inst.log()));
    assert_eq!(
        reply[..12],
        words(GET_FEATURES, REPLY, 8)[..],
        "a features reply"
    );
}

/// Waits until the service has closed its end of `s` (reading what it sent before).
fn hung_up(inst: &common::Instance, s: &mut UnixStream) {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return,
            Err(e) => panic!("still connected: {e}\n{}", inst.log()),
        }
    }
}

/// Waits until the log holds `text`.
fn logged(inst: &common::Instance, text: &str) {
    let start = Instant::now();
    while !inst.log().contains(text) {
        assert!(
            start.elapsed() < HANG,
            "never logged \"{text}\":\n{}",
            inst.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn storage_drops_a_front_end_that_stalls_its_socket_and_keeps_serving_the_others() {
    let test = "storage_drops_a_front_end_that_stalls_its_socket_and_keeps_serving_the_others";
    if !common::sandbox_available(test) {
        return;
    }
    let inst =
        common::Instance::start_with("storage-front-ends", &common::shipped_text(), 7, LISTEN);
    let mut scsi = connect(&inst, "vhost-user-scsi");
    answered(&inst, &mut scsi);

    // Half a header, and the connection held open.
    let mut hostile = connect(&inst, "vhost-user-blk");
    hostile.write_all(&header(GET_FEATURES, 0)[..6]).unwrap();
    answered(&inst, &mut scsi);
    hung_up(&inst, &mut hostile);
    logged(&inst, "only 6 of a message header's 12 bytes came, for 1s");

    // A header announcing 64 KiB of body: dropped before any of it is read.
    let mut hostile = connect(&inst, "vhost-user-blk");
    hostile.write_all(&header(SET_MEM_TABLE, 64 << 10)).unwrap();
    hung_up(&inst, &mut hostile);
    logged(&inst, "its header announces a body of 65536 bytes");
    answered(&inst, &mut scsi);

    // Far more requests than a socket can hold replies for, none of them read.
    let mut hostile = connect(&inst, "vhost-user-blk");
    let writer = {
        let mut hostile = hostile.try_clone().unwrap();
        let flood: Vec<u8> = (0..20_000).flat_map(|_| header(GET_FEATURES, 0)).collect();
        // It may block until the service drops the front end, then fail: either is fine.
        std::thread::spawn(move || {
            let _ = hostile.write_all(&flood);
        })
    };
    answered(&inst, &mut scsi);
    logged(&inst, "does not read our replies");
    hung_up(&inst, &mut hostile);
    writer.join().unwrap();

    // The disk serves the next front end; the other one never stopped.
    let mut blk = connect(&inst, "vhost-user-blk");
    answered(&inst, &mut blk);
    answered(&inst, &mut scsi);
    assert_eq!(inst.row("storage")["restarts"], 0, "{}", inst.log());
}
