//! The stored document's schema, in one place: field names, how a
//! [`FeatureDocument`] is read from BSON (leniently: other tools write to the
//! collection too), and the update that writes one. A write's features are
//! stored exactly as sent or refused, with the path of the first value that
//! cannot be ([`encode_features`], [`check_features_json`], [`Unstorable`]).

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

/// The update pipeline of one write and the size of the document it stores.
#[derive(Debug, Clone)]
pub(crate) struct Update {
    pub(crate) pipeline: Vec<Document>,
    /// The size in bytes of the document as stored (its fields as this
    /// update writes them; fields other tools added are not counted).
    pub(crate) stored_bytes: usize,
}

/// The update pipeline of one write: sets every field and advances the
/// version in the same atomic update. `$literal` keeps the features
/// verbatim: inside a pipeline an object would otherwise be read as an
/// expression. Refuses (before anything is sent) a write whose features
/// cannot be stored exactly or whose document would pass MongoDB's size
/// limit.
pub(crate) fn update_pipeline(
    write: &FeatureWrite,
    now: DateTime<Utc>,
) -> Result<Update, Unstorable> {
    let expires_at = now + chrono::Duration::days(i64::from(write.ttl_days));
    let features = encode_features(&write.features)?;
    let calculated_at = format_time(now);
    let stored_bytes = stored_size(write, calculated_at.len(), features.bson_bytes);
    check_size(stored_bytes)?;
    let mut set = doc! {
        field::CUSTOMER_ID: write.customer_id.as_str(),
        field::FEATURES: { "$literal": features.document },
        field::CALCULATED_AT: calculated_at,
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
    Ok(Update {
        pipeline: vec![doc! { "$set": set }],
        stored_bytes,
    })
}

/// The length of `calculated_at` as [`format_time`] writes it (years 0–9999).
const CALCULATED_AT_LEN: usize = "2026-01-02T03:04:05.678Z".len();

/// Refuses a document larger than MongoDB stores.
fn check_size(stored_bytes: usize) -> Result<(), Unstorable> {
    if stored_bytes > MAX_BSON_DOCUMENT_BYTES {
        return Err(Unstorable {
            path: ValuePath::root(),
            problem: Problem::TooLarge(stored_bytes),
        });
    }
    Ok(())
}

/// The BSON size of the document one write stores: `_id` and every field
/// [`update_pipeline`] sets, computed rather than encoded.
fn stored_size(write: &FeatureWrite, calculated_at_len: usize, features_bytes: usize) -> usize {
    let id = write.customer_id.as_str().len();
    let trace = write
        .traceparent
        .as_deref()
        .map_or(0, |t| string_size(t.len()));
    DOCUMENT_OVERHEAD
        + element_size(field::ID, string_size(id))
        + element_size(field::CUSTOMER_ID, string_size(id))
        + element_size(field::FEATURES, features_bytes)
        + element_size(field::CALCULATED_AT, string_size(calculated_at_len))
        + element_size(field::MODEL_VERSION, string_size(write.model_version.len()))
        + element_size(field::EXPIRES_AT, 8)
        + element_size(field::VERSION, 8)
        + element_size(field::TRACE, trace)
}

/// The update that gives a document a new version and nothing else.
pub(crate) fn stamp_update() -> Vec<Document> {
    vec![doc! { "$set": { field::VERSION: version::next_version_expr() } }]
}

// ---------------------------------------------------------------------------
// Exact storage: a write's features are stored exactly as sent, or refused
// with the path of the first value that cannot be.

/// The largest document MongoDB stores (`maxBsonObjectSize`).
pub const MAX_BSON_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;
/// How deep objects and arrays may nest in a stored document, counting the
/// document itself as level 1 (MongoDB's limit for stored documents).
pub const MAX_NESTING: usize = 100;
/// The level of `features` in the stored document.
const FEATURES_LEVEL: usize = 2;
/// MongoDB refuses field names of more than this many `.`-separated parts.
const MAX_KEY_PARTS: usize = 255;
/// A document's length prefix and terminating NUL.
const DOCUMENT_OVERHEAD: usize = 5;
/// Keys longer than this are cut in paths shown to clients.
const PATH_KEY_CHARS: usize = 100;

/// One step from a container to a value inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

/// Where a value sits in a write, as clients name it: `features.a[0]`,
/// with keys that are not plain words quoted: `features["a.b"][""]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValuePath {
    steps: Vec<Step>,
}

