//! The owner role: the locks of this node's clients, their pending requests and the
//! routing of those requests to the resource's master.

use super::{Action, CacheEntry, Completion, Dlm, Message, NodeState, Reply};
use crate::mode::{LvbOp, Mode};
use crate::types::{
    ClientId, Flags, Incarnation, LockId, Lvb, LvbCopy, NodeId, ResourceKey, Status,
};

/// A request in progress on a lock.
#[derive(Debug, Clone, PartialEq)]
pub enum Pending {
    /// The first grant of a new lock.
    Request {
        /// Mode.
        mode: Mode,
        /// Flags.
        flags: Flags,
    },
    /// A conversion.
    Convert {
        /// Mode.
        mode: Mode,
        /// Flags.
        flags: Flags,
        /// Value to write.
        lvb: Option<Lvb>,
    },
    /// A release.
    Unlock {
        /// Value to write.
        lvb: Option<Lvb>,
    },
}

/// Where a cancel of the pending request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelState {
    /// No cancel asked.
    None,
    /// Asked during recovery; sent when the node runs again.
    Wanted,
    /// Sent to the master (a cancel of a request not sent yet takes effect at once).
    Sent,
}

/// A lock of one of this node's clients.
#[derive(Debug, Clone, PartialEq)]
pub struct OwnLock {
    /// Its client.
    pub client: ClientId,
    /// Its resource.
    pub resource: ResourceKey,
    /// The node mastering it (known once the request was routed).
    pub master: Option<NodeId>,
    /// New master chosen in an unfinished recovery round (epoch, node).
    pub tentative: Option<(crate::types::Epoch, NodeId, Incarnation)>,
    /// Incarnation of `master` when the lock was routed there.
    pub master_inc: Incarnation,
    /// Granted mode (None: not granted yet).
    pub grmode: Option<Mode>,
    /// Flags of the last granted request.
    pub flags: Flags,
    /// The value block copy from the last grant.
    pub lvb: Option<LvbCopy>,
    /// The request in progress.
    pub pending: Option<Pending>,
    /// True once `pending` was sent to `master`.
    pub sent: bool,
    /// Cancel of the pending request.
    pub cancel: CancelState,
    /// The client went away: release without callbacks.
    pub orphan: bool,
}

impl OwnLock {
    /// The mode the client may rely on now. The master may grant a conversion before the
    /// holder hears of it, so while a conversion waits the holder relies only on what
    /// both the old and the new mode allow ([`Mode::meet`]): the new mode right away for
    /// a down-conversion (the holder gave the old one up when it asked), the old one for
    /// an up-conversion, CR for CW↔PR; and NL with CONVDEADLK (the master may demote it).
    /// An unlock gives everything up when asked. None: nothing held.
    pub fn effective_mode(&self) -> Option<Mode> {
        let g = self.grmode?;
        match &self.pending {
            None | Some(Pending::Request { .. }) => Some(g),
            Some(Pending::Unlock { .. }) => None,
            Some(Pending::Convert { mode, flags, .. }) => {
                if flags.contains(Flags::CONVDEADLK) && !g.is_down_to(*mode) {
                    Some(Mode::NL)
                } else {
                    Some(g.meet(*mode))
                }
            }
        }
    }

    pub(super) fn check(&self) -> Result<(), String> {
        match (&self.pending, self.grmode) {
            (Some(Pending::Request { .. }), Some(_)) => {
                Err("request pending on a granted lock".into())
            }
            (Some(Pending::Convert { .. } | Pending::Unlock { .. }), None) => {
                Err("conversion or unlock of an ungranted lock".into())
            }
            (None, None) => Err("lock neither granted nor requested".into()),
            _ => {
                if self.pending.is_none() && self.sent {
                    return Err("sent flag without a pending request".into());
                }
                if self.cancel != CancelState::None
                    && !matches!(
                        self.pending,
                        Some(Pending::Request { .. } | Pending::Convert { .. })
                    )
                    && !self.orphan
                {
                    return Err(format!(
                        "cancel {:?} without a pending request",
                        self.cancel
                    ));
                }
                Ok(())
            }
        }
    }
}

