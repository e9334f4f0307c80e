//! Picking the sync direction at connect time from generation ids (DRBD's uuid compare).
//!
//! Both nodes run [`decide`] with the arguments swapped and must reach mirror-image
//! answers (one `Source`, the other `Target`), which a property test checks.

use super::types::{Epoch, GenerationIds, NodeId, Role, SplitBrainPolicy};

/// What one side knows about a node at handshake time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideInfo {
    pub node_id: NodeId,
    pub generations: GenerationIds,
    pub role: Role,
    pub epoch: Epoch,
    pub dirty_bits: u64,
    pub primary_since_ms: u64,
    pub primary_crashed: bool,
    /// Its disk's cache may have been lost since it was last in sync (its process did
    /// not stop cleanly): received writes it had not flushed may be gone.
    pub cache_lost: bool,
    pub discard_my_data: bool,
    pub diskless: bool,
    /// The disk holds a partial resync (or was never synced): it can only be a target.
    pub inconsistent: bool,
    /// The cluster recorded the disk as outdated (a deposed primary, a secondary left
    /// behind): never the source for a disk that is not.
    pub outdated: bool,
}

/// The outcome for "me".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Both hold the same data (or there is nothing to compare).
    NoSync,
    /// I send; `full` = every block, else the merged bitmaps.
    Source { full: bool },
    /// I receive.
    Target { full: bool },
    /// Both changed the data independently and no policy picked a victim.
    SplitBrain,
    /// The data sets share no history: refuse.
    Unrelated,
}

impl Decision {
    /// The mirror image (what the peer decides).
    pub fn mirror(self) -> Self {
        match self {
            Decision::Source { full } => Decision::Target { full },
            Decision::Target { full } => Decision::Source { full },
            other => other,
        }
    }
}

/// The raw comparison, before split-brain resolution.
///
/// `crashed_primary_is_target`: with protocol C the surviving peer holds every
/// acknowledged write while a crashed primary may have lost unflushed ones from its disk
/// cache, so the crashed primary's hot extents are synced *from* the peer.
fn compare(me: &SideInfo, peer: &SideInfo, crashed_primary_is_target: bool) -> Decision {
    let (m, p) = (me.generations, peer.generations);
    if me.diskless || peer.diskless {
        return Decision::NoSync;
    }
    if me.inconsistent || peer.inconsistent {
        return match (me.inconsistent, peer.inconsistent) {
            (true, true) => Decision::NoSync,
            (true, false) => Decision::Target {
                full: !(p.bitmap != 0 && p.bitmap == m.current),
            },
            _ => Decision::Source {
                full: !(m.bitmap != 0 && m.bitmap == p.current),
            },
        };
    }
    if m.current == 0 && p.current == 0 {
        return Decision::NoSync;
    }
    if p.current == 0 {
        return Decision::Source { full: true };
    }
    if m.current == 0 {
        return Decision::Target { full: true };
    }
    if m.current == p.current {
        // Same generation: only a crashed primary's activity log (or verify) left bits,
        // or a primary that stopped with writes its peer had not confirmed. Against a
        // primary, the other side takes the primary's data whatever it holds: the
        // cluster chose that primary after those writes — a deposed primary's (with
        // protocols A and B even acknowledged ones, lost by design on failover) or one
        // that stopped and was replaced (seed 38103: the stopped one became the source
        // of the new primary, which refused, and the pair stayed apart).
        let anything_differs = me.dirty_bits > 0
            || peer.dirty_bits > 0
            || me.primary_crashed
            || peer.primary_crashed
            || me.outdated
            || peer.outdated;
        if anything_differs {
            match (me.role, peer.role) {
                (Role::Secondary, Role::Primary) => return Decision::Target { full: false },
                (Role::Primary, Role::Secondary) => return Decision::Source { full: false },
                _ => {}
            }
        }
        // A secondary that lost its disk cache may lack writes it completed: where its
        // peer (whose cache did not go) has bits — writes the peer made as primary that
        // were never confirmed durable — the peer's copy is the one to keep, whatever
        // the outdate records say. At the same generation the peer never wrote without
        // this node, so its copy lacks nothing this one holds (seeds 1191, 30259: the
        // cluster deposed the primary, and its replacement lost power before it took
        // the role; the deposed one, cleanly stopped, held a trim the replacement lost).
        // A primary's crash is the crash rules' below (its activity log says where).
        if me.dirty_bits > 0 || peer.dirty_bits > 0 {
            match (me.cache_lost, peer.cache_lost) {
                (true, false) if !me.primary_crashed => return Decision::Target { full: false },
                (false, true) if !peer.primary_crashed => return Decision::Source { full: false },
                _ => {}
            }
        }
        // Between two secondaries an outdate record may be stale (the link came back in
        // sync), so the crash rules below come first.
        // A crashed primary the cluster has since outdated was deposed: its crash no
        // longer speaks for its data, even once the primary that replaced it has stopped
        // (seed 14102: with protocol B the deposed one became the source and overwrote a
        // write its peer had acknowledged on receipt).
        let crashed = |side: &SideInfo| side.primary_crashed && !side.outdated;
        return match (crashed(me), crashed(peer)) {
            (true, false) if crashed_primary_is_target => Decision::Target { full: false },
            (false, true) if crashed_primary_is_target => Decision::Source { full: false },
            (true, false) => Decision::Source { full: false },
            (false, true) => Decision::Target { full: false },
            // An outdate record, stale or not, still ranks the copies: the cluster
            // outdated that side after its peer last had the primary's writes.
            _ if me.outdated && !peer.outdated => Decision::Target { full: false },
            _ if peer.outdated && !me.outdated => Decision::Source { full: false },
            // Bits on one side only: that side knows of writes the other may lack (a
            // primary that stopped with writes its peer had not confirmed).
            _ => match (me.dirty_bits, peer.dirty_bits) {
                (0, 0) => Decision::NoSync,
                (_, 0) => Decision::Source { full: false },
                (0, _) => Decision::Target { full: false },
                _ => by_tiebreak(me, peer),
            },
        };
    }
    let m_tracks_p = m.bitmap != 0 && m.bitmap == p.current;
    let p_tracks_m = p.bitmap != 0 && p.bitmap == m.current;
    match (m_tracks_p, p_tracks_m) {
        (true, false) => return Decision::Source { full: false },
        (false, true) => return Decision::Target { full: false },
        (true, true) => return Decision::SplitBrain,
        (false, false) => {}
    }
    if m.bitmap != 0 && m.bitmap == p.bitmap {
        return Decision::SplitBrain;
    }
    let m_knows_p = m.has_history(p.current);
    let p_knows_m = p.has_history(m.current);
    if m_knows_p && !p_knows_m {
        return Decision::Source { full: true };
    }
    if p_knows_m && !m_knows_p {
        return Decision::Target { full: true };
    }
    let shared = [m.bitmap, m.history[0], m.history[1]]
        .iter()
        .any(|&g| g != 0 && p.has_history(g));
    if shared {
        Decision::SplitBrain
    } else {
        Decision::Unrelated
    }
}

