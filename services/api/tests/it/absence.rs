//! Negative caching through the API: a "not found" is cached in Redis and
//! the near cache, served without MongoDB, and replaced at once by a create
//! (single reads and batch reads alike); a fill of an absence that raced a
//! create loses.

use crate::support::{NEAR_OFF, TestStack};
use feature_cache::Entry;
use feature_cache::redis_tier::{Offer, Reservation, ReserveFor};
use serde_json::json;
use testkit::prometheus;

/// `mongodb_commands_total{command="find"}` and the negative hits of `tier`.
async fn finds_and_negative_hits(stack: &TestStack, tier: &str) -> (f64, f64) {
    let reply = stack.api.get("/metrics").await;
    assert_eq!(reply.status, 200);
    let samples = prometheus::parse(&reply.text()).expect("Prometheus text");
    (
        prometheus::sum(&samples, "mongodb_commands_total", &[("command", "find")]),
        prometheus::sum(
            &samples,
            "cache_requests_total",
            &[("tier", tier), ("result", "negative_hit")],
        ),
    )
}

/// Reads `id` `n` times, each a 404; returns the growth of MongoDB finds
/// and of `tier`'s negative hits.
async fn reads_404(stack: &TestStack, id: &str, n: usize, tier: &str) -> (f64, f64) {
    let (finds_before, hits_before) = finds_and_negative_hits(stack, tier).await;
    for _ in 0..n {
        stack
            .api
            .get(&format!("/api/features/{id}/"))
            .await
            .expect_error(404, "not_found");
    }
    let (finds, hits) = finds_and_negative_hits(stack, tier).await;
    (finds - finds_before, hits - hits_before)
}

/// What Redis holds for `id`, as an entry.
async fn redis_entry(stack: &TestStack, id: &str) -> Option<Entry> {
    stack.api.state().tiers.redis().get(id).await.unwrap()
}

async fn negative_hits_then_a_create(stack: TestStack, tier: &str) {
    let (finds, _) = reads_404(&stack, "NOPE", 1, tier).await;
    assert_eq!(finds, 1.0);
    assert!(
        matches!(
            redis_entry(&stack, "NOPE").await,
            Some(Entry::Absent { .. })
        ),
        "the absence is cached in Redis"
    );
    let (finds, hits) = reads_404(&stack, "NOPE", 20, tier).await;
    assert_eq!(finds, 0.0, "no MongoDB find for 20 more reads");
    assert_eq!(hits, 20.0, "negative hits on {tier}");

    // A create through the API replaces the absence at once, in every tier.
    let created = stack.create("NOPE", json!({"n": 1})).await;
    let reply = stack.api.get("/api/features/NOPE/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["version"], created["version"]);
    assert!(matches!(
        redis_entry(&stack, "NOPE").await,
        Some(Entry::Document(_))
    ));
    stack.finish().await;
}

#[tokio::test]
async fn a_404_is_served_from_the_near_cache_until_a_create_replaces_it() {
    let stack = TestStack::start("absent_near", &[]).await;
    negative_hits_then_a_create(stack, "local").await;
}

#[tokio::test]
async fn a_404_is_served_from_redis_until_a_create_replaces_it() {
    let stack = TestStack::start("absent_redis", &[NEAR_OFF]).await;
    negative_hits_then_a_create(stack, "redis").await;
}

#[tokio::test]
async fn with_negative_caching_off_every_404_reads_mongodb() {
    let stack = TestStack::start("absent_off", &[NEAR_OFF, ("NEGATIVE_TTL_MS", "0")]).await;
    let (finds, _) = reads_404(&stack, "NOPE", 3, "redis").await;
    assert_eq!(finds, 3.0);
    assert!(redis_entry(&stack, "NOPE").await.is_none());
    stack.finish().await;
}

#[tokio::test]
async fn batch_reads_cache_absences_and_a_create_replaces_them() {
    for (prefix, near) in [
        ("absent_batch_near", None),
        ("absent_batch", Some(NEAR_OFF)),
    ] {
        let overrides: Vec<_> = near.into_iter().collect();
        let stack = TestStack::start(prefix, &overrides).await;
        stack.create("HERE", json!({"n": 0})).await;
        let batch = json!({"customer_ids": ["HERE", "GONE1", "GONE2"]});
        let reply = stack.api.post("/api/features/batch/", &batch).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["missing"], json!(["GONE1", "GONE2"]));

        let (finds_before, _) = finds_and_negative_hits(&stack, "redis").await;
        for _ in 0..5 {
            let reply = stack.api.post("/api/features/batch/", &batch).await;
            let body = reply.json();
            let mut missing: Vec<String> = serde_json::from_value(body["missing"].clone()).unwrap();
            missing.sort();
            assert_eq!(missing, ["GONE1", "GONE2"]);
            assert_eq!(body["found"].as_object().unwrap().len(), 1);
        }
        let (finds, _) = finds_and_negative_hits(&stack, "redis").await;
        assert_eq!(finds - finds_before, 0.0, "absences served without MongoDB");
        // A single read sees the batch's absence too.
        stack
            .api
            .get("/api/features/GONE1/")
            .await
            .expect_error(404, "not_found");

        let created = stack.create("GONE1", json!({"n": 1})).await;
        let body = stack.api.post("/api/features/batch/", &batch).await.json();
        assert_eq!(body["found"]["GONE1"]["version"], created["version"]);
        assert_eq!(body["missing"], json!(["GONE2"]));
        stack.finish().await;
    }
}

