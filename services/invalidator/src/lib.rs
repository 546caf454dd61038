//! `cache-invalidator`: makes every cache tier follow MongoDB.
//!
//! - [`startup`]: [`Application`] — wiring, the `/health` and `/metrics`
//!   endpoint, graceful shutdown.
//! - [`worker`]: the leader's change stream loop and the standby's wait.
//! - [`change`]: what one change event means for the caches (pure).
//! - [`publish`]: the fenced, idempotent writes to Redis: the guarded cache
//!   update, and the stream entry + pub/sub message + resume token.
//! - [`lease`]: leadership with a fencing token.

pub mod change;
pub mod lease;
pub mod publish;
pub mod startup;
pub mod worker;

pub use startup::Application;
