//! `./quickstart.sh` end to end, as a user runs it (through the `xtask`
//! binary it runs): start → both replicas healthy → a POST on replica 1 read
//! on both → direct MongoDB writes, with and without a new version, reach
//! both replicas → a second start starts nothing → stop leaves nothing
//! running → a start with a busy port you chose fails cleanly.
//!
//! Its own state dir and free ports (never the defaults), the binaries this
//! test run built (`--bin-dir`: nothing is built), its own Redis and
//! SecantusDB (the caller's service settings and `.env` are ignored).

use mongodb::bson::{Document, doc};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use testkit::services::{tail_of, target_dir, workspace_bin};

/// How long a change may take to reach both replicas.
const POLL_BOUND: Duration = Duration::from_secs(10);

/// Service settings of the caller that must not leak into quickstart.
const HERMETIC: &[&str] = &[
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_DB",
    "REDIS_PASSWORD",
    "MONGO_URI",
    "MONGO_DB",
    "MONGO_COLLECTION",
    "CONFIG_FILE",
    "HTTP_ADDR",
    "INSTANCE_ID",
    "LOCAL_CACHE_ENABLED",
    "LOCAL_CACHE_TTL_MS",
    "INVALIDATION_MODE",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

/// Port variables, in the order of `ports`.
const PORT_VARS: [&str; 5] = [
    "QS_REDIS_PORT",
    "QS_MONGO_PORT",
    "QS_INVALIDATOR_PORT",
    "QS_API1_PORT",
    "QS_API2_PORT",
];

/// `xtask quickstart …` with this test's state dir and ports; stops what it
/// started when dropped (and shows the logs if the test failed).
struct Quickstart {
    xtask: PathBuf,
    bin_dir: PathBuf,
    dir: PathBuf,
    ports: Vec<u16>,
}

struct Ran {
    ok: bool,
    code: Option<i32>,
    out: String,
}

impl Quickstart {
    fn new() -> Self {
        let xtask = workspace_bin("xtask");
        let bin_dir = workspace_bin("cache-api")
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        for bin in ["cache-invalidator", "cachectl"] {
            workspace_bin(bin);
        }
        let dir = target_dir().join(format!("quickstart-test-{}", std::process::id()));
        let ports = testkit::process::free_ports(5).unwrap();
        Self {
            xtask,
            bin_dir,
            dir,
            ports,
        }
    }

    fn run(&self, args: &[&str]) -> Ran {
        let mut command = Command::new(&self.xtask);
        command.arg("quickstart").args(args);
        for var in HERMETIC {
            command.env_remove(var);
        }
        for (var, port) in PORT_VARS.iter().zip(&self.ports) {
            command.env(var, port.to_string());
        }
        command
            .env("QS_STATE_DIR", &self.dir)
            .env("QUICKSTART_PROFILE", "debug")
            .env("QS_DOTENV", "0")
            .env("QS_START_TIMEOUT", "90");
        if args.first().is_some_and(|a| *a == "start") {
            command.arg("--bin-dir").arg(&self.bin_dir);
        }
        let output = command.output().unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        println!(
            "----- quickstart {} ({})\n{out}",
            args.join(" "),
            output.status
        );
        Ran {
            ok: output.status.success(),
            code: output.status.code(),
            out,
        }
    }

    fn port(&self, var: &str) -> u16 {
        let i = PORT_VARS.iter().position(|v| *v == var).unwrap();
        self.ports[i]
    }

    fn api(&self, replica: usize) -> String {
        let var = if replica == 1 {
            "QS_API1_PORT"
        } else {
            "QS_API2_PORT"
        };
        format!("http://127.0.0.1:{}", self.port(var))
    }

    /// The state file (`DIR/env`) as a map.
    fn state(&self) -> BTreeMap<String, String> {
        let text = std::fs::read_to_string(self.dir.join("env")).unwrap_or_default();
        text.lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
            .collect()
    }

    /// `name=pid` of every pid file.
    fn pid_files(&self) -> BTreeMap<String, String> {
        std::fs::read_dir(self.dir.join("pids"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let file = entry.file_name().to_string_lossy().into_owned();
                let name = file.strip_suffix(".pid")?.to_owned();
                let pid = std::fs::read_to_string(entry.path()).ok()?;
                Some((name, pid.trim().to_owned()))
            })
            .collect()
    }

    /// Processes of this state dir: the services carry QUICKSTART_STATE_DIR
    /// in their environment; redis-server rewrites that memory, so it is
    /// found by its address in its command line.
    fn our_pids(&self) -> Vec<u32> {
        let marker = format!("QUICKSTART_STATE_DIR={}", self.dir.display());
        let redis = format!("redis-server 127.0.0.1:{}", self.port("QS_REDIS_PORT"));
        let mut found: Vec<u32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| alive(*pid))
            .filter(|pid| {
                let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
                environ
                    .split(|b| *b == 0)
                    .any(|var| var == marker.as_bytes())
                    || String::from_utf8_lossy(first).ends_with(&redis)
            })
            .collect();
        found.sort_unstable();
        found
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for name in ["redis", "mongo", "invalidator", "api-1", "api-2"] {
                let log = self.dir.join("logs").join(format!("{name}.log"));
                eprintln!("----- {}\n{}", log.display(), tail_of(&log, 15));
            }
        }
        self.run(&["stop", "--purge"]);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Exists and is not a zombie.
fn alive(pid: u32) -> bool {
    testkit::process::start_time(pid).is_some()
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(1),
    )
    .is_ok()
}

