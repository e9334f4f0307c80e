//! The replicated cluster state and the commands that change it.
//!
//! This is the state machine behind the cluster log: every node applies the same commands
//! in the same order and so holds the same [`ClusterState`]. Commands are *conditional*
//! (they name the volume epoch they expect, the incarnation they saw), so a decision made
//! on stale information is rejected at apply time instead of taking effect — that is what
//! makes "never two primaries" hold even when a proposer's view was out of date.

use super::types::{Epoch, Incarnation, Millis, NodeId};
use crate::replication::types::ClusterLogId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// How many fencing records the state keeps (older ones scroll off).
pub const FENCE_HISTORY: usize = 64;

/// A member's record in the cluster log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MemberRecord {
    pub up: bool,
    pub incarnation: Incarnation,
    /// Membership epoch at which `up` last changed.
    pub since: Epoch,
}

/// A volume's record in the cluster log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VolumeRecord {
    /// The data nodes holding replicas (from the configuration).
    pub replicas: Vec<NodeId>,
    /// Who may write. At most one, by construction.
    pub primary: Option<NodeId>,
    /// Bumped whenever the primary changes; replication peers refuse an older epoch.
    pub epoch: Epoch,
    /// Replicas that must resync before they may be promoted.
    pub outdated: BTreeSet<NodeId>,
    /// A lost primary that must be fenced before anyone is promoted.
    pub pending_fence: Option<PendingFence>,
    /// Operator-requested planned move.
    pub switchover_to: Option<NodeId>,
    /// Who was primary last (preferred on restart).
    pub last_primary: Option<NodeId>,
    /// The volume has had a primary (its replicas hold data someone wrote).
    #[serde(default)]
    pub initialized: bool,
    /// The epoch of the very first promotion, which forces a fresh (Inconsistent) replica
    /// to become the source of the initial full sync.
    #[serde(default)]
    pub forced_epoch: Option<Epoch>,
    /// Bumped every time a replica is marked Outdated: an `UpToDate` must name the value
    /// it saw, so a resync observed before a newer outdating cannot clear it.
    #[serde(default)]
    pub outdate_seq: u64,
}

/// A fencing the cluster is waiting for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingFence {
    pub victim: NodeId,
    pub victim_incarnation: Incarnation,
}

/// How a fencing was done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FenceMethod {
    /// Replicated volume: the epoch bump makes the victim's data Outdated and its writes
    /// refused by the peer.
    Epoch,
    /// Shared devices: the victim's reservation key was preempted (details in `detail`).
    Reservation { detail: String },
}

/// One fencing, as recorded in the cluster log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceLogEntry {
    pub volume: String,
    pub victim: NodeId,
    pub victim_incarnation: Incarnation,
    pub by: NodeId,
    pub method: FenceMethod,
    /// Wall-clock time of the proposer, for the log.
    pub at: Millis,
    pub volume_epoch: Epoch,
}

/// Everything the cluster agrees on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClusterState {
    /// This log's identity (replicas record it: a log created afresh is another log).
    #[serde(default)]
    pub log_id: ClusterLogId,
    /// Membership epoch: bumped on every change of who is up.
    pub epoch: Epoch,
    pub members: BTreeMap<NodeId, MemberRecord>,
    pub volumes: BTreeMap<String, VolumeRecord>,
    pub fencing: VecDeque<FenceLogEntry>,
    pub failovers: u64,
    pub switchovers: u64,
}

