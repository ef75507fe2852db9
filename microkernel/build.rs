//! Builds the test guest (tests/guest) with the installed host toolchain: a freestanding
//! x86-64 ELF (no std, no SSE: ring-0 SSE ends a PVM run), embedded in `paravisor` as the
//! default guest of `paravisor run`.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest = manifest_dir.join("../tests/guest");
    let source = guest.join("src/main.rs");
    let script = guest.join("guest.ld");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("test-guest.elf");
    for f in [
        "src/main.rs",
        "src/arch.rs",
        "src/net.rs",
        "src/net/ping.rs",
        "src/nvme.rs",
        "src/nvme/pass.rs",
        "src/nvme/queue.rs",
        "src/sha256.rs",
        "guest.ld",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(f).display());
    }
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let output = Command::new(rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "test_guest",
        ])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "debuginfo=0",
        ])
        .args(["-C", "relocation-model=static", "-C", "code-model=small"])
        .args(["-C", "no-redzone=yes"])
        .args([
            "-C",
            "target-feature=-sse,-sse2,-avx,-avx2,-mmx,-x87,+soft-float",
        ])
        .args(["-C", "no-vectorize-loops", "-C", "no-vectorize-slp"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-static"])
        .args([
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-Wl,--build-id=none",
        ])
        .arg("-C")
        .arg(format!("link-arg=-T{}", script.display()))
        .args(["--cap-lints", "allow"])
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("run rustc for the test guest");
    if !output.status.success() {
        panic!(
            "building the test guest failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
