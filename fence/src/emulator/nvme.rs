//! The emulator's NVMe face: Reservation Register/Acquire/Release/Report on the same LU
//! state, following the NVM Command Set's rules (no unit attentions; RELEASE with the wrong
//! type is Invalid Field in Command; unregistering bumps the generation).

use super::{Emulator, NexusId, Refusal, ReservationState};
use crate::key::PrKey;
use crate::pr::nvme::{
    AcquireAction, ChangePtpl, NvmeCommandWords, NvmeReservation, NvmeStatus, RegisterAction,
    RegisteredController, ReleaseAction, ReservationStatus,
};
use crate::pr::transport_id::TransportId;
use crate::pr::{ReservationType, SCOPE_LU};

/// An NVMe completion: status and data read by the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeCompletion {
    pub status: NvmeStatus,
    pub data: Vec<u8>,
}

impl NvmeCompletion {
    fn status(status: NvmeStatus) -> Self {
        Self {
            status,
            data: Vec::new(),
        }
    }
}

impl From<Refusal> for NvmeStatus {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::Conflict => Self::RESERVATION_CONFLICT,
            Refusal::Check(..) => Self::INVALID_FIELD,
        }
    }
}

impl super::NexusInfo {
    /// An NVMe host with a 128-bit host identifier.
    pub fn nvme_host(host_id: [u8; 16]) -> Self {
        Self {
            initiator: TransportId::Other {
                protocol_id: 0xf,
                bytes: host_id.to_vec(),
            },
            relative_target_port: 0,
            target_port: 0,
            nvme: true,
        }
    }

    fn host_id(&self, len: usize) -> Vec<u8> {
        let mut id = match &self.initiator {
            TransportId::Other { bytes, .. } => bytes.clone(),
            other => other.encode(),
        };
        id.resize(len, 0);
        id
    }
}

impl Emulator {
    /// Executes an NVMe reservation command from `host`.
    pub fn nvme_execute(&mut self, host: NexusId, words: &NvmeCommandWords) -> NvmeCompletion {
        if self.nexus(host).is_none() {
            return NvmeCompletion::status(NvmeStatus::INVALID_FIELD);
        }
        let cmd = match NvmeReservation::decode(words) {
            Ok(cmd) => cmd,
            Err(_) if ![0x0d, 0x0e, 0x11, 0x15].contains(&words.opcode) => {
                return NvmeCompletion::status(NvmeStatus::INVALID_OPCODE);
            }
            Err(_) => return NvmeCompletion::status(NvmeStatus::INVALID_FIELD),
        };
        match self.nvme_command(host, &cmd) {
            Ok(data) => NvmeCompletion {
                status: NvmeStatus::SUCCESS,
                data,
            },
            Err(status) => NvmeCompletion::status(status),
        }
    }

    fn nvme_command(
        &mut self,
        host: NexusId,
        cmd: &NvmeReservation,
    ) -> Result<Vec<u8>, NvmeStatus> {
        let conflict = NvmeStatus::RESERVATION_CONFLICT;
        // Registration checks shared by everything but Register/Register and Report.
        let check_key = |this: &Self, current: PrKey, ignore: bool| -> Result<PrKey, NvmeStatus> {
            let key = this.key_of(host).ok_or(conflict)?;
            if !ignore && key != current {
                return Err(conflict);
            }
            Ok(key)
        };
        match *cmd {
            NvmeReservation::Register {
                action,
                ignore_existing_key,
                change_ptpl,
                current_key,
                new_key,
            } => {
                match action {
                    RegisterAction::Register => {
                        if let Some(key) = self.key_of(host) {
                            return if key == new_key {
                                Ok(Vec::new())
                            } else {
                                Err(conflict)
                            };
                        }
                        if new_key.is_zero() {
                            return Err(NvmeStatus::INVALID_FIELD);
                        }
                        self.add_registration(host, new_key, false, false);
                    }
                    RegisterAction::Unregister => {
                        check_key(self, current_key, ignore_existing_key)?;
                        self.remove_registration(host);
                        self.bump_generation();
                    }
                    RegisterAction::Replace => {
                        check_key(self, current_key, ignore_existing_key)?;
                        if new_key.is_zero() {
                            return Err(NvmeStatus::INVALID_FIELD);
                        }
                        if let Some(r) = self.registrations.iter_mut().find(|r| r.nexus == host) {
                            r.key = new_key;
                        }
                        self.bump_generation();
                    }
                }
                match change_ptpl {
                    ChangePtpl::NoChange => {}
                    ChangePtpl::Clear => self.aptpl_active = false,
                    ChangePtpl::Set => self.aptpl_active = true,
                }
                Ok(Vec::new())
            }
            NvmeReservation::Acquire {
                action,
                ignore_existing_key,
                rtype,
                current_key,
                preempt_key,
            } => {
                let key = check_key(self, current_key, ignore_existing_key)?;
                let ty = ReservationType::from_nvme(rtype).ok_or(NvmeStatus::INVALID_FIELD)?;
                match action {
                    AcquireAction::Acquire => match self.reservation {
                        Some(res) if self.is_holder(host) && res.reservation_type == ty => {
                            Ok(Vec::new())
                        }
                        Some(_) => Err(conflict),
                        None => {
                            self.reservation = Some(ReservationState {
                                holder: host,
                                scope: SCOPE_LU,
                                reservation_type: ty,
                            });
                            Ok(Vec::new())
                        }
                    },
                    AcquireAction::Preempt | AcquireAction::PreemptAndAbort => self
                        .preempt(host, key, preempt_key, SCOPE_LU, ty)
                        .map(|()| Vec::new())
                        .map_err(NvmeStatus::from),
                }
            }
            NvmeReservation::Release {
                action,
                ignore_existing_key,
                rtype,
                current_key,
            } => {
                let key = check_key(self, current_key, ignore_existing_key)?;
                match action {
                    ReleaseAction::Release => {
                        let Some(res) = self.reservation else {
                            return Ok(Vec::new());
                        };
                        if !self.is_holder(host) {
                            return Ok(Vec::new());
                        }
                        if res.reservation_type.nvme_code() != rtype {
                            return Err(NvmeStatus::INVALID_FIELD);
                        }
                        self.reservation = None;
                        Ok(Vec::new())
                    }
                    ReleaseAction::Clear => self
                        .clear(host, key)
                        .map(|()| Vec::new())
                        .map_err(NvmeStatus::from),
                }
            }
            NvmeReservation::Report {
                extended,
                buffer_len,
            } => {
                let all_reg = self
                    .reservation
                    .is_some_and(|r| r.reservation_type.is_all_registrants());
                let host_len = if extended { 16 } else { 8 };
                let status = ReservationStatus {
                    generation: self.generation,
                    rtype: self
                        .reservation
                        .map_or(0, |r| r.reservation_type.nvme_code()),
                    ptpl: self.aptpl_active,
                    registrants: self
                        .registrations
                        .iter()
                        .map(|r| RegisteredController {
                            controller_id: r.nexus.0.saturating_add(1),
                            holds_reservation: self
                                .reservation
                                .is_some_and(|res| res.holder == r.nexus)
                                || all_reg,
                            host_id: self
                                .nexus(r.nexus)
                                .map_or_else(Vec::new, |n| n.host_id(host_len)),
                            key: r.key,
                        })
                        .collect(),
                    truncated: false,
                };
                let mut data = status.encode(extended);
                data.truncate(usize::try_from(buffer_len).unwrap_or(usize::MAX));
                Ok(data)
            }
        }
    }
}
