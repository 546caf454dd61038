//! Transport security and store credentials, end to end with the real
//! binaries: `rediss://` with a private CA and client certificates, and the
//! least-privilege Redis ACL users of `deploy/redis/users.acl.template`
//! (with passwords that need percent-encoding in the URL).

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use system_tests::{Deployment, LAG_BOUND, Options, POLL};
use testkit::process::free_port;
use testkit::services::ServiceProcess;
use testkit::tls::TestCa;

/// A directory of the test's own under the system temp dir.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "transport-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Polls `replica` until what it serves for `id` passes `done`.
async fn until(
    deployment: &Deployment,
    replica: &ServiceProcess,
    id: &str,
    what: &str,
    done: impl Fn(u16, &Value) -> bool,
) {
    let started = Instant::now();
    loop {
        let served = deployment.get(replica, id).await;
        if done(served.status, &served.body) {
            return;
        }
        assert!(
            started.elapsed() < LAG_BOUND,
            "{}: {what} not seen for {id} within {LAG_BOUND:?}; last answer {} {}",
            replica.name(),
            served.status,
            served.body
        );
        tokio::time::sleep(POLL).await;
    }
}

/// The whole flow over whatever Redis transport and user the deployment
/// has: a write lands in Redis (B reads it from there), B's near cache
/// follows a write through A and a write straight into MongoDB (the
/// invalidator's change stream, fenced Redis writes and announcements), and
/// a delete.
async fn full_flow(deployment: &Deployment) {
    let (a, b) = (&deployment.a, &deployment.b);
    let id = "transport-1";
    deployment.post(a, id, json!({"score": 1})).await;
    let served = deployment.get(b, id).await;
    assert_eq!(served.status, 200, "{}", served.body);
    assert_eq!(
        served.source(),
        Some("redis"),
        "B reads A's write from Redis: {}",
        served.body
    );
    deployment.warm(b, id).await;
    // A batch read: one MGET on Redis for what the near cache lacks.
    let batch: Value = reqwest::Client::new()
        .post(a.url("/api/features/batch/"))
        .json(&json!({"customer_ids": [id, "transport-absent"]}))
        .send()
        .await
        .expect("POST batch")
        .json()
        .await
        .expect("batch JSON");
    assert_eq!(batch["found"][id]["features"]["score"], 1, "{batch}");
    assert_eq!(batch["missing"], json!(["transport-absent"]), "{batch}");

    deployment.post(a, id, json!({"score": 2})).await;
    until(deployment, b, id, "the write through A", |status, body| {
        status == 200 && body["features"]["score"] == 2
    })
    .await;

    deployment.write_versioned(id, json!({"score": 3})).await;
    until(
        deployment,
        b,
        id,
        "the write into MongoDB",
        |status, body| status == 200 && body["features"]["score"] == 3,
    )
    .await;
    let held = deployment
        .redis_get(&format!("features:{id}"))
        .await
        .unwrap_or_default();
    assert!(
        held.contains("\"score\":3"),
        "the invalidator refreshed Redis: {held}"
    );

    assert_eq!(deployment.delete(a, id).await, 204);
    until(deployment, b, id, "the delete", |status, _| status == 404).await;
}

