//! An in-memory SPC-4 persistent-reservation device server: one logical unit, reached through
//! any number of I_T nexuses. It answers CDBs with the bytes a real target would send, so it
//! stands in for a disk in fast tests and in the cluster simulation.
//!
//! ```text
//!   execute(nexus, CDB, data-out) ──► UNIT ATTENTION pending? ──► CHECK CONDITION (all cleared)
//!                                    reservation check (non-holder rules) ──► RESERVATION CONFLICT
//!                                    PR IN  ──► parameter data (cut to ALLOCATION LENGTH)
//!                                    PR OUT ──► registrations / reservation / generation / UAs
//! ```
//!
//! Where SPC-4 leaves room or LIO (the Linux target, our reference) departs from it, the
//! emulator does what LIO does, and a differential test in the VM checks that statement step
//! by step. The departures, all from `drivers/target/target_core_pr.c`:
//! - RESERVE, RELEASE, CLEAR and REGISTER AND MOVE from an unregistered I_T nexus answer
//!   NOT READY / LOGICAL UNIT COMMUNICATION FAILURE (SPC-4: RESERVATION CONFLICT);
//! - unregistering (REGISTER with a zero service action key) does not bump PRgeneration;
//! - RELEASE with the wrong type answers RESERVATION CONFLICT (SPC-4: ILLEGAL REQUEST);
//! - in an all-registrants reservation one registration is still "the" holder (the one that
//!   reserved, or the next in registration order); a PREEMPT naming its key takes the
//!   holder path;
//! - RESERVE and REGISTER AND MOVE from a non-holder are first judged like writes (a
//!   registrant of a registrants-only or all-registrants reservation passes), so their own
//!   checks (type, key, parameter list) can answer before RESERVATION CONFLICT does;
//! - only the first queued unit attention is examined when another is added, and reporting
//!   one clears them all.
//!
//! It is a pure state machine: no clock, no I/O, no randomness.

mod nvme;

pub use nvme::NvmeCompletion;

use crate::key::PrKey;
use crate::pr::cdb::{
    INQUIRY, InquiryCdb, PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT, PrInCdb, PrOutCdb,
};
use crate::pr::data::{
    Capabilities, FullStatus, FullStatusEntry, Initiator, KeyList, PrInData, Reservation,
    ReservationInfo,
};
use crate::pr::inquiry::InquiryData;
use crate::pr::param::{BasicParams, RegisterAndMoveParams};
use crate::pr::sense::{ScsiStatus, Sense, SenseKey};
use crate::pr::transport_id::TransportId;
use crate::pr::{PrInAction, PrOutAction, PrOutCommand, ReservationType, SCOPE_LU};
use serde::{Deserialize, Serialize};

/// Which I_T nexus (or NVMe host) a command arrives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NexusId(pub u16);

/// How a nexus looks to the device server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NexusInfo {
    /// The initiator port (its TransportID).
    pub initiator: TransportId,
    /// Relative target port identifier the target reports for this nexus's port.
    pub relative_target_port: u16,
    /// Which target port (LIO: which TPG) the nexus goes through. Usually distinct per
    /// RELATIVE TARGET PORT IDENTIFIER, but LIO's tcm_loop reports 0 for every port, so the
    /// two are kept apart.
    pub target_port: u16,
    /// NVMe host rather than SCSI initiator: no unit attentions are queued for it.
    pub nvme: bool,
}

impl NexusInfo {
    /// A SCSI nexus from `initiator` through the target port with identifier
    /// `relative_target_port`.
    pub fn scsi(initiator: TransportId, relative_target_port: u16) -> Self {
        Self {
            initiator,
            relative_target_port,
            target_port: relative_target_port,
            nvme: false,
        }
    }

    /// The same nexus on target port `port` (when ports share a relative identifier).
    pub fn on_target_port(mut self, port: u16) -> Self {
        self.target_port = port;
        self
    }

    /// A SAS-addressed nexus like the ones LIO's tcm_loop creates.
    pub fn sas(address: u64, relative_target_port: u16) -> Self {
        Self::scsi(
            TransportId::Sas {
                address: address.to_be_bytes(),
            },
            relative_target_port,
        )
    }
}

/// One registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub nexus: NexusId,
    pub key: PrKey,
    pub all_tg_pt: bool,
    pub aptpl: bool,
}

/// The reservation: which registration is its (designated) holder, scope and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationState {
    pub holder: NexusId,
    pub scope: u8,
    pub reservation_type: ReservationType,
}

/// A device server's answer to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    pub status: ScsiStatus,
    pub sense: Option<Sense>,
    /// Data-in bytes (already cut to the allocation length).
    pub data: Vec<u8>,
}

impl ScsiResponse {
    fn good(data: Vec<u8>) -> Self {
        Self {
            status: ScsiStatus::GOOD,
            sense: None,
            data,
        }
    }
}

/// Why a command failed, before it is turned into status and sense.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Conflict,
    Check(SenseKey, u8, u8),
}

