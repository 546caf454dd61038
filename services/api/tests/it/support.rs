//! The API service in-process on a free port, with a Redis and a database of
//! the test's own: [`TestApi`], [`TestStack`] and the [`Reply`] of a request.

use cache_api::Application;
use cache_api::state::AppState;
use reqwest::header::HeaderMap;
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;
use testkit::secantus::TestMongo;
use testkit::{TestDb, TestRedis};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Builds an environment map from pairs (for [`TestApi::start`]).
pub fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// `cache_api::Application` serving on `127.0.0.1:0` inside the test process,
/// built from `settings::load_from` with an explicit environment (the process
/// environment is not read, except `MONGO_URI` of the test bed as a default).
///
/// There is no telemetry subscriber in-process: logs go nowhere unless the
/// test captures them (`testkit::CapturedLogs`), and no `traceparent` is
/// produced. The Prometheus recorder is process-global, so
/// tests that compare metric values need a test binary of their own.
pub struct TestApi {
    addr: SocketAddr,
    client: reqwest::Client,
    state: AppState,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestApi {
    /// Starts the service against `redis_url` and the database `mongo_db` of
    /// the test bed. `overrides` win over everything (any setting, also
    /// `MONGO_URI`, `HTTP_ADDR`). Panics if the service cannot be built.
    pub async fn start(
        redis_url: &str,
        mongo_db: &str,
        overrides: HashMap<String, String>,
    ) -> Self {
        Self::try_start(redis_url, mongo_db, overrides)
            .await
            .unwrap_or_else(|err| panic!("cache-api did not start: {err:#}"))
    }

    pub async fn try_start(
        redis_url: &str,
        mongo_db: &str,
        overrides: HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        let mut vars = env(&[
            ("HTTP_ADDR", "127.0.0.1:0"),
            ("REDIS_URL", redis_url),
            ("MONGO_DB", mongo_db),
            ("LOG_FORMAT", "json"),
            // The shared MongoDB stand-in serves every test at once: on a busy
            // machine the production deadline (2 s) turns slowness into 503s
            // that tests of other things would trip over. Tests of deadlines
            // set their own.
            ("MONGO_TIMEOUT_MS", "10000"),
        ]);
        vars.insert(
            "INSTANCE_ID".into(),
            format!("testkit-{}", std::process::id()),
        );
        if !overrides.contains_key("MONGO_URI") {
            vars.insert("MONGO_URI".into(), testkit::mongo_uri());
        }
        vars.extend(overrides);
        let settings = settings::load_from(settings::Defaults::API, vars)?;
        let app = Application::build(settings).await?;
        let addr = app.local_addr();
        let state = app.state().clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(app.run(shutdown.clone()));
        // The follower empties the near cache on its first subscription;
        // wait for it (briefly: Redis may be down on purpose) so what a test
        // caches right after start stays cached.
        if let Some(status) = state.invalidation.clone() {
            let started = std::time::Instant::now();
            while !status
                .lock()
                .map(|s| s.subscribed && s.last_stream_id.is_some())
                .unwrap_or(true)
                && started.elapsed() < Duration::from_secs(5)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            addr,
            client,
            state,
            shutdown,
            task: Some(task),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `base_url()` + `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url())
    }

    /// An HTTP client for the service; it does not follow redirects, so
    /// tests see them.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The service's shared state (its tiers, store and settings), for
    /// arranging cache contents directly.
    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub async fn get(&self, path: &str) -> Reply {
        Reply::of(self.client.get(self.url(path))).await
    }

    /// POSTs `body` as JSON.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        Reply::of(self.client.post(self.url(path)).json(body)).await
    }

    /// POSTs `body` as it is, with `content-type: application/json`.
    pub async fn post_text(&self, path: &str, body: impl Into<String>) -> Reply {
        let request = self
            .request(reqwest::Method::POST, path)
            .header("content-type", "application/json")
            .body(body.into());
        self.send(request).await
    }

    pub async fn delete(&self, path: &str) -> Reply {
        Reply::of(self.client.delete(self.url(path))).await
    }

    /// A request to `path` with any method, to finish and [`send`](Self::send).
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path))
    }

    /// Sends any request, e.g. `api.send(api.request(Method::PUT, "/x"))`.
    pub async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        Reply::of(request).await
    }

    /// Stops the service gracefully and returns how `run_until` ended.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => match tokio::time::timeout(Duration::from_secs(15), task).await {
                Ok(joined) => joined?,
                Err(_) => anyhow::bail!("cache-api did not stop within 15 s"),
            },
            None => Ok(()),
        }
    }
}

impl Drop for TestApi {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A response, read in full.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// Sends the request and reads the whole response. Panics on transport
    /// errors (the service is in-process: they are test failures).
    pub async fn of(request: reqwest::RequestBuilder) -> Self {
        let response = request.send().await.expect("request to cache-api failed");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("read response body").to_vec();
        Self {
            status,
            headers,
            body,
        }
    }

    /// The body as JSON; panics (showing the body) when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|err| {
            panic!(
                "response (status {}) is not JSON ({err}): {}",
                self.status,
                self.text()
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts an error answer: `status`, a JSON body with this `code` and a
    /// non-empty `error` message. Returns the body for further checks.
    pub fn expect_error(&self, status: u16, code: &str) -> Value {
        assert_eq!(
            self.status,
            status,
            "unexpected status; body: {}",
            self.text()
        );
        let body = self.json();
        assert_eq!(body["code"], code, "unexpected error code: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "error message missing: {body}"
        );
        assert!(
            self.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "error is not served as JSON: {:?}",
            self.headers
        );
        body
    }

    /// A header as a string, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The setting that turns the near cache off, for tests of the Redis tier.
pub const NEAR_OFF: (&str, &str) = ("LOCAL_CACHE_ENABLED", "false");

/// A [`TestRedis`], a [`TestDb`] and a [`TestApi`] using both.
pub struct TestStack {
    pub redis: TestRedis,
    pub db: TestDb,
    pub api: TestApi,
    /// The MongoDB stand-in of this test's own, if it has one.
    pub own_mongo: Option<TestMongo>,
}

impl TestStack {
    /// Starts all three; `prefix` names the database, `overrides` are extra
    /// settings of the API (e.g. `("LOCAL_CACHE_ENABLED", "false")`).
    pub async fn start(prefix: &str, overrides: &[(&str, &str)]) -> Self {
        let redis = TestRedis::start().await;
        let db = TestDb::new(prefix).await;
        let api = TestApi::start(&redis.url(), db.name(), env(overrides)).await;
        Self {
            redis,
            db,
            api,
            own_mongo: None,
        }
    }

    /// As [`TestStack::start`], on a MongoDB stand-in of the test's own,
    /// started with `mongo_args` and reached with `uri_options` added to its
    /// URI (`&name=value…`): for server flags the shared one lacks (fail
    /// points), client options (a write concern), or work heavy enough
    /// (16 MiB documents) to hold up the shared one's other clients.
    pub async fn start_on_own_mongo(
        prefix: &str,
        mongo_args: &[&str],
        uri_options: &str,
        overrides: &[(&str, &str)],
    ) -> Self {
        let mongo = TestMongo::start(mongo_args).await;
        let redis = TestRedis::start().await;
        let db = TestDb::on(mongo.client().await, prefix).await;
        let uri = format!("{}{uri_options}", mongo.uri());
        let mut settings = vec![("MONGO_URI", uri.as_str())];
        settings.extend_from_slice(overrides);
        let api = TestApi::start(&redis.url(), db.name(), env(&settings)).await;
        Self {
            redis,
            db,
            api,
            own_mongo: Some(mongo),
        }
    }

    /// The stand-in of [`TestStack::start_on_own_mongo`].
    pub fn own_mongo(&self) -> &TestMongo {
        self.own_mongo
            .as_ref()
            .expect("a stack started with start_on_own_mongo")
    }

    /// Writes a new customer's features through the API: the stored
    /// document, as the write answered (201).
    pub async fn create(&self, id: &str, features: Value) -> Value {
        let reply = self.write_reply(id, features).await;
        assert_eq!(reply.status, 201, "{}", reply.text());
        reply.json()
    }

    /// Writes a customer's features through the API, new or not: the stored
    /// document.
    pub async fn upsert(&self, id: &str, features: Value) -> Value {
        let reply = self.write_reply(id, features).await;
        assert!(matches!(reply.status, 200 | 201), "{}", reply.text());
        reply.json()
    }

    async fn write_reply(&self, id: &str, features: Value) -> Reply {
        let body = serde_json::json!({"customer_id": id, "features": features});
        self.api.post("/api/features/", &body).await
    }

    /// Removes the key's Redis entry behind the API's back (as eviction
    /// does); whether there was one.
    pub async fn drop_from_redis(&self, id: &str) -> bool {
        use redis::AsyncCommands;
        let removed: i64 = self
            .redis_conn()
            .await
            .del(format!("features:{id}"))
            .await
            .expect("DEL in the test's Redis");
        removed == 1
    }

    /// The `_id`s of the stored documents, sorted.
    pub async fn stored_ids(&self) -> Vec<String> {
        self.db
            .all_features()
            .await
            .iter()
            .map(|d| d.get_str("_id").expect("a string _id").to_owned())
            .collect()
    }

    /// A connection to this test's Redis.
    pub async fn redis_conn(&self) -> redis::aio::MultiplexedConnection {
        self.redis.client().await
    }

    /// Stops the API, drops the database and stops Redis.
    pub async fn finish(self) {
        let Self {
            mut redis,
            db,
            api,
            own_mongo,
        } = self;
        if let Err(err) = api.shutdown().await {
            eprintln!("testkit: cache-api shut down with an error: {err:#}");
        }
        match own_mongo {
            Some(mut mongo) => mongo.stop(),
            None => db.drop_db().await,
        }
        redis.stop();
    }
}
