//! Warm start: after a replica starts, and after its near cache was flushed
//! (a flush announcement, or a gap it could not heal), it preloads the
//! hottest keys of the hot-key record ([`crate::hot`]) — so the first
//! requests after a start or a flush are near-cache hits instead of a wave of
//! misses reaching Redis and MongoDB at once. After the invalidator flushes
//! Redis, [`refill_redis`] puts the hottest keys back there.
//!
//! Both go through the normal read path's guarantees: the replica preloads
//! with [`TieredStore::preload`] (the batch read: near-cache tickets,
//! reservations and the version guard, so a change during the warm-up wins),
//! and the refill reserves each key before reading MongoDB and fills onto
//! the reservation behind the invalidator's fence (a change applied
//! meanwhile removes or replaces the reservation, and the fill is refused).
//!
//! Both go at a bounded rate, in small chunks with a pause after each, so
//! a warm-up never crowds out live requests.

use crate::connection::RedisConnection;
use crate::entry::{CachedDocument, Entry};
use crate::hot;
use crate::redis_tier::{
    FencedWriteError, FencedWriter, RedisTier, Reservation, ReserveFor, Writer,
};
use crate::tiered::TieredStore;
use feature_store::{CustomerId, FeatureStore, StoreError};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Keys per batch read of a warm-up.
pub const CHUNK: usize = 50;

/// How much to preload, from where, and how fast.
#[derive(Debug, Clone)]
pub struct WarmConfig {
    /// The hot-key record's key (`{base}:hot`).
    pub hot_key: String,
    /// The hottest keys preloaded (`WARM_KEYS`, at least 1).
    pub keys: usize,
    /// Keys loaded per second at most (`WARM_RATE_PER_SECOND`).
    pub rate_per_second: u64,
}

impl WarmConfig {
    fn chunk(&self) -> usize {
        CHUNK.min(
            usize::try_from(self.rate_per_second)
                .unwrap_or(CHUNK)
                .max(1),
        )
    }

    /// The least time a chunk of `len` keys may take at the rate.
    fn pace(&self, len: usize) -> Duration {
        Duration::from_secs_f64(len as f64 / self.rate_per_second.max(1) as f64)
    }
}

#[derive(Debug, Error)]
pub enum WarmError {
    #[error("reading the hot-key record failed")]
    Record(#[source] redis::RedisError),
    #[error("MongoDB failed")]
    Store(#[from] StoreError),
    #[error("Redis failed")]
    Redis(#[from] crate::redis_tier::TierError),
    /// Another invalidator leads now.
    #[error("fenced: this writer no longer holds the fence")]
    Fenced,
    #[error("Redis failed")]
    FencedRedis(#[source] redis::RedisError),
}

impl From<FencedWriteError> for WarmError {
    fn from(err: FencedWriteError) -> Self {
        match err {
            FencedWriteError::Fenced => Self::Fenced,
            FencedWriteError::Redis(err) => Self::FencedRedis(err),
        }
    }
}

/// A replica's warm-ups: one when it starts (its first flush is the one it
/// makes when it first subscribes to invalidations), one after every flush
/// of its near cache since.
pub struct Warmer {
    tiers: TieredStore,
    conn: RedisConnection,
    config: WarmConfig,
    flushes: watch::Receiver<u64>,
}

impl Warmer {
    /// `None` without a near cache: there is nothing of its own to warm.
    pub fn new(tiers: &TieredStore, config: WarmConfig) -> Option<Self> {
        let flushes = tiers.near()?.flushes();
        Some(Self {
            conn: tiers.redis().connection(),
            tiers: tiers.clone(),
            config,
            flushes,
        })
    }

    /// Warms up after every flush until `shutdown`. A flush during a
    /// warm-up starts it again (what it loaded was flushed with the rest).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut flushes = self.flushes.clone();
        let mut reason = "start";
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                changed = flushes.changed() => if changed.is_err() { return },
            }
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    changed = flushes.changed() => {
                        if changed.is_err() { return }
                        tracing::info!(reason, "flushed again during the warm-up; starting it again");
                        reason = "flush";
                    }
                    () = self.warm_up(reason) => break,
                }
            }
            reason = "flush";
        }
    }

    /// Preloads the hottest keys into the tiers, logging the start and the end.
    async fn warm_up(&self, reason: &'static str) {
        let started = Instant::now();
        let ids = match hot::top(&self.conn, &self.config.hot_key, self.config.keys).await {
            Ok(ids) => ids,
            Err(err) => {
                tracing::warn!(reason, error = %telemetry::ErrorChain(&err), "warm-up skipped: cannot read the hot-key record");
                return;
            }
        };
        if ids.is_empty() {
            tracing::info!(reason, "warm-up skipped: the hot-key record is empty");
            return;
        }
        tracing::info!(reason, keys = ids.len(), "warm-up started");
        let counter = metrics::counter!("cache_warm_keys_loaded_total", "reason" => reason);
        let mut loaded = 0;
        let mut failed = 0;
        for chunk in ids.chunks(self.config.chunk()) {
            let chunk_started = Instant::now();
            match self.tiers.preload(chunk).await {
                Ok(n) => {
                    loaded += n;
                    counter.increment(n as u64);
                }
                Err(err) => {
                    failed += chunk.len();
                    tracing::debug!(error = %telemetry::ErrorChain(&err), "a warm-up chunk failed");
                }
            }
            pause(chunk_started, self.config.pace(chunk.len())).await;
        }
        tracing::info!(
            reason,
            keys = ids.len(),
            loaded,
            failed,
            took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "warm-up done"
        );
    }
}

