//! Tailing the change feed for one leadership term: open it where the last
//! term left off (or from now, flushing every cache, when that position is
//! lost), apply each change in order, and save the position — with each
//! change's announcement, and every second while the feed is idle.
//!
//! Between changes (and at every idle poll) the operator requests queued
//! for the leader are handled ([`Apply::requests`]).
//!
//! A feed that fails the same way at the same position again and again is
//! not retried forever: a position the server keeps refusing is treated as
//! lost, and a change the server keeps failing to deliver is stepped over
//! (its cached entry removed) — each after [`MAX_ATTEMPTS`].

use crate::apply::{Apply, ApplyError, Next};
use crate::worker::Progress;
use feature_store::{
    Change, ChangeFeed, ChangeFeeds, ChangeKind, FeedContent, FeedError, FeedPosition, FeedStart,
};
use invalidation::Announcer;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

/// How long one poll of the feed waits for changes, so the end of a term is
/// noticed between polls without cancelling one half-way.
pub const POLL: Duration = Duration::from_millis(250);
/// How often the position is saved while no changes arrive.
const IDLE_SAVE: Duration = Duration::from_secs(1);
/// How often, at most, operator requests are looked for while changes
/// stream in (while the feed is idle: once per poll).
const REQUESTS_CHECK: Duration = Duration::from_millis(100);
/// Reopening a failed feed waits this long at first, doubling up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Failures in a row at one position, with an answer that will not change,
/// before the position is given up (opening) or its change stepped over
/// (reading).
pub const MAX_ATTEMPTS: u32 = 3;
/// Polls of a keys-only feed spent looking for the change to step over.
const STEP_OVER_POLLS: u32 = 40;

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

/// Where the feed last failed, with an answer that will not change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Open,
    Read,
    /// Applying the change at that position (retried, never stepped over:
    /// its cache work must happen).
    Apply,
}

/// Failures in a row at one saved position.
#[derive(Debug, Default)]
struct Trouble {
    at: Option<(Option<String>, Stage)>,
    attempts: u32,
}

/// What to do about the saved position before opening.
#[derive(Debug, PartialEq, Eq)]
enum Recovery {
    Resume,
    /// The server keeps refusing the position: treat it as lost.
    StartFresh,
    /// The server keeps failing to deliver the change after it: step over.
    StepOver,
}

impl Trouble {
    fn failed(&mut self, position: Option<&str>, stage: Stage) {
        let at = (position.map(str::to_owned), stage);
        if self.at.as_ref() == Some(&at) {
            self.attempts += 1;
        } else {
            self.at = Some(at);
            self.attempts = 1;
        }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }

    /// Whether applying the change at `position` has failed too often.
    fn stuck_at(&self, position: &str) -> bool {
        self.attempts >= MAX_ATTEMPTS
            && matches!(&self.at, Some((Some(at), Stage::Apply)) if at == position)
    }

    /// The recovery for `saved`, consuming the trouble when it is due.
    fn recovery(&mut self, saved: Option<&str>) -> Recovery {
        let due = self.attempts >= MAX_ATTEMPTS
            && self
                .at
                .as_ref()
                .is_some_and(|(position, _)| position.as_deref() == saved);
        if !due {
            return Recovery::Resume;
        }
        match self.at.as_ref().map(|(_, stage)| *stage) {
            Some(Stage::Read) => {
                self.clear();
                Recovery::StepOver
            }
            Some(Stage::Open) => {
                self.clear();
                Recovery::StartFresh
            }
            _ => Recovery::Resume,
        }
    }
}

/// The change feed and where its position is saved.
#[derive(Clone)]
pub struct Tail {
    feeds: ChangeFeeds,
    positions: Announcer,
    progress: Progress,
}

impl Tail {
    pub fn new(feeds: ChangeFeeds, positions: Announcer, progress: Progress) -> Self {
        Self {
            feeds,
            positions,
            progress,
        }
    }

