//! Tailing the change feed for one leadership term: open it where the last
//! term left off (or from now, flushing every cache, when that position is
//! lost), apply each change in order, and save the position — with each
//! change's announcement, and every second while the feed is idle.

use crate::apply::{Apply, ApplyError, Next};
use feature_store::{ChangeFeed, FeatureStore, FeedError, FeedPosition, FeedStart};
use invalidation::Announcer;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// How long one poll of the feed waits for changes, so the end of a term is
/// noticed between polls without cancelling one half-way.
const POLL: Duration = Duration::from_millis(250);
/// How often the position is saved while no changes arrive.
const IDLE_SAVE: Duration = Duration::from_secs(1);
/// Reopening a failed feed waits this long at first, doubling up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Error)]
enum TailError {
    #[error("applying a change failed")]
    Apply(#[from] ApplyError),
    #[error("the change feed failed")]
    Feed(#[from] FeedError),
    #[error("reading the saved position from Redis failed")]
    Redis(#[from] redis::RedisError),
}

/// How a term's tailing ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermEnd {
    /// The term's token was cancelled (shutdown, or the lease was lost).
    Ended,
    /// A write found that another invalidator holds the lease.
    Fenced,
}

/// The change feed and where its position is saved.
#[derive(Clone)]
pub struct Tail {
    store: FeatureStore,
    positions: Announcer,
}

impl Tail {
    pub fn new(store: FeatureStore, positions: Announcer) -> Self {
        Self { store, positions }
    }

    /// Tails until the term ends; a failing feed is reopened from the saved
    /// position with backoff.
    pub async fn run(&self, apply: &Apply, term: &CancellationToken) -> TermEnd {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if term.is_cancelled() {
                return TermEnd::Ended;
            }
            match self.follow(apply, term).await {
                Ok(()) => return TermEnd::Ended,
                Err(TailError::Apply(ApplyError::Fenced)) => return TermEnd::Fenced,
                Err(err) => {
                    metrics::counter!("invalidator_stream_restarts_total").increment(1);
                    tracing::warn!(
                        error = %telemetry::ErrorChain(&err),
                        backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                        "change feed failed; reopening from the saved position"
                    );
                    tokio::select! {
                        () = term.cancelled() => return TermEnd::Ended,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// One feed's life: open, apply changes until the term ends (then save
    /// the position and return) or something fails.
    async fn follow(&self, apply: &Apply, term: &CancellationToken) -> Result<(), TailError> {
        let mut feed = self.open(apply).await?;
        // Make the starting point durable at once, so a crash before the
        // first change still resumes from here.
        save(apply, feed.position()).await?;
        let mut last_saved = Instant::now();
        loop {
            if term.is_cancelled() {
                save(apply, feed.position()).await?;
                return Ok(());
            }
            match feed.next().await {
                Ok(Some(change)) => {
                    if apply.change(&change).await? == Next::Reopen {
                        tracing::info!("change feed ended; reopening after its last change");
                        feed = self
                            .store
                            .watch(FeedStart::After(change.position), POLL)
                            .await?;
                    }
                    last_saved = Instant::now();
                }
                Ok(None) => {
                    if last_saved.elapsed() >= IDLE_SAVE {
                        save(apply, feed.position()).await?;
                        last_saved = Instant::now();
                    }
                }
                Err(FeedError::HistoryLost(err)) => {
                    tracing::error!(error = %telemetry::ErrorChain(&err), "change history lost while tailing; flushing every cache");
                    metrics::counter!("invalidator_history_lost_total").increment(1);
                    feed = self.open_fresh(apply, "history_lost").await?;
                    save(apply, feed.position()).await?;
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Opens the feed after the saved position; from now (flushing every
    /// cache) when there is none or the history since it is lost.
    async fn open(&self, apply: &Apply) -> Result<ChangeFeed, TailError> {
        let saved = self.positions.saved_position().await?;
        let Some(position) = saved.as_deref().and_then(FeedPosition::parse) else {
            tracing::info!("no saved position; flushing every cache and starting from now");
            return self.open_fresh(apply, "fresh_start").await;
        };
        match self.store.watch(FeedStart::After(position), POLL).await {
            Ok(feed) => {
                tracing::info!("resumed the change feed from the saved position");
                Ok(feed)
            }
            Err(FeedError::HistoryLost(err)) => {
                tracing::error!(error = %telemetry::ErrorChain(&err), "change history lost; flushing every cache and starting from now");
                metrics::counter!("invalidator_history_lost_total").increment(1);
                self.open_fresh(apply, "history_lost").await
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Opens the feed from now, then flushes: a change made in between is in
    /// the new feed, or read after the flush — never lost.
    async fn open_fresh(
        &self,
        apply: &Apply,
        reason: &'static str,
    ) -> Result<ChangeFeed, TailError> {
        let feed = self.store.watch(FeedStart::Now, POLL).await?;
        apply.flush(reason).await?;
        Ok(feed)
    }
}

/// Saves the feed's position (its post-batch resume position). Takes the
/// position, not the feed: a feed is not shared across an await.
async fn save(apply: &Apply, position: Option<FeedPosition>) -> Result<(), ApplyError> {
    match position {
        Some(position) => apply.save_position(position.as_str()).await,
        None => Ok(()),
    }
}
