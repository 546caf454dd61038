//! What every API replica holds, asked for over Redis: the fleet view
//! operators (the admin API, `cachectl`) and the auditor rely on.
//!
//! - [`config`]: [`FleetConfig`], the keys and channels of one collection's
//!   fleet and its timings.
//! - [`wire`]: the messages — heartbeats ([`ReplicaStatus`]), near-cache
//!   queries and their replies ([`EntryView`]) — owned here on both ends.
//! - [`heartbeat`]: the replica side's [`Heartbeat`], publishing what the
//!   replica is and holds every `HEARTBEAT_INTERVAL_MS`.
//! - [`responder`]: the replica side's [`Responder`], answering near-cache
//!   queries on the admin channel.
//! - [`client`]: the asking side, [`FleetClient`]: live replicas, a fan-out
//!   query with a deadline that names the replicas that stayed silent, and
//!   eviction requests.
//! - [`requests`]: the operator requests stream, written by [`FleetClient`]
//!   and read by the leading invalidator ([`RequestQueue`]).
//! - [`error`]: [`FleetError`], what asking the fleet can fail with.

pub mod client;
pub mod config;
pub mod error;
pub mod heartbeat;
pub mod requests;
pub mod responder;
pub mod wire;

pub use client::{FleetClient, NearAnswer, NearReport, NearReportMany};
pub use config::FleetConfig;
pub use error::FleetError;
pub use heartbeat::Heartbeat;
pub use requests::{FencedRequestQueue, OperatorRequest, RequestKind, RequestQueue};
pub use responder::Responder;
pub use wire::{EntryView, ReplicaStatus, Vitals};
