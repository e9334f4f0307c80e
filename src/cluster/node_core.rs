//! One cluster node's decisions as a sans-IO state machine: inputs in, actions out.
//!
//! ```text
//!   Tick (every heartbeat) ──► Heartbeat out; membership events; rounds started
//!   Heartbeat from a peer  ──► detector, peer reports
//!   Done { op, result }    ──► the round that waited for `op` goes on
//!
//!   rounds (each one operation at a time, in order):
//!     lead   — only on the cluster-log leader: Configure, or the orchestrator's
//!              leader decisions, proposed one by one (stop at the first not committed)
//!     act    — every node: read the replicas fresh, then the orchestrator's local
//!              actions, carried out one by one (stop at the first failure)
//!     shutdown, reservation-lost — scripts that carry on past failures
//! ```
//!
//! [`NodeCore`] owns everything a node decides with: its incarnation, the failure
//! detector, the peers' reports, the resources it runs, the fencings it carries out and
//! the resync evidence. It reads no clock and does no I/O: time comes in with every
//! [`NodeCore::step`], and every operation (a proposal, a replica command, starting
//! resources, a reservation preempt) goes out as [`Action::Perform`] and comes back as
//! [`Input::Done`]. `node.rs` runs it for tandemd; `sim.rs` runs the same core against a
//! simulated network, log, disks and LU.
//!
//! The lease to serve: heartbeats carry their send time, echo the peers' send times and
//! say which peers' lives the sender's log holds up (endorsement). The detector anchors
//! this node's lease on its own heartbeat that a majority echoed with endorsement, and
//! the core announces it ([`Action::Lease`]); the runner lets a primary replica serve
//! nothing past it. A node that takes a volume over from a fenced life promotes its
//! replica only once the peers' views (also in heartbeats) show that too few voters
//! could still endorse that life.

use super::detector::{Detector, Echo};
use super::orchestrator::{
    self, LeaderView, LocalAction, LocalView, NodeReport, ReplicaReport, ReplicaRole,
    ResyncEvidence,
};
use super::peers::{Heartbeat, PeerView};
use super::state::{ClusterState, Command, FenceLogEntry, FenceMethod, Outcome};
use super::status::EventKind;
use super::types::{Incarnation, Millis, NodeId};
use super::volume::VolumeAction;
use crate::replication::types::ClusterLogId;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// How long a reservation fence may take before it counts as failed (and is retried): a
/// stuck target must not block failover forever.
pub const FENCE_LIMIT_MS: u64 = 60_000;

/// What the core is told about the node it runs.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    pub me: NodeId,
    pub incarnation: Incarnation,
    /// Every configured node, in configuration order.
    pub members: Vec<NodeId>,
    /// Every configured volume and its replicas (node ids), for the log's Configure.
    pub volumes: BTreeMap<String, Vec<NodeId>>,
    /// Local volumes on shared devices, fenced with reservations.
    pub shared: BTreeSet<String>,
    /// This node registers reservation keys (it has shared devices).
    pub has_fencer: bool,
    pub failure_timeout_ms: u64,
    pub quorum_lease_ms: u64,
    /// The identity a log configured by this node gets (used only if the log has none).
    pub fresh_log_id: ClusterLogId,
}

/// The caller's clocks at a step: `mono` for every timeout, `wall` only for records that
/// people read (fencing history).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Now {
    pub mono: Millis,
    pub wall: Millis,
}

/// Names one operation handed out in [`Action::Perform`]; its result names it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u64);

/// An operation the runner carries out and reports with [`Input::Done`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read every local replica's state now → [`OpResult::Replicas`].
    ReadReplicas,
    /// Commit a command to the cluster log → [`OpResult::Proposed`].
    Propose(Command),
    /// Carry out a command on a local replica → [`OpResult::Done`].
    Replica {
        volume: String,
        action: VolumeAction,
    },
    /// Start a volume's resources (mount, address, export) → [`OpResult::Done`].
    StartResources { volume: String },
    /// Stop them → [`OpResult::Done`].
    StopResources { volume: String },
    /// Preempt `victim`'s key of life `incarnation` on `volume`'s shared devices and
    /// confirm it is gone → [`OpResult::Fenced`] with a description.
    FenceReservation {
        volume: String,
        victim: NodeId,
        incarnation: Incarnation,
    },
    /// Durably store the next incarnation → [`OpResult::Incarnation`].
    NewIncarnation,
    /// Register this life's key on every shared device → [`OpResult::Done`].
    Unfence { incarnation: Incarnation },
}

