//! Failover orchestration as pure decisions.
//!
//! Two functions, both `view in, decisions out`, called on every tick by the node's shell:
//!
//! ```text
//!  leader_decisions(LeaderView)  — only on the cluster-log leader:
//!      silent member      ──► MarkDown            (epoch bump; a lost primary → pending fence)
//!      volume w/o primary ──► Promote best replica (UpToDate, alive, not Outdated)
//!  local_actions(LocalView)      — on every node, for itself:
//!      no record of my life          ──► Join
//!      I execute a pending fence     ──► Fence (PR preempt or epoch) then Propose(Fenced)
//!      log says I am primary         ──► PromoteReplica, then StartResources
//!      log says I am not / switchover──► StopResources, DemoteReplica, Propose(Demote)
//!      primary without quorum        ──► Suspend (hold every acknowledgement)
//!      quorum back, leader confirms  ──► Propose(ConfirmPrimary), Resume
//!      my peer finished resync       ──► Propose(UpToDate)
//! ```
//!
//! The log's conditional commands make stale decisions harmless: a decision based on an
//! old view is rejected when applied.

use super::state::{ClusterState, Command};
use super::types::{Epoch, Incarnation, Millis, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Disk state of a replica, as its node reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    #[default]
    Diskless,
    /// Being written by a resync; not usable as a source.
    Inconsistent,
    /// Consistent but known to miss writes.
    Outdated,
    /// Consistent; may be newest (not yet confirmed by a peer).
    Consistent,
    UpToDate,
    /// The backing device failed and was detached.
    Failed,
}

/// Role of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaRole {
    #[default]
    Secondary,
    Primary,
}

/// One replica's state, reported in heartbeats.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ReplicaReport {
    pub disk: DiskState,
    pub role: ReplicaRole,
    /// Connected to its peer replica.
    pub connected: bool,
    /// Still resyncing (as source or target).
    pub syncing: bool,
    /// I/O suspended (no quorum, or waiting for the cluster log).
    pub suspended: bool,
    /// The volume epoch the replica runs at.
    pub epoch: Epoch,
    /// Bytes known out of sync with the peer.
    pub out_of_sync_bytes: u64,
    /// Resources on top are running.
    pub resources_running: bool,
    /// Progress of a running resync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncProgress>,
    /// The peer's disk as this replica last saw it over the replication link.
    #[serde(default)]
    pub peer_disk: DiskState,
    /// How many times this replica has seen its peer's disk become UpToDate (a resync
    /// finished, or a handshake found it in sync). Monotonic.
    #[serde(default)]
    pub peer_uptodate_events: u64,
    /// The local block device the volume is exported as (ublk), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// How far a resync has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SyncProgress {
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub rate_bytes_per_sec: u64,
}

impl SyncProgress {
    /// Percent done.
    pub fn percent(&self) -> f64 {
        if self.total_bytes == 0 {
            100.0
        } else {
            // Display only: precision loss on huge values is irrelevant.
            #[allow(clippy::cast_precision_loss)]
            let p = self.done_bytes as f64 * 100.0 / self.total_bytes as f64;
            p
        }
    }
    /// Seconds to go at the current rate.
    pub fn eta_secs(&self) -> Option<u64> {
        (self.rate_bytes_per_sec > 0)
            .then(|| self.total_bytes.saturating_sub(self.done_bytes) / self.rate_bytes_per_sec)
    }
}

/// What a node reports about itself in each heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeReport {
    pub incarnation: Incarnation,
    pub quorate: bool,
    pub volumes: BTreeMap<String, ReplicaReport>,
}

/// What the leader sees.
#[derive(Debug, Clone, Copy)]
pub struct LeaderView<'a> {
    pub now: Millis,
    pub state: &'a ClusterState,
    /// Peers heard within the failure timeout, the leader itself included.
    pub alive: &'a BTreeSet<NodeId>,
    /// Peers silent for the failure timeout.
    pub dead: &'a BTreeSet<NodeId>,
    /// Latest report of each node (the leader's own included).
    pub reports: &'a BTreeMap<NodeId, NodeReport>,
}

