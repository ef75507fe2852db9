//! The kernel binary's link: `kernel.ld` (loaded at 1 MiB, a PVH note for QEMU) and defmt's
//! table of format strings; and the task table the image builder made, which the kernel
//! includes (`PV_METAL_TABLE`).

fn main() {
    println!("cargo:rerun-if-changed=kernel.ld");
    println!("cargo:rerun-if-env-changed=PV_METAL_TABLE");
    if std::env::var_os("CARGO_FEATURE_IMAGE").is_none() {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap();
    println!("cargo:rustc-link-arg-bins=-T{dir}/kernel.ld");
    println!("cargo:rustc-link-arg-bins=-Tdefmt.x");
    match std::env::var("PV_METAL_TABLE") {
        Ok(table) => println!("cargo:rerun-if-changed={table}"),
        Err(_) => {
            panic!("PV_METAL_TABLE is not set: build the kernel with `paravisor metal build`")
        }
    }
}
