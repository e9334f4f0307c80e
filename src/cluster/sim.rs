//! Seeded, deterministic simulation of the cluster protocol.
//!
//! One `u64` seed drives everything: crashes, restarts, partitions, the write workload and
//! the virtual clock. Every node runs tandemd's own [`NodeCore`] — the same core
//! `node.rs` runs, with its failure detector, leader and local rounds, fencing and rejoin
//! — and the simulation only delivers its inputs (ticks at each node's own phase,
//! heartbeats over the links that are up, the log as the node has learned it) and
//! carries out its operations against the modelled world, feeding the results back.
//! Also real: [`ClusterState`] (the cluster log's state machine), the reservation key
//! derivation, and the SPC-4 reservation emulator of `tandem-fence` for a volume on a
//! shared LU. What is modelled: the network (links up or down), the consensus log (a
//! proposal commits iff its proposer is in the partition that holds a majority — the
//! guarantee raft gives), and replicas (protocol C: a write is acknowledged when both
//! replicas hold it, or after the peer was recorded Outdated).
//!
//! Invariants, checked after every step:
//! - at most one primary per volume per epoch, and never two writers: no write lands from
//!   a node while the log names another node primary;
//! - no acknowledged write is lost: a promoted replica holds every acknowledged write;
//! - a fenced node's write never lands on the shared LU;
//! - the log's own invariants ([`ClusterState::check_invariants`]).
//!
//! Then liveness: everything heals, and within a bounded time every volume has a primary
//! holding all acknowledged writes and the replicas are identical.
//!
//! A failure names its seed; `TANDEM_SEED=n` replays it.

use super::fencing::node_key;
use super::node_core::{Action, CoreConfig, Input, NodeCore, Now, Op, OpResult};
use super::orchestrator::{DiskState, NodeReport, ReplicaReport, ReplicaRole};
use super::peers::Heartbeat;
use super::state::{ClusterState, Command, Outcome};
use super::types::{Epoch, Incarnation, Millis, NodeId};
use super::volume::VolumeAction;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use tandem_fence::PrKey;
use tandem_fence::emulator::{Access, Emulator, NexusId, NexusInfo};
use tandem_fence::pr::PrOutCommand;
use tandem_fence::pr::ReservationType;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const W: NodeId = NodeId(3);
const NODES: [NodeId; 3] = [A, B, W];
const DATA: [NodeId; 2] = [A, B];
/// The replicated volume.
const REPLICATED: &str = "vol0";
/// The volume on a shared LU, fenced with reservations.
const SHARED: &str = "shared0";
const STEP_MS: u64 = 10;
const HEARTBEAT_MS: u64 = 50;
const FAILURE_TIMEOUT_MS: u64 = 400;
const LEASE_MS: u64 = 250;
const BLOCKS: u32 = 16;
/// Steps a resync takes.
const SYNC_STEPS: u32 = 5;

/// A small deterministic PRNG (SplitMix64): the simulation needs no crate for it.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// True with probability `per_mille`/1000.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.next_u64() % 1000 < per_mille
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

#[derive(Debug, Clone, Default)]
struct Replica {
    role: ReplicaRole,
    disk: DiskState,
    epoch: Epoch,
    suspended: bool,
    connected: bool,
    /// Steps left in a running resync (as target).
    syncing: Option<u32>,
    /// block → value (values grow, so "newer" is ">").
    data: BTreeMap<u32, u64>,
    /// Times this replica saw its peer become UpToDate (as the engine counts them).
    peer_uptodate_events: u64,
}

#[derive(Debug, Clone)]
struct SimNode {
    alive: bool,
    /// The incarnation stored on this node's disk (its state directory).
    stored_incarnation: Incarnation,
    /// The node's decisions: tandemd's own core, fed by this world.
    core: NodeCore,
    /// The log as this node last learned it.
    known: Arc<ClusterState>,
    replicas: BTreeMap<String, Replica>,
    /// Resources really running here (the core has its own belief).
    resources: BTreeSet<String>,
    nexus: Option<NexusId>,
    /// Where in the heartbeat period this node's timer fires.
    tick_phase: u64,
    /// The process is stopped (SIGSTOP, a VM freeze) until then: it neither runs nor
    /// serves, and what is sent to it waits in `inbox`.
    paused_until: Option<Millis>,
    inbox: Vec<Heartbeat>,
    /// The quorum lease the core last announced (on this node's clock): a primary
    /// serves no I/O past it.
    lease_until: Millis,
    /// When this process started (world time): its monotonic clock counts from there,
    /// as tandemd's does, so a new life's clock starts again at zero.
    started: Millis,
}

impl SimNode {
    /// A heartbeat's only effect outside the core: a new lease.
    fn take_lease(&mut self, actions: &[Action]) {
        for action in actions {
            if let Action::Lease { until } = action {
                self.lease_until = *until;
            }
        }
    }
}

/// What a finished run reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    pub seed: u64,
    pub steps: u64,
    pub acked_writes: u64,
    pub refused_writes: u64,
    pub failovers: u64,
    pub fencings: usize,
    pub crashes: u64,
    pub partitions: u64,
    pub pauses: u64,
    /// Orderly stops (SIGTERM).
    pub stops: u64,
    /// Reads served by a node that claimed to be primary.
    pub reads: u64,
}

