//! Writes acknowledged before a completed flush survive a crash of the node that
//! flushed them: a write across a flush never appears older than the flush promised.
use crate::sim::{Oracle, SimDisk};

/// Checks the stable storage of `node` after its crash.
pub fn check(oracle: &Oracle, node: usize, disk: &SimDisk) -> Result<(), String> {
    for b in 0..disk.blocks() {
        oracle.check_flushed(node, b, disk.stable(b))?;
    }
    Ok(())
}
