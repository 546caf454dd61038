//! Configuration shared by every binary.
//!
//! Layers, later ones winning: built-in defaults → an optional TOML file named by
//! `CONFIG_FILE` → the process environment. Variable names are the same in every
//! binary (`REDIS_URL`, `MONGO_URI`, …), so one `.env` serves the whole system.
//! Invalid configuration is an error that names the setting, and binaries refuse
//! to start with it.
//!
//! - `table` (private): every setting named once — field, variable, reader, default.
//! - `parse` (private): how a setting's text becomes its value.
//! - [`Settings`]: the values, and the configuration each library takes
//!   ([`Settings::store_config`], [`Settings::redis_config`], …), so the
//!   libraries never read settings themselves.

mod error;
mod parse;
mod table;

pub use error::SettingsError;
pub use table::{NAMES, Settings};

use config::{Config, Environment, File, FileFormat};
use feature_cache::{
    ControlKeys, HotConfig, NearCacheConfig, ReadPolicy, RedisConfig, RedisTls, TtlPolicy,
    WarmConfig,
};
use feature_store::StoreConfig;
use invalidation::{Channels, SubscriberConfig};
use std::collections::HashMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;

/// How much longer than `MONGO_TIMEOUT_MS` a read may take (the store's
/// client-side grace beyond the server's deadline).
const READ_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Defaults that differ between binaries.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub http_addr: &'static str,
}

impl Defaults {
    pub const API: Defaults = Defaults {
        http_addr: "0.0.0.0:8000",
    };
    pub const INVALIDATOR: Defaults = Defaults {
        http_addr: "0.0.0.0:9100",
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// Loads settings from the process environment (and `CONFIG_FILE`, if set).
pub fn load(defaults: Defaults) -> Result<Settings, SettingsError> {
    load_from(defaults, std::env::vars().collect())
}

/// Loads settings from the given environment; tests pass their own.
pub fn load_from(
    defaults: Defaults,
    env: HashMap<String, String>,
) -> Result<Settings, SettingsError> {
    let mut builder = Config::builder();
    for (name, default) in Settings::defaults(&defaults) {
        if let Some(default) = default {
            builder = builder.set_default(key(name), default)?;
        }
    }
    if let Some(path) = env.get("CONFIG_FILE").filter(|p| !p.is_empty()) {
        builder = builder.add_source(File::new(path, FileFormat::Toml).required(true));
    }
    // Only our own names are taken from the environment, so unrelated variables
    // (PATH, HOME, …) can never break parsing. Empty values count as unset, as
    // they do in most `.env` tooling.
    let ours: HashMap<String, String> = env
        .into_iter()
        .filter(|(k, v)| !v.is_empty() && NAMES.contains(&k.as_str()))
        .collect();
    builder = builder.add_source(Environment::default().source(Some(ours)));
    let source = Source(builder.build()?);
    let settings = Settings::read(&source)?;
    settings.validate()?;
    Ok(settings)
}

/// A setting's value in `Debug` output, its secrets hidden: a value whose
/// name says it is a secret (`…PASSWORD`, `…KEY`, `…KEYS`, `…SECRET`,
/// `…TOKEN`) as `***`, and any value without its connection string password.
pub(crate) struct Shown<'a, T>(pub &'static str, pub &'a T);

impl<T: std::fmt::Debug> std::fmt::Debug for Shown<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Shown(name, value) = self;
        let secret = ["PASSWORD", "KEY", "KEYS", "SECRET", "TOKEN"]
            .iter()
            .any(|suffix| name.ends_with(suffix));
        if secret {
            return f.write_str("\"***\"");
        }
        f.write_str(&telemetry::redact::url(&format!("{value:?}")))
    }
}

/// The merged layers.
pub(crate) struct Source(Config);

impl Source {
    /// One setting's value, read by `parse`; errors name the setting.
    pub(crate) fn read<T>(
        &self,
        name: &'static str,
        parse: fn(Option<&str>) -> Result<T, String>,
    ) -> Result<T, SettingsError> {
        let raw = match self.0.get_string(&key(name)) {
            Ok(raw) if raw.is_empty() => None,
            Ok(raw) => Some(raw),
            Err(config::ConfigError::NotFound(_)) => None,
            Err(err) => return Err(SettingsError::invalid(name, err.to_string())),
        };
        parse(raw.as_deref()).map_err(|reason| SettingsError::invalid(name, reason))
    }
}

