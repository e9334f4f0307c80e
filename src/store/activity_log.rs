//! The activity log: the set of "hot" extents that may have writes in flight.
//!
//! Before a write touches an extent that is not in the log, the extent is added and the log
//! is made durable (a transaction); after a crash only the extents in the last durable
//! transaction can differ from the peer, so only they are resynced instead of the whole
//! device (DRBD's activity log). The set is bounded; the least recently used idle extent is
//! evicted to make room. Pure data structure: the caller persists transactions.

use std::collections::{BTreeMap, VecDeque};

/// Default bytes per activity-log extent.
pub const DEFAULT_EXTENT_BYTES: u64 = 4 << 20;
/// Default number of hot extents.
pub const DEFAULT_EXTENTS: u32 = 257;
/// The most extents one on-disk transaction block can list.
pub const MAX_EXTENTS: u32 = 1000;
/// The fewest extents a log may have: a write of the largest size a request may have (4
/// MiB, one default extent) can straddle two.
pub const MIN_EXTENTS: u32 = 2;
/// The sizes a log may be given (`al_extents` in the config and in `create-md`).
pub const EXTENTS: std::ops::RangeInclusive<u32> = MIN_EXTENTS..=MAX_EXTENTS;

/// What touching a range changed: the log must be persisted before the write is issued.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AlChange {
    pub added: Vec<u32>,
    pub evicted: Vec<u32>,
}

/// The log has no room for a range now: every extent it could evict is pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlFull;

/// The in-memory activity log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityLog {
    extent_bytes: u64,
    capacity: usize,
    /// extent -> writes in flight.
    active: BTreeMap<u32, u32>,
    /// Least recently used first.
    lru: VecDeque<u32>,
}

impl ActivityLog {
    /// A log of at most `capacity` extents of `extent_bytes` each.
    pub fn new(extent_bytes: u64, capacity: u32) -> Self {
        Self {
            extent_bytes: extent_bytes.max(4096),
            capacity: usize::try_from(capacity.clamp(1, MAX_EXTENTS)).expect("fits"),
            active: BTreeMap::new(),
            lru: VecDeque::new(),
        }
    }

    /// Bytes per extent.
    pub fn extent_bytes(&self) -> u64 {
        self.extent_bytes
    }

    /// The extents a byte range touches.
    pub fn extents_of(&self, offset: u64, len: u64) -> std::ops::Range<u32> {
        let first = offset / self.extent_bytes;
        let end = offset
            .saturating_add(len.max(1))
            .div_ceil(self.extent_bytes);
        let clip = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        clip(first)..clip(end)
    }

    /// The most extents the log holds (the superblock's `al_extents`).
    pub fn capacity(&self) -> u32 {
        u32::try_from(self.capacity).unwrap_or(MAX_EXTENTS)
    }

    /// Can `begin` pin this range now without the log outgrowing its capacity (evicting
    /// idle extents as needed)? A write that finds no room waits until pinned extents go
    /// idle — DRBD's behaviour — instead of growing a transaction past what the on-disk
    /// log can record.
    pub fn has_room_for(&self, offset: u64, len: u64) -> bool {
        let range = self.extents_of(offset, len);
        let missing = range
            .clone()
            .filter(|e| !self.active.contains_key(e))
            .count();
        if missing == 0 {
            return true;
        }
        let evictable = self
            .active
            .iter()
            .filter(|(e, refs)| **refs == 0 && !range.contains(e))
            .count();
        self.active.len() - evictable + missing <= self.capacity
    }

    /// Could a range ever fit, with every other extent idle? (A request wider than the
    /// whole log never can; it must be split or refused.)
    pub fn could_ever_hold(&self, offset: u64, len: u64) -> bool {
        self.extents_of(offset, len).len() <= self.capacity
    }

    /// Begins a write on the range: pins its extents; returns the change to persist first
    /// (`Ok(None)` when every extent was already in the log). With no room (see
    /// [`ActivityLog::has_room_for`]) nothing changes and `Err(AlFull)` is returned.
    pub fn begin(&mut self, offset: u64, len: u64) -> Result<Option<AlChange>, AlFull> {
        if !self.has_room_for(offset, len) {
            return Err(AlFull);
        }
        let range = self.extents_of(offset, len);
        let mut change = AlChange::default();
        for extent in range.clone() {
            match self.active.get_mut(&extent) {
                Some(refs) => {
                    *refs += 1;
                    self.lru.retain(|&e| e != extent);
                    self.lru.push_back(extent);
                }
                None => {
                    while self.active.len() >= self.capacity {
                        let Some(victim) = self.idle_lru_outside(&range) else {
                            break;
                        };
                        self.active.remove(&victim);
                        self.lru.retain(|&e| e != victim);
                        change.evicted.push(victim);
                    }
                    self.active.insert(extent, 1);
                    self.lru.push_back(extent);
                    change.added.push(extent);
                }
            }
        }
        debug_assert!(
            self.active.len() <= self.capacity,
            "has_room_for was checked"
        );
        Ok((!change.added.is_empty()).then_some(change))
    }

