//! The VMGS store on metal: the same library and request handling as the hosted pv-vmgs
//! service, over a RAM-disk region instead of a file. The region is the task's first
//! (the manifest's `guest-state` file becomes it), kept by the kernel across the task's
//! restarts: a restarted store reopens what its predecessor committed.
//!
//! Not yet as on the hosted platform: the store is not encrypted (there is no sealed key on
//! metal yet; the region is memory only this task and the kernel map).
//!
//! `fault-after=N` in its arguments (tests only) makes the first start fault on its N-th
//! request, before answering it: a restart under a client's feet.
#![no_std]
#![no_main]

extern crate alloc;

use core::arch::asm;

use ipc_defs::capability::Grant;
use ipc_defs::endpoint::Response;
use ipc_defs::metal::BootGrant;
use ipc_defs::services::vmgs::FileIdSet;
use ipc_defs::services::vmgs::Request;
use ipc_defs::Interface;
use pv_metal_tasks::channel;
use pv_metal_tasks::log;
use pv_metal_tasks::rng;
use pv_metal_tasks::TaskBoot;
use pv_vmgs::crypto::RandomError;
use pv_vmgs::format::BLOCK_SIZE;
use pv_vmgs::server::Server;
use pv_vmgs::storage::StorageErrorKind;
use pv_vmgs::storage::StorageResult;
use pv_vmgs::Storage;
use pv_vmgs::Vmgs;

pv_metal_tasks::task_main!(main);

/// The RAM disk: a region the kernel maps into this task.
struct Region(&'static mut [u8]);

impl Storage for Region {
    fn size(&self) -> StorageResult<u64> {
        Ok(self.0.len() as u64)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> StorageResult<()> {
        let start = usize::try_from(offset).map_err(|_| StorageErrorKind::InvalidInput)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(StorageErrorKind::InvalidInput)?;
        buf.copy_from_slice(
            self.0
                .get(start..end)
                .ok_or(StorageErrorKind::UnexpectedEof)?,
        );
        Ok(())
    }

    fn write_at(&mut self, offset: u64, buf: &[u8]) -> StorageResult<()> {
        let start = usize::try_from(offset).map_err(|_| StorageErrorKind::InvalidInput)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(StorageErrorKind::InvalidInput)?;
        // A RAM disk does not grow.
        self.0
            .get_mut(start..end)
            .ok_or(StorageErrorKind::InvalidInput)?
            .copy_from_slice(buf);
        Ok(())
    }

    /// Memory is as durable as it gets here: the region outlives the task.
    fn flush(&mut self) -> StorageResult<()> {
        Ok(())
    }
}

fn rdrand(buf: &mut [u8]) -> Result<(), RandomError> {
    if rng::fill(buf) {
        Ok(())
    } else {
        Err(RandomError::Failed(
            "RDRAND failed ten times in a row".into(),
        ))
    }
}

fn main(boot: &TaskBoot) -> u64 {
    if rng::available() {
        let _ = pv_vmgs::crypto::set_random_source(rdrand);
    } else {
        log!("no RDRAND: creating a store will fail (needs randomness)");
    }
    let Some(slot) = boot.slots.iter().find(|s| s.grant == BootGrant::Region) else {
        log!("no region granted: nothing to keep the store in");
        return 2;
    };
    // SAFETY: the kernel maps this region at `address`, `size` bytes, for this task alone,
    // for its whole life; nothing else in the task refers to it.
    let memory =
        unsafe { core::slice::from_raw_parts_mut(slot.address as *mut u8, slot.size as usize) };
    let fresh = memory.iter().take(BLOCK_SIZE as usize * 2).all(|b| *b == 0);
    // The VHD footer takes the last 512 bytes.
    let image = slot.size.saturating_sub(512);
    let mut disk = Region(memory);
    if fresh {
        if let Err(e) = Vmgs::create(&mut disk, image, None).map(drop) {
            log!("creating the store in {}: {}", slot.name, e);
            return 1;
        }
        log!(
            "created a {} KiB store in region {}",
            image / 1024,
            slot.name
        );
    }
    let mut server = match Server::open(disk, None) {
        Ok(s) => s,
        Err(e) => {
            log!("opening the store in {}: {}", slot.name, e);
            return 1;
        }
    };
    log!(
        "serving vmgs from region {} (start {})",
        slot.name,
        boot.restarts
    );
    let fault_after = boot
        .args
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("fault-after=")?.parse::<u32>().ok())
        .filter(|_| boot.restarts == 0);
    let mut served = 0u32;
    channel::serve(boot, Interface::Vmgs, |caller, request: Request| {
        served += 1;
        if fault_after == Some(served) {
            log!("faulting on request {} as configured", served);
            // SAFETY: the point is to fault; the kernel stops and restarts this task.
            unsafe { asm!("ud2", options(noreturn)) };
        }
        let granted = match caller.grant {
            Grant::VmgsFiles(set) => set,
            _ => FileIdSet::EMPTY,
        };
        Response::Service(server.handle(caller.name, granted, request))
    })
}
