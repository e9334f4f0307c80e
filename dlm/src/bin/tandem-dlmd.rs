//! `tandem-dlmd`: one lock manager node as a standalone process, until `tandemd` embeds
//! [`tandem_dlm::shell::Node`].
//!
//! ```text
//! tandem-dlmd --id 1 --listen 127.0.0.1:7401 --peer 2=127.0.0.2:7401 --peer 3=127.0.0.3:7401 \
//!             --socket /run/tandem/dlm-1.sock
//! ```
//!
//! Membership in standalone mode: static (the configured nodes) plus a heartbeat
//! failure detector. The node forms its first membership when it has heard from every
//! configured peer (or after `--initial-wait-ms`), removes a member not heard from for
//! `--suspect-ms`, and adds a peer (or a restarted incarnation) as soon as it hears from
//! it; each change takes the next epoch after the highest one seen. Nodes decide this
//! independently, which is good enough for tests on one host; `tandemd` feeds epochs
//! from its replicated cluster log instead.
//!
//! Fencing: recovery waits until every departed node is confirmed fenced. Here the
//! operator or the test plays the fencer, on the unix socket:
//! `{"id":1,"op":"fence-confirm","node":2,"incarnation":<its incarnation>}` (the
//! incarnation is in `{"op":"status"}` of any node, or in this node's log). With
//! `--manual-membership`, membership comes only from `{"op":"membership",...}` too.
//!
//! A node removed from the membership (evicted) exits with status 3.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use tandem_dlm::core::Config;
use tandem_dlm::shell::{Node, NodeConfig, membership_fingerprint};
use tandem_dlm::{Epoch, Incarnation, NodeId};

/// Runs one lock manager node.
#[derive(Debug, Parser)]
#[command(name = "tandem-dlmd", version, about)]
struct Args {
    /// This node's id.
    #[arg(long)]
    id: u32,
    /// Address for peer connections.
    #[arg(long)]
    listen: SocketAddr,
    /// A peer: ID=ADDRESS (repeat for each).
    #[arg(long = "peer", value_parser = parse_peer)]
    peers: Vec<(u32, SocketAddr)>,
    /// Unix socket for clients (and the admin operations).
    #[arg(long)]
    socket: PathBuf,
    /// Incarnation (default: start time in microseconds).
    #[arg(long)]
    incarnation: Option<u64>,
    /// A member not heard from this long is removed.
    #[arg(long, default_value_t = 1000)]
    suspect_ms: u64,
    /// Form the first membership after this long even if some peers are silent.
    #[arg(long, default_value_t = 3000)]
    initial_wait_ms: u64,
    /// Take membership only from the admin socket (no failure detector).
    #[arg(long)]
    manual_membership: bool,
    /// Unused resources stay mastered this long.
    #[arg(long, default_value_t = 10_000)]
    toss_ms: u64,
}

fn parse_peer(text: &str) -> Result<(u32, SocketAddr), String> {
    let (id, addr) = text
        .split_once('=')
        .ok_or_else(|| format!("peer {text:?} is not ID=ADDRESS"))?;
    let id = id.parse().map_err(|e| format!("peer id {id:?}: {e}"))?;
    let addr = addr
        .parse()
        .map_err(|e| format!("peer address {addr:?}: {e}"))?;
    Ok((id, addr))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let me = NodeId(args.id);
    let mut peers = BTreeMap::new();
    for (id, addr) in &args.peers {
        if *id == args.id {
            bail!("--peer {id} is this node");
        }
        peers.insert(NodeId(*id), *addr);
    }
    let incarnation = Incarnation(match args.incarnation {
        Some(i) => i,
        None => u64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .context("system clock before 1970")?
                .as_micros(),
        )
        .context("clock out of range")?,
    });
    let node = Node::start(NodeConfig {
        node: me,
        incarnation,
        listen: Some(args.listen),
        peers: peers.clone(),
        socket: Some(args.socket.clone()),
        socket_admin: true,
        core: Config {
            toss_ms: args.toss_ms,
        },
    })
    .await
    .context("starting the node")?;
    tracing::info!(node_id = args.id, incarnation = incarnation.0, listen = %args.listen, socket = %args.socket.display(), "tandem-dlmd started");

    let started = std::time::Instant::now();
    let suspect = Duration::from_millis(args.suspect_ms);
    let mut members: Option<BTreeMap<NodeId, Incarnation>> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("interrupted");
                return Ok(());
            }
        }
        let status = node.status();
        if status.state == "evicted" {
            tracing::error!(node_id = args.id, "removed from the membership; exiting");
            std::process::exit(3);
        }
        if args.manual_membership {
            continue;
        }
        let heard = node.peers_heard();
        let up: BTreeMap<NodeId, Incarnation> = heard
            .iter()
            .filter(|(_, s)| s.age < suspect)
            .map(|(n, s)| (*n, s.incarnation))
            .collect();
        let max_epoch = heard
            .values()
            .map(|s| s.epoch)
            .max()
            .unwrap_or_default()
            .max(node.epoch());
        let mut desired: BTreeMap<NodeId, Incarnation> = up.clone();
        desired.insert(me, incarnation);
        // Decide only with every live peer's epoch known (a connection's hello comes
        // before its first heartbeat).
        if up
            .keys()
            .any(|p| heard.get(p).is_some_and(|s| !s.heartbeat_seen))
        {
            continue;
        }
        let fingerprint = membership_fingerprint(&desired);
        // A peer that already formed this very membership fixes its epoch.
        let formed = heard
            .values()
            .filter(|s| s.age < suspect && s.members == fingerprint && s.epoch > node.epoch())
            .map(|s| s.epoch)
            .max();
        match &members {
            None => {
                let all_up = peers.keys().all(|p| up.contains_key(p));
                if !all_up && started.elapsed() < Duration::from_millis(args.initial_wait_ms) {
                    continue;
                }
            }
            // Same members, but peers moved to a later epoch for them: follow.
            Some(current) if *current == desired && formed.is_none() => continue,
            Some(_) => {}
        }
        let epoch = formed.unwrap_or(Epoch(max_epoch.0 + 1));
        node.membership(epoch, desired.clone());
        members = Some(desired);
    }
}
