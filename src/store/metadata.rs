//! On-disk metadata of a replicated volume: superblock, activity log, dirty bitmap.
//!
//! The metadata region is the last `md_size` bytes of either the backing device itself
//! (internal: data ends where metadata starts) or of a separate file (external). Every
//! block is 4 KiB and carries a crc32:
//!
//! ```text
//!  region start                                                        region end
//!  │ bitmap block 0 … n-1 │ AL slot 0 … s-1 │ superblock A │ superblock B │
//! ```
//!
//! - Superblocks are written alternately with an increasing `seq` and `O_DSYNC`; loading
//!   picks the valid one with the highest `seq`, so an update is atomic: a torn write
//!   leaves the previous superblock in force.
//! - Each activity-log slot is a whole transaction (the complete set of hot extents with a
//!   `seq`); slots are used round-robin and the newest valid one wins.
//! - A bitmap block whose crc does not match is loaded as all-dirty (a conservative full
//!   resync of that part), never as clean.

use super::activity_log::MAX_EXTENTS;
use super::bitmap::{Bitmap, WORDS_PER_BLOCK};
use crate::error::{Result, TandemError};
use crate::replication::types::{ClusterLogId, Epoch, GenerationIds, NodeId, VolumeId};
use serde::{Deserialize, Serialize};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Size of every metadata block.
pub const MD_BLOCK: u64 = 4096;
const MD_BLOCK_USIZE: usize = 4096;
/// Superblock magic.
pub const SB_MAGIC: [u8; 8] = *b"TANDEMMD";
const AL_MAGIC: u32 = 0x5441_4c31; // "TAL1"
/// Bitmap blocks: magic, block index, crc32 (of the block with this field zeroed), 4
/// spare bytes, then [`WORDS_PER_BLOCK`] words filling the block to its end. ("TBM1"
/// blocks kept their crc in the last 4 bytes, over the upper half of the last word: dirty
/// bits there were lost. They fail this check and load as all-dirty — one conservative
/// resync of what they cover — and are rewritten in this form.)
const BM_MAGIC: u32 = 0x5442_4d32; // "TBM2"
/// Where a bitmap block keeps its crc.
const BM_CRC_AT: usize = 8;
/// Where a bitmap block's words start.
const BM_WORDS_AT: usize = 16;
// The words fill the block exactly, behind a header that holds the crc.
const _: () = assert!(BM_WORDS_AT + 8 * WORDS_PER_BLOCK == MD_BLOCK_USIZE);
const _: () = assert!(BM_CRC_AT + 4 <= BM_WORDS_AT);
/// On-disk format version.
pub const MD_VERSION: u32 = 1;
/// Default number of activity-log transaction slots.
pub const DEFAULT_AL_SLOTS: u32 = 8;

/// Persistent flags of the local disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MdFlags {
    /// The data is consistent (not a partially done resync target).
    pub consistent: bool,
    /// The data is known to be older than the peer's (outdated by fencing).
    pub outdated: bool,
    /// This node was primary when the metadata was last written.
    pub was_primary: bool,
    /// Set while primary, cleared on clean demote/shutdown: a crash leaves it set, so the
    /// activity log extents must be resynced from this node.
    pub primary_crashed: bool,
    /// A tandemd process has the disk open: set at start, cleared by a clean shutdown.
    /// Found set at start, the last process ended without one (power loss, crash, kill).
    pub open: bool,
    /// The disk's volatile cache may have been lost (the last process did not stop
    /// cleanly) since this node was last in sync with its peer: writes it completed as
    /// a secondary but had not flushed may be gone, and only its peer knows which.
    pub cache_lost: bool,
}

impl MdFlags {
    fn bits(self) -> u32 {
        u32::from(self.consistent)
            | u32::from(self.outdated) << 1
            | u32::from(self.was_primary) << 2
            | u32::from(self.primary_crashed) << 3
            | u32::from(self.open) << 4
            | u32::from(self.cache_lost) << 5
    }

    fn from_bits(bits: u32) -> Self {
        Self {
            consistent: bits & 1 != 0,
            outdated: bits & 2 != 0,
            was_primary: bits & 4 != 0,
            primary_crashed: bits & 8 != 0,
            open: bits & 16 != 0,
            cache_lost: bits & 32 != 0,
        }
    }
}

/// The superblock: the volume's identity and replication state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    pub version: u32,
    pub flags: MdFlags,
    pub volume_id: VolumeId,
    pub node_id: NodeId,
    /// Bytes of volume data (what the frontends export).
    pub data_size_bytes: u64,
    /// Bytes of the metadata region (at the end of the metadata device).
    pub md_size_bytes: u64,
    pub bitmap_granularity: u32,
    pub al_extent_bytes: u64,
    pub al_extents: u32,
    pub al_slots: u32,
    pub generations: GenerationIds,
    pub epoch: Epoch,
    /// When this node last became primary (ms since the Unix epoch); 0 = never.
    pub primary_since_ms: u64,
    /// The cluster log whose epochs `epoch` counts (none: standalone, or not joined yet).
    pub cluster_log: ClusterLogId,
    /// Update sequence number (the newer superblock copy wins).
    pub seq: u64,
}

