//! The invalidator's batched pipeline, driven by its own benchmark
//! (`invalidator-feedbench`, a real process feeding the apply path a
//! synthetic change feed): in batches of hundreds of changes, each customer
//! changed many times per batch, every change lands in Redis and on its
//! partition's stream exactly once, each customer's changes in their order.

use std::collections::BTreeMap;
use std::process::Command;
use testkit::TestRedis;

/// What one stream entry says (the fields this test reads).
struct Announced {
    customer_id: String,
    version: i64,
    seq: u64,
}

async fn feed(redis: &TestRedis, db: &str, partitions: u32, batch: u32) -> u64 {
    let bin = testkit::services::workspace_bin("invalidator-feedbench");
    let out = Command::new(&bin)
        .args([
            "--batch",
            &batch.to_string(),
            "--seconds",
            "1",
            "--keys",
            "7",
        ])
        .args(["--rate", "20000"])
        .env("REDIS_URL", redis.url())
        // Never contacted: the synthetic feed needs no database.
        .env(
            "MONGO_URI",
            "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200",
        )
        .env("MONGO_DB", db)
        .env("INVALIDATION_PARTITIONS", partitions.to_string())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run invalidator-feedbench");
    assert!(
        out.status.success(),
        "invalidator-feedbench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no JSON report in {stdout}"));
    report["changes"].as_u64().expect("changes in the report")
}

/// Every entry of every stream in the database, stream by stream, in order.
async fn streams(redis: &TestRedis) -> BTreeMap<String, Vec<Announced>> {
    let mut conn = redis.client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:changes*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    let mut all = BTreeMap::new();
    for key in keys {
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("XRANGE");
        let announced = entries
            .into_iter()
            .map(|(_, fields)| {
                let (_, message) = fields.into_iter().next().expect("a field");
                let message: serde_json::Value =
                    serde_json::from_str(&message).expect("a JSON message");
                Announced {
                    customer_id: message["customer_id"].as_str().expect("id").to_owned(),
                    version: message["version"].as_i64().expect("version"),
                    seq: message["seq"].as_u64().expect("seq"),
                }
            })
            .collect();
        all.insert(key, announced);
    }
    all
}

async fn check(partitions: u32, batch: u32) {
    let redis = TestRedis::start().await;
    let fed = feed(
        &redis,
        &format!("batches_{partitions}_{batch}"),
        partitions,
        batch,
    )
    .await;
    assert!(fed > 1000, "only {fed} changes were fed");
    let streams = streams(&redis).await;
    assert_eq!(
        streams.len(),
        partitions as usize,
        "one stream per partition"
    );

    let mut last_version: BTreeMap<String, i64> = BTreeMap::new();
    let mut total = 0;
    for (stream, entries) in &streams {
        for (index, entry) in entries.iter().enumerate() {
            assert_eq!(entry.seq, index as u64 + 1, "{stream}: numbering");
            let previous = last_version.insert(entry.customer_id.clone(), entry.version);
            assert!(
                previous.is_none_or(|v| v < entry.version),
                "{stream}: {} announced at {} after {previous:?}",
                entry.customer_id,
                entry.version
            );
        }
        total += entries.len() as u64;
    }
    assert_eq!(total, fed, "every change announced once");

    let mut conn = redis.client().await;
    for (customer_id, version) in &last_version {
        let value: String = redis::cmd("GET")
            .arg(format!("features:{customer_id}"))
            .query_async(&mut conn)
            .await
            .expect("GET");
        let held: serde_json::Value = serde_json::from_str(&value).expect("JSON");
        assert_eq!(held["version"].as_i64(), Some(*version), "{customer_id}");
    }
    assert_eq!(last_version.len(), 7, "every customer written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_land_in_order_on_one_partition() {
    check(1, 256).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_land_in_order_on_three_partitions() {
    check(3, 200).await;
}
