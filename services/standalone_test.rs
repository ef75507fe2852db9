// Shared by every service's `tests/standalone.rs`, which defines `SERVICE_BINARY` and
// includes this file: the service binary cannot be started by hand. It has no capabilities
// outside `paravisor run`, and says so instead of doing anything. (Having an integration
// test also makes `cargo test` build the service's real binary, which the cross-process
// tests run.)

#[test]
fn refuses_to_start_without_a_bootstrap_record() {
    let out = std::process::Command::new(SERVICE_BINARY)
        .output()
        .expect("run the service binary");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no bootstrap record"), "{err}");
    assert!(err.contains("paravisor run"), "{err}");
}