impl Superblock {
    fn encode(&self) -> [u8; MD_BLOCK_USIZE] {
        let mut b = [0u8; MD_BLOCK_USIZE];
        b[0..8].copy_from_slice(&SB_MAGIC);
        put32(&mut b, 8, self.version);
        put32(&mut b, 12, self.flags.bits());
        b[16..32].copy_from_slice(&self.volume_id.0);
        put32(&mut b, 32, self.node_id.0);
        put32(&mut b, 36, self.bitmap_granularity);
        put64(&mut b, 40, self.data_size_bytes);
        put64(&mut b, 48, self.md_size_bytes);
        put64(&mut b, 56, self.generations.current);
        put64(&mut b, 64, self.generations.bitmap);
        put64(&mut b, 72, self.generations.history[0]);
        put64(&mut b, 80, self.generations.history[1]);
        put64(&mut b, 88, self.epoch.0);
        put64(&mut b, 96, self.primary_since_ms);
        put64(&mut b, 104, self.seq);
        put64(&mut b, 112, self.al_extent_bytes);
        put32(&mut b, 120, self.al_extents);
        put32(&mut b, 124, self.al_slots);
        put64(&mut b, 128, self.cluster_log.0);
        let crc = crc32fast::hash(&b[..MD_BLOCK_USIZE - 4]);
        put32(&mut b, MD_BLOCK_USIZE - 4, crc);
        b
    }

    /// Decodes and validates a superblock block.
    pub fn decode(b: &[u8]) -> std::result::Result<Self, String> {
        if b.len() != MD_BLOCK_USIZE {
            return Err(format!("superblock is {} bytes, expected 4096", b.len()));
        }
        if b[0..8] != SB_MAGIC {
            return Err("no tandem metadata here (wrong magic)".into());
        }
        let crc = get32(b, MD_BLOCK_USIZE - 4);
        if crc != crc32fast::hash(&b[..MD_BLOCK_USIZE - 4]) {
            return Err("superblock checksum mismatch".into());
        }
        let version = get32(b, 8);
        if version != MD_VERSION {
            return Err(format!(
                "metadata version {version} is not supported (expected {MD_VERSION})"
            ));
        }
        let mut volume_id = [0u8; 16];
        volume_id.copy_from_slice(&b[16..32]);
        let sb = Self {
            version,
            flags: MdFlags::from_bits(get32(b, 12)),
            volume_id: VolumeId(volume_id),
            node_id: NodeId(get32(b, 32)),
            bitmap_granularity: get32(b, 36),
            data_size_bytes: get64(b, 40),
            md_size_bytes: get64(b, 48),
            generations: GenerationIds {
                current: get64(b, 56),
                bitmap: get64(b, 64),
                history: [get64(b, 72), get64(b, 80)],
            },
            epoch: Epoch(get64(b, 88)),
            primary_since_ms: get64(b, 96),
            cluster_log: ClusterLogId(get64(b, 128)),
            seq: get64(b, 104),
            al_extent_bytes: get64(b, 112),
            al_extents: get32(b, 120),
            al_slots: get32(b, 124),
        };
        sb.check()?;
        Ok(sb)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let g = self.bitmap_granularity;
        if !g.is_power_of_two() || g < 512 {
            return Err(format!(
                "bitmap granularity {g} is not a power of two >= 512"
            ));
        }
        if self.al_extents == 0 || self.al_extents > MAX_EXTENTS {
            return Err(format!(
                "activity log of {} extents is out of range 1..={MAX_EXTENTS}",
                self.al_extents
            ));
        }
        if self.al_slots == 0 || self.al_slots > 1024 {
            return Err(format!(
                "{} activity-log slots is out of range",
                self.al_slots
            ));
        }
        if self.al_extent_bytes < MD_BLOCK || !self.al_extent_bytes.is_power_of_two() {
            return Err(format!(
                "activity-log extent of {} bytes is not a power of two >= 4096",
                self.al_extent_bytes
            ));
        }
        if !self.data_size_bytes.is_multiple_of(512) {
            return Err(format!(
                "data size {} is not a multiple of 512",
                self.data_size_bytes
            ));
        }
        let expected = Layout::new(self.data_size_bytes, g, self.al_slots).md_size_bytes;
        if self.md_size_bytes != expected {
            return Err(format!(
                "metadata size {} does not match the layout ({expected})",
                self.md_size_bytes
            ));
        }
        Ok(())
    }
}

/// An activity-log transaction listing more extents than the log may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{extents} activity-log extents exceed the log's {capacity}")]
pub struct AlTooLarge {
    pub extents: usize,
    pub capacity: u32,
}

