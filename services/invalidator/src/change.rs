//! What one change event means for the caches: a pure function of the event
//! and the invalidation mode, so it is tested without a database.

use bson::Document;
use feature_cache::{CachedDocument, Entry};
use feature_store::mongo::{document_from_bson, traceparent_of};
use feature_store::version;
use invalidation::{ClusterTime, Op};
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType};
use settings::InvalidationMode;

/// The cache work for one event.
#[derive(Debug)]
pub enum Plan {
    /// Offer `entry` to Redis through the guard, then announce `op` at the
    /// entry's version. With `stamp`, the change came without a new version
    /// (another tool wrote it): afterwards give the document one, so its new
    /// content gets a version of its own (that write comes back as an event).
    Offer {
        entry: Entry,
        op: Op,
        traceparent: Option<String>,
        stamp: Option<i64>,
    },
    /// Drop every cached document and tell every replica to do the same.
    /// `restart`: the stream ended (invalidate) and must be reopened after
    /// this event.
    Flush { reason: &'static str, restart: bool },
    /// Nothing to do for the caches (another collection's event, or a
    /// document already gone again — its delete event follows).
    Skip,
}

/// Plans the cache work for `event`.
pub fn plan(event: &ChangeStreamEvent<Document>, mode: InvalidationMode) -> Plan {
    let op = match event.operation_type {
        OperationType::Insert => Op::Insert,
        OperationType::Update => Op::Update,
        OperationType::Replace => Op::Replace,
        OperationType::Delete => Op::Delete,
        OperationType::Drop => {
            return Plan::Flush {
                reason: "drop",
                restart: false,
            };
        }
        OperationType::Rename => {
            return Plan::Flush {
                reason: "rename",
                restart: false,
            };
        }
        OperationType::DropDatabase => {
            return Plan::Flush {
                reason: "drop_database",
                restart: false,
            };
        }
        OperationType::Invalidate => {
            return Plan::Flush {
                reason: "invalidate",
                restart: true,
            };
        }
        _ => return Plan::Skip,
    };
    let Some(customer_id) = event
        .document_key
        .as_ref()
        .and_then(|key| key.get_str("_id").ok())
        .map(str::to_owned)
    else {
        return Plan::Skip;
    };

    if op == Op::Delete {
        // The removed version is not in the event; a tombstone at the upper
        // bound of versions given before this change cannot be overtaken by
        // a late fill of the deleted document.
        let secs = event.cluster_time.map_or(0, |t| t.time);
        return Plan::Offer {
            entry: Entry::Tombstone {
                customer_id,
                version: version::upper_bound_at(secs),
            },
            op,
            traceparent: None,
            stamp: None,
        };
    }

    let Some(raw) = event.full_document.as_ref() else {
        return Plan::Skip;
    };
    let Ok(document) = document_from_bson(raw.clone()) else {
        return Plan::Skip;
    };
    let changed = |field: &str| {
        event
            .update_description
            .as_ref()
            .is_some_and(|d| d.updated_fields.contains_key(field))
    };
    // Writes through the API always advance `version`; replacements and
    // edits by other tools may not.
    let versioned = match op {
        Op::Insert => document.version > 0,
        Op::Update => changed("version"),
        _ => false,
    };
    let traceparent = match op {
        Op::Insert => traceparent_of(raw),
        Op::Update if changed("trace") => traceparent_of(raw),
        _ => None,
    }
    .map(str::to_owned);

    if !versioned {
        // Evict every cached copy of the version it had (its content changed
        // under the same version), then give it a version of its own.
        return Plan::Offer {
            entry: Entry::Fence {
                customer_id,
                version: document.version + 1,
            },
            op,
            traceparent,
            stamp: Some(document.version),
        };
    }
    let entry = if mode == InvalidationMode::Delete || document.is_expired(chrono::Utc::now()) {
        Entry::Fence {
            customer_id,
            version: document.version,
        }
    } else {
        Entry::Document(CachedDocument::from_document(&document))
    };
    Plan::Offer {
        entry,
        op,
        traceparent,
        stamp: None,
    }
}

pub fn cluster_time(event: &ChangeStreamEvent<Document>) -> ClusterTime {
    event
        .cluster_time
        .map_or(ClusterTime { t: 0, i: 0 }, |t| ClusterTime {
            t: t.time,
            i: t.increment,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn event(
        op: &str,
        full: Option<Document>,
        updated: Option<Document>,
    ) -> ChangeStreamEvent<Document> {
        let mut raw = doc! {
            "_id": { "_data": "00" },
            "operationType": op,
            "clusterTime": bson::Timestamp { time: 1_800_000_000, increment: 1 },
            "documentKey": { "_id": "C1" },
        };
        if let Some(full) = full {
            raw.insert("fullDocument", full);
        }
        if let Some(updated) = updated {
            raw.insert(
                "updateDescription",
                doc! { "updatedFields": updated, "removedFields": [] },
            );
        }
        bson::from_document(raw).unwrap()
    }

    fn stored(version: i64) -> Document {
        doc! {
            "_id": "C1", "customer_id": "C1", "features": { "a": 1 },
            "calculated_at": "2026-01-01T00:00:00.000Z", "model_version": "v1.0.0",
            "expires_at": bson::DateTime::from_millis(32_503_680_000_000), "version": version,
            "trace": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        }
    }

    #[test]
    fn api_update_refreshes_with_the_document_and_its_trace() {
        let e = event(
            "update",
            Some(stored(5)),
            Some(doc! { "version": 5_i64, "trace": "x" }),
        );
        let Plan::Offer {
            entry,
            op,
            traceparent,
            stamp,
        } = plan(&e, InvalidationMode::Refresh)
        else {
            panic!()
        };
        assert!(matches!(entry, Entry::Document(ref d) if d.version == 5));
        assert_eq!(op, Op::Update);
        assert!(traceparent.is_some());
        assert_eq!(stamp, None);
    }

    #[test]
    fn delete_mode_fences_at_the_new_version() {
        let e = event("update", Some(stored(5)), Some(doc! { "version": 5_i64 }));
        let Plan::Offer {
            entry, traceparent, ..
        } = plan(&e, InvalidationMode::Delete)
        else {
            panic!()
        };
        assert!(matches!(entry, Entry::Fence { version: 5, .. }));
        assert!(traceparent.is_none(), "the trace field did not change");
    }

    #[test]
    fn unversioned_edits_fence_past_the_old_version_and_ask_for_a_stamp() {
        let e = event("update", Some(stored(5)), Some(doc! { "features.a": 2 }));
        let Plan::Offer { entry, stamp, .. } = plan(&e, InvalidationMode::Refresh) else {
            panic!()
        };
        assert!(matches!(entry, Entry::Fence { version: 6, .. }));
        assert_eq!(stamp, Some(5));
        let e = event("replace", Some(stored(5)), None);
        assert!(matches!(
            plan(&e, InvalidationMode::Refresh),
            Plan::Offer { stamp: Some(5), .. }
        ));
        let mut bare = stored(0);
        bare.remove("version");
        let e = event("insert", Some(bare), None);
        assert!(matches!(
            plan(&e, InvalidationMode::Refresh),
            Plan::Offer { stamp: Some(0), .. }
        ));
    }

    #[test]
    fn deletes_leave_a_tombstone_above_every_earlier_version() {
        let e = event("delete", None, None);
        let Plan::Offer { entry, .. } = plan(&e, InvalidationMode::Refresh) else {
            panic!()
        };
        assert!(
            matches!(entry, Entry::Tombstone { version, .. } if version > 1_800_000_000_999 * 1000)
        );
    }

    #[test]
    fn collection_level_events_flush() {
        assert!(matches!(
            plan(&event("drop", None, None), InvalidationMode::Refresh),
            Plan::Flush { restart: false, .. }
        ));
        assert!(matches!(
            plan(&event("invalidate", None, None), InvalidationMode::Refresh),
            Plan::Flush { restart: true, .. }
        ));
    }

    #[test]
    fn a_vanished_document_is_skipped() {
        assert!(matches!(
            plan(
                &event("update", None, Some(doc! {"version": 1_i64})),
                InvalidationMode::Refresh
            ),
            Plan::Skip
        ));
    }
}
