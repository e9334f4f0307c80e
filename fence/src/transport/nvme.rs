//! NVMe reservations behind the SCSI-shaped [`PrTransport`]: REGISTER maps to Reservation
//! Register, RESERVE/PREEMPT to Acquire, RELEASE/CLEAR to Release, PR IN to Reservation
//! Report (and Identify for capabilities). Types are renumbered (SCSI 5 = NVMe 3).
//!
//! A controller without reservations (Linux 6.12's nvmet: ONCS bit 5 clear) answers Invalid
//! Command Opcode; that becomes [`FenceError::NotSupported`] saying so.

use super::deadline::Watchdog;
use super::{DEFAULT_TIMEOUT_MS, PrTransport};
use crate::Operation;
use crate::error::{FenceError, Result};
use crate::key::PrKey;
use crate::pr::data::{
    Capabilities, FullStatus, FullStatusEntry, Initiator, KeyList, PrInData, Reservation,
    ReservationInfo,
};
use crate::pr::nvme::{
    AcquireAction, ChangePtpl, NvmeCommandWords, NvmeReservation, NvmeStatus, OPC_IDENTIFY,
    RegisterAction, ReleaseAction, ReservationStatus, controller_supports_reservations,
    namespace_reservation_capabilities,
};
use crate::pr::{PrInAction, PrOutAction, PrOutCommand, ReservationType};
use crate::sys::{self, DataDirection, NvmeCommand};
use std::fs::File;
use std::os::fd::AsFd;
use std::sync::Arc;

/// Something that executes NVMe commands for one host on one namespace.
pub trait NvmeSubmit: std::fmt::Debug + Send + Sync {
    fn name(&self) -> &str;
    /// Executes a reservation command; returns the completion status and the data read.
    fn submit(&self, op: Operation, words: &NvmeCommandWords) -> Result<(NvmeStatus, Vec<u8>)>;
    /// Identify Controller data.
    fn identify_controller(&self) -> Result<Vec<u8>>;
    /// Identify Namespace data.
    fn identify_namespace(&self) -> Result<Vec<u8>>;
}

/// PR operations over an [`NvmeSubmit`].
#[derive(Debug)]
pub struct NvmePr<S> {
    submit: S,
}

impl<S: NvmeSubmit> NvmePr<S> {
    pub fn new(submit: S) -> Self {
        Self { submit }
    }

    pub fn submitter(&self) -> &S {
        &self.submit
    }

    fn status_error(&self, op: Operation, status: NvmeStatus) -> FenceError {
        let device = self.submit.name().to_owned();
        if status.is_reservation_conflict() {
            return FenceError::ReservationConflict { op, device };
        }
        if status.is_invalid_opcode() {
            let oncs = match self
                .submit
                .identify_controller()
                .ok()
                .and_then(|id| controller_supports_reservations(&id).ok())
            {
                Some(false) => "; Identify Controller ONCS bit 5 (reservations) is 0",
                Some(true) => {
                    "; yet Identify Controller ONCS bit 5 says reservations are supported"
                }
                None => "",
            };
            return FenceError::NotSupported {
                op,
                device,
                reason: format!(
                    "the controller answered {status}: it does not implement NVMe reservations{oncs}"
                ),
            };
        }
        FenceError::Nvme { op, device, status }
    }

    fn run(&self, op: Operation, cmd: &NvmeReservation) -> Result<Vec<u8>> {
        let (status, data) = self.submit.submit(op, &cmd.encode())?;
        if status.is_success() {
            Ok(data)
        } else {
            Err(self.status_error(op, status))
        }
    }

    /// Reservation Report, extended format first (128-bit host ids), normal if refused.
    pub fn report(&self, op: Operation) -> Result<(ReservationStatus, bool)> {
        for extended in [true, false] {
            let cmd = NvmeReservation::Report {
                extended,
                buffer_len: 4096,
            };
            let (status, data) = self.submit.submit(op, &cmd.encode())?;
            if status.is_success() {
                let report = ReservationStatus::decode(&data, extended).map_err(|source| {
                    FenceError::Decode {
                        op,
                        device: self.submit.name().to_owned(),
                        source,
                    }
                })?;
                return Ok((report, extended));
            }
            if !(extended && status.is_invalid_field()) {
                return Err(self.status_error(op, status));
            }
        }
        Err(FenceError::Transport {
            op,
            device: self.submit.name().to_owned(),
            detail: "Reservation Report refused in both formats".to_owned(),
        })
    }

    fn nvme_type(command: &PrOutCommand) -> Result<u8> {
        ReservationType::from_scsi(command.type_code)
            .map(ReservationType::nvme_code)
            .ok_or_else(|| FenceError::InvalidArgument {
                what: "reservation type",
                reason: format!(
                    "TYPE {} has no NVMe equivalent (valid: 1, 3, 5, 6, 7, 8)",
                    command.type_code
                ),
            })
    }
}

impl<S: NvmeSubmit> PrTransport for NvmePr<S> {
    fn name(&self) -> &str {
        self.submit.name()
    }

