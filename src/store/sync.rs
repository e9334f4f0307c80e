//! [`SyncStore`]: positioned reads and writes on one worker thread.
//!
//! The portable twin of [`UringStore`](super::UringStore), behind the same trait and the
//! same trait suite: simple enough to trust, used where io_uring is unavailable and as the
//! reference the io_uring engine is compared with.

use super::{BlockStore, Completion, IoDone, IoOp, StoreConfig, block_size_of, op_error};
use crate::error::{Result, TandemError};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::mpsc;

type Job = (IoOp, Completion);

/// A store doing blocking positioned I/O on its own worker thread.
#[derive(Debug)]
pub struct SyncStore {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    worker: Option<std::thread::JoinHandle<()>>,
    size: u64,
    block: u32,
}

impl SyncStore {
    /// Opens the store described by `config` (O_DIRECT when `config.direct`).
    pub fn open(config: &StoreConfig) -> Result<Self> {
        let (file, _direct, file_size) = super::open_file(&config.path, config.direct)?;
        let size = config.limit_bytes.unwrap_or(file_size).min(file_size);
        let block = block_size_of(&file);
        let (tx, rx) = mpsc::channel::<Job>();
        let worker = std::thread::Builder::new()
            .name("tandem-sync-io".into())
            .spawn(move || {
                for (op, done) in rx {
                    done(execute(&file, op));
                }
            })
            .map_err(TandemError::io("starting the sync store's I/O thread"))?;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            worker: Some(worker),
            size,
            block,
        })
    }
}

fn execute(file: &std::fs::File, op: IoOp) -> IoDone {
    let outcome = match &op {
        IoOp::Read { .. } => None,
        IoOp::Write { offset, buf, fua } => Some(
            file.write_all_at(buf, *offset)
                .and_then(|()| if *fua { file.sync_data() } else { Ok(()) }),
        ),
        IoOp::Flush => Some(file.sync_data()),
        IoOp::Discard { offset, len_bytes } | IoOp::WriteZeroes { offset, len_bytes } => {
            let mode = if matches!(op, IoOp::Discard { .. }) {
                nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE
            } else {
                nix::fcntl::FallocateFlags::FALLOC_FL_ZERO_RANGE
                    | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE
            };
            let (Ok(off), Ok(len)) = (i64::try_from(*offset), i64::try_from(*len_bytes)) else {
                return IoDone {
                    result: Err(TandemError::InvalidRequest("range beyond i64".into())),
                    buf: None,
                };
            };
            Some(
                nix::fcntl::fallocate(file, mode, off, len)
                    .map_err(std::io::Error::from)
                    .or_else(|e| {
                        if super::is_unsupported(&e) {
                            super::zero_range_fallback(file, *offset, *len_bytes)
                        } else {
                            Err(e)
                        }
                    }),
            )
        }
    };
    match (outcome, op) {
        (None, IoOp::Read { offset, mut buf }) => match file.read_exact_at(&mut buf, offset) {
            Ok(()) => IoDone {
                result: Ok(()),
                buf: Some(buf),
            },
            Err(e) => {
                let op = IoOp::Read { offset, buf };
                IoDone {
                    result: Err(op_error(&op, e)),
                    buf: None,
                }
            }
        },
        (Some(Ok(())), _) | (None, _) => IoDone {
            result: Ok(()),
            buf: None,
        },
        (Some(Err(e)), op) => IoDone {
            result: Err(op_error(&op, e)),
            buf: None,
        },
    }
}

impl BlockStore for SyncStore {
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
        let tx = self.tx.lock().ok().and_then(|g| g.clone());
        match tx {
            Some(tx) => {
                if let Err(mpsc::SendError((_, done))) = tx.send((op, done)) {
                    done(IoDone {
                        result: Err(TandemError::StoreClosed),
                        buf: None,
                    });
                }
            }
            None => done(IoDone {
                result: Err(TandemError::StoreClosed),
                buf: None,
            }),
        }
    }
}

impl Drop for SyncStore {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}
