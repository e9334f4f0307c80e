//! The core fed by hand: exact operations out for inputs in.

use super::*;
use crate::cluster::orchestrator::DiskState;
use crate::cluster::peers::Echoed;
use crate::cluster::types::Epoch;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const W: NodeId = NodeId(3);
const INC: Incarnation = Incarnation(1);

fn at(ms: u64) -> Now {
    Now {
        mono: Millis(ms),
        wall: Millis(1_000_000 + ms),
    }
}

fn config(shared: bool) -> CoreConfig {
    CoreConfig {
        me: A,
        incarnation: INC,
        members: vec![A, B, W],
        volumes: BTreeMap::from([("vol0".to_owned(), vec![A, B])]),
        shared: if shared {
            BTreeSet::from(["vol0".to_owned()])
        } else {
            BTreeSet::new()
        },
        has_fencer: shared,
        failure_timeout_ms: 400,
        quorum_lease_ms: 250,
        fresh_log_id: ClusterLogId(99),
    }
}

/// A configured log with every node up at incarnation 1.
fn joined() -> ClusterState {
    let mut s = ClusterState::default();
    s.apply(&Command::Configure {
        members: vec![A, B, W],
        volumes: BTreeMap::from([("vol0".to_owned(), vec![A, B])]),
        log_id: ClusterLogId(7),
    });
    for n in [A, B, W] {
        s.apply(&Command::Join {
            node: n,
            incarnation: INC,
        });
    }
    s
}

fn replica(role: ReplicaRole, epoch: Epoch) -> ReplicaReport {
    ReplicaReport {
        disk: DiskState::UpToDate,
        role,
        connected: true,
        epoch,
        ..ReplicaReport::default()
    }
}

fn local(role: ReplicaRole, epoch: Epoch) -> BTreeMap<String, ReplicaReport> {
    BTreeMap::from([("vol0".to_owned(), replica(role, epoch))])
}

/// The operations among `actions`.
fn ops(actions: &[Action]) -> Vec<(OpId, Op)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Perform { op, what } => Some((*op, what.clone())),
            _ => None,
        })
        .collect()
}

fn only_op(actions: &[Action]) -> (OpId, Op) {
    let ops = ops(actions);
    assert_eq!(ops.len(), 1, "one operation expected: {actions:?}");
    ops[0].clone()
}

fn events(actions: &[Action]) -> Vec<EventKind> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Emit(kind) => Some(kind.clone()),
            _ => None,
        })
        .collect()
}

/// Ticks `core` at `ms` (not the leader) and answers the act round's fresh read with
/// `replicas`; returns what the round does next.
fn read_then_act(
    core: &mut NodeCore,
    ms: u64,
    replicas: BTreeMap<String, ReplicaReport>,
) -> Vec<Action> {
    let out = core.step(
        at(ms),
        Input::Tick {
            leader: None,
            local: replicas.clone(),
        },
    );
    let (read, what) = only_op(&out);
    assert_eq!(what, Op::ReadReplicas);
    core.step(
        at(ms + 10),
        Input::Done {
            op: read,
            result: OpResult::Replicas(replicas),
        },
    )
}

/// `peer`'s heartbeat at `ms`, echoing (and endorsing) A's heartbeat of that moment: A
/// holds the quorum lease from then on.
fn heartbeat(peer: NodeId, ms: u64, report: NodeReport) -> Heartbeat {
    Heartbeat {
        from: peer,
        incarnation: INC,
        report,
        sent_at: Millis(ms),
        echoes: BTreeMap::from([(
            A,
            Echoed {
                life: INC,
                sent_at: Millis(ms),
            },
        )]),
        endorsed: BTreeSet::from([A]),
        views: BTreeMap::new(),
    }
}

