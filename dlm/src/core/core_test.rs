//! Core tests: feed events, assert exact actions.

use super::*;
use crate::types::Lvb;

fn key(name: &str) -> ResourceKey {
    ResourceKey::new("ls", name.as_bytes()).unwrap()
}

fn members(ids: &[u32]) -> BTreeMap<NodeId, Incarnation> {
    ids.iter().map(|n| (NodeId(*n), Incarnation(1))).collect()
}

/// A single running node (it is its own directory and master).
fn single() -> Dlm {
    let mut d = Dlm::new(NodeId(1), Incarnation(1), Config::default());
    let actions = d.step(Event::Membership {
        epoch: Epoch(1),
        members: members(&[1]),
    });
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(d.state(), NodeState::Running);
    d
}

fn lock(d: &mut Dlm, client: u64, name: &str, mode: Mode, flags: Flags) -> (LockId, Vec<Action>) {
    let id = d.allocate_lock_id();
    let a = d.step(Event::Lock {
        client: ClientId(client),
        lock: id,
        resource: key(name),
        mode,
        flags,
    });
    d.check_invariants().unwrap();
    (id, a)
}

fn granted(client: u64, lock: LockId, mode: Mode) -> Action {
    Action::Complete(Completion {
        client: ClientId(client),
        lock,
        status: Status::Granted,
        mode: Some(mode),
        lvb: None,
        demoted: false,
    })
}

#[test]
fn local_lock_unlock_and_blocking_callback() {
    let mut d = single();
    let (a, acts) = lock(&mut d, 1, "r", Mode::EX, Flags::NONE);
    assert_eq!(acts, vec![granted(1, a, Mode::EX)]);
    let (b, acts) = lock(&mut d, 2, "r", Mode::PR, Flags::NONE);
    assert_eq!(
        acts,
        vec![Action::Blocking {
            client: ClientId(1),
            lock: a,
            mode: Mode::PR
        }]
    );
    let acts = d.step(Event::Unlock {
        client: ClientId(1),
        lock: a,
        lvb: None,
    });
    assert_eq!(
        acts,
        vec![
            Action::Complete(Completion {
                client: ClientId(1),
                lock: a,
                status: Status::Unlocked,
                mode: Some(Mode::EX),
                lvb: None,
                demoted: false,
            }),
            granted(2, b, Mode::PR)
        ]
    );
    d.check_invariants().unwrap();
}

#[test]
fn refusals_leave_state_alone() {
    let mut d = single();
    let (a, _) = lock(&mut d, 1, "r", Mode::EX, Flags::NONE);
    // Wrong client.
    let acts = d.step(Event::Unlock {
        client: ClientId(2),
        lock: a,
        lvb: None,
    });
    assert_eq!(
        acts,
        vec![Action::Refused {
            client: ClientId(2),
            lock: a,
            status: Status::Invalid
        }]
    );
    // QUECVT on a new lock, and an id the node never handed out.
    let id = d.allocate_lock_id();
    let acts = d.step(Event::Lock {
        client: ClientId(1),
        lock: id,
        resource: key("r"),
        mode: Mode::PR,
        flags: Flags::QUECVT,
    });
    assert!(matches!(
        acts[0],
        Action::Refused {
            status: Status::Invalid,
            ..
        }
    ));
    let acts = d.step(Event::Lock {
        client: ClientId(1),
        lock: LockId(999),
        resource: key("r"),
        mode: Mode::PR,
        flags: Flags::NONE,
    });
    assert!(matches!(
        acts[0],
        Action::Refused {
            status: Status::Invalid,
            ..
        }
    ));
    // Unlock while a conversion waits is busy.
    let (b, _) = lock(&mut d, 2, "s", Mode::PR, Flags::NONE);
    let (_c, _) = lock(&mut d, 3, "s", Mode::PR, Flags::NONE);
    let acts = d.step(Event::Convert {
        client: ClientId(2),
        lock: b,
        mode: Mode::EX,
        flags: Flags::NONE,
        lvb: None,
    });
    assert_eq!(acts.len(), 1, "{acts:?}"); // blocking callback to c
    let acts = d.step(Event::Unlock {
        client: ClientId(2),
        lock: b,
        lvb: None,
    });
    assert!(matches!(
        acts[0],
        Action::Refused {
            status: Status::Busy,
            ..
        }
    ));
    d.check_invariants().unwrap();
}

