//! The embeddable lock manager node: one core, its peer sessions, its clients.
//!
//! The core lives under a mutex that is never held across an `.await`; every event is
//! stepped and its actions carried out (queued to peers, handed to clients) under that
//! one lock, so the order the core decided is the order things happen.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::core::{Action, Completion, Config, Dlm, Event, Message, NodeState};
use crate::error::DlmError;
use crate::resource::Queue;
use crate::types::{ClientId, Epoch, Incarnation, LockId, NodeId, Status};

use super::client::{BlockingNotice, LockClient};
use super::transport::{self, BoxStream, Connector, Outbox, TcpConnector};

/// How to run a node.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node.
    pub node: NodeId,
    /// This life of the node (must change when the process restarts; the standalone
    /// daemon uses its start time in microseconds).
    pub incarnation: Incarnation,
    /// Address to accept peer connections on (None: the embedder hands inbound streams
    /// to [`Node::serve_peer`]).
    pub listen: Option<SocketAddr>,
    /// Every other node and its address.
    pub peers: BTreeMap<NodeId, SocketAddr>,
    /// Unix socket for local clients (None: no socket).
    pub socket: Option<PathBuf>,
    /// Serve the admin operations (membership, fence-confirm) on the socket: only for
    /// the standalone daemon, where the test or the operator is the cluster layer.
    pub socket_admin: bool,
    /// Core tunables.
    pub core: Config,
}

pub(crate) type Outcome = Result<Completion, Status>;

/// Where a client's callbacks go.
#[derive(Debug)]
pub(crate) struct ClientSink {
    pub(crate) waiters: HashMap<LockId, oneshot::Sender<Outcome>>,
    pub(crate) basts: mpsc::UnboundedSender<BlockingNotice>,
    /// Requests whose caller stopped waiting: release if they get granted.
    pub(crate) abandoned: HashSet<LockId>,
}

pub(crate) struct CoreState {
    pub(crate) dlm: Dlm,
    pub(crate) clients: HashMap<ClientId, ClientSink>,
    next_client: u64,
    scratch: Vec<Action>,
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    incarnation: Incarnation,
    at: Instant,
    epoch: Epoch,
    members: u64,
    heartbeat_seen: bool,
}

/// A fingerprint of a member set, the same on every node (carried in heartbeats so
/// the standalone failure detector can tell that a peer formed the same membership).
pub fn membership_fingerprint(members: &BTreeMap<NodeId, Incarnation>) -> u64 {
    use std::hash::Hasher;
    let mut h = crate::hash::FxHasher::default();
    for (n, i) in members {
        h.write_u32(n.0);
        h.write_u64(i.0);
    }
    h.finish()
}

struct RecvSession {
    incarnation: Incarnation,
    next: u64,
    conn: u64,
}

/// State shared by the node's tasks and clients.
pub(crate) struct Shared {
    pub(crate) me: NodeId,
    pub(crate) incarnation: Incarnation,
    core: Mutex<CoreState>,
    outboxes: BTreeMap<NodeId, Arc<Outbox>>,
    recv: Mutex<HashMap<NodeId, RecvSession>>,
    seen: Mutex<BTreeMap<NodeId, Seen>>,
    conn_ids: AtomicU64,
    epoch: AtomicU64,
    members_fp: AtomicU64,
    pub(crate) bad_peers: LogLimit,
    stopped: AtomicBool,
    started: Instant,
    /// Does the cluster layer say this node has quorum? Without it, every lock held here
    /// is in doubt: the majority may declare this node dead and grant them elsewhere.
    pub(crate) quorate: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("me", &self.me).finish()
    }
}

impl Shared {
    /// See [`Node::set_quorate`].
    pub(crate) fn set_quorate(&self, quorate: bool) {
        let changed = self.quorate.send_if_modified(|q| {
            let changed = *q != quorate;
            *q = quorate;
            changed
        });
        if changed {
            if quorate {
                tracing::info!(node_id = %self.me, "quorum regained");
            } else {
                tracing::warn!(node_id = %self.me, "quorum lost: every lock held here is in doubt");
            }
        }
    }

