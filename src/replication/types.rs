//! Identifiers and states of a replicated volume, shared by the core, the wire codec,
//! the metadata and the status snapshot.

use serde::{Deserialize, Serialize};

/// A volume's identity: 16 bytes, the same on both replicas, written by `create-md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct VolumeId(pub [u8; 16]);

impl VolumeId {
    /// Parses 32 hex digits (dashes allowed, UUID style).
    pub fn parse(s: &str) -> Option<Self> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || !hex.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }

    /// A volume id derived from a name (FNV-1a based; stable, not secret).
    pub fn from_name(name: &str) -> Self {
        let mut a: u64 = 0xcbf2_9ce4_8422_2325;
        let mut b: u64 = 0x8422_2325_cbf2_9ce4;
        for byte in name.bytes() {
            a = (a ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3);
            b = (b ^ u64::from(byte))
                .wrapping_mul(0x100_0000_01b3)
                .rotate_left(7);
        }
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&a.to_be_bytes());
        out[8..].copy_from_slice(&b.to_be_bytes());
        Self(out)
    }
}

impl std::fmt::Display for VolumeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                write!(f, "-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for VolumeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for VolumeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("bad volume id `{s}`")))
    }
}

/// A node's id within the cluster (or the replica pair).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct NodeId(pub u32);

impl std::fmt::Display for NodeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The cluster's fencing epoch: a node with an older epoch is refused as primary.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

/// The identity of a cluster's log, chosen at random when the log is created. A
/// replica's superblock records the log whose epochs it follows: a log created afresh
/// (a lost state directory) restarts its epochs, and a replica that compared them with
/// its own would refuse it for good; the identity tells the two apart. 0: none yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClusterLogId(pub u64);

impl ClusterLogId {
    pub const NONE: Self = Self(0);
}

impl std::fmt::Display for ClusterLogId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// Generation identifiers (DRBD's UUIDs): which data history a disk holds.
///
/// - `current`: the data generation of this disk; 0 = never written (just created).
/// - `bitmap`: the generation the peer had when we started tracking changes in the bitmap
///   (0 = not tracking: we were in sync when last connected).
/// - `history`: older `bitmap` values, newest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct GenerationIds {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

impl GenerationIds {
    /// Moves the bitmap generation into the history (after a finished resync).
    pub fn rotate_bitmap_into_history(&mut self) {
        if self.bitmap != 0 && self.bitmap != self.current {
            self.history = [self.bitmap, self.history[0]];
        }
        self.bitmap = 0;
    }

    /// Starts a new data generation, remembering the current one in `bitmap` if no
    /// generation is tracked yet.
    pub fn start_new(&mut self, new_current: u64) {
        if self.bitmap == 0 {
            self.bitmap = self.current;
        } else if self.current != 0 && self.current != self.bitmap {
            self.history = [self.current, self.history[0]];
        }
        self.current = new_current;
    }

    /// Is `id` one of the older generations this disk went through?
    pub fn has_history(&self, id: u64) -> bool {
        id != 0 && (self.bitmap == id || self.history.contains(&id))
    }
}

/// The application-facing role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Primary,
    Secondary,
}

/// The state of the replication link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConnState {
    /// Not trying to connect (after `disconnect`, or after a refusal such as split brain).
    StandAlone,
    /// Waiting for the transport to come up.
    Connecting,
    /// Transport up, handshake in progress.
    Handshaking,
    /// Handshake done, exchanging bitmaps before a resync.
    WfBitmap,
    /// Connected and in sync: writes are replicated.
    Connected,
    /// Connected; this node sends the out-of-sync blocks.
    SyncSource,
    /// Connected; this node receives the out-of-sync blocks.
    SyncTarget,
    /// Connected; an online verify runs.
    Verifying,
}

/// The state of a node's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskState {
    /// No usable local disk (detached after an I/O error, or none attached).
    Diskless,
    /// Holds data that is not consistent (a resync target, or never synced).
    Inconsistent,
    /// Consistent but known to be older than the peer's (fenced or outdated).
    Outdated,
    /// State unknown (peer disk while disconnected).
    DUnknown,
    /// Consistent; as new as it can know.
    Consistent,
    /// Consistent and current.
    UpToDate,
}

/// Replication protocol: when a write is acknowledged to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Protocol {
    /// Once local write completed and the data is handed to the network.
    A,
    /// Once local write completed and the peer has received the data.
    B,
    /// Once local and peer writes completed (the default); durable on both nodes once a
    /// FLUSH or FUA completes, as for a local disk (the block layer's and DRBD's rule).
    #[default]
    C,
}

impl std::str::FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "A" | "a" => Ok(Self::A),
            "B" | "b" => Ok(Self::B),
            "C" | "c" => Ok(Self::C),
            other => Err(format!("unknown protocol `{other}` (expected A, B or C)")),
        }
    }
}

/// What a split brain policy does when both sides changed data independently.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SplitBrainPolicy {
    /// Disconnect and keep both data sets until an operator resolves (the default).
    #[default]
    Disconnect,
    /// If one side made no changes, it becomes the sync target.
    DiscardZeroChanges,
    /// The side that became primary later is discarded.
    DiscardYoungerPrimary,
}

/// What the primary does when it loses the peer and has to write alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum FencingPolicy {
    /// Keep writing without asking anyone (DRBD `fencing dont-care`).
    DontCare,
    /// Ask the fencing hook to outdate the peer; if it fails, keep writing anyway.
    ResourceOnly,
    /// Ask the fencing hook; until it succeeds, suspend I/O (the safe default for clusters).
    #[default]
    ResourceAndStonith,
}

impl std::str::FromStr for FencingPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dont-care" => Ok(Self::DontCare),
            "resource-only" => Ok(Self::ResourceOnly),
            "resource-and-stonith" => Ok(Self::ResourceAndStonith),
            other => Err(format!(
                "unknown fencing policy `{other}` (expected dont-care, resource-only or resource-and-stonith)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_id_round_trips_and_refuses_garbage() {
        let id = VolumeId::from_name("vol0");
        let text = id.to_string();
        assert_eq!(VolumeId::parse(&text), Some(id));
        assert_eq!(VolumeId::parse("xyz"), None);
        assert_eq!(VolumeId::parse(&"g".repeat(32)), None);
        assert_ne!(VolumeId::from_name("vol1"), id);
    }

    #[test]
    fn generation_ids_move_through_history() {
        let mut g = GenerationIds {
            current: 10,
            ..Default::default()
        };
        g.start_new(11);
        assert_eq!((g.current, g.bitmap), (11, 10));
        g.start_new(12);
        assert_eq!((g.current, g.bitmap, g.history[0]), (12, 10, 11));
        g.rotate_bitmap_into_history();
        assert_eq!(g.bitmap, 0);
        assert_eq!(g.history, [10, 11]);
        assert!(g.has_history(10) && !g.has_history(0));
    }
}
