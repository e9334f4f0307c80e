//! The lock manager's sans-IO core: one [`Dlm`] per node, driven by [`Dlm::step`].
//!
//! ```text
//!   Event::Lock/Convert/Unlock/Cancel/ClientGone   (local clients)
//!   Event::Message { from, incarnation, message }   (peers, in per-peer FIFO order)
//!   Event::Membership { epoch, members }            (cluster layer)
//!   Event::FenceConfirmed { node, incarnation }     (cluster layer, after fencing)
//!   Event::Tick { now_ms }                          (timer)
//!                │
//!                ▼
//!          Dlm::step ──► Vec<Action>:  Send { to, message }   (to a peer, in order)
//!                                      Complete(Completion)   (request ended)
//!                                      Blocking { .. }        (blocking callback)
//!                                      Refused { .. }         (request not accepted)
//! ```
//!
//! Roles of a node for a resource: *owner* of its clients' locks (`owner.rs`), *master*
//! of the resources it was first to request (`master.rs`, queues in [`Resource`]),
//! *directory* of the names that hash to it. Every membership change runs a recovery
//! (`recovery.rs`): stop, wait for fencing of departed nodes, barrier, rebuild the
//! directory, remaster resources whose master departed from the owners' copies, barrier,
//! resume. The core keeps nothing durable: lock state is rebuilt from survivors.
//!
//! The shell must deliver each peer's messages in order and without loss for as long as
//! that peer incarnation stays a member (TCP plus resend after reconnect), and must feed
//! membership changes and fence confirmations from the cluster log.

mod master;
mod owner;
mod recovery;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::hash::Map;

use crate::mode::Mode;
use crate::resource::{RecoveredLock, Resource};
use crate::types::{
    ClientId, Epoch, Flags, Incarnation, LockId, Lvb, LvbCopy, NodeId, ResourceKey, Status,
};

pub use owner::{CancelState, OwnLock, Pending};

/// Tunables of the core.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// An unused resource stays mastered (and cached by others) this long before it is
    /// released, so repeated locking of one name stays cheap.
    pub toss_ms: u64,
}

impl Default for Config {
    fn default() -> Config {
        Config { toss_ms: 10_000 }
    }
}

/// Input of the core.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A new lock. `lock` comes from [`Dlm::allocate_lock_id`].
    Lock {
        /// The client asking.
        client: ClientId,
        /// The new lock's id.
        lock: LockId,
        /// Lock space and name.
        resource: ResourceKey,
        /// Requested mode.
        mode: Mode,
        /// NOQUEUE, VALBLK (CONVERT and QUECVT are refused here).
        flags: Flags,
    },
    /// A conversion of a granted lock (flag CONVERT implied).
    Convert {
        /// The client owning the lock.
        client: ClientId,
        /// The lock.
        lock: LockId,
        /// Requested mode.
        mode: Mode,
        /// NOQUEUE, QUECVT, CONVDEADLK, VALBLK.
        flags: Flags,
        /// Value block to write if the conversion goes down from PW or EX with VALBLK
        /// (None: the lock's current copy).
        lvb: Option<Lvb>,
    },
    /// Release a granted lock; `lvb` is written if the lock holds PW or EX.
    Unlock {
        /// The client owning the lock.
        client: ClientId,
        /// The lock.
        lock: LockId,
        /// Value block to write.
        lvb: Option<Lvb>,
    },
    /// Cancel a waiting request or conversion.
    Cancel {
        /// The client owning the lock.
        client: ClientId,
        /// The lock.
        lock: LockId,
    },
    /// The client went away: cancel and release all its locks, without callbacks.
    ClientGone {
        /// The client.
        client: ClientId,
    },
    /// A peer's message, in the order the peer sent it.
    Message {
        /// Sender.
        from: NodeId,
        /// Sender's incarnation (from the connection handshake).
        incarnation: Incarnation,
        /// The message.
        message: Message,
    },
    /// A new membership (from the cluster log). Epochs increase.
    Membership {
        /// Its epoch.
        epoch: Epoch,
        /// Members and their incarnations.
        members: BTreeMap<NodeId, Incarnation>,
    },
    /// A departed node's incarnation is fenced: it can no longer act on its locks.
    FenceConfirmed {
        /// The node.
        node: NodeId,
        /// Its fenced incarnation.
        incarnation: Incarnation,
    },
    /// Time passes (milliseconds on any monotonic clock).
    Tick {
        /// Now.
        now_ms: u64,
    },
}

