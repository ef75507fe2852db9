//! `pv-netpeer --listen ADDR:PORT [--progress-every BYTES]`: the host side of a Linux
//! guest's TCP transfers for the net tests and `paravisor bench net`, run inside the TAP's
//! network namespace (`pv_tools::net_peer` says what it answers).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

/// The host side of a guest's TCP transfers: `PUT` keeps an upload, `GET` sends it back.
#[derive(Parser)]
struct Args {
    /// The address and port to listen on (inside the namespace it runs in).
    #[arg(long)]
    listen: SocketAddr,
    /// Print `progress TOTAL` after every this many bytes moved.
    #[arg(long, default_value_t = 4 << 20)]
    progress_every: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match pv_tools::net_peer::serve(args.listen, args.progress_every) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pv-netpeer: {}: {e}", args.listen);
            ExitCode::FAILURE
        }
    }
}