/// A started core (no fencer) that heard B and W at `ms`.
fn started(state: ClusterState, ms: u64) -> NodeCore {
    let mut core = NodeCore::new(config(false), at(0), Arc::new(state));
    core.step(at(0), Input::Start);
    for peer in [B, W] {
        core.step(
            at(ms),
            Input::Heartbeat(heartbeat(
                peer,
                ms,
                NodeReport {
                    incarnation: INC,
                    quorate: true,
                    volumes: BTreeMap::new(),
                },
            )),
        );
    }
    core
}

#[test]
fn a_node_with_shared_devices_registers_its_key_before_anything_else() {
    let mut core = NodeCore::new(config(true), at(0), Arc::new(ClusterState::default()));
    let out = core.step(at(0), Input::Start);
    let (op, what) = only_op(&out);
    assert_eq!(what, Op::Unfence { incarnation: INC });
    assert!(
        events(&out).is_empty(),
        "started before its key is registered"
    );
    // Until the key is registered: no heartbeat, no round.
    assert!(
        core.step(
            at(50),
            Input::Tick {
                leader: Some(A),
                local: BTreeMap::new()
            }
        )
        .is_empty()
    );
    let out = core.step(
        at(60),
        Input::Done {
            op,
            result: OpResult::Done(Ok(())),
        },
    );
    assert_eq!(events(&out), vec![EventKind::Started { incarnation: INC }]);
    let out = core.step(
        at(100),
        Input::Tick {
            leader: Some(A),
            local: BTreeMap::new(),
        },
    );
    assert!(out.iter().any(|a| matches!(a, Action::Heartbeat(_))));
}

#[test]
fn the_leader_configures_an_empty_log_and_retries_after_a_failure() {
    let mut core = started(ClusterState::default(), 10);
    let out = core.step(
        at(50),
        Input::Tick {
            leader: Some(A),
            local: BTreeMap::new(),
        },
    );
    let configure = ops(&out)
        .into_iter()
        .find(|(_, what)| matches!(what, Op::Propose(Command::Configure { .. })))
        .expect("a Configure proposal");
    let Op::Propose(Command::Configure {
        members, log_id, ..
    }) = &configure.1
    else {
        unreachable!()
    };
    assert_eq!(
        (members.clone(), *log_id),
        (vec![A, B, W], ClusterLogId(99))
    );
    // No second lead round while the first waits.
    let out = core.step(
        at(100),
        Input::Tick {
            leader: Some(A),
            local: BTreeMap::new(),
        },
    );
    assert!(
        !ops(&out)
            .iter()
            .any(|(_, w)| matches!(w, Op::Propose(Command::Configure { .. }))),
        "{out:?}"
    );
    core.step(
        at(110),
        Input::Done {
            op: configure.0,
            result: OpResult::Proposed(Err("no leader".into())),
        },
    );
    assert!(!core.round_running(&RoundKind::Lead));
    let out = core.step(
        at(150),
        Input::Tick {
            leader: Some(A),
            local: BTreeMap::new(),
        },
    );
    assert!(
        ops(&out)
            .iter()
            .any(|(_, w)| matches!(w, Op::Propose(Command::Configure { .. }))),
        "retried: {out:?}"
    );
}

