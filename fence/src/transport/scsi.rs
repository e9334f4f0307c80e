//! SCSI: PR commands as CDB bytes through any [`ScsiSubmit`] — SG_IO on a real device, or an
//! emulator nexus — with one place that turns status, sense and host/driver codes into
//! [`FenceError`]s.

use super::deadline::Watchdog;
use super::{DEFAULT_TIMEOUT_MS, PrTransport};
use crate::Operation;
use crate::error::{FenceError, Result};
use crate::pr::cdb::{InquiryCdb, PrInCdb};
use crate::pr::data::PrInData;
use crate::pr::inquiry::InquiryData;
use crate::pr::sense::{ScsiStatus, Sense, SenseKey};
use crate::pr::{PrInAction, PrOutCommand};
use crate::sys::{self, DataDirection};
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

/// What came back from one SCSI command.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RawScsiResult {
    pub status: u8,
    /// Host adapter status (`DID_*`); 0 when the command reached the device.
    pub host_status: u16,
    /// Driver status (`DRIVER_*`, masked).
    pub driver_status: u16,
    pub sense: Vec<u8>,
    /// The data-in bytes actually transferred.
    pub data: Vec<u8>,
    /// How many bytes the target wrote past the data-in length (into our slack).
    pub overrun: usize,
}

/// Something that executes SCSI commands for one I_T nexus.
pub trait ScsiSubmit: std::fmt::Debug + Send + Sync {
    fn name(&self) -> &str;
    fn submit(
        &self,
        op: Operation,
        cdb: &[u8],
        data_out: &[u8],
        data_in_len: usize,
    ) -> Result<RawScsiResult>;
}

/// Linux host byte values worth naming (`include/scsi/scsi_status.h`).
fn host_status_name(code: u16) -> &'static str {
    match code {
        0x01 => "DID_NO_CONNECT",
        0x02 => "DID_BUS_BUSY",
        0x03 => "DID_TIME_OUT",
        0x04 => "DID_BAD_TARGET",
        0x05 => "DID_ABORT",
        0x06 => "DID_PARITY",
        0x07 => "DID_ERROR",
        0x08 => "DID_RESET",
        0x09 => "DID_BAD_INTR",
        0x0a => "DID_PASSTHROUGH",
        0x0b => "DID_SOFT_ERROR",
        0x0c => "DID_IMM_RETRY",
        0x0d => "DID_REQUEUE",
        0x0e => "DID_TRANSPORT_DISRUPTED",
        0x0f => "DID_TRANSPORT_FAILFAST",
        0x11 => "DID_NEXUS_FAILURE",
        0x13 => "DID_TRANSPORT_MARGINAL",
        _ => "host error",
    }
}

const DRIVER_TIMEOUT: u16 = 0x06;

/// Turns a command's outcome into its data or the matching error.
pub(crate) fn interpret(
    op: Operation,
    device: &str,
    raw: RawScsiResult,
    timeout_ms: u32,
) -> Result<Vec<u8>> {
    let status = ScsiStatus(raw.status & 0xfe);
    if raw.host_status == 0x03 || raw.driver_status & 0x0f == DRIVER_TIMEOUT {
        return Err(FenceError::Timeout {
            op,
            device: device.to_owned(),
            timeout_ms: u64::from(timeout_ms),
        });
    }
    // Some HBAs report RESERVATION CONFLICT with a host byte set; the status decides.
    if status == ScsiStatus::RESERVATION_CONFLICT {
        return Err(FenceError::ReservationConflict {
            op,
            device: device.to_owned(),
        });
    }
    if raw.host_status != 0 {
        return Err(FenceError::Transport {
            op,
            device: device.to_owned(),
            detail: format!(
                "host status 0x{:02x} ({})",
                raw.host_status,
                host_status_name(raw.host_status)
            ),
        });
    }
    match status {
        ScsiStatus::GOOD | ScsiStatus::CONDITION_MET => Ok(raw.data),
        ScsiStatus::CHECK_CONDITION => {
            let sense = Sense::decode(&raw.sense).map_err(|source| FenceError::Decode {
                op,
                device: device.to_owned(),
                source,
            })?;
            if sense.key == SenseKey::RecoveredError
                || (sense.key == SenseKey::NoSense && sense.asc == 0)
            {
                // The command completed; the device only reports something it fixed.
                return Ok(raw.data);
            }
            Err(FenceError::CheckCondition {
                op,
                device: device.to_owned(),
                sense,
            })
        }
        other => Err(FenceError::Status {
            op,
            device: device.to_owned(),
            status: other,
        }),
    }
}

