//! The backing store: data I/O on a file or block device, and the on-disk metadata.
//!
//! [`BlockStore`] is the seam: a request goes in with a completion callback and comes back
//! once the kernel has finished it. Two implementations pass the same trait suite
//! (`store::suite`): [`UringStore`] (O_DIRECT, one io_uring per I/O thread, batched
//! submissions, FLUSH = fdatasync on the ring, FUA = `RWF_DSYNC`) and [`SyncStore`]
//! (positioned reads and writes on a worker thread; portable and simple).
//!
//! ```text
//!  submit(op, done) ──► channel ──► I/O thread: push SQEs (batch) ─► io_uring ─► CQE
//!                                                                     │
//!  done(IoDone) ◄──────────────────────── in-flight table hands buffers back
//! ```
//!
//! An I/O error is returned to the caller as a [`TandemError`] whose
//! [`is_backing_failure`](TandemError::is_backing_failure) is true; the volume detaches
//! the disk on it. Nothing here panics on a failing device.

pub mod activity_log;
pub mod bitmap;
pub mod metadata;
mod sync;
pub(crate) mod sys;
mod uring;

#[cfg(test)]
mod suite;

pub use sync::SyncStore;
pub use sys::{AlignedBuf, DataBuf};
pub use uring::UringStore;

use crate::error::{Result, TandemError};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Granularity every data request must respect (offsets and lengths).
pub const SECTOR_BYTES: u64 = 512;

/// A data operation on the backing store.
#[derive(Debug)]
pub enum IoOp {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read { offset: u64, buf: AlignedBuf },
    /// Write `buf` at `offset`; `fua` makes it durable before completion.
    Write {
        offset: u64,
        buf: DataBuf,
        fua: bool,
    },
    /// Make every completed write durable (fdatasync).
    Flush,
    /// Deallocate a range (reads return zeroes afterwards).
    Discard { offset: u64, len_bytes: u64 },
    /// Zero a range.
    WriteZeroes { offset: u64, len_bytes: u64 },
}

impl IoOp {
    /// The byte range the op touches, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            IoOp::Read { offset, buf } => Some((*offset, len_u64(buf.len()))),
            IoOp::Write { offset, buf, .. } => Some((*offset, len_u64(buf.len()))),
            IoOp::Discard { offset, len_bytes } | IoOp::WriteZeroes { offset, len_bytes } => {
                Some((*offset, *len_bytes))
            }
            IoOp::Flush => None,
        }
    }
}

pub(crate) fn len_u64(len: usize) -> u64 {
    u64::try_from(len).expect("usize fits u64 on supported targets")
}

/// The outcome of an [`IoOp`]: the result and, for reads, the filled buffer.
#[derive(Debug)]
pub struct IoDone {
    pub result: Result<()>,
    pub buf: Option<AlignedBuf>,
}

/// Called exactly once when an operation has finished.
pub type Completion = Box<dyn FnOnce(IoDone) + Send>;

/// A backing store for a volume's data.
pub trait BlockStore: Send + Sync + std::fmt::Debug {
    /// Size of the store in bytes.
    fn size_bytes(&self) -> u64;
    /// Smallest I/O unit the store accepts (offset and length alignment).
    fn block_bytes(&self) -> u32;
    /// Submits `op`; `done` runs once it finished (on the store's I/O thread).
    fn submit(&self, op: IoOp, done: Completion);
}

