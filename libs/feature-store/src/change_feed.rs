//! The collection's change feed as domain events: [`FeatureStore::watch`]
//! opens it now or after a saved [`FeedPosition`]; [`ChangeFeed::next`]
//! yields [`Change`]s. What the driver's change events and resume tokens
//! look like stays in this module.

use crate::codec::{self, field};
use crate::error::{StoreError, server_code};
use crate::model::FeatureDocument;
use crate::store::FeatureStore;
use crate::version;
use bson::{Bson, Document};
use chrono::{DateTime, Utc};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::{ChangeStreamEvent, OperationType, ResumeToken};
use mongodb::options::FullDocumentType;
use std::time::Duration;
use thiserror::Error;

/// Server error codes that mean the feed cannot resume where it was:
/// ChangeStreamHistoryLost, ChangeStreamFatalError, InvalidResumeToken.
const HISTORY_LOST_CODES: [i32; 3] = [286, 280, 260];

/// A place in the change feed, as text that can be saved anywhere and
/// handed back to [`FeatureStore::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedPosition(String);

impl FeedPosition {
    /// A saved position, if it is one this store can resume from.
    pub fn parse(saved: &str) -> Option<Self> {
        let position = Self(saved.to_owned());
        position.token().map(|_| position)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Resume tokens are kept as relaxed extended JSON.
    fn of(token: &ResumeToken) -> Option<Self> {
        bson::to_bson(token)
            .ok()
            .map(|b| Self(b.into_relaxed_extjson().to_string()))
    }

    fn token(&self) -> Option<ResumeToken> {
        let json: serde_json::Value = serde_json::from_str(&self.0).ok()?;
        bson::from_bson(Bson::try_from(json).ok()?).ok()
    }
}

/// Where a feed starts.
#[derive(Debug, Clone)]
pub enum FeedStart {
    /// With the next change made from now on.
    Now,
    /// With the change after this position (also after a feed-ending event).
    After(FeedPosition),
}

/// MongoDB's cluster time of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClusterTime {
    pub seconds: u32,
    pub increment: u32,
}

/// One change of the collection.
#[derive(Debug, Clone)]
pub struct Change {
    /// Resuming after this position yields the changes that follow this one.
    pub position: FeedPosition,
    pub kind: ChangeKind,
    pub cluster_time: Option<ClusterTime>,
    /// When the server applied it (for lag measurements).
    pub wall_time: Option<DateTime<Utc>>,
}

/// What a change did.
#[derive(Debug, Clone)]
pub enum ChangeKind {
    /// A document was inserted, updated or replaced.
    Written {
        op: WriteOp,
        customer_id: String,
        /// The document as it is now; `None` when it is gone again (its
        /// delete follows in the feed).
        document: Option<FeatureDocument>,
        /// Whether this change advanced `version` itself, as every write
        /// through the store does; other tools' writes may not.
        version_advanced: bool,
        /// The trace context this change stored with the document.
        traceparent: Option<String>,
    },
    /// A document was written, but what it holds now does not fit the schema.
    Unreadable { customer_id: String, reason: String },
    /// A document was deleted. `version_bound` is at least as large as any
    /// version the document could have had (the removed version is not in
    /// the event).
    Deleted {
        customer_id: String,
        version_bound: i64,
    },
    /// The whole collection changed under every document.
    CollectionGone(CollectionEvent),
    /// Nothing a cache holds (another collection, an index, a non-string id).
    Other,
}

/// A change to the collection as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectionEvent {
    Dropped,
    Renamed,
    DatabaseDropped,
    /// The feed ended; it must be reopened after this change.
    Invalidated,
}

impl CollectionEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dropped => "drop",
            Self::Renamed => "rename",
            Self::DatabaseDropped => "drop_database",
            Self::Invalidated => "invalidate",
        }
    }

    /// Whether the feed ended with this change and must be reopened after it.
    pub fn ends_feed(self) -> bool {
        self == Self::Invalidated
    }
}

/// The kind of write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOp {
    Insert,
    Update,
    Replace,
}

