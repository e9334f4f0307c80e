//! A PERSISTENT RESERVE OUT request independent of the transport: SCSI encodes it as a CDB
//! plus parameter list, NVMe maps it onto Reservation Register/Acquire/Release, the
//! block-layer ioctls onto `struct pr_*`.

use super::DecodeError;
use super::cdb::PrOutCdb;
use super::param::{BasicParams, RegisterAndMoveParams};
use super::transport_id::TransportId;
use super::types::{PrOutAction, ReservationType, SCOPE_LU};
use crate::key::PrKey;
use serde::{Deserialize, Serialize};

/// A PR OUT request. Fields a service action does not use are ignored by it. The type is
/// kept as the raw 4-bit code so invalid requests can be expressed (tests, sg_persist's
/// `--prout-type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrOutCommand {
    pub action: PrOutAction,
    pub reservation_key: PrKey,
    pub service_action_key: PrKey,
    pub scope: u8,
    pub type_code: u8,
    pub aptpl: bool,
    pub all_tg_pt: bool,
    /// SPEC_I_PT: `transport_ids` names more initiator ports to register.
    pub spec_i_pt: bool,
    /// SPEC_I_PT ports, or the single REGISTER AND MOVE destination.
    pub transport_ids: Vec<TransportId>,
    /// REGISTER AND MOVE: the destination's relative target port.
    pub relative_target_port: u16,
    /// REGISTER AND MOVE: unregister the sender afterwards.
    pub unreg: bool,
}

impl PrOutCommand {
    fn base(action: PrOutAction) -> Self {
        Self {
            action,
            reservation_key: PrKey::ZERO,
            service_action_key: PrKey::ZERO,
            scope: SCOPE_LU,
            type_code: 0,
            aptpl: false,
            all_tg_pt: false,
            spec_i_pt: false,
            transport_ids: Vec::new(),
            relative_target_port: 0,
            unreg: false,
        }
    }

    /// REGISTER: `old` zero registers `new`; `new` zero unregisters; both change the key.
    pub fn register(old: PrKey, new: PrKey) -> Self {
        Self {
            reservation_key: old,
            service_action_key: new,
            ..Self::base(PrOutAction::Register)
        }
    }

    /// REGISTER AND IGNORE EXISTING KEY: register `new` whatever this nexus had.
    pub fn register_and_ignore(new: PrKey) -> Self {
        Self {
            service_action_key: new,
            ..Self::base(PrOutAction::RegisterAndIgnoreExistingKey)
        }
    }

    pub fn reserve(key: PrKey, ty: ReservationType) -> Self {
        Self {
            reservation_key: key,
            type_code: ty.scsi_code(),
            ..Self::base(PrOutAction::Reserve)
        }
    }

    pub fn release(key: PrKey, ty: ReservationType) -> Self {
        Self {
            reservation_key: key,
            type_code: ty.scsi_code(),
            ..Self::base(PrOutAction::Release)
        }
    }

    pub fn clear(key: PrKey) -> Self {
        Self {
            reservation_key: key,
            ..Self::base(PrOutAction::Clear)
        }
    }

    /// PREEMPT `victim` using `own` registration, establishing `ty` if a reservation moves.
    pub fn preempt(own: PrKey, victim: PrKey, ty: ReservationType) -> Self {
        Self {
            reservation_key: own,
            service_action_key: victim,
            type_code: ty.scsi_code(),
            ..Self::base(PrOutAction::Preempt)
        }
    }

    pub fn preempt_and_abort(own: PrKey, victim: PrKey, ty: ReservationType) -> Self {
        Self {
            action: PrOutAction::PreemptAndAbort,
            ..Self::preempt(own, victim, ty)
        }
    }

    /// REGISTER AND MOVE the reservation to `destination` on `relative_target_port`,
    /// registering it with `new_key`.
    pub fn register_and_move(
        own: PrKey,
        new_key: PrKey,
        destination: TransportId,
        relative_target_port: u16,
        unreg: bool,
    ) -> Self {
        Self {
            reservation_key: own,
            service_action_key: new_key,
            transport_ids: vec![destination],
            relative_target_port,
            unreg,
            ..Self::base(PrOutAction::RegisterAndMove)
        }
    }

    /// An empty command for `action`, to fill in field by field.
    pub fn new(action: PrOutAction) -> Self {
        Self::base(action)
    }

    pub fn with_aptpl(mut self, aptpl: bool) -> Self {
        self.aptpl = aptpl;
        self
    }

    /// The reservation type, if the code is a valid one.
    pub fn reservation_type(&self) -> Option<ReservationType> {
        ReservationType::from_scsi(self.type_code)
    }