#[test]
fn the_act_round_reads_the_replicas_then_stops_at_the_first_failed_action() {
    let mut s = joined();
    s.apply(&Command::Promote {
        volume: "vol0".into(),
        node: A,
        expect: s.volumes["vol0"].epoch,
    });
    let epoch = s.volumes["vol0"].epoch;
    let mut core = started(s, 10);
    let out = core.step(
        at(50),
        Input::Tick {
            leader: Some(B),
            local: local(ReplicaRole::Secondary, Epoch(0)),
        },
    );
    let (read, what) = only_op(&out);
    assert_eq!(what, Op::ReadReplicas);
    // The replica is a secondary at an old epoch: set the epoch, confirm, promote.
    let out = core.step(
        at(60),
        Input::Done {
            op: read,
            result: OpResult::Replicas(local(ReplicaRole::Secondary, Epoch(0))),
        },
    );
    let (set_epoch, what) = only_op(&out);
    assert_eq!(
        what,
        Op::Replica {
            volume: "vol0".into(),
            action: VolumeAction::SetEpoch {
                epoch,
                log: ClusterLogId(7)
            }
        }
    );
    let out = core.step(
        at(70),
        Input::Done {
            op: set_epoch,
            result: OpResult::Done(Ok(())),
        },
    );
    let (confirm, what) = only_op(&out);
    assert!(
        matches!(what, Op::Propose(Command::ConfirmPrimary { .. })),
        "{what:?}"
    );
    // The confirmation is rejected: the promotion after it must not happen.
    let out = core.step(
        at(80),
        Input::Done {
            op: confirm,
            result: OpResult::Proposed(Ok(Outcome::Rejected {
                reason: "stale".into(),
            })),
        },
    );
    assert!(ops(&out).is_empty(), "{out:?}");
    assert!(matches!(
        events(&out).as_slice(),
        [EventKind::Action { error: Some(e), .. }] if e.contains("stale")
    ));
    assert!(!core.round_running(&RoundKind::Act));
}

#[test]
fn a_failed_join_is_retried_quietly() {
    let mut s = joined();
    s.apply(&Command::MarkDown {
        node: A,
        incarnation: INC,
    });
    // A new life of A, not in the log yet.
    let mut config = config(false);
    config.incarnation = Incarnation(2);
    let mut core = NodeCore::new(config, at(0), Arc::new(s));
    core.step(at(0), Input::Start);
    // The peers echo the new life's heartbeat (an echo of the old life's would not count).
    for peer in [B, W] {
        let mut hb = heartbeat(peer, 10, NodeReport::default());
        hb.echoes.insert(
            A,
            Echoed {
                life: Incarnation(2),
                sent_at: Millis(10),
            },
        );
        core.step(at(10), Input::Heartbeat(hb));
    }
    let out = read_then_act(&mut core, 50, local(ReplicaRole::Secondary, Epoch(0)));
    let (join, what) = only_op(&out);
    assert_eq!(
        what,
        Op::Propose(Command::Join {
            node: A,
            incarnation: Incarnation(2)
        })
    );
    let out = core.step(
        at(70),
        Input::Done {
            op: join,
            result: OpResult::Proposed(Err("no leader".into())),
        },
    );
    assert!(
        events(&out).is_empty(),
        "a failed join is not news: {out:?}"
    );
}

/// B, primary of vol0, marked down: A is to fence it.
fn b_lost() -> ClusterState {
    let mut s = joined();
    s.apply(&Command::Promote {
        volume: "vol0".into(),
        node: B,
        expect: s.volumes["vol0"].epoch,
    });
    s.apply(&Command::MarkDown {
        node: B,
        incarnation: INC,
    });
    s
}

/// A core with shared devices whose key is registered, that heard W at 10.
fn started_with_fencer(state: ClusterState) -> NodeCore {
    let mut core = NodeCore::new(config(true), at(0), Arc::new(state));
    let (unfence, _) = only_op(&core.step(at(0), Input::Start));
    core.step(
        at(0),
        Input::Done {
            op: unfence,
            result: OpResult::Done(Ok(())),
        },
    );
    core.step(
        at(10),
        Input::Heartbeat(heartbeat(W, 10, NodeReport::default())),
    );
    core
}

/// A started core with shared devices, ticked into its act round; returns the fence op.
fn fencing_core(state: ClusterState) -> (NodeCore, OpId, Op) {
    let epoch = state.volumes["vol0"].epoch;
    let mut core = started_with_fencer(state);
    let out = read_then_act(&mut core, 50, local(ReplicaRole::Secondary, epoch));
    let (op, what) = only_op(&out);
    (core, op, what)
}

