//! A Linux guest for the tests: Debian's cloud kernel and a busybox initramfs with fio
//! (built by `tests/linux/build-image.sh`), booted by QEMU with a test script, its result read
//! from the console. Devices are added as QEMU arguments: vhost-user disks have builder
//! methods, anything else (a NIC, a TPM) goes in through [`Guest::extra_args`].
//!
//! ```ignore
//! let Some(image) = linux::image(test) else { return };
//! let exit = Guest::new(&image).script("uname -r").run();
//! assert_eq!(exit.status, 0, "{}", exit.console);
//! ```
//!
//! QEMU runs under TCG unless `PV_QEMU_ACCEL=kvm`: the KVM of the machines this project runs
//! on (KVM on PVM) does not boot a stock Linux kernel (it stalls in early boot), so KVM is only
//! tried when asked for. See docs/linux-harness.md. The image, QEMU's base command line and
//! the cpio writer are `pv_tools::linux_guest`'s (`bench storage` boots the same guest); this
//! is the tests' builder on top, which panics with the console on failure.

use std::io::BufRead;
use std::io::BufReader;
use std::io::Read;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::Condvar;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::Duration;
use std::time::Instant;

pub use pv_tools::linux_guest::Accel;
use pv_tools::linux_guest::GuestFile;
pub use pv_tools::linux_guest::Image;
use pv_tools::linux_guest::EXIT_MARKER;
use pv_tools::linux_guest::KERNEL_ARGS;

/// Guest memory unless a test asks for more: fio and the 90 MB initramfs fit with room.
const DEFAULT_MEMORY_MIB: u64 = 512;

/// How long a guest may run unless a test says otherwise: only there to end a hung guest (a
/// boot takes ~2.5 s under TCG), so generous for a busy two-core machine.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The guest image, built (or found in the cache) once per test process; `None`, after a
/// loud SKIPPED line naming `test`, when this machine cannot build or boot it (no QEMU, no
/// apt, no Debian mirror and nothing cached). A failure of the build script itself panics.
pub fn image(test: &str) -> Option<Image> {
    static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
    match IMAGE.get_or_init(build_image) {
        Ok(image) => Some(image.clone()),
        Err(reason) => {
            eprintln!("SKIPPED: {test}: {reason}");
            None
        }
    }
}

/// The image for a guest booted by QEMU under UEFI (Debian's OVMF), or a SKIPPED line for
/// what is missing: the image, QEMU, the firmware or a program in `more` (path, package).
pub fn uefi_image(test: &str, more: &[(&str, &str)]) -> Option<Image> {
    let needed = [
        ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
        ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ];
    for (path, package) in needed.iter().chain(more) {
        if !Path::new(path).exists() {
            eprintln!("SKIPPED: {test}: no {path} (apt-get install {package})");
            return None;
        }
    }
    image(test)
}

