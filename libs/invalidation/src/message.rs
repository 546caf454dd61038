use feature_cache::NearCache;
use serde::{Deserialize, Serialize};

/// What happened to a customer's document (or to the whole collection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Insert,
    Update,
    Replace,
    Delete,
    /// The collection was dropped, renamed or invalidated, or the change
    /// history was lost: every cached document is suspect.
    Flush,
    /// An operator asked to drop the customer's entry everywhere (not a
    /// change of the document): applied like an unordered change.
    Evict,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Replace => "replace",
            Self::Delete => "delete",
            Self::Flush => "flush",
            Self::Evict => "evict",
        }
    }
}

/// MongoDB cluster time of the change (seconds, increment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ClusterTime {
    pub t: u32,
    pub i: u32,
}

/// One change, as announced on `INVALIDATION_CHANNEL` and appended to
/// `INVALIDATION_STREAM`.
///
/// `version` is the lowest version a cache may still hold after this change:
/// the new document's version for writes, the tombstone's for deletes. A
/// replica puts a floor under its near cache entry at it, so older content
/// can never come back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invalidation {
    /// `None` for `flush`.
    pub customer_id: Option<String>,
    pub op: Op,
    pub version: i64,
    pub cluster_time: ClusterTime,
    /// Per invalidator run, starting at 1; a jump is a lost message.
    pub seq: u64,
    /// Identifies the invalidator run that numbered `seq`.
    pub run_id: String,
    /// W3C trace context of the write that caused the change, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Whether `version` orders this change: the document's own version,
    /// advanced by the change itself. Then a replica keeps a copy at that
    /// version or newer; otherwise (another tool's edit, a restore, a delete)
    /// it drops whatever it holds for the customer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ordered: bool,
    /// The stream entry id; filled in on publication (the pub/sub copy carries
    /// it so a replica knows where to resume in the stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
}

impl Invalidation {
    /// Applies the change to a near cache. An ordered change keeps a copy
    /// at its version or newer; otherwise (an eviction too) the customer's
    /// entry is dropped and every fill of it that began before is refused
    /// (whatever the versions: a restored or re-created document may carry
    /// a lower one). A flush empties the cache.
    pub fn apply_to(&self, near: &NearCache) {
        match (&self.customer_id, self.op) {
            (None, _) | (_, Op::Flush) => near.flush(),
            (Some(customer_id), Op::Insert | Op::Update | Op::Replace) if self.ordered => {
                near.settle(customer_id, self.version);
            }
            (Some(customer_id), _) => near.invalidate(customer_id),
        }
    }
}

/// Stands where the stream id goes until the announce script knows it.
const STREAM_ID_SLOT: &str = "\u{1}stream-id\u{1}";

impl Invalidation {
    /// The message as the stream keeps it: without `stream_id` (an entry's
    /// id is its own).
    pub(crate) fn stream_json(&self) -> String {
        let entry = Self {
            stream_id: None,
            ..self.clone()
        };
        serde_json::to_string(&entry).unwrap_or_default()
    }

    /// The pub/sub payload before and after its stream id, which only the
    /// announce script learns (from XADD). `stream_id` is the last field,
    /// so the slot is the last match.
    pub(crate) fn channel_payload_around_stream_id(&self) -> (String, String) {
        let with_slot = Self {
            stream_id: Some(STREAM_ID_SLOT.to_owned()),
            ..self.clone()
        };
        let json = serde_json::to_string(&with_slot).unwrap_or_default();
        let slot = serde_json::to_string(STREAM_ID_SLOT).unwrap_or_default();
        let slot = slot.trim_matches('"');
        match json.rsplit_once(slot) {
            Some((head, tail)) => (head.to_owned(), tail.to_owned()),
            None => (json, String::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape_is_stable() {
        let message = Invalidation {
            customer_id: Some("C1".into()),
            op: Op::Update,
            version: 42,
            cluster_time: ClusterTime {
                t: 1_800_000_000,
                i: 3,
            },
            seq: 7,
            run_id: "run".into(),
            traceparent: None,
            ordered: false,
            stream_id: None,
        };
        let json = serde_json::to_value(&message).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "customer_id": "C1", "op": "update", "version": 42,
                "cluster_time": {"t": 1_800_000_000u32, "i": 3}, "seq": 7, "run_id": "run"
            })
        );
        let back: Invalidation = serde_json::from_value(json).unwrap();
        assert_eq!(back, message);
    }

    #[test]
    fn an_eviction_drops_the_entry_and_refuses_fills_that_began_before() {
        let near = NearCache::new(&feature_cache::NearCacheConfig {
            max_entries: 10,
            max_bytes: 1 << 20,
            ttl: std::time::Duration::from_secs(60),
            negative_ttl: std::time::Duration::from_secs(5),
        });
        let entry = feature_cache::Entry::floor("C1", 3);
        assert!(near.offer(entry.clone()));
        let before = near.ticket("C1");
        let message = Invalidation {
            customer_id: Some("C1".into()),
            op: Op::Evict,
            version: 0,
            cluster_time: ClusterTime { t: 0, i: 0 },
            seq: 1,
            run_id: "run".into(),
            traceparent: None,
            ordered: false,
            stream_id: None,
        };
        let json = serde_json::to_value(&message).unwrap();
        assert_eq!(json["op"], "evict");
        let back: Invalidation = serde_json::from_value(json).unwrap();
        back.apply_to(&near);
        assert!(near.get("C1").is_none(), "dropped");
        assert!(
            !near.offer_with(entry.clone(), before),
            "a fill from before is refused"
        );
        assert!(near.offer(entry), "a fill from after is taken");
    }

    #[test]
    fn the_channel_payload_carries_the_stream_id_the_script_puts_in() {
        let message = Invalidation {
            customer_id: Some("C1".into()),
            op: Op::Delete,
            version: 9,
            cluster_time: ClusterTime { t: 1, i: 2 },
            seq: 3,
            run_id: "run".into(),
            traceparent: Some("has \u{1}stream-id\u{1} in it".into()),
            ordered: true,
            stream_id: None,
        };
        let (head, tail) = message.channel_payload_around_stream_id();
        let payload = format!("{head}1700000000000-5{tail}");
        let back: Invalidation = serde_json::from_str(&payload).unwrap();
        assert_eq!(back.stream_id.as_deref(), Some("1700000000000-5"));
        assert_eq!(back.traceparent, message.traceparent);
        let entry: Invalidation = serde_json::from_str(&message.stream_json()).unwrap();
        assert_eq!(entry, message);
    }
}
