//! A whole deployment per test, as real processes: a `redis-server` of the
//! test's own, a database of its own (on the test bed's SecantusDB, or on a
//! server the test started), one or more `cache-invalidator`s and two
//! `cache-api` replicas (A and B) with their near caches on. Plus the
//! helpers every scenario needs: reads and writes through a replica, writes
//! straight into MongoDB with the driver (as another tool would), what Redis
//! holds, and the check that every tier agrees with MongoDB.
//!
//! With [`Options::cluster`] the deployment runs on a Redis Cluster of its
//! own ([`TestRedisCluster`]) instead: every process gets
//! `REDIS_CLUSTER_NODES` (and no `REDIS_URL`), and the deployment's own
//! Redis reads go through a cluster connection.
#![allow(dead_code)] // each test binary uses a different part

use bson::{Bson, Document, doc};
use feature_store::codec;
use mongodb::Collection;
use mongodb::options::ReturnDocument;
use serde_json::{Map, Value, json};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use testkit::redis_cluster::key_slot_of;
use testkit::services::{ServiceProcess, workspace_bin};
use testkit::{TestRedis, TestRedisCluster};

/// How long a change may take to reach every tier of every replica.
pub const LAG_BOUND: Duration = Duration::from_secs(5);
/// The collection the services use by default.
pub const COLLECTION: &str = "customer_features";
/// How long [`Deployment::post`] keeps retrying a write MongoDB was too
/// busy for (a loaded CI machine), before it counts as a failure.
pub const WRITE_RETRY_BOUND: Duration = Duration::from_secs(20);
/// Poll interval of the checks.
pub const POLL: Duration = Duration::from_millis(25);

pub struct Options {
    pub invalidators: usize,
    pub lease_ms: u64,
    /// Another MongoDB than the test bed's (`MONGO_URI`).
    pub mongo_uri: Option<String>,
    /// Extra settings of every process. `{redis_port}` in a value becomes
    /// the deployment's Redis port (e.g. a `REDIS_URL` with an ACL user).
    pub env: Vec<(String, String)>,
    /// Extra settings of the invalidators only (win over `env`; same
    /// `{redis_port}` substitution).
    pub invalidator_env: Vec<(String, String)>,
    /// Extra flags of the deployment's `redis-server` (single Redis only).
    pub redis_args: Vec<String>,
    /// Run on a Redis Cluster of this shape instead of a single Redis.
    pub cluster: Option<ClusterShape>,
    /// `INVALIDATION_PARTITIONS` of every process (unset: the default, 1).
    pub partitions: Option<u32>,
}

/// The size of a deployment's Redis Cluster.
#[derive(Debug, Clone, Copy)]
pub struct ClusterShape {
    pub masters: usize,
    pub replicas_per_master: usize,
}

impl Default for ClusterShape {
    /// 3 masters with a replica each: the smallest cluster that survives a
    /// master's loss.
    fn default() -> Self {
        Self {
            masters: 3,
            replicas_per_master: 1,
        }
    }
}

/// The deployment's Redis: one server, or a cluster.
pub enum DeploymentRedis {
    Single(TestRedis),
    Cluster(TestRedisCluster),
}

impl DeploymentRedis {
    /// The single server; panics on a cluster deployment (the single-Redis
    /// operations below do too).
    pub fn single(&self) -> &TestRedis {
        match self {
            Self::Single(redis) => redis,
            Self::Cluster(_) => panic!("a single-Redis operation on a cluster deployment"),
        }
    }

    pub fn single_mut(&mut self) -> &mut TestRedis {
        match self {
            Self::Single(redis) => redis,
            Self::Cluster(_) => panic!("a single-Redis operation on a cluster deployment"),
        }
    }

    /// The cluster; panics on a single-Redis deployment.
    pub fn cluster(&self) -> &TestRedisCluster {
        match self {
            Self::Cluster(cluster) => cluster,
            Self::Single(_) => panic!("a cluster operation on a single-Redis deployment"),
        }
    }

