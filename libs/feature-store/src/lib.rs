//! The domain model and its source of truth.
//!
//! - [`model`]: a customer's feature document, the id rules and the write request.
//! - [`version`]: how document versions are made so that ordering never goes backwards.
//! - [`mongo`]: [`FeatureStore`], the MongoDB collection behind everything: atomic
//!   versioned upserts, deletes that report the version they removed, reads that
//!   never return an expired document.

pub mod model;
pub mod mongo;
pub mod version;

pub use model::{CustomerId, FeatureDocument, FeatureWrite, InvalidCustomerId};
pub use mongo::{FeatureStore, StoreError, UpsertOutcome};