/// An invariant broke: the seed, the step and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("seed {seed}, step {step} (t={time_ms} ms): {message}\nreplay with TANDEM_SEED={seed}")]
pub struct SimFailure {
    pub seed: u64,
    pub step: u64,
    pub time_ms: u64,
    pub message: String,
}

struct World {
    seed: u64,
    rng: Rng,
    now: Millis,
    step: u64,
    nodes: BTreeMap<NodeId, SimNode>,
    /// Links that are down, as ordered pairs (low, high).
    cut: BTreeSet<(NodeId, NodeId)>,
    /// The committed log.
    log: ClusterState,
    /// Highest acknowledged value per block of the replicated volume.
    acked: BTreeMap<u32, u64>,
    next_value: u64,
    lu: Emulator,
    report: SimReport,
    /// Recent happenings, shown when an invariant breaks.
    trace: std::collections::VecDeque<String>,
}

fn pair(a: NodeId, b: NodeId) -> (NodeId, NodeId) {
    if a < b { (a, b) } else { (b, a) }
}

/// The reservation key tandemd derives (the real derivation, cluster name "sim").
fn key_of(node: NodeId, incarnation: Incarnation) -> PrKey {
    node_key("sim", node, incarnation)
}

/// A node's core for life `incarnation`, starting at `now`.
fn new_core(
    id: NodeId,
    incarnation: Incarnation,
    now: Millis,
    known: Arc<ClusterState>,
) -> NodeCore {
    let data = DATA.contains(&id);
    let config = CoreConfig {
        me: id,
        incarnation,
        members: NODES.to_vec(),
        volumes: BTreeMap::from([
            (REPLICATED.to_owned(), DATA.to_vec()),
            (SHARED.to_owned(), DATA.to_vec()),
        ]),
        shared: if data {
            BTreeSet::from([SHARED.to_owned()])
        } else {
            BTreeSet::new()
        },
        has_fencer: data,
        failure_timeout_ms: FAILURE_TIMEOUT_MS,
        quorum_lease_ms: LEASE_MS,
        fresh_log_id: crate::replication::types::ClusterLogId(1),
    };
    NodeCore::new(
        config,
        Now {
            mono: Millis(0),
            wall: now,
        },
        known,
    )
}

impl World {
    fn new(seed: u64) -> Self {
        let mut lu = Emulator::new();
        let mut nodes = BTreeMap::new();
        for id in NODES {
            let nexus = DATA
                .contains(&id)
                .then(|| lu.add_nexus(NexusInfo::sas(0x5001_4050_0000_0000 | id.0, 1)));
            let replicas = if DATA.contains(&id) {
                [REPLICATED, SHARED]
                    .into_iter()
                    .map(|v| {
                        (
                            v.to_owned(),
                            Replica {
                                disk: DiskState::UpToDate,
                                connected: true,
                                ..Replica::default()
                            },
                        )
                    })
                    .collect()
            } else {
                BTreeMap::new()
            };
            let known = Arc::new(ClusterState::default());
            nodes.insert(
                id,
                SimNode {
                    alive: true,
                    stored_incarnation: Incarnation(1),
                    core: new_core(id, Incarnation(1), Millis(0), Arc::clone(&known)),
                    known,
                    replicas,
                    resources: BTreeSet::new(),
                    nexus,
                    tick_phase: (id.0 * 20) % HEARTBEAT_MS,
                    paused_until: None,
                    inbox: Vec::new(),
                    lease_until: Millis(0),
                    started: Millis(0),
                },
            );
        }
        let mut log = ClusterState::default();
        log.apply(&Command::Configure {
            members: NODES.to_vec(),
            volumes: BTreeMap::from([
                (REPLICATED.to_owned(), DATA.to_vec()),
                (SHARED.to_owned(), DATA.to_vec()),
            ]),
            log_id: crate::replication::types::ClusterLogId(1),
        });
        let known = Arc::new(log.clone());
        for node in nodes.values_mut() {
            node.known = Arc::clone(&known);
        }
        let mut world = Self {
            seed,
            rng: Rng::new(seed),
            now: Millis(0),
            step: 0,
            nodes,
            cut: BTreeSet::new(),
            log,
            acked: BTreeMap::new(),
            next_value: 1,
            lu,
            report: SimReport {
                seed,
                ..SimReport::default()
            },
            trace: std::collections::VecDeque::new(),
        };
        for id in NODES {
            world
                .drive(id, Input::Start)
                .expect("starting a node breaks no invariant");
        }
        world
    }

    fn fail(&self, message: String) -> SimFailure {
        let trace: Vec<&str> = self.trace.iter().map(String::as_str).collect();
        SimFailure {
            seed: self.seed,
            step: self.step,
            time_ms: self.now.0,
            message: format!("{message}\nlast events:\n  {}", trace.join("\n  ")),
        }
    }

    fn note(&mut self, what: String) {
        self.trace.push_back(format!("t={} {what}", self.now.0));
        if self.trace.len() > 60 {
            self.trace.pop_front();
        }
    }

    /// The node's process runs (alive and not paused).
    fn running(&self, id: NodeId) -> bool {
        let node = &self.nodes[&id];
        node.alive && node.paused_until.is_none()
    }

    fn linked(&self, a: NodeId, b: NodeId) -> bool {
        a == b || (self.running(a) && self.running(b) && !self.cut.contains(&pair(a, b)))
    }

