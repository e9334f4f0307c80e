//! One resource as its master sees it: the grant, convert and wait queues, the granting
//! rules and the value block. Pure: every decision comes back as a list of [`Outcome`]s
//! for the locks' owners.
//!
//! Rules (Linux/VMS DLM):
//! - a new request is granted at once only if it is compatible with every granted mode
//!   and both the convert and the wait queue are empty; otherwise it waits (FIFO) or,
//!   with NOQUEUE, fails with would-block;
//! - a conversion is granted in place if compatible with the other granted modes (with
//!   QUECVT only if the convert queue is empty); otherwise it joins the convert queue;
//!   before that, a conversion deadlock (its granted mode blocks a conversion ahead of
//!   it) is resolved by demoting it to NL (CONVDEADLK) or failed with deadlock;
//! - queued conversions are granted before queued new requests, each queue in order;
//! - holders of modes incompatible with a waiting request get one blocking callback per
//!   requested mode until their lock changes.

use crate::mode::{LvbOp, Mode, ModeSet};
use crate::types::{Flags, LockId, Lvb, LvbCopy, NodeId, Status};

/// A lock as its master keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct MasterLock {
    /// Node of the lock's client.
    pub owner: NodeId,
    /// The owner's id of the lock.
    pub id: LockId,
    /// Granted mode (None: a new request, not granted yet).
    pub grmode: Option<Mode>,
    /// Requested mode (equal to `grmode` when nothing is pending).
    pub rqmode: Mode,
    /// Flags of the last request.
    pub flags: Flags,
    /// Value to write into the resource's value block when a pending conversion is granted.
    pub write: Option<Lvb>,
    /// The value block this holder got with its last grant.
    pub lvb: Option<LvbCopy>,
    /// Modes blocking callbacks were sent for since the last grant.
    pub basts: ModeSet,
    /// CONVDEADLK demoted the lock to NL while its conversion waits.
    pub demoted: bool,
}

impl MasterLock {
    fn key(&self) -> (NodeId, LockId) {
        (self.owner, self.id)
    }
}

/// Which queue a lock is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Queue {
    /// Granted, nothing pending.
    Granted,
    /// Granted, waiting for a conversion.
    Converting,
    /// Waiting for its first grant.
    Waiting,
}

impl Queue {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Queue::Granted => "granted",
            Queue::Converting => "converting",
            Queue::Waiting => "waiting",
        }
    }
}

/// What a lock's owner must be told.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The request or conversion was granted.
    Granted {
        /// Owner node.
        owner: NodeId,
        /// Lock.
        id: LockId,
        /// The granted mode.
        mode: Mode,
        /// The value block, if the request asked for it.
        lvb: Option<LvbCopy>,
        /// CONVDEADLK demoted the lock to NL while the conversion waited.
        demoted: bool,
    },
    /// The request ended without a grant.
    Failed {
        /// Owner node.
        owner: NodeId,
        /// Lock.
        id: LockId,
        /// Why.
        status: Status,
        /// The mode the lock is still granted in (None: the lock is gone).
        mode: Option<Mode>,
    },
    /// The lock was released.
    Unlocked {
        /// Owner node.
        owner: NodeId,
        /// Lock.
        id: LockId,
    },
    /// A cancel found nothing to cancel (the request had already completed).
    CancelMissed {
        /// Owner node.
        owner: NodeId,
        /// Lock.
        id: LockId,
    },
    /// The holder blocks a request for `mode`.
    Blocking {
        /// Owner node.
        owner: NodeId,
        /// Lock.
        id: LockId,
        /// The mode that is waiting.
        mode: Mode,
    },
}

/// A lock sent to a new master during recovery.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveredLock {
    /// Owner node.
    pub owner: NodeId,
    /// Lock id.
    pub id: LockId,
    /// Granted mode.
    pub mode: Mode,
    /// Flags of its last request.
    pub flags: Flags,
    /// Its copy of the value block.
    pub lvb: Option<LvbCopy>,
}