/// One on-disk activity-log transaction: `extents` (at most `capacity`, the superblock's
/// `al_extents`, and never more than fit a block) under sequence number `seq`, crc'd.
/// The simulator writes its transactions through this too, so it enforces the same limit.
pub fn encode_al_block(
    seq: u64,
    extents: &[u32],
    capacity: u32,
) -> std::result::Result<[u8; MD_BLOCK_USIZE], AlTooLarge> {
    let too_large = AlTooLarge {
        extents: extents.len(),
        capacity,
    };
    let count = u32::try_from(extents.len())
        .ok()
        .filter(|&c| c <= capacity.min(MAX_EXTENTS))
        .ok_or(too_large)?;
    let mut b = [0u8; MD_BLOCK_USIZE];
    put32(&mut b, 0, AL_MAGIC);
    put32(&mut b, 4, count);
    put64(&mut b, 8, seq);
    for (i, e) in extents.iter().enumerate() {
        put32(&mut b, 16 + 4 * i, *e);
    }
    let crc = crc32fast::hash(&b[..MD_BLOCK_USIZE - 4]);
    put32(&mut b, MD_BLOCK_USIZE - 4, crc);
    Ok(b)
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn get64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// Where each metadata structure lives, relative to the start of the metadata region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub md_size_bytes: u64,
    pub bitmap_blocks: u64,
    pub al_slots: u32,
}

impl Layout {
    /// The layout for `data_size` bytes of data.
    pub fn new(data_size: u64, granularity: u32, al_slots: u32) -> Self {
        let bits = data_size.div_ceil(u64::from(granularity.max(1)));
        let words = bits.div_ceil(64);
        let per_block = u64::try_from(WORDS_PER_BLOCK).expect("fits");
        let bitmap_blocks = words.div_ceil(per_block).max(1);
        Self {
            md_size_bytes: (bitmap_blocks + u64::from(al_slots) + 2) * MD_BLOCK,
            bitmap_blocks,
            al_slots,
        }
    }

    fn bitmap_block(&self, i: u64) -> u64 {
        i * MD_BLOCK
    }
    fn al_slot(&self, i: u64) -> u64 {
        (self.bitmap_blocks + i) * MD_BLOCK
    }
    fn superblock(&self, copy: u64) -> u64 {
        self.md_size_bytes - (2 - copy) * MD_BLOCK
    }
}

/// Parameters of `create-md`.
#[derive(Debug, Clone)]
pub struct CreateParams {
    pub volume_id: VolumeId,
    pub node_id: NodeId,
    /// Internal: metadata at the end of the backing device; external: a separate file that
    /// is created or extended to the metadata size.
    pub internal: bool,
    /// External metadata: the size of the data device.
    pub data_size_bytes: Option<u64>,
    pub bitmap_granularity: u32,
    pub al_extents: u32,
    pub al_extent_bytes: u64,
    pub al_slots: u32,
    /// The data area reads as zeros on every replica (a new sparse file or thin volume):
    /// start consistent at a generation derived from the volume id, the same on every
    /// replica, so no initial full sync runs (DRBD's `new-current-uuid --clear-bitmap`).
    pub zeroed: bool,
}

impl CreateParams {
    /// Defaults: internal, 4 KiB per bit, 257 extents of 4 MiB, 8 AL slots.
    pub fn new(volume_id: VolumeId, node_id: NodeId) -> Self {
        Self {
            volume_id,
            node_id,
            internal: true,
            data_size_bytes: None,
            bitmap_granularity: super::bitmap::DEFAULT_GRANULARITY,
            al_extents: super::activity_log::DEFAULT_EXTENTS,
            al_extent_bytes: super::activity_log::DEFAULT_EXTENT_BYTES,
            al_slots: DEFAULT_AL_SLOTS,
            zeroed: false,
        }
    }
}

/// The generation every replica of a zeroed volume starts at: derived from the volume id
/// alone, so separately created replicas agree, and never 0 ("no data yet").
pub fn zeroed_generation(volume_id: VolumeId) -> u64 {
    let [a, b] = [&volume_id.0[..8], &volume_id.0[8..]].map(|half| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(half);
        u64::from_be_bytes(bytes)
    });
    (a ^ b.rotate_left(17)) | 1
}

/// The result of loading the bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct BitmapLoad {
    /// Blocks whose checksum failed; loaded as all-dirty.
    pub bad_blocks: Vec<u64>,
}

/// What a metadata region lives on: a file or block device opened `O_DSYNC` (a write is
/// durable when it returns), or the simulator's device, which fails and tears writes the
/// way a disk does. Either way every byte goes through the encoders below.
pub trait MetadataDevice: std::fmt::Debug + Send {
    fn read_md_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()>;
    /// Durable when it returns `Ok`.
    fn write_md_at(&self, buf: &[u8], at: u64) -> std::io::Result<()>;
    fn size_bytes(&self) -> std::io::Result<u64>;
}

impl MetadataDevice for std::fs::File {
    fn read_md_at(&self, buf: &mut [u8], at: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, at)
    }
    fn write_md_at(&self, buf: &[u8], at: u64) -> std::io::Result<()> {
        FileExt::write_all_at(self, buf, at)
    }
    fn size_bytes(&self) -> std::io::Result<u64> {
        use std::io::{Seek, SeekFrom};
        let mut f = self;
        f.seek(SeekFrom::End(0))
    }
}

/// An open metadata region.
#[derive(Debug)]
pub struct MetadataFile<D: MetadataDevice = std::fs::File> {
    file: D,
    path: PathBuf,
    region_start: u64,
    layout: Layout,
    sb: Superblock,
    next_sb_copy: u64,
    al_seq: u64,
}

