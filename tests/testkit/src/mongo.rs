//! The test bed's MongoDB (SecantusDB) and a database of each test's own.

use bson::Document;
use mongodb::{Client, Collection, Database};
use std::sync::atomic::{AtomicU32, Ordering};

/// The collection the services use unless `MONGO_COLLECTION` says otherwise.
pub const DEFAULT_COLLECTION: &str = "customer_features";

/// `$MONGO_URI` of the test bed. Panics, saying how to get one, when unset.
pub fn mongo_uri() -> String {
    match std::env::var("MONGO_URI") {
        Ok(uri) if !uri.is_empty() => uri,
        _ => panic!(
            "MONGO_URI is not set: these tests need the test bed. Run them with \
             `scripts/test.sh`, or `cargo xtask testbed up DIR` and then \
             `set -a; . DIR/env; set +a` before `cargo test`."
        ),
    }
}

/// The test bed MongoDB's address (the host of [`mongo_uri`]), e.g. for a
/// proxy in front of it.
pub fn mongo_addr() -> std::net::SocketAddr {
    let uri = mongo_uri();
    let rest = uri.strip_prefix("mongodb://").expect("mongodb:// URI");
    let host = rest.split(['/', '?', ',']).next().expect("host");
    std::net::ToSocketAddrs::to_socket_addrs(host)
        .expect("resolve MongoDB host")
        .next()
        .expect("an address")
}

/// A database name no other test (in this or any other process) uses:
/// `prefix` (cut to 24 characters) + pid + a counter + random bits.
pub fn unique_db(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let prefix: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .take(24)
        .collect();
    format!(
        "{prefix}_{}_{}_{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

/// How long a test waits for MongoDB to answer one of the helpers below.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A driver client for the test bed's MongoDB (the official driver; it
/// connects lazily).
pub async fn client() -> Client {
    let uri = mongo_uri();
    Client::with_uri_str(&uri)
        .await
        .unwrap_or_else(|err| panic!("invalid MONGO_URI {uri:?}: {err}"))
}

/// Creates the feature collection of `db` before any service uses it.
///
/// A service creates it implicitly with its first write while it ensures
/// its TTL index in the background; SecantusDB can deadlock when both create
/// one collection at the same moment (TESTING.md, "Differences"), which
/// MongoDB does not. Tests that give a service a fresh database create the
/// collection first.
pub async fn create_feature_collection(client: &Client, db: &str) {
    let database = client.database(db);
    let create = database.create_collection(DEFAULT_COLLECTION);
    match tokio::time::timeout(ANSWER_TIMEOUT, create).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => panic!("cannot create {db}.{DEFAULT_COLLECTION}: {err}"),
        Err(_) => panic!(
            "MongoDB did not create {db}.{DEFAULT_COLLECTION} within {} s",
            ANSWER_TIMEOUT.as_secs()
        ),
    }
}

/// A database of the test's own on the test bed's MongoDB. Call
/// [`TestDb::drop_db`] at the end of the test to remove it.
#[derive(Clone)]
pub struct TestDb {
    client: Client,
    name: String,
}

impl TestDb {
    /// A fresh, uniquely named database with its feature collection.
    pub async fn new(prefix: &str) -> Self {
        Self::on(client().await, prefix).await
    }

    /// As [`TestDb::new`], on the server `client` reaches (e.g. a
    /// [`crate::secantus::TestMongo`] of the test's own).
    pub async fn on(client: Client, prefix: &str) -> Self {
        let name = unique_db(prefix);
        create_feature_collection(&client, &name).await;
        Self { client, name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn database(&self) -> Database {
        self.client.database(&self.name)
    }

    /// The services' feature collection in this database.
    pub fn features(&self) -> Collection<Document> {
        self.database().collection(DEFAULT_COLLECTION)
    }

    /// Every document of the feature collection, sorted by `_id`.
    pub async fn all_features(&self) -> Vec<Document> {
        use futures::TryStreamExt;
        let read = async {
            self.features()
                .find(bson::doc! {})
                .sort(bson::doc! { "_id": 1 })
                .await?
                .try_collect()
                .await
        };
        // The driver waits for a reply without limit: a wedged server must
        // fail the test, not hold the run.
        match tokio::time::timeout(ANSWER_TIMEOUT, read).await {
            Ok(Ok(documents)) => documents,
            Ok(Err(err)) => panic!("cannot read the feature collection: {err}"),
            Err(_) => panic!(
                "MongoDB did not answer a read of the feature collection within {} s",
                ANSWER_TIMEOUT.as_secs()
            ),
        }
    }

    /// Drops the database.
    pub async fn drop_db(&self) {
        match tokio::time::timeout(ANSWER_TIMEOUT, self.database().drop()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => eprintln!("testkit: could not drop database {}: {err}", self.name),
            Err(_) => eprintln!("testkit: dropping database {} got no answer", self.name),
        }
    }
}
