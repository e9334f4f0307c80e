//! NVMe reservations (NVM Command Set): Reservation Register (0Dh), Report (0Eh), Acquire
//! (11h) and Release (15h) — command dword 10/11 and data buffers — plus the Reservation
//! Status data structure, the status codes, and the Identify fields that say whether a
//! controller implements reservations at all.
//!
//! Keys and counters in NVMe data structures are little-endian, unlike SCSI.
//!
//! ```text
//! Register CDW10: RREGA(2:0) IEKEY(3) CPTPL(31:30)      data: CRKEY(8) NRKEY(8)
//! Acquire  CDW10: RACQA(2:0) IEKEY(3) RTYPE(15:8)       data: CRKEY(8) PRKEY(8)
//! Release  CDW10: RRELA(2:0) IEKEY(3) RTYPE(15:8)       data: CRKEY(8)
//! Report   CDW10: NUMD (0-based dwords)  CDW11: EDS(0)
//! Status   : GEN(4) RTYPE(1) REGCTL(2) rsvd(2) PTPLS(1) rsvd(14) | 24-byte entries
//!            (extended: 64-byte header and entries with a 128-bit host id)
//! ```

use super::{DecodeError, hex, le16, le32, le64};
use crate::key::PrKey;
use serde::{Deserialize, Serialize};
use std::fmt;

pub const OPC_RESERVATION_REGISTER: u8 = 0x0d;
pub const OPC_RESERVATION_REPORT: u8 = 0x0e;
pub const OPC_RESERVATION_ACQUIRE: u8 = 0x11;
pub const OPC_RESERVATION_RELEASE: u8 = 0x15;
/// Admin Identify.
pub const OPC_IDENTIFY: u8 = 0x06;

/// Reservation Register action (RREGA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegisterAction {
    Register,
    Unregister,
    Replace,
}

/// Change Persist Through Power Loss State (CPTPL).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChangePtpl {
    NoChange,
    Clear,
    Set,
}

/// Reservation Acquire action (RACQA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcquireAction {
    Acquire,
    Preempt,
    PreemptAndAbort,
}

/// Reservation Release action (RRELA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseAction {
    Release,
    Clear,
}

/// One NVMe reservation command: opcode, command dwords 10 and 11, and the data buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NvmeReservation {
    Register {
        action: RegisterAction,
        ignore_existing_key: bool,
        change_ptpl: ChangePtpl,
        current_key: PrKey,
        new_key: PrKey,
    },
    Acquire {
        action: AcquireAction,
        ignore_existing_key: bool,
        /// NVMe RTYPE (1-6).
        rtype: u8,
        current_key: PrKey,
        preempt_key: PrKey,
    },
    Release {
        action: ReleaseAction,
        ignore_existing_key: bool,
        rtype: u8,
        current_key: PrKey,
    },
    Report {
        extended: bool,
        /// Size of the host buffer in bytes (a multiple of 4).
        buffer_len: u32,
    },
}

/// What goes into a passthrough command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmeCommandWords {
    pub opcode: u8,
    pub cdw10: u32,
    pub cdw11: u32,
    /// Host-to-controller data (empty for Report, which reads `buffer_len` bytes).
    pub data_out: Vec<u8>,
    /// Bytes the controller returns.
    pub data_in_len: u32,
}

