use super::*;
use crate::capability::Grant as ChannelGrant;

const IMAGE: &[u8] = b"\x7fELF";

fn restart() -> Restart {
    Restart {
        policy: RestartPolicy::Always,
        max: 5,
        window_ms: 60_000,
        backoff_ms: 50,
        max_backoff_ms: 1000,
    }
}

fn channel_size() -> u64 {
    round_up(
        crate::layout::ChannelLayout::new(4096)
            .unwrap()
            .region_size() as u64,
    )
}

/// A client and a server over one channel; the server also holds a region.
fn table() -> TaskTable<'static> {
    let size = channel_size();
    let mut client = Task {
        name: "client",
        image: 0,
        args: "",
        heap: 16 * PAGE,
        stack: 4 * PAGE,
        restart: restart(),
        slots: Vec::new(),
    };
    client
        .slots
        .push(Slot {
            grant: Grant::Client { channel: 0 },
            address: SLOT_BASE,
            size,
        })
        .unwrap();
    let mut server = Task {
        name: "server",
        args: "",
        ..client.clone()
    };
    server.slots.clear();
    server
        .slots
        .push(Slot {
            grant: Grant::Server { channel: 0 },
            address: SLOT_BASE,
            size,
        })
        .unwrap();
    server
        .slots
        .push(Slot {
            grant: Grant::Region { region: 0 },
            address: SLOT_BASE + size,
            size: 8 * PAGE,
        })
        .unwrap();
    let mut t = TaskTable {
        version: TABLE_VERSION,
        tasks: Vec::new(),
        channels: Vec::new(),
        regions: Vec::new(),
        images: Vec::new(),
    };
    t.tasks.push(client).unwrap();
    t.tasks.push(server).unwrap();
    t.channels
        .push(Channel {
            interface: Interface::Vmgs,
            client: 0,
            server: 1,
            grant: ChannelGrant::Interface,
            ring_capacity: 4096,
        })
        .unwrap();
    t.regions
        .push(Region {
            name: "disk",
            size: 8 * PAGE,
        })
        .unwrap();
    t.images.push(IMAGE).unwrap();
    t
}

#[test]
fn a_table_survives_encoding_and_its_check() {
    let t = table();
    let bytes = postcard::to_allocvec(&t).unwrap();
    assert_eq!(TaskTable::decode(&bytes), Ok(t));
}

#[test]
fn every_broken_grant_address_and_index_is_named() {
    let mut t = table();
    t.version = 7;
    assert_eq!(t.check(), Err(TableError::Version(7)));

    let mut t = table();
    t.tasks[0].slots[0].grant = Grant::Server { channel: 0 };
    assert_eq!(t.check(), Err(TableError::Grant { task: 0, slot: 0 }));

    let mut t = table();
    t.tasks[0].slots[0].grant = Grant::Client { channel: 9 };
    assert_eq!(t.check(), Err(TableError::Grant { task: 0, slot: 0 }));

    let mut t = table();
    t.tasks[1].slots[1].grant = Grant::Region { region: 3 };
    assert_eq!(t.check(), Err(TableError::Grant { task: 1, slot: 1 }));

    // Overlapping slots, a slot outside the window, a misaligned one, a wrong size.
    let mut t = table();
    t.tasks[1].slots[1].address = SLOT_BASE + PAGE;
    assert_eq!(t.check(), Err(TableError::Address { task: 1, slot: 1 }));
    let mut t = table();
    t.tasks[0].slots[0].address = IMAGE_BASE;
    assert_eq!(t.check(), Err(TableError::Address { task: 0, slot: 0 }));
    let mut t = table();
    t.tasks[0].slots[0].address = SLOT_BASE + 8;
    assert_eq!(t.check(), Err(TableError::Address { task: 0, slot: 0 }));
    let mut t = table();
    t.tasks[0].slots[0].size += PAGE;
    assert_eq!(t.check(), Err(TableError::Address { task: 0, slot: 0 }));
    let mut t = table();
    t.tasks[0].slots[0].address = u64::MAX - PAGE + 1;
    assert_eq!(t.check(), Err(TableError::Address { task: 0, slot: 0 }));
    // Into the stack.
    let mut t = table();
    t.tasks[1].slots[1].address = STACK_TOP - 4 * PAGE;
    assert_eq!(t.check(), Err(TableError::Address { task: 1, slot: 1 }));

    // A channel with two clients, or none.
    let mut t = table();
    let extra = Slot {
        address: SLOT_BASE + 64 * PAGE,
        ..t.tasks[0].slots[0]
    };
    t.tasks[0].slots.push(extra).unwrap();
    assert_eq!(t.check(), Err(TableError::Channel(0)));
    let mut t = table();
    t.tasks[0].slots.clear();
    assert_eq!(t.check(), Err(TableError::Channel(0)));

    let mut t = table();
    t.tasks[0].image = 1;
    assert_eq!(t.check(), Err(TableError::Task(0)));
    let mut t = table();
    t.tasks[0].heap = SLOT_BASE;
    assert_eq!(t.check(), Err(TableError::Task(0)));
    let mut t = table();
    t.tasks[0].stack = 0;
    assert_eq!(t.check(), Err(TableError::Task(0)));

    let mut t = table();
    t.tasks[1].slots.pop();
    assert_eq!(t.check(), Err(TableError::Region(0)));
}

#[test]
fn garbage_is_not_a_table() {
    assert_eq!(TaskTable::decode(&[]), Err(TableError::Encoding));
    let bytes = postcard::to_allocvec(&table()).unwrap();
    for cut in 0..bytes.len() {
        assert!(TaskTable::decode(&bytes[..cut]).is_err(), "{cut}");
    }
}

#[test]
fn a_boot_record_fits_a_page_and_reads_back() {
    let mut boot = TaskBoot {
        name: "vmgs",
        args: "fault-after=3",
        restarts: 2,
        heap: 64 * PAGE,
        slots: Vec::new(),
    };
    boot.slots
        .push(BootSlot {
            grant: BootGrant::Server(Interface::Vmgs, ChannelGrant::Interface),
            name: "client",
            address: SLOT_BASE,
            size: channel_size(),
        })
        .unwrap();
    let mut page = [0u8; PAGE as usize];
    let used = boot.encode(&mut page).unwrap();
    assert!(used > 4);
    assert_eq!(TaskBoot::decode(&page), Some(boot.clone()));
    assert_eq!(boot.encode(&mut [0u8; 8]), None);
    // A length past the page is refused.
    page[..4].copy_from_slice(&5000u32.to_le_bytes());
    assert_eq!(TaskBoot::decode(&page), None);
}
