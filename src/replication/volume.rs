//! [`Volume`]: the handle the daemon, the frontends and the cluster drive a replicated
//! volume through.
//!
//! Seams for the cluster layer:
//! - roles and links: [`Volume::promote`], [`Volume::demote`], [`Volume::connect`],
//!   [`Volume::disconnect`], [`Volume::discard_my_data`];
//! - fencing: a [`Fencer`] is asked to record the peer as outdated before the primary
//!   acknowledges any write without it (DRBD's `fence-peer` handler); the cluster bumps
//!   the epoch with [`Volume::set_epoch`] (a returning old primary is then refused and
//!   outdated) and marks a secondary outdated with [`Volume::outdate`];
//! - observation: [`Volume::status`] (a serde snapshot) and [`Volume::events`] (a stream
//!   like `drbdsetup events2`);
//! - transport: a [`PeerConnector`](super::transport::PeerConnector) hands the volume
//!   connected streams, so the cluster can authenticate them first.

use super::core::{Admin, IoFailure, Notice, ResyncConfig, Status};
use super::transport::{BoxFuture, PeerConnector};
use super::types::{Epoch, FencingPolicy, NodeId, Protocol, SplitBrainPolicy};
use crate::error::{Result, TandemError};
use crate::store::{AlignedBuf, BlockStore, DataBuf, Engine};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc, oneshot};

/// How long a clean shutdown waits for the writes still landing on the disk.
const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Records the peer as outdated (or refuses to) before a primary writes alone.
///
/// The cluster implements it through its replicated log (needs quorum); standalone mode
/// uses [`LocalFencer`]. An `Err` keeps application I/O suspended under
/// `resource-and-stonith` until a retry succeeds or the peer reconnects.
pub trait Fencer: Send + Sync + std::fmt::Debug + 'static {
    fn outdate_peer(&self, volume: &str) -> BoxFuture<std::result::Result<(), String>>;
}

/// Standalone fencing: a fixed local decision (there is nobody to ask).
#[derive(Debug, Clone, Copy)]
pub struct LocalFencer {
    /// Treat the peer as outdated (true) or refuse (false: I/O stays suspended).
    pub allow: bool,
}

impl Fencer for LocalFencer {
    fn outdate_peer(&self, volume: &str) -> BoxFuture<std::result::Result<(), String>> {
        let allow = self.allow;
        let volume = volume.to_owned();
        Box::pin(async move {
            if allow {
                tracing::warn!(volume = %volume, "standalone mode: assuming the peer is outdated (no cluster to record it)");
                Ok(())
            } else {
                Err("standalone fencing policy refuses to write without the peer".into())
            }
        })
    }
}

/// Where the metadata lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MetadataLocation {
    /// At the end of the backing device.
    Internal,
    /// In a separate file or device.
    External(PathBuf),
}

/// How to run one replicated volume.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    pub name: String,
    pub backing: PathBuf,
    pub metadata: MetadataLocation,
    pub engine: Engine,
    /// I/O threads (one io_uring each).
    pub io_threads: usize,
    pub protocol: Protocol,
    pub fencing: FencingPolicy,
    pub split_brain: SplitBrainPolicy,
    pub ping_interval_ms: u64,
    pub ping_timeout_ms: u64,
    pub resync: ResyncConfig,
    /// Put over the backing store once it is open (none in tandemd's own use).
    pub store_layer: Option<StoreLayer>,
    /// Where to record that the disk failed (a file in the node's state directory, off
    /// the backing device). A disk that fails may come back with its old metadata, which
    /// looks Consistent and in sync; with a record, the volume's next start makes it
    /// take a full sync instead. Without one (a bare `tandemd replica` without
    /// `--state-dir`), only a peer that saw the failure knows.
    pub failure_record: Option<PathBuf>,
}

/// A layer a volume puts over its backing store once it is open, for an embedder's
/// instrumentation or a test's fault injection (a disk that starts failing): every data
/// I/O of the volume goes through the store it returns.
#[derive(Clone)]
pub struct StoreLayer(Arc<WrapStore>);

type WrapStore = dyn Fn(Arc<dyn BlockStore>) -> Arc<dyn BlockStore> + Send + Sync;

impl StoreLayer {
    pub fn new(
        wrap: impl Fn(Arc<dyn BlockStore>) -> Arc<dyn BlockStore> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(wrap))
    }

    pub(super) fn wrap(&self, store: Arc<dyn BlockStore>) -> Arc<dyn BlockStore> {
        (self.0)(store)
    }
}

impl std::fmt::Debug for StoreLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreLayer")
    }
}

