//! The collection's change feed as domain events: [`FeatureStore::watch`]
//! opens it now or after a saved [`FeedPosition`]; [`ChangeFeed::next`]
//! yields [`Change`]s. What the driver's change events and resume tokens
//! look like stays in this module.
//!
//! Events are read as raw BSON and decoded field by field, so one the
//! schema cannot take (a string that is not UTF-8, written by a tool that
//! does not validate) still yields its position and, where readable, its
//! key: it becomes [`ChangeKind::Unreadable`] instead of stalling the feed.
//! Events too large to deliver are split by the server
//! (`$changeStreamSplitLargeEvent`, where supported) and put together here.

use crate::codec::{self, field};
use crate::error::{StoreError, server_code};
use crate::model::FeatureDocument;
use crate::store::FeatureStore;
use crate::version;
use bson::{Bson, Document, RawDocument, RawDocumentBuf, doc};
use chrono::{DateTime, Utc};
use mongodb::change_stream::ChangeStream;
use mongodb::change_stream::event::{ChangeStreamEvent, ResumeToken};
use mongodb::options::FullDocumentType;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use thiserror::Error;

/// Server error codes that mean the feed cannot resume where it was:
/// ChangeStreamHistoryLost, ChangeStreamFatalError, InvalidResumeToken.
const HISTORY_LOST_CODES: [i32; 3] = [286, 280, 260];
/// "Unrecognized pipeline stage name": the server cannot split large events.
const UNKNOWN_STAGE: i32 = 40324;

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
    /// A change whose content cannot be read (it does not fit the schema,
    /// or could not be delivered). `customer_id` when at least the key could
    /// be read.
    Unreadable {
        customer_id: Option<String>,
        reason: String,
    },
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

    /// Whether trying again later may help (the database is down or busy),
    /// as opposed to an answer that will not change (a refused position, an
    /// event the server cannot deliver).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Store(err) if err.is_unavailable())
    }
}

/// What a feed carries of each change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedContent {
    /// The whole current document of every write.
    Full,
    /// Only each change's kind, key and position: for stepping over a
    /// change whose content the server cannot deliver.
    KeysOnly,
}

/// An open change feed.
pub struct ChangeFeed {
    stream: ChangeStream<RawDocumentBuf>,
    /// Fragments of a split event read so far (never more than one event's).
    fragments: Vec<RawDocumentBuf>,
    /// The position before the first fragment: where the feed stands until
    /// the event is whole.
    before_fragments: Option<FeedPosition>,
}

/// Opens change feeds of the store's collection, and remembers what the
/// server can do.
#[derive(Clone)]
pub struct ChangeFeeds {
    collection: mongodb::Collection<Document>,
    poll: Duration,
    /// Cleared once the server refuses `$changeStreamSplitLargeEvent`.
    can_split: Arc<AtomicBool>,
}

