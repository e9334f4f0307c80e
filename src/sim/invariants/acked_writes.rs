//! Every acknowledged write is on the surviving copy (or overwritten by a later write).
use crate::sim::{Oracle, SimDisk};

/// Checks every block of `disk` (as reads see it) against the oracle.
pub fn check(oracle: &Oracle, disk: &SimDisk) -> Result<(), String> {
    for b in 0..disk.blocks() {
        oracle.check_block(b, disk.read(b))?;
    }
    Ok(())
}
