//! Recovery after a membership change.
//!
//! ```text
//!  Membership(e) ─► stop (requests and peer messages wait), purge departed owners' locks
//!       │           from mastered resources, settle own locks whose master departed
//!       ▼
//!  all departed nodes fenced? ─► RecoverStop{e, completed} to every member
//!       ▼ (RecoverStop from every member)
//!  resolve earlier unfinished rounds (commit if any member completed them, else drop);
//!  RecoverMaster{e, r} to r's new directory node for each resource mastered here;
//!  RecoverLock{e, ..} for each granted lock whose master departed, to the resource's
//!  directory node, which becomes its new master; then RecoverDone{e} to every member
//!       ▼ (RecoverDone from every member)
//!  install remastered resources (value block recovered), new directory, grant, resend
//!  waiting requests, handle queued messages, run.
//! ```
//!
//! A round is committed by a node when it has every member's RecoverDone. A new
//! membership may interrupt a round after some nodes committed it: their RecoverStop of
//! the next round carries `completed`, and since committing needs everybody's
//! RecoverDone, all members had sent all their RecoverLocks of that round (FIFO, before
//! the next RecoverStop); so every node commits the same rounds and drops the same ones.

use std::collections::BTreeMap;

use super::{Dlm, Message, NodeState, Reply, Round};
use crate::mode::{LvbOp, Mode};
use crate::resource::{RecoveredLock, Resource};
use crate::types::{Epoch, Flags, Incarnation, LockId, NodeId, Status};

use super::owner::Pending;

impl Dlm {
    pub(super) fn on_membership(&mut self, epoch: Epoch, members: BTreeMap<NodeId, Incarnation>) {
        if epoch <= self.epoch || self.state == NodeState::Evicted {
            return;
        }
        if members.get(&self.me) != Some(&self.incarnation) {
            if self.state == NodeState::Joining {
                // Not added yet.
                self.epoch = epoch;
                return;
            }
            self.evict();
            return;
        }
        let lost: Vec<(NodeId, Incarnation)> = self
            .members
            .iter()
            .filter(|(n, inc)| members.get(n) != Some(inc))
            .map(|(n, inc)| (*n, *inc))
            .collect();
        self.epoch = epoch;
        self.members = members;
        self.member_list = self.members.keys().copied().collect();
        self.state = NodeState::Recovering;
        self.stop_sent = false;
        self.stops.clear();
        self.phase1_done = false;
        self.dones.clear();
        self.directory.clear();
        for l in &lost {
            if !self.fenced.contains(l) {
                self.unfenced.insert(*l);
            }
        }
        let lost_nodes: Vec<NodeId> = lost.iter().map(|(n, _)| *n).collect();
        if !lost_nodes.is_empty() {
            // Departed owners' locks go now; nothing is granted before they are fenced.
            for res in self.mastered.values_mut() {
                res.purge(|n| lost_nodes.contains(&n));
            }
            for round in self.rounds.values_mut() {
                for locks in round.locks.values_mut() {
                    locks.retain(|l| !lost_nodes.contains(&l.owner));
                }
            }
            self.cache.retain(|_, e| !lost_nodes.contains(&e.master));
            self.queued.retain(|(from, _)| !lost_nodes.contains(from));
            // Own locks whose master departed are settled after fencing (phase 1): a
            // canceled conversion must not fall back to its old mode while the dead
            // master's other holders may still act.
            self.lost.extend(lost.iter().copied());
        }
        // Lookups of the old epoch get no answer: their locks are routed again later.
        for (_, waiting) in self.lookups.drain() {
            for lock in waiting {
                if let Some(l) = self.locks.get_mut(&lock) {
                    l.sent = false;
                }
            }
        }
        let future = std::mem::take(&mut self.future);
        for (from, inc, message) in future {
            match message.recovery_epoch() {
                Some(e) if e == epoch => self.loopback_from(from, inc, message),
                Some(e) if e > epoch => self.future.push((from, inc, message)),
                _ => {}
            }
        }
        self.try_progress();
    }

    fn loopback_from(&mut self, from: NodeId, inc: Incarnation, message: Message) {
        if self.members.get(&from) == Some(&inc) {
            self.on_recovery_message(from, message);
        }
    }

