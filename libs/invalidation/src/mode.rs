/// How the invalidator brings Redis in line with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

    /// `refresh` or `delete`, any case.
    pub fn parse(raw: &str) -> Option<Self> {
        match raw.to_ascii_lowercase().as_str() {
            "refresh" => Some(Self::Refresh),
            "delete" => Some(Self::Delete),
            _ => None,
        }
    }
}
