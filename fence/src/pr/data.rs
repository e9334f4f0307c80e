//! PERSISTENT RESERVE IN parameter data (SPC-4 6.14.2 - 6.14.5).
//!
//! ```text
//! every action: 0..4 PRGENERATION (not REPORT CAPABILITIES) | 4..8 ADDITIONAL LENGTH
//! READ KEYS         : 8.. one 8-byte key per registered I_T nexus
//! READ RESERVATION  : 8..16 key | 16..20 obsolete | 21 SCOPE<<4|TYPE   (additional length 0 or 16)
//! REPORT CAPABILITIES: 0..2 LENGTH (8) | 2 RLR_C CRH SIP_C ATP_C PTPL_C | 3 TMV ALLOW_COMMANDS PTPL_A
//!                      | 4..6 PERSISTENT RESERVATION TYPE MASK
//! READ FULL STATUS  : 8.. descriptors: 0..8 key | 12 ALL_TG_PT(1) R_HOLDER(0) | 13 SCOPE|TYPE
//!                      | 18..20 RELATIVE TARGET PORT IDENTIFIER | 20..24 length | 24.. TransportID
//! ```
//!
//! A device returns at most ALLOCATION LENGTH bytes but reports the full length, so decoders
//! flag lists cut short (`truncated`) and refuse data cut inside a field they need.

use super::transport_id::TransportId;
use super::types::{PrInAction, ReservationType, type_code_description};
use super::{DecodeError, be16, be32, be64};
use crate::key::PrKey;
use serde::{Deserialize, Serialize};

/// READ KEYS data.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyList {
    pub generation: u32,
    pub keys: Vec<PrKey>,
    /// The device had more keys than the allocation length allowed.
    pub truncated: bool,
}

impl KeyList {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + 8 * self.keys.len());
        out.extend_from_slice(&self.generation.to_be_bytes());
        let len = u32::try_from(8 * self.keys.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        for key in &self.keys {
            out.extend_from_slice(&key.to_be_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "READ KEYS parameter data";
        if bytes.len() < 8 {
            return Err(DecodeError::short(WHAT, 8, bytes.len()));
        }
        let add_len = usize::try_from(be32(bytes, 4).unwrap_or(0)).unwrap_or(usize::MAX);
        if add_len % 8 != 0 {
            return Err(DecodeError::new(
                WHAT,
                format!("additional length {add_len} is not a multiple of 8"),
            ));
        }
        let available = bytes.len() - 8;
        let usable = add_len.min(available) / 8 * 8;
        let keys = bytes[8..8 + usable]
            .chunks_exact(8)
            .map(|c| PrKey::new(be64(c, 0).unwrap_or(0)))
            .collect();
        Ok(Self {
            generation: be32(bytes, 0).unwrap_or(0),
            keys,
            truncated: add_len > available,
        })
    }

    /// Whether `key` is registered (through any I_T nexus).
    pub fn contains(&self, key: PrKey) -> bool {
        self.keys.contains(&key)
    }
}

/// The persistent reservation, as READ RESERVATION reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The holder's key; zero for the all-registrants types.
    pub key: PrKey,
    pub scope: u8,
    /// Raw 4-bit TYPE code; see [`Self::reservation_type`].
    pub type_code: u8,
}

impl Reservation {
    pub fn reservation_type(&self) -> Option<ReservationType> {
        ReservationType::from_scsi(self.type_code)
    }

    /// sg_persist's words for the type.
    pub fn type_description(&self) -> String {
        type_code_description(self.type_code)
    }
}

/// READ RESERVATION data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReservationInfo {
    pub generation: u32,
    pub reservation: Option<Reservation>,
}

