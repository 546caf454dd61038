//! How changes reach every API replica.
//!
//! - [`message`]: [`Invalidation`], the JSON message the invalidator publishes
//!   on the pub/sub channel and appends to the stream, and how a replica
//!   applies one to its near cache.
//! - [`follower`]: the replica side — subscribe, apply in order, detect gaps
//!   (reconnects, sequence gaps, a new invalidator run, a quiet lost message)
//!   and heal them from the stream, or flush when the stream no longer
//!   reaches back far enough.

pub mod follower;
pub mod message;

pub use message::{ClusterTime, Invalidation, Op};