    pub(crate) fn lock_core(&self) -> MutexGuard<'_, CoreState> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    pub(crate) fn epoch_and_members(&self) -> (Epoch, u64) {
        (
            Epoch(self.epoch.load(Ordering::Relaxed)),
            self.members_fp.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn outbox(&self, peer: NodeId) -> Option<Arc<Outbox>> {
        self.outboxes.get(&peer).cloned()
    }

    pub(crate) fn is_peer(&self, peer: NodeId) -> bool {
        self.outboxes.contains_key(&peer)
    }

    pub(crate) fn heard(
        &self,
        peer: NodeId,
        incarnation: Incarnation,
        epoch: Option<(Epoch, u64)>,
    ) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let e = seen.entry(peer).or_insert(Seen {
            incarnation,
            at: Instant::now(),
            epoch: Epoch(0),
            members: 0,
            heartbeat_seen: false,
        });
        if e.incarnation != incarnation {
            // A new life of the peer: what we knew of the old one is void.
            e.incarnation = incarnation;
            e.epoch = Epoch(0);
            e.members = 0;
            e.heartbeat_seen = false;
        }
        e.at = Instant::now();
        if let Some((ep, members)) = epoch {
            e.epoch = ep;
            e.members = members;
            e.heartbeat_seen = true;
        }
    }

    /// Takes over the receive session of `peer`/`incarnation`; returns the connection
    /// id and the next sequence number expected.
    pub(crate) fn claim_receive(&self, peer: NodeId, incarnation: Incarnation) -> (u64, u64) {
        let conn = self.conn_ids.fetch_add(1, Ordering::Relaxed) + 1;
        let mut recv = self.recv.lock().unwrap_or_else(|e| e.into_inner());
        let s = recv.entry(peer).or_insert(RecvSession {
            incarnation,
            next: 1,
            conn,
        });
        if s.incarnation != incarnation {
            s.incarnation = incarnation;
            s.next = 1;
        }
        s.conn = conn;
        (conn, s.next)
    }

    /// Records progress of a receive session; false if another connection took over.
    pub(crate) fn advance_receive(
        &self,
        peer: NodeId,
        incarnation: Incarnation,
        conn: u64,
        next: u64,
    ) -> bool {
        let mut recv = self.recv.lock().unwrap_or_else(|e| e.into_inner());
        match recv.get_mut(&peer) {
            Some(s) if s.conn == conn && s.incarnation == incarnation => {
                s.next = next;
                true
            }
            _ => false,
        }
    }

    /// Feeds a batch of a peer's messages to the core.
    pub(crate) fn deliver(&self, from: NodeId, incarnation: Incarnation, batch: &mut Vec<Message>) {
        let mut core = self.lock_core();
        for message in batch.drain(..) {
            core.step(
                self,
                Event::Message {
                    from,
                    incarnation,
                    message,
                },
            );
        }
    }

    /// Steps one event.
    pub(crate) fn step(&self, event: Event) {
        self.lock_core().step(self, event);
    }
}

impl CoreState {
    /// Steps `event` and carries out the actions.
    pub(crate) fn step(&mut self, shared: &Shared, event: Event) {
        let mut actions = std::mem::take(&mut self.scratch);
        self.dlm.step_append(event, &mut actions);
        self.dispatch(shared, &mut actions);
        self.scratch = actions;
    }

    /// Steps `event`, returning the completion or refusal for `(client, lock)` if the
    /// step produced one; carries out everything else.
    pub(crate) fn step_for(
        &mut self,
        shared: &Shared,
        event: Event,
        client: ClientId,
        lock: LockId,
    ) -> Option<Outcome> {
        let mut actions = std::mem::take(&mut self.scratch);
        self.dlm.step_append(event, &mut actions);
        let mut mine = None;
        if let Some(pos) = actions.iter().position(|a| match a {
            Action::Complete(c) => c.client == client && c.lock == lock,
            Action::Refused {
                client: c, lock: l, ..
            } => *c == client && *l == lock,
            _ => false,
        }) {
            mine = Some(match actions.remove(pos) {
                Action::Complete(c) => Ok(c),
                Action::Refused { status, .. } => Err(status),
                _ => Err(Status::Invalid),
            });
        }
        self.dispatch(shared, &mut actions);
        self.scratch = actions;
        mine
    }

