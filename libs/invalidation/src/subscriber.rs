use crate::channels::{Channels, STREAM_FIELD};
use crate::message::Invalidation;
use crate::stream_id::StreamId;
use feature_cache::NearCache;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::streams::StreamRangeReply;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use telemetry::Condition;
use tokio_util::sync::CancellationToken;

/// Entries read from the stream per round trip while catching up.
const CATCH_UP_BATCH: usize = 1000;

#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// The subscriber holds a connection of its own (a subscribed connection
    /// serves nothing else), opened with this client (TLS and credentials
    /// included; its `Debug` hides the password).
    pub redis: redis::Client,
    pub channels: Channels,
    /// How often the stream's tail is compared with what was applied, so a
    /// message lost in a quiet period is noticed without waiting for the next.
    pub check_interval: Duration,
}

/// What the subscriber has applied, for health and tests.
#[derive(Debug, Clone, Default)]
pub struct SubscriberStatus {
    pub subscribed: bool,
    pub last_stream_id: Option<String>,
    /// How long after its announcement the last message was applied (its
    /// stream id's time to now), in ms.
    pub last_lag_ms: Option<u64>,
    pub applied: u64,
    pub gaps: u64,
    pub flushes: u64,
}

/// Where this replica stands in the invalidator's sequence.
#[derive(Debug, Clone)]
struct Position {
    run_id: String,
    seq: u64,
    stream_id: StreamId,
}

/// Keeps one replica's near cache in line with the invalidator's messages.
///
/// Pub/sub is the fast path; the stream is the record. Whenever the fast path
/// may have dropped something — a reconnect, a jump in `seq`, a new
/// invalidator run, a stream tail beyond what was applied — the subscriber
/// replays the stream from the last entry it applied. If the stream was
/// trimmed past that entry (or lost with a Redis restart) it flushes the near
/// cache instead: no replica stays stale after a gap.
pub struct Subscriber {
    config: SubscriberConfig,
    near: Arc<NearCache>,
    redis: ConnectionManager,
    position: Option<Position>,
    status: Arc<Mutex<SubscriberStatus>>,
    /// The subscription being down: while Redis is, every reconnect attempt
    /// fails, and only the first failure and the recovery are worth a
    /// warning and an info line.
    connection: Condition,
}

impl Subscriber {
    pub fn new(config: SubscriberConfig, near: Arc<NearCache>, redis: ConnectionManager) -> Self {
        Self {
            config,
            near,
            redis,
            position: None,
            status: Arc::default(),
            connection: Condition::new(
                "invalidation_subscription",
                "invalidation subscription lost; reconnecting (the near cache is caught up or flushed on return)",
                "invalidation subscription restored",
            ),
        }
    }

    pub fn status(&self) -> Arc<Mutex<SubscriberStatus>> {
        Arc::clone(&self.status)
    }