impl Refusal {
    const fn illegal(asc: u8) -> Self {
        Self::Check(SenseKey::IllegalRequest, asc, 0)
    }
    /// INVALID FIELD IN CDB.
    pub const INVALID_CDB_FIELD: Self = Self::illegal(0x24);
    /// INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_PARAMETER_LIST: Self = Self::illegal(0x26);
    /// PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LIST_LENGTH: Self = Self::illegal(0x1a);
    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Self = Self::illegal(0x20);
    /// LIO's answer to an unregistered nexus: NOT READY, LOGICAL UNIT COMMUNICATION FAILURE.
    pub const NOT_REGISTERED: Self = Self::Check(SenseKey::NotReady, 0x08, 0x00);

    fn into_response(self) -> ScsiResponse {
        match self {
            Self::Conflict => ScsiResponse {
                status: ScsiStatus::RESERVATION_CONFLICT,
                sense: None,
                data: Vec::new(),
            },
            Self::Check(key, asc, ascq) => ScsiResponse {
                status: ScsiStatus::CHECK_CONDITION,
                sense: Some(Sense::new(key, asc, ascq)),
                data: Vec::new(),
            },
        }
    }
}

/// Unit attention ASC 2Ah qualifiers a PR OUT can queue.
mod ua {
    pub const RESERVATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x03);
    pub const RESERVATIONS_RELEASED: (u8, u8) = (0x2a, 0x04);
    pub const REGISTRATIONS_PREEMPTED: (u8, u8) = (0x2a, 0x05);
    pub const POWER_ON: (u8, u8) = (0x29, 0x01);
}

/// Data access a command makes, for the reservation check of READ/WRITE-like commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    Read,
    Write,
}

/// One logical unit's persistent-reservation state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Emulator {
    nexuses: Vec<NexusInfo>,
    /// In registration order (LIO's list order, visible in READ KEYS).
    registrations: Vec<Registration>,
    reservation: Option<ReservationState>,
    generation: u32,
    /// PTPL_A: the last REGISTER/REGISTER AND MOVE asked for APTPL and no CLEAR followed.
    aptpl_active: bool,
    /// Pending unit attentions per nexus, highest priority first.
    unit_attentions: Vec<Vec<(u8, u8)>>,
    inquiry: InquiryData,
}

impl Default for Emulator {
    fn default() -> Self {
        Self::new()
    }
}

impl Emulator {
    /// An LU with no nexuses, registrations or reservation; generation 0.
    pub fn new() -> Self {
        Self {
            nexuses: Vec::new(),
            registrations: Vec::new(),
            reservation: None,
            generation: 0,
            aptpl_active: false,
            unit_attentions: Vec::new(),
            inquiry: InquiryData {
                peripheral_qualifier: 0,
                device_type: InquiryData::TYPE_DISK,
                vendor: "TANDEM".into(),
                product: "PR-EMULATOR".into(),
                revision: "1.0".into(),
            },
        }
    }

    /// Starts counting PRgeneration at `generation` (to mirror a real LU's counter).
    pub fn with_generation(mut self, generation: u32) -> Self {
        self.generation = generation;
        self
    }

    /// Adds an I_T nexus.
    pub fn add_nexus(&mut self, info: NexusInfo) -> NexusId {
        let id = NexusId(u16::try_from(self.nexuses.len()).unwrap_or(u16::MAX));
        self.nexuses.push(info);
        self.unit_attentions.push(Vec::new());
        id
    }

    pub fn nexus(&self, id: NexusId) -> Option<&NexusInfo> {
        self.nexuses.get(usize::from(id.0))
    }

    pub fn nexus_count(&self) -> usize {
        self.nexuses.len()
    }

    pub fn registrations(&self) -> &[Registration] {
        &self.registrations
    }

    pub fn reservation(&self) -> Option<ReservationState> {
        self.reservation
    }

    pub fn generation(&self) -> u32 {
        self.generation
    }

    pub fn aptpl_active(&self) -> bool {
        self.aptpl_active
    }

    /// Unit attentions waiting for `nexus`, highest priority first.
    pub fn pending_unit_attentions(&self, nexus: NexusId) -> &[(u8, u8)] {
        self.unit_attentions
            .get(usize::from(nexus.0))
            .map_or(&[], Vec::as_slice)
    }

    /// The key `nexus` is registered with.
    pub fn key_of(&self, nexus: NexusId) -> Option<PrKey> {
        self.registration(nexus).map(|r| r.key)
    }

    fn registration(&self, nexus: NexusId) -> Option<&Registration> {
        self.registrations.iter().find(|r| r.nexus == nexus)
    }

    fn is_registered(&self, nexus: NexusId) -> bool {
        self.registration(nexus).is_some()
    }

    /// LIO's `is_reservation_holder`: the designated holder, or any registrant of an
    /// all-registrants reservation.
    fn is_holder(&self, nexus: NexusId) -> bool {
        self.reservation.is_some_and(|r| {
            r.holder == nexus
                || (r.reservation_type.is_all_registrants() && self.is_registered(nexus))
        })
    }