impl ValuePath {
    /// `features` itself.
    pub fn root() -> Self {
        Self { steps: Vec::new() }
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    fn push(&mut self, step: Step) {
        self.steps.push(step);
    }

    fn pop(&mut self) {
        self.steps.pop();
    }
}

impl std::fmt::Display for ValuePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(field::FEATURES)?;
        for step in &self.steps {
            match step {
                Step::Index(i) => write!(f, "[{i}]")?,
                Step::Key(key)
                    if !key.is_empty()
                        && key.len() <= PATH_KEY_CHARS
                        && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
                {
                    write!(f, ".{key}")?
                }
                Step::Key(key) => {
                    let shown: String = key.chars().take(PATH_KEY_CHARS).collect();
                    let quoted = serde_json::Value::String(shown).to_string();
                    if key.chars().nth(PATH_KEY_CHARS).is_some() {
                        // Cut: the closing quote marks where, `…` that it was.
                        write!(f, "[{}…\"]", &quoted[..quoted.len() - 1])?
                    } else {
                        write!(f, "[{quoted}]")?
                    }
                }
            }
        }
        Ok(())
    }
}

/// Why a value cannot be stored exactly as sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error(
        "integer {0} is outside the range MongoDB stores exactly (a 64-bit signed integer, \
         -9223372036854775808 to 9223372036854775807); send it as a string"
    )]
    IntegerOutOfRange(String),
    #[error("number {0} is beyond the range of a 64-bit float")]
    FloatOutOfRange(String),
    #[error("key appears more than once in the same object")]
    DuplicateKey,
    #[error("keys must not start with '$' (MongoDB reads them as operators or BSON types)")]
    DollarKey,
    #[error("keys must not contain a NUL character (a BSON key cannot hold one)")]
    NulInKey,
    #[error("keys may have at most {MAX_KEY_PARTS} parts separated by '.' (MongoDB's limit)")]
    TooManyDots,
    #[error(
        "nested too deep: MongoDB stores at most {MAX_NESTING} levels of objects and arrays, \
         counting the stored document as level 1 and `features` as level 2"
    )]
    TooDeep,
    #[error(
        "the stored document would be {0} bytes; MongoDB stores at most {MAX_BSON_DOCUMENT_BYTES}"
    )]
    TooLarge(usize),
}

/// A write that cannot be stored exactly as sent: the first value found
/// that cannot, and why. Nothing was sent to the database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct Unstorable {
    pub path: ValuePath,
    pub problem: Problem,
}

/// Features converted to BSON, and their encoded size.
#[derive(Debug, Clone)]
pub struct EncodedFeatures {
    pub document: Document,
    pub bson_bytes: usize,
}

/// Converts features to BSON exactly, or refuses with the path of the first
/// value that cannot be stored as sent. The only way from JSON to BSON:
/// `bson::to_bson` would read `{"$numberLong": "5"}` as an Int64 and fail
/// on integers above i64, and a failure must never become `{}`.
///
/// Integers become Int64 (within i64; an unsigned integer above i64::MAX
/// is refused), other numbers Double, and keys are kept byte for byte
/// (dots, empty keys and any Unicode included) except those MongoDB cannot
/// store or would read as something else: `$`-prefixed keys, keys with
/// NUL, keys of more than 255 dotted parts. Objects and arrays may nest to
/// level [`MAX_NESTING`] of the stored document (`features` is level 2),
/// empty ones included.
pub fn encode_features(
    features: &serde_json::Map<String, serde_json::Value>,
) -> Result<EncodedFeatures, Unstorable> {
    encode_object(features, FEATURES_LEVEL, Mode::Build)
        .map(|(document, bson_bytes)| EncodedFeatures {
            document,
            bson_bytes,
        })
        .map_err(Failure::into_unstorable)
}

