//! The master and directory roles: requests from owners applied to the resource queues,
//! outcomes sent back; lookups answered from the directory (first asker masters).

use super::{Dlm, Message, Reply};
use crate::mode::Mode;
use crate::resource::{Outcome, Resource};
use crate::types::{Epoch, Flags, LockId, Lvb, NodeId, ResourceKey};

impl Dlm {
    /// Delivers outcomes of a resource operation to the locks' owners.
    pub(super) fn deliver(&mut self, outcomes: Vec<Outcome>) {
        for o in outcomes {
            let (owner, id, reply) = match o {
                Outcome::Granted {
                    owner,
                    id,
                    mode,
                    lvb,
                    demoted,
                } => (owner, id, Reply::Granted { mode, lvb, demoted }),
                Outcome::Failed {
                    owner,
                    id,
                    status,
                    mode,
                } => (owner, id, Reply::Failed { status, mode }),
                // A remote owner completed its unlock when it sent it (see
                // `Dlm::dispatch`): the release needs no answer.
                Outcome::Unlocked { owner, .. } if owner != self.me => continue,
                Outcome::Unlocked { owner, id } => (owner, id, Reply::Unlocked),
                // A cancel that missed needs no answer: the request it was for has
                // completed (or will), and the owner clears its cancel then.
                Outcome::CancelMissed { .. } => continue,
                Outcome::Blocking { owner, id, mode } => {
                    if owner == self.me {
                        let me = self.me;
                        self.on_blocking(me, id, mode);
                    } else {
                        self.send(owner, Message::Blocking { lock: id, mode });
                    }
                    continue;
                }
            };
            if owner == self.me {
                let me = self.me;
                self.on_reply(me, id, reply);
            } else {
                self.send(owner, Message::Reply { lock: id, reply });
            }
        }
    }

    fn with_resource(
        &mut self,
        resource: &ResourceKey,
        f: impl FnOnce(&mut Resource, &mut Vec<Outcome>),
    ) -> bool {
        let mut outcomes = Vec::new();
        match self.mastered.get_mut(resource) {
            Some(res) => {
                f(res, &mut outcomes);
                self.deliver(outcomes);
                true
            }
            None => false,
        }
    }

    pub(super) fn local_request(
        &mut self,
        lock: LockId,
        resource: ResourceKey,
        mode: Mode,
        flags: Flags,
    ) {
        let me = self.me;
        if !self.with_resource(&resource, |r, out| r.request(me, lock, mode, flags, out)) {
            self.problems
                .push(format!("local request on unmastered {resource}"));
        }
    }

    pub(super) fn local_convert(
        &mut self,
        lock: LockId,
        resource: ResourceKey,
        mode: Mode,
        flags: Flags,
        lvb: Option<Lvb>,
    ) {
        let me = self.me;
        if !self.with_resource(&resource, |r, out| {
            r.convert(me, lock, mode, flags, lvb, out)
        }) {
            self.problems
                .push(format!("local convert on unmastered {resource}"));
        }
    }

    pub(super) fn local_unlock(&mut self, lock: LockId, resource: ResourceKey, lvb: Option<Lvb>) {
        let me = self.me;
        if !self.with_resource(&resource, |r, out| r.unlock(me, lock, lvb, out)) {
            self.problems
                .push(format!("local unlock on unmastered {resource}"));
        }
    }

    pub(super) fn local_cancel(&mut self, lock: LockId, resource: ResourceKey) {
        let me = self.me;
        if !self.with_resource(&resource, |r, out| r.cancel(me, lock, out)) {
            self.problems
                .push(format!("local cancel on unmastered {resource}"));
        }
    }

    fn not_master(&mut self, to: NodeId, lock: LockId) {
        self.send(
            to,
            Message::Reply {
                lock,
                reply: Reply::NotMaster,
            },
        );
    }

    pub(super) fn on_remote_request(
        &mut self,
        from: NodeId,
        resource: ResourceKey,
        lock: LockId,
        mode: Mode,
        flags: Flags,
    ) {
        if !self.with_resource(&resource, |r, out| r.request(from, lock, mode, flags, out)) {
            self.not_master(from, lock);
        }
    }

    pub(super) fn on_remote_convert(
        &mut self,
        from: NodeId,
        resource: ResourceKey,
        lock: LockId,
        mode: Mode,
        flags: Flags,
        lvb: Option<Lvb>,
    ) {
        if !self.with_resource(&resource, |r, out| {
            r.convert(from, lock, mode, flags, lvb, out)
        }) {
            self.not_master(from, lock);
        }
    }

    pub(super) fn on_remote_unlock(
        &mut self,
        from: NodeId,
        resource: ResourceKey,
        lock: LockId,
        lvb: Option<Lvb>,
    ) {
        if !self.with_resource(&resource, |r, out| r.unlock(from, lock, lvb, out)) {
            self.not_master(from, lock);
        }
    }

    pub(super) fn on_remote_cancel(&mut self, from: NodeId, resource: ResourceKey, lock: LockId) {
        if !self.with_resource(&resource, |r, out| r.cancel(from, lock, out)) {
            self.not_master(from, lock);
        }
    }

    /// Directory: who masters `resource`? Records the asker if nobody does.
    pub(super) fn on_lookup(&mut self, from: NodeId, epoch: Epoch, resource: ResourceKey) {
        if epoch != self.epoch {
            return;
        }
        let master = *self.directory.entry(resource.clone()).or_insert(from);
        self.send(
            from,
            Message::LookupReply {
                epoch,
                resource,
                master,
            },
        );
    }

    pub(super) fn on_lookup_reply(&mut self, epoch: Epoch, resource: ResourceKey, master: NodeId) {
        if epoch != self.epoch {
            return;
        }
        if master == self.me {
            self.mastered.entry(resource.clone()).or_insert_with(|| {
                let mut r = Resource::new();
                r.idle_since_ms = None;
                r
            });
        } else {
            self.remember_master(&resource, master);
        }
        let waiting = self.lookups.remove(&resource).unwrap_or_default();
        for lock in waiting {
            self.dispatch(lock);
        }
    }

    pub(super) fn on_remove(&mut self, from: NodeId, epoch: Epoch, resource: ResourceKey) {
        if epoch != self.epoch {
            return;
        }
        if self.directory.get(&resource) == Some(&from) {
            self.directory.remove(&resource);
        }
    }

    /// Grants what can be granted on every mastered resource (after recovery).
    pub(super) fn grant_all(&mut self) {
        let keys: Vec<ResourceKey> = self.mastered.keys().cloned().collect();
        for key in keys {
            self.with_resource(&key, |r, out| {
                r.grant_pending(out);
                r.send_basts(out);
            });
        }
    }
}
