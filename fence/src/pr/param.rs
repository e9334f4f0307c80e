//! PERSISTENT RESERVE OUT parameter lists (SPC-4 6.15.3 and 6.15.4).
//!
//! ```text
//! basic (24 bytes, + TransportIDs when SPEC_I_PT):
//!   0..8 RESERVATION KEY | 8..16 SERVICE ACTION RESERVATION KEY | 16..20 obsolete
//!   20: SPEC_I_PT(3) ALL_TG_PT(2) APTPL(0) | 21 reserved | 22..24 obsolete
//!   [24..28 TRANSPORTID PARAMETER DATA LENGTH | TransportIDs]
//! REGISTER AND MOVE:
//!   0..8 RESERVATION KEY | 8..16 SERVICE ACTION RESERVATION KEY | 16 reserved
//!   17: UNREG(1) APTPL(0) | 18..20 RELATIVE TARGET PORT IDENTIFIER
//!   20..24 TRANSPORTID PARAMETER DATA LENGTH | 24.. TransportID
//! ```

use super::transport_id::TransportId;
use super::{DecodeError, be16, be32, be64};
use crate::key::PrKey;

/// The parameter list of every service action except REGISTER AND MOVE.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BasicParams {
    pub reservation_key: PrKey,
    pub service_action_key: PrKey,
    pub spec_i_pt: bool,
    pub all_tg_pt: bool,
    pub aptpl: bool,
    /// Initiator ports to register as well (only with SPEC_I_PT).
    pub transport_ids: Vec<TransportId>,
}

impl BasicParams {
    /// Length without TransportIDs.
    pub const LEN: usize = 24;

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN);
        out.extend_from_slice(&self.reservation_key.to_be_bytes());
        out.extend_from_slice(&self.service_action_key.to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        let mut flags = 0u8;
        if self.spec_i_pt {
            flags |= 0x08;
        }
        if self.all_tg_pt {
            flags |= 0x04;
        }
        if self.aptpl {
            flags |= 0x01;
        }
        out.extend_from_slice(&[flags, 0, 0, 0]);
        if self.spec_i_pt {
            let ids: Vec<u8> = self
                .transport_ids
                .iter()
                .flat_map(TransportId::encode)
                .collect();
            let len = u32::try_from(ids.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&ids);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "PR OUT parameter list";
        if bytes.len() < Self::LEN {
            return Err(DecodeError::short(WHAT, Self::LEN, bytes.len()));
        }
        let flags = bytes[20];
        let spec_i_pt = flags & 0x08 != 0;
        let transport_ids = if spec_i_pt {
            let len = be32(bytes, 24).ok_or_else(|| DecodeError::short(WHAT, 28, bytes.len()))?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            let end = 28usize.saturating_add(len);
            let ids = bytes.get(28..end).ok_or_else(|| {
                DecodeError::new(
                    WHAT,
                    format!(
                        "TRANSPORTID PARAMETER DATA LENGTH {len} runs past the {} bytes given",
                        bytes.len()
                    ),
                )
            })?;
            TransportId::decode_list(ids)?
        } else {
            Vec::new()
        };
        Ok(Self {
            reservation_key: PrKey::new(be64(bytes, 0).unwrap_or(0)),
            service_action_key: PrKey::new(be64(bytes, 8).unwrap_or(0)),
            spec_i_pt,
            all_tg_pt: flags & 0x04 != 0,
            aptpl: flags & 0x01 != 0,
            transport_ids,
        })
    }
}

/// The REGISTER AND MOVE parameter list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterAndMoveParams {
    pub reservation_key: PrKey,
    pub service_action_key: PrKey,
    pub unreg: bool,
    pub aptpl: bool,
    pub relative_target_port: u16,
    pub transport_id: TransportId,
}

