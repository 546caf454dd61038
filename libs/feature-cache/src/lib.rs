//! The cache tiers and the read path through them.
//!
//! - [`connection`]: [`RedisConnection`], one connection type for a single
//!   Redis and a Redis Cluster (pipelines split by slot on a cluster).
//! - [`slots`]: cluster key slots and a hash tag for every slot.
//! - [`keyspace`]: the Redis keyspace — document keys, the control keys in a
//!   namespace no customer id can reach, and one TTL policy.
//! - [`entry`]: what a tier holds for a customer — a document, a tombstone or
//!   a version floor — and the one ordering rule between them (the version
//!   guard).
//! - [`tier`]: [`CacheTier`], the trait both tiers implement: look up, and offer
//!   an entry that is kept only if it supersedes what is there.
//! - [`near`]: the in-process near cache (quick_cache), with the guard and an epoch that
//!   refuses fills across a flush.
//! - [`redis_tier`]: Redis, with the guard as a Lua compare-and-set, the
//!   fenced writer the invalidator writes through, and flushes.
//! - [`inspect`]: what Redis holds for one customer as an operator sees it
//!   (reservations too), with its remaining TTL.
//! - [`fence`]: [`Fence`], writes that land only while a key holds a token.
//! - [`eviction`]: whether Redis's eviction policy keeps the guarantees.
//! - [`coalesce`]: one load per key in flight, however many callers wait on it.
//! - [`hot`]: the hot-key record in Redis (sampled read counts, decayed).
//! - [`warm`]: warm start — preloading the hottest keys into the near cache
//!   (after a start or a flush) and back into Redis (after the invalidator's
//!   flush).
//! - [`lease`]: across replicas, one load per key: a miss waits briefly on
//!   another replica's reservation for its fill.
//! - [`refresh`]: hot keys refreshed ahead of their expiry in Redis.
//! - [`tiered`]: [`TieredStore`], the tiered read path (near → Redis →
//!   MongoDB, warming upwards) and the write path (MongoDB first, then the tiers).

pub mod coalesce;
pub mod connection;
pub mod entry;
pub mod eviction;
pub mod fence;
pub mod hot;
pub mod inspect;
pub mod keyspace;
pub mod lease;
pub mod near;
pub mod redis_tier;
pub mod refresh;
pub mod slots;
pub mod tier;
pub mod tiered;
pub mod warm;

pub use connection::RedisConnection;
pub use entry::{CachedDocument, Entry};
pub use fence::{Fence, Spread};
pub use hot::{HotConfig, HotRecord, HotRecorder};
pub use inspect::{StoredEntry, StoredKind};
pub use keyspace::{ControlKeys, TtlPolicy};
pub use near::{NearCache, NearCacheConfig};
pub use redis_tier::{
    ConnectError, FencedWriteError, FencedWriter, Offer, RedisConfig, RedisHealth, RedisTier,
    RedisTls, TierError,
};
pub use tier::CacheTier;
pub use tiered::{Lookup, ReadPolicy, Source, TieredStore, WriteOutcome};
pub use warm::{WarmConfig, Warmer};
