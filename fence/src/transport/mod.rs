//! How reservation commands reach a logical unit. [`PrTransport`] is the seam: the policy
//! and the CLI speak PR IN / PR OUT to it; implementations translate.
//!
//! | type | reaches | PR OUT via | PR IN via |
//! |------|---------|------------|-----------|
//! | [`SgDevice`] | `/dev/sdX`, `/dev/sgN` | SG_IO | SG_IO |
//! | [`BlockPrDevice`] | SCSI disks, dm, NVMe block devices | `IOC_PR_*` ioctls | SG_IO (6.12 has no read ioctls) |
//! | [`NvmeDevice`] | `/dev/nvmeXnY` | NVMe passthrough | Reservation Report |
//! | [`Multipath`] | `/dev/dm-N` multipath maps | registration on every path | first working path |
//! | [`EmulatedPath`], [`EmulatedNvmePath`] | an [`Emulator`](crate::emulator::Emulator) nexus | CDB bytes / NVMe words | the same |
//!
//! Every call is synchronous (SG_IO blocks); run them on a blocking thread. Every device
//! command carries a timeout, and a command the kernel does not return from in time is
//! reported as [`FenceError::Timeout`](crate::FenceError::Timeout) — the thread that issued
//! it is left behind, and the device refuses further commands until it comes back.

mod block_pr;
mod deadline;
mod device;
mod emulated;
mod multipath;
mod nvme;
mod scsi;

pub use block_pr::BlockPrDevice;
pub use device::{DeviceKind, Method, OpenOptions, identify, open, open_paths};
pub use emulated::{EmulatedNvmePath, EmulatedPath};
pub use multipath::{Multipath, multipath_members};
pub use nvme::{NvmeDevice, NvmePr, NvmeSubmit};
pub use scsi::{RawScsiResult, ScsiPr, ScsiSubmit, SgDevice, SgIo};

use crate::error::Result;
use crate::pr::data::{Capabilities, FullStatus, KeyList, PrInData, ReservationInfo};
use crate::pr::inquiry::InquiryData;
use crate::pr::{PrInAction, PrOutCommand};
use crate::{FenceError, Operation};
use std::fmt;

/// Default time a single device command may take.
pub const DEFAULT_TIMEOUT_MS: u32 = 10_000;

/// One way to send persistent-reservation commands to one logical unit.
pub trait PrTransport: fmt::Debug + Send + Sync {
    /// The device path, or a name for an emulated path.
    fn name(&self) -> &str;

    /// Sends PERSISTENT RESERVE IN (or its NVMe equivalent).
    fn pr_in(&self, action: PrInAction) -> Result<PrInData>;

    /// Sends PERSISTENT RESERVE OUT (or its NVMe equivalent).
    fn pr_out(&self, command: &PrOutCommand) -> Result<()>;

    /// PR IN with a chosen ALLOCATION LENGTH; returns the decoded data and the bytes as
    /// the device sent them (re-encoded where the transport has no such bytes, e.g. NVMe).
    fn pr_in_raw(&self, action: PrInAction, allocation_length: u16) -> Result<(PrInData, Vec<u8>)> {
        let _ = allocation_length;
        let data = self.pr_in(action)?;
        let bytes = data.encode();
        Ok((data, bytes))
    }

    /// Standard INQUIRY data, for transports that have it (SCSI).
    fn inquiry(&self) -> Result<Option<InquiryData>> {
        Ok(None)
    }

    fn read_keys(&self) -> Result<KeyList> {
        match self.pr_in(PrInAction::ReadKeys)? {
            PrInData::Keys(k) => Ok(k),
            other => Err(mismatch(self.name(), PrInAction::ReadKeys, &other)),
        }
    }

    fn read_reservation(&self) -> Result<ReservationInfo> {
        match self.pr_in(PrInAction::ReadReservation)? {
            PrInData::Reservation(r) => Ok(r),
            other => Err(mismatch(self.name(), PrInAction::ReadReservation, &other)),
        }
    }

    fn report_capabilities(&self) -> Result<Capabilities> {
        match self.pr_in(PrInAction::ReportCapabilities)? {
            PrInData::Capabilities(c) => Ok(c),
            other => Err(mismatch(
                self.name(),
                PrInAction::ReportCapabilities,
                &other,
            )),
        }
    }

    fn read_full_status(&self) -> Result<FullStatus> {
        match self.pr_in(PrInAction::ReadFullStatus)? {
            PrInData::FullStatus(s) => Ok(s),
            other => Err(mismatch(self.name(), PrInAction::ReadFullStatus, &other)),
        }
    }
}

fn mismatch(name: &str, asked: PrInAction, got: &PrInData) -> FenceError {
    FenceError::Transport {
        op: Operation::PrIn(asked),
        device: name.to_owned(),
        detail: format!("answered {} data", got.action().name()),
    }
}

impl<T: PrTransport + ?Sized> PrTransport for Box<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn pr_in(&self, action: PrInAction) -> Result<PrInData> {
        (**self).pr_in(action)
    }
    fn pr_out(&self, command: &PrOutCommand) -> Result<()> {
        (**self).pr_out(command)
    }
    fn pr_in_raw(&self, action: PrInAction, allocation_length: u16) -> Result<(PrInData, Vec<u8>)> {
        (**self).pr_in_raw(action, allocation_length)
    }
    fn inquiry(&self) -> Result<Option<InquiryData>> {
        (**self).inquiry()
    }
}

impl<T: PrTransport + ?Sized> PrTransport for std::sync::Arc<T> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn pr_in(&self, action: PrInAction) -> Result<PrInData> {
        (**self).pr_in(action)
    }
    fn pr_out(&self, command: &PrOutCommand) -> Result<()> {
        (**self).pr_out(command)
    }
    fn pr_in_raw(&self, action: PrInAction, allocation_length: u16) -> Result<(PrInData, Vec<u8>)> {
        (**self).pr_in_raw(action, allocation_length)
    }
    fn inquiry(&self) -> Result<Option<InquiryData>> {
        (**self).inquiry()
    }
}
