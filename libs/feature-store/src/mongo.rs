use crate::model::{CustomerId, FeatureDocument, FeatureWrite, format_time};
use crate::version;
use bson::{Bson, Document, doc};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::event::EventHandler;
use mongodb::event::cmap::{CmapEvent, ConnectionClosedReason};
use mongodb::event::command::CommandEvent;
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::Semaphore;
use tracing::Instrument;

/// MongoDB error code for a duplicate key.
const DUPLICATE_KEY: i32 = 11000;
/// Calls in flight at once, and the size of the driver's connection pool.
const MAX_IN_FLIGHT: u32 = 10;
/// How much longer than the server-side deadline the client waits.
const CLIENT_GRACE: Duration = Duration::from_millis(250);
/// Documents of a bulk operation per extra `timeout` it is allowed.
const BULK_ITEMS_PER_TIMEOUT: usize = 100;
/// Server errors that mean "not now" rather than "wrong": the operation's
/// deadline passed on the server (MaxTimeMSExpired), or the node is shutting
/// down or is no longer primary (a failover in progress).
const TRANSIENT_CODES: [i32; 6] = [50, 91, 189, 10107, 11600, 13435];
/// How often an upsert that collided with a concurrent insert of the same id is tried.
const UPSERT_ATTEMPTS: usize = 5;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The database did not answer in time or could not be reached.
    #[error("MongoDB is unavailable: {0}")]
    Unavailable(String),
    /// A write kept colliding with concurrent writes of the same document.
    #[error("concurrent writes to the same customer kept conflicting; retry")]
    Conflict,
    /// A single item of a bulk write was refused by the database.
    #[error("MongoDB refused the write: {0}")]
    Refused(String),
    #[error("MongoDB error: {0}")]
    Driver(#[from] mongodb::error::Error),
    #[error("stored document is malformed: {0}")]
    Malformed(String),
}

impl StoreError {
    fn from_driver(err: mongodb::error::Error) -> Self {
        use mongodb::error::ErrorKind;
        match *err.kind {
            ErrorKind::ServerSelection { .. }
            | ErrorKind::Io(_)
            | ErrorKind::ConnectionPoolCleared { .. } => Self::Unavailable(err.to_string()),
            ErrorKind::Command(ref command) if TRANSIENT_CODES.contains(&command.code) => {
                Self::Unavailable(err.to_string())
            }
            _ => Self::Driver(err),
        }
    }
}

/// The result of a single upsert.
#[derive(Debug, Clone)]
pub struct UpsertOutcome {
    pub document: FeatureDocument,
    pub created: bool,
}

/// The feature collection in MongoDB: the source of truth.
#[derive(Clone)]
pub struct FeatureStore {
    client: Client,
    database: Database,
    collection: Collection<Document>,
    timeout: Duration,
    /// One permit per pool connection: a call is sent only once it holds
    /// one, so a call still waiting when its deadline passes is never sent.
    in_flight: Arc<Semaphore>,
}

