//! One cluster node: the async runner around the pure cores.
//!
//! ```text
//!   listener ── handshake ──► membership: heartbeats → NodeCore, raft RPCs → openraft
//!                            replication/<volume>, dlm: handed to their acceptors
//!   tick (every heartbeat) ──► NodeCore::step(Tick) → heartbeats out, rounds started
//!   NodeCore's operations ──► carried out here (proposals, drivers, resources,
//!                             fencing), each result fed back as Input::Done
//!   state machine ──► watch<ClusterState> + applied entries → events
//! ```
//!
//! The runner decides nothing: every branch on membership, quorum, replica state, time
//! or a result is in [`NodeCore`]; this file feeds it time, heartbeats, the log and
//! results, and carries out what it returns.

use super::config::{Config, NodeRole};
use super::node_core::{Action, CoreConfig, Input, NodeCore, Now, Op, OpResult};
use super::orchestrator::ReplicaReport;
use super::peers::{Heartbeat, Inbound, Peers, serve_inbound};
use super::raft::network::{Network, RaftReply, RaftRpc};
use super::raft::store::{LogStore, StateMachine};
use super::raft::{Proposal, Raft};
use super::state::{ClusterState, Command, Outcome};
use super::status::{ClusterStatus, Event, EventKind, NodeStatus, ReplicaStatus, VolumeStatus};
use super::transport::{Channel, Credentials, server_handshake};
use super::types::{Epoch, Incarnation, Millis, NodeId};
use super::volume::{BoxFuture, OutdatePeer, VolumeDriver};
use crate::replication::lease::LeaseHolder;
use crate::replication::types::ClusterLogId;
use openraft::BasicNode;
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, watch};

/// Errors of a running node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error("node `{0}` is not in the configuration")]
    UnknownNode(String),
    #[error("cannot prepare the state directory {path}")]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {address}")]
    Listen {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the cluster log: {0}")]
    Raft(String),
    #[error("no cluster-log leader is reachable (no quorum?)")]
    NoLeader,
    #[error("the cluster log did not commit in {0:?} (no quorum?)")]
    ProposeTimeout(Duration),
    #[error("proposal failed: {0}")]
    Propose(String),
    #[error("configuration: {0}")]
    Config(#[from] super::config::ConfigError),
}

/// Carries out reservation fencing for volumes with shared devices.
pub trait Fencer: Send + Sync {
    /// Preempts the reservation key of `victim`'s life `incarnation` on `volume`'s shared
    /// devices and confirms it is gone; returns a description for the fencing record.
    fn fence(
        &self,
        volume: &str,
        victim: NodeId,
        incarnation: Incarnation,
    ) -> BoxFuture<'_, Result<String, String>>;
    /// Registers this node's key for life `incarnation` on every shared device (and
    /// reserves where nobody holds a reservation).
    fn unfence(&self, incarnation: Incarnation) -> BoxFuture<'_, Result<(), String>>;
}

/// How to build a node.
pub struct NodeOptions {
    pub config: Config,
    pub node: String,
    /// Local replicas by volume name.
    pub drivers: BTreeMap<String, Arc<dyn VolumeDriver>>,
    pub fencer: Option<Arc<dyn Fencer>>,
}

impl std::fmt::Debug for NodeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeOptions")
            .field("node", &self.node)
            .field("drivers", &self.drivers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// A stream handed over after the transport's handshake.
pub type Accepted = (NodeId, TcpStream);

struct Inner {
    config: Config,
    me: NodeId,
    name: String,
    state_dir: PathBuf,
    started: Instant,
    raft: Raft,
    peers: Arc<Peers>,
    state: watch::Receiver<Arc<ClusterState>>,
    /// Every decision; locked only for a step, never across an await.
    core: Mutex<NodeCore>,
    drivers: BTreeMap<String, Arc<dyn VolumeDriver>>,
    fencer: Option<Arc<dyn Fencer>>,
    events: broadcast::Sender<Event>,
    acceptors: Mutex<BTreeMap<Channel, mpsc::Sender<Accepted>>>,
    stopping: watch::Sender<bool>,
    /// The quorum lease the local replicas serve under.
    lease: LeaseHolder,
}

/// A running node; cheap to clone.
#[derive(Clone)]
pub struct Node {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.inner.name)
            .field("id", &self.inner.me)
            .field("incarnation", &self.incarnation())
            .finish()
    }
}