impl ReservationInfo {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        out.extend_from_slice(&self.generation.to_be_bytes());
        match self.reservation {
            None => out.extend_from_slice(&0u32.to_be_bytes()),
            Some(r) => {
                out.extend_from_slice(&16u32.to_be_bytes());
                out.extend_from_slice(&r.key.to_be_bytes());
                out.extend_from_slice(&[0; 4]);
                out.push(0);
                out.push((r.scope & 0x0f) << 4 | (r.type_code & 0x0f));
                out.extend_from_slice(&[0; 2]);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "READ RESERVATION parameter data";
        if bytes.len() < 8 {
            return Err(DecodeError::short(WHAT, 8, bytes.len()));
        }
        let generation = be32(bytes, 0).unwrap_or(0);
        let add_len = be32(bytes, 4).unwrap_or(0);
        if add_len == 0 {
            return Ok(Self {
                generation,
                reservation: None,
            });
        }
        if add_len < 14 {
            return Err(DecodeError::new(
                WHAT,
                format!("additional length {add_len} is too short for a reservation (16)"),
            ));
        }
        if bytes.len() < 22 {
            return Err(DecodeError::new(
                WHAT,
                format!(
                    "a reservation is announced but only {} bytes arrived (need 22)",
                    bytes.len()
                ),
            ));
        }
        Ok(Self {
            generation,
            reservation: Some(Reservation {
                key: PrKey::new(be64(bytes, 8).unwrap_or(0)),
                scope: bytes[21] >> 4,
                type_code: bytes[21] & 0x0f,
            }),
        })
    }
}

/// REPORT CAPABILITIES data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// RLR_C: Replace Lost Reservation capable.
    pub replace_lost_reservation: bool,
    /// CRH: compatible reservation handling.
    pub compatible_reservation_handling: bool,
    /// SIP_C: SPEC_I_PT capable.
    pub specify_initiator_ports: bool,
    /// ATP_C: ALL_TG_PT capable.
    pub all_target_ports: bool,
    /// PTPL_C: persist through power loss capable.
    pub persist_through_power_loss: bool,
    /// TMV: the type mask is valid.
    pub type_mask_valid: bool,
    /// ALLOW COMMANDS (3 bits).
    pub allow_commands: u8,
    /// PTPL_A: persist through power loss active.
    pub persist_through_power_loss_active: bool,
    /// PERSISTENT RESERVATION TYPE MASK, bytes 4-5 as a big-endian u16.
    pub type_mask: u16,
}

impl Capabilities {
    /// Bit of the type mask for `ty` (bytes 4-5 as big-endian u16).
    pub const fn type_mask_bit(ty: ReservationType) -> u16 {
        match ty {
            ReservationType::WriteExclusiveAllRegistrants => 0x8000,
            ReservationType::ExclusiveAccessRegistrantsOnly => 0x4000,
            ReservationType::WriteExclusiveRegistrantsOnly => 0x2000,
            ReservationType::ExclusiveAccess => 0x0800,
            ReservationType::WriteExclusive => 0x0200,
            ReservationType::ExclusiveAccessAllRegistrants => 0x0001,
        }
    }

    /// Whether the device says it supports `ty` (true when the mask is not valid).
    pub fn supports(&self, ty: ReservationType) -> bool {
        !self.type_mask_valid || self.type_mask & Self::type_mask_bit(ty) != 0
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b2 = 0u8;
        if self.replace_lost_reservation {
            b2 |= 0x80;
        }
        if self.compatible_reservation_handling {
            b2 |= 0x10;
        }
        if self.specify_initiator_ports {
            b2 |= 0x08;
        }
        if self.all_target_ports {
            b2 |= 0x04;
        }
        if self.persist_through_power_loss {
            b2 |= 0x01;
        }
        let mut b3 = (self.allow_commands & 0x07) << 4;
        if self.type_mask_valid {
            b3 |= 0x80;
        }
        if self.persist_through_power_loss_active {
            b3 |= 0x01;
        }
        let mask = self.type_mask.to_be_bytes();
        vec![0, 8, b2, b3, mask[0], mask[1], 0, 0]
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "REPORT CAPABILITIES parameter data";
        if bytes.len() < 4 {
            return Err(DecodeError::short(WHAT, 4, bytes.len()));
        }
        let b2 = bytes[2];
        let b3 = bytes[3];
        Ok(Self {
            replace_lost_reservation: b2 & 0x80 != 0,
            compatible_reservation_handling: b2 & 0x10 != 0,
            specify_initiator_ports: b2 & 0x08 != 0,
            all_target_ports: b2 & 0x04 != 0,
            persist_through_power_loss: b2 & 0x01 != 0,
            type_mask_valid: b3 & 0x80 != 0,
            allow_commands: (b3 >> 4) & 0x07,
            persist_through_power_loss_active: b3 & 0x01 != 0,
            type_mask: be16(bytes, 4).unwrap_or(0),
        })
    }
}