/// The fleet view under the deployment's users: both replicas' heartbeats,
/// an inspection answered by both near caches (the fan-out's SUBSCRIBE and
/// PUBLISH), and an eviction the invalidator handles (the requests stream
/// and its position).
async fn admin_flow(deployment: &Deployment) {
    let (a, b) = (&deployment.a, &deployment.b);
    let http = reqwest::Client::new();
    let id = "transport-admin";
    deployment.post(a, id, json!({"score": 1})).await;
    deployment.warm(b, id).await;
    let started = Instant::now();
    loop {
        let replicas: Value = http
            .get(a.url("/admin/replicas"))
            .send()
            .await
            .expect("GET /admin/replicas")
            .json()
            .await
            .expect("replicas JSON");
        if replicas["replicas"].as_array().map(Vec::len) == Some(2) {
            break;
        }
        assert!(
            started.elapsed() < LAG_BOUND,
            "both replicas never listed: {replicas}"
        );
        tokio::time::sleep(POLL).await;
    }
    let inspection: Value = http
        .get(a.url(&format!("/admin/keys/{id}")))
        .send()
        .await
        .expect("GET /admin/keys")
        .json()
        .await
        .expect("inspection JSON");
    assert_eq!(inspection["silent_replicas"], json!([]), "{inspection}");
    assert_eq!(inspection["redis"]["kind"], "document", "{inspection}");
    assert_eq!(
        inspection["replicas"].as_array().map(Vec::len),
        Some(2),
        "{inspection}"
    );
    let evicted = http
        .post(a.url(&format!("/admin/keys/{id}/evict")))
        .send()
        .await
        .expect("POST evict");
    assert_eq!(evicted.status().as_u16(), 200);
    until(deployment, b, id, "the eviction", |status, body| {
        status == 200 && body["source"] != "local"
    })
    .await;
}