/// A resource on its master.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Resource {
    granted: Vec<MasterLock>,
    converting: Vec<MasterLock>,
    waiting: Vec<MasterLock>,
    lvb: LvbCopy,
    /// Time (from `Tick`) the resource became empty; None while it has locks.
    pub idle_since_ms: Option<u64>,
}

impl Resource {
    /// A new resource: no locks, a zero and valid value block.
    pub fn new() -> Resource {
        Resource {
            lvb: LvbCopy {
                value: Lvb::default(),
                seq: 0,
                valid: true,
            },
            ..Resource::default()
        }
    }

    /// Rebuilds a resource on a new master from the locks survivors hold, and recovers the
    /// value block: from a holder of CW, PR, PW or EX with a valid copy (nobody can have
    /// written since it was granted), else the highest version among the other copies
    /// marked invalid, else zero and invalid.
    pub fn recovered(locks: Vec<RecoveredLock>) -> Resource {
        let mut res = Resource::new();
        let with_lvb: Vec<&RecoveredLock> = locks
            .iter()
            .filter(|l| l.flags.contains(Flags::VALBLK))
            .filter(|l| l.lvb.is_some())
            .collect();
        let big = with_lvb
            .iter()
            .find(|l| l.mode >= Mode::CW && l.lvb.is_some_and(|c| c.valid));
        res.lvb = match big {
            Some(l) => l.lvb.unwrap_or_default(),
            None => match with_lvb.iter().filter_map(|l| l.lvb).max_by_key(|c| c.seq) {
                Some(c) => LvbCopy { valid: false, ..c },
                None => LvbCopy {
                    value: Lvb::default(),
                    seq: 0,
                    valid: false,
                },
            },
        };
        for l in locks {
            res.granted.push(MasterLock {
                owner: l.owner,
                id: l.id,
                grmode: Some(l.mode),
                rqmode: l.mode,
                flags: l.flags,
                write: None,
                lvb: l.lvb,
                basts: ModeSet::EMPTY,
                demoted: false,
            });
        }
        res
    }

    /// The resource's value block.
    pub fn lvb(&self) -> LvbCopy {
        self.lvb
    }

    /// True if no lock is on any queue.
    pub fn is_empty(&self) -> bool {
        self.granted.is_empty() && self.converting.is_empty() && self.waiting.is_empty()
    }

    /// Number of locks on all queues.
    pub fn len(&self) -> usize {
        self.granted.len() + self.converting.len() + self.waiting.len()
    }

    /// Every lock with its queue, queues in order.
    pub fn locks(&self) -> impl Iterator<Item = (Queue, &MasterLock)> {
        self.granted
            .iter()
            .map(|l| (Queue::Granted, l))
            .chain(self.converting.iter().map(|l| (Queue::Converting, l)))
            .chain(self.waiting.iter().map(|l| (Queue::Waiting, l)))
    }

    /// True if `mode` conflicts with the granted mode of any lock other than `skip`.
    fn conflicts(&self, skip: (NodeId, LockId), mode: Mode) -> bool {
        self.granted
            .iter()
            .chain(self.converting.iter())
            .any(|l| l.key() != skip && l.grmode.is_some_and(|g| !g.is_compatible(mode)))
    }

    fn find(&self, key: (NodeId, LockId)) -> Option<Queue> {
        if self.granted.iter().any(|l| l.key() == key) {
            Some(Queue::Granted)
        } else if self.converting.iter().any(|l| l.key() == key) {
            Some(Queue::Converting)
        } else if self.waiting.iter().any(|l| l.key() == key) {
            Some(Queue::Waiting)
        } else {
            None
        }
    }

    fn take(&mut self, queue: Queue, key: (NodeId, LockId)) -> Option<MasterLock> {
        let q = match queue {
            Queue::Granted => &mut self.granted,
            Queue::Converting => &mut self.converting,
            Queue::Waiting => &mut self.waiting,
        };
        let pos = q.iter().position(|l| l.key() == key)?;
        Some(q.remove(pos))
    }