    /// Checks the state's invariants; panics with a description when one is broken.
    pub fn check_invariants(&self) {
        let mut seen = std::collections::BTreeSet::new();
        for r in &self.registrations {
            assert!(
                usize::from(r.nexus.0) < self.nexuses.len(),
                "registration for unknown nexus {:?}",
                r.nexus
            );
            assert!(!r.key.is_zero(), "a registration with key zero: {r:?}");
            assert!(
                seen.insert(r.nexus),
                "two registrations for nexus {:?}",
                r.nexus
            );
        }
        if let Some(res) = self.reservation {
            assert!(
                self.is_registered(res.holder),
                "reservation holder {:?} is not registered",
                res.holder
            );
            assert_eq!(res.scope, SCOPE_LU, "only LU scope exists");
        }
        assert_eq!(self.unit_attentions.len(), self.nexuses.len());
    }

    /// Executes one command received on `nexus`.
    pub fn execute(&mut self, nexus: NexusId, cdb: &[u8], data_out: &[u8]) -> ScsiResponse {
        if usize::from(nexus.0) >= self.nexuses.len() {
            return Refusal::Check(SenseKey::IllegalRequest, 0x25, 0).into_response();
        }
        let Some(&opcode) = cdb.first() else {
            return Refusal::INVALID_OPCODE.into_response();
        };
        if opcode == INQUIRY {
            return match InquiryCdb::decode(cdb) {
                Ok(c) if !c.evpd => {
                    let mut data = self.inquiry.encode();
                    data.truncate(usize::from(c.allocation_length));
                    ScsiResponse::good(data)
                }
                _ => Refusal::INVALID_CDB_FIELD.into_response(),
            };
        }
        // Unknown or malformed CDBs are refused before unit attentions are looked at.
        enum Parsed {
            In(PrInCdb),
            Out(PrOutCdb),
            Data(Access),
        }
        let parsed = match opcode {
            PERSISTENT_RESERVE_IN => PrInCdb::decode(cdb).map(Parsed::In),
            PERSISTENT_RESERVE_OUT => PrOutCdb::decode(cdb).map(Parsed::Out),
            READ_10 if cdb.len() >= 10 => Ok(Parsed::Data(Access::Read)),
            WRITE_10 if cdb.len() >= 10 => Ok(Parsed::Data(Access::Write)),
            _ => return Refusal::INVALID_OPCODE.into_response(),
        };
        let Ok(parsed) = parsed else {
            return Refusal::INVALID_CDB_FIELD.into_response();
        };
        if let Some(ua) = self.take_unit_attention(nexus) {
            return Refusal::Check(SenseKey::UnitAttention, ua.0, ua.1).into_response();
        }
        let result = match parsed {
            Parsed::In(c) => self.pr_in_cdb(&c),
            Parsed::Out(c) => self.pr_out_cdb(nexus, &c, data_out).map(|()| Vec::new()),
            // The emulator keeps no blocks: a permitted READ returns no data.
            Parsed::Data(access) if self.may_access(nexus, access) => Ok(Vec::new()),
            Parsed::Data(_) => Err(Refusal::Conflict),
        };
        match result {
            Ok(data) => ScsiResponse::good(data),
            Err(refusal) => refusal.into_response(),
        }
    }

    /// Typed PR IN: executes the CDB with an 8 KiB allocation length and decodes the answer.
    pub fn pr_in(&mut self, nexus: NexusId, action: PrInAction) -> Result<PrInData, ScsiResponse> {
        let cdb = PrInCdb {
            service_action: action.code(),
            allocation_length: 8192,
            control: 0,
        };
        let resp = self.execute(nexus, &cdb.encode(), &[]);
        if resp.status != ScsiStatus::GOOD {
            return Err(resp);
        }
        PrInData::decode(action, &resp.data).map_err(|_| resp)
    }

    /// Typed PR OUT.
    pub fn pr_out(&mut self, nexus: NexusId, cmd: &PrOutCommand) -> Result<(), ScsiResponse> {
        let (cdb, params) = cmd.to_scsi();
        let resp = self.execute(nexus, &cdb, &params);
        if resp.status == ScsiStatus::GOOD {
            Ok(())
        } else {
            Err(resp)
        }
    }

    /// A READ or WRITE from `nexus`, as the device server would check it: unit attentions
    /// first (consumed), then the reservation.
    pub fn data_command(&mut self, nexus: NexusId, access: Access) -> Result<(), ScsiResponse> {
        if let Some(ua) = self.take_unit_attention(nexus) {
            return Err(Refusal::Check(SenseKey::UnitAttention, ua.0, ua.1).into_response());
        }
        if self.may_access(nexus, access) {
            Ok(())
        } else {
            Err(Refusal::Conflict.into_response())
        }
    }

