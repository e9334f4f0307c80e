//! The self-check: a node reads the registered keys every period and reports, within one
//! period, when its own key has gone (it has been fenced and must stop writing at once).
//!
//! ```text
//!            observe(keys with own key)          observe(keys without own key)
//!  Unknown ─────────────────────────► Present ─────────────────────────────► Lost
//!     │                                  ▲                                     │
//!     └──── observe(without) ──► Lost    └──────── observe(with): KeyBack ─────┘
//!  Any failed read: CheckFailed (state unchanged). Next check: now + period.
//! ```
//!
//! [`SelfCheck`] is the pure core (time passed in); [`SelfCheckTask`] (feature `shell`) runs
//! it on a thread against a transport.

use crate::error::FenceError;
use crate::key::PrKey;
use crate::pr::data::KeyList;
use serde::{Deserialize, Serialize};

/// What the last check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SelfCheckState {
    Unknown,
    Present,
    Lost,
}

/// A change worth reporting. Times are on the caller's clock (a [`SelfCheckTask`]
/// schedules on the monotonic clock and reports wall-clock milliseconds since the Unix
/// epoch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum SelfCheckEvent {
    /// The key was seen (first check, or after a failure streak ended).
    Confirmed { time_ms: u64, generation: u32 },
    /// The key is gone: this node has been fenced.
    KeyLost {
        time_ms: u64,
        generation: u32,
        /// When a check last saw the key, if ever.
        last_seen_ms: Option<u64>,
    },
    /// The key is registered again (someone re-registered it).
    KeyBack { time_ms: u64, generation: u32 },
    /// The keys could not be read.
    CheckFailed { time_ms: u64, error: String },
}

/// The self-check's state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfCheck {
    own: PrKey,
    period_ms: u64,
    next_due_ms: u64,
    state: SelfCheckState,
    last_seen_ms: Option<u64>,
    failing: bool,
}

impl SelfCheck {
    /// Checks for `own` every `period_ms`, the first check due at `now_ms`.
    pub fn new(own: PrKey, period_ms: u64, now_ms: u64) -> Self {
        Self {
            own,
            period_ms: period_ms.max(1),
            next_due_ms: now_ms,
            state: SelfCheckState::Unknown,
            last_seen_ms: None,
            failing: false,
        }
    }

    pub fn key(&self) -> PrKey {
        self.own
    }

    pub fn period_ms(&self) -> u64 {
        self.period_ms
    }

    pub fn state(&self) -> SelfCheckState {
        self.state
    }

    /// When the next READ KEYS is due.
    pub fn next_due_ms(&self) -> u64 {
        self.next_due_ms
    }

    /// Feeds one READ KEYS outcome observed at `now_ms`; schedules the next check.
    pub fn observe(
        &mut self,
        now_ms: u64,
        result: Result<&KeyList, &FenceError>,
    ) -> Option<SelfCheckEvent> {
        self.next_due_ms = now_ms.saturating_add(self.period_ms);
        let keys = match result {
            Ok(keys) => keys,
            Err(e) => {
                self.failing = true;
                return Some(SelfCheckEvent::CheckFailed {
                    time_ms: now_ms,
                    error: e.to_string(),
                });
            }
        };
        let was_failing = std::mem::replace(&mut self.failing, false);
        let generation = keys.generation;
        if keys.contains(self.own) {
            let previous = std::mem::replace(&mut self.state, SelfCheckState::Present);
            self.last_seen_ms = Some(now_ms);
            return match previous {
                SelfCheckState::Lost => Some(SelfCheckEvent::KeyBack {
                    time_ms: now_ms,
                    generation,
                }),
                SelfCheckState::Unknown => Some(SelfCheckEvent::Confirmed {
                    time_ms: now_ms,
                    generation,
                }),
                SelfCheckState::Present if was_failing => Some(SelfCheckEvent::Confirmed {
                    time_ms: now_ms,
                    generation,
                }),
                SelfCheckState::Present => None,
            };
        }
        if keys.truncated {
            // The list was cut short: the key may be further on. Not proof of loss.
            self.failing = true;
            return Some(SelfCheckEvent::CheckFailed {
                time_ms: now_ms,
                error: "READ KEYS data was truncated".to_owned(),
            });
        }
        let previous = std::mem::replace(&mut self.state, SelfCheckState::Lost);
        (previous != SelfCheckState::Lost).then_some(SelfCheckEvent::KeyLost {
            time_ms: now_ms,
            generation,
            last_seen_ms: self.last_seen_ms,
        })
    }
}

