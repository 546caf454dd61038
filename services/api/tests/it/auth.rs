//! Authentication, authorization, rate limits and load shedding: every route
//! against every scope, API keys (header forms, file reload), JWTs against
//! a JWKS written or served by the test, `AUTH_REQUIRED`, 429 and 503 with
//! `Retry-After`, open mode as before, the denial counter, no secret in logs.

use crate::support::{Reply, TestApi, TestStack, env};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::time::Duration;
use testkit::{CapturedLogs, TestRedis, eventually};

const READER: &str = "reader-key-0123456789abcdef";
const WRITER: &str = "writer-key-0123456789abcdef";
const ADMIN: &str = "admin-key-0123456789abcdef";
const ALL: &str = "all-key-0123456789abcdef";

fn dev_keys() -> String {
    format!(
        "reader:features:read:{READER},writer:features:write:{WRITER},admin:admin:{ADMIN},\
         all:features:read+features:write+admin:{ALL}"
    )
}

fn sha_hex(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A key file with `(name, scopes, key)` entries.
fn key_file_text(entries: &[(&str, &[&str], &str)]) -> String {
    entries
        .iter()
        .map(|(name, scopes, key)| {
            format!(
                "[[keys]]\nname = \"{name}\"\nscopes = {scopes:?}\nsha256 = \"{}\"\n",
                sha_hex(key)
            )
        })
        .collect()
}

/// A directory of the test's own, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `name` atomically (write, then rename), as deploy tools do.
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        std::fs::write(&tmp, text).expect("write temp file");
        std::fs::rename(&tmp, &path).expect("rename");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn send(
    api: &TestApi,
    method: Method,
    path: &str,
    body: Option<&Value>,
    auth: Auth<'_>,
) -> crate::support::Reply {
    let mut request = api.request(method, path);
    if let Some(body) = body {
        request = request.json(body);
    }
    request = match auth {
        Auth::None => request,
        Auth::Bearer(secret) => request.bearer_auth(secret),
        Auth::ApiKey(key) => request.header("x-api-key", key),
        Auth::Raw(value) => request.header("authorization", value),
    };
    api.send(request).await
}

#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    ApiKey(&'a str),
    Raw(&'a str),
}

/// Every route with a request it accepts, and the scope it needs.
fn protected_routes() -> Vec<(Method, &'static str, Option<Value>, &'static str)> {
    let doc = json!({"customer_id": "AUTH1", "features": {"a": 1}});
    vec![
        (Method::GET, "/api/features/AUTH1/", None, "features:read"),
        (Method::GET, "/api/features/AUTH1", None, "features:read"),
        (
            Method::POST,
            "/api/features/batch/",
            Some(json!({"customer_ids": ["AUTH1"]})),
            "features:read",
        ),
        (
            Method::POST,
            "/api/features/",
            Some(doc.clone()),
            "features:write",
        ),
        (Method::POST, "/api/features", Some(doc), "features:write"),
        (
            Method::POST,
            "/api/features/bulk/",
            Some(json!({"features_list": [{"customer_id": "AUTH2", "features": {}}]})),
            "features:write",
        ),
        (
            Method::DELETE,
            "/api/features/AUTH2/",
            None,
            "features:write",
        ),
        (
            Method::DELETE,
            "/api/features/AUTH2/delete/",
            None,
            "features:write",
        ),
        (Method::GET, "/metrics", None, "admin"),
        (Method::GET, "/api/info/", None, "admin"),
        (Method::GET, "/api/info", None, "admin"),
        (Method::GET, "/admin/replicas", None, "admin"),
        (Method::GET, "/admin/keys/AUTH2/", None, "admin"),
        (Method::POST, "/admin/keys/AUTH2/evict", None, "admin"),
    ]
}

fn assert_unauthorized(reply: &crate::support::Reply, what: &str) {
    assert_eq!(reply.status, 401, "{what}: {}", reply.text());
    reply.expect_error(401, "unauthorized");
    let challenge = reply.header("www-authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer"),
        "{what}: WWW-Authenticate {challenge:?}"
    );
}

