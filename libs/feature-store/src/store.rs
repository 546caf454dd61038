use crate::calls::{CallClass, CallLimiter};
use crate::codec::{self, field};
use crate::error::{self, FailedAttempt, StoreError, server_code};
use crate::model::{CustomerId, FeatureDocument, FeatureWrite};
use crate::monitor;
use bson::{Bson, Document, doc};
use chrono::Utc;
use futures::TryStreamExt;
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// MongoDB error code for a duplicate key.
const DUPLICATE_KEY: i32 = 11000;
/// Request calls in flight at once; the driver's pool has one connection
/// more, for health probes.
const MAX_IN_FLIGHT: u32 = 10;
/// Connections bulk writes and batch reads leave to single-key calls.
const SINGLE_KEY_RESERVE: usize = 3;
/// Documents of a bulk operation per extra `timeout` it is allowed.
const BULK_ITEMS_PER_TIMEOUT: usize = 100;
/// How often an upsert that collided with a concurrent insert of the same id is tried.
const UPSERT_ATTEMPTS: usize = 5;
/// Room a bulk statement takes beyond the document it stores (its filter,
/// the pipeline's operators), generously.
const STATEMENT_OVERHEAD: usize = 1024;
/// The most statements MongoDB takes in one write command (`maxWriteBatchSize`).
const MAX_WRITE_BATCH: usize = 100_000;

/// Where the store lives and how long a call may take.
#[derive(Clone)]
pub struct StoreConfig {
    /// A replica set (change streams need one). Credentials (`user:password@`,
    /// `authSource`, `authMechanism`) and TLS (`tls=true`, `tlsCAFile`,
    /// `tlsCertificateKeyFile`) go here and pass to the driver as they are;
    /// never logged as is ([`telemetry::redact::url`]).
    pub uri: String,
    pub database: String,
    pub collection: String,
    /// The deadline of one operation, on the server (`maxTimeMS`) and for
    /// server selection; bulk operations get one more per hundred items.
    pub timeout: Duration,
    /// Reported to the server, so operators see who is connected.
    pub app_name: String,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("uri", &telemetry::redact::url(&self.uri))
            .field("database", &self.database)
            .field("collection", &self.collection)
            .field("timeout", &self.timeout)
            .field("app_name", &self.app_name)
            .finish()
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
    pub(crate) collection: Collection<Document>,
    timeout: Duration,
    calls: CallLimiter,
    /// The write concern configured in the URI (`w`, `wtimeoutMS`,
    /// `journal`), sent with every write command: `run_command` does not
    /// add it by itself.
    write_concern: Option<Document>,
}

