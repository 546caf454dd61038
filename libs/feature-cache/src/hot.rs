//! The hot-key record: which customers the deployment reads most, kept in
//! Redis (`{base}:hot`, a sorted set of customer id → decayed read score) so
//! that a replica starting up, or one that just lost its near cache, knows
//! what to preload, and the invalidator what to put back after a flush.
//!
//! Counting costs the read path next to nothing: [`HotRecorder::record`]
//! takes one read in [`SAMPLE`] (a thread-local random draw; no lock) and
//! hands the served document's `Arc` (no allocation) to a bounded channel;
//! when the channel is full the sample is dropped. [`HotRecord::run`] counts
//! the samples per key and every [`HotConfig::flush_every`] adds them to the
//! set in one script call per [`PAIRS_PER_CALL`] keys.
//!
//! Decay is forward decay (`lua/hot_record.lua`): reads at time `t` add
//! `reads × 2^((t − L) / half-life)` for a landmark `L`, so older reads
//! count for less without any score being rewritten; the scores are rescaled
//! (one `ZUNIONSTORE … WEIGHTS`) when the weights grow large. The set is
//! trimmed to [`HotConfig::capacity`] members on every addition.

use crate::connection::RedisConnection;
use crate::entry::CachedDocument;
use feature_store::CustomerId;
use rand::Rng;
use redis::Script;
use std::collections::HashMap;
use std::time::Duration;
use telemetry::Condition;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One read in this many is recorded (and counts for this many).
pub const SAMPLE: u32 = 8;
/// Samples waiting to be counted at most; more are dropped.
const QUEUE: usize = 16_384;
/// Keys added per script call: one call holds Redis for a moment only.
pub const PAIRS_PER_CALL: usize = 500;
/// The member that holds the landmark (no customer id contains `#`).
pub const LANDMARK: &str = "#landmark";

const RECORD_SCRIPT: &str = include_str!("lua/hot_record.lua");

/// Where the record lives and how it decays.
#[derive(Debug, Clone)]
pub struct HotConfig {
    /// `{base}:hot` ([`crate::ControlKeys::hot`]).
    pub key: String,
    /// A read this old counts half as much as one now.
    pub half_life: Duration,
    /// Keys the set keeps (the hottest).
    pub capacity: usize,
    /// How often counted reads are added to the set.
    pub flush_every: Duration,
}

impl HotConfig {
    /// A record of `capacity` keys with the default decay (a 10-minute
    /// half-life) and a flush every 2 s.
    pub fn new(key: impl Into<String>, capacity: usize) -> Self {
        Self {
            key: key.into(),
            half_life: Duration::from_secs(600),
            capacity: capacity.max(1),
            flush_every: Duration::from_secs(2),
        }
    }
}

/// The read path's handle: cheap to clone, never blocks.
#[derive(Clone)]
pub struct HotRecorder {
    samples: mpsc::Sender<CachedDocument>,
}

impl HotRecorder {
    /// Notes a read of `doc` (one in [`SAMPLE`] is kept).
    #[inline]
    pub fn record(&self, doc: &CachedDocument) {
        if rand::rng().random_ratio(1, SAMPLE) {
            // Full: the counter task is behind; a lost sample only blurs counts.
            let _ = self.samples.try_send(doc.clone());
        }
    }
}

/// The task that counts samples and adds them to Redis.
pub struct HotRecord {
    samples: mpsc::Receiver<CachedDocument>,
    conn: RedisConnection,
    config: HotConfig,
    script: Script,
    redis: Condition,
}

impl HotRecord {
    /// The record task and the read path's handle on it.
    pub fn new(conn: RedisConnection, config: HotConfig) -> (HotRecorder, Self) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let record = Self {
            samples: rx,
            conn,
            config,
            script: Script::new(RECORD_SCRIPT),
            redis: Condition::new(
                "hot_record",
                "cannot add reads to the hot-key record in Redis; counting goes on",
                "the hot-key record is written again",
            ),
        };
        (HotRecorder { samples: tx }, record)
    }

    /// Counts and flushes until `shutdown` (then flushes what it counted).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut tick = tokio::time::interval(self.config.flush_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                sample = self.samples.recv() => {
                    let Some(doc) = sample else { break };
                    count(&mut counts, doc.customer_id());
                }
                _ = tick.tick() => self.flush(&mut counts).await,
            }
        }
        self.flush(&mut counts).await;
    }

    /// Adds the counted reads to the set (each counting for [`SAMPLE`]).
    async fn flush(&mut self, counts: &mut HashMap<String, u64>) {
        if counts.is_empty() {
            return;
        }
        let pairs: Vec<(String, u64)> = counts.drain().collect();
        match add(&self.conn, &self.script, &self.config, &pairs, SAMPLE).await {
            Ok(()) => {
                self.redis.recover();
            }
            Err(err) => {
                self.redis.fail(&err);
            }
        }
    }
}

fn count(counts: &mut HashMap<String, u64>, customer_id: &str) {
    match counts.get_mut(customer_id) {
        Some(n) => *n += 1,
        None => {
            counts.insert(customer_id.to_owned(), 1);
        }
    }
}

/// Adds `reads × scale` per key to the record, decayed and trimmed.
#[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", count = pairs.len()))]
async fn add(
    conn: &RedisConnection,
    script: &Script,
    config: &HotConfig,
    pairs: &[(String, u64)],
    scale: u32,
) -> redis::RedisResult<()> {
    let half_life = u64::try_from(config.half_life.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    for chunk in pairs.chunks(PAIRS_PER_CALL) {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(&config.key)
            .arg(half_life)
            .arg(config.capacity.max(1));
        for (id, reads) in chunk {
            invocation
                .arg(id)
                .arg(reads.saturating_mul(u64::from(scale)));
        }
        let _: i64 = invocation.invoke_async(&mut conn.clone()).await?;
    }
    Ok(())
}

/// Adds reads to the record directly (what [`HotRecord`] does with its
/// samples); for tools and tests.
pub async fn add_reads(
    conn: &RedisConnection,
    config: &HotConfig,
    pairs: &[(String, u64)],
) -> redis::RedisResult<()> {
    add(conn, &Script::new(RECORD_SCRIPT), config, pairs, 1).await
}

/// The `n` hottest customers, hottest first (members that are not customer
/// ids are skipped).
#[tracing::instrument(skip(conn), fields(db.system = "redis", db.operation = "ZREVRANGEBYSCORE"))]
pub async fn top(
    conn: &RedisConnection,
    key: &str,
    n: usize,
) -> redis::RedisResult<Vec<CustomerId>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    // Scores above 0 only: the landmark's is negative.
    let members: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
        .arg(key)
        .arg("+inf")
        .arg("(0")
        .arg("LIMIT")
        .arg(0)
        .arg(n)
        .query_async(&mut conn.clone())
        .await?;
    Ok(members
        .iter()
        .filter_map(|id| CustomerId::parse(id).ok())
        .collect())
}
