//! What a compromised service sends its descriptor store, as the supervisor takes it: any
//! sequence of packets (bytes, whether the kernel cut them or dropped descriptors, how many
//! descriptors came and whether the store keeps each) never panics, never keeps more than
//! the bound or two records under one id, and never loses a descriptor: each one sent is
//! either kept or handed back to be closed. A message that decodes encodes back to itself.
#![no_main]

use std::cell::Cell;
use std::rc::Rc;

use ipc_defs::fd_store::StoreMessage;
use ipc_defs::fd_store::MAX_MESSAGE;
use libfuzzer_sys::fuzz_target;
use microkernel::fd_store::Applied;
use microkernel::fd_store::KeptTable;

/// A stand-in descriptor that counts its closes.
struct Fd {
    keepable: bool,
    closed: Rc<Cell<usize>>,
}

impl Drop for Fd {
    fn drop(&mut self) {
        self.closed.set(self.closed.get() + 1);
    }
}

fuzz_target!(|data: &[u8]| {
    let closed = Rc::new(Cell::new(0usize));
    let mut sent = 0usize;
    let max = 1 + data.first().copied().unwrap_or(0) as usize % 8;
    let mut table = KeptTable::<Fd>::new(max);
    let mut rest = data.get(1..).unwrap_or(&[]);
    // Each packet: [length][flags][descriptors] then `length` bytes.
    while rest.len() >= 3 {
        let (head, tail) = rest.split_at(3);
        let len = (head[0] as usize).min(tail.len());
        let (bytes, tail) = tail.split_at(len);
        rest = tail;
        let flags = head[1];
        let fds: Vec<Fd> = (0..head[2] % 5)
            .map(|i| Fd {
                keepable: (head[2] >> (3 + i)) & 1 == 0,
                closed: closed.clone(),
            })
            .collect();
        sent += fds.len();
        if let Ok(m) = StoreMessage::decode(bytes) {
            let mut buf = [0u8; MAX_MESSAGE];
            let again = m.encode(&mut buf).expect("a decoded message encodes");
            assert_eq!(StoreMessage::decode(again), Ok(m));
        }
        let outcome = table.apply(bytes, flags & 1 != 0, flags & 2 != 0, fds, |fd| {
            if fd.keepable {
                Ok(())
            } else {
                Err("not keepable".into())
            }
        });
        // What the table hands back is closed by the caller.
        match outcome {
            Ok(Applied::Kept { replaced, .. }) => drop(replaced),
            Ok(Applied::Forgot { fd, .. }) => drop(fd),
            Err(_) => {}
        }
        assert!(table.len() <= max);
        let mut ids: Vec<u32> = table.entries().map(|(r, _)| r.id).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), table.len(), "two records under one id");
        assert_eq!(
            closed.get() + table.len(),
            sent,
            "a descriptor neither kept nor closed"
        );
    }
    drop(table.clear());
    assert_eq!(closed.get(), sent);
});