    fn dispatch(&mut self, shared: &Shared, actions: &mut Vec<Action>) {
        let mut follow_up = Vec::new();
        for action in actions.drain(..) {
            match action {
                Action::Send { to, message } => {
                    if let (Some(inc), Some(outbox)) =
                        (self.dlm.members().get(&to), shared.outboxes.get(&to))
                    {
                        outbox.push(*inc, message);
                    }
                }
                Action::Complete(c) => {
                    let Some(sink) = self.clients.get_mut(&c.client) else {
                        continue;
                    };
                    if let Some(w) = sink.waiters.remove(&c.lock) {
                        let _ = w.send(Ok(c));
                    } else if sink.abandoned.remove(&c.lock) && c.status == Status::Granted {
                        follow_up.push(Event::Unlock {
                            client: c.client,
                            lock: c.lock,
                            lvb: None,
                        });
                    }
                }
                Action::Refused {
                    client,
                    lock,
                    status,
                } => {
                    if let Some(sink) = self.clients.get_mut(&client)
                        && let Some(w) = sink.waiters.remove(&lock)
                    {
                        let _ = w.send(Err(status));
                    }
                }
                Action::Blocking { client, lock, mode } => {
                    if let Some(sink) = self.clients.get(&client) {
                        let _ = sink.basts.send(BlockingNotice { lock, mode });
                    }
                }
            }
        }
        let epoch = self.dlm.epoch().0;
        if shared.epoch.swap(epoch, Ordering::Relaxed) != epoch {
            shared.members_fp.store(
                membership_fingerprint(self.dlm.members()),
                Ordering::Relaxed,
            );
        }
        for event in follow_up {
            let mut more = Vec::new();
            self.dlm.step_append(event, &mut more);
            self.dispatch(shared, &mut more);
        }
    }

    pub(crate) fn new_client(&mut self) -> (ClientId, mpsc::UnboundedReceiver<BlockingNotice>) {
        self.next_client += 1;
        let id = ClientId(self.next_client);
        let (tx, rx) = mpsc::unbounded_channel();
        self.clients.insert(
            id,
            ClientSink {
                waiters: HashMap::new(),
                basts: tx,
                abandoned: HashSet::new(),
            },
        );
        (id, rx)
    }
}

/// Lets through at most `PER_SECOND` log lines a second for things a peer can trigger
/// (bad connections), and says how many were suppressed.
#[derive(Debug, Default)]
pub(crate) struct LogLimit {
    window: Mutex<(Option<Instant>, u32, u32)>,
}

impl LogLimit {
    const PER_SECOND: u32 = 10;

    /// Some(suppressed count so far) if this line may be logged.
    pub(crate) fn allow(&self) -> Option<u32> {
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if w.0
            .is_none_or(|start| now.duration_since(start) >= Duration::from_secs(1))
        {
            let suppressed = w.2;
            *w = (Some(now), 1, 0);
            return Some(suppressed);
        }
        if w.1 < Self::PER_SECOND {
            w.1 += 1;
            Some(0)
        } else {
            w.2 += 1;
            None
        }
    }
}

/// What the node knows of a peer from its frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSeen {
    /// Its incarnation.
    pub incarnation: Incarnation,
    /// Time since its last frame.
    pub age: Duration,
    /// Its membership epoch.
    pub epoch: Epoch,
    /// Fingerprint of its member set.
    pub members: u64,
    /// A heartbeat arrived (so `epoch` and `members` are known).
    pub heartbeat_seen: bool,
}

/// A lock as `tandemctl locks` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct LockInfo {
    /// Lock space.
    pub lockspace: String,
    /// Resource name (text, or 0x-hex if not printable).
    pub name: String,
    /// Lock id (hex) on its owner node.
    pub lock: String,
    /// Owner node.
    pub owner: u32,
    /// Client on the owner node (owned view only).
    pub client: Option<u64>,
    /// Granted mode (None: waiting for its first grant).
    pub granted: Option<String>,
    /// Requested mode when a request or conversion waits.
    pub requested: Option<String>,
    /// granted, converting, waiting (master view) or granted, requesting, converting,
    /// unlocking (owned view).
    pub state: String,
    /// Master node of the resource.
    pub master: Option<u32>,
}

/// A snapshot of the node.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct NodeStatus {
    /// This node.
    pub node: u32,
    /// Its incarnation.
    pub incarnation: u64,
    /// Membership epoch.
    pub epoch: u64,
    /// joining, recovering, running, evicted.
    pub state: String,
    /// Members.
    pub members: Vec<u32>,
    /// Departed nodes still waiting for a fence confirmation.
    pub unfenced: Vec<u32>,
    /// Locks of this node's clients.
    pub owned: Vec<LockInfo>,
    /// Locks on the resources this node masters.
    pub mastered: Vec<LockInfo>,
}

