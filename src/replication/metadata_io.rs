//! The replica's metadata actions carried out on a metadata region: one implementation
//! for tandemd's shell and the simulator, so the simulator loads and writes exactly what
//! tandemd does, through the same encoders, and a failed write ends its batch the same way.

use super::core::{Action, IoTag, MdState, Persisted};
use super::types::{ClusterLogId, Epoch};
use crate::error::{Result, TandemError};
use crate::store::metadata::{BitmapLoad, MetadataDevice, MetadataFile};
use std::io::Write;
use std::path::Path;

/// What a replica starts from: the superblock, bitmap and activity log on disk (bitmap
/// blocks that fail their check come back all-dirty, listed in the [`BitmapLoad`]).
pub fn load<D: MetadataDevice>(md: &MetadataFile<D>) -> Result<(Persisted, BitmapLoad)> {
    let (bitmap, load) = md.read_bitmap()?;
    let al_extents = md.read_al()?.map(|(_, e)| e).unwrap_or_default();
    let sb = md.superblock();
    let persisted = Persisted {
        md: MdState {
            generations: sb.generations,
            flags: sb.flags,
            epoch: sb.epoch,
            primary_since_ms: sb.primary_since_ms,
            cluster_log: sb.cluster_log,
        },
        bitmap,
        al_extents,
        al_extent_bytes: sb.al_extent_bytes,
        al_capacity: sb.al_extents,
        diskless: false,
    };
    Ok((persisted, load))
}

/// Carries out a metadata action (`Persist*`; any other action is not this module's and
/// does nothing). `PersistAl` must follow a flush of the data device: the caller's part,
/// as the flush goes to the data store.
pub fn write<D: MetadataDevice>(md: &mut MetadataFile<D>, action: &Action) -> Result<()> {
    match action {
        Action::PersistSuperblock(state) => {
            let mut sb = md.superblock().clone();
            sb.generations = state.generations;
            sb.flags = state.flags;
            sb.epoch = state.epoch;
            sb.primary_since_ms = state.primary_since_ms;
            sb.cluster_log = state.cluster_log;
            md.write_superblock(&sb)
        }
        Action::PersistAl { extents } => md.write_al(extents),
        Action::PersistBitmap { blocks } => {
            for (b, words) in blocks {
                md.write_bitmap_words(*b, words)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Writes what a disk that failed must come back with: no generations and not
/// Consistent, so it takes a full sync from its peer (what the core wrote when the disk
/// failed, if that write reached the disk at all). The caller does this when it starts on
/// a disk whose failure was recorded ([`Action::RecordDiskFailure`]), and forgets the
/// record only once this write succeeded.
pub fn forget_generations<D: MetadataDevice>(md: &mut MetadataFile<D>) -> Result<()> {
    let mut sb = md.superblock().clone();
    sb.generations = Default::default();
    sb.flags.consistent = false;
    md.write_superblock(&sb)
}

/// `tandemctl forget-cluster-log` on a stopped replica: the superblock's cluster log and
/// epoch go back to none and 0, generations, flags and the bitmap stay (the data's
/// history is the data's); the replica joins its cluster's log at its next start.
/// Returns what it forgot.
pub fn forget_cluster_log<D: MetadataDevice>(
    md: &mut MetadataFile<D>,
) -> Result<(ClusterLogId, Epoch)> {
    let mut sb = md.superblock().clone();
    let before = (sb.cluster_log, sb.epoch);
    sb.cluster_log = ClusterLogId::NONE;
    sb.epoch = Epoch(0);
    md.write_superblock(&sb)?;
    Ok(before)
}

/// Is this a metadata action?
pub fn is_metadata(action: &Action) -> bool {
    matches!(
        action,
        Action::PersistSuperblock(_) | Action::PersistAl { .. } | Action::PersistBitmap { .. }
    )
}

/// What becomes of a later action of a batch in which a metadata write failed (the core
/// has then detached the disk). The core placed the metadata write first because what
/// follows needs it (a write needs its activity-log extent on disk), so:
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterMetadataFailure {
    /// Not disk I/O: it runs.
    Run,
    /// A metadata write for a detached disk: dropped.
    Skip,
    /// Local I/O: not run, answered to the core as failed so it accounts for it.
    Fail(IoTag),
}

pub fn after_metadata_failure(action: &Action) -> AfterMetadataFailure {
    match action {
        Action::LocalWrite { tag, .. }
        | Action::LocalTrim { tag, .. }
        | Action::LocalRead { tag, .. }
        | Action::LocalFlush { tag } => AfterMetadataFailure::Fail(*tag),
        a if is_metadata(a) => AfterMetadataFailure::Skip,
        _ => AfterMetadataFailure::Run,
    }
}

/// The error a local I/O skipped after a failed metadata write reports.
pub const NOT_RUN_AFTER_METADATA_FAILURE: &str =
    "not run: the disk was detached after a failed metadata write";

/// Makes the record that this node's disk failed durable at `path` (in the node's state
/// directory, not on the failed disk): the file, then its directory entry.
pub fn write_failure_record(path: &Path, reason: &str) -> Result<()> {
    let io = |what: &str, source| TandemError::Io {
        what: format!("{what} the disk-failure record {}", path.display()),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating the directory of", e))?;
    }
    let mut file = std::fs::File::create(path).map_err(|e| io("creating", e))?;
    writeln!(file, "{reason}").map_err(|e| io("writing", e))?;
    file.sync_all().map_err(|e| io("syncing", e))?;
    sync_parent(path).map_err(|e| io("syncing the directory of", e))
}

/// Starting on a disk whose failure was recorded at `path`: writes the forgotten
/// generations ([`forget_generations`]) and only then removes the record. Returns whether
/// there was one.
pub fn apply_failure_record<D: MetadataDevice>(
    md: &mut MetadataFile<D>,
    path: &Path,
) -> Result<bool> {
    if !path.exists() {
        return Ok(false);
    }
    forget_generations(md)?;
    let io = |source| TandemError::Io {
        what: format!("removing the disk-failure record {}", path.display()),
        source,
    };
    std::fs::remove_file(path).map_err(io)?;
    sync_parent(path).map_err(io)?;
    Ok(true)
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::File::open(dir)?.sync_all(),
        _ => Ok(()),
    }
}
