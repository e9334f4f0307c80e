//! SCSI TransportIDs (SPC-4 7.6.4): how PR parameter lists name an initiator port.
//!
//! All formats are 24 bytes except iSCSI, whose length is 4 + ADDITIONAL LENGTH (a multiple
//! of 4, at least 20). Byte 0 is `FORMAT CODE << 6 | PROTOCOL IDENTIFIER`.

use super::{DecodeError, be16, hex, parse_hex_exact};
use serde::{Deserialize, Serialize};
use std::fmt;

/// SCSI protocol identifiers (SPC-4 table "PROTOCOL IDENTIFIER values").
pub mod protocol {
    pub const FCP: u8 = 0x0;
    pub const SPI: u8 = 0x1;
    pub const SSA: u8 = 0x2;
    pub const SBP: u8 = 0x3;
    pub const SRP: u8 = 0x4;
    pub const ISCSI: u8 = 0x5;
    pub const SAS: u8 = 0x6;
    pub const ADT: u8 = 0x7;
    pub const ATA: u8 = 0x8;
    pub const UAS: u8 = 0x9;
    pub const SOP: u8 = 0xa;
}

/// A TransportID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "protocol", rename_all = "kebab-case")]
pub enum TransportId {
    /// Fibre Channel: the initiator's N_PORT_NAME.
    Fcp { n_port_name: [u8; 8] },
    /// Parallel SCSI: SCSI address and relative target port.
    Spi {
        scsi_address: u16,
        relative_target_port: u16,
    },
    /// IEEE 1394 (SBP): EUI-64 name.
    Sbp { eui64: [u8; 8] },
    /// SCSI RDMA: 16-byte initiator port identifier.
    Srp { port_id: [u8; 16] },
    /// iSCSI: the initiator name, plus the session id (ISID, hex) in format 01.
    Iscsi { name: String, isid: Option<String> },
    /// SAS (also what LIO's tcm_loop reports for `naa.` initiators): the SAS address.
    Sas { address: [u8; 8] },
    /// SCSI over PCIe: routing id.
    Sop { routing_id: u16 },
    /// A protocol this crate does not decode: the raw bytes.
    Other { protocol_id: u8, bytes: Vec<u8> },
}

impl TransportId {
    /// Length of a non-iSCSI TransportID.
    pub const FIXED_LEN: usize = 24;

    /// The PROTOCOL IDENTIFIER.
    pub fn protocol_id(&self) -> u8 {
        match self {
            Self::Fcp { .. } => protocol::FCP,
            Self::Spi { .. } => protocol::SPI,
            Self::Sbp { .. } => protocol::SBP,
            Self::Srp { .. } => protocol::SRP,
            Self::Iscsi { .. } => protocol::ISCSI,
            Self::Sas { .. } => protocol::SAS,
            Self::Sop { .. } => protocol::SOP,
            Self::Other { protocol_id, .. } => *protocol_id & 0x0f,
        }
    }

    /// A SAS TransportID from LIO's `naa.<16 hex digits>` initiator name form.
    pub fn sas_from_naa(name: &str) -> Option<Self> {
        let digits = name.strip_prefix("naa.")?;
        if digits.len() != 16 {
            return None;
        }
        parse_hex_exact::<8>(digits).map(|address| Self::Sas { address })
    }

    /// The initiator port name the way LIO writes it in configfs (`naa.…`, `iqn.…`), used to
    /// match TransportIDs against nexuses.
    pub fn port_name(&self) -> String {
        match self {
            Self::Sas { address } => format!("naa.{}", hex(address)),
            Self::Fcp { n_port_name } => format!("fc.{}", hex(n_port_name)),
            Self::Sbp { eui64 } => format!("eui.{}", hex(eui64)),
            Self::Srp { port_id } => format!("0x{}", hex(port_id)),
            Self::Iscsi { name, .. } => name.clone(),
            Self::Spi {
                scsi_address,
                relative_target_port,
            } => format!("spi.{scsi_address}.{relative_target_port}"),
            Self::Sop { routing_id } => format!("sop.{routing_id:04x}"),
            Self::Other { protocol_id, bytes } => format!("proto{protocol_id}.{}", hex(bytes)),
        }
    }