impl MetadataFile {
    fn open_file(path: &Path, create: bool) -> Result<std::fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .custom_flags(libc::O_DSYNC)
            .open(path)
            .map_err(|source| TandemError::ReadMetadata {
                path: path.to_owned(),
                source,
            })
    }

    /// Writes fresh metadata to `path` (the backing device when internal).
    ///
    /// The generation ids start at 0 ("no data yet") and the disk is Inconsistent — or,
    /// with [`CreateParams::zeroed`], Consistent at the volume's zeroed generation — the
    /// bitmap clear and the activity log empty.
    pub fn create(path: &Path, params: &CreateParams) -> Result<Self> {
        check_create_params(path, params)?;
        let file = Self::open_file(path, !params.internal)?;
        if !params.internal {
            let data = params.data_size_bytes.unwrap_or(0);
            let layout = Layout::new(data, params.bitmap_granularity, params.al_slots);
            file.set_len(layout.md_size_bytes)
                .map_err(|source| TandemError::WriteMetadata {
                    path: path.to_owned(),
                    source,
                })?;
        }
        MetadataFile::create_on(file, path, params)
    }

    /// Opens existing metadata: internal at the end of `path`, or an external file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = Self::open_file(path, false)?;
        MetadataFile::open_on(file, path)
    }
}

fn check_create_params(path: &Path, params: &CreateParams) -> Result<()> {
    let bad = |reason: String| TandemError::BadMetadata {
        path: path.to_owned(),
        reason,
    };
    let al_range = super::activity_log::EXTENTS;
    if !al_range.contains(&params.al_extents) {
        return Err(bad(format!(
            "an activity log of {} extents: must be {} to {}",
            params.al_extents,
            al_range.start(),
            al_range.end()
        )));
    }
    let g = params.bitmap_granularity;
    if !g.is_power_of_two() || g < 512 {
        return Err(bad(format!(
            "bitmap granularity {g} is not a power of two >= 512"
        )));
    }
    Ok(())
}

impl<D: MetadataDevice> MetadataFile<D> {
    fn device_size(file: &D, path: &Path) -> Result<u64> {
        file.size_bytes()
            .map_err(|source| TandemError::ReadMetadata {
                path: path.to_owned(),
                source,
            })
    }

    /// [`MetadataFile::create`] on a device (external metadata: already sized); `path`
    /// names it in errors.
    pub fn create_on(file: D, path: &Path, params: &CreateParams) -> Result<Self> {
        check_create_params(path, params)?;
        let bad = |reason: String| TandemError::BadMetadata {
            path: path.to_owned(),
            reason,
        };
        let g = params.bitmap_granularity;
        let (data_size, region_start, layout) = if params.internal {
            let dev = Self::device_size(&file, path)?;
            // The bitmap sized for the whole device is an upper bound for the data part.
            let upper = Layout::new(dev, g, params.al_slots);
            let data = dev.saturating_sub(upper.md_size_bytes) / MD_BLOCK * MD_BLOCK;
            if data < 1 << 20 {
                return Err(bad(format!(
                    "device of {dev} bytes is too small for data plus {} bytes of metadata",
                    upper.md_size_bytes
                )));
            }
            let layout = Layout::new(data, g, params.al_slots);
            (data, dev - layout.md_size_bytes, layout)
        } else {
            let data = params
                .data_size_bytes
                .ok_or_else(|| bad("external metadata needs the data device's size".into()))?;
            let layout = Layout::new(data, g, params.al_slots);
            let dev = Self::device_size(&file, path)?;
            if dev < layout.md_size_bytes {
                return Err(bad(format!(
                    "{dev} bytes cannot hold {} bytes of metadata",
                    layout.md_size_bytes
                )));
            }
            (data / 512 * 512, dev - layout.md_size_bytes, layout)
        };
        let sb = Superblock {
            version: MD_VERSION,
            flags: MdFlags {
                consistent: params.zeroed,
                ..MdFlags::default()
            },
            volume_id: params.volume_id,
            node_id: params.node_id,
            data_size_bytes: data_size,
            md_size_bytes: layout.md_size_bytes,
            bitmap_granularity: g,
            al_extent_bytes: params.al_extent_bytes,
            al_extents: params.al_extents,
            al_slots: params.al_slots,
            generations: GenerationIds {
                current: if params.zeroed {
                    zeroed_generation(params.volume_id)
                } else {
                    0
                },
                ..GenerationIds::default()
            },
            epoch: Epoch(0),
            primary_since_ms: 0,
            cluster_log: ClusterLogId::NONE,
            seq: 0,
        };
        sb.check().map_err(bad)?;
        let mut md = Self {
            file,
            path: path.to_owned(),
            region_start,
            layout,
            sb: sb.clone(),
            next_sb_copy: 0,
            al_seq: 0,
        };
        let mut bitmap = Bitmap::new(data_size, g);
        bitmap.mark_all_blocks_changed();
        let blocks = bitmap.take_changed_blocks();
        md.write_bitmap_blocks(&bitmap, &blocks)?;
        for slot in 0..u64::from(layout.al_slots) {
            md.write_block(layout.al_slot(slot), &[0u8; MD_BLOCK_USIZE])?;
        }
        md.write_al(&[])?;
        // Both copies, so neither slot holds stale metadata from an earlier create.
        md.write_superblock(&sb)?;
        md.write_superblock(&sb)?;
        Ok(md)
    }

