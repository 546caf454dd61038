//! The limits (SECURITY.md, "Limits"): the HTTP server's timeouts, cap and
//! half-close over raw loopback connections; the request deadline; the
//! document and batch bounds; Redis batches in chunks; the probes while
//! Redis is down.

use crate::support::{NEAR_OFF, TestApi, TestStack, env};
use serde_json::{Value, json};
use std::time::Duration;
use testkit::{TestRedis, eventually, unique_db};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How long a test waits for what must happen; far past every timeout the
/// tests set, so only a missing limit makes it run out.
const PATIENCE: Duration = Duration::from_secs(30);

/// Reads until the server closes the connection; `Err` if it has not
/// within [`PATIENCE`].
async fn read_until_closed(stream: &mut TcpStream) -> Result<Vec<u8>, String> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    match read {
        Ok(()) => Ok(received),
        Err(_) => Err(format!(
            "still open after {PATIENCE:?}; received {:?}",
            String::from_utf8_lossy(&received)
        )),
    }
}

/// Reads one response with a `content-length` body; returns its head and body.
async fn read_response(stream: &mut BufReader<&mut TcpStream>) -> (String, String) {
    let mut head = String::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        stream.read_line(&mut line).await.expect("a response line");
        assert!(!line.is_empty(), "closed before the head ended: {head}");
        if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = value.trim().parse().expect("a length");
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).await.expect("the body");
    (head, String::from_utf8_lossy(&body).into_owned())
}

async fn connect(api: &TestApi) -> TcpStream {
    let addr = api.base_url().trim_start_matches("http://").to_owned();
    TcpStream::connect(addr).await.expect("connect")
}

const LIVEZ: &[u8] = b"GET /livez HTTP/1.1\r\nHost: t\r\n\r\n";

