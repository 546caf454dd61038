//! A SecantusDB (the MongoDB stand-in) of the test's own, for tests that need
//! server flags the shared test bed does not have (a tiny oplog) or that
//! disturb every client of the server (pruning the oplog).

use crate::process::{ChildGuard, free_port};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a fresh SecantusDB may take to answer `ping` (about 1 s usually).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// `$SECANTUSD` on a free port of 127.0.0.1 with `--sync-on-commit` and
/// `extra_args`, storing under `target/service-logs/secantusd-<port>-data`.
/// Killed, and its storage removed, when dropped. Its log is
/// `target/service-logs/secantusd-<port>.log`.
pub struct TestMongo {
    port: u16,
    child: Option<ChildGuard>,
    log: PathBuf,
    data: PathBuf,
}

impl TestMongo {
    /// Starts the server and waits until it answers `ping`. Panics, naming
    /// the log, if it does not.
    pub async fn start(extra_args: &[&str]) -> Self {
        let bin = std::env::var_os("SECANTUSD")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                panic!(
                    "SECANTUSD is not set: these tests need the test bed. Run them with \
                     `scripts/test.sh`, or `scripts/testbed.sh up DIR` and then \
                     `set -a; . DIR/env; set +a` before `cargo test`."
                )
            });
        let dir = crate::services::target_dir().join("service-logs");
        let _ = std::fs::create_dir_all(&dir);
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log = dir.join(format!("secantusd-{port}.log"));
            // An explicit (empty) config file stops secantusd-py from picking up
            // a ./secantusd.toml or ~/.secantus/secantusd.toml.
            let config = dir.join(format!("secantusd-{port}.toml"));
            let data = dir.join(format!("secantusd-{port}-data"));
            let _ = std::fs::remove_dir_all(&data);
            let _ = std::fs::write(&config, "# written by testkit\n");
            let out = match std::fs::File::create(&log) {
                Ok(file) => file,
                Err(err) => panic!("cannot create {}: {err}", log.display()),
            };
            let err = out.try_clone().expect("clone log handle");
            let child = Command::new(&bin)
                .arg("--config")
                .arg(&config)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .arg("--storage-path")
                .arg(&data)
                .arg("--sync-on-commit")
                .args(extra_args)
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .spawn()
                .unwrap_or_else(|err| panic!("cannot run {}: {err}", bin.display()));
            let mut mongo = Self {
                port,
                child: Some(ChildGuard::from(child)),
                log,
                data,
            };
            match mongo.wait_ready().await {
                Ok(()) => return mongo,
                Err(err) => {
                    last = format!(
                        "{err}\n----- {} -----\n{}",
                        mongo.log.display(),
                        crate::services::tail_of(&mongo.log, 30)
                    );
                    mongo.stop();
                }
            }
        }
        panic!("could not start {}: {last}", bin.display());
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mongodb://127.0.0.1:PORT/?replicaSet=secantus&retryWrites=false`.
    pub fn uri(&self) -> String {
        format!(
            "mongodb://127.0.0.1:{}/?replicaSet=secantus&retryWrites=false",
            self.port
        )
    }

    /// A driver client for this server.
    pub async fn client(&self) -> mongodb::Client {
        mongodb::Client::with_uri_str(self.uri())
            .await
            .expect("mongodb client")
    }

    /// Runs `{"secantusAdmin.pruneOplog": 1}` against the admin database:
    /// trims the oplog to its configured bound now. Returns the reply.
    pub async fn prune_oplog(&self) -> bson::Document {
        self.client()
            .await
            .database("admin")
            .run_command(bson::doc! { "secantusAdmin.pruneOplog": 1 })
            .await
            .expect("secantusAdmin.pruneOplog")
    }

    /// Kills the server (SIGKILL) and removes its storage.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill9();
            let _ = std::fs::remove_dir_all(&self.data);
        }
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = mongodb::Client::with_uri_str(format!(
            "mongodb://127.0.0.1:{}/?directConnection=true&serverSelectionTimeoutMS=1000",
            self.port
        ))
        .await
        .map_err(|err| err.to_string())?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()
            {
                return Err(format!("secantusd exited at start-up ({status})"));
            }
            let ping = client
                .database("admin")
                .run_command(bson::doc! { "ping": 1 })
                .await;
            match ping {
                Ok(_) => return Ok(()),
                Err(err) if Instant::now() >= deadline => {
                    return Err(format!("no ping answer within {START_TIMEOUT:?}: {err}"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for TestMongo {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- secantusd on port {}, last lines of {} -----\n{}\n-----",
                self.port,
                self.log.display(),
                crate::services::tail_of(&self.log, 30)
            );
        }
        self.stop();
    }
}