    pub fn cluster_mut(&mut self) -> &mut TestRedisCluster {
        match self {
            Self::Cluster(cluster) => cluster,
            Self::Single(_) => panic!("a cluster operation on a single-Redis deployment"),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// See [`TestRedis::url`].
    pub fn url(&self) -> String {
        self.single().url()
    }

    /// See [`TestRedis::port`].
    pub fn port(&self) -> u16 {
        self.single().port()
    }

    /// See [`TestRedis::client`].
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        self.single().client().await
    }

    /// See [`TestRedis::stop`].
    pub fn stop(&mut self) {
        self.single_mut().stop();
    }

    /// See [`TestRedis::restart`].
    pub async fn restart(&mut self) {
        self.single_mut().restart().await;
    }

    /// See [`TestRedis::is_running`].
    pub fn is_running(&mut self) -> bool {
        self.single_mut().is_running()
    }
}

/// The deployment's own connection: reconnects by itself (tests restart a
/// single Redis), or follows the cluster's redirections.
#[derive(Clone)]
enum RedisConn {
    Single(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl RedisConn {
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self.clone() {
            Self::Single(mut conn) => cmd.query_async(&mut conn).await,
            Self::Cluster(mut conn) => cmd.query_async(&mut conn).await,
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            invalidators: 1,
            lease_ms: 1000,
            mongo_uri: None,
            env: Vec::new(),
            invalidator_env: Vec::new(),
            redis_args: Vec::new(),
            cluster: None,
            partitions: None,
        }
    }
}

/// The deployment of one test. Dropping it kills every process.
pub struct Deployment {
    // Declared first so they drop (and print their log tails on a failure)
    // before Redis goes away.
    pub invalidators: Vec<ServiceProcess>,
    pub a: ServiceProcess,
    pub b: ServiceProcess,
    pub redis: DeploymentRedis,
    pub mongo: mongodb::Client,
    pub mongo_uri: String,
    pub db_name: String,
    http: reqwest::Client,
    redis_conn: RedisConn,
    /// Invalidation partitions (`INVALIDATION_PARTITIONS`).
    partitions: u32,
    /// What every process got, and the API binary, for replicas started later.
    base_env: Vec<(String, String)>,
    api_bin: PathBuf,
}

fn invalidator_bin() -> PathBuf {
    workspace_bin("cache-invalidator")
}

impl Deployment {
    /// Starts Redis, the invalidator(s) — waiting until one leads and has its
    /// change stream open — then replicas A and B, waiting until both follow
    /// the invalidation channel.
    pub async fn start(prefix: &str, options: Options) -> Self {
        let api_bin = workspace_bin("cache-api");
        let redis = match options.cluster {
            Some(shape) => DeploymentRedis::Cluster(
                TestRedisCluster::start(shape.masters, shape.replicas_per_master).await,
            ),
            None => {
                let redis_args: Vec<&str> = options.redis_args.iter().map(String::as_str).collect();
                DeploymentRedis::Single(TestRedis::start_with(&redis_args).await)
            }
        };
        let mongo_uri = options.mongo_uri.clone().unwrap_or_else(testkit::mongo_uri);
        let db_name = testkit::unique_db(prefix);
        let mongo = mongodb::Client::with_uri_str(&mongo_uri)
            .await
            .expect("mongodb client");
        testkit::mongo::create_feature_collection(&mongo, &db_name).await;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(16)
            .build()
            .expect("http client");
        let redis_conn = match &redis {
            DeploymentRedis::Single(single) => RedisConn::Single(
                redis::Client::open(single.url())
                    .expect("redis url")
                    .get_connection_manager()
                    .await
                    .expect("redis connection"),
            ),
            DeploymentRedis::Cluster(cluster) => RedisConn::Cluster(cluster.connection().await),
        };

        let lease = options.lease_ms.to_string();
        let (redis_var, redis_value, redis_port) = match &redis {
            DeploymentRedis::Single(single) => ("REDIS_URL", single.url(), single.port()),
            DeploymentRedis::Cluster(cluster) => {
                ("REDIS_CLUSTER_NODES", cluster.seeds(), cluster.ports()[0])
            }
        };
        let redis_port = redis_port.to_string();
        let partitions = options.partitions.unwrap_or(1);
        let partitions_value = partitions.to_string();
        let with_port = |vars: &[(String, String)]| -> Vec<(String, String)> {
            vars.iter()
                .map(|(k, v)| (k.clone(), v.replace("{redis_port}", &redis_port)))
                .collect()
        };
        let base: Vec<(String, String)> = [
            (redis_var, redis_value.as_str()),
            ("MONGO_URI", mongo_uri.as_str()),
            ("MONGO_DB", db_name.as_str()),
            ("LEADER_LEASE_MS", lease.as_str()),
        ]
        .into_iter()
        .chain(
            options
                .partitions
                .map(|_| ("INVALIDATION_PARTITIONS", partitions_value.as_str())),
        )
        .collect::<Vec<_>>()
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .chain(with_port(&options.env))
        .collect();

        let mut invalidators = Vec::new();
        for n in 0..options.invalidators {
            let mut env = base.clone();
            env.push(("INSTANCE_ID".into(), format!("inv-{n}")));
            env.extend(with_port(&options.invalidator_env));
            invalidators.push(
                start_service(&format!("inv-{n}"), &invalidator_bin(), &env, "/health").await,
            );
        }
        let mut apis = Vec::new();
        for name in ["a", "b"] {
            let mut env = base.clone();
            env.push(("INSTANCE_ID".into(), format!("api-{name}")));
            env.push(("LOCAL_CACHE_ENABLED".into(), "true".into()));
            apis.push(start_service(&format!("api-{name}"), &api_bin, &env, "/api/health/").await);
        }
        let b = apis.pop().expect("b");
        let a = apis.pop().expect("a");
        let deployment = Self {
            invalidators,
            a,
            b,
            redis,
            mongo,
            mongo_uri,
            db_name,
            http,
            redis_conn,
            partitions,
            base_env: base,
            api_bin,
        };
        if options.invalidators > 0 {
            deployment.wait_leading(Duration::from_secs(20)).await;
        }
        deployment.wait_subscribed(&deployment.a).await;
        deployment.wait_subscribed(&deployment.b).await;
        deployment
    }

