//! Operator requests for the leading invalidator, as a Redis Stream
//! (`{base}:requests`, trimmed to about [`crate::config::REQUESTS_MAXLEN`]):
//! [`crate::FleetClient::request_eviction`] appends, and the invalidator
//! reads what follows `{base}:requests-position` ([`RequestQueue`]), does
//! the work behind its fence and saves the position behind the same fence
//! ([`FencedRequestQueue`]). A request handled twice (the leader died
//! between the work and the save) is harmless: evicting is idempotent.

use crate::config::FleetConfig;
use feature_cache::Fence;
use feature_cache::RedisConnection;
use invalidation::StreamId;
use redis::Script;
use redis::streams::StreamRangeReply;

/// Stream entry fields.
pub(crate) const FIELD_OP: &str = "op";
pub(crate) const FIELD_CUSTOMER_ID: &str = "customer_id";
pub(crate) const FIELD_REASON: &str = "reason";
pub(crate) const FIELD_TRACEPARENT: &str = "traceparent";
pub(crate) const OP_EVICT: &str = "evict";

/// Saves the position behind the fence (the body after the fence check).
const SAVE_POSITION: &str = "redis.call('SET', KEYS[1], ARGV[1])\nreturn 1";

/// What an operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// Drop the customer's entry from Redis and every near cache.
    Evict { customer_id: String },
    /// A request this version does not know (or a malformed one): skipped.
    Unknown { op: String },
}

/// One request from the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorRequest {
    /// Its stream id.
    pub id: String,
    pub kind: RequestKind,
    pub reason: String,
    /// W3C trace context of the operator's request, where known.
    pub traceparent: Option<String>,
}

impl OperatorRequest {
    fn from_entry(entry: &redis::streams::StreamId) -> Self {
        let field = |name: &str| entry.get::<String>(name);
        let op = field(FIELD_OP).unwrap_or_default();
        let kind = match (op.as_str(), field(FIELD_CUSTOMER_ID)) {
            (OP_EVICT, Some(customer_id)) => RequestKind::Evict { customer_id },
            _ => RequestKind::Unknown { op },
        };
        Self {
            id: entry.id.clone(),
            kind,
            reason: field(FIELD_REASON).unwrap_or_default(),
            traceparent: field(FIELD_TRACEPARENT).filter(|t| !t.is_empty()),
        }
    }
}

/// The invalidator's reader of the requests stream.
#[derive(Clone)]
pub struct RequestQueue {
    redis: RedisConnection,
    key: String,
    position_key: String,
}

impl RequestQueue {
    pub fn new(redis: RedisConnection, config: &FleetConfig) -> Self {
        Self {
            redis,
            key: config.requests_key.clone(),
            position_key: config.requests_position_key.clone(),
        }
    }

    /// Up to `count` requests after the saved position, oldest first.
    #[tracing::instrument(level = "debug", skip(self), fields(db.system = "redis", db.operation = "GET+XRANGE"))]
    pub async fn pending(&self, count: usize) -> redis::RedisResult<Vec<OperatorRequest>> {
        let mut conn = self.redis.clone();
        let position: Option<String> = redis::cmd("GET")
            .arg(&self.position_key)
            .query_async(&mut conn)
            .await?;
        // A position that is no stream id (never written by us) restarts
        // from the beginning: handling a request twice is harmless.
        let start = match position.as_deref().map(str::parse::<StreamId>) {
            Some(Ok(id)) => format!("({id}"),
            _ => "-".to_owned(),
        };
        let reply: StreamRangeReply = redis::cmd("XRANGE")
            .arg(&self.key)
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(reply.ids.iter().map(OperatorRequest::from_entry).collect())
    }

    /// The queue of one leadership term, saving positions behind `fence`.
    pub fn fenced(&self, fence: Fence) -> FencedRequestQueue {
        FencedRequestQueue {
            queue: self.clone(),
            script: Fence::script(SAVE_POSITION),
            fence,
        }
    }
}

/// [`RequestQueue`] for one term of the fence's holder.
#[derive(Clone)]
pub struct FencedRequestQueue {
    queue: RequestQueue,
    script: Script,
    fence: Fence,
}

impl FencedRequestQueue {
    pub async fn pending(&self, count: usize) -> redis::RedisResult<Vec<OperatorRequest>> {
        self.queue.pending(count).await
    }

    /// Marks every request up to `id` handled, while the fence holds
    /// (an error [`Fence::refused`] recognises when it moved).
    #[tracing::instrument(level = "debug", skip(self), fields(db.system = "redis", db.operation = "EVALSHA"))]
    pub async fn save_position(&self, id: &str) -> redis::RedisResult<()> {
        let mut invocation = self.script.prepare_invoke();
        invocation.key(&self.queue.position_key).arg(id);
        self.fence.append(&mut invocation, &self.queue.position_key);
        let _: i64 = invocation
            .invoke_async(&mut self.queue.redis.clone())
            .await?;
        Ok(())
    }
}
