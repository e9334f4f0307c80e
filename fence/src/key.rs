//! Reservation keys, and how tandem derives one per node incarnation.
//!
//! A tandem key is 8 bytes: `[cluster tag: 2][node id: 2][incarnation: 4]`, big-endian.
//! It depends on nothing a path or session has (no ISID, no initiator name), so it stays the
//! same across iSCSI reconnects and multipath changes, and it changes every time the node's
//! membership restarts (new incarnation), so a zombie from an old incarnation is recognisable.
//! Bit 15 of the cluster tag is always set, so a derived key is never zero (zero means "no
//! key" in SPC-4).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;

/// An 8-byte persistent reservation key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PrKey(u64);

/// The fields of a tandem-derived key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct KeyParts {
    /// 16-bit tag of the cluster id (bit 15 always set in derived keys).
    pub cluster_tag: u16,
    pub node_id: u16,
    pub incarnation: u32,
}

/// A key given as text that is not 1-16 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid reservation key `{input}`: {reason}")]
pub struct ParseKeyError {
    pub input: String,
    pub reason: &'static str,
}

impl PrKey {
    /// The zero key ("no key").
    pub const ZERO: Self = Self(0);

    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The key's 8 bytes as they appear in parameter lists (big-endian).
    pub const fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// The key for `node_id` in its `incarnation` of cluster `cluster_id`.
    pub fn derive(cluster_id: &str, node_id: u16, incarnation: u32) -> Self {
        let tag = cluster_tag(cluster_id);
        Self(u64::from(tag) << 48 | u64::from(node_id) << 32 | u64::from(incarnation))
    }

    /// The fields, read as if this were a tandem key (any key splits; use
    /// [`Self::is_of_cluster`] to know whether it is one).
    pub const fn parts(self) -> KeyParts {
        let b = self.0.to_be_bytes();
        KeyParts {
            cluster_tag: u16::from_be_bytes([b[0], b[1]]),
            node_id: u16::from_be_bytes([b[2], b[3]]),
            incarnation: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    /// Whether this key carries `cluster_id`'s tag (so it was very likely derived for it).
    pub fn is_of_cluster(self, cluster_id: &str) -> bool {
        self.parts().cluster_tag == cluster_tag(cluster_id)
    }

    /// Sixteen hex digits, the form used for the `pr_key` tracing field.
    pub fn hex16(self) -> String {
        format!("{:016x}", self.0)
    }
}

/// FNV-1a of the cluster id, folded to 16 bits, with bit 15 set.
fn cluster_tag(cluster_id: &str) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in cluster_id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let folded = (hash >> 16) ^ (hash & 0xffff);
    let low = u16::try_from(folded & 0xffff).unwrap_or(0);
    low | 0x8000
}

impl fmt::Display for PrKey {
    /// sg_persist's form: `0x` and hex without leading zeros.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "0x{:x}", self.0)
    }
}

impl fmt::LowerHex for PrKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl From<u64> for PrKey {
    fn from(value: u64) -> Self {
        Self(value)
    }
}

impl FromStr for PrKey {
    type Err = ParseKeyError;

    /// Hex, with or without `0x`, 1-16 digits — as sg_persist's `--param-rk` takes it. A
    /// trailing `h` is accepted too (sg3_utils' other hex notation).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseKeyError {
            input: text.to_owned(),
            reason,
        };
        let t = text.trim();
        let digits = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .or_else(|| t.strip_suffix('h'))
            .or_else(|| t.strip_suffix('H'))
            .unwrap_or(t);
        if digits.is_empty() {
            return Err(err("no hex digits"));
        }
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(err("not hexadecimal"));
        }
        if digits.len() > 16 {
            return Err(err("longer than 8 bytes (16 hex digits)"));
        }
        u64::from_str_radix(digits, 16)
            .map(Self)
            .map_err(|_| err("not hexadecimal"))
    }
}

impl Serialize for PrKey {
    /// As a `0x`-prefixed string of 16 hex digits: JSON numbers lose precision past 2^53.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("0x{:016x}", self.0))
    }
}

impl<'de> Deserialize<'de> for PrKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn derived_keys_are_distinct_per_node_and_incarnation_and_never_zero() {
        let a1 = PrKey::derive("prod", 1, 1);
        let a2 = PrKey::derive("prod", 1, 2);
        let b1 = PrKey::derive("prod", 2, 1);
        assert_ne!(a1, a2, "a membership restart must change the key");
        assert_ne!(a1, b1);
        assert!(!PrKey::derive("", 0, 0).is_zero());
        assert_eq!(a1.parts().node_id, 1);
        assert_eq!(a2.parts().incarnation, 2);
        assert!(a1.is_of_cluster("prod"));
        assert_eq!(a1, PrKey::derive("prod", 1, 1), "derivation is stable");
    }

    #[test]
    fn keys_parse_like_sg_persist() {
        assert_eq!("0xa1".parse::<PrKey>().unwrap(), PrKey::new(0xa1));
        assert_eq!("A1".parse::<PrKey>().unwrap(), PrKey::new(0xa1));
        assert_eq!("123abch".parse::<PrKey>().unwrap(), PrKey::new(0x123abc));
        assert_eq!(
            "ffffffffffffffff".parse::<PrKey>().unwrap(),
            PrKey::new(u64::MAX)
        );
        let too_long = "0x1ffffffffffffffff".parse::<PrKey>().unwrap_err();
        assert!(too_long.to_string().contains("8 bytes"), "{too_long}");
        assert!("0xzz".parse::<PrKey>().is_err());
        assert!("".parse::<PrKey>().is_err());
        assert!("0x".parse::<PrKey>().is_err());
        assert_eq!(PrKey::new(0xa1).to_string(), "0xa1");
    }

    proptest! {
        #[test]
        fn display_and_json_round_trip(v in any::<u64>()) {
            let key = PrKey::new(v);
            prop_assert_eq!(key.to_string().parse::<PrKey>().unwrap(), key);
            let json = serde_json::to_string(&key).unwrap();
            prop_assert_eq!(serde_json::from_str::<PrKey>(&json).unwrap(), key);
        }

        #[test]
        fn parts_round_trip(tag in 0x8000u16.., node in any::<u16>(), inc in any::<u32>()) {
            let key = PrKey::new(u64::from(tag) << 48 | u64::from(node) << 32 | u64::from(inc));
            let p = key.parts();
            prop_assert_eq!((p.cluster_tag, p.node_id, p.incarnation), (tag, node, inc));
        }

        #[test]
        fn parsing_arbitrary_text_never_panics(text in ".{0,40}") {
            let _ = text.parse::<PrKey>();
        }
    }
}
