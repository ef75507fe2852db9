//! The metal platform's tools: `paravisor metal build` (the kernel image with the task table
//! of the manifest's `[[metal.task]]`), `metal log` (the kernel's defmt log, decoded) and
//! `metal run` (boot an image under QEMU or our own partition, its log decoded live).
//! `paravisor audit --metal` (the core's) prints the table an image carries.

pub mod build;
pub mod log;
pub mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use microkernel::cli::failed;
use microkernel::manifest::DEFAULT_MANIFEST;

use crate::cli::MetalCmd;

/// Runs a `paravisor metal` command.
pub fn command(action: MetalCmd) -> Result<ExitCode, ExitCode> {
    match action {
        MetalCmd::Build { manifest, out } => {
            let manifest = manifest.unwrap_or_else(|| PathBuf::from(DEFAULT_MANIFEST));
            let built = build::build(&manifest, out.as_deref(), |step| {
                eprintln!("paravisor: metal build: {step}")
            })
            .map_err(failed)?;
            print!("{}", build::summary(&built));
            Ok(ExitCode::SUCCESS)
        }
        MetalCmd::Log { image, file } => {
            let image = image.unwrap_or_else(build::default_image);
            let decoder = log::LogDecoder::open(&image).map_err(failed)?;
            let stdout = std::io::stdout().lock();
            let result = match file.filter(|f| f.as_os_str() != "-") {
                None => decoder.stream(std::io::stdin().lock(), stdout),
                Some(f) => {
                    let input = std::fs::File::open(&f)
                        .map_err(|e| failed(format!("cannot read {}: {e}", f.display())))?;
                    decoder.stream(std::io::BufReader::new(input), stdout)
                }
            };
            result.map_err(failed)?;
            Ok(ExitCode::SUCCESS)
        }
        MetalCmd::Run {
            image,
            vmm,
            memory,
            cmdline,
            manifest,
            raw,
            timeout,
        } => {
            let opts = run::RunOptions {
                image: image.unwrap_or_else(build::default_image),
                vmm,
                memory,
                cmdline,
                manifest,
                raw,
                timeout: (timeout > 0).then(|| std::time::Duration::from_secs(timeout)),
            };
            let status = run::run(&opts, std::io::stdout()).map_err(failed)?;
            if status != 0 {
                eprintln!("paravisor: metal run: the kernel ended with status {status:#x}");
            }
            Ok(ExitCode::from(status))
        }
    }
}
