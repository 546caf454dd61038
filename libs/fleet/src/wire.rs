//! The fleet's messages, as JSON: a replica's heartbeat, a near-cache query
//! and a replica's reply. This module owns both ends of each.

use feature_cache::Entry;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// One replica as its last heartbeat described it (the heartbeat JSON
/// itself, under `{base}:replica:{instance_id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub instance_id: String,
    /// The `cache-api` binary's version.
    pub binary_version: String,
    /// When the process started (RFC 3339).
    pub started_at: String,
    pub uptime_ms: u64,
    /// What the replica measured of itself at this beat.
    #[serde(flatten)]
    pub vitals: Vitals,
    /// When this heartbeat was published (unix ms).
    pub last_heartbeat_ms: u64,
}

/// What a replica measures of itself at each beat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Vitals {
    /// The last invalidation stream entry the replica applied.
    pub last_stream_id: Option<String>,
    /// How long after its announcement that entry was applied, in ms.
    pub lag_ms: Option<u64>,
    pub near_entries: u64,
    /// What the near-cache entries weigh (keys, rendered JSON, overhead).
    pub near_bytes: u64,
    /// Share of single reads the near cache served since start; `None`
    /// before the first read.
    pub hit_ratio: Option<f64>,
    /// Whether the invalidation subscription is live.
    pub subscribed: bool,
}

/// What one tier holds for a customer, as operators see it:
/// `{"kind": "document"|"tombstone"|"floor"|"absent", "version": v, "document": {…}}`
/// (`document` for documents only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntryView {
    pub kind: String,
    pub version: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub document: Option<serde_json::Value>,
}

impl From<&Entry> for EntryView {
    fn from(entry: &Entry) -> Self {
        let (kind, document) = match entry {
            // The rendered JSON was serialized from a document: it parses.
            Entry::Document(doc) => ("document", serde_json::from_slice(doc.json_bytes()).ok()),
            Entry::Tombstone { .. } => ("tombstone", None),
            Entry::Floor { .. } => ("floor", None),
            Entry::Absent { .. } => ("absent", None),
        };
        Self {
            kind: kind.to_owned(),
            version: entry.version(),
            document,
        }
    }
}

/// Most customer ids one query message carries; larger asks are split
/// into parts.
pub const QUERY_CHUNK: usize = 100;

/// A near-cache query, published on the admin channel. The reply channel is
/// derived from `request_id`, so a query cannot direct replies elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Query {
    pub request_id: String,
    /// Which part of the request this is (`0..parts`).
    pub part: u32,
    pub parts: u32,
    pub customer_ids: Vec<String>,
}

impl Query {
    /// Whether the request id is one [`crate::FleetClient`] makes (it names a
    /// channel: nothing else gets in).
    pub fn is_well_formed(&self) -> bool {
        (1..=64).contains(&self.request_id.len())
            && self
                .request_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && self.part < self.parts
            && self.customer_ids.len() <= QUERY_CHUNK
    }
}

/// A replica's reply to one part of a query: its entries for the ids of
/// that part it holds (ids it does not hold are left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub request_id: String,
    pub part: u32,
    pub instance_id: String,
    pub entries: HashMap<String, EntryView>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn document(version: i64) -> Entry {
        let json = json!({"version": version, "customer_id": "C1", "features": {"a": 1}});
        Entry::Document(feature_cache::CachedDocument::new(
            "C1",
            version,
            None,
            &json.to_string(),
        ))
    }

    #[test]
    fn entry_views_have_the_contract_shape() {
        assert_eq!(
            serde_json::to_value(EntryView::from(&document(7))).unwrap(),
            json!({"kind": "document", "version": 7,
                   "document": {"version": 7, "customer_id": "C1", "features": {"a": 1}}})
        );
        assert_eq!(
            serde_json::to_value(EntryView::from(&Entry::tombstone("C1", 8))).unwrap(),
            json!({"kind": "tombstone", "version": 8})
        );
        assert_eq!(
            serde_json::to_value(EntryView::from(&Entry::floor("C1", 9))).unwrap(),
            json!({"kind": "floor", "version": 9})
        );
    }

    #[test]
    fn queries_and_replies_round_trip() {
        let query = Query {
            request_id: "0a1b-2c".into(),
            part: 0,
            parts: 1,
            customer_ids: vec!["C1".into()],
        };
        let json = serde_json::to_value(&query).unwrap();
        assert_eq!(
            json,
            json!({"request_id": "0a1b-2c", "part": 0, "parts": 1, "customer_ids": ["C1"]})
        );
        assert_eq!(serde_json::from_value::<Query>(json).unwrap(), query);
        assert!(query.is_well_formed());

        let reply = Reply {
            request_id: "0a1b-2c".into(),
            part: 0,
            instance_id: "api-1".into(),
            entries: HashMap::from([("C1".to_owned(), EntryView::from(&Entry::floor("C1", 2)))]),
        };
        let json = serde_json::to_value(&reply).unwrap();
        assert_eq!(
            json,
            json!({"request_id": "0a1b-2c", "part": 0, "instance_id": "api-1",
                   "entries": {"C1": {"kind": "floor", "version": 2}}})
        );
        assert_eq!(serde_json::from_value::<Reply>(json).unwrap(), reply);
    }

    #[test]
    fn a_query_naming_another_channel_or_too_many_keys_is_refused() {
        let query = |request_id: &str, part, parts, n: usize| Query {
            request_id: request_id.into(),
            part,
            parts,
            customer_ids: vec!["C".into(); n],
        };
        assert!(!query("a:b", 0, 1, 1).is_well_formed());
        assert!(!query("a*", 0, 1, 1).is_well_formed());
        assert!(!query("", 0, 1, 1).is_well_formed());
        assert!(!query("a", 1, 1, 1).is_well_formed());
        assert!(!query("a", 0, 1, QUERY_CHUNK + 1).is_well_formed());
        assert!(query("a", 0, 1, QUERY_CHUNK).is_well_formed());
    }

    #[test]
    fn heartbeats_round_trip() {
        let status = ReplicaStatus {
            instance_id: "api-1".into(),
            binary_version: "0.1.0".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            uptime_ms: 5,
            vitals: Vitals {
                last_stream_id: Some("1-0".into()),
                lag_ms: Some(3),
                near_entries: 2,
                near_bytes: 400,
                hit_ratio: Some(0.5),
                subscribed: true,
            },
            last_heartbeat_ms: 1_700_000_000_000,
        };
        let json = serde_json::to_string(&status).unwrap();
        assert_eq!(
            serde_json::from_str::<ReplicaStatus>(&json).unwrap(),
            status
        );
    }
}
