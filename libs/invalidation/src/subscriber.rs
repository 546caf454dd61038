use crate::channels::{Channels, Partition, STREAM_FIELD};
use crate::message::Invalidation;
use crate::stream_id::StreamId;
use feature_cache::{NearCache, RedisConfig, RedisConnection};
use futures::StreamExt;
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
    /// Each partition's follower holds a connection of its own (a
    /// subscribed connection serves nothing else), opened with this
    /// configuration (TLS and credentials included; its `Debug` hides the
    /// password); on a cluster, a cluster connection subscribed to the
    /// partition's sharded channel.
    pub redis: RedisConfig,
    pub channels: Channels,
    /// How often the stream's tail is compared with what was applied, so a
    /// message lost in a quiet period is noticed without waiting for the next.
    pub check_interval: Duration,
}

/// What the subscriber has applied, for health and tests.
#[derive(Debug, Clone, Default)]
pub struct SubscriberStatus {
    /// Every partition is subscribed.
    pub subscribed: bool,
    /// How many partitions are followed, and how many are subscribed now.
    pub partitions: u16,
    pub partitions_subscribed: u16,
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

/// Keeps one replica's near cache in line with the invalidator's messages:
/// one [`Follower`] per partition, sharing the near cache and the status.
pub struct Subscriber {
    followers: Vec<Follower>,
    status: Arc<Mutex<SubscriberStatus>>,
}

impl Subscriber {
    pub fn new(config: SubscriberConfig, near: Arc<NearCache>, redis: RedisConnection) -> Self {
        let partitions = config.channels.all();
        let status = Arc::new(Mutex::new(SubscriberStatus {
            partitions: u16::try_from(partitions.len()).unwrap_or(u16::MAX),
            ..SubscriberStatus::default()
        }));
        let config = Arc::new(config);
        let followers = partitions
            .into_iter()
            .map(|partition| Follower {
                config: Arc::clone(&config),
                partition,
                near: Arc::clone(&near),
                redis: redis.clone(),
                position: None,
                subscribed: false,
                status: Arc::clone(&status),
                connection: Condition::new(
                    "invalidation_subscription",
                    "invalidation subscription lost; reconnecting (the near cache is caught up or flushed on return)",
                    "invalidation subscription restored",
                ),
            })
            .collect();
        Self { followers, status }
    }

    pub fn status(&self) -> Arc<Mutex<SubscriberStatus>> {
        Arc::clone(&self.status)
    }

    /// Follows every partition until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        futures::future::join_all(
            self.followers
                .into_iter()
                .map(|follower| follower.run(shutdown.clone())),
        )
        .await;
    }
}

/// Follows one partition.
///
/// Pub/sub is the fast path; the stream is the record. Whenever the fast path
/// may have dropped something — a reconnect, a jump in `seq`, a new
/// invalidator run, a stream tail beyond what was applied — the subscriber
/// replays the stream from the last entry it applied. If the stream was
/// trimmed past that entry (or lost with a Redis restart) it flushes the near
/// cache instead: no replica stays stale after a gap.
struct Follower {
    config: Arc<SubscriberConfig>,
    partition: Partition,
    near: Arc<NearCache>,
    redis: RedisConnection,
    position: Option<Position>,
    /// This partition's subscription is up.
    subscribed: bool,
    status: Arc<Mutex<SubscriberStatus>>,
    /// The subscription being down: while Redis is, every reconnect attempt
    /// fails, and only the first failure and the recovery are worth a
    /// warning and an info line.
    connection: Condition,
}

