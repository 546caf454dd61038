use chrono::{DateTime, Utc};
use feature_store::FeatureDocument;
use serde::Deserialize;
use std::cmp::Ordering;
use std::sync::Arc;

/// A document ready to serve: its JSON is rendered once, when it enters a
/// tier, and every hit after that copies bytes instead of serializing.
///
/// One shared allocation holds it all — the version, the expiry, the id and
/// the JSON — so a near-cache entry costs its JSON and a few words (the
/// memory target is 1.3× the JSON; two more allocations and their headers
/// cost a tenth of it). Clones share it.
#[derive(Clone)]
pub struct CachedDocument {
    /// `version` (i64), `expires_at` in µs since the epoch (i64, [`NEVER`]
    /// for none), the id's length (u16), all little-endian; the id; the
    /// JSON. Every byte of the header counts: with it, a typical 400-byte
    /// document fills a 448-byte block of the allocator, not a 512-byte one.
    bytes: Arc<[u8]>,
}

/// What the expiry reads as when a document has none.
const NEVER: i64 = i64::MIN;
const VERSION_AT: usize = 0;
const EXPIRES_AT: usize = 8;
const ID_LEN_AT: usize = 16;
const ID_AT: usize = 18;

impl CachedDocument {
    /// `json` is the document as JSON, `version` first (see
    /// [`FeatureDocument`]). Ids are at most 128 bytes ([`feature_store::CustomerId`]);
    /// one over 64 KiB (a foreign write) is cut, and then never matches.
    pub fn new(
        customer_id: &str,
        version: i64,
        expires_at: Option<DateTime<Utc>>,
        json: &str,
    ) -> Self {
        let id_len = u16::try_from(customer_id.len()).unwrap_or(u16::MAX);
        let id = customer_id
            .as_bytes()
            .get(..id_len as usize)
            .unwrap_or_default();
        let expires = expires_at.map_or(NEVER, |at| at.timestamp_micros());
        let mut bytes = Vec::with_capacity(ID_AT + id.len() + json.len());
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&expires.to_le_bytes());
        bytes.extend_from_slice(&id_len.to_le_bytes());
        bytes.extend_from_slice(id);
        bytes.extend_from_slice(json.as_bytes());
        Self {
            bytes: Arc::from(bytes),
        }
    }

    pub fn from_document(doc: &FeatureDocument) -> Self {
        // Serializing our own type into JSON cannot fail: every field is a
        // string, number or JSON value.
        let json = serde_json::to_string(doc).unwrap_or_default();
        Self::new(&doc.customer_id, doc.version, doc.expires_at, &json)
    }

    pub fn version(&self) -> i64 {
        i64::from_le_bytes(self.field(VERSION_AT))
    }

    pub fn expires_at(&self) -> Option<DateTime<Utc>> {
        match i64::from_le_bytes(self.field(EXPIRES_AT)) {
            NEVER => None,
            micros => DateTime::from_timestamp_micros(micros),
        }
    }

    pub fn customer_id(&self) -> &str {
        std::str::from_utf8(self.id_bytes()).unwrap_or_default()
    }

    /// Whether this is `customer_id`'s document (without decoding the id).
    pub fn is_of(&self, customer_id: &str) -> bool {
        self.id_bytes() == customer_id.as_bytes()
    }

    /// The document as JSON, `version` first.
    pub fn json(&self) -> &str {
        std::str::from_utf8(self.json_bytes()).unwrap_or_default()
    }

    pub fn json_bytes(&self) -> &[u8] {
        self.bytes.get(self.json_at()..).unwrap_or_default()
    }

    /// Whether both are the one copy (not merely equal).
    pub fn is_same_copy(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.bytes, &other.bytes)
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at().is_some_and(|at| at <= now)
    }

    /// The response body: the document plus the tier that answered, appended
    /// to the rendered JSON without parsing it again.
    pub fn body_with_source(&self, source: &str) -> Vec<u8> {
        const KEY: &[u8] = b"\"source\":\"";
        let json = self.json_bytes();
        let open = json.strip_suffix(b"}").unwrap_or(json);
        let comma = open.len() > 1;
        // Exactly as long as it will be: `Bytes` takes a full vector over
        // without allocating again.
        let len = open.len() + usize::from(comma) + KEY.len() + source.len() + 2;
        let mut body = Vec::with_capacity(len);
        body.extend_from_slice(open);
        if comma {
            body.push(b',');
        }
        body.extend_from_slice(KEY);
        body.extend_from_slice(source.as_bytes());
        body.extend_from_slice(b"\"}");
        debug_assert_eq!(body.len(), len);
        body
    }

    /// The header's `N` bytes at `at` (zeros past the end, which `new`
    /// never leaves).
    fn field<const N: usize>(&self, at: usize) -> [u8; N] {
        let mut field = [0; N];
        if let Some(bytes) = self.bytes.get(at..at + N) {
            field.copy_from_slice(bytes);
        }
        field
    }

    fn id_len(&self) -> usize {
        usize::from(u16::from_le_bytes(self.field(ID_LEN_AT)))
    }

    fn json_at(&self) -> usize {
        ID_AT + self.id_len()
    }

    fn id_bytes(&self) -> &[u8] {
        self.bytes.get(ID_AT..self.json_at()).unwrap_or_default()
    }
}