/// The result of an [`Op`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    Replicas(BTreeMap<String, ReplicaReport>),
    Proposed(Result<Outcome, String>),
    Done(Result<(), String>),
    Fenced(Result<String, String>),
    Incarnation(Result<Incarnation, String>),
}

/// What happens to the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The node starts (before anything else).
    Start,
    /// A heartbeat period passed. `leader` is the cluster log's leader as this node knows
    /// it; `local` are the local replicas' current (cached) reports.
    Tick {
        leader: Option<NodeId>,
        local: BTreeMap<String, ReplicaReport>,
    },
    /// The cluster log as this node has applied it now.
    Log(Arc<ClusterState>),
    /// A peer's heartbeat arrived.
    Heartbeat(Heartbeat),
    /// An operation finished.
    Done { op: OpId, result: OpResult },
    /// This primary is about to ask for its peer of `volume` to be outdated; its replica
    /// has counted `peer_uptodate_events` (see [`ResyncEvidence`]).
    NoteOutdating {
        volume: String,
        peer_uptodate_events: u64,
    },
    /// This node's reservation key is gone from `volume`'s devices: it was fenced.
    ReservationLost { volume: String },
    /// Orderly stop: stop resources, demote, leave. `local`: the replicas now.
    Stop {
        local: BTreeMap<String, ReplicaReport>,
    },
    /// Abrupt stop (a crash in tests): nothing more is started.
    Halt,
}

/// What the core asks of its runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send this heartbeat to every peer.
    Heartbeat(Heartbeat),
    /// Publish an event.
    Emit(EventKind),
    /// Carry out `what` and report its result as `Input::Done { op, .. }`.
    Perform { op: OpId, what: Op },
    /// This node holds the quorum lease until `until` (the core's clock, `Now::mono`):
    /// past it, the local replicas serve no I/O — reads included — until a new lease.
    Lease { until: Millis },
}

/// A sequence of work the core runs one operation at a time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum RoundKind {
    Lead,
    Act,
    Shutdown,
    ReservationLost(String),
}

/// One step of a round, and where a multi-operation step is.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// Act: waiting for the fresh replica reports.
    Reading {
        quorate: bool,
        state: Arc<ClusterState>,
    },
    /// A local action whose (single) operation is out.
    Action(LocalAction),
    /// Fence: the reservation preempt is out (no later than `deadline`).
    Preempting {
        action: LocalAction,
        deadline: Millis,
    },
    /// Fence: the `Fenced` record is being proposed.
    RecordingFence(LocalAction),
    /// Rejoin: the new incarnation is being stored.
    StoringIncarnation(LocalAction),
    /// Rejoin: the new life's key is being registered.
    Unfencing(LocalAction),
    /// Start: the first life's key is being registered.
    StartUnfence(Incarnation),
}

#[derive(Debug, Clone)]
struct Round {
    /// What is left, in order.
    queue: VecDeque<LocalAction>,
    /// The operation out and the stage it belongs to.
    waiting: Option<(OpId, Stage)>,
}

/// How a round treats a failed step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnFailure {
    /// Stop the round (the next one decides again from a fresh view).
    Stop,
    /// Go on with the next step.
    Continue,
}

/// What the core last told the world about membership (events only on change).
#[derive(Debug, Clone, Default)]
struct Observed {
    lease: Option<Millis>,
    alive: BTreeSet<NodeId>,
    quorate: Option<bool>,
    leader: Option<Option<NodeId>>,
}

/// One node's decisions. See the module documentation.
#[derive(Debug, Clone)]
pub struct NodeCore {
    config: CoreConfig,
    incarnation: Incarnation,
    now: Now,
    started: bool,
    /// No new act rounds (stopping or halted).
    stopping: bool,
    /// No new rounds at all.
    halted: bool,
    state: Arc<ClusterState>,
    detector: Detector,
    reports: BTreeMap<NodeId, NodeReport>,
    resources_running: BTreeSet<String>,
    fencing: BTreeSet<String>,
    evidence: ResyncEvidence,
    fence_operations: u64,
    /// Each peer's latest views of the others, and when they arrived.
    views: BTreeMap<NodeId, (Millis, BTreeMap<NodeId, PeerView>)>,
    rounds: BTreeMap<RoundKind, Round>,
    ops: BTreeMap<OpId, RoundKind>,
    next_op: u64,
    observed: Observed,
}

