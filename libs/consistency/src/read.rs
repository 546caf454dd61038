//! The reads of one batch of keys in every tier: the replicas' near caches
//! (when a [`NearTier`] is given), then Redis (one MGET; a GET for one key),
//! then MongoDB (one `$in` query).
//!
//! Caches are read before MongoDB on purpose: MongoDB's versions only grow,
//! so when MongoDB still holds what a check expects, it held it while the
//! caches were read, and a cache is never judged against a truth newer than
//! the one it could have seen. The other order would report every write
//! landing between the two reads as an inconsistency.

use crate::near::{NearError, NearSnapshot, NearTier};
use crate::verdict::{self, Observed, Truth, Verdict};
use chrono::{DateTime, Utc};
use feature_cache::{RedisTier, TierError};
use feature_store::{CustomerId, FeatureStore, StoreError};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CheckError {
    #[error("reading Redis failed")]
    Redis(#[from] TierError),
    #[error("reading MongoDB failed")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Near(#[from] NearError),
}

/// What every tier held for one key, and MongoDB's document.
#[derive(Debug, Clone)]
pub struct KeyState {
    pub customer_id: String,
    pub redis: Observed,
    /// Per replica that answered: what its near cache held.
    pub near: Vec<(String, Observed)>,
    /// MongoDB's current, unexpired document.
    pub truth: Option<Truth>,
}

impl KeyState {
    pub fn redis_verdict(&self, now: DateTime<Utc>) -> Verdict {
        verdict::judge(&self.redis, self.truth.as_ref(), now)
    }

    /// Each answering replica's verdict.
    pub fn near_verdicts(&self, now: DateTime<Utc>) -> Vec<(&str, &Observed, Verdict)> {
        self.near
            .iter()
            .map(|(instance, observed)| {
                (
                    instance.as_str(),
                    observed,
                    verdict::judge(observed, self.truth.as_ref(), now),
                )
            })
            .collect()
    }
}

/// Reads keys in every tier of a deployment.
#[derive(Clone)]
pub struct Checker {
    redis: RedisTier,
    store: FeatureStore,
    near: Option<Arc<dyn NearTier>>,
    near_deadline: Duration,
}

impl Checker {
    /// Redis and MongoDB only.
    pub fn new(redis: RedisTier, store: FeatureStore) -> Self {
        Self {
            redis,
            store,
            near: None,
            near_deadline: Duration::from_millis(500),
        }
    }

    /// Also every replica's near cache, each given `deadline` to answer.
    pub fn with_near(mut self, near: Arc<dyn NearTier>, deadline: Duration) -> Self {
        self.near = Some(near);
        self.near_deadline = deadline;
        self
    }

    pub fn checks_near(&self) -> bool {
        self.near.is_some()
    }

    /// Reads `ids` in every tier (near caches, Redis, MongoDB, in that
    /// order). Returns one state per id, in order, and the replicas that did
    /// not answer.
    #[tracing::instrument(name = "audit.read", skip_all, fields(count = ids.len()))]
    pub async fn read(
        &self,
        ids: &[CustomerId],
    ) -> Result<(Vec<KeyState>, Vec<String>), CheckError> {
        let names: Vec<String> = ids.iter().map(|id| id.as_str().to_owned()).collect();
        let near = match &self.near {
            Some(near) => near.entries(&names, self.near_deadline).await?,
            None => NearSnapshot::default(),
        };
        let keys: Vec<&str> = names.iter().map(String::as_str).collect();
        // One key (the continuous audit) is a GET: the invalidator's Redis
        // user may not MGET.
        let cached = match keys[..] {
            [key] => vec![self.redis.get(key).await?],
            _ => self.redis.get_many(&keys).await?,
        };
        let stored = self.store.get_many(ids).await?;
        let truths: HashMap<String, Truth> = stored
            .iter()
            .map(|doc| (doc.customer_id.clone(), Truth::of(doc)))
            .collect();
        let states = names
            .into_iter()
            .zip(cached)
            .map(|(customer_id, entry)| KeyState {
                redis: Observed::of_entry(entry.as_ref()),
                near: near
                    .answers
                    .iter()
                    .map(|(instance, entries)| {
                        (
                            instance.clone(),
                            entries
                                .get(&customer_id)
                                .cloned()
                                .unwrap_or(Observed::Absent),
                        )
                    })
                    .collect(),
                // `get`, not `remove`: an id may be asked for twice.
                truth: truths.get(&customer_id).cloned(),
                customer_id,
            })
            .collect();
        Ok((states, near.silent))
    }
}