impl FeatureStore {
    /// Connects lazily (the driver connects on first use) with server selection
    /// bounded by the timeout, so a dead database fails requests fast. Every
    /// command the driver sends is counted in `mongodb_commands_total`, and
    /// connections opened and closed in `mongodb_connections_*_total`.
    pub async fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let mut options = ClientOptions::parse(&config.uri).await?;
        options.app_name = Some(config.app_name.clone());
        options.server_selection_timeout = Some(config.timeout);
        options.connect_timeout = Some(config.timeout);
        options.max_pool_size = Some(MAX_IN_FLIGHT + 1);
        monitor::install(&mut options);
        let write_concern = match &options.write_concern {
            Some(concern) => Some(
                bson::to_document(concern)
                    .map_err(|err| StoreError::Malformed(format!("write concern: {err}")))?,
            )
            .filter(|concern| !concern.is_empty()),
            None => None,
        };
        let client = Client::with_options(options)?;
        let database = client.database(&config.database);
        let collection = database.collection(&config.collection);
        Ok(Self {
            client,
            database,
            collection,
            timeout: config.timeout,
            calls: CallLimiter::new(MAX_IN_FLIGHT as usize, SINGLE_KEY_RESERVE),
            write_concern,
        })
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
            .keys(doc! { field::EXPIRES_AT: 1 })
            .options(
                IndexOptions::builder()
                    .expire_after(Duration::from_secs(0))
                    .name("expires_at_ttl".to_owned())
                    .build(),
            )
            .build();
        let (collection, timeout) = (self.collection.clone(), self.timeout);
        self.bounded(CallClass::Probe, async move {
            collection.create_index(index).max_time(timeout).await
        })
        .await
        .map(|_| ())
    }

    /// Round-trip time of a `ping`.
    pub async fn ping(&self) -> Result<Duration, StoreError> {
        let started = Instant::now();
        let database = self.database.clone();
        let command = doc! { "ping": 1, "maxTimeMS": millis(self.timeout) };
        self.bounded(CallClass::Probe, async move {
            database.run_command(command).await
        })
        .await?;
        Ok(started.elapsed())
    }

    pub async fn count(&self) -> Result<u64, StoreError> {
        let (collection, timeout) = (self.collection.clone(), self.timeout);
        self.bounded(CallClass::Probe, async move {
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
        let filter = doc! { field::ID: id.as_str() };
        let found = self
            .bounded(CallClass::SingleKey, async move {
                collection.find_one(filter).max_time(timeout).await
            })
            .await?;
        let now = Utc::now();
        match found {
            Some(raw) => {
                let doc = codec::decode(&raw)?;
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
        let filter = doc! { field::ID: { "$in": keys } };
        let allowance = self.allowance(ids.len());
        let collection = self.collection.clone();
        let raw: Vec<Document> = self
            .calls
            .run(CallClass::Bulk, allowance, async move {
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
            let doc = codec::decode(&raw)?;
            if !doc.is_expired(now) {
                docs.push(doc);
            }
        }
        Ok(docs)
    }

    /// One atomic upsert: sets the fields, advances the version, returns the
    /// stored document and whether it was created.
    ///
    /// Features that cannot be stored exactly are refused before anything is
    /// sent ([`StoreError::Unstorable`]). A write the server applied but did
    /// not confirm (`writeConcernError`) is an error, never a success. After
    /// a failover or a broken connection the upsert is sent once more: it
    /// sets the same content, so a second application changes nothing but
    /// the version, which then advances twice (and `created` may say
    /// "updated" for a document the first attempt created).
    #[tracing::instrument(skip_all, fields(db.system = "mongodb", db.operation = "findAndModify", customer_id = %write.customer_id))]
    pub async fn upsert(&self, write: &FeatureWrite) -> Result<UpsertOutcome, StoreError> {
        let update = codec::update_pipeline(write, Utc::now())?;
        let command = self.with_write_concern(doc! {
            "findAndModify": self.collection.name(),
            "query": { field::ID: write.customer_id.as_str() },
            "update": update.pipeline,
            "upsert": true,
            "new": true,
            "maxTimeMS": millis(self.timeout),
        });
        for attempt in 1..=UPSERT_ATTEMPTS {
            let reply = match self
                .send_write(CallClass::SingleKey, self.timeout, &command)
                .await
            {
                Ok(reply) => reply.body,
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
                Some(Bson::Document(value)) => codec::decode(value)?,
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

    /// Many upserts in unordered bulk `update` commands (one, unless the
    /// documents together pass MongoDB's command size), then one `$in`
    /// read of the stored documents. Each item succeeds or fails alone: an
    /// item whose features cannot be stored exactly fails without being
    /// sent, and the others are written. A command that fails as a whole
    /// (unavailable, or not confirmed) fails the call, and is sent once more
    /// after a failover or a broken connection like [`Self::upsert`].
    #[tracing::instrument(skip_all, fields(db.system = "mongodb", db.operation = "update", count = writes.len()))]
    pub async fn upsert_many(
        &self,
        writes: &[FeatureWrite],
    ) -> Result<Vec<Result<UpsertOutcome, StoreError>>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let now = Utc::now();
        // Per item: Ok(created) or why not.
        let mut outcomes: Vec<Result<bool, StoreError>> = Vec::with_capacity(writes.len());
        // The statements to send: (item index, statement, its size).
        let mut statements = Vec::with_capacity(writes.len());
        for (index, w) in writes.iter().enumerate() {
            match codec::update_pipeline(w, now) {
                Ok(update) => {
                    statements.push((
                        index,
                        doc! {
                            "q": { field::ID: w.customer_id.as_str() },
                            "u": update.pipeline,
                            "upsert": true,
                        },
                        update.stored_bytes + STATEMENT_OVERHEAD,
                    ));
                    outcomes.push(Ok(false));
                }
                Err(unstorable) => outcomes.push(Err(unstorable.into())),
            }
        }

        for chunk in command_chunks(&statements) {
            let allowance = self.allowance(chunk.len());
            let updates: Vec<Document> = chunk.iter().map(|(_, s, _)| s.clone()).collect();
            let command = self.with_write_concern(doc! {
                "update": self.collection.name(),
                "updates": updates,
                "ordered": false,
                "maxTimeMS": millis(allowance),
            });
            let reply = self
                .send_write(CallClass::Bulk, allowance, &command)
                .await?
                .body;
            // The reply's indexes are positions in this command.
            let item = |entry: &Document| {
                index_of(entry)
                    .and_then(|position| chunk.get(position))
                    .map(|(index, _, _)| *index)
            };
            if let Ok(upserted) = reply.get_array("upserted") {
                for entry in upserted.iter().filter_map(Bson::as_document) {
                    if let Some(slot) = item(entry).and_then(|index| outcomes.get_mut(index)) {
                        *slot = Ok(true);
                    }
                }
            }
            if let Ok(errors) = reply.get_array("writeErrors") {
                for entry in errors.iter().filter_map(Bson::as_document) {
                    if let Some(slot) = item(entry).and_then(|index| outcomes.get_mut(index)) {
                        *slot = Err(refusal(entry));
                    }
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
        let by_id: HashMap<&str, &FeatureDocument> =
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
    ///
    /// Sent once more after a failover or a broken connection (deleting is
    /// idempotent). When the first attempt may have been applied and the
    /// second finds nothing, whether this call deleted the document is
    /// unknown: that is the first attempt's error, not "absent".
    #[tracing::instrument(skip(self), fields(db.system = "mongodb", db.operation = "findAndModify"))]
    pub async fn delete(&self, id: &CustomerId) -> Result<Option<i64>, StoreError> {
        let command = self.with_write_concern(doc! {
            "findAndModify": self.collection.name(),
            "query": { field::ID: id.as_str() },
            "remove": true,
            "fields": { field::VERSION: 1 },
            "maxTimeMS": millis(self.timeout),
        });
        let reply = self
            .send_write(CallClass::SingleKey, self.timeout, &command)
            .await?;
        match reply.body.get("value") {
            Some(Bson::Document(removed)) => Ok(Some(codec::version_of(removed))),
            _ => match reply.first_attempt {
                Some((FailedAttempt::MaybeApplied, first)) => Err(first),
                _ => Ok(None),
            },
        }
    }

    /// Gives a version to a document that was changed without one (by another
    /// tool), so every content a cache can hold has a version of its own. Only
    /// applies while the document still has `seen_version` (so sending it
    /// once more after a failover is safe: a second application matches
    /// nothing, and reports `false`).
    #[tracing::instrument(skip(self), fields(db.system = "mongodb", db.operation = "update"))]
    pub async fn stamp_version(&self, id: &str, seen_version: i64) -> Result<bool, StoreError> {
        let seen = if seen_version == 0 {
            doc! { "$in": [Bson::Null, 0_i64] }
        } else {
            doc! { "$eq": seen_version }
        };
        let command = self.with_write_concern(doc! {
            "update": self.collection.name(),
            "updates": [{
                "q": { field::ID: id, field::VERSION: seen },
                "u": codec::stamp_update(),
            }],
            "maxTimeMS": millis(self.timeout),
        });
        let reply = self
            .send_write(CallClass::SingleKey, self.timeout, &command)
            .await?
            .body;
        if let Some(entry) = reply
            .get_array("writeErrors")
            .ok()
            .and_then(|errors| errors.iter().find_map(Bson::as_document))
        {
            return Err(refusal(entry));
        }
        Ok(reply_count(&reply, "nModified") == 1)
    }

    /// Closes the driver's connections; call before the process exits.
    pub async fn shutdown(self) {
        self.client.shutdown().await;
    }

    /// The deadline of an operation on `items` documents: one timeout, and
    /// one more per hundred documents. The timeout is for detecting a dead
    /// database, not for limiting batch sizes.
    fn allowance(&self, items: usize) -> Duration {
        self.timeout.saturating_mul(
            1 + u32::try_from(items / BULK_ITEMS_PER_TIMEOUT).unwrap_or(u32::MAX - 1),
        )
    }

    /// Adds the configured write concern to a write command.
    fn with_write_concern(&self, mut command: Document) -> Document {
        if let Some(concern) = &self.write_concern {
            command.insert("writeConcern", concern.clone());
        }
        command
    }

    /// Sends a write command within `limit`; a reply that reports a write
    /// concern failure is an error. Sends it once more when the first
    /// attempt failed in a failover or on a broken connection
    /// ([`StoreError::failed_attempt`]); each attempt has its own deadline,
    /// so a retried write can take up to twice `limit`.
    async fn send_write(
        &self,
        class: CallClass,
        limit: Duration,
        command: &Document,
    ) -> Result<Written, StoreError> {
        let first = match self.send_write_once(class, limit, command).await {
            Ok(body) => {
                return Ok(Written {
                    body,
                    first_attempt: None,
                });
            }
            Err(err) => err,
        };
        let Some(attempt) = first.failed_attempt() else {
            return Err(first);
        };
        tracing::warn!(error = %first, cause = ?std::error::Error::source(&first), ?attempt, "write failed in a failover or on a broken connection; sending it once more");
        let body = self.send_write_once(class, limit, command).await?;
        Ok(Written {
            body,
            first_attempt: Some((attempt, first)),
        })
    }

    async fn send_write_once(
        &self,
        class: CallClass,
        limit: Duration,
        command: &Document,
    ) -> Result<Document, StoreError> {
        let (database, command) = (self.database.clone(), command.clone());
        let reply = self
            .calls
            .run(
                class,
                limit,
                async move { database.run_command(command).await },
            )
            .await?;
        match error::write_concern_failure(&reply) {
            Some(err) => Err(err),
            None => Ok(reply),
        }
    }

    /// Bounds a database call by the configured timeout.
    async fn bounded<T: Send + 'static>(
        &self,
        class: CallClass,
        call: impl std::future::Future<Output = Result<T, mongodb::error::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.calls.run(class, self.timeout, call).await
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The reply to a write command, and how its first attempt failed when it
/// took a second.
struct Written {
    body: Document,
    first_attempt: Option<(FailedAttempt, StoreError)>,
}

/// Splits bulk statements into commands that stay within MongoDB's command
/// size (a single statement larger than that still goes alone: MongoDB
/// allows a command 16 KiB over the document limit) and batch size.
fn command_chunks<T>(statements: &[(usize, T, usize)]) -> Vec<&[(usize, T, usize)]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, (_, _, size)) in statements.iter().enumerate() {
        let full = bytes + size > codec::MAX_BSON_DOCUMENT_BYTES || i - start == MAX_WRITE_BATCH;
        if full && i > start {
            chunks.push(&statements[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < statements.len() {
        chunks.push(&statements[start..]);
    }
    chunks
}

/// One entry of a reply's `writeErrors`.
fn refusal(entry: &Document) -> StoreError {
    StoreError::Refused {
        code: entry.get_i32("code").unwrap_or(0),
        message: entry.get_str("errmsg").unwrap_or("write error").to_owned(),
    }
}

/// A count in a write reply (Int32 from MongoDB, sometimes Int64).
fn reply_count(reply: &Document, name: &str) -> i64 {
    match reply.get(name) {
        Some(Bson::Int32(n)) => i64::from(*n),
        Some(Bson::Int64(n)) => *n,
        _ => 0,
    }
}

fn index_of(entry: &Document) -> Option<usize> {
    match entry.get("index")? {
        Bson::Int32(i) => usize::try_from(*i).ok(),
        Bson::Int64(i) => usize::try_from(*i).ok(),
        _ => None,
    }
}

fn is_duplicate_key(err: &mongodb::error::Error) -> bool {
    server_code(err) == Some(DUPLICATE_KEY) || err.to_string().contains("E11000")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bulk_commands_stay_within_mongodbs_command_size() {
        let mib = 1024 * 1024;
        let sizes = |sizes: &[usize]| -> Vec<(usize, (), usize)> {
            sizes.iter().enumerate().map(|(i, s)| (i, (), *s)).collect()
        };
        let lengths = |statements: &[(usize, (), usize)]| -> Vec<usize> {
            command_chunks(statements).iter().map(|c| c.len()).collect()
        };
        assert_eq!(lengths(&sizes(&[])), Vec::<usize>::new());
        assert_eq!(lengths(&sizes(&[100; 1000])), vec![1000]);
        assert_eq!(lengths(&sizes(&[8 * mib, 8 * mib, 1])), vec![2, 1]);
        // One statement as large as a document may be still goes, alone.
        assert_eq!(lengths(&sizes(&[1, 16 * mib + 1024, 1])), vec![1, 1, 1]);
        let many = sizes(&vec![1; MAX_WRITE_BATCH + 1]);
        assert_eq!(lengths(&many), vec![MAX_WRITE_BATCH, 1]);
        // Every statement is in exactly one command, in order.
        let statements = sizes(&[6 * mib, 6 * mib, 6 * mib, 1, 1, 16 * mib]);
        let order: Vec<usize> = command_chunks(&statements)
            .iter()
            .flat_map(|c| c.iter().map(|(i, _, _)| *i))
            .collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4, 5]);
    }
}