impl Dlm {
    fn refuse(&mut self, client: ClientId, lock: LockId, status: Status) {
        self.out.push(Action::Refused {
            client,
            lock,
            status,
        });
    }

    pub(super) fn complete(&mut self, lock: LockId, status: Status, demoted: bool) {
        let Some(l) = self.locks.get(&lock) else {
            return;
        };
        if l.orphan {
            return;
        }
        let lvb = if status == Status::Granted && l.flags.contains(Flags::VALBLK) {
            l.lvb
        } else {
            None
        };
        self.out.push(Action::Complete(Completion {
            client: l.client,
            lock,
            status,
            mode: l.grmode,
            lvb,
            demoted,
        }));
    }

    pub(super) fn on_lock(
        &mut self,
        client: ClientId,
        lock: LockId,
        resource: ResourceKey,
        mode: Mode,
        flags: Flags,
    ) {
        if self.state == NodeState::Evicted {
            return self.refuse(client, lock, Status::Evicted);
        }
        if self.locks.contains_key(&lock)
            || lock.0 >= self.next_lock
            || flags.contains(Flags::CONVERT)
            || flags.contains(Flags::QUECVT)
            || !Flags::ALL.contains(flags)
        {
            return self.refuse(client, lock, Status::Invalid);
        }
        self.locks.insert(
            lock,
            OwnLock {
                client,
                resource,
                master: None,
                tentative: None,
                master_inc: Incarnation::default(),
                grmode: None,
                flags,
                lvb: None,
                pending: Some(Pending::Request { mode, flags }),
                sent: false,
                cancel: CancelState::None,
                orphan: false,
            },
        );
        self.dispatch(lock);
    }

    fn check_owner(&mut self, client: ClientId, lock: LockId) -> bool {
        if self.state == NodeState::Evicted {
            self.refuse(client, lock, Status::Evicted);
            return false;
        }
        match self.locks.get(&lock) {
            Some(l) if l.client == client && !l.orphan => true,
            _ => {
                self.refuse(client, lock, Status::Invalid);
                false
            }
        }
    }

    pub(super) fn on_convert(
        &mut self,
        client: ClientId,
        lock: LockId,
        mode: Mode,
        flags: Flags,
        lvb: Option<Lvb>,
    ) {
        if !self.check_owner(client, lock) {
            return;
        }
        if !Flags::ALL.contains(flags) {
            return self.refuse(client, lock, Status::Invalid);
        }
        let Some(l) = self.locks.get_mut(&lock) else {
            return;
        };
        let Some(g) = l.grmode else {
            return self.refuse(client, lock, Status::Busy);
        };
        if l.pending.is_some() {
            return self.refuse(client, lock, Status::Busy);
        }
        if flags.contains(Flags::QUECVT) && !g.allows_quecvt_to(mode) {
            return self.refuse(client, lock, Status::Invalid);
        }
        let flags = flags.with(Flags::CONVERT);
        // A write needs a value: without one, the lock's current copy is written back.
        let lvb = if flags.contains(Flags::VALBLK) && Mode::lvb_op(Some(g), mode) == LvbOp::Write {
            lvb.or(l.lvb.map(|c| c.value)).or(Some(Lvb::default()))
        } else {
            None
        };
        l.pending = Some(Pending::Convert { mode, flags, lvb });
        self.dispatch(lock);
    }

    pub(super) fn on_unlock(&mut self, client: ClientId, lock: LockId, lvb: Option<Lvb>) {
        if !self.check_owner(client, lock) {
            return;
        }
        let Some(l) = self.locks.get_mut(&lock) else {
            return;
        };
        if l.grmode.is_none() || l.pending.is_some() {
            return self.refuse(client, lock, Status::Busy);
        }
        l.pending = Some(Pending::Unlock { lvb });
        self.dispatch(lock);
    }

    pub(super) fn on_cancel(&mut self, client: ClientId, lock: LockId) {
        if !self.check_owner(client, lock) {
            return;
        }
        self.cancel_pending(lock);
    }

