//! `pv-vtpm` cannot be started by hand (see ../../standalone_test.rs).

const SERVICE_BINARY: &str = env!("CARGO_BIN_EXE_pv-vtpm");

include!("../../standalone_test.rs");
