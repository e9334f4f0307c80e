//! The block layer's persistent-reservation ioctls (`linux/pr.h`), which work on SCSI disks,
//! device-mapper devices (dm forwards them to every path) and NVMe namespaces alike.
//!
//! Three things to know: the ioctls return the device's status as a *positive* value (24 =
//! RESERVATION CONFLICT; `PR_STS_*` codes for path and I/O failures), not as errno; their
//! type numbers are NVMe's, not SCSI's (PR_WRITE_EXCLUSIVE_REG_ONLY = 3 is SCSI type 5); and
//! Linux 6.12 has no read ioctls, so PR IN still goes through SG_IO. The kernel's sd driver
//! also sets APTPL on every IOC_PR_REGISTER by itself, and there is no way to ask for
//! ALL_TG_PT, SPEC_I_PT or REGISTER AND MOVE.

use super::deadline::Watchdog;
use super::nvme::NvmeDevice;
use super::scsi::SgDevice;
use super::{DEFAULT_TIMEOUT_MS, PrTransport};
use crate::Operation;
use crate::error::{FenceError, Result};
use crate::pr::data::PrInData;
use crate::pr::inquiry::InquiryData;
use crate::pr::{PrInAction, PrOutAction, PrOutCommand, ReservationType};
use crate::sys::{self, PrClear, PrIoctl, PrPreempt, PrRegistration, PrReservation};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

/// `PR_STS_*` from `include/linux/pr.h` (kernel side, returned as positive values).
const PR_STS_IOERR: i32 = 0x2;
const PR_STS_RESERVATION_CONFLICT: i32 = 0x18;
const PR_STS_RETRY_PATH_FAILURE: i32 = 0xe0000;
const PR_STS_PATH_FAST_FAILED: i32 = 0xf0000;
const PR_STS_PATH_FAILED: i32 = 0x10000;

/// PR OUT through `IOC_PR_*`; PR IN through SG_IO (SCSI) or NVMe passthrough.
#[derive(Debug)]
pub struct BlockPrDevice {
    name: String,
    file: Arc<File>,
    timeout_ms: u32,
    watchdog: Watchdog,
    reader: Box<dyn PrTransport>,
}

impl BlockPrDevice {
    fn open_with(path: &str, timeout_ms: u32, reader: Box<dyn PrTransport>) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| FenceError::Open {
                device: path.to_owned(),
                source,
            })?;
        Ok(Self {
            name: path.to_owned(),
            file: Arc::new(file),
            timeout_ms: if timeout_ms == 0 {
                DEFAULT_TIMEOUT_MS
            } else {
                timeout_ms
            },
            watchdog: Watchdog::default(),
            reader,
        })
    }

    /// A SCSI disk (or dm device over SCSI disks): reads through SG_IO.
    pub fn open_scsi(path: &str, timeout_ms: u32) -> Result<Self> {
        let reader = Box::new(SgDevice::open(path, true, timeout_ms)?);
        Self::open_with(path, timeout_ms, reader)
    }

    /// An NVMe namespace: reads through NVMe passthrough.
    pub fn open_nvme(path: &str, timeout_ms: u32) -> Result<Self> {
        let reader = Box::new(NvmeDevice::open(path, timeout_ms)?);
        Self::open_with(path, timeout_ms, reader)
    }

    fn request(command: &PrOutCommand, device: &str) -> Result<PrIoctl> {
        let op = Operation::PrOut(command.action);
        let unsupported = |reason: &str| FenceError::NotSupported {
            op,
            device: device.to_owned(),
            reason: format!("the block-layer PR ioctls cannot express {reason}"),
        };
        if command.all_tg_pt {
            return Err(unsupported("ALL_TG_PT"));
        }
        if command.spec_i_pt {
            return Err(unsupported("SPEC_I_PT"));
        }
        let pr_type = || -> Result<u32> {
            ReservationType::from_scsi(command.type_code)
                .map(ReservationType::linux_pr_code)
                .ok_or_else(|| FenceError::InvalidArgument {
                    what: "reservation type",
                    reason: format!(
                        "TYPE {} has no linux/pr.h equivalent (valid: 1, 3, 5, 6, 7, 8)",
                        command.type_code
                    ),
                })
        };
        let rk = command.reservation_key.get();
        let sark = command.service_action_key.get();
        Ok(match command.action {
            PrOutAction::Register => PrIoctl::Register(PrRegistration {
                old_key: rk,
                new_key: sark,
                flags: 0,
                pad: 0,
            }),
            PrOutAction::RegisterAndIgnoreExistingKey => PrIoctl::Register(PrRegistration {
                old_key: 0,
                new_key: sark,
                flags: sys::PR_FL_IGNORE_KEY,
                pad: 0,
            }),
            PrOutAction::Reserve => PrIoctl::Reserve(PrReservation {
                key: rk,
                pr_type: pr_type()?,
                flags: 0,
            }),
            PrOutAction::Release => PrIoctl::Release(PrReservation {
                key: rk,
                pr_type: pr_type()?,
                flags: 0,
            }),
            PrOutAction::Preempt => PrIoctl::Preempt(PrPreempt {
                old_key: rk,
                new_key: sark,
                pr_type: pr_type()?,
                flags: 0,
            }),
            PrOutAction::PreemptAndAbort => PrIoctl::PreemptAbort(PrPreempt {
                old_key: rk,
                new_key: sark,
                pr_type: pr_type()?,
                flags: 0,
            }),
            PrOutAction::Clear => PrIoctl::Clear(PrClear {
                key: rk,
                flags: 0,
                pad: 0,
            }),
            PrOutAction::RegisterAndMove => return Err(unsupported("REGISTER AND MOVE")),
            PrOutAction::ReplaceLostReservation => {
                return Err(unsupported("REPLACE LOST RESERVATION"));
            }
        })
    }
}