async fn status_of(client: &reqwest::Client, url: &str) -> u16 {
    match client.get(url).send().await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}

/// (version, credit_score, segment) of what `api` serves for `id`.
async fn served(client: &reqwest::Client, api: &str, id: &str) -> Option<(i64, i64, String)> {
    let response = client
        .get(format!("{api}/api/features/{id}/"))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body: Value = response.json().await.ok()?;
    Some((
        body["version"].as_i64()?,
        body["features"]["credit_score"].as_i64()?,
        body["features"]["segment"].as_str()?.to_owned(),
    ))
}

/// Until both replicas serve a document for which `done` holds.
async fn poll_both(
    qs: &Quickstart,
    client: &reqwest::Client,
    id: &str,
    what: &str,
    done: impl Fn(&(i64, i64, String)) -> bool,
) {
    let started = Instant::now();
    loop {
        let mut last = None;
        let mut all = true;
        for replica in [1, 2] {
            let doc = served(client, &qs.api(replica), id).await;
            if !doc.as_ref().is_some_and(&done) {
                all = false;
                last = Some((replica, doc));
                break;
            }
        }
        if all {
            println!("ok: {what} (both replicas after {:?})", started.elapsed());
            return;
        }
        assert!(
            started.elapsed() < POLL_BOUND,
            "{what}: not served by both replicas within {POLL_BOUND:?} (last: {last:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_starts_serves_restarts_nothing_and_stops_everything() {
    // The test bed provides SecantusDB's virtualenv (and says how if missing).
    testkit::mongo_uri();
    let qs = Quickstart::new();
    // A clean slate: anything left by an earlier run here is stopped, its data removed.
    qs.run(&["stop", "--purge"]);

    // 1. start
    let began = Instant::now();
    let start = qs.run(&["start"]);
    assert!(start.ok, "quickstart start failed");
    println!("ok: start in {:?}", began.elapsed());
    let state = qs.state();
    for var in PORT_VARS {
        assert_eq!(
            state.get(var).map(String::as_str),
            Some(qs.port(var).to_string().as_str()),
            "the state file names the requested {var}"
        );
    }

    // 2. health, write, read
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    for replica in [1, 2] {
        let url = format!("{}/api/health/", qs.api(replica));
        assert_eq!(status_of(&client, &url).await, 200, "GET {url}");
    }
    let invalidator = format!("http://127.0.0.1:{}/health", qs.port("QS_INVALIDATOR_PORT"));
    assert_eq!(
        status_of(&client, &invalidator).await,
        200,
        "GET {invalidator}"
    );
    let swagger = format!("{}/swagger/", qs.api(1));
    assert_eq!(status_of(&client, &swagger).await, 200, "GET {swagger}");
    let metrics = format!("{}/metrics", qs.api(2));
    assert_eq!(status_of(&client, &metrics).await, 200, "GET {metrics}");

    let id = format!(
        "QSTEST-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    );
    let posted = client
        .post(format!("{}/api/features/", qs.api(1)))
        .json(&serde_json::json!({
            "customer_id": id,
            "features": {"credit_score": 700, "segment": "gold"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status().as_u16(), 201, "POST {id} on replica 1");
    let one = served(&client, &qs.api(1), &id).await;
    let two = served(&client, &qs.api(2), &id).await;
    let (v0, _, _) = one.clone().expect("replica 1 serves the new document");
    assert!(two.is_some(), "replica 2 serves the new document");
    assert_eq!(
        one.as_ref().map(|d| d.0),
        two.as_ref().map(|d| d.0),
        "both replicas serve the same version"
    );
    for replica in [1, 2] {
        let url = format!("{}/api/features/{id}/", qs.api(replica));
        assert_eq!(status_of(&client, &url).await, 200, "GET {url}");
    }

    // 3. direct MongoDB writes, with and without a new version
    let mongo = mongodb::Client::with_uri_str(&state["MONGO_URI"])
        .await
        .unwrap();
    let features = mongo
        .database(&state["MONGO_DB"])
        .collection::<Document>("customer_features");
    let update = |change: Document| {
        let features = features.clone();
        let id = id.clone();
        async move {
            let result = features.update_one(doc! {"_id": id}, change).await.unwrap();
            assert_eq!(
                (result.matched_count, result.modified_count),
                (1, 1),
                "direct update_one"
            );
        }
    };
    update(doc! {"$set": {"features.credit_score": 801}, "$inc": {"version": 1}}).await;
    poll_both(
        &qs,
        &client,
        &id,
        "new credit_score 801 at the new version",
        |d| d.1 == 801 && d.0 == v0 + 1,
    )
    .await;
    update(doc! {"$set": {"features.segment": "platinum"}}).await;
    poll_both(&qs, &client, &id, "new segment (unversioned write)", |d| {
        d.2 == "platinum" && d.1 == 801
    })
    .await;
    poll_both(
        &qs,
        &client,
        &id,
        "the unversioned write got a version of its own",
        |d| d.2 == "platinum" && d.0 > v0 + 1,
    )
    .await;

    // 4. second start
    let pids_before = qs.our_pids();
    let files_before = qs.pid_files();
    assert_eq!(pids_before.len(), 5, "5 processes run: {pids_before:?}");
    let again = qs.run(&["start"]);
    assert!(
        again
            .out
            .contains("everything is already running: nothing started"),
        "second start says it started nothing"
    );
    assert_eq!(
        again.out.matches("is already running").count(),
        6,
        "second start reports 'already running' for all 5"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        qs.our_pids(),
        pids_before,
        "second start started no process"
    );
    assert_eq!(
        qs.pid_files(),
        files_before,
        "second start left the PID files alone"
    );
    assert!(qs.run(&["status"]).ok, "status is 0 while all run");

    // 5. stop
    let stop = qs.run(&["stop"]);
    let stopping = stop
        .out
        .lines()
        .filter(|l| l.starts_with("==> stopping "))
        .count();
    assert_eq!(stopping, 5, "stop stopped 5 components");
    let left: Vec<u32> = pids_before.iter().copied().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "every started PID is gone; left: {left:?}");
    assert!(
        qs.our_pids().is_empty(),
        "no process of this state dir is left"
    );
    let open: Vec<u16> = qs.ports.iter().copied().filter(|p| port_open(*p)).collect();
    assert!(open.is_empty(), "all 5 ports are closed; open: {open:?}");
    assert!(qs.pid_files().is_empty(), "no PID files are left");
    assert_eq!(
        qs.run(&["status"]).code,
        Some(3),
        "status says 'not running'"
    );

    // 6. a busy port you chose: start refuses before starting anything
    let api2 = qs.port("QS_API2_PORT");
    let holder = TcpListener::bind(("127.0.0.1", api2)).unwrap();
    let busy = qs.run(&["start"]);
    assert!(!busy.ok, "start with a busy QS_API2_PORT fails");
    assert!(
        busy.out.contains(&format!(
            "port {api2} (QS_API2_PORT, for cache-api api-2) is busy"
        )),
        "... naming the busy port"
    );
    assert!(qs.our_pids().is_empty(), "... and leaves nothing running");
    drop(holder);
}
