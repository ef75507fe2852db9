//! Issue 18 end to end: an unmodified Debian kernel under `paravisor run --vmm qemu` boots
//! through UEFI measured boot into our vTPM, attests itself with Debian's tpm2-tools over our
//! NIC to the tenant's broker (`kbs serve` in a network namespace, on the far side of the
//! TAP), gets the disk secret, unlocks its LUKS2 data disk (on our storage service, itself
//! encrypted at rest) and reads the file written there on an earlier boot. Then each refusal
//! the broker must make, named by its check, with the disk left locked.
//!
//! The world (namespace, TAP, broker, run) is `pv_tools::cvm`'s, which `bench chaos` uses too.

mod common;

use std::path::Path;
use std::path::PathBuf;
use std::time::Duration;

use common::linux;
use pv_tools::cvm;
use pv_tools::linux_guest::GuestFile;

/// A run ends within this after its last console line, or it is declared hung (OVMF under
/// TCG is silent while it hashes the initrd).
const QUIET: Duration = Duration::from_secs(300);
/// What the tenant's file holds.
const TENANT_TEXT: &str = "tenant-file-3b9d0c: written inside the confidential VM";

/// The script of the happy path (the same initrd on both boots, so the same PCR 9): its PCRs,
/// what /init did, then the tenant's file written (first boot) or read back (later boots).
const HAPPY: &str = r#"
for i in 0 1 2 3 4 5 6 7 9; do echo "pcr $i $(cat /sys/class/tpm/tpm0/pcr-sha256/$i)"; done
echo "attest: $(cat /run/pv/attest)"
echo "disk: $(cat /run/pv/disk)"
grep -q '^mounted' /run/pv/disk || exit 4
if [ -f /mnt/data/tenant.txt ]; then
    echo "read: $(cat /mnt/data/tenant.txt)"
else
    echo "TENANT_TEXT" > /mnt/data/tenant.txt && sync && echo "wrote the tenant's file"
fi
exit 0
"#;

fn ready(test: &str) -> Option<linux::Image> {
    if !common::sandbox_available(test) {
        return None;
    }
    linux::uefi_image(test, &[("/usr/sbin/ip", "iproute2")])
}

/// One tenant's world: its directory, network, broker.
struct World {
    dir: PathBuf,
    network: cvm::Network,
    broker: cvm::Broker,
    manifest: PathBuf,
    measurement: String,
    image: linux::Image,
}

impl World {
    fn new(tag: &str, image: &linux::Image) -> World {
        let dir = common::scratch_dir(tag);
        let manifest = dir.join("manifest.toml");
        std::fs::write(&manifest, common::shipped_text()).unwrap();
        let network = cvm::Network::new(tag).expect("network namespace and TAP");
        let broker = cvm::Broker::prepare(
            &common::paravisor(),
            &dir.join("tenant"),
            &common::test_platform_dir(),
        )
        .expect("tenant directory");
        let measurement =
            cvm::measurement(&common::paravisor(), &manifest, &image.kernel).expect("measure");
        World {
            dir,
            network,
            broker,
            manifest,
            measurement,
            image: image.clone(),
        }
    }

    /// The image's initrd with `script`, named `name`; its bytes' PCR 9 under `cmdline`.
    fn initrd(&self, name: &str, script: &str, cmdline: &str) -> (PathBuf, String) {
        let path = self.dir.join(name);
        pv_tools::linux_guest::initrd_with(&self.image.initrd, &[GuestFile::script(script)], &path)
            .unwrap();
        let pcr9 = cvm::expected_pcr9(cmdline, &std::fs::read(&path).unwrap());
        (path, pcr9)
    }

    /// The broker with `pcrs` pinned and `measurements` allowed.
    fn serve(&mut self, measurements: Vec<String>, pcrs: Vec<(u32, Vec<String>)>) {
        self.broker
            .serve(
                &common::paravisor(),
                &self.network,
                &cvm::Policy {
                    measurements,
                    pcrs,
                    max_nonce_age: 60,
                },
            )
            .unwrap_or_else(|e| panic!("broker: {e}"));
    }

