//! `pv-hostile fd-store-abuse LISTENER`: a compromised holder of a descriptor store. It
//! accepts one connection on its listener, keeps it (the one honest packet), then sends its
//! store everything a well-behaved service never would: its listener, its status page (a
//! memfd), /dev/null, the store's own socket, a keep with no descriptor, with three, with
//! more than fit, a forget with one, forgets of ids never kept, garbage, an oversized packet,
//! and the connection again under 1000 more ids (more than its bound). Then it serves, so
//! that the test can see the supervisor healthy.
//!
//! Started again with descriptors its store kept, it logs what it got back
//! ("fd-store-abuse: got back N: ...") and serves.
//!
//! `pv-hostile fd-store-unsent`: a service the manifest gives no store sends on the slot a
//! store would have: its filter kills it (`sendmsg`).

use std::os::fd::AsFd;
use std::os::fd::BorrowedFd;
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::time::Duration;
use std::time::Instant;

use ipc_defs::fd_store::KeptRecord;
use ipc_defs::fd_store::StoreMessage;
use ipc_defs::fd_store::MAX_MESSAGE;
use ipc_defs::hosted::runtime;
use ipc_defs::hosted::sys;

/// Sends one raw packet, waiting out a full queue (the supervisor takes a bounded number
/// per turn) or the kernel's bound on descriptors in flight; whether it went.
fn send(store: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> bool {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        match sys::send_with_fds(&store, bytes, fds) {
            Ok(()) => return true,
            Err(e) if Instant::now() < until => {
                if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ETOOMANYREFS)) {
                    eprintln!("pv-hostile: store send: {e}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                eprintln!("pv-hostile: store send gave up: {e}");
                return false;
            }
        }
    }
}

fn keep(id: u32) -> Vec<u8> {
    let mut buf = [0u8; MAX_MESSAGE];
    StoreMessage::Keep(KeptRecord::new(id, "connection", b"probe").expect("a record"))
        .encode(&mut buf)
        .expect("fits")
        .to_vec()
}

fn forget(id: u32) -> Vec<u8> {
    let mut buf = [0u8; MAX_MESSAGE];
    StoreMessage::Forget { id }
        .encode(&mut buf)
        .expect("fits")
        .to_vec()
}

pub fn abuse(started: &mut runtime::Started, args: &[String]) -> ExitCode {
    started.answer_first_ping();
    if !started.context.kept.is_empty() {
        let kept: Vec<String> = started
            .context
            .kept
            .iter()
            .map(|(r, fd)| {
                let socket = std::fs::File::from(fd.try_clone().expect("dup"))
                    .metadata()
                    .map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                    .unwrap_or(false);
                format!("{} {} socket={socket}", r.id, r.name)
            })
            .collect();
        eprintln!(
            "pv-hostile: fd-store-abuse: got back {}: {}",
            kept.len(),
            kept.join(", ")
        );
        return serve(started);
    }
    let Some(store) = started.context.fd_store.take() else {
        eprintln!("pv-hostile: fd-store-abuse: no fd store");
        return ExitCode::from(30);
    };
    let name = args.get(1).map(String::as_str).unwrap_or("probe");
    let Some(listener) = started.context.listeners.remove(name) else {
        eprintln!("pv-hostile: fd-store-abuse: no listener {name}");
        return ExitCode::from(31);
    };
    let listener = UnixListener::from(listener);
    eprintln!("pv-hostile: fd-store-abuse: waiting for a connection");
    let connection = loop {
        if !started.answer_control() {
            return ExitCode::SUCCESS;
        }
        let ready = sys::poll_readable(&[listener.as_fd()], Duration::from_millis(20));
        if ready.is_ok_and(|r| r[0]) {
            if let Ok((c, _)) = listener.accept() {
                break c;
            }
        }
    };
    let s = store.socket();
    let conn = connection.as_fd();
    // The one honest packet.
    let mut sent = usize::from(send(s, &keep(1), &[conn]));
    // Its listener, /dev/null, its status page (slot 4), the store itself.
    let null = slot(0);
    let page = slot(4);
    for fd in [listener.as_fd(), null, page, s] {
        sent += usize::from(send(s, &keep(2), &[fd]));
    }
    // Wrong descriptor counts, too many descriptors, a forget with one.
    sent += usize::from(send(s, &keep(3), &[]));
    sent += usize::from(send(s, &keep(3), &[conn, conn, conn]));
    sent += usize::from(send(s, &keep(3), &[conn; sys::MAX_SENT_FDS]));
    sent += usize::from(send(s, &forget(1), &[conn]));
    // Ids never kept, garbage, a packet longer than any message.
    for id in [7, 8, u32::MAX] {
        sent += usize::from(send(s, &forget(id), &[]));
    }
    sent += usize::from(send(s, &[0xff; 9], &[conn]));
    sent += usize::from(send(s, &[0u8; 4000], &[]));
    // The connection under 1000 more ids: the bound keeps a few, the rest are refused.
    for id in 100..1100 {
        sent += usize::from(send(s, &keep(id), &[conn]));
    }
    eprintln!("pv-hostile: fd-store-abuse: sent {sent} packets");
    serve(started)
}

/// Descriptor `fd` of this process, borrowed for a send (0: /dev/null, 4: its status page).
fn slot(fd: i32) -> BorrowedFd<'static> {
    // Leaked on purpose: the process holds these for its whole life.
    let owned = sys::take_fd(fd).expect("the descriptor is open");
    let leaked: &'static std::os::fd::OwnedFd = Box::leak(Box::new(owned));
    leaked.as_fd()
}

fn serve(started: &mut runtime::Started) -> ExitCode {
    loop {
        if !started.answer_control() {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Without a store: `sendmsg` on the descriptor after its capabilities, where a store's
/// socket would be. Its filter kills it.
pub fn unsent(started: &mut runtime::Started) -> ExitCode {
    started.answer_first_ping();
    let r = sys::send_with_fd(&slot(4), &forget(1), None);
    eprintln!("pv-hostile: sendmsg without a store returned {r:?} (should have been killed)");
    ExitCode::from(32)
}
