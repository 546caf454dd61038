use feature_cache::{Entry, NearCache};
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
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Insert => "insert",
            Self::Update => "update",
            Self::Replace => "replace",
            Self::Delete => "delete",
            Self::Flush => "flush",
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
/// replica fences its near cache at it, so older content can never come back.
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
    /// The stream entry id; filled in on publication (the pub/sub copy carries
    /// it so a replica knows where to resume in the stream).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
}

impl Invalidation {
    /// Applies the change to a near cache: a delete leaves a tombstone, any
    /// other change a fence at the new version (evicting older content while
    /// letting the new document in), a flush empties it.
    pub fn apply_to(&self, near: &NearCache) {
        let Some(customer_id) = &self.customer_id else {
            near.flush();
            return;
        };
        let marker = match self.op {
            Op::Flush => {
                near.flush();
                return;
            }
            Op::Delete => Entry::Tombstone {
                customer_id: customer_id.clone(),
                version: self.version,
            },
            Op::Insert | Op::Update | Op::Replace => Entry::Fence {
                customer_id: customer_id.clone(),
                version: self.version,
            },
        };
        near.offer(marker);
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
}
