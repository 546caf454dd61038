//! Leadership: at most one invalidator leads; its lease carries a fencing
//! token that every write of its term is checked against, so a leader that
//! lost the lease (paused, partitioned) cannot write after its successor
//! took over.

use crate::worker::Progress;
use feature_cache::RedisConnection;
use feature_cache::{ControlKeys, Fence, Spread};
use redis::Script;
use std::time::{Duration, Instant};
use telemetry::Condition;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The leadership lease in Redis.
#[derive(Clone)]
pub struct Lease {
    redis: RedisConnection,
    keys: ControlKeys,
    script: Script,
    duration: Duration,
    /// Identifies this process in the lease's holder value.
    holder_prefix: String,
}

/// One term of leadership: the fence every write of the term goes through,
/// and a token cancelled when the term ends (the lease was lost, or the
/// process is shutting down).
pub struct Term {
    pub fence: Fence,
    ended: CancellationToken,
    renewer: JoinHandle<()>,
}

impl Term {
    /// Cancelled when the term ends.
    pub fn ended(&self) -> &CancellationToken {
        &self.ended
    }
}

impl Lease {
    pub fn new(
        redis: RedisConnection,
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

    /// Stands by until this process holds the lease; `None` on shutdown.
    /// The term's lease is renewed only while `progress` moves.
    pub async fn acquire(&self, shutdown: &CancellationToken, progress: &Progress) -> Option<Term> {
        let retry = self.duration / 3;
        // Retried every third of the lease while Redis is down: warn once.
        let reachable = Condition::new(
            "leader_lease",
            "cannot reach Redis for the lease; retrying",
            "Redis answers for the lease again",
        );
        loop {
            let attempt = self.try_acquire().await;
            if attempt.is_ok() {
                reachable.recover();
            }
            match attempt {
                Ok(Some(token)) => {
                    // The term (and its renewals) begins before the fence is
                    // set up: on a cluster that writes every slot's copy,
                    // which may take longer than a short lease.
                    let fence = Fence::over(&self.redis, self.keys.lease.clone(), token);
                    let term = self.begin_term(fence, shutdown, progress);
                    match self.set_up_fence(&term.fence).await {
                        Ok(true) => return Some(term),
                        Ok(false) => self.end(term).await,
                        Err(err) => {
                            tracing::warn!(error = %err, "could not set up the fence; giving the lease back");
                            self.end(term).await;
                        }
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    reachable.fail(&err);
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return None,
                () = tokio::time::sleep(retry) => {}
            }
        }
    }

    /// Ends a term: stops renewing, and gives the lease up if it is still
    /// ours (at shutdown, so a standby takes over without waiting for it to
    /// expire).
    pub async fn end(&self, term: Term) {
        term.renewer.abort();
        term.ended.cancel();
        match self.call("release", &term.fence.token).await {
            Ok(true) => tracing::info!("released the lease"),
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(error = %err, "could not release the lease; it expires by itself");
            }
        }
    }

    /// Writes the term's fence into every slot (a cluster; nothing to do
    /// on a single Redis). `false`: a copy holds a newer token — a newer
    /// holder exists, or the token counter went back with lost Redis data,
    /// and it is moved past that token so a later attempt can fence.
    async fn set_up_fence(&self, fence: &Fence) -> redis::RedisResult<bool> {
        match fence.spread(&self.redis).await? {
            Spread::Done => Ok(true),
            Spread::Behind(newer) => {
                tracing::warn!(
                    newer,
                    "a fence copy holds a newer token; moving the token counter past it"
                );
                self.call("advance", &newer.to_string()).await?;
                Ok(false)
            }
        }
    }

    fn begin_term(&self, fence: Fence, shutdown: &CancellationToken, progress: &Progress) -> Term {
        let ended = shutdown.child_token();
        progress.mark();
        let renewer = tokio::spawn(self.clone().renew(
            fence.token.clone(),
            ended.clone(),
            progress.clone(),
        ));
        Term {
            fence,
            ended,
            renewer,
        }
    }

    /// Renews the lease every third of its duration while the change feed
    /// makes progress; ends the term when Redis says another holder has it,
    /// when it could not be renewed for so long that it has expired, or when
    /// the feed has made no progress for a whole lease (a leader cut off from
    /// MongoDB, or stuck, must let a standby take over).
    async fn renew(self, token: String, term: CancellationToken, progress: Progress) {
        let period = self.duration / 3;
        let mut last_renewed = Instant::now();
        loop {
            tokio::select! {
                () = term.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            let stalled = progress.since();
            if stalled >= self.stall_bound() {
                tracing::error!(
                    stalled_ms = u64::try_from(stalled.as_millis()).unwrap_or(u64::MAX),
                    "the change feed has made no progress for too long; giving the lease up"
                );
                metrics::counter!("invalidator_stalls_total").increment(1);
                // Let it go now rather than let it expire.
                let _ = self.call("release", &token).await;
                break;
            }
            match self.call("renew", &token).await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => break,
                Err(err) => {
                    tracing::warn!(error = %err, "could not renew the lease");
                    if last_renewed.elapsed() >= self.duration {
                        break;
                    }
                }
            }
        }
        tracing::warn!("lost the lease");
        term.cancel();
    }

    /// The holder token when the lease was free and is now ours.
    async fn try_acquire(&self) -> redis::RedisResult<Option<String>> {
        self.script
            .key(&self.keys.lease)
            .key(&self.keys.fencing_counter)
            .arg("acquire")
            .arg(&self.holder_prefix)
            .arg(millis(self.duration))
            .invoke_async(&mut self.redis.clone())
            .await
    }

    /// `renew` or `release`; `false` when `token` no longer holds the lease.
    async fn call(&self, action: &str, token: &str) -> redis::RedisResult<bool> {
        let held: i64 = self
            .script
            .key(&self.keys.lease)
            .key(&self.keys.fencing_counter)
            .arg(action)
            .arg(token)
            .arg(millis(self.duration))
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(held == 1)
    }
}

impl Lease {
    /// How long the feed may go without progress before its leader is
    /// considered stalled: three leases, and at least five seconds (reading
    /// and applying one change of a 16 MB document takes a while).
    pub fn stall_bound(&self) -> Duration {
        self.duration.saturating_mul(3).max(Duration::from_secs(5))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
