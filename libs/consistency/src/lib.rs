//! Whether the caches agree with MongoDB, measured: the rules and the reads
//! both the invalidator's continuous auditor and `cachectl audit --full`
//! use, so the two can never judge a key differently.
//!
//! - [`verdict`]: the comparison rules — what a tier holds ([`Observed`])
//!   against MongoDB's document ([`Truth`]): content, not only versions;
//!   absence and markers are consistent (absence is safe).
//! - [`read`]: [`Checker`], the reads of one batch of keys in every tier,
//!   caches before MongoDB (so a cache is never judged against a newer
//!   truth than the one it could have seen), one MGET and one `$in` query.
//! - [`near`]: [`NearTier`], where the replicas' near caches plug in, and
//!   [`FleetNear`], the fleet's fan-out.
//! - [`sample`]: [`Sampler`], which changes are audited.
//! - [`window`]: [`RatioWindow`], the consistency ratio over a sliding window.
//! - [`config`]: [`AuditConfig`], the auditor's settings.

pub mod config;
pub mod near;
pub mod read;
pub mod sample;
pub mod verdict;
pub mod window;

pub use config::AuditConfig;
pub use near::{FleetNear, NearError, NearSnapshot, NearTier};
pub use read::{CheckError, Checker, KeyState};
pub use sample::Sampler;
pub use verdict::{Expect, Mismatch, Observed, Truth, Verdict};
pub use window::RatioWindow;
