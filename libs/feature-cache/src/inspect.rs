//! What Redis holds for one customer, as an operator sees it: not only the
//! entries a reader may serve ([`Entry`](crate::Entry)) but every kind of
//! value this crate writes there — a fill's reservation too — with the
//! key's remaining time to live. Read here because this crate writes those
//! values (`entry.rs`, `lua/`), so their shapes have one owner.

use crate::keyspace::document_key;
use crate::redis_tier::{RedisTier, TierError};
use serde::Deserialize;
use std::time::Duration;

/// The kind of value under a document key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredKind {
    Document,
    Tombstone,
    /// A version floor (`"fence":true` on the wire).
    Floor,
    /// A cached "not found" (negative caching).
    Absent,
    /// A fill's reservation (`lua/reserve.lua`): holds no document.
    Reservation,
    /// Something this system did not write.
    Unknown,
}

impl StoredKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Document => "document",
            Self::Tombstone => "tombstone",
            Self::Floor => "floor",
            Self::Absent => "absent",
            Self::Reservation => "reservation",
            Self::Unknown => "unknown",
        }
    }
}

/// One document key's value and remaining lifetime.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    pub kind: StoredKind,
    /// `None` for a value without a readable version.
    pub version: Option<i64>,
    /// `None` when the key has no expiry.
    pub ttl: Option<Duration>,
    /// The value as stored (the document's JSON for a document).
    pub raw: String,
}

impl StoredEntry {
    /// Classifies a stored value.
    pub fn classify(raw: String, ttl: Option<Duration>) -> Self {
        #[derive(Deserialize)]
        struct Head {
            version: Option<i64>,
            #[serde(default)]
            deleted: bool,
            #[serde(default)]
            fence: bool,
            #[serde(default)]
            absent: bool,
            reserved: Option<serde::de::IgnoredAny>,
            customer_id: Option<serde::de::IgnoredAny>,
        }
        let (kind, version) = match serde_json::from_str::<Head>(&raw) {
            Ok(head) => {
                let kind = if head.reserved.is_some() {
                    StoredKind::Reservation
                } else if head.deleted {
                    StoredKind::Tombstone
                } else if head.fence {
                    StoredKind::Floor
                } else if head.absent {
                    StoredKind::Absent
                } else if head.customer_id.is_some() && head.version.is_some() {
                    StoredKind::Document
                } else {
                    StoredKind::Unknown
                };
                (kind, head.version)
            }
            Err(_) => (StoredKind::Unknown, None),
        };
        Self {
            kind,
            version,
            ttl,
            raw,
        }
    }
}

impl RedisTier {
    /// The customer's key as stored, with its `PTTL`; `None` when absent.
    #[tracing::instrument(skip(self), fields(db.system = "redis", db.operation = "GET+PTTL"))]
    pub async fn inspect(&self, customer_id: &str) -> Result<Option<StoredEntry>, TierError> {
        let key = document_key(customer_id);
        let (raw, pttl): (Option<String>, i64) = redis::pipe()
            .cmd("GET")
            .arg(&key)
            .cmd("PTTL")
            .arg(&key)
            .query_async(&mut self.connection())
            .await?;
        // PTTL: -1 no expiry, -2 no key (gone between the two commands).
        let ttl = u64::try_from(pttl).ok().map(Duration::from_millis);
        Ok(raw.map(|raw| StoredEntry::classify(raw, ttl)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::Entry;

    #[test]
    fn every_value_this_crate_writes_is_classified() {
        let cases = [
            (crate::entry::tests::doc(3), StoredKind::Document, 3),
            (Entry::tombstone("C1", 4), StoredKind::Tombstone, 4),
            (Entry::floor("C1", 5), StoredKind::Floor, 5),
            (Entry::absent("C1", 6), StoredKind::Absent, 6),
        ];
        for (entry, kind, version) in cases {
            let stored = StoredEntry::classify(entry.to_redis_value(), None);
            assert_eq!((stored.kind, stored.version), (kind, Some(version)));
        }
        // lua/reserve.lua's shape.
        let reserved = r#"{"version":-1,"rank":0,"reserved":"abc"}"#;
        let stored = StoredEntry::classify(reserved.into(), Some(Duration::from_millis(9)));
        assert_eq!(stored.kind, StoredKind::Reservation);
        assert_eq!(stored.ttl, Some(Duration::from_millis(9)));
        assert_eq!(
            StoredEntry::classify("nope".into(), None).kind,
            StoredKind::Unknown
        );
    }
}
