//! [`UringStore`]: O_DIRECT data I/O through io_uring, one ring per I/O thread.
//!
//! Each I/O thread owns a [`Ring`](super::sys::Ring). Requests arrive on a channel and an
//! eventfd "doorbell" whose read is kept armed on the ring, so the thread sleeps in a single
//! `io_uring_enter` for both new requests and completions. Every wake-up drains all queued
//! requests into SQEs and submits them in one call (batching under load, one syscall per
//! request at QD1). FLUSH is `IORING_OP_FSYNC` with DATASYNC; FUA is a write with
//! `RWF_DSYNC`. Discard and write-zeroes are `IORING_OP_FALLOCATE`.

use super::sys::{Ring, RingCompletion, RingOp};
use super::{BlockStore, Completion, IoDone, IoOp, StoreConfig, block_size_of, op_error};
use crate::error::{Result, TandemError};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};

/// Submission-queue depth of each ring.
const RING_ENTRIES: u32 = 256;
/// In-flight operations per ring before the thread stops taking new requests.
const MAX_IN_FLIGHT: usize = 240;
/// Token of the doorbell read.
const DOORBELL: u64 = u64::MAX;

enum Msg {
    Op(IoOp, Completion),
    Stop,
}

struct Worker {
    tx: mpsc::Sender<Msg>,
    doorbell: Arc<EventFd>,
    /// Set by the I/O thread just before it sleeps: only then does a submitter ring.
    sleeping: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// An io_uring-backed store.
pub struct UringStore {
    workers: Vec<Worker>,
    next: AtomicUsize,
    size: u64,
    block: u32,
    direct: bool,
    // Keeps the fd open for the I/O threads (they use its raw fd).
    _file: Arc<std::fs::File>,
}

impl std::fmt::Debug for UringStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringStore")
            .field("size", &self.size)
            .field("threads", &self.workers.len())
            .field("direct", &self.direct)
            .finish()
    }
}

impl UringStore {
    /// Opens the store with one I/O thread.
    pub fn open(config: &StoreConfig) -> Result<Self> {
        Self::open_with_threads(config, 1)
    }

    /// Opens the store with `threads` I/O threads (each with its own ring).
    pub fn open_with_threads(config: &StoreConfig, threads: usize) -> Result<Self> {
        let (file, direct, file_size) = super::open_file(&config.path, config.direct)?;
        let size = config.limit_bytes.unwrap_or(file_size).min(file_size);
        let block = block_size_of(&file);
        let file = Arc::new(file);
        let mut workers = Vec::new();
        for index in 0..threads.max(1) {
            let ring = Ring::new(RING_ENTRIES).map_err(|source| TandemError::SetupRing {
                what: config.path.display().to_string(),
                source,
            })?;
            let doorbell = Arc::new(
                EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).map_err(|e| {
                    TandemError::SetupRing {
                        what: "eventfd".into(),
                        source: e.into(),
                    }
                })?,
            );
            let (tx, rx) = mpsc::channel();
            let file = Arc::clone(&file);
            let bell = Arc::clone(&doorbell);
            let sleeping = Arc::new(AtomicBool::new(false));
            let asleep = Arc::clone(&sleeping);
            let thread = std::thread::Builder::new()
                .name(format!("tandem-uring-{index}"))
                .spawn(move || run(ring, &file, &bell, &asleep, &rx))
                .map_err(TandemError::io("starting an io_uring I/O thread"))?;
            workers.push(Worker {
                tx,
                doorbell,
                sleeping,
                thread: Some(thread),
            });
        }
        Ok(Self {
            workers,
            next: AtomicUsize::new(0),
            size,
            block,
            direct,
            _file: file,
        })
    }

    /// Is O_DIRECT in effect?
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

impl BlockStore for UringStore {
    fn size_bytes(&self) -> u64 {
        self.size
    }

    fn block_bytes(&self) -> u32 {
        self.block
    }