/// A delete leaves a tombstone at the deleted version; with negative
/// caching on it is served as 404 like an absence (and stays: it orders a
/// late replay of an older change), until a create replaces it.
#[tokio::test]
async fn a_tombstone_is_served_as_404_without_mongodb() {
    let stack = TestStack::start("absent_tombstone", &[NEAR_OFF]).await;
    stack.create("DELETED", json!({"n": 1})).await;
    assert_eq!(stack.api.delete("/api/features/DELETED/").await.status, 204);
    let (finds, hits) = reads_404(&stack, "DELETED", 3, "redis").await;
    assert_eq!((finds, hits), (0.0, 3.0));
    assert!(matches!(
        redis_entry(&stack, "DELETED").await,
        Some(Entry::Tombstone { .. })
    ));
    let created = stack.create("DELETED", json!({"n": 2})).await;
    let reply = stack.api.get("/api/features/DELETED/").await;
    assert_eq!(reply.json()["version"], created["version"]);
    stack.finish().await;
}

/// A reader reserved the key and found nothing in MongoDB; a create lands
/// before the reader's fill of the absence. The fill loses in Redis and in
/// the near cache, and the document is served.
#[tokio::test]
async fn an_absence_fill_racing_a_create_loses() {
    let stack = TestStack::start("absent_race", &[]).await;
    let tiers = &stack.api.state().tiers;
    let near = tiers.near().expect("a near cache");
    let ticket = near.ticket("RACE");
    let reservation = tiers
        .redis()
        .reserve_many(
            &["RACE"],
            ReserveFor::Read {
                serve_absence: true,
            },
        )
        .await
        .unwrap()
        .remove(0);
    let Reservation::Lease {
        writer,
        kept,
        placed: true,
    } = reservation
    else {
        panic!("expected a fresh lease, got {reservation:?}");
    };
    assert_eq!(
        kept, -1,
        "the key held nothing: the absence ranks below every version"
    );
    // ... the reader's find comes back empty; meanwhile a create:
    let created = stack.create("RACE", json!({"n": 1})).await;

    let absence = Entry::absent("RACE", kept);
    let offers = tiers
        .redis()
        .fill_many(&[(absence.clone(), writer)])
        .await
        .unwrap();
    assert!(
        matches!(offers[0], Offer::Refused { .. } | Offer::ReservationLost),
        "{offers:?}"
    );
    assert!(
        !near.offer_with(absence, ticket),
        "the near cache refuses it"
    );

    let reply = stack.api.get("/api/features/RACE/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["version"], created["version"]);
    assert!(matches!(
        redis_entry(&stack, "RACE").await,
        Some(Entry::Document(_))
    ));
    stack.finish().await;
}

fn lease_outcome(samples: &[prometheus::Sample], outcome: &str) -> f64 {
    prometheus::sum(samples, "cache_miss_lease_total", &[("outcome", outcome)])
}

async fn samples(stack: &TestStack) -> Vec<prometheus::Sample> {
    prometheus::parse(&stack.api.get("/metrics").await.text()).expect("Prometheus text")
}

fn finds(samples: &[prometheus::Sample]) -> f64 {
    prometheus::sum(samples, "mongodb_commands_total", &[("command", "find")])
}

/// Another replica holds the key's lease (its reservation, placed before
/// its read of MongoDB). A miss here waits for that replica's fill and
/// serves it without reading MongoDB.
#[tokio::test]
async fn a_miss_waits_for_the_lease_holders_fill() {
    let stack = TestStack::start("lease_wait", &[NEAR_OFF, ("MISS_LEASE_WAIT_MS", "10000")]).await;
    let created = stack.create("HELD", json!({"n": 1})).await;
    assert!(stack.drop_from_redis("HELD").await);
    let tiers = &stack.api.state().tiers;
    let Reservation::Lease {
        writer,
        placed: true,
        ..
    } = tiers
        .redis()
        .reserve_many(
            &["HELD"],
            ReserveFor::Read {
                serve_absence: true,
            },
        )
        .await
        .unwrap()
        .remove(0)
    else {
        panic!("expected a fresh lease");
    };
    let before = samples(&stack).await;
    let request = stack
        .api
        .request(reqwest::Method::GET, "/api/features/HELD/");
    let read = tokio::spawn(crate::support::Reply::of(request));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!read.is_finished(), "the miss waits on the lease");

    // The lease holder's fill.
    let doc: feature_store::FeatureDocument = serde_json::from_value(created.clone()).unwrap();
    let entry = Entry::Document(feature_cache::CachedDocument::from_document(&doc));
    let offers = tiers.redis().fill_many(&[(entry, writer)]).await.unwrap();
    assert_eq!(offers, [Offer::Stored]);

    let reply = read.await.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["version"], created["version"]);
    assert_eq!(reply.json()["source"], "redis");
    let after = samples(&stack).await;
    assert_eq!(finds(&after) - finds(&before), 0.0, "no MongoDB find");
    assert_eq!(
        lease_outcome(&after, "waited") - lease_outcome(&before, "waited"),
        1.0
    );
    stack.finish().await;
}