/// Locks `mutex`, recovering the data from a poisoned lock (a panicked holder cannot
/// leave these maps half-updated in a way that matters more than stopping the node).
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Reads, bumps and durably stores the node's incarnation: every start is a new life.
fn next_incarnation(dir: &std::path::Path) -> std::io::Result<Incarnation> {
    let path = dir.join("incarnation");
    let current = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", path.display()),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    };
    let next = current + 1;
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(next.to_string().as_bytes())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(Incarnation(next))
}

impl Node {
    /// Starts the node: state directory, cluster log, listener, peers, tick loop.
    pub async fn start(options: NodeOptions) -> Result<Self, NodeError> {
        let NodeOptions {
            config,
            node,
            drivers,
            fencer,
        } = options;
        let me_config = config
            .node_by_name(&node)
            .cloned()
            .ok_or_else(|| NodeError::UnknownNode(node.clone()))?;
        let me = me_config.id;
        let dir = config.state_dir(&node);
        let state_dir_error = |source| NodeError::StateDir {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(state_dir_error)?;
        let incarnation = next_incarnation(&dir).map_err(state_dir_error)?;
        let secret = config.secret()?;
        let creds = Credentials::new(&config.cluster.name, me, &secret);

        let listener = TcpListener::bind(me_config.address)
            .await
            .map_err(|source| NodeError::Listen {
                address: me_config.address,
                source,
            })?;

        let addresses: BTreeMap<NodeId, std::net::SocketAddr> =
            config.nodes.iter().map(|n| (n.id, n.address)).collect();
        let peers = Peers::start(creds.clone(), &addresses, Some(me_config.address.ip()));

        let hb = config.cluster.heartbeat_ms;
        let raft_config = openraft::Config {
            cluster_name: config.cluster.name.clone(),
            heartbeat_interval: hb,
            election_timeout_min: hb * 3,
            election_timeout_max: hb * 6,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(500),
            max_in_snapshot_log_to_keep: 50,
            ..Default::default()
        };
        let raft_config = Arc::new(
            raft_config
                .validate()
                .map_err(|e| NodeError::Raft(e.to_string()))?,
        );
        let raft_dir = dir.join("raft");
        let log = LogStore::open(&raft_dir.join("log")).map_err(state_dir_error)?;
        let (machine, state) =
            StateMachine::open(Some(&raft_dir.join("sm"))).map_err(state_dir_error)?;
        let mut applied = machine.subscribe();
        let raft = Raft::new(
            me.0,
            raft_config,
            Network::new(Arc::clone(&peers)),
            log,
            machine,
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        if !raft
            .is_initialized()
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?
        {
            let members: BTreeMap<u64, BasicNode> = config
                .nodes
                .iter()
                .map(|n| (n.id.0, BasicNode::new(n.address.to_string())))
                .collect();
            // Every node may initialise with the same membership; one election follows.
            if let Err(e) = raft.initialize(members).await {
                tracing::debug!(error = %e, "cluster log already initialised");
            }
        }

        let core_config = CoreConfig {
            me,
            incarnation,
            members: config.nodes.iter().map(|n| n.id).collect(),
            volumes: config
                .volumes
                .iter()
                .map(|v| {
                    let replicas = v
                        .nodes
                        .iter()
                        .filter_map(|n| config.node_by_name(n))
                        .map(|n| n.id)
                        .collect();
                    (v.name.clone(), replicas)
                })
                .collect(),
            shared: config
                .volumes
                .iter()
                .filter(|v| {
                    v.on_node(&node)
                        .is_some_and(|o| !o.shared_devices.is_empty())
                })
                .map(|v| v.name.clone())
                .collect(),
            has_fencer: fencer.is_some(),
            failure_timeout_ms: config.cluster.failure_timeout_ms,
            quorum_lease_ms: config.cluster.quorum_lease_ms,
            fresh_log_id: ClusterLogId(rand::random::<u64>() | 1),
        };
        let started = Instant::now();
        let core = NodeCore::new(
            core_config,
            Now {
                mono: Millis(0),
                wall: Millis(wall_ms()),
            },
            state.borrow().clone(),
        );
        let (events, _) = broadcast::channel(4096);
        let (stopping, _) = watch::channel(false);
        let lease = LeaseHolder::expired();
        for driver in drivers.values() {
            driver.follow_lease(&lease);
        }
        let inner = Arc::new(Inner {
            config,
            me,
            name: node,
            state_dir: dir.clone(),
            started,
            raft,
            peers,
            state,
            core: Mutex::new(core),
            drivers,
            fencer,
            events,
            acceptors: Mutex::default(),
            stopping,
            lease,
        });
        let node = Node { inner };
        // Registers this life's key on the shared devices before anything runs.
        let starting = node.step(Input::Start);
        node.settle(starting).await;
        tracing::info!(node = %node.inner.name, node_id = %me, %incarnation, "node started");

        tokio::spawn(node.clone().accept_loop(listener));
        tokio::spawn(node.clone().tick_loop());
        let forward = node.clone();
        tokio::spawn(async move {
            loop {
                match applied.recv().await {
                    Ok(entry) => forward.event(EventKind::Applied { entry }),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Ok(node)
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.me
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// This life's incarnation.
    pub fn incarnation(&self) -> Incarnation {
        locked(&self.inner.core).incarnation()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The cluster state as this node last applied it.
    pub fn state(&self) -> Arc<ClusterState> {
        self.inner.state.borrow().clone()
    }

    /// Follows the cluster state.
    pub fn watch_state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.inner.state.clone()
    }

    /// Subscribes to events.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    /// Registers who takes authenticated connections for `channel` (a volume's
    /// replication, the DLM). Returns the receiving end.
    pub fn accept_channel(&self, channel: Channel) -> mpsc::Receiver<Accepted> {
        let (tx, rx) = mpsc::channel(16);
        locked(&self.inner.acceptors).insert(channel, tx);
        rx
    }

    /// Credentials for outbound authenticated connections of this node.
    pub fn credentials(&self) -> Result<Credentials, NodeError> {
        Ok(Credentials::new(
            &self.inner.config.cluster.name,
            self.inner.me,
            &self.inner.config.secret()?,
        ))
    }

    fn now(&self) -> Millis {
        Millis(u64::try_from(self.inner.started.elapsed().as_millis()).unwrap_or(u64::MAX))
    }

    /// Feeds one input to the core, with the log as this node has applied it now.
    fn step(&self, input: Input) -> Vec<Action> {
        let now = Now {
            mono: self.now(),
            wall: Millis(wall_ms()),
        };
        let state = self.state();
        let mut core = locked(&self.inner.core);
        core.step(now, Input::Log(state));
        core.step(now, input)
    }

    /// Carries out the core's actions; operations run as tasks that feed their results
    /// back.
    fn dispatch(&self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Perform { op, what } => {
                    let node = self.clone();
                    tokio::spawn(async move {
                        let result = node.perform(what).await;
                        let next = node.step(Input::Done { op, result });
                        node.dispatch(next);
                    });
                }
                other => self.immediate(other),
            }
        }
    }

    /// Carries out the core's actions and awaits every operation they lead to, in order
    /// (start, orderly stop, a lost reservation: nothing else may run first).
    async fn settle(&self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Perform { op, what } => {
                    let result = self.perform(what).await;
                    queue.extend(self.step(Input::Done { op, result }));
                }
                other => self.immediate(other),
            }
        }
    }

    fn immediate(&self, action: Action) {
        match action {
            Action::Heartbeat(heartbeat) => {
                for peer in self
                    .inner
                    .config
                    .nodes
                    .iter()
                    .filter(|n| n.id != self.inner.me)
                {
                    self.inner.peers.heartbeat(peer.id, heartbeat.clone());
                }
            }
            Action::Emit(kind) => self.event(kind),
            Action::Lease { until } => {
                // Past what an Instant can hold: without end (a cluster of one).
                let deadline = self
                    .inner
                    .started
                    .checked_add(Duration::from_millis(until.0));
                self.inner.lease.set(deadline);
            }
            Action::Perform { .. } => {}
        }
    }

    fn event(&self, kind: EventKind) {
        let _ = self.inner.events.send(Event {
            at_ms: wall_ms(),
            node: self.inner.name.clone(),
            kind,
        });
    }

    /// The current leader of the cluster log, if known.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .current_leader
            .map(NodeId)
    }

    /// Whether this node hears a majority now.
    pub fn is_quorate(&self) -> bool {
        let now = self.now();
        locked(&self.inner.core).is_quorate(now)
    }

    /// Proposes a command to the cluster log (through the leader) and returns its outcome.
    pub async fn propose(&self, command: Command) -> Result<Outcome, NodeError> {
        let timeout = Duration::from_millis(self.inner.config.cluster.failure_timeout_ms * 2);
        let proposal = Proposal {
            command,
            proposer: self.inner.me,
            at: Millis(wall_ms()),
        };
        // While an election runs there is no leader to take the proposal: retry until
        // one is elected or the time is up.
        let attempt = async {
            loop {
                match self.propose_once(proposal.clone()).await {
                    Err(NodeError::NoLeader) => tokio::time::sleep(Duration::from_millis(20)).await,
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(NodeError::ProposeTimeout(timeout)),
        }
    }

    async fn propose_once(&self, proposal: Proposal) -> Result<Outcome, NodeError> {
        use openraft::error::{ClientWriteError, RaftError};
        match self.inner.raft.client_write(proposal.clone()).await {
            Ok(response) => Ok(response.data),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(forward))) => {
                let leader = forward.leader_id.map(NodeId).ok_or(NodeError::NoLeader)?;
                let timeout =
                    Duration::from_millis(self.inner.config.cluster.failure_timeout_ms * 2);
                match self
                    .inner
                    .peers
                    .request(leader, RaftRpc::Propose(proposal), timeout)
                    .await
                {
                    Ok(RaftReply::Propose(Ok(outcome))) => Ok(outcome),
                    // The node we took for the leader lost leadership meanwhile: an
                    // election is running, so this is worth retrying.
                    Ok(RaftReply::Propose(Err(e))) if e.contains("forward request") => {
                        Err(NodeError::NoLeader)
                    }
                    Ok(RaftReply::Propose(Err(e))) => Err(NodeError::Propose(e)),
                    Ok(_) => Err(NodeError::Propose("leader answered a different RPC".into())),
                    Err(e) => Err(NodeError::Propose(e.to_string())),
                }
            }
            Err(e) => Err(NodeError::Propose(e.to_string())),
        }
    }

    async fn accept_loop(self, listener: TcpListener) {
        let mut stopping = self.inner.stopping.subscribe();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stopping.wait_for(|&stopped| stopped) => return,
            };
            let (mut stream, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let node = self.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let Ok(creds) = node.credentials() else {
                    return;
                };
                let config = &node.inner.config;
                let handshake =
                    server_handshake(&mut stream, &creds, |id| config.node(id).is_some()).await;
                let (peer, channel) = match handshake {
                    Ok(ok) => ok,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "refused a peer connection");
                        return;
                    }
                };
                tracing::debug!(peer = %peer, %channel, "peer connection accepted");
                if channel == Channel::Membership {
                    let stop = node.inner.stopping.subscribe();
                    serve_inbound(stream, peer, Arc::new(node), stop).await;
                    return;
                }
                let acceptor = locked(&node.inner.acceptors).get(&channel).cloned();
                match acceptor {
                    Some(tx) => {
                        let _ = tx.send((peer, stream)).await;
                    }
                    None => {
                        tracing::warn!(peer = %peer, %channel, "no service for this channel here; closing")
                    }
                }
            });
        }
    }

    /// The local replicas' current (cached) reports.
    fn local_reports(&self) -> BTreeMap<String, ReplicaReport> {
        self.inner
            .drivers
            .iter()
            .map(|(name, driver)| (name.clone(), driver.report()))
            .collect()
    }

    async fn tick_loop(self) {
        let period = Duration::from_millis(self.inner.config.cluster.heartbeat_ms);
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stopping = self.inner.stopping.subscribe();
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stopping.wait_for(|&stopped| stopped) => return,
            }
            let actions = self.step(Input::Tick {
                leader: self.leader(),
                local: self.local_reports(),
            });
            self.dispatch(actions);
        }
    }

    /// Carries out one operation of the core, warning while it takes long.
    async fn perform(&self, what: Op) -> OpResult {
        let described = format!("{what:?}");
        warn_while_waiting(|| described.clone(), self.perform_now(what)).await
    }

    async fn perform_now(&self, what: Op) -> OpResult {
        let driver = |volume: &str| {
            self.inner
                .drivers
                .get(volume)
                .cloned()
                .ok_or_else(|| format!("no local replica of {volume}"))
        };
        match what {
            Op::ReadReplicas => {
                let mut replicas = BTreeMap::new();
                for (name, driver) in &self.inner.drivers {
                    replicas.insert(name.clone(), driver.fresh_report().await);
                }
                OpResult::Replicas(replicas)
            }
            Op::Propose(command) => {
                OpResult::Proposed(self.propose(command).await.map_err(|e| e.to_string()))
            }
            Op::Replica { volume, action } => OpResult::Done(match driver(&volume) {
                Ok(driver) => driver.apply(action).await,
                Err(e) => Err(e),
            }),
            Op::StartResources { volume } => {
                let resources = self.resources_of(&volume);
                OpResult::Done(off_runtime(move || crate::resources::start_all(&resources)).await)
            }
            Op::StopResources { volume } => {
                let resources = self.resources_of(&volume);
                OpResult::Done(off_runtime(move || crate::resources::stop_all(&resources)).await)
            }
            Op::FenceReservation {
                volume,
                victim,
                incarnation,
            } => OpResult::Fenced(match &self.inner.fencer {
                Some(fencer) => fencer.fence(&volume, victim, incarnation).await,
                None => Err("volume has shared devices but this node has no fencer".to_owned()),
            }),
            Op::NewIncarnation => {
                let dir = self.inner.state_dir.clone();
                OpResult::Incarnation(off_runtime(move || next_incarnation(&dir)).await)
            }
            Op::Unfence { incarnation } => OpResult::Done(match &self.inner.fencer {
                Some(fencer) => fencer.unfence(incarnation).await,
                None => Ok(()),
            }),
        }
    }

    fn resources_of(&self, volume: &str) -> Vec<super::config::ResourceConfig> {
        self.inner
            .config
            .volume(volume)
            .map(|v| v.resources.clone())
            .unwrap_or_default()
    }

    /// A status snapshot of the whole cluster as this node sees it.
    pub fn status(&self) -> ClusterStatus {
        let now = self.now();
        let state = self.state();
        let config = &self.inner.config;
        let leader = self.leader();
        let (detector, reports, incarnation, fence_operations) = {
            let core = locked(&self.inner.core);
            (
                core.detector().clone(),
                core.reports().clone(),
                core.incarnation(),
                core.fence_operations(),
            )
        };
        let alive = detector.alive(now);
        let name_of = |id: NodeId| {
            config
                .node(id)
                .map(|n| n.name.clone())
                .unwrap_or_else(|| id.to_string())
        };
        let nodes = config
            .nodes
            .iter()
            .map(|n| {
                let member = state.members.get(&n.id).cloned().unwrap_or_default();
                NodeStatus {
                    id: n.id,
                    name: n.name.clone(),
                    role: n.role,
                    up: member.up,
                    alive: alive.contains(&n.id),
                    incarnation: member.incarnation,
                    silence_ms: if n.id == self.inner.me {
                        Some(0)
                    } else {
                        detector.silence_ms(n.id, now)
                    },
                    leader: leader == Some(n.id),
                }
            })
            .collect();
        let volumes = config
            .volumes
            .iter()
            .map(|v| {
                let record = state.volumes.get(&v.name).cloned().unwrap_or_default();
                let replicas = v
                    .nodes
                    .iter()
                    .filter_map(|n| config.node_by_name(n))
                    .map(|n| ReplicaStatus {
                        node: n.name.clone(),
                        outdated: record.outdated.contains(&n.id),
                        // A silent node's last report is history, not state.
                        report: reports
                            .get(&n.id)
                            .filter(|_| alive.contains(&n.id))
                            .and_then(|r| r.volumes.get(&v.name).cloned()),
                    })
                    .collect();
                VolumeStatus {
                    name: v.name.clone(),
                    primary: record.primary.map(name_of),
                    epoch: record.epoch,
                    pending_fence: record.pending_fence.map(|p| name_of(p.victim)),
                    switchover_to: record.switchover_to.map(name_of),
                    replicas,
                }
            })
            .collect();
        ClusterStatus {
            cluster: config.cluster.name.clone(),
            node: self.inner.name.clone(),
            node_id: self.inner.me,
            incarnation,
            leader: leader.map(name_of),
            quorate: detector.quorate(now),
            membership_epoch: state.epoch,
            nodes,
            volumes,
            fencing: state.fencing.iter().cloned().collect(),
            failovers: state.failovers,
            switchovers: state.switchovers,
            fence_operations,
        }
    }

    /// The local replica of `volume`, if this node holds one.
    pub fn driver(&self, volume: &str) -> Option<Arc<dyn VolumeDriver>> {
        self.inner.drivers.get(volume).cloned()
    }

    /// Whether this node is a data node.
    pub fn is_data_node(&self) -> bool {
        self.inner
            .config
            .node(self.inner.me)
            .is_some_and(|n| n.role == NodeRole::Data)
    }

    /// Orderly shutdown: stop resources, demote, leave the cluster, stop the loops.
    pub async fn shutdown(&self) {
        let stopping = self.step(Input::Stop {
            local: self.local_reports(),
        });
        self.settle(stopping).await;
        self.stop_loops().await;
    }

    /// This primary is about to ask for its peer of `volume` to be outdated; its replica
    /// has counted `peer_uptodate_events` so far (evidence bookkeeping, see
    /// [`super::orchestrator::ResyncEvidence`]).
    pub fn note_outdating(&self, volume: &str, peer_uptodate_events: u64) {
        self.step(Input::NoteOutdating {
            volume: volume.to_owned(),
            peer_uptodate_events,
        });
    }

    /// This node's reservation key is gone from `volume`'s shared devices: it has been
    /// fenced. Stop writing there at once; the cluster log decides what comes next.
    pub async fn lost_reservation(&self, volume: &str) {
        let actions = self.step(Input::ReservationLost {
            volume: volume.to_owned(),
        });
        self.settle(actions).await;
    }

    /// Stops this node abruptly, as a crash would: no demotion, no goodbye. Peers find
    /// out through silence. (Tests of failover in one process use it.)
    pub async fn halt(&self) {
        self.step(Input::Halt);
        self.stop_loops().await;
    }

    async fn stop_loops(&self) {
        let _ = self.inner.stopping.send(true);
        self.inner.peers.stop();
        let _ = self.inner.raft.shutdown().await;
    }

    /// A handle drivers use to outdate their peer through the cluster log.
    pub fn outdater(&self) -> Arc<dyn OutdatePeer> {
        Arc::new(self.clone())
    }

    /// The current epoch of `volume` in the log.
    pub fn volume_epoch(&self, volume: &str) -> Option<Epoch> {
        self.state().volumes.get(volume).map(|v| v.epoch)
    }
}

