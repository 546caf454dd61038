//! The consistency ratio over a sliding window: consistent checks over
//! judged checks (consistent + inconsistent) in the last `span` seconds.
//! Kept as one bucket per second, so its memory is bounded by the window,
//! not by the rate of checks.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    second: u64,
    consistent: u64,
    inconsistent: u64,
}

#[derive(Debug, Clone)]
pub struct RatioWindow {
    span_secs: u64,
    buckets: VecDeque<Bucket>,
}

impl RatioWindow {
    /// A window of `span_secs` seconds (at least one).
    pub fn new(span_secs: u64) -> Self {
        let span_secs = span_secs.max(1);
        Self {
            span_secs,
            buckets: VecDeque::new(),
        }
    }

    /// Records one judged check at `now_secs` (any monotonic clock in seconds).
    pub fn record(&mut self, now_secs: u64, consistent: bool) {
        self.prune(now_secs);
        let bucket = match self.buckets.back_mut() {
            Some(last) if last.second == now_secs => last,
            _ => {
                self.buckets.push_back(Bucket {
                    second: now_secs,
                    ..Bucket::default()
                });
                // Just pushed: there is a back.
                let Some(last) = self.buckets.back_mut() else {
                    return;
                };
                last
            }
        };
        if consistent {
            bucket.consistent += 1;
        } else {
            bucket.inconsistent += 1;
        }
    }

    /// Consistent over judged checks in the window ending at `now_secs`;
    /// `None` when the window holds no check.
    pub fn ratio(&mut self, now_secs: u64) -> Option<f64> {
        self.prune(now_secs);
        let (consistent, inconsistent) = self.counts();
        let judged = consistent + inconsistent;
        (judged > 0).then(|| consistent as f64 / judged as f64)
    }

    /// (consistent, inconsistent) in the window as last pruned.
    pub fn counts(&self) -> (u64, u64) {
        self.buckets
            .iter()
            .fold((0, 0), |(c, i), b| (c + b.consistent, i + b.inconsistent))
    }

    fn prune(&mut self, now_secs: u64) {
        let oldest = now_secs.saturating_sub(self.span_secs - 1);
        while self.buckets.front().is_some_and(|b| b.second < oldest) {
            self.buckets.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ratio_counts_only_checks_within_the_window() {
        let mut window = RatioWindow::new(10);
        assert_eq!(window.ratio(0), None);
        for _ in 0..99 {
            window.record(100, true);
        }
        window.record(105, false);
        assert_eq!(window.ratio(105), Some(0.99));
        // 100 leaves the window at 110; 105 is still in it.
        assert_eq!(window.ratio(109), Some(0.99));
        assert_eq!(window.ratio(110), Some(0.0));
        window.record(112, true);
        assert_eq!(window.ratio(112), Some(0.5));
        assert_eq!(window.ratio(200), None);
    }

    #[test]
    fn memory_is_one_bucket_per_second_of_the_window() {
        let mut window = RatioWindow::new(5);
        for second in 0..1000 {
            for _ in 0..50 {
                window.record(second, true);
            }
        }
        assert!(window.buckets.len() <= 5);
        assert_eq!(window.counts(), (250, 0));
    }
}