/// The lease holder never fills (it died): after `MISS_LEASE_WAIT_MS` the
/// miss reads MongoDB itself and fills onto the shared reservation.
#[tokio::test]
async fn a_miss_falls_back_to_mongodb_when_the_lease_holder_never_fills() {
    let stack = TestStack::start("lease_dead", &[NEAR_OFF, ("MISS_LEASE_WAIT_MS", "300")]).await;
    let created = stack.create("ORPHAN", json!({"n": 1})).await;
    assert!(stack.drop_from_redis("ORPHAN").await);
    let tiers = &stack.api.state().tiers;
    assert!(matches!(
        tiers
            .redis()
            .reserve_many(
                &["ORPHAN"],
                ReserveFor::Read {
                    serve_absence: true
                }
            )
            .await
            .unwrap()
            .remove(0),
        Reservation::Lease { placed: true, .. }
    ));
    let before = samples(&stack).await;
    let reply = stack.api.get("/api/features/ORPHAN/").await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["version"], created["version"]);
    assert_eq!(reply.json()["source"], "mongodb");
    let after = samples(&stack).await;
    assert_eq!(finds(&after) - finds(&before), 1.0);
    assert_eq!(
        lease_outcome(&after, "fallback") - lease_outcome(&before, "fallback"),
        1.0
    );
    // Filled onto the dead holder's reservation: the next read is a hit.
    assert!(matches!(
        redis_entry(&stack, "ORPHAN").await,
        Some(Entry::Document(_))
    ));
    stack.finish().await;
}

/// With a 2 s Redis TTL and refresh in the last half of it, a key read all
/// the time is refreshed before it expires: never served from MongoDB.
#[tokio::test]
async fn a_hot_key_is_refreshed_ahead_of_its_expiry() {
    let stack = TestStack::start(
        "refresh_ahead",
        &[
            NEAR_OFF,
            ("REDIS_TTL", "2"),
            ("REFRESH_AHEAD_FRACTION", "0.5"),
        ],
    )
    .await;
    stack.create("HOT", json!({"n": 1})).await;
    let started = std::time::Instant::now();
    let mut reads = 0;
    while started.elapsed() < std::time::Duration::from_secs(5) {
        let reply = stack.api.get("/api/features/HOT/").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(
            reply.json()["source"],
            "redis",
            "read {reads} after {:?}",
            started.elapsed()
        );
        reads += 1;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let after = samples(&stack).await;
    let refreshed = prometheus::sum(&after, "cache_refresh_ahead_total", &[]);
    assert!(
        refreshed >= 2.0,
        "{refreshed} refreshes in 5 s of a 2 s TTL"
    );
    stack.finish().await;
}
