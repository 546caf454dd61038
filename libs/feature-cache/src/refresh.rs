//! Refresh ahead of expiry: a document read from Redis in the last part of
//! its TTL is read again from MongoDB in the background and put back
//! through the guard (or its TTL renewed), so a key that is read all the
//! time never expires and never sends its readers to MongoDB.
//!
//! This module decides when a refresh is due and keeps one refresh per key
//! in flight per process; the refresh itself is the tiered store's.

use crate::entry::CachedDocument;
use chrono::Utc;
use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// When a key is due, and which keys are being refreshed now.
pub struct RefreshAhead {
    /// The last part of a document's TTL in which a read refreshes it.
    window: Duration,
    in_flight: Arc<Mutex<HashSet<String>>>,
}

impl RefreshAhead {
    /// `None` when `fraction` is 0 (or not a fraction above 0): no refresh.
    pub fn new(fraction: f64, document_ttl: Duration) -> Option<Self> {
        if fraction.is_nan() || fraction <= 0.0 {
            return None;
        }
        Some(Self {
            window: document_ttl.mul_f64(fraction.min(1.0)),
            in_flight: Arc::default(),
        })
    }

    /// Whether a document with `left` of its Redis TTL should be refreshed:
    /// it is in the window, and it does not expire within the window anyway
    /// (its TTL is capped by `expires_at`, so a refresh could not extend it).
    pub fn due(&self, left: Duration, doc: &CachedDocument) -> bool {
        if left > self.window {
            return false;
        }
        match doc.expires_at() {
            None => true,
            Some(at) => (at - Utc::now())
                .to_std()
                .is_ok_and(|remaining| remaining > self.window),
        }
    }

    /// Claims the refresh of `customer_id`; `None` while one is in flight.
    /// The claim ends when the returned value is dropped.
    pub fn begin(&self, customer_id: &str) -> Option<InFlight> {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        in_flight.insert(customer_id.to_owned()).then(|| InFlight {
            table: Arc::clone(&self.in_flight),
            customer_id: customer_id.to_owned(),
        })
    }
}

/// A refresh in flight; dropping it lets the next one begin.
pub struct InFlight {
    table: Arc<Mutex<HashSet<String>>>,
    customer_id: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.customer_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(expires_in: Option<chrono::Duration>) -> CachedDocument {
        CachedDocument::new("C1", 1, expires_in.map(|d| Utc::now() + d), "{}")
    }

    #[test]
    fn due_only_in_the_last_part_of_the_ttl_and_not_off() {
        assert!(RefreshAhead::new(0.0, Duration::from_secs(100)).is_none());
        let refresh = RefreshAhead::new(0.1, Duration::from_secs(100)).unwrap();
        let far = doc(Some(chrono::Duration::days(1)));
        assert!(!refresh.due(Duration::from_secs(50), &far));
        assert!(refresh.due(Duration::from_secs(9), &far));
        assert!(refresh.due(Duration::from_secs(9), &doc(None)));
        // Expiring within the window anyway: a refresh cannot extend it.
        let soon = doc(Some(chrono::Duration::seconds(5)));
        assert!(!refresh.due(Duration::from_secs(4), &soon));
    }

    #[test]
    fn one_refresh_per_key_at_a_time() {
        let refresh = RefreshAhead::new(0.5, Duration::from_secs(10)).unwrap();
        let first = refresh.begin("C1").unwrap();
        assert!(refresh.begin("C1").is_none());
        assert!(refresh.begin("C2").is_some());
        drop(first);
        assert!(refresh.begin("C1").is_some());
    }
}
