//! Replicated volumes under the cluster: the replication engine's [`Volume`] driven by the
//! cluster log.
//!
//! - Peer connections: the authenticated transport's `replication/<volume>` channel; the
//!   replica with the lower node id dials, the other accepts.
//! - Fencing hook: before a primary acknowledges any write without its peer, it records
//!   the peer Outdated in the cluster log ([`OutdatePeer`]); without quorum it cannot, and
//!   its writes wait.
//! - Epochs: the log's volume epoch is the replication epoch; the peer refuses a primary
//!   from an older one.
//! - Quorum loss: the primary suspends I/O (DRBD's `on-no-quorum suspend-io`): nothing is
//!   acknowledged, finished writes are held and new ones queue. When it hears the
//!   majority again and the leader confirms the log still names it, the held writes
//!   complete; if it was replaced, the newer epoch fails them (never acknowledged) and it
//!   resyncs as a secondary.
//! - Frontends: the NBD export (TCP on 127.0.0.0/8 or a unix socket) and optionally ublk.

use super::config::{Config, Protocol as ConfigProtocol};
use super::node::{Node, NodeError};
use super::orchestrator::{DiskState, ReplicaReport, ReplicaRole, SyncProgress};
use super::transport::{Channel, client_handshake};
use super::types::{Epoch, NodeId};
use super::volume::{BoxFuture, VolumeAction, VolumeDriver};
use crate::replication::core::{Notice, Status};
use crate::replication::transport::{BoxFuture as ReplBoxFuture, PeerConnector, PeerStream};
use crate::replication::types::{
    ConnState, DiskState as ReplDisk, Epoch as ReplEpoch, FencingPolicy, Protocol, Role,
};
use crate::replication::volume::{Fencer as ReplFencer, MetadataLocation, Volume, VolumeConfig};
use crate::store::metadata::{CreateParams, MetadataFile};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OnceCell, mpsc};

/// The node, once it exists (volumes start before the node that drives them).
pub type NodeSlot = Arc<OnceCell<Node>>;

/// Dials or accepts the peer replica over the authenticated transport.
struct ConnectorInner {
    slot: NodeSlot,
    volume: String,
    peer: NodeId,
    peer_address: SocketAddr,
    bind: std::net::IpAddr,
    active: bool,
    inbound: tokio::sync::Mutex<Option<mpsc::Receiver<(NodeId, tokio::net::TcpStream)>>>,
}

/// The replication engine's connector, over the cluster's transport.
#[derive(Clone)]
struct ClusterConnector(Arc<ConnectorInner>);

impl std::fmt::Debug for ClusterConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConnector")
            .field("volume", &self.0.volume)
            .field("peer", &self.0.peer)
            .field("active", &self.0.active)
            .finish_non_exhaustive()
    }
}

impl ConnectorInner {
    async fn dial(&self, node: &Node) -> Result<tokio::net::TcpStream, String> {
        let socket = if self.peer_address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        socket
            .bind(SocketAddr::new(self.bind, 0))
            .map_err(|e| e.to_string())?;
        let mut stream =
            tokio::time::timeout(Duration::from_secs(2), socket.connect(self.peer_address))
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        let creds = node.credentials().map_err(|e| e.to_string())?;
        client_handshake(
            &mut stream,
            &creds,
            self.peer,
            &Channel::Replication(self.volume.clone()),
        )
        .await
        .map_err(|e| e.to_string())?;
        Ok(stream)
    }

