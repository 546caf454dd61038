//! The load balancer's configuration (`deploy/nginx/nginx.conf`), run by
//! Debian's nginx in front of two real `cache-api` replicas whose MongoDB is
//! unreachable (their Redis holds one cached document): application 503s
//! never take a replica out, writes are never sent twice, no internal
//! address leaks into response headers, and clients are rate limited.
//!
//! The file is used as it is, templated only where a test must differ from
//! compose: the replicas' addresses (no Docker DNS, so no `resolve`), the
//! listen port, the pid and log paths, and in some runs a timeout or rate.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use system_tests::{Deployment, Options};
use testkit::process::{ChildGuard, free_port};
use testkit::services::ServiceProcess;

/// Debian's nginx (`nginx-light`, installed by `cargo xtask testbed install`).
fn nginx_binary() -> PathBuf {
    std::env::var_os("NGINX")
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.exists()))
        .unwrap_or_else(|| PathBuf::from("nginx"))
}

/// nginx from the repository's configuration, in front of `replicas`.
struct Nginx {
    port: u16,
    dir: PathBuf,
    child: ChildGuard,
}

impl Nginx {
    /// `edits` are further (from, to) replacements of the configuration.
    async fn start(replicas: [&ServiceProcess; 2], edits: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "lb-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/nginx/nginx.conf");
        let mut conf = std::fs::read_to_string(&source).expect("nginx.conf");
        let port = free_port();
        let upstream = |replica: &ServiceProcess| format!("127.0.0.1:{}", replica.port());
        let replacements: Vec<(String, String)> = [
            ("api-1:8000 resolve".to_owned(), upstream(replicas[0])),
            ("api-2:8000 resolve".to_owned(), upstream(replicas[1])),
            (
                "listen 8000;".to_owned(),
                format!("listen 127.0.0.1:{port};"),
            ),
            (
                "pid /var/run/nginx.pid;".to_owned(),
                format!("pid {}/nginx.pid;", dir.display()),
            ),
            (
                "access_log /dev/stdout json;".to_owned(),
                format!("access_log {}/access.log json;", dir.display()),
            ),
            (
                "error_log /dev/stderr warn;".to_owned(),
                format!("error_log {}/error.log warn;", dir.display()),
            ),
            // Docker's DNS; nothing to resolve here.
            (
                "resolver 127.0.0.11 valid=5s ipv6=off;".to_owned(),
                String::new(),
            ),
        ]
        .into_iter()
        .chain(
            edits
                .iter()
                .map(|(a, b)| ((*a).to_owned(), (*b).to_owned())),
        )
        .collect();
        for (from, to) in &replacements {
            assert!(conf.contains(from.as_str()), "nginx.conf has no {from:?}");
            conf = conf.replace(from.as_str(), to);
        }
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).expect("write nginx.conf");
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot run nginx (cargo xtask testbed install installs it): {err}")
            });
        let child = ChildGuard::from(child);
        testkit::process::wait_for_port(port, Duration::from_secs(10))
            .await
            .unwrap_or_else(|err| panic!("nginx did not listen on {port}: {err}"));
        Self { port, dir, child }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The access log's entries (JSON lines) so far.
    fn access_log(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The upstream addresses nginx sent the one logged `method` `uri` to.
    async fn upstreams_of(&self, method: &str, uri: &str) -> Vec<String> {
        // nginx writes the entry once the response is sent; give it a moment.
        let started = Instant::now();
        loop {
            if let Some(entry) = self
                .access_log()
                .into_iter()
                .find(|e| e["method"] == method && e["uri"] == uri)
            {
                return entry["upstream"]
                    .as_str()
                    .unwrap_or_default()
                    .split(", ")
                    .map(str::to_owned)
                    .collect();
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "no access log entry for {method} {uri}: {:#?}",
                self.access_log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM: the master stops its workers too (a SIGKILL would leave
        // them running).
        self.child.signal(15);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.is_running() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Two replicas on the deployment's Redis whose MongoDB never answers (a
/// closed port), each MongoDB call failing after `mongo_timeout_ms`.
async fn replicas_without_mongo(
    deployment: &Deployment,
    mongo_timeout_ms: &str,
) -> [ServiceProcess; 2] {
    let unreachable = format!("mongodb://127.0.0.1:{}/?directConnection=true", free_port());
    let extra = [
        ("MONGO_URI", unreachable.as_str()),
        ("MONGO_TIMEOUT_MS", mongo_timeout_ms),
    ];
    [
        deployment.start_replica("lb-x", &extra).await,
        deployment.start_replica("lb-y", &extra).await,
    ]
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("http client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_503s_never_take_replicas_out_and_no_internal_address_leaks() {
    let deployment = Deployment::start("lb_503", Options::default()).await;
    // Cached in Redis while MongoDB was there.
    deployment
        .post(&deployment.a, "cached-1", json!({"score": 7}))
        .await;
    let replicas = replicas_without_mongo(&deployment, "300").await;
    let nginx = Nginx::start([&replicas[0], &replicas[1]], &[]).await;
    let http = client();

    let mut internal: Vec<String> = replicas.iter().map(|r| r.port().to_string()).collect();
    internal.push("127.0.0.1".into());
    for round in 0..8 {
        // A miss needs MongoDB: 503 with the JSON error body, passed on as
        // it is.
        let miss = http
            .get(nginx.url(&format!("/api/features/missing-{round}/")))
            .send()
            .await
            .expect("GET miss");
        assert_eq!(miss.status().as_u16(), 503, "round {round}");
        for (name, value) in miss.headers() {
            let value = value.to_str().unwrap_or_default();
            assert!(
                !internal.iter().any(|addr| value.contains(addr.as_str())),
                "header {name}: {value} names an internal address"
            );
            assert!(
                !name.as_str().contains("upstream"),
                "header {name}: {value}"
            );
        }
        assert_eq!(
            miss.headers().get("server").and_then(|v| v.to_str().ok()),
            Some("nginx"),
            "no version in Server"
        );
        let body: Value = miss.json().await.expect("503 body is JSON");
        assert_eq!(body["code"], "service_unavailable", "{body}");

        // The cached document is still served, by whichever replica: none
        // was marked down by the 503s (before the fix, both were, and this
        // was a 502).
        let hit = http
            .get(nginx.url("/api/features/cached-1/"))
            .send()
            .await
            .expect("GET hit");
        assert_eq!(hit.status().as_u16(), 200, "round {round}");
        let body: Value = hit.json().await.expect("hit body");
        assert_eq!(body["features"]["score"], 7);
    }
    let log = nginx.access_log();
    assert!(
        log.iter().all(|e| e["status"] != 502),
        "a request got 502: {log:#?}"
    );
    // A 503 is an answer: passed on, not tried again on the other replica.
    for entry in log.iter().filter(|e| e["status"] == 503) {
        let upstream = entry["upstream"].as_str().unwrap_or_default();
        assert!(!upstream.contains(','), "a 503 was retried: {entry}");
    }
    // Both replicas took requests all along (none was marked down).
    let answered: std::collections::HashSet<&str> =
        log.iter().filter_map(|e| e["upstream"].as_str()).collect();
    assert_eq!(answered.len(), 2, "{answered:?}");

    drop(nginx);
    drop(replicas);
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_are_never_sent_to_a_second_replica_after_a_timeout() {
    let deployment = Deployment::start("lb_retry", Options::default()).await;
    // Every MongoDB call takes 1 s before failing; nginx gives up after
    // 100 ms, so each request times out at its first replica.
    let replicas = replicas_without_mongo(&deployment, "1000").await;
    let nginx = Nginx::start(
        [&replicas[0], &replicas[1]],
        &[("proxy_read_timeout 30s;", "proxy_read_timeout 100ms;")],
    )
    .await;
    let http = client();

    let post = http
        .post(nginx.url("/api/features/"))
        .json(&json!({"customer_id": "write-1", "features": {"a": 1}}))
        .send()
        .await
        .expect("POST");
    assert_eq!(post.status().as_u16(), 504);
    let upstreams = nginx.upstreams_of("POST", "/api/features/").await;
    assert_eq!(upstreams.len(), 1, "POST sent to {upstreams:?}");

    let delete = http
        .delete(nginx.url("/api/features/write-2/"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(delete.status().as_u16(), 504);
    let upstreams = nginx.upstreams_of("DELETE", "/api/features/write-2/").await;
    assert_eq!(upstreams.len(), 1, "DELETE sent to {upstreams:?}");

    // A read is idempotent: it does move on to the other replica (which
    // also shows the log records every replica a request went to).
    let get = http
        .get(nginx.url("/api/features/read-1/"))
        .send()
        .await
        .expect("GET");
    assert_eq!(get.status().as_u16(), 504);
    let upstreams = nginx.upstreams_of("GET", "/api/features/read-1/").await;
    assert_eq!(upstreams.len(), 2, "GET sent to {upstreams:?}");

    drop(nginx);
    drop(replicas);
    deployment.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_beyond_its_rate_gets_429() {
    let deployment = Deployment::start("lb_rate", Options::default()).await;
    let nginx = Nginx::start(
        [&deployment.a, &deployment.b],
        // The same zone, slowed down so a test can exceed it.
        &[
            ("rate=200r/s;", "rate=1r/m;"),
            ("burst=400 nodelay;", "burst=5 nodelay;"),
        ],
    )
    .await;
    let http = client();
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let response = http
            .get(nginx.url("/api/health/"))
            .send()
            .await
            .expect("GET");
        statuses.push(response.status().as_u16());
    }
    assert!(
        statuses[..6].iter().all(|s| *s != 429),
        "the burst passes: {statuses:?}"
    );
    assert!(
        statuses[6..].iter().all(|s| *s == 429),
        "beyond the burst: {statuses:?}"
    );
    drop(nginx);
    deployment.finish().await;
}
