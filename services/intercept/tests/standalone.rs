//! The service binary cannot be started by hand: it has no capabilities outside
//! `paravisor run`, and says so instead of doing anything.

#[test]
fn refuses_to_start_without_a_bootstrap_record() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pv-intercept"))
        .output()
        .expect("run the service binary");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no bootstrap record"), "{err}");
    assert!(err.contains("paravisor run"), "{err}");
}