/// Checks that `op` lies inside a store of `size` bytes and is aligned to `block` bytes.
pub fn validate(op: &IoOp, size: u64, block: u32) -> Result<()> {
    let Some((offset, len)) = op.range() else {
        return Ok(());
    };
    let block = u64::from(block);
    if offset % block != 0 || len % block != 0 {
        return Err(TandemError::InvalidRequest(format!(
            "offset {offset} or length {len} is not a multiple of {block} bytes"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(TandemError::InvalidRequest(format!(
            "range {offset}+{len} ends beyond the store size {size}"
        ))),
    }
}

/// Wraps an errno from a failed op into the matching [`TandemError`].
pub(crate) fn op_error(op: &IoOp, source: std::io::Error) -> TandemError {
    match op {
        IoOp::Read { offset, buf } => TandemError::ReadData {
            offset: *offset,
            len_bytes: len_u64(buf.len()),
            source,
        },
        IoOp::Write { offset, buf, .. } => TandemError::WriteData {
            offset: *offset,
            len_bytes: len_u64(buf.len()),
            source,
        },
        IoOp::Flush => TandemError::FlushData { source },
        IoOp::Discard { offset, len_bytes } | IoOp::WriteZeroes { offset, len_bytes } => {
            TandemError::Deallocate {
                offset: *offset,
                len_bytes: *len_bytes,
                source,
            }
        }
    }
}

/// Async conveniences over any [`BlockStore`].
pub trait BlockStoreExt {
    /// Runs `op` and waits for it.
    fn run(&self, op: IoOp) -> impl Future<Output = IoDone> + Send;
}

impl<S: BlockStore + ?Sized> BlockStoreExt for S {
    fn run(&self, op: IoOp) -> impl Future<Output = IoDone> + Send {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            op,
            Box::new(move |done| {
                let _ = tx.send(done);
            }),
        );
        async move {
            rx.await.unwrap_or(IoDone {
                result: Err(TandemError::StoreClosed),
                buf: None,
            })
        }
    }
}

/// Runs `op` on `store` and blocks the calling (non-async) thread until it finished.
pub fn run_blocking(store: &dyn BlockStore, op: IoOp) -> IoDone {
    let (tx, rx) = std::sync::mpsc::channel();
    store.submit(
        op,
        Box::new(move |done| {
            let _ = tx.send(done);
        }),
    );
    rx.recv().unwrap_or(IoDone {
        result: Err(TandemError::StoreClosed),
        buf: None,
    })
}

/// Which store implementation to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// io_uring with O_DIRECT (the default).
    #[default]
    Uring,
    /// Positioned reads and writes on a worker thread (buffered unless `direct`).
    Sync,
}

/// How to open a backing store.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub engine: Engine,
    /// Open with O_DIRECT (falls back to buffered I/O where the filesystem refuses it).
    pub direct: bool,
    /// Only the first `limit_bytes` bytes are data (the rest holds internal metadata).
    pub limit_bytes: Option<u64>,
}

impl StoreConfig {
    /// io_uring + O_DIRECT on `path`.
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            engine: Engine::Uring,
            direct: true,
            limit_bytes: None,
        }
    }
}

/// Opens the backing store described by `config`.
pub fn open(config: &StoreConfig) -> Result<Arc<dyn BlockStore>> {
    Ok(match config.engine {
        Engine::Uring => Arc::new(UringStore::open(config)?),
        Engine::Sync => Arc::new(SyncStore::open(config)?),
    })
}

/// Opens `path` read-write, with O_DIRECT when asked and supported; returns the file,
/// whether O_DIRECT is in effect, and the size in bytes.
pub(crate) fn open_file(path: &Path, direct: bool) -> Result<(std::fs::File, bool, u64)> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::OpenOptionsExt;
    let open = |flags: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(flags)
            .open(path)
    };
    let (mut file, is_direct) = if direct {
        match open(libc::O_DIRECT) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::warn!(path = %path.display(), "O_DIRECT not supported here; using buffered I/O");
                (
                    open(0).map_err(|source| TandemError::OpenBacking {
                        path: path.to_owned(),
                        source,
                    })?,
                    false,
                )
            }
            Err(source) => {
                return Err(TandemError::OpenBacking {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    } else {
        (
            open(0).map_err(|source| TandemError::OpenBacking {
                path: path.to_owned(),
                source,
            })?,
            false,
        )
    };
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|source| TandemError::OpenBacking {
            path: path.to_owned(),
            source,
        })?;
    Ok((file, is_direct, size))
}

/// Zeroes a range when the fast path (`FALLOC_FL_ZERO_RANGE`, or punching a hole) is
/// not supported by the filesystem (tmpfs has no ZERO_RANGE, some have neither): punch a
/// hole if possible, else write zeroes. Discard and write-zeroes both end here so both
/// replicas read back the same zeroes.
pub(crate) fn zero_range_fallback(
    file: &std::fs::File,
    offset: u64,
    len: u64,
) -> std::io::Result<()> {
    use nix::fcntl::{FallocateFlags, fallocate};
    use std::os::unix::fs::FileExt;
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    };
    let punch = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
    match fallocate(file, punch, off, l) {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e.into()),
    }
    let zeroes = AlignedBuf::zeroed(1 << 20);
    let mut at = offset;
    let end = offset.saturating_add(len);
    while at < end {
        let n = usize::try_from((end - at).min(1 << 20)).unwrap_or(1 << 20);
        file.write_all_at(&zeroes[..n], at)?;
        at += len_u64(n);
    }
    Ok(())
}

/// Is this errno "the filesystem does not do that fallocate mode"?
pub(crate) fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL))
}

/// The block size requests must respect on `file`.
pub(crate) fn block_size_of(file: &std::fs::File) -> u32 {
    sys::logical_block_size(file)
        .unwrap_or(512)
        .max(u32::try_from(SECTOR_BYTES).expect("512 fits u32"))
}