    /// Whether the reservation lets `nexus` read or write (no side effects).
    pub fn may_access(&self, nexus: NexusId, access: Access) -> bool {
        let Some(res) = self.reservation else {
            return true;
        };
        if res.holder == nexus {
            return true;
        }
        let registered = self.is_registered(nexus);
        let ty = res.reservation_type;
        if ty.admits_registrants() && registered {
            return true;
        }
        ty.is_write_exclusive() && access == Access::Read
    }

    /// A power cycle of the LU: registrations and the reservation survive only if APTPL was
    /// active; every nexus gets POWER ON OCCURRED.
    pub fn power_cycle(&mut self) {
        if !self.aptpl_active {
            self.registrations.clear();
            self.reservation = None;
        }
        for i in 0..self.nexuses.len() {
            let id = NexusId(u16::try_from(i).unwrap_or(u16::MAX));
            self.unit_attentions[i].clear();
            self.queue_unit_attention(id, ua::POWER_ON);
        }
    }

    fn take_unit_attention(&mut self, nexus: NexusId) -> Option<(u8, u8)> {
        let list = self.unit_attentions.get_mut(usize::from(nexus.0))?;
        let head = list.first().copied();
        list.clear();
        head
    }

    /// LIO's `core_scsi3_ua_allocate`: only the head of the queue is compared.
    fn queue_unit_attention(&mut self, nexus: NexusId, (asc, ascq): (u8, u8)) {
        if self.nexus(nexus).is_some_and(|n| n.nvme) {
            return;
        }
        let Some(list) = self.unit_attentions.get_mut(usize::from(nexus.0)) else {
            return;
        };
        let Some(&(head_asc, head_ascq)) = list.first() else {
            list.push((asc, ascq));
            return;
        };
        if (head_asc, head_ascq) == (asc, ascq) {
            return;
        }
        let to_front = if head_asc == 0x29 {
            asc == 0x29 && ascq > head_ascq
        } else if head_asc == 0x2a {
            // LIO compares the new ASCQ with the head's ASC here.
            asc == 0x29 || ascq > head_asc
        } else {
            false
        };
        if to_front {
            list.insert(0, (asc, ascq));
        } else {
            list.push((asc, ascq));
        }
    }

    fn bump_generation(&mut self) {
        self.generation = self.generation.wrapping_add(1);
    }

    // ---- PR IN ----------------------------------------------------------------------

    fn pr_in_cdb(&self, cdb: &PrInCdb) -> Result<Vec<u8>, Refusal> {
        let alloc = usize::from(cdb.allocation_length);
        let Some(action) = PrInAction::from_code(cdb.service_action) else {
            return Err(Refusal::INVALID_CDB_FIELD);
        };
        let min = if action == PrInAction::ReportCapabilities {
            6
        } else {
            8
        };
        if alloc < min {
            return Err(Refusal::INVALID_CDB_FIELD);
        }
        let mut data = match action {
            PrInAction::ReadKeys => KeyList {
                generation: self.generation,
                keys: self.registrations.iter().map(|r| r.key).collect(),
                truncated: false,
            }
            .encode(),
            PrInAction::ReadReservation => {
                let info = self.read_reservation();
                if info.reservation.is_some() && alloc < 22 {
                    // LIO leaves the key out when it does not fit whole.
                    let mut d = vec![0u8; 8];
                    d[..4].copy_from_slice(&self.generation.to_be_bytes());
                    d[4..8].copy_from_slice(&16u32.to_be_bytes());
                    d.resize(alloc.min(24), 0);
                    d
                } else {
                    info.encode()
                }
            }
            PrInAction::ReportCapabilities => self.capabilities().encode(),
            PrInAction::ReadFullStatus => self.full_status_for(alloc).encode(),
        };
        data.truncate(alloc);
        Ok(data)
    }

    fn read_reservation(&self) -> ReservationInfo {
        ReservationInfo {
            generation: self.generation,
            reservation: self.reservation.map(|r| Reservation {
                key: if r.reservation_type.is_all_registrants() {
                    PrKey::ZERO
                } else {
                    self.key_of(r.holder).unwrap_or(PrKey::ZERO)
                },
                scope: r.scope,
                type_code: r.reservation_type.scsi_code(),
            }),
        }
    }

    /// What LIO reports in REPORT CAPABILITIES.
    pub fn capabilities(&self) -> Capabilities {
        let mask = ReservationType::ALL
            .iter()
            .fold(0u16, |m, &t| m | Capabilities::type_mask_bit(t));
        Capabilities {
            replace_lost_reservation: false,
            compatible_reservation_handling: true,
            specify_initiator_ports: true,
            all_target_ports: true,
            persist_through_power_loss: true,
            type_mask_valid: true,
            allow_commands: 1,
            persist_through_power_loss_active: self.aptpl_active,
            type_mask: mask,
        }
    }