#[test]
fn a_reservation_fence_is_recorded_with_the_volume_epoch_and_the_wall_time() {
    let state = b_lost();
    let epoch = state.volumes["vol0"].epoch;
    let (mut core, op, what) = fencing_core(state);
    assert_eq!(
        what,
        Op::FenceReservation {
            volume: "vol0".into(),
            victim: B,
            incarnation: INC
        }
    );
    assert_eq!(core.fence_operations(), 1);
    let out = core.step(
        at(70),
        Input::Done {
            op,
            result: OpResult::Fenced(Ok("preempted".into())),
        },
    );
    let (_, what) = only_op(&out);
    let Op::Propose(Command::Fenced { entry }) = what else {
        panic!("{what:?}")
    };
    assert_eq!(
        (entry.victim, entry.volume_epoch, entry.at, entry.by),
        (B, epoch, at(70).wall, A)
    );
    assert_eq!(
        entry.method,
        FenceMethod::Reservation {
            detail: "preempted".into()
        }
    );
}

#[test]
fn a_fence_stuck_past_its_limit_fails_and_its_late_result_is_ignored() {
    let state = b_lost();
    let epoch = state.volumes["vol0"].epoch;
    let (mut core, op, _) = fencing_core(state);
    // While it runs, no second fence of the same volume starts.
    let heard = |core: &mut NodeCore, ms| {
        core.step(
            at(ms),
            Input::Heartbeat(heartbeat(W, ms, NodeReport::default())),
        );
    };
    heard(&mut core, 30_000);
    let out = core.step(
        at(30_000),
        Input::Tick {
            leader: None,
            local: local(ReplicaRole::Secondary, epoch),
        },
    );
    assert!(ops(&out).is_empty(), "{out:?}");
    heard(&mut core, FENCE_LIMIT_MS + 60);
    let out = core.step(
        at(FENCE_LIMIT_MS + 60),
        Input::Tick {
            leader: None,
            local: local(ReplicaRole::Secondary, epoch),
        },
    );
    assert!(
        events(&out).iter().any(|e| matches!(
            e,
            EventKind::Action { action: LocalAction::Fence { .. }, error: Some(e) } if e.contains("did not finish")
        )),
        "{out:?}"
    );
    // The next act round may fence again.
    let (read, what) = only_op(&out);
    assert_eq!(what, Op::ReadReplicas);
    let late = core.step(
        at(FENCE_LIMIT_MS + 70),
        Input::Done {
            op,
            result: OpResult::Fenced(Ok("preempted late".into())),
        },
    );
    assert!(late.is_empty(), "{late:?}");
    let out = core.step(
        at(FENCE_LIMIT_MS + 80),
        Input::Done {
            op: read,
            result: OpResult::Replicas(local(ReplicaRole::Secondary, epoch)),
        },
    );
    assert!(matches!(only_op(&out).1, Op::FenceReservation { .. }));
    assert_eq!(core.fence_operations(), 2);
}

#[test]
fn a_rejoin_stores_a_new_incarnation_then_registers_its_key() {
    let mut s = joined();
    s.apply(&Command::MarkDown {
        node: A,
        incarnation: INC,
    });
    let mut core = started_with_fencer(s);
    let out = read_then_act(&mut core, 50, local(ReplicaRole::Secondary, Epoch(0)));
    let (store, what) = only_op(&out);
    assert_eq!(what, Op::NewIncarnation);
    let out = core.step(
        at(70),
        Input::Done {
            op: store,
            result: OpResult::Incarnation(Ok(Incarnation(5))),
        },
    );
    assert_eq!(core.incarnation(), Incarnation(5));
    assert_eq!(
        only_op(&out).1,
        Op::Unfence {
            incarnation: Incarnation(5)
        }
    );
}