/// Commands the leader proposes now.
pub fn leader_decisions(view: LeaderView<'_>) -> Vec<Command> {
    let mut out = Vec::new();
    let state = view.state;
    for (node, member) in &state.members {
        if member.up && view.dead.contains(node) {
            out.push(Command::MarkDown {
                node: *node,
                incarnation: member.incarnation,
            });
        }
    }
    if !out.is_empty() {
        // Membership first; promotions are decided on the next tick from the new state.
        return out;
    }
    for (name, volume) in &state.volumes {
        if volume.primary.is_some() || volume.pending_fence.is_some() {
            continue;
        }
        if let Some(node) = choose_primary(view, name) {
            out.push(Command::Promote {
                volume: name.clone(),
                node,
                expect: volume.epoch,
            });
        } else if let Some(node) = choose_initial_primary(view, name) {
            out.push(Command::InitialPromote {
                volume: name.clone(),
                node,
                expect: volume.epoch,
            });
        }
    }
    out
}

/// The replica to promote: UpToDate (or Consistent and never contradicted), up in the log,
/// alive now, not Outdated, reporting at the current incarnation. Preference: a requested
/// switchover target, then the last primary, then configuration order.
fn choose_primary(view: LeaderView<'_>, name: &str) -> Option<NodeId> {
    let state = view.state;
    let volume = state.volumes.get(name)?;
    let eligible = |node: &NodeId| {
        let member = state.members.get(node);
        let report = view.reports.get(node);
        let replica = report.and_then(|r| r.volumes.get(name));
        member.is_some_and(|m| m.up)
            && view.alive.contains(node)
            && !volume.outdated.contains(node)
            && report.is_some_and(|r| Some(r.incarnation) == member.map(|m| m.incarnation))
            && replica.is_some_and(|r| {
                matches!(r.disk, DiskState::UpToDate | DiskState::Consistent) && !r.syncing
            })
    };
    let preferred = [volume.switchover_to, volume.last_primary];
    preferred
        .into_iter()
        .flatten()
        .chain(volume.replicas.iter().copied())
        .find(|n| eligible(n))
}

/// A brand-new volume (never had a primary) whose replicas are all up, alive and fresh
/// (Inconsistent): the first replica in configuration order becomes the source of the
/// initial full sync. No acknowledged write can exist yet, so nothing can be lost.
fn choose_initial_primary(view: LeaderView<'_>, name: &str) -> Option<NodeId> {
    let state = view.state;
    let volume = state.volumes.get(name)?;
    if volume.initialized || volume.replicas.is_empty() {
        return None;
    }
    let all_fresh = volume.replicas.iter().all(|node| {
        let member = state.members.get(node);
        let report = view.reports.get(node);
        member.is_some_and(|m| m.up)
            && view.alive.contains(node)
            && report.is_some_and(|r| Some(r.incarnation) == member.map(|m| m.incarnation))
            && report
                .and_then(|r| r.volumes.get(name))
                .is_some_and(|r| r.disk == DiskState::Inconsistent && !r.syncing)
    });
    all_fresh.then(|| volume.replicas[0])
}

/// What one node sees about itself.
#[derive(Debug, Clone, Copy)]
pub struct LocalView<'a> {
    pub me: NodeId,
    pub incarnation: Incarnation,
    pub now: Millis,
    pub quorate: bool,
    pub state: &'a ClusterState,
    /// This node's replicas.
    pub replicas: &'a BTreeMap<String, ReplicaReport>,
    /// Latest reports of the other nodes.
    pub reports: &'a BTreeMap<NodeId, NodeReport>,
    /// Volumes with shared devices fenced by reservations.
    pub shared: &'a BTreeSet<String>,
    /// Fencings this node is carrying out now (not to be started twice).
    pub fencing: &'a BTreeSet<String>,
    /// Volumes whose peer became UpToDate after this node learned of the latest
    /// outdating (see [`ResyncEvidence`]).
    pub resynced: &'a BTreeSet<String>,
}