/// The layers' key of a setting: its name in lower case.
fn key(name: &str) -> String {
    name.to_ascii_lowercase()
}

impl Settings {
    /// `REDIS_URL` wins; without it the original service's `REDIS_HOST`,
    /// `REDIS_PORT`, `REDIS_DB` (and `REDIS_PASSWORD`) are honoured.
    pub fn redis_url(&self) -> String {
        if let Some(url) = &self.redis_url {
            return url.clone();
        }
        let host = self.redis_host.as_deref().unwrap_or("127.0.0.1");
        let port = self.redis_port.unwrap_or(6379);
        let db = self.redis_db.unwrap_or(0);
        let url = format!("redis://{host}:{port}/{db}");
        match &self.redis_password {
            // Percent-encoded by the URL type, so any character is allowed.
            Some(password) => {
                let Ok(mut parsed) = url::Url::parse(&url) else {
                    // A host the URL type refuses: validation reports it.
                    return url;
                };
                match parsed.set_password(Some(password)) {
                    Ok(()) => parsed.into(),
                    Err(()) => url,
                }
            }
            None => url,
        }
    }

    /// The MongoDB store, announced to the server as `app_name`.
    pub fn store_config(&self, app_name: &str) -> StoreConfig {
        StoreConfig {
            uri: self.mongo_uri.clone(),
            database: self.mongo_db.clone(),
            collection: self.mongo_collection.clone(),
            timeout: self.mongo_timeout,
            app_name: app_name.to_owned(),
        }
    }

    pub fn redis_config(&self) -> RedisConfig {
        RedisConfig {
            url: self.redis_url(),
            cluster_nodes: self.redis_cluster_nodes.clone(),
            tls: RedisTls {
                ca_file: self.redis_tls_ca_file.as_ref().map(PathBuf::from),
                cert_file: self.redis_tls_cert_file.as_ref().map(PathBuf::from),
                key_file: self.redis_tls_key_file.as_ref().map(PathBuf::from),
            },
            timeout: self.redis_timeout,
            ttl: TtlPolicy {
                document_ttl: self.redis_ttl,
                marker_ttl: self.tombstone_ttl,
                negative_ttl: self.negative_ttl,
            },
        }
    }

    /// The near cache, when it is enabled.
    pub fn near_cache_config(&self) -> Option<NearCacheConfig> {
        self.local_cache_enabled.then_some(NearCacheConfig {
            max_entries: self.local_cache_max_entries,
            max_bytes: self.local_cache_max_bytes,
            ttl: self.local_cache_ttl,
            negative_ttl: self.negative_ttl,
        })
    }

    /// How the API's read path spares MongoDB: waiting on other replicas'
    /// loads, and refreshing hot keys ahead of their expiry.
    pub fn read_policy(&self) -> ReadPolicy {
        ReadPolicy {
            miss_lease_wait: self.miss_lease_wait,
            refresh_ahead_fraction: self.refresh_ahead_fraction,
        }
    }

    pub fn channels(&self) -> Channels {
        Channels {
            channel: self.invalidation_channel.clone(),
            stream: self
                .invalidation_stream
                .clone()
                .unwrap_or_else(|| self.control_keys().stream),
            stream_maxlen: self.invalidation_stream_maxlen,
            position: self.control_keys().feed_position,
            partitions: self.invalidation_partitions,
            cluster: !self.redis_cluster_nodes.is_empty(),
        }
    }

    /// Logging (in `LOG_FORMAT`), metrics and trace export for the service
    /// `name`, its spans tagged with `INSTANCE_ID`.
    pub fn init_telemetry(
        &self,
        name: &str,
    ) -> Result<telemetry::Telemetry, telemetry::TelemetryError> {
        telemetry::init(name, &self.instance_id, self.log_format == LogFormat::Json)
    }