    /// Cancels the pending request of `lock` if there is one (quietly does nothing if not).
    pub(super) fn cancel_pending(&mut self, lock: LockId) {
        let Some(l) = self.locks.get_mut(&lock) else {
            return;
        };
        if !matches!(
            l.pending,
            Some(Pending::Request { .. } | Pending::Convert { .. })
        ) || l.cancel == CancelState::Sent
        {
            return;
        }
        if !l.sent {
            // Still here: nobody else saw it.
            let resource = l.resource.clone();
            if let Some(waiting) = self.lookups.get_mut(&resource) {
                waiting.retain(|w| *w != lock);
            }
            self.finish_op(
                lock,
                Reply::Failed {
                    status: Status::Canceled,
                    mode: self.locks.get(&lock).and_then(|l| l.grmode),
                },
            );
            return;
        }
        if self.state != NodeState::Running {
            // Masters act only after recovery (a local one would grant now).
            l.cancel = CancelState::Wanted;
            return;
        }
        l.cancel = CancelState::Sent;
        let (Some(master), resource) = (l.master, l.resource.clone()) else {
            return;
        };
        if master == self.me {
            self.local_cancel(lock, resource);
        } else {
            self.send(master, Message::Cancel { resource, lock });
        }
    }

    pub(super) fn on_client_gone(&mut self, client: ClientId) {
        let mine: Vec<LockId> = self
            .locks
            .iter()
            .filter(|(_, l)| l.client == client)
            .map(|(id, _)| *id)
            .collect();
        for lock in &mine {
            if let Some(l) = self.locks.get_mut(lock) {
                l.orphan = true;
            }
        }
        for lock in mine {
            self.continue_orphan(lock);
        }
    }

    /// Moves an orphaned lock towards release: cancel what is pending, unlock what is
    /// granted and idle, forget what is neither.
    pub(super) fn continue_orphan(&mut self, lock: LockId) {
        let Some(l) = self.locks.get_mut(&lock) else {
            return;
        };
        if !l.orphan {
            return;
        }
        match (&l.pending, l.grmode) {
            (Some(Pending::Unlock { .. }), _) => {}
            (Some(_), _) => self.cancel_pending(lock),
            (None, Some(_)) => {
                l.pending = Some(Pending::Unlock { lvb: None });
                self.dispatch(lock);
            }
            (None, None) => {
                self.locks.remove(&lock);
            }
        }
    }

    /// The master a new request for `resource` goes to, if known.
    fn known_master(&mut self, resource: &ResourceKey) -> Option<NodeId> {
        if self.mastered.contains_key(resource) {
            return Some(self.me);
        }
        let now = self.now_ms;
        self.cache.get_mut(resource).map(|e| {
            e.used_ms = now;
            e.master
        })
    }

    /// Sends the pending request of `lock` to its master (looking the master up first if
    /// needed). While not running, requests wait here.
    pub(super) fn dispatch(&mut self, lock: LockId) {
        if self.state != NodeState::Running {
            return;
        }
        let Some(l) = self.locks.get(&lock) else {
            return;
        };
        if l.sent || l.pending.is_none() {
            return;
        }
        let resource = l.resource.clone();
        let is_request = matches!(l.pending, Some(Pending::Request { .. }));
        let master = if is_request {
            self.known_master(&resource)
        } else {
            l.master
        };
        let Some(master) = master else {
            if is_request {
                let waiting = self.lookups.entry(resource.clone()).or_default();
                let first = waiting.is_empty();
                waiting.push(lock);
                if first && let Some(dir) = self.directory_node(&resource) {
                    let epoch = self.epoch;
                    self.send(dir, Message::Lookup { epoch, resource });
                }
            } else {
                self.problems
                    .push(format!("lock {lock} has a request but no master"));
            }
            return;
        };
        let master_inc = self.members.get(&master).copied().unwrap_or_default();
        let Some(l) = self.locks.get_mut(&lock) else {
            return;
        };
        l.master = Some(master);
        l.master_inc = master_inc;
        l.sent = true;
        let pending = l.pending.clone();
        if master == self.me {
            match pending {
                Some(Pending::Request { mode, flags }) => {
                    self.local_request(lock, resource.clone(), mode, flags)
                }
                Some(Pending::Convert { mode, flags, lvb }) => {
                    self.local_convert(lock, resource.clone(), mode, flags, lvb)
                }
                Some(Pending::Unlock { lvb }) => self.local_unlock(lock, resource.clone(), lvb),
                None => {}
            }
        } else {
            let message = match pending {
                Some(Pending::Request { mode, flags }) => Message::Request {
                    resource: resource.clone(),
                    lock,
                    mode,
                    flags,
                },
                Some(Pending::Convert { mode, flags, lvb }) => Message::Convert {
                    resource: resource.clone(),
                    lock,
                    mode,
                    flags,
                    lvb,
                },
                Some(Pending::Unlock { lvb }) => Message::Unlock {
                    resource: resource.clone(),
                    lock,
                    lvb,
                },
                None => return,
            };
            let unlock = matches!(message, Message::Unlock { .. });
            self.send(master, message);
            if unlock {
                // Released as of now: the master applies it in order before anything
                // this node sends later, and if the master dies first the lock is gone
                // with it. No round trip.
                self.finish_op(lock, Reply::Unlocked);
            }
        }
    }

