//! After a resync both copies are identical.
use crate::sim::SimDisk;

/// Compares both disks block by block.
pub fn check(a: &SimDisk, b: &SimDisk) -> Result<(), String> {
    let differing: Vec<u64> = (0..a.blocks())
        .filter(|&i| a.read(i) != b.read(i))
        .collect();
    if differing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "after resync {} blocks differ, first {:?} ({} vs {})",
            differing.len(),
            &differing[..differing.len().min(8)],
            a.read(differing[0]),
            b.read(differing[0])
        ))
    }
}