    /// Own locks whose master departed: what was sent there is settled now. A release
    /// or down-conversion is done (it can only succeed); a cancel takes effect; a new
    /// request or up-conversion will be sent again; granted locks go to a new master.
    fn settle_lost_masters(&mut self, lost: &[(NodeId, Incarnation)]) {
        let affected: Vec<LockId> = self
            .locks
            .iter()
            .filter(|(_, l)| {
                l.master.is_some_and(|m| lost.contains(&(m, l.master_inc)))
                    || l.tentative
                        .is_some_and(|(_, t, ti)| lost.contains(&(t, ti)))
            })
            .map(|(id, _)| *id)
            .collect();
        for lock in affected {
            let Some(l) = self.locks.get_mut(&lock) else {
                continue;
            };
            if l.tentative
                .is_some_and(|(_, t, ti)| lost.contains(&(t, ti)))
            {
                l.tentative = None;
            }
            if !l.master.is_some_and(|m| lost.contains(&(m, l.master_inc))) {
                continue;
            }
            l.master = None;
            l.sent = false;
            let cancel = l.cancel != super::CancelState::None;
            match l.pending.clone() {
                Some(Pending::Request { .. }) if cancel => {
                    self.finish_op(
                        lock,
                        Reply::Failed {
                            status: Status::Canceled,
                            mode: None,
                        },
                    );
                }
                None | Some(Pending::Request { .. }) => {}
                Some(Pending::Unlock { .. }) => self.finish_op(lock, Reply::Unlocked),
                Some(Pending::Convert { mode, flags, lvb }) => {
                    let g = l.grmode.unwrap_or(Mode::NL);
                    if g.is_down_to(mode) {
                        // Granted without the master: the copy is what this node knows
                        // (invalid if it never read one).
                        let mut copy = None;
                        if flags.contains(Flags::VALBLK) {
                            // The copy is current only if the last grant read it and the
                            // lock stayed at CW or above since (no writer could run).
                            let current = l.flags.contains(Flags::VALBLK) && g >= Mode::CW;
                            let mut c = l.lvb.unwrap_or_default();
                            c.valid &= current;
                            if Mode::lvb_op(Some(g), mode) == LvbOp::Write
                                && let Some(v) = lvb
                            {
                                c.value = v;
                                c.seq = c.seq.wrapping_add(1);
                            }
                            copy = Some(c);
                        }
                        self.finish_op(
                            lock,
                            Reply::Granted {
                                mode,
                                lvb: copy,
                                demoted: false,
                            },
                        );
                    } else {
                        // The dead master may have granted the conversion, or demoted
                        // the lock to NL (CONVDEADLK) while it waited: keep only what
                        // every outcome allows.
                        let left = if flags.contains(Flags::CONVDEADLK) {
                            Mode::NL
                        } else {
                            g.meet(mode)
                        };
                        if cancel {
                            self.finish_op(
                                lock,
                                Reply::Failed {
                                    status: Status::Canceled,
                                    mode: Some(left),
                                },
                            );
                        } else if let Some(l) = self.locks.get_mut(&lock) {
                            l.grmode = Some(left);
                        }
                    }
                }
            }
        }
    }

    fn evict(&mut self) {
        self.state = NodeState::Evicted;
        let ids: Vec<LockId> = self.locks.keys().copied().collect();
        for lock in ids {
            if let Some(l) = self.locks.get_mut(&lock) {
                l.pending = None;
                l.sent = false;
                l.cancel = super::CancelState::None;
            }
            self.complete(lock, Status::Evicted, false);
        }
        self.locks.clear();
        self.mastered.clear();
        self.directory.clear();
        self.cache.clear();
        self.lookups.clear();
        self.queued.clear();
        self.rounds.clear();
    }

    pub(super) fn on_fence_confirmed(&mut self, node: NodeId, incarnation: Incarnation) {
        self.fenced.insert((node, incarnation));
        self.unfenced.remove(&(node, incarnation));
        self.try_progress();
    }

    pub(super) fn on_recovery_message(&mut self, from: NodeId, message: Message) {
        match message {
            Message::RecoverStop { epoch, completed } if epoch == self.epoch => {
                self.stops.insert(from, completed);
            }
            Message::RecoverDone { epoch } if epoch == self.epoch => {
                self.dones.insert(from);
            }
            Message::RecoverMaster { epoch, resource } if epoch == self.epoch => {
                let round = self.rounds.entry(epoch).or_default();
                if let Some(other) = round.masters.insert(resource.clone(), from)
                    && other != from
                {
                    self.problems.push(format!(
                        "two masters registered for {resource}: {other} and {from}"
                    ));
                }
            }
            Message::RecoverLock {
                epoch,
                resource,
                lock,
                mode,
                flags,
                lvb,
            } if epoch <= self.epoch && epoch >= self.resolved_below => {
                self.rounds
                    .entry(epoch)
                    .or_default()
                    .locks
                    .entry(resource)
                    .or_default()
                    .push(RecoveredLock {
                        owner: from,
                        id: lock,
                        mode,
                        flags,
                        lvb,
                    });
            }
            _ => return,
        }
        self.try_progress();
    }

    fn try_progress(&mut self) {
        if self.state != NodeState::Recovering {
            return;
        }
        if !self.stop_sent {
            if !self.unfenced.is_empty() {
                return;
            }
            self.stop_sent = true;
            let epoch = self.epoch;
            let completed = self.completed;
            self.broadcast(Message::RecoverStop { epoch, completed });
            return;
        }
        if !self.phase1_done {
            if !self.member_list.iter().all(|m| self.stops.contains_key(m)) {
                return;
            }
            self.phase1_done = true;
            self.phase1();
            return;
        }
        if self.member_list.iter().all(|m| self.dones.contains(m)) {
            self.finish();
        }
    }

