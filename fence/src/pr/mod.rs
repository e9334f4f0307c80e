//! Persistent-reservation wire formats: pure byte encoding and decoding, no I/O.
//!
//! SCSI (SPC-4): the PERSISTENT RESERVE IN/OUT command descriptor blocks ([`cdb`]), the PR OUT
//! parameter lists ([`param`]), the PR IN parameter data ([`data`]), TransportIDs
//! ([`transport_id`]), status and sense data ([`sense`]) and standard INQUIRY data
//! ([`inquiry`]). NVMe: the reservation commands and the Reservation Status data structure
//! ([`nvme`]).
//!
//! Every decoder takes arbitrary bytes and returns a [`DecodeError`] naming what was wrong;
//! none panics (property tests and a fuzz target check that). Every encoder has a decoder and
//! the pair round-trips.

pub mod cdb;
pub mod command;
pub mod data;
pub mod inquiry;
pub mod nvme;
pub mod param;
pub mod sense;
pub mod transport_id;
mod types;

pub use command::PrOutCommand;
pub use types::{PrInAction, PrOutAction, ReservationType, SCOPE_LU, type_code_description};

/// Bytes that could not be decoded: what was being decoded and why it failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("decoding {what}: {reason}")]
pub struct DecodeError {
    /// The structure being decoded, e.g. "READ KEYS parameter data".
    pub what: &'static str,
    /// What was wrong with the bytes.
    pub reason: String,
}

impl DecodeError {
    pub(crate) fn new(what: &'static str, reason: impl Into<String>) -> Self {
        Self {
            what,
            reason: reason.into(),
        }
    }

    /// `what` needed `need` bytes but only `got` were there.
    pub(crate) fn short(what: &'static str, need: usize, got: usize) -> Self {
        Self::new(what, format!("truncated: need {need} bytes, got {got}"))
    }
}

/// Reads a big-endian u16 at `at`; the caller has checked the length.
pub(crate) fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// Reads a big-endian u32 at `at`.
pub(crate) fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads a big-endian u64 at `at`.
pub(crate) fn be64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_be_bytes(a))
}

/// Reads a little-endian u16 at `at`.
pub(crate) fn le16(bytes: &[u8], at: usize) -> Option<u16> {
    let b = bytes.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([b[0], b[1]]))
}

/// Reads a little-endian u32 at `at`.
pub(crate) fn le32(bytes: &[u8], at: usize) -> Option<u32> {
    let b = bytes.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Reads a little-endian u64 at `at`.
pub(crate) fn le64(bytes: &[u8], at: usize) -> Option<u64> {
    let b = bytes.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

/// Formats bytes as lowercase hex without separators.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses hex digits (no prefix, even or odd count) into exactly `N` bytes, right-aligned.
pub(crate) fn parse_hex_exact<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.is_empty() || text.len() > 2 * N || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let value = u128::from_str_radix(text, 16).ok()?;
    let bytes = value.to_be_bytes();
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[16 - N..]);
    Some(out)
}
