//! The usual arrangement of an API test: a Redis and a database of its own
//! and the API in-process in front of them.

use crate::api::{TestApi, env};
use crate::mongo::TestDb;
use crate::redis::TestRedis;

/// A [`TestRedis`], a [`TestDb`] and a [`TestApi`] using both.
pub struct TestStack {
    pub redis: TestRedis,
    pub db: TestDb,
    pub api: TestApi,
}

impl TestStack {
    /// Starts all three; `prefix` names the database, `overrides` are extra
    /// settings of the API (e.g. `("LOCAL_CACHE_ENABLED", "false")`).
    pub async fn start(prefix: &str, overrides: &[(&str, &str)]) -> Self {
        let redis = TestRedis::start().await;
        let db = TestDb::new(prefix).await;
        let api = TestApi::start(&redis.url(), db.name(), env(overrides)).await;
        Self { redis, db, api }
    }

    /// A connection to this test's Redis.
    pub async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        self.redis.client().await
    }

    /// Stops the API, drops the database and stops Redis.
    pub async fn finish(self) {
        let Self { mut redis, db, api } = self;
        if let Err(err) = api.shutdown().await {
            eprintln!("testkit: cache-api shut down with an error: {err:#}");
        }
        db.drop_db().await;
        redis.stop();
    }
}