impl FeatureStore {
    /// Connects lazily (the driver connects on first use) with server selection
    /// bounded by `timeout`, so a dead database fails requests fast. Every
    /// command the driver sends is counted in `mongodb_commands_total`, and
    /// connections opened and closed in `mongodb_connections_*_total`.
    pub async fn connect(
        uri: &str,
        database: &str,
        collection: &str,
        timeout: Duration,
        app_name: &str,
    ) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(uri).await?;
        options.app_name = Some(app_name.to_owned());
        options.server_selection_timeout = Some(timeout);
        options.connect_timeout = Some(timeout);
        options.max_pool_size = Some(MAX_IN_FLIGHT);
        options.command_event_handler = Some(EventHandler::callback(|event| match event {
            CommandEvent::Started(started) => {
                metrics::counter!("mongodb_commands_total", "command" => started.command_name)
                    .increment(1);
            }
            CommandEvent::Failed(failed) => {
                metrics::counter!("mongodb_errors_total", "command" => failed.command_name)
                    .increment(1);
            }
            _ => {}
        }));
        options.cmap_event_handler = Some(EventHandler::callback(|event| match event {
            CmapEvent::ConnectionCreated(_) => {
                metrics::counter!("mongodb_connections_created_total").increment(1);
            }
            CmapEvent::ConnectionClosed(closed) => {
                let reason = match closed.reason {
                    ConnectionClosedReason::Stale => "stale",
                    ConnectionClosedReason::Idle => "idle",
                    ConnectionClosedReason::Error => "error",
                    ConnectionClosedReason::Dropped => "dropped",
                    ConnectionClosedReason::PoolClosed => "pool_closed",
                    _ => "other",
                };
                metrics::counter!("mongodb_connections_closed_total", "reason" => reason)
                    .increment(1);
            }
            _ => {}
        }));
        let client = Client::with_options(options)?;
        let database = client.database(database);
        let collection = database.collection(collection);
        Ok(Self {
            client,
            database,
            collection,
            timeout,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize)),
        })
    }

    /// Connects with the configured `MONGO_*` settings.
    pub async fn from_settings(
        settings: &settings::Settings,
        app_name: &str,
    ) -> Result<Self, StoreError> {
        Self::connect(
            &settings.mongo_uri,
            &settings.mongo_db,
            &settings.mongo_collection,
            settings.mongo_timeout,
            app_name,
        )
        .await
    }

    /// The raw collection, for change streams and tools.
    pub fn collection(&self) -> &Collection<Document> {
        &self.collection
    }

    pub fn collection_name(&self) -> &str {
        self.collection.name()
    }

    pub fn database_name(&self) -> &str {
        self.database.name()
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Creates the TTL index on `expires_at` (idempotent).
    #[tracing::instrument(skip(self), fields(db.system = "mongodb", db.operation = "createIndexes"))]
    pub async fn ensure_indexes(&self) -> Result<(), StoreError> {
        let index = IndexModel::builder()
            .keys(doc! { "expires_at": 1 })
            .options(
                IndexOptions::builder()
                    .expire_after(Duration::from_secs(0))
                    .name("expires_at_ttl".to_owned())
                    .build(),
            )
            .build();
        let collection = self.collection.clone();
        self.bounded(async move { collection.create_index(index).await })
            .await
            .map(|_| ())
    }

    /// Round-trip time of a `ping`.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let started = Instant::now();
        let database = self.database.clone();
        self.bounded(async move { database.run_command(doc! { "ping": 1 }).await })
            .await?;
        Ok(started.elapsed())
    }

    pub async fn count(&self) -> Result<u64, StoreError> {
        let (collection, timeout) = (self.collection.clone(), self.timeout);
        self.bounded(async move {
            collection
                .estimated_document_count()
                .max_time(timeout)
                .await
        })
        .await
    }

    /// The current, unexpired document of one customer.
    #[tracing::instrument(skip(self), fields(db.system = "mongodb", db.operation = "find"))]
    pub async fn get(&self, id: &CustomerId) -> Result<Option<FeatureDocument>, StoreError> {
        let (collection, timeout) = (self.collection.clone(), self.timeout);
        let filter = doc! { "_id": id.as_str() };
        let found = self
            .bounded(async move { collection.find_one(filter).max_time(timeout).await })
            .await?;
        let now = Utc::now();
        match found {
            Some(raw) => {
                let doc = document_from_bson(raw)?;
                Ok((!doc.is_expired(now)).then_some(doc))
            }
            None => Ok(None),
        }
    }

    /// The current, unexpired documents of many customers, in one `$in` query.
    #[tracing::instrument(skip_all, fields(db.system = "mongodb", db.operation = "find", count = ids.len()))]
    pub async fn get_many(&self, ids: &[CustomerId]) -> Result<Vec<FeatureDocument>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&str> = ids.iter().map(CustomerId::as_str).collect();
        let filter = doc! { "_id": { "$in": keys } };
        let allowance = self.allowance(ids.len());
        let collection = self.collection.clone();
        let raw: Vec<Document> = self
            .bounded_by(allowance, async move {
                collection
                    .find(filter)
                    .max_time(allowance)
                    .await?
                    .try_collect()
                    .await
            })
            .await?;
        let now = Utc::now();
        let mut docs = Vec::with_capacity(raw.len());
        for raw in raw {
            let doc = document_from_bson(raw)?;
            if !doc.is_expired(now) {
                docs.push(doc);
            }
        }
        Ok(docs)
    }

    /// One atomic upsert: sets the fields, advances the version, returns the
    /// stored document and whether it was created.
    #[tracing::instrument(skip_all, fields(db.system = "mongodb", db.operation = "findAndModify", customer_id = %write.customer_id))]
    pub async fn upsert(&self, write: &FeatureWrite) -> Result<UpsertOutcome, StoreError> {
        let command = doc! {
            "findAndModify": self.collection.name(),
            "query": { "_id": write.customer_id.as_str() },
            "update": update_pipeline(write, Utc::now()),
            "upsert": true,
            "new": true,
            "maxTimeMS": millis(self.timeout),
        };
        for attempt in 1..=UPSERT_ATTEMPTS {
            let (database, command) = (self.database.clone(), command.clone());
            let reply = match self
                .bounded(async move { database.run_command(command).await })
                .await
            {
                Ok(reply) => reply,
                // Two upserts of a new id can race on the unique index; MongoDB
                // retries most of these itself, the rest are safe to retry
                // because the failed one wrote nothing.
                Err(StoreError::Driver(err)) if is_duplicate_key(&err) => {
                    tracing::debug!(
                        attempt,
                        "upsert collided with a concurrent insert; retrying"
                    );
                    continue;
                }
                Err(err) => return Err(err),
            };
            let created = reply
                .get_document("lastErrorObject")
                .ok()
                .and_then(|last| last.get_bool("updatedExisting").ok())
                .map(|existed| !existed)
                .unwrap_or(false);
            let document = match reply.get("value") {
                Some(Bson::Document(value)) => document_from_bson(value.clone())?,
                // MongoDB always returns the new document here. The stand-in
                // used in tests can return null when writes of the same id
                // interleave, although the update was applied: read it back
                // rather than applying it twice.
                _ => match self.get(&write.customer_id).await? {
                    Some(document) => document,
                    None => return Err(StoreError::Conflict),
                },
            };
            return Ok(UpsertOutcome { document, created });
        }
        Err(StoreError::Conflict)
    }

    /// Many upserts in one unordered bulk `update` command, then one `$in`
    /// read of the stored documents. Each item succeeds or fails alone.
    #[tracing::instrument(skip_all, fields(db.system = "mongodb", db.operation = "update", count = writes.len()))]
    pub async fn upsert_many(
        &self,
        writes: &[FeatureWrite],
    ) -> Result<Vec<Result<UpsertOutcome, StoreError>>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let now = Utc::now();
        let updates: Vec<Document> = writes
            .iter()
            .map(|w| {
                doc! {
                    "q": { "_id": w.customer_id.as_str() },
                    "u": update_pipeline(w, now),
                    "upsert": true,
                }
            })
            .collect();
        let allowance = self.allowance(writes.len());
        let command = doc! {
            "update": self.collection.name(),
            "updates": updates,
            "ordered": false,
            "maxTimeMS": millis(allowance),
        };
        let reply = self
            .bounded_by(allowance, {
                let database = self.database.clone();
                async move { database.run_command(command).await }
            })
            .await?;

        // Per item: Ok(created) or the database's refusal.
        let mut outcomes: Vec<Result<bool, StoreError>> =
            writes.iter().map(|_| Ok(false)).collect();
        if let Ok(upserted) = reply.get_array("upserted") {
            for entry in upserted {
                if let Some(slot) = entry
                    .as_document()
                    .and_then(index_of)
                    .and_then(|index| outcomes.get_mut(index))
                {
                    *slot = Ok(true);
                }
            }
        }
        if let Ok(errors) = reply.get_array("writeErrors") {
            for entry in errors.iter().filter_map(Bson::as_document) {
                if let Some(slot) = index_of(entry).and_then(|index| outcomes.get_mut(index)) {
                    let message = entry.get_str("errmsg").unwrap_or("write error").to_owned();
                    *slot = Err(StoreError::Refused(message));
                }
            }
        }

        let written: Vec<CustomerId> = writes
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| outcome.is_ok())
            .map(|(w, _)| w.customer_id.clone())
            .collect();
        let stored = self.get_many(&written).await?;
        let by_id: std::collections::HashMap<&str, &FeatureDocument> =
            stored.iter().map(|d| (d.customer_id.as_str(), d)).collect();

        Ok(writes
            .iter()
            .zip(outcomes)
            .map(|(w, outcome)| match outcome {
                Ok(created) => match by_id.get(w.customer_id.as_str()) {
                    Some(doc) => Ok(UpsertOutcome {
                        document: (*doc).clone(),
                        created,
                    }),
                    // Deleted again between the write and the read-back.
                    None => Err(StoreError::Conflict),
                },
                Err(err) => Err(err),
            })
            .collect())
    }

    /// Deletes one customer's document; returns the version it had.
    #[tracing::instrument(skip(self), fields(db.system = "mongodb", db.operation = "findAndModify"))]
    pub async fn delete(&self, id: &CustomerId) -> Result<Option<i64>, StoreError> {
        let (collection, timeout) = (self.collection.clone(), self.timeout);
        let filter = doc! { "_id": id.as_str() };
        let removed = self
            .bounded(async move {
                collection
                    .find_one_and_delete(filter)
                    .projection(doc! { "version": 1 })
                    .max_time(timeout)
                    .await
            })
            .await?;
        Ok(removed.map(|d| version_of(&d)))
    }

    /// Gives a version to a document that was changed without one (by another
    /// tool), so every content a cache can hold has a version of its own. Only
    /// applies while the document still has `seen_version`.
    #[tracing::instrument(skip(self), fields(db.system = "mongodb", db.operation = "update"))]
    pub async fn stamp_version(&self, id: &str, seen_version: i64) -> Result<bool, StoreError> {
        let seen = if seen_version == 0 {
            doc! { "$in": [Bson::Null, 0_i64] }
        } else {
            doc! { "$eq": seen_version }
        };
        let collection = self.collection.clone();
        let filter = doc! { "_id": id, "version": seen };
        let result = self
            .bounded(async move {
                collection
                    .update_one(
                        filter,
                        vec![doc! { "$set": { "version": version::next_version_expr() } }],
                    )
                    .await
            })
            .await?;
        Ok(result.modified_count == 1)
    }

    /// Closes the driver's connections; call before the process exits.
    pub async fn shutdown(self) {
        self.client.shutdown().await;
    }

    /// The deadline of an operation on `items` documents: one timeout, and
    /// one more per hundred documents. The timeout is for detecting a dead
    /// database, not for limiting batch sizes.
    fn allowance(&self, items: usize) -> Duration {
        self.timeout * (1 + u32::try_from(items / BULK_ITEMS_PER_TIMEOUT).unwrap_or(u32::MAX))
    }

    /// Bounds a database call by the configured timeout.
    async fn bounded<T: Send + 'static>(
        &self,
        call: impl Future<Output = Result<T, mongodb::error::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.bounded_by(self.timeout, call).await
    }

    /// Waits at most `limit` (plus a grace) for a database call.
    ///
    /// Operations carry the same deadline to the server (`maxTimeMS`), so the
    /// database stops work nobody waits for. A call is sent only with one of
    /// the pool's permits, and one still waiting for a permit at its deadline
    /// is never sent: a write answered 503 then cannot land much later. A
    /// call that was sent runs to completion in a task of its own, past its
    /// caller's deadline if need be: the driver cannot reuse a connection
    /// whose operation was dropped half-way, and under overload that churn
    /// kept a replica from reaching MongoDB long after the load was gone.
    async fn bounded_by<T: Send + 'static>(
        &self,
        limit: Duration,
        call: impl Future<Output = Result<T, mongodb::error::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let limit = limit + CLIENT_GRACE;
        let deadline = tokio::time::Instant::now() + limit;
        let permits = Arc::clone(&self.in_flight);
        let task = tokio::spawn(
            async move {
                let permit = tokio::time::timeout_at(deadline, permits.acquire_owned()).await;
                let Ok(Ok(_permit)) = permit else {
                    return None;
                };
                Some(call.await)
            }
            .in_current_span(),
        );
        let unavailable =
            || StoreError::Unavailable(format!("no answer within {} ms", limit.as_millis()));
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(Some(result))) => result.map_err(StoreError::from_driver),
            Ok(Ok(None)) | Err(_) => Err(unavailable()),
            Ok(Err(failed)) => Err(StoreError::Unavailable(format!(
                "the database call failed: {failed}"
            ))),
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn index_of(entry: &Document) -> Option<usize> {
    match entry.get("index")? {
        Bson::Int32(i) => usize::try_from(*i).ok(),
        Bson::Int64(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    use mongodb::error::ErrorKind;
    let code = match &*err.kind {
        ErrorKind::Command(command) => Some(command.code),
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(write)) => Some(write.code),
        _ => None,
    };
    code == Some(DUPLICATE_KEY) || err.to_string().contains("E11000")
}

/// The update pipeline of one write. `$literal` keeps the features verbatim:
/// inside a pipeline an object would otherwise be read as an expression.
fn update_pipeline(write: &FeatureWrite, now: DateTime<Utc>) -> Vec<Document> {
    let expires_at = now + chrono::Duration::days(i64::from(write.ttl_days));
    let features =
        bson::to_bson(&write.features).unwrap_or_else(|_| Bson::Document(Document::new()));
    let mut set = doc! {
        "customer_id": write.customer_id.as_str(),
        "features": { "$literal": features },
        "calculated_at": format_time(now),
        "model_version": { "$literal": write.model_version.as_str() },
        "expires_at": bson::DateTime::from_chrono(expires_at),
        "version": version::next_version_expr(),
    };
    // Always set (null when untraced), never unset: a field removed by a
    // pipeline turns the change event into a `replace` on some servers.
    set.insert(
        "trace",
        write
            .traceparent
            .as_deref()
            .map_or(Bson::Null, |t| Bson::String(t.to_owned())),
    );
    vec![doc! { "$set": set }]
}

fn version_of(raw: &Document) -> i64 {
    match raw.get("version") {
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Double(v)) => *v as i64,
        _ => 0,
    }
}