#[tokio::test]
async fn every_route_needs_its_scope() {
    let stack = TestStack::start("auth_routes", &[("API_KEYS", &dev_keys())]).await;
    let api = &stack.api;
    let keys = [
        (READER, "features:read"),
        (WRITER, "features:write"),
        (ADMIN, "admin"),
    ];
    for (method, path, body, scope) in protected_routes() {
        let what = format!("{method} {path}");
        let reply = send(api, method.clone(), path, body.as_ref(), Auth::None).await;
        assert_unauthorized(&reply, &what);
        assert_eq!(
            reply.header("www-authenticate"),
            Some("Bearer realm=\"cache-api\"")
        );
        let reply = send(
            api,
            method.clone(),
            path,
            body.as_ref(),
            Auth::Bearer("not-a-key-at-all-0000"),
        )
        .await;
        assert_unauthorized(&reply, &what);
        assert!(
            reply
                .header("www-authenticate")
                .unwrap()
                .contains("invalid_token")
        );

        for (key, has) in keys {
            let reply = send(api, method.clone(), path, body.as_ref(), Auth::Bearer(key)).await;
            if has == scope {
                assert!(
                    ![401, 403].contains(&reply.status),
                    "{what} with a {has} key: {} {}",
                    reply.status,
                    reply.text()
                );
            } else {
                let body = reply.expect_error(403, "forbidden");
                assert!(
                    body["error"].as_str().unwrap().contains(scope),
                    "{what}: {body}"
                );
                let challenge = reply.header("www-authenticate").unwrap_or_default();
                assert!(
                    challenge.contains("insufficient_scope") && challenge.contains(scope),
                    "{what}: {challenge}"
                );
            }
        }
        // One key with every scope passes everywhere.
        let reply = send(api, method.clone(), path, body.as_ref(), Auth::Bearer(ALL)).await;
        assert!(
            ![401, 403].contains(&reply.status),
            "{what}: {}",
            reply.text()
        );
    }

    // Health, probes and docs stay open.
    for path in [
        "/api/health/",
        "/api/health",
        "/api-docs/openapi.json",
        "/swagger/",
        "/redoc/",
    ] {
        let reply = api.get(path).await;
        assert!(
            ![401, 403].contains(&reply.status),
            "{path}: {}",
            reply.status
        );
    }
    // A path no route serves is a 404, credentials or not.
    assert_eq!(api.get("/nothing/here").await.status, 404);
    stack.finish().await;
}

#[tokio::test]
async fn keys_are_accepted_in_both_headers_and_nowhere_else() {
    let stack = TestStack::start("auth_headers", &[("API_KEYS", &dev_keys())]).await;
    let api = &stack.api;
    let path = "/api/features/NOPE/";
    // 404: past admission, and the document does not exist.
    for auth in [
        Auth::Bearer(READER),
        Auth::ApiKey(READER),
        Auth::Raw(&format!("bearer {READER}")),
    ] {
        let reply = send(api, Method::GET, path, None, auth).await;
        assert_eq!(reply.status, 404, "{}", reply.text());
    }
    for auth in [
        Auth::Raw(&format!("Basic {READER}")),
        Auth::Raw(READER),
        Auth::Bearer(&READER[..READER.len() - 1]),
        Auth::ApiKey(&sha_hex(READER)),
        Auth::Raw("Bearer "),
    ] {
        let reply = send(api, Method::GET, path, None, auth).await;
        assert_unauthorized(&reply, "bad credentials");
    }
    let reply = api.get(&format!("{path}?api_key={READER}")).await;
    assert_unauthorized(&reply, "a key in the query string");
    stack.finish().await;
}

