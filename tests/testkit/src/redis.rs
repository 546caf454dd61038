//! A private `redis-server` per test, and how every private Redis of the
//! project is started (the test bed's and quickstart's too).

use crate::launch::{Launch, Owner};
use crate::process::{ChildGuard, free_port};
use crate::ready::Ready;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a fresh `redis-server` may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// `redis-server` on 127.0.0.1:`port`, without persistence (`--save ""
/// --appendonly no`), working dir `dir` (created); ready when it answers PING.
pub fn launch(server: &Path, port: u16, dir: &Path) -> std::io::Result<Launch> {
    std::fs::create_dir_all(dir)?;
    Ok(Launch::new("redis-server", server)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .port(port)
        .ready(Ready::redis_port(port))
        .timeout(START_TIMEOUT))
}

/// Extra `redis-server` flags for a TLS port `tls_port` beside the plain one
/// (which stays, for the test's own probes and checks), with the server
/// certificate of `ca`; `verify_clients` asks clients for a certificate of
/// that CA too. Clients reach it at `rediss://127.0.0.1:{tls_port}/0`.
pub fn tls_args(ca: &crate::tls::TestCa, tls_port: u16, verify_clients: bool) -> Vec<String> {
    let path = |p: PathBuf| p.display().to_string();
    vec![
        "--tls-port".into(),
        tls_port.to_string(),
        "--tls-cert-file".into(),
        path(ca.server_cert()),
        "--tls-key-file".into(),
        path(ca.server_key()),
        "--tls-ca-cert-file".into(),
        path(ca.ca_cert()),
        "--tls-auth-clients".into(),
        if verify_clients { "yes" } else { "no" }.into(),
    ]
}

/// `$REDIS_SERVER` (set by the test bed), else `redis-server` from `PATH`.
pub fn server_path() -> PathBuf {
    std::env::var_os("REDIS_SERVER")
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("redis-server"))
}

/// A `redis-server` of the test's own on a free port of 127.0.0.1, without
/// persistence (`--save "" --appendonly no`). Killed when dropped.
///
/// The binary is `$REDIS_SERVER` (set by the test bed), else `redis-server`
/// from `PATH`. The system Redis on port 6379 is never touched.
pub struct TestRedis {
    port: u16,
    server: PathBuf,
    args: Vec<String>,
    child: Option<ChildGuard>,
}

impl TestRedis {
    /// Starts a server and waits until it answers PING. Retries on another
    /// port if the chosen one was taken in the meantime. Panics if no server
    /// starts.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Like [`TestRedis::start`], with extra server flags (e.g.
    /// `["--maxmemory", "2mb", "--maxmemory-policy", "volatile-lru"]`); a
    /// restart keeps them.
    pub async fn start_with(args: &[&str]) -> Self {
        let server = server_path();
        let mut last = String::new();
        for _ in 0..5 {
            let mut redis = Self {
                port: free_port(),
                server: server.clone(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                child: None,
            };
            match redis.spawn().await {
                Ok(()) => return redis,
                Err(err) => last = err,
            }
        }
        panic!("could not start {}: {last}", server.display());
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// Kills the server (SIGKILL) and waits until it is gone: clients see
    /// their connections drop and new connections refused.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill9();
        }
    }

    /// Stops the server if it runs and starts a new, empty one on the same
    /// port. Panics if it does not come up within a few seconds.
    pub async fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn().await {
                Ok(()) => return,
                // The port can stay busy for a moment after the kill.
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => panic!("could not restart redis on port {}: {err}", self.port),
            }
        }
    }

    /// A new multiplexed connection to this server.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|err| panic!("cannot connect to {}: {err}", self.url()))
    }

    async fn spawn(&mut self) -> Result<(), String> {
        let started = launch(&self.server, self.port, &std::env::temp_dir())
            .map_err(|err| err.to_string())?
            .args(&self.args)
            .start(Owner::Attached)
            .await?;
        self.child = started.into_child();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stops_and_restarts_on_the_same_port() {
        let mut redis = TestRedis::start().await;
        assert_ne!(redis.port(), 6379);
        let mut conn = redis.client().await;
        let _: () = redis::cmd("SET")
            .arg("k")
            .arg("v")
            .query_async(&mut conn)
            .await
            .unwrap();
        let port = redis.port();

        redis.stop();
        assert!(!redis.is_running());
        assert!(Ready::redis_port(port).probe().await.is_err());

        redis.restart().await;
        assert_eq!(redis.port(), port);
        assert!(redis.is_running());
        let mut conn = redis.client().await;
        let value: Option<String> = redis::cmd("GET")
            .arg("k")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(value, None, "a restarted server starts empty");
    }
}