    /// Nodes in the partition that holds a majority (the raft leader's side), if any.
    fn majority(&self) -> Option<BTreeSet<NodeId>> {
        for start in NODES {
            if !self.running(start) {
                continue;
            }
            // Everyone directly linked to `start` (cuts make partitions non-transitive; a
            // raft leader needs direct links to a majority).
            let group: BTreeSet<NodeId> = NODES
                .into_iter()
                .filter(|n| self.linked(start, *n))
                .collect();
            if group.len() * 2 > NODES.len() {
                return Some(group);
            }
        }
        None
    }

    /// Commits `command` iff `proposer` can reach a majority; returns the outcome.
    fn propose(&mut self, proposer: NodeId, command: Command) -> Option<Outcome> {
        let Some(group) = self.majority().filter(|g| g.contains(&proposer)) else {
            self.note(format!(
                "{proposer} cannot commit {command:?} (no majority)"
            ));
            return None;
        };
        let outcome = self.log.apply(&command);
        self.note(format!("{proposer} committed {command:?} -> {outcome:?}"));
        // The leader applies at commit and the proposer hears the outcome; the other
        // followers learn of it with the leader's next append (`catch_up`).
        let leader = group.iter().next().copied();
        let first = BTreeSet::from_iter([Some(proposer), leader].into_iter().flatten());
        self.spread_log(&first);
        Some(outcome)
    }

    /// Raft replicates the log to every follower in `group`.
    fn spread_log(&mut self, group: &BTreeSet<NodeId>) {
        let known = Arc::new(self.log.clone());
        for id in group {
            if let Some(n) = self.nodes.get_mut(id) {
                n.known = Arc::clone(&known);
            }
        }
    }

    /// The leader's appends reach each follower it is linked to after a while (a node
    /// that was cut off or paused learns the log some time after it hears its peers).
    fn catch_up(&mut self) {
        let Some(group) = self.majority() else {
            return;
        };
        let lucky: BTreeSet<NodeId> = group.into_iter().filter(|_| self.rng.chance(300)).collect();
        self.spread_log(&lucky);
    }