    /// Stops every process, drops the database and closes the driver's
    /// connections (inside the runtime, so nothing is left to a runtime that
    /// is shutting down).
    pub async fn finish(self) {
        let Self {
            invalidators,
            a,
            b,
            redis,
            mongo,
            db_name,
            ..
        } = self;
        drop(invalidators);
        drop((a, b));
        if let Err(err) = mongo.database(&db_name).drop().await {
            eprintln!("could not drop database {db_name}: {err}");
        }
        mongo.shutdown().await;
        drop(redis);
    }

    /// Starts one more API replica (near cache on), ready once it serves
    /// HTTP — also while Redis is down; it is not waited on to subscribe.
    /// `extra` settings win over the deployment's.
    pub async fn start_replica(&self, name: &str, extra: &[(&str, &str)]) -> ServiceProcess {
        let mut env = self.base_env.clone();
        env.push(("INSTANCE_ID".into(), name.to_owned()));
        env.push(("LOCAL_CACHE_ENABLED".into(), "true".into()));
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        start_service(name, &self.api_bin, &env, "/api/info/").await
    }

    /// Starts one more invalidator (it stands by while another leads) and
    /// returns its index in `invalidators`. `extra` settings win over the
    /// deployment's.
    pub async fn start_invalidator(&mut self, name: &str, extra: &[(&str, &str)]) -> usize {
        let mut env = self.base_env.clone();
        env.push(("INSTANCE_ID".into(), name.to_owned()));
        env.extend(
            extra
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
        );
        let invalidator = start_service(name, &invalidator_bin(), &env, "/livez").await;
        self.invalidators.push(invalidator);
        self.invalidators.len() - 1
    }

    pub fn replicas(&self) -> [&ServiceProcess; 2] {
        [&self.a, &self.b]
    }

    pub fn inv(&mut self) -> &mut ServiceProcess {
        &mut self.invalidators[0]
    }

    // ----------------------------------------------------------- invalidator

    /// Sets a Redis key (to plant a state the test needs).
    pub async fn redis_set(&self, key: &str, value: &str) {
        let _: () = self
            .redis_conn
            .query(redis::cmd("SET").arg(key).arg(value))
            .await
            .expect("SET");
    }

