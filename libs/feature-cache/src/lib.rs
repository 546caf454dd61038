//! The cache tiers and the read path through them.
//!
//! - [`entry`]: what a tier holds for a customer — a document, a tombstone or a
//!   fence — and the one ordering rule between them (the version guard).
//! - [`tier`]: [`CacheTier`], the trait both tiers implement: look up, and offer
//!   an entry that is kept only if it supersedes what is there.
//! - [`near`]: the in-process near cache (moka), with the guard and an epoch that
//!   fences fills across a flush.
//! - [`redis_tier`]: Redis, with the guard as a Lua compare-and-set.
//! - [`coalesce`]: one load per key in flight, however many callers wait on it.
//! - [`tiered`]: [`TieredStore`], the tiered read path (near → Redis →
//!   MongoDB, warming upwards) and the write path (MongoDB first, then the tiers).

pub mod coalesce;
pub mod entry;
pub mod near;
pub mod redis_tier;
pub mod tier;
pub mod tiered;

pub use entry::{CachedDocument, Entry};
pub use near::NearCache;
pub use redis_tier::{Offer, RedisHealth, RedisTier, TierError};
pub use tier::CacheTier;
pub use tiered::{Lookup, ReadError, Source, TieredStore, WriteOutcome};
