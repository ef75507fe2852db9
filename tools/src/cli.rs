//! The tools' command line: the commands `paravisor` hands to `pv-tools` as given
//! (`microkernel::cli::is_tool_command`): the verifier, provisioning a simulated platform,
//! the key broker, the vmgs file tool, the benchmarks and the metal image's tools. Their arguments are defined here
//! only, so that the trusted binary holds none of them: `paravisor` lists these commands
//! with one line each (checked against these definitions by a test) and forwards even their
//! `--help`.

use std::path::PathBuf;

use clap::Parser;
use clap::Subcommand;
use microkernel::cli::GuestArgs;
use microkernel::cli::DEFAULT_PLATFORM_DIR;

/// The tools' part of `paravisor`.
#[derive(Parser)]
#[command(name = "paravisor", version, about = microkernel::cli::ABOUT)]
pub struct ToolCli {
    #[command(subcommand)]
    pub command: ToolCmd,
}

#[derive(Subcommand)]
pub enum ToolCmd {
    /// The simulated platform (stands in for the AMD secure processor).
    Platform {
        #[command(subcommand)]
        action: PlatformCmd,
    },
    /// Attestation evidence: the certificate chain, and verifying a report as a remote
    /// verifier does.
    Attest {
        #[command(subcommand)]
        action: AttestCmd,
    },
    /// Measure against baselines in the same run: `ipc` (our rings against the shared-memory
    /// floor, eventfd and Unix sockets), `vmgs` (the guest-state store against plain file
    /// I/O), `vtpm` (a running paravisor's TPM against swtpm), `guest` (a guest exit
    /// answered by a device service against one answered in the vCPU thread), `memory` (an
    /// idle instance's footprint against Firecracker's), `storage` (our vhost-user disks
    /// under a Linux guest's fio against qemu-storage-daemon) or `net` (a Linux guest's TCP
    /// throughput and ping on our vhost-user NIC against QEMU's own `-netdev tap`, and pv-net's
    /// restart; needs root), `boot` (`run --vmm qemu` to Linux's first user-space line
    /// against QEMU with its own devices and swtpm) or `chaos` (the confidential VM attesting,
    /// writing its disk and extending a PCR while its services are killed at random every
    /// 2-5 s; needs root; exit 1 if an invariant broke). Warns when other processes kept the
    /// machine busy meanwhile.
    Bench {
        /// What to measure.
        #[arg(value_parser = ["ipc", "vmgs", "vtpm", "guest", "measure", "attest", "memory", "storage", "net", "boot", "chaos"], default_value = "ipc")]
        what: String,
        /// Where the benchmark makes its temporary directory (unique, removed at the end; for
        /// `vmgs`, the file system measured) [default: the system's temporary directory].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Samples per latency measurement.
        #[arg(long, default_value_t = 31)]
        samples: usize,
        /// Quick run with fewer samples (for smoke tests).
        #[arg(long)]
        quick: bool,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// `storage`, `net`: the script that builds the Linux guest image (docs/linux-harness.md)
        /// [default: tests/linux/build-image.sh of the repository pv-tools was built from].
        #[arg(long)]
        image_script: Option<PathBuf>,
        /// `chaos`: how long the guest's loop runs under the kills [default: 600; 60 with
        /// --quick].
        #[arg(long)]
        seconds: Option<u64>,
    },
    /// (internal) The peer side of a benchmark.
    #[command(name = "__bench-peer", hide = true)]
    BenchPeer {
        kind: String,
        cpu: usize,
        fds: Vec<i32>,
    },
    /// VMGS guest-state file tools (the reference vmgstool's commands, options and exit codes).
    Vmgs {
        #[command(subcommand)]
        command: crate::vmgs_args::VmgsCmd,
    },
    /// Key broker (KBS), run by the tenant outside the paravisor's trust boundary: releases
    /// the tenant key, wrapped, only to attestation evidence that verifies.
    Kbs {
        #[command(subcommand)]
        command: crate::kbs_args::KbsCmd,
    },
    /// The metal platform (work in progress): build the kernel image with the manifest's
    /// [[metal.task]] tasks (`metal build`), decode its defmt log (`metal log`), boot it
    /// under QEMU or our own partition (`metal run`).
    Metal {
        #[command(subcommand)]
        action: MetalCmd,
    },
}

#[derive(Subcommand, Debug)]
pub enum MetalCmd {
    /// Validate the manifest, build its [[metal.task]] programs and the kernel with their
    /// task table (cargo, in the repository pv-tools was built from, into its target/metal),
    /// and write the image; print what each task is granted and what was left out.
    Build {
        /// The manifest [default: manifest.toml]
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Where the image goes [default: target/metal/pv-metal.elf of that repository]; its
        /// task table goes next to it (IMAGE with the extension .tasks).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Decode a metal kernel's log: each `#d:` line (anywhere in a line: a console's prefix
    /// stays) with the image's defmt table; other lines pass through.
    Log {
        /// The kernel image the log is of [default: target/metal/pv-metal.elf]
        #[arg(long)]
        image: Option<PathBuf>,
        /// The captured log; `-` or none: standard input.
        file: Option<PathBuf>,
    },
    /// Boot a metal image under QEMU (TCG, PVH) or our own partition (`paravisor run
    /// --guest`), its log decoded as it comes; exit with the kernel's status.
    Run {
        /// The kernel image [default: target/metal/pv-metal.elf]
        #[arg(long)]
        image: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "qemu")]
        vmm: crate::metal::run::Vmm,
        /// RAM in MiB [default: 128 under QEMU, 64 in the partition]
        #[arg(long, value_name = "MIB")]
        memory: Option<u32>,
        /// More of the kernel's command line.
        #[arg(long, default_value = "")]
        cmdline: String,
        /// The partition's manifest (`paravisor run` reads it) [default: manifest.toml]
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Print the log as it comes, without decoding it.
        #[arg(long)]
        raw: bool,
        /// Stop the VM after this many seconds (0: never).
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        timeout: u64,
    },
}