    /// The invalidation subscriber, on the tier's Redis (same TLS and
    /// credentials).
    pub fn subscriber_config(&self) -> SubscriberConfig {
        SubscriberConfig {
            redis: self.redis_config(),
            channels: self.channels(),
            check_interval: self.invalidation_check_interval,
        }
    }

    /// The invalidator's continuous consistency audit.
    pub fn audit_config(&self) -> consistency::AuditConfig {
        consistency::AuditConfig {
            sample_rate: self.audit_sample_rate,
            delay: self.audit_delay,
            window: self.audit_window,
        }
    }

    /// The fleet of this collection's API replicas (heartbeats, near-cache
    /// queries, operator requests).
    pub fn fleet_config(&self) -> fleet::FleetConfig {
        fleet::FleetConfig::new(
            &self.control_keys(),
            &self.invalidation_channel,
            self.heartbeat_interval,
        )
    }

    /// The invalidators' keys for this collection.
    pub fn control_keys(&self) -> ControlKeys {
        if self.redis_cluster_nodes.is_empty() {
            ControlKeys::for_collection(&self.mongo_db, &self.mongo_collection)
        } else {
            ControlKeys::for_collection_on_cluster(&self.mongo_db, &self.mongo_collection)
        }
    }

    /// The hot-key record, keeping four times `WARM_KEYS` keys (at least
    /// 1000); `None` when `WARM_KEYS` is 0.
    pub fn hot_config(&self) -> Option<HotConfig> {
        (self.warm_keys > 0).then(|| {
            HotConfig::new(
                self.control_keys().hot,
                self.warm_keys.saturating_mul(4).max(1000),
            )
        })
    }

    /// Warm start; `None` when `WARM_KEYS` is 0.
    pub fn warm_config(&self) -> Option<WarmConfig> {
        (self.warm_keys > 0).then(|| WarmConfig {
            hot_key: self.control_keys().hot,
            keys: self.warm_keys,
            rate_per_second: self.warm_rate_per_second,
        })
    }

    /// Admission control: credentials, rate limits, load shedding.
    /// Call after [`load`], which refused contradictions.
    pub fn access_config(&self) -> access::AccessConfig {
        let jwks = match (&self.auth_jwt_jwks_url, &self.auth_jwt_jwks_file) {
            (Some(url), _) => Some(access::JwksSource::Url(url.clone())),
            (None, Some(path)) => Some(access::JwksSource::File(path.clone())),
            (None, None) => None,
        };
        let jwt = jwks.and_then(|jwks| {
            Some(access::JwtConfig {
                jwks,
                issuer: self.auth_jwt_issuer.clone()?,
                audience: self.auth_jwt_audience.clone()?,
            })
        });
        let rate_limit = self
            .rate_limit_per_second
            .and_then(NonZeroU32::new)
            .map(|per_second| access::RateLimitConfig {
                per_second,
                burst: self
                    .rate_limit_burst
                    .and_then(NonZeroU32::new)
                    .unwrap_or(per_second),
            });
        access::AccessConfig {
            api_keys_file: self.api_keys_file.clone(),
            dev_keys: self.api_keys.clone(),
            jwt,
            required: self.auth_required,
            rate_limit,
            max_concurrent_requests: self.max_concurrent_requests.and_then(NonZeroUsize::new),
        }
    }