/// Evidence that an Outdated peer really resynced: a PeerDisk→UpToDate transition seen
/// by the primary's replica *after* the primary learned of the latest outdating. A
/// snapshot of "connected and UpToDate" could predate the outdating (a link that just
/// dropped); a transition counted afterwards cannot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResyncEvidence {
    /// volume → (outdate_seq seen, the replica's peer_uptodate_events then)
    marks: BTreeMap<String, (u64, u64)>,
    /// Counter values noted when this primary asked for its peer to be outdated (the
    /// link was already down): a resync finishing before the outdating shows up in this
    /// node's copy of the log is still counted.
    pending: BTreeMap<String, u64>,
}

impl ResyncEvidence {
    /// This primary is about to outdate its peer of `volume`; its replica has counted
    /// `peer_uptodate_events` transitions so far.
    pub fn note_outdating(&mut self, volume: &str, peer_uptodate_events: u64) {
        let entry = self
            .pending
            .entry(volume.to_owned())
            .or_insert(peer_uptodate_events);
        *entry = (*entry).min(peer_uptodate_events);
    }

    /// Updates the marks from the log's state and the replicas' counters; returns the
    /// volumes with a resync counted since the latest outdating.
    pub fn observe(
        &mut self,
        state: &ClusterState,
        replicas: &BTreeMap<String, ReplicaReport>,
    ) -> BTreeSet<String> {
        let mut resynced = BTreeSet::new();
        for (name, replica) in replicas {
            let Some(volume) = state.volumes.get(name) else {
                continue;
            };
            let mark = self
                .marks
                .entry(name.clone())
                .or_insert((volume.outdate_seq, replica.peer_uptodate_events));
            if mark.0 != volume.outdate_seq {
                let noted = self
                    .pending
                    .remove(name)
                    .unwrap_or(replica.peer_uptodate_events);
                *mark = (volume.outdate_seq, noted.min(replica.peer_uptodate_events));
            }
            if replica.peer_uptodate_events > mark.1 {
                resynced.insert(name.clone());
            }
        }
        resynced
    }
}

/// Something a node does to itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum LocalAction {
    /// Propose a command to the cluster log.
    Propose {
        command: Command,
    },
    /// Make the local replica primary at `epoch` (the peer refuses older epochs);
    /// `force` makes a fresh replica the initial sync source.
    PromoteReplica {
        volume: String,
        epoch: Epoch,
        #[serde(default)]
        force: bool,
    },
    /// Make the local replica secondary (after flushing).
    DemoteReplica {
        volume: String,
    },
    /// Tell the local replica the volume epoch changed (it refuses an old primary).
    SetEpoch {
        volume: String,
        epoch: Epoch,
    },
    /// Stop acknowledging writes: no quorum.
    Suspend {
        volume: String,
    },
    /// Acknowledge writes again.
    Resume {
        volume: String,
    },
    /// This node was fenced (its reservation key is gone): fail in-flight writes and
    /// become secondary at once, so the resources on top can stop.
    StepDown {
        volume: String,
    },
    StartResources {
        volume: String,
    },
    StopResources {
        volume: String,
    },
    /// The cluster ended this node's life (declared it dead while it was cut off): start a
    /// new incarnation — a new reservation key on shared devices — before joining again.
    Rejoin,
    /// Fence `victim`'s lost life on `volume` (preempt its reservation key when the volume
    /// has shared devices), then propose `Fenced`.
    Fence {
        volume: String,
        victim: NodeId,
        victim_incarnation: Incarnation,
        reservation: bool,
    },
}