    /// [`MetadataFile::open`] on a device; `path` names it in errors.
    pub fn open_on(file: D, path: &Path) -> Result<Self> {
        let dev = Self::device_size(&file, path)?;
        if dev < 2 * MD_BLOCK {
            return Err(TandemError::BadMetadata {
                path: path.to_owned(),
                reason: format!("{dev} bytes is too small to hold metadata"),
            });
        }
        let mut best: Option<(Superblock, u64)> = None;
        let mut reasons = Vec::new();
        for copy in 0..2u64 {
            let mut buf = [0u8; MD_BLOCK_USIZE];
            let at = dev - (2 - copy) * MD_BLOCK;
            MetadataDevice::read_md_at(&file, &mut buf, at).map_err(|source| {
                TandemError::ReadMetadata {
                    path: path.to_owned(),
                    source,
                }
            })?;
            match Superblock::decode(&buf) {
                Ok(sb) => {
                    if best.as_ref().is_none_or(|(b, _)| sb.seq > b.seq) {
                        best = Some((sb, copy));
                    }
                }
                Err(reason) => reasons.push(format!("copy {}: {reason}", copy + 1)),
            }
        }
        let Some((sb, copy)) = best else {
            return Err(TandemError::BadMetadata {
                path: path.to_owned(),
                reason: reasons.join("; "),
            });
        };
        if sb.md_size_bytes > dev {
            return Err(TandemError::BadMetadata {
                path: path.to_owned(),
                reason: format!(
                    "metadata size {} exceeds the device ({dev} bytes)",
                    sb.md_size_bytes
                ),
            });
        }
        let region_start = dev - sb.md_size_bytes;
        let layout = Layout::new(sb.data_size_bytes, sb.bitmap_granularity, sb.al_slots);
        let mut md = Self {
            file,
            path: path.to_owned(),
            region_start,
            layout,
            sb,
            next_sb_copy: 1 - copy,
            al_seq: 0,
        };
        md.al_seq = md.read_al()?.map_or(0, |(seq, _)| seq);
        Ok(md)
    }

    /// Is the metadata region inside the data device (internal)?
    pub fn is_internal_to(&self, data_size_of_device: u64) -> bool {
        self.region_start >= self.sb.data_size_bytes && self.region_start < data_size_of_device
    }

    /// Where the metadata region starts on its device.
    pub fn region_start(&self) -> u64 {
        self.region_start
    }

