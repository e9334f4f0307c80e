//! The unsafe corner of the store: page-aligned buffers for O_DIRECT and an io_uring whose
//! in-flight table owns every buffer until the kernel has posted the operation's CQE.
//!
//! Why unsafe is needed here: `io_uring::SubmissionQueue::push` is an `unsafe fn` because
//! the kernel reads and writes the memory an SQE points to until its completion; Rust cannot
//! see that lifetime. [`Ring`] keeps the promise structurally: a buffer handed to
//! [`Ring::push`] moves into the in-flight table and only comes back out of [`Ring::reap`]
//! together with its CQE; dropping a `Ring` first waits for every in-flight operation.
//! [`AlignedBuf`] needs `std::alloc` with a 4 KiB alignment, which `Vec` cannot express.
#![allow(unsafe_code)]

use io_uring::{IoUring, opcode, squeue, types};
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::os::fd::RawFd;
use std::ptr::NonNull;
use std::sync::Arc;

/// Memory alignment of every data buffer: enough for O_DIRECT on any logical block size.
pub const BUF_ALIGN: usize = 4096;

/// An initialised heap buffer aligned to [`BUF_ALIGN`], usable for O_DIRECT I/O.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Vec<u8>); moving it to another
// thread moves that ownership, and &AlignedBuf only gives shared read access.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only read the bytes; mutation needs &mut AlignedBuf.
unsafe impl Sync for AlignedBuf {}

/// Buffers at least this big are recycled: below it malloc's bins are cheap, above it
/// every fresh allocation is an mmap whose pages fault in (and are zeroed) one by one —
/// at 1 MiB writes that was a fifth of the daemon's CPU time.
const POOL_MIN_BYTES: usize = 64 << 10;
/// Most bytes kept in the pool (beyond it, dropped buffers go back to the allocator).
const POOL_MAX_BYTES: usize = 64 << 20;

/// An allocation parked in the pool.
struct Parked(NonNull<u8>);

// SAFETY: a parked allocation is owned by the pool alone (no other pointer to it exists
// once its AlignedBuf was dropped), so moving it between threads moves that ownership.
unsafe impl Send for Parked {}

/// Recycled allocations by size (each of layout `size`, [`BUF_ALIGN`]). Every byte of a
/// parked allocation is initialised: buffers are born zeroed and only ever written.
#[derive(Default)]
struct Pool {
    by_size: std::collections::HashMap<usize, Vec<Parked>>,
    bytes: usize,
}

static POOL: std::sync::Mutex<Option<Pool>> = std::sync::Mutex::new(None);

