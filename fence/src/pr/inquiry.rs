//! Standard INQUIRY data: who made the device and what kind of device it is.

use super::DecodeError;
use serde::{Deserialize, Serialize};

/// The fields of standard INQUIRY data that tandem shows or checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InquiryData {
    pub peripheral_qualifier: u8,
    pub device_type: u8,
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

impl InquiryData {
    /// Standard INQUIRY data is 36 bytes for the fields above.
    pub const LEN: usize = 36;

    /// Direct-access block device (disk).
    pub const TYPE_DISK: u8 = 0x00;

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        const WHAT: &str = "standard INQUIRY data";
        if bytes.len() < Self::LEN {
            return Err(DecodeError::short(WHAT, Self::LEN, bytes.len()));
        }
        let text = |range: std::ops::Range<usize>| {
            bytes[range]
                .iter()
                .map(|&b| {
                    if (0x20..0x7f).contains(&b) {
                        char::from(b)
                    } else {
                        ' '
                    }
                })
                .collect::<String>()
                .trim_end()
                .to_owned()
        };
        Ok(Self {
            peripheral_qualifier: bytes[0] >> 5,
            device_type: bytes[0] & 0x1f,
            vendor: text(8..16),
            product: text(16..32),
            revision: text(32..36),
        })
    }

    /// Encodes 36 bytes (SPC-4 version, response data format 2).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; Self::LEN];
        out[0] = (self.peripheral_qualifier & 0x07) << 5 | (self.device_type & 0x1f);
        out[2] = 0x06;
        out[3] = 0x02;
        out[4] = u8::try_from(Self::LEN - 5).unwrap_or(31);
        let put = |out: &mut [u8], range: std::ops::Range<usize>, s: &str| {
            let field = &mut out[range];
            field.fill(b' ');
            for (dst, src) in field.iter_mut().zip(s.bytes()) {
                *dst = src;
            }
        };
        put(&mut out, 8..16, &self.vendor);
        put(&mut out, 16..32, &self.product);
        put(&mut out, 32..36, &self.revision);
        out
    }

    /// The device type in sg3_utils' words.
    pub fn device_type_name(&self) -> &'static str {
        device_type_name(self.device_type)
    }
}

/// sg3_utils' names for peripheral device types.
pub fn device_type_name(code: u8) -> &'static str {
    match code {
        0x00 => "disk",
        0x01 => "tape",
        0x02 => "printer",
        0x03 => "processor",
        0x04 => "write once optical disk",
        0x05 => "cd/dvd",
        0x06 => "scanner",
        0x07 => "optical memory device",
        0x08 => "medium changer",
        0x09 => "communications",
        0x0c => "storage array controller",
        0x0d => "enclosure services device",
        0x0e => "simplified direct access device",
        0x0f => "optical card reader/writer device",
        0x11 => "object based storage",
        0x12 => "automation/driver interface",
        0x13 => "security manager device",
        0x14 => "host managed zoned block",
        0x1e => "well known logical unit",
        0x1f => "no physical device on this lu",
        _ => "reserved or vendor specific device type",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(q in 0u8..8, ty in 0u8..32, v in "[A-Z-]{0,8}", p in "[a-z0-9]{0,16}",
                       r in "[0-9.]{0,4}") {
            let d = InquiryData { peripheral_qualifier: q, device_type: ty, vendor: v,
                                  product: p, revision: r };
            prop_assert_eq!(InquiryData::decode(&d.encode()).unwrap(), d);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = InquiryData::decode(&bytes);
        }
    }

    #[test]
    fn short_inquiry_is_an_error() {
        assert!(InquiryData::decode(&[0; 20]).is_err());
    }
}
