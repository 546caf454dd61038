//! Graceful shutdown of the real `cache-api` binary: on SIGTERM it stops
//! accepting, lets the request in flight finish, and exits; a request that
//! outlasts `SHUTDOWN_GRACE_MS` does not keep it from exiting.
//!
//! The request in flight is a POST whose body the test holds back: it sends
//! the head with `Expect: 100-continue`, and the server's `100 Continue`
//! says the handler is reading the body, so the request is surely in flight.

use std::time::Duration;
use testkit::services::{ServiceProcess, workspace_bin};
use testkit::{TestRedis, eventually, mongo_uri, unique_db};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BODY: &str = r#"{"customer_id": "IN_FLIGHT", "features": {"a": 1}}"#;

async fn start_api(redis: &TestRedis, db: &str, grace: &str) -> ServiceProcess {
    let (url, uri) = (redis.url(), mongo_uri());
    let env = [
        ("REDIS_URL", url.as_str()),
        ("MONGO_URI", uri.as_str()),
        ("MONGO_DB", db),
        ("LOCAL_CACHE_ENABLED", "false"),
        ("SHUTDOWN_GRACE_MS", grace),
    ];
    ServiceProcess::start(
        "cache-api-drain",
        &workspace_bin("cache-api"),
        &env,
        "/livez",
    )
    .await
}

/// Sends a POST's head and waits for `100 Continue`: the handler is running
/// and waits for the body, which the test sends when it likes.
async fn post_in_flight(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let head = format!(
        "POST /api/features/ HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        BODY.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(&mut stream);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut line))
        .await
        .expect("100 Continue")
        .unwrap();
    assert!(line.starts_with("HTTP/1.1 100"), "{line:?}");
    line.clear();
    reader.read_line(&mut line).await.unwrap();
    assert_eq!(line, "\r\n");
    stream
}

fn sigterm(api: &ServiceProcess) {
    let pid = api.pid().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[tokio::test]
async fn on_sigterm_the_request_in_flight_completes_new_connections_are_refused_and_it_exits() {
    let redis = TestRedis::start().await;
    let db = unique_db("drain");
    let mut api = start_api(&redis, &db, "20000").await;
    let port = api.port();
    let mut in_flight = post_in_flight(port).await;

    sigterm(&api);
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(20),
        || async { TcpStream::connect(("127.0.0.1", port)).await.is_err() },
    )
    .await
    .expect("new connections refused while draining");

    in_flight.write_all(BODY.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(20),
        in_flight.read_to_string(&mut response),
    )
    .await
    .expect("answered and closed")
    .unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");
    assert!(response.contains("IN_FLIGHT"), "{response}");
    let exit = api.terminate(Duration::from_secs(20)).await;
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
}

#[tokio::test]
async fn a_request_that_outlasts_the_grace_does_not_keep_the_process() {
    let redis = TestRedis::start().await;
    let db = unique_db("drain_grace");
    let mut api = start_api(&redis, &db, "300").await;
    let mut in_flight = post_in_flight(api.port()).await;

    sigterm(&api);
    // The body never comes; the process exits by itself after the grace
    // (`terminate` would SIGKILL it after 20 s: not a success).
    let exit = api.terminate(Duration::from_secs(20)).await;
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    let mut rest = Vec::new();
    let _ = in_flight.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}