/// Whether a write can be stored exactly: what [`update_pipeline`] checks
/// (the same walk as [`encode_features`] and the document's size), without
/// building anything. For callers that must refuse before touching anything
/// else (a cache reservation, say); the store checks again.
pub fn check_write(write: &FeatureWrite) -> Result<(), Unstorable> {
    let (_, features_bytes) = encode_object(&write.features, FEATURES_LEVEL, Mode::Check)
        .map_err(Failure::into_unstorable)?;
    check_size(stored_size(write, CALCULATED_AT_LEN, features_bytes))
}

/// Whether a walk builds the BSON or only checks and measures it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Build,
    Check,
}

/// A problem found deep inside; the path is collected on the way out, so
/// the values that convert cost no path bookkeeping.
struct Failure {
    reversed: Vec<Step>,
    problem: Problem,
}

impl Failure {
    fn new(problem: Problem) -> Self {
        Self {
            reversed: Vec::new(),
            problem,
        }
    }

    fn at(mut self, step: Step) -> Self {
        self.reversed.push(step);
        self
    }

    fn into_unstorable(self) -> Unstorable {
        let mut steps = self.reversed;
        steps.reverse();
        Unstorable {
            path: ValuePath { steps },
            problem: self.problem,
        }
    }
}

/// `level` is the nesting level of the object itself.
fn encode_object(
    map: &serde_json::Map<String, serde_json::Value>,
    level: usize,
    mode: Mode,
) -> Result<(Document, usize), Failure> {
    if level > MAX_NESTING {
        return Err(Failure::new(Problem::TooDeep));
    }
    let mut document = Document::new();
    let mut size = DOCUMENT_OVERHEAD;
    for (key, value) in map {
        let at = || Step::Key(key.clone());
        check_key(key).map_err(|problem| Failure::new(problem).at(at()))?;
        let (bson, value_size) = encode_value(value, level, mode).map_err(|f| f.at(at()))?;
        size += element_size(key, value_size);
        if mode == Mode::Build {
            document.insert(key.clone(), bson);
        }
    }
    Ok((document, size))
}

/// A value inside a container at `level`, and its encoded size.
fn encode_value(
    value: &serde_json::Value,
    level: usize,
    mode: Mode,
) -> Result<(Bson, usize), Failure> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => (Bson::Null, 0),
        Value::Bool(b) => (Bson::Boolean(*b), 1),
        Value::String(s) if mode == Mode::Check => (Bson::Null, string_size(s.len())),
        Value::String(s) => (Bson::String(s.clone()), string_size(s.len())),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => (Bson::Int64(i), 8),
            // An integer that fits u64 but not i64.
            _ if n.is_u64() => return Err(Failure::new(Problem::IntegerOutOfRange(n.to_string()))),
            (None, Some(f)) => (Bson::Double(f), 8),
            (None, None) => return Err(Failure::new(Problem::FloatOutOfRange(n.to_string()))),
        },
        Value::Array(items) => {
            let level = level + 1;
            if level > MAX_NESTING {
                return Err(Failure::new(Problem::TooDeep));
            }
            let mut array = Vec::new();
            let mut size = DOCUMENT_OVERHEAD;
            for (index, item) in items.iter().enumerate() {
                let (bson, item_size) =
                    encode_value(item, level, mode).map_err(|f| f.at(Step::Index(index)))?;
                size += 1 + decimal_digits(index) + 1 + item_size;
                if mode == Mode::Build {
                    array.push(bson);
                }
            }
            (Bson::Array(array), size)
        }
        Value::Object(map) => {
            let (document, size) = encode_object(map, level + 1, mode)?;
            (Bson::Document(document), size)
        }
    })
}

fn check_key(key: &str) -> Result<(), Problem> {
    if key.starts_with('$') {
        Err(Problem::DollarKey)
    } else if key.contains('\0') {
        Err(Problem::NulInKey)
    } else if key.bytes().filter(|&b| b == b'.').count() >= MAX_KEY_PARTS {
        Err(Problem::TooManyDots)
    } else {
        Ok(())
    }
}

