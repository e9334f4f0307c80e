//! The failure detector and quorum lease: heartbeats in, liveness and quorum out.
//!
//! Every node hears every other node's heartbeat. A peer silent for `failure_timeout_ms`
//! is dead. The quorum lease follows raft's leader-lease rule: it is anchored on when
//! *this node sent* a heartbeat that a majority (itself included) has since echoed back,
//! never on when heartbeats arrived — after a pause (SIGSTOP, a VM freeze) the buffered
//! heartbeats of the peers arrive "now" but echo only this node's old heartbeats, so the
//! lease stays expired until a fresh round trip. A node whose lease ran out has lost
//! quorum. The lease to *serve* I/O counts only echoes that endorse this node's life
//! (the echoing peer's log holds it up): a life the cluster ended gets none, however
//! well it hears its peers. Because the lease is shorter than the failure timeout,
//! and a peer hears a heartbeat no earlier than it was sent, an isolated primary's lease
//! ends before the majority declares it dead and promotes someone else.
//!
//! Pure: time comes in as [`Millis`] from the caller.

use super::peers::Echoed;
use super::types::{Incarnation, Millis, NodeId};
use std::collections::{BTreeMap, BTreeSet};

/// A peer's echo of this node's heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Echo {
    /// The echoed heartbeat's send time (this node's clock).
    pub sent_at: Millis,
    /// The peer's log holds this node's current life up.
    pub endorsed: bool,
}

impl Echo {
    /// An echo that endorses (tests).
    pub fn endorsing(sent_at: Millis) -> Self {
        Self {
            sent_at,
            endorsed: true,
        }
    }
}