/// A change to the cluster state, proposed by some node and applied by all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Command {
    /// Sets up members and volumes from the configuration (first entry of a new cluster;
    /// later ones only add what is new).
    Configure {
        members: Vec<NodeId>,
        volumes: BTreeMap<String, Vec<NodeId>>,
        /// The log's identity, taken from its first configuration (entries written
        /// before logs had one carry none: the next one sets it).
        #[serde(default)]
        log_id: ClusterLogId,
    },
    /// A node starts a new life.
    Join {
        node: NodeId,
        incarnation: Incarnation,
    },
    /// A node leaves in an orderly way (it has demoted and stopped everything).
    Leave {
        node: NodeId,
        incarnation: Incarnation,
    },
    /// The leader declares a silent node dead.
    MarkDown {
        node: NodeId,
        incarnation: Incarnation,
    },
    /// A pending fencing was carried out.
    Fenced { entry: FenceLogEntry },
    /// Make `node` the primary of `volume`.
    Promote {
        volume: String,
        node: NodeId,
        expect: Epoch,
    },
    /// A brand-new volume's first primary: its replicas are all fresh (Inconsistent), so
    /// one is made the source of the initial full sync. Refused once the volume has had a
    /// primary.
    InitialPromote {
        volume: String,
        node: NodeId,
        expect: Epoch,
    },
    /// Confirms through the log, before a node (re)takes writes, that it is still the
    /// primary at `expect`: its own copy of the log may be stale after a partition.
    /// Changes nothing.
    ConfirmPrimary {
        volume: String,
        node: NodeId,
        expect: Epoch,
    },
    /// The primary stepped down (planned switchover or shutdown).
    Demote {
        volume: String,
        node: NodeId,
        expect: Epoch,
    },
    /// The primary continues without `victim`, whose data becomes Outdated.
    Outdate {
        volume: String,
        victim: NodeId,
        by: NodeId,
        expect: Epoch,
    },
    /// `node` finished resyncing from the primary `by`, after the outdating numbered
    /// `seen_outdate_seq`.
    UpToDate {
        volume: String,
        node: NodeId,
        by: NodeId,
        expect: Epoch,
        #[serde(default)]
        seen_outdate_seq: u64,
    },
    /// An operator asks to move `volume` to `to` (or to the other replica).
    RequestSwitchover { volume: String, to: Option<NodeId> },
}

/// What applying a command did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Outcome {
    #[default]
    Applied,
    /// The command no longer fits the state; nothing changed.
    Rejected { reason: String },
}

impl Outcome {
    pub fn is_applied(&self) -> bool {
        matches!(self, Outcome::Applied)
    }
}

fn reject(reason: impl Into<String>) -> Outcome {
    Outcome::Rejected {
        reason: reason.into(),
    }
}

impl ClusterState {
    /// Applies one command. Deterministic: the same commands in the same order give the
    /// same state on every node.
    pub fn apply(&mut self, command: &Command) -> Outcome {
        let outcome = match command {
            Command::Configure {
                members,
                volumes,
                log_id,
            } => self.configure(members, volumes, *log_id),
            Command::Join { node, incarnation } => self.join(*node, *incarnation),
            Command::Leave { node, incarnation } => self.mark_down(*node, *incarnation, true),
            Command::MarkDown { node, incarnation } => self.mark_down(*node, *incarnation, false),
            Command::Fenced { entry } => self.fenced(entry),
            Command::Promote {
                volume,
                node,
                expect,
            } => self.promote(volume, *node, *expect),
            Command::InitialPromote {
                volume,
                node,
                expect,
            } => self.initial_promote(volume, *node, *expect),
            Command::ConfirmPrimary {
                volume,
                node,
                expect,
            } => match self.volumes.get(volume) {
                Some(v) if v.primary == Some(*node) && v.epoch == *expect && self.is_up(*node) => {
                    Outcome::Applied
                }
                _ => reject(format!(
                    "node {node} is not primary of {volume} at epoch {expect}"
                )),
            },
            Command::Demote {
                volume,
                node,
                expect,
            } => self.demote(volume, *node, *expect),
            Command::Outdate {
                volume,
                victim,
                by,
                expect,
            } => self.outdate(volume, *victim, *by, *expect),
            Command::UpToDate {
                volume,
                node,
                by,
                expect,
                seen_outdate_seq,
            } => self.up_to_date(volume, *node, *by, *expect, *seen_outdate_seq),
            Command::RequestSwitchover { volume, to } => self.request_switchover(volume, *to),
        };
        debug_assert!(
            self.check_invariants().is_ok(),
            "{:?}",
            self.check_invariants()
        );
        outcome
    }

    fn configure(
        &mut self,
        members: &[NodeId],
        volumes: &BTreeMap<String, Vec<NodeId>>,
        log_id: ClusterLogId,
    ) -> Outcome {
        for node in members {
            self.members.entry(*node).or_default();
        }
        for (name, replicas) in volumes {
            if replicas.iter().any(|r| !self.members.contains_key(r)) {
                return reject(format!("volume {name} names a node that is not a member"));
            }
        }
        for (name, replicas) in volumes {
            let record = self.volumes.entry(name.clone()).or_default();
            if record.replicas.is_empty() {
                record.replicas = replicas.clone();
            }
        }
        if self.log_id == ClusterLogId::NONE {
            self.log_id = log_id;
        }
        Outcome::Applied
    }