impl NvmeReservation {
    /// Encodes opcode, dwords and data.
    pub fn encode(&self) -> NvmeCommandWords {
        match self {
            Self::Register {
                action,
                ignore_existing_key,
                change_ptpl,
                current_key,
                new_key,
            } => {
                let mut cdw10 = match action {
                    RegisterAction::Register => 0,
                    RegisterAction::Unregister => 1,
                    RegisterAction::Replace => 2,
                };
                if *ignore_existing_key {
                    cdw10 |= 1 << 3;
                }
                cdw10 |= match change_ptpl {
                    ChangePtpl::NoChange => 0,
                    ChangePtpl::Clear => 2 << 30,
                    ChangePtpl::Set => 3 << 30,
                };
                let mut data = current_key.get().to_le_bytes().to_vec();
                data.extend_from_slice(&new_key.get().to_le_bytes());
                NvmeCommandWords {
                    opcode: OPC_RESERVATION_REGISTER,
                    cdw10,
                    cdw11: 0,
                    data_out: data,
                    data_in_len: 0,
                }
            }
            Self::Acquire {
                action,
                ignore_existing_key,
                rtype,
                current_key,
                preempt_key,
            } => {
                let mut cdw10 = match action {
                    AcquireAction::Acquire => 0,
                    AcquireAction::Preempt => 1,
                    AcquireAction::PreemptAndAbort => 2,
                };
                if *ignore_existing_key {
                    cdw10 |= 1 << 3;
                }
                cdw10 |= u32::from(*rtype) << 8;
                let mut data = current_key.get().to_le_bytes().to_vec();
                data.extend_from_slice(&preempt_key.get().to_le_bytes());
                NvmeCommandWords {
                    opcode: OPC_RESERVATION_ACQUIRE,
                    cdw10,
                    cdw11: 0,
                    data_out: data,
                    data_in_len: 0,
                }
            }
            Self::Release {
                action,
                ignore_existing_key,
                rtype,
                current_key,
            } => {
                let mut cdw10 = match action {
                    ReleaseAction::Release => 0,
                    ReleaseAction::Clear => 1,
                };
                if *ignore_existing_key {
                    cdw10 |= 1 << 3;
                }
                cdw10 |= u32::from(*rtype) << 8;
                NvmeCommandWords {
                    opcode: OPC_RESERVATION_RELEASE,
                    cdw10,
                    cdw11: 0,
                    data_out: current_key.get().to_le_bytes().to_vec(),
                    data_in_len: 0,
                }
            }
            Self::Report {
                extended,
                buffer_len,
            } => NvmeCommandWords {
                opcode: OPC_RESERVATION_REPORT,
                cdw10: (buffer_len / 4).saturating_sub(1),
                cdw11: u32::from(*extended),
                data_out: Vec::new(),
                data_in_len: buffer_len / 4 * 4,
            },
        }
    }

    /// Decodes a command as a controller receives it.
    pub fn decode(words: &NvmeCommandWords) -> Result<Self, DecodeError> {
        const WHAT: &str = "NVMe reservation command";
        let key_at = |at: usize| {
            le64(&words.data_out, at)
                .map(PrKey::new)
                .ok_or_else(|| DecodeError::short(WHAT, at + 8, words.data_out.len()))
        };
        let iekey = words.cdw10 & (1 << 3) != 0;
        let rtype = u8::try_from((words.cdw10 >> 8) & 0xff).unwrap_or(0);
        let low3 = words.cdw10 & 0x7;
        let bad = |what: &str| DecodeError::new(WHAT, format!("{what} {low3} is reserved"));
        match words.opcode {
            OPC_RESERVATION_REGISTER => Ok(Self::Register {
                action: match low3 {
                    0 => RegisterAction::Register,
                    1 => RegisterAction::Unregister,
                    2 => RegisterAction::Replace,
                    _ => return Err(bad("RREGA")),
                },
                ignore_existing_key: iekey,
                change_ptpl: match words.cdw10 >> 30 {
                    0 => ChangePtpl::NoChange,
                    2 => ChangePtpl::Clear,
                    3 => ChangePtpl::Set,
                    _ => {
                        return Err(DecodeError::new(WHAT, "CPTPL 01b is reserved".to_owned()));
                    }
                },
                current_key: key_at(0)?,
                new_key: key_at(8)?,
            }),
            OPC_RESERVATION_ACQUIRE => Ok(Self::Acquire {
                action: match low3 {
                    0 => AcquireAction::Acquire,
                    1 => AcquireAction::Preempt,
                    2 => AcquireAction::PreemptAndAbort,
                    _ => return Err(bad("RACQA")),
                },
                ignore_existing_key: iekey,
                rtype,
                current_key: key_at(0)?,
                preempt_key: key_at(8)?,
            }),
            OPC_RESERVATION_RELEASE => Ok(Self::Release {
                action: match low3 {
                    0 => ReleaseAction::Release,
                    1 => ReleaseAction::Clear,
                    _ => return Err(bad("RRELA")),
                },
                ignore_existing_key: iekey,
                rtype,
                current_key: key_at(0)?,
            }),
            OPC_RESERVATION_REPORT => Ok(Self::Report {
                extended: words.cdw11 & 1 != 0,
                buffer_len: words.cdw10.saturating_add(1).saturating_mul(4),
            }),
            other => Err(DecodeError::new(
                WHAT,
                format!("opcode 0x{other:02x} is not a reservation command"),
            )),
        }
    }
}

