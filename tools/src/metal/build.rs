//! `paravisor metal build`: the metal image from `manifest.toml`.
//!
//! 1. the manifest is validated (the same code as `paravisor check`) and its `[[metal.task]]`
//!    laid out as a task table ([`MetalPlan`], the same code `check` runs);
//! 2. the programs are built with cargo, in the repository this tool was built from, for the
//!    host target without SSE, statically, without a C runtime (`task.ld` links them at
//!    `IMAGE_BASE`), and each image is checked as the kernel will check it;
//! 3. the table with the images is encoded next to the output (`IMAGE.tasks`), and the
//!    kernel is built with `PV_METAL_TABLE` naming it (it includes it in `.pv_tasks`);
//! 4. the kernel image is written to the output, after checking that it carries exactly
//!    that table.
//!
//! Both cargo builds share their flags and target directory (`target/metal`), so every
//! dependency is built once; `--target` is explicit so that the flags never reach build
//! scripts and proc macros. Symbols are kept (`strip = "debuginfo"`): the defmt decoder
//! finds the kernel's format strings through them.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use microkernel::manifest::Diagnostic;
use microkernel::manifest::HostedOnly;
use microkernel::manifest::Manifest;
use microkernel::manifest::ManifestError;
use microkernel::metal::MetalPlan;
use microkernel::metal::PlanError;

/// The target the kernel and the tasks are built for: the host's, whose standard library is
/// installed (there is no `x86_64-unknown-none` here), made freestanding by [`RUSTFLAGS`].
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// Where cargo takes [`RUSTFLAGS`] from for [`TARGET`] only (not for build scripts).
pub const RUSTFLAGS_VAR: &str = "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS";
/// Freestanding code at fixed addresses: no position independence (the linker scripts place
/// it), the small code model (everything under 2 GiB), no red zone (the kernel takes traps
/// on the same stack), no SSE in our code (ring-0 SSE fails under KVM-on-PVM), and a static
/// link with no C runtime or library. The RustCrypto crates take their constant-time
/// software backends (`aes_backend`, `polyval_backend`: no AES-NI or CLMUL, which need XMM
/// registers), as pv-vmgs asks of a platform that builds it without SSE.
pub const RUSTFLAGS: &str = "-C relocation-model=static -C code-model=small -C no-redzone=yes \
     -C target-feature=-sse,-sse2 -C link-arg=-nostartfiles -C link-arg=-static \
     -C link-arg=-nostdlib -C link-arg=-Wl,--build-id=none \
     --cfg aes_backend=\"soft\" --cfg polyval_backend=\"soft\"";
/// The profile settings of both builds: no unwinding (there is nothing to unwind to), and
/// symbols kept (the defmt table is found by them), debug information stripped.
pub const PROFILE: [&str; 2] = [
    "profile.release.panic=\"abort\"",
    "profile.release.strip=\"debuginfo\"",
];
/// The log level compiled into the kernel and the tasks.
pub const DEFMT_LOG: &str = "info";

/// The package of the task programs, and the kernel's package and binary.
pub const TASKS_PACKAGE: &str = "pv-metal-tasks";
pub const TASKS_DIR: &str = "services/metal";
pub const KERNEL_PACKAGE: &str = "pv-metal";
pub const KERNEL_BIN: &str = "pv-metal-kernel";

/// The repository `pv-tools` was built from: where the programs and the kernel are.
pub fn repository() -> PathBuf {
    let tools = Path::new(env!("CARGO_MANIFEST_DIR"));
    tools.parent().unwrap_or(tools).to_path_buf()
}

/// The target directory of the metal builds (`target/metal` of the repository).
pub fn target_dir() -> PathBuf {
    repository().join("target").join("metal")
}

/// Where `metal build` writes the image unless told otherwise, and where `metal run` and
/// `metal log` look for it.
pub fn default_image() -> PathBuf {
    target_dir().join("pv-metal.elf")
}

/// Why there is no image.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("{path} has no [[metal.task]]: there is nothing to build (add [[metal.task]] tables, as the shipped manifest.toml has)")]
    NoTasks { path: String },
    #[error("cannot run cargo ({0}): `metal build` runs the cargo on PATH (install the Rust toolchain, e.g. with rustup, or put its bin directory on PATH)")]
    CargoMissing(std::io::Error),
    #[error("cannot read the task programs from {path}: {reason}")]
    Package { path: String, reason: String },
    #[error("{}", .0.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("\n"))]
    UnknownPrograms(Vec<Diagnostic>),
    #[error("building {what} failed ({status}); cargo said:\n{output}")]
    Cargo {
        what: String,
        status: String,
        output: String,
    },
    #[error("program \"{program}\" ({path}): {reason}")]
    Image {
        program: String,
        path: String,
        reason: String,
    },
    #[error("the task table cannot be made: {0}")]
    Table(#[from] PlanError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("the kernel {path} {problem}")]
    Kernel { path: String, problem: String },
}