    /// READ FULL STATUS as LIO builds it for an allocation length: it stops adding
    /// descriptors when the next TransportID would not fit (comparing against the
    /// descriptor bytes so far, not counting headers).
    fn full_status_for(&self, alloc: usize) -> FullStatus {
        let all_reg = self
            .reservation
            .filter(|r| r.reservation_type.is_all_registrants());
        let mut entries = Vec::new();
        let mut add_len = 0usize;
        for reg in &self.registrations {
            let Some(info) = self.nexus(reg.nexus) else {
                continue;
            };
            let tid_len = info.initiator.encode().len();
            if tid_len + add_len > alloc {
                break;
            }
            let holder = self.reservation.filter(|r| r.holder == reg.nexus);
            let (is_holder, scope, ty) = match (holder, all_reg) {
                (Some(r), _) | (None, Some(r)) => (true, r.scope, r.reservation_type.scsi_code()),
                (None, None) => (false, 0, 0),
            };
            entries.push(FullStatusEntry {
                key: reg.key,
                all_tg_pt: reg.all_tg_pt,
                reservation_holder: is_holder,
                scope,
                type_code: ty,
                relative_target_port: if reg.all_tg_pt {
                    0
                } else {
                    info.relative_target_port
                },
                initiator: Initiator::Scsi {
                    transport_id: info.initiator.clone(),
                },
            });
            add_len += 24 + tid_len;
        }
        FullStatus {
            generation: self.generation,
            entries,
            truncated: false,
        }
    }

    /// The full status (no allocation limit).
    pub fn full_status(&self) -> FullStatus {
        self.full_status_for(usize::MAX)
    }

    // ---- PR OUT ---------------------------------------------------------------------

    fn pr_out_cdb(
        &mut self,
        nexus: NexusId,
        cdb: &PrOutCdb,
        data_out: &[u8],
    ) -> Result<(), Refusal> {
        let len = usize::try_from(cdb.parameter_list_length).unwrap_or(usize::MAX);
        self.reservation_check_pr_out(nexus, cdb.service_action)?;
        if len < 24 {
            return Err(Refusal::PARAMETER_LIST_LENGTH);
        }
        if len > MAX_PARAMETER_LIST {
            return Err(Refusal::INVALID_CDB_FIELD);
        }
        // Missing data-out bytes read as zeros, like an initiator sending a short buffer.
        let mut params = data_out[..len.min(data_out.len())].to_vec();
        params.resize(len, 0);
        let action = PrOutAction::from_code(cdb.service_action);
        let ram = action == Some(PrOutAction::RegisterAndMove);
        let spec_i_pt = !ram && params[20] & 0x08 != 0;
        if spec_i_pt && action != Some(PrOutAction::Register) {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        }
        if !spec_i_pt && !ram && len != 24 {
            return Err(Refusal::PARAMETER_LIST_LENGTH);
        }
        let ty = cdb.type_code;
        let scope = cdb.scope;
        match action {
            Some(PrOutAction::Register) => self.register(nexus, &params, len, false),
            Some(PrOutAction::RegisterAndIgnoreExistingKey) => {
                self.register(nexus, &params, len, true)
            }
            Some(PrOutAction::Reserve) => {
                let ty = ReservationType::from_scsi(ty).ok_or(Refusal::INVALID_CDB_FIELD)?;
                self.reserve(nexus, key_at(&params, 0), scope, ty)
            }
            Some(PrOutAction::Release) => self.release(nexus, key_at(&params, 0), scope, ty),
            Some(PrOutAction::Clear) => self.clear(nexus, key_at(&params, 0)),
            Some(PrOutAction::Preempt | PrOutAction::PreemptAndAbort) => {
                let ty = ReservationType::from_scsi(ty).ok_or(Refusal::INVALID_CDB_FIELD)?;
                self.preempt(nexus, key_at(&params, 0), key_at(&params, 8), scope, ty)
            }
            Some(PrOutAction::RegisterAndMove) => self.register_and_move(nexus, &params, len),
            Some(PrOutAction::ReplaceLostReservation) | None => Err(Refusal::INVALID_CDB_FIELD),
        }
    }

    /// LIO's `core_scsi3_pr_seq_non_holder` for PERSISTENT RESERVE OUT from a nexus that
    /// is not the (designated) reservation holder. REGISTER is always let through; CLEAR,
    /// PREEMPT and RELEASE need a registration; RESERVE and REGISTER AND MOVE are judged like
    /// any command that writes (allowed only for registrants of a registrants-only or
    /// all-registrants reservation) and then meet the service action's own checks.
    fn reservation_check_pr_out(&self, nexus: NexusId, service_action: u8) -> Result<(), Refusal> {
        let Some(res) = self.reservation else {
            return Ok(());
        };
        if res.holder == nexus {
            return Ok(());
        }
        let registered = self.is_registered(nexus);
        let allowed = match PrOutAction::from_code(service_action) {
            Some(
                PrOutAction::Clear
                | PrOutAction::Preempt
                | PrOutAction::PreemptAndAbort
                | PrOutAction::Release,
            ) => registered,
            Some(PrOutAction::Register | PrOutAction::RegisterAndIgnoreExistingKey) => true,
            Some(PrOutAction::RegisterAndMove | PrOutAction::Reserve) => {
                registered && res.reservation_type.admits_registrants()
            }
            Some(PrOutAction::ReplaceLostReservation) | None => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(Refusal::Conflict)
        }
    }

