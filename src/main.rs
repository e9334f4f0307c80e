//! `tandemd`: the tandem daemon.
//!
//! Modes:
//! - `tandemd replica ...` serves one replicated volume without cluster membership
//!   (roles set by hand, like `drbdsetup` without a cluster manager).
//! - the cluster node mode (configuration file, membership, failover) — see `tandem::cluster`.
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

/// The tandem daemon.
#[derive(Debug, Parser)]
#[command(name = "tandemd", version, about)]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Run as a cluster node: membership, quorum, volumes, failover.
    Run(RunArgs),
    /// Serve one replicated volume without cluster membership (roles set by hand).
    Replica(Box<tandem::replica::ReplicaArgs>),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The cluster configuration (shared by all nodes).
    #[arg(long, default_value = "/etc/tandem/tandem.toml")]
    config: PathBuf,
    /// This node's name in the configuration (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=off"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing(args.log_json);
    let config = tandem::cluster::Config::load(&args.config)?;
    let node = match args.node {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .context("reading the host name")?
            .to_string_lossy()
            .into_owned(),
    };
    // At least two workers even on one CPU (a small VM): a call that blocks a worker by
    // mistake must not also stop heartbeats, the cluster log and the control socket.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .thread_name("tandemd")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let options = tandem::cluster::daemon::DaemonOptions {
            config,
            node,
            drivers: std::collections::BTreeMap::new(),
            latency: None,
        };
        tandem::cluster::daemon::run(options).await
    })?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.mode {
        Mode::Run(args) => run(args),
        Mode::Replica(args) => replica(*args),
    }
}

fn replica(args: tandem::replica::ReplicaArgs) -> anyhow::Result<()> {
    init_tracing(false);
    let name = args.name.clone();
    tandem::replica::main(args).with_context(|| format!("replica {name}"))
}