    async fn next_stream(&self) -> (Box<dyn PeerStream>, String) {
        let node = loop {
            match self.slot.get() {
                Some(node) => break node,
                None => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let mut backoff = Duration::from_millis(50);
        loop {
            if self.active {
                match self.dial(node).await {
                    Ok(stream) => {
                        return (
                            Box::new(stream) as Box<dyn PeerStream>,
                            format!("node {}", self.peer),
                        );
                    }
                    Err(e) => {
                        tracing::debug!(volume = %self.volume, peer = %self.peer, error = %e, "replication dial failed");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(500));
                    }
                }
            } else {
                let mut inbound = self.inbound.lock().await;
                let rx = inbound.get_or_insert_with(|| {
                    node.accept_channel(Channel::Replication(self.volume.clone()))
                });
                match rx.recv().await {
                    Some((from, stream)) if from == self.peer => {
                        return (
                            Box::new(stream) as Box<dyn PeerStream>,
                            format!("node {from}"),
                        );
                    }
                    Some((from, _)) => {
                        tracing::warn!(volume = %self.volume, peer = %from, "replication connection from a node without a replica; refused");
                    }
                    None => tokio::time::sleep(backoff).await,
                }
            }
        }
    }
}

impl PeerConnector for ClusterConnector {
    fn connect(&self) -> ReplBoxFuture<(Box<dyn PeerStream>, String)> {
        let inner = Arc::clone(&self.0);
        Box::pin(async move { inner.next_stream().await })
    }
}

/// Records the peer Outdated through the cluster log.
#[derive(Debug)]
struct ClusterFencer {
    slot: NodeSlot,
    volume: String,
    peer: NodeId,
    peer_uptodate_events: Arc<std::sync::atomic::AtomicU64>,
}

impl ReplFencer for ClusterFencer {
    fn outdate_peer(&self, _volume: &str) -> ReplBoxFuture<Result<(), String>> {
        let slot = Arc::clone(&self.slot);
        let volume = self.volume.clone();
        let peer = self.peer;
        let counted = self.peer_uptodate_events.load(Ordering::Acquire);
        Box::pin(async move {
            let node = slot.get().ok_or("the node is not running yet")?;
            node.note_outdating(&volume, counted);
            node.outdater().outdate_peer(&volume, peer).await
        })
    }
}

/// A replicated volume as the cluster drives it.
#[derive(Debug, Clone)]
pub struct ClusterVolume {
    name: String,
    volume: Volume,
    report: Arc<Mutex<ReplicaReport>>,
    suspended: Arc<AtomicBool>,
    device: Arc<Mutex<Option<String>>>,
    /// PeerDisk→UpToDate transitions seen on the volume's event stream.
    peer_uptodate_events: Arc<std::sync::atomic::AtomicU64>,
}

fn disk(d: ReplDisk) -> DiskState {
    match d {
        ReplDisk::Diskless | ReplDisk::DUnknown => DiskState::Diskless,
        ReplDisk::Inconsistent => DiskState::Inconsistent,
        ReplDisk::Outdated => DiskState::Outdated,
        ReplDisk::Consistent => DiskState::Consistent,
        ReplDisk::UpToDate => DiskState::UpToDate,
    }
}

fn report_of(
    status: &Status,
    suspended: bool,
    device: Option<String>,
    peer_uptodate_events: u64,
) -> ReplicaReport {
    ReplicaReport {
        disk: disk(status.disk),
        role: match status.role {
            Role::Primary => ReplicaRole::Primary,
            Role::Secondary => ReplicaRole::Secondary,
        },
        connected: matches!(
            status.connection,
            ConnState::Connected
                | ConnState::SyncSource
                | ConnState::SyncTarget
                | ConnState::Verifying
        ),
        syncing: matches!(
            status.connection,
            ConnState::SyncSource | ConnState::SyncTarget | ConnState::WfBitmap
        ),
        // The quorum-loss flag matters to a primary only.
        suspended: (suspended && status.role == Role::Primary) || status.io_suspended,
        peer_disk: disk(status.peer_disk),
        peer_uptodate_events,
        epoch: Epoch(status.epoch.0),
        out_of_sync_bytes: status.out_of_sync_bytes,
        resources_running: false,
        sync: status.sync.as_ref().map(|s| SyncProgress {
            done_bytes: s.done_bytes,
            total_bytes: s.total_bytes,
            rate_bytes_per_sec: s.rate_bytes_per_sec,
        }),
        device,
    }
}

/// How long a planned demotion waits for the writes in flight before it fails them.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);

impl ClusterVolume {
    /// The replication engine's handle.
    pub fn volume(&self) -> &Volume {
        &self.volume
    }