    /// The admission settings that only make sense together. The files
    /// (`API_KEYS_FILE`, `AUTH_JWT_JWKS_FILE`) are read by the API when it
    /// starts, which refuses to start when they cannot be read or parsed;
    /// other binaries share the settings but not the files.
    fn validate_access(&self) -> Result<(), SettingsError> {
        let per_second = self.rate_limit_per_second.unwrap_or(0);
        match self.rate_limit_burst {
            Some(0) => {
                return Err(SettingsError::invalid(
                    "RATE_LIMIT_BURST",
                    "must be greater than 0",
                ));
            }
            Some(_) if per_second == 0 => {
                return Err(SettingsError::contradiction(
                    "RATE_LIMIT_BURST",
                    "RATE_LIMIT_PER_SECOND",
                    "a burst without a rate limits nothing; set RATE_LIMIT_PER_SECOND too",
                ));
            }
            _ => {}
        }
        let jwks = match (&self.auth_jwt_jwks_url, &self.auth_jwt_jwks_file) {
            (Some(_), Some(_)) => {
                return Err(SettingsError::contradiction(
                    "AUTH_JWT_JWKS_URL",
                    "AUTH_JWT_JWKS_FILE",
                    "the key set comes from one place; set only one",
                ));
            }
            (Some(url), None) => {
                check_jwks_url(url)?;
                true
            }
            (None, Some(_)) => true,
            (None, None) => false,
        };
        for (name, value) in [
            ("AUTH_JWT_ISSUER", &self.auth_jwt_issuer),
            ("AUTH_JWT_AUDIENCE", &self.auth_jwt_audience),
        ] {
            match (jwks, value) {
                (true, None) => {
                    return Err(SettingsError::contradiction(
                        name,
                        "AUTH_JWT_JWKS_URL",
                        "tokens are only accepted for a known issuer and audience; set both",
                    ));
                }
                (false, Some(_)) => {
                    return Err(SettingsError::contradiction(
                        name,
                        "AUTH_JWT_JWKS_URL",
                        "an issuer or audience without AUTH_JWT_JWKS_URL or AUTH_JWT_JWKS_FILE checks nothing",
                    ));
                }
                _ => {}
            }
        }
        if self.auth_required && !self.access_config().authenticates() {
            return Err(SettingsError::invalid(
                "AUTH_REQUIRED",
                "true, but no credentials are configured: set API_KEYS_FILE, API_KEYS or \
                 AUTH_JWT_JWKS_URL/AUTH_JWT_JWKS_FILE",
            ));
        }
        Ok(())
    }

    /// Checks what no single setting's reader can.
    fn validate(&self) -> Result<(), SettingsError> {
        self.validate_access()?;
        if let Some(stream) = &self.invalidation_stream
            && feature_cache::keyspace::is_document_key(stream)
        {
            return Err(SettingsError::invalid(
                "INVALIDATION_STREAM",
                format!(
                    "{stream:?} lies under the document prefix {:?}, where a customer id \
                     could name the same key; leave it unset (default {:?})",
                    feature_cache::keyspace::DOCUMENT_PREFIX,
                    self.control_keys().stream
                ),
            ));
        }
        // Reservations and tombstones guard a read until it ends; expiring
        // sooner only wastes fills, but a setting that always does is a
        // mistake.
        let longest_read = self.mongo_timeout.saturating_add(READ_GRACE);
        if self.tombstone_ttl < longest_read {
            return Err(SettingsError::contradiction(
                "TOMBSTONE_TTL_MS",
                "MONGO_TIMEOUT_MS",
                format!(
                    "{} ms is shorter than the longest read ({} ms): fills would outlive their guard",
                    self.tombstone_ttl.as_millis(),
                    longest_read.as_millis()
                ),
            ));
        }
        // The lease is renewed every third of it; with two Redis timeouts in
        // a lease a single slow renewal does not lose it.
        if self.leader_lease < self.redis_timeout.saturating_mul(2) {
            return Err(SettingsError::contradiction(
                "LEADER_LEASE_MS",
                "REDIS_TIMEOUT_MS",
                format!(
                    "a lease of {} ms is shorter than two Redis timeouts ({} ms each): one slow renewal would lose it",
                    self.leader_lease.as_millis(),
                    self.redis_timeout.as_millis()
                ),
            ));
        }
        self.validate_limits()?;
        let url = self.redis_url();
        let parsed = url::Url::parse(&url)
            .map_err(|e| SettingsError::invalid("REDIS_URL", e.to_string()))?;
        if !matches!(parsed.scheme(), "redis" | "rediss" | "redis+unix" | "unix") {
            return Err(SettingsError::invalid(
                "REDIS_URL",
                format!("unsupported scheme {:?}", parsed.scheme()),
            ));
        }
        if !self.redis_cluster_nodes.is_empty() {
            if !matches!(parsed.scheme(), "redis" | "rediss") {
                return Err(SettingsError::contradiction(
                    "REDIS_CLUSTER_NODES",
                    "REDIS_URL",
                    "a cluster is reached over TCP: REDIS_URL must be redis:// or rediss://"
                        .to_owned(),
                ));
            }
            if !matches!(parsed.path().trim_matches('/'), "" | "0") {
                return Err(SettingsError::contradiction(
                    "REDIS_CLUSTER_NODES",
                    "REDIS_URL",
                    "a cluster has database 0 only".to_owned(),
                ));
            }
        }
        self.validate_redis_tls(parsed.scheme())
    }

