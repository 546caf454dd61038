//! System tests: the real binaries as processes (`cache-invalidator`, two or
//! more `cache-api` replicas) over a Redis and a database of each test's own.
//! See `system_tests::Deployment` for the arrangement.

mod absence;
mod admin;
mod audit;
mod auth_reload;
mod batches;
mod cluster;
mod compose;
mod convergence;
mod drain;
mod failover;
mod feed;
mod foreign_writes;
mod gaps;
mod load_balancer;
mod memory_pressure;
mod propagation;
mod quickstart;
mod tracing;
mod transport;
mod warm;