fn build_image() -> Result<Image, String> {
    use pv_tools::linux_guest::ImageError;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("linux/build-image.sh");
    let started = Instant::now();
    let image = match pv_tools::linux_guest::build_image(&script) {
        Ok(image) => image,
        Err(ImageError::Unavailable(reason)) => return Err(reason),
        Err(ImageError::Failed(why)) => panic!("{why}"),
    };
    eprintln!(
        "linux image: {} and {} ({:.1} s)",
        image.kernel.display(),
        image.initrd.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(image)
}

/// A guest to boot: the builder of QEMU's command line and of the test's files.
pub struct Guest {
    image: Image,
    memory_mib: u64,
    cpus: u32,
    accel: Accel,
    kernel_args: String,
    devices: Vec<String>,
    files: Vec<GuestFile>,
    timeout: Duration,
    /// For chardev ids: every device gets its own.
    next_id: u32,
}

impl Guest {
    pub fn new(image: &Image) -> Guest {
        Guest {
            image: image.clone(),
            memory_mib: DEFAULT_MEMORY_MIB,
            cpus: 1,
            accel: Accel::from_env().unwrap_or_else(|e| panic!("{e}")),
            kernel_args: KERNEL_ARGS.to_owned(),
            devices: Vec::new(),
            files: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            next_id: 0,
        }
    }

    /// Guest RAM in MiB (512 unless set). It is always a shared memfd, as vhost-user needs.
    pub fn memory_mib(mut self, mib: u64) -> Guest {
        self.memory_mib = mib;
        self
    }

    /// Virtual CPUs (1 unless set; Linux finds more through ACPI, which q35 has).
    pub fn smp(mut self, cpus: u32) -> Guest {
        self.cpus = cpus;
        self
    }

    /// Overrides `PV_QEMU_ACCEL` for this guest.
    pub fn accel(mut self, accel: Accel) -> Guest {
        self.accel = accel;
        self
    }

    /// More of Linux's command line (it also reaches `/init` as `/proc/cmdline`).
    pub fn kernel_args(mut self, args: &str) -> Guest {
        self.kernel_args.push(' ');
        self.kernel_args.push_str(args);
        self
    }

    /// A virtio-blk disk served by a vhost-user backend listening on `socket`. With
    /// `reconnect`, QEMU reconnects to a backend that died and was started again on the same
    /// socket (the guest sees I/O stall, not fail; requests in flight are sent again).
    pub fn vhost_user_blk(mut self, socket: &Path, reconnect: bool) -> Guest {
        let id = self.id("vublk");
        let reconnect = if reconnect { ",reconnect=1" } else { "" };
        self.devices.extend([
            "-chardev".into(),
            format!("socket,id={id},path={}{reconnect}", socket.display()),
            "-device".into(),
            format!("vhost-user-blk-pci,chardev={id}"),
        ]);
        self
    }

    /// A virtio-scsi controller served by a vhost-user backend listening on `socket`. QEMU 7.2
    /// cannot reconnect this device (with `reconnect=` it fails to start), so there is no such
    /// choice here. Its disks are found asynchronously: wait with `pv_wait_dev /dev/sda`.
    pub fn vhost_user_scsi(mut self, socket: &Path) -> Guest {
        let id = self.id("vuscsi");
        self.devices.extend([
            "-chardev".into(),
            format!("socket,id={id},path={}", socket.display()),
            "-device".into(),
            format!("vhost-user-scsi-pci,chardev={id}"),
        ]);
        self
    }

    /// A virtio-net NIC served by a vhost-user-net back end listening on `socket`. QEMU 7.2's
    /// vhost-user-net works only without MSI-X (`vectors=0`; with vectors it crashes). With
    /// `reconnect`, QEMU reconnects to a back end started again on the same socket.
    /// `status=off`: QEMU's vhost-user netdev marks its link down while the back end is gone,
    /// which a guest that negotiated VIRTIO_NET_F_STATUS sees as a carrier flap on every
    /// restart; without it the guest's link stays up (packets in between are just lost).
    pub fn vhost_user_net(mut self, socket: &Path, reconnect: bool) -> Guest {
        let id = self.id("vunet");
        let reconnect = if reconnect { ",reconnect=1" } else { "" };
        self.devices.extend([
            "-chardev".into(),
            format!("socket,id={id},path={}{reconnect}", socket.display()),
            "-netdev".into(),
            format!("vhost-user,id={id}n,chardev={id}"),
            "-device".into(),
            format!("virtio-net-pci,netdev={id}n,vectors=0,status=off"),
        ]);
        self
    }

    /// A TPM 2.0 with the CRB interface (q35's), whose back end speaks swtpm's control
    /// protocol on the Unix socket `socket`: our vTPM's `swtpm-control-unix` front end, or
    /// swtpm itself. The guest's built-in driver makes /dev/tpm0 and /dev/tpmrm0, which the
    /// image's tpm2-tools use; the firmware (SeaBIOS) measures the boot into PCRs 0-7 first.
    pub fn tpm_crb(mut self, socket: &Path) -> Guest {
        let id = self.id("tpm");
        self.devices.extend([
            "-chardev".into(),
            format!("socket,id={id}c,path={}", socket.display()),
            "-tpmdev".into(),
            format!("emulator,id={id},chardev={id}c"),
            "-device".into(),
            format!("tpm-crb,tpmdev={id}"),
        ]);
        self
    }

    /// Any other QEMU arguments (a NIC, a TPM, `-cpu max`), after the harness's own.
    pub fn extra_args<I, S>(mut self, args: I) -> Guest
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.devices.extend(args.into_iter().map(Into::into));
        self
    }

    /// The test script, run by `/init` with busybox sh; its exit status is the guest's
    /// [`GuestExit::status`]. It can call `pv_wait_dev PATH [SECONDS]` to wait for a device.
    pub fn script(self, text: &str) -> Guest {
        self.file("pv/test.sh", text.as_bytes(), 0o755)
    }

    /// A file at `path` (relative to `/`) in the guest, e.g. a fio job file.
    pub fn file(mut self, path: &str, contents: &[u8], mode: u32) -> Guest {
        self.files.push(GuestFile {
            path: path.trim_start_matches('/').to_owned(),
            contents: contents.to_vec(),
            mode,
        });
        self
    }

    /// How long the guest may run before it is killed as hung (600 s unless set).
    pub fn timeout(mut self, timeout: Duration) -> Guest {
        self.timeout = timeout;
        self
    }

    fn id(&mut self, kind: &str) -> String {
        self.next_id += 1;
        format!("{kind}{}", self.next_id)
    }

    /// QEMU's command line, for a test's failure message or to run it by hand.
    pub fn command(&self, initrd: &Path) -> Command {
        let mut cmd = pv_tools::linux_guest::qemu_command(&pv_tools::linux_guest::Machine {
            image: &self.image,
            initrd,
            memory_mib: self.memory_mib,
            cpus: self.cpus,
            accel: self.accel,
            kernel_args: &self.kernel_args,
        });
        cmd.args(&self.devices);
        cmd
    }

    /// Boots the guest: the image's initramfs with the test's files appended as a second
    /// archive (Linux unpacks concatenated archives in turn, later files over earlier ones).
    pub fn spawn(self) -> RunningGuest {
        let dir = super::scratch_dir("linux");
        let initrd = dir.join("initrd.img");
        pv_tools::linux_guest::initrd_with(&self.image.initrd, &self.files, &initrd)
            .expect("the initrd with the test's files");

        let mut cmd = self.command(&initrd);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        let console = Arc::new(Console::default());
        let stdin = child.stdin.take();
        let readers = vec![
            echo_lines(child.stdout.take().expect("stdout"), "guest| ", {
                let console = console.clone();
                move |line| console.push(line)
            }),
            echo_lines(child.stderr.take().expect("stderr"), "qemu| ", {
                let console = console.clone();
                move |line| console.lock().qemu.push(line)
            }),
        ];
        RunningGuest {
            child,
            stdin,
            console,
            readers,
            dir,
            started,
            timeout: self.timeout,
            cursor: 0,
            command: format!("{cmd:?}"),
        }
    }

    /// [`Guest::spawn`] and [`RunningGuest::wait`].
    pub fn run(self) -> GuestExit {
        self.spawn().wait()
    }
}

