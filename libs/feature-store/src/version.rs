//! Document versions.
//!
//! A version is `max(previous + 1, server time in ms × 1000)`, computed by the
//! database inside the same atomic update that writes the document. Scaling the
//! clock by 1000 leaves room for a thousand writes per millisecond to one
//! customer before the counter runs ahead of the clock, so a document deleted
//! and created again still gets a larger version than anything it had before
//! (the previous document's counter is gone with it; the clock is not).

use bson::{Bson, doc};

/// Version units per millisecond of server time.
pub const UNITS_PER_MS: i64 = 1000;

/// The aggregation expression that computes the next version of the document
/// being updated (`$version` is absent for a new document).
pub fn next_version_expr() -> Bson {
    Bson::Document(doc! {
        "$max": [
            { "$add": [ { "$ifNull": ["$version", 0_i64] }, 1_i64 ] },
            { "$multiply": [ { "$toLong": "$$NOW" }, UNITS_PER_MS ] },
        ]
    })
}

/// A version at least as large as any version a document could have been given
/// before the given server time (in seconds, as change events report it).
///
/// Used for deletes whose removed version is unknown (made by other tools): a
/// tombstone at this version can never be overtaken by a late fill of the
/// deleted document.
pub fn upper_bound_at(server_secs: u32) -> i64 {
    (i64::from(server_secs) + 1) * 1000 * UNITS_PER_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_covers_every_version_of_that_second() {
        let secs = 1_800_000_000_u32;
        let last_ms_of_second = i64::from(secs) * 1000 + 999;
        assert!(upper_bound_at(secs) > last_ms_of_second * UNITS_PER_MS);
        assert!(upper_bound_at(secs) < upper_bound_at(secs + 1));
    }
}