impl RegisterAndMoveParams {
    pub fn encode(&self) -> Vec<u8> {
        let id = self.transport_id.encode();
        let mut out = Vec::with_capacity(24 + id.len());
        out.extend_from_slice(&self.reservation_key.to_be_bytes());
        out.extend_from_slice(&self.service_action_key.to_be_bytes());
        let mut flags = 0u8;
        if self.unreg {
            flags |= 0x02;
        }
        if self.aptpl {
            flags |= 0x01;
        }
        out.extend_from_slice(&[0, flags]);
        out.extend_from_slice(&self.relative_target_port.to_be_bytes());
        let len = u32::try_from(id.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&id);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "REGISTER AND MOVE parameter list";
        if bytes.len() < 24 {
            return Err(DecodeError::short(WHAT, 24, bytes.len()));
        }
        let len = usize::try_from(be32(bytes, 20).unwrap_or(0)).unwrap_or(usize::MAX);
        let id_bytes = bytes.get(24..24usize.saturating_add(len)).ok_or_else(|| {
            DecodeError::new(
                WHAT,
                format!(
                    "TRANSPORTID PARAMETER DATA LENGTH {len} runs past the {} bytes given",
                    bytes.len()
                ),
            )
        })?;
        let (transport_id, used) = TransportId::decode(id_bytes)?;
        if used != id_bytes.len() {
            return Err(DecodeError::new(
                WHAT,
                format!("TransportID is {used} bytes but {len} were announced"),
            ));
        }
        Ok(Self {
            reservation_key: PrKey::new(be64(bytes, 0).unwrap_or(0)),
            service_action_key: PrKey::new(be64(bytes, 8).unwrap_or(0)),
            unreg: bytes[17] & 0x02 != 0,
            aptpl: bytes[17] & 0x01 != 0,
            relative_target_port: be16(bytes, 18).unwrap_or(0),
            transport_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pr::transport_id::tests::arb_transport_id;
    use proptest::prelude::*;

    #[test]
    fn register_matches_sg_persist_bytes() {
        // sg_persist -vv --out --register --param-sark=0xa1 --param-aptpl: the parameter
        // list is 24 bytes, SARK at 8..16, APTPL in byte 20.
        let p = BasicParams {
            service_action_key: PrKey::new(0xa1),
            aptpl: true,
            ..Default::default()
        };
        let bytes = p.encode();
        assert_eq!(bytes.len(), 24);
        assert_eq!(bytes[15], 0xa1);
        assert_eq!(bytes[20], 0x01);
    }

    #[test]
    fn truncated_lists_are_refused() {
        assert!(BasicParams::decode(&[0; 23]).is_err());
        let mut spec = vec![0u8; 28];
        spec[20] = 0x08;
        spec[27] = 24; // announces one TransportID that is not there
        let e = BasicParams::decode(&spec).unwrap_err();
        assert!(e.reason.contains("runs past"), "{e}");
        assert!(RegisterAndMoveParams::decode(&[0; 24]).is_err());
    }

    proptest! {
        #[test]
        fn basic_round_trips(rk in any::<u64>(), sark in any::<u64>(), spec in any::<bool>(),
                             atp in any::<bool>(), aptpl in any::<bool>(),
                             ids in proptest::collection::vec(arb_transport_id(), 0..3)) {
            let p = BasicParams {
                reservation_key: PrKey::new(rk),
                service_action_key: PrKey::new(sark),
                spec_i_pt: spec,
                all_tg_pt: atp,
                aptpl,
                transport_ids: if spec { ids } else { Vec::new() },
            };
            prop_assert_eq!(BasicParams::decode(&p.encode()).unwrap(), p);
        }

        #[test]
        fn register_and_move_round_trips(rk in any::<u64>(), sark in any::<u64>(),
                                         unreg in any::<bool>(), aptpl in any::<bool>(),
                                         rtpi in any::<u16>(), id in arb_transport_id()) {
            let p = RegisterAndMoveParams {
                reservation_key: PrKey::new(rk),
                service_action_key: PrKey::new(sark),
                unreg,
                aptpl,
                relative_target_port: rtpi,
                transport_id: id,
            };
            prop_assert_eq!(RegisterAndMoveParams::decode(&p.encode()).unwrap(), p);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = BasicParams::decode(&bytes);
            let _ = RegisterAndMoveParams::decode(&bytes);
        }
    }
}
