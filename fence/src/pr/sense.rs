//! SCSI status bytes and sense data, fixed (70h/71h) and descriptor (72h/73h) format.

use super::{DecodeError, be32, be64};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A SCSI status byte (SAM-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ScsiStatus(pub u8);

impl ScsiStatus {
    pub const GOOD: Self = Self(0x00);
    pub const CHECK_CONDITION: Self = Self(0x02);
    pub const CONDITION_MET: Self = Self(0x04);
    pub const BUSY: Self = Self(0x08);
    pub const RESERVATION_CONFLICT: Self = Self(0x18);
    pub const TASK_SET_FULL: Self = Self(0x28);
    pub const ACA_ACTIVE: Self = Self(0x30);
    pub const TASK_ABORTED: Self = Self(0x40);

    pub fn name(self) -> &'static str {
        match self {
            Self::GOOD => "GOOD",
            Self::CHECK_CONDITION => "CHECK CONDITION",
            Self::CONDITION_MET => "CONDITION MET",
            Self::BUSY => "BUSY",
            Self::RESERVATION_CONFLICT => "RESERVATION CONFLICT",
            Self::TASK_SET_FULL => "TASK SET FULL",
            Self::ACA_ACTIVE => "ACA ACTIVE",
            Self::TASK_ABORTED => "TASK ABORTED",
            _ => "reserved status",
        }
    }
}

impl fmt::Display for ScsiStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:02x})", self.name(), self.0)
    }
}

/// The 4-bit SENSE KEY.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SenseKey {
    NoSense,
    RecoveredError,
    NotReady,
    MediumError,
    HardwareError,
    IllegalRequest,
    UnitAttention,
    DataProtect,
    BlankCheck,
    VendorSpecific,
    CopyAborted,
    AbortedCommand,
    Reserved,
    VolumeOverflow,
    Miscompare,
    Completed,
}

impl SenseKey {
    pub const fn from_code(code: u8) -> Self {
        match code & 0x0f {
            0x0 => Self::NoSense,
            0x1 => Self::RecoveredError,
            0x2 => Self::NotReady,
            0x3 => Self::MediumError,
            0x4 => Self::HardwareError,
            0x5 => Self::IllegalRequest,
            0x6 => Self::UnitAttention,
            0x7 => Self::DataProtect,
            0x8 => Self::BlankCheck,
            0x9 => Self::VendorSpecific,
            0xa => Self::CopyAborted,
            0xb => Self::AbortedCommand,
            0xc => Self::Reserved,
            0xd => Self::VolumeOverflow,
            0xe => Self::Miscompare,
            _ => Self::Completed,
        }
    }

    pub const fn code(self) -> u8 {
        match self {
            Self::NoSense => 0x0,
            Self::RecoveredError => 0x1,
            Self::NotReady => 0x2,
            Self::MediumError => 0x3,
            Self::HardwareError => 0x4,
            Self::IllegalRequest => 0x5,
            Self::UnitAttention => 0x6,
            Self::DataProtect => 0x7,
            Self::BlankCheck => 0x8,
            Self::VendorSpecific => 0x9,
            Self::CopyAborted => 0xa,
            Self::AbortedCommand => 0xb,
            Self::Reserved => 0xc,
            Self::VolumeOverflow => 0xd,
            Self::Miscompare => 0xe,
            Self::Completed => 0xf,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::NoSense => "No Sense",
            Self::RecoveredError => "Recovered Error",
            Self::NotReady => "Not Ready",
            Self::MediumError => "Medium Error",
            Self::HardwareError => "Hardware Error",
            Self::IllegalRequest => "Illegal Request",
            Self::UnitAttention => "Unit Attention",
            Self::DataProtect => "Data Protect",
            Self::BlankCheck => "Blank Check",
            Self::VendorSpecific => "Vendor Specific",
            Self::CopyAborted => "Copy Aborted",
            Self::AbortedCommand => "Aborted Command",
            Self::Reserved => "Reserved",
            Self::VolumeOverflow => "Volume Overflow",
            Self::Miscompare => "Miscompare",
            Self::Completed => "Completed",
        }
    }
}

