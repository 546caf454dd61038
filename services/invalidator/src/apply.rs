//! One change's cache work: what the change means for the caches (a pure
//! [`plan`]), then the guarded write to Redis and the announcement to every
//! replica, both behind the term's fence. An [`Apply`] is made once per
//! leadership term. Operator requests (evictions) are cache work of the
//! same kind and go the same way ([`Apply::requests`]).

use crate::audit::AuditHandle;
use crate::worker::WorkerStatus;
use feature_cache::redis_tier::Writer;
use feature_cache::{
    CachedDocument, Entry, Fence, FencedWriteError, FencedWriter, Offer, RedisTier, WarmConfig,
};
use feature_store::{Change, ChangeKind, CustomerId, FeatureStore, WriteOp};
use fleet::{FencedRequestQueue, OperatorRequest, RequestKind, RequestQueue};
use invalidation::{Announcer, ClusterTime, FencedAnnouncer, Invalidation, InvalidationMode, Op};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use thiserror::Error;
use tracing::Instrument;

#[derive(Debug, Error)]
pub enum ApplyError {
    /// Another invalidator leads now: this term is over.
    #[error("fenced: another invalidator holds the lease")]
    Fenced,
    #[error("Redis failed")]
    Redis(#[source] redis::RedisError),
}

impl From<FencedWriteError> for ApplyError {
    fn from(err: FencedWriteError) -> Self {
        match err {
            FencedWriteError::Fenced => Self::Fenced,
            FencedWriteError::Redis(err) => Self::Redis(err),
        }
    }
}

impl From<feature_cache::TierError> for ApplyError {
    fn from(err: feature_cache::TierError) -> Self {
        match err {
            feature_cache::TierError::Redis(err) => Self::Redis(err),
        }
    }
}

/// The cache work for one change.
#[derive(Debug)]
pub enum Plan {
    /// Refresh Redis with the document through the version guard, then
    /// announce `op`.
    Refresh {
        document: CachedDocument,
        op: Op,
        traceparent: Option<String>,
    },
    /// Remove the customer's entry from Redis, then announce `op` at
    /// `version`. With `stamp`, the change came without a new version of its
    /// own (another tool wrote it): afterwards give the document one, so its
    /// content gets a version no cached copy can share (that write comes
    /// back as a change and refreshes every tier).
    Remove {
        customer_id: String,
        op: Op,
        version: i64,
        traceparent: Option<String>,
        stamp: Option<i64>,
    },
    /// Drop every cached document and tell every replica to do the same.
    /// `reopen`: the feed ended with this change and must be reopened after it.
    Flush { reason: &'static str, reopen: bool },
    /// Nothing to do for the caches (a change that touches no cached document).
    Skip,
}

impl Plan {
    fn label(&self) -> &'static str {
        match self {
            Self::Refresh { op, .. } | Self::Remove { op, .. } => op.as_str(),
            Self::Flush { .. } => "flush",
            Self::Skip => "skip",
        }
    }
}

/// Plans the cache work for a change: a pure function of the change and
/// the mode, tested without a database.
///
/// Only a change that advanced the version itself refreshes Redis; every
/// other change removes the entry, since its version cannot be trusted to
/// order it (an edit that kept it, a restore that lowered it, a delete whose
/// removed version is unknown). Absence is always safe: a reader then reads
/// MongoDB, and a fill that began before the change finds its reservation
/// gone.
pub fn plan(kind: &ChangeKind, mode: InvalidationMode) -> Plan {
    match kind {
        ChangeKind::Written {
            op,
            customer_id,
            document,
            version_advanced,
            traceparent,
        } => {
            let op = match op {
                WriteOp::Insert => Op::Insert,
                WriteOp::Update => Op::Update,
                WriteOp::Replace => Op::Replace,
            };
            let remove = |version: i64, stamp: Option<i64>| Plan::Remove {
                customer_id: customer_id.clone(),
                op,
                version,
                traceparent: traceparent.clone(),
                stamp,
            };
            let Some(document) = document else {
                // Gone again: its delete follows; drop what is cached now.
                return remove(0, None);
            };
            if document.customer_id != *customer_id {
                // Never cached under another customer's key.
                return remove(document.version, None);
            }
            if !version_advanced {
                return remove(document.version, Some(document.version));
            }
            if mode == InvalidationMode::Delete || document.is_expired(chrono::Utc::now()) {
                return remove(document.version, None);
            }
            Plan::Refresh {
                document: CachedDocument::from_document(document),
                op,
                traceparent: traceparent.clone(),
            }
        }
        ChangeKind::Unreadable {
            customer_id: Some(customer_id),
            ..
        } => Plan::Remove {
            customer_id: customer_id.clone(),
            op: Op::Update,
            version: 0,
            traceparent: None,
            stamp: None,
        },
        // Whose change it was cannot be known: every cached document is suspect.
        ChangeKind::Unreadable {
            customer_id: None, ..
        } => Plan::Flush {
            reason: "poison",
            reopen: false,
        },
        ChangeKind::Deleted {
            customer_id,
            version_bound,
        } => Plan::Remove {
            customer_id: customer_id.clone(),
            op: Op::Delete,
            version: *version_bound,
            traceparent: None,
            stamp: None,
        },
        ChangeKind::CollectionGone(event) => Plan::Flush {
            reason: event.as_str(),
            reopen: event.ends_feed(),
        },
        ChangeKind::Other => Plan::Skip,
    }
}

/// Whether a refresh found Redis above the store and removed the entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Removed {
    No,
    /// Removed; `stamp`: the store's version, to be replaced by a new one.
    Yes {
        stamp: Option<i64>,
    },
}

