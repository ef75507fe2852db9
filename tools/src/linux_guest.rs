//! The Linux guest that benchmarks and tests boot under QEMU: Debian's cloud kernel and a
//! busybox initramfs with fio, built by `tests/linux/build-image.sh` (docs/linux-harness.md),
//! with a script and other files appended to the initramfs as a second cpio archive, and the
//! QEMU command line every such guest shares (guest RAM in a shared memfd, so vhost-user back
//! ends can map it).
//!
//! This is the harness's general half; `tests/tests/common/linux.rs` (the test-side builder,
//! which panics with the console on failure) and `bench storage` both use it. [`Running`]
//! follows a booted guest's console for a benchmark (errors, not panics).

use std::io::BufRead;
use std::io::BufReader;
use std::io::Write;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Instant;

/// The line the image's `/init` prints after the script, with the script's exit status.
pub const EXIT_MARKER: &str = "PV-EXIT ";

/// Linux's command line: the console on the first serial port (QEMU's stdout), quiet so
/// that kernel messages do not break the script's lines (warnings and panics still print),
/// and a panic reboots, which `-no-reboot` turns into QEMU's exit.
pub const KERNEL_ARGS: &str = "console=ttyS0 quiet loglevel=4 panic=-1";

/// Where the script that builds the image is, for a `pv-tools` built from this repository.
pub const BUILD_SCRIPT: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/linux/build-image.sh");

/// The kernel and initramfs built by `tests/linux/build-image.sh`.
#[derive(Clone, Debug)]
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Why there is no image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// This machine cannot build or boot it (no QEMU, no apt, no Debian mirror and nothing
    /// cached): a test skips, a benchmark says so.
    #[error("{0}")]
    Unavailable(String),
    /// The build script failed or printed something else than two paths: a bug.
    #[error("{0}")]
    Failed(String),
}

/// Runs the image-building `script` (cached: ~2 s when nothing changed) and returns the
/// paths it printed.
pub fn build_image(script: &Path) -> Result<Image, ImageError> {
    if !runs("qemu-system-x86_64") {
        return Err(ImageError::Unavailable(
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into(),
        ));
    }
    if !script.is_file() {
        return Err(ImageError::Unavailable(format!(
            "{} is not there: no script to build the Linux guest image with",
            script.display()
        )));
    }
    let out = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            ImageError::Unavailable(format!("cannot run bash {}: {e}", script.display()))
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => {}
        // The script's "this machine cannot build the image" (see its header).
        Some(2) => {
            let why = stderr.lines().last().unwrap_or("no reason given");
            return Err(ImageError::Unavailable(format!(
                "cannot build the Linux guest image: {why}"
            )));
        }
        _ => {
            return Err(ImageError::Failed(format!(
                "{} failed ({}):\n{stderr}{stdout}",
                script.display(),
                out.status
            )))
        }
    }
    let mut paths = stdout.lines().rev().take(2).map(PathBuf::from);
    let (initrd, kernel) = (paths.next(), paths.next());
    match (kernel, initrd) {
        (Some(kernel), Some(initrd)) if kernel.is_file() && initrd.is_file() => {
            Ok(Image { kernel, initrd })
        }
        (kernel, initrd) => Err(ImageError::Failed(format!(
            "{} printed {kernel:?} and {initrd:?} as its last lines, which are not files:\n{stdout}",
            script.display()
        ))),
    }
}

/// Whether `program --version` runs.
pub fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// How QEMU runs the guest's CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// QEMU's translator: slow but boots anywhere (~2.5 s to the script here).
    Tcg,
    /// KVM, where it can boot Linux (not on this project's KVM-on-PVM machines, where a stock
    /// kernel stalls in early boot).
    Kvm,
}

impl Accel {
    /// `PV_QEMU_ACCEL`: `tcg` (the default) or `kvm`.
    pub fn from_env() -> Result<Accel, String> {
        match std::env::var("PV_QEMU_ACCEL").as_deref() {
            Err(_) | Ok("") | Ok("tcg") => Ok(Accel::Tcg),
            Ok("kvm") => Ok(Accel::Kvm),
            Ok(other) => Err(format!("PV_QEMU_ACCEL={other}: expected tcg or kvm")),
        }
    }

    /// `-accel` and the CPU model: under TCG QEMU's default model (`-cpu max` boots 0.35 s
    /// slower), under KVM the host's.
    pub fn args(self) -> &'static [&'static str] {
        match self {
            Accel::Tcg => &["-accel", "tcg"],
            Accel::Kvm => &["-accel", "kvm", "-cpu", "host"],
        }
    }
}

