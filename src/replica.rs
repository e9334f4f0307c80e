//! `tandemd replica`: one replicated volume without cluster membership.
//!
//! Like `drbdsetup` without a cluster manager: roles are set by hand (`--primary`, or
//! `tandemctl replica primary` through the control socket), fencing is a local policy,
//! and the peer connection is plain TCP (the side whose listen address sorts lower
//! dials). The volume is exported over NBD (TCP on 127.0.0.0/8 and/or a unix socket)
//! and, with `--ublk` (root, `ublk_drv`), as `/dev/ublkbN`.

use crate::error::{Result, TandemError};
use crate::replication::core::ResyncConfig;
use crate::replication::types::{FencingPolicy, Protocol, SplitBrainPolicy};
use crate::replication::{
    LocalFencer, MetadataLocation, PeerConnector, TcpConnector, Volume, VolumeConfig, control,
};
use crate::store::Engine;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// Options of `tandemd replica`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplicaArgs {
    /// Volume name (NBD export name, log field).
    #[arg(long)]
    pub name: String,
    /// Backing file or block device (prepared with `tandemctl create-md`).
    #[arg(long)]
    pub backing: PathBuf,
    /// External metadata file (default: internal, at the end of the backing device).
    #[arg(long)]
    pub metadata: Option<PathBuf>,
    /// Replication listen address.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The peer's replication address (omit to run without a peer).
    #[arg(long)]
    pub peer: Option<SocketAddr>,
    /// Control socket (default /run/tandem/replica-NAME.sock).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// NBD on TCP (must be on 127.0.0.0/8).
    #[arg(long)]
    pub nbd: Option<SocketAddr>,
    /// NBD on a unix socket.
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// Export as a ublk block device (root and ublk_drv needed); the path is logged.
    #[arg(long)]
    pub ublk: bool,
    /// Become primary at start.
    #[arg(long)]
    pub primary: bool,
    /// With --primary: also promote an Inconsistent/Outdated disk (initial sync source).
    #[arg(long)]
    pub force: bool,
    /// Replication protocol: A, B or C.
    #[arg(long, default_value = "C")]
    pub protocol: Protocol,
    /// What a primary does when it loses the peer: dont-care, resource-only,
    /// resource-and-stonith.
    #[arg(long, default_value = "dont-care")]
    pub fencing: FencingPolicy,
    /// The local fencing decision when asked to outdate the peer: allow or deny.
    #[arg(long, default_value = "allow")]
    pub fence_peer: String,
    /// Split-brain policy: disconnect, discard-zero-changes, discard-younger-primary.
    #[arg(long, default_value = "disconnect")]
    pub split_brain: String,
    /// Resync rate limit in bytes/s (0 = as fast as disk and network allow).
    #[arg(long, default_value_t = 0)]
    pub resync_rate: u64,
    /// Fixed rate (no dynamic controller leaving room for application writes).
    #[arg(long)]
    pub resync_fixed: bool,
    /// Compare checksums before sending resync data.
    #[arg(long)]
    pub checksum_resync: bool,
    /// Resync request size in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub resync_request: u64,
    /// A directory off the backing device where a disk failure is recorded
    /// (`<name>.disk-failed`), so that the disk, should it come back with its old
    /// metadata, takes a full sync (tandemd's cluster uses its state directory).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Backing I/O engine: uring or sync.
    #[arg(long, default_value = "uring")]
    pub engine: String,
    /// io_uring I/O threads.
    #[arg(long, default_value_t = 1)]
    pub io_threads: usize,
    #[arg(long, default_value_t = 1000)]
    pub ping_interval_ms: u64,
    #[arg(long, default_value_t = 5000)]
    pub ping_timeout_ms: u64,
    /// Async worker threads (besides the io_uring threads).
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
}