impl NodeCore {
    /// A core for a node starting at `now` with the log state `state`.
    pub fn new(config: CoreConfig, now: Now, state: Arc<ClusterState>) -> Self {
        let detector = Detector::new(
            config.me,
            &config.members,
            now.mono,
            config.failure_timeout_ms,
            config.quorum_lease_ms,
        );
        Self {
            incarnation: config.incarnation,
            config,
            now,
            started: false,
            stopping: false,
            halted: false,
            state,
            detector,
            reports: BTreeMap::new(),
            resources_running: BTreeSet::new(),
            fencing: BTreeSet::new(),
            evidence: ResyncEvidence::default(),
            fence_operations: 0,
            views: BTreeMap::new(),
            rounds: BTreeMap::new(),
            ops: BTreeMap::new(),
            next_op: 0,
            observed: Observed::default(),
        }
    }

    /// This life.
    pub fn incarnation(&self) -> Incarnation {
        self.incarnation
    }

    /// The failure detector (for status).
    pub fn detector(&self) -> &Detector {
        &self.detector
    }

    /// The latest report of every node, this one's included (for status).
    pub fn reports(&self) -> &BTreeMap<NodeId, NodeReport> {
        &self.reports
    }

    /// Whether this node heard a majority within the lease at the last step.
    pub fn is_quorate(&self, now: Millis) -> bool {
        self.detector.quorate(now)
    }

    /// How many fencings this node has carried out.
    pub fn fence_operations(&self) -> u64 {
        self.fence_operations
    }

    /// Whether a round of `kind` is running.
    pub fn round_running(&self, kind: &RoundKind) -> bool {
        self.rounds.contains_key(kind)
    }

    /// Feeds one input at time `now`; returns what to do, in order.
    pub fn step(&mut self, now: Now, input: Input) -> Vec<Action> {
        self.now = Now {
            mono: now.mono.max(self.now.mono),
            wall: now.wall,
        };
        let mut out = Vec::new();
        match input {
            Input::Start => self.start(&mut out),
            Input::Tick { leader, local } => self.tick(leader, local, &mut out),
            Input::Log(state) => self.state = state,
            Input::Heartbeat(heartbeat) => {
                let me = self.config.me;
                // An echo of an earlier life's heartbeat (on that life's clock) proves
                // nothing about this one.
                let echo = heartbeat
                    .echoes
                    .get(&me)
                    .filter(|echoed| echoed.life == self.incarnation)
                    .map(|echoed| Echo {
                        sent_at: echoed.sent_at,
                        endorsed: heartbeat.endorsed.contains(&me),
                    });
                self.detector.heard(
                    heartbeat.from,
                    heartbeat.incarnation,
                    self.now.mono,
                    heartbeat.sent_at,
                    echo,
                );
                if self.config.members.contains(&heartbeat.from) {
                    self.views
                        .insert(heartbeat.from, (self.now.mono, heartbeat.views));
                    self.reports.insert(heartbeat.from, heartbeat.report);
                }
                self.lease(&mut out);
            }
            Input::Done { op, result } => self.done(op, result, &mut out),
            Input::NoteOutdating {
                volume,
                peer_uptodate_events,
            } => self.evidence.note_outdating(&volume, peer_uptodate_events),
            Input::ReservationLost { volume } => self.reservation_lost(volume, &mut out),
            Input::Stop { local } => self.stop(&local, &mut out),
            Input::Halt => {
                self.stopping = true;
                self.halted = true;
            }
        }
        out
    }

    fn perform(&mut self, kind: RoundKind, stage: Stage, what: Op, out: &mut Vec<Action>) {
        let op = OpId(self.next_op);
        self.next_op += 1;
        self.ops.insert(op, kind.clone());
        if let Some(round) = self.rounds.get_mut(&kind) {
            round.waiting = Some((op, stage));
        }
        out.push(Action::Perform { op, what });
    }

    fn begin(&mut self, kind: RoundKind, queue: VecDeque<LocalAction>) {
        self.rounds.insert(
            kind,
            Round {
                queue,
                waiting: None,
            },
        );
    }

    fn start(&mut self, out: &mut Vec<Action>) {
        if self.config.has_fencer {
            // Register this life's key on the shared devices before joining: a node that
            // cannot write to them must not become their primary.
            self.begin(RoundKind::Act, VecDeque::new());
            let incarnation = self.incarnation;
            self.perform(
                RoundKind::Act,
                Stage::StartUnfence(incarnation),
                Op::Unfence { incarnation },
                out,
            );
        } else {
            self.started(out);
        }
    }

