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
        let mut pipe = redis::pipe();
        for key in &keys {
            pipe.get(key);
        }
        let saved: Vec<Option<String>> = pipe.query_async(&mut self.redis.clone()).await?;
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
        message: Invalidation,
        position: &str,
    ) -> Result<String, FencedWriteError> {
        let channels = &self.announcer.channels;
        let partitions = match &message.customer_id {
            Some(customer_id) => vec![channels.partition_of(customer_id)],
            None => channels.all(),
        };
        let mut first = None;
        for partition in partitions {
            let ids = self
                .run(&partition, std::slice::from_ref(&message), position)
                .await?;
            first = first.or(ids.into_iter().next());
        }
        Ok(first.unwrap_or_default())
    }

    /// Announces a batch of changes of single customers, in their order,
    /// then saves `position` (after the batch's last change): one script
    /// per partition the batch touches, run at once (each keeps its
    /// changes' order), and the position saved only once all landed — a
    /// failure in between repeats the batch from the position saved before
    /// it, never skips a change. One partition: one script saves it all.
    #[tracing::instrument(skip_all, fields(db.system = "redis", db.operation = "EVALSHA", count = messages.len()))]
    pub async fn announce_batch(
        &self,
        messages: &[Invalidation],
        position: &str,
    ) -> Result<(), FencedWriteError> {
        let channels = &self.announcer.channels;
        let mut parts: Vec<(Partition, Vec<Invalidation>)> = Vec::new();
        for message in messages {
            let partition = match &message.customer_id {
                Some(customer_id) => channels.partition_of(customer_id),
                None => channels.partition(0),
            };
            match parts.iter_mut().find(|(p, _)| p.index == partition.index) {
                Some((_, batch)) => batch.push(message.clone()),
                None => parts.push((partition, vec![message.clone()])),
            }
        }
        if let [(partition, batch)] = parts.as_slice() {
            self.run(partition, batch, position).await?;
            return Ok(());
        }
        futures::future::try_join_all(
            parts
                .iter()
                .map(|(partition, batch)| self.run(partition, batch, "")),
        )
        .await?;
        self.save_position(position).await
    }

    /// Saves the position alone (the feed moved on without changes to announce).
    pub async fn save_position(&self, position: &str) -> Result<(), FencedWriteError> {
        let partition = self.announcer.channels.partition(0);
        self.run(&partition, &[], position).await.map(|_| ())
    }

    /// One partition's script: `messages` numbered in the partition and
    /// announced in order, and `position` saved ('' for none).
    async fn run(
        &self,
        partition: &Partition,
        messages: &[Invalidation],
        position: &str,
    ) -> Result<Vec<String>, FencedWriteError> {
        let saved = if position.is_empty() {
            String::new()
        } else {
            let save = self.announcer.run.saves.fetch_add(1, Ordering::Relaxed) + 1;
            format!("{SAVED_V2}{}:{save}:{position}", self.fence_rank)
        };
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(&partition.stream)
            .key(&partition.position)
            .arg(STREAM_FIELD)
            .arg(&partition.channel)
            .arg(self.announcer.channels.stream_maxlen)
            .arg(saved)
            .arg(if partition.sharded {
                "SPUBLISH"
            } else {
                "PUBLISH"
            });
        let last_seq = &self.announcer.run.last_seq[usize::from(partition.index)];
        for message in messages {
            let mut message = message.clone();
            message.run_id = self.announcer.run.id.clone();
            message.seq = last_seq.fetch_add(1, Ordering::Relaxed) + 1;
            let (head, tail) = message.channel_payload_around_stream_id();
            invocation.arg(message.stream_json()).arg(head).arg(tail);
        }
        self.fence.append(&mut invocation, &partition.stream);
        let ids: Vec<String> = invocation
            .invoke_async(&mut self.announcer.redis.clone())
            .await?;
        if !position.is_empty() {
            metrics::counter!("invalidator_resume_token_saves_total").increment(1);
        }
        Ok(ids)
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