#[cfg(feature = "shell")]
mod task {
    use super::{SelfCheck, SelfCheckEvent};
    use crate::key::PrKey;
    use crate::transport::PrTransport;
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    /// Milliseconds since `origin` on the monotonic clock: the schedule of a safety
    /// check must not follow the wall clock (an NTP step back would delay the next check
    /// by as much).
    fn now_ms(origin: Instant) -> u64 {
        u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// `event` with its monotonic times (`mono_now` is now) turned into wall-clock
    /// times, for people and logs.
    fn on_wall_clock(event: SelfCheckEvent, mono_now: u64) -> SelfCheckEvent {
        let wall_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let wall = |mono: u64| wall_now.saturating_sub(mono_now.saturating_sub(mono));
        match event {
            SelfCheckEvent::Confirmed {
                time_ms,
                generation,
            } => SelfCheckEvent::Confirmed {
                time_ms: wall(time_ms),
                generation,
            },
            SelfCheckEvent::KeyLost {
                time_ms,
                generation,
                last_seen_ms,
            } => SelfCheckEvent::KeyLost {
                time_ms: wall(time_ms),
                generation,
                last_seen_ms: last_seen_ms.map(wall),
            },
            SelfCheckEvent::KeyBack {
                time_ms,
                generation,
            } => SelfCheckEvent::KeyBack {
                time_ms: wall(time_ms),
                generation,
            },
            SelfCheckEvent::CheckFailed { time_ms, error } => SelfCheckEvent::CheckFailed {
                time_ms: wall(time_ms),
                error,
            },
        }
    }

    /// A thread running [`SelfCheck`] against one or more paths (the first that answers).
    #[derive(Debug)]
    pub struct SelfCheckTask {
        stop: Arc<(Mutex<bool>, Condvar)>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl SelfCheckTask {
        /// Starts checking `own` every `period` on `paths`; `retries` re-sends a READ KEYS
        /// answered with UNIT ATTENTION (after a preempt the victim first sees
        /// REGISTRATIONS PREEMPTED). Every event goes to `sink`, on the task's thread.
        pub fn spawn(
            paths: Vec<Arc<dyn PrTransport>>,
            own: PrKey,
            period: Duration,
            retries: u32,
            mut sink: impl FnMut(SelfCheckEvent) + Send + 'static,
        ) -> std::io::Result<Self> {
            let stop = Arc::new((Mutex::new(false), Condvar::new()));
            let stop_thread = Arc::clone(&stop);
            let period_ms = u64::try_from(period.as_millis()).unwrap_or(u64::MAX);
            let thread = std::thread::Builder::new()
                .name("tandem-self-check".into())
                .spawn(move || {
                    let origin = Instant::now();
                    let mut check = SelfCheck::new(own, period_ms, now_ms(origin));
                    let span = tracing::debug_span!("self_check", pr_key = %own.hex16());
                    let _enter = span.enter();
                    loop {
                        {
                            let (lock, cv) = &*stop_thread;
                            let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
                            loop {
                                if *stopped {
                                    return;
                                }
                                let now = now_ms(origin);
                                if now >= check.next_due_ms() {
                                    break;
                                }
                                let wait = Duration::from_millis(check.next_due_ms() - now);
                                stopped = cv
                                    .wait_timeout(stopped, wait)
                                    .unwrap_or_else(|e| e.into_inner())
                                    .0;
                            }
                        }
                        let result = read_keys(&paths, retries);
                        let now = now_ms(origin);
                        let event = check.observe(now, result.as_ref());
                        if let Some(event) = event.map(|e| on_wall_clock(e, now)) {
                            match &event {
                                SelfCheckEvent::KeyLost { .. } => {
                                    tracing::warn!(?event, "own reservation key is gone")
                                }
                                SelfCheckEvent::CheckFailed { error, .. } => {
                                    tracing::debug!(error = %error, "self-check read failed")
                                }
                                _ => tracing::debug!(?event, "self-check"),
                            }
                            sink(event);
                        }
                    }
                })?;
            Ok(Self {
                stop,
                thread: Some(thread),
            })
        }

        /// Stops the task and waits for its thread.
        pub fn stop(mut self) {
            self.shutdown();
        }

        fn shutdown(&mut self) {
            let (lock, cv) = &*self.stop;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    impl Drop for SelfCheckTask {
        fn drop(&mut self) {
            self.shutdown();
        }
    }

    fn read_keys(
        paths: &[Arc<dyn PrTransport>],
        retries: u32,
    ) -> crate::Result<crate::pr::data::KeyList> {
        let mut last = None;
        for path in paths {
            let mut attempt = 0;
            loop {
                match path.read_keys() {
                    Ok(keys) => return Ok(keys),
                    Err(e) if e.is_retryable() && attempt < retries => attempt += 1,
                    Err(e) => {
                        last = Some(e);
                        break;
                    }
                }
            }
        }
        Err(last.unwrap_or(crate::FenceError::NoPaths {
            op: crate::Operation::SelfCheck,
        }))
    }
}

#[cfg(feature = "shell")]
pub use task::SelfCheckTask;

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(g: u32, k: &[u64]) -> KeyList {
        KeyList {
            generation: g,
            keys: k.iter().copied().map(PrKey::new).collect(),
            truncated: false,
        }
    }

    #[test]
    fn reports_loss_once_within_one_period() {
        let own = PrKey::new(0xa1);
        let mut c = SelfCheck::new(own, 1000, 0);
        assert_eq!(c.next_due_ms(), 0);
        assert!(matches!(
            c.observe(0, Ok(&keys(1, &[0xa1]))),
            Some(SelfCheckEvent::Confirmed { .. })
        ));
        assert_eq!(c.next_due_ms(), 1000);
        assert_eq!(c.observe(1000, Ok(&keys(1, &[0xa1, 0xb2]))), None);
        // Fenced at 1500: the check due at 2000 sees it.
        let lost = c.observe(2000, Ok(&keys(3, &[0xb2])));
        assert_eq!(
            lost,
            Some(SelfCheckEvent::KeyLost {
                time_ms: 2000,
                generation: 3,
                last_seen_ms: Some(1000)
            })
        );
        assert_eq!(c.state(), SelfCheckState::Lost);
        assert_eq!(
            c.observe(3000, Ok(&keys(3, &[0xb2]))),
            None,
            "reported once"
        );
        assert!(matches!(
            c.observe(4000, Ok(&keys(4, &[0xb2, 0xa1]))),
            Some(SelfCheckEvent::KeyBack { .. })
        ));
    }

    #[test]
    fn failures_and_truncation_are_not_taken_for_loss() {
        let own = PrKey::new(0xa1);
        let mut c = SelfCheck::new(own, 500, 0);
        c.observe(0, Ok(&keys(1, &[0xa1])));
        let err = FenceError::Timeout {
            op: crate::Operation::SelfCheck,
            device: "/dev/sdb".into(),
            timeout_ms: 100,
        };
        assert!(matches!(
            c.observe(500, Err(&err)),
            Some(SelfCheckEvent::CheckFailed { .. })
        ));
        assert_eq!(c.state(), SelfCheckState::Present);
        let mut cut = keys(1, &[0xb2]);
        cut.truncated = true;
        assert!(matches!(
            c.observe(1000, Ok(&cut)),
            Some(SelfCheckEvent::CheckFailed { .. })
        ));
        assert_eq!(c.state(), SelfCheckState::Present);
        assert!(matches!(
            c.observe(1500, Ok(&keys(1, &[0xa1]))),
            Some(SelfCheckEvent::Confirmed { .. })
        ));
    }
}