#[test]
fn client_gone_releases_everything_silently() {
    let mut d = single();
    let (_a, _) = lock(&mut d, 1, "r", Mode::EX, Flags::NONE);
    let (_b, _) = lock(&mut d, 1, "q", Mode::PR, Flags::NONE);
    let (c, acts) = lock(&mut d, 2, "r", Mode::EX, Flags::NONE);
    assert_eq!(acts.len(), 1);
    let acts = d.step(Event::ClientGone {
        client: ClientId(1),
    });
    assert_eq!(acts, vec![granted(2, c, Mode::EX)]);
    assert_eq!(d.own_locks().count(), 1);
    d.check_invariants().unwrap();
}

#[test]
fn requests_wait_until_membership_and_recovery_finish() {
    let mut d = Dlm::new(NodeId(1), Incarnation(1), Config::default());
    let id = d.allocate_lock_id();
    let acts = d.step(Event::Lock {
        client: ClientId(1),
        lock: id,
        resource: key("r"),
        mode: Mode::EX,
        flags: Flags::NONE,
    });
    assert!(acts.is_empty());
    let acts = d.step(Event::Membership {
        epoch: Epoch(1),
        members: members(&[1]),
    });
    assert_eq!(acts, vec![granted(1, id, Mode::EX)]);
}

/// Drives two nodes by hand: node 2's client locks a resource node 1 masters.
#[test]
fn two_nodes_remote_lock_and_recovery_waits_for_fencing() {
    let mut n1 = Dlm::new(NodeId(1), Incarnation(1), Config::default());
    let mut n2 = Dlm::new(NodeId(2), Incarnation(1), Config::default());
    let mut inbox: Vec<(NodeId, NodeId, Message)> = Vec::new();
    let route = |from: NodeId, acts: Vec<Action>, inbox: &mut Vec<(NodeId, NodeId, Message)>| {
        let mut other = Vec::new();
        for a in acts {
            match a {
                Action::Send { to, message } => inbox.push((from, to, message)),
                a => other.push(a),
            }
        }
        other
    };
    let run = |n1: &mut Dlm, n2: &mut Dlm, inbox: &mut Vec<(NodeId, NodeId, Message)>| {
        let mut seen = Vec::new();
        while !inbox.is_empty() {
            let (from, to, message) = inbox.remove(0);
            let node = if to == NodeId(1) { &mut *n1 } else { &mut *n2 };
            let acts = node.step(Event::Message {
                from,
                incarnation: Incarnation(1),
                message,
            });
            seen.extend(route(to, acts, inbox));
            n1.check_invariants().unwrap();
            n2.check_invariants().unwrap();
        }
        seen
    };
    for (n, node) in [(1, &mut n1), (2, &mut n2)] {
        let acts = node.step(Event::Membership {
            epoch: Epoch(1),
            members: members(&[1, 2]),
        });
        route(NodeId(n), acts, &mut inbox);
    }
    assert!(run(&mut n1, &mut n2, &mut inbox).is_empty());
    assert_eq!(n1.state(), NodeState::Running);
    assert_eq!(n2.state(), NodeState::Running);
    // Node 1 masters "r" (first requester).
    let a = n1.allocate_lock_id();
    let acts = n1.step(Event::Lock {
        client: ClientId(1),
        lock: a,
        resource: key("r"),
        mode: Mode::PR,
        flags: Flags::NONE,
    });
    let mut done = route(NodeId(1), acts, &mut inbox);
    done.extend(run(&mut n1, &mut n2, &mut inbox));
    assert_eq!(done, vec![granted(1, a, Mode::PR)]);
    // Node 2 asks for EX: waits, node 1's holder gets a blocking callback.
    let b = n2.allocate_lock_id();
    let acts = n2.step(Event::Lock {
        client: ClientId(9),
        lock: b,
        resource: key("r"),
        mode: Mode::EX,
        flags: Flags::NONE,
    });
    route(NodeId(2), acts, &mut inbox);
    let done = run(&mut n1, &mut n2, &mut inbox);
    assert_eq!(
        done,
        vec![Action::Blocking {
            client: ClientId(1),
            lock: a,
            mode: Mode::EX
        }]
    );
    // Node 1 dies. Node 2 must not grant before node 1 is confirmed fenced.
    let acts = n2.step(Event::Membership {
        epoch: Epoch(2),
        members: members(&[2]),
    });
    assert!(acts.is_empty(), "{acts:?}");
    assert_eq!(n2.unfenced(), vec![NodeId(1)]);
    let acts = n2.step(Event::FenceConfirmed {
        node: NodeId(1),
        incarnation: Incarnation(1),
    });
    assert_eq!(acts, vec![granted(9, b, Mode::EX)]);
    n2.check_invariants().unwrap();
}