#[test]
fn an_orderly_stop_goes_on_past_failures_and_ends_with_leave() {
    let mut s = joined();
    s.apply(&Command::Promote {
        volume: "vol0".into(),
        node: A,
        expect: s.volumes["vol0"].epoch,
    });
    let mut core = started(s, 10);
    let out = core.step(
        at(50),
        Input::Stop {
            local: local(ReplicaRole::Primary, Epoch(1)),
        },
    );
    assert_eq!(events(&out), vec![EventKind::Stopping]);
    // A second SIGTERM while stopping changes nothing.
    assert!(
        core.step(
            at(55),
            Input::Stop {
                local: local(ReplicaRole::Primary, Epoch(1)),
            },
        )
        .is_empty()
    );
    let mut done = Vec::new();
    let mut next = only_op(&out);
    loop {
        done.push(next.1.clone());
        // Every step fails; the stop goes on.
        let out = core.step(
            at(60),
            Input::Done {
                op: next.0,
                result: match next.1 {
                    Op::Propose(_) => OpResult::Proposed(Err("no leader".into())),
                    _ => OpResult::Done(Err("busy".into())),
                },
            },
        );
        match ops(&out).first() {
            Some(op) => next = op.clone(),
            None => break,
        }
    }
    assert_eq!(
        done,
        vec![
            Op::StopResources {
                volume: "vol0".into()
            },
            Op::Replica {
                volume: "vol0".into(),
                action: VolumeAction::Demote
            },
            Op::Propose(Command::Leave {
                node: A,
                incarnation: INC
            }),
        ]
    );
    // No act round starts once stopping.
    let out = core.step(
        at(100),
        Input::Tick {
            leader: None,
            local: BTreeMap::new(),
        },
    );
    assert!(ops(&out).is_empty(), "{out:?}");
}

#[test]
fn the_leader_goes_on_past_a_rejected_decision_and_stops_at_an_uncommitted_one() {
    // B and W are down and silent: the leader marks both down, one proposal each.
    let mut core = NodeCore::new(config(false), at(0), Arc::new(joined()));
    core.step(at(0), Input::Start);
    let out = core.step(
        at(1_000),
        Input::Tick {
            leader: Some(A),
            local: BTreeMap::new(),
        },
    );
    let marks: Vec<(OpId, Op)> = ops(&out)
        .into_iter()
        .filter(|(_, w)| matches!(w, Op::Propose(Command::MarkDown { .. })))
        .collect();
    assert_eq!(marks.len(), 1, "one decision at a time: {out:?}");
    let out = core.step(
        at(1_010),
        Input::Done {
            op: marks[0].0,
            result: OpResult::Proposed(Ok(Outcome::Rejected {
                reason: "old view".into(),
            })),
        },
    );
    let (second, what) = only_op(&out);
    assert!(
        matches!(what, Op::Propose(Command::MarkDown { .. })),
        "{what:?}"
    );
    core.step(
        at(1_020),
        Input::Done {
            op: second,
            result: OpResult::Proposed(Err("no quorum".into())),
        },
    );
    assert!(!core.round_running(&RoundKind::Lead));
}

#[test]
fn the_lease_is_announced_when_it_moves_and_heartbeats_carry_echoes() {
    let mut core = NodeCore::new(config(false), at(0), Arc::new(joined()));
    core.step(at(0), Input::Start);
    let out = core.step(
        at(100),
        Input::Tick {
            leader: None,
            local: BTreeMap::new(),
        },
    );
    let Some(Action::Heartbeat(sent)) = out.first() else {
        panic!("{out:?}")
    };
    assert_eq!(sent.sent_at, Millis(100));
    assert!(out.contains(&Action::Lease { until: Millis(0) }), "{out:?}");
    // B echoes the heartbeat A sent at 100: A holds the lease until 100 + 250.
    let out = core.step(
        at(130),
        Input::Heartbeat(heartbeat(B, 100, NodeReport::default())),
    );
    assert_eq!(out, vec![Action::Lease { until: Millis(350) }]);
    // The same echo again moves nothing.
    let out = core.step(
        at(140),
        Input::Heartbeat(heartbeat(B, 100, NodeReport::default())),
    );
    assert!(out.is_empty(), "{out:?}");
    // A's next heartbeat echoes B's send time.
    let out = core.step(
        at(200),
        Input::Tick {
            leader: None,
            local: BTreeMap::new(),
        },
    );
    let Some(Action::Heartbeat(sent)) = out.first() else {
        panic!("{out:?}")
    };
    assert_eq!(
        sent.echoes,
        BTreeMap::from([(
            B,
            Echoed {
                life: INC,
                sent_at: Millis(100)
            }
        )])
    );
}