/// Sleeps for what is left of `pace` since `started`, and yields at least
/// once: the next chunk waits behind whatever else is ready.
async fn pause(started: Instant, pace: Duration) {
    let left = pace.saturating_sub(started.elapsed());
    if left.is_zero() {
        tokio::task::yield_now().await;
    } else {
        tokio::time::sleep(left).await;
    }
}

/// After a flush of Redis: loads the hottest keys from MongoDB back into
/// Redis behind `writer`'s fence, at the configured rate. Each key is
/// reserved before MongoDB is read and filled onto its reservation, so a
/// change applied meanwhile (which replaces or removes the reservation) is
/// never overwritten. Returns how many documents were stored.
#[tracing::instrument(name = "cache.refill", skip_all, fields(keys = config.keys))]
pub async fn refill_redis(
    redis: &RedisTier,
    writer: &FencedWriter,
    store: &FeatureStore,
    config: &WarmConfig,
) -> Result<usize, WarmError> {
    let ids = hot::top(&redis.connection(), &config.hot_key, config.keys)
        .await
        .map_err(WarmError::Record)?;
    let mut stored = 0;
    for chunk in ids.chunks(config.chunk()) {
        let chunk_started = Instant::now();
        stored += refill_chunk(redis, writer, store, chunk).await?;
        pause(chunk_started, config.pace(chunk.len())).await;
    }
    Ok(stored)
}

async fn refill_chunk(
    redis: &RedisTier,
    writer: &FencedWriter,
    store: &FeatureStore,
    ids: &[CustomerId],
) -> Result<usize, WarmError> {
    let keys: Vec<&str> = ids.iter().map(CustomerId::as_str).collect();
    let reservations = redis
        .reserve_many(
            &keys,
            ReserveFor::Read {
                serve_absence: false,
            },
        )
        .await?;
    // Keys that hold a document already (someone read them meanwhile) are
    // done; so are cached absences (a fill of a document would follow its
    // insert through the guard anyway).
    let reserved: Vec<(&CustomerId, Writer)> = ids
        .iter()
        .zip(reservations)
        .filter_map(|(id, reservation)| match reservation {
            Reservation::Reserved(writer) | Reservation::Lease { writer, .. } => Some((id, writer)),
            Reservation::Document(_) | Reservation::Absent(_) => None,
        })
        .collect();
    if reserved.is_empty() {
        return Ok(0);
    }
    let wanted: Vec<CustomerId> = reserved.iter().map(|(id, _)| (*id).clone()).collect();
    let mut by_id: HashMap<String, Entry> = match store.get_many(&wanted).await {
        Ok(docs) => docs
            .iter()
            .map(|doc| {
                let entry = Entry::Document(CachedDocument::from_document(doc));
                (doc.customer_id.clone(), entry)
            })
            .collect(),
        Err(err) => {
            release(redis, &reserved).await;
            return Err(err.into());
        }
    };
    let mut fills = Vec::new();
    let mut unfilled = Vec::new();
    for (id, reservation) in reserved {
        match by_id.remove(id.as_str()) {
            Some(entry) => fills.push((entry, reservation)),
            None => unfilled.push((id, reservation)),
        }
    }
    release(redis, &unfilled).await;
    let offers = writer.fill_many(&fills).await?;
    Ok(offers.iter().filter(|offer| offer.accepted()).count())
}

/// Gives up reservations of keys MongoDB does not hold (best effort: a
/// reservation left behind expires).
async fn release(redis: &RedisTier, reserved: &[(&CustomerId, Writer)]) {
    let reservations: Vec<(&str, &Writer)> = reserved
        .iter()
        .map(|(id, writer)| (id.as_str(), writer))
        .collect();
    if let Err(err) = redis.release_many(&reservations).await {
        tracing::debug!(error = %telemetry::ErrorChain(&err), "could not release refill reservations");
    }
}
