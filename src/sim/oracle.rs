//! The acknowledged-write oracle: what each block may hold, given what was acknowledged.
//!
//! Every write gets unique tokens (one per block). Per block the oracle keeps the tokens
//! in submission order and the index of the newest acknowledged one: a disk may hold that
//! token or any later one (a later write may have landed without being acknowledged), but
//! never an older one. It never assumes a failed or unanswered write is absent.
//!
//! A trim (discard or write-zeroes) is a write of zeroes: token 0 in a block's history, at
//! its own position, so a block may read as zero only if a trim is at or after the newest
//! acknowledged write there (or nothing was acknowledged).

use crate::replication::core::ReqId;
use std::collections::HashMap;

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct Oracle {
    history: Vec<Vec<u64>>,
    index_of: HashMap<u64, (u64, usize)>,
    acked: Vec<Option<usize>>,
    flush_pending: HashMap<ReqId, (usize, Vec<Option<usize>>)>,
    flushed: [Vec<Option<usize>>; 2],
}

impl Oracle {
    /// An oracle for `blocks` blocks, all zero.
    pub fn new(blocks: u64) -> Self {
        let n = usize::try_from(blocks).expect("small");
        Self {
            history: vec![Vec::new(); n],
            index_of: HashMap::new(),
            acked: vec![None; n],
            flush_pending: HashMap::new(),
            flushed: [vec![None; n], vec![None; n]],
        }
    }

    fn slot(block: u64) -> usize {
        usize::try_from(block).expect("small")
    }

    /// A write of `tokens` starting at `block` was submitted.
    pub fn submitted(&mut self, block: u64, tokens: &[u64]) {
        for (i, t) in tokens.iter().enumerate() {
            let b = block + u64::try_from(i).expect("small");
            let h = &mut self.history[Self::slot(b)];
            h.push(*t);
            self.index_of.insert(*t, (b, h.len() - 1));
        }
    }

    /// A trim of `blocks` blocks from `block` was submitted; returns each block's
    /// position in its history, for [`Oracle::acked_trim`].
    pub fn trim_submitted(&mut self, block: u64, blocks: u64) -> Vec<usize> {
        (block..block + blocks)
            .map(|b| {
                let h = &mut self.history[Self::slot(b)];
                h.push(0);
                h.len() - 1
            })
            .collect()
    }

    /// That trim was acknowledged.
    pub fn acked_trim(&mut self, block: u64, positions: &[usize]) {
        for (b, &idx) in (block..).zip(positions) {
            let a = &mut self.acked[Self::slot(b)];
            *a = Some(a.map_or(idx, |x| x.max(idx)));
        }
    }

    /// Does `block` hold zeroes from a trim at or after history position `min`?
    fn trimmed_since(&self, block: u64, min: usize) -> bool {
        self.history[Self::slot(block)][min..].contains(&0)
    }

    /// That write was acknowledged.
    pub fn acked(&mut self, block: u64, tokens: &[u64]) {
        for t in tokens {
            if let Some(&(b, idx)) = self.index_of.get(t) {
                let a = &mut self.acked[Self::slot(b)];
                *a = Some(a.map_or(idx, |x| x.max(idx)));
            }
        }
        let _ = block;
    }

    /// A flush was submitted on `node`.
    pub fn flush_submitted(&mut self, req: ReqId, node: usize) {
        self.flush_pending.insert(req, (node, self.acked.clone()));
    }

    /// That flush completed successfully; with `peer_too` it promised the peer's
    /// stable storage as well (it went through a barrier the peer acknowledged); with
    /// `local` false (the node's own disk had failed) it promised only the peer's.
    pub fn flushed(&mut self, req: ReqId, peer_too: bool, local: bool) {
        if let Some((node, snapshot)) = self.flush_pending.remove(&req) {
            let nodes: Vec<usize> = [(node, local), (1 - node, peer_too)]
                .into_iter()
                .filter_map(|(n, promised)| promised.then_some(n))
                .collect();
            for &n in &nodes {
                for (f, s) in self.flushed[n].iter_mut().zip(&snapshot) {
                    if let Some(s) = *s {
                        *f = Some(f.map_or(s, |x| x.max(s)));
                    }
                }
            }
        }
    }