    /// Feeds `input` to node `id`'s core and carries out everything it asks, feeding
    /// the results back, until the core waits for nothing (operations complete at once).
    fn drive(&mut self, id: NodeId, input: Input) -> Result<(), SimFailure> {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            if !self.running(id) {
                return Ok(());
            }
            let now = self.clock(id);
            let node = self.nodes.get_mut(&id).expect("known node");
            let known = Arc::clone(&node.known);
            node.core.step(now, Input::Log(known));
            let actions = node.core.step(now, input);
            for action in actions {
                match action {
                    Action::Heartbeat(heartbeat) => self.deliver(id, &heartbeat),
                    Action::Emit(_) => {}
                    Action::Lease { until } => {
                        self.nodes.get_mut(&id).expect("node").lease_until = until;
                    }
                    Action::Perform { op, what } => {
                        let result = self.perform(id, what)?;
                        inputs.push_back(Input::Done { op, result });
                    }
                }
            }
        }
        Ok(())
    }

    /// A heartbeat reaches every peer linked to its sender.
    fn deliver(&mut self, from: NodeId, heartbeat: &Heartbeat) {
        for to in NODES {
            if to == from || !self.nodes[&to].alive || self.cut.contains(&pair(from, to)) {
                continue;
            }
            let now = self.clock(to);
            let node = self.nodes.get_mut(&to).expect("known node");
            if node.paused_until.is_some() {
                // Waits in the socket buffer until the process runs again.
                node.inbox.push(heartbeat.clone());
            } else {
                let actions = node.core.step(now, Input::Heartbeat(heartbeat.clone()));
                node.take_lease(&actions);
            }
        }
    }

    /// A node's life registers its key on the shared LU (and reserves if free).
    fn unfence(&mut self, id: NodeId, incarnation: Incarnation) {
        let node = &self.nodes[&id];
        let Some(nexus) = node.nexus else { return };
        let key = key_of(id, incarnation);
        let _ = self
            .lu
            .pr_out(nexus, &PrOutCommand::register_and_ignore(key));
        if self.lu.reservation().is_none() {
            let _ = self.lu.pr_out(
                nexus,
                &PrOutCommand::reserve(key, ReservationType::WriteExclusiveRegistrantsOnly),
            );
        }
    }

    /// What a replica's link says about its peer's disk: UpToDate only while connected
    /// to a peer that is not mid-resync (as the replication engine reports it).
    fn peer_disk_seen_by(&self, id: NodeId, volume: &str) -> DiskState {
        let Some(mine) = self.nodes[&id].replicas.get(volume) else {
            return DiskState::Diskless;
        };
        let peer = if id == A { B } else { A };
        match self.nodes.get(&peer).and_then(|n| n.replicas.get(volume)) {
            Some(theirs) if mine.connected && theirs.connected && theirs.syncing.is_none() => {
                theirs.disk
            }
            _ => DiskState::Diskless,
        }
    }

    fn report_of(&self, id: NodeId) -> NodeReport {
        let node = &self.nodes[&id];
        NodeReport {
            incarnation: node.core.incarnation(),
            quorate: node.core.is_quorate(self.now),
            volumes: node
                .replicas
                .iter()
                .map(|(name, r)| {
                    (
                        name.clone(),
                        ReplicaReport {
                            disk: if r.syncing.is_some() {
                                DiskState::Inconsistent
                            } else {
                                r.disk
                            },
                            role: r.role,
                            connected: r.connected,
                            syncing: r.syncing.is_some(),
                            suspended: r.suspended,
                            epoch: r.epoch,
                            out_of_sync_bytes: 0,
                            resources_running: node.resources.contains(name),
                            sync: None,
                            device: None,
                            peer_disk: self.peer_disk_seen_by(id, name),
                            peer_uptodate_events: r.peer_uptodate_events,
                        },
                    )
                })
                .collect(),
        }
    }

    fn inject_faults(&mut self) -> Result<(), SimFailure> {
        let rng = &mut self.rng;
        if rng.chance(4) {
            let victim = NODES[usize::try_from(rng.below(3)).unwrap_or(0)];
            if self.nodes[&victim].alive {
                self.crash(victim);
            }
        }
        if self.rng.chance(2) {
            let victim = NODES[usize::try_from(self.rng.below(3)).unwrap_or(0)];
            if self.running(victim) {
                self.stop(victim)?;
            }
        }
        if self.rng.chance(20) {
            let dead: Vec<NodeId> = NODES.into_iter().filter(|n| !self.nodes[n].alive).collect();
            if let Some(&id) =
                dead.get(usize::try_from(self.rng.below(dead.len() as u64)).unwrap_or(0))
            {
                self.restart(id)?;
            }
        }
        if self.rng.chance(4) {
            let a = NODES[usize::try_from(self.rng.below(3)).unwrap_or(0)];
            let b = NODES[usize::try_from(self.rng.below(3)).unwrap_or(0)];
            if a != b {
                self.cut.insert(pair(a, b));
                self.report.partitions += 1;
            }
        }
        if self.rng.chance(15) {
            self.cut.clear();
        }
        if self.rng.chance(3) {
            let victim = NODES[usize::try_from(self.rng.below(3)).unwrap_or(0)];
            if self.running(victim) {
                // Up to three failure timeouts: long enough to be replaced.
                let ms = FAILURE_TIMEOUT_MS / 2 + self.rng.below(FAILURE_TIMEOUT_MS * 3);
                self.pause(victim, ms);
            }
        }
        Ok(())
    }

    fn pause(&mut self, id: NodeId, ms: u64) {
        self.report.pauses += 1;
        self.note(format!("pause {id} for {ms} ms"));
        let until = self.now.plus(ms);
        self.nodes.get_mut(&id).expect("known node").paused_until = Some(until);
    }

    /// Paused nodes whose time is up run again: first what waited for them.
    fn resume_due(&mut self, heal: bool) {
        for id in NODES {
            let now = self.clock(id);
            let node = self.nodes.get_mut(&id).expect("known node");
            if node.paused_until.is_some_and(|t| heal || t <= self.now) {
                node.paused_until = None;
                for heartbeat in std::mem::take(&mut node.inbox) {
                    let actions = node.core.step(now, Input::Heartbeat(heartbeat));
                    node.take_lease(&actions);
                }
                self.note(format!("resume {id}"));
            }
        }
    }

    fn crash(&mut self, id: NodeId) {
        self.report.crashes += 1;
        self.note(format!("crash {id}"));
        self.exit(id);
    }

    /// An orderly stop (SIGTERM): the node's core stops its resources, demotes and
    /// leaves, then the process exits.
    fn stop(&mut self, id: NodeId) -> Result<(), SimFailure> {
        self.report.stops += 1;
        self.note(format!("stop {id}"));
        let local = self.report_of(id).volumes;
        self.drive(id, Input::Stop { local })?;
        self.exit(id);
        Ok(())
    }

    /// Node `id`'s clocks now: its monotonic clock counts from its process's start.
    fn clock(&self, id: NodeId) -> Now {
        Now {
            mono: Millis(self.now.since(self.nodes[&id].started)),
            wall: self.now,
        }
    }

    /// Whether node `id`'s quorum lease lets it serve now.
    fn leased(&self, id: NodeId) -> bool {
        self.clock(id).mono < self.nodes[&id].lease_until
    }

    /// The process is gone: what is on disk stays, everything in memory goes.
    fn exit(&mut self, id: NodeId) {
        let node = self.nodes.get_mut(&id).expect("known node");
        node.alive = false;
        node.lease_until = Millis(0);
        node.paused_until = None;
        node.inbox.clear();
        node.resources.clear();
        for replica in node.replicas.values_mut() {
            // What is on disk stays; everything in memory goes.
            replica.role = ReplicaRole::Secondary;
            replica.connected = false;
            replica.suspended = false;
            if replica.syncing.take().is_some() {
                replica.disk = DiskState::Inconsistent;
            }
        }
    }

    fn restart(&mut self, id: NodeId) -> Result<(), SimFailure> {
        self.note(format!("restart {id}"));
        let now = self.now;
        let node = self.nodes.get_mut(&id).expect("known node");
        node.alive = true;
        node.started = now;
        // tandemd stores a new incarnation at every start.
        node.stored_incarnation = Incarnation(node.stored_incarnation.0 + 1);
        node.core = new_core(id, node.stored_incarnation, now, Arc::clone(&node.known));
        self.drive(id, Input::Start)
    }

    /// Every node's timer: a tick to its core each heartbeat period (phases differ).
    fn ticks(&mut self) -> Result<(), SimFailure> {
        let majority = self.majority();
        // The raft leader: the lowest id of the majority side (any choice is safe).
        let leader = majority.as_ref().and_then(|g| g.iter().next().copied());
        for id in NODES {
            let node = &self.nodes[&id];
            if !self.running(id) || !(self.now.0 + node.tick_phase).is_multiple_of(HEARTBEAT_MS) {
                continue;
            }
            let in_majority = majority.as_ref().is_some_and(|g| g.contains(&id));
            let local = self.report_of(id).volumes;
            self.drive(
                id,
                Input::Tick {
                    leader: leader.filter(|_| in_majority),
                    local,
                },
            )?;
        }
        Ok(())
    }

    fn replica_mut(&mut self, id: NodeId, volume: &str) -> &mut Replica {
        self.nodes
            .get_mut(&id)
            .and_then(|n| n.replicas.get_mut(volume))
            .expect("a local replica")
    }

    /// Carries out one operation of node `id`'s core.
    fn perform(&mut self, id: NodeId, what: Op) -> Result<OpResult, SimFailure> {
        if !matches!(what, Op::Propose(_) | Op::ReadReplicas) {
            self.note(format!("{id} does {what:?}"));
        }
        Ok(match what {
            Op::ReadReplicas => OpResult::Replicas(self.report_of(id).volumes),
            Op::Propose(command) => OpResult::Proposed(
                self.propose(id, command)
                    .ok_or_else(|| "no majority".to_owned()),
            ),
            Op::Replica { volume, action } => {
                self.replica_command(id, &volume, action)?;
                OpResult::Done(Ok(()))
            }
            Op::StartResources { volume } => {
                self.nodes
                    .get_mut(&id)
                    .expect("node")
                    .resources
                    .insert(volume);
                OpResult::Done(Ok(()))
            }
            Op::StopResources { volume } => {
                self.nodes
                    .get_mut(&id)
                    .expect("node")
                    .resources
                    .remove(&volume);
                OpResult::Done(Ok(()))
            }
            Op::FenceReservation {
                victim,
                incarnation,
                ..
            } => OpResult::Fenced(self.preempt(id, victim, incarnation)?),
            Op::NewIncarnation => {
                let node = self.nodes.get_mut(&id).expect("node");
                node.stored_incarnation = Incarnation(node.stored_incarnation.0 + 1);
                OpResult::Incarnation(Ok(node.stored_incarnation))
            }
            Op::Unfence { incarnation } => {
                self.unfence(id, incarnation);
                OpResult::Done(Ok(()))
            }
        })
    }

    fn replica_command(
        &mut self,
        id: NodeId,
        volume: &str,
        action: VolumeAction,
    ) -> Result<(), SimFailure> {
        match action {
            VolumeAction::Promote { epoch, .. } => {
                let replica = self.replica_mut(id, volume);
                replica.role = ReplicaRole::Primary;
                replica.epoch = epoch;
                replica.suspended = false;
                if volume == REPLICATED {
                    let replica = &self.nodes[&id].replicas[volume];
                    let lost: Vec<(u32, u64, Option<u64>)> = self
                        .acked
                        .iter()
                        .filter(|(b, v)| replica.data.get(b).is_none_or(|have| have < *v))
                        .map(|(b, v)| (*b, *v, replica.data.get(b).copied()))
                        .collect();
                    if !lost.is_empty() {
                        return Err(self.fail(format!(
                            "node {id} promoted at epoch {epoch} without acknowledged writes (block, acked, has): {lost:?}"
                        )));
                    }
                }
            }
            VolumeAction::Demote => self.replica_mut(id, volume).role = ReplicaRole::Secondary,
            VolumeAction::SetEpoch { epoch, .. } => {
                let replica = self.replica_mut(id, volume);
                if replica.epoch != epoch {
                    replica.epoch = epoch;
                    // A new epoch: the peer connection is renegotiated.
                    replica.connected = false;
                }
            }
            VolumeAction::Suspend => self.replica_mut(id, volume).suspended = true,
            VolumeAction::Resume => self.replica_mut(id, volume).suspended = false,
            VolumeAction::StepDown => {
                let replica = self.replica_mut(id, volume);
                replica.role = ReplicaRole::Secondary;
                replica.suspended = false;
            }
        }
        Ok(())
    }

    /// PREEMPT of `victim`'s key on the shared LU by node `id`, confirmed.
    fn preempt(
        &mut self,
        id: NodeId,
        victim: NodeId,
        victim_incarnation: Incarnation,
    ) -> Result<Result<String, String>, SimFailure> {
        let nexus = self.nodes[&id].nexus.expect("data node has a nexus");
        let own = key_of(id, self.nodes[&id].core.incarnation());
        let victim_key = key_of(victim, victim_incarnation);
        let cmd = PrOutCommand::preempt(
            own,
            victim_key,
            ReservationType::WriteExclusiveRegistrantsOnly,
        );
        if self.lu.pr_out(nexus, &cmd).is_err() {
            // The victim's key may be gone already (fenced before); check.
            let still = self.lu.registrations().iter().any(|r| r.key == victim_key);
            if still {
                return Ok(Err(format!("preempting {victim_key:?} failed")));
            }
        }
        if self.lu.registrations().iter().any(|r| r.key == victim_key) {
            return Err(self.fail(format!("preempting {victim_key:?} left it registered")));
        }
        Ok(Ok(format!("preempted {victim_key:?}")))
    }

    /// Replication links: connect, resync, disconnect.
    fn replicate(&mut self) {
        let (a_ok, b_ok) = (self.nodes[&A].alive, self.nodes[&B].alive);
        let link = self.linked(A, B);
        let ra = self.nodes[&A].replicas[REPLICATED].clone();
        let rb = self.nodes[&B].replicas[REPLICATED].clone();
        let can_connect = a_ok && b_ok && link && ra.epoch == rb.epoch;
        if !can_connect {
            for id in DATA {
                if let Some(r) = self
                    .nodes
                    .get_mut(&id)
                    .and_then(|n| n.replicas.get_mut(REPLICATED))
                {
                    r.connected = false;
                    if r.syncing.take().is_some() {
                        r.disk = DiskState::Inconsistent;
                    }
                }
            }
            return;
        }
        // Exactly one side may be the source: the primary (two primaries never connect).
        let source = match (ra.role, rb.role) {
            (ReplicaRole::Primary, ReplicaRole::Secondary) => Some((A, B)),
            (ReplicaRole::Secondary, ReplicaRole::Primary) => Some((B, A)),
            _ => None,
        };
        let Some((src, dst)) = source else {
            for id in DATA {
                if let Some(r) = self
                    .nodes
                    .get_mut(&id)
                    .and_then(|n| n.replicas.get_mut(REPLICATED))
                {
                    r.connected = false;
                }
            }
            return;
        };
        let src_data = self.nodes[&src].replicas[REPLICATED].data.clone();
        let dst_replica = self
            .nodes
            .get_mut(&dst)
            .and_then(|n| n.replicas.get_mut(REPLICATED))
            .expect("replica");
        let mut became_up_to_date = false;
        if !dst_replica.connected {
            dst_replica.connected = true;
            if dst_replica.data == src_data {
                became_up_to_date = true;
            } else {
                dst_replica.syncing = Some(SYNC_STEPS);
            }
        }
        if let Some(left) = dst_replica.syncing {
            if left == 0 {
                dst_replica.data = src_data;
                dst_replica.syncing = None;
                dst_replica.disk = DiskState::UpToDate;
                became_up_to_date = true;
            } else {
                dst_replica.syncing = Some(left - 1);
            }
        }
        if let Some(r) = self
            .nodes
            .get_mut(&src)
            .and_then(|n| n.replicas.get_mut(REPLICATED))
        {
            r.connected = true;
            if became_up_to_date {
                r.peer_uptodate_events += 1;
            }
        }
    }

    /// The application writes through whichever node claims to be primary (possibly stale).
    fn workload(&mut self, faults: bool) -> Result<(), SimFailure> {
        for volume in [REPLICATED, SHARED] {
            if !self.rng.chance(300) {
                continue;
            }
            // A suspended primary holds writes but still answers reads (as the
            // replication engine does); past its quorum lease it serves nothing
            // (tandemd's gate on the data path).
            let read = volume == REPLICATED && self.rng.chance(500);
            let claimants: Vec<NodeId> = DATA
                .into_iter()
                .filter(|n| {
                    let node = &self.nodes[n];
                    self.running(*n)
                        && (volume == SHARED || self.leased(*n))
                        && node.replicas[volume].role == ReplicaRole::Primary
                        && (read || !node.replicas[volume].suspended)
                })
                .collect();
            let Some(&claimant) =
                claimants.get(usize::try_from(self.rng.below(claimants.len() as u64)).unwrap_or(0))
            else {
                continue;
            };
            if volume == SHARED {
                self.write_shared(claimant)?;
            } else if read {
                self.read_replicated(claimant)?;
            } else {
                self.write_replicated(claimant, faults)?;
            }
        }
        Ok(())
    }

    /// A read through a node that serves as primary must see every acknowledged write
    /// (linearizable reads): a deposed primary serving from its old copy breaks it.
    fn read_replicated(&mut self, reader: NodeId) -> Result<(), SimFailure> {
        let block = u32::try_from(self.rng.below(u64::from(BLOCKS))).unwrap_or(0);
        self.read_block(reader, block)
    }

    fn read_block(&mut self, reader: NodeId, block: u32) -> Result<(), SimFailure> {
        let have = self.nodes[&reader].replicas[REPLICATED]
            .data
            .get(&block)
            .copied();
        if let Some(acked) = self.acked.get(&block).copied()
            && have.is_none_or(|v| v < acked)
        {
            return Err(self.fail(format!(
                "node {reader} served a stale read of block {block}: {have:?}, but {acked} was acknowledged"
            )));
        }
        self.report.reads += 1;
        Ok(())
    }

    fn write_shared(&mut self, writer: NodeId) -> Result<(), SimFailure> {
        let nexus = self.nodes[&writer].nexus.expect("data node has a nexus");
        let inc = self.nodes[&writer].core.incarnation();
        if self.lu.data_command(nexus, Access::Write).is_ok() {
            let fenced =
                self.log.fencing.iter().any(|f| {
                    f.volume == SHARED && f.victim == writer && f.victim_incarnation == inc
                });
            if fenced {
                return Err(self.fail(format!(
                    "fenced node {writer} (incarnation {inc}) wrote to the shared LU"
                )));
            }
            // Between a primary's loss and its fencing nobody else may be primary; a stale
            // primary's write in that window is harmless. A write while another node is
            // primary is two writers.
            if let Some(primary) = self.log.volumes[SHARED].primary
                && primary != writer
            {
                return Err(self.fail(format!(
                    "node {writer} wrote to the shared LU while node {primary} is primary"
                )));
            }
            self.report.acked_writes += 1;
        } else {
            // RESERVATION CONFLICT: the node notices it was fenced and stops (self-fence).
            self.report.refused_writes += 1;
            if let Some(r) = self
                .nodes
                .get_mut(&writer)
                .and_then(|n| n.replicas.get_mut(SHARED))
            {
                r.suspended = true;
            }
        }
        Ok(())
    }

    fn write_replicated(&mut self, writer: NodeId, faults: bool) -> Result<(), SimFailure> {
        let peer = if writer == A { B } else { A };
        let block = u32::try_from(self.rng.below(u64::from(BLOCKS))).unwrap_or(0);
        let value = self.next_value;
        self.next_value += 1;
        let peer_ok = {
            let w = &self.nodes[&writer].replicas[REPLICATED];
            let p = &self.nodes[&peer].replicas[REPLICATED];
            w.connected && p.connected && self.linked(writer, peer)
        };
        if !peer_ok {
            // Without its peer the primary must first record the peer Outdated.
            let epoch = self.nodes[&writer].replicas[REPLICATED].epoch;
            let counted = self.nodes[&writer].replicas[REPLICATED].peer_uptodate_events;
            let now = self.clock(writer);
            self.nodes.get_mut(&writer).expect("node").core.step(
                now,
                Input::NoteOutdating {
                    volume: REPLICATED.to_owned(),
                    peer_uptodate_events: counted,
                },
            );
            let outdate = Command::Outdate {
                volume: REPLICATED.into(),
                victim: peer,
                by: writer,
                expect: epoch,
            };
            let recorded = self.log.volumes[REPLICATED].outdated.contains(&peer)
                && self.log.volumes[REPLICATED].primary == Some(writer)
                && self.log.volumes[REPLICATED].epoch == epoch
                && self.majority().is_some_and(|g| g.contains(&writer));
            if !recorded && !matches!(self.propose(writer, outdate), Some(Outcome::Applied)) {
                self.report.refused_writes += 1;
                if let Some(r) = self
                    .nodes
                    .get_mut(&writer)
                    .and_then(|n| n.replicas.get_mut(REPLICATED))
                {
                    r.suspended = true;
                }
                return Ok(());
            }
        }
        if let Some(primary) = self.log.volumes[REPLICATED].primary
            && primary != writer
        {
            return Err(self.fail(format!(
                "node {writer} acknowledges writes to {REPLICATED} while node {primary} is primary"
            )));
        }
        // A crash in the middle of a write: it reaches one side, nobody acknowledges it.
        let crash_mid_write = faults && self.rng.chance(20);
        if let Some(r) = self
            .nodes
            .get_mut(&writer)
            .and_then(|n| n.replicas.get_mut(REPLICATED))
        {
            r.data.insert(block, value);
        }
        if crash_mid_write {
            self.crash(writer);
            return Ok(());
        }
        if peer_ok
            && let Some(r) = self
                .nodes
                .get_mut(&peer)
                .and_then(|n| n.replicas.get_mut(REPLICATED))
        {
            r.data.insert(block, value);
        }
        self.acked.insert(block, value);
        self.report.acked_writes += 1;
        Ok(())
    }

    fn check(&self) -> Result<(), SimFailure> {
        self.log
            .check_invariants()
            .map_err(|e| self.fail(format!("log invariant: {e}")))?;
        self.lu.check_invariants();
        for volume in [REPLICATED, SHARED] {
            let mut by_epoch: BTreeMap<Epoch, Vec<NodeId>> = BTreeMap::new();
            for id in DATA {
                let node = &self.nodes[&id];
                let r = &node.replicas[volume];
                if node.alive && r.role == ReplicaRole::Primary && !r.suspended {
                    by_epoch.entry(r.epoch).or_default().push(id);
                }
            }
            for (epoch, primaries) in by_epoch {
                if primaries.len() > 1 {
                    return Err(self.fail(format!(
                        "two primaries of {volume} at epoch {epoch}: {primaries:?}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn step_once(&mut self, faults: bool) -> Result<(), SimFailure> {
        self.step_with(faults, !faults)
    }

    /// One step; `heal` resumes every paused node.
    fn step_with(&mut self, faults: bool, heal: bool) -> Result<(), SimFailure> {
        self.step += 1;
        self.now = self.now.plus(STEP_MS);
        self.resume_due(heal);
        if faults {
            self.inject_faults()?;
        }
        self.catch_up();
        self.ticks()?;
        self.replicate();
        self.workload(faults)?;
        self.check()
    }
}

/// Runs one seeded simulation: `fault_steps` steps with faults, then healing.
pub fn run(seed: u64, fault_steps: u64) -> Result<SimReport, SimFailure> {
    let mut world = World::new(seed);
    for _ in 0..fault_steps {
        world.step_once(true)?;
    }
    // Heal: every node up, every link up, then give the cluster time to settle.
    world.cut.clear();
    for id in NODES {
        if !world.nodes[&id].alive {
            world.restart(id)?;
        }
    }
    let settle_steps = 3000 / STEP_MS;
    for _ in 0..settle_steps {
        world.step_once(false)?;
    }
    let record = &world.log.volumes[REPLICATED];
    let Some(primary) = record.primary else {
        return Err(world.fail(format!(
            "no primary of {REPLICATED} after healing: {record:?}"
        )));
    };
    let primary_data = &world.nodes[&primary].replicas[REPLICATED].data;
    for (block, value) in &world.acked {
        if primary_data.get(block).is_none_or(|v| v < value) {
            return Err(world.fail(format!(
                "acknowledged write {value} to block {block} missing on primary {primary}"
            )));
        }
    }
    let (da, db) = (
        &world.nodes[&A].replicas[REPLICATED].data,
        &world.nodes[&B].replicas[REPLICATED].data,
    );
    if da != db {
        let (ra, rb) = (
            &world.nodes[&A].replicas[REPLICATED],
            &world.nodes[&B].replicas[REPLICATED],
        );
        return Err(world.fail(format!(
            "replicas differ after healing and resync:\nA {ra:?}\nB {rb:?}"
        )));
    }
    if world.log.volumes[SHARED].primary.is_none() {
        return Err(world.fail(format!("no primary of {SHARED} after healing")));
    }
    world.report.steps = world.step;
    world.report.failovers = world.log.failovers;
    world.report.fencings = world.log.fencing.len();
    Ok(world.report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds() -> Vec<u64> {
        if let Some(seed) = std::env::var("TANDEM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
        {
            return vec![seed];
        }
        // CI: 600 runs (under a minute); TANDEM_LONG=1: 20,000 (about half an hour).
        let long = std::env::var("TANDEM_LONG").is_ok_and(|v| v == "1");
        let count = std::env::var("TANDEM_SEEDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if long { 20_000 } else { 600 });
        (0..count).collect()
    }

    #[test]
    fn cluster_protocol_keeps_its_invariants_under_crashes_and_partitions() {
        let mut totals = SimReport::default();
        for seed in seeds() {
            match run(seed, 1500) {
                Ok(r) => {
                    totals.acked_writes += r.acked_writes;
                    totals.failovers += r.failovers;
                    totals.fencings += r.fencings;
                    totals.crashes += r.crashes;
                    totals.partitions += r.partitions;
                    totals.refused_writes += r.refused_writes;
                    totals.pauses += r.pauses;
                    totals.stops += r.stops;
                    totals.reads += r.reads;
                }
                Err(e) => panic!("{e}"),
            }
        }
        eprintln!("simulation totals: {totals:?}");
        // The runs must have exercised what they claim to check.
        assert!(
            totals.failovers > 0
                && totals.fencings > 0
                && totals.acked_writes > 0
                && totals.pauses > 0
                && totals.stops > 0
                && totals.reads > 0,
            "{totals:?}"
        );
    }

    /// Whether `id` would serve a read of the replicated volume now.
    fn serves_reads(world: &World, id: NodeId) -> bool {
        let node = &world.nodes[&id];
        world.running(id)
            && world.leased(id)
            && node.replicas[REPLICATED].role == ReplicaRole::Primary
    }

    #[test]
    fn a_primary_paused_past_its_lease_serves_no_stale_read_when_it_resumes() {
        let mut w = World::new(3);
        let mut steps = 0;
        let old = loop {
            w.step_with(false, false).unwrap();
            steps += 1;
            assert!(steps < 1000, "no primary took writes in sync with its peer");
            // In sync: the other replica can take over.
            let in_sync = w.log.volumes[REPLICATED].outdated.is_empty()
                && DATA
                    .iter()
                    .all(|n| w.nodes[n].replicas[REPLICATED].connected);
            if let Some(p) = w.log.volumes[REPLICATED].primary
                && serves_reads(&w, p)
                && !w.acked.is_empty()
                && in_sync
            {
                break p;
            }
        };
        w.pause(old, FAILURE_TIMEOUT_MS * 3);
        let before = w.acked.clone();
        let resumed_at = w.now.plus(FAILURE_TIMEOUT_MS * 3);
        while w.now < resumed_at {
            w.step_with(false, false).unwrap();
        }
        let replaced = w.log.volumes[REPLICATED].primary.is_some_and(|p| p != old);
        assert!(
            replaced && w.acked != before,
            "the new primary took no write while {old} was stopped: {:?}\n{}",
            w.log.volumes[REPLICATED],
            w.trace.iter().cloned().collect::<Vec<_>>().join("\n")
        );
        // Resumed: whenever the old primary would serve a read, it must be a fresh one.
        let mut served = 0;
        for _ in 0..100 {
            w.step_with(false, false).unwrap();
            if serves_reads(&w, old) {
                for block in 0..BLOCKS {
                    w.read_block(old, block).unwrap();
                }
                served += 1;
            }
        }
        eprintln!("the old primary served reads in {served} of 100 steps after resuming");
    }

    #[test]
    fn the_same_seed_gives_the_same_run() {
        assert_eq!(run(42, 800), run(42, 800));
    }
}