/// `CLIENT LIST` lines of every connection but the one asking.
async fn other_clients(deployment: &Deployment) -> Vec<String> {
    let mut conn = deployment.redis.client().await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .expect("CLIENT LIST");
    let me: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await
        .expect("CLIENT ID");
    list.lines()
        .filter(|line| !line.starts_with(&format!("id={me} ")))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_private_ca_and_client_certificates_end_to_end() {
    let dir = scratch("tls");
    let ca = TestCa::generate(&dir);
    let tls_port = free_port();
    let path = |p: PathBuf| p.display().to_string();
    let deployment = Deployment::start(
        "transport_tls",
        Options {
            // The server asks every client for a certificate of the CA.
            redis_args: testkit::redis::tls_args(&ca, tls_port, true),
            env: vec![
                (
                    "REDIS_URL".into(),
                    format!("rediss://127.0.0.1:{tls_port}/0"),
                ),
                ("REDIS_TLS_CA_FILE".into(), path(ca.ca_cert())),
                ("REDIS_TLS_CERT_FILE".into(), path(ca.client_cert())),
                ("REDIS_TLS_KEY_FILE".into(), path(ca.client_key())),
            ],
            ..Options::default()
        },
    )
    .await;

    full_flow(&deployment).await;

    // The services' connections came in through the TLS port: both
    // replicas' subscriptions (the invalidations and the admin channel) and
    // the command connections of the replicas and the invalidator. The plain
    // port (kept for this test's own checks) has only the harness's connection.
    let clients = other_clients(&deployment).await;
    let tls_local = format!("laddr=127.0.0.1:{tls_port} ");
    let (over_tls, plain): (Vec<_>, Vec<_>) =
        clients.iter().partition(|line| line.contains(&tls_local));
    let subscribers = over_tls.iter().filter(|l| l.contains(" sub=1 ")).count();
    assert_eq!(
        subscribers, 4,
        "both replicas subscribe over TLS: {clients:#?}"
    );
    assert!(
        over_tls.len() >= 5,
        "the replicas and the invalidator use TLS: {clients:#?}"
    );
    assert!(
        plain.len() <= 1,
        "a service connected without TLS: {clients:#?}"
    );

    // cachectl reads the same settings: its writes reach Redis over TLS.
    let output = tokio::process::Command::new(testkit::services::workspace_bin("cachectl"))
        .args(["populate", "--count", "3"])
        .env("REDIS_URL", format!("rediss://127.0.0.1:{tls_port}/0"))
        .env("REDIS_TLS_CA_FILE", path(ca.ca_cert()))
        .env("REDIS_TLS_CERT_FILE", path(ca.client_cert()))
        .env("REDIS_TLS_KEY_FILE", path(ca.client_key()))
        .env("MONGO_URI", &deployment.mongo_uri)
        .env("MONGO_DB", &deployment.db_name)
        .output()
        .await
        .expect("run cachectl");
    assert!(
        output.status.success(),
        "cachectl populate over rediss:// failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        deployment.redis_get("features:CUST00001").await.is_some(),
        "cachectl's write is not in Redis"
    );

    // A replica that trusts another CA does not talk to this Redis: the
    // server's certificate is verified.
    let stranger_ca = TestCa::generate(&dir.join("other"));
    let stranger = deployment
        .start_replica(
            "api-stranger",
            &[("REDIS_TLS_CA_FILE", &path(stranger_ca.ca_cert()))],
        )
        .await;
    let health = health(&stranger).await;
    assert_eq!(health["redis"]["available"], false, "{health}");

    drop(stranger);
    deployment.finish().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn health(replica: &ServiceProcess) -> Value {
    reqwest::Client::new()
        .get(replica.url("/api/health/"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("GET /api/health/")
        .json()
        .await
        .expect("health JSON")
}

/// Passwords with characters a URL must percent-encode (`@ : / % # ? &`).
const API_PASSWORD: &str = "api@p:ss/w%rd#?&1";
const INVALIDATOR_PASSWORD: &str = "inv@p:ss/w%rd#?&2";

/// Every byte but the URL's unreserved ones as `%XX` (RFC 3986).
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(byte).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Reads make it into the hot-key record (its script runs as the API's user).
async fn hot_record_written(deployment: &Deployment) {
    let id = "transport-hot";
    deployment
        .post(&deployment.a, id, json!({"score": 1}))
        .await;
    // Each read is sampled with probability 1/8: 200 reads are surely seen.
    for _ in 0..200 {
        deployment.get(&deployment.a, id).await;
    }
    let key = format!(
        "cache-invalidator:{}.{}:hot",
        deployment.db_name,
        system_tests::COLLECTION
    );
    let mut admin = deployment.redis.client().await;
    let started = Instant::now();
    loop {
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(&key)
            .arg(id)
            .query_async(&mut admin)
            .await
            .expect("ZSCORE");
        if score.is_some_and(|score| score > 0.0) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the hot-key record never counted {id}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `deploy/redis/users.acl.template` rendered as compose renders it, except
/// the `default` user, which stays open here for the test's own probes and
/// checks (the services never use it).
fn render_acl(dir: &Path) -> PathBuf {
    let template =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/redis/users.acl.template");
    let text = std::fs::read_to_string(&template).expect("ACL template");
    let mut lines: Vec<String> = text
        .lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .filter(|line| !line.starts_with("user default "))
        .map(|line| {
            line.replace("${REDIS_API_PASSWORD}", API_PASSWORD)
                .replace("${REDIS_INVALIDATOR_PASSWORD}", INVALIDATOR_PASSWORD)
                .replace("${REDIS_ADMIN_PASSWORD}", "admin-test")
        })
        .collect();
    assert!(
        lines.iter().all(|line| !line.contains("${")),
        "unrendered placeholder: {lines:#?}"
    );
    lines.push("user default on nopass ~* &* +@all".into());
    let path = dir.join("users.acl");
    std::fs::write(&path, lines.join("\n") + "\n").expect("write ACL file");
    path
}

/// Whether Redis refused a command for the user's lack of permission (NOPERM).
fn no_permission(err: &redis::RedisError) -> bool {
    err.to_string().to_lowercase().contains("noperm")
}

/// A connection as `user`, or the error of the first command.
async fn run_as(
    port: u16,
    user: &str,
    password: &str,
    command: &[&str],
) -> redis::RedisResult<redis::Value> {
    let url = format!(
        "redis://{}:{}@127.0.0.1:{port}/0",
        percent_encode(user),
        percent_encode(password)
    );
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    redis::cmd(command[0])
        .arg(&command[1..])
        .query_async(&mut conn)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_privilege_acl_users_run_the_whole_flow_and_nothing_more() {
    let dir = scratch("acl");
    let acl = render_acl(&dir);
    let url = |user: &str, password: &str| {
        format!(
            "redis://{user}:{}@127.0.0.1:{{redis_port}}/0",
            percent_encode(password)
        )
    };
    let deployment = Deployment::start(
        "transport_acl",
        Options {
            redis_args: vec!["--aclfile".into(), acl.display().to_string()],
            env: vec![("REDIS_URL".into(), url("cache-api", API_PASSWORD))],
            invalidator_env: vec![(
                "REDIS_URL".into(),
                url("cache-invalidator", INVALIDATOR_PASSWORD),
            )],
            ..Options::default()
        },
    )
    .await;

    full_flow(&deployment).await;
    hot_record_written(&deployment).await;
    admin_flow(&deployment).await;

    // Each service is connected as its own user, and none of them was ever
    // refused a command (ACL LOG records every denial, also ones a service
    // would shrug off, like a health check's INFO).
    let clients = other_clients(&deployment).await;
    for user in ["cache-api", "cache-invalidator"] {
        assert!(
            clients
                .iter()
                .any(|line| line.contains(&format!(" user={user} "))),
            "no connection as {user}: {clients:#?}"
        );
    }
    // The harness's own connection is the only one as the default user.
    let as_default = clients
        .iter()
        .filter(|line| line.contains(" user=default "))
        .count();
    assert!(
        as_default <= 1,
        "a service connected as the default user: {clients:#?}"
    );
    let mut admin = deployment.redis.client().await;
    let denials: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut admin)
        .await
        .expect("ACL LOG");
    assert!(
        denials.is_empty(),
        "the services were refused commands: {denials:#?}"
    );

    // And nothing beyond what they need.
    let port = deployment.redis.port();
    for (user, password) in [
        ("cache-api", API_PASSWORD),
        ("cache-invalidator", INVALIDATOR_PASSWORD),
    ] {
        for command in [
            &["FLUSHALL"][..],
            &["CONFIG", "GET", "*"],
            &["KEYS", "*"],
            &["GET", "some-other-app:secret"],
            &["ACL", "LIST"],
            &["CLIENT", "LIST"],
            &["SCRIPT", "FLUSH"],
        ] {
            let result = run_as(port, user, password, command).await;
            let err = result.expect_err(&format!("{user} may run {command:?}"));
            assert!(no_permission(&err), "{user} {command:?}: {err}");
        }
    }
    // The API only reads the invalidators' stream; it cannot move their
    // lease or resume token.
    let refused = run_as(
        port,
        "cache-api",
        API_PASSWORD,
        &["SET", &deployment.token_key(), "forged"],
    )
    .await
    .expect_err("cache-api may write the resume token");
    assert!(no_permission(&refused), "{refused}");
    // A wrong password is refused too.
    let refused = run_as(port, "cache-api", "wrong", &["PING"])
        .await
        .expect_err("a wrong password is accepted");
    assert!(
        refused.to_string().contains("authentication failed"),
        "{refused}"
    );

    // Credentials never reach the logs, not even the errors of a replica
    // whose Redis password is wrong and whose MongoDB does not answer.
    let redis_secret = "wrong-s3cret-pw";
    let mongo_secret = "mongo-s3cret-pw";
    let bad = deployment
        .start_replica(
            "api-bad-credentials",
            &[
                (
                    "REDIS_URL",
                    &format!("redis://cache-api:{redis_secret}@127.0.0.1:{port}/0"),
                ),
                (
                    "MONGO_URI",
                    &format!(
                        "mongodb://app:{mongo_secret}@127.0.0.1:{}/?directConnection=true",
                        free_port()
                    ),
                ),
                ("MONGO_TIMEOUT_MS", "300"),
            ],
        )
        .await;
    let http = reqwest::Client::new();
    let started = Instant::now();
    loop {
        // A miss needs both stores: each failure is logged.
        let _ = http.get(bad.url("/api/features/nobody/")).send().await;
        let _ = http.get(bad.url("/api/health/")).send().await;
        let log = bad.log_text();
        if log.contains("MongoDB is unavailable") && log.contains("Password authentication failed")
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the store failures were not logged: {log}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = bad.log_text();
    for secret in [redis_secret, mongo_secret] {
        assert!(!log.contains(secret), "{secret} in the log: {log}");
    }
    drop(bad);

    deployment.finish().await;
    let _ = std::fs::remove_dir_all(&dir);
}
