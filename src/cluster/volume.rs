//! The seam between the cluster and a replicated volume.
//!
//! The cluster decides (promote, demote, epoch, suspend); a [`VolumeDriver`] carries it out
//! on the local replica and reports back. The replication engine implements it for real
//! volumes; [`MemoryDriver`] models a replica's role and disk state for tests of the
//! orchestration alone.

use super::orchestrator::{DiskState, ReplicaReport, ReplicaRole};
use super::types::{Epoch, NodeId};
use crate::replication::types::ClusterLogId;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

/// A boxed future, so drivers can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the cluster asks a local replica to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeAction {
    /// Become primary at `epoch` (writes allowed once this returns); `force` makes a
    /// fresh (Inconsistent) replica the initial sync source.
    Promote {
        epoch: Epoch,
        force: bool,
        /// The cluster log the epoch belongs to (a replica's metadata follows one log).
        log: ClusterLogId,
    },
    /// Flush and become secondary.
    Demote,
    /// The volume epoch changed; refuse peers from older epochs.
    SetEpoch { epoch: Epoch, log: ClusterLogId },
    /// Stop acknowledging writes (no quorum): hold them until Resume or a demotion.
    Suspend,
    /// Acknowledge writes again.
    Resume,
    /// This node was fenced: fail what is in flight (never acknowledged) and become
    /// secondary now, without waiting for anyone.
    StepDown,
}

/// The cluster asks a primary's node to record its peer as Outdated before the primary
/// acknowledges writes without it. Implemented by the node (through the cluster log).
pub trait OutdatePeer: Send + Sync {
    /// Records `peer` Outdated for `volume`; `Err` means the primary must not write alone
    /// (no quorum, or it is no longer primary) and should keep I/O suspended.
    fn outdate_peer(&self, volume: &str, peer: NodeId) -> BoxFuture<'_, Result<(), String>>;
}

/// A local replica as the cluster sees it.
pub trait VolumeDriver: Send + Sync {
    /// Current state, for heartbeats (may be a little old).
    fn report(&self) -> ReplicaReport;
    /// Current state read now, for decisions that must not rest on an old snapshot.
    fn fresh_report(&self) -> BoxFuture<'_, ReplicaReport> {
        Box::pin(async move { self.report() })
    }
    /// Carries out an action; `Err` explains why it could not.
    fn apply(&self, action: VolumeAction) -> BoxFuture<'_, Result<(), String>>;
    /// Serve application I/O, while primary, only under the node's quorum lease
    /// (replicas with a data path in tandemd; others have nothing to gate).
    fn follow_lease(&self, _holder: &crate::replication::lease::LeaseHolder) {}
    /// Operator split-brain resolution: throw away this replica's changes and resync.
    fn discard_my_data(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Err("this volume does not support split-brain resolution".to_owned()) })
    }
}

/// A replica modelled in memory: role, disk state, epoch, suspension. Used to test the
/// orchestration without a data path.
#[derive(Debug, Clone)]
pub struct MemoryDriver {
    report: Arc<Mutex<ReplicaReport>>,
}

impl MemoryDriver {
    /// An UpToDate secondary.
    pub fn up_to_date() -> Self {
        Self {
            report: Arc::new(Mutex::new(ReplicaReport {
                disk: DiskState::UpToDate,
                connected: true,
                ..ReplicaReport::default()
            })),
        }
    }

    /// Models the replica seeing its peer finish a resync (a PeerDisk→UpToDate
    /// transition, the evidence a primary needs before it clears its peer's Outdated).
    pub fn peer_resynced(&self) {
        self.update(|r| {
            r.peer_disk = DiskState::UpToDate;
            r.peer_uptodate_events += 1;
        });
    }

    /// Changes the modelled state (tests).
    pub fn update(&self, f: impl FnOnce(&mut ReplicaReport)) {
        f(&mut self.report.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl VolumeDriver for MemoryDriver {
    fn report(&self) -> ReplicaReport {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn apply(&self, action: VolumeAction) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
            match action {
                VolumeAction::Promote { epoch, force, .. } => {
                    if !force && !matches!(r.disk, DiskState::UpToDate | DiskState::Consistent) {
                        return Err(format!("cannot promote a {:?} replica", r.disk));
                    }
                    r.role = ReplicaRole::Primary;
                    r.epoch = epoch;
                }
                VolumeAction::Demote => r.role = ReplicaRole::Secondary,
                VolumeAction::SetEpoch { epoch, .. } => r.epoch = epoch,
                VolumeAction::Suspend => r.suspended = true,
                VolumeAction::Resume => r.suspended = false,
                VolumeAction::StepDown => {
                    r.role = ReplicaRole::Secondary;
                    r.suspended = false;
                }
            }
            Ok(())
        })
    }
}
