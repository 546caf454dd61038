use redis::Script;
use redis::aio::ConnectionManager;
use std::time::Duration;

/// Redis keys of the invalidators' shared state. They live outside the
/// `features:` prefix so a cache flush never touches them.
#[derive(Debug, Clone)]
pub struct ControlKeys {
    pub lease: String,
    pub fence_counter: String,
    pub resume_token: String,
}

impl ControlKeys {
    /// Keys for the invalidators of one collection.
    pub fn for_collection(database: &str, collection: &str) -> Self {
        let base = format!("cache-invalidator:{database}.{collection}");
        Self {
            lease: format!("{base}:leader"),
            fence_counter: format!("{base}:fence"),
            resume_token: format!("{base}:resume-token"),
        }
    }
}

/// The leadership lease. At most one invalidator holds it; its holder value
/// carries a fencing token that every write script checks, so a leader that
/// lost the lease (paused, partitioned) cannot write after its successor
/// took over.
#[derive(Clone)]
pub struct Lease {
    redis: ConnectionManager,
    keys: ControlKeys,
    script: Script,
    duration: Duration,
    holder_prefix: String,
}

impl Lease {
    pub fn new(
        redis: ConnectionManager,
        keys: ControlKeys,
        duration: Duration,
        holder_prefix: String,
    ) -> Self {
        Self {
            redis,
            keys,
            script: Script::new(include_str!("lua/lease.lua")),
            duration,
            holder_prefix,
        }
    }

    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// The holder value when the lease was free and is now ours.
    pub async fn try_acquire(&self) -> redis::RedisResult<Option<String>> {
        self.script
            .key(&self.keys.lease)
            .key(&self.keys.fence_counter)
            .arg("acquire")
            .arg(&self.holder_prefix)
            .arg(self.duration.as_millis() as u64)
            .invoke_async(&mut self.redis.clone())
            .await
    }

    /// Extends the lease; `false` when `holder` no longer holds it.
    pub async fn renew(&self, holder: &str) -> redis::RedisResult<bool> {
        self.call("renew", holder).await
    }

    pub async fn release(&self, holder: &str) -> redis::RedisResult<bool> {
        self.call("release", holder).await
    }

    async fn call(&self, action: &str, holder: &str) -> redis::RedisResult<bool> {
        let held: i64 = self
            .script
            .key(&self.keys.lease)
            .key(&self.keys.fence_counter)
            .arg(action)
            .arg(holder)
            .arg(self.duration.as_millis() as u64)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(held == 1)
    }
}