    fn join(&mut self, node: NodeId, incarnation: Incarnation) -> Outcome {
        let Some(member) = self.members.get(&node).cloned() else {
            return reject(format!("node {node} is not a member"));
        };
        if incarnation == member.incarnation && member.up {
            // Idempotent: a node repeating its join before it saw it applied.
            return Outcome::Applied;
        }
        if incarnation <= member.incarnation {
            return reject(format!(
                "incarnation {incarnation} of node {node} is not newer than {}",
                member.incarnation
            ));
        }
        if member.up {
            // It restarted faster than the failure detector noticed: its previous life is
            // over, with the same consequences as a failure.
            self.mark_down(node, member.incarnation, false);
        }
        self.epoch = self.epoch.next();
        self.members.insert(
            node,
            MemberRecord {
                up: true,
                incarnation,
                since: self.epoch,
            },
        );
        Outcome::Applied
    }

    fn mark_down(&mut self, node: NodeId, incarnation: Incarnation, orderly: bool) -> Outcome {
        let Some(member) = self.members.get_mut(&node) else {
            return reject(format!("node {node} is not a member"));
        };
        if !member.up || member.incarnation != incarnation {
            return reject(format!("node {node} incarnation {incarnation} is not up"));
        }
        member.up = false;
        self.epoch = self.epoch.next();
        member.since = self.epoch;
        for volume in self.volumes.values_mut() {
            if volume.primary == Some(node) {
                volume.primary = None;
                volume.epoch = volume.epoch.next();
                if !orderly {
                    volume.pending_fence = Some(PendingFence {
                        victim: node,
                        victim_incarnation: incarnation,
                    });
                    self.failovers += 1;
                }
            }
            if volume.switchover_to == Some(node) {
                volume.switchover_to = None;
            }
        }
        Outcome::Applied
    }

    fn fenced(&mut self, entry: &FenceLogEntry) -> Outcome {
        let Some(volume) = self.volumes.get_mut(&entry.volume) else {
            return reject(format!("unknown volume {}", entry.volume));
        };
        match &volume.pending_fence {
            Some(p)
                if p.victim == entry.victim && p.victim_incarnation == entry.victim_incarnation =>
            {
                volume.pending_fence = None;
                // The victim's data is not marked Outdated here: if no survivor is UpToDate,
                // the victim holds the newest data and must be waited for. Promoting a
                // survivor marks it Outdated (it misses what the survivor writes).
                self.fencing.push_back(entry.clone());
                while self.fencing.len() > FENCE_HISTORY {
                    self.fencing.pop_front();
                }
                Outcome::Applied
            }
            _ => reject(format!(
                "no pending fencing of node {} on {}",
                entry.victim, entry.volume
            )),
        }
    }

    fn promote(&mut self, name: &str, node: NodeId, expect: Epoch) -> Outcome {
        let node_up = self.members.get(&node).is_some_and(|m| m.up);
        let Some(volume) = self.volumes.get_mut(name) else {
            return reject(format!("unknown volume {name}"));
        };
        if volume.epoch != expect {
            return reject(format!(
                "volume {name} is at epoch {}, not {expect}",
                volume.epoch
            ));
        }
        if let Some(primary) = volume.primary {
            return reject(format!("volume {name} already has primary {primary}"));
        }
        if let Some(p) = &volume.pending_fence {
            return reject(format!("node {} must be fenced first", p.victim));
        }
        if !volume.replicas.contains(&node) {
            return reject(format!("node {node} holds no replica of {name}"));
        }
        if !node_up {
            return reject(format!("node {node} is not up"));
        }
        if volume.outdated.contains(&node) {
            return reject(format!("node {node} has Outdated data for {name}"));
        }
        volume.primary = Some(node);
        volume.epoch = volume.epoch.next();
        volume.last_primary = Some(node);
        volume.initialized = true;
        if volume.switchover_to.take().is_some() {
            self.switchovers += 1;
        }
        // Replicas that are down will miss what the new primary writes.
        for replica in volume.replicas.clone() {
            if replica != node && !self.members.get(&replica).is_some_and(|m| m.up) {
                volume.outdated.insert(replica);
                volume.outdate_seq += 1;
            }
        }
        Outcome::Applied
    }

    fn initial_promote(&mut self, name: &str, node: NodeId, expect: Epoch) -> Outcome {
        if self.volumes.get(name).is_some_and(|v| v.initialized) {
            return reject(format!(
                "volume {name} has had a primary: no initial promotion"
            ));
        }
        let outcome = self.promote(name, node, expect);
        if outcome.is_applied()
            && let Some(volume) = self.volumes.get_mut(name)
        {
            volume.forced_epoch = Some(volume.epoch);
        }
        outcome
    }

