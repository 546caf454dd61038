//! How changes reach every API replica: this crate owns both ends of the
//! wire.
//!
//! - [`message`]: [`Invalidation`], the JSON message on the pub/sub channel
//!   and in the stream, and how a replica applies one to its near cache.
//! - [`channels`]: [`Channels`], where messages go: partitions by key slot,
//!   each with its stream, channel and saved position (sharded on a cluster).
//! - [`announcer`]: the invalidator's side — [`Announcer`] reads the saved
//!   change-feed position; its [`FencedAnnouncer`] appends to the stream,
//!   publishes and saves the position in one atomic, fenced step.
//! - [`subscriber`]: the replica's side — subscribe, apply in order, detect
//!   gaps (reconnects, sequence gaps, a new invalidator run, a lost message
//!   in a quiet period) and heal them from the stream, or flush the near
//!   cache when the stream no longer reaches back far enough.
//! - [`stream_id`]: ordering of Redis Stream entry ids.
//! - [`mode`]: [`InvalidationMode`], refresh Redis with a change or drop the entry.

pub mod announcer;
pub mod channels;
pub mod message;
pub mod mode;
pub mod stream_id;
pub mod subscriber;

pub use announcer::{Announcer, FencedAnnouncer};
pub use channels::{Channels, Partition};
pub use message::{ClusterTime, Invalidation, Op};
pub use mode::InvalidationMode;
pub use stream_id::StreamId;
pub use subscriber::{Subscriber, SubscriberConfig, SubscriberStatus};
