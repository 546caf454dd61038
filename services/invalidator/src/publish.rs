//! The invalidator's writes to Redis. Every one is fenced by the lease, and
//! every one is idempotent, so replaying an event after a crash is harmless.

use crate::lease::ControlKeys;
use feature_cache::Entry;
use feature_cache::redis_tier::{GUARD_SCRIPT, KEY_PREFIX, key};
use invalidation::Invalidation;
use redis::Script;
use redis::aio::ConnectionManager;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PublishError {
    /// Another invalidator holds the lease now: stop writing.
    #[error("fenced: this invalidator no longer holds the lease")]
    Fenced,
    #[error("Redis error: {0}")]
    Redis(redis::RedisError),
}

impl From<redis::RedisError> for PublishError {
    fn from(err: redis::RedisError) -> Self {
        if err.to_string().contains("FENCED") {
            Self::Fenced
        } else {
            Self::Redis(err)
        }
    }
}

/// Where changes are announced.
#[derive(Debug, Clone)]
pub struct Channels {
    pub channel: String,
    pub stream: String,
    pub stream_maxlen: u64,
}

#[derive(Clone)]
pub struct Publisher {
    redis: ConnectionManager,
    keys: ControlKeys,
    channels: Channels,
    fenced_offer: Script,
    announce: Script,
    document_ttl: Duration,
    marker_ttl: Duration,
}

impl Publisher {
    pub fn new(
        redis: ConnectionManager,
        keys: ControlKeys,
        channels: Channels,
        document_ttl: Duration,
        marker_ttl: Duration,
    ) -> Self {
        let fenced_offer = format!("{}\n{}", include_str!("lua/fence.lua"), GUARD_SCRIPT);
        Self {
            redis,
            keys,
            channels,
            fenced_offer: Script::new(&fenced_offer),
            announce: Script::new(include_str!("lua/announce.lua")),
            document_ttl,
            marker_ttl,
        }
    }

    /// Offers `entry` through the version guard; `true` when stored.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", customer_id = entry.customer_id()))]
    pub async fn offer(&self, entry: &Entry, holder: &str) -> Result<bool, PublishError> {
        let ttl = match entry {
            Entry::Document(doc) => {
                let left = doc
                    .expires_at
                    .and_then(|at| (at - chrono::Utc::now()).to_std().ok())
                    .unwrap_or(self.document_ttl);
                self.document_ttl.min(left)
            }
            Entry::Tombstone { .. } | Entry::Fence { .. } => self.marker_ttl,
        };
        let stored: i64 = self
            .fenced_offer
            .key(key(entry.customer_id()))
            .key(&self.keys.lease)
            .arg(entry.version())
            .arg(entry.rank())
            .arg(entry.to_redis_value())
            .arg(ttl.as_millis().max(1) as u64)
            .arg(holder)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(stored == 1)
    }

    /// Appends `message` to the stream, publishes it and saves `token`, in
    /// one atomic step. Returns the stream id.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", op = message.op.as_str()))]
    pub async fn announce(
        &self,
        message: &Invalidation,
        token: &str,
        holder: &str,
    ) -> Result<String, PublishError> {
        let json = serde_json::to_string(message).unwrap_or_default();
        self.run_announce(&json, token, holder).await
    }

    /// Saves the resume token alone (the stream moved on without events).
    pub async fn save_token(&self, token: &str, holder: &str) -> Result<(), PublishError> {
        self.run_announce("", token, holder).await.map(|_| ())
    }

    async fn run_announce(
        &self,
        json: &str,
        token: &str,
        holder: &str,
    ) -> Result<String, PublishError> {
        let id: String = self
            .announce
            .key(&self.channels.stream)
            .key(&self.keys.lease)
            .key(&self.keys.resume_token)
            .arg(json)
            .arg(&self.channels.channel)
            .arg(self.channels.stream_maxlen)
            .arg(token)
            .arg(holder)
            .invoke_async(&mut self.redis.clone())
            .await?;
        metrics::counter!("invalidator_resume_token_saves_total").increment(1);
        Ok(id)
    }

    pub async fn load_token(&self) -> redis::RedisResult<Option<String>> {
        redis::cmd("GET")
            .arg(&self.keys.resume_token)
            .query_async(&mut self.redis.clone())
            .await
    }

    /// Deletes every cached customer document (`features:*` strings; the
    /// stream shares the prefix but is not a string) with SCAN and UNLINK,
    /// never KEYS. Returns how many keys were removed.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "SCAN+UNLINK"))]
    pub async fn flush_cache(&self) -> redis::RedisResult<u64> {
        let mut conn = self.redis.clone();
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{KEY_PREFIX}*"))
                .arg("TYPE")
                .arg("string")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await?;
                removed += n;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }
}
