//! `tandemctl`: control and inspect tandem.

pub mod cluster;
mod demo;
mod fixture;
mod lock;
mod md;
mod volume;

use clap::{Parser, Subcommand};

/// Control and inspect a tandem cluster.
#[derive(Debug, Parser)]
#[command(
    name = "tandemctl",
    version,
    about = "Control and inspect a tandem cluster"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub target: cluster::Target,
}

/// tandemctl's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, list and destroy PR-capable storage fixtures (LIO, tgtd, nvmet).
    #[command(subcommand)]
    Fixture(fixture::FixtureCommand),
    /// Nodes, quorum, volumes, roles, connection and disk states, sync progress.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Volumes and where they run.
    Volumes {
        #[arg(long)]
        json: bool,
    },
    /// A live stream of cluster events (like `drbdsetup events2`).
    Events {
        #[arg(long)]
        json: bool,
    },
    /// Planned move of a volume: stop resources, demote, promote, start; no write lost.
    Switchover {
        volume: String,
        /// Target node (default: the other replica).
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Resolve a split brain: run on the node whose changes are to be thrown away.
    Resolve {
        volume: String,
        #[arg(long)]
        discard_my_data: bool,
    },
    /// Run the local demo cluster: 3 nodes on 127.0.0.x, kill the primary under load,
    /// show the failover and resync, verify every acknowledged write.
    Demo(demo::DemoArgs),
    /// Validate a configuration file.
    CheckConfig {
        /// The file (default: /etc/tandem/tandem.toml).
        file: Option<std::path::PathBuf>,
    },
    /// Hold a lock-manager lock while a command runs (like flock(1)); exits with its status.
    Lock(lock::LockArgs),
    /// The lock manager's locks on this node (table or --json).
    Locks(lock::LocksArgs),
    /// Write fresh replication metadata (internal or external) for a volume's replica.
    CreateMd(md::CreateMdArgs),
    /// Show a replica's on-disk metadata (text or --json).
    DumpMd(md::DumpMdArgs),
    /// Make a stopped replica forget the cluster log it followed (after the cluster's
    /// state directory was created afresh); it joins the cluster's log at its next start.
    ForgetClusterLog(md::ForgetClusterLogArgs),
    /// Drive a standalone replica (`tandemd replica`) through its control socket.
    #[command(subcommand)]
    Replica(volume::ReplicaCommand),
}

/// Runs tandemctl with the given arguments; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let target = cli.target;
    match cli.command {
        Command::Fixture(cmd) => fixture::run(cmd),
        Command::Status { json } => cluster::status(&target, json),
        Command::Volumes { json } => cluster::volumes(&target, json),
        Command::Events { json } => cluster::events(&target, json),
        Command::Switchover { volume, to, json } => cluster::switchover(&target, &volume, to, json),
        Command::Resolve {
            volume,
            discard_my_data,
        } => cluster::resolve(&target, &volume, discard_my_data),
        Command::Demo(args) => demo::run(args),
        Command::CheckConfig { file } => cluster::check_config(&file.unwrap_or(target.config)),
        Command::Lock(args) => lock::run_lock(args, target.dlm_socket().as_deref()),
        Command::Locks(args) => lock::run_locks(args, target.dlm_socket().as_deref()),
        Command::CreateMd(args) => md::create(args),
        Command::DumpMd(args) => md::dump(args),
        Command::ForgetClusterLog(args) => md::forget_cluster_log(args),
        Command::Replica(cmd) => volume::run(cmd, target.socket.as_deref()),
    }
}