    /// True if the lock is known here.
    pub fn has_lock(&self, owner: NodeId, id: LockId) -> bool {
        self.find((owner, id)).is_some()
    }

    /// Grants `lock` its requested mode, moving the value block as the modes say, and
    /// puts it on the grant queue.
    fn grant(&mut self, mut lock: MasterLock, out: &mut Vec<Outcome>) {
        let demoted = std::mem::take(&mut lock.demoted);
        let from = lock.grmode;
        let to = lock.rqmode;
        let write = lock.write.take();
        let lvb = if lock.flags.contains(Flags::VALBLK) {
            match Mode::lvb_op(from, to) {
                LvbOp::Read => Some(self.lvb),
                LvbOp::Write => {
                    if let Some(value) = write {
                        self.lvb = LvbCopy {
                            value,
                            seq: self.lvb.seq.wrapping_add(1),
                            valid: true,
                        };
                    }
                    Some(self.lvb)
                }
                // Nothing is written; the holder gets the current value (Linux leaves
                // its buffer as it was, which may be stale if it did not read before).
                LvbOp::None => Some(self.lvb),
            }
        } else {
            None
        };
        lock.grmode = Some(to);
        lock.lvb = lvb.or(lock.lvb);
        lock.basts = ModeSet::EMPTY;
        out.push(Outcome::Granted {
            owner: lock.owner,
            id: lock.id,
            mode: to,
            lvb,
            demoted,
        });
        self.granted.push(lock);
    }

    /// A new lock request from `owner`.
    pub fn request(
        &mut self,
        owner: NodeId,
        id: LockId,
        mode: Mode,
        flags: Flags,
        out: &mut Vec<Outcome>,
    ) {
        self.idle_since_ms = None;
        let key = (owner, id);
        if self.find(key).is_some() {
            out.push(Outcome::Failed {
                owner,
                id,
                status: Status::Busy,
                mode: None,
            });
            return;
        }
        let lock = MasterLock {
            owner,
            id,
            grmode: None,
            rqmode: mode,
            flags,
            write: None,
            lvb: None,
            basts: ModeSet::EMPTY,
            demoted: false,
        };
        if !self.conflicts(key, mode) && self.converting.is_empty() && self.waiting.is_empty() {
            self.grant(lock, out);
        } else if flags.contains(Flags::NOQUEUE) {
            out.push(Outcome::Failed {
                owner,
                id,
                status: Status::WouldBlock,
                mode: None,
            });
        } else {
            self.waiting.push(lock);
            self.send_basts(out);
        }
        self.note_idle_check();
    }

    /// True if putting `lock` behind the current convert queue would deadlock: its granted
    /// mode blocks a conversion that is ahead of it.
    fn conversion_deadlock(&self, grmode: Mode) -> bool {
        self.converting
            .iter()
            .any(|ahead| !grmode.is_compatible(ahead.rqmode))
    }