fn state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Joining => "joining",
        NodeState::Recovering => "recovering",
        NodeState::Running => "running",
        NodeState::Evicted => "evicted",
    }
}

/// A running lock manager node.
#[derive(Debug)]
pub struct Node {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    socket: Option<PathBuf>,
}

impl Node {
    /// Starts a node that connects to its peers over plain TCP.
    pub async fn start(config: NodeConfig) -> Result<Node, DlmError> {
        let connector = Arc::new(TcpConnector::new(config.peers.clone()));
        Node::start_with(config, connector).await
    }

    /// Starts a node with a custom connector (e.g. the cluster's authenticated streams).
    pub async fn start_with(
        config: NodeConfig,
        connector: Arc<dyn Connector>,
    ) -> Result<Node, DlmError> {
        let outboxes = config
            .peers
            .keys()
            .filter(|p| **p != config.node)
            .map(|p| (*p, Arc::new(Outbox::default())))
            .collect();
        let shared = Arc::new(Shared {
            me: config.node,
            incarnation: config.incarnation,
            core: Mutex::new(CoreState {
                dlm: Dlm::new(config.node, config.incarnation, config.core.clone()),
                clients: HashMap::new(),
                next_client: 0,
                scratch: Vec::new(),
            }),
            outboxes,
            recv: Mutex::new(HashMap::new()),
            seen: Mutex::new(BTreeMap::new()),
            conn_ids: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            members_fp: AtomicU64::new(0),
            bad_peers: LogLimit::default(),
            stopped: AtomicBool::new(false),
            started: Instant::now(),
            quorate: tokio::sync::watch::Sender::new(true),
        });
        let mut tasks = Vec::new();
        if let Some(addr) = config.listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| DlmError::Io {
                    what: format!("listening on {addr}"),
                    source,
                })?;
            let s = shared.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok((stream, from)) => {
                            let _ = stream.set_nodelay(true);
                            let s2 = s.clone();
                            tokio::spawn(async move {
                                if let Err(e) = transport::inbound_session(s2.clone(), Box::new(stream)).await
                                    && let Some(suppressed) = s2.bad_peers.allow()
                                {
                                    tracing::warn!(peer_addr = %from, error = %e, suppressed, "dropping peer connection");
                                }
                            });
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "accepting a peer connection");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        // One connection per pair of nodes: the lower id dials.
        let dial: Vec<NodeId> = shared
            .outboxes
            .keys()
            .copied()
            .filter(|p| *p > config.node)
            .collect();
        for peer in dial {
            tasks.push(tokio::spawn(transport::run_outbound(
                shared.clone(),
                connector.clone(),
                peer,
            )));
        }
        let s = shared.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let now_ms = u64::try_from(s.started.elapsed().as_millis()).unwrap_or(u64::MAX);
                s.step(Event::Tick { now_ms });
            }
        }));
        if let Some(path) = &config.socket {
            let listener = super::socket::bind(path)?;
            tasks.push(tokio::spawn(super::socket::serve(
                shared.clone(),
                listener,
                config.socket_admin,
            )));
        }
        Ok(Node {
            shared,
            tasks,
            socket: config.socket.clone(),
        })
    }

    /// This node.
    pub fn id(&self) -> NodeId {
        self.shared.me
    }

    /// A new membership from the cluster layer (epochs increase).
    pub fn membership(&self, epoch: Epoch, members: BTreeMap<NodeId, Incarnation>) {
        tracing::info!(node_id = %self.shared.me, epoch = %epoch, ?members, "membership");
        self.shared.step(Event::Membership { epoch, members });
    }

    /// The cluster layer's quorum verdict for this node. Losing quorum puts every lock
    /// held here in doubt: clients are told at once (socket event `quorum-lost`,
    /// [`LockClient::quorum`](super::LockClient::quorum)) so they stop relying on their
    /// locks before the majority can declare this node dead and grant them elsewhere
    /// (the quorum lease is shorter than the failure timeout).
    pub fn set_quorate(&self, quorate: bool) {
        self.shared.set_quorate(quorate);
    }

    /// A departed node's incarnation is fenced (from the cluster log).
    pub fn fence_confirmed(&self, node: NodeId, incarnation: Incarnation) {
        tracing::info!(node_id = %self.shared.me, peer = %node, incarnation = incarnation.0, "fence confirmed");
        self.shared
            .step(Event::FenceConfirmed { node, incarnation });
    }

    /// Serves an inbound peer connection (already connected and, in tandemd,
    /// authenticated).
    pub fn serve_peer(&self, stream: BoxStream) {
        let s = self.shared.clone();
        tokio::spawn(async move {
            if let Err(e) = transport::inbound_session(s.clone(), stream).await
                && let Some(suppressed) = s.bad_peers.allow()
            {
                tracing::warn!(error = %e, suppressed, "dropping peer connection");
            }
        });
    }

    /// A new client of this node.
    pub fn client(&self) -> LockClient {
        LockClient::new(self.shared.clone())
    }

    /// Peers heard from: incarnation, time since the last frame, their epoch and the
    /// fingerprint of their member set.
    pub fn peers_heard(&self) -> BTreeMap<NodeId, PeerSeen> {
        let seen = self.shared.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .map(|(n, s)| {
                (
                    *n,
                    PeerSeen {
                        incarnation: s.incarnation,
                        age: s.at.elapsed(),
                        epoch: s.epoch,
                        members: s.members,
                        heartbeat_seen: s.heartbeat_seen,
                    },
                )
            })
            .collect()
    }

    /// The node's state and locks.
    pub fn status(&self) -> NodeStatus {
        status(&self.shared)
    }

    /// The incarnation.
    pub fn incarnation(&self) -> Incarnation {
        self.shared.incarnation
    }

    /// The current epoch.
    pub fn epoch(&self) -> Epoch {
        self.shared.lock_core().dlm.epoch()
    }

    /// Stops the node's tasks and removes its socket.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Relaxed);
        for t in &self.tasks {
            t.abort();
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub(crate) fn status(shared: &Shared) -> NodeStatus {
    let core = shared.lock_core();
    let dlm = &core.dlm;
    let mut owned: Vec<LockInfo> = dlm
        .own_locks()
        .map(|(id, l)| LockInfo {
            lockspace: l.resource.lockspace().to_owned(),
            name: l.resource.display_name(),
            lock: id.to_string(),
            owner: shared.me.0,
            client: Some(l.client.0),
            granted: l.grmode.map(|m| m.name().to_owned()),
            requested: match &l.pending {
                Some(
                    crate::core::Pending::Request { mode, .. }
                    | crate::core::Pending::Convert { mode, .. },
                ) => Some(mode.name().to_owned()),
                _ => None,
            },
            state: match (&l.pending, l.grmode) {
                (None, _) => "granted",
                (Some(crate::core::Pending::Request { .. }), _) => "requesting",
                (Some(crate::core::Pending::Convert { .. }), _) => "converting",
                (Some(crate::core::Pending::Unlock { .. }), _) => "unlocking",
            }
            .to_owned(),
            master: l.master.map(|m| m.0),
        })
        .collect();
    owned.sort_by(|a, b| (&a.lockspace, &a.name, &a.lock).cmp(&(&b.lockspace, &b.name, &b.lock)));
    let mut mastered = Vec::new();
    for (key, res) in dlm.mastered() {
        for (queue, l) in res.locks() {
            mastered.push(LockInfo {
                lockspace: key.lockspace().to_owned(),
                name: key.display_name(),
                lock: l.id.to_string(),
                owner: l.owner.0,
                client: None,
                granted: l.grmode.map(|m| m.name().to_owned()),
                requested: (queue != Queue::Granted).then(|| l.rqmode.name().to_owned()),
                state: queue.name().to_owned(),
                master: Some(shared.me.0),
            });
        }
    }
    mastered.sort_by(|a, b| (&a.lockspace, &a.name).cmp(&(&b.lockspace, &b.name)));
    NodeStatus {
        node: shared.me.0,
        incarnation: shared.incarnation.0,
        epoch: dlm.epoch().0,
        state: state_name(dlm.state()).to_owned(),
        members: dlm.members().keys().map(|n| n.0).collect(),
        unfenced: dlm.unfenced().iter().map(|n| n.0).collect(),
        owned,
        mastered,
    }
}