    /// Boots `initrd` with `cmdline`, its state in `state`, on `platform`; waits for its end.
    fn boot(
        &self,
        state: &str,
        platform: &Path,
        initrd: &Path,
        cmdline: &str,
    ) -> (Option<i32>, String) {
        let mut cmd = cvm::run_command(
            &common::paravisor(),
            &self.manifest,
            &self.dir.join(state),
            platform,
            &self.image.kernel,
            initrd,
            cmdline,
            &self.network,
        );
        let console = self.dir.join(format!("{state}.console"));
        let log = self.dir.join(format!("{state}.log"));
        cmd.stdout(std::fs::File::create(&console).unwrap())
            .stderr(std::fs::File::create(&log).unwrap())
            .stdin(std::process::Stdio::null());
        let mut child = common::spawn_of(&mut cmd);
        let status = wait_quietly(&mut child, &console);
        let console = std::fs::read_to_string(&console).unwrap_or_default();
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        (
            status,
            format!(
                "{console}\n--- paravisor ---\n{log}\n--- broker ---\n{}",
                self.broker.log()
            ),
        )
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.broker.stop();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits for `child`, killing it if `console` stays unchanged for [`QUIET`].
fn wait_quietly(child: &mut std::process::Child, console: &Path) -> Option<i32> {
    let (mut size, mut since) = (0, std::time::Instant::now());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        let now = std::fs::metadata(console).map_or(0, |m| m.len());
        if now != size {
            (size, since) = (now, std::time::Instant::now());
        }
        if since.elapsed() > QUIET {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value after `pcr N ` on the console.
fn pcr(console: &str, index: u32) -> String {
    let prefix = format!("pcr {index} ");
    console
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no PCR {index} on the console:\n{console}"))
        .trim()
        .to_lowercase()
}

#[test]
fn a_confidential_vm_attests_unlocks_its_disk_and_reads_the_tenants_file() {
    let test = "a_confidential_vm_attests_unlocks_its_disk_and_reads_the_tenants_file";
    let Some(image) = ready(test) else { return };
    let mut world = World::new("cvm-ok", &image);
    let cmdline = cvm::guest_cmdline(true);
    let script = HAPPY.replace("TENANT_TEXT", TENANT_TEXT);
    let (initrd, pcr9) = world.initrd("initrd.img", &script, &cmdline);
    let platform = common::test_platform_dir();

    // First boot, from a clean state: the tenant pins PCR 9 (the command line and the initrd,
    // predicted) and the paravisor's measurement; the guest provisions its disk.
    world.serve(
        vec![world.measurement.clone()],
        vec![(9, vec![pcr9.clone()])],
    );
    let (status, out) = world.boot("state", &platform, &initrd, &cmdline);
    assert_eq!(status, Some(0), "first boot:\n{out}");
    assert!(out.contains("attest: released"), "{out}");
    assert!(out.contains("disk: mounted provisioned"), "{out}");
    assert!(out.contains("wrote the tenant's file"), "{out}");
    assert_eq!(pcr(&out, 9), pcr9, "PCR 9 as predicted:\n{out}");
    assert!(out.contains("guest secret RELEASED"), "{out}");

    // The tenant pins the firmware's PCRs 0-7 of that boot, as the broker logged them.
    let mut pins: Vec<(u32, Vec<String>)> = (0..8).map(|i| (i, vec![pcr(&out, i)])).collect();
    pins.push((9, vec![pcr9]));
    world.serve(vec![world.measurement.clone()], pins);
    let (status, out) = world.boot("state", &platform, &initrd, &cmdline);
    assert_eq!(status, Some(0), "second boot:\n{out}");
    assert!(out.contains("attest: released"), "{out}");
    assert!(out.contains(&format!("read: {TENANT_TEXT}")), "{out}");

    // Neither the disk image nor anything else in the state holds the file's text: the
    // guest's LUKS and, under it, the storage service's own encryption.
    for entry in std::fs::read_dir(world.dir.join("state")).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                !bytes
                    .windows(TENANT_TEXT.len())
                    .any(|w| w == TENANT_TEXT.as_bytes()),
                "{} holds the tenant's text in clear",
                path.display()
            );
        }
    }
}

/// The refusals script: what /init's attestation said, then hostile exchanges driven step by
/// step through the client's functions, then (once the test changed the policy) a plain
/// attempt until the broker names the measurement.
const REFUSALS: &str = r#"
echo "attest: $(cat /run/pv/attest)"
echo "disk: $(cat /run/pv/disk)"
[ -e /dev/mapper/pvdata ] && echo "MAPPED" || echo "disk stays locked"
PV_ATTEST_LIB=1 . /usr/sbin/pv-attest
KBS="$(sed -n 's/.*pv\.kbs=\([^ ]*\).*/\1/p' /proc/cmdline)"
step() { ( "$@" ) 2>&1; echo "status $?"; }
# A genuine exchange's evidence kept, then its quote sent again with a fresh nonce.
step pv-attest --kbs "$KBS" --secret-out /tmp/s1 --work /tmp/w1 | sed 's/^/first: /'
echo "replayed quote:"
step sh -c "PV_ATTEST_LIB=1 . /usr/sbin/pv-attest
    pv_args --kbs $KBS --secret-out /tmp/s2 --work /tmp/w2
    pv_setup; pv_challenge; pv_read_evidence; pv_transfer_key; pv_certify; pv_quote
    cp /tmp/w1/quote.msg /tmp/w1/quote.sig /tmp/w1/quote.pcrs \"\$PV_WORK\"/
    pv_request; pv_send; pv_reply; pv_unwrap"
# A restricted signing key of the same TPM that is not the bound AK.
tpm2_createprimary -Q -C o -G rsa2048:rsassa-sha256:null \
    -a 'fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign' -c /tmp/other.ctx
tpm2_evictcontrol -Q -C o -c /tmp/other.ctx 0x81000004 >/dev/null
tpm2_flushcontext -t
echo "not the AK:"
step pv-attest --kbs "$KBS" --secret-out /tmp/s3 --ak 0x81000004
echo "PHASE measurement"
n=0
while [ $n -lt 60 ]; do
    out="$(pv-attest --kbs "$KBS" --secret-out /tmp/s4 2>&1)"
    case "$out" in *"refused: measurement"*) echo "unlisted: $out"; break ;; esac
    n=$((n + 1)); sleep 1
