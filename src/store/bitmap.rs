//! The dirty bitmap: one bit per `granularity` bytes (4 KiB by default) of the volume,
//! set when a region may differ from the peer's copy.
//!
//! Pure data structure (no I/O). It remembers which on-disk bitmap blocks changed since
//! they were last written, so the metadata writer persists only those.

use std::collections::BTreeSet;

/// Default bytes covered by one bit.
pub const DEFAULT_GRANULARITY: u32 = 4096;
/// 64-bit words stored in one on-disk bitmap block (4096 bytes minus a 16-byte header,
/// which holds the block's crc).
pub const WORDS_PER_BLOCK: usize = 510;

/// A dirty bitmap over a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: u64,
    granularity: u32,
    set: u64,
    changed_blocks: BTreeSet<usize>,
}

impl Bitmap {
    /// An all-clear bitmap for `size_bytes` at `granularity` bytes per bit.
    ///
    /// `granularity` must be a power of two ≥ 512 (checked by the metadata layer).
    pub fn new(size_bytes: u64, granularity: u32) -> Self {
        let g = u64::from(granularity.max(1));
        let bits = size_bytes.div_ceil(g);
        let words = usize::try_from(bits.div_ceil(64)).expect("bitmap fits memory");
        Self {
            words: vec![0; words],
            bits,
            granularity: granularity.max(1),
            set: 0,
            changed_blocks: BTreeSet::new(),
        }
    }

    /// Bytes covered per bit.
    pub fn granularity(&self) -> u32 {
        self.granularity
    }

