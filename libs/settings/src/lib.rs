//! Configuration shared by every binary.
//!
//! Layers, later ones winning: built-in defaults → an optional TOML file named by
//! `CONFIG_FILE` → the process environment. Variable names are the same in every
//! binary (`REDIS_URL`, `MONGO_URI`, …), so one `.env` serves the whole system.
//! Invalid configuration is an error that names the setting, and binaries refuse
//! to start with it.

mod error;
mod load;

pub use error::SettingsError;
pub use load::{Defaults, load, load_from};

use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

/// How the invalidator brings Redis in line with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvalidationMode {
    /// Write the changed document into Redis (readers keep hitting the cache).
    Refresh,
    /// Drop the cached document (the next reader fills it from MongoDB).
    Delete,
}

impl InvalidationMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refresh => "refresh",
            Self::Delete => "delete",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Every setting of the system; each binary reads the ones it needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub http_addr: SocketAddr,
    pub instance_id: String,
    pub log_format: LogFormat,
    pub max_body_bytes: usize,

    pub redis_url: String,
    pub redis_ttl: Duration,
    pub redis_timeout: Duration,
    pub tombstone_ttl: Duration,

    pub mongo_uri: String,
    pub mongo_db: String,
    pub mongo_collection: String,
    pub mongo_timeout: Duration,

    pub local_cache_enabled: bool,
    pub local_cache_max_entries: u64,
    pub local_cache_ttl: Duration,

    pub invalidation_mode: InvalidationMode,
    pub invalidation_channel: String,
    pub invalidation_stream: String,
    pub invalidation_stream_maxlen: u64,
    /// How often a replica checks the stream for changes it may have missed.
    pub invalidation_check_interval: Duration,
    pub leader_lease: Duration,
}