/// One registrant in a Reservation Status data structure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisteredController {
    pub controller_id: u16,
    /// RCSTS bit 0: this controller's host holds the reservation.
    pub holds_reservation: bool,
    /// 8 bytes (normal report) or 16 bytes (extended report).
    pub host_id: Vec<u8>,
    pub key: PrKey,
}

/// The Reservation Status data structure returned by Reservation Report.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReservationStatus {
    pub generation: u32,
    /// NVMe RTYPE; 0 = no reservation.
    pub rtype: u8,
    /// PTPLS: persist through power loss state.
    pub ptpl: bool,
    pub registrants: Vec<RegisteredController>,
    /// REGCTL announced more registrants than the buffer held.
    pub truncated: bool,
}

impl ReservationStatus {
    const HEADER: usize = 24;
    const ENTRY: usize = 24;
    const EXT_HEADER: usize = 64;
    const EXT_ENTRY: usize = 64;

    /// Encodes in the normal (`extended = false`, 8-byte host ids) or extended format.
    pub fn encode(&self, extended: bool) -> Vec<u8> {
        let (header, entry) = if extended {
            (Self::EXT_HEADER, Self::EXT_ENTRY)
        } else {
            (Self::HEADER, Self::ENTRY)
        };
        let mut out = vec![0u8; header];
        out[0..4].copy_from_slice(&self.generation.to_le_bytes());
        out[4] = self.rtype;
        let count = u16::try_from(self.registrants.len()).unwrap_or(u16::MAX);
        out[5..7].copy_from_slice(&count.to_le_bytes());
        out[9] = u8::from(self.ptpl);
        for r in &self.registrants {
            let mut e = vec![0u8; entry];
            e[0..2].copy_from_slice(&r.controller_id.to_le_bytes());
            e[2] = u8::from(r.holds_reservation);
            let mut host = r.host_id.clone();
            if extended {
                host.resize(16, 0);
                e[8..16].copy_from_slice(&r.key.get().to_le_bytes());
                e[16..32].copy_from_slice(&host);
            } else {
                host.resize(8, 0);
                e[8..16].copy_from_slice(&host);
                e[16..24].copy_from_slice(&r.key.get().to_le_bytes());
            }
            out.extend_from_slice(&e);
        }
        out
    }

    pub fn decode(bytes: &[u8], extended: bool) -> Result<Self, DecodeError> {
        const WHAT: &str = "NVMe Reservation Status data";
        let (header, entry) = if extended {
            (Self::EXT_HEADER, Self::EXT_ENTRY)
        } else {
            (Self::HEADER, Self::ENTRY)
        };
        if bytes.len() < header {
            return Err(DecodeError::short(WHAT, header, bytes.len()));
        }
        let count = usize::from(le16(bytes, 5).unwrap_or(0));
        let available = (bytes.len() - header) / entry;
        let mut registrants = Vec::new();
        for i in 0..count.min(available) {
            let e = &bytes[header + i * entry..header + (i + 1) * entry];
            let (key, host_id) = if extended {
                (le64(e, 8).unwrap_or(0), e[16..32].to_vec())
            } else {
                (le64(e, 16).unwrap_or(0), e[8..16].to_vec())
            };
            registrants.push(RegisteredController {
                controller_id: le16(e, 0).unwrap_or(0),
                holds_reservation: e[2] & 1 != 0,
                host_id,
                key: PrKey::new(key),
            });
        }
        Ok(Self {
            generation: le32(bytes, 0).unwrap_or(0),
            rtype: bytes[4],
            ptpl: bytes[9] & 1 != 0,
            registrants,
            truncated: count > available,
        })
    }

    /// The registrant holding the reservation, if any.
    pub fn holder(&self) -> Option<&RegisteredController> {
        self.registrants.iter().find(|r| r.holds_reservation)
    }
}

/// An NVMe completion status: Status Code Type, Status Code, and the DNR/More bits, as the
/// Linux passthrough ioctl returns it (a positive value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NvmeStatus(pub u16);