#[derive(Subcommand, Debug)]
pub enum PlatformCmd {
    /// Provision a platform identity once: chip secret (insecure file) and ARK/ASK/VCEK.
    Init {
        /// Where the platform lives (separate from the paravisor's state).
        #[arg(long, default_value = DEFAULT_PLATFORM_DIR)]
        platform_dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum AttestCmd {
    /// Print the SHA-256 fingerprint of the ARK in DIR (what a verifier pins).
    Fingerprint {
        #[arg(long)]
        certs: PathBuf,
    },
    /// Verify a report: pinned ARK, chain and signature (sev crate), zero reserved bytes,
    /// the measurement (given, or recomputed from a manifest) and the nonce.
    Verify {
        report: PathBuf,
        #[arg(long)]
        certs: PathBuf,
        /// SHA-256 of the ARK certificate (hex).
        #[arg(long)]
        ark_fingerprint: String,
        /// The expected measurement (hex, 48 bytes).
        #[arg(long, conflicts_with_all = ["manifest", "launch_log"])]
        expected_measurement: Option<String>,
        /// A launch log (`paravisor measure --json`, or `launch-log.json` in a run's state
        /// directory): the measurement is recomputed from the log alone, and the log's entries
        /// are printed as claims (check their hashes against the release you trust).
        #[arg(long, conflicts_with = "manifest")]
        launch_log: Option<PathBuf>,
        /// Recompute the expected measurement from this manifest, its binaries next to
        /// `paravisor`, and the guest options below (as `paravisor measure`). With no guest
        /// option, the launch with the test guest and the launch without a guest are both
        /// accepted, and the output says which one the report is from.
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// The nonce the report must carry (hex; see `platform report`).
        #[arg(long)]
        nonce: Option<String>,
        /// Refuse the report (exit 1) unless a reference measurement and a non-empty nonce
        /// were given: without them a genuine report proves neither what ran nor when.
        #[arg(long)]
        strict: bool,
        /// Machine-readable output: every check made with its result, what was not checked,
        /// and the claims (64-bit fields as hex strings); printed on refusal too.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        guest: Box<GuestArgs>,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// `paravisor` lists the tools' commands (and hands them over) without their
    /// definitions: each one it lists must be one of these, with the same description, and
    /// be handed over; `vmgs reseal` stays the core's.
    #[test]
    fn paravisor_lists_and_hands_over_exactly_the_tools_commands() {
        let core = microkernel::cli::Cli::command();
        let tools = ToolCli::command();
        let handed = |words: &[&str]| {
            let args: Vec<std::ffi::OsString> = words.iter().map(|w| w.into()).collect();
            microkernel::cli::is_tool_command(&args)
        };
        let mut checked = 0;
        for top in tools.get_subcommands() {
            let name = top.get_name();
            let core_top = core
                .find_subcommand(name)
                .unwrap_or_else(|| panic!("paravisor does not list `{name}`"));
            let nested =
                top.get_subcommands().count() > 0 && matches!(name, "platform" | "attest" | "vmgs");
            if !nested {
                assert_eq!(core_top.get_about(), top.get_about(), "{name}");
                assert!(handed(&[name, "--help"]), "{name}");
                assert!(handed(&["help", name]), "help {name}");
                checked += 1;
                continue;
            }
            for sub in top.get_subcommands() {
                let s = sub.get_name();
                let core_sub = core_top
                    .find_subcommand(s)
                    .unwrap_or_else(|| panic!("paravisor does not list `{name} {s}`"));
                assert_eq!(core_sub.get_about(), sub.get_about(), "{name} {s}");
                assert!(handed(&[name, s, "--bogus"]), "{name} {s}");
                assert!(handed(&[name, "help", s]), "{name} help {s}");
                assert!(handed(&["help", name, s]), "help {name} {s}");
                checked += 1;
            }
        }
        assert_eq!(
            checked,
            4 + 1 + 2 + 11,
            "bench, __bench-peer, kbs, metal; init; verify, fingerprint; 11 vmgs"
        );
        // The core's own commands are never handed over.
        for core_own in [
            &["run"][..],
            &["vmgs", "reseal"],
            &["vmgs", "rotate"],
            &["vmgs", "help", "reseal"],
            &["vmgs", "help"],
            &["vmgs"],
            &["attest", "report"],
            &["attest", "certs"],
            &["platform", "report"],
            &["help"],
            &[],
        ] {
            assert!(!handed(core_own), "{core_own:?}");
        }
    }
}