    fn demote(&mut self, name: &str, node: NodeId, expect: Epoch) -> Outcome {
        let Some(volume) = self.volumes.get_mut(name) else {
            return reject(format!("unknown volume {name}"));
        };
        if volume.epoch != expect || volume.primary != Some(node) {
            return reject(format!(
                "node {node} is not primary of {name} at epoch {expect}"
            ));
        }
        volume.primary = None;
        volume.epoch = volume.epoch.next();
        Outcome::Applied
    }

    fn outdate(&mut self, name: &str, victim: NodeId, by: NodeId, expect: Epoch) -> Outcome {
        let by_up = self.members.get(&by).is_some_and(|m| m.up);
        let Some(volume) = self.volumes.get_mut(name) else {
            return reject(format!("unknown volume {name}"));
        };
        if volume.epoch != expect || volume.primary != Some(by) || !by_up {
            return reject(format!(
                "node {by} is no longer primary of {name} at epoch {expect}: it must stop writing"
            ));
        }
        if !volume.replicas.contains(&victim) || victim == by {
            return reject(format!("node {victim} is not a peer replica of {name}"));
        }
        volume.outdated.insert(victim);
        volume.outdate_seq += 1;
        Outcome::Applied
    }

    fn up_to_date(
        &mut self,
        name: &str,
        node: NodeId,
        by: NodeId,
        expect: Epoch,
        seen_outdate_seq: u64,
    ) -> Outcome {
        let Some(volume) = self.volumes.get_mut(name) else {
            return reject(format!("unknown volume {name}"));
        };
        if volume.epoch != expect || volume.primary != Some(by) {
            return reject(format!(
                "node {by} is not primary of {name} at epoch {expect}"
            ));
        }
        if !volume.replicas.contains(&node) {
            return reject(format!("node {node} holds no replica of {name}"));
        }
        if volume.outdate_seq != seen_outdate_seq {
            return reject(format!(
                "a replica of {name} was outdated again (#{}) after the resync seen at #{seen_outdate_seq}",
                volume.outdate_seq
            ));
        }
        volume.outdated.remove(&node);
        Outcome::Applied
    }

    fn request_switchover(&mut self, name: &str, to: Option<NodeId>) -> Outcome {
        let members = &self.members;
        let Some(volume) = self.volumes.get_mut(name) else {
            return reject(format!("unknown volume {name}"));
        };
        let Some(primary) = volume.primary else {
            return reject(format!("volume {name} has no primary to switch over from"));
        };
        let target = match to {
            Some(t) => t,
            None => match volume.replicas.iter().find(|r| **r != primary) {
                Some(t) => *t,
                None => return reject(format!("volume {name} has no other replica")),
            },
        };
        if target == primary {
            return reject(format!("node {target} is already primary of {name}"));
        }
        if !volume.replicas.contains(&target) {
            return reject(format!("node {target} holds no replica of {name}"));
        }
        if !members.get(&target).is_some_and(|m| m.up) {
            return reject(format!("node {target} is not up"));
        }
        if volume.outdated.contains(&target) {
            return reject(format!(
                "node {target} is not UpToDate (Outdated): it must finish resyncing first"
            ));
        }
        volume.switchover_to = Some(target);
        Outcome::Applied
    }