    /// The SCSI parameter list for this command.
    pub fn parameter_list(&self) -> Vec<u8> {
        if self.action == PrOutAction::RegisterAndMove {
            let destination = self
                .transport_ids
                .first()
                .cloned()
                .unwrap_or(TransportId::Other {
                    protocol_id: 0,
                    bytes: Vec::new(),
                });
            RegisterAndMoveParams {
                reservation_key: self.reservation_key,
                service_action_key: self.service_action_key,
                unreg: self.unreg,
                aptpl: self.aptpl,
                relative_target_port: self.relative_target_port,
                transport_id: destination,
            }
            .encode()
        } else {
            BasicParams {
                reservation_key: self.reservation_key,
                service_action_key: self.service_action_key,
                spec_i_pt: self.spec_i_pt,
                all_tg_pt: self.all_tg_pt,
                aptpl: self.aptpl,
                transport_ids: self.transport_ids.clone(),
            }
            .encode()
        }
    }

    /// The SCSI CDB and parameter list.
    pub fn to_scsi(&self) -> ([u8; PrOutCdb::LEN], Vec<u8>) {
        let params = self.parameter_list();
        let cdb = PrOutCdb {
            service_action: self.action.code(),
            scope: self.scope,
            type_code: self.type_code,
            parameter_list_length: u32::try_from(params.len()).unwrap_or(u32::MAX),
            control: 0,
        };
        (cdb.encode(), params)
    }

    /// Decodes a CDB and its parameter list (what a device server receives).
    pub fn from_scsi(cdb: &PrOutCdb, params: &[u8]) -> Result<Self, DecodeError> {
        let action = PrOutAction::from_code(cdb.service_action).ok_or_else(|| {
            DecodeError::new(
                "PR OUT CDB",
                format!("service action 0x{:02x} is not defined", cdb.service_action),
            )
        })?;
        let base = Self {
            scope: cdb.scope,
            type_code: cdb.type_code,
            ..Self::base(action)
        };
        if action == PrOutAction::RegisterAndMove {
            let p = RegisterAndMoveParams::decode(params)?;
            Ok(Self {
                reservation_key: p.reservation_key,
                service_action_key: p.service_action_key,
                aptpl: p.aptpl,
                unreg: p.unreg,
                relative_target_port: p.relative_target_port,
                transport_ids: vec![p.transport_id],
                ..base
            })
        } else {
            let p = BasicParams::decode(params)?;
            Ok(Self {
                reservation_key: p.reservation_key,
                service_action_key: p.service_action_key,
                aptpl: p.aptpl,
                all_tg_pt: p.all_tg_pt,
                spec_i_pt: p.spec_i_pt,
                transport_ids: p.transport_ids,
                ..base
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pr::transport_id::tests::arb_transport_id;
    use proptest::prelude::*;

    pub(crate) fn arb_command() -> impl Strategy<Value = PrOutCommand> {
        (
            0usize..9,
            any::<u64>(),
            any::<u64>(),
            0u8..16,
            0u8..16,
            any::<[bool; 4]>(),
            proptest::collection::vec(arb_transport_id(), 1..3),
            any::<u16>(),
        )
            .prop_map(|(a, rk, sark, scope, ty, flags, ids, rtpi)| {
                let action = PrOutAction::ALL[a];
                let ram = action == PrOutAction::RegisterAndMove;
                PrOutCommand {
                    action,
                    reservation_key: PrKey::new(rk),
                    service_action_key: PrKey::new(sark),
                    scope,
                    type_code: ty,
                    aptpl: flags[0],
                    all_tg_pt: !ram && flags[1],
                    spec_i_pt: !ram && flags[2],
                    transport_ids: if ram {
                        ids[..1].to_vec()
                    } else if flags[2] {
                        ids
                    } else {
                        Vec::new()
                    },
                    relative_target_port: if ram { rtpi } else { 0 },
                    unreg: ram && flags[3],
                }
            })
    }

    proptest! {
        #[test]
        fn scsi_encoding_round_trips(cmd in arb_command()) {
            let (cdb, params) = cmd.to_scsi();
            let cdb = PrOutCdb::decode(&cdb).unwrap();
            prop_assert_eq!(cdb.parameter_list_length as usize, params.len());
            prop_assert_eq!(PrOutCommand::from_scsi(&cdb, &params).unwrap(), cmd);
        }
    }

    #[test]
    fn fencing_preempt_puts_own_key_first_and_victim_second() {
        let cmd = PrOutCommand::preempt(
            PrKey::new(0xb2),
            PrKey::new(0xa1),
            ReservationType::WriteExclusiveRegistrantsOnly,
        );
        let (cdb, params) = cmd.to_scsi();
        assert_eq!(&cdb[..3], &[0x5f, 0x04, 0x05]);
        assert_eq!(params[7], 0xb2);
        assert_eq!(params[15], 0xa1);
    }
}
