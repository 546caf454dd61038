use crate::apply::ApplyParts;
use crate::audit::{self, Auditor};
use crate::health::{self, HealthState};
use crate::leadership::Lease;
use crate::tail::{self, Tail};
use crate::worker::{Worker, WorkerStatus};
use anyhow::Context;
use feature_cache::RedisTier;
use feature_store::FeatureStore;
use invalidation::Announcer;
use settings::Settings;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The invalidator, built and bound but not yet running.
pub struct Application {
    listener: TcpListener,
    worker: Worker,
    store: FeatureStore,
    redis: RedisTier,
    health: HealthState,
    auditor: Option<Auditor>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        telemetry::metrics::install();
        let store = FeatureStore::connect(&settings.store_config("cache-invalidator"))
            .await
            .context("MONGO_URI")?;
        let redis = RedisTier::connect(&settings.redis_config()).context("REDIS_URL")?;
        let connection = redis.connection();

        let run_id = uuid::Uuid::new_v4().to_string();
        let keys = settings.control_keys();
        let announcer = Announcer::new(connection.clone(), settings.channels(), run_id.clone());
        let lease = Lease::new(
            connection.clone(),
            keys,
            settings.leader_lease,
            format!("{}:{run_id}", settings.instance_id),
        );
        // The audit reads every replica's near cache and repairs through the
        // fleet's eviction requests, which this process handles as leader.
        let fleet = fleet::FleetClient::new(
            redis.client().context("REDIS_URL")?,
            connection.clone(),
            settings.fleet_config(),
        );
        let checker = consistency::Checker::new(redis.clone(), store.clone()).with_near(
            Arc::new(consistency::FleetNear(fleet.clone())),
            settings.admin_fanout_timeout,
        );
        let (audit, auditor) = audit::start(&settings.audit_config(), checker, fleet);
        let status = Arc::new(WorkerStatus::default());
        let stall_bound = lease.stall_bound();
        let worker = Worker {
            lease,
            tail: Tail::new(
                store.change_feeds(tail::POLL),
                announcer.clone(),
                status.progress.clone(),
            ),
            apply: ApplyParts {
                requests: fleet::RequestQueue::new(connection.clone(), &settings.fleet_config()),
                redis: redis.clone(),
                announcer,
                store: store.clone(),
                mode: settings.invalidation_mode,
                status: Arc::clone(&status),
                audit,
                warm: settings.warm_config(),
            },
        };
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("HTTP_ADDR: cannot bind {}", settings.http_addr))?;
        Ok(Self {
            listener,
            worker,
            store,
            redis,
            health: HealthState {
                status,
                redis: connection,
                run_id,
                instance_id: settings.instance_id.clone(),
                mode: settings.invalidation_mode,
                stall_bound,
            },
            auditor,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Runs until `shutdown` is cancelled; then finishes the change in hand,
    /// saves the feed's position, releases the lease and closes connections.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            worker,
            store,
            redis,
            health,
            auditor,
        } = self;
        tracing::info!(addr = %listener.local_addr()?, run_id = %health.run_id, mode = health.mode.as_str(), "cache-invalidator started");
        let worker = tokio::spawn(worker.run(shutdown.clone()));
        if let Some(auditor) = auditor {
            tokio::spawn(auditor.run(shutdown.child_token()));
        }
        tokio::spawn(feature_cache::eviction::report_eviction_policy(
            redis,
            shutdown.child_token(),
        ));
        let stopping = shutdown.clone();
        axum::serve(listener, health::router(health))
            .with_graceful_shutdown(async move {
                stopping.cancelled().await;
                tracing::info!("shutting down");
            })
            .await?;
        if let Err(err) = worker.await {
            tracing::error!(error = %err, "worker task failed");
        }
        store.shutdown().await;
        tracing::info!("stopped");
        Ok(())
    }
}
