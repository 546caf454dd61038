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

/// A driver client for the test bed's MongoDB (the official driver; it
/// connects lazily).
pub async fn client() -> Client {
    let uri = mongo_uri();
    Client::with_uri_str(&uri)
        .await
        .unwrap_or_else(|err| panic!("invalid MONGO_URI {uri:?}: {err}"))
}

/// A database of the test's own on the test bed's MongoDB. Call
/// [`TestDb::drop_db`] at the end of the test to remove it.
#[derive(Clone)]
pub struct TestDb {
    client: Client,
    name: String,
}

impl TestDb {
    /// A fresh, uniquely named database (created by the first write to it).
    pub async fn new(prefix: &str) -> Self {
        Self {
            client: client().await,
            name: unique_db(prefix),
        }
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
        self.features()
            .find(bson::doc! {})
            .sort(bson::doc! { "_id": 1 })
            .await
            .expect("find in the feature collection")
            .try_collect()
            .await
            .expect("read the feature collection")
    }

    /// Drops the database.
    pub async fn drop_db(&self) {
        if let Err(err) = self.database().drop().await {
            eprintln!("testkit: could not drop database {}: {err}", self.name);
        }
    }
}
