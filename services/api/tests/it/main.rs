//! The API service's integration tests: `cache_api::Application` in-process
//! on a free port over a Redis and a database of each test's own.

mod support;

mod absence;
mod auth;
mod bulk_batch;
mod coalescing;
mod contract;
mod docs;
mod errors;
mod exact;
mod fast_path;
mod limits;
mod outcomes;
mod resilience;
mod tiers;
