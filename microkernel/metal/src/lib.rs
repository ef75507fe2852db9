//! The metal kernel's logic that needs no hardware, tested on the host.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]
