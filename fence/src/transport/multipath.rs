//! Device-mapper multipath: a reservation key must be registered on every path (every I_T
//! nexus), or I/O through an unregistered path fails with RESERVATION CONFLICT once a
//! registrants-only reservation is in place. The member paths come from sysfs
//! (`/sys/block/dm-N/slaves/`).

use super::PrTransport;
use crate::Operation;
use crate::error::{FenceError, Result};
use crate::pr::data::PrInData;
use crate::pr::inquiry::InquiryData;
use crate::pr::{PrInAction, PrOutAction, PrOutCommand};
use std::path::{Path, PathBuf};

/// The member devices (`/dev/sdX`) of multipath map `dm_name` (e.g. `dm-3`), read from
/// `sysfs_root/block/<dm_name>/`. Refuses dm devices that are not multipath maps.
pub fn multipath_members(sysfs_root: &Path, dm_name: &str) -> Result<Vec<PathBuf>> {
    let dir = sysfs_root.join("block").join(dm_name);
    let uuid = std::fs::read_to_string(dir.join("dm/uuid")).unwrap_or_default();
    if !uuid.trim().starts_with("mpath-") {
        return Err(FenceError::WrongDeviceType {
            device: format!("/dev/{dm_name}"),
            detail: format!(
                "is a device-mapper device but not a multipath map (dm uuid `{}`); reservations go to the underlying disks",
                uuid.trim()
            ),
        });
    }
    let mut members: Vec<PathBuf> = std::fs::read_dir(dir.join("slaves"))
        .map_err(|source| FenceError::Open {
            device: dir.join("slaves").display().to_string(),
            source,
        })?
        .filter_map(|e| e.ok())
        .map(|e| PathBuf::from("/dev").join(e.file_name()))
        .collect();
    members.sort();
    if members.is_empty() {
        return Err(FenceError::NoPaths {
            op: Operation::PrIn(PrInAction::ReadKeys),
        });
    }
    Ok(members)
}

/// All paths of one multipath LU as one transport: registrations go to every path; other
/// commands to the first path that answers.
#[derive(Debug)]
pub struct Multipath {
    name: String,
    paths: Vec<Box<dyn PrTransport>>,
}

/// Whether an error says the path (not the device) failed, so another path may work.
fn is_path_failure(e: &FenceError) -> bool {
    matches!(
        e,
        FenceError::Transport { .. }
            | FenceError::Timeout { .. }
            | FenceError::Ioctl { .. }
            | FenceError::Open { .. }
    )
}

impl Multipath {
    pub fn new(name: &str, paths: Vec<Box<dyn PrTransport>>) -> Self {
        Self {
            name: name.to_owned(),
            paths,
        }
    }

    pub fn paths(&self) -> &[Box<dyn PrTransport>] {
        &self.paths
    }

    /// Runs `f` on paths in order until one answers (success or a device-level error).
    fn first_answer<T>(
        &self,
        op: Operation,
        f: impl Fn(&dyn PrTransport) -> Result<T>,
    ) -> Result<T> {
        let mut failures = Vec::new();
        for path in &self.paths {
            match f(path.as_ref()) {
                Err(e) if is_path_failure(&e) => {
                    failures.push((path.name().to_owned(), e.to_string()))
                }
                other => return other,
            }
        }
        if failures.is_empty() {
            Err(FenceError::NoPaths { op })
        } else {
            Err(FenceError::AllPathsFailed { op, failures })
        }
    }
}

impl PrTransport for Multipath {
    fn name(&self) -> &str {
        &self.name
    }

    fn pr_in(&self, action: PrInAction) -> Result<PrInData> {
        self.first_answer(Operation::PrIn(action), |p| p.pr_in(action))
    }

    fn pr_in_raw(&self, action: PrInAction, allocation_length: u16) -> Result<(PrInData, Vec<u8>)> {
        self.first_answer(Operation::PrIn(action), |p| {
            p.pr_in_raw(action, allocation_length)
        })
    }

    fn inquiry(&self) -> Result<Option<InquiryData>> {
        self.first_answer(Operation::Inquiry, |p| p.inquiry())
    }

    fn pr_out(&self, command: &PrOutCommand) -> Result<()> {
        let op = Operation::PrOut(command.action);
        if !matches!(
            command.action,
            PrOutAction::Register | PrOutAction::RegisterAndIgnoreExistingKey
        ) {
            return self.first_answer(op, |p| p.pr_out(command));
        }
        if self.paths.is_empty() {
            return Err(FenceError::NoPaths { op });
        }
        let failures: Vec<(String, String)> = self
            .paths
            .iter()
            .filter_map(|p| {
                p.pr_out(command)
                    .err()
                    .map(|e| (p.name().to_owned(), e.to_string()))
            })
            .collect();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(FenceError::AllPathsFailed { op, failures })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_come_from_sysfs_and_only_for_multipath_maps() {
        let root = std::env::temp_dir().join(format!("fence-sysfs-{}", std::process::id()));
        let mp = root.join("block/dm-0");
        std::fs::create_dir_all(mp.join("dm")).unwrap();
        std::fs::create_dir_all(mp.join("slaves/sdc")).unwrap();
        std::fs::create_dir_all(mp.join("slaves/sdb")).unwrap();
        std::fs::write(mp.join("dm/uuid"), "mpath-360014051234\n").unwrap();
        assert_eq!(
            multipath_members(&root, "dm-0").unwrap(),
            vec![PathBuf::from("/dev/sdb"), PathBuf::from("/dev/sdc")]
        );
        let lvm = root.join("block/dm-1");
        std::fs::create_dir_all(lvm.join("dm")).unwrap();
        std::fs::write(lvm.join("dm/uuid"), "LVM-abc\n").unwrap();
        let e = multipath_members(&root, "dm-1").unwrap_err();
        assert!(e.to_string().contains("not a multipath map"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