/// Where in the CDB or parameter list an ILLEGAL REQUEST points (sense-key specific bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FieldPointer {
    /// True: the error is in the CDB; false: in the parameter data.
    pub in_cdb: bool,
    pub byte: u16,
    /// The bit within `byte`, when the device said which.
    pub bit: Option<u8>,
}

impl FieldPointer {
    fn decode(sks: [u8; 3]) -> Option<Self> {
        if sks[0] & 0x80 == 0 {
            return None;
        }
        Some(Self {
            in_cdb: sks[0] & 0x40 != 0,
            byte: u16::from_be_bytes([sks[1], sks[2]]),
            bit: (sks[0] & 0x08 != 0).then_some(sks[0] & 0x07),
        })
    }

    fn encode(self) -> [u8; 3] {
        let mut b0 = 0x80;
        if self.in_cdb {
            b0 |= 0x40;
        }
        if let Some(bit) = self.bit {
            b0 |= 0x08 | (bit & 0x07);
        }
        let byte = self.byte.to_be_bytes();
        [b0, byte[0], byte[1]]
    }
}

/// Decoded sense data.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Sense {
    /// Descriptor format (72h/73h) rather than fixed (70h/71h).
    pub descriptor_format: bool,
    /// A deferred error (71h/73h) rather than the current command's.
    pub deferred: bool,
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field, when valid.
    pub information: Option<u64>,
    /// The field pointer of an ILLEGAL REQUEST, when the device gave one.
    pub field_pointer: Option<FieldPointer>,
}

impl Sense {
    /// Current, fixed-format sense with just key, ASC and ASCQ.
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Self {
        Self {
            descriptor_format: false,
            deferred: false,
            key,
            asc,
            ascq,
            information: None,
            field_pointer: None,
        }
    }