/// Reads `from` line by line on a thread of its own, echoing each line to stderr after
/// `prefix` (captured with the test's output) and handing it to `keep`.
fn echo_lines(
    from: impl Read + Send + 'static,
    prefix: &'static str,
    mut keep: impl FnMut(String) + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut raw = Vec::new();
        while reader.read_until(b'\n', &mut raw).is_ok_and(|n| n > 0) {
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']).to_owned();
            eprintln!("{prefix}{line}");
            keep(line);
            raw.clear();
        }
    })
}

/// What the guest and QEMU printed so far.
#[derive(Default)]
struct Console {
    state: Mutex<ConsoleState>,
    /// Signalled on every console line.
    grew: Condvar,
}

#[derive(Default)]
struct ConsoleState {
    /// The guest's console (QEMU's stdout), line by line.
    lines: Vec<String>,
    /// When the `PV-EXIT` line came.
    exited_at: Option<Instant>,
    /// QEMU's own messages (its stderr).
    qemu: Vec<String>,
}

impl Console {
    fn lock(&self) -> std::sync::MutexGuard<'_, ConsoleState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: String) {
        let mut state = self.lock();
        if line.contains(EXIT_MARKER) {
            state.exited_at = Some(Instant::now());
        }
        state.lines.push(line);
        self.grew.notify_all();
    }
}

/// A booted guest, killed when dropped.
pub struct RunningGuest {
    child: Child,
    /// The serial console's input (the guest's script reads it with `read`).
    stdin: Option<std::process::ChildStdin>,
    console: Arc<Console>,
    readers: Vec<JoinHandle<()>>,
    dir: PathBuf,
    started: Instant,
    timeout: Duration,
    /// Lines before this one were looked at by an earlier [`RunningGuest::wait_for_line`].
    cursor: usize,
    command: String,
}

/// How a guest ended.
#[derive(Debug)]
pub struct GuestExit {
    /// The test script's exit status, from `/init`'s `PV-EXIT` line.
    pub status: i32,
    /// Everything the guest printed on its console.
    pub console: String,
    /// From QEMU's start to the `PV-EXIT` line: boot, modules and the test script.
    pub elapsed: Duration,
}

