//! What a path names (SCSI disk, sg node, NVMe namespace, multipath map, something else) and
//! opening the right transport for it. Identification goes through sysfs
//! (`/sys/dev/{block,char}/MAJ:MIN`), so symlinks such as `/dev/disk/by-id/…` and
//! `/dev/mapper/…` work.

use super::block_pr::BlockPrDevice;
use super::multipath::{Multipath, multipath_members};
use super::nvme::NvmeDevice;
use super::scsi::SgDevice;
use super::{DEFAULT_TIMEOUT_MS, PrTransport};
use crate::error::{FenceError, Result};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What kind of device a path is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DeviceKind {
    ScsiDisk {
        name: String,
    },
    ScsiGeneric {
        name: String,
    },
    NvmeNamespace {
        name: String,
    },
    /// An NVMe controller character device: reservations need a namespace.
    NvmeController {
        name: String,
    },
    Multipath {
        name: String,
        members: Vec<PathBuf>,
    },
    Partition {
        name: String,
        disk: String,
    },
    /// Any other block device (loop, virtio, nbd, non-multipath dm, ...).
    OtherBlock {
        name: String,
    },
    OtherChar {
        name: String,
    },
    NotADevice,
}

/// How to send commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// SG_IO for SCSI, passthrough for NVMe, every path of a multipath map.
    #[default]
    Auto,
    /// SG_IO, whatever the device claims to be.
    SgIo,
    /// The block layer's `IOC_PR_*` ioctls for PR OUT (reads still via SG_IO or NVMe).
    BlockIoctl,
    /// NVMe passthrough.
    Nvme,
}

/// How to open a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenOptions {
    pub method: Method,
    /// Per-command timeout.
    pub timeout_ms: u32,
    /// Open read-only (PR IN only).
    pub read_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            method: Method::Auto,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            read_only: false,
        }
    }
}

/// Classifies a sysfs device `name` (the last component of its `/sys/dev/...` link).
fn classify(block: bool, name: &str, sysfs_root: &Path) -> Result<DeviceKind> {
    let name_s = name.to_owned();
    let digits_after = |prefix: &str| {
        name.strip_prefix(prefix)
            .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit()))
    };
    let is_nvme_namespace = |n: &str, prefix: &str| {
        n.strip_prefix(prefix).is_some_and(|rest| {
            let mut parts = rest.splitn(2, 'n');
            let ctrl = parts.next().unwrap_or("");
            let ns = parts.next().unwrap_or("");
            let ctrl = ctrl.split('c').next().unwrap_or("");
            !ctrl.is_empty()
                && ctrl.chars().all(|c| c.is_ascii_digit())
                && !ns.is_empty()
                && ns.chars().all(|c| c.is_ascii_digit())
        })
    };
    if block {
        let dir = sysfs_root.join("class/block").join(name);
        if dir.join("partition").exists() {
            let disk = std::fs::canonicalize(&dir)
                .ok()
                .and_then(|p| {
                    p.parent()
                        .and_then(|d| d.file_name())
                        .map(|s| s.to_string_lossy().into_owned())
                })
                .unwrap_or_default();
            return Ok(DeviceKind::Partition { name: name_s, disk });
        }
        if name.starts_with("sd") {
            return Ok(DeviceKind::ScsiDisk { name: name_s });
        }
        if is_nvme_namespace(name, "nvme") {
            return Ok(DeviceKind::NvmeNamespace { name: name_s });
        }
        if digits_after("dm-") {
            let uuid = std::fs::read_to_string(sysfs_root.join("block").join(name).join("dm/uuid"))
                .unwrap_or_default();
            if uuid.trim().starts_with("mpath-") {
                let members = multipath_members(sysfs_root, name)?;
                return Ok(DeviceKind::Multipath {
                    name: name_s,
                    members,
                });
            }
        }
        return Ok(DeviceKind::OtherBlock { name: name_s });
    }
    if digits_after("sg") {
        return Ok(DeviceKind::ScsiGeneric { name: name_s });
    }
    if is_nvme_namespace(name, "ng") {
        return Ok(DeviceKind::NvmeNamespace { name: name_s });
    }
    if digits_after("nvme") {
        return Ok(DeviceKind::NvmeController { name: name_s });
    }
    Ok(DeviceKind::OtherChar { name: name_s })
}

/// Identifies what `path` is.
pub fn identify(path: &Path) -> Result<DeviceKind> {
    identify_in(path, Path::new("/sys"))
}

fn identify_in(path: &Path, sysfs_root: &Path) -> Result<DeviceKind> {
    let meta = std::fs::metadata(path).map_err(|source| FenceError::Open {
        device: path.display().to_string(),
        source,
    })?;
    let ft = meta.file_type();
    let block = ft.is_block_device();
    if !block && !ft.is_char_device() {
        return Ok(DeviceKind::NotADevice);
    }
    let rdev = meta.rdev();
    let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
    let link = sysfs_root
        .join("dev")
        .join(if block { "block" } else { "char" })
        .join(format!("{major}:{minor}"));
    let name = std::fs::read_link(&link)
        .ok()
        .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| format!("{major}:{minor}"));
    classify(block, &name, sysfs_root)
}

fn wrong(path: &str, detail: impl Into<String>) -> FenceError {
    FenceError::WrongDeviceType {
        device: path.to_owned(),
        detail: detail.into(),
    }
}

