//! An unmodified Linux (Debian's cloud kernel, its stock virtio drivers, fio) under QEMU on
//! our storage service: vhost-user-blk and vhost-user-scsi disks, encrypted at rest; a
//! tampered block; kill -9 of the service under fio; a raw disk under large and small writes.

mod common;

use std::path::PathBuf;
use std::time::Duration;
use std::time::Instant;

use common::linux;

/// The listeners the shipped manifest's storage service serves, asked for.
const LISTEN: &[&str] = &["--listen", "vhost-user-blk", "--listen", "vhost-user-scsi"];
/// The disks' size in the shipped manifest (`size=256M`).
const DISK_BLOCKS: u64 = (256 << 20) / 4096;

fn socket(inst: &common::Instance, name: &str) -> PathBuf {
    inst.dir.join(format!("state/storage/{name}.sock"))
}

fn ready(test: &str) -> Option<linux::Image> {
    if !common::sandbox_available(test) {
        return None;
    }
    linux::image(test)
}

/// Where block `lba` of an encrypted image is sealed: after the header block and one block
/// of 32-byte nonce+tag records per 128 blocks (docs/storage.md).
fn sealed_offset(lba: u64) -> u64 {
    (1 + DISK_BLOCKS.div_ceil(128) + lba) * 4096
}

#[test]
fn linux_runs_fio_and_a_file_system_on_our_blk_and_scsi_disks_and_the_host_sees_ciphertext() {
    let test =
        "linux_runs_fio_and_a_file_system_on_our_blk_and_scsi_disks_and_the_host_sees_ciphertext";
    let Some(image) = ready(test) else { return };
    let inst = common::Instance::start_with("storage-linux", &common::shipped_text(), 7, LISTEN);
    let script = r#"
set -e
pv_wait_dev /dev/vda
pv_wait_dev /dev/sda
for d in vda sda; do
    echo "$d: $(cat /sys/block/$d/size) sectors of $(cat /sys/block/$d/queue/logical_block_size) bytes"
    fio --name=verify-$d --filename=/dev/$d --rw=randwrite --bs=4k --size=16M --verify=crc32c \
        --direct=1 --ioengine=libaio --iodepth=8 --output=/tmp/fio-$d || { cat /tmp/fio-$d; exit 1; }
    grep -E 'IOPS|err=' /tmp/fio-$d
    dd if=/dev/urandom of=/tmp/pattern bs=4k count=64 2>/dev/null
    dd if=/tmp/pattern of=/dev/$d bs=4k seek=1000 oflag=direct 2>/dev/null
    dd if=/dev/$d of=/tmp/back bs=4k skip=1000 count=64 iflag=direct 2>/dev/null
    cmp /tmp/pattern /tmp/back
    mkfs.ext2 -q /dev/$d
    mount /dev/$d /mnt
    yes PV-PLAINTEXT-MARKER-0123456789 | head -c 1048576 > /mnt/marker
    umount /mnt
    mount /dev/$d /mnt
    [ "$(head -c 30 /mnt/marker)" = PV-PLAINTEXT-MARKER-012345678 ] || [ "$(head -c 29 /mnt/marker)" = PV-PLAINTEXT-MARKER-012345678 ]
    umount /mnt
done
if dmesg | grep -iE 'I/O error|blk_update_request|critical medium|Buffer I/O'; then
    echo "the kernel logged I/O errors"; exit 1
fi
echo DISKS-OK
"#;
    let exit = linux::Guest::new(&image)
        .vhost_user_blk(&socket(&inst, "vhost-user-blk"), true)
        .vhost_user_scsi(&socket(&inst, "vhost-user-scsi"))
        .script(script)
        .run();
    assert_eq!(
        exit.status,
        0,
        "guest failed:\n{}\n{}",
        exit.console,
        inst.log()
    );
    assert!(exit.console.contains("DISKS-OK"));
    // The guest saw 4 KiB blocks of the manifest's size.
    assert!(
        exit.console
            .contains(&format!("vda: {} sectors of 4096 bytes", DISK_BLOCKS * 8)),
        "{}",
        exit.console
    );
    for image in ["storage-blk.img", "storage-scsi.img"] {
        let bytes = std::fs::read(inst.dir.join("state").join(image)).unwrap();
        let marker = b"PV-PLAINTEXT-MARKER";
        assert!(
            !bytes.windows(marker.len()).any(|w| w == marker),
            "{image} holds the guest's plaintext"
        );
    }
    let row = inst.row("storage");
    assert_eq!(row["restarts"], 0, "{row}");
}