    fn started(&mut self, out: &mut Vec<Action>) {
        self.started = true;
        out.push(Action::Emit(EventKind::Started {
            incarnation: self.incarnation,
        }));
    }

    /// The other configured nodes.
    fn peers(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.config
            .members
            .iter()
            .copied()
            .filter(|node| *node != self.config.me)
    }

    /// The peers whose current life (as their heartbeats announce it) this node's log
    /// holds up: its echoes let them serve.
    fn endorsed(&self) -> BTreeSet<NodeId> {
        self.peers()
            .filter(|peer| {
                let member = self.state.members.get(peer);
                member.is_some_and(|m| {
                    m.up && Some(m.incarnation) == self.detector.incarnation(*peer)
                })
            })
            .collect()
    }

    /// What this node's log says of each peer's life, and the newest life it endorsed.
    fn views_of_peers(&self) -> BTreeMap<NodeId, PeerView> {
        let now = self.now.mono;
        self.peers()
            .map(|peer| {
                let member = self.state.members.get(&peer);
                let view = PeerView {
                    life: member.map(|m| m.incarnation).unwrap_or_default(),
                    up: member.is_some_and(|m| m.up),
                    endorsed: self
                        .detector
                        .endorsed_life(peer)
                        .map(|(life, heard)| (life, now.since(heard))),
                };
                (peer, view)
            })
            .collect()
    }

    /// Whether the life this node takes `volume` over from — the latest one fenced on
    /// it — can no longer hold a lease to serve: too few voters could still endorse it.
    /// A voter releases that life once its log holds it ended (it never endorses it
    /// again) and one lease (with a margin for clock rates) has passed since it heard
    /// the life's last heartbeat it did endorse. A new primary that served sooner could
    /// acknowledge a write that the old one, cut off from it but not from a witness that
    /// has not yet applied the fencing, then reads back stale.
    fn old_life_released(&self, volume: &str) -> bool {
        let Some(fenced) = self.state.fencing.iter().rev().find(|f| f.volume == volume) else {
            return true;
        };
        let (old, life) = (fenced.victim, fenced.victim_incarnation);
        if old == self.config.me {
            return true;
        }
        let now = self.now.mono;
        let lease = self.config.quorum_lease_ms;
        let margin = lease / 10;
        let quiet_since = |heard: Millis| heard.plus(lease + margin) <= now;
        let released = self
            .config
            .members
            .iter()
            .filter(|node| **node != old)
            .filter(|node| {
                if **node == self.config.me {
                    // This node applied the fencing: its log holds the life ended.
                    return match self.detector.endorsed_life(old) {
                        Some((endorsed, heard)) if endorsed == life => quiet_since(heard),
                        _ => true,
                    };
                }
                let Some((received, view)) = self
                    .views
                    .get(node)
                    .and_then(|(at, views)| views.get(&old).map(|v| (*at, *v)))
                else {
                    return false;
                };
                view.ended(life)
                    && match view.endorsed {
                        Some((endorsed, ago)) if endorsed == life => {
                            quiet_since(Millis(received.0.saturating_sub(ago)))
                        }
                        _ => true,
                    }
            })
            .count();
        // The endorsers the old life needs for a majority; of the others, too few remain.
        let voters = self.config.members.len();
        let needed = voters / 2;
        let others = voters.saturating_sub(1);
        released + needed > others
    }

    /// Tells the runner when the lease to serve I/O changed.
    fn lease(&mut self, out: &mut Vec<Action>) {
        if !self.started || self.halted {
            return;
        }
        let until = self.detector.serve_until();
        if self.observed.lease != Some(until) {
            self.observed.lease = Some(until);
            out.push(Action::Lease { until });
        }
    }

    /// This node's report: its replicas and their resources.
    fn own_report(&self, local: BTreeMap<String, ReplicaReport>) -> NodeReport {
        let volumes = local
            .into_iter()
            .map(|(name, mut report)| {
                report.resources_running = self.resources_running.contains(&name);
                (name, report)
            })
            .collect();
        NodeReport {
            incarnation: self.incarnation,
            quorate: self.detector.quorate(self.now.mono),
            volumes,
        }
    }

    /// The last report of every peer still heard within the failure timeout (a silent
    /// node's last report is history, not state), this node's own included.
    fn fresh_reports(&self) -> BTreeMap<NodeId, NodeReport> {
        let alive = self.detector.alive(self.now.mono);
        self.reports
            .iter()
            .filter(|(id, _)| alive.contains(id))
            .map(|(id, r)| (*id, r.clone()))
            .collect()
    }