/// A client that sends its headers a byte at a time and never finishes
/// (slowloris) is cut off by the header timeout, although it is never idle.
#[tokio::test]
async fn a_connection_that_never_finishes_its_headers_is_closed() {
    let stack = TestStack::start(
        "limits_slowloris",
        &[
            NEAR_OFF,
            ("HTTP_HEADER_READ_TIMEOUT_MS", "500"),
            ("HTTP_IDLE_TIMEOUT_MS", "500"),
        ],
    )
    .await;
    let mut stream = connect(&stack.api).await;
    stream.write_all(b"GET /livez HTTP/1.1\r\n").await.unwrap();
    let trickle = async {
        for _ in 0..(PATIENCE.as_millis() / 100) {
            if stream.write_all(b"X").await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(
        trickle.await,
        "the connection still took header bytes after {PATIENCE:?}"
    );
    stack.finish().await;
}

/// A kept-alive connection that sends nothing after its response is closed
/// by the idle timeout (the header timeout here is longer than the test's
/// patience).
#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let stack = TestStack::start(
        "limits_idle",
        &[
            NEAR_OFF,
            ("HTTP_HEADER_READ_TIMEOUT_MS", "600000"),
            ("HTTP_IDLE_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    let mut stream = connect(&stack.api).await;
    stream.write_all(LIVEZ).await.unwrap();
    let (head, body) = read_response(&mut BufReader::new(&mut stream)).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok");
    let rest = read_until_closed(&mut stream)
        .await
        .expect("closed when idle");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    stack.finish().await;
}

/// Past `HTTP_MAX_CONNECTIONS` a connection is not accepted: it waits in the
/// listen backlog, unanswered, until a served one closes.
#[tokio::test]
async fn connections_past_the_cap_wait_until_one_closes() {
    let stack = TestStack::start(
        "limits_cap",
        &[
            NEAR_OFF,
            ("HTTP_MAX_CONNECTIONS", "2"),
            ("HTTP_HEADER_READ_TIMEOUT_MS", "600000"),
            ("HTTP_IDLE_TIMEOUT_MS", "600000"),
        ],
    )
    .await;
    let mut first = connect(&stack.api).await;
    let mut second = connect(&stack.api).await;
    for stream in [&mut first, &mut second] {
        stream.write_all(LIVEZ).await.unwrap();
        let (head, _) = read_response(&mut BufReader::new(stream)).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let mut third = connect(&stack.api).await;
    third.write_all(LIVEZ).await.unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), third.read(&mut byte)).await;
    assert!(early.is_err(), "the third connection was served: {early:?}");
    drop(first);
    let (head, body) =
        tokio::time::timeout(PATIENCE, read_response(&mut BufReader::new(&mut third)))
            .await
            .expect("served once a slot was free");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok");
    stack.finish().await;
}

/// An HTTP/1.1 client that shuts its sending side after the request still
/// reads the whole response.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_gets_the_response() {
    let stack = TestStack::start("limits_half_close", &[NEAR_OFF]).await;
    let reply = stack
        .api
        .post(
            "/api/features/",
            &json!({"customer_id": "HALF", "features": {"a": 1}}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let mut stream = connect(&stack.api).await;
    stream
        .write_all(b"GET /api/features/HALF/ HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let received = read_until_closed(&mut stream).await.unwrap();
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains(r#""features":{"a":1}"#), "{text}");
    stack.finish().await;
}

/// A listener that accepts connections and never answers (a hung Redis).
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    (format!("redis://{addr}/0"), task)
}

/// A request not answered within `HTTP_REQUEST_TIMEOUT_MS` gets 503 with
/// the JSON error body and `Retry-After`.
#[tokio::test]
async fn a_request_past_its_deadline_gets_503_request_timeout() {
    let (hung_redis, hole) = black_hole().await;
    let api = TestApi::start(
        &hung_redis,
        &unique_db("limits_deadline"),
        env(&[
            NEAR_OFF,
            ("REDIS_TIMEOUT_MS", "20000"),
            ("LEADER_LEASE_MS", "40000"),
            ("MONGO_TIMEOUT_MS", "300"),
            ("HTTP_REQUEST_TIMEOUT_MS", "800"),
        ]),
    )
    .await;
    let reply = api.get("/api/features/SLOW/").await;
    let body = reply.expect_error(503, "request_timeout");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("HTTP_REQUEST_TIMEOUT_MS")),
        "{body}"
    );
    assert_eq!(reply.header("retry-after"), Some("1"));
    // /livez needs no store: it answers meanwhile.
    assert_eq!(api.get("/livez").await.status, 200);
    api.shutdown().await.unwrap();
    hole.abort();
}

/// `features` beyond `MAX_DOCUMENT_BYTES` are refused naming the limit, and
/// nothing is stored; in a bulk only that item fails.
#[tokio::test]
async fn a_document_past_the_bound_is_refused_and_nothing_changes() {
    let stack = TestStack::start(
        "limits_document",
        &[
            NEAR_OFF,
            ("MAX_DOCUMENT_BYTES", "1000"),
            ("MAX_BATCH_RESPONSE_BYTES", "1000"),
        ],
    )
    .await;
    let big = json!({"blob": "x".repeat(1000)});
    let reply = stack
        .api
        .post(
            "/api/features/",
            &json!({"customer_id": "BIG", "features": big}),
        )
        .await;
    let body = reply.expect_error(413, "document_too_large");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("MAX_DOCUMENT_BYTES (1000)")),
        "{body}"
    );
    assert!(stack.stored_ids().await.is_empty());

    let reply = stack
        .api
        .post(
            "/api/features/bulk/",
            &json!({"features_list": [
                {"customer_id": "BIG", "features": big},
                {"customer_id": "SMALL", "features": {"a": 1}},
            ]}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    let results = reply.json()["results"].clone();
    assert_eq!(results[0]["status"], "failed", "{results}");
    assert!(
        results[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("MAX_DOCUMENT_BYTES")),
        "{results}"
    );
    assert_eq!(results[1]["status"], "created", "{results}");
    assert_eq!(stack.stored_ids().await, ["SMALL"]);

    // Just within the bound is taken.
    let within = json!({"blob": "x".repeat(1000 - r#"{"blob":""}"#.len())});
    let reply = stack
        .api
        .post(
            "/api/features/",
            &json!({"customer_id": "EDGE", "features": within}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    stack.finish().await;
}

/// A batch whose documents pass `MAX_BATCH_RESPONSE_BYTES` is refused with
/// 400 naming the limit; a smaller one is served.
#[tokio::test]
async fn a_batch_past_the_response_bound_is_refused() {
    let stack = TestStack::start(
        "limits_batch",
        &[
            NEAR_OFF,
            ("MAX_DOCUMENT_BYTES", "1000"),
            ("MAX_BATCH_RESPONSE_BYTES", "2500"),
        ],
    )
    .await;
    let ids: Vec<String> = (0..5).map(|i| format!("B{i}")).collect();
    for id in &ids {
        let reply = stack
            .api
            .post(
                "/api/features/",
                &json!({"customer_id": id, "features": {"blob": "y".repeat(800)}}),
            )
            .await;
        assert_eq!(reply.status, 201, "{}", reply.text());
    }
    let reply = stack
        .api
        .post("/api/features/batch/", &json!({"customer_ids": &ids[..2]}))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["found"].as_object().map(|f| f.len()), Some(2));

    let reply = stack
        .api
        .post("/api/features/batch/", &json!({"customer_ids": ids}))
        .await;
    let body = reply.expect_error(400, "batch_response_too_large");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("MAX_BATCH_RESPONSE_BYTES (2500 bytes)")),
        "{body}"
    );
    stack.finish().await;
}

/// Redis's MONITOR output until `stop` is sent: one line per command, in
/// the order Redis ran them.
async fn monitor(
    redis: &TestRedis,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<String>>,
) {
    let mut stream = TcpStream::connect(("127.0.0.1", redis.port()))
        .await
        .expect("connect to Redis");
    stream.write_all(b"MONITOR\r\n").await.unwrap();
    let mut lines = BufReader::new(stream).lines();
    // MONITOR answers +OK before it reports anything.
    let ok = lines.next_line().await.unwrap();
    assert_eq!(ok.as_deref(), Some("+OK"));
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        loop {
            tokio::select! {
                _ = &mut stopped => return seen,
                line = lines.next_line() => match line {
                    Ok(Some(line)) => seen.push(line),
                    _ => return seen,
                },
            }
        }
    });
    (stop, task)
}

/// A batch of a thousand ids reaches Redis in chunks, so single-key reads
/// on the same shared connection are run between them rather than after
/// the whole batch; the batch is still answered right.
#[tokio::test]
async fn a_large_batch_goes_to_redis_in_chunks_and_single_reads_pass_between() {
    let stack = TestStack::start("limits_chunks", &[NEAR_OFF]).await;
    let reply = stack
        .api
        .post(
            "/api/features/",
            &json!({"customer_id": "D0", "features": {"d": 0}}),
        )
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text());
    assert_eq!(
        stack
            .api
            .get("/api/features/D0/")
            .await
            .header("x-cache-source"),
        Some("redis")
    );
    let (stop, commands) = monitor(&stack.redis).await;
    let mut ids: Vec<String> = (1..1000).map(|i| format!("M{i}")).collect();
    ids.insert(500, "D0".to_owned());
    let done = std::sync::atomic::AtomicBool::new(false);
    let batch = async {
        let reply = stack
            .api
            .post("/api/features/batch/", &json!({"customer_ids": ids}))
            .await;
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        reply
    };
    let singles = async {
        let mut served = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            let reply = stack.api.get("/api/features/D0/").await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            served += 1;
        }
        served
    };
    let (reply, served) = tokio::join!(batch, singles);
    stop.send(()).ok();
    let commands = commands.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["found"]["D0"]["features"], json!({"d": 0}), "{body}");
    assert_eq!(body["missing"].as_array().map(Vec::len), Some(999));
    assert!(served > 0);

    // The client's commands (not those a script ran): the batch's first
    // script and every call of that script, and the single reads.
    let from_client = |line: &&String| !line.contains(" lua]");
    let first_script = commands
        .iter()
        .filter(from_client)
        .find(|line| line.contains(r#""EVALSHA""#) && line.contains(r#""features:M"#))
        .expect("the batch's scripts");
    let sha = first_script
        .split(r#""EVALSHA" ""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a sha");
    let calls = format!(r#""EVALSHA" "{sha}""#);
    let script_at: Vec<usize> = commands
        .iter()
        .enumerate()
        .filter(|(_, line)| {
            from_client(line) && line.contains(&calls) && line.contains(r#""features:M"#)
        })
        .map(|(at, _)| at)
        .collect();
    let (first, last) = (script_at[0], script_at[script_at.len() - 1]);
    let between = commands[first..last]
        .iter()
        .filter(from_client)
        .filter(|line| line.contains(r#""GET" "features:D0""#))
        .count();
    assert!(
        between > 0,
        "no single read ran between the batch's first and last script ({} scripts, {served} single reads)",
        script_at.len()
    );
    stack.finish().await;
}

/// While Redis is down: `/livez` stays 200; `/readyz` says not ready when
/// the near cache's invalidation subscription is lost, but ready without a
/// near cache (MongoDB answers); `/api/health/` reports the outage in the
/// original's shape, one check shared by concurrent callers.
#[tokio::test]
async fn probes_follow_a_redis_outage() {
    let mut stack = TestStack::start("limits_probes", &[]).await;
    let api = &stack.api;
    assert_eq!(api.get("/livez").await.status, 200);
    let ready = api.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(
        ready.json(),
        json!({"status": "ready", "redis": true, "mongodb": true, "invalidation_subscription": true})
    );
    let health = api.get("/api/health/").await;
    assert_eq!(health.status, 200, "{}", health.text());
    assert_eq!(health.json()["status"], "healthy");

    stack.redis.stop();
    let api = &stack.api;
    let not_ready = eventually(PATIENCE, Duration::from_millis(200), || async {
        let reply = api.get("/readyz").await;
        if reply.status == 503 {
            Ok(reply.json())
        } else {
            Err(reply.text())
        }
    })
    .await
    .unwrap();
    assert_eq!(not_ready["redis"], false, "{not_ready}");
    assert_eq!(not_ready["mongodb"], true, "{not_ready}");
    assert_eq!(not_ready["invalidation_subscription"], false, "{not_ready}");
    assert_eq!(api.get("/livez").await.status, 200);

    eventually(PATIENCE, Duration::from_millis(200), || async {
        api.get("/api/health/").await.status == 503
    })
    .await
    .unwrap();
    let replies = futures::future::join_all((0..10).map(|_| api.get("/api/health/"))).await;
    let bodies: Vec<Value> = replies.iter().map(|r| r.json()).collect();
    assert_eq!(bodies[0]["status"], "degraded", "{}", bodies[0]);
    assert_eq!(bodies[0]["redis"]["available"], false);
    assert_eq!(bodies[0]["mongodb"]["available"], true);
    assert!(
        bodies.iter().all(|b| b == &bodies[0]),
        "concurrent callers share one check: {bodies:?}"
    );

    let without_near = TestApi::start(&stack.redis.url(), stack.db.name(), env(&[NEAR_OFF])).await;
    let ready = without_near.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(
        ready.json(),
        json!({"status": "ready", "redis": false, "mongodb": true, "invalidation_subscription": null})
    );
    without_near.shutdown().await.unwrap();
    stack.finish().await;
}

/// Bulk writes that hold MongoDB (their `update` commands held 3 s on the
/// server by a fail point) leave connections to single-key reads: a GET
/// that needs MongoDB is answered, not 503 after waiting for a permit.
/// Runs a stand-in of its own (fail points need `--enable-test-commands`).
#[tokio::test]
async fn bulk_writes_holding_mongodb_leave_single_key_reads_served() {
    let stack = TestStack::start_on_own_mongo(
        "limits_fairness",
        &["--enable-test-commands"],
        "",
        &[NEAR_OFF, ("MONGO_TIMEOUT_MS", "1000")],
    )
    .await;
    let api = &stack.api;
    stack
        .own_mongo()
        .fail_commands(
            50,
            bson::doc! {
                "failCommands": ["update"],
                "blockConnection": true,
                "blockTimeMS": 3000,
            },
        )
        .await;
    // More bulk writes than the pool has connections.
    let bodies: Vec<Value> = (0..12)
        .map(|i| json!({"features_list": [{"customer_id": format!("BULK{i}"), "features": {}}]}))
        .collect();
    let bulks = futures::future::join_all(
        bodies
            .iter()
            .map(|body| api.post("/api/features/bulk/", body)),
    );
    let single = async {
        // Let the bulk writes take what they can first.
        tokio::time::sleep(Duration::from_millis(500)).await;
        api.get("/api/features/NOT_THERE/").await
    };
    let (_, single) = tokio::join!(bulks, single);
    single.expect_error(404, "not_found");
    let TestStack {
        api,
        own_mongo: _mongo,
        ..
    } = stack;
    api.shutdown().await.unwrap();
}
