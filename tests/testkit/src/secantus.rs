//! A SecantusDB (the MongoDB stand-in) of the test's own, for tests that need
//! server flags the shared test bed does not have (a tiny oplog) or that
//! disturb every client of the server (pruning the oplog); and how every
//! SecantusDB of the project is started (the test bed's and quickstart's too).

use crate::launch::{Launch, Owner};
use crate::process::{ChildGuard, free_port};
use crate::ready::Ready;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a fresh SecantusDB may take to answer `ping` (about 1 s usually).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The replica set SecantusDB reports; clients name it in their URI.
pub const REPLICA_SET: &str = "secantus";

/// `secantusd` on 127.0.0.1:`port` storing in `data`, `--sync-on-commit`,
/// settings only from the command line (`config` is written empty: an
/// explicit `--config` stops it from reading `./secantusd.toml` or
/// `~/.secantus/secantusd.toml`). Ready when it answers `ping`.
pub fn launch(bin: &Path, port: u16, config: &Path, data: &Path) -> std::io::Result<Launch> {
    std::fs::create_dir_all(data)?;
    std::fs::write(config, "# settings come from command-line flags\n")?;
    Ok(Launch::new("secantusd", bin)
        .arg("--config")
        .arg(config)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .arg("--storage-path")
        .arg(data)
        .arg("--sync-on-commit")
        .port(port)
        .ready(Ready::mongo_port(port))
        .timeout(START_TIMEOUT))
}

/// `mongodb://127.0.0.1:PORT/?replicaSet=secantus&retryWrites=false`: how
/// clients reach a SecantusDB on `port`.
pub fn uri(port: u16) -> String {
    format!("mongodb://127.0.0.1:{port}/?replicaSet={REPLICA_SET}&retryWrites=false")
}

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
                     `scripts/test.sh`, or `cargo xtask testbed up DIR` and then \
                     `set -a; . DIR/env; set +a` before `cargo test`."
                )
            });
        let dir = crate::services::target_dir().join("service-logs");
        let _ = std::fs::create_dir_all(&dir);
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port();
            let log = dir.join(format!("secantusd-{port}.log"));
            let config = dir.join(format!("secantusd-{port}.toml"));
            let data = dir.join(format!("secantusd-{port}-data"));
            let _ = std::fs::remove_dir_all(&data);
            let _ = std::fs::remove_file(&log);
            let launch = match launch(&bin, port, &config, &data) {
                Ok(launch) => launch.args(extra_args).log(&log),
                Err(err) => panic!("cannot prepare {}: {err}", data.display()),
            };
            let mut mongo = Self {
                port,
                child: None,
                log,
                data,
            };
            match launch.start(Owner::Attached).await {
                Ok(started) => {
                    mongo.child = started.into_child();
                    return mongo;
                }
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
        uri(self.port)
    }

    /// A driver client for this server.
    pub async fn client(&self) -> mongodb::Client {
        mongodb::Client::with_uri_str(self.uri())
            .await
            .expect("mongodb client")
    }

    /// Sets the `failCommand` fail point (the server must run with
    /// `--enable-test-commands`): the next `times` commands named in
    /// `data.failCommands` fail, or are held, as `data` says.
    pub async fn fail_commands(&self, times: i32, data: bson::Document) {
        self.client()
            .await
            .database("admin")
            .run_command(bson::doc! {
                "configureFailPoint": "failCommand",
                "mode": { "times": times },
                "data": data,
            })
            .await
            .expect("configureFailPoint (needs --enable-test-commands)");
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
        }
        let _ = std::fs::remove_dir_all(&self.data);
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