/// Type byte, key, its NUL, the value.
fn element_size(key: &str, value_size: usize) -> usize {
    1 + key.len() + 1 + value_size
}

/// Length prefix, the UTF-8 bytes, the terminating NUL.
fn string_size(len: usize) -> usize {
    4 + len + 1
}

fn decimal_digits(mut n: usize) -> usize {
    let mut digits = 1;
    while n >= 10 {
        n /= 10;
        digits += 1;
    }
    digits
}

/// Checks the JSON text of a `features` object for what parsing it into a
/// `serde_json::Value` would lose without a word, before it is parsed: an
/// integer literal outside i64 (it would turn into a float, or an unsigned
/// integer), a number beyond f64 (it would fail with no path), a key given
/// twice in one object (the last would win); and nesting deeper than
/// MongoDB stores, found here with its path rather than by a parser's
/// recursion limit. `text` must be valid JSON, as a body parser has checked.
/// Everything else is [`encode_features`]' to check.
pub fn check_features_json(text: &str) -> Result<(), Unstorable> {
    enum Frame {
        Object(std::collections::HashSet<String>),
        Array(usize),
    }
    let bytes = text.as_bytes();
    let mut frames: Vec<Frame> = Vec::new();
    let mut path = ValuePath::root();
    let refuse = |path: &ValuePath, problem| Unstorable {
        path: path.clone(),
        problem,
    };
    let mut pos = 0;
    loop {
        // A value starts at `pos`.
        pos = skip_whitespace(bytes, pos);
        match bytes.get(pos) {
            Some(&open @ (b'{' | b'[')) => {
                if FEATURES_LEVEL + frames.len() > MAX_NESTING {
                    return Err(refuse(&path, Problem::TooDeep));
                }
                pos = skip_whitespace(bytes, pos + 1);
                let empty = bytes.get(pos) == Some(if open == b'{' { &b'}' } else { &b']' });
                if empty {
                    pos += 1;
                } else if open == b'{' {
                    let mut keys = std::collections::HashSet::new();
                    pos = next_key(text, pos, &mut keys, &mut path)?;
                    frames.push(Frame::Object(keys));
                    continue;
                } else {
                    frames.push(Frame::Array(0));
                    path.push(Step::Index(0));
                    continue;
                }
            }
            Some(b'"') => pos = string_end(bytes, pos),
            Some(b'-' | b'0'..=b'9') => {
                let end = number_end(bytes, pos);
                check_number(&text[pos..end]).map_err(|problem| refuse(&path, problem))?;
                pos = end;
            }
            Some(_) => pos = word_end(bytes, pos),
            None => return Ok(()),
        }
        // After a value: the next member of its container, or the end of
        // the container (and so after a value one level up).
        loop {
            let Some(frame) = frames.last_mut() else {
                return Ok(());
            };
            pos = skip_whitespace(bytes, pos);
            match bytes.get(pos) {
                Some(b',') => {
                    path.pop();
                    match frame {
                        Frame::Array(index) => {
                            *index += 1;
                            path.push(Step::Index(*index));
                            pos += 1;
                        }
                        Frame::Object(keys) => pos = next_key(text, pos + 1, keys, &mut path)?,
                    }
                    break;
                }
                Some(b'}' | b']') => {
                    frames.pop();
                    path.pop();
                    pos += 1;
                }
                // Not valid JSON; the parser that runs next says so.
                _ => return Ok(()),
            }
        }
    }
}

/// Reads the key starting at or after `pos` and the `:` after it; records
/// it in `keys` and `path`. Returns where its value starts.
fn next_key(
    text: &str,
    pos: usize,
    keys: &mut std::collections::HashSet<String>,
    path: &mut ValuePath,
) -> Result<usize, Unstorable> {
    let bytes = text.as_bytes();
    let start = skip_whitespace(bytes, pos);
    let end = string_end(bytes, start);
    let raw = text
        .get(start + 1..end.saturating_sub(1))
        .unwrap_or_default();
    let key = if raw.contains('\\') {
        serde_json::from_str::<String>(&text[start..end]).unwrap_or_else(|_| raw.to_owned())
    } else {
        raw.to_owned()
    };
    path.push(Step::Key(key.clone()));
    if !keys.insert(key) {
        return Err(Unstorable {
            path: path.clone(),
            problem: Problem::DuplicateKey,
        });
    }
    let colon = skip_whitespace(bytes, end);
    Ok(colon + 1)
}