#[tokio::test]
async fn the_key_file_is_reloaded_on_change_and_a_bad_file_keeps_the_keys() {
    let (logs, _guard) = CapturedLogs::capture("info");
    let dir = TempDir::new("auth-keys");
    let file = dir.write(
        "keys.toml",
        &key_file_text(&[("first", &["features:read"], READER)]),
    );
    let stack = TestStack::start("auth_reload", &[("API_KEYS_FILE", file.to_str().unwrap())]).await;
    let api = &stack.api;
    let status = |key: &'static str| async move { read_with_token(api, key).await.status };
    assert_eq!(status(READER).await, 404);
    assert_eq!(status(WRITER).await, 401);

    // Replaced: the old key stops working, the new one starts.
    dir.write(
        "keys.toml",
        &key_file_text(&[("second", &["features:read"], WRITER)]),
    );
    soon(|| async { status(WRITER).await == 404 }).await;
    assert_eq!(status(READER).await, 401);

    // A broken file: the keys in force stay, and the error is logged once.
    dir.write(
        "keys.toml",
        "[[keys]]\nname = \"third\"\nscopes = [\"features:rede\"]\nsha256 = \"00\"\n",
    );
    soon(|| async { logs.count("ERROR", "API_KEYS_FILE not reloaded") >= 1 }).await;
    // Several more polls of the same bad content.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        logs.count("ERROR", "API_KEYS_FILE not reloaded"),
        1,
        "{:#?}",
        logs.lines()
    );
    assert_eq!(
        status(WRITER).await,
        404,
        "the last good keys stay in force"
    );

    // A file with no keys is closed, not open.
    dir.write("keys.toml", "");
    soon(|| async { status(WRITER).await == 401 }).await;
    let reply = send(api, Method::GET, "/api/features/NOPE/", None, Auth::None).await;
    assert_unauthorized(&reply, "no keys at all");
    stack.finish().await;
}

#[tokio::test]
async fn start_is_refused_without_credentials_when_required_or_with_a_bad_key_file() {
    let redis = TestRedis::start().await;
    let db = testkit::unique_db("auth_required");
    let err = TestApi::try_start(&redis.url(), &db, env(&[("AUTH_REQUIRED", "true")]))
        .await
        .err()
        .expect("AUTH_REQUIRED without credentials must not start");
    assert!(format!("{err:#}").contains("AUTH_REQUIRED"), "{err:#}");

    let dir = TempDir::new("auth-bad-file");
    for (name, text) in [
        ("missing.toml", None),
        (
            "bad.toml",
            Some("[[keys]]\nname = \"x\"\nscopes = [\"root\"]\nsha256 = \"\"\n"),
        ),
    ] {
        let path = match text {
            Some(text) => dir.write(name, text),
            None => dir.path(name),
        };
        let err = TestApi::try_start(
            &redis.url(),
            &db,
            env(&[
                ("API_KEYS_FILE", path.to_str().unwrap()),
                ("AUTH_REQUIRED", "true"),
            ]),
        )
        .await
        .err()
        .expect("a key file that cannot be loaded must stop start-up");
        assert!(format!("{err:#}").contains("API_KEYS_FILE"), "{err:#}");
    }

    // With credentials, AUTH_REQUIRED starts.
    let api = TestApi::try_start(
        &redis.url(),
        &db,
        env(&[("AUTH_REQUIRED", "true"), ("API_KEYS", &dev_keys())]),
    )
    .await
    .expect("starts with credentials");
    assert_eq!(api.get("/api/features/X/").await.status, 401);
    api.shutdown().await.unwrap();
}

#[tokio::test]
async fn with_nothing_configured_the_api_is_open_as_before() {
    let (logs, guard) = CapturedLogs::capture("info");
    let stack = TestStack::start("auth_open", &[]).await;
    drop(guard);
    assert_eq!(
        logs.count("WARN", "no credentials configured"),
        1,
        "{:#?}",
        logs.lines()
    );
    let api = &stack.api;
    let doc = json!({"customer_id": "OPEN1", "features": {"a": 1}});
    assert_eq!(api.post("/api/features/", &doc).await.status, 201);
    let reply = api.get("/api/features/OPEN1/").await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("www-authenticate").is_none());
    assert_eq!(api.get("/metrics").await.status, 200);
    assert_eq!(api.get("/api/info/").await.status, 200);
    // Credentials are ignored, not checked.
    let reply = send(
        api,
        Method::GET,
        "/api/features/OPEN1/",
        None,
        Auth::Bearer("whatever"),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(api.delete("/api/features/OPEN1/").await.status, 204);
    stack.finish().await;
}

