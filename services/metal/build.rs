//! Task programs link at the start of the user window (`task.ld`).

fn main() {
    println!("cargo:rerun-if-changed=task.ld");
    if std::env::var_os("CARGO_FEATURE_IMAGE").is_some() {
        let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
        println!("cargo:rustc-link-arg-bins=-T{dir}/task.ld");
    }
}
