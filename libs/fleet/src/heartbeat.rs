//! The replica's heartbeat: every `HEARTBEAT_INTERVAL_MS` it writes what it
//! is and holds ([`ReplicaStatus`]) under its own key, which expires after
//! three intervals, and its instance id into the fleet's sorted set with the
//! time. A replica that stops beating (killed, paused, cut off) drops out
//! of [`crate::FleetClient::replicas`] when its key expires, and every
//! beating replica prunes set members older than that. A replica that shuts
//! down cleanly removes itself at once.

use crate::config::FleetConfig;
use crate::wire::{ReplicaStatus, Vitals};
use chrono::{DateTime, SecondsFormat, Utc};
use feature_cache::RedisConnection;
use std::time::Instant;
use telemetry::Condition;
use tokio_util::sync::CancellationToken;

type VitalsFn = Box<dyn Fn() -> Vitals + Send + Sync>;

/// Publishes one replica's heartbeat until shutdown.
pub struct Heartbeat {
    redis: RedisConnection,
    config: FleetConfig,
    instance_id: String,
    binary_version: String,
    started_at: DateTime<Utc>,
    started: Instant,
    vitals: VitalsFn,
    failing: Condition,
}

impl Heartbeat {
    /// `vitals` is asked at every beat.
    pub fn new(
        redis: RedisConnection,
        config: FleetConfig,
        instance_id: String,
        binary_version: String,
        vitals: impl Fn() -> Vitals + Send + Sync + 'static,
    ) -> Self {
        Self {
            redis,
            config,
            instance_id,
            binary_version,
            started_at: Utc::now(),
            started: Instant::now(),
            vitals: Box::new(vitals),
            failing: Condition::new(
                "fleet_heartbeat",
                "publishing this replica's heartbeat fails; it drops out of the fleet view",
                "this replica's heartbeat is published again",
            ),
        }
    }

    /// Beats every interval until `shutdown`, then leaves the fleet.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(self.config.heartbeat_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = ticks.tick() => {}
            }
            match self.beat().await {
                Ok(()) => {
                    self.failing.recover();
                }
                Err(err) => {
                    self.failing.fail(&err);
                }
            }
        }
        if let Err(err) = self.leave().await {
            tracing::debug!(error = %err, "could not remove this replica's heartbeat");
        }
    }

    /// The status this beat publishes.
    pub fn status(&self, now_ms: u64) -> ReplicaStatus {
        ReplicaStatus {
            instance_id: self.instance_id.clone(),
            binary_version: self.binary_version.clone(),
            started_at: self.started_at.to_rfc3339_opts(SecondsFormat::Millis, true),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            vitals: (self.vitals)(),
            last_heartbeat_ms: now_ms,
        }
    }

    /// One heartbeat: the status key (with its expiry), the set member, and
    /// the set pruned of members that stopped beating.
    #[tracing::instrument(level = "debug", skip_all, fields(db.system = "redis", db.operation = "SET+ZADD"))]
    async fn beat(&self) -> redis::RedisResult<()> {
        let now_ms = now_ms();
        let status = self.status(now_ms);
        let json = serde_json::to_string(&status).unwrap_or_default();
        let expiry_ms =
            u64::try_from(self.config.heartbeat_expiry().as_millis()).unwrap_or(u64::MAX);
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(self.config.replica_key(&self.instance_id))
            .arg(json)
            .arg("PX")
            .arg(expiry_ms.max(1))
            .ignore()
            .cmd("ZADD")
            .arg(&self.config.replicas_key)
            .arg(now_ms)
            .arg(&self.instance_id)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&self.config.replicas_key)
            .arg("-inf")
            .arg(format!("({}", now_ms.saturating_sub(expiry_ms)))
            .ignore()
            .query_async(&mut self.redis.clone())
            .await?;
        metrics::counter!("fleet_heartbeats_total").increment(1);
        Ok(())
    }

    async fn leave(&self) -> redis::RedisResult<()> {
        redis::pipe()
            .cmd("DEL")
            .arg(self.config.replica_key(&self.instance_id))
            .ignore()
            .cmd("ZREM")
            .arg(&self.config.replicas_key)
            .arg(&self.instance_id)
            .ignore()
            .query_async(&mut self.redis.clone())
            .await
    }
}

/// Now in unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}