impl ReplicaArgs {
    fn volume_config(&self) -> Result<VolumeConfig> {
        let mut c = VolumeConfig::new(&self.name, self.backing.clone());
        c.failure_record = self
            .state_dir
            .as_ref()
            .map(|dir| dir.join(format!("{}.disk-failed", self.name)));
        if let Some(md) = &self.metadata {
            c.metadata = MetadataLocation::External(md.clone());
        }
        c.engine = match self.engine.as_str() {
            "uring" => Engine::Uring,
            "sync" => Engine::Sync,
            other => {
                return Err(TandemError::BadConfig(format!(
                    "--engine {other}: expected uring or sync"
                )));
            }
        };
        c.io_threads = self.io_threads.max(1);
        c.protocol = self.protocol;
        c.fencing = self.fencing;
        c.split_brain = match self.split_brain.as_str() {
            "disconnect" => SplitBrainPolicy::Disconnect,
            "discard-zero-changes" => SplitBrainPolicy::DiscardZeroChanges,
            "discard-younger-primary" => SplitBrainPolicy::DiscardYoungerPrimary,
            other => {
                return Err(TandemError::BadConfig(format!(
                    "--split-brain {other}: expected disconnect, discard-zero-changes or discard-younger-primary"
                )));
            }
        };
        c.ping_interval_ms = self.ping_interval_ms.max(10);
        c.ping_timeout_ms = self.ping_timeout_ms.max(c.ping_interval_ms * 2);
        c.resync = ResyncConfig {
            max_bytes_per_sec: self.resync_rate,
            dynamic: !self.resync_fixed,
            checksum: self.checksum_resync,
            request_bytes: self.resync_request.clamp(4096, 4 << 20),
            ..ResyncConfig::default()
        };
        Ok(c)
    }

    /// The control socket path.
    pub fn control_path(&self) -> PathBuf {
        self.control
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/run/tandem/replica-{}.sock", self.name)))
    }
}

/// Builds the async runtime and runs the replica on it (what `tandemd replica` does).
pub fn main(args: ReplicaArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .thread_name("tandemd")
        .build()
        .map_err(TandemError::io("starting the async runtime"))?;
    runtime.block_on(run(args))
}

/// Runs a standalone replica until SIGTERM or SIGINT, then shuts it down cleanly.
pub async fn run(args: ReplicaArgs) -> Result<()> {
    let config = args.volume_config()?;
    let allow = match args.fence_peer.as_str() {
        "allow" => true,
        "deny" => false,
        other => {
            return Err(TandemError::BadConfig(format!(
                "--fence-peer {other}: expected allow or deny"
            )));
        }
    };
    let connector: Option<Arc<dyn PeerConnector>> = match (args.listen, args.peer) {
        (Some(listen), Some(peer)) => {
            let active = listen.to_string() < peer.to_string();
            Some(Arc::new(TcpConnector::new(listen, peer, active).await?))
        }
        (None, None) => None,
        _ => {
            return Err(TandemError::BadConfig(
                "--listen and --peer go together (or neither, for no peer)".into(),
            ));
        }
    };
    let volume = Volume::start(config, connector, Arc::new(LocalFencer { allow })).await?;
    let control_path = args.control_path();
    let _control = control::serve(&control_path, volume.clone()).await?;
    if args.primary {
        volume.promote(args.force).await?;
    }
    let exports = crate::frontend::nbd::Exports::new(vec![volume.clone()]);
    if let Some(addr) = args.nbd {
        let (local, _task) = crate::frontend::nbd::serve_tcp(addr, exports.clone()).await?;
        tracing::info!(nbd = %local, "NBD export ready");
    }
    if let Some(path) = &args.nbd_socket {
        let _task = crate::frontend::nbd::serve_unix(path, exports.clone()).await?;
        tracing::info!(nbd = %path.display(), "NBD export ready");
    }
    let ublk = if args.ublk {
        let v = volume.clone();
        let handle = tokio::runtime::Handle::current();
        let dev = tokio::task::spawn_blocking(move || {
            crate::frontend::ublk::UblkDevice::start(v, handle)
        })
        .await
        .map_err(|e| TandemError::Ublk {
            what: format!("starting the device: {e}"),
        })??;
        tracing::info!(device = %dev.path(), "ublk device ready");
        Some(dev)
    } else {
        None
    };
    tracing::info!(control = %control_path.display(), "replica ready");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(TandemError::io("installing the SIGTERM handler"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
    if let Some(dev) = ublk {
        let _ = tokio::task::spawn_blocking(move || dev.stop()).await;
    }
    let _ = volume.demote().await;
    let r = volume.shutdown().await;
    let _ = std::fs::remove_file(&control_path);
    r
}
