//! The failure detector and quorum lease: heartbeats in, liveness and quorum out.
//!
//! Every node hears every other node's heartbeat. A peer silent for `failure_timeout_ms`
//! is dead; a node that has not heard a majority (itself included) within
//! `quorum_lease_ms` has lost quorum and must stop acknowledging writes. Because the lease
//! is shorter than the failure timeout, an isolated primary suspends before the majority
//! declares it dead and promotes someone else.
//!
//! Pure: time comes in as [`Millis`] from the caller.

use super::types::{Incarnation, Millis, NodeId};
use std::collections::{BTreeMap, BTreeSet};

/// What the detector knows about one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerLiveness {
    pub last_heard: Option<Millis>,
    pub incarnation: Incarnation,
}

/// Liveness of every configured peer, seen from one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detector {
    me: NodeId,
    voters: usize,
    started: Millis,
    failure_timeout_ms: u64,
    lease_ms: u64,
    peers: BTreeMap<NodeId, PeerLiveness>,
}

impl Detector {
    /// A detector for node `me` among `members` (all voters, `me` included).
    pub fn new(
        me: NodeId,
        members: &[NodeId],
        now: Millis,
        failure_timeout_ms: u64,
        lease_ms: u64,
    ) -> Self {
        Self {
            me,
            voters: members.len(),
            started: now,
            failure_timeout_ms,
            lease_ms,
            peers: members
                .iter()
                .filter(|m| **m != me)
                .map(|m| (*m, PeerLiveness::default()))
                .collect(),
        }
    }

    /// A heartbeat from `from` arrived. Unknown senders are ignored.
    pub fn heard(&mut self, from: NodeId, incarnation: Incarnation, now: Millis) {
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.last_heard = Some(peer.last_heard.map_or(now, |t| t.max(now)));
            peer.incarnation = incarnation;
        }
    }

    fn silent_for(&self, peer: &PeerLiveness, now: Millis) -> u64 {
        now.since(peer.last_heard.unwrap_or(self.started))
    }

    /// Peers heard within the failure timeout, and this node.
    pub fn alive(&self, now: Millis) -> BTreeSet<NodeId> {
        let mut alive: BTreeSet<NodeId> = self
            .peers
            .iter()
            .filter(|(_, p)| {
                p.last_heard.is_some() && self.silent_for(p, now) < self.failure_timeout_ms
            })
            .map(|(id, _)| *id)
            .collect();
        alive.insert(self.me);
        alive
    }

    /// Peers silent for at least the failure timeout (counting from start for peers never
    /// heard).
    pub fn dead(&self, now: Millis) -> BTreeSet<NodeId> {
        self.peers
            .iter()
            .filter(|(_, p)| self.silent_for(p, now) >= self.failure_timeout_ms)
            .map(|(id, _)| *id)
            .collect()
    }

    /// Whether this node heard a majority of voters (itself included) within the lease.
    pub fn quorate(&self, now: Millis) -> bool {
        let heard = self
            .peers
            .values()
            .filter(|p| p.last_heard.is_some_and(|t| now.since(t) < self.lease_ms))
            .count();
        (heard + 1) * 2 > self.voters
    }

    /// The incarnation `peer` last announced.
    pub fn incarnation(&self, peer: NodeId) -> Option<Incarnation> {
        self.peers.get(&peer).map(|p| p.incarnation)
    }

    /// Milliseconds since `peer` was last heard, if ever.
    pub fn silence_ms(&self, peer: NodeId, now: Millis) -> Option<u64> {
        self.peers
            .get(&peer)
            .and_then(|p| p.last_heard.map(|t| now.since(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);
    const W: NodeId = NodeId(3);

    #[test]
    fn silence_beyond_the_timeout_is_death_and_the_lease_expires_first() {
        let mut d = Detector::new(A, &[A, B, W], Millis(0), 1000, 600);
        assert!(!d.quorate(Millis(0)), "nobody heard yet");
        d.heard(B, Incarnation(1), Millis(100));
        d.heard(W, Incarnation(1), Millis(100));
        assert!(d.quorate(Millis(100)));
        assert_eq!(d.alive(Millis(500)), BTreeSet::from([A, B, W]));
        // Both fall silent: the lease runs out before anyone is declared dead.
        assert!(d.quorate(Millis(699)));
        assert!(!d.quorate(Millis(700)));
        assert!(d.dead(Millis(700)).is_empty());
        assert_eq!(d.dead(Millis(1100)), BTreeSet::from([B, W]));
        // One peer back is enough for a majority of three.
        d.heard(W, Incarnation(1), Millis(1200));
        assert!(d.quorate(Millis(1200)));
        assert_eq!(d.dead(Millis(1200)), BTreeSet::from([B]));
    }

    #[test]
    fn peers_never_heard_die_one_timeout_after_start_and_strangers_are_ignored() {
        let mut d = Detector::new(A, &[A, B, W], Millis(5000), 1000, 600);
        assert!(d.dead(Millis(5999)).is_empty());
        assert_eq!(d.dead(Millis(6000)), BTreeSet::from([B, W]));
        d.heard(NodeId(99), Incarnation(1), Millis(6000));
        assert_eq!(d.alive(Millis(6000)), BTreeSet::from([A]));
        // Reordered heartbeats never move time backwards.
        d.heard(B, Incarnation(2), Millis(7000));
        d.heard(B, Incarnation(2), Millis(6500));
        assert_eq!(d.silence_ms(B, Millis(7100)), Some(100));
        assert_eq!(d.incarnation(B), Some(Incarnation(2)));
    }

    #[test]
    fn a_single_node_cluster_is_quorate_alone() {
        let d = Detector::new(A, &[A], Millis(0), 1000, 600);
        assert!(d.quorate(Millis(0)));
    }
}