fn pool() -> std::sync::MutexGuard<'static, Option<Pool>> {
    // The pool holds plain pointers and a counter: a panic elsewhere cannot break it.
    POOL.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` may be 0).
    pub fn zeroed(len: usize) -> Self {
        let mut buf = Self::for_overwrite(len);
        if buf.recycled() {
            buf.fill(0);
        }
        buf
    }

    /// A buffer of `len` bytes whose contents are unspecified (zeroes or bytes of an
    /// earlier buffer): for reads that fill it completely. Big buffers are recycled.
    pub fn for_overwrite(len: usize) -> Self {
        // Round the allocation up to the alignment so a zero-length buffer is still valid.
        let cap = len.div_ceil(BUF_ALIGN).max(1) * BUF_ALIGN;
        let layout = Layout::from_size_align(cap, BUF_ALIGN)
            .expect("a rounded-up size with a power-of-two alignment is a valid layout");
        if cap >= POOL_MIN_BYTES
            && let Some(pool) = pool().as_mut()
            && let Some(Parked(ptr)) = pool.by_size.get_mut(&cap).and_then(Vec::pop)
        {
            pool.bytes -= cap;
            return Self { ptr, len, layout };
        }
        // SAFETY: layout has a non-zero size (cap >= BUF_ALIGN).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        Self { ptr, len, layout }
    }

    /// Could this buffer have come from the pool (and so hold old bytes)?
    fn recycled(&self) -> bool {
        self.layout.size() >= POOL_MIN_BYTES
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_from(data: &[u8]) -> Self {
        let mut buf = Self::for_overwrite(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Is it empty?
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shortens the buffer to `len` bytes (no-op when already shorter).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to an allocation of layout.size() >= len initialised bytes
        // (zeroed at birth, only written since, also while parked in the pool) that
        // lives as long as self; &self prevents concurrent mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let size = self.layout.size();
        if self.recycled() {
            let mut guard = pool();
            let pool = guard.get_or_insert_with(Pool::default);
            if pool.bytes + size <= POOL_MAX_BYTES {
                pool.bytes += size;
                pool.by_size.entry(size).or_default().push(Parked(self.ptr));
                return;
            }
        }
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once
        // (a parked allocation is never freed: it lives on in a later buffer).
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

impl Clone for AlignedBuf {
    fn clone(&self) -> Self {
        Self::copy_from(self)
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

/// A write buffer shared between the local write and the send to the peer.
pub type DataBuf = Arc<AlignedBuf>;

/// One operation on the ring, owning whatever memory the kernel will touch.
#[derive(Debug)]
pub enum RingOp {
    Read {
        fd: RawFd,
        offset: u64,
        buf: AlignedBuf,
    },
    Write {
        fd: RawFd,
        offset: u64,
        buf: DataBuf,
        dsync: bool,
    },
    /// fdatasync.
    DataSync { fd: RawFd },
    Fallocate {
        fd: RawFd,
        offset: u64,
        len: u64,
        mode: i32,
    },
    /// An 8-byte read of an eventfd: the ring's doorbell.
    EventFdRead { fd: RawFd, buf: Box<[u8; 8]> },
}

/// A finished operation: its token, the kernel's result (bytes or -errno) and the
/// operation with its buffers handed back.
#[derive(Debug)]
pub struct RingCompletion {
    pub token: u64,
    pub result: i32,
    pub op: RingOp,
}

/// An io_uring with an in-flight table that owns each operation's buffers until its CQE.
///
/// Drop order: `Drop` first waits for every in-flight operation, then the fields drop —
/// `ring` (unmaps the queues and closes the fd) before `inflight` (frees the buffers).
pub struct Ring {
    ring: IoUring,
    inflight: Vec<Option<(u64, RingOp)>>,
    free: Vec<usize>,
    count: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.count)
            .finish()
    }
}

impl Ring {
    /// A ring with `entries` submission slots.
    pub fn new(entries: u32) -> std::io::Result<Self> {
        let ring = IoUring::builder()
            .setup_cqsize(entries.saturating_mul(2))
            .build(entries)?;
        Ok(Self {
            ring,
            inflight: Vec::new(),
            free: Vec::new(),
            count: 0,
        })
    }

    /// Operations submitted and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.count
    }

    /// Queues `op` (not yet submitted to the kernel: see [`Ring::submit_and_wait`]).
    pub fn push(&mut self, token: u64, op: RingOp) -> std::io::Result<()> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.inflight.push(None);
                self.inflight.len() - 1
            }
        };
        let user_data = u64::try_from(slot).expect("slot index fits u64");
        // The table owns the op from here on; the SQE points into memory the table keeps.
        self.inflight[slot] = Some((token, op));
        let entry = match &mut self.inflight[slot] {
            Some((_, op)) => build_entry(op)?,
            None => unreachable!("slot was just filled"),
        }
        .user_data(user_data);
        loop {
            // SAFETY: the SQE points only into memory owned by inflight[slot] (a heap
            // buffer of AlignedBuf/Arc/Box, whose address does not change when the table
            // Vec reallocates) or into nothing; that entry is removed only in reap(), after
            // the kernel posted this user_data's CQE, and Drop waits for all CQEs first.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // Submission queue full: hand the queued SQEs to the kernel and retry.
            if let Err(e) = self.ring.submit() {
                self.inflight[slot] = None;
                self.free.push(slot);
                return Err(e);
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Submits queued SQEs and waits for at least `want` completions.
    pub fn submit_and_wait(&mut self, want: usize) -> std::io::Result<usize> {
        match self.ring.submit_and_wait(want) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => Ok(0),
            other => other,
        }
    }

    /// Takes every posted completion, handing back each operation's buffers.
    pub fn reap(&mut self) -> Vec<RingCompletion> {
        let mut out = Vec::new();
        let cqes: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in cqes {
            let Ok(slot) = usize::try_from(user_data) else {
                continue;
            };
            if let Some((token, op)) = self.inflight.get_mut(slot).and_then(Option::take) {
                self.free.push(slot);
                self.count -= 1;
                out.push(RingCompletion { token, result, op });
            }
        }
        out
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel may still use in-flight buffers: wait for every CQE before the table
        // (and the buffers in it) is freed.
        while self.count > 0 {
            if self.submit_and_wait(1).is_err() {
                // Cannot wait any more: leak the buffers rather than free memory the
                // kernel may still write.
                std::mem::forget(std::mem::take(&mut self.inflight));
                return;
            }
            drop(self.reap());
        }
    }
}

fn build_entry(op: &mut RingOp) -> std::io::Result<squeue::Entry> {
    let too_big = || std::io::Error::new(std::io::ErrorKind::InvalidInput, "I/O larger than 4 GiB");
    Ok(match op {
        RingOp::Read { fd, offset, buf } => {
            let len = u32::try_from(buf.len()).map_err(|_| too_big())?;
            opcode::Read::new(types::Fd(*fd), buf.as_mut_ptr(), len)
                .offset(*offset)
                .build()
        }
        RingOp::Write {
            fd,
            offset,
            buf,
            dsync,
        } => {
            let len = u32::try_from(buf.len()).map_err(|_| too_big())?;
            opcode::Write::new(types::Fd(*fd), buf.as_ptr(), len)
                .offset(*offset)
                .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                .build()
        }
        RingOp::DataSync { fd } => opcode::Fsync::new(types::Fd(*fd))
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
        RingOp::Fallocate {
            fd,
            offset,
            len,
            mode,
        } => opcode::Fallocate::new(types::Fd(*fd), *len)
            .offset(*offset)
            .mode(*mode)
            .build(),
        RingOp::EventFdRead { fd, buf } => {
            opcode::Read::new(types::Fd(*fd), buf.as_mut_ptr(), 8).build()
        }
    })
}

/// The logical block size of a block device (BLKSSZGET), or `None` for other files.
pub fn logical_block_size(file: &std::fs::File) -> Option<u32> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata().ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one c_int through the pointer, which points to a live local;
    // the fd is open for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &mut size) };
    if rc == 0 {
        u32::try_from(size).ok()
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned_zeroed_and_sized() {
        for len in [0, 1, 512, 4096, 4097, 1 << 20] {
            let buf = AlignedBuf::zeroed(len);
            assert_eq!(buf.len(), len);
            assert_eq!(buf.as_ptr() as usize % BUF_ALIGN, 0);
            assert!(buf.iter().all(|&b| b == 0));
        }
        let copy = AlignedBuf::copy_from(b"hello");
        assert_eq!(&copy[..], b"hello");
        assert_eq!(copy.clone(), copy);
    }

    #[test]
    fn ring_reads_back_what_it_wrote_and_returns_buffers() {
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("tandem-ring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(8192).unwrap();
        let mut ring = Ring::new(8).unwrap();
        let fd = file.as_raw_fd();
        let data = Arc::new(AlignedBuf::copy_from(&[7u8; 4096]));
        ring.push(
            1,
            RingOp::Write {
                fd,
                offset: 4096,
                buf: data,
                dsync: true,
            },
        )
        .unwrap();
        ring.submit_and_wait(1).unwrap();
        let done = ring.reap();
        assert_eq!(done.len(), 1);
        assert_eq!((done[0].token, done[0].result), (1, 4096));
        ring.push(
            2,
            RingOp::Read {
                fd,
                offset: 4096,
                buf: AlignedBuf::zeroed(4096),
            },
        )
        .unwrap();
        ring.submit_and_wait(1).unwrap();
        let done = ring.reap();
        match &done[0].op {
            RingOp::Read { buf, .. } => assert!(buf.iter().all(|&b| b == 7)),
            other => panic!("unexpected op {other:?}"),
        }
        assert_eq!(ring.in_flight(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn recycled_buffers_come_back_zeroed_when_asked_and_the_pool_is_bounded() {
        let size = 3 * POOL_MIN_BYTES;
        let mut dirty = AlignedBuf::for_overwrite(size);
        dirty.fill(0xa5);
        let addr = dirty.as_ptr();
        drop(dirty);
        // Other tests share the pool: take until this allocation comes back (or give up:
        // then it went to another test's buffer, which is fine too).
        let mut taken = Vec::new();
        for _ in 0..64 {
            let b = AlignedBuf::zeroed(size - 100);
            assert_eq!(b.len(), size - 100);
            assert!(
                b.iter().all(|&x| x == 0),
                "a recycled buffer was not zeroed"
            );
            assert_eq!(b.as_ptr().align_offset(BUF_ALIGN), 0);
            let found = b.as_ptr() == addr;
            taken.push(b);
            if found {
                break;
            }
        }
        drop(taken);
        // Dropping far more than the cap leaves the pool within it.
        let many: Vec<_> = (0..(POOL_MAX_BYTES / size) + 8)
            .map(|_| AlignedBuf::for_overwrite(size))
            .collect();
        drop(many);
        let bytes = pool().as_ref().map_or(0, |p| p.bytes);
        assert!(bytes <= POOL_MAX_BYTES, "pool holds {bytes} bytes");
        // Small buffers are never parked.
        let small = AlignedBuf::zeroed(4096);
        assert!(!small.recycled());
    }
}
