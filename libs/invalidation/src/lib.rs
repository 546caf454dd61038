//! How changes reach every API replica.
//!
//! - [`message`]: [`Invalidation`], the JSON message the invalidator publishes
//!   on the pub/sub channel and appends to the stream, and how a replica
//!   applies one to its near cache.
//! - [`stream_id`]: ordering of Redis Stream entry ids.
//! - [`follower`]: the replica side — subscribe, apply in order, detect gaps
//!   (reconnects, sequence gaps, a new invalidator run, a lost message in a
//!   quiet period) and heal them from the stream, or flush the near cache
//!   when the stream no longer reaches back far enough.

pub mod follower;
pub mod message;
pub mod stream_id;

pub use follower::{Follower, FollowerConfig, FollowerStatus};
pub use message::{ClusterTime, Invalidation, Op};
pub use stream_id::StreamId;

/// The field under which each stream entry holds its message JSON.
pub const STREAM_FIELD: &str = "message";
