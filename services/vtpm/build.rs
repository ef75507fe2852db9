//! Links libtpms (Debian: `apt-get install libtpms-dev`), the TPM 2.0 engine.
fn main() {
    println!("cargo:rustc-link-lib=tpms");
    println!("cargo:rerun-if-changed=build.rs");
}