#[test]
fn a_flipped_byte_in_the_image_is_an_io_error_on_that_block_only() {
    let test = "a_flipped_byte_in_the_image_is_an_io_error_on_that_block_only";
    let Some(image) = ready(test) else { return };
    let inst = common::Instance::start_with("storage-tamper", &common::shipped_text(), 7, LISTEN);
    let sock = socket(&inst, "vhost-user-blk");
    let write = r#"
for b in 100 101 102; do
    yes "block-$b" | head -c 4096 > /tmp/b$b
    dd if=/tmp/b$b of=/dev/vda bs=4k seek=$b oflag=direct 2>/dev/null || exit 1
done
echo WRITTEN
"#;
    let exit = linux::Guest::new(&image)
        .vhost_user_blk(&sock, false)
        .script(write)
        .run();
    assert_eq!(exit.status, 0, "{}", exit.console);
    // The host changes one byte of block 101's ciphertext.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(inst.dir.join("state/storage-blk.img"))
            .unwrap();
        let at = sealed_offset(101) + 1234;
        let mut byte = [0u8; 1];
        f.read_exact_at(&mut byte, at).unwrap();
        f.write_all_at(&[byte[0] ^ 0x01], at).unwrap();
    }
    let read = r#"
for b in 100 101 102; do
    yes "block-$b" | head -c 4096 > /tmp/want
    if dd if=/dev/vda of=/tmp/got bs=4k skip=$b count=1 iflag=direct 2>/dev/null && cmp -s /tmp/want /tmp/got; then
        echo "BLOCK $b OK"
    else
        echo "BLOCK $b FAILED"
    fi
done
dmesg | grep -iE 'critical medium|I/O error' | head -3
"#;
    let exit = linux::Guest::new(&image)
        .vhost_user_blk(&sock, false)
        .script(read)
        .run();
    assert_eq!(exit.status, 0, "{}", exit.console);
    for (block, outcome) in [(100, "OK"), (101, "FAILED"), (102, "OK")] {
        assert!(
            exit.console.contains(&format!("BLOCK {block} {outcome}")),
            "block {block} should be {outcome}:\n{}",
            exit.console
        );
    }
    // The service says which block, in its log.
    let log = inst.log();
    assert!(
        log.contains("lba 101") || log.contains("block 101"),
        "{log}"
    );
}