/// What the detector knows about one peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerLiveness {
    pub last_heard: Option<Millis>,
    pub incarnation: Incarnation,
    /// The peer's `sent_at` of its latest heartbeat (its clock), echoed back to it.
    pub last_sent: Option<Millis>,
    /// The send time (this node's clock) of the latest own heartbeat the peer echoed.
    pub echoed: Option<Millis>,
    /// The same, for echoes that endorsed this node's life.
    pub endorsed: Option<Millis>,
    /// The newest life of this peer that this node endorsed, and when (this node's
    /// clock) it heard that life's latest heartbeat it endorsed.
    pub endorsed_life: Option<(Incarnation, Millis)>,
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

    /// A heartbeat from `from` arrived at `now`: sent at `sent_at` on the sender's clock,
    /// echoing `echo`, the send time of this node's latest heartbeat it had heard.
    /// Unknown senders are ignored; an echo from this node's future (a confused or hostile
    /// peer) anchors nothing.
    pub fn heard(
        &mut self,
        from: NodeId,
        incarnation: Incarnation,
        now: Millis,
        sent_at: Millis,
        echo: Option<Echo>,
    ) {
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.last_heard = Some(peer.last_heard.map_or(now, |t| t.max(now)));
            // A new life's clock starts again: its send times replace the old life's.
            peer.last_sent = match peer.last_sent {
                Some(t) if peer.incarnation == incarnation => Some(t.max(sent_at)),
                _ => Some(sent_at),
            };
            peer.incarnation = incarnation;
            if let Some(echo) = echo.filter(|e| e.sent_at <= now) {
                let at = echo.sent_at;
                peer.echoed = Some(peer.echoed.map_or(at, |t| t.max(at)));
                if echo.endorsed {
                    peer.endorsed = Some(peer.endorsed.map_or(at, |t| t.max(at)));
                }
            }
        }
    }

    /// This node's next heartbeat endorses `peer`'s current life.
    pub fn endorse(&mut self, peer: NodeId) {
        if let Some(p) = self.peers.get_mut(&peer)
            && let Some(heard) = p.last_heard
        {
            p.endorsed_life = Some((p.incarnation, heard));
        }
    }

    /// The newest life of `peer` this node endorsed, and when it heard it last.
    pub fn endorsed_life(&self, peer: NodeId) -> Option<(Incarnation, Millis)> {
        self.peers.get(&peer).and_then(|p| p.endorsed_life)
    }

    /// What this node's next heartbeat echoes: each peer's life and latest `sent_at`.
    pub fn echoes(&self) -> BTreeMap<NodeId, Echoed> {
        self.peers
            .iter()
            .filter_map(|(id, p)| {
                p.last_sent.map(|sent_at| {
                    (
                        *id,
                        Echoed {
                            life: p.incarnation,
                            sent_at,
                        },
                    )
                })
            })
            .collect()
    }

    /// Until when (this node's clock) it holds the quorum lease: one lease after the
    /// latest own heartbeat that a majority, itself included, has echoed. `Millis(0)`
    /// if no majority ever echoed; unbounded for a cluster of one.
    pub fn lease_until(&self) -> Millis {
        self.until(|p| p.echoed)
    }

    /// Until when this node may serve I/O: like [`Self::lease_until`], counting only
    /// echoes that endorsed its life.
    pub fn serve_until(&self) -> Millis {
        self.until(|p| p.endorsed)
    }

    fn until(&self, anchor: impl Fn(&PeerLiveness) -> Option<Millis>) -> Millis {
        let needed = self.voters / 2;
        if needed == 0 {
            return Millis(u64::MAX);
        }
        let mut anchors: Vec<Millis> = self.peers.values().filter_map(anchor).collect();
        anchors.sort_unstable_by(|a, b| b.cmp(a));
        anchors
            .get(needed - 1)
            .map_or(Millis(0), |anchor| anchor.plus(self.lease_ms))
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

    /// Whether this node holds the quorum lease at `now` (see [`Self::lease_until`]).
    pub fn quorate(&self, now: Millis) -> bool {
        now < self.lease_until()
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
    const INC: Incarnation = Incarnation(1);

    /// `peer` (life 1) heard at `now`, sent at `sent`, endorsing the echo of A's
    /// heartbeat sent at `echo`.
    fn heard(d: &mut Detector, peer: NodeId, now: u64, sent: u64, echo: u64) {
        d.heard(
            peer,
            INC,
            Millis(now),
            Millis(sent),
            Some(Echo::endorsing(Millis(echo))),
        );
    }

    #[test]
    fn silence_beyond_the_timeout_is_death_and_the_lease_expires_first() {
        let mut d = Detector::new(A, &[A, B, W], Millis(0), 1000, 600);
        assert!(!d.quorate(Millis(0)), "nobody heard yet");
        // B and W echo A's heartbeat sent at 90.
        heard(&mut d, B, 100, 95, 90);
        heard(&mut d, W, 100, 97, 90);
        assert!(d.quorate(Millis(100)));
        assert_eq!(d.lease_until(), Millis(690));
        assert_eq!(d.alive(Millis(500)), BTreeSet::from([A, B, W]));
        // Both fall silent: the lease runs out before anyone is declared dead.
        assert!(d.quorate(Millis(689)));
        assert!(!d.quorate(Millis(690)));
        assert!(d.dead(Millis(700)).is_empty());
        assert_eq!(d.dead(Millis(1100)), BTreeSet::from([B, W]));
        // One peer back is enough for a majority of three.
        heard(&mut d, W, 1200, 1190, 1150);
        assert!(d.quorate(Millis(1200)));
        assert_eq!(d.dead(Millis(1200)), BTreeSet::from([B]));
        // What the next heartbeat echoes: each peer's latest send time.
        let sent = |at| Echoed {
            life: INC,
            sent_at: Millis(at),
        };
        assert_eq!(d.echoes(), BTreeMap::from([(B, sent(95)), (W, sent(1190))]));
    }

    #[test]
    fn after_a_pause_heartbeats_that_waited_in_the_buffer_do_not_renew_the_lease() {
        let mut d = Detector::new(A, &[A, B, W], Millis(0), 1000, 600);
        heard(&mut d, B, 100, 100, 100);
        heard(&mut d, W, 100, 100, 100);
        assert!(d.quorate(Millis(100)));
        // A is stopped from 100 to 3000; the peers kept sending, echoing A's last
        // heartbeat (sent at 100). Delivered at 3000, they arrive "now"...
        for t in [200, 1000, 2900] {
            d.heard(
                B,
                INC,
                Millis(3000),
                Millis(t),
                Some(Echo::endorsing(Millis(100))),
            );
            d.heard(
                W,
                INC,
                Millis(3000),
                Millis(t),
                Some(Echo::endorsing(Millis(100))),
            );
        }
        // ...and prove the peers alive, but not that they still follow A.
        assert_eq!(d.alive(Millis(3000)), BTreeSet::from([A, B, W]));
        assert!(!d.quorate(Millis(3000)));
        // An echo claiming a send time in A's future anchors nothing.
        heard(&mut d, B, 3000, 2950, 9000);
        assert!(!d.quorate(Millis(3000)));
        // A fresh round trip renews it.
        heard(&mut d, W, 3100, 3060, 3050);
        assert!(d.quorate(Millis(3100)));
    }

    #[test]
    fn a_life_the_peers_ended_keeps_quorum_but_gets_no_lease_to_serve() {
        let mut d = Detector::new(A, &[A, B, W], Millis(0), 1000, 600);
        heard(&mut d, B, 100, 100, 100);
        assert_eq!(
            (d.lease_until(), d.serve_until()),
            (Millis(700), Millis(700))
        );
        // The peers marked this life down: they still echo, without endorsing.
        let ended = |sent_at| {
            Some(Echo {
                sent_at: Millis(sent_at),
                endorsed: false,
            })
        };
        d.heard(B, INC, Millis(2000), Millis(2000), ended(1990));
        d.heard(W, INC, Millis(2000), Millis(2000), ended(1990));
        assert!(d.quorate(Millis(2000)));
        assert_eq!(d.serve_until(), Millis(700));
    }

    #[test]
    fn peers_never_heard_die_one_timeout_after_start_and_strangers_are_ignored() {
        let mut d = Detector::new(A, &[A, B, W], Millis(5000), 1000, 600);
        assert!(d.dead(Millis(5999)).is_empty());
        assert_eq!(d.dead(Millis(6000)), BTreeSet::from([B, W]));
        d.heard(
            NodeId(99),
            INC,
            Millis(6000),
            Millis(6000),
            Some(Echo::endorsing(Millis(6000))),
        );
        assert_eq!(d.alive(Millis(6000)), BTreeSet::from([A]));
        // Reordered heartbeats never move time backwards.
        d.heard(B, Incarnation(2), Millis(7000), Millis(7000), None);
        d.heard(B, Incarnation(2), Millis(6500), Millis(6500), None);
        assert_eq!(d.silence_ms(B, Millis(7100)), Some(100));
        assert_eq!(d.incarnation(B), Some(Incarnation(2)));
        assert_eq!(d.echoes()[&B].sent_at, Millis(7000));
        // A new life of B: its clock starts again, and so do the send times echoed.
        d.heard(B, Incarnation(3), Millis(7200), Millis(40), None);
        assert_eq!(
            d.echoes()[&B],
            Echoed {
                life: Incarnation(3),
                sent_at: Millis(40)
            }
        );
    }

    #[test]
    fn a_single_node_cluster_is_quorate_alone() {
        let d = Detector::new(A, &[A], Millis(0), 1000, 600);
        assert!(d.quorate(Millis(0)));
    }

    #[test]
    fn four_voters_need_two_peers() {
        let mut d = Detector::new(A, &[A, B, W, NodeId(4)], Millis(0), 1000, 600);
        heard(&mut d, B, 100, 100, 100);
        assert!(!d.quorate(Millis(100)));
        heard(&mut d, W, 100, 100, 50);
        assert_eq!(d.lease_until(), Millis(650));
    }
}
