//! Identifiers, flags, resource names and value blocks shared by the core and the shell.

use std::fmt;
use std::sync::Arc;

use crate::error::DlmError;

/// A cluster node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

/// One life of a node: a restarted node comes back with a new incarnation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Incarnation(pub u64);

/// A membership epoch (increases with every membership change).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Epoch(pub u64);

/// A lock, unique on the node that owns it (its client's node).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockId(pub u64);

/// A client of one node (an API handle or a socket connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for LockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// Request flags (a subset of the Linux `DLM_LKF_*` flags, same meaning).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Flags(pub u32);

impl Flags {
    /// No flags.
    pub const NONE: Flags = Flags(0);
    /// Fail at once with [`Status::WouldBlock`] instead of waiting.
    pub const NOQUEUE: Flags = Flags(1);
    /// The request converts an existing lock (set by [`crate::Event::Convert`]).
    pub const CONVERT: Flags = Flags(1 << 1);
    /// Queue an up-conversion behind earlier conversions even if it could be granted now.
    pub const QUECVT: Flags = Flags(1 << 2);
    /// Resolve a conversion deadlock by demoting this lock to NL instead of failing it
    /// with [`Status::Deadlock`]. While such a conversion waits, the holder must treat the
    /// lock as NL.
    pub const CONVDEADLK: Flags = Flags(1 << 3);
    /// Read and write the lock value block.
    pub const VALBLK: Flags = Flags(1 << 4);
    /// Every flag this implementation knows.
    pub const ALL: Flags = Flags(0x1f);

    /// True if every flag of `other` is set.
    pub fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union.
    #[must_use]
    pub fn with(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    /// Without the flags of `other`.
    #[must_use]
    pub fn without(self, other: Flags) -> Flags {
        Flags(self.0 & !other.0)
    }

    /// Names of the set flags.
    pub fn names(self) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (flag, name) in FLAG_NAMES {
            if self.contains(flag) {
                out.push(name);
            }
        }
        out
    }

    /// The flag with this lower-case name.
    pub fn from_name(name: &str) -> Option<Flags> {
        FLAG_NAMES
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name))
            .map(|(f, _)| *f)
    }
}

const FLAG_NAMES: [(Flags, &str); 5] = [
    (Flags::NOQUEUE, "noqueue"),
    (Flags::CONVERT, "convert"),
    (Flags::QUECVT, "quecvt"),
    (Flags::CONVDEADLK, "convdeadlk"),
    (Flags::VALBLK, "valblk"),
];

/// Longest resource name, in bytes (as in the Linux DLM).
pub const MAX_NAME_LEN: usize = 64;
/// Longest lock space name, in bytes.
pub const MAX_LOCKSPACE_LEN: usize = 64;
/// Size of the lock value block, in bytes.
pub const LVB_LEN: usize = 32;

/// A resource: lock space and name, cheap to clone.
///
/// Stored as one buffer `[lockspace length][lockspace][name]`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey(Arc<[u8]>);

impl ResourceKey {
    /// Checks both names: lock space 1..=64 bytes of UTF-8, name 1..=64 bytes.
    pub fn new(lockspace: &str, name: &[u8]) -> Result<ResourceKey, DlmError> {
        if lockspace.is_empty() || lockspace.len() > MAX_LOCKSPACE_LEN {
            return Err(DlmError::InvalidLockspace {
                lockspace: lockspace.to_owned(),
            });
        }
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(DlmError::InvalidName {
                len_bytes: name.len(),
            });
        }
        let ls_len = u8::try_from(lockspace.len()).map_err(|_| DlmError::InvalidLockspace {
            lockspace: lockspace.to_owned(),
        })?;
        let mut buf = Vec::with_capacity(1 + lockspace.len() + name.len());
        buf.push(ls_len);
        buf.extend_from_slice(lockspace.as_bytes());
        buf.extend_from_slice(name);
        Ok(ResourceKey(buf.into()))
    }

    /// Rebuilds a key from [`ResourceKey::as_bytes`], checking it.
    pub fn from_bytes(bytes: &[u8]) -> Result<ResourceKey, DlmError> {
        let (&len, rest) = bytes
            .split_first()
            .ok_or(DlmError::InvalidName { len_bytes: 0 })?;
        let len = usize::from(len);
        if rest.len() < len {
            return Err(DlmError::InvalidName { len_bytes: 0 });
        }
        let lockspace =
            std::str::from_utf8(&rest[..len]).map_err(|_| DlmError::InvalidLockspace {
                lockspace: String::from_utf8_lossy(&rest[..len]).into_owned(),
            })?;
        ResourceKey::new(lockspace, &rest[len..])
    }

    /// The encoded form (`[lockspace length][lockspace][name]`).
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn ls_len(&self) -> usize {
        usize::from(self.0.first().copied().unwrap_or(0))
    }

    /// The lock space.
    pub fn lockspace(&self) -> &str {
        std::str::from_utf8(&self.0[1..1 + self.ls_len()]).unwrap_or("")
    }

    /// The resource name.
    pub fn name(&self) -> &[u8] {
        &self.0[1 + self.ls_len()..]
    }

    /// The name for display: text if printable ASCII, else hex.
    pub fn display_name(&self) -> String {
        let name = self.name();
        if name.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
            String::from_utf8_lossy(name).into_owned()
        } else {
            let mut s = String::from("0x");
            for b in name {
                s.push_str(&format!("{b:02x}"));
            }
            s
        }
    }

    /// A stable 32-bit hash (the same on every node), used to pick the directory node.
    pub fn stable_hash(&self) -> u32 {
        crc32fast::hash(&self.0)
    }
}