/// Reads a stored document leniently: documents written by other tools may
/// lack fields (no version counts as version 0).
pub fn document_from_bson(raw: Document) -> Result<FeatureDocument, StoreError> {
    let version = version_of(&raw);
    let customer_id = match (raw.get("customer_id"), raw.get("_id")) {
        (Some(Bson::String(id)), _) | (None, Some(Bson::String(id))) => id.clone(),
        (_, Some(Bson::String(id))) => id.clone(),
        _ => return Err(StoreError::Malformed("no string customer_id or _id".into())),
    };
    let features = match raw.get("features") {
        Some(Bson::Document(features)) => {
            match Bson::Document(features.clone()).into_relaxed_extjson() {
                serde_json::Value::Object(map) => map,
                _ => serde_json::Map::new(),
            }
        }
        _ => serde_json::Map::new(),
    };
    let calculated_at = time_field(&raw, "calculated_at").unwrap_or(DateTime::UNIX_EPOCH);
    let model_version = raw
        .get_str("model_version")
        .unwrap_or(FeatureWrite::DEFAULT_MODEL_VERSION)
        .to_owned();
    Ok(FeatureDocument {
        version,
        customer_id,
        features,
        calculated_at,
        model_version,
        expires_at: time_field(&raw, "expires_at"),
    })
}

/// The W3C trace context stored with a document by the write that made it.
pub fn traceparent_of(raw: &Document) -> Option<&str> {
    raw.get_str("trace").ok()
}

fn time_field(raw: &Document, name: &str) -> Option<DateTime<Utc>> {
    match raw.get(name)? {
        Bson::DateTime(at) => Some(at.to_chrono()),
        Bson::String(s) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::error::{CommandError, Error, ErrorKind};

    fn command_error(code: i32, name: &str) -> Error {
        let command: CommandError = bson::from_document(doc! {
            "code": code, "codeName": name, "errmsg": "from the server",
        })
        .unwrap();
        Error::from(ErrorKind::Command(command))
    }

    #[test]
    fn an_expired_server_deadline_means_unavailable_not_a_fault() {
        assert!(matches!(
            StoreError::from_driver(command_error(50, "MaxTimeMSExpired")),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            StoreError::from_driver(command_error(10107, "NotWritablePrimary")),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(
            StoreError::from_driver(command_error(2, "BadValue")),
            StoreError::Driver(_)
        ));
    }
}