    fn pr_in(&self, action: PrInAction) -> Result<PrInData> {
        let op = Operation::PrIn(action);
        if action == PrInAction::ReportCapabilities {
            let controller = self.submit.identify_controller()?;
            let decode_err = |source| FenceError::Decode {
                op,
                device: self.submit.name().to_owned(),
                source,
            };
            if !controller_supports_reservations(&controller).map_err(decode_err)? {
                return Err(FenceError::NotSupported {
                    op,
                    device: self.submit.name().to_owned(),
                    reason: "the controller does not implement NVMe reservations (Identify Controller ONCS bit 5 is 0)"
                        .to_owned(),
                });
            }
            let rescap = namespace_reservation_capabilities(&self.submit.identify_namespace()?)
                .map_err(decode_err)?;
            let (report, _) = self.report(op)?;
            let mut mask = 0u16;
            for ty in ReservationType::ALL {
                if rescap & (1 << ty.nvme_code()) != 0 {
                    mask |= Capabilities::type_mask_bit(ty);
                }
            }
            return Ok(PrInData::Capabilities(Capabilities {
                persist_through_power_loss: rescap & 1 != 0,
                type_mask_valid: true,
                persist_through_power_loss_active: report.ptpl,
                type_mask: mask,
                ..Capabilities::default()
            }));
        }
        let (report, _) = self.report(op)?;
        let all_reg = ReservationType::from_nvme(report.rtype)
            .is_some_and(ReservationType::is_all_registrants);
        Ok(match action {
            PrInAction::ReadKeys => PrInData::Keys(KeyList {
                generation: report.generation,
                keys: report.registrants.iter().map(|r| r.key).collect(),
                truncated: report.truncated,
            }),
            PrInAction::ReadReservation => PrInData::Reservation(ReservationInfo {
                generation: report.generation,
                reservation: (report.rtype != 0).then(|| Reservation {
                    key: if all_reg {
                        PrKey::ZERO
                    } else {
                        report.holder().map_or(PrKey::ZERO, |h| h.key)
                    },
                    scope: 0,
                    type_code: ReservationType::from_nvme(report.rtype)
                        .map_or(report.rtype, ReservationType::scsi_code),
                }),
            }),
            _ => PrInData::FullStatus(FullStatus {
                generation: report.generation,
                entries: report
                    .registrants
                    .iter()
                    .map(|r| FullStatusEntry {
                        key: r.key,
                        all_tg_pt: false,
                        reservation_holder: r.holds_reservation,
                        scope: 0,
                        type_code: if r.holds_reservation {
                            ReservationType::from_nvme(report.rtype)
                                .map_or(0, ReservationType::scsi_code)
                        } else {
                            0
                        },
                        relative_target_port: 0,
                        initiator: Initiator::Nvme {
                            controller_id: r.controller_id,
                            host_id: r.host_id.clone(),
                        },
                    })
                    .collect(),
                truncated: report.truncated,
            }),
        })
    }

    fn pr_out(&self, command: &PrOutCommand) -> Result<()> {
        let op = Operation::PrOut(command.action);
        let unsupported = |what: &str| FenceError::NotSupported {
            op,
            device: self.submit.name().to_owned(),
            reason: format!("NVMe reservations have no {what}"),
        };
        if command.all_tg_pt {
            return Err(unsupported("ALL_TG_PT"));
        }
        if command.spec_i_pt {
            return Err(unsupported("SPEC_I_PT"));
        }
        let rk = command.reservation_key;
        let sark = command.service_action_key;
        let ptpl = if command.aptpl {
            ChangePtpl::Set
        } else {
            ChangePtpl::NoChange
        };
        let register = |action, ignore, current, new| NvmeReservation::Register {
            action,
            ignore_existing_key: ignore,
            change_ptpl: ptpl,
            current_key: current,
            new_key: new,
        };
        match command.action {
            PrOutAction::Register => {
                let cmd = match (rk.is_zero(), sark.is_zero()) {
                    (true, true) => return Ok(()),
                    (true, false) => register(RegisterAction::Register, false, rk, sark),
                    (false, false) => register(RegisterAction::Replace, false, rk, sark),
                    (false, true) => register(RegisterAction::Unregister, false, rk, sark),
                };
                self.run(op, &cmd).map(|_| ())
            }
            PrOutAction::RegisterAndIgnoreExistingKey => {
                if sark.is_zero() {
                    return self
                        .run(
                            op,
                            &register(RegisterAction::Unregister, true, PrKey::ZERO, sark),
                        )
                        .map(|_| ());
                }
                match self.run(
                    op,
                    &register(RegisterAction::Register, false, PrKey::ZERO, sark),
                ) {
                    Err(e) if e.is_reservation_conflict() => self
                        .run(
                            op,
                            &register(RegisterAction::Replace, true, PrKey::ZERO, sark),
                        )
                        .map(|_| ()),
                    other => other.map(|_| ()),
                }
            }
            PrOutAction::Reserve | PrOutAction::Preempt | PrOutAction::PreemptAndAbort => {
                let action = match command.action {
                    PrOutAction::Reserve => AcquireAction::Acquire,
                    PrOutAction::Preempt => AcquireAction::Preempt,
                    _ => AcquireAction::PreemptAndAbort,
                };
                let cmd = NvmeReservation::Acquire {
                    action,
                    ignore_existing_key: false,
                    rtype: Self::nvme_type(command)?,
                    current_key: rk,
                    preempt_key: sark,
                };
                self.run(op, &cmd).map(|_| ())
            }
            PrOutAction::Release | PrOutAction::Clear => {
                let (action, rtype) = if command.action == PrOutAction::Release {
                    (ReleaseAction::Release, Self::nvme_type(command)?)
                } else {
                    (ReleaseAction::Clear, 0)
                };
                let cmd = NvmeReservation::Release {
                    action,
                    ignore_existing_key: false,
                    rtype,
                    current_key: rk,
                };
                self.run(op, &cmd).map(|_| ())
            }
            PrOutAction::RegisterAndMove => Err(unsupported("REGISTER AND MOVE")),
            PrOutAction::ReplaceLostReservation => Err(unsupported("REPLACE LOST RESERVATION")),
        }
    }
}