    /// The superblock in force.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The layout.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The path of the metadata device.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_block(&self, rel: u64, block: &[u8; MD_BLOCK_USIZE]) -> Result<()> {
        MetadataDevice::write_md_at(&self.file, block, self.region_start + rel).map_err(|source| {
            TandemError::WriteMetadata {
                path: self.path.clone(),
                source,
            }
        })
    }

    fn read_block(&self, rel: u64) -> Result<[u8; MD_BLOCK_USIZE]> {
        let mut buf = [0u8; MD_BLOCK_USIZE];
        MetadataDevice::read_md_at(&self.file, &mut buf, self.region_start + rel).map_err(
            |source| TandemError::ReadMetadata {
                path: self.path.clone(),
                source,
            },
        )?;
        Ok(buf)
    }

    /// Atomically replaces the superblock (identity and layout fields are kept).
    pub fn write_superblock(&mut self, sb: &Superblock) -> Result<()> {
        let mut next = sb.clone();
        next.version = MD_VERSION;
        next.volume_id = self.sb.volume_id;
        next.data_size_bytes = self.sb.data_size_bytes;
        next.md_size_bytes = self.sb.md_size_bytes;
        next.bitmap_granularity = self.sb.bitmap_granularity;
        next.al_slots = self.sb.al_slots;
        next.seq = self.sb.seq + 1;
        let block = next.encode();
        self.write_block(self.layout.superblock(self.next_sb_copy), &block)?;
        self.next_sb_copy = 1 - self.next_sb_copy;
        self.sb = next;
        Ok(())
    }

    /// Writes one activity-log transaction listing `extents` (the complete hot set), at
    /// most the superblock's `al_extents` of them.
    pub fn write_al(&mut self, extents: &[u32]) -> Result<()> {
        let seq = self.al_seq + 1;
        let b = encode_al_block(seq, extents, self.sb.al_extents).map_err(|e| {
            TandemError::BadMetadata {
                path: self.path.clone(),
                reason: e.to_string(),
            }
        })?;
        let slot = seq % u64::from(self.layout.al_slots);
        self.write_block(self.layout.al_slot(slot), &b)?;
        self.al_seq = seq;
        Ok(())
    }

    /// The newest valid activity-log transaction: its seq and extents.
    pub fn read_al(&self) -> Result<Option<(u64, Vec<u32>)>> {
        let mut best: Option<(u64, Vec<u32>)> = None;
        for slot in 0..u64::from(self.layout.al_slots) {
            let b = self.read_block(self.layout.al_slot(slot))?;
            if get32(&b, 0) != AL_MAGIC
                || get32(&b, MD_BLOCK_USIZE - 4) != crc32fast::hash(&b[..MD_BLOCK_USIZE - 4])
            {
                continue;
            }
            let count = get32(&b, 4);
            if count > MAX_EXTENTS {
                continue;
            }
            let seq = get64(&b, 8);
            if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                let n = usize::try_from(count).expect("fits");
                let extents = (0..n).map(|i| get32(&b, 16 + 4 * i)).collect();
                best = Some((seq, extents));
            }
        }
        Ok(best)
    }

    /// Writes the given on-disk bitmap blocks from `bitmap`.
    pub fn write_bitmap_blocks(&self, bitmap: &Bitmap, blocks: &[usize]) -> Result<()> {
        for &block in blocks {
            let idx = u64::try_from(block).expect("fits");
            if idx >= self.layout.bitmap_blocks {
                continue;
            }
            let b = bitmap_block(block, bitmap.block_words(block));
            self.write_block(self.layout.bitmap_block(idx), &b)?;
        }
        Ok(())
    }

    /// Writes one on-disk bitmap block from raw words (as the replication core hands
    /// them out in `PersistBitmap`).
    pub fn write_bitmap_words(&self, block: usize, words: &[u64]) -> Result<()> {
        let idx = u64::try_from(block).unwrap_or(u64::MAX);
        if idx >= self.layout.bitmap_blocks || words.len() > WORDS_PER_BLOCK {
            return Err(TandemError::BadMetadata {
                path: self.path.clone(),
                reason: format!(
                    "bitmap block {block} with {} words is out of range",
                    words.len()
                ),
            });
        }
        let b = bitmap_block(block, words);
        self.write_block(self.layout.bitmap_block(idx), &b)
    }

    /// Loads the on-disk bitmap into a new [`Bitmap`]; bad blocks come back all-dirty.
    pub fn read_bitmap(&self) -> Result<(Bitmap, BitmapLoad)> {
        let mut bitmap = Bitmap::new(self.sb.data_size_bytes, self.sb.bitmap_granularity);
        let mut words = Vec::with_capacity(bitmap.words().len());
        let mut load = BitmapLoad::default();
        for idx in 0..self.layout.bitmap_blocks {
            let b = self.read_block(self.layout.bitmap_block(idx))?;
            let ok = bitmap_block_is_valid(&b, idx);
            if !ok {
                load.bad_blocks.push(idx);
            }
            for i in 0..WORDS_PER_BLOCK {
                words.push(if ok {
                    get64(&b, BM_WORDS_AT + 8 * i)
                } else {
                    !0
                });
            }
        }
        bitmap.load_words(&words);
        bitmap.take_changed_blocks();
        if !load.bad_blocks.is_empty() {
            // Write the conservative all-dirty blocks back so they verify next time.
            for b in &load.bad_blocks {
                let blk = usize::try_from(*b).expect("fits");
                self.write_bitmap_blocks(&bitmap, &[blk])?;
            }
        }
        Ok((bitmap, load))
    }

    /// A description of everything on disk, for `tandemctl dump-md`.
    pub fn dump(&self) -> Result<MetadataDump> {
        let (bitmap, load) = self.read_bitmap()?;
        let al = self.read_al()?;
        Ok(MetadataDump {
            path: self.path.clone(),
            region_start: self.region_start,
            layout: self.layout,
            superblock: self.sb.clone(),
            activity_log_seq: al.as_ref().map_or(0, |(s, _)| *s),
            activity_log_extents: al.map(|(_, e)| e).unwrap_or_default(),
            bitmap_bits: bitmap.len_bits(),
            bitmap_set_bits: bitmap.count(),
            out_of_sync_bytes: bitmap.dirty_bytes().min(self.sb.data_size_bytes),
            bad_bitmap_blocks: load.bad_blocks,
        })
    }
}

/// What `dump-md` shows.
#[derive(Debug, Clone, Serialize)]
pub struct MetadataDump {
    pub path: PathBuf,
    pub region_start: u64,
    pub layout: Layout,
    pub superblock: Superblock,
    pub activity_log_seq: u64,
    pub activity_log_extents: Vec<u32>,
    pub bitmap_bits: u64,
    pub bitmap_set_bits: u64,
    pub out_of_sync_bytes: u64,
    pub bad_bitmap_blocks: Vec<u64>,
}