/// What this node does now.
pub fn local_actions(view: LocalView<'_>) -> Vec<LocalAction> {
    let state = view.state;
    let me = view.me;
    let mut out = Vec::new();
    let registered = state
        .members
        .get(&me)
        .is_some_and(|m| m.up && m.incarnation == view.incarnation);
    if !registered {
        // This life ended if the log holds it (or a later one) as down.
        let ended = state
            .members
            .get(&me)
            .is_some_and(|m| m.incarnation >= view.incarnation);
        // Until this life is in the log, nothing local may be primary: step down first,
        // then (re)join.
        for (name, replica) in view.replicas {
            if replica.resources_running {
                out.push(LocalAction::StopResources {
                    volume: name.clone(),
                });
            }
            if replica.role == ReplicaRole::Primary {
                out.push(LocalAction::DemoteReplica {
                    volume: name.clone(),
                });
            }
        }
        if ended && view.quorate {
            out.push(LocalAction::Rejoin);
        } else if state.members.contains_key(&me) && view.quorate {
            out.push(LocalAction::Propose {
                command: Command::Join {
                    node: me,
                    incarnation: view.incarnation,
                },
            });
        }
        return out;
    }
    for (name, volume) in &state.volumes {
        let Some(replica) = view.replicas.get(name) else {
            continue;
        };
        if replica.epoch != volume.epoch {
            out.push(LocalAction::SetEpoch {
                volume: name.clone(),
                epoch: volume.epoch,
            });
        }
        if state.fence_executor(name) == Some(me)
            && !view.fencing.contains(name)
            && let Some(pending) = &volume.pending_fence
        {
            out.push(LocalAction::Fence {
                volume: name.clone(),
                victim: pending.victim,
                victim_incarnation: pending.victim_incarnation,
                reservation: view.shared.contains(name),
            });
        }
        let i_am_primary = volume.primary == Some(me);
        let switching_away = i_am_primary && volume.switchover_to.is_some_and(|t| t != me);
        if i_am_primary && !switching_away {
            if replica.role == ReplicaRole::Secondary {
                // Never take writes without quorum: a demoted-for-quorum-loss primary comes
                // back only when it hears the majority again.
                if view.quorate {
                    // This node's copy of the log may be stale (a partition just healed):
                    // the leader confirms before writes are taken.
                    out.push(LocalAction::Propose {
                        command: Command::ConfirmPrimary {
                            volume: name.clone(),
                            node: me,
                            expect: volume.epoch,
                        },
                    });
                    out.push(LocalAction::PromoteReplica {
                        volume: name.clone(),
                        epoch: volume.epoch,
                        // Only an operator's forced promotion of this epoch may start
                        // from a disk that is not UpToDate.
                        force: volume.forced_epoch == Some(volume.epoch),
                    });
                }
            } else if !view.quorate {
                if !replica.suspended {
                    out.push(LocalAction::Suspend {
                        volume: name.clone(),
                    });
                }
            } else {
                if replica.suspended {
                    // Quorum is back. This node's log may be stale (a partition just
                    // healed): only once the leader confirms that nobody replaced this
                    // primary may it acknowledge what it held.
                    out.push(LocalAction::Propose {
                        command: Command::ConfirmPrimary {
                            volume: name.clone(),
                            node: me,
                            expect: volume.epoch,
                        },
                    });
                    out.push(LocalAction::Resume {
                        volume: name.clone(),
                    });
                }
                if !replica.resources_running {
                    out.push(LocalAction::StartResources {
                        volume: name.clone(),
                    });
                }
                // The peer's resync is judged by this primary's own replica (its fresh
                // view of the link and the peer's disk), never by a heartbeat that may
                // predate the last outdating; the log checks `seen_outdate_seq`.
                for peer in volume.replicas.iter().filter(|p| **p != me) {
                    if volume.outdated.contains(peer)
                        && view.resynced.contains(name)
                        && replica.connected
                        && !replica.syncing
                        && replica.peer_disk == DiskState::UpToDate
                        && replica.epoch == volume.epoch
                    {
                        out.push(LocalAction::Propose {
                            command: Command::UpToDate {
                                volume: name.clone(),
                                node: *peer,
                                by: me,
                                expect: volume.epoch,
                                seen_outdate_seq: volume.outdate_seq,
                            },
                        });
                    }
                }
            }
        } else {
            if replica.resources_running {
                out.push(LocalAction::StopResources {
                    volume: name.clone(),
                });
            }
            if replica.role == ReplicaRole::Primary {
                out.push(LocalAction::DemoteReplica {
                    volume: name.clone(),
                });
            } else if switching_away && !replica.resources_running {
                out.push(LocalAction::Propose {
                    command: Command::Demote {
                        volume: name.clone(),
                        node: me,
                        expect: volume.epoch,
                    },
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::state::{FenceLogEntry, FenceMethod};

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);
    const W: NodeId = NodeId(3);
    const INC: Incarnation = Incarnation(1);

    fn state() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(&Command::Configure {
            members: vec![A, B, W],
            volumes: BTreeMap::from([("vol0".to_owned(), vec![A, B])]),
            log_id: crate::replication::types::ClusterLogId(7),
        });
        for n in [A, B, W] {
            s.apply(&Command::Join {
                node: n,
                incarnation: INC,
            });
        }
        s
    }

    fn report(disk: DiskState, role: ReplicaRole, epoch: Epoch) -> NodeReport {
        NodeReport {
            incarnation: INC,
            quorate: true,
            volumes: BTreeMap::from([(
                "vol0".to_owned(),
                ReplicaReport {
                    disk,
                    role,
                    connected: true,
                    epoch,
                    ..ReplicaReport::default()
                },
            )]),
        }
    }

    #[test]
    fn leader_promotes_an_up_to_date_replica_in_configuration_order() {
        let s = state();
        let e = s.volumes["vol0"].epoch;
        let reports = BTreeMap::from([
            (A, report(DiskState::UpToDate, ReplicaRole::Secondary, e)),
            (B, report(DiskState::UpToDate, ReplicaRole::Secondary, e)),
        ]);
        let alive = BTreeSet::from([A, B, W]);
        let view = LeaderView {
            now: Millis(0),
            state: &s,
            alive: &alive,
            dead: &BTreeSet::new(),
            reports: &reports,
        };
        assert_eq!(
            leader_decisions(view),
            vec![Command::Promote {
                volume: "vol0".into(),
                node: A,
                expect: e
            }]
        );
        // An Inconsistent or unreported replica is never chosen.
        let reports = BTreeMap::from([(
            A,
            report(DiskState::Inconsistent, ReplicaRole::Secondary, e),
        )]);
        let view = LeaderView {
            reports: &reports,
            ..view
        };
        assert!(leader_decisions(view).is_empty());
    }

    fn decide(
        s: &ClusterState,
        alive: &BTreeSet<NodeId>,
        dead: &BTreeSet<NodeId>,
        reports: &BTreeMap<NodeId, NodeReport>,
    ) -> Vec<Command> {
        leader_decisions(LeaderView {
            now: Millis(0),
            state: s,
            alive,
            dead,
            reports,
        })
    }

    #[test]
    fn dead_primary_is_marked_down_then_fenced_by_the_survivor_then_replaced() {
        let mut s = state();
        let e = s.volumes["vol0"].epoch;
        s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        let alive = BTreeSet::from([B, W]);
        let dead = BTreeSet::from([A]);
        let e1 = s.volumes["vol0"].epoch;
        let reports =
            BTreeMap::from([(B, report(DiskState::UpToDate, ReplicaRole::Secondary, e1))]);
        let decisions = decide(&s, &alive, &dead, &reports);
        assert_eq!(
            decisions,
            vec![Command::MarkDown {
                node: A,
                incarnation: INC
            }]
        );
        for d in &decisions {
            assert!(s.apply(d).is_applied());
        }
        // Nobody is promoted while the fencing is pending.
        assert!(decide(&s, &alive, &dead, &reports).is_empty());
        // B is the executor and fences.
        let replicas = report(DiskState::UpToDate, ReplicaRole::Secondary, e1).volumes;
        let (no_reports, none) = (BTreeMap::new(), BTreeSet::new());
        let local = LocalView {
            me: B,
            incarnation: INC,
            now: Millis(0),
            quorate: true,
            state: &s,
            replicas: &replicas,
            reports: &no_reports,
            shared: &none,
            fencing: &none,
            resynced: &none,
        };
        let actions = local_actions(local);
        assert!(
            actions.contains(&LocalAction::Fence {
                volume: "vol0".into(),
                victim: A,
                victim_incarnation: INC,
                reservation: false
            }),
            "{actions:?}"
        );
        let e2 = s.volumes["vol0"].epoch;
        assert!(
            actions.contains(&LocalAction::SetEpoch {
                volume: "vol0".into(),
                epoch: e2
            }),
            "{actions:?}"
        );
        s.apply(&Command::Fenced {
            entry: FenceLogEntry {
                volume: "vol0".into(),
                victim: A,
                victim_incarnation: INC,
                by: B,
                method: FenceMethod::Epoch,
                at: Millis(1),
                volume_epoch: e2,
            },
        });
        assert_eq!(
            decide(&s, &alive, &dead, &reports),
            vec![Command::Promote {
                volume: "vol0".into(),
                node: B,
                expect: e2
            }]
        );
    }

    #[test]
    fn primary_without_quorum_suspends_and_a_deposed_primary_demotes() {
        let mut s = state();
        let e = s.volumes["vol0"].epoch;
        s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        let e = s.volumes["vol0"].epoch;
        let mut mine = report(DiskState::UpToDate, ReplicaRole::Primary, e).volumes;
        mine.get_mut("vol0").unwrap().resources_running = true;
        let (no_reports, none) = (BTreeMap::new(), BTreeSet::new());
        let local_with = |s: &ClusterState, quorate, replicas| {
            local_actions(LocalView {
                me: A,
                incarnation: INC,
                now: Millis(0),
                quorate,
                state: s,
                replicas,
                reports: &no_reports,
                shared: &none,
                fencing: &none,
                resynced: &none,
            })
        };
        let local = |s: &ClusterState, quorate| local_with(s, quorate, &mine);
        assert_eq!(
            local(&s, false),
            vec![LocalAction::Suspend {
                volume: "vol0".into()
            }]
        );
        // Quorum returns and nobody replaced A: the leader must confirm A before it
        // acknowledges what it held (its log may be stale).
        let mut held = mine.clone();
        held.get_mut("vol0").unwrap().suspended = true;
        let back = local_with(&s, true, &held);
        assert_eq!(
            back[..2],
            [
                LocalAction::Propose {
                    command: Command::ConfirmPrimary {
                        volume: "vol0".into(),
                        node: A,
                        expect: e,
                    }
                },
                LocalAction::Resume {
                    volume: "vol0".into()
                }
            ]
        );
        // The majority replaced A meanwhile.
        s.apply(&Command::MarkDown {
            node: A,
            incarnation: INC,
        });
        let actions = local(&s, true);
        // A's old life was ended by the cluster: stop, demote, then start a new life.
        assert_eq!(
            actions,
            vec![
                LocalAction::StopResources {
                    volume: "vol0".into()
                },
                LocalAction::DemoteReplica {
                    volume: "vol0".into()
                },
                LocalAction::Rejoin,
            ]
        );
    }

    #[test]
    fn switchover_stops_demotes_then_proposes_demote() {
        let mut s = state();
        let e = s.volumes["vol0"].epoch;
        s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        s.apply(&Command::RequestSwitchover {
            volume: "vol0".into(),
            to: Some(B),
        });
        let e = s.volumes["vol0"].epoch;
        let mut mine = report(DiskState::UpToDate, ReplicaRole::Primary, e).volumes;
        mine.get_mut("vol0").unwrap().resources_running = true;
        let (no_reports, none) = (BTreeMap::new(), BTreeSet::new());
        let view = |replicas| LocalView {
            me: A,
            incarnation: INC,
            now: Millis(0),
            quorate: true,
            state: &s,
            replicas,
            reports: &no_reports,
            shared: &none,
            fencing: &none,
            resynced: &none,
        };
        assert_eq!(
            local_actions(view(&mine)),
            vec![
                LocalAction::StopResources {
                    volume: "vol0".into()
                },
                LocalAction::DemoteReplica {
                    volume: "vol0".into()
                }
            ]
        );
        let done = report(DiskState::UpToDate, ReplicaRole::Secondary, e).volumes;
        assert_eq!(
            local_actions(view(&done)),
            vec![LocalAction::Propose {
                command: Command::Demote {
                    volume: "vol0".into(),
                    node: A,
                    expect: e
                }
            }]
        );
    }

    #[test]
    fn primary_clears_outdated_peer_once_resynced() {
        let mut s = state();
        let e = s.volumes["vol0"].epoch;
        s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        let e = s.volumes["vol0"].epoch;
        s.apply(&Command::Outdate {
            volume: "vol0".into(),
            victim: B,
            by: A,
            expect: e,
        });
        let mut mine = report(DiskState::UpToDate, ReplicaRole::Primary, e).volumes;
        mine.get_mut("vol0").unwrap().resources_running = true;
        // A heartbeat from the peer saying "UpToDate" is not evidence: only this
        // primary's own view of the link and the peer's disk is.
        let reports = BTreeMap::from([(B, report(DiskState::UpToDate, ReplicaRole::Secondary, e))]);
        let none = BTreeSet::new();
        let no_evidence = LocalView {
            me: A,
            incarnation: INC,
            now: Millis(0),
            quorate: true,
            state: &s,
            replicas: &mine,
            reports: &reports,
            shared: &none,
            fencing: &none,
            resynced: &none,
        };
        assert!(local_actions(no_evidence).is_empty());
        mine.get_mut("vol0").unwrap().peer_disk = DiskState::UpToDate;
        let resynced = BTreeSet::from(["vol0".to_owned()]);
        let local = LocalView {
            me: A,
            incarnation: INC,
            now: Millis(0),
            quorate: true,
            state: &s,
            replicas: &mine,
            reports: &reports,
            shared: &none,
            fencing: &none,
            resynced: &resynced,
        };
        assert_eq!(
            local_actions(local),
            vec![LocalAction::Propose {
                command: Command::UpToDate {
                    volume: "vol0".into(),
                    node: B,
                    by: A,
                    expect: e,
                    seen_outdate_seq: s.volumes["vol0"].outdate_seq,
                }
            }]
        );
    }

    #[test]
    fn resync_evidence_counts_only_transitions_after_the_latest_outdating() {
        let mut s = state();
        let e = s.volumes["vol0"].epoch;
        s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        let mut replicas = report(DiskState::UpToDate, ReplicaRole::Primary, e).volumes;
        replicas.get_mut("vol0").unwrap().peer_uptodate_events = 3;
        let mut evidence = ResyncEvidence::default();
        assert!(
            evidence.observe(&s, &replicas).is_empty(),
            "history before the first look is no evidence"
        );
        let e = s.volumes["vol0"].epoch;
        s.apply(&Command::Outdate {
            volume: "vol0".into(),
            victim: B,
            by: A,
            expect: e,
        });
        // A snapshot still saying "in sync" after the outdating is not evidence...
        assert!(evidence.observe(&s, &replicas).is_empty());
        // ...a new transition is.
        replicas.get_mut("vol0").unwrap().peer_uptodate_events = 4;
        assert_eq!(
            evidence.observe(&s, &replicas),
            BTreeSet::from(["vol0".to_owned()])
        );
        // Outdated again: the old transition no longer counts.
        s.apply(&Command::Outdate {
            volume: "vol0".into(),
            victim: B,
            by: A,
            expect: e,
        });
        assert!(evidence.observe(&s, &replicas).is_empty());
        // The primary noted its outdating (count 4); the resync finished (5) before this
        // node's log showed the new outdating: still counted.
        evidence.note_outdating("vol0", 4);
        replicas.get_mut("vol0").unwrap().peer_uptodate_events = 5;
        s.apply(&Command::Outdate {
            volume: "vol0".into(),
            victim: B,
            by: A,
            expect: e,
        });
        assert_eq!(
            evidence.observe(&s, &replicas),
            BTreeSet::from(["vol0".to_owned()])
        );
    }
}
