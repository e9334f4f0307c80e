//! Volumes on shared devices (a SAN or iSCSI LUN every data node reaches): no data is
//! replicated; the cluster log says who may write, and reservations enforce it.

use super::orchestrator::{DiskState, ReplicaReport, ReplicaRole};
use super::volume::{BoxFuture, VolumeAction, VolumeDriver};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// The local view of a shared-device volume.
#[derive(Debug, Clone)]
pub struct SharedDisk {
    device: PathBuf,
    report: Arc<Mutex<ReplicaReport>>,
}

impl SharedDisk {
    /// A shared volume reached at `device` on this node.
    pub fn new(device: PathBuf) -> Self {
        let report = ReplicaReport {
            // The one copy is on the LU: as current as it gets, and "connected" to
            // itself. Whether this node may write is the reservations' business.
            disk: if device.exists() {
                DiskState::UpToDate
            } else {
                DiskState::Diskless
            },
            connected: true,
            device: Some(device.display().to_string()),
            ..ReplicaReport::default()
        };
        Self {
            device,
            report: Arc::new(Mutex::new(report)),
        }
    }
}

impl VolumeDriver for SharedDisk {
    fn report(&self) -> ReplicaReport {
        let mut report = self
            .report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        report.disk = if self.device.exists() {
            DiskState::UpToDate
        } else {
            DiskState::Diskless
        };
        report
    }

    fn apply(&self, action: VolumeAction) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let mut r = self.report.lock().unwrap_or_else(|e| e.into_inner());
            match action {
                VolumeAction::Promote { epoch, .. } => {
                    if !self.device.exists() {
                        return Err(format!(
                            "shared device {} is missing on this node",
                            self.device.display()
                        ));
                    }
                    r.role = ReplicaRole::Primary;
                    r.epoch = epoch;
                    r.suspended = false;
                }
                VolumeAction::Demote => r.role = ReplicaRole::Secondary,
                VolumeAction::SetEpoch { epoch, .. } => r.epoch = epoch,
                VolumeAction::Suspend => {
                    r.suspended = true;
                    r.role = ReplicaRole::Secondary;
                }
                VolumeAction::Resume => r.suspended = false,
                VolumeAction::StepDown => {
                    r.suspended = false;
                    r.role = ReplicaRole::Secondary;
                }
            }
            Ok(())
        })
    }
}
