//! The shared code an executable maps: its program interpreter (the dynamic loader) and the
//! closure of the libraries it needs (`DT_NEEDED`), found in this host's system library
//! directories the way the loader finds them. The launch measures each of them, a service's
//! sandbox holds read-only copies of exactly the measured bytes and nothing else, and the
//! microkernel refuses to start when it maps code that is not in that set (an `LD_PRELOAD`,
//! a library found through `LD_LIBRARY_PATH` instead of the system directories).
//!
//! Only the system directories are searched, never `LD_LIBRARY_PATH` or `/etc/ld.so.conf`
//! additions: a service must not load code the operator's environment chose. A library that is
//! not found there, or a `$ORIGIN`-relative search path, is an error that names it.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::path::PathBuf;

/// Where a service's loader finds its libraries inside its sandbox: the first of glibc's
/// default search directories on a multiarch system.
pub fn sandbox_dir() -> String {
    format!("/lib/{}", triple())
}

fn triple() -> String {
    format!("{}-linux-gnu", std::env::consts::ARCH)
}

/// The directories searched, in the loader's default order.
fn system_dirs() -> Vec<PathBuf> {
    let t = triple();
    [
        format!("/lib/{t}"),
        format!("/usr/lib/{t}"),
        "/lib64".into(),
        "/usr/lib64".into(),
        "/lib".into(),
        "/usr/lib".into(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

/// One piece of shared code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Library {
    /// Its name as needed (`libc.so.6`), or the interpreter's file name: the launch log's
    /// entry name.
    pub name: String,
    /// Where it was found on this host.
    pub host_path: PathBuf,
    /// Where a service's sandbox holds its copy (the interpreter at its `PT_INTERP` path,
    /// libraries in [`sandbox_dir`]).
    pub sandbox_path: String,
}

/// What one executable needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs {
    /// The interpreter first (if the executable is dynamically linked), then its libraries
    /// in the order they were found.
    pub code: Vec<Library>,
}

#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path} is not an ELF file this host runs: {why}")]
    NotElf { path: String, why: String },
    #[error(
        "{needed}, which {by} needs, is not in the system library directories ({dirs}); \
         install it there (services load libraries only from the measured copies of those)"
    )]
    NotFound {
        needed: String,
        by: String,
        dirs: String,
    },
    #[error("{path} asks for libraries relative to its own location ({runpath}); not supported")]
    RelativeSearchPath { path: String, runpath: String },
    #[error("more than {MAX_LIBRARIES} libraries needed by {0}")]
    TooMany(String),
}

/// A bound on the closure, against a dependency loop through odd sonames.
const MAX_LIBRARIES: usize = 256;