/// The machine every guest gets; devices are added to the [`qemu_command`].
#[derive(Clone, Debug)]
pub struct Machine<'a> {
    pub image: &'a Image,
    /// The initramfs to boot: the image's, or a copy with files appended ([`initrd_with`]).
    pub initrd: &'a Path,
    pub memory_mib: u64,
    pub cpus: u32,
    pub accel: Accel,
    /// Linux's command line ([`KERNEL_ARGS`] and whatever the caller adds).
    pub kernel_args: &'a str,
}

/// QEMU's command line for `machine`, without devices: no defaults, the console on stdio,
/// `-no-reboot` (a kernel panic ends QEMU), q35 with its RAM in a shared memfd
/// (`memory-backend-memfd,share=on`: vhost-user back ends map it).
pub fn qemu_command(machine: &Machine) -> Command {
    let mib = machine.memory_mib;
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-no-reboot")
        .args(machine.accel.args())
        .args(["-machine", "q35,memory-backend=mem"])
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mib}M,share=on"))
        .arg("-m")
        .arg(format!("{mib}M"))
        .arg("-smp")
        .arg(machine.cpus.to_string())
        .arg("-kernel")
        .arg(&machine.image.kernel)
        .arg("-initrd")
        .arg(machine.initrd)
        .arg("-append")
        .arg(machine.kernel_args)
        .args(["-serial", "stdio"]);
    cmd
}

/// A file the guest finds in its initramfs, next to the image's own.
#[derive(Clone, Debug)]
pub struct GuestFile {
    /// Relative to `/`, e.g. `pv/test.sh` (the script `/init` runs).
    pub path: String,
    pub contents: Vec<u8>,
    pub mode: u32,
}

impl GuestFile {
    /// The script `/init` runs (busybox sh); its exit status follows [`EXIT_MARKER`].
    pub fn script(text: &str) -> GuestFile {
        GuestFile {
            path: "pv/test.sh".into(),
            contents: text.as_bytes().to_vec(),
            mode: 0o755,
        }
    }
}

/// Writes to `to` the image's initramfs `from` with `files` appended as a second archive
/// (Linux unpacks concatenated archives in turn, later files over earlier ones). A copy, not
/// a link: QEMU loads one file.
pub fn initrd_with(from: &Path, files: &[GuestFile], to: &Path) -> std::io::Result<()> {
    std::fs::copy(from, to)?;
    let mut file = std::fs::OpenOptions::new().append(true).open(to)?;
    // Linux looks for an uncompressed archive only at a 4-byte boundary.
    let len = file.metadata()?.len();
    let pad = (4 - len % 4) % 4;
    file.write_all(&[0; 3][..pad as usize])?;
    file.write_all(&cpio_newc(files)?)
}

/// An uncompressed cpio archive (the "newc" format Linux's initramfs reads) of `files`,
/// with each file's directories before it, all owned by root.
pub fn cpio_newc(files: &[GuestFile]) -> std::io::Result<Vec<u8>> {
    fn entry(
        out: &mut Vec<u8>,
        ino: &mut u32,
        name: &str,
        mode: u32,
        data: &[u8],
    ) -> std::io::Result<()> {
        *ino += 1;
        let name_size = name.len() + 1;
        let too_large = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{what} of guest file {name} does not fit a cpio header"),
            )
        };
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
        // namesize check, each eight hex digits.
        let fields = [
            *ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).map_err(|_| too_large("the size"))?,
            0,
            0,
            0,
            0,
            u32::try_from(name_size).map_err(|_| too_large("the name"))?,
            0,
        ];
        out.extend_from_slice(b"070701");
        for field in fields {
            out.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        // The name, after the 110-byte header, and the data each end on a 4-byte boundary.
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
        Ok(())
    }
    const DIR: u32 = 0o040_000;
    const FILE: u32 = 0o100_000;
    let mut out = Vec::new();
    let mut ino = 0;
    let mut dirs: Vec<&str> = Vec::new();
    for file in files {
        let parents = file.path.match_indices('/').map(|(at, _)| &file.path[..at]);
        for dir in parents {
            if !dirs.contains(&dir) {
                dirs.push(dir);
                entry(&mut out, &mut ino, dir, DIR | 0o755, &[])?;
            }
        }
        entry(
            &mut out,
            &mut ino,
            &file.path,
            FILE | file.mode,
            &file.contents,
        )?;
    }
    entry(&mut out, &mut ino, "TRAILER!!!", 0, &[])?;
    Ok(out)
}

/// A booted guest (QEMU's process) and its console, line by line; QEMU is killed when this is
/// dropped.
pub struct Running {
    child: Child,
    /// The console's input (a script waits for a line with `read -t N LINE`).
    stdin: Option<std::process::ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Every console line so far.
    console: Vec<String>,
    /// Lines before this one were looked at by an earlier [`Running::line_with`].
    cursor: usize,
    /// QEMU's own messages (its stderr).
    qemu_log: PathBuf,
}

