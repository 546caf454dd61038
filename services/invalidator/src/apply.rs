//! One change's cache work: what the change means for the caches (a pure
//! [`plan`]), then the guarded write to Redis and the announcement to every
//! replica, both behind the term's fence. An [`Apply`] is made once per
//! leadership term.

use crate::worker::{Sequence, WorkerStatus};
use feature_cache::{CachedDocument, Entry, Fence, FencedWriteError, FencedWriter, RedisTier};
use feature_store::{Change, ChangeKind, FeatureStore, WriteOp};
use invalidation::{Announcer, ClusterTime, FencedAnnouncer, Invalidation, InvalidationMode, Op};
use std::sync::Arc;
use std::sync::atomic::Ordering;
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
    /// Offer `entry` to Redis through the guard, then announce `op` at the
    /// entry's version. With `stamp`, the change came without a new version
    /// (another tool wrote it): afterwards give the document one, so its new
    /// content gets a version of its own (that write comes back as a change).
    Offer {
        entry: Entry,
        op: Op,
        traceparent: Option<String>,
        stamp: Option<i64>,
    },
    /// Drop every cached document and tell every replica to do the same.
    /// `reopen`: the feed ended with this change and must be reopened after it.
    Flush { reason: &'static str, reopen: bool },
    /// Nothing to do for the caches (a document already gone again — its
    /// delete follows — or a change that touches no cached document).
    Skip,
}

/// Plans the cache work for a change: a pure function of the change and
/// the mode, tested without a database.
pub fn plan(kind: &ChangeKind, mode: InvalidationMode) -> Plan {
    match kind {
        ChangeKind::Written {
            op,
            customer_id,
            document: Some(document),
            version_advanced,
            traceparent,
        } => {
            let op = match op {
                WriteOp::Insert => Op::Insert,
                WriteOp::Update => Op::Update,
                WriteOp::Replace => Op::Replace,
            };
            if !version_advanced {
                // Evict every cached copy of the version it had (its content
                // changed under the same version), then give it a version of
                // its own.
                return Plan::Offer {
                    entry: Entry::Floor {
                        customer_id: customer_id.clone(),
                        version: document.version + 1,
                    },
                    op,
                    traceparent: traceparent.clone(),
                    stamp: Some(document.version),
                };
            }
            let entry =
                if mode == InvalidationMode::Delete || document.is_expired(chrono::Utc::now()) {
                    Entry::Floor {
                        customer_id: customer_id.clone(),
                        version: document.version,
                    }
                } else {
                    Entry::Document(CachedDocument::from_document(document))
                };
            Plan::Offer {
                entry,
                op,
                traceparent: traceparent.clone(),
                stamp: None,
            }
        }
        ChangeKind::Deleted {
            customer_id,
            version_bound,
        } => Plan::Offer {
            entry: Entry::Tombstone {
                customer_id: customer_id.clone(),
                version: *version_bound,
            },
            op: Op::Delete,
            traceparent: None,
            stamp: None,
        },
        ChangeKind::CollectionGone(event) => Plan::Flush {
            reason: event.as_str(),
            reopen: event.ends_feed(),
        },
        ChangeKind::Written { document: None, .. }
        | ChangeKind::Unreadable { .. }
        | ChangeKind::Other => Plan::Skip,
    }
}

/// What the feed must do after a change was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// The feed ended with this change: reopen it after the change.
    Reopen,
}

/// Applies changes for one leadership term.
pub struct Apply {
    writer: FencedWriter,
    announcer: FencedAnnouncer,
    /// Reads the saved position (flushes re-save it).
    positions: Announcer,
    redis: RedisTier,
    store: FeatureStore,
    mode: InvalidationMode,
    sequence: Arc<Sequence>,
    status: Arc<WorkerStatus>,
}

/// What an [`Apply`] is made of, apart from the term's fence.
#[derive(Clone)]
pub struct ApplyParts {
    pub redis: RedisTier,
    pub announcer: Announcer,
    pub store: FeatureStore,
    pub mode: InvalidationMode,
    pub sequence: Arc<Sequence>,
    pub status: Arc<WorkerStatus>,
}

impl Apply {
    /// The writers of one term, behind its fence.
    pub fn for_term(parts: &ApplyParts, fence: &Fence) -> Self {
        Self {
            writer: parts.redis.fenced(fence.clone()),
            announcer: parts.announcer.fenced(fence.clone()),
            positions: parts.announcer.clone(),
            redis: parts.redis.clone(),
            store: parts.store.clone(),
            mode: parts.mode,
            sequence: Arc::clone(&parts.sequence),
            status: Arc::clone(&parts.status),
        }
    }

