//! `cache-invalidator`: makes every cache tier follow MongoDB.
//!
//! - [`startup`]: [`Application`] — wiring, the HTTP endpoint, graceful shutdown.
//! - [`worker`]: the three steps below wired together, and the worker's status.
//! - [`leadership`]: the lease with a fencing token; a [`leadership::Term`]
//!   carries the fence every write of the term goes through.
//! - [`tail`]: the change feed of one term — open, resume or start fresh
//!   (flushing), save the position.
//! - [`apply`]: one change's cache work — [`apply::plan`] (pure), then the
//!   guarded Redis write and the announcement, both fenced.
//! - [`audit`]: the continuous consistency audit of a sample of the applied
//!   changes; the keys it finds wrong are evicted by the tail loop.
//! - [`health`]: `/health` (role, events) and `/metrics`.

pub mod apply;
pub mod audit;
pub mod health;
pub mod leadership;
pub mod startup;
pub mod tail;
pub mod worker;

pub use startup::Application;
