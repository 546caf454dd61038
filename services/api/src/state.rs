use feature_cache::TieredStore;
use invalidation::FollowerStatus;
use settings::Settings;
use std::sync::{Arc, Mutex};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub tiers: TieredStore,
    pub settings: Arc<Settings>,
    /// The invalidation follower's progress; `None` without a near cache.
    pub invalidation: Option<Arc<Mutex<FollowerStatus>>>,
}