    /// Exports the volume as a ublk block device (root and `ublk_drv` needed).
    pub async fn start_ublk(&self) -> Result<crate::frontend::ublk::UblkDevice, NodeError> {
        let volume = self.volume.clone();
        let handle = tokio::runtime::Handle::current();
        let device = tokio::task::spawn_blocking(move || {
            crate::frontend::ublk::UblkDevice::start(volume, handle)
        })
        .await
        .map_err(|e| NodeError::Propose(format!("starting ublk: {e}")))?
        .map_err(|e| NodeError::Propose(format!("starting ublk for {}: {e}", self.name)))?;
        *self.device.lock().unwrap_or_else(|e| e.into_inner()) = Some(device.path().to_owned());
        Ok(device)
    }

    fn set_report(&self, status: &Status) {
        // Also count transitions seen by polling, in case the event stream lagged.
        let previous = self
            .report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .peer_disk;
        if previous != DiskState::UpToDate && status.peer_disk == ReplDisk::UpToDate {
            self.peer_uptodate_events.fetch_add(1, Ordering::AcqRel);
        }
        let device = self
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let report = report_of(
            status,
            self.suspended.load(Ordering::Acquire),
            device,
            self.peer_uptodate_events.load(Ordering::Acquire),
        );
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = report;
    }

    async fn refresh(&self) {
        if let Ok(status) = self.volume.status().await {
            self.set_report(&status.replica);
            // A refusal over roles or epochs ("both nodes are primary", "peer is primary
            // at an old epoch") is transient under the cluster: the log resolves it, and
            // the link must be tried again. Split brain and unrelated data stay refused
            // until an operator decides (`tandemctl resolve`).
            let transient = status
                .replica
                .last_refusal
                .as_deref()
                .is_some_and(|r| r.contains("primary"));
            if status.replica.connection == ConnState::StandAlone && transient {
                tracing::info!(volume = %self.name, "reconnecting after a transient refusal");
                let _ = self.volume.connect().await;
            }
        }
    }