/// PR commands over a [`ScsiSubmit`].
#[derive(Debug)]
pub struct ScsiPr<S> {
    submit: S,
    /// ALLOCATION LENGTH of PR IN commands.
    allocation_length: u16,
    timeout_ms: u32,
}

impl<S: ScsiSubmit> ScsiPr<S> {
    pub fn new(submit: S, timeout_ms: u32) -> Self {
        Self {
            submit,
            allocation_length: 8192,
            timeout_ms,
        }
    }

    pub fn submitter(&self) -> &S {
        &self.submit
    }

    fn pr_in_bytes(
        &self,
        action: PrInAction,
        allocation_length: u16,
    ) -> Result<(PrInData, Vec<u8>)> {
        let op = Operation::PrIn(action);
        let cdb = PrInCdb {
            service_action: action.code(),
            allocation_length,
            control: 0,
        };
        let raw = self
            .submit
            .submit(op, &cdb.encode(), &[], usize::from(allocation_length))?;
        let bytes = interpret(op, self.submit.name(), raw, self.timeout_ms)?;
        let data = PrInData::decode(action, &bytes).map_err(|source| FenceError::Decode {
            op,
            device: self.submit.name().to_owned(),
            source,
        })?;
        Ok((data, bytes))
    }
}

impl<S: ScsiSubmit> PrTransport for ScsiPr<S> {
    fn name(&self) -> &str {
        self.submit.name()
    }

    fn pr_in(&self, action: PrInAction) -> Result<PrInData> {
        self.pr_in_bytes(action, self.allocation_length)
            .map(|(d, _)| d)
    }

    fn pr_in_raw(&self, action: PrInAction, allocation_length: u16) -> Result<(PrInData, Vec<u8>)> {
        self.pr_in_bytes(action, allocation_length)
    }

    fn pr_out(&self, command: &PrOutCommand) -> Result<()> {
        let op = Operation::PrOut(command.action);
        let (cdb, params) = command.to_scsi();
        let raw = self.submit.submit(op, &cdb, &params, 0)?;
        interpret(op, self.submit.name(), raw, self.timeout_ms).map(|_| ())
    }

    fn inquiry(&self) -> Result<Option<InquiryData>> {
        let op = Operation::Inquiry;
        let cdb = InquiryCdb::standard(96);
        let raw = self.submit.submit(op, &cdb.encode(), &[], 96)?;
        let bytes = interpret(op, self.submit.name(), raw, self.timeout_ms)?;
        InquiryData::decode(&bytes)
            .map(Some)
            .map_err(|source| FenceError::Decode {
                op,
                device: self.submit.name().to_owned(),
                source,
            })
    }
}

const PAGE: usize = 4096;
const SLACK_CANARY: u8 = 0xa5;

/// SG_IO on an open SCSI disk or generic device.
#[derive(Debug, Clone)]
pub struct SgIo {
    name: String,
    file: Arc<File>,
    timeout_ms: u32,
    watchdog: Watchdog,
}

impl SgIo {
    /// Opens `path` read-write (PR OUT needs write access) or read-only.
    pub fn open(path: &str, read_only: bool, timeout_ms: u32) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| FenceError::Open {
                device: path.to_owned(),
                source,
            })?;
        Ok(Self::from_file(path, file, timeout_ms))
    }

    /// Wraps an already open device.
    pub fn from_file(name: &str, file: File, timeout_ms: u32) -> Self {
        Self {
            name: name.to_owned(),
            file: Arc::new(file),
            timeout_ms: if timeout_ms == 0 {
                DEFAULT_TIMEOUT_MS
            } else {
                timeout_ms
            },
            watchdog: Watchdog::default(),
        }
    }

    pub fn timeout_ms(&self) -> u32 {
        self.timeout_ms
    }
}

impl ScsiSubmit for SgIo {
    fn name(&self) -> &str {
        &self.name
    }