    fn tick(
        &mut self,
        leader: Option<NodeId>,
        local: BTreeMap<String, ReplicaReport>,
        out: &mut Vec<Action>,
    ) {
        if !self.started || self.halted {
            return;
        }
        self.expire(out);
        let now = self.now.mono;
        let me = self.config.me;
        let report = self.own_report(local);
        let endorsed = self.endorsed();
        for peer in &endorsed {
            self.detector.endorse(*peer);
        }
        out.push(Action::Heartbeat(Heartbeat {
            from: me,
            incarnation: self.incarnation,
            report: report.clone(),
            sent_at: now,
            echoes: self.detector.echoes(),
            endorsed,
            views: self.views_of_peers(),
        }));
        self.lease(out);
        self.reports.insert(me, report);
        let alive = self.detector.alive(now);
        let dead = self.detector.dead(now);
        let quorate = self.detector.quorate(now);
        for peer in alive.difference(&self.observed.alive) {
            out.push(Action::Emit(EventKind::PeerAlive { peer: *peer }));
        }
        for peer in self.observed.alive.difference(&alive) {
            out.push(Action::Emit(EventKind::PeerSilent {
                peer: *peer,
                silence_ms: self.detector.silence_ms(*peer, now).unwrap_or(0),
            }));
        }
        self.observed.alive = alive.clone();
        if self.observed.quorate != Some(quorate) {
            out.push(Action::Emit(EventKind::Quorum { quorate }));
            self.observed.quorate = Some(quorate);
        }
        if self.observed.leader != Some(leader) {
            out.push(Action::Emit(EventKind::Leader { leader }));
            self.observed.leader = Some(leader);
        }
        if leader == Some(me) && !self.rounds.contains_key(&RoundKind::Lead) {
            self.lead(&alive, &dead, out);
        }
        if !self.stopping && !self.rounds.contains_key(&RoundKind::Act) {
            self.begin(RoundKind::Act, VecDeque::new());
            // The log's state first, then the replicas read fresh: a replica's view taken
            // after the log's state is never older than it.
            let stage = Stage::Reading {
                quorate,
                state: Arc::clone(&self.state),
            };
            self.perform(RoundKind::Act, stage, Op::ReadReplicas, out);
        }
    }

    /// The leader's part: configure the log, then the orchestrator's decisions.
    fn lead(&mut self, alive: &BTreeSet<NodeId>, dead: &BTreeSet<NodeId>, out: &mut Vec<Action>) {
        let state = Arc::clone(&self.state);
        let configured = self
            .config
            .members
            .iter()
            .all(|n| state.members.contains_key(n))
            && self
                .config
                .volumes
                .keys()
                .all(|v| state.volumes.contains_key(v));
        let commands = if configured {
            orchestrator::leader_decisions(LeaderView {
                now: self.now.mono,
                state: &state,
                alive,
                dead,
                reports: &self.fresh_reports(),
            })
        } else {
            vec![Command::Configure {
                members: self.config.members.clone(),
                volumes: self.config.volumes.clone(),
                // Used only if the log has no identity yet (its first entry).
                log_id: self.config.fresh_log_id,
            }]
        };
        let queue = commands
            .into_iter()
            .map(|command| LocalAction::Propose { command })
            .collect();
        self.begin(RoundKind::Lead, queue);
        self.next_step(RoundKind::Lead, out);
    }

    fn reservation_lost(&mut self, volume: String, out: &mut Vec<Action>) {
        let kind = RoundKind::ReservationLost(volume.clone());
        if self.halted || self.rounds.contains_key(&kind) {
            return;
        }
        tracing::error!(%volume, "own reservation key is gone: this node was fenced; stopping I/O");
        // Step down first (held or in-flight writes fail, never acknowledged), so that
        // stopping the resources (an unmount) cannot wait on I/O that will never finish.
        let queue = VecDeque::from([
            LocalAction::StepDown {
                volume: volume.clone(),
            },
            LocalAction::StopResources { volume },
        ]);
        self.begin(kind.clone(), queue);
        self.next_step(kind, out);
    }

