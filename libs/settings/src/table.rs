//! Every setting, named once: its field, its variable, how it is read and
//! its default. The `settings!` macro turns the table into [`Settings`] and
//! [`NAMES`].

use crate::parse::{
    boolean, cluster_nodes, dev_keys, fraction, instance_id, invalidation_mode, key_count,
    log_format, millis, millis_or_zero, mongo_uri, non_empty, opt_number, opt_path, opt_string,
    partitions, positive, positive_usize, seconds, socket_addr,
};
use crate::{Defaults, LogFormat, SettingsError, Source};
use invalidation::InvalidationMode;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

macro_rules! settings {
    ($defaults:ident => $(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ty = $name:literal, $parse:path, $default:expr;
    )*) => {
        /// Every setting of the system; each binary reads the ones it needs.
        #[derive(Clone)]
        pub struct Settings {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        /// Secrets are never shown: passwords and keys as `***`, connection
        /// strings without their password.
        impl std::fmt::Debug for Settings {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut shown = f.debug_struct("Settings");
                $( shown.field(stringify!($field), &crate::Shown($name, &self.$field)); )*
                shown.finish()
            }
        }

        /// The environment variable of every setting (the TOML file's keys
        /// are the same names in lower case).
        pub const NAMES: &[&str] = &[$($name),*];

        impl Settings {
            /// Reads every setting from the merged layers.
            pub(crate) fn read(source: &Source) -> Result<Self, SettingsError> {
                Ok(Self {
                    $( $field: source.read($name, $parse)?, )*
                })
            }

            /// Each setting's default, for the first layer.
            pub(crate) fn defaults(
                $defaults: &Defaults,
            ) -> Vec<(&'static str, Option<&'static str>)> {
                vec![$( ($name, $default) ),*]
            }
        }
    };
}

