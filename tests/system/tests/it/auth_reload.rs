//! `API_KEYS_FILE` is reloaded on SIGHUP by a real `cache-api` process: the
//! signal reloads the file even when its content did not change (the
//! in-process tests cover reloads on change), a new key works right after,
//! and the process survives the signal (SIGHUP's default action ends it).

use std::time::Duration;
use testkit::services::{ServiceProcess, workspace_bin};
use testkit::{TestRedis, eventually};

fn key_file(name: &str, key: &str) -> String {
    let digest = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(key.as_bytes())?;
            child.wait_with_output()
        })
        .expect("sha256sum runs");
    let hex = String::from_utf8_lossy(&digest.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned();
    format!("[[keys]]\nname = \"{name}\"\nscopes = [\"features:read\"]\nsha256 = \"{hex}\"\n")
}

#[tokio::test]
async fn sighup_reloads_the_key_file_and_the_process_survives() {
    let redis = TestRedis::start().await;
    let dir = std::env::temp_dir().join(format!("auth-sighup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("keys.toml");
    let first = "first-key-0123456789abcdef";
    std::fs::write(&file, key_file("first", first)).unwrap();
    let db = testkit::unique_db("auth_sighup");
    let env = [
        ("REDIS_URL", redis.url()),
        ("MONGO_URI", testkit::mongo_uri()),
        ("MONGO_DB", db),
        ("API_KEYS_FILE", file.display().to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut api = ServiceProcess::start(
        "api-sighup",
        &workspace_bin("cache-api"),
        &env,
        "/api/health/",
    )
    .await;
    let http = reqwest::Client::new();
    let url = api.url("/api/features/NOPE/");
    let status = |key: &'static str| {
        let request = http.get(&url).bearer_auth(key);
        async move {
            request
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(status(first).await, 404);
    let reloads = |api: &ServiceProcess| api.log_text().matches("API keys reloaded").count();
    assert_eq!(reloads(&api), 0);

    // Same content: only the signal can make it reload.
    let pid = api.pid().expect("running");
    let hangup = || unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGHUP) };
    assert_eq!(hangup(), 0);
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { reloads(&api) == 1 },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", api.log_tail(30)));
    assert!(
        api.is_running(),
        "SIGHUP ended the process:\n{}",
        api.log_tail(30)
    );
    assert_eq!(status(first).await, 404);

    // A new key file, then SIGHUP: the new key works, the old one no longer.
    let second = "second-key-0123456789abcdef";
    std::fs::write(&file, key_file("second", second)).unwrap();
    assert_eq!(hangup(), 0);
    eventually(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || async { status(second).await == 404 },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", api.log_tail(30)));
    assert_eq!(status(first).await, 401);
    assert!(api.is_running());
    assert!(
        !api.log_text().contains(first) && !api.log_text().contains(second),
        "a key was logged"
    );
    api.terminate(Duration::from_secs(10)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cachectl populate --api` writes through the API's bulk endpoint with the
/// key from `CACHE_API_KEY`; without it the API refuses and cachectl says why.
#[tokio::test]
async fn cachectl_populates_through_the_api_with_its_key() {
    let redis = TestRedis::start().await;
    let db = testkit::unique_db("auth_cachectl");
    let writer = "writer-key-0123456789abcdef";
    let keys =
        format!("loader:features:write:{writer},reader:features:read:reader-key-0123456789abcdef");
    let env = [
        ("REDIS_URL", redis.url()),
        ("MONGO_URI", testkit::mongo_uri()),
        ("MONGO_DB", db.clone()),
        ("API_KEYS", keys),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let api = ServiceProcess::start(
        "api-cachectl",
        &workspace_bin("cache-api"),
        &env,
        "/api/health/",
    )
    .await;
    let populate = |key: Option<&str>| {
        let mut command = std::process::Command::new(workspace_bin("cachectl"));
        command
            .args([
                "populate",
                "--count",
                "20",
                "--batch",
                "10",
                "--api",
                &api.base_url(),
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        if let Some(key) = key {
            command.env("CACHE_API_KEY", key);
        }
        command.output().expect("cachectl runs")
    };
    let refused = populate(None);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("401") && stderr.contains("CACHE_API_KEY"),
        "{stderr}"
    );

    let done = populate(Some(writer));
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(
        done.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(
        stdout.contains("populated 20 customers (0 failed)"),
        "{stdout}"
    );
    let reply = reqwest::Client::new()
        .get(api.url("/api/features/CUST00020/"))
        .header("x-api-key", "reader-key-0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status(), 200);
    let mongo = mongodb::Client::with_uri_str(testkit::mongo_uri())
        .await
        .unwrap();
    let _ = mongo.database(&db).drop().await;
}
