use crate::entry::Entry;
use crate::fence::Fence;
use crate::keyspace::{DOCUMENT_PREFIX, TtlPolicy, document_key};
use crate::tier::CacheTier;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use std::time::{Duration, Instant};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum TierError {
    #[error("Redis failed")]
    Redis(#[from] redis::RedisError),
}

/// Why a fenced write did not land.
#[derive(Debug, Error)]
pub enum FencedWriteError {
    /// The fence moved: another writer holds it now.
    #[error("fenced: this writer no longer holds the fence")]
    Fenced,
    #[error("Redis failed")]
    Redis(#[source] redis::RedisError),
}

impl From<redis::RedisError> for FencedWriteError {
    fn from(err: redis::RedisError) -> Self {
        if Fence::refused(&err) {
            Self::Fenced
        } else {
            Self::Redis(err)
        }
    }
}

/// Where Redis is and how long entries live there.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    pub url: String,
    /// Each command's deadline (and the connect timeout).
    pub timeout: Duration,
    pub ttl: TtlPolicy,
}

/// The version guard in Lua: `KEYS[1]` the customer key; `ARGV[1..4]` the
/// entry's version, rank, value and TTL in ms.
const GUARD_SCRIPT: &str = include_str!("lua/guarded_set.lua");

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

impl Offer {
    fn of_reply(reply: i64) -> Self {
        match reply {
            1 => Self::Stored,
            2 => Self::AlreadyCurrent,
            _ => {
                metrics::counter!("version_guard_rejections_total", "tier" => "redis").increment(1);
                Self::Refused
            }
        }
    }
}

/// Health figures for `/api/health/`.
#[derive(Debug, Clone)]
pub struct RedisHealth {
    pub latency: Duration,
    pub total_keys: u64,
    pub used_memory: String,
}

/// The shared Redis tier. Commands time out after the configured timeout,
/// and the connection reconnects by itself, so a dead Redis costs a request
/// at most one short wait before it falls through to MongoDB.
#[derive(Clone)]
pub struct RedisTier {
    conn: ConnectionManager,
    guard: Script,
    ttl: TtlPolicy,
}

impl RedisTier {
    /// Connects lazily: the service starts even while Redis is down.
    pub fn connect(config: &RedisConfig) -> Result<Self, TierError> {
        let client = redis::Client::open(config.url.as_str())?;
        let options = ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.timeout))
            .set_connection_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, options)?;
        Ok(Self {
            conn,
            guard: Script::new(GUARD_SCRIPT),
            ttl: config.ttl,
        })
    }

    /// A handle on the same multiplexed connection, for other components
    /// (health, the invalidation subscriber's catch-up reads, announcements).
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    #[tracing::instrument(skip(self), fields(db.system = "redis", db.operation = "GET"))]
    pub async fn get(&self, customer_id: &str) -> Result<Option<Entry>, TierError> {
        let raw: Option<String> = self
            .conn
            .clone()
            .get(document_key(customer_id))
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
        let keys: Vec<String> = customer_ids.iter().map(|id| document_key(id)).collect();
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
            if let Some(ttl_ms) = self.ttl.ttl_ms_of(entry) {
                let mut invocation = self.guard.prepare_invoke();
                guard_args(&mut invocation, entry, ttl_ms);
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
            outcomes[index] = Offer::of_reply(reply);
        }
        Ok(outcomes)
    }

    /// A writer whose every write lands only while `fence` holds; made once
    /// per term of whoever holds the fence.
    pub fn fenced(&self, fence: Fence) -> FencedWriter {
        FencedWriter {
            conn: self.conn.clone(),
            script: Fence::script(GUARD_SCRIPT),
            fence,
            ttl: self.ttl,
        }
    }

    /// Deletes every cached customer entry (`features:*` strings; other
    /// types under the prefix are not ours) with SCAN and UNLINK, never KEYS.
    /// Returns how many keys were removed.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "SCAN+UNLINK"))]
    pub async fn flush_documents(&self) -> Result<u64, TierError> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut removed = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{DOCUMENT_PREFIX}*"))
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

/// The guarded write of one writer behind a [`Fence`].
#[derive(Clone)]
pub struct FencedWriter {
    conn: ConnectionManager,
    script: Script,
    fence: Fence,
    ttl: TtlPolicy,
}

impl FencedWriter {
    /// Offers `entry` through the version guard while the fence holds.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", customer_id = entry.customer_id()))]
    pub async fn offer(&self, entry: &Entry) -> Result<Offer, FencedWriteError> {
        let Some(ttl_ms) = self.ttl.ttl_ms_of(entry) else {
            return Ok(Offer::Refused);
        };
        let mut invocation = self.script.prepare_invoke();
        guard_args(&mut invocation, entry, ttl_ms);
        self.fence.append(&mut invocation);
        let reply: i64 = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .inspect_err(|_| count_error("EVALSHA"))?;
        Ok(Offer::of_reply(reply))
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }
}

/// The guard script's keys and arguments for `entry`.
fn guard_args(invocation: &mut redis::ScriptInvocation<'_>, entry: &Entry, ttl_ms: u64) {
    invocation
        .key(document_key(entry.customer_id()))
        .arg(entry.version())
        .arg(entry.rank())
        .arg(entry.to_redis_value())
        .arg(ttl_ms);
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