/// Who holds a registration: a SCSI initiator port, or an NVMe controller/host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Initiator {
    Scsi {
        transport_id: TransportId,
    },
    Nvme {
        controller_id: u16,
        host_id: Vec<u8>,
    },
}

/// One READ FULL STATUS descriptor: a registered I_T nexus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullStatusEntry {
    pub key: PrKey,
    pub all_tg_pt: bool,
    pub reservation_holder: bool,
    /// Scope and type, meaningful when `reservation_holder`.
    pub scope: u8,
    pub type_code: u8,
    /// Undefined by SPC-4 when `all_tg_pt`.
    pub relative_target_port: u16,
    pub initiator: Initiator,
}

/// READ FULL STATUS data.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FullStatus {
    pub generation: u32,
    pub entries: Vec<FullStatusEntry>,
    pub truncated: bool,
}

impl FullStatus {
    /// Encodes SCSI descriptors; NVMe entries cannot be expressed and are left out.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        for e in &self.entries {
            let Initiator::Scsi { transport_id } = &e.initiator else {
                continue;
            };
            let id = transport_id.encode();
            body.extend_from_slice(&e.key.to_be_bytes());
            body.extend_from_slice(&[0; 4]);
            let mut flags = 0u8;
            if e.all_tg_pt {
                flags |= 0x02;
            }
            if e.reservation_holder {
                flags |= 0x01;
            }
            body.push(flags);
            body.push((e.scope & 0x0f) << 4 | (e.type_code & 0x0f));
            body.extend_from_slice(&[0; 4]);
            body.extend_from_slice(&e.relative_target_port.to_be_bytes());
            body.extend_from_slice(&u32::try_from(id.len()).unwrap_or(u32::MAX).to_be_bytes());
            body.extend_from_slice(&id);
        }
        let mut out = Vec::with_capacity(8 + body.len());
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "READ FULL STATUS parameter data";
        if bytes.len() < 8 {
            return Err(DecodeError::short(WHAT, 8, bytes.len()));
        }
        let add_len = usize::try_from(be32(bytes, 4).unwrap_or(0)).unwrap_or(usize::MAX);
        let end = 8usize.saturating_add(add_len);
        let avail_end = end.min(bytes.len());
        let mut truncated = end > bytes.len();
        let mut entries = Vec::new();
        let mut at = 8usize;
        while at < avail_end {
            if at + 24 > avail_end {
                if at + 24 > end {
                    return Err(DecodeError::new(
                        WHAT,
                        format!("additional length {add_len} ends inside a descriptor header"),
                    ));
                }
                truncated = true;
                break;
            }
            let desc_len = be32(bytes, at + 20).unwrap_or(0);
            let desc_len = usize::try_from(desc_len).unwrap_or(usize::MAX);
            let desc_end = (at + 24).saturating_add(desc_len);
            if desc_end > avail_end {
                if desc_end > end {
                    return Err(DecodeError::new(
                        WHAT,
                        format!(
                            "descriptor at byte {at} announces {desc_len} bytes of TransportID, past the additional length {add_len}"
                        ),
                    ));
                }
                truncated = true;
                break;
            }
            let id_bytes = &bytes[at + 24..desc_end];
            let transport_id = match TransportId::decode(id_bytes) {
                Ok((id, used)) if used == id_bytes.len() => id,
                // Keep what the device sent when it does not parse as one TransportID.
                _ => TransportId::Other {
                    protocol_id: id_bytes.first().map_or(0xf, |b| b & 0x0f),
                    bytes: id_bytes.to_vec(),
                },
            };
            entries.push(FullStatusEntry {
                key: PrKey::new(be64(bytes, at).unwrap_or(0)),
                all_tg_pt: bytes[at + 12] & 0x02 != 0,
                reservation_holder: bytes[at + 12] & 0x01 != 0,
                scope: bytes[at + 13] >> 4,
                type_code: bytes[at + 13] & 0x0f,
                relative_target_port: be16(bytes, at + 18).unwrap_or(0),
                initiator: Initiator::Scsi { transport_id },
            });
            at = desc_end;
        }
        Ok(Self {
            generation: be32(bytes, 0).unwrap_or(0),
            entries,
            truncated,
        })
    }
}

