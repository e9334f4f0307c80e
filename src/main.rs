//! `tandemd`: the tandem daemon.
//!
//! Modes:
//! - `tandemd replica ...` serves one replicated volume without cluster membership
//!   (roles set by hand, like `drbdsetup` without a cluster manager).
//! - the cluster node mode (configuration file, membership, failover) — see `tandem::cluster`.
use clap::{Parser, Subcommand};

/// The tandem daemon.
#[derive(Debug, Parser)]
#[command(name = "tandemd", version, about)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.mode {}
}
