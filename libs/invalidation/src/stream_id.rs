use std::fmt;
use std::str::FromStr;

/// A Redis Stream entry id (`<ms>-<seq>`), ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl StreamId {
    /// Before every entry; also where a replica stands on an empty stream.
    pub const ZERO: StreamId = StreamId { ms: 0, seq: 0 };
}

impl FromStr for StreamId {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        let (ms, seq) = raw.split_once('-').unwrap_or((raw, "0"));
        Ok(Self {
            ms: ms.parse().map_err(|_| format!("bad stream id {raw:?}"))?,
            seq: seq.parse().map_err(|_| format!("bad stream id {raw:?}"))?,
        })
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_and_order_numerically() {
        let a: StreamId = "1700000000000-9".parse().unwrap();
        let b: StreamId = "1700000000000-10".parse().unwrap();
        let c: StreamId = "1700000000001-0".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1700000000000-10");
        assert!("x-1".parse::<StreamId>().is_err());
    }
}
