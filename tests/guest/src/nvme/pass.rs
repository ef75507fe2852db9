//! The NVMe step's passes: write every block with a pattern of (run, pass, block, word),
//! flush, read every block back and compare every byte. Commands carry 1, 2, 8 and 3 blocks
//! in turn (PRP1 alone, PRP1 + PRP2, PRP lists) on data pages that are not contiguous, and
//! [`SLOTS`] of them are in flight at once.

use super::queue::Command;
use super::queue::Controller;
use super::queue::Which;
use super::shared_read64;
use super::shared_write64;
use super::Config;
use super::Failure;
use super::Identity;
use super::Layout;
use super::BLOCK_WORDS;
use super::IO_FLUSH;
use super::IO_READ;
use super::IO_WRITE;
use super::MAX_TRANSFER_BLOCKS;
use super::NSID;
use super::SLOTS;
use super::TRANSFER_BLOCKS;
use crate::check;
use crate::put_dec;
use crate::put_hex_digits;
use crate::puts;
use crate::rdtsc;

/// Runs `config.passes` passes over the first `config.max_blocks` blocks; a pass that reads
/// back wrong is a failed check, a command that fails ends the passes.
pub(super) fn run_passes(
    controller: &mut Controller,
    config: &Config,
    identity: &Identity,
) -> Result<(), Failure> {
    let blocks = identity.blocks.min(config.max_blocks);
    let transfer = MAX_TRANSFER_BLOCKS.min(identity.max_transfer_blocks);
    puts("guest: nvme: testing ");
    put_dec(blocks);
    puts(" of ");
    put_dec(identity.blocks);
    puts(" blocks, up to ");
    put_dec(transfer);
    puts(" per command, ");
    put_dec(SLOTS as u64);
    puts(" commands in flight\n");
    let salt = rdtsc();
    let started = rdtsc();
    for pass in 1..=config.passes {
        let bad = run_pass(controller, salt, pass, blocks, transfer)?;
        puts("guest: nvme: pass ");
        put_dec(pass);
        puts(": ");
        put_dec(blocks);
        puts(" blocks written, flushed, read back\n");
        if let Some(m) = bad.first {
            puts("guest: nvme: pass ");
            put_dec(pass);
            puts(": ");
            put_dec(bad.blocks);
            puts(" blocks differ; the first, block ");
            put_dec(m.lba);
            puts(", at byte ");
            put_dec(m.word * 8);
            puts(": expected ");
            put_hex_digits(m.expected, 16);
            puts(", read ");
            put_hex_digits(m.read, 16);
            puts(" (its word 0: ");
            put_hex_digits(m.marker, 16);
            puts(")\n");
        }
        check(
            bad.blocks == 0,
            "nvme: every block of the pass reads back as written",
        );
    }
    // For `paravisor bench guest`: the passes' cost, timed by the guest.
    let cycles = rdtsc().wrapping_sub(started);
    puts("guest: nvme: ");
    put_dec(config.passes);
    puts(" passes in ");
    put_dec(cycles);
    puts(" cycles, ");
    put_dec(cycles / config.passes.max(1));
    puts(" cycles/pass\n");
    Ok(())
}

