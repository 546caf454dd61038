//! The domain model and its source of truth. The only crate that speaks
//! MongoDB: no other crate sees a BSON document or a driver type.
//!
//! - [`model`]: a customer's feature document, the id rules and the write request.
//! - [`version`]: how document versions are made so that ordering never goes backwards.
//! - [`codec`]: the stored document's schema — field names, reading a
//!   document (leniently) and the update that writes one; features are
//!   converted to BSON exactly or refused ([`codec::Unstorable`]).
//! - [`store`]: [`FeatureStore`], the collection behind everything: atomic
//!   versioned upserts, deletes that report the version they removed, reads
//!   that never return an expired document; configured by [`StoreConfig`].
//! - [`change_feed`]: the collection's changes as [`Change`]s, resumable from
//!   a saved [`FeedPosition`]; a lost history is a [`FeedError::HistoryLost`].
//! - [`error`]: [`StoreError`], every way a call can fail, its cause kept.
//! - `calls` (private): every call bounded by its deadline and a pool permit.
//! - `monitor` (private): the driver's events as Prometheus counters.

mod calls;
pub mod change_feed;
pub mod codec;
pub mod error;
pub mod model;
mod monitor;
pub mod store;
pub mod version;

pub use change_feed::{
    Change, ChangeFeed, ChangeFeeds, ChangeKind, ClusterTime, CollectionEvent, FeedContent,
    FeedError, FeedPosition, FeedStart, WriteOp,
};
pub use error::StoreError;
pub use model::{CustomerId, FeatureDocument, FeatureWrite, InvalidCustomerId};
pub use store::{FeatureStore, StoreConfig, UpsertOutcome};
