//! `tandemctl`: control and inspect tandem.

mod fixture;

use clap::{Parser, Subcommand};

/// Control and inspect a tandem cluster.
#[derive(Debug, Parser)]
#[command(name = "tandemctl", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// tandemctl's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list and destroy PR-capable storage fixtures (LIO, tgtd, nvmet).
    #[command(subcommand)]
    Fixture(fixture::FixtureCommand),
}

/// Runs tandemctl with the given arguments; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Fixture(cmd) => fixture::run(cmd),
    }
}
