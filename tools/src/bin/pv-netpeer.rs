//! `pv-netpeer --listen ADDR:PORT [--progress-every BYTES]`: the host side of a Linux
//! guest's TCP transfers for the net tests and `paravisor bench net`, run inside the TAP's
//! network namespace (`pv_tools::net_peer` says what it answers).
//!
//! `pv-netpeer --probe ADDR:PORT [--every-ms MS] [--timeout-ms MS]`: knocks on a closed port of the guest and
//! prints each answer's time, for `bench net`'s restart (`pv_tools::net_peer::probe`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::ArgGroup;
use clap::Parser;

/// The host side of a guest's TCP transfers: `PUT` keeps an upload, `GET` sends it back; or
/// a prober of the guest's closed port.
#[derive(Parser)]
#[command(group(ArgGroup::new("mode").required(true).args(["listen", "probe"])))]
struct Args {
    /// The address and port to listen on (inside the namespace it runs in).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Print `progress TOTAL` after every this many bytes moved.
    #[arg(long, default_value_t = 4 << 20)]
    progress_every: u64,
    /// Instead of listening, knock on this address's port (a closed one) and print every
    /// answer as `reply SENT RECEIVED`.
    #[arg(long)]
    probe: Option<SocketAddr>,
    /// `--probe`: milliseconds from one knock to the next.
    #[arg(long, default_value_t = 10)]
    every_ms: u64,
    /// `--probe`: the longest wait for a knock's answer, in milliseconds.
    #[arg(long, default_value_t = 500)]
    timeout_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (what, result) = match (args.listen, args.probe) {
        (Some(listen), _) => (
            listen,
            pv_tools::net_peer::serve(listen, args.progress_every),
        ),
        (None, Some(target)) => {
            let every = Duration::from_millis(args.every_ms.max(1));
            let timeout = Duration::from_millis(args.timeout_ms.max(1));
            (target, pv_tools::net_peer::probe(target, every, timeout))
        }
        // clap's group makes one of them required.
        (None, None) => return ExitCode::FAILURE,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pv-netpeer: {what}: {e}");
            ExitCode::FAILURE
        }
    }
}