    /// Protocol A lost acknowledged writes of `block` with its primary (its trade-off):
    /// what the survivor holds, `token`, becomes the newest acknowledged state there, for
    /// the acknowledged floor and the flushed floors of both nodes alike.
    pub fn rebase(&mut self, block: u64, token: u64) {
        let slot = Self::slot(block);
        let floor = self.acked[slot];
        let position = match self.index_of.get(&token) {
            Some(&(b, idx)) if b == block => Some(idx),
            // Zeroes: the latest trim at or before the floor, or nothing ever written.
            _ => floor.and_then(|f| self.history[slot][..=f].iter().rposition(|&t| t == 0)),
        };
        let lower = |f: &mut Option<usize>| {
            if f.is_some_and(|x| position.is_none_or(|p| x > p)) {
                *f = position;
            }
        };
        lower(&mut self.acked[slot]);
        for n in 0..2 {
            lower(&mut self.flushed[n][slot]);
        }
        for (_, snapshot) in self.flush_pending.values_mut() {
            lower(&mut snapshot[slot]);
        }
    }

    /// The place of write `token` in the history of `block` (None if it was not
    /// written there).
    pub fn position(&self, block: u64, token: u64) -> Option<usize> {
        match self.index_of.get(&token) {
            Some(&(b, idx)) if b == block => Some(idx),
            _ => None,
        }
    }

    /// The newest acknowledged write of `block` (its place in the block's history).
    pub fn floor(&self, block: u64) -> Option<usize> {
        self.acked[Self::slot(block)]
    }

    /// `node`'s disk failed: what earlier flushes promised about its stable storage is
    /// gone with it (the peer's copy is what they promised now).
    pub fn disk_lost(&mut self, node: usize) {
        for f in &mut self.flushed[node] {
            *f = None;
        }
    }

    /// `node` crashed: its unanswered flushes are gone.
    pub fn node_crashed(&mut self, node: usize) {
        self.flush_pending.retain(|_, (n, _)| *n != node);
    }

    /// Is `token` an acceptable content of `block` for a live copy?
    pub fn check_block(&self, block: u64, token: u64) -> Result<(), String> {
        self.check_at_least(block, self.acked[Self::slot(block)], token)
    }

    /// Is `token` at or after history position `floor` of `block` (a [`Oracle::floor`])?
    pub fn check_at_least(
        &self,
        block: u64,
        floor: Option<usize>,
        token: u64,
    ) -> Result<(), String> {
        let Some(min) = floor else {
            return Ok(());
        };
        if token == 0 && self.trimmed_since(block, min) {
            return Ok(());
        }
        match self.index_of.get(&token) {
            Some(&(b, idx)) if b == block && idx >= min => Ok(()),
            _ => Err(format!(
                "block {block} holds token {token} but write token {} was acknowledged",
                self.history[Self::slot(block)][min]
            )),
        }
    }

    /// Is `token` acceptable for the stable storage of `node` (flushed writes kept)?
    pub fn check_flushed(&self, node: usize, block: u64, token: u64) -> Result<(), String> {
        let Some(min) = self.flushed[node][Self::slot(block)] else {
            return Ok(());
        };
        if token == 0 && self.trimmed_since(block, min) {
            return Ok(());
        }
        match self.index_of.get(&token) {
            Some(&(b, idx)) if b == block && idx >= min => Ok(()),
            _ => Err(format!(
                "block {block} on node {node}'s stable storage holds token {token}, older than \
                 token {} which was acknowledged before a completed flush",
                self.history[Self::slot(block)][min]
            )),
        }
    }
}