/// What the feed must do after a change was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// The feed ended with this change: reopen it after the change.
    Reopen,
}

/// Operator requests handled per look at the requests stream.
const REQUESTS_BATCH: usize = 100;

/// Applies changes for one leadership term.
pub struct Apply {
    writer: FencedWriter,
    announcer: FencedAnnouncer,
    requests: FencedRequestQueue,
    /// Reads the saved position (flushes re-save it).
    positions: Announcer,
    redis: RedisTier,
    store: FeatureStore,
    mode: InvalidationMode,
    status: Arc<WorkerStatus>,
    audit: AuditHandle,
    /// Puts the hottest keys back into Redis after a flush (`None`: off).
    warm: Option<WarmConfig>,
    /// The refill under way, stopped by the next flush or the term's end.
    refilling: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Apply {
    fn drop(&mut self) {
        self.stop_refill();
    }
}

/// What an [`Apply`] is made of, apart from the term's fence.
#[derive(Clone)]
pub struct ApplyParts {
    pub redis: RedisTier,
    pub announcer: Announcer,
    pub requests: RequestQueue,
    pub store: FeatureStore,
    pub mode: InvalidationMode,
    pub status: Arc<WorkerStatus>,
    /// Samples applied changes for the consistency audit.
    pub audit: AuditHandle,
    /// `WARM_KEYS` and its rate; `None` when 0.
    pub warm: Option<WarmConfig>,
}

impl Apply {
    /// The writers of one term, behind its fence.
    pub fn for_term(parts: &ApplyParts, fence: &Fence) -> Self {
        Self {
            writer: parts.redis.fenced(fence.clone()),
            announcer: parts.announcer.fenced(fence.clone()),
            requests: parts.requests.fenced(fence.clone()),
            positions: parts.announcer.clone(),
            redis: parts.redis.clone(),
            store: parts.store.clone(),
            mode: parts.mode,
            status: Arc::clone(&parts.status),
            audit: parts.audit.clone(),
            warm: parts.warm.clone(),
            refilling: Mutex::new(None),
        }
    }