    /// A master's reply for one of our locks.
    pub(super) fn on_reply(&mut self, from: NodeId, lock: LockId, reply: Reply) {
        let Some(l) = self.locks.get(&lock) else {
            return;
        };
        if l.master != Some(from) {
            return;
        }
        match reply {
            Reply::NotMaster => {
                let resource = l.resource.clone();
                let cancelled = l.cancel != CancelState::None;
                if self.cache.get(&resource).is_some_and(|e| e.master == from) {
                    self.cache.remove(&resource);
                }
                match l.pending {
                    Some(Pending::Request { .. }) if l.sent => {
                        if cancelled {
                            self.finish_op(
                                lock,
                                Reply::Failed {
                                    status: Status::Canceled,
                                    mode: None,
                                },
                            );
                        } else if let Some(l) = self.locks.get_mut(&lock) {
                            l.sent = false;
                            l.master = None;
                            self.dispatch(lock);
                        }
                    }
                    Some(Pending::Request { .. }) => {}
                    _ => {
                        // The master lost a lock it granted: that must never happen.
                        self.problems
                            .push(format!("master {from} does not know lock {lock}"));
                    }
                }
            }
            other => self.finish_op(lock, other),
        }
    }

    /// Ends the pending request of `lock` with `reply` and tells the client.
    pub(super) fn finish_op(&mut self, lock: LockId, reply: Reply) {
        let Some(l) = self.locks.get_mut(&lock) else {
            return;
        };
        let pending = l.pending.take();
        l.sent = false;
        let mut remove = false;
        let (status, demoted) = match reply {
            Reply::Granted { mode, lvb, demoted } => {
                l.grmode = Some(mode);
                if let Some(p) = &pending {
                    l.flags = match p {
                        Pending::Request { flags, .. } | Pending::Convert { flags, .. } => *flags,
                        Pending::Unlock { .. } => l.flags,
                    };
                }
                if lvb.is_some() {
                    l.lvb = lvb;
                }
                l.cancel = CancelState::None;
                (Status::Granted, demoted)
            }
            Reply::Failed { status, mode } => {
                l.grmode = mode;
                l.cancel = CancelState::None;
                remove = mode.is_none();
                (status, false)
            }
            Reply::Unlocked => {
                remove = true;
                (Status::Unlocked, false)
            }
            Reply::NotMaster => return,
        };
        self.complete(lock, status, demoted);
        if remove {
            self.locks.remove(&lock);
        } else {
            self.continue_orphan(lock);
        }
    }

    pub(super) fn on_blocking(&mut self, from: NodeId, lock: LockId, mode: Mode) {
        let Some(l) = self.locks.get(&lock) else {
            return;
        };
        if l.master != Some(from) || l.grmode.is_none() || l.orphan {
            return;
        }
        self.out.push(Action::Blocking {
            client: l.client,
            lock,
            mode,
        });
    }

    /// Records the master of `resource` learned from the directory.
    pub(super) fn remember_master(&mut self, resource: &ResourceKey, master: NodeId) {
        if master == self.me {
            return;
        }
        self.cache.insert(
            resource.clone(),
            CacheEntry {
                master,
                used_ms: self.now_ms,
            },
        );
    }
}