    fn phase1(&mut self) {
        let epoch = self.epoch;
        let highest_completed = self.stops.values().copied().max().unwrap_or_default();
        // Resolve unfinished earlier rounds the same way on every node.
        let earlier: Vec<Epoch> = self.rounds.range(..epoch).map(|(e, _)| *e).collect();
        for round in earlier {
            if round <= highest_completed {
                self.commit_round(round);
            } else {
                self.rounds.remove(&round);
            }
        }
        let tentative: Vec<LockId> = self
            .locks
            .iter()
            .filter(|(_, l)| l.tentative.is_some_and(|(e, _, _)| e < epoch))
            .map(|(id, _)| *id)
            .collect();
        for lock in tentative {
            if let Some(l) = self.locks.get_mut(&lock)
                && let Some((round, target, target_inc)) = l.tentative.take()
                && round <= highest_completed
                && !self.lost.contains(&(target, target_inc))
            {
                l.master = Some(target);
                l.master_inc = target_inc;
            }
        }
        if highest_completed > self.completed {
            self.completed = highest_completed;
        }
        self.resolved_below = epoch;
        let lost: Vec<(NodeId, Incarnation)> = self.lost.iter().copied().collect();
        self.settle_lost_masters(&lost);
        // Directory registrations.
        let keys: Vec<_> = self.mastered.keys().cloned().collect();
        for resource in keys {
            if let Some(dir) = self.directory_node(&resource) {
                self.send(dir, Message::RecoverMaster { epoch, resource });
            }
        }
        // Granted locks without a master go to the resource's directory node.
        let orphaned: Vec<LockId> = self
            .locks
            .iter()
            .filter(|(_, l)| l.grmode.is_some() && l.master.is_none())
            .map(|(id, _)| *id)
            .collect();
        for lock in orphaned {
            let Some(l) = self.locks.get(&lock) else {
                continue;
            };
            let Some(target) = self.directory_node(&l.resource) else {
                continue;
            };
            let target_inc = self.members.get(&target).copied().unwrap_or_default();
            let message = Message::RecoverLock {
                epoch,
                resource: l.resource.clone(),
                lock,
                mode: l.grmode.unwrap_or(Mode::NL),
                flags: l.flags,
                lvb: l.lvb,
            };
            if let Some(l) = self.locks.get_mut(&lock) {
                l.tentative = Some((epoch, target, target_inc));
            }
            self.send(target, message);
        }
        self.broadcast(Message::RecoverDone { epoch });
    }

    /// Installs the resources remastered here in `round`.
    fn commit_round(&mut self, round: Epoch) {
        let Some(data) = self.rounds.remove(&round) else {
            return;
        };
        let Round { locks, .. } = data;
        for (resource, recovered) in locks {
            let recovered: Vec<RecoveredLock> = recovered
                .into_iter()
                .filter(|l| self.members.contains_key(&l.owner))
                .collect();
            if recovered.is_empty() {
                continue;
            }
            if self.mastered.contains_key(&resource) {
                self.problems
                    .push(format!("{resource} remastered here but already mastered"));
                continue;
            }
            self.mastered
                .insert(resource, Resource::recovered(recovered));
        }
    }

    fn finish(&mut self) {
        let epoch = self.epoch;
        let masters = self
            .rounds
            .get(&epoch)
            .map(|r| r.masters.clone())
            .unwrap_or_default();
        self.commit_round(epoch);
        let older: Vec<Epoch> = self.rounds.range(..=epoch).map(|(e, _)| *e).collect();
        for e in older {
            self.rounds.remove(&e);
        }
        for l in self.locks.values_mut() {
            if let Some((round, target, target_inc)) = l.tentative
                && round == epoch
            {
                l.tentative = None;
                l.master = Some(target);
                l.master_inc = target_inc;
            }
        }
        self.directory = masters;
        let me = self.me;
        let mine: Vec<_> = self
            .mastered
            .keys()
            .filter(|k| self.directory_node(k) == Some(me))
            .cloned()
            .collect();
        for key in mine {
            self.directory.insert(key, me);
        }
        self.completed = epoch;
        self.lost.clear();
        self.state = NodeState::Running;
        self.grant_all();
        // Requests that waited, in lock order (oldest first).
        let mut waiting: Vec<LockId> = self
            .locks
            .iter()
            .filter(|(_, l)| l.pending.is_some() && !l.sent)
            .map(|(id, _)| *id)
            .collect();
        waiting.sort();
        for lock in waiting {
            self.dispatch(lock);
            self.continue_orphan(lock);
        }
        let mut cancels: Vec<LockId> = self
            .locks
            .iter()
            .filter(|(_, l)| l.cancel == super::CancelState::Wanted)
            .map(|(id, _)| *id)
            .collect();
        cancels.sort();
        for lock in cancels {
            if let Some(l) = self.locks.get_mut(&lock) {
                l.cancel = super::CancelState::None;
            }
            self.cancel_pending(lock);
        }
        while self.state == NodeState::Running
            && let Some((from, message)) = self.queued.pop_front()
        {
            self.on_normal_message(from, message);
        }
    }
}