    /// The invariants every state must satisfy.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (name, volume) in &self.volumes {
            if let Some(primary) = volume.primary {
                if !volume.replicas.contains(&primary) {
                    return Err(format!("{name}: primary {primary} holds no replica"));
                }
                if volume.outdated.contains(&primary) {
                    return Err(format!("{name}: primary {primary} is outdated"));
                }
                if volume.pending_fence.is_some() {
                    return Err(format!("{name}: primary while a fencing is pending"));
                }
            }
            if volume.outdated.len() >= volume.replicas.len() && !volume.replicas.is_empty() {
                return Err(format!("{name}: every replica is outdated"));
            }
        }
        Ok(())
    }

    /// Whether `node` is up in the current membership.
    pub fn is_up(&self, node: NodeId) -> bool {
        self.members.get(&node).is_some_and(|m| m.up)
    }

    /// The node that carries out a pending fencing of `volume`: the lowest-numbered replica
    /// that is up and is not the victim's lost life (a victim that came back with a new
    /// incarnation may fence its own previous life). A pure function of the state, so
    /// every node agrees on it without a message.
    pub fn fence_executor(&self, volume: &str) -> Option<NodeId> {
        let record = self.volumes.get(volume)?;
        let pending = record.pending_fence.as_ref()?;
        record
            .replicas
            .iter()
            .copied()
            .filter(|r| {
                self.members.get(r).is_some_and(|m| {
                    m.up && !(*r == pending.victim && m.incarnation == pending.victim_incarnation)
                })
            })
            .min()
    }

    /// Nodes that are up.
    pub fn up_nodes(&self) -> BTreeSet<NodeId> {
        self.members
            .iter()
            .filter(|(_, m)| m.up)
            .map(|(id, _)| *id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);
    const W: NodeId = NodeId(3);

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        let volumes = BTreeMap::from([("vol0".to_owned(), vec![A, B])]);
        assert!(
            s.apply(&Command::Configure {
                members: vec![A, B, W],
                volumes,
                log_id: ClusterLogId(7),
            })
            .is_applied()
        );
        for n in [A, B, W] {
            assert!(
                s.apply(&Command::Join {
                    node: n,
                    incarnation: Incarnation(1)
                })
                .is_applied()
            );
        }
        s
    }

    fn epoch(s: &ClusterState) -> Epoch {
        s.volumes["vol0"].epoch
    }

    #[test]
    fn failover_needs_fencing_before_promotion() {
        let mut s = cluster();
        let e = epoch(&s);
        assert!(
            s.apply(&Command::Promote {
                volume: "vol0".into(),
                node: A,
                expect: e
            })
            .is_applied()
        );
        let e = epoch(&s);
        // A stale promote (old epoch) is rejected.
        let stale = s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: B,
            expect: Epoch(0),
        });
        assert!(!stale.is_applied());
        // A dies.
        assert!(
            s.apply(&Command::MarkDown {
                node: A,
                incarnation: Incarnation(1)
            })
            .is_applied()
        );
        let vol = &s.volumes["vol0"];
        assert_eq!(vol.primary, None);
        assert!(vol.epoch > e);
        assert_eq!(vol.pending_fence.as_ref().map(|p| p.victim), Some(A));
        let e = epoch(&s);
        let early = s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: B,
            expect: e,
        });
        assert!(
            matches!(early, Outcome::Rejected { ref reason } if reason.contains("fenced first")),
            "{early:?}"
        );
        let entry = FenceLogEntry {
            volume: "vol0".into(),
            victim: A,
            victim_incarnation: Incarnation(1),
            by: B,
            method: FenceMethod::Epoch,
            at: Millis(5),
            volume_epoch: e,
        };
        assert!(
            s.apply(&Command::Fenced {
                entry: entry.clone()
            })
            .is_applied()
        );
        assert!(
            !s.apply(&Command::Fenced { entry }).is_applied(),
            "fencing twice"
        );
        assert!(
            s.apply(&Command::Promote {
                volume: "vol0".into(),
                node: B,
                expect: e
            })
            .is_applied()
        );
        let vol = &s.volumes["vol0"];
        assert_eq!(vol.primary, Some(B));
        assert!(vol.outdated.contains(&A), "the fenced node must resync");
        assert_eq!(s.failovers, 1);
        assert_eq!(s.fencing.len(), 1);
    }

    /// The log's identity comes from its first configuration and never changes: every
    /// node proposes one, only the first applied counts.
    #[test]
    fn the_log_keeps_the_identity_of_its_first_configuration() {
        let s = cluster();
        assert_eq!(s.log_id, ClusterLogId(7));
        let mut again = s.clone();
        assert!(
            again
                .apply(&Command::Configure {
                    members: vec![A, B, W],
                    volumes: BTreeMap::new(),
                    log_id: ClusterLogId(99),
                })
                .is_applied()
        );
        assert_eq!(again.log_id, ClusterLogId(7));
    }

    #[test]
    fn an_outdated_node_is_never_promoted_until_it_resyncs() {
        let mut s = cluster();
        let e = epoch(&s);
        s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        let e = epoch(&s);
        assert!(
            s.apply(&Command::Outdate {
                volume: "vol0".into(),
                victim: B,
                by: A,
                expect: e
            })
            .is_applied()
        );
        s.apply(&Command::Demote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        let e = epoch(&s);
        let r = s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: B,
            expect: e,
        });
        assert!(
            matches!(r, Outcome::Rejected { ref reason } if reason.contains("Outdated")),
            "{r:?}"
        );
        s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        let e = epoch(&s);
        assert!(
            !s.apply(&Command::UpToDate {
                volume: "vol0".into(),
                node: B,
                by: A,
                expect: e,
                seen_outdate_seq: 0,
            })
            .is_applied(),
            "a resync seen before the last outdating must not clear it"
        );
        let seq = s.volumes["vol0"].outdate_seq;
        assert!(
            s.apply(&Command::UpToDate {
                volume: "vol0".into(),
                node: B,
                by: A,
                expect: e,
                seen_outdate_seq: seq,
            })
            .is_applied()
        );
        assert!(s.volumes["vol0"].outdated.is_empty());
    }

    #[test]
    fn a_deposed_primary_cannot_outdate_its_peer() {
        let mut s = cluster();
        let e = epoch(&s);
        s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        let old = epoch(&s);
        s.apply(&Command::MarkDown {
            node: A,
            incarnation: Incarnation(1),
        });
        // A, partitioned, still believes it is primary at `old` and asks to outdate B.
        let r = s.apply(&Command::Outdate {
            volume: "vol0".into(),
            victim: B,
            by: A,
            expect: old,
        });
        assert!(
            matches!(r, Outcome::Rejected { ref reason } if reason.contains("stop writing")),
            "{r:?}"
        );
        assert!(!s.volumes["vol0"].outdated.contains(&B));
    }

    #[test]
    fn a_fast_restart_counts_as_a_failure_of_the_old_life() {
        let mut s = cluster();
        let e = epoch(&s);
        s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        assert!(
            s.apply(&Command::Join {
                node: A,
                incarnation: Incarnation(2)
            })
            .is_applied()
        );
        let vol = &s.volumes["vol0"];
        assert_eq!(vol.primary, None);
        assert_eq!(
            vol.pending_fence.as_ref().map(|p| p.victim_incarnation),
            Some(Incarnation(1))
        );
        let epoch = s.epoch;
        assert!(
            s.apply(&Command::Join {
                node: A,
                incarnation: Incarnation(2)
            })
            .is_applied(),
            "a repeated join is idempotent"
        );
        assert_eq!(s.epoch, epoch, "a repeated join changes nothing");
        assert!(
            !s.apply(&Command::Join {
                node: A,
                incarnation: Incarnation(1)
            })
            .is_applied(),
            "an older life is refused"
        );
    }

    #[test]
    fn switchover_requests_are_checked() {
        let mut s = cluster();
        let r = s.apply(&Command::RequestSwitchover {
            volume: "vol0".into(),
            to: None,
        });
        assert!(!r.is_applied(), "no primary yet");
        let e = epoch(&s);
        s.apply(&Command::Promote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        let e = epoch(&s);
        s.apply(&Command::Outdate {
            volume: "vol0".into(),
            victim: B,
            by: A,
            expect: e,
        });
        let r = s.apply(&Command::RequestSwitchover {
            volume: "vol0".into(),
            to: Some(B),
        });
        assert!(
            matches!(r, Outcome::Rejected { ref reason } if reason.contains("not UpToDate")),
            "{r:?}"
        );
        let r = s.apply(&Command::RequestSwitchover {
            volume: "nope".into(),
            to: None,
        });
        assert!(matches!(r, Outcome::Rejected { ref reason } if reason.contains("unknown volume")));
        s.apply(&Command::UpToDate {
            volume: "vol0".into(),
            node: B,
            by: A,
            expect: e,
            seen_outdate_seq: s.volumes["vol0"].outdate_seq,
        });
        assert!(
            s.apply(&Command::RequestSwitchover {
                volume: "vol0".into(),
                to: None
            })
            .is_applied()
        );
        assert_eq!(s.volumes["vol0"].switchover_to, Some(B));
    }

    #[test]
    fn only_a_fresh_volume_gets_an_initial_promotion() {
        let mut s = cluster();
        let e = epoch(&s);
        assert!(
            s.apply(&Command::InitialPromote {
                volume: "vol0".into(),
                node: B,
                expect: e
            })
            .is_applied()
        );
        let vol = &s.volumes["vol0"];
        assert_eq!(vol.primary, Some(B));
        assert_eq!(vol.forced_epoch, Some(vol.epoch));
        let e = epoch(&s);
        s.apply(&Command::Demote {
            volume: "vol0".into(),
            node: B,
            expect: e,
        });
        let e = epoch(&s);
        let again = s.apply(&Command::InitialPromote {
            volume: "vol0".into(),
            node: A,
            expect: e,
        });
        assert!(
            matches!(again, Outcome::Rejected { ref reason } if reason.contains("has had a primary")),
            "{again:?}"
        );
    }
}
