use chrono::{DateTime, Utc};
use feature_store::FeatureDocument;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::cmp::Ordering;
use std::sync::Arc;

/// A document ready to serve: its JSON is rendered once, when it enters a
/// tier, and every hit after that copies bytes instead of serializing.
#[derive(Debug)]
pub struct CachedDocument {
    pub customer_id: String,
    pub version: i64,
    pub expires_at: Option<DateTime<Utc>>,
    /// The document as JSON, `version` first (see [`FeatureDocument`]).
    pub json: Box<RawValue>,
}

impl CachedDocument {
    pub fn from_document(doc: &FeatureDocument) -> Arc<Self> {
        // Serializing our own type into JSON cannot fail: every field is a
        // string, number or JSON value.
        let json = serde_json::value::to_raw_value(doc).unwrap_or_default();
        Arc::new(Self {
            customer_id: doc.customer_id.clone(),
            version: doc.version,
            expires_at: doc.expires_at,
            json,
        })
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// The response body: the document plus the tier that answered, appended
    /// to the rendered JSON without parsing it again.
    pub fn body_with_source(&self, source: &str) -> Vec<u8> {
        let json = self.json.get();
        let open = json.strip_suffix('}').unwrap_or(json);
        let mut body = Vec::with_capacity(json.len() + 32);
        body.extend_from_slice(open.as_bytes());
        if open.len() > 1 {
            body.push(b',');
        }
        body.extend_from_slice(b"\"source\":\"");
        body.extend_from_slice(source.as_bytes());
        body.extend_from_slice(b"\"}");
        body
    }
}

/// What a cache tier may hold for one customer.
///
/// Entries are totally ordered by `(version, rank)`, and a tier replaces what
/// it holds only with an entry that is strictly greater — the version guard.
/// At one version, a floor (or an absence) < the document < its tombstone,
/// so:
/// - a fill of an older document never overwrites a newer one;
/// - a tombstone at the deleted version beats a late fill of that version;
/// - a floor at version v evicts anything older while letting version v in;
/// - an absence at version v gives way to any document of version v or
///   newer (every create or change gives one).
#[derive(Debug, Clone)]
pub enum Entry {
    /// A version floor: versions below `version` are stale (an invalidation
    /// in delete mode, or a change the replica heard about but does not hold).
    Floor {
        customer_id: String,
        version: i64,
    },
    Document(Arc<CachedDocument>),
    /// The document was deleted at `version`; never served.
    Tombstone {
        customer_id: String,
        version: i64,
    },
    /// A read found no document while the key's order stood at `version`
    /// (the order its reservation kept; `-1`, below every version, when it
    /// held nothing): served as "not found" until any document replaces it.
    Absent {
        customer_id: String,
        version: i64,
    },
}

impl Entry {
    /// "`customer_id` was deleted at `version`".
    pub fn tombstone(customer_id: impl Into<String>, version: i64) -> Self {
        Self::Tombstone {
            customer_id: customer_id.into(),
            version,
        }
    }

    /// "versions of `customer_id` below `version` are stale".
    pub fn floor(customer_id: impl Into<String>, version: i64) -> Self {
        Self::Floor {
            customer_id: customer_id.into(),
            version,
        }
    }

    /// "no document of `customer_id` as of `version`" (see [`Entry::Absent`]).
    pub fn absent(customer_id: impl Into<String>, version: i64) -> Self {
        Self::Absent {
            customer_id: customer_id.into(),
            version,
        }
    }

    pub fn customer_id(&self) -> &str {
        match self {
            Self::Floor { customer_id, .. }
            | Self::Tombstone { customer_id, .. }
            | Self::Absent { customer_id, .. } => customer_id,
            Self::Document(doc) => &doc.customer_id,
        }
    }

    pub fn version(&self) -> i64 {
        match self {
            Self::Floor { version, .. }
            | Self::Tombstone { version, .. }
            | Self::Absent { version, .. } => *version,
            Self::Document(doc) => doc.version,
        }
    }

    /// Rank within one version; mirrored by the Lua guard in `redis_tier`.
    pub fn rank(&self) -> u8 {
        match self {
            Self::Floor { .. } | Self::Absent { .. } => 0,
            Self::Document(_) => 1,
            Self::Tombstone { .. } => 2,
        }
    }

    /// The version guard: may `self` replace `current`?
    pub fn supersedes(&self, current: &Entry) -> bool {
        let ours = (self.version(), self.rank());
        let theirs = (current.version(), current.rank());
        ours.cmp(&theirs) == Ordering::Greater
    }

    pub fn document(&self) -> Option<&Arc<CachedDocument>> {
        match self {
            Self::Document(doc) => Some(doc),
            _ => None,
        }
    }