#[test]
fn evicted_node_refuses_and_voids_its_locks() {
    let mut d = Dlm::new(NodeId(1), Incarnation(1), Config::default());
    d.step(Event::Membership {
        epoch: Epoch(1),
        members: members(&[1, 2]),
    });
    let id = d.allocate_lock_id();
    d.step(Event::Lock {
        client: ClientId(1),
        lock: id,
        resource: key("r"),
        mode: Mode::EX,
        flags: Flags::NONE,
    });
    let acts = d.step(Event::Membership {
        epoch: Epoch(2),
        members: members(&[2]),
    });
    assert_eq!(
        acts,
        vec![Action::Complete(Completion {
            client: ClientId(1),
            lock: id,
            status: Status::Evicted,
            mode: None,
            lvb: None,
            demoted: false,
        })]
    );
    assert_eq!(d.state(), NodeState::Evicted);
}

#[test]
fn unused_resource_is_released_after_toss_time() {
    let mut d = single();
    let (a, _) = lock(&mut d, 1, "r", Mode::EX, Flags::NONE);
    d.step(Event::Unlock {
        client: ClientId(1),
        lock: a,
        lvb: None,
    });
    assert_eq!(d.mastered().count(), 1);
    d.step(Event::Tick { now_ms: 1 });
    d.step(Event::Tick { now_ms: 5_000 });
    assert_eq!(d.mastered().count(), 1);
    d.step(Event::Tick { now_ms: 10_001 });
    assert_eq!(d.mastered().count(), 0);
    d.check_invariants().unwrap();
}

/// A hand-driven cluster: every message is delivered in order until none is left.
struct Cluster {
    nodes: BTreeMap<u32, Dlm>,
    inbox: VecDeque<(u32, u32, Message)>,
    epoch: u64,
}

impl Cluster {
    fn new(ids: &[u32]) -> Cluster {
        let mut c = Cluster {
            nodes: ids
                .iter()
                .map(|n| (*n, Dlm::new(NodeId(*n), Incarnation(1), Config::default())))
                .collect(),
            inbox: VecDeque::new(),
            epoch: 0,
        };
        c.membership(ids);
        c
    }

    fn route(&mut self, from: u32, actions: Vec<Action>) -> Vec<Action> {
        let mut rest = Vec::new();
        for a in actions {
            match a {
                Action::Send { to, message } => self.inbox.push_back((from, to.0, message)),
                a => rest.push(a),
            }
        }
        rest
    }

    fn run(&mut self) -> Vec<Action> {
        let mut seen = Vec::new();
        while let Some((from, to, message)) = self.inbox.pop_front() {
            let Some(node) = self.nodes.get_mut(&to) else {
                continue;
            };
            let acts = node.step(Event::Message {
                from: NodeId(from),
                incarnation: Incarnation(1),
                message,
            });
            seen.extend(self.route(to, acts));
            for n in self.nodes.values() {
                n.check_invariants().unwrap();
            }
        }
        seen
    }

    fn step(&mut self, node: u32, event: Event) -> Vec<Action> {
        let acts = self.nodes.get_mut(&node).unwrap().step(event);
        let mut seen = self.route(node, acts);
        seen.extend(self.run());
        seen
    }

    fn membership(&mut self, ids: &[u32]) {
        self.epoch += 1;
        let members = members(ids);
        for n in ids {
            let acts = self.nodes.get_mut(n).unwrap().step(Event::Membership {
                epoch: Epoch(self.epoch),
                members: members.clone(),
            });
            self.route(*n, acts);
        }
        self.run();
    }

    /// Node `dead` crashes: survivors get the new membership and its fencing.
    fn crash(&mut self, dead: u32) -> Vec<Action> {
        self.nodes.remove(&dead);
        self.inbox.retain(|(f, t, _)| *f != dead && *t != dead);
        let ids: Vec<u32> = self.nodes.keys().copied().collect();
        self.membership(&ids);
        let mut seen = Vec::new();
        for n in ids {
            seen.extend(self.step(
                n,
                Event::FenceConfirmed {
                    node: NodeId(dead),
                    incarnation: Incarnation(1),
                },
            ));
        }
        for n in self.nodes.values() {
            assert_eq!(n.state(), NodeState::Running);
        }
        seen
    }