/// NVMe passthrough on an open namespace block device (`/dev/nvmeXnY`).
#[derive(Debug)]
pub struct NvmeIoctl {
    name: String,
    file: Arc<File>,
    nsid: u32,
    timeout_ms: u32,
    watchdog: Watchdog,
}

impl NvmeIoctl {
    pub fn open(path: &str, timeout_ms: u32) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| FenceError::Open {
                device: path.to_owned(),
                source,
            })?;
        let nsid =
            sys::nvme_namespace_id(file.as_fd()).map_err(|e| FenceError::WrongDeviceType {
                device: path.to_owned(),
                detail: format!("is not an NVMe namespace (NVME_IOCTL_ID: {e}); use /dev/nvmeXnY"),
            })?;
        Ok(Self {
            name: path.to_owned(),
            file: Arc::new(file),
            nsid,
            timeout_ms: if timeout_ms == 0 {
                DEFAULT_TIMEOUT_MS
            } else {
                timeout_ms
            },
            watchdog: Watchdog::default(),
        })
    }

    fn passthru(
        &self,
        op: Operation,
        command: NvmeCommand,
        data_out: Vec<u8>,
        data_in_len: usize,
    ) -> Result<(NvmeStatus, Vec<u8>)> {
        let file = Arc::clone(&self.file);
        let outcome = self
            .watchdog
            .run(op, &self.name, self.timeout_ms, move || {
                let mut data_in = vec![0u8; data_in_len];
                let dir = if !data_out.is_empty() {
                    DataDirection::ToDevice(&data_out)
                } else if data_in_len > 0 {
                    DataDirection::FromDevice(&mut data_in)
                } else {
                    DataDirection::None
                };
                sys::nvme_passthru(file.as_fd(), &command, dir).map(|(status, _)| (status, data_in))
            })?;
        let (status, data) = outcome.map_err(|source| FenceError::Ioctl {
            op,
            device: self.name.clone(),
            source,
        })?;
        Ok((
            NvmeStatus(u16::try_from(status & 0xffff).unwrap_or(u16::MAX)),
            data,
        ))
    }

    fn identify(&self, cns: u32, nsid: u32) -> Result<Vec<u8>> {
        let op = Operation::NvmeIdentify;
        let cmd = NvmeCommand {
            admin: true,
            opcode: OPC_IDENTIFY,
            nsid,
            cdw10: cns,
            cdw11: 0,
            timeout_ms: self.timeout_ms,
        };
        let (status, data) = self.passthru(op, cmd, Vec::new(), 4096)?;
        if status.is_success() {
            Ok(data)
        } else {
            Err(FenceError::Nvme {
                op,
                device: self.name.clone(),
                status,
            })
        }
    }
}

impl NvmeSubmit for NvmeIoctl {
    fn name(&self) -> &str {
        &self.name
    }

    fn submit(&self, op: Operation, words: &NvmeCommandWords) -> Result<(NvmeStatus, Vec<u8>)> {
        let cmd = NvmeCommand {
            admin: false,
            opcode: words.opcode,
            nsid: self.nsid,
            cdw10: words.cdw10,
            cdw11: words.cdw11,
            timeout_ms: self.timeout_ms,
        };
        let data_in = usize::try_from(words.data_in_len).unwrap_or(0);
        self.passthru(op, cmd, words.data_out.clone(), data_in)
    }

    fn identify_controller(&self) -> Result<Vec<u8>> {
        self.identify(1, 0)
    }

    fn identify_namespace(&self) -> Result<Vec<u8>> {
        self.identify(0, self.nsid)
    }
}

/// An NVMe namespace driven through passthrough.
pub type NvmeDevice = NvmePr<NvmeIoctl>;

impl NvmeDevice {
    pub fn open(path: &str, timeout_ms: u32) -> Result<Self> {
        Ok(NvmePr::new(NvmeIoctl::open(path, timeout_ms)?))
    }
}
