//! The interfaces of the six services. An interface whose issue has not come yet has no
//! requests, and its endpoint answers only the common [`crate::endpoint::Request::Ping`].
//!
//! Those enums are empty on purpose, not placeholders with fake variants: a request that does
//! not exist cannot be sent, and one that arrives anyway fails to decode (a typed error).

macro_rules! interface {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        pub mod $name {
            use serde::Deserialize;
            use serde::Serialize;

            /// Requests of this interface (none yet).
            #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
            pub enum Request {}

            /// Responses of this interface (none yet).
            #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
            pub enum Response {}
        }
    };
}

pub mod attest;
pub mod bytes;
pub mod echo;
pub mod guest;
pub mod intercept;
pub mod platform;
pub mod vmgs;
pub mod vtpm;
interface!(
    /// The guest block device.
    storage
);
interface!(
    /// The guest NIC.
    net
);
