//! `cache-api`: customer feature documents over REST, served from the nearest
//! cache tier that holds them.
//!
//! - [`startup`]: [`Application`] — `build` wires settings into the store, the
//!   tiers and the router and binds the port; `run` serves until shutdown.
//! - [`routes`]: one module per resource (features, health, info, docs).
//! - [`error`]: [`ApiError`], every failure as a JSON body with the right status.
//! - [`extract`]: the JSON body extractor that turns bad input into `ApiError`s.
//! - [`server`]: the serving loop with its limits (connection cap, header
//!   and idle timeouts, half-close, graceful drain).
//! - [`admission`]: which route needs which scope; the admission of one
//!   request: shed load, authenticate, authorize, rate-limit (decisions in
//!   the `access` crate).
//! - [`middleware`]: the one layer around every route: per-request span
//!   (continuing the caller's trace), metrics, the `traceparent` response
//!   header, admission, the request deadline.
//! - [`fast_path`]: `GET` of one customer's document, answered before the
//!   router with what the router would answer.
//!
//! The cache logic itself lives in `feature-cache`; this crate is wiring.

pub mod admission;
pub mod error;
pub mod extract;
pub mod fast_path;
pub mod middleware;
pub mod routes;
pub mod server;
pub mod startup;
pub mod state;

pub use error::ApiError;
pub use startup::Application;
