use crate::middleware::{RequestMetrics, observe};
use crate::routes;
use crate::state::AppState;
use anyhow::Context;
use axum::Router;
use feature_cache::{NearCache, RedisTier, TieredStore};
use feature_store::FeatureStore;
use invalidation::{Follower, FollowerConfig};
use settings::Settings;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::broadcast;

/// The API service, built and bound but not yet serving.
pub struct Application {
    listener: TcpListener,
    router: Router,
    state: AppState,
    shutdown: broadcast::Sender<()>,
}

impl Application {
    /// Wires settings into the store, the tiers, the invalidation follower and
    /// the router, and binds `HTTP_ADDR` (port 0 picks a free port). Neither
    /// Redis nor MongoDB has to be up yet: both connect lazily.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        telemetry::metrics::install();
        let store = FeatureStore::from_settings(&settings, "cache-api")
            .await
            .context("MONGO_URI")?;
        if let Err(err) = store.ensure_indexes().await {
            tracing::warn!(error = %err, "could not ensure the TTL index now; MongoDB may be down");
        }
        let redis = RedisTier::from_settings(&settings).context("REDIS_URL")?;
        let near = settings
            .local_cache_enabled
            .then(|| NearCache::new(settings.local_cache_max_entries, settings.local_cache_ttl));
        let tiers = TieredStore::new(near, redis, store);

        let (shutdown, _) = broadcast::channel(1);
        // Each replica follows the invalidator's messages into its near cache;
        // without a near cache there is nothing of its own to keep fresh.
        let follower = tiers.near_handle().map(|near| {
            Follower::new(
                FollowerConfig {
                    redis_url: settings.redis_url.clone(),
                    channel: settings.invalidation_channel.clone(),
                    stream: settings.invalidation_stream.clone(),
                    check_interval: settings.invalidation_check_interval,
                },
                near,
                tiers.redis().connection(),
            )
        });
        let state = AppState {
            tiers,
            settings: Arc::new(settings.clone()),
            invalidation: follower.as_ref().map(Follower::status),
        };
        if let Some(follower) = follower {
            tokio::spawn(follower.run(shutdown.subscribe()));
        }
        let router = routes::router(settings.max_body_bytes)
            .layer(axum::middleware::from_fn_with_state(
                Arc::new(RequestMetrics::default()),
                observe,
            ))
            .with_state(state.clone());
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("HTTP_ADDR: cannot bind {}", settings.http_addr))?;
        Ok(Self {
            listener,
            router,
            state,
            shutdown,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `signal` completes, then stops accepting, lets requests
    /// in flight finish, stops background tasks and closes the database pool.
    pub async fn run_until(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            listener,
            router,
            state,
            shutdown,
        } = self;
        tracing::info!(addr = %listener.local_addr()?, instance_id = %state.settings.instance_id, "cache-api listening");
        let notify = shutdown.clone();
        let mut stopped = shutdown.subscribe();
        axum::serve(listener, router)
            .with_graceful_shutdown(async move {
                signal.await;
                tracing::info!("shutting down");
                let _ = notify.send(());
            })
            .await?;
        let _ = stopped.try_recv();
        state.tiers.store().clone().shutdown().await;
        tracing::info!("stopped");
        Ok(())
    }
}
