//! The change stream loop: one leader tails the collection and applies each
//! change to Redis, then announces it; standbys wait for the lease.

use crate::change::{self, Plan};
use crate::lease::Lease;
use crate::publish::{PublishError, Publisher};
use bson::{Bson, Document};
use feature_store::FeatureStore;
use invalidation::{Invalidation, Op};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::{ChangeStreamEvent, ResumeToken};
use mongodb::options::FullDocumentType;
use settings::InvalidationMode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::broadcast;
use tracing::Instrument;

/// Server error codes that mean the stream cannot resume where it was.
const HISTORY_LOST: i32 = 286; // ChangeStreamHistoryLost
const FATAL: i32 = 280; // ChangeStreamFatalError
const INVALID_RESUME_TOKEN: i32 = 260;
/// How long one getMore waits for events, so shutdown and lease loss are
/// noticed between calls without cancelling the stream mid-call.
const POLL: Duration = Duration::from_millis(250);
/// How often the resume token is saved while no events arrive.
const IDLE_TOKEN_SAVE: Duration = Duration::from_secs(1);

/// Observable state, for `/health` and tests.
#[derive(Debug, Default)]
pub struct WorkerStatus {
    pub leading: AtomicBool,
    pub events: AtomicU64,
}

pub struct Worker {
    store: FeatureStore,
    publisher: Publisher,
    lease: Lease,
    mode: InvalidationMode,
    run_id: String,
    seq: u64,
    status: Arc<WorkerStatus>,
}

/// Why leading stopped.
enum Stop {
    Shutdown,
    LostLease,
}

impl Worker {
    pub fn new(
        store: FeatureStore,
        publisher: Publisher,
        lease: Lease,
        mode: InvalidationMode,
        run_id: String,
        status: Arc<WorkerStatus>,
    ) -> Self {
        Self {
            store,
            publisher,
            lease,
            mode,
            run_id,
            seq: 0,
            status,
        }
    }