done
ls /tmp/s1 /tmp/s2 /tmp/s3 /tmp/s4 2>&1
exit 0
"#;

#[test]
fn the_broker_refuses_a_changed_initrd_a_replayed_quote_another_key_an_unlisted_paravisor_and_another_platform(
) {
    let test = "the_broker_refuses_a_changed_initrd_a_replayed_quote_another_key_an_unlisted_paravisor_and_another_platform";
    let Some(image) = ready(test) else { return };
    let mut world = World::new("cvm-no", &image);
    let cmdline = cvm::guest_cmdline(true);
    let platform = common::test_platform_dir();
    // The tenant pinned the initrd it built (the happy script); the guest boots another.
    let (_, pinned) = world.initrd("pinned.img", HAPPY, &cmdline);
    let (changed, changed_pcr9) = world.initrd("changed.img", REFUSALS, &cmdline);
    assert_ne!(pinned, changed_pcr9);
    world.serve(vec![world.measurement.clone()], vec![(9, vec![pinned])]);
    let mut run = {
        let mut cmd = cvm::run_command(
            &common::paravisor(),
            &world.manifest,
            &world.dir.join("state"),
            &platform,
            &image.kernel,
            &changed,
            &cmdline,
            &world.network,
        );
        let console = world.dir.join("refusals.console");
        cmd.stdout(std::fs::File::create(&console).unwrap())
            .stderr(std::fs::File::create(world.dir.join("refusals.log")).unwrap())
            .stdin(std::process::Stdio::null());
        (common::spawn_of(&mut cmd), console)
    };
    // Once the hostile exchanges are done, the tenant drops the paravisor's measurement from
    // the policy (PCR 9 pinned to the initrd that runs, so only the measurement is wrong).
    let until = std::time::Instant::now() + QUIET;
    while !std::fs::read_to_string(&run.1)
        .unwrap_or_default()
        .contains("PHASE measurement")
    {
        assert!(
            std::time::Instant::now() < until && run.0.try_wait().unwrap().is_none(),
            "no PHASE line:\n{}\n{}",
            std::fs::read_to_string(&run.1).unwrap_or_default(),
            world.broker.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    world.serve(vec!["00".repeat(48)], vec![(9, vec![changed_pcr9.clone()])]);
    let status = wait_quietly(&mut run.0, &run.1);
    let out = format!(
        "{}\n--- paravisor ---\n{}\n--- broker ---\n{}",
        std::fs::read_to_string(&run.1).unwrap_or_default(),
        std::fs::read_to_string(world.dir.join("refusals.log")).unwrap_or_default(),
        world.broker.log()
    );
    assert_eq!(status, Some(0), "{out}");
    // The changed initrd: /init's attestation refused on PCR 9, the disk left locked.
    assert!(out.contains("attest: refused pcr-policy"), "{out}");
    assert!(out.contains("disk: locked"), "{out}");
    assert!(out.contains("disk stays locked"), "{out}");
    for (what, check) in [
        ("first: ", "pcr-policy"),
        ("replayed quote:", "quote-nonce"),
        ("not the AK:", "quote-signature"),
        ("unlisted: ", "measurement"),
    ] {
        let at = out
            .find(what)
            .unwrap_or_else(|| panic!("no {what:?}:\n{out}"));
        let after = &out[at..];
        assert!(
            after.contains(&format!("refused: {check}")),
            "{what} not refused by {check}:\n{out}"
        );
    }
    for s in ["/tmp/s1", "/tmp/s2", "/tmp/s3", "/tmp/s4"] {
        assert!(
            out.contains(&format!("{s}: No such file")),
            "{s} was written:\n{out}"
        );
    }

    // A report from another simulated platform: its chain does not lead to the ARK the
    // tenant pinned.
    let other = world.dir.join("other-platform");
    world.serve(
        vec![world.measurement.clone()],
        vec![(9, vec![changed_pcr9])],
    );
    let (_, out) = world.boot("state-other", &other, &changed, &cmdline);
    assert!(out.contains("attest: refused report"), "{out}");
    assert!(out.contains("disk: locked"), "{out}");
}
