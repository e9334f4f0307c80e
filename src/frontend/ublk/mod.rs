//! The ublk frontend: a replicated volume as `/dev/ublkbN` (libublk 0.4.8).
//!
//! Needs root and the `ublk_drv` module; runs in the test VM. One queue thread (libublk
//! owns its io_uring) takes block requests from the kernel and hands them to the
//! [`Volume`] on the tokio runtime; completions come back through a per-queue list and
//! an eventfd "doorbell" whose read is kept armed on the queue ring, so the queue thread
//! sleeps in a single `io_uring_enter` for both.
//!
//! ```text
//!  kernel ─► queue ring CQE (tag) ─► handler: copy write data, spawn volume op ─┐
//!                                                                               │ tokio
//!  kernel ◄─ commit(tag, result) ◄─ handler: doorbell CQE, drain done list ◄────┘
//! ```
//!
//! Pitfalls handled (see the ublk notes): FLUSH carries `start_sector = u64::MAX`, so
//! the op is dispatched before any range check; the device is stopped from the thread
//! that created its control ring; run the daemon in its own mount namespace
//! (`unshare -m`) when the device is mounted from the same host.

mod sys;

use crate::error::{Result, TandemError};
use crate::replication::Volume;
use crate::store::AlignedBuf;
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, UblkFlags, UblkIORes};
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex, mpsc};

/// Queue depth of the device.
const DEPTH: u16 = 64;
/// Largest request the kernel sends (bytes).
const IO_BUF_BYTES: u32 = 512 << 10;

struct Done {
    tag: u16,
    result: i32,
    data: Option<AlignedBuf>,
}

struct Doorbell {
    done: Mutex<Vec<Done>>,
    efd: EventFd,
}

impl Doorbell {
    fn ring(&self, d: Done) {
        if let Ok(mut v) = self.done.lock() {
            v.push(d);
        }
        let _ = self.efd.write(1);
    }
}

/// A running ublk device.
#[derive(Debug)]
pub struct UblkDevice {
    dev_id: i32,
    path: String,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UblkDevice {
    /// Creates and starts `/dev/ublkbN` for `volume`; requests run on `runtime`.
    pub fn start(volume: Volume, runtime: tokio::runtime::Handle) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<std::result::Result<(i32, String), String>>();
        let thread = std::thread::Builder::new()
            .name("tandem-ublk".into())
            .spawn(move || run_device(volume, runtime, &tx))
            .map_err(TandemError::io("starting the ublk thread"))?;
        match rx.recv() {
            Ok(Ok((dev_id, path))) => Ok(Self {
                dev_id,
                path,
                thread: Some(thread),
            }),
            Ok(Err(what)) => {
                let _ = thread.join();
                Err(TandemError::Ublk { what })
            }
            Err(_) => {
                let _ = thread.join();
                Err(TandemError::Ublk {
                    what: "the ublk thread ended before the device started".into(),
                })
            }
        }
    }

    /// The block device path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Stops and deletes the device (from this thread, with its own control ring).
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        match libublk::ctrl::UblkCtrl::new_simple(self.dev_id) {
            Ok(ctrl) => {
                if let Err(e) = ctrl.kill_dev() {
                    tracing::warn!(dev_id = self.dev_id, error = %e, "stopping the ublk device");
                }
            }
            Err(e) => {
                tracing::warn!(dev_id = self.dev_id, error = %e, "opening the ublk device to stop it")
            }
        }
        let _ = thread.join();
    }
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn run_device(
    volume: Volume,
    runtime: tokio::runtime::Handle,
    tx: &mpsc::Sender<std::result::Result<(i32, String), String>>,
) {
    let size = volume.size_bytes();
    let ctrl = match libublk::ctrl::UblkCtrlBuilder::default()
        .name("tandem")
        .id(-1)
        .depth(DEPTH)
        .nr_queues(1)
        .io_buf_bytes(IO_BUF_BYTES)
        .dev_flags(UblkFlags::UBLK_DEV_F_ADD_DEV)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(format!(
                "creating the device (is ublk_drv loaded, are we root?): {e}"
            )));
            return;
        }
    };
    let tgt_init = move |dev: &mut UblkDev| {
        dev.set_default_params(size);
        let p = &mut dev.tgt.params;
        p.basic.attrs |= libublk::sys::UBLK_ATTR_FUA;
        p.basic.logical_bs_shift = 9;
        p.types |= libublk::sys::UBLK_PARAM_TYPE_DISCARD;
        p.discard = libublk::sys::ublk_param_discard {
            discard_alignment: 0,
            discard_granularity: 4096,
            max_discard_sectors: 1 << 21,
            max_write_zeroes_sectors: 1 << 21,
            max_discard_segments: 1,
            reserved0: 0,
        };
        Ok(())
    };
    let q_volume = volume.clone();
    let q_runtime = runtime.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| queue(qid, dev, &q_volume, &q_runtime);
    let started = tx.clone();
    let dev_fn = move |ctrl: &libublk::ctrl::UblkCtrl| {
        let id = i32::try_from(ctrl.dev_info().dev_id).unwrap_or(-1);
        let _ = started.send(Ok((id, ctrl.get_bdev_path())));
    };
    if let Err(e) = ctrl.run_target(tgt_init, q_fn, dev_fn) {
        let _ = tx.send(Err(format!("running the device: {e}")));
    }
    let _ = ctrl.del_dev();
    tracing::info!(volume = %volume.name(), "ublk device removed");
}