/// Any PR IN answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum PrInData {
    Keys(KeyList),
    Reservation(ReservationInfo),
    Capabilities(Capabilities),
    FullStatus(FullStatus),
}

impl PrInData {
    pub fn action(&self) -> PrInAction {
        match self {
            Self::Keys(_) => PrInAction::ReadKeys,
            Self::Reservation(_) => PrInAction::ReadReservation,
            Self::Capabilities(_) => PrInAction::ReportCapabilities,
            Self::FullStatus(_) => PrInAction::ReadFullStatus,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Keys(k) => k.encode(),
            Self::Reservation(r) => r.encode(),
            Self::Capabilities(c) => c.encode(),
            Self::FullStatus(s) => s.encode(),
        }
    }

    pub fn decode(action: PrInAction, bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(match action {
            PrInAction::ReadKeys => Self::Keys(KeyList::decode(bytes)?),
            PrInAction::ReadReservation => Self::Reservation(ReservationInfo::decode(bytes)?),
            PrInAction::ReportCapabilities => Self::Capabilities(Capabilities::decode(bytes)?),
            PrInAction::ReadFullStatus => Self::FullStatus(FullStatus::decode(bytes)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pr::transport_id::tests::arb_transport_id;
    use proptest::prelude::*;

    fn arb_keys() -> impl Strategy<Value = KeyList> {
        (any::<u32>(), proptest::collection::vec(any::<u64>(), 0..8)).prop_map(|(g, keys)| {
            KeyList {
                generation: g,
                keys: keys.into_iter().map(PrKey::new).collect(),
                truncated: false,
            }
        })
    }

    fn arb_reservation() -> impl Strategy<Value = ReservationInfo> {
        (
            any::<u32>(),
            proptest::option::of((any::<u64>(), 0u8..16, 0u8..16)),
        )
            .prop_map(|(g, r)| ReservationInfo {
                generation: g,
                reservation: r.map(|(k, scope, ty)| Reservation {
                    key: PrKey::new(k),
                    scope,
                    type_code: ty,
                }),
            })
    }

    fn arb_caps() -> impl Strategy<Value = Capabilities> {
        (any::<[bool; 7]>(), 0u8..8, any::<u16>()).prop_map(|(b, allow, mask)| Capabilities {
            replace_lost_reservation: b[0],
            compatible_reservation_handling: b[1],
            specify_initiator_ports: b[2],
            all_target_ports: b[3],
            persist_through_power_loss: b[4],
            type_mask_valid: b[5],
            allow_commands: allow,
            persist_through_power_loss_active: b[6],
            type_mask: mask,
        })
    }

    fn arb_full() -> impl Strategy<Value = FullStatus> {
        let entry = (
            any::<u64>(),
            any::<bool>(),
            any::<bool>(),
            0u8..16,
            0u8..16,
            any::<u16>(),
            arb_transport_id(),
        )
            .prop_map(|(k, atp, holder, scope, ty, rtpi, id)| FullStatusEntry {
                key: PrKey::new(k),
                all_tg_pt: atp,
                reservation_holder: holder,
                scope,
                type_code: ty,
                relative_target_port: rtpi,
                initiator: Initiator::Scsi { transport_id: id },
            });
        (any::<u32>(), proptest::collection::vec(entry, 0..4)).prop_map(|(g, entries)| FullStatus {
            generation: g,
            entries,
            truncated: false,
        })
    }

    #[test]
    fn read_keys_cut_by_the_allocation_length_is_flagged() {
        let list = KeyList {
            generation: 7,
            keys: vec![PrKey::new(1), PrKey::new(2), PrKey::new(3)],
            truncated: false,
        };
        let bytes = list.encode();
        let cut = KeyList::decode(&bytes[..20]).unwrap();
        assert!(cut.truncated);
        assert_eq!(cut.keys, vec![PrKey::new(1)]);
        assert!(KeyList::decode(&bytes[..5]).is_err());
        let mut odd = bytes.clone();
        odd[7] = 9;
        assert!(KeyList::decode(&odd).is_err());
    }

    #[test]
    fn a_reservation_cut_inside_its_key_is_an_error_not_no_reservation() {
        let info = ReservationInfo {
            generation: 1,
            reservation: Some(Reservation {
                key: PrKey::new(0xa1),
                scope: 0,
                type_code: 5,
            }),
        };
        let bytes = info.encode();
        assert_eq!(bytes.len(), 24);
        assert_eq!(bytes[21], 5);
        let e = ReservationInfo::decode(&bytes[..12]).unwrap_err();
        assert!(e.reason.contains("announced"), "{e}");
    }

    #[test]
    fn lio_capabilities_decode() {
        // What LIO answers: CRH SIP_C ATP_C PTPL_C, TMV, ALLOW COMMANDS 001b, all six types.
        let caps = Capabilities::decode(&[0, 8, 0x1d, 0x90, 0xea, 0x01, 0, 0]).unwrap();
        assert!(caps.compatible_reservation_handling && caps.specify_initiator_ports);
        assert!(caps.all_target_ports && caps.persist_through_power_loss);
        assert!(!caps.persist_through_power_loss_active);
        assert_eq!(caps.allow_commands, 1);
        for ty in ReservationType::ALL {
            assert!(caps.supports(ty), "{ty}");
        }
    }

    #[test]
    fn full_status_with_a_descriptor_past_the_end_is_refused() {
        let mut bytes = vec![0u8; 8 + 24];
        bytes[7] = 24;
        bytes[8 + 23] = 200; // TransportID length beyond additional length
        assert!(FullStatus::decode(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn keys_round_trip(k in arb_keys()) {
            prop_assert_eq!(KeyList::decode(&k.encode()).unwrap(), k);
        }

        #[test]
        fn reservation_round_trips(r in arb_reservation()) {
            prop_assert_eq!(ReservationInfo::decode(&r.encode()).unwrap(), r);
        }

        #[test]
        fn capabilities_round_trip(c in arb_caps()) {
            prop_assert_eq!(Capabilities::decode(&c.encode()).unwrap(), c);
        }

        #[test]
        fn full_status_round_trips(s in arb_full()) {
            prop_assert_eq!(FullStatus::decode(&s.encode()).unwrap(), s);
        }

        #[test]
        fn truncated_full_status_is_a_prefix(s in arb_full(), cut in 0usize..200) {
            let bytes = s.encode();
            let cut = cut.min(bytes.len());
            if let Ok(part) = FullStatus::decode(&bytes[..cut]) {
                prop_assert!(part.entries.len() <= s.entries.len());
                prop_assert_eq!(&part.entries[..], &s.entries[..part.entries.len()]);
                prop_assert_eq!(part.truncated, cut < bytes.len());
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            for action in PrInAction::ALL {
                let _ = PrInData::decode(action, &bytes);
            }
        }
    }
}
