use crate::entry::Entry;
use std::future::Future;

pub use crate::redis_tier::TierError;

/// A cache tier: something that holds [`Entry`]s under the version guard.
///
/// Both the near cache and Redis implement it, so the guard's contract is
/// stated (and tested) once for both.
pub trait CacheTier {
    /// What the tier holds for the customer, if anything.
    fn lookup(
        &self,
        customer_id: &str,
    ) -> impl Future<Output = Result<Option<Entry>, TierError>> + Send;

    /// Stores `entry` only if it supersedes what the tier holds; returns
    /// whether it was stored.
    fn offer(&self, entry: Entry) -> impl Future<Output = Result<bool, TierError>> + Send;
}