impl NvmeStatus {
    pub const SUCCESS: Self = Self(0);
    pub const INVALID_OPCODE: Self = Self(0x01);
    pub const INVALID_FIELD: Self = Self(0x02);
    pub const NAMESPACE_NOT_READY: Self = Self(0x82);
    pub const RESERVATION_CONFLICT: Self = Self(0x83);

    /// Status Code Type (bits 10:8).
    pub const fn sct(self) -> u8 {
        self.0.to_be_bytes()[0] & 0x7
    }

    /// Status Code (bits 7:0).
    pub const fn sc(self) -> u8 {
        self.0.to_be_bytes()[1]
    }

    /// Do Not Retry.
    pub const fn dnr(self) -> bool {
        self.0 & 0x4000 != 0
    }

    const fn code(self) -> (u8, u8) {
        (self.sct(), self.sc())
    }

    pub const fn is_success(self) -> bool {
        matches!(self.code(), (0, 0))
    }

    pub const fn is_reservation_conflict(self) -> bool {
        matches!(self.code(), (0, 0x83))
    }

    pub const fn is_invalid_opcode(self) -> bool {
        matches!(self.code(), (0, 0x01))
    }

    pub const fn is_invalid_field(self) -> bool {
        matches!(self.code(), (0, 0x02))
    }

    pub fn name(self) -> &'static str {
        match self.code() {
            (0, 0x00) => "Successful Completion",
            (0, 0x01) => "Invalid Command Opcode",
            (0, 0x02) => "Invalid Field in Command",
            (0, 0x04) => "Data Transfer Error",
            (0, 0x06) => "Internal Error",
            (0, 0x07) => "Command Abort Requested",
            (0, 0x0b) => "Invalid Namespace or Format",
            (0, 0x80) => "LBA Out of Range",
            (0, 0x82) => "Namespace Not Ready",
            (0, 0x83) => "Reservation Conflict",
            (3, 0x00) => "Internal Path Error",
            (3, 0x01) => "Asymmetric Access Persistent Loss",
            (3, 0x02) => "Asymmetric Access Inaccessible",
            (3, 0x03) => "Asymmetric Access Transition",
            _ => "other status",
        }
    }
}

impl fmt::Display for NvmeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (SCT 0x{:x}, SC 0x{:02x}{})",
            self.name(),
            self.sct(),
            self.sc(),
            if self.dnr() { ", DNR" } else { "" }
        )
    }
}

/// Identify Controller: ONCS bit 5 says whether the controller supports reservations.
pub fn controller_supports_reservations(identify_controller: &[u8]) -> Result<bool, DecodeError> {
    let oncs = le16(identify_controller, 520).ok_or_else(|| {
        DecodeError::short("Identify Controller data", 522, identify_controller.len())
    })?;
    Ok(oncs & (1 << 5) != 0)
}

/// Identify Namespace RESCAP (byte 31): which reservation types and PTPL the namespace
/// supports. Bit 0 PTPL, bits 1-6 the six types in NVMe order, bit 7 IEKEY for Acquire and
/// Release (obsolete in NVMe 2.0).
pub fn namespace_reservation_capabilities(identify_namespace: &[u8]) -> Result<u8, DecodeError> {
    identify_namespace
        .get(31)
        .copied()
        .ok_or_else(|| DecodeError::short("Identify Namespace data", 32, identify_namespace.len()))
}