    /// Applies one change: Redis first, then the announcement together with
    /// the change's position.
    pub async fn change(&self, change: &Change) -> Result<Next, ApplyError> {
        let plan = plan(&change.kind, self.mode);
        let op_label = plan.label();
        metrics::counter!("invalidator_events_total", "op" => op_label).increment(1);
        self.status.events.fetch_add(1, Ordering::Relaxed);
        if let ChangeKind::Unreadable {
            customer_id,
            reason,
        } = &change.kind
        {
            metrics::counter!("invalidator_poison_events_total").increment(1);
            tracing::error!(
                customer_id = customer_id.as_deref().unwrap_or("(unknown)"),
                %reason,
                position = change.position.as_str(),
                "a change cannot be read; skipped it, removing its cached entry (every entry when its key is unknown)"
            );
        }
        let span = tracing::info_span!(
            "invalidator.change",
            otel.kind = "consumer",
            op = op_label,
            customer_id = tracing::field::Empty,
            version = tracing::field::Empty,
            lag_redis_ms = tracing::field::Empty,
            lag_published_ms = tracing::field::Empty,
        );
        if let Plan::Refresh {
            traceparent: Some(parent),
            ..
        }
        | Plan::Remove {
            traceparent: Some(parent),
            ..
        } = &plan
        {
            telemetry::propagation::continue_from_traceparent(&span, parent);
        }
        let position = change.position.as_str();
        async {
            match plan {
                Plan::Skip => {
                    self.announcer.save_position(position).await?;
                }
                Plan::Flush { reason, reopen } => {
                    self.flush(reason).await?;
                    self.announcer.save_position(position).await?;
                    if reopen {
                        return Ok(Next::Reopen);
                    }
                }
                Plan::Refresh { document, op, .. } => {
                    let entry = Entry::Document(document);
                    let (customer_id, version) = (entry.customer_id(), entry.version());
                    record_target(customer_id, version);
                    let removed = match self.writer.offer(&entry).await {
                        Ok(Offer::Refused {
                            holds: Some(cached),
                        }) => self.above_the_store(customer_id, cached).await?,
                        Ok(_) => Removed::No,
                        // Full, and not allowed to evict: removing still works
                        // (it frees memory), and absence is always safe.
                        Err(FencedWriteError::Redis(err)) if err.code() == Some("OOM") => {
                            tracing::warn!(
                                customer_id,
                                "Redis is full; removed the entry instead of refreshing it"
                            );
                            self.writer.remove(customer_id).await?;
                            Removed::Yes { stamp: None }
                        }
                        Err(err) => return Err(err.into()),
                    };
                    let ordered = removed == Removed::No;
                    self.announce(change, customer_id, op, version, ordered, position)
                        .await?;
                    if let Removed::Yes { stamp: Some(seen) } = removed {
                        self.stamp(customer_id, seen).await;
                    }
                }
                Plan::Remove {
                    customer_id,
                    op,
                    version,
                    stamp,
                    ..
                } => {
                    record_target(&customer_id, version);
                    self.writer.remove(&customer_id).await?;
                    self.announce(change, &customer_id, op, version, false, position)
                        .await?;
                    if let Some(seen) = stamp {
                        self.stamp(&customer_id, seen).await;
                    }
                }
            }
            // Applied: the audit's clock starts now (in this span, whose
            // trace the audit's log and repair carry).
            self.audit
                .offer(&change.kind, telemetry::propagation::current_traceparent);
            Ok(Next::Continue)
        }
        .instrument(span)
        .await
    }