    /// A numeric field of Redis's `INFO` (e.g. `evicted_keys`); 0 if
    /// absent. On a cluster, the sum over its masters.
    pub async fn redis_info_field(&self, name: &str) -> u64 {
        let field = |info: &str| -> u64 {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        match &self.redis {
            DeploymentRedis::Single(_) => {
                let info: String = self
                    .redis_conn
                    .query(&redis::cmd("INFO"))
                    .await
                    .expect("INFO");
                field(&info)
            }
            DeploymentRedis::Cluster(cluster) => {
                let mut sum = 0;
                for master in cluster.masters().await {
                    let info: String = redis::cmd("INFO")
                        .query_async(&mut cluster.node_client(master).await)
                        .await
                        .expect("INFO");
                    sum += field(&info);
                }
                sum
            }
        }
    }

    /// Whether the invalidation channel, stream and position are split into
    /// partitions with their own names (a cluster, or more than one).
    pub fn partitioned(&self) -> bool {
        self.redis.is_cluster() || self.partitions > 1
    }

    /// `INVALIDATION_PARTITIONS`.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The partition of a customer: its document key's slot mod P.
    pub fn partition_of(&self, id: &str) -> u32 {
        u32::from(key_slot_of(&format!("features:{id}"))) % self.partitions
    }

    /// `name` of partition `p` as the services name it: `name:{p<p>}`
    /// when partitioned, else `name` itself.
    fn partition_name(&self, name: String, partition: u32) -> String {
        if self.partitioned() {
            format!("{name}:{{p{partition}}}")
        } else {
            name
        }
    }

    /// The invalidation stream's key (the default for this collection).
    /// Single Redis, one partition only: see [`Deployment::stream_key_of`].
    pub fn stream_key(&self) -> String {
        assert!(
            !self.partitioned(),
            "a partitioned deployment: stream_key_of"
        );
        self.stream_key_of(0)
    }

    /// The stream of partition `p`.
    pub fn stream_key_of(&self, partition: u32) -> String {
        self.partition_name(
            format!("cache-invalidator:{}.{COLLECTION}:changes", self.db_name),
            partition,
        )
    }

    /// Every partition's stream.
    pub fn stream_keys(&self) -> Vec<String> {
        (0..self.partitions)
            .map(|p| self.stream_key_of(p))
            .collect()
    }

    /// The invalidation channel of partition `p`.
    pub fn channel_of(&self, partition: u32) -> String {
        self.partition_name("features:invalidations".to_owned(), partition)
    }

    /// The invalidator's Redis key of the saved resume token. Single Redis,
    /// one partition only: see [`Deployment::token_key_of`].
    pub fn token_key(&self) -> String {
        assert!(
            !self.partitioned(),
            "a partitioned deployment: token_key_of"
        );
        self.token_key_of(0)
    }

    /// The saved position of partition `p`.
    pub fn token_key_of(&self, partition: u32) -> String {
        self.partition_name(
            format!(
                "cache-invalidator:{}.{COLLECTION}:resume-token",
                self.db_name
            ),
            partition,
        )
    }

    /// Every partition's saved position.
    pub fn token_keys(&self) -> Vec<String> {
        (0..self.partitions).map(|p| self.token_key_of(p)).collect()
    }

    /// Whether some partition's position is saved (the change stream is
    /// open: later writes are seen).
    async fn position_saved(&self) -> bool {
        for key in self.token_keys() {
            if self
                .redis_get(&key)
                .await
                .is_some_and(|token| !token.is_empty())
            {
                return true;
            }
        }
        false
    }

    /// `/health` of an invalidator, `None` when it does not answer.
    pub async fn health(&self, inv: &ServiceProcess) -> Option<Value> {
        let response = self.http.get(inv.url("/health")).send().await.ok()?;
        response.json().await.ok()
    }

    pub async fn is_leader(&self, inv: &ServiceProcess) -> bool {
        self.health(inv)
            .await
            .is_some_and(|h| h["role"] == "leader")
    }

    /// Indexes of the invalidators that say they lead.
    pub async fn leaders(&self) -> Vec<usize> {
        let mut leaders = Vec::new();
        for (index, inv) in self.invalidators.iter().enumerate() {
            if self.is_leader(inv).await {
                leaders.push(index);
            }
        }
        leaders
    }

    /// Waits until some invalidator leads and has saved a resume token (its
    /// change stream is open: later writes are seen). Returns its index.
    pub async fn wait_leading(&self, timeout: Duration) -> usize {
        let started = Instant::now();
        loop {
            let leaders = self.leaders().await;
            if let [leader] = leaders[..]
                && self.position_saved().await
            {
                return leader;
            }
            assert!(
                started.elapsed() < timeout,
                "no invalidator leads with an open change stream after {timeout:?} (leaders: {leaders:?})"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// `GET /metrics` of an invalidator, parsed.
    pub async fn metrics(&self, inv: &ServiceProcess) -> Vec<testkit::prometheus::Sample> {
        let text = self
            .http
            .get(inv.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body");
        testkit::prometheus::parse(&text).expect("prometheus text")
    }

    pub async fn metric(&self, inv: &ServiceProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
        testkit::prometheus::sum(&self.metrics(inv).await, name, labels)
    }

    // ------------------------------------------------------------- replicas

    /// `GET /api/features/{id}/` through a replica.
    pub async fn get(&self, replica: &ServiceProcess, id: &str) -> Served {
        let response = self
            .http
            .get(replica.url(&format!("/api/features/{id}/")))
            .send()
            .await
            .unwrap_or_else(|err| panic!("GET {id} on {}: {err:?}", replica.name()));
        let status = response.status().as_u16();
        let body = response.bytes().await.expect("body");
        let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Served { status, body }
    }

    /// `POST /api/features/` through a replica; returns the stored document.
    /// A 503 ("MongoDB is busy, retry") is retried as a client honouring
    /// `Retry-After` would, for up to [`WRITE_RETRY_BOUND`]; any other
    /// failure panics at once.
    pub async fn post(&self, replica: &ServiceProcess, id: &str, features: Value) -> Value {
        let started = Instant::now();
        loop {
            match self.post_once(replica, id, &features).await {
                Ok(stored) => return stored,
                Err((Some(503), _)) if started.elapsed() < WRITE_RETRY_BOUND => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err((_, err)) => panic!("{err}"),
            }
        }
    }

    /// `POST /api/features/` through a replica; the stored document, or what
    /// went wrong.
    pub async fn http_post(
        &self,
        replica: &ServiceProcess,
        id: &str,
        features: Value,
    ) -> Result<Value, String> {
        self.post_once(replica, id, &features)
            .await
            .map_err(|(_, err)| err)
    }

    /// One POST: the stored document, or the status (if there was an
    /// answer) and what went wrong.
    async fn post_once(
        &self,
        replica: &ServiceProcess,
        id: &str,
        features: &Value,
    ) -> Result<Value, (Option<u16>, String)> {
        let response = self
            .http
            .post(replica.url("/api/features/"))
            .json(&json!({"customer_id": id, "features": features}))
            .send()
            .await
            .map_err(|err| (None, format!("POST {id} on {}: {err}", replica.name())))?;
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if matches!(status, 200 | 201) {
            Ok(body)
        } else {
            Err((
                Some(status),
                format!("POST {id} on {} answered {status}: {body}", replica.name()),
            ))
        }
    }

    /// `DELETE /api/features/{id}/` through a replica; returns the status.
    pub async fn delete(&self, replica: &ServiceProcess, id: &str) -> u16 {
        let response = self
            .http
            .delete(replica.url(&format!("/api/features/{id}/")))
            .send()
            .await
            .unwrap_or_else(|err| panic!("DELETE {id} on {}: {err}", replica.name()));
        let status = response.status().as_u16();
        assert!(
            matches!(status, 204 | 404),
            "DELETE {id} on {} answered {status}",
            replica.name()
        );
        status
    }

    /// `invalidation.follower` of `GET /api/info/`.
    pub async fn follower(&self, replica: &ServiceProcess) -> Value {
        let info: Value = self
            .http
            .get(replica.url("/api/info/"))
            .send()
            .await
            .expect("GET /api/info/")
            .json()
            .await
            .expect("info JSON");
        info["invalidation"]["follower"].clone()
    }

    pub async fn wait_subscribed(&self, replica: &ServiceProcess) {
        let started = Instant::now();
        while self.follower(replica).await["subscribed"] != true {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "{} did not subscribe to invalidations",
                replica.name()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `replica` serves `id` at `version` (at most
    /// [`LAG_BOUND`]; a replica may hold an older copy, or a cached 404, until
    /// the change's announcement reaches it).
    pub async fn wait_served(&self, replica: &ServiceProcess, id: &str, version: i64) {
        let started = Instant::now();
        loop {
            let served = self.get(replica, id).await;
            if served.version() == Some(version) {
                return;
            }
            assert!(
                started.elapsed() < LAG_BOUND,
                "{} still answers {} {} for {id} {:?} after a write of v{version}",
                replica.name(),
                served.status,
                served.body,
                started.elapsed()
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Reads `id` through `replica` until the near cache answers (at most a
    /// few reads); panics if it never does.
    pub async fn warm(&self, replica: &ServiceProcess, id: &str) -> Served {
        for _ in 0..5 {
            let served = self.get(replica, id).await;
            assert_eq!(
                served.status,
                200,
                "warm {id} on {}: {:?}",
                replica.name(),
                served.body
            );
            if served.source() == Some("local") {
                return served;
            }
        }
        panic!("{id} never came from {}'s near cache", replica.name());
    }

    // ------------------------------------------------------ MongoDB directly

    pub fn collection(&self) -> Collection<Document> {
        self.mongo.database(&self.db_name).collection(COLLECTION)
    }

    /// Inserts a document as another tool would: no `version`, no `trace`.
    pub async fn insert_unversioned(&self, id: &str, features: Value) {
        let now = chrono_now();
        self.collection()
            .insert_one(doc! {
                "_id": id,
                "customer_id": id,
                "features": to_bson_doc(&features),
                "calculated_at": now.0,
                "model_version": "tool-1",
                "expires_at": bson::DateTime::from_millis(now.1 + 86_400_000),
            })
            .await
            .expect("insert_one");
    }

    /// Replaces the features and advances the version the way the API does
    /// (`max(version + 1, now × 1000)`), creating the document if absent.
    /// Returns the new version.
    pub async fn write_versioned(&self, id: &str, features: Value) -> i64 {
        let now = chrono_now();
        let updated = self
            .collection()
            .find_one_and_update(
                doc! { "_id": id },
                vec![doc! { "$set": {
                    "customer_id": id,
                    "features": { "$literal": to_bson_doc(&features) },
                    "calculated_at": now.0,
                    "model_version": "tool-1",
                    "expires_at": bson::DateTime::from_millis(now.1 + 86_400_000),
                    "version": feature_store::version::next_version_expr(),
                } }],
            )
            .upsert(true)
            .return_document(ReturnDocument::After)
            .await
            .expect("find_one_and_update");
        match updated {
            Some(raw) => version_of(&raw),
            // The stand-in may not return the document of an upsert (see
            // TESTING.md, 2a); read it back.
            None => self.truth(id).await.map_or(0, |t| t.version),
        }
    }

    /// `$set` of one field without touching `version`. Returns the version
    /// the document has (unchanged), `None` when it does not exist.
    pub async fn set_unversioned(
        &self,
        id: &str,
        path: &str,
        value: impl Into<Bson>,
    ) -> Option<i64> {
        let mut set = Document::new();
        set.insert(path, value.into());
        self.collection()
            .find_one_and_update(doc! { "_id": id }, doc! { "$set": set })
            .return_document(ReturnDocument::After)
            .await
            .expect("find_one_and_update")
            .map(|raw| version_of(&raw))
    }

    /// Replaces the whole document with `document` (creating it if absent),
    /// as a restore or migration tool would: whatever `version` it carries.
    pub async fn replace_raw(&self, id: &str, document: Document) {
        self.collection()
            .replace_one(doc! { "_id": id }, document)
            .upsert(true)
            .await
            .expect("replace_one");
    }

    /// `$set` of the given fields, as another tool would (touching `version`
    /// only if `fields` does).
    pub async fn set_fields(&self, id: &str, fields: Document) {
        self.collection()
            .update_one(doc! { "_id": id }, doc! { "$set": fields })
            .await
            .expect("update_one");
    }

    /// A stored document as another tool would write it.
    pub fn raw_document(id: &str, customer_id: &str, features: Value, version: i64) -> Document {
        let now = chrono_now();
        doc! {
            "_id": id,
            "customer_id": customer_id,
            "features": to_bson_doc(&features),
            "calculated_at": now.0,
            "model_version": "tool-1",
            "expires_at": bson::DateTime::from_millis(now.1 + 86_400_000),
            "version": version,
        }
    }

    /// Deletes with the driver; returns the removed version.
    pub async fn delete_direct(&self, id: &str) -> Option<i64> {
        self.collection()
            .find_one_and_delete(doc! { "_id": id })
            .await
            .expect("find_one_and_delete")
            .map(|raw| version_of(&raw))
    }

    /// MongoDB's current document, as the services read it.
    pub async fn truth(&self, id: &str) -> Option<Truth> {
        let raw = self
            .collection()
            .find_one(doc! { "_id": id })
            .await
            .expect("find_one")?;
        let doc = codec::decode(&raw).expect("stored document");
        Some(Truth {
            version: doc.version,
            features: doc.features,
        })
    }

    // ----------------------------------------------------------------- Redis

    /// `GET key`; retried a few times, as the first command after a Redis
    /// restart fails while the connection is re-established.
    pub async fn redis_get(&self, key: &str) -> Option<String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.redis_conn.query(redis::cmd("GET").arg(key)).await {
                Ok(value) => return value,
                Err(err) if attempt >= 20 => panic!("redis GET {key}: {err}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Any command through the deployment's own connection (on a cluster,
    /// routed by its key and following redirections).
    pub async fn redis_query<T: redis::FromRedisValue>(
        &self,
        cmd: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        self.redis_conn.query(cmd).await
    }

    /// What Redis holds for a customer.
    pub async fn cached(&self, id: &str) -> Cached {
        let Some(raw) = self.redis_get(&format!("features:{id}")).await else {
            return Cached::Absent;
        };
        let value: Value = match serde_json::from_str(&raw) {
            Ok(value) => value,
            Err(_) => return Cached::Unreadable(raw),
        };
        let Some(version) = value["version"].as_i64() else {
            return Cached::Unreadable(raw);
        };
        if value["deleted"] == true {
            Cached::Tombstone(version)
        } else if value["fence"] == true {
            Cached::Fence(version)
        } else if value["absent"] == true {
            Cached::NotFound(version)
        } else if value["reserved"].is_string() {
            Cached::Reserved(version)
        } else {
            match value["features"].as_object() {
                Some(features) => Cached::Document {
                    version,
                    features: features.clone(),
                },
                None => Cached::Unreadable(raw),
            }
        }
    }

    /// Every `features:*` key of type string (cached documents and markers;
    /// the invalidation stream shares the prefix but is a stream). On a
    /// cluster, those of every master.
    pub async fn feature_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        match &self.redis {
            DeploymentRedis::Single(_) => {
                let RedisConn::Single(conn) = &self.redis_conn else {
                    unreachable!("a single Redis has a single connection")
                };
                scan_feature_keys(&mut conn.clone(), &mut keys).await;
            }
            DeploymentRedis::Cluster(cluster) => {
                for master in cluster.masters().await {
                    scan_feature_keys(&mut cluster.node_client(master).await, &mut keys).await;
                }
            }
        }
        keys.sort();
        keys
    }

    /// Kills every pub/sub connection (the replicas' subscriptions; on a
    /// cluster, on every live node). Returns how many were killed.
    pub async fn kill_pubsub_clients(&self) -> i64 {
        let mut kill = redis::cmd("CLIENT");
        kill.arg("KILL").arg("TYPE").arg("pubsub");
        match &self.redis {
            DeploymentRedis::Single(_) => self
                .redis_conn
                .query(&kill)
                .await
                .expect("CLIENT KILL TYPE pubsub"),
            DeploymentRedis::Cluster(cluster) => {
                let mut killed = 0;
                for port in cluster.live_ports() {
                    let count: i64 = kill
                        .query_async(&mut cluster.node_client(port).await)
                        .await
                        .expect("CLIENT KILL TYPE pubsub");
                    killed += count;
                }
                killed
            }
        }
    }

    // ----------------------------------------------------------- consistency

    /// Where Redis and the replicas disagree with MongoDB about `id`.
    ///
    /// Redis is consistent when it holds nothing, a marker (fence or
    /// tombstone: never served), or exactly MongoDB's document (same version
    /// and features); it must not hold a document when MongoDB has none,
    /// nor a cached absence when MongoDB has one. A
    /// replica is consistent when it serves MongoDB's document (same version
    /// and features), or 404 when there is none.
    pub async fn mismatches(&self, id: &str) -> Vec<String> {
        let truth = self.truth(id).await;
        let mut found = Vec::new();
        match (self.cached(id).await, &truth) {
            (Cached::Document { version, features }, Some(t))
                if version != t.version || features != t.features =>
            {
                found.push(format!(
                    "{id}: Redis holds v{version} {features:?}, MongoDB v{} {:?}",
                    t.version, t.features
                ));
            }
            (Cached::Document { version, .. }, None) => {
                found.push(format!(
                    "{id}: Redis holds v{version}, MongoDB has no document"
                ));
            }
            (Cached::NotFound(version), Some(t)) => {
                found.push(format!(
                    "{id}: Redis holds an absence (order {version}), MongoDB v{}",
                    t.version
                ));
            }
            (Cached::Unreadable(raw), _) => found.push(format!("{id}: Redis holds {raw:?}")),
            _ => {}
        }
        for replica in self.replicas() {
            let served = self.get(replica, id).await;
            match &truth {
                None if served.status == 404 => {}
                None => found.push(format!(
                    "{id}: {} answered {} {}, MongoDB has no document",
                    replica.name(),
                    served.status,
                    served.body
                )),
                Some(t) => {
                    if served.status != 200
                        || served.version() != Some(t.version)
                        || served.features() != Some(&t.features)
                    {
                        found.push(format!(
                            "{id}: {} answered {} v{:?} {:?} (source {:?}), MongoDB v{} {:?}",
                            replica.name(),
                            served.status,
                            served.version(),
                            served.features(),
                            served.source(),
                            t.version,
                            t.features
                        ));
                    }
                }
            }
        }
        found
    }

    /// Every mismatch of `ids`.
    pub async fn all_mismatches(&self, ids: &[String]) -> Vec<String> {
        let mut found = Vec::new();
        for id in ids {
            found.extend(self.mismatches(id).await);
        }
        found
    }

    /// Polls until Redis and both replicas agree with MongoDB on every key of
    /// `ids`; returns how long that took. Panics with the mismatches left
    /// after `timeout`.
    pub async fn wait_consistent(&self, ids: &[String], timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let found = self.all_mismatches(ids).await;
            if found.is_empty() {
                return started.elapsed();
            }
            if started.elapsed() >= timeout {
                panic!(
                    "{} of {} keys still disagree with MongoDB after {timeout:?}:\n{}",
                    found.len(),
                    ids.len(),
                    found.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Appends the `features:*` string keys of one server (SCAN).
async fn scan_feature_keys(conn: &mut impl redis::aio::ConnectionLike, keys: &mut Vec<String>) {
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("features:*")
            .arg("TYPE")
            .arg("string")
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN");
        keys.extend(batch);
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

async fn start_service(
    name: &str,
    bin: &std::path::Path,
    env: &[(String, String)],
    ready: &str,
) -> ServiceProcess {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    ServiceProcess::start(name, bin, &env, ready).await
}

/// A replica's answer to a read.
#[derive(Debug, Clone)]
pub struct Served {
    pub status: u16,
    pub body: Value,
}

impl Served {
    pub fn version(&self) -> Option<i64> {
        (self.status == 200)
            .then(|| self.body["version"].as_i64())
            .flatten()
    }

    pub fn features(&self) -> Option<&Map<String, Value>> {
        (self.status == 200)
            .then(|| self.body["features"].as_object())
            .flatten()
    }

    pub fn source(&self) -> Option<&str> {
        self.body["source"].as_str()
    }
}

/// MongoDB's current document of a customer.
#[derive(Debug, Clone, PartialEq)]
pub struct Truth {
    pub version: i64,
    pub features: Map<String, Value>,
}

/// A Redis entry of a customer.
#[derive(Debug, Clone, PartialEq)]
pub enum Cached {
    Absent,
    Document {
        version: i64,
        features: Map<String, Value>,
    },
    Fence(i64),
    Tombstone(i64),
    /// A fill's reservation (keeping the order of a marker it replaced):
    /// holds no document.
    Reserved(i64),
    /// A cached absence ("not found" as of that order), served as 404.
    NotFound(i64),
    Unreadable(String),
}

pub fn version_of(raw: &Document) -> i64 {
    match raw.get("version") {
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => i64::from(*v),
        _ => 0,
    }
}

pub fn to_bson_doc(features: &Value) -> Document {
    bson::to_document(features).expect("features are a JSON object")
}

/// Now as an RFC 3339 string with milliseconds and as epoch milliseconds.
fn chrono_now() -> (String, i64) {
    let now = chrono::Utc::now();
    (
        now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        now.timestamp_millis(),
    )
}

/// Milliseconds with one decimal, for the test output.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Customer ids `prefix-000` … for `n` keys.
pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:03}")).collect()
}

/// What [`Deployment::random_write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WriteKind {
    ApiA,
    ApiB,
    DirectVersioned,
    DirectUnversioned,
}

impl Deployment {
    /// One write of `id` as a mixed workload makes them: 70 % through a
    /// random replica's API, 20 % straight into MongoDB with a new version,
    /// 10 % a `$set` in MongoDB that leaves the version alone.
    pub async fn random_write(&self, rng: &mut impl rand::Rng, id: &str, n: u64) -> WriteKind {
        let roll = rng.random_range(0..10);
        match roll {
            0..=6 => {
                let (replica, kind) = if rng.random_bool(0.5) {
                    (&self.a, WriteKind::ApiA)
                } else {
                    (&self.b, WriteKind::ApiB)
                };
                self.post(replica, id, json!({"n": n, "via": "api"})).await;
                kind
            }
            7..=8 => {
                self.write_versioned(id, json!({"n": n, "via": "driver"}))
                    .await;
                WriteKind::DirectVersioned
            }
            _ => {
                self.set_unversioned(id, "features.m", n as i64).await;
                WriteKind::DirectUnversioned
            }
        }
    }
}