    fn submit(&self, op: IoOp, done: Completion) {
        if let Err(e) = super::validate(&op, self.size, self.block) {
            done(IoDone {
                result: Err(e),
                buf: None,
            });
            return;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        let worker = &self.workers[index];
        match worker.tx.send(Msg::Op(op, done)) {
            Ok(()) => {
                // Ring only if the thread sleeps (or is about to): a busy thread drains
                // the channel after its next completion anyway. SeqCst pairs with the
                // thread's store-then-check, so an op is never left unnoticed.
                if worker.sleeping.swap(false, Ordering::SeqCst) {
                    let _ = worker.doorbell.write(1);
                }
            }
            Err(mpsc::SendError(Msg::Op(_, done))) => done(IoDone {
                result: Err(TandemError::StoreClosed),
                buf: None,
            }),
            Err(_) => {}
        }
    }
}

impl Drop for UringStore {
    fn drop(&mut self) {
        for worker in &self.workers {
            let _ = worker.tx.send(Msg::Stop);
            let _ = worker.doorbell.write(1);
        }
        for worker in &mut self.workers {
            if let Some(thread) = worker.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Requests on a ring by token (the ring's user data), with slots reused.
#[derive(Default)]
pub(super) struct PendingTable {
    slots: Vec<Option<Pending>>,
    free: Vec<usize>,
}

impl PendingTable {
    /// Pushes `op` on `ring`, remembering `done` under its token; a push the ring refuses
    /// completes at once with the error.
    pub(super) fn push(&mut self, ring: &mut Ring, fd: RawFd, op: IoOp, done: Completion) {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let (kind, ring_op) = to_ring_op(fd, op);
        let token = u64::try_from(slot).expect("slot fits u64");
        match ring.push(token, ring_op) {
            Ok(()) => self.slots[slot] = Some(Pending { kind, done }),
            Err(e) => {
                self.free.push(slot);
                done(IoDone {
                    result: Err(kind_error(&kind, e)),
                    buf: None,
                });
            }
        }
    }

    /// Completes the request a CQE belongs to (unknown tokens are ignored).
    pub(super) fn complete(&mut self, file: &std::fs::File, completion: RingCompletion) {
        let RingCompletion { token, result, op } = completion;
        let Some(p) = usize::try_from(token)
            .ok()
            .and_then(|slot| self.slots.get_mut(slot).map(|s| (slot, s.take())))
            .and_then(|(slot, p)| {
                self.free.push(slot);
                p
            })
        else {
            return;
        };
        let done = match p.kind {
            // The filesystem cannot zero this way: fall back (rare; blocks the caller).
            PendingKind::Deallocate { offset, len }
                if result == -libc::EOPNOTSUPP || result == -libc::EINVAL =>
            {
                let r = super::zero_range_fallback(file, offset, len);
                IoDone {
                    result: r.map_err(|e| kind_error(&p.kind, e)),
                    buf: None,
                }
            }
            _ => finish(&p.kind, result, op),
        };
        (p.done)(done);
    }
}

/// A request on the ring: the op as submitted (for error context) and its completion.
struct Pending {
    kind: PendingKind,
    done: Completion,
}

enum PendingKind {
    Read { offset: u64 },
    Write { offset: u64, len: u64 },
    Flush,
    Deallocate { offset: u64, len: u64 },
}

fn run(
    mut ring: Ring,
    file: &std::fs::File,
    doorbell: &EventFd,
    sleeping: &AtomicBool,
    rx: &mpsc::Receiver<Msg>,
) {
    let fd = file.as_raw_fd();
    let mut pending = PendingTable::default();
    let mut doorbell_armed = false;
    let mut stopping = false;
    let mut backlog: std::collections::VecDeque<(IoOp, Completion)> = Default::default();
    loop {
        if !doorbell_armed && !stopping {
            let op = RingOp::EventFdRead {
                fd: doorbell.as_raw_fd(),
                buf: Box::new([0; 8]),
            };
            if ring.push(DOORBELL, op).is_ok() {
                doorbell_armed = true;
            }
        }
        // Drain the channel into SQEs (one batch per wake-up).
        loop {
            match rx.try_recv() {
                Ok(Msg::Op(op, done)) => backlog.push_back((op, done)),
                Ok(Msg::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                    stopping = true;
                    break;
                }
                Err(mpsc::TryRecvError::Empty) => break,
            }
        }
        while ring.in_flight() < MAX_IN_FLIGHT {
            let Some((op, done)) = backlog.pop_front() else {
                break;
            };
            pending.push(&mut ring, fd, op, done);
        }
        let busy = ring.in_flight() > usize::from(doorbell_armed);
        if stopping && !busy && backlog.is_empty() {
            break;
        }
        // About to sleep: announce it, then look at the channel once more (a submitter
        // that saw `false` queued its op before this store, so try_recv finds it).
        sleeping.store(true, Ordering::SeqCst);
        match rx.try_recv() {
            Ok(Msg::Op(op, done)) => {
                sleeping.store(false, Ordering::SeqCst);
                backlog.push_back((op, done));
                if ring.in_flight() < MAX_IN_FLIGHT {
                    continue;
                }
            }
            Ok(Msg::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                sleeping.store(false, Ordering::SeqCst);
                stopping = true;
                continue;
            }
            Err(mpsc::TryRecvError::Empty) => {}
        }
        let waited = ring.submit_and_wait(1);
        sleeping.store(false, Ordering::SeqCst);
        if let Err(e) = waited {
            tracing::error!(error = %e, "io_uring_enter failed; failing queued requests");
            for (op, done) in backlog.drain(..) {
                let err = op_error(&op, std::io::Error::from_raw_os_error(libc::EIO));
                done(IoDone {
                    result: Err(err),
                    buf: None,
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        for completion in ring.reap() {
            if completion.token == DOORBELL {
                doorbell_armed = false;
                continue;
            }
            pending.complete(file, completion);
        }
    }
    // Let the armed doorbell read complete so its buffer is handed back before the ring
    // drops (Ring::drop would wait for it anyway).
    if doorbell_armed {
        let _ = doorbell.write(1);
    }
    drop(ring);
}

fn to_ring_op(fd: RawFd, op: IoOp) -> (PendingKind, RingOp) {
    match op {
        IoOp::Read { offset, buf } => (
            PendingKind::Read { offset },
            RingOp::Read { fd, offset, buf },
        ),
        IoOp::Write { offset, buf, fua } => (
            PendingKind::Write {
                offset,
                len: super::len_u64(buf.len()),
            },
            RingOp::Write {
                fd,
                offset,
                buf,
                dsync: fua,
            },
        ),
        IoOp::Flush => (PendingKind::Flush, RingOp::DataSync { fd }),
        IoOp::Discard { offset, len_bytes } => (
            PendingKind::Deallocate {
                offset,
                len: len_bytes,
            },
            RingOp::Fallocate {
                fd,
                offset,
                len: len_bytes,
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            },
        ),
        IoOp::WriteZeroes { offset, len_bytes } => (
            PendingKind::Deallocate {
                offset,
                len: len_bytes,
            },
            RingOp::Fallocate {
                fd,
                offset,
                len: len_bytes,
                mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            },
        ),
    }
}

fn kind_error(kind: &PendingKind, source: std::io::Error) -> TandemError {
    match *kind {
        PendingKind::Read { offset } => TandemError::ReadData {
            offset,
            len_bytes: 0,
            source,
        },
        PendingKind::Write { offset, len } => TandemError::WriteData {
            offset,
            len_bytes: len,
            source,
        },
        PendingKind::Flush => TandemError::FlushData { source },
        PendingKind::Deallocate { offset, len } => TandemError::Deallocate {
            offset,
            len_bytes: len,
            source,
        },
    }
}

fn finish(kind: &PendingKind, result: i32, op: RingOp) -> IoDone {
    let expected = match &op {
        RingOp::Read { buf, .. } => Some(buf.len()),
        RingOp::Write { buf, .. } => Some(buf.len()),
        _ => None,
    };
    let outcome = if result < 0 {
        Err(std::io::Error::from_raw_os_error(-result))
    } else if let Some(expected) = expected
        && usize::try_from(result).ok() != Some(expected)
    {
        Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("short transfer: {result} of {expected} bytes"),
        ))
    } else {
        Ok(())
    };
    match (outcome, op) {
        (Ok(()), RingOp::Read { buf, .. }) => IoDone {
            result: Ok(()),
            buf: Some(buf),
        },
        (Ok(()), _) => IoDone {
            result: Ok(()),
            buf: None,
        },
        (Err(e), _) => {
            let err = match *kind {
                PendingKind::Read { offset } => TandemError::ReadData {
                    offset,
                    len_bytes: expected.map_or(0, super::len_u64),
                    source: e,
                },
                _ => kind_error(kind, e),
            };
            IoDone {
                result: Err(err),
                buf: None,
            }
        }
    }
}