/// Primary first, then the lower node id, is the source.
fn by_tiebreak(me: &SideInfo, peer: &SideInfo) -> Decision {
    let me_first = match (me.role, peer.role) {
        (Role::Primary, Role::Secondary) => true,
        (Role::Secondary, Role::Primary) => false,
        _ => me.node_id < peer.node_id,
    };
    if me_first {
        Decision::Source { full: false }
    } else {
        Decision::Target { full: false }
    }
}

/// Decides the sync direction for "me", resolving split brain by an operator's
/// `discard-my-data`, then by epoch, then by `policy`.
pub fn decide(
    me: &SideInfo,
    peer: &SideInfo,
    policy: SplitBrainPolicy,
    crashed_primary_is_target: bool,
) -> Decision {
    let raw = compare(me, peer, crashed_primary_is_target);
    if raw != Decision::SplitBrain {
        return raw;
    }
    // An operator's `resolve --discard-my-data` is the resolution asked for: it wins
    // over every automatic rule, the epoch's included (the operator may be discarding
    // the newer epoch's data on purpose, e.g. after a forced promotion went wrong).
    match (me.discard_my_data, peer.discard_my_data) {
        (true, false) => return Decision::Target { full: false },
        (false, true) => return Decision::Source { full: false },
        (true, true) => return Decision::SplitBrain,
        (false, false) => {}
    }
    // A node fenced by a newer cluster epoch never wins.
    if me.epoch != peer.epoch {
        return if me.epoch < peer.epoch {
            Decision::Target { full: false }
        } else {
            Decision::Source { full: false }
        };
    }
    match policy {
        SplitBrainPolicy::Disconnect => Decision::SplitBrain,
        SplitBrainPolicy::DiscardZeroChanges => match (me.dirty_bits, peer.dirty_bits) {
            (0, n) if n > 0 => Decision::Target { full: false },
            (n, 0) if n > 0 => Decision::Source { full: false },
            _ => Decision::SplitBrain,
        },
        SplitBrainPolicy::DiscardYoungerPrimary => {
            if me.primary_since_ms > peer.primary_since_ms {
                Decision::Target { full: false }
            } else if me.primary_since_ms < peer.primary_since_ms {
                Decision::Source { full: false }
            } else {
                Decision::SplitBrain
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn side(node: u32, current: u64, bitmap: u64, history: [u64; 2]) -> SideInfo {
        SideInfo {
            node_id: NodeId(node),
            generations: GenerationIds {
                current,
                bitmap,
                history,
            },
            role: Role::Secondary,
            epoch: Epoch(0),
            dirty_bits: 0,
            primary_since_ms: 0,
            primary_crashed: false,
            cache_lost: false,
            discard_my_data: false,
            diskless: false,
            inconsistent: false,
            outdated: false,
        }
    }

    /// Same generation, no primary: the deposed primary (outdated, its crash flag still
    /// set, bits for writes its peer never confirmed durable) against the node that was
    /// to replace it and lost power before it took the role (seeds 1191, 30259). The
    /// outdate record would make the replacement the source; its cache lost what the
    /// bits mark, so the deposed node's copy is the one to keep there. Without the power
    /// loss the outdate record still ranks them (seed 14102).
    #[test]
    fn a_secondary_that_lost_its_cache_takes_the_deposed_primarys_unconfirmed_writes() {
        let p = SplitBrainPolicy::Disconnect;
        let deposed = SideInfo {
            primary_crashed: true,
            outdated: true,
            dirty_bits: 6,
            ..side(1, 7, 0, [3, 0])
        };
        let replacement = SideInfo {
            cache_lost: true,
            ..side(2, 7, 7, [3, 0])
        };
        for protocol_c in [true, false] {
            assert_eq!(
                decide(&deposed, &replacement, p, protocol_c),
                Decision::Source { full: false }
            );
            assert_eq!(
                decide(&replacement, &deposed, p, protocol_c),
                Decision::Target { full: false }
            );
            let intact = SideInfo {
                cache_lost: false,
                ..replacement
            };
            assert_eq!(
                decide(&deposed, &intact, p, protocol_c),
                Decision::Target { full: false }
            );
        }
    }

    #[test]
    fn the_classic_cases() {
        let p = SplitBrainPolicy::Disconnect;
        // Fresh pair: nothing to do; one side forced primary: full sync.
        assert_eq!(
            decide(&side(1, 0, 0, [0; 2]), &side(2, 0, 0, [0; 2]), p, true),
            Decision::NoSync
        );
        assert_eq!(
            decide(&side(1, 7, 0, [0; 2]), &side(2, 0, 0, [0; 2]), p, true),
            Decision::Source { full: true }
        );
        // Primary wrote alone (7 -> 8, bitmap 7); the peer stayed at 7: bitmap resync.
        assert_eq!(
            decide(&side(1, 8, 7, [0; 2]), &side(2, 7, 0, [0; 2]), p, true),
            Decision::Source { full: false }
        );
        // Both wrote alone from 7: split brain.
        let a = side(1, 8, 7, [0; 2]);
        let b = side(2, 9, 7, [0; 2]);
        assert_eq!(decide(&a, &b, p, true), Decision::SplitBrain);
        // ... resolved by discard-my-data on b.
        let b_discard = SideInfo {
            discard_my_data: true,
            ..b
        };
        assert_eq!(
            decide(&b_discard, &a, p, true),
            Decision::Target { full: false }
        );
        assert_eq!(
            decide(&a, &b_discard, p, true),
            Decision::Source { full: false }
        );
        // ... by a newer epoch.
        let b_newer = SideInfo {
            epoch: Epoch(2),
            ..b
        };
        assert_eq!(
            decide(&a, &b_newer, p, true),
            Decision::Target { full: false }
        );
        // ... by discard-zero-changes when one side did not write.
        let a_changed = SideInfo { dirty_bits: 5, ..a };
        assert_eq!(
            decide(&a_changed, &b, SplitBrainPolicy::DiscardZeroChanges, true),
            Decision::Source { full: false }
        );
        // Unrelated data is refused.
        assert_eq!(
            decide(&side(1, 5, 0, [0; 2]), &side(2, 6, 0, [0; 2]), p, true),
            Decision::Unrelated
        );
        // A crashed primary's activity log is synced from it.
        let crashed = SideInfo {
            primary_crashed: true,
            dirty_bits: 3,
            ..side(1, 7, 0, [0; 2])
        };
        assert_eq!(
            decide(&crashed, &side(2, 7, 0, [0; 2]), p, true),
            Decision::Target { full: false },
            "protocol C: the surviving peer holds every acknowledged write"
        );
        assert_eq!(
            decide(&crashed, &side(2, 7, 0, [0; 2]), p, false),
            Decision::Source { full: false },
            "protocols A/B: the crashed primary's hot extents are the reference (DRBD)"
        );
        // ... unless the cluster outdated it (it was deposed): the peer's data wins.
        let deposed = SideInfo {
            outdated: true,
            ..crashed
        };
        let new_primary = SideInfo {
            role: Role::Primary,
            ..side(2, 7, 0, [0; 2])
        };
        // ... even after the primary that replaced it stopped cleanly (a secondary
        // again, with writes of its own the deposed one never saw; seed 14102).
        let replaced_and_stopped = SideInfo {
            dirty_bits: 2,
            ..side(2, 7, 0, [0; 2])
        };
        // A primary that stopped with unconfirmed writes, replaced by its peer: the new
        // primary's data wins (seed 38103).
        let stopped_with_bits = SideInfo {
            dirty_bits: 13,
            ..side(1, 7, 0, [0; 2])
        };
        let takes_the_peers_data = [
            (
                &deposed,
                &new_primary,
                "a deposed primary is never the source of the primary that replaced it",
            ),
            (
                &deposed,
                &replaced_and_stopped,
                "a deposed primary's crash does not make it a source again",
            ),
            (
                &stopped_with_bits,
                &new_primary,
                "a secondary's bits never make it the source of a primary",
            ),
        ];
        // For every protocol.
        for (me, peer, why) in takes_the_peers_data {
            for crashed_primary_is_target in [true, false] {
                assert_eq!(
                    decide(me, peer, p, crashed_primary_is_target),
                    Decision::Target { full: false },
                    "{why}"
                );
            }
        }
        // The peer is older than our bitmap window: full sync.
        assert_eq!(
            decide(&side(1, 9, 8, [7, 0]), &side(2, 7, 0, [0; 2]), p, true),
            Decision::Source { full: true }
        );
    }

    fn arb_side(node: u32) -> impl Strategy<Value = SideInfo> {
        (
            0u64..5,
            0u64..5,
            0u64..5,
            0u64..5,
            0u64..3,
            0u64..3,
            0u64..3,
            any::<bool>(),
            any::<bool>(),
            (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        )
            .prop_map(
                move |(
                    current,
                    bitmap,
                    h0,
                    h1,
                    epoch,
                    dirty,
                    since,
                    crashed,
                    discard,
                    (primary, inconsistent, outdated, cache_lost),
                )| {
                    SideInfo {
                        node_id: NodeId(node),
                        generations: GenerationIds {
                            current,
                            bitmap,
                            history: [h0, h1],
                        },
                        role: if primary {
                            Role::Primary
                        } else {
                            Role::Secondary
                        },
                        epoch: Epoch(epoch),
                        dirty_bits: dirty,
                        primary_since_ms: since,
                        primary_crashed: crashed,
                        cache_lost,
                        discard_my_data: discard,
                        diskless: false,
                        inconsistent,
                        outdated: outdated && !inconsistent,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn both_sides_reach_mirror_decisions(a in arb_side(1), b in arb_side(2), policy in prop_oneof![
            Just(SplitBrainPolicy::Disconnect),
            Just(SplitBrainPolicy::DiscardZeroChanges),
            Just(SplitBrainPolicy::DiscardYoungerPrimary)], c in any::<bool>()) {
            prop_assert_eq!(decide(&a, &b, policy, c), decide(&b, &a, policy, c).mirror());
        }
    }

    /// Hole: the epoch rule came first, so on the node of the newer epoch an operator's
    /// `resolve --discard-my-data` was ignored and its data overwrote the peer's.
    #[test]
    fn discard_my_data_wins_over_a_newer_epoch() {
        let mut me = side(1, 10, 7, [0, 0]);
        let mut peer = side(2, 20, 7, [0, 0]);
        assert_eq!(
            compare(&me, &peer, true),
            Decision::SplitBrain,
            "both moved on from the shared generation 7"
        );
        me.epoch = Epoch(5);
        peer.epoch = Epoch(4);
        me.discard_my_data = true;
        assert_eq!(
            decide(&me, &peer, SplitBrainPolicy::Disconnect, true),
            Decision::Target { full: false }
        );
        assert_eq!(
            decide(&peer, &me, SplitBrainPolicy::Disconnect, true),
            Decision::Source { full: false }
        );
    }
}