    /// Stands by until it holds the lease, leads until it loses it, and so on
    /// until shutdown; then releases the lease.
    pub async fn run(mut self, mut shutdown: broadcast::Receiver<()>) {
        let stopping = Arc::new(AtomicBool::new(false));
        {
            let stopping = Arc::clone(&stopping);
            let mut shutdown = shutdown.resubscribe();
            tokio::spawn(async move {
                let _ = shutdown.recv().await;
                stopping.store(true, Ordering::SeqCst);
            });
        }
        let retry = self.lease.duration() / 3;
        loop {
            let holder = match self.lease.try_acquire().await {
                Ok(Some(holder)) => holder,
                Ok(None) => {
                    tokio::select! {
                        _ = shutdown.recv() => return,
                        () = tokio::time::sleep(retry) => continue,
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot reach Redis for the lease; retrying");
                    tokio::select! {
                        _ = shutdown.recv() => return,
                        () = tokio::time::sleep(retry) => continue,
                    }
                }
            };
            tracing::info!(%holder, "became the leader");
            metrics::counter!("invalidator_leadership_changes_total", "role" => "leader")
                .increment(1);
            self.status.leading.store(true, Ordering::SeqCst);
            let lost = Arc::new(AtomicBool::new(false));
            let renewer =
                tokio::spawn(renew(self.lease.clone(), holder.clone(), Arc::clone(&lost)));

            let stop = self.lead(&holder, &stopping, &lost).await;

            renewer.abort();
            self.status.leading.store(false, Ordering::SeqCst);
            metrics::counter!("invalidator_leadership_changes_total", "role" => "standby")
                .increment(1);
            match stop {
                Stop::Shutdown => {
                    if let Err(err) = self.lease.release(&holder).await {
                        tracing::warn!(error = %err, "could not release the lease; it expires by itself");
                    }
                    tracing::info!("released the lease");
                    return;
                }
                Stop::LostLease => tracing::warn!("lost the lease; standing by"),
            }
        }
    }

    /// Tails the change stream while this process holds the lease. Errors
    /// reopen the stream from the saved token with backoff.
    async fn lead(&mut self, holder: &str, stopping: &AtomicBool, lost: &AtomicBool) -> Stop {
        let mut backoff = Duration::from_millis(100);
        loop {
            if stopping.load(Ordering::SeqCst) {
                return Stop::Shutdown;
            }
            if lost.load(Ordering::SeqCst) {
                return Stop::LostLease;
            }
            match self.tail(holder, stopping, lost).await {
                Ok(stop) => return stop,
                Err(TailError::Fenced) => return Stop::LostLease,
                Err(TailError::Other(reason)) => {
                    metrics::counter!("invalidator_stream_restarts_total").increment(1);
                    tracing::warn!(%reason, backoff_ms = backoff.as_millis() as u64, "change stream failed; reopening from the saved token");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn tail(
        &mut self,
        holder: &str,
        stopping: &AtomicBool,
        lost: &AtomicBool,
    ) -> Result<Stop, TailError> {
        let saved = self
            .publisher
            .load_token()
            .await
            .map_err(TailError::redis)?;
        let mut stream = match saved.as_deref().and_then(parse_token) {
            Some(token) => match self.open(Some(token)).await {
                Ok(stream) => {
                    tracing::info!("resumed the change stream from the saved token");
                    stream
                }
                Err(err) if is_history_lost(&err) => {
                    tracing::error!(error = %err, "change history lost; flushing every cache and starting from now");
                    metrics::counter!("invalidator_history_lost_total").increment(1);
                    // Open first, flush second: a change made in between is
                    // in the new stream, or read after the flush — never lost.
                    let stream = self.open(None).await.map_err(TailError::mongo)?;
                    self.flush("history_lost", holder).await?;
                    stream
                }
                Err(err) => return Err(TailError::mongo(err)),
            },
            None => {
                tracing::info!("no saved resume token; flushing every cache and starting from now");
                let stream = self.open(None).await.map_err(TailError::mongo)?;
                self.flush("fresh_start", holder).await?;
                stream
            }
        };
        // Make the starting point durable at once, so a crash before the
        // first event still resumes from here.
        self.save_position(stream.resume_token(), holder).await?;

        let mut last_saved = Instant::now();
        loop {
            if stopping.load(Ordering::SeqCst) {
                self.save_position(stream.resume_token(), holder).await?;
                return Ok(Stop::Shutdown);
            }
            if lost.load(Ordering::SeqCst) {
                return Ok(Stop::LostLease);
            }
            match stream.next_if_any().await {
                Ok(Some(event)) => {
                    let token = token_string(&event.id).unwrap_or_default();
                    let restart = self.handle(&event, &token, holder).await?;
                    last_saved = Instant::now();
                    if restart {
                        tracing::info!("change stream invalidated; reopening after it");
                        stream = self
                            .open_after(event.id.clone())
                            .await
                            .map_err(TailError::mongo)?;
                    }
                }
                Ok(None) => {
                    if last_saved.elapsed() >= IDLE_TOKEN_SAVE {
                        self.save_position(stream.resume_token(), holder).await?;
                        last_saved = Instant::now();
                    }
                }
                Err(err) if is_history_lost(&err) => {
                    tracing::error!(error = %err, "change history lost while tailing; flushing every cache");
                    metrics::counter!("invalidator_history_lost_total").increment(1);
                    stream = self.open(None).await.map_err(TailError::mongo)?;
                    self.flush("history_lost", holder).await?;
                    self.save_position(stream.resume_token(), holder).await?;
                }
                Err(err) => return Err(TailError::mongo(err)),
            }
        }
    }

    /// Saves the stream's position (its post-batch resume token).
    async fn save_position(
        &self,
        position: Option<ResumeToken>,
        holder: &str,
    ) -> Result<(), TailError> {
        if let Some(token) = position.as_ref().and_then(token_string) {
            self.publisher.save_token(&token, holder).await?;
        }
        Ok(())
    }

    async fn open(
        &self,
        after: Option<ResumeToken>,
    ) -> mongodb::error::Result<ChangeStream<ChangeStreamEvent<Document>>> {
        let watch = self
            .store
            .collection()
            .watch()
            .full_document(FullDocumentType::UpdateLookup)
            .max_await_time(POLL);
        // `startAfter` resumes from normal and invalidate events alike.
        match after {
            Some(token) => watch.start_after(token).await,
            None => watch.await,
        }
    }

    async fn open_after(
        &self,
        token: ResumeToken,
    ) -> mongodb::error::Result<ChangeStream<ChangeStreamEvent<Document>>> {
        self.open(Some(token)).await
    }

    /// Applies one event: Redis first, then the announcement together with
    /// the resume token. Returns whether the stream must be reopened.
    async fn handle(
        &mut self,
        event: &ChangeStreamEvent<Document>,
        token: &str,
        holder: &str,
    ) -> Result<bool, TailError> {
        let plan = change::plan(event, self.mode);
        let op_label = match &plan {
            Plan::Offer { op, .. } => op.as_str(),
            Plan::Flush { .. } => "flush",
            Plan::Skip => "skip",
        };
        metrics::counter!("invalidator_events_total", "op" => op_label).increment(1);
        self.status.events.fetch_add(1, Ordering::Relaxed);
        let lag_origin = event.wall_time.map(|t| t.timestamp_millis());
        let span = tracing::info_span!(
            "invalidator.change",
            otel.kind = "consumer",
            op = op_label,
            customer_id = tracing::field::Empty,
            version = tracing::field::Empty,
            lag_redis_ms = tracing::field::Empty,
            lag_published_ms = tracing::field::Empty,
        );
        if let Plan::Offer {
            traceparent: Some(parent),
            ..
        } = &plan
        {
            telemetry::propagation::continue_from_traceparent(&span, parent);
        }
        async {
            match plan {
                Plan::Skip => {
                    self.publisher.save_token(token, holder).await?;
                    Ok(false)
                }
                Plan::Flush { reason, restart } => {
                    self.flush(reason, holder).await?;
                    // The flush message was announced with the token before
                    // `flush` returned; nothing else to save.
                    self.publisher.save_token(token, holder).await?;
                    Ok(restart)
                }
                Plan::Offer { entry, op, stamp, .. } => {
                    let span = tracing::Span::current();
                    span.record("customer_id", entry.customer_id());
                    span.record("version", entry.version());
                    self.publisher.offer(&entry, holder).await?;
                    observe_lag("redis", lag_origin, &span, "lag_redis_ms");
                    let message = self.message(Some(entry.customer_id().to_owned()), op, entry.version(), event);
                    self.publisher.announce(&message, token, holder).await?;
                    observe_lag("published", lag_origin, &span, "lag_published_ms");
                    tracing::debug!(customer_id = entry.customer_id(), op = op.as_str(), version = entry.version(), "change applied");
                    if let Some(seen) = stamp {
                        match self.store.stamp_version(entry.customer_id(), seen).await {
                            Ok(true) => tracing::info!(customer_id = entry.customer_id(), "gave a new version to a change made without one"),
                            Ok(false) => {}
                            Err(err) => tracing::warn!(error = %err, "could not stamp a version; the document stays fenced until it changes"),
                        }
                    }
                    Ok(false)
                }
            }
        }
        .instrument(span.clone())
        .await
    }

    /// Drops every cached document and announces a flush to every replica.
    async fn flush(&mut self, reason: &'static str, holder: &str) -> Result<(), TailError> {
        let removed = self
            .publisher
            .flush_cache()
            .await
            .map_err(TailError::redis)?;
        tracing::warn!(reason, removed, "flushed the cache");
        metrics::counter!("invalidator_flushes_total", "reason" => reason).increment(1);
        let message = Invalidation {
            customer_id: None,
            op: Op::Flush,
            version: 0,
            cluster_time: invalidation::ClusterTime { t: 0, i: 0 },
            seq: self.next_seq(),
            run_id: self.run_id.clone(),
            traceparent: None,
            stream_id: None,
        };
        let token = self
            .publisher
            .load_token()
            .await
            .map_err(TailError::redis)?
            .unwrap_or_default();
        self.publisher.announce(&message, &token, holder).await?;
        Ok(())
    }

    fn message(
        &mut self,
        customer_id: Option<String>,
        op: Op,
        version: i64,
        event: &ChangeStreamEvent<Document>,
    ) -> Invalidation {
        Invalidation {
            customer_id,
            op,
            version,
            cluster_time: change::cluster_time(event),
            seq: self.next_seq(),
            run_id: self.run_id.clone(),
            traceparent: telemetry::propagation::current_traceparent(),
            stream_id: None,
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }
}

/// Renews the lease every third of its duration; marks it lost when Redis
/// says another holder has it, or when it could not be renewed for so long
/// that it has expired.
async fn renew(lease: Lease, holder: String, lost: Arc<AtomicBool>) {
    let period = lease.duration() / 3;
    let mut last_renewed = Instant::now();
    loop {
        tokio::time::sleep(period).await;
        match lease.renew(&holder).await {
            Ok(true) => last_renewed = Instant::now(),
            Ok(false) => {
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not renew the lease");
                if last_renewed.elapsed() >= lease.duration() {
                    lost.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
    }
}

fn observe_lag(
    stage: &'static str,
    origin_ms: Option<i64>,
    span: &tracing::Span,
    field: &'static str,
) {
    if let Some(origin) = origin_ms {
        let lag_ms = (chrono::Utc::now().timestamp_millis() - origin).max(0);
        metrics::histogram!("invalidation_lag_seconds", "stage" => stage)
            .record(lag_ms as f64 / 1000.0);
        span.record(field, lag_ms);
    }
}

enum TailError {
    Fenced,
    Other(String),
}

impl TailError {
    fn mongo(err: mongodb::error::Error) -> Self {
        Self::Other(format!("MongoDB: {err}"))
    }

    fn redis(err: redis::RedisError) -> Self {
        Self::Other(format!("Redis: {err}"))
    }
}

impl From<PublishError> for TailError {
    fn from(err: PublishError) -> Self {
        match err {
            PublishError::Fenced => Self::Fenced,
            PublishError::Redis(err) => Self::redis(err),
        }
    }
}

fn is_history_lost(err: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    match &*err.kind {
        ErrorKind::Command(command) => {
            matches!(command.code, HISTORY_LOST | FATAL | INVALID_RESUME_TOKEN)
        }
        _ => false,
    }
}

/// Resume tokens are stored as relaxed extended JSON.
fn token_string(token: &ResumeToken) -> Option<String> {
    bson::to_bson(token)
        .ok()
        .map(|b| b.into_relaxed_extjson().to_string())
}

fn parse_token(raw: &str) -> Option<ResumeToken> {
    let json: serde_json::Value = serde_json::from_str(raw).ok()?;
    let bson = Bson::try_from(json).ok()?;
    bson::from_bson(bson).ok()
}
