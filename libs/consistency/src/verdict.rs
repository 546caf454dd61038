//! The comparison rules: what a cache tier holds for a key against what
//! MongoDB holds.
//!
//! A tier is consistent for a key when a reader can only be served
//! MongoDB's answer from it: it holds nothing, a version floor (never
//! served), a value it would not serve (a reservation, an expired
//! document), exactly MongoDB's document — the same version *and* the same
//! content — or a "not found" (a cached absence, or a tombstone: with
//! negative caching on, both are served as 404) while MongoDB has none. A
//! tombstone of a document MongoDB has again is a stale 404 waiting to be
//! served, so it is judged like a cached absence. A document with MongoDB's version but other
//! content is inconsistent: versions alone would miss a value planted or
//! corrupted without a new version.

use chrono::{DateTime, Utc};
use feature_cache::Entry;
use feature_store::FeatureDocument;
use serde_json::Value;

/// What a cache tier holds for one key.
#[derive(Debug, Clone, PartialEq)]
pub enum Observed {
    /// Nothing a reader would serve: no value, a reservation, a value we did
    /// not write. A reader then reads MongoDB.
    Absent,
    /// A version floor: never served.
    Marker { version: i64 },
    /// A cached "not found" or a tombstone (with negative caching on, both
    /// are served as a 404).
    NotFound { version: i64 },
    /// A document, as served (its JSON).
    Document { version: i64, body: Value },
}

impl Observed {
    /// What a tier's [`Entry`] means here.
    pub fn of_entry(entry: Option<&Entry>) -> Self {
        match entry {
            None => Self::Absent,
            Some(Entry::Floor { version, .. }) => Self::Marker { version: *version },
            Some(Entry::Absent { version, .. } | Entry::Tombstone { version, .. }) => {
                Self::NotFound { version: *version }
            }
            // Rendered by us from a document: it parses. Should it not, the
            // content differs from any truth, which is what it is.
            Some(Entry::Document(doc)) => Self::Document {
                version: doc.version(),
                body: serde_json::from_slice(doc.json_bytes()).unwrap_or(Value::Null),
            },
        }
    }

    /// The version held, if any.
    pub fn version(&self) -> Option<i64> {
        match self {
            Self::Absent => None,
            Self::Marker { version }
            | Self::NotFound { version }
            | Self::Document { version, .. } => Some(*version),
        }
    }

    /// A short name for logs and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Absent => "absent",
            Self::Marker { .. } => "marker",
            Self::NotFound { .. } => "not_found",
            Self::Document { .. } => "document",
        }
    }
}

/// MongoDB's current document of a key, as a tier would hold it.
#[derive(Debug, Clone, PartialEq)]
pub struct Truth {
    pub version: i64,
    pub body: Value,
}

impl Truth {
    pub fn of(doc: &FeatureDocument) -> Self {
        Self {
            version: doc.version,
            // A document of ours always serializes (strings, numbers, JSON).
            body: serde_json::to_value(doc).unwrap_or(Value::Null),
        }
    }
}

/// How a cached document differs from MongoDB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mismatch {
    /// An older version than MongoDB's.
    Stale,
    /// A newer version than MongoDB's (a restore lowered it, or a forgery).
    Ahead,
    /// MongoDB's version, other content.
    Content,
    /// A document MongoDB does not have (deleted or expired there).
    Orphan,
    /// A cached "not found" of a document MongoDB has (a stale 404).
    Negative,
}

impl Mismatch {
    pub const ALL: [Mismatch; 5] = [
        Self::Stale,
        Self::Ahead,
        Self::Content,
        Self::Orphan,
        Self::Negative,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stale => "stale",
            Self::Ahead => "ahead",
            Self::Content => "content",
            Self::Orphan => "orphan",
            Self::Negative => "negative",
        }
    }
}

/// One tier's verdict on one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Consistent,
    Inconsistent(Mismatch),
}

impl Verdict {
    pub fn is_consistent(self) -> bool {
        self == Self::Consistent
    }
}

/// Judges what a tier holds against MongoDB's document (`None`: MongoDB has
/// none, or only an expired one). `now` decides whether a cached document
/// has expired (an expired document is never served).
pub fn judge(observed: &Observed, truth: Option<&Truth>, now: DateTime<Utc>) -> Verdict {
    let (version, body) = match observed {
        Observed::Document { version, body } => (version, body),
        Observed::NotFound { .. } if truth.is_some() => {
            return Verdict::Inconsistent(Mismatch::Negative);
        }
        Observed::Absent | Observed::Marker { .. } | Observed::NotFound { .. } => {
            return Verdict::Consistent;
        }
    };
    if expired(body, now) {
        return Verdict::Consistent;
    }
    let Some(truth) = truth else {
        return Verdict::Inconsistent(Mismatch::Orphan);
    };
    match version.cmp(&truth.version) {
        std::cmp::Ordering::Less => Verdict::Inconsistent(Mismatch::Stale),
        std::cmp::Ordering::Greater => Verdict::Inconsistent(Mismatch::Ahead),
        std::cmp::Ordering::Equal if *body != truth.body => {
            Verdict::Inconsistent(Mismatch::Content)
        }
        std::cmp::Ordering::Equal => Verdict::Consistent,
    }
}