/// The interpreter and the library closure of the executable at `exe`.
pub fn resolve(exe: &Path) -> Result<Needs, LibraryError> {
    let first = parse(exe)?;
    let mut code = Vec::new();
    let mut interp_name = None;
    if let Some(interp) = &first.interpreter {
        let name = Path::new(interp)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| interp.clone());
        interp_name = Some(name.clone());
        code.push(Library {
            name,
            host_path: PathBuf::from(interp),
            sandbox_path: interp.clone(),
        });
    }
    let mut queue: Vec<(String, String, Vec<PathBuf>)> = first
        .needed
        .iter()
        .map(|n| (n.clone(), exe.display().to_string(), first.search.clone()))
        .collect();
    let mut seen: BTreeMap<String, ()> = BTreeMap::new();
    while let Some((needed, by, search)) = queue.first().cloned() {
        queue.remove(0);
        // The loader is already loaded under its soname: a library that names it gets it.
        if Some(&needed) == interp_name.as_ref() || seen.contains_key(&needed) {
            continue;
        }
        seen.insert(needed.clone(), ());
        if seen.len() > MAX_LIBRARIES {
            return Err(LibraryError::TooMany(exe.display().to_string()));
        }
        let dirs: Vec<PathBuf> = search.iter().cloned().chain(system_dirs()).collect();
        let found = if needed.contains('/') {
            Some(PathBuf::from(&needed))
        } else {
            dirs.iter().map(|d| d.join(&needed)).find(|p| {
                parse(p)
                    .map(|e| e.machine == first.machine)
                    .unwrap_or(false)
            })
        };
        let Some(path) = found else {
            return Err(LibraryError::NotFound {
                needed,
                by,
                dirs: system_dirs()
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let elf = parse(&path)?;
        for n in &elf.needed {
            queue.push((n.clone(), needed.clone(), elf.search.clone()));
        }
        code.push(Library {
            sandbox_path: format!("{}/{needed}", sandbox_dir()),
            name: needed,
            host_path: path,
        });
    }
    Ok(Needs { code })
}

/// What one ELF file says about its dynamic linking.
struct Elf {
    interpreter: Option<String>,
    needed: Vec<String>,
    /// Absolute `DT_RUNPATH` / `DT_RPATH` directories.
    search: Vec<PathBuf>,
    machine: object::elf::Machine,
}

/// Reads only the headers, the interpreter and the dynamic section (through a read cache, not
/// the whole file: executables with debug information are tens of megabytes).
fn parse(path: &Path) -> Result<Elf, LibraryError> {
    use object::read::elf::Dyn;
    use object::read::elf::FileHeader;
    use object::read::elf::ProgramHeader;
    let file = std::fs::File::open(path).map_err(|error| LibraryError::Read {
        path: path.display().to_string(),
        error,
    })?;
    let not_elf = |e: object::read::Error| LibraryError::NotElf {
        path: path.display().to_string(),
        why: e.to_string(),
    };
    let data = object::read::ReadCache::new(file);
    let header = object::elf::FileHeader64::<object::Endianness>::parse(&data).map_err(not_elf)?;
    let endian = header.endian().map_err(not_elf)?;
    let mut interpreter = None;
    for ph in header.program_headers(endian, &data).map_err(not_elf)? {
        if let Some(i) = ph.interpreter(endian, &data).map_err(not_elf)? {
            interpreter = Some(String::from_utf8_lossy(i).into_owned());
        }
    }
    let sections = header.sections(endian, &data).map_err(not_elf)?;
    let (mut needed, mut search) = (Vec::new(), Vec::new());
    if let Some((entries, link)) = sections.dynamic(endian, &data).map_err(not_elf)? {
        let strings = sections.strings(endian, &data, link).map_err(not_elf)?;
        for d in entries {
            let tag = d.d_tag(endian);
            let is_path = tag == object::elf::DT_RUNPATH || tag == object::elf::DT_RPATH;
            if tag != object::elf::DT_NEEDED && !is_path {
                continue;
            }
            let value = u32::try_from(d.d_val(endian))
                .ok()
                .and_then(|at| strings.get(at).ok())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .ok_or_else(|| LibraryError::NotElf {
                    path: path.display().to_string(),
                    why: "a dynamic entry names no string".into(),
                })?;
            if !is_path {
                needed.push(value);
                continue;
            }
            for dir in value.split(':').filter(|d| !d.is_empty()) {
                if !dir.starts_with('/') || dir.contains('$') {
                    return Err(LibraryError::RelativeSearchPath {
                        path: path.display().to_string(),
                        runpath: value.clone(),
                    });
                }
                search.push(PathBuf::from(dir));
            }
        }
    }
    Ok(Elf {
        interpreter,
        needed,
        search,
        machine: header.e_machine(endian),
    })
}

/// The files a process maps (`/proc/PID/maps`), apart from anonymous memory, the kernel's
/// own (`[vdso]`, `[stack]`...) and memfds (rings, regions, the sealed service image).
pub fn mapped_files(pid: &str) -> std::io::Result<Vec<String>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut files: Vec<String> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path
        let path = line
            .split_whitespace()
            .skip(5)
            .collect::<Vec<_>>()
            .join(" ");
        if path.is_empty() || path.starts_with('[') || path.starts_with("/memfd:") {
            continue;
        }
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

/// What a service maps beyond its measured code (`allowed`: the sandbox paths of its
/// interpreter and libraries): one line per file.
pub fn unexpected_maps(mapped: &[String], allowed: &[String]) -> Vec<String> {
    mapped
        .iter()
        .filter(|p| !allowed.contains(p))
        .map(|p| format!("maps {p}, which is not its measured code"))
        .collect()
}

/// Checks that this process (the microkernel) maps only its own executable and the libraries
/// [`resolve`] gives for it: a preloaded library, or one found through `LD_LIBRARY_PATH`
/// instead of the system directories, is named. Files are compared by device and inode.
pub fn check_own_maps(exe: &Path, needs: &Needs) -> Result<(), String> {
    let id = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).ok();
    let mut allowed: Vec<(u64, u64)> = Vec::new();
    allowed.extend(id(exe));
    for lib in &needs.code {
        allowed.extend(id(&lib.host_path));
    }
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("cannot read /proc/self/maps: {e}"))?;
    let mut odd = Vec::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 {
            continue;
        }
        let path = fields[5..].join(" ");
        let executable = fields[1].contains('x');
        if fields[4] == "0" || path.starts_with("/memfd:") || path.starts_with('[') {
            // Code the kernel maps is fine; code in anonymous memory or a memfd is what a
            // library that unmapped its own file after loading would leave.
            let kernel = path == "[vdso]" || path == "[vsyscall]";
            if executable && !kernel {
                let what = if path.is_empty() {
                    format!("anonymous executable memory at {}", fields[0])
                } else {
                    format!("executable {path} at {}", fields[0])
                };
                if !odd.contains(&what) {
                    odd.push(what);
                }
            }
            continue;
        }
        if fields.len() < 6 {
            continue;
        }
        let Ok(ino) = fields[4].parse::<u64>() else {
            continue;
        };
        // The file itself, as mapped (the path may have been replaced since).
        let mapped = std::fs::metadata(&path).map(|m| (m.dev(), m.ino())).ok();
        let measured = mapped.is_some_and(|m| m.1 == ino && allowed.contains(&m));
        if !measured && !odd.contains(&path) {
            odd.push(path);
        }
    }
    if odd.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the microkernel maps code that is not its measured executable and libraries: {} \
             (a preloaded library, or one found through LD_LIBRARY_PATH instead of the system \
             library directories); start paravisor without them",
            odd.join(", ")
        ))
    }
}