    /// Encodes the TransportID.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; Self::FIXED_LEN];
        out[0] = self.protocol_id();
        match self {
            Self::Fcp { n_port_name } => out[8..16].copy_from_slice(n_port_name),
            Self::Spi {
                scsi_address,
                relative_target_port,
            } => {
                out[2..4].copy_from_slice(&scsi_address.to_be_bytes());
                out[6..8].copy_from_slice(&relative_target_port.to_be_bytes());
            }
            Self::Sbp { eui64 } => out[8..16].copy_from_slice(eui64),
            Self::Srp { port_id } => out[8..24].copy_from_slice(port_id),
            Self::Sas { address } => out[4..12].copy_from_slice(address),
            Self::Sop { routing_id } => out[2..4].copy_from_slice(&routing_id.to_be_bytes()),
            Self::Other { protocol_id, bytes } => {
                out = bytes.clone();
                if out.len() < Self::FIXED_LEN {
                    out.resize(Self::FIXED_LEN, 0);
                }
                out[0] = (out[0] & 0xf0) | (protocol_id & 0x0f);
            }
            Self::Iscsi { name, isid } => {
                let mut text = name.clone().into_bytes();
                let format = match isid {
                    Some(isid) => {
                        text.extend_from_slice(b",i,0x");
                        text.extend_from_slice(isid.as_bytes());
                        1u8
                    }
                    None => 0,
                };
                text.push(0);
                let mut len = text.len().max(20);
                len = len.div_ceil(4) * 4;
                text.resize(len, 0);
                let add_len = u16::try_from(len).unwrap_or(u16::MAX);
                out = Vec::with_capacity(4 + len);
                out.push(format << 6 | protocol::ISCSI);
                out.push(0);
                out.extend_from_slice(&add_len.to_be_bytes());
                out.extend_from_slice(&text);
            }
        }
        out
    }

    /// Decodes one TransportID at the start of `bytes`; returns it and its length.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), DecodeError> {
        const WHAT: &str = "TransportID";
        let Some(&first) = bytes.first() else {
            return Err(DecodeError::short(WHAT, 1, 0));
        };
        let proto = first & 0x0f;
        let format = first >> 6;
        if proto == protocol::ISCSI {
            let add_len = be16(bytes, 2).ok_or_else(|| DecodeError::short(WHAT, 4, bytes.len()))?;
            let total = 4 + usize::from(add_len);
            let body = bytes
                .get(4..total)
                .ok_or_else(|| DecodeError::short(WHAT, total, bytes.len()))?;
            let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
            let text = std::str::from_utf8(&body[..end])
                .map_err(|_| DecodeError::new(WHAT, "iSCSI name is not UTF-8".to_owned()))?;
            let (name, isid) = match format {
                0 => (text.to_owned(), None),
                1 => {
                    let lower = text.to_ascii_lowercase();
                    let at = lower.find(",i,0x").ok_or_else(|| {
                        DecodeError::new(
                            WHAT,
                            format!("iSCSI format 01 without `,i,0x` separator: {text:?}"),
                        )
                    })?;
                    (text[..at].to_owned(), Some(text[at + 5..].to_owned()))
                }
                other => {
                    return Err(DecodeError::new(
                        WHAT,
                        format!("iSCSI TransportID format code {other} is reserved"),
                    ));
                }
            };
            return Ok((Self::Iscsi { name, isid }, total));
        }
        let b = bytes
            .get(..Self::FIXED_LEN)
            .ok_or_else(|| DecodeError::short(WHAT, Self::FIXED_LEN, bytes.len()))?;
        let arr8 = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            a
        };
        let id = match (proto, format) {
            (protocol::FCP, 0) => Self::Fcp {
                n_port_name: arr8(8),
            },
            (protocol::SPI, 0) => Self::Spi {
                scsi_address: be16(b, 2).unwrap_or(0),
                relative_target_port: be16(b, 6).unwrap_or(0),
            },
            (protocol::SBP, 0) => Self::Sbp { eui64: arr8(8) },
            (protocol::SRP, 0) => {
                let mut port_id = [0u8; 16];
                port_id.copy_from_slice(&b[8..24]);
                Self::Srp { port_id }
            }
            (protocol::SAS, 0) => Self::Sas { address: arr8(4) },
            (protocol::SOP, 0) => Self::Sop {
                routing_id: be16(b, 2).unwrap_or(0),
            },
            _ => Self::Other {
                protocol_id: proto,
                bytes: b.to_vec(),
            },
        };
        Ok((id, Self::FIXED_LEN))
    }

    /// Decodes back-to-back TransportIDs filling exactly `bytes`.
    pub fn decode_list(mut bytes: &[u8]) -> Result<Vec<Self>, DecodeError> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (id, len) = Self::decode(bytes)?;
            out.push(id);
            bytes = &bytes[len..];
        }
        Ok(out)
    }

    /// Parses sg_persist's `--transport-id` forms: `sas,<16 hex>`, `fcp,<16 hex>`,
    /// `sbp,<16 hex>`, `srp,<32 hex>`, `spi,<address>,<rtpi>`, `sop,<hex>`,
    /// `iqn.<name>[,i,0x<isid>]`, or comma/space separated hex bytes.
    pub fn parse(text: &str) -> Result<Self, DecodeError> {
        const WHAT: &str = "TransportID text";
        let t = text.trim();
        let bad = |reason: String| DecodeError::new(WHAT, reason);
        if t.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("iqn")) {
            let lower = t.to_ascii_lowercase();
            return Ok(match lower.find(",i,0x") {
                Some(at) => Self::Iscsi {
                    name: t[..at].to_owned(),
                    isid: Some(t[at + 5..].to_owned()),
                },
                None => Self::Iscsi {
                    name: t.to_owned(),
                    isid: None,
                },
            });
        }
        if let Some((scheme, rest)) = t.split_once(',') {
            let rest = rest.trim();
            let hex8 = |what: &str| {
                let digits = rest.strip_prefix("0x").unwrap_or(rest);
                if digits.len() != 16 {
                    return Err(bad(format!(
                        "{what} needs exactly 16 hex digits, got `{rest}`"
                    )));
                }
                parse_hex_exact::<8>(digits)
                    .ok_or_else(|| bad(format!("{what}: `{rest}` is not hex")))
            };
            match scheme.to_ascii_lowercase().as_str() {
                "sas" => {
                    if let Some(id) = Self::sas_from_naa(rest) {
                        return Ok(id);
                    }
                    return Ok(Self::Sas {
                        address: hex8("sas")?,
                    });
                }
                "fcp" => {
                    return Ok(Self::Fcp {
                        n_port_name: hex8("fcp")?,
                    });
                }
                "sbp" => {
                    return Ok(Self::Sbp {
                        eui64: hex8("sbp")?,
                    });
                }
                "srp" => {
                    let digits = rest.strip_prefix("0x").unwrap_or(rest);
                    if digits.len() != 32 {
                        return Err(bad(format!(
                            "srp needs exactly 32 hex digits, got `{rest}`"
                        )));
                    }
                    let port_id = parse_hex_exact::<16>(digits)
                        .ok_or_else(|| bad(format!("srp: `{rest}` is not hex")))?;
                    return Ok(Self::Srp { port_id });
                }
                "spi" => {
                    let (addr, rtpi) = rest
                        .split_once(',')
                        .ok_or_else(|| bad("spi needs `<address>,<rtpi>`".to_owned()))?;
                    let num = |s: &str| {
                        s.trim()
                            .parse::<u16>()
                            .map_err(|_| bad(format!("spi: `{s}` is not a number 0-65535")))
                    };
                    return Ok(Self::Spi {
                        scsi_address: num(addr)?,
                        relative_target_port: num(rtpi)?,
                    });
                }
                "sop" => {
                    let digits = rest.strip_prefix("0x").unwrap_or(rest);
                    let routing_id = u16::from_str_radix(digits, 16)
                        .map_err(|_| bad(format!("sop: `{rest}` is not a 16-bit hex number")))?;
                    return Ok(Self::Sop { routing_id });
                }
                _ => {}
            }
        }
        // Hex bytes separated by commas or spaces.
        let mut bytes = Vec::new();
        for part in t.split([',', ' ', '\t']).filter(|p| !p.is_empty()) {
            let digits = part.strip_prefix("0x").unwrap_or(part);
            let byte = u8::from_str_radix(digits, 16).map_err(|_| {
                bad(format!(
                    "`{text}`: expected sas,/fcp,/sbp,/srp,/spi,/sop, an iqn name or hex bytes"
                ))
            })?;
            bytes.push(byte);
        }
        if bytes.is_empty() {
            return Err(bad("empty TransportID".to_owned()));
        }
        if bytes.len() < Self::FIXED_LEN && bytes[0] & 0x0f != protocol::ISCSI {
            bytes.resize(Self::FIXED_LEN, 0);
        }
        let (id, len) = Self::decode(&bytes)?;
        if len != bytes.len() {
            return Err(bad(format!(
                "{} bytes given but the TransportID is {len} bytes long",
                bytes.len()
            )));
        }
        Ok(id)
    }
}

