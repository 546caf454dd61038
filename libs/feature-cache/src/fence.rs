//! Fenced writes: a write that lands only while a given key holds a given
//! value. The invalidators' lease is such a key and its holder's token such
//! a value, so a leader that lost the lease (paused, partitioned) cannot
//! write after its successor took over.
//!
//! On a Redis Cluster a script may only touch keys of one slot, so the
//! fence is copied into every slot (`<key>:fence:{tag}`, the key's own
//! braces dropped): a new holder
//! writes its token into all 16,384 copies ([`Fence::spread`]) before its
//! first write, a copy only ever takes a newer token, and each fenced
//! script checks the copy in its own key's slot. A deposed holder is then
//! refused in every slot, exactly as by the one key of a single Redis.

use crate::connection::RedisConnection;
use crate::slots::{SLOTS, slot_of, tag_of_slot};
use redis::{RedisError, Script};

/// The error code a fenced script answers with when the fence has moved.
const FENCED: &str = "FENCED";

/// Checks the fence before the script's own body runs (the fence key is the
/// script's last key, the expected value its last argument).
const CHECK: &str = include_str!("lua/fence_check.lua");

/// Sets a fence copy to a token unless it holds a newer one (tokens end in
/// their counter: `<holder>:<n>`). Returns -1 when set, else the newer
/// token's counter.
const SPREAD: &str = r#"
local function n(token) return tonumber(string.match(token, '(%d+)$')) or -1 end
local current = redis.call('GET', KEYS[1])
if current and n(current) > n(ARGV[1]) then return n(current) end
redis.call('SET', KEYS[1], ARGV[1])
return -1
"#;

/// What [`Fence::spread`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spread {
    /// Every copy holds this fence's token.
    Done,
    /// A copy holds a newer token, with this counter: a newer holder
    /// exists, or the counter the tokens are drawn from went back (lost
    /// with a Redis failover or restart) and must move past it.
    Behind(u64),
}

/// Write only while `key` holds `token` (on a cluster: while the copy of
/// `key` in the written key's slot does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub key: String,
    pub token: String,
    /// A copy per slot (a Redis Cluster).
    pub per_slot: bool,
}

impl Fence {
    /// The fence of a single Redis: `key` itself.
    pub fn new(key: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            token: token.into(),
            per_slot: false,
        }
    }

    /// The fence `key` holds for writes over `conn`: copied into every slot
    /// on a cluster (then [`Fence::spread`] before writing).
    pub fn over(conn: &RedisConnection, key: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            per_slot: conn.is_cluster(),
            ..Self::new(key, token)
        }
    }

    /// The fence key a script whose first key is `key` checks.
    pub fn key_beside(&self, key: &str) -> String {
        if self.per_slot {
            self.copy_in(slot_of(key))
        } else {
            self.key.clone()
        }
    }

    /// The copy in `slot`: the slot's tag must be the key's first, so the
    /// braces of the lease key's own tag are dropped.
    fn copy_in(&self, slot: u16) -> String {
        format!(
            "{}:fence:{}",
            self.key.replace(['{', '}'], ""),
            tag_of_slot(slot)
        )
    }

    /// Writes the token into every slot's copy (nothing to do on a single
    /// Redis), then waits until each master's replica has them, so a
    /// promoted replica still refuses the deposed holder.
    pub async fn spread(&self, conn: &RedisConnection) -> Result<Spread, RedisError> {
        if !self.per_slot {
            return Ok(Spread::Done);
        }
        let script = Script::new(SPREAD);
        let mut conn = conn.clone();
        script.load_async(&mut conn).await?;
        // One pipeline per master, of the copies in the slots it serves;
        // only with every slot served (not in the middle of a failover).
        let owners = conn.slot_owners().await?;
        let covered: u32 = owners
            .iter()
            .flat_map(|(_, ranges)| ranges)
            .map(|(first, last)| u32::from(last - first) + 1)
            .sum();
        if covered != u32::from(SLOTS) {
            return Err(RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ClusterDown),
                "not every slot is served; the fence is set up once they are",
            )));
        }
        // In parts, each within a command's deadline.
        const PART: usize = 1024;
        for (master, ranges) in owners {
            let slots: Vec<u16> = ranges
                .into_iter()
                .flat_map(|(first, last)| first..=last)
                .collect();
            for part in slots.chunks(PART) {
                let mut pipe = redis::pipe();
                for slot in part {
                    let mut invocation = script.prepare_invoke();
                    invocation.key(self.copy_in(*slot)).arg(&self.token);
                    pipe.invoke_script(&invocation);
                }
                for value in conn.pipeline_on_master(&master, &pipe).await? {
                    if let Ok(newer) = u64::try_from(redis::from_redis_value::<i64>(value)?) {
                        return Ok(Spread::Behind(newer));
                    }
                }
            }
        }
        // Best effort, and short: WAIT blocks the connection every other
        // command to that master shares (the lease's renewals too), and a
        // master without a live replica holds it for the whole timeout.
        let _: redis::RedisResult<i64> = redis::cmd("WAIT")
            .arg(1)
            .arg(crate::redis_tier::REPLICATION_WAIT_MS)
            .query_async(&mut conn)
            .await;
        Ok(Spread::Done)
    }

    /// `body` behind the fence check. Invoke it with the fence's key after
    /// the body's keys and its token after the body's arguments
    /// ([`Fence::append`] does both).
    pub fn script(body: &str) -> Script {
        Script::new(&format!("{CHECK}\n{body}"))
    }

    /// Adds the fence's key (the copy beside `first_key`, the script's
    /// first key) and token to an invocation, last.
    pub fn append(&self, invocation: &mut redis::ScriptInvocation<'_>, first_key: &str) {
        invocation.key(self.key_beside(first_key)).arg(&self.token);
    }

    /// Whether a script failed because the fence moved (alone, or any of
    /// a pipeline's).
    pub fn refused(err: &RedisError) -> bool {
        err.code() == Some(FENCED)
            || err
                .clone()
                .into_server_errors()
                .is_some_and(|errors| errors.iter().any(|(_, error)| error.code() == FENCED))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_answers_with_the_code_refused_looks_for() {
        assert!(CHECK.contains(&format!("error_reply('{FENCED} ")));
    }
}

#[cfg(test)]
mod copies {
    use super::*;

    #[test]
    fn each_copy_lies_in_the_slot_of_the_key_it_guards() {
        let fence = Fence {
            per_slot: true,
            ..Fence::new("cache-invalidator:{db.coll}:leader", "h:1")
        };
        for key in [
            "features:C1",
            "features:C2",
            "cache-invalidator:db.coll:changes:{p3}",
        ] {
            assert_eq!(slot_of(&fence.key_beside(key)), slot_of(key), "{key}");
        }
        assert_eq!(
            Fence::new("lease", "h:1").key_beside("features:C1"),
            "lease"
        );
    }
}
