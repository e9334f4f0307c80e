//! `tandemctl`: control and inspect tandem (see `tandem_tools::ctl`).
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = tandem_tools::ctl::Cli::parse();
    match tandem_tools::ctl::run(cli) {
        Ok(code) => std::process::ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("tandemctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
