//! Where one collection's fleet meets in Redis, and how often it speaks.

use feature_cache::ControlKeys;
use std::time::Duration;

/// The fleet's keys and channels (see `ControlKeys`) and timings.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Sorted set: instance id → last heartbeat (unix ms).
    pub replicas_key: String,
    /// Each replica's heartbeat JSON at this prefix + its instance id.
    pub replica_prefix: String,
    /// The operator requests stream.
    pub requests_key: String,
    /// The id of the last request the invalidator handled.
    pub requests_position_key: String,
    /// Where near-cache queries are published: `{INVALIDATION_CHANNEL}:admin`.
    pub query_channel: String,
    /// Replies go to this prefix + the query's request id.
    pub reply_prefix: String,
    /// How often a replica publishes its heartbeat; it expires after
    /// [`HEARTBEATS_TO_EXPIRY`] of these.
    pub heartbeat_interval: Duration,
    /// Longest the operator requests stream grows (approximately).
    pub requests_maxlen: u64,
}

/// Heartbeats a replica may miss before it counts as gone.
pub const HEARTBEATS_TO_EXPIRY: u32 = 3;

/// Requests kept in the stream: far more than are ever pending.
pub const REQUESTS_MAXLEN: u64 = 10_000;

impl FleetConfig {
    pub fn new(
        keys: &ControlKeys,
        invalidation_channel: &str,
        heartbeat_interval: Duration,
    ) -> Self {
        let query_channel = format!("{invalidation_channel}:admin");
        Self {
            replicas_key: keys.replicas.clone(),
            replica_prefix: keys.replica_prefix.clone(),
            requests_key: keys.requests.clone(),
            requests_position_key: keys.requests_position.clone(),
            reply_prefix: format!("{query_channel}:reply:"),
            query_channel,
            heartbeat_interval,
            requests_maxlen: REQUESTS_MAXLEN,
        }
    }

    pub fn replica_key(&self, instance_id: &str) -> String {
        format!("{}{instance_id}", self.replica_prefix)
    }

    pub fn reply_channel(&self, request_id: &str) -> String {
        format!("{}{request_id}", self.reply_prefix)
    }

    /// How long a heartbeat stays without being renewed.
    pub fn heartbeat_expiry(&self) -> Duration {
        self.heartbeat_interval * HEARTBEATS_TO_EXPIRY
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        let keys = ControlKeys::for_collection("db", "coll");
        let config = FleetConfig::new(&keys, "features:invalidations", Duration::from_secs(2));
        assert_eq!(config.replicas_key, "cache-invalidator:db.coll:replicas");
        assert_eq!(
            config.replica_key("api-1"),
            "cache-invalidator:db.coll:replica:api-1"
        );
        assert_eq!(config.requests_key, "cache-invalidator:db.coll:requests");
        assert_eq!(
            config.requests_position_key,
            "cache-invalidator:db.coll:requests-position"
        );
        assert_eq!(config.query_channel, "features:invalidations:admin");
        assert_eq!(
            config.reply_channel("r1"),
            "features:invalidations:admin:reply:r1"
        );
        assert_eq!(config.heartbeat_expiry(), Duration::from_secs(6));
    }
}
