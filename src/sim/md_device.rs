//! The simulated metadata device: the metadata region of a node's disk (internal
//! metadata, so it dies with the disk), written by the real [`MetadataFile`] encoders.
//!
//! A write is durable when it returns (the real device is opened `O_DSYNC`), but a
//! metadata action takes time: a power loss while one runs leaves its block writes done
//! in order up to some point, the write at that point torn at a 512-byte sector boundary
//! or not done, and nothing after it — what a disk without atomic 4 KiB writes does.
//!
//! [`MetadataFile`]: crate::store::metadata::MetadataFile

use super::SimRng;
use crate::store::metadata::MetadataDevice;
use std::sync::{Arc, Mutex, MutexGuard};

const SECTOR: usize = 512;

/// A handle on one node's metadata medium (the node's [`MetadataFile`] holds another).
///
/// [`MetadataFile`]: crate::store::metadata::MetadataFile
#[derive(Debug, Clone)]
pub struct SimMdDevice(Arc<Mutex<Medium>>);

#[derive(Debug)]
struct Medium {
    bytes: Vec<u8>,
    /// The disk died: every read and write fails.
    failed: bool,
    /// The writes of the metadata action in flight, in order: where, and what the bytes
    /// there were before.
    in_flight: Vec<(usize, Vec<u8>)>,
}

fn eio() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::EIO)
}

impl SimMdDevice {
    pub fn new(size: u64) -> Self {
        Self(Arc::new(Mutex::new(Medium {
            bytes: vec![0; usize::try_from(size).expect("small")],
            failed: false,
            in_flight: Vec::new(),
        })))
    }

    fn medium(&self) -> MutexGuard<'_, Medium> {
        // Single-threaded simulation: a poisoned lock means a panic is already unwinding.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The disk dies (or comes back, with what it held).
    pub fn set_failed(&self, failed: bool) {
        self.medium().failed = failed;
    }

    /// A metadata action starts: the writes from here on are the ones a power loss can
    /// interrupt.
    pub fn begin_action(&self) {
        self.medium().in_flight.clear();
    }

    /// The action in flight finished.
    pub fn end_action(&self) {
        self.medium().in_flight.clear();
    }

    /// Power loss while the action in flight runs. Returns how many of its block writes
    /// were lost or torn (for the trace).
    pub fn power_loss(&self, rng: &mut SimRng) -> usize {
        let mut m = self.medium();
        let writes = std::mem::take(&mut m.in_flight);
        if writes.is_empty() {
            return 0;
        }
        let n = writes.len();
        // Writes before `done` reached the medium; the one at `done` (if any) is torn or
        // lost, and those after it are lost.
        let done = usize::try_from(rng.below(u64::try_from(n).expect("small") + 1)).expect("small");
        let tear = rng.chance(50);
        for (i, (at, before)) in writes.into_iter().enumerate().rev() {
            if i < done {
                continue;
            }
            if i == done && tear {
                // Each sector of the block made it or not.
                for s in (0..before.len()).step_by(SECTOR) {
                    if rng.chance(50) {
                        let end = (s + SECTOR).min(before.len());
                        m.bytes[at + s..at + end].copy_from_slice(&before[s..end]);
                    }
                }
            } else {
                m.bytes[at..at + before.len()].copy_from_slice(&before);
            }
        }
        n - done
    }
}

impl MetadataDevice for SimMdDevice {
    fn read_md_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        let m = self.medium();
        if m.failed {
            return Err(eio());
        }
        let at = usize::try_from(at).map_err(|_| eio())?;
        let src = m.bytes.get(at..at + buf.len()).ok_or_else(eio)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_md_at(&self, buf: &[u8], at: u64) -> std::io::Result<()> {
        let mut m = self.medium();
        if m.failed {
            return Err(eio());
        }
        let at = usize::try_from(at).map_err(|_| eio())?;
        let end = at + buf.len();
        if end > m.bytes.len() {
            return Err(eio());
        }
        let before = m.bytes[at..end].to_vec();
        m.in_flight.push((at, before));
        m.bytes[at..end].copy_from_slice(buf);
        Ok(())
    }

    fn size_bytes(&self) -> std::io::Result<u64> {
        Ok(u64::try_from(self.medium().bytes.len()).expect("fits"))
    }
}
