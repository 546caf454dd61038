use crate::entry::Entry;
use crate::tier::CacheTier;
use chrono::Utc;
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TierError {
    #[error("Redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

/// The Redis key of a customer, exactly as operators expect it.
pub fn key(customer_id: &str) -> String {
    format!("features:{customer_id}")
}

/// Key prefix of every cached customer; used by flushes (SCAN MATCH prefix*).
pub const KEY_PREFIX: &str = "features:";

/// The version guard in Lua: `KEYS[1]` the customer key; `ARGV[1..4]` the
/// entry's version, rank, value and TTL in ms. Other scripts (the
/// invalidator's fenced writes) are built on the same text, so the rule
/// exists once.
pub const GUARD_SCRIPT: &str = include_str!("lua/guarded_set.lua");

/// What the guard did with an offered entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Stored,
    /// The tier already holds this very version: nothing to do, and the
    /// entry is as current as what the tier holds.
    AlreadyCurrent,
    /// The tier holds something newer.
    Refused,
}

/// Health figures for `/api/health/`.
#[derive(Debug, Clone)]
pub struct RedisHealth {
    pub latency: Duration,
    pub total_keys: u64,
    pub used_memory: String,
}

/// The shared Redis tier. Commands time out after `timeout`, and the
/// connection reconnects by itself, so a dead Redis costs a request at most
/// one short wait before it falls through to MongoDB.
#[derive(Clone)]
pub struct RedisTier {
    conn: ConnectionManager,
    guard: Script,
    document_ttl: Duration,
    marker_ttl: Duration,
}

impl RedisTier {
    /// Connects lazily: the service starts even while Redis is down.
    pub fn connect(
        url: &str,
        timeout: Duration,
        document_ttl: Duration,
        marker_ttl: Duration,
    ) -> Result<Self, TierError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            conn,
            guard: Script::new(GUARD_SCRIPT),
            document_ttl,
            marker_ttl,
        })
    }

    /// Connects with the configured `REDIS_*` and `TOMBSTONE_TTL_MS` settings.
    pub fn from_settings(settings: &settings::Settings) -> Result<Self, TierError> {
        Self::connect(
            &settings.redis_url,
            settings.redis_timeout,
            settings.redis_ttl,
            settings.tombstone_ttl,
        )
    }

    /// A handle on the same multiplexed connection, for other components
    /// (health, the invalidation follower's catch-up reads).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    #[tracing::instrument(skip(self), fields(db.system = "redis", db.operation = "GET"))]
    pub async fn get(&self, customer_id: &str) -> Result<Option<Entry>, TierError> {
        let raw: Option<String> = self
            .conn
            .clone()
            .get(key(customer_id))
            .await
            .inspect_err(|_| count_error("GET"))?;
        Ok(raw.and_then(|raw| Entry::from_redis_value(customer_id, raw)))
    }

    /// One MGET for many customers.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "MGET", count = customer_ids.len()))]
    pub async fn get_many(&self, customer_ids: &[&str]) -> Result<Vec<Option<Entry>>, TierError> {
        if customer_ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = customer_ids.iter().map(|id| key(id)).collect();
        let raw: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn.clone())
            .await
            .inspect_err(|_| count_error("MGET"))?;
        Ok(customer_ids
            .iter()
            .zip(raw)
            .map(|(id, raw)| raw.and_then(|raw| Entry::from_redis_value(id, raw)))
            .collect())
    }

    /// Offers many entries through the guard in one pipeline.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", count = entries.len()))]
    pub async fn offer_many(&self, entries: &[Entry]) -> Result<Vec<Offer>, TierError> {
        let mut pipe = redis::pipe();
        let mut offered = Vec::with_capacity(entries.len());
        for (index, entry) in entries.iter().enumerate() {
            if let Some(ttl) = self.ttl_of(entry) {
                let mut invocation = self.guard.prepare_invoke();
                invocation
                    .key(key(entry.customer_id()))
                    .arg(entry.version())
                    .arg(entry.rank())
                    .arg(entry.to_redis_value())
                    .arg(ttl.as_millis() as u64);
                pipe.invoke_script(&invocation);
                offered.push(index);
            }
        }
        // Entries not offered (already expired documents) count as refused.
        let mut outcomes = vec![Offer::Refused; entries.len()];
        if offered.is_empty() {
            return Ok(outcomes);
        }
        let mut conn = self.conn.clone();
        let replies: Vec<i64> = match pipe.query_async(&mut conn).await {
            Ok(replies) => replies,
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                self.guard.load_async(&mut conn).await?;
                pipe.query_async(&mut conn)
                    .await
                    .inspect_err(|_| count_error("EVALSHA"))?
            }
            Err(err) => {
                count_error("EVALSHA");
                return Err(err.into());
            }
        };
        for (index, reply) in offered.into_iter().zip(replies) {
            outcomes[index] = match reply {
                1 => Offer::Stored,
                2 => Offer::AlreadyCurrent,
                _ => {
                    metrics::counter!("version_guard_rejections_total", "tier" => "redis")
                        .increment(1);
                    Offer::Refused
                }
            };
        }
        Ok(outcomes)
    }

    /// How long an entry may live in Redis: documents no longer than `REDIS_TTL`
    /// nor past their own expiry, shortened by up to 5 % of jitter so keys
    /// written together do not expire together; markers for the tombstone TTL.
    /// `None` for a document that has already expired.
    fn ttl_of(&self, entry: &Entry) -> Option<Duration> {
        match entry {
            Entry::Document(doc) => {
                let mut ttl = self.document_ttl;
                if let Some(expires_at) = doc.expires_at {
                    let left = (expires_at - Utc::now()).to_std().ok()?;
                    ttl = ttl.min(left);
                }
                let jitter_ms = (ttl.as_millis() as u64) / 20;
                let jitter = Duration::from_millis(rand::rng().random_range(0..=jitter_ms));
                let ttl = ttl.saturating_sub(jitter);
                (ttl >= Duration::from_millis(1)).then_some(ttl)
            }
            Entry::Tombstone { .. } | Entry::Fence { .. } => Some(self.marker_ttl),
        }
    }

    pub async fn health(&self) -> Result<RedisHealth, TierError> {
        let mut conn = self.conn.clone();
        let started = Instant::now();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        let latency = started.elapsed();
        let total_keys: u64 = redis::cmd("DBSIZE").query_async(&mut conn).await?;
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut conn)
            .await?;
        let used_memory = info
            .lines()
            .find_map(|line| line.strip_prefix("used_memory_human:"))
            .unwrap_or("unknown")
            .trim()
            .to_owned();
        Ok(RedisHealth {
            latency,
            total_keys,
            used_memory,
        })
    }
}

impl CacheTier for RedisTier {
    async fn lookup(&self, customer_id: &str) -> Result<Option<Entry>, TierError> {
        self.get(customer_id).await
    }

    async fn offer(&self, entry: Entry) -> Result<bool, TierError> {
        Ok(self
            .offer_many(std::slice::from_ref(&entry))
            .await?
            .first()
            .is_some_and(|outcome| *outcome == Offer::Stored))
    }
}

fn count_error(operation: &'static str) {
    metrics::counter!("redis_errors_total", "operation" => operation).increment(1);
}
