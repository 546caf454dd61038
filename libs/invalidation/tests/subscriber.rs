//! The replica's subscriber against a real Redis, with this test playing the
//! invalidator (XADD + PUBLISH) and an attacker or a restarted Redis.

use feature_cache::{
    CachedDocument, Entry, NearCache, NearCacheConfig, RedisConfig, RedisTls, TtlPolicy,
};
use feature_store::FeatureDocument;
use invalidation::{
    Channels, ClusterTime, Invalidation, Op, Subscriber, SubscriberConfig, SubscriberStatus,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use testkit::TestRedis;

const CHANNEL: &str = "test:invalidations";
const STREAM: &str = "test:changes";

fn redis_config(redis: &TestRedis) -> RedisConfig {
    RedisConfig {
        url: redis.url(),
        tls: RedisTls::default(),
        cluster_nodes: Vec::new(),
        timeout: Duration::from_secs(2),
        ttl: TtlPolicy {
            document_ttl: Duration::from_secs(600),
            marker_ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(5),
        },
    }
}

struct Replica {
    near: Arc<NearCache>,
    status: Arc<Mutex<SubscriberStatus>>,
    redis: redis::aio::MultiplexedConnection,
    _task: tokio::task::JoinHandle<()>,
}

impl Replica {
    async fn start(redis: &TestRedis) -> Self {
        let near = Arc::new(NearCache::new(&NearCacheConfig {
            max_entries: 1000,
            max_bytes: 64 << 20,
            ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(5),
        }));
        let config = redis_config(redis);
        let connection = config.connection().unwrap();
        let subscriber = Subscriber::new(
            SubscriberConfig {
                redis: config,
                channels: Channels {
                    channel: CHANNEL.into(),
                    stream: STREAM.into(),
                    stream_maxlen: 1000,
                    position: "test:position".into(),
                    partitions: 1,
                    cluster: false,
                },
                check_interval: Duration::from_millis(100),
            },
            Arc::clone(&near),
            connection,
        );
        let status = subscriber.status();
        let task = tokio::spawn(subscriber.run(tokio_util::sync::CancellationToken::new()));
        let replica = Self {
            near,
            status,
            redis: redis.client().await,
            _task: task,
        };
        replica
            .until("subscribed", |r| {
                r.status.lock().unwrap().subscribed
                    && r.status.lock().unwrap().last_stream_id.is_some()
            })
            .await;
        replica
    }

    fn cache(&self, id: &str) {
        let doc: FeatureDocument = serde_json::from_value(serde_json::json!({
            "version": 1, "customer_id": id, "features": {},
            "calculated_at": "2026-01-01T00:00:00.000Z", "model_version": "v1",
        }))
        .unwrap();
        assert!(
            self.near
                .offer(Entry::Document(CachedDocument::from_document(&doc)))
        );
    }

    fn holds(&self, id: &str) -> bool {
        self.near.get(id).is_some()
    }

    /// Appends a message to the stream (with `id`, or `*`) and publishes it.
    async fn announce(&mut self, id: &str, run: &str, seq: u64, customer: &str) -> String {
        let message = message(run, seq, customer, None);
        let stream_id: String = redis::cmd("XADD")
            .arg(STREAM)
            .arg(id)
            .arg("message")
            .arg(serde_json::to_string(&message).unwrap())
            .query_async(&mut self.redis)
            .await
            .unwrap();
        self.publish(&Invalidation {
            stream_id: Some(stream_id.clone()),
            ..message
        })
        .await;
        stream_id
    }

    async fn publish(&mut self, message: &Invalidation) {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(CHANNEL)
            .arg(serde_json::to_string(message).unwrap())
            .query_async(&mut self.redis)
            .await
            .unwrap();
    }

    async fn until(&self, what: &str, done: impl Fn(&Self) -> bool) {
        let started = Instant::now();
        while !done(self) {
            assert!(started.elapsed() < Duration::from_secs(5), "never: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn message(run: &str, seq: u64, customer: &str, stream_id: Option<String>) -> Invalidation {
    Invalidation {
        customer_id: Some(customer.into()),
        op: Op::Update,
        version: 2,
        cluster_time: ClusterTime { t: 0, i: 0 },
        seq,
        run_id: run.into(),
        traceparent: None,
        ordered: false,
        stream_id,
    }
}

#[tokio::test]
async fn a_forged_stream_id_does_not_silence_a_replica() {
    let redis = TestRedis::start().await;
    let mut replica = Replica::start(&redis).await;
    replica.cache("A");
    replica.announce("*", "run", 1, "A").await;
    replica.until("A dropped", |r| !r.holds("A")).await;

    // Someone who can publish sends the next message with a far-future id.
    replica
        .publish(&message("run", 2, "X", Some("99999999999999-0".into())))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Real changes after it are not lost on this replica.
    replica.cache("B");
    replica.announce("*", "run", 2, "B").await;
    replica.until("B dropped", |r| !r.holds("B")).await;
    replica.cache("C");
    replica.announce("*", "run", 3, "C").await;
    replica.until("C dropped", |r| !r.holds("C")).await;
}

#[tokio::test]
async fn a_stream_made_again_with_lower_ids_is_noticed() {
    let redis = TestRedis::start().await;
    let mut replica = Replica::start(&redis).await;
    // The stream has reached ids far ahead (a server clock that ran ahead).
    replica.announce("5000000000000-0", "old-run", 1, "A").await;
    replica
        .until("applied", |r| {
            r.status.lock().unwrap().last_stream_id.as_deref() == Some("5000000000000-0")
        })
        .await;

    // Redis comes back without it (a restart, a failover): new ids are lower.
    replica.cache("D");
    let _: i64 = redis::cmd("DEL")
        .arg(STREAM)
        .query_async(&mut replica.redis)
        .await
        .unwrap();
    replica.announce("*", "new-run", 1, "D").await;
    replica.until("D dropped", |r| !r.holds("D")).await;
    // And it follows the new stream from there on.
    replica.cache("E");
    replica.announce("*", "new-run", 2, "E").await;
    replica.until("E dropped", |r| !r.holds("E")).await;
}
