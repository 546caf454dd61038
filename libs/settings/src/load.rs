use crate::{InvalidationMode, LogFormat, Settings, SettingsError};
use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;
use std::collections::HashMap;
use std::time::Duration;

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

/// The raw layer-merged values, before validation. Field names are the
/// lower-cased environment variable names.
#[derive(Debug, Deserialize)]
struct Raw {
    http_addr: String,
    instance_id: Option<String>,
    log_format: String,
    max_body_bytes: u64,
    redis_url: Option<String>,
    redis_host: Option<String>,
    redis_port: Option<u16>,
    redis_db: Option<u32>,
    redis_password: Option<String>,
    redis_ttl: u64,
    redis_timeout_ms: u64,
    tombstone_ttl_ms: u64,
    mongo_uri: String,
    mongo_db: String,
    mongo_collection: String,
    mongo_timeout_ms: u64,
    local_cache_enabled: String,
    local_cache_max_entries: u64,
    local_cache_ttl_ms: u64,
    invalidation_mode: String,
    invalidation_channel: String,
    invalidation_stream: String,
    invalidation_stream_maxlen: u64,
    invalidation_check_interval_ms: u64,
    leader_lease_ms: u64,
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
    let mut builder = Config::builder()
        .set_default("http_addr", defaults.http_addr)?
        .set_default("log_format", "json")?
        .set_default("max_body_bytes", 1_048_576)?
        .set_default("redis_ttl", 604_800)?
        .set_default("redis_timeout_ms", 500)?
        .set_default("tombstone_ttl_ms", 60_000)?
        .set_default("mongo_uri", "mongodb://127.0.0.1:27017/?replicaSet=rs0")?
        .set_default("mongo_db", "cache_demo")?
        .set_default("mongo_collection", "customer_features")?
        .set_default("mongo_timeout_ms", 2_000)?
        .set_default("local_cache_enabled", "true")?
        .set_default("local_cache_max_entries", 100_000)?
        .set_default("local_cache_ttl_ms", 30_000)?
        .set_default("invalidation_mode", "refresh")?
        .set_default("invalidation_channel", "features:invalidations")?
        .set_default("invalidation_stream", "features:changes")?
        .set_default("invalidation_stream_maxlen", 100_000)?
        .set_default("invalidation_check_interval_ms", 1_000)?
        .set_default("leader_lease_ms", 5_000)?;
    if let Some(path) = env.get("CONFIG_FILE").filter(|p| !p.is_empty()) {
        builder = builder.add_source(File::new(path, FileFormat::Toml).required(true));
    }
    // Only our own names are taken from the environment, so unrelated variables
    // (PATH, HOME, …) can never break parsing. Empty values count as unset, as
    // they do in most `.env` tooling.
    let ours: HashMap<String, String> = env
        .into_iter()
        .filter(|(k, v)| !v.is_empty() && KNOWN.contains(&k.as_str()))
        .collect();
    builder = builder.add_source(Environment::default().source(Some(ours)).try_parsing(true));
    let raw: Raw = builder.build()?.try_deserialize()?;
    validate(raw)
}

const KNOWN: &[&str] = &[
    "HTTP_ADDR",
    "INSTANCE_ID",
    "LOG_FORMAT",
    "MAX_BODY_BYTES",
    "REDIS_URL",
    "REDIS_HOST",
    "REDIS_PORT",
    "REDIS_DB",
    "REDIS_PASSWORD",
    "REDIS_TTL",
    "REDIS_TIMEOUT_MS",
    "TOMBSTONE_TTL_MS",
    "MONGO_URI",
    "MONGO_DB",
    "MONGO_COLLECTION",
    "MONGO_TIMEOUT_MS",
    "LOCAL_CACHE_ENABLED",
    "LOCAL_CACHE_MAX_ENTRIES",
    "LOCAL_CACHE_TTL_MS",
    "INVALIDATION_MODE",
    "INVALIDATION_CHANNEL",
    "INVALIDATION_STREAM",
    "INVALIDATION_STREAM_MAXLEN",
    "INVALIDATION_CHECK_INTERVAL_MS",
    "LEADER_LEASE_MS",
];