    /// TLS files only mean something for `rediss://`, and a client
    /// certificate needs its key (and the other way round).
    fn validate_redis_tls(&self, scheme: &str) -> Result<(), SettingsError> {
        let files = [
            ("REDIS_TLS_CA_FILE", &self.redis_tls_ca_file),
            ("REDIS_TLS_CERT_FILE", &self.redis_tls_cert_file),
            ("REDIS_TLS_KEY_FILE", &self.redis_tls_key_file),
        ];
        if scheme != "rediss"
            && let Some((name, _)) = files.iter().find(|(_, value)| value.is_some())
        {
            return Err(SettingsError::contradiction(
                name,
                "REDIS_URL",
                "TLS files are only used with a rediss:// URL".to_owned(),
            ));
        }
        match (&self.redis_tls_cert_file, &self.redis_tls_key_file) {
            (Some(_), None) => Err(SettingsError::invalid(
                "REDIS_TLS_KEY_FILE",
                "required with REDIS_TLS_CERT_FILE (the client certificate's key)",
            )),
            (None, Some(_)) => Err(SettingsError::invalid(
                "REDIS_TLS_CERT_FILE",
                "required with REDIS_TLS_KEY_FILE (the key's certificate)",
            )),
            _ => Ok(()),
        }
    }
}

impl Settings {
    /// The limits' contradictions (SECURITY.md, "Limits").
    fn validate_limits(&self) -> Result<(), SettingsError> {
        // hyper's header timer also runs while a kept-alive connection waits
        // for its next request, so a longer idle timeout would never apply.
        if self.http_idle_timeout > self.http_header_read_timeout {
            return Err(SettingsError::contradiction(
                "HTTP_IDLE_TIMEOUT_MS",
                "HTTP_HEADER_READ_TIMEOUT_MS",
                format!(
                    "{} ms idle is longer than the {} ms header timeout, which also closes idle connections: it would never apply",
                    self.http_idle_timeout.as_millis(),
                    self.http_header_read_timeout.as_millis()
                ),
            ));
        }
        // HTTP_REQUEST_TIMEOUT_MS below MONGO_TIMEOUT_MS is not refused:
        // every binary reads the same settings, and tools (cachectl populate)
        // run with long MongoDB timeouts the API's default deadline is below.
        // A document bound above MAX_BODY_BYTES, or a near cache smaller
        // than one document, is not refused: the smaller bound simply wins
        // (a body that large never arrives; a document that large is not
        // kept near), and the original's MAX_BODY_BYTES alone stays valid.
        if self.max_batch_response_bytes < self.max_document_bytes {
            return Err(SettingsError::contradiction(
                "MAX_BATCH_RESPONSE_BYTES",
                "MAX_DOCUMENT_BYTES",
                format!(
                    "a batch response of at most {} bytes cannot carry one document of {} bytes",
                    self.max_batch_response_bytes, self.max_document_bytes
                ),
            ));
        }
        Ok(())
    }
}

/// A JWKS is fetched over https; plain http only from this machine (tests,
/// a sidecar), where nobody on the way can swap the keys.
fn check_jwks_url(raw: &str) -> Result<(), SettingsError> {
    let invalid = |reason: String| SettingsError::invalid("AUTH_JWT_JWKS_URL", reason);
    let url = url::Url::parse(raw).map_err(|e| invalid(format!("{raw:?}: {e}")))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(host)) => host == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(invalid(
            "must be https (plain http only on loopback): anyone on the way could swap the keys"
                .into(),
        )),
        other => Err(invalid(format!("unsupported scheme {other:?}"))),
    }
}

#[cfg(test)]
mod tests;