impl PrTransport for BlockPrDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn pr_in(&self, action: PrInAction) -> Result<PrInData> {
        self.reader.pr_in(action)
    }

    fn pr_in_raw(&self, action: PrInAction, allocation_length: u16) -> Result<(PrInData, Vec<u8>)> {
        self.reader.pr_in_raw(action, allocation_length)
    }

    fn inquiry(&self) -> Result<Option<InquiryData>> {
        self.reader.inquiry()
    }

    fn pr_out(&self, command: &PrOutCommand) -> Result<()> {
        let op = Operation::PrOut(command.action);
        let device = self.name().to_owned();
        let request = Self::request(command, &device)?;
        let file = Arc::clone(&self.file);
        let rc = self.watchdog.run(op, &device, self.timeout_ms, move || {
            sys::pr_ioctl(file.as_fd(), request)
        })?;
        match rc {
            Ok(0) => Ok(()),
            Ok(PR_STS_RESERVATION_CONFLICT) => Err(FenceError::ReservationConflict { op, device }),
            Ok(code) => Err(FenceError::Transport {
                op,
                device,
                detail: match code {
                    PR_STS_IOERR => "I/O error (PR_STS_IOERR)".to_owned(),
                    PR_STS_PATH_FAILED => "path failed (PR_STS_PATH_FAILED)".to_owned(),
                    PR_STS_PATH_FAST_FAILED => {
                        "path fast-failed (PR_STS_PATH_FAST_FAILED)".to_owned()
                    }
                    PR_STS_RETRY_PATH_FAILURE => {
                        "path failure, retry another path (PR_STS_RETRY_PATH_FAILURE)".to_owned()
                    }
                    other => format!("the ioctl returned status 0x{other:x}"),
                },
            }),
            Err(source) => Err(match source.raw_os_error() {
                Some(libc::ENOTTY) => FenceError::WrongDeviceType {
                    device,
                    detail: "its block driver has no persistent-reservation ioctls".to_owned(),
                },
                Some(libc::EOPNOTSUPP) => FenceError::NotSupported {
                    op,
                    device,
                    reason: "the device does not support persistent reservations (EOPNOTSUPP)"
                        .to_owned(),
                },
                // NVMe maps Invalid Command Opcode to EINVAL: ask the device what it supports.
                Some(libc::EINVAL) => match self.reader.report_capabilities() {
                    Err(e) if e.is_not_supported() => FenceError::NotSupported {
                        op,
                        device,
                        reason: format!("the PR ioctl answered EINVAL, and the device says: {e}"),
                    },
                    _ => FenceError::Ioctl { op, device, source },
                },
                _ => FenceError::Ioctl { op, device, source },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::PrKey;

    #[test]
    fn scsi_types_are_renumbered_for_the_ioctl() {
        let cmd = PrOutCommand::preempt(
            PrKey::new(0xb2),
            PrKey::new(0xa1),
            ReservationType::WriteExclusiveRegistrantsOnly,
        );
        let PrIoctl::Preempt(p) = BlockPrDevice::request(&cmd, "d").unwrap() else {
            panic!("not a preempt");
        };
        assert_eq!((p.old_key, p.new_key, p.pr_type), (0xb2, 0xa1, 3));
        let mut bad = PrOutCommand::reserve(PrKey::new(1), ReservationType::WriteExclusive);
        bad.type_code = 2;
        assert!(matches!(
            BlockPrDevice::request(&bad, "d"),
            Err(FenceError::InvalidArgument { .. })
        ));
        let mut atp = PrOutCommand::register(PrKey::ZERO, PrKey::new(1));
        atp.all_tg_pt = true;
        assert!(
            BlockPrDevice::request(&atp, "d")
                .unwrap_err()
                .is_not_supported()
        );
    }
}
