//! `pv-vmgs` cannot be started by hand (see ../../standalone_test.rs).

const SERVICE_BINARY: &str = env!("CARGO_BIN_EXE_pv-vmgs");

include!("../../standalone_test.rs");
