/// Where changes are announced: every message goes to the stream (the
/// record, kept to `stream_maxlen` entries) and to the pub/sub channel (the
/// fast path), carrying its stream id.
#[derive(Debug, Clone)]
pub struct Channels {
    pub channel: String,
    pub stream: String,
    pub stream_maxlen: u64,
}

/// The field under which each stream entry holds its message JSON.
pub(crate) const STREAM_FIELD: &str = "message";