impl RunningGuest {
    /// QEMU's process id (to signal it, or to find its threads).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The guest's console so far.
    pub fn console(&self) -> String {
        self.console.lock().lines.join("\n")
    }

    /// Waits for a console line containing `needle` that comes after the line an earlier
    /// call found, and returns it; so successive calls follow the guest's output in order.
    /// Panics, with the console, after `timeout` or when QEMU ends first.
    /// Types `line` on the guest's console (a script waits for it with `read -t N LINE`).
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the console's input is open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .expect("write to the guest's console");
    }

    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut state = self.console.lock();
        loop {
            if let Some(at) = state.lines[self.cursor..]
                .iter()
                .position(|l| l.contains(needle))
            {
                self.cursor += at + 1;
                return state.lines[self.cursor - 1].clone();
            }
            let now = Instant::now();
            let ended = state.exited_at.is_some() || self.readers.iter().all(|r| r.is_finished());
            if now >= deadline || ended {
                drop(state);
                let why = if ended {
                    "the guest ended"
                } else {
                    "timed out"
                };
                panic!(
                    "no console line with {needle:?} ({why} after {:?}):\n{}",
                    self.started.elapsed(),
                    self.transcript()
                );
            }
            // Woken by each line; the short period also notices QEMU's end.
            let wait = (deadline - now).min(Duration::from_millis(200));
            state = self
                .console
                .grew
                .wait_timeout(state, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for QEMU to end (the guest powers off after its script) and returns the
    /// script's status. Panics, with the console, if the guest outlives its timeout or ends
    /// without a `PV-EXIT` line (a kernel panic, a crash of QEMU).
    pub fn wait(mut self) -> GuestExit {
        let deadline = self.started + self.timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for qemu") {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the guest still ran after {:?}:\n{}",
                    self.timeout,
                    self.transcript()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        let state = self.console.lock();
        let exit_status = state
            .lines
            .iter()
            .rev()
            .find_map(|l| l.split(EXIT_MARKER).nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok());
        let console = state.lines.join("\n");
        let elapsed = state.exited_at.unwrap_or_else(Instant::now) - self.started;
        drop(state);
        match exit_status {
            Some(status) => GuestExit {
                status,
                console,
                elapsed,
            },
            None => panic!(
                "the guest ended ({status}) without a {EXIT_MARKER:?} line:\n{}",
                self.transcript()
            ),
        }
    }

    /// QEMU's command line, the console and QEMU's messages, for a failure message.
    fn transcript(&self) -> String {
        let state = self.console.lock();
        format!(
            "{}\n--- console ---\n{}\n--- qemu ---\n{}",
            self.command,
            state.lines.join("\n"),
            state.qemu.join("\n")
        )
    }
}

impl Drop for RunningGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `qemu-storage-daemon` runs (it comes with qemu-system-x86, in
/// qemu-system-common); a loud SKIPPED line for `test` if not.
pub fn storage_daemon_available(test: &str) -> bool {
    let ok = pv_tools::linux_guest::runs("qemu-storage-daemon");
    if !ok {
        eprintln!(
            "SKIPPED: {test}: qemu-storage-daemon is not installed (apt-get install qemu-system-x86)"
        );
    }
    ok
}

/// QEMU's own vhost-user disk server, the reference our storage service is compared with
/// (for correctness and as the performance baseline). Killed when dropped.
pub struct StorageDaemon {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl StorageDaemon {
    /// Serves the raw image file `image` as a writable vhost-user-blk disk on `socket`;
    /// returns once the socket listens.
    pub fn vhost_user_blk(image: &Path, socket: &Path) -> StorageDaemon {
        let _ = std::fs::remove_file(socket);
        let log = socket.with_extension("log");
        let log_file = std::fs::File::create(&log).expect("storage daemon log");
        let mut child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.display()
            ))
            .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("storage daemon log"))
            .stderr(log_file)
            .spawn()
            .expect("run qemu-storage-daemon");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(status) = child.try_wait().expect("wait for qemu-storage-daemon") {
                panic!("qemu-storage-daemon ended ({status}):\n{}", read_log());
            }
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon made no {} in 30 s:\n{}",
                socket.display(),
                read_log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        StorageDaemon {
            child,
            socket: socket.to_path_buf(),
            log,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the daemon printed.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for StorageDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
