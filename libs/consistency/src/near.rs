//! Where the replicas' near caches plug into a check: anything that can ask
//! every live replica what it holds for some keys, within a deadline
//! ([`FleetNear`]: the fleet's fan-out over Redis). Replicas that do not
//! answer in time are listed, never judged.

use crate::verdict::Observed;
use fleet::{EntryView, FleetClient};
use futures::FutureExt;
use futures::future::BoxFuture;
use std::collections::HashMap;
use std::time::Duration;

/// Every live replica's near-cache entries for some keys.
#[derive(Debug, Clone, Default)]
pub struct NearSnapshot {
    /// Per replica (instance id): its entries for the keys it holds; a key
    /// it does not list it does not hold.
    pub answers: Vec<(String, HashMap<String, Observed>)>,
    /// Replicas known to be live that did not answer in time.
    pub silent: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("asking the replicas' near caches failed: {0}")]
pub struct NearError(pub String);

/// The near-cache tier of a deployment.
pub trait NearTier: Send + Sync {
    fn entries<'a>(
        &'a self,
        customer_ids: &'a [String],
        deadline: Duration,
    ) -> BoxFuture<'a, Result<NearSnapshot, NearError>>;
}

/// The near-cache tier through the fleet: one fan-out query
/// (`near_entries_many`) answered by every live replica.
#[derive(Clone)]
pub struct FleetNear(pub FleetClient);

impl NearTier for FleetNear {
    fn entries<'a>(
        &'a self,
        customer_ids: &'a [String],
        deadline: Duration,
    ) -> BoxFuture<'a, Result<NearSnapshot, NearError>> {
        async move {
            let report = self
                .0
                .near_entries_many(customer_ids, deadline)
                .await
                .map_err(|err| NearError(err.to_string()))?;
            Ok(NearSnapshot {
                answers: report
                    .answers
                    .into_iter()
                    .map(|(instance, entries)| {
                        let entries = entries
                            .into_iter()
                            .map(|(id, view)| (id, observed(view)))
                            .collect();
                        (instance, entries)
                    })
                    .collect(),
                silent: report.silent,
            })
        }
        .boxed()
    }
}

/// What a replica's answer means here: a document with its JSON, a "not
/// found" (a cached absence or a tombstone, served as 404), else a marker
/// (a floor, anything else a replica never serves).
fn observed(view: EntryView) -> Observed {
    match (view.kind.as_str(), view.document) {
        ("document", Some(body)) => Observed::Document {
            version: view.version,
            body,
        },
        ("absent" | "tombstone", _) => Observed::NotFound {
            version: view.version,
        },
        _ => Observed::Marker {
            version: view.version,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_s_documents_and_404s_are_judged_and_its_floors_are_not_served() {
        let body = serde_json::json!({"version": 3, "customer_id": "C1"});
        let view = |kind: &str, document: Option<serde_json::Value>| EntryView {
            kind: kind.into(),
            version: 3,
            document,
        };
        assert_eq!(
            observed(view("document", Some(body.clone()))),
            Observed::Document { version: 3, body }
        );
        assert_eq!(
            observed(view("tombstone", None)),
            Observed::NotFound { version: 3 }
        );
        assert_eq!(
            observed(view("floor", None)),
            Observed::Marker { version: 3 }
        );
    }
}