fn check_number(literal: &str) -> Result<(), Problem> {
    let shown = || {
        if literal.len() > 40 {
            format!("{}…", &literal[..40])
        } else {
            literal.to_owned()
        }
    };
    if literal.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        match literal.parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(()),
            _ => Err(Problem::FloatOutOfRange(shown())),
        }
    } else if literal.parse::<i64>().is_ok() {
        Ok(())
    } else {
        Err(Problem::IntegerOutOfRange(shown()))
    }
}

fn skip_whitespace(bytes: &[u8], mut pos: usize) -> usize {
    while matches!(bytes.get(pos), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        pos += 1;
    }
    pos
}

/// `pos` is at the opening quote; returns the position after the closing one.
fn string_end(bytes: &[u8], pos: usize) -> usize {
    let mut i = pos + 1;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

fn number_end(bytes: &[u8], mut pos: usize) -> usize {
    while matches!(
        bytes.get(pos),
        Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
    ) {
        pos += 1;
    }
    pos
}

/// The end of `true`, `false` or `null`.
fn word_end(bytes: &[u8], mut pos: usize) -> usize {
    while bytes.get(pos).is_some_and(u8::is_ascii_alphabetic) {
        pos += 1;
    }
    pos
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

    fn write_of(features: serde_json::Value) -> FeatureWrite {
        FeatureWrite {
            customer_id: CustomerId::parse("C1").unwrap(),
            features: features.as_object().cloned().unwrap(),
            model_version: "v2".into(),
            ttl_days: 7,
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    /// What the server stores for an update: `_id`, literals unwrapped, the
    /// version computed (as 42).
    fn stored_by(update: &Update) -> Document {
        let set = update.pipeline[0].get_document("$set").unwrap().clone();
        let mut stored = doc! { "_id": set.get_str(field::CUSTOMER_ID).unwrap() };
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
        stored
    }

    #[test]
    fn a_written_document_reads_back_as_written() {
        let write = write_of(serde_json::json!({"a": 1, "b": {"c": [1.5, "x"]}}));
        let now = Utc::now();
        let update = update_pipeline(&write, now).unwrap();
        let stored = stored_by(&update);
        assert_eq!(bson::to_vec(&stored).unwrap().len(), update.stored_bytes);
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

    /// Objects nested so that the innermost is at `level` of the stored
    /// document (`features` is level 2), holding `inner`.
    fn nested(level: usize, inner: serde_json::Value) -> serde_json::Value {
        let mut value = inner;
        for _ in FEATURES_LEVEL..level {
            value = serde_json::json!({ "a": value });
        }
        value
    }

    #[test]
    fn every_json_value_converts_exactly_and_reads_back_the_same() {
        let features = serde_json::json!({
            "max": i64::MAX, "min": i64::MIN, "zero": 0, "float": 0.1, "big float": 1e300,
            "tiny": 5e-324, "negative zero": -0.0, "integral float": 2.0,
            "nul in a value": "a\u{0}b", "": "empty key", "a.b": "dotted key",
            "ключ 😀": "unicode", "a$b": "dollar inside", "null": null, "bools": [true, false],
            "arrays": [[], [[1, "x"]], [{}]], "objects": {"x": {"y": {}}},
            "deep": nested(99, serde_json::json!({"x": 1})),
            "deep empty": nested(99, serde_json::json!([])),
        });
        let write = write_of(features.clone());
        assert_eq!(check_write(&write), Ok(()));
        let update = update_pipeline(&write, Utc::now()).unwrap();
        let stored = stored_by(&update);
        assert_eq!(bson::to_vec(&stored).unwrap().len(), update.stored_bytes);
        let features_doc = stored.get_document(field::FEATURES).unwrap();
        assert_eq!(features_doc.get("max"), Some(&Bson::Int64(i64::MAX)));
        assert_eq!(features_doc.get("min"), Some(&Bson::Int64(i64::MIN)));
        assert_eq!(features_doc.get("integral float"), Some(&Bson::Double(2.0)));
        let back = decode(&stored).unwrap().features;
        assert_eq!(serde_json::Value::Object(back.clone()), features);
        // Byte for byte, as served.
        assert_eq!(
            serde_json::to_string(&back).unwrap(),
            serde_json::to_string(&features).unwrap()
        );
    }

    /// What `encode_features` refuses, and that `check_write` refuses the
    /// same.
    fn refused(features: serde_json::Value) -> (String, Problem) {
        let err = encode_features(features.as_object().unwrap()).unwrap_err();
        assert_eq!(check_write(&write_of(features)), Err(err.clone()));
        (err.path.to_string(), err.problem)
    }

    #[test]
    fn what_cannot_be_stored_exactly_is_refused_with_its_path() {
        let above = u64::try_from(i64::MAX).unwrap() + 1;
        assert_eq!(
            refused(serde_json::json!({"ok": 1, "a": [[1, above]]})),
            (
                "features.a[0][1]".into(),
                Problem::IntegerOutOfRange("9223372036854775808".into())
            )
        );
        assert_eq!(
            refused(serde_json::json!({"a": u64::MAX})).1,
            Problem::IntegerOutOfRange(u64::MAX.to_string())
        );
        // Extended JSON anywhere would become a BSON type; any `$` key is refused.
        for (features, path) in [
            (
                serde_json::json!({"a": [[{"$numberLong": "5"}]]}),
                r#"features.a[0][0]["$numberLong"]"#,
            ),
            (
                serde_json::json!({"a": [{"b": [[{"$date": "2020-01-01T00:00:00Z"}]]}]}),
                r#"features.a[0].b[0][0]["$date"]"#,
            ),
            (
                serde_json::json!({"a": [[[[{"$oid": "5f0000000000000000000000"}]]]]}),
                r#"features.a[0][0][0][0]["$oid"]"#,
            ),
            (
                serde_json::json!({"a": [[[[[{"x": {"$regex": "^a"}}]]]]]}),
                r#"features.a[0][0][0][0][0].x["$regex"]"#,
            ),
            (serde_json::json!({"$set": 1}), r#"features["$set"]"#),
        ] {
            assert_eq!(refused(features), (path.to_owned(), Problem::DollarKey));
        }
        assert_eq!(
            refused(serde_json::json!({"a": {"b\u{0}c": 1}})),
            (r#"features.a["b\u0000c"]"#.into(), Problem::NulInKey)
        );
        let dots = ".".repeat(MAX_KEY_PARTS);
        assert_eq!(
            refused(serde_json::json!({ dots: 1 })).1,
            Problem::TooManyDots
        );
        let most_dots = ".".repeat(MAX_KEY_PARTS - 1);
        assert!(encode_features(serde_json::json!({ most_dots: 1 }).as_object().unwrap()).is_ok());
        // Level 101, even empty.
        for inner in [
            serde_json::json!({"x": {}}),
            serde_json::json!({"x": []}),
            serde_json::json!({"x": [1]}),
        ] {
            let (path, problem) = refused(nested(100, inner));
            assert_eq!(problem, Problem::TooDeep);
            assert_eq!(path, format!("features{}.x", ".a".repeat(98)));
        }
    }

    #[test]
    fn documents_larger_than_mongodb_stores_are_refused() {
        let write = write_of(serde_json::json!({"blob": ""}));
        let now = Utc::now();
        let base = update_pipeline(&write, now).unwrap().stored_bytes;
        let fill = MAX_BSON_DOCUMENT_BYTES - base;
        let exact_write = write_of(serde_json::json!({"blob": "x".repeat(fill)}));
        assert_eq!(check_write(&exact_write), Ok(()));
        let exact = update_pipeline(&exact_write, now).unwrap();
        assert_eq!(exact.stored_bytes, MAX_BSON_DOCUMENT_BYTES);
        assert_eq!(
            bson::to_vec(&stored_by(&exact)).unwrap().len(),
            MAX_BSON_DOCUMENT_BYTES
        );
        let over_write = write_of(serde_json::json!({"blob": "x".repeat(fill + 1)}));
        let over = update_pipeline(&over_write, now).unwrap_err();
        assert_eq!(check_write(&over_write), Err(over.clone()));
        assert_eq!(CALCULATED_AT_LEN, format_time(now).len());
        assert_eq!(over.path.to_string(), "features");
        assert_eq!(over.problem, Problem::TooLarge(MAX_BSON_DOCUMENT_BYTES + 1));
    }

    fn json_refused(text: &str) -> (String, Problem) {
        let err = check_features_json(text).unwrap_err();
        (err.path.to_string(), err.problem)
    }

    #[test]
    fn json_text_is_checked_for_what_parsing_would_lose() {
        for ok in [
            r#"{}"#,
            r#" { "a" : [ 1 , -2 , 9223372036854775807, -9223372036854775808, 1.5e300, 1e-400, -0 ] } "#,
            r#"{"s": "[{\"}]\\", "n": null, "t": true, "f": false, "e": [], "o": {}}"#,
            r#"{"a": {"x": 1}, "b": {"x": 2}, "x": [{"x": 1}, {"x": 2}]}"#,
        ] {
            assert_eq!(check_features_json(ok), Ok(()), "{ok}");
        }
        let big = |n: &str| Problem::IntegerOutOfRange(n.into());
        assert_eq!(
            json_refused(r#"{"x": [0, [1, {"y": 9223372036854775808}]]}"#),
            ("features.x[1][1].y".into(), big("9223372036854775808"))
        );
        assert_eq!(
            json_refused(r#"{"a": [[1, -9223372036854775809]]}"#),
            ("features.a[0][1]".into(), big("-9223372036854775809"))
        );
        assert_eq!(
            json_refused(r#"{"a": 18446744073709551616}"#),
            ("features.a".into(), big("18446744073709551616"))
        );
        assert_eq!(
            json_refused(r#"{"a": {"b": 1e400}}"#),
            (
                "features.a.b".into(),
                Problem::FloatOutOfRange("1e400".into())
            )
        );
        assert_eq!(
            json_refused(r#"{"a": [{"k": 1, "k": 2}]}"#),
            ("features.a[0].k".into(), Problem::DuplicateKey)
        );
        assert_eq!(
            json_refused(r#"{"a.b": 1, "a\u002eb": 2}"#),
            (r#"features["a.b"]"#.into(), Problem::DuplicateKey)
        );
        // `features` (level 2) and 98 objects inside: the last at level 100.
        let deep = format!("{}{{}}{}", "{\"a\": ".repeat(98), "}".repeat(98));
        assert_eq!(check_features_json(&deep), Ok(()), "level 100");
        let deeper = format!("{{\"a\": {deep}}}");
        let (path, problem) = json_refused(&deeper);
        assert_eq!(problem, Problem::TooDeep);
        assert_eq!(path, format!("features{}", ".a".repeat(99)));
        // Far beyond any parser's recursion limit: no stack is used.
        let absurd = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(
            json_refused(&format!("{{\"a\": {absurd}}}")).1,
            Problem::TooDeep
        );
    }

    #[test]
    fn paths_quote_keys_that_are_not_plain_words() {
        let path = ValuePath {
            steps: vec![
                Step::Key("a_1".into()),
                Step::Key("a.b".into()),
                Step::Key(String::new()),
                Step::Index(3),
                Step::Key("x".repeat(PATH_KEY_CHARS + 1)),
            ],
        };
        assert_eq!(
            path.to_string(),
            format!(
                r#"features.a_1["a.b"][""][3]["{}…"]"#,
                "x".repeat(PATH_KEY_CHARS)
            )
        );
    }

    #[test]
    fn documents_of_other_tools_are_read_leniently() {
        let doc = decode(&doc! { "_id": "X" }).unwrap();
        assert_eq!((doc.version, doc.customer_id.as_str()), (0, "X"));
        assert!(decode(&doc! { "_id": 5 }).is_err());
        assert_eq!(version_of(&doc! { "version": 7_i32 }), 7);
    }
}