impl FeatureStore {
    /// Change feeds of the collection; one [`ChangeFeed::next`] waits at most
    /// `poll` for changes.
    pub fn change_feeds(&self, poll: Duration) -> ChangeFeeds {
        ChangeFeeds {
            collection: self.collection.clone(),
            poll,
            can_split: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl ChangeFeeds {
    /// Opens a feed. With [`FeedContent::Full`] every write carries the full
    /// current document, and events too large for one message are split by
    /// the server where it can.
    pub async fn watch(
        &self,
        start: FeedStart,
        content: FeedContent,
    ) -> Result<ChangeFeed, FeedError> {
        let token = match &start {
            FeedStart::Now => None,
            FeedStart::After(position) => position.token(),
        };
        let split = content == FeedContent::Full && self.can_split.load(Ordering::Relaxed);
        let stream = match self.open(token.clone(), content, split).await {
            Err(err) if split && server_code(&err) == Some(UNKNOWN_STAGE) => {
                tracing::info!("the server cannot split large change events; watching without");
                self.can_split.store(false, Ordering::Relaxed);
                self.open(token, content, false).await
            }
            other => other,
        }
        .map_err(FeedError::from_driver)?;
        Ok(ChangeFeed {
            stream: stream.with_type::<RawDocumentBuf>(),
            fragments: Vec::new(),
            before_fragments: None,
        })
    }

    async fn open(
        &self,
        token: Option<ResumeToken>,
        content: FeedContent,
        split: bool,
    ) -> mongodb::error::Result<ChangeStream<ChangeStreamEvent<Document>>> {
        let mut pipeline = Vec::new();
        let watch = self.collection.watch().max_await_time(self.poll);
        let watch = match content {
            FeedContent::Full => watch.full_document(FullDocumentType::UpdateLookup),
            FeedContent::KeysOnly => {
                pipeline.push(doc! { "$project": {
                    "fullDocument": 0, "updateDescription": 0, "fullDocumentBeforeChange": 0,
                } });
                watch
            }
        };
        if split {
            pipeline.push(doc! { "$changeStreamSplitLargeEvent": {} });
        }
        let watch = watch.pipeline(pipeline);
        // `startAfter` resumes after normal and feed-ending events alike.
        match token {
            Some(token) => watch.start_after(token).await,
            None => watch.await,
        }
    }
}

impl ChangeFeed {
    /// The next change, or `None` when none came within the poll time. At
    /// most one round trip; never cancel it half-way (the driver cannot
    /// tell where the feed stands after that).
    pub async fn next(&mut self) -> Result<Option<Change>, FeedError> {
        let Some(raw) = self
            .stream
            .next_if_any()
            .await
            .map_err(FeedError::from_driver)?
        else {
            return Ok(None);
        };
        let raw = match split_of(&raw) {
            Some((fragment, of)) if fragment < of => {
                if self.fragments.is_empty() {
                    self.before_fragments = self.position_before();
                }
                self.fragments.push(raw);
                return Ok(None);
            }
            Some(_) if !self.fragments.is_empty() => {
                self.fragments.push(raw);
                let whole = merge(&std::mem::take(&mut self.fragments));
                self.before_fragments = None;
                whole
            }
            _ => raw,
        };
        Ok(Some(change_of(&raw)))
    }

    /// Where the feed stands: after every change it returned, and after
    /// changes it skipped on the server (so an idle feed moves on too) —
    /// but never inside a split event.
    pub fn position(&self) -> Option<FeedPosition> {
        if !self.fragments.is_empty() {
            return self.before_fragments.clone();
        }
        self.position_before()
    }

    fn position_before(&self) -> Option<FeedPosition> {
        self.stream
            .resume_token()
            .as_ref()
            .and_then(FeedPosition::of)
    }
}

/// `(fragment, of)` of a split event.
fn split_of(raw: &RawDocument) -> Option<(i32, i32)> {
    let split = raw.get_document("splitEvent").ok()?;
    Some((split.get_i32("fragment").ok()?, split.get_i32("of").ok()?))
}

/// The fragments of one split event as one event: every field once, the
/// position of the last fragment.
fn merge(fragments: &[RawDocumentBuf]) -> RawDocumentBuf {
    let mut whole = RawDocumentBuf::new();
    let mut seen = std::collections::HashSet::new();
    for fragment in fragments.iter().rev() {
        for (key, value) in fragment.iter().flatten() {
            if key != "splitEvent" && seen.insert(key.to_owned()) {
                whole.append_ref(key, value);
            }
        }
    }
    whole
}

fn change_of(raw: &RawDocument) -> Change {
    let position = raw
        .get_document("_id")
        .ok()
        .and_then(|id| bson::from_slice::<ResumeToken>(id.as_bytes()).ok())
        .as_ref()
        .and_then(FeedPosition::of)
        .unwrap_or(FeedPosition(String::new()));
    Change {
        position,
        kind: kind_of(raw),
        cluster_time: raw.get_timestamp("clusterTime").ok().map(|t| ClusterTime {
            seconds: t.time,
            increment: t.increment,
        }),
        wall_time: raw.get_datetime("wallTime").ok().map(|t| t.to_chrono()),
    }
}

fn kind_of(raw: &RawDocument) -> ChangeKind {
    let Ok(operation) = raw.get_str("operationType") else {
        return ChangeKind::Unreadable {
            customer_id: None,
            reason: "the event has no readable operationType".into(),
        };
    };
    let op = match operation {
        "insert" => WriteOp::Insert,
        "update" => WriteOp::Update,
        "replace" => WriteOp::Replace,
        "delete" => {
            return match document_id(raw) {
                Some(customer_id) => ChangeKind::Deleted {
                    customer_id,
                    version_bound: version::upper_bound_at(
                        raw.get_timestamp("clusterTime").map_or(0, |t| t.time),
                    ),
                },
                None => ChangeKind::Other,
            };
        }
        "drop" => return ChangeKind::CollectionGone(CollectionEvent::Dropped),
        "rename" => return ChangeKind::CollectionGone(CollectionEvent::Renamed),
        "dropDatabase" => return ChangeKind::CollectionGone(CollectionEvent::DatabaseDropped),
        "invalidate" => return ChangeKind::CollectionGone(CollectionEvent::Invalidated),
        _ => return ChangeKind::Other,
    };
    let Some(customer_id) = document_id(raw) else {
        return match raw.get_document("documentKey") {
            // A key that is there but not a string id: not a cached document.
            Ok(_) => ChangeKind::Other,
            Err(err) => ChangeKind::Unreadable {
                customer_id: None,
                reason: format!("the event's documentKey cannot be read: {err}"),
            },
        };
    };
    let unreadable = |reason: String| ChangeKind::Unreadable {
        customer_id: Some(customer_id.clone()),
        reason,
    };
    let full = match raw.get("fullDocument") {
        Ok(Some(bson::RawBsonRef::Document(full))) => full,
        Ok(_) => {
            return ChangeKind::Written {
                op,
                customer_id,
                document: None,
                version_advanced: false,
                traceparent: None,
            };
        }
        Err(err) => return unreadable(format!("fullDocument cannot be read: {err}")),
    };
    let full: Document = match full.try_into() {
        Ok(full) => full,
        Err(err) => return unreadable(format!("fullDocument is not valid BSON: {err}")),
    };
    let document = match codec::decode(&full) {
        Ok(document) => document,
        Err(err) => return unreadable(err.to_string()),
    };
    let updated: Vec<String> = match raw
        .get_document("updateDescription")
        .and_then(|d| d.get_document("updatedFields"))
    {
        Ok(fields) => match fields
            .iter()
            .map(|f| f.map(|(k, _)| k.to_owned()))
            .collect()
        {
            Ok(keys) => keys,
            Err(err) => return unreadable(format!("updatedFields cannot be read: {err}")),
        },
        Err(_) => Vec::new(),
    };
    let changed = |name: &str| updated.iter().any(|key| key == name);
    // Writes through the store always advance `version`; replacements and
    // edits by other tools may not.
    let version_advanced = match op {
        WriteOp::Insert => document.version > 0,
        WriteOp::Update => changed(field::VERSION),
        WriteOp::Replace => false,
    };
    let traceparent = match op {
        WriteOp::Insert => codec::traceparent_of(&full),
        WriteOp::Update if changed(field::TRACE) => codec::traceparent_of(&full),
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

fn document_id(raw: &RawDocument) -> Option<String> {
    raw.get_document("documentKey")
        .ok()?
        .get_str(field::ID)
        .ok()
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bson::doc;

    fn raw_event(op: &str, full: Option<Document>, updated: Option<Document>) -> RawDocumentBuf {
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
        RawDocumentBuf::from_document(&raw).unwrap()
    }

    fn event(op: &str, full: Option<Document>, updated: Option<Document>) -> ChangeKind {
        kind_of(&raw_event(op, full, updated))
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
    fn a_document_that_is_not_utf8_is_unreadable_but_keeps_its_key_and_position() {
        let mut full = stored(3);
        full.insert("note", "PLACEHOLDER");
        let mut bytes = raw_event("update", Some(full), Some(doc! {"note": 1})).into_bytes();
        let at = bytes.windows(11).position(|w| w == b"PLACEHOLDER").unwrap();
        bytes[at] = 0xff;
        let raw = RawDocumentBuf::from_bytes(bytes).unwrap();
        let change = change_of(&raw);
        assert!(
            matches!(&change.kind, ChangeKind::Unreadable { customer_id: Some(id), .. } if id == "C1"),
            "{:?}",
            change.kind
        );
        assert!(FeedPosition::parse(change.position.as_str()).is_some());
    }

    #[test]
    fn fragments_of_a_split_event_make_the_whole_event() {
        let whole = raw_event("update", Some(stored(8)), Some(doc! {"version": 8_i64}));
        let mut first = RawDocumentBuf::new();
        let mut second = RawDocumentBuf::new();
        for (key, value) in whole.iter().flatten() {
            let target = if key == "fullDocument" {
                &mut second
            } else {
                &mut first
            };
            target.append_ref(key, value);
        }
        first.append(
            "splitEvent",
            RawDocumentBuf::from_document(&doc! {"fragment": 1, "of": 2}).unwrap(),
        );
        second.append(
            "_id",
            RawDocumentBuf::from_document(&doc! {"_data": "01"}).unwrap(),
        );
        second.append(
            "splitEvent",
            RawDocumentBuf::from_document(&doc! {"fragment": 2, "of": 2}).unwrap(),
        );
        assert_eq!(split_of(&first), Some((1, 2)));
        let merged = merge(&[first, second]);
        assert_eq!(split_of(&merged), None);
        let change = change_of(&merged);
        assert!(matches!(
            change.kind,
            ChangeKind::Written { document: Some(ref d), version_advanced: true, .. } if d.version == 8
        ));
        // The position is the last fragment's.
        assert!(change.position.as_str().contains("01"));
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
