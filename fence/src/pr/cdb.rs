//! Command descriptor blocks: PERSISTENT RESERVE IN (5Eh), PERSISTENT RESERVE OUT (5Fh) and
//! INQUIRY (12h).
//!
//! ```text
//! PR IN  : 5E | SA | 0 0 0 0 0 | ALLOCATION LENGTH (2) | CONTROL
//! PR OUT : 5F | SA | SCOPE<<4 | TYPE | 0 0 | PARAMETER LIST LENGTH (4) | CONTROL
//! INQUIRY: 12 | EVPD | PAGE | ALLOCATION LENGTH (2) | CONTROL
//! ```

use super::{DecodeError, be16, be32};

/// PERSISTENT RESERVE IN operation code.
pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
/// PERSISTENT RESERVE OUT operation code.
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
/// INQUIRY operation code.
pub const INQUIRY: u8 = 0x12;

/// A decoded PERSISTENT RESERVE IN CDB. The service action is kept raw (5 bits) so a device
/// server can answer unknown ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrInCdb {
    pub service_action: u8,
    pub allocation_length: u16,
    pub control: u8,
}

impl PrInCdb {
    pub const LEN: usize = 10;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let len = self.allocation_length.to_be_bytes();
        [
            PERSISTENT_RESERVE_IN,
            self.service_action & 0x1f,
            0,
            0,
            0,
            0,
            0,
            len[0],
            len[1],
            self.control,
        ]
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "PERSISTENT RESERVE IN CDB";
        if bytes.len() < Self::LEN {
            return Err(DecodeError::short(WHAT, Self::LEN, bytes.len()));
        }
        if bytes[0] != PERSISTENT_RESERVE_IN {
            return Err(DecodeError::new(
                WHAT,
                format!("operation code 0x{:02x} is not 0x5e", bytes[0]),
            ));
        }
        Ok(Self {
            service_action: bytes[1] & 0x1f,
            allocation_length: be16(bytes, 7).unwrap_or(0),
            control: bytes[9],
        })
    }
}

/// A decoded PERSISTENT RESERVE OUT CDB, fields kept raw (4-bit scope and type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrOutCdb {
    pub service_action: u8,
    pub scope: u8,
    pub type_code: u8,
    pub parameter_list_length: u32,
    pub control: u8,
}

impl PrOutCdb {
    pub const LEN: usize = 10;

    pub fn encode(&self) -> [u8; Self::LEN] {
        let len = self.parameter_list_length.to_be_bytes();
        [
            PERSISTENT_RESERVE_OUT,
            self.service_action & 0x1f,
            (self.scope & 0x0f) << 4 | (self.type_code & 0x0f),
            0,
            0,
            len[0],
            len[1],
            len[2],
            len[3],
            self.control,
        ]
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "PERSISTENT RESERVE OUT CDB";
        if bytes.len() < Self::LEN {
            return Err(DecodeError::short(WHAT, Self::LEN, bytes.len()));
        }
        if bytes[0] != PERSISTENT_RESERVE_OUT {
            return Err(DecodeError::new(
                WHAT,
                format!("operation code 0x{:02x} is not 0x5f", bytes[0]),
            ));
        }
        Ok(Self {
            service_action: bytes[1] & 0x1f,
            scope: bytes[2] >> 4,
            type_code: bytes[2] & 0x0f,
            parameter_list_length: be32(bytes, 5).unwrap_or(0),
            control: bytes[9],
        })
    }
}

/// A standard (EVPD = 0) or VPD INQUIRY CDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InquiryCdb {
    pub evpd: bool,
    pub page_code: u8,
    pub allocation_length: u16,
    pub control: u8,
}

impl InquiryCdb {
    pub const LEN: usize = 6;

    /// A standard INQUIRY for `len` bytes.
    pub const fn standard(len: u16) -> Self {
        Self {
            evpd: false,
            page_code: 0,
            allocation_length: len,
            control: 0,
        }
    }

    pub fn encode(&self) -> [u8; Self::LEN] {
        let len = self.allocation_length.to_be_bytes();
        [
            INQUIRY,
            u8::from(self.evpd),
            self.page_code,
            len[0],
            len[1],
            self.control,
        ]
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "INQUIRY CDB";
        if bytes.len() < Self::LEN {
            return Err(DecodeError::short(WHAT, Self::LEN, bytes.len()));
        }
        if bytes[0] != INQUIRY {
            return Err(DecodeError::new(
                WHAT,
                format!("operation code 0x{:02x} is not 0x12", bytes[0]),
            ));
        }
        Ok(Self {
            evpd: bytes[1] & 1 == 1,
            page_code: bytes[2],
            allocation_length: be16(bytes, 3).unwrap_or(0),
            control: bytes[5],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pr_out_cdb_matches_sg_persist_bytes() {
        // sg_persist -v --out --reserve --param-rk=0xa1 --prout-type=5 prints:
        // "Persistent reservation out cdb: 5f 01 05 00 00 00 00 00 18 00"
        let cdb = PrOutCdb {
            service_action: 1,
            scope: 0,
            type_code: 5,
            parameter_list_length: 24,
            control: 0,
        };
        assert_eq!(cdb.encode(), [0x5f, 1, 5, 0, 0, 0, 0, 0, 0x18, 0]);
        // "Persistent reservation in cmd: 5e 00 00 00 00 00 00 20 00 00"
        let cdb = PrInCdb {
            service_action: 0,
            allocation_length: 8192,
            control: 0,
        };
        assert_eq!(cdb.encode(), [0x5e, 0, 0, 0, 0, 0, 0, 0x20, 0, 0]);
    }

    #[test]
    fn wrong_opcodes_and_short_cdbs_are_refused() {
        assert!(PrInCdb::decode(&[0x5f; 10]).is_err());
        assert!(PrOutCdb::decode(&[0x5e; 10]).is_err());
        let short = PrOutCdb::decode(&[0x5f, 0, 0]).unwrap_err();
        assert!(short.reason.contains("truncated"), "{short}");
        assert!(InquiryCdb::decode(&[0x12, 0]).is_err());
    }

    proptest! {
        #[test]
        fn pr_in_round_trips(sa in 0u8..32, len in any::<u16>(), control in any::<u8>()) {
            let cdb = PrInCdb { service_action: sa, allocation_length: len, control };
            prop_assert_eq!(PrInCdb::decode(&cdb.encode()).unwrap(), cdb);
        }

        #[test]
        fn pr_out_round_trips(sa in 0u8..32, scope in 0u8..16, ty in 0u8..16,
                              len in any::<u32>(), control in any::<u8>()) {
            let cdb = PrOutCdb { service_action: sa, scope, type_code: ty,
                                 parameter_list_length: len, control };
            prop_assert_eq!(PrOutCdb::decode(&cdb.encode()).unwrap(), cdb);
        }

        #[test]
        fn inquiry_round_trips(evpd in any::<bool>(), page in any::<u8>(), len in any::<u16>()) {
            let cdb = InquiryCdb { evpd, page_code: page, allocation_length: len, control: 0 };
            prop_assert_eq!(InquiryCdb::decode(&cdb.encode()).unwrap(), cdb);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = PrInCdb::decode(&bytes);
            let _ = PrOutCdb::decode(&bytes);
            let _ = InquiryCdb::decode(&bytes);
        }
    }
}