    /// Applies one change: Redis first, then the announcement together with
    /// the change's position.
    pub async fn change(&self, change: &Change) -> Result<Next, ApplyError> {
        let plan = plan(&change.kind, self.mode);
        let op_label = match &plan {
            Plan::Offer { op, .. } => op.as_str(),
            Plan::Flush { .. } => "flush",
            Plan::Skip => "skip",
        };
        metrics::counter!("invalidator_events_total", "op" => op_label).increment(1);
        self.status.events.fetch_add(1, Ordering::Relaxed);
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
        let position = change.position.as_str();
        async {
            match plan {
                Plan::Skip => {
                    self.announcer.save_position(position).await?;
                    Ok(Next::Continue)
                }
                Plan::Flush { reason, reopen } => {
                    self.flush(reason).await?;
                    self.announcer.save_position(position).await?;
                    Ok(if reopen { Next::Reopen } else { Next::Continue })
                }
                Plan::Offer {
                    entry, op, stamp, ..
                } => {
                    self.offer(change, &entry, op, position).await?;
                    if let Some(seen) = stamp {
                        self.stamp(entry.customer_id(), seen).await;
                    }
                    Ok(Next::Continue)
                }
            }
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
        let message = Invalidation {
            customer_id: None,
            op: Op::Flush,
            version: 0,
            cluster_time: ClusterTime { t: 0, i: 0 },
            seq: self.sequence.next(),
            run_id: self.sequence.run_id().to_owned(),
            traceparent: None,
            stream_id: None,
        };
        // The flush moves the feed nowhere: it re-saves the saved position.
        let saved = self
            .positions
            .saved_position()
            .await
            .map_err(ApplyError::Redis)?
            .unwrap_or_default();
        self.announcer.announce(&message, &saved).await?;
        Ok(())
    }

    async fn offer(
        &self,
        change: &Change,
        entry: &Entry,
        op: Op,
        position: &str,
    ) -> Result<(), ApplyError> {
        let span = tracing::Span::current();
        span.record("customer_id", entry.customer_id());
        span.record("version", entry.version());
        self.writer.offer(entry).await?;
        observe_lag("redis", change, &span, "lag_redis_ms");
        let message = Invalidation {
            customer_id: Some(entry.customer_id().to_owned()),
            op,
            version: entry.version(),
            cluster_time: change
                .cluster_time
                .map_or(ClusterTime { t: 0, i: 0 }, |t| ClusterTime {
                    t: t.seconds,
                    i: t.increment,
                }),
            seq: self.sequence.next(),
            run_id: self.sequence.run_id().to_owned(),
            traceparent: telemetry::propagation::current_traceparent(),
            stream_id: None,
        };
        self.announcer.announce(&message, position).await?;
        observe_lag("published", change, &span, "lag_published_ms");
        tracing::debug!(
            customer_id = entry.customer_id(),
            op = op.as_str(),
            version = entry.version(),
            "change applied"
        );
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

fn observe_lag(stage: &'static str, change: &Change, span: &tracing::Span, field: &'static str) {
    if let Some(origin) = change.wall_time {
        let lag_ms = (chrono::Utc::now() - origin).num_milliseconds().max(0);
        metrics::histogram!("invalidation_lag_seconds", "stage" => stage)
            .record(lag_ms as f64 / 1000.0);
        span.record(field, lag_ms);
    }
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

    fn written(op: WriteOp, version: i64, version_advanced: bool) -> ChangeKind {
        ChangeKind::Written {
            op,
            customer_id: "C1".into(),
            document: Some(stored(version)),
            version_advanced,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    #[test]
    fn a_versioned_update_refreshes_with_the_document_and_its_trace() {
        let Plan::Offer {
            entry,
            op,
            traceparent,
            stamp,
        } = plan(
            &written(WriteOp::Update, 5, true),
            InvalidationMode::Refresh,
        )
        else {
            panic!()
        };
        assert!(matches!(entry, Entry::Document(ref d) if d.version == 5));
        assert_eq!(op, Op::Update);
        assert!(traceparent.is_some());
        assert_eq!(stamp, None);
    }

    #[test]
    fn delete_mode_puts_a_floor_at_the_new_version() {
        let Plan::Offer { entry, .. } =
            plan(&written(WriteOp::Update, 5, true), InvalidationMode::Delete)
        else {
            panic!()
        };
        assert!(matches!(entry, Entry::Floor { version: 5, .. }));
    }

    #[test]
    fn unversioned_edits_put_a_floor_past_the_old_version_and_ask_for_a_stamp() {
        for op in [WriteOp::Update, WriteOp::Replace, WriteOp::Insert] {
            let Plan::Offer { entry, stamp, .. } =
                plan(&written(op, 5, false), InvalidationMode::Refresh)
            else {
                panic!()
            };
            assert!(matches!(entry, Entry::Floor { version: 6, .. }));
            assert_eq!(stamp, Some(5));
        }
    }

    #[test]
    fn deletes_leave_a_tombstone_at_the_bound() {
        let kind = ChangeKind::Deleted {
            customer_id: "C1".into(),
            version_bound: 77,
        };
        let Plan::Offer { entry, op, .. } = plan(&kind, InvalidationMode::Refresh) else {
            panic!()
        };
        assert!(matches!(entry, Entry::Tombstone { version: 77, .. }));
        assert_eq!(op, Op::Delete);
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
    }

    #[test]
    fn a_vanished_document_is_skipped() {
        let kind = ChangeKind::Written {
            op: WriteOp::Update,
            customer_id: "C1".into(),
            document: None,
            version_advanced: true,
            traceparent: None,
        };
        assert!(matches!(plan(&kind, InvalidationMode::Refresh), Plan::Skip));
    }
}