impl fmt::Display for TransportId {
    /// sg_persist's wording for the "Transport Id of initiator" line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fcp { n_port_name } => write!(f, "FCP-2 World Wide Name: 0x{}", hex(n_port_name)),
            Self::Spi {
                scsi_address,
                relative_target_port,
            } => write!(
                f,
                "Parallel SCSI initiator SCSI address: 0x{scsi_address:x}, relative port number: {relative_target_port}"
            ),
            Self::Sbp { eui64 } => write!(f, "IEEE 1394 EUI-64 name: 0x{}", hex(eui64)),
            Self::Srp { port_id } => {
                write!(f, "RDMA initiator port identifier: 0x{}", hex(port_id))
            }
            Self::Iscsi { name, isid: None } => {
                write!(f, "iSCSI world wide unique node id: {name}")
            }
            Self::Iscsi {
                name,
                isid: Some(isid),
            } => write!(f, "iSCSI world wide unique port id: {name},i,0x{isid}"),
            Self::Sas { address } => write!(f, "SAS address: 0x{}", hex(address)),
            Self::Sop { routing_id } => write!(f, "SOP routing id: 0x{routing_id:x}"),
            Self::Other { protocol_id, bytes } => {
                write!(f, "protocol 0x{protocol_id:x}: {}", hex(bytes))
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn arb_transport_id() -> impl Strategy<Value = TransportId> {
        prop_oneof![
            any::<[u8; 8]>().prop_map(|n_port_name| TransportId::Fcp { n_port_name }),
            (any::<u16>(), any::<u16>()).prop_map(|(a, r)| TransportId::Spi {
                scsi_address: a,
                relative_target_port: r
            }),
            any::<[u8; 8]>().prop_map(|eui64| TransportId::Sbp { eui64 }),
            any::<[u8; 16]>().prop_map(|port_id| TransportId::Srp { port_id }),
            any::<[u8; 8]>().prop_map(|address| TransportId::Sas { address }),
            any::<u16>().prop_map(|routing_id| TransportId::Sop { routing_id }),
            (
                "iqn\\.[a-z0-9.:-]{1,60}",
                proptest::option::of("[0-9a-f]{12}")
            )
                .prop_map(|(name, isid)| TransportId::Iscsi { name, isid }),
        ]
    }

    #[test]
    fn iscsi_is_padded_to_a_multiple_of_four_and_at_least_24_bytes() {
        let short = TransportId::Iscsi {
            name: "iqn.a".into(),
            isid: None,
        }
        .encode();
        assert_eq!(short.len(), 24);
        assert_eq!(short[0], 0x05);
        assert_eq!(&short[2..4], &[0, 20]);
        let with_isid = TransportId::Iscsi {
            name: "iqn.2024-01.test:nodea".into(),
            isid: Some("23d000000001".into()),
        }
        .encode();
        assert_eq!(with_isid[0], 0x45, "format 01 + iSCSI");
        assert_eq!(with_isid.len() % 4, 0);
    }

    #[test]
    fn sg_persist_text_forms_parse() {
        assert_eq!(
            TransportId::parse("sas,5000c50005b32001").unwrap(),
            TransportId::Sas {
                address: [0x50, 0x00, 0xc5, 0x00, 0x05, 0xb3, 0x20, 0x01]
            }
        );
        assert_eq!(
            TransportId::parse("6,0,0,0,50,0,c5,0,5,b3,20,1").unwrap(),
            TransportId::parse("SAS,5000c50005b32001").unwrap()
        );
        assert_eq!(
            TransportId::parse("iqn.5886.com.acme:x,i,0x1234567890ab").unwrap(),
            TransportId::Iscsi {
                name: "iqn.5886.com.acme:x".into(),
                isid: Some("1234567890ab".into())
            }
        );
        assert!(TransportId::parse("sas,123").is_err());
        assert!(TransportId::parse("nonsense words").is_err());
        assert!(TransportId::parse("").is_err());
        let naa = TransportId::sas_from_naa("naa.5001405aabbccdd0").unwrap();
        assert_eq!(naa.port_name(), "naa.5001405aabbccdd0");
    }

    proptest! {
        #[test]
        fn round_trips(id in arb_transport_id()) {
            let bytes = id.encode();
            let (back, len) = TransportId::decode(&bytes).unwrap();
            prop_assert_eq!(len, bytes.len());
            prop_assert_eq!(back, id);
        }

        #[test]
        fn lists_round_trip(ids in proptest::collection::vec(arb_transport_id(), 0..5)) {
            let bytes: Vec<u8> = ids.iter().flat_map(TransportId::encode).collect();
            prop_assert_eq!(TransportId::decode_list(&bytes).unwrap(), ids);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = TransportId::decode(&bytes);
            let _ = TransportId::decode_list(&bytes);
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(text in ".{0,60}") {
            let _ = TransportId::parse(&text);
        }
    }
}
