use feature_cache::TieredStore;
use settings::Settings;
use std::sync::Arc;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub tiers: TieredStore,
    pub settings: Arc<Settings>,
    /// How this replica hears about changes: `pubsub+stream` when the
    /// invalidation follower runs, `ttl-only` when it was turned off.
    pub invalidation: &'static str,
}