/// B, primary of vol0, lost and fenced; A promoted in its place.
fn a_replaces_b() -> ClusterState {
    let mut s = b_lost();
    s.apply(&Command::Fenced {
        entry: FenceLogEntry {
            volume: "vol0".into(),
            victim: B,
            victim_incarnation: INC,
            by: A,
            method: FenceMethod::Epoch,
            at: Millis(0),
            volume_epoch: s.volumes["vol0"].epoch,
        },
    });
    let promoted = s.apply(&Command::Promote {
        volume: "vol0".into(),
        node: A,
        expect: s.volumes["vol0"].epoch,
    });
    assert!(promoted.is_applied(), "{promoted:?}");
    s
}

/// Runs one act round of `core` at `ms` (answering every operation with success);
/// returns the operations it handed out.
fn act_round(core: &mut NodeCore, ms: u64, replicas: BTreeMap<String, ReplicaReport>) -> Vec<Op> {
    let out = core.step(
        at(ms),
        Input::Tick {
            leader: None,
            local: replicas.clone(),
        },
    );
    let mut pending = ops(&out)
        .into_iter()
        .filter(|(_, w)| *w == Op::ReadReplicas)
        .collect::<Vec<_>>();
    let mut seen = Vec::new();
    while let Some((op, what)) = pending.pop() {
        seen.push(what.clone());
        let result = match what {
            Op::ReadReplicas => OpResult::Replicas(replicas.clone()),
            Op::Propose(_) => OpResult::Proposed(Ok(Outcome::Applied)),
            _ => OpResult::Done(Ok(())),
        };
        pending.extend(ops(&core.step(at(ms), Input::Done { op, result })));
    }
    seen
}

#[test]
fn a_new_primary_serves_only_once_the_witness_can_no_longer_endorse_the_old_one() {
    let state = a_replaces_b();
    let epoch = state.volumes["vol0"].epoch;
    let mut core = NodeCore::new(config(false), at(0), Arc::new(state));
    core.step(at(0), Input::Start);
    let witness = |core: &mut NodeCore, ms: u64, view: Option<PeerView>| {
        let mut hb = heartbeat(W, ms, NodeReport::default());
        hb.views = view.into_iter().map(|v| (B, v)).collect();
        core.step(at(ms), Input::Heartbeat(hb));
    };
    let promotes = |seen: &[Op]| {
        seen.iter().any(|w| {
            matches!(
                w,
                Op::Replica {
                    action: VolumeAction::Promote { .. },
                    ..
                }
            )
        })
    };
    let secondary = local(ReplicaRole::Secondary, epoch);
    // W has not said that its log ended B's life: W may still endorse it.
    witness(&mut core, 1_000, None);
    let seen = act_round(&mut core, 1_000, secondary.clone());
    assert!(
        seen.iter()
            .any(|w| matches!(w, Op::Propose(Command::ConfirmPrimary { .. }))),
        "{seen:?}"
    );
    assert!(
        !promotes(&seen),
        "promoted before the old life was released: {seen:?}"
    );
    // W's log ended it; W last heard (and endorsed) B at 1000.
    let ended = |ms: u64| PeerView {
        life: INC,
        up: false,
        endorsed: Some((INC, ms - 1_000)),
    };
    witness(&mut core, 1_100, Some(ended(1_100)));
    assert!(!promotes(&act_round(&mut core, 1_100, secondary.clone())));
    // One lease (250 ms) and its margin after W last heard B: released.
    witness(&mut core, 1_280, Some(ended(1_280)));
    assert!(promotes(&act_round(&mut core, 1_280, secondary)));
}