    /// A conversion of a granted lock. `write` is the value block to store if the
    /// conversion writes it (from PW/EX with VALBLK).
    pub fn convert(
        &mut self,
        owner: NodeId,
        id: LockId,
        mode: Mode,
        flags: Flags,
        write: Option<Lvb>,
        out: &mut Vec<Outcome>,
    ) {
        let key = (owner, id);
        let Some(mut lock) = self.take(Queue::Granted, key) else {
            let status = if self.find(key).is_some() {
                Status::Busy
            } else {
                Status::Invalid
            };
            let mode = self
                .locks()
                .find(|(_, l)| l.key() == key)
                .and_then(|(_, l)| l.grmode);
            out.push(Outcome::Failed {
                owner,
                id,
                status,
                mode,
            });
            return;
        };
        let granted = lock.grmode.unwrap_or(Mode::NL);
        if flags.contains(Flags::QUECVT) && !granted.allows_quecvt_to(mode) {
            self.granted.push(lock);
            out.push(Outcome::Failed {
                owner,
                id,
                status: Status::Invalid,
                mode: Some(granted),
            });
            return;
        }
        lock.rqmode = mode;
        lock.flags = flags;
        lock.write = write;
        let quecvt_ok = !flags.contains(Flags::QUECVT) || self.converting.is_empty();
        if !self.conflicts(key, mode) && quecvt_ok {
            self.grant(lock, out);
            self.grant_pending(out);
            self.send_basts(out);
            return;
        }
        if flags.contains(Flags::NOQUEUE) {
            self.restore(lock, granted);
            out.push(Outcome::Failed {
                owner,
                id,
                status: Status::WouldBlock,
                mode: Some(granted),
            });
            return;
        }
        if self.conversion_deadlock(granted) {
            if !flags.contains(Flags::CONVDEADLK) {
                self.restore(lock, granted);
                out.push(Outcome::Failed {
                    owner,
                    id,
                    status: Status::Deadlock,
                    mode: Some(granted),
                });
                return;
            }
            // Demote in place, let the conversions ahead go first, then try again.
            lock.grmode = Some(Mode::NL);
            lock.demoted = true;
            self.granted.push(lock);
            self.grant_pending(out);
            let Some(again) = self.take(Queue::Granted, key) else {
                return;
            };
            lock = again;
            let quecvt_ok = !flags.contains(Flags::QUECVT) || self.converting.is_empty();
            if !self.conflicts(key, mode) && quecvt_ok {
                self.grant(lock, out);
                self.grant_pending(out);
                self.send_basts(out);
                return;
            }
        }
        self.converting.push(lock);
        self.send_basts(out);
    }

    fn restore(&mut self, mut lock: MasterLock, granted: Mode) {
        lock.rqmode = granted;
        lock.write = None;
        lock.demoted = false;
        self.granted.push(lock);
    }

    /// Releases a lock. `write` is stored if the lock held PW or EX.
    pub fn unlock(
        &mut self,
        owner: NodeId,
        id: LockId,
        write: Option<Lvb>,
        out: &mut Vec<Outcome>,
    ) {
        let key = (owner, id);
        let lock = match self.find(key) {
            Some(q) => self.take(q, key),
            None => None,
        };
        let Some(lock) = lock else {
            out.push(Outcome::Failed {
                owner,
                id,
                status: Status::Invalid,
                mode: None,
            });
            return;
        };
        if let (Some(value), Some(g)) = (write, lock.grmode)
            && g.writes_lvb()
        {
            self.lvb = LvbCopy {
                value,
                seq: self.lvb.seq.wrapping_add(1),
                valid: true,
            };
        }
        out.push(Outcome::Unlocked { owner, id });
        self.grant_pending(out);
        self.send_basts(out);
        self.note_idle_check();
    }

    /// Cancels a waiting request or conversion.
    pub fn cancel(&mut self, owner: NodeId, id: LockId, out: &mut Vec<Outcome>) {
        let key = (owner, id);
        match self.find(key) {
            Some(Queue::Waiting) => {
                self.take(Queue::Waiting, key);
                out.push(Outcome::Failed {
                    owner,
                    id,
                    status: Status::Canceled,
                    mode: None,
                });
            }
            Some(Queue::Converting) => {
                if let Some(lock) = self.take(Queue::Converting, key) {
                    let g = lock.grmode.unwrap_or(Mode::NL);
                    self.restore(lock, g);
                    out.push(Outcome::Failed {
                        owner,
                        id,
                        status: Status::Canceled,
                        mode: Some(g),
                    });
                }
            }
            Some(Queue::Granted) | None => {
                out.push(Outcome::CancelMissed { owner, id });
                return;
            }
        }
        self.grant_pending(out);
        self.send_basts(out);
        self.note_idle_check();
    }