    /// Applies changes already at hand together, in their order: the
    /// guarded Redis writes of the batch in one pipeline (removals in
    /// another), one wait for the replicas, then one announcement script per
    /// partition (each keeping its changes' order) and the position after
    /// the batch's last change saved once they all landed. A failure
    /// anywhere repeats the whole batch from the position saved before it:
    /// at least once, and idempotent by the version guard. A batch holding
    /// anything but writes and deletes of single documents (a flush, an
    /// event to skip, an unreadable change) goes one change at a time.
    pub async fn batch(&self, changes: &[Change]) -> Result<Next, ApplyError> {
        let plans: Vec<Plan> = changes.iter().map(|c| plan(&c.kind, self.mode)).collect();
        let simple = plans.iter().zip(changes).all(|(plan, change)| {
            matches!(plan, Plan::Refresh { .. } | Plan::Remove { .. })
                && !matches!(change.kind, ChangeKind::Unreadable { .. })
        });
        let (Some(last), true, true) = (changes.last(), simple, changes.len() > 1) else {
            return self.one_by_one(changes).await;
        };
        for plan in &plans {
            metrics::counter!("invalidator_events_total", "op" => plan.label()).increment(1);
        }
        self.status
            .events
            .fetch_add(changes.len() as u64, Ordering::Relaxed);

        let refreshes: Vec<(Entry, Writer)> = plans
            .iter()
            .filter_map(|plan| match plan {
                Plan::Refresh { document, .. } => {
                    Some((Entry::Document(document.clone()), Writer::Ordered))
                }
                _ => None,
            })
            .collect();
        let offers = match self.writer.fill_many(&refreshes).await {
            Ok(offers) => offers,
            // Full: the one-by-one path removes instead of refreshing.
            Err(FencedWriteError::Redis(err)) if err.code() == Some("OOM") => {
                return self.one_by_one(changes).await;
            }
            Err(err) => return Err(err.into()),
        };
        let mut offers = offers.into_iter();
        let mut removals: Vec<&str> = Vec::new();
        // Per change: (customer, op, version, ordered, stamp, traceparent).
        let mut planned = Vec::with_capacity(plans.len());
        for plan in &plans {
            match plan {
                Plan::Refresh {
                    document,
                    op,
                    traceparent,
                } => {
                    let removed = match offers.next() {
                        Some(Offer::Refused {
                            holds: Some(cached),
                        }) => self.above_the_store(document.customer_id(), cached).await?,
                        _ => Removed::No,
                    };
                    let stamp = match removed {
                        Removed::Yes { stamp } => stamp,
                        Removed::No => None,
                    };
                    planned.push((
                        document.customer_id(),
                        *op,
                        document.version(),
                        removed == Removed::No,
                        stamp,
                        traceparent.clone(),
                    ));
                }
                Plan::Remove {
                    customer_id,
                    op,
                    version,
                    traceparent,
                    stamp,
                } => {
                    removals.push(customer_id);
                    planned.push((
                        customer_id.as_str(),
                        *op,
                        *version,
                        false,
                        *stamp,
                        traceparent.clone(),
                    ));
                }
                Plan::Flush { .. } | Plan::Skip => {}
            }
        }
        self.writer.remove_many(&removals).await?;
        self.writer.await_replicas().await;
        let span = tracing::Span::current();
        for change in changes {
            observe_lag("redis", change, &span, "lag_redis_ms");
        }
        let messages: Vec<Invalidation> = planned
            .iter()
            .zip(changes)
            .map(
                |((customer_id, op, version, ordered, _, traceparent), change)| {
                    change_message(
                        change,
                        customer_id,
                        *op,
                        *version,
                        *ordered,
                        traceparent.clone(),
                    )
                },
            )
            .collect();
        self.announcer
            .announce_batch(&messages, last.position.as_str())
            .await?;
        for ((customer_id, _, _, _, stamp, _), change) in planned.iter().zip(changes) {
            observe_lag("published", change, &span, "lag_published_ms");
            if let Some(seen) = stamp {
                self.stamp(customer_id, *seen).await;
            }
            self.audit
                .offer(&change.kind, telemetry::propagation::current_traceparent);
        }
        Ok(Next::Continue)
    }

    /// [`Apply::change`] for each change in turn, stopping at a feed's end.
    async fn one_by_one(&self, changes: &[Change]) -> Result<Next, ApplyError> {
        for change in changes {
            if self.change(change).await? == Next::Reopen {
                return Ok(Next::Reopen);
            }
        }
        Ok(Next::Continue)
    }

    /// Redis refused a change's document because it holds a higher version.
    /// Normally a newer write filled it first; but when MongoDB itself now
    /// holds a lower version than Redis (a restore, a rewrite by another
    /// tool), Redis is above the truth: remove the entry and return the
    /// store's version, to be stamped with a new one.
    async fn above_the_store(&self, customer_id: &str, cached: i64) -> Result<Removed, ApplyError> {
        let current = match CustomerId::parse(customer_id) {
            Ok(id) => self.store.get(&id).await,
            Err(_) => Ok(None),
        };
        let stamp = match current {
            Ok(Some(current)) if current.version >= cached => return Ok(Removed::No),
            Ok(current) => {
                tracing::warn!(
                    customer_id,
                    cached,
                    stored = current.as_ref().map(|d| d.version),
                    "Redis held a version above MongoDB's; removed"
                );
                metrics::counter!("invalidator_versions_lowered_total").increment(1);
                current.map(|d| d.version)
            }
            Err(err) => {
                // Cannot tell: removing is always safe.
                tracing::warn!(customer_id, error = %telemetry::ErrorChain(&err), "could not read the stored version; removed the cached entry");
                None
            }
        };
        self.writer.remove(customer_id).await?;
        Ok(Removed::Yes { stamp })
    }

