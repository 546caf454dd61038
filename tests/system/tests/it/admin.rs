//! The admin API and `cachectl inspect/evict/replicas` on real processes:
//! one key seen in MongoDB, Redis and both replicas' near caches (also when
//! a replica does not answer), an eviction that reaches every tier through
//! the invalidator, the heartbeats of the live replicas, and the `admin`
//! scope.

use serde_json::{Value, json};
use std::process::Output;
use std::time::{Duration, Instant};
use system_tests::{Cached, Deployment, LAG_BOUND, Options, POLL};
use testkit::services::{ServiceProcess, workspace_bin};

/// Settings of every process of these tests (the fan-out deadline is
/// generous: a loaded machine answers late, not never).
fn options(heartbeat_ms: u64) -> Options {
    Options {
        env: vec![
            ("HEARTBEAT_INTERVAL_MS".into(), heartbeat_ms.to_string()),
            ("ADMIN_FANOUT_TIMEOUT_MS".into(), "1500".into()),
        ],
        ..Options::default()
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("http client")
}

async fn get_json(replica: &ServiceProcess, path: &str) -> (u16, Value) {
    let response = http()
        .get(replica.url(path))
        .send()
        .await
        .unwrap_or_else(|err| panic!("GET {path}: {err}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn post_json(replica: &ServiceProcess, path: &str) -> (u16, Value) {
    let response = http()
        .post(replica.url(path))
        .send()
        .await
        .unwrap_or_else(|err| panic!("POST {path}: {err}"));
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The instance ids `/admin/replicas` lists, in order.
async fn listed(replica: &ServiceProcess) -> Vec<String> {
    let (status, body) = get_json(replica, "/admin/replicas").await;
    assert_eq!(status, 200, "{body}");
    body["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["instance_id"].as_str().expect("instance_id").to_owned())
        .collect()
}

/// Waits until `/admin/replicas` on `replica` lists exactly `expected`.
async fn until_listed(replica: &ServiceProcess, expected: &[&str], bound: Duration) {
    let started = Instant::now();
    loop {
        let ids = listed(replica).await;
        if ids == expected {
            return;
        }
        assert!(
            started.elapsed() < bound,
            "/admin/replicas lists {ids:?}, not {expected:?}, after {bound:?}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// Runs `cachectl` with `args`.
fn cachectl(args: &[&str]) -> Output {
    std::process::Command::new(workspace_bin("cachectl"))
        .args(args)
        .env_remove("CACHECTL_API_KEY")
        .output()
        .expect("cachectl runs")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "cachectl failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Evictions `replica` applied (`invalidation_messages_applied_total{op="evict"}`).
async fn evictions_applied(deployment: &Deployment, replica: &ServiceProcess) -> f64 {
    deployment
        .metric(
            replica,
            "invalidation_messages_applied_total",
            &[("op", "evict")],
        )
        .await
}

/// The replica entry of `instance_id` in an inspection.
fn near_entry<'a>(inspection: &'a Value, instance_id: &str) -> &'a Value {
    inspection["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .find(|r| r["instance_id"] == instance_id)
        .unwrap_or_else(|| panic!("{instance_id} missing from {inspection}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_inspect_shows_every_tier_and_lists_a_replica_that_does_not_answer() {
    // Heartbeats outlive the pause below: B stays live, so it must be named
    // silent rather than dropped.
    let mut deployment = Deployment::start("admin_inspect", options(2000)).await;
    let id = "inspect-1";
    let stored = deployment
        .post(&deployment.a, id, json!({"score": 7}))
        .await;
    let version = stored["version"].as_i64().expect("version");
    deployment.warm(&deployment.a, id).await;
    deployment.warm(&deployment.b, id).await;
    until_listed(&deployment.a, &["api-a", "api-b"], Duration::from_secs(10)).await;

    let (status, body) = get_json(&deployment.a, &format!("/admin/keys/{id}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["customer_id"], id);
    assert_eq!(body["mongodb"]["version"], version, "{body}");
    assert!(body["mongodb"]["calculated_at"].is_string(), "{body}");
    assert!(body["mongodb"]["expires_at"].is_string(), "{body}");
    assert_eq!(body["redis"]["kind"], "document", "{body}");
    assert_eq!(body["redis"]["version"], version, "{body}");
    let ttl_ms = body["redis"]["ttl_ms"].as_u64().expect("ttl_ms");
    assert!(
        ttl_ms > 0 && ttl_ms <= 604_800_000,
        "Redis TTL {ttl_ms} ms: {body}"
    );
    assert_eq!(body["redis"]["document"]["features"]["score"], 7, "{body}");
    for replica in ["api-a", "api-b"] {
        let near = near_entry(&body, replica);
        assert_eq!(near["entry"]["kind"], "document", "{body}");
        assert_eq!(near["entry"]["version"], version, "{body}");
        assert_eq!(near["entry"]["document"]["features"]["score"], 7, "{body}");
    }
    assert_eq!(body["silent_replicas"], json!([]), "{body}");

    // A key nobody holds: nothing anywhere, every replica still answers.
    let (status, absent) = get_json(&deployment.a, "/admin/keys/inspect-absent").await;
    assert_eq!(status, 200, "{absent}");
    assert_eq!(absent["mongodb"], Value::Null);
    assert_eq!(absent["redis"], Value::Null);
    assert_eq!(near_entry(&absent, "api-b")["entry"], Value::Null);
    // An invalid id is the usual 400.
    let (status, invalid) = get_json(&deployment.a, "/admin/keys/bad%20id").await;
    assert_eq!(status, 400, "{invalid}");
    assert_eq!(invalid["code"], "invalid_customer_id");

    // cachectl prints the same as a table, and the JSON with --json.
    let api = deployment.a.base_url();
    let table = stdout(&cachectl(&["inspect", id, "--api", &api]));
    println!("{table}");
    for expected in [
        "mongodb",
        "redis",
        "near api-a",
        "near api-b",
        "document",
        &version.to_string(),
    ] {
        assert!(table.contains(expected), "{expected} missing:\n{table}");
    }
    let printed: Value = serde_json::from_str(&stdout(&cachectl(&[
        "inspect", id, "--api", &api, "--json",
    ])))
    .expect("--json prints JSON");
    println!("{printed:#}");
    assert_eq!(printed["redis"]["version"], version);
    assert_eq!(printed["replicas"].as_array().map(Vec::len), Some(2));

    // B frozen: it cannot answer. The inspection still answers, within the
    // fan-out deadline, and names B.
    deployment.b.pause();
    let started = Instant::now();
    let (status, body) = get_json(&deployment.a, &format!("/admin/keys/{id}")).await;
    let took = started.elapsed();
    let table = cachectl(&["inspect", id, "--api", &api]);
    deployment.b.resume();
    let table = stdout(&table);
    println!("{table}");
    assert!(
        table.contains("near api-b") && table.contains("SILENT"),
        "{table}"
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["silent_replicas"], json!(["api-b"]), "{body}");
    assert_eq!(near_entry(&body, "api-a")["entry"]["version"], version);
    assert!(
        body["replicas"]
            .as_array()
            .is_some_and(|r| r.iter().all(|r| r["instance_id"] != "api-b")),
        "{body}"
    );
    assert!(
        took < Duration::from_secs(10),
        "the inspection waited {took:?} for a silent replica"
    );
    println!("inspection with a silent replica answered after {took:?}");
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_evict_removes_the_key_from_redis_and_every_near_cache() {
    let deployment = Deployment::start("admin_evict", options(500)).await;
    let id = "evict-1";
    deployment
        .post(&deployment.a, id, json!({"score": 1}))
        .await;
    deployment.warm(&deployment.a, id).await;
    deployment.warm(&deployment.b, id).await;
    assert!(matches!(
        deployment.cached(id).await,
        Cached::Document { .. }
    ));
    let before = [
        evictions_applied(&deployment, &deployment.a).await,
        evictions_applied(&deployment, &deployment.b).await,
    ];

    let (status, body) = post_json(&deployment.a, &format!("/admin/keys/{id}/evict")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["handled"], true, "{body}");
    assert_eq!(body["customer_id"], id);
    assert!(body["request_id"].is_string(), "{body}");
    // Handled: the invalidator removed the Redis entry before saying so.
    assert_eq!(deployment.cached(id).await, Cached::Absent);

    // Both replicas apply the announcement (counted) and drop the entry.
    for (index, replica) in deployment.replicas().into_iter().enumerate() {
        let started = Instant::now();
        while evictions_applied(&deployment, replica).await < before[index] + 1.0 {
            assert!(
                started.elapsed() < LAG_BOUND,
                "{} did not apply the eviction",
                replica.name()
            );
            tokio::time::sleep(POLL).await;
        }
        let served = deployment.get(replica, id).await;
        assert_eq!(served.status, 200, "{}", served.body);
        assert_ne!(
            served.source(),
            Some("local"),
            "{} served the evicted key from its near cache",
            replica.name()
        );
    }
    let inv = &deployment.invalidators[0];
    assert_eq!(
        deployment
            .metric(inv, "invalidator_events_total", &[("op", "evict")])
            .await,
        1.0
    );

    // cachectl: a table, and --json.
    let api = deployment.b.base_url();
    let table = stdout(&cachectl(&["evict", id, "--api", &api]));
    println!("{table}");
    assert!(table.contains(id) && table.contains("yes"), "{table}");
    let printed: Value =
        serde_json::from_str(&stdout(&cachectl(&["evict", id, "--api", &api, "--json"])))
            .expect("--json prints JSON");
    assert_eq!(printed["handled"], true, "{printed}");

    // Invalid ids are refused before anything is queued.
    let (status, invalid) = post_json(&deployment.a, "/admin/keys/no%2Fslash/evict").await;
    assert_eq!(status, 400, "{invalid}");
    assert_eq!(invalid["code"], "invalid_customer_id");
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_the_invalidator_cannot_handle_in_time_is_accepted_and_handled_later() {
    let mut deployment = Deployment::start("admin_evict_late", options(500)).await;
    let id = "evict-late";
    deployment
        .post(&deployment.a, id, json!({"score": 1}))
        .await;
    deployment.warm(&deployment.b, id).await;
    deployment.inv().pause();
    let (status, body) = post_json(&deployment.a, &format!("/admin/keys/{id}/evict")).await;
    deployment.inv().resume();
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["handled"], false, "{body}");
    // Queued: once the invalidator leads again, it is handled, and B drops
    // its copy.
    let started = Instant::now();
    while evictions_applied(&deployment, &deployment.b).await < 1.0 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the queued eviction was never handled"
        );
        tokio::time::sleep(POLL).await;
    }
    let served = deployment.get(&deployment.b, id).await;
    assert_ne!(served.source(), Some("local"), "{}", served.body);
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_replicas_lists_the_heartbeats_and_drops_a_killed_replica() {
    let mut deployment = Deployment::start("admin_replicas", options(200)).await;
    let id = "replicas-1";
    deployment
        .post(&deployment.a, id, json!({"score": 1}))
        .await;
    // B: one read from Redis, then from its near cache.
    deployment.warm(&deployment.b, id).await;
    until_listed(&deployment.a, &["api-a", "api-b"], Duration::from_secs(10)).await;

    // B's heartbeat catches up with what it did.
    let started = Instant::now();
    let b = loop {
        let (_, body) = get_json(&deployment.a, "/admin/replicas").await;
        let b = body["replicas"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["instance_id"] == "api-b").cloned())
            .unwrap_or(Value::Null);
        // A beat between B's miss and its hit shows a ratio of 0: wait for
        // one after both.
        if b["near_entries"].as_u64() >= Some(1) && b["hit_ratio"].as_f64() > Some(0.0) {
            break b;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "B's heartbeat never showed its near cache: {b}"
        );
        tokio::time::sleep(POLL).await;
    };
    println!("{b:#}");
    assert_eq!(b["binary_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(b["subscribed"], true, "{b}");
    assert!(b["near_bytes"].as_u64() > Some(0), "{b}");
    assert!(b["uptime_ms"].as_u64() > Some(0), "{b}");
    assert!(b["started_at"].is_string(), "{b}");
    assert!(b["last_heartbeat_ms"].as_u64() > Some(0), "{b}");
    let ratio = b["hit_ratio"].as_f64().expect("hit_ratio");
    assert!(
        ratio > 0.0 && ratio < 1.0,
        "one hit, one miss at least: {b}"
    );
    // A's write was announced; B applied it.
    assert!(b["last_stream_id"].is_string(), "{b}");
    assert!(b["lag_ms"].is_u64(), "{b}");

    let api = deployment.a.base_url();
    let table = stdout(&cachectl(&["replicas", "--api", &api]));
    println!("{table}");
    assert!(
        table.contains("api-a") && table.contains("api-b"),
        "{table}"
    );
    let printed: Value =
        serde_json::from_str(&stdout(&cachectl(&["replicas", "--api", &api, "--json"])))
            .expect("--json prints JSON");
    assert_eq!(printed["replicas"].as_array().map(Vec::len), Some(2));

    // Killed: no clean exit, its heartbeat just expires.
    deployment.b.kill9();
    until_listed(&deployment.a, &["api-a"], Duration::from_secs(10)).await;
    deployment.finish().await;
}

#[tokio::test]
async fn the_admin_routes_need_the_admin_scope() {
    let redis = testkit::TestRedis::start().await;
    let db = testkit::unique_db("admin_scope");
    let reader = "reader-key-0123456789abcdef";
    let admin = "admin-key-0123456789abcdefg";
    let keys = format!("reader:features:read:{reader},ops:admin:{admin}");
    let env = [
        ("REDIS_URL", redis.url()),
        ("MONGO_URI", testkit::mongo_uri()),
        ("MONGO_DB", db),
        ("API_KEYS", keys),
        ("HEARTBEAT_INTERVAL_MS", "200".into()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let api = ServiceProcess::start(
        "api-admin-scope",
        &workspace_bin("cache-api"),
        &env,
        "/api/health/",
    )
    .await;
    let client = http();
    let status = |method: reqwest::Method, path: &str, key: Option<&str>| {
        let mut request = client.request(method, api.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move {
            let response = request.send().await.expect("request");
            let status = response.status().as_u16();
            let body: Value = response.json().await.unwrap_or(Value::Null);
            (status, body)
        }
    };
    for (method, path) in [
        (reqwest::Method::GET, "/admin/replicas"),
        (reqwest::Method::GET, "/admin/keys/C1"),
        (reqwest::Method::POST, "/admin/keys/C1/evict"),
    ] {
        let (code, body) = status(method.clone(), path, Some(reader)).await;
        assert_eq!(code, 403, "{method} {path} with features:read: {body}");
        assert_eq!(body["code"], "forbidden");
        let (code, _) = status(method.clone(), path, None).await;
        assert_eq!(code, 401, "{method} {path} without a key");
    }
    let (code, body) = status(reqwest::Method::GET, "/admin/replicas", Some(admin)).await;
    assert_eq!(code, 200, "{body}");

    // cachectl says why and fails.
    let refused = std::process::Command::new(workspace_bin("cachectl"))
        .args(["replicas", "--api", &api.base_url()])
        .env("CACHECTL_API_KEY", reader)
        .output()
        .expect("cachectl runs");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("403"), "{stderr}");
    let allowed = std::process::Command::new(workspace_bin("cachectl"))
        .args(["replicas", "--api", &api.base_url(), "--json"])
        .env("CACHECTL_API_KEY", admin)
        .output()
        .expect("cachectl runs");
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    // Unreachable: a clear error, non-zero.
    let unreachable = cachectl(&[
        "replicas",
        "--api",
        &format!("http://127.0.0.1:{}", testkit::process::free_port()),
    ]);
    assert!(!unreachable.status.success());
    let stderr = String::from_utf8_lossy(&unreachable.stderr);
    assert!(stderr.contains("cannot reach the API"), "{stderr}");
}
