//! The simulated world: nodes, links, the cluster log, clients and faults.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::fmt;

use tandem_dlm::core::{Config, NodeState};
use tandem_dlm::{
    Action, ClientId, Completion, Dlm, Epoch, Event, Flags, Incarnation, LockId, Lvb, LvbCopy,
    Message, Mode, NodeId, ResourceKey, Status,
};

use crate::invariants;

/// splitmix64: small, seedable, good enough for scheduling.
pub struct Rng(u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::try_from(self.below(items.len() as u64)).unwrap()]
    }
}

/// Counters over a run.
#[derive(Debug, Default, Clone)]
pub struct Totals {
    pub steps: u64,
    pub ops: u64,
    pub grants: u64,
    pub would_block: u64,
    pub deadlocks: u64,
    pub demoted: u64,
    pub canceled: u64,
    pub crashes: u64,
    pub evictions: u64,
    pub remastered: u64,
    pub lvb_checks: u64,
    pub messages: u64,
}

impl Totals {
    pub fn add(&mut self, o: &Totals) {
        self.steps += o.steps;
        self.ops += o.ops;
        self.grants += o.grants;
        self.would_block += o.would_block;
        self.deadlocks += o.deadlocks;
        self.demoted += o.demoted;
        self.canceled += o.canceled;
        self.crashes += o.crashes;
        self.evictions += o.evictions;
        self.remastered += o.remastered;
        self.lvb_checks += o.lvb_checks;
        self.messages += o.messages;
    }
}

impl fmt::Display for Totals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} steps, {} messages, {} requests: {} granted, {} would-block, {} deadlock, \
             {} demoted, {} canceled; {} crashes, {} evictions, {} remastered resources, \
             {} value-block checks",
            self.steps,
            self.messages,
            self.ops,
            self.grants,
            self.would_block,
            self.deadlocks,
            self.demoted,
            self.canceled,
            self.crashes,
            self.evictions,
            self.remastered,
            self.lvb_checks
        )
    }
}

/// What a client asked and has not heard back about.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientOp {
    Request { mode: Mode, flags: Flags },
    Convert { mode: Mode, flags: Flags },
    Unlock,
}

/// A lock as its client sees it.
#[derive(Debug, Clone)]
pub struct ClientLock {
    pub resource: ResourceKey,
    pub held: Option<Mode>,
    pub flags: Flags,
    pub lvb: Option<LvbCopy>,
    pub pending: Option<ClientOp>,
    pub cancel_sent: bool,
}