    /// Follows until `shutdown` is cancelled, reconnecting with backoff.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.follow_once() => {
                    // A subscription that was up restarts the backoff: only
                    // failures in a row slow reconnecting down.
                    if self.status.lock().unwrap_or_else(PoisonError::into_inner).subscribed {
                        backoff = Duration::from_millis(100);
                    }
                    self.set_status(|s| s.subscribed = false);
                    match result {
                        Ok(()) => self.connection.fail(&std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the subscription's connection closed",
                        )),
                        Err(err) => self.connection.fail(&err),
                    };
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One subscription's life: subscribe, catch up, then apply messages and
    /// check the stream's tail until the connection drops.
    async fn follow_once(&mut self) -> redis::RedisResult<()> {
        let mut pubsub = self.config.redis.get_async_pubsub().await?;
        pubsub.subscribe(&self.config.channels.channel).await?;
        if self.position.is_none() {
            tracing::info!(channel = %self.config.channels.channel, "subscribed to invalidations");
        }
        // Anything published while we were not subscribed is in the stream.
        if self.position.is_some() {
            self.gap("reconnect").await?;
        } else {
            // Whatever the near cache took in before this first subscription
            // (a request served while subscribing, or while Redis was
            // unreachable) may be older than messages up to the tail, which
            // are never applied: start from an empty near cache.
            self.start_at_tail(Some("start")).await?;
        }
        self.set_status(|s| s.subscribed = true);
        self.connection.recover();
        let mut messages = pubsub.into_on_message();
        let mut check = tokio::time::interval(self.config.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = messages.next() => {
                    let Some(message) = message else { return Ok(()) };
                    let payload: Vec<u8> = message.get_payload_bytes().to_vec();
                    self.on_message(&payload).await?;
                }
                _ = check.tick() => {
                    let tail = self.tail().await?.unwrap_or(StreamId::ZERO);
                    match &self.position {
                        Some(p) if tail < p.stream_id => {
                            // Applied beyond what the stream holds: a forged
                            // message, or a stream made again with lower ids
                            // (a Redis restart, a failover to a replica whose
                            // clock is behind). Where we stand is unknown.
                            tracing::warn!(position = %p.stream_id, %tail, "invalidation stream is behind what this replica applied; flushing the near cache");
                            metrics::counter!("invalidation_gaps_total", "reason" => "stream_behind").increment(1);
                            self.start_at_tail(Some("stream_behind")).await?;
                        }
                        Some(p) if tail > p.stream_id => self.gap("quiet_loss").await?,
                        None => self.gap("quiet_loss").await?,
                        Some(_) => {}
                    }
                }
            }
        }
    }

    async fn on_message(&mut self, payload: &[u8]) -> redis::RedisResult<()> {
        metrics::counter!("invalidation_messages_received_total").increment(1);
        let message: Invalidation = match serde_json::from_slice(payload) {
            Ok(message) => message,
            Err(err) => {
                tracing::warn!(error = %err, "ignoring an unreadable invalidation message");
                return Ok(());
            }
        };
        let Some(stream_id) = message
            .stream_id
            .as_deref()
            .and_then(|id| id.parse::<StreamId>().ok())
        else {
            tracing::warn!("invalidation message without a stream id; catching up from the stream");
            return self.gap("no_stream_id").await;
        };
        match &self.position {
            // Another run's message: replay from the stream, which also tells
            // whether the stream is still the one this replica followed.
            Some(p) if p.run_id != message.run_id => self.gap("new_run").await,
            // Already applied through a catch-up.
            Some(p) if stream_id <= p.stream_id => Ok(()),
            Some(p) if message.seq == p.seq + 1 => {
                self.apply(&message, stream_id);
                Ok(())
            }
            _ => self.gap("sequence").await,
        }
    }

    fn apply(&mut self, message: &Invalidation, stream_id: StreamId) {
        let span = tracing::info_span!(
            "near_cache.invalidate",
            customer_id = message.customer_id.as_deref().unwrap_or("*"),
            op = message.op.as_str(),
            version = message.version,
        );
        if let Some(traceparent) = &message.traceparent {
            telemetry_link(&span, traceparent);
        }
        let _entered = span.enter();
        message.apply_to(&self.near);
        metrics::counter!("invalidation_messages_applied_total", "op" => message.op.as_str())
            .increment(1);
        self.position = Some(Position {
            run_id: message.run_id.clone(),
            seq: message.seq,
            stream_id,
        });
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.set_status(|s| {
            s.applied += 1;
            s.last_stream_id = Some(stream_id.to_string());
            s.last_lag_ms = Some(now_ms.saturating_sub(stream_id.ms));
        });
    }

    /// Replays the stream after the last applied entry; flushes the near
    /// cache when the stream no longer holds that entry's successors.
    async fn gap(&mut self, reason: &'static str) -> redis::RedisResult<()> {
        metrics::counter!("invalidation_gaps_total", "reason" => reason).increment(1);
        self.set_status(|s| s.gaps += 1);
        let Some(from) = self.position.as_ref().map(|p| p.stream_id) else {
            return self.start_at_tail(None).await;
        };
        tracing::info!(reason, from = %from, "catching up from the invalidation stream");
        metrics::counter!("invalidation_catchups_total").increment(1);

        if self.trimmed_after(from).await? {
            tracing::warn!(from = %from, "invalidation stream no longer reaches back; flushing the near cache");
            return self.start_at_tail(Some("stream_trimmed")).await;
        }

        let mut cursor = from;
        loop {
            let reply: StreamRangeReply = redis::cmd("XRANGE")
                .arg(&self.config.channels.stream)
                .arg(format!("({cursor}"))
                .arg("+")
                .arg("COUNT")
                .arg(CATCH_UP_BATCH)
                .query_async(&mut self.redis)
                .await?;
            if reply.ids.is_empty() {
                return Ok(());
            }
            for entry in &reply.ids {
                let Ok(id) = entry.id.parse::<StreamId>() else {
                    continue;
                };
                cursor = id;
                let message: Option<Invalidation> = entry
                    .get::<String>(STREAM_FIELD)
                    .and_then(|json| serde_json::from_str(&json).ok());
                match message {
                    Some(message) => self.apply(&message, id),
                    None => tracing::warn!(id = %id, "skipping an unreadable stream entry"),
                }
            }
        }
    }

    /// Whether entries after `from` are gone from the stream (trimmed by
    /// `MAXLEN`, or the whole stream lost with a Redis restart). Redis 7
    /// reports the largest id it ever deleted, which answers exactly; older
    /// servers are judged by the first entry still held.
    async fn trimmed_after(&mut self, from: StreamId) -> redis::RedisResult<bool> {
        let info: redis::RedisResult<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&self.config.channels.stream)
            .query_async(&mut self.redis)
            .await;
        let info = match info {
            Ok(info) => info,
            Err(err)
                if err.kind()
                    == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) =>
            {
                // "no such key": nothing was ever published, or it was lost.
                return Ok(from != StreamId::ZERO);
            }
            Err(err) => return Err(err),
        };
        let id_of = |name: &str| -> Option<StreamId> {
            match info.get(name)? {
                redis::Value::BulkString(raw) => std::str::from_utf8(raw).ok()?.parse().ok(),
                redis::Value::SimpleString(raw) => raw.parse().ok(),
                _ => None,
            }
        };
        // A stream that never reached `from` is not the stream `from` was
        // read from (made again after a restart): what followed is lost.
        if id_of("last-generated-id").is_some_and(|last| last < from) {
            return Ok(true);
        }
        if let Some(max_deleted) = id_of("max-deleted-entry-id") {
            return Ok(max_deleted > from);
        }
        let first = self.head().await?;
        Ok(from != StreamId::ZERO && first.is_some_and(|first| first > from))
    }

    /// Starts following from the stream's current tail: entries up to it are
    /// never applied. With `flush`, the near cache may hold something older
    /// than those and is emptied — after reading the tail, so an entry
    /// appended in between is still replayed or received (and fills that
    /// read before the flush are refused by its epoch).
    async fn start_at_tail(&mut self, flush: Option<&'static str>) -> redis::RedisResult<()> {
        let tail = self.tail().await?.unwrap_or(StreamId::ZERO);
        if let Some(reason) = flush {
            self.flush(reason);
        }
        self.position = Some(Position {
            run_id: String::new(),
            seq: 0,
            stream_id: tail,
        });
        self.set_status(|s| s.last_stream_id = Some(tail.to_string()));
        Ok(())
    }

    fn flush(&mut self, reason: &'static str) {
        self.near.flush();
        metrics::counter!("near_cache_flushes_total", "reason" => reason).increment(1);
        self.set_status(|s| s.flushes += 1);
    }

    async fn tail(&mut self) -> redis::RedisResult<Option<StreamId>> {
        self.edge("XREVRANGE", "+", "-").await
    }

    async fn head(&mut self) -> redis::RedisResult<Option<StreamId>> {
        self.edge("XRANGE", "-", "+").await
    }

    async fn edge(
        &mut self,
        command: &str,
        start: &str,
        end: &str,
    ) -> redis::RedisResult<Option<StreamId>> {
        let reply: StreamRangeReply = redis::cmd(command)
            .arg(&self.config.channels.stream)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.redis)
            .await?;
        Ok(reply.ids.first().and_then(|e| e.id.parse().ok()))
    }

    fn set_status(&self, update: impl FnOnce(&mut SubscriberStatus)) {
        update(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// Joins the eviction span to the trace of the write that caused it.
fn telemetry_link(span: &tracing::Span, traceparent: &str) {
    telemetry::propagation::continue_from_traceparent(span, traceparent);
}
