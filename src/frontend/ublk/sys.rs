//! The one unsafe step of the ublk frontend: queueing an eventfd read on the queue's
//! io_uring (libublk owns the ring; `SubmissionQueue::push` is an `unsafe fn` because
//! the kernel writes the buffer until the CQE arrives).
#![allow(unsafe_code)]

use libublk::io::UblkIOCtx;
use std::os::fd::RawFd;

/// User-data op code marking the doorbell read (a target I/O of tag 0).
pub const DOORBELL_OP: u32 = 0xfe;

/// A leaked 8-byte buffer for the doorbell read: it must outlive every read the kernel
/// may still complete, including one pending when the queue thread exits, so it is
/// never freed (8 bytes per queue for the life of the process).
pub fn doorbell_buffer() -> &'static mut [u8; 8] {
    Box::leak(Box::new([0u8; 8]))
}

/// Queues an 8-byte read of `efd` into `buf` on this thread's ublk queue ring.
pub fn arm_doorbell(efd: RawFd, buf: &'static mut [u8; 8]) -> std::io::Result<()> {
    let entry = io_uring::opcode::Read::new(io_uring::types::Fd(efd), buf.as_mut_ptr(), 8)
        .build()
        .user_data(UblkIOCtx::build_user_data(0, DOORBELL_OP, 0, true));
    libublk::io::with_task_io_ring_mut(|ring| {
        // SAFETY: the SQE points at `buf`, a leaked 'static allocation that is never freed
        // or otherwise accessed while the read is pending (the caller re-arms only after
        // this read's CQE), and at `efd`, an eventfd kept open for the life of the queue.
        let pushed = unsafe { ring.submission().push(&entry) };
        match pushed {
            Ok(()) => Ok(()),
            Err(_) => {
                ring.submit()?;
                // SAFETY: as above; the queue had room after the submit.
                unsafe { ring.submission().push(&entry) }
                    .map_err(|_| std::io::Error::other("ublk queue ring is full"))
            }
        }
    })
}