impl Running {
    /// Starts `cmd` (a [`qemu_command`] with devices) with its stderr in `qemu_log`. Console
    /// lines that start with `progress` are echoed to this process's stderr.
    pub fn spawn(
        mut cmd: Command,
        qemu_log: &Path,
        progress: &'static str,
    ) -> std::io::Result<Running> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(qemu_log)?)
            .spawn()
            .map_err(|e| {
                let program = cmd.get_program().to_string_lossy().into_owned();
                std::io::Error::new(e.kind(), format!("{program}: {e}"))
            })?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("QEMU's stdout"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut raw = Vec::new();
            while reader.read_until(b'\n', &mut raw).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&raw);
                let line = line.trim_end_matches(['\n', '\r']).to_owned();
                if line.starts_with(progress) {
                    eprintln!("{line}");
                }
                if tx.send(line).is_err() {
                    return;
                }
                raw.clear();
            }
        });
        Ok(Running {
            stdin: child.stdin.take(),
            child,
            lines,
            console: Vec::new(),
            cursor: 0,
            qemu_log: qemu_log.to_path_buf(),
        })
    }

    /// The next console line containing `needle` after the one the last call found; an error
    /// with the console's end when `deadline` passes or the guest ends first.
    pub fn line_with(&mut self, needle: &str, deadline: Instant) -> std::io::Result<String> {
        loop {
            let line = self.next_line(deadline).map_err(|why| {
                self.failure(&format!("{why} before a console line with {needle:?}"))
            })?;
            if line.contains(needle) {
                return Ok(line);
            }
        }
    }

    /// The console line after the last one returned, as soon as it is there; `Err` (with
    /// why) when `deadline` passes or the guest ends first.
    pub fn next_line(&mut self, deadline: Instant) -> Result<String, &'static str> {
        if self.cursor == self.console.len() {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(wait) {
                Ok(line) => self.console.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => return Err("timed out"),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err("the guest ended"),
            }
        }
        self.cursor += 1;
        Ok(self.console[self.cursor - 1].clone())
    }

    /// Types `line` on the guest's console.
    pub fn send_line(&mut self, line: &str) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the console's input is closed"))?;
        stdin.write_all(format!("{line}\n").as_bytes())?;
        stdin.flush()
    }

    /// The script's exit status from the [`EXIT_MARKER`] line (then QEMU powers off).
    pub fn exit_status(&mut self, deadline: Instant) -> std::io::Result<i32> {
        let line = self.line_with(EXIT_MARKER, deadline)?;
        let status = line
            .split(EXIT_MARKER)
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| self.failure(&format!("a malformed exit line {line:?}")))?;
        let _ = self.child.wait();
        Ok(status)
    }

    /// Every console line received so far.
    pub fn console(&self) -> &[String] {
        &self.console
    }

    /// An error saying `why`, with the last console lines and QEMU's messages.
    pub fn failure(&self, why: &str) -> std::io::Error {
        let tail = &self.console[self.console.len().saturating_sub(30)..];
        let qemu = std::fs::read_to_string(&self.qemu_log).unwrap_or_default();
        std::io::Error::other(format!(
            "{why}; the guest's console ends:\n{}\nQEMU said:\n{qemu}",
            tail.join("\n")
        ))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpio_archive_holds_each_file_after_its_directories_and_ends_with_the_trailer() {
        let archive = cpio_newc(&[GuestFile {
            path: "pv/test.sh".into(),
            contents: b"echo hi\n".to_vec(),
            mode: 0o755,
        }])
        .unwrap();
        let text = String::from_utf8_lossy(&archive);
        let at = |needle: &str| text.find(needle).unwrap_or_else(|| panic!("{needle}"));
        assert!(at("pv\0") < at("pv/test.sh\0"));
        assert!(at("pv/test.sh\0") < at("echo hi\n"));
        assert!(at("echo hi\n") < at("TRAILER!!!\0"));
        assert_eq!(archive.len() % 4, 0);
        // Every header starts on a 4-byte boundary with the newc magic.
        let mut headers = 0;
        let mut i = 0;
        while let Some(off) = text[i..].find("070701") {
            assert_eq!((i + off) % 4, 0, "header at {}", i + off);
            headers += 1;
            i += off + 6;
        }
        assert_eq!(headers, 3, "directory, file, trailer");
        // The directory's mode: a directory, 0755.
        assert_eq!(&archive[14..22], b"000041ed");
    }
}