/// Output of the core, to be carried out in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a message to a peer (in order, reliably, while it stays a member).
    Send {
        /// Destination.
        to: NodeId,
        /// The message.
        message: Message,
    },
    /// A request ended (completion callback).
    Complete(Completion),
    /// A granted lock blocks a request for `mode` (blocking callback).
    Blocking {
        /// Owner of the lock.
        client: ClientId,
        /// The lock.
        lock: LockId,
        /// The mode waiting.
        mode: Mode,
    },
    /// A request was not accepted; the lock is as it was.
    Refused {
        /// The client.
        client: ClientId,
        /// The lock named in the request.
        lock: LockId,
        /// Why (invalid, busy, evicted).
        status: Status,
    },
}

/// A completion callback.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Owner of the lock.
    pub client: ClientId,
    /// The lock.
    pub lock: LockId,
    /// How the request ended.
    pub status: Status,
    /// The mode the lock is granted in now (None: the lock no longer exists).
    pub mode: Option<Mode>,
    /// The value block, for VALBLK requests that were granted.
    pub lvb: Option<LvbCopy>,
    /// CONVDEADLK demoted the lock to NL while the conversion waited.
    pub demoted: bool,
}

/// A master's answer about one lock.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Granted.
    Granted {
        /// Granted mode.
        mode: Mode,
        /// Value block (VALBLK requests).
        lvb: Option<LvbCopy>,
        /// Demoted by CONVDEADLK while waiting.
        demoted: bool,
    },
    /// Ended without a grant.
    Failed {
        /// Why.
        status: Status,
        /// Mode still granted (None: lock gone).
        mode: Option<Mode>,
    },
    /// Released.
    Unlocked,
    /// This node does not master the resource (look it up again).
    NotMaster,
}

/// Messages between nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Owner → directory: who masters `resource`? (The first asker becomes master.)
    Lookup {
        /// Sender's epoch.
        epoch: Epoch,
        /// Resource.
        resource: ResourceKey,
    },
    /// Directory → owner.
    LookupReply {
        /// Epoch of the lookup.
        epoch: Epoch,
        /// Resource.
        resource: ResourceKey,
        /// Its master.
        master: NodeId,
    },
    /// Master → directory: the resource was released.
    Remove {
        /// Sender's epoch.
        epoch: Epoch,
        /// Resource.
        resource: ResourceKey,
    },
    /// Owner → master: new lock.
    Request {
        /// Resource.
        resource: ResourceKey,
        /// Owner's lock id.
        lock: LockId,
        /// Mode.
        mode: Mode,
        /// Flags.
        flags: Flags,
    },
    /// Owner → master: conversion.
    Convert {
        /// Resource.
        resource: ResourceKey,
        /// Lock.
        lock: LockId,
        /// Mode.
        mode: Mode,
        /// Flags.
        flags: Flags,
        /// Value to write (down from PW/EX with VALBLK).
        lvb: Option<Lvb>,
    },
    /// Owner → master: release.
    Unlock {
        /// Resource.
        resource: ResourceKey,
        /// Lock.
        lock: LockId,
        /// Value to write (from PW/EX).
        lvb: Option<Lvb>,
    },
    /// Owner → master: cancel the pending request or conversion.
    Cancel {
        /// Resource.
        resource: ResourceKey,
        /// Lock.
        lock: LockId,
    },
    /// Master → owner: the result of a request.
    Reply {
        /// Lock.
        lock: LockId,
        /// Result.
        reply: Reply,
    },
    /// Master → owner: blocking callback.
    Blocking {
        /// Lock.
        lock: LockId,
        /// Mode waiting.
        mode: Mode,
    },
    /// Recovery barrier 1: stopped and departed nodes fenced.
    RecoverStop {
        /// Recovery epoch.
        epoch: Epoch,
        /// Last epoch whose recovery the sender completed.
        completed: Epoch,
    },
    /// Recovery: a granted lock for the resource's new master.
    RecoverLock {
        /// Recovery epoch.
        epoch: Epoch,
        /// Resource.
        resource: ResourceKey,
        /// Owner's lock id.
        lock: LockId,
        /// Granted mode.
        mode: Mode,
        /// Flags of its last request.
        flags: Flags,
        /// Its value block copy.
        lvb: Option<LvbCopy>,
    },
    /// Recovery: the sender masters `resource` (to the new directory node).
    RecoverMaster {
        /// Recovery epoch.
        epoch: Epoch,
        /// Resource.
        resource: ResourceKey,
    },
    /// Recovery barrier 2: all recovery messages of the sender are sent.
    RecoverDone {
        /// Recovery epoch.
        epoch: Epoch,
    },
}