settings! { binary =>
    /// Listen address (the API's `0.0.0.0:8000`, the invalidator's `0.0.0.0:9100`).
    http_addr: SocketAddr = "HTTP_ADDR", socket_addr, Some(binary.http_addr);
    /// This process in logs, traces and metrics (default: host name and pid).
    instance_id: String = "INSTANCE_ID", instance_id, None;
    log_format: LogFormat = "LOG_FORMAT", log_format, Some("json");
    /// Largest request body a write accepts.
    max_body_bytes: usize = "MAX_BODY_BYTES", positive_usize, Some("1048576");

    /// Where Redis is; without it the original service's variables below apply.
    redis_url: Option<String> = "REDIS_URL", opt_string, None;
    redis_host: Option<String> = "REDIS_HOST", opt_string, None;
    redis_port: Option<u16> = "REDIS_PORT", opt_number, None;
    redis_db: Option<u32> = "REDIS_DB", opt_number, None;
    redis_password: Option<String> = "REDIS_PASSWORD", opt_string, None;
    /// PEM CA certificate to trust for `rediss://` instead of the system's roots.
    redis_tls_ca_file: Option<String> = "REDIS_TLS_CA_FILE", opt_string, None;
    /// PEM client certificate and key, for a Redis that verifies clients.
    redis_tls_cert_file: Option<String> = "REDIS_TLS_CERT_FILE", opt_string, None;
    redis_tls_key_file: Option<String> = "REDIS_TLS_KEY_FILE", opt_string, None;
    /// Redis Cluster seeds (`host:port,host:port`); when set they win over
    /// REDIS_URL's host, which then gives only the scheme, user and password.
    redis_cluster_nodes: Vec<String> = "REDIS_CLUSTER_NODES", cluster_nodes, None;
    /// How long a document may stay in Redis.
    redis_ttl: Duration = "REDIS_TTL", seconds, Some("604800");
    redis_timeout: Duration = "REDIS_TIMEOUT_MS", millis, Some("500");
    /// How long tombstones and version floors live.
    tombstone_ttl: Duration = "TOMBSTONE_TTL_MS", millis, Some("60000");

    /// A replica set (change streams need one).
    mongo_uri: String = "MONGO_URI", mongo_uri, Some("mongodb://127.0.0.1:27017/?replicaSet=rs0");
    mongo_db: String = "MONGO_DB", non_empty, Some("cache_demo");
    mongo_collection: String = "MONGO_COLLECTION", non_empty, Some("customer_features");
    mongo_timeout: Duration = "MONGO_TIMEOUT_MS", millis, Some("2000");

    local_cache_enabled: bool = "LOCAL_CACHE_ENABLED", boolean, Some("true");
    local_cache_max_entries: u64 = "LOCAL_CACHE_MAX_ENTRIES", positive, Some("100000");
    local_cache_ttl: Duration = "LOCAL_CACHE_TTL_MS", millis, Some("30000");

    invalidation_mode: InvalidationMode = "INVALIDATION_MODE", invalidation_mode, Some("refresh");
    invalidation_channel: String = "INVALIDATION_CHANNEL", non_empty, Some("features:invalidations");
    /// Default `cache-invalidator:{MONGO_DB}.{MONGO_COLLECTION}:changes`;
    /// never under the document prefix `features:`.
    invalidation_stream: Option<String> = "INVALIDATION_STREAM", opt_string, None;
    invalidation_stream_maxlen: u64 = "INVALIDATION_STREAM_MAXLEN", positive, Some("100000");
    /// Invalidation partitions: each has its own stream, channel and saved
    /// position (a key's partition is its slot modulo this); on a Redis
    /// Cluster they spread the announcements over the masters.
    invalidation_partitions: u16 = "INVALIDATION_PARTITIONS", partitions, Some("1");
    /// How often a replica checks the stream for changes it may have missed.
    invalidation_check_interval: Duration = "INVALIDATION_CHECK_INTERVAL_MS", millis, Some("1000");
    leader_lease: Duration = "LEADER_LEASE_MS", millis, Some("5000");

    // Limits of the HTTP server, memory and MongoDB permits (SECURITY.md, "Limits").
    /// A connection whose request headers are not complete this long after
    /// the server began waiting for them is closed (slowloris).
    http_header_read_timeout: Duration = "HTTP_HEADER_READ_TIMEOUT_MS", millis, Some("10000");
    /// A kept-alive connection with no request for this long is closed.
    http_idle_timeout: Duration = "HTTP_IDLE_TIMEOUT_MS", millis, Some("10000");
    /// Connections served at once; more wait in the listen backlog.
    http_max_connections: usize = "HTTP_MAX_CONNECTIONS", positive_usize, Some("4096");
    /// A request not answered within this gets 503 `request_timeout`.
    http_request_timeout: Duration = "HTTP_REQUEST_TIMEOUT_MS", millis, Some("60000");
    /// After SIGTERM, how long requests in flight may take before the process exits.
    shutdown_grace: Duration = "SHUTDOWN_GRACE_MS", millis, Some("8000");
    /// The near cache's bound in bytes (keys and rendered documents).
    local_cache_max_bytes: u64 = "LOCAL_CACHE_MAX_BYTES", positive, Some("268435456");
    /// The largest `features` object a write takes, in bytes of JSON.
    max_document_bytes: usize = "MAX_DOCUMENT_BYTES", positive_usize, Some("262144");
    /// The largest batch response, in bytes of the documents it carries.
    max_batch_response_bytes: usize = "MAX_BATCH_RESPONSE_BYTES", positive_usize, Some("16777216");
    // Authentication, authorization and admission (SECURITY.md). Nothing
    // set: the API is open, as the original was.
    /// TOML file of `[[keys]]` entries (`name`, `scopes`, `sha256` of the
    /// key); reloaded on SIGHUP and when it changes.
    api_keys_file: Option<PathBuf> = "API_KEYS_FILE", opt_path, None;
    /// Development keys, `name:scope+scope:key,...`; only their hashes are kept.
    api_keys: Vec<access::KeyEntry> = "API_KEYS", dev_keys, None;
    /// The identity provider's key set (https, or http on loopback only).
    auth_jwt_jwks_url: Option<String> = "AUTH_JWT_JWKS_URL", opt_string, None;
    auth_jwt_jwks_file: Option<PathBuf> = "AUTH_JWT_JWKS_FILE", opt_path, None;
    auth_jwt_issuer: Option<String> = "AUTH_JWT_ISSUER", opt_string, None;
    auth_jwt_audience: Option<String> = "AUTH_JWT_AUDIENCE", opt_string, None;
    /// Refuse to start without credentials configured.
    auth_required: bool = "AUTH_REQUIRED", boolean, Some("false");
    /// Requests per second per principal; unset or 0: no rate limit.
    rate_limit_per_second: Option<u32> = "RATE_LIMIT_PER_SECOND", opt_number, None;
    /// Requests a principal may make at once (default `RATE_LIMIT_PER_SECOND`).
    rate_limit_burst: Option<u32> = "RATE_LIMIT_BURST", opt_number, None;
    /// Requests in the service at once before it answers 503; 0: unlimited.
    max_concurrent_requests: Option<usize> = "MAX_CONCURRENT_REQUESTS", opt_number, None;

    // The invalidator's continuous consistency audit (CACHE_STRATEGY.md,
    // "Measuring consistency").
    /// The fraction of applied changes whose key is read back in every tier
    /// and compared with MongoDB, `0`..=`1`; 0 turns the auditor off.
    audit_sample_rate: f64 = "AUDIT_SAMPLE_RATE", fraction, Some("0.01");
    /// How long after a change is applied its key is read back.
    audit_delay: Duration = "AUDIT_DELAY_MS", millis, Some("1000");
    /// The sliding window of `cache_consistency_ratio`.
    audit_window: Duration = "AUDIT_WINDOW_S", seconds, Some("300");

    // The fleet view (admin API, cachectl): replica heartbeats and the
    // near-cache fan-out.
    /// How often each API replica publishes its heartbeat (it expires after three).
    heartbeat_interval: Duration = "HEARTBEAT_INTERVAL_MS", millis, Some("2000");
    /// How long an admin query waits for every live replica's near-cache answer.
    admin_fanout_timeout: Duration = "ADMIN_FANOUT_TIMEOUT_MS", millis, Some("500");
    // Absence and load: negative caching, cross-replica miss coalescing,
    // refresh ahead (CACHE_STRATEGY.md, "Absence and load").
    /// How long a "not found" is cached in Redis and the near caches; 0: not cached.
    negative_ttl: Duration = "NEGATIVE_TTL_MS", millis_or_zero, Some("5000");
    /// How long a miss waits for another replica's load of the key before it
    /// reads MongoDB itself; 0: it does not wait.
    miss_lease_wait: Duration = "MISS_LEASE_WAIT_MS", millis_or_zero, Some("200");
    /// A document read from Redis in this last fraction of its TTL is
    /// refreshed in the background (0 to 1; 0: never).
    refresh_ahead_fraction: f64 = "REFRESH_AHEAD_FRACTION", fraction, Some("0.1");
    // Warm start (CACHE_STRATEGY.md, "Warm start").
    /// The hottest keys a replica preloads after it starts or its near cache
    /// is flushed, and the invalidator puts back into Redis after a flush;
    /// 0: no warm start, and no hot-key record.
    warm_keys: usize = "WARM_KEYS", key_count, Some("1000");
    /// Keys a warm-up (or a refill) loads per second at most.
    warm_rate_per_second: u64 = "WARM_RATE_PER_SECOND", positive, Some("2000");
}