    /// Number of bits.
    pub fn len_bits(&self) -> u64 {
        self.bits
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// Bytes marked out of sync (set bits × granularity).
    pub fn dirty_bytes(&self) -> u64 {
        self.set * u64::from(self.granularity)
    }

    /// Is bit `bit` set?
    pub fn is_set(&self, bit: u64) -> bool {
        let Ok(w) = usize::try_from(bit / 64) else {
            return false;
        };
        bit < self.bits && self.words[w] & (1 << (bit % 64)) != 0
    }

    /// The bits touched by the byte range (partially covered bits included).
    pub fn bits_touching(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let g = u64::from(self.granularity);
        if len == 0 {
            return 0..0;
        }
        let first = (offset / g).min(self.bits);
        let end = offset.saturating_add(len).div_ceil(g).min(self.bits);
        first..end
    }

    /// The bits fully covered by the byte range.
    pub fn bits_covered(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        let g = u64::from(self.granularity);
        let first = offset.div_ceil(g).min(self.bits);
        let end = (offset.saturating_add(len) / g).min(self.bits);
        first..end.max(first)
    }

    /// Sets every bit touching the byte range; returns how many were newly set.
    pub fn set_range(&mut self, offset: u64, len: u64) -> u64 {
        let bits = self.bits_touching(offset, len);
        self.set_bits(bits)
    }

    /// Sets bits `bits`; returns how many were newly set.
    pub fn set_bits(&mut self, bits: std::ops::Range<u64>) -> u64 {
        let mut newly = 0;
        for bit in bits {
            if self.flip(bit, true) {
                newly += 1;
            }
        }
        newly
    }

    /// Clears bits `bits`; returns how many were cleared.
    pub fn clear_bits(&mut self, bits: std::ops::Range<u64>) -> u64 {
        let mut cleared = 0;
        for bit in bits {
            if self.flip(bit, false) {
                cleared += 1;
            }
        }
        cleared
    }

    /// Clears the bits fully covered by the byte range; returns how many were cleared.
    pub fn clear_covered(&mut self, offset: u64, len: u64) -> u64 {
        let bits = self.bits_covered(offset, len);
        self.clear_bits(bits)
    }

    fn flip(&mut self, bit: u64, value: bool) -> bool {
        if bit >= self.bits {
            return false;
        }
        let w = usize::try_from(bit / 64).expect("word index fits usize");
        let mask = 1u64 << (bit % 64);
        let was = self.words[w] & mask != 0;
        if was == value {
            return false;
        }
        if value {
            self.words[w] |= mask;
            self.set += 1;
        } else {
            self.words[w] &= !mask;
            self.set -= 1;
        }
        self.changed_blocks.insert(w / WORDS_PER_BLOCK);
        true
    }

    /// Sets every bit.
    pub fn set_all(&mut self) {
        self.set_bits(0..self.bits);
    }

    /// Clears every bit.
    pub fn clear_all(&mut self) {
        self.clear_bits(0..self.bits);
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let mut w = usize::try_from(from / 64).ok()?;
        let mut word = self.words[w] & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let bit = u64::try_from(w).ok()? * 64 + u64::from(word.trailing_zeros());
                return (bit < self.bits).then_some(bit);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w];
        }
    }

    /// The run of set bits starting at the first set bit ≥ `from`, at most `max_bits` long.
    pub fn next_run(&self, from: u64, max_bits: u64) -> Option<std::ops::Range<u64>> {
        let start = self.next_set(from)?;
        let mut end = start + 1;
        while end < self.bits && end - start < max_bits && self.is_set(end) {
            end += 1;
        }
        Some(start..end)
    }

    /// Merges another bitmap of the same shape (bitwise OR); returns newly set bits.
    pub fn merge_words(&mut self, other: &[u64]) -> u64 {
        let mut newly = 0;
        for (i, &o) in other.iter().enumerate().take(self.words.len()) {
            let add = o & !self.words[i];
            if add != 0 {
                let mut add = add;
                while add != 0 {
                    let b = u64::try_from(i).expect("index fits") * 64
                        + u64::from(add.trailing_zeros());
                    add &= add - 1;
                    if self.flip(b, true) {
                        newly += 1;
                    }
                }
            }
        }
        newly
    }

    /// The raw words (bit `i` is bit `i % 64` of word `i / 64`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Replaces the contents from raw words (extra bits beyond the length are ignored).
    pub fn load_words(&mut self, words: &[u64]) {
        self.clear_all();
        self.merge_words(words);
    }

    /// On-disk blocks changed since [`Bitmap::take_changed_blocks`] was last called.
    pub fn take_changed_blocks(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.changed_blocks)
            .into_iter()
            .collect()
    }

    /// Marks every on-disk block as changed (forces a full write-out).
    pub fn mark_all_blocks_changed(&mut self) {
        for b in 0..self.block_count() {
            self.changed_blocks.insert(b);
        }
    }

    /// Number of on-disk blocks.
    pub fn block_count(&self) -> usize {
        self.words.len().div_ceil(WORDS_PER_BLOCK).max(1)
    }

    /// The on-disk blocks holding the bits of the byte range.
    pub fn blocks_of_range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let bits = self.bits_touching(offset, len);
        if bits.is_empty() {
            return 0..0;
        }
        let per_block = u64::try_from(WORDS_PER_BLOCK * 64).expect("fits");
        let first = usize::try_from(bits.start / per_block).expect("fits");
        let last = usize::try_from((bits.end - 1) / per_block).expect("fits");
        first..last + 1
    }

    /// The words of on-disk block `block` (shorter for the last block).
    pub fn block_words(&self, block: usize) -> &[u64] {
        let start = (block * WORDS_PER_BLOCK).min(self.words.len());
        let end = (start + WORDS_PER_BLOCK).min(self.words.len());
        &self.words[start..end]
    }

    /// Byte range covered by bits `bits`, clipped to `size_bytes`.
    pub fn byte_range(&self, bits: &std::ops::Range<u64>, size_bytes: u64) -> (u64, u64) {
        let g = u64::from(self.granularity);
        let start = bits.start * g;
        let end = (bits.end * g).min(size_bytes);
        (start, end.saturating_sub(start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn set_clear_and_count() {
        let mut b = Bitmap::new(1 << 20, 4096);
        assert_eq!(b.len_bits(), 256);
        assert_eq!(b.set_range(4095, 2), 2);
        assert_eq!(b.count(), 2);
        assert!(b.is_set(0) && b.is_set(1) && !b.is_set(2));
        assert_eq!(b.clear_covered(0, 4096), 1);
        assert_eq!(
            b.clear_covered(4096, 100),
            0,
            "partial cover must not clear"
        );
        assert_eq!(b.next_set(0), Some(1));
        assert_eq!(b.next_run(0, 10), Some(1..2));
        b.set_all();
        assert_eq!(b.dirty_bytes(), 1 << 20);
        assert_eq!(b.set_range(u64::MAX - 5, 10), 0, "out of range is ignored");
    }

    proptest! {
        #[test]
        fn bitmap_matches_a_set_model(ops in proptest::collection::vec((any::<bool>(), 0u64..300_000, 1u64..40_000), 1..60)) {
            let size = 300_000u64;
            let mut b = Bitmap::new(size, 4096);
            let mut model = std::collections::BTreeSet::new();
            for (set, off, len) in ops {
                if set {
                    b.set_range(off, len);
                    for bit in (off / 4096)..((off + len).div_ceil(4096)).min(b.len_bits()) {
                        model.insert(bit);
                    }
                } else {
                    b.clear_covered(off, len);
                    let first = off.div_ceil(4096);
                    let end = ((off + len) / 4096).min(b.len_bits());
                    for bit in first..end.max(first) {
                        model.remove(&bit);
                    }
                }
                prop_assert_eq!(b.count(), u64::try_from(model.len()).unwrap());
            }
            let mut from = 0;
            let mut seen = Vec::new();
            while let Some(r) = b.next_run(from, 7) {
                seen.extend(r.clone());
                from = r.end;
            }
            prop_assert_eq!(seen, model.iter().copied().collect::<Vec<_>>());
            let mut copy = Bitmap::new(size, 4096);
            copy.load_words(b.words());
            prop_assert_eq!(copy.count(), b.count());
        }
    }
}
