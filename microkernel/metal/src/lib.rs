//! The metal kernel's logic that needs no hardware, tested on the host: physical frames,
//! task images, restart limits.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod elf;
pub mod frames;
pub mod restart;