impl OutdatePeer for Node {
    fn outdate_peer(&self, volume: &str, peer: NodeId) -> BoxFuture<'_, Result<(), String>> {
        let volume = volume.to_owned();
        Box::pin(async move {
            let expect = self
                .volume_epoch(&volume)
                .ok_or_else(|| format!("unknown volume {volume}"))?;
            let command = Command::Outdate {
                volume,
                victim: peer,
                by: self.inner.me,
                expect,
            };
            match self.propose(command).await {
                Ok(Outcome::Applied) => Ok(()),
                Ok(Outcome::Rejected { reason }) => Err(reason),
                Err(e) => Err(e.to_string()),
            }
        })
    }
}

impl Inbound for Node {
    fn heartbeat(&self, heartbeat: Heartbeat) {
        let actions = self.step(Input::Heartbeat(heartbeat));
        self.dispatch(actions);
    }

    fn rpc(
        &self,
        _from: NodeId,
        rpc: RaftRpc,
    ) -> impl std::future::Future<Output = RaftReply> + Send {
        let raft = self.inner.raft.clone();
        async move {
            match rpc {
                RaftRpc::Append(request) => RaftReply::Append(raft.append_entries(request).await),
                RaftRpc::Vote(request) => RaftReply::Vote(raft.vote(request).await),
                RaftRpc::Snapshot(request) => {
                    RaftReply::Snapshot(raft.install_snapshot(request).await)
                }
                RaftRpc::Propose(proposal) => RaftReply::Propose(
                    raft.client_write(proposal)
                        .await
                        .map(|r| r.data)
                        .map_err(|e| e.to_string()),
                ),
            }
        }
    }
}

/// Runs blocking work (mount, ip, fsync) off the async runtime, which must keep the
/// heartbeats going; its error, or the task's, as text.
async fn off_runtime<T, E>(
    work: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, String>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// How long one step of a cluster round may take before the log says so.
const SLOW_STEP: Duration = Duration::from_secs(10);

/// Awaits `work`, warning every [`SLOW_STEP`] while it has not finished: a round that
/// never ends blocks every later one (no promotion, no fencing), and the log must name
/// the step it is stuck in.
async fn warn_while_waiting<F: std::future::Future>(
    what: impl Fn() -> String,
    work: F,
) -> F::Output {
    let started = Instant::now();
    tokio::pin!(work);
    loop {
        tokio::select! {
            output = &mut work => return output,
            () = tokio::time::sleep(SLOW_STEP) => tracing::warn!(
                step = %what(),
                waited_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "a cluster round is still waiting for this step"
            ),
        }
    }
}
