//! Where changes are announced: every message goes to a stream (the
//! record, kept to `stream_maxlen` entries) and to a pub/sub channel (the
//! fast path), carrying its stream id, and the change-feed position is
//! saved beside them.
//!
//! The announcements are split into partitions by the customer key's slot,
//! so that on a Redis Cluster their load spreads over the masters. Each
//! partition has its own stream, channel and saved position, sharing the
//! hash tag `{p<n>}`: one slot, so one script announces and saves
//! atomically. On a cluster the channels are sharded (`SPUBLISH`,
//! `SSUBSCRIBE`): a message travels only within its slot's shard. A single
//! Redis with one partition keeps the plain names.

use feature_cache::keyspace::document_key;
use feature_cache::slots::slot_of;

#[derive(Debug, Clone)]
pub struct Channels {
    /// The channel's name (partitions add their tag to it).
    pub channel: String,
    /// The stream's key (partitions add their tag to it).
    pub stream: String,
    pub stream_maxlen: u64,
    /// Where the change-feed position is saved (partitions add their tag).
    pub position: String,
    /// How many partitions (at least 1).
    pub partitions: u16,
    /// Redis Cluster: tagged names, sharded channels.
    pub cluster: bool,
}

/// The names of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub index: u16,
    pub channel: String,
    pub stream: String,
    pub position: String,
    /// `SPUBLISH`/`SSUBSCRIBE` instead of `PUBLISH`/`SUBSCRIBE`.
    pub sharded: bool,
}

impl Channels {
    fn count(&self) -> u16 {
        self.partitions.max(1)
    }

    /// Whether names carry a partition tag.
    fn tagged(&self) -> bool {
        self.cluster || self.count() > 1
    }

    /// Partition `index` (taken modulo the count).
    pub fn partition(&self, index: u16) -> Partition {
        let index = index % self.count();
        let name = |base: &str| {
            if self.tagged() {
                // The partition's tag must be the name's first: braces of
                // the base name (a cluster's control keys) are dropped.
                let base = base.replace(['{', '}'], "");
                format!("{base}:{{p{index}}}")
            } else {
                base.to_owned()
            }
        };
        Partition {
            index,
            channel: name(&self.channel),
            stream: name(&self.stream),
            position: name(&self.position),
            sharded: self.cluster,
        }
    }

    /// Every partition, in order.
    pub fn all(&self) -> Vec<Partition> {
        (0..self.count()).map(|p| self.partition(p)).collect()
    }

    /// The partition announcing changes of `customer_id`: its key's slot
    /// modulo the partition count (so a partition is a set of slots).
    pub fn partition_of(&self, customer_id: &str) -> Partition {
        self.partition(slot_of(&document_key(customer_id)) % self.count())
    }
}

/// The field under which each stream entry holds its message JSON.
pub(crate) const STREAM_FIELD: &str = "message";

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(partitions: u16, cluster: bool) -> Channels {
        Channels {
            channel: "features:invalidations".into(),
            stream: "cache-invalidator:db.c:changes".into(),
            stream_maxlen: 10,
            position: "cache-invalidator:{db.c}:resume-token".into(),
            partitions,
            cluster,
        }
    }

    #[test]
    fn one_partition_on_a_single_redis_keeps_the_plain_names() {
        let p = channels(1, false).partition_of("C1");
        assert_eq!(p.channel, "features:invalidations");
        assert_eq!(p.stream, "cache-invalidator:db.c:changes");
        assert_eq!(p.position, "cache-invalidator:{db.c}:resume-token");
        assert!(!p.sharded);
    }

    #[test]
    fn a_partitions_names_share_one_slot_and_partitions_spread() {
        let all = channels(4, true).all();
        assert_eq!(all.len(), 4);
        for p in &all {
            assert_eq!(slot_of(&p.stream), slot_of(&p.position));
            assert_eq!(slot_of(&p.stream), slot_of(&p.channel));
            assert!(p.sharded);
        }
        assert_eq!(all[3].channel, "features:invalidations:{p3}");
        assert_eq!(all[3].position, "cache-invalidator:db.c:resume-token:{p3}");
        let slots: std::collections::HashSet<u16> =
            all.iter().map(|p| slot_of(&p.stream)).collect();
        assert_eq!(slots.len(), 4);
        let mine = channels(4, true);
        let spread: std::collections::HashSet<u16> = (0..200)
            .map(|i| mine.partition_of(&format!("C{i}")).index)
            .collect();
        assert_eq!(spread.len(), 4);
    }
}