#[tokio::test]
async fn denials_are_counted_by_reason_and_no_secret_is_logged() {
    let (logs, _guard) = CapturedLogs::capture("debug");
    let stack = TestStack::start("auth_counted", &[("API_KEYS", &dev_keys())]).await;
    let api = &stack.api;
    let denied = |text: &str, reason: &str| -> f64 {
        let samples = testkit::prometheus::parse(text).expect("Prometheus text");
        testkit::prometheus::sum(&samples, "auth_denied_total", &[("reason", reason)])
    };
    let before = send(api, Method::GET, "/metrics", None, Auth::Bearer(ADMIN))
        .await
        .text();
    let wrong = "wrong-key-that-must-not-be-logged";
    for _ in 0..3 {
        send(api, Method::GET, "/api/features/X/", None, Auth::None).await;
        send(
            api,
            Method::GET,
            "/api/features/X/",
            None,
            Auth::Bearer(wrong),
        )
        .await;
        send(
            api,
            Method::POST,
            "/api/features/",
            Some(&json!({})),
            Auth::Bearer(READER),
        )
        .await;
    }
    let after = send(api, Method::GET, "/metrics", None, Auth::Bearer(ADMIN))
        .await
        .text();
    for reason in ["missing", "invalid", "scope"] {
        assert!(
            denied(&after, reason) >= denied(&before, reason) + 3.0,
            "auth_denied_total{{reason={reason}}}: {} → {}",
            denied(&before, reason),
            denied(&after, reason)
        );
    }
    let text = logs.lines().join("\n");
    assert!(
        text.contains("request denied"),
        "denials are logged at debug: {text}"
    );
    for secret in [wrong, READER, ADMIN] {
        assert!(!text.contains(secret), "a presented secret was logged");
    }
    stack.finish().await;
}

// ------------------------------------------------------------------ rate limits and shedding

#[tokio::test]
async fn a_principal_over_its_rate_gets_429_with_retry_after() {
    let stack = TestStack::start(
        "auth_rate",
        &[
            ("API_KEYS", &dev_keys()),
            ("RATE_LIMIT_PER_SECOND", "1"),
            ("RATE_LIMIT_BURST", "3"),
        ],
    )
    .await;
    let api = &stack.api;
    let get = |key: &'static str| read_with_token(api, key);
    // The burst passes; a few more are refused (one per second replenishes,
    // so a slow machine may let one more through, but not twenty).
    let mut limited = None;
    for _ in 0..20 {
        let reply = get(READER).await;
        if reply.status == 429 {
            limited = Some(reply);
            break;
        }
        assert_eq!(reply.status, 404, "{}", reply.text());
    }
    let reply = limited.expect("twenty requests at once exceed a burst of 3 at 1/s");
    reply.expect_error(429, "rate_limited");
    let retry: u64 = reply
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=1).contains(&retry), "Retry-After {retry}");
    // Another principal has an allowance of its own.
    assert_eq!(get(ALL).await.status, 404);
    stack.finish().await;
}

#[tokio::test]
async fn anonymous_clients_are_limited_by_address() {
    let stack = TestStack::start(
        "auth_rate_anon",
        &[("RATE_LIMIT_PER_SECOND", "1"), ("RATE_LIMIT_BURST", "2")],
    )
    .await;
    let api = &stack.api;
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let status = api.get("/api/features/NOPE/").await.status;
        statuses.push(status);
        if status == 429 {
            break;
        }
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    // Probes are never limited.
    for _ in 0..5 {
        assert_ne!(api.get("/api/health/").await.status, 429);
    }
    stack.finish().await;
}