#[derive(Debug, Error)]
pub enum FeedError {
    /// The feed cannot resume where it was: the history since that position
    /// is gone (or the position is not valid here).
    #[error("the change history no longer reaches the saved position")]
    HistoryLost(#[source] mongodb::error::Error),
    #[error("the change feed failed")]
    Store(#[from] StoreError),
}

impl FeedError {
    fn from_driver(err: mongodb::error::Error) -> Self {
        if server_code(&err).is_some_and(|code| HISTORY_LOST_CODES.contains(&code)) {
            Self::HistoryLost(err)
        } else {
            Self::Store(StoreError::from_driver(err))
        }
    }
}

/// An open change feed.
pub struct ChangeFeed {
    stream: ChangeStream<ChangeStreamEvent<Document>>,
}

impl FeatureStore {
    /// Opens the collection's change feed with the full current document of
    /// every write; one [`ChangeFeed::next`] waits at most `poll` for changes.
    pub async fn watch(&self, start: FeedStart, poll: Duration) -> Result<ChangeFeed, FeedError> {
        let watch = self
            .collection
            .watch()
            .full_document(FullDocumentType::UpdateLookup)
            .max_await_time(poll);
        // `startAfter` resumes after normal and feed-ending events alike.
        let token = match &start {
            FeedStart::Now => None,
            FeedStart::After(position) => position.token(),
        };
        let stream = match token {
            Some(token) => watch.start_after(token).await,
            None => watch.await,
        }
        .map_err(FeedError::from_driver)?;
        Ok(ChangeFeed { stream })
    }
}

impl ChangeFeed {
    /// The next change, or `None` when none came within the poll time. At
    /// most one round trip; never cancel it half-way (the driver cannot
    /// tell where the feed stands after that).
    pub async fn next(&mut self) -> Result<Option<Change>, FeedError> {
        let event = self
            .stream
            .next_if_any()
            .await
            .map_err(FeedError::from_driver)?;
        Ok(event.map(|event| change_of(&event)))
    }

    /// Where the feed stands: after every change it returned, and after
    /// changes it skipped on the server (so an idle feed moves on too).
    pub fn position(&self) -> Option<FeedPosition> {
        self.stream
            .resume_token()
            .as_ref()
            .and_then(FeedPosition::of)
    }
}

fn change_of(event: &ChangeStreamEvent<Document>) -> Change {
    Change {
        position: FeedPosition::of(&event.id).unwrap_or(FeedPosition(String::new())),
        kind: kind_of(event),
        cluster_time: event.cluster_time.map(|t| ClusterTime {
            seconds: t.time,
            increment: t.increment,
        }),
        wall_time: event.wall_time.map(|t| t.to_chrono()),
    }
}

fn kind_of(event: &ChangeStreamEvent<Document>) -> ChangeKind {
    let op = match event.operation_type {
        OperationType::Insert => WriteOp::Insert,
        OperationType::Update => WriteOp::Update,
        OperationType::Replace => WriteOp::Replace,
        OperationType::Delete => {
            return match document_id(event) {
                Some(customer_id) => ChangeKind::Deleted {
                    customer_id,
                    version_bound: version::upper_bound_at(
                        event.cluster_time.map_or(0, |t| t.time),
                    ),
                },
                None => ChangeKind::Other,
            };
        }
        OperationType::Drop => return ChangeKind::CollectionGone(CollectionEvent::Dropped),
        OperationType::Rename => return ChangeKind::CollectionGone(CollectionEvent::Renamed),
        OperationType::DropDatabase => {
            return ChangeKind::CollectionGone(CollectionEvent::DatabaseDropped);
        }
        OperationType::Invalidate => {
            return ChangeKind::CollectionGone(CollectionEvent::Invalidated);
        }
        _ => return ChangeKind::Other,
    };
    let Some(customer_id) = document_id(event) else {
        return ChangeKind::Other;
    };
    let Some(raw) = event.full_document.as_ref() else {
        return ChangeKind::Written {
            op,
            customer_id,
            document: None,
            version_advanced: false,
            traceparent: None,
        };
    };
    let document = match codec::decode(raw) {
        Ok(document) => document,
        Err(err) => {
            return ChangeKind::Unreadable {
                customer_id,
                reason: err.to_string(),
            };
        }
    };
    let changed = |name: &str| {
        event
            .update_description
            .as_ref()
            .is_some_and(|d| d.updated_fields.contains_key(name))
    };
    // Writes through the store always advance `version`; replacements and
    // edits by other tools may not.
    let version_advanced = match op {
        WriteOp::Insert => document.version > 0,
        WriteOp::Update => changed(field::VERSION),
        WriteOp::Replace => false,
    };
    let traceparent = match op {
        WriteOp::Insert => codec::traceparent_of(raw),
        WriteOp::Update if changed(field::TRACE) => codec::traceparent_of(raw),
        _ => None,
    }
    .map(str::to_owned);
    ChangeKind::Written {
        op,
        customer_id,
        document: Some(document),
        version_advanced,
        traceparent,
    }
}

fn document_id(event: &ChangeStreamEvent<Document>) -> Option<String> {
    event
        .document_key
        .as_ref()
        .and_then(|key| key.get_str(field::ID).ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn event(op: &str, full: Option<Document>, updated: Option<Document>) -> ChangeKind {
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
        kind_of(&bson::from_document(raw).unwrap())
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
    fn a_store_update_advances_the_version_and_carries_its_trace() {
        let kind = event(
            "update",
            Some(stored(5)),
            Some(doc! { "version": 5_i64, "trace": "x" }),
        );
        let ChangeKind::Written {
            op,
            document: Some(document),
            version_advanced,
            traceparent,
            ..
        } = kind
        else {
            panic!("{kind:?}")
        };
        assert_eq!(
            (op, document.version, version_advanced),
            (WriteOp::Update, 5, true)
        );
        assert!(traceparent.is_some());
    }

    #[test]
    fn edits_without_a_new_version_are_told_apart() {
        let kind = event("update", Some(stored(5)), Some(doc! { "features.a": 2 }));
        assert!(matches!(
            kind,
            ChangeKind::Written {
                version_advanced: false,
                traceparent: None,
                ..
            }
        ));
        let kind = event("replace", Some(stored(5)), None);
        assert!(matches!(
            kind,
            ChangeKind::Written {
                version_advanced: false,
                ..
            }
        ));
        let mut bare = stored(0);
        bare.remove("version");
        assert!(matches!(
            event("insert", Some(bare), None),
            ChangeKind::Written {
                version_advanced: false,
                ..
            }
        ));
        assert!(matches!(
            event("insert", Some(stored(3)), None),
            ChangeKind::Written {
                version_advanced: true,
                traceparent: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn deletes_carry_a_bound_above_every_earlier_version() {
        let ChangeKind::Deleted { version_bound, .. } = event("delete", None, None) else {
            panic!()
        };
        assert!(version_bound > 1_800_000_000_999 * 1000);
    }

    #[test]
    fn collection_events_and_vanished_documents() {
        assert!(matches!(
            event("drop", None, None),
            ChangeKind::CollectionGone(CollectionEvent::Dropped)
        ));
        let ChangeKind::CollectionGone(gone) = event("invalidate", None, None) else {
            panic!()
        };
        assert!(gone.ends_feed());
        assert!(matches!(
            event("update", None, Some(doc! {"version": 1_i64})),
            ChangeKind::Written { document: None, .. }
        ));
        let mut broken = stored(1);
        broken.insert("_id", 5);
        broken.remove("customer_id");
        assert!(matches!(
            event("insert", Some(broken), None),
            ChangeKind::Unreadable { .. }
        ));
    }

    #[test]
    fn positions_round_trip_as_text() {
        let token: ResumeToken = bson::from_bson(Bson::Document(doc! { "_data": "8263" })).unwrap();
        let position = FeedPosition::of(&token).unwrap();
        assert_eq!(
            FeedPosition::parse(position.as_str()),
            Some(position.clone())
        );
        assert!(position.token().is_some());
        assert_eq!(FeedPosition::parse("not json"), None);
    }
}