impl VolumeConfig {
    /// Defaults: internal metadata, io_uring, protocol C, 1 s pings, 5 s timeout.
    pub fn new(name: &str, backing: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            backing,
            metadata: MetadataLocation::Internal,
            engine: Engine::Uring,
            io_threads: 1,
            protocol: Protocol::C,
            fencing: FencingPolicy::ResourceAndStonith,
            split_brain: SplitBrainPolicy::Disconnect,
            ping_interval_ms: 1000,
            ping_timeout_ms: 5000,
            resync: ResyncConfig::default(),
            store_layer: None,
            failure_record: None,
        }
    }
}

/// One entry of the events stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeEvent {
    pub volume: String,
    pub node_id: NodeId,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    #[serde(flatten)]
    pub notice: Notice,
}

/// What the status snapshot adds to the core's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    pub name: String,
    pub backing: PathBuf,
    pub peer: Option<String>,
    #[serde(flatten)]
    pub replica: Status,
}

pub(super) enum AppOp {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        data: DataBuf,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        zeroes: bool,
    },
}

pub(super) type AppReply = std::result::Result<Option<AlignedBuf>, IoFailure>;

pub(super) enum Command {
    App(AppOp, oneshot::Sender<AppReply>),
    Admin(Admin, oneshot::Sender<std::result::Result<(), String>>),
    Status(oneshot::Sender<VolumeStatus>),
}

/// A handle to a running volume (cheap to clone).
#[derive(Debug, Clone)]
pub struct Volume {
    pub(super) name: Arc<str>,
    pub(super) tx: mpsc::UnboundedSender<super::shell::Input>,
    pub(super) events: broadcast::Sender<VolumeEvent>,
    pub(super) size_bytes: u64,
    pub(super) block_bytes: u64,
    /// Latency of acknowledged application writes.
    pub(super) write_latency: Arc<super::latency::LatencyHistogram>,
    /// The cluster's quorum lease, once a cluster runs this volume: no application I/O
    /// without it.
    pub(super) lease: Arc<std::sync::OnceLock<super::lease::VolumeLease>>,
}

