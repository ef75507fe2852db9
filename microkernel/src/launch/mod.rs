//! What a launch is made of and what it guards: the measurement of everything that runs
//! ([`measure`], with [`libraries`]: which loader and libraries each executable maps), the
//! first run's state files ([`state_files`]), and the datastore key's protection: sealing it to
//! the platform ([`key_protector`]) and releasing it through the tenant's key broker
//! ([`key_release`]). The steps that use them at start are the supervisor's
//! (`supervisor/sealing.rs`); the host's guest-state file itself is read by the broker.

pub mod key_protector;
pub mod key_release;
pub mod libraries;
pub mod measure;
pub mod state_files;