    /// The cluster wants this replica to stop being primary (a planned stop, a
    /// switchover, a life that ended): gracefully — new requests wait at the lease gate
    /// while those in flight finish, then it demotes and the held ones fail — and only if
    /// they do not finish in [`DRAIN_LIMIT`] by failing them (none was acknowledged).
    /// Stepping down outdates the disk; a busy primary that is the only good copy must
    /// not do that on a routine restart.
    async fn demote_draining(&self) -> Result<(), String> {
        if let Some(lease) = self.volume.lease() {
            lease.hold(true);
        }
        let deadline = std::time::Instant::now() + DRAIN_LIMIT;
        loop {
            match self.volume.demote().await {
                Ok(()) => return Ok(()),
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => {
                    tracing::warn!(volume = %self.name, error = %e, "writes still in flight after {DRAIN_LIMIT:?}; stepping down");
                    return self.volume.step_down().await.map_err(|e| e.to_string());
                }
            }
        }
    }
}

impl VolumeDriver for ClusterVolume {
    fn report(&self) -> ReplicaReport {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn apply(&self, action: VolumeAction) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let result = match action {
                VolumeAction::Promote { epoch, force, log } => {
                    // The gate closes before the first write can be taken: a primary
                    // serves nothing without the quorum lease.
                    if let Some(lease) = self.volume.lease() {
                        lease.set_primary(true);
                    }
                    self.volume
                        .join_cluster_log(log)
                        .await
                        .map_err(|e| e.to_string())?;
                    self.volume
                        .set_epoch(ReplEpoch(epoch.0))
                        .await
                        .map_err(|e| e.to_string())?;
                    let r = self.volume.promote(force).await.map_err(|e| e.to_string());
                    if r.is_ok() {
                        self.suspended.store(false, Ordering::Release);
                    }
                    r
                }
                // The cluster wants this replica to stop being primary: gracefully if it
                // can (a planned switchover stopped the resources first), otherwise by
                // failing the writes still in flight — none of them was acknowledged.
                VolumeAction::Demote => {
                    self.suspended.store(false, Ordering::Release);
                    self.demote_draining().await
                }
                VolumeAction::SetEpoch { epoch, log } => {
                    self.volume
                        .join_cluster_log(log)
                        .await
                        .map_err(|e| e.to_string())?;
                    // A new epoch ends a quorum-loss suspension story: someone else is
                    // primary now (or this node is promoted afresh).
                    self.suspended.store(false, Ordering::Release);
                    self.volume
                        .set_epoch(ReplEpoch(epoch.0))
                        .await
                        .map_err(|e| e.to_string())
                }
                VolumeAction::Suspend => {
                    // No quorum: acknowledge nothing from now on (the log may already
                    // have named another primary). Writes are held, not failed: if the
                    // cluster confirms this primary when quorum returns they complete; if
                    // it was replaced, the newer epoch fails them.
                    self.suspended.store(true, Ordering::Release);
                    self.volume.suspend_io().await.map_err(|e| e.to_string())
                }
                VolumeAction::Resume => {
                    self.suspended.store(false, Ordering::Release);
                    self.volume.resume_io().await.map_err(|e| e.to_string())
                }
                VolumeAction::StepDown => {
                    self.suspended.store(false, Ordering::Release);
                    self.volume.step_down().await.map_err(|e| e.to_string())
                }
            };
            self.refresh().await;
            if let Some(lease) = self.volume.lease() {
                lease.set_primary(self.report().role == ReplicaRole::Primary);
                lease.hold(false);
            }
            result
        })
    }

    fn follow_lease(&self, holder: &crate::replication::lease::LeaseHolder) {
        self.volume.follow_lease(holder.volume());
    }

    fn discard_my_data(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.volume
                .discard_my_data()
                .await
                .map_err(|e| e.to_string())?;
            self.volume.connect().await.map_err(|e| e.to_string())
        })
    }
}

/// Creates a backing file and fresh metadata for a volume that does not exist yet on
/// this node. Existing files or devices are never touched: their metadata must be
/// created on purpose (`tandemctl create-md`).
fn ensure_backing(
    volume: &super::config::VolumeConfig,
    node_id: NodeId,
    backing: &Path,
    metadata: Option<&Path>,
) -> Result<(), NodeError> {
    if backing.exists() {
        return Ok(());
    }
    let io = |source| NodeError::StateDir {
        path: backing.to_path_buf(),
        source,
    };
    if let Some(dir) = backing.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let size = volume.size_bytes();
    let mut params = CreateParams::new(
        crate::replication::types::VolumeId::from_name(&volume.name),
        crate::replication::types::NodeId(u32::try_from(node_id.0).unwrap_or(u32::MAX)),
    );
    params.al_extents = volume.al_extents;
    let (file_size, md_path) = match metadata {
        Some(md) => {
            params.internal = false;
            params.data_size_bytes = Some(size);
            (size, md.to_path_buf())
        }
        None => {
            // Room for the metadata at the end, chosen so the data part is exactly the
            // configured size (the same computation `MetadataFile::create` makes).
            let data_of = |file: u64| {
                let md = crate::store::metadata::Layout::new(
                    file,
                    params.bitmap_granularity,
                    params.al_slots,
                )
                .md_size_bytes;
                file.saturating_sub(md) / 4096 * 4096
            };
            let mut file_size = size;
            while data_of(file_size) < size {
                file_size += 4096;
            }
            (file_size, backing.to_path_buf())
        }
    };
    let file = std::fs::File::create(backing).map_err(io)?;
    file.set_len(file_size).map_err(io)?;
    drop(file);
    MetadataFile::create(&md_path, &params).map_err(|e| {
        NodeError::Propose(format!(
            "creating metadata for {} on {}: {e}",
            volume.name,
            md_path.display()
        ))
    })?;
    tracing::info!(volume = %volume.name, backing = %backing.display(), size, "created a new replica");
    Ok(())
}