    fn register(
        &mut self,
        nexus: NexusId,
        params: &[u8],
        len: usize,
        ignore: bool,
    ) -> Result<(), Refusal> {
        let p = BasicParams {
            reservation_key: key_at(params, 0),
            service_action_key: key_at(params, 8),
            spec_i_pt: params[20] & 0x08 != 0,
            all_tg_pt: params[20] & 0x04 != 0,
            aptpl: params[20] & 0x01 != 0,
            transport_ids: Vec::new(),
        };
        let res_key = if ignore {
            PrKey::ZERO
        } else {
            p.reservation_key
        };
        let sa_key = p.service_action_key;
        let Some(existing) = self.registration(nexus).cloned() else {
            if !res_key.is_zero() {
                return Err(Refusal::Conflict);
            }
            if sa_key.is_zero() {
                return Ok(());
            }
            let mut targets = vec![nexus];
            if p.spec_i_pt {
                targets.extend(self.spec_i_pt_targets(nexus, params, len)?);
            }
            for target in targets {
                self.add_registration(target, sa_key, p.all_tg_pt, p.aptpl);
            }
            self.aptpl_active = p.aptpl;
            return Ok(());
        };
        if !ignore && res_key != existing.key {
            return Err(Refusal::Conflict);
        }
        if p.spec_i_pt {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        }
        if existing.all_tg_pt && !p.all_tg_pt {
            return Err(Refusal::INVALID_CDB_FIELD);
        }
        if !sa_key.is_zero() {
            self.bump_generation();
            if let Some(r) = self.registrations.iter_mut().find(|r| r.nexus == nexus) {
                r.key = sa_key;
            }
        } else {
            let was_holder = self.reservation.filter(|r| r.holder == nexus);
            if existing.all_tg_pt {
                // Other ALL_TG_PT registrations of the same initiator port with the key
                // given in the parameter list go too (LIO compares with RESERVATION KEY,
                // which is zero for REGISTER AND IGNORE EXISTING KEY).
                let port = self.nexus(nexus).map(|n| n.initiator.port_name());
                let others: Vec<NexusId> = self
                    .registrations
                    .iter()
                    .filter(|r| {
                        r.nexus != nexus
                            && r.all_tg_pt
                            && r.key == res_key
                            && self.nexus(r.nexus).map(|n| n.initiator.port_name()) == port
                    })
                    .map(|r| r.nexus)
                    .collect();
                self.registrations.retain(|r| !others.contains(&r.nexus));
            }
            self.remove_registration(nexus);
            if let Some(res) = was_holder
                && matches!(
                    res.reservation_type,
                    ReservationType::WriteExclusiveRegistrantsOnly
                        | ReservationType::ExclusiveAccessRegistrantsOnly
                )
            {
                let others: Vec<NexusId> = self.registrations.iter().map(|r| r.nexus).collect();
                for other in others {
                    self.queue_unit_attention(other, ua::RESERVATIONS_RELEASED);
                }
            }
        }
        self.aptpl_active = p.aptpl;
        Ok(())
    }

    /// Resolves SPEC_I_PT TransportIDs to nexuses to register (LIO: the first target port,
    /// in port order, whose protocol matches and that knows the initiator).
    fn spec_i_pt_targets(
        &self,
        nexus: NexusId,
        params: &[u8],
        len: usize,
    ) -> Result<Vec<NexusId>, Refusal> {
        if len < 28 {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        }
        let tpdl = usize::try_from(crate::pr::be32(params, 24).unwrap_or(0)).unwrap_or(usize::MAX);
        if tpdl.checked_add(28) != Some(len) {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        }
        let ids = TransportId::decode_list(&params[28..len])
            .map_err(|_| Refusal::INVALID_PARAMETER_LIST)?;
        let mut out = Vec::new();
        for id in ids {
            let name = id.port_name();
            let found = self.nexus_ids().find(|&n| {
                self.nexus(n).is_some_and(|info| {
                    info.initiator.protocol_id() == id.protocol_id()
                        && info.initiator.port_name() == name
                })
            });
            let Some(target) = found else {
                return Err(Refusal::INVALID_PARAMETER_LIST);
            };
            if target == nexus || self.is_registered(target) || out.contains(&target) {
                continue;
            }
            out.push(target);
        }
        Ok(out)
    }