fn errno_of(e: &TandemError) -> i32 {
    match e {
        TandemError::VolumeState { .. } => -libc::EPERM,
        TandemError::InvalidRequest(_) => -libc::EINVAL,
        _ => -libc::EIO,
    }
}

fn queue(qid: u16, dev: &UblkDev, volume: &Volume, runtime: &tokio::runtime::Handle) {
    let bufs = Rc::new(RefCell::new(dev.alloc_queue_io_bufs()));
    let bell = match EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC) {
        Ok(efd) => Arc::new(Doorbell {
            done: Mutex::new(Vec::new()),
            efd,
        }),
        Err(e) => {
            tracing::error!(error = %e, "ublk queue: no eventfd");
            return;
        }
    };
    let queue = match UblkQueue::new(qid, dev).and_then(|q| {
        let b = bufs.borrow();
        q.submit_fetch_commands_unified(BufDescList::Slices(Some(&b)))
    }) {
        Ok(q) => q,
        Err(e) => {
            tracing::error!(error = %e, "ublk queue setup failed");
            return;
        }
    };
    let efd = bell.efd.as_raw_fd();
    if let Err(e) = sys::arm_doorbell(efd, sys::doorbell_buffer()) {
        tracing::error!(error = %e, "ublk queue: arming the doorbell");
        return;
    }
    let size = volume.size_bytes();
    let handler = {
        let bufs = Rc::clone(&bufs);
        let bell = Arc::clone(&bell);
        let volume = volume.clone();
        let runtime = runtime.clone();
        move |q: &UblkQueue<'_>, tag: u16, ctx: &UblkIOCtx<'_>| {
            if ctx.is_tgt_io() {
                // The doorbell: complete everything the volume finished.
                let done = bell
                    .done
                    .lock()
                    .map(|mut v| std::mem::take(&mut *v))
                    .unwrap_or_default();
                let mut b = bufs.borrow_mut();
                for d in done {
                    let Some(buf) = b.get_mut(usize::from(d.tag)) else {
                        continue;
                    };
                    if let Some(data) = &d.data {
                        let n = data.len().min(buf.len());
                        buf.as_mut_slice()[..n].copy_from_slice(&data[..n]);
                    }
                    let _ = q.complete_io_cmd_unified(
                        d.tag,
                        BufDesc::Slice(buf.as_slice()),
                        Ok(UblkIORes::Result(d.result)),
                    );
                }
                drop(b);
                if let Err(e) = sys::arm_doorbell(efd, sys::doorbell_buffer()) {
                    tracing::error!(error = %e, "ublk queue: re-arming the doorbell");
                }
                return;
            }
            let iod = q.get_iod(tag);
            let op = iod.op_flags & 0xff;
            let fua = iod.op_flags & libublk::sys::UBLK_IO_F_FUA != 0;
            let v = volume.clone();
            let bell = Arc::clone(&bell);
            // FLUSH first: it carries start_sector = u64::MAX.
            if op == libublk::sys::UBLK_IO_OP_FLUSH {
                runtime.spawn(async move {
                    let result = match v.flush().await {
                        Ok(()) => 0,
                        Err(e) => errno_of(&e),
                    };
                    bell.ring(Done {
                        tag,
                        result,
                        data: None,
                    });
                });
                return;
            }
            let offset = iod.start_sector.checked_mul(512);
            let len = u64::from(iod.nr_sectors) * 512;
            let Some(offset) = offset.filter(|o| o.checked_add(len).is_some_and(|e| e <= size))
            else {
                bell.ring(Done {
                    tag,
                    result: -libc::EINVAL,
                    data: None,
                });
                return;
            };
            let bytes = i32::try_from(len).unwrap_or(i32::MAX);
            match op {
                libublk::sys::UBLK_IO_OP_READ => {
                    runtime.spawn(async move {
                        let d = match v.read(offset, len).await {
                            Ok(buf) => Done {
                                tag,
                                result: bytes,
                                data: Some(buf),
                            },
                            Err(e) => Done {
                                tag,
                                result: errno_of(&e),
                                data: None,
                            },
                        };
                        bell.ring(d);
                    });
                }
                libublk::sys::UBLK_IO_OP_WRITE => {
                    let n = usize::try_from(len).unwrap_or(0);
                    let data = {
                        let b = bufs.borrow();
                        b.get(usize::from(tag))
                            .filter(|buf| buf.len() >= n)
                            .map(|buf| AlignedBuf::copy_from(&buf.as_slice()[..n]))
                    };
                    let Some(data) = data else {
                        bell.ring(Done {
                            tag,
                            result: -libc::EINVAL,
                            data: None,
                        });
                        return;
                    };
                    runtime.spawn(async move {
                        let result = match v.write(offset, Arc::new(data), fua).await {
                            Ok(()) => bytes,
                            Err(e) => errno_of(&e),
                        };
                        bell.ring(Done {
                            tag,
                            result,
                            data: None,
                        });
                    });
                }
                libublk::sys::UBLK_IO_OP_DISCARD | libublk::sys::UBLK_IO_OP_WRITE_ZEROES => {
                    let zeroes = op == libublk::sys::UBLK_IO_OP_WRITE_ZEROES;
                    runtime.spawn(async move {
                        let result = match v.trim(offset, len, zeroes).await {
                            Ok(()) => bytes,
                            Err(e) => errno_of(&e),
                        };
                        bell.ring(Done {
                            tag,
                            result,
                            data: None,
                        });
                    });
                }
                _ => bell.ring(Done {
                    tag,
                    result: -libc::EOPNOTSUPP,
                    data: None,
                }),
            }
        }
    };
    queue.wait_and_handle_io(handler);
}