    /// Decodes sense data as returned in the sense buffer.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "sense data";
        let Some(&first) = bytes.first() else {
            return Err(DecodeError::new(WHAT, "empty sense buffer"));
        };
        match first & 0x7f {
            code @ (0x70 | 0x71) => {
                if bytes.len() < 8 {
                    return Err(DecodeError::short(WHAT, 8, bytes.len()));
                }
                // The additional length says how much follows byte 7; trust the shorter of it
                // and what arrived.
                let end = (8 + usize::from(bytes[7])).min(bytes.len());
                let body = &bytes[..end];
                let sks = match body.get(15..18) {
                    Some(s) => [s[0], s[1], s[2]],
                    None => [0; 3],
                };
                let key = SenseKey::from_code(body[2]);
                Ok(Self {
                    descriptor_format: false,
                    deferred: code == 0x71,
                    key,
                    asc: body.get(12).copied().unwrap_or(0),
                    ascq: body.get(13).copied().unwrap_or(0),
                    information: (first & 0x80 != 0)
                        .then(|| be32(body, 3).map(u64::from))
                        .flatten(),
                    field_pointer: if key == SenseKey::IllegalRequest {
                        FieldPointer::decode(sks)
                    } else {
                        None
                    },
                })
            }
            code @ (0x72 | 0x73) => {
                if bytes.len() < 8 {
                    return Err(DecodeError::short(WHAT, 8, bytes.len()));
                }
                let key = SenseKey::from_code(bytes[1]);
                let mut sense = Self {
                    descriptor_format: true,
                    deferred: code == 0x73,
                    key,
                    asc: bytes[2],
                    ascq: bytes[3],
                    information: None,
                    field_pointer: None,
                };
                let end = (8 + usize::from(bytes[7])).min(bytes.len());
                let mut at = 8;
                while at + 2 <= end {
                    let kind = bytes[at];
                    let len = usize::from(bytes[at + 1]);
                    let Some(desc) = bytes.get(at + 2..(at + 2 + len).min(end)) else {
                        break;
                    };
                    match kind {
                        0x00 if desc.len() >= 10 && desc[0] & 0x80 != 0 => {
                            sense.information = be64(desc, 2);
                        }
                        0x02 if desc.len() >= 5 && key == SenseKey::IllegalRequest => {
                            sense.field_pointer = FieldPointer::decode([desc[2], desc[3], desc[4]]);
                        }
                        _ => {}
                    }
                    at += 2 + len;
                }
                Ok(sense)
            }
            other => Err(DecodeError::new(
                WHAT,
                format!(
                    "response code 0x{other:02x} is neither fixed (70h/71h) nor descriptor (72h/73h) format"
                ),
            )),
        }
    }

    /// Encodes in the format recorded in `descriptor_format`.
    pub fn encode(&self) -> Vec<u8> {
        if self.descriptor_format {
            let mut out = vec![
                if self.deferred { 0x73 } else { 0x72 },
                self.key.code(),
                self.asc,
                self.ascq,
                0,
                0,
                0,
                0,
            ];
            if let Some(info) = self.information {
                out.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
                out.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(fp) = self.field_pointer {
                let sks = fp.encode();
                out.extend_from_slice(&[0x02, 0x06, 0, 0, sks[0], sks[1], sks[2], 0]);
            }
            out[7] = u8::try_from(out.len() - 8).unwrap_or(u8::MAX);
            out
        } else {
            let mut out = vec![0u8; 18];
            out[0] = if self.deferred { 0x71 } else { 0x70 };
            out[2] = self.key.code();
            if let Some(info) = self.information.and_then(|i| u32::try_from(i).ok()) {
                out[0] |= 0x80;
                out[3..7].copy_from_slice(&info.to_be_bytes());
            }
            out[7] = 10;
            out[12] = self.asc;
            out[13] = self.ascq;
            if let Some(fp) = self.field_pointer {
                out[15..18].copy_from_slice(&fp.encode());
            }
            out
        }
    }

    /// The ASC/ASCQ in words.
    pub fn description(&self) -> String {
        asc_description(self.asc, self.ascq)
    }

    /// INVALID COMMAND OPERATION CODE: the device does not implement the command.
    pub fn is_invalid_opcode(&self) -> bool {
        self.key == SenseKey::IllegalRequest && self.asc == 0x20
    }

    /// Whether the device says the service action or a field is unsupported (ILLEGAL
    /// REQUEST, any ASC).
    pub fn is_illegal_request(&self) -> bool {
        self.key == SenseKey::IllegalRequest
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} (asc 0x{:02x}, ascq 0x{:02x})",
            self.key.name(),
            self.description(),
            self.asc,
            self.ascq
        )?;
        if let Some(fp) = self.field_pointer {
            write!(
                f,
                ", at {} byte {}",
                if fp.in_cdb { "CDB" } else { "parameter list" },
                fp.byte
            )?;
            if let Some(bit) = fp.bit {
                write!(f, " bit {bit}")?;
            }
        }
        if self.deferred {
            f.write_str(" [deferred]")?;
        }
        Ok(())
    }
}

