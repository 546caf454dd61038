//! The invalidator's side of the wire: every change goes to the stream and
//! the channel together with the change-feed position it came from, in one
//! atomic script behind the writer's fence, so a replica never hears of a
//! change whose position was not saved (and vice versa).

use crate::channels::{Channels, STREAM_FIELD};
use crate::message::Invalidation;
use feature_cache::{Fence, FencedWriteError};
use redis::Script;
use redis::aio::ConnectionManager;

const ANNOUNCE_SCRIPT: &str = include_str!("lua/announce.lua");

/// Reads what announcements saved; [`Announcer::fenced`] makes the writer.
#[derive(Clone)]
pub struct Announcer {
    redis: ConnectionManager,
    channels: Channels,
    /// Where the change-feed position is saved with each announcement.
    position_key: String,
}

impl Announcer {
    pub fn new(redis: ConnectionManager, channels: Channels, position_key: String) -> Self {
        Self {
            redis,
            channels,
            position_key,
        }
    }

    /// The position saved with the last announcement, if any.
    pub async fn saved_position(&self) -> redis::RedisResult<Option<String>> {
        redis::cmd("GET")
            .arg(&self.position_key)
            .query_async(&mut self.redis.clone())
            .await
    }

    /// An announcer whose every announcement lands only while `fence` holds.
    pub fn fenced(&self, fence: Fence) -> FencedAnnouncer {
        FencedAnnouncer {
            announcer: self.clone(),
            script: Fence::script(ANNOUNCE_SCRIPT),
            fence,
        }
    }
}

/// Announces behind a [`Fence`]; made once per term of the fence's holder.
#[derive(Clone)]
pub struct FencedAnnouncer {
    announcer: Announcer,
    script: Script,
    fence: Fence,
}

impl FencedAnnouncer {
    /// Appends `message` to the stream, publishes it and saves `position`,
    /// in one atomic step. Returns the stream id.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", op = message.op.as_str()))]
    pub async fn announce(
        &self,
        message: &Invalidation,
        position: &str,
    ) -> Result<String, FencedWriteError> {
        let (head, tail) = message.channel_payload_around_stream_id();
        self.run(&message.stream_json(), position, &head, &tail)
            .await
    }

    /// Saves the position alone (the feed moved on without changes to announce).
    pub async fn save_position(&self, position: &str) -> Result<(), FencedWriteError> {
        self.run("", position, "", "").await.map(|_| ())
    }

    async fn run(
        &self,
        entry: &str,
        position: &str,
        head: &str,
        tail: &str,
    ) -> Result<String, FencedWriteError> {
        let channels = &self.announcer.channels;
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(&channels.stream)
            .key(&self.announcer.position_key)
            .arg(STREAM_FIELD)
            .arg(entry)
            .arg(&channels.channel)
            .arg(channels.stream_maxlen)
            .arg(position)
            .arg(head)
            .arg(tail);
        self.fence.append(&mut invocation);
        let id: String = invocation
            .invoke_async(&mut self.announcer.redis.clone())
            .await?;
        metrics::counter!("invalidator_resume_token_saves_total").increment(1);
        Ok(id)
    }
}