fn validate(raw: Raw) -> Result<Settings, SettingsError> {
    let http_addr = raw
        .http_addr
        .parse()
        .map_err(|e| SettingsError::invalid("HTTP_ADDR", format!("{e} (want host:port)")))?;
    let redis_url = redis_url(&raw)?;
    let mongo_uri = raw.mongo_uri;
    if !(mongo_uri.starts_with("mongodb://") || mongo_uri.starts_with("mongodb+srv://")) {
        return Err(SettingsError::invalid(
            "MONGO_URI",
            "must start with mongodb:// or mongodb+srv://",
        ));
    }
    let log_format = match raw.log_format.to_ascii_lowercase().as_str() {
        "json" => LogFormat::Json,
        "pretty" | "text" => LogFormat::Pretty,
        other => {
            return Err(SettingsError::invalid(
                "LOG_FORMAT",
                format!("{other:?} (want json or pretty)"),
            ));
        }
    };
    let invalidation_mode = match raw.invalidation_mode.to_ascii_lowercase().as_str() {
        "refresh" => InvalidationMode::Refresh,
        "delete" => InvalidationMode::Delete,
        other => {
            return Err(SettingsError::invalid(
                "INVALIDATION_MODE",
                format!("{other:?} (want refresh or delete)"),
            ));
        }
    };
    let local_cache_enabled = parse_bool("LOCAL_CACHE_ENABLED", &raw.local_cache_enabled)?;
    Ok(Settings {
        http_addr,
        instance_id: raw.instance_id.unwrap_or_else(default_instance_id),
        log_format,
        max_body_bytes: usize::try_from(positive("MAX_BODY_BYTES", raw.max_body_bytes)?)
            .map_err(|_| SettingsError::invalid("MAX_BODY_BYTES", "too large"))?,
        redis_url,
        redis_ttl: Duration::from_secs(positive("REDIS_TTL", raw.redis_ttl)?),
        redis_timeout: millis("REDIS_TIMEOUT_MS", raw.redis_timeout_ms)?,
        tombstone_ttl: millis("TOMBSTONE_TTL_MS", raw.tombstone_ttl_ms)?,
        mongo_uri,
        mongo_db: non_empty("MONGO_DB", raw.mongo_db)?,
        mongo_collection: non_empty("MONGO_COLLECTION", raw.mongo_collection)?,
        mongo_timeout: millis("MONGO_TIMEOUT_MS", raw.mongo_timeout_ms)?,
        local_cache_enabled,
        local_cache_max_entries: positive("LOCAL_CACHE_MAX_ENTRIES", raw.local_cache_max_entries)?,
        local_cache_ttl: millis("LOCAL_CACHE_TTL_MS", raw.local_cache_ttl_ms)?,
        invalidation_mode,
        invalidation_channel: non_empty("INVALIDATION_CHANNEL", raw.invalidation_channel)?,
        invalidation_stream: non_empty("INVALIDATION_STREAM", raw.invalidation_stream)?,
        invalidation_stream_maxlen: positive(
            "INVALIDATION_STREAM_MAXLEN",
            raw.invalidation_stream_maxlen,
        )?,
        invalidation_check_interval: millis(
            "INVALIDATION_CHECK_INTERVAL_MS",
            raw.invalidation_check_interval_ms,
        )?,
        leader_lease: millis("LEADER_LEASE_MS", raw.leader_lease_ms)?,
    })
}

/// `REDIS_URL` wins; without it the original service's `REDIS_HOST`,
/// `REDIS_PORT`, `REDIS_DB` (and `REDIS_PASSWORD`) are honoured.
fn redis_url(raw: &Raw) -> Result<String, SettingsError> {
    let url = match &raw.redis_url {
        Some(url) => url.clone(),
        None => {
            let host = raw.redis_host.as_deref().unwrap_or("127.0.0.1");
            let port = raw.redis_port.unwrap_or(6379);
            let db = raw.redis_db.unwrap_or(0);
            match &raw.redis_password {
                Some(password) => format!("redis://:{password}@{host}:{port}/{db}"),
                None => format!("redis://{host}:{port}/{db}"),
            }
        }
    };
    let parsed =
        url::Url::parse(&url).map_err(|e| SettingsError::invalid("REDIS_URL", e.to_string()))?;
    if !matches!(parsed.scheme(), "redis" | "rediss" | "redis+unix" | "unix") {
        return Err(SettingsError::invalid(
            "REDIS_URL",
            format!("unsupported scheme {:?}", parsed.scheme()),
        ));
    }
    Ok(url)
}

