//! The replica's responder: subscribed to the admin channel, it answers
//! each near-cache query with what its near cache holds for the ids asked,
//! on the query's reply channel. Queries come from operators and the
//! auditor and are rare; answering reads the near cache and nothing else.

use crate::config::FleetConfig;
use crate::wire::{EntryView, Query, Reply};
use feature_cache::NearCache;
use feature_cache::RedisConnection;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use telemetry::Condition;
use tokio_util::sync::CancellationToken;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Answers near-cache queries for one replica until shutdown.
pub struct Responder {
    /// For the subscription, a connection of its own.
    client: redis::Client,
    /// For the replies.
    redis: RedisConnection,
    config: FleetConfig,
    instance_id: String,
    /// `None` without a near cache: every query is answered with nothing.
    near: Option<Arc<NearCache>>,
    connection: Condition,
}

impl Responder {
    pub fn new(
        client: redis::Client,
        redis: RedisConnection,
        config: FleetConfig,
        instance_id: String,
        near: Option<Arc<NearCache>>,
    ) -> Self {
        Self {
            client,
            redis,
            config,
            instance_id,
            near,
            connection: Condition::new(
                "fleet_responder",
                "the admin channel subscription failed; this replica shows as silent to near-cache queries",
                "the admin channel subscription is back",
            ),
        }
    }

    /// Subscribes and answers until `shutdown`, reconnecting with backoff.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let started = std::time::Instant::now();
            tokio::select! {
                () = shutdown.cancelled() => return,
                result = self.serve() => {
                    let err = result.err().unwrap_or_else(|| {
                        redis::RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the admin subscription's connection closed",
                        ))
                    });
                    self.connection.fail(&err);
                }
            }
            // A subscription that lived a while restarts the backoff: only
            // failures in a row slow reconnecting down.
            if started.elapsed() > MAX_BACKOFF {
                backoff = FIRST_BACKOFF;
            }
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One subscription's life.
    async fn serve(&self) -> redis::RedisResult<()> {
        let mut pubsub = self.client.get_async_pubsub().await?;
        pubsub.subscribe(&self.config.query_channel).await?;
        self.connection.recover();
        let mut messages = pubsub.into_on_message();
        while let Some(message) = messages.next().await {
            let Ok(query) = serde_json::from_slice::<Query>(message.get_payload_bytes()) else {
                tracing::debug!("ignoring an unreadable near-cache query");
                continue;
            };
            if !query.is_well_formed() {
                tracing::debug!("ignoring a malformed near-cache query");
                continue;
            }
            let reply = self.answer(query);
            self.send(&reply).await?;
        }
        Ok(())
    }

    /// This replica's entries for the query's ids.
    pub fn answer(&self, query: Query) -> Reply {
        let entries: HashMap<String, EntryView> = match &self.near {
            Some(near) => query
                .customer_ids
                .into_iter()
                .filter_map(|id| {
                    let view = near.get(&id).as_ref().map(EntryView::from)?;
                    Some((id, view))
                })
                .collect(),
            None => HashMap::new(),
        };
        Reply {
            request_id: query.request_id,
            part: query.part,
            instance_id: self.instance_id.clone(),
            entries,
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(db.system = "redis", db.operation = "PUBLISH"))]
    async fn send(&self, reply: &Reply) -> redis::RedisResult<()> {
        let payload = serde_json::to_string(reply).unwrap_or_default();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(self.config.reply_channel(&reply.request_id))
            .arg(payload)
            .query_async(&mut self.redis.clone())
            .await?;
        metrics::counter!("fleet_queries_answered_total").increment(1);
        Ok(())
    }
}