    fn stop(&mut self, local: &BTreeMap<String, ReplicaReport>, out: &mut Vec<Action>) {
        if self.rounds.contains_key(&RoundKind::Shutdown) {
            return;
        }
        out.push(Action::Emit(EventKind::Stopping));
        // No more automatic actions from here on.
        self.stopping = true;
        let mut queue = VecDeque::new();
        for (name, report) in local {
            let primary =
                self.state.volumes.get(name).and_then(|v| v.primary) == Some(self.config.me);
            queue.push_back(LocalAction::StopResources {
                volume: name.clone(),
            });
            if primary || report.role == ReplicaRole::Primary {
                queue.push_back(LocalAction::DemoteReplica {
                    volume: name.clone(),
                });
            }
        }
        queue.push_back(LocalAction::Propose {
            command: Command::Leave {
                node: self.config.me,
                incarnation: self.incarnation,
            },
        });
        self.begin(RoundKind::Shutdown, queue);
        self.next_step(RoundKind::Shutdown, out);
    }

    /// Starts the next step of round `kind`, or ends the round.
    fn next_step(&mut self, kind: RoundKind, out: &mut Vec<Action>) {
        loop {
            let Some(action) = self
                .rounds
                .get_mut(&kind)
                .and_then(|round| round.queue.pop_front())
            else {
                self.rounds.remove(&kind);
                return;
            };
            if kind == RoundKind::Act
                && let LocalAction::Propose {
                    command: Command::UpToDate { volume, .. },
                } = &action
            {
                tracing::info!(%volume, "proposing that the peer is UpToDate again");
            }
            if kind == RoundKind::Act
                && let LocalAction::PromoteReplica { volume, .. } = &action
                && !self.old_life_released(volume)
            {
                // Not yet: the next round asks again.
                tracing::debug!(%volume, "waiting until the replaced primary's lease has run out");
                self.rounds.remove(&kind);
                return;
            }
            if self.begin_action(kind.clone(), action, out) {
                return;
            }
        }
    }

    /// Hands out the first operation of `action`; false if it needed none.
    fn begin_action(
        &mut self,
        kind: RoundKind,
        action: LocalAction,
        out: &mut Vec<Action>,
    ) -> bool {
        let log = self.state.log_id;
        let replica = |volume: &String, action: VolumeAction| Op::Replica {
            volume: volume.clone(),
            action,
        };
        let what = match &action {
            LocalAction::Propose { command } => Op::Propose(command.clone()),
            LocalAction::PromoteReplica {
                volume,
                epoch,
                force,
            } => replica(
                volume,
                VolumeAction::Promote {
                    epoch: *epoch,
                    force: *force,
                    log,
                },
            ),
            LocalAction::DemoteReplica { volume } => replica(volume, VolumeAction::Demote),
            LocalAction::SetEpoch { volume, epoch } => {
                replica(volume, VolumeAction::SetEpoch { epoch: *epoch, log })
            }
            LocalAction::Suspend { volume } => replica(volume, VolumeAction::Suspend),
            LocalAction::Resume { volume } => replica(volume, VolumeAction::Resume),
            LocalAction::StepDown { volume } => replica(volume, VolumeAction::StepDown),
            LocalAction::StartResources { volume } => Op::StartResources {
                volume: volume.clone(),
            },
            LocalAction::StopResources { volume } => Op::StopResources {
                volume: volume.clone(),
            },
            LocalAction::Rejoin => {
                self.perform(
                    kind,
                    Stage::StoringIncarnation(action),
                    Op::NewIncarnation,
                    out,
                );
                return true;
            }
            LocalAction::Fence {
                volume,
                victim,
                victim_incarnation,
                reservation,
            } => {
                self.fencing.insert(volume.clone());
                self.fence_operations += 1;
                if *reservation {
                    tracing::info!(%volume, %victim, incarnation = %victim_incarnation, "fencing with reservations");
                    let what = Op::FenceReservation {
                        volume: volume.clone(),
                        victim: *victim,
                        incarnation: *victim_incarnation,
                    };
                    let deadline = self.now.mono.plus(FENCE_LIMIT_MS);
                    self.perform(kind, Stage::Preempting { action, deadline }, what, out);
                } else {
                    self.record_fence(kind, action, FenceMethod::Epoch, out);
                }
                return true;
            }
        };
        self.perform(kind, Stage::Action(action), what, out);
        true
    }

    fn record_fence(
        &mut self,
        kind: RoundKind,
        action: LocalAction,
        method: FenceMethod,
        out: &mut Vec<Action>,
    ) {
        let LocalAction::Fence {
            volume,
            victim,
            victim_incarnation,
            ..
        } = &action
        else {
            return;
        };
        let volume_epoch = self
            .state
            .volumes
            .get(volume)
            .map(|v| v.epoch)
            .unwrap_or_default();
        let entry = FenceLogEntry {
            volume: volume.clone(),
            victim: *victim,
            victim_incarnation: *victim_incarnation,
            by: self.config.me,
            method,
            at: self.now.wall,
            volume_epoch,
        };
        self.perform(
            kind,
            Stage::RecordingFence(action),
            Op::Propose(Command::Fenced { entry }),
            out,
        );
    }