    /// Grants queued conversions in order, then (if none are left) queued requests in order.
    pub fn grant_pending(&mut self, out: &mut Vec<Outcome>) {
        while let Some(head) = self.converting.first() {
            if self.conflicts(head.key(), head.rqmode) {
                break;
            }
            let lock = self.converting.remove(0);
            self.grant(lock, out);
        }
        if !self.converting.is_empty() {
            return;
        }
        while let Some(head) = self.waiting.first() {
            if self.conflicts(head.key(), head.rqmode) {
                break;
            }
            let lock = self.waiting.remove(0);
            self.grant(lock, out);
        }
    }

    /// Sends blocking callbacks to holders whose granted mode blocks a queued request.
    pub fn send_basts(&mut self, out: &mut Vec<Outcome>) {
        if self.converting.is_empty() && self.waiting.is_empty() {
            return;
        }
        let mut wanted = [0u32; 6];
        for l in self.converting.iter().chain(self.waiting.iter()) {
            wanted[usize::from(l.rqmode.as_u8())] += 1;
        }
        for holder in self.granted.iter_mut().chain(self.converting.iter_mut()) {
            let Some(g) = holder.grmode else { continue };
            let own = (holder.grmode != Some(holder.rqmode)).then_some(holder.rqmode);
            for mode in Mode::ALL {
                let mut n = wanted[usize::from(mode.as_u8())];
                if own == Some(mode) {
                    n = n.saturating_sub(1);
                }
                if n > 0 && !g.is_compatible(mode) && !holder.basts.contains(mode) {
                    holder.basts.insert(mode);
                    out.push(Outcome::Blocking {
                        owner: holder.owner,
                        id: holder.id,
                        mode,
                    });
                }
            }
        }
    }

    /// Drops the locks of owners for which `lost` is true (departed nodes). If one of them
    /// held PW or EX with VALBLK, the value block is marked invalid: its update is lost.
    /// Returns the number of locks dropped. Does not grant (recovery does, later).
    pub fn purge(&mut self, lost: impl Fn(NodeId) -> bool) -> usize {
        let mut dropped = 0;
        let mut invalidate = false;
        for q in [&mut self.granted, &mut self.converting, &mut self.waiting] {
            q.retain(|l| {
                if lost(l.owner) {
                    dropped += 1;
                    if l.flags.contains(Flags::VALBLK) && l.grmode.is_some_and(Mode::writes_lvb) {
                        invalidate = true;
                    }
                    false
                } else {
                    true
                }
            });
        }
        if invalidate {
            self.lvb.valid = false;
        }
        dropped
    }

    fn note_idle_check(&mut self) {
        if !self.is_empty() {
            self.idle_since_ms = None;
        }
    }

    /// Checks the resource's own invariants: granted modes pairwise compatible, each lock
    /// on one queue once, queue states consistent.
    pub fn check(&self) -> Result<(), String> {
        let holders: Vec<&MasterLock> = self.granted.iter().chain(self.converting.iter()).collect();
        for (i, a) in holders.iter().enumerate() {
            let Some(ga) = a.grmode else {
                return Err(format!("lock {:?} granted without a mode", a.key()));
            };
            for b in &holders[i + 1..] {
                if let Some(gb) = b.grmode
                    && !ga.is_compatible(gb)
                {
                    return Err(format!(
                        "incompatible grants {ga} {:?} and {gb} {:?}",
                        a.key(),
                        b.key()
                    ));
                }
            }
        }
        for l in &self.granted {
            if l.grmode != Some(l.rqmode) {
                return Err(format!("granted lock {:?} has a pending mode", l.key()));
            }
        }
        for l in &self.waiting {
            if l.grmode.is_some() {
                return Err(format!("waiting lock {:?} has a granted mode", l.key()));
            }
        }
        let mut keys: Vec<(NodeId, LockId)> = self.locks().map(|(_, l)| l.key()).collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        if keys.len() != n {
            return Err("a lock is queued twice".into());
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "resource_test.rs"]
mod tests;