impl std::fmt::Debug for CachedDocument {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedDocument")
            .field("customer_id", &self.customer_id())
            .field("version", &self.version())
            .field("expires_at", &self.expires_at())
            .field("json_bytes", &self.json_bytes().len())
            .finish()
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
    Document(CachedDocument),
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
            Self::Document(doc) => doc.customer_id(),
        }
    }

    pub fn version(&self) -> i64 {
        match self {
            Self::Floor { version, .. }
            | Self::Tombstone { version, .. }
            | Self::Absent { version, .. } => *version,
            Self::Document(doc) => doc.version(),
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

    pub fn document(&self) -> Option<&CachedDocument> {
        match self {
            Self::Document(doc) => Some(doc),
            _ => None,
        }
    }

    /// The value stored in Redis: the document JSON itself, or a small marker
    /// (a floor is stored as `"fence":true`, its name on the wire).
    pub fn to_redis_value(&self) -> String {
        match self {
            Self::Document(doc) => doc.json().to_owned(),
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
        // The head is read without copying.
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
        // Reading the head above checked the whole value as JSON (fields it
        // skips are parsed too); all that may surround it is whitespace.
        Some(Entry::Document(CachedDocument::new(
            customer_id,
            version,
            expires_at,
            raw.trim(),
        )))
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
        // A value broken past its head is refused; whitespace around it goes.
        let broken = r#"{"version":3,"customer_id":"C1","features":{"a":}}"#;
        assert!(Entry::from_redis_value("C1", broken.into()).is_none());
        let spaced = " {\"version\":3,\"customer_id\":\"C1\",\"features\":{}}\n";
        let doc = Entry::from_redis_value("C1", spaced.into()).unwrap();
        assert_eq!(
            doc.document().map(|d| d.json()),
            Some(r#"{"version":3,"customer_id":"C1","features":{}}"#)
        );
        assert!(Entry::from_redis_value("C1", r#"{"foo":1}"#.into()).is_none());
    }

    /// Every field comes back from the one allocation as it went in.
    #[test]
    fn a_cached_document_keeps_its_fields() {
        let at = DateTime::parse_from_rfc3339("2999-01-01T00:00:00.123456Z")
            .unwrap()
            .with_timezone(&Utc);
        let doc = CachedDocument::new("C-1", -7, Some(at), r#"{"version":-7}"#);
        assert_eq!(doc.customer_id(), "C-1");
        assert!(doc.is_of("C-1") && !doc.is_of("C-2") && !doc.is_of("C-"));
        assert_eq!(doc.version(), -7);
        assert_eq!(doc.expires_at(), Some(at));
        assert_eq!(doc.json(), r#"{"version":-7}"#);
        assert!(!doc.is_expired(Utc::now()));
        let never = CachedDocument::new("", i64::MAX, None, "{}");
        assert_eq!((never.customer_id(), never.version()), ("", i64::MAX));
        assert_eq!((never.expires_at(), never.json()), (None, "{}"));
        assert!(doc.is_same_copy(&doc.clone()) && !doc.is_same_copy(&never));
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
        let empty = CachedDocument::new("C-2", 1, None, "{}").body_with_source("local");
        assert_eq!(empty, br#"{"source":"local"}"#);
        // Allocated to its length: no second allocation on the way out.
        assert_eq!(empty.capacity(), empty.len());
    }
}