fn parse_bool(name: &'static str, value: &str) -> Result<bool, SettingsError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(SettingsError::invalid(
            name,
            format!("{other:?} is not a boolean"),
        )),
    }
}

fn positive(name: &'static str, value: u64) -> Result<u64, SettingsError> {
    if value == 0 {
        Err(SettingsError::invalid(name, "must be greater than 0"))
    } else {
        Ok(value)
    }
}

fn millis(name: &'static str, value: u64) -> Result<Duration, SettingsError> {
    positive(name, value).map(Duration::from_millis)
}

fn non_empty(name: &'static str, value: String) -> Result<String, SettingsError> {
    if value.trim().is_empty() {
        Err(SettingsError::invalid(name, "must not be empty"))
    } else {
        Ok(value)
    }
}

fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_apply_without_environment() {
        let s = load_from(Defaults::API, env(&[])).unwrap();
        assert_eq!(s.http_addr.port(), 8000);
        assert_eq!(s.redis_url, "redis://127.0.0.1:6379/0");
        assert_eq!(s.redis_ttl, Duration::from_secs(604_800));
        assert_eq!(s.mongo_db, "cache_demo");
        assert_eq!(s.mongo_collection, "customer_features");
        assert_eq!(s.tombstone_ttl, Duration::from_millis(60_000));
        assert!(s.local_cache_enabled);
        assert_eq!(s.invalidation_mode, InvalidationMode::Refresh);
        let s = load_from(Defaults::INVALIDATOR, env(&[])).unwrap();
        assert_eq!(s.http_addr.port(), 9100);
    }

    #[test]
    fn environment_overrides_defaults() {
        let s = load_from(
            Defaults::API,
            env(&[
                ("HTTP_ADDR", "127.0.0.1:9999"),
                ("LOCAL_CACHE_ENABLED", "false"),
                ("REDIS_TTL", "60"),
                ("INSTANCE_ID", "1234"),
                ("INVALIDATION_MODE", "delete"),
            ]),
        )
        .unwrap();
        assert_eq!(s.http_addr.to_string(), "127.0.0.1:9999");
        assert!(!s.local_cache_enabled);
        assert_eq!(s.redis_ttl, Duration::from_secs(60));
        assert_eq!(s.instance_id, "1234");
        assert_eq!(s.invalidation_mode, InvalidationMode::Delete);
    }

    #[test]
    fn legacy_redis_variables_are_honoured_when_url_is_unset() {
        let s = load_from(
            Defaults::API,
            env(&[
                ("REDIS_HOST", "cache"),
                ("REDIS_PORT", "6380"),
                ("REDIS_DB", "2"),
            ]),
        )
        .unwrap();
        assert_eq!(s.redis_url, "redis://cache:6380/2");
        let s = load_from(
            Defaults::API,
            env(&[("REDIS_HOST", "cache"), ("REDIS_URL", "redis://other:1/0")]),
        )
        .unwrap();
        assert_eq!(s.redis_url, "redis://other:1/0");
    }

    #[test]
    fn toml_file_sits_between_defaults_and_environment() {
        let dir = std::env::temp_dir().join(format!("settings-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cache.toml");
        std::fs::write(&path, "mongo_db = \"from_file\"\nredis_ttl = 42\n").unwrap();
        let s = load_from(
            Defaults::API,
            env(&[("CONFIG_FILE", path.to_str().unwrap()), ("REDIS_TTL", "43")]),
        )
        .unwrap();
        assert_eq!(s.mongo_db, "from_file");
        assert_eq!(s.redis_ttl, Duration::from_secs(43));
    }

    #[test]
    fn invalid_values_name_the_setting() {
        for (name, value) in [
            ("HTTP_ADDR", "not-an-address"),
            ("REDIS_TTL", "0"),
            ("REDIS_TTL", "soon"),
            ("MONGO_URI", "http://example"),
            ("LOCAL_CACHE_ENABLED", "maybe"),
            ("INVALIDATION_MODE", "sometimes"),
            ("LOG_FORMAT", "xml"),
            ("REDIS_URL", "ftp://x"),
        ] {
            let err = load_from(Defaults::API, env(&[(name, value)])).unwrap_err();
            let message = err.to_string().to_ascii_lowercase();
            assert!(
                message.contains(&name.to_ascii_lowercase()),
                "error for {name}={value} does not name it: {message}"
            );
        }
    }
}
