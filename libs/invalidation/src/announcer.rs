//! The invalidator's side of the wire: every change goes to its partition's
//! stream and channel together with the change-feed position it came from,
//! in one atomic script behind the writer's fence, so a replica never hears
//! of a change whose position was not saved (and vice versa).
//!
//! Each partition numbers its messages (`seq`, per run) so a replica sees a
//! gap in each. Each partition saves the position of the change it
//! announced last; changes are announced in feed order, one after the
//! other, so the position saved last — in any partition — is where every
//! earlier change has had all its effects. Saves are ordered by the
//! writer's fencing token and a counter of its saves: the resume position
//! is the save that ranks highest.

use crate::channels::{Channels, Partition, STREAM_FIELD};
use crate::message::Invalidation;
use feature_cache::{Fence, FencedWriteError, RedisConnection};
use redis::Script;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

const ANNOUNCE_SCRIPT: &str = include_str!("lua/announce.lua");

/// A saved position: `v2:<fencing token>:<save counter>:<position>`.
const SAVED_V2: &str = "v2:";

/// One invalidator run: its id and each partition's message numbers.
struct Run {
    id: String,
    last_seq: Vec<AtomicU64>,
    saves: AtomicU64,
}

/// Reads what announcements saved; [`Announcer::fenced`] makes the writer.
#[derive(Clone)]
pub struct Announcer {
    redis: RedisConnection,
    channels: Channels,
    run: Arc<Run>,
}

impl Announcer {
    /// `run_id` identifies this process's numbering of messages.
    pub fn new(redis: RedisConnection, channels: Channels, run_id: String) -> Self {
        let partitions = usize::from(channels.partitions.max(1));
        Self {
            redis,
            channels,
            run: Arc::new(Run {
                id: run_id,
                last_seq: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
                saves: AtomicU64::new(0),
            }),
        }
    }

    pub fn run_id(&self) -> &str {
        &self.run.id
    }

    pub fn channels(&self) -> &Channels {
        &self.channels
    }

    /// The position saved last, over every partition, if any.
    pub async fn saved_position(&self) -> redis::RedisResult<Option<String>> {
        let keys: Vec<String> = self
            .channels
            .all()
            .into_iter()
            .map(|p| p.position)
            .collect();
        let saved: Vec<Option<String>> = if keys.len() == 1 {
            vec![
                redis::cmd("GET")
                    .arg(&keys[0])
                    .query_async(&mut self.redis.clone())
                    .await?,
            ]
        } else {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.get(key);
            }
            pipe.query_async(&mut self.redis.clone()).await?
        };
        Ok(saved
            .into_iter()
            .flatten()
            .map(|value| SavedPosition::parse(&value))
            .max_by_key(|saved| saved.rank)
            .map(|saved| saved.position))
    }

    /// An announcer whose every announcement lands only while `fence` holds.
    pub fn fenced(&self, fence: Fence) -> FencedAnnouncer {
        FencedAnnouncer {
            announcer: self.clone(),
            script: Fence::script(ANNOUNCE_SCRIPT),
            fence_rank: token_counter(&fence.token),
            fence,
        }
    }
}

/// A position as saved, with its rank among saves.
struct SavedPosition {
    rank: (u64, u64),
    position: String,
}

impl SavedPosition {
    fn parse(value: &str) -> Self {
        let parsed = value.strip_prefix(SAVED_V2).and_then(|rest| {
            let mut parts = rest.splitn(3, ':');
            let fence = parts.next()?.parse().ok()?;
            let save = parts.next()?.parse().ok()?;
            Some(Self {
                rank: (fence, save),
                position: parts.next()?.to_owned(),
            })
        });
        // A position saved by an earlier version: ranks below any other.
        parsed.unwrap_or_else(|| Self {
            rank: (0, 0),
            position: value.to_owned(),
        })
    }
}

/// The counter a fencing token ends with (`<holder>:<n>`).
fn token_counter(token: &str) -> u64 {
    token
        .rsplit(':')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Announces behind a [`Fence`]; made once per term of the fence's holder.
#[derive(Clone)]
pub struct FencedAnnouncer {
    announcer: Announcer,
    script: Script,
    fence: Fence,
    fence_rank: u64,
}

impl FencedAnnouncer {
    /// Numbers `message` in its partition, appends it to the partition's
    /// stream, publishes it and saves `position`, in one atomic step; a
    /// message of no customer (a flush) goes to every partition. Returns
    /// the (first) stream id.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", op = message.op.as_str()))]
    pub async fn announce(
        &self,
        mut message: Invalidation,
        position: &str,
    ) -> Result<String, FencedWriteError> {
        let channels = &self.announcer.channels;
        let partitions = match &message.customer_id {
            Some(customer_id) => vec![channels.partition_of(customer_id)],
            None => channels.all(),
        };
        message.run_id = self.announcer.run.id.clone();
        let mut first = None;
        for partition in partitions {
            message.seq = self.announcer.run.last_seq[usize::from(partition.index)]
                .fetch_add(1, Ordering::Relaxed)
                + 1;
            let (head, tail) = message.channel_payload_around_stream_id();
            let id = self
                .run(&partition, &message.stream_json(), position, &head, &tail)
                .await?;
            first.get_or_insert(id);
        }
        Ok(first.unwrap_or_default())
    }

    /// Saves the position alone (the feed moved on without changes to announce).
    pub async fn save_position(&self, position: &str) -> Result<(), FencedWriteError> {
        let partition = self.announcer.channels.partition(0);
        self.run(&partition, "", position, "", "").await.map(|_| ())
    }

    async fn run(
        &self,
        partition: &Partition,
        entry: &str,
        position: &str,
        head: &str,
        tail: &str,
    ) -> Result<String, FencedWriteError> {
        let save = self.announcer.run.saves.fetch_add(1, Ordering::Relaxed) + 1;
        let saved = format!("{SAVED_V2}{}:{save}:{position}", self.fence_rank);
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(&partition.stream)
            .key(&partition.position)
            .arg(STREAM_FIELD)
            .arg(entry)
            .arg(&partition.channel)
            .arg(self.announcer.channels.stream_maxlen)
            .arg(saved)
            .arg(head)
            .arg(tail)
            .arg(if partition.sharded {
                "SPUBLISH"
            } else {
                "PUBLISH"
            });
        self.fence.append(&mut invocation, &partition.stream);
        let id: String = invocation
            .invoke_async(&mut self.announcer.redis.clone())
            .await?;
        metrics::counter!("invalidator_resume_token_saves_total").increment(1);
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_save_ranked_highest_wins_and_old_saves_rank_lowest() {
        let old = SavedPosition::parse("{\"_data\":\"82\"}");
        assert_eq!(old.rank, (0, 0));
        assert_eq!(old.position, "{\"_data\":\"82\"}");
        let new = SavedPosition::parse("v2:7:12:{\"_data\":\"8:2\"}");
        assert_eq!(new.rank, (7, 12));
        assert_eq!(new.position, "{\"_data\":\"8:2\"}");
        assert!(SavedPosition::parse("v2:8:1:x").rank > new.rank);
        assert_eq!(token_counter("inv-0:17"), 17);
        assert_eq!(token_counter("host:12:3"), 3);
    }
}