#[test]
fn kill_9_of_storage_ten_times_under_fio_loses_nothing_the_guest_was_told_was_written() {
    let test = "kill_9_of_storage_ten_times_under_fio_loses_nothing_the_guest_was_told_was_written";
    let Some(image) = ready(test) else { return };
    // Restarts enough for the test (the shipped limit is 5 a minute).
    let manifest = common::edited(&common::shipped_text(), |doc| {
        common::set(doc, "service.storage.restart.max", "40");
    });
    let mut inst = common::Instance::start_with("storage-kill", &manifest, 7, LISTEN);
    let sock = socket(&inst, "vhost-user-blk");
    let fio = "fio --filename=/dev/vda --bs=4k --size=32M --direct=1 --ioengine=libaio --iodepth=16 --verify=crc32c";
    let script = format!(
        r#"
round=0
while :; do
    round=$((round + 1))
    {fio} --name=round$round --rw=randwrite --randseed=$round --output=/tmp/fio || {{ cat /tmp/fio; echo FIO-FAILED; exit 1; }}
    grep -q 'err= 0' /tmp/fio || {{ cat /tmp/fio; exit 1; }}
    echo "FIO-ROUND $round"
    if read -t 1 line && [ "$line" = stop ]; then break; fi
done
{fio} --name=final --rw=write --do_verify=0 --output=/tmp/fio || {{ cat /tmp/fio; exit 1; }}
if dmesg | grep -iE 'I/O error|blk_update_request|Buffer I/O'; then echo "I/O ERRORS"; exit 1; fi
echo "ROUNDS $round"
"#
    );
    let mut guest = linux::Guest::new(&image)
        .vhost_user_blk(&sock, true)
        .script(&script)
        .spawn();
    guest.wait_for_line("FIO-ROUND 1", Duration::from_secs(300));
    let mut kills = 0;
    let mut longest = Duration::ZERO;
    while kills < 10 {
        let pid = inst.pid("storage");
        std::thread::sleep(Duration::from_millis(500 + 300 * (kills % 4)));
        let killed = Instant::now();
        assert!(common::alive(pid));
        kill_9(pid);
        kills += 1;
        inst.wait_until(Duration::from_secs(30), |rows| {
            rows.iter().any(|r| {
                r["name"] == "storage"
                    && r["state"] == "running"
                    && r["pid"].as_i64() != Some(i64::from(pid))
            })
        });
        longest = longest.max(killed.elapsed());
        // QEMU reconnects within a second; the guest's I/O continues.
        std::thread::sleep(Duration::from_millis(1200));
    }
    eprintln!("{kills} kills; longest kill-to-running {longest:?}");
    guest.send_line("stop");
    let exit = guest.wait();
    assert_eq!(
        exit.status,
        0,
        "guest failed:\n{}\n{}",
        exit.console,
        inst.log()
    );
    assert!(exit.console.contains("ROUNDS"), "{}", exit.console);
    assert_eq!(
        inst.row("storage")["restarts"],
        10,
        "{}",
        inst.row("storage")
    );
    // Each new process took the front end's in-flight record back (and answered what it
    // names: logged as "submitting again" when a kill fell inside a request).
    let log = inst.log();
    let handed_back = log
        .matches("front end handed back its in-flight record")
        .count();
    let resubmitted = log
        .matches("submitting again the requests in flight")
        .count();
    eprintln!("in-flight record handed back {handed_back} times; requests in flight at {resubmitted} kills");
    assert!(handed_back >= 10, "{log}");
    // A clean shutdown and a new paravisor: everything the guest was told was written reads
    // back (fio checks each block's checksum and offset).
    inst.restart(7, LISTEN);
    let verify = format!("{fio} --name=final --rw=write --verify_only --output=/tmp/fio || {{ cat /tmp/fio; exit 1; }}\ngrep 'err= 0' /tmp/fio\n");
    let exit = linux::Guest::new(&image)
        .vhost_user_blk(&sock, false)
        .script(&verify)
        .run();
    assert_eq!(
        exit.status, 0,
        "verify after restart failed:\n{}",
        exit.console
    );
}

#[test]
fn a_raw_disk_reads_back_what_linux_wrote_in_large_and_small_writes() {
    // A raw disk writes its image in pieces (pv_storage::disks::PiecewiseWrites): a guest's
    // 1 MiB writes span several pieces, and 4 KiB writes land inside them.
    let test = "a_raw_disk_reads_back_what_linux_wrote_in_large_and_small_writes";
    let Some(image) = ready(test) else { return };
    let raw = common::shipped_text().replace(
        "listen=vhost-user-blk,file=blk-image,encrypted,",
        "listen=vhost-user-blk,file=blk-image,",
    );
    assert!(!raw.contains("file=blk-image,encrypted"));
    let inst = common::Instance::start_with("storage-raw", &raw, 7, LISTEN);
    let script = r#"
set -e
for bs in 1M 4k 192k; do
    fio --name=verify-$bs --filename=/dev/vda --rw=randwrite --bs=$bs --size=64M --verify=crc32c \
        --direct=1 --ioengine=libaio --iodepth=8 --output=/tmp/fio || { cat /tmp/fio; exit 1; }
    grep -q 'err= 0' /tmp/fio || { cat /tmp/fio; exit 1; }
    echo "VERIFIED $bs"
done
"#;
    let exit = linux::Guest::new(&image)
        .vhost_user_blk(&socket(&inst, "vhost-user-blk"), false)
        .script(script)
        .run();
    assert_eq!(exit.status, 0, "{}\n{}", exit.console, inst.log());
    for bs in ["1M", "4k", "192k"] {
        assert!(
            exit.console.contains(&format!("VERIFIED {bs}")),
            "{}",
            exit.console
        );
    }
    // A raw image is the disk and nothing more (no header, no records).
    let written = std::fs::metadata(inst.dir.join("state/storage-blk.img")).unwrap();
    assert_eq!(written.len(), DISK_BLOCKS * 4096);
}

fn kill_9(pid: i32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
