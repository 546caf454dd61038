//! The asking side: which replicas live (from their heartbeats), what their
//! near caches hold for some keys (a fan-out over pub/sub with a deadline),
//! and eviction requests for the invalidator.
//!
//! A fan-out subscribes to its own reply channel *before* it publishes the
//! query, so no reply can come before anyone listens; it then waits until
//! every replica that was live when it asked has answered every part, or
//! until the deadline, and names the replicas that did not.

use crate::config::FleetConfig;
use crate::error::FleetError;
use crate::heartbeat::now_ms;
use crate::requests::{FIELD_CUSTOMER_ID, FIELD_OP, FIELD_REASON, FIELD_TRACEPARENT, OP_EVICT};
use crate::wire::{EntryView, QUERY_CHUNK, Query, ReplicaStatus, Reply};
use feature_cache::RedisConnection;
use futures::StreamExt;
use invalidation::StreamId;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// How often [`FleetClient::wait_handled`] looks at the invalidator's position.
const HANDLED_POLL: Duration = Duration::from_millis(20);

/// Asks the fleet of one collection.
#[derive(Clone)]
pub struct FleetClient {
    /// For reply subscriptions (each fan-out has its own connection).
    client: redis::Client,
    redis: RedisConnection,
    config: FleetConfig,
}

/// Every live replica's near-cache entry for one customer.
#[derive(Debug, Clone, PartialEq)]
pub struct NearReport {
    pub answers: Vec<NearAnswer>,
    /// Replicas known from heartbeats that did not answer in time.
    pub silent: Vec<String>,
}

/// One replica's answer: its entry, `None` when it holds nothing.
#[derive(Debug, Clone, PartialEq)]
pub struct NearAnswer {
    pub instance_id: String,
    pub entry: Option<EntryView>,
}

/// Every live replica's near-cache entries for many customers: each
/// replica's map holds the ids it has an entry for.
#[derive(Debug, Clone, PartialEq)]
pub struct NearReportMany {
    pub answers: Vec<(String, HashMap<String, EntryView>)>,
    pub silent: Vec<String>,
}