/// Opens `path` with the transport its kind (or `options.method`) calls for.
pub fn open(path: &str, options: &OpenOptions) -> Result<Box<dyn PrTransport>> {
    let timeout = options.timeout_ms;
    match options.method {
        Method::SgIo => return Ok(Box::new(SgDevice::open(path, options.read_only, timeout)?)),
        Method::Nvme => return Ok(Box::new(NvmeDevice::open(path, timeout)?)),
        Method::Auto | Method::BlockIoctl => {}
    }
    let kind = identify(Path::new(path))?;
    let ioctl = options.method == Method::BlockIoctl;
    match kind {
        DeviceKind::ScsiDisk { .. } if ioctl => {
            Ok(Box::new(BlockPrDevice::open_scsi(path, timeout)?))
        }
        DeviceKind::NvmeNamespace { .. } if ioctl => {
            Ok(Box::new(BlockPrDevice::open_nvme(path, timeout)?))
        }
        DeviceKind::ScsiDisk { .. } | DeviceKind::ScsiGeneric { .. } => {
            Ok(Box::new(SgDevice::open(path, options.read_only, timeout)?))
        }
        DeviceKind::NvmeNamespace { .. } => Ok(Box::new(NvmeDevice::open(path, timeout)?)),
        // Through the block layer the map is one device: dm sends IOC_PR_REGISTER to every
        // path itself, and passes SG_IO (our reads) to the current path.
        DeviceKind::Multipath { .. } if ioctl => {
            Ok(Box::new(BlockPrDevice::open_scsi(path, timeout)?))
        }
        DeviceKind::Multipath { members, .. } => {
            let paths = members
                .iter()
                .map(|m| open(&m.to_string_lossy(), options))
                .collect::<Result<Vec<_>>>()?;
            Ok(Box::new(Multipath::new(path, paths)))
        }
        DeviceKind::Partition { name, disk } => Err(wrong(
            path,
            format!("is partition {name}; reservations belong to the whole disk: use /dev/{disk}"),
        )),
        DeviceKind::NvmeController { name } => Err(wrong(
            path,
            format!(
                "is NVMe controller {name}; reservations are per namespace: use /dev/{name}n1 (or the right namespace)"
            ),
        )),
        DeviceKind::OtherBlock { name } => Err(wrong(
            path,
            format!(
                "is block device {name}, which is neither a SCSI disk, an NVMe namespace nor a multipath map"
            ),
        )),
        DeviceKind::OtherChar { name } => Err(wrong(
            path,
            format!("is character device {name}, not a SCSI generic (sg) or NVMe device"),
        )),
        DeviceKind::NotADevice => Err(wrong(path, "is not a device node")),
    }
}

/// Opens every path to the LU behind `path`: the members of a multipath map (with
/// [`Method::Auto`]; through the block layer the map itself fans out), or `path`.
pub fn open_paths(path: &str, options: &OpenOptions) -> Result<Vec<Box<dyn PrTransport>>> {
    if options.method == Method::Auto
        && let DeviceKind::Multipath { members, .. } = identify(Path::new(path))?
    {
        return members
            .iter()
            .map(|m| open(&m.to_string_lossy(), options))
            .collect();
    }
    Ok(vec![open(path, options)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_classify() {
        let root = std::env::temp_dir().join(format!("fence-classify-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let c = |block, name| classify(block, name, &root).unwrap();
        assert_eq!(c(true, "sdb"), DeviceKind::ScsiDisk { name: "sdb".into() });
        assert_eq!(
            c(false, "sg3"),
            DeviceKind::ScsiGeneric { name: "sg3".into() }
        );
        assert_eq!(
            c(true, "nvme0n1"),
            DeviceKind::NvmeNamespace {
                name: "nvme0n1".into()
            }
        );
        assert_eq!(
            c(true, "nvme1c2n3"),
            DeviceKind::NvmeNamespace {
                name: "nvme1c2n3".into()
            }
        );
        assert_eq!(
            c(false, "ng0n1"),
            DeviceKind::NvmeNamespace {
                name: "ng0n1".into()
            }
        );
        assert_eq!(
            c(false, "nvme0"),
            DeviceKind::NvmeController {
                name: "nvme0".into()
            }
        );
        assert_eq!(
            c(true, "loop0"),
            DeviceKind::OtherBlock {
                name: "loop0".into()
            }
        );
        assert_eq!(
            c(true, "dm-4"),
            DeviceKind::OtherBlock {
                name: "dm-4".into()
            }
        );
        assert_eq!(
            c(false, "1:3"),
            DeviceKind::OtherChar { name: "1:3".into() }
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn opening_things_that_are_not_pr_devices_says_what_they_are() {
        let e = open("/dev/null", &OpenOptions::default()).unwrap_err();
        assert!(matches!(e, FenceError::WrongDeviceType { .. }), "{e}");
        assert!(e.to_string().contains("character device"), "{e}");
        let e = open("/proc/self/status", &OpenOptions::default()).unwrap_err();
        assert!(e.to_string().contains("not a device node"), "{e}");
        let e = open("/nonexistent/disk", &OpenOptions::default()).unwrap_err();
        assert!(matches!(e, FenceError::Open { .. }), "{e}");
    }
}