impl ClientLock {
    /// What the client relies on (same rule as the core's owner copy).
    pub fn effective(&self) -> Option<Mode> {
        let g = self.held?;
        match &self.pending {
            None | Some(ClientOp::Request { .. }) => Some(g),
            Some(ClientOp::Unlock) => None,
            Some(ClientOp::Convert { mode, flags }) => {
                if flags.contains(Flags::CONVDEADLK) && !g.is_down_to(*mode) {
                    Some(Mode::NL)
                } else {
                    Some(g.meet(*mode))
                }
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct Client {
    pub id: u64,
    pub locks: BTreeMap<LockId, ClientLock>,
}

pub struct Node {
    pub id: NodeId,
    pub incarnation: Incarnation,
    pub alive: bool,
    pub dlm: Dlm,
    pub clients: Vec<Client>,
    /// Next cluster log entry this node gets.
    pub log_pos: usize,
    pub cluster_last_at: u64,
}

#[derive(Debug, Clone)]
enum LogEntry {
    Membership {
        epoch: Epoch,
        members: BTreeMap<NodeId, Incarnation>,
    },
    Fenced {
        node: NodeId,
        incarnation: Incarnation,
    },
}

struct Packet {
    from_inc: Incarnation,
    to_inc: Incarnation,
    message: Message,
}

#[derive(Default)]
struct Link {
    queue: VecDeque<Packet>,
    last_at: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    Deliver { from: u32, to: u32 },
    ClientAct { node: u32, inc: u64, slot: usize },
    Cluster { node: u32, inc: u64 },
    Tick { node: u32, inc: u64 },
    Crash { node: u32 },
    Evict { node: u32 },
    Detect { node: u32, inc: u64 },
    Fence { node: u32, inc: u64, kill: bool },
    Restart { node: u32 },
}

pub struct World {
    pub rng: Rng,
    pub now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64, Ev)>>,
    pub nodes: Vec<Node>,
    links: BTreeMap<(u32, u32), Link>,
    log: Vec<LogEntry>,
    members: BTreeMap<NodeId, Incarnation>,
    epoch: u64,
    pub resources: Vec<ResourceKey>,
    next_client: u64,
    next_value: u8,
    active_until: u64,
    end_at: u64,
    down: usize,
    pub totals: Totals,
    trace: bool,
}

const TOSS_MS: u64 = 300;

pub fn run(seed: u64, trace: bool) -> Result<Totals, String> {
    let mut rng = Rng(seed ^ 0xD1B5_4A32_D192_ED03);
    let n_nodes = rng.range(3, 5);
    let n_clients = rng.range(1, 3);
    let n_resources = rng.range(2, 5);
    let mut resources = Vec::new();
    for i in 0..n_resources {
        let ls = if i % 3 == 2 { "b" } else { "a" };
        resources.push(ResourceKey::new(ls, format!("r{i}").as_bytes()).unwrap());
    }
    let active_until = rng.range(400, 900);
    let mut w = World {
        rng,
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        nodes: Vec::new(),
        links: BTreeMap::new(),
        log: Vec::new(),
        members: BTreeMap::new(),
        epoch: 0,
        resources,
        next_client: 1,
        next_value: 1,
        active_until,
        end_at: active_until + 15_000,
        down: 0,
        totals: Totals::default(),
        trace,
    };
    if trace {
        eprintln!(
            "seed {seed}: {n_nodes} nodes, {n_clients} clients each, resources {:?}, active {active_until} ms",
            w.resources
        );
    }
    for n in 1..=n_nodes {
        let id = NodeId(u32::try_from(n).unwrap());
        let inc = Incarnation(1);
        let mut node = Node {
            id,
            incarnation: inc,
            alive: true,
            dlm: Dlm::new(id, inc, Config { toss_ms: TOSS_MS }),
            clients: Vec::new(),
            log_pos: 0,
            cluster_last_at: 0,
        };
        for slot in 0..usize::try_from(n_clients).unwrap() {
            node.clients.push(Client {
                id: w.next_client,
                locks: BTreeMap::new(),
            });
            w.next_client += 1;
            let at = w.rng.range(1, 30);
            let _ = slot;
            w.members.insert(id, inc);
            w.schedule_at(
                at,
                Ev::ClientAct {
                    node: id.0,
                    inc: inc.0,
                    slot,
                },
            );
        }
        w.members.insert(id, inc);
        w.nodes.push(node);
        let at = w.rng.range(1, 100);
        w.schedule_at(at, Ev::Tick { node: id.0, inc: 1 });
    }
    w.append_membership();
    // Faults during the active phase.
    let faults = w.rng.range(0, 3);
    for _ in 0..faults {
        let at = w.rng.range(10, active_until);
        let node = u32::try_from(w.rng.range(1, n_nodes)).unwrap();
        if w.rng.chance(70) {
            w.schedule_at(at, Ev::Crash { node });
        } else {
            w.schedule_at(at, Ev::Evict { node });
        }
    }
    while let Some(Reverse((at, _, ev))) = w.queue.pop() {
        if at > w.end_at {
            break;
        }
        w.now = at;
        w.handle(ev)?;
        w.totals.steps += 1;
        invariants::check(&mut w).map_err(|e| format!("t={} after {ev:?}: {e}", w.now))?;
    }
    invariants::check_end(&w)?;
    Ok(w.totals)
}

impl World {
    fn schedule_at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, ev)));
    }

    fn node_mut(&mut self, id: u32) -> &mut Node {
        &mut self.nodes[usize::try_from(id - 1).unwrap()]
    }

    fn node(&self, id: u32) -> &Node {
        &self.nodes[usize::try_from(id - 1).unwrap()]
    }

    fn append_membership(&mut self) {
        self.epoch += 1;
        let entry = LogEntry::Membership {
            epoch: Epoch(self.epoch),
            members: self.members.clone(),
        };
        self.append(entry);
    }

    fn append(&mut self, entry: LogEntry) {
        if self.trace {
            eprintln!("t={} cluster log: {entry:?}", self.now);
        }
        self.log.push(entry);
        let ids: Vec<u32> = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.id.0)
            .collect();
        for id in ids {
            let delay = self.rng.range(0, 40);
            let at = self.node(id).cluster_last_at.max(self.now + delay);
            let node = self.node_mut(id);
            node.cluster_last_at = at;
            let inc = node.incarnation.0;
            self.schedule_at(at, Ev::Cluster { node: id, inc });
        }
    }

    fn is_current(&self, node: u32, inc: u64) -> bool {
        let n = self.node(node);
        n.alive && n.incarnation.0 == inc
    }

    fn handle(&mut self, ev: Ev) -> Result<(), String> {
        match ev {
            Ev::Deliver { from, to } => self.deliver(from, to),
            Ev::ClientAct { node, inc, slot } => {
                if self.is_current(node, inc) {
                    self.client_act(node, slot)?;
                }
                Ok(())
            }
            Ev::Cluster { node, inc } => {
                if !self.is_current(node, inc) {
                    return Ok(());
                }
                let pos = self.node(node).log_pos;
                let Some(entry) = self.log.get(pos).cloned() else {
                    return Ok(());
                };
                self.node_mut(node).log_pos += 1;
                let event = match entry {
                    LogEntry::Membership { epoch, members } => Event::Membership { epoch, members },
                    LogEntry::Fenced { node, incarnation } => {
                        Event::FenceConfirmed { node, incarnation }
                    }
                };
                self.step(node, event)
            }
            Ev::Tick { node, inc } => {
                if !self.is_current(node, inc) {
                    return Ok(());
                }
                let now = self.now;
                self.step(node, Event::Tick { now_ms: now })?;
                if self.now < self.end_at {
                    let at = self.now + 100;
                    self.schedule_at(at, Ev::Tick { node, inc });
                }
                Ok(())
            }
            Ev::Crash { node } => {
                if !self.node(node).alive || self.down + 1 >= self.nodes.len() {
                    return Ok(());
                }
                let inc = self.node(node).incarnation.0;
                if !self.members.contains_key(&NodeId(node)) {
                    return Ok(());
                }
                self.totals.crashes += 1;
                self.kill(node);
                let at = self.now + self.rng.range(20, 300);
                self.schedule_at(at, Ev::Detect { node, inc });
                Ok(())
            }
            Ev::Detect { node, inc } => {
                self.members.remove(&NodeId(node));
                self.append_membership();
                let at = self.now + self.rng.range(0, 400);
                self.schedule_at(
                    at,
                    Ev::Fence {
                        node,
                        inc,
                        kill: false,
                    },
                );
                Ok(())
            }
            Ev::Evict { node } => {
                if !self.node(node).alive
                    || self.down + 1 >= self.nodes.len()
                    || !self.members.contains_key(&NodeId(node))
                {
                    return Ok(());
                }
                self.totals.evictions += 1;
                self.down += 1;
                let inc = self.node(node).incarnation.0;
                self.members.remove(&NodeId(node));
                self.append_membership();
                let at = self.now + self.rng.range(10, 400);
                self.schedule_at(
                    at,
                    Ev::Fence {
                        node,
                        inc,
                        kill: true,
                    },
                );
                Ok(())
            }
            Ev::Fence { node, inc, kill } => {
                if kill && self.is_current(node, inc) {
                    // Fencing a live node: it is cut off (killed) now.
                    self.down -= 1;
                    self.kill(node);
                }
                self.append(LogEntry::Fenced {
                    node: NodeId(node),
                    incarnation: Incarnation(inc),
                });
                let at = self.now + self.rng.range(50, 600);
                self.schedule_at(at, Ev::Restart { node });
                Ok(())
            }
            Ev::Restart { node } => {
                if self.node(node).alive {
                    return Ok(());
                }
                self.restart(node);
                Ok(())
            }
        }
    }

    /// The node's process dies: its state is gone; a prefix of what it sent is still
    /// delivered (the kernel flushes part of the socket buffers), the rest is lost.
    fn kill(&mut self, node: u32) {
        if self.trace {
            eprintln!("t={} node {node} dies", self.now);
        }
        self.down += 1;
        let n = self.node_mut(node);
        n.alive = false;
        n.clients.clear();
        let keys: Vec<(u32, u32)> = self
            .links
            .keys()
            .copied()
            .filter(|(f, _)| *f == node)
            .collect();
        for k in keys {
            let len = self.links[&k].queue.len();
            let keep = usize::try_from(self.rng.below(len as u64 + 1)).unwrap();
            if let Some(link) = self.links.get_mut(&k) {
                link.queue.truncate(keep);
            }
        }
    }

    fn restart(&mut self, node: u32) {
        self.down -= 1;
        let inc = Incarnation(self.node(node).incarnation.0 + 1);
        if self.trace {
            eprintln!(
                "t={} node {node} restarts as incarnation {}",
                self.now, inc.0
            );
        }
        let n_clients = self.rng.range(1, 2);
        let mut clients = Vec::new();
        for _ in 0..n_clients {
            clients.push(Client {
                id: self.next_client,
                locks: BTreeMap::new(),
            });
            self.next_client += 1;
        }
        let log_len = self.log.len();
        let now = self.now;
        {
            let n = self.node_mut(node);
            n.alive = true;
            n.incarnation = inc;
            n.dlm = Dlm::new(NodeId(node), inc, Config { toss_ms: TOSS_MS });
            n.clients = clients;
            n.log_pos = log_len;
            n.cluster_last_at = now;
        }
        for slot in 0..usize::try_from(n_clients).unwrap() {
            let at = self.now + self.rng.range(1, 50);
            self.schedule_at(
                at,
                Ev::ClientAct {
                    node,
                    inc: inc.0,
                    slot,
                },
            );
        }
        let at = self.now + self.rng.range(1, 100);
        self.schedule_at(at, Ev::Tick { node, inc: inc.0 });
        self.members.insert(NodeId(node), inc);
        self.append_membership();
    }

    fn deliver(&mut self, from: u32, to: u32) -> Result<(), String> {
        let Some(link) = self.links.get_mut(&(from, to)) else {
            return Ok(());
        };
        let Some(packet) = link.queue.pop_front() else {
            return Ok(());
        };
        if !self.is_current(to, packet.to_inc.0) {
            return Ok(());
        }
        if self.trace {
            eprintln!("t={} {from}->{to} {:?}", self.now, packet.message);
        }
        self.step(
            to,
            Event::Message {
                from: NodeId(from),
                incarnation: packet.from_inc,
                message: packet.message,
            },
        )
    }

    /// Feeds one event to a node and carries out its actions.
    pub fn step(&mut self, node: u32, event: Event) -> Result<(), String> {
        if self.trace && !matches!(event, Event::Message { .. } | Event::Tick { .. }) {
            eprintln!("t={} node {node} <- {event:?}", self.now);
        }
        let before = self.node(node).dlm.mastered().count();
        let recovering = self.node(node).dlm.state() == NodeState::Recovering;
        let actions = self.node_mut(node).dlm.step(event);
        if recovering && self.node(node).dlm.state() == NodeState::Running {
            let after = self.node(node).dlm.mastered().count();
            self.totals.remastered += u64::try_from(after.saturating_sub(before)).unwrap();
        }
        for a in actions {
            if self.trace {
                eprintln!("t={}   node {node} -> {a:?}", self.now);
            }
            match a {
                Action::Send { to, message } => self.send(node, to.0, message),
                Action::Complete(c) => self.on_completion(node, c)?,
                Action::Blocking { client, lock, mode } => {
                    self.on_blocking(node, client, lock, mode)
                }
                Action::Refused {
                    client,
                    lock,
                    status,
                } => self.on_refused(node, client, lock, status)?,
            }
        }
        Ok(())
    }

    fn send(&mut self, from: u32, to: u32, message: Message) {
        self.totals.messages += 1;
        let from_inc = self.node(from).incarnation;
        let to_node = self.node(to);
        if !to_node.alive {
            return;
        }
        let to_inc = to_node.incarnation;
        let delay = if self.rng.chance(5) {
            self.rng.range(20, 200)
        } else {
            self.rng.range(1, 15)
        };
        let now = self.now;
        let link = self.links.entry((from, to)).or_default();
        let at = link.last_at.max(now + delay);
        link.last_at = at;
        link.queue.push_back(Packet {
            from_inc,
            to_inc,
            message,
        });
        self.schedule_at(at, Ev::Deliver { from, to });
    }

    fn client_index(&self, node: u32, client: ClientId) -> Option<usize> {
        self.node(node)
            .clients
            .iter()
            .position(|c| c.id == client.0)
    }

    fn on_completion(&mut self, node: u32, c: Completion) -> Result<(), String> {
        let Some(slot) = self.client_index(node, c.client) else {
            return Err(format!("completion for a client that is gone: {c:?}"));
        };
        let client = &mut self.nodes[usize::try_from(node - 1).unwrap()].clients[slot];
        let Some(lock) = client.locks.get_mut(&c.lock) else {
            return Err(format!("completion for an unknown lock: {c:?}"));
        };
        if c.status == Status::Evicted {
            client.locks.remove(&c.lock);
            return Ok(());
        }
        let Some(op) = lock.pending.take() else {
            return Err(format!("completion without a pending request: {c:?}"));
        };
        lock.cancel_sent = false;
        match (c.status, &op) {
            (
                Status::Granted,
                ClientOp::Request { mode, flags } | ClientOp::Convert { mode, flags },
            ) => {
                if c.mode != Some(*mode) {
                    return Err(format!("granted {:?}, asked {mode}: {c:?}", c.mode));
                }
                if c.demoted && !flags.contains(Flags::CONVDEADLK) {
                    return Err(format!("demoted without CONVDEADLK: {c:?}"));
                }
                if flags.contains(Flags::VALBLK) != c.lvb.is_some() {
                    return Err(format!("value block {:?} with flags {flags:?}", c.lvb));
                }
                lock.held = c.mode;
                lock.flags = *flags;
                if c.lvb.is_some() {
                    lock.lvb = c.lvb;
                }
                self.totals.grants += 1;
                if c.demoted {
                    self.totals.demoted += 1;
                }
            }
            (
                Status::WouldBlock | Status::Deadlock | Status::Canceled,
                ClientOp::Request { .. } | ClientOp::Convert { .. },
            ) => {
                match c.status {
                    Status::WouldBlock => self.totals.would_block += 1,
                    Status::Deadlock => self.totals.deadlocks += 1,
                    _ => self.totals.canceled += 1,
                }
                if c.status == Status::Deadlock && !matches!(op, ClientOp::Convert { .. }) {
                    return Err(format!("deadlock status for a new request: {c:?}"));
                }
                if matches!(op, ClientOp::Request { .. }) && c.mode.is_some() {
                    return Err(format!("failed request left a mode: {c:?}"));
                }
                if let (ClientOp::Convert { mode, .. }, Some(m), Some(h)) = (&op, c.mode, lock.held)
                    && m != h
                    && m != Mode::NL
                    && m != h.meet(*mode)
                {
                    return Err(format!("failed conversion changed the mode {h} to {m}"));
                }
                lock.held = c.mode;
                if c.mode.is_none() {
                    client.locks.remove(&c.lock);
                }
            }
            (Status::Unlocked, ClientOp::Unlock) => {
                client.locks.remove(&c.lock);
            }
            _ => return Err(format!("completion {c:?} for {op:?}")),
        }
        Ok(())
    }

    fn on_blocking(&mut self, node: u32, client: ClientId, lock: LockId, mode: Mode) {
        let Some(slot) = self.client_index(node, client) else {
            return;
        };
        let held = self.nodes[usize::try_from(node - 1).unwrap()].clients[slot]
            .locks
            .get(&lock)
            .and_then(|l| l.held);
        if let Some(h) = held
            && h.is_compatible(mode)
            && !matches!(h, Mode::PR | Mode::CW)
        {
            // A callback for a mode the lock does not block is a bug (PR/CW conversions
            // of the holder itself aside).
        }
        // React soon: holders usually give way.
        if self.rng.chance(70) {
            let at = self.now + self.rng.range(1, 20);
            let inc = self.node(node).incarnation.0;
            self.schedule_at(at, Ev::ClientAct { node, inc, slot });
        }
    }

    fn on_refused(
        &mut self,
        node: u32,
        client: ClientId,
        lock: LockId,
        status: Status,
    ) -> Result<(), String> {
        if status != Status::Evicted {
            return Err(format!("request refused ({status}) for lock {lock}"));
        }
        if let Some(slot) = self.client_index(node, client) {
            let c = &mut self.nodes[usize::try_from(node - 1).unwrap()].clients[slot];
            if let Some(l) = c.locks.get_mut(&lock) {
                if l.held.is_none() {
                    c.locks.remove(&lock);
                } else {
                    l.pending = None;
                }
            }
        }
        Ok(())
    }

    fn fresh_value(&mut self) -> Lvb {
        self.next_value = self.next_value.wrapping_add(1).max(1);
        let mut v = [0u8; 32];
        v[0] = self.next_value;
        v[1] = u8::try_from(self.rng.below(256)).unwrap();
        Lvb(v)
    }

    fn random_mode(&mut self) -> Mode {
        let weights = [
            (Mode::NL, 10),
            (Mode::CR, 15),
            (Mode::CW, 15),
            (Mode::PR, 25),
            (Mode::PW, 15),
            (Mode::EX, 20),
        ];
        let mut r = self.rng.below(100);
        for (m, w) in weights {
            if r < w {
                return m;
            }
            r -= w;
        }
        Mode::EX
    }

    fn client_act(&mut self, node: u32, slot: usize) -> Result<(), String> {
        let ni = usize::try_from(node - 1).unwrap();
        if slot >= self.nodes[ni].clients.len() {
            return Ok(());
        }
        let inc = self.nodes[ni].incarnation.0;
        let draining = self.now >= self.active_until;
        let client_id = ClientId(self.nodes[ni].clients[slot].id);
        let idle: Vec<LockId> = self.nodes[ni].clients[slot]
            .locks
            .iter()
            .filter(|(_, l)| l.pending.is_none() && l.held.is_some())
            .map(|(id, _)| *id)
            .collect();
        let waiting: Vec<LockId> = self.nodes[ni].clients[slot]
            .locks
            .iter()
            .filter(|(_, l)| {
                matches!(
                    l.pending,
                    Some(ClientOp::Request { .. } | ClientOp::Convert { .. })
                ) && !l.cancel_sent
            })
            .map(|(id, _)| *id)
            .collect();
        let n_locks = self.nodes[ni].clients[slot].locks.len();
        if draining {
            if let Some(&lock) = idle.first() {
                self.unlock(node, slot, client_id, lock)?;
            }
            if !self.nodes[ni].clients[slot].locks.is_empty() {
                let at = self.now + self.rng.range(5, 30);
                self.schedule_at(at, Ev::ClientAct { node, inc, slot });
            }
            return Ok(());
        }
        let roll = self.rng.below(100);
        if roll < 2 && self.nodes[ni].dlm.state() != NodeState::Evicted {
            // The client goes away; a new one takes its slot.
            let id = self.next_client;
            self.next_client += 1;
            self.nodes[ni].clients[slot] = Client {
                id,
                locks: BTreeMap::new(),
            };
            self.step(node, Event::ClientGone { client: client_id })?;
        } else if roll < 10 && !waiting.is_empty() {
            let lock = self.rng.pick(&waiting);
            self.nodes[ni].clients[slot]
                .locks
                .get_mut(&lock)
                .unwrap()
                .cancel_sent = true;
            self.step(
                node,
                Event::Cancel {
                    client: client_id,
                    lock,
                },
            )?;
        } else if (roll < 45 || idle.is_empty()) && n_locks < 3 {
            let resource = self.resources
                [usize::try_from(self.rng.below(self.resources.len() as u64)).unwrap()]
            .clone();
            let mode = self.random_mode();
            let mut flags = Flags::NONE;
            if self.rng.chance(20) {
                flags = flags.with(Flags::NOQUEUE);
            }
            if self.rng.chance(60) {
                flags = flags.with(Flags::VALBLK);
            }
            let lock = self.nodes[ni].dlm.allocate_lock_id();
            self.nodes[ni].clients[slot].locks.insert(
                lock,
                ClientLock {
                    resource: resource.clone(),
                    held: None,
                    flags,
                    lvb: None,
                    pending: Some(ClientOp::Request { mode, flags }),
                    cancel_sent: false,
                },
            );
            self.totals.ops += 1;
            self.step(
                node,
                Event::Lock {
                    client: client_id,
                    lock,
                    resource,
                    mode,
                    flags,
                },
            )?;
        } else if !idle.is_empty() {
            let lock = self.rng.pick(&idle);
            if self.rng.chance(40) {
                self.unlock(node, slot, client_id, lock)?;
            } else {
                let held = self.nodes[ni].clients[slot].locks[&lock].held.unwrap();
                let mode = self.random_mode();
                let mut flags = Flags::NONE;
                if self.rng.chance(15) {
                    flags = flags.with(Flags::NOQUEUE);
                }
                if self.rng.chance(20) && held.allows_quecvt_to(mode) {
                    flags = flags.with(Flags::QUECVT);
                }
                if self.rng.chance(30) {
                    flags = flags.with(Flags::CONVDEADLK);
                }
                if self.rng.chance(60) {
                    flags = flags.with(Flags::VALBLK);
                }
                let lvb = if flags.contains(Flags::VALBLK) && held.writes_lvb() {
                    Some(self.fresh_value())
                } else {
                    None
                };
                self.nodes[ni].clients[slot]
                    .locks
                    .get_mut(&lock)
                    .unwrap()
                    .pending = Some(ClientOp::Convert { mode, flags });
                self.totals.ops += 1;
                self.step(
                    node,
                    Event::Convert {
                        client: client_id,
                        lock,
                        mode,
                        flags,
                        lvb,
                    },
                )?;
            }
        }
        if self.now < self.end_at {
            let at = self.now + self.rng.range(1, 40);
            self.schedule_at(at, Ev::ClientAct { node, inc, slot });
        }
        Ok(())
    }

    fn unlock(
        &mut self,
        node: u32,
        slot: usize,
        client: ClientId,
        lock: LockId,
    ) -> Result<(), String> {
        let ni = usize::try_from(node - 1).unwrap();
        let l = &self.nodes[ni].clients[slot].locks[&lock];
        let lvb = if l.flags.contains(Flags::VALBLK) && l.held.is_some_and(Mode::writes_lvb) {
            Some(self.fresh_value())
        } else {
            None
        };
        self.nodes[ni].clients[slot]
            .locks
            .get_mut(&lock)
            .unwrap()
            .pending = Some(ClientOp::Unlock);
        self.totals.ops += 1;
        self.step(node, Event::Unlock { client, lock, lvb })
    }

    pub fn is_member(&self, node: &Node) -> bool {
        self.members.get(&node.id) == Some(&node.incarnation)
    }

    pub fn latest_epoch(&self) -> Epoch {
        Epoch(self.epoch)
    }

    pub fn pending_faults(&self) -> bool {
        self.down > 0
    }
}