    fn nexus_ids(&self) -> impl Iterator<Item = NexusId> + '_ {
        (0..self.nexuses.len()).map(|i| NexusId(u16::try_from(i).unwrap_or(u16::MAX)))
    }

    /// Adds a registration (PRgeneration + 1), and with ALL_TG_PT the same initiator port's
    /// other unregistered nexuses too (+1 each).
    fn add_registration(&mut self, nexus: NexusId, key: PrKey, all_tg_pt: bool, aptpl: bool) {
        self.bump_generation();
        self.registrations.push(Registration {
            nexus,
            key,
            all_tg_pt,
            aptpl,
        });
        if all_tg_pt {
            let port = self.nexus(nexus).map(|n| n.initiator.port_name());
            let siblings: Vec<NexusId> = self
                .nexus_ids()
                .filter(|&n| {
                    n != nexus
                        && !self.is_registered(n)
                        && self.nexus(n).map(|i| i.initiator.port_name()) == port
                })
                .collect();
            for sibling in siblings {
                self.bump_generation();
                self.registrations.push(Registration {
                    nexus: sibling,
                    key,
                    all_tg_pt,
                    aptpl,
                });
            }
        }
    }

    /// Removes `nexus`'s registration; if it held the reservation, releases it — except that
    /// an all-registrants reservation passes to the next registration in order.
    fn remove_registration(&mut self, nexus: NexusId) {
        self.registrations.retain(|r| r.nexus != nexus);
        if let Some(res) = self.reservation
            && res.holder == nexus
        {
            self.reservation = match (
                res.reservation_type.is_all_registrants(),
                self.registrations.first(),
            ) {
                (true, Some(next)) => Some(ReservationState {
                    holder: next.nexus,
                    ..res
                }),
                _ => None,
            };
        }
    }

    fn reserve(
        &mut self,
        nexus: NexusId,
        key: PrKey,
        scope: u8,
        ty: ReservationType,
    ) -> Result<(), Refusal> {
        let Some(reg) = self.registration(nexus) else {
            return Err(Refusal::NOT_REGISTERED);
        };
        if key != reg.key {
            return Err(Refusal::Conflict);
        }
        if scope != SCOPE_LU {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        }
        if let Some(res) = self.reservation {
            if !self.is_holder(nexus) || res.reservation_type != ty || res.scope != scope {
                return Err(Refusal::Conflict);
            }
            return Ok(());
        }
        self.reservation = Some(ReservationState {
            holder: nexus,
            scope,
            reservation_type: ty,
        });
        Ok(())
    }

    fn release(&mut self, nexus: NexusId, key: PrKey, scope: u8, ty: u8) -> Result<(), Refusal> {
        let Some(reg) = self.registration(nexus) else {
            return Err(Refusal::NOT_REGISTERED);
        };
        let reg_key = reg.key;
        let Some(res) = self.reservation else {
            return Ok(());
        };
        if !self.is_holder(nexus) {
            return Ok(());
        }
        if key != reg_key {
            return Err(Refusal::Conflict);
        }
        if res.reservation_type.scsi_code() != ty || res.scope != scope {
            return Err(Refusal::Conflict);
        }
        self.reservation = None;
        if res.reservation_type.admits_registrants() {
            let others: Vec<NexusId> = self
                .registrations
                .iter()
                .map(|r| r.nexus)
                .filter(|&n| n != nexus)
                .collect();
            for other in others {
                self.queue_unit_attention(other, ua::RESERVATIONS_RELEASED);
            }
        }
        Ok(())
    }

    fn clear(&mut self, nexus: NexusId, key: PrKey) -> Result<(), Refusal> {
        let Some(reg) = self.registration(nexus) else {
            return Err(Refusal::NOT_REGISTERED);
        };
        if key != reg.key {
            return Err(Refusal::Conflict);
        }
        self.reservation = None;
        let removed: Vec<NexusId> = self.registrations.drain(..).map(|r| r.nexus).collect();
        for other in removed.into_iter().filter(|&n| n != nexus) {
            self.queue_unit_attention(other, ua::RESERVATIONS_PREEMPTED);
        }
        self.aptpl_active = false;
        self.bump_generation();
        Ok(())
    }

    fn preempt(
        &mut self,
        nexus: NexusId,
        key: PrKey,
        sa_key: PrKey,
        scope: u8,
        ty: ReservationType,
    ) -> Result<(), Refusal> {
        let Some(reg) = self.registration(nexus) else {
            return Err(Refusal::Conflict);
        };
        if reg.key != key {
            return Err(Refusal::Conflict);
        }
        if scope != SCOPE_LU {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        }
        let holder = self.reservation;
        let all_reg = holder.is_some_and(|r| r.reservation_type.is_all_registrants());
        if !all_reg && sa_key.is_zero() {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        }
        let holder_key = holder.and_then(|r| self.key_of(r.holder));
        if holder.is_none() || holder_key != Some(sa_key) {
            // No reservation, or the key does not name its holder: remove registrations.
            let mut matched = false;
            let mut removed = Vec::new();
            for r in &self.registrations {
                if all_reg {
                    if !sa_key.is_zero() && r.key != sa_key {
                        continue;
                    }
                    matched = true;
                    if r.nexus == nexus {
                        continue;
                    }
                } else {
                    if r.key != sa_key {
                        continue;
                    }
                    matched = true;
                }
                removed.push(r.nexus);
            }
            if !matched {
                return Err(Refusal::Conflict);
            }
            self.registrations.retain(|r| !removed.contains(&r.nexus));
            for other in removed.into_iter().filter(|&n| n != nexus) {
                self.queue_unit_attention(other, ua::REGISTRATIONS_PREEMPTED);
            }
            if all_reg && sa_key.is_zero() {
                self.reservation = Some(ReservationState {
                    holder: nexus,
                    scope,
                    reservation_type: ty,
                });
            } else if let Some(res) = self.reservation
                && !self.is_registered(res.holder)
            {
                // The designated holder of an all-registrants reservation was removed:
                // LIO keeps pointing at the freed registration; the next one in order is
                // the closest observable equivalent.
                self.reservation = self.registrations.first().map(|next| ReservationState {
                    holder: next.nexus,
                    ..res
                });
            }
            self.bump_generation();
            return Ok(());
        }
        // The key names the reservation holder: take the reservation over.
        let old = holder.map(|r| (r.reservation_type, r.scope));
        let removed: Vec<NexusId> = self
            .registrations
            .iter()
            .filter(|r| r.nexus != nexus && (sa_key.is_zero() || r.key == sa_key))
            .map(|r| r.nexus)
            .collect();
        self.registrations.retain(|r| !removed.contains(&r.nexus));
        for other in &removed {
            self.queue_unit_attention(*other, ua::REGISTRATIONS_PREEMPTED);
        }
        self.reservation = Some(ReservationState {
            holder: nexus,
            scope,
            reservation_type: ty,
        });
        if old != Some((ty, scope)) {
            let others: Vec<NexusId> = self
                .registrations
                .iter()
                .map(|r| r.nexus)
                .filter(|&n| n != nexus)
                .collect();
            for other in others {
                self.queue_unit_attention(other, ua::RESERVATIONS_RELEASED);
            }
        }
        self.bump_generation();
        Ok(())
    }

    fn register_and_move(
        &mut self,
        nexus: NexusId,
        params: &[u8],
        len: usize,
    ) -> Result<(), Refusal> {
        let Some(reg) = self.registration(nexus).cloned() else {
            return Err(Refusal::NOT_REGISTERED);
        };
        let res_key = key_at(params, 0);
        let sa_key = key_at(params, 8);
        if res_key != reg.key {
            return Err(Refusal::Conflict);
        }
        if sa_key.is_zero() {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        }
        let tid_len =
            usize::try_from(crate::pr::be32(params, 20).unwrap_or(0)).unwrap_or(usize::MAX);
        if tid_len.checked_add(24) != Some(len) {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        }
        let rtpi = crate::pr::be16(params, 18).unwrap_or(0);
        let Some(port_nexus) = self.nexus_ids().find(|&n| {
            self.nexus(n)
                .is_some_and(|i| i.relative_target_port == rtpi)
        }) else {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        };
        let port_protocol = self.nexus(port_nexus).map(|i| i.initiator.protocol_id());
        if params.get(24).map(|b| b & 0x0f) != port_protocol {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        }
        let p = RegisterAndMoveParams::decode(&params[..len])
            .map_err(|_| Refusal::INVALID_PARAMETER_LIST)?;
        let dest_name = p.transport_id.port_name();
        let own_name = self.nexus(nexus).map(|i| i.initiator.port_name());
        if Some(&dest_name) == own_name.as_ref() {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        }
        // LIO looks the destination initiator up in the first port carrying that identifier.
        let port = self.nexus(port_nexus).map(|i| i.target_port);
        let Some(dest) = self.nexus_ids().find(|&n| {
            self.nexus(n).is_some_and(|i| {
                Some(i.target_port) == port && i.initiator.port_name() == dest_name
            })
        }) else {
            return Err(Refusal::INVALID_PARAMETER_LIST);
        };
        let Some(res) = self.reservation else {
            return Err(Refusal::INVALID_CDB_FIELD);
        };
        if !self.is_holder(nexus) || res.reservation_type.is_all_registrants() {
            return Err(Refusal::Conflict);
        }
        if let Some(r) = self.registrations.iter_mut().find(|r| r.nexus == dest) {
            r.key = sa_key;
        } else {
            self.registrations.push(Registration {
                nexus: dest,
                key: sa_key,
                all_tg_pt: false,
                aptpl: p.aptpl,
            });
        }
        self.bump_generation();
        self.reservation = Some(ReservationState {
            holder: dest,
            ..res
        });
        if p.unreg {
            self.registrations.retain(|r| r.nexus != nexus);
        }
        self.aptpl_active = p.aptpl;
        Ok(())
    }
}

/// READ(10) and WRITE(10): the emulator checks them against the reservation only.
const READ_10: u8 = 0x28;
const WRITE_10: u8 = 0x2a;

/// Parameter lists longer than this are refused (INVALID FIELD IN CDB).
const MAX_PARAMETER_LIST: usize = 64 * 1024;

/// The 8-byte big-endian key at `at` of a parameter list already padded to its length.
fn key_at(params: &[u8], at: usize) -> PrKey {
    PrKey::new(crate::pr::be64(params, at).unwrap_or(0))
}

#[cfg(test)]
mod tests;