impl std::fmt::Display for MetadataDump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sb = &self.superblock;
        let g = &sb.generations;
        writeln!(
            f,
            "metadata        {} (region at byte {})",
            self.path.display(),
            self.region_start
        )?;
        writeln!(f, "version         {}", sb.version)?;
        writeln!(f, "volume id       {}", sb.volume_id)?;
        writeln!(f, "node id         {}", sb.node_id)?;
        writeln!(f, "data size       {} bytes", sb.data_size_bytes)?;
        writeln!(f, "metadata size   {} bytes", sb.md_size_bytes)?;
        writeln!(
            f,
            "generations     current {:016X}  bitmap {:016X}  history {:016X} {:016X}",
            g.current, g.bitmap, g.history[0], g.history[1]
        )?;
        writeln!(f, "epoch           {}", sb.epoch.0)?;
        writeln!(
            f,
            "cluster log     {}",
            if sb.cluster_log == ClusterLogId::NONE {
                "none".to_string()
            } else {
                sb.cluster_log.to_string()
            }
        )?;
        writeln!(
            f,
            "flags           consistent={} outdated={} was-primary={} primary-crashed={} \
             open={} cache-lost={}",
            sb.flags.consistent,
            sb.flags.outdated,
            sb.flags.was_primary,
            sb.flags.primary_crashed,
            sb.flags.open,
            sb.flags.cache_lost
        )?;
        writeln!(
            f,
            "bitmap          {} bits of {} bytes, {} set ({} bytes out of sync){}",
            self.bitmap_bits,
            sb.bitmap_granularity,
            self.bitmap_set_bits,
            self.out_of_sync_bytes,
            if self.bad_bitmap_blocks.is_empty() {
                String::new()
            } else {
                format!(", bad blocks {:?}", self.bad_bitmap_blocks)
            }
        )?;
        writeln!(
            f,
            "activity log    {} of {} extents of {} bytes hot (transaction {})",
            self.activity_log_extents.len(),
            sb.al_extents,
            sb.al_extent_bytes,
            self.activity_log_seq
        )?;
        write!(f, "update seq      {}", sb.seq)
    }
}

/// One on-disk bitmap block holding `words` (at most [`WORDS_PER_BLOCK`]).
fn bitmap_block(block: usize, words: &[u64]) -> [u8; MD_BLOCK_USIZE] {
    let mut b = [0u8; MD_BLOCK_USIZE];
    put32(&mut b, 0, BM_MAGIC);
    put32(&mut b, 4, u32::try_from(block).unwrap_or(u32::MAX));
    for (i, w) in words.iter().take(WORDS_PER_BLOCK).enumerate() {
        put64(&mut b, BM_WORDS_AT + 8 * i, *w);
    }
    let crc = crc32fast::hash(&b);
    put32(&mut b, BM_CRC_AT, crc);
    b
}