    /// Tails until the term ends; a failing feed is reopened from the saved
    /// position with backoff.
    pub async fn run(&self, apply: &Apply, term: &CancellationToken) -> TermEnd {
        let mut backoff = FIRST_BACKOFF;
        let mut trouble = Trouble::default();
        loop {
            if term.is_cancelled() {
                return TermEnd::Ended;
            }
            match self.follow(apply, term, &mut trouble).await {
                Ok(()) => return TermEnd::Ended,
                Err(TailError::Apply(ApplyError::Fenced)) => return TermEnd::Fenced,
                Err(err) => {
                    metrics::counter!("invalidator_stream_restarts_total").increment(1);
                    tracing::warn!(
                        error = %telemetry::ErrorChain(&err),
                        backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                        attempts_at_this_position = trouble.attempts,
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
    async fn follow(
        &self,
        apply: &Apply,
        term: &CancellationToken,
        trouble: &mut Trouble,
    ) -> Result<(), TailError> {
        let saved = self.positions.saved_position().await?;
        let feed = match trouble.recovery(saved.as_deref()) {
            Recovery::Resume => self.open(apply, saved.as_deref(), trouble).await?,
            Recovery::StartFresh => {
                tracing::error!(
                    position = saved.as_deref().unwrap_or(""),
                    attempts = MAX_ATTEMPTS,
                    "the server keeps refusing to resume from the saved position; treating it as lost"
                );
                metrics::counter!("invalidator_history_lost_total", "reason" => "position_refused")
                    .increment(1);
                self.open_fresh(apply, "position_refused").await?
            }
            Recovery::StepOver => self.step_over(apply, saved.as_deref()).await?,
        };
        // Opening is not progress: a change that cannot be applied would
        // otherwise look like a live feed on every reopen.
        // Make the starting point durable at once, so a crash before the
        // first change still resumes from here.
        let mut position = feed.position();
        save(apply, position.clone()).await?;
        let mut reader = Reader::start(feed);
        let mut last_saved = Instant::now();
        let mut requests_checked: Option<Instant> = None;
        let mut held: Option<Read> = None;
        loop {
            // Between batches, never inside one: a request's announcement
            // re-saves the position the last batch saved.
            if requests_checked.is_none_or(|at| at.elapsed() >= REQUESTS_CHECK) {
                apply.requests().await?;
                requests_checked = Some(Instant::now());
            }
            let read = match held.take() {
                Some(read) => read,
                None => tokio::select! {
                    () = term.cancelled() => {
                        save(apply, position).await?;
                        return Ok(());
                    }
                    read = reader.next() => read,
                },
            };
            match read {
                Read::Change(first) => {
                    // The changes already read behind it go with it.
                    let mut batch = vec![first];
                    while batch.len() < BATCH_MAX {
                        match reader.ready() {
                            Some(Read::Change(change)) => batch.push(change),
                            Some(other) => {
                                held = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    let first_position = batch[0].position.as_str().to_owned();
                    // Changes read are progress, unless applying them has
                    // failed again and again: then the lease goes to a
                    // standby and `/health` says the feed is stalled.
                    if !trouble.stuck_at(&first_position) {
                        self.progress.mark();
                    }
                    metrics::histogram!("invalidator_batch_changes").record(batch.len() as f64);
                    let next = match apply.batch(&batch).await {
                        Ok(next) => next,
                        Err(err) => {
                            trouble.failed(Some(&first_position), Stage::Apply);
                            return Err(err.into());
                        }
                    };
                    trouble.clear();
                    let last = batch.last().map(|change| change.position.clone());
                    position = last.clone().or(position);
                    if next == Next::Reopen {
                        tracing::info!("change feed ended; reopening after its last change");
                        if let Some(after) = last {
                            let feed = self
                                .feeds
                                .watch(FeedStart::After(after), FeedContent::Full)
                                .await?;
                            reader = Reader::start(feed);
                            held = None;
                        }
                    }
                    last_saved = Instant::now();
                }
                Read::Idle(at) => {
                    self.progress.mark();
                    trouble.clear();
                    position = at.or(position);
                    if last_saved.elapsed() >= IDLE_SAVE {
                        save(apply, position.clone()).await?;
                        last_saved = Instant::now();
                    }
                }
                Read::Failed(FeedError::HistoryLost(err)) => {
                    tracing::error!(error = %telemetry::ErrorChain(&err), "change history lost while tailing; flushing every cache");
                    metrics::counter!("invalidator_history_lost_total", "reason" => "history_lost")
                        .increment(1);
                    let feed = self.open_fresh(apply, "history_lost").await?;
                    position = feed.position();
                    save(apply, position.clone()).await?;
                    reader = Reader::start(feed);
                }
                Read::Failed(err) => {
                    if !err.is_transient() {
                        let at = self.positions.saved_position().await.ok().flatten();
                        trouble.failed(at.as_deref(), Stage::Read);
                    }
                    return Err(err.into());
                }
            }
        }
    }

    /// Opens the feed after the saved position; from now (flushing every
    /// cache) when there is none or the history since it is lost.
    async fn open(
        &self,
        apply: &Apply,
        saved: Option<&str>,
        trouble: &mut Trouble,
    ) -> Result<ChangeFeed, TailError> {
        let Some(position) = saved.and_then(FeedPosition::parse) else {
            tracing::info!("no saved position; flushing every cache and starting from now");
            return self.open_fresh(apply, "fresh_start").await;
        };
        match self
            .feeds
            .watch(FeedStart::After(position), FeedContent::Full)
            .await
        {
            Ok(feed) => {
                tracing::info!("resumed the change feed from the saved position");
                Ok(feed)
            }
            Err(FeedError::HistoryLost(err)) => {
                tracing::error!(error = %telemetry::ErrorChain(&err), "change history lost; flushing every cache and starting from now");
                metrics::counter!("invalidator_history_lost_total", "reason" => "history_lost")
                    .increment(1);
                self.open_fresh(apply, "history_lost").await
            }
            Err(err) => {
                if !err.is_transient() {
                    trouble.failed(saved, Stage::Open);
                }
                Err(err.into())
            }
        }
    }

    /// Opens the feed from now, then flushes: a change made in between is in
    /// the new feed, or read after the flush — never lost.
    async fn open_fresh(
        &self,
        apply: &Apply,
        reason: &'static str,
    ) -> Result<ChangeFeed, TailError> {
        let feed = self.feeds.watch(FeedStart::Now, FeedContent::Full).await?;
        apply.flush(reason).await?;
        Ok(feed)
    }

    /// The server keeps failing to deliver the change after `saved` (too
    /// large, or otherwise refused): read it again without its content, which
    /// gives its key and position, remove its cached entry (every entry when
    /// the key is unknown), and go on after it.
    async fn step_over(&self, apply: &Apply, saved: Option<&str>) -> Result<ChangeFeed, TailError> {
        let start = match saved.and_then(FeedPosition::parse) {
            Some(position) => FeedStart::After(position),
            None => return self.open_fresh(apply, "fresh_start").await,
        };
        let mut keys = self
            .feeds
            .watch(start.clone(), FeedContent::KeysOnly)
            .await?;
        for _ in 0..STEP_OVER_POLLS {
            if let Some(change) = keys.next().await? {
                let undeliverable = Change {
                    kind: match change.kind {
                        ChangeKind::Written { customer_id, .. }
                        | ChangeKind::Deleted { customer_id, .. } => ChangeKind::Unreadable {
                            customer_id: Some(customer_id),
                            reason: format!(
                                "the server failed {MAX_ATTEMPTS} times to deliver this change"
                            ),
                        },
                        other => other,
                    },
                    ..change
                };
                apply.change(&undeliverable).await?;
                return Ok(self
                    .feeds
                    .watch(FeedStart::After(undeliverable.position), FeedContent::Full)
                    .await?);
            }
        }
        // Nothing to step over after all: resume where we were.
        Ok(self.feeds.watch(start, FeedContent::Full).await?)
    }
}

/// The most changes applied together ([`Apply::batch`]).
const BATCH_MAX: usize = 256;
/// Changes read ahead of the one being applied, at most.
const READ_AHEAD: usize = 2 * BATCH_MAX;

/// What the reader found.
enum Read {
    Change(Change),
    /// No change within a poll; the feed's position (it moves on with
    /// events skipped on the server).
    Idle(Option<FeedPosition>),
    /// The feed failed; the reader stopped.
    Failed(FeedError),
}

/// Reads the feed ahead of the changes being applied, so the changes that
/// have arrived meanwhile are at hand to be applied together. It owns the
/// feed: nothing else touches it (the driver must never see a read
/// cancelled half-way and then be asked for its position), and dropping
/// the reader drops the feed with it.
struct Reader {
    reads: tokio::sync::mpsc::Receiver<Read>,
    task: tokio::task::JoinHandle<()>,
}

impl Reader {
    fn start(mut feed: ChangeFeed) -> Self {
        let (tx, reads) = tokio::sync::mpsc::channel(READ_AHEAD);
        let task = tokio::spawn(async move {
            loop {
                let (read, stop) = match feed.next().await {
                    Ok(Some(change)) => {
                        crate::apply::record_lag("feed", &change);
                        let ends = matches!(&change.kind, ChangeKind::CollectionGone(event) if event.ends_feed());
                        (Read::Change(change), ends)
                    }
                    Ok(None) => (Read::Idle(feed.position()), false),
                    Err(err) => (Read::Failed(err), true),
                };
                if tx.send(read).await.is_err() || stop {
                    return;
                }
            }
        });
        Self { reads, task }
    }

    /// The next read, waiting for it. A reader that stopped after its
    /// feed ended has nothing more: it answers as an idle feed would, once
    /// per poll, until the applier reopens the feed.
    async fn next(&mut self) -> Read {
        match self.reads.recv().await {
            Some(read) => read,
            None => {
                tokio::time::sleep(POLL).await;
                Read::Idle(None)
            }
        }
    }

    /// A read already at hand, without waiting.
    fn ready(&mut self) -> Option<Read> {
        self.reads.try_recv().ok()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_refused_again_and_again_is_given_up_and_a_change_stepped_over() {
        let mut trouble = Trouble::default();
        for _ in 1..MAX_ATTEMPTS {
            trouble.failed(Some("p1"), Stage::Open);
            assert_eq!(trouble.recovery(Some("p1")), Recovery::Resume);
        }
        trouble.failed(Some("p1"), Stage::Open);
        assert_eq!(
            trouble.recovery(Some("p2")),
            Recovery::Resume,
            "another position"
        );
        assert_eq!(trouble.recovery(Some("p1")), Recovery::StartFresh);
        assert_eq!(trouble.recovery(Some("p1")), Recovery::Resume, "consumed");

        for _ in 0..MAX_ATTEMPTS {
            trouble.failed(Some("p1"), Stage::Read);
        }
        assert_eq!(trouble.recovery(Some("p1")), Recovery::StepOver);
    }

    #[test]
    fn a_change_that_keeps_failing_to_apply_is_retried_but_stops_counting_as_progress() {
        let mut trouble = Trouble::default();
        for _ in 0..MAX_ATTEMPTS {
            assert!(!trouble.stuck_at("p1"));
            trouble.failed(Some("p1"), Stage::Apply);
        }
        assert!(trouble.stuck_at("p1"));
        assert!(!trouble.stuck_at("p2"));
        assert_eq!(trouble.recovery(Some("p1")), Recovery::Resume);
        assert!(trouble.stuck_at("p1"), "retried, never stepped over");
    }

    #[test]
    fn failures_elsewhere_start_the_count_again() {
        let mut trouble = Trouble::default();
        trouble.failed(Some("p1"), Stage::Read);
        trouble.failed(Some("p1"), Stage::Read);
        trouble.failed(Some("p2"), Stage::Read);
        trouble.failed(Some("p2"), Stage::Open);
        assert_eq!(trouble.attempts, 1);
        trouble.clear();
        assert_eq!(trouble.recovery(Some("p2")), Recovery::Resume);
    }
}