    fn submit(
        &self,
        op: Operation,
        cdb: &[u8],
        data_out: &[u8],
        data_in_len: usize,
    ) -> Result<RawScsiResult> {
        let file = Arc::clone(&self.file);
        let cdb = cdb.to_vec();
        let out = data_out.to_vec();
        let timeout = self.timeout_ms;
        let outcome = self.watchdog.run(op, &self.name, timeout, move || {
            // The data-in buffer starts on a page and is followed by a page of slack: LIO
            // writes past ALLOCATION LENGTH in READ FULL STATUS (it checks only the
            // TransportID's length against it), and when the length is 4-byte aligned the
            // block layer maps our buffer straight into the command, so the overrun would
            // land in our heap. The slack holds a canary to measure it.
            let mut storage = vec![SLACK_CANARY; data_in_len + 3 * PAGE];
            let start = storage.as_ptr().align_offset(PAGE).min(PAGE);
            storage[start..start + data_in_len].fill(0);
            let region = &mut storage[start..start + data_in_len];
            let dir = if !out.is_empty() {
                DataDirection::ToDevice(&out)
            } else if data_in_len > 0 {
                DataDirection::FromDevice(region)
            } else {
                DataDirection::None
            };
            sys::sg_io(file.as_fd(), &cdb, dir, timeout).map(|r| {
                let slack = &storage[start + data_in_len..start + data_in_len + PAGE];
                let overrun = slack
                    .iter()
                    .rposition(|&b| b != SLACK_CANARY)
                    .map_or(0, |p| p + 1);
                (r, storage[start..start + data_in_len].to_vec(), overrun)
            })
        })?;
        let (r, mut data_in, overrun) = outcome.map_err(|source| match source.raw_os_error() {
            Some(libc::ENOTTY | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => {
                FenceError::WrongDeviceType {
                    device: self.name.clone(),
                    detail: format!("does not take SCSI commands (SG_IO: {source})"),
                }
            }
            _ => FenceError::Ioctl {
                op,
                device: self.name.clone(),
                source,
            },
        })?;
        let resid = usize::try_from(r.resid.max(0)).unwrap_or(0);
        data_in.truncate(data_in_len.saturating_sub(resid));
        Ok(RawScsiResult {
            status: r.status,
            host_status: r.host_status,
            driver_status: r.driver_status,
            sense: r.sense,
            data: data_in,
            overrun,
        })
    }
}

/// A SCSI disk or generic device driven through SG_IO.
pub type SgDevice = ScsiPr<SgIo>;

impl SgDevice {
    /// Opens `path` for PR commands with `timeout_ms` per command.
    pub fn open(path: &str, read_only: bool, timeout_ms: u32) -> Result<Self> {
        let sg = SgIo::open(path, read_only, timeout_ms)?;
        let timeout = sg.timeout_ms();
        Ok(ScsiPr::new(sg, timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pr::PrOutAction;

    fn op() -> Operation {
        Operation::PrOut(PrOutAction::Register)
    }

    #[test]
    fn statuses_become_errors() {
        let conflict = RawScsiResult {
            status: 0x18,
            ..Default::default()
        };
        assert!(
            interpret(op(), "d", conflict, 1)
                .unwrap_err()
                .is_reservation_conflict()
        );
        let ua = RawScsiResult {
            status: 0x02,
            sense: Sense::new(SenseKey::UnitAttention, 0x2a, 0x05).encode(),
            ..Default::default()
        };
        assert!(interpret(op(), "d", ua, 1).unwrap_err().is_unit_attention());
        let garbage = RawScsiResult {
            status: 0x02,
            sense: vec![0x11, 0x22],
            ..Default::default()
        };
        let e = interpret(op(), "d", garbage, 1).unwrap_err();
        assert!(matches!(e, FenceError::Decode { .. }), "{e}");
        let timeout = RawScsiResult {
            host_status: 0x03,
            ..Default::default()
        };
        assert!(interpret(op(), "d", timeout, 1).unwrap_err().is_timeout());
        let gone = RawScsiResult {
            host_status: 0x01,
            ..Default::default()
        };
        let e = interpret(op(), "d", gone, 1).unwrap_err();
        assert!(e.to_string().contains("DID_NO_CONNECT"), "{e}");
        let busy = RawScsiResult {
            status: 0x08,
            ..Default::default()
        };
        assert!(interpret(op(), "d", busy, 1).unwrap_err().is_retryable());
        let recovered = RawScsiResult {
            status: 0x02,
            sense: Sense::new(SenseKey::RecoveredError, 0x17, 0).encode(),
            data: vec![1, 2],
            ..Default::default()
        };
        assert_eq!(interpret(op(), "d", recovered, 1).unwrap(), vec![1, 2]);
    }

    #[test]
    fn a_regular_file_is_the_wrong_device_type() {
        let dir = std::env::temp_dir().join(format!("fence-sg-{}", std::process::id()));
        std::fs::write(&dir, b"not a disk").unwrap();
        let dev = SgDevice::open(dir.to_str().unwrap(), false, 1000).unwrap();
        let e = dev.read_keys().unwrap_err();
        assert!(matches!(e, FenceError::WrongDeviceType { .. }), "{e}");
        assert!(e.to_string().contains("SCSI"), "{e}");
        std::fs::remove_file(&dir).unwrap();
    }
}