/// A TCP server that accepts connections and never answers: every MongoDB
/// call against it waits for its deadline.
async fn black_hole() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (
        format!("mongodb://{addr}/?directConnection=true&serverSelectionTimeoutMS=30000"),
        task,
    )
}

#[tokio::test]
async fn beyond_max_concurrent_requests_the_service_sheds_with_503() {
    let (mongo_uri, hole) = black_hole().await;
    let redis = TestRedis::start().await;
    let db = testkit::unique_db("auth_shed");
    let api = TestApi::start(
        &redis.url(),
        &db,
        env(&[
            ("MONGO_URI", &mongo_uri),
            ("MONGO_TIMEOUT_MS", "20000"),
            ("MAX_CONCURRENT_REQUESTS", "2"),
            ("API_KEYS", &dev_keys()),
        ]),
    )
    .await;
    // Two misses wait on MongoDB and hold both places.
    let url = |id: &str| api.url(&format!("/api/features/{id}/"));
    let held: Vec<_> = ["HELD1", "HELD2"]
        .iter()
        .map(|id| {
            let request = api.client().get(url(id)).bearer_auth(READER).send();
            tokio::spawn(request)
        })
        .collect();
    // Then every other request is refused at once, before its credentials
    // are looked at (the probes present none). (Until both have been
    // admitted, a probe may itself be admitted and wait: it gives up after
    // a second, freeing its place, and the next probe tries again.)
    let reply = eventually(
        Duration::from_secs(20),
        Duration::from_millis(20),
        || async {
            let request = api
                .client()
                .get(url("THIRD"))
                .timeout(Duration::from_secs(1));
            match request.send().await {
                Ok(response) if response.status() == 503 => {
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let body: Value = response.json().await.map_err(|e| e.to_string())?;
                    Ok((body, retry_after))
                }
                Ok(response) => Err(format!("status {}", response.status())),
                Err(err) => Err(err.to_string()),
            }
        },
    )
    .await
    .unwrap();
    let (body, retry_after) = reply;
    assert_eq!(body["code"], "overloaded", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("concurrent"),
        "{body}"
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
    for request in held {
        request.abort();
    }
    hole.abort();
    drop(api);
}

// ------------------------------------------------------------------ JWT

const ISSUER: &str = "https://idp.test/";
const AUDIENCE: &str = "cache-api";

/// An RSA key made by openssl, and its JWK under `kid`.
struct SigningKey {
    encoding: EncodingKey,
    kid: String,
    jwk: Jwk,
}

impl SigningKey {
    fn generate(dir: &TempDir, kid: &str) -> Self {
        let path = dir.path(&format!("{kid}.pem"));
        let status = std::process::Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .expect("openssl runs");
        assert!(status.success(), "openssl genpkey failed");
        let pem = std::fs::read(&path).unwrap();
        let encoding = EncodingKey::from_rsa_pem(&pem).expect("RSA PEM");
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).expect("JWK");
        jwk.common.key_id = Some(kid.to_owned());
        Self {
            encoding,
            kid: kid.to_owned(),
            jwk,
        }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign")
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    serde_json::to_string(&JwkSet {
        keys: keys.iter().map(|k| k.jwk.clone()).collect(),
    })
    .unwrap()
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn claims(scope: &str) -> Value {
    json!({"sub": "svc-1", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600, "scope": scope})
}

fn jwt_settings<'a>(source: (&'a str, &'a str)) -> Vec<(&'a str, &'a str)> {
    vec![
        source,
        ("AUTH_JWT_ISSUER", ISSUER),
        ("AUTH_JWT_AUDIENCE", AUDIENCE),
    ]
}

/// Waits (up to 10 s) until `check` holds: a reload has taken effect.
async fn soon<F, Fut>(check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually(Duration::from_secs(10), Duration::from_millis(50), check)
        .await
        .unwrap();
}

/// `GET /api/features/NOPE/` with `token` as the bearer (404 once let in).
async fn read_with_token(api: &TestApi, token: &str) -> Reply {
    send(
        api,
        Method::GET,
        "/api/features/NOPE/",
        None,
        Auth::Bearer(token),
    )
    .await
}

#[tokio::test]
async fn jwts_are_checked_against_the_jwks_file() {
    let dir = TempDir::new("auth-jwt");
    let key = SigningKey::generate(&dir, "k1");
    let stranger = SigningKey::generate(&dir, "k1");
    let file = dir.write("jwks.json", &jwks(&[&key]));
    let file = file.to_str().unwrap();
    let stack = TestStack::start("auth_jwt", &jwt_settings(("AUTH_JWT_JWKS_FILE", file))).await;
    let api = &stack.api;
    let get = |token: String| async move { read_with_token(api, &token).await };

    assert_eq!(
        get(key.sign(&claims("openid features:read"))).await.status,
        404
    );
    let mut list = claims("");
    list["scope"] = json!(["features:read"]);
    assert_eq!(
        get(key.sign(&list)).await.status,
        404,
        "a scope list is accepted too"
    );

    let cases = [
        ("expired", json!({"exp": now() - 3600}), "expired"),
        (
            "wrong issuer",
            json!({"iss": "https://evil.test/"}),
            "invalid_token",
        ),
        (
            "wrong audience",
            json!({"aud": "another-api"}),
            "invalid_token",
        ),
        ("no subject", json!({"sub": null}), "invalid_token"),
    ];
    for (what, change, challenge) in cases {
        let mut claims = claims("features:read");
        for (k, v) in change.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        let reply = get(key.sign(&claims)).await;
        assert_unauthorized(&reply, what);
        assert!(
            reply
                .header("www-authenticate")
                .unwrap()
                .contains(challenge),
            "{what}"
        );
    }
    let reply = get(stranger.sign(&claims("features:read"))).await;
    assert_unauthorized(&reply, "signed by another key");
    let token = key.sign(&claims("features:read"));
    let tampered = format!("{}x", &token[..token.len() - 1]);
    assert_unauthorized(&get(tampered).await, "tampered signature");

    // Valid, without the scope.
    let reply = get(key.sign(&claims("features:write admin"))).await;
    reply.expect_error(403, "forbidden");
    let reply = send(
        api,
        Method::POST,
        "/api/features/",
        Some(&json!({})),
        Auth::Bearer(&key.sign(&claims("features:read"))),
    )
    .await;
    reply.expect_error(403, "forbidden");
    stack.finish().await;
}

/// Serves `jwks` at `/jwks.json` until dropped; the body can be replaced.
struct JwksServer {
    url: String,
    body: std::sync::Arc<std::sync::Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(jwks: String) -> Self {
        let body = std::sync::Arc::new(std::sync::Mutex::new(jwks));
        let served = body.clone();
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let served = served.clone();
                async move { served.lock().unwrap().clone() }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { url, body, task }
    }

    fn replace(&self, jwks: String) {
        *self.body.lock().unwrap() = jwks;
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn jwts_are_checked_against_a_jwks_url_that_rotates() {
    let dir = TempDir::new("auth-jwks-url");
    let old = SigningKey::generate(&dir, "old");
    let new = SigningKey::generate(&dir, "new");
    let server = JwksServer::start(jwks(&[&old])).await;
    let stack = TestStack::start(
        "auth_jwks_url",
        &jwt_settings(("AUTH_JWT_JWKS_URL", &server.url)),
    )
    .await;
    let api = &stack.api;
    let status = |token: String| async move { read_with_token(api, &token).await.status };
    assert_eq!(status(old.sign(&claims("features:read"))).await, 404);

    // The provider rotates: the first token naming the new key makes the
    // service fetch the set again (such fetches: at most one per 10 s).
    server.replace(jwks(&[&new]));
    eventually(Duration::from_secs(15), Duration::from_millis(500), || {
        let token = new.sign(&claims("features:read"));
        async move { status(token).await == 404 }
    })
    .await
    .unwrap();
    assert_eq!(
        status(old.sign(&claims("features:read"))).await,
        401,
        "the retired key no longer signs"
    );
    stack.finish().await;
}
