//! The Linux guest harness itself (tests/tests/common/linux.rs): a script's exit status comes
//! back from the guest, and a vhost-user-blk disk served by QEMU's own storage daemon (the
//! baseline our storage service is later measured against) carries fio's verified writes
//! and a pattern the host finds in the image file.

mod common;

use std::time::Duration;

use common::linux;
use common::linux::Guest;
use common::linux::StorageDaemon;

#[test]
fn a_script_that_succeeds_reports_status_0_and_runs_on_the_cloud_kernel() {
    let test = "a_script_that_succeeds_reports_status_0_and_runs_on_the_cloud_kernel";
    let Some(image) = linux::image(test) else {
        return;
    };
    let exit = Guest::new(&image)
        .script("echo \"release=$(uname -r)\"\nexit 0\n")
        .run();
    assert_eq!(exit.status, 0, "{}", exit.console);
    let release = exit
        .console
        .lines()
        .find_map(|l| l.strip_prefix("release="))
        .unwrap_or_else(|| panic!("no release line:\n{}", exit.console));
    assert!(release.ends_with("-cloud-amd64"), "{release}");
    eprintln!(
        "boot to PV-EXIT: {:.2} s (kernel {release})",
        exit.elapsed.as_secs_f64()
    );
}

#[test]
fn a_script_that_exits_3_reports_status_3() {
    let test = "a_script_that_exits_3_reports_status_3";
    let Some(image) = linux::image(test) else {
        return;
    };
    let mut guest = Guest::new(&image)
        .script("echo step-one\nexit 3\necho not-reached\n")
        .spawn();
    guest.wait_for_line("step-one", Duration::from_secs(300));
    let exit = guest.wait();
    assert_eq!(exit.status, 3, "{}", exit.console);
    assert!(!exit.console.contains("not-reached"), "{}", exit.console);
}

/// The disk the guest sees, in MiB.
const DISK_MIB: u64 = 64;
/// Where the guest writes its pattern, in MiB: past fio's 16 MiB.
const PATTERN_AT_MIB: u64 = 32;
/// The guest's pattern: `yes pv-harness-pattern`, one MiB of it.
const PATTERN_LINE: &[u8] = b"pv-harness-pattern\n";

#[test]
fn fio_verifies_a_vhost_user_blk_disk_served_by_qemu_storage_daemon() {
    let test = "fio_verifies_a_vhost_user_blk_disk_served_by_qemu_storage_daemon";
    if !linux::storage_daemon_available(test) {
        return;
    }
    let Some(image) = linux::image(test) else {
        return;
    };
    let dir = common::scratch_dir("qsd");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK_MIB << 20))
        .expect("disk image");
    let daemon = StorageDaemon::vhost_user_blk(&disk, &dir.join("blk.sock"));

    let script = format!(
        r#"set -e
echo "vda: $(cat /sys/block/vda/size) sectors"
# Random 4 KiB writes, each read back and checked against its crc32c.
fio --name=verify --filename=/dev/vda --rw=randwrite --bs=4k --size=16M \
    --verify=crc32c --verify_fatal=1 --direct=1 --ioengine=psync
# Queued random reads through libaio: the baseline's throughput.
fio --name=randread --filename=/dev/vda --rw=randread --bs=4k --size=16M \
    --direct=1 --ioengine=libaio --iodepth=16 --runtime=3 --time_based
# A pattern past fio's region, read back bypassing the page cache.
yes pv-harness-pattern | head -c 1048576 > /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=1M seek={PATTERN_AT_MIB} count=1 oflag=direct
dd if=/dev/vda of=/tmp/back bs=1M skip={PATTERN_AT_MIB} count=1 iflag=direct
cmp /tmp/pattern /tmp/back
echo pattern-read-back
"#
    );
    let exit = Guest::new(&image)
        .vhost_user_blk(daemon.socket(), false)
        .script(&script)
        .run();
    assert_eq!(
        exit.status,
        0,
        "{}\n--- qemu-storage-daemon ---\n{}",
        exit.console,
        daemon.log()
    );
    assert!(
        exit.console
            .contains(&format!("vda: {} sectors", DISK_MIB << 11)),
        "{}",
        exit.console
    );
    assert!(
        exit.console.contains("pattern-read-back"),
        "{}",
        exit.console
    );
    for line in exit.console.lines().filter(|l| l.contains("IOPS=")) {
        eprintln!("fio (qemu-storage-daemon, TCG): {}", line.trim());
    }
    drop(daemon);

    // The guest's writes reached the file behind the daemon.
    let bytes = std::fs::read(&disk).expect("read the disk image");
    let at = (PATTERN_AT_MIB << 20) as usize;
    let expected: Vec<u8> = PATTERN_LINE.iter().copied().cycle().take(1 << 20).collect();
    assert!(
        bytes[at..at + (1 << 20)] == expected[..],
        "the image file does not hold the guest's pattern at {PATTERN_AT_MIB} MiB"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