/// Starts this node's replicas of every configured volume.
pub async fn start_volumes(
    config: &Config,
    node_name: &str,
    slot: &NodeSlot,
) -> Result<Vec<ClusterVolume>, NodeError> {
    let me = config
        .node_by_name(node_name)
        .ok_or_else(|| NodeError::UnknownNode(node_name.to_owned()))?
        .clone();
    let mut volumes = Vec::new();
    for volume in &config.volumes {
        let Some(on_node) = volume.on_node(node_name) else {
            continue;
        };
        if !on_node.shared_devices.is_empty() {
            // A shared-device volume: nothing to replicate (see `shared`).
            continue;
        }
        ensure_backing(volume, me.id, &on_node.backing, on_node.metadata.as_deref())?;
        let mut vc = VolumeConfig::new(&volume.name, on_node.backing.clone());
        if let Some(md) = &on_node.metadata {
            vc.metadata = MetadataLocation::External(md.clone());
        }
        vc.protocol = match volume.protocol {
            ConfigProtocol::A => Protocol::A,
            ConfigProtocol::B => Protocol::B,
            ConfigProtocol::C => Protocol::C,
        };
        vc.fencing = FencingPolicy::ResourceAndStonith;
        vc.failure_record = Some(
            config
                .state_dir(node_name)
                .join("replicas")
                .join(format!("{}.disk-failed", volume.name)),
        );
        vc.ping_interval_ms = config.cluster.heartbeat_ms;
        vc.ping_timeout_ms = config.cluster.failure_timeout_ms;
        let peer_uptodate_events: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let peer = volume
            .nodes
            .iter()
            .filter(|n| **n != node_name)
            .find_map(|n| config.node_by_name(n))
            .cloned();
        let (connector, fencer): (Option<Arc<dyn PeerConnector>>, Arc<dyn ReplFencer>) = match &peer
        {
            Some(peer) => {
                let connector = ClusterConnector(Arc::new(ConnectorInner {
                    slot: Arc::clone(slot),
                    volume: volume.name.clone(),
                    peer: peer.id,
                    peer_address: peer.address,
                    bind: me.address.ip(),
                    active: me.id < peer.id,
                    inbound: tokio::sync::Mutex::new(None),
                }));
                let fencer = Arc::new(ClusterFencer {
                    slot: Arc::clone(slot),
                    volume: volume.name.clone(),
                    peer: peer.id,
                    peer_uptodate_events: Arc::clone(&peer_uptodate_events),
                });
                (Some(Arc::new(connector) as Arc<dyn PeerConnector>), fencer)
            }
            None => (
                None,
                Arc::new(crate::replication::volume::LocalFencer { allow: true })
                    as Arc<dyn ReplFencer>,
            ),
        };
        let handle = Volume::start(vc, connector, fencer)
            .await
            .map_err(|e| NodeError::Propose(format!("starting volume {}: {e}", volume.name)))?;
        let cluster_volume = ClusterVolume {
            name: volume.name.clone(),
            volume: handle,
            report: Arc::default(),
            suspended: Arc::default(),
            device: Arc::default(),
            peer_uptodate_events,
        };
        // Count the peer's disk becoming UpToDate: the evidence a resync really happened.
        let mut events = cluster_volume.volume.events();
        let counter = Arc::clone(&cluster_volume.peer_uptodate_events);
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) => {
                        if let Notice::PeerDisk {
                            state: ReplDisk::UpToDate,
                        } = event.notice
                        {
                            counter.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        cluster_volume.refresh().await;
        // Keep the report fresh for heartbeats.
        let refresher = cluster_volume.clone();
        let period = Duration::from_millis(config.cluster.heartbeat_ms);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                refresher.refresh().await;
            }
        });
        volumes.push(cluster_volume);
    }
    Ok(volumes)
}