    /// Ends a write on the range (unpins its extents; they stay hot until evicted).
    pub fn end(&mut self, offset: u64, len: u64) {
        for extent in self.extents_of(offset, len) {
            if let Some(refs) = self.active.get_mut(&extent) {
                *refs = refs.saturating_sub(1);
            }
        }
    }

    fn idle_lru_outside(&self, range: &std::ops::Range<u32>) -> Option<u32> {
        self.lru
            .iter()
            .copied()
            .find(|e| !range.contains(e) && self.active.get(e).copied().unwrap_or(0) == 0)
    }

    /// The extents currently in the log (what a transaction records).
    pub fn extents(&self) -> Vec<u32> {
        self.active.keys().copied().collect()
    }

    /// Replaces the log with `extents` (all idle), as loaded from disk.
    pub fn load(&mut self, extents: &[u32]) {
        self.active = extents.iter().map(|&e| (e, 0)).collect();
        self.lru = extents.iter().copied().collect();
    }

    /// Empties the log (after a clean shutdown or once a resync covered everything).
    pub fn clear(&mut self) -> bool {
        let had = !self.active.is_empty();
        if self.active.values().all(|&r| r == 0) {
            self.active.clear();
            self.lru.clear();
        }
        had
    }

    /// Writes in flight.
    pub fn pinned(&self) -> u32 {
        self.active.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn begin_adds_and_evicts_idle_extents_only() {
        let mut al = ActivityLog::new(1 << 20, 3);
        assert_eq!(
            al.begin(0, 4096),
            Ok(Some(AlChange {
                added: vec![0],
                evicted: vec![]
            }))
        );
        assert_eq!(al.begin(100, 4096), Ok(None), "extent 0 is already hot");
        let change = al.begin(1 << 20, 4096).unwrap().unwrap();
        assert_eq!(change.added, vec![1]);
        let change = al.begin(2 << 20, 4096).unwrap().unwrap();
        assert!(change.evicted.is_empty());
        al.end(0, 4096);
        al.end(100, 4096);
        let change = al.begin(3 << 20, 4096).unwrap().unwrap();
        assert_eq!(change.evicted, vec![0]);
        assert_eq!(al.extents(), vec![1, 2, 3]);
        assert_eq!(al.extents_of((1 << 20) - 1, 2), 0..2);
    }

    #[test]
    fn a_full_log_refuses_instead_of_growing() {
        // Every extent pinned: the log once grew past its capacity here, until a
        // transaction listed more extents than the on-disk log can hold and the disk
        // was detached as failed.
        let mut al = ActivityLog::new(1 << 20, 2);
        al.begin(0, 4096).unwrap();
        al.begin(1 << 20, 4096).unwrap();
        assert!(!al.has_room_for(2 << 20, 4096));
        assert_eq!(al.begin(2 << 20, 4096), Err(AlFull));
        assert_eq!(al.extents(), vec![0, 1], "a refused begin changes nothing");
        assert_eq!(al.pinned(), 2);
        // A range already hot always fits.
        assert_eq!(al.begin(4096, 4096), Ok(None));
        al.end(4096, 4096);
        al.end(0, 4096);
        assert!(al.has_room_for(2 << 20, 4096));
        assert_eq!(al.begin(2 << 20, 4096).unwrap().unwrap().evicted, vec![0]);
    }

    #[test]
    fn a_range_wider_than_the_log_never_fits() {
        let al = ActivityLog::new(1 << 20, 4);
        assert!(al.could_ever_hold(0, 4 << 20));
        assert!(!al.could_ever_hold(1, 4 << 20), "straddles five extents");
        assert!(!al.has_room_for(0, 5 << 20));
    }

    proptest::proptest! {
        /// Whatever the sequence of begins and ends, the log never holds more extents than
        /// its capacity, and a begin fails exactly when there is no room.
        #[test]
        fn never_outgrows_its_capacity(
            capacity in 1u32..6,
            ops in proptest::collection::vec((0u64..12, 1u64..3, proptest::bool::ANY), 1..200),
        ) {
            let mut al = ActivityLog::new(4096, capacity);
            let mut pinned: Vec<(u64, u64)> = Vec::new();
            for (extent, extents, end) in ops {
                if end && !pinned.is_empty() {
                    let (o, l) = pinned.remove(usize::try_from(extent).unwrap() % pinned.len());
                    al.end(o, l);
                } else {
                    let (o, l) = (extent * 4096, extents * 4096);
                    let room = al.has_room_for(o, l);
                    let begun = al.begin(o, l);
                    proptest::prop_assert_eq!(room, begun.is_ok());
                    if begun.is_ok() {
                        pinned.push((o, l));
                    }
                }
                proptest::prop_assert!(al.extents().len() <= usize::try_from(capacity).unwrap());
            }
        }
    }
}