    /// Handles the operator requests queued since the last one handled
    /// (evictions), each like a change: its Redis work behind the fence, an
    /// announcement every replica applies, then the requests' position,
    /// saved behind the fence too. Only a lost fence is an error: Redis
    /// trouble is logged and the requests are tried again at the next look
    /// (the change feed goes on meanwhile).
    pub async fn requests(&self) -> Result<(), ApplyError> {
        let pending = match self.requests.pending(REQUESTS_BATCH).await {
            Ok(pending) => pending,
            Err(err) => return quiet(ApplyError::Redis(err)),
        };
        for request in pending {
            let handled = match &request.kind {
                RequestKind::Evict { customer_id } => self.evict(customer_id, &request).await,
                RequestKind::Unknown { op } => {
                    tracing::warn!(id = %request.id, op = %op, "skipping an operator request of an unknown kind");
                    Ok(())
                }
            };
            if let Err(err) = handled {
                return quiet(err);
            }
            if let Err(err) = self.requests.save_position(&request.id).await {
                return quiet(if Fence::refused(&err) {
                    ApplyError::Fenced
                } else {
                    ApplyError::Redis(err)
                });
            }
        }
        Ok(())
    }

    /// Evicts one customer everywhere: removes the Redis entry (and any
    /// fill's reservation) behind the fence and announces `evict`, which
    /// replicas apply like an unordered change — the near-cache entry is
    /// dropped and fills that began before are refused.
    async fn evict(&self, customer_id: &str, request: &OperatorRequest) -> Result<(), ApplyError> {
        let span = tracing::info_span!(
            "invalidator.evict",
            otel.kind = "consumer",
            customer_id = tracing::field::Empty,
            request_id = %request.id,
            reason = %request.reason,
        );
        if let Some(parent) = &request.traceparent {
            telemetry::propagation::continue_from_traceparent(&span, parent);
        }
        async {
            if CustomerId::parse(customer_id).is_err() {
                tracing::warn!(id = %request.id, "skipping an eviction of an invalid customer id");
                return Ok(());
            }
            tracing::Span::current().record("customer_id", customer_id);
            metrics::counter!("invalidator_events_total", "op" => Op::Evict.as_str()).increment(1);
            self.status.events.fetch_add(1, Ordering::Relaxed);
            let removed = self.writer.remove(customer_id).await?;
            self.announce_in_place(
                Some(customer_id),
                Op::Evict,
                telemetry::propagation::current_traceparent(),
            )
            .await?;
            tracing::info!(customer_id, removed, reason = %request.reason, "evicted on request");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Saves the feed's position alone (no change to announce).
    pub async fn save_position(&self, position: &str) -> Result<(), ApplyError> {
        Ok(self.announcer.save_position(position).await?)
    }

    /// Drops every cached document and announces a flush to every replica.
    pub async fn flush(&self, reason: &'static str) -> Result<(), ApplyError> {
        let removed = self.redis.flush_documents().await?;
        tracing::warn!(reason, removed, "flushed the cache");
        metrics::counter!("invalidator_flushes_total", "reason" => reason).increment(1);
        self.announce_in_place(None, Op::Flush, None).await?;
        self.refill(reason);
        Ok(())
    }

    /// Announces a message that moves the feed nowhere (a flush, an
    /// eviction): unordered, at version 0, re-saving the saved position.
    async fn announce_in_place(
        &self,
        customer_id: Option<&str>,
        op: Op,
        traceparent: Option<String>,
    ) -> Result<(), ApplyError> {
        let message = Invalidation {
            customer_id: customer_id.map(str::to_owned),
            op,
            version: 0,
            cluster_time: ClusterTime { t: 0, i: 0 },
            // Numbered by the announcer, in the message's partition.
            seq: 0,
            run_id: String::new(),
            traceparent,
            ordered: false,
            stream_id: None,
        };
        let saved = self
            .positions
            .saved_position()
            .await
            .map_err(ApplyError::Redis)?
            .unwrap_or_default();
        self.announcer.announce(message, &saved).await?;
        Ok(())
    }

    /// Starts putting the hottest keys back into Redis, in the background
    /// (the feed goes on meanwhile; the refill's fills are refused for keys
    /// a change reaches first), stopping a refill still under way.
    fn refill(&self, reason: &'static str) {
        let Some(config) = self.warm.clone() else {
            return;
        };
        let (redis, writer, store) = (self.redis.clone(), self.writer.clone(), self.store.clone());
        let task = tokio::spawn(
            async move {
                let started = std::time::Instant::now();
                tracing::info!(
                    reason,
                    keys = config.keys,
                    "refilling Redis with the hottest keys"
                );
                match feature_cache::warm::refill_redis(&redis, &writer, &store, &config).await {
                    Ok(stored) => {
                        metrics::counter!("invalidator_refilled_keys_total")
                            .increment(stored as u64);
                        tracing::info!(
                            reason,
                            stored,
                            took_ms =
                                u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                            "refilled Redis with the hottest keys"
                        );
                    }
                    Err(err) => tracing::warn!(
                        reason,
                        error = %telemetry::ErrorChain(&err),
                        "refilling Redis after the flush stopped"
                    ),
                }
            }
            .in_current_span(),
        );
        let previous = self
            .refilling
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(task.abort_handle());
        if let Some(previous) = previous {
            previous.abort();
        }
    }

    fn stop_refill(&self) {
        if let Some(task) = self
            .refilling
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }

    /// Announces a change of one customer's entry with the change's position.
    async fn announce(
        &self,
        change: &Change,
        customer_id: &str,
        op: Op,
        version: i64,
        ordered: bool,
        position: &str,
    ) -> Result<(), ApplyError> {
        let span = tracing::Span::current();
        self.writer.await_replicas().await;
        observe_lag("redis", change, &span, "lag_redis_ms");
        let message = change_message(
            change,
            customer_id,
            op,
            version,
            ordered,
            telemetry::propagation::current_traceparent(),
        );
        self.announcer.announce(message, position).await?;
        observe_lag("published", change, &span, "lag_published_ms");
        tracing::debug!(customer_id, op = op.as_str(), version, "change applied");
        Ok(())
    }

    /// Gives a document changed without a new version one of its own.
    async fn stamp(&self, customer_id: &str, seen: i64) {
        match self.store.stamp_version(customer_id, seen).await {
            Ok(true) => tracing::info!(
                customer_id,
                "gave a new version to a change made without one"
            ),
            Ok(false) => {}
            Err(err) => tracing::warn!(
                error = %telemetry::ErrorChain(&err),
                "could not stamp a version; the document stays fenced until it changes"
            ),
        }
    }
}

/// A failed look at the operator requests: a lost fence ends the term;
/// anything else waits for the next look.
fn quiet(err: ApplyError) -> Result<(), ApplyError> {
    match err {
        ApplyError::Fenced => Err(ApplyError::Fenced),
        ApplyError::Redis(err) => {
            metrics::counter!("invalidator_request_failures_total").increment(1);
            tracing::warn!(error = %telemetry::ErrorChain(&err), "handling operator requests failed; trying again shortly");
            Ok(())
        }
    }
}

/// The message announcing `change` of one customer's entry (numbered
/// later by the announcer, in the message's partition).
fn change_message(
    change: &Change,
    customer_id: &str,
    op: Op,
    version: i64,
    ordered: bool,
    traceparent: Option<String>,
) -> Invalidation {
    Invalidation {
        customer_id: Some(customer_id.to_owned()),
        op,
        version,
        cluster_time: change
            .cluster_time
            .map_or(ClusterTime { t: 0, i: 0 }, |t| ClusterTime {
                t: t.seconds,
                i: t.increment,
            }),
        seq: 0,
        run_id: String::new(),
        traceparent,
        ordered,
        stream_id: None,
    }
}

/// Names the change's target on the current span.
fn record_target(customer_id: &str, version: i64) {
    let span = tracing::Span::current();
    span.record("customer_id", customer_id);
    span.record("version", version);
}

fn observe_lag(stage: &'static str, change: &Change, span: &tracing::Span, field: &'static str) {
    if let Some(lag_ms) = record_lag(stage, change) {
        span.record(field, lag_ms);
    }
}

/// Records how long ago (ms) `change` was written in MongoDB, as the lag of
/// `stage`: `feed` (read from the change feed), `redis` (its Redis write
/// done), `published` (announced). Changes without a wall time are not
/// counted.
pub(crate) fn record_lag(stage: &'static str, change: &Change) -> Option<i64> {
    let origin = change.wall_time?;
    // MongoDB's wall time is in whole ms; now is taken in µs, so a lag under
    // a millisecond is not recorded as 0.
    let lag_us = (chrono::Utc::now() - origin)
        .num_microseconds()
        .unwrap_or(i64::MAX)
        .max(0);
    metrics::histogram!("invalidation_lag_seconds", "stage" => stage)
        .record(lag_us as f64 / 1_000_000.0);
    Some(lag_us / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use feature_store::{CollectionEvent, FeatureDocument};

    fn stored(version: i64) -> FeatureDocument {
        serde_json::from_value(serde_json::json!({
            "version": version, "customer_id": "C1", "features": {"a": 1},
            "calculated_at": "2026-01-01T00:00:00.000Z", "model_version": "v1.0.0",
            "expires_at": "2999-01-01T00:00:00.000Z",
        }))
        .unwrap()
    }

    fn written(
        op: WriteOp,
        document: Option<FeatureDocument>,
        version_advanced: bool,
    ) -> ChangeKind {
        ChangeKind::Written {
            op,
            customer_id: "C1".into(),
            document,
            version_advanced,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    #[test]
    fn a_versioned_update_refreshes_with_the_document_and_its_trace() {
        let Plan::Refresh {
            document,
            op,
            traceparent,
        } = plan(
            &written(WriteOp::Update, Some(stored(5)), true),
            InvalidationMode::Refresh,
        )
        else {
            panic!()
        };
        assert_eq!((document.version(), op), (5, Op::Update));
        assert!(traceparent.is_some());
    }

    #[test]
    fn delete_mode_removes_the_entry() {
        assert!(matches!(
            plan(
                &written(WriteOp::Update, Some(stored(5)), true),
                InvalidationMode::Delete
            ),
            Plan::Remove {
                version: 5,
                stamp: None,
                ..
            }
        ));
    }

    #[test]
    fn changes_that_did_not_advance_the_version_remove_and_ask_for_a_stamp() {
        for op in [WriteOp::Update, WriteOp::Replace, WriteOp::Insert] {
            assert!(matches!(
                plan(
                    &written(op, Some(stored(5)), false),
                    InvalidationMode::Refresh
                ),
                Plan::Remove { stamp: Some(5), .. }
            ));
        }
    }

    #[test]
    fn a_document_of_another_customer_is_never_cached_under_this_key() {
        let mut other = stored(5);
        other.customer_id = "C2".into();
        let Plan::Remove {
            customer_id, stamp, ..
        } = plan(
            &written(WriteOp::Insert, Some(other), true),
            InvalidationMode::Refresh,
        )
        else {
            panic!()
        };
        assert_eq!((customer_id.as_str(), stamp), ("C1", None));
    }

    #[test]
    fn deletes_vanished_and_unreadable_documents_remove_the_entry() {
        let kind = ChangeKind::Deleted {
            customer_id: "C1".into(),
            version_bound: 77,
        };
        assert!(matches!(
            plan(&kind, InvalidationMode::Refresh),
            Plan::Remove {
                op: Op::Delete,
                version: 77,
                ..
            }
        ));
        assert!(matches!(
            plan(
                &written(WriteOp::Update, None, true),
                InvalidationMode::Refresh
            ),
            Plan::Remove { stamp: None, .. }
        ));
        let kind = ChangeKind::Unreadable {
            customer_id: Some("C1".into()),
            reason: "invalid UTF-8".into(),
        };
        assert!(matches!(
            plan(&kind, InvalidationMode::Refresh),
            Plan::Remove { .. }
        ));
        let kind = ChangeKind::Unreadable {
            customer_id: None,
            reason: "no key".into(),
        };
        assert!(matches!(
            plan(&kind, InvalidationMode::Refresh),
            Plan::Flush {
                reason: "poison",
                ..
            }
        ));
    }

    #[test]
    fn collection_events_flush_and_invalidate_reopens() {
        assert!(matches!(
            plan(
                &ChangeKind::CollectionGone(CollectionEvent::Dropped),
                InvalidationMode::Refresh
            ),
            Plan::Flush {
                reopen: false,
                reason: "drop"
            }
        ));
        assert!(matches!(
            plan(
                &ChangeKind::CollectionGone(CollectionEvent::Invalidated),
                InvalidationMode::Refresh
            ),
            Plan::Flush { reopen: true, .. }
        ));
        assert!(matches!(
            plan(&ChangeKind::Other, InvalidationMode::Refresh),
            Plan::Skip
        ));
    }
}