    fn on_failure(kind: &RoundKind) -> OnFailure {
        match kind {
            RoundKind::Lead | RoundKind::Act => OnFailure::Stop,
            RoundKind::Shutdown | RoundKind::ReservationLost(_) => OnFailure::Continue,
        }
    }

    fn done(&mut self, op: OpId, result: OpResult, out: &mut Vec<Action>) {
        let Some(kind) = self.ops.remove(&op) else {
            // An operation this core gave up on (a fence past its limit): too late.
            tracing::debug!(?op, ?result, "late result of an abandoned operation");
            return;
        };
        let waited_for = self
            .rounds
            .get(&kind)
            .and_then(|round| round.waiting.as_ref())
            .is_some_and(|(waiting, _)| *waiting == op);
        let Some((_, stage)) = self
            .rounds
            .get_mut(&kind)
            .filter(|_| waited_for)
            .and_then(|round| round.waiting.take())
        else {
            return;
        };
        let finished = self.finish_stage(&kind, stage, result, out);
        self.after(kind, finished, out);
    }

    /// Carries a stage forward with its operation's result.
    fn finish_stage(
        &mut self,
        kind: &RoundKind,
        stage: Stage,
        result: OpResult,
        out: &mut Vec<Action>,
    ) -> Finished {
        match (stage, result) {
            (Stage::StartUnfence(incarnation), OpResult::Done(result)) => {
                if let Err(e) = result {
                    tracing::error!(error = %e, %incarnation, "unfencing failed; shared volumes will not run here");
                }
                self.started(out);
                Finished::Next
            }
            (Stage::Reading { quorate, state }, OpResult::Replicas(mut replicas)) => {
                for (name, report) in &mut replicas {
                    report.resources_running = self.resources_running.contains(name);
                }
                let resynced = self.evidence.observe(&state, &replicas);
                let actions = orchestrator::local_actions(LocalView {
                    me: self.config.me,
                    incarnation: self.incarnation,
                    now: self.now.mono,
                    quorate,
                    state: &state,
                    replicas: &replicas,
                    reports: &self.fresh_reports(),
                    shared: &self.config.shared,
                    fencing: &self.fencing,
                    resynced: &resynced,
                });
                if let Some(round) = self.rounds.get_mut(kind) {
                    round.queue = actions.into();
                }
                Finished::Next
            }
            (Stage::Action(action), result) => {
                if *kind == RoundKind::Lead
                    && let OpResult::Proposed(Ok(Outcome::Rejected { reason })) = &result
                {
                    // Decided on an old view: harmless; the next decision may still hold.
                    tracing::debug!(?action, %reason, "leader decision rejected");
                    return Finished::Next;
                }
                let result = match result {
                    OpResult::Proposed(Ok(Outcome::Applied)) | OpResult::Done(Ok(())) => Ok(()),
                    OpResult::Proposed(Ok(Outcome::Rejected { reason })) => {
                        Err(format!("rejected: {reason}"))
                    }
                    OpResult::Proposed(Err(e)) | OpResult::Done(Err(e)) => Err(e),
                    other => Err(format!("unexpected result {other:?}")),
                };
                self.action_finished(kind, action, result, out)
            }
            (Stage::Preempting { action, .. }, OpResult::Fenced(result)) => match result {
                Ok(detail) => {
                    if let LocalAction::Fence { volume, victim, .. } = &action {
                        tracing::info!(%volume, %victim, %detail, "fenced");
                    }
                    self.record_fence(
                        kind.clone(),
                        action,
                        FenceMethod::Reservation { detail },
                        out,
                    );
                    Finished::Waiting
                }
                Err(e) => self.action_finished(kind, action, Err(e), out),
            },
            (Stage::RecordingFence(action), OpResult::Proposed(result)) => {
                let result = match result {
                    Ok(Outcome::Applied) => Ok(()),
                    Ok(Outcome::Rejected { reason }) => {
                        Err(format!("fencing record rejected: {reason}"))
                    }
                    Err(e) => Err(e),
                };
                self.action_finished(kind, action, result, out)
            }
            (Stage::StoringIncarnation(action), OpResult::Incarnation(result)) => match result {
                Ok(next) => {
                    self.incarnation = next;
                    tracing::warn!(incarnation = %next, "the cluster ended this node's life; rejoining as a new incarnation");
                    if self.config.has_fencer {
                        self.perform(
                            kind.clone(),
                            Stage::Unfencing(action),
                            Op::Unfence { incarnation: next },
                            out,
                        );
                        Finished::Waiting
                    } else {
                        self.action_finished(kind, action, Ok(()), out)
                    }
                }
                Err(e) => self.action_finished(
                    kind,
                    action,
                    Err(format!("cannot store a new incarnation: {e}")),
                    out,
                ),
            },
            (Stage::Unfencing(action), OpResult::Done(result)) => {
                self.action_finished(kind, action, result, out)
            }
            (stage, result) => {
                tracing::error!(
                    ?stage,
                    ?result,
                    "an operation answered with the wrong result"
                );
                Finished::Failed
            }
        }
    }

