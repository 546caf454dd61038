//! The invalidator's three steps wired together: leadership (a term of the
//! lease) → tail (the change feed for that term) → apply (each change's
//! cache work, behind the term's fence). Standbys wait in the first step.

use crate::apply::{Apply, ApplyParts};
use crate::leadership::Lease;
use crate::tail::{Tail, TermEnd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Observable state, for `/health` and tests.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    pub leading: AtomicBool,
    pub events: AtomicU64,
    pub progress: Progress,
}

/// When the change feed last made progress (an answer from MongoDB): the
/// lease is renewed only while it does, so a leader that cannot tail lets a
/// standby take over.
#[derive(Debug, Clone)]
pub struct Progress {
    base: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }
}

impl Progress {
    pub fn mark(&self) {
        let now = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// How long ago the feed last made progress.
    pub fn since(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }
}

pub struct Worker {
    pub lease: Lease,
    pub tail: Tail,
    pub apply: ApplyParts,
}

impl Worker {
    /// Stands by until it holds the lease, leads until the term ends, and so
    /// on until `shutdown`; then saves the position and releases the lease.
    pub async fn run(self, shutdown: CancellationToken) {
        let status = Arc::clone(&self.apply.status);
        while let Some(term) = self.lease.acquire(&shutdown, &status.progress).await {
            tracing::info!(holder = %term.fence.token, "became the leader");
            metrics::counter!("invalidator_leadership_changes_total", "role" => "leader")
                .increment(1);
            status.leading.store(true, Ordering::SeqCst);

            let apply = Apply::for_term(&self.apply, &term.fence);
            let end = self.tail.run(&apply, term.ended()).await;

            status.leading.store(false, Ordering::SeqCst);
            metrics::counter!("invalidator_leadership_changes_total", "role" => "standby")
                .increment(1);
            self.lease.end(term).await;
            if shutdown.is_cancelled() {
                return;
            }
            match end {
                TermEnd::Fenced => {
                    tracing::warn!("lost the lease: a newer term moved the fence; standing by")
                }
                TermEnd::Ended => tracing::warn!("lost the lease; standing by"),
            }
        }
    }
}