/// Environment variables that load code into the microkernel or change how it runs, refused
/// at launch (glibc ignores the same set for set-user-id programs): the measurement could not
/// tell their effect. `LD_LIBRARY_PATH` is allowed (cargo sets it for what it runs) because
/// its only effect, which files are mapped, is checked by [`check_own_maps`]. Services always
/// start with an empty environment.
pub fn refused_environment(vars: impl Iterator<Item = (String, String)>) -> Vec<String> {
    const NAMES: &[&str] = &[
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "MALLOC_TRACE",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
    ];
    // RUST_LOG and RUST_BACKTRACE only change what is printed; rustup's proxies set
    // RUST_RECURSION_COUNT for what cargo runs, and nothing here reads it. Any other RUST_*
    // (RUST_MIN_STACK changes every thread's stack) is refused.
    const RUST_ALLOWED: &[&str] = &[
        "RUST_LOG",
        "RUST_BACKTRACE",
        "RUST_LIB_BACKTRACE",
        "RUST_RECURSION_COUNT",
    ];
    let mut out: Vec<String> = vars
        .map(|(k, _)| k)
        .filter(|k| {
            (k.starts_with("LD_") && k != "LD_LIBRARY_PATH")
                || NAMES.contains(&k.as_str())
                || k.starts_with("MALLOC_")
                || k.starts_with("OPENSSL_")
                || (k.starts_with("RUST_") && !RUST_ALLOWED.contains(&k.as_str()))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_loading_variables_are_refused_and_logging_ones_are_not() {
        let env = |pairs: &[&str]| {
            refused_environment(pairs.iter().map(|k| (k.to_string(), "x".to_string())))
        };
        assert_eq!(
            env(&["LD_PRELOAD", "PATH", "RUST_LOG", "LD_AUDIT", "HOME"]),
            vec!["LD_AUDIT", "LD_PRELOAD"]
        );
        assert_eq!(
            env(&[
                "GLIBC_TUNABLES",
                "RUST_MIN_STACK",
                "OPENSSL_CONF",
                "MALLOC_CHECK_"
            ]),
            vec![
                "GLIBC_TUNABLES",
                "MALLOC_CHECK_",
                "OPENSSL_CONF",
                "RUST_MIN_STACK"
            ]
        );
        assert!(env(&["LD_LIBRARY_PATH", "RUST_BACKTRACE", "TERM"]).is_empty());
    }

    #[test]
    fn a_file_outside_the_measured_code_is_named() {
        let allowed = vec!["/lib/x86_64-linux-gnu/libc.so.6".to_string()];
        let mapped = vec![
            "/lib/x86_64-linux-gnu/libc.so.6".to_string(),
            "/tmp/evil.so".to_string(),
        ];
        assert_eq!(
            unexpected_maps(&mapped, &allowed),
            vec!["maps /tmp/evil.so, which is not its measured code"]
        );
        assert!(unexpected_maps(&allowed, &allowed).is_empty());
    }

    #[test]
    fn this_test_binary_resolves_to_its_loader_and_libc() {
        let exe = std::env::current_exe().unwrap();
        let needs = resolve(&exe).unwrap();
        let names: Vec<&str> = needs.code.iter().map(|l| l.name.as_str()).collect();
        assert!(names[0].starts_with("ld-linux"), "{names:?}");
        assert!(names.contains(&"libc.so.6"), "{names:?}");
        assert!(needs.code[1..]
            .iter()
            .all(|l| l.sandbox_path.starts_with(&sandbox_dir())));
        // And the process maps exactly that.
        check_own_maps(&exe, &needs).unwrap();
    }
}
