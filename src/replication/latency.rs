//! A lock-free latency histogram for acknowledged application writes, exported as
//! Prometheus buckets by the cluster's metrics endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in microseconds.
pub const BOUNDS_US: [u64; 12] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 1_000_000,
];

/// Counts of writes by latency (non-cumulative buckets plus an overflow).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// A snapshot: cumulative (upper bound in seconds, count) pairs, sum and count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencySnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl LatencyHistogram {
    /// Records one write that took `elapsed`.
    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let index = BOUNDS_US
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(BOUNDS_US.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative buckets as Prometheus wants them.
    pub fn snapshot(&self) -> LatencySnapshot {
        let mut running = 0;
        let mut buckets = Vec::with_capacity(BOUNDS_US.len());
        for (i, bound) in BOUNDS_US.iter().enumerate() {
            running += self.buckets[i].load(Ordering::Relaxed);
            // Display only: microsecond bounds are exact in f64.
            #[allow(clippy::cast_precision_loss)]
            buckets.push((*bound as f64 / 1e6, running));
        }
        #[allow(clippy::cast_precision_loss)]
        let sum_seconds = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        LatencySnapshot {
            buckets,
            sum_seconds,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_the_overflow_only_counts() {
        let h = LatencyHistogram::default();
        h.record(Duration::from_micros(40));
        h.record(Duration::from_micros(700));
        h.record(Duration::from_secs(3));
        let s = h.snapshot();
        assert_eq!(s.count, 3);
        assert_eq!(s.buckets[0], (0.00005, 1));
        assert_eq!(s.buckets[4], (0.001, 2));
        assert_eq!(
            s.buckets.last().map(|b| b.1),
            Some(2),
            "3 s is past every bound"
        );
        assert!((s.sum_seconds - 3.00074).abs() < 1e-9);
    }
}