/// Whether a served document's `expires_at` has passed.
fn expired(body: &Value, now: DateTime<Utc>) -> bool {
    body.get("expires_at")
        .and_then(Value::as_str)
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
        .is_some_and(|at| at.with_timezone(&Utc) <= now)
}

/// What MongoDB held right after an audited change: a check finds
/// "changed since" when MongoDB has moved past it by the time it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The change left a document at this version.
    Version(i64),
    /// The change left no (unexpired) document.
    Absent,
}

impl Expect {
    /// Whether MongoDB now holds something else than the change left.
    pub fn moved(self, truth: Option<&Truth>) -> bool {
        match (self, truth) {
            (Self::Version(expected), Some(truth)) => truth.version != expected,
            (Self::Absent, None) => false,
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(version: i64, score: i64, expires_at: &str) -> Value {
        json!({
            "version": version, "customer_id": "C1", "features": {"score": score},
            "calculated_at": "2026-01-01T00:00:00.000Z", "model_version": "v1.0.0",
            "expires_at": expires_at,
        })
    }

    const LATER: &str = "2999-01-01T00:00:00.000Z";

    fn doc(version: i64, score: i64) -> Observed {
        Observed::Document {
            version,
            body: body(version, score, LATER),
        }
    }

    fn truth(version: i64, score: i64) -> Truth {
        Truth {
            version,
            body: body(version, score, LATER),
        }
    }

    #[test]
    fn the_same_version_with_the_same_content_is_consistent() {
        assert_eq!(
            judge(&doc(5, 1), Some(&truth(5, 1)), Utc::now()),
            Verdict::Consistent
        );
    }

    #[test]
    fn the_same_version_with_other_content_is_inconsistent() {
        assert_eq!(
            judge(&doc(5, 2), Some(&truth(5, 1)), Utc::now()),
            Verdict::Inconsistent(Mismatch::Content)
        );
    }

    #[test]
    fn older_newer_and_orphaned_documents_are_inconsistent() {
        let now = Utc::now();
        assert_eq!(
            judge(&doc(4, 1), Some(&truth(5, 1)), now),
            Verdict::Inconsistent(Mismatch::Stale)
        );
        assert_eq!(
            judge(&doc(6, 1), Some(&truth(5, 1)), now),
            Verdict::Inconsistent(Mismatch::Ahead)
        );
        assert_eq!(
            judge(&doc(5, 1), None, now),
            Verdict::Inconsistent(Mismatch::Orphan)
        );
    }

    #[test]
    fn absence_markers_and_expired_documents_are_consistent() {
        let now = Utc::now();
        for truth in [Some(truth(5, 1)), None] {
            for observed in [
                Observed::Absent,
                Observed::Marker { version: 3 },
                Observed::Marker { version: 9 },
                Observed::Document {
                    version: 2,
                    body: body(2, 7, "2000-01-01T00:00:00.000Z"),
                },
            ] {
                assert_eq!(
                    judge(&observed, truth.as_ref(), now),
                    Verdict::Consistent,
                    "{observed:?} against {truth:?}"
                );
            }
        }
    }

    #[test]
    fn a_cached_not_found_is_consistent_only_while_mongodb_has_no_document() {
        let not_found = Observed::NotFound { version: 4 };
        assert_eq!(judge(&not_found, None, Utc::now()), Verdict::Consistent);
        assert_eq!(
            judge(&not_found, Some(&truth(5, 1)), Utc::now()),
            Verdict::Inconsistent(Mismatch::Negative)
        );
        assert_eq!(
            Observed::of_entry(Some(&Entry::Absent {
                customer_id: "C1".into(),
                version: 4
            })),
            not_found
        );
    }

    #[test]
    fn tier_entries_and_store_documents_compare_as_served() {
        let stored: FeatureDocument = serde_json::from_value(body(5, 1, LATER)).unwrap();
        let entry = Entry::Document(feature_cache::CachedDocument::from_document(&stored));
        let observed = Observed::of_entry(Some(&entry));
        assert_eq!(
            judge(&observed, Some(&Truth::of(&stored)), Utc::now()),
            Verdict::Consistent
        );
        assert_eq!(
            Observed::of_entry(Some(&Entry::tombstone("C1", 5))),
            Observed::NotFound { version: 5 }
        );
        assert_eq!(
            Observed::of_entry(Some(&Entry::floor("C1", 5))),
            Observed::Marker { version: 5 }
        );
        assert_eq!(Observed::of_entry(None), Observed::Absent);
    }

    #[test]
    fn a_change_is_moved_past_when_mongodb_holds_another_version_or_presence() {
        assert!(!Expect::Version(5).moved(Some(&truth(5, 1))));
        assert!(Expect::Version(5).moved(Some(&truth(6, 1))));
        assert!(Expect::Version(5).moved(None));
        assert!(!Expect::Absent.moved(None));
        assert!(Expect::Absent.moved(Some(&truth(6, 1))));
    }
}
