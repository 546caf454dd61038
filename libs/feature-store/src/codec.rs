//! The stored document's schema, in one place: field names, how a
//! [`FeatureDocument`] is read from BSON (leniently: other tools write to the
//! collection too), and the update that writes one.

use crate::error::StoreError;
use crate::model::{FeatureDocument, FeatureWrite, format_time};
use crate::version;
use bson::{Bson, Document, doc};
use chrono::{DateTime, Utc};

/// Field names of a stored document.
pub mod field {
    pub const ID: &str = "_id";
    pub const CUSTOMER_ID: &str = "customer_id";
    pub const FEATURES: &str = "features";
    pub const CALCULATED_AT: &str = "calculated_at";
    pub const MODEL_VERSION: &str = "model_version";
    /// The TTL index expires documents by this field.
    pub const EXPIRES_AT: &str = "expires_at";
    pub const VERSION: &str = "version";
    /// The W3C trace context of the write that stored the document, so the
    /// change feed carries it to the invalidator.
    pub const TRACE: &str = "trace";
}

/// Reads a stored document leniently: documents written by other tools may
/// lack fields (no version counts as version 0).
pub fn decode(raw: &Document) -> Result<FeatureDocument, StoreError> {
    let customer_id = match (raw.get(field::CUSTOMER_ID), raw.get(field::ID)) {
        (Some(Bson::String(id)), _) | (None, Some(Bson::String(id))) => id.clone(),
        (_, Some(Bson::String(id))) => id.clone(),
        _ => return Err(StoreError::Malformed("no string customer_id or _id".into())),
    };
    let features = match raw.get(field::FEATURES) {
        Some(Bson::Document(features)) => {
            match Bson::Document(features.clone()).into_relaxed_extjson() {
                serde_json::Value::Object(map) => map,
                _ => serde_json::Map::new(),
            }
        }
        _ => serde_json::Map::new(),
    };
    Ok(FeatureDocument {
        version: version_of(raw),
        customer_id,
        features,
        calculated_at: time_field(raw, field::CALCULATED_AT).unwrap_or(DateTime::UNIX_EPOCH),
        model_version: raw
            .get_str(field::MODEL_VERSION)
            .unwrap_or(FeatureWrite::DEFAULT_MODEL_VERSION)
            .to_owned(),
        expires_at: time_field(raw, field::EXPIRES_AT),
    })
}

/// The version a stored document carries; 0 when it has none.
pub fn version_of(raw: &Document) -> i64 {
    match raw.get(field::VERSION) {
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Double(v)) => *v as i64,
        _ => 0,
    }
}

/// The W3C trace context stored with a document by the write that made it.
pub fn traceparent_of(raw: &Document) -> Option<&str> {
    raw.get_str(field::TRACE).ok()
}

/// The update pipeline of one write: sets every field and advances the
/// version in the same atomic update. `$literal` keeps the features
/// verbatim: inside a pipeline an object would otherwise be read as an
/// expression.
pub(crate) fn update_pipeline(write: &FeatureWrite, now: DateTime<Utc>) -> Vec<Document> {
    let expires_at = now + chrono::Duration::days(i64::from(write.ttl_days));
    let features =
        bson::to_bson(&write.features).unwrap_or_else(|_| Bson::Document(Document::new()));
    let mut set = doc! {
        field::CUSTOMER_ID: write.customer_id.as_str(),
        field::FEATURES: { "$literal": features },
        field::CALCULATED_AT: format_time(now),
        field::MODEL_VERSION: { "$literal": write.model_version.as_str() },
        field::EXPIRES_AT: bson::DateTime::from_chrono(expires_at),
        field::VERSION: version::next_version_expr(),
    };
    // Always set (null when untraced), never unset: a field removed by a
    // pipeline turns the change event into a `replace` on some servers.
    set.insert(
        field::TRACE,
        write
            .traceparent
            .as_deref()
            .map_or(Bson::Null, |t| Bson::String(t.to_owned())),
    );
    vec![doc! { "$set": set }]
}

/// The update that gives a document a new version and nothing else.
pub(crate) fn stamp_update() -> Vec<Document> {
    vec![doc! { "$set": { field::VERSION: version::next_version_expr() } }]
}

fn time_field(raw: &Document, name: &str) -> Option<DateTime<Utc>> {
    match raw.get(name)? {
        Bson::DateTime(at) => Some(at.to_chrono()),
        Bson::String(s) => DateTime::parse_from_rfc3339(s)
            .ok()
            .map(|t| t.with_timezone(&Utc)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CustomerId;

    #[test]
    fn a_written_document_reads_back_as_written() {
        let write = FeatureWrite {
            customer_id: CustomerId::parse("C1").unwrap(),
            features: serde_json::json!({"a": 1, "b": {"c": [1.5, "x"]}})
                .as_object()
                .cloned()
                .unwrap(),
            model_version: "v2".into(),
            ttl_days: 7,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        };
        let now = Utc::now();
        let set = update_pipeline(&write, now)[0]
            .get_document("$set")
            .unwrap()
            .clone();
        // What the server stores: literals unwrapped, the version computed.
        let mut stored = Document::new();
        for (key, value) in set {
            let value = match value {
                Bson::Document(d) if d.contains_key("$literal") => {
                    d.get("$literal").unwrap().clone()
                }
                Bson::Document(d) if d.contains_key("$max") => Bson::Int64(42),
                other => other,
            };
            stored.insert(key, value);
        }
        let doc = decode(&stored).unwrap();
        assert_eq!(doc.version, 42);
        assert_eq!(doc.customer_id, "C1");
        assert_eq!(
            serde_json::Value::Object(doc.features),
            serde_json::json!({"a": 1, "b": {"c": [1.5, "x"]}})
        );
        assert_eq!(doc.model_version, "v2");
        assert!(doc.expires_at.is_some_and(|at| at > now));
        assert!(traceparent_of(&stored).is_some());
    }

    #[test]
    fn documents_of_other_tools_are_read_leniently() {
        let doc = decode(&doc! { "_id": "X" }).unwrap();
        assert_eq!((doc.version, doc.customer_id.as_str()), (0, "X"));
        assert!(decode(&doc! { "_id": 5 }).is_err());
        assert_eq!(version_of(&doc! { "version": 7_i32 }), 7);
    }
}