/// What `metal build` made.
#[derive(Debug)]
pub struct Built {
    pub image: PathBuf,
    pub image_bytes: usize,
    pub plan: MetalPlan,
    /// Each program's image bytes, in [`MetalPlan::programs`] order.
    pub program_bytes: Vec<usize>,
    pub table_bytes: usize,
    /// What each service-backed task's service holds that the image leaves out.
    pub hosted_only: Vec<(String, Vec<HostedOnly>)>,
    pub seconds: f64,
}

/// Builds the image of the manifest at `manifest` into `out` (default [`default_image`]);
/// `progress` hears what is being done.
pub fn build(
    manifest: &Path,
    out: Option<&Path>,
    mut progress: impl FnMut(&str),
) -> Result<Built, BuildError> {
    let started = Instant::now();
    let m = Manifest::load(manifest)?;
    if m.metal.is_empty() {
        return Err(BuildError::NoTasks {
            path: manifest.display().to_string(),
        });
    }
    let plan = MetalPlan::new(&m.metal, m.ring_capacity)?;
    let repo = repository();
    let programs = task_programs(&repo.join(TASKS_DIR).join("Cargo.toml"))?;
    let unknown = m.unknown_programs(&programs, TASKS_PACKAGE);
    if !unknown.is_empty() {
        return Err(BuildError::UnknownPrograms(unknown));
    }
    let target = target_dir();
    let out = match out {
        Some(o) => o.to_path_buf(),
        None => default_image(),
    };
    let out = std::path::absolute(&out).map_err(|source| BuildError::Write {
        path: out.display().to_string(),
        source,
    })?;
    if out.extension().is_some_and(|e| e == "tasks") {
        return Err(BuildError::Write {
            path: out.display().to_string(),
            source: std::io::Error::other(
                "the task table goes next to the image as IMAGE.tasks: name the image otherwise, e.g. pv-metal.elf",
            ),
        });
    }

    progress(&format!(
        "building {} ({}) in {}",
        plural(plan.programs.len(), "program"),
        plan.programs.join(", "),
        target.display()
    ));
    let mut args = vec!["-p", TASKS_PACKAGE, "--features", "image"];
    for p in &plan.programs {
        args.extend(["--bin", p.as_str()]);
    }
    cargo(&repo, &target, &args, None, "the task programs")?;
    let release = target.join(TARGET).join("release");
    let mut images = Vec::new();
    for p in &plan.programs {
        let path = release.join(p);
        let bytes = std::fs::read(&path).map_err(|e| BuildError::Image {
            program: p.clone(),
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if let Err(e) = pv_metal::elf::parse(&bytes) {
            return Err(BuildError::Image {
                program: p.clone(),
                path: path.display().to_string(),
                reason: format!("the kernel would refuse this image ({e:?}): is it linked with services/metal/task.ld?"),
            });
        }
        images.push(bytes);
    }
    let slices: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    let table = plan.encode(&slices)?;
    let table_path = out.with_extension("tasks");
    write_if_changed(&table_path, &table)?;

    progress(&format!(
        "building the kernel with its task table ({} bytes, {})",
        table.len(),
        table_path.display()
    ));
    cargo(
        &repo,
        &target,
        &[
            "-p",
            KERNEL_PACKAGE,
            "--features",
            "image",
            "--bin",
            KERNEL_BIN,
        ],
        Some(&table_path),
        "the kernel",
    )?;
    let kernel_path = release.join(KERNEL_BIN);
    let kernel = std::fs::read(&kernel_path).map_err(|e| BuildError::Kernel {
        path: kernel_path.display().to_string(),
        problem: format!("cannot be read: {e}"),
    })?;
    match microkernel::metal::image::tasks_section(&kernel) {
        Ok(Some(section)) if section == table.as_slice() => {}
        Ok(Some(_)) => {
            return Err(BuildError::Kernel {
                path: kernel_path.display().to_string(),
                problem: "carries another task table than the one just made (another `metal build` of the same target directory ran at the same time?): build again".into(),
            })
        }
        Ok(None) => {
            return Err(BuildError::Kernel {
                path: kernel_path.display().to_string(),
                problem: format!(
                    "has no {} section: this kernel does not include PV_METAL_TABLE",
                    microkernel::metal::image::TASKS_SECTION
                ),
            })
        }
        Err(e) => {
            return Err(BuildError::Kernel {
                path: kernel_path.display().to_string(),
                problem: format!("is not an ELF file: {e}"),
            })
        }
    }
    write_atomically(&out, &kernel)?;
    Ok(Built {
        image: out,
        image_bytes: kernel.len(),
        program_bytes: images.iter().map(Vec::len).collect(),
        table_bytes: table.len(),
        hosted_only: m
            .metal
            .iter()
            .filter(|t| !t.hosted_only.is_empty())
            .map(|t| (t.name.clone(), t.hosted_only.clone()))
            .collect(),
        plan,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The bins of the task package (its `[[bin]]` names).
pub fn task_programs(cargo_toml: &Path) -> Result<Vec<String>, BuildError> {
    #[derive(serde::Deserialize)]
    struct Package {
        #[serde(default)]
        bin: Vec<Bin>,
    }
    #[derive(serde::Deserialize)]
    struct Bin {
        name: String,
    }
    let fail = |reason: String| BuildError::Package {
        path: cargo_toml.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(cargo_toml).map_err(|e| fail(e.to_string()))?;
    let package: Package = toml::from_str(&text).map_err(|e| fail(e.message().to_string()))?;
    Ok(package.bin.into_iter().map(|b| b.name).collect())
}

/// Runs `cargo build` of `args` with the metal flags; cargo's output is shown only when it
/// fails.
fn cargo(
    repo: &Path,
    target: &Path,
    args: &[&str],
    table: Option<&Path>,
    what: &str,
) -> Result<(), BuildError> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(repo)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(target);
    for setting in PROFILE {
        cmd.args(["--config", setting]);
    }
    cmd.args(args)
        .env(RUSTFLAGS_VAR, RUSTFLAGS)
        .env("DEFMT_LOG", DEFMT_LOG)
        // Flags of the caller's own would replace ours (cargo takes the first it finds).
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .stdin(std::process::Stdio::null());
    match table {
        Some(t) => cmd.env("PV_METAL_TABLE", t),
        None => cmd.env_remove("PV_METAL_TABLE"),
    };
    let output = cmd.output().map_err(BuildError::CargoMissing)?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stdout));
    Err(BuildError::Cargo {
        what: what.into(),
        status: output.status.to_string(),
        output: text,
    })
}

/// Writes `bytes` to `path` unless it holds them already: the kernel's build reruns when the
/// table file changes, so an unchanged table keeps a warm build warm.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return Ok(());
    }
    write_atomically(path, bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory, so that a reader
/// sees the old file or the new one, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let fail = |source| BuildError::Write {
        path: path.display().to_string(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail(e)
    })
}

fn plural(n: usize, what: &str) -> String {
    match n {
        1 => format!("1 {what}"),
        n => format!("{n} {what}s"),
    }
}

/// What `metal build` prints when it is done: the image, each task with its grants, what was
/// left out, the sizes.
pub fn summary(b: &Built) -> String {
    use std::fmt::Write;

    use ipc_defs::metal::Grant;
    use microkernel::manifest::format_size;
    let p = &b.plan;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "metal image {} ({} bytes; task table {} bytes) in {:.1} s",
        b.image.display(),
        b.image_bytes,
        b.table_bytes,
        b.seconds
    );
    let _ = writeln!(
        out,
        "{}, {}, {}; the tasks need at least {} of RAM besides their images",
        plural(p.tasks.len(), "task"),
        plural(p.channels.len(), "channel"),
        plural(p.regions.len(), "region"),
        format_size(p.memory())
    );
    for t in &p.tasks {
        let grants: Vec<String> = t
            .slots
            .iter()
            .map(|s| match s.grant {
                Grant::Server { channel } => {
                    let c = &p.channels[usize::from(channel)];
                    format!(
                        "serves {} to {} ({})",
                        c.interface,
                        p.tasks[usize::from(c.client)].name,
                        microkernel::manifest::grant_text(&c.grant)
                    )
                }
                Grant::Client { channel } => {
                    let c = &p.channels[usize::from(channel)];
                    format!(
                        "calls {} on {}",
                        c.interface,
                        p.tasks[usize::from(c.server)].name
                    )
                }
                Grant::Region { region } => {
                    let r = &p.regions[usize::from(region)];
                    format!("region {} ({})", r.name, format_size(r.size))
                }
            })
            .collect();
        let _ = writeln!(
            out,
            "  {}: {} ({} bytes), heap {}, stack {}; {}",
            t.name,
            t.program,
            b.program_bytes
                .get(usize::from(t.image))
                .copied()
                .unwrap_or(0),
            format_size(t.heap),
            format_size(t.stack),
            if grants.is_empty() {
                "no grants".to_string()
            } else {
                grants.join("; ")
            }
        );
    }
    for (task, left) in &b.hosted_only {
        let what: Vec<String> = left
            .iter()
            .map(|h| format!("{} ({})", h.key, h.what))
            .collect();
        let _ = writeln!(
            out,
            "  left out of {task} (hosted platform only): {}",
            what.join(", ")
        );
    }
    out
}