impl FleetClient {
    /// `client` opens the reply subscriptions; `redis` runs the rest.
    pub fn new(client: redis::Client, redis: RedisConnection, config: FleetConfig) -> Self {
        Self {
            client,
            redis,
            config,
        }
    }

    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    /// Live replicas from their heartbeats (expired ones left out), by
    /// instance id.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "ZRANGE+MGET"))]
    pub async fn replicas(&self) -> Result<Vec<ReplicaStatus>, FleetError> {
        let mut conn = self.redis.clone();
        let ids: Vec<String> = redis::cmd("ZRANGE")
            .arg(&self.config.replicas_key)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.config.replica_key(id)).collect();
        let beats: Vec<Option<String>> =
            redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        let mut replicas: Vec<ReplicaStatus> = beats
            .into_iter()
            .flatten()
            .filter_map(|json| serde_json::from_str(&json).ok())
            .collect();
        replicas.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        Ok(replicas)
    }

    /// Asks every live replica what its near cache holds for `customer_id`;
    /// waits at most `deadline`; replicas known from heartbeats that did
    /// not answer are listed in `silent`.
    pub async fn near_entries(
        &self,
        customer_id: &str,
        deadline: Duration,
    ) -> Result<NearReport, FleetError> {
        let many = self
            .near_entries_many(&[customer_id.to_owned()], deadline)
            .await?;
        Ok(NearReport {
            answers: many
                .answers
                .into_iter()
                .map(|(instance_id, mut entries)| NearAnswer {
                    instance_id,
                    entry: entries.remove(customer_id),
                })
                .collect(),
            silent: many.silent,
        })
    }

    /// Many keys at once: each live replica answers with its entries for
    /// the keys it holds (in parts of [`QUERY_CHUNK`] ids). A replica that
    /// did not answer every part in time is listed in `silent`, and its
    /// partial answer left out.
    #[tracing::instrument(skip_all, fields(keys = customer_ids.len(), replicas = tracing::field::Empty, silent = tracing::field::Empty))]
    pub async fn near_entries_many(
        &self,
        customer_ids: &[String],
        deadline: Duration,
    ) -> Result<NearReportMany, FleetError> {
        let until = Instant::now() + deadline;
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let chunks: Vec<&[String]> = customer_ids.chunks(QUERY_CHUNK).collect();
        let parts = u32::try_from(chunks.len().max(1)).unwrap_or(u32::MAX);

        // Listen first, then ask (a Redis that does not answer costs the
        // deadline, not a connection timeout).
        let reply_channel = self.config.reply_channel(&request_id);
        let subscribed = tokio::time::timeout_at(until, async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&reply_channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match subscribed {
            Ok(pubsub) => pubsub?,
            Err(_) => {
                return Err(FleetError::Redis(redis::RedisError::from(
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "subscribing to the reply channel took longer than the deadline",
                    ),
                )));
            }
        };
        let live: BTreeSet<String> = self
            .replicas()
            .await?
            .into_iter()
            .map(|r| r.instance_id)
            .collect();
        let span = tracing::Span::current();
        span.record("replicas", live.len());
        if live.is_empty() {
            return Ok(NearReportMany {
                answers: Vec::new(),
                silent: Vec::new(),
            });
        }
        let mut conn = self.redis.clone();
        let empty: &[String] = &[];
        for (part, ids) in (0..parts).zip(chunks.into_iter().chain(std::iter::once(empty))) {
            let query = Query {
                request_id: request_id.clone(),
                part,
                parts,
                customer_ids: ids.to_vec(),
            };
            let _: i64 = redis::cmd("PUBLISH")
                .arg(&self.config.query_channel)
                .arg(serde_json::to_string(&query).unwrap_or_default())
                .query_async(&mut conn)
                .await?;
        }

        let mut received: HashMap<String, (BTreeSet<u32>, HashMap<String, EntryView>)> =
            HashMap::new();
        let complete = |received: &HashMap<String, (BTreeSet<u32>, _)>, id: &str| {
            received
                .get(id)
                .is_some_and(|(parts_seen, _)| parts_seen.len() == parts as usize)
        };
        let mut messages = pubsub.into_on_message();
        while !live.iter().all(|id| complete(&received, id)) {
            let message = match tokio::time::timeout_at(until, messages.next()).await {
                Ok(Some(message)) => message,
                Ok(None) | Err(_) => break,
            };
            let Ok(reply) = serde_json::from_slice::<Reply>(message.get_payload_bytes()) else {
                continue;
            };
            if reply.request_id != request_id || reply.part >= parts {
                continue;
            }
            let (seen, entries) = received.entry(reply.instance_id).or_default();
            if seen.insert(reply.part) {
                entries.extend(reply.entries);
            }
        }
        let mut answers: Vec<(String, HashMap<String, EntryView>)> = received
            .into_iter()
            .filter(|(_, (seen, _))| seen.len() == parts as usize)
            .map(|(id, (_, entries))| (id, entries))
            .collect();
        answers.sort_by(|a, b| a.0.cmp(&b.0));
        let silent: Vec<String> = live
            .into_iter()
            .filter(|id| !answers.iter().any(|(answered, _)| answered == id))
            .collect();
        span.record("silent", silent.len());
        if !silent.is_empty() {
            tracing::info!(silent = ?silent, "replicas did not answer a near-cache query in time");
        }
        Ok(NearReportMany { answers, silent })
    }

    /// Queues an eviction of `customer_id` for the invalidator (which
    /// removes the Redis entry behind its fence and announces it on the
    /// invalidation stream + channel, so every near cache drops it).
    /// Returns the request's stream id.
    #[tracing::instrument(skip(self, traceparent), fields(db.system = "redis", db.operation = "XADD"))]
    pub async fn request_eviction(
        &self,
        customer_id: &str,
        reason: &str,
        traceparent: Option<String>,
    ) -> Result<String, FleetError> {
        if feature_store::CustomerId::parse(customer_id).is_err() {
            return Err(FleetError::InvalidCustomerId(customer_id.to_owned()));
        }
        let mut command = redis::cmd("XADD");
        command
            .arg(&self.config.requests_key)
            .arg("MAXLEN")
            .arg("~")
            .arg(self.config.requests_maxlen)
            .arg("*")
            .arg(FIELD_OP)
            .arg(OP_EVICT)
            .arg(FIELD_CUSTOMER_ID)
            .arg(customer_id)
            .arg(FIELD_REASON)
            .arg(reason)
            .arg("requested_at_ms")
            .arg(now_ms());
        if let Some(traceparent) = traceparent {
            command.arg(FIELD_TRACEPARENT).arg(traceparent);
        }
        let id: String = command.query_async(&mut self.redis.clone()).await?;
        metrics::counter!("fleet_eviction_requests_total").increment(1);
        Ok(id)
    }

    /// Whether the invalidator has handled the request (its position
    /// reached `request_id`) within `deadline`.
    pub async fn wait_handled(
        &self,
        request_id: &str,
        deadline: Duration,
    ) -> Result<bool, FleetError> {
        let Ok(wanted) = request_id.parse::<StreamId>() else {
            return Ok(false);
        };
        let until = Instant::now() + deadline;
        let mut conn = self.redis.clone();
        loop {
            let position: Option<String> = redis::cmd("GET")
                .arg(&self.config.requests_position_key)
                .query_async(&mut conn)
                .await?;
            if position
                .and_then(|p| p.parse::<StreamId>().ok())
                .is_some_and(|p| p >= wanted)
            {
                return Ok(true);
            }
            if Instant::now() + HANDLED_POLL > until {
                return Ok(false);
            }
            tokio::time::sleep(HANDLED_POLL).await;
        }
    }
}