impl fmt::Debug for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.lockspace(), self.display_name())
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.lockspace(), self.display_name())
    }
}

/// A lock value block.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Lvb(pub [u8; LVB_LEN]);

impl fmt::Debug for Lvb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Lvb(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

impl Lvb {
    /// The value block as lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses up to 64 hex digits (shorter input is zero-padded on the right).
    pub fn from_hex(text: &str) -> Option<Lvb> {
        if text.len() > 2 * LVB_LEN || !text.len().is_multiple_of(2) {
            return None;
        }
        let mut out = [0u8; LVB_LEN];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            let s = std::str::from_utf8(chunk).ok()?;
            out[i] = u8::from_str_radix(s, 16).ok()?;
        }
        Some(Lvb(out))
    }
}

/// A copy of a resource's value block as a lock holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LvbCopy {
    /// The value.
    pub value: Lvb,
    /// Version: incremented by every write.
    pub seq: u64,
    /// False when the value may be stale (a writer or the master was lost).
    pub valid: bool,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Granted (a new lock or a conversion).
    Granted,
    /// NOQUEUE and not grantable now (Linux `-EAGAIN`).
    WouldBlock,
    /// A conversion deadlock, reported because CONVDEADLK was not set (`-EDEADLK`).
    Deadlock,
    /// Canceled (`-DLM_ECANCEL`): a new lock is gone, a conversion left the lock as it was.
    Canceled,
    /// Unlocked (`-DLM_EUNLOCK`).
    Unlocked,
    /// Refused: bad name, flags or mode, or an unknown lock.
    Invalid,
    /// Refused: the lock already has a request in progress (`-EBUSY`).
    Busy,
    /// This node was removed from the membership; its locks are void.
    Evicted,
}

impl Status {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Status::Granted => "granted",
            Status::WouldBlock => "would-block",
            Status::Deadlock => "deadlock",
            Status::Canceled => "canceled",
            Status::Unlocked => "unlocked",
            Status::Invalid => "invalid",
            Status::Busy => "busy",
            Status::Evicted => "evicted",
        }
    }

    /// The status with this name.
    pub fn from_name(name: &str) -> Option<Status> {
        [
            Status::Granted,
            Status::WouldBlock,
            Status::Deadlock,
            Status::Canceled,
            Status::Unlocked,
            Status::Invalid,
            Status::Busy,
            Status::Evicted,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_key_round_trips_and_checks_lengths() {
        let k = ResourceKey::new("ls", b"name").unwrap();
        assert_eq!(k.lockspace(), "ls");
        assert_eq!(k.name(), b"name");
        assert_eq!(ResourceKey::from_bytes(k.as_bytes()).unwrap(), k);
        assert!(ResourceKey::new("ls", &[b'a'; 64]).is_ok());
        assert!(ResourceKey::new("ls", &[b'a'; 65]).is_err());
        assert!(ResourceKey::new("ls", b"").is_err());
        assert!(ResourceKey::new("", b"a").is_err());
        assert!(ResourceKey::from_bytes(&[5, b'a']).is_err());
        assert!(ResourceKey::from_bytes(&[]).is_err());
        assert_eq!(
            ResourceKey::new("ls", &[0, 1]).unwrap().display_name(),
            "0x0001"
        );
    }

    #[test]
    fn flags_and_lvb_text() {
        let f = Flags::NOQUEUE.with(Flags::VALBLK);
        assert_eq!(f.names(), vec!["noqueue", "valblk"]);
        assert_eq!(Flags::from_name("QUECVT"), Some(Flags::QUECVT));
        let mut v = Lvb::default();
        v.0[0] = 0xab;
        v.0[31] = 1;
        assert_eq!(Lvb::from_hex(&v.to_hex()), Some(v));
        assert_eq!(Lvb::from_hex("zz"), None);
        assert_eq!(Lvb::from_hex("ab").unwrap().0[0], 0xab);
        for s in ["granted", "would-block", "evicted"] {
            assert_eq!(Status::from_name(s).unwrap().name(), s);
        }
    }
}