impl Message {
    /// The recovery epoch of a recovery message.
    fn recovery_epoch(&self) -> Option<Epoch> {
        match self {
            Message::RecoverStop { epoch, .. }
            | Message::RecoverLock { epoch, .. }
            | Message::RecoverMaster { epoch, .. }
            | Message::RecoverDone { epoch } => Some(*epoch),
            _ => None,
        }
    }

    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Lookup { .. } => "lookup",
            Message::LookupReply { .. } => "lookup-reply",
            Message::Remove { .. } => "remove",
            Message::Request { .. } => "request",
            Message::Convert { .. } => "convert",
            Message::Unlock { .. } => "unlock",
            Message::Cancel { .. } => "cancel",
            Message::Reply { .. } => "reply",
            Message::Blocking { .. } => "blocking",
            Message::RecoverStop { .. } => "recover-stop",
            Message::RecoverLock { .. } => "recover-lock",
            Message::RecoverMaster { .. } => "recover-master",
            Message::RecoverDone { .. } => "recover-done",
        }
    }
}

/// Where the node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// No membership including this node yet: requests wait.
    Joining,
    /// Recovering after a membership change: requests wait.
    Recovering,
    /// Normal operation.
    Running,
    /// Removed from the membership: every request is refused.
    Evicted,
}

/// Data received for one recovery round.
#[derive(Debug, Default, Clone)]
struct Round {
    /// Locks sent to this node as the resource's new master.
    locks: Map<ResourceKey, Vec<RecoveredLock>>,
    /// Directory registrations (resource → its master).
    masters: Map<ResourceKey, NodeId>,
}

#[derive(Debug, Clone, Copy)]
struct CacheEntry {
    master: NodeId,
    used_ms: u64,
}

/// One node's lock manager.
#[derive(Debug)]
pub struct Dlm {
    me: NodeId,
    incarnation: Incarnation,
    config: Config,
    state: NodeState,
    epoch: Epoch,
    members: BTreeMap<NodeId, Incarnation>,
    member_list: Vec<NodeId>,
    now_ms: u64,
    next_lock: u64,
    locks: Map<LockId, OwnLock>,
    mastered: Map<ResourceKey, Resource>,
    directory: Map<ResourceKey, NodeId>,
    cache: Map<ResourceKey, CacheEntry>,
    lookups: Map<ResourceKey, Vec<LockId>>,
    // recovery
    unfenced: BTreeSet<(NodeId, Incarnation)>,
    lost: BTreeSet<(NodeId, Incarnation)>,
    fenced: BTreeSet<(NodeId, Incarnation)>,
    stop_sent: bool,
    stops: BTreeMap<NodeId, Epoch>,
    phase1_done: bool,
    dones: BTreeSet<NodeId>,
    completed: Epoch,
    resolved_below: Epoch,
    rounds: BTreeMap<Epoch, Round>,
    future: Vec<(NodeId, Incarnation, Message)>,
    queued: VecDeque<(NodeId, Message)>,
    loopback: VecDeque<Message>,
    problems: Vec<String>,
    out: Vec<Action>,
}

impl Dlm {
    /// A node that waits for its first membership.
    pub fn new(me: NodeId, incarnation: Incarnation, config: Config) -> Dlm {
        Dlm {
            me,
            incarnation,
            config,
            state: NodeState::Joining,
            epoch: Epoch(0),
            members: BTreeMap::new(),
            member_list: Vec::new(),
            now_ms: 0,
            next_lock: 1,
            locks: Map::default(),
            mastered: Map::default(),
            directory: Map::default(),
            cache: Map::default(),
            lookups: Map::default(),
            unfenced: BTreeSet::new(),
            lost: BTreeSet::new(),
            fenced: BTreeSet::new(),
            stop_sent: false,
            stops: BTreeMap::new(),
            phase1_done: false,
            dones: BTreeSet::new(),
            completed: Epoch(0),
            resolved_below: Epoch(0),
            rounds: BTreeMap::new(),
            future: Vec::new(),
            queued: VecDeque::new(),
            loopback: VecDeque::new(),
            problems: Vec::new(),
            out: Vec::new(),
        }
    }