    /// Book-keeping and the event once a local action is over.
    fn action_finished(
        &mut self,
        kind: &RoundKind,
        action: LocalAction,
        result: Result<(), String>,
        out: &mut Vec<Action>,
    ) -> Finished {
        match &action {
            LocalAction::StartResources { volume } if result.is_ok() => {
                self.resources_running.insert(volume.clone());
            }
            LocalAction::StopResources { volume } => {
                self.resources_running.remove(volume);
            }
            LocalAction::Fence { volume, .. } => {
                self.fencing.remove(volume);
            }
            _ => {}
        }
        match kind {
            RoundKind::Lead => {
                let LocalAction::Propose { command } = &action else {
                    return Finished::Next;
                };
                match &result {
                    Ok(()) => tracing::info!(?command, "leader decision applied"),
                    Err(e) if matches!(command, Command::Configure { .. }) => {
                        tracing::debug!(error = %e, "configuring the cluster log failed; will retry");
                    }
                    Err(e) => tracing::warn!(?command, error = %e, "leader decision not committed"),
                }
            }
            RoundKind::Act | RoundKind::ReservationLost(_) => {
                // A Join that fails is retried next round; it is not news.
                let quiet = matches!(
                    action,
                    LocalAction::Propose {
                        command: Command::Join { .. }
                    }
                ) && result.is_err();
                if !quiet {
                    out.push(Action::Emit(EventKind::Action {
                        action: action.clone(),
                        error: result.clone().err(),
                    }));
                }
                if let Err(e) = &result {
                    tracing::warn!(?action, error = %e, "local action failed");
                }
            }
            RoundKind::Shutdown => {
                if let Err(e) = &result {
                    tracing::warn!(?action, error = %e, "step of the orderly stop failed");
                }
            }
        }
        match result {
            Ok(()) => Finished::Next,
            Err(_) => Finished::Failed,
        }
    }

    /// Gives up on fences past their limit (a stuck target): the fence failed and is
    /// retried by a later round; its late result is ignored.
    fn expire(&mut self, out: &mut Vec<Action>) {
        let now = self.now.mono;
        let expired: Vec<(RoundKind, OpId)> = self
            .rounds
            .iter()
            .filter_map(|(kind, round)| match &round.waiting {
                Some((op, Stage::Preempting { deadline, .. })) if now >= *deadline => {
                    Some((kind.clone(), *op))
                }
                _ => None,
            })
            .collect();
        for (kind, op) in expired {
            self.ops.remove(&op);
            let Some((_, Stage::Preempting { action, .. })) = self
                .rounds
                .get_mut(&kind)
                .and_then(|round| round.waiting.take())
            else {
                continue;
            };
            let error = match &action {
                LocalAction::Fence { volume, victim, .. } => format!(
                    "fencing {victim} on {volume} did not finish in {} s",
                    FENCE_LIMIT_MS / 1000
                ),
                _ => "fencing did not finish in time".to_owned(),
            };
            let finished = self.action_finished(&kind, action, Err(error), out);
            self.after(kind, finished, out);
        }
    }

    fn after(&mut self, kind: RoundKind, finished: Finished, out: &mut Vec<Action>) {
        match finished {
            Finished::Waiting => {}
            Finished::Next => self.next_step(kind, out),
            Finished::Failed => match Self::on_failure(&kind) {
                OnFailure::Stop => {
                    self.rounds.remove(&kind);
                }
                OnFailure::Continue => self.next_step(kind, out),
            },
        }
    }
}

/// Where a stage left its round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Finished {
    /// Another operation of the same step is out.
    Waiting,
    /// The step is over; go on.
    Next,
    /// The step failed.
    Failed,
}

#[cfg(test)]
#[path = "node_core_tests.rs"]
mod tests;