impl Volume {
    /// Opens the backing store and metadata and starts the volume's task. The volume
    /// starts secondary and, when `connector` is given, connecting.
    pub async fn start(
        config: VolumeConfig,
        connector: Option<Arc<dyn PeerConnector>>,
        fencer: Arc<dyn Fencer>,
    ) -> Result<Self> {
        super::shell::start(config, connector, fencer).await
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Exported size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Offset and length alignment of requests.
    pub fn block_bytes(&self) -> u64 {
        self.block_bytes
    }

    fn gone(&self) -> TandemError {
        TandemError::VolumeGone(self.name.to_string())
    }

    /// Makes application I/O on this volume, while primary, wait for the cluster's
    /// quorum lease (set once; see [`super::lease`]).
    pub fn follow_lease(&self, gate: super::lease::VolumeLease) {
        let _ = self.lease.set(gate);
    }

    /// The volume's lease gate, if a cluster set one.
    pub fn lease(&self) -> Option<&super::lease::VolumeLease> {
        self.lease.get()
    }

    async fn app(&self, op: AppOp) -> Result<Option<AlignedBuf>> {
        if let Some(gate) = self.lease.get()
            && let Err(e) = gate.admit().await
        {
            return Err(TandemError::VolumeState {
                volume: self.name.to_string(),
                operation: "I/O".into(),
                reason: e.to_string(),
            });
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(super::shell::Input::Command(Command::App(op, tx)))
            .map_err(|_| self.gone())?;
        match rx.await.map_err(|_| self.gone())? {
            Ok(buf) => Ok(buf),
            Err(IoFailure::Refused(reason)) => Err(TandemError::VolumeState {
                volume: self.name.to_string(),
                operation: "I/O".into(),
                reason,
            }),
            Err(IoFailure::Io(reason)) => Err(TandemError::VolumeIo {
                volume: self.name.to_string(),
                reason,
            }),
        }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<AlignedBuf> {
        self.app(AppOp::Read { offset, len })
            .await?
            .ok_or_else(|| TandemError::VolumeIo {
                volume: self.name.to_string(),
                reason: "read returned no data".into(),
            })
    }

    /// Writes `data` at `offset`; `fua` = durable on both nodes before completion.
    pub async fn write(&self, offset: u64, data: DataBuf, fua: bool) -> Result<()> {
        let started = std::time::Instant::now();
        self.app(AppOp::Write { offset, data, fua }).await?;
        self.write_latency.record(started.elapsed());
        Ok(())
    }

    /// Latency of the writes acknowledged so far.
    pub fn write_latency(&self) -> super::latency::LatencySnapshot {
        self.write_latency.snapshot()
    }

    /// Makes every completed write durable on both nodes.
    pub async fn flush(&self) -> Result<()> {
        self.app(AppOp::Flush).await.map(drop)
    }

    /// Discards (`zeroes = false`) or zeroes a range.
    pub async fn trim(&self, offset: u64, len: u64, zeroes: bool) -> Result<()> {
        self.app(AppOp::Trim {
            offset,
            len,
            zeroes,
        })
        .await
        .map(drop)
    }

    async fn admin(&self, cmd: Admin) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let operation = format!("{cmd:?}");
        self.tx
            .send(super::shell::Input::Command(Command::Admin(cmd, tx)))
            .map_err(|_| self.gone())?;
        rx.await
            .map_err(|_| self.gone())?
            .map_err(|reason| TandemError::VolumeState {
                volume: self.name.to_string(),
                operation,
                reason,
            })
    }

    /// Becomes primary (`force` also promotes an Inconsistent or Outdated disk).
    pub async fn promote(&self, force: bool) -> Result<()> {
        self.admin(Admin::Promote { force }).await
    }
    /// Becomes secondary (refused while writes are in flight).
    pub async fn demote(&self) -> Result<()> {
        self.admin(Admin::Demote).await
    }
    /// Stops being primary at once: writes in flight fail (none was acknowledged) and the
    /// disk becomes Outdated, as when fenced. For the cluster when a primary loses quorum
    /// or learns it was replaced.
    pub async fn step_down(&self) -> Result<()> {
        self.admin(Admin::StepDown).await
    }
    /// Lost quorum: hold every acknowledgement and queue new I/O ([`Admin::SuspendIo`]).
    pub async fn suspend_io(&self) -> Result<()> {
        self.admin(Admin::SuspendIo).await
    }
    /// The cluster confirmed this primary: release held I/O ([`Admin::ResumeIo`]).
    pub async fn resume_io(&self) -> Result<()> {
        self.admin(Admin::ResumeIo).await
    }
    /// Starts connecting to the peer.
    pub async fn connect(&self) -> Result<()> {
        self.admin(Admin::Connect).await
    }
    /// Drops the peer connection and stays standalone.
    pub async fn disconnect(&self) -> Result<()> {
        self.admin(Admin::Disconnect).await
    }
    /// Resolves a split brain on the next connect by discarding this node's changes.
    pub async fn discard_my_data(&self) -> Result<()> {
        self.admin(Admin::DiscardMyData).await
    }
    /// The cluster moved to a newer fencing epoch.
    pub async fn set_epoch(&self, epoch: Epoch) -> Result<()> {
        self.admin(Admin::SetEpoch(epoch)).await
    }
    /// The cluster whose log this replica follows (refused, with the recovery command,
    /// if the metadata follows another).
    pub async fn join_cluster_log(&self, log: super::types::ClusterLogId) -> Result<()> {
        self.admin(Admin::JoinClusterLog(log)).await
    }
    /// The cluster recorded this (disconnected secondary) disk as outdated.
    pub async fn outdate(&self) -> Result<()> {
        self.admin(Admin::Outdate).await
    }
    /// Starts an online verify (connected, not syncing).
    pub async fn verify(&self) -> Result<()> {
        self.admin(Admin::StartVerify).await
    }
    /// Changes the resync rate limit (bytes/s, 0 = unlimited).
    pub async fn set_resync_rate(&self, max_bytes_per_sec: u64) -> Result<()> {
        self.admin(Admin::SetResyncRate { max_bytes_per_sec }).await
    }
    /// Writes metadata back cleanly and stops the volume. Returns once it has stopped:
    /// the writes still landing on the disk land first (a process that exits before
    /// would leave their blocks undefined while the metadata calls them clean).
    pub async fn shutdown(&self) -> Result<()> {
        self.admin(Admin::Shutdown).await?;
        if tokio::time::timeout(SHUTDOWN_WAIT, self.tx.closed())
            .await
            .is_err()
        {
            return Err(TandemError::VolumeState {
                volume: self.name.to_string(),
                operation: "Shutdown".into(),
                reason: format!(
                    "writes still in flight on the disk after {} s; the volume was not \
                     stopped cleanly",
                    SHUTDOWN_WAIT.as_secs()
                ),
            });
        }
        Ok(())
    }

    /// The status snapshot.
    pub async fn status(&self) -> Result<VolumeStatus> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(super::shell::Input::Command(Command::Status(tx)))
            .map_err(|_| self.gone())?;
        rx.await.map_err(|_| self.gone())
    }

    /// Subscribes to state changes.
    pub fn events(&self) -> broadcast::Receiver<VolumeEvent> {
        self.events.subscribe()
    }
}