    /// A fresh lock id for [`Event::Lock`] (never reused by this node incarnation).
    pub fn allocate_lock_id(&mut self) -> LockId {
        let id = LockId(self.next_lock);
        self.next_lock += 1;
        id
    }

    /// Feeds one event; returns the actions to carry out, in order.
    pub fn step(&mut self, event: Event) -> Vec<Action> {
        self.step_into(event);
        std::mem::take(&mut self.out)
    }

    /// Like [`Dlm::step`], appending the actions to `out` (saves an allocation).
    pub fn step_append(&mut self, event: Event, out: &mut Vec<Action>) {
        self.step_into(event);
        out.append(&mut self.out);
    }

    fn step_into(&mut self, event: Event) {
        match event {
            Event::Lock {
                client,
                lock,
                resource,
                mode,
                flags,
            } => self.on_lock(client, lock, resource, mode, flags),
            Event::Convert {
                client,
                lock,
                mode,
                flags,
                lvb,
            } => self.on_convert(client, lock, mode, flags, lvb),
            Event::Unlock { client, lock, lvb } => self.on_unlock(client, lock, lvb),
            Event::Cancel { client, lock } => self.on_cancel(client, lock),
            Event::ClientGone { client } => self.on_client_gone(client),
            Event::Message {
                from,
                incarnation,
                message,
            } => self.on_message(from, incarnation, message),
            Event::Membership { epoch, members } => self.on_membership(epoch, members),
            Event::FenceConfirmed { node, incarnation } => {
                self.on_fence_confirmed(node, incarnation)
            }
            Event::Tick { now_ms } => self.on_tick(now_ms),
        }
        while let Some(message) = self.loopback.pop_front() {
            let me = self.me;
            let inc = self.incarnation;
            self.on_message(me, inc, message);
        }
    }

    fn send(&mut self, to: NodeId, message: Message) {
        if to == self.me {
            self.loopback.push_back(message);
        } else {
            self.out.push(Action::Send { to, message });
        }
    }

    fn broadcast(&mut self, message: Message) {
        let members: Vec<NodeId> = self.member_list.clone();
        for m in members {
            self.send(m, message.clone());
        }
    }

    /// The directory node of a resource under the current membership.
    pub fn directory_node(&self, resource: &ResourceKey) -> Option<NodeId> {
        let n = self.member_list.len();
        if n == 0 {
            return None;
        }
        let idx = usize::try_from(resource.stable_hash()).unwrap_or(0) % n;
        self.member_list.get(idx).copied()
    }

    fn on_message(&mut self, from: NodeId, incarnation: Incarnation, message: Message) {
        if let Some(epoch) = message.recovery_epoch()
            && epoch > self.epoch
        {
            self.future.push((from, incarnation, message));
            return;
        }
        if self.members.get(&from) != Some(&incarnation) {
            // A departed node or an old incarnation: its messages no longer count.
            return;
        }
        if self.state == NodeState::Evicted {
            return;
        }
        if message.recovery_epoch().is_some() {
            self.on_recovery_message(from, message);
            return;
        }
        if self.state != NodeState::Running {
            self.queued.push_back((from, message));
            return;
        }
        self.on_normal_message(from, message);
    }

    fn on_normal_message(&mut self, from: NodeId, message: Message) {
        match message {
            Message::Lookup { epoch, resource } => self.on_lookup(from, epoch, resource),
            Message::LookupReply {
                epoch,
                resource,
                master,
            } => self.on_lookup_reply(epoch, resource, master),
            Message::Remove { epoch, resource } => self.on_remove(from, epoch, resource),
            Message::Request {
                resource,
                lock,
                mode,
                flags,
            } => self.on_remote_request(from, resource, lock, mode, flags),
            Message::Convert {
                resource,
                lock,
                mode,
                flags,
                lvb,
            } => self.on_remote_convert(from, resource, lock, mode, flags, lvb),
            Message::Unlock {
                resource,
                lock,
                lvb,
            } => self.on_remote_unlock(from, resource, lock, lvb),
            Message::Cancel { resource, lock } => self.on_remote_cancel(from, resource, lock),
            Message::Reply { lock, reply } => self.on_reply(from, lock, reply),
            Message::Blocking { lock, mode } => self.on_blocking(from, lock, mode),
            Message::RecoverStop { .. }
            | Message::RecoverLock { .. }
            | Message::RecoverMaster { .. }
            | Message::RecoverDone { .. } => {}
        }
    }