/// Formats a host identifier.
pub fn host_id_hex(host_id: &[u8]) -> String {
    format!("0x{}", hex(host_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_reservation_cmd() -> impl Strategy<Value = NvmeReservation> {
        let key = any::<u64>().prop_map(PrKey::new);
        prop_oneof![
            (
                0usize..3,
                any::<bool>(),
                0usize..3,
                key.clone(),
                key.clone()
            )
                .prop_map(|(a, ie, p, c, n)| NvmeReservation::Register {
                    action: [
                        RegisterAction::Register,
                        RegisterAction::Unregister,
                        RegisterAction::Replace
                    ][a],
                    ignore_existing_key: ie,
                    change_ptpl: [ChangePtpl::NoChange, ChangePtpl::Clear, ChangePtpl::Set][p],
                    current_key: c,
                    new_key: n,
                }),
            (
                0usize..3,
                any::<bool>(),
                any::<u8>(),
                key.clone(),
                key.clone()
            )
                .prop_map(|(a, ie, t, c, p)| NvmeReservation::Acquire {
                    action: [
                        AcquireAction::Acquire,
                        AcquireAction::Preempt,
                        AcquireAction::PreemptAndAbort
                    ][a],
                    ignore_existing_key: ie,
                    rtype: t,
                    current_key: c,
                    preempt_key: p,
                }),
            (any::<bool>(), any::<bool>(), any::<u8>(), key).prop_map(|(clear, ie, t, c)| {
                NvmeReservation::Release {
                    action: if clear {
                        ReleaseAction::Clear
                    } else {
                        ReleaseAction::Release
                    },
                    ignore_existing_key: ie,
                    rtype: t,
                    current_key: c,
                }
            }),
            (any::<bool>(), 1u32..4096).prop_map(|(e, d)| NvmeReservation::Report {
                extended: e,
                buffer_len: d * 4
            }),
        ]
    }

    fn arb_status(extended: bool) -> impl Strategy<Value = ReservationStatus> {
        let host_len = if extended { 16 } else { 8 };
        let reg = (
            any::<u16>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), host_len),
            any::<u64>(),
        )
            .prop_map(|(c, h, host, k)| RegisteredController {
                controller_id: c,
                holds_reservation: h,
                host_id: host,
                key: PrKey::new(k),
            });
        (
            any::<u32>(),
            0u8..7,
            any::<bool>(),
            proptest::collection::vec(reg, 0..5),
        )
            .prop_map(|(g, t, p, r)| ReservationStatus {
                generation: g,
                rtype: t,
                ptpl: p,
                registrants: r,
                truncated: false,
            })
    }

    #[test]
    fn linux_register_encoding() {
        // nvme_pr_register(old = 0, new = 0xa1, ignore) with PTPL set: RREGA 0, IEKEY,
        // CPTPL 11b.
        let w = NvmeReservation::Register {
            action: RegisterAction::Register,
            ignore_existing_key: true,
            change_ptpl: ChangePtpl::Set,
            current_key: PrKey::ZERO,
            new_key: PrKey::new(0xa1),
        }
        .encode();
        assert_eq!(w.opcode, 0x0d);
        assert_eq!(w.cdw10, 0xc000_0008);
        assert_eq!(w.data_out[8], 0xa1, "keys are little-endian");
    }

    #[test]
    fn statuses_classify() {
        assert!(NvmeStatus(0x4083).is_reservation_conflict());
        assert!(NvmeStatus(0x4001).is_invalid_opcode());
        assert!(
            NvmeStatus::INVALID_OPCODE
                .to_string()
                .contains("Invalid Command Opcode")
        );
        let mut id = vec![0u8; 4096];
        assert!(!controller_supports_reservations(&id).unwrap());
        id[520] = 0x20;
        assert!(controller_supports_reservations(&id).unwrap());
        assert!(controller_supports_reservations(&id[..100]).is_err());
    }

    proptest! {
        #[test]
        fn commands_round_trip(cmd in arb_reservation_cmd()) {
            prop_assert_eq!(NvmeReservation::decode(&cmd.encode()).unwrap(), cmd);
        }

        #[test]
        fn status_round_trips(s in arb_status(false)) {
            prop_assert_eq!(ReservationStatus::decode(&s.encode(false), false).unwrap(), s);
        }

        #[test]
        fn extended_status_round_trips(s in arb_status(true)) {
            prop_assert_eq!(ReservationStatus::decode(&s.encode(true), true).unwrap(), s);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200),
                                                 op in any::<u8>(), cdw10 in any::<u32>(), cdw11 in any::<u32>()) {
            let _ = ReservationStatus::decode(&bytes, false);
            let _ = ReservationStatus::decode(&bytes, true);
            let words = NvmeCommandWords { opcode: op, cdw10, cdw11, data_out: bytes.clone(), data_in_len: 0 };
            let _ = NvmeReservation::decode(&words);
            let _ = controller_supports_reservations(&bytes);
            let _ = NvmeStatus(u16::from(op) << 8 | u16::from(op)).to_string();
        }
    }
}
