use crate::fast_path::FastPath;
use crate::middleware::{RequestLayer, RequestMetrics};
use crate::routes;
use crate::server::{self, ServerLimits};
use crate::state::AppState;
use access::Access;
use anyhow::Context;
use feature_cache::{HotRecord, NearCache, RedisTier, TieredStore, Warmer};
use feature_store::FeatureStore;
use fleet::{FleetClient, Heartbeat, Responder, Vitals};
use invalidation::Subscriber;
use settings::Settings;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The API service, built and bound but not yet serving.
pub struct Application {
    listener: TcpListener,
    service: server::Service,
    state: AppState,
    subscriber: Option<Subscriber>,
    /// Counts reads into the hot-key record (off with `WARM_KEYS=0`).
    hot: Option<HotRecord>,
    /// Preloads the hottest keys after the start and after each flush.
    warmer: Option<Warmer>,
}

impl Application {
    /// Wires settings into the store, the tiers, the invalidation subscriber
    /// and the router, and binds `HTTP_ADDR` (port 0 picks a free port).
    /// Neither Redis nor MongoDB has to be up yet: both connect lazily.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        telemetry::metrics::install();
        let store = FeatureStore::connect(&settings.store_config("cache-api"))
            .await
            .context("MONGO_URI")?;
        let redis = RedisTier::connect(&settings.redis_config()).context("REDIS_URL")?;
        let near = settings
            .near_cache_config()
            .map(|config| NearCache::new(&config));
        let tiers = TieredStore::with_policy(near, redis, store, settings.read_policy());
        let hot = settings.hot_config().map(|config| {
            let (recorder, record) = HotRecord::new(tiers.redis().connection(), config);
            tiers.record_reads(recorder);
            record
        });
        // Follows the near cache's flushes from before the subscriber's first.
        let warmer = settings
            .warm_config()
            .and_then(|config| Warmer::new(&tiers, config));

        // Each replica follows the invalidator's messages into its near cache;
        // without a near cache there is nothing of its own to keep fresh.
        let subscriber = tiers.near_handle().map(|near| {
            Subscriber::new(
                settings.subscriber_config(),
                near,
                tiers.redis().connection(),
            )
        });
        let access = Arc::new(
            Access::start(&settings.access_config())
                .await
                .context("authentication")?,
        );
        let fleet = Arc::new(FleetClient::new(
            tiers.redis().client().context("REDIS_URL")?,
            tiers.redis().connection(),
            settings.fleet_config(),
        ));
        let state = AppState {
            tiers,
            settings: Arc::new(settings.clone()),
            invalidation: subscriber.as_ref().map(Subscriber::status),
            probes: Arc::default(),
            access: access.clone(),
            fleet,
        };
        // Inside the metrics: a request cut by its deadline is counted with
        // the 503 it got; a request admission refuses is refused at once.
        let metrics = Arc::new(RequestMetrics::default());
        let fast_path = FastPath::new(
            state.tiers.clone(),
            access.clone(),
            metrics.clone(),
            settings.http_request_timeout,
        );
        let router = routes::router(settings.max_body_bytes)
            .layer(RequestLayer::new(
                access,
                settings.http_request_timeout,
                metrics,
            ))
            .with_state(state.clone());
        let service = server::Service {
            router,
            fast_path: Arc::new(fast_path),
        };
        let listener = TcpListener::bind(settings.http_addr)
            .await
            .with_context(|| format!("HTTP_ADDR: cannot bind {}", settings.http_addr))?;
        Ok(Self {
            listener,
            service,
            state,
            subscriber,
            hot,
            warmer,
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

    /// Serves until `shutdown` is cancelled, then stops accepting, lets
    /// requests in flight finish (within `SHUTDOWN_GRACE_MS`), stops the
    /// subscriber and closes the database pool.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Self {
            listener,
            service,
            state,
            subscriber,
            hot,
            warmer,
        } = self;
        tracing::info!(addr = %listener.local_addr()?, instance_id = %state.settings.instance_id, "cache-api listening");
        if let Some(warmer) = warmer {
            tokio::spawn(warmer.run(shutdown.child_token()));
        }
        if let Some(subscriber) = subscriber {
            tokio::spawn(subscriber.run(shutdown.child_token()));
        }
        if let Some(hot) = hot {
            tokio::spawn(hot.run(shutdown.child_token()));
        }
        tokio::spawn(heartbeat(&state).run(shutdown.child_token()));
        // The client was made once already in `build`: it cannot fail here.
        if let Ok(client) = state.tiers.redis().client() {
            tokio::spawn(
                Responder::new(
                    client,
                    state.tiers.redis().connection(),
                    state.settings.fleet_config(),
                    state.settings.instance_id.clone(),
                    state.tiers.near_handle(),
                )
                .run(shutdown.child_token()),
            );
        }
        tokio::spawn(state.access.clone().maintain(shutdown.child_token()));
        tokio::spawn(ensure_ttl_index(
            state.tiers.store().clone(),
            shutdown.child_token(),
        ));
        tokio::spawn(feature_cache::eviction::report_eviction_policy(
            state.tiers.redis().clone(),
            shutdown.child_token(),
        ));
        // The serving loop hands every request its peer address
        // (`ConnectInfo`): admission limits anonymous clients by it.
        let limits = ServerLimits::from_settings(&state.settings);
        server::serve(listener, service, limits, shutdown).await;
        state.tiers.store().clone().shutdown().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// This replica's heartbeat: what it is, what its near cache holds and how
/// far it follows the invalidations.
fn heartbeat(state: &AppState) -> Heartbeat {
    let tiers = state.tiers.clone();
    let follower = state.invalidation.clone();
    Heartbeat::new(
        state.tiers.redis().connection(),
        state.settings.fleet_config(),
        state.settings.instance_id.clone(),
        env!("CARGO_PKG_VERSION").to_owned(),
        move || {
            let (hits, misses) = tiers.near_reads();
            let reads = hits + misses;
            let follower = follower.as_ref().map(|status| {
                status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
            });
            Vitals {
                last_stream_id: follower.as_ref().and_then(|f| f.last_stream_id.clone()),
                lag_ms: follower.as_ref().and_then(|f| f.last_lag_ms),
                near_entries: tiers.near().map_or(0, NearCache::len),
                near_bytes: tiers.near().map_or(0, NearCache::weighted_size),
                hit_ratio: (reads > 0).then(|| hits as f64 / reads as f64),
                subscribed: follower.is_some_and(|f| f.subscribed),
            }
        },
    )
}

/// Ensures the TTL index on `expires_at` (expired documents are removed by
/// MongoDB), retrying in the background until it succeeds: MongoDB may be
/// down when a replica starts, and a collection without the index keeps
/// expired documents forever.
async fn ensure_ttl_index(store: FeatureStore, shutdown: CancellationToken) {
    let mut backoff = std::time::Duration::from_secs(1);
    let mut warned = false;
    loop {
        match store.ensure_indexes().await {
            Ok(()) => {
                tracing::info!("the TTL index on expires_at is in place");
                return;
            }
            Err(err) => {
                if !warned {
                    tracing::warn!(error = %telemetry::ErrorChain(&err), "could not ensure the TTL index; retrying in the background");
                    warned = true;
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
    }
}