    /// The value stored in Redis: the document JSON itself, or a small marker
    /// (a floor is stored as `"fence":true`, its name on the wire).
    pub fn to_redis_value(&self) -> String {
        match self {
            Self::Document(doc) => doc.json.get().to_owned(),
            Self::Tombstone { version, .. } => format!(r#"{{"version":{version},"deleted":true}}"#),
            Self::Floor { version, .. } => format!(r#"{{"version":{version},"fence":true}}"#),
            Self::Absent { version, .. } => format!(r#"{{"version":{version},"absent":true}}"#),
        }
    }

    /// Reads a value stored in Redis. `None` for anything we did not write.
    pub fn from_redis_value(customer_id: &str, raw: String) -> Option<Entry> {
        #[derive(Deserialize)]
        struct Head<'a> {
            version: i64,
            #[serde(default)]
            deleted: bool,
            #[serde(default)]
            fence: bool,
            #[serde(default)]
            absent: bool,
            // Borrowed: both are written by us and never contain escapes.
            customer_id: Option<&'a str>,
            expires_at: Option<&'a str>,
        }
        // The head is read without copying; the document itself moves into
        // the entry (`from_string` checks it once more, keeping its invariant).
        let (version, deleted, fence, absent, has_id, expires_at) = {
            let head: Head = serde_json::from_str(&raw).ok()?;
            let expires_at = match head.expires_at {
                Some(at) => Some(DateTime::parse_from_rfc3339(at).ok()?.with_timezone(&Utc)),
                None => None,
            };
            let has_id = head.customer_id.is_some();
            (
                head.version,
                head.deleted,
                head.fence,
                head.absent,
                has_id,
                expires_at,
            )
        };
        let customer_id = customer_id.to_owned();
        if deleted {
            return Some(Entry::tombstone(customer_id, version));
        }
        if fence {
            return Some(Entry::floor(customer_id, version));
        }
        if absent {
            return Some(Entry::absent(customer_id, version));
        }
        if !has_id {
            return None;
        }
        Some(Entry::Document(Arc::new(CachedDocument {
            customer_id,
            version,
            expires_at,
            json: RawValue::from_string(raw).ok()?,
        })))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn doc(version: i64) -> Entry {
        let doc: FeatureDocument = serde_json::from_value(json!({
            "version": version,
            "customer_id": "C1",
            "features": {"score": 1},
            "calculated_at": "2026-01-01T00:00:00.000Z",
            "model_version": "v1.0.0",
            "expires_at": "2999-01-01T00:00:00.000Z",
        }))
        .unwrap();
        Entry::Document(CachedDocument::from_document(&doc))
    }

    fn tombstone(version: i64) -> Entry {
        Entry::tombstone("C1", version)
    }

    fn floor(version: i64) -> Entry {
        Entry::floor("C1", version)
    }

    #[test]
    fn newer_versions_win_and_equal_ones_do_not() {
        assert!(doc(2).supersedes(&doc(1)));
        assert!(!doc(1).supersedes(&doc(2)));
        assert!(!doc(2).supersedes(&doc(2)));
    }

    #[test]
    fn tombstone_beats_late_fill_of_the_deleted_version_but_not_a_recreation() {
        assert!(tombstone(5).supersedes(&doc(5)));
        assert!(!doc(5).supersedes(&tombstone(5)));
        assert!(!doc(4).supersedes(&tombstone(5)));
        assert!(doc(6).supersedes(&tombstone(5)));
    }

    #[test]
    fn floor_evicts_older_and_admits_its_own_version() {
        assert!(floor(5).supersedes(&doc(4)));
        assert!(!floor(5).supersedes(&doc(5)));
        assert!(doc(5).supersedes(&floor(5)));
        assert!(!doc(4).supersedes(&floor(5)));
    }

    #[test]
    fn any_document_replaces_an_absence_and_no_absence_a_document() {
        let absent = |v| Entry::absent("C1", v);
        assert!(doc(0).supersedes(&absent(-1)));
        assert!(doc(5).supersedes(&absent(5)));
        assert!(!absent(5).supersedes(&doc(5)));
        assert!(!absent(4).supersedes(&tombstone(4)));
        assert!(tombstone(4).supersedes(&absent(4)));
    }

    #[test]
    fn redis_values_round_trip() {
        for entry in [doc(3), tombstone(4), floor(5), Entry::absent("C1", -1)] {
            let raw = entry.to_redis_value();
            assert!(
                raw.starts_with(&format!(r#"{{"version":{},"#, entry.version())),
                "{raw}"
            );
            let back = Entry::from_redis_value("C1", raw).unwrap();
            assert_eq!(
                (back.version(), back.rank()),
                (entry.version(), entry.rank())
            );
        }
        assert!(Entry::from_redis_value("C1", "not json".into()).is_none());
        assert!(Entry::from_redis_value("C1", r#"{"foo":1}"#.into()).is_none());
    }

    #[test]
    fn body_gets_the_source_appended() {
        let Entry::Document(d) = doc(3) else {
            unreachable!()
        };
        let body: serde_json::Value = serde_json::from_slice(&d.body_with_source("redis")).unwrap();
        assert_eq!(body["source"], "redis");
        assert_eq!(body["version"], 3);
        assert_eq!(body["features"]["score"], 1);
    }
}