/// Is `b` an intact bitmap block number `idx` (magic, index and crc)?
fn bitmap_block_is_valid(b: &[u8; MD_BLOCK_USIZE], idx: u64) -> bool {
    let mut unsealed = *b;
    put32(&mut unsealed, BM_CRC_AT, 0);
    get32(b, 0) == BM_MAGIC
        && u64::from(get32(b, 4)) == idx
        && get32(b, BM_CRC_AT) == crc32fast::hash(&unsealed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn temp(name: &str, size: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tandem-md-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        path
    }

    #[test]
    fn internal_metadata_round_trips_and_updates_atomically() {
        let path = temp("internal", 64 << 20);
        let params = CreateParams::new(VolumeId::from_name("v"), NodeId(1));
        let mut md = MetadataFile::create(&path, &params).unwrap();
        let data = md.superblock().data_size_bytes;
        assert!(data < 64 << 20 && data > 60 << 20);
        assert_eq!(
            data + md.superblock().md_size_bytes,
            md.region_start() + md.superblock().md_size_bytes
        );
        let mut sb = md.superblock().clone();
        sb.generations.current = 0xabc;
        sb.flags.consistent = true;
        md.write_superblock(&sb).unwrap();
        md.write_al(&[3, 5, 7]).unwrap();
        let (mut bitmap, _) = md.read_bitmap().unwrap();
        bitmap.set_range(10 << 20, 8192);
        let blocks = bitmap.take_changed_blocks();
        md.write_bitmap_blocks(&bitmap, &blocks).unwrap();
        drop(md);

        let md = MetadataFile::open(&path).unwrap();
        assert_eq!(md.superblock().generations.current, 0xabc);
        assert!(md.superblock().flags.consistent);
        assert_eq!(md.read_al().unwrap().unwrap().1, vec![3, 5, 7]);
        let (bitmap, load) = md.read_bitmap().unwrap();
        assert!(load.bad_blocks.is_empty());
        assert_eq!(bitmap.count(), 2);
        let dump = md.dump().unwrap();
        assert!(dump.to_string().contains("0000000000000ABC"));

        // A torn write of the newest superblock copy leaves the previous one in force.
        let newest_copy_at = md.region_start() + md.layout().superblock(1 - md.next_sb_copy);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 100], newest_copy_at + 40).unwrap();
        let md2 = MetadataFile::open(&path).unwrap();
        assert_eq!(md2.superblock().seq, md.superblock().seq - 1);
    }

    /// Hole: the block's crc was stored over the upper half of its last bitmap word, so
    /// dirty bits there were lost (and the crc's own bits read back as dirty ones).
    #[test]
    fn every_bit_of_every_bitmap_block_round_trips() {
        let path = temp("bitmap-words", 256 << 20);
        let md = MetadataFile::create(
            &path,
            &CreateParams::new(VolumeId::from_name("v"), NodeId(1)),
        )
        .unwrap();
        let (mut bitmap, _) = md.read_bitmap().unwrap();
        assert_eq!(bitmap.count(), 0, "fresh metadata has no dirty bits");
        let per_block = u64::try_from(WORDS_PER_BLOCK * 64).unwrap();
        let granularity = u64::from(md.superblock().bitmap_granularity);
        // The first and last bit of every word of block 0 and 1, the upper half included.
        let mut want = Vec::new();
        for block in 0..2u64 {
            for word in 0..u64::try_from(WORDS_PER_BLOCK).unwrap() {
                for bit in [0, 31, 32, 63] {
                    want.push(block * per_block + word * 64 + bit);
                }
            }
        }
        for &bit in &want {
            bitmap.set_range(bit * granularity, granularity);
        }
        let blocks = bitmap.take_changed_blocks();
        md.write_bitmap_blocks(&bitmap, &blocks).unwrap();
        let (loaded, load) = md.read_bitmap().unwrap();
        assert!(load.bad_blocks.is_empty());
        let lost: Vec<u64> = want
            .iter()
            .copied()
            .filter(|&b| !loaded.is_set(b))
            .collect();
        assert!(lost.is_empty(), "dirty bits lost on disk: {lost:?}");
        assert_eq!(loaded.count(), bitmap.count(), "bits that were never set");
        // The raw-words writer (the replication core's PersistBitmap) agrees.
        md.write_bitmap_words(1, loaded.block_words(1)).unwrap();
        let (again, _) = md.read_bitmap().unwrap();
        assert_eq!(again, loaded);
    }

    #[test]
    fn zeroed_replicas_start_consistent_at_one_generation_of_their_volume() {
        let create = |name: &str, volume: &str, node: u32, zeroed: bool| {
            let mut params = CreateParams::new(VolumeId::from_name(volume), NodeId(node));
            params.zeroed = zeroed;
            MetadataFile::create(&temp(name, 8 << 20), &params)
                .unwrap()
                .superblock()
                .clone()
        };
        let a = create("zeroed-a", "vol", 1, true);
        let b = create("zeroed-b", "vol", 2, true);
        assert!(a.flags.consistent && b.flags.consistent);
        assert_ne!(a.generations.current, 0);
        assert_eq!(a.generations, b.generations, "no initial sync between them");
        let other = create("zeroed-other", "other", 2, true);
        assert_ne!(other.generations.current, a.generations.current);
        let fresh = create("not-zeroed", "vol", 2, false);
        assert!(!fresh.flags.consistent);
        assert_eq!(fresh.generations.current, 0, "a full initial sync decides");
    }

    #[test]
    fn garbage_is_refused_with_a_reason_and_bad_bitmap_blocks_load_dirty() {
        let path = temp("garbage", 8 << 20);
        let err = MetadataFile::open(&path).unwrap_err().to_string();
        assert!(err.contains("wrong magic"), "{err}");

        let ext = temp("external.md", 0);
        let mut params = CreateParams::new(VolumeId::from_name("v"), NodeId(2));
        params.internal = false;
        params.data_size_bytes = Some(32 << 20);
        let md = MetadataFile::create(&ext, &params).unwrap();
        assert_eq!(md.region_start(), 0);
        let f = std::fs::OpenOptions::new().write(true).open(&ext).unwrap();
        f.write_all_at(&[0x55; 64], 100).unwrap();
        let md = MetadataFile::open(&ext).unwrap();
        let (bitmap, load) = md.read_bitmap().unwrap();
        assert_eq!(load.bad_blocks, vec![0]);
        assert_eq!(
            bitmap.count(),
            bitmap.len_bits(),
            "a bad block loads as all dirty"
        );

        let too_small = temp("small", 100 << 10);
        let err = MetadataFile::create(
            &too_small,
            &CreateParams::new(VolumeId::default(), NodeId(1)),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("too small"), "{err}");
    }

    proptest! {
        #[test]
        fn superblock_codec_round_trips_and_detects_any_flip(
            current: u64, bitmap: u64, h0: u64, epoch: u64, seq: u64, node: u32, flags in 0u32..64,
            flip in 0usize..4092, log: u64,
        ) {
            let data = 1u64 << 30;
            let sb = Superblock {
                version: MD_VERSION,
                flags: MdFlags::from_bits(flags),
                volume_id: VolumeId::from_name("p"),
                node_id: NodeId(node),
                data_size_bytes: data,
                md_size_bytes: Layout::new(data, 4096, 8).md_size_bytes,
                bitmap_granularity: 4096,
                al_extent_bytes: 4 << 20,
                al_extents: 257,
                al_slots: 8,
                generations: GenerationIds { current, bitmap, history: [h0, 1] },
                epoch: Epoch(epoch),
                primary_since_ms: 5,
                cluster_log: ClusterLogId(log),
                seq,
            };
            let mut block = sb.encode();
            prop_assert_eq!(Superblock::decode(&block).unwrap(), sb);
            block[flip] ^= 1;
            prop_assert!(Superblock::decode(&block).is_err());
        }
    }
}
