//! A small deterministic hasher for the core's maps.
//!
//! std's default hasher is randomly seeded per process, which makes map iteration order
//! (and so the order of the core's actions) differ between runs; the simulator needs a
//! seed to replay exactly. This is the multiply-rotate hash used by rustc ("FxHash"):
//! fast on short keys and not DoS-resistant, which is acceptable because peers are
//! authenticated cluster members and client names are bounded per connection.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

/// The hasher.
#[derive(Debug, Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    fn write_usize(&mut self, i: usize) {
        self.add(u64::try_from(i).unwrap_or(u64::MAX));
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

/// A HashMap with the deterministic hasher.
pub type Map<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;
/// A HashSet with the deterministic hasher.
pub type Set<T> = HashSet<T, BuildHasherDefault<FxHasher>>;