    fn on_tick(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        if self.state != NodeState::Running {
            return;
        }
        let now = self.now_ms;
        let toss = self.config.toss_ms;
        let mut released = Vec::new();
        for (key, res) in &mut self.mastered {
            if !res.is_empty() {
                res.idle_since_ms = None;
                continue;
            }
            match res.idle_since_ms {
                None => res.idle_since_ms = Some(now),
                Some(t) if now.saturating_sub(t) >= toss => released.push(key.clone()),
                Some(_) => {}
            }
        }
        for key in released {
            self.mastered.remove(&key);
            if let Some(dir) = self.directory_node(&key) {
                let epoch = self.epoch;
                self.send(
                    dir,
                    Message::Remove {
                        epoch,
                        resource: key,
                    },
                );
            }
        }
        let lookups = &self.lookups;
        self.cache
            .retain(|k, e| lookups.contains_key(k) || now.saturating_sub(e.used_ms) < toss);
    }

    // ----- inspection -----

    /// This node.
    pub fn node_id(&self) -> NodeId {
        self.me
    }

    /// Where the node is.
    pub fn state(&self) -> NodeState {
        self.state
    }

    /// The current membership epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The current members.
    pub fn members(&self) -> &BTreeMap<NodeId, Incarnation> {
        &self.members
    }

    /// Locks owned by this node's clients.
    pub fn own_locks(&self) -> impl Iterator<Item = (LockId, &OwnLock)> {
        self.locks.iter().map(|(id, l)| (*id, l))
    }

    /// One owned lock.
    pub fn own_lock(&self, lock: LockId) -> Option<&OwnLock> {
        self.locks.get(&lock)
    }

    /// Resources this node masters.
    pub fn mastered(&self) -> impl Iterator<Item = (&ResourceKey, &Resource)> {
        self.mastered.iter()
    }

    /// True if this node's clients own no locks and no resource it masters has any
    /// (empty resources may still be kept for a while, see [`Config::toss_ms`]).
    pub fn is_quiet(&self) -> bool {
        self.locks.is_empty() && self.mastered.values().all(Resource::is_empty)
    }

    /// Nodes this node still waits a fence confirmation for.
    pub fn unfenced(&self) -> Vec<NodeId> {
        self.unfenced.iter().map(|(n, _)| *n).collect()
    }

    /// Checks the node's invariants (the simulator calls this after every step).
    pub fn check_invariants(&self) -> Result<(), String> {
        if let Some(p) = self.problems.first() {
            return Err(format!("node {}: {p}", self.me));
        }
        for (key, res) in &self.mastered {
            res.check()
                .map_err(|e| format!("node {} resource {key}: {e}", self.me))?;
        }
        for (id, lock) in &self.locks {
            lock.check()
                .map_err(|e| format!("node {} lock {id}: {e}", self.me))?;
            if lock.sent && lock.master.is_none() {
                return Err(format!("node {} lock {id}: sent without a master", self.me));
            }
        }
        if self.state == NodeState::Running {
            if !self.unfenced.is_empty() {
                return Err(format!("node {} running with unfenced nodes", self.me));
            }
            if !self.queued.is_empty() {
                return Err(format!("node {} running with queued messages", self.me));
            }
            for key in self.directory.keys() {
                if self.directory_node(key) != Some(self.me) {
                    return Err(format!(
                        "node {} holds a directory entry for {key}",
                        self.me
                    ));
                }
            }
            for (id, lock) in &self.locks {
                if lock.grmode.is_some() && lock.master.is_none() {
                    return Err(format!(
                        "node {} lock {id}: granted without a master",
                        self.me
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "core_test.rs"]
mod tests;
