//! How a setting's text becomes its value. Each reader gets the text (or
//! `None` when the setting is absent from every layer) and says what is
//! wrong in words; the caller adds the setting's name.

use crate::LogFormat;
use invalidation::InvalidationMode;
use std::net::SocketAddr;
use std::time::Duration;

type Read<T> = Result<T, String>;

fn present(raw: Option<&str>) -> Read<&str> {
    raw.ok_or_else(|| "must be set".to_owned())
}

fn number(raw: &str) -> Read<u64> {
    raw.trim()
        .parse()
        .map_err(|_| format!("{raw:?} is not a whole number"))
}

pub(crate) fn positive(raw: Option<&str>) -> Read<u64> {
    match number(present(raw)?)? {
        0 => Err("must be greater than 0".into()),
        n => Ok(n),
    }
}

pub(crate) fn positive_usize(raw: Option<&str>) -> Read<usize> {
    usize::try_from(positive(raw)?).map_err(|_| "too large".into())
}

/// The most keys a warm-up may preload.
const MAX_KEY_COUNT: u64 = 1_000_000;

/// A number of keys: 0 (off) up to [`MAX_KEY_COUNT`].
pub(crate) fn key_count(raw: Option<&str>) -> Read<usize> {
    match number(present(raw)?)? {
        n if n > MAX_KEY_COUNT => Err(format!("must be at most {MAX_KEY_COUNT}")),
        n => usize::try_from(n).map_err(|_| "too large".into()),
    }
}

/// The longest duration any setting takes: longer ones are surely typos,
/// and libraries below refuse (or panic on) durations of centuries.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

fn at_most_a_year(duration: Duration) -> Read<Duration> {
    if duration > MAX_DURATION {
        Err("must be at most a year".into())
    } else {
        Ok(duration)
    }
}

pub(crate) fn millis(raw: Option<&str>) -> Read<Duration> {
    at_most_a_year(Duration::from_millis(positive(raw)?))
}

/// Milliseconds where 0 means "off".
pub(crate) fn millis_or_zero(raw: Option<&str>) -> Read<Duration> {
    at_most_a_year(Duration::from_millis(number(present(raw)?)?))
}

/// A fraction in `0..=1` (0: off).
pub(crate) fn fraction(raw: Option<&str>) -> Read<f64> {
    let raw = present(raw)?;
    match raw.trim().parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("{raw:?} is not a number from 0 to 1")),
    }
}

pub(crate) fn seconds(raw: Option<&str>) -> Read<Duration> {
    let secs = positive(raw)?;
    if secs > MAX_DURATION.as_secs() {
        return Err("must be at most a year".into());
    }
    at_most_a_year(Duration::from_secs(secs))
}

pub(crate) fn non_empty(raw: Option<&str>) -> Read<String> {
    let raw = present(raw)?;
    if raw.trim().is_empty() {
        Err("must not be empty".into())
    } else {
        Ok(raw.to_owned())
    }
}

pub(crate) fn opt_string(raw: Option<&str>) -> Read<Option<String>> {
    Ok(raw.map(str::to_owned))
}

/// A whole number that fits `T`, when given.
pub(crate) fn opt_number<T: std::str::FromStr>(raw: Option<&str>) -> Read<Option<T>> {
    raw.map(|raw| {
        raw.trim()
            .parse()
            .map_err(|_| format!("{raw:?} is not a whole number in range"))
    })
    .transpose()
}

pub(crate) fn boolean(raw: Option<&str>) -> Read<bool> {
    match present(raw)?.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(format!("{other:?} is not a boolean")),
    }
}

pub(crate) fn socket_addr(raw: Option<&str>) -> Read<SocketAddr> {
    present(raw)?
        .trim()
        .parse()
        .map_err(|e| format!("{e} (want host:port)"))
}

pub(crate) fn mongo_uri(raw: Option<&str>) -> Read<String> {
    let raw = present(raw)?;
    if raw.starts_with("mongodb://") || raw.starts_with("mongodb+srv://") {
        Ok(raw.to_owned())
    } else {
        Err("must start with mongodb:// or mongodb+srv://".into())
    }
}

pub(crate) fn log_format(raw: Option<&str>) -> Read<LogFormat> {
    match present(raw)?.to_ascii_lowercase().as_str() {
        "json" => Ok(LogFormat::Json),
        "pretty" | "text" => Ok(LogFormat::Pretty),
        other => Err(format!("{other:?} (want json or pretty)")),
    }
}

pub(crate) fn invalidation_mode(raw: Option<&str>) -> Read<InvalidationMode> {
    let raw = present(raw)?;
    InvalidationMode::parse(raw).ok_or_else(|| format!("{raw:?} (want refresh or delete)"))
}

/// The given id, else host name and pid.
pub(crate) fn instance_id(raw: Option<&str>) -> Read<String> {
    Ok(raw.map_or_else(default_instance_id, str::to_owned))
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

pub(crate) fn opt_path(raw: Option<&str>) -> Read<Option<std::path::PathBuf>> {
    Ok(raw.map(|raw| raw.trim().into()))
}

/// `API_KEYS`, hashed as it is read: the keys themselves are kept nowhere.
pub(crate) fn dev_keys(raw: Option<&str>) -> Read<Vec<access::KeyEntry>> {
    raw.map_or(Ok(Vec::new()), access::keys::parse_dev_keys)
}

/// The most invalidation partitions (each is a stream, a channel and a
/// subscription per replica).
const MAX_PARTITIONS: u64 = 1024;

/// A partition count: 1 up to [`MAX_PARTITIONS`].
pub(crate) fn partitions(raw: Option<&str>) -> Read<u16> {
    match positive(raw)? {
        n if n > MAX_PARTITIONS => Err(format!("at most {MAX_PARTITIONS}")),
        n => u16::try_from(n).map_err(|_| "too large".into()),
    }
}

/// Redis Cluster seeds: comma-separated `host:port`, when given.
pub(crate) fn cluster_nodes(raw: Option<&str>) -> Read<Vec<String>> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|seed| !seed.is_empty())
        .map(|seed| match seed.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {
                Ok(seed.to_owned())
            }
            _ => Err(format!("{seed:?} is not host:port")),
        })
        .collect()
}
