//! `tandem-vm`: prepares the guest kernel and runs scripts in a guest, by hand.
//!
//! ```text
//! tandem-vm prepare              download + unpack the newest Debian 6.12 kernel, build the initramfs
//! tandem-vm run SCRIPT [DISK..]  boot a guest that runs SCRIPT (host path), print its console
//! ```
#![allow(clippy::print_stdout)]

use std::process::ExitCode;
use tandem_testbed::{GuestKernel, GuestSpec, scratch_dir};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("prepare") => GuestKernel::prepare().map(|k| {
            println!(
                "{}",
                serde_json::json!({
                    "release": k.release,
                    "image": k.image,
                    "initrd": k.initrd,
                    "modules": k.modules_dir,
                })
            );
            0
        }),
        Some("run") if args.len() >= 2 => run(&args[1], &args[2..]),
        _ => {
            eprintln!("usage: tandem-vm prepare | tandem-vm run SCRIPT [DISK...]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(0) => ExitCode::SUCCESS,
        Ok(_) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tandem-vm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(script: &str, disks: &[String]) -> tandem_testbed::Result<i32> {
    let kernel = GuestKernel::prepare()?;
    let text =
        std::fs::read_to_string(script).map_err(|source| tandem_testbed::TestbedError::Io {
            what: format!("reading {script}"),
            source,
        })?;
    let dir = scratch_dir("manual")?;
    let mut spec = GuestSpec::new("vm", &dir, &text);
    for disk in disks {
        spec = spec.disk(std::path::Path::new(disk));
    }
    let outcome = tandem_testbed::run(&kernel, &spec)?;
    println!("{}", outcome.console);
    Ok(outcome.rc.unwrap_or(255))
}
