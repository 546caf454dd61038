//! Where the replicas' near caches plug into a check: anything that can ask
//! every live replica what it holds for some keys, within a deadline.
//! Replicas that do not answer in time are listed, never judged.

use crate::verdict::Observed;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::time::Duration;

/// Every live replica's near-cache entries for some keys.
#[derive(Debug, Clone, Default)]
pub struct NearSnapshot {
    /// Per replica (instance id): its entries for the keys it holds; a key
    /// it does not list it does not hold.
    pub answers: Vec<(String, HashMap<String, Observed>)>,
    /// Replicas known to be live that did not answer in time.
    pub silent: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("asking the replicas' near caches failed: {0}")]
pub struct NearError(pub String);

/// The near-cache tier of a deployment.
pub trait NearTier: Send + Sync {
    fn entries<'a>(
        &'a self,
        customer_ids: &'a [String],
        deadline: Duration,
    ) -> BoxFuture<'a, Result<NearSnapshot, NearError>>;
}