/// Words for the additional sense codes persistent reservations run into.
pub fn asc_description(asc: u8, ascq: u8) -> String {
    let text = match (asc, ascq) {
        (0x00, 0x00) => "No additional sense information",
        (0x04, 0x00) => "Logical unit not ready, cause not reportable",
        (0x04, 0x01) => "Logical unit is in process of becoming ready",
        (0x04, 0x02) => "Logical unit not ready, initializing command required",
        (0x04, 0x03) => "Logical unit not ready, manual intervention required",
        (0x04, 0x0a) => "Logical unit not accessible, asymmetric access state transition",
        (0x04, 0x0b) => "Logical unit not accessible, target port in standby state",
        (0x04, 0x0c) => "Logical unit not accessible, target port in unavailable state",
        (0x08, 0x00) => "Logical unit communication failure",
        (0x1a, 0x00) => "Parameter list length error",
        (0x20, 0x00) => "Invalid command operation code",
        (0x24, 0x00) => "Invalid field in cdb",
        (0x25, 0x00) => "Logical unit not supported",
        (0x26, 0x00) => "Invalid field in parameter list",
        (0x26, 0x04) => "Invalid release of persistent reservation",
        (0x27, 0x00) => "Write protected",
        (0x28, 0x00) => "Not ready to ready change, medium may have changed",
        (0x29, 0x00) => "Power on, reset, or bus device reset occurred",
        (0x29, 0x01) => "Power on occurred",
        (0x29, 0x02) => "SCSI bus reset occurred",
        (0x29, 0x03) => "Bus device reset function occurred",
        (0x29, 0x04) => "Device internal reset",
        (0x29, 0x07) => "I_T nexus loss occurred",
        (0x2a, 0x01) => "Mode parameters changed",
        (0x2a, 0x03) => "Reservations preempted",
        (0x2a, 0x04) => "Reservations released",
        (0x2a, 0x05) => "Registrations preempted",
        (0x2a, 0x06) => "Asymmetric access state changed",
        (0x2a, 0x09) => "Capacity data has changed",
        (0x2a, 0x14) => "SA creation capabilities data has changed",
        (0x2c, 0x00) => "Command sequence error",
        (0x2c, 0x09) => "Previous reservation conflict status",
        (0x3f, 0x0e) => "Reported luns data has changed",
        (0x55, 0x04) => "Insufficient registration resources",
        _ => return format!("asc 0x{asc:02x}, ascq 0x{ascq:02x}"),
    };
    text.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_sense() -> impl Strategy<Value = Sense> {
        (
            any::<bool>(),
            any::<bool>(),
            0u8..16,
            any::<u8>(),
            any::<u8>(),
            proptest::option::of(any::<u32>()),
            proptest::option::of((any::<bool>(), any::<u16>(), proptest::option::of(0u8..8))),
        )
            .prop_map(|(descriptor_format, deferred, key, asc, ascq, info, fp)| {
                let key = SenseKey::from_code(key);
                Sense {
                    descriptor_format,
                    deferred,
                    key,
                    asc,
                    ascq,
                    information: info.map(u64::from),
                    field_pointer: if key == SenseKey::IllegalRequest {
                        fp.map(|(in_cdb, byte, bit)| FieldPointer { in_cdb, byte, bit })
                    } else {
                        None
                    },
                }
            })
    }

    #[test]
    fn decodes_lio_reservation_sense() {
        // Fixed format, ILLEGAL REQUEST, INVALID FIELD IN PARAMETER LIST, pointing at
        // parameter byte 20 bit 3 (SPEC_I_PT).
        let bytes = [
            0x70, 0, 0x05, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0x26, 0x00, 0, 0x88, 0, 20,
        ];
        let sense = Sense::decode(&bytes).unwrap();
        assert_eq!(sense.key, SenseKey::IllegalRequest);
        assert_eq!((sense.asc, sense.ascq), (0x26, 0));
        assert_eq!(
            sense.field_pointer,
            Some(FieldPointer {
                in_cdb: false,
                byte: 20,
                bit: Some(0)
            })
        );
        let text = sense.to_string();
        assert!(text.contains("Invalid field in parameter list"), "{text}");
        assert!(text.contains("parameter list byte 20"), "{text}");
    }

    #[test]
    fn unit_attention_in_descriptor_format() {
        let bytes = [0x72, 0x06, 0x2a, 0x05, 0, 0, 0, 0];
        let sense = Sense::decode(&bytes).unwrap();
        assert_eq!(sense.key, SenseKey::UnitAttention);
        assert_eq!(sense.description(), "Registrations preempted");
    }

    #[test]
    fn nonsense_sense_is_an_error_not_a_panic() {
        assert!(Sense::decode(&[]).is_err());
        let e = Sense::decode(&[0x00, 1, 2, 3, 4, 5, 6, 7]).unwrap_err();
        assert!(e.reason.contains("response code"), "{e}");
        assert!(Sense::decode(&[0x70, 0, 5]).is_err());
        // A short but well-formed fixed header decodes with ASC/ASCQ zero.
        let s = Sense::decode(&[0x70, 0, 6, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!((s.key, s.asc), (SenseKey::UnitAttention, 0));
    }

    proptest! {
        #[test]
        fn round_trips(sense in arb_sense()) {
            prop_assert_eq!(Sense::decode(&sense.encode()).unwrap(), sense);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(s) = Sense::decode(&bytes) {
                let _ = s.to_string();
            }
        }
    }
}
