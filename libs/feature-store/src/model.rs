use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;
use std::sync::Arc;
use thiserror::Error;

/// A validated customer id: 1–128 characters of `[A-Za-z0-9_.:-]`.
///
/// The alphabet keeps ids safe inside Redis keys, URLs and log lines.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CustomerId(Arc<str>);

#[derive(Debug, Error, PartialEq, Eq)]
#[error("customer_id must be 1-128 characters of [A-Za-z0-9_.:-]")]
pub struct InvalidCustomerId;

impl CustomerId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, InvalidCustomerId> {
        if Self::is_valid(raw) {
            Ok(Self(Arc::from(raw)))
        } else {
            Err(InvalidCustomerId)
        }
    }

    /// Whether `raw` is a customer id: 1–128 characters of `[A-Za-z0-9_.:-]`.
    pub fn is_valid(raw: &str) -> bool {
        !raw.is_empty()
            && raw.len() <= Self::MAX_LEN
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CustomerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One customer's features as stored, cached and served.
///
/// Field order matters: `version` comes first in the JSON so the Redis guard
/// script can read it without decoding the whole document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FeatureDocument {
    /// Strictly increasing per customer over its whole life.
    pub version: i64,
    pub customer_id: String,
    #[schema(value_type = Object)]
    pub features: Map<String, Value>,
    #[serde(with = "rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub calculated_at: DateTime<Utc>,
    pub model_version: String,
    /// Absent only for documents written by other tools without it.
    #[serde(with = "rfc3339_opt", default)]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub expires_at: Option<DateTime<Utc>>,
}

impl FeatureDocument {
    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

/// A validated write of one customer's features.
#[derive(Debug, Clone)]
pub struct FeatureWrite {
    pub customer_id: CustomerId,
    pub features: Map<String, Value>,
    pub model_version: String,
    pub ttl_days: u32,
    /// W3C trace context of the request that wrote it; stored with the document
    /// so the change stream carries it to the invalidator.
    pub traceparent: Option<String>,
}

impl FeatureWrite {
    pub const DEFAULT_MODEL_VERSION: &'static str = "v1.0.0";
    pub const DEFAULT_TTL_DAYS: u32 = 7;
    pub const TTL_DAYS_RANGE: std::ops::RangeInclusive<u32> = 1..=30;
}

/// Times are RFC 3339 with millisecond precision in UTC everywhere.
pub fn format_time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

mod rfc3339 {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_time(*at))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let raw = String::deserialize(d)?;
        DateTime::parse_from_rfc3339(&raw)
            .map(|t| t.with_timezone(&Utc))
            .map_err(serde::de::Error::custom)
    }
}

mod rfc3339_opt {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
        match at {
            Some(at) => s.serialize_str(&super::format_time(*at)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DateTime<Utc>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(raw) => DateTime::parse_from_rfc3339(&raw)
                .map(|t| Some(t.with_timezone(&Utc)))
                .map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_ids_follow_the_alphabet_and_length() {
        for ok in ["CUST00001", "a", "a.b:c-d_e", &"x".repeat(128)] {
            assert!(CustomerId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "a/b", "ü", "$x", "a{b}", &"x".repeat(129)] {
            assert_eq!(CustomerId::parse(bad), Err(InvalidCustomerId), "{bad}");
        }
    }

    #[test]
    fn json_puts_version_first_and_round_trips() {
        let doc = FeatureDocument {
            version: 7,
            customer_id: "C1".into(),
            features: serde_json::json!({"a": 1, "b": {"c": [1.5, "x"]}})
                .as_object()
                .cloned()
                .unwrap(),
            calculated_at: DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678Z")
                .unwrap()
                .with_timezone(&Utc),
            model_version: "v1.0.0".into(),
            expires_at: None,
        };
        let json = serde_json::to_string(&doc).unwrap();
        assert!(json.starts_with(r#"{"version":7,"#), "{json}");
        assert!(json.contains(r#""calculated_at":"2026-01-02T03:04:05.678Z""#));
        let back: FeatureDocument = serde_json::from_str(&json).unwrap();
        assert_eq!(back, doc);
        // Also from deserializers that cannot lend strings (owned values, readers).
        let value = serde_json::to_value(&doc).unwrap();
        let back: FeatureDocument = serde_json::from_value(value).unwrap();
        assert_eq!(back, doc);
        let back: FeatureDocument = serde_json::from_reader(json.as_bytes()).unwrap();
        assert_eq!(back, doc);
    }
}