    fn lock(
        &mut self,
        node: u32,
        client: u64,
        name: &str,
        mode: Mode,
        flags: Flags,
    ) -> (LockId, Completion) {
        let id = self.nodes.get_mut(&node).unwrap().allocate_lock_id();
        let acts = self.step(
            node,
            Event::Lock {
                client: ClientId(client),
                lock: id,
                resource: key(name),
                mode,
                flags,
            },
        );
        (id, completion(&acts, id))
    }

    fn convert(
        &mut self,
        node: u32,
        client: u64,
        lock: LockId,
        mode: Mode,
        lvb: Option<Lvb>,
    ) -> Completion {
        let acts = self.step(
            node,
            Event::Convert {
                client: ClientId(client),
                lock,
                mode,
                flags: Flags::VALBLK,
                lvb,
            },
        );
        completion(&acts, lock)
    }
}

fn completion(actions: &[Action], lock: LockId) -> Completion {
    actions
        .iter()
        .find_map(|a| match a {
            Action::Complete(c) if c.lock == lock => Some(c.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no completion for {lock} in {actions:?}"))
}

fn value(b: u8) -> Lvb {
    let mut v = [0u8; 32];
    v[0] = b;
    Lvb(v)
}

#[test]
fn departed_ex_holder_invalidates_the_value_block() {
    let mut c = Cluster::new(&[1, 2]);
    let (a, g) = c.lock(1, 1, "r", Mode::NL, Flags::VALBLK);
    assert!(g.lvb.unwrap().valid);
    let (_b, g) = c.lock(2, 2, "r", Mode::EX, Flags::VALBLK);
    assert_eq!(g.mode, Some(Mode::EX));
    c.crash(2);
    let g = c.convert(1, 1, a, Mode::PR, None);
    assert_eq!(g.status, Status::Granted);
    assert!(
        !g.lvb.unwrap().valid,
        "a dead EX holder's update may be lost: {g:?}"
    );
}

#[test]
fn lost_master_value_block_recovered_from_a_surviving_pr_holder() {
    let mut c = Cluster::new(&[1, 2, 3]);
    let (_m, _) = c.lock(1, 1, "r", Mode::NL, Flags::VALBLK); // node 1 masters "r"
    let (w, g) = c.lock(2, 2, "r", Mode::EX, Flags::VALBLK);
    assert_eq!(g.mode, Some(Mode::EX));
    let g = c.convert(2, 2, w, Mode::PR, Some(value(42)));
    assert_eq!(g.lvb.unwrap().value, value(42));
    let (r, _) = c.lock(3, 3, "r", Mode::NL, Flags::VALBLK);
    assert!(c.nodes[&1].mastered().any(|(k, _)| *k == key("r")));
    c.crash(1);
    let g = c.convert(3, 3, r, Mode::PR, None);
    assert_eq!(g.status, Status::Granted);
    let lvb = g.lvb.unwrap();
    assert!(lvb.valid, "{g:?}");
    assert_eq!(lvb.value, value(42));
}

#[test]
fn lost_master_with_only_nl_holders_left_marks_the_value_block_invalid() {
    let mut c = Cluster::new(&[1, 2, 3]);
    let (_m, _) = c.lock(1, 1, "r", Mode::NL, Flags::VALBLK);
    let (w, _) = c.lock(2, 2, "r", Mode::EX, Flags::VALBLK);
    c.convert(2, 2, w, Mode::NL, Some(value(7)));
    let (r, _) = c.lock(3, 3, "r", Mode::NL, Flags::VALBLK);
    c.crash(1);
    let g = c.convert(3, 3, r, Mode::PR, None);
    assert_eq!(g.status, Status::Granted);
    assert!(!g.lvb.unwrap().valid, "{g:?}");
}

#[test]
fn request_waiting_on_a_dead_master_is_granted_after_recovery() {
    let mut c = Cluster::new(&[1, 2, 3]);
    let (_h, _) = c.lock(1, 1, "r", Mode::EX, Flags::NONE); // node 1 masters and holds
    let id = c.nodes.get_mut(&2).unwrap().allocate_lock_id();
    let acts = c.step(
        2,
        Event::Lock {
            client: ClientId(2),
            lock: id,
            resource: key("r"),
            mode: Mode::PR,
            flags: Flags::NONE,
        },
    );
    assert!(
        acts.iter().all(|a| !matches!(a, Action::Complete(_))),
        "{acts:?}"
    );
    let acts = c.crash(1);
    let g = completion(&acts, id);
    assert_eq!((g.status, g.mode), (Status::Granted, Some(Mode::PR)));
}
