//! Logging that exists only where there is somewhere to log to: `tracing` on the hosted
//! platform (`std`), nothing without it. The arguments are still type-checked in both builds,
//! so a message that compiles hosted compiles on metal. What is logged follows the crate's
//! rule: never key material or file contents.

/// `tracing::warn!` with `std`; without it the message is checked and dropped.
macro_rules! log_warn {
    ($($arg:tt)+) => {{
        #[cfg(feature = "std")]
        ::tracing::warn!($($arg)+);
        #[cfg(not(feature = "std"))]
        let _ = ::core::format_args!($($arg)+);
    }};
}

/// `tracing::error!` with `std`; without it the message is checked and dropped.
macro_rules! log_error {
    ($($arg:tt)+) => {{
        #[cfg(feature = "std")]
        ::tracing::error!($($arg)+);
        #[cfg(not(feature = "std"))]
        let _ = ::core::format_args!($($arg)+);
    }};
}

pub(crate) use log_error;
pub(crate) use log_warn;
