//! Infrastructure for the workspace's tests (and local runs): real servers
//! and processes, never a mock. Product code never links it, and it links no
//! product crate: services are started as processes, from their binaries.
//!
//! - [`redis`]: [`TestRedis`], a private `redis-server` per test on a free
//!   port, which can be stopped and restarted on the same port.
//! - [`redis_cluster`]: [`TestRedisCluster`], a private Redis Cluster (3
//!   masters + 3 replicas) per test, with master kills and slot migrations.
//! - [`mongo`]: the testbed's MongoDB ([`mongo_uri`]) and a database of the
//!   test's own ([`TestDb`], [`unique_db`]).
//! - [`process`]: [`ChildGuard`] (a child process killed on drop), the one
//!   SIGTERM-then-SIGKILL routine ([`process::terminate`]), process start
//!   times, free ports, waiting for ports and HTTP endpoints, locating
//!   workspace binaries.
//! - [`launch`]: [`launch::Launch`], starting a process and waiting until it
//!   is ready, attached (killed on drop, for tests) or detached (outlives the
//!   command, for `cargo xtask`); one code path for both.
//! - [`ready`]: [`ready::Ready`], readiness and health probes (HTTP, Redis
//!   PING, MongoDB ping).
//! - [`state`]: [`state::StateDir`], where detached processes are recorded
//!   (pid, start time, port, log) and stopped by PID again.
//! - [`wait`]: [`eventually`], polling until a condition holds.
//! - [`services`]: [`services::ServiceProcess`], a workspace binary run as a
//!   child process with its own environment and log file.
//! - [`secantus`]: [`secantus::TestMongo`], a MongoDB stand-in of the test's own.
//! - [`proxy`]: [`proxy::GatedProxy`], a TCP proxy a test can hold and release.
//! - [`otlp`]: [`otlp::OtlpReceiver`], an OTLP/HTTP receiver that decodes spans.
//! - [`prometheus`]: reading values out of the Prometheus text format.
//! - [`logs`]: [`CapturedLogs`], what `tracing` wrote during a test.
//! - [`tls`]: [`tls::TestCa`], a private CA with server and client
//!   certificates (for `rediss://`).
//!
//! The services come from the test bed: run the tests through
//! `scripts/test.sh`, or `cargo xtask testbed up DIR` and source `DIR/env`
//! (it exports `MONGO_URI`, `REDIS_SERVER`, …). The system Redis on port 6379
//! is never used.

pub mod launch;
pub mod logs;
pub mod mongo;
pub mod otlp;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod ready;
pub mod redis;
pub mod redis_cluster;
pub mod secantus;
pub mod services;
pub mod state;
pub mod tls;
pub mod wait;

pub use logs::CapturedLogs;
pub use mongo::{TestDb, mongo_uri, unique_db};
pub use process::{ChildGuard, cargo_bin, free_port, wait_for_port, wait_http_ok};
pub use redis::TestRedis;
pub use redis_cluster::TestRedisCluster;
pub use wait::{Check, eventually};
