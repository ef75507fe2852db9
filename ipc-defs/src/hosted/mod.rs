//! The Linux-hosted half of the contract: shared memory, futex waiting, channel ends, and the
//! runtime every service process starts in.
//!
//! `unsafe` is confined to [`sys`] (syscalls), [`shm`] (the mapping) and one block of
//! [`channel`] (viewing a checked mapping as a channel); everything else here is safe code
//! over their APIs.

#[allow(unsafe_code)]
pub mod channel;
pub mod checkpoint;
pub mod fd_store;
pub mod runtime;
#[allow(unsafe_code)]
pub mod shm;
#[allow(unsafe_code)]
pub mod sys;
pub mod vmgs_client;

pub use channel::CallError;
pub use channel::ChannelMemory;
pub use channel::ClientEnd;
pub use channel::Sent;
pub use channel::ServerEnd;
pub use channel::WaitPolicy;
pub use shm::SharedMemory;
