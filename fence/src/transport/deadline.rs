//! Running a blocking ioctl with a deadline the kernel cannot stretch.
//!
//! SG_IO has its own timeout, but when it expires the SCSI error handler takes over, and on a
//! deadlocked target (LIO tcm_loop after PREEMPT AND ABORT on 6.12) the call may never
//! return. So each command runs on its own thread; the caller waits until the deadline and
//! then reports a timeout, leaving the thread behind. While such a thread is outstanding the
//! device is "wedged" and refuses new commands at once.

use crate::Operation;
use crate::error::{FenceError, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct Slot<T> {
    value: Option<T>,
    abandoned: bool,
}

/// Counts a device's abandoned commands.
#[derive(Debug, Default, Clone)]
pub(crate) struct Watchdog {
    stuck: Arc<AtomicUsize>,
}

impl Watchdog {
    /// How long to wait for a command the kernel was told to time out after `timeout_ms`:
    /// half as long again (at least a second) for its error handling.
    pub(crate) fn deadline_for(timeout_ms: u32) -> Duration {
        let ms = u64::from(timeout_ms);
        Duration::from_millis(ms + (ms / 2).max(1000))
    }

    /// Whether a command on this device is still stuck in the kernel.
    pub(crate) fn is_wedged(&self) -> bool {
        self.stuck.load(Ordering::SeqCst) > 0
    }

    /// Runs `f` on a new thread and waits for it until `deadline`.
    pub(crate) fn run<T, F>(&self, op: Operation, device: &str, timeout_ms: u32, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let timeout_err = || FenceError::Timeout {
            op,
            device: device.to_owned(),
            timeout_ms: u64::from(timeout_ms),
        };
        if self.is_wedged() {
            return Err(timeout_err());
        }
        let shared = Arc::new((
            Mutex::new(Slot {
                value: None,
                abandoned: false,
            }),
            Condvar::new(),
        ));
        let worker_shared = Arc::clone(&shared);
        let stuck = Arc::clone(&self.stuck);
        std::thread::Builder::new()
            .name("tandem-fence-io".into())
            .spawn(move || {
                let value = f();
                let (lock, cv) = &*worker_shared;
                let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
                if slot.abandoned {
                    stuck.fetch_sub(1, Ordering::SeqCst);
                } else {
                    slot.value = Some(value);
                    cv.notify_one();
                }
            })
            .map_err(|e| FenceError::Transport {
                op,
                device: device.to_owned(),
                detail: format!("cannot start the I/O thread: {e}"),
            })?;
        let deadline = Instant::now() + Self::deadline_for(timeout_ms);
        let (lock, cv) = &*shared;
        let mut slot = lock.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(value) = slot.value.take() {
                return Ok(value);
            }
            let now = Instant::now();
            if now >= deadline {
                slot.abandoned = true;
                self.stuck.fetch_add(1, Ordering::SeqCst);
                return Err(timeout_err());
            }
            slot = cv
                .wait_timeout(slot, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pr::PrInAction;

    #[test]
    fn a_command_that_never_returns_times_out_and_wedges_the_device() {
        let dog = Watchdog::default();
        let op = Operation::PrIn(PrInAction::ReadKeys);
        assert_eq!(dog.run(op, "dev", 10, || 7).unwrap(), 7);
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let started = Instant::now();
        let err = dog
            .run(op, "dev", 10, move || {
                let _ = release_rx.recv();
            })
            .unwrap_err();
        assert!(err.is_timeout(), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(1000));
        assert!(dog.is_wedged());
        assert!(dog.run(op, "dev", 10, || 1).unwrap_err().is_timeout());
        // The stuck command comes back: the device is usable again.
        release_tx.send(()).unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while dog.is_wedged() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!dog.is_wedged());
        assert_eq!(dog.run(op, "dev", 10, || 2).unwrap(), 2);
    }
}