/// The 8 bytes at `word` of block `lba` in `pass` of the run salted `salt`. Word 0 is a
/// readable marker (pass and block); the others differ for every run, pass, block and word,
/// so a misplaced block, a stale pass, a dropped write or a torn page all show.
fn pattern(salt: u64, pass: u64, lba: u64, word: u64) -> u64 {
    if word == 0 {
        return pass << 48 | lba;
    }
    let mut x = (lba << 12 | word) ^ salt ^ pass.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// What a read buffer holds before the device fills it (not a value [`pattern`] gives
/// word 0 of a block: no pass is that large).
const POISON: u64 = 0xDEAD_BEEF_DEAD_BEEF;

/// A command in flight in a slot.
#[derive(Clone, Copy)]
struct InFlight {
    cid: u16,
    lba: u64,
    blocks: u64,
}

/// The first word of a pass that read back wrong.
struct Mismatch {
    lba: u64,
    word: u64,
    expected: u64,
    read: u64,
    /// Word 0 of the block read (which block and pass it holds).
    marker: u64,
}

/// What the read-back of a pass found.
#[derive(Default)]
struct Mismatches {
    blocks: u64,
    first: Option<Mismatch>,
}

/// One pass: write every block, flush, read every block back and compare.
fn run_pass(
    c: &mut Controller,
    salt: u64,
    pass: u64,
    blocks: u64,
    transfer: u64,
) -> Result<Mismatches, Failure> {
    let mut bad = Mismatches::default();
    sweep(c, IO_WRITE, (salt, pass), (blocks, transfer), &mut bad)?;
    c.io(Command::new(IO_FLUSH, NSID), "Flush")?;
    sweep(c, IO_READ, (salt, pass), (blocks, transfer), &mut bad)?;
    Ok(bad)
}

/// Writes (filling the data pages with the pass's pattern) or reads (checking what comes
/// back) blocks 0..blocks, [`SLOTS`] commands at a time.
fn sweep(
    c: &mut Controller,
    opcode: u8,
    (salt, pass): (u64, u64),
    (blocks, transfer): (u64, u64),
    bad: &mut Mismatches,
) -> Result<(), Failure> {
    let what = if opcode == IO_WRITE { "Write" } else { "Read" };
    let layout = c.layout;
    let (mut lba, mut turn) = (0u64, 0usize);
    while lba < blocks {
        let mut slots: [Option<InFlight>; SLOTS] = [None; SLOTS];
        let mut submitted = 0;
        for (slot, entry) in slots.iter_mut().enumerate() {
            if lba == blocks {
                break;
            }
            let count = TRANSFER_BLOCKS[turn % TRANSFER_BLOCKS.len()]
                .min(transfer)
                .min(blocks - lba);
            turn += 1;
            for k in 0..count {
                let page = layout.data_page(slot, k);
                for w in 0..BLOCK_WORDS {
                    let value = if opcode == IO_WRITE {
                        pattern(salt, pass, lba + k, w)
                    } else {
                        POISON
                    };
                    shared_write64(page + 8 * w, value);
                }
            }
            let cid = c.cid();
            c.io.push(&data_command(layout, opcode, slot, lba, count).with_cid(cid));
            *entry = Some(InFlight {
                cid,
                lba,
                blocks: count,
            });
            lba += count;
            submitted += 1;
        }
        c.ring_sq(Which::Io);
        for _ in 0..submitted {
            let done = c.completion(Which::Io, what)?;
            let Some(slot) = slots
                .iter()
                .position(|s| s.is_some_and(|f| f.cid == done.cid))
            else {
                return Err(Failure::Cid(what, done.cid));
            };
            if done.status != 0 {
                return Err(Failure::Status(what, done.status));
            }
            if let Some(f) = slots[slot].take() {
                if opcode == IO_READ {
                    verify(layout, slot, f, (salt, pass), bad);
                }
            }
        }
        c.ring_cq(Which::Io);
    }
    Ok(())
}

/// A read or write of `count` blocks from `lba` on `slot`'s data pages: PRP1 the first page;
/// PRP2 the second page (two blocks) or the slot's PRP list of pages 1.. (more).
fn data_command(layout: Layout, opcode: u8, slot: usize, lba: u64, count: u64) -> Command {
    let prp2 = match count {
        1 => 0,
        2 => layout.data_page(slot, 1),
        _ => {
            let list = layout.prp_list(slot);
            for k in 1..count {
                shared_write64(list + 8 * (k - 1), layout.data_page(slot, k));
            }
            list
        }
    };
    Command::new(opcode, NSID)
        .prp(layout.data_page(slot, 0), prp2)
        .cdw(10, lba as u32)
        .cdw(11, (lba >> 32) as u32)
        .cdw(12, (count - 1) as u32)
}

/// Compares every word the read of `f` brought into `slot`'s pages with the pass's pattern.
fn verify(
    layout: Layout,
    slot: usize,
    f: InFlight,
    (salt, pass): (u64, u64),
    bad: &mut Mismatches,
) {
    for k in 0..f.blocks {
        let page = layout.data_page(slot, k);
        let lba = f.lba + k;
        let mut first = None;
        for w in 0..BLOCK_WORDS {
            let read = shared_read64(page + 8 * w);
            let expected = pattern(salt, pass, lba, w);
            if read != expected {
                first = Some((w, expected, read));
                break;
            }
        }
        if let Some((word, expected, read)) = first {
            bad.blocks += 1;
            if bad.first.is_none() {
                bad.first = Some(Mismatch {
                    lba,
                    word,
                    expected,
                    read,
                    marker: shared_read64(page),
                });
            }
        }
    }
}