impl Follower {
    /// Follows until `shutdown` is cancelled, reconnecting with backoff.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.follow_once() => {
                    // A subscription that was up restarts the backoff: only
                    // failures in a row slow reconnecting down.
                    if self.subscribed {
                        backoff = Duration::from_millis(100);
                    }
                    self.set_subscribed(false);
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
        let mut messages = Subscription::open(&self.config.redis, &self.partition).await?;
        if self.position.is_none() {
            tracing::info!(channel = %self.partition.channel, "subscribed to invalidations");
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
        self.set_subscribed(true);
        self.connection.recover();
        let mut check = tokio::time::interval(self.config.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = messages.next() => {
                    // The subscription ended (a lost connection; on a
                    // cluster a slot moved away): subscribe again, catch up.
                    let Some(payload) = message else { return Ok(()) };
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
        // The stream id holds the announcement's time in whole ms; now is
        // taken in µs, so a lag under a millisecond is not recorded as 0.
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let lag_us = now_us.saturating_sub(stream_id.ms.saturating_mul(1000));
        let lag_ms = lag_us / 1000;
        // The last stage of a change's way (the invalidator records the
        // stages before it): announced -> applied in this near cache.
        metrics::histogram!("invalidation_lag_seconds", "stage" => "replica")
            .record(lag_us as f64 / 1_000_000.0);
        self.set_status(|s| {
            s.applied += 1;
            s.last_stream_id = Some(stream_id.to_string());
            s.last_lag_ms = Some(lag_ms);
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
                .arg(&self.partition.stream)
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
            .arg(&self.partition.stream)
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
            .arg(&self.partition.stream)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.redis)
            .await?;
        Ok(reply.ids.first().and_then(|e| e.id.parse().ok()))
    }

    /// Marks this partition's subscription up or down; the status says
    /// subscribed while every partition is.
    fn set_subscribed(&mut self, up: bool) {
        if self.subscribed == up {
            return;
        }
        self.subscribed = up;
        self.set_status(|s| {
            s.partitions_subscribed = if up {
                s.partitions_subscribed.saturating_add(1)
            } else {
                s.partitions_subscribed.saturating_sub(1)
            };
            s.subscribed = s.partitions_subscribed >= s.partitions;
        });
    }

    fn set_status(&self, update: impl FnOnce(&mut SubscriberStatus)) {
        update(&mut self.status.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

/// A partition's subscription: the payloads of its channel's messages,
/// until the subscription ends.
enum Subscription {
    Single(std::pin::Pin<Box<dyn futures::Stream<Item = redis::Msg> + Send>>),
    Cluster {
        pushes: tokio::sync::mpsc::UnboundedReceiver<redis::PushInfo>,
        channel: Vec<u8>,
        // Kept open while subscribed.
        _conn: redis::cluster_async::ClusterConnection,
    },
}

impl Subscription {
    async fn open(config: &RedisConfig, partition: &Partition) -> redis::RedisResult<Self> {
        let client_error = |err: feature_cache::ConnectError| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "invalid Redis client configuration",
                err.to_string(),
            ))
        };
        if config.is_cluster() {
            let (tx, pushes) = tokio::sync::mpsc::unbounded_channel();
            let client = config.cluster_client(Some(tx)).map_err(client_error)?;
            let mut conn = client.get_async_connection().await?;
            conn.ssubscribe(&partition.channel).await?;
            return Ok(Self::Cluster {
                pushes,
                channel: partition.channel.as_bytes().to_vec(),
                _conn: conn,
            });
        }
        let mut pubsub = config
            .client()
            .map_err(client_error)?
            .get_async_pubsub()
            .await?;
        // A single Redis: its channels are never sharded.
        pubsub.subscribe(&partition.channel).await?;
        Ok(Self::Single(Box::pin(pubsub.into_on_message())))
    }

    /// The next message's payload; `None` when the subscription ended.
    async fn next(&mut self) -> Option<Vec<u8>> {
        match self {
            Self::Single(messages) => messages
                .next()
                .await
                .map(|message| message.get_payload_bytes().to_vec()),
            Self::Cluster {
                pushes, channel, ..
            } => loop {
                let push = pushes.recv().await?;
                let on_channel = push.data.first().is_some_and(
                    |name| matches!(name, redis::Value::BulkString(name) if name == channel),
                );
                match push.kind {
                    redis::PushKind::SMessage if on_channel => match push.data.into_iter().nth(1) {
                        Some(redis::Value::BulkString(payload)) => return Some(payload),
                        _ => continue,
                    },
                    // A connection dropped (messages may have been lost on
                    // it), or the slot moved away from the node we were on.
                    redis::PushKind::Disconnection => return None,
                    redis::PushKind::SUnsubscribe if on_channel => return None,
                    _ => continue,
                }
            },
        }
    }
}

/// Joins the eviction span to the trace of the write that caused it.
fn telemetry_link(span: &tracing::Span, traceparent: &str) {
    telemetry::propagation::continue_from_traceparent(span, traceparent);
}
