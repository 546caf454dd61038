//! The Redis keyspace, in one place: where each customer's document lives,
//! where the system's own (control) keys live, and how long entries live.
//!
//! Document keys are `features:{customer_id}`, exactly as operators expect
//! them. Control keys (the invalidators' lease, fencing counter, saved
//! change-feed position and the invalidation stream) live under
//! `cache-invalidator:{db}.{collection}:`, a namespace no customer id can
//! reach: every document key starts with [`DOCUMENT_PREFIX`] and no control
//! key does.

use crate::entry::Entry;
use chrono::Utc;
use rand::Rng;
use std::time::Duration;

/// Key prefix of every cached customer; flushes delete `features:*` strings.
pub const DOCUMENT_PREFIX: &str = "features:";

/// The Redis key of a customer's entry.
pub fn document_key(customer_id: &str) -> String {
    format!("{DOCUMENT_PREFIX}{customer_id}")
}

/// Whether `key` lies in the document namespace (where a customer id could
/// make it collide with a document key).
pub fn is_document_key(key: &str) -> bool {
    key.starts_with(DOCUMENT_PREFIX)
}

/// The control keys of the invalidators of one collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlKeys {
    /// Who leads, and with which fencing token.
    pub lease: String,
    /// The counter fencing tokens are drawn from.
    pub fencing_counter: String,
    /// The change-feed position saved with each announcement.
    pub feed_position: String,
    /// The invalidation stream's default key: one stream per collection.
    pub stream: String,
    /// The hot-key record: customer id -> decayed read score ([`crate::hot`]).
    pub hot: String,
    /// The live replicas: a sorted set of instance id → last heartbeat (unix ms).
    pub replicas: String,
    /// Each replica's heartbeat JSON lives at this prefix + its instance id,
    /// expiring when the replica stops beating ([`ControlKeys::replica`]).
    pub replica_prefix: String,
    /// The stream of operator requests (evictions) for the leading invalidator.
    pub requests: String,
    /// The id of the last request the invalidator handled.
    pub requests_position: String,
}

impl ControlKeys {
    pub fn for_collection(database: &str, collection: &str) -> Self {
        Self::with_base(format!("cache-invalidator:{database}.{collection}"))
    }

    /// On a Redis Cluster: the same keys under the hash tag
    /// `{database.collection}`, so the lease and its fencing counter (one
    /// script) share a slot.
    pub fn for_collection_on_cluster(database: &str, collection: &str) -> Self {
        Self::with_base(format!("cache-invalidator:{{{database}.{collection}}}"))
    }

    fn with_base(base: String) -> Self {
        Self {
            lease: format!("{base}:leader"),
            fencing_counter: format!("{base}:fence"),
            feed_position: format!("{base}:resume-token"),
            stream: format!("{base}:changes"),
            hot: format!("{base}:hot"),
            replicas: format!("{base}:replicas"),
            replica_prefix: format!("{base}:replica:"),
            requests: format!("{base}:requests"),
            requests_position: format!("{base}:requests-position"),
        }
    }

    /// The heartbeat key of one replica.
    pub fn replica(&self, instance_id: &str) -> String {
        format!("{}{instance_id}", self.replica_prefix)
    }
}

/// How long an entry may live in Redis: a document no longer than the
/// document TTL nor past its own expiry, shortened by up to 5 % of jitter so
/// keys written together do not expire together; a tombstone or floor for
/// the marker TTL; a cached absence for the negative TTL (zero: absences are
/// not cached).
#[derive(Debug, Clone, Copy)]
pub struct TtlPolicy {
    pub document_ttl: Duration,
    pub marker_ttl: Duration,
    pub negative_ttl: Duration,
}

impl TtlPolicy {
    /// `None` for a document that has already expired, and for an absence
    /// when absences are not cached.
    pub fn ttl_of(&self, entry: &Entry) -> Option<Duration> {
        match entry {
            Entry::Document(doc) => {
                let mut ttl = self.document_ttl;
                if let Some(expires_at) = doc.expires_at() {
                    let left = (expires_at - Utc::now()).to_std().ok()?;
                    ttl = ttl.min(left);
                }
                let jitter_ms = u64::try_from(ttl.as_millis() / 20).unwrap_or(u64::MAX);
                let jitter = Duration::from_millis(rand::rng().random_range(0..=jitter_ms));
                let ttl = ttl.saturating_sub(jitter);
                (ttl >= Duration::from_millis(1)).then_some(ttl)
            }
            Entry::Tombstone { .. } | Entry::Floor { .. } => Some(self.marker_ttl),
            Entry::Absent { .. } => (!self.negative_ttl.is_zero()).then_some(self.negative_ttl),
        }
    }

    /// [`Self::ttl_of`] in whole milliseconds, as `SET … PX` takes it.
    pub fn ttl_ms_of(&self, entry: &Entry) -> Option<u64> {
        self.ttl_of(entry)
            .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_keys_stay_out_of_the_document_namespace() {
        let keys = ControlKeys::for_collection("db", "features");
        for key in [
            &keys.lease,
            &keys.fencing_counter,
            &keys.feed_position,
            &keys.stream,
            &keys.hot,
            &keys.replicas,
            &keys.replica("api-1"),
            &keys.requests,
            &keys.requests_position,
        ] {
            assert!(!is_document_key(key), "{key}");
        }
        assert!(is_document_key(&document_key("C1")));
        assert_eq!(document_key("C1"), "features:C1");
        assert_eq!(
            keys.replica("api-1"),
            "cache-invalidator:db.features:replica:api-1"
        );
        assert_eq!(
            keys.requests_position,
            "cache-invalidator:db.features:requests-position"
        );
    }

    #[test]
    fn documents_get_jittered_ttls_capped_by_their_expiry_and_markers_a_fixed_one() {
        let policy = TtlPolicy {
            document_ttl: Duration::from_secs(1000),
            marker_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
        };
        let floor = Entry::floor("C1", 1);
        assert_eq!(policy.ttl_of(&floor), Some(Duration::from_secs(60)));
        let absent = Entry::absent("C1", -1);
        assert_eq!(policy.ttl_of(&absent), Some(Duration::from_secs(5)));
        let off = TtlPolicy {
            negative_ttl: Duration::ZERO,
            ..policy
        };
        assert_eq!(off.ttl_of(&absent), None);
        let doc = crate::entry::tests::doc(1);
        let ttl = policy.ttl_of(&doc).unwrap();
        assert!(
            ttl <= Duration::from_secs(1000) && ttl >= Duration::from_secs(950),
            "{ttl:?}"
        );
    }
}
