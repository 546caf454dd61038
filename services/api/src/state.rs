use feature_cache::TieredStore;
use invalidation::SubscriberStatus;
use settings::Settings;
use std::sync::{Arc, Mutex};

/// What every handler can reach. Cloned for every request: each field is
/// one reference count (or a type that is one).
#[derive(Clone)]
pub struct AppState {
    pub tiers: TieredStore,
    pub settings: Arc<Settings>,
    /// The invalidation subscriber's progress; `None` without a near cache.
    pub invalidation: Option<Arc<Mutex<SubscriberStatus>>>,
    /// The probes' last answers, shared for a moment (see `routes::health`).
    pub probes: Arc<crate::routes::health::ProbeCache>,
    /// Admission control (credentials, rate limits, load shedding).
    pub access: Arc<access::Access>,
    /// The fleet of replicas, for the admin routes.
    pub fleet: Arc<fleet::FleetClient>,
}
